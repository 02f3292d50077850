//! The audit log: one JSON line per decision, to a file and/or stdout.
//!
//! Lines go through a bounded queue to a writer task, so a slow disk never
//! blocks or fails a request: when the queue is full the line is dropped and
//! `till_audit_dropped_total` says so.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::metrics::Metrics;

/// Uses and limit of one block after a request.
#[derive(Clone, Debug, Serialize)]
pub struct BlockUse {
    pub id: String,
    pub uses: Option<u64>,
    pub limit: Option<u64>,
}

/// One decision. Never holds a token or a credential.
#[derive(Clone, Debug, Serialize)]
pub struct AuditRecord {
    pub time: String,
    pub request_id: String,
    pub peer: Option<String>,
    /// Revocation id of the authority block.
    pub family: Option<String>,
    pub blocks: Vec<BlockUse>,
    pub labels: Vec<String>,
    pub service: String,
    pub method: String,
    pub path: String,
    pub model: Option<String>,
    /// MCP upstreams only: the JSON-RPC method(s) of the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp_method: Option<String>,
    /// MCP upstreams only: the tool(s) a `tools/call` names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// "allow" or "deny".
    pub decision: &'static str,
    pub code: String,
    pub reason: Option<String>,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub latency_ms: f64,
}

/// Where audit lines go.
#[derive(Clone)]
pub struct AuditSink {
    tx: Option<mpsc::Sender<String>>,
    metrics: Arc<Metrics>,
}

/// Lines buffered before dropping.
const QUEUE: usize = 8192;

impl AuditSink {
    /// A sink writing to `file` (appending) and/or stdout; `None` for both
    /// disables the log.
    pub fn start(
        file: Option<PathBuf>,
        stdout: bool,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        if file.is_none() && !stdout {
            return Ok(AuditSink { tx: None, metrics });
        }
        let f = match &file {
            Some(p) => {
                if let Some(d) = p.parent() {
                    std::fs::create_dir_all(d)?;
                }
                Some(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)?,
                )
            }
            None => None,
        };
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        let m = metrics.clone();
        tokio::spawn(async move {
            let mut file = f.map(tokio::fs::File::from_std);
            let mut out = tokio::io::stdout();
            while let Some(line) = rx.recv().await {
                let mut batch = line;
                let mut lines = 1;
                // Drain what is queued so one write carries many lines.
                while let Ok(more) = rx.try_recv() {
                    batch.push_str(&more);
                    lines += 1;
                }
                match file.as_mut() {
                    Some(f) => match f.write_all(batch.as_bytes()).await {
                        Ok(()) => {
                            m.audit_written.inc_by(lines);
                        }
                        Err(e) => {
                            m.audit_dropped.inc_by(lines);
                            tracing::error!(error = %e, "audit log write failed");
                        }
                    },
                    None => {
                        m.audit_written.inc_by(lines);
                    }
                }
                if stdout {
                    let _ = out.write_all(batch.as_bytes()).await;
                    let _ = out.flush().await;
                }
            }
            if let Some(f) = file.as_mut() {
                let _ = f.flush().await;
            }
        });
        Ok(AuditSink {
            tx: Some(tx),
            metrics,
        })
    }

    /// Queues a record; never waits.
    pub fn log(&self, r: &AuditRecord) {
        let Some(tx) = &self.tx else { return };
        let mut line = match serde_json::to_string(r) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push('\n');
        if tx.try_send(line).is_err() {
            self.metrics.audit_dropped.inc();
        }
    }
}
