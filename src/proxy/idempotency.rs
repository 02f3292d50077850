//! `Idempotency-Key`: a retry of a *failed* request counts once.
//!
//! A retry within the window reuses the use counts of the first attempt
//! instead of reserving new ones, but only while the earlier attempt did
//! not get an answer from the upstream (connection error, timeout, 5xx) and
//! at most [`MAX_FREE_RETRIES`] times. Otherwise an agent could replay one
//! key forever and never spend its budget.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::sync::Cache;

/// Free retries per key and window.
pub const MAX_FREE_RETRIES: u32 = 5;
/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    InFlight,
    Failed,
    Done,
}

#[derive(Debug)]
struct Entry {
    uses: Vec<u64>,
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
    /// Count it normally, then call [`Idempotency::start`].
    Fresh,
    /// Free retry: authorize with these counts, reserve nothing.
    Replay(Vec<u64>),
    /// An attempt with this key is still running.
    Conflict,
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

    /// Looks a key up (`key` must already include the token identity).
    pub fn claim(&self, key: &str) -> Claim {
        let Some(e) = self.cache.get(key) else {
            return Claim::Fresh;
        };
        let mut e = lock(&e);
        match e.state {
            State::InFlight => Claim::Conflict,
            State::Failed if e.retries < MAX_FREE_RETRIES => {
                e.retries += 1;
                e.state = State::InFlight;
                Claim::Replay(e.uses.clone())
            }
            _ => Claim::Fresh,
        }
    }

    /// Records a counted attempt.
    pub fn start(&self, key: &str, uses: Vec<u64>) {
        self.cache.insert(
            key.to_string(),
            Arc::new(Mutex::new(Entry {
                uses,
                state: State::InFlight,
                retries: 0,
            })),
        );
    }

    /// Marks the attempt answered by the upstream (`ok`) or failed.
    pub fn finish(&self, key: &str, ok: bool) {
        if let Some(e) = self.cache.get(key) {
            lock(&e).state = if ok { State::Done } else { State::Failed };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failed_attempts_are_free_to_retry() {
        let i = Idempotency::new(Duration::from_secs(60));
        assert!(matches!(i.claim("k"), Claim::Fresh));
        i.start("k", vec![3]);
        assert!(matches!(i.claim("k"), Claim::Conflict));
        i.finish("k", false);
        assert!(matches!(i.claim("k"), Claim::Replay(u) if u == vec![3]));
        i.finish("k", true);
        assert!(matches!(i.claim("k"), Claim::Fresh));
    }

    #[test]
    fn free_retries_are_bounded() {
        let i = Idempotency::new(Duration::from_secs(60));
        i.start("k", vec![1]);
        i.finish("k", false);
        for _ in 0..MAX_FREE_RETRIES {
            assert!(matches!(i.claim("k"), Claim::Replay(_)));
            i.finish("k", false);
        }
        assert!(matches!(i.claim("k"), Claim::Fresh));
    }
}
