//! The request path: **decide → reserve → forward → record**, so a request
//! that cannot pass is refused with the least work and spends nothing.
//!
//! 1. Head: bound and parse (service, path, token header, sizes); no crypto.
//! 2. Decide on what the head says ([`crate::decide`]): signature (cached),
//!    revocation, expiry, scope on service/method/path, and the current use
//!    counts, *without* reserving. A refused request stops here: it never
//!    reads its body, reserves, or creates state.
//!    A token with rate windows or a concurrency cap then takes its slots
//!    ([`admit_windows`]): a full window refuses here (429 `rate_limited`,
//!    `Retry-After`) before the body is read, taking nothing.
//! 3. Only then read a JSON body (deadline `body_timeout_secs`, global cap
//!    `max_buffered_bytes`) and decide again with its `model`; a form body
//!    for `_method`; a multipart body as far as those bounds go, then
//!    checked as it streams ([`super::multipart`]).
//! 4. Reserve every block's counter, re-check the limits with this
//!    request's own post-increment counts, await durability. The
//!    reservation is a guard: dropped before forwarding, it is released.
//! 5. Forward and stream back; the caller records (audit, metrics, alerts).

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use tokio::sync::OwnedSemaphorePermit;

use super::AppState;
use super::error::{Api, ProxyError};
use super::forward::{Outgoing, forward};
use super::idempotency::{Claim, MAX_KEY_LEN, digest, scoped_key};
use crate::decide::{Stage, cached_decision_windowed, decide_windowed};
use crate::monitor::{Observation, RequestId, request_id};
use crate::store::window::{Admit, InFlight, WindowGuard};
use crate::store::{Reservation, ReservationGuard, StoreError};
use crate::token::RequestFacts;
use crate::verify::{Denial, DenialKind, VerifiedToken, WindowCounts};

/// `/readyz`: ready when the counter store takes reservations.
pub async fn readyz(State(st): State<AppState>) -> Response {
    if st.counters.healthy() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "counter store unavailable\n",
        )
            .into_response()
    }
}

/// Every request not handled by another route.
pub async fn proxy(State(st): State<AppState>, req: Request) -> Response {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    proxy_from(st, req, peer).await
}

/// [`proxy`] with the client's address given, not read from the request's
/// extensions: the server's direct path sets none (each extension is a heap
/// allocation, and the first one a map as well, on every request).
pub async fn proxy_from(
    st: AppState,
    req: Request,
    peer: Option<std::net::SocketAddr>,
) -> Response {
    let mut pending = Unanswered {
        st: &st,
        obs: Observation::new(RequestId::random(), peer, req.method().as_str()),
        answered: false,
    };
    let obs = &mut pending.obs;
    // Looked up once: the answer's error shape and the forwarding use the
    // same configuration even if a reload lands meanwhile.
    let upstream = split_service(req.uri().path())
        .ok()
        .and_then(|(svc, _)| st.upstreams.get(svc));
    // An unknown service gets OpenAI's error shape.
    let api = upstream.as_ref().map_or(Api::OpenAi, |u| u.api);
    let resp = if let Some(u) = upstream.as_ref().filter(|_| api == Api::Mcp) {
        super::mcp::proxy(&st, req, u.clone(), obs).await
    } else {
        let result = handle(&st, req, upstream, obs).await;
        respond(&st, obs, result, api)
    };
    pending.answered = true;
    resp
}

/// A request being handled. When the client goes away, the server drops
/// the handler where it waits; one dropped while the upstream had the
/// request (its use spent) is recorded here, or the audit log, metrics and
/// alerts would miss a use the counters hold: an agent could hang up before
/// every answer and leave no trace of what it asked.
struct Unanswered<'a> {
    st: &'a AppState,
    obs: Observation,
    answered: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.answered && self.obs.forwarding {
            // 499: the client closed the request (nginx's code for it).
            self.st.monitor.record(
                &mut self.obs,
                499,
                "ok",
                Some("the client went away before the upstream answered; the use is spent".into()),
            );
        }
    }
}

/// Records a decided request (metrics, audit line, recent decisions,
/// alerts) and gives its answer, in the shape of `api`, the request id.
pub(super) fn respond(
    st: &AppState,
    obs: &mut Observation,
    result: Result<Response, ProxyError>,
    api: Api,
) -> Response {
    respond_with(st, obs, result, |e| e.into_response_for(api))
}

/// [`respond`] with the error answer rendered by `render`.
pub(super) fn respond_with(
    st: &AppState,
    obs: &mut Observation,
    result: Result<Response, ProxyError>,
    render: impl FnOnce(ProxyError) -> Response,
) -> Response {
    let (mut resp, code, reason) = match result {
        Ok(r) => (r, "ok", None),
        Err(e) => {
            tracing::debug!(status = %e.status(), code = e.code(), "request refused");
            if let ProxyError::Denied(d) = &e {
                obs.denial = Some(d.kind);
            }
            let code = e.code();
            let reason = e.detail();
            (render(e), code, Some(reason))
        }
    };
    let id = obs.request_id;
    st.monitor.record(obs, resp.status().as_u16(), code, reason);
    resp.headers_mut()
        .insert(request_id::HEADER.clone(), id.header_value());
    resp
}

use till_core::request::is_json;
pub use till_core::request::model_of;

/// Reads the token from `Authorization: Bearer` or `x-api-key`.
pub fn extract_token(headers: &HeaderMap) -> Result<&str, ProxyError> {
    use crate::request::TokenHeaderError as E;
    crate::request::token_from_headers(headers).map_err(|e| match e {
        E::Missing => ProxyError::MissingToken,
        E::NotText => ProxyError::InvalidToken("x-api-key is not text".into()),
        E::TooLarge { max } => ProxyError::TokenTooLarge(max),
        E::ProviderKey => ProxyError::ProviderKey,
        // Deny when unsure: a reason added later is still no token.
        _ => ProxyError::MissingToken,
    })
}

/// Splits `/service/rest` into the service and the rest of the path.
pub(super) fn split_service(path: &str) -> Result<(&str, &str), ProxyError> {
    let p = path.strip_prefix('/').unwrap_or(path);
    let (svc, rest) = match p.find('/') {
        Some(i) => (&p[..i], &p[i..]),
        None => (p, "/"),
    };
    if svc.is_empty() {
        return Err(ProxyError::UnknownService(String::new()));
    }
    Ok((svc, rest))
}

/// Reads a JSON body within the size limit, the deadline and the global
/// buffer budget. The permit returned holds the body's bytes of the budget
/// until the request is forwarded; `None` for an empty body.
///
/// The budget is charged per chunk as it arrives, never for a declared
/// `Content-Length`: a head announcing 8 MiB and sending nothing held 8 MiB
/// of the budget until the body timeout, and 32 such heads (one token, no
/// use spent) refused every JSON request of everyone else. Now a client
/// holds only what it has sent. A chunk the budget cannot cover refuses the
/// request (503 `busy`) rather than waiting: half-read bodies each waiting
/// for more budget could wait for each other until their timeouts.
pub(super) async fn read_body(
    st: &AppState,
    mut body: Body,
    content_length: Option<u64>,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), ProxyError> {
    let max = st.limits.max_body_bytes;
    let deadline =
        tokio::time::Instant::now() + std::time::Duration::from_secs(st.limits.body_timeout_secs);
    let mut body_buf = BodyBuffer::default();
    loop {
        // A frame already received needs no timer: a small body usually
        // arrives with the head, and arming a timer per request is a
        // measurable share of the request path's CPU.
        let next = match body.frame().now_or_never() {
            Some(f) => Ok(f),
            None => tokio::time::timeout_at(deadline, body.frame()).await,
        };
        let frame = match next {
            Err(_) => return Err(ProxyError::BodyTimeout(st.limits.body_timeout_secs)),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ProxyError::BadRequest(format!(
                    "cannot read request body: {e}"
                )));
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if body_buf.buf.len() + data.len() > max {
            return Err(ProxyError::TooLarge(max));
        }
        body_buf
            .push(&st.body_budget, &data, content_length)
            .map_err(|OverBudget| over_budget(st))?;
    }
    Ok((Bytes::from(body_buf.buf), body_buf.permit))
}

/// The answer when the body budget cannot cover the next chunk.
pub(super) fn over_budget(st: &AppState) -> ProxyError {
    ProxyError::Busy(format!(
        "more than limits.max_buffered_bytes ({} bytes) of request bodies are being read right now",
        st.limits.max_buffered_bytes
    ))
}

/// A body being read, and the share of the body budget that pays for it:
/// always exactly the buffer's capacity, so `max_buffered_bytes` bounds the
/// memory bodies take, not only the bytes received (a buffer that doubles
/// holds up to twice what arrived).
#[derive(Default)]
pub(super) struct BodyBuffer {
    buf: Vec<u8>,
    permit: Option<OwnedSemaphorePermit>,
}

/// The body budget cannot cover the next chunk.
pub(super) struct OverBudget;

impl BodyBuffer {
    pub(super) fn len(&self) -> usize {
        self.buf.len()
    }

    /// The bytes, and the permit that pays for them.
    pub(super) fn into_parts(self) -> (Vec<u8>, Option<OwnedSemaphorePermit>) {
        (self.buf, self.permit)
    }

    /// Appends `data`, first taking from `budget`, without waiting, what
    /// the buffer grows by. The capacity doubles (copies stay amortised)
    /// while the budget covers it, never past the declared length (a body
    /// that arrives whole is allocated once, at its size; a declared length
    /// that is not sent allocates nothing); otherwise it grows to exactly
    /// what has arrived, so a body the budget can hold is never refused for
    /// the slack.
    pub(super) fn push(
        &mut self,
        budget: &Arc<tokio::sync::Semaphore>,
        data: &[u8],
        declared: Option<u64>,
    ) -> Result<(), OverBudget> {
        let need = self.buf.len() + data.len();
        let cap = self.buf.capacity();
        if need > cap {
            let declared =
                declared.map_or(usize::MAX, |d| usize::try_from(d).unwrap_or(usize::MAX));
            let roomy = need.max(cap.saturating_mul(2)).min(declared.max(need));
            let target = if self.charge(budget, roomy - cap) {
                roomy
            } else if roomy > need && self.charge(budget, need - cap) {
                need
            } else {
                return Err(OverBudget);
            };
            self.buf.reserve_exact(target - self.buf.len());
            // `reserve_exact` may round up: the permit follows the capacity.
            let extra = self.buf.capacity() - target;
            if extra > 0 && !self.charge(budget, extra) {
                return Err(OverBudget);
            }
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// Takes `bytes` more of the budget into the permit; false if it cannot.
    fn charge(&mut self, budget: &Arc<tokio::sync::Semaphore>, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        let Ok(n) = u32::try_from(bytes) else {
            return false;
        };
        let Ok(more) = budget.clone().try_acquire_many_owned(n) else {
            return false;
        };
        match &mut self.permit {
            Some(p) => p.merge(more),
            None => self.permit = Some(more),
        }
        true
    }
}

/// Store errors that are decisions, not faults, become denials.
pub(crate) fn store_error(e: StoreError) -> ProxyError {
    match e {
        StoreError::FamilyFull { limit } => ProxyError::FamilyFull(limit),
        StoreError::Retired => ProxyError::Denied(Denial::new(
            DenialKind::Expired,
            "this key expired and its use counter was retired; ask whoever gave it to you for a new one",
        )),
        e => ProxyError::StoreUnavailable(e.to_string()),
    }
}

/// `upstream`: the one the request's first path segment names, if any.
async fn handle(
    st: &AppState,
    req: Request,
    upstream: Option<Arc<super::Upstream>>,
    obs: &mut Observation,
) -> Result<Response, ProxyError> {
    let (parts, body) = req.into_parts();
    super::forward::refuse_unsafe_request(&parts)?;

    // 1. Bound and parse the head before any cryptography.
    let (service, rest) = split_service(parts.uri.path())?;
    // Only configured names reach the observation: it becomes a metric
    // label, and labels made up by strangers would grow without bound.
    let upstream =
        upstream.ok_or_else(|| ProxyError::UnknownService(service.chars().take(64).collect()))?;
    obs.service = upstream.name.clone();
    let path = crate::path::normalize(rest).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    obs.path = path;
    let token_text = extract_token(&parts.headers)?;
    let json = is_json(&parts.headers);
    let bodiless = till_core::request::declares_no_body(&parts.headers);
    // Read too, for a `_method` field; within the same bounds as JSON.
    let form = !json && super::forward::is_url_encoded_form(&parts);
    // Checked for a `_method` part and read for a `model` part, as far as
    // the bounds allow and then as it streams (`super::multipart`).
    // A head that says it has no body has nothing to check.
    let multipart = match bodiless {
        true => None,
        false => super::multipart::boundary_of(parts.headers.get(header::CONTENT_TYPE))?,
    };
    // The media type is a form, and a parameter names JSON: Till (as
    // Laravel) would read the body as JSON, while Rack, PHP, Go, Starlette
    // and axum read the form the media type says, where a JSON string
    // value can hold `&model=gpt-4&_method=DELETE&`.
    if json && super::forward::is_url_encoded_form(&parts) {
        return Err(ProxyError::BadRequest(
            "the Content-Type is a URL-encoded form and names JSON too (`/json` or `+json`), which Laravel reads as JSON and Rack, PHP, Go and Starlette as a form; servers differ on which one they read, so Till refuses it: send one".into(),
        ));
    }
    if multipart.is_some() && json {
        return Err(ProxyError::BadRequest(
            "the Content-Type is multipart and names JSON too (`/json` or `+json`), which Laravel reads as JSON; servers differ on which one they read, so Till refuses it: send one".into(),
        ));
    }
    if json || form || multipart.is_some() {
        super::forward::refuse_encoded_body(&parts.headers)?;
    }
    let content_length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if (json || form) && content_length.is_some_and(|len| len > st.limits.max_body_bytes as u64) {
        return Err(ProxyError::TooLarge(st.limits.max_body_bytes));
    }
    // A request without a body can name its model only in the query
    // (`?model=`, which some upstreams read); a JSON body's model is read
    // with the query's below. Other bodies are not read, so a model in the
    // query cannot be trusted for them: no model fact (deny when unsure).
    let query_model = match parts.uri.query() {
        Some(q) if bodiless && !json => {
            till_core::request::model_in_query(q).map_err(ProxyError::BadRequest)?
        }
        _ => None,
    };
    let idem_key = match parts.headers.get("idempotency-key") {
        Some(v) if v.len() > MAX_KEY_LEN => {
            return Err(ProxyError::BadRequest(format!(
                "Idempotency-Key is longer than {MAX_KEY_LEN} bytes"
            )));
        }
        Some(v) => Some(v.to_str().map_err(|_| {
            ProxyError::BadRequest("Idempotency-Key is not visible ASCII text".into())
        })?),
        None => None,
    };

    // 2. Decide on the head: signature (cached), revocation, expiry, scope
    // and current counts. Nothing is reserved, read or recorded yet.
    let (token, revoked) = verify_token(st, token_text, obs)?;
    let idem_key = idem_key.map(|k| scoped_key(&token, k));
    // A free retry is judged by the counts of the attempt it repeats.
    let replay_counts = match idem_key.as_deref() {
        Some(k) => st.idempotency.replay_counts(k).await.map_err(store_error)?,
        None => None,
    };
    // A body Till does not read names no model to it, while the upstream
    // may read one there (LiteLLM and FastAPI handlers `json.loads` a
    // `text/plain` body): a key or policy reading the model cannot be
    // judged, and a deny-list (`reject if model("gpt-4")`) would let every
    // model through.
    if !bodiless && !json && !form && multipart.is_none() && reads_model(st, &token) {
        return Err(model_unseen(format_args!(
            "Till reads the model only from JSON (Content-Type: application/json), URL-encoded form and multipart bodies; this body is {}: send it as JSON",
            parts.headers.get(header::CONTENT_TYPE).map_or(
                "without a Content-Type".to_string(),
                |v| format!(
                    "{:?}",
                    String::from_utf8_lossy(v.as_bytes())
                        .chars()
                        .take(64)
                        .collect::<String>()
                )
            )
        )));
    }
    let mut counts = match replay_counts {
        Some(uses) => Counts::exact(uses.iter().map(|u| u.saturating_sub(1)).collect()),
        None => Counts::current(st, &token.ids).await?,
    };
    // The request's text moves from the observation into the facts and
    // back once decided (below): copying it was an allocation per field.
    let mut facts = RequestFacts {
        service: service.to_string(),
        // As sent (the observation took it from the request): the method
        // authorized is the method forwarded. `refuse_unsafe_request` has
        // refused lower-case letters, which servers differ on.
        method: std::mem::take(&mut obs.method),
        path: std::mem::take(&mut obs.path),
        model: query_model,
        mcp: None,
        time: st.clock.now(),
    };
    // Steps 2 to 5 in a block of their own: whatever they return, the
    // observation gets the text back for the record.
    let result: Result<Response, ProxyError> = async {
        let stage = if json || form || multipart.is_some() {
            Stage::BeforeBody
        } else {
            Stage::Final
        };
        let alone = WindowCounts::alone(&token);
        if let Err(d) = counts
            .decide(st, &token, revoked, &facts, &alone, stage)
            .await?
        {
            obs.uses = Some(counts.values);
            return Err(ProxyError::Denied(d));
        }
        // Rate windows and concurrency caps: all slots or none, before the body.
        let (windows, window_guard) = admit_windows(st, &token, obs).await?;

        // 3. The body, read only now and only when it can name a model or
        // carry a `_method` field.
        let mut cut = None;
        let (body, permit, body_digest) = if let Some(boundary) = &multipart {
            let scanner = super::multipart::Scanner::new(boundary);
            let read = super::multipart::read(st, body, scanner, content_length).await?;
            facts.time = st.clock.now();
            let whole = read.rest.is_none();
            facts.model = model_of_multipart(parts.uri.query(), read.scanner.model(), whole)?;
            if let Err(mut d) = counts
                .decide(st, &token, None, &facts, &alone, Stage::Final)
                .await?
            {
                if facts.model.is_none() && !whole && denied_for_model(&token, &d) {
                    d.reason = format!(
                        "{}; Till reads a multipart body's `model` part only within the body's first {} bytes (limits.max_body_bytes) and {} s (limits.body_timeout_secs), and this body is longer or slower: send the `model` part before the file",
                        d.reason, st.limits.max_body_bytes, st.limits.body_timeout_secs
                    );
                }
                obs.uses = Some(counts.values);
                return Err(ProxyError::Denied(d));
            }
            // Allowed without a model, though the rest of the body may name
            // one: only a key and policies that never read it may go on.
            if facts.model.is_none() && !whole && reads_model(st, &token) {
                obs.uses = Some(counts.values);
                return Err(model_unseen(format_args!(
                        "Till reads a multipart body's `model` part only within the body's first {} bytes (limits.max_body_bytes) and {} s (limits.body_timeout_secs), and this body is longer or slower: send the `model` part before the file",
                        st.limits.max_body_bytes, st.limits.body_timeout_secs
                    ),
                ));
            }
            match read.rest {
                None => {
                    let d = idem_key.as_ref().map(|_| {
                        digest(parts.method.as_str(), request_target(&parts), &read.prefix)
                    });
                    (Outgoing::Buffered(read.prefix), read.permit, d)
                }
                Some((pending, rest)) => {
                    let c = Arc::new(std::sync::OnceLock::new());
                    cut = Some(c.clone());
                    let body = super::multipart::guarded(
                        read.prefix,
                        read.permit,
                        read.scanner,
                        pending,
                        rest,
                        c,
                    );
                    // Streamed: no free retries, as for other streams.
                    (Outgoing::Stream(body), None, None)
                }
            }
        } else if json || form {
            let (bytes, permit) = read_body(st, body, content_length).await?;
            // The body may have taken up to `body_timeout_secs`: the
            // decisions from here on are taken at the time it arrived, so
            // a token that expired meanwhile is refused.
            facts.time = st.clock.now();
            facts.model = if json {
                till_core::request::model_of_json_request(parts.uri.query(), &bytes)
            } else {
                super::forward::refuse_method_in_form(&bytes)?;
                // A handler that parses its body as JSON whatever the
                // Content-Type (FastAPI's `request.json()`) reads a model
                // the form does not name.
                if till_core::request::may_read_as_json(&bytes) && reads_model(st, &token) {
                    obs.uses = Some(counts.values);
                    return Err(model_unseen(
                        "this body is JSON sent as a form (or without a Content-Type), which servers read differently: send it with Content-Type: application/json",
                    ));
                }
                // Frameworks that take forms read a `model` field as the
                // model (FastAPI's `Form`, Rack's params): judged as a JSON
                // body's is, so a deny-list on the model sees it.
                till_core::request::model_of_form_request(parts.uri.query(), &bytes)
            }
            .map_err(ProxyError::BadRequest)?;
            if let Err(d) = counts
                .decide(st, &token, None, &facts, &alone, Stage::Final)
                .await?
            {
                obs.uses = Some(counts.values);
                return Err(ProxyError::Denied(d));
            }
            // Allowed without a model, from a JSON body Till could not read
            // as Python's `json` does (NaN, a byte order mark, UTF-16) or
            // serde does (an array): the upstream may read one there, and a
            // deny-list (`reject if model("gpt-4")`) never saw it.
            if json
                && facts.model.is_none()
                && reads_model(st, &token)
                && !till_core::request::names_no_model(&bytes)
            {
                obs.uses = Some(counts.values);
                return Err(model_unseen(
                    "Till cannot read this JSON body the way every upstream does (a byte order mark, UTF-16 or UTF-32, NaN or Infinity, an array, a `model` that is not a string, or malformed JSON): send a UTF-8 JSON object whose `model` is a string",
                ));
            }
            let d = idem_key
                .as_ref()
                .map(|_| digest(parts.method.as_str(), request_target(&parts), &bytes));
            (Outgoing::Buffered(bytes), permit, d)
        } else {
            // A streamed body cannot be compared with an earlier attempt's, so
            // only requests without one get free retries.
            let d = idem_key
                .as_ref()
                .filter(|_| bodiless)
                .map(|_| digest(parts.method.as_str(), request_target(&parts), b""));
            (Outgoing::Stream(body), None, d)
        };

        // Idempotency: a retry of the same failed request reuses its counts.
        let claim = match (idem_key, body_digest) {
            (Some(key), Some(d)) => {
                match st.idempotency.claim(&key, d).await.map_err(store_error)? {
                    Claim::Conflict => return Err(ProxyError::IdempotencyConflict),
                    Claim::Mismatch => return Err(ProxyError::IdempotencyMismatch),
                    c => Some(c),
                }
            }
            _ => None,
        };
        let (replay, mut ticket) = match claim {
            Some(Claim::Replay(uses, t)) => (Some(uses), Some(t)),
            Some(Claim::Fresh(t)) => (None, Some(t)),
            _ => (None, None),
        };

        match replay {
            Some(uses) => {
                obs.uses = Some(uses.clone());
                let counted: Vec<u64> = uses.iter().map(|u| u.saturating_sub(1)).collect();
                let revoked = revoked_now(st, &token)?;
                decide_off_the_workers(
                    st,
                    &token,
                    revoked,
                    &facts,
                    &counted,
                    &windows,
                    Stage::Final,
                )
                .await
                .map_err(ProxyError::Denied)?;
                if let Some(t) = &mut ticket {
                    t.started(None);
                }
            }
            None => {
                // 4. Reserve every block, re-check with this request's counts.
                reserve_and_recheck(st, &token, &facts, &windows, obs).await?;
                if let Some(t) = &mut ticket {
                    t.started(obs.uses.clone());
                }
            }
        }

        // 5. Forward and stream back. The rate slots are spent; in-flight
        // slots stay taken until the response body ends.
        let in_flight = window_guard.map(WindowGuard::forwarded);
        // The request's text goes back to the observation before the
        // upstream gets the request: a client that goes away meanwhile is
        // recorded from it when the handler is dropped ([`Unanswered`]).
        obs.forwarding = true;
        if let Some(t) = &mut ticket {
            t.sent();
        }
        obs.method = std::mem::take(&mut facts.method);
        obs.path = std::mem::take(&mut facts.path);
        obs.model = facts.model.take();
        let mut result = forward(st, &upstream, &parts, &obs.path, body).await;
        drop(permit);
        // The multipart body was cut off: whatever the upstream made of
        // the part it got, the answer is why.
        if let Some(e) = cut.as_ref().and_then(|c| c.get()) {
            result = Err(e.clone().into());
        }
        if let Some(t) = ticket {
            t.finish(matches!(&result, Ok(r) if r.status().as_u16() < 500))
                .await;
        }
        let resp = result?;
        obs.upstream_status = Some(resp.status().as_u16());
        Ok(match in_flight.filter(InFlight::holds_slots) {
            Some(slot) => hold_until_sent(resp, slot),
            None => resp,
        })
    }
    .await;
    if !obs.forwarding {
        obs.method = facts.method;
        obs.path = facts.path;
        obs.model = facts.model;
    }
    result
}

/// The model of a request with a multipart body: its `model` part and the
/// query's `model` together, as for JSON
/// ([`till_core::request::model_of_json_request`]). The query's model
/// counts only when the whole body was read and has no `model` part: a part
/// not read yet may name another.
fn model_of_multipart(
    query: Option<&str>,
    part: Option<&str>,
    whole: bool,
) -> Result<Option<String>, ProxyError> {
    let from_query = query
        .map(till_core::request::model_in_query)
        .transpose()
        .map_err(ProxyError::BadRequest)?
        .flatten();
    Ok(match (part, from_query) {
        (Some(p), Some(q)) if p != q => {
            return Err(ProxyError::BadRequest(format!(
                "the query names the model {q:?} and the multipart body's `model` part {p:?}; upstreams differ on which one they run, so name the model once"
            )));
        }
        (Some(p), _) => Some(p.to_string()),
        (None, q) if whole => q,
        (None, _) => None,
    })
}

/// The refusal of a request whose model Till cannot see, for a key or
/// policy that reads it: an allow-list would fail anyway, and a deny-list
/// (`reject if model("gpt-4")`) would let every model through.
fn model_unseen(why: impl std::fmt::Display) -> ProxyError {
    ProxyError::Denied(Denial::new(
        DenialKind::Scope,
        format!("this key's scope (or a policy) reads the request's model, and {why}"),
    ))
}

/// Whether the key or a policy reads the request's `model`.
fn reads_model(st: &AppState, token: &VerifiedToken) -> bool {
    st.verifier
        .first_read(token, &[till_core::token::vocab::names::MODEL])
        .is_some()
}

/// Whether a denial is a `--model` check of the token.
fn denied_for_model(token: &VerifiedToken, d: &Denial) -> bool {
    let check = d
        .block
        .zip(d.check)
        .and_then(|(b, c)| token.view.blocks.get(b)?.checks.get(c));
    matches!(
        check,
        Some(crate::token::inspect::CheckMeaning::Models { .. })
    )
}

/// Keeps `slot` until the body of `resp` has been sent or dropped (the
/// client went away): a streamed answer is in flight until its end.
pub(super) fn hold_until_sent<S: Send + 'static>(resp: Response, slot: S) -> Response {
    use futures_util::StreamExt;
    resp.map(|body| {
        let stream = body.into_data_stream().map(move |frame| {
            let _held = &slot;
            frame
        });
        Body::from_stream(stream)
    })
}

/// Takes one slot in every rate window and concurrency cap of the token,
/// all or none. A full one refuses with 429 `rate_limited` and the seconds
/// until a slot frees. Returns the counts (this request included) for the
/// Datalog, and the guard that gives the slots back if the request is not
/// forwarded after all.
pub(super) async fn admit_windows(
    st: &AppState,
    token: &Arc<VerifiedToken>,
    obs: &mut Observation,
) -> Result<(WindowCounts, Option<WindowGuard>), ProxyError> {
    if token.windows.is_empty() && token.caps.is_empty() {
        return Ok((WindowCounts::default(), None));
    }
    match st
        .windows
        .admit(token.family(), &token.windows, &token.caps)
        .await
        .map_err(store_error)?
    {
        Admit::Admitted { counts, ticket } => {
            Ok((counts, Some(WindowGuard::new(st.windows.clone(), ticket))))
        }
        Admit::Full(f) => {
            obs.denial = Some(DenialKind::RateLimited);
            let secs = f.retry_after_ms.div_ceil(1000).max(1);
            let who = token.view.key_name(f.block);
            let reason = match f.window {
                Some(w) => format!(
                    "{who} allows {} (at most {} requests in any {w} s) and that window is full; a slot frees in {secs} s",
                    crate::token::vocab::Rate {
                        limit: f.limit,
                        seconds: w
                    },
                    f.limit
                ),
                None => format!(
                    "{who} allows {} request(s) in flight at once and that many are running; retry when one finishes",
                    f.limit
                ),
            };
            Err(ProxyError::RateLimited {
                reason,
                retry_after: u32::try_from(secs).unwrap_or(u32::MAX),
            })
        }
    }
}

/// Verifies the token (cached) and looks its blocks up in the revocation
/// list; the first revoked block, if any, is for [`decide`] to deny.
pub(super) fn verify_token(
    st: &AppState,
    token_text: &str,
    obs: &mut Observation,
) -> Result<(Arc<VerifiedToken>, Option<usize>), ProxyError> {
    let t0 = Instant::now();
    let token = st
        .verify_cached(token_text)
        .map_err(|e| ProxyError::InvalidToken(e.to_string()));
    obs.verify = Some(t0.elapsed());
    let token = token?;
    obs.token = Some(token.clone());
    let revoked = revoked_now(st, &token)?;
    Ok((token, revoked))
}

/// The first of the token's blocks in the revocation list, if any. Looked
/// up at the head and again before a use is spent: a block revoked since
/// the head's decision (while the body was read, or the request waited for
/// a slot) is refused from this request on, not from the next one.
pub(super) fn revoked_now(
    st: &AppState,
    token: &VerifiedToken,
) -> Result<Option<usize>, ProxyError> {
    st.revocations
        .first_revoked(&token.ids)
        .map_err(|e| ProxyError::StoreUnavailable(e.to_string()))
}

/// Reserves one use of every block of a request already decided, re-checks
/// with this request's own post-increment counts (releasing on a denial) and
/// waits until the counts are durable. The counts reserved go to
/// `obs.uses`; once this returns `Ok` the use is spent.
pub(super) async fn reserve_and_recheck(
    st: &AppState,
    token: &Arc<VerifiedToken>,
    facts: &RequestFacts,
    windows: &WindowCounts,
    obs: &mut Observation,
) -> Result<(), ProxyError> {
    reserve_checked(st, token, facts, windows, obs)
        .await
        .map(Reserved::spend)
}

/// A use reserved, re-checked and durable, not yet spent: dropping or
/// releasing it gives the use back. Several of them let a batch spend all
/// its uses or none.
pub(super) struct Reserved(ReservationGuard<BlockIds>);

impl Reserved {
    /// The request goes out: the use is spent.
    pub(super) fn spend(self) {
        self.0.spend();
    }

    /// Gives the use back now, waiting for the store.
    pub(super) async fn release(self) {
        if let Err(e) = self.0.release().await {
            tracing::error!(error = %e, "giving back the use of a request not sent failed");
        }
    }
}

/// [`reserve_and_recheck`] that leaves the use unspent, for the caller to
/// spend or give back.
pub(super) async fn reserve_checked(
    st: &AppState,
    token: &Arc<VerifiedToken>,
    facts: &RequestFacts,
    windows: &WindowCounts,
    obs: &mut Observation,
) -> Result<Reserved, ProxyError> {
    let t0 = Instant::now();
    let Reservation { uses, durable } = st
        .counters
        .reserve(&token.specs)
        .await
        .map_err(store_error)?;
    let guard = ReservationGuard::new(st.counters.clone(), BlockIds(token.clone()));
    let counted: smallvec::SmallVec<[u64; 8]> = uses.iter().map(|u| u.saturating_sub(1)).collect();
    obs.uses = Some(uses);
    let decided = match revoked_now(st, token) {
        Ok(revoked) => {
            decide_off_the_workers(st, token, revoked, facts, &counted, windows, Stage::Final)
                .await
                .map_err(ProxyError::Denied)
        }
        Err(e) => Err(e),
    };
    if let Err(e) = decided {
        // Report the counts as they stand after the rollback.
        obs.uses = Some(counted.to_vec());
        if let Err(e) = guard.release().await {
            tracing::error!(error = %e, "rollback of a denied reservation failed");
        }
        return Err(e);
    }
    // The count must be on disk before anything leaves; if this future is
    // dropped meanwhile, the guard gives the use back.
    durable.await.map_err(store_error)?;
    obs.reserve = Some(t0.elapsed());
    Ok(Reserved(guard))
}

/// The block ids of a verified token, shared rather than copied.
pub(super) struct BlockIds(Arc<VerifiedToken>);

impl AsRef<[String]> for BlockIds {
    fn as_ref(&self) -> &[String] {
        &self.0.ids
    }
}

/// The use counts a decision before reserving starts from.
pub(super) struct Counts {
    pub(super) values: Vec<u64>,
    /// False for figures the store remembered rather than read
    /// ([`crate::store::CounterStore::peek_cached`]).
    pub(super) exact: bool,
}

impl Counts {
    fn exact(values: Vec<u64>) -> Self {
        Counts {
            values,
            exact: true,
        }
    }

    /// The store's counts: the remembered ones when a shared store has them
    /// (no round trip for a warm token), else read ([`Counts::read`]: in
    /// place from a store in this process, which remembers nothing).
    pub(super) async fn current(st: &AppState, ids: &[String]) -> Result<Self, ProxyError> {
        match st.counters.peek_cached(ids) {
            Some(values) => Ok(Counts {
                values,
                exact: false,
            }),
            None => Counts::read(st, ids).await,
        }
    }

    /// The store's current counts: in place when it can, else asked.
    async fn read(st: &AppState, ids: &[String]) -> Result<Self, ProxyError> {
        let values = match st.counters.peek_now(ids) {
            Some(now) => now,
            None => st.counters.peek(ids).await,
        };
        Ok(Counts::exact(values.map_err(store_error)?))
    }

    /// Replaces remembered counts with the store's current ones.
    pub(super) async fn reread(&mut self, st: &AppState, ids: &[String]) -> Result<(), ProxyError> {
        *self = Counts::read(st, ids).await?;
        Ok(())
    }

    /// [`decide_off_the_workers`] with these counts. Remembered counts may
    /// only allow: an allowed request reserves and re-checks with exact
    /// counts, but a denial on remembered counts (which another proxy's
    /// release may have made too high) is decided again on a fresh read.
    pub(super) async fn decide(
        &mut self,
        st: &AppState,
        token: &Arc<VerifiedToken>,
        revoked: Option<usize>,
        facts: &RequestFacts,
        windows: &WindowCounts,
        stage: Stage,
    ) -> Result<Result<(), Denial>, ProxyError> {
        let first =
            decide_off_the_workers(st, token, revoked, facts, &self.values, windows, stage).await;
        if first.is_ok() || self.exact {
            return Ok(first);
        }
        self.reread(st, &token.ids).await?;
        Ok(decide_off_the_workers(st, token, revoked, facts, &self.values, windows, stage).await)
    }
}

/// [`decide`], inline when the token's decision cache answers, otherwise on
/// a blocking thread, at most `datalog_permits` at once: a Datalog run can
/// take milliseconds, and on the async workers a flood of costly tokens
/// would hold up every other request.
pub(super) async fn decide_off_the_workers(
    st: &AppState,
    token: &Arc<VerifiedToken>,
    revoked: Option<usize>,
    facts: &RequestFacts,
    counts: &[u64],
    windows: &WindowCounts,
    stage: Stage,
) -> Result<(), Denial> {
    if let Some(answer) = cached_decision_windowed(token, revoked, facts, counts, windows, stage) {
        return answer;
    }
    let _permit = st
        .datalog_permits
        .acquire()
        .await
        .map_err(|_| Denial::new(DenialKind::Scope, "the proxy is shutting down"))?;
    let (verifier, token, facts, counts, windows) = (
        st.verifier.clone(),
        token.clone(),
        facts.clone(),
        counts.to_vec(),
        windows.clone(),
    );
    tokio::task::spawn_blocking(move || {
        decide_windowed(&verifier, &token, revoked, &facts, &counts, &windows, stage)
    })
    .await
    .unwrap_or_else(|e| {
        Err(Denial::new(
            DenialKind::Scope,
            format!("authorization failed: {e}"),
        ))
    })
}

/// The path and query as sent: what makes two retries the same request.
fn request_target(parts: &http::request::Parts) -> &str {
    parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_extraction() {
        let mut h = HeaderMap::new();
        assert!(matches!(extract_token(&h), Err(ProxyError::MissingToken)));
        h.insert("x-api-key", "abc".parse().unwrap());
        assert_eq!(extract_token(&h).unwrap(), "abc");
        h.insert(header::AUTHORIZATION, "Bearer def".parse().unwrap());
        assert_eq!(extract_token(&h).unwrap(), "def");
        h.insert(header::AUTHORIZATION, "Basic xyz".parse().unwrap());
        assert_eq!(extract_token(&h).unwrap(), "abc");
    }

    /// The budget pays for the memory a body takes, its buffer's capacity,
    /// not only the bytes received (a doubling buffer held up to twice
    /// what it was charged), and a body the budget can hold still fits.
    #[test]
    fn a_body_buffer_is_charged_its_capacity_and_fits_any_budget_that_holds_it() {
        use tokio::sync::Semaphore;
        let held = |b: &BodyBuffer| b.permit.as_ref().map_or(0, |p| p.num_permits());
        // Chunked (no declared length), chunks of 3, 5, 7, ... bytes.
        let budget = Arc::new(Semaphore::new(1 << 20));
        let mut b = BodyBuffer::default();
        for i in 0..200 {
            b.push(&budget, &vec![b'x'; 3 + 2 * (i % 40)], None)
                .ok()
                .unwrap();
            assert_eq!(held(&b), b.buf.capacity(), "after chunk {i}");
            assert_eq!(budget.available_permits(), (1 << 20) - b.buf.capacity());
        }
        // 90 bytes in two chunks under a budget of 100: doubling (to 120)
        // does not fit, so the buffer grows to exactly 90.
        let budget = Arc::new(Semaphore::new(100));
        let mut b = BodyBuffer::default();
        b.push(&budget, &[b'a'; 60], None).ok().unwrap();
        b.push(&budget, &[b'b'; 30], None).ok().unwrap();
        assert_eq!((b.buf.len(), held(&b)), (90, b.buf.capacity()));
        assert!(b.buf.capacity() <= 100);
        assert!(b.push(&budget, &[b'c'; 11], None).is_err(), "over budget");
        // A declared length is the ceiling of the growth, and is not
        // charged before it arrives.
        let budget = Arc::new(Semaphore::new(1000));
        let mut b = BodyBuffer::default();
        b.push(&budget, &[b'a'; 10], Some(500)).ok().unwrap();
        assert!(
            held(&b) < 500,
            "only what arrived is paid for: {}",
            held(&b)
        );
        b.push(&budget, &[b'b'; 490], Some(500)).ok().unwrap();
        assert_eq!((b.buf.len(), held(&b)), (500, b.buf.capacity()));
        drop(b);
        assert_eq!(budget.available_permits(), 1000, "all given back");
    }

    #[test]
    fn service_split() {
        assert_eq!(split_service("/openai/v1/x").unwrap(), ("openai", "/v1/x"));
        assert_eq!(split_service("/openai").unwrap(), ("openai", "/"));
        assert!(split_service("/").is_err());
    }
}
