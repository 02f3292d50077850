//! A state store in Redis (or Valkey), shared by several `till serve`
//! processes: activation counters, block metadata and revocations.
//!
//! Why the `redis` crate (redis-rs) with its tokio `ConnectionManager`: it
//! is the most widely used Rust client, kept by the Redis organisation, and
//! the manager gives one multiplexed connection shared by every request
//! (pipelining instead of a pool) that reconnects by itself after Redis
//! restarts; `Script` runs Lua with `EVALSHA` and reloads it after a restart
//! emptied the script cache. `fred` would also do, with more machinery
//! (pools, its own reconnection policies) than Till needs.
//!
//! How it keeps the embedded store's semantics (ARCHITECTURE.md, "The Redis
//! store"):
//! * **One round trip per reservation.** `reserve` is one Lua script: it
//!   refuses retired blocks and a full family, increments every block's
//!   counter, records metadata and the family's expiry for new blocks, and
//!   returns the new values. Redis runs a script alone, so concurrent
//!   requests on any number of proxies each get their own post-increment
//!   value: a limit cannot be overshot. Under load, concurrent reservations
//!   of one family share a script call (`batch.rs`), each still
//!   all-or-nothing.
//! * **Keys** are `till:{<family id>}:…`: the braces are a Cluster hash tag,
//!   so everything one script touches lives in one slot.
//! * **Durability** is Redis's: with `appendonly yes` and `appendfsync
//!   always`, Redis writes and fsyncs the script's effects before it
//!   answers, so `Reservation::durable` resolves at once. `till serve`
//!   warns at start when the server is configured otherwise
//!   ([`RedisStore::persistence_warning`]).
//! * **Revocations** are a hash and a version counter. Every proxy keeps a
//!   local copy (`first_revoked` is synchronous and on every request), applies
//!   published revocations at once, and checks the version every
//!   [`POLL_INTERVAL`], so a lost message or a reconnect leaves it stale for
//!   at most [`STALE_BOUND`]. Past that bound without a confirmed check, it
//!   refuses (503) instead of deciding on an old list.
//! * **Failure** of any call (Redis down, slow, restarted) is a
//!   [`StoreError`], i.e. 503 and nothing forwarded; every call has a
//!   deadline ([`OP_TIMEOUT`]), so a dead server cannot hang requests.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Client, IntoConnectionInfo, RedisResult, Script};

mod batch;
mod finish_on_drop;
pub mod marker;
mod shared;
mod snapshot;
mod windows;

use super::embedded::{DEFAULT_MAX_BLOCKS_PER_FAMILY, RETENTION_AFTER_EXPIRY};
use super::{
    BlockMeta, CounterInfo, CounterSpec, CounterStore, Reservation, RevocationList, StoreError,
    now_unix,
};

/// How often each proxy confirms its copy of the revocation list against
/// Redis's version counter (pub/sub normally delivers sooner).
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Longest time a proxy decides with a revocation list it could not confirm
/// with Redis; past it, `first_revoked` fails (503). This is the hard bound
/// on how late a revocation can be enforced by a replica that is up.
pub const STALE_BOUND: Duration = Duration::from_secs(1);
/// Deadline of every Redis call made for a request. A request never waits
/// longer than this on Redis: it gets a 503.
pub const OP_TIMEOUT: Duration = Duration::from_millis(1000);
/// How often each proxy reads Redis's eviction settings again while it
/// runs ([`RedisStore::check_eviction`]): a server switched to evicting
/// keys is refused within this.
pub const EVICTION_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Counters stay in Redis this long after their token's expiry even if no
/// proxy runs the collector (which retires them earlier, after
/// [`RETENTION_AFTER_EXPIRY`]).
pub const TTL_AFTER_EXPIRY: u64 = 30 * 24 * 3600;

/// Channel on which the revocations of database `db` are published, as
/// `"<version> <id>"`. Pub/sub channels are server-wide, whatever database
/// a client selected: a channel without the database number would carry
/// another deployment's revocations (another database of the same Redis)
/// to this one, which would apply them, write them into its own list and
/// sign them in its feed.
fn channel(db: i64) -> String {
    format!("till:revocations:{db}")
}
const REVOKED_IDS: &str = "till:{revocations}:ids";
const REVOKED_VERSION: &str = "till:{revocations}:version";
/// Every family with counters, for the usage view and the collector.
const FAMILIES: &str = "till:families";

/// Keys of one family, in the order the scripts expect them.
fn family_keys(family: &str) -> [String; 5] {
    [
        format!("till:{{{family}}}:n"), // id → count
        format!("till:{{{family}}}:m"), // id → BlockMeta JSON
        format!("till:{{{family}}}:u"), // id → last use (Unix seconds)
        format!("till:{{{family}}}:e"), // family deadline (Unix seconds, 0 = never)
        format!("till:{{{family}}}:x"), // retired ids (no expiry: retired for good)
    ]
}

/// Reservations, one after the other, each all-or-nothing: `ARGV` is now,
/// the family bound, the expiry grace, then per reservation its number of
/// blocks and, per block, its family's position in `KEYS` (five keys
/// each), id, metadata JSON, expiry and whether to write its last use. The
/// answer is, per reservation, a status (0, -1 retired, -2 family full, -3
/// metadata needed), 1 if a block was new, and one count per block (zeros
/// when refused). A warm block's metadata is already in Redis and is sent
/// as `''`; if Redis lacks it after all (an expired family, an import), the
/// reservation changes nothing and answers -3, and the caller sends it
/// again with the metadata.
///
/// Only a block without metadata is looked up among the retired ids: every
/// script keeps the two apart (retiring removes the metadata, reserving
/// and importing never record it for a retired id), so a block whose
/// metadata is there is not retired, and a warm request saves a lookup
/// per block. Arguments stay strings unless arithmetic needs them: Redis
/// formats a Lua number passed to `redis.call` with `printf("%.17g")`,
/// which showed in its profile.
const RESERVE_LUA: &str = r#"
local now = ARGV[1]
local max = tonumber(ARGV[2])
local grace = tonumber(ARGV[3])
local function key(f, i) return KEYS[(f - 1) * 5 + i] end
-- Block s of the reservation at b: ARGV[b + s * 5 + 1 ..= + 5] is its
-- family's position, id, metadata, expiry and last-use flag. The tables of
-- new blocks are made only when there is one: a warm reservation (the
-- common case) then allocates nothing but its counts.
local function reserve(b, nspec)
  local fresh, seen, adding
  for s = 0, nspec - 1 do
    local a = b + s * 5
    local id = ARGV[a + 2]
    if not (seen and seen[id]) then
      local f = tonumber(ARGV[a + 1])
      if redis.call('HEXISTS', key(f, 2), id) == 0 then
        if redis.call('SISMEMBER', key(f, 5), id) == 1 then return -1 end
        if ARGV[a + 3] == '' then return -3 end
        fresh = fresh or {}
        adding = adding or {}
        fresh[s] = true
        adding[f] = (adding[f] or 0) + 1
      end
      if nspec > 1 then
        seen = seen or {}
        seen[id] = true
      end
    end
  end
  if adding then
    for f, n in pairs(adding) do
      if redis.call('HLEN', key(f, 2)) + n > max then return -2 end
    end
  end
  local counts = {}
  for s = 0, nspec - 1 do
    local a = b + s * 5
    local f, id = tonumber(ARGV[a + 1]), ARGV[a + 2]
    local new_block = fresh and fresh[s]
    counts[s + 1] = redis.call('HINCRBY', key(f, 1), id, '1')
    if new_block or ARGV[a + 5] == '1' then redis.call('HSET', key(f, 3), id, now) end
    if new_block then redis.call('HSET', key(f, 2), id, ARGV[a + 3]) end
  end
  if not adding then return 0, 0, counts end
  for f, _ in pairs(adding) do
    local d = tonumber(redis.call('GET', key(f, 4)) or '-1')
    for s = 0, nspec - 1 do
      local a = b + s * 5
      if fresh[s] and tonumber(ARGV[a + 1]) == f then
        local expires = tonumber(ARGV[a + 4])
        if expires == 0 then d = 0 elseif d ~= 0 then d = math.max(d, expires + grace) end
      end
    end
    redis.call('SET', key(f, 4), d)
    for i = 1, 4 do
      if d == 0 then redis.call('PERSIST', key(f, i)) else redis.call('EXPIREAT', key(f, i), d) end
    end
  end
  return 0, 1, counts
end
local out, b = {}, 3
while b < #ARGV do
  local nspec = tonumber(ARGV[b + 1])
  local status, new, counts = reserve(b + 1, nspec)
  out[#out + 1] = status
  out[#out + 1] = new or 0
  for s = 1, nspec do out[#out + 1] = counts and counts[s] or 0 end
  b = b + 1 + nspec * 5
end
return out
"#;

/// Gives one use back, never below zero and never creating a counter (a
/// late release after the collector must not leave a stray key). `KEYS`
/// are each id's count, metadata and last-use hashes. A count back at zero
/// means every reservation of the block was given back (its requests were
/// all refused): it leaves no record and no place in its family's bound
/// (`HLEN` of the metadata hash), so a key whose requests are refused cannot
/// fill `max_blocks_per_family` and lock its siblings out.
const RELEASE_LUA: &str = r#"
for i, id in ipairs(ARGV) do
  local n, m, u = KEYS[i * 3 - 2], KEYS[i * 3 - 1], KEYS[i * 3]
  local v = tonumber(redis.call('HGET', n, id) or '0')
  if v > 1 then
    redis.call('HINCRBY', n, id, -1)
  elseif v == 1 then
    redis.call('HDEL', n, id)
    redis.call('HDEL', m, id)
    redis.call('HDEL', u, id)
  end
end
return 1
"#;

/// Retires ids of one family: counts and metadata go, the retired mark stays.
const RETIRE_LUA: &str = r#"
for _, id in ipairs(ARGV) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('SADD', KEYS[5], id)
end
return #ARGV
"#;

const REVOKE_LUA: &str = r#"
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local v = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[3], v .. ' ' .. ARGV[1])
return v
"#;

#[derive(Default)]
struct Revoked {
    ids: HashSet<String>,
    /// Redis's version counter as of the last sync or applied message.
    version: u64,
}

struct Inner {
    client: Client,
    /// The multiplexed connection; replaced when it is wedged ([`unwedge`]).
    conn: arc_swap::ArcSwap<ConnectionManager>,
    /// How `conn` was made, to make another.
    conn_config: ConnectionManagerConfig,
    /// When `conn` was last replaced (milliseconds since `base`).
    conn_replaced_at: AtomicU64,
    /// `host:port/db`, never the password: for messages.
    target: String,
    /// The revocation channel of the selected database ([`channel`]).
    channel: String,
    reserve: Script,
    release: Script,
    retire: Script,
    revoke: Script,
    max_blocks_per_family: AtomicUsize,
    closing: AtomicBool,
    /// What this process knows of the block ids it read or reserved (one
    /// lookup per id and request on the warm path).
    known: moka::sync::Cache<String, Arc<Known>>,
    revoked: RwLock<Revoked>,
    /// Why Redis may now evict this store's keys, if the last reading of
    /// its settings said so: reservations and revocation checks fail
    /// (503) until it no longer does. `evicts` is the flag read on every
    /// request.
    evicts: AtomicBool,
    evicts_why: Mutex<String>,
    /// Start of the last version check that confirmed the local copy, in
    /// milliseconds since `base`.
    fresh_at: AtomicU64,
    base: Instant,
    /// Wakes the poller for an immediate check (after a subscription or a
    /// gap in the published versions).
    kick: tokio::sync::Notify,
    /// The marker of the data set this process counts in ([`marker`]).
    store_id: String,
    /// Why, once Redis no longer holds `store_id`: it lost the data this
    /// process counted in, and every request is refused (503) until a
    /// restart.
    lost: std::sync::OnceLock<String>,
    /// Reservations waiting for the batching task (`batch.rs`).
    batch: batch::Batcher,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Counters and revocations shared through one Redis server.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

/// `host:port/db` of a Redis URL, for messages (no user name or password).
pub fn redacted(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}:{}{}",
            u.scheme(),
            u.host_str().unwrap_or("?"),
            u.port().unwrap_or(6379),
            u.path()
        ),
        Err(_) => "the configured Redis".into(),
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://` or `rediss://`), with `password` if the
    /// URL has none, and reads the revocation list. Fails if Redis cannot
    /// be reached: the proxy must not start with an unknown revocation list.
    pub async fn connect(url: &str, password: Option<&str>) -> Result<Self, StoreError> {
        let target = redacted(url);
        let open = |message: String| StoreError::Open {
            path: target.clone(),
            message,
        };
        let mut info = url
            .into_connection_info()
            .map_err(|e| open(format!("not a Redis URL: {e}")))?;
        if let Some(p) = password {
            let settings = info.redis_settings().clone().set_password(p);
            info = info.set_redis_settings(settings);
        }
        // Nagle's algorithm would hold each request's small write until the
        // previous one is acknowledged: on one multiplexed connection that
        // serialises every proxy request behind the one before it.
        let info = info.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let db = info.redis_settings().db();
        let client = Client::open(info).map_err(|e| open(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(200));
        let conn = tokio::time::timeout(
            OP_TIMEOUT * 3,
            client.get_connection_manager_with_config(config.clone()),
        )
        .await
        .map_err(|_| open("no answer; is Redis running there?".into()))?
        .map_err(|e| {
            open(format!(
                "{e}; is Redis running there, and is the password right?"
            ))
        })?;
        let store_id = marker::read_or_create(&mut conn.clone(), &target)
            .await
            .map_err(|e| open(e.to_string()))?;
        let (batch, rounds) = batch::Batcher::new();
        let inner = Arc::new(Inner {
            client,
            conn: arc_swap::ArcSwap::from_pointee(conn),
            conn_config: config,
            conn_replaced_at: AtomicU64::new(0),
            target: target.clone(),
            channel: channel(db),
            reserve: Script::new(RESERVE_LUA),
            release: Script::new(RELEASE_LUA),
            retire: Script::new(RETIRE_LUA),
            revoke: Script::new(REVOKE_LUA),
            max_blocks_per_family: AtomicUsize::new(DEFAULT_MAX_BLOCKS_PER_FAMILY),
            closing: AtomicBool::new(false),
            known: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_idle(std::time::Duration::from_secs(600))
                .build(),
            revoked: RwLock::new(Revoked::default()),
            evicts: AtomicBool::new(false),
            evicts_why: Mutex::new(String::new()),
            fresh_at: AtomicU64::new(0),
            base: Instant::now(),
            kick: tokio::sync::Notify::new(),
            store_id,
            lost: std::sync::OnceLock::new(),
            batch,
            tasks: Mutex::new(Vec::new()),
        });
        let started = inner.base.elapsed();
        sync_revocations(&inner)
            .await
            .map_err(|e| open(e.to_string()))?;
        inner.confirm(started);
        let poller = tokio::spawn(poll_loop(Arc::downgrade(&inner)));
        let subscriber = tokio::spawn(subscribe_loop(Arc::downgrade(&inner)));
        let batcher = tokio::spawn(batch::run(Arc::downgrade(&inner), rounds));
        let eviction = tokio::spawn(eviction_loop(Arc::downgrade(&inner)));
        inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([poller, subscriber, batcher, eviction]);
        Ok(RedisStore { inner })
    }

    /// `host:port/db` of the server, for messages.
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// The marker of the data set this store counts in ([`marker`]).
    pub fn store_id(&self) -> &str {
        &self.inner.store_id
    }

    /// Sets `limits.max_blocks_per_family` (checked by the reserve script,
    /// so it holds across all proxies that use the same value).
    pub fn set_max_blocks_per_family(&self, n: usize) {
        self.inner
            .max_blocks_per_family
            .store(n.max(1), Ordering::Relaxed);
    }

    /// Why the connected Redis cannot promise that a forwarded use is never
    /// lost, if it cannot: AOF off, or fsynced less often than every write.
    pub async fn persistence_warning(&self) -> Option<String> {
        let mut c = self.inner.conn();
        let got: Result<Vec<String>, StoreError> = self
            .inner
            .op(
                "CONFIG GET",
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("append*")
                    .query_async(&mut c),
            )
            .await;
        let fix = "run Redis with `appendonly yes` and `appendfsync always`, or a Redis crash can lose uses that were forwarded (and give them again)";
        let pairs = match got {
            Ok(p) => p,
            Err(e) => {
                return Some(format!(
                    "cannot read Redis's persistence settings ({e}); make sure it runs with `appendonly yes` and `appendfsync always`"
                ));
            }
        };
        let setting = |name: &str| {
            pairs
                .chunks(2)
                .find(|kv| kv[0] == name)
                .and_then(|kv| kv.get(1).cloned())
                .unwrap_or_default()
        };
        let aof = setting("appendonly");
        let fsync = setting("appendfsync");
        if aof != "yes" {
            Some(format!("Redis has appendonly {aof:?}: {fix}"))
        } else if fsync != "always" {
            Some(format!(
                "Redis has appendfsync {fsync:?} (\"everysec\" can lose about a second of counts): {fix}"
            ))
        } else {
            None
        }
    }

    /// Refuses a Redis that may evict keys under memory pressure: every
    /// count, retired mark and family deadline is a key, and a counter
    /// evicted gives a spent token its uses again. `Err` when `maxmemory`
    /// is set and `maxmemory-policy` is anything but `noeviction` (or when
    /// the limit cannot be read beside such a policy: deny when unsure);
    /// `Ok(Some(warning))` when the settings cannot be read at all.
    /// `INFO memory` is read rather than `CONFIG GET`, which managed
    /// services and ACLs often refuse.
    pub async fn check_eviction(&self) -> Result<Option<String>, StoreError> {
        match read_eviction(&self.inner).await {
            Ok(None) => Ok(None),
            Ok(Some(why)) => Err(StoreError::Open {
                path: self.inner.target.clone(),
                message: why,
            }),
            Err(e) => Ok(Some(format!(
                "cannot read Redis's eviction settings ({e}); make sure it runs with `maxmemory-policy noeviction` (or without `maxmemory`), or memory pressure can evict use counters and give spent tokens their uses again"
            ))),
        }
    }

    /// Retires the counters of tokens that expired more than
    /// [`RETENTION_AFTER_EXPIRY`] ago, like the embedded store; any proxy
    /// may run it, and running it twice is harmless.
    pub async fn gc_expired(&self, now: u64) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let mut c = inner.conn();
        let families: Vec<String> = inner.op("SMEMBERS", c.smembers(FAMILIES)).await?;
        let mut removed = 0;
        for f in families {
            let keys = family_keys(&f);
            let metas: HashMap<String, String> = inner.op("HGETALL", c.hgetall(&keys[1])).await?;
            if metas.is_empty() {
                let counted: bool = inner.op("EXISTS", c.exists(&keys[0])).await?;
                if !counted {
                    let _: Result<(), _> = inner.op("SREM", c.srem(FAMILIES, &f)).await;
                    // A first reservation may have counted meanwhile (its
                    // registration came before this removal): put it back.
                    let counted: bool = inner.op("EXISTS", c.exists(&keys[0])).await?;
                    if counted {
                        let _: () = inner.op("SADD", c.sadd(FAMILIES, &f)).await?;
                    }
                }
                continue;
            }
            let dead: Vec<&String> = metas
                .iter()
                .filter(|(_, json)| {
                    serde_json::from_str::<BlockMeta>(json).is_ok_and(|m| {
                        m.expires
                            .is_some_and(|e| e.saturating_add(RETENTION_AFTER_EXPIRY) < now)
                    })
                })
                .map(|(id, _)| id)
                .collect();
            if dead.is_empty() {
                continue;
            }
            let mut inv = inner.retire.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            for id in &dead {
                inv.arg(id.as_str());
            }
            let n: usize = inner.op("retire", inv.invoke_async(&mut c)).await?;
            removed += n;
        }
        self.repair_families().await?;
        Ok(removed)
    }

    /// [`Self::gc_expired`] as of the earlier of `clock` (this proxy's time)
    /// and Redis's own clock. Retiring is for good and for every replica: one
    /// replica whose clock runs days ahead would otherwise retire the
    /// counters of live tokens, refused from then on by all of them, also
    /// once its clock is set right.
    pub async fn collect_expired(&self, clock: u64) -> Result<usize, StoreError> {
        let mut c = self.inner.conn();
        let (redis_now, _): (u64, u64) = self
            .inner
            .op("TIME", redis::cmd("TIME").query_async(&mut c))
            .await?;
        self.gc_expired(clock.min(redis_now)).await
    }

    /// Adds to `till:families` every family that has counters but is not
    /// listed, and returns how many. A reservation registers its family
    /// before counting (`batch::send`), but earlier versions did it after,
    /// and a proxy killed in between left counters nothing lists: the usage
    /// view, prefix revocation and `till store export` (whose import could
    /// then give the uses back) missed them. One `SCAN` of the keyspace: run
    /// by the export, the hourly collector and once when `till serve`
    /// starts, not per request.
    pub async fn repair_families(&self) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let mut c = inner.conn();
        let mut counted: HashSet<String> = HashSet::new();
        {
            let mut it: redis::AsyncIter<String> =
                inner.op("SCAN", c.scan_match("till:{*}:n")).await?;
            while let Some(k) = it.next_item().await {
                let k = k.map_err(|e| {
                    StoreError::Io(format!("redis at {} failed (SCAN): {e}", inner.target))
                })?;
                if let Some(f) = snapshot::family_in(&k)
                    && k.len() == f.len() + "till:{}:n".len()
                {
                    counted.insert(f.to_string());
                }
            }
        }
        let mut c = inner.conn();
        let listed: HashSet<String> = inner.op("SMEMBERS", c.smembers(FAMILIES)).await?;
        let missing: Vec<&String> = counted.difference(&listed).collect();
        if !missing.is_empty() {
            tracing::warn!(
                count = missing.len(),
                "token families counted in redis were missing from its family list (a proxy killed while registering one); listing them again"
            );
            let _: () = inner
                .op("SADD families", c.sadd(FAMILIES, &missing))
                .await?;
        }
        Ok(missing.len())
    }

    /// Stops the background tasks (revocation updates). The store refuses
    /// reservations afterwards.
    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        for t in self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }

    fn family_of(&self, ids: &[String], id: &str) -> String {
        self.inner
            .known
            .get(id)
            .and_then(|k| k.family.get().cloned())
            .or_else(|| ids.first().cloned())
            .unwrap_or_default()
    }

    /// One reservation through the batching queue (`batch.rs`);
    /// `with_meta(i)` says whether block `i`'s metadata goes with it. The
    /// answer is the script's for this reservation: status, new, counts.
    async fn run_reserve(
        &self,
        counters: &[CounterSpec],
        touch: &[bool],
        with_meta: impl Fn(usize) -> bool,
    ) -> Result<Vec<i64>, StoreError> {
        let inner = &self.inner;
        let mut families: Vec<String> = Vec::with_capacity(1);
        let mut blocks = Vec::with_capacity(counters.len());
        for (i, c) in counters.iter().enumerate() {
            let family = match families.iter().position(|f| *f == c.family) {
                Some(p) => p + 1,
                None => {
                    families.push(c.family.clone());
                    families.len()
                }
            };
            let meta = if with_meta(i) {
                serde_json::to_string(&BlockMeta::from(c))
                    .map_err(|e| StoreError::Io(e.to_string()))?
            } else {
                String::new()
            };
            blocks.push(batch::Block {
                family,
                id: c.id.clone(),
                meta,
                expires: c.expires.unwrap_or(0),
                touch: touch[i],
            });
        }
        let (answer, got) = tokio::sync::oneshot::channel();
        let job = batch::Job {
            families,
            blocks,
            answer,
        };
        let lost = || {
            StoreError::Io(format!(
                "redis at {}: the reserve queue stopped",
                inner.target
            ))
        };
        // From here on the request may be dropped with the call out: the
        // batcher then gives its uses back, unless the answer is already
        // here, in which case `Awaited` does.
        let mut got = Awaited {
            got: Some(got),
            inner,
            counters,
        };
        batch::submit(inner, job).await.map_err(|_| lost())?;
        // The call itself has OP_TIMEOUT; this bounds the wait in the queue
        // behind calls to a Redis that stopped answering.
        let rx = got.got.as_mut().expect("taken only here and on drop");
        match tokio::time::timeout(OP_TIMEOUT * 2, rx).await {
            Ok(answer) => {
                got.got = None;
                answer.unwrap_or_else(|_| Err(lost()))
            }
            // `got` is dropped on return: an answer arriving meanwhile goes
            // back, as this request is answered 503.
            Err(_) => Err(StoreError::Io(format!(
                "redis at {} did not answer reserve within {} ms",
                inner.target,
                (OP_TIMEOUT * 2).as_millis()
            ))),
        }
    }
}

/// Gives back one use of every block of `counters` (see `batch::give_back`).
fn give_back(inner: &Arc<Inner>, counters: &[CounterSpec]) {
    batch::give_back(
        inner,
        counters.iter().map(|c| (c.family.as_str(), c.id.as_str())),
    );
}

/// The receiving end of a reservation's answer while its request waits. If
/// the request is dropped after the answer arrived but before reading it,
/// the uses counted go back; if before it arrived, the batcher finds the
/// receiver gone and gives them back itself (`batch::give_back`).
struct Awaited<'a> {
    got: Option<tokio::sync::oneshot::Receiver<Result<Vec<i64>, StoreError>>>,
    inner: &'a Arc<Inner>,
    counters: &'a [CounterSpec],
}

impl Drop for Awaited<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.got.take()
            && let Ok(Ok(v)) = rx.try_recv()
            && v.first() == Some(&0)
        {
            give_back(self.inner, self.counters);
        }
    }
}

impl Inner {
    /// Runs one Redis call with the deadline, turning failures into
    /// [`StoreError::Io`] that name the server but never the password.
    async fn op<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(OP_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Io(format!(
                "redis at {} failed ({what}): {e}",
                self.target
            ))),
            Err(_) => Err(StoreError::Io(format!(
                "redis at {} did not answer {what} within {} ms",
                self.target,
                OP_TIMEOUT.as_millis()
            ))),
        }
    }

    /// The connection to send a call on.
    fn conn(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.conn.load())
    }

    /// `Err` once Redis lost the data this process counted in, and while
    /// Redis may evict keys (see [`recheck_eviction`]).
    fn refuse_if_unsafe(&self) -> Result<(), StoreError> {
        if let Some(why) = self.lost.get() {
            return Err(StoreError::Failed(why.clone()));
        }
        if !self.evicts.load(Ordering::Relaxed) {
            return Ok(());
        }
        let why = self.evicts_why.lock().unwrap_or_else(|p| p.into_inner());
        Err(StoreError::Io(format!("redis at {}: {why}", self.target)))
    }

    /// Whether `found` (the marker Redis holds now) is this process's; if
    /// not, refuses every request from now on ([`marker`]). `Err` names why.
    fn check_store_id(&self, found: Option<&str>) -> Result<(), StoreError> {
        if found == Some(self.store_id.as_str()) {
            return Ok(());
        }
        let why = marker::lost_message(&self.target, &self.store_id, found);
        if self.lost.set(why.clone()).is_ok() {
            tracing::error!("{why}");
        }
        Err(StoreError::Failed(why))
    }

    /// Records that the local revocation list matched Redis at `at`
    /// (measured from `base`, taken before the check was sent).
    fn confirm(&self, at: Duration) {
        self.fresh_at
            .fetch_max(at.as_millis() as u64, Ordering::SeqCst);
    }

    fn stale_for(&self) -> Duration {
        let now = self.base.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.fresh_at.load(Ordering::SeqCst)))
    }

    fn read_revoked(&self) -> std::sync::RwLockReadGuard<'_, Revoked> {
        self.revoked.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_revoked(&self) -> std::sync::RwLockWriteGuard<'_, Revoked> {
        self.revoked.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why the server may evict keys (`Some`), from `INFO memory`; `Err` if
/// that cannot be read or says nothing of the policy.
async fn read_eviction(inner: &Inner) -> Result<Option<String>, StoreError> {
    let mut c = inner.conn();
    let text: String = inner
        .op(
            "INFO memory",
            redis::cmd("INFO").arg("memory").query_async(&mut c),
        )
        .await?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
            .map(str::to_string)
    };
    let Some(policy) = field("maxmemory_policy") else {
        return Err(StoreError::Io(format!(
            "redis at {} gave no maxmemory_policy in INFO memory",
            inner.target
        )));
    };
    if policy == "noeviction" {
        return Ok(None);
    }
    // Without a limit Redis never evicts, whatever the policy says.
    let limit = field("maxmemory").and_then(|m| m.parse::<u64>().ok());
    if limit == Some(0) {
        return Ok(None);
    }
    let limit = limit.map_or_else(
        || "an unreadable maxmemory".to_string(),
        |m| format!("maxmemory {m}"),
    );
    Ok(Some(format!(
        "Redis may evict keys under memory pressure ({limit} with maxmemory-policy {policy}), and an evicted use counter gives a spent token its uses again; set `maxmemory-policy noeviction` (Redis then refuses writes when full, and Till answers 503), or remove `maxmemory`"
    )))
}

/// Reads the eviction settings every [`EVICTION_CHECK_INTERVAL`]: a server
/// that starts evicting while the proxy runs makes it refuse (503) until it
/// stops. Its own task, so that a slow `INFO` never delays the revocation
/// checks.
async fn eviction_loop(weak: Weak<Inner>) {
    let mut tick = tokio::time::interval(EVICTION_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        recheck_eviction(&inner).await;
    }
}

/// One reading for [`eviction_loop`]. A reading that fails changes nothing
/// (an unreachable Redis fails every request anyway; one that never lets
/// `INFO` be read was warned about at start).
async fn recheck_eviction(inner: &Inner) {
    let Ok(now) = read_eviction(inner).await else {
        return;
    };
    let was = inner.evicts.load(Ordering::SeqCst);
    match now {
        Some(why) => {
            *inner.evicts_why.lock().unwrap_or_else(|p| p.into_inner()) = why.clone();
            inner.evicts.store(true, Ordering::SeqCst);
            if !was {
                tracing::error!(redis = %inner.target, "{why}; refusing every request (503) until it no longer evicts");
            }
        }
        None => {
            inner.evicts.store(false, Ordering::SeqCst);
            if was {
                tracing::info!(redis = %inner.target, "redis no longer evicts keys; serving again");
            }
        }
    }
}

/// Reads the whole list and its version atomically and merges it into the
/// local copy. Ids known here but missing in Redis (a Redis that lost data)
/// are written back: a revocation is never undone.
async fn sync_revocations(inner: &Inner) -> Result<(), StoreError> {
    let mut c = inner.conn();
    let (ids, version): (Vec<String>, Option<u64>) = inner
        .op(
            "revocation list",
            redis::pipe()
                .atomic()
                .hkeys(REVOKED_IDS)
                .get(REVOKED_VERSION)
                .query_async(&mut c),
        )
        .await?;
    let remote: HashSet<String> = ids.into_iter().collect();
    let missing: Vec<String> = {
        let mut r = inner.write_revoked();
        let missing = r.ids.difference(&remote).cloned().collect();
        r.ids.extend(remote);
        r.version = version.unwrap_or(0);
        missing
    };
    if !missing.is_empty() {
        tracing::warn!(
            count = missing.len(),
            "redis lost revocations this proxy knew of (restarted without persistence?); writing them back"
        );
        for id in missing {
            revoke_in_redis(inner, &id).await?;
        }
    }
    Ok(())
}

/// Runs the revoke script; returns the new version, or 0 if already revoked.
async fn revoke_in_redis(inner: &Inner, id: &str) -> Result<u64, StoreError> {
    let mut c = inner.conn();
    inner
        .op(
            "revoke",
            inner
                .revoke
                .key(REVOKED_IDS)
                .key(REVOKED_VERSION)
                .arg(id)
                .arg(now_unix())
                .arg(&inner.channel)
                .invoke_async(&mut c),
        )
        .await
}

/// Confirms the local revocation list every [`POLL_INTERVAL`] (or at once
/// when kicked): one `GET` of the version; a full read only when it moved.
async fn poll_loop(weak: Weak<Inner>) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_ok = true;
    loop {
        let kick = {
            let Some(inner) = weak.upgrade() else { return };
            async move { inner.kick.notified().await }
        };
        tokio::select! {
            _ = tick.tick() => {}
            _ = kick => {}
        }
        let Some(inner) = weak.upgrade() else { return };
        let started = inner.base.elapsed();
        let mut c = inner.conn();
        let result = match inner
            .op(
                "MGET version",
                c.mget::<_, (Option<u64>, Option<String>)>(&[REVOKED_VERSION, marker::KEY]),
            )
            .await
        {
            Ok((v, id)) => {
                // Data just found lost: the revocations this process knows
                // go back into Redis whatever the version says (a new
                // revocation since may have brought it back to the one
                // known here, and then none would be written back).
                let just_lost =
                    inner.lost.get().is_none() && inner.check_store_id(id.as_deref()).is_err();
                if just_lost || v.unwrap_or(0) != inner.read_revoked().version {
                    sync_revocations(&inner).await
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                inner.confirm(started);
                if !was_ok {
                    tracing::info!(redis = %inner.target, "redis reachable again; revocation list confirmed");
                }
                was_ok = true;
            }
            Err(e) => {
                if was_ok {
                    tracing::error!(error = %e, "cannot confirm the revocation list with redis; requests get 503 once it is more than 1 s old");
                }
                was_ok = false;
                unwedge(&inner).await;
            }
        }
    }
}

/// How long the revocation check may fail before the connection is
/// suspected wedged, and how long a new one is given before the next.
const WEDGED_AFTER: Duration = Duration::from_secs(2);

/// Replaces the connection if it fails while a new one to the same server
/// works. The client's manager reconnects only after an I/O error: a
/// reconnection refused by Redis (a password changed, then set back; an ACL
/// reloaded) stayed its connection for good, and every request got 503
/// until a restart, long after Redis accepted the password again.
async fn unwedge(inner: &Inner) {
    let now = inner.base.elapsed().as_millis() as u64;
    let since = now
        .saturating_sub(inner.fresh_at.load(Ordering::SeqCst))
        .min(now.saturating_sub(inner.conn_replaced_at.load(Ordering::SeqCst)));
    if Duration::from_millis(since) < WEDGED_AFTER {
        return;
    }
    let probe = async {
        let mut c = inner.client.get_multiplexed_async_connection().await?;
        // The poll's own read: a failure of the command itself (an ACL
        // refusing it) is no wedged connection.
        redis::cmd("GET")
            .arg(REVOKED_VERSION)
            .query_async::<Option<u64>>(&mut c)
            .await
    };
    if !matches!(tokio::time::timeout(OP_TIMEOUT, probe).await, Ok(Ok(_))) {
        // Redis itself is unreachable or refuses: nothing to replace.
        return;
    }
    let fresh = tokio::time::timeout(
        OP_TIMEOUT * 3,
        inner
            .client
            .get_connection_manager_with_config(inner.conn_config.clone()),
    )
    .await;
    if let Ok(Ok(conn)) = fresh {
        inner.conn.store(Arc::new(conn));
        inner
            .conn_replaced_at
            .store(inner.base.elapsed().as_millis() as u64, Ordering::SeqCst);
        tracing::warn!(redis = %inner.target, "the connection to redis kept failing while a new one works; replaced it");
    }
}

/// Applies published revocations as they come; resubscribes after a lost
/// connection and then asks the poller for a full check, since messages
/// sent meanwhile are gone.
async fn subscribe_loop(weak: Weak<Inner>) {
    loop {
        let (client, channel) = match weak.upgrade() {
            Some(inner) => (inner.client.clone(), inner.channel.clone()),
            None => return,
        };
        if let Ok(Ok(mut ps)) = tokio::time::timeout(OP_TIMEOUT, client.get_async_pubsub()).await
            && ps.subscribe(&channel).await.is_ok()
        {
            if let Some(inner) = weak.upgrade() {
                inner.kick.notify_one();
            }
            let mut messages = ps.on_message();
            while let Some(msg) = messages.next().await {
                let Some(inner) = weak.upgrade() else { return };
                if msg.get_channel_name() != channel {
                    continue;
                }
                let Ok(payload) = msg.get_payload::<String>() else {
                    continue;
                };
                let Some((v, id)) = payload.split_once(' ') else {
                    continue;
                };
                let Ok(v) = v.parse::<u64>() else { continue };
                // Anyone allowed to publish on the channel can send such a
                // message, without any right on Till's keys: applied as it
                // came, an id was enforced, then written into the list for
                // good by the next sync (a revocation of any token, garbage
                // of any size). Only an id the list holds is applied; the
                // revoke script writes it before it publishes.
                if !is_revocation_id(id) {
                    continue;
                }
                let mut c = inner.conn();
                match inner
                    .op(
                        "HEXISTS revocation",
                        c.hexists::<_, _, bool>(REVOKED_IDS, id),
                    )
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => continue,
                    // The poller reads the whole list, or fails closed.
                    Err(_) => {
                        inner.kick.notify_one();
                        continue;
                    }
                }
                let mut r = inner.write_revoked();
                r.ids.insert(id.to_string());
                if v == r.version + 1 {
                    r.version = v;
                } else if v > r.version {
                    // A gap: some message was missed; read the whole list.
                    drop(r);
                    inner.kick.notify_one();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `id` has the shape of a block's revocation id (lower-case hex,
/// as `revoke` writes it).
fn is_revocation_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 1024
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// [`Known::seen`] when this process has no count to decide with.
const UNSEEN: u64 = u64::MAX;

/// What one process remembers of a block id.
struct Known {
    /// The block's family, set once a reservation by this process succeeded,
    /// which also means Redis holds the block's metadata: later reservations
    /// leave it out. `peek` and `release` only get ids; the request path
    /// passes a token's ids in block order, so the first is the family when
    /// it is not set.
    family: std::sync::OnceLock<String>,
    /// The count this process last read or reserved ([`UNSEEN`] after a
    /// release): lets a warm token decide without a round trip
    /// (`peek_cached`). Only ever allows; exact counts come back from the
    /// reserve script that follows.
    seen: AtomicU64,
    /// The Unix second in which this process last had Redis write the
    /// block's last use: one write per second and process is enough for a
    /// figure kept in seconds, and spares Redis's log a command per block
    /// and request.
    touched: AtomicU64,
}

impl Known {
    fn new(seen: u64) -> Arc<Known> {
        Arc::new(Known {
            family: std::sync::OnceLock::new(),
            seen: AtomicU64::new(seen),
            touched: AtomicU64::new(0),
        })
    }

    fn seen(&self) -> Option<u64> {
        Some(self.seen.load(Ordering::Relaxed)).filter(|v| *v != UNSEEN)
    }
}

fn parse_meta(json: &str) -> Option<BlockMeta> {
    serde_json::from_str(json).ok()
}

impl CounterStore for RedisStore {
    fn peek(&self, ids: &[String]) -> BoxFuture<'_, Result<Vec<u64>, StoreError>> {
        let mut p = redis::pipe();
        for id in ids {
            p.hget(&family_keys(&self.family_of(ids, id))[0], id);
        }
        let empty = ids.is_empty();
        let ids = ids.to_vec();
        async move {
            if empty {
                return Ok(Vec::new());
            }
            let mut c = self.inner.conn();
            let got: Vec<Option<u64>> = self.inner.op("peek", p.query_async(&mut c)).await?;
            let got: Vec<u64> = got.into_iter().map(|v| v.unwrap_or(0)).collect();
            for (id, v) in ids.iter().zip(&got) {
                match self.inner.known.get(id) {
                    Some(k) => k.seen.store(*v, Ordering::Relaxed),
                    None => self.inner.known.insert(id.clone(), Known::new(*v)),
                }
            }
            Ok(got)
        }
        .boxed()
    }

    fn peek_cached(&self, ids: &[String]) -> Option<Vec<u64>> {
        ids.iter()
            .map(|id| self.inner.known.get(id).and_then(|k| k.seen()))
            .collect()
    }

    fn reserve<'a>(
        &'a self,
        counters: &'a [CounterSpec],
    ) -> BoxFuture<'a, Result<Reservation, StoreError>> {
        async move {
            let inner = &self.inner;
            if inner.closing.load(Ordering::SeqCst) {
                return Err(StoreError::Closed);
            }
            inner.refuse_if_unsafe()?;
            let now = now_unix();
            let known: smallvec::SmallVec<[Option<Arc<Known>>; 4]> =
                counters.iter().map(|c| inner.known.get(&c.id)).collect();
            let touch: smallvec::SmallVec<[bool; 4]> = known
                .iter()
                .map(|k| {
                    k.as_ref()
                        .is_none_or(|k| k.touched.swap(now, Ordering::Relaxed) != now)
                })
                .collect();
            let recorded = |i: usize| known[i].as_ref().is_some_and(|k| k.family.get().is_some());
            let mut out = self.run_reserve(counters, &touch, |i| !recorded(i)).await;
            if matches!(out.as_deref(), Ok([-3, ..])) {
                // Redis lacks metadata this process saw recorded (a family
                // whose keys expired, a store imported meanwhile).
                out = self.run_reserve(counters, &touch, |_| true).await;
            }
            let untouch = || {
                // No use was counted: the next request writes the last use.
                for (k, t) in known.iter().zip(&touch) {
                    if let (Some(k), true) = (k, t) {
                        let _ = k.touched.compare_exchange(
                            now,
                            0,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                }
            };
            let out = match out {
                Ok(out) => out,
                Err(e) => {
                    untouch();
                    return Err(e);
                }
            };
            match out.first() {
                Some(0) if out.len() == counters.len() + 2 => {}
                first => {
                    untouch();
                    return Err(match first {
                        Some(-1) => StoreError::Retired,
                        Some(-2) => StoreError::FamilyFull {
                            limit: inner.max_blocks_per_family.load(Ordering::Relaxed),
                        },
                        _ => StoreError::Io(format!(
                            "redis at {} answered the reserve script unexpectedly",
                            inner.target
                        )),
                    });
                }
            }
            for ((c, v), k) in counters.iter().zip(&out[2..]).zip(&known) {
                let v = (*v).max(0) as u64;
                match k {
                    Some(k) => {
                        k.seen.store(v, Ordering::Relaxed);
                        if k.family.get().is_none() {
                            let _ = k.family.set(c.family.clone());
                        }
                    }
                    None => {
                        let k = Known::new(v);
                        let _ = k.family.set(c.family.clone());
                        k.touched.store(now, Ordering::Relaxed);
                        inner.known.insert(c.id.clone(), k);
                    }
                }
            }
            Ok(Reservation {
                uses: out[2..].iter().map(|v| (*v).max(0) as u64).collect(),
                durable: async { Ok(()) }.boxed(),
            })
        }
        .boxed()
    }

    fn release(&self, ids: &[String]) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut inv = self.inner.release.prepare_invoke();
        for id in ids {
            if let Some(k) = self.inner.known.get(id) {
                k.seen.store(UNSEEN, Ordering::Relaxed);
            }
            let [n, m, u, ..] = family_keys(&self.family_of(ids, id));
            inv.key(n).key(m).key(u).arg(id);
        }
        async move {
            let mut c = self.inner.conn();
            self.inner
                .op("release", inv.invoke_async::<()>(&mut c))
                .await
        }
        .boxed()
    }

    fn get(&self, ids: &[String]) -> BoxFuture<'_, Result<Vec<CounterInfo>, StoreError>> {
        let mut p = redis::pipe();
        for id in ids {
            let k = family_keys(&self.family_of(ids, id));
            p.hget(&k[0], id).hget(&k[1], id).hget(&k[2], id);
        }
        let ids = ids.to_vec();
        async move {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut c = self.inner.conn();
            let got: Vec<Option<String>> = self.inner.op("get", p.query_async(&mut c)).await?;
            Ok(ids
                .iter()
                .zip(got.chunks(3))
                .map(|(id, v)| {
                    let meta = v[1].as_deref().and_then(parse_meta);
                    CounterInfo {
                        id: id.clone(),
                        uses: v[0].as_deref().and_then(|s| s.parse().ok()).unwrap_or(0),
                        limit: meta.as_ref().and_then(|m| m.limit),
                        expires: meta.as_ref().and_then(|m| m.expires),
                        last_use: v[2].as_deref().and_then(|s| s.parse().ok()),
                    }
                })
                .collect())
        }
        .boxed()
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<CounterInfo>, StoreError>> {
        async move {
            let inner = &self.inner;
            let mut c = inner.conn();
            let families: Vec<String> = inner.op("SMEMBERS", c.smembers(FAMILIES)).await?;
            if families.is_empty() {
                return Ok(Vec::new());
            }
            let mut p = redis::pipe();
            for f in &families {
                let k = family_keys(f);
                p.hgetall(&k[0]).hgetall(&k[1]).hgetall(&k[2]);
            }
            let got: Vec<HashMap<String, String>> = inner.op("list", p.query_async(&mut c)).await?;
            let mut out = Vec::new();
            for fam in got.chunks(3) {
                let (counts, metas, last) = (&fam[0], &fam[1], &fam[2]);
                for (id, n) in counts {
                    let meta = metas.get(id).and_then(|j| parse_meta(j));
                    out.push(CounterInfo {
                        id: id.clone(),
                        uses: n.parse().unwrap_or(0),
                        limit: meta.as_ref().and_then(|m| m.limit),
                        expires: meta.as_ref().and_then(|m| m.expires),
                        last_use: last.get(id).and_then(|s| s.parse().ok()),
                    });
                }
            }
            Ok(out)
        }
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        // Every reservation Redis acknowledged is already as durable as its
        // persistence makes it; refusing new ones keeps the embedded
        // store's shutdown contract.
        self.inner.closing.store(true, Ordering::SeqCst);
        async { Ok(()) }.boxed()
    }

    fn healthy(&self) -> bool {
        !self.inner.closing.load(Ordering::SeqCst)
            && self.inner.stale_for() <= STALE_BOUND
            && !self.inner.evicts.load(Ordering::Relaxed)
            && self.inner.lost.get().is_none()
    }

    fn register(&self, _blocks: &[BlockMeta]) {
        // Metadata is written only by `reserve`, with the family bound
        // checked in the same script: anything else would let a token
        // holder grow the shared store with blocks that were never allowed.
    }

    fn blocks(&self) -> BoxFuture<'_, Result<Vec<BlockMeta>, StoreError>> {
        async move {
            let inner = &self.inner;
            let mut c = inner.conn();
            let families: Vec<String> = inner.op("SMEMBERS", c.smembers(FAMILIES)).await?;
            if families.is_empty() {
                return Ok(Vec::new());
            }
            let mut p = redis::pipe();
            for f in &families {
                p.hvals(&family_keys(f)[1]);
            }
            let got: Vec<Vec<String>> = inner.op("blocks", p.query_async(&mut c)).await?;
            Ok(got.iter().flatten().filter_map(|j| parse_meta(j)).collect())
        }
        .boxed()
    }

    fn idempotency(
        &self,
        window: Duration,
    ) -> Option<Arc<dyn crate::proxy::idempotency::IdempotencyStore>> {
        Some(Arc::new(shared::RedisIdempotency::new(
            self.inner.clone(),
            window,
        )))
    }

    fn windows(&self) -> Option<Arc<dyn crate::store::window::WindowStore>> {
        Some(Arc::new(windows::RedisWindows::new(self.inner.clone())))
    }

    fn alert_claims(&self) -> Option<Arc<dyn crate::monitor::alerts::AlertClaims>> {
        Some(Arc::new(shared::RedisAlertClaims {
            inner: self.inner.clone(),
        }))
    }
}

impl RevocationList for RedisStore {
    fn first_revoked(&self, ids: &[String]) -> Result<Option<usize>, StoreError> {
        // The list's keys can be evicted too (and a request that passes
        // here reserves next, which refuses anyway).
        self.inner.refuse_if_unsafe()?;
        let stale = self.inner.stale_for();
        if stale > STALE_BOUND {
            return Err(StoreError::Io(format!(
                "the revocation list could not be confirmed with redis at {} for {} ms (more than the {} ms bound); refusing rather than deciding on an old list",
                self.inner.target,
                stale.as_millis(),
                STALE_BOUND.as_millis()
            )));
        }
        let r = self.inner.read_revoked();
        if r.ids.is_empty() {
            return Ok(None);
        }
        Ok(ids.iter().position(|id| r.ids.contains(id)))
    }

    fn revoke(&self, id: &str) -> BoxFuture<'_, Result<bool, StoreError>> {
        let id = id.to_ascii_lowercase();
        async move {
            // Revocations are never undone: known here means known to Redis.
            if self.inner.read_revoked().ids.contains(&id) {
                return Ok(false);
            }
            let v = revoke_in_redis(&self.inner, &id).await?;
            let mut r = self.inner.write_revoked();
            r.ids.insert(id);
            if v > 0 && v == r.version + 1 {
                r.version = v;
            }
            // Redis's HSETNX is what says it is new: the published message
            // may already have put the id in the local copy.
            Ok(v > 0)
        }
        .boxed()
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<(String, u64)>, StoreError>> {
        async move {
            let mut c = self.inner.conn();
            let all: HashMap<String, u64> = self
                .inner
                .op("HGETALL revocations", c.hgetall(REVOKED_IDS))
                .await?;
            Ok(all.into_iter().collect())
        }
        .boxed()
    }

    fn len(&self) -> usize {
        self.inner.read_revoked().ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `redis-server` of its own on a free port, killed on drop.
    struct Server {
        port: u16,
        child: std::process::Child,
        _dir: tempfile::TempDir,
    }

    impl Server {
        fn start() -> Server {
            for _ in 0..20 {
                let dir = tempfile::tempdir().unwrap();
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port();
                let mut child = std::process::Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args([
                        "--save",
                        "",
                        "--appendonly",
                        "yes",
                        "--appendfsync",
                        "always",
                    ])
                    .arg("--dir")
                    .arg(dir.path())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("redis-server is installed (apt-get install redis-server)");
                for _ in 0..100 {
                    if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                        return Server {
                            port,
                            child,
                            _dir: dir,
                        };
                    }
                    if child.try_wait().unwrap().is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!("could not start redis-server on a free port");
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/0", self.port)
        }

        fn kill9(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }

        /// Holds every write, script calls included, for 500 ms: a Redis
        /// slow to answer.
        async fn pause_writes(&self) {
            let client = redis::Client::open(self.url()).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(500)
                .arg("WRITE")
                .query_async::<()>(&mut c)
                .await
                .unwrap();
        }
    }

    /// Takes every round of calls, so each reservation from now on waits in
    /// the batcher's queue until the permit is dropped.
    async fn hold_every_round(s: &RedisStore) -> tokio::sync::OwnedSemaphorePermit {
        let every = u32::try_from(batch::IN_FLIGHT).unwrap();
        s.inner
            .batch
            .rounds
            .clone()
            .acquire_many_owned(every)
            .await
            .unwrap()
    }

    /// The request running in `t` gives up 200 ms into a pause (its client
    /// left), while its Redis call is still out.
    async fn give_up_while_paused<T: 'static>(t: tokio::task::JoinHandle<T>) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!t.is_finished(), "the call waits for the pause");
        t.abort();
        assert!(t.await.is_err_and(|e| e.is_cancelled()));
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.kill9();
        }
    }

    fn spec(id: &str, limit: Option<u64>) -> CounterSpec {
        CounterSpec::standalone(id, limit, None)
    }

    /// A proxy killed while its requests were in flight cannot hold their
    /// concurrency slots forever: a slot is a lease, gone unless renewed.
    /// A renewed one stays.
    #[tokio::test]
    async fn an_unrenewed_in_flight_slot_ends_with_its_lease() {
        use crate::store::window::{Admit, WindowStore};
        let server = Server::start();
        let store = RedisStore::connect(&server.url(), None).await.unwrap();
        let lease = Duration::from_millis(600);
        let w = windows::RedisWindows::with_lease(store.inner.clone(), lease);
        let cap = [crate::verify::CapSpec {
            block: 0,
            id: "k".into(),
            limit: 1,
        }];
        let Admit::Admitted {
            ticket: renewed, ..
        } = w.admit("f", &[], &cap).await.unwrap()
        else {
            panic!("first slot")
        };
        assert!(matches!(
            w.admit("f", &[], &cap).await.unwrap(),
            Admit::Full(_)
        ));
        // Renewed past its first lease: still held.
        for _ in 0..4 {
            tokio::time::sleep(lease / 3).await;
            w.renew(&renewed).await.unwrap();
        }
        assert!(matches!(
            w.admit("f", &[], &cap).await.unwrap(),
            Admit::Full(_)
        ));
        // Its holder "dies": no renewal, no finish. The lease ends.
        tokio::time::sleep(lease + Duration::from_millis(200)).await;
        assert!(matches!(
            w.admit("f", &[], &cap).await.unwrap(),
            Admit::Admitted { .. }
        ));
    }

    /// Regression (red team, wave 2): a Redis outage longer than the lease
    /// let a streaming request's slot expire, and the renewals after it
    /// never put it back, so a cap of 1 admitted a second stream while the
    /// first still ran. A renewal now restores the slot.
    #[tokio::test]
    async fn a_renewal_after_the_lease_ended_takes_the_slot_back() {
        use crate::store::window::{Admit, WindowStore};
        let server = Server::start();
        let store = RedisStore::connect(&server.url(), None).await.unwrap();
        let lease = Duration::from_millis(400);
        let w = windows::RedisWindows::with_lease(store.inner.clone(), lease);
        let cap = [crate::verify::CapSpec {
            block: 0,
            id: "k".into(),
            limit: 1,
        }];
        let Admit::Admitted { ticket: first, .. } = w.admit("f", &[], &cap).await.unwrap() else {
            panic!("first slot")
        };
        // No renewal reaches Redis for longer than the lease (it was down).
        tokio::time::sleep(lease + Duration::from_millis(300)).await;
        // Redis is back: the first request, still streaming, renews.
        w.renew(&first).await.unwrap();
        assert!(
            matches!(w.admit("f", &[], &cap).await.unwrap(), Admit::Full(_)),
            "a second request was admitted while the first still holds the cap"
        );
        // Once it ends, the slot is free.
        w.finish(&first).await.unwrap();
        assert!(matches!(
            w.admit("f", &[], &cap).await.unwrap(),
            Admit::Admitted { .. }
        ));
    }

    /// A request that gives up while its admission is out (Redis slow,
    /// here paused) holds no slot: not the concurrency cap's for a lease,
    /// not the rate window's for its window.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_admission_abandoned_while_out_holds_no_slot() {
        use crate::store::window::{Admit, WindowStore};
        let server = Server::start();
        let store = RedisStore::connect(&server.url(), None).await.unwrap();
        let w = Arc::new(windows::RedisWindows::new(store.inner.clone()));
        let cap = [crate::verify::CapSpec {
            block: 0,
            id: "k".into(),
            limit: 1,
        }];
        let rate = [crate::verify::WindowSpec {
            block: 0,
            id: "k".into(),
            seconds: 3600,
            limit: 2,
        }];
        // One admission first (the script is then loaded in Redis), done.
        let Admit::Admitted { ticket, .. } = w.admit("f", &rate, &cap).await.unwrap() else {
            panic!("first slot")
        };
        w.finish(&ticket).await.unwrap();
        server.pause_writes().await;
        let gave_up = {
            let (w, rate, cap) = (w.clone(), rate.clone(), cap.clone());
            tokio::spawn(async move { w.admit("f", &rate, &cap).await.map(|_| ()) })
        };
        give_up_while_paused(gave_up).await;
        // The cap (1 in flight) is free again, and the hour's window (2)
        // still has the second slot.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match w.admit("f", &rate, &cap).await.unwrap() {
                Admit::Admitted { counts, .. } => {
                    assert_eq!(
                        counts.rates[0].2, 2,
                        "the abandoned request took no rate slot"
                    );
                    break;
                }
                Admit::Full(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Admit::Full(f) => panic!("the abandoned admission still holds a slot: {f:?}"),
            }
        }
    }

    #[tokio::test]
    async fn counts_are_exact_across_two_stores_on_one_redis() {
        let server = Server::start();
        let a = RedisStore::connect(&server.url(), None).await.unwrap();
        let b = RedisStore::connect(&server.url(), None).await.unwrap();
        for i in 1..=6u64 {
            let s = if i % 2 == 0 { &a } else { &b };
            let r = s
                .reserve(&[spec("a", Some(10)), spec("b", None)])
                .await
                .unwrap();
            assert_eq!(r.uses, vec![i, i]);
            r.durable.await.unwrap();
        }
        b.release(&["a".into()]).await.unwrap();
        assert_eq!(a.peek(&["a".into()]).await.unwrap(), vec![5]);
        let got = a.get(&["a".into()]).await.unwrap();
        assert_eq!((got[0].uses, got[0].limit), (5, Some(10)));
        let mut listed: Vec<(String, u64)> = CounterStore::list(&b)
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.id, c.uses))
            .collect();
        listed.sort();
        assert_eq!(listed, vec![("a".into(), 5), ("b".into(), 6)]);
    }

    /// Every command Redis runs from now on, as MONITOR prints it (script
    /// calls included, marked `[0 lua]`), collected by a thread.
    fn monitor(server: &Server) -> Arc<Mutex<Vec<String>>> {
        use std::io::{BufRead, Write};
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        tcp.write_all(b"MONITOR\r\n").unwrap();
        let mut lines = std::io::BufReader::new(tcp).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "+OK");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = seen.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                out.lock().unwrap().push(l);
            }
        });
        seen
    }

    /// Token-like blocks: 128-digit ids, a family of three.
    fn chain() -> Vec<CounterSpec> {
        let id = |c: char| c.to_string().repeat(128);
        (0..3)
            .map(|i| CounterSpec {
                family: id('a'),
                parent: (i > 0).then(|| id((b'a' + i as u8 - 1) as char)),
                index: i,
                label: Some(format!("agent {i}")),
                ..CounterSpec::standalone(&id((b'a' + i as u8) as char), Some(1000), None)
            })
            .collect()
    }

    async fn wait_for(log: &Mutex<Vec<String>>, n: usize, what: &str) -> Vec<String> {
        for _ in 0..200 {
            let got: Vec<String> = log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(what))
                .cloned()
                .collect();
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("Redis did not run {n} {what}: {:#?}", log.lock().unwrap())
    }

    /// A warm reservation does not resend what Redis already holds: the
    /// blocks' metadata (a few hundred bytes each) goes with the first
    /// reservation only, and the last-use time is written once a second,
    /// not on every use. What Redis keeps is the same.
    #[tokio::test]
    async fn a_warm_reservation_sends_no_metadata_and_one_last_use_a_second() {
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        let specs = chain();
        s.reserve(&specs).await.unwrap();
        let log = monitor(&server);
        let t0 = now_unix();
        for _ in 0..19 {
            s.reserve(&specs).await.unwrap();
        }
        let t1 = now_unix();
        let calls = wait_for(&log, 19, "\"EVALSHA\"").await;
        for c in &calls {
            assert!(
                !c.contains("agent") && !c.contains("parent"),
                "metadata resent: {c}"
            );
        }
        // The last-use writes: at most one per block and new second
        // (MONITOR prints the script's own commands too).
        let log = log.lock().unwrap().clone();
        let last_use_writes = log
            .iter()
            .filter(|l| l.contains("[0 lua]") && l.contains("\"HSET\"") && l.contains("}:u\""))
            .count() as u64;
        assert!(
            last_use_writes <= 3 * (1 + t1 - t0),
            "{last_use_writes} writes: {log:#?}"
        );
        let got = s
            .get(&specs.iter().map(|c| c.id.clone()).collect::<Vec<_>>())
            .await
            .unwrap();
        for (g, c) in got.iter().zip(&specs) {
            assert_eq!((g.uses, g.limit), (20, c.limit));
            assert!((t0..=t1).contains(&g.last_use.unwrap()), "{g:?}");
        }
        let blocks = s.blocks().await.unwrap();
        assert_eq!(blocks.len(), 3);
        assert!(
            blocks
                .iter()
                .all(|b| b.label.as_deref().is_some_and(|l| l.starts_with("agent")))
        );
    }

    /// Regression (red team, wave 2): a new family was added to
    /// `till:families` by a second command after the reserve script, so a
    /// proxy killed between the two left counters nothing listed. The
    /// family is now listed first, in the same pipeline (Redis runs one
    /// connection's commands in order): by the time a counter exists, so
    /// does its listing.
    #[tokio::test]
    async fn a_new_family_is_listed_before_it_is_counted() {
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        // The script is loaded: no NOSCRIPT retry in what follows.
        s.reserve(&[spec("warm", None)]).await.unwrap();
        let log = monitor(&server);
        s.reserve(&[spec("fresh", Some(5))]).await.unwrap();
        s.reserve(&[spec("fresh", Some(5))]).await.unwrap();
        wait_for(&log, 2, "\"EVALSHA\"").await;
        let log = log.lock().unwrap().clone();
        let at = |what: &str| log.iter().position(|l| l.contains(what));
        let listed = at("\"SADD\" \"till:families\" \"fresh\"").expect("listed");
        let counted = at("\"EVALSHA\"").unwrap();
        assert!(listed < counted, "counted before listed: {log:#?}");
        // A warm reservation sends no registration.
        let sadds = log.iter().filter(|l| l.contains("\"SADD\"")).count();
        assert_eq!(sadds, 1, "{log:#?}");
    }

    /// Regression (red team, wave 2): counters whose family `till:families`
    /// does not list (left by a proxy killed between the script and the
    /// registration, before the fix above) were missing from the usage view
    /// and from `till store export`; importing that export into the
    /// embedded store gave a spent token its uses back. The export (and the
    /// collector) now find every counted family and list it again.
    #[tokio::test]
    async fn a_family_counted_but_never_listed_is_exported_and_listed_again() {
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        let token = [spec("orphan", Some(5))];
        for _ in 0..5 {
            s.reserve(&token).await.unwrap();
        }
        s.reserve(&[spec("listed", None)]).await.unwrap();
        // The state the crash left: the counters, no listing.
        let client = redis::Client::open(server.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = c.srem(FAMILIES, "orphan").await.unwrap();

        let exported = s.export().await.unwrap();
        let orphan = exported.counters.iter().find(|e| e.id == "orphan");
        assert_eq!(orphan.map(|e| e.uses), Some(5), "{:?}", exported.counters);
        let listed: Vec<String> = CounterStore::list(&s)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert!(listed.contains(&"orphan".to_string()), "{listed:?}");
        // Moved to the embedded store, the spent token stays spent.
        let dir = tempfile::tempdir().unwrap();
        let embedded = crate::store::EmbeddedStore::open(dir.path()).unwrap();
        embedded.import(&exported).unwrap();
        assert_eq!(embedded.peek(&["orphan".into()]).await.unwrap(), vec![5]);

        // The collector lists it again too.
        let _: () = c.srem(FAMILIES, "orphan").await.unwrap();
        s.gc_expired(now_unix()).await.unwrap();
        let members: Vec<String> = c.smembers(FAMILIES).await.unwrap();
        assert!(members.contains(&"orphan".to_string()), "{members:?}");
        assert_eq!(s.repair_families().await.unwrap(), 0);
    }

    /// A proxy that recorded a block's metadata once and finds it gone (the
    /// family's keys expired in Redis, or were replaced) sends it again: the
    /// reservation succeeds and the block keeps its limit and label.
    #[tokio::test]
    async fn metadata_lost_in_redis_is_sent_again() {
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        let specs = chain();
        s.reserve(&specs).await.unwrap();
        let client = redis::Client::open(server.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = c.del(&family_keys(&specs[0].family)[..]).await.unwrap();
        let r = s.reserve(&specs).await.unwrap();
        assert_eq!(r.uses, vec![1, 1, 1], "the counts went with the keys");
        let blocks = s.blocks().await.unwrap();
        assert_eq!(blocks.len(), 3, "{blocks:?}");
        for b in blocks {
            let c = specs.iter().find(|c| c.id == b.id).unwrap();
            assert_eq!(
                (&b.label, b.limit, &b.parent),
                (&c.label, c.limit, &c.parent)
            );
        }
    }

    /// Concurrent reservations of one family go to Redis together, and
    /// each is still all-or-nothing with its own post-increment count: the
    /// ones refused in a shared call (family full) change no counter, and
    /// the others count exactly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reservations_go_together_and_each_counts_alone() {
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        s.set_max_blocks_per_family(3);
        let block = crate::store::test_block;
        let (root, a) = (block("root", None), block("a", Some("root")));
        s.reserve(&[root.clone(), a.clone()]).await.unwrap();
        let client = redis::Client::open(server.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let evalsha = async |c: &mut redis::aio::MultiplexedConnection| -> u64 {
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(c)
                .await
                .unwrap();
            info.lines()
                .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
                .and_then(|v| v.split(',').next()?.parse().ok())
                .unwrap_or(0)
        };
        let before = evalsha(&mut c).await;
        // 300 reservations of [root, a] and 20 that each add a new block,
        // of which the family bound (3) leaves room for one.
        let mut tasks = Vec::new();
        for i in 0..320 {
            let s = s.clone();
            let specs = if i % 16 == 0 {
                vec![root.clone(), block(&format!("new{i}"), Some("root"))]
            } else {
                vec![root.clone(), a.clone()]
            };
            tasks.push(tokio::spawn(async move {
                (specs[1].id.clone(), s.reserve(&specs).await)
            }));
        }
        let mut root_counts = Vec::new();
        let (mut a_ok, mut new_ok, mut full) = (0, 0, 0);
        for t in tasks {
            match t.await.unwrap() {
                (id, Ok(r)) => {
                    root_counts.push(r.uses[0]);
                    if id == "a" {
                        a_ok += 1;
                        assert!(r.uses[1] >= 2);
                    } else {
                        new_ok += 1;
                        assert_eq!(r.uses[1], 1);
                    }
                }
                (id, Err(StoreError::FamilyFull { limit: 3 })) => {
                    assert_ne!(id, "a");
                    full += 1;
                }
                (_, Err(e)) => panic!("{e}"),
            }
        }
        let calls = evalsha(&mut c).await - before;
        assert_eq!((a_ok, new_ok, full), (300, 1, 19));
        root_counts.sort();
        assert_eq!(
            root_counts,
            (2..=302).collect::<Vec<u64>>(),
            "each count once"
        );
        let got = s.get(&["root".into(), "a".into()]).await.unwrap();
        assert_eq!((got[0].uses, got[1].uses), (302, 301));
        assert!(calls < 160, "{calls} script calls for 320 reservations");
    }

    /// A request that gave up while its reservation waited in the queue
    /// (its client left) spends nothing: the queue drops it unsent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reservation_abandoned_in_the_queue_spends_nothing() {
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        let a = spec("a", None);
        s.reserve(std::slice::from_ref(&a)).await.unwrap();
        // Both rounds busy: every reservation now waits in the queue.
        let held = hold_every_round(&s).await;
        let reserve = |s: &RedisStore| {
            let (s, a) = (s.clone(), a.clone());
            tokio::spawn(async move { s.reserve(std::slice::from_ref(&a)).await })
        };
        let gave_up = reserve(&s);
        let waits = reserve(&s);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !gave_up.is_finished() && !waits.is_finished(),
            "both queued"
        );
        gave_up.abort();
        assert!(gave_up.await.is_err_and(|e| e.is_cancelled()));
        drop(held);
        let r = waits.await.unwrap().unwrap();
        assert_eq!(r.uses, vec![2], "the abandoned reservation was not sent");
        assert_eq!(s.peek(&["a".into()]).await.unwrap(), vec![2]);
    }

    /// The count of `id` in Redis, once it equals `want` (the give-back is
    /// in the background), or what it is after 5 s.
    async fn count_settles(s: &RedisStore, id: &str, want: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = s.get(&[id.to_string()]).await.unwrap()[0].uses;
            if got == want || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A request that gives up while its script call is out (its client
    /// left while Redis was slow) spends nothing, whether it sent the call
    /// itself or the batcher sent it in a round: the call is finished and
    /// what it counted goes back, as on the embedded store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reservation_abandoned_while_its_call_is_out_spends_nothing() {
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        let a = spec("a", None);
        s.reserve(std::slice::from_ref(&a)).await.unwrap();
        let reserve = |s: &RedisStore| {
            let (s, a) = (s.clone(), a.clone());
            tokio::spawn(async move { s.reserve(std::slice::from_ref(&a)).await })
        };

        // 1. A round was free: the request sent the call itself.
        server.pause_writes().await;
        give_up_while_paused(reserve(&s)).await;
        assert_eq!(count_settles(&s, "a", 1).await, 1, "sent by the request");

        // 2. Both rounds busy: the reservation queues, the batcher sends it.
        let held = hold_every_round(&s).await;
        let queued = reserve(&s);
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.pause_writes().await;
        drop(held);
        give_up_while_paused(queued).await;
        assert_eq!(count_settles(&s, "a", 1).await, 1, "sent by the batcher");

        // Given back once each, not more: the next use is the second.
        let r = s.reserve(std::slice::from_ref(&a)).await.unwrap();
        assert_eq!(r.uses, vec![2]);
    }

    /// An answer that arrived for a request dropped before reading it: its
    /// uses go back too.
    #[tokio::test]
    async fn an_answer_never_read_gives_its_uses_back() {
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        let a = spec("a", None);
        s.reserve(std::slice::from_ref(&a)).await.unwrap();
        s.reserve(std::slice::from_ref(&a)).await.unwrap();
        let counters = [a];
        let drop_unread = |answer: Vec<i64>| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            tx.send(Ok(answer)).unwrap();
            drop(Awaited {
                got: Some(rx),
                inner: &s.inner,
                counters: &counters,
            });
        };
        // A refused reservation (-2, family full) counted nothing: nothing goes back.
        drop_unread(vec![-2, 0, 0]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(s.get(&["a".into()]).await.unwrap()[0].uses, 2);
        drop_unread(vec![0, 0, 2]);
        assert_eq!(count_settles(&s, "a", 1).await, 1);
    }

    #[tokio::test]
    async fn peeking_creates_nothing() {
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        assert_eq!(s.peek(&["a".into(), "b".into()]).await.unwrap(), vec![0, 0]);
        s.release(&["a".into()]).await.unwrap();
        assert!(CounterStore::list(&s).await.unwrap().is_empty());
        assert!(s.blocks().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn blocks_tracked_per_family_are_bounded() {
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        s.set_max_blocks_per_family(3);
        let block = crate::store::test_block;
        let root = block("root", None);
        for kid in ["k1", "k2"] {
            s.reserve(&[root.clone(), block(kid, Some("root"))])
                .await
                .unwrap();
        }
        let err = s
            .reserve(&[root.clone(), block("k3", Some("root"))])
            .await
            .err()
            .expect("a fourth block of the family is refused");
        assert!(matches!(err, StoreError::FamilyFull { limit: 3 }), "{err}");
        assert_eq!(s.peek(&["root".into()]).await.unwrap(), vec![2]);
        s.reserve(&[root.clone(), block("k1", Some("root"))])
            .await
            .unwrap();
        s.reserve(&[spec("other", None)]).await.unwrap();
        let mut ids: Vec<String> = s
            .blocks()
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        ids.sort();
        assert_eq!(ids, ["k1", "k2", "other", "root"]);
    }

    #[tokio::test]
    async fn regression_blocks_of_refused_requests_do_not_fill_their_family() {
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        s.set_max_blocks_per_family(4);
        crate::store::check_refused_blocks_leave_no_trace(&s).await;
    }

    /// Red team (wave 2, fourth pass): the hourly collector went by the
    /// proxy's own clock, so one replica with its clock a month ahead retired
    /// the counters of live tokens in the shared Redis, and every replica
    /// refused them for good. It now goes by the earlier of its clock and
    /// Redis's.
    #[tokio::test]
    async fn regression_a_replica_clock_ahead_retires_no_live_counter() {
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        let a = CounterSpec::standalone("a", Some(5), Some(now_unix() + 3600));
        s.reserve(std::slice::from_ref(&a)).await.unwrap();
        let ahead = now_unix() + 40 * 24 * 3600;
        assert_eq!(s.collect_expired(ahead).await.unwrap(), 0);
        assert_eq!(
            s.reserve(std::slice::from_ref(&a)).await.unwrap().uses,
            vec![2]
        );
    }

    #[tokio::test]
    async fn a_collected_counter_never_comes_back_with_a_fresh_budget() {
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        let expires = now_unix() + 60;
        let a = CounterSpec::standalone("a", Some(5), Some(expires));
        for _ in 0..5 {
            s.reserve(std::slice::from_ref(&a)).await.unwrap();
        }
        let removed = s.gc_expired(expires + 30 * 24 * 3600).await.unwrap();
        assert_eq!(removed, 1);
        // Another proxy, started later, refuses it too.
        let other = RedisStore::connect(&server.url(), None).await.unwrap();
        assert!(matches!(
            other.reserve(std::slice::from_ref(&a)).await,
            Err(StoreError::Retired)
        ));
    }

    /// Regression (issue "Scale out on Redis"): the embedded store forgot a
    /// retired block's family, so a moved child block was filed under its
    /// own id, where the reserve script (which looks in the token's family)
    /// never found it: a retired child got a fresh budget on Redis.
    /// Importing an export taken before a block was retired (its counter
    /// and metadata in the file) does not bring the block back.
    #[tokio::test]
    async fn an_old_export_does_not_revive_a_retired_block() {
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        let expires = now_unix() + 60;
        let a = CounterSpec::standalone("a", Some(5), Some(expires));
        s.reserve(std::slice::from_ref(&a)).await.unwrap();
        let old = s.export().await.unwrap();
        assert_eq!(old.counters.len(), 1);
        assert_eq!(s.gc_expired(expires + 30 * 24 * 3600).await.unwrap(), 1);
        s.import(&old).await.unwrap();
        let other = RedisStore::connect(&server.url(), None).await.unwrap();
        for store in [&s, &other] {
            assert!(matches!(
                store.reserve(std::slice::from_ref(&a)).await,
                Err(StoreError::Retired)
            ));
        }
        assert!(s.blocks().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_child_retired_on_the_embedded_store_stays_retired_on_redis() {
        let dir = tempfile::tempdir().unwrap();
        let embedded = crate::store::EmbeddedStore::open(dir.path()).unwrap();
        let expires = now_unix() + 60;
        let root = CounterSpec::standalone("f00d", Some(5), Some(expires));
        let child = CounterSpec {
            id: "c41d".into(),
            limit: Some(2),
            expires: Some(expires),
            family: "f00d".into(),
            parent: Some("f00d".into()),
            index: 1,
            label: None,
            rates: Vec::new(),
            concurrency: None,
        };
        let both = [root.clone(), child.clone()];
        embedded
            .reserve(&both)
            .await
            .unwrap()
            .durable
            .await
            .unwrap();
        assert_eq!(embedded.gc_expired(expires + 30 * 24 * 3600).unwrap(), 2);
        let file = embedded.export().unwrap();
        let retired: Vec<_> = file
            .retired
            .iter()
            .map(|r| (r.id.as_str(), r.family.as_deref()))
            .collect();
        assert_eq!(
            retired,
            vec![("c41d", Some("f00d")), ("f00d", Some("f00d"))]
        );

        let server = Server::start();
        let redis = RedisStore::connect(&server.url(), None).await.unwrap();
        redis.import(&file).await.unwrap();
        for specs in [&both[..], std::slice::from_ref(&child)] {
            assert!(matches!(
                redis.reserve(specs).await,
                Err(StoreError::Retired)
            ));
        }
        // And back: the family survives a second move.
        let dir2 = tempfile::tempdir().unwrap();
        let again = crate::store::EmbeddedStore::open(dir2.path()).unwrap();
        again.import(&redis.export().await.unwrap()).unwrap();
        let back: Vec<_> = again
            .export()
            .unwrap()
            .retired
            .into_iter()
            .map(|r| (r.id, r.family))
            .collect();
        let sent: Vec<_> = file
            .retired
            .iter()
            .map(|r| (r.id.clone(), r.family.clone()))
            .collect();
        assert_eq!(back, sent);
    }

    #[tokio::test]
    async fn nothing_reserves_once_the_final_flush_started() {
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        s.reserve(&[spec("a", Some(100))]).await.unwrap();
        s.flush().await.unwrap();
        assert!(matches!(
            s.reserve(&[spec("a", Some(100))]).await,
            Err(StoreError::Closed)
        ));
        assert!(!s.healthy());
    }

    #[tokio::test]
    async fn a_revocation_reaches_every_store_and_persists() {
        let server = Server::start();
        let a = RedisStore::connect(&server.url(), None).await.unwrap();
        let b = RedisStore::connect(&server.url(), None).await.unwrap();
        assert!(a.revoke("ABCD").await.unwrap());
        assert!(!b.revoke("abcd").await.unwrap());
        let ids = ["x".to_string(), "abcd".to_string()];
        let t0 = Instant::now();
        while b.first_revoked(&ids).unwrap() != Some(1) {
            assert!(
                t0.elapsed() < STALE_BOUND,
                "not propagated within the bound"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let late = RedisStore::connect(&server.url(), None).await.unwrap();
        assert_eq!(RevocationList::len(&late), 1);
        assert_eq!(late.first_revoked(&ids).unwrap(), Some(1));
        let listed = RevocationList::list(&late).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0, "abcd");
    }

    /// `CONFIG SET` on the test's server.
    async fn config_set(server: &Server, name: &str, value: &str) {
        let client = redis::Client::open(server.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }

    /// Waits until the store's readiness is `want`.
    /// Runs one command on `server`'s Redis.
    async fn redis_cmd<T: redis::FromRedisValue>(server: &Server, cmd: &mut redis::Cmd) -> T {
        let client = redis::Client::open(server.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        cmd.query_async(&mut c).await.unwrap()
    }

    /// Red team (wave 2, fourth pass): a wiped Redis answered the next
    /// reservation with a count of 1, as if the block had never been used.
    /// Now the reservation that finds the store id gone is refused, and so
    /// is everything after it, on every store, for good.
    #[tokio::test]
    async fn regression_a_reservation_on_a_wiped_redis_is_refused() {
        let server = Server::start();
        let a = RedisStore::connect(&server.url(), None).await.unwrap();
        let b = RedisStore::connect(&server.url(), None).await.unwrap();
        assert_eq!(a.store_id(), b.store_id(), "one data set, one id");
        let chain = [spec("aa01", Some(3))];
        for n in 1..=3 {
            assert_eq!(a.reserve(&chain).await.unwrap().uses, vec![n]);
        }
        let () = redis_cmd(&server, &mut redis::cmd("FLUSHALL")).await;
        let e = match a.reserve(&chain).await {
            Ok(r) => panic!("counted again from {:?} on a wiped Redis", r.uses),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("lost the data this proxy counted in"), "{e}");
        assert!(a.reserve(&chain).await.is_err(), "refused for good");
        // The other store learns it from its next reservation or poll.
        let t0 = Instant::now();
        while b.healthy() {
            assert!(t0.elapsed() < Duration::from_secs(5), "b never noticed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(b.first_revoked(&["aa01".to_string()]).is_err());
        assert!(b.reserve(&chain).await.is_err());
    }

    /// Red team (wave 2, fourth pass): after a wipe, a new revocation could
    /// bring Redis's version counter back to the one a store knew, and the
    /// store, seeing no change, never wrote the revocations Redis had lost
    /// back: a proxy started later would not know them.
    #[tokio::test]
    async fn regression_revocations_known_before_a_wipe_are_written_back() {
        let server = Server::start();
        let a = RedisStore::connect(&server.url(), None).await.unwrap();
        assert!(a.revoke("ab01").await.unwrap());
        let () = redis_cmd(&server, &mut redis::cmd("FLUSHALL")).await;
        // Version 1 again, through a client that is not a store.
        let v: u64 = redis_cmd(
            &server,
            redis::cmd("EVAL")
                .arg(REVOKE_LUA)
                .arg(2)
                .arg(REVOKED_IDS)
                .arg(REVOKED_VERSION)
                .arg("cd02")
                .arg(1)
                .arg(channel(0)),
        )
        .await;
        // 1 unless this store's poll already wrote `ab01` back.
        assert!(v >= 1);
        let t0 = Instant::now();
        loop {
            let back: bool =
                redis_cmd(&server, redis::cmd("HEXISTS").arg(REVOKED_IDS).arg("ab01")).await;
            if back {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "ab01 never written back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Red team (wave 2, fourth pass): a Redis user allowed to publish on
    /// the revocation channel, with no right on Till's keys, could revoke any
    /// token (and store garbage of any size): every store applied the id of
    /// a message as it came, and its next sync wrote it into the list.
    #[tokio::test]
    async fn regression_a_published_message_alone_revokes_nothing() {
        let server = Server::start();
        let a = RedisStore::connect(&server.url(), None).await.unwrap();
        let b = RedisStore::connect(&server.url(), None).await.unwrap();
        let t0 = Instant::now();
        loop {
            // Until `a` has subscribed; the second message opens a gap in
            // the versions, so the list is synced (and was written back).
            let mut heard = 0;
            for m in ["1 deadbeef", "3 cafe"] {
                heard +=
                    redis_cmd::<u64>(&server, redis::cmd("PUBLISH").arg(channel(0)).arg(m)).await;
            }
            if heard >= 4 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "nobody subscribed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A real revocation, published after them: once `a` applied it, it
        // had read the forged ones.
        assert!(b.revoke("ab01").await.unwrap());
        let ids = [
            "ab01".to_string(),
            "deadbeef".to_string(),
            "cafe".to_string(),
        ];
        let t0 = Instant::now();
        while a.first_revoked(&ids[..1]).unwrap().is_none() {
            assert!(
                t0.elapsed() < STALE_BOUND,
                "not propagated within the bound"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(POLL_INTERVAL * 3).await;
        assert_eq!(
            a.first_revoked(&ids[1..]).unwrap(),
            None,
            "a forged id is enforced"
        );
        let listed: Vec<String> = RevocationList::list(&a)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(listed, vec!["ab01".to_string()], "forged ids stored");
    }

    /// Red team (wave 2, fourth pass): a reconnection Redis refused (its
    /// password changed and the connection dropped) wedged the store: the
    /// client's manager reconnects only after an I/O error, so the refused
    /// connection stayed, and every request got 503 until a restart, long
    /// after the password was set back. Now it recovers by itself.
    #[tokio::test]
    async fn regression_a_refused_reconnection_does_not_wedge_the_store() {
        let server = Server::start();
        let as_admin = |pw: &str| format!("redis://:{pw}@127.0.0.1:{}/0", server.port);
        let run = |url: String, args: &'static [&'static str]| async move {
            let client = redis::Client::open(url).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            let mut cmd = redis::cmd(args[0]);
            for a in &args[1..] {
                cmd.arg(*a);
            }
            let _: redis::Value = cmd.query_async(&mut c).await.unwrap();
        };
        run(server.url(), &["CONFIG", "SET", "requirepass", "one"]).await;
        let s = RedisStore::connect(&as_admin("one"), None).await.unwrap();
        let chain = [spec("aa01", None)];
        s.reserve(&chain).await.unwrap();
        run(as_admin("one"), &["CONFIG", "SET", "requirepass", "two"]).await;
        run(as_admin("two"), &["CLIENT", "KILL", "TYPE", "normal"]).await;
        wait_healthy(&s, false).await;
        assert!(s.reserve(&chain).await.is_err());
        run(as_admin("two"), &["CONFIG", "SET", "requirepass", "one"]).await;
        let t0 = Instant::now();
        while s.reserve(&chain).await.is_err() || !s.healthy() {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "still refused with the password right again"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_healthy(s: &RedisStore, want: bool) {
        let t0 = Instant::now();
        while s.healthy() != want {
            assert!(
                t0.elapsed() < EVICTION_CHECK_INTERVAL + Duration::from_secs(2),
                "healthy() did not turn {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Regression (red team, wave 2): a Redis with `maxmemory` and an
    /// evicting policy evicts use counters under memory pressure (which any
    /// token holder can cause), giving spent uses back. Such a server is
    /// refused at start, and one switched to evicting while the proxy runs
    /// makes it refuse every request (503) until it stops. A limit with
    /// `noeviction`, or a policy without a limit, is fine.
    #[tokio::test]
    async fn a_redis_that_may_evict_keys_is_refused() {
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        assert_eq!(s.check_eviction().await.unwrap(), None);
        config_set(&server, "maxmemory-policy", "allkeys-lru").await;
        assert_eq!(s.check_eviction().await.unwrap(), None, "no maxmemory");
        config_set(&server, "maxmemory-policy", "noeviction").await;
        config_set(&server, "maxmemory", "100mb").await;
        assert_eq!(s.check_eviction().await.unwrap(), None, "noeviction");
        s.reserve(&[spec("a", Some(5))]).await.unwrap();

        for policy in ["volatile-lru", "allkeys-lfu", "volatile-ttl"] {
            config_set(&server, "maxmemory-policy", policy).await;
            let e = s.check_eviction().await.unwrap_err().to_string();
            assert!(e.contains(&format!("maxmemory-policy {policy}")), "{e}");
            assert!(e.contains("set `maxmemory-policy noeviction`"), "{e}");
        }
        // While it runs: refused within the check interval...
        wait_healthy(&s, false).await;
        let Err(e) = s.reserve(&[spec("a", Some(5))]).await else {
            panic!("reserved on an evicting Redis")
        };
        assert!(
            matches!(&e, StoreError::Io(m) if m.contains("evict")),
            "{e}"
        );
        assert!(s.first_revoked(&["a".into()]).is_err());
        assert_eq!(s.peek(&["a".into()]).await.unwrap(), vec![1]);
        // ...and serving again once Redis no longer evicts.
        config_set(&server, "maxmemory-policy", "noeviction").await;
        wait_healthy(&s, true).await;
        assert_eq!(
            s.reserve(&[spec("a", Some(5))]).await.unwrap().uses,
            vec![2]
        );
        assert_eq!(s.first_revoked(&["a".into()]).unwrap(), None);
    }

    /// Regression (red team, wave 2): two deployments on two databases of
    /// one Redis shared the revocation channel (pub/sub ignores the
    /// database), so one applied the other's revocations, wrote them into
    /// its own list and signed them in its feed. Each database now has its
    /// own channel; a revocation stays in its deployment.
    #[tokio::test]
    async fn deployments_on_two_databases_of_one_redis_keep_their_revocations_apart() {
        let server = Server::start();
        let db1 = format!("redis://127.0.0.1:{}/1", server.port);
        let a = RedisStore::connect(&server.url(), None).await.unwrap();
        let a2 = RedisStore::connect(&server.url(), None).await.unwrap();
        let b = RedisStore::connect(&db1, None).await.unwrap();
        let b2 = RedisStore::connect(&db1, None).await.unwrap();
        assert!(b.revoke("b0b0").await.unwrap());
        assert!(a.revoke("a0a0").await.unwrap());
        let ids = ["a0a0".to_string(), "b0b0".to_string()];
        // Each deployment's other replica learns its own revocation...
        let t0 = Instant::now();
        while a2.first_revoked(&ids).unwrap() != Some(0)
            || b2.first_revoked(&ids[1..]).unwrap() != Some(0)
        {
            assert!(t0.elapsed() < STALE_BOUND, "not propagated in time");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // ...and, after several version checks, nothing of the other's.
        tokio::time::sleep(POLL_INTERVAL * 4).await;
        for (s, own) in [(&a, "a0a0"), (&a2, "a0a0"), (&b, "b0b0"), (&b2, "b0b0")] {
            assert_eq!(RevocationList::len(s), 1, "{own}'s deployment");
            let listed = RevocationList::list(s).await.unwrap();
            assert_eq!(listed.len(), 1, "{listed:?}");
            assert_eq!(listed[0].0, own);
            assert!(s.healthy());
        }
        assert_eq!(a.first_revoked(&ids[1..]).unwrap(), None);
        assert_eq!(b.first_revoked(&ids[..1]).unwrap(), None);
    }

    /// Idempotency claims in Redis keep the in-process semantics, and two
    /// proxies on one Redis see one claim.
    #[tokio::test]
    async fn idempotency_claims_in_redis_keep_the_semantics_across_stores() {
        use crate::proxy::idempotency::{Claim, Idempotency, conformance};
        let server = Server::start();
        let a = RedisStore::connect(&server.url(), None).await.unwrap();
        let b = RedisStore::connect(&server.url(), None).await.unwrap();
        let window = Duration::from_secs(60);
        let ia = Idempotency::for_store(&a, window);
        let ib = Idempotency::for_store(&b, window);
        conformance::all(&ia).await;
        let k = "fam\nlast\nacross";
        let Claim::Fresh(mut t) = ia.claim(k, conformance::A).await.unwrap() else {
            panic!("fresh on a")
        };
        assert!(matches!(
            ib.claim(k, conformance::A).await.unwrap(),
            Claim::Conflict
        ));
        t.started(Some(vec![4, 2]));
        t.finish(false).await;
        assert!(matches!(
            ib.claim(k, conformance::B).await.unwrap(),
            Claim::Mismatch
        ));
        let Claim::Replay(uses, _) = ib.claim(k, conformance::A).await.unwrap() else {
            panic!("free retry on b")
        };
        assert_eq!(uses, vec![4, 2]);
    }

    /// A request that gives up while its `Idempotency-Key` claim is out
    /// (Redis slow, here paused) leaves the key free: its retry is not
    /// refused 409 for the rest of the window.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idempotency_claim_abandoned_while_out_leaves_the_key_free() {
        use crate::proxy::idempotency::{Claim, Idempotency, conformance};
        let server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        let i = Idempotency::for_store(&s, Duration::from_secs(600));
        // Another key first: the claim script is then loaded in Redis, as
        // on any proxy that has served a claim.
        let Claim::Fresh(t) = i.claim("fam\nlast\nother", conformance::A).await.unwrap() else {
            panic!("fresh")
        };
        t.finish(true).await;
        server.pause_writes().await;
        let k = "fam\nlast\nabandoned";
        let gave_up = {
            let i = i.clone();
            tokio::spawn(async move { i.claim(k, conformance::A).await.map(|_| ()) })
        };
        give_up_while_paused(gave_up).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match i.claim(k, conformance::A).await.unwrap() {
                Claim::Fresh(_) => break,
                Claim::Conflict if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => panic!("the abandoned claim left the key in flight"),
            }
        }
    }

    #[tokio::test]
    async fn an_alert_key_is_claimed_once_across_stores() {
        let server = Server::start();
        let a = RedisStore::connect(&server.url(), None).await.unwrap();
        let b = RedisStore::connect(&server.url(), None).await.unwrap();
        let (ca, cb) = (a.alert_claims().unwrap(), b.alert_claims().unwrap());
        let ttl = Duration::from_secs(60);
        assert!(ca.claim("revoked:x", ttl).await.unwrap());
        assert!(!cb.claim("revoked:x", ttl).await.unwrap());
        assert!(cb.claim("revoked:y", ttl).await.unwrap());
    }

    /// Redis gone: the local revocation list can no longer be confirmed,
    /// and after the bound every check and reservation fails (503).
    #[tokio::test]
    async fn an_unconfirmed_revocation_list_fails_closed() {
        let mut server = Server::start();
        let s = RedisStore::connect(&server.url(), None).await.unwrap();
        assert!(s.healthy());
        server.kill9();
        let t0 = Instant::now();
        while s.first_revoked(&["a".into()]).is_ok() {
            assert!(
                t0.elapsed() < STALE_BOUND + OP_TIMEOUT + POLL_INTERVAL * 2,
                "still answering from an unconfirmed list"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!s.healthy());
        assert!(s.reserve(&[spec("a", None)]).await.is_err());
        assert!(s.peek(&["a".into()]).await.is_err());
    }
}
