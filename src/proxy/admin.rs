//! The admin API: revoke, list revocations, usage. Authenticated with an
//! admin token (a Till token whose authority block holds
//! `right("till:admin", "*", "/")`) and served to loopback clients only
//! unless `danger_admin_remote` is set.
//!
//! The admin plane (this API, the dashboard and `/metrics`) also answers only
//! requests whose `Host` header names this proxy ([`OwnHost`]): a web page
//! whose name an attacker points at 127.0.0.1 (DNS rebinding) reaches it
//! from the operator's own browser, from loopback, under the attacker's name.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::error::ProxyError;
use super::handler::{extract_token, store_error};
use crate::store::{Reservation, ReservationGuard};
use crate::token::RawToken;
use crate::verify::{Denial, DenialKind, VerifiedToken, revoked_denial};

fn forbidden(reason: &str) -> ProxyError {
    ProxyError::Denied(Denial::new(DenialKind::Scope, reason))
}

/// Extractor for admin endpoints: the caller is an allowed peer (loopback
/// unless `danger_admin_remote`) holding a valid admin token. Put it before
/// any extractor that reads the request, so nothing is parsed for strangers.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Response> {
        let ConnectInfo(peer) = ConnectInfo::<SocketAddr>::from_request_parts(parts, st)
            .await
            .map_err(IntoResponse::into_response)?;
        check_peer(st, peer).map_err(IntoResponse::into_response)?;
        OwnHost::from_request_parts(parts, st).await?;
        let text = extract_token(&parts.headers).map_err(IntoResponse::into_response)?;
        authenticate_token(st, text, parts.method.as_str(), parts.uri.path())
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Admin)
    }
}

/// Whether `ip` is a loopback address, also when a dual-stack (`[::]`)
/// listener shows an IPv4 client as `::ffff:127.0.0.1`. Only the mapped
/// form is unwrapped: the deprecated IPv4-compatible `::127.0.0.1` is an
/// IPv6 address like any other, not loopback.
pub(crate) fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Admin endpoints (API and dashboard) answer loopback clients only, unless
/// `danger_admin_remote` is set.
pub(crate) fn check_peer(st: &AppState, peer: SocketAddr) -> Result<(), ProxyError> {
    if !st.admin_remote && !is_loopback(peer.ip()) {
        return Err(forbidden(
            "the admin API only answers loopback clients (set danger_admin_remote to change this)",
        ));
    }
    Ok(())
}

/// Extractor for every admin-plane route (admin API, dashboard, `/metrics`):
/// the request's `Host` (and, in absolute form or HTTP/2, the URI's
/// authority) is `localhost`, `127.0.0.1`, `[::1]` or the address the
/// client connected to, with the port it connected to, or an entry of
/// `admin_hosts`. Refused with 421 otherwise. Needs the
/// [`super::server::LocalAddr`] that `server::serve` sets; without it
/// nothing is accepted.
pub struct OwnHost;

impl FromRequestParts<AppState> for OwnHost {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Response> {
        let local = parts
            .extensions
            .get::<super::server::LocalAddr>()
            .map(|l| l.0);
        let mut names = Vec::new();
        let mut unreadable = false;
        for v in parts.headers.get_all(axum::http::header::HOST) {
            match v.to_str() {
                Ok(h) => names.push(h),
                Err(_) => unreadable = true,
            }
        }
        if let Some(a) = parts.uri.authority() {
            names.push(a.as_str());
        }
        // A reverse proxy on this machine makes every client a loopback
        // peer, and may pass on the client's own Host (Caddy does) or put
        // in its upstream's (nginx does): through it, only a name the
        // operator listed stands for the admin plane.
        let proxied = forwarded_by(&parts.headers);
        let allowed = |h: &str| match proxied {
            Some(_) => is_listed(h, &st.admin_hosts),
            None => local.is_some_and(|local| host_allowed(h, local, &st.admin_hosts)),
        };
        if !unreadable && !names.is_empty() && names.iter().all(|h| allowed(h)) {
            return Ok(OwnHost);
        }
        let first = names.first().copied();
        Err(match proxied {
            Some(header) => proxied_without_listed_name(header, first),
            None => misdirected(first, local),
        })
    }
}

/// Headers a reverse proxy adds: a request carrying one came through a
/// proxy, whatever its peer address says.
const FORWARDING_HEADERS: [&str; 6] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "via",
];

/// The first forwarding header `headers` carry, if any.
fn forwarded_by(headers: &axum::http::HeaderMap) -> Option<&'static str> {
    FORWARDING_HEADERS
        .into_iter()
        .find(|h| headers.contains_key(*h))
}

/// The 421 for a proxied admin-plane request under a name not listed.
fn proxied_without_listed_name(header: &str, host: Option<&str>) -> Response {
    let shown = shown_host(host);
    let message = format!(
        "this request came through a reverse proxy (it carries {header}) under the Host {shown}: \
         through a proxy the admin API, the dashboard and /metrics answer only the names listed \
         in admin_hosts in till.toml, since every client of a proxy on this machine looks local. \
         To reach them through yours, list the name clients use, e.g. admin_hosts = \
         [\"till.example.com\"]; to keep them private, do not forward /admin, /dashboard and \
         /metrics (README, \"Run as a service\")"
    );
    host_not_allowed(message)
}

/// A client's `Host` for a message: quoted, at most 100 characters.
fn shown_host(host: Option<&str>) -> String {
    match host {
        Some(h) => format!("{:?}", h.chars().take(100).collect::<String>()),
        None => "(none)".into(),
    }
}

/// The 421 `host_not_allowed` answer with `message`.
fn host_not_allowed(message: String) -> Response {
    (
        StatusCode::MISDIRECTED_REQUEST,
        Json(json!({"error": {"message": message, "type": "permission_error", "code": "host_not_allowed"}})),
    )
        .into_response()
}

/// Whether `host` is a name the operator listed in `admin_hosts`.
fn is_listed(host: &str, admin_hosts: &[String]) -> bool {
    admin_hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
}

/// Splits a `Host` value into its name and port (80 when absent). IPv6
/// literals keep their brackets. `None` when it is not of that form.
pub(crate) fn split_host_port(host: &str) -> Option<(&str, u16)> {
    let (name, port) = if host.starts_with('[') {
        let end = host.find(']')? + 1;
        let (name, rest) = host.split_at(end);
        match rest {
            "" => (name, None),
            r => (name, Some(r.strip_prefix(':')?)),
        }
    } else {
        match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    let valid_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b))
        && (name.starts_with('[') || !name.contains(':'));
    if !valid_name {
        return None;
    }
    let port = match port {
        None => 80,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
        Some(_) => return None,
    };
    Some((name, port))
}

/// Whether the `Host` value `host` names this proxy on a connection whose
/// local end is `local`. Names other than `localhost` and IP literals must
/// be listed in `admin_hosts`: any other name may be an attacker's.
pub(crate) fn host_allowed(host: &str, local: SocketAddr, admin_hosts: &[String]) -> bool {
    if is_listed(host, admin_hosts) {
        return true;
    }
    let Some((name, port)) = split_host_port(host) else {
        return false;
    };
    if port != local.port() {
        return false;
    }
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let literal = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    match literal.parse::<IpAddr>() {
        Ok(ip) => {
            let ip = ip.to_canonical();
            ip == IpAddr::V4(Ipv4Addr::LOCALHOST)
                || ip == IpAddr::V6(Ipv6Addr::LOCALHOST)
                || ip == local.ip().to_canonical()
        }
        Err(_) => false,
    }
}

/// The 421 for a `Host` that does not name this proxy.
fn misdirected(host: Option<&str>, local: Option<SocketAddr>) -> Response {
    let shown = shown_host(host);
    let port = local.map(|l| l.port().to_string());
    let port = port.as_deref().unwrap_or("PORT");
    let message = format!(
        "the Host header {shown} does not name this proxy: the admin API, the dashboard and \
         /metrics answer only localhost, 127.0.0.1, [::1] or the address connected to, with \
         port {port}, and the names listed in admin_hosts in till.toml. If you reach the proxy \
         by another name, add it as the client sends it, e.g. admin_hosts = [\"till.internal:{port}\"]"
    );
    host_not_allowed(message)
}

/// Verifies an admin token for one admin request (`method` and `path` as
/// sent, e.g. `GET /admin/usage`): signature (cached), not revoked, admin
/// right, every block's checks (so an attenuated admin token can be
/// read-only, limited to some paths, or short-lived), and its use limits —
/// an admin request is counted like any other. Shared by the admin API and
/// the dashboard login.
pub(crate) async fn authenticate_token(
    st: &AppState,
    text: &str,
    method: &str,
    path: &str,
) -> Result<Arc<VerifiedToken>, ProxyError> {
    authenticate_as(st, text, &[(method, path)]).await
}

/// [`authenticate_token`] for one request that stands for several admin
/// requests (a dashboard refresh shows what three admin endpoints show):
/// every `(method, path)` must be allowed, and the request counts as one use.
pub(crate) async fn authenticate_as(
    st: &AppState,
    text: &str,
    requests: &[(&str, &str)],
) -> Result<Arc<VerifiedToken>, ProxyError> {
    let token = st
        .verify_cached(text)
        .map_err(|e| ProxyError::InvalidToken(e.to_string()))?;
    // An unreadable revocation list denies: an admin token is the one token
    // that can undo revocations.
    match st.revocations.first_revoked(&token.ids) {
        Ok(None) => {}
        Ok(Some(b)) => return Err(ProxyError::Denied(revoked_denial(&token.view, b))),
        Err(e) => return Err(ProxyError::StoreUnavailable(e.to_string())),
    }
    let now = st.clock.now();
    let authorize = |uses: &[u64]| -> Result<(), Denial> {
        requests.iter().try_for_each(|(method, path)| {
            st.verifier.authorize_admin(&token, method, path, now, uses)
        })
    };
    // Decide before counting, then count and re-check, as for proxied
    // requests (ARCHITECTURE.md, "The request path").
    let counts = st.counters.peek(&token.ids).await.map_err(store_error)?;
    let next: Vec<u64> = counts.iter().map(|c| c.saturating_add(1)).collect();
    authorize(&next).map_err(ProxyError::Denied)?;
    let Reservation { uses, durable } = st
        .counters
        .reserve(&token.specs)
        .await
        .map_err(store_error)?;
    let guard = ReservationGuard::new(st.counters.clone(), token.ids.clone());
    if let Err(d) = authorize(&uses) {
        if let Err(e) = guard.release().await {
            tracing::error!(error = %e, "rollback of a denied admin reservation failed");
        }
        return Err(ProxyError::Denied(d));
    }
    durable.await.map_err(store_error)?;
    guard.spend();
    Ok(token)
}

/// Body of `POST /admin/revoke`: a revocation id, or a token whose last
/// block (or, with `root`, whose authority block) is to be revoked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    pub id: Option<String>,
    pub token: Option<String>,
    #[serde(default)]
    pub root: bool,
}

/// Turns a revoke request into the id to revoke.
pub fn target_id(req: &RevokeRequest) -> Result<String, String> {
    match (&req.id, &req.token) {
        (Some(id), None) => {
            let id = id.trim().to_ascii_lowercase();
            if id.len() != 128 || hex::decode(&id).is_err() {
                return Err("a revocation id is 128 hex digits, as shown by `till inspect`".into());
            }
            Ok(id)
        }
        (None, Some(t)) => {
            let raw = RawToken::parse(t).map_err(|e| e.to_string())?;
            let ids = raw.revocation_ids();
            let id = if req.root { ids.first() } else { ids.last() };
            id.cloned().ok_or_else(|| "token has no blocks".to_string())
        }
        _ => Err("give exactly one of \"id\" or \"token\"".into()),
    }
}

pub async fn revoke(_: Admin, State(st): State<AppState>, body: axum::body::Bytes) -> Response {
    let req: RevokeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return ProxyError::BadRequest(format!(
                "expected {{\"id\": HEX}} or {{\"token\": TOKEN, \"root\": bool}}: {e}"
            ))
            .into_response();
        }
    };
    let id = match target_id(&req) {
        Ok(id) => id,
        Err(e) => return ProxyError::BadRequest(e).into_response(),
    };
    match st.revocations.revoke(&id).await {
        Ok(new) => {
            tracing::info!(revocation_id = %id, new, "revoked");
            Json(json!({"revoked": id, "already_revoked": !new})).into_response()
        }
        Err(e) => ProxyError::StoreUnavailable(e.to_string()).into_response(),
    }
}

/// `POST /admin/reload`: re-reads the config file and the upstreams'
/// credentials and swaps the upstream table (see [`super::reload`]). 422
/// with the reason when the new configuration is refused, in which case
/// nothing changed.
pub async fn reload(_: Admin, State(st): State<AppState>) -> Response {
    let Some(r) = st.reloader.get().cloned() else {
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": {
                "message": "this proxy was not started from a config file, so there is nothing to reload",
                "type": "invalid_request_error",
                "code": "reload_unavailable",
            }})),
        )
            .into_response();
    };
    let state = st.clone();
    // File reads and policy parsing: kept off the async workers.
    match tokio::task::spawn_blocking(move || r.reload(&state, "POST /admin/reload")).await {
        Ok(Ok(done)) => Json(done).into_response(),
        Ok(Err(e)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"reloaded": false, "error": {
                "message": super::reload::refused_message(&e),
                "type": "invalid_request_error",
                "code": "invalid_config",
            }})),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "configuration reload task failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"reloaded": false, "error": {
                    "message": "the reload did not complete; still serving the previous configuration",
                    "type": "api_error",
                    "code": "reload_failed",
                }})),
            )
                .into_response()
        }
    }
}

pub async fn revocations(_: Admin, State(st): State<AppState>) -> Response {
    match st.revocations.list().await {
        Ok(list) => {
            let items: Vec<_> = list
                .into_iter()
                .map(|(id, at)| json!({"id": id, "revoked_at": at}))
                .collect();
            Json(json!({ "revoked": items })).into_response()
        }
        Err(e) => ProxyError::StoreUnavailable(e.to_string()).into_response(),
    }
}

/// Builds the usage view: counters grouped into token families, with
/// what the proxy has seen of each block. Numbers come from the counter
/// store.
pub async fn usage_view(st: &AppState) -> Result<serde_json::Value, ProxyError> {
    use std::collections::HashMap;
    let unavailable = |e: crate::store::StoreError| ProxyError::StoreUnavailable(e.to_string());
    let counters = st.counters.list().await.map_err(unavailable)?;
    let metas = st.counters.blocks().await.map_err(unavailable)?;
    let meta: HashMap<&str, &crate::store::BlockMeta> =
        metas.iter().map(|m| (m.id.as_str(), m)).collect();
    let mut children: HashMap<&str, usize> = HashMap::new();
    for m in &metas {
        if let Some(p) = &m.parent {
            *children.entry(p.as_str()).or_default() += 1;
        }
    }
    let is_revoked = |id: &str| -> bool {
        // A block is revoked when it or any ancestor is.
        let mut cur = Some(id.to_string());
        let mut hops = 0;
        while let Some(c) = cur {
            if matches!(
                st.revocations.first_revoked(std::slice::from_ref(&c)),
                Ok(Some(_))
            ) {
                return true;
            }
            hops += 1;
            cur = meta
                .get(c.as_str())
                .and_then(|m| m.parent.clone())
                .filter(|_| hops < 64);
        }
        false
    };
    let mut families: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for c in &counters {
        let m = meta.get(c.id.as_str());
        let family = m.map(|m| m.family.clone()).unwrap_or_else(|| c.id.clone());
        let limit = c.limit.or(m.and_then(|m| m.limit));
        families.entry(family).or_default().push(json!({
            "id": c.id,
            "index": m.map(|m| m.index),
            "parent": m.and_then(|m| m.parent.clone()),
            "label": m.and_then(|m| m.label.clone()),
            "uses": c.uses,
            "limit": limit,
            "remaining": limit.map(|l| l.saturating_sub(c.uses)),
            "rates": m.map(|m| m.rates.iter().map(|r| r.to_string()).collect::<Vec<_>>()).unwrap_or_default(),
            "concurrency": m.and_then(|m| m.concurrency),
            "expires": c.expires.or(m.and_then(|m| m.expires)),
            "last_use": c.last_use,
            "children_seen": children.get(c.id.as_str()).copied().unwrap_or(0),
            "revoked": is_revoked(&c.id),
        }));
    }
    let mut out: Vec<serde_json::Value> = families
        .into_iter()
        .map(|(family, mut blocks)| {
            blocks.sort_by_key(|b| b["index"].as_u64().unwrap_or(0));
            let root = blocks
                .iter()
                .find(|b| b["id"] == family.as_str())
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            let last_use = blocks.iter().filter_map(|b| b["last_use"].as_u64()).max();
            json!({
                "family": family,
                "label": root["label"], "uses": root["uses"], "limit": root["limit"],
                "remaining": root["remaining"], "expires": root["expires"],
                "revoked": root["revoked"], "last_use": last_use,
                "blocks": blocks,
            })
        })
        .collect();
    out.sort_by(|a, b| {
        b["last_use"]
            .as_u64()
            .cmp(&a["last_use"].as_u64())
            .then(a["family"].as_str().cmp(&b["family"].as_str()))
    });
    Ok(json!({
        "families": out,
        "recent_denials": st.monitor.recent(true, 50),
    }))
}

pub async fn usage(_: Admin, State(st): State<AppState>) -> Response {
    match usage_view(&st).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// One family in detail, by the id of any of its blocks.
pub async fn usage_one(_: Admin, State(st): State<AppState>, Path(id): Path<String>) -> Response {
    let id = id.to_ascii_lowercase();
    let view = match usage_view(&st).await {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let found = view["families"].as_array().into_iter().flatten().find(|f| {
        f["family"] == id.as_str()
            || f["blocks"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|b| b["id"] == id.as_str())
    });
    match found {
        Some(f) => Json(f.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"message": "no counter for this id: the proxy has not seen it used", "type": "not_found_error", "code": "not_found"}})),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
pub struct DecisionQuery {
    #[serde(default)]
    pub denied: bool,
    pub limit: Option<usize>,
}

/// Recent decisions (newest first), optionally denials only.
pub async fn decisions(
    _: Admin,
    State(st): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<DecisionQuery>,
) -> Response {
    Json(json!({"decisions": st.monitor.recent(q.denied, q.limit.unwrap_or(100).min(500))}))
        .into_response()
}

/// Recent alerts (newest first).
pub async fn alerts(_: Admin, State(st): State<AppState>) -> Response {
    Json(json!({"alerts": st.monitor.alerts.history()})).into_response()
}

/// Prometheus metrics. No token (scrapers rarely carry one), but loopback
/// only unless `danger_admin_remote` is set.
pub async fn metrics(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    host: Result<OwnHost, Response>,
) -> Response {
    if !st.admin_remote && !is_loopback(peer.ip()) {
        return forbidden("metrics are served to loopback clients only").into_response();
    }
    if let Err(r) = host {
        return r;
    }
    st.monitor
        .metrics
        .revocations
        .set(st.revocations.len() as i64);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.monitor.metrics.encode(),
    )
        .into_response()
}

pub async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"error": {"message": "no such admin endpoint", "type": "not_found_error", "code": "not_found"}}))).into_response()
}

/// The signed revocation feed. Revocation ids are not secrets (they are in
/// every token), so this needs no token and answers any client.
pub async fn feed(State(st): State<AppState>) -> Response {
    let Some(signer) = st.feed_signer.get() else {
        return not_found().await;
    };
    let ids = match st.revocations.list().await {
        Ok(l) => l.into_iter().map(|(id, _)| id).collect(),
        Err(e) => return ProxyError::StoreUnavailable(e.to_string()).into_response(),
    };
    let ks = signer.current();
    // The proxy's never-backwards clock: services refuse a feed older than
    // the one they hold, so a wall clock stepped back would make them refuse
    // every new feed, new revocations included, until it caught up.
    let now = st.clock.now_unix();
    match crate::feed::Feed::sign_with(
        ks.active_key(),
        ks.active_token_id(),
        ids,
        now,
        Some(ks.document(now)),
    ) {
        Ok(f) => ([(axum::http::header::CACHE_CONTROL, "no-store")], Json(f)).into_response(),
        Err(e) => ProxyError::StoreUnavailable(e.to_string()).into_response(),
    }
}

/// `GET /.well-known/till-keys`: the root key set, signed by every key that
/// still verifies, for verifiers that follow rotations. Public keys only, so
/// it answers any client, like the feed.
pub async fn keys(State(st): State<AppState>) -> Response {
    let Some(signer) = st.feed_signer.get() else {
        return not_found().await;
    };
    let doc = signer.current().document(st.clock.now_unix());
    ([(axum::http::header::CACHE_CONTROL, "no-store")], Json(doc)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_mapped_loopback_is_loopback_and_nothing_else_is() {
        for l in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:127.9.9.9",
        ] {
            assert!(is_loopback(ip(l)), "{l}");
        }
        for o in [
            "10.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:0.0.0.0",
            // IPv4-compatible (deprecated), not mapped: a global IPv6 address.
            "::127.0.0.1",
            "::",
            "fe80::1",
            "0.0.0.0",
        ] {
            assert!(!is_loopback(ip(o)), "{o}");
        }
    }

    #[test]
    fn host_header_must_name_this_proxy() {
        let local: SocketAddr = "127.0.0.1:8787".parse().unwrap();
        let none: &[String] = &[];
        for ok in [
            "127.0.0.1:8787",
            "localhost:8787",
            "LocalHost:8787",
            "[::1]:8787",
            "[::ffff:127.0.0.1]:8787",
        ] {
            assert!(host_allowed(ok, local, none), "{ok}");
        }
        for bad in [
            "evil.example:8787",
            "evil.example",
            "127.0.0.1:8788",
            "127.0.0.1",
            "localhost",
            "localhost.:8787",
            "127.0.0.1.evil.example:8787",
            "localhost:8787@evil",
            "::1:8787",
            "[::1]8787",
            "[::1]:",
            "127.0.0.1:+8787",
            "",
            "10.0.0.5:8787",
        ] {
            assert!(!host_allowed(bad, local, none), "{bad:?}");
        }
        // The address the client connected to (a `0.0.0.0` or `[::]` listener).
        let lan: SocketAddr = "[::ffff:10.0.0.5]:8787".parse().unwrap();
        assert!(host_allowed("10.0.0.5:8787", lan, none));
        assert!(host_allowed("127.0.0.1:8787", lan, none));
        assert!(!host_allowed("10.0.0.6:8787", lan, none));
        // Names the operator lists, exactly as clients send them.
        let hosts = vec!["till.internal:8787".to_string(), "till.example.com".into()];
        assert!(host_allowed("TILL.internal:8787", local, &hosts));
        assert!(host_allowed("till.example.com", local, &hosts));
        assert!(!host_allowed("till.internal", local, &hosts));
        assert!(!host_allowed("till.example.com:8787", local, &hosts));
    }

    #[test]
    fn host_values_split_into_name_and_port() {
        assert_eq!(split_host_port("a.b:1"), Some(("a.b", 1)));
        assert_eq!(split_host_port("a.b"), Some(("a.b", 80)));
        assert_eq!(split_host_port("[::1]:9"), Some(("[::1]", 9)));
        assert_eq!(split_host_port("[::1]"), Some(("[::1]", 80)));
        for bad in [
            "", ":80", "a:b", "a:99999", "a b:1", "a/b", "http://a", "a:1:2", "[::1",
        ] {
            assert_eq!(split_host_port(bad), None, "{bad:?}");
        }
    }
}
