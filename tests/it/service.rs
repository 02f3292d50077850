//! A service that verifies Till tokens itself (issue 12, `till-tower`):
//! the example `examples/service.rs` run as a real process next to a real
//! `till serve`, whose revocation feed, key set and forward-auth it uses.
//!
//! The example binary is built by `cargo test` (all targets) or
//! `cargo build --example service`; `cargo test --test it` alone does not
//! build it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::future::join_all;
use till::token::{RawToken, Scope};

use crate::helpers::*;

/// `target/<profile>/examples/service`, next to this test binary's `deps/`.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = dir.join("examples").join("service");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --example service` (a plain `cargo test` builds it)",
        bin.display()
    );
    bin
}

/// The example service, killed on drop.
struct Service {
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Service {
    fn start(home: &Home, args: &[&str]) -> Service {
        let log = home
            .path()
            .join(format!("service-{}.log", rand::random::<u32>()));
        let mut child = Command::new(example_binary())
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("TILL_PUBLIC_KEY")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the example service");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let Some(addr) = line.trim().strip_prefix("service: listening on http://") else {
            let _ = child.kill();
            panic!(
                "the service did not start: {line:?}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Service {
            addr: addr.parse().unwrap(),
            child,
            log,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn get(&self, token: &str) -> (u16, serde_json::Value) {
        let r = client()
            .get(self.url("/v1/items"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (
            s,
            serde_json::from_str(&r.text().await.unwrap()).unwrap_or_default(),
        )
    }

    async fn metrics(&self) -> String {
        client()
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Polls `GET /v1/items` every 20 ms until it answers `status` (at
    /// most 30 s, which only stops a broken build from hanging).
    async fn wait_for(&self, token: &str, status: u16) -> serde_json::Value {
        self.wait_for_error(token, status, None).await
    }

    /// Polls until the answer has `status` and, when given, the error
    /// `code` (a 503 can also mean "no feed yet" while the service starts).
    async fn wait_for_error(
        &self,
        token: &str,
        status: u16,
        code: Option<&str>,
    ) -> serde_json::Value {
        let mut last = (0, serde_json::Value::Null);
        for _ in 0..1500 {
            last = self.get(token).await;
            if last.0 == status && code.is_none_or(|c| last.1["error"]["code"] == c) {
                return last.1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "the service never answered {status}; last {last:?}\n{}",
            self.logs()
        );
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy with an `items` upstream (never forwarded to here: the service
/// only uses the proxy's feed, key set and forward-auth).
fn proxy_for_items(home: &Home) -> Proxy {
    Proxy::start(
        home,
        &[],
        "[upstreams.items]\nurl = \"http://127.0.0.1:9\"\ncredential = \"none\"\n",
    )
}

fn items_token(home: &Home, methods: &[&str], max_uses: Option<u64>) -> String {
    home.issue(Scope {
        services: vec!["items".into()],
        methods: methods.iter().map(|m| m.to_string()).collect(),
        paths: vec!["/v1/items".into()],
        max_uses,
        ..Scope::default()
    })
}

/// The service following `proxy`'s feed, with `extra` arguments.
fn service_for(home: &Home, proxy: &Proxy, extra: &[&str]) -> Service {
    let public = home.public();
    let feed = proxy.url("/revocations");
    let mut args = vec![
        "--public-key",
        &public,
        "--feed",
        &feed,
        "--refresh-every",
        "200ms",
    ];
    args.extend_from_slice(extra);
    if !extra.contains(&"--max-feed-age") {
        args.extend_from_slice(&["--max-feed-age", "30s"]);
    }
    Service::start(home, &args)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_allows_in_scope_and_refuses_out_of_scope_and_unenforceable_use_limits() {
    let home = Home::new();
    let proxy = proxy_for_items(&home);
    let svc = service_for(&home, &proxy, &[]);
    let reader = items_token(&home, &["GET"], None);
    let family = RawToken::parse(&reader).unwrap().revocation_ids()[0].clone();

    let body = svc.wait_for(&reader, 200).await;
    assert_eq!(body["caller"]["family"], family.as_str(), "{body}");
    let m = svc.metrics().await;
    assert!(m.contains("till_feed_version 0"), "{m}");
    assert!(m.contains("till_feed_stale 0"), "{m}");

    // POST is outside a GET-only token; allowed for a GET+POST one.
    let post = |t: &str| {
        client()
            .post(svc.url("/v1/items"))
            .bearer_auth(t)
            .header("content-type", "application/json")
            .body(r#"{"name":"x"}"#)
            .send()
    };
    let r = post(&reader).await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "out_of_scope", "{v}");
    let writer = items_token(&home, &["GET", "POST"], None);
    assert_eq!(post(&writer).await.unwrap().status().as_u16(), 201);

    // Another service's token, no token, a token of another installation.
    assert_eq!(svc.get(&home.token("openai", None)).await.0, 403);
    let r = client().get(svc.url("/v1/items")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(svc.get(&items_token(&Home::new(), &[], None)).await.0, 401);

    // A token with uses cannot be counted here: refused, and told why.
    let (s, v) = svc.get(&items_token(&home, &[], Some(3))).await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["error"]["code"], "use_limits_unenforced", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot enforce them"),
        "{v}"
    );
    // Outside the layer.
    let r = client().get(svc.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_revoked_at_the_proxy_is_refused_by_the_service_at_the_next_refresh() {
    let home = Home::new();
    let proxy = proxy_for_items(&home);
    let svc = service_for(&home, &proxy, &[]);
    let parent = items_token(&home, &[], None);
    let kid = child(&parent, Scope::default());
    svc.wait_for(&kid, 200).await;

    till(["revoke", &parent, "--url", &proxy.url("")])
        .home(&home)
        .env("TILL_ADMIN_TOKEN", &home.admin())
        .run()
        .success();
    // The child of the revoked token, through the feed (refreshed every
    // 200 ms; polled, not slept on).
    let v = svc.wait_for(&kid, 403).await;
    assert_eq!(v["error"]["code"], "token_revoked", "{v}");
    assert!(svc.metrics().await.contains("till_feed_version 1"));
    assert_eq!(svc.get(&parent).await.0, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_refuses_with_503_once_the_feed_server_is_gone_past_max_feed_age() {
    let home = Home::new();
    let mut proxy = proxy_for_items(&home);
    let svc = service_for(&home, &proxy, &["--max-feed-age", "1s"]);
    let token = items_token(&home, &[], None);
    svc.wait_for(&token, 200).await;

    proxy.kill9();
    let mut tries = 0;
    let r = loop {
        tries += 1;
        assert!(tries < 1500, "never refused:\n{}", svc.logs());
        let r = client()
            .get(svc.url("/v1/items"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 503 {
            break r;
        }
        assert_eq!(r.status().as_u16(), 200, "only allowed or stale");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(r.headers()["x-should-retry"], "true");
    let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "revocation_feed_stale", "{v}");
    let m = svc.metrics().await;
    assert!(m.contains("till_feed_stale 1"), "{m}");
    assert!(!m.contains("till_feed_refresh_failures_total 0\n"), "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_count_mode_lets_exactly_three_of_twenty_concurrent_requests_through() {
    let home = Home::new();
    let proxy = proxy_for_items(&home);
    let check = proxy.url("/auth/items");
    let svc = service_for(
        &home,
        &proxy,
        &[
            "--use-limits",
            "remote",
            "--check-url",
            &check,
            // A loaded machine must not turn a slow check into a 503.
            "--timeout",
            "60s",
        ],
    );
    // Wait for the feed with a token the count does not concern.
    svc.wait_for(&items_token(&home, &[], None), 200).await;

    let token = items_token(&home, &[], Some(3));
    let answers = join_all((0..20).map(|_| svc.get(&token))).await;
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let exhausted = answers.iter().filter(|a| a.0 == 429).count();
    assert_eq!((ok, exhausted), (3, 17), "{answers:?}");
    let used_up = answers.iter().find(|a| a.0 == 429).unwrap();
    assert_eq!(
        used_up.1["error"]["code"], "activations_exhausted",
        "{used_up:?}"
    );
    // The proxy's count holds for the service's next request too.
    assert_eq!(svc.get(&token).await.0, 429);
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_count_mode_fails_closed_when_the_proxy_cannot_count() {
    let home = Home::new();
    let proxy = proxy_for_items(&home);
    // The proxy has no upstream `other`: its check answers 404, which is
    // no decision.
    let svc = service_for(
        &home,
        &proxy,
        &[
            "--use-limits",
            "remote",
            "--check-url",
            &proxy.url("/auth/other"),
        ],
    );
    let v = svc
        .wait_for_error(
            &items_token(&home, &[], Some(3)),
            503,
            Some("counter_unavailable"),
        )
        .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_follows_a_root_key_rotation_at_the_proxy() {
    let home = Home::new();
    let proxy = proxy_for_items(&home);
    // The service trusts key 0 only, as configured before the rotation.
    let svc = service_for(&home, &proxy, &[]);
    let old = items_token(&home, &[], None);
    svc.wait_for(&old, 200).await;

    till(["keygen", "--rotate"]).home(&home).run().success();
    let ok = Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let new = till([
        "issue",
        "--service",
        "items",
        "--path",
        "/v1/items",
        "--ttl",
        "1h",
    ])
    .home(&home)
    .run()
    .success()
    .out();
    assert_eq!(RawToken::parse(&new).unwrap().root_key_id(), Some(1));
    // Key 1 reaches the service with the feed's signed key set.
    svc.wait_for(&new, 200).await;
    assert_eq!(svc.get(&old).await.0, 200, "key 0 still verifies");
    assert!(
        svc.logs().contains("root key set changed"),
        "{}",
        svc.logs()
    );
}
