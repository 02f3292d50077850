//! Seeing what keys do: metrics, the audit log, alerts, and the recent
//! decisions the usage API and dashboard show.
//!
//! The request path fills an [`Observation`] as it goes; [`Monitor::record`]
//! turns it into a metric update, an audit line, and alerts. None of it can
//! block or fail a request.

pub mod alerts;
pub mod audit;
pub mod metrics;
pub mod request_id;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use crate::verify::{DenialKind, VerifiedToken};
pub use alerts::{Alert, AlertConfig};
pub use audit::{AuditRecord, AuditSink, BlockUse};
pub use metrics::Metrics;
pub use request_id::RequestId;

/// `[audit]` in till.toml.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub enabled: bool,
    /// JSON-lines file; default `<state_dir>/audit.jsonl`.
    pub file: Option<std::path::PathBuf>,
    /// Also write each line to stdout.
    pub stdout: bool,
    /// Past this many bytes the file is moved to `<file>.1` (replacing it)
    /// and a new one started; unset, the file grows until rotated outside.
    pub max_bytes: Option<u64>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            file: None,
            stdout: false,
            max_bytes: None,
        }
    }
}

/// What the request path learned about one request.
pub struct Observation {
    pub started: Instant,
    pub request_id: RequestId,
    pub peer: Option<std::net::SocketAddr>,
    /// The configured upstream's name (see [`crate::proxy::Upstream::name`]).
    pub service: Arc<str>,
    pub method: String,
    pub path: String,
    pub model: Option<String>,
    /// MCP upstreams: the JSON-RPC method(s) and tool(s) of the request,
    /// comma-separated for a batch.
    pub mcp_method: Option<String>,
    pub tool: Option<String>,
    pub token: Option<Arc<VerifiedToken>>,
    pub uses: Option<Vec<u64>>,
    pub verify: Option<Duration>,
    pub reserve: Option<Duration>,
    pub upstream_status: Option<u16>,
    pub denial: Option<DenialKind>,
    /// The use is spent and the request is going to the upstream: if the
    /// client goes away before the answer, it is still recorded.
    pub forwarding: bool,
}

impl Observation {
    pub fn new(request_id: RequestId, peer: Option<std::net::SocketAddr>, method: &str) -> Self {
        Observation {
            started: Instant::now(),
            request_id,
            peer,
            service: Arc::default(),
            method: method.to_string(),
            path: String::new(),
            model: None,
            mcp_method: None,
            tool: None,
            token: None,
            uses: None,
            verify: None,
            reserve: None,
            upstream_status: None,
            denial: None,
            forwarding: false,
        }
    }
}

/// Decisions kept in memory for the usage API and the dashboard.
const RECENT: usize = 500;

/// Metrics, audit, alerts and recent decisions.
pub struct Monitor {
    pub metrics: Arc<Metrics>,
    pub audit: AuditSink,
    pub alerts: alerts::Alerts,
    recent: Mutex<VecDeque<AuditRecord>>,
}

impl Monitor {
    /// Must be called inside a tokio runtime (it starts background tasks).
    pub fn start(
        audit: &AuditConfig,
        state_dir: &std::path::Path,
        alerts: AlertConfig,
    ) -> std::io::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        let sink = if audit.enabled {
            let file = audit
                .file
                .clone()
                .unwrap_or_else(|| state_dir.join("audit.jsonl"));
            AuditSink::start(Some(file), audit.stdout, audit.max_bytes, metrics.clone())?
        } else {
            AuditSink::start(None, false, None, metrics.clone())?
        };
        Ok(Monitor {
            alerts: alerts::Alerts::start(alerts, metrics.clone()),
            metrics,
            audit: sink,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
        })
    }

    /// A monitor that records metrics and recent decisions only.
    pub fn disabled() -> Self {
        let metrics = Arc::new(Metrics::new());
        Monitor {
            alerts: alerts::Alerts::start(AlertConfig::default(), metrics.clone()),
            audit: AuditSink::start(None, false, None, metrics.clone())
                .unwrap_or_else(|_| unreachable!("a disabled sink opens nothing")),
            metrics,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
        }
    }

    /// Recent decisions, newest first; only denials when `denied_only`.
    pub fn recent(&self, denied_only: bool, limit: usize) -> Vec<AuditRecord> {
        let r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        r.iter()
            .rev()
            .filter(|d| !denied_only || d.decision == "deny")
            .take(limit)
            .cloned()
            .collect()
    }

    /// Records the outcome of one request. Takes the observation's text
    /// (the request is over): the audit record owns it without copies.
    pub fn record(
        &self,
        o: &mut Observation,
        status: u16,
        code: &'static str,
        reason: Option<String>,
    ) {
        let allowed = code == "ok";
        let latency = o.started.elapsed();
        let m = &self.metrics;
        m.requests
            .get_or_create(&metrics::RequestLabels {
                service: o.service.clone(),
                decision: if allowed { "allow" } else { "deny" },
                code,
            })
            .inc();
        m.request_seconds.observe(latency.as_secs_f64());
        if let Some(v) = o.verify {
            m.verify_seconds.observe(v.as_secs_f64());
        }
        if let Some(r) = o.reserve {
            m.reserve_seconds.observe(r.as_secs_f64());
        }

        let take = std::mem::take::<String>;
        let rec = AuditRecord {
            time: now_text(),
            request_id: o.request_id,
            peer: o.peer.take(),
            token: o.token.take(),
            uses: o.uses.take(),
            service: std::mem::take(&mut o.service),
            method: take(&mut o.method),
            path: take(&mut o.path),
            model: o.model.take(),
            mcp_method: o.mcp_method.take(),
            tool: o.tool.take(),
            decision: if allowed { "allow" } else { "deny" },
            code,
            reason,
            status,
            upstream_status: o.upstream_status,
            latency_ms: (latency.as_secs_f64() * 1e6).round() / 1e3,
        };
        self.audit.log(&rec);
        self.alert(&rec, o.denial, code);
        {
            let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if r.len() == RECENT {
                r.pop_front();
            }
            r.push_back(rec);
        }
    }

    fn alert(&self, rec: &AuditRecord, denial: Option<DenialKind>, code: &str) {
        let token = rec.token.as_deref();
        let reason = &rec.reason;
        // Built only when an alert may fire: this runs on every request.
        let family = || rec.family().map(str::to_string);
        let labels = || rec.labels().map(str::to_string).collect::<Vec<String>>();
        let peer = || rec.peer.map_or_else(|| "?".to_string(), |p| p.to_string());
        let allowed = code == "ok";
        let who = || {
            let labels = labels();
            if labels.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    labels
                        .iter()
                        .map(|l| format!("{l:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        };
        let a = |kind: &'static str,
                 message: String,
                 block: Option<String>,
                 details: serde_json::Value| Alert {
            kind,
            message,
            time: crate::token::format_time(SystemTime::now()),
            family: family(),
            block,
            labels: labels(),
            details,
        };
        if allowed {
            for (k, b) in rec.blocks().enumerate() {
                let (Some(uses), Some(limit)) = (b.uses, b.limit) else {
                    continue;
                };
                for &t in self.alerts.thresholds() {
                    let mark = ((limit as f64) * t).ceil() as u64;
                    if mark > 0 && uses >= mark {
                        let key = format!("threshold:{}:{t}", b.id);
                        let alert = || {
                            a(
                                "usage_threshold",
                                format!(
                                    "block {k}{} of family {} reached {}% of its use limit: {uses}/{limit}",
                                    who(),
                                    short(rec.family()),
                                    (t * 100.0).round()
                                ),
                                Some(b.id.to_string()),
                                serde_json::json!({"block_index": k, "uses": uses, "limit": limit, "threshold": t}),
                            )
                        };
                        if k == 0 {
                            self.alerts.fire_once(key, alert);
                        } else {
                            // Later blocks are minted offline by whoever holds
                            // the token, in any number, each crossing its own
                            // thresholds at once (`--max-uses 1`): one alert per
                            // family and threshold per five minutes, or they
                            // fill the queue and push out every other alert.
                            let family = rec.family().unwrap_or("");
                            self.alerts.fire_once_per_family(
                                key,
                                format!("threshold:attenuated:{family}:{t}"),
                                alert,
                            );
                        }
                    }
                }
            }
            return;
        }
        let Some(fam) = rec.family() else { return };
        let blocks: Vec<BlockUse<'_>> = rec.blocks().collect();
        let last = || blocks.last().map(|b| b.id.to_string());
        let details = || {
            serde_json::json!({
                "peer": rec.peer, "service": &*rec.service, "method": rec.method, "path": rec.path,
                "reason": reason, "request_id": rec.request_id,
            })
        };
        // Someone minted more children of one token than the proxy tracks:
        // once per family and window, whoever sends them.
        if code == "family_too_large" {
            self.alerts.fire_recent(format!("family_full:{fam}"), || {
                a(
                    "family_too_large",
                    format!(
                        "family {}{} reached limits.max_blocks_per_family; new keys of it are refused (from {})",
                        short(rec.family()),
                        who(),
                        peer()
                    ),
                    last(),
                    details(),
                )
            });
        }
        match denial {
            // Keyed by the revoked block alone: whoever holds a revoked token
            // can mint any number of children offline and connect from any
            // port, and each attempt must not become a message to the operator.
            Some(DenialKind::Revoked) => {
                let revoked = token
                    .and_then(|t| revoked_block(&t.view, &blocks, reason.as_deref()))
                    .map(|b| b.id.to_string());
                let key = revoked.clone().unwrap_or_else(|| fam.to_string());
                self.alerts.fire_recent(format!("revoked:{key}"), || {
                    a(
                        "revoked_token_used",
                        format!(
                            "a revoked token{} of family {} was used from {} for {} /{}{}",
                            who(),
                            short(rec.family()),
                            peer(),
                            rec.method,
                            rec.service,
                            rec.path
                        ),
                        revoked.or_else(last),
                        details(),
                    )
                })
            }
            // By family, for the same reason: children of an expired token
            // are expired too, and each has a new last block.
            Some(DenialKind::Expired) => self.alerts.fire_recent(format!("expired:{fam}"), || {
                a(
                    "expired_token_used",
                    format!(
                        "an expired token{} of family {} is still being used (from {})",
                        who(),
                        short(rec.family()),
                        peer()
                    ),
                    last(),
                    details(),
                )
            }),
            // A key meeting its rate window or concurrency cap is working as
            // configured, but an operator wants to hear of it once: a leaked
            // key hammering, or a window set too tight for real work.
            Some(DenialKind::RateLimited) => {
                self.alerts.fire_recent(format!("rate:{fam}"), || {
                    a(
                        "rate_limited",
                        format!(
                            "a token{} of family {} is being refused by a full rate window or concurrency cap (from {}): {}",
                            who(),
                            short(rec.family()),
                            peer(),
                            reason.as_deref().unwrap_or_default()
                        ),
                        last(),
                        details(),
                    )
                })
            }
            _ => {}
        }
        if let Some(n) = self.alerts.count_denial(fam) {
            self.alerts.fire_recent(format!("burst:{fam}"), || {
                a(
                    "denial_burst",
                    format!(
                        "{n} denials for family {}{} within the burst window; last: {}",
                        short(rec.family()),
                        who(),
                        reason.as_deref().unwrap_or_default()
                    ),
                    last(),
                    details(),
                )
            });
        }
    }
}

/// The current time as the audit log writes it (RFC 3339, whole seconds),
/// formatted once per second per thread rather than once per request.
fn now_text() -> Arc<str> {
    use std::cell::RefCell;
    thread_local! {
        static LAST: RefCell<(u64, Option<Arc<str>>)> = const { RefCell::new((0, None)) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &last.1 {
            Some(t) if last.0 == secs => t.clone(),
            _ => {
                let t: Arc<str> = Arc::from(crate::token::format_time(now));
                *last = (secs, Some(t.clone()));
                t
            }
        }
    })
}

fn short(family: Option<&str>) -> String {
    family
        .map(|f| f.chars().take(16).collect())
        .unwrap_or_else(|| "?".into())
}

/// The block whose revocation denied a request, recognised by the reason
/// [`crate::verify::revoked_denial`] gave (the request path passes the
/// reason, not the index).
fn revoked_block<'a, 'b>(
    view: &crate::token::inspect::TokenView,
    blocks: &'b [BlockUse<'a>],
    reason: Option<&str>,
) -> Option<&'b BlockUse<'a>> {
    let reason = reason?;
    blocks
        .iter()
        .enumerate()
        .find(|(k, _)| reason.ends_with(&crate::verify::revoked_denial(view, *k).reason))
        .map(|(_, b)| b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_serialises_the_tokens_family_blocks_and_labels_never_the_token() {
        let root = crate::token::keys::generate();
        let parent = crate::token::issue(
            &root,
            &crate::token::Scope {
                services: vec!["openai".into()],
                max_uses: Some(10),
                label: Some("parent".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let text = crate::token::attenuate(
            &parent,
            &crate::token::Scope {
                max_uses: Some(3),
                label: Some("child".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let verifier =
            crate::verify::Verifier::new(root.public(), crate::policy::Policies::default_policy());
        let token = Arc::new(verifier.verify_token(&text).unwrap());
        let monitor = Monitor::disabled();
        let mut o = Observation::new(RequestId(0xff), None, "POST");
        o.service = "openai".into();
        o.path = "/v1/chat/completions".into();
        o.token = Some(token.clone());
        o.uses = Some(vec![4, 2]);
        monitor.record(&mut o, 200, "ok", None);
        let rec = serde_json::to_value(&monitor.recent(false, 1)[0]).unwrap();
        assert_eq!(rec["family"], token.ids[0].as_str());
        assert_eq!(
            rec["blocks"],
            serde_json::json!([
                {"id": token.ids[0], "uses": 4, "limit": 10},
                {"id": token.ids[1], "uses": 2, "limit": 3},
            ])
        );
        assert_eq!(rec["labels"], serde_json::json!(["parent", "child"]));
        assert_eq!(rec["request_id"], "00000000000000ff");
        assert_eq!(rec["code"], "ok");
        assert!(rec.get("tool").is_none() && rec.get("mcp_method").is_none());
        let line = rec.to_string();
        assert!(
            !line.contains(&text[text.len() - 40..]),
            "the token is in {line}"
        );
        let debug = format!("{:?}", monitor.recent(false, 1)[0]);
        assert!(!debug.contains(&text[text.len() - 40..]), "{debug}");
    }

    #[test]
    fn the_remembered_time_text_is_the_current_second() {
        for _ in 0..3 {
            let before = crate::token::format_time(SystemTime::now());
            let t = now_text();
            let after = crate::token::format_time(SystemTime::now());
            assert!(
                *t == *before || *t == *after,
                "{t} not in [{before}, {after}]"
            );
            std::thread::sleep(Duration::from_millis(600));
        }
    }

    #[test]
    fn the_revoked_block_is_read_back_from_the_denial_reason() {
        let root = crate::token::keys::generate();
        let mut t = crate::token::issue(
            &root,
            &crate::token::Scope {
                services: vec!["openai".into()],
                label: Some("same".into()),
                ..Default::default()
            },
        )
        .unwrap();
        for _ in 1..12 {
            let label = crate::token::Scope {
                label: Some("same".into()),
                ..Default::default()
            };
            t = crate::token::attenuate(&t, &label).unwrap();
        }
        let raw = crate::token::RawToken::parse(&t).unwrap();
        let view = crate::token::inspect::inspect(&raw).unwrap();
        let ids: Vec<String> = (0..12).map(|k| format!("id{k}")).collect();
        let blocks: Vec<BlockUse> = (0..12)
            .map(|k| BlockUse {
                id: &ids[k],
                uses: None,
                limit: None,
            })
            .collect();
        for k in [0, 1, 10, 11] {
            let reason = crate::verify::revoked_denial(&view, k).reason;
            assert_eq!(
                revoked_block(&view, &blocks, Some(&reason)).map(|b| b.id),
                Some(format!("id{k}").as_str()),
                "{reason}"
            );
        }
        assert!(revoked_block(&view, &blocks, Some("something else")).is_none());
        assert!(revoked_block(&view, &blocks, None).is_none());
    }
}
