//! Forwarding hygiene: what reaches the upstream is the method, path and
//! account that were authorized, and nothing a client adds can change that
//! (red-team issue 9, "Forwarding").

use till::token::Scope;

use crate::helpers::*;

fn under(prefix: &str) -> Scope {
    Scope {
        services: vec!["openai".into()],
        paths: vec![prefix.into()],
        ..Scope::default()
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// TRACE echoes the request, with the credential Till injected, back to the
/// client; CONNECT asks for a tunnel. Both are refused whatever the token,
/// even without one, and nothing reaches the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn regression_trace_and_connect_are_refused_before_the_credential_is_injected() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.token("openai", Some(10));
    let authority = up.addr.to_string();
    for (method, target) in [
        ("TRACE", "/openai/v1/chat/completions"),
        ("trace", "/openai/v1/models"),
        ("TRACK", "/openai/v1/models"),
        ("CONNECT", "/openai/v1/models"),
        ("CONNECT", authority.as_str()),
    ] {
        for (which, auth) in [
            ("valid token", format!("authorization: Bearer {token}\r\n")),
            ("no token", String::new()),
            ("bad token", "authorization: Bearer garbage\r\n".into()),
        ] {
            let (status, body) = raw_exchange(
                proxy.addr,
                &format!(
                    "{method} {target} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n{auth}"
                ),
            )
            .await;
            assert_eq!(status, 405, "{method} {target} with {which}: {body}");
            let v = json(&body);
            assert_eq!(v["error"]["code"], "method_not_allowed", "{v}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(msg.contains("never forwards"), "{msg}");
            assert!(!body.contains(OPENAI_SECRET), "credential echoed: {body}");
        }
    }
    assert_eq!(up.count(), 0, "nothing forwarded: {:?}", up.seen());
    // The refusals spent no activation: all ten are left.
    for _ in 0..10 {
        assert_eq!(chat(&proxy, &token, "m").await.0, 200);
    }
    assert_eq!(chat(&proxy, &token, "m").await.0, 429);
}

/// Tomcat and Spring drop `;` parameters from a segment before resolving dot
/// segments, so `/v1/chat/..;/files` is `/v1/files` to them while it looked
/// like a path under `/v1/chat/`.
#[tokio::test(flavor = "multi_thread")]
async fn regression_dot_segments_with_semicolons_cannot_escape_a_prefix() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(under("/v1/chat/"));
    let auth = format!("authorization: Bearer {token}\r\n");
    for path in [
        "/openai/v1/chat/..;/files",
        "/openai/v1/chat/.;/../files",
        "/openai/v1/chat/..;jsessionid=x/files",
        "/openai/v1/chat/%2e%2e;/files",
        "/openai/v1/chat/%2E%2E;/files",
        "/openai/v1/chat/..%3b/files",
        "/openai/v1/chat/..%3B/files",
        "/openai/v1/chat/.%2e%3bx=1/files",
    ] {
        let (status, body) = raw_exchange(
            proxy.addr,
            &format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n{auth}"),
        )
        .await;
        assert_eq!(status, 400, "{path}: {body}");
        let v = json(&body);
        assert_eq!(v["error"]["code"], "bad_request", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("'..;'"),
            "{v}"
        );
    }
    assert_eq!(up.count(), 0, "nothing forwarded: {:?}", up.seen());
    // A `;` that is not part of a dot segment is forwarded as sent.
    assert_eq!(
        raw_request(proxy.addr, "/openai/v1/chat/a;b=1/x", &auth).await,
        200
    );
    assert_eq!(up.seen()[0].uri, "/v1/chat/a;b=1/x");
}

/// Frameworks read these headers as the method or the path to act on, so an
/// agent allowed `GET /v1/chat/` could delete files; and headers the client
/// lists in `Connection` are hop-by-hop by declaration.
#[tokio::test(flavor = "multi_thread")]
async fn regression_method_override_and_rewrite_headers_do_not_reach_the_upstream() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(Scope {
        methods: vec!["GET".into()],
        ..under("/v1/chat/")
    });
    let dropped = [
        "x-http-method-override: DELETE",
        "X-HTTP-Method: DELETE",
        "x-method-override: DELETE",
        "X-Original-URL: /v1/files/file-1",
        "x-rewrite-url: /v1/files/file-1",
        "x-forwarded-prefix: /v1/files",
        "x-named-in-connection: 1",
        "x-also-named: 2",
        "x-named-on-a-second-line: 3",
    ];
    let mut extra = format!("authorization: Bearer {token}\r\nx-kept: yes\r\n");
    // raw_request sends `connection: close` itself; these add to it.
    extra.push_str("connection: X-Named-In-Connection , x-also-named\r\n");
    extra.push_str("connection: x-named-on-a-second-line\r\n");
    for h in dropped {
        extra.push_str(h);
        extra.push_str("\r\n");
    }
    assert_eq!(
        raw_request(proxy.addr, "/openai/v1/chat/x", &extra).await,
        200
    );
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].uri, "/v1/chat/x");
    assert_eq!(
        seen[0].headers["x-kept"], "yes",
        "ordinary headers still pass"
    );
    for h in dropped {
        let name = h.split(':').next().unwrap();
        assert!(
            seen[0].headers.get(name).is_none(),
            "{name} reached the upstream: {:?}",
            seen[0].headers
        );
    }
}

/// `?_method=DELETE` is read as the method by Rails, Laravel, Symfony and
/// others. Stripping it from the query would change what the upstream sees
/// in other ways, so the request is refused.
#[tokio::test(flavor = "multi_thread")]
async fn regression_method_override_query_parameter_is_refused() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(under("/v1/chat/"));
    let c = client();
    for query in [
        "_method=DELETE",
        "a=1&_METHOD=delete",
        "%5Fmethod=DELETE",
        "%5f%6D%65thod=DELETE",
        "%255Fmethod=DELETE",
        "_method[]=DELETE",
        "x=1;_method=DELETE",
        "_method",
        // PHP registers `.method` as `$_GET['_method']`, which Symfony and
        // Laravel read as the method (red team, wave 2, fourth pass).
        ".method=DELETE",
        "%2Emethod=DELETE",
    ] {
        let r = c
            .get(proxy.url(&format!("/openai/v1/chat/x?{query}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query}");
        let v = json(&r.text().await.unwrap());
        assert_eq!(v["error"]["code"], "bad_request", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("`_method`"),
            "{v}"
        );
    }
    assert_eq!(up.count(), 0, "nothing forwarded: {:?}", up.seen());
    // Other parameters, and `_method` as a value, are fine.
    for query in ["method=x", "my_method=x", "q=_method", "a.method=x"] {
        let r = c
            .get(proxy.url(&format!("/openai/v1/chat/x?{query}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{query}");
    }
    assert_eq!(up.count(), 4);
}

/// `OpenAI-Organization` / `OpenAI-Project` choose who is billed: by
/// default an agent's values are dropped; an upstream can set fixed values
/// or let the client choose, per header.
#[tokio::test(flavor = "multi_thread")]
async fn regression_billing_headers_are_dropped_unless_the_upstream_allows_them() {
    let up = Upstream::start().await;
    let home = Home::new();
    let token = home.token("openai", None);
    let send = |proxy: &Proxy| {
        client()
            .get(proxy.url("/openai/v1/models"))
            .bearer_auth(&token)
            .header("OpenAI-Organization", "org-chosen-by-agent")
            .header("OpenAI-Project", "proj-chosen-by-agent")
            .send()
    };

    let plain = Proxy::start(&home, &[openai(&up)], "");
    assert_eq!(send(&plain).await.unwrap().status(), 200);
    let s = &up.seen()[0];
    assert!(s.headers.get("openai-organization").is_none(), "{s:?}");
    assert!(s.headers.get("openai-project").is_none(), "{s:?}");
    drop(plain);

    let configured = Proxy::start(
        &home,
        &[],
        &format!(
            "[upstreams.openai]\nurl = {:?}\ncredential = {{ env = \"TEST_OPENAI_KEY\" }}\n\
             set_headers = {{ \"OpenAI-Organization\" = \"org-fixed-by-operator\" }}\n\
             pass_headers = [\"OpenAI-Project\"]\n",
            up.url()
        ),
    );
    assert_eq!(send(&configured).await.unwrap().status(), 200);
    let s = &up.seen()[1];
    let orgs: Vec<_> = s.headers.get_all("openai-organization").iter().collect();
    assert_eq!(
        orgs,
        ["org-fixed-by-operator"],
        "set, replacing the agent's"
    );
    assert_eq!(s.headers["openai-project"], "proj-chosen-by-agent");
    assert_eq!(
        s.headers["authorization"],
        format!("Bearer {OPENAI_SECRET}")
    );
    assert!(
        !configured.logs().contains("org-fixed-by-operator"),
        "a set header value is not logged"
    );
}

/// `https://user:secret@host` would send the secret as Basic auth and print
/// it wherever the URL is shown (the start banner, errors).
#[tokio::test(flavor = "multi_thread")]
async fn regression_upstream_url_with_userinfo_is_refused_at_start() {
    let up = Upstream::start().await;
    let home = Home::new();
    for url in [
        format!("http://user:s3cret-in-url@{}", up.addr),
        format!("http://s3cret-in-url@{}", up.addr),
        // Does not parse at all: the message must not show it either.
        "http://user:s3cret-in-url@".to_string(),
    ] {
        let cfg = home.write(
            "userinfo.toml",
            &format!(
                "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n[upstreams.openai]\nurl = {url:?}\n",
                home.path().to_str().unwrap()
            ),
        );
        let log = match Proxy::start_config(&home, &cfg) {
            Ok(_) => panic!("{url}: the proxy started"),
            Err(log) => log,
        };
        assert!(log.contains("upstreams.openai.url"), "{url}: {log}");
        assert!(
            !log.contains("s3cret-in-url"),
            "{url}: secret printed: {log}"
        );
        if url.contains(&up.addr.to_string()) {
            assert!(log.contains("`credential`"), "{url}: {log}");
        }
    }
    assert_eq!(up.count(), 0);
}

/// Till with the README's `00-no-delete.datalog` deny-list before the
/// default policy, forwarding `openai` to `up`.
fn proxy_without_delete(home: &Home, up: &Upstream) -> Proxy {
    let policies = home.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/policies/default.datalog"),
        policies.join("default.datalog"),
    )
    .unwrap();
    std::fs::write(
        policies.join("00-no-delete.datalog"),
        "deny if method(\"DELETE\");\n",
    )
    .unwrap();
    // Only this user may write policies (a checkout under umask 002 is
    // group-writable, and `fs::copy` keeps the mode).
    for f in ["default.datalog", "00-no-delete.datalog"] {
        let p = policies.join(f);
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    std::fs::set_permissions(
        &policies,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let config = home.write(
        "till.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\npolicies = {:?}\n\
             [upstreams.openai]\nurl = {:?}\ncredential = {{ env = \"TEST_OPENAI_KEY\" }}\n",
            home.path().to_str().unwrap(),
            policies.to_str().unwrap(),
            up.url(),
        ),
    );
    Proxy::start_config(home, &config).expect("proxy starts")
}

/// Regression: `delete` passed `deny if method("DELETE")` (the policy
/// compared the method as sent) and Werkzeug, Django and PHP ran it as
/// DELETE. A method with a lower-case letter is refused before the token is
/// read, spends nothing and reaches nothing.
#[tokio::test(flavor = "multi_thread")]
async fn regression_lower_case_methods_are_refused_not_passed_around_a_deny_list() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = proxy_without_delete(&home, &up);
    let token = home.token("openai", Some(1));
    let auth = format!("authorization: Bearer {token}\r\n");
    for method in ["delete", "Delete", "DELETe", "get"] {
        let (status, body) = raw_exchange(
            proxy.addr,
            &format!(
                "{method} /openai/v1/files/file-1 HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n{auth}"
            ),
        )
        .await;
        assert_eq!(status, 400, "{method}: {body}");
        let v = json(&body);
        assert_eq!(v["error"]["code"], "bad_request", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        let upper = method.to_ascii_uppercase();
        assert!(
            msg.contains(&format!("methods are upper case; send {upper}")),
            "{msg}"
        );
    }
    // The upper-case spelling meets the deny-list.
    let (status, body) = raw_exchange(
        proxy.addr,
        &format!(
            "DELETE /openai/v1/files/file-1 HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n{auth}"
        ),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(up.count(), 0, "nothing forwarded: {:?}", up.seen());
    // Nothing was spent: the key's one use is left.
    assert_eq!(
        raw_request(proxy.addr, "/openai/v1/models", &auth).await,
        200
    );
    assert_eq!(
        raw_request(proxy.addr, "/openai/v1/models", &auth).await,
        429
    );
}

/// The proxy with `up` as three upstreams, one per credential header
/// style (OpenAI's `Authorization`, Anthropic's `x-api-key`, and Azure's
/// `api-key` with a `set_headers` entry), and a token for all three.
fn three_header_styles(home: &Home, up: &Upstream) -> (Proxy, String) {
    let azure = format!(
        "[upstreams.azure]\nurl = {:?}\ncredential = {{ env = \"TEST_OPENAI_KEY\" }}\n\
         header = \"api-key\"\nprefix = \"\"\nset_headers = {{ \"X-Team\" = \"team-a\" }}\n",
        up.url()
    );
    let proxy = Proxy::start(home, &[openai(up), anthropic(up)], &azure);
    let token = home.issue(Scope {
        services: vec!["openai".into(), "anthropic".into(), "azure".into()],
        ..Scope::default()
    });
    (proxy, token)
}

/// Regression: the dashed spellings were removed but `X_HTTP_METHOD_OVERRIDE`
/// and `OpenAI_Organization` reached the upstream, where CGI and WSGI
/// servers read them as the dashed ones. Every header Till removes, or sets
/// itself, is matched in both spellings.
#[tokio::test(flavor = "multi_thread")]
async fn regression_underscore_spellings_of_filtered_headers_do_not_reach_the_upstream() {
    let up = Upstream::start().await;
    let home = Home::new();
    let (proxy, token) = three_header_styles(&home, &up);
    let extra = format!(
        "authorization: Bearer {token}\r\n\
         X_HTTP_METHOD_OVERRIDE: DELETE\r\n\
         X_Method_Override: DELETE\r\n\
         X_Original_URL: /v1/files\r\n\
         OpenAI_Organization: org-victim\r\n\
         OpenAI_Project: proj-victim\r\n\
         X_Forwarded_For: 1.2.3.4\r\n\
         X_Forwarded_Host: evil.example\r\n\
         X_Real_IP: 1.2.3.4\r\n\
         X_Api_Key: sk-client-key\r\n\
         Idempotency_Key: k-1\r\n\
         X_Kept: yes\r\n"
    );
    // The azure upstream's own credential header and the one it sets.
    let azure_extra = format!("{extra}Api_Key: sk-client-key\r\nX_Team: team-evil\r\n");
    for (path, extra) in [
        ("/openai/v1/models", &extra),
        ("/anthropic/v1/models", &extra),
        ("/azure/v1/models", &azure_extra),
    ] {
        assert_eq!(raw_request(proxy.addr, path, extra).await, 200, "{path}");
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        let names: Vec<&str> = s.headers.keys().map(|n| n.as_str()).collect();
        assert!(names.contains(&"x_kept"), "other headers pass: {names:?}");
        for n in &names {
            assert!(
                !n.contains('_') || *n == "x_kept",
                "{n} reached the upstream: {names:?}"
            );
        }
        for (_, v) in s.headers.iter() {
            let v = v.to_str().unwrap_or("");
            assert!(
                !v.contains("sk-client-key") && !v.contains("victim") && !v.contains("evil"),
                "{v}: {:?}",
                s.headers
            );
        }
    }
    assert_eq!(
        seen[1].headers["x-api-key"], ANTHROPIC_SECRET,
        "the credential is Till's"
    );
    assert_eq!(seen[2].headers["api-key"], OPENAI_SECRET);
    assert_eq!(seen[2].headers["x-team"], "team-a");
}

/// Regression: with two `Content-Type` headers Till read the first (JSON,
/// an allowed model) and Werkzeug the last (a form naming another model).
/// Refused before anything is spent or forwarded.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_request_with_two_content_types_is_refused() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        models: vec!["gpt-4o-mini".into()],
        max_uses: Some(1),
        ..Scope::default()
    });
    let body = r#"{"model":"gpt-4o-mini","user":"&model=gpt-4-32k&"}"#;
    for types in [
        &["application/json", "application/x-www-form-urlencoded"][..],
        &["application/json", "application/json"],
        &["application/json, application/x-www-form-urlencoded"],
    ] {
        let mut rb = client()
            .post(proxy.url("/openai/v1/chat/completions"))
            .bearer_auth(&token)
            .body(body);
        for t in types {
            rb = rb.header("content-type", *t);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 400, "{types:?}");
        let v = json(&r.text().await.unwrap());
        assert_eq!(v["error"]["code"], "bad_request", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Content-Type"),
            "{v}"
        );
    }
    assert_eq!(up.count(), 0, "nothing forwarded: {:?}", up.seen());
    // Nothing was spent: the key's one use is left.
    assert_eq!(chat(&proxy, &token, "gpt-4o-mini").await.0, 200);
    assert_eq!(chat(&proxy, &token, "gpt-4o-mini").await.0, 429);
}

/// Regression: `_method` was refused in the query but a form body
/// `_method=DELETE` was forwarded, and Rack, Laravel and Symfony read it as
/// the method (Laravel from a JSON body too). Refused before anything is
/// spent; other forms and JSON bodies pass unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn regression_method_override_in_the_body_is_refused() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.token("openai", Some(2));
    let post = |content_type: Option<&str>, body: &str| {
        let mut rb = client()
            .post(proxy.url("/openai/v1/files"))
            .bearer_auth(&token)
            .body(body.to_string());
        if let Some(t) = content_type {
            rb = rb.header("content-type", t);
        }
        rb.send()
    };
    let form = Some("application/x-www-form-urlencoded");
    for (content_type, body) in [
        (form, "purpose=x&_method=DELETE"),
        (form, "_METHOD=delete"),
        (form, "a=1&%5Fmethod=DELETE"),
        (form, "_method%5B%5D=DELETE"),
        // PHP registers `.method` as `$_POST['_method']`.
        (form, "purpose=x&.method=DELETE"),
        (form, "%2Emethod=DELETE"),
        (
            Some("Application/X-WWW-Form-Urlencoded; charset=utf-8"),
            "_method=DELETE",
        ),
        // Rack reads a POST body without a Content-Type as a form.
        (None, "_method=DELETE"),
        (
            Some("application/json"),
            r#"{"model":"m","_method":"DELETE"}"#,
        ),
        (Some("text/json"), r#"{"_method":"DELETE"}"#),
        (Some("application/json"), r#"{"\u005fmethod":"DELETE"}"#),
    ] {
        let r = post(content_type, body).await.unwrap();
        assert_eq!(r.status(), 400, "{content_type:?} {body}");
        let v = json(&r.text().await.unwrap());
        assert_eq!(v["error"]["code"], "bad_request", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("_method"),
            "{v}"
        );
    }
    assert_eq!(up.count(), 0, "nothing forwarded: {:?}", up.seen());
    // Nothing was spent: both uses are left, and bodies without `_method`
    // reach the upstream as sent.
    let r = post(form, "purpose=x&q=_method").await.unwrap();
    assert_eq!(r.status(), 200);
    let r = post(
        Some("application/json"),
        r#"{"model":"m","meta":{"_method":"x"}}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let seen = up.seen();
    assert_eq!(seen[0].body, "purpose=x&q=_method");
    assert_eq!(seen[1].body, r#"{"model":"m","meta":{"_method":"x"}}"#);
    assert_eq!(post(form, "a=1").await.unwrap().status(), 429);
}

/// Regression: `Connection: Content-Type` dropped the Content-Type Till had
/// read the body by, so a JSON body (an allowed model) reached the upstream
/// without one, and Rack reads such a POST as a form: `_method=DELETE`,
/// `model=gpt-4`. A `Connection` naming a header that says how to read the
/// body is refused, in either spelling and on any of its lines, before
/// anything is spent or forwarded.
#[tokio::test(flavor = "multi_thread")]
async fn regression_connection_cannot_drop_the_headers_till_read_the_body_by() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        models: vec!["gpt-4o-mini".into()],
        max_uses: Some(1),
        ..Scope::default()
    });
    let body = r#"{"model":"gpt-4o-mini","x":"&_method=DELETE&model=gpt-4&"}"#;
    for (connection, named) in [
        ("close, Content-Type", "content-type"),
        ("close\r\nconnection: content-type", "content-type"),
        ("close, Content_Type", "content-type"),
        ("close, Content-Encoding", "content-encoding"),
        ("close, content-length", "content-length"),
    ] {
        let answer = raw_answer(
            proxy.addr,
            &format!(
                "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n\
                 authorization: Bearer {token}\r\ncontent-type: application/json\r\n\
                 connection: {connection}\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
        .await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 "), "{connection}: {answer}");
        assert!(head.contains("x-should-retry: false"), "{head}");
        let v = json(body);
        assert_eq!(v["error"]["code"], "bad_request", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(&format!("the Connection header names {named}")),
            "{msg}"
        );
    }
    assert_eq!(up.count(), 0, "nothing forwarded: {:?}", up.seen());
    // Nothing was spent: the key's one use is left.
    assert_eq!(chat(&proxy, &token, "gpt-4o-mini").await.0, 200);
    assert_eq!(up.seen()[0].headers["content-type"], "application/json");
    assert_eq!(chat(&proxy, &token, "gpt-4o-mini").await.0, 429);
}

/// A `Connection` naming the token's header, the upstream's credential
/// header or a header the upstream sets drops only the client's copy: the
/// credential and the set headers are Till's, whatever the client names,
/// and the client's own never ride along.
#[tokio::test(flavor = "multi_thread")]
async fn connection_cannot_remove_the_injected_credential_or_pass_the_clients() {
    let up = Upstream::start().await;
    let home = Home::new();
    let (proxy, token) = three_header_styles(&home, &up);
    let named = "connection: Authorization, x-api-key, API-Key, api_key, x-team, X_Team\r\n\
                 api-key: sk-client-key\r\nx-team: team-evil\r\n";
    for (path, token_header) in [
        (
            "/openai/v1/models",
            format!("authorization: Bearer {token}"),
        ),
        ("/anthropic/v1/models", format!("x-api-key: {token}")),
        ("/azure/v1/models", format!("authorization: Bearer {token}")),
    ] {
        let extra = format!("{token_header}\r\n{named}");
        assert_eq!(raw_request(proxy.addr, path, &extra).await, 200, "{path}");
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    let only = |s: &Seen, name: &str| -> Vec<String> {
        s.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        only(&seen[0], "authorization"),
        [format!("Bearer {OPENAI_SECRET}")]
    );
    assert_eq!(only(&seen[1], "x-api-key"), [ANTHROPIC_SECRET]);
    assert_eq!(only(&seen[2], "api-key"), [OPENAI_SECRET]);
    assert_eq!(only(&seen[2], "x-team"), ["team-a"]);
    for s in &seen {
        for (name, v) in s.headers.iter() {
            let v = v.to_str().unwrap_or("");
            assert!(
                !v.contains("sk-client-key") && !v.contains("team-evil") && !v.contains(&token),
                "{name}: {v}"
            );
        }
    }
}

/// Regression: a JSON or form body sent with `Content-Encoding: gzip` was
/// forwarded unread, since Till cannot check compressed bytes (`model`,
/// `_method`), while an upstream that decodes request bodies acts on what
/// is inside. Such bodies are refused (415) before anything is spent;
/// bodies Till streams unread keep their coding.
#[tokio::test(flavor = "multi_thread")]
async fn regression_compressed_bodies_till_reads_are_refused() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.token("openai", Some(2));
    let gzipped: &[u8] = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03compressed bytes";
    let post = |content_type: Option<&str>, coding: &str, body: &[u8]| {
        let mut rb = client()
            .post(proxy.url("/openai/v1/files"))
            .bearer_auth(&token)
            .header("content-encoding", coding)
            .body(body.to_vec());
        if let Some(t) = content_type {
            rb = rb.header("content-type", t);
        }
        rb.send()
    };
    let json_type = Some("application/json");
    for (content_type, coding, shown) in [
        (json_type, "gzip", "\"gzip\""),
        (json_type, "GZIP", "\"GZIP\""),
        (json_type, "identity, br", "\"br\""),
        (
            Some("application/x-www-form-urlencoded"),
            "deflate",
            "\"deflate\"",
        ),
        // Rack reads a POST body without a Content-Type as a form.
        (None, "x-custom", "\"x-custom\""),
    ] {
        let r = post(content_type, coding, gzipped).await.unwrap();
        assert_eq!(r.status(), 415, "{content_type:?} {coding}");
        assert_eq!(r.headers()["x-should-retry"], "false");
        assert_eq!(r.headers()["accept-encoding"], "identity");
        let v = json(&r.text().await.unwrap());
        assert_eq!(v["error"]["code"], "unsupported_content_encoding", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(shown) && msg.contains("send the body uncompressed"),
            "{msg}"
        );
    }
    assert_eq!(up.count(), 0, "nothing forwarded: {:?}", up.seen());
    // Nothing was spent: both uses are left. `identity` is no coding, and a
    // body Till does not read passes with its coding.
    let r = post(json_type, "identity", br#"{"model":"m"}"#)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = post(Some("application/octet-stream"), "gzip", gzipped)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = up.seen();
    assert_eq!(seen[1].headers["content-encoding"], "gzip");
    assert_eq!(
        post(json_type, "identity", b"{}").await.unwrap().status(),
        429
    );
}

/// Till forwarding `openai` to the upstream at `url`.
fn proxy_to(home: &Home, url: String) -> Proxy {
    let up = Up {
        name: "openai",
        url,
        header: "authorization",
        prefix: "Bearer ",
        env: "TEST_OPENAI_KEY",
    };
    Proxy::start(home, &[up], "")
}

/// Regression: an answer with both `Transfer-Encoding: chunked` and
/// `Content-Length` was relayed with the length (the chunked framing
/// removed), so the client read a body cut short that looked complete.
/// RFC 9112 §6.3: the length is not the body's; it is removed.
#[tokio::test(flavor = "multi_thread")]
async fn regression_an_answer_framed_by_transfer_encoding_loses_its_content_length() {
    let url = canned_upstream(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\
         content-length: 3\r\nconnection: close\r\n\r\nc\r\nhello, world\r\n0\r\n\r\n",
    )
    .await;
    let home = Home::new();
    let proxy = proxy_to(&home, url);
    let r = client()
        .get(proxy.url("/openai/v1/models"))
        .bearer_auth(home.token("openai", None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-length").is_none(), "{r:?}");
    assert_eq!(r.text().await.unwrap(), "hello, world");
}

/// Regression: headers the upstream names in its own `Connection` (hop-by-
/// hop by declaration) reached the client. They are removed, as on the
/// request side; what says how to read the body stays, since the client
/// reads the body by it (and no sender may name it, RFC 9110 §7.6.1).
#[tokio::test(flavor = "multi_thread")]
async fn regression_headers_an_answer_names_in_connection_do_not_reach_the_client() {
    let url = canned_upstream(
        "HTTP/1.1 200 OK\r\nconnection: X-Hop-Secret, Content-Type, close\r\n\
         connection: x-hop-other\r\nx-hop-secret: s3cret\r\nx-hop-other: 1\r\n\
         x-kept: yes\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await;
    let home = Home::new();
    let proxy = proxy_to(&home, url);
    let r = client()
        .get(proxy.url("/openai/v1/models"))
        .bearer_auth(home.token("openai", None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert!(h.get("x-hop-secret").is_none(), "{h:?}");
    assert!(h.get("x-hop-other").is_none(), "{h:?}");
    assert_eq!(h["x-kept"], "yes");
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(r.text().await.unwrap(), "{}");
}

/// Regression (red team, wave 2, fifth pass): Rack 2 (`normalize_params`,
/// the regex `\A[\[\]]*([^\[\]]+)\]*`) and `qs` (Express's extended forms)
/// read `[_method]=DELETE` as `_method`, so `Rack::MethodOverride` ran a
/// POST Till authorized as DELETE; and `[model]`, `model]` (Rack 2) and
/// `model%00` (PHP ends a name at a NUL byte) are `model`, so a second
/// model passed beside an allowed one. Names are now read as those
/// frameworks read them, in the query, a form body and a multipart body.
#[tokio::test(flavor = "multi_thread")]
async fn regression_bracketed_and_nul_spellings_of_method_and_model_names_are_read() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        models: vec!["gpt-4o-mini".into()],
        max_uses: Some(1),
        ..Scope::default()
    });
    let send = |query: &str, ct: &str, body: &str| {
        client()
            .post(proxy.url(&format!("/openai/v1/chat/completions?{query}")))
            .bearer_auth(&token)
            .header("content-type", ct)
            .body(body.to_string())
            .send()
    };
    let form = "application/x-www-form-urlencoded";
    let multipart = |name: &str| {
        format!(
            "--b\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-mini\r\n--b\r\ncontent-disposition: form-data; name=\"{name}\"\r\n\r\nDELETE\r\n--b--\r\n"
        )
    };
    for (query, ct, body) in [
        ("", form, "model=gpt-4o-mini&[_method]=DELETE".to_string()),
        ("", form, "model=gpt-4o-mini&]_method=DELETE".to_string()),
        (
            "",
            form,
            "model=gpt-4o-mini&%5B_method%5D=DELETE".to_string(),
        ),
        ("[_method]=DELETE", form, "model=gpt-4o-mini".to_string()),
        (
            "",
            "multipart/form-data; boundary=b",
            multipart("[_method]"),
        ),
    ] {
        let r = send(query, ct, &body).await.unwrap();
        let status = r.status();
        let v = json(&r.text().await.unwrap());
        assert_eq!(status, 400, "{query} {body}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("_method"),
            "{v}"
        );
    }
    for (query, body) in [
        ("", "model=gpt-4o-mini&[model]=gpt-4"),
        ("", "model=gpt-4o-mini&model]=gpt-4"),
        ("", "model=gpt-4o-mini&%5Dmodel=gpt-4"),
        ("", "model=gpt-4o-mini&model%00=gpt-4"),
        ("", "model=gpt-4o-mini&model%00x=gpt-4"),
        ("[model]=gpt-4", "model=gpt-4o-mini"),
    ] {
        let r = send(query, form, body).await.unwrap();
        let status = r.status();
        let v = json(&r.text().await.unwrap());
        assert_eq!(status, 400, "{query} {body}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("two models")
                || v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("names the model"),
            "{v}"
        );
    }
    // Alone, the bracketed model is the model, and judged.
    let r = send("", form, "x=1&[model]=gpt-4").await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(up.count(), 0, "nothing forwarded: {:?}", up.seen());
    // Names that are not `model` or `_method` to anyone still pass, and the
    // refusals spent nothing.
    let r = send("", form, "x=1&[model]=gpt-4o-mini&[models]=x&my_method=x")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.count(), 1);
}

/// Regression (red team, wave 2, fifth pass): a Content-Type whose media
/// type is a form and which names JSON in a parameter
/// (`application/x-www-form-urlencoded; x=/json`) made Till read the body
/// as JSON (as Laravel does), while Rack, PHP, Go and Starlette read it as
/// the form its media type says: `{"model":"gpt-4o-mini","x":"&model=gpt-4&_method=DELETE&"}`
/// was an allowed model to Till and a DELETE of gpt-4 to Rails.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_form_content_type_that_names_json_is_refused() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let restricted = home.issue(Scope {
        services: vec!["openai".into()],
        models: vec!["gpt-4o-mini".into()],
        max_uses: Some(1),
        ..Scope::default()
    });
    let open = home.token("openai", Some(1));
    let body = r#"{"model":"gpt-4o-mini","x":"&model=gpt-4&_method=DELETE&"}"#;
    for token in [&restricted, &open] {
        for ct in [
            "application/x-www-form-urlencoded; x=/json",
            "application/x-www-form-urlencoded;charset=utf-8;profile=\"a+json\"",
            "Application/X-WWW-Form-Urlencoded /json",
        ] {
            let r = client()
                .post(proxy.url("/openai/v1/chat/completions"))
                .bearer_auth(token)
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let v = json(&r.text().await.unwrap());
            assert_eq!(status, 400, "{ct}: {v}");
            assert!(
                v["error"]["message"].as_str().unwrap().contains("form"),
                "{v}"
            );
        }
    }
    assert_eq!(up.count(), 0, "nothing forwarded: {:?}", up.seen());
    // Either type alone still passes, and nothing was spent.
    for (token, ct) in [
        (&restricted, "application/json; charset=utf-8"),
        (&open, "application/x-www-form-urlencoded; charset=utf-8"),
    ] {
        let r = client()
            .post(proxy.url("/openai/v1/chat/completions"))
            .bearer_auth(token)
            .header("content-type", ct)
            .body(if ct.contains("json") {
                r#"{"model":"gpt-4o-mini"}"#
            } else {
                "model=gpt-4o-mini"
            })
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{ct}");
    }
}

/// Regression (red team, wave 2, fifth pass): a `model` value serde cannot
/// parse (`1e400`, nesting past 128 levels) made Till read nothing of the
/// JSON body, so a `_method` key after it was not checked, while PHP's
/// `json_decode` reads both (INF, 512 levels) and Laravel runs the POST as
/// DELETE. Any key, model-restricted or not.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_json_method_override_after_an_unparseable_model_value_is_refused() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        methods: vec!["POST".into()],
        max_uses: Some(1),
        ..Scope::default()
    });
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    for body in [
        r#"{"model":1e400,"_method":"DELETE"}"#.to_string(),
        format!(r#"{{"model":{deep},"_method":"DELETE"}}"#),
    ] {
        let r = client()
            .post(proxy.url("/openai/v1/files/file-1"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let v = json(&r.text().await.unwrap());
        assert_eq!(status, 400, "{body}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("_method"),
            "{v}"
        );
    }
    assert_eq!(up.count(), 0, "nothing forwarded: {:?}", up.seen());
    // Such a body without `_method` is the upstream's to judge, and the
    // refusals spent nothing.
    let r = client()
        .post(proxy.url("/openai/v1/files/file-1"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(r#"{"model":1e400}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.count(), 1);
}

/// Regression (red team, wave 2, fifth pass): Rack's `Request#content_type`
/// reads an empty `Content-Type` as none, and a POST without one is a form
/// to it, so `Content-Type:` (empty) with `_method=DELETE` ran DELETE on
/// Rails for a POST-only key; Till, seeing a Content-Type that was not a
/// form, streamed the body unread.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_post_with_an_empty_content_type_is_read_as_a_form() {
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(Scope {
        services: vec!["openai".into()],
        methods: vec!["POST".into()],
        max_uses: Some(1),
        ..Scope::default()
    });
    let post = |body: &'static str| {
        client()
            .post(proxy.url("/openai/v1/files/file-1"))
            .bearer_auth(&token)
            .header("content-type", "")
            .body(body)
            .send()
    };
    let r = post("purpose=x&_method=DELETE").await.unwrap();
    let status = r.status();
    let v = json(&r.text().await.unwrap());
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("_method"),
        "{v}"
    );
    assert_eq!(up.count(), 0, "nothing forwarded: {:?}", up.seen());
    // A form without `_method` passes, and the refusal spent nothing.
    assert_eq!(post("purpose=x").await.unwrap().status(), 200);
    assert_eq!(up.seen()[0].body, "purpose=x");
}
