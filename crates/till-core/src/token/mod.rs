//! Till tokens: issue, attenuate, parse within bounds, and read back.
//!
//! Till tokens are plain Biscuit tokens (biscuit-auth 6, URL-safe base64).
//! [`vocab`] is the one home of the Datalog fact names; [`inspect`] reads a
//! token back without trusting biscuit's own printer.

pub mod inspect;
pub mod keys;
pub mod keyset;
pub mod shape;
pub mod vocab;

use std::time::SystemTime;

use biscuit_auth::format::schema;
use biscuit_auth::{Biscuit, KeyPair, PublicKey, UnverifiedBiscuit};
use prost::Message;
use thiserror::Error;

pub use vocab::{McpMessage, RequestFacts, Scope};

/// Largest accepted token, in base64 characters. Checked before any parsing.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Most blocks (authority included) a token may have. Checked before any
/// signature is verified, since each block costs one signature check.
pub const MAX_BLOCKS: usize = 16;

/// Everything that can go wrong with a token or a key.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("token is not valid URL-safe base64 (is it truncated, or mangled in copying?)")]
    Base64,
    #[error("token is malformed or truncated ({0})")]
    Malformed(String),
    #[error(
        "token signature does not verify with this root public key: it was issued under a different root key, or it was altered"
    )]
    WrongRootKey,
    #[error(
        "token was issued under a retired root key (key {id}, retired {since}): tokens issued under it are no longer accepted; ask for a new token issued under the current key"
    )]
    RetiredRootKey { id: u32, since: String },
    #[error(
        "token was issued under root key {0}, which this verifier does not know: give it the current key set (`till pubkey --all`, or the proxy's /.well-known/till-keys), or ask for a new token"
    )]
    UnknownRootKey(u32),
    #[error("token is {len} bytes, more than the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("token has {n} blocks, more than the limit of {max}")]
    TooManyBlocks { n: usize, max: usize },
    #[error("token uses a {0} key; Till accepts Ed25519 keys only")]
    UnsupportedAlgorithm(&'static str),
    #[error("token is empty")]
    Empty,
    #[error("{0}")]
    Shape(String),
    #[error("invalid scope: {0}")]
    InvalidScope(String),
    #[error("invalid Datalog: {0}")]
    Datalog(String),
    #[error("{0}")]
    Key(String),
    #[error("biscuit error: {0}")]
    Biscuit(String),
}

impl TokenError {
    pub(crate) fn from_biscuit(e: biscuit_auth::error::Token) -> Self {
        use biscuit_auth::error::{Format, Token};
        match e {
            Token::Base64(_) => TokenError::Base64,
            Token::Format(Format::Signature(_)) => TokenError::WrongRootKey,
            Token::Format(f @ Format::InvalidSignatureSize(_)) => {
                TokenError::Malformed(f.to_string())
            }
            Token::Format(f) => TokenError::Malformed(f.to_string()),
            Token::Language(l) => TokenError::Datalog(l.to_string()),
            other => TokenError::Biscuit(other.to_string()),
        }
    }
}

/// A token's bytes, decoded and bounded but not yet signature-checked.
#[derive(Debug, Clone)]
pub struct RawToken {
    bytes: Vec<u8>,
    proto: schema::Biscuit,
}

impl RawToken {
    /// Decodes base64 and the outer envelope, enforcing size, block count and
    /// key algorithm before any cryptography runs.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(TokenError::Empty);
        }
        if text.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge {
                len: text.len(),
                max: MAX_TOKEN_LEN,
            });
        }
        let bytes =
            base64::decode_config(text, base64::URL_SAFE).map_err(|_| TokenError::Base64)?;
        let proto = schema::Biscuit::decode(bytes.as_slice())
            .map_err(|e| TokenError::Malformed(format!("envelope: {e}")))?;
        let n = proto.blocks.len() + 1;
        if n > MAX_BLOCKS {
            return Err(TokenError::TooManyBlocks { n, max: MAX_BLOCKS });
        }
        let ed = schema::public_key::Algorithm::Ed25519 as i32;
        let keys = std::iter::once(&proto.authority)
            .chain(proto.blocks.iter())
            .flat_map(|b| {
                std::iter::once(&b.next_key)
                    .chain(b.external_signature.as_ref().map(|e| &e.public_key))
            });
        for k in keys {
            if k.algorithm != ed {
                return Err(TokenError::UnsupportedAlgorithm("non-Ed25519 (e.g. P-256)"));
            }
        }
        Ok(RawToken { bytes, proto })
    }

    /// Number of blocks, authority included.
    pub fn block_count(&self) -> usize {
        self.proto.blocks.len() + 1
    }

    /// The decoded envelope (for [`inspect`]).
    pub(crate) fn proto(&self) -> &schema::Biscuit {
        &self.proto
    }

    /// The root key id the token names (Biscuit's `root_key_id`; none for
    /// key 0). Not signed: it only chooses the key to check with.
    pub fn root_key_id(&self) -> Option<u32> {
        self.proto.root_key_id
    }

    /// Checks every signature against the root public key.
    pub fn verify(&self, root: &PublicKey) -> Result<Biscuit, TokenError> {
        Biscuit::from(&self.bytes, root).map_err(TokenError::from_biscuit)
    }

    /// Parses without checking signatures: for attenuation and inspection,
    /// which need no key. Never use the result to authorize anything.
    pub fn unverified(&self) -> Result<UnverifiedBiscuit, TokenError> {
        UnverifiedBiscuit::from(&self.bytes).map_err(TokenError::from_biscuit)
    }

    /// Revocation ids of every block, hex, authority first.
    pub fn revocation_ids(&self) -> Vec<String> {
        std::iter::once(&self.proto.authority)
            .chain(self.proto.blocks.iter())
            .map(|b| hex::encode(&b.signature))
            .collect()
    }
}

/// Mints a root token for `scope`, signed by `root`.
///
/// ```
/// use till_core::token::{issue, Scope, RawToken, keys};
/// let root = keys::generate();
/// let scope = Scope { services: vec!["openai".into()], max_uses: Some(10), ..Scope::default() };
/// let token = issue(&root, &scope).unwrap();
/// let raw = RawToken::parse(&token).unwrap();
/// assert!(raw.verify(&root.public()).is_ok());
/// ```
pub fn issue(root: &KeyPair, scope: &Scope) -> Result<String, TokenError> {
    issue_as(root, None, scope)
}

/// Same as [`issue`], naming the root key in the token (`root_key_id`), as
/// a key set after rotation needs ([`keyset`]). `None` for key 0.
pub fn issue_as(
    root: &KeyPair,
    root_key_id: Option<u32>,
    scope: &Scope,
) -> Result<String, TokenError> {
    let block = vocab::authority_block(scope)?;
    let mut builder = Biscuit::builder().merge(block);
    if let Some(id) = root_key_id {
        builder = builder.root_key_id(id);
    }
    let token = builder.build(root).map_err(TokenError::from_biscuit)?;
    refuse_unacceptable(token.to_base64().map_err(TokenError::from_biscuit)?)
}

/// Refuses to hand out a root token the verifier would refuse: its
/// authority block is the operator's, restricted only in that it may not
/// state a request fact (`--datalog 'uses(1, 0)'`), which would satisfy
/// every block's checks on it.
fn refuse_unacceptable(text: String) -> Result<String, TokenError> {
    shape::check(&RawToken::parse(&text)?)?;
    Ok(text)
}

/// Same as [`issue`] with a caller-supplied RNG (seeded golden tokens).
pub fn issue_with_rng<R: rand::RngCore + rand::CryptoRng>(
    root: &KeyPair,
    scope: &Scope,
    rng: &mut R,
) -> Result<String, TokenError> {
    let block = vocab::authority_block(scope)?;
    let token = Biscuit::builder()
        .merge(block)
        .build_with_rng(root, biscuit_auth::datalog::SymbolTable::default(), rng)
        .map_err(TokenError::from_biscuit)?;
    refuse_unacceptable(token.to_base64().map_err(TokenError::from_biscuit)?)
}

/// Appends an attenuation block narrowing `parent` to `scope`. Needs no key
/// and no server: the parent's signatures are not checked here (the verifier
/// will), so an agent can attenuate a token offline.
pub fn attenuate(parent: &str, scope: &Scope) -> Result<String, TokenError> {
    attenuate_inner(parent, scope, None)
}

/// Same as [`attenuate`] with a caller-chosen ephemeral key (golden tokens).
pub fn attenuate_with_key(
    parent: &str,
    scope: &Scope,
    key: &KeyPair,
) -> Result<String, TokenError> {
    attenuate_inner(parent, scope, Some(key))
}

fn attenuate_inner(
    parent: &str,
    scope: &Scope,
    key: Option<&KeyPair>,
) -> Result<String, TokenError> {
    let raw = RawToken::parse(parent)?;
    if raw.block_count() >= MAX_BLOCKS {
        return Err(TokenError::TooManyBlocks {
            n: raw.block_count() + 1,
            max: MAX_BLOCKS,
        });
    }
    let unverified = raw.unverified()?;
    let block = vocab::attenuation_block(scope, raw.block_count())?;
    let child = match key {
        Some(k) => unverified.append_with_keypair(k, block),
        None => unverified.append(block),
    }
    .map_err(|e| match TokenError::from_biscuit(e) {
        // A sealed token has no next key to sign with.
        TokenError::Malformed(m) if m.contains("seal") => {
            TokenError::Malformed("token is sealed and cannot be attenuated".into())
        }
        other => other,
    })?;
    let text = child.to_base64().map_err(TokenError::from_biscuit)?;
    // Refuse to hand out a block the verifier would refuse (e.g. a rule
    // given with --datalog, or an expiry past MAX_TIME).
    let child = RawToken::parse(&text)?;
    shape::check(&child)?;
    inspect::inspect(&child)?;
    Ok(text)
}

/// The latest instant Till reads or writes: 9999-12-31T23:59:59Z. The
/// `time` crate (built without its large-dates feature) cannot represent a
/// later one, and no token needs one; a later expiry is refused rather than
/// guessed at.
pub const MAX_TIME_UNIX: u64 = 253_402_300_799;
/// [`MAX_TIME_UNIX`] as RFC 3339, for error messages.
pub const MAX_TIME: &str = "9999-12-31T23:59:59Z";

/// Parses an RFC 3339 instant between 1970-01-01T00:00:00Z and [`MAX_TIME`].
pub fn parse_time(s: &str) -> Result<SystemTime, TokenError> {
    let t = time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
        TokenError::InvalidScope(format!(
            "{s:?} is not an RFC 3339 time ({e}); example: 2026-12-01T00:00:00Z"
        ))
    })?;
    // A local date of year 9999 with a negative offset is in year 10000 in
    // UTC, and Datalog dates are unsigned seconds since 1970.
    let unix = u64::try_from(t.unix_timestamp())
        .ok()
        .filter(|u| *u <= MAX_TIME_UNIX)
        .ok_or_else(|| {
            TokenError::InvalidScope(format!(
                "{s:?} is outside the times Till handles (1970-01-01T00:00:00Z to {MAX_TIME}); give a time in that range"
            ))
        })?;
    Ok(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(unix))
}

/// Seconds since 1970 of `t`, if it is an instant Till handles (up to
/// [`MAX_TIME_UNIX`]).
pub fn unix_secs(t: SystemTime) -> Option<u64> {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
        .filter(|u| *u <= MAX_TIME_UNIX)
}

/// The expiry of a token that lives `ttl` from `now`; refused past
/// [`MAX_TIME`] (a `--ttl 99999999999d` would otherwise overflow).
pub fn expiry_after(now: SystemTime, ttl: std::time::Duration) -> Result<SystemTime, TokenError> {
    now.checked_add(ttl)
        .filter(|t| unix_secs(*t).is_some())
        .ok_or_else(|| {
            TokenError::InvalidScope(format!(
                "a lifetime of {} s puts the expiry after {MAX_TIME}, the latest time Till handles; give a shorter one",
                ttl.as_secs()
            ))
        })
}

/// Formats an instant as RFC 3339 (UTC, seconds). Never fails: an instant
/// outside what Till handles is described in words.
pub fn format_time(t: SystemTime) -> String {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => format_unix(d.as_secs()),
        Err(_) => "before 1970-01-01T00:00:00Z".into(),
    }
}

/// Formats seconds since 1970 as RFC 3339 (UTC). Never fails: the seconds
/// come from tokens, stores and other processes, and may be anything.
pub fn format_unix(secs: u64) -> String {
    Some(secs)
        .filter(|s| *s <= MAX_TIME_UNIX)
        .and_then(|s| i64::try_from(s).ok())
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|dt| {
            dt.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("after {MAX_TIME}"))
}

/// Parses a duration such as `90s`, `10m`, `24h`, `7d` or `1h30m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, TokenError> {
    let err = || {
        TokenError::InvalidScope(format!(
            "{s:?} is not a duration; use a number with a unit s, m, h or d, e.g. 10m, 24h, 7d, 1h30m"
        ))
    };
    let s = s.trim();
    if s.is_empty() {
        return Err(err());
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
        } else {
            let n: u64 = num.parse().map_err(|_| err())?;
            num.clear();
            let unit = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86400,
                _ => return Err(err()),
            };
            total = n
                .checked_mul(unit)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(err)?;
        }
    }
    if !num.is_empty() || total == 0 {
        return Err(err());
    }
    Ok(std::time::Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `issue` refuses an authority block stating a request fact: every
    /// block's checks see the authority block, so `uses(1, 0)` there
    /// would satisfy every child's use limit.
    #[test]
    fn regression_issue_refuses_a_request_fact() {
        let root = keys::generate();
        let scope = |datalog: &str| Scope {
            services: vec!["openai".into()],
            datalog: Some(datalog.into()),
            ..Scope::default()
        };
        for (code, name) in [("uses(1, 0);", "uses"), ("path(\"/v1/\");", "path")] {
            let e = issue(&root, &scope(code)).unwrap_err();
            assert!(
                matches!(&e, TokenError::Shape(m) if m.contains(&format!("`{name}(...)`"))),
                "{code}: {e:?}"
            );
            let mut rng = rand::rngs::OsRng;
            assert!(issue_with_rng(&root, &scope(code), &mut rng).is_err());
        }
        assert!(issue(&root, &scope("note(\"x\");")).is_ok());
    }

    #[test]
    fn times_out_of_range_are_errors_not_panics() {
        use crate::policy::Policies;
        use crate::verify::Verifier;
        use std::time::Duration;
        assert_eq!(format_unix(MAX_TIME_UNIX), "9999-12-31T23:59:59Z");
        assert_eq!(format_unix(MAX_TIME_UNIX + 1), "after 9999-12-31T23:59:59Z");
        assert_eq!(format_unix(u64::MAX), "after 9999-12-31T23:59:59Z");
        let late = SystemTime::UNIX_EPOCH + Duration::from_secs(MAX_TIME_UNIX + 86_400);
        assert_eq!(format_time(late), "after 9999-12-31T23:59:59Z");
        let early = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(format_time(early), "before 1970-01-01T00:00:00Z");
        // `till issue --ttl 99999999999d`, and a lifetime SystemTime cannot add.
        let now = SystemTime::now();
        for ttl in [99_999_999_999 * 86_400, u64::MAX] {
            let e = expiry_after(now, Duration::from_secs(ttl)).unwrap_err();
            assert!(e.to_string().contains("after 9999-12-31T23:59:59Z"), "{e}");
        }
        assert!(expiry_after(now, Duration::from_secs(60)).is_ok());
        // Issuing with an expiry Datalog cannot hold, or before 1970.
        let root = keys::generate();
        for t in [late, early] {
            let e = issue(
                &root,
                &Scope {
                    services: vec!["openai".into()],
                    expires: Some(t),
                    ..Scope::default()
                },
            )
            .unwrap_err();
            assert!(
                e.to_string().contains("outside the times Till handles"),
                "{e}"
            );
        }
        // A request time before 1970 is refused, not a panic in biscuit-auth.
        let v = Verifier::new(root.public(), Policies::default_policy());
        let openai = Scope {
            services: vec!["openai".into()],
            ..Scope::default()
        };
        let t = v.verify_token(&issue(&root, &openai).unwrap()).unwrap();
        let facts = RequestFacts {
            service: "openai".into(),
            method: "POST".into(),
            path: "/v1/chat".into(),
            model: None,
            mcp: None,
            time: early,
        };
        assert!(v.authorize(&t, &facts, &[1]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("7d").unwrap().as_secs(), 7 * 86400);
        for bad in ["", "10", "10x", "h", "0s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bounds_are_checked_before_crypto() {
        assert!(matches!(RawToken::parse("!!!"), Err(TokenError::Base64)));
        assert!(matches!(RawToken::parse(""), Err(TokenError::Empty)));
        let huge = "A".repeat(MAX_TOKEN_LEN + 1);
        assert!(matches!(
            RawToken::parse(&huge),
            Err(TokenError::TooLarge { .. })
        ));
        assert!(matches!(
            RawToken::parse("AAAA"),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn too_many_blocks_refused() {
        let root = keys::generate();
        let scope = Scope {
            services: vec!["openai".into()],
            ..Scope::default()
        };
        let mut t = issue(&root, &scope).unwrap();
        for _ in 1..MAX_BLOCKS {
            t = attenuate(&t, &Scope::default()).unwrap();
        }
        assert_eq!(RawToken::parse(&t).unwrap().block_count(), MAX_BLOCKS);
        assert!(matches!(
            attenuate(&t, &Scope::default()),
            Err(TokenError::TooManyBlocks { .. })
        ));
    }
}
