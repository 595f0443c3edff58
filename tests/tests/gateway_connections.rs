//! The gateway's device connections over real TLS sockets on loopback: a device's new
//! HTTP/2 connection closes its older ones and no other device's, but only once a
//! request on it is identified as the device; HTTP/1.1 connections are capped per
//! device; a peer that stops answering pings is closed, and one that answers is kept.
//! The clients are raw TLS sockets speaking just enough HTTP/2 to see what the server
//! does with the connection. The route stands in for the device API: it claims the
//! connection as `Fleet::identify` does after checking the certificate's name and key
//! (that check is tested with the fleet, `tests/fleet_e2e.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefleet_e2e::local_fleet::Ca;
use edgefleet_e2e::wait::eventually;
use edgefleet_operator::gateway::unidentified::UnidentifiedLimits;
use edgefleet_operator::gateway::{self, ConnectionOptions, DeviceConnections};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::client::TlsStream;

struct Server {
    addr: std::net::SocketAddr,
    gateway_ca: String,
    device_ca: Ca,
    connections: Arc<DeviceConnections>,
    _task: tokio::task::JoinHandle<()>,
}

/// Supersession alone: no pings, so the raw clients' silence closes nothing.
const NO_KEEPALIVE: ConnectionOptions = ConnectionOptions {
    keepalive_idle: None,
    keepalive_timeout: Duration::from_secs(20),
    unidentified: UnidentifiedLimits {
        cap: 4096,
        lifetime: Duration::from_secs(60),
        header_read_timeout: gateway::unidentified::HEADER_READ_TIMEOUT,
    },
};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

async fn server(options: ConnectionOptions) -> Server {
    let gateway_ca = Ca::new("gateway CA").unwrap();
    let device_ca = Ca::new("device CA").unwrap();
    let (cert, key) = gateway_ca.issue(vec!["127.0.0.1".into()]).unwrap();
    let tls = gateway::server_tls(
        vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        &[CertificateDer::from_pem_slice(device_ca.pem.as_bytes()).unwrap()],
    )
    .unwrap();
    let router = axum::Router::new().route(
        "/v1/devices/{name}/desired",
        axum::routing::get(
            |axum::extract::Path(name): axum::extract::Path<String>,
             axum::Extension(peer): axum::Extension<gateway::devices::PeerCertificate>| async move {
                if let Some(slot) = &peer.1 {
                    slot.claim(&name);
                }
                "{}"
            },
        ),
    );
    let listener = gateway::listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(DeviceConnections::default());
    let task = tokio::spawn({
        let connections = connections.clone();
        async move {
            gateway::serve_with(listener, Arc::new(tls), router, options, connections)
                .await
                .unwrap();
        }
    });
    Server {
        addr,
        gateway_ca: gateway_ca.pem,
        device_ca,
        connections,
        _task: task,
    }
}

/// A client certificate for `device` from `ca`, as the attestation service issues it.
fn device_identity(ca: &Ca, device: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        format!("edgefleet://device/{device}").try_into().unwrap(),
    )];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p
        .signed_by(&key, &rcgen::Issuer::from_params(&ca.params, &ca.key))
        .unwrap();
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

/// A raw client connection, with what it has read of the server's HTTP/2 frames.
struct Raw {
    tls: TlsStream<tokio::net::TcpStream>,
    pending: Vec<u8>,
}

/// A TLS connection as `device` (None: anonymous) offering only `alpn`, with the HTTP/2
/// client preface and an empty SETTINGS frame already sent for `h2`.
async fn connect(s: &Server, device: Option<&str>, alpn: &[u8]) -> Raw {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(s.gateway_ca.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match device {
        Some(d) => {
            let (cert, key) = device_identity(&s.device_ca, d);
            builder.with_client_auth_cert(vec![cert], key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
    if alpn == b"h2" {
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        tls.write_all(&frame(0, 4, 0, &[])).await.unwrap();
        tls.flush().await.unwrap();
    }
    Raw {
        tls,
        pending: Vec::new(),
    }
}

/// An HTTP/2 frame.
fn frame(stream: u32, kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

impl Raw {
    fn http2(&self) -> bool {
        self.tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice())
    }

    /// `device`'s desired-state request: an HTTP/2 HEADERS frame on stream 1 (HPACK:
    /// static-table `:method GET` and `:scheme https`, literal `:path` and
    /// `:authority`), or an HTTP/1.1 request.
    async fn request_as(&mut self, device: &str) {
        let path = format!("/v1/devices/{device}/desired");
        if self.http2() {
            let mut block = vec![0x82, 0x87];
            for (index, value) in [(0x04u8, path.as_str()), (0x01, "127.0.0.1")] {
                block.push(index);
                block.push(u8::try_from(value.len()).unwrap());
                block.extend_from_slice(value.as_bytes());
            }
            // END_STREAM | END_HEADERS
            self.tls.write_all(&frame(1, 1, 0x5, &block)).await.unwrap();
        } else {
            let req = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
            self.tls.write_all(req.as_bytes()).await.unwrap();
        }
        self.tls.flush().await.unwrap();
    }

    /// Reads what the server sends for up to `wait`, acknowledging its SETTINGS and
    /// PINGs as an HTTP/2 client does when `answer`: whether the server closed the
    /// connection within it, and the PINGs answered.
    async fn watch(&mut self, wait: Duration, answer: bool) -> (bool, u32) {
        let end = Instant::now() + wait;
        let mut buf = [0u8; 4096];
        let mut pings = 0;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let n = match tokio::time::timeout(left, self.tls.read(&mut buf)).await {
                Err(_) => return (false, pings),
                Ok(Ok(0) | Err(_)) => return (true, pings),
                Ok(Ok(n)) => n,
            };
            if !(answer && self.http2()) {
                continue;
            }
            self.pending.extend_from_slice(&buf[..n]);
            while self.pending.len() >= 9 {
                let p = &self.pending;
                let len = usize::from(p[0]) << 16 | usize::from(p[1]) << 8 | usize::from(p[2]);
                if p.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (p[3], p[4]);
                let payload = p[9..9 + len].to_vec();
                self.pending.drain(..9 + len);
                if kind == 4 && flags & 1 == 0 {
                    let _ = self.tls.write_all(&frame(0, 4, 1, &[])).await;
                }
                if kind == 6 && flags & 1 == 0 {
                    pings += 1;
                    let _ = self.tls.write_all(&frame(0, 6, 1, &payload)).await;
                }
            }
            let _ = self.tls.flush().await;
        }
    }

    /// Whether the server closes the connection within `wait`, the client behaving.
    async fn closed_within(&mut self, wait: Duration) -> bool {
        self.watch(wait, true).await.0
    }
}

#[tokio::test]
async fn a_devices_new_http2_connection_closes_its_old_one_and_no_other() {
    let s = server(NO_KEEPALIVE).await;
    let mut a1 = connect(&s, Some("till-a"), b"h2").await;
    a1.request_as("till-a").await;
    let mut b1 = connect(&s, Some("till-b"), b"h2").await;
    b1.request_as("till-b").await;
    let mut anonymous = connect(&s, None, b"h2").await;
    // Before anything supersedes it, a1 is held open; a connection of till-a's that
    // makes no request (a client racing two handshakes drops one unused) claims
    // nothing and closes nothing.
    assert!(!a1.closed_within(Duration::from_millis(500)).await);
    let mut unused = connect(&s, Some("till-a"), b"h2").await;
    assert!(!a1.closed_within(Duration::from_millis(500)).await);
    assert!(!unused.closed_within(Duration::from_millis(100)).await);
    assert_eq!(s.connections.superseded(), 0);
    let mut a2 = connect(&s, Some("till-a"), b"h2").await;
    a2.request_as("till-a").await;
    assert!(
        a1.closed_within(Duration::from_secs(5)).await,
        "till-a's old connection is closed when its new one arrives"
    );
    assert!(
        !a2.closed_within(Duration::from_secs(1)).await,
        "the new one stays"
    );
    assert!(
        !b1.closed_within(Duration::from_millis(200)).await,
        "another device's stays"
    );
    assert!(
        !anonymous.closed_within(Duration::from_millis(200)).await,
        "an anonymous connection is not a device's"
    );
    assert_eq!(s.connections.superseded(), 1);
    assert_eq!(s.connections.held_by("till-a"), 1);
    assert_eq!(s.connections.held_by("till-b"), 1);
    // A connection that ends is forgotten.
    drop(b1);
    eventually(
        "till-b's closed connection to be forgotten",
        Duration::from_secs(5),
        || async { (s.connections.held_by("till-b") == 0).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_device_holds_at_most_four_http1_connections() {
    let s = server(NO_KEEPALIVE).await;
    let mut held = Vec::new();
    for _ in 0..gateway::connections::MAX_HTTP1_PER_DEVICE {
        let mut c = connect(&s, Some("till-a"), b"http/1.1").await;
        c.request_as("till-a").await;
        held.push(c);
    }
    let mut other = connect(&s, Some("till-b"), b"http/1.1").await;
    other.request_as("till-b").await;
    for c in &mut held {
        assert!(
            !c.closed_within(Duration::from_millis(100)).await,
            "up to the cap, all stay"
        );
    }
    let mut fifth = connect(&s, Some("till-a"), b"http/1.1").await;
    fifth.request_as("till-a").await;
    assert!(
        held[0].closed_within(Duration::from_secs(5)).await,
        "the oldest is closed"
    );
    for c in &mut held[1..] {
        assert!(!c.closed_within(Duration::from_millis(100)).await);
    }
    assert!(!fifth.closed_within(Duration::from_millis(100)).await);
    assert!(!other.closed_within(Duration::from_millis(100)).await);
    assert_eq!(s.connections.superseded(), 1);
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_closed_and_one_that_answers_is_kept() {
    let s = server(ConnectionOptions {
        keepalive_idle: Some(Duration::from_secs(1)),
        keepalive_timeout: Duration::from_secs(1),
        ..NO_KEEPALIVE
    })
    .await;
    let mut silent = connect(&s, Some("till-a"), b"h2").await;
    let mut answering = connect(&s, Some("till-b"), b"h2").await;
    let answered = tokio::spawn(async move { answering.watch(Duration::from_secs(6), true).await });
    let started = Instant::now();
    assert!(
        silent.watch(Duration::from_secs(8), false).await.0,
        "a peer that never answers is closed"
    );
    // About idle + timeout (2 s); well before TCP would give up.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let (closed, pings) = answered.await.unwrap();
    assert!(!closed, "the answering peer was closed after {pings} pings");
    assert!(
        pings >= 2,
        "the gateway pinged the quiet peer ({pings} pings)"
    );
}

/// `options` with these limits on unidentified connections.
fn limited(cap: usize, lifetime: Duration) -> ConnectionOptions {
    ConnectionOptions {
        unidentified: UnidentifiedLimits {
            cap,
            lifetime,
            ..NO_KEEPALIVE.unidentified
        },
        ..NO_KEEPALIVE
    }
}

/// An HTTP/1.1 response's status line, read within `wait`.
async fn http1_status(raw: &mut Raw, wait: Duration) -> Option<String> {
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(wait, raw.tls.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .map(str::to_owned)
}

#[tokio::test]
async fn http1_headers_that_drip_are_cut_off() {
    let header_timeout = Duration::from_secs(3);
    let mut options = limited(2048, Duration::from_secs(600));
    options.unidentified.header_read_timeout = header_timeout;
    let s = server(options).await;
    let mut drip = connect(&s, None, b"http/1.1").await;
    drip.tls
        .write_all(b"GET /v1/devices/x/desired HTTP/1.1\r\nhost: 12")
        .await
        .unwrap();
    drip.tls.flush().await.unwrap();
    let started = Instant::now();
    assert!(
        drip.closed_within(header_timeout + Duration::from_secs(5))
            .await,
        "a client that never finishes its headers is cut off"
    );
    assert!(started.elapsed() >= header_timeout - Duration::from_secs(1));
    // A client that sends its request in time is answered on the same kind of
    // connection.
    let mut prompt = connect(&s, None, b"http/1.1").await;
    prompt
        .tls
        .write_all(b"GET /v1/devices/x/desired HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        http1_status(&mut prompt, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("HTTP/1.1 200 OK")
    );
    // The default leaves a keep-alive connection idle between a device's requests
    // (heartbeats up to 30 s) alone.
    assert!(gateway::unidentified::HEADER_READ_TIMEOUT >= Duration::from_secs(60));
}

#[tokio::test]
async fn an_unidentified_connection_ends_at_its_lifetime_and_a_devices_stays() {
    let s = server(limited(2048, Duration::from_secs(2))).await;
    let mut anonymous = connect(&s, None, b"h2").await;
    let mut device = connect(&s, Some("till-a"), b"h2").await;
    device.request_as("till-a").await;
    // A device's connection with a certificate but no request yet is not identified.
    let mut unclaimed = connect(&s, Some("till-b"), b"h2").await;
    assert!(anonymous.closed_within(Duration::from_secs(6)).await);
    assert!(unclaimed.closed_within(Duration::from_secs(1)).await);
    assert!(
        !device.closed_within(Duration::from_secs(3)).await,
        "an identified device's connection has no lifetime"
    );
}

#[tokio::test]
async fn a_flood_of_junk_connections_evicts_itself_and_keeps_no_device_out() {
    let cap = 32;
    let s = server(limited(cap, Duration::from_secs(600))).await;
    let mut device = connect(&s, Some("till-a"), b"h2").await;
    device.request_as("till-a").await;
    assert!(!device.closed_within(Duration::from_millis(300)).await);
    // 100 connections that never start TLS, held open.
    let mut junk = Vec::new();
    for _ in 0..100 {
        junk.push(tokio::net::TcpStream::connect(s.addr).await.unwrap());
    }
    let evictions = s.connections.evictions();
    eventually(
        "the oldest junk evicted down to the cap",
        Duration::from_secs(10),
        || async { (evictions.get() == 100 - cap as u64).then_some(()) },
    )
    .await;
    // The first junk connections are the ones closed.
    let mut buf = [0u8; 16];
    let first = tokio::time::timeout(Duration::from_secs(2), junk[0].read(&mut buf)).await;
    assert!(matches!(first, Ok(Ok(0) | Err(_))), "{first:?}");
    let last = tokio::time::timeout(Duration::from_millis(300), junk[99].read(&mut buf)).await;
    assert!(last.is_err(), "the newest junk is still held: {last:?}");
    // A fresh client gets through at once, and the identified device was never evicted.
    let started = Instant::now();
    let mut fresh = connect(&s, None, b"http/1.1").await;
    fresh
        .tls
        .write_all(b"GET /v1/devices/new/desired HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        http1_status(&mut fresh, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("HTTP/1.1 200 OK")
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!device.closed_within(Duration::from_millis(300)).await);
    assert_eq!(s.connections.held_by("till-a"), 1);
}
