//! Root key rotation: more than one root key, each with an id.
//!
//! A token names the key it was issued under in Biscuit's `root_key_id`
//! (absent for key 0, so tokens issued before rotation existed, and those
//! of a home that never rotated, are unchanged). Verifiers hold a
//! [`PublicKeySet`]: the key a token names must be in it and not retired.
//! `root_key_id` is not covered by any signature, so it only chooses which
//! key the signatures are checked with; changing it can only make a token
//! fail.
//!
//! On disk, under the state directory: `root.key` is key 0, as it always
//! was; `keys/<id>.key` are the keys made by `till keygen --rotate`; and
//! `keys/index.json` lists every key with its state ([`KeyRecord`]) and
//! which one is active (issues tokens, signs the feed). A home with only
//! `root.key` is a set of one key, 0, active.
//!
//! The set is published as a [`KeysDocument`] (`till pubkey --json`,
//! `GET /.well-known/till-keys`, and inside the revocation feed) signed by
//! every key that still verifies, so a verifier that trusts any one of them
//! can learn the others, and follow a rotation without being given the new
//! key by hand.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use biscuit_auth::{Biscuit, KeyPair, PublicKey};
use ed25519_dalek::Signer as _;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{RawToken, TokenError, format_unix, keys};
use crate::files;

/// Directory of rotated keys and their index, inside the state directory.
pub const KEYS_DIR: &str = "keys";
/// The index of the key set, inside [`KEYS_DIR`].
pub const INDEX_FILE: &str = "index.json";

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One root key of the set, as the index and the published document hold
/// it. No secret here.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    pub id: u32,
    /// `ed25519/<hex>`.
    pub public_key: String,
    /// When the key was made (seconds since the Unix epoch; 0 if unknown).
    pub created: u64,
    /// The key stops verifying after this instant (`till key retire ID --after`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
    /// When the key was retired (`till key retire ID`): it verifies nothing since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<u64>,
}

impl KeyRecord {
    /// Whether tokens of this key are refused at `now`.
    pub fn retired(&self, now: u64) -> bool {
        self.retired_at.is_some() || self.not_after.is_some_and(|t| now > t)
    }

    /// When it was (or will be) retired, for messages.
    fn retired_since(&self) -> Option<u64> {
        self.retired_at.or(self.not_after)
    }

    /// `active`, `verifying` or `retired`.
    pub fn status(&self, active: u32, now: u64) -> &'static str {
        if self.retired(now) {
            "retired"
        } else if self.id == active {
            "active"
        } else {
            "verifying"
        }
    }
}

/// `keys/index.json`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Index {
    active: u32,
    keys: Vec<KeyRecord>,
}

/// Everything that can go wrong reading or following a published key set.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeysError {
    #[error("key set document is not valid JSON: {0}")]
    Json(String),
    #[error("key set document is invalid: {0}")]
    Invalid(String),
    #[error(
        "key set document is not signed by any root key this verifier trusts (forged, from another installation, or every key you trust was retired: pin a current key with --public-key ID=KEY from `till pubkey --all`)"
    )]
    Untrusted,
    #[error(
        "key set document gives key {id} a different public key than the one trusted here; refusing it (is it from another installation?)"
    )]
    Conflict { id: u32 },
    #[error(
        "key set document is stale: issued {age} s ago, more than the allowed {max} s; fetch a fresh one from the proxy's /.well-known/till-keys"
    )]
    Stale { age: u64, max: u64 },
}

/// The public keys a verifier accepts, by id, with their retirement.
///
/// Keys without an id ([`PublicKeySet::single`], a bare `--public-key`)
/// check any token whose id is not otherwise known: that is how a single
/// pinned key always behaved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublicKeySet {
    by_id: BTreeMap<u32, KeyRecord>,
    any: Vec<PublicKey>,
}

impl PublicKeySet {
    /// One key, checking every token whatever key id it names.
    pub fn single(key: PublicKey) -> Self {
        PublicKeySet {
            by_id: BTreeMap::new(),
            any: vec![key],
        }
    }

    /// The keys of `records` (retired ones included, so their tokens get a
    /// clear refusal rather than "unknown key").
    pub fn from_records(records: &[KeyRecord]) -> Result<Self, TokenError> {
        let mut s = PublicKeySet::default();
        for r in records {
            keys::parse_public(&r.public_key)?;
            if s.by_id.insert(r.id, r.clone()).is_some() {
                return Err(TokenError::Key(format!(
                    "key id {} appears twice in the key set",
                    r.id
                )));
            }
        }
        Ok(s)
    }

    /// Adds a key given as `ID=ed25519/<hex>` (as `till pubkey --all`
    /// prints) or a bare `ed25519/<hex>`, which checks any key id.
    pub fn add_flag(&mut self, s: &str) -> Result<(), TokenError> {
        let s = s.trim();
        match s.split_once('=') {
            Some((id, key)) => {
                let id: u32 = id.trim().parse().map_err(|_| {
                    TokenError::Key(format!(
                        "invalid public key {s:?}: expected ID=ed25519/<hex> (as printed by `till pubkey --all`) or ed25519/<hex>"
                    ))
                })?;
                let pk = keys::parse_public(key)?;
                let rec = KeyRecord {
                    id,
                    public_key: keys::public_string(&pk),
                    created: 0,
                    not_after: None,
                    retired_at: None,
                };
                if self.by_id.insert(id, rec).is_some() {
                    return Err(TokenError::Key(format!("key id {id} given twice")));
                }
            }
            None => self.any.push(keys::parse_public(s)?),
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty() && self.any.is_empty()
    }

    /// The keys that may check something signed under `id` (a token's or
    /// the feed's; none means key 0), or why nothing may.
    fn candidates(&self, id: Option<u32>, now: u64) -> Result<Vec<PublicKey>, Refusal> {
        let n = id.unwrap_or(0);
        match self.by_id.get(&n) {
            Some(r) => {
                let pk = keys::parse_public(&r.public_key).map_err(|_| Refusal::Unknown(n))?;
                if r.retired(now) {
                    Err(Refusal::Retired {
                        id: n,
                        key: Box::new(pk),
                        since: r.retired_since().unwrap_or(now),
                    })
                } else {
                    Ok(vec![pk])
                }
            }
            None if self.any.is_empty() => Err(Refusal::Unknown(n)),
            None => Ok(self.any.clone()),
        }
    }

    /// Checks a token's signatures with the key it names; returns the
    /// token and that key's `not_after`.
    pub fn verify(&self, raw: &RawToken, now: u64) -> Result<(Biscuit, Option<u64>), TokenError> {
        let id = raw.root_key_id();
        match self.candidates(id, now) {
            Ok(keys) => {
                let mut last = TokenError::WrongRootKey;
                for k in &keys {
                    match raw.verify(k) {
                        Ok(b) => {
                            let not_after =
                                self.by_id.get(&id.unwrap_or(0)).and_then(|r| r.not_after);
                            return Ok((b, not_after));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            Err(Refusal::Unknown(id)) => Err(TokenError::UnknownRootKey(id)),
            // Only a token the retired key really signed is told it was
            // issued under it; anything else is simply not genuine.
            Err(Refusal::Retired { id, key, since }) => match raw.verify(&key) {
                Ok(_) => Err(TokenError::RetiredRootKey {
                    id,
                    since: format_unix(since),
                }),
                Err(e) => Err(e),
            },
        }
    }

    /// Checks an Ed25519 signature over `msg` made by key `id` (none: key 0).
    pub(crate) fn check_signature(
        &self,
        id: Option<u32>,
        msg: &[u8],
        signature_hex: &str,
        now: u64,
    ) -> Result<(), SignatureRefusal> {
        let keys = self.candidates(id, now).map_err(|r| match r {
            Refusal::Unknown(id) => SignatureRefusal::Unknown(id),
            Refusal::Retired { id, .. } => SignatureRefusal::Retired(id),
        })?;
        if keys.iter().any(|k| ed25519_verify(k, msg, signature_hex)) {
            Ok(())
        } else {
            Err(SignatureRefusal::Bad)
        }
    }

    /// Whether `key` (as signer `id`) is trusted here at `now`.
    fn trusts(&self, id: u32, key: &PublicKey, now: u64) -> bool {
        match self.by_id.get(&id) {
            Some(r) => {
                !r.retired(now) && keys::parse_public(&r.public_key).is_ok_and(|k| k == *key)
            }
            None => self.any.contains(key),
        }
    }

    /// The records by id (for listing).
    pub fn records(&self) -> impl Iterator<Item = &KeyRecord> {
        self.by_id.values()
    }
}

enum Refusal {
    Unknown(u32),
    Retired {
        id: u32,
        key: Box<PublicKey>,
        since: u64,
    },
}

/// Why a signature by a key of the set was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SignatureRefusal {
    Unknown(u32),
    Retired(u32),
    Bad,
}

fn ed25519_verify(key: &PublicKey, msg: &[u8], signature_hex: &str) -> bool {
    let Ok(pk) = <[u8; 32]>::try_from(key.to_bytes().as_slice()) else {
        return false;
    };
    let Ok(vk) = ed25519_dalek::VerifyingKey::from_bytes(&pk) else {
        return false;
    };
    let Some(sig) = hex::decode(signature_hex)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
    else {
        return false;
    };
    vk.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&sig))
        .is_ok()
}

/// Signs `msg` with an Ed25519 root key; hex signature.
pub(crate) fn ed25519_sign(key: &KeyPair, msg: &[u8]) -> Option<String> {
    let secret: [u8; 32] = key.private().to_bytes().as_slice().try_into().ok()?;
    let sk = ed25519_dalek::SigningKey::from_bytes(&secret);
    Some(hex::encode(sk.sign(msg).to_bytes()))
}

/// Which key set a [`crate::verify::Verifier`] checked a token with: a
/// cached verification is reused only while the set is the same one and
/// the key has not passed its `not_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyStamp {
    generation: u64,
    not_after: Option<u64>,
}

struct Loaded {
    set: PublicKeySet,
    generation: u64,
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// A [`PublicKeySet`] shared by every clone of a verifier and replaced whole
/// (a reload after `till keygen --rotate` or `till key retire`): one atomic
/// load per verification.
#[derive(Clone)]
pub struct RootKeys(Arc<ArcSwap<Loaded>>);

impl RootKeys {
    pub fn new(set: PublicKeySet) -> Self {
        RootKeys(Arc::new(ArcSwap::from_pointee(Loaded {
            set,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
        })))
    }

    /// The set in use now.
    pub fn current(&self) -> PublicKeySet {
        self.0.load().set.clone()
    }

    /// Installs `set`; returns whether it differed from the one in use.
    /// Tokens verified under the old set are verified again.
    pub fn replace(&self, set: PublicKeySet) -> bool {
        if self.0.load().set == set {
            return false;
        }
        self.0.store(Arc::new(Loaded {
            set,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
        }));
        true
    }

    pub fn verify(&self, raw: &RawToken) -> Result<(Biscuit, KeyStamp), TokenError> {
        let l = self.0.load();
        let (b, not_after) = l.set.verify(raw, now_unix())?;
        Ok((
            b,
            KeyStamp {
                generation: l.generation,
                not_after,
            },
        ))
    }

    /// Whether a verification stamped `s` still holds.
    pub fn is_current(&self, s: &KeyStamp) -> bool {
        self.0.load().generation == s.generation && s.not_after.is_none_or(|t| now_unix() <= t)
    }
}

/// Most keys a published key set may list: far more than any rotation
/// schedule makes, few enough to bound what following a document costs.
pub const MAX_DOCUMENT_KEYS: usize = 1024;

/// The key set as published (`GET /.well-known/till-keys`, `till pubkey
/// --json`, the feed's `keys`), signed by every key that still verifies.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeysDocument {
    /// When it was signed (seconds since the Unix epoch).
    pub issued_at: u64,
    /// The key new tokens are issued under.
    pub active: u32,
    pub keys: Vec<KeyRecord>,
    pub signatures: Vec<KeySignature>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeySignature {
    pub key_id: u32,
    /// Hex Ed25519 signature of [`KeysDocument::signed_bytes`].
    pub signature: String,
}

impl KeysDocument {
    /// The exact bytes each signature covers.
    pub fn signed_bytes(issued_at: u64, active: u32, keys: &[KeyRecord]) -> Vec<u8> {
        let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |t| t.to_string());
        let mut s = format!("till-keys-v1\n{issued_at}\n{active}\n");
        for k in keys {
            s.push_str(&format!(
                "{} {} {} {} {}\n",
                k.id,
                k.public_key,
                k.created,
                opt(k.not_after),
                opt(k.retired_at)
            ));
        }
        s.into_bytes()
    }

    /// Checks a document with the keys already trusted, and returns the key
    /// set to use from now on: the document's, except that a key `trusted`
    /// holds as retired stays retired (an old document cannot bring a
    /// retired key back).
    pub fn follow(
        &self,
        trusted: &PublicKeySet,
        now: u64,
        max_age: u64,
    ) -> Result<PublicKeySet, KeysError> {
        let invalid = |m: String| KeysError::Invalid(m);
        // Signatures are not covered by what they sign: a document padded
        // with junk ones stays genuine, and each would cost a verification.
        if self.keys.len() > MAX_DOCUMENT_KEYS {
            return Err(invalid(format!(
                "it lists {} keys, more than the {MAX_DOCUMENT_KEYS} a key set may hold",
                self.keys.len()
            )));
        }
        let mut signers = std::collections::BTreeSet::new();
        if let Some(s) = self.signatures.iter().find(|s| !signers.insert(s.key_id)) {
            return Err(invalid(format!("key {} signs it more than once", s.key_id)));
        }
        if let Some(s) = self
            .signatures
            .iter()
            .find(|s| !self.keys.iter().any(|k| k.id == s.key_id))
        {
            return Err(invalid(format!(
                "it is signed by key {}, which it does not list",
                s.key_id
            )));
        }
        let mut set = PublicKeySet::from_records(&self.keys).map_err(|e| invalid(e.to_string()))?;
        if set.by_id.get(&self.active).is_none_or(|r| r.retired(now)) {
            return Err(invalid(format!(
                "its active key {} is not a current key of the set",
                self.active
            )));
        }
        let msg = Self::signed_bytes(self.issued_at, self.active, &self.keys);
        let signed = self.signatures.iter().any(|s| {
            set.by_id.get(&s.key_id).is_some_and(|r| {
                !r.retired(now)
                    && keys::parse_public(&r.public_key).is_ok_and(|k| {
                        trusted.trusts(s.key_id, &k, now) && ed25519_verify(&k, &msg, &s.signature)
                    })
            })
        });
        if !signed {
            return Err(KeysError::Untrusted);
        }
        let age = now.saturating_sub(self.issued_at);
        if age > max_age {
            return Err(KeysError::Stale { age, max: max_age });
        }
        for (id, t) in &trusted.by_id {
            match set.by_id.get_mut(id) {
                Some(r) if r.public_key != t.public_key => {
                    return Err(KeysError::Conflict { id: *id });
                }
                Some(r) => {
                    if t.retired(now) && !r.retired(now) {
                        r.retired_at = Some(t.retired_since().unwrap_or(now));
                    }
                }
                None => {
                    set.by_id.insert(*id, t.clone());
                }
            }
        }
        // A pinned key the document names is now known by its id (and
        // retires with it); one it does not name is still trusted.
        let named: Vec<PublicKey> = set
            .by_id
            .values()
            .filter_map(|r| keys::parse_public(&r.public_key).ok())
            .collect();
        set.any = trusted
            .any
            .iter()
            .filter(|k| !named.contains(k))
            .cloned()
            .collect();
        Ok(set)
    }

    /// Parses a saved document and [`KeysDocument::follow`]s it.
    pub fn follow_text(
        text: &str,
        trusted: &PublicKeySet,
        now: u64,
        max_age: u64,
    ) -> Result<PublicKeySet, KeysError> {
        let doc: KeysDocument =
            serde_json::from_str(text).map_err(|e| KeysError::Json(e.to_string()))?;
        doc.follow(trusted, now, max_age)
    }
}

/// The key set of a state directory, private keys included: what issues
/// tokens, signs the feed, rotates and retires.
pub struct KeySet {
    dir: PathBuf,
    active: u32,
    records: Vec<KeyRecord>,
    /// Private keys of the keys that still verify.
    private: BTreeMap<u32, KeyPair>,
    /// False for a home with only `root.key` (no index yet).
    indexed: bool,
    /// The state directory's lock, held by a set read for a change
    /// ([`KeySet::load_locked`]).
    lock: Option<files::DirLock>,
}

fn index_path(dir: &Path) -> PathBuf {
    dir.join(KEYS_DIR).join(INDEX_FILE)
}

/// Where key `id`'s private key lives: `root.key` for key 0.
pub fn key_file(dir: &Path, id: u32) -> PathBuf {
    if id == 0 {
        dir.join(keys::ROOT_KEY_FILE)
    } else {
        dir.join(KEYS_DIR).join(format!("{id}.key"))
    }
}

impl KeySet {
    /// Whether `dir` has a root key (a `root.key` or a key set index). A
    /// path that cannot be looked at (a `keys/` directory root made and the
    /// proxy's user cannot enter) is an error, not "no key": taking it for
    /// absent made the proxy fall back to `root.key` alone, silently
    /// undoing every retirement.
    pub fn exists(dir: &Path) -> Result<bool, TokenError> {
        Ok(present(dir, &index_path(dir))? || present(dir, &dir.join(keys::ROOT_KEY_FILE))?)
    }

    /// Reads the key set of state directory `dir`.
    pub fn load(dir: &Path) -> Result<KeySet, TokenError> {
        let ipath = index_path(dir);
        let now = now_unix();
        if !present(dir, &ipath)? {
            let kp = keys::load(&dir.join(keys::ROOT_KEY_FILE))?;
            let created = fs::metadata(dir.join(keys::ROOT_KEY_FILE))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            return Ok(KeySet {
                dir: dir.to_path_buf(),
                active: 0,
                records: vec![KeyRecord {
                    id: 0,
                    public_key: keys::public_string(&kp.public()),
                    created,
                    not_after: None,
                    retired_at: None,
                }],
                private: BTreeMap::from([(0, kp)]),
                indexed: false,
                lock: None,
            });
        }
        let bad = |m: String| TokenError::Key(format!("key set index {}: {m}", ipath.display()));
        let text = fs::read_to_string(&ipath).map_err(|e| unreadable(dir, &ipath, &e))?;
        let index: Index = serde_json::from_str(&text).map_err(|e| {
            bad(format!(
                "not a valid key set index ({e}); restore it from a backup"
            ))
        })?;
        PublicKeySet::from_records(&index.keys).map_err(|e| bad(e.to_string()))?;
        match index.keys.iter().find(|r| r.id == index.active) {
            Some(r) if !r.retired(now) => {}
            Some(_) => {
                return Err(bad(format!(
                    "the active key {} is retired; run `till keygen --rotate` to make a new active key",
                    index.active
                )));
            }
            None => {
                return Err(bad(format!(
                    "the active key {} is not in the index",
                    index.active
                )));
            }
        }
        let mut private = BTreeMap::new();
        for r in index.keys.iter().filter(|r| !r.retired(now)) {
            let path = key_file(dir, r.id);
            let kp = keys::load(&path)?;
            if keys::public_string(&kp.public()) != r.public_key {
                return Err(bad(format!(
                    "{} does not hold key {}'s private key (its public key differs from the index)",
                    path.display(),
                    r.id
                )));
            }
            private.insert(r.id, kp);
        }
        Ok(KeySet {
            dir: dir.to_path_buf(),
            active: index.active,
            records: index.keys,
            private,
            indexed: true,
            lock: None,
        })
    }

    /// [`KeySet::load`] for a change: holds the state directory's lock
    /// until the returned set is dropped, so that whatever the caller
    /// writes along with the change (the admin token after a rotation) is
    /// part of it, and no other `till keygen --rotate` or `till key retire`
    /// runs meanwhile.
    pub fn load_locked(dir: &Path) -> Result<KeySet, TokenError> {
        let lock = lock(dir)?;
        let mut ks = Self::load(dir)?;
        ks.lock = Some(lock);
        Ok(ks)
    }

    /// Replaces this set with the one on disk, read under the lock: a
    /// change applies to the set as it is now, not as it was when this one
    /// was read (two rotations at once both made key 1, and one's private
    /// key was lost; a retirement racing a rotation was undone).
    fn reread(&mut self) -> Result<(), TokenError> {
        let fresh = Self::load(&self.dir)?;
        self.active = fresh.active;
        self.records = fresh.records;
        self.private = fresh.private;
        self.indexed = fresh.indexed;
        Ok(())
    }

    /// The lock a change is made under: the one this set holds, else a
    /// fresh one held until the change is written.
    fn lock_for_change(&self) -> Result<Option<files::DirLock>, TokenError> {
        match self.lock {
            Some(_) => Ok(None),
            None => lock(&self.dir).map(Some),
        }
    }

    /// The state directory this set was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn active_id(&self) -> u32 {
        self.active
    }

    /// The active key: new tokens and the feed are signed with it.
    pub fn active_key(&self) -> &KeyPair {
        // `load` and `rotate` make sure the active key's private key is here.
        &self.private[&self.active]
    }

    /// The `root_key_id` tokens of the active key carry: none for key 0,
    /// so those tokens are the same as before rotation existed.
    pub fn active_token_id(&self) -> Option<u32> {
        (self.active != 0).then_some(self.active)
    }

    pub fn records(&self) -> &[KeyRecord] {
        &self.records
    }

    /// The id of the key whose public half is `pk`, if it is in the set.
    pub fn id_of(&self, pk: &PublicKey) -> Option<u32> {
        let s = keys::public_string(pk);
        self.records
            .iter()
            .find(|r| r.public_key == s)
            .map(|r| r.id)
    }

    /// What verifiers need: every key, retired ones included.
    pub fn public(&self) -> PublicKeySet {
        // Validated by `load` and `rotate`.
        PublicKeySet::from_records(&self.records).unwrap_or_default()
    }

    /// The signed, publishable key set at `now`.
    pub fn document(&self, now: u64) -> KeysDocument {
        let msg = KeysDocument::signed_bytes(now, self.active, &self.records);
        let signatures = self
            .records
            .iter()
            .filter(|r| !r.retired(now))
            .filter_map(|r| {
                let sig = ed25519_sign(self.private.get(&r.id)?, &msg)?;
                Some(KeySignature {
                    key_id: r.id,
                    signature: sig,
                })
            })
            .collect();
        KeysDocument {
            issued_at: now,
            active: self.active,
            keys: self.records.clone(),
            signatures,
        }
    }

    /// Makes a new key and makes it the active one; the previous keys keep
    /// verifying. Returns the new id. Made under the state directory's lock,
    /// to the set as it is on disk then.
    pub fn rotate(&mut self) -> Result<u32, TokenError> {
        let _lock = self.lock_for_change()?;
        self.reread()?;
        let now = now_unix();
        let id = self
            .records
            .iter()
            .map(|r| r.id)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| TokenError::Key("no key id left".into()))?;
        if self.records.len() >= MAX_DOCUMENT_KEYS {
            return Err(TokenError::Key(format!(
                "the key set already holds {MAX_DOCUMENT_KEYS} keys, the most a published key set may list"
            )));
        }
        let kp = keys::generate();
        // A file for an id the index does not list can only be left over
        // from a rotation that stopped before writing the index: nothing was
        // ever issued under it, so replacing it loses nothing.
        create_keys_dir(&self.dir)?;
        keys::save(&key_file(&self.dir, id), &kp, true)?;
        let mut records = self.records.clone();
        records.push(KeyRecord {
            id,
            public_key: keys::public_string(&kp.public()),
            created: now,
            not_after: None,
            retired_at: None,
        });
        write_index(&self.dir, id, &records)?;
        self.records = records;
        self.active = id;
        self.private.insert(id, kp);
        self.indexed = true;
        Ok(id)
    }

    /// Retires key `id` now, or (with `at`) from that instant on: its tokens
    /// are refused from then on. Never the active key. Made under the state
    /// directory's lock, to the set as it is on disk then.
    pub fn retire(&mut self, id: u32, at: Option<u64>) -> Result<(), TokenError> {
        let _lock = self.lock_for_change()?;
        self.reread()?;
        let now = now_unix();
        if id == self.active {
            return Err(TokenError::Key(format!(
                "key {id} is the active key and cannot be retired; run `till keygen --rotate` first, then retire {id}"
            )));
        }
        let mut records = self.records.clone();
        let Some(r) = records.iter_mut().find(|r| r.id == id) else {
            let known: Vec<String> = self.records.iter().map(|r| r.id.to_string()).collect();
            return Err(TokenError::Key(format!(
                "there is no root key {id}; the keys are {} (see `till key list`)",
                known.join(", ")
            )));
        };
        if r.retired(now) {
            return Err(TokenError::Key(format!("key {id} is already retired")));
        }
        match at {
            Some(t) if t > now => r.not_after = Some(t),
            _ => r.retired_at = Some(now),
        }
        write_index(&self.dir, self.active, &records)?;
        self.records = records;
        if self.records.iter().any(|r| r.id == id && r.retired(now)) {
            self.private.remove(&id);
        }
        Ok(())
    }
}

/// The proxy's key set, private keys included, replaced whole by a reload:
/// signs the revocation feed and the published key set.
pub struct Signer(ArcSwap<KeySet>);

impl Signer {
    pub fn new(ks: KeySet) -> Self {
        Signer(ArcSwap::from_pointee(ks))
    }

    pub fn current(&self) -> Arc<KeySet> {
        self.0.load_full()
    }

    pub fn replace(&self, ks: KeySet) {
        self.0.store(Arc::new(ks));
    }
}

/// Whether `path` exists; an error (naming the path and what to do) when
/// it cannot be told.
fn present(dir: &Path, path: &Path) -> Result<bool, TokenError> {
    path.try_exists().map_err(|e| unreadable(dir, path, &e))
}

/// "cannot read PATH" (a file of state directory `dir`), with what to do
/// when it is a question of ownership.
fn unreadable(dir: &Path, path: &Path, e: &std::io::Error) -> TokenError {
    TokenError::Key(format!(
        "cannot read {}: {e}{}",
        path.display(),
        keys::access_hint(dir, e)
    ))
}

/// Takes the state directory's lock (see [`KeySet::load_locked`]).
fn lock(dir: &Path) -> Result<files::DirLock, TokenError> {
    files::lock_dir(dir).map_err(|e| {
        TokenError::Key(format!(
            "cannot lock {} to change its key set: {e}{}",
            dir.display(),
            keys::access_hint(dir, &e)
        ))
    })
}

fn create_keys_dir(dir: &Path) -> Result<(), TokenError> {
    let d = dir.join(KEYS_DIR);
    files::create_private_subdir(&d)
        .map_err(|e| TokenError::Key(format!("cannot create {}: {e}", d.display())))
}

fn write_index(dir: &Path, active: u32, records: &[KeyRecord]) -> Result<(), TokenError> {
    let index = Index {
        active,
        keys: records.to_vec(),
    };
    let mut text = serde_json::to_string_pretty(&index)
        .map_err(|e| TokenError::Key(format!("cannot encode the key set index: {e}")))?;
    text.push('\n');
    create_keys_dir(dir)?;
    write_atomic(&index_path(dir), text.as_bytes())
}

/// Writes `bytes` to `path` through a fresh temporary file (mode 0600),
/// fsynced and renamed over it: a crash leaves the old or the new file,
/// never half of one ([`files::write_private`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TokenError> {
    files::write_private(path, bytes, files::Durability::Durable)
        .map_err(|e| TokenError::Key(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{Scope, issue, issue_as};

    fn scope() -> Scope {
        Scope {
            services: vec!["openai".into()],
            ..Scope::default()
        }
    }

    #[test]
    fn a_key_id_names_the_key_and_retirement_refuses_only_genuine_tokens() {
        let dir = tempfile::tempdir().unwrap();
        keys::save(
            &dir.path().join(keys::ROOT_KEY_FILE),
            &keys::generate(),
            false,
        )
        .unwrap();
        let mut ks = KeySet::load(dir.path()).unwrap();
        let old = issue(ks.active_key(), &scope()).unwrap();
        assert_eq!(ks.rotate().unwrap(), 1);
        let new = issue_as(ks.active_key(), ks.active_token_id(), &scope()).unwrap();
        let set = ks.public();
        for t in [&old, &new] {
            set.verify(&RawToken::parse(t).unwrap(), now_unix())
                .unwrap();
        }
        ks.retire(0, None).unwrap();
        let set = KeySet::load(dir.path()).unwrap().public();
        let e = set
            .verify(&RawToken::parse(&old).unwrap(), now_unix())
            .unwrap_err();
        assert!(matches!(e, TokenError::RetiredRootKey { id: 0, .. }), "{e}");
        set.verify(&RawToken::parse(&new).unwrap(), now_unix())
            .unwrap();
        // A token of another installation naming the retired key is not
        // told it was issued under it.
        let stranger = issue(&keys::generate(), &scope()).unwrap();
        let e = set
            .verify(&RawToken::parse(&stranger).unwrap(), now_unix())
            .unwrap_err();
        assert!(matches!(e, TokenError::WrongRootKey), "{e}");
        let unknown = issue_as(&keys::generate(), Some(7), &scope()).unwrap();
        let e = set
            .verify(&RawToken::parse(&unknown).unwrap(), now_unix())
            .unwrap_err();
        assert!(matches!(e, TokenError::UnknownRootKey(7)), "{e}");
    }

    #[test]
    fn a_document_is_followed_only_from_a_trusted_key_and_never_revives_a_retired_one() {
        let dir = tempfile::tempdir().unwrap();
        keys::save(
            &dir.path().join(keys::ROOT_KEY_FILE),
            &keys::generate(),
            false,
        )
        .unwrap();
        let mut ks = KeySet::load(dir.path()).unwrap();
        let pinned = PublicKeySet::single(ks.active_key().public());
        let before = ks.document(now_unix());
        ks.rotate().unwrap();
        let doc = ks.document(now_unix());
        let followed = doc.follow(&pinned, now_unix(), 60).unwrap();
        assert_eq!(followed.records().count(), 2);
        // Tampering breaks every signature.
        let mut forged = doc.clone();
        forged.keys[1].public_key = keys::public_string(&keys::generate().public());
        assert_eq!(
            forged.follow(&pinned, now_unix(), 60),
            Err(KeysError::Untrusted)
        );
        // A stranger's document.
        let other = PublicKeySet::single(keys::generate().public());
        assert_eq!(
            doc.follow(&other, now_unix(), 60),
            Err(KeysError::Untrusted)
        );
        // Retire 0: the followed set keeps it retired even if an older
        // document (still listing it as current) is replayed.
        ks.retire(0, None).unwrap();
        let after = ks
            .document(now_unix())
            .follow(&followed, now_unix(), 60)
            .unwrap();
        let replay = before.follow(&after, now_unix(), 60);
        assert!(
            replay.is_err()
                || replay
                    .unwrap()
                    .records()
                    .all(|r| r.id != 0 || r.retired(now_unix())),
        );
        assert!(after.records().any(|r| r.id == 0 && r.retired(now_unix())));
        // Stale.
        assert!(matches!(
            doc.follow(&pinned, now_unix() + 3600, 60),
            Err(KeysError::Stale { .. })
        ));
    }

    /// Regression (red team, wave 2, fourth pass): signatures are not
    /// covered by what they sign, so a genuine document padded with 200,000
    /// junk signatures by a trusted key id stayed valid and cost 3 s of CPU
    /// to follow (every refresh of `till-tower`, on an async worker).
    #[test]
    fn regression_a_document_padded_with_signatures_or_keys_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        keys::save(
            &dir.path().join(keys::ROOT_KEY_FILE),
            &keys::generate(),
            false,
        )
        .unwrap();
        let mut ks = KeySet::load(dir.path()).unwrap();
        let pinned = PublicKeySet::single(ks.active_key().public());
        ks.rotate().unwrap();
        let doc = ks.document(now_unix());
        doc.follow(&pinned, now_unix(), 60).unwrap();
        let junk = |key_id| KeySignature {
            key_id,
            signature: "00".repeat(64),
        };
        let mut padded = doc.clone();
        padded.signatures.insert(0, junk(0));
        let e = padded.follow(&pinned, now_unix(), 60).unwrap_err();
        assert!(e.to_string().contains("more than once"), "{e}");
        let mut padded = doc.clone();
        padded.signatures.insert(0, junk(7));
        let e = padded.follow(&pinned, now_unix(), 60).unwrap_err();
        assert!(e.to_string().contains("does not list"), "{e}");
        let mut padded = doc.clone();
        let extra = padded.keys[0].clone();
        for id in 2..=MAX_DOCUMENT_KEYS as u32 {
            padded.keys.push(KeyRecord {
                id,
                ..extra.clone()
            });
        }
        let e = padded.follow(&pinned, now_unix(), 60).unwrap_err();
        assert!(e.to_string().contains("more than the 1024"), "{e}");
    }
}
