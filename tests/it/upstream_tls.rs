//! Forwarding to `https` upstreams: the certificate is checked against the
//! platform's roots (here a test CA given through `SSL_CERT_FILE`, which the
//! platform verifier reads on Linux), HTTP/2 is used when the upstream
//! offers it through ALPN, and the connect timeout also covers a TLS
//! handshake that never completes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::helpers::*;

/// A CA and a certificate for 127.0.0.1 it signed, made with `openssl`.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("leaf.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        openssl(
            d,
            &[
                &["req", "-x509"],
                &ec[..],
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=till test CA",
                ],
            ]
            .concat(),
        );
        openssl(
            d,
            &[
                &["req"],
                &ec[..],
                &[
                    "-keyout",
                    "leaf.key",
                    "-out",
                    "leaf.csr",
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            ]
            .concat(),
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "leaf.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "leaf.pem",
                "-days",
                "2",
                "-extfile",
                "leaf.ext",
            ],
        );
        Certs { dir }
    }
    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
    fn server_config(&self, alpn: &[&[u8]]) -> rustls::ServerConfig {
        let d = self.dir.path();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(d.join("leaf.pem"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(d.join("leaf.key")).unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        cfg
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the TLS upstream saw of one request.
#[derive(Clone, Debug)]
struct Got {
    version: http::Version,
    uri: String,
    authorization: Option<String>,
}

/// A TLS upstream answering a small JSON body, over HTTP/2 if `h2` (and
/// then offering only `h2` in ALPN), else HTTP/1.1.
async fn tls_upstream(certs: &Certs, h2: bool) -> (SocketAddr, Arc<Mutex<Vec<Got>>>) {
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(certs.server_config(alpn)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            seen.lock().unwrap().push(Got {
                                version: req.version(),
                                uri: req.uri().to_string(),
                                authorization: req
                                    .headers()
                                    .get("authorization")
                                    .map(|v| v.to_str().unwrap().to_string()),
                            });
                            let _ = req.into_body().collect().await;
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from_static(
                                        br#"{"id":"tls","object":"chat.completion","choices":[]}"#,
                                    )))
                                    .unwrap(),
                            )
                        }
                    });
                let io = TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    (addr, seen)
}

/// `till serve` with one `openai` upstream at `url`, trusting only the CA
/// in `ca` (`SSL_CERT_FILE`), with `extra` config lines.
fn proxy_trusting(home: &Home, url: &str, ca: &Path, extra: &str) -> Proxy {
    let config = home.write(
        "till.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\npolicies = {:?}\n{extra}\n[upstreams.openai]\nurl = {url:?}\ncredential = {{ env = \"TEST_OPENAI_KEY\" }}\n",
            home.path().to_str().unwrap(),
            policies_dir(),
        ),
    );
    let empty = home.path().join("no-cert-dir");
    std::fs::create_dir_all(&empty).unwrap();
    Proxy::spawn_env(
        home,
        &["serve", "--config", config.to_str().unwrap()],
        &config,
        &[
            ("SSL_CERT_FILE", ca.to_str().unwrap()),
            ("SSL_CERT_DIR", empty.to_str().unwrap()),
        ],
    )
    .expect("proxy starts")
}

#[tokio::test(flavor = "multi_thread")]
async fn https_upstreams_get_http2_when_they_offer_it_and_http1_otherwise() {
    let certs = Certs::new();
    for h2 in [true, false] {
        let (addr, seen) = tls_upstream(&certs, h2).await;
        let home = Home::new();
        let proxy = proxy_trusting(&home, &format!("https://{addr}"), &certs.ca(), "");
        let token = home.token("openai", None);
        let (status, body) = chat(&proxy, &token, "gpt-4o-mini").await;
        assert_eq!(status, 200, "h2 {h2}: {body} {}", proxy.logs());
        assert_eq!(body["id"], "tls");
        // A second request reuses the pooled connection.
        assert_eq!(chat(&proxy, &token, "gpt-4o-mini").await.0, 200);
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 2, "{got:?}");
        for g in got {
            let want = if h2 {
                http::Version::HTTP_2
            } else {
                http::Version::HTTP_11
            };
            assert_eq!(g.version, want, "h2 {h2}");
            assert!(g.uri.ends_with("/v1/chat/completions"), "{}", g.uri);
            assert_eq!(
                g.authorization.as_deref(),
                Some(format!("Bearer {OPENAI_SECRET}").as_str())
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_certificate_from_an_untrusted_ca_is_refused_before_any_request() {
    let certs = Certs::new();
    let other = Certs::new();
    let (addr, seen) = tls_upstream(&certs, false).await;
    let home = Home::new();
    // The proxy trusts another CA only: the upstream's certificate is not
    // one it can check, so nothing (and no credential) is sent.
    let proxy = proxy_trusting(&home, &format!("https://{addr}"), &other.ca(), "");
    let token = home.token("openai", None);
    let (status, body) = chat(&proxy, &token, "gpt-4o-mini").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_error", "{body}");
    assert_names_the_connection(&body);
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_handshake_that_never_completes_is_cut_by_the_connect_timeout() {
    let certs = Certs::new();
    // Accepts TCP connections and never answers the TLS ClientHello.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let held2 = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            held2.lock().unwrap().push(s);
        }
    });
    let home = Home::new();
    // The idle timeout is far longer: a 504 that names the connection (not
    // the wait for an answer) comes from the connect timeout.
    let proxy = proxy_trusting(
        &home,
        &format!("https://{addr}"),
        &certs.ca(),
        "[limits]\nconnect_timeout_secs = 1\nidle_timeout_secs = 50\n",
    );
    let token = home.token("openai", None);
    let (status, body) = chat(&proxy, &token, "gpt-4o-mini").await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "upstream_timeout", "{body}");
    assert_names_the_connection(&body);
    assert!(
        !held.lock().unwrap().is_empty(),
        "the TCP connect succeeded"
    );
}

/// Not TLS-specific, but the same client: an upstream that sends the head
/// and one event and then stays silent with the connection open has its
/// stream cut after the idle timeout, and the client gets what was sent.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_goes_silent_is_cut_after_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\nb\r\ndata: one\n\n\r\n")
            .await
            .unwrap();
        // Silent, connection open, until the test ends.
        let _ = released.await;
    });
    let home = Home::new();
    let up = Up {
        name: "openai",
        url: format!("http://{addr}"),
        header: "authorization",
        prefix: "Bearer ",
        env: "TEST_OPENAI_KEY",
    };
    let proxy = Proxy::start(&home, &[up], "[limits]\nidle_timeout_secs = 1\n");
    let token = home.token("openai", None);
    let mut resp = client()
        .post(proxy.url("/openai/v1/chat/completions"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o-mini","stream":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut got = Vec::new();
    // A guard against a hang far past the 1 s idle timeout, not a measure.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        // Ends with an error (the cut) or the end of the body.
        while let Ok(Some(c)) = resp.chunk().await {
            got.extend_from_slice(&c);
        }
    })
    .await;
    let _ = release.send(());
    assert!(ended.is_ok(), "the silent stream was not cut");
    assert_eq!(String::from_utf8_lossy(&got), "data: one\n\n");
    assert!(
        proxy.logs().contains("upstream stream ended with an error"),
        "{}",
        proxy.logs()
    );
}

/// The error answer says the connection to the upstream failed (not the
/// wait for its answer).
fn assert_names_the_connection(body: &serde_json::Value) {
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("cannot connect to the upstream"),
        "{body}"
    );
}
