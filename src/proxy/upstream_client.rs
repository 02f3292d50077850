//! The HTTP client that forwards to upstreams: hyper's pooled client over a
//! rustls connector, without reqwest's per-request layers (URL parsing,
//! connector cloning, body boxing) on the request path.
//!
//! It keeps what the reqwest client it replaces did: redirects are never
//! followed (this client has no redirect support at all), the connect
//! timeout covers TCP and the TLS handshake, the idle timeout covers the
//! wait for the response head and every silence between body frames
//! (there is no total timeout, so SSE streams live as long as bytes keep
//! coming), HTTP/2 is used when an `https` upstream offers it through ALPN
//! (plain `http` upstreams get HTTP/1.1), and certificates are checked
//! against the platform's trust roots ([`rustls_platform_verifier`]) with
//! TLS 1.2 and 1.3 and the process's crypto provider (ring).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::{Body, Bytes};
use http::Uri;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use thiserror::Error;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Connector = ConnectTimeout<hyper_rustls::HttpsConnector<HttpConnector>>;

/// Why the client could not be built.
#[derive(Debug, Error)]
#[error("cannot set up TLS for upstreams: {0}")]
pub struct BuildError(String);

/// Why a request got no response head.
#[derive(Debug, Error)]
pub enum SendError {
    /// The TCP connection or the TLS handshake did not complete within the
    /// connect timeout.
    #[error("connecting to the upstream timed out")]
    ConnectTimeout,
    /// No connection (refused, DNS, TLS certificate, ...).
    #[error("cannot connect to the upstream: {0}")]
    Connect(String),
    /// No response head within the idle timeout.
    #[error("no response head from the upstream in time")]
    Timeout,
    /// The connection failed after it was made.
    #[error("the upstream connection failed: {0}")]
    Failed(String),
}

/// Why a response body ended early.
#[derive(Debug, Error)]
pub enum StreamError {
    #[error("the upstream sent no bytes for {0:?}")]
    Idle(Duration),
    #[error("{0}")]
    Upstream(String),
}

/// The pooled client shared by every forwarded request.
pub struct UpstreamClient {
    client: Client<Connector, Body>,
    idle: Duration,
}

impl UpstreamClient {
    /// A client with the given connect and idle timeouts. The process's
    /// crypto provider must be installed ([`super::install_crypto`]).
    pub fn new(connect: Duration, idle: Duration) -> Result<Self, BuildError> {
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
            .map_err(|e| BuildError(e.to_string()))?;
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::ALL_VERSIONS)
            .map_err(|e| BuildError(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();

        let mut http = HttpConnector::new();
        // `https` URLs go through TLS in the wrapping connector.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect));
        // reqwest's defaults: a dead upstream connection is noticed within
        // about a minute even when no request is waiting on it.
        http.set_keepalive(Some(Duration::from_secs(15)));
        http.set_keepalive_interval(Some(Duration::from_secs(15)));
        http.set_keepalive_retries(Some(3));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);

        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(ConnectTimeout {
                inner: https,
                timeout: connect,
            });
        Ok(UpstreamClient { client, idle })
    }

    /// Sends `req` (an absolute URI) and waits for the response head, at
    /// most the idle timeout. The body then streams as the upstream sends
    /// it, cut after the idle timeout of silence.
    pub async fn send(&self, req: http::Request<Body>) -> Result<http::Response<Body>, SendError> {
        let resp = match tokio::time::timeout(self.idle, self.client.request(req)).await {
            Err(_) => return Err(SendError::Timeout),
            Ok(Err(e)) => return Err(classify(&e)),
            Ok(Ok(r)) => r,
        };
        let idle = self.idle;
        Ok(resp.map(|b| Body::new(IdleTimeout::new(b, idle))))
    }
}

fn classify(e: &hyper_util::client::legacy::Error) -> SendError {
    let text = describe(e);
    if e.is_connect() {
        if has_source::<ConnectTimedOut>(e) {
            SendError::ConnectTimeout
        } else {
            SendError::Connect(text)
        }
    } else {
        SendError::Failed(text)
    }
}

fn has_source<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<T>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The error with its cause chain (hyper's errors never hold header values).
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// The connect timeout over the whole connection setup: hyper's
/// `HttpConnector` times the TCP connect only, and a server that accepts
/// and then stalls the TLS handshake must not hold a request longer.
#[derive(Clone)]
struct ConnectTimeout<C> {
    inner: C,
    timeout: Duration,
}

#[derive(Debug, Error)]
#[error("connect timed out")]
struct ConnectTimedOut;

impl<C> tower_service::Service<Uri> for ConnectTimeout<C>
where
    C: tower_service::Service<Uri>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let fut = self.inner.call(dst);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(Box::new(ConnectTimedOut) as BoxError),
            }
        })
    }
}

/// A response body that fails after `idle` without a frame, and logs how
/// a stream that fails ended (the client only sees the stream stop).
struct IdleTimeout {
    inner: Incoming,
    idle: Duration,
    /// Created at the first poll that finds no frame, and restarted at the
    /// first such poll after each frame: a body the upstream has already
    /// sent (a typical JSON answer) costs no timer at all.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether `sleep` runs from the current wait (not an earlier one).
    armed: bool,
}

impl IdleTimeout {
    fn new(inner: Incoming, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            sleep: None,
            armed: false,
        }
    }
}

impl hyper::body::Body for IdleTimeout {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.armed = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let text = describe(&e);
                tracing::warn!(error = %text, "upstream stream ended with an error");
                Poll::Ready(Some(Err(StreamError::Upstream(text))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                // The wait is the upstream's: it starts when Till asks for
                // a frame and there is none, not when the answer began.
                if !this.armed {
                    let deadline = tokio::time::Instant::now() + this.idle;
                    match this.sleep.as_mut() {
                        Some(sleep) => sleep.as_mut().reset(deadline),
                        None => this.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                    this.armed = true;
                }
                let Some(sleep) = this.sleep.as_mut() else {
                    return Poll::Pending;
                };
                ready!(sleep.as_mut().poll(cx));
                let e = StreamError::Idle(this.idle);
                tracing::warn!(error = %e, "upstream stream ended with an error");
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where an upstream lives, split once at config load so that a request
/// only appends its path: scheme and authority are shared, never parsed
/// again.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// The URL's path without its trailing `/` (often empty).
    base_path: String,
    /// `Host` for a plain-HTTP upstream; see [`Target::host_header`].
    host: Option<http::HeaderValue>,
}

impl Target {
    /// Splits a validated `http(s)` upstream URL, serialised as the URL
    /// parser writes it (lower-case host, no default port, escapes added),
    /// which is what the reqwest client sent.
    pub fn parse(url: &str) -> Result<Target, String> {
        let u = reqwest::Url::parse(url).map_err(|e| format!("not a URL ({e})"))?;
        let scheme = match u.scheme() {
            "http" => http::uri::Scheme::HTTP,
            "https" => http::uri::Scheme::HTTPS,
            other => return Err(format!("scheme {other:?} is not http or https")),
        };
        let host = u.host_str().ok_or("the URL has no host")?;
        let authority = match u.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let authority = http::uri::Authority::try_from(authority)
            .map_err(|e| format!("bad host or port ({e})"))?;
        // The URL parser left out a default port, so the authority is what
        // hyper's client would write: host, and the port when not 80.
        let host = (scheme == http::uri::Scheme::HTTP)
            .then(|| http::HeaderValue::from_str(authority.as_str()))
            .transpose()
            .map_err(|e| format!("bad host or port ({e})"))?;
        Ok(Target {
            scheme,
            authority,
            base_path: u.path().trim_end_matches('/').to_string(),
            host,
        })
    }

    /// The `Host` header of a request to a plain-HTTP upstream, made once
    /// per configuration load. hyper's client writes the same value when a
    /// request has none (`host`, and `:port` unless 80), but with a
    /// `format!` and a parse on every request (2,300 instructions,
    /// callgrind). `None` for HTTPS: an upstream that agrees on HTTP/2
    /// gets the authority as `:authority` and no `Host` header (RFC 9113
    /// §8.3.1), which only hyper knows once the connection is chosen.
    pub fn host_header(&self) -> Option<&http::HeaderValue> {
        self.host.as_ref()
    }

    /// The URI of `path` (normalised, starting with `/`) and `query` at this
    /// upstream. Characters a URL parser would escape are escaped the same
    /// way, so the upstream sees the request line reqwest sent.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let mut pq = String::with_capacity(
            self.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        pq.push_str(&self.base_path);
        push_escaped(&mut pq, path, &PATH_ESCAPED);
        if let Some(q) = query {
            pq.push('?');
            push_escaped(&mut pq, q, &QUERY_ESCAPED);
        }
        Ok(Uri::from_parts({
            let mut p = http::uri::Parts::default();
            p.scheme = Some(self.scheme.clone());
            p.authority = Some(self.authority.clone());
            p.path_and_query = Some(http::uri::PathAndQuery::from_maybe_shared(Bytes::from(pq))?);
            p
        })?)
    }
}

/// Printable ASCII the WHATWG URL parser percent-encodes in a path and in
/// the query of an http(s) URL; controls, space and non-ASCII always are.
const PATH_ESCAPED: [bool; 256] = escape_set(b"\"#<>?`{}");
const QUERY_ESCAPED: [bool; 256] = escape_set(b"\"#<>'");

/// A table, not a search of the set per byte: this runs on every path.
const fn escape_set(printable: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = b <= b' ' as usize || b >= 0x7f;
        b += 1;
    }
    let mut i = 0;
    while i < printable.len() {
        t[printable[i] as usize] = true;
        i += 1;
    }
    t
}

fn push_escaped(out: &mut String, s: &str, set: &[bool; 256]) {
    let escape = |b: u8| set[usize::from(b)];
    if !s.bytes().any(escape) {
        out.push_str(s);
        return;
    }
    for b in s.bytes() {
        if escape(b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_character_is_escaped_as_the_url_parser_escapes_it() {
        let t = Target::parse("http://h").unwrap();
        let chars = (0u8..0x80).map(char::from).chain(['é', '€', '😀']);
        // '?', '#' and '\\' mean something else to the parser, and a
        // normalised path holds none of them.
        for c in chars.filter(|c| !matches!(c, '?' | '#' | '\\')) {
            let path = format!("/a{c}b");
            let query = format!("q{c}r");
            let ours = t.uri(&path, Some(&query)).unwrap().to_string();
            let url = reqwest::Url::parse(&format!("http://h{path}?{query}")).unwrap();
            // The parser drops tabs and newlines; we escape them (and a
            // normalised path never has a control character anyway).
            if matches!(c, '\t' | '\n' | '\r') {
                assert!(ours.contains("%0"), "{c:?}: {ours}");
                continue;
            }
            assert_eq!(ours, url.as_str(), "{c:?}");
        }
    }

    #[test]
    fn target_keeps_the_base_path_and_serialises_like_a_url_parser() {
        let t = Target::parse("HTTPS://API.Example.com:443/base/").unwrap();
        assert_eq!(
            t.uri("/v1/chat", Some("a=1")).unwrap().to_string(),
            "https://api.example.com/base/v1/chat?a=1"
        );
        let t = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            t.uri("/v1/x", None).unwrap().to_string(),
            "http://127.0.0.1:8080/v1/x"
        );
        let t = Target::parse("http://[::1]:9/").unwrap();
        assert_eq!(t.uri("/", None).unwrap().to_string(), "http://[::1]:9/");
    }

    #[test]
    fn the_host_header_is_the_one_hypers_client_would_write() {
        for url in [
            "http://Example.COM",
            "http://example.com:80/base",
            "http://example.com:8080/x/",
            "http://127.0.0.1:80",
            "http://127.0.0.1:54321",
            "http://[::1]",
            "http://[::1]:9/",
            "http://xn--bcher-kva.example",
            "http://bücher.example:81",
        ] {
            let t = Target::parse(url).unwrap();
            let uri = t.uri("/v1", None).unwrap();
            // hyper-util's `Client::send_request` for a request without Host.
            let host = uri.host().unwrap();
            let want = match uri.port_u16() {
                Some(80) | None => host.to_string(),
                Some(p) => format!("{host}:{p}"),
            };
            assert_eq!(t.host_header().unwrap(), want.as_str(), "{url}");
        }
        // HTTPS: left to hyper, which knows whether it speaks HTTP/2.
        assert!(
            Target::parse("https://api.example.com")
                .unwrap()
                .host_header()
                .is_none()
        );
        assert!(
            Target::parse("https://api.example.com:8443")
                .unwrap()
                .host_header()
                .is_none()
        );
    }

    #[test]
    fn only_http_and_https_upstreams_are_targets() {
        assert!(Target::parse("ftp://h/").is_err());
        assert!(Target::parse("not a url").is_err());
    }
}
