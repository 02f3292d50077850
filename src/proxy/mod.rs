//! The verifier proxy (`till serve` / `till up`).
//!
//! [`router`] builds the axum app from an [`AppState`], so tests can drive it
//! without a socket; [`run`] serves it on a listener until `shutdown`
//! resolves, then drains in-flight requests and streams for the grace period
//! and flushes the counter store.
//!
//! The request path (see [`handler`]): bound the head → decide without
//! touching state ([`crate::decide`]) → read a JSON body and decide again →
//! reserve activations → re-check → await durability → forward and stream
//! back ([`forward`]) → record.

pub mod admin;
pub mod clock_floor;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod forward;
pub mod forward_auth;
pub mod handler;
pub mod idempotency;
pub mod mcp;
pub mod multipart;
pub mod reload;
pub mod server;
pub mod upstream_client;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{any, get, post};
use http::{HeaderName, HeaderValue};
use moka::sync::Cache;
use tokio::net::TcpListener;

use crate::store::{CounterStore, RevocationList};
use crate::token::TokenError;
use crate::verify::{VerifiedToken, Verifier};
pub use config::Config;

/// An upstream, ready to forward to.
#[derive(PartialEq)]
pub struct Upstream {
    /// The name in `[upstreams.<name>]`, shared with every request's
    /// observation (a metric label and audit field) rather than copied.
    pub name: Arc<str>,
    /// Base URL without a trailing slash.
    pub base: String,
    /// `base` split for the forwarder, once per config load.
    pub target: upstream_client::Target,
    pub header: HeaderName,
    /// The real credential, marked sensitive so it is never printed.
    pub credential: Option<HeaderValue>,
    /// `set_headers`, values marked sensitive like the credential.
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    /// `pass_headers`: billing headers forwarded as the client sent them.
    pub pass_headers: Vec<HeaderName>,
    /// Client headers never forwarded to this upstream, made from
    /// `header` and `set_headers`.
    pub dropped_headers: forward::DroppedHeaders,
    /// The shape of Till's own error answers for this upstream.
    pub api: config::Api,
    /// For `api = "mcp"`: the one path requests may go to.
    pub mcp_endpoint: Arc<str>,
    pub forward_auth: config::ForwardAuth,
}

/// Everything the request path needs, shared by all requests.
pub struct Inner {
    pub verifier: Verifier,
    /// Verified tokens keyed by their full text: equality on the whole token
    /// means no hash collision can ever pass an unverified token.
    pub cache: Cache<String, Arc<VerifiedToken>, TokenHash>,
    pub counters: Arc<dyn CounterStore>,
    pub revocations: Arc<dyn RevocationList>,
    /// Swapped whole by a reload ([`reload`]); read once per request.
    pub upstreams: reload::Upstreams,
    /// Forwards to upstreams ([`upstream_client`]).
    pub client: upstream_client::UpstreamClient,
    pub limits: config::Limits,
    pub idempotency: idempotency::Idempotency,
    /// Rate windows and concurrency caps: the counter store's shared ones
    /// (Redis), or in this process.
    pub windows: Arc<dyn crate::store::window::WindowStore>,
    pub admin_remote: bool,
    pub admin_hosts: Vec<String>,
    pub monitor: Arc<crate::monitor::Monitor>,
    pub clock: crate::clock::MonotonicClock,
    /// Bytes of request bodies that may be buffered at once
    /// (`limits.max_buffered_bytes`), shared by all requests.
    pub body_budget: Arc<tokio::sync::Semaphore>,
    /// Datalog runs (decisions the token's cache cannot answer) at once, on
    /// blocking threads: a flood of costly tokens queues here instead of
    /// holding the async workers that serve every other request.
    pub datalog_permits: Arc<tokio::sync::Semaphore>,
    /// Signs the revocation feed (`GET /revocations`); unset, no feed.
    pub feed_signer: std::sync::OnceLock<Arc<crate::token::keyset::Signer>>,
    /// Re-reads the config file for `POST /admin/reload`; unset, the proxy
    /// was not started from a file and cannot reload.
    pub reloader: std::sync::OnceLock<Arc<reload::Reloader>>,
}

/// Cheap-to-clone handle on the shared state.
#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// Installs the process-wide TLS crypto provider (ring) once, for the
/// upstream client and for reqwest (built without a default provider to
/// avoid compiling a second one).
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Verified-token cache budget, in bytes. Weighed, not counted: anyone
/// holding one token can mint any number of distinct valid children
/// offline, each up to 16 KiB. Each entry weighs an upper bound of its
/// memory, decision cache included (`till_core::verify::cache_weight`):
/// about 48 KiB for an 800-byte token, so some 5,000 such tokens stay
/// cached, and an agent's minted children can take no more than this.
const CACHE_BYTES: u64 = 256 << 20;

/// The token cache's hasher. Its key is a whole token, about a kilobyte,
/// hashed on every request: SipHash (std's default) was ≈1% of a request's
/// CPU. foldhash, seeded at random per process, is several times faster.
/// Flooding the cache with colliding keys would take valid tokens chosen
/// against a secret seed; only verified tokens are inserted.
pub type TokenHash = foldhash::quality::RandomState;

impl AppState {
    /// Builds the state from a validated config and resolved credentials,
    /// with monitoring limited to metrics (no audit file, no webhooks).
    pub fn new(
        cfg: &Config,
        credentials: &std::collections::BTreeMap<String, Option<String>>,
        verifier: Verifier,
        counters: Arc<dyn CounterStore>,
        revocations: Arc<dyn RevocationList>,
    ) -> Result<Self, config::ConfigError> {
        Self::with_monitor(
            cfg,
            credentials,
            verifier,
            counters,
            revocations,
            crate::monitor::Monitor::disabled(),
        )
    }

    /// Same as [`AppState::new`] with a configured [`crate::monitor::Monitor`].
    pub fn with_monitor(
        cfg: &Config,
        credentials: &std::collections::BTreeMap<String, Option<String>>,
        verifier: Verifier,
        counters: Arc<dyn CounterStore>,
        revocations: Arc<dyn RevocationList>,
        monitor: crate::monitor::Monitor,
    ) -> Result<Self, config::ConfigError> {
        let upstreams = reload::Upstreams::new(reload::build_upstreams(cfg, credentials)?);
        install_crypto();
        let idempotency = idempotency::Idempotency::for_store(
            counters.as_ref(),
            Duration::from_secs(cfg.limits.idempotency_window_secs),
        );
        let windows = counters
            .windows()
            .unwrap_or_else(|| Arc::new(crate::store::window::LocalWindows::default()));
        let mut monitor = monitor;
        if let Some(claims) = counters.alert_claims() {
            monitor.alerts.share_through(claims);
        }
        let client = upstream_client::UpstreamClient::new(
            Duration::from_secs(cfg.limits.connect_timeout_secs),
            Duration::from_secs(cfg.limits.idle_timeout_secs),
        )
        .map_err(|e| config::ConfigError {
            file: cfg.file.clone(),
            message: format!("cannot build the HTTP client: {e}"),
        })?;
        Ok(AppState(Arc::new(Inner {
            verifier,
            cache: Cache::builder()
                .max_capacity(CACHE_BYTES)
                .weigher(|k: &String, _| till_core::verify::cache_weight(k.len()))
                .build_with_hasher(TokenHash::default()),
            counters,
            revocations,
            upstreams,
            client,
            idempotency,
            windows,
            body_budget: Arc::new(tokio::sync::Semaphore::new(
                cfg.limits
                    .max_buffered_bytes
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            datalog_permits: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            limits: cfg.limits.clone(),
            admin_remote: cfg.danger_admin_remote,
            admin_hosts: cfg.admin_hosts.clone(),
            monitor: Arc::new(monitor),
            clock: crate::clock::MonotonicClock::default(),
            feed_signer: std::sync::OnceLock::new(),
            reloader: std::sync::OnceLock::new(),
        })))
    }

    /// Verifies a token, or returns the cached verification. Only successes
    /// are cached. Nothing is recorded about the token here: its blocks are
    /// recorded by the store when a request with it is allowed.
    pub fn verify_cached(&self, text: &str) -> Result<Arc<VerifiedToken>, TokenError> {
        if let Some(t) = self.cache.get(text).filter(|t| self.verifier.is_current(t)) {
            self.monitor.metrics.cache_hits.inc();
            return Ok(t);
        }
        self.monitor.metrics.cache_misses.inc();
        let t = Arc::new(self.verifier.verify_token(text)?);
        self.cache.insert(text.to_string(), t.clone());
        Ok(t)
    }
}

/// First path segments under which [`router`] has routes of two or more
/// segments. Keep in step with [`router`]: a request to `/{first}/...` with
/// any other first segment can only reach its proxy fallback.
const ROUTED_FIRST_SEGMENTS: &[&str] = &["admin", "auth", "dashboard", ".well-known"];

/// Whether a request to `path` can only reach [`router`]'s proxy fallback,
/// so [`server::serve`] may hand it to [`handler::proxy`] without the
/// router: its matching and boxed service calls were a measurable share of
/// a proxied request's CPU (benches/README.md, issue 15).
pub(crate) fn skips_router(path: &str) -> bool {
    let Some((first, _)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return false;
    };
    !first.is_empty() && !ROUTED_FIRST_SEGMENTS.contains(&first)
}

/// The app: health checks, admin API, and everything else proxied.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(handler::readyz))
        .route("/admin/revoke", post(admin::revoke))
        .route("/admin/reload", post(admin::reload))
        .route("/admin/revocations", get(admin::revocations))
        .route("/admin/usage", get(admin::usage))
        .route("/admin/usage/{id}", get(admin::usage_one))
        .route("/admin/decisions", get(admin::decisions))
        .route("/admin/alerts", get(admin::alerts))
        .route("/metrics", get(admin::metrics))
        .route("/revocations", get(admin::feed))
        .route("/.well-known/till-keys", get(admin::keys))
        .route("/auth/{*rest}", any(forward_auth::check))
        .route("/admin", any(admin::not_found))
        .route("/admin/{*rest}", any(admin::not_found))
        .merge(dashboard::routes())
        .fallback(handler::proxy)
        .with_state(state)
}

/// Serves `state` on `listener` (and the admin plane on `admin` instead,
/// when given) until `shutdown` resolves, then gives in-flight requests the
/// configured grace period to finish and flushes the counter store.
pub async fn run(
    listener: TcpListener,
    admin: Option<TcpListener>,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let l = &state.limits;
    let limits = server::ServerLimits {
        max_connections: l.max_connections,
        header_timeout: Duration::from_secs(l.header_timeout_secs.max(1)),
        max_header_bytes: l.max_header_bytes,
        max_headers: l.max_headers,
        grace: Duration::from_secs(l.shutdown_grace_secs),
    };
    let listeners = match admin {
        None => vec![(listener, server::Plane::All)],
        Some(a) => vec![(listener, server::Plane::Agents), (a, server::Plane::Admin)],
    };
    let result = server::serve(listeners, state.clone(), limits, shutdown).await;
    if let Err(e) = state.counters.flush().await {
        tracing::error!(error = %e, "final flush of the counter store failed");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::skips_router;

    #[test]
    fn only_paths_the_router_has_no_route_for_skip_it() {
        for p in [
            "/openai/v1/chat/completions",
            "/github/",
            "/revocations/x",
            "/healthz/",
            "/metrics/x",
        ] {
            assert!(skips_router(p), "{p}");
        }
        // Every route of `router`, and paths only the fallback's own error
        // answers (no service named) handle.
        for p in [
            "/healthz",
            "/readyz",
            "/metrics",
            "/revocations",
            "/.well-known/till-keys",
            "/admin",
            "/admin/revoke",
            "/admin/usage/abc",
            "/auth/openai/v1/models",
            "/dashboard",
            "/dashboard/",
            "/dashboard/app.js",
            "/openai",
            "/",
            "",
            "//x",
        ] {
            assert!(!skips_router(p), "{p}");
        }
    }
}
