//! Several `till serve` processes on one real Redis (`store = "redis://…"`):
//! exact caps across replicas, revocations reaching every replica within
//! the bound, and Redis failures answered with 503, never with an uncounted
//! use. Each test starts its own `redis-server` on a free port with its own
//! directory and kills it at the end.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use till::token::Scope;

use crate::helpers::*;

/// A `redis-server` with append-only persistence in a temporary directory.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    fsync: String,
    /// More `redis-server` arguments (`--maxmemory`, ...).
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// `appendonly yes`, `appendfsync always`: the recommended settings.
    pub fn start() -> RedisServer {
        Self::start_with("always")
    }

    pub fn start_with(fsync: &str) -> RedisServer {
        Self::start_with_args(fsync, &[])
    }

    pub fn start_with_args(fsync: &str, extra: &[&str]) -> RedisServer {
        for _ in 0..20 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut s = RedisServer {
                port,
                dir: tempfile::tempdir().unwrap(),
                fsync: fsync.into(),
                extra: extra.iter().map(|a| a.to_string()).collect(),
                child: None,
            };
            if s.spawn() {
                return s;
            }
        }
        panic!("could not start redis-server on a free port");
    }

    /// Starts the server on its port and directory; false if it could not
    /// (the port was taken meanwhile).
    fn spawn(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", &self.fsync])
            .args(&self.extra)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install redis-server)");
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if ping(self.port) {
                self.child = Some(child);
                return true;
            }
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The `till.toml` line that points a proxy here.
    pub fn store_line(&self) -> String {
        format!("store = {:?}", self.url())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL: no shutdown, nothing flushed beyond what fsync already did.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and directory (replaying the AOF).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on port {}", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Whether a Redis answers PING on `port` (not while it is loading its AOF).
fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// `n` state directories sharing one root key, as replicas of one
/// deployment are.
pub fn replica_homes(n: usize) -> Vec<Home> {
    let first = Home::new();
    let key = first.path().join(till::token::keys::ROOT_KEY_FILE);
    let mut homes = vec![first];
    for _ in 1..n {
        let h = Home::empty();
        std::fs::copy(&key, h.path().join(till::token::keys::ROOT_KEY_FILE)).unwrap();
        homes.push(h);
    }
    homes
}

pub fn replicas(homes: &[Home], up: &Upstream, redis: &RedisServer) -> Vec<Proxy> {
    homes
        .iter()
        .map(|h| Proxy::start(h, &[openai(up)], &redis.store_line()))
        .collect()
}

async fn get_status(url: &str) -> u16 {
    match client().get(url).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// The usage view of one replica: (uses, limit) of the family whose root
/// has `limit`.
async fn family_uses(p: &Proxy, home: &Home, limit: u64) -> u64 {
    let text = client()
        .get(p.url("/admin/usage"))
        .bearer_auth(home.admin())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let fam = v["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["limit"] == limit)
        .unwrap_or_else(|| panic!("no family with limit {limit} in {v}"));
    fam["uses"].as_u64().unwrap()
}

/// Waits until every proxy's `/readyz` answers `status`.
async fn wait_ready(proxies: &[Proxy], status: u16, within: Duration) {
    let t0 = Instant::now();
    for p in proxies {
        while get_status(&p.url("/readyz")).await != status {
            assert!(
                t0.elapsed() < within,
                "/readyz of {} did not turn {status} within {within:?}",
                p.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Exact caps across replicas: 300 concurrent requests of 30 children of a
/// 10-use token, spread over 3 proxies, forward exactly 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_proxies_on_one_redis_forward_exactly_the_limit() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let homes = replica_homes(3);
    let proxies = replicas(&homes, &up, &redis);
    let root = homes[0].token("openai", Some(10));
    let children: Vec<String> = (0..30).map(|_| child(&root, Scope::default())).collect();
    let statuses = join_all((0..300).map(|i| chat(&proxies[i % 3], &children[i % 30], "m"))).await;
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(ok, 10, "forwarded across 3 replicas");
    assert_eq!(up.count(), 10, "the upstream saw exactly the limit");
    for (s, body) in &statuses {
        assert!(*s == 200 || *s == 429, "unexpected {s}: {body}");
    }
    // The usage view of every replica shows the deployment's numbers.
    for (p, h) in proxies.iter().zip(&homes) {
        assert_eq!(
            family_uses(p, h, 10).await,
            10,
            "usage seen from {}",
            p.addr
        );
    }
}

/// Revocation through proxy A is enforced by B and C within the bound
/// (measured; the hard bound is 1 s, pub/sub normally takes milliseconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_through_one_proxy_is_enforced_by_the_others_within_the_bound() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let homes = replica_homes(3);
    let proxies = replicas(&homes, &up, &redis);
    let mut delays = Vec::new();
    for _ in 0..5 {
        let token = homes[0].token("openai", None);
        for p in &proxies[1..] {
            assert_eq!(chat(p, &token, "m").await.0, 200, "usable before");
        }
        let r = client()
            .post(proxies[0].url("/admin/revoke"))
            .bearer_auth(homes[0].admin())
            .header("content-type", "application/json")
            .body(serde_json::json!({ "token": token }).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let revoked_at = Instant::now();
        for p in &proxies[1..] {
            loop {
                let (s, body) = chat(p, &token, "m").await;
                if s == 403 {
                    assert_eq!(body["error"]["code"], "token_revoked", "{body}");
                    delays.push(revoked_at.elapsed());
                    break;
                }
                assert_eq!(s, 200, "{body}");
                assert!(
                    revoked_at.elapsed() < Duration::from_secs(5),
                    "{} still forwards a revoked token",
                    p.addr
                );
            }
        }
    }
    delays.sort();
    eprintln!(
        "revocation propagation over {} checks: median {:?}, max {:?}",
        delays.len(),
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    assert!(
        delays[delays.len() - 1] < Duration::from_secs(1),
        "hard bound of 1 s exceeded: {delays:?}"
    );
}

/// Redis killed with -9 under load: requests get 503, nothing is forwarded
/// uncounted; restarted from its AOF (`appendfsync always`) the counts are
/// at least what was forwarded, the limit is never overshot, and the
/// proxies recover by themselves, `/readyz` following.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_under_load_gives_503s_and_loses_no_forwarded_use() {
    const LIMIT: u64 = 60;
    let mut redis = RedisServer::start();
    let up = Upstream::start().await;
    let homes = replica_homes(2);
    let proxies = Arc::new(replicas(&homes, &up, &redis));
    let token = homes[0].token("openai", Some(LIMIT));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..6 {
        let (proxies, token, stop) = (proxies.clone(), token.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let (s, body) = chat(&proxies[w % 2], &token, "m").await;
                seen.push((s, body));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        }));
    }
    while up.count() < 5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    redis.kill9();
    wait_ready(&proxies, 503, Duration::from_secs(5)).await;
    // Down: nothing more reaches the upstream.
    let forwarded_while_down = up.count();
    for p in proxies.iter() {
        let (s, body) = chat(p, &token, "m").await;
        assert_eq!(s, 503, "{body}");
        assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
        // The store's address is the operator's, not the agent's.
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            !message.contains("redis") && !message.contains(&redis.port.to_string()),
            "{message}"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        up.count(),
        forwarded_while_down,
        "forwarded while redis was down"
    );

    redis.restart();
    wait_ready(&proxies, 200, Duration::from_secs(10)).await;
    let forwarded = up.count() as u64;
    let counted = family_uses(&proxies[1], &homes[1], LIMIT).await;
    assert!(
        counted >= forwarded,
        "redis restarted with {counted} uses but {forwarded} were forwarded"
    );
    // Spend what is left: never more than the limit in all.
    let t0 = Instant::now();
    while family_uses(&proxies[0], &homes[0], LIMIT).await < LIMIT {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "load never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut statuses = Vec::new();
    for w in workers {
        statuses.extend(w.await.unwrap());
    }
    for (s, body) in &statuses {
        assert!(
            matches!(s, 200 | 429 | 503),
            "unexpected {s} (only 200, 429 and 503 are right here): {body}"
        );
    }
    assert!(
        statuses.iter().any(|(s, _)| *s == 503),
        "no 503 while redis was down"
    );
    assert!(
        up.count() as u64 <= LIMIT,
        "{} forwarded over a limit of {LIMIT}",
        up.count()
    );
    for p in proxies.iter() {
        assert_eq!(chat(p, &token, "m").await.0, 429);
    }
}

/// One replica killed with -9: the others keep counting the same budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_proxy_leaves_the_others_counting() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let homes = replica_homes(2);
    let mut proxies = replicas(&homes, &up, &redis);
    let token = homes[0].token("openai", Some(6));
    for _ in 0..3 {
        assert_eq!(chat(&proxies[0], &token, "m").await.0, 200);
    }
    proxies[0].kill9();
    for _ in 0..3 {
        assert_eq!(chat(&proxies[1], &token, "m").await.0, 200);
    }
    assert_eq!(chat(&proxies[1], &token, "m").await.0, 429);
    assert_eq!(up.count(), 6);
}

/// `appendfsync everysec` can lose the last second of counts on a crash:
/// `till serve` says so at start.
#[tokio::test]
async fn serve_warns_when_redis_can_lose_forwarded_uses() {
    let redis = RedisServer::start_with("everysec");
    let up = Upstream::start().await;
    let home = Home::new();
    let p = Proxy::start(&home, &[openai(&up)], &redis.store_line());
    let t0 = Instant::now();
    while !p.logs().contains("appendfsync \"everysec\"") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no warning in:\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(redis.dir().exists());
}

/// Regression (red team, wave 2): with `maxmemory` and an evicting policy
/// (volatile-lru is the default of common managed services), memory
/// pressure any token holder can cause evicted use counters, and spent
/// tokens got their uses back; `till serve` started with no more than the
/// persistence warning. It now refuses to start (exit 2) and says how to
/// fix it; the same server with `noeviction` is fine.
#[test]
fn serve_refuses_to_start_on_a_redis_that_evicts_keys() {
    let redis = RedisServer::start_with_args(
        "always",
        &["--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"],
    );
    let home = Home::new();
    let cfg = home.write(
        "till.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n{}\n",
            home.path().to_str().unwrap(),
            redis.store_line()
        ),
    );
    let mut serve = Command::new(BIN)
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("TILL_HOME", home.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while serve.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(15) {
            let _ = serve.kill();
            let out = serve.wait_with_output().unwrap();
            panic!(
                "till serve runs on an evicting Redis:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = serve.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("maxmemory-policy volatile-lru"), "{stderr}");
    assert!(
        stderr.contains("set `maxmemory-policy noeviction`"),
        "{stderr}"
    );
}

/// No Redis at the configured address: the proxy refuses to start rather
/// than run with an unknown revocation list, and says where it looked.
#[test]
fn serve_refuses_to_start_without_its_redis() {
    let (_sock, url) = dead_port();
    let home = Home::new();
    let port = url.rsplit(':').next().unwrap();
    let cfg = home.write(
        "till.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\nstore = \"redis://:hunter2@127.0.0.1:{port}/0\"\n",
            home.path().to_str().unwrap()
        ),
    );
    let out = till(["serve", "--config", cfg.to_str().unwrap()])
        .home(&home)
        .run();
    assert_ne!(out.code, 0);
    out.stderr_has(&format!("127.0.0.1:{port}"));
    assert!(
        !out.stderr.contains("hunter2"),
        "password printed: {}",
        out.stderr
    );
}

/// Regression: `Idempotency-Key` claims were kept per process, so a retry
/// of a failed request sent to another replica was counted again, and a
/// different request could reuse the key there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_an_idempotent_retry_through_another_replica_is_free() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let homes = replica_homes(2);
    let proxies = replicas(&homes, &up, &redis);
    let token = homes[0].token("openai", Some(5));
    let send = |p: &Proxy, body: &'static str| {
        client()
            .post(p.url("/openai/v1/chat/completions"))
            .bearer_auth(&token)
            .header("idempotency-key", "K")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    up.state.fail_next.store(1, Ordering::SeqCst);
    let first = send(&proxies[0], r#"{"model":"a"}"#).await.unwrap();
    assert_eq!(first.status(), 500, "the upstream failed the first attempt");
    // The same request through the other replica: a free retry.
    let again = send(&proxies[1], r#"{"model":"a"}"#).await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(up.count(), 2, "both attempts reached the upstream");
    for (p, h) in proxies.iter().zip(&homes) {
        assert_eq!(family_uses(p, h, 5).await, 1, "one use for two attempts");
    }
    // A different request under the same key, on either replica: refused.
    for p in &proxies {
        let r = send(p, r#"{"model":"b"}"#).await.unwrap();
        assert_eq!(r.status(), 422);
        let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(v["error"]["code"], "idempotency_key_reused", "{v}");
    }
    // A success is not free to replay, whichever replica sees it.
    assert_eq!(
        send(&proxies[0], r#"{"model":"a"}"#)
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(family_uses(&proxies[1], &homes[1], 5).await, 2);
}

/// Concurrent attempts with one key, spread over two replicas: one runs,
/// every other one gets 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_concurrent_requests_with_one_key_across_replicas_run_once() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let homes = replica_homes(2);
    let proxies = replicas(&homes, &up, &redis);
    let token = homes[0].token("openai", Some(100));
    // The attempt that wins hangs at the upstream: the key stays in flight.
    let send = |i: usize| {
        client()
            .get(proxies[i % 2].url("/openai/hang"))
            .bearer_auth(&token)
            .header("idempotency-key", "same")
            .timeout(Duration::from_secs(3))
            .send()
    };
    let results = join_all((0..10).map(send)).await;
    let conflicts = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status() == 409))
        .count();
    assert_eq!(conflicts, 9, "exactly one attempt may run");
    assert_eq!(up.count(), 1, "exactly one attempt reached the upstream");
    assert_eq!(family_uses(&proxies[0], &homes[0], 100).await, 1);
}

/// Regression: alert de-duplication was per process, so every replica that
/// saw a revoked token sent its own alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_revoked_token_used_on_two_replicas_raises_one_alert() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let (hook, hook_url) = crate::monitor::Receiver::start().await;
    let homes = replica_homes(2);
    let extra = format!(
        "{}\n[[alerts.webhooks]]\nurl = {hook_url:?}\n",
        redis.store_line()
    );
    let proxies: Vec<Proxy> = homes
        .iter()
        .map(|h| Proxy::start(h, &[openai(&up)], &extra))
        .collect();
    let token = homes[0].token("openai", None);
    assert_eq!(chat(&proxies[0], &token, "m").await.0, 200);
    till(["revoke", &token, "--url", &proxies[0].url("")])
        .home(&homes[0])
        .env("TILL_ADMIN_TOKEN", &homes[0].admin())
        .run()
        .success();
    for p in &proxies {
        for _ in 0..3 {
            assert_eq!(chat(p, &token, "m").await.0, 403);
        }
    }
    hook.wait_for("a revoked_token_used alert", |g| {
        g.iter().any(|a| a["kind"] == "revoked_token_used")
    })
    .await;
    // Give the other replica's claim and delivery time to happen, if they
    // were going to.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let revoked = hook
        .kinds()
        .iter()
        .filter(|k| *k == "revoked_token_used")
        .count();
    assert_eq!(
        revoked,
        1,
        "one alert for the deployment: {:?}",
        hook.kinds()
    );
}

/// `till store export` / `import` move counts and revocations from the
/// embedded store to Redis and back without losing a use: a token with 3
/// of 5 uses spent has exactly 2 left on Redis, importing an older (lower)
/// count changes nothing, and back in the embedded store the token is used
/// up and the revocations made on Redis hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_and_revocations_move_to_redis_and_back_without_losing_a_use() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let homes = replica_homes(2);
    let mut embedded = Proxy::start(&homes[0], &[openai(&up)], "");
    let token = homes[0].token("openai", Some(5));
    let revoked_before = homes[0].token("openai", None);
    for _ in 0..3 {
        assert_eq!(chat(&embedded, &token, "m").await.0, 200);
    }
    let revoke = |t: &str, p: &Proxy, h: &Home| {
        till(["revoke", t, "--url", &p.url("")])
            .home(h)
            .env("TILL_ADMIN_TOKEN", &h.admin())
            .run()
            .success();
    };
    revoke(&revoked_before, &embedded, &homes[0]);
    // The embedded store's file is locked while its proxy runs.
    let first = homes[0].path().join("first.json");
    let cfg0 = embedded.config.to_str().unwrap().to_string();
    till([
        "store",
        "export",
        first.to_str().unwrap(),
        "--config",
        &cfg0,
    ])
    .home(&homes[0])
    .run()
    .code(2)
    .stderr_has("stop the proxy");
    assert_eq!(embedded.terminate(), 0);
    till([
        "store",
        "export",
        first.to_str().unwrap(),
        "--config",
        &cfg0,
    ])
    .home(&homes[0])
    .run()
    .success()
    .stderr_has("revocations from the embedded store");
    till([
        "store",
        "import",
        first.to_str().unwrap(),
        "--store",
        &redis.url(),
    ])
    .home(&homes[0])
    .run()
    .success();

    let on_redis = Proxy::start(&homes[1], &[openai(&up)], &redis.store_line());
    assert_eq!(chat(&on_redis, &revoked_before, "m").await.0, 403);
    assert_eq!(chat(&on_redis, &token, "m").await.0, 200, "use 4 of 5");
    // Importing the older file again cannot lower the count.
    till([
        "store",
        "import",
        first.to_str().unwrap(),
        "--store",
        &redis.url(),
    ])
    .home(&homes[0])
    .run()
    .success()
    .stderr_has(": 0 counters set from the file");
    assert_eq!(chat(&on_redis, &token, "m").await.0, 200, "use 5 of 5");
    assert_eq!(
        chat(&on_redis, &token, "m").await.0,
        429,
        "exactly 2 were left"
    );
    let revoked_on_redis = homes[0].token("openai", None);
    revoke(&revoked_on_redis, &on_redis, &homes[1]);

    // And back: exported from Redis while its proxy runs, imported into the
    // embedded store, which had 3.
    let back = homes[1].path().join("back.json");
    let cfg1 = on_redis.config.to_str().unwrap().to_string();
    till(["store", "export", back.to_str().unwrap(), "--config", &cfg1])
        .home(&homes[1])
        .run()
        .success();
    till(["store", "import", back.to_str().unwrap(), "--config", &cfg0])
        .home(&homes[0])
        .run()
        .success();
    embedded.restart(&homes[0]);
    assert_eq!(chat(&embedded, &token, "m").await.0, 429, "used up");
    assert_eq!(chat(&embedded, &revoked_on_redis, "m").await.0, 403);
    assert_eq!(chat(&embedded, &revoked_before, "m").await.0, 403);
    assert_eq!(up.count(), 5, "five uses in all, across both stores");
}

/// `INFO commandstats` as (command, calls).
fn command_calls(redis: &RedisServer) -> std::collections::HashMap<String, u64> {
    let out = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "INFO", "commandstats"])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// Issue "Scale out on Redis": one round trip per warm request. The
/// decision starts from the counts this proxy saw last, and the reserve
/// script returns the exact ones; only the revocation version poll runs
/// besides it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_token_costs_one_redis_round_trip_per_request() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let homes = replica_homes(1);
    let proxies = replicas(&homes, &up, &redis);
    let token = homes[0].token("openai", Some(100));
    assert_eq!(chat(&proxies[0], &token, "m").await.0, 200, "warm-up");
    let before = command_calls(&redis);
    for _ in 0..20 {
        assert_eq!(chat(&proxies[0], &token, "m").await.0, 200);
    }
    let after = command_calls(&redis);
    let delta = |c: &str| after.get(c).unwrap_or(&0) - before.get(c).unwrap_or(&0);
    // commandstats also counts the commands the reserve script runs inside
    // Redis (hincrby, hset, ...); what crosses the network is the EVALSHA,
    // plus the HGETs a read of the counts would send.
    assert_eq!(delta("evalsha"), 20, "one reserve script per request");
    assert_eq!(delta("hget"), 0, "no read of the counts before deciding");
    assert_eq!(delta("eval") + delta("hmget") + delta("exec"), 0);
    assert_eq!(up.count(), 21);
}

/// The remembered counts only ever allow: a token spent to its limit
/// through another replica is refused with the exact count, and nothing
/// is forwarded past the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remembered_counts_never_let_a_replica_overshoot() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let homes = replica_homes(2);
    let proxies = replicas(&homes, &up, &redis);
    let token = homes[0].token("openai", Some(3));
    // Replica 0 remembers 1 use; replica 1 spends the other 2.
    assert_eq!(chat(&proxies[0], &token, "m").await.0, 200);
    assert_eq!(chat(&proxies[1], &token, "m").await.0, 200);
    assert_eq!(chat(&proxies[1], &token, "m").await.0, 200);
    let (status, body) = chat(&proxies[0], &token, "m").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(up.count(), 3);
    assert_eq!(family_uses(&proxies[0], &homes[0], 3).await, 3);
    // Still refused, and still not overshot, on the next try.
    assert_eq!(chat(&proxies[0], &token, "m").await.0, 429);
    assert_eq!(family_uses(&proxies[1], &homes[0], 3).await, 3);
}

/// The same for an MCP tool call: the decision starts from the counts this
/// proxy saw last (it used to read them from Redis first), and remembered
/// counts still never overshoot a limit another replica spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_mcp_tool_call_costs_one_redis_round_trip_and_never_overshoots() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let homes = replica_homes(2);
    let extra = format!(
        "{}\n[upstreams.tools]\nurl = {:?}\napi = \"mcp\"\ncredential = {{ env = \"TEST_OPENAI_KEY\" }}\n",
        redis.store_line(),
        up.url()
    );
    let proxies: Vec<Proxy> = homes.iter().map(|h| Proxy::start(h, &[], &extra)).collect();
    let call = |p: &Proxy, token: &str| {
        let (url, token) = (p.url("/tools/mcp"), token.to_string());
        async move {
            let r = client()
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .body(
                    serde_json::json!({
                        "jsonrpc": "2.0", "id": 7, "method": "tools/call",
                        "params": {"name": "add", "arguments": {}},
                    })
                    .to_string(),
                )
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    };
    let token = homes[0].token("tools", Some(23));
    let (s, body) = call(&proxies[0], &token).await;
    assert_eq!(s, 200, "warm-up: {body}");
    let before = command_calls(&redis);
    for _ in 0..20 {
        assert_eq!(call(&proxies[0], &token).await.0, 200);
    }
    let after = command_calls(&redis);
    let delta = |c: &str| after.get(c).unwrap_or(&0) - before.get(c).unwrap_or(&0);
    assert_eq!(delta("evalsha"), 20, "one reserve script per tool call");
    assert_eq!(delta("hget"), 0, "no read of the counts before deciding");
    // Replica 0 remembers 21 uses; replica 1 spends the last 2.
    assert_eq!(call(&proxies[1], &token).await.0, 200);
    assert_eq!(call(&proxies[1], &token).await.0, 200);
    let (_, refused) = call(&proxies[0], &token).await;
    assert!(refused.contains("\"error\""), "{refused}");
    assert!(refused.contains("\"id\":7"), "{refused}");
    assert_eq!(
        up.count(),
        23,
        "a tool call past the limit reached the server"
    );
}

/// One inline command to the Redis on `port`; its reply's first line.
fn redis_inline(port: u16, cmd: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

/// A client that hangs up while Redis is slow to count its request (here
/// paused) spends no use: the request was never forwarded, so its use is
/// given back once Redis answers, and the token keeps its whole budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_while_redis_counts_spends_nothing() {
    use tokio::io::AsyncWriteExt;
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let homes = replica_homes(1);
    let proxies = replicas(&homes, &up, &redis);
    let token = homes[0].token("openai", Some(3));
    assert_eq!(chat(&proxies[0], &token, "m").await.0, 200);

    assert!(redis_inline(redis.port, "CLIENT PAUSE 500 WRITE").starts_with("+OK"));
    let body = r#"{"model":"m","messages":[]}"#;
    let mut s = tokio::net::TcpStream::connect(proxies[0].addr)
        .await
        .unwrap();
    let req = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n\
         authorization: Bearer {token}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(s);
    // The pause ends (within the store's 1 s deadline for a call, past
    // which the outcome would be unknown and the use kept); the script runs
    // and answers a request that is gone.
    tokio::time::sleep(Duration::from_millis(1000)).await;

    assert_eq!(up.count(), 1, "the abandoned request was not forwarded");
    let t0 = Instant::now();
    while family_uses(&proxies[0], &homes[0], 3).await != 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the abandoned request's use was not given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..2 {
        assert_eq!(chat(&proxies[0], &token, "m").await.0, 200);
    }
    assert_eq!(chat(&proxies[0], &token, "m").await.0, 429);
    assert_eq!(up.count(), 3);
}

/// Red team (wave 2, fourth pass): Redis losing its data under running
/// proxies (`FLUSHALL` here; the same for `FLUSHDB`, a restart without
/// persistence, a failover to an empty server) started every counter again
/// from zero, and the proxies went on serving: a spent token got its whole
/// budget back, and nothing was logged. Now the proxies notice that Redis
/// no longer holds the store id they counted in and refuse every request
/// (503, `/readyz` 503); a restarted proxy refuses to start on it, naming
/// the file to remove if the new data is meant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_redis_that_lost_its_data_gives_no_use_back() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let homes = replica_homes(2);
    let mut proxies = replicas(&homes, &up, &redis);
    let token = homes[0].token("openai", Some(3));
    for i in 0..3 {
        assert_eq!(chat(&proxies[i % 2], &token, "m").await.0, 200);
    }
    assert_eq!(chat(&proxies[0], &token, "m").await.0, 429, "spent");
    assert_eq!(redis_inline(redis.port, "FLUSHALL").trim(), "+OK");
    for i in 0..6 {
        let (status, body) = chat(&proxies[i % 2], &token, "m").await;
        assert_ne!(status, 200, "a spent token after the wipe: {body}");
    }
    assert_eq!(up.count(), 3, "no use given back by the wipe");
    wait_ready(&proxies, 503, Duration::from_secs(10)).await;
    let fresh = homes[0].token("openai", Some(3));
    for p in &proxies {
        let (status, body) = chat(p, &fresh, "m").await;
        assert_eq!(status, 503, "{body}");
    }
    assert_eq!(up.count(), 3);
    assert!(
        proxies[0]
            .logs()
            .contains("lost the data this proxy counted in"),
        "{}",
        proxies[0].logs()
    );
    // A restart does not accept the wipe either.
    proxies[0].kill9();
    let Err(err) = Proxy::start_config(&homes[0], &proxies[0].config) else {
        panic!("a proxy started on a wiped Redis");
    };
    assert!(err.contains(till::store::redis::marker::FILE), "{err}");
    assert_eq!(up.count(), 3);
}
