//! Load benchmark: Till against a minimal forwarding proxy, in one run.
//!
//! ```text
//! cargo bench --bench load -- --seconds 10          # HTTP + SSE comparison
//! cargo bench --bench load -- --families 1000000    # store size and RSS
//! cargo bench --bench load -- --redis --seconds 10  # till on Redis
//! ```
//!
//! The HTTP run starts four processes on 127.0.0.1 (this binary re-executed
//! with `--role upstream`, `--role baseline` and `--role hyper-baseline`, and
//! the real `till serve`) and drives each of them with the same closed-loop
//! load from this process:
//!
//! * **direct**: the local upstream itself (a small JSON answer, or an SSE
//!   stream of `--sse-chunks` events `--sse-interval-ms` apart);
//! * **baseline**: a minimal forwarding proxy written for this benchmark, no
//!   authorization: axum + reqwest, forwarding like `src/proxy/forward.rs`
//!   (same hop-by-hop filtering, credential injection, streamed answer);
//! * **hyper-baseline**: the same proxy on hyper alone (hyper's HTTP/1
//!   server, `hyper_util`'s pooled client with an idle pool as large as
//!   the overload phase's connections): the floor issue 15's targets are
//!   ratios against;
//! * **till**: `till serve` with durable counters (group commit), the
//!   default policy and the default audit log, and a 3-block token with
//!   large use limits (`till issue` + `till attenuate` twice).
//!
//! Phases: `--connections` (64) keep-alive connections for `--seconds`, then
//! 1 connection for `--seconds` (latency), then SSE streams over 1
//! connection, then (unless `--no-overload`) the hyper baseline and Till at
//! 4× the connections (false denials, and p99 at equal overload). Each
//! phase first runs `--warmup` seconds unrecorded. With `--syscalls`,
//! `perf stat` counts each server's system calls and context switches
//! during the throughput phase (needs `perf` and tracepoint access).
//! Latencies go into HdrHistograms; CPU per request comes from
//! `/proc/PID/stat` of each server process (the issue-15 summary splits it
//! into user and system time). Every process, this one included, runs one
//! tokio worker per core; `TOKIO_WORKER_THREADS=1` in the environment gives
//! each of them a single worker, which shows how much of a proxy's CPU is
//! cores sharing its data rather than its own work. Only 127.0.0.1 is ever a target;
//! every loop stops at its deadline or after `MAX_REQUESTS_PER_PHASE`.
//!
//! The `--redis` mode starts a `redis-server` (AOF, `appendfsync always`,
//! the recommended settings) and compares, in one run, both baselines, Till
//! on its embedded store and Till on Redis (throughput, latency at 1
//! connection), then two Till processes sharing that Redis; it reads
//! `INFO commandstats` around Till-on-Redis's throughput and 1-connection
//! phases to report the Redis commands each request costs (and, under
//! load, how many requests share one script call).
//!
//! The `--families N` mode reserves one activation for each of N distinct
//! token families in an embedded store (as the proxy does: counters plus
//! block metadata), then reopens the store in a fresh process and reports
//! the file size, the RSS of both processes and the reopen time.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use axum::serve::ListenerExt;
use futures_util::TryStreamExt;
use hdrhistogram::Histogram;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use till::store::{BlockMeta, CounterSpec, CounterStore, EmbeddedStore};

/// Hard cap on the requests of one phase (the loops are also time-bounded).
const MAX_REQUESTS_PER_PHASE: u64 = 20_000_000;
/// Time allowed for one request or one SSE stream before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CHAT_PATH: &str = "/v1/chat/completions";
const REQUEST_BODY: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}],"max_tokens":16}"#;
const RESPONSE_BODY: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hi!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#;
/// The credential the proxies inject (the upstream ignores it).
const UPSTREAM_KEY_ENV: &str = "TILL_BENCH_UPSTREAM_KEY";

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Args {
    role: Option<String>,
    upstream: Option<String>,
    seconds: f64,
    warmup: f64,
    connections: usize,
    sse_chunks: u32,
    sse_interval_ms: u64,
    overload: bool,
    audit: bool,
    families: Option<u64>,
    family_blocks: usize,
    dir: Option<PathBuf>,
    till: Option<PathBuf>,
    perf: Option<PathBuf>,
    syscalls: bool,
    cache_mib: Option<usize>,
    redis: bool,
    windows: bool,
}

const HELP: &str = "\
load benchmark: direct upstream vs minimal proxies (axum+reqwest, hyper) vs till serve

USAGE: cargo bench --bench load -- [OPTIONS]

  --seconds S          measured seconds per phase (default 10)
  --warmup S           unrecorded seconds before each phase (default 1)
  --connections N      connections of the throughput phase (default 64)
  --sse-chunks N       events per SSE stream (default 20)
  --sse-interval-ms M  delay between SSE events at the upstream (default 5)
  --no-overload        skip the overload phase (hyper-baseline and till at 4x the connections)
  --no-audit           run till with its audit log disabled
  --windows            give every block of till's token a rate window (never full at
                       this load) and the last one a concurrency cap of 1024
  --till PATH          till binary (default: the one cargo built for this bench)
  --perf FILE          `perf record --call-graph dwarf` of till during its
                       throughput phase (read with `perf report -i FILE`), and of
                       the hyper baseline during its own into FILE.hyper-baseline
  --syscalls           count each proxy's system calls and context switches per
                       request in the throughput phase (`perf stat`; needs perf
                       and access to its syscall tracepoints)
  --redis              instead: baselines vs till embedded vs till on Redis (needs
                       redis-server), and 2 till processes sharing one Redis
  --families N         instead: counters for N token families, store size and RSS
  --family-blocks K    blocks (counters) per family in --families mode (default 1)
  --dir D              in --families mode: fill the store in D and keep it (time
                       reopens with `--role reopen --dir D`)
";

fn parse_args() -> Args {
    let mut a = Args {
        role: None,
        upstream: None,
        seconds: 10.0,
        warmup: 1.0,
        connections: 64,
        sse_chunks: 20,
        sse_interval_ms: 5,
        overload: true,
        audit: true,
        families: None,
        family_blocks: 1,
        dir: None,
        till: None,
        perf: None,
        syscalls: false,
        cache_mib: None,
        redis: false,
        windows: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .unwrap_or_else(|| die(&format!("{name} needs a value")))
        };
        let num = |name: &str, v: String| -> f64 {
            v.parse()
                .unwrap_or_else(|_| die(&format!("{name}: {v:?} is not a number")))
        };
        match arg.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--role" => a.role = Some(val("--role")),
            "--upstream" => a.upstream = Some(val("--upstream")),
            "--dir" => a.dir = Some(val("--dir").into()),
            "--cache-mib" => a.cache_mib = Some(num("--cache-mib", val("--cache-mib")) as usize),
            "--seconds" => a.seconds = num("--seconds", val("--seconds")),
            "--warmup" => a.warmup = num("--warmup", val("--warmup")),
            "--connections" => a.connections = num("--connections", val("--connections")) as usize,
            "--sse-chunks" => a.sse_chunks = num("--sse-chunks", val("--sse-chunks")) as u32,
            "--sse-interval-ms" => {
                a.sse_interval_ms = num("--sse-interval-ms", val("--sse-interval-ms")) as u64
            }
            "--no-overload" => a.overload = false,
            "--no-audit" => a.audit = false,
            "--redis" => a.redis = true,
            "--windows" => a.windows = true,
            "--till" => a.till = Some(val("--till").into()),
            "--perf" => a.perf = Some(val("--perf").into()),
            "--syscalls" => a.syscalls = true,
            "--families" => a.families = Some(num("--families", val("--families")) as u64),
            "--family-blocks" => {
                a.family_blocks = num("--family-blocks", val("--family-blocks")) as usize
            }
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            other => die(&format!("unknown argument {other:?}\n\n{HELP}")),
        }
    }
    if !(a.seconds > 0.0 && a.seconds <= 600.0) {
        die("--seconds must be in (0, 600]");
    }
    if a.connections == 0 || a.connections > 1024 {
        die("--connections must be in [1, 1024]");
    }
    if a.family_blocks == 0 || a.family_blocks > 16 {
        die("--family-blocks must be in [1, 16]");
    }
    a
}

fn die(msg: &str) -> ! {
    eprintln!("load: {msg}");
    std::process::exit(2);
}

// Every process of the benchmark (upstream, baseline proxy, load client)
// uses the allocator `till` uses, so the comparison is of the proxies, not
// of allocators.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args = parse_args();
    match args.role.as_deref() {
        Some("upstream") => serve_role(upstream_router()),
        Some("baseline") => {
            let up = args
                .upstream
                .clone()
                .unwrap_or_else(|| die("--role baseline needs --upstream URL"));
            serve_role(baseline_router(up))
        }
        Some("hyper-baseline") => {
            let up = args
                .upstream
                .clone()
                .unwrap_or_else(|| die("--role hyper-baseline needs --upstream URL"));
            hyper_baseline_role(&up, args.connections)
        }
        Some("reopen") => reopen_role(args.dir.as_deref().unwrap_or_else(|| die("--dir"))),
        Some("scan") => scan_role(
            args.dir.as_deref().unwrap_or_else(|| die("--dir")),
            args.cache_mib,
        ),
        Some(other) => die(&format!("unknown role {other:?}")),
        None if args.families.is_some() => families_mode(&args),
        None if args.redis => redis_mode(&args),
        None => http_mode(&args),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    // Same shape as `till serve`: a multi-thread runtime, one worker per core.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A child role's listener on 127.0.0.1:0, its address printed for the
/// parent; the process exits when its stdin closes, so no child outlives a
/// crashed parent.
async fn child_listener() -> tokio::net::TcpListener {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("listening on {}", listener.local_addr().unwrap());
    std::io::stdout().flush().unwrap();
    tokio::spawn(async {
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await;
        std::process::exit(0);
    });
    listener
}

/// Child process: serve `app` on 127.0.0.1:0, print the address, run until
/// killed (or until stdin closes, so no child outlives a crashed parent).
///
/// Accepted sockets get TCP_NODELAY, as in `till serve` (src/proxy/server.rs)
/// and any real API: without it, SSE events can wait up to 40 ms for a
/// delayed ACK (Nagle).
fn serve_role(app: axum::Router) {
    runtime().block_on(async move {
        let listener = child_listener().await;
        let listener = listener.tap_io(move |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app).await.expect("serve");
    });
}

// ---------------------------------------------------------------------------
// The local upstream
// ---------------------------------------------------------------------------

fn upstream_router() -> axum::Router {
    axum::Router::new().fallback(upstream)
}

/// Any path: a small JSON answer, or with `?sse=N&ms=M` an event stream of N
/// events M ms apart (the first one at once), then `data: [DONE]`.
async fn upstream(req: Request) -> Response {
    let query = req.uri().query().unwrap_or("").to_string();
    // Read the request body, as a real API would.
    let _ = axum::body::to_bytes(req.into_body(), 1 << 20).await;
    let param = |k: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(n, _)| *n == k)
            .and_then(|(_, v)| v.parse::<u64>().ok())
    };
    match param("sse") {
        None => Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(RESPONSE_BODY))
            .unwrap(),
        Some(n) => {
            let interval = Duration::from_millis(param("ms").unwrap_or(5));
            let stream = futures_util::stream::unfold(0u64, move |i| async move {
                if i > n {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                let chunk = if i == n {
                    "data: [DONE]\n\n".to_string()
                } else {
                    format!(
                        "data: {{\"id\":\"chatcmpl-bench\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i}\"}}}}]}}\n\n"
                    )
                };
                Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), i + 1))
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .header(header::CACHE_CONTROL, "no-cache")
                .body(Body::from_stream(stream))
                .unwrap()
        }
    }
}

// ---------------------------------------------------------------------------
// The baseline: a minimal forwarding proxy without authorization
// ---------------------------------------------------------------------------

struct Baseline {
    base: String,
    client: reqwest::Client,
    credential: HeaderValue,
}

fn baseline_router(upstream: String) -> axum::Router {
    till::proxy::install_crypto();
    // The same client settings as `AppState::with_monitor`.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(300))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let mut credential = HeaderValue::from_static("Bearer sk-bench-upstream-key");
    credential.set_sensitive(true);
    axum::Router::new()
        .fallback(baseline)
        .with_state(Arc::new(Baseline {
            base: upstream.trim_end_matches('/').to_string(),
            client,
            credential,
        }))
}

fn skip_request_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "authorization"
            | "x-api-key"
    )
}

fn skip_response_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// The baselines' upstream URL for `/service/rest?query`: `base` + `rest?query`.
fn upstream_url(base: &str, uri: &http::Uri) -> String {
    let rest = uri
        .path()
        .strip_prefix('/')
        .and_then(|p| p.find('/').map(|i| &p[i..]))
        .unwrap_or("/");
    let mut url = String::with_capacity(base.len() + rest.len() + 64);
    url.push_str(base);
    url.push_str(rest);
    if let Some(q) = uri.query() {
        url.push('?');
        url.push_str(q);
    }
    url
}

/// `/service/rest?query` → upstream `rest?query`, body read (it is small
/// JSON here, as Till reads JSON bodies to find the model), answer streamed.
async fn baseline(State(b): State<Arc<Baseline>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let url = upstream_url(&b.base, &parts.uri);
    let mut headers = HeaderMap::with_capacity(parts.headers.len() + 1);
    for (name, value) in parts.headers.iter() {
        if !skip_request_header(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(header::AUTHORIZATION, b.credential.clone());
    let Ok(body) = axum::body::to_bytes(body, 8 << 20).await else {
        return status(StatusCode::BAD_REQUEST);
    };
    let resp = match b
        .client
        .request(parts.method, url)
        .headers(headers)
        .body(body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(_) => return status(StatusCode::BAD_GATEWAY),
    };
    let mut out = Response::builder().status(resp.status());
    if let Some(h) = out.headers_mut() {
        for (name, value) in resp.headers().iter() {
            if !skip_response_header(name) {
                h.append(name.clone(), value.clone());
            }
        }
    }
    let stream = resp.bytes_stream().map_err(std::io::Error::other);
    out.body(Body::from_stream(stream))
        .unwrap_or_else(|_| status(StatusCode::BAD_GATEWAY))
}

// ---------------------------------------------------------------------------
// The hyper baseline: the same proxy on hyper's own server and client
// ---------------------------------------------------------------------------

type HyperClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;
type HyperBody = http_body_util::Either<hyper::body::Incoming, http_body_util::Empty<Bytes>>;

struct HyperBaseline {
    /// `http://host:port`, prepended to each request's rest of path.
    base: String,
    client: HyperClient,
    credential: HeaderValue,
}

/// Child process: the floor a forwarding proxy can reach on this machine.
/// hyper's HTTP/1 server and `hyper_util`'s pooled client (no reqwest, no
/// axum router), doing the baseline's work: hop-by-hop filtering,
/// credential injection, request body read, answer streamed unbuffered.
fn hyper_baseline_role(upstream: &str, connections: usize) {
    use hyper_util::client::legacy::{Client, connect::HttpConnector};
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    runtime().block_on(async move {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            // Every client connection (4x in the overload phase) keeps its
            // own upstream connection warm.
            .pool_max_idle_per_host(connections * 4 + 16)
            .build(http);
        let mut credential = HeaderValue::from_static("Bearer sk-bench-upstream-key");
        credential.set_sensitive(true);
        let state = Arc::new(HyperBaseline {
            base: upstream.trim_end_matches('/').to_string(),
            client,
            credential,
        });
        let listener = child_listener().await;
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(hyper_forward(&state, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
}

async fn hyper_forward(
    b: &HyperBaseline,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<HyperBody> {
    let fail = |s: StatusCode| {
        let mut r = http::Response::new(HyperBody::Right(http_body_util::Empty::new()));
        *r.status_mut() = s;
        r
    };
    let (parts, body) = req.into_parts();
    let uri = upstream_url(&b.base, &parts.uri);
    let Ok(uri) = http::Uri::try_from(uri) else {
        return fail(StatusCode::BAD_REQUEST);
    };
    let mut headers = HeaderMap::with_capacity(parts.headers.len() + 1);
    for (name, value) in parts.headers.iter() {
        if !skip_request_header(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(header::AUTHORIZATION, b.credential.clone());
    let body = match http_body_util::Limited::new(body, 8 << 20).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return fail(StatusCode::BAD_REQUEST),
    };
    let mut out = http::Request::new(Full::new(body));
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.headers_mut() = headers;
    let resp = match b.client.request(out).await {
        Ok(r) => r,
        Err(_) => return fail(StatusCode::BAD_GATEWAY),
    };
    let (mut rp, rb) = resp.into_parts();
    let names: Vec<HeaderName> = rp
        .headers
        .keys()
        .filter(|n| skip_response_header(n))
        .cloned()
        .collect();
    for n in names {
        rp.headers.remove(n);
    }
    http::Response::from_parts(rp, HyperBody::Left(rb))
}

fn status(s: StatusCode) -> Response {
    Response::builder().status(s).body(Body::empty()).unwrap()
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// A server process, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time a process has used, split into user space and kernel: a proxy
/// that costs more system time per request than another with the same
/// system calls is waking more, not computing more.
#[derive(Clone, Copy, Default)]
struct Cpu {
    user: Duration,
    system: Duration,
}

impl Cpu {
    fn total(self) -> Duration {
        self.user + self.system
    }
    fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// utime and stime of a process, from /proc/PID/stat (USER_HZ is 100 on Linux).
fn proc_cpu(pid: u32) -> Cpu {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Cpu::default();
    };
    // Fields after the command name (which may hold spaces) start at ")".
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after ")".
    Cpu {
        user: Duration::from_millis(ticks(11) * 10),
        system: Duration::from_millis(ticks(12) * 10),
    }
}

/// Reads lines from a child's stdout until one contains `marker`, returning
/// the rest of that line; keeps draining stdout afterwards.
fn wait_for_line(child: &mut Child, marker: &str, what: &str) -> String {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let m = marker.to_string();
    std::thread::spawn(move || {
        let mut found = false;
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if !found && let Some(i) = line.find(&m) {
                found = true;
                let _ = tx.send(line[i + m.len()..].trim().to_string());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| {
            die(&format!(
                "{what} did not start (no {marker:?} line within 30 s)"
            ))
        })
}

fn spawn_role(name: &'static str, role: &str, extra: &[&str]) -> Server {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .arg("--role")
        .arg(role)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| die(&format!("cannot start the {name}: {e}")));
    let addr = wait_for_line(&mut child, "listening on ", name)
        .parse()
        .unwrap_or_else(|e| die(&format!("{name}: bad address: {e}")));
    Server { child, addr }
}

fn till_binary(args: &Args) -> PathBuf {
    if let Some(p) = &args.till {
        return p.clone();
    }
    // Set by cargo for benches: the `till` binary built with this profile.
    let built = PathBuf::from(env!("CARGO_BIN_EXE_till"));
    if built.exists() {
        return built;
    }
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/till");
    if !release.exists() {
        eprintln!("load: building the release binary (cargo build --release)");
        let ok = Command::new(env!("CARGO"))
            .args(["build", "--release", "--bin", "till"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            die("cargo build --release failed");
        }
    }
    release
}

/// Runs `till ARGS` in `home`, with `stdin`, and returns its trimmed stdout.
fn till_cmd(bin: &Path, home: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let mut c = Command::new(bin)
        .args(args)
        .env("TILL_HOME", home)
        .env_remove("TILL_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| die(&format!("cannot run {}: {e}", bin.display())));
    {
        let mut i = c.stdin.take().unwrap();
        if let Some(s) = stdin {
            i.write_all(s.as_bytes()).unwrap();
        }
    }
    let out = c.wait_with_output().unwrap();
    if !out.status.success() {
        die(&format!(
            "till {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Sets up a TILL_HOME (root key, config) and a 3-block token, starts
/// `till serve`, and returns the server and the token.
fn start_till(args: &Args, home: &Path, upstream: SocketAddr) -> (Server, String) {
    let bin = till_binary(args);
    till_cmd(&bin, home, &["keygen"], None);
    // `--windows`: windows far above the load (tens of thousands of req/s),
    // so they cost their check and never refuse.
    let with = |base: &[&'static str], windows: &[&'static str]| -> Vec<&'static str> {
        let mut v = base.to_vec();
        if args.windows {
            v.extend_from_slice(windows);
        }
        v
    };
    let root = till_cmd(
        &bin,
        home,
        &with(
            &[
                "issue",
                "--service",
                "openai",
                "--method",
                "POST",
                "--path",
                "/v1/",
                "--max-uses",
                "1000000000",
                "--ttl",
                "24h",
                "--label",
                "bench-operator",
            ],
            &["--rate", "100000/1s"],
        ),
        None,
    );
    let child = till_cmd(
        &bin,
        home,
        &with(
            &[
                "attenuate",
                "--path",
                "/v1/chat/",
                "--max-uses",
                "100000000",
                "--label",
                "bench-agent",
            ],
            &["--rate", "100000/2s"],
        ),
        Some(&root),
    );
    let token = till_cmd(
        &bin,
        home,
        &with(
            &[
                "attenuate",
                "--model",
                "gpt-4o-mini",
                "--max-uses",
                "10000000",
                "--ttl",
                "12h",
            ],
            &["--rate", "100000/1s", "--concurrency", "1024"],
        ),
        Some(&child),
    );
    (spawn_till(args, home, upstream, ""), token)
}

/// Starts `till serve` in `home` (which has a root key) forwarding to
/// `upstream`, with `extra` top-level config lines (e.g. `store = ...`).
fn spawn_till(args: &Args, home: &Path, upstream: SocketAddr, extra: &str) -> Server {
    let bin = till_binary(args);
    let config = home.join("till.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {home:?}\n{extra}\n\n[upstreams.openai]\nurl = \"http://{upstream}\"\ncredential = {{ env = \"{UPSTREAM_KEY_ENV}\" }}\n\n[audit]\nenabled = {audit}\n",
            home = home.display().to_string(),
            audit = args.audit,
        ),
    )
    .unwrap();
    let stderr = std::fs::File::create(home.join("till.stderr")).unwrap();
    // The working directory has no policies/ folder: the built-in default
    // policy applies.
    let mut c = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(&config)
        .current_dir(home)
        .env("TILL_HOME", home)
        .env(UPSTREAM_KEY_ENV, "sk-bench-upstream-key")
        .env("TILL_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| die(&format!("cannot start till serve: {e}")));
    let url = wait_for_line(&mut c, "till: listening on http://", "till serve");
    let addr = url
        .parse()
        .unwrap_or_else(|e| die(&format!("till serve: bad address {url:?}: {e}")));
    Server { child: c, addr }
}

// ---------------------------------------------------------------------------
// The load generator: hyper HTTP/1.1 connections, closed loop
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// Path prefix of the upstream through this target ("" or "/openai").
    prefix: &'static str,
    token: Option<Arc<str>>,
    /// The server process, for CPU accounting.
    pid: u32,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn request(t: &Target, query: &str) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::post(format!("{}{CHAT_PATH}{query}", t.prefix))
        .header(header::HOST, t.addr.to_string())
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(tok) = &t.token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {tok}"));
    }
    b.body(Full::new(Bytes::from_static(REQUEST_BODY.as_bytes())))
        .unwrap()
}

fn histogram() -> Histogram<u64> {
    // Nanoseconds, 1 ns to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()
}

#[derive(Default)]
struct Errors {
    /// Answers other than 200, by status.
    statuses: BTreeMap<u16, u64>,
    /// Connection failures and timeouts.
    transport: u64,
    first: Option<String>,
}

impl Errors {
    fn total(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.transport
    }
    fn merge(&mut self, o: Errors) {
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.transport += o.transport;
        if self.first.is_none() {
            self.first = o.first;
        }
    }
    fn describe(&self) -> String {
        if self.total() == 0 {
            return "0".into();
        }
        let mut parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{n}x{s}"))
            .collect();
        if self.transport > 0 {
            parts.push(format!("{}x transport", self.transport));
        }
        parts.join(" ")
    }
}

struct PhaseResult {
    target: &'static str,
    connections: usize,
    requests: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
    errors: Errors,
    server_cpu: Cpu,
    client_cpu: Cpu,
}

impl PhaseResult {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn q_us(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
    fn per_req_us(&self, d: Duration) -> f64 {
        d.as_secs_f64() * 1e6 / self.requests.max(1) as f64
    }
    fn cpu_per_req_us(&self) -> f64 {
        self.per_req_us(self.server_cpu.total())
    }
    /// The server's CPU per request as "user + system µs".
    fn cpu_split(&self) -> String {
        format!(
            "{:.1} user + {:.1} system",
            self.per_req_us(self.server_cpu.user),
            self.per_req_us(self.server_cpu.system)
        )
    }
}

/// One connection's closed loop: send, read the whole answer, record, repeat
/// until `deadline`. Requests before `record_from` are not recorded.
async fn worker(
    t: Target,
    record_from: Instant,
    deadline: Instant,
    budget: Arc<AtomicU64>,
) -> (Histogram<u64>, u64, Errors) {
    let mut hist = histogram();
    let mut n = 0u64;
    let mut errors = Errors::default();
    let mut sender: Option<Sender> = None;
    while Instant::now() < deadline {
        if budget.fetch_sub(1, Ordering::Relaxed) == 0 {
            break;
        }
        let s = match &mut sender {
            Some(s) => s,
            None => match connect(t.addr).await {
                Ok(s) => sender.insert(s),
                Err(e) => {
                    errors.transport += 1;
                    errors.first.get_or_insert(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let started = Instant::now();
        let result = tokio::time::timeout(REQUEST_TIMEOUT, async {
            s.ready().await.map_err(|e| e.to_string())?;
            let resp = s
                .send_request(request(&t, ""))
                .await
                .map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        })
        .await;
        let done = Instant::now();
        let recording = started >= record_from;
        match result {
            Ok(Ok((status, body))) => {
                if status == StatusCode::OK {
                    if recording {
                        hist.saturating_record(done.duration_since(started).as_nanos() as u64);
                        n += 1;
                    }
                } else {
                    *errors.statuses.entry(status.as_u16()).or_default() += 1;
                    errors.first.get_or_insert_with(|| {
                        format!("{status}: {}", String::from_utf8_lossy(&body))
                    });
                }
            }
            Ok(Err(e)) => {
                errors.transport += 1;
                errors.first.get_or_insert(e);
                sender = None;
            }
            Err(_) => {
                errors.transport += 1;
                errors.first.get_or_insert("timeout".into());
                sender = None;
            }
        }
    }
    (hist, n, errors)
}

async fn run_phase(t: &Target, connections: usize, warmup: f64, seconds: f64) -> PhaseResult {
    let start = Instant::now();
    let record_from = start + Duration::from_secs_f64(warmup);
    let deadline = record_from + Duration::from_secs_f64(seconds);
    let budget = Arc::new(AtomicU64::new(MAX_REQUESTS_PER_PHASE));
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(worker(t.clone(), record_from, deadline, budget.clone())))
        .collect();
    // CPU is sampled over the recorded window only.
    tokio::time::sleep_until(record_from.into()).await;
    let (s0, c0) = (proc_cpu(t.pid), proc_cpu(std::process::id()));
    let mut hist = histogram();
    let mut requests = 0;
    let mut errors = Errors::default();
    let mut sampled = None;
    for task in tasks {
        let (h, n, e) = task.await.expect("worker");
        if sampled.is_none() {
            // The first worker ends at the deadline: sample CPU there.
            sampled = Some((
                proc_cpu(t.pid),
                proc_cpu(std::process::id()),
                Instant::now(),
            ));
        }
        hist.add(&h).unwrap();
        requests += n;
        errors.merge(e);
    }
    let (s1, c1, end) = sampled.unwrap_or((s0, c0, Instant::now()));
    PhaseResult {
        target: t.name,
        connections,
        requests,
        elapsed: end.max(deadline).duration_since(record_from),
        hist,
        errors,
        server_cpu: s1.since(s0),
        client_cpu: c1.since(c0),
    }
}

struct SseResult {
    target: &'static str,
    streams: u64,
    ttfc: Histogram<u64>,
    gaps: Histogram<u64>,
    /// Data frames received per stream (chunks merged by buffering lower it).
    frames: u64,
    errors: Errors,
}

/// Sequential SSE streams over one connection for `seconds` (at most 10,000).
async fn run_sse(t: &Target, args: &Args) -> SseResult {
    let query = format!("?sse={}&ms={}", args.sse_chunks, args.sse_interval_ms);
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut r = SseResult {
        target: t.name,
        streams: 0,
        ttfc: histogram(),
        gaps: histogram(),
        frames: 0,
        errors: Errors::default(),
    };
    let mut sender: Option<Sender> = None;
    let mut warm = 3; // first streams unrecorded
    while Instant::now() < deadline && r.streams < 10_000 {
        let s = match &mut sender {
            Some(s) => s,
            None => match connect(t.addr).await {
                Ok(s) => sender.insert(s),
                Err(e) => {
                    r.errors.transport += 1;
                    r.errors.first.get_or_insert(e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let started = Instant::now();
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, async {
            s.ready().await.map_err(|e| e.to_string())?;
            let resp = s
                .send_request(request(t, &query))
                .await
                .map_err(|e| e.to_string())?;
            if resp.status() != StatusCode::OK {
                return Ok(Err(resp.status().as_u16()));
            }
            let mut body = resp.into_body();
            let mut times = Vec::with_capacity(args.sse_chunks as usize + 2);
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| e.to_string())?;
                if frame.data_ref().is_some_and(|d| !d.is_empty()) {
                    times.push(Instant::now());
                }
            }
            Ok::<_, String>(Ok(times))
        })
        .await;
        match outcome {
            Ok(Ok(Ok(times))) => {
                if warm > 0 {
                    warm -= 1;
                    continue;
                }
                r.streams += 1;
                r.frames += times.len() as u64;
                if let Some(first) = times.first() {
                    r.ttfc
                        .saturating_record(first.duration_since(started).as_nanos() as u64);
                }
                for w in times.windows(2) {
                    r.gaps
                        .saturating_record(w[1].duration_since(w[0]).as_nanos() as u64);
                }
            }
            Ok(Ok(Err(status))) => {
                *r.errors.statuses.entry(status).or_default() += 1;
            }
            Ok(Err(e)) => {
                r.errors.transport += 1;
                r.errors.first.get_or_insert(e);
                sender = None;
            }
            Err(_) => {
                r.errors.transport += 1;
                r.errors.first.get_or_insert("timeout".into());
                sender = None;
            }
        }
    }
    r
}

// ---------------------------------------------------------------------------
// The HTTP run
// ---------------------------------------------------------------------------

fn http_mode(args: &Args) {
    let home = tempfile::tempdir().expect("tempdir");
    let upstream = spawn_role("upstream", "upstream", &[]);
    let upstream_url = format!("http://{}", upstream.addr);
    let baseline = spawn_role("baseline proxy", "baseline", &["--upstream", &upstream_url]);
    let hyper_baseline = spawn_hyper_baseline(args, &upstream_url);
    let (till, token) = start_till(args, home.path(), upstream.addr);
    let token: Arc<str> = token.into();
    println!(
        "# load benchmark ({} cores; load average at start: {})",
        available_cores(),
        loadavg()
    );
    println!(
        "upstream {}  baseline {}  hyper-baseline {}  till {}  (token: 3 blocks, large limits; audit log {})",
        upstream.addr,
        baseline.addr,
        hyper_baseline.addr,
        till.addr,
        if args.audit { "on" } else { "off" }
    );
    println!(
        "phases: {} s measured after {} s warm-up; throughput at {} connections, latency at 1",
        args.seconds, args.warmup, args.connections
    );
    let targets = [
        Target {
            name: "direct",
            addr: upstream.addr,
            prefix: "",
            token: None,
            pid: upstream.child.id(),
        },
        Target {
            name: "baseline",
            addr: baseline.addr,
            prefix: "/openai",
            token: Some(token.clone()),
            pid: baseline.child.id(),
        },
        Target {
            name: "hyper-baseline",
            addr: hyper_baseline.addr,
            prefix: "/openai",
            token: Some(token.clone()),
            pid: hyper_baseline.child.id(),
        },
        Target {
            name: "till",
            addr: till.addr,
            prefix: "/openai",
            token: Some(token.clone()),
            pid: till.child.id(),
        },
    ];
    let rt = runtime();
    rt.block_on(async {
        // Sanity: one request through each before measuring.
        for t in &targets {
            let r = run_phase(t, 1, 0.0, 0.2).await;
            if r.errors.total() > 0 || r.requests == 0 {
                die(&format!(
                    "{} does not answer 200: {}",
                    t.name,
                    r.errors.first.clone().unwrap_or_default()
                ));
            }
        }

        let mut throughput = Vec::new();
        let mut syscalls = Vec::new();
        for t in &targets {
            // Till, and the floor it is compared with, each over its own
            // throughput phase: the two profiles side by side say where
            // Till's extra microseconds go, kernel included.
            let perf = match (t.name, &args.perf) {
                ("till", Some(f)) => Some(start_perf(t.pid, f)),
                ("hyper-baseline", Some(f)) => {
                    let mut out = f.clone().into_os_string();
                    out.push(".hyper-baseline");
                    Some(start_perf(t.pid, Path::new(&out)))
                }
                _ => None,
            };
            let counting = (args.syscalls && t.name != "direct")
                .then(|| count_syscalls(t.pid, args.warmup, args.seconds));
            eprintln!("running: {} x{} ...", t.name, args.connections);
            let r = run_phase(t, args.connections, args.warmup, args.seconds).await;
            if let Some(c) = counting {
                let counts = c.join().unwrap_or_default();
                syscalls.push((t.name, r.rps() * args.seconds, counts));
            }
            throughput.push(r);
            if let Some(p) = perf {
                stop_perf(p);
            }
        }
        let mut latency = Vec::new();
        for t in &targets {
            eprintln!("running: {} x1 ...", t.name);
            latency.push(run_phase(t, 1, args.warmup, args.seconds).await);
        }
        let mut sse = Vec::new();
        for t in &targets {
            eprintln!("running: {} SSE ...", t.name);
            sse.push(run_sse(t, args).await);
        }
        // Till and the hyper baseline at the same overload, so their p99s
        // compare at equal load.
        let mut overload = Vec::new();
        if args.overload {
            for t in targets
                .iter()
                .filter(|t| matches!(t.name, "hyper-baseline" | "till"))
            {
                eprintln!(
                    "running: {} x{} (overload) ...",
                    t.name,
                    args.connections * 4
                );
                overload.push(run_phase(t, args.connections * 4, args.warmup, args.seconds).await);
            }
        }
        report(args, &throughput, &latency, &sse, &overload);
        report_syscalls(&syscalls);
    });
    report_till_store(home.path());
    for (name, s) in [
        ("till", &till),
        ("baseline", &baseline),
        ("hyper-baseline", &hyper_baseline),
    ] {
        let pid = s.child.id().to_string();
        println!(
            "{name} process memory after the run: VmRSS {:.1} MiB, VmHWM {:.1} MiB",
            mib(status_kb(&pid, "VmRSS:")),
            mib(status_kb(&pid, "VmHWM:"))
        );
    }
    println!("load average at the end: {}", loadavg());
    drop(till);
    drop(hyper_baseline);
    drop(baseline);
    drop(upstream);
}

/// The hyper baseline, its pool sized for the overload phase.
fn spawn_hyper_baseline(args: &Args, upstream_url: &str) -> Server {
    let conns = args.connections.to_string();
    spawn_role(
        "hyper baseline proxy",
        "hyper-baseline",
        &["--upstream", upstream_url, "--connections", &conns],
    )
}

/// The phase of target `name`.
fn by_name<'a>(rows: &'a [PhaseResult], name: &str) -> &'a PhaseResult {
    rows.iter()
        .find(|r| r.target == name)
        .unwrap_or_else(|| die(&format!("no {name} phase")))
}

/// Issue 15's targets for `till` against the hyper baseline `hyper`,
/// measured in the same run: throughput and p99 at the throughput phase's
/// connections, added latency at 1 connection, and (when run) 0 errors and
/// p99 at 4x the connections.
fn print_hyper_targets(
    connections: usize,
    (t, h): (&PhaseResult, &PhaseResult),
    (tl, hl): (&PhaseResult, &PhaseResult),
    overload: Option<(&PhaseResult, &PhaseResult)>,
) {
    println!();
    println!("{} / hyper-baseline (issue 15 targets):", t.target);
    let share = t.rps() / h.rps().max(1.0);
    println!(
        "  throughput at {connections} connections: {:.1}% of hyper-baseline ({:.0} vs {:.0} req/s)   target >= 85%: {}",
        100.0 * share,
        t.rps(),
        h.rps(),
        verdict(share >= 0.85)
    );
    let (d50, d99) = (tl.q_us(0.5) - hl.q_us(0.5), tl.q_us(0.99) - hl.q_us(0.99));
    println!(
        "  added latency at 1 connection: p50 {d50:+.0} µs (target <= 30: {}), p99 {d99:+.0} µs (target <= 100: {})",
        verdict(d50 <= 30.0),
        verdict(d99 <= 100.0)
    );
    let r99 = t.q_us(0.99) / h.q_us(0.99).max(1.0);
    println!(
        "  p99 at {connections} connections: {r99:.2}x hyper-baseline's ({:.0} vs {:.0} µs)   target <= 1.3x: {}",
        t.q_us(0.99),
        h.q_us(0.99),
        verdict(r99 <= 1.3)
    );
    println!(
        "  server CPU per request at {connections} connections: {} {:.1} µs ({}), hyper-baseline {:.1} µs ({}), difference {:+.1} µs",
        t.target,
        t.cpu_per_req_us(),
        t.cpu_split(),
        h.cpu_per_req_us(),
        h.cpu_split(),
        t.cpu_per_req_us() - h.cpu_per_req_us()
    );
    if let Some((to, ho)) = overload {
        let r = to.q_us(0.99) / ho.q_us(0.99).max(1.0);
        println!(
            "  overload at {} connections: {} errors (hyper-baseline {}) (target 0: {}), p99 {r:.2}x hyper-baseline's ({:.0} vs {:.0} µs) (target <= 2x: {})",
            to.connections,
            to.errors.total(),
            ho.errors.total(),
            verdict(to.errors.total() == 0),
            to.q_us(0.99),
            ho.q_us(0.99),
            verdict(r <= 2.0)
        );
    }
}

/// The 1, 5 and 15 minute load averages: other work on the machine skews
/// every figure, so the report shows them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn start_perf(pid: u32, out: &Path) -> Child {
    eprintln!("perf: recording pid {pid} into {}", out.display());
    let c = Command::new("perf")
        .args(["record", "--call-graph", "dwarf,16384", "-F", "499", "-o"])
        .arg(out)
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| die(&format!("cannot run perf: {e}")));
    std::thread::sleep(Duration::from_millis(300));
    c
}

fn stop_perf(mut c: Child) {
    // perf writes its file on SIGINT.
    let _ = Command::new("kill")
        .args(["-INT", &c.id().to_string()])
        .status();
    let _ = c.wait();
}

/// The system calls `--syscalls` counts one by one (the rest only in the
/// total): the ones a proxy makes per request or per wake-up.
const SYSCALLS: &[&str] = &[
    "futex",
    "epoll_wait",
    "epoll_pwait",
    "read",
    "readv",
    "recvfrom",
    "write",
    "writev",
    "sendto",
    "pwrite64",
    "fdatasync",
    "sched_yield",
    "madvise",
];

/// Counts the system calls and context switches of process `pid` (every
/// thread) for `seconds`, starting after `warmup`, with `perf stat`: the
/// measured part of a phase. Runs on its own thread; an empty map when perf
/// is missing or not allowed (the report says so).
fn count_syscalls(
    pid: u32,
    warmup: f64,
    seconds: f64,
) -> std::thread::JoinHandle<BTreeMap<String, f64>> {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs_f64(warmup));
        let out = tempfile::NamedTempFile::new().expect("temp file");
        let mut events = vec![
            "raw_syscalls:sys_enter".to_string(),
            "context-switches".to_string(),
        ];
        events.extend(SYSCALLS.iter().map(|s| format!("syscalls:sys_enter_{s}")));
        let status = Command::new("perf")
            .args(["stat", "-x", ",", "-o"])
            .arg(out.path())
            .args(["-e", &events.join(","), "-p", &pid.to_string()])
            .args(["--", "sleep", &seconds.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            return BTreeMap::new();
        }
        // CSV lines: value,unit,event,...
        std::fs::read_to_string(out.path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split(',');
                let v = f.next()?.parse::<f64>().ok()?;
                let event = f.nth(1)?;
                let name = event
                    .strip_prefix("syscalls:sys_enter_")
                    .or_else(|| event.strip_prefix("raw_syscalls:sys_enter").map(|_| "all"))
                    .unwrap_or(event);
                Some((name.to_string(), v))
            })
            .collect()
    })
}

fn report_syscalls(counted: &[(&str, f64, BTreeMap<String, f64>)]) {
    if counted.is_empty() {
        return;
    }
    println!();
    println!("system calls per request in the throughput phase (perf stat, every thread)");
    if counted.iter().all(|(_, _, c)| c.is_empty()) {
        println!(
            "  perf stat failed: is perf installed, and are its syscall tracepoints readable?"
        );
        return;
    }
    let mut columns = vec!["all", "context-switches"];
    columns.extend(SYSCALLS.iter().copied().filter(|s| {
        counted
            .iter()
            .any(|(_, n, c)| c.get(*s).is_some_and(|v| v / n.max(1.0) >= 0.01))
    }));
    print!("{:<14}", "target");
    for c in &columns {
        print!(
            " {:>10}",
            c.strip_suffix("-switches").map_or(*c, |_| "ctx-switch")
        );
    }
    println!();
    for (name, requests, counts) in counted {
        print!("{name:<14}");
        for c in &columns {
            match counts.get(*c) {
                Some(v) => print!(" {:>10.2}", v / requests.max(1.0)),
                None => print!(" {:>10}", "-"),
            }
        }
        println!();
    }
}

fn report(
    args: &Args,
    throughput: &[PhaseResult],
    latency: &[PhaseResult],
    sse: &[SseResult],
    overload: &[PhaseResult],
) {
    println!();
    println!(
        "{:<14} {:>5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11}  errors",
        "target",
        "conns",
        "req/s",
        "p50 µs",
        "p99 µs",
        "p999 µs",
        "max µs",
        "srv CPU/req",
        "cli CPU/req"
    );
    for r in throughput.iter().chain(latency).chain(overload) {
        println!(
            "{:<14} {:>5} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.1}µs {:>9.1}µs  {}",
            r.target,
            r.connections,
            r.rps(),
            r.q_us(0.50),
            r.q_us(0.99),
            r.q_us(0.999),
            r.hist.max() as f64 / 1000.0,
            r.cpu_per_req_us(),
            r.per_req_us(r.client_cpu.total()),
            r.errors.describe()
        );
        if let Some(e) = &r.errors.first {
            println!(
                "          first error: {}",
                e.chars().take(200).collect::<String>()
            );
        }
    }
    let (b, t) = (by_name(throughput, "baseline"), by_name(throughput, "till"));
    let (bl, tl) = (by_name(latency, "baseline"), by_name(latency, "till"));
    println!();
    println!("Till / baseline:");
    println!(
        "  throughput at {} connections: {:.1}% of baseline ({:.0} vs {:.0} req/s)   target >= 70%: {}",
        args.connections,
        100.0 * t.rps() / b.rps(),
        t.rps(),
        b.rps(),
        verdict(t.rps() / b.rps() >= 0.70)
    );
    let (d50, d99) = (tl.q_us(0.5) - bl.q_us(0.5), tl.q_us(0.99) - bl.q_us(0.99));
    println!(
        "  added latency at 1 connection: p50 {d50:+.0} µs (target <= 100: {}), p99 {d99:+.0} µs (target <= 500: {}), p999 {:+.0} µs",
        verdict(d50 <= 100.0),
        verdict(d99 <= 500.0),
        tl.q_us(0.999) - bl.q_us(0.999)
    );
    println!(
        "  server CPU per request at {} connections: till {:.1} µs, baseline {:.1} µs, difference {:+.1} µs",
        args.connections,
        t.cpu_per_req_us(),
        b.cpu_per_req_us(),
        t.cpu_per_req_us() - b.cpu_per_req_us()
    );
    let till_overload = overload.iter().find(|r| r.target == "till");
    let denials: u64 = [t, tl]
        .into_iter()
        .chain(till_overload)
        .map(|r| r.errors.total())
        .sum();
    println!("  non-200 answers from till over all phases: {denials}");
    print_hyper_targets(
        args.connections,
        (t, by_name(throughput, "hyper-baseline")),
        (tl, by_name(latency, "hyper-baseline")),
        till_overload.zip(overload.iter().find(|r| r.target == "hyper-baseline")),
    );

    println!();
    println!(
        "SSE: {} events {} ms apart per stream, 1 connection, sequential streams",
        args.sse_chunks, args.sse_interval_ms
    );
    println!(
        "{:<14} {:>7} {:>13} {:>13} {:>12} {:>12} {:>12} {:>13}  errors",
        "target",
        "streams",
        "1st chunk p50",
        "1st chunk p99",
        "gap p50",
        "gap p99",
        "gap max",
        "frames/stream"
    );
    for r in sse {
        println!(
            "{:<14} {:>7} {:>10.0} µs {:>10.0} µs {:>9.0} µs {:>9.0} µs {:>9.0} µs {:>13.1}  {}",
            r.target,
            r.streams,
            r.ttfc.value_at_quantile(0.5) as f64 / 1e3,
            r.ttfc.value_at_quantile(0.99) as f64 / 1e3,
            r.gaps.value_at_quantile(0.5) as f64 / 1e3,
            r.gaps.value_at_quantile(0.99) as f64 / 1e3,
            r.gaps.max() as f64 / 1e3,
            r.frames as f64 / r.streams.max(1) as f64,
            r.errors.describe()
        );
    }
    let sse_of = |name: &str| sse.iter().find(|r| r.target == name);
    if let Some(ts) = sse_of("till") {
        for bs in ["baseline", "hyper-baseline"]
            .into_iter()
            .filter_map(sse_of)
        {
            println!(
                "  till vs {}: first chunk p50 {:+.0} µs, p99 {:+.0} µs; gap p50 {:+.0} µs, p99 {:+.0} µs",
                bs.target,
                (ts.ttfc.value_at_quantile(0.5) as f64 - bs.ttfc.value_at_quantile(0.5) as f64)
                    / 1e3,
                (ts.ttfc.value_at_quantile(0.99) as f64 - bs.ttfc.value_at_quantile(0.99) as f64)
                    / 1e3,
                (ts.gaps.value_at_quantile(0.5) as f64 - bs.gaps.value_at_quantile(0.5) as f64)
                    / 1e3,
                (ts.gaps.value_at_quantile(0.99) as f64 - bs.gaps.value_at_quantile(0.99) as f64)
                    / 1e3,
            );
        }
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// Counter store size after the run, and till's memory.
fn report_till_store(home: &Path) {
    let f = home.join(till::store::embedded::STORE_FILE);
    if let Ok(m) = std::fs::metadata(&f) {
        println!();
        println!(
            "till store after the run: {} ({} bytes)",
            f.display(),
            m.len()
        );
    }
}

// ---------------------------------------------------------------------------
// --families: store size and RSS with many token families
// ---------------------------------------------------------------------------

fn status_kb(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn random_id() -> String {
    // A revocation id is a 64-byte ed25519 signature, 128 hex characters.
    let bytes: [u8; 64] = std::array::from_fn(|_| rand::random());
    hex::encode(bytes)
}

fn families_mode(args: &Args) {
    let n = args.families.unwrap_or(0);
    let k = args.family_blocks;
    // `--dir D` keeps the filled store in D, to time reopens again with
    // `--role reopen --dir D`.
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let rss0 = status_kb("self", "VmRSS:");
    let store = EmbeddedStore::open(&dir).expect("open store");
    let rt = runtime();
    let started = Instant::now();
    let concurrency = 256u64;
    let expires = till::store::now_unix() + 86400;
    rt.block_on(async {
        let next = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let store = store.clone();
                let next = next.clone();
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        let ids: Vec<String> = (0..k).map(|_| random_id()).collect();
                        // What the proxy does on the first request of a token.
                        let meta: Vec<BlockMeta> = ids
                            .iter()
                            .enumerate()
                            .map(|(b, id)| BlockMeta {
                                id: id.clone(),
                                family: ids[0].clone(),
                                parent: b.checked_sub(1).map(|p| ids[p].clone()),
                                index: b,
                                label: Some(format!("agent-{i}")),
                                limit: Some(1000),
                                expires: Some(expires),
                                rates: Vec::new(),
                                concurrency: None,
                            })
                            .collect();
                        // What a first allowed request records: the
                        // counters and the blocks' metadata.
                        let specs: Vec<CounterSpec> = meta
                            .iter()
                            .map(|m| CounterSpec {
                                id: m.id.clone(),
                                limit: m.limit,
                                expires: m.expires,
                                family: m.family.clone(),
                                parent: m.parent.clone(),
                                index: m.index,
                                label: m.label.clone(),
                                rates: Vec::new(),
                                concurrency: None,
                            })
                            .collect();
                        let r = store.reserve(&specs).await.expect("reserve");
                        r.durable.await.expect("durable");
                        if (i + 1).is_multiple_of(100_000) {
                            eprintln!("  {} families ...", i + 1);
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let fill = started.elapsed();
    let rss1 = status_kb("self", "VmRSS:");
    let hwm1 = status_kb("self", "VmHWM:");
    let commits = store.stats().commits.load(Ordering::Relaxed);
    store.close().expect("close");
    drop(store);
    let file = dir.join(till::store::embedded::STORE_FILE);
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);

    // Reopen in a fresh process: what a restarted proxy holds.
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--role", "reopen", "--dir"])
        .arg(&dir)
        .output()
        .expect("reopen");
    let mut reopen = String::from_utf8_lossy(&out.stdout).to_string();
    // The same file read by redb alone, to split RSS between redb's page
    // cache and Till's in-memory maps.
    for cache in [None, Some("16")] {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args(["--role", "scan", "--dir"]).arg(&dir);
        if let Some(m) = cache {
            c.args(["--cache-mib", m]);
        }
        let out = c.output().expect("scan");
        reopen.push_str(&String::from_utf8_lossy(&out.stdout));
    }

    println!(
        "# counter store with {n} token families ({k} block(s) each, {} counters)",
        n * k as u64
    );
    println!(
        "fill: {:.1} s ({:.0} families/s, {commits} group commits, {:.1} reservations per commit)",
        fill.as_secs_f64(),
        n as f64 / fill.as_secs_f64(),
        n as f64 / commits.max(1) as f64
    );
    println!(
        "store file: {:.1} MiB ({:.0} bytes per family)",
        size as f64 / 1048576.0,
        size as f64 / n.max(1) as f64
    );
    println!(
        "RSS of the filling process: {:.1} MiB before opening the store, {:.1} MiB after ({:.0} bytes per family; peak {:.1} MiB)",
        mib(rss0),
        mib(rss1),
        (rss1.saturating_sub(rss0) * 1024) as f64 / n.max(1) as f64,
        mib(hwm1)
    );
    print!("{reopen}");
}

/// Child of `--families`: reads every row of the store file with redb alone
/// (its default cache, or `cache_mib`) and reports RSS, to show how much of
/// the proxy's RSS is redb's page cache. The table layouts mirror
/// `src/store/embedded.rs`.
fn scan_role(dir: &Path, cache_mib: Option<usize>) {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    const COUNTERS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("counters");
    const BLOCKS: TableDefinition<&str, &str> = TableDefinition::new("blocks");
    let path = dir.join(till::store::embedded::STORE_FILE);
    {
        let cache = cache_mib.map(|m| m << 20);
        let rss0 = status_kb("self", "VmRSS:");
        let mut b = redb::Builder::new();
        if let Some(c) = cache {
            b.set_cache_size(c);
        }
        let db = b.open(&path).expect("open");
        let r = db.begin_read().unwrap();
        let mut bytes = 0usize;
        let (mut n_counters, mut n_blocks) = (0u64, 0u64);
        if let Ok(t) = r.open_table(COUNTERS) {
            for item in t.iter().unwrap() {
                let (k, _) = item.unwrap();
                bytes += k.value().len();
                n_counters += 1;
            }
        }
        if let Ok(t) = r.open_table(BLOCKS) {
            for item in t.iter().unwrap() {
                let (k, v) = item.unwrap();
                bytes += k.value().len() + v.value().len();
                n_blocks += 1;
            }
        }
        let rss1 = status_kb("self", "VmRSS:");
        println!(
            "redb alone, {} cache: scanned {n_counters} counters + {n_blocks} block rows ({:.1} MiB of keys and values); RSS +{:.1} MiB",
            cache.map_or("default".to_string(), |c| format!("{} MiB", c >> 20)),
            bytes as f64 / 1048576.0,
            mib(rss1.saturating_sub(rss0))
        );
        drop(r);
        drop(db);
    }
}

/// Child of `--families`: opens the store cold and reports time and RSS.
fn reopen_role(dir: &Path) {
    let rss0 = status_kb("self", "VmRSS:");
    let t = Instant::now();
    let store = EmbeddedStore::open(dir).expect("reopen");
    let took = t.elapsed();
    let rss1 = status_kb("self", "VmRSS:");
    let counters = runtime()
        .block_on(store.list())
        .map(|l| l.len())
        .unwrap_or(0);
    println!(
        "reopen in a fresh process: {:.2} s to load {counters} counters; RSS {:.1} MiB -> {:.1} MiB (+{:.1} MiB)",
        took.as_secs_f64(),
        mib(rss0),
        mib(rss1),
        mib(rss1.saturating_sub(rss0))
    );
    let _ = store.close();
}

// ---------------------------------------------------------------------------
// --redis: Till on Redis vs Till embedded vs the baseline
// ---------------------------------------------------------------------------

/// A `redis-server` with the settings Till recommends, killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis() -> RedisServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| die(&format!("no free port: {e}")));
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            die(&format!(
                "cannot start redis-server (is it installed?): {e}"
            ))
        });
    let r = RedisServer {
        child,
        port,
        _dir: dir,
    };
    let t0 = Instant::now();
    while redis_command(port, "PING").is_none() {
        if t0.elapsed() > Duration::from_secs(10) {
            die("redis-server did not answer PING within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    r
}

/// Sends one inline command and returns the reply's text (a simple string
/// or a bulk string), or None if Redis did not answer.
fn redis_command(port: u16, cmd: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head).ok()?;
    if let Some(simple) = head.strip_prefix('+') {
        return Some(simple.trim_end().to_string());
    }
    let len: usize = head.strip_prefix('$')?.trim_end().parse().ok()?;
    let mut body = vec![0; len + 2];
    r.read_exact(&mut body).ok()?;
    body.truncate(len);
    String::from_utf8(body).ok()
}

/// `name calls-per-request, ...` for the commands called between two
/// `INFO commandstats` (the benchmark's own `info` and `ping` left out).
fn calls_per_request(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    sent: u64,
) -> String {
    let per: Vec<String> = after
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "info" | "ping"))
        .filter_map(|(name, n)| {
            let d = n.saturating_sub(before.get(name).copied().unwrap_or(0));
            (d > 0).then(|| format!("{name} {:.2}", d as f64 / sent.max(1) as f64))
        })
        .collect();
    per.join(", ")
}

/// `calls` per command from `INFO commandstats`.
fn command_calls(port: u16) -> BTreeMap<String, u64> {
    let text = redis_command(port, "INFO commandstats").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

fn print_row(r: &PhaseResult) {
    println!(
        "{:<15} {:>5} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>11.1}µs  {}",
        r.target,
        r.connections,
        r.rps(),
        r.q_us(0.50),
        r.q_us(0.99),
        r.q_us(0.999),
        r.cpu_per_req_us(),
        r.errors.describe()
    );
    if let Some(e) = &r.errors.first {
        println!(
            "                first error: {}",
            e.chars().take(200).collect::<String>()
        );
    }
}

fn redis_mode(args: &Args) {
    let redis = start_redis();
    let upstream = spawn_role("upstream", "upstream", &[]);
    let upstream_url = format!("http://{}", upstream.addr);
    let baseline = spawn_role("baseline proxy", "baseline", &["--upstream", &upstream_url]);
    let hyper_baseline = spawn_hyper_baseline(args, &upstream_url);
    let home_e = tempfile::tempdir().expect("tempdir");
    let (embedded, token_e) = start_till(args, home_e.path(), upstream.addr);
    // Two replicas of one deployment: the same root key, one Redis.
    let store = format!("store = \"redis://127.0.0.1:{}/0\"", redis.port);
    let home_r1 = tempfile::tempdir().expect("tempdir");
    let home_r2 = tempfile::tempdir().expect("tempdir");
    let (on_redis, token_r) = {
        let (first, token) = start_till(args, home_r1.path(), upstream.addr);
        drop(first);
        (
            spawn_till(args, home_r1.path(), upstream.addr, &store),
            token,
        )
    };
    std::fs::copy(
        home_r1.path().join(till::token::keys::ROOT_KEY_FILE),
        home_r2.path().join(till::token::keys::ROOT_KEY_FILE),
    )
    .expect("copy the root key");
    let replica = spawn_till(args, home_r2.path(), upstream.addr, &store);
    let target = |name, s: &Server, token: Option<&String>| Target {
        name,
        addr: s.addr,
        prefix: "/openai",
        token: token.map(|t| Arc::from(t.as_str())),
        pid: s.child.id(),
    };
    let targets = [
        target("baseline", &baseline, Some(&token_e)),
        target("hyper-baseline", &hyper_baseline, Some(&token_e)),
        target("till-embedded", &embedded, Some(&token_e)),
        target("till-redis", &on_redis, Some(&token_r)),
    ];
    let second = target("till-redis #2", &replica, Some(&token_r));
    println!(
        "# load benchmark, redis mode ({} cores; load average at start: {})",
        available_cores(),
        loadavg()
    );
    println!(
        "redis 127.0.0.1:{} (appendonly yes, appendfsync always); token: 3 blocks, large limits; audit log {}",
        redis.port,
        if args.audit { "on" } else { "off" }
    );
    println!(
        "phases: {} s measured after {} s warm-up; throughput at {} connections, latency at 1",
        args.seconds, args.warmup, args.connections
    );
    let rt = runtime();
    rt.block_on(async {
        for t in targets.iter().chain([&second]) {
            let r = run_phase(t, 1, 0.0, 0.2).await;
            if r.errors.total() > 0 || r.requests == 0 {
                die(&format!(
                    "{} does not answer 200: {}",
                    t.name,
                    r.errors.first.clone().unwrap_or_default()
                ));
            }
        }
        let mut rows = Vec::new();
        let mut redis_cpu = None;
        let mut calls_many = None;
        for t in &targets {
            eprintln!("running: {} x{} ...", t.name, args.connections);
            let before = proc_cpu(redis.child.id());
            let calls_before = command_calls(redis.port);
            let r = run_phase(t, args.connections, args.warmup, args.seconds).await;
            if t.name == "till-redis" {
                // Sampled around the whole phase: the warm-up's requests count too.
                let sent = r.requests as f64 + r.rps() * args.warmup;
                redis_cpu = Some((proc_cpu(redis.child.id()).since(before), sent.max(1.0)));
                calls_many = Some((calls_before, command_calls(redis.port), sent.max(1.0) as u64));
            }
            rows.push(r);
        }
        let mut latency = Vec::new();
        let mut calls = None;
        for t in &targets {
            eprintln!("running: {} x1 ...", t.name);
            let before = command_calls(redis.port);
            let r = run_phase(t, 1, args.warmup, args.seconds).await;
            if t.name == "till-redis" {
                // The warm-up's requests are counted by Redis too.
                let sent = r.requests + (r.rps() * args.warmup) as u64;
                calls = Some((before, command_calls(redis.port), sent.max(1)));
            }
            latency.push(r);
        }
        eprintln!(
            "running: 2 till processes on one redis, x{} each ...",
            args.connections / 2
        );
        let half = (args.connections / 2).max(1);
        let on_redis = targets.iter().find(|t| t.name == "till-redis").unwrap();
        let (a, b) = tokio::join!(
            run_phase(on_redis, half, args.warmup, args.seconds),
            run_phase(&second, half, args.warmup, args.seconds)
        );

        println!();
        println!(
            "{:<15} {:>5} {:>10} {:>9} {:>9} {:>9} {:>13}  errors",
            "target", "conns", "req/s", "p50 µs", "p99 µs", "p999 µs", "srv CPU/req"
        );
        for r in rows.iter().chain(&latency).chain([&a, &b]) {
            print_row(r);
        }
        println!(
            "  2 till processes on one redis: {:.0} req/s together ({:.0} + {:.0}), errors {}",
            a.rps() + b.rps(),
            a.rps(),
            b.rps(),
            a.errors.total() + b.errors.total()
        );
        if let Some((cpu, sent)) = redis_cpu {
            println!(
                "  redis-server CPU per request at {} connections (till-redis phase, warm-up included): {:.1} µs ({:.1} user + {:.1} system)",
                args.connections,
                cpu.total().as_secs_f64() * 1e6 / sent,
                cpu.user.as_secs_f64() * 1e6 / sent,
                cpu.system.as_secs_f64() * 1e6 / sent
            );
        }
        let (base, base1) = (by_name(&rows, "baseline"), by_name(&latency, "baseline"));
        println!(
            "  throughput at {} connections: till-redis {:.1}% of baseline, till-embedded {:.1}%",
            args.connections,
            100.0 * by_name(&rows, "till-redis").rps() / base.rps().max(1.0),
            100.0 * by_name(&rows, "till-embedded").rps() / base.rps().max(1.0)
        );
        for r in latency.iter().filter(|r| r.target != "baseline") {
            println!(
                "  added latency at 1 connection over baseline, {}: p50 {:+.0} µs, p99 {:+.0} µs",
                r.target,
                r.q_us(0.50) - base1.q_us(0.50),
                r.q_us(0.99) - base1.q_us(0.99)
            );
        }
        for name in ["till-redis", "till-embedded"] {
            print_hyper_targets(
                args.connections,
                (by_name(&rows, name), by_name(&rows, "hyper-baseline")),
                (by_name(&latency, name), by_name(&latency, "hyper-baseline")),
                None,
            );
        }
        if let Some((before, after, sent)) = &calls {
            println!(
                "  redis commands per warm request (till-redis, 1 connection, {sent} requests): {}",
                calls_per_request(before, after, *sent)
            );
        }
        if let Some((before, after, sent)) = calls_many {
            // At many connections the batcher puts several requests' reservations
            // into one script call: its calls per request show how many.
            let evalsha = after.get("evalsha").copied().unwrap_or(0)
                - before.get("evalsha").copied().unwrap_or(0);
            println!(
                "  redis commands per request (till-redis, {} connections, warm-up included, {sent} requests): {}; {:.1} requests per script call",
                args.connections,
                calls_per_request(&before, &after, sent),
                sent as f64 / evalsha.max(1) as f64
            );
        }
        if calls.is_some() {
            println!(
                "  (`get` includes each proxy's revocation-version check every 250 ms; hget calls of one request are one pipelined round trip)"
            );
        }
    });
    println!("load average at the end: {}", loadavg());
    drop(replica);
    drop(on_redis);
    drop(embedded);
    drop(hyper_baseline);
    drop(baseline);
    drop(upstream);
}
