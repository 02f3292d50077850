//! The request path for `api = "mcp"` upstreams (Streamable HTTP MCP
//! servers): every JSON-RPC message is decided on its own, a `tools/call`
//! spends one use, everything else is free, `tools/list` (and
//! `prompts/list`, `resources/list`) results are narrowed to what the token
//! may use, and denials are JSON-RPC
//! errors the MCP client can show.
//!
//! 1. Head as for any upstream: service, path, token (missing or invalid:
//!    HTTP 401, which MCP clients treat as an authentication failure).
//! 2. The body (a POST), read within the same bounds as a JSON body
//!    elsewhere, and parsed strictly ([`crate::mcp::parse`]); the
//!    `Mcp-Method` / `Mcp-Name` headers must agree with it. The body is read
//!    even when the token is revoked or expired: the answer must carry the
//!    message's JSON-RPC `id`, or the client cannot match it to its call.
//! 3. Each message is decided ([`crate::decide`]) with the facts `mcp` and,
//!    for `tools/call`, `tool`. The k-th tool call of a batch is judged as
//!    the k-th next use; other messages with the current counts (they spend
//!    nothing). One denied message denies the batch: each request in it is
//!    answered with an error, the denied one with its reason.
//! 4. Each tool call reserves one use of every block and re-checks, exactly
//!    as an HTTP request does; then the body is forwarded unchanged.
//! 5. JSON and event-stream answers pass through, one event at a time; a
//!    `result.tools` (`prompts`, `resources`) array in them keeps only the
//!    entries the token may use.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::error::{Api, ProxyError};
use super::forward::{Outgoing, forward};
use super::handler::{
    Counts, Reserved, admit_windows, decide_off_the_workers, extract_token, read_body,
    reserve_checked, respond_with, split_service, verify_token,
};
use super::{AppState, Upstream};
use crate::decide::{Stage, decide_free};
use crate::mcp::{self as rpc, Body as Messages, Message, ParseError};
use crate::monitor::Observation;
use crate::token::{McpMessage, RequestFacts};
use crate::verify::{Denial, DenialKind, VerifiedToken};

/// JSON-RPC error codes of Till's answers (the -32000 to -32099 range is
/// the server's own). Documented in README.md ("MCP servers").
pub mod codes {
    /// The message is out of the token's scope (a tool it may not call).
    pub const OUT_OF_SCOPE: i64 = -32001;
    /// The token's uses are spent.
    pub const EXHAUSTED: i64 = -32002;
    pub const EXPIRED: i64 = -32003;
    pub const REVOKED: i64 = -32004;
    /// The token's Datalog hit its run limits.
    pub const LIMITS: i64 = -32005;
    /// Another message of the same batch was denied.
    pub const BATCH_DENIED: i64 = -32006;
    /// No token, or not a valid one.
    pub const UNAUTHENTICATED: i64 = -32010;
    /// The `Mcp-Method` / `Mcp-Name` headers disagree with the body (the
    /// MCP specification's code).
    pub const HEADER_MISMATCH: i64 = -32020;
    /// Anything else Till refused or failed at (store, upstream, limits).
    pub const OTHER: i64 = -32000;
    /// JSON-RPC's own.
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
}

fn code_of(e: &ProxyError) -> i64 {
    match e {
        ProxyError::Denied(d) => match d.kind {
            DenialKind::Exhausted => codes::EXHAUSTED,
            DenialKind::Expired => codes::EXPIRED,
            DenialKind::Revoked => codes::REVOKED,
            DenialKind::Limits => codes::LIMITS,
            // Scope, and any kind added later: refused all the same.
            _ => codes::OUT_OF_SCOPE,
        },
        ProxyError::MissingToken | ProxyError::InvalidToken(_) | ProxyError::ProviderKey => {
            codes::UNAUTHENTICATED
        }
        ProxyError::BadRequest(_) | ProxyError::UnsupportedEncoding(_) => codes::INVALID_REQUEST,
        _ => codes::OTHER,
    }
}

fn rpc_error(id: Value, code: i64, message: String, till_code: &str) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {"code": code, "message": message, "data": {"till_code": till_code}},
    })
}

/// The JSON-RPC error answering `e` for the request `id` (`null` when the
/// request's id is unknown).
pub fn error_body(e: &ProxyError, id: Value) -> Value {
    rpc_error(id, code_of(e), e.message(), e.code())
}

/// What to answer, message by message, when the request is refused after
/// its body was read: `(id, error object)` for each request in it.
#[derive(Default)]
struct Answer {
    batch: bool,
    errors: Vec<Value>,
}

impl Answer {
    /// Renders a refusal: the JSON-RPC errors with HTTP 200 for a denial
    /// (the client shows the message as the call's error), with the error's
    /// own status otherwise; the plain MCP error shape when no request id
    /// can be answered (only notifications, or the body was unreadable).
    fn render(self, e: ProxyError) -> Response {
        let denied = matches!(e, ProxyError::Denied(_));
        // The status and retry headers of the error, with the body replaced.
        let plain = e.into_response_for(Api::Mcp);
        if self.errors.is_empty() {
            return plain;
        }
        let (mut parts, _) = plain.into_parts();
        if denied {
            parts.status = StatusCode::OK;
        }
        let body = if self.batch {
            Value::Array(self.errors)
        } else {
            self.errors.into_iter().next().unwrap_or(Value::Null)
        };
        parts.headers.remove(header::CONTENT_LENGTH);
        Response::from_parts(parts, Body::from(body.to_string()))
    }
}

/// Entry point from the router for a request to `upstream`, an MCP
/// upstream its first path segment names.
pub async fn proxy(
    st: &AppState,
    req: Request,
    upstream: Arc<Upstream>,
    obs: &mut Observation,
) -> Response {
    let mut answer = Answer::default();
    let result = handle(st, req, upstream, obs, &mut answer).await;
    respond_with(st, obs, result, |e| answer.render(e))
}

fn header<'a>(parts: &'a http::request::Parts, name: &str) -> Result<Option<&'a str>, String> {
    let mut values = parts.headers.get_all(name).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(format!("the {name} header is sent twice; send it once"));
    }
    v.to_str()
        .map(Some)
        .map_err(|_| format!("the {name} header is not visible ASCII"))
}

async fn handle(
    st: &AppState,
    req: Request,
    upstream: Arc<Upstream>,
    obs: &mut Observation,
    answer: &mut Answer,
) -> Result<Response, ProxyError> {
    let (mut parts, body) = req.into_parts();
    super::forward::refuse_unsafe_request(&parts)?;
    let (service, rest) = split_service(parts.uri.path())?;
    obs.service = upstream.name.clone();
    let path = crate::path::normalize(rest).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    obs.path = path.clone();
    // Housekeeping spends no use: on another path of the server (its REST
    // routes, an admin page) it would be requests with the credential that
    // no use limit bounds.
    if !at_endpoint(&path, &upstream.mcp_endpoint) {
        return Err(ProxyError::BadRequest(format!(
            "{path:?} is not this MCP server's endpoint; Till forwards MCP requests to {:?} only (upstreams.{}.endpoint)",
            &*upstream.mcp_endpoint, upstream.name
        )));
    }
    // POST carries messages, GET opens the server's event stream, DELETE
    // ends a session; nothing else is MCP.
    if ![http::Method::POST, http::Method::GET, http::Method::DELETE].contains(&parts.method) {
        return Err(ProxyError::BadRequest(format!(
            "{} is not an MCP request: an MCP server takes POST (messages), GET (its event stream) and DELETE (end of a session)",
            parts.method
        )));
    }
    // Every POST body is read (the messages), so none may be encoded.
    if parts.method == http::Method::POST {
        super::forward::refuse_encoded_body(&parts.headers)?;
    }
    let token_text = extract_token(&parts.headers)?;
    let (token, revoked) = verify_token(st, token_text, obs)?;

    // The messages: a POST carries them; a GET (the server's event stream)
    // or a DELETE (end of session) carries none.
    let (messages, outgoing, permit) = if parts.method == http::Method::POST {
        let content_length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if content_length.is_some_and(|len| len > st.limits.max_body_bytes as u64) {
            return Err(ProxyError::TooLarge(st.limits.max_body_bytes));
        }
        let (bytes, permit) = read_body(st, body, content_length).await?;
        let messages = rpc::parse(&bytes).map_err(|e| {
            let (code, id) = match &e {
                ParseError::NotJson(_) => (codes::PARSE_ERROR, None),
                ParseError::Invalid { id, .. } => (codes::INVALID_REQUEST, id.clone()),
            };
            let err = ProxyError::BadRequest(e.to_string());
            answer.errors.push(rpc_error(
                id.unwrap_or(Value::Null),
                code,
                err.message(),
                err.code(),
            ));
            err
        })?;
        (messages, Outgoing::Buffered(bytes), permit)
    } else {
        // Nothing here reads a body, so one would reach the server
        // unchecked (a tools/call in a GET, spending no use).
        if !till_core::request::declares_no_body(&parts.headers) {
            return Err(ProxyError::BadRequest(format!(
                "an MCP {} request carries no body, and this one has one; send MCP messages with POST",
                parts.method
            )));
        }
        let none = Messages {
            messages: vec![Message {
                id: None,
                method: None,
                name: None,
            }],
            batch: false,
        };
        (none, Outgoing::Stream(body), None)
    };
    answer.batch = messages.batch;
    describe(&messages, obs);
    let request_ids: Vec<Value> = messages
        .messages
        .iter()
        .filter_map(|m| m.method.as_ref().and(m.id.clone()))
        .collect();

    let agree = header(&parts, "mcp-method").and_then(|m| {
        let n = header(&parts, "mcp-name")?;
        rpc::check_headers(&messages, m, n)
    });
    if let Err(why) = agree {
        let err = ProxyError::BadRequest(why);
        for id in &request_ids {
            answer.errors.push(rpc_error(
                id.clone(),
                codes::HEADER_MISMATCH,
                err.message(),
                err.code(),
            ));
        }
        return Err(err);
    }

    // Decide every message before anything is spent, on the counts the
    // store remembers when it has them (no round trip to a shared store
    // for a warm token). Remembered counts may only allow: a denial on them
    // is decided again on a fresh read, as on the HTTP path.
    let mut counts = Counts::current(st, &token.ids).await?;
    let base = RequestFacts {
        service: service.to_string(),
        method: parts.method.as_str().to_string(),
        path: path.clone(),
        model: None,
        mcp: None,
        time: st.clock.now(),
    };
    let (calls, denials) = loop {
        let mut calls: Vec<RequestFacts> = Vec::new();
        let mut denials: Vec<Option<Denial>> = Vec::with_capacity(messages.messages.len());
        for m in &messages.messages {
            let facts = RequestFacts {
                mcp: Some(m.facts()),
                ..base.clone()
            };
            let verdict = if m.is_tool_call() {
                // The k-th call of a batch is the k-th next use.
                let ahead: Vec<u64> = counts
                    .values
                    .iter()
                    .map(|c| c.saturating_add(calls.len() as u64))
                    .collect();
                calls.push(facts.clone());
                let alone = crate::verify::WindowCounts::alone(&token);
                decide_off_the_workers(st, &token, revoked, &facts, &ahead, &alone, Stage::Final)
                    .await
            } else {
                decide_free_off_the_workers(st, &token, revoked, &facts, &counts.values).await
            };
            denials.push(verdict.err());
        }
        if counts.exact || denials.iter().all(Option::is_none) {
            break (calls, denials);
        }
        counts.reread(st, &token.ids).await?;
    };
    obs.uses = Some(counts.values.clone());
    if let Some(first) = denials.iter().flatten().next().cloned() {
        for (m, d) in messages.messages.iter().zip(&denials) {
            let Some(id) = m.method.as_ref().and(m.id.clone()) else {
                continue;
            };
            let e = match d {
                Some(d) => error_body(&ProxyError::Denied(d.clone()), id),
                None => rpc_error(
                    id,
                    codes::BATCH_DENIED,
                    format!("not sent: another message of this batch was denied ({first})"),
                    "batch_denied",
                ),
            };
            answer.errors.push(e);
        }
        return Err(ProxyError::Denied(first));
    }

    // Spend: one use and one slot of every rate window and concurrency
    // cap per tool call, exactly as an HTTP request, all or none: the uses
    // and slots taken are given back if a later call of the batch is
    // refused (its window full, or the uses gone to a concurrent request),
    // since the batch is then not sent at all.
    let mut window_guards = Vec::new();
    let mut reserved = Vec::with_capacity(calls.len());
    let spend = async {
        for facts in &calls {
            let (windows, guard) = admit_windows(st, &token, obs).await?;
            window_guards.extend(guard);
            reserved.push(reserve_checked(st, &token, facts, &windows, obs).await?);
        }
        Ok::<(), ProxyError>(())
    };
    if let Err(e) = spend.await {
        for r in reserved {
            r.release().await;
        }
        obs.uses = Some(counts.values.clone());
        for id in &request_ids {
            answer.errors.push(error_body(&e, id.clone()));
        }
        return Err(e);
    }
    reserved.into_iter().for_each(Reserved::spend);

    // A compressed answer could not be filtered.
    parts.headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let lists = parts.method == http::Method::GET
        || messages
            .messages
            .iter()
            .any(|m| rpc::LISTING.contains(&m.method.as_deref().unwrap_or("")));
    // Rate slots are spent; in-flight slots are held until the answer ends.
    let in_flight: Vec<crate::store::window::InFlight> = window_guards
        .into_iter()
        .map(crate::store::window::WindowGuard::forwarded)
        .filter(crate::store::window::InFlight::holds_slots)
        .collect();
    obs.forwarding = true;
    let result = forward(st, &upstream, &parts, &path, outgoing).await;
    drop(permit);
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            for id in &request_ids {
                answer.errors.push(error_body(&e, id.clone()));
            }
            return Err(e);
        }
    };
    obs.upstream_status = Some(resp.status().as_u16());
    let resp = if !lists {
        resp
    } else {
        let may_call = may_call(st, &token, base, counts.values);
        filter_response(resp, may_call, st.limits.max_body_bytes)
    };
    Ok(if in_flight.is_empty() {
        resp
    } else {
        super::handler::hold_until_sent(resp, in_flight)
    })
}

/// Names the messages in the audit line: methods and tools, comma-separated.
fn describe(messages: &Messages, obs: &mut Observation) {
    let join = |it: &mut dyn Iterator<Item = &str>| {
        let v: Vec<&str> = it.collect();
        (!v.is_empty()).then(|| v.join(","))
    };
    obs.mcp_method = join(
        &mut messages
            .messages
            .iter()
            .map(|m| m.method.as_deref().unwrap_or("")),
    );
    obs.tool = join(&mut messages.messages.iter().filter_map(Message::tool));
}

/// Whether a normalised request path is the MCP endpoint (with or without
/// a trailing `/`, which servers redirect between).
fn at_endpoint(path: &str, endpoint: &str) -> bool {
    path.trim_end_matches('/') == endpoint.trim_end_matches('/')
}

/// [`decide_free`] off the async workers, as
/// [`decide_off_the_workers`] does for [`crate::decide::decide`].
async fn decide_free_off_the_workers(
    st: &AppState,
    token: &Arc<VerifiedToken>,
    revoked: Option<usize>,
    facts: &RequestFacts,
    counts: &[u64],
) -> Result<(), Denial> {
    let _permit = st
        .datalog_permits
        .acquire()
        .await
        .map_err(|_| Denial::new(DenialKind::Scope, "the proxy is shutting down"))?;
    let (verifier, token, facts, counts) = (
        st.verifier.clone(),
        token.clone(),
        facts.clone(),
        counts.to_vec(),
    );
    tokio::task::spawn_blocking(move || {
        decide_free(&verifier, &token, revoked, &facts, &counts, Stage::Final)
    })
    .await
    .unwrap_or_else(|e| {
        Err(Denial::new(
            DenialKind::Scope,
            format!("authorization failed: {e}"),
        ))
    })
}

/// `(method, name)`: whether the token may use a listed entry with the
/// method that uses it (`tools/call`, `prompts/get`, `resources/read`).
type MayCall = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// Whether the token may use a listed tool, prompt or resource: the
/// decision a message using it would get, use counts aside (a list is not
/// a call).
fn may_call(
    st: &AppState,
    token: &Arc<VerifiedToken>,
    base: RequestFacts,
    counts: Vec<u64>,
) -> MayCall {
    let (verifier, token) = (st.verifier.clone(), token.clone());
    Arc::new(move |method: &str, name: &str| {
        let facts = RequestFacts {
            mcp: Some(McpMessage {
                method: method.into(),
                name: Some(name.to_string()),
            }),
            ..base.clone()
        };
        decide_free(&verifier, &token, None, &facts, &counts, Stage::Final).is_ok()
    })
}

fn content_type(h: &http::HeaderMap) -> String {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Narrows the tool lists in an MCP server's answer, JSON or event stream.
fn filter_response(resp: Response, may_call: MayCall, max: usize) -> Response {
    let (mut parts, body) = resp.into_parts();
    let ct = content_type(&parts.headers);
    let encoded = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity");
    if !parts.status.is_success() || !(ct == "application/json" || ct == "text/event-stream") {
        return Response::from_parts(parts, body);
    }
    if encoded {
        // Asked for identity and got something else: what it lists is
        // unknown, so nothing of it passes.
        return ProxyError::BadGateway(
            "the MCP server compressed its answer although Till asked for none; Till cannot filter its tool list".into(),
        )
        .into_response_for(Api::Mcp);
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = if ct == "application/json" {
        Body::from_stream(futures_util::stream::once(filter_json(body, may_call, max)))
    } else {
        Body::from_stream(filter_events(body, may_call, max))
    };
    Response::from_parts(parts, body)
}

fn too_large(max: usize) -> std::io::Error {
    std::io::Error::other(format!(
        "an MCP answer (or one event of it) is larger than {max} bytes (limits.max_body_bytes); Till does not pass tool lists it cannot read"
    ))
}

async fn filter_json(body: Body, may_call: MayCall, max: usize) -> Result<Bytes, std::io::Error> {
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(std::io::Error::other)?;
        if buf.len() + chunk.len() > max {
            return Err(too_large(max));
        }
        buf.extend_from_slice(&chunk);
    }
    let bytes = buf.freeze();
    tokio::task::spawn_blocking(move || {
        let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
            return bytes;
        };
        if rpc::filter_lists(&mut v, &mut |m, n| may_call(m, n)) {
            Bytes::from(v.to_string())
        } else {
            bytes
        }
    })
    .await
    .map_err(std::io::Error::other)
}

/// The end of the first event in `buf`: the index just past its blank line.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        match buf[i] {
            b'\n' if buf.get(i + 1) == Some(&b'\n') => return Some(i + 2),
            b'\n' if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') => {
                return Some(i + 3);
            }
            b'\r' if buf.get(i + 1) == Some(&b'\r') => return Some(i + 2),
            _ => {}
        }
        i += 1;
    }
    None
}

/// One server-sent event with its tool list narrowed; the event as it came
/// when it holds none.
fn filter_event(event: Bytes, may_call: &MayCall) -> Bytes {
    let Ok(text) = std::str::from_utf8(&event) else {
        return event;
    };
    // Any of CRLF, LF and CR ends a line; an event holds no blank line.
    let lines: Vec<&str> = text.split(['\n', '\r']).filter(|l| !l.is_empty()).collect();
    let data: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    if data.is_empty() {
        return event;
    }
    let joined = data.join("\n");
    let Ok(mut v) = serde_json::from_str::<Value>(&joined) else {
        return event;
    };
    if !rpc::filter_lists(&mut v, &mut |m, n| may_call(m, n)) {
        return event;
    }
    let mut out = String::with_capacity(event.len());
    let mut wrote_data = false;
    for l in lines {
        if l.starts_with("data:") {
            // Written once, from the value read: one reading for every client.
            if !wrote_data {
                out.push_str("data: ");
                out.push_str(&v.to_string());
                out.push('\n');
                wrote_data = true;
            }
        } else if !l.is_empty() {
            out.push_str(l);
            out.push('\n');
        }
    }
    out.push('\n');
    Bytes::from(out)
}

/// Passes an event stream on one event at a time (never the whole stream),
/// narrowing tool lists; an event longer than `max` ends the stream.
fn filter_events(
    body: Body,
    may_call: MayCall,
    max: usize,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    struct State {
        inner: axum::body::BodyDataStream,
        buf: bytes::BytesMut,
        may_call: MayCall,
        done: bool,
    }
    let state = State {
        inner: body.into_data_stream(),
        buf: bytes::BytesMut::new(),
        may_call,
        done: false,
    };
    futures_util::stream::unfold(state, move |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            if let Some(end) = event_end(&s.buf) {
                let event = s.buf.split_to(end).freeze();
                let may_call = s.may_call.clone();
                let out = tokio::task::spawn_blocking(move || filter_event(event, &may_call))
                    .await
                    .map_err(std::io::Error::other);
                if out.is_err() {
                    s.done = true;
                }
                return Some((out, s));
            }
            match s.inner.next().await {
                Some(Ok(chunk)) => {
                    if s.buf.len() + chunk.len() > max {
                        s.done = true;
                        return Some((Err(too_large(max)), s));
                    }
                    s.buf.extend_from_slice(&chunk);
                }
                Some(Err(e)) => {
                    s.done = true;
                    return Some((Err(std::io::Error::other(e)), s));
                }
                None => {
                    // An unterminated last event is dropped by clients, and
                    // by Till rather than pass a list it did not read.
                    return None;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow_add() -> MayCall {
        Arc::new(|_: &str, n: &str| n == "add")
    }

    #[test]
    fn events_are_found_whatever_the_line_ends() {
        assert_eq!(event_end(b"data: x\n\nrest"), Some(9));
        assert_eq!(event_end(b"data: x\r\n\r\nrest"), Some(11));
        assert_eq!(event_end(b"data: x\r\rrest"), Some(9));
        assert_eq!(event_end(b"data: x\n"), None);
    }

    #[test]
    fn an_event_with_a_tool_list_keeps_only_callable_tools() {
        let ev = Bytes::from(
            "event: message\r\nid: 7\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{\"tools\":[{\"name\":\"add\"},{\"name\":\"delete_everything\"}]}}\r\n\r\n",
        );
        let out = filter_event(ev, &allow_add());
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.starts_with("event: message\nid: 7\ndata: "), "{text}");
        assert!(
            text.contains("\"add\"") && !text.contains("delete_everything"),
            "{text}"
        );
        assert!(text.ends_with("\n\n"));
        // Other events pass byte for byte.
        let ping = Bytes::from_static(b": ping\r\n\r\n");
        assert_eq!(filter_event(ping.clone(), &allow_add()), ping);
    }

    #[tokio::test]
    async fn a_stream_is_filtered_event_by_event_and_bounded() {
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(
                b"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"na",
            )),
            Ok(Bytes::from_static(
                b"me\":\"add\"},{\"name\":\"x\"}]}}\n\ndata: {}\n\n",
            )),
        ];
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let out: Vec<_> = filter_events(body, allow_add(), 1 << 20).collect().await;
        let text: String = out
            .into_iter()
            .map(|r| String::from_utf8(r.unwrap().to_vec()).unwrap())
            .collect();
        assert_eq!(
            text,
            "data: {\"id\":1,\"jsonrpc\":\"2.0\",\"result\":{\"tools\":[{\"name\":\"add\"}]}}\n\ndata: {}\n\n"
        );
        let big = Body::from(vec![b'a'; 100]);
        let out: Vec<_> = filter_events(big, allow_add(), 10).collect().await;
        assert!(out.iter().any(|r| r.is_err()));
    }
}
