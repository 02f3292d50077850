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
            r#"uses(0, 0); use_limit(0, 1000); right("github", "*", "/");"#,
        ],
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

    // Ambient-looking facts are confined to the child block too.
    let child = attenuate(
        &parent,
        &[
            "--datalog",
            r#"service("github"); method("GET"); path("/"); time(2000-01-01T00:00:00Z);"#,
        ],
    );
    denied(
        &verify(&h, &child, &["--service", "github"]),
        &["no right of the authority block"],
    );
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
import sys, json
from biscuit_auth import Biscuit, PublicKey, AuthorizerBuilder, AuthorizationError
token, root, policy = sys.argv[1], sys.argv[2], sys.argv[3]
b = Biscuit.from_base64(token, PublicKey(root))
def authorize(uses):
    a = AuthorizerBuilder(policy + """
        service("openai"); method("POST"); path("/v1/chat/x");
        time(2026-06-01T00:00:00Z); uses(0, {n});
    """, {"n": uses}).build(b)
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
