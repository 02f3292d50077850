//! A small service that checks Till tokens itself with `till-tower`: no
//! proxy in the request path, the revocation feed followed from a running
//! `till serve`.
//!
//! ```text
//! cargo run --release --example service -- \
//!     --listen 127.0.0.1:8090 --public-key "$(till pubkey)" \
//!     --feed http://127.0.0.1:8080/revocations --max-feed-age 60s
//! ```
//!
//! Routes: `GET /v1/items` and `POST /v1/items` behind the layer (service
//! name `items` by default: tokens need `--service items`), `/metrics`
//! (feed age and version) and `/healthz` outside it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use till_tower::{FeedSource, TillHandle, TillLayer, TillToken, UseLimits};

#[derive(Parser)]
#[command(about = "An example service that verifies Till tokens itself (till-tower)")]
struct Args {
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Root public key (`till pubkey`), or ID=KEY per key of a rotated set
    /// (`till pubkey --all`); repeat for several.
    #[arg(long = "public-key", env = "TILL_PUBLIC_KEY", required = true)]
    public_keys: Vec<String>,
    /// The signed revocation feed: a Till proxy's URL
    /// (http://HOST:PORT/revocations) or a file.
    #[arg(long)]
    feed: String,
    /// Also follow this key set URL (a proxy's /.well-known/till-keys).
    #[arg(long)]
    keys_url: Option<String>,
    /// Refuse every request (503) while the feed is older than this.
    #[arg(long, default_value = "60s", value_parser = duration)]
    max_feed_age: Duration,
    /// How often to fetch the feed.
    #[arg(long, default_value = "10s", value_parser = duration)]
    refresh_every: Duration,
    /// The service name tokens must be scoped to.
    #[arg(long, default_value = "items")]
    service: String,
    /// Tokens with use limits: refuse them (deny), ignore their limits
    /// (danger-ignore), or have the proxy count (remote, needs --check-url).
    #[arg(long, value_enum, default_value_t = Limits::Deny)]
    use_limits: Limits,
    /// The proxy's forward-auth URL for this service
    /// (http://HOST:PORT/auth/<service>), for --use-limits remote.
    #[arg(long)]
    check_url: Option<String>,
    /// Timeout of each feed, key set or remote-count request.
    #[arg(long, default_value = "5s", value_parser = duration)]
    timeout: Duration,
    /// File holding the proxy's forward_auth_secret for this service.
    #[arg(long)]
    gateway_secret_file: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Limits {
    Deny,
    DangerIgnore,
    Remote,
}

/// `200ms`, or what `till` accepts (`90s`, `10m`, `1h30m`).
fn duration(s: &str) -> Result<Duration, String> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .parse()
            .map(Duration::from_millis)
            .map_err(|_| format!("{s:?} is not a number of milliseconds"));
    }
    till::token::parse_duration(s).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let use_limits = match args.use_limits {
        Limits::Deny => UseLimits::Deny,
        Limits::DangerIgnore => UseLimits::DangerIgnoreUseLimits,
        Limits::Remote => {
            let Some(check_url) = args.check_url.clone() else {
                bail!(
                    "--use-limits remote needs --check-url http://HOST:PORT/auth/{}",
                    args.service
                );
            };
            let gateway_secret = match &args.gateway_secret_file {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?
                        .trim()
                        .to_string(),
                ),
                None => None,
            };
            UseLimits::Remote {
                check_url,
                gateway_secret,
            }
        }
    };
    let feed = if args.feed.starts_with("http://") || args.feed.starts_with("https://") {
        FeedSource::Url(args.feed.clone())
    } else {
        FeedSource::File(args.feed.clone().into())
    };
    let mut builder = TillLayer::builder(&args.service)
        .feed(feed)
        .max_feed_age(args.max_feed_age)
        .refresh_every(args.refresh_every)
        .timeout(args.timeout)
        .use_limits(use_limits);
    for k in &args.public_keys {
        builder = builder.public_key(k);
    }
    if let Some(u) = &args.keys_url {
        builder = builder.keys_url(u);
    }
    let (layer, handle) = builder.build()?;
    let handle = Arc::new(handle);

    let app = Router::new()
        .route("/v1/items", get(list).post(create))
        .layer(layer)
        .merge(
            Router::new()
                .route("/metrics", get(metrics))
                .route("/healthz", get(|| async { "ok" }))
                .with_state(handle.clone()),
        );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!("service: listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // The handle (and its refresh task) lives until here.
    drop(handle);
    Ok(())
}

/// Who called: what the layer verified.
fn caller(t: &TillToken) -> Value {
    json!({ "label": t.label(), "family": t.family(), "blocks": t.block_ids().len() })
}

async fn list(t: TillToken) -> Json<Value> {
    Json(json!({ "items": ["a", "b"], "caller": caller(&t) }))
}

async fn create(t: TillToken, Json(item): Json<Value>) -> (http::StatusCode, Json<Value>) {
    (
        http::StatusCode::CREATED,
        Json(json!({ "created": item, "caller": caller(&t) })),
    )
}

async fn metrics(State(h): State<Arc<TillHandle>>) -> String {
    h.render_prometheus()
}
