//! The proxy's state: activation counters and the revocation list.
//!
//! The request path only talks to the two traits here, so a Redis-backed
//! implementation (several proxies sharing state) can replace the embedded
//! one without touching it. Both traits return boxed futures to stay
//! object-safe (`Arc<dyn CounterStore>`).
//!
//! Counting protocol (design.md §3): `reserve` increments the counter of
//! every block of the token and returns the post-increment values; the caller
//! authorizes with them; on deny it calls `release`; on allow it awaits
//! `Reservation::durable` before forwarding. Concurrent requests each see
//! their own post-increment value, so a limit can never be overshot.

pub mod embedded;

use futures_util::future::BoxFuture;
use serde::Serialize;
use thiserror::Error;

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
}

/// One counter to reserve: a block's revocation id and what the store may
/// use to size its durability lease and its retention.
#[derive(Clone, Debug)]
pub struct CounterSpec {
    /// Hex revocation id of the block.
    pub id: String,
    /// The block's effective use limit, when it has one.
    pub limit: Option<u64>,
    /// Seconds since the Unix epoch after which the token cannot be valid.
    pub expires: Option<u64>,
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
}

/// Activation counters keyed by block revocation id.
pub trait CounterStore: Send + Sync + 'static {
    /// Atomically adds one to every counter and returns the new values.
    fn reserve(&self, counters: &[CounterSpec]) -> BoxFuture<'_, Result<Reservation, StoreError>>;
    /// Rolls back one reservation of each id (after a denial).
    fn release(&self, ids: &[String]) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Current values (0 for unknown ids).
    fn get(&self, ids: &[String]) -> BoxFuture<'_, Result<Vec<CounterInfo>, StoreError>>;
    /// Every live counter.
    fn list(&self) -> BoxFuture<'_, Result<Vec<CounterInfo>, StoreError>>;
    /// Makes exact values durable (graceful shutdown).
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Whether the store can take reservations (for `/readyz`).
    fn healthy(&self) -> bool;
    /// Remembers block metadata (fire and forget, never waits on disk).
    fn register(&self, blocks: &[BlockMeta]);
    /// Every block registered so far.
    fn blocks(&self) -> BoxFuture<'_, Result<Vec<BlockMeta>, StoreError>>;
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

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
