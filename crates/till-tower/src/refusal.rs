//! Why the layer refused a request, and the answer the client gets: the
//! proxy's plain error shape (`{"error":{"message","type","code"}}`) and
//! its retry advice (`x-should-retry`, `Retry-After`), so a client that
//! talks to Till's proxy understands a service's refusals the same way.

use axum_core::body::Body;
use http::{HeaderValue, Response, StatusCode, header};
use till_core::request::TokenHeaderError;
use till_core::{Denial, DenialKind, TokenError};

/// A refused request. Built by the layer; turned into a response with
/// [`Refusal::into_response`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Refusal {
    /// No token, or one that cannot be read from the headers (401, 431).
    Header(TokenHeaderError),
    /// The token does not parse, its shape is refused, or a signature
    /// fails (401).
    InvalidToken(TokenError),
    /// The decision denied it: scope, expiry, revocation, limits (403),
    /// or, in remote-count mode, used up (429).
    Denied(Denial),
    /// The token carries use limits and the layer has no counter to
    /// enforce them ([`crate::UseLimits::Deny`]) (403).
    UseLimitsUnenforced,
    /// The request itself is malformed: a path not in normal form, a body
    /// naming its model ambiguously (400).
    BadRequest(String),
    /// A JSON body over the layer's `max_body_bytes` (413).
    BodyTooLarge(usize),
    /// A body the layer reads (JSON, a URL-encoded form) sent with a
    /// `Content-Encoding` other than `identity`, which it cannot check
    /// while a decompressing service would act on what is inside (415).
    UnsupportedEncoding(String),
    /// No verified revocation feed younger than `max_feed_age` (503).
    FeedStale {
        /// Age of the newest accepted feed in seconds; `None` when none
        /// has been accepted yet.
        age: Option<u64>,
        /// The allowed age in seconds.
        max: u64,
        /// When to try again, in seconds (the refresh interval).
        retry_after: u32,
    },
    /// Remote-count mode: the proxy's check endpoint answered 401, 403 or
    /// 429; its status, code and message are passed on.
    Remote {
        /// The proxy's status.
        status: StatusCode,
        /// The proxy's `error.code`.
        code: String,
        /// The proxy's `error.message`.
        message: String,
    },
    /// Remote-count mode: the check endpoint could not be asked or gave an
    /// answer that is not a decision (503).
    CounterUnavailable(String),
}

impl Refusal {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Header(TokenHeaderError::TooLarge { .. }) => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            Refusal::Header(_) | Refusal::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            Refusal::Denied(d) if d.kind == DenialKind::Exhausted => StatusCode::TOO_MANY_REQUESTS,
            Refusal::Denied(_) | Refusal::UseLimitsUnenforced => StatusCode::FORBIDDEN,
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refusal::FeedStale { .. } | Refusal::CounterUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::Remote { status, .. } => *status,
        }
    }

    /// The machine-readable `error.code`, the proxy's where it has one.
    pub fn code(&self) -> &str {
        match self {
            Refusal::Header(TokenHeaderError::Missing) => "missing_token",
            Refusal::Header(TokenHeaderError::TooLarge { .. }) => "token_too_large",
            Refusal::Header(_) | Refusal::InvalidToken(_) => "invalid_token",
            Refusal::Denied(d) => match d.kind {
                DenialKind::Exhausted => "activations_exhausted",
                DenialKind::Expired => "token_expired",
                DenialKind::Revoked => "token_revoked",
                DenialKind::Limits => "authorization_limits",
                _ => "out_of_scope",
            },
            Refusal::UseLimitsUnenforced => "use_limits_unenforced",
            Refusal::BadRequest(_) => "bad_request",
            Refusal::BodyTooLarge(_) => "body_too_large",
            Refusal::UnsupportedEncoding(_) => "unsupported_content_encoding",
            Refusal::FeedStale { .. } => "revocation_feed_stale",
            Refusal::Remote { code, .. } => code,
            Refusal::CounterUnavailable(_) => "counter_unavailable",
        }
    }

    /// The message for the client: what was wrong and what to do. Never
    /// the token.
    pub fn message(&self) -> String {
        match self {
            Refusal::Header(e) => e.to_string(),
            Refusal::InvalidToken(e) => format!("invalid Till token: {e}"),
            Refusal::Denied(d) => d.reason.clone(),
            Refusal::UseLimitsUnenforced => "this key carries use limits, and this service verifies keys offline with no counter, so it cannot enforce them; it refuses such keys rather than let them be used without limit. Use a key without use limits here, or send the requests through the Till proxy".into(),
            Refusal::BadRequest(m) => format!("bad request: {m}"),
            Refusal::BodyTooLarge(max) => format!("the body is larger than {max} bytes"),
            Refusal::UnsupportedEncoding(c) => format!(
                "the request body is sent with Content-Encoding {c:?}; this service's Till layer checks this body and cannot read it encoded: send the body uncompressed (no Content-Encoding, or identity)"
            ),
            Refusal::FeedStale { age: Some(age), max, .. } => format!(
                "this service cannot check revocations: its revocation feed is {age} s old, more than the allowed {max} s (is the Till proxy reachable?); try again later"
            ),
            Refusal::FeedStale { age: None, .. } => "this service cannot check revocations yet: it has no verified revocation feed (is the Till proxy reachable?); try again later".into(),
            Refusal::Remote { message, .. } => message.clone(),
            Refusal::CounterUnavailable(m) => format!(
                "this service cannot count this key's uses: the Till proxy's check failed ({m}); try again later"
            ),
        }
    }

    fn retry(&self) -> Option<u32> {
        match self {
            Refusal::FeedStale { retry_after, .. } => Some((*retry_after).max(1)),
            Refusal::CounterUnavailable(_) => Some(1),
            _ => None,
        }
    }

    /// The JSON answer.
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let body = serde_json::json!({
            "error": {
                "message": self.message(),
                "type": error_type(status),
                "code": self.code(),
            }
        });
        let mut resp = Response::new(Body::from(body.to_string()));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self.retry() {
            Some(secs) => {
                h.insert("x-should-retry", HeaderValue::from_static("true"));
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            None => {
                h.insert("x-should-retry", HeaderValue::from_static("false"));
            }
        }
        if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            h.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"till\""),
            );
        }
        resp
    }
}

/// The `type` field, as the proxy's OpenAI/plain shape names it.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        429 => "insufficient_quota",
        503 => "api_error",
        _ => "invalid_request_error",
    }
}
