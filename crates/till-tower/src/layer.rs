//! The tower layer and service: read the token, check the feed, verify,
//! decide, count remotely if asked, and hand the verified token on.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum_core::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use till_core::request;
use till_core::token::vocab::names;
use till_core::{
    CheckMeaning, Denial, DenialKind, MCP_FACTS, RequestFacts, Stage, VerifiedToken, Verifier,
    decide, first_revoked, is_json, normalize_path, token_from_headers,
};

use crate::feed::{FeedState, now_unix};
use crate::remote::Remote;
use crate::{Refusal, TillToken, UseLimits};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every request of one layer shares.
pub(crate) struct Shared {
    pub verifier: Verifier,
    pub service: String,
    pub use_limits: UseLimits,
    pub remote: Option<Remote>,
    pub feed: Arc<FeedState>,
    pub max_feed_age: Duration,
    pub refresh_every: Duration,
    pub max_body_bytes: usize,
    /// Verified tokens by their full text (so no hash collision can pass
    /// an unverified token); only successes, and only while the key set
    /// they were verified with is current. Revocation, expiry and scope are
    /// decided on every request, never cached here.
    pub cache: moka::sync::Cache<String, Arc<VerifiedToken>>,
}

/// Verified-token cache budget, in bytes. Weighed, not counted: anyone
/// holding one token can mint any number of valid children offline, each
/// up to 16 KiB; each entry weighs an upper bound of its memory, decision
/// cache included (`till_core::verify::cache_weight`).
pub(crate) const CACHE_BYTES: u64 = 64 << 20;

impl Shared {
    fn verify_cached(&self, text: &str) -> Result<Arc<VerifiedToken>, till_core::TokenError> {
        if let Some(t) = self.cache.get(text).filter(|t| self.verifier.is_current(t)) {
            return Ok(t);
        }
        let t = Arc::new(self.verifier.verify_token(text)?);
        self.cache.insert(text.to_string(), t.clone());
        Ok(t)
    }
}

/// A [`tower_layer::Layer`] that admits only requests carrying a Till
/// token allowed for them. Built with [`TillLayer::builder`].
#[derive(Clone)]
pub struct TillLayer {
    pub(crate) shared: Arc<Shared>,
}

impl<S> tower_layer::Layer<S> for TillLayer {
    type Service = TillService<S>;
    fn layer(&self, inner: S) -> TillService<S> {
        TillService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`TillLayer`] wraps around yours.
#[derive(Clone)]
pub struct TillService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B> tower_service::Service<Request<B>> for TillService<S>
where
    S: tower_service::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The clone that was polled ready is the one that serves.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            match authorize(&shared, req).await {
                Ok(req) => inner.call(req).await,
                Err(refusal) => {
                    tracing::debug!(code = refusal.code(), "till-tower: request refused");
                    Ok(refusal.into_response())
                }
            }
        })
    }
}

/// The checks, cheapest first; nothing of the body is read unless the
/// head passed.
async fn authorize<B>(shared: &Shared, req: Request<B>) -> Result<Request<Body>, Refusal>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // 1. A fresh feed, or nothing passes (fail closed).
    let max = shared.max_feed_age.as_secs();
    let feed = shared.feed.current();
    let stale = |age| Refusal::FeedStale {
        age,
        max,
        retry_after: u32::try_from(shared.refresh_every.as_secs()).unwrap_or(u32::MAX),
    };
    let feed = match feed {
        None => return Err(stale(None)),
        Some(f) => {
            let age = now_unix().saturating_sub(f.issued_at);
            if age > max {
                return Err(stale(Some(age)));
            }
            f
        }
    };

    // 2. The head: token, path, before any cryptography.
    let (parts, body) = req.into_parts();
    // Inside `Router::nest` axum hands the service the path with the nest's
    // prefix stripped: judging that would let a key for `/admin/` reach
    // `/v1/chat/admin/...`. The client's own target is `OriginalUri`, set
    // by the outermost router (a client cannot set an extension).
    let uri = parts
        .extensions
        .get::<axum::extract::OriginalUri>()
        .map_or_else(|| parts.uri.clone(), |o| o.0.clone());
    if let Some(why) = till_core::request::lower_case_method(parts.method.as_str()) {
        return Err(Refusal::BadRequest(why));
    }
    // What the proxy and forward-auth refuse: frameworks (Rack, Laravel,
    // Symfony, ASP.NET, IIS), and middleware composed into a tower
    // service, read these as the method or path to act on, so a key for
    // GET could run DELETE, or reach another route than the one judged.
    if let Some(why) = request::method_override_in_query(uri.query()) {
        return Err(Refusal::BadRequest(why.into()));
    }
    if let Some(h) = request::method_or_url_header(&parts.headers) {
        return Err(Refusal::BadRequest(format!(
            "the request carries the header {h}, which frameworks read as the method or path to act on instead of the request's own; send the request without it"
        )));
    }
    if let Some(why) = request::ambiguous_content_type(&parts.headers) {
        return Err(Refusal::BadRequest(why.into()));
    }
    let text = token_from_headers(&parts.headers).map_err(Refusal::Header)?;
    let path = uri.path();
    let normal = normalize_path(path).map_err(|e| Refusal::BadRequest(e.to_string()))?;
    if normal != path {
        // The router sees the path as sent: authorizing another spelling
        // of it would authorize a different route than the one served.
        return Err(Refusal::BadRequest(format!(
            "the path is not in normal form: Till would read it as {normal:?}; send {normal:?}"
        )));
    }

    // 3. Signatures, revocation, the use-limit choice.
    let token = shared.verify_cached(text).map_err(Refusal::InvalidToken)?;
    let revoked = first_revoked(&token.ids, &feed.revoked);
    if revoked.is_none() && matches!(shared.use_limits, UseLimits::Deny) && has_use_limits(&token) {
        return Err(Refusal::UseLimitsUnenforced);
    }
    // No MCP message is read here, so no `mcp`, `tool`, `prompt` or
    // `resource` fact exists: a deny-list on one (`reject if
    // tool("delete_everything")`) would never fire.
    if revoked.is_none()
        && let Some(fact) = shared.verifier.first_read(&token, &MCP_FACTS)
    {
        return Err(unseen(format!(
            "this key's scope (or a policy of this service) reads `{fact}(...)` of an MCP message, and this service's Till layer does not read MCP messages; use a key without MCP tools, prompts, resources or methods here"
        )));
    }

    // 4. Decide on the head, then, for a JSON body, with its model. No
    // counter here: each request is judged as the token's first use (use
    // limits are refused above, ignored by choice, or counted remotely).
    let counts = vec![0; token.ids.len()];
    let mut facts = RequestFacts {
        service: shared.service.clone(),
        method: parts.method.as_str().to_string(),
        path: normal,
        model: None,
        mcp: None,
        time: SystemTime::now(),
    };
    let v = &shared.verifier;
    let reads_model = || v.first_read(&token, &[names::MODEL]).is_some();
    let json = is_json(&parts.headers);
    // A form's media type naming JSON in a parameter: this layer would
    // read JSON, a handler's form extractor (axum's `Form`) the form, where
    // a JSON string can hold `&model=gpt-4&_method=DELETE&`.
    if json && request::is_url_encoded_form(&parts) {
        return Err(Refusal::BadRequest(
            "the Content-Type is a URL-encoded form and names JSON too (`/json` or `+json`); handlers differ on which one they read, so Till refuses it: send one".into(),
        ));
    }
    // A POST with a body and no `Content-Type` (or an empty one) is a form
    // to Rack; in process (or over HTTP/2) such a body needs no
    // `Content-Length`, so its own end counts too.
    let form = !json
        && (request::is_url_encoded_form(&parts)
            || (parts.method == http::Method::POST
                && parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .is_none_or(|v| v.as_bytes().trim_ascii().is_empty())
                && !body.is_end_stream()));
    let body = if json || form {
        // Checked as the bytes arrive: a service that decodes request
        // bodies would act on what this layer cannot see.
        if let Some(c) = request::content_coding(&parts.headers) {
            return Err(Refusal::UnsupportedEncoding(c));
        }
        decide(v, &token, revoked, &facts, &counts, Stage::BeforeBody).map_err(Refusal::Denied)?;
        let bytes = read_body(body, shared.max_body_bytes).await?;
        facts.model = if json {
            request::model_of_json_request(uri.query(), &bytes)
        } else {
            if let Some(why) = request::method_override_in_form(&bytes) {
                return Err(Refusal::BadRequest(why.into()));
            }
            request::model_of_form_request(uri.query(), &bytes)
        }
        .map_err(Refusal::BadRequest)?;
        // A form a handler may parse as JSON (FastAPI's `request.json()`
        // whatever the type) names no model here and one to the handler.
        if !json && request::may_read_as_json(&bytes) && reads_model() {
            return Err(unseen(
                "this key's scope (or a policy of this service) depends on the request's model, and this body is JSON sent as a form (or without a Content-Type), which handlers read differently; send it with Content-Type: application/json".into(),
            ));
        }
        // No model from a JSON body this layer could not read as the
        // handler may (a byte order mark, UTF-16, NaN, an array): a
        // deny-list on the model would never fire.
        if json && facts.model.is_none() && reads_model() && !request::names_no_model(&bytes) {
            decide(v, &token, revoked, &facts, &counts, Stage::Final).map_err(Refusal::Denied)?;
            return Err(unseen(
                "this key's scope (or a policy of this service) depends on the request's model, and this JSON body cannot be read the way every JSON parser reads it (a byte order mark, UTF-16 or UTF-32, NaN or Infinity, an array, a `model` that is not a string, or malformed JSON); send a UTF-8 JSON object whose `model` is a string".into(),
            ));
        }
        Body::from(bytes)
    } else {
        // Without a body the query may name the model (`?model=`, which
        // some frameworks read); a body this layer does not read might name
        // another, so then there is no model fact (deny when unsure).
        // Over HTTP/2 a body needs no `Content-Length` (nor, in process,
        // does a tower request): the body's own end counts too.
        if request::declares_no_body(&parts.headers) && body.is_end_stream() {
            if let Some(q) = uri.query() {
                facts.model = request::model_in_query(q).map_err(Refusal::BadRequest)?;
            }
        } else if reads_model() {
            // A body this layer does not read may name a model the handler
            // reads (a form, a multipart upload): a deny-list on the model
            // (`reject if model("gpt-4")`, a policy) would never fire.
            decide(v, &token, revoked, &facts, &counts, Stage::BeforeBody)
                .map_err(Refusal::Denied)?;
            return Err(unseen(
                "this key's scope (or a policy of this service) depends on the request's model, and this service's Till layer reads the model only from a JSON body (Content-Type application/json) or a URL-encoded form; send the body as JSON, or use a key without a model list here".into(),
            ));
        }
        Body::new(body)
    };
    decide(v, &token, revoked, &facts, &counts, Stage::Final).map_err(Refusal::Denied)?;

    // 5. Remote count, last: only a request that passed everything here
    // spends a use at the proxy.
    if let Some(remote) = &shared.remote {
        remote.check(&parts.method, &uri, text).await?;
    }

    let mut req = Request::from_parts(parts, body);
    req.extensions_mut().insert(TillToken::new(token));
    Ok(req)
}

/// A refusal for a key whose decision reads a fact this layer cannot see.
fn unseen(reason: String) -> Refusal {
    Refusal::Denied(Denial::new(DenialKind::Scope, reason))
}

/// Whether any block limits uses: its own limit, a limit on another
/// block, or a custom check reading `uses` (which no counter here feeds).
fn has_use_limits(token: &VerifiedToken) -> bool {
    token.view.blocks.iter().any(|b| {
        b.use_limit.is_some()
            || b.checks
                .iter()
                .any(|c| matches!(c, CheckMeaning::UseLimit { .. }))
            || b.source.contains("uses(")
    })
}

async fn read_body<B>(body: B, max: usize) -> Result<Bytes, Refusal>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Refusal::BodyTooLarge(max)),
        Err(e) => Err(Refusal::BadRequest(format!(
            "the body could not be read: {e}"
        ))),
    }
}
