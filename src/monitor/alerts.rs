//! Alerts: webhooks fired on usage thresholds, use of revoked or expired
//! tokens, and bursts of denials.
//!
//! Alerts are queued (bounded) and delivered by a background task with
//! retries and exponential backoff, never on the request path. A slow or
//! failing receiver cannot grow memory: when the queue is full, alerts are
//! dropped and counted (`till_alerts_dropped_total`). Each alert has a
//! deduplication key so the same event is not sent twice: claimed in this
//! process first (so a flood of one event costs nothing more), then, when
//! the proxies share a store, claimed there too ([`AlertClaims`]), so the
//! whole deployment sends one alert per event instead of one per replica.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use moka::sync::Cache;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::metrics::{KindLabels, Metrics};
use crate::proxy::config::CredentialSource;

/// Payload format of a webhook.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `{"kind", "message", "time", "family", "block", "labels", "details"}`
    #[default]
    Json,
    /// `{"text": message}`, accepted by Slack incoming webhooks.
    Slack,
}

/// One webhook receiver.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// A secret: Slack and most receivers put their token in the path, so
    /// whoever reads it can post to the channel. Print [`Webhook::redacted`].
    pub url: String,
    #[serde(default)]
    pub format: Format,
    /// Where the key that signs each delivery comes from; without it,
    /// deliveries are unsigned and a receiver cannot tell them from forgeries.
    #[serde(default)]
    pub secret: Option<CredentialSource>,
    /// The key itself, read at start ([`crate::proxy::Config::resolve_webhook_secrets`]).
    #[serde(skip)]
    pub signing_key: Option<Arc<[u8]>>,
}

impl Webhook {
    /// The URL as it may be shown in logs and errors: scheme, host and
    /// port, nothing of the path, query or user info that carry the secret.
    pub fn redacted(&self) -> String {
        redact_url(&self.url)
    }
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.redacted())
            .field("format", &self.format)
            .field("signed", &self.signing_key.is_some())
            .finish()
    }
}

/// Header carrying a delivery's signature.
pub const SIGNATURE_HEADER: &str = "till-signature";

/// Shortest webhook secret accepted, in bytes: HMAC-SHA256 is as strong as
/// its key, and a short one can be guessed offline from one delivery.
pub const MIN_SECRET_LEN: usize = 16;

/// The `Till-Signature` value for `body` sent at `unix` seconds:
/// `t=<unix>,v1=<hex HMAC-SHA256 of "<unix>.<body>">`. The time is signed
/// with the body, so a receiver that refuses old timestamps also refuses a
/// recorded delivery replayed later.
pub fn signature(key: &[u8], unix: u64, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(unix.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={unix},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// `scheme://host[:port]/…` of `url`, or a placeholder when it does not
/// parse (its text may still be a secret).
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("");
            match u.port() {
                Some(p) => format!("{}://{host}:{p}/…", u.scheme()),
                None => format!("{}://{host}/…", u.scheme()),
            }
        }
        Err(_) => "<unparsable url>".into(),
    }
}

/// Escapes the characters Slack's mrkdwn treats as control characters.
/// Alert text carries labels, paths and reasons chosen by whoever holds a
/// token; unescaped, `<!channel>` pings everyone and `<https://x|text>`
/// disguises a link.
pub fn slack_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

fn default_thresholds() -> Vec<f64> {
    vec![0.8, 1.0]
}
fn default_burst_count() -> u32 {
    20
}
fn default_burst_window() -> u64 {
    60
}

/// `[alerts]` in till.toml.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Fractions of a block's use limit that fire an alert when crossed.
    #[serde(default = "default_thresholds")]
    pub thresholds: Vec<f64>,
    /// Denials of one family within the window that make a burst.
    #[serde(default = "default_burst_count")]
    pub denial_burst_count: u32,
    #[serde(default = "default_burst_window")]
    pub denial_burst_window_secs: u64,
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            thresholds: default_thresholds(),
            denial_burst_count: default_burst_count(),
            denial_burst_window_secs: default_burst_window(),
            webhooks: Vec::new(),
        }
    }
}

/// One alert.
#[derive(Clone, Debug, Serialize)]
pub struct Alert {
    /// `usage_threshold`, `revoked_token_used`, `denial_burst`, `expired_token_used`,
    /// `family_too_large`, `rate_limited`.
    pub kind: &'static str,
    pub message: String,
    pub time: String,
    pub family: Option<String>,
    pub block: Option<String>,
    pub labels: Vec<String>,
    pub details: serde_json::Value,
}

/// Queue length before alerts are dropped.
const QUEUE: usize = 1024;
/// Alerts kept for the dashboard.
const HISTORY: usize = 200;
/// Delivery attempts per webhook.
const ATTEMPTS: u32 = 4;

struct Burst {
    start: Instant,
    count: u32,
    fired: bool,
}

/// How long a [`Alerts::fire_once`] key stays claimed.
const ONCE_TTL: Duration = Duration::from_secs(30 * 86400);
/// How long a [`Alerts::fire_recent`] key stays claimed.
const RECENT_TTL: Duration = Duration::from_secs(300);

/// Alert keys claimed once for every proxy of a deployment (a shared
/// store). The monitor knows nothing else about the store.
pub trait AlertClaims: Send + Sync + 'static {
    /// Claims `key` for `ttl`: true for the one caller, among all proxies,
    /// that claimed it first.
    fn claim(
        &self,
        key: &str,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<bool, crate::store::StoreError>>;
}

/// Where alerts go once claimed: the delivery queue and the history.
struct Sink {
    tx: Option<mpsc::Sender<Alert>>,
    history: Mutex<VecDeque<Alert>>,
    metrics: Arc<Metrics>,
}

/// The alert dispatcher.
pub struct Alerts {
    cfg: AlertConfig,
    sink: Arc<Sink>,
    once: Cache<String, ()>,
    recent: Cache<String, ()>,
    bursts: Cache<String, Arc<Mutex<Burst>>>,
    shared: Option<Arc<dyn AlertClaims>>,
    /// Serialises the first claim of a key ([`Alerts::claim_here`]).
    claiming: Mutex<()>,
}

impl Alerts {
    /// Starts the delivery task (only when webhooks are configured).
    pub fn start(cfg: AlertConfig, metrics: Arc<Metrics>) -> Self {
        let tx = if cfg.webhooks.is_empty() {
            None
        } else {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(deliver(cfg.webhooks.clone(), rx, metrics.clone()));
            Some(tx)
        };
        Alerts {
            sink: Arc::new(Sink {
                tx,
                history: Mutex::new(VecDeque::with_capacity(HISTORY)),
                metrics,
            }),
            once: Cache::builder()
                .max_capacity(200_000)
                .time_to_live(ONCE_TTL)
                .build(),
            recent: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(RECENT_TTL)
                .build(),
            bursts: Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(cfg.denial_burst_window_secs.max(1) * 2))
                .build(),
            cfg,
            shared: None,
            claiming: Mutex::new(()),
        }
    }

    /// De-duplicates alerts with every proxy using `claims` as well.
    pub fn share_through(&mut self, claims: Arc<dyn AlertClaims>) {
        self.shared = Some(claims);
    }

    pub fn thresholds(&self) -> &[f64] {
        &self.cfg.thresholds
    }

    /// Recent alerts, newest first.
    pub fn history(&self) -> Vec<Alert> {
        let h = self.sink.history.lock().unwrap_or_else(|p| p.into_inner());
        h.iter().rev().cloned().collect()
    }

    /// Fires the alert `a` builds unless one with `key` fired before (for good).
    pub fn fire_once(&self, key: String, a: impl FnOnce() -> Alert) {
        // Claimed atomically, and the alert is built only by the claimer:
        // past a threshold, every request of the family comes through here.
        if self.claim_here(&self.once, &key) {
            self.claim_and_emit(key, ONCE_TTL, a());
        }
    }

    /// [`Alerts::fire_once`] for one of many keys of a `group` (the blocks
    /// of a token family): at most one of the group fires in five minutes;
    /// a key held back then is not sent later.
    pub fn fire_once_per_family(&self, key: String, group: String, a: impl FnOnce() -> Alert) {
        if self.once.contains_key(&key) || !self.claim_here(&self.recent, &group) {
            return;
        }
        self.fire_once(key, a);
    }

    /// Fires the alert `a` builds unless an alert with `key` fired in the
    /// last five minutes.
    pub fn fire_recent(&self, key: String, a: impl FnOnce() -> Alert) {
        if self.claim_here(&self.recent, &key) {
            self.claim_and_emit(key, RECENT_TTL, a());
        }
    }

    /// True for exactly one caller per `key` while it stays in `cache`.
    /// The cache's own entry API let two concurrent callers both see a
    /// fresh entry (two `rate_limited` alerts from one burst of refusals),
    /// so the insert is serialised here; the lock is taken only by callers
    /// that found no entry, i.e. about once per alert.
    fn claim_here(&self, cache: &Cache<String, ()>, key: &str) -> bool {
        if cache.contains_key(key) {
            return false;
        }
        let _one = self.claiming.lock().unwrap_or_else(|p| p.into_inner());
        if cache.contains_key(key) {
            return false;
        }
        cache.insert(key.to_string(), ());
        true
    }

    /// Sends `a`, after claiming `key` in the shared store if there is one.
    /// The claim is a round trip, so it runs off the request path; if the
    /// store cannot answer, the alert is sent anyway: a duplicate alert is
    /// better than a lost one.
    fn claim_and_emit(&self, key: String, ttl: Duration, a: Alert) {
        let (Some(shared), Ok(rt)) = (&self.shared, tokio::runtime::Handle::try_current()) else {
            self.sink.emit(a);
            return;
        };
        let claim = shared.claim(&key, ttl);
        let sink = self.sink.clone();
        rt.spawn(async move {
            match claim.await {
                Ok(true) => sink.emit(a),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot de-duplicate an alert with the other proxies; sending it anyway");
                    sink.emit(a);
                }
            }
        });
    }

    /// Counts a denial for `family`; returns true when this one makes a burst
    /// (once per window).
    pub fn count_denial(&self, family: &str) -> Option<u32> {
        let window = Duration::from_secs(self.cfg.denial_burst_window_secs.max(1));
        let b = self.bursts.get_with(family.to_string(), || {
            Arc::new(Mutex::new(Burst {
                start: Instant::now(),
                count: 0,
                fired: false,
            }))
        });
        let mut b = b.lock().unwrap_or_else(|p| p.into_inner());
        if b.start.elapsed() > window {
            *b = Burst {
                start: Instant::now(),
                count: 0,
                fired: false,
            };
        }
        b.count += 1;
        if !b.fired && b.count >= self.cfg.denial_burst_count {
            b.fired = true;
            return Some(b.count);
        }
        None
    }
}

impl Sink {
    fn emit(&self, a: Alert) {
        tracing::warn!(kind = a.kind, message = %a.message, "alert");
        {
            let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(a.clone());
        }
        if let Some(tx) = &self.tx
            && tx.try_send(a).is_err()
        {
            self.metrics.alerts_dropped.inc();
        }
    }
}

async fn deliver(hooks: Vec<Webhook>, mut rx: mpsc::Receiver<Alert>, metrics: Arc<Metrics>) {
    crate::proxy::install_crypto();
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the alert HTTP client; alerts disabled");
            return;
        }
    };
    while let Some(a) = rx.recv().await {
        for h in &hooks {
            let webhook = h.redacted();
            let body = match h.format {
                Format::Json => serde_json::to_string(&a),
                Format::Slack => serde_json::to_string(&serde_json::json!({
                    "text": format!(":rotating_light: Till: {}", slack_escape(&a.message))
                })),
            }
            .unwrap_or_default();
            let labels = KindLabels {
                kind: a.kind.to_string(),
            };
            let mut delivered = false;
            for attempt in 0..ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                }
                let mut req = client
                    .post(&h.url)
                    .header("content-type", "application/json");
                // Signed per attempt: a retry carries a fresh time, so
                // receivers can keep their tolerance for old times short.
                if let Some(key) = &h.signing_key {
                    let now = crate::store::now_unix();
                    req = req.header(SIGNATURE_HEADER, signature(key, now, body.as_bytes()));
                }
                let r = req.body(body.clone()).send().await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        delivered = true;
                        break;
                    }
                    Ok(r) => {
                        tracing::warn!(%webhook, status = %r.status(), "alert webhook refused the alert")
                    }
                    // reqwest's error text names the full URL, secret included.
                    Err(e) => {
                        tracing::warn!(%webhook, error = %e.without_url(), "alert webhook unreachable")
                    }
                }
            }
            if delivered {
                metrics.alerts_sent.get_or_create(&labels).inc();
            } else {
                metrics.alerts_failed.get_or_create(&labels).inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a burst of refusals raised two `rate_limited` alerts.
    #[test]
    fn concurrent_callers_raise_one_alert_per_key() {
        for _ in 0..20 {
            let alerts = Arc::new(Alerts::start(
                AlertConfig::default(),
                Arc::new(Metrics::new()),
            ));
            let gate = Arc::new(std::sync::Barrier::new(8));
            let threads: Vec<_> = (0..8)
                .map(|i| {
                    let (alerts, gate) = (alerts.clone(), gate.clone());
                    std::thread::spawn(move || {
                        gate.wait();
                        alerts.fire_recent("rate:f".into(), || Alert {
                            kind: "rate_limited",
                            message: format!("from thread {i}"),
                            time: String::new(),
                            family: None,
                            block: None,
                            labels: Vec::new(),
                            details: serde_json::Value::Null,
                        });
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_eq!(alerts.history().len(), 1);
        }
    }

    #[test]
    fn slack_control_characters_are_escaped() {
        assert_eq!(
            slack_escape("<!channel> <https://evil|click> & co"),
            "&lt;!channel&gt; &lt;https://evil|click&gt; &amp; co"
        );
    }

    #[test]
    fn redacted_webhook_urls_keep_only_scheme_host_and_port() {
        let h = Webhook {
            url: "https://user:pw@hooks.slack.com/services/T0/B0/s3cret?x=s3cret#s3cret".into(),
            format: Format::Slack,
            secret: None,
            signing_key: Some(Arc::from(&b"s3cret-signing-key"[..])),
        };
        assert_eq!(h.redacted(), "https://hooks.slack.com/…");
        assert!(!format!("{h:?}").contains("s3cret"));
        assert_eq!(
            redact_url("http://127.0.0.1:9/hook/s3cret"),
            "http://127.0.0.1:9/…"
        );
        assert_eq!(redact_url("hooks.slack.com/s3cret"), "<unparsable url>");
    }

    /// The expected value comes from Python's `hmac` module, the check
    /// README.md shows receivers, so the two cannot drift apart.
    #[test]
    fn signatures_are_hmac_sha256_of_time_dot_body() {
        assert_eq!(
            signature(b"whsec-test-0123456789", 1700000000, br#"{"kind":"x"}"#),
            "t=1700000000,v1=c9f63f70845fa8c7a553e22edb9b1e1a50b723bcda598b814548535013f3e294"
        );
    }
}
