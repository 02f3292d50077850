//! Fuzz target bodies, shared by the cargo-fuzz targets in `fuzz/` and the
//! stable, bounded smoke test (`tests/it/fuzz_smoke.rs`).
//!
//! Each function takes arbitrary bytes and must never panic: a panic here is
//! a bug, either in the code under test or in one of the invariants the
//! functions assert about it. Not part of Till's API.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use biscuit_auth::{Algorithm, BlockBuilder, KeyPair, PrivateKey, UnverifiedBiscuit};
use http::{HeaderMap, HeaderValue, header};

use crate::policy::Policies;
use crate::proxy::Config;
use crate::proxy::handler::{extract_token, model_of};
use crate::token::inspect::inspect;
use crate::token::{self, MAX_BLOCKS, MAX_TOKEN_LEN, RawToken, RequestFacts, Scope, shape};
use crate::verify::Verifier;

/// The fixed root key of the fuzz targets (a fixed key keeps runs
/// reproducible; it signs nothing outside fuzzing).
pub fn root() -> &'static KeyPair {
    static ROOT: OnceLock<KeyPair> = OnceLock::new();
    ROOT.get_or_init(|| {
        let sk = PrivateKey::from_bytes(&[0x42; 32], Algorithm::Ed25519)
            .expect("32 bytes are an Ed25519 private key");
        KeyPair::from(&sk)
    })
}

/// A root token for the fuzz key, used as the parent of fuzzed blocks.
fn parent() -> &'static str {
    static PARENT: OnceLock<String> = OnceLock::new();
    PARENT.get_or_init(|| {
        token::issue(
            root(),
            &Scope {
                services: vec!["openai".into()],
                methods: vec!["POST".into()],
                paths: vec!["/v1/".into()],
                models: vec!["gpt-4o-mini".into()],
                tools: Vec::new(),
                prompts: Vec::new(),
                resources: Vec::new(),
                max_uses: Some(10),
                expires: Some(UNIX_EPOCH + Duration::from_secs(4_000_000_000)),
                label: Some("fuzz".into()),
                datalog: None,
                rates: Vec::new(),
                concurrency: None,
            },
        )
        .expect("a vocabulary scope issues")
    })
}

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| Verifier::new(root().public(), Policies::default_policy()))
}

/// Token decoding and block checks: `data` is tried as the decoded token
/// bytes (base64-encoded here, so mutations reach the protobuf), as token
/// text, and as the Datalog source of an attenuation block appended to a
/// valid token, which is then checked and, if its shape is accepted,
/// authorized.
pub fn token(data: &[u8]) {
    token_text(&base64::encode_config(data, base64::URL_SAFE));
    if let Ok(text) = std::str::from_utf8(data) {
        token_text(text);
        datalog_block(text);
    }
}

fn token_text(text: &str) {
    let Ok(raw) = RawToken::parse(text) else {
        return;
    };
    assert!(raw.block_count() <= MAX_BLOCKS);
    assert_eq!(raw.revocation_ids().len(), raw.block_count());
    let _ = shape::check(&raw);
    if let Ok(view) = inspect(&raw) {
        assert_eq!(view.blocks.len(), raw.block_count());
        let _ = view.effective_limits();
        let _ = view.expires_at();
        let _ = view.labels();
        for b in &view.blocks {
            for c in &b.checks {
                let _ = c.explain(b.index, &view);
            }
        }
        let _ = serde_json::to_string(&view);
    }
    let _ = raw.unverified();
    // Fails for anything not signed by the fuzz key, which is the point: it
    // must fail cleanly.
    if let Ok(t) = verifier().verify_token(text) {
        authorize_all(&t);
    }
}

fn authorize_all(t: &crate::verify::VerifiedToken) {
    let v = verifier();
    let n = t.ids.len();
    for (path, model, uses) in [
        ("/v1/chat/completions", Some("gpt-4o-mini"), 1),
        ("/v2/x", None, 1),
        ("/v1/chat/completions", Some("gpt-4o-mini"), 11),
    ] {
        let req = RequestFacts {
            service: "openai".into(),
            method: "POST".into(),
            path: path.into(),
            model: model.map(Into::into),
            mcp: None,
            time: SystemTime::now(),
        };
        let _ = v.authorize(t, &req, &vec![uses; n]);
        let before_body = RequestFacts { model: None, ..req };
        let _ = v.authorize_before_body(t, &before_body, &vec![uses; n]);
    }
    let _ = v.authorize_admin(t, "GET", "/admin/usage", SystemTime::now(), &vec![1; n]);
}

fn datalog_block(code: &str) {
    let Ok(block) = BlockBuilder::new().code(code) else {
        return;
    };
    let Ok(parent) = UnverifiedBiscuit::from_base64(parent()) else {
        unreachable!("the fuzz parent token parses");
    };
    let Ok(child) = parent.append(block).and_then(|c| c.to_base64()) else {
        return;
    };
    // Goes through parse → shape → signatures → inspect → authorize.
    token_text(&child);
}

/// Request-fact extraction. `data` is split on NUL bytes into
/// `path \0 authorization \0 x-api-key \0 content-type \0 body`.
pub fn request(data: &[u8]) {
    let mut parts = data.splitn(5, |b| *b == 0);
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let auth = parts.next();
    let api_key = parts.next();
    let content_type = parts.next();
    let body = parts.next().unwrap_or_default();

    check_path(&path);
    check_path(&format!("/{path}"));

    let mut h = HeaderMap::new();
    for (name, value) in [
        (header::AUTHORIZATION, auth),
        (header::HeaderName::from_static("x-api-key"), api_key),
        (header::CONTENT_TYPE, content_type),
    ] {
        if let Some(v) = value.and_then(|v| HeaderValue::from_bytes(v).ok()) {
            h.insert(name, v);
        }
    }
    if let Ok(t) = extract_token(&h) {
        assert!(!t.is_empty() && t.len() <= MAX_TOKEN_LEN, "{t:?}");
        assert_eq!(t, t.trim());
        let _ = RawToken::parse(t);
    }

    if let Ok(Some(m)) = model_of(body) {
        // The model fact must be what the upstream reads: the `model`
        // string of a JSON object.
        // serde_json's `Value` refuses numbers beyond f64 (`1e999`) that the
        // model reader skips; the upstream decides about those, and any
        // reader that accepts the body reads the same model.
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) => {
                assert!(v.is_object(), "model {m:?} read from a non-object body");
                assert_eq!(v["model"].as_str(), Some(m.as_str()));
            }
            Err(e) => assert!(
                e.to_string().starts_with("number out of range"),
                "model {m:?} read from a body that is not JSON: {e}"
            ),
        }
    }
}

/// Invariants of path normalisation: idempotent, absolute, and free of
/// empty, `.` and `..` segments and of encoded separators.
pub fn check_path(p: &str) {
    let Ok(n) = crate::path::normalize(p) else {
        return;
    };
    assert!(n.starts_with('/'), "{p:?} -> {n:?}");
    assert!(
        !n.contains("//") && !n.contains("/./") && !n.contains("/../"),
        "{p:?} -> {n:?}"
    );
    let inner = n.trim_end_matches('/');
    for seg in inner.split('/').skip(1) {
        assert!(
            !seg.is_empty() && seg != "." && seg != "..",
            "{p:?} -> {n:?}"
        );
        // Servers that strip `;` parameters before resolving dot segments
        // must not find one either.
        let head = seg.split(';').next().unwrap_or(seg);
        let head = head.split("%3B").next().unwrap_or(head);
        assert!(head != "." && head != "..", "{p:?} -> {n:?}");
    }
    let lower = n.to_ascii_lowercase();
    assert!(
        !lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%2e"),
        "{p:?} -> {n:?}"
    );
    assert_eq!(
        crate::path::normalize(&n).as_deref(),
        Ok(n.as_str()),
        "not idempotent for {p:?}"
    );
}

/// Configuration parsing: whatever parses also validates, and adding the
/// well-known upstreams keeps it valid.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(mut c) = Config::parse(&text, "fuzz.toml") else {
        return;
    };
    c.validate().expect("a parsed config validates");
    c.add_well_known_from_env(&|_| Some("x".into()));
    c.validate()
        .expect("well-known upstreams keep a config valid");
}

/// Seed inputs for `target` (`token`, `request` or `config`): valid tokens
/// (signed by [`root`]) and hostile ones, tricky requests, real configs.
/// The smoke test mutates these; `fuzz/seeds/` holds the same for cargo-fuzz.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "token" => token_seeds(),
        "request" => request_seeds(),
        "config" => config_seeds(),
        other => panic!("no fuzz target {other:?}"),
    }
}

fn token_seeds() -> Vec<Vec<u8>> {
    let decode = |t: &str| base64::decode_config(t, base64::URL_SAFE).expect("a token is base64");
    let mut out = Vec::new();
    let p = parent().to_string();
    let child = token::attenuate(
        &p,
        &Scope {
            paths: vec!["/v1/chat/".into()],
            max_uses: Some(3),
            ..Scope::default()
        },
    )
    .expect("a vocabulary block attenuates");
    let grandchild = token::attenuate(
        &child,
        &Scope {
            services: vec!["openai".into()],
            methods: vec!["POST".into()],
            models: vec!["gpt-4o-mini".into()],
            expires: Some(UNIX_EPOCH + Duration::from_secs(3_000_000_000)),
            label: Some("x\"); right(\"github\", \"*\", \"/\"); //".into()),
            ..Scope::default()
        },
    )
    .expect("a vocabulary block attenuates");
    let admin = token::issue(
        root(),
        &Scope {
            services: vec![token::vocab::ADMIN_SERVICE.into()],
            ..Scope::default()
        },
    )
    .expect("an admin scope issues");
    let hostile = UnverifiedBiscuit::from_base64(&p)
        .and_then(|u| {
            u.append(
                BlockBuilder::new()
                    .code("x($a, $b) <- uses($a, $c), uses($b, $d); check if path($p), $p.matches(\"^(a+)+$\")")
                    .expect("hostile seed parses"),
            )
        })
        .and_then(|c| c.to_base64())
        .expect("hostile seed appends");
    for t in [&p, &child, &grandchild, &admin, &hostile] {
        out.push(decode(t));
        out.push(t.as_bytes().to_vec());
    }
    for code in [
        "check if path($p), $p.starts_with(\"/v1/chat/\")",
        "check if time($t), $t <= 2030-01-01T00:00:00Z; check if uses(1, $u), $u <= 2",
        "check if service($s), {\"openai\", \"github\"}.contains($s) or method(\"GET\")",
        "check if model($m), $m == \"gpt-4o-mini\"; label(\"agent\"); use_limit(1, 5)",
        "check all uses($k, $n), $n <= 3",
        "reject if path($p), $p.contains(\"..\")",
        "right(\"github\", \"*\", \"/\"); check if true",
        "check if uses($a, $b), uses($c, $d), uses($e, $f), $b + $d + $f < 0",
        "x($a) <- uses($a, $b)",
    ] {
        out.push(code.as_bytes().to_vec());
    }
    out
}

fn request_seeds() -> Vec<Vec<u8>> {
    let t = parent();
    let mut out = Vec::new();
    for (path, auth, key, ct, body) in [
        (
            "/v1/chat/completions",
            format!("Bearer {t}"),
            "",
            "application/json",
            r#"{"model":"gpt-4o-mini","messages":[]}"#,
        ),
        (
            "/v1/chat/../files",
            "bearer  x ".into(),
            "abc",
            "application/vnd.api+json; charset=utf-8",
            r#"{"model":"a","model":"b"}"#,
        ),
        (
            "//v1/%2e%2e/%2E/chat%2fx",
            "Basic dXNlcjpwYXNz".into(),
            t,
            "text/plain",
            r#"["gpt-4o-mini"]"#,
        ),
        (
            "/v1/%63hat/./x/..",
            String::new(),
            " ",
            "application/json",
            r#"{"mod\u0065l":"gpt-4o","x":{"model":"y"}}"#,
        ),
        (
            "/v1/chat/..;/files/.%2e%3bx/.;",
            format!("Bearer {t}"),
            "",
            "application/json",
            r#"{"model":"gpt-4o-mini"}"#,
        ),
        (
            "/a%5C..%5Cb/%zz/é",
            "Bearer".into(),
            "",
            "",
            r#"{"model":null}"#,
        ),
    ] {
        let mut v = Vec::new();
        for (i, part) in [path, &auth, key, ct, body].iter().enumerate() {
            if i > 0 {
                v.push(0);
            }
            v.extend_from_slice(part.as_bytes());
        }
        out.push(v);
    }
    out
}

fn config_seeds() -> Vec<Vec<u8>> {
    let mut out = vec![
        crate::proxy::config::default_file(
            std::path::Path::new(".till"),
            crate::proxy::config::default_listen(),
        )
        .into_bytes(),
        br#"listen = "127.0.0.1:8787"
state_dir = ".till"
policies = "policies"
danger_admin_remote = false
[upstreams.openai]
url = "https://api.openai.com"
credential = { env = "OPENAI_API_KEY" }
header = "authorization"
prefix = "Bearer "
[upstreams.local]
url = "http://127.0.0.1:9/base"
credential = { file = "/nonexistent/secret" }
header = "x-api-key"
prefix = ""
[limits]
max_body_bytes = 1024
max_connections = 1
[alerts]
thresholds = [0.5, 1.0]
[[alerts.webhooks]]
url = "http://127.0.0.1:9/hook"
format = "slack"
"#
        .to_vec(),
    ];
    out.push(b"[upstreams.\"a b\"]\nurl = \"ftp://x?y#z\"\n".to_vec());
    out.push(b"listen = 5\n[limits]\nmax_connections = 0\n".to_vec());
    out.push(
        b"[upstreams.openai]\nurl = \"https://u:p@api.openai.com\"\nset_headers = { \"OpenAI-Organization\" = \"org-1\", \"Host\" = \"x\" }\npass_headers = [\"OpenAI-Project\", \"x-a\"]\n"
            .to_vec(),
    );
    out
}
