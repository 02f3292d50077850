//! Till's integration tests: one binary, real processes, local upstreams.

mod helpers;

mod cli;
mod dashboard;
mod golden;
mod hostile;
mod monitor;
mod proxy;
