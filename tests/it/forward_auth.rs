//! Forward-auth (`/auth/<service>`) behind real gateways: nginx
//! `auth_request` and Caddy `forward_auth`, from the distribution's packages
//! (`.ci/run` installs them), each started by its test with its own config,
//! ephemeral port and directory, and stopped at the end. The service behind
//! the gateway is the local upstream; Till only decides and counts. Envoy's
//! HTTP `ext_authz` form (the original path appended to `/auth/<service>`) is
//! driven directly: Envoy is not packaged by Debian.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use till::token::Scope;

use crate::helpers::*;

/// What gateways send in `x-till-gateway-secret` (README, "Forward-auth").
const GATEWAY_SECRET: &str = "test-gateway-secret-0123456789abcdef";

/// nginx in front of `{service}`, asking Till at `{till}` first: the
/// README's snippet with the test's addresses and paths.
const NGINX_CONF: &str = r#"
daemon off;
master_process off;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events { worker_connections 1024; }
http {
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {
        listen 127.0.0.1:{port};

        location = /_till {
            internal;
            proxy_pass http://{till}/auth/openai;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Till-Gateway-Secret "{secret}";
        }

        location / {
            auth_request /_till;
            auth_request_set $till_status $upstream_status;
            auth_request_set $till_credential $upstream_http_authorization;
            # Replaces the client's Till token with the real credential.
            proxy_set_header Authorization $till_credential;
            error_page 500 = @till_refused;
            proxy_pass http://{service};
        }

        # auth_request turns every answer but 2xx/401/403 into a 500.
        location @till_refused {
            default_type application/json;
            if ($till_status = 400) {
                add_header x-should-retry false always;
                return 400 '{"error":{"message":"Till refused the request as malformed","type":"invalid_request_error","code":"bad_request"}}\n';
            }
            if ($till_status = 429) {
                add_header x-should-retry false always;
                return 429 '{"error":{"message":"this key has no uses left","type":"insufficient_quota","code":"activations_exhausted"}}\n';
            }
            if ($till_status = 503) {
                add_header x-should-retry true always;
                add_header retry-after 5 always;
                return 503 '{"error":{"message":"the counter store is unavailable","type":"api_error","code":"store_unavailable"}}\n';
            }
            return 500;
        }
    }
}
"#;

/// Caddy in front of `{service}`: the README's snippet.
const CADDYFILE: &str = r#"
{
    admin off
    auto_https off
    storage file_system {dir}/data
}
http://127.0.0.1:{port} {
    forward_auth {till} {
        uri /auth/openai
        header_up X-Till-Gateway-Secret "{secret}"
        copy_headers Authorization
    }
    reverse_proxy {service}
}
"#;

/// Caddy as a plain reverse proxy in front of Till itself, for every
/// name and path (`{service}` is Till here): how operators serve agents
/// on other machines.
const CADDY_IN_FRONT: &str = r#"
{
    admin off
    auto_https off
    storage file_system {dir}/data
}
http://:{port} {
    reverse_proxy {service}
}
"#;

/// A gateway process with its own directory, killed when dropped.
struct Gateway {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    child: Child,
}

impl Gateway {
    fn nginx(till: SocketAddr, service: SocketAddr) -> Gateway {
        Self::start(NGINX_CONF, till, service, |dir, conf| {
            let mut c = Command::new("nginx");
            c.arg("-p").arg(dir).arg("-c").arg(conf);
            c.arg("-e").arg(dir.join("error.log"));
            c
        })
    }

    /// [`Gateway::nginx`] asking Till about the upstream `name` instead of
    /// `openai`.
    fn nginx_for(name: &str, till: SocketAddr, service: SocketAddr) -> Gateway {
        let conf = NGINX_CONF.replace("/auth/openai", &format!("/auth/{name}"));
        Self::start(&conf, till, service, |dir, conf| {
            let mut c = Command::new("nginx");
            c.arg("-p").arg(dir).arg("-c").arg(conf);
            c.arg("-e").arg(dir.join("error.log"));
            c
        })
    }

    fn caddy(till: SocketAddr, service: SocketAddr) -> Gateway {
        Self::start(CADDYFILE, till, service, caddy_command)
    }

    /// Caddy serving [`CADDY_IN_FRONT`]: every request to Till.
    fn caddy_in_front_of(till: SocketAddr) -> Gateway {
        Self::start(CADDY_IN_FRONT, till, till, caddy_command)
    }

    /// Writes `template` for a free port and starts the command; tries
    /// again on another port if the one chosen was taken meanwhile.
    fn start(
        template: &str,
        till: SocketAddr,
        service: SocketAddr,
        command: impl Fn(&Path, &Path) -> Command,
    ) -> Gateway {
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let text = template
                .replace("{dir}", dir.path().to_str().unwrap())
                .replace("{port}", &port.to_string())
                .replace("{till}", &till.to_string())
                .replace("{service}", &service.to_string())
                .replace("{secret}", GATEWAY_SECRET);
            let conf: PathBuf = dir.path().join("gateway.conf");
            std::fs::write(&conf, text).unwrap();
            let log = std::fs::File::create(dir.path().join("output.log")).unwrap();
            let mut child = command(dir.path(), &conf)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("the gateway is installed (apt-get install nginx caddy)");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(20) {
                if TcpStream::connect(addr).is_ok() {
                    return Gateway {
                        addr,
                        _dir: dir,
                        child,
                    };
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "gateway did not start on port {port}: {}",
                std::fs::read_to_string(dir.path().join("output.log")).unwrap_or_default()
            );
        }
        panic!("the gateway did not start on a free port");
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// `caddy run` on the Caddyfile `conf`, keeping its files in `dir`.
fn caddy_command(dir: &Path, conf: &Path) -> Command {
    let mut c = Command::new("caddy");
    c.args(["run", "--adapter", "caddyfile", "--config"]);
    c.arg(conf);
    // Caddy writes its autosave and data under these.
    c.env("HOME", dir)
        .env("XDG_DATA_HOME", dir)
        .env("XDG_CONFIG_HOME", dir);
    c
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Till with the `openai` upstream returning its credential to the gateway.
fn till_for_gateways(home: &Home, up: &Upstream) -> Proxy {
    till_for_gateways_with(home, up, policies_dir())
}

/// [`till_for_gateways`] with the policy directory `policies`.
fn till_for_gateways_with(home: &Home, up: &Upstream, policies: &str) -> Proxy {
    let secret = home.write("gateway.secret", GATEWAY_SECRET);
    let config = home.write(
        "till.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\npolicies = {:?}\n\
             [upstreams.openai]\nurl = {:?}\ncredential = {{ env = \"TEST_OPENAI_KEY\" }}\n\
             forward_auth_credential = true\nforward_auth_secret = {{ file = {:?} }}\n",
            home.path().to_str().unwrap(),
            policies,
            up.url(),
            secret.to_str().unwrap(),
        ),
    );
    Proxy::start_config(home, &config).expect("proxy starts")
}

fn scoped(home: &Home, path: &str, max_uses: Option<u64>) -> String {
    home.issue(Scope {
        services: vec!["openai".into()],
        paths: vec![path.into()],
        max_uses,
        ..Scope::default()
    })
}

async fn post(url: String, token: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let r = client()
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o-mini","messages":[]}"#)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap_or_default())
}

/// What the service behind the gateway received: the real credential in
/// place of the Till token, never the token.
#[track_caller]
fn assert_credential_injected(up: &Upstream, token: &str) {
    for s in up.seen() {
        let auth = s
            .headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(auth.as_deref(), Some(&*format!("Bearer {OPENAI_SECRET}")));
        for (_, v) in s.headers.iter() {
            assert!(!v.to_str().unwrap_or("").contains(token), "{s:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn forward_auth_via_nginx_lets_exactly_a_tokens_uses_through_under_concurrency() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = till_for_gateways(&home, &up);
    let nginx = Gateway::nginx(proxy.addr, up.addr);
    let token = home.token("openai", Some(10));
    let answers = join_all((0..60).map(|_| post(nginx.url("/v1/chat/completions"), &token))).await;
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let exhausted: Vec<_> = answers.iter().filter(|a| a.0 == 429).collect();
    assert_eq!((ok, exhausted.len()), (10, 50), "{answers:?}");
    assert_eq!(up.count(), 10, "exactly the token's uses reach the service");
    // The exhausted answer reaches the client as a final 429 through nginx.
    let (_, h, body) = exhausted[0];
    assert_eq!(h["x-should-retry"], "false");
    assert!(body.contains("activations_exhausted"), "{body}");
    assert_credential_injected(&up, &token);
    for s in up.seen() {
        assert_eq!(
            (s.method.as_str(), s.uri.as_str()),
            ("POST", "/v1/chat/completions")
        );
    }
    // Till's count agrees: a later request is refused too.
    assert_eq!(post(nginx.url("/v1/chat/completions"), &token).await.0, 429);
    assert_eq!(up.count(), 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn forward_auth_via_nginx_refuses_out_of_scope_and_revoked_tokens() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = till_for_gateways(&home, &up);
    let nginx = Gateway::nginx(proxy.addr, up.addr);
    let token = scoped(&home, "/v1/chat", Some(100));
    assert_eq!(post(nginx.url("/v1/files"), &token).await.0, 403);
    assert_eq!(post(nginx.url("/v1/chat"), &token).await.0, 200);
    assert_eq!(post(nginx.url("/v1/chat/completions"), &token).await.0, 200);
    assert_eq!(up.count(), 2);
    // No token, a garbage token: 401.
    let r = client().get(nginx.url("/v1/chat/x")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(post(nginx.url("/v1/chat/x"), "garbage").await.0, 401);

    let s = client()
        .post(proxy.url("/admin/revoke"))
        .bearer_auth(home.admin())
        .header("content-type", "application/json")
        .body(serde_json::json!({"token": token, "root": true}).to_string())
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(s, 200);
    assert_eq!(post(nginx.url("/v1/chat/completions"), &token).await.0, 403);
    // A child of the revoked token too.
    let kid = child(&token, limit(5));
    assert_eq!(post(nginx.url("/v1/chat/completions"), &kid).await.0, 403);
    assert_eq!(
        up.count(),
        2,
        "nothing reached the service after the revocation"
    );
    assert_credential_injected(&up, &token);
}

/// Regression guard for a normalisation differential: the gateway forwards
/// the path as the client sent it, so Till must authorize exactly that
/// string (or refuse), never a normalised other path.
#[tokio::test(flavor = "multi_thread")]
async fn regression_forward_auth_authorizes_exactly_the_path_nginx_and_caddy_forward() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = till_for_gateways(&home, &up);
    let token = scoped(&home, "/v1/chat", None);
    let auth = format!("authorization: Bearer {token}\r\n");
    let targets = [
        "/v1/chat/../files",
        "/v1/chat/%2e%2e/files",
        "/v1/chat/%2E%2E/files",
        "/v1/chat/.%2e/files",
        "/v1/chat/..;/files",
        "/v1/chat/..%3b/files",
        "/v1/chat/;/../../files",
        "//v1/files",
        "//v1/chat/x",
        "/v1/chat//x",
        "/v1/chat/./x",
        "/v1/chat/%2f../files",
        "/v1/chat%2f..%2ffiles",
        "/v1/%63hat/x",
        "/v1/chat/..",
        "/v1/chat;x/y",
        "/v1/chat/x?_method=DELETE",
        "/v1/chat/x",
    ];
    for (name, gateway) in [
        ("nginx", Gateway::nginx(proxy.addr, up.addr)),
        ("caddy", Gateway::caddy(proxy.addr, up.addr)),
    ] {
        let mut allowed = 0;
        for target in targets {
            let before = up.count();
            let status = raw_request(gateway.addr, target, &auth).await;
            let seen = up.seen()[before..].to_vec();
            if status == 200 {
                allowed += 1;
                assert_eq!(seen.len(), 1, "{name} {target}: {seen:?}");
                let path = seen[0].uri.split('?').next().unwrap().to_string();
                // Authorized as received: in normal form and in scope.
                assert_eq!(
                    till::path::normalize(&path).as_deref(),
                    Ok(path.as_str()),
                    "{name} {target}"
                );
                assert!(path.starts_with("/v1/chat"), "{name} {target} -> {path}");
            } else {
                assert!(
                    seen.is_empty(),
                    "{name} {target} ({status}) reached: {seen:?}"
                );
            }
        }
        // The clean targets pass: the test can tell allowed from refused.
        assert!(allowed >= 2, "{name}: {allowed} allowed");
    }
    let forwarded: Vec<_> = up.seen().iter().map(|s| s.uri.clone()).collect();
    assert!(
        forwarded.contains(&"/v1/chat/x".to_string()),
        "{forwarded:?}"
    );
    assert!(
        forwarded.iter().all(|u| !u.contains("files")),
        "{forwarded:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn forward_auth_via_caddy_injects_the_credential_and_passes_tills_answers_through() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = till_for_gateways(&home, &up);
    let caddy = Gateway::caddy(proxy.addr, up.addr);
    let token = scoped(&home, "/v1/chat", Some(2));
    for _ in 0..2 {
        let (s, _, body) = post(caddy.url("/v1/chat/completions?x=1"), &token).await;
        assert_eq!(s, 200, "{body}");
    }
    assert_credential_injected(&up, &token);
    for s in up.seen() {
        assert_eq!(s.uri, "/v1/chat/completions?x=1");
        assert!(
            s.body.contains("gpt-4o-mini"),
            "the gateway forwards the body"
        );
    }
    // Till's own JSON answers reach the client unchanged.
    let (s, h, body) = post(caddy.url("/v1/chat/completions"), &token).await;
    assert_eq!(s, 429, "{body}");
    assert_eq!(h["x-should-retry"], "false");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "activations_exhausted");
    let other = scoped(&home, "/v1/chat", Some(2));
    let (s, h, body) = post(caddy.url("/v1/files"), &other).await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(h["x-should-retry"], "false");
    assert!(body.contains("out_of_scope"), "{body}");
    assert_eq!(up.count(), 2);
}

/// Envoy's HTTP `ext_authz` service appends the original path to the
/// prefix and keeps the original method; driven here without Envoy.
#[tokio::test(flavor = "multi_thread")]
async fn forward_auth_envoy_style_checks_decide_count_and_refuse_what_they_cannot_judge() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = till_for_gateways(&home, &up);
    let token = home.token("openai", Some(2));
    let check = |method: &str, path: &str| {
        client()
            .request(method.parse().unwrap(), proxy.url(path))
            .header("x-till-gateway-secret", GATEWAY_SECRET)
    };
    let r = check("POST", "/auth/openai/v1/chat/completions")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()["authorization"],
        format!("Bearer {OPENAI_SECRET}").as_str()
    );
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(up.count(), 0, "Till forwards nothing itself");

    for (method, path, extra, status, says) in [
        // Neither headers nor an appended path: never guessed.
        ("GET", "/auth/openai", vec![], 400, "X-Original-URI"),
        // A path that normalises to another one.
        ("GET", "/auth/openai/v1//x", vec![], 400, "normal form"),
        ("TRACE", "/auth/openai/v1/x", vec![], 405, "TRACE"),
        (
            "GET",
            "/auth/openai/v1/x?_method=DELETE",
            vec![],
            400,
            "_method",
        ),
        (
            "GET",
            "/auth/openai/v1/x",
            vec![("x-forwarded-method", "GET"), ("x-forwarded-uri", "/v1/y")],
            400,
            "disagree",
        ),
        ("GET", "/auth/nope/v1/x", vec![], 404, "nope"),
    ] {
        let mut rb = check(method, path).bearer_auth(&token);
        for (k, v) in extra {
            rb = rb.header(k, v);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
        assert!(r.headers().get("authorization").is_none());
        let body = r.text().await.unwrap();
        assert!(body.contains(says), "{method} {path}: {body}");
    }
    // A model allow-list cannot be judged without the body: denied.
    let models = home.issue(Scope {
        services: vec!["openai".into()],
        models: vec!["gpt-4o-mini".into()],
        ..Scope::default()
    });
    let r = check("POST", "/auth/openai/v1/chat/completions")
        .bearer_auth(&models)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.text().await.unwrap().contains("model"));
    // None of the refusals spent a use: one is left.
    let status = |r: reqwest::Response| r.status().as_u16();
    let r = check("POST", "/auth/openai/v1/chat/completions")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 200);
    let r = check("POST", "/auth/openai/v1/chat/completions")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 429);
}

/// Regression: a check describing `delete` passed deny-lists for DELETE,
/// and the service behind the gateway may run it as DELETE. Refused in
/// each description, nothing spent.
#[tokio::test(flavor = "multi_thread")]
async fn regression_forward_auth_refuses_lower_case_methods() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = till_for_gateways(&home, &up);
    let token = home.token("openai", Some(1));
    let check = |method: &str, path: &str| {
        client()
            .request(method.parse().unwrap(), proxy.url(path))
            .header("x-till-gateway-secret", GATEWAY_SECRET)
            .bearer_auth(&token)
    };
    for rb in [
        check("GET", "/auth/openai")
            .header("x-forwarded-method", "delete")
            .header("x-forwarded-uri", "/v1/files/file-1"),
        check("GET", "/auth/openai")
            .header("x-original-method", "Delete")
            .header("x-original-uri", "/v1/files/file-1"),
        check("delete", "/auth/openai/v1/files/file-1"),
    ] {
        let r = rb.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400);
        assert!(r.headers().get("authorization").is_none());
        let body = r.text().await.unwrap();
        assert!(
            body.contains("methods are upper case; send DELETE"),
            "{body}"
        );
    }
    let ok = || {
        check("GET", "/auth/openai")
            .header("x-forwarded-method", "GET")
            .header("x-forwarded-uri", "/v1/models")
    };
    assert_eq!(ok().send().await.unwrap().status().as_u16(), 200);
    assert_eq!(ok().send().await.unwrap().status().as_u16(), 429);
    assert_eq!(up.count(), 0);
}

/// Regression: a check for `GET /v1/models/x` carrying a method-override or
/// URL-rewrite header was allowed and counted, and the gateway forwarded
/// the header to a service that acts on it. Refused (403) in both
/// spellings, nothing spent; a `_method` query parameter stays refused.
#[tokio::test(flavor = "multi_thread")]
async fn regression_forward_auth_refuses_method_override_and_rewrite_headers() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = till_for_gateways(&home, &up);
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        methods: vec!["GET".into()],
        max_uses: Some(1),
        ..Scope::default()
    });
    let check = |uri: &str| {
        client()
            .get(proxy.url("/auth/openai"))
            .header("x-till-gateway-secret", GATEWAY_SECRET)
            .header("x-forwarded-method", "GET")
            .header("x-forwarded-uri", uri)
            .bearer_auth(&token)
    };
    for (name, value) in [
        ("X-HTTP-Method-Override", "DELETE"),
        ("X-Method-Override", "DELETE"),
        ("X-HTTP-Method", "DELETE"),
        ("X-Original-URL", "/v1/files"),
        ("X-Rewrite-URL", "/v1/files"),
        ("X-Forwarded-Prefix", "/v1/files"),
        ("X_HTTP_METHOD_OVERRIDE", "DELETE"),
        ("x_original_url", "/v1/files"),
    ] {
        let r = check("/v1/models/x")
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{name}");
        assert!(r.headers().get("authorization").is_none());
        let body = r.text().await.unwrap();
        assert!(
            body.contains(&name.to_ascii_lowercase()) && body.contains("without it"),
            "{name}: {body}"
        );
    }
    let r = check("/v1/models/x?_method=DELETE").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(check("/v1/models/x").send().await.unwrap().status(), 200);
    assert_eq!(check("/v1/models/x").send().await.unwrap().status(), 429);
    assert_eq!(up.count(), 0);
}

/// Regression guard: with `forward_auth_credential`, a token holder calling
/// `/auth/<service>` directly would receive the real credential; only a
/// check carrying the gateway's secret gets it, and others spend nothing.
#[tokio::test(flavor = "multi_thread")]
async fn regression_forward_auth_returns_the_credential_only_to_the_gateway() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = till_for_gateways(&home, &up);
    let token = home.token("openai", Some(1));
    for secret in [None, Some("wrong-secret-0123456789abcdef0123"), Some("")] {
        let mut rb = client()
            .post(proxy.url("/auth/openai/v1/chat/completions"))
            .bearer_auth(&token);
        if let Some(s) = secret {
            rb = rb.header("x-till-gateway-secret", s);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 403, "{secret:?}");
        let headers = format!("{:?}", r.headers());
        let body = r.text().await.unwrap();
        assert!(body.contains("gateway_not_trusted"), "{body}");
        for text in [&headers, &body] {
            assert!(!text.contains(OPENAI_SECRET), "{text}");
            assert!(!text.contains(GATEWAY_SECRET), "{text}");
        }
    }
    // The one use is still there for the gateway.
    let r = client()
        .post(proxy.url("/auth/openai/v1/chat/completions"))
        .bearer_auth(&token)
        .header("x-till-gateway-secret", GATEWAY_SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let logs = proxy.logs();
    assert!(!logs.contains(OPENAI_SECRET) && !logs.contains(GATEWAY_SECRET));
}

/// A reload re-reads the gateway secret with the rest of the upstream:
/// forward-auth with a secret keeps working after `POST /admin/reload`.
#[tokio::test(flavor = "multi_thread")]
async fn regression_forward_auth_keeps_its_gateway_secret_across_a_reload() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = till_for_gateways(&home, &up);
    let token = home.token("openai", Some(5));
    let check = || {
        client()
            .post(proxy.url("/auth/openai/v1/chat/completions"))
            .bearer_auth(&token)
            .header("x-till-gateway-secret", GATEWAY_SECRET)
            .send()
    };
    assert_eq!(check().await.unwrap().status().as_u16(), 200);
    let r = client()
        .post(proxy.url("/admin/reload"))
        .bearer_auth(home.admin())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    assert_eq!(check().await.unwrap().status().as_u16(), 200);
}

#[test]
fn forward_auth_credential_without_a_gateway_secret_refuses_to_start() {
    let home = Home::new();
    let config = home.write(
        "till.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n\
             [upstreams.openai]\nurl = \"http://127.0.0.1:9\"\ncredential = \"none\"\n\
             forward_auth_credential = true\n",
            home.path().to_str().unwrap()
        ),
    );
    till(["serve", "--config", config.to_str().unwrap()])
        .home(&home)
        .run()
        .code(2)
        .stderr_has("upstreams.openai.forward_auth_credential")
        .stderr_has("forward_auth_secret");
}

/// Regression: behind a reverse proxy on the same machine every client is a
/// loopback peer, and Caddy passes the client's Host on: a remote client
/// sending `Host: 127.0.0.1:PORT` read /metrics and reached the admin API
/// and the dashboard.
#[tokio::test(flavor = "multi_thread")]
async fn regression_the_admin_plane_is_not_reachable_through_a_reverse_proxy_by_a_local_name() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let caddy = Gateway::caddy_in_front_of(proxy.addr);
    let admin = home.admin();
    let port = proxy.addr.port();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        for path in ["/metrics", "/admin/usage", "/dashboard"] {
            let r = client()
                .get(caddy.url(path))
                .header("host", &host)
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 421, "{path} with Host {host} through Caddy");
            let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            assert_eq!(v["error"]["code"], "host_not_allowed", "{v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("reverse proxy"),
                "{v}"
            );
        }
    }
    // Agents still go through it.
    let t = home.token("openai", Some(1));
    let r = client()
        .get(caddy.url("/openai/v1/models"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Directly on loopback, as before.
    let r = client().get(proxy.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // A name the operator lists is the way to serve the admin plane
    // through the proxy.
    let listed_home = Home::new();
    let listed = Proxy::start(
        &listed_home,
        &[openai(&up)],
        "admin_hosts = [\"till.example\"]",
    );
    let caddy = Gateway::caddy_in_front_of(listed.addr);
    for (host, status) in [
        ("till.example".to_string(), 200),
        (format!("127.0.0.1:{}", listed.addr.port()), 421),
    ] {
        let r = client()
            .get(caddy.url("/metrics"))
            .header("host", &host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "Host {host} through Caddy");
    }
}

/// Regression (red team, wave 2, fourth pass): a check carries no MCP
/// message, so no `mcp`, `tool`, `prompt` or `resource` fact exists there. A
/// deny-list on one (`reject if tool("delete_everything")`, which the proxy
/// enforces) never fired, and nginx forwarded the very call it names.
#[tokio::test(flavor = "multi_thread")]
async fn regression_forward_auth_refuses_keys_that_read_the_mcp_message_it_cannot_see() {
    let up = Upstream::start().await;
    let home = Home::new();
    let config = home.write(
        "till.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\npolicies = {:?}\n\
             [upstreams.tools]\nurl = {:?}\napi = \"mcp\"\ncredential = \"none\"\n",
            home.path().to_str().unwrap(),
            policies_dir(),
            up.url(),
        ),
    );
    let proxy = Proxy::start_config(&home, &config).expect("proxy starts");
    let nginx = Gateway::nginx_for("tools", proxy.addr, up.addr);
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_everything","arguments":{}}}"#;
    let send = |url: String, token: String| async move {
        let r = client()
            .post(url)
            .bearer_auth(token)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(call)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    };
    for datalog in [
        r#"reject if tool("delete_everything");"#,
        r#"reject if mcp("tools/call");"#,
        r#"reject if prompt("secret");"#,
        r#"reject if resource("file:///etc/passwd");"#,
    ] {
        let token = home.issue(Scope {
            services: vec!["tools".into()],
            datalog: Some(datalog.into()),
            ..Scope::default()
        });
        let (status, _) = send(nginx.url("/mcp"), token.clone()).await;
        assert_eq!(status, 403, "{datalog}: refused through nginx");
        // Envoy's form, where Till's own answer is seen.
        let r = client()
            .post(proxy.url("/auth/tools/mcp"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{datalog}");
        let body = r.text().await.unwrap();
        assert!(
            body.contains("carries no body") && body.contains("Till's proxy"),
            "{body}"
        );
    }
    assert_eq!(up.count(), 0, "no refused call reached the MCP server");
    // The proxy, which reads the message, enforces the same deny-list.
    let deny = home.issue(Scope {
        services: vec!["tools".into()],
        datalog: Some(r#"reject if tool("delete_everything");"#.into()),
        ..Scope::default()
    });
    let (_, body) = send(proxy.url("/tools/mcp"), deny).await;
    assert!(body.contains("-32001"), "{body}");
    assert_eq!(up.count(), 0);
    // A key that reads nothing of the message still passes the gateway.
    let plain = home.token("tools", None);
    assert_eq!(send(nginx.url("/mcp"), plain).await.0, 200);
    assert_eq!(up.count(), 1);
}

/// Regression (red team, wave 2, fourth pass): a check was refused for a
/// token whose own blocks read `model`, found by searching their text, but
/// not under a policy reading it (`deny if model("gpt-4")` in the policy
/// directory): the gateway never sends the body, so that deny-list never
/// fired and every model went through. Now any key or policy reading the
/// model gets its checks refused, nothing spent.
#[tokio::test(flavor = "multi_thread")]
async fn regression_forward_auth_refuses_checks_a_policy_reading_the_model_cannot_judge() {
    let up = Upstream::start().await;
    let home = Home::new();
    let policies = home.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::copy(
        Path::new(policies_dir()).join("default.datalog"),
        policies.join("default.datalog"),
    )
    .unwrap();
    home.write(
        "policies/00-no-gpt-4.datalog",
        "deny if model(\"gpt-4\");\n",
    );
    // Only this user may write a policy directory (the proxy refuses it
    // otherwise), whatever the umask.
    for p in [
        policies.clone(),
        policies.join("default.datalog"),
        policies.join("00-no-gpt-4.datalog"),
    ] {
        let mode = if p.is_dir() { 0o700 } else { 0o600 };
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }
    let proxy = till_for_gateways_with(&home, &up, policies.to_str().unwrap());
    let token = home.token("openai", Some(1));
    let r = client()
        .post(proxy.url("/auth/openai/v1/chat/completions"))
        .header("x-till-gateway-secret", GATEWAY_SECRET)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.headers().get("authorization").is_none());
    let body = r.text().await.unwrap();
    assert!(body.contains("model"), "{body}");
    // The proxy, which reads the body, enforces the policy and spends the
    // one use the refused check left.
    let send = |model: &'static str| {
        client()
            .post(proxy.url("/openai/v1/chat/completions"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(format!(r#"{{"model":"{model}","messages":[]}}"#))
            .send()
    };
    assert_eq!(send("gpt-4").await.unwrap().status().as_u16(), 403);
    assert_eq!(send("gpt-4o-mini").await.unwrap().status().as_u16(), 200);
    assert_eq!(up.count(), 1);
}
