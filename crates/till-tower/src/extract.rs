//! The verified token, as the handler sees it.

use std::convert::Infallible;
use std::sync::Arc;

use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use http::request::Parts;
use till_core::VerifiedToken;

use crate::Refusal;

/// The token [`crate::TillLayer`] verified and allowed for this request,
/// in the request's extensions; also an axum extractor. Behind the layer it
/// is always there; on a route without the layer, extracting it refuses
/// the request (401) rather than run the handler unauthenticated.
#[derive(Clone, Debug)]
pub struct TillToken {
    token: Arc<VerifiedToken>,
}

impl TillToken {
    pub(crate) fn new(token: Arc<VerifiedToken>) -> Self {
        TillToken { token }
    }

    /// The label the operator or an agent gave the token: the newest
    /// block's label, if any block has one.
    pub fn label(&self) -> Option<&str> {
        self.token
            .view
            .blocks
            .iter()
            .rev()
            .find_map(|b| b.labels.first())
            .map(String::as_str)
    }

    /// The token family: the authority block's revocation id (hex), shared
    /// by every token attenuated from the same root token.
    pub fn family(&self) -> &str {
        self.token.family()
    }

    /// Revocation ids of the blocks, authority first (hex).
    pub fn block_ids(&self) -> &[String] {
        &self.token.ids
    }

    /// Everything verification read: blocks, checks, limits, expiry.
    pub fn verified(&self) -> &VerifiedToken {
        &self.token
    }
}

impl<S: Send + Sync> FromRequestParts<S> for TillToken {
    type Rejection = axum_core::response::Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<TillToken>().cloned().ok_or_else(|| {
            Refusal::Header(till_core::request::TokenHeaderError::Missing).into_response()
        })
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for TillToken {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Infallible> {
        Ok(parts.extensions.get::<TillToken>().cloned())
    }
}
