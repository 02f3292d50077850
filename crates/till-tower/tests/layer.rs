//! The layer in process, fed from a file: what a service relies on, and
//! what an attacker would try (forged, replayed and stale feeds, use limits
//! without a counter, ambiguous bodies, paths in disguise).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use biscuit_auth::KeyPair;
use http::Request;
use till_core::{Feed, Scope, attenuate, issue, keys};
use till_tower::{FeedSource, TillHandle, TillLayer, TillToken, UseLimits};
use tower::ServiceExt;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Fixture {
    root: KeyPair,
    _dir: tempfile::TempDir,
    feed: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let feed = dir.path().join("feed.json");
        let f = Fixture {
            root: keys::generate(),
            _dir: dir,
            feed,
        };
        f.publish(&[], now());
        f
    }

    fn publish_signed_by(&self, key: &KeyPair, ids: &[String], issued_at: u64) {
        let feed = Feed::sign(key, ids.to_vec(), issued_at).unwrap();
        // Atomic, so a refresh never reads half a file.
        let tmp = self.feed.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string(&feed).unwrap()).unwrap();
        std::fs::rename(&tmp, &self.feed).unwrap();
    }

    fn publish(&self, ids: &[String], issued_at: u64) {
        self.publish_signed_by(&self.root, ids, issued_at);
    }

    fn token(&self, scope: Scope) -> String {
        issue(&self.root, &scope).unwrap()
    }

    fn items(&self) -> String {
        self.token(Scope {
            services: vec!["items".into()],
            paths: vec!["/v1/items".into()],
            ..Scope::default()
        })
    }

    async fn app(&self, use_limits: UseLimits, max_age: u64) -> (Router, TillHandle) {
        let (layer, handle) = TillLayer::builder("items")
            .public_key(&keys::public_string(&self.root.public()))
            .feed(FeedSource::File(self.feed.clone()))
            .max_feed_age(Duration::from_secs(max_age))
            .refresh_every(Duration::from_millis(20))
            .use_limits(use_limits)
            .build()
            .unwrap();
        let app = Router::new()
            .route(
                "/v1/items",
                get(|t: TillToken| async move {
                    format!("{} {}", t.family(), t.label().unwrap_or("-"))
                })
                .post(|body: String| async move { body }),
            )
            .route("/v1/admin", post(|| async { "admin" }))
            .layer(layer);
        wait_until(|| handle.feed_version().is_some(), &handle).await;
        (app, handle)
    }
}

/// Polls `cond` every 10 ms for up to 10 s (no timed assertion: the bound
/// only stops a broken build from hanging).
async fn wait_until(mut cond: impl FnMut() -> bool, handle: &TillHandle) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "condition never held; last refresh error: {:?}",
        handle.last_refresh_error()
    );
}

async fn send(app: &Router, req: Request<Body>) -> (u16, serde_json::Value, String) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("x-should-retry")
        .map(|v| v.to_str().unwrap().to_string());
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&bytes).to_string();
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (status, json, retry.unwrap_or_default() + "|" + &text)
}

fn get_items(token: &str) -> Request<Body> {
    Request::get("/v1/items")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap()
}

fn post_json(path: &str, token: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header("x-api-key", token)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

#[tokio::test]
async fn in_scope_passes_with_the_token_out_of_scope_and_bad_tokens_are_refused() {
    let f = Fixture::new();
    let (app, _h) = f.app(UseLimits::Deny, 60).await;
    let token = f.items();
    let family = till_core::RawToken::parse(&token).unwrap().revocation_ids()[0].clone();
    let labelled = attenuate(
        &token,
        &Scope {
            label: Some("agent-7".into()),
            ..Scope::default()
        },
    )
    .unwrap();
    let (s, _, body) = send(&app, get_items(&labelled)).await;
    assert_eq!(s, 200, "{body}");
    assert!(body.ends_with(&format!("{family} agent-7")), "{body}");

    // Another path, another service, no token, garbage, a provider key.
    let (s, j, _) = send(&app, post_json("/v1/admin", &token, "{}")).await;
    assert_eq!(
        (s, j["error"]["code"].as_str()),
        (403, Some("out_of_scope"))
    );
    let billing = f.token(Scope {
        services: vec!["billing".into()],
        ..Scope::default()
    });
    assert_eq!(send(&app, get_items(&billing)).await.0, 403);
    let none = Request::get("/v1/items").body(Body::empty()).unwrap();
    let (s, j, text) = send(&app, none).await;
    assert_eq!(
        (s, j["error"]["code"].as_str()),
        (401, Some("missing_token"))
    );
    assert!(text.starts_with("false|"), "{text}");
    assert_eq!(send(&app, get_items("garbage")).await.0, 401);
    let (s, j, _) = send(&app, get_items("sk-proj-0123456789")).await;
    assert_eq!(s, 401);
    assert!(!j.to_string().contains("0123456789"), "{j}");
    // A token of another installation.
    let foreign = issue(
        &keys::generate(),
        &Scope {
            services: vec!["items".into()],
            ..Scope::default()
        },
    )
    .unwrap();
    assert_eq!(send(&app, get_items(&foreign)).await.0, 401);
}

/// A path spelled so that it normalises into the scope must not reach a
/// route outside it.
#[tokio::test]
async fn a_path_not_in_normal_form_is_refused() {
    let f = Fixture::new();
    let (app, _h) = f.app(UseLimits::Deny, 60).await;
    let token = f.items();
    for p in ["/v1/items/../admin", "/v1//items", "/v1/items/%2e%2e/admin"] {
        let (s, _, body) = send(&app, post_json(p, &token, "{}")).await;
        assert_eq!(s, 400, "{p}: {body}");
    }
}

/// A deny-list of DELETE must not be passed by `delete`, which many
/// frameworks behind the layer upper-case and run as DELETE.
#[tokio::test]
async fn a_method_with_lower_case_letters_is_refused() {
    let f = Fixture::new();
    let (app, _h) = f.app(UseLimits::Deny, 60).await;
    let token = f.token(Scope {
        services: vec!["items".into()],
        ..Scope::default()
    });
    let no_delete = attenuate(
        &token,
        &Scope {
            datalog: Some("check if method($m), $m != \"DELETE\";".into()),
            ..Scope::default()
        },
    )
    .unwrap();
    let req = |m: &[u8]| {
        Request::builder()
            .method(http::Method::from_bytes(m).unwrap())
            .uri("/v1/items")
            .header("authorization", format!("Bearer {no_delete}"))
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(send(&app, req(b"DELETE")).await.0, 403);
    for m in [&b"delete"[..], b"Delete", b"get"] {
        let (s, _, body) = send(&app, req(m)).await;
        assert_eq!(s, 400, "{body}");
        assert!(body.contains("methods are upper case"), "{body}");
    }
    assert_eq!(send(&app, req(b"GET")).await.0, 200);
}

#[tokio::test]
async fn use_limits_are_refused_by_default_and_ignored_only_by_the_danger_choice() {
    let f = Fixture::new();
    let limited = f.token(Scope {
        services: vec!["items".into()],
        max_uses: Some(3),
        ..Scope::default()
    });
    // A child's limit too.
    let child = attenuate(
        &f.items(),
        &Scope {
            max_uses: Some(1),
            ..Scope::default()
        },
    )
    .unwrap();
    let (app, _h) = f.app(UseLimits::Deny, 60).await;
    for t in [&limited, &child] {
        let (s, j, _) = send(&app, get_items(t)).await;
        assert_eq!(s, 403, "{j}");
        assert_eq!(j["error"]["code"], "use_limits_unenforced");
        assert!(
            j["error"]["message"]
                .as_str()
                .unwrap()
                .contains("cannot enforce them"),
            "{j}"
        );
    }
    let (app, _h2) = f.app(UseLimits::DangerIgnoreUseLimits, 60).await;
    for _ in 0..5 {
        assert_eq!(send(&app, get_items(&child)).await.0, 200);
    }
}

#[tokio::test]
async fn a_revoked_block_is_refused_once_the_feed_lists_it() {
    let f = Fixture::new();
    let (app, h) = f.app(UseLimits::Deny, 60).await;
    let parent = f.items();
    let child = attenuate(&parent, &Scope::default()).unwrap();
    assert_eq!(send(&app, get_items(&child)).await.0, 200);
    // Revoking the parent revokes the child.
    let id = till_core::RawToken::parse(&parent)
        .unwrap()
        .revocation_ids()[0]
        .clone();
    f.publish(&[id], now());
    wait_until(|| h.feed_version() == Some(1), &h).await;
    let (s, j, _) = send(&app, get_items(&child)).await;
    assert_eq!(
        (s, j["error"]["code"].as_str()),
        (403, Some("token_revoked"))
    );
    // A replayed older feed (genuinely signed, fresh, without the id) is
    // not taken: revocations are never undone.
    f.publish(&[], now() + 1);
    wait_until(
        || h.refresh_failures() > 0 && h.last_refresh_error().is_some_and(|e| e.contains("older")),
        &h,
    )
    .await;
    assert_eq!(send(&app, get_items(&child)).await.0, 403);
}

#[tokio::test]
async fn regression_a_feed_with_new_revocations_is_taken_even_if_dated_earlier() {
    // The proxy ran with its clock ahead, then restarted with it stepped
    // back: its next feed carries a new revocation but an earlier time.
    // Refusing it as a replay held the revocation back for as long as the
    // clock had been ahead.
    let f = Fixture::new();
    f.publish(&[], now() + 30);
    let (app, h) = f.app(UseLimits::Deny, 60).await;
    let token = f.items();
    assert_eq!(send(&app, get_items(&token)).await.0, 200);
    let id = till_core::RawToken::parse(&token).unwrap().revocation_ids()[0].clone();
    f.publish(std::slice::from_ref(&id), now());
    wait_until(|| h.feed_version() == Some(1), &h).await;
    let (s, j, _) = send(&app, get_items(&token)).await;
    assert_eq!(
        (s, j["error"]["code"].as_str()),
        (403, Some("token_revoked"))
    );
    // The same list dated earlier still is a replay: not taken.
    f.publish(&[id], now() - 5);
    wait_until(
        || h.last_refresh_error().is_some_and(|e| e.contains("older")),
        &h,
    )
    .await;
    assert_eq!(h.feed_version(), Some(1));
}

#[tokio::test]
async fn a_stale_or_forged_feed_fails_closed_until_a_fresh_one_arrives() {
    let f = Fixture::new();
    // Two seconds old already: stale for a 1 s maximum.
    f.publish(&[], now() - 2);
    let (layer, h) = TillLayer::builder("items")
        .public_key(&keys::public_string(&f.root.public()))
        .feed(FeedSource::File(f.feed.clone()))
        .max_feed_age(Duration::from_secs(1))
        .refresh_every(Duration::from_millis(20))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/v1/items", get(|| async { "ok" }))
        .layer(layer);
    let token = f.items();
    let (s, j, text) = send(&app, get_items(&token)).await;
    assert_eq!(
        (s, j["error"]["code"].as_str()),
        (503, Some("revocation_feed_stale"))
    );
    assert!(text.starts_with("true|"), "{text}");
    wait_until(
        || h.last_refresh_error().is_some_and(|e| e.contains("stale")),
        &h,
    )
    .await;
    assert!(h.feed_stale());
    assert!(h.render_prometheus().contains("till_feed_stale 1"));
    // A fresh feed signed by another key is refused: still 503.
    f.publish_signed_by(&keys::generate(), &[], now());
    wait_until(
        || {
            h.last_refresh_error()
                .is_some_and(|e| e.contains("signature"))
        },
        &h,
    )
    .await;
    assert_eq!(send(&app, get_items(&token)).await.0, 503);
    // Dated in the future beyond the allowed age: refused (its age would
    // read 0 for that long).
    f.publish(&[], now() + 3600);
    wait_until(
        || h.last_refresh_error().is_some_and(|e| e.contains("future")),
        &h,
    )
    .await;
    assert_eq!(send(&app, get_items(&token)).await.0, 503);
    // The genuine fresh feed: served again.
    f.publish(&[], now());
    wait_until(|| !h.feed_stale(), &h).await;
    assert_eq!(send(&app, get_items(&token)).await.0, 200);
    assert!(h.render_prometheus().contains("till_feed_version 0"));
}

#[tokio::test]
async fn dropping_the_handle_stops_the_refresh_and_the_feed_goes_stale() {
    let f = Fixture::new();
    let (app, h) = f.app(UseLimits::Deny, 1).await;
    let token = f.items();
    assert_eq!(send(&app, get_items(&token)).await.0, 200);
    drop(h);
    // Fresh files keep coming, but nobody reads them.
    for _ in 0..1000 {
        f.publish(&[], now());
        if send(&app, get_items(&token)).await.0 == 503 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the layer kept serving with no refresh");
}

#[tokio::test]
async fn the_model_of_a_json_body_is_checked_and_the_body_reaches_the_handler() {
    let f = Fixture::new();
    let (app, _h) = f.app(UseLimits::Deny, 60).await;
    let token = f.token(Scope {
        services: vec!["items".into()],
        models: vec!["small".into()],
        ..Scope::default()
    });
    let body = r#"{"model":"small","n":1}"#;
    let (s, _, text) = send(&app, post_json("/v1/items", &token, body)).await;
    assert_eq!(s, 200, "{text}");
    assert!(text.ends_with(body), "the handler got the body: {text}");
    let (s, _, _) = send(&app, post_json("/v1/items", &token, r#"{"model":"large"}"#)).await;
    assert_eq!(s, 403);
    // A second key an upstream may read as the model.
    let (s, _, _) = send(
        &app,
        post_json("/v1/items", &token, r#"{"model":"small","MODEL":"large"}"#),
    )
    .await;
    assert_eq!(s, 400);
    // A body over the bound is not read to the end.
    let big = format!(r#"{{"model":"small","pad":"{}"}}"#, "x".repeat(2 << 20));
    assert_eq!(
        send(&app, post_json("/v1/items", &token, &big)).await.0,
        413
    );
}

/// Regression (red team, wave 2, fourth pass): the layer reads the model of
/// JSON bodies only, and no MCP message at all, so a deny-list on either
/// (`reject if model("large")` with the model in a form body, `reject if
/// tool("delete_everything")`) never fired and the handler got the request.
#[tokio::test]
async fn regression_keys_that_read_facts_the_layer_cannot_see_are_refused() {
    let f = Fixture::new();
    let (app, _h) = f.app(UseLimits::Deny, 60).await;
    let with = |datalog: &str| {
        f.token(Scope {
            services: vec!["items".into()],
            datalog: Some(datalog.into()),
            ..Scope::default()
        })
    };
    // A body the layer does not read (FastAPI handlers `json.loads` any).
    let form = |token: &str, body: &str| {
        Request::post("/v1/items")
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "text/plain")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let no_large = with(r#"reject if model("large");"#);
    let (s, j, text) = send(&app, form(&no_large, "model=large")).await;
    assert_eq!(s, 403, "{text}");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("JSON body"),
        "{text}"
    );
    // Where the layer reads the model, the deny-list decides.
    let (s, _, _) = send(
        &app,
        post_json("/v1/items", &no_large, r#"{"model":"large"}"#),
    )
    .await;
    assert_eq!(s, 403);
    let (s, _, text) = send(
        &app,
        post_json("/v1/items", &no_large, r#"{"model":"small"}"#),
    )
    .await;
    assert_eq!(s, 200, "{text}");
    // JSON the layer cannot read as a handler's parser may (Python's `json`
    // takes a byte order mark and NaN; serde reads a struct from an array):
    // it named no model, so the deny-list passed (red team, wave 2, fourth
    // pass). Refused for a key reading the model.
    for body in [
        "\u{feff}{\"model\":\"large\"}",
        r#"{"model":"large","t":NaN}"#,
        r#"["large"]"#,
    ] {
        let (s, j, text) = send(&app, post_json("/v1/items", &no_large, body)).await;
        assert_eq!(s, 403, "{body}: {text}");
        assert!(
            j["error"]["message"]
                .as_str()
                .unwrap()
                .contains("UTF-8 JSON object"),
            "{text}"
        );
    }
    // A request without a body names no model.
    assert_eq!(send(&app, get_items(&no_large)).await.0, 200);
    // An expired key is told so first.
    let expired = f.token(Scope {
        services: vec!["items".into()],
        expires: Some(SystemTime::now() - Duration::from_secs(60)),
        datalog: Some(r#"reject if model("large");"#.into()),
        ..Scope::default()
    });
    let (s, j, _) = send(&app, form(&expired, "model=large")).await;
    assert_eq!(
        (s, j["error"]["code"].as_str()),
        (403, Some("token_expired"))
    );

    for datalog in [
        r#"reject if tool("delete_everything");"#,
        r#"reject if mcp("tools/call");"#,
        r#"reject if prompt("secret");"#,
        r#"reject if resource("file:///etc/passwd");"#,
    ] {
        let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_everything"}}"#;
        let (s, j, text) = send(&app, post_json("/v1/items", &with(datalog), call)).await;
        assert_eq!(s, 403, "{datalog}: {text}");
        assert!(
            j["error"]["message"].as_str().unwrap().contains("MCP"),
            "{text}"
        );
    }
}

/// Regression (red team, wave 2, fourth pass): a request was taken for one
/// without a body when its head had no `Content-Length` and no
/// `Transfer-Encoding`, which an HTTP/2 request with a body (`axum::serve`
/// speaks h2c) need not have: its `?model=` was then judged as the request's
/// model, while the handler read another from the form body.
#[tokio::test]
async fn regression_a_body_without_a_content_length_is_not_taken_for_none() {
    let f = Fixture::new();
    let (app, _h) = f.app(UseLimits::Deny, 60).await;
    let small = f.token(Scope {
        services: vec!["items".into()],
        models: vec!["small".into()],
        ..Scope::default()
    });
    let req = Request::post("/v1/items?model=small")
        .header("authorization", format!("Bearer {small}"))
        .header("content-type", "text/plain")
        .body(Body::from("model=large"))
        .unwrap();
    assert!(req.headers().get("content-length").is_none());
    let (s, _, text) = send(&app, req).await;
    assert_eq!(s, 403, "{text}");
    // Without a body, the query's model is the request's.
    let req = Request::get("/v1/items?model=small")
        .header("authorization", format!("Bearer {small}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, req).await.0, 200);
}

/// Regression (red team, wave 2, fourth pass): the feed file was read after
/// a size check on its path, so a symlink to `/dev/zero` (size 0) was read
/// until memory ran out, and a FIFO hung the refresh for good.
#[tokio::test]
async fn regression_a_feed_path_that_is_not_a_small_regular_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = keys::generate();
    let fifo = dir.path().join("feed.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // `/dev/null` first: the old code read it as an empty feed, and failed
    // on its JSON, rather than hanging on the FIFO.
    for path in [PathBuf::from("/dev/null"), fifo, PathBuf::from("/dev/zero")] {
        let (_layer, handle) = TillLayer::builder("items")
            .public_key(&keys::public_string(&root.public()))
            .feed(FeedSource::File(path.clone()))
            .max_feed_age(Duration::from_secs(60))
            .refresh_every(Duration::from_millis(20))
            .build()
            .unwrap();
        wait_until(|| handle.refresh_failures() > 0, &handle).await;
        let e = handle.last_refresh_error().unwrap();
        assert!(e.contains("not a regular file"), "{path:?}: {e}");
        assert!(handle.feed_stale());
    }
}

/// Some frameworks take `?model=` over the body's `model`: the layer
/// judges the query's model as the request's (red team, wave 2, third pass).
#[tokio::test]
async fn a_model_in_the_query_is_judged_too() {
    let f = Fixture::new();
    let (app, _h) = f.app(UseLimits::Deny, 60).await;
    let token = f.token(Scope {
        services: vec!["items".into()],
        models: vec!["small".into()],
        ..Scope::default()
    });
    let small = r#"{"model":"small"}"#;
    let status = |req| {
        let app = &app;
        async move { send(app, req).await.0 }
    };
    assert_eq!(
        status(post_json("/v1/items?model=large", &token, small)).await,
        400
    );
    assert_eq!(
        status(post_json("/v1/items?Mod%65l=large", &token, small)).await,
        400
    );
    assert_eq!(
        status(post_json("/v1/items?model=large", &token, "{}")).await,
        403
    );
    assert_eq!(
        status(post_json("/v1/items?model=small", &token, small)).await,
        200
    );
    let get = |q: &str| {
        Request::get(format!("/v1/items?{q}"))
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(status(get("model=large")).await, 403);
    assert_eq!(status(get("model=small")).await, 200);
}

#[tokio::test]
async fn a_configuration_that_would_always_refuse_or_trust_nothing_is_refused() {
    let f = Fixture::new();
    let key = keys::public_string(&f.root.public());
    let src = || FeedSource::File(f.feed.clone());
    let e = TillLayer::builder("items")
        .feed(src())
        .build()
        .err()
        .unwrap();
    assert!(e.to_string().contains("no root public key"), "{e}");
    let e = TillLayer::builder("items")
        .public_key(&key)
        .build()
        .err()
        .unwrap();
    assert!(e.to_string().contains("no revocation feed"), "{e}");
    let e = TillLayer::builder("items")
        .public_key("ed25519/nothex")
        .feed(src())
        .build()
        .err()
        .unwrap();
    assert!(e.to_string().contains("not valid"), "{e}");
    let e = TillLayer::builder("items")
        .public_key(&key)
        .feed(src())
        .max_feed_age(Duration::from_secs(5))
        .refresh_every(Duration::from_secs(5))
        .build()
        .err()
        .unwrap();
    assert!(e.to_string().contains("shorter than max_feed_age"), "{e}");
}

/// After a rotation, a feed (here a file) signed by the new key cannot be
/// checked with the old key alone; following the proxy's
/// `/.well-known/till-keys` (signed by the old key too) teaches the layer
/// the new one, and tokens of the new key pass.
#[tokio::test]
async fn the_key_set_url_teaches_a_rotated_key() {
    use till_core::token::keyset::KeySet;

    let f = Fixture::new();
    let state = tempfile::tempdir().unwrap();
    keys::save(&state.path().join(keys::ROOT_KEY_FILE), &f.root, false).unwrap();
    let mut ks = KeySet::load(state.path()).unwrap();
    assert_eq!(ks.rotate().unwrap(), 1);
    let doc = serde_json::to_string(&ks.document(now())).unwrap();
    let feed = Feed::sign_with(ks.active_key(), Some(1), vec![], now(), None).unwrap();
    std::fs::write(&f.feed, serde_json::to_string(&feed).unwrap()).unwrap();
    let new = till_core::token::issue_as(
        ks.active_key(),
        Some(1),
        &Scope {
            services: vec!["items".into()],
            ..Scope::default()
        },
    )
    .unwrap();

    // The key set, served as the proxy does.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/.well-known/till-keys",
        listener.local_addr().unwrap()
    );
    let server = tokio::spawn(async move {
        let app = Router::new().route("/.well-known/till-keys", get(move || async move { doc }));
        axum::serve(listener, app).await.unwrap();
    });

    let build = |keys_url: Option<&str>| {
        let mut b = TillLayer::builder("items")
            .public_key(&keys::public_string(&f.root.public()))
            .feed(FeedSource::File(f.feed.clone()))
            .refresh_every(Duration::from_millis(20));
        if let Some(u) = keys_url {
            b = b.keys_url(u);
        }
        let (layer, handle) = b.build().unwrap();
        (
            Router::new()
                .route("/v1/items", get(|| async { "ok" }))
                .layer(layer),
            handle,
        )
    };
    // Key 0 alone: the feed's signature does not verify, so no feed, so
    // 503.
    let (app, h) = build(None);
    wait_until(
        || {
            h.last_refresh_error()
                .is_some_and(|e| e.contains("signature"))
        },
        &h,
    )
    .await;
    assert_eq!(send(&app, get_items(&new)).await.0, 503);
    // Following the key set: the feed verifies and key 1's token passes.
    let (app, h) = build(Some(&url));
    wait_until(|| h.feed_version().is_some(), &h).await;
    assert_eq!(send(&app, get_items(&new)).await.0, 200);
    assert_eq!(send(&app, get_items(&f.items())).await.0, 200);
    server.abort();
}

#[test]
fn the_gateway_secret_never_shows_in_debug_output() {
    let u = UseLimits::Remote {
        check_url: "http://till/auth/items".into(),
        gateway_secret: Some("s3cret-value".into()),
    };
    let shown = format!("{u:?}");
    assert!(
        !shown.contains("s3cret-value") && shown.contains("redacted"),
        "{shown}"
    );
}

/// Regression (red team, wave 2, fifth pass): a key set document is
/// signed on its own, not by the feed carrying it, so whoever carries the
/// feed could swap in an older document (from before `till key retire
/// --after`), which cancelled the scheduled retirement, and then strip the
/// document from every later feed: the retired key's tokens kept passing
/// for good.
#[tokio::test]
async fn regression_an_older_or_stripped_key_set_cannot_cancel_a_scheduled_retirement() {
    use till_core::token::keyset::KeySet;

    let f = Fixture::new();
    let state = tempfile::tempdir().unwrap();
    keys::save(&state.path().join(keys::ROOT_KEY_FILE), &f.root, false).unwrap();
    let mut ks = KeySet::load(state.path()).unwrap();
    assert_eq!(ks.rotate().unwrap(), 1);
    let publish = |ks: &KeySet, ids: &[&str], at: u64, doc: Option<till_core::KeysDocument>| {
        let ids = ids.iter().map(|s| s.to_string()).collect();
        let feed = Feed::sign_with(ks.active_key(), Some(1), ids, at, doc).unwrap();
        let tmp = f.feed.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string(&feed).unwrap()).unwrap();
        std::fs::rename(&tmp, &f.feed).unwrap();
    };
    let t0 = now();
    let before = ks.document(t0 - 5);
    publish(&ks, &[], t0 - 5, Some(before.clone()));
    let (app, h) = f.app(UseLimits::Deny, 60).await;
    let old_key_token = f.items();
    assert_eq!(send(&app, get_items(&old_key_token)).await.0, 200);

    // The operator schedules key 0's retirement two seconds ahead; the
    // layer follows it.
    let after = t0 + 2;
    ks.retire(0, Some(after)).unwrap();
    publish(&ks, &["aa"], t0, Some(ks.document(t0)));
    wait_until(|| h.feed_version() == Some(1), &h).await;

    // A fresh feed carrying the older document is refused...
    publish(&ks, &["aa", "bb"], t0 + 1, Some(before));
    wait_until(
        || {
            h.last_refresh_error()
                .is_some_and(|e| e.contains("older than the one already followed"))
        },
        &h,
    )
    .await;
    assert_eq!(h.feed_version(), Some(1));
    // ...and so is one carrying a document dated far ahead, which would
    // make every later one look older...
    publish(&ks, &["aa", "bb"], t0 + 1, Some(ks.document(t0 + 3600)));
    wait_until(
        || {
            h.last_refresh_error()
                .is_some_and(|e| e.contains("key set document issued") && e.contains("future"))
        },
        &h,
    )
    .await;
    assert_eq!(h.feed_version(), Some(1));
    // ...and one without any.
    publish(&ks, &["aa", "bb"], t0 + 1, None);
    wait_until(
        || {
            h.last_refresh_error()
                .is_some_and(|e| e.contains("without its key set"))
        },
        &h,
    )
    .await;
    assert_eq!(h.feed_version(), Some(1));

    // Once the scheduled time has passed, key 0's tokens are refused.
    while now() <= after {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, j, _) = send(&app, get_items(&old_key_token)).await;
    assert_eq!(
        (s, j["error"]["code"].as_str()),
        (401, Some("invalid_token"))
    );
    assert!(
        j["error"]["message"].as_str().unwrap().contains("retired"),
        "{j}"
    );
}

/// Regression (red team, wave 2, fifth pass): the layer judged the method
/// and path of the request head and passed on what the proxy and
/// forward-auth refuse: `?_method=DELETE`, a `_method` form field,
/// `X-HTTP-Method-Override` and the URL-rewrite headers, a body compressed
/// past its checks, two `Content-Type`s. A service whose framework (or a
/// middleware composed inside the layer) honours them ran DELETE, or
/// another route, for a key allowed only GET on `/v1/items`.
#[tokio::test]
async fn regression_method_and_path_overrides_are_refused_as_the_proxy_refuses_them() {
    let f = Fixture::new();
    let (app, _h) = f.app(UseLimits::Deny, 60).await;
    let get_only = f.token(Scope {
        services: vec!["items".into()],
        methods: vec!["GET".into(), "POST".into()],
        paths: vec!["/v1/items".into()],
        ..Scope::default()
    });
    let req = |method: &str, uri: &str, headers: &[(&str, &str)], body: &str| {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {get_only}"));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::from(body.to_string())).unwrap()
    };
    let refused = |(s, j, text): (u16, serde_json::Value, String), code: u16, what: &str| {
        assert_eq!(s, code, "{text}");
        assert!(
            j["error"]["message"].as_str().unwrap().contains(what),
            "{what}: {text}"
        );
    };
    for uri in [
        "/v1/items?_method=DELETE",
        "/v1/items?a=1;_METHOD=DELETE",
        "/v1/items?%255Fmethod=DELETE",
        "/v1/items?.method=DELETE",
        "/v1/items?_method[]=DELETE",
    ] {
        refused(send(&app, req("GET", uri, &[], "")).await, 400, "_method");
    }
    for h in [
        "x-http-method-override",
        "X-HTTP-Method",
        "x-method-override",
        "x_http_method_override",
        "x-original-url",
        "x-rewrite-url",
        "x-forwarded-prefix",
    ] {
        let (s, j, text) = send(&app, req("GET", "/v1/items", &[(h, "DELETE")], "")).await;
        assert_eq!(s, 400, "{h}: {text}");
        assert!(
            j["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&h.to_ascii_lowercase()),
            "{text}"
        );
    }
    let form = [("content-type", "application/x-www-form-urlencoded")];
    for body in ["a=1&_method=DELETE", "%5Fmethod=DELETE", "+.method=DELETE"] {
        refused(
            send(&app, req("POST", "/v1/items", &form, body)).await,
            400,
            "_method",
        );
    }
    // A POST without a Content-Type is a form to Rack too.
    refused(
        send(&app, req("POST", "/v1/items", &[], "_method=DELETE")).await,
        400,
        "_method",
    );
    refused(
        send(
            &app,
            req(
                "POST",
                "/v1/items",
                &[("content-type", "application/json")],
                r#"{"_method":"DELETE"}"#,
            ),
        )
        .await,
        400,
        "_method",
    );
    // A body the layer reads, compressed past its checks.
    let (s, j, text) = send(
        &app,
        req(
            "POST",
            "/v1/items",
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("content-encoding", "gzip"),
            ],
            "not really gzip",
        ),
    )
    .await;
    assert_eq!(
        (s, j["error"]["code"].as_str()),
        (415, Some("unsupported_content_encoding")),
        "{text}"
    );
    let two_types = Request::post("/v1/items")
        .header("authorization", format!("Bearer {get_only}"))
        .header("content-type", "application/json")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(r#"{"a":1}"#))
        .unwrap();
    refused(send(&app, two_types).await, 400, "Content-Type");

    // What is not an override passes, and the handler gets the body.
    let (s, _, text) = send(&app, req("GET", "/v1/items?method=x&a=_method", &[], "")).await;
    assert_eq!(s, 200, "{text}");
    let (s, _, text) = send(&app, req("POST", "/v1/items", &form, "a=1&b=_method")).await;
    assert_eq!((s, text.as_str()), (200, "|a=1&b=_method"));
}

/// A form's `model` field is read and judged like a JSON body's.
#[tokio::test]
async fn a_forms_model_is_judged_like_a_json_bodys() {
    let f = Fixture::new();
    let (app, _h) = f.app(UseLimits::Deny, 60).await;
    let small = f.token(Scope {
        services: vec!["items".into()],
        models: vec!["small".into()],
        ..Scope::default()
    });
    let form = |body: &str| {
        Request::post("/v1/items")
            .header("authorization", format!("Bearer {small}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    assert_eq!(send(&app, form("model=small&x=1")).await.0, 200);
    assert_eq!(send(&app, form("model=large")).await.0, 403);
    assert_eq!(send(&app, form("model=small&model=large")).await.0, 400);
}

/// Regression (red team, wave 2, fifth pass): inside `Router::nest` the
/// layer saw the path with the nest's prefix stripped, and judged that: a
/// key for `/admin/` (the outer service's) reached `/v1/chat/admin/...` of
/// the nested one, and a key for `/v1/chat/` was refused there. The path
/// judged is the one the client sent (axum's `OriginalUri`).
#[tokio::test]
async fn regression_a_nested_router_is_judged_by_the_path_the_client_sent() {
    let f = Fixture::new();
    let (layer, h) = TillLayer::builder("items")
        .public_key(&keys::public_string(&f.root.public()))
        .feed(FeedSource::File(f.feed.clone()))
        .refresh_every(Duration::from_millis(20))
        .build()
        .unwrap();
    wait_until(|| h.feed_version().is_some(), &h).await;
    let inner = Router::new()
        .route("/admin/users", get(|| async { "nested admin" }))
        .layer(layer.clone());
    let app = Router::new()
        .route("/admin/users", get(|| async { "outer admin" }))
        .nest("/v1/chat", inner);
    let scoped = |prefix: &str| {
        f.token(Scope {
            services: vec!["items".into()],
            paths: vec![prefix.into()],
            ..Scope::default()
        })
    };
    let req = |path: &str, token: &str| {
        Request::get(path)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap()
    };
    let (s, _, text) = send(&app, req("/v1/chat/admin/users", &scoped("/admin/"))).await;
    assert_eq!(s, 403, "{text}");
    let (s, _, text) = send(&app, req("/v1/chat/admin/users", &scoped("/v1/chat/"))).await;
    assert_eq!((s, text.as_str()), (200, "|nested admin"));
    // Also when the whole router is nested under the layer, or nested twice.
    let twice = Router::new().nest(
        "/api",
        Router::new().nest(
            "/v1/chat",
            Router::new()
                .route("/admin/users", get(|| async { "deep" }))
                .layer(layer),
        ),
    );
    let (s, _, text) = send(&twice, req("/api/v1/chat/admin/users", &scoped("/admin/"))).await;
    assert_eq!(s, 403, "{text}");
    let (s, _, text) = send(
        &twice,
        req("/api/v1/chat/admin/users", &scoped("/api/v1/chat/")),
    )
    .await;
    assert_eq!(s, 200, "{text}");
}

/// Regression (red team, wave 2, fifth pass): a form's media type naming
/// JSON in a parameter (`application/x-www-form-urlencoded; x=/json`) was
/// read as JSON by the layer and as a form by the handler's extractor, so
/// `{"x":"&_method=DELETE&"}` passed; a POST with an empty `Content-Type`
/// (a form to Rack) and no `Content-Length` was not read at all.
#[tokio::test]
async fn regression_a_form_naming_json_or_with_an_empty_content_type_is_checked() {
    let f = Fixture::new();
    let (app, _h) = f.app(UseLimits::Deny, 60).await;
    let token = f.items();
    let req = |ct: &str, body: &str| {
        Request::post("/v1/items")
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", ct)
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let (s, _, text) = send(
        &app,
        req(
            "application/x-www-form-urlencoded; x=/json",
            r#"{"x":"&_method=DELETE&"}"#,
        ),
    )
    .await;
    assert_eq!(s, 400, "{text}");
    let (s, _, text) = send(&app, req("", "a=1&_method=DELETE")).await;
    assert_eq!(s, 400, "{text}");
    assert!(text.contains("_method"), "{text}");
    let (s, _, text) = send(&app, req("", "a=1")).await;
    assert_eq!(s, 200, "{text}");
}
