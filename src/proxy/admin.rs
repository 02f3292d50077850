//! The admin API: revoke, list revocations, usage. Authenticated with an
//! admin token (a Till token whose authority block holds
//! `right("till:admin", "*", "/")`) and served to loopback clients only
//! unless `danger_admin_remote` is set.

use std::net::SocketAddr;
use std::time::SystemTime;

use axum::Json;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::error::ProxyError;
use super::handler::extract_token;
use crate::token::RawToken;
use crate::verify::{Denial, DenialKind, revoked_denial};

fn forbidden(reason: &str) -> ProxyError {
    ProxyError::Denied(Denial {
        kind: DenialKind::Scope,
        reason: reason.into(),
    })
}

/// Checks the caller: loopback (unless allowed remote) and an admin token.
fn authenticate(st: &AppState, peer: SocketAddr, headers: &HeaderMap) -> Result<(), ProxyError> {
    if !st.admin_remote && !peer.ip().is_loopback() {
        return Err(forbidden(
            "the admin API only answers loopback clients (set danger_admin_remote to change this)",
        ));
    }
    let text = extract_token(headers)?;
    let token = st
        .verify_cached(text)
        .map_err(|e| ProxyError::InvalidToken(e.to_string()))?;
    if let Ok(Some(b)) = st.revocations.first_revoked(&token.ids) {
        return Err(ProxyError::Denied(revoked_denial(b)));
    }
    st.verifier
        .authorize_admin(&token, SystemTime::now())
        .map_err(ProxyError::Denied)
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

pub async fn revoke(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(e) = authenticate(&st, peer, &headers) {
        return e.into_response();
    }
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

pub async fn revocations(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = authenticate(&st, peer, &headers) {
        return e.into_response();
    }
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

pub async fn usage(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = authenticate(&st, peer, &headers) {
        return e.into_response();
    }
    match st.counters.list().await {
        Ok(mut list) => {
            list.sort_by(|a, b| b.last_use.cmp(&a.last_use).then(a.id.cmp(&b.id)));
            let revoked: Vec<bool> = list
                .iter()
                .map(|c| {
                    matches!(
                        st.revocations.first_revoked(std::slice::from_ref(&c.id)),
                        Ok(Some(_))
                    )
                })
                .collect();
            let items: Vec<_> = list
                .iter()
                .zip(revoked)
                .map(|(c, r)| {
                    json!({
                        "id": c.id, "uses": c.uses, "limit": c.limit,
                        "remaining": c.limit.map(|l| l.saturating_sub(c.uses)),
                        "expires": c.expires, "last_use": c.last_use, "revoked": r,
                    })
                })
                .collect();
            Json(json!({ "counters": items })).into_response()
        }
        Err(e) => ProxyError::StoreUnavailable(e.to_string()).into_response(),
    }
}

pub async fn usage_one(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = authenticate(&st, peer, &headers) {
        return e.into_response();
    }
    let id = id.to_ascii_lowercase();
    match st.counters.get(std::slice::from_ref(&id)).await {
        Ok(v) => {
            let c = &v[0];
            let revoked = matches!(
                st.revocations.first_revoked(std::slice::from_ref(&id)),
                Ok(Some(_))
            );
            Json(json!({
                "id": c.id, "uses": c.uses, "limit": c.limit,
                "remaining": c.limit.map(|l| l.saturating_sub(c.uses)),
                "expires": c.expires, "last_use": c.last_use, "revoked": revoked,
            }))
            .into_response()
        }
        Err(e) => ProxyError::StoreUnavailable(e.to_string()).into_response(),
    }
}

pub async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"error": {"message": "no such admin endpoint", "type": "not_found_error", "code": "not_found"}}))).into_response()
}
