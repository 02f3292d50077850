//! The default state store: counters and revocations in one
//! [redb](https://docs.rs/redb) file, with group commit and durability leases.
//!
//! Why redb: it is a well-kept, pure-Rust, embedded ACID key-value store
//! with copy-on-write B-trees and checksummed commits, so a torn write or a
//! corrupted file is detected on open instead of silently read as zero, and
//! it needs no server (the operator's one-command start). Each commit with
//! `Durability::Immediate` is fsynced before it returns.
//!
//! How counting stays both exact and cheap (design.md §3):
//! * Counts are exact in memory, under one `std::sync::Mutex` (a std mutex,
//!   not tokio's, because the critical section is a few hash-map updates and
//!   never awaits).
//! * What is persisted is a **high-water mark** per counter, at least the
//!   number of uses ever granted. A reservation that stays under its
//!   counter's durable mark needs no disk write at all. One that crosses it
//!   asks for a new mark = count + lease, and waits for the next commit.
//! * One writer thread commits every mark requested since its last commit
//!   in a single transaction (group commit: one fsync for many requests).
//! * The lease is at most 1/8 of the remaining budget (capped), so a block
//!   with 5 uses left has no lease and each of its uses is committed. A
//!   crash can only over-count by the lease, i.e. err towards deny; it can
//!   never grant an extra use. A graceful shutdown writes exact values.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::window::{LocalWindows, SAVE_EVERY, WindowStore};
use super::{
    BlockMeta, CounterInfo, CounterSpec, CounterStore, Reservation, RevocationList, StoreError,
    now_unix,
};

mod snapshot;

/// id → (durable mark, expiry in Unix seconds or 0 for none).
/// redb's page cache (see `open_file`).
const REDB_CACHE_BYTES: usize = 32 << 20;
const COUNTERS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("counters");
/// id → JSON of [`BlockMeta`].
const BLOCKS: TableDefinition<&str, &str> = TableDefinition::new("blocks");
/// id → revocation time (Unix seconds).
const REVOKED: TableDefinition<&str, u64> = TableDefinition::new("revoked");
/// id → time (Unix seconds) its counter was garbage-collected. A retired
/// block is refused for good: if the clock that judged it expired was wrong
/// (ahead), forgetting its count would otherwise give it a fresh budget.
const RETIRED: TableDefinition<&str, u64> = TableDefinition::new("retired");
/// Retired id → its token family, when the block's metadata was known at
/// retirement: a move to Redis must file the id under its real family,
/// where the reserve script looks (stores written before this table
/// existed have no rows; their export says "family unknown").
const RETIRED_FAMILY: TableDefinition<&str, &str> = TableDefinition::new("retired_family");

/// File name of the store inside the state directory.
pub const STORE_FILE: &str = "state.redb";
/// The rate windows of this process, beside the store file (not durable:
/// see `store::window`).
pub const WINDOWS_FILE: &str = "windows.json";

/// Largest lease, in uses, taken ahead of actual use.
const MAX_LEASE: u64 = 256;
/// Lease for counters without a limit (usage figures only).
const UNLIMITED_LEASE: u64 = 64;
/// Counters are kept this long after their token's expiry (far beyond any
/// clock error Till tolerates; a collected block is retired for good anyway).
pub const RETENTION_AFTER_EXPIRY: u64 = 7 * 24 * 3600;
/// Default of `limits.max_blocks_per_family`.
pub const DEFAULT_MAX_BLOCKS_PER_FAMILY: usize = 10_000;

fn lease(limit: Option<u64>, count: u64) -> u64 {
    match limit {
        None => UNLIMITED_LEASE,
        Some(l) => (l.saturating_sub(count) / 8).min(MAX_LEASE),
    }
}

#[derive(Debug, Default)]
struct Entry {
    /// Exact uses granted (minus rollbacks) since the counter was created.
    count: u64,
    /// Value known to be on disk.
    durable: u64,
    /// Value asked of the writer (≥ durable).
    requested: u64,
    /// Commit epoch that makes `requested` durable.
    epoch: u64,
    limit: Option<u64>,
    expires: u64,
    last_use: Option<u64>,
}

struct Pending {
    value: u64,
    expires: u64,
    /// Graceful flush: write the exact count, even if lower than the mark.
    exact: bool,
}

struct State {
    counters: HashMap<String, Entry>,
    pending: HashMap<String, Pending>,
    meta: HashMap<String, BlockMeta>,
    pending_meta: Vec<BlockMeta>,
    /// Epoch of the batch being gathered.
    next_epoch: u64,
    failed: Option<String>,
    shutdown: bool,
    /// Set when the exact flush starts: no reservation after it.
    closing: bool,
    /// Tracked blocks per family (authority id), to bound what one token
    /// holder can make the store remember by minting children offline.
    family_blocks: HashMap<String, usize>,
    max_blocks_per_family: usize,
    retired: HashSet<String>,
}

#[derive(Clone, Debug)]
struct Committed {
    epoch: u64,
    failed: Option<String>,
}

/// Commit statistics, for metrics.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub commits: AtomicU64,
    pub marks_written: AtomicU64,
    pub commit_micros_total: AtomicU64,
}

/// Called after each group commit with its duration and batch size.
pub type CommitObserver = Box<dyn Fn(std::time::Duration, usize) + Send + Sync>;

struct Shared {
    /// Identity of the file at open, to notice it being deleted or replaced
    /// while we hold it open (writes would then go to an unlinked inode and
    /// vanish on restart).
    file_id: Option<(u64, u64)>,
    observer: RwLock<Option<CommitObserver>>,
    db: Database,
    path: PathBuf,
    state: Mutex<State>,
    wake: Condvar,
    committed: watch::Sender<Committed>,
    revoked: RwLock<HashSet<String>>,
    stats: CommitStats,
}

/// Embedded durable counter store and revocation list (one redb file).
#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    writer: Arc<Mutex<Option<JoinHandle<()>>>>,
    /// Rate windows and concurrency caps of this process, saved beside the
    /// store file (`windows.json`) off the request path.
    windows: Arc<LocalWindows>,
    windows_file: PathBuf,
}

/// Saves `windows` to `path` every [`SAVE_EVERY`] when they changed, until
/// the store is dropped.
fn window_saver(windows: std::sync::Weak<LocalWindows>, path: PathBuf) {
    let mut saved = 0;
    loop {
        std::thread::sleep(SAVE_EVERY);
        let Some(w) = windows.upgrade() else { return };
        let now = w.changes();
        if now != saved {
            match w.save(&path) {
                Ok(()) => saved = now,
                Err(e) => {
                    tracing::warn!(error = %e, file = %path.display(), "saving the rate windows failed; a restart may forget recent admissions")
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves counts that are at worst too
    // high (increments happen before anything can fail), so keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`. A corrupt or unreadable file is
    /// an error: the proxy must refuse to start rather than count from zero.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        let path = dir.join(STORE_FILE);
        Self::open_file(&path)
    }

    /// Opens (or creates) the store file at `path`.
    pub fn open_file(path: &Path) -> Result<Self, StoreError> {
        let open_err = |m: String| StoreError::Open {
            path: path.display().to_string(),
            message: m,
        };
        // Every counter and block row lives in this process's maps after
        // open, so redb's page cache only serves the writer: its default
        // (1 GiB, filled by the opening scan) would double the memory held
        // for a large store without speeding anything up.
        let db = Database::builder()
            .set_cache_size(REDB_CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                // Not corruption: moving the file aside would give the
                // running process's tokens fresh budgets.
                redb::DatabaseError::DatabaseAlreadyOpen => open_err(
                    "another process (another till serve?) has it open. Stop that process, or give this one its own state_dir".into(),
                ),
                e => open_err(format!(
                    "{e}. The file is corrupt or unreadable; Till will not start from zero. Restore it from a backup, or move it aside to start with fresh counters"
                )),
            })?;
        // Make sure both tables exist, and read everything back.
        let txn = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        {
            txn.open_table(COUNTERS)
                .map_err(|e| open_err(e.to_string()))?;
            txn.open_table(REVOKED)
                .map_err(|e| open_err(e.to_string()))?;
            txn.open_table(BLOCKS)
                .map_err(|e| open_err(e.to_string()))?;
            txn.open_table(RETIRED)
                .map_err(|e| open_err(e.to_string()))?;
            txn.open_table(RETIRED_FAMILY)
                .map_err(|e| open_err(e.to_string()))?;
        }
        txn.commit().map_err(|e| open_err(e.to_string()))?;
        let mut counters = HashMap::new();
        let mut revoked = HashSet::new();
        let mut meta = HashMap::new();
        let mut retired = HashSet::new();
        {
            let r = db.begin_read().map_err(|e| open_err(e.to_string()))?;
            let t = r
                .open_table(COUNTERS)
                .map_err(|e| open_err(e.to_string()))?;
            for item in t.iter().map_err(|e| open_err(e.to_string()))? {
                let (k, v) = item.map_err(|e| open_err(e.to_string()))?;
                let (value, expires) = v.value();
                counters.insert(
                    k.value().to_string(),
                    Entry {
                        count: value,
                        durable: value,
                        requested: value,
                        expires,
                        ..Entry::default()
                    },
                );
            }
            let t = r.open_table(BLOCKS).map_err(|e| open_err(e.to_string()))?;
            for item in t.iter().map_err(|e| open_err(e.to_string()))? {
                let (k, v) = item.map_err(|e| open_err(e.to_string()))?;
                // Metadata is informational: a row we cannot read is skipped.
                if let Ok(m) = serde_json::from_str::<BlockMeta>(v.value()) {
                    meta.insert(k.value().to_string(), m);
                }
            }
            let t = r.open_table(REVOKED).map_err(|e| open_err(e.to_string()))?;
            for item in t.iter().map_err(|e| open_err(e.to_string()))? {
                let (k, _) = item.map_err(|e| open_err(e.to_string()))?;
                revoked.insert(k.value().to_string());
            }
            let t = r.open_table(RETIRED).map_err(|e| open_err(e.to_string()))?;
            for item in t.iter().map_err(|e| open_err(e.to_string()))? {
                let (k, _) = item.map_err(|e| open_err(e.to_string()))?;
                retired.insert(k.value().to_string());
            }
        }
        let mut family_blocks: HashMap<String, usize> = HashMap::new();
        for m in meta.values() {
            *family_blocks.entry(m.family.clone()).or_default() += 1;
        }
        let (tx, _) = watch::channel(Committed {
            epoch: 0,
            failed: None,
        });
        let shared = Arc::new(Shared {
            file_id: file_id(path),
            observer: RwLock::new(None),
            db,
            path: path.to_path_buf(),
            state: Mutex::new(State {
                counters,
                pending: HashMap::new(),
                meta,
                pending_meta: Vec::new(),
                next_epoch: 1,
                failed: None,
                shutdown: false,
                closing: false,
                family_blocks,
                max_blocks_per_family: DEFAULT_MAX_BLOCKS_PER_FAMILY,
                retired,
            }),
            wake: Condvar::new(),
            committed: tx,
            revoked: RwLock::new(revoked),
            stats: CommitStats::default(),
        });
        let s = shared.clone();
        let writer = std::thread::Builder::new()
            .name("till-store-writer".into())
            .spawn(move || writer_loop(&s))
            .map_err(|e| open_err(e.to_string()))?;
        let windows = Arc::new(LocalWindows::default());
        let windows_file = path.with_file_name(WINDOWS_FILE);
        // An unreadable window file loses rate history, not uses: start
        // with empty windows and say so, rather than refuse to start.
        if let Err(e) = windows.load(&windows_file) {
            tracing::warn!(error = %e, "rate windows start empty");
        }
        let (w, f) = (Arc::downgrade(&windows), windows_file.clone());
        std::thread::Builder::new()
            .name("till-window-saver".into())
            .spawn(move || window_saver(w, f))
            .map_err(|e| open_err(e.to_string()))?;
        Ok(EmbeddedStore {
            shared,
            writer: Arc::new(Mutex::new(Some(writer))),
            windows,
            windows_file,
        })
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Sets the function told about every group commit (metrics).
    pub fn set_commit_observer(&self, f: CommitObserver) {
        *self
            .shared
            .observer
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Sets `limits.max_blocks_per_family`: how many blocks of one token
    /// family the store tracks; a request that would add one more is refused.
    pub fn set_max_blocks_per_family(&self, n: usize) {
        lock(&self.shared.state).max_blocks_per_family = n.max(1);
    }

    /// Commit statistics (for metrics).
    pub fn stats(&self) -> &CommitStats {
        &self.shared.stats
    }

    /// Drops counters whose token expired more than
    /// [`RETENTION_AFTER_EXPIRY`] ago, and retires their blocks for good.
    /// Returns how many were removed. Never run at start: a clock that is
    /// wrong then has had no chance to be noticed (retiring keeps even that
    /// safe, but a live token would be refused until re-issued).
    pub fn gc_expired(&self, now: u64) -> Result<usize, StoreError> {
        let (dead, families): (Vec<String>, Vec<Option<String>>) = {
            let st = lock(&self.shared.state);
            st.counters
                .iter()
                .filter(|(_, e)| {
                    e.expires != 0 && e.expires.saturating_add(RETENTION_AFTER_EXPIRY) < now
                })
                .map(|(k, _)| (k.clone(), st.meta.get(k).map(|m| m.family.clone())))
                .unzip()
        };
        if dead.is_empty() {
            return Ok(0);
        }
        let txn = self.shared.db.begin_write().map_err(io)?;
        {
            let mut t = txn.open_table(COUNTERS).map_err(io)?;
            for id in &dead {
                t.remove(id.as_str()).map_err(io)?;
            }
            let mut t = txn.open_table(BLOCKS).map_err(io)?;
            for id in &dead {
                t.remove(id.as_str()).map_err(io)?;
            }
            let mut t = txn.open_table(RETIRED).map_err(io)?;
            for id in &dead {
                t.insert(id.as_str(), now).map_err(io)?;
            }
            let mut t = txn.open_table(RETIRED_FAMILY).map_err(io)?;
            for (id, f) in dead.iter().zip(&families) {
                if let Some(f) = f {
                    t.insert(id.as_str(), f.as_str()).map_err(io)?;
                }
            }
        }
        txn.commit().map_err(io)?;
        let mut st = lock(&self.shared.state);
        for id in &dead {
            st.counters.remove(id);
            st.retired.insert(id.clone());
            if let Some(m) = st.meta.remove(id)
                && let Some(n) = st.family_blocks.get_mut(&m.family)
            {
                *n = n.saturating_sub(1);
            }
        }
        Ok(dead.len())
    }

    /// Stops the writer after a final exact flush.
    pub fn close(&self) -> Result<(), StoreError> {
        {
            let mut st = lock(&self.shared.state);
            queue_exact(&mut st);
            st.shutdown = true;
        }
        self.shared.wake.notify_all();
        if let Some(h) = lock(&self.writer).take() {
            let _ = h.join();
        }
        match &lock(&self.shared.state).failed {
            Some(f) => Err(StoreError::Failed(f.clone())),
            None => Ok(()),
        }
    }

    fn wait_epoch(&self, epoch: u64) -> BoxFuture<'static, Result<(), StoreError>> {
        let mut rx = self.shared.committed.subscribe();
        async move {
            if epoch == 0 {
                return Ok(());
            }
            let c = rx
                .wait_for(|c| c.epoch >= epoch || c.failed.is_some())
                .await
                .map_err(|_| StoreError::Closed)?
                .clone();
            match c.failed {
                Some(f) if c.epoch < epoch => Err(StoreError::Failed(f)),
                _ => Ok(()),
            }
        }
        .boxed()
    }
}

#[cfg(unix)]
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|_| (0, 0))
}

fn queue_exact(st: &mut State) {
    let mut writes = Vec::new();
    for (id, e) in st.counters.iter() {
        if e.durable != e.count || e.requested != e.count {
            writes.push((id.clone(), e.count, e.expires));
        }
    }
    for (id, value, expires) in writes {
        st.pending.insert(
            id,
            Pending {
                value,
                expires,
                exact: true,
            },
        );
    }
}

fn writer_loop(s: &Shared) {
    loop {
        let (batch, meta, epoch) = {
            let mut st = lock(&s.state);
            while st.pending.is_empty() && st.pending_meta.is_empty() && !st.shutdown {
                st = s.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.pending.is_empty() && st.pending_meta.is_empty() {
                return;
            }
            let batch = std::mem::take(&mut st.pending);
            let meta = std::mem::take(&mut st.pending_meta);
            let epoch = st.next_epoch;
            st.next_epoch += 1;
            (batch, meta, epoch)
        };
        let started = std::time::Instant::now();
        let result = if file_id(&s.path) != s.file_id {
            Err(format!(
                "the store file {} was deleted or replaced while the proxy was running; restart the proxy after restoring it",
                s.path.display()
            ))
        } else {
            write_batch(&s.db, &batch, &meta)
        };
        if let Some(f) = s
            .observer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            f(started.elapsed(), batch.len() + meta.len());
        }
        s.stats.commits.fetch_add(1, Ordering::Relaxed);
        s.stats
            .marks_written
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        s.stats
            .commit_micros_total
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let mut st = lock(&s.state);
        match result {
            Ok(()) => {
                for (id, p) in batch {
                    if let Some(e) = st.counters.get_mut(&id) {
                        if p.exact {
                            e.durable = p.value;
                            e.requested = p.value.max(e.count);
                        } else {
                            e.durable = e.durable.max(p.value);
                        }
                    }
                }
                drop(st);
                s.committed.send_replace(Committed {
                    epoch,
                    failed: None,
                });
            }
            Err(msg) => {
                // Fail closed: a store that cannot persist must not count.
                tracing::error!(store = %s.path.display(), error = %msg, "counter store commit failed; refusing further reservations");
                st.failed = Some(msg.clone());
                drop(st);
                s.committed.send_replace(Committed {
                    epoch: epoch.saturating_sub(1),
                    failed: Some(msg),
                });
                return;
            }
        }
    }
}

fn write_batch(
    db: &Database,
    batch: &HashMap<String, Pending>,
    meta: &[BlockMeta],
) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    if !meta.is_empty() {
        let mut t = txn.open_table(BLOCKS).map_err(|e| e.to_string())?;
        for m in meta {
            let json = serde_json::to_string(m).map_err(|e| e.to_string())?;
            t.insert(m.id.as_str(), json.as_str())
                .map_err(|e| e.to_string())?;
        }
    }
    {
        let mut t = txn.open_table(COUNTERS).map_err(|e| e.to_string())?;
        for (id, p) in batch {
            t.insert(id.as_str(), (p.value, p.expires))
                .map_err(|e| e.to_string())?;
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

impl CounterStore for EmbeddedStore {
    fn reserve(&self, counters: &[CounterSpec]) -> BoxFuture<'_, Result<Reservation, StoreError>> {
        let result = (|| {
            let mut st = lock(&self.shared.state);
            if let Some(f) = &st.failed {
                return Err(StoreError::Failed(f.clone()));
            }
            if st.shutdown || st.closing {
                return Err(StoreError::Closed);
            }
            if !st.retired.is_empty() && counters.iter().any(|c| st.retired.contains(&c.id)) {
                return Err(StoreError::Retired);
            }
            // Blocks seen for the first time: bounded per family, and their
            // metadata recorded now, on an allowed request.
            let fresh: Vec<&CounterSpec> = counters
                .iter()
                .filter(|c| !st.meta.contains_key(&c.id))
                .collect();
            if !fresh.is_empty() {
                let max = st.max_blocks_per_family;
                for c in &fresh {
                    let have = st.family_blocks.get(&c.family).copied().unwrap_or(0);
                    let adding = fresh.iter().filter(|f| f.family == c.family).count();
                    if have + adding > max {
                        return Err(StoreError::FamilyFull { limit: max });
                    }
                }
                for c in fresh {
                    let m = BlockMeta::from(c);
                    *st.family_blocks.entry(m.family.clone()).or_default() += 1;
                    st.pending_meta.push(m.clone());
                    st.meta.insert(m.id.clone(), m);
                }
            }
            let now = now_unix();
            let next_epoch = st.next_epoch;
            let mut uses = Vec::with_capacity(counters.len());
            let mut need_epoch = 0;
            let mut wake = false;
            let mut writes = Vec::new();
            for c in counters {
                let e = st.counters.entry(c.id.clone()).or_default();
                e.count += 1;
                e.last_use = Some(now);
                // The block's own limit: the same block (same signature)
                // always states the same one.
                e.limit = c.limit;
                // 0 means "never expires" and wins over any date.
                let expires = c.expires.unwrap_or(0);
                e.expires = if e.count == 1 && e.durable == 0 {
                    expires
                } else if e.expires == 0 || expires == 0 {
                    0
                } else {
                    e.expires.max(expires)
                };
                uses.push(e.count);
                if e.count <= e.durable {
                    continue;
                }
                if e.count <= e.requested {
                    need_epoch = need_epoch.max(e.epoch);
                    continue;
                }
                e.requested = e.count + lease(e.limit, e.count);
                e.epoch = next_epoch;
                need_epoch = need_epoch.max(next_epoch);
                writes.push((c.id.clone(), e.requested, e.expires));
                wake = true;
            }
            for (id, value, expires) in writes {
                let p = st.pending.entry(id).or_insert(Pending {
                    value,
                    expires,
                    exact: false,
                });
                p.value = p.value.max(value);
                p.expires = expires;
                p.exact = false;
            }
            wake |= !st.pending_meta.is_empty();
            drop(st);
            if wake {
                self.shared.wake.notify_one();
            }
            Ok((uses, need_epoch))
        })();
        let fut = result.map(|(uses, epoch)| Reservation {
            uses,
            durable: self.wait_epoch(epoch),
        });
        async move { fut }.boxed()
    }

    fn release(&self, ids: &[String]) -> BoxFuture<'_, Result<(), StoreError>> {
        {
            let mut st = lock(&self.shared.state);
            for id in ids {
                if let Some(e) = st.counters.get_mut(id) {
                    // The durable mark stays: it only has to be ≥ the count.
                    e.count = e.count.saturating_sub(1);
                }
            }
        }
        async { Ok(()) }.boxed()
    }

    fn peek(&self, ids: &[String]) -> BoxFuture<'_, Result<Vec<u64>, StoreError>> {
        let st = lock(&self.shared.state);
        let out = match &st.failed {
            Some(f) => Err(StoreError::Failed(f.clone())),
            None => Ok(ids
                .iter()
                .map(|id| st.counters.get(id).map_or(0, |e| e.count))
                .collect()),
        };
        drop(st);
        async move { out }.boxed()
    }

    fn get(&self, ids: &[String]) -> BoxFuture<'_, Result<Vec<CounterInfo>, StoreError>> {
        let st = lock(&self.shared.state);
        let out = ids
            .iter()
            .map(|id| match st.counters.get(id) {
                Some(e) => info(id, e),
                None => CounterInfo {
                    id: id.clone(),
                    uses: 0,
                    limit: None,
                    expires: None,
                    last_use: None,
                },
            })
            .collect();
        async move { Ok(out) }.boxed()
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<CounterInfo>, StoreError>> {
        let st = lock(&self.shared.state);
        let out = st.counters.iter().map(|(id, e)| info(id, e)).collect();
        async move { Ok(out) }.boxed()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        // Graceful shutdown: the next start continues these windows.
        if let Err(e) = self.windows.save(&self.windows_file) {
            tracing::warn!(error = %e, "saving the rate windows at shutdown failed");
        }
        let epoch = {
            let mut st = lock(&self.shared.state);
            st.closing = true;
            queue_exact(&mut st);
            if st.pending.is_empty() {
                0
            } else {
                st.next_epoch
            }
        };
        self.shared.wake.notify_one();
        self.wait_epoch(epoch)
    }

    fn healthy(&self) -> bool {
        let st = lock(&self.shared.state);
        st.failed.is_none() && !st.shutdown && !st.closing
    }
    fn register(&self, blocks: &[BlockMeta]) {
        let mut st = lock(&self.shared.state);
        let mut added = false;
        for b in blocks {
            if !st.meta.contains_key(&b.id) {
                st.meta.insert(b.id.clone(), b.clone());
                st.pending_meta.push(b.clone());
                added = true;
            }
        }
        drop(st);
        if added {
            self.shared.wake.notify_one();
        }
    }

    fn windows(&self) -> Option<Arc<dyn WindowStore>> {
        Some(self.windows.clone())
    }
    fn blocks(&self) -> BoxFuture<'_, Result<Vec<BlockMeta>, StoreError>> {
        let out = lock(&self.shared.state).meta.values().cloned().collect();
        async move { Ok(out) }.boxed()
    }
}

fn info(id: &str, e: &Entry) -> CounterInfo {
    CounterInfo {
        id: id.to_string(),
        uses: e.count,
        limit: e.limit,
        expires: (e.expires != 0).then_some(e.expires),
        last_use: e.last_use,
    }
}

impl RevocationList for EmbeddedStore {
    fn first_revoked(&self, ids: &[String]) -> Result<Option<usize>, StoreError> {
        let set = self
            .shared
            .revoked
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if set.is_empty() {
            return Ok(None);
        }
        Ok(ids.iter().position(|id| set.contains(id)))
    }

    fn revoke(&self, id: &str) -> BoxFuture<'_, Result<bool, StoreError>> {
        let id = id.to_ascii_lowercase();
        let shared = self.shared.clone();
        async move {
            if shared
                .revoked
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&id)
            {
                return Ok(false);
            }
            let id2 = id.clone();
            let s2 = shared.clone();
            tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
                let txn = s2.db.begin_write().map_err(io)?;
                {
                    let mut t = txn.open_table(REVOKED).map_err(io)?;
                    t.insert(id2.as_str(), now_unix()).map_err(io)?;
                }
                txn.commit().map_err(io)
            })
            .await
            .map_err(io)??;
            Ok(shared
                .revoked
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id))
        }
        .boxed()
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<(String, u64)>, StoreError>> {
        let shared = self.shared.clone();
        async move {
            tokio::task::spawn_blocking(move || -> Result<Vec<(String, u64)>, StoreError> {
                let r = shared.db.begin_read().map_err(io)?;
                let t = r.open_table(REVOKED).map_err(io)?;
                let mut out = Vec::new();
                for item in t.iter().map_err(io)? {
                    let (k, v) = item.map_err(io)?;
                    out.push((k.value().to_string(), v.value()));
                }
                Ok(out)
            })
            .await
            .map_err(io)?
        }
        .boxed()
    }

    fn len(&self) -> usize {
        self.shared.revoked.read().map(|s| s.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, limit: Option<u64>) -> CounterSpec {
        CounterSpec::standalone(id, limit, None)
    }

    #[test]
    fn lease_is_a_fraction_of_the_remaining_budget() {
        assert_eq!(lease(Some(5), 1), 0);
        assert_eq!(lease(Some(100), 1), 12);
        assert_eq!(lease(Some(1_000_000), 1), MAX_LEASE);
        assert_eq!(lease(Some(10), 20), 0);
        assert_eq!(lease(None, 1), UNLIMITED_LEASE);
    }

    #[tokio::test]
    async fn counts_are_exact_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        for i in 1..=7 {
            let r = s
                .reserve(&[spec("a", Some(10)), spec("b", None)])
                .await
                .unwrap();
            assert_eq!(r.uses, vec![i, i]);
            r.durable.await.unwrap();
        }
        s.release(&["a".into()]).await.unwrap();
        assert_eq!(s.get(&["a".into()]).await.unwrap()[0].uses, 6);
        s.close().unwrap();
        drop(s);
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let got = s.get(&["a".into(), "b".into()]).await.unwrap();
        assert_eq!((got[0].uses, got[1].uses), (6, 7));
    }

    #[tokio::test]
    async fn without_graceful_close_the_mark_is_never_below_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        for _ in 0..50 {
            let r = s.reserve(&[spec("a", Some(1000))]).await.unwrap();
            r.durable.await.unwrap();
        }
        // Read the file as a crash would leave it: what is committed.
        let on_disk = {
            let r = s.shared.db.begin_read().unwrap();
            let t = r.open_table(COUNTERS).unwrap();
            t.get("a").unwrap().unwrap().value().0
        };
        assert!(
            on_disk >= 50,
            "durable mark {on_disk} below 50 granted uses"
        );
        assert!(on_disk <= 50 + MAX_LEASE);
    }

    #[tokio::test]
    async fn revocations_persist() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert!(s.revoke("ABCD").await.unwrap());
        assert!(!s.revoke("abcd").await.unwrap());
        assert_eq!(
            s.first_revoked(&["x".into(), "abcd".into()]).unwrap(),
            Some(1)
        );
        s.close().unwrap();
        drop(s);
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(RevocationList::len(&s), 1);
    }

    #[tokio::test]
    async fn peeking_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.peek(&["a".into(), "b".into()]).await.unwrap(), vec![0, 0]);
        assert!(CounterStore::list(&s).await.unwrap().is_empty());
        assert!(s.blocks().await.unwrap().is_empty());
    }

    /// Regression: `flush` wrote exact values (lowering on-disk marks) while
    /// late connection tasks could still reserve; a crash then lost uses.
    #[tokio::test]
    async fn nothing_reserves_once_the_final_flush_started() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.reserve(&[spec("a", Some(100))])
            .await
            .unwrap()
            .durable
            .await
            .unwrap();
        s.flush().await.unwrap();
        assert!(matches!(
            s.reserve(&[spec("a", Some(100))]).await,
            Err(StoreError::Closed)
        ));
        assert!(!s.healthy());
    }

    #[tokio::test]
    async fn blocks_tracked_per_family_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.set_max_blocks_per_family(3);
        let block = |id: &str, parent: Option<&str>| CounterSpec {
            family: "root".into(),
            parent: parent.map(str::to_string),
            index: usize::from(parent.is_some()),
            ..CounterSpec::standalone(id, None, None)
        };
        let root = block("root", None);
        for kid in ["k1", "k2"] {
            s.reserve(&[root.clone(), block(kid, Some("root"))])
                .await
                .unwrap();
        }
        let err = s
            .reserve(&[root.clone(), block("k3", Some("root"))])
            .await
            .err()
            .expect("a fourth block of the family is refused");
        assert!(matches!(err, StoreError::FamilyFull { limit: 3 }), "{err}");
        // Nothing was counted for the refused request, and known blocks go on.
        assert_eq!(s.peek(&["root".into()]).await.unwrap(), vec![2]);
        s.reserve(&[root.clone(), block("k1", Some("root"))])
            .await
            .unwrap();
        // Another family is not affected.
        s.reserve(&[spec("other", None)]).await.unwrap();
    }

    /// Regression: a start with the clock days ahead collected live tokens'
    /// counters, and back on the right clock they had their whole budget
    /// again. A collected block is retired for good.
    #[tokio::test]
    async fn a_collected_counter_never_comes_back_with_a_fresh_budget() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let expires = now_unix() + 60;
        let a = CounterSpec::standalone("a", Some(5), Some(expires));
        for _ in 0..5 {
            s.reserve(std::slice::from_ref(&a))
                .await
                .unwrap()
                .durable
                .await
                .unwrap();
        }
        // The clock is a month ahead when the collector runs.
        let removed = s.gc_expired(expires + 30 * 24 * 3600).unwrap();
        assert_eq!(removed, 1);
        s.close().unwrap();
        drop(s);
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert!(matches!(
            s.reserve(std::slice::from_ref(&a)).await,
            Err(StoreError::Retired)
        ));
    }

    #[test]
    fn corrupt_file_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STORE_FILE), vec![0x5a; 8192]).unwrap();
        let err = EmbeddedStore::open(dir.path()).err().expect("must fail");
        assert!(
            err.to_string().contains("will not start from zero"),
            "{err}"
        );
    }
}
