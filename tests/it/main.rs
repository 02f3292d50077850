//! Till's integration tests: one binary, real processes, local upstreams.

mod helpers;

mod cli;
mod conn;
mod dashboard;
mod forwarding;
mod fuzz_smoke;
mod golden;
mod hostile;
mod monitor;
mod props;
mod proxy;
mod redis;
mod spec_samples;
