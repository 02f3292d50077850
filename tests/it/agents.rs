//! Agents that stop cleanly (issue 11): every error says whether retrying
//! can help, in the error shape of the upstream's own API, in plain words;
//! and the official SDKs, when installed, act on it.

use std::time::Duration;

use till::token::Scope;

use crate::helpers::*;

/// Sends `req` and returns (status, x-should-retry, retry-after, body).
async fn answer(
    req: reqwest::RequestBuilder,
) -> (u16, Option<String>, Option<String>, serde_json::Value) {
    let r = req.send().await.unwrap();
    let header = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_string());
    let (retry, after) = (header("x-should-retry"), header("retry-after"));
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    (status, retry, after, body)
}

/// POST a minimal call to `service` the way its SDK sends it.
fn call(proxy: &Proxy, service: &str, token: &str) -> reqwest::RequestBuilder {
    let c = client();
    match service {
        "anthropic" | "claude" => c
            .post(proxy.url(&format!("/{service}/v1/messages")))
            .header("x-api-key", token)
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(r#"{"model":"claude-x","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#),
        _ => c
            .post(proxy.url(&format!("/{service}/v1/chat/completions")))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#),
    }
}

/// The message of an error body of either shape.
fn message(body: &serde_json::Value) -> &str {
    body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message: {body}"))
}

/// Asserts the body is in the shape of `api` with the given type (and, for
/// the OpenAI shape, code).
#[track_caller]
fn assert_shape(api: &str, body: &serde_json::Value, ty: &str, code: &str) {
    match api {
        "anthropic" => {
            assert_eq!(body["type"], "error", "{body}");
            assert_eq!(body["error"]["type"], ty, "{body}");
            assert!(body["error"].get("code").is_none(), "{body}");
        }
        _ => {
            assert!(body.get("type").is_none(), "{body}");
            assert_eq!(body["error"]["type"], ty, "{body}");
            assert_eq!(body["error"]["code"], code, "{body}");
        }
    }
    assert!(message(body).len() > 10, "{body}");
}

/// Regression (issue 11): a used-up token answered 429 `rate_limit_error`
/// with nothing saying it was final, so the OpenAI and Anthropic SDKs
/// retried it twice per call (~1.2 s lost, three denials feeding the
/// denial-burst alert). Every permanent denial now says
/// `x-should-retry: false`, has no `Retry-After`, names the key by its label
/// in plain words, and comes in the upstream's own error shape.
#[tokio::test(flavor = "multi_thread")]
async fn regression_permanent_denials_tell_sdks_not_to_retry() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up), anthropic(&up)], "");
    for (service, exhausted_type) in [
        ("openai", "insufficient_quota"),
        ("anthropic", "rate_limit_error"),
    ] {
        let parent = home.issue(Scope {
            services: vec![service.into()],
            label: Some("team".into()),
            ..Scope::default()
        });
        let kid = child(
            &parent,
            Scope {
                max_uses: Some(1),
                label: Some("sub-1".into()),
                ..Scope::default()
            },
        );
        let (s, retry, _, body) = answer(call(&proxy, service, &kid)).await;
        assert_eq!(s, 200, "{service}: {body}");
        assert_eq!(
            retry, None,
            "{service}: an allowed answer has no retry advice"
        );

        // Used up.
        let (s, retry, after, body) = answer(call(&proxy, service, &kid)).await;
        assert_eq!(s, 429, "{service}: {body}");
        assert_eq!(retry.as_deref(), Some("false"), "{service}: {body}");
        assert_eq!(after, None, "{service}: waiting does not help");
        assert_shape(service, &body, exhausted_type, "activations_exhausted");
        assert_eq!(
            message(&body),
            "this key (label \"sub-1\") has used its one use; ask whoever gave it to you for a new one"
        );

        // Expired.
        let expired = child(
            &parent,
            Scope {
                expires: Some(std::time::SystemTime::now() - Duration::from_secs(60)),
                label: Some("late".into()),
                ..Scope::default()
            },
        );
        let (s, retry, after, body) = answer(call(&proxy, service, &expired)).await;
        assert_eq!(
            (s, retry.as_deref(), after),
            (403, Some("false"), None),
            "{body}"
        );
        assert_shape(service, &body, "permission_error", "token_expired");
        assert!(
            message(&body).starts_with("this key (label \"late\") expired at "),
            "{body}"
        );

        // Revoked: the parent, so the child names where it came from.
        let doomed = home.issue(Scope {
            services: vec![service.into()],
            label: Some("doomed".into()),
            ..Scope::default()
        });
        let doomed_kid = child(&doomed, limit(5));
        till(["revoke", &doomed, "--url", &proxy.url("")])
            .home(&home)
            .env("TILL_ADMIN_TOKEN", &home.admin())
            .run()
            .success();
        let (s, retry, after, body) = answer(call(&proxy, service, &doomed_kid)).await;
        assert_eq!(
            (s, retry.as_deref(), after),
            (403, Some("false"), None),
            "{body}"
        );
        assert_shape(service, &body, "permission_error", "token_revoked");
        assert!(
            message(&body).starts_with(
                "the key this one was made from (block 0, label \"doomed\") was revoked"
            ),
            "{body}"
        );

        // Out of scope: a path outside the child's prefix.
        let narrow = child(
            &parent,
            Scope {
                paths: vec!["/v1/models".into()],
                ..Scope::default()
            },
        );
        let (s, retry, after, body) = answer(call(&proxy, service, &narrow)).await;
        assert_eq!(
            (s, retry.as_deref(), after),
            (403, Some("false"), None),
            "{body}"
        );
        assert_shape(service, &body, "permission_error", "out_of_scope");
        assert!(
            message(&body).contains("this key only allows paths starting with \"/v1/models\""),
            "{body}"
        );

        // No token, a garbage token.
        for token in ["", "garbage"] {
            let (s, retry, after, body) = answer(call(&proxy, service, token)).await;
            assert_eq!(
                (s, retry.as_deref(), after),
                (401, Some("false"), None),
                "{body}"
            );
            let code = if token.is_empty() {
                "missing_token"
            } else {
                "invalid_token"
            };
            assert_shape(service, &body, "authentication_error", code);
        }
    }
    // A service that does not exist: no upstream to take the shape of.
    let t = home.token("openai", None);
    let (s, retry, _, body) = answer(call(&proxy, "nope", &t)).await;
    assert_eq!((s, retry.as_deref()), (404, Some("false")), "{body}");
    assert_shape("openai", &body, "not_found_error", "unknown_service");
    assert_eq!(up.count(), 2, "only the two allowed calls were forwarded");
}

/// Where waiting helps (another attempt with the same `Idempotency-Key`
/// still in flight, the counter store down), the answer says so with
/// `x-should-retry: true` and `Retry-After`.
#[tokio::test(flavor = "multi_thread")]
async fn answers_where_waiting_helps_carry_retry_after() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(
        &home,
        &[openai(&up), anthropic(&up)],
        "[limits]\nidle_timeout_secs = 3\n",
    );
    let token = home.token("openai", None);
    let hang = || {
        client()
            .get(proxy.url("/openai/hang"))
            .bearer_auth(&token)
            .header("idempotency-key", "k1")
    };
    let first = tokio::spawn(hang().send());
    for _ in 0..200 {
        if up.count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(up.count(), 1, "the first attempt reached the upstream");
    let (s, retry, after, body) = answer(hang()).await;
    assert_eq!(s, 409, "{body}");
    assert_eq!(retry.as_deref(), Some("true"), "{body}");
    assert_eq!(after.as_deref(), Some("1"), "{body}");
    assert_shape(
        "openai",
        &body,
        "invalid_request_error",
        "idempotency_conflict",
    );
    let _ = first.await;

    // The store fails for real (its file deleted): 503, retry later.
    let t = home.token("anthropic", Some(5));
    std::fs::remove_file(home.path().join(till::store::embedded::STORE_FILE)).unwrap();
    let (s, retry, after, body) = answer(call(&proxy, "anthropic", &t)).await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(retry.as_deref(), Some("true"), "{body}");
    assert!(
        after
            .as_deref()
            .and_then(|a| a.parse::<u64>().ok())
            .is_some(),
        "{after:?}"
    );
    assert_shape("anthropic", &body, "api_error", "");
}

/// Regression (issue 11): a provider key pasted where the Till token goes
/// got "invalid Till token: token is not valid URL-safe base64 ...". It now
/// gets a 401 that names the mistake, and the key is never echoed or logged.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_provider_key_sent_by_mistake_gets_a_clear_401() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up), anthropic(&up)], "");
    let keys = [
        ("openai", "sk-proj-AbCdEf0123456789leakedkey"),
        ("openai", "sk-AbCdEf0123456789legacykey"),
        ("anthropic", "sk-ant-api03-AbCdEf0123456789leaked"),
    ];
    for (service, key) in keys {
        let (s, retry, _, body) = answer(call(&proxy, service, key)).await;
        assert_eq!((s, retry.as_deref()), (401, Some("false")), "{body}");
        assert_shape(service, &body, "authentication_error", "invalid_token");
        assert_eq!(
            message(&body),
            "this looks like a provider API key, not a Till token; ask your operator for a Till token"
        );
        assert!(!body.to_string().contains(&key[..12]), "{body}");
    }
    assert_eq!(up.count(), 0);
    let logs = proxy.logs();
    for (_, key) in keys {
        assert!(!logs.contains(&key[..12]), "key in the log:\n{logs}");
    }
}

/// `api` on an upstream picks the error shape; without it the official
/// hosts and the names `openai` / `anthropic` decide, and anything else
/// gets the plain (OpenAI-shaped) body.
#[tokio::test(flavor = "multi_thread")]
async fn errors_take_the_shape_of_the_upstreams_api() {
    let up = Upstream::start().await;
    let home = Home::new();
    let extra = format!(
        "[upstreams.claude]\nurl = {u:?}\napi = \"anthropic\"\n\
         [upstreams.internal]\nurl = {u:?}\n\
         [upstreams.gpt]\nurl = {u:?}\napi = \"openai\"\n",
        u = up.url()
    );
    let proxy = Proxy::start(&home, &[openai(&up), anthropic(&up)], &extra);
    for (service, api) in [
        ("openai", "openai"),
        ("anthropic", "anthropic"),
        ("claude", "anthropic"),
        ("internal", "plain"),
        ("gpt", "openai"),
    ] {
        // A token for another service: out of scope.
        let t = home.token("elsewhere", None);
        let (s, _, _, body) = answer(call(&proxy, service, &t)).await;
        assert_eq!(s, 403, "{service}: {body}");
        assert_shape(api, &body, "permission_error", "out_of_scope");
        // Used up: the type tells agent frameworks it is final.
        let t = home.token(service, Some(0));
        let (s, _, _, body) = answer(call(&proxy, service, &t)).await;
        assert_eq!(s, 429, "{service}: {body}");
        let ty = match api {
            "anthropic" => "rate_limit_error",
            _ => "insufficient_quota",
        };
        assert_shape(api, &body, ty, "activations_exhausted");
    }
    assert_eq!(up.count(), 0);

    // An unknown kind is a configuration error naming the key.
    let cfg = home.write(
        "bad-api.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n[upstreams.x]\nurl = \"http://127.0.0.1:1\"\napi = \"gemini\"\n",
            home.path().to_str().unwrap()
        ),
    );
    till(["serve", "--config", cfg.to_str().unwrap()])
        .run()
        .code(2)
        .stderr_has("bad-api.toml")
        .stderr_has("api = \"gemini\"")
        .stderr_has("expected one of `openai`, `anthropic`, `plain`");
}

/// The official Python SDKs against the proxy, when they are installed
/// (`.ci/run` installs pinned versions): a used-up key raises on the first
/// denial, with no retries, as each SDK's own exception with Till's words.
const PY_SDKS: &str = r#"
import json, sys
import openai, anthropic
base, oa_token, an_token, scoped = sys.argv[1:5]
out = {}
oa = openai.OpenAI(base_url=base + "/openai/v1", api_key=oa_token)
oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
try:
    oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    out["openai"] = "no error"
except openai.APIStatusError as e:
    out["openai"] = {"class": type(e).__name__, "status": e.status_code, "type": e.type, "code": e.code, "text": str(e)}
an = anthropic.Anthropic(base_url=base + "/anthropic", api_key=an_token)
an.messages.create(model="claude-x", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
try:
    an.messages.create(model="claude-x", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    out["anthropic"] = "no error"
except anthropic.APIStatusError as e:
    out["anthropic"] = {"class": type(e).__name__, "status": e.status_code, "type": e.body["error"]["type"], "text": str(e)}
try:
    anthropic.Anthropic(base_url=base + "/anthropic", api_key=scoped).models.list()
    out["scope"] = "no error"
except anthropic.APIStatusError as e:
    out["scope"] = {"class": type(e).__name__, "text": str(e)}
try:
    openai.OpenAI(base_url=base + "/openai/v1", api_key="sk-proj-notatilltoken0123").models.list()
    out["provider_key"] = "no error"
except openai.APIStatusError as e:
    out["provider_key"] = {"class": type(e).__name__, "text": str(e)}
print(json.dumps(out))
"#;

fn sdks_installed() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import openai, anthropic"])
        .output()
        .is_ok_and(|o| o.status.success());
    let install = "python3 -m pip install openai==3.57.0 anthropic==2.14.0";
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("the official SDKs are required in CI: {install}");
        }
        eprintln!(
            "\n******** SKIPPED: the openai and anthropic SDKs are not installed ({install}) ********\n"
        );
    }
    ok
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_the_official_sdks_stop_at_the_first_permanent_denial() {
    if !sdks_installed() {
        return;
    }
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up), anthropic(&up)], "");
    let labelled = |service: &str| {
        home.issue(Scope {
            services: vec![service.into()],
            max_uses: Some(1),
            label: Some(format!("{service}-agent")),
            ..Scope::default()
        })
    };
    let scoped = home.issue(Scope {
        services: vec!["anthropic".into()],
        paths: vec!["/v1/messages".into()],
        ..Scope::default()
    });
    let base = proxy.url("");
    let (oa, an) = (labelled("openai"), labelled("anthropic"));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", PY_SDKS, &base, &oa, &an, &scoped])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["openai"]["class"], "RateLimitError", "{v}");
    assert_eq!(v["openai"]["type"], "insufficient_quota", "{v}");
    assert_eq!(v["openai"]["code"], "activations_exhausted", "{v}");
    assert!(
        v["openai"]["text"]
            .as_str()
            .unwrap()
            .contains("this key (label \"openai-agent\") has used its one use"),
        "{v}"
    );
    assert_eq!(v["anthropic"]["class"], "RateLimitError", "{v}");
    assert_eq!(v["anthropic"]["type"], "rate_limit_error", "{v}");
    assert!(
        v["anthropic"]["text"]
            .as_str()
            .unwrap()
            .contains("this key (label \"anthropic-agent\") has used its one use"),
        "{v}"
    );
    assert_eq!(v["scope"]["class"], "PermissionDeniedError", "{v}");
    assert!(
        v["scope"]["text"]
            .as_str()
            .unwrap()
            .contains("GET /v1/models on service"),
        "{v}"
    );
    assert_eq!(v["provider_key"]["class"], "AuthenticationError", "{v}");
    assert!(
        v["provider_key"]["text"]
            .as_str()
            .unwrap()
            .contains("this looks like a provider API key"),
        "{v}"
    );
    // One denial per call: the SDKs did not retry (they used to send three).
    let metrics = client()
        .get(proxy.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for service in ["openai", "anthropic"] {
        let line = format!(
            "till_requests_total{{service=\"{service}\",decision=\"deny\",code=\"activations_exhausted\"}} 1"
        );
        assert!(metrics.contains(&line), "missing {line:?} in:\n{metrics}");
    }
    assert_eq!(up.count(), 2, "one allowed call per SDK");
}
