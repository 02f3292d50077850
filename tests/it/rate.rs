//! Rate windows (`--rate N/DURATION`) and concurrency caps
//! (`--concurrency N`) through a real `till serve`: exact under concurrency,
//! shared by every key made from a windowed one, refused with a retryable
//! 429 `rate_limited` and `Retry-After`, on the embedded store and across
//! proxies sharing one Redis.

use std::time::Duration;

use futures_util::future::join_all;
use till::token::Scope;
use till::token::vocab::Rate;

use crate::helpers::*;
use crate::redis::{RedisServer, replica_homes, replicas};

fn rate(limit: u64, seconds: u64) -> Rate {
    Rate { limit, seconds }
}

fn windowed(rates: &[Rate]) -> Scope {
    Scope {
        rates: rates.to_vec(),
        ..Scope::default()
    }
}

fn root(home: &Home, rates: &[Rate], concurrency: Option<u64>) -> String {
    home.issue(Scope {
        services: vec!["openai".into()],
        rates: rates.to_vec(),
        concurrency,
        ..Scope::default()
    })
}

/// One answer: status, `Retry-After`, `x-should-retry`, error code.
#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: Option<u64>,
    should_retry: Option<String>,
    code: Option<String>,
}

async fn call(url: &str, token: &str) -> Answer {
    let r = client()
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o-mini","messages":[]}"#)
        .send()
        .await
        .unwrap();
    let h = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (retry_after, should_retry) = (
        h("retry-after").and_then(|v| v.parse().ok()),
        h("x-should-retry"),
    );
    let status = r.status().as_u16();
    let body: serde_json::Value =
        serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default();
    Answer {
        status,
        retry_after,
        should_retry,
        code: body["error"]["code"].as_str().map(str::to_string),
    }
}

/// Sends all `(proxy, token)` requests at once; returns the answers.
async fn burst(calls: &[(&Proxy, &str)]) -> Vec<Answer> {
    join_all(
        calls
            .iter()
            .map(|(p, t)| call_owned(p.url("/openai/v1/chat/completions"), t.to_string())),
    )
    .await
}

async fn call_owned(url: String, token: String) -> Answer {
    call(&url, &token).await
}

/// Every refusal is a retryable `rate_limited` with a `Retry-After` of at
/// most `window` seconds; returns how many passed.
fn passed(answers: &[Answer], window: u64) -> usize {
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(a.status, 429, "{a:?}");
        assert_eq!(a.code.as_deref(), Some("rate_limited"), "{a:?}");
        assert_eq!(a.should_retry.as_deref(), Some("true"), "{a:?}");
        let secs = a.retry_after.expect("Retry-After on a full window");
        assert!((1..=window).contains(&secs), "{a:?}");
    }
    answers.iter().filter(|a| a.status == 200).count()
}

/// The issue's acceptance test: a `5/2s` token, 50 concurrent requests →
/// exactly 5 pass and 45 get a retryable 429; once the window has passed,
/// exactly 5 more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_window_admits_exactly_n_of_50_concurrent_requests_then_n_more_after_it() {
    let home = Home::new();
    let up = Upstream::start().await;
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let t = root(&home, &[rate(5, 2)], None);
    let first = burst(&vec![(&proxy, t.as_str()); 50]).await;
    assert_eq!(passed(&first, 2), 5);
    assert_eq!(up.count(), 5, "the upstream saw exactly the window");
    // The window slides past the first five admissions.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let second = burst(&vec![(&proxy, t.as_str()); 50]).await;
    assert_eq!(passed(&second, 2), 5);
    assert_eq!(up.count(), 10);
}

/// Regression: the embedded store's windows read the wall clock, so a
/// clock stepped forward an hour (NTP, by hand) emptied every window at
/// once: a `3/1h` key got three more calls at once.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_wall_clock_stepped_forward_does_not_empty_a_full_window() {
    let lib = faketime_lib();
    let home = Home::new();
    let up = Upstream::start().await;
    let mut plain = Proxy::start(&home, &[openai(&up)], "");
    assert_eq!(plain.terminate(), 0);
    // The clock the proxy reads comes from this file, re-read on each call;
    // its monotonic clock stays real.
    let offset = home.path().join("faketime-offset");
    std::fs::write(&offset, "+0s\n").unwrap();
    let proxy = Proxy::spawn_via(
        &home,
        &[
            "env",
            &format!("LD_PRELOAD={lib}"),
            &format!("FAKETIME_TIMESTAMP_FILE={}", offset.display()),
            "FAKETIME_NO_CACHE=1",
            "FAKETIME_DONT_FAKE_MONOTONIC=1",
        ],
        "debug",
        &["serve", "--config", plain.config.to_str().unwrap()],
        &plain.config,
    )
    .expect("proxy starts under faketime");
    let t = root(&home, &[rate(3, 3600)], None);
    let url = proxy.url("/openai/v1/chat/completions");
    for _ in 0..3 {
        assert_eq!(call(&url, &t).await.status, 200);
    }
    assert_eq!(call(&url, &t).await.code.as_deref(), Some("rate_limited"));
    std::fs::write(&offset, "+61m\n").unwrap();
    let a = call(&url, &t).await;
    assert_eq!(
        (a.status, a.code.as_deref()),
        (429, Some("rate_limited")),
        "an hour on the wall clock is not an hour passed: {a:?}"
    );
    assert_eq!(up.count(), 3);
}

/// 20 children of a `6/1m` key, 60 concurrent requests: 6 in total, as
/// with use limits; a child's own looser window changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn children_share_their_parents_window() {
    let home = Home::new();
    let up = Upstream::start().await;
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let parent = root(&home, &[rate(6, 60)], None);
    let kids: Vec<String> = (0..20)
        .map(|i| {
            // Every other child writes a window of its own, far looser.
            let own = if i % 2 == 0 {
                vec![rate(1000, 60)]
            } else {
                vec![]
            };
            child(&parent, windowed(&own))
        })
        .collect();
    let calls: Vec<(&Proxy, &str)> = (0..60).map(|i| (&proxy, kids[i % 20].as_str())).collect();
    assert_eq!(passed(&burst(&calls).await, 60), 6);
    assert_eq!(up.count(), 6);
    // The parent itself finds its window full.
    assert_eq!(passed(&burst(&[(&proxy, parent.as_str())]).await, 60), 0);
}

/// root `8/1m` → child `5/1m` → grandchild `2/1m`: each request fills
/// every ancestor's window, each key stops at its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_three_level_chain_with_different_windows() {
    let home = Home::new();
    let up = Upstream::start().await;
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let r = root(&home, &[rate(8, 60)], None);
    let c = child(&r, windowed(&[rate(5, 60)]));
    let g = child(&c, windowed(&[rate(2, 60), rate(100, 3600)]));
    assert_eq!(
        passed(&burst(&ten(&proxy, &g)).await, 3600),
        2,
        "grandchild"
    );
    assert_eq!(
        passed(&burst(&ten(&proxy, &c)).await, 60),
        3,
        "child: 5 minus 2"
    );
    assert_eq!(
        passed(&burst(&ten(&proxy, &r)).await, 60),
        3,
        "root: 8 minus 5"
    );
    assert_eq!(
        passed(&burst(&ten(&proxy, &g)).await, 3600),
        0,
        "every window is full"
    );
    assert_eq!(up.count(), 8);
}

fn ten<'a>(p: &'a Proxy, t: &'a str) -> Vec<(&'a Proxy, &'a str)> {
    vec![(p, t); 10]
}

/// Holds `n` slow (gated SSE) requests open; returns their responses.
async fn open_streams(proxy: &Proxy, token: &str, n: usize) -> Vec<reqwest::Response> {
    let mut open = Vec::new();
    for _ in 0..n {
        let r = client()
            .post(proxy.url("/openai/v1/chat/completions"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(r#"{"model":"m","stream":true,"gated":true,"messages":[]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        open.push(r);
    }
    open
}

/// `--concurrency 2` with slow streamed answers: while two are streaming,
/// every other request (of the key or a child) is a retryable 429; once
/// they end, the slots are free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_concurrency_cap_holds_its_slots_until_slow_responses_end() {
    let home = Home::new();
    let up = Upstream::start().await;
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let t = root(&home, &[], Some(2));
    let kid = child(&t, Scope::default());
    let mut open = open_streams(&proxy, &t, 2).await;
    let calls: Vec<(&Proxy, &str)> = (0..10)
        .map(|i| (&proxy, if i % 2 == 0 { t.as_str() } else { kid.as_str() }))
        .collect();
    let answers = burst(&calls).await;
    assert_eq!(passed(&answers, 1), 0, "no third request while two stream");
    assert_eq!(up.count(), 2);
    // The streams end: both bodies arrive whole, and the slots come back.
    up.state.gate.notify_waiters();
    for r in open.drain(..) {
        let body = r.text().await.unwrap();
        assert!(body.contains("[DONE]"), "{body}");
    }
    let mut ok = false;
    for _ in 0..100 {
        // The slot is given back as the proxy drops the finished body.
        if call(&proxy.url("/openai/v1/chat/completions"), &kid)
            .await
            .status
            == 200
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "a slot came back after the streams ended");
    // A client that goes away mid-stream frees its slot too.
    let open = open_streams(&proxy, &t, 2).await;
    drop(open);
    let mut freed = 0;
    for _ in 0..100 {
        let a = call(&proxy.url("/openai/v1/chat/completions"), &t).await;
        if a.status == 200 {
            freed += 1;
            if freed == 1 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(freed, 1, "a dropped stream's slot came back");
    up.state.gate.notify_waiters();
}

/// A full window is retryable (429 `rate_limited`, `x-should-retry: true`);
/// spent uses are not (429 `activations_exhausted`, `x-should-retry:
/// false`), and a refusal by a full window spends no use.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_window_is_retryable_and_spends_nothing_unlike_exhausted_uses() {
    let home = Home::new();
    let up = Upstream::start().await;
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let t = home.issue(Scope {
        services: vec!["openai".into()],
        rates: vec![rate(2, 60)],
        max_uses: Some(3),
        ..Scope::default()
    });
    let url = proxy.url("/openai/v1/chat/completions");
    let answers = burst(&[(&proxy, t.as_str()); 6]).await;
    assert_eq!(passed(&answers, 60), 2);
    // A child with an empty window of its own: its parent's is full.
    let kid = child(&t, windowed(&[rate(5, 60)]));
    let a = call(&url, &kid).await;
    assert_eq!(
        (a.status, a.code.as_deref()),
        (429, Some("rate_limited")),
        "{a:?}"
    );
    // The operator hears of it once, however many refusals.
    let alerts: serde_json::Value = admin_json(&proxy, &home, "/admin/alerts").await;
    let rate_alerts: Vec<_> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "rate_limited")
        .collect();
    assert_eq!(rate_alerts.len(), 1, "{alerts}");
    assert!(
        rate_alerts[0]["message"]
            .as_str()
            .unwrap()
            .contains("that window is full"),
        "{alerts}"
    );
    let once = home.issue(Scope {
        services: vec!["openai".into()],
        rates: vec![rate(10, 60)],
        max_uses: Some(1),
        ..Scope::default()
    });
    assert_eq!(call(&url, &once).await.status, 200);
    let a = call(&url, &once).await;
    assert_eq!(a.status, 429, "{a:?}");
    assert_eq!(a.code.as_deref(), Some("activations_exhausted"), "{a:?}");
    assert_eq!(a.should_retry.as_deref(), Some("false"), "{a:?}");
    assert_eq!(up.count(), 3, "2 + 1 forwarded");
}

/// Three proxies on one Redis: 90 concurrent requests of 9 children of a
/// `5/2s` key, spread over the proxies, pass exactly 5; after the window,
/// exactly 5 more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_proxies_on_one_redis_share_a_window_exactly() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let homes = replica_homes(3);
    let proxies = replicas(&homes, &up, &redis);
    let t = root(&homes[0], &[rate(5, 2)], None);
    let kids: Vec<String> = (0..9).map(|_| child(&t, Scope::default())).collect();
    let calls: Vec<(&Proxy, &str)> = (0..90)
        .map(|i| (&proxies[i % 3], kids[i % 9].as_str()))
        .collect();
    assert_eq!(passed(&burst(&calls).await, 2), 5);
    assert_eq!(up.count(), 5);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(passed(&burst(&calls).await, 2), 5);
    assert_eq!(up.count(), 10);
}

/// A concurrency cap across proxies on one Redis: two slow streams through
/// two proxies hold both slots; the third proxy refuses; once they end it
/// admits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_concurrency_cap_holds_across_proxies_on_one_redis() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let homes = replica_homes(3);
    let proxies = replicas(&homes, &up, &redis);
    let t = root(&homes[0], &[], Some(2));
    let mut open = open_streams(&proxies[0], &t, 1).await;
    open.extend(open_streams(&proxies[1], &t, 1).await);
    let calls: Vec<(&Proxy, &str)> = (0..9).map(|i| (&proxies[i % 3], t.as_str())).collect();
    assert_eq!(passed(&burst(&calls).await, 1), 0);
    up.state.gate.notify_waiters();
    for r in open.drain(..) {
        assert!(r.text().await.unwrap().contains("[DONE]"));
    }
    let mut ok = false;
    for _ in 0..100 {
        if call(&proxies[2].url("/openai/v1/chat/completions"), &t)
            .await
            .status
            == 200
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the slots came back");
}

/// The official OpenAI Python SDK (installed by `.ci/run`) meets a full
/// window: it reads `x-should-retry: true` and `Retry-After`, waits, and
/// its retry succeeds once the window frees a slot, with no code of the
/// agent's own.
const PY_RETRY: &str = r#"
import json, sys
import openai
base, token = sys.argv[1:3]
seen = []
http = openai.DefaultHttpxClient(event_hooks={"response": [lambda r: seen.append(r.status_code)]})
c = openai.OpenAI(base_url=base + "/openai/v1", api_key=token, max_retries=3, http_client=http)
for _ in range(2):
    c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
print(json.dumps({"statuses": seen}))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_sdk_retries_a_rate_limited_call_and_succeeds_when_the_window_frees() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "the OpenAI SDK is required in CI: python3 -m pip install openai==3.57.0"
        );
        eprintln!("\n******** SKIPPED: the openai SDK is not installed ********\n");
        return;
    }
    let home = Home::new();
    let up = Upstream::start().await;
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let t = root(&home, &[rate(1, 2)], None);
    let base = proxy.url("");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", PY_RETRY, &base, &t])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let statuses: Vec<u64> = v["statuses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    // First call; second call refused while the window is full, then
    // retried by the SDK after Retry-After, and let through.
    assert_eq!(statuses.first(), Some(&200), "{v}");
    assert_eq!(statuses.last(), Some(&200), "{v}");
    assert!(
        statuses[1..statuses.len() - 1].iter().all(|s| *s == 429),
        "{v}"
    );
    assert!(statuses.len() >= 3, "the SDK met at least one 429: {v}");
    assert_eq!(up.count(), 2, "both calls reached the upstream once");
}

/// What a user types: `--rate` and `--concurrency` on issue and attenuate,
/// read back by inspect, evaluated offline by verify with `--rate-used`
/// and `--in-flight`, and bad values refused in plain words.
#[test]
fn the_cli_issues_inspects_and_verifies_windows() {
    let home = Home::new();
    let issue = |extra: &[&str]| {
        let mut a = vec!["issue", "--service", "openai", "--ttl", "1h"];
        a.extend_from_slice(extra);
        till(a).home(&home).run()
    };
    let o = issue(&["--rate", "10/1m", "--rate", "1000/1d", "--concurrency", "3"]);
    o.success();
    let parent = o.out().trim().to_string();
    let o = till(["attenuate", "--rate", "2/1s"]).stdin(&parent).run();
    o.success();
    assert!(!o.out().is_empty());
    // Looser than the parent: allowed (it narrows nothing), with a warning.
    till(["attenuate", "--rate", "1000/1s", "--concurrency", "8"])
        .stdin(&parent)
        .run()
        .success()
        .stderr_has("--rate 1000/1s adds nothing: the parent's 10/1m already allows at most 10")
        .stderr_has("--concurrency 8 adds nothing: the parent allows 3 in flight");
    let kid = o.out().trim().to_string();
    till(["inspect", "--token", &kid])
        .run()
        .success()
        .stdout_has("rate limit: 10/1m (at most 10 requests in any 60 s)")
        .stdout_has("rate limit: 1000/1d")
        .stdout_has("concurrency cap: 3 in flight")
        .stdout_has("rate limit: 2/1s")
        .stdout_has("rate_limit(1, 2, 1)");
    let verify = |extra: &[&str]| {
        let mut a = vec!["verify", "--token", &kid, "--service", "openai"];
        a.extend_from_slice(extra);
        till(a).home(&home).run()
    };
    verify(&[]).success().stdout_has("allowed");
    verify(&[
        "--rate-used",
        "0:1m=10",
        "--rate-used",
        "1:1s=2",
        "--in-flight",
        "0=3",
    ])
    .success()
    .stdout_has("allowed");
    verify(&["--rate-used", "0:1m=11"])
        .code(1)
        .stdout_has("allows 10/1m")
        .stdout_has("that window is full");
    verify(&["--in-flight", "0=4"])
        .code(1)
        .stdout_has("3 request(s) in flight");
    verify(&["--rate-used", "0:1h=1"])
        .code(2)
        .stderr_has("block 0 of this token has no 1h window");
    for (flag, value, words) in [
        ("--rate", "10", "has no '/'"),
        ("--rate", "0/1m", "allows 0 requests"),
        ("--rate", "10/0s", "windows are 1s to 31d"),
        ("--rate", "10/40d", "windows are 1s to 31d"),
        ("--rate", "10/1y", "does not end with a duration"),
        ("--rate", "1000000/1h", "more than 100000 requests"),
        ("--concurrency", "0", "a whole number from 1"),
    ] {
        issue(&[flag, value]).code(2).stderr_has(words);
    }
    issue(&["--rate", "1/1m", "--rate", "5/60s"])
        .code(2)
        .stderr_has("two rates with the same window");
    // The admin plane counts no windows, so an admin token cannot carry one.
    till(["issue", "--admin", "--rate", "10/1m"])
        .home(&home)
        .run()
        .code(2)
        .stderr_has("--admin");
}

/// A block that reads `rate` or `in_flight` in any other form than its own
/// window or cap (another block's window, a custom comparison) is refused:
/// such a window would be counted over this key's requests only, not the
/// whole family's, and could not be exact.
#[test]
fn a_window_check_not_on_its_own_block_is_refused() {
    let home = Home::new();
    let v = till::verify::Verifier::new(
        home.key().public(),
        till::policy::Policies::default_policy(),
    );
    let parent = root(&home, &[rate(10, 60)], None);
    for code in [
        "check if rate(0, 60, $u), $u <= 5",
        "check if rate(1, 60, $u), $u < 5",
        "check if in_flight(0, $c), $c <= 1",
        "check if rate($k, 60, $u), $u <= 5",
    ] {
        let t = child(
            &parent,
            Scope {
                datalog: Some(code.into()),
                ..Scope::default()
            },
        );
        let e = v.verify_token(&t).unwrap_err().to_string();
        assert!(e.contains("rate or in_flight"), "{code}: {e}");
    }
    // Its own window in Till's form is fine, written by hand or not.
    let t = child(
        &parent,
        Scope {
            datalog: Some("check if rate(1, 60, $u), $u <= 5".into()),
            ..Scope::default()
        },
    );
    let t = v.verify_token(&t).unwrap();
    assert_eq!(t.windows.len(), 2);
}

/// Forward-auth (`/auth/<service>`) counts rate windows as the proxy does:
/// 20 concurrent checks of a `3/1m` key, 3 allowed, the rest a retryable
/// 429; a key with a concurrency cap is refused there (only the gateway
/// sees when its request ends), in words that say what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forward_auth_counts_windows_and_refuses_caps_it_cannot_hold() {
    const SECRET: &str = "gateway-secret-for-the-rate-tests-0123456789";
    let up = Upstream::start().await;
    let home = Home::new();
    let secret = home.write("gateway.secret", SECRET);
    let config = home.write(
        "till.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\npolicies = {:?}\n\
             [upstreams.openai]\nurl = {:?}\ncredential = {{ env = \"TEST_OPENAI_KEY\" }}\n\
             forward_auth_credential = true\nforward_auth_secret = {{ file = {:?} }}\n",
            home.path().to_str().unwrap(),
            policies_dir(),
            up.url(),
            secret.to_str().unwrap(),
        ),
    );
    let proxy = Proxy::start_config(&home, &config).expect("proxy starts");
    let check = |token: String| {
        let url = proxy.url("/auth/openai/v1/chat/completions");
        async move {
            let r = client()
                .post(url)
                .header("x-till-gateway-secret", SECRET)
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").is_some();
            (status, retry, r.text().await.unwrap_or_default())
        }
    };
    let t = root(&home, &[rate(3, 60)], None);
    let answers = join_all((0..20).map(|_| check(t.clone()))).await;
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    assert_eq!(ok, 3, "{answers:?}");
    for a in answers.iter().filter(|a| a.0 != 200) {
        assert!(a.0 == 429 && a.1 && a.2.contains("rate_limited"), "{a:?}");
    }
    let capped = root(&home, &[], Some(2));
    let (status, _, body) = check(capped).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("concurrency cap"), "{body}");
    assert_eq!(up.count(), 0, "forward-auth forwards nothing itself");
}

/// A restart keeps the windows of a proxy on the embedded store: saved at
/// a graceful shutdown, and every couple of seconds when they changed, so
/// a `kill -9` forgets at most the admissions of that last interval.
#[tokio::test(flavor = "multi_thread")]
async fn windows_survive_a_graceful_restart_and_a_crash() {
    let home = Home::new();
    let up = Upstream::start().await;
    let mut proxy = Proxy::start(&home, &[openai(&up)], "");
    let t = root(&home, &[rate(3, 600)], None);
    let url = |p: &Proxy| p.url("/openai/v1/chat/completions");
    for _ in 0..3 {
        assert_eq!(call(&url(&proxy), &t).await.status, 200);
    }
    assert_eq!(
        call(&url(&proxy), &t).await.code.as_deref(),
        Some("rate_limited")
    );

    // Graceful: SIGTERM, then a new process on the same state directory.
    assert_eq!(proxy.terminate(), 0);
    proxy.restart(&home);
    let a = call(&url(&proxy), &t).await;
    assert_eq!(a.code.as_deref(), Some("rate_limited"), "{a:?}");
    assert!(a.retry_after.is_some_and(|s| s > 500), "{a:?}");

    // Crash: once the saver has run (it saves every 2 s when something
    // changed), kill -9 loses nothing either.
    let t2 = root(&home, &[rate(2, 600)], None);
    for _ in 0..2 {
        assert_eq!(call(&url(&proxy), &t2).await.status, 200);
    }
    let saved = home.path().join("windows.json");
    let mut seen = false;
    for _ in 0..100 {
        let text = std::fs::read_to_string(&saved).unwrap_or_default();
        if text.matches("\"seconds\":600").count() >= 2 {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "windows.json never held both windows");
    proxy.kill9();
    proxy.restart(&home);
    for token in [&t, &t2] {
        let a = call(&url(&proxy), token).await;
        assert_eq!(a.code.as_deref(), Some("rate_limited"), "{a:?}");
    }
    assert_eq!(up.count(), 5, "3 + 2 forwarded, none after a restart");
}
