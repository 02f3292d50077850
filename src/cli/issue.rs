//! `till issue`, and the scope flags it shares with `till attenuate`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::bail;
use clap::Args;

use crate::token::keyset::KeySet;
use crate::token::{self, Scope, TokenError, keys, vocab};

/// Scope flags. Repeatable flags mean "any of these".
#[derive(Args, Debug, Clone, Default)]
pub struct ScopeArgs {
    /// Upstream service the token may call (repeatable: any of these), e.g. openai.
    #[arg(long = "service", value_name = "NAME")]
    pub services: Vec<String>,
    /// HTTP method allowed (repeatable), e.g. POST. Default: any.
    #[arg(long = "method", value_name = "METHOD")]
    pub methods: Vec<String>,
    /// Path prefix allowed (repeatable), e.g. /v1/chat/. Matched on the normalised path.
    #[arg(long = "path", value_name = "PREFIX")]
    pub paths: Vec<String>,
    /// Model allowed (repeatable). Requests must then name one of these models in their JSON body.
    #[arg(long = "model", value_name = "MODEL")]
    pub models: Vec<String>,
    /// MCP tool the token may call (repeatable), for upstreams with api = "mcp"; a trailing '*'
    /// makes a prefix, e.g. 'github_*'. Default: every tool. Other MCP messages (initialize,
    /// tools/list, ...) stay allowed; requests to non-MCP upstreams are refused.
    #[arg(long = "tool", value_name = "NAME")]
    pub tools: Vec<String>,
    /// MCP prompt the token may get (repeatable), as for --tool ('name*' for a prefix).
    /// Default: every prompt.
    #[arg(long = "prompt", value_name = "NAME")]
    pub prompts: Vec<String>,
    /// MCP resource URI prefix the token may read (repeatable), e.g. file:///docs/.
    /// Default: every resource.
    #[arg(long = "resource", value_name = "URI-PREFIX")]
    pub resources: Vec<String>,
    /// Maximum number of uses of this block (at least 1); every use of any token derived from it counts.
    // Taken as text, hyphen values included, so that `-1` gets a plain-words
    // error from us rather than clap's "unexpected argument '-1'".
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub max_uses: Option<String>,
    /// Rate window N/DURATION (repeatable): at most N requests in any DURATION, e.g. 10/1s,
    /// 100/1h. Counts every request of this token and of tokens derived from it; a full window
    /// answers 429 rate_limited with Retry-After.
    #[arg(long = "rate", value_name = "N/DURATION")]
    pub rates: Vec<String>,
    /// At most N requests of this token (and tokens derived from it) in flight at once;
    /// a request holds its slot until its response (streamed or not) ends.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub concurrency: Option<String>,
    /// Lifetime from now, e.g. 10m, 24h, 7d, 1h30m.
    #[arg(
        long,
        value_name = "DURATION",
        conflicts_with = "expires",
        allow_hyphen_values = true
    )]
    pub ttl: Option<String>,
    /// Absolute expiry, RFC 3339, e.g. 2026-12-01T00:00:00Z.
    #[arg(long, value_name = "TIME")]
    pub expires: Option<String>,
    /// Free text naming who the token is for (shown in inspect, usage and audit logs).
    #[arg(long)]
    pub label: Option<String>,
    /// Raw Datalog appended to the block, for experts.
    #[arg(long, value_name = "CODE")]
    pub datalog: Option<String>,
}

impl ScopeArgs {
    pub fn to_scope(&self) -> anyhow::Result<Scope> {
        for s in &self.services {
            vocab::validate_service(s)?;
        }
        let methods = self
            .methods
            .iter()
            .map(|m| vocab::normalize_method(m))
            .collect::<Result<Vec<_>, _>>()?;
        let paths = self
            .paths
            .iter()
            .map(|p| vocab::normalize_prefix(p))
            .collect::<Result<Vec<_>, _>>()?;
        let expires = match (&self.ttl, &self.expires) {
            (Some(t), _) => Some(
                token::expiry_after(SystemTime::now(), parse_ttl(t)?)
                    .map_err(|e| flag_error(&format!("--ttl {t}:"), e))?,
            ),
            (None, Some(e)) => Some(token::parse_time(e).map_err(|e| flag_error("--expires", e))?),
            (None, None) => None,
        };
        let max_uses = self.max_uses.as_deref().map(parse_max_uses).transpose()?;
        let rates = self
            .rates
            .iter()
            .map(|r| vocab::Rate::parse(r).map_err(|e| flag_error("--rate", e)))
            .collect::<Result<Vec<_>, _>>()?;
        let concurrency = self
            .concurrency
            .as_deref()
            .map(parse_concurrency)
            .transpose()?;
        for t in &self.tools {
            vocab::tool_pattern(t).map_err(|e| flag_error("--tool", e))?;
        }
        for p in &self.prompts {
            vocab::tool_pattern(p).map_err(|e| flag_error("--prompt", e))?;
        }
        for r in &self.resources {
            vocab::resource_prefix(r).map_err(|e| flag_error("--resource", e))?;
        }
        Ok(Scope {
            services: self.services.clone(),
            methods,
            paths,
            models: self.models.clone(),
            tools: self.tools.clone(),
            prompts: self.prompts.clone(),
            resources: self.resources.clone(),
            max_uses,
            expires,
            label: self.label.clone(),
            datalog: self.datalog.clone(),
            rates,
            concurrency,
        })
    }
}

/// `--max-uses`: a whole number of at least 1.
fn parse_max_uses(s: &str) -> anyhow::Result<u64> {
    match s.trim().parse::<u64>() {
        Ok(0) => {
            bail!("--max-uses 0 would make a token that can never be used; use at least 1")
        }
        Ok(n) if i64::try_from(n).is_ok() => Ok(n),
        Ok(_) => bail!(
            "--max-uses {s} is too large: the largest use limit is {}; leave --max-uses out for no limit",
            i64::MAX
        ),
        Err(_) if s.trim().starts_with('-') => bail!(
            "--max-uses {s} is negative: a use limit is a whole number of at least 1, e.g. --max-uses 100"
        ),
        Err(_) => bail!(
            "--max-uses {s:?} is not a whole number: a use limit is a whole number of at least 1, e.g. --max-uses 100"
        ),
    }
}

/// `--concurrency`: 1 to [`vocab::MAX_CONCURRENCY`].
fn parse_concurrency(s: &str) -> anyhow::Result<u64> {
    match s.trim().parse::<u64>() {
        Ok(n) if (1..=vocab::MAX_CONCURRENCY).contains(&n) => Ok(n),
        _ => bail!(
            "--concurrency {s:?}: give how many requests may be in flight at once, a whole number from 1 to {}, e.g. --concurrency 4",
            vocab::MAX_CONCURRENCY
        ),
    }
}

/// `--ttl`: a positive duration.
fn parse_ttl(s: &str) -> anyhow::Result<std::time::Duration> {
    let t = s.trim();
    if t.starts_with('-') {
        bail!(
            "--ttl {s} is negative: give how long the token should live from now, e.g. --ttl 10m, 24h or 7d (or --expires TIME)"
        );
    }
    let digits = || t.chars().filter(char::is_ascii_digit);
    let zero = t.chars().all(|c| c.is_ascii_digit() || "smhd".contains(c))
        && digits().next().is_some()
        && digits().all(|c| c == '0');
    if zero {
        bail!(
            "--ttl {s} would make a token that expires at once and can never be used; give at least 1s, e.g. --ttl 10m"
        );
    }
    token::parse_duration(t).map_err(|e| flag_error("--ttl", e))
}

/// Names the flag instead of the library's generic "invalid scope:" prefix.
fn flag_error(flag: &str, e: TokenError) -> anyhow::Error {
    match e {
        TokenError::InvalidScope(m) => anyhow::anyhow!("{flag} {m}"),
        other => other.into(),
    }
}

#[derive(Args, Debug)]
pub struct IssueArgs {
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// DANGEROUS: allow every configured upstream service. Prefer one --service per upstream.
    #[arg(long, conflicts_with = "services")]
    pub any_service: bool,
    /// Issue an admin token for the proxy's admin API (revoke, usage) instead of an API token.
    #[arg(long, conflicts_with_all = ["services", "any_service", "methods", "paths", "models", "tools", "prompts", "resources", "rates", "concurrency"])]
    pub admin: bool,
    /// Root private key file (default: the active key of TILL_HOME).
    #[arg(long, env = "TILL_ROOT_KEY")]
    pub key: Option<PathBuf>,
    /// Refuse (exit 2, no token printed) instead of warning when the token can never
    /// succeed or has neither a use limit nor an expiry.
    #[arg(long)]
    pub strict: bool,
}

pub fn run(home: &Path, a: IssueArgs) -> anyhow::Result<ExitCode> {
    let mut scope = a.scope.to_scope()?;
    if a.admin {
        scope.services = vec![vocab::ADMIN_SERVICE.into()];
    } else if a.any_service {
        scope.services = vec![vocab::ANY.into()];
    } else if scope.services.is_empty() {
        bail!(
            "no --service given: name the upstream(s) this token may call, e.g. --service openai \
             (or pass the dangerous --any-service)"
        );
    }
    let t = match &a.key {
        Some(path) => {
            let root = keys::load(path)?;
            // A key of the home's set is named in the token, so a proxy
            // holding the set checks it with the right key.
            let id = KeySet::load(home)
                .ok()
                .and_then(|ks| ks.id_of(&root.public()))
                .filter(|&id| id != 0);
            token::issue_as(&root, id, &scope)?
        }
        None => {
            let ks = KeySet::load(home)?;
            token::issue_as(ks.active_key(), ks.active_token_id(), &scope)?
        }
    };
    let view = token::inspect::inspect(&token::RawToken::parse(&t)?)?;
    super::warn::report(&super::warn::for_root(&view, SystemTime::now()), a.strict)?;
    outln!("{t}");
    Ok(ExitCode::SUCCESS)
}
