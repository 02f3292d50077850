//! The accept loop: connection cap, header limits and timeouts, graceful
//! shutdown.
//!
//! We drive hyper directly instead of `axum::serve` because a proxy facing
//! possibly compromised agents needs knobs `axum::serve` does not expose: a
//! header read timeout (slowloris), bounded header sizes and counts (431), and
//! a cap on concurrent connections (extra ones wait in the kernel backlog
//! instead of costing us memory).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Limits of the HTTP layer.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    pub max_connections: usize,
    /// Time a client gets to send a complete request head.
    pub header_timeout: Duration,
    /// Largest request head (request line + headers), in bytes.
    pub max_header_bytes: usize,
    /// Most header lines in a request.
    pub max_headers: usize,
    /// Time in-flight requests and streams get on shutdown.
    pub grace: Duration,
}

/// The address the client connected to (this proxy's side of the
/// connection), in every request's extensions next to `ConnectInfo`: the
/// admin plane checks the `Host` header against it.
#[derive(Clone, Copy, Debug)]
pub struct LocalAddr(pub SocketAddr);

/// Serves `app` until `shutdown` resolves, then stops accepting, gives
/// open connections `grace` to finish, and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        // Wait for a free slot first: over the cap, connections queue in the
        // kernel's backlog rather than in our memory.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
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
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok().map(LocalAddr);
        let app = app.clone();
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            if let Some(l) = local {
                req.extensions_mut().insert(l);
            }
            let mut app = app.clone();
            async move { tower_service::Service::call(&mut app, req.map(axum::body::Body::new)).await }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.grace) => {
            tracing::warn!(grace_secs = limits.grace.as_secs(), "grace period over; closing remaining connections");
        }
    }
    Ok(())
}
