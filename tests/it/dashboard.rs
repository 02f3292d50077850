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
// A session never has more authority than its admin token has now

/// `GET /dashboard/api/state` with the session cookie: (status, body).
async fn state_call(proxy: &Proxy, cookie: &str) -> (u16, Value) {
    let r = client()
        .get(proxy.url("/dashboard/api/state"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// `POST /dashboard/api/revoke` of `id` with the session: (status, body).
async fn revoke_call(proxy: &Proxy, cookie: &str, csrf: &str, id: &str) -> (u16, Value) {
    let r = client()
        .post(proxy.url("/dashboard/api/revoke"))
        .header("cookie", cookie)
        .header("x-csrf-token", csrf)
        .body(json!({ "id": id }).to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// `GET /admin/usage` with `admin` as the Bearer: the status.
async fn admin_usage(proxy: &Proxy, admin: &str) -> u16 {
    client()
        .get(proxy.url("/admin/usage"))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The session ended, saying why.
#[track_caller]
fn ended(call: (u16, Value), why: &str) {
    let (status, body) = call;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "session_ended", "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains(why), "{msg}");
}

fn family_of(token: &str) -> String {
    till::token::RawToken::parse(token)
        .unwrap()
        .revocation_ids()[0]
        .clone()
}

fn with_check(admin: &str, check: &str) -> String {
    child(
        admin,
        Scope {
            datalog: Some(check.into()),
            ..Scope::default()
        },
    )
}

/// Regression (a): the session's lifetime came only from expiries written
/// as `$t <= DATE`; with `$t < DATE` it outlived the token by hours.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_session_ends_when_its_admin_tokens_time_check_fails() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let target = home.token("openai", Some(5));
    assert_eq!(chat(&proxy, &target, "m").await.0, 200);
    let until = (time::OffsetDateTime::now_utc() + Duration::from_secs(3))
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let admin = with_check(&home.admin(), &format!("check if time($t), $t < {until};"));
    let (cookie, csrf) = session(&proxy, &admin).await;
    assert_eq!(state_call(&proxy, &cookie).await.0, 200);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(admin_usage(&proxy, &admin).await, 403);
    ended(state_call(&proxy, &cookie).await, "GET /admin/usage");
    // Ended for good: no revoke either.
    let (status, _) = revoke_call(&proxy, &cookie, &csrf, &family_of(&target)).await;
    assert_eq!(status, 401);
    assert_eq!(chat(&proxy, &target, "m").await.0, 200, "nothing revoked");
}

/// Regression (b): after the admin token's root key was retired, its session
/// kept working (and could revoke).
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_session_ends_when_its_admin_tokens_root_key_is_retired() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let admin = home.admin();
    let (cookie, csrf) = session(&proxy, &admin).await;
    assert_eq!(state_call(&proxy, &cookie).await.0, 200);
    let reload = || {
        let cmd = till(["reload"]).home(&home).env("TILL_URL", &proxy.url(""));
        async move {
            tokio::task::spawn_blocking(move || cmd.run())
                .await
                .unwrap()
        }
    };
    till(["keygen", "--rotate"]).home(&home).run().success();
    reload().await.success();
    till(["key", "retire", "0"]).home(&home).run().success();
    reload().await.success();
    assert_eq!(admin_usage(&proxy, &admin).await, 401);
    // A token under the new key, for the session to try to revoke.
    let target = till(["issue", "--service", "openai", "--ttl", "1h"])
        .home(&home)
        .run()
        .success()
        .out();
    assert_eq!(chat(&proxy, &target, "m").await.0, 200);
    ended(
        revoke_call(&proxy, &cookie, &csrf, &family_of(&target)).await,
        "retired root key",
    );
    assert_eq!(chat(&proxy, &target, "m").await.0, 200, "nothing revoked");
    assert_eq!(state_call(&proxy, &cookie).await.0, 401);
}

/// Regression (c): a session could do what its admin token's own checks
/// refuse on the admin API (revoke), and a use-limited admin token got an
/// 8 h session. Dashboard calls are authorized and counted as the admin
/// requests they stand for.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_session_is_held_to_its_admin_tokens_checks_and_uses() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let target = home.token("openai", Some(5));
    assert_eq!(chat(&proxy, &target, "m").await.0, 200);
    let id = family_of(&target);

    let no_revoke = with_check(
        &home.admin(),
        r#"check if path($p), $p != "/admin/revoke";"#,
    );
    let r = client()
        .post(proxy.url("/admin/revoke"))
        .bearer_auth(&no_revoke)
        .body(json!({ "id": id }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (cookie, csrf) = session(&proxy, &no_revoke).await;
    assert_eq!(
        state_call(&proxy, &cookie).await.0,
        200,
        "reading is allowed"
    );
    ended(
        revoke_call(&proxy, &cookie, &csrf, &id).await,
        "POST /admin/revoke",
    );
    assert_eq!(chat(&proxy, &target, "m").await.0, 200, "nothing revoked");
    assert_eq!(
        state_call(&proxy, &cookie).await.0,
        401,
        "the session is gone"
    );

    // Uses: the login is one, each dashboard call another, as on the admin API.
    let three = child(&home.admin(), limit(3));
    let (cookie, _) = session(&proxy, &three).await;
    assert_eq!(state_call(&proxy, &cookie).await.0, 200);
    assert_eq!(state_call(&proxy, &cookie).await.0, 200);
    ended(state_call(&proxy, &cookie).await, "GET /admin/usage");
    assert_eq!(admin_usage(&proxy, &three).await, 429, "used up");
    let one = child(&home.admin(), limit(1));
    let (cookie, _) = session(&proxy, &one).await;
    ended(state_call(&proxy, &cookie).await, "GET /admin/usage");
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
        Browser::open_sized(driver, 1280, 900).await
    }

    /// A browser whose window is `width` x `height` CSS pixels.
    async fn open_sized(driver: &Driver, width: u32, height: u32) -> Browser {
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
                    "--disable-component-update", "--disable-sync", format!("--window-size={width},{height}"),
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
        let b = Browser {
            base: format!("{}/session/{id}", driver.url),
            http,
            profile,
        };
        // A window cannot be narrower than 500 px: emulate the screen of a
        // phone instead (the CSS viewport; `innerWidth` is checked by the
        // tests that use it).
        b.cmd(
            "POST",
            "/goog/cdp/execute",
            Some(
                json!({"cmd": "Emulation.setDeviceMetricsOverride", "params": {
                    "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false,
                }}),
            ),
        )
        .await;
        b
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

    /// Polls until `script`'s value satisfies `pred`; returns it.
    async fn wait_js(&self, what: &str, script: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let v = self.js(script, json!([])).await;
            if pred(&v) {
                return v;
            }
            if start.elapsed() > WAIT {
                let shot = self.screenshot("dashboard-failure.png").await;
                panic!(
                    "page never showed {what} (last value {v}); screenshot: {}",
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
            rates: vec![till::token::vocab::Rate {
                limit: 100,
                seconds: 60,
            }],
            concurrency: Some(5),
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
    // One with uses left that expires soon.
    let nightly = home.issue(Scope {
        services: vec!["openai".into()],
        max_uses: Some(3),
        label: Some("nightly-report".into()),
        expires: Some(std::time::SystemTime::now() + Duration::from_secs(5 * 3600)),
        ..Scope::default()
    });
    assert_eq!(chat(&proxy, &nightly, "gpt-4o").await.0, 200);

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
    // The child's rate window and concurrency cap, as issued.
    assert_eq!(
        b.text(&format!("{child_row} .windows")).await.as_deref(),
        Some("100/1m · 5 in flight")
    );
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
        t == "nightly-report"
    })
    .await;
    let soon = b.text("#expiring").await.unwrap_or_default();
    assert!(!soon.contains("batch-job"), "used up, yet expiring: {soon}");

    // The page's own requests (favicon included) never reach the proxy path.
    let feed = b.text("#decisions").await.unwrap_or_default();
    assert!(!feed.contains("unknown_service"), "{feed}");

    // No token anywhere in the page.
    let source = b.cmd("GET", "/source", None).await;
    let source = source.as_str().unwrap();
    let dom = b
        .js("return document.documentElement.outerHTML;", json!([]))
        .await;
    for t in [&admin, &token, &kid, &other, &nightly] {
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

/// A label written to pose as the revoke confirmation's own lines (red
/// team, wave 2, fourth pass): "agent\n\nRevoking this family also revokes
/// your admin token ... Press Cancel." showed under a blank line like Till's
/// text, to talk the operator out of revoking a compromised agent. The
/// label is shown on one line, quoted and escaped as JSON, and cut.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_label_cannot_write_lines_into_the_revoke_confirmation() {
    let Some(driver) = Driver::start().await else {
        return;
    };
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let lure = "agent\n\nRevoking this family also revokes your admin token and locks you \
                out of this dashboard.\u{2028}Press Cancel.";
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        max_uses: Some(10),
        label: Some(lure.into()),
        ..Scope::default()
    });
    assert_eq!(chat(&proxy, &token, "gpt-4o-mini").await.0, 200);
    let family = family_of(&token);

    let b = Browser::open(&driver).await;
    b.goto(&proxy.url("/dashboard")).await;
    b.type_into("#token", &home.admin()).await;
    b.click("#login").await;
    let fam = format!("article[data-family='{family}']");
    b.wait_text("the family", &format!("{fam} .family-uses"), |t| {
        t == "1 / 10"
    })
    .await;
    b.click(&format!("{fam} .family-head button.revoke")).await;
    let start = Instant::now();
    let prompt = loop {
        if let Some(t) = b.alert_text().await {
            break t;
        }
        assert!(start.elapsed() < WAIT, "no confirmation dialog");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    b.cmd("POST", "/alert/dismiss", None).await;
    let first = prompt.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("Revoke family \"agent\\n\\nRevoking this family"),
        "{prompt:?}"
    );
    assert!(first.ends_with("…\"?"), "the label is cut: {prompt:?}");
    assert!(!prompt.contains("Press Cancel"), "{prompt:?}");
    assert!(!prompt.contains('\u{2028}'), "{prompt:?}");
    assert_eq!(
        prompt.lines().filter(|l| !l.is_empty()).count(),
        2,
        "the dialog's own two lines: {prompt:?}"
    );
    b.close().await;
}

// ---------------------------------------------------------------------------
// Finding one's way: login hints, hundreds of families, expiring soon

/// GET `/dashboard/api/state` with a query, as the page does.
async fn state_page(proxy: &Proxy, cookie: &str, query: &str) -> Value {
    let r = client()
        .get(proxy.url(&format!("/dashboard/api/state?{query}")))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    serde_json::from_str(&r.text().await.unwrap()).unwrap()
}

fn labels_of(v: &Value) -> Vec<String> {
    v["families"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["label"].as_str().unwrap_or("").to_string())
        .collect()
}

/// A token holder minting many keys of one family offline, each used
/// once (up to `limits.max_blocks_per_family`, 10,000): every poll shipped
/// every block of the family, megabytes every two seconds (red team, wave
/// 2, fourth pass). The page gets at most 200, the shallowest and most
/// recently used first, and the family's total; `till usage` lists them all.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_family_with_many_keys_sends_the_page_a_bounded_number() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let parent = home.issue(Scope {
        services: vec!["openai".into()],
        max_uses: Some(1000),
        label: Some("many-keys".into()),
        ..Scope::default()
    });
    assert_eq!(chat(&proxy, &parent, "m").await.0, 200);
    let kids: Vec<String> = (0..230).map(|_| child(&parent, limit(1))).collect();
    for chunk in kids.chunks(16) {
        let answers =
            futures_util::future::join_all(chunk.iter().map(|t| chat(&proxy, t, "m"))).await;
        for (status, body) in answers {
            assert_eq!(status, 200, "{body}");
        }
    }
    // The newest key, used last.
    let newest = child(&parent, limit(1));
    assert_eq!(chat(&proxy, &newest, "m").await.0, 200);
    let newest_id = till::token::RawToken::parse(&newest)
        .unwrap()
        .revocation_ids()[1]
        .clone();

    let (cookie, _) = session(&proxy, &home.admin()).await;
    let v = state_page(&proxy, &cookie, "").await;
    let fam = v["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["label"] == "many-keys")
        .expect("the family is on the first page");
    let blocks = fam["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 200, "blocks sent to the page");
    assert_eq!(fam["blocks_total"], 232, "{}", fam["blocks_total"]);
    assert_eq!(blocks[0]["index"], 0, "the family's own key first");
    assert!(
        blocks.iter().any(|b| b["id"] == newest_id.as_str()),
        "the most recently used keys are shown"
    );
    // The admin API still lists every key.
    let usage: serde_json::Value = admin_json(&proxy, &home, "/admin/usage").await;
    let all = usage["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["label"] == "many-keys")
        .unwrap();
    assert_eq!(all["blocks"].as_array().unwrap().len(), 232);
}

/// `n` token families labelled `{prefix}000`, `{prefix}001`, ..., each made
/// by one allowed request through the proxy (the only way families come to
/// exist), a few requests at a time.
async fn families(proxy: &Proxy, home: &Home, prefix: &str, n: usize) {
    let tokens: Vec<String> = (0..n)
        .map(|i| {
            home.issue(Scope {
                services: vec!["openai".into()],
                max_uses: Some(10),
                label: Some(format!("{prefix}{i:03}")),
                ..Scope::default()
            })
        })
        .collect();
    for chunk in tokens.chunks(16) {
        let answers =
            futures_util::future::join_all(chunk.iter().map(|t| chat(proxy, t, "m"))).await;
        for (status, body) in answers {
            assert_eq!(status, 200, "{body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_login_page_says_where_the_admin_token_is_and_why_a_restart_logged_you_out() {
    let up = Upstream::start().await;
    let home = Home::new();
    let mut proxy = Proxy::start(&home, &[openai(&up)], "");

    let page = client()
        .get(proxy.url("/dashboard"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("$TILL_HOME/admin.token"), "{page}");
    assert!(page.contains("state_dir"), "{page}");
    assert!(page.contains("restarting the proxy ends them"), "{page}");
    assert!(
        !page.contains("your session has ended"),
        "no session yet: {page}"
    );

    let (cookie, _) = session(&proxy, &home.admin()).await;
    assert_eq!(proxy.terminate(), 0);
    proxy.restart(&home);

    // The old cookie: the login form again, saying why.
    let r = client()
        .get(proxy.url("/dashboard"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    assert!(page.contains("action=\"/dashboard/login\""), "{page}");
    assert!(page.contains("your session has ended"), "{page}");
    assert!(page.contains("the proxy was restarted"), "{page}");
    let r = client()
        .get(proxy.url("/dashboard/api/state"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_pages_hundreds_of_families_and_finds_them_by_label() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    families(&proxy, &home, "agent-", 260).await;
    let (cookie, _) = session(&proxy, &home.admin()).await;

    // 260 agents and the admin token's own family, 50 a page.
    let first = state_page(&proxy, &cookie, "").await;
    let total = first["total"].as_u64().unwrap();
    assert!(total >= 261, "{total}");
    assert_eq!(first["per_page"], 50);
    assert_eq!(first["page"], 1);
    assert_eq!(first["pages"].as_u64().unwrap(), total.div_ceil(50));
    assert_eq!(first["families"].as_array().unwrap().len(), 50);

    // Walking the pages shows every family exactly once.
    let mut seen = std::collections::BTreeSet::new();
    for page in 1..=first["pages"].as_u64().unwrap() {
        let v = state_page(&proxy, &cookie, &format!("page={page}")).await;
        assert_eq!(v["page"], page);
        for f in v["families"].as_array().unwrap() {
            assert!(
                seen.insert(f["family"].as_str().unwrap().to_string()),
                "{} twice",
                f["family"]
            );
        }
    }
    assert_eq!(seen.len() as u64, total);
    // A page past the end is the last page, not an empty one.
    let last = state_page(&proxy, &cookie, "page=999").await;
    assert_eq!(last["page"], first["pages"]);
    assert!(!last["families"].as_array().unwrap().is_empty());

    // Search: by label, ignoring case, across all pages.
    let one = state_page(&proxy, &cookie, "q=AGENT-123").await;
    assert_eq!(labels_of(&one), ["agent-123"]);
    assert_eq!(one["matched"], 1);
    assert_eq!(one["total"], total);
    let mut ten = labels_of(&state_page(&proxy, &cookie, "q=agent-12").await);
    ten.sort();
    let want: Vec<String> = (120..130).map(|i| format!("agent-{i}")).collect();
    assert_eq!(ten, want);
    // By an id prefix, as `till usage` prints them.
    let family = one["families"][0]["family"].as_str().unwrap();
    let by_id = state_page(&proxy, &cookie, &format!("q={}", &family[..12])).await;
    assert_eq!(labels_of(&by_id), ["agent-123"]);
    // Nothing matches: an empty page, and the search is echoed back.
    let none = state_page(&proxy, &cookie, "q=%3Cscript%3E").await;
    assert_eq!(none["matched"], 0);
    assert_eq!(none["pages"], 1);
    assert_eq!(none["q"], "<script>");
    // A page of another size, bounded whatever the URL asks.
    let v = state_page(&proxy, &cookie, "q=agent-&per_page=100&page=3").await;
    assert_eq!(v["families"].as_array().unwrap().len(), 60);
    let v = state_page(&proxy, &cookie, "per_page=100000").await;
    assert_eq!(v["families"].as_array().unwrap().len(), 200);
    let v = state_page(&proxy, &cookie, "page=-1&per_page=abc").await;
    assert_eq!(v["page"], 1);
    assert_eq!(v["per_page"], 50);
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_expiring_soon_skips_used_up_and_revoked_tokens() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let in_5h = Some(std::time::SystemTime::now() + Duration::from_secs(5 * 3600));
    let scope = |label: &str, uses: u64| Scope {
        services: vec!["openai".into()],
        max_uses: Some(uses),
        label: Some(label.into()),
        expires: in_5h,
        ..Scope::default()
    };
    let id_of = |t: &str| {
        till::token::RawToken::parse(t)
            .unwrap()
            .revocation_ids()
            .last()
            .unwrap()
            .clone()
    };

    // Used up: its one use is spent.
    let spent = home.issue(scope("spent", 1));
    assert_eq!(chat(&proxy, &spent, "m").await.0, 200);
    // A child with uses of its own whose parent is used up.
    let parent = home.issue(Scope {
        expires: None,
        ..scope("parent-out", 1)
    });
    let orphan = child(&parent, scope("orphan", 5));
    assert_eq!(chat(&proxy, &orphan, "m").await.0, 200);
    // Revoked.
    let gone = home.issue(scope("gone", 5));
    assert_eq!(chat(&proxy, &gone, "m").await.0, 200);
    till(["revoke", "--id", &id_of(&gone)])
        .home(&home)
        .env("TILL_URL", &proxy.url(""))
        .run()
        .success();
    // Uses left: listed, the root and an unlabelled child expiring sooner.
    let live = home.issue(scope("live", 5));
    let live_kid = child(
        &live,
        Scope {
            expires: Some(std::time::SystemTime::now() + Duration::from_secs(3600)),
            ..Scope::default()
        },
    );
    assert_eq!(chat(&proxy, &live_kid, "m").await.0, 200);

    let (cookie, _) = session(&proxy, &home.admin()).await;
    let v = state_page(&proxy, &cookie, "").await;
    let soon = v["expiring"].as_array().unwrap();
    let ids: Vec<&str> = soon.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [id_of(&live_kid), id_of(&live)], "{soon:?}");
    assert_eq!(soon[0]["family_label"], "live");
    assert_eq!(soon[0]["index"], 1);
    assert_eq!(soon[0]["label"], Value::Null);
    assert_eq!(soon[1]["label"], "live");
    // Over every family, not just the page shown.
    let v = state_page(&proxy, &cookie, "q=spent").await;
    assert_eq!(v["expiring"].as_array().unwrap().len(), 2);
}

/// What breaks a narrow layout, measured in the page: elements reaching
/// past the viewport, text nodes of three words or more laid out one word
/// per line, and buttons that wrap or stick out of their family's box.
const LAYOUT_PROBLEMS: &str = r##"
const vw = window.innerWidth;
const name = (e) => e.tagName.toLowerCase() + (e.id ? "#" + e.id : "") +
  (typeof e.className === "string" && e.className ? "." + e.className.trim().split(/\s+/).join(".") : "");
const lines = (node) => {
  const r = document.createRange();
  r.selectNodeContents(node);
  return new Set([...r.getClientRects()].filter((x) => x.width > 0).map((x) => Math.round(x.top))).size;
};
const wide = [];
for (const e of document.querySelectorAll("*")) {
  const r = e.getBoundingClientRect();
  if (r.width === 0 && r.height === 0) continue;
  if (r.right > vw + 0.5 || r.left < -0.5) wide.push(name(e) + " spans " + Math.round(r.left) + ".." + Math.round(r.right));
}
// Word per line: no two words of the text share a line (a single long word
// broken over lines is not that).
const wordy = [];
const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let n = walk.nextNode(); n; n = walk.nextNode()) {
  const tops = [];
  for (const m of n.textContent.matchAll(/\S+/g)) {
    const r = document.createRange();
    r.setStart(n, m.index);
    r.setEnd(n, m.index + m[0].length);
    const first = [...r.getClientRects()].find((x) => x.width > 0);
    if (first) tops.push(Math.round(first.top));
  }
  if (tops.length >= 3 && new Set(tops).size === tops.length) wordy.push(name(n.parentElement) + ": " + n.textContent.trim().slice(0, 60));
}
const buttons = [];
for (const b of document.querySelectorAll("button")) {
  const r = b.getBoundingClientRect();
  if (r.width === 0) continue;
  const box = (b.closest(".family, .top, .pager, .login-box") || document.body).getBoundingClientRect();
  if (lines(b) > 1 || r.left < box.left - 0.5 || r.right > box.right + 0.5)
    buttons.push(name(b) + " " + JSON.stringify(b.textContent) + " at " + Math.round(r.left) + ".." + Math.round(r.right) + " in " + Math.round(box.left) + ".." + Math.round(box.right));
}
// Names, ids, counts and badges stay on one line (ellipsis when long).
for (const e of document.querySelectorAll(".label, .family-name, .id, .badge, .count")) {
  if (e.getBoundingClientRect().width > 0 && lines(e) > 1) wordy.push(name(e) + " wraps: " + e.textContent.slice(0, 60));
}
return { vw: vw, scroll: document.documentElement.scrollWidth, wide: wide, wordy: wordy, buttons: buttons };
"##;

/// Asserts the page has none of [`LAYOUT_PROBLEMS`] at `width`.
async fn assert_fits(b: &Browser, width: u32, what: &str) {
    let v = b.js(LAYOUT_PROBLEMS, json!([])).await;
    let vw = v["vw"].as_u64().unwrap();
    assert!(
        vw <= u64::from(width) && vw + 40 > u64::from(width),
        "viewport {vw} px, wanted about {width}"
    );
    let ok = v["scroll"].as_u64() <= Some(vw)
        && v["wide"].as_array().unwrap().is_empty()
        && v["wordy"].as_array().unwrap().is_empty()
        && v["buttons"].as_array().unwrap().is_empty();
    if !ok {
        let shot = b
            .screenshot(&format!("dashboard-{width}-failure.png"))
            .await;
        panic!(
            "{what} does not fit {width} px: {v:#}\nscreenshot: {}",
            shot.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_at_420px_is_one_column_with_nothing_wider_than_the_screen() {
    let Some(driver) = Driver::start().await else {
        return;
    };
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let in_5h = Some(std::time::SystemTime::now() + Duration::from_secs(5 * 3600));
    // A few hundred families, so that there are pages.
    families(&proxy, &home, "agent-", 260).await;
    // Families are listed most recently used first, to the second: the
    // hostile ones below are then on the first page.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Hostile labels: one long word, many words, markup, and a deep tree
    // of them.
    let long_word = "W".repeat(300);
    let many_words = "a label with many words that goes on and on ".repeat(8);
    let root = home.issue(Scope {
        services: vec!["openai".into()],
        max_uses: Some(1000),
        label: Some(long_word.clone()),
        expires: in_5h,
        ..Scope::default()
    });
    let mut deep = root.clone();
    for label in [many_words.as_str(), HOSTILE, &long_word, HOSTILE_CHILD, ""] {
        deep = child(
            &deep,
            Scope {
                max_uses: Some(900),
                label: (!label.is_empty()).then(|| label.to_string()),
                expires: in_5h,
                ..Scope::default()
            },
        );
    }
    assert_eq!(chat(&proxy, &deep, "gpt-4o-mini").await.0, 200);
    let words = home.issue(Scope {
        services: vec!["openai".into()],
        max_uses: Some(2),
        label: Some(many_words.clone()),
        ..Scope::default()
    });
    for _ in 0..3 {
        chat(&proxy, &words, &"m".repeat(200)).await;
    }
    let deep_ids = till::token::RawToken::parse(&deep)
        .unwrap()
        .revocation_ids();
    let family = deep_ids[0].clone();

    // The login page first.
    let b = Browser::open_sized(&driver, 420, 1600).await;
    b.goto(&proxy.url("/dashboard")).await;
    let login = b.text(".login-box").await.unwrap_or_default();
    assert!(login.contains("admin.token"), "{login}");
    assert_fits(&b, 420, "the login page").await;
    b.screenshot("dashboard-login-420.png").await;
    b.type_into("#token", &home.admin()).await;
    b.click("#login").await;

    // The families list, first page: the most recently used first.
    let fam = format!("article[data-family='{family}']");
    // Recorded labels keep their first 256 bytes.
    let shown = format!("{}…", &long_word[..256]);
    b.wait_text(
        "the deep family",
        &format!("{fam} .family-head .label"),
        |t| t == shown,
    )
    .await;
    b.wait_text("the pager", "#page-info", |t| t.starts_with("page 1 of 6"))
        .await;
    // The denial with its long model name, whatever its code.
    b.wait_js(
        "a denial in the feed",
        "return document.querySelectorAll('#decisions li.deny').length;",
        |v| v.as_u64() > Some(0),
    )
    .await;
    assert_fits(&b, 420, "the dashboard").await;

    // One column: the side panels come below the families, not beside.
    let geometry = b
        .js(
            "const f = document.querySelector('.families').getBoundingClientRect();
             const s = document.querySelector('.side').getBoundingClientRect();
             return [f.left, s.left, f.bottom, s.top, f.width, s.width];",
            json!([]),
        )
        .await;
    let g: Vec<f64> = serde_json::from_value(geometry).unwrap();
    assert!((g[0] - g[1]).abs() < 1.0, "{g:?}");
    assert!(g[3] >= g[2], "side panels beside the families: {g:?}");
    assert!((g[4] - g[5]).abs() < 1.0, "{g:?}");
    // The deepest block's revoke button is on screen, in its row.
    let last = format!("{fam} .block[data-id='{}']", deep_ids[5]);
    let r = b
        .js(
            "const r = document.querySelector(arguments[0]).getBoundingClientRect(); return [r.left, r.right, innerWidth];",
            json!([format!("{last} button.revoke")]),
        )
        .await;
    let r: Vec<f64> = serde_json::from_value(r).unwrap();
    assert!(r[0] >= 0.0 && r[1] <= r[2], "{r:?}");
    // Blocks are named the same way in both lists: an unlabelled child is
    // "block 5" under its family's name.
    assert_eq!(
        b.text(&format!("{last} .label")).await.as_deref(),
        Some("block 5")
    );
    let soon = format!("#expiring li[data-id='{}']", deep_ids[5]);
    assert_eq!(
        b.text(&format!("{soon} .label")).await.as_deref(),
        Some("block 5")
    );
    assert_eq!(
        b.text(&format!("{soon} .family-name")).await,
        Some(shown.clone())
    );
    let shot = b.screenshot("dashboard-420.png").await;
    eprintln!("420 px screenshot: {}", shot.display());

    // Search narrows the list to the matching families, across pages.
    b.type_into("#search", "agent-12").await;
    b.wait_js(
        "ten families matching agent-12",
        "return [...document.querySelectorAll('#families .family-head .label')].map((e) => e.textContent);",
        |v| v.as_array().is_some_and(|a| a.len() == 10),
    )
    .await;
    assert_eq!(
        b.js("return document.getElementById('pager').hidden;", json!([]))
            .await,
        true
    );
    assert_fits(&b, 420, "the search results").await;
    // Short enough to show the side panels below: look at this one too.
    b.js(
        "window.scrollTo(0, document.querySelector('.side').offsetTop - 20);",
        json!([]),
    )
    .await;
    b.screenshot("dashboard-420-side.png").await;
    let search = b.find("#search").await;
    b.cmd("POST", &format!("/element/{search}/clear"), None)
        .await;
    b.wait_text("all pages again", "#page-info", |t| {
        t.starts_with("page 1 of 6")
    })
    .await;

    // The pager walks the pages without a reload.
    let first = b.text("#families article.family").await.unwrap_or_default();
    b.click("#next").await;
    b.wait_text("page 2", "#page-info", |t| t.starts_with("page 2 of 6"))
        .await;
    assert_ne!(
        b.text("#families article.family").await.unwrap_or_default(),
        first
    );
    assert_fits(&b, 420, "page 2").await;
    b.close().await;
}
