//! # till-core: verify Till tokens anywhere
//!
//! The part of Till a service needs to check Till tokens itself, with no
//! proxy in the way: the token vocabulary, issuing and offline attenuation,
//! bounded parsing and shape checks, inspection, the offline [`Verifier`],
//! the one decision function ([`decide()`]), path normalisation, request
//! facts (including the `model` of a JSON body), root key sets that follow
//! rotations, and the signed revocation feed.
//!
//! It carries no storage engine, no HTTP client, no allocator and no command
//! line parser: `cargo tree -p till-core` shows Biscuit, ed25519, serde and
//! little else. The `till` crate (CLI, proxy, stores, monitoring) is built
//! on it, and `till-tower` wraps it as middleware for Rust services.
//!
//! ## The public API
//!
//! What a service uses is re-exported at the crate root and documented
//! there: [`Verifier`], [`VerifiedToken`], [`decide()`] and [`Stage`],
//! [`RequestFacts`], [`Scope`] and [`Rate`], [`issue`], [`attenuate`], the
//! [`keys`] helpers, [`PublicKeySet`] and [`KeysDocument`] for rotations,
//! [`Feed`], [`Policies`], [`normalize_path`], [`token_from_headers`],
//! [`model_of`], [`TokenView`] for inspection, and the errors
//! ([`TokenError`], [`Denial`], [`FeedError`], ...). Error enums are
//! `#[non_exhaustive]`: match them with a wildcard arm, and deny in it.
//!
//! The modules behind them (`token`, `verify`, `decide`, `path`, `policy`,
//! `request`, `feed`, `clock`) are `#[doc(hidden)]`: they are public only
//! because the `till` crate (CLI, proxy, stores) is built on their
//! internals, and they are not part of this crate's API. ARCHITECTURE.md
//! maps them.
//!
//! For a tower/axum service, the `till-tower` crate wraps all of this as a
//! layer that also follows the proxy's signed revocation feed.
//!
//! ## Quickstart (library)
//!
//! ```
//! use std::time::SystemTime;
//! use till_core::{issue, attenuate, keys, Policies, RequestFacts, Scope, Verifier};
//!
//! // Operator: a root token for POST /v1/chat/ on openai, 10 uses.
//! let root = keys::generate();
//! let parent = issue(&root, &Scope {
//!     services: vec!["openai".into()],
//!     methods: vec!["POST".into()],
//!     paths: vec!["/v1/chat/".into()],
//!     max_uses: Some(10),
//!     ..Scope::default()
//! }).unwrap();
//!
//! // Agent, offline: a child limited to 2 uses.
//! let child = attenuate(&parent, &Scope { max_uses: Some(2), ..Scope::default() }).unwrap();
//!
//! // Service, offline: verify with the public key.
//! let verifier = Verifier::new(root.public(), Policies::default_policy());
//! let t = verifier.verify_token(&child).unwrap();
//! let req = RequestFacts {
//!     service: "openai".into(), method: "POST".into(),
//!     path: "/v1/chat/completions".into(), model: None, mcp: None, time: SystemTime::now(),
//! };
//! assert!(verifier.authorize(&t, &req, &[1, 1]).is_ok());
//! // Third use of the child: denied by block 1's limit.
//! let denial = verifier.authorize(&t, &req, &[3, 3]).unwrap_err();
//! assert_eq!(denial.kind, till_core::DenialKind::Exhausted);
//! ```

#![forbid(unsafe_code)]

#[doc(hidden)]
pub mod clock;
#[doc(hidden)]
pub mod decide;
#[doc(hidden)]
pub mod feed;
#[doc(hidden)]
pub mod files;
#[doc(hidden)]
pub mod path;
#[doc(hidden)]
pub mod policy;
#[doc(hidden)]
pub mod request;
#[doc(hidden)]
pub mod token;
#[doc(hidden)]
pub mod unseen;
#[doc(hidden)]
pub mod verify;

pub use decide::{Stage, decide};
pub use feed::{Feed, FeedError};
pub use path::{PathError, normalize as normalize_path};
pub use policy::{Policies, PolicyError};
pub use request::{
    TokenHeaderError, is_json, model_in_query, model_of, model_of_json_request, token_from_headers,
};
pub use token::inspect::{BlockView, CheckMeaning, TokenView};
pub use token::keyset::{KeysDocument, KeysError, PublicKeySet, RootKeys};
pub use token::vocab::{McpMessage, Rate};
pub use token::{RawToken, RequestFacts, Scope, TokenError, attenuate, issue, keys};
pub use unseen::MCP_FACTS;
pub use verify::{CounterSpec, Denial, DenialKind, VerifiedToken, Verifier, first_revoked};
