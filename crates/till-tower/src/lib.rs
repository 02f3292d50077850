//! # till-tower: Till tokens verified inside your Rust service
//!
//! A [`tower`](https://docs.rs/tower) layer ([`TillLayer`]) and an axum
//! extractor ([`TillToken`]) for services that check Till tokens
//! themselves, without the proxy in the request path:
//!
//! 1. reads the token like the proxy does (`Authorization: Bearer` or
//!    `x-api-key`, bounded), and refuses what the proxy refuses as a method
//!    or path override (`?_method=`, a `_method` form field or JSON key,
//!    `X-HTTP-Method-Override`, `X-Original-URL`, ...);
//! 2. refuses everything (503) while the signed revocation feed it follows
//!    is older than `max_feed_age` — **a stale feed fails closed**;
//! 3. verifies the token offline against the root public key(s), following
//!    key rotations through the signed key set the feed carries;
//! 4. refuses revoked tokens, and decides with [`till_core::decide()`]
//!    (service = the configured name, method, the path the client sent
//!    (axum's `OriginalUri` inside `Router::nest`), normalized, and the
//!    `model` of a JSON body or URL-encoded form, read within a bound);
//! 5. handles use limits as configured ([`UseLimits`]): without a counter
//!    it cannot enforce them, so by default it refuses tokens that carry
//!    them; or it asks a Till proxy to count;
//! 6. hands the verified token (label, family, block ids) to the handler
//!    in the request's extensions, where [`TillToken`] finds it.
//!
//! Refusals use the proxy's JSON error shape
//! (`{"error":{"message","type","code"}}`) and `x-should-retry`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use till_core::{Feed, Scope, issue, keys};
//! use till_tower::{FeedSource, TillLayer, TillToken, UseLimits};
//! use tower::ServiceExt;
//!
//! // The operator's root key, and the feed the proxy would serve.
//! let root = keys::generate();
//! let dir = tempfile::tempdir().unwrap();
//! let feed_file = dir.path().join("revocations.json");
//! let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
//! let feed = Feed::sign(&root, vec![], now).unwrap();
//! std::fs::write(&feed_file, serde_json::to_string(&feed).unwrap()).unwrap();
//!
//! let (layer, handle) = TillLayer::builder("items")
//!     .public_key(&keys::public_string(&root.public()))
//!     .feed(FeedSource::File(feed_file))
//!     .max_feed_age(Duration::from_secs(60))
//!     .refresh_every(Duration::from_millis(50))
//!     .use_limits(UseLimits::Deny)
//!     .build()
//!     .unwrap();
//! let app = Router::new()
//!     .route("/v1/items", get(|t: TillToken| async move { t.family().to_string() }))
//!     .layer(layer);
//!
//! // The first refresh runs in the background.
//! while handle.feed_version().is_none() {
//!     tokio::time::sleep(Duration::from_millis(10)).await;
//! }
//! let token = issue(&root, &Scope { services: vec!["items".into()], ..Scope::default() }).unwrap();
//! let get_items = |t: &str| http::Request::get("/v1/items")
//!     .header("authorization", format!("Bearer {t}"))
//!     .body(axum::body::Body::empty())
//!     .unwrap();
//! assert_eq!(app.clone().oneshot(get_items(&token)).await.unwrap().status(), 200);
//!
//! // A token for another service is out of scope.
//! let other = issue(&root, &Scope { services: vec!["billing".into()], ..Scope::default() }).unwrap();
//! assert_eq!(app.oneshot(get_items(&other)).await.unwrap().status(), 403);
//! assert!(handle.render_prometheus().contains("till_feed_version 0"));
//! # }
//! ```
//!
//! Dropping the [`TillHandle`] stops the refresh: the feed then ages and
//! the layer refuses requests once it is older than `max_feed_age`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod extract;
mod feed;
mod layer;
mod refusal;
mod remote;

pub use config::{BuildError, Builder, UseLimits};
pub use extract::TillToken;
pub use feed::{FeedSource, TillHandle};
pub use layer::{TillLayer, TillService};
pub use refusal::Refusal;
