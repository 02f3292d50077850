//! The proxy's state: activation counters and the revocation list.
//!
//! The request path only talks to the two traits here, so a Redis-backed
//! implementation (several proxies sharing state) can replace the embedded
//! one without touching it. Both traits return boxed futures to stay
//! object-safe (`Arc<dyn CounterStore>`).
//!
//! Counting protocol (ARCHITECTURE.md, "The counting protocol"): the caller
//! first decides with the current counts ([`CounterStore::peek`], nothing
//! created or changed); only a request that passes reserves. `reserve`
//! increments the counter of every block of the token and returns the
//! post-increment values; the caller re-checks the limits with them; on deny
//! it calls `release`; on allow it awaits `Reservation::durable` before
//! forwarding. Concurrent requests each see their own post-increment value,
//! so a limit can never be overshot. [`ReservationGuard`] releases a
//! reservation that is dropped before it was spent (a client that went away).

pub mod embedded;
pub mod migrate;
pub mod redis;
pub mod window;

use futures_util::future::BoxFuture;
use serde::Serialize;
use thiserror::Error;

pub use self::redis::RedisStore;
pub use embedded::EmbeddedStore;

/// Errors of the state stores. Every one of them makes the proxy answer 503
/// and forward nothing.
#[derive(Debug, Error, Clone)]
pub enum StoreError {
    #[error("cannot open the counter store at {path}: {message}")]
    Open { path: String, message: String },
    #[error("counter store I/O failed: {0}")]
    Io(String),
    #[error("counter store is unavailable after an earlier failure: {0}")]
    Failed(String),
    #[error("counter store is shutting down")]
    Closed,
    /// Not a fault: the token family already has as many tracked blocks as
    /// the store allows, and this request would add another.
    #[error("this token family already has {limit} tracked keys (limits.max_blocks_per_family)")]
    FamilyFull { limit: usize },
    /// Not a fault: a block's counter was retired after its token expired, so
    /// the block can never be used again (whatever the clock says now).
    #[error("this key expired and its use counter was retired")]
    Retired,
}

pub use till_core::CounterSpec;

/// Bytes of a block's label the usage view records (then `…`), as the
/// audit log keeps of each label. A label is whatever text a token holder
/// wrote, up to the token's 16 KiB, on each of up to
/// `limits.max_blocks_per_family` keys they mint: recorded whole, 1000 keys
/// made every dashboard poll and `GET /admin/usage` 13 MB.
pub const MAX_LABEL_BYTES: usize = crate::monitor::audit::MAX_FIELD_BYTES;

/// What the usage view records about a block.
impl From<&CounterSpec> for BlockMeta {
    fn from(spec: &CounterSpec) -> Self {
        BlockMeta {
            id: spec.id.clone(),
            family: spec.family.clone(),
            parent: spec.parent.clone(),
            index: spec.index,
            label: spec
                .label
                .as_deref()
                .map(|l| crate::monitor::audit::capped(l, MAX_LABEL_BYTES).into_owned()),
            limit: spec.limit,
            expires: spec.expires,
            rates: spec.rates.clone(),
            concurrency: spec.concurrency,
        }
    }
}

/// The result of [`CounterStore::reserve`].
pub struct Reservation {
    /// Post-increment value of each counter, in the order given.
    pub uses: Vec<u64>,
    /// Resolves once these counts are durable. Await it before forwarding.
    pub durable: BoxFuture<'static, Result<(), StoreError>>,
}

/// What the usage view shows for one counter.
#[derive(Clone, Debug, Serialize)]
pub struct CounterInfo {
    pub id: String,
    pub uses: u64,
    pub limit: Option<u64>,
    pub expires: Option<u64>,
    /// Seconds since the Unix epoch of the last reservation seen by this
    /// process, if any.
    pub last_use: Option<u64>,
}

/// What the proxy knows about a block, from the tokens it has seen. Used by
/// the usage view to group counters into families; never for decisions.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct BlockMeta {
    pub id: String,
    /// Revocation id of the authority block of the token family.
    pub family: String,
    /// Revocation id of the block before this one.
    pub parent: Option<String>,
    pub index: usize,
    pub label: Option<String>,
    pub limit: Option<u64>,
    pub expires: Option<u64>,
    /// Rate windows the block sets on itself (absent in metadata recorded
    /// before windows existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rates: Vec<crate::token::vocab::Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u64>,
}

/// Activation counters keyed by block revocation id.
pub trait CounterStore: Send + Sync + 'static {
    /// Current values, 0 for unknown ids; creates and changes nothing. The
    /// decision before reserving uses these.
    fn peek(&self, ids: &[String]) -> BoxFuture<'_, Result<Vec<u64>, StoreError>>;
    /// The counts this process saw last for `ids`, without asking the store,
    /// when it keeps such figures (a store across the network: one round
    /// trip saved per warm request); `None` when it does not, or does not
    /// know every id. They may be stale in either direction, so a caller
    /// only lets them *allow* a request, which then reserves and re-checks
    /// with exact post-increment counts, and reads [`CounterStore::peek`]
    /// before it denies on them.
    fn peek_cached(&self, _ids: &[String]) -> Option<Vec<u64>> {
        None
    }
    /// [`CounterStore::peek`] without a future, for a store that holds its
    /// counts in this process (exact, unlike [`CounterStore::peek_cached`],
    /// which such a store has no need of and leaves `None`); `None` when the
    /// store has to be asked.
    fn peek_now(&self, _ids: &[String]) -> Option<Result<Vec<u64>, StoreError>> {
        None
    }
    /// Atomically adds one to every counter and returns the new values.
    /// Counters and block metadata are created here, so only requests that
    /// passed the decision create state. Refused once [`CounterStore::flush`]
    /// has started (shutdown).
    fn reserve<'a>(
        &'a self,
        counters: &'a [CounterSpec],
    ) -> BoxFuture<'a, Result<Reservation, StoreError>>;
    /// Rolls back one reservation of each id (after a denial).
    fn release(&self, ids: &[String]) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Current values (0 for unknown ids).
    fn get(&self, ids: &[String]) -> BoxFuture<'_, Result<Vec<CounterInfo>, StoreError>>;
    /// Every live counter.
    fn list(&self) -> BoxFuture<'_, Result<Vec<CounterInfo>, StoreError>>;
    /// Makes exact values durable (graceful shutdown). From the moment it is
    /// called, `reserve` refuses: a reservation after the exact values were
    /// written could be lost by a crash.
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Whether the store can take reservations (for `/readyz`).
    fn healthy(&self) -> bool;
    /// Remembers block metadata (fire and forget, never waits on disk).
    fn register(&self, blocks: &[BlockMeta]);
    /// Every block registered so far.
    fn blocks(&self) -> BoxFuture<'_, Result<Vec<BlockMeta>, StoreError>>;
    /// Where `Idempotency-Key` claims live when every proxy using this
    /// store must see them (kept `window` seconds); `None`: in this process.
    fn idempotency(
        &self,
        _window: std::time::Duration,
    ) -> Option<std::sync::Arc<dyn crate::proxy::idempotency::IdempotencyStore>> {
        None
    }
    /// Where rate windows and concurrency caps live when every proxy using
    /// this store must share them; `None`: in this process
    /// ([`window::LocalWindows`]).
    fn windows(&self) -> Option<std::sync::Arc<dyn window::WindowStore>> {
        None
    }
    /// Where alerts are claimed so one event sends one alert for every
    /// proxy using this store; `None`: each process de-duplicates its own.
    fn alert_claims(&self) -> Option<std::sync::Arc<dyn crate::monitor::alerts::AlertClaims>> {
        None
    }
}

/// Revoked block ids.
pub trait RevocationList: Send + Sync + 'static {
    /// Index of the first revoked id among `ids`, if any. Called on every
    /// request: must be fast and must not block.
    fn first_revoked(&self, ids: &[String]) -> Result<Option<usize>, StoreError>;
    /// Revokes an id durably. Returns false if it already was.
    fn revoke(&self, id: &str) -> BoxFuture<'_, Result<bool, StoreError>>;
    /// All revoked ids with the time (Unix seconds) they were revoked.
    fn list(&self) -> BoxFuture<'_, Result<Vec<(String, u64)>, StoreError>>;
    /// Number of revoked ids.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A reservation not yet spent: dropping it releases the counts, so a
/// request abandoned between reserve and forward (the client went away, the
/// handler future was dropped) neither leaks nor double-spends a use. Call
/// [`ReservationGuard::spend`] when the request is forwarded.
pub struct ReservationGuard<I: AsRef<[String]> + Send + 'static = Vec<String>> {
    store: std::sync::Arc<dyn CounterStore>,
    /// `None` once spent or released. Any owner of the ids will do (the
    /// request path passes its verified token: no copy of the ids per
    /// request).
    ids: Option<I>,
}

impl<I: AsRef<[String]> + Send + 'static> ReservationGuard<I> {
    /// Guards a reservation of `ids` made on `store`.
    pub fn new(store: std::sync::Arc<dyn CounterStore>, ids: I) -> Self {
        ReservationGuard {
            store,
            ids: Some(ids),
        }
    }

    /// The use happened (the request was forwarded): keep the counts.
    pub fn spend(mut self) {
        self.ids = None;
    }

    /// Gives the reservation back now, waiting for the store.
    pub async fn release(mut self) -> Result<(), StoreError> {
        match self.ids.take() {
            Some(ids) => self.store.release(ids.as_ref()).await,
            None => Ok(()),
        }
    }
}

impl<I: AsRef<[String]> + Send + 'static> Drop for ReservationGuard<I> {
    fn drop(&mut self) {
        let Some(ids) = self.ids.take() else { return };
        let store = self.store.clone();
        // Drop cannot await: hand the release to the runtime. Without one
        // (a test tearing down), the embedded store has already released
        // by the time `release` returns its future.
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    if let Err(e) = store.release(ids.as_ref()).await {
                        tracing::error!(error = %e, "releasing an abandoned reservation failed");
                    }
                });
            }
            Err(_) => drop(store.release(ids.as_ref())),
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A block of the family `root` for the stores' tests: the authority block
/// when `parent` is `None`, else an attenuation block.
#[cfg(test)]
pub(crate) fn test_block(id: &str, parent: Option<&str>) -> CounterSpec {
    CounterSpec {
        family: "root".into(),
        parent: parent.map(str::to_string),
        index: usize::from(parent.is_some()),
        ..CounterSpec::standalone(id, None, None)
    }
}

/// For both stores' tests, on a store whose family bound is 4: twenty new
/// keys, each reserved and given back (refused on the re-check), leave no
/// block behind (they used to stay, filling the bound and locking unused
/// siblings out); a key given back and used again is recorded again.
#[cfg(test)]
async fn block_ids(s: &dyn CounterStore) -> Vec<String> {
    s.blocks()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect()
}

#[cfg(test)]
pub(crate) async fn check_refused_blocks_leave_no_trace(s: &dyn CounterStore) {
    let root = test_block("root", None);
    // An allowed request waits for its count to be durable before it is
    // forwarded: that is when its new block is recorded.
    s.reserve(&[root.clone(), test_block("used", Some("root"))])
        .await
        .unwrap()
        .durable
        .await
        .unwrap();
    for i in 0..20 {
        let kid = format!("refused{i}");
        s.reserve(&[root.clone(), test_block(&kid, Some("root"))])
            .await
            .unwrap();
        s.release(&["root".to_string(), kid]).await.unwrap();
    }
    let now = block_ids(s).await;
    assert!(now.iter().all(|i| !i.starts_with("refused")), "{now:?}");
    assert_eq!(s.peek(&["root".into()]).await.unwrap(), vec![1]);
    for kid in ["refused0", "sibling"] {
        s.reserve(&[root.clone(), test_block(kid, Some("root"))])
            .await
            .expect("the refused keys left no trace in the family's bound")
            .durable
            .await
            .unwrap();
    }
    let now = block_ids(s).await;
    assert!(now.contains(&"refused0".to_string()), "{now:?}");
    assert_eq!(s.peek(&["root".into()]).await.unwrap(), vec![3]);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Labels of up to 16 KiB on each of thousands of keys a token holder
    /// minted made the usage view (every dashboard poll) megabytes per
    /// key family (red team, wave 2, fourth pass): a recorded label keeps
    /// its first [`MAX_LABEL_BYTES`], cut on a character boundary.
    #[tokio::test]
    async fn regression_a_recorded_label_is_bounded() {
        let long = "é".repeat(6000);
        let spec = CounterSpec {
            label: Some(long.clone()),
            ..test_block("kid", Some("root"))
        };
        let meta = BlockMeta::from(&spec);
        let label = meta.label.unwrap();
        assert!(
            label.len() <= MAX_LABEL_BYTES + "…".len(),
            "{}",
            label.len()
        );
        assert!(label.ends_with('…') && long.starts_with(label.trim_end_matches('…')));
        let short = CounterSpec {
            label: Some("agent".into()),
            ..test_block("kid", Some("root"))
        };
        assert_eq!(BlockMeta::from(&short).label.as_deref(), Some("agent"));

        // What the store records, and the usage view shows.
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store
            .reserve(&[test_block("root", None), spec])
            .await
            .unwrap()
            .durable
            .await
            .unwrap();
        let blocks = store.blocks().await.unwrap();
        let kid = blocks.iter().find(|b| b.id == "kid").unwrap();
        assert!(kid.label.as_deref().unwrap().len() <= MAX_LABEL_BYTES + "…".len());
    }

    #[tokio::test]
    async fn a_dropped_reservation_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn CounterStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let spec = CounterSpec::standalone("a", Some(5), None);
        let ids = vec!["a".to_string()];
        // Spent: the count stays.
        store.reserve(std::slice::from_ref(&spec)).await.unwrap();
        ReservationGuard::new(store.clone(), ids.clone()).spend();
        // Dropped before it was spent (the handler future went away).
        store.reserve(std::slice::from_ref(&spec)).await.unwrap();
        drop(ReservationGuard::new(store.clone(), ids.clone()));
        // The release was handed to the runtime: let it run.
        for _ in 0..100 {
            if store.peek(&ids).await.unwrap() == vec![1] {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("count {:?}, expected 1", store.peek(&ids).await.unwrap());
    }
}
