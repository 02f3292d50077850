//! `till keygen`, `till pubkey` and `till key` (list, retire).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::token::keys;
use crate::token::keyset::{self, KeySet};

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Replace an existing root key. Every token issued with the old key stops working.
    #[arg(long, conflicts_with = "rotate")]
    pub force: bool,
    /// Make a new active root key; the previous keys keep verifying until `till key retire ID`.
    /// Re-issues TILL_HOME/admin.token under the new key.
    #[arg(long)]
    pub rotate: bool,
}

#[derive(Args, Debug)]
pub struct PubkeyArgs {
    /// Root private key file (default: the active key of TILL_HOME).
    #[arg(long, env = "TILL_ROOT_KEY")]
    pub key: Option<PathBuf>,
    /// Every key that still verifies, one `ID=ed25519/<hex>` a line (each a --public-key for `till verify`).
    #[arg(long, conflicts_with = "json")]
    pub all: bool,
    /// The signed key set document, as the proxy serves it at /.well-known/till-keys.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub command: KeyCommand,
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// List the root keys: id, state (active, verifying, retired), created, public key.
    List {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Retire a root key: tokens issued under it are refused (401) from then on.
    Retire {
        /// The key's id (see `till key list`).
        id: u32,
        /// Keep it verifying for this long first, e.g. 7d (default: retire now).
        #[arg(long, value_name = "DURATION")]
        after: Option<String>,
    },
}

pub fn key_path(home: &Path, explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| home.join(keys::ROOT_KEY_FILE))
}

/// What the operator must do for a running proxy to see a key change.
const PICK_UP: &str =
    "a running proxy picks the key set up on SIGHUP (kill -HUP), `till reload` or a restart";
/// After a rotation the admin token is under a key the proxy does not know
/// yet; `till reload` then authenticates with the previous admin token
/// (kept as `admin.token.previous`, see [`ADMIN_TOKEN_PREVIOUS`]).
const PICK_UP_ROTATION: &str =
    "a running proxy picks the new key set up on `till reload`, SIGHUP (kill -HUP) or a restart";

/// The admin token from before the last rotation, under a key the running
/// proxy still knows: what `till reload` (and every admin command) falls
/// back to while the proxy has not read the new key set yet.
pub const ADMIN_TOKEN_PREVIOUS: &str = "admin.token.previous";

pub fn keygen(home: &Path, a: KeygenArgs) -> anyhow::Result<ExitCode> {
    if a.rotate {
        return rotate(home);
    }
    let index = home.join(keyset::KEYS_DIR).join(keyset::INDEX_FILE);
    if index
        .try_exists()
        .with_context(|| format!("cannot tell whether {} exists", index.display()))?
    {
        bail!(
            "{} already holds a rotated key set; use `till keygen --rotate` to add a key",
            home.display()
        );
    }
    let path = key_path(home, None);
    let kp = keys::generate();
    keys::save(&path, &kp, a.force)?;
    eprintln!(
        "wrote root key to {} (mode 0600; keep it secret)",
        path.display()
    );
    outln!("{}", keys::public_string(&kp.public()));
    Ok(ExitCode::SUCCESS)
}

fn rotate(home: &Path) -> anyhow::Result<ExitCode> {
    if !KeySet::exists(home)? {
        bail!(
            "no root key in {} to rotate; run `till keygen` first",
            home.display()
        );
    }
    // Held until the admin tokens below are written: a concurrent rotation
    // or retirement waits, then starts from this one's result.
    let mut ks = KeySet::load_locked(home)?;
    let previous = ks.active_id();
    let id = ks.rotate()?;
    // The admin token the CLI uses must outlive the old key's retirement.
    let admin = super::serve::admin_token(&ks)?;
    let admin_path = home.join(super::serve::ADMIN_TOKEN_FILE);
    if let Ok(previous) = std::fs::read(&admin_path) {
        keyset::write_atomic(&home.join(ADMIN_TOKEN_PREVIOUS), &previous)?;
    }
    keyset::write_atomic(&admin_path, format!("{admin}\n").as_bytes())?;
    eprintln!(
        "made root key {id} (now active; {}); key {previous} keeps verifying until `till key retire {previous}`; re-issued {} under key {id}; {PICK_UP_ROTATION}",
        keyset::key_file(home, id).display(),
        admin_path.display()
    );
    outln!("{}", keys::public_string(&ks.active_key().public()));
    Ok(ExitCode::SUCCESS)
}

pub fn pubkey(home: &Path, a: PubkeyArgs) -> anyhow::Result<ExitCode> {
    if let Some(k) = a.key.as_ref().filter(|_| !a.all && !a.json) {
        let kp = keys::load(k)?;
        outln!("{}", keys::public_string(&kp.public()));
        return Ok(ExitCode::SUCCESS);
    }
    let ks = KeySet::load(home)?;
    let now = crate::store::now_unix();
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&ks.document(now))?);
    } else if a.all {
        for r in ks.records().iter().filter(|r| !r.retired(now)) {
            outln!("{}={}", r.id, r.public_key);
        }
    } else {
        outln!("{}", keys::public_string(&ks.active_key().public()));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn key(home: &Path, a: KeyArgs) -> anyhow::Result<ExitCode> {
    // A retirement holds the key set's lock until it is written.
    let mut ks = match a.command {
        KeyCommand::Retire { .. } => KeySet::load_locked(home)?,
        KeyCommand::List { .. } => KeySet::load(home)?,
    };
    let now = crate::store::now_unix();
    match a.command {
        KeyCommand::List { json } => {
            if json {
                let list: Vec<serde_json::Value> = ks
                    .records()
                    .iter()
                    .map(|r| {
                        let mut v = serde_json::to_value(r).unwrap_or_default();
                        v["status"] = r.status(ks.active_id(), now).into();
                        v
                    })
                    .collect();
                outln!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for r in ks.records() {
                    let when = crate::token::format_unix;
                    let mut line = format!(
                        "{}  {:<9}  created {}  {}",
                        r.id,
                        r.status(ks.active_id(), now),
                        when(r.created),
                        r.public_key
                    );
                    if let Some(t) = r.retired_at {
                        line.push_str(&format!("  retired {}", when(t)));
                    } else if let Some(t) = r.not_after {
                        line.push_str(&format!("  not after {}", when(t)));
                    }
                    outln!("{line}");
                }
            }
        }
        KeyCommand::Retire { id, after } => {
            let at = after
                .as_deref()
                .map(|d| crate::token::parse_duration(d).context("--after"))
                .transpose()?
                .map(|d| now.saturating_add(d.as_secs()));
            ks.retire(id, at)?;
            if at.is_none() {
                // Only needed between a rotation and the proxy's reload;
                // an admin token under a retired key is of no use.
                match std::fs::remove_file(home.join(ADMIN_TOKEN_PREVIOUS)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        eprintln!(
                            "till: warning: cannot remove {}: {e}",
                            home.join(ADMIN_TOKEN_PREVIOUS).display()
                        );
                    }
                    _ => {}
                }
            }
            match at {
                Some(t) => eprintln!(
                    "root key {id} verifies until {}, then its tokens are refused; {PICK_UP}",
                    crate::token::format_unix(t)
                ),
                None => eprintln!(
                    "retired root key {id}: tokens issued under it are refused from now on; {PICK_UP}"
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
