//! End-to-end tests of the verifier proxy: the real binary, real HTTP, local
//! upstreams that behave like the real APIs.

use std::time::Duration;

use futures_util::StreamExt;
use till::token::Scope;

use crate::helpers::*;

fn scoped(services: &[&str], paths: &[&str], max_uses: Option<u64>) -> Scope {
    Scope {
        services: services.iter().map(|s| s.to_string()).collect(),
        paths: paths.iter().map(|s| s.to_string()).collect(),
        max_uses,
        ..Scope::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn credential_is_injected_and_token_removed() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.token("openai", Some(10));
    let r = client()
        .post(proxy.url("/openai/v1/chat/completions?x=1"))
        .bearer_auth(&token)
        .header("x-api-key", "client-supplied-should-vanish")
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o-mini","messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["model"], "gpt-4o-mini");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.uri, "/v1/chat/completions?x=1");
    assert_eq!(
        s.headers["authorization"],
        format!("Bearer {OPENAI_SECRET}")
    );
    assert!(
        s.headers.get("x-api-key").is_none(),
        "client credential header forwarded"
    );
    for (name, v) in s.headers.iter() {
        let v = v.to_str().unwrap_or("");
        assert!(!v.contains(&token[..40]), "token leaked in header {name}");
    }
    assert_eq!(s.body, r#"{"model":"gpt-4o-mini","messages":[]}"#);
    assert!(!proxy.logs().contains(OPENAI_SECRET), "credential in logs");
    assert!(!proxy.logs().contains(&token[..40]), "token in logs");
}

#[tokio::test(flavor = "multi_thread")]
async fn anthropic_header_style_works_unchanged() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[anthropic(&up)], "");
    let token = home.token("anthropic", None);
    // The Anthropic SDK sends its api_key as x-api-key.
    let r = client()
        .post(proxy.url("/anthropic/v1/messages"))
        .header("x-api-key", &token)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(r#"{"model":"claude-3-5-haiku-latest","max_tokens":5,"messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let s = &up.seen()[0];
    assert_eq!(s.headers["x-api-key"], ANTHROPIC_SECRET);
    assert_eq!(s.headers["anthropic-version"], "2023-06-01");
    assert!(s.headers.get("authorization").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_chunks_reach_the_client_before_the_stream_ends() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.token("openai", None);
    let r = client()
        .post(proxy.url("/openai/v1/chat/completions"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(r#"{"model":"m","stream":true,"gated":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut stream = r.bytes_stream();
    // The upstream holds chunk two until we release it: if the proxy
    // buffered, chunk one would never arrive and this would time out.
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("first chunk arrives while the upstream is still streaming")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("one"));
    up.state.gate.notify_one();
    let mut rest = Vec::new();
    while let Some(c) = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("stream finishes")
    {
        rest.extend_from_slice(&c.unwrap());
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("two") && rest.contains("[DONE]"), "{rest}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_status_code_has_a_clear_json_error() {
    let up = Upstream::start().await;
    let home = Home::new();
    // A port where connections are refused.
    let (_held, down_url) = dead_port();
    let down = Up {
        name: "down",
        url: down_url,
        header: "authorization",
        prefix: "Bearer ",
        env: "TEST_OPENAI_KEY",
    };
    let proxy = Proxy::start(
        &home,
        &[openai(&up), down],
        "[limits]\nidle_timeout_secs = 1\nmax_body_bytes = 1000\n",
    );
    let c = client();
    let ok = home.issue(scoped(
        &["openai", "down"],
        &["/v1/chat/", "/status/", "/hang", "/x"],
        Some(3),
    ));

    let check = |r: reqwest::Response, status: u16, code: &'static str| async move {
        assert_eq!(r.status().as_u16(), status);
        let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().len() > 10);
        v
    };
    // 401: no token, garbage token, token of another root key.
    check(
        c.get(proxy.url("/openai/v1/chat/x")).send().await.unwrap(),
        401,
        "missing_token",
    )
    .await;
    check(
        c.get(proxy.url("/openai/v1/chat/x"))
            .bearer_auth("garbage!")
            .send()
            .await
            .unwrap(),
        401,
        "invalid_token",
    )
    .await;
    let other = Home::new().token("openai", None);
    let v = check(
        c.get(proxy.url("/openai/v1/chat/x"))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap(),
        401,
        "invalid_token",
    )
    .await;
    assert!(v["error"]["message"].as_str().unwrap().contains("root key"));
    // 403 with the reason.
    let v = check(
        c.get(proxy.url("/openai/v1/files"))
            .bearer_auth(&ok)
            .send()
            .await
            .unwrap(),
        403,
        "out_of_scope",
    )
    .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/files"),
        "{v}"
    );
    // 404: unknown service.
    check(
        c.get(proxy.url("/nope/v1"))
            .bearer_auth(&ok)
            .send()
            .await
            .unwrap(),
        404,
        "unknown_service",
    )
    .await;
    // 400: an encoded slash cannot be normalised safely.
    check(
        c.get(proxy.url("/openai/v1/chat%2f..%2ffiles"))
            .bearer_auth(&ok)
            .send()
            .await
            .unwrap(),
        400,
        "bad_request",
    )
    .await;
    // 413: JSON body over the limit.
    let big = format!(r#"{{"model":"m","pad":"{}"}}"#, "x".repeat(2000));
    check(
        c.post(proxy.url("/openai/v1/chat/completions"))
            .bearer_auth(&ok)
            .header("content-type", "application/json")
            .body(big)
            .send()
            .await
            .unwrap(),
        413,
        "body_too_large",
    )
    .await;
    assert_eq!(up.count(), 0, "nothing forwarded so far");
    // 502: upstream unreachable; 504: upstream silent past the idle timeout.
    check(
        c.get(proxy.url("/down/x"))
            .bearer_auth(&ok)
            .send()
            .await
            .unwrap(),
        502,
        "upstream_error",
    )
    .await;
    check(
        c.get(proxy.url("/openai/hang"))
            .bearer_auth(&ok)
            .send()
            .await
            .unwrap(),
        504,
        "upstream_timeout",
    )
    .await;
    // 409 while an attempt with the same Idempotency-Key runs (it hangs
    // until the idle timeout), then 422 for another request under that key.
    let free = home.token("openai", None);
    let hanging = {
        let req = c
            .get(proxy.url("/openai/hang"))
            .bearer_auth(&free)
            .header("idempotency-key", "k")
            .send();
        tokio::spawn(req)
    };
    let seen = up.count();
    while up.count() == seen {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check(
        c.get(proxy.url("/openai/hang"))
            .bearer_auth(&free)
            .header("idempotency-key", "k")
            .send()
            .await
            .unwrap(),
        409,
        "idempotency_conflict",
    )
    .await;
    assert_eq!(hanging.await.unwrap().unwrap().status(), 504);
    check(
        c.get(proxy.url("/openai/x"))
            .bearer_auth(&free)
            .header("idempotency-key", "k")
            .send()
            .await
            .unwrap(),
        422,
        "idempotency_key_reused",
    )
    .await;
    // 431: a token over the size limit, refused before any signature work.
    check(
        c.get(proxy.url("/openai/x"))
            .bearer_auth("t".repeat(till::token::MAX_TOKEN_LEN + 1))
            .send()
            .await
            .unwrap(),
        431,
        "token_too_large",
    )
    .await;
    // 405: TRACE is never forwarded.
    check(
        c.request(http::Method::TRACE, proxy.url("/openai/x"))
            .bearer_auth(&free)
            .send()
            .await
            .unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    // Upstream errors pass through as they are.
    let r = c
        .get(proxy.url("/openai/status/418"))
        .bearer_auth(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 418);
    // 429: the three uses are spent (502, 504 and 418 each used one).
    let v = check(
        c.get(proxy.url("/openai/status/200"))
            .bearer_auth(&ok)
            .send()
            .await
            .unwrap(),
        429,
        "activations_exhausted",
    )
    .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("this key has used all 3 of its uses"),
        "{v}"
    );
    assert_eq!(v["error"]["type"], "insufficient_quota");
    // Health checks need no token.
    assert_eq!(
        c.get(proxy.url("/healthz")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        c.get(proxy.url("/readyz")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_are_returned_not_followed() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.token("openai", None);
    let r = client()
        .get(proxy.url("/openai/redirect"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "/v1/elsewhere");
    assert_eq!(up.count(), 1, "the proxy must not follow the redirect");
}

async fn hammer(proxy: &Proxy, tokens: &[String], n: usize) -> (usize, usize) {
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..n {
        let c = c.clone();
        let url = proxy.url("/openai/v1/chat/completions");
        let t = tokens[i % tokens.len()].clone();
        tasks.push(tokio::spawn(async move {
            c.post(url)
                .bearer_auth(t)
                .header("content-type", "application/json")
                .body(r#"{"model":"m"}"#)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            429 => limited += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    (ok, limited)
}

#[tokio::test(flavor = "multi_thread")]
async fn exactly_ten_of_two_hundred_concurrent_requests_pass() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let root = home.token("openai", Some(10));
    let (ok, limited) = hammer(&proxy, &[root], 200).await;
    assert_eq!((ok, limited), (10, 190));
    assert_eq!(up.count(), 10, "the upstream sees exactly 10");
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_children_share_their_parents_ten_uses() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let root = home.token("openai", Some(10));
    // Children ask for more than the parent has: it changes nothing.
    let children: Vec<String> = (0..50).map(|_| child(&root, limit(1000))).collect();
    let (ok, _) = hammer(&proxy, &children, 200).await;
    assert_eq!(ok, 10);
    assert_eq!(up.count(), 10);
    // And the parent itself is spent too.
    assert_eq!(chat(&proxy, &root, "m").await.0, 429);
}

#[tokio::test(flavor = "multi_thread")]
async fn counts_survive_graceful_restart_and_kill_dash_nine() {
    let up = Upstream::start().await;
    let home = Home::new();
    let mut proxy = Proxy::start(&home, &[openai(&up)], "");
    let small = home.token("openai", Some(5));
    let big = home.token("openai", Some(100_000));
    for _ in 0..3 {
        assert_eq!(chat(&proxy, &small, "m").await.0, 200);
    }
    for _ in 0..40 {
        assert_eq!(chat(&proxy, &big, "m").await.0, 200);
    }
    // Graceful stop writes exact values.
    assert_eq!(proxy.terminate(), 0);
    proxy.restart(&home);
    assert_eq!(chat(&proxy, &small, "m").await.0, 200); // 4th use
    // kill -9 right after a use: no flush, no goodbye.
    proxy.kill9();
    proxy.restart(&home);
    assert_eq!(chat(&proxy, &small, "m").await.0, 200); // 5th use
    assert_eq!(
        chat(&proxy, &small, "m").await.0,
        429,
        "a sixth use after kill -9"
    );
    for _ in 0..10 {
        assert_eq!(chat(&proxy, &big, "m").await.0, 200);
    }
    proxy.kill9();
    proxy.restart(&home);
    // No count is lower than the requests forwarded (50 on `big`).
    let out = till(["usage", "--json", &big, "--url", &proxy.url("")])
        .home(&home)
        .env("TILL_ADMIN_TOKEN", &home.admin())
        .run();
    out.success();
    let rows: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let uses = rows[0]["uses"].as_u64().unwrap();
    assert!(
        uses >= 50,
        "count {uses} below the 50 forwarded after kill -9"
    );
    assert_eq!(up.count(), 3 + 40 + 2 + 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn revocation_is_immediate_hierarchical_and_survives_restart() {
    let up = Upstream::start().await;
    let home = Home::new();
    let mut proxy = Proxy::start(&home, &[openai(&up)], "");
    let root = home.token("openai", None);
    let a = child(&root, limit(100));
    let b = child(&root, limit(100));
    let grandchild = child(&a, limit(5));
    for t in [&root, &a, &b, &grandchild] {
        assert_eq!(chat(&proxy, t, "m").await.0, 200);
    }
    let admin = home.admin();
    let url = proxy.url("");
    // Revoke `a` (its last block): a and everything derived from it.
    till(["revoke", &a, "--url", &url])
        .home(&home)
        .env("TILL_ADMIN_TOKEN", &admin)
        .run()
        .success()
        .stdout_has("revoked ");
    let (s, v) = chat(&proxy, &a, "m").await;
    assert_eq!(s, 403);
    assert_eq!(v["error"]["code"], "token_revoked");
    assert_eq!(chat(&proxy, &grandchild, "m").await.0, 403);
    assert_eq!(chat(&proxy, &b, "m").await.0, 200, "a sibling is untouched");
    // Without an admin token the admin API refuses.
    till(["revoke", &b, "--url", &url])
        .home(&home)
        .env("TILL_ADMIN_TOKEN", &root)
        .run()
        .code(2)
        .stderr_has("not an admin token");
    // The whole family.
    till(["revoke", "--root", &b, "--url", &url])
        .home(&home)
        .env("TILL_ADMIN_TOKEN", &admin)
        .run()
        .success();
    assert_eq!(chat(&proxy, &b, "m").await.0, 403);
    assert_eq!(chat(&proxy, &root, "m").await.0, 403);
    let list = till(["revoke", "--list", "--url", &url])
        .home(&home)
        .env("TILL_ADMIN_TOKEN", &admin)
        .run();
    list.success();
    assert_eq!(list.stdout.lines().count(), 2);
    proxy.kill9();
    proxy.restart(&home);
    assert_eq!(
        chat(&proxy, &b, "m").await.0,
        403,
        "revocation survives a crash"
    );
    assert_eq!(chat(&proxy, &grandchild, "m").await.0, 403);
    // By id.
    let fresh = home.token("openai", None);
    let id = till::token::RawToken::parse(&fresh)
        .unwrap()
        .revocation_ids()[0]
        .clone();
    let url = proxy.url("");
    till(["revoke", "--id", &id, "--url", &url])
        .home(&home)
        .env("TILL_ADMIN_TOKEN", &admin)
        .run()
        .success();
    assert_eq!(chat(&proxy, &fresh, "m").await.0, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn path_tricks_cannot_escape_a_prefix() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(scoped(&["openai"], &["/v1/chat/"], None));
    let c = client();
    let auth = format!("authorization: Bearer {token}\r\n");
    for (path, status) in [
        ("/openai/v1/chat/../files", 403),
        ("/openai/v1/chat/%2e%2e/files", 403),
        ("/openai/v1/chat/%2E%2E/files", 403),
        ("/openai/v1/chat/.%2e/files", 403),
        ("/openai/V1/CHAT/completions", 403),
        ("/openai/v1/chat%2f..%2ffiles", 400),
        ("/openai/v1/chat/..%5cfiles", 400),
        ("/openai/v1/chat/../../../etc", 400),
        ("/openai/v1/chat/..", 403),
        ("http://evil.example/openai/v1/files", 403),
        ("/openai//v1//chat/./completions", 200),
    ] {
        assert_eq!(raw_request(proxy.addr, path, &auth).await, status, "{path}");
    }
    // What was allowed reached the upstream normalised, exactly as authorized.
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/v1/chat/completions");
    // Host and forwarding headers cannot pick another upstream.
    let r = c
        .get(proxy.url("/openai/v1/chat/x"))
        .bearer_auth(&token)
        .header("host", "evil.example")
        .header("x-forwarded-host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.count(), 2);
    assert!(up.seen()[1].headers.get("x-forwarded-host").is_none());
    // The upstream sees its own name, as hyper's client writes it.
    for seen in up.seen() {
        assert_eq!(seen.headers["host"], up.addr.to_string().as_str());
    }
    // A GET-only token does not cover `get`, which would otherwise reach
    // the upstream as a different method: no lower-case method passes.
    let get_only = home.issue(Scope {
        methods: vec!["GET".into()],
        ..scoped(&["openai"], &["/v1/"], None)
    });
    let lower = reqwest::Method::from_bytes(b"get").unwrap();
    let r = c
        .request(lower, proxy.url("/openai/v1/models"))
        .bearer_auth(&get_only)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(up.count(), 2, "nothing forwarded");
    let r = c
        .get(proxy.url("/openai/v1/models"))
        .bearer_auth(&get_only)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_retry_of_a_failed_request_counts_once() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.token("openai", Some(2));
    let c = client();
    let send = |key: &'static str| {
        c.post(proxy.url("/openai/v1/chat/completions"))
            .bearer_auth(&token)
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(r#"{"model":"m"}"#)
            .send()
    };
    up.state
        .fail_next
        .store(3, std::sync::atomic::Ordering::SeqCst);
    // One counted attempt, then three free retries of a failing request.
    for _ in 0..3 {
        assert_eq!(send("k1").await.unwrap().status(), 500);
    }
    assert_eq!(send("k1").await.unwrap().status(), 200);
    // A success is not free to replay: this counts as use 2.
    assert_eq!(send("k1").await.unwrap().status(), 200);
    assert_eq!(send("k2").await.unwrap().status(), 429);
    assert_eq!(up.count(), 5);
}

#[test]
fn config_errors_name_the_key_and_file_and_exit_2() {
    let home = Home::new();
    let cfg = home.write(
        "bad.toml",
        "listen = \"127.0.0.1:0\"\n[upstreams.openai]\nurl = \"not a url\"\n",
    );
    till(["serve", "--config", cfg.to_str().unwrap()])
        .run()
        .code(2)
        .stderr_has("bad.toml")
        .stderr_has("upstreams.openai.url");
    let cfg = home.write("typo.toml", "lisen = \"127.0.0.1:0\"\n");
    till(["serve", "--config", cfg.to_str().unwrap()])
        .run()
        .code(2)
        .stderr_has("lisen");
    let cfg = home.write(
        "cred.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n[upstreams.x]\nurl = \"http://127.0.0.1:9\"\ncredential = {{ env = \"TILL_TEST_SURELY_UNSET\" }}\n",
            home.path().to_str().unwrap()
        ),
    );
    till(["serve", "--config", cfg.to_str().unwrap()])
        .run()
        .code(2)
        .stderr_has("upstreams.x.credential")
        .stderr_has("TILL_TEST_SURELY_UNSET");
}

#[test]
fn a_corrupt_store_refuses_to_start() {
    let home = Home::new();
    home.write(till::store::embedded::STORE_FILE, &"garbage".repeat(2000));
    let cfg = home.write(
        "till.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n",
            home.path().to_str().unwrap()
        ),
    );
    till(["serve", "--config", cfg.to_str().unwrap()])
        .run()
        .code(2)
        .stderr_has("will not start from zero");
}

/// Two proxies on one store would each hand out the full budget: the second
/// refuses to start, and does not suggest moving the file aside.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_proxy_on_the_same_store_refuses_to_start() {
    let up = Upstream::start().await;
    let home = Home::new();
    let first = Proxy::start(&home, &[openai(&up)], "");
    let cfg = first.config.clone();
    till(["serve", "--config", cfg.to_str().unwrap()])
        .home(&home)
        .env("TEST_OPENAI_KEY", OPENAI_SECRET)
        .run()
        .code(2)
        .stderr_has("another process")
        .one_line_error();
    // The first one is unaffected.
    let t = home.token("openai", Some(3));
    assert_eq!(chat(&first, &t, "m").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn till_up_bootstraps_a_fresh_directory_and_reuses_it() {
    let home = Home::empty();
    let dir = home.path().join("state");
    let cfg = dir.join("till.toml");
    let mut p = Proxy::spawn(
        &home,
        &[
            "--home",
            dir.to_str().unwrap(),
            "up",
            "--listen",
            "127.0.0.1:0",
        ],
        &cfg,
    )
    .expect("till up starts");
    for f in ["root.key", "admin.token", "till.toml"] {
        assert!(dir.join(f).exists(), "{f} created");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["root.key", "admin.token"] {
            let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
    }
    assert_eq!(
        client()
            .get(p.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let key_before = std::fs::read(dir.join("root.key")).unwrap();
    let admin_before = std::fs::read(dir.join("admin.token")).unwrap();
    assert_eq!(p.terminate(), 0);
    let p2 = Proxy::spawn(
        &home,
        &[
            "--home",
            dir.to_str().unwrap(),
            "up",
            "--listen",
            "127.0.0.1:0",
        ],
        &cfg,
    )
    .expect("restarts");
    assert_eq!(std::fs::read(dir.join("root.key")).unwrap(), key_before);
    assert_eq!(
        std::fs::read(dir.join("admin.token")).unwrap(),
        admin_before
    );
    drop(p2);
}

#[test]
fn till_up_prints_a_copy_paste_quickstart() {
    let home = Home::empty();
    let mut child = std::process::Command::new(BIN)
        .args(["up", "--listen", "127.0.0.1:0"])
        .env("TILL_HOME", home.path())
        .env("OPENAI_API_KEY", "sk-test-not-real")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = String::new();
    {
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while r.read_line(&mut line).unwrap() > 0 {
            out.push_str(&line);
            if line.contains("python:") {
                break;
            }
            line.clear();
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(out.contains("ed25519/"), "{out}");
    assert!(out.contains("admin.token"), "{out}");
    assert!(out.contains("/openai/ -> https://api.openai.com"), "{out}");
    assert!(out.contains("till issue --service openai"), "{out}");
    assert!(out.contains("curl http://127.0.0.1:"), "{out}");
    assert!(out.contains("/openai/v1\", api_key="), "{out}");
    assert!(!out.contains("sk-test-not-real"), "credential printed");
}

/// The real embedded store, failed for real (its file deleted under it):
/// `/readyz` follows the store, and nothing is forwarded once it cannot
/// count. Replaces a test double whose `healthy()` was hard-coded to false.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_and_requests_follow_the_real_store_failing() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let readyz = || async {
        client()
            .get(proxy.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
    };
    // A 5-use token has no lease: every use is committed.
    let t = home.token("openai", Some(5));
    assert_eq!(chat(&proxy, &t, "m").await.0, 200);
    assert_eq!(readyz().await, 200, "a healthy store is ready");
    std::fs::remove_file(home.path().join(till::store::embedded::STORE_FILE)).unwrap();
    // The commit that would make this use durable fails.
    let (s, v) = chat(&proxy, &t, "m").await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "store_unavailable");
    assert_eq!(readyz().await, 503);
    // Later requests are refused at the reservation, even with fresh tokens.
    let fresh = home.token("openai", None);
    let (s, v) = chat(&proxy, &fresh, "m").await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(readyz().await, 503);
    assert_eq!(up.count(), 1, "nothing forwarded without a durable count");
    assert!(proxy.logs().contains("counter store commit failed"));
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_idempotent_retry_after_a_502_is_free_not_409() {
    let home = Home::new();
    // A port where connections are refused.
    let (_held, down_url) = dead_port();
    let down = Up {
        name: "openai",
        url: down_url,
        header: "authorization",
        prefix: "Bearer ",
        env: "TEST_OPENAI_KEY",
    };
    let proxy = Proxy::start(&home, &[down], "");
    let token = home.token("openai", Some(1));
    let send = |key: &'static str| {
        client()
            .get(proxy.url("/openai/v1/models"))
            .bearer_auth(&token)
            .header("idempotency-key", key)
            .send()
    };
    assert_eq!(send("k").await.unwrap().status(), 502);
    // Retries of the failed attempt neither conflict nor count.
    assert_eq!(send("k").await.unwrap().status(), 502);
    assert_eq!(send("k").await.unwrap().status(), 502);
    // The one use was spent by the first attempt.
    assert_eq!(send("other").await.unwrap().status(), 429);
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_services_get_a_signed_revocation_feed() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let root = home.token("openai", None);
    let a = child(&root, limit(5));
    let b = child(&root, limit(5));
    let url = proxy.url("");
    till(["revoke", &a, "--url", &url])
        .home(&home)
        .env("TILL_ADMIN_TOKEN", &home.admin())
        .run()
        .success();
    let feed = client()
        .get(proxy.url("/revocations"))
        .send()
        .await
        .unwrap();
    assert_eq!(feed.status(), 200);
    let text = feed.text().await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["version"], 1);
    let path = home.write("feed.json", &text);
    let verify = |t: &str, file: &std::path::Path| {
        till([
            "verify",
            "--public-key",
            &home.public(),
            "--service",
            "openai",
            "--path",
            "/v1/x",
            "--revocations",
            file.to_str().unwrap(),
            "--token",
            t,
        ])
        .run()
    };
    verify(&a, &path).code(1).stdout_has("revoked");
    verify(&b, &path).success();
    // A feed with the id removed (to un-revoke `a`) is detected.
    let mut forged = v.clone();
    forged["ids"] = serde_json::json!([]);
    forged["version"] = serde_json::json!(0);
    let bad = home.write("forged.json", &forged.to_string());
    verify(&a, &bad)
        .code(2)
        .stderr_has("signature does not verify");
    // So is a stale one.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    till([
        "verify",
        "--public-key",
        &home.public(),
        "--service",
        "openai",
        "--path",
        "/v1/x",
        "--revocations",
        path.to_str().unwrap(),
        "--max-feed-age",
        "1s",
        "--token",
        &b,
    ])
    .run()
    .code(2)
    .stderr_has("stale");
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_admin_plane_on_a_dual_stack_listener_serves_ipv4_loopback_clients() {
    let home = Home::new();
    let cfg = home.write(
        "dual.toml",
        &format!(
            "listen = \"[::]:0\"\nstate_dir = {:?}\npolicies = {:?}\n",
            home.path().to_str().unwrap(),
            policies_dir(),
        ),
    );
    let proxy = match Proxy::start_config(&home, &cfg) {
        Ok(p) => p,
        Err(log) if log.contains("cannot listen") => {
            eprintln!("skipped: no IPv6 on this machine: {log}");
            return;
        }
        Err(log) => panic!("proxy did not start: {log}"),
    };
    let port = proxy.addr.port();
    // An IPv4 client of a `[::]` listener is seen as ::ffff:127.0.0.1.
    for base in [
        format!("http://127.0.0.1:{port}"),
        format!("http://[::1]:{port}"),
    ] {
        let r = client()
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{base}/metrics");
        let r = client()
            .get(format!("{base}/admin/usage"))
            .bearer_auth(home.admin())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{base}/admin/usage");
    }
}

/// `admin_listen`: the admin plane on its own address, so a reverse proxy
/// forwarding everything on `listen` cannot expose it, whatever it does with
/// `Host` and forwarding headers; and the CLI finds it from till.toml.
#[tokio::test(flavor = "multi_thread")]
async fn admin_listen_serves_the_admin_plane_apart_from_agents() {
    let up = Upstream::start().await;
    let home = Home::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy = Proxy::start(
        &home,
        &[openai(&up)],
        &format!("admin_listen = \"127.0.0.1:{port}\""),
    );
    let banner = proxy.banner();
    assert!(
        banner.contains(&format!("admin plane: http://127.0.0.1:{port}")),
        "the banner names it: {banner}"
    );
    let admin_url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let admin = home.admin();
    let t = home.token("openai", Some(5));
    let get = |url: String, token: &str| client().get(url).bearer_auth(token).send();
    for path in ["/metrics", "/admin/usage", "/dashboard", "/admin/nothing"] {
        let r = get(proxy.url(path), &admin).await.unwrap();
        assert_eq!(r.status(), 404, "{path} on listen");
        let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("admin_listen"),
            "{v}"
        );
        let r = get(admin_url(path), &admin).await.unwrap();
        let want = if path == "/admin/nothing" { 404 } else { 200 };
        assert_eq!(r.status(), want, "{path} on admin_listen");
    }
    // Agents' requests on listen only; health checks on both.
    assert_eq!(
        get(proxy.url("/openai/v1/models"), &t)
            .await
            .unwrap()
            .status(),
        200
    );
    for path in ["/openai/v1/models", "/auth/openai", "/revocations", "/x"] {
        let r = get(admin_url(path), &t).await.unwrap();
        assert_eq!(r.status(), 404, "{path} on admin_listen");
    }
    assert_eq!(up.count(), 1, "nothing was proxied from the admin listener");
    for url in [proxy.url("/healthz"), admin_url("/healthz")] {
        assert_eq!(client().get(url).send().await.unwrap().status(), 200);
    }
    // The CLI reads admin_listen from TILL_HOME/till.toml.
    let o = till(["usage", "--json"]).home(&home).run();
    o.success();
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let five = v
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["limit"] == 5)
        .expect("the agent's family is listed");
    assert_eq!(five["remaining"], 4, "one use, on listen: {five}");
}

#[test]
fn admin_listen_on_the_listen_address_is_refused() {
    let home = Home::new();
    let cfg = home.write(
        "till.toml",
        "listen = \"127.0.0.1:18999\"\nadmin_listen = \":18999\"\n",
    );
    let o = till(["serve", "--config", cfg.to_str().unwrap()]).run();
    o.code(2).stderr_has("admin_listen").stderr_has("own port");
}
