//! Rate windows and concurrency caps: the state behind the `rate` and
//! `in_flight` facts (ARCHITECTURE.md, "Rate windows and concurrency caps").
//!
//! **Semantics: a sliding log.** A window `N/D` of a block keeps the
//! admission times of the requests it let through during the last `D`; a
//! request is admitted only if every window of every block of its token
//! holds fewer than `N`, and then it takes a slot in all of them at once
//! (all or nothing). So no interval of length `D` ever holds more than `N`
//! admissions, whatever the number of connections, children or proxies: a
//! fixed window would let `2N` through around a boundary, and a sliding
//! counter or GCRA trades that exactness for memory. The cost is one
//! timestamp per admitted request per window for `D` (8 bytes here, about
//! 60 in a Redis sorted set), so a window holds at most `N` of them, and
//! `N` is bounded by [`crate::token::vocab::MAX_RATE`].
//!
//! A concurrency cap counts the block's requests in flight: a slot is taken
//! with the window slots and held until the response body has been sent (a
//! streamed answer included) or the client went away.
//!
//! Windows are not durable the way use counts are (no disk write, no fsync
//! on the request path). The in-process store used with the embedded
//! counter store is saved off the request path ([`LocalWindows::save`]):
//! every [`SAVE_EVERY`] when it changed, and at a graceful shutdown, and
//! read back at start, so a restart keeps the windows and a crash forgets
//! at most the admissions of the last interval. See SECURITY.md.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::StoreError;
use crate::verify::{CapSpec, WindowCounts, WindowSpec};

/// The answer of [`WindowStore::admit`].
#[derive(Debug)]
pub enum Admit {
    /// Slots were taken in every window and cap; `counts` are the counts
    /// with this request included, for the Datalog re-check.
    Admitted {
        counts: WindowCounts,
        ticket: Ticket,
    },
    /// Nothing was taken: a window or cap is full.
    Full(Full),
}

/// Which limit is full and when it can free a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Full {
    /// The block whose window or cap is full.
    pub block: usize,
    /// `Some(seconds)` for a rate window, `None` for a concurrency cap.
    pub window: Option<u64>,
    pub limit: u64,
    /// Milliseconds until the oldest admission leaves the window (for a
    /// cap: unknown, the caller suggests a short wait).
    pub retry_after_ms: u64,
}

/// What one admission took, to give back: the slots of a request refused
/// after admission, or its in-flight slots when it ends.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// Unique per admission.
    pub member: String,
    pub family: String,
    /// `(block id, seconds)` of each rate window.
    pub windows: Vec<(String, u64)>,
    /// Block ids of each concurrency cap.
    pub caps: Vec<String>,
}

/// Rate-window and concurrency state, keyed by (block, window). Exact under
/// concurrency: [`WindowStore::admit`] checks and takes atomically.
pub trait WindowStore: Send + Sync + 'static {
    /// Admits the request if every window and cap has room, taking one slot
    /// in each; otherwise takes nothing.
    fn admit(
        &self,
        family: &str,
        windows: &[WindowSpec],
        caps: &[CapSpec],
    ) -> BoxFuture<'_, Result<Admit, StoreError>>;
    /// Gives back every slot of a request refused before it was forwarded.
    fn cancel(&self, ticket: &Ticket) -> BoxFuture<'_, Result<(), StoreError>>;
    /// The request ended: frees its in-flight slots (rate slots stay).
    fn finish(&self, ticket: &Ticket) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Keeps the in-flight slots of a long request alive (stores whose
    /// slots expire on their own, so a killed proxy cannot hold them
    /// forever). How often: [`WindowStore::lease`] / 3.
    fn renew(&self, _ticket: &Ticket) -> BoxFuture<'_, Result<(), StoreError>> {
        async { Ok(()) }.boxed()
    }
    /// How long an in-flight slot lives without [`WindowStore::renew`];
    /// `None`: until it is finished.
    fn lease(&self) -> Option<std::time::Duration> {
        None
    }
}

/// Milliseconds since the Unix epoch: the wall clock read once, at the
/// first call, advanced by the monotonic clock since. A window measures
/// time that passed, and a wall clock stepped forward while the proxy runs
/// (NTP, by hand) would otherwise empty every window at once, or stretch
/// them all when stepped back. Across a restart the saved admissions are
/// read against the new run's wall clock (SECURITY.md, "Clock").
fn now_ms() -> u64 {
    static ANCHOR: std::sync::OnceLock<(std::time::Instant, u64)> = std::sync::OnceLock::new();
    let (at, wall) = ANCHOR.get_or_init(|| {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        (std::time::Instant::now(), wall)
    });
    wall.saturating_add(at.elapsed().as_millis() as u64)
}

/// Admissions of one window: (time in ms, admission number), oldest first.
type Log = VecDeque<(u64, u64)>;

#[derive(Default)]
struct State {
    /// Block id → (window seconds, log): looked up by `&str`, so the
    /// request path allocates a key only for a window's first admission.
    logs: HashMap<String, Vec<(u64, Log)>>,
    flights: HashMap<String, u64>,
}

/// The in-process store, used with the embedded counter store: one mutex
/// over plain maps, held for a few comparisons per window (never across an
/// await), so a std `Mutex` is the right tool.
pub struct LocalWindows {
    state: Mutex<State>,
    seq: AtomicU64,
    /// Bumped by every change of a log: what the saver compares.
    changes: AtomicU64,
    /// Admissions since the last sweep of idle windows.
    since_sweep: AtomicU64,
    clock: fn() -> u64,
}

impl Default for LocalWindows {
    fn default() -> Self {
        Self::with_clock(now_ms)
    }
}

/// Admissions between two sweeps of windows nobody uses any more: keeps
/// memory to the windows active in their last span, at a cost amortised
/// over this many requests.
const SWEEP_EVERY: u64 = 4096;

impl LocalWindows {
    /// A store reading time (ms since the epoch) from `clock` (tests).
    pub fn with_clock(clock: fn() -> u64) -> Self {
        LocalWindows {
            state: Mutex::new(State::default()),
            seq: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            since_sweep: AtomicU64::new(0),
            clock,
        }
    }

    /// A count that moves whenever a window's log changes.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Writes every live window's admission times to `path` (a temporary
    /// file renamed over it, so a crash leaves the old file or the new
    /// one; mode 0600). No fsync: this bounds what a process crash forgets, not what
    /// a power loss does. Concurrency caps are not saved: the requests
    /// they counted end with the process.
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        let now = (self.clock)();
        let saved = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut saved = Vec::new();
            for (id, windows) in st.logs.iter_mut() {
                for (secs, log) in windows.iter_mut() {
                    expire(log, now, *secs);
                    if !log.is_empty() {
                        saved.push(SavedWindow {
                            block: id.clone(),
                            seconds: *secs,
                            times: log.iter().map(|e| e.0).collect(),
                        });
                    }
                }
            }
            saved
        };
        let file = SavedWindows {
            version: 1,
            windows: saved,
        };
        let text = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
        // A fresh 0600 temporary file, never one that already exists: a
        // symlink planted at its name is removed, not written through.
        till_core::files::write_private(path, &text, till_core::files::Durability::Lazy)
    }

    /// Reads windows saved by [`LocalWindows::save`] into an empty store;
    /// returns how many windows hold admissions. A missing file is an
    /// empty store (a first start).
    pub fn load(&self, path: &std::path::Path) -> Result<usize, String> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let file: SavedWindows = serde_json::from_slice(&text)
            .map_err(|e| format!("{} is not a saved window file: {e}", path.display()))?;
        if file.version != 1 {
            return Err(format!(
                "{} has version {}, this Till reads version 1",
                path.display(),
                file.version
            ));
        }
        let now = (self.clock)();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut loaded = 0;
        for w in file.windows {
            let log = log_of(&mut st.logs, &w.block, w.seconds);
            for t in w.times {
                let n = self.seq.fetch_add(1, Ordering::Relaxed);
                log.push_back((t, n));
            }
            log.make_contiguous().sort_unstable();
            expire(log, now, w.seconds);
            loaded += usize::from(!log.is_empty());
        }
        st.logs.retain(|_, windows| {
            windows.retain(|(_, log)| !log.is_empty());
            !windows.is_empty()
        });
        Ok(loaded)
    }

    /// The synchronous admission (what [`WindowStore::admit`] runs).
    pub fn admit_now(&self, family: &str, windows: &[WindowSpec], caps: &[CapSpec]) -> Admit {
        let now = (self.clock)();
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.since_sweep.fetch_add(1, Ordering::Relaxed) >= SWEEP_EVERY {
            self.since_sweep.store(0, Ordering::Relaxed);
            st.logs.retain(|_, windows| {
                windows.retain_mut(|(secs, log)| {
                    expire(log, now, *secs);
                    !log.is_empty()
                });
                !windows.is_empty()
            });
        }
        // Check everything first: a refusal takes nothing.
        let mut full: Option<Full> = None;
        let mut counts = WindowCounts::default();
        for w in windows {
            let log = log_of(&mut st.logs, &w.id, w.seconds);
            expire(log, now, w.seconds);
            let used = log.len() as u64;
            if used >= w.limit {
                let oldest = log.front().map_or(now, |e| e.0);
                let wait = (oldest + w.seconds * 1000).saturating_sub(now).max(1);
                if full.as_ref().is_none_or(|f| wait > f.retry_after_ms) {
                    full = Some(Full {
                        block: w.block,
                        window: Some(w.seconds),
                        limit: w.limit,
                        retry_after_ms: wait,
                    });
                }
            }
            counts.rates.push((w.block, w.seconds, used + 1));
        }
        for c in caps {
            let busy = st.flights.get(&c.id).copied().unwrap_or(0);
            if busy >= c.limit && full.is_none() {
                full = Some(Full {
                    block: c.block,
                    window: None,
                    limit: c.limit,
                    retry_after_ms: 1000,
                });
            }
            counts.in_flight.push((c.block, busy + 1));
        }
        if let Some(f) = full {
            // Windows created only to be looked at hold nothing.
            for w in windows {
                if let Some(v) = st.logs.get_mut(w.id.as_str()) {
                    v.retain(|(_, log)| !log.is_empty());
                    if v.is_empty() {
                        st.logs.remove(w.id.as_str());
                    }
                }
            }
            return Admit::Full(f);
        }
        for w in windows {
            log_of(&mut st.logs, &w.id, w.seconds).push_back((now, n));
        }
        if !windows.is_empty() {
            self.changes.fetch_add(1, Ordering::Relaxed);
        }
        for c in caps {
            match st.flights.get_mut(c.id.as_str()) {
                Some(busy) => *busy += 1,
                None => {
                    st.flights.insert(c.id.clone(), 1);
                }
            }
        }
        Admit::Admitted {
            counts,
            ticket: Ticket {
                member: n.to_string(),
                family: family.to_string(),
                windows: windows.iter().map(|w| (w.id.clone(), w.seconds)).collect(),
                caps: caps.iter().map(|c| c.id.clone()).collect(),
            },
        }
    }

    fn give_back(&self, ticket: &Ticket, windows: bool) {
        let Ok(n) = ticket.member.parse::<u64>() else {
            return;
        };
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if windows {
            for (id, secs) in &ticket.windows {
                if let Some(v) = st.logs.get_mut(id.as_str())
                    && let Some((_, log)) = v.iter_mut().find(|(s, _)| s == secs)
                    && let Some(i) = log.iter().rposition(|e| e.1 == n)
                {
                    log.remove(i);
                    self.changes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        for id in &ticket.caps {
            if let Some(c) = st.flights.get_mut(id) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    st.flights.remove(id);
                }
            }
        }
    }

    /// Windows and caps holding state (tests: memory is given back).
    pub fn active(&self) -> (usize, usize) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (st.logs.len(), st.flights.len())
    }
}

/// How often the embedded store saves its windows when they changed.
pub const SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The file [`LocalWindows::save`] writes.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedWindows {
    version: u32,
    windows: Vec<SavedWindow>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedWindow {
    block: String,
    seconds: u64,
    /// Admission times, ms since the Unix epoch.
    times: Vec<u64>,
}

/// The log of block `id`'s window of `secs`, created empty if need be.
fn log_of<'a>(logs: &'a mut HashMap<String, Vec<(u64, Log)>>, id: &str, secs: u64) -> &'a mut Log {
    if !logs.contains_key(id) {
        logs.insert(id.to_string(), Vec::new());
    }
    let Some(windows) = logs.get_mut(id) else {
        unreachable!("inserted just above, under the same lock");
    };
    match windows.iter().position(|(s, _)| *s == secs) {
        Some(i) => &mut windows[i].1,
        None => {
            windows.push((secs, Log::new()));
            let last = windows.len() - 1;
            &mut windows[last].1
        }
    }
}

/// Drops the admissions older than the window: an admission at `t` counts
/// while `now - t < span`.
fn expire(log: &mut Log, now: u64, secs: u64) {
    let span = secs * 1000;
    while log.front().is_some_and(|e| e.0 + span <= now) {
        log.pop_front();
    }
}

impl WindowStore for LocalWindows {
    fn admit(
        &self,
        family: &str,
        windows: &[WindowSpec],
        caps: &[CapSpec],
    ) -> BoxFuture<'_, Result<Admit, StoreError>> {
        let a = self.admit_now(family, windows, caps);
        async move { Ok(a) }.boxed()
    }
    fn cancel(&self, ticket: &Ticket) -> BoxFuture<'_, Result<(), StoreError>> {
        self.give_back(ticket, true);
        async { Ok(()) }.boxed()
    }
    fn finish(&self, ticket: &Ticket) -> BoxFuture<'_, Result<(), StoreError>> {
        self.give_back(ticket, false);
        async { Ok(()) }.boxed()
    }
}

/// The slots of one admitted request. Dropped before
/// [`WindowGuard::forwarded`], it gives every slot back (the request was
/// refused or abandoned before anything was sent); after it, only the
/// in-flight slots are freed, when the [`InFlight`] it returned is dropped.
pub struct WindowGuard {
    store: Arc<dyn WindowStore>,
    ticket: Option<Ticket>,
}

impl WindowGuard {
    pub fn new(store: Arc<dyn WindowStore>, ticket: Ticket) -> Self {
        WindowGuard {
            store,
            ticket: Some(ticket),
        }
    }

    /// The request is being forwarded: its rate slots are spent; its
    /// in-flight slots are held by the returned guard (keep it until the
    /// response ends).
    pub fn forwarded(mut self) -> InFlight {
        let ticket = self.ticket.take().filter(|t| !t.caps.is_empty());
        let renewer = match (&ticket, self.store.lease()) {
            (Some(t), Some(lease)) => tokio::runtime::Handle::try_current().ok().map(|h| {
                let (store, t) = (self.store.clone(), t.clone());
                h.spawn(async move {
                    let every = lease / 3;
                    loop {
                        tokio::time::sleep(every).await;
                        if let Err(e) = store.renew(&t).await {
                            tracing::warn!(error = %e, "renewing an in-flight slot failed");
                        }
                    }
                })
            }),
            _ => None,
        };
        InFlight {
            store: self.store.clone(),
            ticket,
            renewer,
        }
    }
}

fn spawn_or_run(fut: BoxFuture<'static, ()>) {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn(fut);
        }
        Err(_) => futures_util::FutureExt::now_or_never(fut).unwrap_or(()),
    }
}

impl Drop for WindowGuard {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            let store = self.store.clone();
            spawn_or_run(
                async move {
                    if let Err(e) = store.cancel(&t).await {
                        tracing::error!(error = %e, "giving back the window slots of a refused request failed");
                    }
                }
                .boxed(),
            );
        }
    }
}

/// In-flight slots held until the response ends (dropped with its body).
pub struct InFlight {
    store: Arc<dyn WindowStore>,
    ticket: Option<Ticket>,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

impl InFlight {
    /// Whether this holds any in-flight slot (a token with a cap).
    pub fn holds_slots(&self) -> bool {
        self.ticket.is_some()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
        if let Some(t) = self.ticket.take() {
            let store = self.store.clone();
            spawn_or_run(
                async move {
                    if let Err(e) = store.finish(&t).await {
                        tracing::error!(error = %e, "freeing an in-flight slot failed");
                    }
                }
                .boxed(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    static NOW: AtomicU64 = AtomicU64::new(1_000_000);
    fn fake() -> u64 {
        NOW.load(Ordering::SeqCst)
    }

    fn w(block: usize, id: &str, limit: u64, seconds: u64) -> WindowSpec {
        WindowSpec {
            block,
            id: id.into(),
            limit,
            seconds,
        }
    }

    #[test]
    fn a_sliding_window_never_holds_more_than_n_in_any_span() {
        let s = LocalWindows::with_clock(fake);
        let win = [w(0, "a", 3, 10)];
        let start = fake();
        let mut admitted = Vec::new();
        // One attempt every 700 ms for a minute.
        for i in 0..86u64 {
            NOW.store(start + i * 700, Ordering::SeqCst);
            if let Admit::Admitted { counts, .. } = s.admit_now("a", &win, &[]) {
                assert!(counts.rates[0].2 <= 3);
                admitted.push(fake());
            } else if let Admit::Full(f) = s.admit_now("a", &win, &[]) {
                assert!(f.retry_after_ms <= 10_000 && f.retry_after_ms >= 1, "{f:?}");
            }
        }
        for (i, t) in admitted.iter().enumerate() {
            let in_span = admitted[i..].iter().filter(|u| **u < t + 10_000).count();
            assert!(in_span <= 3, "{in_span} admissions within 10 s of {t}");
        }
        // Sliding: about 3 per 10 s over 60 s, not more.
        assert!(
            admitted.len() >= 15 && admitted.len() <= 21,
            "{}",
            admitted.len()
        );
    }

    #[test]
    fn a_refusal_takes_nothing_and_a_cancel_gives_back() {
        let s = LocalWindows::with_clock(fake);
        let parent = w(0, "p", 2, 60);
        let child = w(1, "c", 5, 60);
        let Admit::Admitted { ticket, .. } =
            s.admit_now("p", &[parent.clone(), child.clone()], &[])
        else {
            panic!("first admitted")
        };
        s.admit_now("p", std::slice::from_ref(&parent), &[]);
        // The parent's window is full: the child's is not touched.
        let Admit::Full(f) = s.admit_now("p", &[parent.clone(), child.clone()], &[]) else {
            panic!("full")
        };
        assert_eq!((f.block, f.window, f.limit), (0, Some(60), 2));
        let Admit::Admitted { counts, .. } = s.admit_now("p", std::slice::from_ref(&child), &[])
        else {
            panic!("child alone")
        };
        assert_eq!(counts.rates, vec![(1, 60, 2)]);
        // Giving back the first admission frees a parent slot.
        s.give_back(&ticket, true);
        assert!(matches!(
            s.admit_now("p", &[parent, child], &[]),
            Admit::Admitted { .. }
        ));
    }

    #[test]
    fn a_cap_frees_its_slot_when_the_request_finishes() {
        let s = LocalWindows::with_clock(fake);
        let cap = [CapSpec {
            block: 0,
            id: "k".into(),
            limit: 1,
        }];
        let Admit::Admitted { ticket, counts } = s.admit_now("k", &[], &cap) else {
            panic!("admitted")
        };
        assert_eq!(counts.in_flight, vec![(0, 1)]);
        assert!(matches!(s.admit_now("k", &[], &cap), Admit::Full(_)));
        s.give_back(&ticket, false);
        assert!(matches!(
            s.admit_now("k", &[], &cap),
            Admit::Admitted { .. }
        ));
        assert_eq!(s.active(), (0, 1));
    }
}
