//! Forwarding to the upstream and streaming the answer back unbuffered.
//!
//! The client's token and any credential header it sent are removed and the
//! real credential is injected. Headers that could make the upstream act on
//! another method, path or account than the one authorized (method
//! overrides, rewrite headers, billing headers, anything the client names in
//! `Connection`) are removed too, and [`refuse_unsafe_request`] refuses what
//! no header filtering can make safe. Redirects are not followed (the client sees
//! the 3xx). There is no total timeout, so long SSE streams live as long as
//! bytes keep coming; the idle timeout cuts a silent upstream. When the
//! client goes away, axum drops the response body, which drops the upstream
//! request.

use axum::body::{Body, Bytes};
use axum::response::Response;
use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

use super::error::ProxyError;
use super::upstream_client::SendError;
use super::{AppState, Upstream};
pub(crate) use crate::request::is_method_override_name;
pub use crate::request::{
    METHOD_OR_URL_HEADERS, dashed, has_method_override, is_url_encoded_form, method_or_url_header,
};

/// The request body as it will be sent.
pub enum Outgoing {
    /// Read already (JSON to find the model, a form to check it).
    Buffered(Bytes),
    /// Passed through as it arrives.
    Stream(Body),
}

/// Headers Till manages itself: never copied from the client (in either
/// spelling, see [`dashed`]), and not allowed in an upstream's
/// `set_headers` / `pass_headers`.
pub fn is_managed_header(name: &str) -> bool {
    let name = &*dashed(name);
    METHOD_OR_URL_HEADERS.contains(&name)
        || MANAGED_HEADERS.contains(&name)
        || name.starts_with("x-forwarded-")
}

/// [`is_managed_header`]'s fixed names besides [`METHOD_OR_URL_HEADERS`]
/// (and besides the `x-forwarded-` prefix).
const MANAGED_HEADERS: [&str; 17] = [
    // Hop-by-hop (RFC 9110 §7.6.1) and framing.
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    // The body Till read as JSON must reach the upstream as JSON.
    "content-type",
    // Client credentials: the token, or a key meant for the upstream.
    "authorization",
    "x-api-key",
    // Forwarding headers: the upstream must not trust the client's.
    "forwarded",
    "x-real-ip",
    // Consumed by Till (a retry of this proxy's attempt, not the upstream's).
    "idempotency-key",
];

/// The client headers one upstream never receives whatever the request,
/// by dashed name ([`dashed`]): the managed ones (but `content-type`, which
/// [`skip_request_header`] passes when so spelled), the upstream's
/// credential header and the names of its `set_headers`. Made once per
/// config load, so forwarding asks one hash set per header instead of
/// comparing it with each list in turn (about 300 instructions a header,
/// callgrind).
#[derive(Debug, PartialEq)]
pub struct DroppedHeaders(std::collections::HashSet<Box<str>, foldhash::fast::RandomState>);

impl DroppedHeaders {
    pub fn new(header: &HeaderName, set_headers: &[(HeaderName, HeaderValue)]) -> Self {
        let fixed = METHOD_OR_URL_HEADERS
            .iter()
            .chain(&MANAGED_HEADERS)
            .filter(|n| **n != "content-type")
            .map(|n| Box::from(*n));
        let own = std::iter::once(header)
            .chain(set_headers.iter().map(|(n, _)| n))
            .map(|n| Box::from(&*dashed(n.as_str())));
        DroppedHeaders(fixed.chain(own).collect())
    }

    fn contains(&self, dashed: &str) -> bool {
        self.0.contains(dashed)
    }
}

/// Headers that choose the account an upstream bills (OpenAI organisation
/// and project): dropped unless the upstream's `pass_headers` lists them, so
/// an agent cannot charge another organisation the key belongs to.
pub const BILLING_HEADERS: &[&str] = &["openai-organization", "openai-project"];

/// Whether a client's header must not reach `upstream`, in either spelling
/// ([`dashed`]). `content-type`, so spelled, is the one managed header that
/// is passed through as sent (a `Connection` naming it is refused before,
/// [`refuse_unsafe_request`]). The headers Till sets itself (`set_headers`,
/// the credential) replace only their own spelling, so the client's other
/// spelling is dropped here.
fn skip_request_header(
    name: &HeaderName,
    upstream: &Upstream,
    named_in_connection: &[String],
) -> bool {
    skip_header(
        name,
        &upstream.dropped_headers,
        &upstream.pass_headers,
        named_in_connection,
    )
}

fn skip_header(
    name: &HeaderName,
    dropped: &DroppedHeaders,
    pass_headers: &[HeaderName],
    named_in_connection: &[String],
) -> bool {
    let n = name.as_str();
    let d = &*dashed(n);
    dropped.contains(d)
        || d.starts_with("x-forwarded-")
        || (d == "content-type" && n != "content-type")
        || (BILLING_HEADERS.contains(&d) && !pass_headers.contains(name))
        || named_in_connection.iter().any(|c| dashed(c) == d)
}

/// Header names a request or an answer lists in `Connection`: hop-by-hop by
/// declaration (RFC 9110 §7.6.1), so a proxy must not forward them.
fn connection_options(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Refuses, before any token work, requests that must not reach an upstream
/// whatever the token allows: TRACE and TRACK echo the request (with the
/// injected credential) back to the client, CONNECT asks for a tunnel, a
/// method with lower-case letters and a `_method` query parameter let
/// frameworks run another method than the one authorized.
pub fn refuse_unsafe_request(parts: &http::request::Parts) -> Result<(), ProxyError> {
    refuse_unsafe(parts.method.as_str(), parts.uri.query())?;
    content_type_once(&parts.headers)?;
    body_headers_not_in_connection(&parts.headers)
}

/// Headers that say how to read the body, for every recipient: RFC 9110
/// §7.6.1 forbids naming them in `Connection`, where a proxy must drop them.
const BODY_HEADERS: [&str; 3] = ["content-type", "content-encoding", "content-length"];

/// Refuses a request whose `Connection` names one of [`BODY_HEADERS`] (in
/// either spelling, [`dashed`]). Till chose how to read the body by them
/// (JSON, form, streamed; `identity`), and dropping them, as `Connection`
/// asks, would let the upstream read the same bytes as something else: a
/// JSON body Till checked, sent without its `Content-Type`, is a form to
/// Rack (`_method=DELETE`, another `model`). Forwarding them anyway would
/// disobey `Connection`, so the request is refused.
fn body_headers_not_in_connection(headers: &HeaderMap) -> Result<(), ProxyError> {
    // No allocation: most requests carry `Connection: keep-alive`.
    let named = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .find_map(|t| BODY_HEADERS.into_iter().find(|b| same_dashed_name(t, b)));
    match named {
        Some(n) => Err(ProxyError::BadRequest(format!(
            "the Connection header names {n}, which describes the body to every recipient and may not be dropped on the way (RFC 9110 section 7.6.1); Till reads the body by it, so it refuses the request: send Connection without {n}"
        ))),
        None => Ok(()),
    }
}

/// Whether the header name `sent` is `name` (lower case, dashed), with
/// ASCII case ignored and `_` read as `-` ([`dashed`]).
fn same_dashed_name(sent: &[u8], name: &str) -> bool {
    sent.len() == name.len()
        && sent.iter().zip(name.bytes()).all(|(&a, b)| {
            let a = if a == b'_' {
                b'-'
            } else {
                a.to_ascii_lowercase()
            };
            a == b
        })
}

/// Refuses a body Till reads (JSON, form, MCP messages) sent with a
/// `Content-Encoding` other than `identity`: Till checks the bytes as they
/// arrive (`model`, `_method`, tool names) and cannot see through gzip or
/// any other coding, while an upstream that decodes request bodies acts on
/// what is inside.
pub fn refuse_encoded_body(headers: &HeaderMap) -> Result<(), ProxyError> {
    match crate::request::content_coding(headers) {
        Some(c) => Err(ProxyError::UnsupportedEncoding(c)),
        None => Ok(()),
    }
}

/// Refuses a request whose body type is ambiguous: two `Content-Type`
/// headers (Till reads the first, Werkzeug and others the last, so a JSON
/// body Till checked the `model` of could be read as a form naming
/// another), or one whose media type holds a comma (two values folded into
/// one line).
fn content_type_once(headers: &HeaderMap) -> Result<(), ProxyError> {
    match crate::request::ambiguous_content_type(headers) {
        Some(why) => Err(ProxyError::BadRequest(why.into())),
        None => Ok(()),
    }
}

/// [`refuse_unsafe_request`] for a request described by its method and
/// query, as a gateway's forward-auth check describes the request it holds.
pub fn refuse_unsafe(m: &str, query: Option<&str>) -> Result<(), ProxyError> {
    // Case-insensitive: some servers read `trace` as TRACE.
    if ["TRACE", "TRACK", "CONNECT"]
        .iter()
        .any(|b| m.eq_ignore_ascii_case(b))
    {
        return Err(ProxyError::MethodNotAllowed(m.to_string()));
    }
    if let Some(why) = crate::request::lower_case_method(m) {
        return Err(ProxyError::BadRequest(why));
    }
    match crate::request::method_override_in_query(query) {
        Some(why) => Err(ProxyError::BadRequest(why.into())),
        None => Ok(()),
    }
}

/// Refuses a URL-encoded form body with a `_method` field, found as in a
/// query string ([`has_method_override`]): Rack's `MethodOverride`, Laravel
/// and Symfony read it from the body as the method to run.
pub fn refuse_method_in_form(body: &[u8]) -> Result<(), ProxyError> {
    match crate::request::method_override_in_form(body) {
        Some(why) => Err(ProxyError::BadRequest(why.into())),
        None => Ok(()),
    }
}

/// The hop-by-hop headers of an upstream's answer (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn skip_response_header(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Sends the request to `upstream` and returns a streaming response.
pub async fn forward(
    st: &AppState,
    upstream: &Upstream,
    parts: &http::request::Parts,
    path: &str,
    body: Outgoing,
) -> Result<Response, ProxyError> {
    let uri = upstream.target.uri(path, parts.uri.query()).map_err(|e| {
        tracing::warn!(error = %e, "cannot build the upstream URI");
        ProxyError::BadGateway("the request path cannot be sent to the upstream".into())
    })?;
    let mut headers =
        HeaderMap::with_capacity(parts.headers.len() + upstream.set_headers.len() + 2);
    let named_in_connection = connection_options(&parts.headers);
    for (name, value) in parts.headers.iter() {
        if !skip_request_header(name, upstream, &named_in_connection) {
            headers.append(name.clone(), value.clone());
        }
    }
    // After filtering, and `insert`: a client's own value never rides along.
    for (name, value) in &upstream.set_headers {
        headers.insert(name.clone(), value.clone());
    }
    if let Some(c) = &upstream.credential {
        headers.insert(upstream.header.clone(), c.clone());
    }
    // The client's own `Host` was filtered out above: this is the upstream's
    // (unless `set_headers` names one, which hyper would keep too).
    if let Some(h) = upstream.target.host_header() {
        headers.entry(header::HOST).or_insert_with(|| h.clone());
    }
    // What the reqwest client this replaced sent when the client had none.
    if !headers.contains_key(header::ACCEPT) {
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
    }
    let body = match body {
        Outgoing::Buffered(b) => Body::from(b),
        Outgoing::Stream(b) => b,
    };
    let mut req = http::Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    let resp = st.client.send(req).await.map_err(|e| upstream_error(&e))?;

    let (mut head, body) = resp.into_parts();
    strip_response_headers(&mut head.headers);
    // SSE must not be buffered by anything between us and the client.
    if is_event_stream(&head.headers) {
        head.headers
            .insert("x-accel-buffering", HeaderValue::from_static("no"));
    }
    Ok(Response::from_parts(head, body))
}

/// Removes the hop-by-hop headers of an upstream's answer, in place (the
/// answer's other headers pass as they are): those of RFC 9110 §7.6.1 and
/// those its `Connection` names, and a `Content-Length` sent together with
/// `Transfer-Encoding`.
fn strip_response_headers(h: &mut HeaderMap) {
    // One pass to find out whether there are any (a streamed answer has
    // `transfer-encoding`): then each name is removed with all its values.
    if !h.keys().any(skip_response_header) {
        return;
    }
    // RFC 9112 §6.3: the body was framed by Transfer-Encoding, so the
    // length is not its length. Relayed (without the Transfer-Encoding),
    // it would frame the answer to the client: cut short, yet looking
    // complete.
    if h.contains_key(header::TRANSFER_ENCODING) {
        h.remove(header::CONTENT_LENGTH);
    }
    // Hop-by-hop by declaration, as on the request side; but never what
    // says how to read the body (a sender may not name it, RFC 9110
    // §7.6.1, and the client reads the body by it).
    for n in connection_options(h) {
        if !BODY_HEADERS.contains(&n.as_str()) {
            h.remove(n.as_str());
        }
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

fn is_event_stream(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

fn upstream_error(e: &SendError) -> ProxyError {
    tracing::warn!(error = %e, "upstream request failed");
    match e {
        SendError::ConnectTimeout => {
            ProxyError::GatewayTimeout("cannot connect to the upstream".into())
        }
        SendError::Connect(_) => ProxyError::BadGateway("cannot connect to the upstream".into()),
        SendError::Timeout => {
            ProxyError::GatewayTimeout("no answer from the upstream in time".into())
        }
        SendError::Failed(_) => ProxyError::BadGateway("the upstream connection failed".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answers_hop_by_hop_headers_are_removed_with_every_value() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("content-type", "application/json"),
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("keep-alive", "max=100"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-request-id", "abc"),
            ("x-request-id", "def"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_response_headers(&mut h);
        let left: Vec<(&str, &str)> = h
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            left,
            [
                ("content-type", "application/json"),
                ("x-request-id", "abc"),
                ("x-request-id", "def")
            ]
        );
        // None there: the answer is left as it is.
        let before = h.clone();
        strip_response_headers(&mut h);
        assert_eq!(h, before);
    }

    fn headers(lines: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in lines {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// Regression: an answer framed by Transfer-Encoding kept its
    /// Content-Length, which then framed it to the client, cut short.
    #[test]
    fn an_answers_content_length_goes_when_it_has_transfer_encoding() {
        let mut h = headers(&[
            ("transfer-encoding", "chunked"),
            ("content-length", "3"),
            ("content-type", "text/plain"),
        ]);
        strip_response_headers(&mut h);
        assert_eq!(h, headers(&[("content-type", "text/plain")]));
        let mut h = headers(&[("content-length", "3"), ("connection", "close")]);
        strip_response_headers(&mut h);
        assert_eq!(h, headers(&[("content-length", "3")]));
    }

    /// Regression: headers an upstream named in its `Connection` reached
    /// the client. Those that say how to read the body stay.
    #[test]
    fn headers_an_answer_names_in_connection_are_removed_but_not_its_body_headers() {
        let mut h = headers(&[
            ("connection", "X-Hop-Secret, Content-Type, close, bad name"),
            ("connection", "x-other, content-encoding, content-length"),
            ("x-hop-secret", "s3cret"),
            ("x-other", "1"),
            ("x-other", "2"),
            ("x-kept", "yes"),
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
            ("content-length", "2"),
        ]);
        strip_response_headers(&mut h);
        assert_eq!(
            h,
            headers(&[
                ("x-kept", "yes"),
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
                ("content-length", "2"),
            ])
        );
    }

    /// Regression: `Connection: Content-Type` dropped the Content-Type Till
    /// read the body by.
    #[test]
    fn connection_may_not_name_a_header_that_says_how_to_read_the_body() {
        for c in [
            "content-type",
            "keep-alive, Content-Type",
            "Content_Type",
            "close, content-encoding",
            "CONTENT-LENGTH",
        ] {
            match body_headers_not_in_connection(&headers(&[("connection", c)])) {
                Err(ProxyError::BadRequest(why)) => {
                    assert!(
                        why.starts_with("the Connection header names content-"),
                        "{why}"
                    )
                }
                other => panic!("{c}: {other:?}"),
            }
        }
        for c in ["close", "keep-alive, x-a", "authorization, x-api-key", "te"] {
            assert!(
                body_headers_not_in_connection(&headers(&[("connection", c)])).is_ok(),
                "{c}"
            );
        }
        let p = http::Request::builder()
            .method("POST")
            .uri("/openai/v1/x")
            .header("connection", "close")
            .header("connection", "content-type")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert!(refuse_unsafe_request(&p).is_err(), "on any line");
    }

    #[test]
    fn only_bodies_without_a_content_coding_are_read() {
        for ok in [
            &[][..],
            &[("content-encoding", "identity")],
            &[("content-encoding", "Identity, ")],
        ] {
            assert!(refuse_encoded_body(&headers(ok)).is_ok(), "{ok:?}");
        }
        for (bad, named) in [
            (&[("content-encoding", "gzip")][..], "gzip"),
            (&[("content-encoding", "identity, br")], "br"),
            (
                &[
                    ("content-encoding", "identity"),
                    ("content-encoding", "x-custom"),
                ],
                "x-custom",
            ),
        ] {
            match refuse_encoded_body(&headers(bad)) {
                Err(ProxyError::UnsupportedEncoding(c)) => assert_eq!(c, named),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    fn parts(method: &str, uri: &str) -> http::request::Parts {
        http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn trace_track_and_connect_are_refused_in_any_case() {
        for m in ["TRACE", "trace", "Track", "CONNECT", "connect"] {
            assert!(
                matches!(
                    refuse_unsafe_request(&parts(m, "/openai/v1/x")),
                    Err(ProxyError::MethodNotAllowed(_))
                ),
                "{m}"
            );
        }
        for m in [
            "GET", "POST", "DELETE", "OPTIONS", "PATCH", "TRACES", "M-SEARCH",
        ] {
            assert!(
                refuse_unsafe_request(&parts(m, "/openai/v1/x")).is_ok(),
                "{m}"
            );
        }
    }

    /// Regression: `delete` passed a deny-list for DELETE, and servers that
    /// upper-case the method ran it as DELETE.
    #[test]
    fn methods_with_lower_case_letters_are_refused() {
        for m in ["delete", "Delete", "DELETe", "get", "post", "m-search"] {
            match refuse_unsafe_request(&parts(m, "/openai/v1/x")) {
                Err(ProxyError::BadRequest(why)) => assert!(
                    why.contains("methods are upper case; send")
                        && why.contains(&m.to_ascii_uppercase()),
                    "{why}"
                ),
                other => panic!("{m}: {other:?}"),
            }
        }
    }

    #[test]
    fn regression_a_method_override_name_behind_brackets_is_found() {
        // Rack 2 and `qs` drop leading `[` and `]` from a name.
        for q in [
            "[_method]=DELETE",
            "]_method=DELETE",
            "[[_method]]=x",
            "%5B_method%5D=x",
            "a=1&[_METHOD]=x",
            "+[_method]=x",
        ] {
            assert!(has_method_override(q), "{q}");
        }
        for q in ["[my_method]=x", "a[_method]=x", "[]method=x"] {
            assert!(!has_method_override(q), "{q}");
        }
    }

    /// Regression (red team, wave 2, fifth pass): Rack reads an empty
    /// Content-Type as none, so a POST with `Content-Type:` and a body is a
    /// form to it (`_method=DELETE` ran DELETE), and Till streamed it
    /// unread.
    #[test]
    fn regression_an_empty_content_type_is_none() {
        let with = |method: &str, v: &str| {
            let mut p = parts(method, "/openai/v1/x");
            p.headers
                .insert(header::CONTENT_TYPE, HeaderValue::from_str(v).unwrap());
            p.headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static("14"));
            is_url_encoded_form(&p)
        };
        assert!(with("POST", ""));
        assert!(with("POST", " \t"));
        assert!(!with("PUT", ""));
        assert!(!with("POST", ";charset=utf-8"));
    }

    #[test]
    fn method_override_query_parameters_are_found_however_encoded() {
        for q in [
            "_method=DELETE",
            "_METHOD=x",
            "a=1&_method=x",
            "a=1;_Method=x",
            "%5Fmethod=x",
            "%5f%6d%65%74%68%6f%64=x",
            "%255Fmethod=x",
            "%25255Fmethod=x",
            "_method[]=x",
            "_method%5B%5D=x",
            "+_method=x",
            "_method",
            // PHP turns `.` and ` ` into `_` and drops leading spaces.
            ".method=DELETE",
            "%2Emethod=DELETE",
            "+.method=x",
            "%20.METHOD=x",
        ] {
            assert!(has_method_override(q), "{q}");
        }
        for q in [
            "",
            "method=x",
            "my_method=x",
            "q=_method",
            "_metho=x",
            "a.method=x",
            "..method=x",
            "%zz=1",
            "%",
        ] {
            assert!(!has_method_override(q), "{q}");
        }
    }

    #[test]
    fn managed_headers_are_found_in_either_spelling() {
        for n in [
            "x_http_method_override",
            "x-http_method",
            "x_forwarded_for",
            "x_forwarded_prefix",
            "x_api_key",
            "idempotency_key",
            "content_type",
            "transfer_encoding",
        ] {
            assert!(is_managed_header(n), "{n}");
        }
        assert!(!is_managed_header("x_kept"));
        let mut h = HeaderMap::new();
        h.insert("x-kept", HeaderValue::from_static("1"));
        assert!(method_or_url_header(&h).is_none());
        h.insert("x_original_url", HeaderValue::from_static("/v1/files"));
        assert_eq!(
            method_or_url_header(&h).map(HeaderName::as_str),
            Some("x_original_url")
        );
    }

    /// The rule [`skip_header`] replaced, list by list: the hash set of
    /// [`DroppedHeaders`] must drop exactly what it dropped.
    fn skip_header_as_before(
        name: &HeaderName,
        header: &HeaderName,
        set_headers: &[(HeaderName, HeaderValue)],
        pass_headers: &[HeaderName],
        named_in_connection: &[String],
    ) -> bool {
        let n = name.as_str();
        let d = dashed(n);
        (is_managed_header(&d) && n != "content-type")
            || d == dashed(header.as_str())
            || (BILLING_HEADERS.contains(&&*d) && !pass_headers.contains(name))
            || set_headers.iter().any(|(s, _)| dashed(s.as_str()) == d)
            || named_in_connection.iter().any(|c| dashed(c) == d)
    }

    #[test]
    fn the_dropped_header_set_drops_what_the_lists_dropped() {
        let name = |n: &str| HeaderName::from_bytes(n.as_bytes()).unwrap();
        let mut names: Vec<String> = METHOD_OR_URL_HEADERS
            .iter()
            .chain(&MANAGED_HEADERS)
            .chain(BILLING_HEADERS)
            .map(|n| n.to_string())
            .collect();
        names.extend(
            [
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded",
                "x-api-key-2",
                "api-key",
                "x-custom-key",
                "user-agent",
                "x-set-one",
                "x-two",
                "accept",
                "accept-encoding",
                "x-a",
                "close",
                "x-kept",
                "content-typ",
                "content-type-x",
            ]
            .map(String::from),
        );
        let underscored: Vec<String> = names.iter().map(|n| n.replace('-', "_")).collect();
        names.extend(underscored);
        let headers = [
            "authorization",
            "x-api-key",
            "api-key",
            "x_custom_key",
            "content-type",
        ];
        let sets: [&[&str]; 4] = [&[], &["user-agent"], &["x_set_one", "x-two"], &["accept"]];
        let passes: [&[&str]; 3] = [&[], &["openai-organization"], &["openai_project"]];
        let conns: [&[&str]; 3] = [&[], &["x-a"], &["x_a", "accept", "close"]];
        let mut dropped = 0;
        for h in headers {
            for set in sets {
                let set: Vec<(HeaderName, HeaderValue)> = set
                    .iter()
                    .map(|n| (name(n), HeaderValue::from_static("v")))
                    .collect();
                let filter = DroppedHeaders::new(&name(h), &set);
                for pass in passes {
                    let pass: Vec<HeaderName> = pass.iter().map(|n| name(n)).collect();
                    for conn in conns {
                        let conn: Vec<String> = conn.iter().map(|c| c.to_string()).collect();
                        for n in &names {
                            let n = name(n);
                            let want = skip_header_as_before(&n, &name(h), &set, &pass, &conn);
                            let got = skip_header(&n, &filter, &pass, &conn);
                            assert_eq!(
                                got, want,
                                "{n} (header {h}, set {set:?}, pass {pass:?}, connection {conn:?})"
                            );
                            dropped += usize::from(got);
                        }
                    }
                }
            }
        }
        // Both answers occur: the comparison is not vacuous.
        assert!(dropped > 0 && dropped < 4 * 4 * 3 * 3 * names.len());
        // Spot checks of what a user relies on.
        let filter = DroppedHeaders::new(&name("authorization"), &[]);
        assert!(!skip_header(&name("content-type"), &filter, &[], &[]));
        assert!(skip_header(&name("content_type"), &filter, &[], &[]));
        assert!(skip_header(&name("x_forwarded_for"), &filter, &[], &[]));
        assert!(skip_header(&name("openai-organization"), &filter, &[], &[]));
        assert!(!skip_header(
            &name("openai-organization"),
            &filter,
            &[name("openai-organization")],
            &[]
        ));
        assert!(!skip_header(&name("accept"), &filter, &[], &[]));
    }

    /// Regression: Till read the first Content-Type and Werkzeug the last.
    #[test]
    fn one_content_type_only() {
        let with = |values: &[&str]| {
            let mut p = parts("POST", "/openai/v1/x");
            for v in values {
                p.headers
                    .append(header::CONTENT_TYPE, HeaderValue::from_str(v).unwrap());
            }
            refuse_unsafe_request(&p)
        };
        assert!(with(&[]).is_ok());
        assert!(with(&["application/json"]).is_ok());
        assert!(with(&["multipart/form-data; boundary=\"a,b\""]).is_ok());
        for bad in [
            &["application/json", "application/x-www-form-urlencoded"][..],
            &["application/json", "application/json"],
            &["application/json, application/x-www-form-urlencoded"],
        ] {
            match with(bad) {
                Err(ProxyError::BadRequest(why)) => assert!(why.contains("Content-Type"), "{why}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn url_encoded_forms_are_recognised_as_frameworks_do() {
        let with = |method: &str, headers: &[(&str, &str)]| {
            let mut p = parts(method, "/openai/v1/x");
            for (k, v) in headers {
                p.headers.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            is_url_encoded_form(&p)
        };
        let ct = |v| [("content-type", v)];
        assert!(with("POST", &ct("application/x-www-form-urlencoded")));
        assert!(with(
            "PUT",
            &ct("Application/X-WWW-Form-Urlencoded; charset=utf-8")
        ));
        assert!(with("POST", &ct("application/x-www-form-urlencoded foo")));
        assert!(with("POST", &[("content-length", "12")]));
        assert!(with("POST", &[("transfer-encoding", "chunked")]));
        assert!(!with("POST", &[("content-length", "0")]));
        assert!(!with("POST", &[]));
        assert!(!with("PUT", &[("content-length", "12")]));
        assert!(!with("POST", &ct("multipart/form-data; boundary=x")));
        assert!(!with("POST", &ct("application/json")));
        assert!(refuse_method_in_form(b"a=1&_method=DELETE").is_err());
        assert!(refuse_method_in_form(b"a=1&%5Fmethod=DELETE").is_err());
        assert!(refuse_method_in_form(b"a=1&b=_method").is_ok());
        assert!(refuse_method_in_form(b"\xff=1").is_ok());
    }

    #[test]
    fn connection_options_are_lower_case_names_from_every_line() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, "close, X-A".parse().unwrap());
        h.append(header::CONNECTION, " x-b ,,".parse().unwrap());
        assert_eq!(connection_options(&h), ["close", "x-a", "x-b"]);
    }
}
