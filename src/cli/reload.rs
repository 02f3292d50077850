//! `till reload`: ask the running proxy to re-read its config file, its
//! upstreams' credentials and its root key set (`POST /admin/reload`), e.g.
//! after rotating a key; `proxy::reload` says what is applied.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;

use super::revoke::AdminArgs;
use crate::proxy::reload::Reloaded;

#[derive(Args, Debug)]
pub struct ReloadArgs {
    /// Print the proxy's JSON answer instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub admin: AdminArgs,
}

pub fn run(home: &Path, a: ReloadArgs) -> anyhow::Result<ExitCode> {
    let v = a.admin.call(home, "POST", "/admin/reload", None)?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let done: Reloaded = serde_json::from_value(v)
        .map_err(|e| anyhow::anyhow!("the proxy's answer to the reload is not understood: {e}"))?;
    outln!("reloaded: {}", done.summary());
    if !done.restart_needed.is_empty() {
        eprintln!(
            "till: warning: these keys changed but take effect only at restart: {}",
            done.restart_needed.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
