//! Monitoring: audit log, metrics, alerts to a local webhook receiver, and
//! the usage view.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use till::token::Scope;

use crate::helpers::*;

/// One delivery as received: its `Till-Signature` header and body.
type Delivery = (Option<String>, String);

/// A webhook receiver that records what it got.
#[derive(Clone, Default)]
pub struct Receiver {
    got: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Each delivery's `Till-Signature` header and body, as received.
    raw: Arc<Mutex<Vec<Delivery>>>,
}

impl Receiver {
    pub async fn start() -> (Receiver, String) {
        let r = Receiver::default();
        let app = Router::new()
            .fallback(
                |State(r): State<Receiver>, headers: axum::http::HeaderMap, body: String| async move {
                    let sig = headers
                        .get("till-signature")
                        .map(|v| v.to_str().unwrap_or("").to_string());
                    r.raw.lock().unwrap().push((sig, body.clone()));
                    r.got
                        .lock()
                        .unwrap()
                        .push(serde_json::from_str(&body).unwrap_or(serde_json::Value::Null));
                    "ok"
                },
            )
            .with_state(r.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        (r, url)
    }
    pub fn kinds(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|v| v["kind"].as_str().unwrap_or("").to_string())
            .collect()
    }
    /// Waits until `pred` holds on what was received (delivery is async).
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&[serde_json::Value]) -> bool) {
        for _ in 0..100 {
            if pred(&self.got.lock().unwrap()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("receiver never got {what}: {:?}", self.got.lock().unwrap());
    }
}

async fn admin_get(proxy: &Proxy, home: &Home, path: &str) -> serde_json::Value {
    let r = client()
        .get(proxy.url(path))
        .bearer_auth(home.admin())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    serde_json::from_str(&r.text().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_log_has_one_line_per_decision_and_no_secrets() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        max_uses: Some(2),
        label: Some("audit-bot".into()),
        ..Scope::default()
    });
    let kid = child(&token, limit(1));
    assert_eq!(chat(&proxy, &kid, "gpt-4o-mini").await.0, 200);
    assert_eq!(chat(&proxy, &kid, "gpt-4o-mini").await.0, 429);
    assert_eq!(chat(&proxy, "garbage", "m").await.0, 401);
    let path = home.path().join("audit.jsonl");
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect();
        if lines.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lines.len(), 3, "{lines:?}");
    let text = lines.join("\n");
    assert!(!text.contains(&kid[..30]), "token in the audit log");
    assert!(!text.contains(OPENAI_SECRET), "credential in the audit log");
    let ok: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(ok["decision"], "allow");
    assert_eq!(ok["service"], "openai");
    assert_eq!(ok["method"], "POST");
    assert_eq!(ok["path"], "/v1/chat/completions");
    assert_eq!(ok["model"], "gpt-4o-mini");
    assert_eq!(ok["upstream_status"], 200);
    assert_eq!(ok["labels"][0], "audit-bot");
    let ids = till::token::RawToken::parse(&kid).unwrap().revocation_ids();
    assert_eq!(ok["family"], ids[0].as_str());
    assert_eq!(ok["blocks"][0]["uses"], 1);
    assert_eq!(ok["blocks"][0]["limit"], 2);
    assert_eq!(ok["blocks"][1]["id"], ids[1].as_str());
    assert_eq!(ok["blocks"][1]["limit"], 1);
    assert!(ok["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(ok["request_id"].as_str().unwrap().len() >= 8);
    let denied: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["code"], "activations_exhausted");
    assert_eq!(denied["status"], 429);
    assert!(
        denied["reason"]
            .as_str()
            .unwrap()
            .contains("this key has used its one use"),
        "{denied}"
    );
    assert_eq!(denied["blocks"][1]["uses"], 1, "counts after the rollback");
    let bad: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    assert_eq!(bad["code"], "invalid_token");
    assert!(bad["family"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_exposed_in_prometheus_format() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.token("openai", Some(1));
    assert_eq!(chat(&proxy, &token, "m").await.0, 200);
    assert_eq!(chat(&proxy, &token, "m").await.0, 429);
    // Names a stranger makes up do not become label values (one series
    // each, kept forever).
    for i in 0..3 {
        let r = client()
            .get(proxy.url(&format!("/made-up-{i}/x")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    let r = client().get(proxy.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    for needle in [
        "till_requests_total{service=\"openai\",decision=\"allow\",code=\"ok\"} 1",
        "till_requests_total{service=\"openai\",decision=\"deny\",code=\"activations_exhausted\"} 1",
        "till_verify_cache_hits_total 1",
        "till_verify_cache_misses_total 1",
        "till_request_seconds_count",
        "till_verify_seconds_bucket",
        "till_reserve_seconds_count",
        "till_store_commit_seconds_count",
        "till_store_commit_batch_size_bucket",
        "till_revocations 0",
        "till_audit_dropped_total 0",
        "till_alerts_dropped_total 0",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(!text.contains("made-up"), "{text}");
    assert!(
        text.contains(
            "till_requests_total{service=\"\",decision=\"deny\",code=\"unknown_service\"} 3"
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn alerts_fire_once_per_threshold_on_revoked_and_expired_use_and_bursts() {
    let up = Upstream::start().await;
    let (json_hook, json_url) = Receiver::start().await;
    let (slack_hook, slack_url) = Receiver::start().await;
    let home = Home::new();
    let extra = format!(
        "[alerts]\nthresholds = [0.8, 1.0]\ndenial_burst_count = 3\ndenial_burst_window_secs = 60\n\
         [[alerts.webhooks]]\nurl = {json_url:?}\n[[alerts.webhooks]]\nurl = {slack_url:?}\nformat = \"slack\"\n"
    );
    let proxy = Proxy::start(&home, &[openai(&up)], &extra);
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        max_uses: Some(5),
        label: Some("alert-bot".into()),
        ..Scope::default()
    });
    for _ in 0..5 {
        assert_eq!(chat(&proxy, &token, "m").await.0, 200);
    }
    json_hook
        .wait_for("two threshold alerts", |g| g.len() >= 2)
        .await;
    // Denials after the limit: no new threshold alert, but a burst (3).
    for _ in 0..3 {
        assert_eq!(chat(&proxy, &token, "m").await.0, 429);
    }
    json_hook.wait_for("a burst", |g| g.len() >= 3).await;
    let got = json_hook.got.lock().unwrap().clone();
    let thresholds: Vec<_> = got
        .iter()
        .filter(|a| a["kind"] == "usage_threshold")
        .collect();
    assert_eq!(thresholds.len(), 2, "{got:?}");
    assert_eq!(thresholds[0]["details"]["uses"], 4);
    assert_eq!(thresholds[1]["details"]["uses"], 5);
    assert_eq!(thresholds[0]["labels"][0], "alert-bot");
    assert!(thresholds[1]["message"].as_str().unwrap().contains("100%"));
    assert_eq!(
        json_hook
            .kinds()
            .iter()
            .filter(|k| *k == "denial_burst")
            .count(),
        1
    );

    // A revoked token being used: the signal of a leaked key.
    let leaked = home.token("openai", None);
    assert_eq!(chat(&proxy, &leaked, "m").await.0, 200);
    let url = proxy.url("");
    till(["revoke", &leaked, "--url", &url])
        .home(&home)
        .env("TILL_ADMIN_TOKEN", &home.admin())
        .run()
        .success();
    assert_eq!(chat(&proxy, &leaked, "m").await.0, 403);
    json_hook
        .wait_for("revoked_token_used", |g| {
            g.iter().any(|a| a["kind"] == "revoked_token_used")
        })
        .await;
    let got = json_hook.got.lock().unwrap().clone();
    let rev = got
        .iter()
        .find(|a| a["kind"] == "revoked_token_used")
        .unwrap();
    assert!(
        rev["details"]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{rev}"
    );

    // An expired token still being tried.
    let expired = home.issue(Scope {
        services: vec!["openai".into()],
        expires: Some(std::time::SystemTime::now() - Duration::from_secs(3600)),
        ..Scope::default()
    });
    assert_eq!(chat(&proxy, &expired, "m").await.0, 403);
    json_hook
        .wait_for("expired_token_used", |g| {
            g.iter().any(|a| a["kind"] == "expired_token_used")
        })
        .await;

    // The Slack-compatible receiver got the same alerts as text.
    slack_hook.wait_for("slack text", |g| g.len() >= 5).await;
    assert!(
        slack_hook
            .got
            .lock()
            .unwrap()
            .iter()
            .all(|a| a["text"].as_str().is_some_and(|t| t.contains("Till")))
    );

    // The admin API keeps the alert history.
    let hist = admin_get(&proxy, &home, "/admin/alerts").await;
    assert!(hist["alerts"].as_array().unwrap().len() >= 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_webhook_never_slows_requests_and_is_counted() {
    let up = Upstream::start().await;
    let home = Home::new();
    let (_held, dead) = dead_port();
    let dead = format!("{dead}/hook");
    let extra = format!("[alerts]\nthresholds = [0.5]\n[[alerts.webhooks]]\nurl = {dead:?}\n");
    let proxy = Proxy::start(&home, &[openai(&up)], &extra);
    let token = home.token("openai", Some(2));
    assert_eq!(chat(&proxy, &token, "m").await.0, 200);
    assert_eq!(chat(&proxy, &token, "m").await.0, 200);
    let mut text = String::new();
    for _ in 0..200 {
        text = client()
            .get(proxy.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("till_alerts_failed_total{kind=\"usage_threshold\"} 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        text.contains("till_alerts_failed_total{kind=\"usage_threshold\"} 1"),
        "failed alert not counted:\n{text}"
    );

    // A receiver that accepts and never answers: requests do not wait for it.
    let home = Home::new();
    let hang = format!("{}/hang", up.url());
    let extra =
        format!("[alerts]\nthresholds = [0.25, 0.5, 0.75]\n[[alerts.webhooks]]\nurl = {hang:?}\n");
    let proxy = Proxy::start(&home, &[openai(&up)], &extra);
    let token = home.token("openai", Some(4));
    for _ in 0..4 {
        let (s, _) = tokio::time::timeout(Duration::from_secs(3), chat(&proxy, &token, "m"))
            .await
            .expect("a request waited for a hanging webhook");
        assert_eq!(s, 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_view_groups_blocks_into_families() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let root = home.issue(Scope {
        services: vec!["openai".into()],
        max_uses: Some(100),
        label: Some("team-root".into()),
        ..Scope::default()
    });
    let a = child(
        &root,
        Scope {
            max_uses: Some(10),
            label: Some("sub-a".into()),
            ..Scope::default()
        },
    );
    let b = child(&root, limit(10));
    let a1 = child(&a, limit(3));
    for t in [&a, &a, &b, &a1] {
        assert_eq!(chat(&proxy, t, "m").await.0, 200);
    }
    assert_eq!(chat(&proxy, &root, "m").await.0, 200);
    let ids = till::token::RawToken::parse(&a1).unwrap().revocation_ids();
    let v = admin_get(&proxy, &home, "/admin/usage").await;
    // Admin requests are counted too, so the admin tokens' families show;
    // every block of this test's tokens is in one family.
    let fams = v["families"].as_array().unwrap();
    let ours: Vec<_> = fams
        .iter()
        .filter(|f| {
            f["blocks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| ids.iter().any(|id| b["id"] == id.as_str()))
        })
        .collect();
    assert_eq!(ours.len(), 1, "{v}");
    let f = ours[0];
    assert_eq!(f["family"], ids[0].as_str());
    assert_eq!(f["label"], "team-root");
    assert_eq!(f["uses"], 5);
    assert_eq!(f["limit"], 100);
    assert_eq!(f["remaining"], 95);
    let blocks = f["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 4);
    let find = |id: &str| blocks.iter().find(|b| b["id"] == id).unwrap().clone();
    assert_eq!(find(&ids[0])["children_seen"], 2);
    assert_eq!(find(&ids[1])["uses"], 3);
    assert_eq!(find(&ids[1])["label"], "sub-a");
    assert_eq!(find(&ids[1])["children_seen"], 1);
    assert_eq!(find(&ids[2])["uses"], 1);
    assert_eq!(find(&ids[2])["remaining"], 2);
    assert_eq!(find(&ids[2])["parent"], ids[1].as_str());
    // One family in detail, by any block id; the CLI reads the same.
    let one = admin_get(&proxy, &home, &format!("/admin/usage/{}", ids[2])).await;
    assert_eq!(one["family"], ids[0].as_str());
    let out = till(["usage", "--url", &proxy.url("")])
        .home(&home)
        .env("TILL_ADMIN_TOKEN", &home.admin())
        .run();
    out.success()
        .stdout_has("\"team-root\"")
        .stdout_has("\"sub-a\"");
    // Recent denials are listed.
    assert_eq!(chat(&proxy, &a1, "m").await.0, 200);
    assert_eq!(chat(&proxy, &a1, "m").await.0, 200);
    assert_eq!(chat(&proxy, &a1, "m").await.0, 429);
    let d = admin_get(&proxy, &home, "/admin/decisions?denied=true").await;
    assert_eq!(d["decisions"].as_array().unwrap().len(), 1);
    // The admin API wants an admin token.
    let r = client()
        .get(proxy.url("/admin/usage"))
        .bearer_auth(&root)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = client()
        .get(proxy.url("/admin/usage"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Every admin endpoint checks the token before reading the request: a
    // malformed revoke body from a stranger is a 401, not a 400.
    for (method, path) in [
        ("POST", "/admin/revoke"),
        ("GET", "/admin/revocations"),
        ("GET", "/admin/usage"),
        ("GET", &format!("/admin/usage/{}", ids[0])),
        ("GET", "/admin/decisions?limit=not-a-number"),
        ("GET", "/admin/alerts"),
    ] {
        let req = |token: Option<&str>| {
            let mut r = client()
                .request(method.parse().unwrap(), proxy.url(path))
                .body("not json");
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            r
        };
        let s = req(None).send().await.unwrap().status();
        assert_eq!(s, 401, "{method} {path} without a token");
        let s = req(Some(&root)).send().await.unwrap().status();
        assert_eq!(s, 403, "{method} {path} with a non-admin token");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_slack_alerts_escape_hostile_labels_so_they_cannot_ping_or_disguise_links() {
    let up = Upstream::start().await;
    let (slack, slack_url) = Receiver::start().await;
    let home = Home::new();
    let extra = format!(
        "[alerts]\nthresholds = [1.0]\n[[alerts.webhooks]]\nurl = {slack_url:?}\nformat = \"slack\"\n"
    );
    let proxy = Proxy::start(&home, &[openai(&up)], &extra);
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        max_uses: Some(1),
        label: Some("<!channel> <https://evil.example|click here> & co".into()),
        ..Scope::default()
    });
    assert_eq!(chat(&proxy, &token, "m").await.0, 200);
    slack
        .wait_for("the threshold alert", |g| !g.is_empty())
        .await;
    let text = slack.got.lock().unwrap()[0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        text.contains("&lt;!channel&gt; &lt;https://evil.example|click here&gt; &amp; co"),
        "{text}"
    );
    assert!(!text.contains("<!channel>"), "{text}");
    assert!(!text.contains('<') && !text.contains('>'), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_webhook_urls_are_secrets_kept_out_of_logs_errors_and_the_banner() {
    const SECRET: &str = "T0SECRET/B0SECRET/xoxwebhooksecret";
    let up = Upstream::start().await;
    let home = Home::new();
    // One receiver refuses connections, the other answers 500.
    let (_held, dead) = dead_port();
    let refused = format!("{dead}/services/{SECRET}");
    let failing = format!("{}/status/500/{SECRET}", up.url());
    let extra = format!(
        "[alerts]\nthresholds = [0.5]\n[[alerts.webhooks]]\nurl = {refused:?}\nformat = \"slack\"\n\
         [[alerts.webhooks]]\nurl = {failing:?}\n"
    );
    let proxy = Proxy::start(&home, &[openai(&up)], &extra);
    let token = home.token("openai", Some(2));
    assert_eq!(chat(&proxy, &token, "m").await.0, 200);
    let done = "till_alerts_failed_total{kind=\"usage_threshold\"} 2";
    let mut text = String::new();
    for _ in 0..600 {
        text = client()
            .get(proxy.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains(done) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        text.contains(done),
        "both deliveries not failed yet:\n{text}"
    );
    let logs = proxy.logs();
    // The failures are logged, naming the receivers by host only.
    assert!(logs.contains("alert webhook unreachable"), "{logs}");
    assert!(logs.contains("alert webhook refused the alert"), "{logs}");
    assert!(logs.contains("http://127.0.0.1:"), "{logs}");
    for part in SECRET.split('/') {
        assert!(!logs.contains(part), "webhook secret in the log:\n{logs}");
        assert!(
            !proxy.banner().contains(part),
            "webhook secret in the banner:\n{}",
            proxy.banner()
        );
    }

    // A URL that does not parse is refused at start without being echoed.
    let cfg = home.write(
        "bad-hook.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n[[alerts.webhooks]]\nurl = \"hooks.slack.com/services/{SECRET}\"\n",
            home.path().to_str().unwrap()
        ),
    );
    let out = till(["serve", "--config", cfg.to_str().unwrap()]).run();
    out.code(2).stderr_has("alerts.webhooks[0].url");
    for part in SECRET.split('/') {
        assert!(!out.stderr.contains(part), "{}", out.stderr);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_revoked_token_raises_one_alert_per_revoked_block_not_one_per_attempt() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let root = home.token("openai", None);
    let a = child(&root, limit(100));
    let b = child(&root, limit(100));
    let url = proxy.url("");
    for t in [&a, &b] {
        till(["revoke", t, "--url", &url])
            .home(&home)
            .env("TILL_ADMIN_TOKEN", &home.admin())
            .run()
            .success();
    }
    let a_id = till::token::RawToken::parse(&a).unwrap().revocation_ids()[1].clone();
    let b_id = till::token::RawToken::parse(&b).unwrap().revocation_ids()[1].clone();
    let revoked_alerts = || async {
        let hist = admin_get(&proxy, &home, "/admin/alerts").await;
        hist["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["kind"] == "revoked_token_used")
            .cloned()
            .collect::<Vec<_>>()
    };
    // Twenty attempts, each on its own connection (a new source port), half
    // of them with children minted offline (a new last block each time).
    for i in 0..20 {
        let t = if i % 2 == 0 {
            a.clone()
        } else {
            child(&a, limit(5))
        };
        assert_eq!(chat(&proxy, &t, "m").await.0, 403);
    }
    // Alerts are recorded before the answer is sent: nothing to wait for.
    let got = revoked_alerts().await;
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0]["block"], a_id.as_str());
    // Another revoked block has its own alert.
    assert_eq!(chat(&proxy, &b, "m").await.0, 403);
    let got = revoked_alerts().await;
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(got[0]["block"], b_id.as_str());

    // Expired tokens: children of an expired one are new last blocks too.
    let expired = home.issue(Scope {
        services: vec!["openai".into()],
        expires: Some(std::time::SystemTime::now() - Duration::from_secs(3600)),
        ..Scope::default()
    });
    for _ in 0..5 {
        assert_eq!(chat(&proxy, &child(&expired, limit(5)), "m").await.0, 403);
    }
    let hist = admin_get(&proxy, &home, "/admin/alerts").await;
    let expired_alerts = hist["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "expired_token_used")
        .count();
    assert_eq!(expired_alerts, 1, "{hist:#}");
}

/// Checks a `Till-Signature` header the way README.md tells receivers to:
/// HMAC-SHA256 of `"<t>.<body>"` with the shared secret, and a recent `t`.
fn signature_is_valid(header: &str, body: &str, secret: &[u8]) -> bool {
    use hmac::{Hmac, Mac};
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = x.parse::<u64>().ok(),
            Some(("v1", x)) => v1 = hex::decode(x).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    now.abs_diff(t) < 300 && mac.verify_slice(&v1).is_ok()
}

/// Regression: alert deliveries were unsigned, so anyone who learned a
/// receiver's URL could post fake "revoked token used" alerts to it. With
/// `secret`, each delivery carries `Till-Signature: t=..,v1=..`; the banner
/// lists the webhooks, redacted, and says which are signed.
#[tokio::test(flavor = "multi_thread")]
async fn regression_webhook_deliveries_are_signed_with_the_configured_secret() {
    const SECRET: &str = "whsec-0123456789abcdef-not-for-prod";
    let up = Upstream::start().await;
    let (signed, signed_url) = Receiver::start().await;
    let (unsigned, unsigned_url) = Receiver::start().await;
    let home = Home::new();
    let secret_file = home.write("hook.secret", &format!("{SECRET}\n"));
    let extra = format!(
        "[alerts]\nthresholds = [1.0]\n\
         [[alerts.webhooks]]\nurl = {signed_url:?}\nsecret = {{ file = {:?} }}\n\
         [[alerts.webhooks]]\nurl = {unsigned_url:?}\nformat = \"slack\"\n",
        secret_file.to_str().unwrap()
    );
    let proxy = Proxy::start(&home, &[openai(&up)], &extra);
    // The banner's lines after the first arrive as the proxy prints them.
    let mut banner = proxy.banner();
    for _ in 0..100 {
        if banner.contains("python:") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        banner = proxy.banner();
    }
    let host = |url: &str| url.trim_end_matches("/hook").to_string();
    assert!(
        banner.contains(&format!(
            "webhook:     {}/… (json, signed)",
            host(&signed_url)
        )),
        "{banner}"
    );
    assert!(
        banner.contains(&format!(
            "webhook:     {}/… (slack, unsigned)",
            host(&unsigned_url)
        )),
        "{banner}"
    );
    assert!(
        !banner.contains("/hook") && !banner.contains(SECRET),
        "{banner}"
    );

    let token = home.token("openai", Some(1));
    assert_eq!(chat(&proxy, &token, "m").await.0, 200);
    signed
        .wait_for("a threshold alert", |g| !g.is_empty())
        .await;
    unsigned
        .wait_for("a threshold alert", |g| !g.is_empty())
        .await;
    let (sig, body) = signed.raw.lock().unwrap()[0].clone();
    let sig = sig.expect("a signed delivery carries Till-Signature");
    assert!(
        signature_is_valid(&sig, &body, SECRET.as_bytes()),
        "{sig} does not sign {body}"
    );
    // Tampering is detected: another body, or another secret.
    assert!(!signature_is_valid(
        &sig,
        &body.replace("usage", "usagE"),
        SECRET.as_bytes()
    ));
    assert!(!signature_is_valid(
        &sig,
        &body,
        b"another-secret-0123456789"
    ));
    assert_eq!(unsigned.raw.lock().unwrap()[0].0, None);
    assert!(!proxy.logs().contains(SECRET));

    // A missing or short secret refuses to start, naming the key, never
    // showing the value.
    for (secret, says) in [
        (
            "{ env = \"TILL_SURELY_UNSET_SECRET\" }".to_string(),
            "TILL_SURELY_UNSET_SECRET",
        ),
        (
            format!(
                "{{ file = {:?} }}",
                home.write("short.secret", "shortsecret").to_str().unwrap()
            ),
            "shorter than 16 bytes",
        ),
    ] {
        let cfg = home.write(
            "bad-secret.toml",
            &format!(
                "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n[[alerts.webhooks]]\nurl = \"https://hooks.example/x\"\nsecret = {secret}\n",
                home.path().to_str().unwrap()
            ),
        );
        let out = till(["serve", "--config", cfg.to_str().unwrap()]).run();
        out.code(2)
            .stderr_has("alerts.webhooks[0].secret")
            .stderr_has(says);
        assert!(!out.stderr.contains("shortsecret"), "{}", out.stderr);
    }
}

/// Waits until the audit file `file` holds at least `n` lines; returns them.
async fn audit_lines(file: &std::path::Path, n: usize) -> Vec<String> {
    for _ in 0..200 {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.lines().count() >= n {
            return text.lines().map(String::from).collect();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} never held {n} lines", file.display());
}

/// Red team, wave 2: a 4 KB path without a token wrote a 4.4 KB line per
/// 401, 65 MB/s from one client. The line keeps the path's first 256 bytes.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_long_path_without_a_token_writes_a_bounded_audit_line() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let long = "a".repeat(4080);
    let r = client()
        .get(proxy.url(&format!("/openai/{long}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let lines = audit_lines(&home.path().join("audit.jsonl"), 1).await;
    assert!(
        lines[0].len() < 1024,
        "{} bytes: {}",
        lines[0].len(),
        lines[0]
    );
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["code"], "missing_token");
    assert_eq!(v["path"], format!("/{}…", &long[..255]).as_str());
    assert_eq!(v["truncated"], serde_json::json!(["path"]));
}

/// Red team, wave 2: after logrotate's move and `SIGHUP`, lines went on into
/// the moved file, so rotation freed nothing.
#[tokio::test(flavor = "multi_thread")]
async fn regression_sighup_reopens_an_audit_log_moved_by_logrotate() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let file = home.path().join("audit.jsonl");
    let moved = home.path().join("audit.jsonl.1");
    assert_eq!(chat(&proxy, "garbage", "m").await.0, 401);
    audit_lines(&file, 1).await;
    std::fs::rename(&file, &moved).unwrap();
    sighup(&proxy);
    // Reloaded or refused, the file is reopened first.
    wait_for_log(&proxy, "configuration reload", 1).await;
    assert_eq!(chat(&proxy, "garbage", "m").await.0, 401);
    assert_eq!(audit_lines(&file, 1).await.len(), 1);
    assert_eq!(
        audit_lines(&moved, 1).await.len(),
        1,
        "nothing more in the moved file"
    );
}

/// Children minted offline with `--max-uses 1`, each used once: every one
/// crossed 80 % and 100 % of its own limit, two alerts per request of the
/// agent's choosing, filling the webhook queue (1024) so that a revoked
/// token's alert sent meanwhile was dropped, and pushing every other alert
/// out of the dashboard's history (red team, wave 2, fourth pass). Blocks
/// after the first raise one threshold alert per family and threshold per
/// five minutes.
#[tokio::test(flavor = "multi_thread")]
async fn regression_children_minted_offline_cannot_flood_the_alert_channel() {
    let up = Upstream::start().await;
    let (hook, url) = Receiver::start().await;
    let home = Home::new();
    let extra = format!("[alerts]\nthresholds = [0.8, 1.0]\n[[alerts.webhooks]]\nurl = {url:?}\n");
    let proxy = Proxy::start(&home, &[openai(&up)], &extra);
    let parent = home.issue(Scope {
        services: vec!["openai".into()],
        max_uses: Some(1000),
        label: Some("flooder".into()),
        ..Scope::default()
    });
    for _ in 0..40 {
        let kid = child(&parent, limit(1));
        assert_eq!(chat(&proxy, &kid, "m").await.0, 200);
    }
    // A revoked token used after the flood: its alert comes after every
    // threshold alert the flood raised (one delivery queue, in order).
    let leaked = home.token("openai", None);
    assert_eq!(chat(&proxy, &leaked, "m").await.0, 200);
    till(["revoke", &leaked, "--url", &proxy.url("")])
        .env("TILL_ADMIN_TOKEN", &home.admin())
        .run()
        .success();
    assert_eq!(chat(&proxy, &leaked, "m").await.0, 403);
    hook.wait_for("the revoked token's alert", |g| {
        g.iter().any(|a| a["kind"] == "revoked_token_used")
    })
    .await;
    let kinds = hook.kinds();
    let thresholds = kinds.iter().filter(|k| *k == "usage_threshold").count();
    assert_eq!(thresholds, 2, "one per threshold for the family: {kinds:?}");
    let history: serde_json::Value = admin_json(&proxy, &home, "/admin/alerts").await;
    let shown = history["alerts"].as_array().unwrap();
    assert_eq!(shown.len(), 3, "{history}");
}

/// Regression (red team, wave 2, fifth pass): a client that hung up while
/// the upstream worked on its request had its use counted but left no audit
/// line, metric or alert: the server drops the handler where it waits, and
/// the record was written only once the upstream answered. An agent could
/// ask anything and leave no trace. Such a request is now recorded when the
/// handler is dropped: status 499, its use, no upstream status.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_request_abandoned_while_the_upstream_works_is_audited() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.token("openai", Some(5));
    // Refused and abandoned-before-forwarding requests are recorded as
    // before (the first) or not at all; this one reaches the upstream.
    let r = client()
        .post(proxy.url("/openai/hang"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(r#"{"model":"m"}"#)
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(r.is_err(), "the client gave up: {r:?}");
    let lines = audit_lines(&home.path().join("audit.jsonl"), 1).await;
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["status"], 499, "{v}");
    assert_eq!(v["decision"], "allow", "{v}");
    assert_eq!(v["path"], "/hang", "{v}");
    assert!(v["upstream_status"].is_null(), "{v}");
    assert!(v["reason"].as_str().unwrap().contains("went away"), "{v}");
    assert_eq!(up.count(), 1);
    // The use it spent is the one the usage view shows.
    let (status, _) = chat(&proxy, &token, "m").await;
    assert_eq!(status, 200);
    let lines = audit_lines(&home.path().join("audit.jsonl"), 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    let v: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(v["blocks"][0]["uses"], 2, "{v}");
}
