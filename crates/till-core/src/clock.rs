//! The time the proxy tells tokens.
//!
//! Expiry checks compare a token's date with the proxy's wall clock, with no
//! tolerance: a token is valid up to and including its expiry second. A
//! wall clock can jump backwards (NTP step, manual change); we never let the
//! time we use go back, so a token once seen expired stays expired.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A wall clock that never goes backwards.
pub struct MonotonicClock {
    /// Latest time handed out, in seconds since the Unix epoch.
    last: AtomicU64,
    source: fn() -> SystemTime,
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::with_source(SystemTime::now)
    }
}

impl MonotonicClock {
    /// A clock reading `source` (tests pass a fake one).
    pub fn with_source(source: fn() -> SystemTime) -> Self {
        MonotonicClock {
            last: AtomicU64::new(0),
            source,
        }
    }

    /// Now, or the latest time already handed out if the source went back.
    pub fn now(&self) -> SystemTime {
        let now = (self.source)();
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let prev = self.last.fetch_max(secs, Ordering::AcqRel);
        if prev > secs {
            UNIX_EPOCH + Duration::from_secs(prev)
        } else {
            now
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI64;

    static FAKE: AtomicI64 = AtomicI64::new(1_900_000_000);

    fn fake() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(FAKE.load(Ordering::SeqCst) as u64)
    }

    #[test]
    fn a_backward_jump_does_not_revive_an_expired_token() {
        let c = MonotonicClock::with_source(fake);
        let t1 = c.now();
        FAKE.fetch_sub(3600, Ordering::SeqCst); // the wall clock steps back an hour
        assert_eq!(c.now(), t1, "time must not go back");
        FAKE.fetch_add(7200, Ordering::SeqCst);
        assert!(c.now() > t1);
    }
}
