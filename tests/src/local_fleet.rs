//! The processes and files of a whole fleet on one machine, for the end-to-end tests,
//! the benchmarks and `edgefleet-dev demo`: the workspace's built binaries, the gateway
//! PKI, the operator process with its gateway, agent processes (optionally in a network
//! namespace, [`crate::netns`]), the enrolment token of each pool (an
//! `EdgeBootstrapToken` giving its devices `edgefleet.io/pool=<pool>`), the
//! content-addressed artifact store, an HTTPS file server, and a publisher's signing key
//! made with `openssl`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::HarnessError;

fn err(what: impl std::fmt::Display) -> HarnessError {
    HarnessError::Setup(what.to_string())
}

/// The shared lab token the local operator is started with (`--bootstrap-token-file`).
/// Local agents enrol with their pool's token instead ([`pool_token`]).
pub const BOOTSTRAP_TOKEN: &str = "fleet-bootstrap-token-0123456789";

/// The label key a pool's token gives its devices (EdgeModel selectors match it).
pub const POOL_LABEL: &str = "edgefleet.io/pool";

/// The enrolment token of `pool` in local fleets, `<id>.<secret>`: derived from the
/// pool's name, so that every agent of the pool (and a restarted one) knows it without
/// being told. For local fleets only: anyone who knows the pool's name knows it.
pub fn pool_token(pool: &str) -> String {
    let digest = edgefleet_trust::attestation::identity::sha256_digest(
        format!("edgefleet local fleet pool {pool}").as_bytes(),
    );
    let hex = digest.trim_start_matches("sha256:");
    format!("{}.{}", &hex[..6], &hex[6..22])
}

/// Creates `pool`'s `EdgeBootstrapToken` ([`pool_token`]; a million usages, any device
/// name, a day long, giving `edgefleet.io/pool=<pool>`) unless it exists; returns the
/// token.
pub async fn create_pool_token(client: &kube::Client, pool: &str) -> Result<String, HarnessError> {
    use edgefleet_crds::{EdgeBootstrapToken, EdgeBootstrapTokenSpec};
    let token = pool_token(pool);
    let (id, secret) = token.split_once('.').ok_or_else(|| err("pool token"))?;
    let expires = k8s_openapi::jiff::Timestamp::now()
        .checked_add(std::time::Duration::from_secs(86_400))
        .map_err(err)?;
    let object = EdgeBootstrapToken::new(
        id,
        EdgeBootstrapTokenSpec {
            secret_hash: edgefleet_trust::attestation::identity::sha256_digest(secret.as_bytes()),
            expiration_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(expires),
            usage_limit: 1_000_000,
            device_name_pattern: "*".into(),
            device_labels: [(POOL_LABEL.to_owned(), pool.to_owned())].into(),
            description: Some(format!("local fleet pool {pool}")),
        },
    );
    let api: kube::Api<EdgeBootstrapToken> = kube::Api::all(client.clone());
    match api.create(&Default::default(), &object).await {
        Ok(_) => Ok(token),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(token),
        Err(e) => Err(err(format!("creating the token of pool {pool}: {e}"))),
    }
}

/// A built binary of the workspace: in `EDGEFLEET_BIN_DIR` when set (benchmarks point it
/// at release builds), else beside the running executable (`target/debug`), or one
/// directory up (test executables live in `target/debug/deps`).
pub fn binary(name: &str) -> Result<PathBuf, HarnessError> {
    if let Some(dir) = std::env::var_os("EDGEFLEET_BIN_DIR") {
        let p = PathBuf::from(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    let exe = std::env::current_exe().map_err(err)?;
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let candidate = d.join(name);
        if candidate.exists() {
            return Ok(candidate);
        }
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
        dir = d.parent();
    }
    Err(err(format!(
        "{name} is not built (cargo build --workspace --bins)"
    )))
}

/// A self-signed CA.
#[derive(Debug)]
pub struct Ca {
    /// Certificate, PEM.
    pub pem: String,
    /// Key.
    pub key: rcgen::KeyPair,
    /// Parameters, to issue with.
    pub params: rcgen::CertificateParams,
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<Self, HarnessError> {
        let key = rcgen::KeyPair::generate().map_err(err)?;
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        Ok(Self {
            pem: p.self_signed(&key).map_err(err)?.pem(),
            key,
            params: p,
        })
    }

    /// Issues a certificate for `names` (DNS names or IP addresses) with a fresh key:
    /// (certificate PEM, key PEM).
    pub fn issue(&self, names: Vec<String>) -> Result<(String, String), HarnessError> {
        let key = rcgen::KeyPair::generate().map_err(err)?;
        let cert = rcgen::CertificateParams::new(names)
            .map_err(err)?
            .signed_by(&key, &rcgen::Issuer::from_params(&self.params, &self.key))
            .map_err(err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The files of a local gateway: its serving certificate (from the gateway CA) and the
/// device CA, written into a directory.
#[derive(Debug)]
pub struct GatewayPki {
    /// The CA agents trust for the gateway.
    pub gateway_ca: Ca,
    /// The CA that issues device certificates.
    pub device_ca: Ca,
    /// Where the files are.
    pub dir: PathBuf,
}

impl GatewayPki {
    /// Writes `gw.crt`, `gw.key`, `gw-ca.crt`, `dev-ca.crt`, `dev-ca.key` and `token`
    /// into `dir`; the gateway certificate names loopback and `extra_ips`.
    pub fn write(dir: &Path, extra_ips: &[String]) -> Result<Self, HarnessError> {
        let gateway_ca = Ca::new("edgefleet gateway CA")?;
        let device_ca = Ca::new("edgefleet device CA")?;
        let mut names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
        names.extend(extra_ips.iter().cloned());
        let (cert, key) = gateway_ca.issue(names)?;
        let w = |name: &str, text: &str| std::fs::write(dir.join(name), text).map_err(err);
        w("gw.crt", &cert)?;
        w("gw.key", &key)?;
        w("gw-ca.crt", &gateway_ca.pem)?;
        w("dev-ca.crt", &device_ca.pem)?;
        w("dev-ca.key", &device_ca.key.serialize_pem())?;
        w("token", BOOTSTRAP_TOKEN)?;
        Ok(Self {
            gateway_ca,
            device_ca,
            dir: dir.to_path_buf(),
        })
    }
}

/// How to start the operator.
#[derive(Debug, Clone)]
pub struct OperatorSpec {
    /// Gateway listen address.
    pub gateway_addr: String,
    /// Artifact store.
    pub artifact_dir: PathBuf,
    /// `--approval`.
    pub approval: String,
    /// PEM EK CA files (TPM devices).
    pub ek_cas: Vec<PathBuf>,
    /// PEM EK intermediate files.
    pub ek_intermediates: Vec<PathBuf>,
    /// Heartbeat lease, seconds.
    pub heartbeat_lease_seconds: u64,
    /// `--artifact-ca`: roots for mirroring `https://` artifacts (default: the system's).
    pub artifact_ca: Option<PathBuf>,
    /// Log file (stdout and stderr).
    pub log: PathBuf,
}

/// Starts `edgefleet-operator run` with its gateway, against `kubeconfig`, using the
/// development reference policy set (`policies/dev.json`: the dev attester is allowed).
pub fn spawn_operator(
    kubeconfig: &Path,
    pki: &GatewayPki,
    spec: &OperatorSpec,
) -> Result<Child, HarnessError> {
    spawn_operator_with(kubeconfig, pki, spec, &[])
}

/// [`spawn_operator`] with `extra` arguments after the others (for example
/// `--attestation-lease-seconds=20`, or `--result-ttl-seconds=60` for shorter-lived
/// certificates than the default 600 s).
pub fn spawn_operator_with(
    kubeconfig: &Path,
    pki: &GatewayPki,
    spec: &OperatorSpec,
    extra: &[&str],
) -> Result<Child, HarnessError> {
    let d = &pki.dir;
    let metrics = crate::free_port()?;
    let log = std::fs::File::create(&spec.log).map_err(err)?;
    let mut cmd = Command::new(binary("edgefleet-operator")?);
    cmd.args(["run", "--lease-seconds", "3"]);
    // `--identity` in `extra` names another replica.
    if !extra.iter().any(|a| a.starts_with("--identity")) {
        cmd.args(["--identity", "op-1"]);
    }
    cmd.args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
        .args([
            "--heartbeat-lease-seconds",
            &spec.heartbeat_lease_seconds.to_string(),
        ])
        .args(["--gateway-addr", &spec.gateway_addr])
        .arg("--gateway-cert")
        .arg(d.join("gw.crt"))
        .arg("--gateway-key")
        .arg(d.join("gw.key"))
        .arg("--device-ca-cert")
        .arg(d.join("dev-ca.crt"))
        .arg("--device-ca-key")
        .arg(d.join("dev-ca.key"))
        .arg("--bootstrap-token-file")
        .arg(d.join("token"))
        .arg("--policy")
        .arg(crate::workspace_root().join("policies/attestation.rego"))
        .arg("--policy-data")
        .arg(crate::workspace_root().join("policies/dev.json"))
        .args(["--policy-name", "dev"])
        .arg("--artifact-dir")
        .arg(&spec.artifact_dir)
        .args(["--approval", &spec.approval]);
    for ca in &spec.ek_cas {
        cmd.arg("--ek-ca").arg(ca);
    }
    if let Some(ca) = &spec.artifact_ca {
        cmd.arg("--artifact-ca").arg(ca);
    }
    for ca in &spec.ek_intermediates {
        cmd.arg("--ek-intermediate").arg(ca);
    }
    // Certificates live 10 minutes unless `extra` says otherwise.
    if !extra.iter().any(|a| a.starts_with("--result-ttl-seconds")) {
        cmd.args(["--result-ttl-seconds", "600"]);
    }
    cmd.args(extra);
    cmd.env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info,kube=warn")
        .stdout(log.try_clone().map_err(err)?)
        .stderr(log)
        .spawn()
        .map_err(err)
}

/// How to start one agent.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// Device name.
    pub name: String,
    /// Directory for its configuration and state.
    pub dir: PathBuf,
    /// Gateway URL as the agent reaches it.
    pub gateway: String,
    /// The gateway CA file.
    pub gateway_ca: PathBuf,
    /// API port (on 127.0.0.1 of its network).
    pub port: u16,
    /// `dev` or `tpm`.
    pub tee: String,
    /// TPM TCTI, for `tpm`.
    pub tcti: Option<String>,
    /// Network namespace to run in.
    pub netns: Option<String>,
    /// Its pool: it enrols with the pool's token ([`pool_token`]; create it with
    /// [`create_pool_token`]), which gives it the `edgefleet.io/pool` label.
    pub pool: String,
    /// Log file (appended to).
    pub log: PathBuf,
}

/// Writes the agent's `agent.toml` (1 s heartbeats) and starts
/// `edgefleet-agent run`.
pub fn spawn_agent(a: &AgentSpec) -> Result<Child, HarnessError> {
    spawn_agent_with_gateways(a, &[])
}

/// [`spawn_agent`], listing `more` gateway URLs after `a.gateway` (`gateway.urls`).
pub fn spawn_agent_with_gateways(a: &AgentSpec, more: &[String]) -> Result<Child, HarnessError> {
    spawn_agent_with_env(a, more, &[])
}

/// [`spawn_agent_with_gateways`] with `env` set for the agent's process (for example
/// [`faketime_env`]).
pub fn spawn_agent_with_env(
    a: &AgentSpec,
    more: &[String],
    env: &[(String, String)],
) -> Result<Child, HarnessError> {
    std::fs::create_dir_all(&a.dir).map_err(err)?;
    let urls = serde_json::to_string(more).map_err(err)?;
    let tcti = a
        .tcti
        .as_ref()
        .map(|t| format!("tcti = \"{t}\"\n"))
        .unwrap_or_default();
    std::fs::write(
        a.dir.join("agent.toml"),
        format!(
            r#"state_dir = "{state}"
[device]
name = "{name}"
[gateway]
url = "{gateway}"
urls = {urls}
ca = "{ca}"
bootstrap_token = "{token}"
[attestation]
tee = "{tee}"
{tcti}interval_seconds = 300
[serve]
listen = "127.0.0.1:{port}"
threads = 1
[fleet]
heartbeat_seconds = 1
poll_wait_seconds = 20
backoff_max_seconds = 2
"#,
            state = a.dir.join("state").display(),
            name = a.name,
            token = pool_token(&a.pool),
            gateway = a.gateway,
            ca = a.gateway_ca.display(),
            tee = a.tee,
            port = a.port,
        ),
    )
    .map_err(err)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.log)
        .map_err(err)?;
    let agent = binary("edgefleet-agent")?;
    let mut cmd = match &a.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(agent);
            c
        }
        None => Command::new(agent),
    };
    cmd.args(["run", "--config-dir"])
        .arg(&a.dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "info,llama-cpp-2=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(err)?)
        .stderr(log)
        .spawn()
        .map_err(err)
}

/// A sample of the operator process `pid`'s `/metrics` whose line starts with `name`
/// (a metric's name with its labels, and a space), e.g.
/// `edgefleet_operator_reconciles_total{result="ok"} `; the metrics address is read from
/// its `--metrics-addr` argument. The first such line's value (its address read from the process's
/// `--metrics-addr` argument), or `None` when it cannot be read.
pub fn operator_counter(pid: u32, name: &str) -> Option<f64> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let addr = args
        .iter()
        .position(|a| a == "--metrics-addr")
        .and_then(|i| args.get(i + 1))?;
    let out = Command::new("curl")
        .args(["-s", &format!("http://{addr}/metrics")])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// The environment that runs a process on a wall clock offset by what `file` holds
/// (libfaketime, Debian's `libfaketime`: `+0` at first, `+48h` to jump two days
/// ahead; re-read on every call), with the monotonic and boot clocks untouched, as when
/// NTP steps a device's clock. The machine has no `CAP_SYS_TIME` to step the real one.
pub fn faketime_env(file: &Path) -> Result<Vec<(String, String)>, HarnessError> {
    let lib = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .ok_or_else(|| err("libfaketime is not installed (apt install libfaketime)"))?;
    Ok(vec![
        ("LD_PRELOAD".into(), lib.into()),
        ("FAKETIME_TIMESTAMP_FILE".into(), file.display().to_string()),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ])
}

/// A child process killed (and reaped) when dropped.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SHA-256 of a file as `sha256:<hex>`.
pub fn digest_of(path: &Path) -> Result<String, HarnessError> {
    edgefleet_agent::activation::file_sha256(path)
        .map(|h| format!("sha256:{h}"))
        .map_err(|e| err(format!("{}: {e}", path.display())))
}

/// Puts `file` into the content-addressed store `dir` (a symbolic link named by its
/// digest); returns (digest, size).
pub fn store_artifact(dir: &Path, file: &Path) -> Result<(String, u64), HarnessError> {
    std::fs::create_dir_all(dir).map_err(err)?;
    let digest = digest_of(file)?;
    let size = std::fs::metadata(file).map_err(err)?.len();
    let link = dir.join(&digest["sha256:".len()..]);
    if !link.exists() {
        let target = std::fs::canonicalize(file).map_err(err)?;
        std::os::unix::fs::symlink(target, &link).map_err(err)?;
    }
    Ok((digest, size))
}

/// Writes a new P-256 signing key (PKCS#8 PEM) to `path` with `openssl genpkey`, as a
/// publisher would make one.
pub fn generate_signing_key(path: &Path) -> Result<(), HarnessError> {
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(path)
        .output()
        .map_err(err)?;
    if !out.status.success() {
        return Err(err(format!(
            "openssl genpkey: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// An HTTPS server for `files` (path -> body), 404 otherwise, on the current tokio
/// runtime; returns its base URL and the PEM of the CA that issued its certificate.
pub fn https_files<B: Into<Vec<u8>>>(
    files: Vec<(&'static str, B)>,
) -> Result<(String, String), HarnessError> {
    let ca_key = rcgen::KeyPair::generate().map_err(err)?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).map_err(err)?;
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .map_err(err)?
        .signed_by(&key, &rcgen::Issuer::from_params(&ca_params, &ca_key))
        .map_err(err)?;
    let tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .map_err(err)?;
    let mut router = axum::Router::new();
    for (path, body) in files {
        let body: Vec<u8> = body.into();
        router = router.route(path, axum::routing::get(move || async move { body }));
    }
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let listener = edgefleet_operator::gateway::listen(addr).map_err(err)?;
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().map_err(err)?.port()
    );
    tokio::spawn(edgefleet_operator::gateway::serve(
        listener,
        std::sync::Arc::new(tls),
        router,
    ));
    Ok((url, ca.pem()))
}
