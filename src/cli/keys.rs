//! `till keygen` and `till pubkey`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use crate::token::keys;

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Replace an existing root key. Every token issued with the old key stops working.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct PubkeyArgs {
    /// Root private key file (default: TILL_HOME/root.key).
    #[arg(long, env = "TILL_ROOT_KEY")]
    pub key: Option<PathBuf>,
}

pub fn key_path(home: &Path, explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| home.join(keys::ROOT_KEY_FILE))
}

pub fn keygen(home: &Path, a: KeygenArgs) -> anyhow::Result<ExitCode> {
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

pub fn pubkey(home: &Path, a: PubkeyArgs) -> anyhow::Result<ExitCode> {
    let kp = keys::load(&key_path(home, a.key.as_deref()))?;
    outln!("{}", keys::public_string(&kp.public()));
    Ok(ExitCode::SUCCESS)
}
