//! Root key files. Ed25519 only (see design.md §2: P-256 signatures are
//! malleable in biscuit-auth 6, which would let a token dodge its counter).

use std::fs;
use std::path::Path;

use biscuit_auth::builder::Algorithm;
use biscuit_auth::{KeyPair, PrivateKey, PublicKey};

use super::TokenError;

/// File name of the root private key inside the state directory.
pub const ROOT_KEY_FILE: &str = "root.key";

/// A fresh Ed25519 root key pair.
pub fn generate() -> KeyPair {
    KeyPair::new_with_algorithm(Algorithm::Ed25519)
}

/// The public key as Till prints it: `ed25519/<hex>`.
pub fn public_string(k: &PublicKey) -> String {
    k.to_string()
}

/// Parses `ed25519/<hex>` (or bare hex, taken as Ed25519).
pub fn parse_public(s: &str) -> Result<PublicKey, TokenError> {
    let s = s.trim();
    let parsed = if s.contains('/') {
        s.parse::<PublicKey>()
    } else {
        PublicKey::from_bytes_hex(s, Algorithm::Ed25519)
    };
    let k = parsed.map_err(|e| {
        TokenError::Key(format!(
            "invalid public key {s:?} ({e}); expected ed25519/<64 hex digits>, as printed by `till pubkey`"
        ))
    })?;
    if k.algorithm_string() != "ed25519" {
        return Err(TokenError::UnsupportedAlgorithm("P-256"));
    }
    Ok(k)
}

/// What to do about an error reading a file of state directory `dir`: for
/// a permission error, who must own it. Empty for other errors.
pub fn access_hint(dir: &Path, e: &std::io::Error) -> String {
    if e.kind() != std::io::ErrorKind::PermissionDenied {
        return String::new();
    }
    let who = crate::files::effective_uid().map_or_else(String::new, |u| format!(" (uid {u})"));
    let d = dir.display();
    format!(
        "; the user Till runs as{who} cannot read it. Every file in the state directory must belong to the directory's owner (an older till run as root, e.g. `sudo till keygen --rotate`, left root's): `sudo chown -R --reference={d} {d}/`"
    )
}

/// The state directory a key file is in: `root.key`'s directory, or the one
/// above `keys/`.
fn state_dir_of(path: &Path) -> &Path {
    let dir = path.parent().unwrap_or(Path::new("."));
    match dir.file_name() {
        Some(n) if n == super::keyset::KEYS_DIR => dir.parent().unwrap_or(Path::new(".")),
        _ => dir,
    }
}

/// Reads a root private key file written by [`save`].
pub fn load(path: &Path) -> Result<KeyPair, TokenError> {
    let text = fs::read_to_string(path).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound => {
                "; run `till keygen` first or set TILL_HOME".to_string()
            }
            _ => access_hint(state_dir_of(path), &e),
        };
        TokenError::Key(format!(
            "cannot read root key {}: {e}{hint}",
            path.display()
        ))
    })?;
    let text = text.trim();
    let key = text
        .strip_prefix("ed25519-private/")
        .ok_or_else(|| {
            TokenError::Key(format!(
                "root key {} is not an Ed25519 private key (expected a line starting with ed25519-private/)",
                path.display()
            ))
        })
        .and_then(|hex| {
            PrivateKey::from_bytes_hex(hex, Algorithm::Ed25519).map_err(|_| {
                TokenError::Key(format!("root key {} is corrupt (bad hex or length)", path.display()))
            })
        })?;
    Ok(KeyPair::from(&key))
}

/// Writes a private key with mode 0600. Refuses to replace an existing file
/// unless `force` is set: losing a root key orphans every token issued.
pub fn save(path: &Path, key: &KeyPair, force: bool) -> Result<(), TokenError> {
    let io = |e: std::io::Error| TokenError::Key(format!("cannot write {}: {e}", path.display()));
    if !force && path.try_exists().map_err(io)? {
        return Err(TokenError::Key(format!(
            "{} already exists; refusing to overwrite a root key (pass --force to replace it and invalidate every token issued with it)",
            path.display()
        )));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::files::create_private_dir(dir)
            .map_err(|e| TokenError::Key(format!("cannot create {}: {e}", dir.display())))?;
    }
    let secret = format!("{}\n", key.private().to_prefixed_string());
    crate::files::write_private(path, secret.as_bytes(), crate::files::Durability::Durable)
        .map_err(io)
}
