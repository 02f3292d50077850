//! Till's integration tests: one binary, real processes, local upstreams.

mod helpers;

mod agents;
mod cli;
mod conn;
mod dashboard;
mod decide_first;
mod deploy;
mod forward_auth;
mod forwarding;
mod fuzz_smoke;
mod golden;
mod hostile;
mod keys;
mod mcp;
mod monitor;
mod multipart;
mod props;
mod proxy;
mod rate;
mod redis;
mod reload;
mod service;
mod spec_samples;
mod state_dir;
mod upstream_tls;
