//! `till store export FILE` / `till store import FILE`: move counts, block
//! metadata, retired ids and revocations between the embedded store and
//! Redis (either way) without losing a use.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::proxy::{Config, install_crypto};
use crate::store::migrate::{ImportReport, Snapshot};
use crate::store::{EmbeddedStore, RedisStore};

#[derive(Args, Debug)]
pub struct StoreArgs {
    #[command(subcommand)]
    pub command: StoreCommand,
}

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Write the store's counts, block metadata, retired ids and revocations to FILE (JSON).
    Export(Target),
    /// Merge FILE into the store: each count ends at the larger of the two, nothing is removed.
    Import(Target),
}

#[derive(Args, Debug)]
pub struct Target {
    /// The export file (export refuses to overwrite one).
    pub file: PathBuf,
    /// The config naming the store (`store`, `store_password`, `state_dir`);
    /// default: till.toml in TILL_HOME.
    #[arg(long, env = "TILL_CONFIG")]
    pub config: Option<PathBuf>,
    /// The store to use instead of the config's: a redis:// or rediss:// URL, or `embedded`
    /// for the embedded store in the state directory.
    #[arg(long)]
    pub store: Option<String>,
}

enum Store {
    Embedded(EmbeddedStore),
    Redis(RedisStore),
}

pub fn run(home: &Path, a: StoreArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match a.command {
        StoreCommand::Export(t) => {
            if t.file.exists() {
                bail!(
                    "{} already exists; remove it or choose another file name",
                    t.file.display()
                );
            }
            let (store, name) = open(home, &t, &rt)?;
            let snapshot = match &store {
                Store::Embedded(s) => s.export(),
                Store::Redis(s) => rt.block_on(s.export()),
            };
            close(&store)?;
            let snapshot = snapshot.with_context(|| format!("cannot export {name}"))?;
            let text = serde_json::to_string_pretty(&snapshot)?;
            write_new(&t.file, &text)?;
            eprintln!(
                "till: exported {} counters, {} retired ids and {} revocations from {name} to {}",
                snapshot.counters.len(),
                snapshot.retired.len(),
                snapshot.revocations.len(),
                t.file.display()
            );
        }
        StoreCommand::Import(t) => {
            let text = std::fs::read_to_string(&t.file)
                .with_context(|| format!("cannot read {}", t.file.display()))?;
            let snapshot = Snapshot::parse(&text).with_context(|| t.file.display().to_string())?;
            let (store, name) = open(home, &t, &rt)?;
            let report = match &store {
                Store::Embedded(s) => s.import(&snapshot),
                Store::Redis(s) => rt.block_on(s.import(&snapshot)),
            };
            close(&store)?;
            let r: ImportReport = report.with_context(|| format!("cannot import into {name}"))?;
            eprintln!(
                "till: imported {} into {name}: {} counters set from the file, {} kept (already at or above the file's count), {} block records added, {} retired ids, {} new revocations",
                t.file.display(),
                r.raised,
                r.kept,
                r.blocks,
                r.retired,
                r.revoked
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The store named by `--store`, else by the config, else the embedded
/// store in TILL_HOME; and how to name it in messages.
fn open(home: &Path, t: &Target, rt: &tokio::runtime::Runtime) -> anyhow::Result<(Store, String)> {
    let default_config = home.join(super::serve::CONFIG_FILE);
    let cfg = match &t.config {
        Some(p) => Some(Config::load(p)?),
        None if default_config.exists() => Some(Config::load(&default_config)?),
        None => None,
    };
    let state_dir = cfg
        .as_ref()
        .map_or_else(|| home.to_path_buf(), |c| c.state_dir.clone());
    let url = match t.store.as_deref() {
        Some("embedded") => None,
        Some(url) => {
            let mut probe = cfg.clone().unwrap_or_default();
            probe.store = Some(url.to_string());
            probe.file = "--store".into();
            probe.validate_store()?;
            Some(url.to_string())
        }
        None => cfg.as_ref().and_then(|c| c.store.clone()),
    };
    match url {
        None => {
            let s = EmbeddedStore::open(&state_dir).context(
                "stop the proxy using this store first (its file is locked while it runs)",
            )?;
            let name = format!("the embedded store {}", s.path().display());
            Ok((Store::Embedded(s), name))
        }
        Some(url) => {
            let password = match &cfg {
                Some(c) if c.store_password.is_some() => {
                    c.resolve_store_password(&|v| std::env::var(v).ok())?
                }
                _ => None,
            };
            install_crypto();
            let s = rt.block_on(RedisStore::connect(&url, password.as_deref()))?;
            let name = format!("redis at {}", s.target());
            Ok((Store::Redis(s), name))
        }
    }
}

fn close(store: &Store) -> anyhow::Result<()> {
    match store {
        Store::Embedded(s) => s.close().context("closing the embedded store")?,
        Store::Redis(s) => s.close(),
    }
    Ok(())
}

/// Writes `text` to a new file (mode 0600: labels can say who an agent
/// works for), synced before returning.
fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
        .with_context(|| format!("cannot write {}", path.display()))
}
