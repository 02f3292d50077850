//! The audit log: one JSON line per decision, to a file and/or stdout.
//!
//! Lines are serialised into a bounded in-memory queue that a writer thread
//! empties in batches, so a slow disk never blocks or fails a request: when
//! the queue is full the line is dropped and `till_audit_dropped_total` says
//! so. A graceful stop writes every queued line.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use super::metrics::Metrics;
use crate::verify::VerifiedToken;

/// Uses and limit of one block after a request.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct BlockUse<'a> {
    pub id: &'a str,
    pub uses: Option<u64>,
    pub limit: Option<u64>,
}

/// One decision. Serialised (audit line, admin API, dashboard) with the
/// token's family, blocks and labels, never with the token itself or a
/// credential.
///
/// It keeps the request's verified token (shared with the token cache)
/// rather than copies of its ids and labels: this is built for every
/// request, and most are never read again.
#[derive(Clone)]
pub struct AuditRecord {
    /// RFC 3339, whole seconds; shared by the records of one second.
    pub time: Arc<str>,
    pub request_id: super::RequestId,
    /// Serialised as text, `"127.0.0.1:50000"`.
    pub peer: Option<std::net::SocketAddr>,
    /// The request's token, when it verified.
    pub token: Option<Arc<VerifiedToken>>,
    /// Each block's uses after the request, when they were counted.
    pub uses: Option<Vec<u64>>,
    pub service: Arc<str>,
    pub method: String,
    pub path: String,
    pub model: Option<String>,
    /// MCP upstreams only: the JSON-RPC method(s) of the request.
    pub mcp_method: Option<String>,
    /// MCP upstreams only: the tool(s) a `tools/call` names.
    pub tool: Option<String>,
    /// "allow" or "deny".
    pub decision: &'static str,
    pub code: &'static str,
    pub reason: Option<String>,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub latency_ms: f64,
}

impl AuditRecord {
    /// Revocation id of the authority block.
    pub fn family(&self) -> Option<&str> {
        self.token.as_deref().map(VerifiedToken::family)
    }

    /// Each block's id, uses and own limit, authority first.
    pub fn blocks(&self) -> impl Iterator<Item = BlockUse<'_>> {
        let uses = self.uses.as_deref().unwrap_or_default();
        self.token.as_deref().into_iter().flat_map(move |t| {
            t.ids.iter().enumerate().map(move |(k, id)| BlockUse {
                id,
                uses: uses.get(k).copied(),
                limit: t.limits.get(k).copied().flatten(),
            })
        })
    }

    /// The labels of every block, outermost first.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.token
            .as_deref()
            .into_iter()
            .flat_map(|t| t.view.blocks.iter())
            .flat_map(|b| b.labels.iter().map(String::as_str))
    }
}

impl Serialize for AuditRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct Blocks<'a>(&'a AuditRecord);
        impl Serialize for Blocks<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.blocks())
            }
        }
        struct Labels<'a>(&'a AuditRecord);
        impl Serialize for Labels<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.labels().map(|l| capped(l, MAX_FIELD_BYTES)))
            }
        }
        fn field(v: &str) -> std::borrow::Cow<'_, str> {
            capped(v, MAX_FIELD_BYTES)
        }
        let mut r = s.serialize_struct("AuditRecord", 20)?;
        r.serialize_field("time", &*self.time)?;
        r.serialize_field("request_id", &self.request_id)?;
        r.serialize_field("peer", &self.peer)?;
        r.serialize_field("family", &self.family())?;
        r.serialize_field("blocks", &Blocks(self))?;
        r.serialize_field("labels", &Labels(self))?;
        r.serialize_field("service", &*self.service)?;
        r.serialize_field("method", &field(&self.method))?;
        r.serialize_field("path", &field(&self.path))?;
        r.serialize_field("model", &self.model.as_deref().map(field))?;
        match &self.mcp_method {
            Some(m) => r.serialize_field("mcp_method", &field(m))?,
            None => r.skip_field("mcp_method")?,
        }
        match &self.tool {
            Some(t) => r.serialize_field("tool", &field(t))?,
            None => r.skip_field("tool")?,
        }
        r.serialize_field("decision", self.decision)?;
        r.serialize_field("code", self.code)?;
        r.serialize_field(
            "reason",
            &self.reason.as_deref().map(|t| capped(t, MAX_REASON_BYTES)),
        )?;
        r.serialize_field("status", &self.status)?;
        r.serialize_field("upstream_status", &self.upstream_status)?;
        r.serialize_field("latency_ms", &self.latency_ms)?;
        let cut: Vec<&str> = self.cut_fields().collect();
        if cut.is_empty() {
            r.skip_field("truncated")?;
        } else {
            r.serialize_field("truncated", &cut)?;
        }
        r.end()
    }
}

impl AuditRecord {
    /// Appends the record as JSON: the same bytes as
    /// `serde_json::to_writer(out, self)` (a test holds the two equal).
    ///
    /// Why not that call: the audit line is written for every request, and
    /// serde_json escapes every key and every byte of the 128-character block
    /// ids through its generic machinery: 14 000 of the 107 000 instructions
    /// a warm 3-block request cost (callgrind, benches/README.md). Here the
    /// keys are literals, text that needs no escaping is copied whole, and
    /// serde_json still writes every number and every string that needs an
    /// escape.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":");
        json_str(out, &self.time);
        out.extend_from_slice(b",\"request_id\":\"");
        out.extend_from_slice(&self.request_id.hex());
        out.push(b'"');
        out.extend_from_slice(b",\"peer\":");
        match self.peer {
            Some(p) => json_addr(out, p),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"family\":");
        match self.family() {
            Some(f) => json_hex(out, f),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"blocks\":[");
        for (k, b) in self.blocks().enumerate() {
            if k > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"id\":");
            json_hex(out, b.id);
            out.extend_from_slice(b",\"uses\":");
            json_uint(out, b.uses);
            out.extend_from_slice(b",\"limit\":");
            json_uint(out, b.limit);
            out.push(b'}');
        }
        out.extend_from_slice(b"],\"labels\":[");
        for (k, l) in self.labels().enumerate() {
            if k > 0 {
                out.push(b',');
            }
            json_str(out, &capped(l, MAX_FIELD_BYTES));
        }
        out.extend_from_slice(b"],\"service\":");
        json_str(out, &self.service);
        out.extend_from_slice(b",\"method\":");
        json_str(out, &capped(&self.method, MAX_FIELD_BYTES));
        out.extend_from_slice(b",\"path\":");
        json_str(out, &capped(&self.path, MAX_FIELD_BYTES));
        out.extend_from_slice(b",\"model\":");
        json_opt_str(out, self.model.as_deref(), MAX_FIELD_BYTES);
        if let Some(m) = &self.mcp_method {
            out.extend_from_slice(b",\"mcp_method\":");
            json_str(out, &capped(m, MAX_FIELD_BYTES));
        }
        if let Some(t) = &self.tool {
            out.extend_from_slice(b",\"tool\":");
            json_str(out, &capped(t, MAX_FIELD_BYTES));
        }
        out.extend_from_slice(b",\"decision\":");
        json_str(out, self.decision);
        out.extend_from_slice(b",\"code\":");
        json_str(out, self.code);
        out.extend_from_slice(b",\"reason\":");
        json_opt_str(out, self.reason.as_deref(), MAX_REASON_BYTES);
        out.extend_from_slice(b",\"status\":");
        json_uint(out, Some(self.status));
        out.extend_from_slice(b",\"upstream_status\":");
        json_uint(out, self.upstream_status);
        out.extend_from_slice(b",\"latency_ms\":");
        json_value(out, &self.latency_ms);
        let mut cut = self.cut_fields().peekable();
        if cut.peek().is_some() {
            out.extend_from_slice(b",\"truncated\":[");
            for (k, name) in cut.enumerate() {
                if k > 0 {
                    out.push(b',');
                }
                push_quoted(out, name);
            }
            out.push(b']');
        }
        out.push(b'}');
    }

    /// The fields whose text a line cuts ([`MAX_FIELD_BYTES`],
    /// [`MAX_REASON_BYTES`]), in the line's order.
    pub fn cut_fields(&self) -> impl Iterator<Item = &'static str> {
        let long = |s: Option<&str>, max: usize| s.is_some_and(|s| s.len() > max);
        [
            ("labels", self.labels().any(|l| l.len() > MAX_FIELD_BYTES)),
            ("method", long(Some(&self.method), MAX_FIELD_BYTES)),
            ("path", long(Some(&self.path), MAX_FIELD_BYTES)),
            ("model", long(self.model.as_deref(), MAX_FIELD_BYTES)),
            (
                "mcp_method",
                long(self.mcp_method.as_deref(), MAX_FIELD_BYTES),
            ),
            ("tool", long(self.tool.as_deref(), MAX_FIELD_BYTES)),
            ("reason", long(self.reason.as_deref(), MAX_REASON_BYTES)),
        ]
        .into_iter()
        .filter_map(|(name, cut)| cut.then_some(name))
    }
}

/// Most bytes of a request's own text (method, path, model, MCP method and
/// tool) and of each label that an audit line keeps. Anyone can send a
/// 4 KB path without a token, and each refusal is a line: whole, they
/// filled a disk at 65 MB/s from one client. A label is a token holder's
/// text (an attenuation block may add any), no one else's.
pub const MAX_FIELD_BYTES: usize = 256;

/// Most bytes of a refusal's reason a line keeps: Till's own sentence, which
/// may quote a label or part of the request.
pub const MAX_REASON_BYTES: usize = 1024;

/// `s`, or its first `max` bytes (cut on a character boundary) followed by
/// `…` when it is longer. The line's `truncated` field names the fields
/// cut: a value may end in `…` as sent.
pub(crate) fn capped(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}…", &s[..end]))
}

/// A JSON string. The test for "nothing to escape" folds over every byte
/// without an early exit, so the compiler vectorises it; serde_json
/// escapes the rare string that needs it.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes exactly these: control characters, '"' and '\\'.
    let escapes = s.bytes().fold(0u8, |acc, b| {
        acc | u8::from(b < 0x20) | u8::from(b == b'"') | u8::from(b == b'\\')
    });
    if escapes == 0 {
        push_quoted(out, s);
    } else {
        json_value(out, s);
    }
}

/// A block id: hex, as `VerifiedToken` makes them (`hex::encode` of the
/// block's signature), so nothing to escape or to look for.
fn json_hex(out: &mut Vec<u8>, id: &str) {
    debug_assert!(id.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
    push_quoted(out, id);
}

/// `s` between quotes, as it is: the caller knows it needs no escape.
fn push_quoted(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

fn json_opt_str(out: &mut Vec<u8>, s: Option<&str>, max: usize) {
    match s {
        Some(s) => json_str(out, &capped(s, max)),
        None => out.extend_from_slice(b"null"),
    }
}

/// An unsigned number or `null`, with `itoa` (which serde_json uses too)
/// rather than through a serde_json serializer per number.
fn json_uint<N: itoa::Integer>(out: &mut Vec<u8>, n: Option<N>) {
    match n {
        Some(n) => out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
}

/// A socket address as a JSON string (its text never needs escaping).
/// IPv4, every request's case behind a local gateway, is written digit by
/// digit: `fmt`'s machinery for `a.b.c.d:port` cost about 900 instructions
/// a request (callgrind).
fn json_addr(out: &mut Vec<u8>, addr: std::net::SocketAddr) {
    out.push(b'"');
    match addr {
        std::net::SocketAddr::V4(a) => {
            let mut digits = itoa::Buffer::new();
            for (k, octet) in a.ip().octets().into_iter().enumerate() {
                if k > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(digits.format(octet).as_bytes());
            }
            out.push(b':');
            out.extend_from_slice(digits.format(a.port()).as_bytes());
        }
        std::net::SocketAddr::V6(a) => {
            use std::io::Write as _;
            let _ = write!(out, "{a}");
        }
    }
    out.push(b'"');
}

/// A value serde_json writes: numbers, `null`, escaped strings.
fn json_value<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    // Writing numbers and strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
}

impl std::fmt::Debug for AuditRecord {
    // Not derived: the verified token holds the token itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditRecord")
            .field("request_id", &format_args!("{}", self.request_id))
            .field("family", &self.family())
            .field("decision", &self.decision)
            .field("code", &self.code)
            .finish_non_exhaustive()
    }
}

/// Where audit lines go.
#[derive(Clone)]
pub struct AuditSink {
    writer: Option<Arc<Writer>>,
    metrics: Arc<Metrics>,
}

/// Bytes of lines waiting for the writer before new ones are dropped (a
/// few thousand lines: a disk stalled for seconds under full load).
const MAX_QUEUED_BYTES: usize = 8 << 20;

/// How long the writer lets lines gather after a write. Why it waits at
/// all: a wake-up per line costs a busy proxy a futex call and a context
/// switch per request; this makes it at most one per `GATHER`, and a line
/// reaches the file at most this much later.
const GATHER: Duration = Duration::from_millis(10);

/// Lines waiting for the writer thread.
#[derive(Default)]
struct Queue {
    bytes: Vec<u8>,
    lines: u64,
    /// The writer sleeps on the condvar: only then is it worth a wake-up.
    waiting: bool,
    /// Open the file again by its name before the next write
    /// ([`AuditSink::reopen`]).
    reopen: bool,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// The writer thread; dropping the last sink writes what is queued and
/// waits for it (a graceful stop loses no line).
struct Writer {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Writing a line cannot fail part-way (it only appends to a Vec):
    // the queue is always whole lines.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AuditSink {
    /// A sink writing to `file` (appending) and/or stdout; `None` for both
    /// disables the log.
    pub fn start(
        file: Option<PathBuf>,
        stdout: bool,
        max_bytes: Option<u64>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        if file.is_none() && !stdout {
            return Ok(AuditSink {
                writer: None,
                metrics,
            });
        }
        let f = match &file {
            Some(p) => {
                if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    till_core::files::create_private_dir(d)?;
                }
                Some(LogFile::open(p.clone(), max_bytes)?)
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let m = metrics.clone();
        // A thread of its own, not a tokio task: tokio's file writes go
        // through the blocking pool, one hand-over per write.
        let thread = std::thread::Builder::new()
            .name("till-audit".into())
            .spawn(move || write_loop(&s, f, stdout, &m))?;
        Ok(AuditSink {
            writer: Some(Arc::new(Writer {
                shared,
                thread: Mutex::new(Some(thread)),
            })),
            metrics,
        })
    }

    /// Has the writer open the file again by its name before it writes
    /// the next lines, so that a log rotated by renaming (logrotate's
    /// default: move, then `SIGHUP`) goes on in a new file instead of the
    /// renamed one. Lines queued from now on go to the new file. Never
    /// waits for the disk; a file that cannot be opened is logged and the
    /// old one kept.
    pub fn reopen(&self) {
        let Some(w) = &self.writer else { return };
        let mut q = lock(&w.shared.queue);
        q.reopen = true;
        let wake = std::mem::take(&mut q.waiting);
        drop(q);
        if wake {
            w.shared.wake.notify_one();
        }
    }

    /// Queues a record; never waits for the disk.
    pub fn log(&self, r: &AuditRecord) {
        let Some(w) = &self.writer else { return };
        let mut q = lock(&w.shared.queue);
        if q.closed {
            return;
        }
        if q.bytes.len() >= MAX_QUEUED_BYTES {
            drop(q);
            self.metrics.audit_dropped.inc();
            return;
        }
        r.write_json(&mut q.bytes);
        q.bytes.push(b'\n');
        q.lines += 1;
        let wake = std::mem::take(&mut q.waiting);
        drop(q);
        if wake {
            w.shared.wake.notify_one();
        }
    }
}

/// Created 0600 whatever the umask: labels say who an agent works for.
fn open_append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    till_core::files::open_append_private(path)
}

/// The audit file: reopened by name on request, and moved aside past its
/// size cap.
struct LogFile {
    path: PathBuf,
    file: std::fs::File,
    /// Its length as this writer knows it: as opened, plus what it wrote.
    len: u64,
    /// `[audit] max_bytes`.
    max_bytes: Option<u64>,
}

impl LogFile {
    fn open(path: PathBuf, max_bytes: Option<u64>) -> std::io::Result<Self> {
        let file = open_append(&path)?;
        let len = file.metadata()?.len();
        Ok(LogFile {
            path,
            file,
            len,
            max_bytes,
        })
    }

    /// Opens the file again by its name; on failure keeps the open one,
    /// whose lines still land somewhere (in the renamed file).
    fn reopen(&mut self) {
        match open_append(&self.path).and_then(|f| Ok((f.metadata()?.len(), f))) {
            Ok((len, file)) => (self.len, self.file) = (len, file),
            Err(e) => tracing::error!(
                error = %e,
                "cannot reopen the audit log {}; still writing to the file it was",
                self.path.display()
            ),
        }
    }

    /// Appends `batch`, first moving the file to `<file>.1` (replacing it)
    /// when `batch` would take it past `max_bytes`: the log then holds at
    /// most about twice the cap on disk, whoever sends requests.
    fn write(&mut self, batch: &[u8]) -> std::io::Result<()> {
        let full = self
            .max_bytes
            .is_some_and(|max| self.len > 0 && self.len + batch.len() as u64 > max);
        if full {
            self.rotate();
        }
        self.file.write_all(batch)?;
        self.len += batch.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) {
        let mut moved = self.path.clone().into_os_string();
        moved.push(".1");
        match std::fs::rename(&self.path, &moved) {
            Ok(()) => self.reopen(),
            Err(e) => tracing::error!(
                error = %e,
                "cannot move the audit log {} aside at audit.max_bytes; still writing to it",
                self.path.display()
            ),
        }
    }
}

/// Writes queued lines in batches until the sink is dropped.
fn write_loop(shared: &Shared, mut file: Option<LogFile>, stdout: bool, m: &Metrics) {
    let mut batch = Vec::new();
    loop {
        let (lines, closed, again) = {
            let mut q = lock(&shared.queue);
            while q.bytes.is_empty() && !q.closed && !q.reopen {
                q.waiting = true;
                q = shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            q.waiting = false;
            std::mem::swap(&mut q.bytes, &mut batch);
            let again = std::mem::take(&mut q.reopen);
            (std::mem::take(&mut q.lines), q.closed, again)
        };
        if let Some(f) = file.as_mut().filter(|_| again) {
            f.reopen();
        }
        if !batch.is_empty() {
            match file.as_mut() {
                Some(f) => match f.write(&batch) {
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
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&batch).and_then(|()| out.flush());
            }
            batch.clear();
        }
        if closed {
            return;
        }
        std::thread::sleep(GATHER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> AuditRecord {
        AuditRecord {
            time: "2026-12-04T00:00:00Z".into(),
            request_id: crate::monitor::RequestId(n as u64),
            peer: None,
            token: None,
            uses: None,
            service: "openai".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            model: None,
            mcp_method: None,
            tool: None,
            decision: "allow",
            code: "ok",
            reason: Some("a \"quoted\" reason\nwith a newline".into()),
            status: 200,
            upstream_status: Some(200),
            latency_ms: 0.1,
        }
    }

    /// A token whose labels need escaping, with `blocks` blocks.
    fn token(blocks: usize) -> Arc<VerifiedToken> {
        let root = crate::token::keys::generate();
        let mut text = crate::token::issue(
            &root,
            &crate::token::Scope {
                services: vec!["openai".into()],
                max_uses: Some(1000),
                label: Some("ops \"team\"\n\\ \u{1} é".into()),
                ..Default::default()
            },
        )
        .unwrap();
        for k in 1..blocks {
            text = crate::token::attenuate(
                &text,
                &crate::token::Scope {
                    max_uses: (k % 2 == 1).then_some(10),
                    label: Some(format!("agent {k}")),
                    ..Default::default()
                },
            )
            .unwrap();
        }
        let verifier =
            crate::verify::Verifier::new(root.public(), crate::policy::Policies::default_policy());
        Arc::new(verifier.verify_token(&text).unwrap())
    }

    fn same_as_serde(r: &AuditRecord) {
        let mut fast = Vec::new();
        r.write_json(&mut fast);
        let serde = serde_json::to_vec(r).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&fast),
            String::from_utf8_lossy(&serde)
        );
    }

    #[test]
    fn the_audit_line_writer_writes_what_serde_writes() {
        let mut r = record(7);
        same_as_serde(&r);
        r.peer = Some("[::1]:8080".parse().unwrap());
        r.model = Some("gpt-4o".into());
        r.mcp_method = Some("tools/call".into());
        r.tool = Some("search \"web\"".into());
        r.upstream_status = None;
        r.reason = None;
        for (blocks, uses) in [
            (1, None),
            (3, Some(vec![5, 4, 3])),
            (2, Some(vec![1])),
            (3, Some(vec![0, u64::MAX, 10_000_000_000])),
        ] {
            r.token = Some(token(blocks));
            r.uses = uses;
            same_as_serde(&r);
        }
        for latency in [0.0, 1e-7, 12345.678, f64::NAN, f64::INFINITY] {
            r.latency_ms = latency;
            same_as_serde(&r);
        }
    }

    proptest::proptest! {
        #[test]
        fn the_audit_line_writer_escapes_any_text_as_serde_does(
            // Across the bounds: lines cut their text as serde would write
            // the cut text.
            path in "\\PC{0,300}",
            reason in proptest::option::of(proptest::collection::vec(0u8..=0x7f, 0..1100)),
            model in proptest::option::of("[\\x00-\\x7f\"\\\\é€😀]{0,12}"),
            tool in proptest::option::of("\\PC{0,8}"),
            ip in 0u32..,
            ip6 in proptest::option::of((0u128.., 0u32..)),
            port in 0u16..,
            status in 0u16..,
            upstream_status in proptest::option::of(0u16..),
            latency in proptest::num::f64::ANY,
            id in 0u64..,
        ) {
            let mut r = record(1);
            r.request_id = crate::monitor::RequestId(id);
            r.upstream_status = upstream_status;
            r.path = path;
            r.reason = reason.map(|b| String::from_utf8(b).unwrap());
            r.model = model;
            r.tool = tool;
            r.peer = Some(match ip6 {
                None => std::net::SocketAddr::from((std::net::Ipv4Addr::from(ip), port)),
                Some((ip, scope)) => std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
                    ip.into(),
                    port,
                    0,
                    scope,
                )),
            });
            r.status = status;
            r.latency_ms = latency;
            same_as_serde(&r);
        }
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary_and_named_in_truncated() {
        let mut r = record(3);
        r.path = format!("/{}", "€".repeat(1360));
        r.method = "P".repeat(300);
        r.reason = Some("r".repeat(5000));
        let mut line = Vec::new();
        r.write_json(&mut line);
        assert!(line.len() < 2048, "{} bytes", line.len());
        let v: serde_json::Value = serde_json::from_slice(&line).expect("whole JSON");
        // '/' and 85 three-byte characters: 256 would split the 86th.
        let want = format!("/{}…", "€".repeat(85));
        assert_eq!(v["path"], want.as_str());
        assert_eq!(v["method"], format!("{}…", "P".repeat(256)).as_str());
        assert_eq!(v["reason"], format!("{}…", "r".repeat(1024)).as_str());
        assert_eq!(
            v["truncated"],
            serde_json::json!(["method", "path", "reason"])
        );
        same_as_serde(&r);
        // The rest: MCP text, model, and labels from a token's blocks.
        let mut r = record(4);
        r.model = Some("m".repeat(257));
        r.mcp_method = Some("tools/call,".repeat(30));
        r.tool = Some("t".repeat(256));
        r.token = Some(labelled(&"l".repeat(400)));
        let mut line = Vec::new();
        r.write_json(&mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).expect("whole JSON");
        assert_eq!(
            v["tool"],
            "t".repeat(256).as_str(),
            "256 bytes are kept whole"
        );
        assert_eq!(v["labels"][0], format!("{}…", "l".repeat(256)).as_str());
        assert_eq!(
            v["truncated"],
            serde_json::json!(["labels", "model", "mcp_method"])
        );
        same_as_serde(&r);
        // Nothing cut, no field.
        let mut line = Vec::new();
        record(5).write_json(&mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert!(v.get("truncated").is_none(), "{v}");
    }

    /// A one-block token labelled `label`.
    fn labelled(label: &str) -> Arc<VerifiedToken> {
        let root = crate::token::keys::generate();
        let text = crate::token::issue(
            &root,
            &crate::token::Scope {
                services: vec!["openai".into()],
                label: Some(label.into()),
                ..Default::default()
            },
        )
        .unwrap();
        let verifier =
            crate::verify::Verifier::new(root.public(), crate::policy::Policies::default_policy());
        Arc::new(verifier.verify_token(&text).unwrap())
    }

    #[test]
    fn reopen_follows_a_log_renamed_by_logrotate() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        let rotated = dir.path().join("audit.jsonl.1");
        let sink =
            AuditSink::start(Some(file.clone()), false, None, Arc::new(Metrics::new())).unwrap();
        sink.log(&record(1));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .count()
            < 1
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the first line was never written"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::rename(&file, &rotated).unwrap();
        sink.reopen();
        sink.log(&record(2));
        drop(sink);
        let ids = |p: &std::path::Path| -> Vec<String> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"].to_string()
                })
                .collect()
        };
        assert_eq!(ids(&rotated), [format!("\"{:016x}\"", 1)]);
        assert_eq!(ids(&file), [format!("\"{:016x}\"", 2)]);
    }

    #[test]
    fn past_max_bytes_the_file_is_moved_to_dot_1_and_a_new_one_started() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        let moved = dir.path().join("audit.jsonl.1");
        let metrics = Arc::new(Metrics::new());
        let mut one = Vec::new();
        record(0).write_json(&mut one);
        let line = one.len() as u64 + 1;
        let max = 3 * line;
        let sink = AuditSink::start(Some(file.clone()), false, Some(max), metrics.clone()).unwrap();
        // One line per batch, so the rotations fall between known lines.
        for k in 0..10u64 {
            sink.log(&record(k as usize));
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while metrics.audit_written.get() <= k {
                assert!(
                    std::time::Instant::now() < deadline,
                    "line {k} never written"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        drop(sink);
        let ids = |p: &std::path::Path| -> Vec<u64> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    u64::from_str_radix(v["request_id"].as_str().unwrap(), 16).unwrap()
                })
                .collect()
        };
        // Lines 0-2, 3-5, 6-8 filled a file each; the older ones are gone.
        assert_eq!(ids(&moved), [6, 7, 8]);
        assert_eq!(ids(&file), [9]);
        assert!(std::fs::metadata(&moved).unwrap().len() <= max);
    }

    #[test]
    fn dropping_the_sink_writes_every_queued_line_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        let metrics = Arc::new(Metrics::new());
        let sink = AuditSink::start(Some(file.clone()), false, None, metrics.clone()).unwrap();
        let copy = sink.clone();
        // From several threads at once, as the tokio workers do.
        std::thread::scope(|s| {
            for t in 0..4 {
                let sink = &sink;
                s.spawn(move || {
                    for k in 0..500 {
                        sink.log(&record(t * 1000 + k));
                    }
                });
            }
        });
        drop(sink);
        // One clone still holds the writer: nothing is lost when it goes.
        drop(copy);
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("every line is whole JSON"))
            .collect();
        assert_eq!(lines.len(), 2000);
        assert_eq!(metrics.audit_written.get(), 2000);
        assert_eq!(metrics.audit_dropped.get(), 0);
        // Each thread's lines keep their order.
        for t in 0..4 {
            let ids: Vec<&str> = lines
                .iter()
                .map(|l| l["request_id"].as_str().unwrap())
                .filter(|id| u64::from_str_radix(id, 16).unwrap() / 1000 == t)
                .collect();
            let want: Vec<String> = (0..500).map(|k| format!("{:016x}", t * 1000 + k)).collect();
            assert_eq!(ids, want);
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_lines_instead_of_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let sink = AuditSink::start(
            Some(dir.path().join("a.jsonl")),
            false,
            None,
            metrics.clone(),
        )
        .unwrap();
        // A stalled disk: the queue is at its cap and the writer (asleep,
        // not woken by anyone) does not empty it. `log` must return at
        // once every time, counting what it drops.
        let w = sink.writer.clone().unwrap();
        loop {
            let mut q = lock(&w.shared.queue);
            if q.waiting {
                q.bytes.extend_from_slice(&vec![b' '; MAX_QUEUED_BYTES]);
                break;
            }
            drop(q);
            std::thread::sleep(Duration::from_millis(1));
        }
        for k in 0..1000 {
            sink.log(&record(k));
        }
        assert_eq!(metrics.audit_dropped.get(), 1000);
    }
}
