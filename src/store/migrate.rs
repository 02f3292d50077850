//! Moving state between stores (`till store export` / `till store import`):
//! counts, block metadata, retired ids and revocations, as one JSON file.
//!
//! Import never lowers anything: a counter ends at the larger of the
//! file's count and the target's, metadata already in the target is kept,
//! and retired ids and revocations are only added. So importing a file
//! twice, importing an old file, or importing into a store that kept
//! counting after the export can never give a token back a use.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::BlockMeta;

/// Why a file cannot be imported.
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("not a till store export ({0}); give the file `till store export` wrote")]
    NotAnExport(String),
    #[error(
        "this export has format version {0}, this till reads version {VERSION}; import it with the till that wrote it, or a newer one"
    )]
    Version(u32),
}

/// `format` of an export file.
pub const FORMAT: &str = "till-store-export";
/// `version` of the export format this build writes and reads.
pub const VERSION: u32 = 1;

/// Everything a store holds that decides requests, as exported.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub format: String,
    pub version: u32,
    /// Unix seconds.
    pub exported_at: u64,
    pub counters: Vec<ExportedCounter>,
    pub retired: Vec<ExportedRetired>,
    pub revocations: Vec<ExportedRevocation>,
}

/// One block's counter.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExportedCounter {
    /// Hex revocation id of the block.
    pub id: String,
    /// Uses counted (for a store that crashed, at least the uses granted).
    pub uses: u64,
    /// Unix seconds after which the block's token cannot be valid.
    pub expires: Option<u64>,
    /// What the usage view knows about the block (its family, parent,
    /// label, own limit), when the store recorded it.
    pub meta: Option<BlockMeta>,
}

/// A block whose counter was retired after its token expired: refused for
/// good.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExportedRetired {
    pub id: String,
    /// The block's token family, when the store knows it (an embedded
    /// store retires a block without its family only when it never
    /// recorded the block's metadata, or retired it before it kept families
    /// of retired blocks).
    pub family: Option<String>,
    /// Unix seconds of the retirement (of the export, when unknown).
    pub at: u64,
}

/// A revoked block id.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExportedRevocation {
    pub id: String,
    /// Unix seconds of the revocation.
    pub at: u64,
}

/// What an import changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Counters set to the file's count (new, or lower in the target).
    pub raised: usize,
    /// Counters the target already had at or above the file's count.
    pub kept: usize,
    /// Block metadata records added.
    pub blocks: usize,
    /// Retired ids in the file (all are in the target now).
    pub retired: usize,
    /// Revocations the target did not have.
    pub revoked: usize,
}

impl Snapshot {
    /// An empty snapshot taken now.
    pub fn new() -> Self {
        Snapshot {
            format: FORMAT.into(),
            version: VERSION,
            exported_at: super::now_unix(),
            counters: Vec::new(),
            retired: Vec::new(),
            revocations: Vec::new(),
        }
    }

    /// Reads an export file's text, refusing anything this build did not
    /// write or a record that could not have come from a store.
    pub fn parse(text: &str) -> Result<Self, SnapshotError> {
        let bad = SnapshotError::NotAnExport;
        let s: Snapshot = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if s.format != FORMAT {
            return Err(bad(format!(
                "format is {:?}, expected {FORMAT:?}",
                s.format
            )));
        }
        if s.version != VERSION {
            return Err(SnapshotError::Version(s.version));
        }
        let ids = s
            .counters
            .iter()
            .map(|c| &c.id)
            .chain(s.retired.iter().map(|r| &r.id))
            .chain(s.revocations.iter().map(|r| &r.id));
        for id in ids {
            if !is_id(id) {
                return Err(bad(format!(
                    "{:?} is not a block id (lower-case hex)",
                    id.chars().take(80).collect::<String>()
                )));
            }
        }
        for c in &s.counters {
            if let Some(m) = &c.meta
                && (m.id != c.id || !is_id(&m.family))
            {
                return Err(bad(format!(
                    "the metadata of block {} is inconsistent",
                    c.id
                )));
            }
        }
        Ok(s)
    }
}

impl Default for Snapshot {
    fn default() -> Self {
        Self::new()
    }
}

/// Block ids are hex revocation ids; anything else (a path, a key pattern,
/// a huge string) has no business in a store.
fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 1024
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_round_trips_and_foreign_files_are_refused() {
        let mut s = Snapshot::new();
        s.counters.push(ExportedCounter {
            id: "ab12".into(),
            uses: 3,
            expires: None,
            meta: None,
        });
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(Snapshot::parse(&text).unwrap(), s);
        let other = text.replace(FORMAT, "something-else");
        assert!(Snapshot::parse(&other).is_err());
        let newer = text.replace("\"version\":1", "\"version\":2");
        assert!(
            Snapshot::parse(&newer)
                .unwrap_err()
                .to_string()
                .contains("version 2")
        );
        let hostile = text.replace("ab12", "till:{x}:n");
        assert!(Snapshot::parse(&hostile).is_err());
    }
}
