//! Property tests: attenuation only narrows (rate windows included), the
//! window store admits exactly, and path normalisation is canonical.
//!
//! Case counts are modest (the suite runs on 2 cores with real Ed25519 and
//! Datalog); raise them with `PROPTEST_CASES=10000 cargo test --test it props`.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use biscuit_auth::KeyPair;
use proptest::prelude::*;
use proptest::sample::subsequence;
use till::policy::Policies;
use till::store::window::{Admit, LocalWindows};
use till::token::vocab::Rate;
use till::token::{self, McpMessage, RequestFacts, Scope};
use till::verify::{Verifier, WindowCounts, WindowSpec};

/// One root key for the whole run.
fn root() -> &'static KeyPair {
    static ROOT: OnceLock<KeyPair> = OnceLock::new();
    ROOT.get_or_init(KeyPair::new)
}

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| Verifier::new(root().public(), Policies::default_policy()))
}

/// Request times and expiries are offsets from this instant.
const T0: u64 = 1_900_000_000;

fn at(offset: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(T0.checked_add_signed(offset).unwrap())
}

const SERVICES: &[&str] = &["openai", "anthropic", "github"];
const METHODS: &[&str] = &["GET", "POST", "DELETE"];
const PREFIXES: &[&str] = &["/", "/v1/", "/v1/chat/", "/v1/chat", "/v1/files", "/v2/"];
const MODELS: &[&str] = &["gpt-4o", "gpt-4o-mini", "claude"];
/// `--tool` arguments: names and prefixes, nested and not.
const TOOL_PATTERNS: &[&str] = &[
    "add",
    "echo",
    "github_*",
    "github_pr_*",
    "delete_everything",
];
/// Tools requests call: matching those patterns, almost matching, or not.
const TOOLS: &[&str] = &[
    "add",
    "add2",
    "echo",
    "github_",
    "github_pr_list",
    "github_issues",
    "githubx",
    "delete_everything",
    "greet",
    "leak",
    "res://docs/a",
    "res://secret/k",
];
const PROMPT_PATTERNS: &[&str] = &["greet", "leak", "g*"];
const RESOURCE_PREFIXES: &[&str] = &["res://docs/", "res://"];
const MCP_METHODS: &[&str] = &[
    "tools/call",
    "prompts/get",
    "resources/read",
    "tools/list",
    "initialize",
    "",
];
/// Offsets (seconds from T0) for expiries and request times.
const OFFSETS: &[i64] = &[-86_400, -60, 0, 60, 86_400];
const SEGMENTS: &[&str] = &[
    "v1",
    "v2",
    "chat",
    "Chat",
    "completions",
    "files",
    "..",
    ".",
    "",
    "%2e%2e",
    "%2E",
    ".%2e",
    "%63hat",
    "%2f",
    "%5c",
    "a%20b",
    "%zz",
    "é",
];

fn strings(pool: &'static [&'static str], min: usize) -> impl Strategy<Value = Vec<String>> {
    subsequence(pool, min..=pool.len()).prop_map(|v| v.into_iter().map(String::from).collect())
}

/// A scope built from the vocabulary. Authority scopes need a service.
fn scope(authority: bool) -> impl Strategy<Value = Scope> {
    (
        strings(SERVICES, usize::from(authority)),
        strings(METHODS, 0),
        strings(PREFIXES, 0),
        prop_oneof![2 => Just(Vec::new()), 1 => strings(MODELS, 1)],
        prop_oneof![2 => Just(Vec::new()), 1 => strings(TOOL_PATTERNS, 1)],
        prop_oneof![3 => Just(Vec::new()), 1 => strings(PROMPT_PATTERNS, 1)],
        prop_oneof![3 => Just(Vec::new()), 1 => strings(RESOURCE_PREFIXES, 1)],
        prop::option::of(prop::sample::select(&[1u64, 2, 3, 5, 10][..])),
        prop::option::of(prop::sample::select(OFFSETS)),
        prop_oneof![3 => Just(Vec::new()), 1 => rates()],
        prop::option::weighted(0.25, prop::sample::select(&[1u64, 2, 4][..])),
    )
        .prop_map(
            |(
                services,
                methods,
                paths,
                models,
                tools,
                prompts,
                resources,
                max_uses,
                exp,
                rates,
                concurrency,
            )| Scope {
                services,
                methods,
                paths,
                models,
                tools,
                prompts,
                resources,
                max_uses,
                expires: exp.map(at),
                label: None,
                datalog: None,
                rates,
                concurrency,
            },
        )
}

/// Window lengths the generators use.
const SPANS: &[u64] = &[1, 60, 3600];

/// Up to two rate windows of distinct lengths.
fn rates() -> impl Strategy<Value = Vec<Rate>> {
    (
        subsequence(SPANS, 0..=2),
        prop::collection::vec(prop::sample::select(&[1u64, 2, 5, 10][..]), 2),
    )
        .prop_map(|(spans, limits)| {
            spans
                .into_iter()
                .zip(limits)
                .map(|(seconds, limit)| Rate { limit, seconds })
                .collect()
        })
}

/// The `rate` and `in_flight` facts of a token's windows and caps, counts
/// drawn from `vals` (the same for a block in a child and in its parent: a
/// request of the child is in every ancestor's windows).
fn window_counts(t: &till::verify::VerifiedToken, vals: &[u64]) -> WindowCounts {
    let pick = |k: usize, s: u64| vals[(k * 3 + s as usize) % vals.len()];
    WindowCounts {
        rates: t
            .windows
            .iter()
            .map(|w| (w.block, w.seconds, pick(w.block, w.seconds)))
            .collect(),
        in_flight: t.caps.iter().map(|c| (c.block, pick(c.block, 7))).collect(),
    }
}

/// Dot segments with `;` parameters, read as `.` / `..` by servers that strip
/// path parameters first (kept out of `SEGMENTS`: the proxy refuses them, and
/// the authorization properties want paths it accepts).
const PARAMETER_SEGMENTS: &[&str] = &[
    "..;",
    ".;",
    "..;jsessionid=x",
    "%2e%2e;",
    "..%3b",
    ".%2E%3Bx",
    "x;",
    ";..",
];

/// A raw request path from tricky segments, normalised the way the proxy
/// does; paths the proxy refuses (400) are skipped.
fn request() -> impl Strategy<Value = RequestFacts> {
    (
        prop::sample::select(SERVICES),
        prop::sample::select(METHODS),
        prop::collection::vec(prop::sample::select(SEGMENTS), 0..6),
        prop::option::of(prop::sample::select(MODELS)),
        prop::option::of((
            prop::sample::select(MCP_METHODS),
            prop::sample::select(TOOLS),
        )),
        prop::sample::select(OFFSETS),
    )
        .prop_filter_map(
            "path refused by the proxy",
            |(s, m, segs, model, mcp, t)| {
                let raw = format!("/{}", segs.join("/"));
                let path = till::path::normalize(&raw).ok()?;
                Some(RequestFacts {
                    service: s.into(),
                    method: m.into(),
                    path,
                    model: model.map(String::from),
                    // The proxy names a tool for tools/call only.
                    mcp: mcp.map(|(method, tool)| McpMessage {
                        method: method.into(),
                        name: Some(tool.into()),
                    }),
                    time: at(t),
                })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Whatever a child allows, every ancestor allows with the ancestor's own
    /// counts (the prefix of the child's: a use of a child is a use of each
    /// ancestor).
    #[test]
    fn attenuation_never_allows_what_the_parent_denies(
        authority in scope(true),
        blocks in prop::collection::vec(scope(false), 1..=3),
        requests in prop::collection::vec(
            (request(), prop::collection::vec(1u64..=12, 4)),
            8,
        ),
        vals in prop::collection::vec(1u64..=12, 8),
    ) {
        let v = verifier();
        let mut chain = vec![token::issue(root(), &authority).unwrap()];
        for b in &blocks {
            let next = token::attenuate(chain.last().unwrap(), b).unwrap();
            chain.push(next);
        }
        let verified: Vec<_> = chain.iter().map(|t| v.verify_token(t).unwrap()).collect();
        let mut allowed = 0;
        for (req, uses) in &requests {
            for depth in 1..verified.len() {
                let child = &verified[depth];
                let parent = &verified[depth - 1];
                let child_uses = &uses[..=depth];
                let child_windows = window_counts(child, &vals);
                if v.authorize_windowed(child, req, child_uses, &child_windows).is_ok() {
                    allowed += 1;
                    let parent_says = v.authorize_windowed(
                        parent,
                        req,
                        &child_uses[..depth],
                        &window_counts(parent, &vals),
                    );
                    prop_assert!(
                        parent_says.is_ok(),
                        "block {depth} allows {req:?} with uses {child_uses:?} and windows {child_windows:?} but its parent denies: {parent_says:?}\nauthority: {authority:?}\nblocks: {blocks:?}"
                    );
                }
            }
        }
        // Not an assertion: the generator is tuned so that many cases allow
        // something, which is what makes the implication meaningful.
        let _ = allowed;
    }

    /// The decision cache never changes a decision: a token verified once and
    /// asked many times (so that allowed request shapes are cached and later
    /// answers skip Datalog) answers exactly as a freshly verified token
    /// whose answer comes from Datalog, as uses grow past limits and time
    /// passes expiries.
    #[test]
    fn cached_decisions_equal_datalog_decisions(
        authority in scope(true),
        blocks in prop::collection::vec(scope(false), 0..=2),
        requests in prop::collection::vec(
            (request(), prop::collection::vec(1u64..=12, 3)),
            12,
        ),
        vals in prop::collection::vec(1u64..=12, 8),
    ) {
        let v = verifier();
        let mut t = token::issue(root(), &authority).unwrap();
        for b in &blocks {
            t = token::attenuate(&t, b).unwrap();
        }
        let warm = v.verify_token(&t).unwrap();
        let depth = blocks.len() + 1;
        let mut any_allowed = false;
        // Each request is asked three times: as generated, with every count
        // one higher, and two days later: a shape cached by the first answer
        // meets a count past its limit or a time past an expiry.
        for (req, uses) in &requests {
            for (bump, later) in [(0u64, 0u64), (1, 0), (0, 2 * 86_400)] {
                let uses: Vec<u64> = uses[..depth].iter().map(|u| u + bump).collect();
                let mut req = req.clone();
                req.time += Duration::from_secs(later);
                let req = &req;
                let cold = v.verify_token(&t).unwrap();
                let bumped: Vec<u64> = vals.iter().map(|x| x + bump).collect();
                let windows = window_counts(&cold, &bumped);
                let want = v.authorize_windowed(&cold, req, &uses, &windows).is_ok();
                let got = v.authorize_windowed(&warm, req, &uses, &windows).is_ok();
                prop_assert_eq!(
                    got, want,
                    "cached answer differs for {:?} with uses {:?}\nauthority: {:?}\nblocks: {:?}",
                    req, uses, authority, blocks
                );
                any_allowed |= got;
            }
        }
        // Till's own blocks under the default policy are what the cache is
        // for: whatever was allowed was cached, so hits were compared too.
        if any_allowed {
            prop_assert!(warm.cached_shapes() > 0, "the decision cache was never used");
        }
    }

    /// `normalize` is idempotent and its output has no dot segments, empty
    /// segments or encoded separators.
    #[test]
    fn path_normalisation_is_canonical(
        segs in prop::collection::vec(
            prop_oneof![
                prop::sample::select(SEGMENTS).prop_map(String::from),
                prop::sample::select(PARAMETER_SEGMENTS).prop_map(String::from),
                "[a-zA-Z0-9._~%/;\\\\-]{0,6}",
            ],
            0..8,
        ),
        leading in any::<bool>(),
    ) {
        let raw = format!("{}{}", if leading { "/" } else { "" }, segs.join("/"));
        if let Ok(n) = till::path::normalize(&raw) {
            prop_assert!(n.starts_with('/'));
            prop_assert!(!n.contains("/../") && !n.contains("/./") && !n.contains("//"), "{raw:?} -> {n:?}");
            prop_assert!(!n.ends_with("/..") && !n.ends_with("/."), "{raw:?} -> {n:?}");
            // Tomcat and Spring drop `;` parameters before resolving dot
            // segments: none may be left for them to resolve.
            for seg in n.split('/') {
                let head = seg.split(';').next().unwrap_or(seg);
                let head = head.split("%3B").next().unwrap_or(head);
                prop_assert!(head != "." && head != "..", "{raw:?} -> {n:?}");
            }
            prop_assert_eq!(till::path::normalize(&n), Ok(n.clone()), "not idempotent for {:?}", raw);
        }
        // The shared fuzz invariants agree.
        till::fuzzing::check_path(&raw);
    }
}

/// The generators are not vacuous: a fair share of random (token, request)
/// pairs is allowed, so the implication above is tested on real allows.
#[test]
fn the_property_generators_produce_allowed_requests() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let v = verifier();
    let mut runner = TestRunner::deterministic();
    let (mut tried, mut allowed) = (0, 0);
    for _ in 0..40 {
        let authority = scope(true).new_tree(&mut runner).unwrap().current();
        let child_scope = scope(false).new_tree(&mut runner).unwrap().current();
        let parent = token::issue(root(), &authority).unwrap();
        let child = token::attenuate(&parent, &child_scope).unwrap();
        let t = v.verify_token(&child).unwrap();
        for _ in 0..10 {
            let req = request().new_tree(&mut runner).unwrap().current();
            tried += 1;
            let windows = window_counts(&t, &[1]);
            allowed += usize::from(v.authorize_windowed(&t, &req, &[1, 1], &windows).is_ok());
        }
    }
    assert!(allowed * 50 >= tried, "only {allowed} of {tried} allowed");
}

/// Appends raw Datalog blocks as another Biscuit library would (no Till
/// check on the way). `None` when biscuit itself refuses the code.
fn append_raw(token: &str, blocks: &[String]) -> Option<String> {
    let mut u = biscuit_auth::UnverifiedBiscuit::from_base64(token).ok()?;
    for code in blocks {
        u = u
            .append(biscuit_auth::BlockBuilder::new().code(code).ok()?)
            .ok()?;
    }
    u.to_base64().ok()
}

fn plain_root_token() -> String {
    token::issue(
        root(),
        &Scope {
            services: vec!["openai".into()],
            ..Scope::default()
        },
    )
    .unwrap()
}

/// A request whose strings are as long as Till accepts.
fn long_request() -> RequestFacts {
    RequestFacts {
        service: "openai".into(),
        method: "POST".into(),
        path: format!("/v1/{}", "p".repeat(4000)),
        model: Some("m".repeat(till::verify::MAX_FACT_LEN)),
        mcp: None,
        time: SystemTime::now(),
    }
}

fn facts(n: usize, value: &str) -> String {
    (0..n).map(|i| format!("f({i}, \"{value}\");")).collect()
}

/// Blocks that held a CPU for seconds to minutes (measured: 18 s each for
/// the 6 KB concatenation and `trusting previous` ones) before the work
/// budget; each is now refused before any signature is checked.
#[test]
fn datalog_bombs_within_the_old_shape_limits_are_refused() {
    let long = "x".repeat(3000);
    let concat = vec!["$s"; 28].join(" + ");
    let wide: Vec<String> = (0..8)
        .map(|b| (0..31).map(|i| format!("g({});", b * 100 + i)).collect())
        .collect();
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "cross product of 31 facts, three ways",
            vec![format!(
                "{} check if f($a, $x), f($b, $y), f($c, $z), $a < 0",
                facts(31, "v")
            )],
            "evaluations",
        ),
        (
            "quadratic string concatenation",
            vec![format!(
                "{} check if f($a, $s), f($b, $t), ({concat}).length() < 0",
                facts(31, &long)
            )],
            "'+'",
        ),
        (
            "concatenating the request's model",
            vec![format!(
                "check if model($m), ({}).length() < 0",
                vec!["$m"; 30].join(" + ")
            )],
            "'+'",
        ),
        (
            "cross product over every previous block",
            wide.iter()
                .cloned()
                .chain(["check if g($a), g($b), g($c), $a == -1 trusting previous".to_string()])
                .collect(),
            "evaluations",
        ),
    ];
    let v = verifier();
    for (what, blocks, reason) in cases {
        let t = append_raw(&plain_root_token(), &blocks).expect(what);
        match v.verify_token(&t) {
            Err(till::token::TokenError::Shape(m)) => assert!(m.contains(reason), "{what}: {m}"),
            other => panic!(
                "{what}: expected a shape refusal, got {:?}",
                other.map(|_| ())
            ),
        }
    }
}

/// The most expensive block the shape accepts (the whole work budget spent
/// on scans of the longest strings a token and a request can carry) runs to
/// its end within the authorizer's run limits: the answer is the failing
/// check (`Scope`), not `Limits`, which is what a run stopped by the fact,
/// iteration or time limit gets. How long it takes is measured by
/// `cargo bench --bench verify` (`authorize/costliest_block`), not here.
#[test]
fn the_costliest_accepted_block_runs_to_its_end_within_the_run_limits() {
    let t = costliest_block_token();
    let v = verifier();
    let vt = v.verify_token(&t).expect("accepted by the shape");
    let d = v
        .authorize(&vt, &long_request(), &[1, 1])
        .expect_err("the last expression is false");
    assert_eq!(d.kind, till::verify::DenialKind::Scope, "{d:?}");
}

/// A token whose one attenuation block costs the most the shape accepts.
fn costliest_block_token() -> String {
    let long = "y".repeat(2500);
    // 32 facts, each joined with the model, then 8 expressions of 59
    // operations that scan long strings and find nothing, so that every
    // combination runs them all and the check fails at the end:
    // 32 × (8 × 59 + 1) = 15,136 evaluations, near the budget.
    let scan = vec![format!("$s.contains(\"{long}q\") || $m.contains($s)"); 6].join(" || ");
    let mut exprs = vec![format!("!({scan})"); 7];
    exprs.push(format!("({scan})"));
    let block = format!(
        "{} check if f($a, $s), model($m), {}",
        facts(32, &long),
        exprs.join(", ")
    );
    append_raw(&plain_root_token(), &[block]).unwrap()
}

/// Request facts longer than Till accepts are refused (their length would
/// multiply the cost of every string operation).
#[test]
fn oversized_request_facts_are_denied() {
    let v = verifier();
    let t = v.verify_token(&plain_root_token()).unwrap();
    let mut req = long_request();
    assert!(v.authorize(&t, &req, &[1]).is_ok());
    req.model = Some("m".repeat(till::verify::MAX_FACT_LEN + 1));
    let d = v.authorize(&t, &req, &[1]).unwrap_err();
    assert!(d.reason.contains("model"), "{d:?}");
    req.model = None;
    req.method = "X".repeat(till::verify::MAX_FACT_LEN + 1);
    assert!(v.authorize(&t, &req, &[1]).is_err());
}

fn hostile_block() -> impl Strategy<Value = (Vec<String>, usize)> {
    let pred = prop::sample::select(
        &[
            "f($a, $s)",
            "f($b, $t)",
            "f($c, $u)",
            "uses($k, $n)",
            "uses($j, $o)",
            "path($p)",
            "model($m)",
            "right($x, $y, $z)",
            "label($l)",
        ][..],
    );
    let expr = prop::sample::select(
        &[
            "$s.contains(\"LONG\")",
            "$p.starts_with($s)",
            "$m.contains($t)",
            "$n <= 5",
            "$a < $b",
            "$s.length() > 0",
            "$u == $s",
            "{\"a\", \"b\"}.contains($s)",
            "true",
        ][..],
    );
    let query = (
        prop::collection::vec(pred, 1..=3),
        prop::collection::vec(prop::collection::vec(expr, 1..=6), 0..=8),
    )
        .prop_map(|(body, exprs)| {
            let mut parts: Vec<String> = body.into_iter().map(String::from).collect();
            parts.extend(exprs.into_iter().map(|e| e.join(" && ")));
            parts.join(", ")
        });
    let check = (
        prop::collection::vec(query, 1..=4),
        any::<bool>(),
        prop::sample::select(&["check if", "check all", "reject if"][..]),
    )
        .prop_map(|(qs, trusting, kind)| {
            let t = if trusting { " trusting previous" } else { "" };
            let alts: Vec<String> = qs.into_iter().map(|q| format!("{q}{t}")).collect();
            format!("{kind} {}", alts.join(" or "))
        });
    (
        0usize..=32,
        prop::sample::select(&[1usize, 200, 2500][..]),
        prop::collection::vec(check, 1..=6),
        0usize..=3,
    )
        .prop_map(|(nfacts, len, checks, before)| {
            let long = "z".repeat(len);
            let mut blocks: Vec<String> = (0..before).map(|b| facts(31, &format!("{b}"))).collect();
            let code =
                format!("{}{};", facts(nfacts, &long), checks.join(";\n")).replace("LONG", &long);
            blocks.push(code);
            (blocks, nfacts)
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Whatever hostile block the shape accepts authorizes well within the
    /// run limits, on the longest request facts Till accepts.
    #[test]
    fn any_block_the_shape_accepts_authorizes_quickly((blocks, _n) in hostile_block()) {
        let Some(t) = append_raw(&plain_root_token(), &blocks) else {
            return Ok(()); // biscuit refuses the code (e.g. an unbound variable)
        };
        let v = verifier();
        let Ok(vt) = v.verify_token(&t) else {
            return Ok(()); // refused by the shape
        };
        let uses = vec![1; vt.ids.len()];
        let start = std::time::Instant::now();
        let r = v.authorize(&vt, &long_request(), &uses);
        let took = start.elapsed();
        prop_assert!(
            !matches!(&r, Err(d) if d.kind == till::verify::DenialKind::Limits),
            "accepted block hit the run limits: {r:?}\n{blocks:#?}"
        );
        prop_assert!(took < Duration::from_secs(3), "took {took:?}\n{blocks:#?}");
    }
}

/// The window store's clock in the model test below (ms).
static WINDOW_NOW: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
fn window_now() -> u64 {
    WINDOW_NOW.load(std::sync::atomic::Ordering::SeqCst)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Many children of a windowed key, each maybe with windows of its own,
    /// requesting at random moments: the store admits a request exactly
    /// when every window of the parent and of the child holds fewer than
    /// its limit over the last span (a naive reference log decides), so no
    /// span ever holds more than the parent's limit, whatever the children
    /// write.
    #[test]
    fn windows_admit_exactly_when_every_ancestor_window_has_room(
        parent in (1u64..=5, 1u64..=3),
        children in prop::collection::vec(prop::option::of((1u64..=10, 1u64..=3)), 1..=50),
        events in prop::collection::vec((0usize..50, 0u64..=700, any::<bool>()), 1..=200),
    ) {
        let store = LocalWindows::with_clock(window_now);
        WINDOW_NOW.store(1_000_000, std::sync::atomic::Ordering::SeqCst);
        let p = WindowSpec { block: 0, id: "p".into(), limit: parent.0, seconds: parent.1 };
        // Reference: admission times per window id.
        let mut log: std::collections::HashMap<(String, u64), Vec<u64>> = Default::default();
        for (who, advance, give_back) in events {
            WINDOW_NOW.fetch_add(advance, std::sync::atomic::Ordering::SeqCst);
            let now = window_now();
            let who = who % children.len();
            let mut specs = vec![p.clone()];
            if let Some((limit, seconds)) = children[who] {
                specs.push(WindowSpec { block: 1, id: format!("c{who}"), limit, seconds });
            }
            let room = specs.iter().all(|w| {
                let key = (w.id.clone(), w.seconds);
                let used = log.get(&key).map_or(0, |v| {
                    v.iter().filter(|t| **t + w.seconds * 1000 > now).count() as u64
                });
                used < w.limit
            });
            match store.admit_now("p", &specs, &[]) {
                Admit::Admitted { counts, ticket } => {
                    prop_assert!(room, "admitted with a full window at {now}");
                    for (w, c) in specs.iter().zip(&counts.rates) {
                        prop_assert!(c.2 <= w.limit, "{counts:?}");
                    }
                    if give_back {
                        // Refused after admission (a later check failed):
                        // the slots come back, the reference forgets it.
                        futures_util::FutureExt::now_or_never(
                            till::store::window::WindowStore::cancel(&store, &ticket),
                        );
                    } else {
                        for w in &specs {
                            log.entry((w.id.clone(), w.seconds)).or_default().push(now);
                        }
                    }
                }
                Admit::Full(f) => {
                    prop_assert!(!room, "refused with room in every window at {now}");
                    prop_assert!(f.retry_after_ms >= 1 && f.retry_after_ms <= 3000, "{f:?}");
                }
            }
        }
        // No span of the parent's length holds more than its limit.
        let times = log.get(&("p".to_string(), parent.1)).cloned().unwrap_or_default();
        for (i, t) in times.iter().enumerate() {
            let within = times[i..].iter().filter(|u| **u < t + parent.1 * 1000).count() as u64;
            prop_assert!(within <= parent.0, "{within} admissions in {}s from {t}", parent.1);
        }
    }
}
