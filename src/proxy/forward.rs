//! Forwarding to the upstream and streaming the answer back unbuffered.
//!
//! The client's token and any credential header it sent are removed and the
//! real credential is injected. Redirects are not followed (the client sees
//! the 3xx). There is no total timeout, so long SSE streams live as long as
//! bytes keep coming; the idle timeout cuts a silent upstream. When the
//! client goes away, axum drops the response body, which drops the upstream
//! request.

use axum::body::{Body, Bytes};
use axum::response::Response;
use futures_util::TryStreamExt;
use http::HeaderMap;
use http::header::{self, HeaderName};

use super::error::ProxyError;
use super::{AppState, Upstream};

/// The request body as it will be sent.
pub enum Outgoing {
    /// Read already (JSON, to find the model).
    Buffered(Bytes),
    /// Passed through as it arrives.
    Stream(Body),
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and others a proxy must not copy.
fn skip_request_header(name: &HeaderName, upstream: &Upstream) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "authorization"
            | "x-api-key"
            | "forwarded"
            | "x-forwarded-host"
            | "x-forwarded-proto"
            | "x-forwarded-for"
            | "x-real-ip"
            | "idempotency-key"
    ) || *name == upstream.header
}

fn skip_response_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Sends the request to `upstream` and returns a streaming response.
pub async fn forward(
    st: &AppState,
    upstream: &Upstream,
    parts: &http::request::Parts,
    path: &str,
    body: Outgoing,
) -> Result<Response, ProxyError> {
    let mut url = String::with_capacity(upstream.base.len() + path.len() + 64);
    url.push_str(&upstream.base);
    url.push_str(path);
    if let Some(q) = parts.uri.query() {
        url.push('?');
        url.push_str(q);
    }
    let mut headers = HeaderMap::with_capacity(parts.headers.len() + 1);
    for (name, value) in parts.headers.iter() {
        if !skip_request_header(name, upstream) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(c) = &upstream.credential {
        headers.insert(upstream.header.clone(), c.clone());
    }
    let body = match body {
        Outgoing::Buffered(b) => reqwest::Body::from(b),
        Outgoing::Stream(b) => reqwest::Body::wrap_stream(b.into_data_stream()),
    };
    let resp = st
        .client
        .request(parts.method.clone(), url)
        .headers(headers)
        .body(body)
        .send()
        .await
        .map_err(|e| upstream_error(&e))?;

    let mut out = Response::builder().status(resp.status());
    if let Some(h) = out.headers_mut() {
        for (name, value) in resp.headers().iter() {
            if !skip_response_header(name) {
                h.append(name.clone(), value.clone());
            }
        }
        // SSE must not be buffered by anything between us and the client.
        if is_event_stream(resp.headers()) {
            h.insert("x-accel-buffering", http::HeaderValue::from_static("no"));
        }
    }
    let stream = resp.bytes_stream().map_err(|e| {
        tracing::warn!(error = %describe(&e), "upstream stream ended with an error");
        std::io::Error::other(describe(&e))
    });
    out.body(Body::from_stream(stream))
        .map_err(|e| ProxyError::BadGateway(e.to_string()))
}

fn is_event_stream(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// The error with its cause chain (it never contains a header value).
fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn upstream_error(e: &reqwest::Error) -> ProxyError {
    let msg = if e.is_connect() {
        "cannot connect to the upstream".to_string()
    } else if e.is_timeout() {
        "no answer from the upstream in time".to_string()
    } else {
        "the upstream connection failed".to_string()
    };
    tracing::warn!(error = %describe(e), "upstream request failed");
    if e.is_timeout() {
        ProxyError::GatewayTimeout(msg)
    } else {
        ProxyError::BadGateway(msg)
    }
}
