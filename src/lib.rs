//! # Till: scoped, activation-limited keys for AI agents
//!
//! Till replaces an operator's static API keys with Biscuit capability
//! tokens that carry their own scope (service, methods, path prefixes,
//! models), expiry and **use limits**, and a verifier proxy that counts every
//! use durably and injects the real credential.
//!
//! ## Map of the crate
//!
//! | module | job |
//! |---|---|
//! | [`token`] | issue, attenuate, parse within bounds, inspect; [`token::vocab`] is the one home of fact names |
//! | [`path`] | request path normalisation (scope checks compare prefixes) |
//! | [`policy`] | `policies/*.datalog`, parsed once; Datalog run limits |
//! | [`verify`] | [`verify::Verifier`]: token + request facts + use counts → allow or a [`verify::Denial`] |
//! | [`mcp`] | MCP JSON-RPC bodies: the messages, the tool each `tools/call` names, `tools/list` filtering |
//! | [`store`] | [`store::CounterStore`] and [`store::RevocationList`] traits; the embedded durable store |
//! | [`proxy`] | `till serve`: config, accept loop, router, the request path, forwarding, admin API, dashboard |
//! | [`monitor`] | metrics, audit log, alerts, recent decisions |
//! | [`feed`] | the signed revocation feed for services that verify offline |
//! | [`clock`] | the wall clock tokens are checked against, never going backwards |
//! | [`cli`] | the `till` command, a thin layer over the above |
//!
//! ## Quickstart (library)
//!
//! ```
//! use std::time::SystemTime;
//! use till::token::{self, keys, Scope, RequestFacts};
//! use till::{policy::Policies, verify::Verifier};
//!
//! // Operator: a root token for POST /v1/chat/ on openai, 10 uses.
//! let root = keys::generate();
//! let parent = token::issue(&root, &Scope {
//!     services: vec!["openai".into()],
//!     methods: vec!["POST".into()],
//!     paths: vec!["/v1/chat/".into()],
//!     max_uses: Some(10),
//!     ..Scope::default()
//! }).unwrap();
//!
//! // Agent, offline: a child limited to 2 uses.
//! let child = token::attenuate(&parent, &Scope { max_uses: Some(2), ..Scope::default() }).unwrap();
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
//! assert_eq!(denial.kind, till::verify::DenialKind::Exhausted);
//! ```

pub mod cli;
pub mod clock;
pub mod decide;
pub mod feed;
#[doc(hidden)]
pub mod fuzzing;
pub mod mcp;
pub mod monitor;
pub mod path;
pub mod policy;
pub mod proxy;
pub mod store;
pub mod token;
pub mod verify;
