//! Reloading the upstream table without a restart (`SIGHUP`,
//! `POST /admin/reload`, `till reload`), so an operator can rotate an
//! upstream's real credential by rewriting its credential file.
//!
//! What reloads: the `[upstreams.*]` tables (URL, credential, header,
//! prefix, `set_headers`, `pass_headers`, `api`; upstreams added and
//! removed) with their credentials read again, and the root key set of the
//! state directory (`till keygen --rotate`, `till key retire`). Everything else (listen
//! address, state directory, store, policies, limits, admin settings, audit
//! and alerts) sizes or owns shared structures and is only applied at
//! restart; a reload that sees such a key changed says so.
//!
//! Every reload also reopens the audit file by its name, refused or not, so
//! that logrotate's default (rename the file, then `SIGHUP`) works.
//!
//! The new configuration is read and checked in full first (the checks
//! `till serve` makes at start, except connecting to a store); only then is
//! the table swapped, in one atomic store. Requests look the table up once
//! ([`Upstreams::get`]) and keep the [`Upstream`] they got, so a request in
//! flight finishes with the credential it started with.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use super::config::{Config, ConfigError};
use super::{AppState, Upstream};

/// The upstream table, replaced whole by a reload.
pub struct Upstreams(ArcSwap<HashMap<String, Arc<Upstream>>>);

impl Upstreams {
    pub fn new(table: HashMap<String, Arc<Upstream>>) -> Self {
        Upstreams(ArcSwap::from_pointee(table))
    }

    /// The upstream `name` as configured now. The caller keeps it for the
    /// whole request: a reload meanwhile does not change what it forwards.
    pub fn get(&self, name: &str) -> Option<Arc<Upstream>> {
        self.0.load().get(name).cloned()
    }

    /// Installs `table` in one atomic store.
    fn swap(&self, table: HashMap<String, Arc<Upstream>>) {
        self.0.store(Arc::new(table));
    }
}

/// Builds the upstream table from a validated config and its resolved
/// credentials (`Config::resolve_credentials`).
pub fn build_upstreams(
    cfg: &Config,
    credentials: &BTreeMap<String, Option<String>>,
) -> Result<HashMap<String, Arc<Upstream>>, ConfigError> {
    let mut upstreams = HashMap::new();
    for (name, u) in &cfg.upstreams {
        let header = HeaderName::from_bytes(u.header.as_bytes()).map_err(|_| ConfigError {
            file: cfg.file.clone(),
            message: format!("upstreams.{name}.header: not a header name"),
        })?;
        let credential = match credentials.get(name).cloned().flatten() {
            Some(c) => {
                let mut v = HeaderValue::from_str(&format!("{}{c}", u.prefix)).map_err(|_| {
                    ConfigError {
                        file: cfg.file.clone(),
                        message: format!("upstreams.{name}.credential: not a valid header value"),
                    }
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let bad = |what: &str| ConfigError {
            file: cfg.file.clone(),
            message: format!("upstreams.{name}.{what}: not a valid header"),
        };
        let mut set_headers = Vec::with_capacity(u.set_headers.len());
        for (k, v) in &u.set_headers {
            let mut v = HeaderValue::from_str(v).map_err(|_| bad("set_headers"))?;
            v.set_sensitive(true);
            set_headers.push((
                HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad("set_headers"))?,
                v,
            ));
        }
        let pass_headers = u
            .pass_headers
            .iter()
            .map(|k| HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad("pass_headers")))
            .collect::<Result<_, _>>()?;
        let target = super::upstream_client::Target::parse(&u.url).map_err(|e| ConfigError {
            file: cfg.file.clone(),
            message: format!("upstreams.{name}.url: {e}"),
        })?;
        let dropped_headers = super::forward::DroppedHeaders::new(&header, &set_headers);
        upstreams.insert(
            name.clone(),
            Arc::new(Upstream {
                name: Arc::from(name.as_str()),
                base: u.url.trim_end_matches('/').to_string(),
                target,
                header,
                credential,
                set_headers,
                pass_headers,
                dropped_headers,
                api: u.api(name),
                mcp_endpoint: Arc::from(u.mcp_endpoint()),
                forward_auth: u.forward_auth(),
            }),
        );
    }
    Ok(upstreams)
}

/// Reads a config file: the validated config and the file's raw table (to
/// tell which keys changed between two reads).
pub fn read(path: &Path) -> Result<(Config, toml::Table), ConfigError> {
    let file = path.display().to_string();
    let text = super::config::read_config_file(path)?;
    let cfg = Config::parse(&text, &file)?;
    // It parsed as a Config, so it parses as a table.
    let raw = toml::from_str(&text).unwrap_or_default();
    Ok((cfg, raw))
}

/// What the command line changed on top of the file (`till up`'s upstreams
/// from the environment, `--listen`, ...): applied again on every reload so
/// that a reload gives the configuration a restart would.
pub type Overrides = Box<dyn Fn(&mut Config) -> Result<(), ConfigError> + Send + Sync>;

/// Where a variable named by `{ env = "..." }` is read.
pub type Env = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Re-reads the configuration the proxy was started with and swaps its
/// upstream table.
pub struct Reloader {
    path: PathBuf,
    overrides: Overrides,
    env: Env,
    /// The address listened on, so that no reload can point an upstream
    /// back at the proxy.
    listening: SocketAddr,
    /// The raw file as read at start: what the restart-only keys in effect
    /// came from, so every reload names those changed since, not only those
    /// changed since the last reload. The lock makes reloads one at a time.
    started_with: Mutex<toml::Table>,
}

/// What a successful reload did. Names only: never a credential.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reloaded {
    pub reloaded: bool,
    /// Every upstream now configured.
    pub upstreams: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Upstreams whose URL, credential or headers changed.
    pub changed: Vec<String>,
    /// Keys of the file that changed since start but are only applied at
    /// restart.
    pub restart_needed: Vec<String>,
}

impl Reloaded {
    /// "changed openai; added other", or "no upstream changed".
    pub fn summary(&self) -> String {
        let parts: Vec<String> = [
            ("changed", &self.changed),
            ("added", &self.added),
            ("removed", &self.removed),
        ]
        .into_iter()
        .filter(|(_, names)| !names.is_empty())
        .map(|(what, names)| format!("{what} {}", names.join(", ")))
        .collect();
        if parts.is_empty() {
            "no upstream changed".into()
        } else {
            parts.join("; ")
        }
    }
}

impl Reloader {
    /// `raw` is the file as read at start (from [`read`]).
    pub fn new(
        path: PathBuf,
        overrides: Overrides,
        env: Env,
        listening: SocketAddr,
        raw: toml::Table,
    ) -> Self {
        Reloader {
            path,
            overrides,
            env,
            listening,
            started_with: Mutex::new(raw),
        }
    }

    /// Reads, checks and installs the configuration, and logs the outcome
    /// (`trigger` says what asked for it). On any error nothing changes:
    /// the proxy keeps serving the previous configuration. Blocking (file
    /// reads): call it off the async workers.
    pub fn reload(&self, st: &AppState, trigger: &str) -> Result<Reloaded, ConfigError> {
        // Before reading the file: a rotated log is followed even while the
        // configuration is refused.
        st.monitor.audit.reopen();
        match self.try_reload(st) {
            Ok(r) => {
                tracing::info!(
                    trigger,
                    upstreams = %r.upstreams.join(","),
                    "configuration reloaded from {}: upstreams and their credentials re-read; {}",
                    self.path.display(),
                    r.summary()
                );
                if !r.restart_needed.is_empty() {
                    tracing::warn!(
                        trigger,
                        "these keys changed in {} but take effect only at restart: {}",
                        self.path.display(),
                        r.restart_needed.join(", ")
                    );
                }
                Ok(r)
            }
            Err(e) => {
                tracing::error!(
                    trigger,
                    "configuration reload refused, still serving the previous configuration: {e}"
                );
                Err(e)
            }
        }
    }

    fn try_reload(&self, st: &AppState) -> Result<Reloaded, ConfigError> {
        let started_with = self.started_with.lock().unwrap_or_else(|p| p.into_inner());
        let (mut cfg, raw) = read(&self.path)?;
        (self.overrides)(&mut cfg)?;
        let credentials = cfg.resolve_credentials(&*self.env)?;
        // Gateway secrets are part of an upstream: read again, or a reload
        // would leave forward-auth refusing every check.
        cfg.resolve_forward_auth_secrets(&*self.env)?;
        let table = build_upstreams(&cfg, &credentials)?;
        cfg.check_not_self(self.listening)?;
        // Not reloaded, but checked as at start: a file accepted now must
        // not keep the proxy from starting next time.
        cfg.resolve_webhook_secrets(&*self.env)?;
        cfg.resolve_store_password(&*self.env)?;
        let default_policies = cfg.policies == Path::new("policies");
        crate::state_dir::check_policies(&cfg.policies).map_err(|e| ConfigError {
            file: cfg.file.clone(),
            message: format!("policies: {e}"),
        })?;
        let policies = crate::policy::Policies::load_or_default(&cfg.policies, default_policies)
            .map_err(|e| ConfigError {
                file: cfg.file.clone(),
                message: format!("policies: {e}"),
            })?;
        // Root keys, re-read from the state directory the proxy started with,
        // so `till keygen --rotate` and `till key retire` need no restart.
        let root_keys = match st.feed_signer.get() {
            Some(signer) => Some({
                // Checked again: the key set read now decides which tokens
                // are accepted, and the directory may have been opened up
                // since the start.
                crate::state_dir::check(signer.current().dir()).map_err(|e| ConfigError {
                    file: cfg.file.clone(),
                    message: format!("root keys: {e}"),
                })?;
                crate::token::keyset::KeySet::load(signer.current().dir()).map_err(|e| {
                    ConfigError {
                        file: cfg.file.clone(),
                        message: format!("root keys: {e}"),
                    }
                })?
            }),
            None => None,
        };
        let mut restart_needed = restart_only_changes(&started_with, &raw);
        // Edited policy files are not applied either (the decision cache
        // was built with the policies in force): say so, or an operator who
        // added a deny and got "reloaded" believes it applies.
        if policies.code() != st.verifier.policies().code()
            && !restart_needed.iter().any(|k| k == "policies")
        {
            restart_needed.push("policies".into());
            restart_needed.sort();
        }
        let mut names: Vec<String> = table.keys().cloned().collect();
        names.sort();
        // Under the lock: no other reload can swap between this read and
        // the swap below.
        let old = st.upstreams.0.load_full();
        let mut added = Vec::new();
        let mut changed = Vec::new();
        for name in &names {
            match old.get(name) {
                None => added.push(name.clone()),
                Some(o) if **o != *table[name] => changed.push(name.clone()),
                Some(_) => {}
            }
        }
        let mut removed: Vec<String> = old
            .keys()
            .filter(|k| !table.contains_key(*k))
            .cloned()
            .collect();
        removed.sort();
        st.upstreams.swap(table);
        if let (Some(ks), Some(signer)) = (root_keys, st.feed_signer.get()) {
            if st.verifier.keys().replace(ks.public()) {
                tracing::info!(
                    active = ks.active_id(),
                    "root key set changed: tokens are checked with the new set from now on"
                );
            }
            signer.replace(ks);
        }
        drop(started_with);
        Ok(Reloaded {
            reloaded: true,
            upstreams: names,
            added,
            removed,
            changed,
            restart_needed,
        })
    }
}

/// Keys other than `upstreams` whose value differs between two reads of
/// the file, one level deep (`limits.max_connections`, `alerts.webhooks`):
/// values are never shown, a webhook URL is a secret.
pub fn restart_only_changes(old: &toml::Table, new: &toml::Table) -> Vec<String> {
    let mut out = Vec::new();
    let empty = toml::Table::new();
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for k in keys {
        if k == "upstreams" {
            continue;
        }
        let (a, b) = (old.get(k), new.get(k));
        match (as_table(a, &empty), as_table(b, &empty)) {
            (Some(ta), Some(tb)) => {
                let sub: std::collections::BTreeSet<&String> = ta.keys().chain(tb.keys()).collect();
                for s in sub {
                    if ta.get(s) != tb.get(s) {
                        out.push(format!("{k}.{s}"));
                    }
                }
            }
            _ if a != b => out.push(k.clone()),
            _ => {}
        }
    }
    out
}

/// `v` as a table, a key left out reading as an empty one (so adding
/// `[limits]` with one key names that key); `None` for other values.
fn as_table<'a>(v: Option<&'a toml::Value>, empty: &'a toml::Table) -> Option<&'a toml::Table> {
    match v {
        None => Some(empty),
        Some(toml::Value::Table(t)) => Some(t),
        Some(_) => None,
    }
}

/// The answer to a refused reload: the error, and that nothing changed.
pub fn refused_message(e: &ConfigError) -> String {
    format!("{e}; still serving the previous configuration")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(s: &str) -> toml::Table {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn changed_keys_that_need_a_restart_are_named_without_values() {
        let old = table(
            "listen = \"127.0.0.1:1\"\n[limits]\nmax_connections = 5\n[upstreams.a]\nurl = \"http://x\"\n\
             [[alerts.webhooks]]\nurl = \"https://hooks.example/s3cret\"",
        );
        let new = table(
            "listen = \"127.0.0.1:2\"\n[limits]\nmax_connections = 6\nidle_timeout_secs = 9\n\
             [upstreams.a]\nurl = \"http://y\"\n[[alerts.webhooks]]\nurl = \"https://hooks.example/0ther\"\n\
             [audit]\nenabled = false",
        );
        let got = restart_only_changes(&old, &new);
        assert_eq!(
            got,
            [
                "alerts.webhooks",
                "audit.enabled",
                "limits.idle_timeout_secs",
                "limits.max_connections",
                "listen"
            ]
        );
        assert!(restart_only_changes(&old, &old).is_empty());
    }

    #[test]
    fn a_reload_is_refused_with_the_previous_message_kept() {
        let e = ConfigError {
            file: "till.toml".into(),
            message: "upstreams.a.credential: cannot read /k: gone".into(),
        };
        assert_eq!(
            refused_message(&e),
            "till.toml: upstreams.a.credential: cannot read /k: gone; still serving the previous configuration"
        );
    }

    #[test]
    fn read_parses_like_start_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("till.toml");
        std::fs::write(&p, "[upstreams.a]\nurl = \"http://127.0.0.1:9\"\n").unwrap();
        let (cfg, raw) = read(&p).unwrap();
        assert!(cfg.upstreams.contains_key("a") && raw.contains_key("upstreams"));
        std::fs::write(&p, "[upstreams.a\n").unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.starts_with(&p.display().to_string()), "{e}");
    }
}
