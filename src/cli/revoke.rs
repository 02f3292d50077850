//! `till revoke`: revoke on the running proxy through its admin API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use super::serve::ADMIN_TOKEN_FILE;

/// Where the proxy is when neither --url nor `listen` in till.toml says.
const DEFAULT_URL: &str = "http://127.0.0.1:8787";

/// Shortest id prefix accepted in place of a revocation id: shorter ones
/// are too easy to mistype into another block's id.
pub const MIN_PREFIX: usize = 8;

/// How to reach the admin API (shared with `till usage`).
#[derive(Args, Debug, Clone)]
pub struct AdminArgs {
    /// Base URL of the running proxy's admin plane (default: from `admin_listen`, else
    /// `listen`, in TILL_HOME/till.toml, else http://127.0.0.1:8787).
    // Hidden in --help: a URL can carry a user name and password.
    #[arg(long, env = "TILL_URL", hide_env_values = true)]
    pub url: Option<String>,
    /// Admin token (default: read from TILL_HOME/admin.token).
    #[arg(long, env = "TILL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// How long to wait for the proxy's answer before giving up, e.g. 30s or 2m.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_timeout)]
    pub timeout: std::time::Duration,
}

/// `--timeout`: a duration as `till issue --ttl` takes them, above zero.
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    match crate::token::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("the timeout must be above zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// The proxy took longer than `--timeout` to answer.
fn no_answer(base: &str, from: &str, timeout: std::time::Duration) -> anyhow::Error {
    anyhow::anyhow!(
        "the proxy at {base} (from {from}) did not answer within {} s (--timeout); it may still complete the request (see its log). Is it a Till proxy, and is it stuck?",
        timeout.as_secs()
    )
}

/// A 401 for an admin token signed by a root key the proxy does not have:
/// with the address taken from till.toml or the default, most likely
/// another Till listening there (one started with `--listen` elsewhere, or
/// from another TILL_HOME).
fn wrong_root_key(status: reqwest::StatusCode, v: &Value) -> bool {
    status == reqwest::StatusCode::UNAUTHORIZED
        && v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("token signature does not verify"))
}

impl AdminArgs {
    /// The proxy's base URL and where it came from (for error messages).
    fn base_url(&self, home: &Path) -> anyhow::Result<(String, String)> {
        if let Some(u) = &self.url {
            return Ok((
                u.trim_end_matches('/').to_string(),
                "--url or TILL_URL".into(),
            ));
        }
        let cfg = home.join(super::serve::CONFIG_FILE);
        let text = match std::fs::read_to_string(&cfg) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((DEFAULT_URL.into(), "the default".into()));
            }
            Err(e) => bail!(
                "cannot read {}: {e}; pass --url or set TILL_URL",
                cfg.display()
            ),
        };
        let table: toml::Table = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "cannot find the proxy's address in {}; pass --url or set TILL_URL: {}",
                cfg.display(),
                crate::proxy::config::mask_strings_in_toml_error(e.to_string().trim_end())
            )
        })?;
        // The admin plane is on `admin_listen` when there is one.
        let Some((key, listen)) = ["admin_listen", "listen"]
            .into_iter()
            .find_map(|k| table.get(k).map(|v| (k, v)))
        else {
            return Ok((DEFAULT_URL.into(), "the default".into()));
        };
        let from = format!("`{key}` in {}", cfg.display());
        let mut addr = listen
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("listen is not a string"))
            .and_then(|s| crate::proxy::config::parse_listen(s).map_err(anyhow::Error::msg))
            .with_context(|| format!("{}: listen; pass --url or set TILL_URL", cfg.display()))?;
        if addr.port() == 0 {
            bail!(
                "{from} is port 0 (a free port picked at start), so the proxy's address is only in what `till up` printed; pass it with --url or TILL_URL"
            );
        }
        // A proxy listening on every interface is reached on loopback, where
        // the admin API answers.
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        Ok((format!("http://{addr}"), from))
    }

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
        let (base, from) = self.base_url(home)?;
        let url = format!("{base}{path}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            crate::proxy::install_crypto();
            // The admin API never redirects: following one would send the
            // admin token's request to wherever a stranger points it.
            // A proxy that never answers (stuck, or not a proxy at all)
            // must not hang the command, nor a script running it.
            let client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(self.timeout)
                .build()?;
            let timeout = self.timeout;
            let send = |token: String| {
                let mut req = match method {
                    "POST" => client.post(&url),
                    _ => client.get(&url),
                }
                .bearer_auth(token);
                if let Some(b) = &body {
                    req = req
                        .header("content-type", "application/json")
                        .body(b.to_string());
                }
                async {
                    let resp = req.send().await.map_err(|e| {
                        if e.is_timeout() {
                            return no_answer(&base, &from, timeout);
                        }
                        anyhow::Error::new(e).context(format!(
                            "cannot reach the proxy at {base} (from {from}); is `till up` running? (set --url or TILL_URL)"
                        ))
                    })?;
                    let status = resp.status();
                    let text = match resp.text().await {
                        Err(e) if e.is_timeout() => return Err(no_answer(&base, &from, timeout)),
                        t => t.unwrap_or_default(),
                    };
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    anyhow::Ok((status, v, text))
                }
            };
            let (mut status, mut v, mut text) = send(token).await?;
            let unknown_key = |status: reqwest::StatusCode, v: &Value| {
                status == reqwest::StatusCode::UNAUTHORIZED
                    && v["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("which this verifier does not know"))
            };
            // After `till keygen --rotate` the admin token is under the new
            // key, which the proxy learns only from a reload: the token from
            // before the rotation, under a key it knows, can ask for one.
            let previous = home.join(super::keys::ADMIN_TOKEN_PREVIOUS);
            if unknown_key(status, &v)
                && self.admin_token.is_none()
                && let Ok(old) = std::fs::read_to_string(&previous)
            {
                (status, v, text) = send(old.trim().to_string()).await?;
            }
            if !status.is_success() {
                let msg = v["error"]["message"].as_str().unwrap_or(text.as_str());
                if unknown_key(status, &v) {
                    bail!(
                        "proxy answered {status}: {msg} (after `till keygen --rotate`: make the proxy read the new key set with SIGHUP, e.g. kill -HUP $(pidof till), or a restart)"
                    );
                }
                if wrong_root_key(status, &v) && self.url.is_none() {
                    bail!(
                        "proxy answered {status}: {msg}. {base} (from {from}) may be another Till, not the one this admin token belongs to: pass your proxy's address (its `till: listening on` line) with --url or TILL_URL"
                    );
                }
                if status.is_redirection() {
                    bail!(
                        "{base} answered {status} (a redirect): the Till admin API never redirects, so this is not a Till proxy or not its address; nothing was done (check --url or TILL_URL)"
                    );
                }
                bail!("proxy answered {status}: {msg}");
            }
            if !v.is_object() {
                bail!(
                    "{base} answered {status} but not with a Till admin answer (JSON object): is it a Till proxy? Nothing can be assumed done (check --url or TILL_URL)"
                );
            }
            Ok(v)
        })
    }

    /// Resolves a revocation id or a unique prefix of one (as `till usage`
    /// shows them) against the ids the proxy knows: every block it has
    /// counted, and every revoked id.
    pub fn resolve_id(&self, home: &Path, given: &str) -> anyhow::Result<String> {
        let p = normalize_id(given)?;
        if p.len() == 128 {
            return Ok(p);
        }
        let mut known: Vec<String> = Vec::new();
        let usage = self.call(home, "GET", "/admin/usage", None)?;
        for f in usage["families"].as_array().into_iter().flatten() {
            for b in f["blocks"].as_array().into_iter().flatten() {
                known.extend(b["id"].as_str().map(str::to_string));
            }
        }
        let revoked = self.call(home, "GET", "/admin/revocations", None)?;
        for r in revoked["revoked"].as_array().into_iter().flatten() {
            known.extend(r["id"].as_str().map(str::to_string));
        }
        pick_id(&p, known)
    }
}

/// The one id in `known` that starts with the prefix `p`.
fn pick_id(p: &str, mut known: Vec<String>) -> anyhow::Result<String> {
    known.sort();
    known.dedup();
    let hits: Vec<&String> = known.iter().filter(|k| k.starts_with(p)).collect();
    match hits.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!(
            "no id known to the proxy starts with {p}: it knows the blocks it has counted (`till usage`) and revoked ids; give the full 128-hex-digit id from `till inspect`"
        ),
        many => bail!(
            "{p} is ambiguous: {} ids start with it ({}); give more digits",
            many.len(),
            many.iter()
                .take(4)
                .map(|k| format!("{}...", k.get(..24).unwrap_or(k)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A revocation id or a prefix of one, as typed or pasted: lower case, with
/// a trailing "..." or "…" removed.
pub(crate) fn normalize_id(given: &str) -> anyhow::Result<String> {
    let p = given
        .trim()
        .trim_end_matches('…')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_hexdigit()) || p.len() > 128 {
        bail!(
            "{given:?} is not a revocation id: give the 128 hex digits from `till inspect`, or a prefix of at least {MIN_PREFIX} shown by `till usage`"
        );
    }
    if p.len() < 128 && p.len() < MIN_PREFIX {
        bail!("id prefix {p} is too short: give at least {MIN_PREFIX} hex digits");
    }
    Ok(p)
}

/// Whether `s` is meant as an id or an id prefix rather than a token: tokens
/// are base64 and far longer than an id.
pub(crate) fn looks_like_id(s: &str) -> bool {
    let t = s.trim().trim_end_matches('…').trim_end_matches('.');
    !t.is_empty() && t.len() <= 128 && t.bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// Token to revoke (text, a file holding it, or "-" for stdin): revokes its last block. An
    /// id or a unique id prefix (as `till usage` shows it) is revoked like --id.
    #[arg(value_name = "TOKEN", conflicts_with_all = ["id", "list"])]
    pub token: Option<String>,
    /// Revoke the token's whole family (its root block) instead of its last block.
    #[arg(long, requires = "token")]
    pub root: bool,
    /// Revoke this revocation id (128 hex digits from `till inspect`, or a unique prefix of an
    /// id the proxy has seen, as `till usage` shows it).
    #[arg(long, value_name = "HEX", conflicts_with = "list")]
    pub id: Option<String>,
    /// List revoked ids.
    #[arg(long)]
    pub list: bool,
    /// Print the proxy's JSON answer instead of text.
    #[arg(long)]
    pub json: bool,
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
        if a.json {
            outln!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(ExitCode::SUCCESS);
        }
        for item in v["revoked"].as_array().into_iter().flatten() {
            let at = item["revoked_at"]
                .as_u64()
                .map(crate::token::format_unix)
                .unwrap_or_default();
            outln!("{}  {at}", item["id"].as_str().unwrap_or(""));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let body = match (&a.token, &a.id) {
        (Some(t), None) if looks_like_id(t) && !Path::new(t).is_file() => {
            if a.root {
                bail!("--root needs a token, not an id: revoke the family's root id with --id");
            }
            json!({ "id": a.admin.resolve_id(home, t)? })
        }
        (Some(t), None) => {
            let t = read_token_arg(t)?;
            // Parse locally first, so a typo is reported without a round trip.
            crate::token::RawToken::parse(&t)?;
            json!({"token": t, "root": a.root})
        }
        (None, Some(id)) => json!({ "id": a.admin.resolve_id(home, id)? }),
        _ => bail!("say what to revoke: a TOKEN, --id HEX, or --list"),
    };
    let v = a.admin.call(home, "POST", "/admin/revoke", Some(body))?;
    // Success is the proxy naming the id it revoked, not any 2xx.
    let id = v["revoked"].as_str().unwrap_or("");
    if id.len() != 128 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "the answer does not name a revoked id, so nothing can be assumed revoked: {} (is --url or TILL_URL a Till proxy?)",
            v.to_string().chars().take(200).collect::<String>()
        );
    }
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if v["already_revoked"].as_bool() == Some(true) {
        outln!("already revoked {id}");
    } else {
        outln!("revoked {id}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_prefixes_resolve_only_when_unique() {
        let known = vec![
            format!("0f17ec1a{}", "a".repeat(120)),
            format!("0f17ec1b{}", "b".repeat(120)),
        ];
        assert!(pick_id("0f17ec1a", known.clone()).unwrap().ends_with('a'));
        let e = pick_id("0f17ec1", known.clone()).unwrap_err().to_string();
        assert!(e.contains("ambiguous") && e.contains("more digits"), "{e}");
        let e = pick_id("deadbeef", known).unwrap_err().to_string();
        assert!(e.contains("no id known"), "{e}");
        assert_eq!(normalize_id("0F17EC1A7A9A…").unwrap(), "0f17ec1a7a9a");
        assert_eq!(normalize_id("0f17ec1a7a9a..").unwrap(), "0f17ec1a7a9a");
        assert!(normalize_id("0f17").is_err());
        assert!(normalize_id("xyz12345").is_err());
        assert!(looks_like_id("0f17ec1a7a9a"));
        assert!(!looks_like_id("agent.token"));
    }
}
