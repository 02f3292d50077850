//! `till usage`: use counts per token family, from the running proxy.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use super::revoke::AdminArgs;

#[derive(Args, Debug)]
pub struct UsageArgs {
    /// A token (text, a file holding it, or "-" for stdin) or a revocation id: show that
    /// token's family in detail. Default: every family.
    #[arg(value_name = "TOKEN|ID")]
    pub target: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub admin: AdminArgs,
}

fn time(v: &Value) -> String {
    v.as_u64()
        .map(|s| {
            crate::token::format_time(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
        })
        .unwrap_or_else(|| "-".into())
}

fn num(v: &Value) -> String {
    v.as_u64()
        .map(|n| n.to_string())
        .unwrap_or_else(|| "-".into())
}

pub fn run(home: &Path, a: UsageArgs) -> anyhow::Result<ExitCode> {
    let families: Vec<Value> = match &a.target {
        None => a.admin.call(home, "GET", "/admin/usage", None)?["families"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        Some(t) => {
            let t = super::revoke::read_token_arg(t)?;
            let t = t.trim();
            let id = if t.len() == 128 && hex::decode(t).is_ok() {
                t.to_ascii_lowercase()
            } else {
                // The last block of a token identifies its family and itself.
                crate::token::RawToken::parse(t)?
                    .revocation_ids()
                    .pop()
                    .unwrap_or_default()
            };
            vec![
                a.admin
                    .call(home, "GET", &format!("/admin/usage/{id}"), None)?,
            ]
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&families)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<22} {:>8} {:>8} {:>9}  {:<20}  {:<20}  label",
        "block", "uses", "limit", "remaining", "expires", "last use"
    );
    for f in &families {
        for b in f["blocks"].as_array().into_iter().flatten() {
            let id = b["id"].as_str().unwrap_or("");
            let depth = b["index"].as_u64().unwrap_or(0) as usize;
            let name = format!("{}{}..", "  ".repeat(depth), &id[..id.len().min(12)]);
            let revoked = if b["revoked"].as_bool() == Some(true) {
                " [revoked]"
            } else {
                ""
            };
            println!(
                "{name:<22} {:>8} {:>8} {:>9}  {:<20}  {:<20}  {}{revoked}",
                num(&b["uses"]),
                num(&b["limit"]),
                num(&b["remaining"]),
                time(&b["expires"]),
                time(&b["last_use"]),
                b["label"]
                    .as_str()
                    .map(|l| format!("{l:?}"))
                    .unwrap_or_default(),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
