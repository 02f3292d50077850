//! Connection-level limits (issue 9, "Connections and memory"): sockets that
//! never send a request head, HTTP/2 clients and idle keep-alive connections
//! must not hold the proxy's connection slots.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// The HTTP/2 connection preface a client with prior knowledge sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame, the frame that follows the preface.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 0x4, 0, 0, 0, 0, 0];

/// Under the default `header_timeout_secs` (10), so a close within it shows
/// that the configured 2 s is what cut the connection.
const CLOSE_DEADLINE: Duration = Duration::from_secs(8);

const TIGHT: &str = "[limits]\nmax_connections = 5\nheader_timeout_secs = 2\n";

/// Reads until the proxy closes `s` (EOF or reset) and returns what it sent;
/// `None` if it is still open at `deadline`.
async fn read_until_closed(s: &mut TcpStream, deadline: tokio::time::Instant) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Every socket in `socks` is closed by the proxy before the deadline;
/// returns what each one received.
async fn all_closed(socks: &mut [TcpStream]) -> Vec<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + CLOSE_DEADLINE;
    let mut out = Vec::new();
    for (i, s) in socks.iter_mut().enumerate() {
        let got = read_until_closed(s, deadline)
            .await
            .unwrap_or_else(|| panic!("socket {i} still open {CLOSE_DEADLINE:?} after connecting"));
        out.push(got);
    }
    out
}

/// A request on a fresh connection succeeds while the attacker's sockets
/// are still held open on its side.
async fn a_normal_request_succeeds(proxy: &Proxy, home: &Home) {
    let token = home.token("openai", None);
    let (status, body) = tokio::time::timeout(Duration::from_secs(20), chat(proxy, &token, "m"))
        .await
        .expect("a normal request is served once the idle sockets are closed");
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sockets_that_send_nothing_are_closed_after_the_header_timeout() {
    // Red team, issue 9: with max_connections = 5, five sockets that sent
    // nothing were never closed and the proxy served no one.
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], TIGHT);
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    for got in all_closed(&mut idle).await {
        let text = String::from_utf8_lossy(&got);
        assert!(got.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    a_normal_request_succeeds(&proxy, &home).await;
    drop(idle);
}

#[tokio::test(flavor = "multi_thread")]
async fn sockets_that_send_only_the_http2_preface_are_closed_and_free_their_slots() {
    // Red team, issue 9: the HTTP/2 preface (alone, or with a SETTINGS
    // frame) and then silence held a connection slot forever.
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], TIGHT);
    let mut socks = Vec::new();
    for i in 0..5 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(H2_PREFACE).await.unwrap();
        if i % 2 == 1 {
            s.write_all(H2_SETTINGS).await.unwrap();
        }
        socks.push(s);
    }
    for got in all_closed(&mut socks).await {
        assert!(
            got.windows(b"HTTP/1.1 only".len())
                .any(|w| w == b"HTTP/1.1 only"),
            "refused with a GOAWAY that says why, got {got:?}"
        );
    }
    // The sockets stay open on the attacker's side; their slots come back
    // within the header timeout anyway.
    a_normal_request_succeeds(&proxy, &home).await;
    assert_eq!(up.count(), 1, "only the normal request was forwarded");
    drop(socks);
}

/// The error and its sources, as one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_prior_knowledge_is_refused_with_http_1_1_required() {
    // HTTP/2 got none of the HTTP/1 limits (header timeout, idle timeout)
    // and multiplexes requests past the connection cap; Till serves HTTP/1.1
    // only, and tells an h2c client so.
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(&home, &[openai(&up)], TIGHT);
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("the client side of the handshake only writes");
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/openai/v1/models", proxy.addr))
        .header(
            "authorization",
            format!("Bearer {}", home.token("openai", None)),
        )
        .body(Empty::<Bytes>::new())
        .unwrap();
    let sent = tokio::time::timeout(CLOSE_DEADLINE, sender.send_request(req))
        .await
        .expect("the proxy answers an h2c client promptly");
    let err = match sent {
        Ok(r) => panic!("h2c request served: {}", r.status()),
        Err(e) => chain(&e),
    };
    let conn_err = match tokio::time::timeout(CLOSE_DEADLINE, conn)
        .await
        .expect("the proxy ends the h2c connection")
        .unwrap()
    {
        Ok(()) => String::new(),
        Err(e) => chain(&e),
    };
    assert!(
        err.contains("requires HTTP/1.1") || conn_err.contains("requires HTTP/1.1"),
        "the client is told HTTP/1.1 is required; request: {err}; connection: {conn_err}"
    );
    assert!(
        format!("{err} {conn_err}").contains("till serves HTTP/1.1 only"),
        "{err}; {conn_err}"
    );
    assert_eq!(up.count(), 0, "nothing forwarded over HTTP/2");
    assert!(
        proxy.logs().contains("till serves HTTP/1.1 only"),
        "the refusal is logged"
    );
    a_normal_request_succeeds(&proxy, &home).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout_and_frees_its_slot() {
    // A kept-alive connection that sends no next request must start one
    // within header_timeout_secs too, or it would hold its slot forever.
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(
        &home,
        &[openai(&up)],
        "[limits]\nmax_connections = 1\nheader_timeout_secs = 2\n",
    );
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let mut conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/healthz", proxy.addr))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = sender.send_request(req).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("connection").is_none_or(|v| v != "close"),
        "the proxy keeps the connection alive"
    );
    r.into_body().collect().await.unwrap();
    sender.ready().await.expect("kept alive after the response");
    // The only slot is held by the idle connection: a second client waits
    // in the backlog until the proxy closes it.
    let url = proxy.url("/healthz");
    let second = tokio::spawn(async move { client().get(url).send().await });
    tokio::time::timeout(CLOSE_DEADLINE, &mut conn)
        .await
        .expect("the proxy closes an idle keep-alive connection")
        .unwrap()
        .ok();
    assert!(sender.is_closed());
    let r = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .expect("the waiting client is served once the idle connection is closed")
        .unwrap()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn on_sigterm_an_in_flight_stream_finishes_and_idle_sockets_do_not_hold_the_exit() {
    // Shutdown tells every open connection to finish: a streaming response
    // in flight completes, while an idle socket is closed at once rather
    // than holding the exit until the grace period (30 s here) runs out.
    use futures_util::StreamExt;
    let up = Upstream::start().await;
    let home = Home::new();
    let proxy = Proxy::start(
        &home,
        &[openai(&up)],
        "[limits]\nheader_timeout_secs = 30\nshutdown_grace_secs = 30\n",
    );
    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    let r = client()
        .post(proxy.url("/openai/v1/chat/completions"))
        .bearer_auth(home.token("openai", None))
        .header("content-type", "application/json")
        .body(r#"{"model":"m","stream":true,"gated":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("first chunk")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("one"));
    let pid = proxy.pid().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    assert!(
        read_until_closed(&mut idle, deadline).await.is_some(),
        "an idle socket is closed on shutdown, not kept for the grace period"
    );
    up.state.gate.notify_one();
    let mut rest = Vec::new();
    while let Some(c) = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream finishes after SIGTERM")
    {
        rest.extend_from_slice(&c.expect("the stream is not cut"));
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("two") && rest.contains("[DONE]"), "{rest}");
    let mut proxy = proxy;
    let code = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || proxy.terminate()),
    )
    .await
    .expect("the proxy exits once its connections are done, before the grace period")
    .unwrap();
    assert_eq!(code, 0, "clean exit");
}
