//! The signed revocation feed, for services that verify tokens offline.
//!
//! The proxy publishes its revocation list at `GET /revocations` as JSON
//! signed with the root key (Ed25519, via `ed25519-dalek`): services already
//! trust the root public key, so they can check that a list is genuine, and
//! its `version` (the number of ids; the list only grows) and `issued_at`
//! tell them whether it is stale. `till verify --revocations FILE` accepts
//! only this feed, within `--max-feed-age`; a plain list of ids, which
//! nothing authenticates, goes through its own flag, `--revoked-ids`.
//!
//! After a root key rotation the feed is signed by the active key, named by
//! `key_id`, and carries the key set ([`KeysDocument`], signed on its own by
//! every key that still verifies): [`Feed::verify_with`] follows that set
//! from the keys the verifier trusts, then accepts the feed's signature from
//! any key of it that is not retired.
//!
//! ```
//! use till_core::{Feed, FeedError, PublicKeySet, keys};
//!
//! let root = keys::generate();
//! // The proxy signs its list (here two revoked block ids) at time 1000.
//! let feed = Feed::sign(&root, vec!["bb".into(), "aa".into()], 1000).unwrap();
//! let text = serde_json::to_string(&feed).unwrap();
//!
//! // A service trusting the root public key accepts it within 60 s...
//! let trusted = PublicKeySet::single(root.public());
//! let (got, _keys) = Feed::verify_with(&text, &trusted, 1030, 60).unwrap();
//! assert_eq!(got.ids, ["aa", "bb"]);
//!
//! // ...refuses it once it is older: stale feeds fail closed...
//! let e = Feed::verify_with(&text, &trusted, 1100, 60).unwrap_err();
//! assert!(matches!(e, FeedError::Stale { age: 100, max: 60 }));
//!
//! // ...and refuses one with a revocation removed.
//! let forged = text.replace(r#""aa","#, "").replace(r#""version":2"#, r#""version":1"#);
//! assert_eq!(Feed::verify_with(&forged, &trusted, 1030, 60).unwrap_err(), FeedError::BadSignature);
//! ```

use biscuit_auth::{KeyPair, PublicKey};
use ed25519_dalek::Signer;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::token::keyset::{KeysDocument, KeysError, PublicKeySet, SignatureRefusal};

/// A signed, versioned list of revoked block ids.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Feed {
    /// Number of revoked ids. Revocations are never undone, so a newer list
    /// always has a higher or equal version.
    pub version: u64,
    /// When the proxy signed this list (seconds since the Unix epoch).
    pub issued_at: u64,
    /// Revoked ids, hex, sorted.
    pub ids: Vec<String>,
    /// Hex Ed25519 signature of [`Feed::signed_bytes`] by the root key.
    pub signature: String,
    /// The root key that signed it (the active one); absent for key 0, so
    /// an installation that never rotated serves the feed it always did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<u32>,
    /// The current key set, signed on its own by every key that still
    /// verifies, so a verifier following the feed follows rotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<KeysDocument>,
}

/// Why a feed was refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FeedError {
    #[error("revocation feed is not valid JSON: {0}")]
    Json(String),
    #[error(
        "revocation feed signature does not verify with this root public key (forged, altered, or from another installation)"
    )]
    BadSignature,
    #[error(
        "revocation feed is stale: issued {age} s ago, more than the allowed {max} s; fetch a fresh one from the proxy's /revocations"
    )]
    Stale { age: u64, max: u64 },
    #[error("revocation feed is inconsistent: version {version} but {ids} ids")]
    Inconsistent { version: u64, ids: usize },
    #[error("the root key is not an Ed25519 key")]
    Key,
    #[error(
        "revocation feed is signed by root key {0}, which this verifier does not know: give it the current key set (`till pubkey --all`, or the proxy's /.well-known/till-keys)"
    )]
    UnknownKey(u32),
    #[error(
        "revocation feed is signed by root key {0}, which is retired; fetch a fresh feed from the proxy's /revocations"
    )]
    RetiredKey(u32),
    #[error("revocation feed: {0}")]
    Keys(#[from] KeysError),
}

impl Feed {
    /// The exact bytes the signature covers.
    pub fn signed_bytes(version: u64, issued_at: u64, ids: &[String]) -> Vec<u8> {
        let mut s = format!("till-revocations-v1\n{version}\n{issued_at}\n");
        for id in ids {
            s.push_str(id);
            s.push('\n');
        }
        s.into_bytes()
    }

    /// Signs `ids` with the root key.
    pub fn sign(root: &KeyPair, mut ids: Vec<String>, issued_at: u64) -> Result<Feed, FeedError> {
        ids.sort();
        ids.dedup();
        let secret: [u8; 32] = root
            .private()
            .to_bytes()
            .as_slice()
            .try_into()
            .map_err(|_| FeedError::Key)?;
        let key = ed25519_dalek::SigningKey::from_bytes(&secret);
        let version = ids.len() as u64;
        let sig = key.sign(&Self::signed_bytes(version, issued_at, &ids));
        Ok(Feed {
            version,
            issued_at,
            ids,
            signature: hex::encode(sig.to_bytes()),
            key_id: None,
            keys: None,
        })
    }

    /// Signs `ids` with root key `key_id` (none: key 0), publishing the key
    /// set `keys` along.
    pub fn sign_with(
        root: &KeyPair,
        key_id: Option<u32>,
        ids: Vec<String>,
        issued_at: u64,
        keys: Option<KeysDocument>,
    ) -> Result<Feed, FeedError> {
        let mut f = Self::sign(root, ids, issued_at)?;
        f.key_id = key_id;
        f.keys = keys;
        Ok(f)
    }

    /// Parses and verifies a feed with a set of root keys: the key set it
    /// carries is followed first ([`KeysDocument::follow`]), then the feed's
    /// signature must be by a key of that set that is not retired. Returns
    /// the feed and the key set to use from now on.
    pub fn verify_with(
        text: &str,
        trusted: &PublicKeySet,
        now: u64,
        max_age: u64,
    ) -> Result<(Feed, PublicKeySet), FeedError> {
        let feed: Feed = serde_json::from_str(text).map_err(|e| FeedError::Json(e.to_string()))?;
        let set = match &feed.keys {
            Some(doc) => doc.follow(trusted, now, max_age)?,
            None => trusted.clone(),
        };
        let msg = Self::signed_bytes(feed.version, feed.issued_at, &feed.ids);
        set.check_signature(feed.key_id, &msg, &feed.signature, now)
            .map_err(|r| match r {
                SignatureRefusal::Unknown(id) => FeedError::UnknownKey(id),
                SignatureRefusal::Retired(id) => FeedError::RetiredKey(id),
                SignatureRefusal::Bad => FeedError::BadSignature,
            })?;
        if feed.version != feed.ids.len() as u64 {
            return Err(FeedError::Inconsistent {
                version: feed.version,
                ids: feed.ids.len(),
            });
        }
        let age = now.saturating_sub(feed.issued_at);
        if age > max_age {
            return Err(FeedError::Stale { age, max: max_age });
        }
        Ok((feed, set))
    }

    /// Parses and verifies a feed; refuses one older than `max_age` seconds
    /// at `now`.
    pub fn verify(text: &str, root: &PublicKey, now: u64, max_age: u64) -> Result<Feed, FeedError> {
        let feed: Feed = serde_json::from_str(text).map_err(|e| FeedError::Json(e.to_string()))?;
        let pk: [u8; 32] = root
            .to_bytes()
            .as_slice()
            .try_into()
            .map_err(|_| FeedError::Key)?;
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk).map_err(|_| FeedError::Key)?;
        let sig_bytes: [u8; 64] = hex::decode(&feed.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(FeedError::BadSignature)?;
        let sig = ed25519_dalek::Signature::from_bytes(&sig_bytes);
        vk.verify_strict(
            &Self::signed_bytes(feed.version, feed.issued_at, &feed.ids),
            &sig,
        )
        .map_err(|_| FeedError::BadSignature)?;
        if feed.version != feed.ids.len() as u64 {
            return Err(FeedError::Inconsistent {
                version: feed.version,
                ids: feed.ids.len(),
            });
        }
        let age = now.saturating_sub(feed.issued_at);
        if age > max_age {
            return Err(FeedError::Stale { age, max: max_age });
        }
        Ok(feed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_feed_verifies_and_tampering_is_detected() {
        let root = crate::token::keys::generate();
        let feed = Feed::sign(&root, vec!["bb".into(), "aa".into()], 1000).unwrap();
        assert_eq!(feed.ids, vec!["aa", "bb"]);
        let text = serde_json::to_string(&feed).unwrap();
        assert_eq!(Feed::verify(&text, &root.public(), 1010, 60).unwrap(), feed);
        // Dropping an id (to un-revoke a token) breaks the signature.
        let mut forged = feed.clone();
        forged.ids.pop();
        forged.version = 1;
        let t = serde_json::to_string(&forged).unwrap();
        assert_eq!(
            Feed::verify(&t, &root.public(), 1010, 60),
            Err(FeedError::BadSignature)
        );
        // Another root key.
        let other = crate::token::keys::generate();
        assert_eq!(
            Feed::verify(&text, &other.public(), 1010, 60),
            Err(FeedError::BadSignature)
        );
        // Stale.
        assert!(matches!(
            Feed::verify(&text, &root.public(), 5000, 60),
            Err(FeedError::Stale { .. })
        ));
        assert!(matches!(
            Feed::verify("nope", &root.public(), 0, 60),
            Err(FeedError::Json(_))
        ));
    }
}
