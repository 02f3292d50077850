//! `Idempotency-Key`: a retry of a *failed* request counts once.
//!
//! A retry within the window reuses the use counts of the first attempt
//! instead of reserving new ones, but only while the earlier attempt did
//! not get an answer from the upstream (connection error, timeout, 5xx), at
//! most [`MAX_FREE_RETRIES`] times, and only for the **same request**: the
//! same method, path, query and body (a SHA-256 digest). Otherwise an agent
//! could replay one key forever, or spend a failed attempt's counts on a
//! different request.
//!
//! Claims are atomic: of two concurrent requests with one key, exactly one
//! gets [`Claim::Fresh`] (or [`Claim::Replay`]); the other gets
//! [`Claim::Conflict`]. The [`Ticket`] a claim returns settles the key when
//! dropped, so a request refused before it was counted, or abandoned by its
//! client, never leaves the key stuck "in progress".

use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::sync::Cache;
use sha2::{Digest as _, Sha256};

/// Free retries per key and window.
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

/// Recent idempotency keys.
#[derive(Clone)]
pub struct Idempotency {
    cache: Cache<String, Arc<Mutex<Entry>>>,
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

fn lock(e: &Mutex<Entry>) -> std::sync::MutexGuard<'_, Entry> {
    e.lock().unwrap_or_else(|p| p.into_inner())
}

impl Idempotency {
    pub fn new(window: Duration) -> Self {
        Idempotency {
            cache: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(window)
                .build(),
        }
    }

    /// The counts a retry with this key would reuse, if it can be free
    /// (claims nothing). The decision before the body judges a free retry
    /// by these, not by the current counts its first attempt raised.
    pub fn replay_counts(&self, key: &str) -> Option<Vec<u64>> {
        let e = self.cache.get(key)?;
        let g = lock(&e);
        (g.state == State::Failed && g.retries < MAX_FREE_RETRIES)
            .then(|| g.uses.clone())
            .flatten()
    }

    /// Claims a key (`key` must already include the token identity) for a
    /// request with this digest.
    pub fn claim(&self, key: &str, digest: RequestDigest) -> Claim {
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
        if fresh {
            drop(g);
            return Claim::Fresh(Ticket::new(entry, (State::Vacant, None, 0), false));
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
                Claim::Replay(uses, Ticket::new(entry, prev, true))
            }
            _ => {
                // Vacant, done, or out of free retries: a new counted attempt.
                g.digest = digest;
                g.state = State::InFlight;
                g.uses = None;
                g.retries = 0;
                drop(g);
                Claim::Fresh(Ticket::new(entry, prev, false))
            }
        }
    }
}

/// A claimed key. Dropped without [`Ticket::finish`], it marks a counted
/// attempt failed (a retry of the same request is then free) and gives back
/// a claim that was never counted.
pub struct Ticket {
    entry: Arc<Mutex<Entry>>,
    /// The entry as it was before this claim, restored if nothing happened.
    prev: (State, Option<Vec<u64>>, u32),
    replay: bool,
    started: bool,
    finished: bool,
}

impl Ticket {
    fn new(entry: Arc<Mutex<Entry>>, prev: (State, Option<Vec<u64>>, u32), replay: bool) -> Self {
        Ticket {
            entry,
            prev,
            replay,
            started: false,
            finished: false,
        }
    }

    /// The attempt was counted with these uses (or, for a replay, is being
    /// forwarded).
    pub fn started(&mut self, uses: Option<Vec<u64>>) {
        let mut g = lock(&self.entry);
        if let Some(u) = uses {
            g.uses = Some(u);
        }
        self.started = true;
    }

    /// The upstream answered below 500 (`ok`), or the attempt failed.
    pub fn finish(mut self, ok: bool) {
        if self.started {
            lock(&self.entry).state = if ok { State::Done } else { State::Failed };
            self.finished = true;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut g = lock(&self.entry);
        if self.started {
            g.state = State::Failed;
        } else {
            // Refused before counting: as if this request never came (a
            // replay keeps the retry it used, so retries stay bounded).
            let (state, uses, retries) =
                std::mem::replace(&mut self.prev, (State::Vacant, None, 0));
            g.state = state;
            g.uses = uses;
            g.retries = if self.replay { g.retries } else { retries };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: RequestDigest = [1; 32];
    const B: RequestDigest = [2; 32];

    #[test]
    fn only_failed_attempts_are_free_to_retry() {
        let i = Idempotency::new(Duration::from_secs(60));
        let Claim::Fresh(mut t) = i.claim("k", A) else {
            panic!("first claim is fresh")
        };
        t.started(Some(vec![3]));
        assert!(matches!(i.claim("k", A), Claim::Conflict));
        t.finish(false);
        let Claim::Replay(u, mut t) = i.claim("k", A) else {
            panic!("a failed attempt replays")
        };
        assert_eq!(u, vec![3]);
        t.started(None);
        t.finish(true);
        assert!(matches!(i.claim("k", A), Claim::Fresh(_)));
    }

    #[test]
    fn free_retries_are_bounded() {
        let i = Idempotency::new(Duration::from_secs(60));
        let Claim::Fresh(mut t) = i.claim("k", A) else {
            panic!()
        };
        t.started(Some(vec![1]));
        t.finish(false);
        for _ in 0..MAX_FREE_RETRIES {
            let Claim::Replay(_, mut t) = i.claim("k", A) else {
                panic!("replay expected")
            };
            t.started(None);
            t.finish(false);
        }
        assert!(matches!(i.claim("k", A), Claim::Fresh(_)));
    }

    /// Regression: the claim was a look-up followed by an insert, so two
    /// concurrent requests with one key were both counted as fresh.
    #[test]
    fn concurrent_claims_of_one_key_give_one_fresh_attempt() {
        let i = Idempotency::new(Duration::from_secs(60));
        let fresh = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    if let Claim::Fresh(mut t) = i.claim("k", A) {
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

    /// Regression: a failed attempt's counts could be spent on a different
    /// request under the same key.
    #[test]
    fn a_different_request_under_a_used_key_is_refused() {
        let i = Idempotency::new(Duration::from_secs(60));
        let Claim::Fresh(mut t) = i.claim("k", A) else {
            panic!()
        };
        t.started(Some(vec![1]));
        t.finish(false);
        assert!(matches!(i.claim("k", B), Claim::Mismatch));
    }

    #[test]
    fn a_claim_refused_before_counting_leaves_the_key_as_it_was() {
        let i = Idempotency::new(Duration::from_secs(60));
        drop(i.claim("k", A)); // refused before it was counted
        // Another request may use the key.
        let Claim::Fresh(mut t) = i.claim("k", B) else {
            panic!("the key is free again")
        };
        t.started(Some(vec![1]));
        drop(t); // abandoned after counting: a retry of it is free
        assert!(matches!(i.claim("k", B), Claim::Replay(..)));
    }
}
