//! `till revoke`: revoke on the running proxy through its admin API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use super::serve::ADMIN_TOKEN_FILE;

/// How to reach the admin API (shared with `till usage`).
#[derive(Args, Debug, Clone)]
pub struct AdminArgs {
    /// Base URL of the running proxy.
    #[arg(long, env = "TILL_URL", default_value = "http://127.0.0.1:8787")]
    pub url: String,
    /// Admin token (default: read from TILL_HOME/admin.token).
    #[arg(long, env = "TILL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

impl AdminArgs {
    fn token(&self, home: &Path) -> anyhow::Result<String> {
        if let Some(t) = &self.admin_token {
            return Ok(t.trim().to_string());
        }
        let p = home.join(ADMIN_TOKEN_FILE);
        let t = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "cannot read the admin token {} (pass --admin-token or set TILL_HOME)",
                p.display()
            )
        })?;
        Ok(t.trim().to_string())
    }

    /// Calls the admin API; returns the JSON answer or a readable error.
    pub fn call(
        &self,
        home: &Path,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let token = self.token(home)?;
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            crate::proxy::install_crypto();
            let client = reqwest::Client::new();
            let mut req = match method {
                "POST" => client.post(&url),
                _ => client.get(&url),
            }
            .bearer_auth(&token);
            if let Some(b) = body {
                req = req
                    .header("content-type", "application/json")
                    .body(b.to_string());
            }
            let resp = req.send().await.with_context(|| {
                format!(
                    "cannot reach the proxy at {}; is `till up` running? (set --url or TILL_URL)",
                    self.url
                )
            })?;
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if !status.is_success() {
                let msg = v["error"]["message"].as_str().unwrap_or(text.as_str());
                bail!("proxy answered {status}: {msg}");
            }
            Ok(v)
        })
    }
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// Token to revoke (text, a file holding it, or "-" for stdin). Revokes its last block.
    #[arg(value_name = "TOKEN", conflicts_with_all = ["id", "list"])]
    pub token: Option<String>,
    /// Revoke the token's whole family (its root block) instead of its last block.
    #[arg(long, visible_alias = "all", requires = "token")]
    pub root: bool,
    /// Revoke this revocation id (hex, from `till inspect`).
    #[arg(long, value_name = "HEX", conflicts_with = "list")]
    pub id: Option<String>,
    /// List revoked ids.
    #[arg(long)]
    pub list: bool,
    #[command(flatten)]
    pub admin: AdminArgs,
}

pub(crate) fn read_token_arg(arg: &str) -> anyhow::Result<String> {
    if arg == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        return Ok(s.trim().to_string());
    }
    let p = PathBuf::from(arg);
    if arg.len() < 256 && p.is_file() {
        return Ok(std::fs::read_to_string(&p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .trim()
            .to_string());
    }
    Ok(arg.trim().to_string())
}

pub fn run(home: &Path, a: RevokeArgs) -> anyhow::Result<ExitCode> {
    if a.list {
        let v = a.admin.call(home, "GET", "/admin/revocations", None)?;
        for item in v["revoked"].as_array().into_iter().flatten() {
            let at = item["revoked_at"]
                .as_u64()
                .map(|s| {
                    crate::token::format_time(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
                    )
                })
                .unwrap_or_default();
            println!("{}  {at}", item["id"].as_str().unwrap_or(""));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let body = match (&a.token, &a.id) {
        (Some(t), None) => {
            let t = read_token_arg(t)?;
            // Parse locally first, so a typo is reported without a round trip.
            crate::token::RawToken::parse(&t)?;
            json!({"token": t, "root": a.root})
        }
        (None, Some(id)) => json!({ "id": id }),
        _ => bail!("say what to revoke: a TOKEN, --id HEX, or --list"),
    };
    let v = a.admin.call(home, "POST", "/admin/revoke", Some(body))?;
    let id = v["revoked"].as_str().unwrap_or("");
    if v["already_revoked"].as_bool() == Some(true) {
        println!("already revoked {id}");
    } else {
        println!("revoked {id}");
    }
    Ok(ExitCode::SUCCESS)
}
