//! The time the proxy tells tokens.
//!
//! Expiry checks compare a token's date with the proxy's wall clock, with no
//! tolerance: a token is valid up to and including its expiry second. A
//! wall clock can jump backwards (NTP step, manual change); we never let the
//! time we use go back, so a token once seen expired stays expired. A
//! process that saves [`MonotonicClock::now_unix`] and hands it back to
//! [`MonotonicClock::raise_to`] at its next start keeps that promise across
//! restarts too.

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

    /// [`MonotonicClock::now`] in whole seconds since the Unix epoch.
    pub fn now_unix(&self) -> u64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    /// Never hand out a time before `secs` (seconds since the Unix epoch):
    /// the latest time a previous run used, so a restart with the wall clock
    /// stepped back cannot revive a token that run saw expire.
    pub fn raise_to(&self, secs: u64) {
        self.last.fetch_max(secs, Ordering::AcqRel);
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

    #[test]
    fn a_floor_from_a_previous_run_holds_until_the_wall_clock_passes_it() {
        let c = MonotonicClock::with_source(|| UNIX_EPOCH + Duration::from_secs(1_000));
        c.raise_to(5_000);
        assert_eq!(c.now_unix(), 5_000, "the floor, not the earlier wall clock");
        c.raise_to(10);
        assert_eq!(c.now_unix(), 5_000, "a lower floor changes nothing");
        let d = MonotonicClock::with_source(|| UNIX_EPOCH + Duration::from_secs(9_000));
        d.raise_to(5_000);
        assert_eq!(d.now_unix(), 9_000, "a wall clock past the floor is used");
    }
}
