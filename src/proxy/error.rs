//! Every way a proxied request can fail, and the response each gives.
//!
//! Bodies use the OpenAI error shape, `{"error":{"message","type","code"}}`,
//! so the official SDKs surface the reason. Messages never contain a token
//! or a credential.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::verify::{Denial, DenialKind};

/// An error answer from the proxy.
#[derive(Debug)]
pub enum ProxyError {
    /// 401: no token in `Authorization: Bearer` or `x-api-key`.
    MissingToken,
    /// 401: the token does not parse or its signature fails.
    InvalidToken(String),
    /// 403 / 429 from authorization or revocation.
    Denied(Denial),
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
    /// 502: upstream unreachable or broken.
    BadGateway(String),
    /// 504: upstream too slow.
    GatewayTimeout(String),
    /// 503: counter store unavailable; nothing was forwarded.
    StoreUnavailable(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingToken | ProxyError::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            ProxyError::Denied(d) if d.kind == DenialKind::Exhausted => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::Denied(_) => StatusCode::FORBIDDEN,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::UnknownService(_) => StatusCode::NOT_FOUND,
            ProxyError::IdempotencyConflict => StatusCode::CONFLICT,
            ProxyError::IdempotencyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::FamilyFull(_) => StatusCode::FORBIDDEN,
            ProxyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
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
            ProxyError::InvalidToken(_) => "invalid_token",
            ProxyError::Denied(d) => match d.kind {
                DenialKind::Exhausted => "activations_exhausted",
                DenialKind::Expired => "token_expired",
                DenialKind::Revoked => "token_revoked",
                DenialKind::Limits => "authorization_limits",
                DenialKind::Scope => "out_of_scope",
            },
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::UnknownService(_) => "unknown_service",
            ProxyError::IdempotencyConflict => "idempotency_conflict",
            ProxyError::IdempotencyMismatch => "idempotency_key_reused",
            ProxyError::BodyTimeout(_) => "body_timeout",
            ProxyError::Busy(_) => "busy",
            ProxyError::FamilyFull(_) => "family_too_large",
            ProxyError::TooLarge(_) => "body_too_large",
            ProxyError::TokenTooLarge(_) => "token_too_large",
            ProxyError::BadGateway(_) => "upstream_error",
            ProxyError::GatewayTimeout(_) => "upstream_timeout",
            ProxyError::StoreUnavailable(_) => "store_unavailable",
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ProxyError::MissingToken | ProxyError::InvalidToken(_) => "authentication_error",
            ProxyError::Denied(d) if d.kind == DenialKind::Exhausted => "rate_limit_error",
            ProxyError::Denied(_) => "permission_error",
            ProxyError::BadRequest(_)
            | ProxyError::MethodNotAllowed(_)
            | ProxyError::TooLarge(_)
            | ProxyError::TokenTooLarge(_)
            | ProxyError::IdempotencyConflict
            | ProxyError::IdempotencyMismatch
            | ProxyError::BodyTimeout(_) => "invalid_request_error",
            ProxyError::FamilyFull(_) => "permission_error",
            ProxyError::UnknownService(_) => "not_found_error",
            _ => "api_error",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ProxyError::MissingToken => {
                "no Till token: send it as `Authorization: Bearer <token>` or `x-api-key: <token>`"
                    .into()
            }
            ProxyError::InvalidToken(m) => format!("invalid Till token: {m}"),
            ProxyError::Denied(d) => format!("denied: {}", d.reason),
            ProxyError::BadRequest(m) => format!("bad request: {m}"),
            ProxyError::MethodNotAllowed(m) => format!(
                "method {m} is not allowed: Till never forwards TRACE, TRACK or CONNECT, whatever the token; use GET, POST or another ordinary method"
            ),
            ProxyError::UnknownService(s) => {
                format!("no upstream named {s:?} is configured on this proxy")
            }
            ProxyError::IdempotencyConflict => {
                "a request with this Idempotency-Key is still in progress".into()
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
            ProxyError::BadGateway(m) => format!("upstream error: {m}"),
            ProxyError::GatewayTimeout(m) => format!("upstream timed out: {m}"),
            ProxyError::StoreUnavailable(m) => {
                format!("counter store unavailable, request not forwarded: {m}")
            }
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message(),
                "type": self.kind(),
                "code": self.code(),
            }
        });
        let mut resp = (self.status(), axum::Json(body)).into_response();
        if matches!(self, ProxyError::Busy(_)) {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        if self.status() == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                "www-authenticate",
                HeaderValue::from_static("Bearer realm=\"till\""),
            );
        }
        resp
    }
}
