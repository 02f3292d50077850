//! `till usage`: per-block use counts from the running proxy.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use super::revoke::AdminArgs;

#[derive(Args, Debug)]
pub struct UsageArgs {
    /// A token (its blocks are shown) or a revocation id; default: every counter.
    #[arg(value_name = "TOKEN|ID")]
    pub target: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub admin: AdminArgs,
}

pub fn run(home: &Path, a: UsageArgs) -> anyhow::Result<ExitCode> {
    let rows: Vec<Value> = match &a.target {
        None => a.admin.call(home, "GET", "/admin/usage", None)?["counters"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        Some(t) => {
            let t = t.trim();
            let ids = if t.len() == 128 && hex::decode(t).is_ok() {
                vec![t.to_ascii_lowercase()]
            } else {
                crate::token::RawToken::parse(t)?.revocation_ids()
            };
            let mut out = Vec::new();
            for id in ids {
                out.push(
                    a.admin
                        .call(home, "GET", &format!("/admin/usage/{id}"), None)?,
                );
            }
            out
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<18} {:>8} {:>8} {:>9}  {:<20}  revoked",
        "block id", "uses", "limit", "remaining", "expires"
    );
    for r in rows {
        let id = r["id"].as_str().unwrap_or("");
        let short = &id[..id.len().min(16)];
        let num = |k: &str| {
            r[k].as_u64()
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into())
        };
        let exp = r["expires"]
            .as_u64()
            .map(|s| {
                crate::token::format_time(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
            })
            .unwrap_or_else(|| "-".into());
        println!(
            "{short:<16}.. {:>8} {:>8} {:>9}  {exp:<20}  {}",
            num("uses"),
            num("limit"),
            num("remaining"),
            if r["revoked"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
