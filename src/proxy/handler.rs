//! The request path: bound → verify → revocation → reserve → authorize →
//! durable → forward. Each step returns a [`ProxyError`] that says what was
//! wrong; nothing is forwarded unless every step passed.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde::Deserialize;

use super::AppState;
use super::error::ProxyError;
use super::forward::{Outgoing, forward};
use super::idempotency::{Claim, MAX_KEY_LEN};
use crate::monitor::Observation;
use crate::store::{CounterSpec, Reservation};
use crate::token::{MAX_TOKEN_LEN, RequestFacts};
use crate::verify::{VerifiedToken, revoked_denial};

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
        .map(|c| c.0.to_string());
    let request_id = format!("{:016x}", rand::random::<u64>());
    let mut obs = Observation::new(request_id.clone(), peer, req.method().as_str());
    let (mut resp, code, reason) = match handle(&st, req, &mut obs).await {
        Ok(r) => (r, "ok", None),
        Err(e) => {
            tracing::debug!(status = %e.status(), code = e.code(), "request refused");
            if let ProxyError::Denied(d) = &e {
                obs.denial = Some(d.kind);
            }
            let code = e.code();
            let reason = e.message();
            (e.into_response(), code, Some(reason))
        }
    };
    st.monitor
        .record(&obs, resp.status().as_u16(), code, reason);
    if let Ok(v) = http::HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-till-request-id", v);
    }
    resp
}

/// Reads the token from `Authorization: Bearer` or `x-api-key`.
pub fn extract_token(headers: &HeaderMap) -> Result<&str, ProxyError> {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| {
        let s = v.to_str().ok()?;
        let (scheme, rest) = s.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    let token = match bearer {
        Some(t) => t,
        None => match headers.get("x-api-key") {
            Some(v) => v
                .to_str()
                .map_err(|_| ProxyError::InvalidToken("x-api-key is not text".into()))?
                .trim(),
            None => return Err(ProxyError::MissingToken),
        },
    };
    if token.is_empty() {
        return Err(ProxyError::MissingToken);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(ProxyError::TokenTooLarge(MAX_TOKEN_LEN));
    }
    Ok(token)
}

/// Splits `/service/rest` into the service and the rest of the path.
fn split_service(path: &str) -> Result<(&str, &str), ProxyError> {
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

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| {
            let ct = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            ct == "application/json" || ct.ends_with("+json")
        })
        .unwrap_or(false)
}

/// The `model` field of a JSON body. Duplicate `model` keys or malformed
/// JSON give no model fact, which fails any model check (deny when unsure).
/// So do a body that is not an object (serde reads a struct from an array
/// too: `["gpt-4o-mini"]` would name a model the upstream never sees) and
/// invalid UTF-8 anywhere (serde skips unknown fields without checking it,
/// and an upstream may decode such a body differently).
pub fn model_of(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct M {
        model: Option<String>,
    }
    let text = std::str::from_utf8(body).ok()?;
    if !text.trim_start().starts_with('{') {
        return None;
    }
    serde_json::from_str::<M>(text).ok().and_then(|m| m.model)
}

async fn read_body(body: Body, max: usize) -> Result<Bytes, ProxyError> {
    let limited = http_body_util::Limited::new(body, max);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ProxyError::TooLarge(max)),
        Err(e) => Err(ProxyError::BadRequest(format!(
            "cannot read request body: {e}"
        ))),
    }
}

/// Counter specs for every block: id, effective limit, and the expiry of
/// that block and its ancestors (a block cannot outlive them).
fn specs(t: &VerifiedToken) -> Vec<CounterSpec> {
    let mut exp: Option<u64> = None;
    t.ids
        .iter()
        .enumerate()
        .map(|(k, id)| {
            let own = t
                .view
                .blocks
                .get(k)
                .and_then(|b| b.expires_at)
                .and_then(|e| {
                    e.duration_since(std::time::UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_secs())
                });
            exp = match (exp, own) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            CounterSpec {
                id: id.clone(),
                limit: t.limits.get(k).copied().flatten(),
                expires: exp,
            }
        })
        .collect()
}

async fn handle(
    st: &AppState,
    req: Request,
    obs: &mut Observation,
) -> Result<Response, ProxyError> {
    let (parts, body) = req.into_parts();
    super::forward::refuse_unsafe_request(&parts)?;

    // 1. Bound and parse the request before any cryptography.
    let (service, rest) = split_service(parts.uri.path())?;
    // Only configured names reach the observation: it becomes a metric
    // label, and labels made up by strangers would grow without bound.
    let upstream = st
        .upstreams
        .get(service)
        .ok_or_else(|| ProxyError::UnknownService(service.chars().take(64).collect()))?;
    obs.service = service.to_string();
    let path = crate::path::normalize(rest).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    obs.path = path.clone();
    let token_text = extract_token(&parts.headers)?;
    let json = is_json(&parts.headers);
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && json
        && len > st.limits.max_body_bytes as u64
    {
        return Err(ProxyError::TooLarge(st.limits.max_body_bytes));
    }

    // 2. Signature (cached).
    let t0 = Instant::now();
    let token = st
        .verify_cached(token_text)
        .map_err(|e| ProxyError::InvalidToken(e.to_string()));
    obs.verify = Some(t0.elapsed());
    let token = token?;
    obs.token = Some(token.clone());

    // 3. Revocation.
    match st.revocations.first_revoked(&token.ids) {
        Ok(Some(b)) => return Err(ProxyError::Denied(revoked_denial(b))),
        Ok(None) => {}
        Err(e) => return Err(ProxyError::StoreUnavailable(e.to_string())),
    }

    // The body is read only when it can name a model.
    let (body, model) = if json {
        let bytes = read_body(body, st.limits.max_body_bytes).await?;
        let model = model_of(&bytes);
        (Outgoing::Buffered(bytes), model)
    } else {
        (Outgoing::Stream(body), None)
    };
    obs.model = model.clone();
    let facts = RequestFacts {
        service: service.to_string(),
        // As sent: the method authorized is the method forwarded (HTTP
        // methods are case-sensitive; a lower-case `get` is not `GET`).
        method: parts.method.as_str().to_string(),
        path,
        model,
        time: st.clock.now(),
    };

    // Idempotency: a free retry of a failed attempt reuses its counts.
    let idem_key = match parts.headers.get("idempotency-key") {
        Some(v) if v.len() <= MAX_KEY_LEN => v.to_str().ok().map(|k| {
            format!(
                "{}\n{k}",
                token.ids.last().map(String::as_str).unwrap_or("")
            )
        }),
        Some(_) => {
            return Err(ProxyError::BadRequest(format!(
                "Idempotency-Key is longer than {MAX_KEY_LEN} bytes"
            )));
        }
        None => None,
    };
    let replay = match &idem_key {
        Some(k) => match st.idempotency.claim(k) {
            Claim::Conflict => return Err(ProxyError::IdempotencyConflict),
            Claim::Replay(uses) => Some(uses),
            Claim::Fresh => None,
        },
        None => None,
    };

    let mut started = false;
    let replayed = replay.is_some();
    let result = authorize_and_forward(
        obs,
        &mut started,
        st,
        &token,
        facts,
        replay,
        idem_key.as_deref(),
        upstream,
        &parts,
        body,
    )
    .await;
    if let Some(k) = &idem_key {
        let answered = matches!(&result, Ok(r) if r.status().as_u16() < 500);
        // Only an attempt this request started (or replayed) is settled
        // here: settling an older entry after a denial could turn a used
        // key into a free retry. A replay denied before forwarding stays
        // retryable.
        if replayed || started {
            st.idempotency.finish(k, answered);
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn authorize_and_forward(
    obs: &mut Observation,
    started: &mut bool,
    st: &AppState,
    token: &Arc<VerifiedToken>,
    facts: RequestFacts,
    replay: Option<Vec<u64>>,
    idem_key: Option<&str>,
    upstream: &super::Upstream,
    parts: &http::request::Parts,
    body: Outgoing,
) -> Result<Response, ProxyError> {
    match replay {
        Some(uses) => {
            obs.uses = Some(uses.clone());
            st.verifier
                .authorize(token, &facts, &uses)
                .map_err(ProxyError::Denied)?;
        }
        None => {
            // 4. Reserve activations on every block.
            let t0 = Instant::now();
            let Reservation { uses, durable } = st
                .counters
                .reserve(&specs(token))
                .await
                .map_err(|e| ProxyError::StoreUnavailable(e.to_string()))?;
            obs.uses = Some(uses.clone());
            // 5. Authorize with this request's own post-increment counts.
            if let Err(d) = st.verifier.authorize(token, &facts, &uses) {
                // Report the counts as they stand after the rollback.
                obs.uses = Some(uses.iter().map(|u| u.saturating_sub(1)).collect());
                if let Err(e) = st.counters.release(&token.ids).await {
                    tracing::error!(error = %e, "rollback of a denied reservation failed");
                }
                return Err(ProxyError::Denied(d));
            }
            // The count must be on disk before anything leaves.
            durable
                .await
                .map_err(|e| ProxyError::StoreUnavailable(e.to_string()))?;
            obs.reserve = Some(t0.elapsed());
            if let Some(k) = idem_key {
                st.idempotency.start(k, uses);
                *started = true;
            }
        }
    }
    // 6. Forward and stream back.
    let resp = forward(st, upstream, parts, &facts.path, body).await?;
    obs.upstream_status = Some(resp.status().as_u16());
    Ok(resp)
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

    #[test]
    fn service_split() {
        assert_eq!(split_service("/openai/v1/x").unwrap(), ("openai", "/v1/x"));
        assert_eq!(split_service("/openai").unwrap(), ("openai", "/"));
        assert!(split_service("/").is_err());
    }

    #[test]
    fn model_extraction_denies_when_unsure() {
        assert_eq!(model_of(br#"{"model":"a","x":1}"#).as_deref(), Some("a"));
        assert_eq!(model_of(br#"{"model":"a","model":"b"}"#), None);
        assert_eq!(model_of(b"not json"), None);
        assert_eq!(model_of(br#"{"model":5}"#), None);
        // Found by fuzzing (tests/fuzz-regressions/request/).
        assert_eq!(model_of(br#"["gpt-4o-mini"]"#), None);
        assert_eq!(model_of(b"{\"model\":\"a\",\"x\":\"\xff\"}"), None);
    }
}
