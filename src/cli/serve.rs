//! `till up` (defaults, one command) and `till serve --config FILE`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use crate::monitor::Monitor;
use crate::policy::Policies;
use crate::proxy::{self, AppState, Config, config};
use crate::store::{CounterStore, EmbeddedStore, RedisStore, RevocationList};
use crate::token::keyset::{KeySet, RootKeys, Signer};
use crate::token::{self, Scope, keys, vocab};
use crate::verify::Verifier;

/// File name of the admin token inside the state directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// File name of the config `till up` writes.
pub const CONFIG_FILE: &str = "till.toml";

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Address to listen on (overrides till.toml): IP:PORT, localhost:PORT or :PORT (loopback);
    /// port 0 picks a free one.
    #[arg(long, env = "TILL_LISTEN", value_parser = config::parse_listen)]
    pub listen: Option<SocketAddr>,
    /// Point an upstream at another URL, keeping its credential (repeatable), e.g.
    /// openai=http://127.0.0.1:11434 for a local OpenAI-compatible server. A built-in name
    /// (openai, anthropic, github) still gets OPENAI_API_KEY / ANTHROPIC_API_KEY / GITHUB_TOKEN.
    #[arg(long = "upstream", value_name = "NAME=URL")]
    pub upstreams: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The TOML config file (see README, "Configuration reference").
    #[arg(long, env = "TILL_CONFIG")]
    pub config: PathBuf,
    /// Address to listen on (overrides the config): IP:PORT, localhost:PORT or :PORT (loopback).
    #[arg(long, env = "TILL_LISTEN", value_parser = config::parse_listen)]
    pub listen: Option<SocketAddr>,
    /// Shared store, e.g. redis://127.0.0.1:6379/0 (overrides `store` in the config).
    // Hidden in --help: the URL can carry the Redis password.
    #[arg(long, env = "TILL_STORE", hide_env_values = true)]
    pub store: Option<String>,
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

/// Writes a secret file: a fresh 0600 temporary file, synced, renamed over
/// `path`, so a crash leaves no file or a whole one (an empty admin token
/// left by a crash used to be kept for good).
fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    crate::token::keyset::write_atomic(path, format!("{text}\n").as_bytes())?;
    Ok(())
}

/// Writes the till.toml `till up` creates: 0600 and written whole (a fresh
/// temporary file renamed), since whoever can change it chooses where the
/// credentials go.
fn write_config_file(path: &Path, text: &str) -> anyhow::Result<()> {
    crate::token::keyset::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// An admin token under the active root key.
pub(crate) fn admin_token(keys: &KeySet) -> anyhow::Result<String> {
    Ok(token::issue_as(
        keys.active_key(),
        keys.active_token_id(),
        &Scope {
            services: vec![vocab::ADMIN_SERVICE.into()],
            label: Some("admin".into()),
            ..Scope::default()
        },
    )?)
}

/// Writes `<state_dir>/admin.token` if it is missing or empty (what an
/// older till left when it was killed while writing it), so that
/// `till usage` and `till revoke` work against `till serve` as they do
/// against `till up`.
fn ensure_admin_token(state_dir: &Path, keys: &KeySet) -> anyhow::Result<()> {
    let admin_path = state_dir.join(ADMIN_TOKEN_FILE);
    let what = match std::fs::read_to_string(&admin_path) {
        Ok(t) if !t.trim().is_empty() => return Ok(()),
        Ok(_) => "re-created the empty admin token",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "created admin token",
        Err(e) => bail!("cannot read {}: {e}", admin_path.display()),
    };
    let t = admin_token(keys)?;
    write_secret(&admin_path, &t)?;
    eprintln!("till: {what} {}", admin_path.display());
    Ok(())
}

/// Creates what is missing in `home`: root key, admin token, till.toml.
/// A new till.toml listens on `listen` (`--listen` / `TILL_LISTEN`) when
/// given: the admin commands find the proxy through the file, and a file
/// naming the default address sent them to whatever else listens there.
fn bootstrap(home: &Path, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    crate::state_dir::create(home)?;
    let key_path = home.join(keys::ROOT_KEY_FILE);
    // After a rotation key 0 may be retired and its file shredded: the
    // index, not root.key, says whether there is a key.
    if !KeySet::exists(home)? {
        keys::save(&key_path, &keys::generate(), false)?;
        eprintln!("till: created root key {}", key_path.display());
    }
    ensure_admin_token(home, &KeySet::load(home)?)?;
    let cfg_path = home.join(CONFIG_FILE);
    if !cfg_path.exists() {
        let listen = listen.unwrap_or_else(config::default_listen);
        write_config_file(&cfg_path, &config::default_file(home, listen))?;
        eprintln!("till: created config {}", cfg_path.display());
    }
    Ok(())
}

pub fn up(home: &Path, a: UpArgs) -> anyhow::Result<ExitCode> {
    bootstrap(home, a.listen)?;
    let path = home.join(CONFIG_FILE);
    let home = home.to_path_buf();
    // Applied again by every reload, so a reload sees what a restart would.
    let overrides = move |cfg: &mut Config| -> Result<(), config::ConfigError> {
        cfg.state_dir = home.clone();
        let added = cfg.add_well_known_from_env(&env);
        cfg.apply_base_url_env(&added, &env)?;
        for spec in &a.upstreams {
            cfg.apply_upstream_flag(spec)?;
        }
        if let Some(l) = a.listen {
            cfg.listen = l;
        }
        Ok(())
    };
    start(path, Box::new(overrides))
}

pub fn serve(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let path = a.config.clone();
    // Applied again by every reload, so a reload sees what a restart would.
    let overrides = move |cfg: &mut Config| -> Result<(), config::ConfigError> {
        if let Some(l) = a.listen {
            cfg.listen = l;
        }
        if let Some(s) = &a.store {
            cfg.store = Some(s.clone());
            cfg.validate_store()?;
        }
        Ok(())
    };
    start(path, Box::new(overrides))
}

/// The counter store and revocation list chosen by `store`.
#[derive(Clone)]
enum Backend {
    Embedded(EmbeddedStore),
    Redis(RedisStore),
}

impl Backend {
    async fn gc_expired(&self, now: u64) -> Result<usize, crate::store::StoreError> {
        match self {
            Backend::Embedded(s) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || s.gc_expired(now))
                    .await
                    .map_err(|e| crate::store::StoreError::Io(e.to_string()))?
            }
            Backend::Redis(s) => s.collect_expired(now).await,
        }
    }
}

fn init_logging() {
    let level = match std::env::var("TILL_LOG").as_deref() {
        Ok("debug") => tracing::Level::DEBUG,
        Ok("trace") => tracing::Level::TRACE,
        Ok("warn") => tracing::Level::WARN,
        Ok("error") => tracing::Level::ERROR,
        _ => tracing::Level::INFO,
    };
    // Colour codes only make sense on a terminal: in a log file or a
    // journal they are noise (and NO_COLOR asks for none anywhere).
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}

/// Everything that can fail is checked before the listener is bound, so a
/// bad config exits 2 without ever listening.
fn start(path: PathBuf, overrides: proxy::reload::Overrides) -> anyhow::Result<ExitCode> {
    let (mut cfg, raw) = proxy::reload::read(&path)?;
    overrides(&mut cfg)?;
    init_logging();
    crate::state_dir::check(&cfg.state_dir)?;
    // Before anything is opened: descriptors beyond the old soft limit
    // would fail from the first connections on.
    super::open_files::raise_and_check(&cfg);
    let key_path = cfg.state_dir.join(keys::ROOT_KEY_FILE);
    if !KeySet::exists(&cfg.state_dir)? {
        bail!(
            "no root key at {}; run `till keygen` with TILL_HOME={} (or use `till up`)",
            key_path.display(),
            cfg.state_dir.display()
        );
    }
    let root_keys = KeySet::load(&cfg.state_dir)?;
    ensure_admin_token(&cfg.state_dir, &root_keys)?;
    let default_policies = cfg.policies == Path::new("policies");
    crate::state_dir::check_policies(&cfg.policies)
        .with_context(|| format!("{}: policies", cfg.file))?;
    let policies = Policies::load_or_default(&cfg.policies, default_policies)
        .with_context(|| format!("{}: policies", cfg.file))?;
    let credentials = cfg.resolve_credentials(&env)?;
    cfg.resolve_webhook_secrets(&env)?;
    cfg.resolve_forward_auth_secrets(&env)?;
    let store_password = cfg.resolve_store_password(&env)?;
    let verifier = Verifier::with_keys(RootKeys::new(root_keys.public()), policies);
    let public_key = keys::public_string(&root_keys.active_key().public());
    let key_summary = key_summary(&root_keys);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut listening = false;
    let store = match &cfg.store {
        None => {
            let s = EmbeddedStore::open(&cfg.state_dir)?;
            s.set_max_blocks_per_family(cfg.limits.max_blocks_per_family);
            Backend::Embedded(s)
        }
        Some(url) => {
            // TLS for rediss:// uses the process-wide provider.
            proxy::install_crypto();
            let s = rt.block_on(RedisStore::connect(url, store_password.as_deref()))?;
            // A Redis that lost its data since the last start would give
            // every spent token its uses back: refused, not accepted.
            crate::store::redis::marker::check_and_save(&cfg.state_dir, s.target(), s.store_id())?;
            s.set_max_blocks_per_family(cfg.limits.max_blocks_per_family);
            // An evicting Redis gives spent uses back under memory pressure
            // (which any token holder can cause): not a warning, a refusal.
            if let Some(w) = rt.block_on(s.check_eviction())? {
                tracing::warn!(redis = %s.target(), "{w}");
            }
            // Families an older version left unlisted (a proxy killed while
            // registering one) reach the usage view without waiting an hour
            // for the collector.
            let repair = s.clone();
            rt.spawn(async move {
                if let Err(e) = repair.repair_families().await {
                    tracing::warn!(error = %e, "looking for unlisted token families in redis failed; the hourly collector tries again");
                }
            });
            match rt.block_on(s.persistence_warning()) {
                Some(w) => tracing::warn!(redis = %s.target(), "{w}"),
                None => {
                    tracing::info!(redis = %s.target(), "shared store: redis with appendfsync always")
                }
            }
            Backend::Redis(s)
        }
    };
    let (counters, revocations): (Arc<dyn CounterStore>, Arc<dyn RevocationList>) = match &store {
        Backend::Embedded(s) => (Arc::new(s.clone()), Arc::new(s.clone())),
        Backend::Redis(s) => (Arc::new(s.clone()), Arc::new(s.clone())),
    };
    // No garbage collection at start: the clock has not yet had a chance to
    // be noticed as wrong. The collector runs an hour in, then hourly.
    let result = rt.block_on(async {
        let monitor = Monitor::start(&cfg.audit, &cfg.state_dir, cfg.alerts.clone())
            .context("cannot open the audit log")?;
        if let Backend::Embedded(s) = &store {
            let m = monitor.metrics.clone();
            s.set_commit_observer(Box::new(move |d, n| {
                m.commit_seconds.observe(d.as_secs_f64());
                m.commit_batch.observe(n as f64);
            }));
        }
        let state =
            AppState::with_monitor(&cfg, &credentials, verifier, counters, revocations, monitor)?;
        let _ = state.feed_signer.set(Arc::new(Signer::new(root_keys)));
        raise_clock_to_last_run(&state, &cfg.state_dir)?;
        tokio::spawn(proxy::clock_floor::keep_saving(
            state.clone(),
            cfg.state_dir.clone(),
        ));
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| listen_error(&cfg, cfg.listen, "listen", e))?;
        let addr = listener.local_addr()?;
        cfg.check_not_self(addr)?;
        let admin_listener = match cfg.admin_listen {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| listen_error(&cfg, a, "admin_listen", e))?,
            ),
            None => None,
        };
        let admin_addr = admin_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?;
        let reloader = Arc::new(proxy::reload::Reloader::new(
            path,
            overrides,
            Box::new(env),
            addr,
            raw,
        ));
        let _ = state.reloader.set(reloader.clone());
        // Before the banner: until a handler is installed, SIGHUP ends the
        // process.
        reload_on_sighup(state.clone(), reloader)?;
        let shutdown = shutdown_signal()?;
        listening = true;
        banner(
            &cfg,
            &credentials,
            addr,
            admin_addr,
            &public_key,
            key_summary.as_deref(),
        );
        let gc_store = store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            tick.tick().await;
            loop {
                tick.tick().await;
                match gc_store.gc_expired(crate::store::now_unix()).await {
                    Ok(removed) if removed > 0 => {
                        tracing::info!(removed, "retired the counters of long-expired tokens");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "garbage collection of counters failed")
                    }
                    _ => {}
                }
            }
        });
        proxy::run(listener, admin_listener, state, shutdown)
            .await
            .context("server error")
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    // A proxy that never listened did not "stop": its error (printed by
    // the caller) is the whole story.
    match &store {
        Backend::Embedded(s) => {
            s.close().context("closing the counter store")?;
            if listening {
                tracing::info!("stopped; counters flushed");
            }
        }
        Backend::Redis(s) => {
            s.close();
            if listening {
                tracing::info!("stopped");
            }
        }
    }
    result.map(|_| ExitCode::SUCCESS)
}

/// Starts the proxy's clock no earlier than the latest time the previous
/// run used ([`proxy::clock_floor`]), and says so when the wall clock is
/// behind it.
fn raise_clock_to_last_run(state: &AppState, dir: &Path) -> anyhow::Result<()> {
    let Some(last) = proxy::clock_floor::load(dir)? else {
        return Ok(());
    };
    let wall = crate::store::now_unix();
    state.clock.raise_to(last);
    if last > wall {
        tracing::warn!(
            behind_secs = last - wall,
            last_run = %crate::token::format_unix(last),
            "the wall clock is behind the latest time the previous run used: Till keeps that time until the clock catches up, so tokens that run saw expire stay expired. If the previous run's clock was wrong (ahead), stop Till, remove {} and start it again",
            proxy::clock_floor::path(dir).display()
        );
    }
    Ok(())
}

/// "0 verifying, 1 active" once there is more than one key.
fn key_summary(ks: &KeySet) -> Option<String> {
    let now = crate::store::now_unix();
    (ks.records().len() > 1).then(|| {
        ks.records()
            .iter()
            .map(|r| format!("{} {}", r.id, r.status(ks.active_id(), now)))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// Why `addr` (the config's `key`) cannot be listened on, and what to do.
fn listen_error(cfg: &Config, addr: SocketAddr, key: &str, e: std::io::Error) -> anyhow::Error {
    let flag = if key == "listen" {
        "--listen or `listen`"
    } else {
        "`admin_listen`"
    };
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "port {} is already in use (another till, or another program); stop it, or choose another port with {flag} in {}",
            addr.port(),
            cfg.file
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied: ports below 1024 need privileges; choose another port with {flag} in {}",
            cfg.file
        ),
        std::io::ErrorKind::AddrNotAvailable => format!(
            "this machine has no address {}; use 127.0.0.1 or one of its own addresses",
            addr.ip()
        ),
        _ => e.to_string(),
    };
    anyhow::anyhow!("cannot listen on {addr} ({key}): {hint}")
}

/// `kill -HUP`: reload like `POST /admin/reload`; the outcome is logged.
#[cfg(unix)]
fn reload_on_sighup(state: AppState, reloader: Arc<proxy::reload::Reloader>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let (st, r) = (state.clone(), reloader.clone());
            // The outcome is logged by `reload`; a refused reload leaves
            // the previous configuration in place.
            let _ = tokio::task::spawn_blocking(move || r.reload(&st, "SIGHUP")).await;
        }
    });
    Ok(())
}

#[cfg(not(unix))]
fn reload_on_sighup(
    _state: AppState,
    _reloader: Arc<proxy::reload::Reloader>,
) -> anyhow::Result<()> {
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now and returns the future that
/// resolves on either. Installed before the banner: a signal that came
/// between the banner and the first poll of a lazily installed handler
/// would end the process without the final flush (and exit code 0).
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
    })
}

fn banner(
    cfg: &Config,
    credentials: &std::collections::BTreeMap<String, Option<String>>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    public_key: &str,
    key_summary: Option<&str>,
) {
    use std::fmt::Write as _;
    let mut o = String::new();
    macro_rules! say {
        ($($t:tt)*) => {{
            let _ = writeln!(o, $($t)*);
        }};
    }
    let base = format!("http://{addr}");
    let admin = cfg.state_dir.join(ADMIN_TOKEN_FILE);
    say!("till: listening on {base}");
    if let Some(a) = admin_addr {
        say!("  admin plane: http://{a}  (admin API, /dashboard, /metrics; not on {base})");
    }
    say!("  public key:  {public_key}");
    if let Some(k) = key_summary {
        say!("  root keys:   {k}");
    }
    say!("  admin token: {}", admin.display());
    if cfg.upstreams.is_empty() {
        say!(
            "  upstreams:   none yet. Set OPENAI_API_KEY / ANTHROPIC_API_KEY / GITHUB_TOKEN and restart, or add [upstreams.NAME] to the config"
        );
    } else {
        for (name, u) in &cfg.upstreams {
            // Only whether a credential is there: never its value.
            let has_credential = credentials.get(name).is_some_and(Option::is_some);
            let note = match &u.credential {
                _ if has_credential => String::new(),
                Some(config::CredentialSource::None) => "  (no credential: credential = \"none\")".into(),
                Some(config::CredentialSource::Conventional(var)) => format!(
                    "  WARNING: NO CREDENTIAL, {var} is not set; requests go out without an API key (say credential = \"none\" in till.toml if that is meant)"
                ),
                _ => "  WARNING: NO CREDENTIAL configured; requests go out without an API key (add credential, or credential = \"none\" if that is meant)".into(),
            };
            say!("  upstream:    {base}/{name}/ -> {}{note}", u.url);
        }
    }
    // Redacted: a webhook URL carries its receiver's secret.
    for h in &cfg.alerts.webhooks {
        let format = match h.format {
            crate::monitor::alerts::Format::Json => "json",
            crate::monitor::alerts::Format::Slack => "slack",
        };
        let signed = if h.signing_key.is_some() {
            "signed"
        } else {
            "unsigned"
        };
        println!("  webhook:     {} ({format}, {signed})", h.redacted());
    }
    let svc = cfg
        .upstreams
        .keys()
        .next()
        .map(String::as_str)
        .unwrap_or("openai");
    // `till issue` finds the root key through TILL_HOME: name the state
    // directory unless it is the default one.
    let home = if cfg.state_dir == Path::new(".till") {
        String::new()
    } else {
        format!(
            "TILL_HOME={} ",
            shell_word(&cfg.state_dir.display().to_string())
        )
    };
    say!("  try it:");
    say!(
        "    {home}till issue --service {svc} --max-uses 100 --ttl 24h --label my-agent > agent.token"
    );
    let curl = match svc {
        "anthropic" => format!(
            "curl {base}/anthropic/v1/messages -H \"x-api-key: $(cat agent.token)\" -H 'anthropic-version: 2023-06-01' -H 'content-type: application/json' -d '{{\"model\":\"claude-3-5-haiku-latest\",\"max_tokens\":64,\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'"
        ),
        "github" => {
            format!("curl {base}/github/user -H \"Authorization: Bearer $(cat agent.token)\"")
        }
        _ => format!(
            "curl {base}/{svc}/v1/chat/completions -H \"Authorization: Bearer $(cat agent.token)\" -H 'content-type: application/json' -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'"
        ),
    };
    say!("    {curl}");
    say!(
        "    python: OpenAI(base_url=\"{base}/openai/v1\", api_key=open(\"agent.token\").read().strip())  # with an openai upstream"
    );
    // A closed stdout (`till up | head -1`) must not stop the proxy.
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(o.as_bytes()).and_then(|()| out.flush());
}

/// Quotes `s` for a POSIX shell when it holds anything but safe characters.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:@%,=".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
