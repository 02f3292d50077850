//! Rate windows and concurrency caps shared through Redis: the same sliding
//! log as the in-process store ([`crate::store::window`]), exact across
//! every proxy using this Redis.
//!
//! * A rate window is a sorted set `till:{<family>}:w:<block id>:<seconds>`
//!   of admissions (member: a random id per admission, score: admission
//!   time in ms), with a TTL of the window's length: an idle window costs
//!   nothing after it.
//! * A concurrency cap is a sorted set `till:{<family>}:f:<block id>` of
//!   in-flight leases (score: when the lease ends). A proxy renews its
//!   leases while a response streams; a killed proxy's leases end within
//!   [`LEASE`], so it cannot hold a slot forever.
//!
//! One script checks every window and cap of the request and takes a slot
//! in each, or none, in one round trip; the time is Redis's own (`TIME`),
//! so proxies with skewed clocks still share one exact window. Every key
//! carries the family's hash tag: one slot, as for the counters.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redis::Script;

use super::Inner;
use super::finish_on_drop::FinishOnDrop;
use crate::store::StoreError;
use crate::store::window::{Admit, Full, Ticket, WindowStore};
use crate::verify::{CapSpec, WindowCounts, WindowSpec};

/// How long an in-flight slot lives without renewal.
pub const LEASE: Duration = Duration::from_secs(30);

/// KEYS: windows, then caps. ARGV: number of windows, member, lease (ms),
/// then (seconds, limit) per window, then limit per cap. Returns
/// `{1, count...}` (this request included, windows then caps) or
/// `{0, key index, ms until a slot frees}`.
const ADMIT_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nw = tonumber(ARGV[1])
local member = ARGV[2]
local lease = tonumber(ARGV[3])
local out = {1}
local full = nil
for i = 1, nw do
  local span = tonumber(ARGV[2 + 2 * i]) * 1000
  local limit = tonumber(ARGV[3 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - span)
  local used = redis.call('ZCARD', KEYS[i])
  if used >= limit then
    local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    local wait = tonumber(oldest[2]) + span - now
    if wait < 1 then wait = 1 end
    if not full or wait > full[3] then full = {0, i, wait} end
  end
  out[#out + 1] = used + 1
end
for j = 1, #KEYS - nw do
  local k = KEYS[nw + j]
  local limit = tonumber(ARGV[3 + 2 * nw + j])
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  local busy = redis.call('ZCARD', k)
  if busy >= limit and not full then full = {0, nw + j, 1000} end
  out[#out + 1] = busy + 1
end
if full then return full end
for i = 1, nw do
  redis.call('ZADD', KEYS[i], now, member)
  redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2 + 2 * i]) * 1000)
end
for j = 1, #KEYS - nw do
  redis.call('ZADD', KEYS[nw + j], now + lease, member)
  redis.call('PEXPIRE', KEYS[nw + j], lease)
end
return out
"#;

/// KEYS: cap sets. ARGV: member, lease (ms). Extends the lease, and puts
/// back a slot whose lease ended while its request still runs: renewals
/// fail while Redis is unreachable, and a slot left out after Redis is back
/// would let the cap admit one request more for as long as the response
/// streams. Only a live request renews (its guard stops the renewals before
/// it frees the slot, on the same connection), so nothing finished comes
/// back.
const RENEW_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2]))
end
return 1
"#;

fn window_key(family: &str, id: &str, secs: u64) -> String {
    format!("till:{{{family}}}:w:{id}:{secs}")
}

fn cap_key(family: &str, id: &str) -> String {
    format!("till:{{{family}}}:f:{id}")
}

/// [`WindowStore`] on the proxy's Redis connection.
pub struct RedisWindows {
    inner: Arc<Inner>,
    admit: Arc<Script>,
    renew: Script,
    lease: Duration,
}

impl RedisWindows {
    pub(super) fn new(inner: Arc<Inner>) -> Self {
        Self::with_lease(inner, LEASE)
    }

    /// In-flight leases of `lease` (tests shorten it).
    pub(super) fn with_lease(inner: Arc<Inner>, lease: Duration) -> Self {
        RedisWindows {
            inner,
            admit: Arc::new(Script::new(ADMIT_LUA)),
            renew: Script::new(RENEW_LUA),
            lease,
        }
    }

    /// Removes `member` from `keys` (one round trip).
    async fn remove(&self, keys: Vec<String>, member: &str) -> Result<(), StoreError> {
        remove(&self.inner, keys, member).await
    }
}

/// Removes `member` from `keys` (one round trip).
async fn remove(inner: &Inner, keys: Vec<String>, member: &str) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut p = redis::pipe();
    for k in &keys {
        p.zrem(k, member).ignore();
    }
    let mut c = inner.conn();
    inner
        .op("window release", p.query_async::<()>(&mut c))
        .await
}

/// Every key a ticket holds a slot in: its rate windows, then its caps.
fn ticket_keys(t: &Ticket) -> Vec<String> {
    t.windows
        .iter()
        .map(|(id, secs)| window_key(&t.family, id, *secs))
        .chain(t.caps.iter().map(|id| cap_key(&t.family, id)))
        .collect()
}

impl WindowStore for RedisWindows {
    fn admit(
        &self,
        family: &str,
        windows: &[WindowSpec],
        caps: &[CapSpec],
    ) -> BoxFuture<'_, Result<Admit, StoreError>> {
        let member = format!("{:032x}", rand::random::<u128>());
        let ticket = Ticket {
            member,
            family: family.to_string(),
            windows: windows.iter().map(|w| (w.id.clone(), w.seconds)).collect(),
            caps: caps.iter().map(|c| c.id.clone()).collect(),
        };
        let call = admit_call(
            self.inner.clone(),
            self.admit.clone(),
            self.lease,
            ticket,
            windows.to_vec(),
            caps.to_vec(),
        );
        let inner = self.inner.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        async move {
            // Redis runs a sent admission whatever the proxy does. A request
            // dropped meanwhile (its client left) would hold its rate slots
            // for their window and its in-flight slots for a lease: the call
            // is finished instead, and the slots it took go back.
            FinishOnDrop::new(async move {
                if let Err(Ok(Admit::Admitted { ticket, .. })) = tx.send(call.await)
                    && let Err(e) = remove(&inner, ticket_keys(&ticket), &ticket.member).await
                {
                    tracing::warn!(error = %e, "giving back the window slots of an abandoned request failed; they end with their window or lease");
                }
            })
            .await;
            rx.await.unwrap_or_else(|_| {
                Err(StoreError::Io(format!(
                    "redis at {}: the window admission stopped",
                    self.inner.target
                )))
            })
        }
        .boxed()
    }

    fn cancel(&self, ticket: &Ticket) -> BoxFuture<'_, Result<(), StoreError>> {
        let keys = ticket_keys(ticket);
        let member = ticket.member.clone();
        async move { self.remove(keys, &member).await }.boxed()
    }

    fn finish(&self, ticket: &Ticket) -> BoxFuture<'_, Result<(), StoreError>> {
        let keys: Vec<String> = ticket
            .caps
            .iter()
            .map(|id| cap_key(&ticket.family, id))
            .collect();
        let member = ticket.member.clone();
        async move { self.remove(keys, &member).await }.boxed()
    }

    fn renew(&self, ticket: &Ticket) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut inv = self.renew.prepare_invoke();
        for id in &ticket.caps {
            inv.key(cap_key(&ticket.family, id));
        }
        inv.arg(&ticket.member).arg(self.lease.as_millis() as u64);
        async move {
            let mut c = self.inner.conn();
            self.inner
                .op("window renew", inv.invoke_async::<()>(&mut c))
                .await
        }
        .boxed()
    }

    fn lease(&self) -> Option<Duration> {
        Some(self.lease)
    }
}

/// One admission script call and what it decided; owns what it needs, so
/// that it can finish on its own (see `admit`).
async fn admit_call(
    inner: Arc<Inner>,
    script: Arc<Script>,
    lease: Duration,
    ticket: Ticket,
    windows: Vec<WindowSpec>,
    caps: Vec<CapSpec>,
) -> Result<Admit, StoreError> {
    let mut inv = script.prepare_invoke();
    for k in ticket_keys(&ticket) {
        inv.key(k);
    }
    inv.arg(windows.len())
        .arg(&ticket.member)
        .arg(lease.as_millis() as u64);
    for w in &windows {
        inv.arg(w.seconds).arg(w.limit);
    }
    for c in &caps {
        inv.arg(c.limit);
    }
    let mut c = inner.conn();
    let out: Vec<i64> = inner.op("window admit", inv.invoke_async(&mut c)).await?;
    let unexpected = || {
        StoreError::Io(format!(
            "redis at {} answered the window script unexpectedly",
            inner.target
        ))
    };
    match out.as_slice() {
        [0, i, wait] => {
            let i = usize::try_from(*i - 1).map_err(|_| unexpected())?;
            let (block, window, limit) = match windows.get(i) {
                Some(w) => (w.block, Some(w.seconds), w.limit),
                None => {
                    let c = caps.get(i - windows.len()).ok_or_else(unexpected)?;
                    (c.block, None, c.limit)
                }
            };
            Ok(Admit::Full(Full {
                block,
                window,
                limit,
                retry_after_ms: (*wait).max(1) as u64,
            }))
        }
        [1, counts @ ..] if counts.len() == windows.len() + caps.len() => {
            let n = |v: i64| v.max(0) as u64;
            Ok(Admit::Admitted {
                counts: WindowCounts {
                    rates: windows
                        .iter()
                        .zip(counts)
                        .map(|(w, c)| (w.block, w.seconds, n(*c)))
                        .collect(),
                    in_flight: caps
                        .iter()
                        .zip(&counts[windows.len()..])
                        .map(|(cap, c)| (cap.block, n(*c)))
                        .collect(),
                },
                ticket,
            })
        }
        _ => Err(unexpected()),
    }
}
