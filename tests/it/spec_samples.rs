//! The Biscuit specification's sample tokens (shipped with biscuit-auth,
//! copied to `tests/spec-samples/`), run through Till's token pipeline.
//!
//! For every sample token: `RawToken::parse` (size, block count, key
//! algorithm) → `shape::check` (attenuation block shape) → `verify` (root
//! signature chain) → `inspect`, then for every validation of the sample an
//! authorizer built from the sample's own authorizer code (its facts, its
//! `time(...)`, its checks and policies) with Till's `run_limits()`. The
//! verdict, and for errors the exact error (failed checks, matched policy,
//! execution error, or the token error class), must be the specification's,
//! except where Till is deliberately stricter:
//!
//! | sample | spec verdict | Till verdict | why |
//! |---|---|---|---|
//! | test004_random_block | Err (signature) | Err (shape: undecodable block) | the shape check runs before signatures and cannot decode the random block |
//! | test007_scoped_rules | Err (failed check) | Err (shape) | block 1 holds a rule; rules are refused in attenuation blocks |
//! | test013_block_rules | file1 Ok, file2 Err | Err for both (shape) | block 1 holds rules (`valid_date(..) <- ..`) |
//! | test018_unbound_variables_in_rule | Err (InvalidBlockRule) | Err (shape) | block 1 holds a rule |
//! | test019_generating_ambient_from_variables | Err (failed check) | Err (shape) | block 1 holds a rule |
//! | test022_default_symbols | Ok | Err (shape) | the authority block states `resource`, `time`, `service` and `path` facts, names of request facts only Till supplies (red team, wave 2, third pass) |
//! | test026_public_keys_interning | Ok | Err (shape) | third-party block 1 holds a rule |
//! | test036_secp256r1 | Ok | Err (UnsupportedAlgorithm) | blocks are signed with P-256 keys: Till accepts Ed25519 only (P-256 signatures are malleable, which would give one token several revocation ids) |
//! | test037_secp256r1_third_party | Ok | Err (UnsupportedAlgorithm) | third-party block signed with a P-256 key |
//! | test035_ffi | Ok, with the host's `extern::test` function | Ok with the spec's function registered; Err under Till's own verifier, which registers no extern function | an authority block may call extern functions; Till provides none, so such a token is always denied |
//!
//! Run limits: Till's `run_limits()` has the spec defaults' fact (1,000) and
//! iteration (100) limits, and a 1 s time limit instead of 1 ms (a wall-clock
//! limit that tight fires on honest tokens on a loaded machine). No sample
//! reaches either limit, so no verdict differs because of them.
//!
//! Every sample and every validation is accounted for: the test fails if a
//! `.bc` file is not in `samples.json` (or the reverse), if the counts change,
//! or if a listed difference no longer occurs.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use biscuit_auth::builder::Term;
use biscuit_auth::datalog::ExternFunc;
use biscuit_auth::error::{FailedCheck, Format, Logic, MatchedPolicy, Signature, Token as BToken};
use biscuit_auth::{Algorithm, AuthorizerBuilder, AuthorizerLimits, Biscuit, PublicKey};
use serde_json::{Value, json};
use till::policy::{Policies, run_limits};
use till::token::inspect::inspect;
use till::token::{RawToken, TokenError, shape};
use till::verify::Verifier;

/// Number of sample tokens and of validations in `samples.json` (biscuit-auth 6.0.0).
const SAMPLES: usize = 38;
const VALIDATIONS: usize = 50;

/// Why Till refuses a sample the specification treats otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// `RawToken::parse`: a key that is not Ed25519.
    UnsupportedAlgorithm,
    /// `shape::check`: an attenuation block outside the accepted shape.
    Shape,
}

/// Deliberate differences (see the table above). The refusal happens before
/// authorization, so it applies to every validation of the sample.
const DIFFERENCES: &[(&str, Refusal, &str)] = &[
    (
        "test004_random_block.bc",
        Refusal::Shape,
        "spec: Err (signature); Till: the random block cannot be decoded, refused before signatures",
    ),
    (
        "test007_scoped_rules.bc",
        Refusal::Shape,
        "spec: Err (failed check); Till: block 1 holds a rule",
    ),
    (
        "test013_block_rules.bc",
        Refusal::Shape,
        "spec: file1 Ok / file2 Err; Till: block 1 holds rules, both refused",
    ),
    (
        "test018_unbound_variables_in_rule.bc",
        Refusal::Shape,
        "spec: Err (InvalidBlockRule); Till: block 1 holds a rule",
    ),
    (
        "test019_generating_ambient_from_variables.bc",
        Refusal::Shape,
        "spec: Err (failed check); Till: block 1 holds a rule",
    ),
    (
        "test022_default_symbols.bc",
        Refusal::Shape,
        "spec: Ok; Till: the authority block states resource/time/service/path facts, which only Till supplies",
    ),
    (
        "test026_public_keys_interning.bc",
        Refusal::Shape,
        "spec: Ok; Till: third-party block 1 holds a rule",
    ),
    (
        "test036_secp256r1.bc",
        Refusal::UnsupportedAlgorithm,
        "spec: Ok; Till: P-256 block keys are refused (malleable signatures)",
    ),
    (
        "test037_secp256r1_third_party.bc",
        Refusal::UnsupportedAlgorithm,
        "spec: Ok; Till: P-256 third-party signature is refused",
    ),
];

/// The sample that needs the host's extern function `test`.
const FFI_SAMPLE: &str = "test035_ffi.bc";

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/spec-samples")
}

fn samples() -> Value {
    let text = std::fs::read_to_string(dir().join("samples.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn root(s: &Value) -> PublicKey {
    PublicKey::from_bytes_hex(s["root_public_key"].as_str().unwrap(), Algorithm::Ed25519).unwrap()
}

fn testcases(s: &Value) -> &Vec<Value> {
    s["testcases"].as_array().unwrap()
}

/// The extern function the specification's test035 registers
/// (biscuit-auth `examples/testcases.rs`).
fn spec_extern_funcs() -> HashMap<String, ExternFunc> {
    HashMap::from([(
        "test".to_string(),
        ExternFunc::new(Arc::new(|left, right| match (left, right) {
            (t, None) => Ok(t),
            (Term::Str(l), Some(Term::Str(r))) if l == r => Ok(Term::Str("equal strings".into())),
            (Term::Str(_), Some(Term::Str(_))) => Ok(Term::Str("different strings".into())),
            _ => Err("unsupported operands".to_string()),
        })),
    )])
}

/// A biscuit error in the JSON form of `samples.json` (biscuit-auth's serde
/// representation), for the variants the samples use. Anything else maps to
/// `Unmapped`, which never equals an expected result.
fn err_json(e: &BToken) -> Value {
    fn checks(c: &[FailedCheck]) -> Value {
        c.iter()
            .map(|c| match c {
                FailedCheck::Block(b) => json!({"Block": {
                    "block_id": b.block_id, "check_id": b.check_id, "rule": b.rule}}),
                FailedCheck::Authorizer(a) => json!({"Authorizer": {
                    "check_id": a.check_id, "rule": a.rule}}),
            })
            .collect()
    }
    fn policy(p: &MatchedPolicy) -> Value {
        match p {
            MatchedPolicy::Allow(i) => json!({ "Allow": i }),
            MatchedPolicy::Deny(i) => json!({ "Deny": i }),
        }
    }
    match e {
        BToken::FailedLogic(Logic::Unauthorized {
            policy: p,
            checks: c,
        }) => {
            json!({"FailedLogic": {"Unauthorized": {"policy": policy(p), "checks": checks(c)}}})
        }
        BToken::FailedLogic(Logic::NoMatchingPolicy { checks: c }) => {
            json!({"FailedLogic": {"NoMatchingPolicy": {"checks": checks(c)}}})
        }
        BToken::FailedLogic(Logic::InvalidBlockRule(id, rule)) => {
            json!({"FailedLogic": {"InvalidBlockRule": [id, rule]}})
        }
        BToken::Format(Format::Signature(Signature::InvalidSignature(m))) => {
            json!({"Format": {"Signature": {"InvalidSignature": m}}})
        }
        BToken::Format(Format::BlockSignatureDeserializationError(m)) => {
            json!({"Format": {"BlockSignatureDeserializationError": m}})
        }
        BToken::Execution(x) => json!({ "Execution": format!("{x:?}") }),
        other => json!({ "Unmapped": format!("{other:?}") }),
    }
}

/// Builds the sample's authorizer and runs it.
fn authorize(token: &Biscuit, code: &str, limits: AuthorizerLimits, extern_funcs: bool) -> Value {
    let mut b = AuthorizerBuilder::new().set_limits(limits);
    if extern_funcs {
        b = b.set_extern_funcs(spec_extern_funcs());
    }
    let b = b
        .code(code)
        .unwrap_or_else(|e| panic!("sample authorizer code does not parse: {e}\n{code}"));
    match b.build(token).and_then(|mut a| a.authorize()) {
        Ok(policy) => json!({ "Ok": policy }),
        Err(e) => json!({ "Err": err_json(&e) }),
    }
}

/// Till's token stage, in the order the verifier runs it.
fn till_token_stage(text: &str, root: &PublicKey) -> Result<Biscuit, TokenError> {
    let raw = RawToken::parse(text)?;
    shape::check(&raw)?;
    let biscuit = raw.verify(root)?;
    inspect(&raw)?;
    Ok(biscuit)
}

/// The Till error class the specification's token-stage error maps to.
fn token_stage_matches(expected_err: &Value, got: &TokenError) -> bool {
    match (expected_err.get("Format"), got) {
        (Some(f), TokenError::WrongRootKey) => f.get("Signature").is_some(),
        (Some(f), TokenError::Malformed(_)) => f.get("Signature").is_none(),
        _ => false,
    }
}

fn encode(file: &str) -> String {
    let bytes = std::fs::read(dir().join(file)).unwrap();
    base64::encode_config(bytes, base64::URL_SAFE)
}

#[test]
fn every_spec_sample_file_is_listed_and_counted() {
    let s = samples();
    let listed: BTreeSet<String> = testcases(&s)
        .iter()
        .map(|t| t["filename"].as_str().unwrap().to_string())
        .collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".bc"))
        .collect();
    assert_eq!(listed, on_disk, "samples.json and the .bc files disagree");
    assert_eq!(listed.len(), SAMPLES);
    let validations: usize = testcases(&s)
        .iter()
        .map(|t| t["validations"].as_object().unwrap().len())
        .sum();
    assert_eq!(validations, VALIDATIONS);
    for (file, _, _) in DIFFERENCES {
        assert!(listed.contains(*file), "{file} is not a sample");
    }
}

#[test]
fn spec_samples_give_the_specifications_verdicts_through_tills_pipeline() {
    let s = samples();
    let root = root(&s);
    let verifier = Verifier::new(root, Policies::default_policy());
    let mut used = BTreeSet::new();
    let mut checked = 0;
    let mut same = 0;
    for tc in testcases(&s) {
        let file = tc["filename"].as_str().unwrap();
        let text = encode(file);
        let stage = till_token_stage(&text, &root);
        // The verifier the proxy and `till verify` use agrees with the steps.
        let via_verifier = verifier.verify_token(&text);
        assert_eq!(
            stage.is_ok(),
            via_verifier.is_ok(),
            "{file}: Verifier::verify_token disagrees with the pipeline steps: {:?} vs {:?}",
            stage.as_ref().err(),
            via_verifier.as_ref().err()
        );
        let diff = DIFFERENCES.iter().find(|d| d.0 == file);
        for (name, v) in tc["validations"].as_object().unwrap() {
            checked += 1;
            let expected = &v["result"];
            let what = format!("{file} validation {name:?}");
            match (diff, &stage) {
                (
                    Some((_, Refusal::UnsupportedAlgorithm, _)),
                    Err(TokenError::UnsupportedAlgorithm(_)),
                )
                | (Some((_, Refusal::Shape, _)), Err(TokenError::Shape(_))) => {
                    used.insert(file);
                }
                (Some((_, refusal, why)), other) => {
                    panic!("{what}: listed as refused ({refusal:?}: {why}) but Till gave {other:?}")
                }
                (None, Err(e)) => {
                    let exp = expected.get("Err").unwrap_or_else(|| {
                        panic!("{what}: spec says {expected}, Till refused the token: {e}")
                    });
                    assert!(
                        token_stage_matches(exp, e),
                        "{what}: spec error {exp}, Till token error {e:?}"
                    );
                    same += 1;
                }
                (None, Ok(biscuit)) => {
                    let code = v["authorizer_code"].as_str().unwrap();
                    let got = authorize(biscuit, code, run_limits(), file == FFI_SAMPLE);
                    assert_eq!(&got, expected, "{what}\nauthorizer code:\n{code}");
                    same += 1;
                }
            }
        }
        if file == FFI_SAMPLE {
            // Till's own verifier registers no extern function: a token that
            // calls one is denied.
            let got = authorize(
                stage.as_ref().unwrap(),
                "allow if true",
                run_limits(),
                false,
            );
            assert_eq!(
                got,
                json!({"Err": {"Execution": "UndefinedExtern(\"test\")"}}),
                "{file} without the host function"
            );
        }
    }
    assert_eq!(checked, VALIDATIONS, "every validation is checked");
    let listed: BTreeSet<&str> = DIFFERENCES.iter().map(|d| d.0).collect();
    assert_eq!(used, listed, "every listed difference still occurs");
    let differing: usize = testcases(&s)
        .iter()
        .filter(|t| listed.contains(t["filename"].as_str().unwrap()))
        .map(|t| t["validations"].as_object().unwrap().len())
        .sum();
    assert_eq!(same + differing, VALIDATIONS);
}

/// The harness itself is right: plain biscuit-auth (no Till step) reproduces
/// every verdict of `samples.json` exactly, so each difference listed above
/// is Till's doing and not the test's.
#[test]
fn plain_biscuit_reproduces_every_spec_verdict() {
    let s = samples();
    let root = root(&s);
    // The spec's default limits, except the 1 ms wall-clock limit, which
    // fires on a loaded CI machine.
    let limits = AuthorizerLimits {
        max_time: std::time::Duration::from_secs(1),
        ..AuthorizerLimits::default()
    };
    for tc in testcases(&s) {
        let file = tc["filename"].as_str().unwrap();
        let bytes = std::fs::read(dir().join(file)).unwrap();
        let token = Biscuit::from(&bytes, root);
        for (name, v) in tc["validations"].as_object().unwrap() {
            let got = match &token {
                Err(e) => json!({ "Err": err_json(e) }),
                Ok(t) => authorize(
                    t,
                    v["authorizer_code"].as_str().unwrap(),
                    limits.clone(),
                    file == FFI_SAMPLE,
                ),
            };
            assert_eq!(&got, &v["result"], "{file} validation {name:?}");
        }
    }
}
