//! Export and import of the Redis store ([`crate::store::migrate`]).

use std::collections::{BTreeMap, HashMap};

use redis::{AsyncCommands, Script};

use super::{
    FAMILIES, REVOKE_LUA, REVOKED_IDS, REVOKED_VERSION, RedisStore, TTL_AFTER_EXPIRY, family_keys,
    parse_meta,
};
use crate::store::migrate::{
    ExportedCounter, ExportedRetired, ExportedRevocation, ImportReport, Snapshot,
};
use crate::store::{StoreError, now_unix};

/// Merges one family: KEYS are its five keys; ARGV the retention after
/// expiry, the number of counters, then per counter id, count, metadata
/// JSON (empty if none) and expiry (0 for none), then retired ids. Counts
/// only go up; the family's deadline is widened as `reserve` does. A
/// retired id stays retired: its counter and metadata are not imported,
/// and the ids the file retires lose theirs, as `retire` does (the reserve
/// script relies on no retired id having metadata).
const IMPORT_LUA: &str = r#"
local grace = tonumber(ARGV[1])
local nc = tonumber(ARGV[2])
local raised, kept, added = 0, 0, 0
local d = tonumber(redis.call('GET', KEYS[4]) or '-1')
for i = 0, nc - 1 do
  local b = 3 + i * 4
  local id, uses, meta, exp = ARGV[b], tonumber(ARGV[b + 1]), ARGV[b + 2], tonumber(ARGV[b + 3])
  local have = tonumber(redis.call('HGET', KEYS[1], id) or '-1')
  if redis.call('SISMEMBER', KEYS[5], id) == 1 then
    kept = kept + 1
  else
    if uses > have then
      redis.call('HSET', KEYS[1], id, ARGV[b + 1])
      raised = raised + 1
    else
      kept = kept + 1
    end
    if meta ~= '' and redis.call('HSETNX', KEYS[2], id, meta) == 1 then added = added + 1 end
  end
  if exp == 0 then d = 0 elseif d ~= 0 then d = math.max(d, exp + grace) end
end
for i = 3 + nc * 4, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
  redis.call('SADD', KEYS[5], ARGV[i])
end
if nc > 0 then
  redis.call('SET', KEYS[4], d)
  for i = 1, 4 do
    if d == 0 then redis.call('PERSIST', KEYS[i]) else redis.call('EXPIREAT', KEYS[i], d) end
  end
end
return {raised, kept, added}
"#;

/// The family of a key `till:{<family>}:<suffix>`.
pub(super) fn family_in(key: &str) -> Option<&str> {
    key.strip_prefix("till:{")?.split_once("}:").map(|(f, _)| f)
}

#[derive(Default)]
struct Family<'a> {
    counters: Vec<&'a ExportedCounter>,
    retired: Vec<&'a str>,
}

impl RedisStore {
    /// Everything the store holds. Proxies may keep running: counts only
    /// grow after the export, and an import takes the larger count.
    pub async fn export(&self) -> Result<Snapshot, StoreError> {
        let inner = &self.inner;
        let mut c = inner.conn();
        let mut s = Snapshot::new();
        // A family counted but not listed would be left out of the file,
        // and importing it elsewhere would give its uses back.
        self.repair_families().await?;
        let families: Vec<String> = inner.op("SMEMBERS", c.smembers(FAMILIES)).await?;
        for f in &families {
            let k = family_keys(f);
            let (counts, metas): (HashMap<String, u64>, HashMap<String, String>) = inner
                .op(
                    "export family",
                    redis::pipe()
                        .atomic()
                        .hgetall(&k[0])
                        .hgetall(&k[1])
                        .query_async(&mut c),
                )
                .await?;
            for (id, uses) in counts {
                let meta = metas.get(&id).and_then(|j| parse_meta(j));
                s.counters.push(ExportedCounter {
                    expires: meta.as_ref().and_then(|m| m.expires),
                    id,
                    uses,
                    meta,
                });
            }
        }
        // Retired sets outlive their family's entry in the family list.
        let mut keys: Vec<String> = Vec::new();
        {
            let mut it: redis::AsyncIter<String> =
                inner.op("SCAN", c.scan_match("till:{*}:x")).await?;
            while let Some(k) = it.next_item().await {
                keys.push(k.map_err(|e| {
                    StoreError::Io(format!("redis at {} failed (SCAN): {e}", inner.target))
                })?);
            }
        }
        for k in keys {
            let Some(f) = family_in(&k) else { continue };
            let ids: Vec<String> = inner.op("SMEMBERS", c.smembers(&k)).await?;
            for id in ids {
                s.retired.push(ExportedRetired {
                    id,
                    family: Some(f.to_string()),
                    at: s.exported_at,
                });
            }
        }
        let revoked: HashMap<String, u64> = inner
            .op("HGETALL revocations", c.hgetall(REVOKED_IDS))
            .await?;
        s.revocations = revoked
            .into_iter()
            .map(|(id, at)| ExportedRevocation { id, at })
            .collect();
        s.counters.sort_by(|a, b| a.id.cmp(&b.id));
        s.retired.sort_by(|a, b| a.id.cmp(&b.id));
        s.revocations.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(s)
    }

    /// Merges `s` into Redis, one script per family: each counter ends at
    /// the larger of the two counts; retired ids and revocations are added
    /// (revocations published, so running proxies apply them at once).
    /// Safe while proxies run.
    pub async fn import(&self, s: &Snapshot) -> Result<ImportReport, StoreError> {
        let inner = &self.inner;
        let mut c = inner.conn();
        let mut report = ImportReport::default();
        let mut families: BTreeMap<&str, Family> = BTreeMap::new();
        for ctr in &s.counters {
            // A block without metadata is counted as its own family, as
            // a store that never saw its token's other blocks would.
            let f = ctr
                .meta
                .as_ref()
                .map_or(ctr.id.as_str(), |m| m.family.as_str());
            families.entry(f).or_default().counters.push(ctr);
        }
        for r in &s.retired {
            // Unknown family (the embedded store forgets it on retirement):
            // right for a token's first block, whose family is itself.
            let f = r.family.as_deref().unwrap_or(r.id.as_str());
            families.entry(f).or_default().retired.push(&r.id);
        }
        let script = Script::new(IMPORT_LUA);
        for (f, fam) in &families {
            let mut inv = script.prepare_invoke();
            for k in family_keys(f) {
                inv.key(k);
            }
            inv.arg(TTL_AFTER_EXPIRY).arg(fam.counters.len());
            for ctr in &fam.counters {
                let meta = match &ctr.meta {
                    Some(m) => {
                        serde_json::to_string(m).map_err(|e| StoreError::Io(e.to_string()))?
                    }
                    None => String::new(),
                };
                inv.arg(&ctr.id)
                    .arg(ctr.uses)
                    .arg(meta)
                    .arg(ctr.expires.unwrap_or(0));
            }
            for id in &fam.retired {
                inv.arg(*id);
            }
            // Listed before its counters are written, as `reserve` does: an
            // import stopped in between leaves no family unlisted.
            if !fam.counters.is_empty() {
                let _: () = inner.op("SADD families", c.sadd(FAMILIES, *f)).await?;
            }
            let (raised, kept, added): (usize, usize, usize) =
                inner.op("import", inv.invoke_async(&mut c)).await?;
            report.raised += raised;
            report.kept += kept;
            report.blocks += added;
            report.retired += fam.retired.len();
        }
        let revoke = Script::new(REVOKE_LUA);
        for r in &s.revocations {
            let v: u64 = inner
                .op(
                    "revoke",
                    revoke
                        .key(REVOKED_IDS)
                        .key(REVOKED_VERSION)
                        .arg(r.id.to_ascii_lowercase())
                        .arg(r.at.min(now_unix()))
                        .arg(&inner.channel)
                        .invoke_async(&mut c),
                )
                .await?;
            if v > 0 {
                report.revoked += 1;
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_family_is_read_from_the_hash_tag() {
        assert_eq!(family_in("till:{ab12}:x"), Some("ab12"));
        assert_eq!(family_in("till:{revocations}:ids"), Some("revocations"));
        assert_eq!(family_in("other"), None);
    }
}
