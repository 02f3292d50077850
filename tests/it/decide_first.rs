//! Decide before spending: a request the proxy will refuse spends nothing —
//! no budget, no durable state, no body read — and what it does spend is
//! given back or bounded. Each test is named after the attack it stops and
//! fails on the request path that reserved before it decided.

use std::time::{Duration, SystemTime};

use biscuit_auth::{BlockBuilder, UnverifiedBiscuit};
use till::token::{RawToken, Scope};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

fn ids(token: &str) -> Vec<String> {
    RawToken::parse(token).unwrap().revocation_ids()
}

async fn admin(proxy: &Proxy, token: &str, method: &str, path: &str) -> (u16, serde_json::Value) {
    let r = client()
        .request(method.parse().unwrap(), proxy.url(path))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(if method == "POST" {
            r#"{"id":"00"}"#
        } else {
            ""
        })
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v = serde_json::from_str(&r.text().await.unwrap()).unwrap_or_default();
    (status, v)
}

/// Every block the proxy records, over all families.
async fn recorded_blocks(proxy: &Proxy, home: &Home) -> Vec<String> {
    let (s, v) = admin(proxy, &home.admin(), "GET", "/admin/usage").await;
    assert_eq!(s, 200, "{v}");
    v["families"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["blocks"].as_array().unwrap().clone())
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

async fn get(proxy: &Proxy, token: &str, path: &str) -> u16 {
    client()
        .get(proxy.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_denied_requests_create_no_state_even_across_a_restart() {
    let up = Upstream::start().await;
    let home = Home::new();
    let mut proxy = Proxy::start(&home, &[openai(&up)], "");
    // A revoked root and a used-up root, each with children minted offline.
    let revoked = home.token("openai", Some(100));
    let used_up = home.token("openai", Some(1));
    assert_eq!(chat(&proxy, &used_up, "m").await.0, 200);
    let s = client()
        .post(proxy.url("/admin/revoke"))
        .bearer_auth(home.admin())
        .header("content-type", "application/json")
        .body(serde_json::json!({"token": revoked, "root": true}).to_string())
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(s, 200);
    for i in 0..100 {
        let kid = child(&revoked, limit(10 + i));
        assert_eq!(chat(&proxy, &kid, "m").await.0, 403);
        let kid = child(&used_up, limit(10 + i));
        assert_eq!(chat(&proxy, &kid, "m").await.0, 429);
    }
    let check = |blocks: Vec<String>| {
        // The used-up root's one allowed request is all that was recorded.
        assert!(blocks.contains(&ids(&used_up)[0]), "{blocks:?}");
        assert!(!blocks.contains(&ids(&revoked)[0]), "{blocks:?}");
        let kids = blocks.iter().filter(|b| !ids(&used_up).contains(b)).count();
        // Only the admin tokens of this test (one block each) besides it.
        assert!(kids <= 3, "denied children were recorded: {blocks:?}");
    };
    check(recorded_blocks(&proxy, &home).await);
    assert_eq!(up.count(), 1);
    proxy.terminate();
    proxy.restart(&home);
    check(recorded_blocks(&proxy, &home).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_an_out_of_scope_request_takes_no_budget_even_through_a_crash() {
    let up = Upstream::start().await;
    let home = Home::new();
    let mut proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        paths: vec!["/v1/chat/".into()],
        max_uses: Some(5),
        ..Scope::default()
    });
    // Out of scope: refused. It used to reserve first, raising the block's
    // durable mark, which a crash then kept as a spent use.
    assert_eq!(get(&proxy, &token, "/openai/v1/files").await, 403);
    // Another token's allowed request waits for a group commit, so whatever
    // the refused request queued is on disk now.
    assert_eq!(
        chat(&proxy, &home.token("openai", Some(5)), "m").await.0,
        200
    );
    proxy.kill9();
    proxy.restart(&home);
    for i in 0..5 {
        assert_eq!(chat(&proxy, &token, "m").await.0, 200, "use {}", i + 1);
    }
    assert_eq!(chat(&proxy, &token, "m").await.0, 429);
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_child_cannot_rewrite_its_parents_limit_in_usage_and_alerts() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let parent = home.token("openai", Some(100));
    // Written by another Biscuit library: a child's check on the parent's
    // count. Datalog enforces it for the child; it is not the parent's limit.
    let kid = UnverifiedBiscuit::from_base64(&parent)
        .unwrap()
        .append(
            BlockBuilder::new()
                .code("check if uses(0, $u), $u <= 2")
                .unwrap(),
        )
        .unwrap()
        .to_base64()
        .unwrap();
    assert_eq!(chat(&proxy, &kid, "m").await.0, 200);
    assert_eq!(chat(&proxy, &kid, "m").await.0, 200);
    assert_eq!(
        chat(&proxy, &kid, "m").await.0,
        429,
        "the child's check holds"
    );
    // The parent itself still has its 100.
    assert_eq!(chat(&proxy, &parent, "m").await.0, 200);
    let (s, v) = admin(
        &proxy,
        &home.admin(),
        "GET",
        &format!("/admin/usage/{}", ids(&parent)[0]),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let root = v["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == ids(&parent)[0].as_str())
        .unwrap()
        .clone();
    assert_eq!(root["limit"], 100, "{v}");
    assert_eq!(root["uses"], 3, "{v}");
    assert_eq!(v["limit"], 100, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_start_with_the_clock_days_ahead_gives_no_token_more_uses() {
    let lib = faketime_lib();
    let up = Upstream::start().await;
    let home = Home::new();
    let mut proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        max_uses: Some(3),
        expires: Some(SystemTime::now() + Duration::from_secs(3600)),
        ..Scope::default()
    });
    for _ in 0..3 {
        assert_eq!(chat(&proxy, &token, "m").await.0, 200);
    }
    assert_eq!(chat(&proxy, &token, "m").await.0, 429);
    assert_eq!(proxy.terminate(), 0);
    // One start with the wall clock three days ahead (the token looks long
    // expired), then back on the right clock.
    let ahead = Proxy::spawn_via(
        &home,
        &["env", &format!("LD_PRELOAD={lib}"), "FAKETIME=+3d"],
        "debug",
        &["serve", "--config", proxy.config.to_str().unwrap()],
        &proxy.config,
    )
    .expect("proxy starts under faketime");
    assert_eq!(
        chat(&ahead, &token, "m").await.0,
        403,
        "expired by that clock"
    );
    let mut ahead = ahead;
    assert_eq!(ahead.terminate(), 0);
    // The next start keeps the time the last run used: still expired.
    proxy.restart(&home);
    assert_eq!(chat(&proxy, &token, "m").await.0, 403);
    assert_eq!(proxy.terminate(), 0);
    // The operator was told that clock was wrong and removes its time, as
    // the warning says: back on the right clock, with no use given back.
    std::fs::remove_file(home.path().join(till::proxy::clock_floor::FILE)).unwrap();
    proxy.restart(&home);
    assert_eq!(
        chat(&proxy, &token, "m").await.0,
        429,
        "the used-up token must stay used up"
    );
    assert_eq!(up.count(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_restart_with_the_clock_stepped_back_does_not_revive_an_expired_token() {
    let lib = faketime_lib();
    let up = Upstream::start().await;
    let home = Home::new();
    let mut proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        expires: Some(SystemTime::now() + Duration::from_secs(600)),
        ..Scope::default()
    });
    assert_eq!(chat(&proxy, &token, "m").await.0, 200);
    assert_eq!(proxy.terminate(), 0);
    // An hour later by the wall clock, the token has expired...
    let mut later = Proxy::spawn_via(
        &home,
        &["env", &format!("LD_PRELOAD={lib}"), "FAKETIME=+1h"],
        "debug",
        &["serve", "--config", proxy.config.to_str().unwrap()],
        &proxy.config,
    )
    .expect("proxy starts under faketime");
    let (status, v) = chat(&later, &token, "m").await;
    assert_eq!(status, 403, "{v}");
    // ...the run has saved its clock (every second)...
    let saved = home.path().join(till::proxy::clock_floor::FILE);
    let ahead = || {
        std::fs::read_to_string(&saved)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .is_some_and(|t| t > till::store::now_unix() + 3000)
    };
    for _ in 0..100 {
        if ahead() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ahead(), "the run under faketime saved its time");
    assert_eq!(later.terminate(), 0);
    // ...then the clock is stepped back an hour and Till restarted: the
    // token stays expired (it was forwarded again before the fix).
    proxy.restart(&home);
    let (status, v) = chat(&proxy, &token, "m").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("token_expired")),
        "{v}"
    );
    assert_eq!(up.count(), 1);
    assert!(
        proxy.logs().contains("wall clock is behind"),
        "the operator is told: {}",
        proxy.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_concurrent_requests_with_one_idempotency_key_are_counted_once() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.token("openai", Some(100));
    // The first attempt hangs at the upstream: the key stays in flight.
    let send = || {
        client()
            .get(proxy.url("/openai/hang"))
            .bearer_auth(&token)
            .header("idempotency-key", "same")
            .timeout(Duration::from_secs(5))
            .send()
    };
    let results = futures_util::future::join_all((0..10).map(|_| send())).await;
    let conflicts = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status() == 409))
        .count();
    assert_eq!(conflicts, 9, "exactly one attempt may run");
    assert_eq!(up.count(), 1, "exactly one attempt reached the upstream");
    let (_, v) = admin(
        &proxy,
        &home.admin(),
        "GET",
        &format!("/admin/usage/{}", ids(&token)[0]),
    )
    .await;
    assert_eq!(v["uses"], 1, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_failed_attempts_key_cannot_carry_a_different_request_for_free() {
    let home = Home::new();
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
    let send = |path: &'static str, body: &'static str| {
        client()
            .post(proxy.url(path))
            .bearer_auth(&token)
            .header("idempotency-key", "k")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let first = send("/openai/v1/chat/completions", r#"{"model":"a"}"#);
    assert_eq!(first.await.unwrap().status(), 502);
    // The same request again: a free retry.
    let again = send("/openai/v1/chat/completions", r#"{"model":"a"}"#);
    assert_eq!(again.await.unwrap().status(), 502);
    // Another path, or another body, under the same key: refused, and it is
    // not a free use of the spent token either.
    for (path, body) in [
        ("/openai/v1/files", r#"{"model":"a"}"#),
        ("/openai/v1/chat/completions", r#"{"model":"b"}"#),
    ] {
        let r = send(path, body).await.unwrap();
        assert_eq!(r.status(), 422);
        let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(v["error"]["code"], "idempotency_key_reused", "{v}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_admin_tokens_obey_their_attenuation() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let root = home.admin();
    // Use limits on an admin token are counted.
    let two = child(&root, limit(2));
    assert_eq!(admin(&proxy, &two, "GET", "/admin/usage").await.0, 200);
    assert_eq!(admin(&proxy, &two, "GET", "/admin/alerts").await.0, 200);
    let (s, v) = admin(&proxy, &two, "GET", "/admin/usage").await;
    assert_eq!(s, 429, "{v}");
    // Read-only: GET works, revoking does not.
    let read_only = child(
        &root,
        Scope {
            methods: vec!["GET".into()],
            ..Scope::default()
        },
    );
    assert_eq!(
        admin(&proxy, &read_only, "GET", "/admin/usage").await.0,
        200
    );
    let (s, v) = admin(&proxy, &read_only, "POST", "/admin/revoke").await;
    assert_eq!(s, 403, "{v}");
    // One endpoint only.
    let usage_only = child(
        &root,
        Scope {
            paths: vec!["/admin/usage".into()],
            ..Scope::default()
        },
    );
    assert_eq!(
        admin(&proxy, &usage_only, "GET", "/admin/usage").await.0,
        200
    );
    assert_eq!(
        admin(&proxy, &usage_only, "GET", "/admin/revocations")
            .await
            .0,
        403
    );
    // The unattenuated admin token does everything.
    assert_eq!(
        admin(&proxy, &root, "GET", "/admin/revocations").await.0,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_body_key_that_case_folds_to_model_is_refused() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let restricted = home.issue(Scope {
        services: vec!["openai".into()],
        models: vec!["gpt-4o-mini".into()],
        ..Scope::default()
    });
    let open = home.token("openai", None);
    for token in [&restricted, &open] {
        for body in [
            r#"{"model":"gpt-4o-mini","MODEL":"gpt-4"}"#,
            r#"{"model":"gpt-4o-mini","\u004dodel":"gpt-4"}"#,
        ] {
            let r = client()
                .post(proxy.url("/openai/v1/chat/completions"))
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{body}");
        }
    }
    assert_eq!(up.count(), 0, "nothing was forwarded");
    assert_eq!(chat(&proxy, &restricted, "gpt-4o-mini").await.0, 200);
}

/// Red team, wave 2 (third pass): LiteLLM's proxy runs the query's
/// `?model=` over the JSON body's `model`, so a model-restricted key sent
/// `?model=gpt-4` beside an allowed body model, and got gpt-4.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_model_in_the_query_is_judged_as_the_requests_model() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let restricted = home.issue(Scope {
        services: vec!["openai".into()],
        models: vec!["gpt-4o-mini".into()],
        max_uses: Some(3),
        ..Scope::default()
    });
    let open = home.token("openai", None);
    let send = |token: &str, method: reqwest::Method, query: &str, body: Option<&str>| {
        let mut r = client()
            .request(
                method,
                proxy.url(&format!("/openai/v1/chat/completions?{query}")),
            )
            .bearer_auth(token);
        if let Some(b) = body {
            r = r
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;
    let allowed = Some(r#"{"model":"gpt-4o-mini"}"#);
    // Two models named: refused for every key, whichever is allowed.
    for token in [&restricted, &open] {
        for query in [
            "model=gpt-4",
            "mod%65l=gpt-4",
            "MODEL=gpt-4",
            "model%5B%5D=gpt-4",
            "model=gpt-4o-mini&model=gpt-4",
        ] {
            assert_eq!(
                send(token, post.clone(), query, allowed).await,
                400,
                "{query}"
            );
        }
    }
    // The query's model alone is judged: with no model in the body, and
    // without a body.
    assert_eq!(
        send(&restricted, post.clone(), "model=gpt-4", Some("{}")).await,
        403
    );
    assert_eq!(
        send(&restricted, get.clone(), "model=gpt-4", None).await,
        403
    );
    assert_eq!(up.count(), 0, "nothing was forwarded");
    // The same model in both, or the allowed one alone, passes.
    assert_eq!(
        send(&restricted, post.clone(), "model=gpt-4o-mini", allowed).await,
        200
    );
    assert_eq!(
        send(&restricted, post.clone(), "model=gpt-4o-mini", Some("{}")).await,
        200
    );
    assert_eq!(
        send(&restricted, get.clone(), "model=gpt-4o-mini", None).await,
        200
    );
    assert_eq!(up.count(), 3);
    // The refusals spent nothing: the three uses went to the three above.
    assert_eq!(send(&restricted, post, "a=1", allowed).await, 429);
}

/// Sends a request head announcing a JSON body of `len` bytes, then
/// `body` (possibly less), and returns the status line's code, or `None`
/// when no answer came within `wait`.
async fn head_then_stall(
    proxy: &Proxy,
    token: &str,
    len: usize,
    body: &[u8],
    wait: Duration,
) -> (tokio::net::TcpStream, Option<u16>) {
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let status = match tokio::time::timeout(wait, s.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => String::from_utf8_lossy(&buf[..n])
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok()),
        _ => None,
    };
    (s, status)
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_refused_request_is_answered_without_waiting_for_its_body() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let expired = home.issue(Scope {
        services: vec!["openai".into()],
        expires: Some(SystemTime::now() - Duration::from_secs(60)),
        ..Scope::default()
    });
    // Announces 1 MB and sends none of it: the old path read the body first.
    let (_s, status) =
        head_then_stall(&proxy, &expired, 1 << 20, b"", Duration::from_secs(10)).await;
    assert_eq!(status, Some(403));
    let used_up = home.token("openai", Some(1));
    assert_eq!(chat(&proxy, &used_up, "m").await.0, 200);
    let (_s, status) =
        head_then_stall(&proxy, &used_up, 1 << 20, b"", Duration::from_secs(10)).await;
    assert_eq!(status, Some(429));
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_trickled_body_is_cut_at_the_body_timeout() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "[limits]\nbody_timeout_secs = 1\n");
    let token = home.token("openai", Some(5));
    let (_s, status) =
        head_then_stall(&proxy, &token, 100, b"{\"model\"", Duration::from_secs(10)).await;
    assert_eq!(status, Some(408));
    assert_eq!(up.count(), 0);
    // Nothing was spent: all five uses remain.
    for _ in 0..5 {
        assert_eq!(chat(&proxy, &token, "m").await.0, 200);
    }
    assert_eq!(chat(&proxy, &token, "m").await.0, 429);
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_bodies_buffered_at_once_are_capped_with_a_retryable_503() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(
        &home,
        &[openai(&up)],
        "[limits]\nmax_body_bytes = 1000\nmax_buffered_bytes = 1500\nbody_timeout_secs = 30\n",
    );
    let token = home.token("openai", None);
    // Holds the 999 bytes it has sent of its 1000 while the last one trickles.
    let sent = [b' '; 999];
    let (held, status) =
        head_then_stall(&proxy, &token, 1000, &sent, Duration::from_millis(300)).await;
    assert_eq!(status, None, "still reading the first body");
    let body = format!(r#"{{"model":"m","pad":"{}"}}"#, "x".repeat(900));
    // One use: the refused request must spend none of it.
    let one = home.token("openai", Some(1));
    let r = client()
        .post(proxy.url("/openai/v1/chat/completions"))
        .bearer_auth(&one)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "busy", "{v}");
    // Small bodies still fit.
    assert_eq!(chat(&proxy, &token, "m").await.0, 200);
    // The held bytes go back with their request, and the refused one's use
    // is still there.
    drop(held);
    let mut status = 0;
    for _ in 0..100 {
        status = chat(&proxy, &one, "m").await.0;
        if status != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_declared_but_unsent_body_bytes_hold_no_buffer_budget() {
    let up = Upstream::start().await;
    let home = Home::new();
    // The whole budget is one body's worth: the old path gave all of it to
    // the first head announcing a full body, before a byte of it came.
    let proxy = Proxy::start(
        &home,
        &[openai(&up)],
        "[limits]\nmax_body_bytes = 1000\nmax_buffered_bytes = 1000\nbody_timeout_secs = 30\n",
    );
    // One use left, as in the red team's reproduction: the heads spend none.
    let attacker = home.token("openai", Some(1));
    let heads =
        (0..32).map(|_| head_then_stall(&proxy, &attacker, 1000, b"", Duration::from_millis(300)));
    let heads = futures_util::future::join_all(heads).await;
    let other = home.token("openai", Some(5));
    let (status, v) = chat(&proxy, &other, "m").await;
    assert_eq!(status, 200, "another agent's request is served: {v}");
    assert_eq!(up.count(), 1);
    let statuses: Vec<Option<u16>> = heads.iter().map(|h| h.1).collect();
    assert_eq!(
        statuses, [None; 32],
        "each head is still waiting for its body"
    );
    drop(heads);
    assert_eq!(chat(&proxy, &attacker, "m").await.0, 200, "no use spent");
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_children_tracked_per_family_are_bounded() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(
        &home,
        &[openai(&up)],
        "[limits]\nmax_blocks_per_family = 3\n",
    );
    let root = home.token("openai", Some(100));
    let a = child(&root, limit(10));
    let b = child(&root, limit(10));
    let c = child(&root, limit(10));
    for t in [&root, &a, &b, &a] {
        assert_eq!(chat(&proxy, t, "m").await.0, 200);
    }
    let (s, v) = chat(&proxy, &c, "m").await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["error"]["code"], "family_too_large", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_blocks_per_family"),
        "{v}"
    );
    // Known keys go on working; the refused one spent nothing.
    assert_eq!(chat(&proxy, &b, "m").await.0, 200);
    assert_eq!(up.count(), 5);
    // The operator hears of it once, however many new keys are tried.
    for i in 0..5 {
        let kid = child(&root, limit(20 + i));
        assert_eq!(chat(&proxy, &kid, "m").await.0, 403);
    }
    let (s, v) = admin(&proxy, &home.admin(), "GET", "/admin/alerts").await;
    assert_eq!(s, 200, "{v}");
    let n = v.to_string().matches("\"family_too_large\"").count();
    assert_eq!(n, 1, "{v}");
}

/// Sends a JSON chat request's head now and its body once `between` has
/// run, on one connection; returns the answer's status line and body.
async fn head_now_body_later(
    proxy: &Proxy,
    token: &str,
    between: impl std::future::Future<Output = ()>,
) -> String {
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    let head = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        proxy.addr,
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    between.await;
    s.write_all(body.as_bytes()).await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    answer
}

/// Regression: revocation was looked up at the head only; a request whose
/// body came after the revocation was forwarded and counted.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_token_revoked_while_its_body_is_awaited_is_refused() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let root = home.token("openai", Some(5));
    let child = {
        let t = UnverifiedBiscuit::from_base64(&root).unwrap();
        t.append(BlockBuilder::new().code(r#"label("child");"#).unwrap())
            .unwrap()
            .to_base64()
            .unwrap()
    };
    let answer = head_now_body_later(&proxy, &child, async {
        // Time for the head's decision (allowed) before the revocation.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = client()
            .post(proxy.url("/admin/revoke"))
            .bearer_auth(home.admin())
            .header("content-type", "application/json")
            .body(serde_json::json!({ "id": ids(&root)[0] }).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    })
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("token_revoked"), "{answer}");
    assert_eq!(up.count(), 0, "nothing forwarded");
    let (_, v) = admin(
        &proxy,
        &home.admin(),
        "GET",
        &format!("/admin/usage/{}", ids(&root)[0]),
    )
    .await;
    // Never allowed: no use, and no usage record at all.
    assert_eq!(v["error"]["code"], "not_found", "nothing spent: {v}");
}

/// Regression: the time of the head's decision was kept for the decision
/// on the body, so a body sent after the token expired was forwarded.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_token_that_expires_while_its_body_is_awaited_is_refused() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        expires: Some(SystemTime::now() + Duration::from_secs(2)),
        ..Scope::default()
    });
    let answer = head_now_body_later(&proxy, &token, async {
        tokio::time::sleep(Duration::from_secs(4)).await;
    })
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("token_expired"), "{answer}");
    assert_eq!(up.count(), 0, "nothing forwarded");
}

/// Regression: every request of a burst reserved, and the reservation
/// registered each new key as one of its family's blocks, refused or not;
/// sixty keys whose requests were refused filled `max_blocks_per_family`
/// and locked every unused sibling out of a family with uses left.
#[tokio::test(flavor = "multi_thread")]
async fn regression_refused_keys_do_not_fill_their_familys_block_limit() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(
        &home,
        &[openai(&up)],
        "[limits]\nmax_blocks_per_family = 30",
    );
    let root = home.token("openai", Some(10));
    let one_use = child(
        &root,
        Scope {
            max_uses: Some(1),
            ..Scope::default()
        },
    );
    let kids: Vec<String> = (0..60)
        .map(|i| {
            let t = UnverifiedBiscuit::from_base64(&one_use).unwrap();
            t.append(
                BlockBuilder::new()
                    .code(format!("label(\"k{i}\");"))
                    .unwrap(),
            )
            .unwrap()
            .to_base64()
            .unwrap()
        })
        .collect();
    // Every head is decided (one use left: allowed) before any body comes.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(kids.len()));
    let answers = futures_util::future::join_all(kids.iter().map(|k| {
        let barrier = barrier.clone();
        let proxy = &proxy;
        async move {
            head_now_body_later(proxy, k, async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                barrier.wait().await;
            })
            .await
        }
    }))
    .await;
    let ok = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 200"))
        .count();
    assert_eq!(
        ok,
        1,
        "one use: {:?}",
        answers.iter().map(|a| a.get(..12)).collect::<Vec<_>>()
    );
    let sibling = child(&root, Scope::default());
    let (status, v) = chat(&proxy, &sibling, "m").await;
    assert_eq!(status, 200, "a sibling with the family's uses left: {v}");
    let kept = recorded_blocks(&proxy, &home).await.len();
    assert!(kept <= 6, "the refused keys left {kept} blocks");
}

/// Regression (red team, wave 2, fourth pass): Till reads the model of
/// JSON (and form) bodies only. A deny-list on the model (`reject if
/// model("gpt-4")` in the token, or `deny if model(...)` in a policy) never
/// fired for a body Till does not read, and such bodies are read by real
/// servers: LiteLLM and FastAPI handlers `json.loads` a `text/plain` body.
/// A key whose scope reads `model` now gets such bodies refused.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_model_deny_list_is_not_passed_by_a_body_till_does_not_read() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let deny_list = home.issue(Scope {
        services: vec!["openai".into()],
        datalog: Some(r#"reject if model("gpt-4");"#.into()),
        ..Scope::default()
    });
    let open = home.token("openai", None);
    let send = |token: &str, method: reqwest::Method, ct: Option<&str>, body: &str| {
        let mut r = client()
            .request(method, proxy.url("/openai/v1/chat/completions"))
            .bearer_auth(token);
        if let Some(ct) = ct {
            r = r.header("content-type", ct);
        }
        if !body.is_empty() {
            r = r.body(body.to_string());
        }
        async move {
            let resp = r.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap())
        }
    };
    let post = reqwest::Method::POST;
    let banned = r#"{"model":"gpt-4","messages":[]}"#;
    // As JSON, the deny-list fires (it always did).
    assert_eq!(
        send(&deny_list, post.clone(), Some("application/json"), banned)
            .await
            .0,
        403
    );
    // The same JSON under a type Till does not read: refused too, saying why.
    for ct in [Some("text/plain"), Some("application/octet-stream"), None] {
        let (status, body) = send(&deny_list, post.clone(), ct, banned).await;
        assert_eq!(status, 403, "{ct:?}: {body}");
        assert!(body.contains("model"), "{ct:?}: {body}");
    }
    assert_eq!(up.count(), 0, "nothing was forwarded: {:?}", up.seen());
    // What the key may do still passes: an allowed model as JSON, and a
    // request without a body.
    let fine = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    assert_eq!(
        send(&deny_list, post.clone(), Some("application/json"), fine)
            .await
            .0,
        200
    );
    assert_eq!(
        send(&deny_list, reqwest::Method::GET, None, "").await.0,
        200
    );
    // A form body's `model` field is the request's model too (FastAPI's
    // `Form`, Rack's params read it): judged, and an allowed one passes.
    let form = Some("application/x-www-form-urlencoded");
    assert_eq!(
        send(&deny_list, post.clone(), form, "model=gpt-4&x=1")
            .await
            .0,
        403
    );
    assert_eq!(
        send(&deny_list, post.clone(), form, "x=1&MODEL=gpt%2D4")
            .await
            .0,
        403
    );
    // JSON declared as a form: refused, as a handler parsing JSON whatever
    // the Content-Type reads its model.
    let (status, body) = send(&deny_list, post.clone(), form, banned).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("application/json"), "{body}");
    assert_eq!(up.count(), 2, "{:?}", up.seen());
    let allow_list = home.issue(Scope {
        services: vec!["openai".into()],
        models: vec!["gpt-4o-mini".into()],
        ..Scope::default()
    });
    assert_eq!(
        send(&allow_list, post.clone(), form, "model=gpt-4o-mini")
            .await
            .0,
        200
    );
    assert_eq!(
        send(&allow_list, post.clone(), form, "model=gpt-4").await.0,
        403
    );
    // JSON that serde_json cannot read as Python's `json` does (FastAPI,
    // LiteLLM and vLLM parse the bytes with it), or an array serde reads a
    // struct from: allowed without a model before; refused for a key reading
    // the model, as a form or declared JSON alike.
    let utf16: Vec<u8> = banned.encode_utf16().flat_map(u16::to_be_bytes).collect();
    let bom = [b"\xEF\xBB\xBF".as_slice(), banned.as_bytes()].concat();
    let nan = br#"{"model":"gpt-4","messages":[],"temperature":NaN}"#.to_vec();
    let array = br#"["gpt-4",[]]"#.to_vec();
    for (ct, body) in [
        ("application/json", bom.clone()),
        ("application/json", utf16.clone()),
        ("application/json", nan.clone()),
        ("application/json", array),
        ("application/x-www-form-urlencoded", bom),
        ("application/x-www-form-urlencoded", utf16),
        ("application/x-www-form-urlencoded", nan.clone()),
    ] {
        let r = client()
            .post(proxy.url("/openai/v1/chat/completions"))
            .bearer_auth(&deny_list)
            .header("content-type", ct)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, 403, "{ct} {body:?}: {text}");
        assert!(text.contains("model"), "{text}");
    }
    assert_eq!(up.count(), 3, "{:?}", up.seen());
    // A key whose scope does not read the model is not affected.
    let r = client()
        .post(proxy.url("/openai/v1/chat/completions"))
        .bearer_auth(&open)
        .header("content-type", "application/json")
        .body(nan)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        send(&open, post.clone(), Some("text/plain"), banned)
            .await
            .0,
        200
    );
    assert_eq!(up.count(), 5, "{:?}", up.seen());
}

/// Regression (red team, wave 2, fifth pass): an attempt with an
/// `Idempotency-Key` whose client hung up while the upstream had the request
/// was taken for a failed one, so its retries were free: hanging up before
/// each answer, one use sent the same request to the upstream six times
/// (five free retries), each of which it may act on. Once sent, an
/// abandoned attempt is done: a retry is counted.
#[tokio::test(flavor = "multi_thread")]
async fn regression_an_attempt_abandoned_after_it_was_sent_is_not_free_to_retry() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.token("openai", Some(1));
    let send = || {
        client()
            .post(proxy.url("/openai/hang"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .header("idempotency-key", "k-1")
            .body(r#"{"model":"m"}"#)
            .timeout(Duration::from_millis(500))
            .send()
    };
    assert!(send().await.is_err(), "the client gave up");
    assert_eq!(up.count(), 1);
    // The retry is counted, and the one use is spent: refused, not sent.
    let mut status = 0;
    for _ in 0..100 {
        let r = send().await.expect("answered at once");
        status = r.status().as_u16();
        // 409 while the abandoned attempt is being settled.
        if status != 409 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 429);
    assert_eq!(up.count(), 1, "the retry did not reach the upstream");
}
