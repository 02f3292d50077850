//! Root key files. Ed25519 only (see design.md §2: P-256 signatures are
//! malleable in biscuit-auth 6, which would let a token dodge its counter).

use std::fs;
use std::io::Write;
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

/// Reads a root private key file written by [`save`].
pub fn load(path: &Path) -> Result<KeyPair, TokenError> {
    let text = fs::read_to_string(path).map_err(|e| {
        TokenError::Key(format!(
            "cannot read root key {}: {e}; run `till keygen` first or set TILL_HOME",
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
    if path.exists() && !force {
        return Err(TokenError::Key(format!(
            "{} already exists; refusing to overwrite a root key (pass --force to replace it and invalidate every token issued with it)",
            path.display()
        )));
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)
            .map_err(|e| TokenError::Key(format!("cannot create {}: {e}", dir.display())))?;
    }
    let io = |e: std::io::Error| TokenError::Key(format!("cannot write {}: {e}", path.display()));
    let tmp = path.with_extension("key.tmp");
    // A leftover temporary file (from a crash) keeps its old mode, since the
    // mode below only applies to a file we create, and it may be a symlink
    // planted elsewhere: remove it and insist on creating a fresh file.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io)?;
    let secret = key.private().to_prefixed_string();
    f.write_all(secret.as_bytes()).map_err(io)?;
    f.write_all(b"\n").map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}
