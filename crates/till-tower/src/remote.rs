//! Remote-count mode: the proxy's forward-auth endpoint (`/auth/<service>`)
//! decides again and counts the use; this layer cannot count by itself.

use http::StatusCode;

use crate::Refusal;

/// The header the proxy reads a gateway's `forward_auth_secret` from.
const GATEWAY_SECRET_HEADER: &str = "x-till-gateway-secret";

/// Largest refusal body read from the proxy (its bodies are a few hundred
/// bytes); a larger one is not read, and the refusal keeps a generic text.
const MAX_ANSWER_BYTES: usize = 64 << 10;

pub(crate) struct Remote {
    pub url: String,
    pub secret: Option<String>,
    pub client: reqwest::Client,
}

impl Remote {
    /// Asks the proxy to count this request; `Ok` when it answered 2xx.
    pub async fn check(
        &self,
        method: &http::Method,
        uri: &http::Uri,
        token: &str,
    ) -> Result<(), Refusal> {
        let target = uri
            .path_and_query()
            .map_or_else(|| uri.path().to_string(), |pq| pq.as_str().to_string());
        let mut req = self
            .client
            .get(&self.url)
            .bearer_auth(token)
            .header("x-forwarded-method", method.as_str())
            .header("x-forwarded-uri", target);
        if let Some(s) = &self.secret {
            req = req.header(GATEWAY_SECRET_HEADER, s);
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| Refusal::CounterUnavailable(e.without_url().to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        if !matches!(
            status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
        ) {
            // 400, 404 (no such upstream at the proxy), 5xx: not a decision
            // about this token, so no answer that passes.
            return Err(Refusal::CounterUnavailable(format!("it answered {status}")));
        }
        // The proxy's error bodies are small; read at most this much.
        let mut text = Vec::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            if text.len() + chunk.len() > MAX_ANSWER_BYTES {
                text.clear();
                break;
            }
            text.extend_from_slice(&chunk);
        }
        let body: serde_json::Value = serde_json::from_slice(&text).unwrap_or_default();
        let field = |k: &str| body["error"][k].as_str().map(str::to_string);
        Err(Refusal::Remote {
            status,
            code: field("code").unwrap_or_else(|| "denied".into()),
            message: field("message")
                .unwrap_or_else(|| format!("the Till proxy answered {status}")),
        })
    }
}
