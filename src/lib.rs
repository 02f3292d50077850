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
//! | [`state_dir`] | refusing a state directory or config another user could have written |
//! | [`cli`] | the `till` command, a thin layer over the above |
//!
//! The token library itself (vocabulary, verification, the decision, the
//! feed) is the `till-core` crate; its modules are re-exported here under
//! the same names so the whole of Till reads them as `crate::token`,
//! `crate::verify`, and so on.

pub mod cli;
#[doc(hidden)]
pub mod fuzzing;
pub mod mcp;
pub mod monitor;
pub mod proxy;
pub mod state_dir;
pub mod store;

pub use till_core::{clock, decide, feed, path, policy, request, token, verify};
