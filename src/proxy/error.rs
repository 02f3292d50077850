//! Every way a proxied request can fail, and the response each gives.
//!
//! Bodies take the shape of the upstream's own API ([`Api`]), so its SDK
//! raises its usual exception with Till's message: OpenAI's
//! `{"error":{"message","type","code"}}` (also for plain upstreams and
//! requests naming no upstream) or Anthropic's
//! `{"type":"error","error":{"type","message"}}`. Every answer says whether
//! retrying can help (`x-should-retry`, `Retry-After`), because the SDKs
//! otherwise retry every 429 and 5xx. Messages never contain a token or a
//! credential.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

pub use super::config::Api;
use crate::verify::{Denial, DenialKind};

/// Whether a client should send the same request again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// `x-should-retry: false`: the same request gets the same answer.
    Never,
    /// `x-should-retry: true` and `Retry-After` in seconds.
    After(u32),
    /// No header: the client's own rules apply (the SDKs retry).
    ClientDefault,
}

pub use crate::request::looks_like_provider_key;

/// An error answer from the proxy.
#[derive(Debug)]
pub enum ProxyError {
    /// 401: no token in `Authorization: Bearer` or `x-api-key`.
    MissingToken,
    /// 401: the token does not parse or its signature fails.
    InvalidToken(String),
    /// 401: a provider's API key (`sk-...`) was sent instead of a Till
    /// token. Never echoed.
    ProviderKey,
    /// 403 / 429 from authorization or revocation.
    Denied(Denial),
    /// 429 with `Retry-After` (whole seconds until a slot frees): a rate
    /// window or concurrency cap of the token is full right now.
    RateLimited { reason: String, retry_after: u32 },
    /// 400: the request itself is malformed (path tricks, bad header).
    BadRequest(String),
    /// 405: a method that is never forwarded (TRACE, TRACK, CONNECT), with
    /// the method as sent.
    MethodNotAllowed(String),
    /// 404: no such upstream.
    UnknownService(String),
    /// 409: a request with this Idempotency-Key is still in flight.
    IdempotencyConflict,
    /// 422: this Idempotency-Key was used for a different request.
    IdempotencyMismatch,
    /// 408: the body did not arrive within `body_timeout_secs`.
    BodyTimeout(u64),
    /// 503 with `Retry-After`: too many request bodies are buffered at once.
    Busy(String),
    /// 403: the token family has as many tracked blocks as allowed.
    FamilyFull(usize),
    /// 431: token (header) over the limit, refused before any signature work.
    TokenTooLarge(usize),
    /// 413: body over the limit.
    TooLarge(usize),
    /// 415: a body Till reads sent with a `Content-Encoding` other than
    /// `identity` (the coding, as sent, cut short).
    UnsupportedEncoding(String),
    /// 502: upstream unreachable or broken.
    BadGateway(String),
    /// 504: upstream too slow.
    GatewayTimeout(String),
    /// 503: counter store unavailable; nothing was forwarded.
    StoreUnavailable(String),
    /// 403: a forward-auth check for this upstream without the gateway's
    /// secret (`forward_auth_secret`). Never echoes what was sent.
    GatewayNotTrusted(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingToken | ProxyError::InvalidToken(_) | ProxyError::ProviderKey => {
                StatusCode::UNAUTHORIZED
            }
            ProxyError::Denied(d)
                if matches!(d.kind, DenialKind::Exhausted | DenialKind::RateLimited) =>
            {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Denied(_) => StatusCode::FORBIDDEN,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::UnknownService(_) => StatusCode::NOT_FOUND,
            ProxyError::IdempotencyConflict => StatusCode::CONFLICT,
            ProxyError::IdempotencyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::FamilyFull(_) | ProxyError::GatewayNotTrusted(_) => StatusCode::FORBIDDEN,
            ProxyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProxyError::TokenTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ProxyError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Short machine-readable code, also used in metrics and the audit log.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::MissingToken => "missing_token",
            ProxyError::InvalidToken(_) | ProxyError::ProviderKey => "invalid_token",
            ProxyError::Denied(d) => match d.kind {
                DenialKind::Exhausted => "activations_exhausted",
                DenialKind::RateLimited => "rate_limited",
                DenialKind::Expired => "token_expired",
                DenialKind::Revoked => "token_revoked",
                DenialKind::Limits => "authorization_limits",
                // Scope, and any kind added later: refused all the same.
                _ => "out_of_scope",
            },
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::UnknownService(_) => "unknown_service",
            ProxyError::IdempotencyConflict => "idempotency_conflict",
            ProxyError::IdempotencyMismatch => "idempotency_key_reused",
            ProxyError::BodyTimeout(_) => "body_timeout",
            ProxyError::Busy(_) => "busy",
            ProxyError::FamilyFull(_) => "family_too_large",
            ProxyError::TooLarge(_) => "body_too_large",
            ProxyError::UnsupportedEncoding(_) => "unsupported_content_encoding",
            ProxyError::TokenTooLarge(_) => "token_too_large",
            ProxyError::BadGateway(_) => "upstream_error",
            ProxyError::GatewayTimeout(_) => "upstream_timeout",
            ProxyError::StoreUnavailable(_) => "store_unavailable",
            ProxyError::GatewayNotTrusted(_) => "gateway_not_trusted",
        }
    }

    /// Whether the same request can succeed later, which the official
    /// OpenAI and Anthropic SDKs read from `x-should-retry` before their own
    /// rules (they would retry every 408, 409, 429 and 5xx).
    pub fn retry(&self) -> Retry {
        match self {
            // Waiting helps: the load, the earlier attempt or the store
            // may be gone in a moment.
            ProxyError::Busy(_) | ProxyError::IdempotencyConflict => Retry::After(1),
            ProxyError::StoreUnavailable(_) => Retry::After(5),
            // A window frees a slot at a known time; the SDKs' own backoff
            // then succeeds without spending anything meanwhile.
            ProxyError::RateLimited { retry_after, .. } => Retry::After((*retry_after).max(1)),
            ProxyError::Denied(d) if d.kind == DenialKind::RateLimited => Retry::After(1),
            // The upstream or the network may recover; each new attempt
            // is counted unless it repeats an `Idempotency-Key`.
            ProxyError::BodyTimeout(_)
            | ProxyError::BadGateway(_)
            | ProxyError::GatewayTimeout(_) => Retry::ClientDefault,
            // The same key and request get the same answer: retrying only
            // wastes time and feeds the denial-burst alert.
            ProxyError::MissingToken
            | ProxyError::InvalidToken(_)
            | ProxyError::ProviderKey
            | ProxyError::Denied(_)
            | ProxyError::BadRequest(_)
            | ProxyError::MethodNotAllowed(_)
            | ProxyError::UnknownService(_)
            | ProxyError::IdempotencyMismatch
            | ProxyError::FamilyFull(_)
            | ProxyError::GatewayNotTrusted(_)
            | ProxyError::TokenTooLarge(_)
            | ProxyError::TooLarge(_)
            | ProxyError::UnsupportedEncoding(_) => Retry::Never,
        }
    }

    /// The `type` of the OpenAI (and plain) body.
    fn openai_type(&self) -> &'static str {
        match self {
            ProxyError::MissingToken | ProxyError::InvalidToken(_) | ProxyError::ProviderKey => {
                "authentication_error"
            }
            // What OpenAI answers when the credit is spent: agent frameworks
            // treat it as final, unlike `rate_limit_error`.
            ProxyError::Denied(d) if d.kind == DenialKind::Exhausted => "insufficient_quota",
            // OpenAI's own name for a full rate window: SDKs back off and retry.
            ProxyError::Denied(d) if d.kind == DenialKind::RateLimited => "rate_limit_error",
            ProxyError::RateLimited { .. } => "rate_limit_error",
            ProxyError::Denied(_) => "permission_error",
            ProxyError::BadRequest(_)
            | ProxyError::MethodNotAllowed(_)
            | ProxyError::TooLarge(_)
            | ProxyError::UnsupportedEncoding(_)
            | ProxyError::TokenTooLarge(_)
            | ProxyError::IdempotencyConflict
            | ProxyError::IdempotencyMismatch
            | ProxyError::BodyTimeout(_) => "invalid_request_error",
            ProxyError::FamilyFull(_) | ProxyError::GatewayNotTrusted(_) => "permission_error",
            ProxyError::UnknownService(_) => "not_found_error",
            ProxyError::BadGateway(_)
            | ProxyError::GatewayTimeout(_)
            | ProxyError::Busy(_)
            | ProxyError::StoreUnavailable(_) => "api_error",
        }
    }

    /// The `error.type` of the Anthropic body: Anthropic's name for the
    /// status.
    fn anthropic_type(&self) -> &'static str {
        match self {
            ProxyError::MissingToken | ProxyError::InvalidToken(_) | ProxyError::ProviderKey => {
                "authentication_error"
            }
            ProxyError::Denied(d)
                if matches!(d.kind, DenialKind::Exhausted | DenialKind::RateLimited) =>
            {
                "rate_limit_error"
            }
            ProxyError::RateLimited { .. } => "rate_limit_error",
            ProxyError::Denied(_)
            | ProxyError::FamilyFull(_)
            | ProxyError::GatewayNotTrusted(_) => "permission_error",
            ProxyError::UnknownService(_) => "not_found_error",
            ProxyError::TooLarge(_) => "request_too_large",
            ProxyError::BadRequest(_)
            | ProxyError::MethodNotAllowed(_)
            | ProxyError::UnsupportedEncoding(_)
            | ProxyError::TokenTooLarge(_)
            | ProxyError::IdempotencyConflict
            | ProxyError::IdempotencyMismatch
            | ProxyError::BodyTimeout(_) => "invalid_request_error",
            ProxyError::Busy(_) => "overloaded_error",
            ProxyError::GatewayTimeout(_) => "timeout_error",
            ProxyError::BadGateway(_) | ProxyError::StoreUnavailable(_) => "api_error",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ProxyError::MissingToken => {
                "no Till token: send it as `Authorization: Bearer <token>` or `x-api-key: <token>`"
                    .into()
            }
            ProxyError::InvalidToken(m) => format!("invalid Till token: {m}"),
            ProxyError::ProviderKey => "this looks like a provider API key, not a Till token; ask your operator for a Till token".into(),
            ProxyError::Denied(d) => d.reason.clone(),
            ProxyError::RateLimited { reason, .. } => reason.clone(),
            ProxyError::BadRequest(m) => format!("bad request: {m}"),
            ProxyError::MethodNotAllowed(m) => format!(
                "method {m} is not allowed: Till never forwards TRACE, TRACK or CONNECT, whatever the token; use GET, POST or another ordinary method"
            ),
            ProxyError::UnknownService(s) => {
                format!("no upstream named {s:?} is configured on this proxy")
            }
            ProxyError::IdempotencyConflict => {
                "a request with this Idempotency-Key is still in progress; retry after it finishes".into()
            }
            ProxyError::IdempotencyMismatch => {
                "this Idempotency-Key was already used for a different request (method, path or body differ); use a new key for a new request".into()
            }
            ProxyError::BodyTimeout(n) => {
                format!("the request body did not arrive within {n} seconds (limits.body_timeout_secs)")
            }
            ProxyError::Busy(m) => format!("the proxy is busy, retry shortly: {m}"),
            ProxyError::FamilyFull(n) => format!(
                "this key's family already has {n} keys in use (limits.max_blocks_per_family); use an existing key, or ask the operator to raise the limit or revoke unused keys"
            ),
            ProxyError::TooLarge(n) => format!("request body is larger than {n} bytes"),
            ProxyError::TokenTooLarge(n) => format!("token is longer than {n} bytes"),
            ProxyError::UnsupportedEncoding(c) => format!(
                "the request body is sent with Content-Encoding {c:?}; Till checks this body before forwarding it and cannot read it encoded: send the body uncompressed (no Content-Encoding, or identity)"
            ),
            ProxyError::BadGateway(m) => format!("upstream error: {m}"),
            ProxyError::GatewayTimeout(m) => format!("upstream timed out: {m}"),
            // The cause names the store (a Redis address, a file path):
            // the operator's, not the caller's (`detail` has it).
            ProxyError::StoreUnavailable(_) => {
                "the counter store is unavailable, so the request was not forwarded; retry shortly (the proxy's log and audit have the cause)".into()
            }
            ProxyError::GatewayNotTrusted(s) => format!(
                "this forward-auth check has no valid x-till-gateway-secret header: checks for upstream {s:?} are answered only to the gateway configured with its forward_auth_secret; send requests through the gateway"
            ),
        }
    }
}

impl ProxyError {
    /// [`message`](Self::message) with what only the operator may see: the
    /// cause of a store failure. For the audit log and the proxy's log.
    pub fn detail(&self) -> String {
        match self {
            ProxyError::StoreUnavailable(m) => format!("{}: {m}", self.message()),
            _ => self.message(),
        }
    }

    /// The answer in the shape of `api`.
    pub fn into_response_for(self, api: Api) -> Response {
        let body = match api {
            Api::Anthropic => json!({
                "type": "error",
                "error": {
                    "type": self.anthropic_type(),
                    "message": self.message(),
                }
            }),
            Api::Mcp => super::mcp::error_body(&self, serde_json::Value::Null),
            Api::OpenAi | Api::Plain => json!({
                "error": {
                    "message": self.message(),
                    "type": self.openai_type(),
                    "code": self.code(),
                }
            }),
        };
        if let ProxyError::StoreUnavailable(m) = &self {
            warn_store_unavailable(m);
        }
        let mut resp = (self.status(), axum::Json(body)).into_response();
        let h = resp.headers_mut();
        match self.retry() {
            Retry::Never => {
                h.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            Retry::After(secs) => {
                h.insert("x-should-retry", HeaderValue::from_static("true"));
                h.insert("retry-after", HeaderValue::from(secs));
            }
            Retry::ClientDefault => {}
        }
        // RFC 9110 §12.5.3: a 415 for a content coding says which it takes.
        if matches!(self, ProxyError::UnsupportedEncoding(_)) {
            h.insert("accept-encoding", HeaderValue::from_static("identity"));
        }
        if self.status() == StatusCode::UNAUTHORIZED {
            h.insert(
                "www-authenticate",
                HeaderValue::from_static("Bearer realm=\"till\""),
            );
        }
        resp
    }
}

/// The OpenAI shape: for answers outside any upstream (admin plane, unknown
/// service).
/// Logs a store failure at most once every 10 s: while the store is down
/// every request fails alike, and one line per request would bury the rest.
fn warn_store_unavailable(cause: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if now >= last.saturating_add(10)
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(cause, "counter store unavailable: requests get 503");
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        self.into_response_for(Api::OpenAi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (red team, wave 2, fourth pass): a store failure's cause
    /// (a Redis address, the state file's path) went to every agent; it
    /// now goes only to the audit and the log.
    #[tokio::test]
    async fn a_store_failures_cause_is_the_operators_not_the_callers() {
        let e = || ProxyError::StoreUnavailable("redis at redis://10.0.0.5:6379/0 failed".into());
        assert!(!e().message().contains("10.0.0.5"), "{}", e().message());
        assert!(
            e().detail().contains("redis://10.0.0.5:6379/0"),
            "{}",
            e().detail()
        );
        for api in [Api::OpenAi, Api::Anthropic, Api::Mcp, Api::Plain] {
            let resp = e().into_response_for(api);
            let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            assert!(
                !String::from_utf8_lossy(&body).contains("10.0.0.5"),
                "{api:?}"
            );
        }
    }

    #[test]
    fn provider_keys_are_recognised_and_till_tokens_are_not() {
        for k in [
            "sk-abc",
            "sk-proj-abc",
            "sk-ant-api03-abc",
            "ghp_abc",
            "github_pat_x",
        ] {
            assert!(looks_like_provider_key(k), "{k}");
        }
        let root = crate::token::keys::generate();
        let t = crate::token::issue(
            &root,
            &crate::token::Scope {
                services: vec!["openai".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert!(!looks_like_provider_key(&t), "{t}");
        assert!(!looks_like_provider_key("garbage"));
    }

    /// Every 4xx but 408 is final, and says so; `Retry-After` only where
    /// waiting helps; each body in the shape asked for.
    #[test]
    fn every_error_says_whether_to_retry_in_the_shape_asked_for() {
        let denial = |kind| ProxyError::Denied(Denial::new(kind, "r"));
        let all = || {
            vec![
                ProxyError::MissingToken,
                ProxyError::InvalidToken("x".into()),
                ProxyError::ProviderKey,
                denial(DenialKind::Scope),
                denial(DenialKind::Exhausted),
                denial(DenialKind::Expired),
                denial(DenialKind::Revoked),
                denial(DenialKind::Limits),
                ProxyError::BadRequest("x".into()),
                ProxyError::MethodNotAllowed("TRACE".into()),
                ProxyError::UnknownService("x".into()),
                ProxyError::IdempotencyConflict,
                ProxyError::IdempotencyMismatch,
                ProxyError::BodyTimeout(30),
                ProxyError::Busy("x".into()),
                ProxyError::FamilyFull(10),
                ProxyError::TokenTooLarge(16384),
                ProxyError::TooLarge(1000),
                ProxyError::UnsupportedEncoding("gzip".into()),
                ProxyError::BadGateway("x".into()),
                ProxyError::GatewayTimeout("x".into()),
                ProxyError::StoreUnavailable("x".into()),
                ProxyError::GatewayNotTrusted("x".into()),
            ]
        };
        for api in [Api::OpenAi, Api::Anthropic, Api::Plain, Api::Mcp] {
            for e in all() {
                let (status, code) = (e.status().as_u16(), e.code());
                let resp = e.into_response_for(api);
                let h = resp.headers();
                let retry = h.get("x-should-retry").map(|v| v.to_str().unwrap());
                let after = h.get("retry-after");
                match status {
                    408 | 502 | 504 => assert_eq!((retry, after), (None, None), "{code}"),
                    409 | 503 => {
                        assert_eq!(retry, Some("true"), "{code}");
                        assert!(after.is_some(), "{code}");
                    }
                    _ => assert_eq!((retry, after), (Some("false"), None), "{code}"),
                }
            }
        }
        let e = denial(DenialKind::Exhausted);
        assert_eq!(e.anthropic_type(), "rate_limit_error");
        assert_eq!(e.openai_type(), "insufficient_quota");
        assert_eq!(
            ProxyError::TooLarge(1).anthropic_type(),
            "request_too_large"
        );
    }
}
