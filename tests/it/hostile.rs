//! Hostile input and faults: what an attacker holding a token, or a broken
//! disk or upstream, can do to the proxy — and what it cannot.

use std::time::{Duration, SystemTime};

use biscuit_auth::{Biscuit, BlockBuilder, KeyPair};
use prost::Message;
use till::policy::Policies;
use till::token::{self, RequestFacts, Scope, TokenError};
use till::verify::Verifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

fn req(path: &str) -> RequestFacts {
    RequestFacts {
        service: "openai".into(),
        method: "POST".into(),
        path: path.into(),
        model: None,
        mcp: None,
        time: SystemTime::now(),
    }
}

/// Appends a raw Datalog block as another Biscuit library would (no Till
/// shape check on the way).
fn append_raw(token: &str, code: &str) -> String {
    let u = biscuit_auth::UnverifiedBiscuit::from_base64(token).unwrap();
    u.append(BlockBuilder::new().code(code).unwrap())
        .unwrap()
        .to_base64()
        .unwrap()
}

#[test]
fn attenuation_blocks_outside_the_accepted_shape_are_refused_before_signatures() {
    let home = Home::new();
    let v = Verifier::new(home.key().public(), Policies::default_policy());
    let parent = home.token("openai", Some(10));
    for (code, what) in [
        // A cross-product rule: the classic Datalog denial of service.
        ("x($a, $b, $c) <- uses($a, $b), uses($c, $d)", "rule"),
        (
            "check if path($p), $p.matches(\"^(a+)+$\")",
            "regular expression",
        ),
        ("check if path($p), [1,2,3].all($x -> $x > 0)", "closure"),
        (
            "check if uses($a, $b), uses($c, $d), uses($e, $f), uses($g, $h)",
            "joining 4 predicates",
        ),
    ] {
        let t = append_raw(&parent, code);
        match v.verify_token(&t) {
            Err(TokenError::Shape(m)) => assert!(m.contains(what) && m.contains("block 1"), "{m}"),
            other => panic!("{code}: expected a shape error, got {other:?}"),
        }
    }
    // The usual narrowing checks written by other libraries are accepted.
    let ok = append_raw(
        &parent,
        "check if path($p), $p.starts_with(\"/v1/chat/\"); check if time($t), $t <= 2100-01-01T00:00:00Z",
    );
    assert!(v.verify_token(&ok).is_ok());
    // `till attenuate --datalog` refuses to mint what the verifier would refuse.
    till(["attenuate", "--datalog", "x($a) <- uses($a, $b)"])
        .stdin(&parent)
        .run()
        .code(2)
        .stderr_has("rules are not allowed");
}

/// The red team's child (wave 2, third pass): its own facts satisfy its
/// checks, so it looked like "2 uses, /v1/chat/, GET, expired in 2000" to
/// `till inspect`, the usage view and alerts, while DELETEs elsewhere
/// were forwarded (only the parent's 100 uses bounded it).
const FORGED_CHILD: &str = r#"uses(1, 0); path("/v1/chat/x"); method("GET"); time(2000-01-01T00:00:00Z); use_limit(1, 2); label("looks-narrow"); check if uses(1,$u), $u <= 2; check if path($p), $p.starts_with("/v1/chat/"); check if time($t), $t <= 2000-06-01T00:00:00Z; check if method($m), {"GET"}.contains($m);"#;

/// Regression: a block stating request facts (`uses`, `path`, `method`,
/// `time`) is refused with 401 `invalid_token` naming the block and the
/// fact: nothing forwarded, nothing counted, nothing in the usage view;
/// and `till attenuate` refuses to write it (exit 2).
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_block_stating_request_facts_is_refused() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let parent = home.token("openai", Some(100));
    let child = append_raw(&parent, FORGED_CHILD);
    for _ in 0..4 {
        let r = client()
            .delete(proxy.url("/openai/v1/files/file-1"))
            .bearer_auth(&child)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
        let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "invalid_token", "{body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("block 1") && msg.contains("`uses(...)`"),
            "{msg}"
        );
    }
    assert_eq!(up.count(), 0, "a forged child reached the upstream");
    let usage = client()
        .get(proxy.url("/admin/usage"))
        .bearer_auth(home.admin())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let usage: serde_json::Value = serde_json::from_str(&usage).unwrap();
    // Only the admin token's own family (its call counts): the forged
    // child's family was never counted.
    let family = token::RawToken::parse(&parent).unwrap().revocation_ids()[0].clone();
    let families = usage["families"].as_array().unwrap();
    assert!(
        families.iter().all(|f| f["family"] != family.as_str()),
        "{usage}"
    );
    // The parent is unaffected.
    assert_eq!(chat(&proxy, &parent, "gpt-4o-mini").await.0, 200);

    till(["attenuate", "--datalog", FORGED_CHILD])
        .stdin(&parent)
        .run()
        .code(2)
        .stderr_has("block 1")
        .stderr_has("`uses(...)`");
    // One request fact alone is enough, whichever.
    for fact in [
        "time(2000-01-01T00:00:00Z);",
        "tool(\"add\");",
        "in_flight(1, 0);",
    ] {
        till(["attenuate", "--datalog", fact])
            .stdin(&parent)
            .run()
            .code(2)
            .stderr_has("a request fact that only Till supplies");
    }
}

/// Regression: an agent attenuated its own token with an expiry the `time`
/// crate cannot represent (9999-12-31T23:59:59-23:59 is 10000-01-01 in
/// UTC). Every request with it panicked a worker: no answer, no audit line.
/// Now it is a 401 `invalid_token` that says why, audited like any other,
/// and the same block on an admin token cannot log in to the dashboard.
#[tokio::test(flavor = "multi_thread")]
async fn regression_an_expiry_past_year_9999_gets_a_401_not_a_panicked_worker() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let check = "check if time($t), $t <= 9999-12-31T23:59:59-23:59";
    let parent = home.token("openai", Some(10));
    let child = append_raw(&parent, check);
    for _ in 0..2 {
        let (status, body) = chat(&proxy, &child, "gpt-4o-mini").await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["code"], "invalid_token", "{body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("block 1 expires after 9999-12-31T23:59:59Z"),
            "{msg}"
        );
    }
    assert_eq!(up.count(), 0);
    assert_eq!(chat(&proxy, &parent, "gpt-4o-mini").await.0, 200);
    let audit_file = home.path().join("audit.jsonl");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut audit = String::new();
    while audit.matches("invalid_token").count() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        audit = std::fs::read_to_string(&audit_file).unwrap_or_default();
    }
    assert_eq!(audit.matches("invalid_token").count(), 2, "{audit}");

    let admin = append_raw(&home.admin(), check);
    let r = client()
        .post(proxy.url("/dashboard/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "token={}",
            percent_encoding::utf8_percent_encode(&admin, percent_encoding::NON_ALPHANUMERIC)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("expires after 9999-12-31T23:59:59Z")
    );
    assert!(!proxy.logs().contains("panicked"), "{}", proxy.logs());
}

/// The flood uses the costliest blocks the shape check *accepts* (they
/// reach Datalog: about 15,000 string scans each, with a model as long as
/// Till accepts), each token distinct so no cache helps, next to blocks the
/// shape check refuses. Normal requests must be served while the flood is
/// still running, not after it: Datalog that the decision cache cannot
/// answer runs on blocking threads, a few at a time, so it cannot hold the
/// async workers that serve everyone else. (The cost of one such block is measured in
/// `it::props::the_costliest_accepted_block_runs_to_its_end_within_the_run_limits`.)
#[tokio::test(flavor = "multi_thread")]
async fn normal_requests_keep_succeeding_during_a_flood_of_pathological_tokens() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let parent = home.token("openai", None);
    let long = "y".repeat(2500);
    let scan = vec![format!("$s.contains(\"{long}q\") || $m.contains($s)"); 6].join(" || ");
    let mut exprs = vec![format!("!({scan})"); 7];
    exprs.push(format!("({scan})"));
    // Each token distinct (no cache helps): fact 0 carries the number.
    let costly = |i: usize| {
        let facts: String = (0..32)
            .map(|k| match k {
                0 => format!("f(0, \"{}{i:06}\");", &long[6..]),
                k => format!("f({k}, \"{long}\");"),
            })
            .collect();
        append_raw(
            &parent,
            &format!(
                "{facts} check if f($a, $s), model($m), {}",
                exprs.join(", ")
            ),
        )
    };
    let refused = |i: usize| {
        append_raw(
            &parent,
            &format!("x{i}($a, $b, $c, $d) <- uses($a, $b), uses($c, $d), uses($e, $f)"),
        )
    };
    // Accepted by the shape check, so the flood really runs Datalog.
    let v = Verifier::new(home.key().public(), Policies::default_policy());
    v.verify_token(&costly(0))
        .expect("the costly block passes the shape check");
    let body = serde_json::json!({"model": "m".repeat(till::verify::MAX_FACT_LEN)}).to_string();
    // An agent already at work: its token's decision is cached.
    let good = home.token("openai", None);
    assert_eq!(chat(&proxy, &good, "m").await.0, 200);
    let c = client();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut attackers = Vec::new();
    for i in 0..200 {
        let c = c.clone();
        let url = proxy.url("/openai/v1/chat/completions");
        let t = if i % 2 == 0 { costly(i) } else { refused(i) };
        let body = body.clone();
        let done = done.clone();
        attackers.push(tokio::spawn(async move {
            let status = c
                .post(url)
                .bearer_auth(t)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            status
        }));
    }
    // Wait until the flood is under way.
    while done.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..10 {
        assert_eq!(chat(&proxy, &good, "m").await.0, 200);
    }
    let finished = done.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        finished < attackers.len(),
        "the normal requests were only served after the whole flood ({finished} done)"
    );
    let mut statuses = std::collections::BTreeMap::new();
    for a in attackers {
        *statuses.entry(a.await.unwrap()).or_insert(0) += 1;
    }
    // Costly blocks are denied by their own check, refused shapes are 401.
    assert_eq!(statuses.get(&403), Some(&100), "{statuses:?}");
    assert_eq!(statuses.get(&401), Some(&100), "{statuses:?}");
    assert_eq!(up.count(), 11);
}

/// Through the real request path (the counter specs are the handler's own:
/// a test building them by hand once hid a bug in them).
#[tokio::test]
async fn a_thousand_children_of_a_ten_use_token_get_ten_uses_in_total() {
    let home = Home::new();
    let up = Upstream::start().await;
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let root = home.token("openai", Some(10));
    let mut allowed = 0;
    let mut exhausted = 0;
    for i in 0..1000 {
        let kid = child(&root, limit(1000 + i));
        match chat(&proxy, &kid, "m").await.0 {
            200 => allowed += 1,
            429 => exhausted += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!((allowed, exhausted), (10, 990));
    assert_eq!(up.count(), 10);
}

#[test]
fn reordered_duplicated_and_transplanted_blocks_are_rejected() {
    let home = Home::new();
    let v = Verifier::new(home.key().public(), Policies::default_policy());
    let root = home.token("openai", Some(10));
    let three = child(&child(&root, limit(5)), limit(2));
    let bytes = base64::decode_config(&three, base64::URL_SAFE).unwrap();
    let proto = biscuit_auth::format::schema::Biscuit::decode(bytes.as_slice()).unwrap();
    let encode = |p: &biscuit_auth::format::schema::Biscuit| {
        let mut out = Vec::new();
        p.encode(&mut out).unwrap();
        base64::encode_config(out, base64::URL_SAFE)
    };
    // Control: decoding and re-encoding untouched keeps the token valid, so
    // the refusals below are about the tampering, not the encoding.
    assert!(v.verify_token(&encode(&proto)).is_ok());
    // Swap blocks 1 and 2 (e.g. to put the looser limit last).
    let mut swapped = proto.clone();
    swapped.blocks.swap(0, 1);
    assert!(v.verify_token(&encode(&swapped)).is_err());
    // Drop the last block (to shed its limit): the proof no longer matches.
    let mut dropped = proto.clone();
    dropped.blocks.pop();
    assert!(v.verify_token(&encode(&dropped)).is_err());
    // Duplicate a block.
    let mut dup = proto.clone();
    dup.blocks.push(dup.blocks[0].clone());
    assert!(v.verify_token(&encode(&dup)).is_err());
    // A third-party block made for another token cannot be transplanted.
    let other = home.token("openai", None);
    let other_b = Biscuit::from_base64(&other, home.key().public()).unwrap();
    let tp = KeyPair::new();
    let block = other_b
        .third_party_request()
        .unwrap()
        .create_block(
            &tp.private(),
            BlockBuilder::new()
                .code("check if time($t), $t <= 2100-01-01T00:00:00Z")
                .unwrap(),
        )
        .unwrap();
    let with_tp = other_b
        .append_third_party(tp.public(), block)
        .unwrap()
        .to_base64()
        .unwrap();
    assert!(
        v.verify_token(&with_tp).is_ok(),
        "on its own token the block is fine"
    );
    // Splice that signed block (and its proof) onto another token.
    let donor = biscuit_auth::format::schema::Biscuit::decode(
        base64::decode_config(&with_tp, base64::URL_SAFE)
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    let mut target = biscuit_auth::format::schema::Biscuit::decode(
        base64::decode_config(&root, base64::URL_SAFE)
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    assert!(v.verify_token(&encode(&target)).is_ok(), "control");
    target.blocks.push(donor.blocks[0].clone());
    target.proof = donor.proof.clone();
    assert!(
        v.verify_token(&encode(&target)).is_err(),
        "transplanted third-party block accepted"
    );
    // biscuit itself refuses to append it to another token.
    let other_block = Biscuit::from_base64(&other, home.key().public())
        .unwrap()
        .third_party_request()
        .unwrap()
        .create_block(&tp.private(), BlockBuilder::new())
        .unwrap();
    let target_b = Biscuit::from_base64(&root, home.key().public()).unwrap();
    assert!(
        target_b
            .append_third_party(tp.public(), other_block)
            .is_err()
    );
    // A token for another root key.
    assert!(matches!(
        v.verify_token(&Home::new().token("openai", None)),
        Err(TokenError::WrongRootKey)
    ));
}

#[test]
fn sealed_tokens_verify_but_cannot_be_attenuated() {
    let home = Home::new();
    let v = Verifier::new(home.key().public(), Policies::default_policy());
    let t = home.token("openai", Some(3));
    let sealed = Biscuit::from_base64(&t, home.key().public())
        .unwrap()
        .seal()
        .unwrap()
        .to_base64()
        .unwrap();
    let vt = v.verify_token(&sealed).unwrap();
    assert!(v.authorize(&vt, &req("/v1/x"), &[1]).is_ok());
    assert!(
        v.authorize(&vt, &req("/v1/x"), &[4]).is_err(),
        "sealing does not lift the limit"
    );
    assert!(token::attenuate(&sealed, &limit(1)).is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_tokens_and_headers_get_431_before_any_signature_work() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(
        &home,
        &[openai(&up)],
        "[limits]\nmax_header_bytes = 32768\nmax_headers = 50\n",
    );
    let c = client();
    let huge = "A".repeat(token::MAX_TOKEN_LEN + 1);
    let r = c
        .get(proxy.url("/openai/v1/x"))
        .bearer_auth(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    let mut rb = c
        .get(proxy.url("/openai/v1/x"))
        .bearer_auth(home.token("openai", None));
    for i in 0..80 {
        rb = rb.header(format!("x-pad-{i}"), "1");
    }
    assert_eq!(rb.send().await.unwrap().status(), 431, "too many headers");
    let r = c
        .get(proxy.url("/openai/v1/x"))
        .header("x-big", "b".repeat(64 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431, "header block over the limit");
    assert_eq!(up.count(), 0);
    // Still healthy.
    assert_eq!(chat(&proxy, &home.token("openai", None), "m").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_header_count_limit_is_100() {
    // The default is left to hyper (no `max_headers` call): it must still
    // be 100, refused with 431 above it and forwarded at it.
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let c = client();
    let token = home.token("openai", None);
    let with_pads = |n: usize| {
        let mut rb = c.get(proxy.url("/openai/v1/x")).bearer_auth(&token);
        for i in 0..n {
            rb = rb.header(format!("x-pad-{i}"), "1");
        }
        rb
    };
    // reqwest adds `accept` and `host`; with `authorization`, 3 headers.
    assert_eq!(with_pads(98).send().await.unwrap().status(), 431);
    assert_eq!(up.count(), 0);
    assert_eq!(with_pads(97).send().await.unwrap().status(), 200);
    assert_eq!(up.count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_are_cut_off_and_the_connection_cap_holds() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(
        &home,
        &[openai(&up)],
        "[limits]\nheader_timeout_secs = 1\nmax_connections = 3\n",
    );
    // Slowloris: a request head that never completes is closed.
    let mut slow = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET /openai/v1/x HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    // Well under the default 10 s, so the configured 1 s is what cut it.
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("the proxy closes a slow client")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.contains("408"), "{text}");
    // Three idle connections fill the cap; a fourth waits in the backlog.
    let proxy2 = Proxy::start(
        &Home::new(),
        &[openai(&up)],
        "[limits]\nheader_timeout_secs = 30\nmax_connections = 3\n",
    );
    let mut idle = Vec::new();
    for _ in 0..3 {
        let s = tokio::net::TcpStream::connect(proxy2.addr).await.unwrap();
        idle.push(s);
    }
    let url = proxy2.url("/healthz");
    let fourth = tokio::spawn(async move { client().get(url).send().await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!fourth.is_finished(), "served over the cap");
    // Closing one idle connection lets the waiting request in.
    idle.pop();
    let r = tokio::time::timeout(Duration::from_secs(10), fourth)
        .await
        .expect("served once a slot frees")
        .unwrap()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_file_deleted_while_running_fails_closed() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    // A 5-use token has no lease: every use is committed.
    let t = home.token("openai", Some(5));
    assert_eq!(chat(&proxy, &t, "m").await.0, 200);
    std::fs::remove_file(home.path().join(till::store::embedded::STORE_FILE)).unwrap();
    let (s, v) = chat(&proxy, &t, "m").await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "store_unavailable");
    // Where the store lives is the operator's business, not the agent's;
    // the audit keeps the cause.
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains(home.path().to_str().unwrap()) && !message.contains("redb"),
        "{message}"
    );
    assert_eq!(
        client()
            .get(proxy.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(up.count(), 1, "nothing forwarded without a durable count");
    assert!(proxy.logs().contains("deleted or replaced"));
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_upstreams_give_clean_errors_and_leak_nothing() {
    // An upstream that answers garbage, and one that resets mid-stream.
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gaddr = garbage.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = garbage.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"\x00\x01garbage not http\r\n\r\n").await;
            });
        }
    });
    let reset = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raddr = reset.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = reset.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n10\r\ndata: one\n\n\r\n")
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                // Drop the connection in the middle of the stream.
            });
        }
    });
    let home = Home::new();
    let ups = [
        Up {
            name: "garbage",
            url: format!("http://{gaddr}"),
            header: "authorization",
            prefix: "Bearer ",
            env: "TEST_OPENAI_KEY",
        },
        Up {
            name: "reset",
            url: format!("http://{raddr}"),
            header: "authorization",
            prefix: "Bearer ",
            env: "TEST_OPENAI_KEY",
        },
    ];
    let proxy = Proxy::start(&home, &ups, "");
    let t = home.issue(Scope {
        services: vec!["garbage".into(), "reset".into()],
        max_uses: Some(1000),
        ..Scope::default()
    });
    let c = client();
    // Warm up, then take the fd baseline.
    let _ = c.get(proxy.url("/garbage/x")).bearer_auth(&t).send().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = open_fds(proxy.pid());
    for _ in 0..20 {
        let r = c
            .get(proxy.url("/garbage/x"))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502);
        let body = r.text().await.unwrap();
        assert!(!body.contains(OPENAI_SECRET));
        let r = c
            .get(proxy.url("/reset/stream"))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // The client sees the stream end with an error, not a hang.
        let res = tokio::time::timeout(Duration::from_secs(10), r.bytes())
            .await
            .expect("stream terminates");
        assert!(
            res.is_err(),
            "a reset mid-stream must not look like a clean end"
        );
    }
    // Connections close asynchronously: wait for the count to settle.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut after = open_fds(proxy.pid());
    while after > before + 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = open_fds(proxy.pid());
    }
    assert!(
        after <= before + 2,
        "file descriptors leak: {before} -> {after}"
    );
    // Counts stay consistent: 41 requests were forwarded.
    let out = till(["usage", "--json", &t, "--url", &proxy.url("")])
        .home(&home)
        .env("TILL_ADMIN_TOKEN", &home.admin())
        .run();
    out.success();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v[0]["uses"], 41);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_credential_never_appears_in_responses_logs_or_metrics() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "[audit]\nstdout = true\n");
    let t = home.token("openai", Some(2));
    let c = client();
    let mut bodies = String::new();
    for path in [
        "/openai/v1/chat/completions",
        "/openai/status/500",
        "/openai/redirect",
        "/openai/nope",
    ] {
        let r = c
            .post(proxy.url(path))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        bodies.push_str(&format!("{:?}", r.headers()));
        bodies.push_str(&r.text().await.unwrap());
    }
    bodies.push_str(
        &c.get(proxy.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert!(!bodies.contains(OPENAI_SECRET));
    // The audit writer is asynchronous: wait for its lines before asserting
    // what they do not contain.
    let audit_file = home.path().join("audit.jsonl");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut audit = String::new();
    while audit.lines().count() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        audit = std::fs::read_to_string(&audit_file).unwrap_or_default();
    }
    assert!(audit.lines().count() >= 2, "no audit lines: {audit:?}");
    assert!(!proxy.logs().contains(OPENAI_SECRET));
    // Neither the token's head nor its signature (the unique part).
    let tail = &t[t.len() - 40..];
    assert!(!audit.contains(OPENAI_SECRET) && !audit.contains(&t[..30]) && !audit.contains(tail));
    assert!(!proxy.logs().contains(tail));
    // The upstream did get it, in the configured header only.
    assert!(
        up.seen()
            .iter()
            .all(|s| s.headers["authorization"] == format!("Bearer {OPENAI_SECRET}"))
    );
}

/// A full disk, made real with a file-size limit on the proxy process
/// (`prlimit --fsize`; writes past it fail with EFBIG as they would with
/// ENOSPC; SIGXFSZ is ignored so the write error is what Till sees).
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_gives_503_forwards_nothing_and_loses_no_count() {
    const LIMIT: u64 = 384 * 1024;
    let up = Upstream::start().await;
    let home = Home::new();
    let store = home.path().join(till::store::embedded::STORE_FILE);
    let u = openai(&up);
    let cfg = format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\npolicies = {:?}\n[audit]\nenabled = false\n\
         [upstreams.{}]\nurl = {:?}\ncredential = {{ env = {:?} }}\nheader = {:?}\nprefix = {:?}\n",
        home.path().to_str().unwrap(),
        policies_dir(),
        u.name,
        u.url,
        u.env,
        u.header,
        u.prefix
    );
    let config = home.write("till.toml", &cfg);
    let fsize = format!("--fsize={LIMIT}");
    let wrapper = [
        "sh",
        "-c",
        r#"trap "" XFSZ; exec prlimit "$0" -- "$@""#,
        fsize.as_str(),
    ];
    let mut proxy = Proxy::spawn_via(
        &home,
        &wrapper,
        "info",
        &["serve", "--config", config.to_str().unwrap()],
        &config,
    )
    .expect("proxy starts under a file-size limit");

    // One-use tokens of distinct families: every use is a committed row.
    let mut served = Vec::new();
    let mut refused = None;
    for _ in 0..4000 {
        let t = home.token("openai", Some(1));
        let (s, v) = chat(&proxy, &t, "m").await;
        match s {
            200 => served.push(t),
            503 => {
                refused = Some((t, v));
                break;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    let (last, v) = refused.unwrap_or_else(|| {
        panic!(
            "the store never hit the {LIMIT}-byte limit after {} families ({} bytes)",
            served.len(),
            std::fs::metadata(&store).map(|m| m.len()).unwrap_or(0)
        )
    });
    assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
    eprintln!("disk full after {} one-use families", served.len());
    assert!(
        served.len() > 10,
        "the disk filled too early to mean anything"
    );
    assert_eq!(
        up.count(),
        served.len(),
        "exactly the requests with a durable count were forwarded"
    );
    // Fail closed from then on, also for tokens that were fine before.
    assert_eq!(chat(&proxy, &home.token("openai", None), "m").await.0, 503);
    assert!(
        proxy.logs().contains("counter store commit failed"),
        "{}",
        proxy.logs()
    );

    // Space is freed: the operator restarts. Nothing committed was lost,
    // and the store opens.
    proxy.kill9();
    let proxy = Proxy::start_config(&home, &config).expect("the store opens after a full disk");
    for t in &served {
        let (s, v) = chat(&proxy, t, "m").await;
        assert_eq!(s, 429, "a one-use token served before the disk filled: {v}");
    }
    assert_eq!(
        chat(&proxy, &last, "m").await.0,
        200,
        "the refused use was not counted"
    );
    assert_eq!(up.count(), served.len() + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_dns_rebinding_foreign_host_headers_are_refused_by_metrics_admin_and_dashboard()
{
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let port = proxy.addr.port();
    let admin = home.admin();
    let login_form = format!(
        "token={}",
        percent_encoding::utf8_percent_encode(&admin, percent_encoding::NON_ALPHANUMERIC)
    );
    // Log in to the dashboard the proper way, to show a session does not
    // help a foreign Host either.
    let login = client()
        .post(proxy.url("/dashboard/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(login_form.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 303);
    let cookie = login.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let get = |path: &str, host: &str| {
        client()
            .get(proxy.url(path))
            .header("host", host)
            .bearer_auth(&admin)
            .header("cookie", &cookie)
            .send()
    };
    let paths = [
        "/metrics",
        "/admin/usage",
        "/admin/alerts",
        "/dashboard",
        "/dashboard/app.js",
        "/dashboard/api/state",
    ];
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_string(),
        format!("127.0.0.1.evil.example:{port}"),
        format!("localhost:{}", port.wrapping_add(1)),
        format!("till.internal:{port}"),
        "till.internal".to_string(),
    ] {
        for path in paths {
            let r = get(path, &host).await.unwrap();
            assert_eq!(r.status(), 421, "{path} with Host {host}");
            let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            assert_eq!(v["error"]["code"], "host_not_allowed", "{path}: {v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("admin_hosts"),
                "{v}"
            );
        }
        let r = client()
            .post(proxy.url("/dashboard/login"))
            .header("host", &host)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(login_form.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 421, "login with Host {host}");
        assert!(r.headers().get("set-cookie").is_none());
    }
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        for path in paths {
            let r = get(path, &host).await.unwrap();
            assert_eq!(r.status(), 200, "{path} with Host {host}");
        }
    }
    // Proxied requests are not the admin plane: any Host is fine there.
    let t = home.token("openai", None);
    let r = client()
        .get(proxy.url("/openai/v1/models"))
        .header("host", "evil.example")
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A name the operator lists is accepted, exactly as listed.
    let listed = Proxy::start(
        &Home::new(),
        &[openai(&up)],
        "admin_hosts = [\"till.internal\"]",
    );
    let with_port = format!("till.internal:{}", listed.addr.port());
    for (host, status) in [("till.internal", 200), (with_port.as_str(), 421)] {
        let r = client()
            .get(listed.url("/metrics"))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{host}");
    }
}
