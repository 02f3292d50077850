//! Root key rotation (issue 12): `till keygen --rotate` adds an active key
//! while the old one keeps verifying, `till key retire` ends the old one's
//! tokens with a clear 401, the key set survives a restart, and offline
//! verifiers follow the set the proxy publishes.

use till::token::RawToken;

use crate::helpers::*;

/// `till issue --service openai` under TILL_HOME's active key.
fn issue(home: &Home) -> String {
    till(["issue", "--service", "openai", "--ttl", "1h"])
        .home(home)
        .run()
        .success()
        .out()
}

fn key_id(token: &str) -> Option<u32> {
    RawToken::parse(token).unwrap().root_key_id()
}

/// `till verify` of `token` for a chat request, with `args` (e.g. keys).
fn verify_with(home: Option<&Home>, token: &str, args: &[&str]) -> Out {
    let mut all = vec![
        "verify",
        "--service",
        "openai",
        "--method",
        "POST",
        "--path",
        "/v1/chat/completions",
    ];
    all.extend_from_slice(args);
    let mut c = till(all).stdin(token);
    if let Some(h) = home {
        c = c.home(h);
    }
    c.run()
}

/// `till reload` against `proxy` with the admin token of `home`'s file
/// (re-issued under the active key on rotation).
async fn till_reload(home: &Home, proxy: &Proxy) -> Out {
    let cmd = till(["reload"]).home(home).env("TILL_URL", &proxy.url(""));
    tokio::task::spawn_blocking(move || cmd.run())
        .await
        .unwrap()
}

/// SIGHUP, then waits for the proxy to log the `n`th key set change.
async fn sighup(proxy: &Proxy, n: usize) {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    for _ in 0..1000 {
        if proxy.logs().matches("root key set changed").count() >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no key set reload logged:\n{}", proxy.logs());
}

async fn get_text(proxy: &Proxy, path: &str) -> String {
    let r = client().get(proxy.url(path)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "{path}");
    r.text().await.unwrap()
}

const RETIRED: &str = "token was issued under a retired root key (key 0";

#[tokio::test(flavor = "multi_thread")]
async fn regression_rotation_keeps_old_tokens_until_retired_then_refuses_them_by_name() {
    let home = Home::new();
    let up = Upstream::start().await;
    let mut proxy = Proxy::start(&home, &[openai(&up)], "");
    let old = issue(&home);
    assert_eq!(key_id(&old), None, "key 0 tokens are as before rotation");
    assert_eq!(chat(&proxy, &old, "gpt-4o-mini").await.0, 200);

    let new_public = till(["keygen", "--rotate"])
        .home(&home)
        .run()
        .success()
        .stderr_has("key 0 keeps verifying until `till key retire 0`")
        .out();
    let new = issue(&home);
    assert_eq!(key_id(&new), Some(1));
    let admin = std::fs::read_to_string(home.path().join("admin.token")).unwrap();
    assert_eq!(key_id(admin.trim()), Some(1), "admin token re-issued");
    till(["pubkey"])
        .home(&home)
        .run()
        .success()
        .stdout_has(&new_public);

    // Until it reloads, the proxy does not know key 1, and says so; the
    // new admin token cannot ask it to reload, the one from before the
    // rotation (kept as admin.token.previous) can.
    let (s, v) = chat(&proxy, &new, "gpt-4o-mini").await;
    assert_eq!(s, 401, "{v}");
    assert!(
        v.to_string()
            .contains("root key 1, which this verifier does not know"),
        "{v}"
    );
    till_reload(&home, &proxy).await.success();
    for t in [&old, &new] {
        assert_eq!(chat(&proxy, t, "gpt-4o-mini").await.0, 200);
        verify_with(Some(&home), t, &[])
            .success()
            .stdout_has("allowed");
    }

    // Retire key 0: its tokens get a clear 401, even the one whose
    // verification the proxy has cached; key 1's pass.
    till(["key", "retire", "0"]).home(&home).run().success();
    assert!(
        !home.path().join("admin.token.previous").exists(),
        "an admin token under a retired key is removed"
    );
    till_reload(&home, &proxy).await.success();
    let (s, v) = chat(&proxy, &old, "gpt-4o-mini").await;
    assert_eq!(s, 401, "{v}");
    assert!(v.to_string().contains(RETIRED), "{v}");
    assert_eq!(chat(&proxy, &new, "gpt-4o-mini").await.0, 200);
    verify_with(Some(&home), &old, &[])
        .code(1)
        .stdout_has(RETIRED);
    verify_with(Some(&home), &new, &[]).success();
    till(["key", "list"])
        .home(&home)
        .run()
        .success()
        .stdout_has("0  retired")
        .stdout_has("1  active");
    // The active key cannot be retired.
    till(["key", "retire", "1"])
        .home(&home)
        .run()
        .code(2)
        .stderr_has("is the active key");

    // The key set is on disk: a restart keeps it.
    proxy.terminate();
    proxy.restart(&home);
    let (s, v) = chat(&proxy, &old, "gpt-4o-mini").await;
    assert_eq!(s, 401, "{v}");
    assert!(v.to_string().contains(RETIRED), "{v}");
    assert_eq!(chat(&proxy, &new, "gpt-4o-mini").await.0, 200);
    assert!(proxy.banner().contains("root keys:   0 retired, 1 active"));
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_an_offline_verifier_follows_the_published_key_set_through_a_rotation() {
    let home = Home::new();
    let up = Upstream::start().await;
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let pinned = till(["pubkey"]).home(&home).run().success().out();
    let old = issue(&home);
    till(["keygen", "--rotate"]).home(&home).run().success();
    // Without the admin token from before the rotation, `till reload`
    // cannot authenticate and says what works instead.
    std::fs::remove_file(home.path().join("admin.token.previous")).unwrap();
    till_reload(&home, &proxy)
        .await
        .code(2)
        .stderr_has("SIGHUP");
    sighup(&proxy, 1).await;
    let new = issue(&home);

    // A verifier that only has key 0 cannot check key 1's tokens.
    verify_with(None, &new, &["--public-key", &pinned]).code(1);

    // Saved /.well-known/till-keys, signed by key 0 among others: followed.
    let doc = home.write(
        "till-keys.json",
        &get_text(&proxy, "/.well-known/till-keys").await,
    );
    let doc = doc.to_str().unwrap();
    for t in [&old, &new] {
        verify_with(None, t, &["--public-key", &pinned, "--keys", doc])
            .success()
            .stdout_has("allowed");
    }
    // The same through the revocation feed, which carries the key set.
    let feed = home.write("feed.json", &get_text(&proxy, "/revocations").await);
    let feed = feed.to_str().unwrap();
    verify_with(
        None,
        &new,
        &["--public-key", &pinned, "--revocations", feed],
    )
    .success();

    // A key set from another installation is refused, whatever it says.
    let other = Home::new();
    till(["keygen", "--rotate"]).home(&other).run().success();
    let foreign = till(["pubkey", "--json"])
        .home(&other)
        .run()
        .success()
        .out();
    let foreign = home.write("foreign.json", &foreign);
    verify_with(
        None,
        &new,
        &["--public-key", &pinned, "--keys", foreign.to_str().unwrap()],
    )
    .code(2)
    .stderr_has("not signed by any root key this verifier trusts");

    // Retire key 0: a verifier following the new set refuses its tokens.
    till(["key", "retire", "0"]).home(&home).run().success();
    sighup(&proxy, 2).await;
    let key1 = till(["pubkey", "--all"]).home(&home).run().success().out();
    assert!(
        key1.starts_with("1=ed25519/") && !key1.contains('\n'),
        "{key1}"
    );
    let doc = home.write(
        "till-keys.json",
        &get_text(&proxy, "/.well-known/till-keys").await,
    );
    let doc = doc.to_str().unwrap();
    verify_with(None, &old, &["--public-key", &key1, "--keys", doc])
        .code(1)
        .stdout_has(RETIRED);
    verify_with(None, &new, &["--public-key", &key1, "--keys", doc]).success();
    // Once key 0 is retired it no longer signs the set: trusting only it
    // is not enough to follow (the verifier had to follow during overlap).
    verify_with(None, &new, &["--public-key", &pinned, "--keys", doc])
        .code(2)
        .stderr_has("not signed by any root key this verifier trusts");
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_home_with_only_root_key_works_unchanged() {
    let home = Home::new();
    // A token minted before rotation existed (the library, key 0).
    let before = home.token("openai", None);
    let up = Upstream::start().await;
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    assert_eq!(chat(&proxy, &before, "gpt-4o-mini").await.0, 200);
    let t = issue(&home);
    assert_eq!(key_id(&t), None);
    assert_eq!(chat(&proxy, &t, "gpt-4o-mini").await.0, 200);
    till(["pubkey"])
        .home(&home)
        .run()
        .success()
        .stdout_has(&home.public());
    verify_with(None, &t, &["--public-key", &home.public()]).success();
    // The feed verifies with the single-key API it always did.
    let text = get_text(&proxy, "/revocations").await;
    let feed =
        till::feed::Feed::verify(&text, &home.key().public(), till::store::now_unix(), 60).unwrap();
    assert_eq!(feed.key_id, None);
    assert!(
        !home.path().join("keys").exists(),
        "nothing is written until a rotation"
    );
}

/// The set as `till key list --json` prints it: (id, status, public key).
fn key_list(home_path: &str) -> Vec<(u64, String, String)> {
    let out = till(["key", "list", "--json"])
        .env("TILL_HOME", home_path)
        .run();
    let v: serde_json::Value = serde_json::from_str(&out.success().out()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["id"].as_u64().unwrap(),
                k["status"].as_str().unwrap().to_string(),
                k["public_key"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn regression_a_key_set_change_applies_to_the_set_on_disk_not_to_a_stale_read() {
    use till::token::keyset::KeySet;
    // Two changes read the set before either wrote (two commands at once):
    // each used to write its own view, the last one undoing the other.
    let home = Home::new();
    let mut a = KeySet::load(home.path()).unwrap();
    let mut b = KeySet::load(home.path()).unwrap();
    let (ia, ib) = (a.rotate().unwrap(), b.rotate().unwrap());
    assert_ne!(ia, ib, "two rotations made the same key id");
    let set = KeySet::load(home.path()).expect("the key set stays whole");
    for ks in [&a, &b] {
        assert!(
            set.id_of(&ks.active_key().public()).is_some(),
            "a rotation's new key was lost"
        );
    }
    assert_eq!(set.records().len(), 3);

    // A retirement read before a rotation wrote.
    let mut r = KeySet::load(home.path()).unwrap();
    let mut s = KeySet::load(home.path()).unwrap();
    r.retire(0, None).unwrap();
    s.rotate().unwrap();
    let set = KeySet::load(home.path()).unwrap();
    let now = till::store::now_unix();
    let zero = set.records().iter().find(|k| k.id == 0).unwrap();
    assert!(zero.retired(now), "the retirement of key 0 was undone");
}

#[test]
fn regression_concurrent_rotations_and_a_retirement_keep_the_key_set_whole() {
    // `till key retire 0` racing two `till keygen --rotate`, as separate
    // processes, many times: every command that reports success did what
    // it said, and the set stays readable.
    for round in 0..15 {
        let home = Home::new();
        let path = home.path().to_str().unwrap().to_string();
        till(["keygen", "--rotate"]).home(&home).run().success();
        let commands = [
            vec!["key", "retire", "0"],
            vec!["keygen", "--rotate"],
            vec!["keygen", "--rotate"],
        ];
        let runs: Vec<_> = commands
            .into_iter()
            .map(|args| {
                let cmd = till(args).env("TILL_HOME", &path);
                std::thread::spawn(move || cmd.run())
            })
            .collect();
        let outs: Vec<Out> = runs.into_iter().map(|t| t.join().unwrap()).collect();
        for o in &outs {
            o.success();
        }
        let list = key_list(&path);
        let ids: Vec<u64> = list.iter().map(|k| k.0).collect();
        assert_eq!(ids, [0, 1, 2, 3], "round {round}: {list:?}");
        assert_eq!(
            list[0].1, "retired",
            "round {round}: the retirement was lost"
        );
        for printed in [outs[1].out(), outs[2].out()] {
            assert!(
                list.iter().any(|k| k.2 == printed),
                "round {round}: the printed key {printed} is not in the set {list:?}"
            );
        }
        till(["issue", "--service", "openai", "--ttl", "1h"])
            .home(&home)
            .run()
            .success();
    }
}
