//! Rotating upstream credentials without a restart (issue 11): `SIGHUP`,
//! `POST /admin/reload` and `till reload` re-read till.toml and the
//! credential files, keep the previous configuration when the new one is
//! refused, and let requests in flight finish with what they started with.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use till::token::Scope;

use crate::helpers::*;

const OLD_KEY: &str = "sk-rotation-old-5f3a9c1d";
const NEW_KEY: &str = "sk-rotation-new-7b1e2d4f";

/// A till.toml whose `openai` upstream at `url` reads its credential from
/// `key`; `extra` goes before the upstream (top-level keys or tables).
fn write_config(home: &Home, url: &str, key: &Path, extra: &str) -> PathBuf {
    home.write(
        "till.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\npolicies = {:?}\n{extra}\n\
             [upstreams.openai]\nurl = {url:?}\ncredential = {{ file = {:?} }}\n",
            home.path().to_str().unwrap(),
            policies_dir(),
            key.to_str().unwrap(),
        ),
    )
}

/// Starts a proxy for `up` whose credential file holds [`OLD_KEY`].
fn start(home: &Home, up: &Upstream) -> (Proxy, PathBuf) {
    let key = home.write("openai.key", &format!("{OLD_KEY}\n"));
    let config = write_config(home, &up.url(), &key, "");
    (
        Proxy::start_config(home, &config).expect("proxy starts"),
        key,
    )
}

/// Makes one request through the proxy and returns the credential header
/// the upstream received for it.
async fn credential_seen(proxy: &Proxy, up: &Upstream, token: &str) -> String {
    let before = up.count();
    let (s, v) = chat(proxy, token, "gpt-4o-mini").await;
    assert_eq!(s, 200, "{v}");
    let seen = up.seen();
    assert_eq!(seen.len(), before + 1, "one request reached the upstream");
    seen.last().unwrap().headers["authorization"]
        .to_str()
        .unwrap()
        .to_string()
}

async fn post_reload(proxy: &Proxy, token: Option<&str>) -> (u16, serde_json::Value, String) {
    let mut r = client().post(proxy.url("/admin/reload"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_default();
    (status, v, text)
}

/// `till reload` against `proxy`, run off the test's async workers.
async fn till_reload(home: &Home, proxy: &Proxy, args: &[&str]) -> Out {
    let mut all = vec!["reload".to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    let cmd = till(all)
        .env("TILL_URL", &proxy.url(""))
        .env("TILL_ADMIN_TOKEN", &home.admin());
    tokio::task::spawn_blocking(move || cmd.run())
        .await
        .unwrap()
}

#[track_caller]
fn assert_no_secret(what: &str, text: &str) {
    for k in [OLD_KEY, NEW_KEY] {
        assert!(!text.contains(k), "a credential is in {what}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_sighup_rotates_a_credential_file_without_a_restart() {
    let home = Home::new();
    let up = Upstream::start().await;
    let (proxy, key) = start(&home, &up);
    let token = home.token("openai", None);
    assert_eq!(
        credential_seen(&proxy, &up, &token).await,
        format!("Bearer {OLD_KEY}")
    );

    std::fs::write(&key, format!("{NEW_KEY}\n")).unwrap();
    sighup(&proxy);
    let logs = wait_for_log(&proxy, "configuration reloaded", 1).await;
    assert!(
        logs.contains("SIGHUP") && logs.contains("re-read; changed openai"),
        "{logs}"
    );
    // Same process (SIGHUP no longer ends it), new credential.
    assert_eq!(
        credential_seen(&proxy, &up, &token).await,
        format!("Bearer {NEW_KEY}")
    );
    assert_no_secret("the log", &proxy.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_admin_reload_rotates_a_credential_and_says_what_changed() {
    let home = Home::new();
    let up = Upstream::start().await;
    let (proxy, key) = start(&home, &up);
    let token = home.token("openai", None);
    assert_eq!(
        credential_seen(&proxy, &up, &token).await,
        format!("Bearer {OLD_KEY}")
    );
    std::fs::write(&key, format!("{NEW_KEY}\n")).unwrap();

    // Admin only, and a read-only admin token cannot reload.
    assert_eq!(post_reload(&proxy, None).await.0, 401);
    assert_eq!(post_reload(&proxy, Some(&token)).await.0, 403);
    let read_only = child(
        &home.admin(),
        Scope {
            methods: vec!["GET".into()],
            ..Scope::default()
        },
    );
    assert_eq!(post_reload(&proxy, Some(&read_only)).await.0, 403);
    assert_eq!(
        credential_seen(&proxy, &up, &token).await,
        format!("Bearer {OLD_KEY}"),
        "a refused reload request changes nothing"
    );

    let out = till_reload(&home, &proxy, &["--json"]).await;
    out.success();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["reloaded"], true, "{v}");
    assert_eq!(v["changed"], serde_json::json!(["openai"]), "{v}");
    assert_eq!(v["restart_needed"], serde_json::json!([]), "{v}");
    assert_no_secret("the answer", &out.stdout);
    assert_eq!(
        credential_seen(&proxy, &up, &token).await,
        format!("Bearer {NEW_KEY}")
    );

    // A new upstream is served at once; a changed limit needs a restart,
    // and both the answer and the log say so.
    let other = Upstream::start().await;
    let other_key = home.write("other.key", "other-secret-value\n");
    let config = write_config(
        &home,
        &up.url(),
        &key,
        &format!(
            "[limits]\nmax_connections = 77\n[upstreams.other]\nurl = {:?}\ncredential = {{ file = {:?} }}\n",
            other.url(),
            other_key.to_str().unwrap()
        ),
    );
    assert_eq!(config, proxy.config);
    let (s, v, _) = post_reload(&proxy, Some(&home.admin())).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["added"], serde_json::json!(["other"]), "{v}");
    assert_eq!(v["changed"], serde_json::json!([]), "{v}");
    assert_eq!(
        v["restart_needed"],
        serde_json::json!(["limits.max_connections"]),
        "{v}"
    );
    wait_for_log(
        &proxy,
        "take effect only at restart: limits.max_connections",
        1,
    )
    .await;
    let r = client()
        .get(proxy.url("/other/v1/models"))
        .bearer_auth(home.token("other", None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        other.seen()[0].headers["authorization"],
        "Bearer other-secret-value"
    );

    // The text form, with nothing changed since: the limit still waits for
    // a restart.
    let out = till_reload(&home, &proxy, &[]).await;
    out.success()
        .stdout_has("reloaded: no upstream changed")
        .stderr_has("limits.max_connections");
    assert_no_secret("the log", &proxy.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_an_invalid_config_keeps_the_previous_credential() {
    let home = Home::new();
    let up = Upstream::start().await;
    let (proxy, key) = start(&home, &up);
    let token = home.token("openai", None);
    let good = std::fs::read_to_string(&proxy.config).unwrap();
    assert_eq!(
        credential_seen(&proxy, &up, &token).await,
        format!("Bearer {OLD_KEY}")
    );
    // The new key is in place, but the file around it is broken: nothing
    // of it may be taken, not even the readable credential.
    std::fs::write(&key, format!("{NEW_KEY}\n")).unwrap();
    let file = proxy.config.display().to_string();
    for (broken, says) in [
        (format!("{good}\n[upstreams.openai\n"), "[upstreams.openai"),
        (
            good.replace("url = \"http://", "url = \"ftp://"),
            "upstreams.openai.url",
        ),
        (
            format!(
                "{good}\n[upstreams.twin]\nurl = \"http://127.0.0.1:1\"\ncredential = {{ env = \"TILL_SURELY_UNSET_VAR\" }}\n"
            ),
            "TILL_SURELY_UNSET_VAR",
        ),
    ] {
        std::fs::write(&proxy.config, &broken).unwrap();
        let (s, v, text) = post_reload(&proxy, Some(&home.admin())).await;
        assert_eq!(s, 422, "{text}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.starts_with(&file)
                && msg.contains(says)
                && msg.ends_with("still serving the previous configuration"),
            "{msg}"
        );
        assert_eq!(v["reloaded"], false);
        assert_no_secret("the answer", &text);
        assert_eq!(
            credential_seen(&proxy, &up, &token).await,
            format!("Bearer {OLD_KEY}")
        );
    }
    wait_for_log(
        &proxy,
        "configuration reload refused, still serving the previous configuration",
        3,
    )
    .await;
    // `till reload` fails with the reason.
    let out = till_reload(&home, &proxy, &[]).await;
    out.code(2)
        .one_line_error()
        .stderr_has("still serving the previous configuration");

    // The file is fixed but the credential file is gone: by signal too,
    // the previous credential stays.
    std::fs::write(&proxy.config, &good).unwrap();
    std::fs::remove_file(&key).unwrap();
    sighup(&proxy);
    let logs = wait_for_log(&proxy, "configuration reload refused", 5).await;
    assert!(
        logs.contains("upstreams.openai.credential") && logs.contains("openai.key"),
        "{logs}"
    );
    assert_eq!(
        credential_seen(&proxy, &up, &token).await,
        format!("Bearer {OLD_KEY}")
    );

    // Once everything is right, the reload goes through.
    std::fs::write(&key, format!("{NEW_KEY}\n")).unwrap();
    let (s, v, _) = post_reload(&proxy, Some(&home.admin())).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        credential_seen(&proxy, &up, &token).await,
        format!("Bearer {NEW_KEY}")
    );
    assert_no_secret("the log", &proxy.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_an_in_flight_stream_finishes_with_its_credential_across_a_reload() {
    let home = Home::new();
    let old_up = Upstream::start().await;
    let new_up = Upstream::start().await;
    let (proxy, key) = start(&home, &old_up);
    let token = home.token("openai", None);
    let r = client()
        .post(proxy.url("/openai/v1/chat/completions"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(r#"{"model":"m","stream":true,"gated":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("first chunk")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("one"));

    // While the stream is open: a new key, and the upstream moved.
    std::fs::write(&key, format!("{NEW_KEY}\n")).unwrap();
    write_config(&home, &new_up.url(), &key, "");
    let (s, v, _) = post_reload(&proxy, Some(&home.admin())).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        credential_seen(&proxy, &new_up, &token).await,
        format!("Bearer {NEW_KEY}")
    );

    old_up.state.gate.notify_one();
    let mut rest = Vec::new();
    while let Some(c) = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream goes on after the reload")
    {
        rest.extend_from_slice(&c.expect("the stream is not cut"));
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("two") && rest.contains("[DONE]"), "{rest}");
    let seen = old_up.seen();
    assert_eq!(
        seen.len(),
        1,
        "nothing after the reload went to the old URL"
    );
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {OLD_KEY}")
    );
    assert_no_secret("the log", &proxy.logs());
}

/// `till up` builds part of its configuration from the command line and the
/// environment; a reload must apply those again, not fall back to the bare
/// file (which would drop the upstream `OPENAI_API_KEY` added).
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_under_till_up_keeps_the_upstreams_from_flags_and_environment() {
    let up = Upstream::start().await;
    let other = Upstream::start().await;
    let home = Home::empty();
    let cfg = home.path().join("till.toml");
    let flag = format!("openai={}", up.url());
    let proxy = Proxy::spawn_env(
        &home,
        &["up", "--listen", "127.0.0.1:0", "--upstream", &flag],
        &cfg,
        &[("OPENAI_API_KEY", OLD_KEY)],
    )
    .expect("till up starts");
    let token = home.token("openai", None);
    assert_eq!(
        credential_seen(&proxy, &up, &token).await,
        format!("Bearer {OLD_KEY}")
    );
    // An upstream declared in the file meanwhile is added; the one from
    // the environment and --upstream stays as it was.
    let key = home.write("other.key", "other-secret-value\n");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "{text}\n[upstreams.other]\nurl = {:?}\ncredential = {{ file = {:?} }}\n",
            other.url(),
            key.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = till(["reload", "--json"])
        .home(&home)
        .env("TILL_URL", &proxy.url(""));
    let out = tokio::task::spawn_blocking(move || out.run())
        .await
        .unwrap();
    out.success();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        v["upstreams"],
        serde_json::json!(["openai", "other"]),
        "{v}"
    );
    assert_eq!(v["added"], serde_json::json!(["other"]), "{v}");
    assert_eq!(v["changed"], serde_json::json!([]), "{v}");
    assert_eq!(v["removed"], serde_json::json!([]), "{v}");
    assert_eq!(
        credential_seen(&proxy, &up, &token).await,
        format!("Bearer {OLD_KEY}")
    );
    assert_no_secret("the log", &proxy.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_credential_file_that_is_not_a_small_regular_file_is_refused_by_a_reload() {
    let home = Home::new();
    let up = Upstream::start().await;
    let (proxy, key) = start(&home, &up);
    let token = home.token("openai", None);
    let admin = home.admin();
    assert_eq!(
        credential_seen(&proxy, &up, &token).await,
        format!("Bearer {OLD_KEY}")
    );
    // Far larger than any key; /dev/zero is endless (it was read until
    // memory ran out); a FIFO was waited on forever, hanging the reload
    // and `till reload`.
    std::fs::remove_file(&key).unwrap();
    std::fs::write(&key, vec![b'k'; 1 << 20]).unwrap();
    let (s, _, text) = post_reload(&proxy, Some(&admin)).await;
    assert_eq!(s, 422, "{text}");
    assert!(text.contains("is larger than 65536 bytes"), "{text}");
    std::fs::remove_file(&key).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &key).unwrap();
    let (s, _, text) = post_reload(&proxy, Some(&admin)).await;
    assert_eq!(s, 422, "{text}");
    assert!(
        text.contains("not a regular file (a character device)"),
        "{text}"
    );
    std::fs::remove_file(&key).unwrap();
    let fifo = std::process::Command::new("mkfifo")
        .arg(&key)
        .status()
        .unwrap();
    assert!(fifo.success());
    let (s, _, text) = post_reload(&proxy, Some(&admin)).await;
    assert_eq!(s, 422, "{text}");
    assert!(text.contains("not a regular file (a FIFO)"), "{text}");
    // The previous credential goes on; a good file is taken again.
    assert_eq!(
        credential_seen(&proxy, &up, &token).await,
        format!("Bearer {OLD_KEY}")
    );
    std::fs::remove_file(&key).unwrap();
    std::fs::write(&key, format!("{NEW_KEY}\n")).unwrap();
    let (s, _, text) = post_reload(&proxy, Some(&admin)).await;
    assert_eq!(s, 200, "{text}");
    assert_eq!(
        credential_seen(&proxy, &up, &token).await,
        format!("Bearer {NEW_KEY}")
    );
}

/// Policy files edited, then a reload (red team, wave 2, fourth pass): the
/// answer was `"reloaded": true, "restart_needed": []` while the policies
/// the proxy started with stayed in force, so an operator adding a `deny`
/// believed it applied. Policies take effect at restart; a reload that
/// finds their files changed names `policies` in `restart_needed`.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_reload_names_edited_policy_files_as_needing_a_restart() {
    let home = Home::new();
    let up = Upstream::start().await;
    let policies = home.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("default.datalog"),
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/policies/default.datalog"
        )),
    )
    .unwrap();
    let key = home.write("openai.key", &format!("{OLD_KEY}\n"));
    let config = home.write(
        "till.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\npolicies = {:?}\n\
             [upstreams.openai]\nurl = {:?}\ncredential = {{ file = {:?} }}\n",
            home.path().to_str().unwrap(),
            policies.to_str().unwrap(),
            up.url(),
            key.to_str().unwrap(),
        ),
    );
    let proxy = Proxy::start_config(&home, &config).expect("proxy starts");
    let token = home.token("openai", None);

    // Nothing changed, or only a comment: nothing to restart for.
    let out = till_reload(&home, &proxy, &["--json"]).await;
    out.success();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["restart_needed"], serde_json::json!([]), "{v}");
    std::fs::write(policies.join("note.datalog"), "// only a comment\n").unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&till_reload(&home, &proxy, &["--json"]).await.stdout).unwrap();
    assert_eq!(v["restart_needed"], serde_json::json!([]), "{v}");

    std::fs::write(
        policies.join("a_deny.datalog"),
        "deny if path($p), $p.starts_with(\"/v1/files\");\n",
    )
    .unwrap();
    let out = till_reload(&home, &proxy, &["--json"]).await;
    out.success();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["restart_needed"], serde_json::json!(["policies"]), "{v}");
    till_reload(&home, &proxy, &[])
        .await
        .success()
        .stderr_has("policies");
    wait_for_log(&proxy, "take effect only at restart: policies", 1).await;
    // As the answer says: still the policies of the start.
    let r = client()
        .get(proxy.url("/openai/v1/files"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}
