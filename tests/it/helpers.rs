//! Fluent helpers: run the real `till` binary, start local upstreams that
//! behave like the real APIs, and start the proxy on an ephemeral port.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use biscuit_auth::KeyPair;
use till::token::{self, Scope, keys};

pub const BIN: &str = env!("CARGO_BIN_EXE_till");

/// A copy of the repository's `policies/` that only this user can write
/// (the proxy refuses a policy directory others could have written; a
/// checkout made under umask 002 is group-writable), readable by every
/// user for the tests that run the proxy as `nobody`. One per test run.
pub fn policies_dir() -> &'static str {
    use std::os::unix::fs::PermissionsExt;
    static DIR: std::sync::OnceLock<(tempfile::TempDir, String)> = std::sync::OnceLock::new();
    let (_, path) = DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("policies");
        std::fs::create_dir(&dir).unwrap();
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
        for e in std::fs::read_dir(src).unwrap() {
            let from = e.unwrap().path();
            if from.extension().is_some_and(|x| x == "datalog") {
                let to = dir.join(from.file_name().unwrap());
                std::fs::copy(&from, &to).unwrap();
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
        }
        for d in [tmp.path(), dir.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let path = dir.to_str().unwrap().to_owned();
        (tmp, path)
    });
    path
}

/// Output of one run of the binary.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    #[track_caller]
    pub fn success(&self) -> &Self {
        self.code(0)
    }
    #[track_caller]
    pub fn code(&self, c: i32) -> &Self {
        assert_eq!(
            self.code, c,
            "exit code; stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "panic: {}", self.stderr);
        self
    }
    #[track_caller]
    pub fn stdout_has(&self, s: &str) -> &Self {
        assert!(
            self.stdout.contains(s),
            "stdout lacks {s:?}:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
    #[track_caller]
    pub fn stderr_has(&self, s: &str) -> &Self {
        assert!(
            self.stderr.contains(s),
            "stderr lacks {s:?}:\n{}",
            self.stderr
        );
        self
    }
    /// The one-line error contract: exactly one line on stderr, no backtrace.
    #[track_caller]
    pub fn one_line_error(&self) -> &Self {
        assert_eq!(
            self.stderr.trim_end().lines().count(),
            1,
            "stderr: {}",
            self.stderr
        );
        self
    }
    pub fn out(&self) -> String {
        self.stdout.trim().to_string()
    }
}

/// A `till` invocation, built fluently.
pub struct Cmd {
    args: Vec<String>,
    env: BTreeMap<String, String>,
    stdin: Option<String>,
    dir: Option<PathBuf>,
    closed_stdout: bool,
}

pub fn till<I: IntoIterator<Item = S>, S: AsRef<str>>(args: I) -> Cmd {
    Cmd {
        args: args.into_iter().map(|s| s.as_ref().to_string()).collect(),
        env: BTreeMap::new(),
        stdin: None,
        dir: None,
        closed_stdout: false,
    }
}

impl Cmd {
    pub fn home(self, h: &Home) -> Self {
        self.env("TILL_HOME", h.path().to_str().unwrap())
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.insert(k.into(), v.into());
        self
    }
    pub fn stdin(mut self, s: &str) -> Self {
        self.stdin = Some(s.into());
        self
    }
    pub fn dir(mut self, d: &Path) -> Self {
        self.dir = Some(d.to_path_buf());
        self
    }
    /// Stdout is a pipe whose reader has already gone, as in `till ... | head -1`
    /// once `head` has exited: every write fails with EPIPE.
    pub fn closed_stdout(mut self) -> Self {
        self.closed_stdout = true;
        self
    }
    pub fn run(self) -> Out {
        let mut c = Command::new(BIN);
        c.args(&self.args)
            .env_remove("TILL_HOME")
            .env_remove("TILL_TOKEN")
            .env_remove("TILL_PUBLIC_KEY")
            .env_remove("TILL_URL")
            .env_remove("TILL_ADMIN_TOKEN")
            .envs(&self.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(d) = &self.dir {
            c.current_dir(d);
        }
        if self.closed_stdout {
            let (reader, writer) = std::io::pipe().unwrap();
            drop(reader);
            c.stdout(writer);
        }
        let mut child = c.spawn().expect("spawn till");
        {
            let mut stdin = child.stdin.take().unwrap();
            if let Some(s) = &self.stdin {
                let _ = stdin.write_all(s.as_bytes());
            }
        }
        let o = child.wait_with_output().unwrap();
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into(),
            stderr: String::from_utf8_lossy(&o.stderr).into(),
        }
    }
}

/// A state directory with a root key.
pub struct Home {
    dir: tempfile::TempDir,
    /// The state directory, when it is not `dir` itself but inside it.
    sub: Option<PathBuf>,
}

impl Home {
    /// A home with a root key, created through the library (fast).
    pub fn new() -> Home {
        let h = Home::empty();
        keys::save(
            &h.path().join(keys::ROOT_KEY_FILE),
            &keys::generate(),
            false,
        )
        .unwrap();
        h
    }
    pub fn empty() -> Home {
        Home {
            dir: tempfile::tempdir().unwrap(),
            sub: None,
        }
    }
    /// A state directory `name` (not created) inside a fresh temporary
    /// directory, removed with it.
    pub fn inside(name: &str) -> Home {
        let dir = tempfile::tempdir().unwrap();
        let sub = Some(dir.path().join(name));
        Home { dir, sub }
    }
    /// The temporary directory holding the state directory.
    pub fn outer(&self) -> &Path {
        self.dir.path()
    }
    pub fn path(&self) -> &Path {
        self.sub.as_deref().unwrap_or(self.dir.path())
    }
    pub fn key(&self) -> KeyPair {
        keys::load(&self.path().join(keys::ROOT_KEY_FILE)).unwrap()
    }
    pub fn public(&self) -> String {
        keys::public_string(&self.key().public())
    }
    pub fn issue(&self, scope: Scope) -> String {
        token::issue(&self.key(), &scope).unwrap()
    }
    /// A root token for `service` with `max_uses`.
    pub fn token(&self, service: &str, max_uses: Option<u64>) -> String {
        self.issue(Scope {
            services: vec![service.into()],
            max_uses,
            ..Scope::default()
        })
    }
    pub fn admin(&self) -> String {
        self.issue(Scope {
            services: vec![till::token::vocab::ADMIN_SERVICE.into()],
            ..Scope::default()
        })
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

pub fn child(parent: &str, scope: Scope) -> String {
    token::attenuate(parent, &scope).unwrap()
}

pub fn limit(n: u64) -> Scope {
    Scope {
        max_uses: Some(n),
        ..Scope::default()
    }
}

// ---------------------------------------------------------------------------
// Local upstream

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: String,
}

#[derive(Default)]
pub struct UpstreamState {
    pub seen: Mutex<Vec<Seen>>,
    /// Answer 500 to this many requests before behaving.
    pub fail_next: AtomicUsize,
    /// Released by the test to let a gated SSE stream finish.
    pub gate: tokio::sync::Notify,
}

/// A local server that behaves like OpenAI / Anthropic: JSON, SSE, errors,
/// redirects, and a route that hangs.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub state: Arc<UpstreamState>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let state = Arc::new(UpstreamState::default());
        let app = Router::new()
            .fallback(upstream_handler)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Upstream { addr, state }
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
    pub fn count(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }
}

async fn upstream_handler(State(st): State<Arc<UpstreamState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let body = String::from_utf8_lossy(&bytes).to_string();
    st.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    if st
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(
                serde_json::json!({"error": {"message": "upstream broke", "type": "server_error"}}),
            ),
        )
            .into_response();
    }
    let path = parts.uri.path().to_string();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    match path.as_str() {
        "/redirect" => Response::builder()
            .status(302)
            .header("location", "/v1/elsewhere")
            .body(Body::empty())
            .unwrap(),
        "/hang" => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            "late".into_response()
        }
        p if p.starts_with("/status/") => {
            let code: u16 = p["/status/".len()..].parse().unwrap_or(500);
            (StatusCode::from_u16(code).unwrap(), axum::Json(serde_json::json!({"error": {"message": "as requested", "type": "test"}}))).into_response()
        }
        "/v1/chat/completions" if json["stream"] == true => {
            let gated = json["gated"] == true;
            let st2 = st.clone();
            let stream = async_stream(st2, gated);
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(Body::from_stream(stream))
                .unwrap()
        }
        "/v1/chat/completions" => axum::Json(serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0,
            "model": json["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        }))
        .into_response(),
        "/v1/messages" => axum::Json(serde_json::json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": json["model"],
            "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 1, "output_tokens": 1}
        }))
        .into_response(),
        _ => axum::Json(serde_json::json!({"path": path})).into_response(),
    }
}

fn async_stream(
    st: Arc<UpstreamState>,
    gated: bool,
) -> impl futures_util::Stream<Item = Result<axum::body::Bytes, std::io::Error>> {
    futures_util::stream::unfold(0u32, move |i| {
        let st = st.clone();
        async move {
            let chunk = match i {
                0 => "data: {\"choices\":[{\"delta\":{\"content\":\"one\"}}]}\n\n",
                1 => {
                    if gated {
                        st.gate.notified().await;
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    "data: {\"choices\":[{\"delta\":{\"content\":\"two\"}}]}\n\n"
                }
                2 => "data: [DONE]\n\n",
                _ => return None,
            };
            Some((Ok(axum::body::Bytes::from(chunk)), i + 1))
        }
    })
}

// ---------------------------------------------------------------------------
// The proxy as a real process

/// A running `till serve`.
pub struct Proxy {
    pub addr: SocketAddr,
    child: Option<Child>,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Everything the proxy printed on stdout (the banner), as it arrives.
    stdout: Arc<Mutex<String>>,
}

/// Upstream entry for the config: (name, url, header, prefix, env var).
pub struct Up<'a> {
    pub name: &'a str,
    pub url: String,
    pub header: &'a str,
    pub prefix: &'a str,
    pub env: &'a str,
}

pub fn openai(u: &Upstream) -> Up<'static> {
    Up {
        name: "openai",
        url: u.url(),
        header: "authorization",
        prefix: "Bearer ",
        env: "TEST_OPENAI_KEY",
    }
}

pub fn anthropic(u: &Upstream) -> Up<'static> {
    Up {
        name: "anthropic",
        url: u.url(),
        header: "x-api-key",
        prefix: "",
        env: "TEST_ANTHROPIC_KEY",
    }
}

/// The real credentials the test proxy injects.
pub const OPENAI_SECRET: &str = "sk-real-openai-secret-0123456789";
pub const ANTHROPIC_SECRET: &str = "sk-ant-real-secret-9876543210";

/// libfaketime (Debian's faketime package), for tests that move the clock
/// `till` reads; preload it through `env` so that the test's signals reach
/// `till` itself.
pub fn faketime_lib() -> &'static str {
    const LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
    assert!(
        std::path::Path::new(LIB).exists(),
        "this test needs libfaketime (apt-get install faketime; .ci/run installs it)"
    );
    LIB
}

impl Proxy {
    /// Writes a config for `ups` (plus `extra` TOML) and starts the proxy.
    pub fn start(home: &Home, ups: &[Up], extra: &str) -> Proxy {
        let mut cfg = format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\npolicies = {:?}\n{extra}\n",
            home.path().to_str().unwrap(),
            policies_dir(),
        );
        for u in ups {
            cfg.push_str(&format!(
                "[upstreams.{}]\nurl = {:?}\ncredential = {{ env = {:?} }}\nheader = {:?}\nprefix = {:?}\n",
                u.name, u.url, u.env, u.header, u.prefix
            ));
        }
        let config = home.write("till.toml", &cfg);
        Self::start_config(home, &config).expect("proxy starts")
    }

    /// Starts `till serve --config` and waits for its listening line.
    pub fn start_config(home: &Home, config: &Path) -> Result<Proxy, String> {
        Self::spawn(
            home,
            &["serve", "--config", config.to_str().unwrap()],
            config,
        )
    }

    pub fn spawn(home: &Home, args: &[&str], config: &Path) -> Result<Proxy, String> {
        Self::spawn_via(home, &[], "debug", args, config)
    }

    /// Like [`Proxy::spawn`], with `till` run through `wrapper` (a command
    /// that execs its arguments, e.g. `prlimit ... --`) and the log level
    /// `log`.
    pub fn spawn_via(
        home: &Home,
        wrapper: &[&str],
        log_level: &str,
        args: &[&str],
        config: &Path,
    ) -> Result<Proxy, String> {
        Self::spawn_full(home, wrapper, log_level, args, config, &[])
    }

    /// Like [`Proxy::spawn`], with extra environment variables.
    pub fn spawn_env(
        home: &Home,
        args: &[&str],
        config: &Path,
        env: &[(&str, &str)],
    ) -> Result<Proxy, String> {
        Self::spawn_full(home, &[], "debug", args, config, env)
    }

    /// Runs exactly `argv` (no `till` appended: e.g. `setpriv ... COPY
    /// serve --config FILE`, a copy of the binary run as another user) from
    /// directory `cwd`, and waits for its listening line. The log is kept
    /// in `log_dir`.
    pub fn spawn_argv(
        home: &Home,
        argv: &[&str],
        cwd: &Path,
        log_dir: &Path,
        config: &Path,
    ) -> Result<Proxy, String> {
        let (program, rest) = argv.split_first().expect("a program");
        let mut cmd = Command::new(program);
        cmd.args(rest).current_dir(cwd);
        Self::spawn_cmd(home, cmd, log_dir, "debug", config, &[])
    }

    fn spawn_full(
        home: &Home,
        wrapper: &[&str],
        log_level: &str,
        args: &[&str],
        config: &Path,
        env: &[(&str, &str)],
    ) -> Result<Proxy, String> {
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(args);
        Self::spawn_cmd(home, cmd, home.path(), log_level, config, env)
    }

    fn spawn_cmd(
        home: &Home,
        mut cmd: Command,
        log_dir: &Path,
        log_level: &str,
        config: &Path,
        env: &[(&str, &str)],
    ) -> Result<Proxy, String> {
        let log = log_dir.join(format!("proxy-{}.log", rand_suffix()));
        let mut child = cmd
            .env("TILL_HOME", home.path())
            .env("TEST_OPENAI_KEY", OPENAI_SECRET)
            .env("TEST_ANTHROPIC_KEY", ANTHROPIC_SECRET)
            .env("TILL_LOG", log_level)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().unwrap();
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let printed = Arc::new(Mutex::new(String::new()));
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.wait();
                return Err(std::fs::read_to_string(&log).unwrap_or_default());
            }
            printed.lock().unwrap().push_str(&line);
            if let Some(rest) = line.trim().strip_prefix("till: listening on http://") {
                let addr: SocketAddr = rest.parse().unwrap();
                // Keep reading stdout so the proxy never blocks on it.
                let sink = printed.clone();
                std::thread::spawn(move || {
                    let mut line = String::new();
                    while reader.read_line(&mut line).unwrap_or(0) > 0 {
                        sink.lock().unwrap().push_str(&line);
                        line.clear();
                    }
                });
                return Ok(Proxy {
                    addr,
                    child: Some(child),
                    config: config.to_path_buf(),
                    log,
                    stdout: printed,
                });
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The start-up banner: what the proxy printed on stdout, waiting
    /// (up to 5 s) for its last line (`python:`) when there is one.
    pub fn banner(&self) -> String {
        for _ in 0..500 {
            let s = self.stdout.lock().unwrap().clone();
            if s.contains("python:") {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stdout.lock().unwrap().clone()
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit code.
    pub fn terminate(&mut self) -> i32 {
        let mut c = self.child.take().expect("running");
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        c.wait().unwrap().code().unwrap_or(-1)
    }

    /// Restarts with the same config (after kill9 or terminate).
    pub fn restart(&mut self, home: &Home) {
        assert!(self.child.is_none(), "stop the proxy first");
        let p = Self::start_config(home, &self.config).expect("proxy restarts");
        *self = p;
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn rand_suffix() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// An HTTP client for talking to the proxy.
pub fn client() -> reqwest::Client {
    till::proxy::install_crypto();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // A hang fails the test instead of stalling CI.
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A port on 127.0.0.1 where connections are refused, held for as long as
/// the returned socket lives (bound, never listening), so that no other
/// test's ephemeral listener can take it over. Returns the socket and
/// `http://127.0.0.1:PORT`.
pub fn dead_port() -> (tokio::net::TcpSocket, String) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("http://{}", sock.local_addr().unwrap());
    (sock, url)
}

/// POST a chat completion with `token` as Bearer; returns (status, body).
/// `GET path` of the admin API with the home's admin token, as JSON.
pub async fn admin_json(proxy: &Proxy, home: &Home, path: &str) -> serde_json::Value {
    let text = client()
        .get(proxy.url(path))
        .bearer_auth(home.admin())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
}

pub async fn chat(proxy: &Proxy, token: &str, model: &str) -> (u16, serde_json::Value) {
    let r = client()
        .post(proxy.url("/openai/v1/chat/completions"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(
            serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// Sends a request line exactly as given (no client-side normalisation of
/// `..` or `%2e`), returns the status code.
pub async fn raw_request(addr: std::net::SocketAddr, target: &str, extra_headers: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {target} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n{extra_headers}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

/// Sends `head` (request line and header lines, each ending in `\r\n`, no
/// blank line) exactly as given, with no body; returns the status code and
/// the body of the answer. For methods and targets a client library would
/// not send as is (CONNECT, authority-form targets).
pub async fn raw_exchange(addr: std::net::SocketAddr, head: &str) -> (u16, String) {
    raw_send(addr, &format!("{head}\r\n")).await
}

/// Sends `request` byte for byte (head, blank line and any body, framed by
/// the caller) on a connection of its own; returns the status code and the
/// body of the answer.
pub async fn raw_send(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    let text = raw_answer(addr, request).await;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Sends `request` byte for byte on a connection of its own; returns the
/// whole answer as text (status line, header lines, body as framed).
pub async fn raw_answer(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).to_string()
}

/// Sends the proxy `SIGHUP` (reload).
pub fn sighup(proxy: &Proxy) {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Waits until the proxy's log holds `needle` at least `n` times.
pub async fn wait_for_log(proxy: &Proxy, needle: &str, n: usize) -> String {
    for _ in 0..1000 {
        let logs = proxy.logs();
        if logs.matches(needle).count() >= n {
            return logs;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{needle:?} not logged {n} times:\n{}", proxy.logs());
}

/// An upstream on loopback that answers every request with `answer`, byte
/// for byte (framing headers included, however wrong), and closes the
/// connection: for answers no HTTP library would send. Returns its URL.
pub async fn canned_upstream(answer: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                // The whole head first (the requests sent here have no body).
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    url
}
