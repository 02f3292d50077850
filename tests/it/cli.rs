//! The core CLI through the real binary: keys, issue, attenuate, inspect,
//! verify. Attenuation is checked adversarially: a child block may only ever
//! narrow what its parent allows.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::helpers::*;

// ---------------------------------------------------------------------------
// Small helpers for this file

/// Runs `till issue ARGS` in `h` and returns the token.
fn issue(h: &Home, args: &[&str]) -> String {
    let mut a = vec!["issue"];
    a.extend_from_slice(args);
    let o = till(a).home(h).run();
    o.success();
    o.out()
}

/// Runs `till attenuate --token PARENT ARGS` (no key, no home) and returns the child.
fn attenuate(parent: &str, args: &[&str]) -> String {
    let mut a = vec!["attenuate", "--token", parent];
    a.extend_from_slice(args);
    let o = till(a).run();
    o.success();
    o.out()
}

/// Runs `till verify` offline with `h`'s public key.
fn verify(h: &Home, token: &str, args: &[&str]) -> Out {
    let pk = h.public();
    let mut a = vec!["verify", "--public-key", &pk, "--token", token];
    a.extend_from_slice(args);
    till(a).run()
}

#[track_caller]
fn no_panic(o: &Out) {
    for s in [&o.stdout, &o.stderr] {
        for bad in ["panicked", "stack backtrace", "RUST_BACKTRACE"] {
            assert!(
                !s.contains(bad),
                "output contains {bad:?}:\nstdout:\n{}\nstderr:\n{}",
                o.stdout,
                o.stderr
            );
        }
    }
}

#[track_caller]
fn allowed(o: &Out) {
    o.code(0);
    no_panic(o);
    assert_eq!(o.out(), "allowed", "stderr: {}", o.stderr);
}

/// Asserts exit 1 with `denied: ...` on stdout mentioning every `parts`;
/// returns the reason.
#[track_caller]
fn denied(o: &Out, parts: &[&str]) -> String {
    o.code(1);
    no_panic(o);
    let out = o.out();
    assert_eq!(out.lines().count(), 1, "one line on stdout: {out}");
    let reason = out
        .strip_prefix("denied: ")
        .unwrap_or_else(|| panic!("stdout is not 'denied: <reason>': {out:?}"));
    for p in parts {
        assert!(reason.contains(p), "reason lacks {p:?}: {reason}");
    }
    reason.to_string()
}

/// Usage error: exit 2, one line on stderr, nothing on stdout, no panic.
#[track_caller]
fn usage_error(o: &Out, parts: &[&str]) -> String {
    o.code(2).one_line_error();
    no_panic(o);
    assert_eq!(o.stdout, "", "stdout must stay empty on error");
    let err = o.stderr.trim().to_string();
    assert!(err.starts_with("till: error: "), "{err}");
    for p in parts {
        assert!(err.contains(p), "error lacks {p:?}: {err}");
    }
    err
}

fn inspect_json(token: &str) -> serde_json::Value {
    let o = till(["inspect", "--json", "--token", token]).run();
    o.success();
    serde_json::from_str(&o.stdout).expect("inspect --json prints JSON")
}

fn revocation_ids(token: &str) -> Vec<String> {
    inspect_json(token)["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["revocation_id"].as_str().unwrap().to_string())
        .collect()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn is_public_key(s: &str) -> bool {
    s.strip_prefix("ed25519/")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

// ---------------------------------------------------------------------------
// 1. Keys

#[test]
fn keygen_writes_a_0600_key_and_pubkey_prints_the_same_public_key() {
    let h = Home::empty();
    let o = till(["keygen"]).home(&h).run();
    o.success();
    let public = o.out();
    assert!(is_public_key(&public), "{public:?}");
    let key = h.path().join("root.key");
    assert_eq!(mode(&key), 0o600);
    assert!(
        !o.stdout.contains("private"),
        "keygen must not print the private key"
    );
    let o = till(["pubkey"]).home(&h).run();
    o.success();
    assert_eq!(o.out(), public);
}

#[test]
fn keygen_refuses_to_overwrite_a_key_without_force() {
    let h = Home::empty();
    till(["keygen"]).home(&h).run().success();
    let key = h.path().join("root.key");
    let before = fs::read(&key).unwrap();
    let public = till(["pubkey"]).home(&h).run().out();
    let old_token = issue(&h, &["--service", "openai"]);

    let o = till(["keygen"]).home(&h).run();
    usage_error(&o, &["already exists", "--force"]);
    assert_eq!(fs::read(&key).unwrap(), before, "key changed");
    assert_eq!(till(["pubkey"]).home(&h).run().out(), public);

    let o = till(["keygen", "--force"]).home(&h).run();
    o.success();
    let new_public = o.out();
    assert!(is_public_key(&new_public));
    assert_ne!(new_public, public);
    assert_ne!(fs::read(&key).unwrap(), before);
    assert_eq!(mode(&key), 0o600);
    assert_eq!(till(["pubkey"]).home(&h).run().out(), new_public);
    // Tokens of the replaced key no longer verify.
    let o = till(["verify", "--token", &old_token, "--service", "openai"])
        .home(&h)
        .run();
    denied(&o, &["does not verify with this root public key"]);
}

/// Regression: a temporary file left by a crashed keygen kept its own mode
/// (0644 here) and the new root key was written through it, world-readable.
#[test]
fn keygen_does_not_reuse_a_stale_world_readable_temp_file() {
    let h = Home::empty();
    let tmp = h.path().join("root.key.tmp");
    fs::write(&tmp, "stale").unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
    till(["keygen"]).home(&h).run().success();
    assert_eq!(mode(&h.path().join("root.key")), 0o600);
    assert!(!tmp.exists());
}

/// Regression: a symlink planted at the temporary path made keygen write the
/// root key wherever it pointed.
#[test]
fn keygen_does_not_write_the_key_through_a_planted_symlink() {
    let h = Home::empty();
    let elsewhere = tempfile::tempdir().unwrap();
    let target = elsewhere.path().join("stolen");
    fs::write(&target, "").unwrap();
    std::os::unix::fs::symlink(&target, h.path().join("root.key.tmp")).unwrap();
    till(["keygen"]).home(&h).run().success();
    assert_eq!(fs::read_to_string(&target).unwrap(), "", "key leaked");
    let key = h.path().join("root.key");
    assert!(fs::symlink_metadata(&key).unwrap().file_type().is_file());
    assert_eq!(mode(&key), 0o600);
}

// ---------------------------------------------------------------------------
// 2. Issue

#[test]
fn issue_without_service_is_refused_and_names_any_service() {
    let h = Home::new();
    let o = till(["issue", "--max-uses", "5"]).home(&h).run();
    usage_error(&o, &["--service", "--any-service"]);
}

#[test]
fn issue_any_service_covers_every_service() {
    let h = Home::new();
    let t = issue(&h, &["--any-service", "--max-uses", "5"]);
    let v = inspect_json(&t);
    assert_eq!(
        v["blocks"][0]["rights"],
        serde_json::json!([["*", "*", "/"]])
    );
    allowed(&verify(&h, &t, &["--service", "github"]));
    allowed(&verify(
        &h,
        &t,
        &["--service", "openai", "--method", "POST"],
    ));
    // --any-service and --service together are contradictory.
    let o = till(["issue", "--any-service", "--service", "openai"])
        .home(&h)
        .run();
    o.code(2);
    no_panic(&o);
}

#[test]
fn issue_rejects_bad_scope_flags_with_exit_2() {
    let h = Home::new();
    let o = till(["issue", "--service", "openai", "--ttl", "5x"])
        .home(&h)
        .run();
    usage_error(&o, &["\"5x\"", "duration"]);

    let o = till([
        "issue",
        "--service",
        "openai",
        "--ttl",
        "1h",
        "--expires",
        "2030-01-01T00:00:00Z",
    ])
    .home(&h)
    .run();
    o.code(2).stderr_has("cannot be used with");
    no_panic(&o);
    assert_eq!(o.stdout, "");

    for (args, expect) in [
        (
            &["--expires", "next tuesday"][..],
            &["RFC 3339", "2026-12-01T00:00:00Z"][..],
        ),
        (&["--max-uses", "0"], &["--max-uses 0"]),
        (&["--max-uses", "-1"], &[]),
        (&["--path", "v1/chat"], &["must start with '/'"]),
        (&["--path", "/v1/%2f"], &["encoded"]),
        (&["--method", "PO ST"], &["not an HTTP method"]),
        (&["--datalog", "allow if true"], &["Datalog"]),
    ] {
        let mut a = vec!["issue", "--service", "openai"];
        a.extend_from_slice(args);
        let o = till(a).home(&h).run();
        o.code(2);
        no_panic(&o);
        assert_eq!(o.stdout, "", "{args:?}");
        for e in expect {
            o.stderr_has(e);
        }
    }
    for bad in ["OpenAI", "open ai", "till:admin", ""] {
        let o = till(["issue", "--service", bad]).home(&h).run();
        o.code(2);
        no_panic(&o);
    }
}

#[test]
fn issue_without_a_readable_key_says_to_run_keygen() {
    let h = Home::empty();
    let o = till(["issue", "--service", "openai"])
        .home(&h)
        .env("RUST_BACKTRACE", "1")
        .run();
    usage_error(&o, &["keygen"]);
    let o = till(["pubkey"]).home(&h).env("RUST_BACKTRACE", "1").run();
    usage_error(&o, &["keygen"]);
    // A key file that is not a key at all.
    h.write("root.key", "hello\n");
    let o = till(["issue", "--service", "openai"]).home(&h).run();
    usage_error(&o, &["root.key", "Ed25519"]);
    h.write("root.key", "ed25519-private/zz\n");
    let o = till(["issue", "--service", "openai"]).home(&h).run();
    usage_error(&o, &["corrupt"]);
}

// ---------------------------------------------------------------------------
// 3. Attenuation only narrows

#[test]
fn child_cannot_add_a_service_and_its_own_check_narrows_the_parent() {
    let h = Home::new();
    let parent = issue(&h, &["--service", "openai"]);
    allowed(&verify(&h, &parent, &["--service", "openai"]));
    let child = attenuate(&parent, &["--service", "github"]);
    // github: the authority block holds no right for it.
    denied(
        &verify(&h, &child, &["--service", "github"]),
        &["no right of the authority block", "github"],
    );
    // openai: the parent allows it, but the child's check now refuses it.
    denied(
        &verify(&h, &child, &["--service", "openai"]),
        &["this key only allows service \"github\""],
    );
}

#[test]
fn child_path_narrows_and_path_tricks_are_normalised_before_checking() {
    let h = Home::new();
    let parent = issue(&h, &["--service", "openai", "--path", "/v1/chat/"]);
    let child = attenuate(&parent, &["--path", "/v1/chat/completions"]);
    let req = |p: &str| verify(&h, &child, &["--service", "openai", "--path", p]);
    allowed(&req("/v1/chat/completions"));
    denied(
        &req("/v1/files"),
        &["this key only allows paths starting with \"/v1/chat/completions\""],
    );
    // Inside the parent's prefix, outside the child's.
    denied(
        &req("/v1/chat/other"),
        &["this key only allows paths starting with \"/v1/chat/completions\""],
    );
    // Dot segments, encoded dots and doubled slashes resolve to /v1/files.
    for trick in [
        "/v1/chat/../files",
        "/v1/chat/completions/../../files",
        "/v1/chat/completions/%2e%2e/%2E%2E/files",
        "/v1/chat/completions/.%2e/./../files",
        "//v1/chat/completions/../..//files",
    ] {
        let r = denied(
            &req(trick),
            &["/v1/files", "this key only allows paths starting with"],
        );
        assert!(!r.contains(".."), "{trick}: reason shows the raw path: {r}");
    }
    // A path that resolves *into* the scope is fine.
    allowed(&req("/v1/files/../chat/completions"));
    // What cannot be normalised unambiguously is refused outright.
    for bad in [
        "/v1/chat/completions%2f..%2f..%2ffiles",
        "/v1/chat/completions%5c..%5cfiles",
        "/v1/chat/completions\\..\\files",
        "/../v1/chat/completions",
        "v1/chat/completions",
    ] {
        let o = req(bad);
        usage_error(&o, &["--path"]);
    }
}

#[test]
fn child_max_uses_cannot_raise_the_parent_limit() {
    let h = Home::new();
    let parent = issue(&h, &["--service", "openai", "--max-uses", "10"]);
    let child = attenuate(&parent, &["--max-uses", "1000"]);
    let r = denied(
        &verify(
            &h,
            &child,
            &["--service", "openai", "--uses", "0=11", "--uses", "1=11"],
        ),
        &["the key this one was made from (block 0) has used all 10 of its uses"],
    );
    assert!(!r.contains("this key has"), "{r}");
    allowed(&verify(
        &h,
        &child,
        &["--service", "openai", "--uses", "0=10", "--uses", "1=10"],
    ));
}

#[test]
fn forged_facts_in_a_child_block_grant_nothing() {
    let h = Home::new();
    let parent = issue(&h, &["--service", "openai", "--max-uses", "10"]);
    let child = attenuate(
        &parent,
        &[
            "--datalog",
            r#"use_limit(0, 1000); use_limit(1, 1); right("github", "*", "/");"#,
        ],
    );
    // A forged `use_limit` fact is informational only: the limits shown
    // (and counted in the usage view) come from the `uses` checks.
    assert_eq!(
        inspect_json(&child)["blocks"][1]["use_limit"],
        serde_json::Value::Null
    );
    denied(
        &verify(&h, &child, &["--service", "openai", "--uses", "0=11"]),
        &["the key this one was made from (block 0) has used all 10 of its uses"],
    );
    denied(
        &verify(&h, &child, &["--service", "github"]),
        &["no right of the authority block", "github"],
    );
    allowed(&verify(
        &h,
        &child,
        &["--service", "openai", "--uses", "0=10"],
    ));
    // Inspect does not present the forged fact as a right of the token.
    let o = till(["inspect", "--token", &child]).run();
    o.success();
    let rights: Vec<&str> = o
        .stdout
        .lines()
        .filter(|l| l.trim().starts_with("right:"))
        .collect();
    assert_eq!(
        rights,
        ["  right: service \"openai\" method \"*\" path prefix \"/\""],
        "{}",
        o.stdout
    );
    o.stdout_has("WARNING: block 1 declares right(\"github\", \"*\", \"/\"), which grants nothing");
    assert_eq!(
        inspect_json(&child)["blocks"][1]["rights"],
        serde_json::json!([])
    );

    // Request facts may not be stated at all (red team, wave 2, third
    // pass): see `a_block_stating_a_request_fact_is_refused_by_issue_attenuate_and_verify`.
    for fact in [
        "uses(0, 0);",
        r#"service("github"); method("GET"); path("/"); time(2000-01-01T00:00:00Z);"#,
    ] {
        usage_error(
            &till(["attenuate", "--token", &parent, "--datalog", fact]).run(),
            &["block 1", "a request fact that only Till supplies"],
        );
    }
    // Rules in attenuation blocks are refused outright (block shape limits).
    let o = till([
        "attenuate",
        "--token",
        &parent,
        "--datalog",
        r#"right("github", "*", "/") <- service($s);"#,
    ])
    .run();
    usage_error(&o, &["block 1", "rules are not allowed"]);
    // A looser check on the parent's counter does not loosen it.
    let child = attenuate(&parent, &["--datalog", "check if uses(0, $u), $u <= 1000;"]);
    denied(
        &verify(&h, &child, &["--service", "openai", "--uses", "0=11"]),
        &["the key this one was made from (block 0) has used all 10 of its uses"],
    );
    // A block may not carry policies.
    let o = till([
        "attenuate",
        "--token",
        &parent,
        "--datalog",
        "allow if true",
    ])
    .run();
    usage_error(&o, &["Datalog"]);
}

#[test]
fn child_limit_is_enforced_on_its_own_counter() {
    let h = Home::new();
    let parent = issue(&h, &["--service", "openai", "--max-uses", "10"]);
    let child = attenuate(&parent, &["--max-uses", "3"]);
    let o = verify(&h, &child, &["--service", "openai", "--uses", "1=4"]);
    let r = denied(
        &o,
        &["this key has used all 3 of its uses; ask whoever gave it to you for a new one"],
    );
    assert!(!r.contains("block 0"), "{r}");
    allowed(&verify(
        &h,
        &child,
        &["--service", "openai", "--uses", "0=10", "--uses", "1=3"],
    ));
}

#[test]
fn model_allow_list_requires_a_listed_model() {
    let h = Home::new();
    let t = issue(&h, &["--service", "openai", "--model", "gpt-4o-mini"]);
    denied(
        &verify(&h, &t, &["--service", "openai"]),
        &["this key only allows model \"gpt-4o-mini\""],
    );
    denied(
        &verify(&h, &t, &["--service", "openai", "--model", "gpt-4o"]),
        &["\"gpt-4o-mini\""],
    );
    allowed(&verify(
        &h,
        &t,
        &["--service", "openai", "--model", "gpt-4o-mini"],
    ));
    // A child cannot add a model the parent does not allow.
    let child = attenuate(&t, &["--model", "gpt-4o", "--model", "gpt-4o-mini"]);
    denied(
        &verify(&h, &child, &["--service", "openai", "--model", "gpt-4o"]),
        &["the key this one was made from (block 0) only allows model"],
    );
    allowed(&verify(
        &h,
        &child,
        &["--service", "openai", "--model", "gpt-4o-mini"],
    ));
}

#[test]
fn expiry_is_enforced_and_a_child_cannot_extend_it() {
    let h = Home::new();
    let t = issue(
        &h,
        &["--service", "openai", "--expires", "2026-01-01T00:00:00Z"],
    );
    let at = |tok: &str, when: &str| verify(&h, tok, &["--service", "openai", "--at", when]);
    allowed(&at(&t, "2025-12-31T00:00:00Z"));
    allowed(&at(&t, "2026-01-01T00:00:00Z"));
    denied(
        &at(&t, "2026-01-02T00:00:00Z"),
        &["expired", "2026-01-01T00:00:00Z"],
    );
    let child = attenuate(&t, &["--expires", "2030-01-01T00:00:00Z"]);
    allowed(&at(&child, "2025-12-31T00:00:00Z"));
    let r = denied(
        &at(&child, "2026-01-02T00:00:00Z"),
        &["the key this one was made from (block 0) expired at 2026-01-01T00:00:00Z"],
    );
    assert!(!r.contains("block 1"), "{r}");
    // A child's own, earlier expiry applies.
    let child = attenuate(&t, &["--expires", "2025-06-01T00:00:00Z"]);
    denied(
        &at(&child, "2025-07-01T00:00:00Z"),
        &["this key expired at 2025-06-01T00:00:00Z; ask whoever gave it to you for a new one"],
    );
    // Without --at the clock decides: a fresh 1h token is valid now.
    let far = issue(&h, &["--service", "openai", "--ttl", "1h"]);
    allowed(&verify(&h, &far, &["--service", "openai"]));
}

/// Regression: inspect (and verify's denial reasons) showed any check on
/// `service`, `method`, `model` or `path` as an allow-list of the strings it
/// mentions, so `$s != "openai"` read as "services: openai".
#[test]
fn negated_scope_checks_are_not_presented_as_allow_lists() {
    let h = Home::new();
    let parent = issue(&h, &["--service", "openai", "--service", "github"]);
    let child = attenuate(
        &parent,
        &[
            "--datalog",
            r#"check if service($s), $s != "openai";
               check if path($p), !$p.starts_with("/v1/chat/");
               check if model($m), "gpt-4o-mini-x".contains($m);
               check if method($m), $m == "POST";"#,
        ],
    );
    let o = till(["inspect", "--token", &child]).run();
    o.success();
    let text = &o.stdout;
    for lie in ["services:", "path prefixes:", "models:"] {
        assert!(!text.contains(lie), "inspect shows {lie:?}:\n{text}");
    }
    o.stdout_has(r#"custom check: check if service($s), $s != "openai""#);
    o.stdout_has(r#"custom check: check if path($p), !$p.starts_with("/v1/chat/")"#);
    o.stdout_has(r#"custom check: check if model($m), "gpt-4o-mini-x".contains($m)"#);
    // An equality is an honest one-element allow-list.
    o.stdout_has("methods: \"POST\"");
    let r = denied(
        &verify(&h, &child, &["--service", "openai", "--method", "POST"]),
        &[r#"a check of this key failed: check if service($s), $s != "openai""#],
    );
    assert!(!r.contains("only allows service"), "{r}");
}

// ---------------------------------------------------------------------------
// 4. Revocation file

#[test]
fn revoking_a_parent_revokes_its_children_but_not_the_reverse() {
    let h = Home::new();
    let parent = issue(&h, &["--service", "openai", "--max-uses", "10"]);
    let child = attenuate(&parent, &["--max-uses", "3"]);
    let ids = revocation_ids(&child);
    assert_eq!(ids.len(), 2);
    assert_eq!(revocation_ids(&parent), ids[..1].to_vec());

    let f = h.write(
        "revoked-parent",
        &format!("# revoked by ops\n\n{}\n", ids[0]),
    );
    let f = f.to_str().unwrap();
    denied(
        &verify(&h, &child, &["--service", "openai", "--revoked-ids", f]),
        &["the key this one was made from (block 0) was revoked"],
    );
    denied(
        &verify(&h, &parent, &["--service", "openai", "--revoked-ids", f]),
        &["revoked"],
    );

    let f = h.write("revoked-child", &format!("{}\n", ids[1].to_uppercase()));
    let f = f.to_str().unwrap();
    denied(
        &verify(&h, &child, &["--service", "openai", "--revoked-ids", f]),
        &["this key was revoked; ask whoever gave it to you for a new one"],
    );
    allowed(&verify(
        &h,
        &parent,
        &["--service", "openai", "--revoked-ids", f],
    ));
    // A sibling of the revoked child is untouched.
    let sibling = attenuate(&parent, &["--max-uses", "3"]);
    allowed(&verify(
        &h,
        &sibling,
        &["--service", "openai", "--revoked-ids", f],
    ));

    // An unreadable or malformed list is an error, not "nothing revoked".
    let bad = h.write("bad-list", "not-hex!\n");
    usage_error(
        &verify(
            &h,
            &child,
            &[
                "--service",
                "openai",
                "--revoked-ids",
                bad.to_str().unwrap(),
            ],
        ),
        &["bad-list:1", "not a hex revocation id"],
    );
    let missing = h.path().join("missing");
    usage_error(
        &verify(
            &h,
            &child,
            &[
                "--service",
                "openai",
                "--revoked-ids",
                missing.to_str().unwrap(),
            ],
        ),
        &["cannot read revocation list"],
    );
}

/// A signed feed saved from the proxy: `ids` signed by `h`'s root key,
/// issued `age` seconds ago.
fn signed_feed(h: &Home, name: &str, ids: &[String], age: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let feed = till::feed::Feed::sign(&h.key(), ids.to_vec(), now - age).unwrap();
    let p = h.write(name, &serde_json::to_string(&feed).unwrap());
    p.to_str().unwrap().to_string()
}

#[test]
fn regression_an_empty_file_or_plain_list_is_not_accepted_as_a_fresh_signed_feed() {
    let h = Home::new();
    let parent = issue(&h, &["--service", "openai"]);
    let child = attenuate(&parent, &["--max-uses", "3"]);
    let ids = revocation_ids(&child);
    let revoked_child = |feed: &str, extra: &[&str]| {
        let mut a = vec!["--service", "openai", "--revocations", feed];
        a.extend_from_slice(extra);
        verify(&h, &child, &a)
    };

    // The downgrade: a feed replaced by an empty file or a plain list (which
    // can leave out any id) used to be read as "nothing else revoked".
    let empty = h.write("empty.json", "");
    let plain = h.write("plain.txt", &format!("{}\n", ids[0]));
    for (f, what) in [
        (&empty, "is empty"),
        (&plain, "is not a signed revocation feed"),
    ] {
        let f = f.to_str().unwrap();
        for extra in [&["--max-feed-age", "1s"][..], &[]] {
            usage_error(&revoked_child(f, extra), &[what, "--revoked-ids"]);
        }
    }

    // A fresh signed feed is accepted, and its ids deny.
    let fresh = signed_feed(&h, "fresh.json", &ids[1..], 0);
    denied(
        &revoked_child(&fresh, &["--max-feed-age", "1m"]),
        &["this key was revoked; ask whoever gave it to you for a new one"],
    );
    let none = signed_feed(&h, "none.json", &[], 0);
    allowed(&revoked_child(&none, &["--max-feed-age", "1m"]));
    allowed(&revoked_child(&none, &[]));

    // A stale one is refused, under the given age and under the 1h default.
    let stale = signed_feed(&h, "stale.json", &[], 7200);
    usage_error(
        &revoked_child(&stale, &["--max-feed-age", "1h"]),
        &["stale"],
    );
    usage_error(&revoked_child(&stale, &[]), &["stale"]);
    allowed(&revoked_child(&stale, &["--max-feed-age", "3h"]));

    // A feed signed by another root key is refused.
    let other = Home::new();
    let forged = signed_feed(&other, "forged.json", &[], 0);
    usage_error(&revoked_child(&forged, &[]), &["signature does not verify"]);

    // A plain list goes through its own flag, and only there.
    let p = plain.to_str().unwrap();
    denied(
        &verify(&h, &child, &["--service", "openai", "--revoked-ids", p]),
        &["the key this one was made from (block 0) was revoked"],
    );
    usage_error(
        &verify(
            &h,
            &child,
            &["--service", "openai", "--revoked-ids", &fresh],
        ),
        &["signed revocation feed", "--revocations"],
    );
    // A maximum age without a feed to apply it to is a mistake, not a pass.
    usage_error(
        &verify(
            &h,
            &child,
            &[
                "--service",
                "openai",
                "--revoked-ids",
                p,
                "--max-feed-age",
                "1s",
            ],
        ),
        &["--max-feed-age needs a signed feed"],
    );
    // Both together: the union.
    let none = signed_feed(&h, "none2.json", &[], 0);
    denied(
        &verify(
            &h,
            &child,
            &[
                "--service",
                "openai",
                "--revocations",
                &none,
                "--revoked-ids",
                p,
            ],
        ),
        &["revoked"],
    );
}

// ---------------------------------------------------------------------------
// 5. Bad input

#[test]
fn bad_tokens_and_flags_are_clear_one_line_errors() {
    let h = Home::new();
    let parent = issue(&h, &["--service", "openai", "--max-uses", "10"]);
    let child = attenuate(&parent, &["--max-uses", "3"]);
    let run = |token: &str, extra: &[&str]| {
        let pk = h.public();
        let mut a = vec!["verify", "--public-key", &pk, "--service", "openai"];
        a.extend_from_slice(extra);
        till(a)
            .env("TILL_TOKEN", token)
            .env("RUST_BACKTRACE", "1")
            .run()
    };
    usage_error(&run("not base64!!", &[]), &["base64"]);
    usage_error(&run("AAAA", &[]), &["malformed"]);
    // Cut in half, and at every length around the half: always a clear
    // error that mentions truncation, never a panic.
    let half = child.len() / 2;
    for n in half - 3..=half + 3 {
        let o = run(&child[..n], &[]);
        usage_error(&o, &["truncated"]);
    }
    usage_error(&run(&child[..child.len() - 4], &[]), &["truncated"]);
    usage_error(&run(&child, &["--uses", "9=1"]), &["9=1", "only 2 blocks"]);
    usage_error(&run(&child, &["--uses", "1"]), &["K=N"]);
    usage_error(&run(&child, &["--uses", "1=many"]), &["whole number"]);
    usage_error(&run(&child, &["--at", "yesterday"]), &["RFC 3339"]);
    for pk in [
        "garbage",
        "ed25519/abcd",
        "ed25519/zz",
        "secp256r1/0000",
        "",
    ] {
        let o = till([
            "verify",
            "--public-key",
            pk,
            "--service",
            "openai",
            "--token",
            &child,
        ])
        .run();
        usage_error(&o, &["public key"]);
    }
    let huge = "A".repeat(till::token::MAX_TOKEN_LEN + 1);
    usage_error(&run(&huge, &[]), &["limit"]);

    // Issued under another root key: a denial, not a usage error.
    let other = Home::new();
    let foreign = other.token("openai", None);
    let r = denied(&run(&foreign, &[]), &["signature does not verify"]);
    assert!(r.contains("root"), "{r}");
    // A flipped byte in the signature is caught the same way.
    let mut tampered = child.clone().into_bytes();
    let i = tampered.len() - 10;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let o = run(std::str::from_utf8(&tampered).unwrap(), &[]);
    o.code(1);
    no_panic(&o);
    o.stdout_has("denied: ");
}

/// The proxy refuses a lower-case method as malformed (400), so `verify`
/// must not answer for the upper-case method it used to make of it.
#[test]
fn verify_refuses_a_lower_case_method_as_the_proxy_does() {
    let h = Home::new();
    let t = issue(&h, &["--service", "openai"]);
    for m in ["delete", "Delete"] {
        usage_error(
            &verify(&h, &t, &["--service", "openai", "--method", m]),
            &["methods are upper case; send DELETE"],
        );
    }
    allowed(&verify(
        &h,
        &t,
        &["--service", "openai", "--method", "DELETE"],
    ));
}

/// Regression (red team, wave 2, fourth pass): the files `till verify` reads
/// were read whole without a bound (a symlink to `/dev/zero` until memory ran
/// out, a FIFO forever), and a token given where the file name goes was
/// printed whole in the error (into terminals' scrollback and CI logs).
#[test]
fn regression_verify_reads_only_small_regular_files_and_never_echoes_a_token() {
    let h = Home::new();
    let t = issue(&h, &["--service", "openai"]);
    let dir = tempfile::tempdir().unwrap();
    // Sparse: 40 MiB long, nothing written.
    let big = dir.path().join("big.json");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    let big = big.to_str().unwrap();
    for flag in ["--revocations", "--keys", "--revoked-ids"] {
        usage_error(
            &verify(&h, &t, &["--service", "openai", flag, big]),
            &["larger than"],
        );
        usage_error(
            &verify(&h, &t, &["--service", "openai", flag, "/dev/zero"]),
            &["not a regular file"],
        );
    }
    let pk = h.public();
    let o = till([
        "verify",
        "--public-key",
        &pk,
        "--service",
        "openai",
        "/dev/zero",
    ])
    .run();
    usage_error(&o, &["not a regular file"]);
    let given_as_file = [
        vec!["verify", "--public-key", &pk, "--service", "openai", &t],
        vec!["inspect", &t],
    ];
    for args in given_as_file {
        let err = usage_error(&till(args).run(), &["looks like a token", "--token"]);
        assert!(!err.contains(&t[..32]), "the token is shown: {err}");
    }
}

// ---------------------------------------------------------------------------
// 6. Inspect

#[test]
fn inspect_shows_ids_labels_rights_and_limits_per_block() {
    let h = Home::new();
    let parent = issue(
        &h,
        &[
            "--service",
            "openai",
            "--method",
            "post",
            "--path",
            "/v1/",
            "--max-uses",
            "10",
            "--expires",
            "2030-01-01T00:00:00Z",
            "--label",
            "ops",
        ],
    );
    let child = attenuate(
        &parent,
        &[
            "--max-uses",
            "3",
            "--label",
            "sub-agent",
            "--path",
            "/v1/chat/",
        ],
    );
    let ids = revocation_ids(&child);
    let o = till(["inspect", "--token", &child]).run();
    o.success();
    let text = &o.stdout;
    for s in [
        "(2 blocks)",
        "block 0 (authority)",
        "block 1 (attenuation)",
        &format!("revocation id: {}", ids[0]),
        &format!("revocation id: {}", ids[1]),
        "label: \"ops\"",
        "label: \"sub-agent\"",
        "right: service \"openai\" method \"POST\" path prefix \"/v1/\"",
        "use limit: 10",
        "use limit: 3",
        "expires: 2030-01-01T00:00:00Z",
        "path prefixes: \"/v1/chat/\"",
    ] {
        assert!(text.contains(s), "inspect lacks {s:?}:\n{text}");
    }
    // Block 1's lines come after block 0's.
    assert!(text.find("label: \"ops\"") < text.find("block 1 (attenuation)"));
    assert!(text.find("block 1 (attenuation)") < text.find("use limit: 3"));

    let v = inspect_json(&child);
    let blocks = v["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 2);
    assert_eq!(v["family"], blocks[0]["revocation_id"]);
    for (b, limit) in blocks.iter().zip([10, 3]) {
        let id = b["revocation_id"].as_str().unwrap();
        assert_eq!(id.len(), 128, "{id}");
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(b["use_limit"], limit);
    }
    assert_eq!(blocks[0]["labels"], serde_json::json!(["ops"]));
    assert_eq!(blocks[0]["expires"], "2030-01-01T00:00:00Z");
    assert_eq!(blocks[1]["labels"], serde_json::json!(["sub-agent"]));
}

#[test]
fn inspect_escapes_a_hostile_label_so_it_cannot_show_an_extra_right() {
    let h = Home::new();
    let label = r#"x"); right("github", "*", "/"); //"#;
    let t = issue(&h, &["--service", "openai", "--label", label]);
    let o = till(["inspect", "--token", &t]).run();
    o.success();
    let text = &o.stdout;
    let rights: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("right:") || l.starts_with("right("))
        .collect();
    assert_eq!(
        rights,
        [
            "right: service \"openai\" method \"*\" path prefix \"/\"",
            "right(\"openai\", \"*\", \"/\");"
        ],
        "{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.trim().starts_with("right:"))
            .count(),
        1
    );
    assert!(!text.contains(r#"right("github""#), "{text}");
    assert!(
        text.contains(r#"label("x\"); right(\"github\", \"*\", \"/\"); //");"#),
        "{text}"
    );
    // Newlines and terminal controls in a label cannot start a new line.
    let nasty = "a\nright: service \"github\" method \"*\" path prefix \"/\"\n\u{1b}[2K\u{202e}";
    let child = attenuate(&t, &["--label", nasty]);
    let o = till(["inspect", "--token", &child]).run();
    o.success();
    assert_eq!(
        o.stdout
            .lines()
            .filter(|l| l.trim().starts_with("right:"))
            .count(),
        1,
        "{}",
        o.stdout
    );
    assert!(!o.stdout.contains('\u{1b}'), "raw escape character printed");
    assert!(!o.stdout.contains('\u{202e}'), "raw bidi override printed");
    let v = inspect_json(&child);
    assert_eq!(v["blocks"][0]["labels"][0], label);
    assert_eq!(v["blocks"][1]["labels"][0], nasty);
    assert_eq!(v["blocks"][0]["rights"].as_array().unwrap().len(), 1);
    // And the token still grants only what it says.
    denied(
        &verify(&h, &t, &["--service", "github"]),
        &["no right of the authority block"],
    );
}

// ---------------------------------------------------------------------------
// 7. Token input

#[test]
fn token_is_read_from_flag_env_file_or_stdin() {
    let h = Home::new();
    let t = h.token("openai", Some(5));
    let file = h.write("t.token", &format!("{t}\n"));
    let file = file.to_str().unwrap();
    let reference = till(["inspect", "--token", &t]).run();
    reference.success();
    assert!(reference.stdout.contains("use limit: 5"));
    let runs = [
        till(["inspect"]).env("TILL_TOKEN", &t).run(),
        till(["inspect", file]).run(),
        till(["inspect"]).stdin(&format!("  {t}\n\n")).run(),
        till(["inspect", "-"]).stdin(&t).run(),
    ];
    for o in &runs {
        o.success();
        assert_eq!(o.stdout, reference.stdout);
    }
    // Verify and attenuate read the same way.
    let pk = h.public();
    allowed(&till(["verify", "--public-key", &pk, "--service", "openai", file]).run());
    let o = till(["attenuate", "--max-uses", "1"]).stdin(&t).run();
    o.success();
    assert_eq!(revocation_ids(&o.out()).len(), 2);

    // Two sources are ambiguous.
    usage_error(
        &till(["inspect", "--token", &t, file]).run(),
        &["--token", "file"],
    );
    usage_error(
        &till(["inspect", file]).env("TILL_TOKEN", &t).run(),
        &["TILL_TOKEN"],
    );
    usage_error(&till(["inspect"]).stdin("").run(), &["empty"]);
    let missing = h.path().join("nope.token");
    usage_error(
        &till(["inspect", missing.to_str().unwrap()]).run(),
        &["cannot read token file"],
    );
}

// ---------------------------------------------------------------------------
// 8. Interop with another Biscuit implementation (biscuit-python)

/// Whether biscuit-python can be used; skips loudly (or fails in CI) if not.
fn biscuit_python() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import biscuit_auth"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!(
                "biscuit-python is required in CI: python3 -m pip install biscuit-python==0.4.0"
            );
        }
        eprintln!(
            "\n******** SKIPPED: biscuit-python not installed (python3 -m pip install biscuit-python==0.4.0) ********\n"
        );
    }
    ok
}

/// Runs `python3 -c script args...`; returns stdout, panics with stderr.
fn python(script: &str, args: &[&str]) -> String {
    let o = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        o.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

const PY_ATTENUATE: &str = r#"
import sys
from biscuit_auth import UnverifiedBiscuit, BlockBuilder, PublicKey
token, root = sys.argv[1], sys.argv[2]
child = UnverifiedBiscuit.from_base64(token).append(
    BlockBuilder('check if path($p), $p.starts_with("/v1/chat/")'))
if hasattr(child, "to_base64"):
    print(child.to_base64())
else:
    # biscuit-python 0.4.0: UnverifiedBiscuit cannot serialise itself; the
    # verified form (same bytes) can.
    print(child.verify(PublicKey(root)).to_base64())
"#;

const PY_VERIFY: &str = r#"
import sys, json, datetime
from biscuit_auth import Biscuit, PublicKey, AuthorizerBuilder, AuthorizationError
token, root, policy = sys.argv[1], sys.argv[2], sys.argv[3]
b = Biscuit.from_base64(token, PublicKey(root))
def authorize(uses):
    builder = AuthorizerBuilder(policy + """
        service("openai"); method("POST"); path("/v1/chat/x");
        time(2026-06-01T00:00:00Z); uses(0, {n});
    """, {"n": uses})
    # The library's default run time limit is 1 ms, which a loaded test
    # machine exceeds now and then: the answer would be a timeout.
    limits = builder.limits()
    limits.max_time = datetime.timedelta(seconds=10)
    builder.set_limits(limits)
    a = builder.build(b)
    try:
        a.authorize()
        return True
    except AuthorizationError:
        return False
print(json.dumps({
    "blocks": b.block_count(),
    "source": b.block_source(0),
    "ids": b.revocation_ids,
    "uses_10": authorize(10),
    "uses_11": authorize(11),
}))
"#;

#[test]
fn biscuit_python_attenuates_a_till_token_and_till_enforces_the_block() {
    if !biscuit_python() {
        return;
    }
    let h = Home::new();
    let pk = h.public();
    let parent = issue(&h, &["--service", "openai", "--max-uses", "10"]);
    let child = python(PY_ATTENUATE, &[&parent, &pk]).trim().to_string();
    assert_ne!(child, parent);
    assert_eq!(revocation_ids(&child).len(), 2);
    let req = |p: &str| verify(&h, &child, &["--service", "openai", "--path", p]);
    allowed(&req("/v1/chat/x"));
    denied(
        &req("/v1/files"),
        &["this key only allows paths starting with \"/v1/chat/\""],
    );
    // Till reads the foreign block's meaning, and keeps the parent's limit.
    let v = inspect_json(&child);
    assert_eq!(
        v["blocks"][1]["checks"],
        serde_json::json!([{"kind": "path_prefixes", "allowed": ["/v1/chat/"]}])
    );
    denied(
        &verify(
            &h,
            &child,
            &[
                "--service",
                "openai",
                "--path",
                "/v1/chat/x",
                "--uses",
                "0=11",
            ],
        ),
        &["the key this one was made from (block 0) has used all 10 of its uses"],
    );
    // Till attenuates the Python-made token further.
    let grandchild = attenuate(&child, &["--max-uses", "2"]);
    let o = verify(
        &h,
        &grandchild,
        &[
            "--service",
            "openai",
            "--path",
            "/v1/chat/x",
            "--uses",
            "2=3",
        ],
    );
    denied(&o, &["this key has used all 2 of its uses"]);
}

/// The block shape the README documents for other Biscuit libraries.
const PY_README_BLOCK: &str = r#"
import sys, datetime
from biscuit_auth import UnverifiedBiscuit, BlockBuilder, PublicKey
parent = UnverifiedBiscuit.from_base64(sys.argv[1])
k = parent.block_count()
block = BlockBuilder(
    """
    check if service($s), {"openai"}.contains($s);
    check if path($p), $p.starts_with({prefix});
    check if time($t), $t <= {expires};
    use_limit({k}, {n});
    check if uses({k}, $u), $u <= {n};
    """,
    {
        "prefix": "/v1/chat/completions",
        "expires": datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc),
        "k": k,
        "n": 5,
    },
)
print(parent.append(block).verify(PublicKey(sys.argv[2])).to_base64())
"#;

#[test]
fn biscuit_python_block_in_the_documented_shape_reads_as_till_scope() {
    if !biscuit_python() {
        return;
    }
    let h = Home::new();
    let pk = h.public();
    let parent = issue(&h, &["--service", "openai", "--service", "github"]);
    let child = python(PY_README_BLOCK, &[&parent, &pk]).trim().to_string();
    let o = till(["inspect", "--token", &child]).run();
    o.success();
    for s in [
        "services: \"openai\"",
        "path prefixes: \"/v1/chat/completions\"",
        "expires: 2030-01-01T00:00:00Z",
        "use limit: 5",
    ] {
        o.stdout_has(s);
    }
    assert!(!o.stdout.contains("custom check"), "{}", o.stdout);
    let req = |extra: &[&str]| {
        let mut a = vec![
            "--path",
            "/v1/chat/completions",
            "--at",
            "2029-01-01T00:00:00Z",
        ];
        a.extend_from_slice(extra);
        verify(&h, &child, &a)
    };
    allowed(&req(&["--service", "openai", "--uses", "1=5"]));
    denied(
        &req(&["--service", "openai", "--uses", "1=6"]),
        &["this key has used all 5 of its uses"],
    );
    denied(
        &req(&["--service", "github"]),
        &["this key only allows service \"openai\""],
    );
}

#[test]
fn biscuit_python_verifies_a_till_token_and_reads_its_vocabulary() {
    if !biscuit_python() {
        return;
    }
    let h = Home::new();
    let pk = h.public();
    let t = issue(
        &h,
        &[
            "--service",
            "openai",
            "--method",
            "POST",
            "--path",
            "/v1/",
            "--max-uses",
            "10",
            "--label",
            "py",
        ],
    );
    let policy = till::policy::DEFAULT_POLICY;
    let out = python(PY_VERIFY, &[&t, &pk, policy]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("python printed JSON");
    assert_eq!(v["blocks"], 1);
    let src = v["source"].as_str().unwrap();
    for s in [
        r#"right("openai", "POST", "/v1/")"#,
        r#"label("py")"#,
        "use_limit(0, 10)",
        "check if uses(0, $u), $u <= 10",
    ] {
        assert!(src.contains(s), "python's block source lacks {s:?}:\n{src}");
    }
    assert_eq!(v["ids"], serde_json::json!(revocation_ids(&t)));
    // Another implementation enforces Till's use limit with Till's policy.
    assert_eq!(v["uses_10"], true);
    assert_eq!(v["uses_11"], false);

    // And it refuses the token under a different root key.
    let other = Home::new().public();
    let o = std::process::Command::new("python3")
        .args(["-c", PY_VERIFY, &t, &other, policy])
        .output()
        .unwrap();
    assert!(!o.status.success(), "python accepted a foreign root key");
}

// ---------------------------------------------------------------------------
// 9. Help

#[test]
fn help_documents_exit_codes_and_flags() {
    let o = till(["--help"]).run();
    o.success();
    no_panic(&o);
    for s in [
        "Exit codes",
        "0 success",
        "1 denied",
        "2 usage",
        "issue",
        "attenuate",
        "verify",
    ] {
        o.stdout_has(s);
    }
    let o = till(["issue", "--help"]).run();
    o.success();
    for s in [
        "--service",
        "--any-service",
        "--method",
        "--path",
        "--model",
        "--max-uses",
        "--ttl",
        "--expires",
        "--label",
        "--datalog",
    ] {
        o.stdout_has(s);
    }
    let o = till(["verify", "--help"]).run();
    o.success();
    for s in [
        "--public-key",
        "--uses",
        "--at",
        "--revocations",
        "--max-feed-age",
        "--revoked-ids",
    ] {
        o.stdout_has(s);
    }
    // The help never echoes a token taken from the environment.
    let o = till(["inspect", "--help"])
        .env("TILL_TOKEN", "secret-token-value")
        .run();
    o.success();
    assert!(!o.stdout.contains("secret-token-value"), "{}", o.stdout);
    // An unknown flag is a usage error.
    let o = till(["issue", "--frobnicate"]).run();
    o.code(2);
    no_panic(&o);
}

// ---------------------------------------------------------------------------
// 10. The operator's first hour (issue 11)

/// Regression: `--max-uses -1` got clap's "unexpected argument '-1'" and
/// `--ttl -5m` / `--ttl 0s` a bare "invalid scope: ...".
#[test]
fn bad_numbers_for_max_uses_and_ttl_are_explained_in_plain_words() {
    let h = Home::new();
    let parent = issue(
        &h,
        &["--service", "openai", "--max-uses", "10", "--ttl", "1h"],
    );
    for (args, expect) in [
        (
            &["--max-uses", "-1"][..],
            &["--max-uses -1", "negative", "at least 1"][..],
        ),
        (
            &["--max-uses", "ten"],
            &["--max-uses \"ten\"", "not a whole number"],
        ),
        (&["--max-uses", "0"], &["--max-uses 0", "at least 1"]),
        (&["--ttl", "-5m"], &["--ttl -5m", "negative", "--ttl 10m"]),
        (
            &["--ttl", "0s"],
            &["--ttl 0s", "expires at once", "at least 1s"],
        ),
        (&["--ttl", "0h0m"], &["--ttl 0h0m", "expires at once"]),
        (&["--ttl", "5x"], &["--ttl \"5x\" is not a duration"]),
    ] {
        let mut a = vec!["issue", "--service", "openai"];
        a.extend_from_slice(args);
        let from_issue = till(a).home(&h).run();
        let mut a = vec!["attenuate", "--token", &parent];
        a.extend_from_slice(args);
        let from_attenuate = till(a).run();
        for o in [from_issue, from_attenuate] {
            let err = usage_error(&o, expect);
            for bad in ["unexpected argument", "invalid scope"] {
                assert!(!err.contains(bad), "{args:?}: {err}");
            }
        }
    }
}

/// Regression: toml's error was flattened onto one line, losing the line
/// of the file and the caret under the mistake.
#[test]
fn config_errors_keep_tomls_line_and_caret() {
    let h = Home::new();
    let cfg = h.write(
        "bad.toml",
        "listen = \"127.0.0.1:0\"\n[limits]\nidle_timeout_secs = \"soon\"\n",
    );
    let o = till(["serve", "--config", cfg.to_str().unwrap()]).run();
    o.code(2)
        .stderr_has("bad.toml")
        .stderr_has("idle_timeout_secs");
    no_panic(&o);
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert!(
        lines.len() >= 3,
        "toml's rendering spans lines:\n{}",
        o.stderr
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("3 | idle_timeout_secs = \"****\"")),
        "the offending line is shown, its strings masked (they may be secrets):\n{}",
        o.stderr
    );
    assert!(
        lines
            .iter()
            .any(|l| l.trim_start_matches([' ', '|']).starts_with('^')),
        "a caret marks the spot:\n{}",
        o.stderr
    );
}

/// Regression: a port already taken logged "stopped; counters flushed"
/// before the error, as if a running proxy had shut down.
#[test]
fn a_port_in_use_is_reported_before_anything_says_stopped() {
    let h = Home::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let cfg = h.write(
        "till.toml",
        &format!(
            "listen = \"{addr}\"\nstate_dir = {:?}\n",
            h.path().to_str().unwrap()
        ),
    );
    let o = till(["serve", "--config", cfg.to_str().unwrap()])
        .env("TILL_LOG", "info")
        .run();
    o.code(2)
        .stderr_has(&format!("cannot listen on {addr}"))
        .stderr_has("already in use")
        .stderr_has("--listen");
    no_panic(&o);
    assert!(!o.stderr.contains("stopped"), "{}", o.stderr);
    // Piped stderr is not a terminal: no colour codes either.
    assert!(!o.stderr.contains('\u{1b}'), "{:?}", o.stderr);
    drop(taken);
}

/// Regression: log lines written to a file carried ANSI colour codes.
#[tokio::test(flavor = "multi_thread")]
async fn logs_have_no_colour_codes_when_stderr_is_not_a_terminal() {
    let up = Upstream::start().await;
    let home = Home::new();
    let mut proxy = Proxy::start(&home, &[openai(&up)], "");
    let t = home.token("openai", Some(3));
    assert_eq!(chat(&proxy, &t, "m").await.0, 200);
    assert_eq!(proxy.terminate(), 0);
    let logs = proxy.logs();
    assert!(logs.contains("shutting down"), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "colour codes in the log file: {logs:?}"
    );
}

/// Regression: `till inspect ... | head -1` panicked with "failed printing
/// to stdout: Broken pipe" once head had gone.
#[test]
fn a_closed_stdout_ends_output_commands_quietly() {
    let h = Home::new();
    let t = issue(
        &h,
        &["--service", "openai", "--max-uses", "3", "--ttl", "1h"],
    );
    for args in [
        vec!["inspect", "--token", &t],
        vec!["inspect", "--json", "--token", &t],
        vec!["attenuate", "--token", &t, "--max-uses", "2"],
        vec!["pubkey"],
    ] {
        let o = till(&args).home(&h).closed_stdout().run();
        assert_eq!(o.code, 0, "{args:?}: {}", o.stderr);
        assert_eq!(o.stderr, "", "{args:?}");
    }
}

/// Regression: `till usage` / `till revoke` assumed 127.0.0.1:8787 instead of
/// the `listen` of `$TILL_HOME/till.toml`, and `till serve` never wrote the
/// admin token they read (while its banner pointed at it).
#[tokio::test(flavor = "multi_thread")]
async fn usage_and_revoke_find_the_proxy_and_admin_token_from_till_home() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let admin = home.path().join("admin.token");
    assert!(admin.exists(), "till serve creates the admin token");
    let t = home.token("openai", Some(3));
    assert_eq!(chat(&proxy, &t, "m").await.0, 200);

    // The config says port 0: only the printed address is known, and the
    // error says so instead of trying a default.
    let o = till(["usage"]).home(&home).run();
    usage_error(&o, &["port 0", "--url"]);

    // Both address forms `listen` takes, no TILL_URL, no TILL_ADMIN_TOKEN.
    let cfg = std::fs::read_to_string(&proxy.config).unwrap();
    let port = proxy.addr.port();
    for listen in [
        proxy.addr.to_string(),
        format!(":{port}"),
        format!("localhost:{port}"),
    ] {
        std::fs::write(
            &proxy.config,
            cfg.replace(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"{listen}\""),
            ),
        )
        .unwrap();
        till(["usage"])
            .home(&home)
            .run()
            .success()
            .stdout_has("remaining");
    }
    till(["revoke", &t])
        .home(&home)
        .run()
        .success()
        .stdout_has("revoked ");
    assert_eq!(chat(&proxy, &t, "m").await.0, 403);
}

/// Regression: `--listen` only took IP:PORT; `:8788` and `localhost:8788`
/// were refused.
#[test]
fn listen_accepts_a_bare_port_and_localhost() {
    for listen in [":0", "localhost:0"] {
        let home = Home::empty();
        let dir = home.path().join("state");
        let cfg = dir.join("till.toml");
        let p = Proxy::spawn(
            &home,
            &["--home", dir.to_str().unwrap(), "up", "--listen", listen],
            &cfg,
        )
        .unwrap_or_else(|e| panic!("till up --listen {listen}: {e}"));
        assert!(p.addr.ip().is_loopback(), "{listen} -> {}", p.addr);
        assert_ne!(p.addr.port(), 0);
    }
    let o = till(["up", "--listen", "8788"]).home(&Home::new()).run();
    o.code(2).stderr_has("IP:PORT, localhost:PORT or :PORT");
}

/// A loopback port that was free a moment ago, for a flag that must name a
/// real port (port 0 would be recorded as 0).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Regression (red team, wave 2, third pass): `till up --listen ADDR` (or
/// `TILL_LISTEN`) on a new home wrote `listen = "127.0.0.1:8787"` into the
/// till.toml it created, so `till usage`, `till revoke` and `till reload`
/// went to 8787, not to the proxy they were run for.
#[test]
fn regression_till_up_records_the_listen_address_it_was_given_in_its_new_till_toml() {
    for how in ["--listen", "TILL_LISTEN"] {
        let home = Home::empty();
        let addr = format!("127.0.0.1:{}", free_port());
        let cfg = home.path().join("till.toml");
        let started = match how {
            "--listen" => Proxy::spawn(&home, &["up", "--listen", &addr], &cfg),
            _ => Proxy::spawn_env(&home, &["up"], &cfg, &[("TILL_LISTEN", &addr)]),
        };
        let p = started.unwrap_or_else(|e| panic!("till up with {how} {addr}: {e}"));
        assert_eq!(p.addr.to_string(), addr, "{how}");
        let text = fs::read_to_string(&cfg).unwrap();
        assert!(
            text.contains(&format!("listen = \"{addr}\"")),
            "{how}: till.toml does not record {addr}:\n{text}"
        );
        till(["usage"]).home(&home).run().success();
        till(["reload"])
            .home(&home)
            .run()
            .success()
            .stdout_has("reloaded");
    }
}

/// When the address comes from till.toml (or the default) and the proxy
/// there does not know the admin token's root key, the error says it may
/// be another Till and how to name the right one.
#[test]
fn an_admin_command_answered_by_another_till_suggests_url() {
    let other_home = Home::new();
    let other = Proxy::start(&other_home, &[], "");
    let mine = Home::new();
    mine.write("admin.token", &mine.admin());
    mine.write("till.toml", &format!("listen = \"{}\"\n", other.addr));
    for cmd in ["usage", "reload"] {
        let o = till([cmd]).home(&mine).run();
        usage_error(
            &o,
            &[
                "does not verify",
                "may be another Till",
                "--url or TILL_URL",
            ],
        );
    }
    // An address given with --url is the operator's own choice: the plain answer.
    let o = till(["usage", "--url", &other.url("")]).home(&mine).run();
    let err = usage_error(&o, &["does not verify"]);
    assert!(!err.contains("another Till"), "{err}");
}

/// The soft and hard open-file limits of process `pid`.
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open-file limit in:\n{limits}"));
    let mut n = line["Max open files".len()..].split_whitespace();
    (n.next().unwrap().into(), n.next().unwrap().into())
}

/// Regression (red team, wave 2, third pass): nothing raised the soft
/// open-file limit, so `till up` from an ordinary shell (soft 1024) let one
/// token holder's connections take every descriptor well below
/// `max_connections`, and other agents got 502 "Too many open files" after
/// their use was counted. The soft limit is raised to the hard one at start.
#[test]
fn regression_serve_raises_the_soft_open_file_limit_to_the_hard_one() {
    let home = Home::new();
    let cfg = home.write(
        "till.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n[limits]\nmax_connections = 100\n",
            home.path().to_str().unwrap()
        ),
    );
    let p = Proxy::spawn_via(
        &home,
        &["prlimit", "--nofile=64:4096", "--"],
        "info",
        &["serve", "--config", cfg.to_str().unwrap()],
        &cfg,
    )
    .expect("till serve starts under a soft limit of 64");
    assert_eq!(open_file_limits(p.pid()), ("4096".into(), "4096".into()));
    let logs = p.logs();
    assert!(logs.contains("raised the open-file limit"), "{logs}");
    // 4096 serve 100 connections: nothing to warn about.
    assert!(!logs.contains("WARN"), "{logs}");
}

/// Under a hard limit below what `max_connections` may need, `till up`
/// says so at start, naming both numbers and how to raise the limit.
#[test]
fn a_hard_open_file_limit_below_max_connections_is_warned_about_at_start() {
    let home = Home::empty();
    let cfg = home.path().join("till.toml");
    let p = Proxy::spawn_via(
        &home,
        &["prlimit", "--nofile=64:64", "--"],
        "info",
        &["up", "--listen", "127.0.0.1:0"],
        &cfg,
    )
    .expect("till up starts under a hard limit of 64");
    assert_eq!(open_file_limits(p.pid()), ("64".into(), "64".into()));
    let logs = p.logs();
    // The default max_connections, 4096: two descriptors each, 64 for the rest.
    for s in [
        "WARN",
        "the open-file limit (RLIMIT_NOFILE) is 64, below the 8256",
        "limits.max_connections = 4096",
        "ulimit -n 8256",
        "LimitNOFILE=8256",
    ] {
        assert!(logs.contains(s), "the log lacks {s:?}:\n{logs}");
    }
}

/// Regression: the banner of `till serve` told to run `till issue`, which
/// looks in ./.till, not in the config's state_dir.
#[test]
fn serve_banner_names_the_state_dir_for_till_issue() {
    use std::io::BufRead;
    let home = Home::new();
    let cfg = home.write(
        "till.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n",
            home.path().to_str().unwrap()
        ),
    );
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = String::new();
    {
        let mut r = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while r.read_line(&mut line).unwrap() > 0 {
            out.push_str(&line);
            if line.contains("till issue") {
                break;
            }
            line.clear();
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let expect = format!("TILL_HOME={} till issue", home.path().to_str().unwrap());
    assert!(out.contains(&expect), "banner lacks {expect:?}:\n{out}");
    assert!(home.path().join("admin.token").exists());
}

/// Regression: `--home` was accepted by commands that ignore it, so
/// `till --home /srv/till serve` silently kept its state elsewhere.
#[test]
fn home_flag_is_refused_where_it_does_nothing() {
    let h = Home::new();
    let t = h.token("openai", Some(1));
    let cfg = h.write("till.toml", "listen = \"127.0.0.1:0\"\n");
    let o = till(["--home", "/tmp", "serve", "--config", cfg.to_str().unwrap()]).run();
    usage_error(&o, &["--home does nothing", "state_dir"]);
    let o = till(["inspect", "--home", "/tmp", "--token", &t]).run();
    usage_error(&o, &["--home does nothing"]);
    // TILL_HOME in the environment is meant for every command: no error.
    till(["inspect", "--token", &t]).home(&h).run().success();
}

/// Regression (red team, wave 2, third pass): `--home` is global, so the
/// help of `serve`, `inspect` and `attenuate` listed it although passing it
/// to them is always an error. Their help leaves it out; the commands that
/// use it, nested ones included, still list it.
#[test]
fn help_lists_home_only_where_it_is_accepted() {
    for cmd in ["serve", "inspect", "attenuate"] {
        let o = till([cmd, "--help"]).run();
        o.success();
        assert!(
            !o.stdout.contains("--home"),
            "till {cmd} --help:\n{}",
            o.stdout
        );
        assert!(
            !o.stdout.contains("TILL_HOME"),
            "till {cmd} --help:\n{}",
            o.stdout
        );
    }
    for args in [
        vec!["issue", "--help"],
        vec!["up", "--help"],
        vec!["usage", "--help"],
        vec!["key", "list", "--help"],
        vec!["store", "export", "--help"],
    ] {
        till(&args)
            .run()
            .success()
            .stdout_has("--home <HOME>")
            .stdout_has("[env: TILL_HOME=]");
    }
    // Accepted before or after the command, as before.
    let h = Home::new();
    let dir = h.path().to_str().unwrap();
    for args in [vec!["--home", dir, "pubkey"], vec!["pubkey", "--home", dir]] {
        till(&args).run().success().stdout_has("ed25519/");
    }
}

/// Issue and attenuate warn about tokens that can never succeed, a child
/// promised more uses than its parent, and a root token without bounds;
/// `--strict` refuses them.
#[test]
fn issue_and_attenuate_warn_about_tokens_that_can_never_succeed() {
    let h = Home::new();
    let warns = |o: &Out, parts: &[&str]| {
        o.success();
        no_panic(o);
        assert!(!o.out().is_empty(), "the token is still printed");
        let w: Vec<&str> = o.stderr.lines().collect();
        assert!(
            w.iter().all(|l| l.starts_with("till: warning: ")),
            "{}",
            o.stderr
        );
        for p in parts {
            assert!(o.stderr.contains(p), "warning lacks {p:?}: {}", o.stderr);
        }
    };
    let quiet = |o: &Out| {
        o.success();
        assert_eq!(o.stderr, "", "no warning expected");
    };
    // --strict: the warning, then the refusal; no token.
    let refused = |o: &Out| {
        o.code(2);
        no_panic(o);
        assert_eq!(o.stdout, "");
        o.stderr_has("till: warning: ")
            .stderr_has("till: error: --strict");
    };

    // Root tokens.
    let o = till(["issue", "--service", "openai"]).home(&h).run();
    warns(
        &o,
        &["neither a use limit nor an expiry", "--max-uses", "--ttl"],
    );
    refused(
        &till(["issue", "--service", "openai", "--strict"])
            .home(&h)
            .run(),
    );
    let o = till([
        "issue",
        "--service",
        "openai",
        "--max-uses",
        "5",
        "--expires",
        "2001-01-01T00:00:00Z",
    ])
    .home(&h)
    .run();
    warns(
        &o,
        &["can never succeed", "expired at 2001-01-01T00:00:00Z"],
    );
    quiet(
        &till(["issue", "--service", "openai", "--max-uses", "5"])
            .home(&h)
            .run(),
    );
    quiet(
        &till(["issue", "--service", "openai", "--ttl", "1h"])
            .home(&h)
            .run(),
    );

    // Children of a POST /v1/chat/ openai token with 10 uses.
    let parent = issue(
        &h,
        &[
            "--service",
            "openai",
            "--method",
            "POST",
            "--path",
            "/v1/chat/",
            "--model",
            "gpt-4o-mini",
            "--max-uses",
            "10",
            "--ttl",
            "1h",
        ],
    );
    let child = |args: &[&str]| {
        let mut a = vec!["attenuate", "--token", &parent];
        a.extend_from_slice(args);
        till(a).run()
    };
    for (args, parts) in [
        (
            &["--service", "github"][..],
            &["never succeed", "no service", "\"openai\"", "\"github\""][..],
        ),
        (
            &["--method", "GET"],
            &["never succeed", "no method", "\"POST\"", "\"GET\""],
        ),
        (
            &["--path", "/v1/files/"],
            &[
                "never succeed",
                "no path",
                "\"/v1/chat/\"",
                "\"/v1/files/\"",
            ],
        ),
        (
            &["--model", "gpt-4o"],
            &["never succeed", "no model", "\"gpt-4o-mini\"", "\"gpt-4o\""],
        ),
        (
            &["--expires", "2001-01-01T00:00:00Z"],
            &["never succeed", "expired"],
        ),
        (
            &["--max-uses", "50"],
            &["--max-uses 50", "parent's use limit of 10", "at most 10"],
        ),
    ] {
        let o = child(args);
        warns(&o, parts);
        let mut strict = args.to_vec();
        strict.push("--strict");
        refused(&child(&strict));
    }
    // Narrowing within reach is silent.
    for args in [
        &["--path", "/v1/chat/completions", "--max-uses", "5"][..],
        &["--service", "openai", "--method", "POST"],
        &["--path", "/v1/", "--model", "gpt-4o-mini"],
        &["--max-uses", "10", "--ttl", "10m"],
    ] {
        quiet(&child(args));
    }
    // A warned token is still the token asked for: the warning changes nothing.
    let o = child(&["--max-uses", "50"]);
    allowed(&verify(
        &h,
        &o.out(),
        &[
            "--service",
            "openai",
            "--method",
            "POST",
            "--path",
            "/v1/chat/x",
            "--model",
            "gpt-4o-mini",
        ],
    ));
}

/// Regression: `till usage` listed grandchildren by level rather than under
/// their own parent, showed a child of a used-up parent as having uses
/// left, and printed cut ids ending in ".." that no command accepted.
#[tokio::test(flavor = "multi_thread")]
async fn usage_is_a_tree_with_inherited_remaining_and_ids_any_command_takes() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let root = home.issue(till::token::Scope {
        services: vec!["openai".into()],
        max_uses: Some(2),
        label: Some("team".into()),
        ..Default::default()
    });
    let labelled = |parent: &str, label: &str, n: u64| {
        child(
            parent,
            till::token::Scope {
                max_uses: Some(n),
                label: Some(label.into()),
                ..Default::default()
            },
        )
    };
    let a = labelled(&root, "a", 5);
    let b = labelled(&root, "b", 5);
    let a1 = labelled(&a, "a1", 3);
    let b1 = labelled(&b, "b1", 3);
    assert_eq!(chat(&proxy, &a1, "m").await.0, 200);
    assert_eq!(chat(&proxy, &b1, "m").await.0, 200);
    let url = proxy.url("");
    let run = |args: &[&str]| {
        let mut v = args.to_vec();
        v.extend(["--url", &url]);
        till(v).home(&home).run()
    };

    let o = run(&["usage"]);
    o.success();
    let lines: Vec<&str> = o.stdout.lines().collect();
    let row = |label: &str| {
        let i = lines
            .iter()
            .position(|l| l.ends_with(&format!("\"{label}\"")))
            .unwrap_or_else(|| panic!("no row for {label}:\n{}", o.stdout));
        let indent = lines[i].len() - lines[i].trim_start().len();
        let cols: Vec<&str> = lines[i].split_whitespace().collect();
        (i, indent, cols)
    };
    let (ri, rd, rc) = row("team");
    assert_eq!(rd, 0);
    assert_eq!((rc[1], rc[2], rc[3]), ("2", "2", "0"), "{}", o.stdout);
    for (parent, kid) in [("a", "a1"), ("b", "b1")] {
        let (pi, pd, pc) = row(parent);
        let (ki, kd, kc) = row(kid);
        assert!(pi > ri && pd == 2, "{parent} under the root:\n{}", o.stdout);
        assert_eq!(ki, pi + 1, "{kid} right under {parent}:\n{}", o.stdout);
        assert_eq!(kd, 4, "{}", o.stdout);
        // Own limits leave uses, but the root has none left.
        assert_eq!(pc[3], "0", "{parent}:\n{}", o.stdout);
        assert_eq!(kc[3], "0", "{kid}:\n{}", o.stdout);
    }
    // The shown id is a prefix every command takes back.
    let a1_id = revocation_ids(&a1).pop().unwrap();
    let (_, _, kc) = row("a1");
    let shown = kc[0];
    assert!(shown.len() >= 12 && a1_id.starts_with(shown), "{shown}");
    assert!(!shown.ends_with(".."), "{shown}");

    let o = run(&["usage", "--json", shown]);
    o.success();
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let blocks = v[0]["blocks"].as_array().unwrap();
    let labels: Vec<&str> = blocks
        .iter()
        .map(|b| b["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels.len(), 5);
    assert_eq!(labels[0], "team");
    let pos = |l: &str| labels.iter().position(|x| *x == l).unwrap();
    assert_eq!(pos("a1"), pos("a") + 1, "{labels:?}");
    assert_eq!(pos("b1"), pos("b") + 1, "{labels:?}");
    for b in blocks {
        assert_eq!(b["remaining"], 0, "{b}");
    }
    assert_eq!(blocks[pos("a1")]["depth"], 2);

    // Unknown and too-short prefixes are clear errors.
    usage_error(
        &run(&["usage", "deadbeefdead"]),
        &["no id known", "deadbeefdead"],
    );
    usage_error(&run(&["revoke", "--id", "0f17"]), &["too short"]);

    // Revoke by the prefix, pasted with an ellipsis; list as JSON.
    let o = run(&["revoke", "--json", "--id", &format!("{shown}…")]);
    o.success();
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["revoked"], a1_id.as_str());
    assert_eq!(chat(&proxy, &a1, "m").await.0, 403);
    let o = run(&["revoke", "--list", "--json"]);
    o.success();
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["revoked"][0]["id"], a1_id.as_str());
    assert!(v["revoked"][0]["revoked_at"].is_u64());

    // `till usage --json | head -1` once head has gone: quiet, exit 0.
    let o = till(["usage", "--json", "--url", &url])
        .home(&home)
        .closed_stdout()
        .run();
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stderr, "");
}

/// Regression: the top-level help promised examples in every command's
/// help, and none had one; `revoke --all` was an undocumented alias of
/// `--root` that read as "revoke everything".
#[test]
fn every_subcommand_help_has_an_example() {
    for cmd in [
        "keygen",
        "pubkey",
        "issue",
        "attenuate",
        "inspect",
        "verify",
        "up",
        "serve",
        "revoke",
        "usage",
        "reload",
        "store",
    ] {
        let o = till([cmd, "--help"]).run();
        o.success();
        assert!(
            o.stdout.contains("Example"),
            "{cmd} --help has no example:\n{}",
            o.stdout
        );
        assert!(
            o.stdout.contains(&format!("till {cmd}")),
            "{cmd}'s example does not run {cmd}:\n{}",
            o.stdout
        );
    }
    let o = till(["revoke", "--all", "x"]).run();
    o.code(2);
    no_panic(&o);
}

// ---------------------------------------------------------------------------
// 11. Base URL overrides that keep the key

/// `till up --upstream openai=URL` and `OPENAI_BASE_URL` point the built-in
/// upstream at a local server and still inject `OPENAI_API_KEY`.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_flag_and_base_url_variable_keep_the_built_in_key() {
    let up = Upstream::start().await;
    let flag = format!("openai={}", up.url());
    let sdk_style = format!("{}/v1", up.url());
    for (args, env) in [
        (
            vec!["up", "--listen", "127.0.0.1:0", "--upstream", &flag],
            vec![("OPENAI_API_KEY", OPENAI_SECRET)],
        ),
        (
            vec!["up", "--listen", "127.0.0.1:0"],
            vec![
                ("OPENAI_API_KEY", OPENAI_SECRET),
                ("OPENAI_BASE_URL", &sdk_style),
            ],
        ),
    ] {
        let home = Home::empty();
        let cfg = home.path().join("till.toml");
        let proxy = Proxy::spawn_env(&home, &args, &cfg, &env).expect("till up starts");
        let banner = proxy.banner();
        assert!(
            banner.contains(&format!("/openai/ -> {}", up.url())),
            "{banner}"
        );
        assert!(!banner.contains("WARNING"), "{banner}");
        let before = up.count();
        let t = home.token("openai", Some(5));
        assert_eq!(chat(&proxy, &t, "m").await.0, 200, "{args:?}");
        assert_eq!(up.count(), before + 1);
        let seen = up.seen().pop().unwrap();
        assert_eq!(seen.uri, "/v1/chat/completions", "no doubled /v1");
        assert_eq!(
            seen.headers["authorization"],
            format!("Bearer {OPENAI_SECRET}").as_str()
        );
    }
    // A local server needs no key: OPENAI_BASE_URL alone adds the upstream,
    // and the banner says loudly that no credential goes with it.
    let home = Home::empty();
    let cfg = home.path().join("till.toml");
    let proxy = Proxy::spawn_env(
        &home,
        &["up", "--listen", "127.0.0.1:0"],
        &cfg,
        &[("OPENAI_API_KEY", ""), ("OPENAI_BASE_URL", &sdk_style)],
    )
    .expect("till up starts");
    let banner = proxy.banner();
    assert!(
        banner.contains("WARNING: NO CREDENTIAL, OPENAI_API_KEY is not set"),
        "{banner}"
    );
    let t = home.token("openai", Some(5));
    assert_eq!(chat(&proxy, &t, "m").await.0, 200);
    let seen = up.seen().pop().unwrap();
    assert!(seen.headers.get("authorization").is_none(), "{seen:?}");
}

/// Regression: `[upstreams.openai]` with only a `url` silently dropped the
/// credential; an upstream without one is now said loudly in the banner,
/// and `credential = "none"` says it is meant.
#[tokio::test(flavor = "multi_thread")]
async fn a_built_in_upstream_declared_by_url_only_keeps_its_credential() {
    let up = Upstream::start().await;
    let home = Home::new();
    let cfg = home.write(
        "till.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n\
             [upstreams.openai]\nurl = {:?}\n\
             [upstreams.anthropic]\nurl = {:?}\n\
             [upstreams.local]\nurl = {:?}\ncredential = \"none\"\n",
            home.path().to_str().unwrap(),
            up.url(),
            up.url(),
            up.url(),
        ),
    );
    let proxy = Proxy::spawn_env(
        &home,
        &["serve", "--config", cfg.to_str().unwrap()],
        &cfg,
        &[("OPENAI_API_KEY", OPENAI_SECRET), ("ANTHROPIC_API_KEY", "")],
    )
    .expect("proxy starts");
    let t = home.token("openai", Some(5));
    assert_eq!(chat(&proxy, &t, "m").await.0, 200);
    let seen = up.seen().pop().unwrap();
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {OPENAI_SECRET}").as_str()
    );
    let banner = proxy.banner();
    let line = |svc: &str| {
        banner
            .lines()
            .find(|l| l.contains(&format!("/{svc}/ -> ")))
            .unwrap_or_else(|| panic!("no {svc} line:\n{banner}"))
            .to_string()
    };
    assert!(!line("openai").contains("WARNING"), "{banner}");
    assert!(
        line("anthropic").contains("WARNING: NO CREDENTIAL, ANTHROPIC_API_KEY is not set"),
        "{banner}"
    );
    let local = line("local");
    assert!(
        !local.contains("WARNING") && local.contains("no credential: credential = \"none\""),
        "{banner}"
    );
    assert!(!banner.contains(OPENAI_SECRET));
}

/// An upstream URL that is Till's own listener would make every request
/// loop back into the proxy: refused at start.
#[test]
fn an_upstream_pointing_back_at_till_is_refused_at_start() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let listen = format!(":{port}");
    let looped = format!("openai=http://localhost:{port}");
    let o = till(["up", "--listen", &listen, "--upstream", &looped])
        .home(&Home::empty())
        .env("TILL_LOG", "info")
        .run();
    o.code(2)
        .stderr_has("points back at Till's own listener")
        .stderr_has("upstream \"openai\"");
    no_panic(&o);
    assert!(!o.stderr.contains("stopped"), "{}", o.stderr);
}

/// Regression: `till verify` had no `--json`, unlike `inspect` and `usage`.
#[test]
fn verify_json_gives_the_verdict_and_the_reason_with_the_same_exit_codes() {
    let h = Home::new();
    let t = issue(
        &h,
        &["--service", "openai", "--max-uses", "2", "--ttl", "1h"],
    );
    let o = verify(&h, &t, &["--service", "openai", "--json"]);
    o.success();
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v, serde_json::json!({"allowed": true}));
    let o = verify(&h, &t, &["--service", "github", "--json"]);
    o.code(1);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["allowed"], false);
    assert!(v["reason"].as_str().unwrap().contains("github"), "{v}");
}

/// Regression (red team, wave 2, third pass): a block stating a request
/// fact (`uses`, `path`, `time`, ...) satisfies its own checks on it, so it
/// is shown narrower than it is. `till issue` and `till attenuate` refuse
/// to write one (exit 2, one line naming the block and the fact); `till
/// verify` refuses it; `till inspect` reads it with a warning.
#[test]
fn a_block_stating_a_request_fact_is_refused_by_issue_attenuate_and_verify() {
    let h = Home::new();
    let parent = h.token("openai", Some(100));
    usage_error(
        &till(["issue", "--service", "openai", "--datalog", "uses(1, 0);"])
            .home(&h)
            .run(),
        &["block 0", "`uses(...)`", "only Till supplies"],
    );
    usage_error(
        &till([
            "attenuate",
            "--token",
            &parent,
            "--max-uses",
            "2",
            "--datalog",
            "uses(1, 0);",
        ])
        .run(),
        &["block 1", "`uses(...)`", "only Till supplies"],
    );
    usage_error(
        &till([
            "attenuate",
            "--token",
            &parent,
            "--path",
            "/v1/chat/",
            "--datalog",
            "path(\"/v1/chat/x\");",
        ])
        .run(),
        &["block 1", "`path(...)`"],
    );
    // Written with biscuit-auth, as an agent with another library could.
    let child = biscuit_auth::UnverifiedBiscuit::from_base64(&parent)
        .unwrap()
        .append(
            biscuit_auth::builder::BlockBuilder::new()
                .code("uses(1, 0); check if uses(1, $u), $u <= 2;")
                .unwrap(),
        )
        .unwrap()
        .to_base64()
        .unwrap();
    denied(
        &verify(&h, &child, &["--service", "openai"]),
        &["block 1", "`uses(...)`"],
    );
    let o = till(["inspect", "--token", &child]).run();
    o.success();
    assert!(
        o.stdout
            .contains("WARNING: block 1 states uses(...) itself"),
        "{}",
        o.stdout
    );
}

/// Regression (red team, wave 2, third pass): `till verify --help` showed
/// `{"allowed": true}` while `--json` prints `{"allowed":true}`, and
/// `till reload --help` said only upstreams and their credentials reload,
/// while the root key set (and every upstream key, forward-auth ones
/// included) reloads too and the audit file is reopened.
#[test]
fn help_shows_verify_json_as_printed_and_all_that_a_reload_applies() {
    let h = Home::new();
    let t = issue(&h, &["--service", "openai", "--max-uses", "2"]);
    let yes = verify(&h, &t, &["--service", "openai", "--json"]).out();
    let no = verify(&h, &t, &["--service", "github", "--json"]).out();
    let no_prefix = &no[..no.find("\"reason\":").unwrap() + "\"reason\":".len()];
    let help = till(["verify", "--help"]).run();
    help.success().stdout_has(&yes).stdout_has(no_prefix);
    let help = till(["reload", "--help"]).run();
    help.success();
    for s in [
        "root key set",
        "forward_auth_secret",
        "set_headers",
        "credential files and forward-auth secrets are read again",
        "audit file",
        "take effect at restart",
    ] {
        help.stdout_has(s);
    }
}

/// Regression: an expiry past 9999-12-31T23:59:59Z (the red team's
/// `$t <= 9999-12-31T23:59:59-23:59`, 10000-01-01 in UTC) panicked inside
/// the `time` crate: `inspect` and `verify` exited 101, `attenuate
/// --datalog` and `issue --ttl 99999999999d` panicked. Now each is a clear
/// one-line error.
#[test]
fn regression_an_expiry_past_year_9999_is_a_clear_error_not_a_panic() {
    let h = Home::new();
    let parent = h.token("openai", Some(10));
    let check = "check if time($t), $t <= 9999-12-31T23:59:59-23:59;";
    // Written with biscuit-auth, as an agent with another library could.
    let child = biscuit_auth::UnverifiedBiscuit::from_base64(&parent)
        .unwrap()
        .append(
            biscuit_auth::builder::BlockBuilder::new()
                .code(check)
                .unwrap(),
        )
        .unwrap()
        .to_base64()
        .unwrap();
    let refused = "block 1 expires after 9999-12-31T23:59:59Z";
    usage_error(
        &till(["inspect", "--token", &child]).run(),
        &[refused, "write an expiry up to 9999-12-31T23:59:59Z"],
    );
    denied(&verify(&h, &child, &["--service", "openai"]), &[refused]);
    usage_error(
        &till(["attenuate", "--token", &parent, "--datalog", check]).run(),
        &[refused],
    );
    usage_error(
        &till(["issue", "--service", "openai", "--ttl", "99999999999d"])
            .home(&h)
            .run(),
        &["--ttl 99999999999d", "after 9999-12-31T23:59:59Z"],
    );
    for flag in [
        ["issue", "--service", "openai"],
        ["attenuate", "--token", &parent],
    ] {
        let mut a = flag.to_vec();
        a.extend(["--expires", "9999-12-31T23:59:59-23:59"]);
        usage_error(
            &till(a).home(&h).run(),
            &["--expires", "outside the times Till handles"],
        );
    }
    usage_error(
        &till([
            "verify",
            "--token",
            &parent,
            "--service",
            "openai",
            "--at",
            "1969-12-31T23:59:59Z",
        ])
        .home(&h)
        .run(),
        &["outside the times Till handles"],
    );
}

/// A server on loopback that answers every request with `answer` and
/// counts the requests it got.
fn canned_server(answer: String) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 65536];
            let _ = s.read(&mut buf);
            let _ = s.write_all(answer.as_bytes());
        }
    });
    (url, hits)
}

/// Regression: `till revoke` printed "revoked" and exited 0 on any 2xx
/// answer, from any server, and followed a redirect with the admin
/// request to another host.
#[test]
fn regression_revoke_reports_success_only_when_the_proxy_names_the_revoked_id() {
    let h = Home::new();
    let t = issue(&h, &["--service", "openai", "--ttl", "1h"]);
    let json_ok = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
    let html_ok = "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 6\r\nconnection: close\r\n\r\n<html>";
    for answer in [json_ok, html_ok] {
        let (url, _) = canned_server(answer.to_string());
        let o = till(["revoke", &t, "--url", &url, "--admin-token", "x"])
            .home(&h)
            .run();
        assert_ne!(o.code, 0, "{}", o.stdout);
        assert!(!o.stdout.contains("revoked"), "{}", o.stdout);
        assert!(o.stderr.contains("Till"), "{}", o.stderr);
        no_panic(&o);
    }
    let (elsewhere, elsewhere_hits) = canned_server(json_ok.to_string());
    let (url, _) = canned_server(format!(
        "HTTP/1.1 307 Temporary Redirect\r\nlocation: {elsewhere}/admin/revoke\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    ));
    let o = till(["revoke", &t, "--url", &url, "--admin-token", "x"])
        .home(&h)
        .run();
    assert_ne!(o.code, 0, "{}", o.stdout);
    assert!(o.stderr.contains("never redirects"), "{}", o.stderr);
    assert_eq!(
        elsewhere_hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the redirect was not followed"
    );
}

#[test]
fn regression_help_never_prints_the_value_of_a_secret_environment_variable() {
    for (cmd, var, value, secret) in [
        (
            "serve",
            "TILL_STORE",
            "redis://:hunter2-redis-pass@127.0.0.1:6379/0",
            "hunter2",
        ),
        (
            "usage",
            "TILL_URL",
            "http://ops:url-pass-31337@127.0.0.1:8787",
            "url-pass-31337",
        ),
        (
            "reload",
            "TILL_ADMIN_TOKEN",
            "admin-token-value-4242",
            "4242",
        ),
        ("inspect", "TILL_TOKEN", "token-value-5151", "5151"),
    ] {
        let o = till([cmd, "--help"]).env(var, value).run();
        o.success();
        assert!(
            !o.stdout.contains(secret) && !o.stderr.contains(secret),
            "till {cmd} --help shows {var}:\n{}",
            o.stdout
        );
    }
}

#[test]
fn regression_admin_commands_give_up_on_a_proxy_that_never_answers() {
    let home = Home::new();
    // Accepts connections (the kernel does) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    for cmd in ["reload", "usage"] {
        till([cmd, "--url", &url, "--timeout", "1s"])
            .home(&home)
            .env("TILL_ADMIN_TOKEN", &home.admin())
            .run()
            .code(2)
            .one_line_error()
            .stderr_has("did not answer within 1 s");
    }
    drop(silent);
}
