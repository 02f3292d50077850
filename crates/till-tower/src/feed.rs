//! The revocation feed the layer follows: fetched from a URL (a Till
//! proxy's `/revocations`) or read from a file, verified (signature, key
//! set, age), and swapped in whole; and the background task that does it.
//!
//! Fail closed: requests are refused while the newest accepted feed is
//! older than `max_feed_age`, so an attacker who cuts the service off from
//! the proxy cannot keep a revoked key working for longer than that.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use till_core::{Feed, KeysDocument, KeysError, PublicKeySet, Verifier};
use tokio::task::JoinHandle;

/// Where the signed revocation feed comes from.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum FeedSource {
    /// A URL answering the feed, e.g. `http://till:8080/revocations`.
    Url(String),
    /// A file holding the feed (written by something else, e.g. a sidecar
    /// that copies it from the proxy); read again on every refresh.
    File(PathBuf),
}

/// Largest feed or key set accepted, so a hostile or broken server cannot
/// exhaust memory (a revoked id is 64 hex characters: ~400,000 ids).
pub(crate) const MAX_DOCUMENT_BYTES: usize = 32 << 20;

/// The revocation list in force.
pub(crate) struct Current {
    pub revoked: HashSet<String>,
    pub version: u64,
    pub issued_at: u64,
}

/// What the refresh task shares with the requests: the feed in force and
/// the figures the metrics show.
#[derive(Default)]
pub(crate) struct FeedState {
    current: RwLock<Option<Arc<Current>>>,
    refreshes: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl FeedState {
    pub fn current(&self) -> Option<Arc<Current>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn install(&self, c: Current) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(c));
    }

    fn failed(&self, why: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What one refresh needs.
pub(crate) struct Refresher {
    pub source: FeedSource,
    pub keys_url: Option<String>,
    pub every: Duration,
    pub max_age: Duration,
    pub client: reqwest::Client,
    pub verifier: Verifier,
    pub state: Arc<FeedState>,
    /// The keys trusted so far: the configured ones, then each key set
    /// followed from them (so a retired key stays retired).
    pub trusted: PublicKeySet,
    /// `issued_at` of the newest key set document followed. A document is
    /// signed on its own, not by the feed that carries it, so whoever
    /// carries the feed (the network between the service and the proxy)
    /// could swap in an older one, from before `till key retire --after`,
    /// and cancel the scheduled retirement; or strip it and keep every
    /// later retirement from ever arriving.
    pub keys_seen: Option<u64>,
}

impl Refresher {
    pub fn spawn(mut self) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                match self.refresh().await {
                    Ok(()) => {
                        self.state.refreshes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(why) => {
                        tracing::warn!(error = %why, "till-tower: revocation feed refresh failed");
                        self.state.failed(why);
                    }
                }
                tokio::time::sleep(self.every).await;
            }
        })
    }

    async fn refresh(&mut self) -> Result<(), String> {
        let max_age = self.max_age.as_secs();
        if let Some(url) = self.keys_url.clone() {
            let text = self.fetch_url(&url).await?;
            let doc: KeysDocument = serde_json::from_str(&text)
                .map_err(|e| format!("{url}: {}", KeysError::Json(e.to_string())))?;
            self.not_older(doc.issued_at)
                .map_err(|e| format!("{url}: {e}"))?;
            let set = doc
                .follow(&self.trusted, now_unix(), max_age)
                .map_err(|e| format!("{url}: {e}"))?;
            self.follow(set, doc.issued_at);
        }
        let text = match &self.source {
            FeedSource::Url(url) => self.fetch_url(&url.clone()).await?,
            FeedSource::File(path) => read_file(path).await?,
        };
        let (feed, set) = Feed::verify_with(&text, &self.trusted, now_unix(), max_age)
            .map_err(|e| e.to_string())?;
        match &feed.keys {
            Some(doc) => self.not_older(doc.issued_at)?,
            // The proxy's feed always carries its key set. One without it
            // is taken only while none was ever seen (a proxy from before
            // rotations), or when the set comes from `keys_url`.
            None if self.keys_seen.is_some() && self.keys_url.is_none() => {
                return Err(
                    "refused a revocation feed without its key set: the feeds before it carried one, and without it a key retirement would never reach this service (was the feed altered on the way?)".into(),
                );
            }
            None => {}
        }
        let feed_keys_at = feed.keys.as_ref().map(|d| d.issued_at);
        let now = now_unix();
        if feed.issued_at > now.saturating_add(max_age) {
            // Its age would read 0 for that long: a proxy clock far ahead
            // must not stretch how long the service runs without a feed.
            return Err(format!(
                "refused a revocation feed issued {} s in the future, more than the allowed {max_age} s; check the clocks of the proxy and this service",
                feed.issued_at - now
            ));
        }
        if let Some(old) = self.state.current()
            && (feed.version < old.version
                || (feed.version == old.version && feed.issued_at < old.issued_at))
        {
            // Revocations are never undone: an older list, even genuinely
            // signed, would bring revoked keys back (a replay). A list with
            // more ids is newer whatever its time says (the list only
            // grows): after the proxy's clock was stepped back between two
            // runs, its new revocations must still get through. It is
            // installed with its own, earlier, time, so it goes stale
            // sooner, never later.
            return Err(format!(
                "refused a revocation feed older than the one in force (version {} issued at {}, have version {} issued at {})",
                feed.version, feed.issued_at, old.version, old.issued_at
            ));
        }
        // Only a feed that is taken moves the key set on: a refused one
        // (older, from the future) must not change what is trusted.
        match feed_keys_at {
            Some(at) => self.follow(set, at),
            None => self.trust(set),
        }
        self.state.install(Current {
            revoked: feed.ids.into_iter().collect(),
            version: feed.version,
            issued_at: feed.issued_at,
        });
        Ok(())
    }

    /// Refuses a key set document older than the newest one followed, or
    /// dated further ahead than the feed may be: followed, it would make
    /// every document until its date look older, and the feed go stale.
    fn not_older(&self, issued_at: u64) -> Result<(), String> {
        let max_age = self.max_age.as_secs();
        let now = now_unix();
        if issued_at > now.saturating_add(max_age) {
            return Err(format!(
                "refused a key set document issued {} s in the future, more than the allowed {max_age} s; check the clocks of the proxy and this service",
                issued_at - now
            ));
        }
        match self.keys_seen {
            Some(seen) if issued_at < seen => Err(format!(
                "refused a key set document issued at {issued_at}, older than the one already followed (issued at {seen}): an older document could cancel a scheduled key retirement (a replay?)"
            )),
            _ => Ok(()),
        }
    }

    fn follow(&mut self, set: PublicKeySet, issued_at: u64) {
        self.keys_seen = Some(self.keys_seen.map_or(issued_at, |s| s.max(issued_at)));
        self.trust(set);
    }

    fn trust(&mut self, set: PublicKeySet) {
        if self.verifier.keys().replace(set.clone()) {
            tracing::info!("till-tower: root key set changed");
        }
        self.trusted = set;
    }

    async fn fetch_url(&self, url: &str) -> Result<String, String> {
        let mut resp = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: answered {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: {e}"))? {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(format!("{url}: larger than {MAX_DOCUMENT_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        String::from_utf8(body).map_err(|_| format!("{url}: not UTF-8"))
    }
}

async fn read_file(path: &std::path::Path) -> Result<String, String> {
    // A regular file within the bound, checked on the open file: a symlink
    // to `/dev/zero` was read until memory ran out, a FIFO hung the refresh.
    let owned = path.to_path_buf();
    let bytes = tokio::task::spawn_blocking(move || {
        till_core::files::read_regular(&owned, MAX_DOCUMENT_BYTES as u64)
    })
    .await
    .map_err(|e| format!("{}: {e}", path.display()))?
    .map_err(|e| format!("{}: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8", path.display()))
}

/// Owns the background refresh: dropping it stops the task, after which
/// the feed ages and the layer refuses requests once it is older than
/// `max_feed_age` (fail closed). Also the layer's metrics.
pub struct TillHandle {
    pub(crate) task: JoinHandle<()>,
    pub(crate) state: Arc<FeedState>,
    pub(crate) max_age: Duration,
}

impl Drop for TillHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TillHandle {
    /// Seconds since the feed in force was issued; `None` before the first
    /// feed is accepted.
    pub fn feed_age_seconds(&self) -> Option<u64> {
        self.state
            .current()
            .map(|c| now_unix().saturating_sub(c.issued_at))
    }

    /// Version of the feed in force (the number of revoked ids).
    pub fn feed_version(&self) -> Option<u64> {
        self.state.current().map(|c| c.version)
    }

    /// Whether requests are being refused for want of a fresh feed.
    pub fn feed_stale(&self) -> bool {
        self.feed_age_seconds()
            .is_none_or(|a| a > self.max_age.as_secs())
    }

    /// Refreshes that failed (unreachable, refused signature, stale...).
    pub fn refresh_failures(&self) -> u64 {
        self.state.failures.load(Ordering::Relaxed)
    }

    /// Why the last failed refresh failed.
    pub fn last_refresh_error(&self) -> Option<String> {
        self.state
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The metrics in the Prometheus text format, for a `/metrics` route.
    /// Before any feed is accepted the age is `+Inf` and the version `-1`.
    pub fn render_prometheus(&self) -> String {
        let age = self
            .feed_age_seconds()
            .map_or_else(|| "+Inf".to_string(), |a| a.to_string());
        let version = self
            .feed_version()
            .map_or_else(|| "-1".to_string(), |v| v.to_string());
        format!(
            "# HELP till_feed_age_seconds Age of the revocation feed in force (requests are refused past the maximum).\n\
             # TYPE till_feed_age_seconds gauge\n\
             till_feed_age_seconds {age}\n\
             # HELP till_feed_max_age_seconds Oldest feed the layer accepts.\n\
             # TYPE till_feed_max_age_seconds gauge\n\
             till_feed_max_age_seconds {}\n\
             # HELP till_feed_version Version (number of revoked ids) of the revocation feed in force.\n\
             # TYPE till_feed_version gauge\n\
             till_feed_version {version}\n\
             # HELP till_feed_stale Whether requests are refused for want of a fresh feed.\n\
             # TYPE till_feed_stale gauge\n\
             till_feed_stale {}\n\
             # HELP till_feed_refreshes_total Feed refreshes accepted.\n\
             # TYPE till_feed_refreshes_total counter\n\
             till_feed_refreshes_total {}\n\
             # HELP till_feed_refresh_failures_total Feed refreshes that failed.\n\
             # TYPE till_feed_refresh_failures_total counter\n\
             till_feed_refresh_failures_total {}\n",
            self.max_age.as_secs(),
            u8::from(self.feed_stale()),
            self.state.refreshes.load(Ordering::Relaxed),
            self.refresh_failures(),
        )
    }
}
