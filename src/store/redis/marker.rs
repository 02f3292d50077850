//! Which data set a Redis holds: a random id written once into every Redis
//! Till uses (`till:store-id`, no expiry), and kept by each proxy.
//!
//! Why: counts, rate windows and revocations are plain keys. A Redis that
//! loses them while the proxies run (`FLUSHALL`/`FLUSHDB`, a restart
//! without persistence, a failover to a server that never had them) used to
//! go on answering, every counter starting again from zero: each spent
//! token got its whole budget back, and nothing said so. The marker goes
//! with the data, so its absence (or another id: a proxy started since and
//! wrote a new one) means the data is not the data this proxy counted in.
//! Running proxies then refuse every request (503) until an operator
//! restarts them; the reserve pipeline reads it after every script call, so
//! no reservation counted on a wiped Redis is honoured. A starting proxy
//! compares it with the id it saved in its state directory ([`FILE`]), so a
//! restart does not silently accept the loss either.

use std::path::{Path, PathBuf};

use redis::aio::ConnectionManager;

use super::OP_TIMEOUT;
use crate::store::StoreError;

/// The marker's key.
pub const KEY: &str = "till:store-id";
/// Where a proxy keeps the marker of the Redis it last used, in its state
/// directory.
pub const FILE: &str = "redis-store-id";

/// The file's path in `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Reads the marker, writing a new one if Redis has none (a new Redis, or
/// one used by a version before the marker). Read first: a full Redis with
/// `noeviction` refuses a `SET`, even of a key it already has.
pub(super) async fn read_or_create(
    conn: &mut ConnectionManager,
    target: &str,
) -> Result<String, StoreError> {
    let failed = |e: String| StoreError::Io(format!("redis at {target} failed (store id): {e}"));
    let run = async {
        let have: Option<String> = redis::cmd("GET").arg(KEY).query_async(conn).await?;
        if let Some(id) = have {
            return Ok(id);
        }
        // NX, then read: of proxies starting together, all keep the first
        // id written.
        let new = hex::encode(rand::random::<[u8; 16]>());
        let (id,): (Option<String>,) = redis::pipe()
            .cmd("SET")
            .arg(KEY)
            .arg(&new)
            .arg("NX")
            .ignore()
            .get(KEY)
            .query_async(conn)
            .await?;
        Ok::<_, redis::RedisError>(id.unwrap_or(new))
    };
    match tokio::time::timeout(OP_TIMEOUT * 2, run).await {
        Ok(Ok(id)) => Ok(id),
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(_) => Err(failed("no answer".into())),
    }
}

/// Why the proxy refuses once Redis no longer holds `expected` (`found` is
/// what it holds instead).
pub(super) fn lost_message(target: &str, expected: &str, found: Option<&str>) -> String {
    let what = match found {
        None => "its store id `till:store-id` is gone".to_string(),
        Some(f) => format!("its store id `till:store-id` is now {f}, not {expected}"),
    };
    format!(
        "redis at {target} lost the data this proxy counted in ({what}: FLUSHALL or FLUSHDB, a restart without persistence, or a failover to a server without the data); its counts, rate windows and revocations may be gone, which would give spent tokens their uses back, so every request is refused (503) until a restart. Restore Redis's data (from its backup or persistence files) and restart the proxies; or, to go on with what Redis holds now (after a `till store import` of the last export, say), remove `{FILE}` from each proxy's state directory, then restart them"
    )
}

/// Checks `found` (the marker Redis holds now) against the one this proxy
/// saved in `state_dir` when it last ran with a Redis store, and saves
/// `found` for the next start. No saved marker: a first start on Redis
/// (or on a version before the marker), nothing to compare.
pub fn check_and_save(state_dir: &Path, target: &str, found: &str) -> Result<(), StoreError> {
    let p = path(state_dir);
    let open = |message: String| StoreError::Open {
        path: target.to_string(),
        message,
    };
    match std::fs::read_to_string(&p) {
        Ok(saved) => {
            let saved = saved.trim();
            if saved != found {
                return Err(open(format!(
                    "this Redis is not holding the data this proxy last counted in (its store id `till:store-id` is {found}, {} saved {saved}): it lost its data since (FLUSHALL or FLUSHDB, a restart without persistence, a failover to a server without the data) or `store` now names another Redis. Starting on it would give spent tokens their uses back. Restore Redis's data (from its backup or persistence files); or, to go on with what it holds now (a new Redis you moved the counts to with `till store import`, say), remove {} and start again",
                    p.display(),
                    p.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(open(format!("cannot read {}: {e}", p.display()))),
    }
    till_core::files::write_private(
        &p,
        format!("{found}\n").as_bytes(),
        till_core::files::Durability::Durable,
    )
    .map_err(|e| open(format!("cannot write {}: {e}", p.display())))
}
