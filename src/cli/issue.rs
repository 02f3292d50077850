//! `till issue`, and the scope flags it shares with `till attenuate`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::bail;
use clap::Args;

use crate::token::{self, Scope, keys, vocab};

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
    /// Maximum number of uses of this block; every use of any token derived from it counts.
    #[arg(long, value_name = "N")]
    pub max_uses: Option<u64>,
    /// Lifetime from now, e.g. 10m, 24h, 7d, 1h30m.
    #[arg(long, value_name = "DURATION", conflicts_with = "expires")]
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
            (Some(t), _) => Some(SystemTime::now() + token::parse_duration(t)?),
            (None, Some(e)) => Some(token::parse_time(e)?),
            (None, None) => None,
        };
        if self.max_uses == Some(0) {
            bail!("--max-uses 0 would make a token that can never be used; use at least 1");
        }
        Ok(Scope {
            services: self.services.clone(),
            methods,
            paths,
            models: self.models.clone(),
            max_uses: self.max_uses,
            expires,
            label: self.label.clone(),
            datalog: self.datalog.clone(),
        })
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
    #[arg(long, conflicts_with_all = ["services", "any_service", "methods", "paths", "models"])]
    pub admin: bool,
    /// Root private key file (default: TILL_HOME/root.key).
    #[arg(long, env = "TILL_ROOT_KEY")]
    pub key: Option<PathBuf>,
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
    let root = keys::load(&super::keys::key_path(home, a.key.as_deref()))?;
    println!("{}", token::issue(&root, &scope)?);
    Ok(ExitCode::SUCCESS)
}
