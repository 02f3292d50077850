//! Prometheus metrics (`/metrics`, OpenMetrics text format) with the
//! `prometheus-client` crate.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Shared with the upstream's config: the label lookup on every
    /// request copies no text.
    pub service: std::sync::Arc<str>,
    // Static text: no allocation per request for the label lookup.
    pub decision: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// Every metric Till exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Histogram,
    pub verify_seconds: Histogram,
    pub reserve_seconds: Histogram,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub commit_seconds: Histogram,
    pub commit_batch: Histogram,
    pub revocations: Gauge,
    pub alerts_sent: Family<KindLabels, Counter>,
    pub alerts_failed: Family<KindLabels, Counter>,
    pub alerts_dropped: Counter,
    pub audit_dropped: Counter,
    pub audit_written: Counter,
}

fn seconds() -> Histogram {
    // 10 µs .. ~5 s
    Histogram::new(exponential_buckets(0.00001, 2.5, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("till");
        let m = Metrics {
            requests: Family::default(),
            request_seconds: seconds(),
            verify_seconds: seconds(),
            reserve_seconds: seconds(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            commit_seconds: seconds(),
            commit_batch: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            revocations: Gauge::default(),
            alerts_sent: Family::default(),
            alerts_failed: Family::default(),
            alerts_dropped: Counter::default(),
            audit_dropped: Counter::default(),
            audit_written: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests by service, decision and code",
            m.requests.clone(),
        );
        registry.register(
            "request_seconds",
            "Whole request latency, until response headers",
            m.request_seconds.clone(),
        );
        registry.register(
            "verify_seconds",
            "Token verification time (cache hit or signature check)",
            m.verify_seconds.clone(),
        );
        registry.register(
            "reserve_seconds",
            "Counter reservation time, durability wait included",
            m.reserve_seconds.clone(),
        );
        registry.register(
            "verify_cache_hits",
            "Verified-token cache hits",
            m.cache_hits.clone(),
        );
        registry.register(
            "verify_cache_misses",
            "Verified-token cache misses (signature checked)",
            m.cache_misses.clone(),
        );
        registry.register(
            "store_commit_seconds",
            "Counter store commit (fsync) latency",
            m.commit_seconds.clone(),
        );
        registry.register(
            "store_commit_batch_size",
            "Counters written per group commit",
            m.commit_batch.clone(),
        );
        registry.register(
            "revocations",
            "Revoked ids in the revocation list",
            m.revocations.clone(),
        );
        registry.register(
            "alerts_sent",
            "Alerts delivered, by kind",
            m.alerts_sent.clone(),
        );
        registry.register(
            "alerts_failed",
            "Alerts that failed after all retries, by kind",
            m.alerts_failed.clone(),
        );
        registry.register(
            "alerts_dropped",
            "Alerts dropped because the queue was full",
            m.alerts_dropped.clone(),
        );
        registry.register(
            "audit_dropped",
            "Audit lines dropped because the sink was slow",
            m.audit_dropped.clone(),
        );
        registry.register(
            "audit_written",
            "Audit lines written",
            m.audit_written.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}
