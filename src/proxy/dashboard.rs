//! The operator dashboard (`/dashboard`): token families with usage bars,
//! tokens expiring soon, a live feed of decisions, alert history, and a
//! revoke button.
//!
//! One server-rendered HTML shell plus a small script and stylesheet served
//! from their own routes (embedded with `include_str!`, no build step, no
//! external resource), so the Content-Security-Policy can forbid inline
//! script. The script polls `/dashboard/api/state` every two seconds and
//! builds the DOM with `textContent`/`createElement` only: labels come from
//! tokens and tokens come from agents, so every label is hostile.
//!
//! Authentication: the operator pastes the admin token into a form once. It
//! is checked exactly like the admin API checks it ([`admin::check_peer`],
//! [`admin::authenticate_token`]), and kept in the proxy's memory with the
//! session: the browser gets an `HttpOnly`, `SameSite=Strict` cookie holding
//! a random session id, never the token. A session never has more authority
//! than its token has now: every API call is authorized (and counted) again
//! with the token, as the admin API requests it stands for ([`STATE_AS`],
//! [`REVOKE_AS`]) — current root keys, revocations, time, the token's own
//! checks and use limits. A call the token no longer allows ends the session
//! (401 `session_ended`). Sessions also expire after at most
//! [`SESSION_TTL`]. State changes (revoke, logout) also need the session's
//! CSRF token in the `x-csrf-token` header, which a cross-site form cannot
//! send. Every route, assets included, first checks that the `Host` header
//! names this proxy ([`admin::OwnHost`]), against DNS rebinding.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Form, Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::admin;
use super::error::ProxyError;

const PAGE: &str = include_str!("dashboard/page.html");
const LOGIN: &str = include_str!("dashboard/login.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");
const ICON: &str = include_str!("dashboard/favicon.svg");

/// Name of the session cookie.
const COOKIE: &str = "till_session";
/// Header that carries the per-session CSRF token on state changes.
const CSRF_HEADER: &str = "x-csrf-token";
/// A session lasts at most this long (less if the admin token expires first).
const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Sessions kept at once. Beyond this, the family (admin token) with the
/// most sessions loses its oldest.
const MAX_SESSIONS: usize = 256;
/// Sessions one admin token family keeps at once; a new login beyond this
/// ends that family's oldest. So a holder of one admin token, logging in
/// again and again, only ever pushes out its own sessions, never the
/// operator's (whose token is another family).
const MAX_SESSIONS_PER_FAMILY: usize = 8;
/// Bodies of dashboard requests are small: a token in a form, an id.
const MAX_BODY: usize = 64 * 1024;
/// How many decisions and alerts the page shows.
const FEED: usize = 50;
/// The admin API requests `GET /dashboard/api/state` stands for: it shows
/// what these show. Authorized as the admin endpoints rather than the
/// dashboard's own paths, so a token narrowed on the admin API (`--path`,
/// `--method`, a `$p != "/admin/revoke"` check) is narrowed the same way here.
const STATE_AS: &[(&str, &str)] = &[
    ("GET", "/admin/usage"),
    ("GET", "/admin/decisions"),
    ("GET", "/admin/alerts"),
];
/// The admin API request `POST /dashboard/api/revoke` stands for.
const REVOKE_AS: &[(&str, &str)] = &[("POST", "/admin/revoke")];

/// Routes of the dashboard, merged into the main router.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/", get(page))
        .route("/dashboard/app.js", get(script))
        .route("/dashboard/app.css", get(style))
        .route("/dashboard/favicon.svg", get(icon))
        .route("/dashboard/login", post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/api/state", get(state))
        .route("/dashboard/api/revoke", post(revoke))
        .route("/dashboard/{*rest}", any(not_found))
        .layer(Extension(Arc::new(Sessions::default())))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(security_headers))
}

// ---------------------------------------------------------------------------
// Sessions

struct Session {
    csrf: String,
    /// The admin token that opened the session, which every API call is
    /// authorized with again. Never sent to the browser.
    token: Arc<str>,
    /// Its revocation ids: revoking any of them ends the session, also for
    /// the page, which is not authorized as an admin request.
    admin_ids: Vec<String>,
    expires: Instant,
}

impl Session {
    /// The admin token's family: its root block's revocation id.
    fn family(&self) -> &str {
        self.admin_ids.first().map(String::as_str).unwrap_or("")
    }
}

/// What a request learns from a valid session.
struct Authed {
    csrf: String,
    token: Arc<str>,
}

#[derive(Default)]
struct Sessions {
    // A std Mutex: held for a map lookup, never across an await.
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    fn create(&self, token: Arc<str>, admin_ids: Vec<String>, ttl: Duration) -> (String, String) {
        let id = random_hex();
        let csrf = random_hex();
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| s.expires > now);
        let family = admin_ids.first().cloned().unwrap_or_default();
        let of_family = map.values().filter(|s| s.family() == family).count();
        let evict_from = if of_family >= MAX_SESSIONS_PER_FAMILY {
            Some(family.clone())
        } else if map.len() >= MAX_SESSIONS {
            let mut counts: HashMap<&str, usize> = HashMap::new();
            for s in map.values() {
                *counts.entry(s.family()).or_default() += 1;
            }
            counts
                .into_iter()
                .max_by_key(|(_, n)| *n)
                .map(|(f, _)| f.to_string())
        } else {
            None
        };
        if let Some(f) = evict_from
            && let Some(oldest) = map
                .iter()
                .filter(|(_, s)| s.family() == f)
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                token,
                admin_ids,
                expires: now + ttl,
            },
        );
        (id, csrf)
    }

    /// The session named by the request's cookie, if it is still good.
    fn get(&self, st: &AppState, headers: &HeaderMap) -> Option<Authed> {
        let id = session_cookie(headers)?;
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let s = map.get(id)?;
        let revoked = !matches!(st.revocations.first_revoked(&s.admin_ids), Ok(None));
        if s.expires <= Instant::now() || revoked {
            map.remove(id);
            return None;
        }
        Some(Authed {
            csrf: s.csrf.clone(),
            token: s.token.clone(),
        })
    }

    fn remove(&self, headers: &HeaderMap) {
        if let Some(id) = session_cookie(headers) {
            self.map
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
        }
    }
}

/// 32 random bytes from the OS, hex.
fn random_hex() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Equality that does not stop at the first differing byte.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A state-changing request must carry the session's CSRF token.
fn csrf_ok(s: &Authed, headers: &HeaderMap) -> bool {
    headers
        .get(CSRF_HEADER)
        .is_some_and(|v| ct_eq(v.as_bytes(), s.csrf.as_bytes()))
}

/// A browser's `Origin`, when sent, must be this host: refuses cross-site
/// posts even from browsers that ignore SameSite.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, h)| h);
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

// ---------------------------------------------------------------------------
// Pages

/// Headers on every dashboard response.
async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; \
             form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Not `no-referrer`: with it Chrome sends `Origin: null` on the
    // page's own form posts, which `same_origin` refuses.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

/// Escapes text for HTML content and double-quoted attributes.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

fn login_page(status: StatusCode, error: Option<&str>) -> Response {
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default();
    html(status, LOGIN.replace("{{error}}", &error))
}

async fn page(
    _: admin::OwnHost,
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(sessions): Extension<Arc<Sessions>>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = admin::check_peer(&st, peer) {
        return login_page(StatusCode::FORBIDDEN, Some(&e.message()));
    }
    match sessions.get(&st, &headers) {
        // The CSRF token is hex made here: nothing from a token reaches the
        // shell, which is why it can be rendered without a template engine.
        Some(s) => html(StatusCode::OK, PAGE.replace("{{csrf}}", &escape(&s.csrf))),
        // A cookie this proxy does not know: most often a restart, which an
        // operator would otherwise take for a bug or an attack.
        None if session_cookie(&headers).is_some() => login_page(
            StatusCode::OK,
            Some(
                "your session has ended: the proxy was restarted (sessions live in its memory), \
                 the session expired, or its admin token was revoked or no longer allows what \
                 the dashboard does; log in again",
            ),
        ),
        None => login_page(StatusCode::OK, None),
    }
}

async fn script(_: admin::OwnHost) -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
        .into_response()
}

async fn style(_: admin::OwnHost) -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}

/// Linked from the pages so browsers do not ask the proxy for
/// `/favicon.ico` (which would be a denied request in the feed).
async fn icon(_: admin::OwnHost) -> Response {
    ([(header::CONTENT_TYPE, "image/svg+xml")], ICON).into_response()
}

async fn not_found(_: admin::OwnHost) -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"error": {"message": "no such dashboard page", "type": "not_found_error", "code": "not_found"}}))).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    _: admin::OwnHost,
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(sessions): Extension<Arc<Sessions>>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    if let Err(e) = admin::check_peer(&st, peer) {
        return login_page(StatusCode::FORBIDDEN, Some(&e.message()));
    }
    if !same_origin(&headers) {
        return login_page(StatusCode::FORBIDDEN, Some("cross-origin login refused"));
    }
    let Ok(Form(form)) = form else {
        return login_page(StatusCode::BAD_REQUEST, Some("paste the admin token"));
    };
    let text = form.token.trim();
    if text.is_empty() {
        return login_page(StatusCode::UNAUTHORIZED, Some("paste the admin token"));
    }
    // The dashboard can revoke: its login needs an admin token that allows
    // `POST /dashboard/login` (the whole dashboard), and counts one use.
    let token = match admin::authenticate_token(&st, text, "POST", "/dashboard/login").await {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(peer = %peer, code = e.code(), "dashboard login refused");
            let msg = match &e {
                ProxyError::Denied(_) => format!(
                    "not accepted as an admin token ({}); issue one with `till issue --admin`",
                    e.message()
                ),
                _ => e.message(),
            };
            return login_page(e.status(), Some(&msg));
        }
    };
    let ttl = match token.expires_unix {
        Some(exp) => SESSION_TTL.min(Duration::from_secs(exp.saturating_sub(now_unix(&st)))),
        None => SESSION_TTL,
    };
    let (id, _) = sessions.create(Arc::from(text), token.ids.clone(), ttl);
    tracing::info!(peer = %peer, "dashboard login");
    let cookie = format!(
        "{COOKIE}={id}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age={}",
        ttl.as_secs()
    );
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/dashboard".to_string()),
            (header::SET_COOKIE, cookie),
        ],
    )
        .into_response()
}

/// The proxy's own clock (the one token expiry is checked against).
fn now_unix(st: &AppState) -> u64 {
    st.clock
        .now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a session-authenticated call was refused.
fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    let kind = if status == StatusCode::UNAUTHORIZED {
        "authentication_error"
    } else {
        "permission_error"
    };
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "code": code}})),
    )
        .into_response()
}

/// Peer, session and, for state changes, origin and CSRF token.
fn check(
    st: &AppState,
    peer: SocketAddr,
    sessions: &Sessions,
    headers: &HeaderMap,
    changes_state: bool,
) -> Result<Authed, Box<Response>> {
    admin::check_peer(st, peer).map_err(|e| Box::new(e.into_response()))?;
    let s = sessions.get(st, headers).ok_or_else(|| {
        Box::new(refuse(
            StatusCode::UNAUTHORIZED,
            "no_session",
            "log in at /dashboard first",
        ))
    })?;
    if changes_state && !(same_origin(headers) && csrf_ok(&s, headers)) {
        return Err(Box::new(refuse(
            StatusCode::FORBIDDEN,
            "csrf",
            "missing or wrong x-csrf-token header",
        )));
    }
    Ok(s)
}

/// [`check`], then the session's admin token authorized and counted again
/// as the admin requests `acts_as`, as the admin API would now. Refused:
/// the session ends.
async fn authorize(
    st: &AppState,
    peer: SocketAddr,
    sessions: &Sessions,
    headers: &HeaderMap,
    changes_state: bool,
    acts_as: &[(&str, &str)],
) -> Result<(), Box<Response>> {
    let s = check(st, peer, sessions, headers, changes_state)?;
    match admin::authenticate_as(st, &s.token, acts_as).await {
        Ok(_) => Ok(()),
        // The store failed, not the token: the session may work again.
        Err(e @ ProxyError::StoreUnavailable(_)) => Err(Box::new(e.into_response())),
        Err(e) => {
            sessions.remove(headers);
            let asked = acts_as
                .iter()
                .map(|(m, p)| format!("{m} {p}"))
                .collect::<Vec<_>>()
                .join(", ");
            tracing::info!(peer = %peer, code = e.code(), "dashboard session ended: its admin token was refused");
            Err(Box::new(refuse(
                StatusCode::UNAUTHORIZED,
                "session_ended",
                &format!(
                    "this dashboard session has ended: its admin token no longer allows {asked}, \
                     which this dashboard action needs ({}); log in again with an admin token that does",
                    e.message()
                ),
            )))
        }
    }
}

async fn logout(
    _: admin::OwnHost,
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(sessions): Extension<Arc<Sessions>>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = check(&st, peer, &sessions, &headers, true) {
        return *r;
    }
    sessions.remove(&headers);
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
        Json(json!({"logged_out": true})),
    )
        .into_response()
}

/// Query of `/dashboard/api/state`: which page of the families list, and
/// an optional search. Anything unparsable falls back to the default, so a
/// hand-edited URL still shows the first page rather than an error page.
#[derive(Deserialize, Default)]
struct StateQuery {
    q: Option<String>,
    page: Option<String>,
    per_page: Option<String>,
}

/// Everything the page shows, in one answer. The families list is filtered
/// and paginated here, not in the browser: a proxy with thousands of token
/// families would otherwise ship all of them every two seconds.
async fn state(
    _: admin::OwnHost,
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(sessions): Extension<Arc<Sessions>>,
    headers: HeaderMap,
    query: Result<Query<StateQuery>, QueryRejection>,
) -> Response {
    if let Err(r) = authorize(&st, peer, &sessions, &headers, false, STATE_AS).await {
        return *r;
    }
    let usage = match admin::usage_view(&st).await {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let query = query.map(|Query(q)| q).unwrap_or_default();
    let now = now_unix(&st);
    let all = usage["families"].as_array().cloned().unwrap_or_default();
    let expiring = expiring_soon(&all, now);
    let q = query
        .q
        .as_deref()
        .map(|q| q.trim().chars().take(MAX_QUERY).collect::<String>())
        .unwrap_or_default();
    let per_page = number(query.per_page.as_deref(), PER_PAGE).clamp(1, MAX_PER_PAGE);
    let page = Page::of(
        all.iter().filter(|f| family_matches(f, &q)).collect(),
        number(query.page.as_deref(), 1),
        per_page,
    );
    let mut alerts = st.monitor.alerts.history();
    alerts.truncate(FEED);
    let families: Vec<serde_json::Value> = page.items.into_iter().map(fewer_blocks).collect();
    Json(json!({
        "now": now,
        "families": families,
        "total": all.len(),
        "matched": page.matched,
        "page": page.page,
        "pages": page.pages,
        "per_page": per_page,
        "q": q,
        "expiring": expiring,
        "decisions": st.monitor.recent(false, FEED),
        "alerts": alerts,
        "revocations": st.revocations.len(),
    }))
    .into_response()
}

/// Blocks of one family the page gets. A token holder can mint up to
/// `limits.max_blocks_per_family` (10,000) keys of one family offline, and
/// shipping them all every two seconds made each poll megabytes; `till
/// usage` lists them all.
const MAX_BLOCKS_SHOWN: usize = 200;

/// `f` with at most [`MAX_BLOCKS_SHOWN`] blocks: the shallowest first (so
/// parents come before their children), the most recently used first
/// among those of one depth; `blocks_total` says how many there are.
fn fewer_blocks(mut f: serde_json::Value) -> serde_json::Value {
    let Some(blocks) = f.get_mut("blocks").and_then(|b| b.as_array_mut()) else {
        return f;
    };
    let total = blocks.len();
    if total > MAX_BLOCKS_SHOWN {
        blocks.sort_by_key(|b| {
            (
                b["index"].as_u64().unwrap_or(0),
                std::cmp::Reverse(b["last_use"].as_u64()),
            )
        });
        blocks.truncate(MAX_BLOCKS_SHOWN);
    }
    f["blocks_total"] = json!(total);
    f
}

/// Families shown per page unless the page asks otherwise.
const PER_PAGE: usize = 50;
/// Families per page at most: bounds the answer whatever the URL says.
const MAX_PER_PAGE: usize = 200;
/// Characters of a search kept; a label longer than this is still found
/// by its first ones.
const MAX_QUERY: usize = 200;
/// "Expiring soon" means within this many seconds.
const EXPIRING_SOON_SECS: u64 = 72 * 3600;

fn number(s: Option<&str>, default: usize) -> usize {
    s.and_then(|s| s.trim().parse().ok()).unwrap_or(default)
}

/// One page of the matching families (pages count from 1; a page past the
/// end gives the last one, so narrowing a search never shows an empty page
/// while there are matches).
struct Page {
    items: Vec<serde_json::Value>,
    matched: usize,
    page: usize,
    pages: usize,
}

impl Page {
    fn of(matching: Vec<&serde_json::Value>, page: usize, per_page: usize) -> Page {
        let matched = matching.len();
        let pages = matched.div_ceil(per_page).max(1);
        let page = page.clamp(1, pages);
        let items = matching
            .into_iter()
            .skip((page - 1) * per_page)
            .take(per_page)
            .cloned()
            .collect();
        Page {
            items,
            matched,
            page,
            pages,
        }
    }
}

/// Whether a family matches a search: its label or any of its blocks'
/// labels contains `q` (ignoring case), or `q` starts one of its ids (what
/// `till usage` prints).
fn family_matches(f: &serde_json::Value, q: &str) -> bool {
    if q.is_empty() {
        return true;
    }
    let q = q.to_lowercase();
    let blocks = f["blocks"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let label_hit = std::iter::once(&f["label"])
        .chain(blocks.iter().map(|b| &b["label"]))
        .filter_map(|l| l.as_str())
        .any(|l| l.to_lowercase().contains(&q));
    let id_hit = std::iter::once(&f["family"])
        .chain(blocks.iter().map(|b| &b["id"]))
        .filter_map(|i| i.as_str())
        .any(|i| i.starts_with(&q));
    label_hit || id_hit
}

/// Blocks whose own expiry falls within [`EXPIRING_SOON_SECS`], soonest
/// first, over every family (not just the page shown). Left out: revoked
/// blocks, blocks already expired (the families list marks those), and
/// blocks with no use left on themselves or an ancestor: a used-up token
/// expiring is nothing to act on.
fn expiring_soon(families: &[serde_json::Value], now: u64) -> Vec<serde_json::Value> {
    use std::collections::HashMap;
    let mut soon = Vec::new();
    for f in families {
        let blocks = f["blocks"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let by_id: HashMap<&str, &serde_json::Value> = blocks
            .iter()
            .filter_map(|b| Some((b["id"].as_str()?, b)))
            .collect();
        for b in blocks {
            let Some(exp) = b["expires"].as_u64() else {
                continue;
            };
            if b["revoked"] == true || exp <= now || exp - now > EXPIRING_SOON_SECS {
                continue;
            }
            if used_up(b, &by_id) {
                continue;
            }
            soon.push(json!({
                "family": f["family"],
                "family_label": f["label"],
                "id": b["id"],
                "index": b["index"],
                "label": b["label"],
                "expires": exp,
            }));
        }
    }
    soon.sort_by_key(|e| e["expires"].as_u64());
    soon.truncate(FEED);
    soon
}

/// No use left on the block or on any ancestor: every use counts on each of
/// them, so the fewest remaining on the way up is what the token has.
fn used_up(
    b: &serde_json::Value,
    by_id: &std::collections::HashMap<&str, &serde_json::Value>,
) -> bool {
    let mut cur = Some(b);
    // The parent chain comes from the store; bound the walk in case it loops.
    for _ in 0..64 {
        let Some(c) = cur else { return false };
        if c["remaining"].as_u64() == Some(0) {
            return true;
        }
        cur = c["parent"].as_str().and_then(|p| by_id.get(p).copied());
    }
    false
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    id: String,
}

async fn revoke(
    _: admin::OwnHost,
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(sessions): Extension<Arc<Sessions>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorize(&st, peer, &sessions, &headers, true, REVOKE_AS).await {
        return *r;
    }
    let req: RevokeBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return ProxyError::BadRequest(format!("expected {{\"id\": HEX}}: {e}"))
                .into_response();
        }
    };
    let id = match admin::target_id(&admin::RevokeRequest {
        id: Some(req.id),
        token: None,
        root: false,
    }) {
        Ok(id) => id,
        Err(e) => return ProxyError::BadRequest(e).into_response(),
    };
    match st.revocations.revoke(&id).await {
        Ok(new) => {
            tracing::info!(revocation_id = %id, new, peer = %peer, "revoked from the dashboard");
            Json(json!({"revoked": id, "already_revoked": !new})).into_response()
        }
        Err(e) => ProxyError::StoreUnavailable(e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<img src=x onerror=\"alert('1')\">&"),
            "&lt;img src=x onerror=&quot;alert(&#39;1&#39;)&quot;&gt;&amp;"
        );
    }

    #[test]
    fn regression_logging_in_again_and_again_ends_only_the_same_familys_sessions() {
        let sessions = Sessions::default();
        let ttl = Duration::from_secs(3600);
        let token: Arc<str> = Arc::from("t");
        let (operator, _) = sessions.create(token.clone(), vec!["op".into()], ttl);
        // Another admin token's holder logs in 1000 times (the cap was
        // global: the operator's session, closest to expiry, went first).
        for _ in 0..1000 {
            sessions.create(token.clone(), vec!["other".into(), "child".into()], ttl);
        }
        let map = sessions.map.lock().unwrap();
        assert!(map.contains_key(&operator), "the operator's session stays");
        let theirs = map.values().filter(|s| s.family() == "other").count();
        assert_eq!(theirs, MAX_SESSIONS_PER_FAMILY);
        drop(map);
        // Many families: the global cap still holds, and the biggest family
        // pays first.
        for i in 0..MAX_SESSIONS {
            sessions.create(token.clone(), vec![format!("f{i}")], ttl);
        }
        let map = sessions.map.lock().unwrap();
        assert!(map.len() <= MAX_SESSIONS);
        assert!(map.values().filter(|s| s.family() == "other").count() < MAX_SESSIONS_PER_FAMILY);
    }

    #[test]
    fn reads_only_a_well_formed_session_cookie() {
        let mut h = HeaderMap::new();
        let id = "ab".repeat(32);
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {COOKIE}={id}; c=d")).unwrap(),
        );
        assert_eq!(session_cookie(&h), Some(id.as_str()));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("till_session=short"),
        );
        assert_eq!(session_cookie(&h), None);
    }

    #[test]
    fn origin_must_match_host() {
        let mut h = HeaderMap::new();
        assert!(same_origin(&h), "no Origin: not a cross-site browser post");
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://evil.test"));
        assert!(!same_origin(&h));
    }

    #[test]
    fn a_page_is_never_empty_while_there_are_matches() {
        let fams: Vec<serde_json::Value> = (0..7).map(|i| json!({ "family": i })).collect();
        let refs: Vec<&serde_json::Value> = fams.iter().collect();
        let p = Page::of(refs.clone(), 9, 3);
        assert_eq!((p.page, p.pages, p.matched, p.items.len()), (3, 3, 7, 1));
        let p = Page::of(refs, 0, 3);
        assert_eq!((p.page, p.items.len()), (1, 3));
        let p = Page::of(Vec::new(), 2, 3);
        assert_eq!((p.page, p.pages, p.items.len()), (1, 1, 0));
    }

    #[test]
    fn used_up_looks_at_every_ancestor_and_stops_on_a_loop() {
        let a = json!({"id": "a", "parent": "b", "remaining": 3});
        let b = json!({"id": "b", "parent": "a", "remaining": 2});
        let by_id: std::collections::HashMap<&str, &serde_json::Value> =
            [("a", &a), ("b", &b)].into_iter().collect();
        assert!(
            !used_up(&a, &by_id),
            "a parent loop is walked a bounded number of times"
        );
        let c = json!({"id": "c", "parent": "d", "remaining": 5});
        let d = json!({"id": "d", "parent": null, "remaining": 0});
        let by_id: std::collections::HashMap<&str, &serde_json::Value> =
            [("c", &c), ("d", &d)].into_iter().collect();
        assert!(used_up(&c, &by_id));
    }

    #[test]
    fn constant_time_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
