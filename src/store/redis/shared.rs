//! What else the proxies of a deployment share through Redis besides
//! counts and revocations: `Idempotency-Key` claims and alert claims.
//!
//! Idempotency entries are hashes `till:{<family>}:i:<sha256 of the key>`
//! (the family's hash tag: they live in the family's slot), created with a
//! TTL of `idempotency_window_secs` and never extended, like the in-process
//! cache. Each transition is one Lua script, so claims are atomic across
//! proxies. Fields: `s` state (`i` in flight, `f` failed, `d` done), `d`
//! request digest, `u` counts of the counted attempt (`=` then the counts,
//! empty for none), `r` free retries used, `o` the claim's owner (random per
//! claim), so a late settle of a claim whose entry expired and was claimed
//! again changes nothing.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redis::Script;
use sha2::{Digest as _, Sha256};

use super::Inner;
use super::finish_on_drop::FinishOnDrop;
use crate::monitor::alerts::AlertClaims;
use crate::proxy::idempotency::{
    Claim, IdempotencyStore, MAX_FREE_RETRIES, Outcome, RequestDigest, Settle, Ticket, family_of,
};
use crate::store::StoreError;

/// Returns `{kind, prev state, prev counts, prev retries}`; kind is
/// `fresh`, `replay` (its counts are the prev counts), `conflict` or
/// `mismatch`. Prev state `v` means there was no entry.
const CLAIM_LUA: &str = r#"
local e = redis.call('HMGET', KEYS[1], 's', 'd', 'u', 'r')
local s, d, u, r = e[1], e[2], e[3] or '', tonumber(e[4] or '0')
if not s then
  redis.call('HSET', KEYS[1], 's', 'i', 'd', ARGV[1], 'u', '', 'r', 0, 'o', ARGV[2])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  return {'fresh', 'v', '', '0'}
end
if d ~= ARGV[1] then return {'mismatch'} end
if s == 'i' then return {'conflict'} end
if s == 'f' and r < tonumber(ARGV[4]) and u ~= '' then
  redis.call('HSET', KEYS[1], 's', 'i', 'r', r + 1, 'o', ARGV[2])
  return {'replay', s, u, tostring(r)}
end
redis.call('HSET', KEYS[1], 's', 'i', 'u', '', 'r', 0, 'o', ARGV[2])
return {'fresh', s, u, tostring(r)}
"#;

/// ARGV: owner, action (`d`, `f` or `restore`), counts (`=`… or empty to
/// keep), prev state, prev counts, prev retries, `1` for a replay (which
/// keeps the retry it used).
const SETTLE_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then return 0 end
if ARGV[2] ~= 'restore' then
  redis.call('HSET', KEYS[1], 's', ARGV[2])
  if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'u', ARGV[3]) end
  return 1
end
if ARGV[4] == 'v' then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('HSET', KEYS[1], 's', ARGV[4], 'u', ARGV[5])
if ARGV[7] ~= '1' then redis.call('HSET', KEYS[1], 'r', ARGV[6]) end
return 1
"#;

fn entry_key(scoped: &str) -> String {
    let h = Sha256::digest(scoped.as_bytes());
    format!("till:{{{}}}:i:{}", family_of(scoped), hex::encode(h))
}

fn encode_uses(uses: &[u64]) -> String {
    let mut s = String::from("=");
    s.push_str(
        &uses
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );
    s
}

/// Counts written by [`encode_uses`]; `None` for none or for anything else
/// (then the retry is simply not free).
fn decode_uses(s: &str) -> Option<Vec<u64>> {
    let body = s.strip_prefix('=')?;
    if body.is_empty() {
        return Some(Vec::new());
    }
    body.split(',').map(|n| n.parse().ok()).collect()
}

/// Idempotency claims in Redis, shared by every proxy using it.
pub struct RedisIdempotency {
    inner: Arc<Inner>,
    window: u64,
    claim: Arc<Script>,
    settle: Arc<Script>,
}

impl RedisIdempotency {
    pub(super) fn new(inner: Arc<Inner>, window: Duration) -> Self {
        RedisIdempotency {
            inner,
            window: window.as_secs().max(1),
            claim: Arc::new(Script::new(CLAIM_LUA)),
            settle: Arc::new(Script::new(SETTLE_LUA)),
        }
    }
}

impl IdempotencyStore for RedisIdempotency {
    fn replay_counts<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u64>>, StoreError>> {
        async move {
            let mut c = self.inner.conn();
            let (s, u, r): (Option<String>, Option<String>, Option<u32>) = self
                .inner
                .op(
                    "idempotency lookup",
                    redis::cmd("HMGET")
                        .arg(entry_key(key))
                        .arg("s")
                        .arg("u")
                        .arg("r")
                        .query_async(&mut c),
                )
                .await?;
            let free = s.as_deref() == Some("f") && r.unwrap_or(0) < MAX_FREE_RETRIES;
            Ok(free.then(|| u.as_deref().and_then(decode_uses)).flatten())
        }
        .boxed()
    }

    fn claim<'a>(
        &'a self,
        key: &'a str,
        digest: RequestDigest,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        let call = claim_call(
            self.inner.clone(),
            self.claim.clone(),
            self.settle.clone(),
            self.window,
            entry_key(key),
            digest,
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        async move {
            // Redis runs a sent claim whatever the proxy does. A request
            // dropped meanwhile (its client left) would leave the key "in
            // flight" for the whole window, every retry refused 409: the
            // call is finished instead, and its ticket, dropped unused,
            // gives the key back.
            FinishOnDrop::new(async move {
                let _ = tx.send(call.await);
            })
            .await;
            rx.await.unwrap_or_else(|_| Err(unexpected(&self.inner)))
        }
        .boxed()
    }
}

/// One claim script call and the [`Claim`] it makes; owns what it needs,
/// so that it can finish on its own (see `claim`).
async fn claim_call(
    inner: Arc<Inner>,
    script: Arc<Script>,
    settle: Arc<Script>,
    window: u64,
    key: String,
    digest: RequestDigest,
) -> Result<Claim, StoreError> {
    let owner = hex::encode(rand::random::<[u8; 16]>());
    let mut c = inner.conn();
    let out: Vec<String> = inner
        .op(
            "idempotency claim",
            script
                .key(&key)
                .arg(hex::encode(digest))
                .arg(&owner)
                .arg(window)
                .arg(MAX_FREE_RETRIES)
                .invoke_async(&mut c),
        )
        .await?;
    let ticket = |replay: bool, out: &[String]| {
        Ticket::new(Box::new(RedisTicket {
            inner: inner.clone(),
            script: settle.clone(),
            key: key.clone(),
            owner: owner.clone(),
            prev: (
                out.get(1).cloned().unwrap_or_default(),
                out.get(2).cloned().unwrap_or_default(),
                out.get(3).cloned().unwrap_or_default(),
            ),
            replay,
        }))
    };
    match out.first().map(String::as_str) {
        Some("fresh") => Ok(Claim::Fresh(ticket(false, &out))),
        Some("replay") => {
            let t = ticket(true, &out);
            match out.get(2).and_then(|u| decode_uses(u)) {
                Some(uses) => Ok(Claim::Replay(uses, t)),
                // Unreadable counts: give the claim back and refuse.
                None => {
                    t.finish(false).await;
                    Err(unexpected(&inner))
                }
            }
        }
        Some("conflict") => Ok(Claim::Conflict),
        Some("mismatch") => Ok(Claim::Mismatch),
        _ => Err(unexpected(&inner)),
    }
}

fn unexpected(inner: &Inner) -> StoreError {
    StoreError::Io(format!(
        "redis at {} answered the idempotency claim unexpectedly",
        inner.target
    ))
}

struct RedisTicket {
    inner: Arc<Inner>,
    script: Arc<Script>,
    key: String,
    owner: String,
    /// State, counts and retries before the claim, as the claim script
    /// returned them.
    prev: (String, String, String),
    replay: bool,
}

impl Settle for RedisTicket {
    fn settle(
        self: Box<Self>,
        outcome: Outcome,
        uses: Option<Vec<u64>>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let action = match outcome {
            Outcome::Done => "d",
            Outcome::Failed => "f",
            Outcome::Untouched => "restore",
        };
        let counts = uses.as_deref().map(encode_uses).unwrap_or_default();
        async move {
            let mut inv = self.script.prepare_invoke();
            inv.key(&self.key)
                .arg(&self.owner)
                .arg(action)
                .arg(counts)
                .arg(&self.prev.0)
                .arg(&self.prev.1)
                .arg(&self.prev.2)
                .arg(if self.replay { "1" } else { "0" });
            let mut c = self.inner.conn();
            self.inner
                .op("idempotency settle", inv.invoke_async::<i64>(&mut c))
                .await
                .map(|_| ())
        }
        .boxed()
    }
}

/// Alert keys claimed with `SET … NX EX`: the first proxy to claim sends.
pub struct RedisAlertClaims {
    pub(super) inner: Arc<Inner>,
}

impl AlertClaims for RedisAlertClaims {
    fn claim(&self, key: &str, ttl: Duration) -> BoxFuture<'static, Result<bool, StoreError>> {
        let inner = self.inner.clone();
        let key = format!("till:alert:{key}");
        let ttl = ttl.as_secs().max(1);
        async move {
            let mut c = inner.conn();
            let set: Option<String> = inner
                .op(
                    "alert claim",
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(1)
                        .arg("NX")
                        .arg("EX")
                        .arg(ttl)
                        .query_async(&mut c),
                )
                .await?;
            Ok(set.is_some())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_trip_and_garbage_is_not_free() {
        assert_eq!(decode_uses(&encode_uses(&[3, 0, 12])), Some(vec![3, 0, 12]));
        assert_eq!(decode_uses(""), None);
        assert_eq!(decode_uses("=1,x"), None);
    }

    #[test]
    fn entries_live_in_their_familys_slot() {
        let k = entry_key("abc\nlast\nmy-key");
        assert!(k.starts_with("till:{abc}:i:"), "{k}");
        assert!(!k.contains("my-key"));
    }
}
