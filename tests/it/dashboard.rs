//! The operator dashboard: its HTTP contract (sessions, CSRF, headers) and
//! a real headless Chromium driven through chromedriver.
//!
//! The browser is driven with a few W3C WebDriver calls made directly with
//! reqwest (see [`Browser`]): a dozen JSON endpoints are all the test needs,
//! so it needs no extra crate.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use till::token::Scope;

use crate::helpers::*;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// Upper bound for anything the page should show after an action. The page
/// polls every 2 s, so 10 s means something is wrong.
const WAIT: Duration = Duration::from_secs(10);
const HOSTILE: &str = "<img src=x onerror=alert(1)>";
const HOSTILE_CHILD: &str = "</code><script>alert(2)</script>";

// ---------------------------------------------------------------------------
// HTTP contract, no browser

fn form(token: &str) -> String {
    format!(
        "token={}",
        percent_encoding::utf8_percent_encode(token, percent_encoding::NON_ALPHANUMERIC)
    )
}

async fn login(proxy: &Proxy, token: &str) -> reqwest::Response {
    client()
        .post(proxy.url("/dashboard/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(token))
        .send()
        .await
        .unwrap()
}

/// Logs in with `admin`; returns (cookie header value, CSRF token).
async fn session(proxy: &Proxy, admin: &str) -> (String, String) {
    let r = login(proxy, admin).await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/dashboard");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    let cookie = set.split(';').next().unwrap().to_string();
    let page = client()
        .get(proxy.url("/dashboard"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("no csrf meta in {page}"))
        .to_string();
    (cookie, csrf)
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_login_takes_only_an_admin_token_and_sets_a_safe_cookie() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");

    // The login page, with the security headers.
    let r = client().get(proxy.url("/dashboard")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(
        csp.starts_with("default-src 'self'; script-src 'self'"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let body = r.text().await.unwrap();
    assert!(body.contains("action=\"/dashboard/login\""), "{body}");
    assert!(!body.contains("<script>"), "no inline script: {body}");

    // A token for an API is not an admin token.
    let api = home.token("openai", Some(5));
    let r = login(&proxy, &api).await;
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("set-cookie").is_none());
    let body = r.text().await.unwrap();
    assert!(body.contains("not accepted as an admin token"), "{body}");
    assert!(!body.contains(&api[..40]), "the page echoes the token");

    // Garbage, nothing, and an admin token from another root key.
    assert_eq!(login(&proxy, "garbage").await.status(), 401);
    assert_eq!(login(&proxy, "").await.status(), 401);
    assert_eq!(login(&proxy, &Home::new().admin()).await.status(), 401);

    // The admin token gets a session cookie that is not the token.
    let admin = home.admin();
    let r = login(&proxy, &admin).await;
    assert_eq!(r.status(), 303);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(set.starts_with("till_session="), "{set}");
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    assert!(set.contains("Path=/dashboard"), "{set}");
    assert!(!set.contains(&admin[..40]), "the cookie holds the token");
    let cookie = set.split(';').next().unwrap();
    let page = client()
        .get(proxy.url("/dashboard"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    let page = page.text().await.unwrap();
    assert!(page.contains("src=\"/dashboard/app.js\""), "{page}");
    assert!(!page.contains(&admin[..40]), "the page holds the token");

    // Assets are served with their types; unknown dashboard paths are 404,
    // not proxied.
    let js = client()
        .get(proxy.url("/dashboard/app.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    let js = js.text().await.unwrap();
    assert!(
        !js.contains("innerHTML"),
        "the script must not parse markup"
    );
    let r = client()
        .get(proxy.url("/dashboard/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_api_needs_a_session_and_revoke_needs_the_csrf_header() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        max_uses: Some(5),
        label: Some(HOSTILE.into()),
        ..Scope::default()
    });
    assert_eq!(chat(&proxy, &token, "m").await.0, 200);
    let family = till::token::RawToken::parse(&token)
        .unwrap()
        .revocation_ids()[0]
        .clone();

    // No session, or a made-up one: 401.
    let r = client()
        .get(proxy.url("/dashboard/api/state"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(proxy.url("/dashboard/api/state"))
        .header("cookie", format!("till_session={}", "ab".repeat(32)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The admin token as a Bearer does not open the session API either.
    let r = client()
        .get(proxy.url("/dashboard/api/state"))
        .bearer_auth(home.admin())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Each `home.admin()` is a new token with its own revocation ids.
    let admin = home.admin();
    let (cookie, csrf) = session(&proxy, &admin).await;
    let state = client()
        .get(proxy.url("/dashboard/api/state"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(state.status(), 200);
    assert_eq!(state.headers()["cache-control"], "no-store");
    let v: Value = serde_json::from_str(&state.text().await.unwrap()).unwrap();
    // Admin tokens are counted too, so their families are listed as well.
    let f = v["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["family"] == family.as_str())
        .expect("the family is listed");
    assert_eq!(f["label"], HOSTILE);
    assert_eq!(f["uses"], 1);
    assert_eq!(v["decisions"][0]["decision"], "allow");
    assert!(v["alerts"].is_array());

    let revoke = |headers: Vec<(&'static str, String)>| {
        let mut rq = client()
            .post(proxy.url("/dashboard/api/revoke"))
            .header("cookie", &cookie)
            .header("content-type", "application/json")
            .body(json!({ "id": family }).to_string());
        for (k, v) in headers {
            rq = rq.header(k, v);
        }
        rq.send()
    };
    // No CSRF header, a wrong one, or a foreign Origin: 403, nothing revoked.
    assert_eq!(revoke(vec![]).await.unwrap().status(), 403);
    assert_eq!(
        revoke(vec![("x-csrf-token", "ab".repeat(32))])
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        revoke(vec![
            ("x-csrf-token", csrf.clone()),
            ("origin", "http://evil.test".into())
        ])
        .await
        .unwrap()
        .status(),
        403
    );
    // Without a session the right header is not enough.
    let r = client()
        .post(proxy.url("/dashboard/api/revoke"))
        .header("x-csrf-token", &csrf)
        .body(json!({ "id": family }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(chat(&proxy, &token, "m").await.0, 200, "still usable");

    // With it, the family is revoked in the proxy's revocation list.
    let r = revoke(vec![("x-csrf-token", csrf.clone())]).await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["revoked"], family.as_str());
    assert_eq!(chat(&proxy, &token, "m").await.0, 403);

    // Revoking the admin token ends its dashboard sessions.
    let admin_id = till::token::RawToken::parse(&admin)
        .unwrap()
        .revocation_ids()[0]
        .clone();
    let (cookie2, csrf2) = session(&proxy, &admin).await;
    let r = client()
        .post(proxy.url("/dashboard/api/revoke"))
        .header("cookie", &cookie2)
        .header("x-csrf-token", &csrf2)
        .body(json!({ "id": admin_id }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(proxy.url("/dashboard/api/state"))
        .header("cookie", &cookie2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Logout needs the CSRF header too, and ends the session.
    let home2 = Home::new();
    let proxy2 = Proxy::start(&home2, &[openai(&up)], "");
    let (cookie3, csrf3) = session(&proxy2, &home2.admin()).await;
    let out = |h: Option<&str>| {
        let mut rq = client()
            .post(proxy2.url("/dashboard/logout"))
            .header("cookie", &cookie3);
        if let Some(h) = h {
            rq = rq.header("x-csrf-token", h);
        }
        rq.send()
    };
    assert_eq!(out(None).await.unwrap().status(), 403);
    assert_eq!(out(Some(&csrf3)).await.unwrap().status(), 200);
    let r = client()
        .get(proxy2.url("/dashboard/api/state"))
        .header("cookie", &cookie3)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

// ---------------------------------------------------------------------------
// A real browser

/// A chromedriver process on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    /// Starts chromedriver, or returns `None` (after saying so loudly) when
    /// it is not installed and this is not CI.
    async fn start() -> Option<Driver> {
        if !Path::new(CHROMEDRIVER).exists() || !Path::new(CHROMIUM).exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{CHROMEDRIVER} or {CHROMIUM} is missing: CI must install chromium and chromium-driver"
            );
            eprintln!(
                "\n**********************************************************************\n\
                 SKIPPED: the dashboard browser test needs {CHROMEDRIVER} and {CHROMIUM}\n\
                 (apt-get install -y chromium chromium-driver)\n\
                 **********************************************************************\n"
            );
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let d = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let start = Instant::now();
        loop {
            let ready = async {
                let r = client()
                    .get(format!("{}/status", d.url))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .ok()?;
                let v: Value = serde_json::from_str(&r.text().await.ok()?).ok()?;
                v["value"]["ready"].as_bool()
            };
            if ready.await == Some(true) {
                return Some(d);
            }
            assert!(start.elapsed() < WAIT, "chromedriver did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One WebDriver session: the few W3C WebDriver commands the test uses.
struct Browser {
    base: String,
    http: reqwest::Client,
    profile: tempfile::TempDir,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn open(driver: &Driver) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let http = client();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "unhandledPromptBehavior": "ignore",
            "timeouts": {"implicit": 0, "pageLoad": 15000, "script": 5000},
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let r = http
            .post(format!("{}/session", driver.url))
            .timeout(Duration::from_secs(30))
            .body(caps.to_string())
            .send()
            .await
            .expect("new WebDriver session");
        let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"));
        Browser {
            base: format!("{}/session/{id}", driver.url),
            http,
            profile,
        }
    }

    /// One command; returns `value`, or the WebDriver error as `Err`.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Value> {
        let url = format!("{}{path}", self.base);
        let rq = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self
                .http
                .post(url)
                .header("content-type", "application/json")
                .body(body.unwrap_or(json!({})).to_string()),
        };
        let r = rq
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let ok = r.status().is_success();
        let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null);
        if ok { Ok(v["value"].clone()) } else { Err(v) }
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url }))).await;
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd("POST", &format!("/element/{e}/click"), None).await;
    }

    async fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Text of the first element matching `css`, or `None`.
    async fn text(&self, css: &str) -> Option<String> {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            json!([css]),
        )
        .await
        .as_str()
        .map(String::from)
    }

    /// Polls until the text of `css` satisfies `pred` (the page refreshes
    /// itself; the test never reloads it).
    async fn wait_text(&self, what: &str, css: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let t = self.text(css).await;
            if let Some(t) = t.as_deref().filter(|t| pred(t)) {
                return t.to_string();
            }
            if start.elapsed() > WAIT {
                let shot = self.screenshot("dashboard-failure.png").await;
                panic!(
                    "page never showed {what} ({css} is {t:?}); screenshot: {}",
                    shot.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn alert_text(&self) -> Option<String> {
        self.call("GET", "/alert/text", None)
            .await
            .ok()
            .and_then(|v| v.as_str().map(String::from))
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let v = self.cmd("GET", "/screenshot", None).await;
        let png = base64::decode(v.as_str().unwrap()).unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        path
    }

    async fn close(self) {
        let _ = self.call("DELETE", "", None).await;
        drop(self.profile);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_in_a_real_browser_shows_usage_live_and_revokes() {
    let Some(driver) = Driver::start().await else {
        return;
    };
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "[alerts]\nthresholds = [0.5]\n");
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        max_uses: Some(10),
        label: Some(HOSTILE.into()),
        ..Scope::default()
    });
    let kid = child(
        &token,
        Scope {
            max_uses: Some(4),
            label: Some(HOSTILE_CHILD.into()),
            ..Scope::default()
        },
    );
    let ids = till::token::RawToken::parse(&kid).unwrap().revocation_ids();
    let family = ids[0].clone();
    assert_eq!(chat(&proxy, &token, "gpt-4o-mini").await.0, 200);
    // A small token that runs out: a denial for the feed.
    let other = home.issue(Scope {
        services: vec!["openai".into()],
        max_uses: Some(1),
        label: Some("batch-job".into()),
        expires: Some(std::time::SystemTime::now() + Duration::from_secs(5 * 3600)),
        ..Scope::default()
    });
    assert_eq!(chat(&proxy, &other, "gpt-4o").await.0, 200);
    assert_eq!(chat(&proxy, &other, "gpt-4o").await.0, 429);

    let b = Browser::open(&driver).await;
    b.goto(&proxy.url("/dashboard")).await;
    let admin = home.admin();
    b.type_into("#token", &admin).await;
    b.click("#login").await;

    let fam = format!("article[data-family='{family}']");
    let uses = format!("{fam} .family-uses");
    b.wait_text("the family's usage", &uses, |t| t == "1 / 10")
        .await;
    // A marker that a full reload would wipe.
    b.js("window.__stillHere = 42;", json!([])).await;

    // Requests through the proxy show up without a reload.
    assert_eq!(chat(&proxy, &kid, "gpt-4o-mini").await.0, 200);
    assert_eq!(chat(&proxy, &kid, "gpt-4o-mini").await.0, 200);
    b.wait_text("usage after two requests", &uses, |t| t == "3 / 10")
        .await;
    let child_row = format!("{fam} .block[data-id='{}']", ids[1]);
    b.wait_text("the child's usage", &format!("{child_row} .uses"), |t| {
        t == "2 / 4"
    })
    .await;
    assert_eq!(
        b.js("return window.__stillHere;", json!([])).await,
        42,
        "the page reloaded"
    );
    assert_eq!(
        b.js(
            "return document.querySelector(arguments[0]).dataset.depth;",
            json!([child_row])
        )
        .await,
        "1"
    );

    // Hostile labels are text, not markup: no element was injected, no
    // script ran, and the text reads exactly as issued.
    assert_eq!(
        b.text(&format!("{fam} .family-head .label"))
            .await
            .as_deref(),
        Some(HOSTILE)
    );
    assert_eq!(
        b.text(&format!("{child_row} .label")).await.as_deref(),
        Some(HOSTILE_CHILD)
    );
    assert_eq!(
        b.js(
            "return document.querySelectorAll('img, main script').length;",
            json!([])
        )
        .await,
        0
    );
    assert_eq!(b.alert_text().await, None, "an injected alert() ran");
    // The session cookie is out of reach of scripts.
    assert_eq!(b.js("return document.cookie;", json!([])).await, "");

    b.screenshot("dashboard-before-revoke.png").await;

    // Revoke the family, accepting the confirmation.
    b.click(&format!("{fam} .family-head button.revoke")).await;
    let start = Instant::now();
    let prompt = loop {
        if let Some(t) = b.alert_text().await {
            break t;
        }
        assert!(start.elapsed() < WAIT, "no confirmation dialog");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(prompt.starts_with("Revoke family"), "{prompt}");
    assert!(prompt.contains(HOSTILE), "{prompt}");
    b.cmd("POST", "/alert/accept", None).await;
    b.wait_text("the revoked badge", &format!("{fam} .badge.revoked"), |t| {
        t == "revoked"
    })
    .await;

    // The next request with that token (or its child) is refused.
    assert_eq!(chat(&proxy, &token, "gpt-4o-mini").await.0, 403);
    assert_eq!(chat(&proxy, &kid, "gpt-4o-mini").await.0, 403);
    b.wait_text("the denial in the feed", "#decisions li.deny .badge", |t| {
        t == "token_revoked"
    })
    .await;
    b.wait_text("the revoked-use alert", "#alerts li .badge", |t| {
        t == "revoked_token_used"
    })
    .await;
    b.wait_text("the expiring token", "#expiring li .label", |t| {
        t == "batch-job"
    })
    .await;

    // The page's own requests (favicon included) never reach the proxy path.
    let feed = b.text("#decisions").await.unwrap_or_default();
    assert!(!feed.contains("unknown_service"), "{feed}");

    // No token anywhere in the page.
    let source = b.cmd("GET", "/source", None).await;
    let source = source.as_str().unwrap();
    let dom = b
        .js("return document.documentElement.outerHTML;", json!([]))
        .await;
    for t in [&admin, &token, &kid, &other] {
        assert!(!source.contains(&t[..40]), "a token is in the page source");
        assert!(
            !dom.as_str().unwrap().contains(&t[..40]),
            "a token is in the DOM"
        );
    }

    let shot = b.screenshot("dashboard.png").await;
    eprintln!("dashboard screenshot: {}", shot.display());
    b.close().await;
}
