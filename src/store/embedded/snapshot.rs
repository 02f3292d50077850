//! Export and import of the embedded store ([`crate::store::migrate`]).

use std::collections::HashMap;

use redb::{ReadableDatabase, ReadableTable};

use super::{
    BLOCKS, COUNTER, COUNTERS, EmbeddedStore, META, RETIRED, RETIRED_FAMILY, REVOKED,
    add_to_family, io, lock,
};
use crate::store::migrate::{
    ExportedCounter, ExportedRetired, ExportedRevocation, ImportReport, Snapshot,
};
use crate::store::{BlockMeta, StoreError, now_unix};

impl EmbeddedStore {
    /// Everything the store holds, as counted now (after a crash, the
    /// durable marks: at least the uses granted).
    pub fn export(&self) -> Result<Snapshot, StoreError> {
        let mut s = Snapshot::new();
        let queued: HashMap<String, BlockMeta> = {
            let st = lock(&self.shared.state);
            for (i, e) in st.blocks.iter().filter(|(_, e)| e.has(COUNTER)) {
                s.counters.push(ExportedCounter {
                    id: st.blocks.id(i),
                    uses: e.count,
                    expires: (e.expires != 0).then_some(e.expires),
                    meta: None,
                });
            }
            st.pending_meta
                .iter()
                .map(|m| (m.id.clone(), m.clone()))
                .collect()
        };
        let r = self.shared.db.begin_read().map_err(io)?;
        // Metadata lives on disk (or, for the newest blocks, in the
        // writer's queue).
        let blocks = r.open_table(BLOCKS).map_err(io)?;
        for c in &mut s.counters {
            c.meta = match blocks.get(c.id.as_str()).map_err(io)? {
                Some(row) => serde_json::from_str(row.value()).ok(),
                None => None,
            }
            .or_else(|| queued.get(&c.id).cloned());
        }
        let t = r.open_table(RETIRED).map_err(io)?;
        let fams = r.open_table(RETIRED_FAMILY).map_err(io)?;
        for item in t.iter().map_err(io)? {
            let (k, v) = item.map_err(io)?;
            let family = fams
                .get(k.value())
                .map_err(io)?
                .map(|f| f.value().to_string());
            s.retired.push(ExportedRetired {
                id: k.value().to_string(),
                family,
                at: v.value(),
            });
        }
        let t = r.open_table(REVOKED).map_err(io)?;
        for item in t.iter().map_err(io)? {
            let (k, v) = item.map_err(io)?;
            s.revocations.push(ExportedRevocation {
                id: k.value().to_string(),
                at: v.value(),
            });
        }
        s.counters.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(s)
    }

    /// Merges `s` into the store in one transaction: each counter ends at
    /// the larger of the two counts, nothing is removed or lowered. Run it
    /// with no proxy on this store (the file is locked while one runs).
    pub fn import(&self, s: &Snapshot) -> Result<ImportReport, StoreError> {
        let mut report = ImportReport::default();
        let mut values = Vec::with_capacity(s.counters.len());
        let mut new_meta = Vec::new();
        let mut new_revoked = Vec::new();
        let txn = self.shared.db.begin_write().map_err(io)?;
        {
            let mut t = txn.open_table(COUNTERS).map_err(io)?;
            for c in &s.counters {
                let have = t.get(c.id.as_str()).map_err(io)?.map(|v| v.value());
                let expires = c.expires.unwrap_or(0);
                let (value, expires) = match have {
                    None => {
                        report.raised += 1;
                        (c.uses, expires)
                    }
                    Some((v, e)) => {
                        if c.uses > v {
                            report.raised += 1;
                        } else {
                            report.kept += 1;
                        }
                        // 0 means "never expires" and wins over any date.
                        let e = if e == 0 || expires == 0 {
                            0
                        } else {
                            e.max(expires)
                        };
                        (v.max(c.uses), e)
                    }
                };
                t.insert(c.id.as_str(), (value, expires)).map_err(io)?;
                values.push((
                    c.id.clone(),
                    value,
                    expires,
                    c.meta.as_ref().and_then(|m| m.limit),
                ));
            }
            let mut t = txn.open_table(BLOCKS).map_err(io)?;
            for m in s.counters.iter().filter_map(|c| c.meta.as_ref()) {
                if t.get(m.id.as_str()).map_err(io)?.is_none() {
                    let json = serde_json::to_string(m).map_err(io)?;
                    t.insert(m.id.as_str(), json.as_str()).map_err(io)?;
                    new_meta.push(m.clone());
                }
            }
            let mut t = txn.open_table(RETIRED).map_err(io)?;
            for r in &s.retired {
                if t.get(r.id.as_str()).map_err(io)?.is_none() {
                    t.insert(r.id.as_str(), r.at).map_err(io)?;
                }
            }
            let mut t = txn.open_table(RETIRED_FAMILY).map_err(io)?;
            for r in &s.retired {
                if let Some(f) = &r.family {
                    t.insert(r.id.as_str(), f.as_str()).map_err(io)?;
                }
            }
            let mut t = txn.open_table(REVOKED).map_err(io)?;
            for r in &s.revocations {
                let id = r.id.to_ascii_lowercase();
                if t.get(id.as_str()).map_err(io)?.is_none() {
                    t.insert(id.as_str(), r.at.min(now_unix())).map_err(io)?;
                    new_revoked.push(id);
                }
            }
        }
        txn.commit().map_err(io)?;
        report.blocks = new_meta.len();
        report.retired = s.retired.len();
        report.revoked = new_revoked.len();
        // The file is the truth now; bring the in-memory copy level with it.
        let mut guard = lock(&self.shared.state);
        let st = &mut *guard;
        for (id, value, expires, limit) in values {
            let i = st.blocks.find_or_insert(&id);
            let e = st.blocks.slot_mut(i);
            e.flags |= COUNTER;
            e.count = e.count.max(value);
            e.durable = e.durable.max(value);
            if st.asked.get(&i).is_some_and(|a| a.requested <= e.durable) {
                st.asked.remove(&i);
            }
            e.expires = expires;
            if e.limit().is_none() {
                e.set_limit(limit);
            }
        }
        for m in new_meta {
            let i = st.blocks.find_or_insert(&m.id);
            let e = st.blocks.slot_mut(i);
            if !e.has(META) {
                e.flags |= META;
                add_to_family(&mut st.blocks, &m.family);
            }
        }
        st.retired.extend(s.retired.iter().map(|r| r.id.clone()));
        drop(guard);
        self.shared
            .revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(new_revoked);
        Ok(report)
    }
}
