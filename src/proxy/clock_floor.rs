//! The proxy's clock across restarts.
//!
//! [`crate::clock::MonotonicClock`] never hands out a time before one it
//! already handed out, but only within a process. This file carries the
//! latest second to the next start: saved every second while the proxy
//! runs and read before it listens, so a restart with the wall clock stepped
//! back (an NTP correction, a VM restored from a snapshot, a clock set by
//! hand) cannot revive a token the previous run saw expire, nor date the
//! revocation feed before the one services already hold.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::AppState;

/// The file in the state directory.
pub const FILE: &str = "clock";

/// How often the running proxy saves its time: a crash forgets at most this
/// much of it.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// Why the saved time cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClockFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} does not hold the proxy's last time (whole seconds since 1970); if the file was damaged, remove it and start again"
    )]
    Unreadable { path: String },
}

/// The file's path under `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The latest time (seconds since the Unix epoch) the previous run used, or
/// `None` when no run saved one.
pub fn load(dir: &Path) -> Result<Option<u64>, ClockFileError> {
    let p = path(dir);
    let shown = || p.display().to_string();
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ClockFileError::Read {
                path: shown(),
                source,
            });
        }
    };
    text.trim()
        .parse::<u64>()
        .map(Some)
        .map_err(|_| ClockFileError::Unreadable { path: shown() })
}

/// Writes `secs` to the file: a fresh temporary file (0600, never a path
/// that already exists, so a planted symlink is not written through)
/// renamed over it, so a crash leaves the old time or the new one, never
/// half of one.
pub fn save(dir: &Path, secs: u64) -> std::io::Result<()> {
    till_core::files::write_private(
        &path(dir),
        format!("{secs}\n").as_bytes(),
        till_core::files::Durability::Lazy,
    )
}

/// Saves the proxy's time every second, for as long as the task runs.
/// Failures are logged once until a save succeeds again: the proxy keeps
/// serving, only the floor of its next start is older.
pub async fn keep_saving(state: AppState, dir: PathBuf) {
    let mut tick = tokio::time::interval(SAVE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut saved = 0;
    let mut failing = false;
    loop {
        tick.tick().await;
        let now = state.clock.now_unix();
        if now == saved {
            continue;
        }
        let d = dir.clone();
        let result = tokio::task::spawn_blocking(move || save(&d, now)).await;
        match result {
            Ok(Ok(())) => {
                saved = now;
                failing = false;
            }
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::warn!(error = %e, file = %path(&dir).display(), "cannot save the proxy's time; a restart with the clock stepped back could revive tokens this run saw expire");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_time_reads_back_and_a_damaged_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None, "no file: no floor");
        save(dir.path(), 1_900_000_000).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(1_900_000_000));
        std::fs::write(path(dir.path()), "yesterday").unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("remove it"), "{e}");
    }
}
