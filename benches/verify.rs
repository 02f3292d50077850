//! Criterion benches of the CPU side of the request path.
//!
//! * `verify/cold/{1,3,8}`: `Verifier::verify_token` (base64, envelope,
//!   every block's signature, inspection). What a cache miss costs.
//! * `verify/warm/{1,3,8}`: `AppState::verify_cached` on a token already in
//!   the moka cache. What every later request with that token costs.
//! * `authorize/3`: `Verifier::authorize` alone for a 3-block token, asked
//!   the same request again: the decision cache answers (expiry and use
//!   limits compared natively).
//! * `authorize/4_datalog`: the same token with a fourth block holding a
//!   check Till does not recognise, so every call runs Datalog (policies +
//!   every block's checks, with `uses` facts).
//! * `authorize/costliest_block`: the most expensive attenuation block the
//!   shape check accepts, with the longest request facts accepted: the
//!   worst case one request can make Datalog do.
//! * `authorize/costliest_set_block`: the longest chain of unions and
//!   intersections over two 256-integer sets the shape check accepts (set
//!   operations are charged by the size of their sets).
//! * `monitor_record/3`: `Monitor::record` for an allowed request (metrics,
//!   an audit line queued to a file, recent decisions, threshold alerts).
//! * `request_path/warm/3`: the handler's steps minus HTTP and forwarding:
//!   verify (cache hit) → revocation → reserve in the embedded store (large
//!   limits, so leases make most reservations free) → authorize → await
//!   durability → monitor record. Compared with the issue's 40 µs target.
//! * `mcp/parse/tools_call`: `mcp::parse` of a typical `tools/call` body
//!   (the strict pass for twin keys, then the message).
//! * `mcp/decide/tools_call`: the decision for a tool call with a 2-block
//!   `--tool` token, asked again (the decision cache answers).
//! * `mcp/filter_tools_list/{10,100}`: narrowing a `tools/list` result of
//!   10 or 100 tools, of which a tenth may be called, to what the token may
//!   call (one decision per tool; denials always run Datalog).
//!
//! Run: `cargo bench --bench verify` (add `-- --quick` for a fast pass).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use till::decide::{Stage, decide, recheck};
use till::monitor::{AlertConfig, AuditConfig, Monitor, Observation};
use till::policy::Policies;
use till::proxy::{AppState, Config};
use till::store::EmbeddedStore;
use till::token::{self, RequestFacts, Scope, keys};
use till::verify::Verifier;

/// A token of `blocks` blocks shaped like real use: an authority block with
/// rights and a large use limit, then attenuation blocks narrowing path and
/// model, each with its own (large) use limit and an expiry.
fn token_with_blocks(root: &biscuit_auth::KeyPair, blocks: usize) -> String {
    let expires = Some(SystemTime::now() + Duration::from_secs(24 * 3600));
    let mut t = token::issue(
        root,
        &Scope {
            services: vec!["openai".into()],
            methods: vec!["POST".into()],
            paths: vec!["/v1/".into()],
            max_uses: Some(1_000_000_000),
            expires,
            label: Some("bench".into()),
            ..Scope::default()
        },
    )
    .expect("issue");
    for k in 1..blocks {
        let scope = if k % 2 == 1 {
            Scope {
                paths: vec!["/v1/chat/".into()],
                max_uses: Some(1_000_000_000 / 10u64.pow(k as u32).max(1)),
                expires,
                ..Scope::default()
            }
        } else {
            Scope {
                models: vec!["gpt-4o-mini".into(), "gpt-4o".into()],
                max_uses: Some((1_000_000_000 / 10u64.pow(k as u32)).max(1_000_000)),
                expires,
                label: Some(format!("agent-{k}")),
                ..Scope::default()
            }
        };
        t = token::attenuate(&t, &scope).expect("attenuate");
    }
    t
}

fn request() -> RequestFacts {
    RequestFacts {
        service: "openai".into(),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        model: Some("gpt-4o-mini".into()),
        mcp: None,
        time: SystemTime::now(),
    }
}

fn app_state(verifier: Verifier, store: EmbeddedStore) -> AppState {
    AppState::new(
        &Config::default(),
        &BTreeMap::new(),
        verifier,
        Arc::new(store.clone()),
        Arc::new(store),
    )
    .expect("app state")
}

fn bench_verify(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let root = keys::generate();
    let verifier = Verifier::new(root.public(), Policies::default_policy());
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let state = app_state(verifier.clone(), store);

    let mut g = c.benchmark_group("verify");
    for n in [1usize, 3, 8] {
        let t = token_with_blocks(&root, n);
        g.bench_with_input(BenchmarkId::new("cold", n), &t, |b, t| {
            b.iter(|| verifier.verify_token(black_box(t)).unwrap())
        });
        state.verify_cached(&t).unwrap();
        g.bench_with_input(BenchmarkId::new("warm", n), &t, |b, t| {
            b.iter(|| state.verify_cached(black_box(t)).unwrap())
        });
    }
    g.finish();

    let t3 = verifier.verify_token(&token_with_blocks(&root, 3)).unwrap();
    // The same token plus a check Till does not recognise, which turns the
    // decision cache off: every call runs Datalog.
    let t3_datalog = verifier
        .verify_token(
            &token::attenuate(
                &token_with_blocks(&root, 3),
                &Scope {
                    datalog: Some(r#"check if method($m), $m != "DELETE";"#.into()),
                    ..Scope::default()
                },
            )
            .unwrap(),
        )
        .unwrap();
    let req = request();
    let mut g = c.benchmark_group("authorize");
    g.bench_function("3", |b| {
        b.iter(|| {
            verifier
                .authorize(black_box(&t3), black_box(&req), black_box(&[1, 1, 1]))
                .unwrap()
        })
    });
    // The most expensive attenuation block the shape check accepts: 32
    // facts of 2,500 bytes joined with a model of the longest accepted
    // length, then 8 expressions of 59 string scans each (about 15,000
    // evaluations, near the work budget), the last one false.
    let long = "y".repeat(2500);
    let scan = vec![format!("$s.contains(\"{long}q\") || $m.contains($s)"); 6].join(" || ");
    let mut exprs = vec![format!("!({scan})"); 7];
    exprs.push(format!("({scan})"));
    let facts: String = (0..32).map(|i| format!("f({i}, \"{long}\");")).collect();
    let block = format!(
        "{facts} check if f($a, $s), model($m), {}",
        exprs.join(", ")
    );
    let root_only = token::issue(
        &root,
        &Scope {
            services: vec!["openai".into()],
            ..Scope::default()
        },
    )
    .unwrap();
    let costliest = biscuit_auth::UnverifiedBiscuit::from_base64(&root_only)
        .unwrap()
        .append(biscuit_auth::BlockBuilder::new().code(&block).unwrap())
        .unwrap()
        .to_base64()
        .unwrap();
    let costliest = verifier.verify_token(&costliest).unwrap();
    let long_req = RequestFacts {
        path: format!("/v1/{}", "p".repeat(4000)),
        model: Some("m".repeat(till::verify::MAX_FACT_LEN)),
        ..request()
    };
    g.bench_function("costliest_block", |b| {
        b.iter(|| {
            verifier
                .authorize(black_box(&costliest), black_box(&long_req), &[1, 1])
                .unwrap_err()
        })
    });
    let ints = |from: usize| {
        (from..from + 256)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let set_token = |n: usize| {
        let block = format!(
            "f(1, {{{}}}); f(2, {{{}}}); check if f($a, $x), f($b, $y), $x{}.length() < 0;",
            ints(0),
            ints(256),
            ".union($y).intersection($x)".repeat(n)
        );
        biscuit_auth::UnverifiedBiscuit::from_base64(&root_only)
            .unwrap()
            .append(biscuit_auth::BlockBuilder::new().code(&block).unwrap())
            .unwrap()
            .to_base64()
            .unwrap()
    };
    let costliest_set = (1..32)
        .map_while(|n| verifier.verify_token(&set_token(n)).ok())
        .last()
        .expect("one step of the set chain is accepted");
    g.bench_function("costliest_set_block", |b| {
        b.iter(|| {
            verifier
                .authorize(black_box(&costliest_set), black_box(&request()), &[1, 1])
                .unwrap_err()
        })
    });
    g.bench_function("4_datalog", |b| {
        b.iter(|| {
            verifier
                .authorize(
                    black_box(&t3_datalog),
                    black_box(&req),
                    black_box(&[1, 1, 1, 1]),
                )
                .unwrap()
        })
    });
    g.finish();
}

fn bench_request_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let root = keys::generate();
    let verifier = Verifier::new(root.public(), Policies::default_policy());
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let state = app_state(verifier.clone(), store.clone());
    let text = token_with_blocks(&root, 3);
    let token = state.verify_cached(&text).unwrap();
    let req = request();

    // The default `till up` monitor: audit lines appended to a file.
    let monitor =
        Monitor::start(&AuditConfig::default(), dir.path(), AlertConfig::default()).unwrap();
    let mut g = c.benchmark_group("monitor_record");
    g.bench_function("3", |b| {
        b.iter(|| {
            let mut o = Observation::new(
                till::monitor::RequestId(0x0123_4567_89ab_cdef),
                Some(([127, 0, 0, 1], 50000).into()),
                "POST",
            );
            o.service = "openai".into();
            o.path = req.path.clone();
            o.model = req.model.clone();
            o.token = Some(token.clone());
            o.uses = Some(vec![1, 1, 1]);
            o.upstream_status = Some(200);
            monitor.record(black_box(&mut o), 200, "ok", None);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("request_path");
    g.bench_function("warm/3", |b| {
        b.iter(|| {
            rt.block_on(async {
                // What the handler does: decide, reserve, re-check.
                let t = state.verify_cached(black_box(&text)).unwrap();
                let revoked = state.revocations.first_revoked(&t.ids).unwrap();
                let counts = state.counters.peek(&t.ids).await.unwrap();
                decide(&state.verifier, &t, revoked, &req, &counts, Stage::Final).unwrap();
                let r = state.counters.reserve(&t.specs).await.unwrap();
                recheck(&state.verifier, &t, &req, &r.uses).unwrap();
                r.durable.await.unwrap();
            })
        })
    });
    g.finish();
    drop(store);
}

fn bench_mcp(c: &mut Criterion) {
    let root = keys::generate();
    let verifier = Verifier::new(root.public(), Policies::default_policy());
    let parent = token::issue(
        &root,
        &Scope {
            services: vec!["github".into()],
            tools: vec!["github_*".into()],
            max_uses: Some(1_000_000),
            ..Scope::default()
        },
    )
    .unwrap();
    let child = token::attenuate(
        &parent,
        &Scope {
            tools: vec!["github_1*".into(), "add".into()],
            max_uses: Some(1_000_000),
            ..Scope::default()
        },
    )
    .unwrap();
    let t = verifier.verify_token(&child).unwrap();
    let body = br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"github_10","arguments":{"owner":"till","repo":"till","state":"open"},"_meta":{"progressToken":3}}}"#;
    let base = RequestFacts {
        service: "github".into(),
        method: "POST".into(),
        path: "/mcp".into(),
        model: None,
        mcp: None,
        time: SystemTime::now(),
    };
    let call = |name: &str| RequestFacts {
        mcp: Some(token::McpMessage {
            method: "tools/call".into(),
            name: Some(name.into()),
        }),
        ..base.clone()
    };
    let mut g = c.benchmark_group("mcp");
    g.bench_function("parse/tools_call", |b| {
        b.iter(|| till::mcp::parse(black_box(body)).unwrap())
    });
    let facts = call("github_10");
    g.bench_function("decide/tools_call", |b| {
        b.iter(|| {
            decide(
                &verifier,
                &t,
                None,
                black_box(&facts),
                &[1, 1],
                Stage::Final,
            )
            .unwrap()
        })
    });
    for n in [10usize, 100] {
        let list = serde_json::json!({"jsonrpc": "2.0", "id": 2, "result": {"tools":
            (0..n).map(|i| serde_json::json!({"name": format!("github_{}", i % 10 * 10 + i / 10),
                "description": "a tool", "inputSchema": {"type": "object"}}))
            .collect::<Vec<_>>()}});
        g.bench_with_input(
            BenchmarkId::new("filter_tools_list", n),
            &list,
            |b, list| {
                b.iter(|| {
                    let mut v = list.clone();
                    till::mcp::filter_lists(&mut v, &mut |_, name| {
                        till::decide::decide_free(
                            &verifier,
                            &t,
                            None,
                            &call(name),
                            &[0, 0],
                            Stage::Final,
                        )
                        .is_ok()
                    });
                    v
                })
            },
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_verify, bench_request_path, bench_mcp
}
criterion_main!(benches);
