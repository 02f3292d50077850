//! `Idempotency-Key`: a retry of a *failed* request counts once.
//!
//! A retry within the window reuses the use counts of the first attempt
//! instead of reserving new ones, but only while the earlier attempt did
//! not get an answer from the upstream (connection error, timeout, 5xx), at
//! most [`MAX_FREE_RETRIES`] times per counted attempt, and only for the **same request**: the
//! same method, path, query and body (a SHA-256 digest). Otherwise an agent
//! could replay one key forever, or spend a failed attempt's counts on a
//! different request.
//!
//! Claims are atomic: of two concurrent requests with one key, exactly one
//! gets [`Claim::Fresh`] (or [`Claim::Replay`]); the other gets
//! [`Claim::Conflict`]. The [`Ticket`] a claim returns settles the key when
//! dropped, so a request refused before it was counted, or abandoned by its
//! client, never leaves the key stuck "in progress".
//!
//! Where the claims live is an [`IdempotencyStore`]: in this process
//! ([`MemoryIdempotency`], the embedded store's choice) or in Redis, shared
//! by every proxy of a deployment (chosen by the counter store,
//! [`crate::store::CounterStore::idempotency`]), so a retry sent to another
//! replica is still free and still judged against the same attempt.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use moka::sync::Cache;
use sha2::{Digest as _, Sha256};

use crate::store::{CounterStore, StoreError};
use crate::verify::VerifiedToken;

/// Free retries per counted attempt: the next retry is counted again, so
/// a key makes at most this many + 1 upstream calls per use it spends.
pub const MAX_FREE_RETRIES: u32 = 5;
/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 256;

/// SHA-256 of what makes two requests the same request.
pub type RequestDigest = [u8; 32];

/// Digest of a request's method, path (with query) and body.
pub fn digest(method: &str, path_and_query: &str, body: &[u8]) -> RequestDigest {
    let mut h = Sha256::new();
    for part in [method.as_bytes(), path_and_query.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(body);
    h.finalize().into()
}

/// The key a client's `Idempotency-Key` is claimed under: the token family,
/// the token's last block and the client's key, one per line. The last
/// block keeps two holders of one family from sharing keys; the family comes
/// first so a shared store can keep the claim next to the family's
/// counters (one Redis Cluster slot).
pub fn scoped_key(token: &VerifiedToken, key: &str) -> String {
    let last = token.ids.last().map(String::as_str).unwrap_or("");
    format!("{}\n{last}\n{key}", token.family())
}

/// The family a [`scoped_key`] belongs to (empty if it names none).
pub fn family_of(scoped: &str) -> &str {
    scoped.split_once('\n').map_or("", |(f, _)| f)
}

/// What to do with a request carrying a key.
pub enum Claim {
    /// Count it normally, then call [`Ticket::started`].
    Fresh(Ticket),
    /// Free retry: authorize with these counts, reserve nothing.
    Replay(Vec<u64>, Ticket),
    /// An attempt with this key is still running.
    Conflict,
    /// The key was used for a different request within the window.
    Mismatch,
}

/// Where idempotency claims are kept. Every transition is atomic in the
/// store, so the semantics above hold across every proxy sharing it.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// The counts a retry with this key would reuse, if it can be free
    /// (claims nothing).
    fn replay_counts<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u64>>, StoreError>>;
    /// Claims a key for a request with this digest.
    fn claim<'a>(
        &'a self,
        key: &'a str,
        digest: RequestDigest,
    ) -> BoxFuture<'a, Result<Claim, StoreError>>;
}

/// How a claimed attempt ended, told to the store once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Counted (or replayed) and answered by the upstream below 500: not
    /// free to retry.
    Done,
    /// Counted (or replayed) and failed, or abandoned before it was sent
    /// on: the same request may be retried for free.
    Failed,
    /// Refused before anything was counted: the key goes back to what it
    /// was before the claim.
    Untouched,
}

/// A store's side of a [`Ticket`]: applies its outcome.
pub trait Settle: Send + 'static {
    /// `uses` are the counts of the counted attempt (none for a replay,
    /// which keeps the counts of the attempt it repeats).
    fn settle(
        self: Box<Self>,
        outcome: Outcome,
        uses: Option<Vec<u64>>,
    ) -> BoxFuture<'static, Result<(), StoreError>>;
}

/// Recent idempotency keys, in the store the counter store chose.
#[derive(Clone)]
pub struct Idempotency {
    store: Arc<dyn IdempotencyStore>,
}

impl Idempotency {
    /// Keys kept in this process for `window`.
    pub fn new(window: Duration) -> Self {
        Idempotency {
            store: Arc::new(MemoryIdempotency::new(window)),
        }
    }

    /// Keys kept where `counters` shares them with other proxies, if it
    /// does; otherwise in this process.
    pub fn for_store(counters: &dyn CounterStore, window: Duration) -> Self {
        match counters.idempotency(window) {
            Some(store) => Idempotency { store },
            None => Self::new(window),
        }
    }

    /// The counts a retry with this key would reuse, if it can be free
    /// (claims nothing). The decision before the body judges a free retry
    /// by these, not by the current counts its first attempt raised.
    pub async fn replay_counts(&self, key: &str) -> Result<Option<Vec<u64>>, StoreError> {
        self.store.replay_counts(key).await
    }

    /// Claims a key ([`scoped_key`]) for a request with this digest.
    pub async fn claim(&self, key: &str, digest: RequestDigest) -> Result<Claim, StoreError> {
        self.store.claim(key, digest).await
    }
}

/// A claimed key. Dropped without [`Ticket::finish`], it marks a counted
/// attempt failed (a retry of the same request is then free) and gives back
/// a claim that was never counted; but an attempt already sent to the
/// upstream is done, not free: the client went away while the upstream had
/// it, and may have had it acted on (hanging up before each answer made one
/// use run the same request six times).
pub struct Ticket {
    settle: Option<Box<dyn Settle>>,
    uses: Option<Vec<u64>>,
    started: bool,
    sent: bool,
}

impl Ticket {
    pub fn new(settle: Box<dyn Settle>) -> Self {
        Ticket {
            settle: Some(settle),
            uses: None,
            started: false,
            sent: false,
        }
    }

    /// The attempt is going to the upstream now.
    pub fn sent(&mut self) {
        self.sent = true;
    }

    /// The attempt was counted with these uses (or, for a replay, is being
    /// forwarded).
    pub fn started(&mut self, uses: Option<Vec<u64>>) {
        if uses.is_some() {
            self.uses = uses;
        }
        self.started = true;
    }

    /// The upstream answered below 500 (`ok`), or the attempt failed.
    /// Awaited before the answer goes back, so a client that retries at
    /// once, through any proxy, finds the key settled.
    pub async fn finish(mut self, ok: bool) {
        let outcome = match (self.started, ok) {
            (false, _) => Outcome::Untouched,
            (true, true) => Outcome::Done,
            (true, false) => Outcome::Failed,
        };
        if let Some(s) = self.settle.take()
            && let Err(e) = s.settle(outcome, self.uses.take()).await
        {
            tracing::error!(error = %e, "settling an Idempotency-Key failed; the key stays in progress until its window ends");
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Some(s) = self.settle.take() else { return };
        let outcome = match (self.started, self.sent) {
            (true, true) => Outcome::Done,
            (true, false) => Outcome::Failed,
            (false, _) => Outcome::Untouched,
        };
        let fut = s.settle(outcome, self.uses.take());
        // Drop cannot await: the in-process store has settled by the time
        // `settle` returns; a shared one's round trip is handed to the
        // runtime (there is always one on the request path).
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                if let Err(e) = fut.await {
                    tracing::error!(error = %e, "settling an abandoned Idempotency-Key failed; the key stays in progress until its window ends");
                }
            });
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// As if absent: a claim was given back before anything was counted.
    Vacant,
    InFlight,
    Failed,
    Done,
}

#[derive(Debug)]
struct Entry {
    digest: RequestDigest,
    /// Counts of the counted attempt, once there is one.
    uses: Option<Vec<u64>>,
    state: State,
    retries: u32,
}

fn lock(e: &Mutex<Entry>) -> std::sync::MutexGuard<'_, Entry> {
    e.lock().unwrap_or_else(|p| p.into_inner())
}

/// Idempotency keys in this process (one proxy, or tests).
pub struct MemoryIdempotency {
    cache: Cache<String, Arc<Mutex<Entry>>>,
}

impl MemoryIdempotency {
    pub fn new(window: Duration) -> Self {
        MemoryIdempotency {
            cache: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(window)
                .build(),
        }
    }

    fn replay_counts_now(&self, key: &str) -> Option<Vec<u64>> {
        let e = self.cache.get(key)?;
        let g = lock(&e);
        (g.state == State::Failed && g.retries < MAX_FREE_RETRIES)
            .then(|| g.uses.clone())
            .flatten()
    }

    fn claim_now(&self, key: &str, digest: RequestDigest) -> Claim {
        let e = self.cache.entry(key.to_string()).or_insert_with(|| {
            Arc::new(Mutex::new(Entry {
                digest,
                uses: None,
                state: State::InFlight,
                retries: 0,
            }))
        });
        let fresh = e.is_fresh();
        let entry = e.into_value();
        let mut g = lock(&entry);
        let prev = (g.state, g.uses.clone(), g.retries);
        let ticket = |entry, prev, replay| {
            Ticket::new(Box::new(MemoryTicket {
                entry,
                prev,
                replay,
            }))
        };
        if fresh {
            drop(g);
            return Claim::Fresh(ticket(entry, (State::Vacant, None, 0), false));
        }
        if g.state != State::Vacant && g.digest != digest {
            return Claim::Mismatch;
        }
        match g.state {
            State::InFlight => Claim::Conflict,
            State::Failed if g.retries < MAX_FREE_RETRIES && g.uses.is_some() => {
                g.retries += 1;
                g.state = State::InFlight;
                let uses = g.uses.clone().unwrap_or_default();
                drop(g);
                Claim::Replay(uses, ticket(entry, prev, true))
            }
            _ => {
                // Vacant, done, or out of free retries: a new counted attempt.
                g.digest = digest;
                g.state = State::InFlight;
                g.uses = None;
                g.retries = 0;
                drop(g);
                Claim::Fresh(ticket(entry, prev, false))
            }
        }
    }
}

impl IdempotencyStore for MemoryIdempotency {
    fn replay_counts<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u64>>, StoreError>> {
        let out = self.replay_counts_now(key);
        async move { Ok(out) }.boxed()
    }

    fn claim<'a>(
        &'a self,
        key: &'a str,
        digest: RequestDigest,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        let out = self.claim_now(key, digest);
        async move { Ok(out) }.boxed()
    }
}

struct MemoryTicket {
    entry: Arc<Mutex<Entry>>,
    /// The entry as it was before this claim, restored if nothing happened.
    prev: (State, Option<Vec<u64>>, u32),
    replay: bool,
}

impl Settle for MemoryTicket {
    fn settle(
        self: Box<Self>,
        outcome: Outcome,
        uses: Option<Vec<u64>>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let mut g = lock(&self.entry);
        match outcome {
            Outcome::Done | Outcome::Failed => {
                if uses.is_some() {
                    g.uses = uses;
                }
                g.state = if outcome == Outcome::Done {
                    State::Done
                } else {
                    State::Failed
                };
            }
            Outcome::Untouched => {
                // As if this request never came (a replay keeps the retry
                // it used, so retries stay bounded).
                let (state, uses, retries) = self.prev;
                g.state = state;
                g.uses = uses;
                if !self.replay {
                    g.retries = retries;
                }
            }
        }
        async { Ok(()) }.boxed()
    }
}

/// The semantics every [`IdempotencyStore`] must have, run against the
/// in-process store here and against a real Redis in `store::redis`.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;

    pub const A: RequestDigest = [1; 32];
    pub const B: RequestDigest = [2; 32];

    async fn claim(i: &Idempotency, key: &str, d: RequestDigest) -> Claim {
        i.claim(key, d).await.expect("the store answers")
    }

    pub async fn only_failed_attempts_are_free_to_retry(i: &Idempotency) {
        let k = "fam\nlast\nk1";
        let Claim::Fresh(mut t) = claim(i, k, A).await else {
            panic!("first claim is fresh")
        };
        t.started(Some(vec![3]));
        assert!(matches!(claim(i, k, A).await, Claim::Conflict));
        t.finish(false).await;
        assert_eq!(i.replay_counts(k).await.unwrap(), Some(vec![3]));
        let Claim::Replay(u, mut t) = claim(i, k, A).await else {
            panic!("a failed attempt replays")
        };
        assert_eq!(u, vec![3]);
        t.started(None);
        t.finish(true).await;
        assert_eq!(i.replay_counts(k).await.unwrap(), None);
        assert!(matches!(claim(i, k, A).await, Claim::Fresh(_)));
    }

    pub async fn free_retries_are_bounded(i: &Idempotency) {
        let k = "fam\nlast\nk2";
        let Claim::Fresh(mut t) = claim(i, k, A).await else {
            panic!()
        };
        t.started(Some(vec![1]));
        t.finish(false).await;
        for _ in 0..MAX_FREE_RETRIES {
            let Claim::Replay(_, mut t) = claim(i, k, A).await else {
                panic!("replay expected")
            };
            t.started(None);
            t.finish(false).await;
        }
        assert!(matches!(claim(i, k, A).await, Claim::Fresh(_)));
    }

    pub async fn a_different_request_under_a_used_key_is_refused(i: &Idempotency) {
        let k = "fam\nlast\nk3";
        let Claim::Fresh(mut t) = claim(i, k, A).await else {
            panic!()
        };
        t.started(Some(vec![1]));
        t.finish(false).await;
        assert!(matches!(claim(i, k, B).await, Claim::Mismatch));
    }

    pub async fn a_claim_refused_before_counting_leaves_the_key_as_it_was(i: &Idempotency) {
        let k = "fam\nlast\nk4";
        let Claim::Fresh(t) = claim(i, k, A).await else {
            panic!()
        };
        t.finish(true).await; // refused before it was counted
        // Another request may use the key.
        let Claim::Fresh(mut t) = claim(i, k, B).await else {
            panic!("the key is free again")
        };
        t.started(Some(vec![1]));
        drop(t); // abandoned after counting: a retry of it is free
        for _ in 0..200 {
            if i.replay_counts(k).await.unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let Claim::Replay(_, t) = claim(i, k, B).await else {
            panic!("an abandoned counted attempt replays")
        };
        t.finish(false).await; // refused before it was forwarded
        let Claim::Replay(_, mut t) = claim(i, k, B).await else {
            panic!("still free to retry")
        };
        // Abandoned once sent to the upstream: done, the next is counted.
        t.started(None);
        t.sent();
        drop(t);
        for _ in 0..200 {
            if i.replay_counts(k).await.unwrap().is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let Claim::Fresh(t) = claim(i, k, B).await else {
            panic!("an attempt abandoned after it was sent is not free to retry")
        };
        t.finish(true).await;
    }

    /// Regression: the claim was a look-up followed by an insert, so two
    /// concurrent requests with one key were both counted as fresh.
    pub async fn concurrent_claims_of_one_key_give_one_fresh_attempt(i: &Idempotency) {
        let k = "fam\nlast\nk5";
        let claims = futures_util::future::join_all((0..16).map(|_| i.claim(k, A))).await;
        let mut held = Vec::new();
        let mut fresh = 0;
        for c in claims {
            match c.unwrap() {
                Claim::Fresh(t) => {
                    fresh += 1;
                    held.push(t);
                }
                Claim::Conflict => {}
                _ => panic!("only fresh or conflict"),
            }
        }
        assert_eq!(fresh, 1);
    }

    pub async fn all(i: &Idempotency) {
        only_failed_attempts_are_free_to_retry(i).await;
        free_retries_are_bounded(i).await;
        a_different_request_under_a_used_key_is_refused(i).await;
        a_claim_refused_before_counting_leaves_the_key_as_it_was(i).await;
        concurrent_claims_of_one_key_give_one_fresh_attempt(i).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_in_process_store_keeps_the_idempotency_semantics() {
        conformance::all(&Idempotency::new(Duration::from_secs(60))).await;
    }

    /// Regression: the claim was a look-up followed by an insert, so two
    /// concurrent requests with one key were both counted as fresh.
    #[test]
    fn concurrent_claims_of_one_key_give_one_fresh_attempt_across_threads() {
        let i = MemoryIdempotency::new(Duration::from_secs(60));
        let fresh = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    if let Claim::Fresh(mut t) = i.claim_now("k", conformance::A) {
                        fresh.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        t.started(Some(vec![1]));
                        // Held until the scope ends: still in flight.
                        std::mem::forget(t);
                    }
                });
            }
        });
        assert_eq!(fresh.into_inner(), 1);
    }
}
