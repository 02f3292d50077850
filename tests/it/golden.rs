//! Golden tokens: generated from a seeded RNG and fixed instants, checked in
//! under `tests/golden/`, regenerated and diffed on every test run.
//!
//! A diff means the token format or `till inspect`'s output changed: tokens
//! already handed out would read (or verify) differently. When the change is
//! intended, regenerate with
//!
//! ```text
//! TILL_BLESS=1 cargo test --test it golden::
//! ```
//!
//! and review the diff of `tests/golden/` like any other change.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use biscuit_auth::KeyPair;
use biscuit_auth::builder::Algorithm;
use rand::SeedableRng;
use rand::rngs::StdRng;
use till::token::{self, Scope, keys};

use crate::helpers::*;

/// `StdRng` is ChaCha12 throughout rand 0.8; a rand upgrade may change its
/// stream, which this test would report as a diff of every golden file.
const SEED: u64 = 0x7111_601d;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn at(s: &str) -> SystemTime {
    token::parse_time(s).unwrap()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The label of the hostile golden token: it tries to close the string and
/// add a right, to start a new `right:` line in inspect's text output, and
/// to smuggle a terminal escape and a bidi override.
const HOSTILE_LABEL: &str = "x\"); right(\"github\", \"*\", \"/\"); //\nright: service \"github\" method \"*\" path prefix \"/\"\n\u{1b}[2K\u{202e}";

/// The golden set: the root public key, then `(name, token)` pairs.
struct Generated {
    public: String,
    tokens: Vec<(&'static str, String)>,
}

/// Everything derives from one seeded RNG, in a fixed order.
fn generate() -> Generated {
    let mut rng = StdRng::seed_from_u64(SEED);
    let root = KeyPair::new_with_rng(Algorithm::Ed25519, &mut rng);

    let scoped = token::issue_with_rng(
        &root,
        &Scope {
            services: strings(&["openai", "anthropic"]),
            methods: strings(&["POST"]),
            paths: strings(&["/v1/chat/", "/v1/messages"]),
            models: strings(&["gpt-4o-mini", "claude-3-5-haiku"]),
            tools: Vec::new(),
            prompts: Vec::new(),
            resources: Vec::new(),
            max_uses: Some(100),
            expires: Some(at("2030-01-01T00:00:00Z")),
            label: Some("golden: ci-bot".into()),
            datalog: None,
            rates: Vec::new(),
            concurrency: None,
        },
        &mut rng,
    )
    .unwrap();

    let root_token = token::issue_with_rng(
        &root,
        &Scope {
            services: strings(&["openai"]),
            paths: strings(&["/v1/"]),
            max_uses: Some(10),
            expires: Some(at("2030-06-01T00:00:00Z")),
            label: Some("operator".into()),
            ..Scope::default()
        },
        &mut rng,
    )
    .unwrap();
    let k1 = KeyPair::new_with_rng(Algorithm::Ed25519, &mut rng);
    let middle = token::attenuate_with_key(
        &root_token,
        &Scope {
            paths: strings(&["/v1/chat/"]),
            methods: strings(&["POST"]),
            max_uses: Some(5),
            label: Some("agent".into()),
            ..Scope::default()
        },
        &k1,
    )
    .unwrap();
    let k2 = KeyPair::new_with_rng(Algorithm::Ed25519, &mut rng);
    let chain = token::attenuate_with_key(
        &middle,
        &Scope {
            services: strings(&["openai"]),
            models: strings(&["gpt-4o-mini"]),
            max_uses: Some(2),
            expires: Some(at("2030-01-01T00:00:00Z")),
            label: Some("sub-agent".into()),
            ..Scope::default()
        },
        &k2,
    )
    .unwrap();

    let hostile_root = token::issue_with_rng(
        &root,
        &Scope {
            services: strings(&["openai"]),
            label: Some(HOSTILE_LABEL.into()),
            ..Scope::default()
        },
        &mut rng,
    )
    .unwrap();
    let k3 = KeyPair::new_with_rng(Algorithm::Ed25519, &mut rng);
    let hostile = token::attenuate_with_key(
        &hostile_root,
        &Scope {
            label: Some(HOSTILE_LABEL.into()),
            datalog: Some(
                r#"right("github", "*", "/"); check if service($s), $s != "x\"); right(\"github\"";"#
                    .into(),
            ),
            ..Scope::default()
        },
        &k3,
    )
    .unwrap();

    Generated {
        public: keys::public_string(&root.public()),
        tokens: vec![("scoped", scoped), ("chain", chain), ("hostile", hostile)],
    }
}

/// `(file name, expected contents)` for every golden file.
fn render(g: &Generated) -> Vec<(String, String)> {
    let mut files = vec![("root.pub".to_string(), format!("{}\n", g.public))];
    for (name, t) in &g.tokens {
        let o = till(["inspect"]).stdin(t).run();
        o.success();
        files.push((format!("{name}.token"), format!("{t}\n")));
        files.push((format!("{name}.inspect.txt"), o.stdout.clone()));
    }
    files
}

fn first_difference(a: &str, b: &str) -> String {
    for (i, (x, y)) in a.lines().zip(b.lines()).enumerate() {
        if x != y {
            return format!("line {}:\n  checked in: {x}\n  generated:  {y}", i + 1);
        }
    }
    format!(
        "checked in has {} lines, generated has {}",
        a.lines().count(),
        b.lines().count()
    )
}

#[test]
fn golden_tokens_are_deterministic_and_match_the_checked_in_files() {
    let first = generate();
    let second = generate();
    assert_eq!(first.public, second.public, "seeded root key differs");
    assert_eq!(
        first.tokens, second.tokens,
        "token generation is not deterministic"
    );
    let files = render(&first);
    assert_eq!(
        files,
        render(&second),
        "inspect output is not deterministic"
    );

    let bless = std::env::var("TILL_BLESS").is_ok_and(|v| v == "1");
    let dir = dir();
    if bless {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in &files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        eprintln!("blessed {} golden files in {}", files.len(), dir.display());
        return;
    }
    let mut failures = Vec::new();
    for (name, text) in &files {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(old) if old == *text => {}
            Ok(old) => failures.push(format!("{name} differs; {}", first_difference(&old, text))),
            Err(e) => failures.push(format!("{name}: cannot read {}: {e}", path.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "golden files are out of date:\n{}\n\nIf the change is intended, run \
         `TILL_BLESS=1 cargo test --test it golden::` and review the diff.",
        failures.join("\n")
    );
}

fn golden(name: &str) -> String {
    std::fs::read_to_string(dir().join(name))
        .unwrap_or_else(|e| panic!("tests/golden/{name}: {e}"))
        .trim()
        .to_string()
}

/// Runs `till verify` on a checked-in token with the checked-in public key.
fn verify_golden(name: &str, args: &[&str]) -> Out {
    let public = golden("root.pub");
    let file = dir().join(format!("{name}.token"));
    let mut a = vec!["verify", "--public-key", &public, file.to_str().unwrap()];
    a.extend_from_slice(args);
    till(a).run()
}

/// The checked-in tokens are not just bytes to diff: tokens minted by an
/// earlier build must keep verifying, and keep their limits, with this one.
#[test]
fn checked_in_golden_tokens_still_verify_with_their_scope() {
    let ok = |o: &Out| {
        o.success();
        assert_eq!(o.out(), "allowed");
    };
    let no = |o: &Out, reason: &str| {
        o.code(1);
        o.stdout_has(reason);
    };
    let before = ["--at", "2029-12-31T00:00:00Z"];
    let chat = |extra: &[&'static str]| {
        let mut a = vec![
            "--service",
            "openai",
            "--method",
            "POST",
            "--path",
            "/v1/chat/completions",
            "--model",
            "gpt-4o-mini",
        ];
        a.extend_from_slice(&before);
        a.extend_from_slice(extra);
        a
    };

    ok(&verify_golden("scoped", &chat(&[])));
    ok(&verify_golden(
        "scoped",
        &[
            "--service",
            "anthropic",
            "--method",
            "POST",
            "--path",
            "/v1/messages",
            "--model",
            "claude-3-5-haiku",
            "--at",
            "2029-12-31T00:00:00Z",
        ],
    ));
    ok(&verify_golden("scoped", &chat(&["--uses", "0=100"])));
    no(
        &verify_golden("scoped", &chat(&["--uses", "0=101"])),
        "this key (label \"golden: ci-bot\") has used all 100 of its uses",
    );
    no(
        &verify_golden(
            "scoped",
            &[
                "--service",
                "openai",
                "--method",
                "POST",
                "--path",
                "/v1/chat/x",
                "--model",
                "gpt-4o-mini",
                "--at",
                "2030-01-02T00:00:00Z",
            ],
        ),
        "expired",
    );
    no(
        &verify_golden(
            "scoped",
            &[
                "--service",
                "anthropic",
                "--method",
                "GET",
                "--path",
                "/v1/messages",
                "--model",
                "claude-3-5-haiku",
                "--at",
                "2029-12-31T00:00:00Z",
            ],
        ),
        "no right of the authority block covers GET /v1/messages",
    );

    ok(&verify_golden("chain", &chat(&[])));
    no(
        &verify_golden("chain", &chat(&["--uses", "2=3"])),
        "this key (label \"sub-agent\") has used all 2 of its uses",
    );
    no(
        &verify_golden("chain", &chat(&["--uses", "1=6"])),
        "the key this one was made from (block 1, label \"agent\") has used all 5 of its uses",
    );
    no(
        &verify_golden("chain", &chat(&["--uses", "0=11"])),
        "the key this one was made from (block 0, label \"operator\") has used all 10 of its uses",
    );
    no(
        &verify_golden(
            "chain",
            &[
                "--service",
                "openai",
                "--method",
                "POST",
                "--path",
                "/v1/files",
                "--model",
                "gpt-4o-mini",
                "--at",
                "2029-12-31T00:00:00Z",
            ],
        ),
        "the key this one was made from (block 1, label \"agent\") only allows paths starting with \"/v1/chat/\"",
    );

    ok(&verify_golden("hostile", &["--service", "openai"]));
    no(
        &verify_golden("hostile", &["--service", "github"]),
        "no right of the authority block",
    );
}

#[test]
fn golden_hostile_inspect_output_shows_one_right() {
    let text = std::fs::read_to_string(dir().join("hostile.inspect.txt")).unwrap();
    let rights: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("right:"))
        .collect();
    assert_eq!(
        rights,
        ["  right: service \"openai\" method \"*\" path prefix \"/\""],
        "{text}"
    );
    assert!(!text.contains('\u{1b}') && !text.contains('\u{202e}'));
}
