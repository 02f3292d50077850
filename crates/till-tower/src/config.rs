//! The layer's configuration: [`TillLayer::builder`] and its choices.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use till_core::{Policies, PublicKeySet, RootKeys, Verifier};

use crate::TillHandle;
use crate::feed::{FeedSource, FeedState, Refresher};
use crate::layer::{Shared, TillLayer};
use crate::remote::Remote;

/// What the layer does with tokens that carry use limits, which it cannot
/// count by itself.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum UseLimits {
    /// Refuse every token that carries a use limit (403
    /// `use_limits_unenforced`). The default: a limit that is not enforced
    /// would silently turn a 10-use key into an unlimited one.
    #[default]
    Deny,
    /// Accept such tokens and judge every request as if it were the
    /// token's first use: **the limits are not enforced at all**. Only for
    /// services where another component counts, or where a use limit does
    /// not matter; the name says so on purpose.
    DangerIgnoreUseLimits,
    /// Ask a Till proxy to count: every request that passes the local
    /// checks is checked again (and counted) by the proxy's forward-auth
    /// endpoint, which answers 2xx to allow, 429 when the token is used up.
    Remote {
        /// The proxy's forward-auth URL for this service,
        /// `http://till:8080/auth/<service>`; the proxy must have an
        /// upstream of that name.
        check_url: String,
        /// The proxy's `forward_auth_secret` for that upstream, if it has
        /// one (sent as `x-till-gateway-secret`).
        gateway_secret: Option<String>,
    },
}

/// Never shows the gateway secret.
impl std::fmt::Debug for UseLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UseLimits::Deny => f.write_str("Deny"),
            UseLimits::DangerIgnoreUseLimits => f.write_str("DangerIgnoreUseLimits"),
            UseLimits::Remote {
                check_url,
                gateway_secret,
            } => f
                .debug_struct("Remote")
                .field("check_url", check_url)
                .field(
                    "gateway_secret",
                    &gateway_secret.as_ref().map(|_| "<redacted>"),
                )
                .finish(),
        }
    }
}

/// Why [`Builder::build`] refused a configuration.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BuildError {
    /// No root public key was given.
    #[error(
        "no root public key: give the installation's key (`till pubkey`, or `till pubkey --all` after a rotation)"
    )]
    NoKey,
    /// A root public key did not parse.
    #[error("root public key {given:?} is not valid: {reason}")]
    Key {
        /// The key as given.
        given: String,
        /// Why it was refused.
        reason: String,
    },
    /// No feed source was given.
    #[error("no revocation feed: give its URL (a Till proxy's /revocations) or a file")]
    NoFeed,
    /// A duration is zero, or the refresh interval is not shorter than the
    /// maximum feed age (the feed would go stale between refreshes).
    #[error("{0}")]
    Durations(String),
    /// `build` was called outside a Tokio runtime, which the refresh task
    /// needs.
    #[error(
        "TillLayer::builder(..).build() must run inside a Tokio runtime (it spawns the feed refresh task)"
    )]
    NoRuntime,
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Client(String),
}

/// Builds a [`TillLayer`] and the [`TillHandle`] that owns its refresh
/// task. See [`TillLayer::builder`].
#[must_use]
pub struct Builder {
    keys: PublicKeySet,
    key_errors: Vec<BuildError>,
    feed: Option<FeedSource>,
    keys_url: Option<String>,
    max_feed_age: Duration,
    refresh_every: Duration,
    service: String,
    use_limits: UseLimits,
    policies: Option<Policies>,
    max_body_bytes: usize,
    timeout: Duration,
}

impl TillLayer {
    /// Starts a configuration for the service named `service` (the
    /// `service(...)` fact tokens are checked against). Defaults: maximum
    /// feed age 60 s, refresh every 10 s, [`UseLimits::Deny`], the default
    /// policy, JSON bodies up to 1 MiB read for their `model`, 5 s timeout
    /// on every fetch.
    pub fn builder(service: impl Into<String>) -> Builder {
        Builder {
            keys: PublicKeySet::default(),
            key_errors: Vec::new(),
            feed: None,
            keys_url: None,
            max_feed_age: Duration::from_secs(60),
            refresh_every: Duration::from_secs(10),
            service: service.into(),
            use_limits: UseLimits::Deny,
            policies: None,
            max_body_bytes: 1 << 20,
            timeout: Duration::from_secs(5),
        }
    }
}

impl Builder {
    /// Trusts a root public key, as `till pubkey` prints it
    /// (`ed25519/<hex>`), or `ID=ed25519/<hex>` as `till pubkey --all`
    /// prints each key of a rotated set. Call once per key.
    pub fn public_key(mut self, key: &str) -> Self {
        if let Err(e) = self.keys.add_flag(key) {
            self.key_errors.push(BuildError::Key {
                given: key.chars().take(100).collect(),
                reason: e.to_string(),
            });
        }
        self
    }

    /// Trusts a set of root keys.
    pub fn public_keys(mut self, keys: PublicKeySet) -> Self {
        self.keys = keys;
        self
    }

    /// Where the signed revocation feed comes from (required).
    pub fn feed(mut self, source: FeedSource) -> Self {
        self.feed = Some(source);
        self
    }

    /// Also follows the proxy's `/.well-known/till-keys` on every refresh.
    /// The feed carries the same signed key set, so this is only needed
    /// when the feed comes from a file that lags behind.
    pub fn keys_url(mut self, url: impl Into<String>) -> Self {
        self.keys_url = Some(url.into());
        self
    }

    /// Requests are refused (503) while the newest accepted feed is older
    /// than this. It bounds how long a revocation can go unseen.
    pub fn max_feed_age(mut self, d: Duration) -> Self {
        self.max_feed_age = d;
        self
    }

    /// How often the feed (and key set) is fetched. A revocation reaches
    /// the service within this interval while the proxy is reachable.
    pub fn refresh_every(mut self, d: Duration) -> Self {
        self.refresh_every = d;
        self
    }

    /// What to do with tokens carrying use limits.
    pub fn use_limits(mut self, u: UseLimits) -> Self {
        self.use_limits = u;
        self
    }

    /// The authorizer's policies (default: Till's default policy).
    pub fn policies(mut self, p: Policies) -> Self {
        self.policies = Some(p);
        self
    }

    /// Largest JSON body read for its `model` (larger: 413).
    pub fn max_body_bytes(mut self, n: usize) -> Self {
        self.max_body_bytes = n;
        self
    }

    /// Timeout of each feed, key set or remote-count request.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Checks the configuration and starts the refresh task. Must run
    /// inside a Tokio runtime. Requests are refused (503) until the first
    /// feed is accepted.
    pub fn build(mut self) -> Result<(TillLayer, TillHandle), BuildError> {
        if let Some(e) = self.key_errors.drain(..).next() {
            return Err(e);
        }
        if self.keys.is_empty() {
            return Err(BuildError::NoKey);
        }
        let source = self.feed.take().ok_or(BuildError::NoFeed)?;
        if self.refresh_every.is_zero() || self.max_feed_age.as_secs() == 0 {
            return Err(BuildError::Durations(
                "refresh_every must be above zero and max_feed_age at least one second".into(),
            ));
        }
        if self.refresh_every >= self.max_feed_age {
            return Err(BuildError::Durations(format!(
                "refresh_every ({:?}) must be shorter than max_feed_age ({:?}), or the feed goes stale between refreshes and every request is refused",
                self.refresh_every, self.max_feed_age
            )));
        }
        tokio::runtime::Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
        // https needs a rustls provider; the application may have set one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(self.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| BuildError::Client(e.to_string()))?;
        if matches!(self.use_limits, UseLimits::DangerIgnoreUseLimits) {
            tracing::warn!(
                service = %self.service,
                "till-tower: use limits are NOT enforced (UseLimits::DangerIgnoreUseLimits): a token's use limit does not limit its uses at this service"
            );
        }
        let verifier = Verifier::with_keys(
            RootKeys::new(self.keys.clone()),
            self.policies.unwrap_or_else(Policies::default_policy),
        );
        let state = Arc::new(FeedState::default());
        let remote = match &self.use_limits {
            UseLimits::Remote {
                check_url,
                gateway_secret,
            } => Some(Remote {
                url: check_url.clone(),
                secret: gateway_secret.clone(),
                client: client.clone(),
            }),
            _ => None,
        };
        let task = Refresher {
            source,
            keys_url: self.keys_url,
            every: self.refresh_every,
            max_age: self.max_feed_age,
            client,
            verifier: verifier.clone(),
            state: state.clone(),
            trusted: self.keys,
            keys_seen: None,
        }
        .spawn();
        let shared = Arc::new(Shared {
            verifier,
            service: self.service,
            use_limits: self.use_limits,
            remote,
            feed: state.clone(),
            max_feed_age: self.max_feed_age,
            refresh_every: self.refresh_every,
            max_body_bytes: self.max_body_bytes,
            cache: moka::sync::Cache::builder()
                .max_capacity(crate::layer::CACHE_BYTES)
                .weigher(|k: &String, _| till_core::verify::cache_weight(k.len()))
                .build(),
        });
        Ok((
            TillLayer { shared },
            TillHandle {
                task,
                state,
                max_age: self.max_feed_age,
            },
        ))
    }
}
