//! Till's integration tests: one binary, real processes, local upstreams.

mod helpers;

mod cli;
mod golden;
mod monitor;
mod proxy;
