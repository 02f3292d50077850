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
//! * A lease is renewed ahead: the use that leaves a quarter of it asks for
//!   the next mark (count + lease) and does not wait. A steady stream of
//!   uses finds the next mark already durable, so no warm request waits
//!   for the disk (before, every use past the mark waited for the same
//!   commit, a stall of the whole proxy every 256 uses).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::watch;

use super::window::{LocalWindows, SAVE_EVERY, WindowStore};
use super::{
    BlockMeta, CounterInfo, CounterSpec, CounterStore, Reservation, RevocationList, StoreError,
    now_unix,
};

mod index;
mod snapshot;

use index::{COUNTER, Index, META, Slot};

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
/// A lease is renewed when 1/this of it is left. The renewal asks for
/// count + lease like any other mark (so a crash still over-counts by at
/// most one lease); earlier renewal would mean more commits per use, later
/// leaves the commit less time to land: a quarter of 256 uses is about
/// 2 ms at full load, several commits' time.
const RENEW_WHEN_LEFT: u64 = 4;
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

/// The one field of a `BLOCKS` row the opening scan needs; parsing only it
/// keeps a reopen of a million blocks quick.
#[derive(serde::Deserialize)]
struct FamilyOf<'a> {
    #[serde(borrow)]
    family: Cow<'a, str>,
}

fn family_of(json: &str) -> Option<String> {
    // Fast path for the rows this store writes (`{"id":"…","family":"…",…`,
    // serde's field order): when neither string holds a backslash, neither
    // has an escape, so the first quote ends each. Parsing whole rows was
    // about a third of a reopen's CPU time (perf, 200 000 families).
    let fast = || {
        let rest = json.strip_prefix("{\"id\":\"")?;
        let (id, rest) = rest.split_once('"')?;
        let rest = rest.strip_prefix(",\"family\":\"")?;
        let (family, _) = rest.split_once('"')?;
        (!id.contains('\\') && !family.contains('\\')).then_some(family)
    };
    if let Some(f) = fast() {
        return Some(f.to_string());
    }
    serde_json::from_str::<FamilyOf>(json)
        .ok()
        .map(|f| f.family.into_owned())
}

/// A mark asked of the writer and not yet known durable. Kept beside the
/// slots rather than in them: only counters crossing their mark have one,
/// so a slot stays 112 bytes.
struct Asked {
    /// The mark asked for (> the slot's `durable`).
    requested: u64,
    /// Commit epoch that makes `requested` durable.
    epoch: u64,
}

struct Pending {
    value: u64,
    expires: u64,
    /// Graceful flush: write the exact count, even if lower than the mark.
    exact: bool,
}

struct State {
    /// Every block with a counter or recorded metadata, and each family's
    /// block count (see `index`). The metadata itself is on disk.
    blocks: Index,
    /// Marks in flight, by slot number (see `Asked`).
    asked: HashMap<u32, Asked>,
    pending: HashMap<String, Pending>,
    /// Metadata of blocks seen for the first time, until the writer puts it
    /// on disk.
    pending_meta: Vec<BlockMeta>,
    /// Metadata of blocks seen for the first time by reservations not yet
    /// re-checked: counted in their family's bound, but queued for the
    /// writer only once a reservation holding them is re-checked and waits
    /// to be durable; gone if every such reservation is given back.
    tentative: HashMap<String, BlockMeta>,
    /// Epoch of the batch being gathered.
    next_epoch: u64,
    failed: Option<String>,
    shutdown: bool,
    /// Set when the exact flush starts: no reservation after it.
    closing: bool,
    /// Bounds what one token holder can make the store remember by minting
    /// children offline (counted per family in `blocks`).
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
    /// The current counts of `ids` (0 for a block never used), or the
    /// failure that stopped the store.
    fn counts(&self, ids: &[String]) -> Result<Vec<u64>, StoreError> {
        let st = lock(&self.shared.state);
        match &st.failed {
            Some(f) => Err(StoreError::Failed(f.clone())),
            None => Ok(ids
                .iter()
                .map(|id| {
                    st.blocks
                        .get(id)
                        .filter(|e| e.has(COUNTER))
                        .map_or(0, |e| e.count)
                })
                .collect()),
        }
    }

    /// Opens (or creates) the store in `dir`. A corrupt or unreadable file is
    /// an error: the proxy must refuse to start rather than count from zero.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        till_core::files::create_private_dir(dir).map_err(|e| StoreError::Open {
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
        // redb creates a missing file with the umask's mode (0644, or 0666
        // under umask 000): labels and revocations are private.
        till_core::files::create_private_if_missing(path).map_err(|e| open_err(e.to_string()))?;
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
        let mut blocks = Index::default();
        let mut revoked = HashSet::new();
        let mut retired = HashSet::new();
        {
            let r = db.begin_read().map_err(|e| open_err(e.to_string()))?;
            let counters = r
                .open_table(COUNTERS)
                .map_err(|e| open_err(e.to_string()))?;
            let metas = r.open_table(BLOCKS).map_err(|e| open_err(e.to_string()))?;
            let n = counters.len().map_err(|e| open_err(e.to_string()))?;
            blocks.reserve(usize::try_from(n).unwrap_or(0));
            // Both tables are sorted by id: walking them together looks up a
            // block with a counter and metadata (nearly every one) once.
            let mut cs = counters
                .iter()
                .map_err(|e| open_err(e.to_string()))?
                .peekable();
            let mut ms = metas
                .iter()
                .map_err(|e| open_err(e.to_string()))?
                .peekable();
            loop {
                use std::cmp::Ordering::{Equal, Greater, Less};
                let order = match (cs.peek(), ms.peek()) {
                    (None, None) => break,
                    (Some(Ok((c, _))), Some(Ok((m, _)))) => c.value().cmp(m.value()),
                    // An error is taken (and returned) first.
                    (Some(_), None) | (Some(Err(_)), _) => Less,
                    (None, Some(_)) | (_, Some(Err(_))) => Greater,
                };
                let c = match order {
                    Less | Equal => cs.next(),
                    Greater => None,
                }
                .transpose()
                .map_err(|e| open_err(e.to_string()))?;
                let m = match order {
                    Greater | Equal => ms.next(),
                    Less => None,
                }
                .transpose()
                .map_err(|e| open_err(e.to_string()))?;
                let Some(id) = c
                    .as_ref()
                    .map(|(k, _)| k.value())
                    .or_else(|| m.as_ref().map(|(k, _)| k.value()))
                else {
                    break;
                };
                // Metadata is informational: a row we cannot read is skipped.
                let family = m.as_ref().and_then(|(_, v)| family_of(v.value()));
                if c.is_none() && family.is_none() {
                    continue;
                }
                let i = blocks.find_or_insert(id);
                let e = blocks.slot_mut(i);
                if let Some((_, v)) = &c {
                    let (value, expires) = v.value();
                    e.flags |= COUNTER;
                    e.count = value;
                    e.durable = value;
                    e.expires = expires;
                }
                if let Some(family) = family {
                    e.flags |= META;
                    if family == id {
                        e.family_blocks = e.family_blocks.saturating_add(1);
                    } else {
                        add_to_family(&mut blocks, &family);
                    }
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
                blocks,
                asked: HashMap::new(),
                pending: HashMap::new(),
                pending_meta: Vec::new(),
                tentative: HashMap::new(),
                next_epoch: 1,
                failed: None,
                shutdown: false,
                closing: false,
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
        let dead: Vec<String> = {
            let st = lock(&self.shared.state);
            st.blocks
                .iter()
                .filter(|(_, e)| {
                    e.has(COUNTER)
                        && e.expires != 0
                        && e.expires.saturating_add(RETENTION_AFTER_EXPIRY) < now
                })
                .map(|(i, _)| st.blocks.id(i))
                .collect()
        };
        if dead.is_empty() {
            return Ok(0);
        }
        // The family of each block, from its metadata row (on disk, or still
        // queued for the writer), so a move to Redis files it correctly.
        let mut families: Vec<Option<String>> = vec![None; dead.len()];
        let txn = self.shared.db.begin_write().map_err(io)?;
        {
            let mut t = txn.open_table(COUNTERS).map_err(io)?;
            for id in &dead {
                t.remove(id.as_str()).map_err(io)?;
            }
            let mut t = txn.open_table(BLOCKS).map_err(io)?;
            for (id, f) in dead.iter().zip(families.iter_mut()) {
                if let Some(row) = t.remove(id.as_str()).map_err(io)? {
                    *f = family_of(row.value());
                }
            }
            let mut t = txn.open_table(RETIRED).map_err(io)?;
            for id in &dead {
                t.insert(id.as_str(), now).map_err(io)?;
            }
            let st = lock(&self.shared.state);
            for (id, f) in dead.iter().zip(families.iter_mut()) {
                if f.is_none() {
                    *f = st
                        .pending_meta
                        .iter()
                        .find(|m| &m.id == id)
                        .map(|m| m.family.clone());
                }
            }
            drop(st);
            let mut t = txn.open_table(RETIRED_FAMILY).map_err(io)?;
            for (id, f) in dead.iter().zip(&families) {
                if let Some(f) = f {
                    t.insert(id.as_str(), f.as_str()).map_err(io)?;
                }
            }
        }
        txn.commit().map_err(io)?;
        let mut st = lock(&self.shared.state);
        for (id, family) in dead.iter().zip(&families) {
            st.retired.insert(id.clone());
            st.pending.remove(id);
            if let Some(i) = st.blocks.find(id) {
                st.asked.remove(&i);
            }
            let had_meta = st.blocks.get(id).is_some_and(|e| e.has(META));
            forget_block(&mut st.blocks, id);
            if had_meta && let Some(f) = family {
                remove_from_family(&mut st.blocks, f);
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

    /// The wait of a reservation holding blocks first seen by a reservation
    /// not yet re-checked: awaited only once the request was re-checked, it
    /// queues their metadata *and their count marks* (which `reserve` holds
    /// back for such blocks) for the writer, then waits for the batch that
    /// writes them. So a block counted on disk has its metadata there, and
    /// a request refused because that batch failed (503) leaves no use
    /// counted: written in an earlier batch, the mark of a request answered
    /// 503 survived a restart.
    fn confirm_then_wait(
        &self,
        ids: Vec<String>,
        epoch: u64,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let this = self.clone();
        async move {
            let (wait, wake) = {
                let mut guard = lock(&this.shared.state);
                let st = &mut *guard;
                let next = st.next_epoch;
                let mut wait = epoch;
                let mut wake = false;
                for id in &ids {
                    if let Some(m) = st.tentative.remove(id) {
                        st.pending_meta.push(m);
                        wait = wait.max(next);
                        wake = true;
                    }
                    if let Some(e) = mark_held_back(st, id, next) {
                        wait = wait.max(e);
                        wake |= e == next;
                    }
                }
                (wait, wake)
            };
            if wake {
                this.shared.wake.notify_one();
            }
            this.wait_epoch(wait).await
        }
        .boxed()
    }

    fn wait_epoch(&self, epoch: u64) -> BoxFuture<'static, Result<(), StoreError>> {
        if epoch == 0 {
            return Box::pin(AlreadyDurable);
        }
        let mut rx = self.shared.committed.subscribe();
        async move {
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

/// The epoch that makes block `id`'s count durable, queuing its mark for
/// epoch `next` if no mark asked for covers it; `None` if it is durable.
fn mark_held_back(st: &mut State, id: &str, next: u64) -> Option<u64> {
    let i = st.blocks.find(id)?;
    let e = st.blocks.slot(i);
    if e.count <= e.durable {
        return None;
    }
    if let Some(a) = st.asked.get(&i)
        && e.count <= a.requested
    {
        return Some(a.epoch);
    }
    let (requested, expires) = (e.count + lease(e.limit(), e.count), e.expires);
    st.asked.insert(
        i,
        Asked {
            requested,
            epoch: next,
        },
    );
    let p = st.pending.entry(id.to_string()).or_insert(Pending {
        value: requested,
        expires,
        exact: false,
    });
    p.value = p.value.max(requested);
    p.expires = expires;
    p.exact = false;
    Some(next)
}

/// The wait of a count already durable (within a lease written earlier, as
/// most warm requests are). Zero-sized, so its box allocates nothing.
struct AlreadyDurable;

impl std::future::Future for AlreadyDurable {
    type Output = Result<(), StoreError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::task::Poll::Ready(Ok(()))
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

/// One more tracked block in `family`.
fn add_to_family(blocks: &mut Index, family: &str) {
    let i = blocks.find_or_insert(family);
    let f = blocks.slot_mut(i);
    f.family_blocks = f.family_blocks.saturating_add(1);
}

/// One tracked block of `family` fewer; a slot kept only for the count goes
/// when it reaches zero.
fn remove_from_family(blocks: &mut Index, family: &str) {
    let Some(f) = blocks.get_mut(family) else {
        return;
    };
    f.family_blocks = f.family_blocks.saturating_sub(1);
    if f.family_blocks == 0 && !f.has(COUNTER) && !f.has(META) {
        blocks.remove(family);
    }
}

/// A block whose every reservation was given back (all its requests were
/// refused after reserving) is no longer one of its family's blocks: only
/// allowed requests create usage metadata, and a key whose requests are
/// refused must not fill `max_blocks_per_family` and lock its siblings out.
/// Its metadata was never queued for the writer (see `State::tentative`);
/// a block already confirmed by a re-checked request stays, as any block
/// seen.
fn unregister_unused(st: &mut State, id: &str) {
    let Some(m) = st.tentative.remove(id) else {
        return;
    };
    if let Some(e) = st.blocks.get_mut(id) {
        e.flags &= !META;
    }
    remove_from_family(&mut st.blocks, &m.family);
}

/// Forgets a block's counter and metadata flag; its slot stays while it
/// still holds its family's block count.
fn forget_block(blocks: &mut Index, id: &str) {
    let Some(e) = blocks.get_mut(id) else { return };
    if e.family_blocks == 0 {
        blocks.remove(id);
    } else {
        e.clear();
    }
}

fn queue_exact(st: &mut State) {
    let mut writes = Vec::new();
    for (i, e) in st.blocks.iter() {
        if e.has(COUNTER) && (e.durable != e.count || st.asked.contains_key(&i)) {
            writes.push((st.blocks.id(i), e.count, e.expires));
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
        let mut guard = lock(&s.state);
        match result {
            Ok(()) => {
                let st = &mut *guard;
                for (id, p) in batch {
                    let Some(i) = st.blocks.find(&id) else {
                        continue;
                    };
                    let e = st.blocks.slot_mut(i);
                    if !e.has(COUNTER) {
                        continue;
                    }
                    if p.exact {
                        e.durable = p.value;
                        st.asked.remove(&i);
                    } else {
                        e.durable = e.durable.max(p.value);
                        if st.asked.get(&i).is_some_and(|a| a.requested <= e.durable) {
                            st.asked.remove(&i);
                        }
                    }
                }
                drop(guard);
                s.committed.send_replace(Committed {
                    epoch,
                    failed: None,
                });
            }
            Err(msg) => {
                // Fail closed: a store that cannot persist must not count.
                tracing::error!(store = %s.path.display(), error = %msg, "counter store commit failed; refusing further reservations");
                guard.failed = Some(msg.clone());
                drop(guard);
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
            let mut guard = lock(&self.shared.state);
            let st = &mut *guard;
            if let Some(f) = &st.failed {
                return Err(StoreError::Failed(f.clone()));
            }
            if st.shutdown || st.closing {
                return Err(StoreError::Closed);
            }
            if !st.retired.is_empty() && counters.iter().any(|c| st.retired.contains(&c.id)) {
                return Err(StoreError::Retired);
            }
            // Each id is looked up once here (slot numbers stay
            // valid: nothing is removed while the lock is held).
            let found: smallvec::SmallVec<[Option<u32>; 8]> =
                counters.iter().map(|c| st.blocks.find(&c.id)).collect();
            // Blocks seen for the first time: bounded per family, and their
            // metadata recorded now, on an allowed request.
            let fresh: Vec<&CounterSpec> = counters
                .iter()
                .zip(&found)
                .filter(|(_, i)| !i.is_some_and(|i| st.blocks.slot(i).has(META)))
                .map(|(c, _)| c)
                .collect();
            if !fresh.is_empty() {
                let max = st.max_blocks_per_family;
                for c in &fresh {
                    let have = st
                        .blocks
                        .get(&c.family)
                        .map_or(0, |f| f.family_blocks as usize);
                    let adding = fresh.iter().filter(|f| f.family == c.family).count();
                    if have + adding > max {
                        return Err(StoreError::FamilyFull { limit: max });
                    }
                }
                for c in fresh {
                    let m = BlockMeta::from(c);
                    add_to_family(&mut st.blocks, &m.family);
                    let i = st.blocks.find_or_insert(&m.id);
                    st.blocks.slot_mut(i).flags |= META;
                    st.tentative.insert(m.id.clone(), m);
                }
            }
            let confirm = !st.tentative.is_empty()
                && counters.iter().any(|c| st.tentative.contains_key(&c.id));
            let now = now_unix();
            let next_epoch = st.next_epoch;
            let mut uses = Vec::with_capacity(counters.len());
            let mut need_epoch = 0;
            let mut wake = false;
            let mut writes = Vec::new();
            for (c, found) in counters.iter().zip(found) {
                let i = match found {
                    Some(i) => i,
                    None => st.blocks.find_or_insert(&c.id),
                };
                let e = st.blocks.slot_mut(i);
                e.flags |= COUNTER;
                e.count += 1;
                e.set_last_use(now);
                // The block's own limit: the same block (same signature)
                // always states the same one.
                e.set_limit(c.limit);
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
                if confirm && st.tentative.contains_key(&c.id) {
                    // Its mark goes with its metadata, once the request
                    // is re-checked (`confirm_then_wait`).
                    continue;
                }
                let e = st.blocks.slot_mut(i);
                let lease = lease(e.limit(), e.count);
                let must_wait = if e.count <= e.durable {
                    // Renewal ahead: with a quarter of the lease left, ask
                    // for the next mark without waiting for it. A steady
                    // stream of uses then finds that mark durable when it
                    // gets there, instead of every use past the old mark
                    // waiting for the commit together.
                    if lease == 0
                        || e.durable - e.count > lease / RENEW_WHEN_LEFT
                        || st.asked.contains_key(&i)
                    {
                        continue;
                    }
                    false
                } else if let Some(a) = st.asked.get(&i)
                    && e.count <= a.requested
                {
                    need_epoch = need_epoch.max(a.epoch);
                    continue;
                } else {
                    true
                };
                let requested = e.count + lease;
                writes.push((c.id.clone(), requested, e.expires));
                st.asked.insert(
                    i,
                    Asked {
                        requested,
                        epoch: next_epoch,
                    },
                );
                if must_wait {
                    need_epoch = need_epoch.max(next_epoch);
                }
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
            drop(guard);
            if wake {
                self.shared.wake.notify_one();
            }
            Ok((uses, need_epoch, confirm))
        })();
        let fut = result.map(|(uses, epoch, confirm)| Reservation {
            uses,
            durable: if confirm {
                self.confirm_then_wait(counters.iter().map(|c| c.id.clone()).collect(), epoch)
            } else {
                self.wait_epoch(epoch)
            },
        });
        async move { fut }.boxed()
    }

    fn release(&self, ids: &[String]) -> BoxFuture<'_, Result<(), StoreError>> {
        {
            let mut guard = lock(&self.shared.state);
            let st = &mut *guard;
            for id in ids {
                let Some(e) = st.blocks.get_mut(id).filter(|e| e.has(COUNTER)) else {
                    continue;
                };
                // The durable mark stays: it only has to be ≥ the count.
                e.count = e.count.saturating_sub(1);
                if e.count == 0 {
                    unregister_unused(st, id);
                }
            }
        }
        async { Ok(()) }.boxed()
    }

    fn peek(&self, ids: &[String]) -> BoxFuture<'_, Result<Vec<u64>, StoreError>> {
        let out = self.counts(ids);
        async move { out }.boxed()
    }

    fn peek_now(&self, ids: &[String]) -> Option<Result<Vec<u64>, StoreError>> {
        Some(self.counts(ids))
    }

    fn get(&self, ids: &[String]) -> BoxFuture<'_, Result<Vec<CounterInfo>, StoreError>> {
        let st = lock(&self.shared.state);
        let out = ids
            .iter()
            .map(|id| match st.blocks.get(id).filter(|e| e.has(COUNTER)) {
                Some(e) => info(id.clone(), e),
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
        let out = st
            .blocks
            .iter()
            // A block without a use or metadata is the trace of requests
            // that were all refused after reserving: not usage.
            .filter(|(_, e)| e.has(COUNTER) && (e.count > 0 || e.has(META)))
            .map(|(i, e)| info(st.blocks.id(i), e))
            .collect();
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
            let i = st.blocks.find_or_insert(&b.id);
            let e = st.blocks.slot_mut(i);
            if !e.has(META) {
                e.flags |= META;
                add_to_family(&mut st.blocks, &b.family);
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
        let shared = self.shared.clone();
        async move {
            // Read from disk, off the async workers: the metadata of every
            // block is not kept in memory (see `index`).
            tokio::task::spawn_blocking(move || read_blocks(&shared))
                .await
                .map_err(io)?
        }
        .boxed()
    }
}

/// Every recorded block's metadata: the rows on disk, and those still
/// queued for the writer.
fn read_blocks(shared: &Shared) -> Result<Vec<BlockMeta>, StoreError> {
    let queued = lock(&shared.state).pending_meta.clone();
    let r = shared.db.begin_read().map_err(io)?;
    let t = r.open_table(BLOCKS).map_err(io)?;
    let mut out = Vec::new();
    for item in t.iter().map_err(io)? {
        let (_, v) = item.map_err(io)?;
        // Metadata is informational: a row we cannot read is skipped.
        if let Ok(m) = serde_json::from_str::<BlockMeta>(v.value()) {
            out.push(m);
        }
    }
    let on_disk: HashSet<&str> = out.iter().map(|m| m.id.as_str()).collect();
    let queued: Vec<BlockMeta> = queued
        .into_iter()
        .filter(|m| !on_disk.contains(m.id.as_str()))
        .collect();
    out.extend(queued);
    Ok(out)
}

fn info(id: String, e: &Slot) -> CounterInfo {
    CounterInfo {
        id,
        uses: e.count,
        limit: e.limit(),
        expires: (e.expires != 0).then_some(e.expires),
        last_use: e.last_use(),
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

    /// Regression: a new block's count mark was queued at the reservation,
    /// its metadata only once the request was re-checked, so the two could
    /// land in different batches: with the second failing (full disk), the
    /// request got 503 and its use was on disk after the restart. The mark
    /// now goes with the metadata, and a request refused before that
    /// leaves no count on disk at all.
    #[tokio::test]
    async fn a_new_blocks_count_goes_to_disk_only_with_its_confirmation() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let on_disk = |id: &str| {
            let r = s.shared.db.begin_read().unwrap();
            let t = r.open_table(COUNTERS).unwrap();
            t.get(id).unwrap().map(|v| v.value().0)
        };
        let fresh = s.reserve(&[spec("fresh", Some(1))]).await.unwrap();
        // Another request's batch is committed meanwhile.
        s.reserve(&[spec("other", Some(10))])
            .await
            .unwrap()
            .durable
            .await
            .unwrap();
        assert!(on_disk("other").is_some());
        assert_eq!(
            on_disk("fresh"),
            None,
            "counted before its request was re-checked"
        );
        fresh.durable.await.unwrap();
        assert_eq!(on_disk("fresh"), Some(1));
    }

    /// Regression: every use past the durable mark waited for the commit
    /// that raised it, so a busy proxy stalled every 256 uses. Renewed
    /// ahead, only the very first use waits, the mark on disk still covers
    /// every granted use and exceeds the count by at most one lease, and a
    /// renewal is a commit per three quarters of a lease, not per use.
    #[tokio::test]
    async fn a_steady_stream_of_uses_waits_for_no_commit_after_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let uses = 2000;
        for n in 1..=uses {
            let r = s.reserve(&[spec("a", Some(1_000_000))]).await.unwrap();
            assert_eq!(r.uses, vec![n]);
            let mut durable = r.durable;
            match (&mut durable).now_or_never() {
                Some(done) => done.unwrap(),
                None => {
                    assert_eq!(n, 1, "use {n} had to wait for a commit");
                    durable.await.unwrap();
                }
            }
            // The writer keeps up (a commit lands within a quarter lease):
            // wait for any renewal asked to be durable before the next use.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !lock(&s.shared.state).asked.is_empty() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "renewal never committed"
                );
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let on_disk = {
                let r = s.shared.db.begin_read().unwrap();
                let t = r.open_table(COUNTERS).unwrap();
                t.get("a").unwrap().unwrap().value().0
            };
            assert!(on_disk >= n, "mark {on_disk} below {n} granted uses");
            assert!(on_disk <= n + MAX_LEASE, "mark {on_disk} over {n} + lease");
        }
        let commits = s.stats().commits.load(Ordering::Relaxed);
        assert!(
            commits <= 2 + uses / (MAX_LEASE - MAX_LEASE / RENEW_WHEN_LEFT),
            "{commits} commits for {uses} uses"
        );
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
    async fn regression_blocks_of_refused_requests_do_not_fill_their_family() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.set_max_blocks_per_family(4);
        crate::store::check_refused_blocks_leave_no_trace(&s).await;
    }

    #[tokio::test]
    async fn blocks_tracked_per_family_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.set_max_blocks_per_family(3);
        let block = crate::store::test_block;
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

    fn hex_id(n: u8) -> String {
        hex::encode([n; 64])
    }

    fn block_of(family: &str, id: &str, limit: Option<u64>) -> CounterSpec {
        CounterSpec {
            family: family.into(),
            parent: (id != family).then(|| family.to_string()),
            index: usize::from(id != family),
            label: Some(format!("label-{id}")),
            ..CounterSpec::standalone(id, limit, None)
        }
    }

    /// A file written row by row, as the code before the compact in-memory
    /// table wrote it (same tables, hex string keys, JSON metadata), opens
    /// with every count, bound, retirement and revocation intact.
    #[tokio::test]
    async fn a_file_written_by_the_previous_code_reopens_intact() {
        let dir = tempfile::tempdir().unwrap();
        let (root, kid, gone, bad) = (hex_id(1), hex_id(2), hex_id(3), hex_id(4));
        {
            let db = Database::create(dir.path().join(STORE_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(COUNTERS).unwrap();
                t.insert(root.as_str(), (40, 0)).unwrap();
                t.insert(kid.as_str(), (9, 0)).unwrap();
                t.insert("legacy-text-id", (3, 0)).unwrap();
                let mut t = txn.open_table(BLOCKS).unwrap();
                // The last one has metadata but no counter.
                let quiet = hex_id(15);
                for (id, parent, index) in [
                    (&root, None, 0),
                    (&kid, Some(root.clone()), 1),
                    (&quiet, Some(root.clone()), 1),
                ] {
                    let m = BlockMeta {
                        id: id.clone(),
                        family: root.clone(),
                        parent,
                        index,
                        label: Some("agent".into()),
                        limit: Some(50),
                        expires: None,
                        rates: Vec::new(),
                        concurrency: None,
                    };
                    let json = serde_json::to_string(&m).unwrap();
                    t.insert(id.as_str(), json.as_str()).unwrap();
                }
                let mut t = txn.open_table(RETIRED).unwrap();
                t.insert(gone.as_str(), 1).unwrap();
                let mut t = txn.open_table(REVOKED).unwrap();
                t.insert(bad.as_str(), 1).unwrap();
            }
            txn.commit().unwrap();
        }
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let ids = [root.clone(), kid.clone(), "legacy-text-id".into()];
        assert_eq!(s.peek(&ids).await.unwrap(), vec![40, 9, 3]);
        assert_eq!(CounterStore::list(&s).await.unwrap().len(), 3);
        let mut metas = s.blocks().await.unwrap();
        metas.sort_by(|a, b| (a.index, &a.id).cmp(&(b.index, &b.id)));
        assert_eq!(metas.len(), 3);
        assert_eq!(metas[1].id, kid);
        assert_eq!(metas[1].parent.as_deref(), Some(root.as_str()));
        assert_eq!(metas[1].label.as_deref(), Some("agent"));
        assert!(matches!(
            s.reserve(&[block_of(&gone, &gone, None)]).await,
            Err(StoreError::Retired)
        ));
        assert_eq!(
            s.first_revoked(std::slice::from_ref(&bad)).unwrap(),
            Some(0)
        );
        // The family already has three tracked blocks on disk.
        s.set_max_blocks_per_family(4);
        let r = s
            .reserve(&[
                block_of(&root, &root, Some(50)),
                block_of(&root, &hex_id(5), None),
            ])
            .await
            .unwrap();
        assert_eq!(r.uses, vec![41, 1]);
        let err = s
            .reserve(&[
                block_of(&root, &root, Some(50)),
                block_of(&root, &hex_id(6), None),
            ])
            .await
            .err()
            .expect("a fifth block of the family is refused");
        assert!(matches!(err, StoreError::FamilyFull { limit: 4 }), "{err}");
        let export = s.export().unwrap();
        let k = export.counters.iter().find(|c| c.id == kid).unwrap();
        assert_eq!(k.uses, 9);
        assert_eq!(k.meta.as_ref().unwrap().family, root);
    }

    /// The per-family bound is rebuilt from disk at open: a restart does not
    /// give a family room for more blocks.
    #[tokio::test]
    async fn the_family_bound_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let root = hex_id(7);
        {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            s.set_max_blocks_per_family(3);
            for kid in [8, 9] {
                s.reserve(&[
                    block_of(&root, &root, None),
                    block_of(&root, &hex_id(kid), None),
                ])
                .await
                .unwrap()
                .durable
                .await
                .unwrap();
            }
            s.close().unwrap();
        }
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.set_max_blocks_per_family(3);
        let err = s
            .reserve(&[
                block_of(&root, &root, None),
                block_of(&root, &hex_id(10), None),
            ])
            .await
            .err()
            .expect("still full after the restart");
        assert!(matches!(err, StoreError::FamilyFull { limit: 3 }), "{err}");
        let r = s
            .reserve(&[
                block_of(&root, &root, None),
                block_of(&root, &hex_id(8), None),
            ])
            .await
            .unwrap();
        assert_eq!(r.uses, vec![3, 2]);
        let labels: HashSet<String> = s
            .blocks()
            .await
            .unwrap()
            .into_iter()
            .filter_map(|m| m.label)
            .collect();
        assert_eq!(labels.len(), 3);
    }

    /// Collecting the authority block of a family whose children live on
    /// keeps the family's block count (and files the retired block under its
    /// family, read from disk).
    #[tokio::test]
    async fn collecting_an_authority_block_keeps_its_family_count() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.set_max_blocks_per_family(2);
        let root = hex_id(11);
        let soon = now_unix() + 60;
        let r = CounterSpec {
            expires: Some(soon),
            ..block_of(&root, &root, None)
        };
        s.reserve(&[r, block_of(&root, &hex_id(12), None)])
            .await
            .unwrap()
            .durable
            .await
            .unwrap();
        assert_eq!(s.gc_expired(soon + RETENTION_AFTER_EXPIRY + 1).unwrap(), 1);
        assert_eq!(s.peek(std::slice::from_ref(&root)).await.unwrap(), vec![0]);
        // The child is still tracked under the family (the collected
        // authority's slot keeps the count): two more would make three.
        let two_more = [
            block_of(&root, &hex_id(13), None),
            block_of(&root, &hex_id(14), None),
        ];
        assert!(matches!(
            s.reserve(&two_more).await,
            Err(StoreError::FamilyFull { limit: 2 })
        ));
        s.reserve(&two_more[..1]).await.unwrap();
        let export = s.export().unwrap();
        assert_eq!(export.retired.len(), 1);
        assert_eq!(export.retired[0].family.as_deref(), Some(root.as_str()));
        assert_eq!(export.counters.len(), 2);
    }

    #[test]
    fn the_family_of_a_row_is_read_fast_and_exactly() {
        let m = BlockMeta {
            id: hex_id(1),
            family: hex_id(2),
            parent: None,
            index: 0,
            label: Some("a \"quoted\" label".into()),
            limit: None,
            expires: None,
            rates: Vec::new(),
            concurrency: None,
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(family_of(&json), Some(hex_id(2)));
        // Escapes and other field orders go through serde.
        let odd = r#"{"family":"f\u0031","id":"x\"y"}"#;
        assert_eq!(family_of(odd).as_deref(), Some("f1"));
        let escaped = r#"{"id":"a","family":"b\u0032"}"#;
        assert_eq!(family_of(escaped).as_deref(), Some("b2"));
        assert_eq!(family_of("not json"), None);
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
