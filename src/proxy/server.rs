//! The accept loop: connection cap, header limits and timeouts, graceful
//! shutdown.
//!
//! We drive hyper directly instead of `axum::serve` because a proxy facing
//! possibly compromised agents needs knobs `axum::serve` does not expose: a
//! header read timeout (slowloris), bounded header sizes and counts (431), and
//! a cap on concurrent connections (extra ones wait in the kernel backlog
//! instead of costing us memory).
//!
//! Only HTTP/1.1 is served. Till listens on plain HTTP, where HTTP/2 exists
//! only as h2c with prior knowledge, which the agent SDKs do not speak; and
//! one HTTP/2 connection multiplexes many requests past the connection cap,
//! with its own idle, header and stream limits to get right. hyper-util's
//! protocol-sniffing `auto::Builder` also read the first bytes with no
//! timeout at all, so sockets that sent nothing (or only the HTTP/2 preface)
//! held a connection slot forever. hyper's HTTP/1 connection arms the header
//! timeout from its first poll, before any byte arrives, and again whenever a
//! kept-alive connection goes idle.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use futures_util::FutureExt;
use futures_util::future::Either;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// Limits of the HTTP layer.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    pub max_connections: usize,
    /// Time a client gets to send a complete request head, counted from the
    /// accept and, on a kept-alive connection, from the end of the previous
    /// response; also the longest a connection may sit idle.
    pub header_timeout: Duration,
    /// Largest request head (request line + headers), in bytes.
    pub max_header_bytes: usize,
    /// Most header lines in a request.
    pub max_headers: usize,
    /// Time in-flight requests and streams get on shutdown.
    pub grace: Duration,
}

/// The address the client connected to (this proxy's side of the
/// connection), in the extensions of every request the router handles,
/// next to `ConnectInfo`: the admin plane checks the `Host` header against
/// it.
#[derive(Clone, Copy, Debug)]
pub struct LocalAddr(pub SocketAddr);

/// The header count hyper refuses above (with 431) when given no limit.
const HYPER_MAX_HEADERS: usize = 100;

/// Period of the timer [`serve`] keeps pending while it runs: shorter than
/// any per-request timer (the header timeout is at least 1 s, the upstream
/// idle timeout longer still).
///
/// Why: tokio writes to its I/O driver's eventfd, waking the worker parked
/// in `epoll_wait`, whenever a new timer is due before the driver's next
/// planned wake-up, or when none is planned. Without this, that was hyper's
/// header timeout armed for almost every request on a busy keep-alive
/// connection: 0.1 extra system calls and a worker wake-up per request
/// (`perf record -e syscalls:sys_enter_write`, benches/README.md). With a
/// timer always due sooner, a per-request timer never moves the driver's
/// wake-up, at the cost of two wake-ups a second.
const TIMER_ANCHOR: Duration = Duration::from_millis(500);

/// Which requests a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plane {
    /// Everything: agents' requests and the admin plane (no `admin_listen`).
    All,
    /// Agents' requests, forward-auth and the public endpoints (health,
    /// revocation feed, key set), not the admin plane: the listener a
    /// reverse proxy may forward everything to.
    Agents,
    /// The admin plane (admin API, dashboard, `/metrics`) and the health
    /// checks, nothing proxied (`admin_listen`).
    Admin,
}

impl Plane {
    /// Whether a request to `path` is served on this listener.
    fn serves(self, path: &str) -> bool {
        match self {
            Plane::All => true,
            Plane::Agents => !is_admin_plane(path),
            Plane::Admin => is_admin_plane(path) || path == "/healthz" || path == "/readyz",
        }
    }

    /// The 404 for a request this listener does not serve.
    fn refusal(self) -> axum::response::Response {
        use axum::response::IntoResponse;
        let message = match self {
            Plane::Admin => {
                "this is the admin listener (admin_listen): it serves the admin API, the dashboard, /metrics and the health checks; send proxied requests to the proxy's listen address"
            }
            _ => {
                "the admin API, the dashboard and /metrics are served on the admin listener (admin_listen in till.toml), not on this address"
            }
        };
        (
            axum::http::StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({"error": {"message": message, "type": "not_found_error", "code": "not_found"}})),
        )
            .into_response()
    }
}

/// Whether `path` belongs to the admin plane: `/metrics`, and everything
/// under `/admin` and `/dashboard`.
pub(crate) fn is_admin_plane(path: &str) -> bool {
    if path == "/metrics" {
        return true;
    }
    let first = path
        .strip_prefix('/')
        .map(|p| p.split('/').next().unwrap_or(p))
        .unwrap_or("");
    first == "admin" || first == "dashboard"
}

/// Connections the admin listener holds at once: its own budget, so a
/// flood of agents' connections cannot lock the operator out.
pub const ADMIN_CONNECTIONS: usize = 64;

/// Serves [`super::router`] of `state` on every listener, each for its
/// [`Plane`], until `shutdown` resolves, then stops accepting, gives open
/// connections `grace` to finish, and returns. Requests that can only reach
/// the router's proxy fallback ([`super::skips_router`]) go to
/// [`super::handler::proxy`] directly.
pub async fn serve(
    listeners: Vec<(TcpListener, Plane)>,
    state: super::AppState,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    // hyper enforces its own limit of 100 when none is set, parsing into
    // arrays on the stack; a limit set explicitly, even to 100, makes it
    // fill two 100-entry buffers per request (≈1 500 instructions, callgrind).
    if limits.max_headers != HYPER_MAX_HEADERS {
        builder.max_headers(limits.max_headers);
    }
    let builder = Arc::new(builder);
    let _anchor = AbortOnDrop(tokio::spawn(async {
        let mut tick = tokio::time::interval(TIMER_ANCHOR);
        // After a stall, one tick, not a burst of the missed ones.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
        }
    }));
    let app = super::router(state.clone());
    // Every connection task holds a receiver; `closed()` on the sender tells
    // when the last one has finished.
    let (stop_tx, stop_rx) = watch::channel(());
    let (shut_tx, shut_rx) = watch::channel(false);
    let _shutdown = AbortOnDrop(tokio::spawn(async move {
        shutdown.await;
        let _ = shut_tx.send(true);
    }));
    let agents = Arc::new(Semaphore::new(limits.max_connections));
    let admin = Arc::new(Semaphore::new(ADMIN_CONNECTIONS));
    let loops = listeners.into_iter().map(|(listener, plane)| {
        let permits = if plane == Plane::Admin {
            admin.clone()
        } else {
            agents.clone()
        };
        let conn = Connections {
            plane,
            app: app.clone(),
            state: state.clone(),
            builder: builder.clone(),
            stop: stop_rx.clone(),
            header_timeout: limits.header_timeout,
        };
        accept_loop(listener, permits, conn, shut_rx.clone())
    });
    futures_util::future::join_all(loops).await;
    drop(stop_rx);
    let _ = stop_tx.send(());
    tokio::select! {
        _ = stop_tx.closed() => {}
        _ = tokio::time::sleep(limits.grace) => {
            tracing::warn!(grace_secs = limits.grace.as_secs(), "grace period over; closing remaining connections");
        }
    }
    Ok(())
}

/// What every connection of one listener shares.
#[derive(Clone)]
struct Connections {
    plane: Plane,
    app: axum::Router,
    state: super::AppState,
    builder: Arc<http1::Builder>,
    stop: watch::Receiver<()>,
    header_timeout: Duration,
}

/// Accepts on `listener` until `shut` turns true, a connection per free
/// permit.
async fn accept_loop(
    listener: TcpListener,
    permits: Arc<Semaphore>,
    conn: Connections,
    mut shut: watch::Receiver<bool>,
) {
    loop {
        // Wait for a free slot first: over the cap, connections queue in the
        // kernel's backlog rather than in our memory.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shut.wait_for(|s| *s) => break,
        };
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shut.wait_for(|s| *s) => break,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, peer, conn.clone(), permit));
    }
}

/// Serves one connection until it ends or the server stops.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    conn: Connections,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let local = stream.local_addr().ok().map(LocalAddr);
    let Connections {
        plane,
        app,
        state,
        builder,
        mut stop,
        header_timeout,
    } = conn;
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        if !plane.serves(req.uri().path()) {
            return Either::Right(Either::Left(std::future::ready(Ok(plane.refusal()))));
        }
        if super::skips_router(req.uri().path()) {
            // The proxy path reads the peer from here, not from
            // the extensions the router's handlers need.
            Either::Left(super::handler::proxy_from(state.clone(), req, Some(peer)).map(Ok))
        } else {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            if let Some(l) = local {
                req.extensions_mut().insert(l);
            }
            let mut app = app.clone();
            Either::Right(Either::Right(tower_service::Service::call(&mut app, req)))
        }
    });
    // hyper gets the stream borrowed so that an HTTP/2 client can
    // still be told why it is refused once hyper has given up on it.
    let result = {
        let conn = builder.serve_connection(TokioIo::new(&mut stream), svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = stop.changed() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    };
    match result {
        Ok(()) => {}
        Err(e) if e.is_parse_version_h2() => {
            tracing::debug!(%peer, "refused an HTTP/2 (h2c) connection: till serves HTTP/1.1 only");
            refuse_h2(&mut stream, header_timeout).await;
        }
        Err(e) => tracing::debug!(error = %e, %peer, "connection ended with an error"),
    }
    drop(stop);
    drop(permit);
}

/// Stops a background task when its owner returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Debug data of the GOAWAY an HTTP/2 client gets; h2 clients show it in
/// their error.
const H2_REFUSAL: &[u8] = b"till serves HTTP/1.1 only; send requests over HTTP/1.1";

/// The frames an HTTP/2 client gets instead of a connection: the server
/// preface (an empty SETTINGS frame), which a client expects before anything
/// else, then GOAWAY with `HTTP_1_1_REQUIRED` and no stream processed, so
/// the client reports "endpoint requires HTTP/1.1" (and may safely retry
/// over HTTP/1.1) instead of a bare connection reset.
fn h2_refusal_frames() -> Vec<u8> {
    // Frame header: 24-bit length, type, flags, 31-bit stream id.
    let mut f = vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0];
    let len = u32::try_from(8 + H2_REFUSAL.len()).unwrap_or(8);
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&0u32.to_be_bytes());
    f.extend_from_slice(&0xdu32.to_be_bytes());
    f.extend_from_slice(H2_REFUSAL);
    f
}

/// Tells an HTTP/2 client it is refused, within `budget` in all, so a client
/// that stays silent holds its slot no longer than any other idle socket.
async fn refuse_h2(stream: &mut TcpStream, budget: Duration) {
    let _ = tokio::time::timeout(budget, async {
        stream.write_all(&h2_refusal_frames()).await?;
        stream.shutdown().await?;
        // Closing with unread bytes makes the kernel answer RST, which can
        // overtake the GOAWAY; read what the client still sends (bounded)
        // until it closes.
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            let n = stream.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_h2_refusal_is_settings_then_goaway_http_1_1_required() {
        let f = h2_refusal_frames();
        assert_eq!(&f[..9], &[0, 0, 0, 4, 0, 0, 0, 0, 0], "empty SETTINGS");
        let g = &f[9..];
        let len = u32::from_be_bytes([0, g[0], g[1], g[2]]) as usize;
        assert_eq!(len, g.len() - 9, "GOAWAY length covers its payload");
        assert_eq!(g[3], 0x7, "GOAWAY type");
        assert_eq!(&g[5..9], &[0, 0, 0, 0], "connection-level frame");
        assert_eq!(&g[9..13], &[0, 0, 0, 0], "no stream was processed");
        assert_eq!(&g[13..17], &[0, 0, 0, 0xd], "HTTP_1_1_REQUIRED");
        assert_eq!(&g[17..], H2_REFUSAL);
    }
}
