//! `till reload`: ask the running proxy to re-read its config file and its
//! upstreams' credentials (`POST /admin/reload`), e.g. after rotating a key.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;

use super::revoke::AdminArgs;

#[derive(Args, Debug)]
pub struct ReloadArgs {
    /// Print the proxy's JSON answer instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub admin: AdminArgs,
}

fn list(v: &serde_json::Value) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn run(home: &Path, a: ReloadArgs) -> anyhow::Result<ExitCode> {
    let v = a.admin.call(home, "POST", "/admin/reload", None)?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut what = Vec::new();
    for key in ["changed", "added", "removed"] {
        let names = list(&v[key]);
        if !names.is_empty() {
            what.push(format!("{key} {names}"));
        }
    }
    if what.is_empty() {
        what.push("no upstream changed".into());
    }
    outln!("reloaded: {}", what.join("; "));
    let restart = list(&v["restart_needed"]);
    if !restart.is_empty() {
        eprintln!("till: warning: these keys changed but take effect only at restart: {restart}");
    }
    Ok(ExitCode::SUCCESS)
}
