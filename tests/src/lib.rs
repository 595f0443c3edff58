//! Test harness: a real Kubernetes API server on loopback.
//!
//! [`ControlPlane::start`] launches etcd 3.5 and the upstream apiextensions-apiserver
//! (built by `tests/apiserver/build.sh`) on free loopback ports with fresh PKI, writes a
//! kubeconfig whose client certificate is in `system:masters`, and tears both processes
//! down when dropped, including when a test panics. [`ControlPlane::install_crds`]
//! applies the committed CRDs from `crds/generated/` (what users install, not what the
//! types would generate now) plus Lease and Event shims, and waits until they are
//! Established.
//!
//! Beside it, what the tests share: [`wait`] (polling until something holds, or failing
//! by name), [`builders`] (the EdgeModels, EdgeDevices and signed artifacts they apply),
//! [`local_fleet`] (operator and agent processes with their PKI and artifacts),
//! [`netns`] (a device's own network), [`swtpm`] (a software TPM), [`pki`] (the control
//! plane's certificates), [`chart`] (the Helm chart's operator as a local process); and what `edgefleet-dev` runs: [`demo`] and [`bench`](mod@bench).

pub mod bench;
pub mod builders;
pub mod chart;
pub mod core_shim;
pub mod demo;
pub mod leaks;
pub mod local_fleet;
pub mod netns;
pub mod pki;
pub mod swtpm;
pub mod wait;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};

/// Field manager the harness applies with.
pub const FIELD_MANAGER: &str = "edgefleet-harness";

/// How long the API server may take to answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a CRD may take to become Established.
const ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A binary the harness runs is missing.
    #[error("{what} not found at {path}; run tests/apiserver/build.sh (or scripts/test) first")]
    MissingBinary {
        /// Which binary.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A file system or process operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Certificates could not be generated.
    #[error("generating test PKI")]
    Pki(#[from] rcgen::Error),
    /// The API server did not become ready.
    #[error(
        "API server not ready after {waited:?}: {detail}\n--- apiserver log tail ---\n{log_tail}"
    )]
    NotReady {
        /// How long the harness waited.
        waited: Duration,
        /// Last error seen.
        detail: String,
        /// The end of the API server's log.
        log_tail: String,
    },
    /// A kube client call failed.
    #[error("{context}")]
    Kube {
        /// What was being done.
        context: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// A manifest could not be parsed.
    #[error("parsing {path}")]
    Manifest {
        /// The file.
        path: PathBuf,
        /// Parser error.
        #[source]
        source: serde_yaml::Error,
    },
    /// A CRD did not become Established in time.
    #[error("CRD {0} not Established within {ESTABLISHED_TIMEOUT:?}")]
    NotEstablished(String),
    /// Setting up a fleet (PKI, processes, files) failed.
    #[error("fleet setup: {0}")]
    Setup(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}

/// Root of the source tree.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The cache directory shared by scripts and tests (`$EDGEFLEET_CACHE`, else
/// `~/.cache/edgefleet`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EDGEFLEET_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache").join("edgefleet")
}

fn binary(env: &str, name: &str, what: &'static str) -> Result<PathBuf, HarnessError> {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("bin").join(name));
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::MissingBinary { what, path })
    }
}

/// A free TCP port on 127.0.0.1, as the kernel hands it out. Another process may take it
/// before we bind it again; [`ControlPlane::start`] retries once on that race.
pub fn free_port() -> Result<u16, HarnessError> {
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .map_err(io("binding an ephemeral port"))?;
    let port = listener
        .local_addr()
        .map_err(io("reading an ephemeral port"))?
        .port();
    Ok(port)
}

/// A command for `program` that dies with the process that started it: `setpriv
/// --pdeathsig KILL` (util-linux) covers the case where the test process is killed
/// outright (a timeout), where no `Drop` runs.
fn child_command(program: &Path) -> Command {
    if Path::new("/usr/bin/setpriv").exists() {
        let mut cmd = Command::new("/usr/bin/setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// A child process that is killed when dropped.
#[derive(Debug)]
struct Guarded {
    child: Child,
    log: PathBuf,
}

impl Guarded {
    fn spawn(mut cmd: Command, log: PathBuf) -> Result<Self, HarnessError> {
        let out = std::fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io("duplicating a log file handle"))?;
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io(format!("starting {program}")))?;
        Ok(Self { child, log })
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// etcd plus the API server, with the PKI and kubeconfig to reach them.
#[derive(Debug)]
pub struct ControlPlane {
    // Field order is drop order: the API server stops before etcd, and the directory
    // goes last.
    apiserver: Guarded,
    etcd: Guarded,
    kubeconfig: Kubeconfig,
    kubeconfig_path: PathBuf,
    server_url: String,
    dir: Workdir,
}

#[derive(Debug)]
enum Workdir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl Workdir {
    fn path(&self) -> &Path {
        match self {
            Workdir::Temp(t) => t.path(),
            Workdir::Kept(p) => p,
        }
    }
}

impl ControlPlane {
    /// Starts a fresh control plane in a temporary directory, removed on drop.
    pub async fn start() -> Result<Self, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("edgefleet-cp-")
            .tempdir()
            .map_err(io("creating a temporary directory"))?;
        Self::start_with(Workdir::Temp(dir)).await
    }

    /// Starts a control plane whose state lives in `dir` (which is wiped first) and is
    /// kept after drop, for the local development control plane.
    pub async fn start_in(dir: &Path) -> Result<Self, HarnessError> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io(format!("clearing {}", dir.display())))?;
        }
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        Self::start_with(Workdir::Kept(dir.to_path_buf())).await
    }

    async fn start_with(dir: Workdir) -> Result<Self, HarnessError> {
        let mut last = None;
        // Ports are picked, released and bound again by the children; retry once if
        // another process took one in between.
        for _ in 0..2 {
            match Self::try_start(dir.path()).await {
                Ok((apiserver, etcd, kubeconfig, kubeconfig_path, server_url)) => {
                    return Ok(Self {
                        apiserver,
                        etcd,
                        kubeconfig,
                        kubeconfig_path,
                        server_url,
                        dir,
                    });
                }
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or(HarnessError::NotEstablished("unreachable".into())))
    }

    #[allow(clippy::type_complexity)]
    async fn try_start(
        dir: &Path,
    ) -> Result<(Guarded, Guarded, Kubeconfig, PathBuf, String), HarnessError> {
        let etcd_bin = binary("EDGEFLEET_ETCD", "etcd", "etcd 3.5")?;
        let apiserver_bin = binary(
            "EDGEFLEET_APISERVER",
            "edgefleet-test-apiserver",
            "the test API server",
        )?;

        let pki = pki::Pki::generate()?;
        let pki_dir = dir.join("pki");
        pki.write(&pki_dir)?;

        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let api_port = free_port()?;

        let data = dir.join("etcd");
        let _ = std::fs::remove_dir_all(&data);
        let mut etcd = child_command(&etcd_bin);
        etcd.arg("--name=default")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{etcd_port}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=default=http://127.0.0.1:{peer_port}"
            ))
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let etcd = Guarded::spawn(etcd, dir.join("etcd.log"))?;

        let mut api = child_command(&apiserver_bin);
        api.arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={api_port}"))
            .arg(format!(
                "--tls-cert-file={}",
                pki_dir.join("server.crt").display()
            ))
            .arg(format!(
                "--tls-private-key-file={}",
                pki_dir.join("server.key").display()
            ))
            .arg(format!(
                "--client-ca-file={}",
                pki_dir.join("ca.crt").display()
            ));
        let mut apiserver = Guarded::spawn(api, dir.join("apiserver.log"))?;

        let server_url = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = pki.kubeconfig(&server_url)?;
        let kubeconfig_path = dir.join("kubeconfig");
        let yaml = serde_yaml::to_string(&kubeconfig).map_err(|source| HarnessError::Manifest {
            path: kubeconfig_path.clone(),
            source,
        })?;
        std::fs::write(&kubeconfig_path, yaml)
            .map_err(io(format!("writing {}", kubeconfig_path.display())))?;

        let client = client_for(&kubeconfig).await?;
        let started = Instant::now();
        loop {
            let detail = match readyz(&client).await {
                Ok(body) if body.trim() == "ok" => break,
                Ok(body) => body,
                Err(err) => err.to_string(),
            };
            let exited = apiserver.exited().is_some();
            if exited || started.elapsed() > READY_TIMEOUT {
                let detail = if exited {
                    format!("API server exited; last: {detail}")
                } else {
                    detail
                };
                return Err(HarnessError::NotReady {
                    waited: started.elapsed(),
                    detail,
                    log_tail: apiserver.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok((apiserver, etcd, kubeconfig, kubeconfig_path, server_url))
    }

    /// The last lines of the etcd and API server logs, for failure messages.
    pub fn log_tails(&self) -> String {
        format!(
            "--- etcd ---\n{}\n--- apiserver ---\n{}",
            self.etcd.log_tail(),
            self.apiserver.log_tail()
        )
    }

    /// A kube client for `system:masters`.
    pub async fn client(&self) -> Result<kube::Client, HarnessError> {
        client_for(&self.kubeconfig).await
    }

    /// Path of the kubeconfig file.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The state directory (PKI, etcd data, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A `kubectl` command aimed at this control plane.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into()));
        cmd.env("KUBECONFIG", &self.kubeconfig_path)
            .env_remove("KUBERNETES_SERVICE_HOST");
        cmd
    }

    /// Applies the committed CRDs and the Lease/Event shims, and waits until each is
    /// Established. Returns the CRD names.
    pub async fn install_crds(&self) -> Result<Vec<String>, HarnessError> {
        let root = workspace_root();
        let mut files = yaml_files(&root.join("crds").join("generated"))?;
        files.extend(yaml_files(
            &root.join("tests").join("apiserver").join("shims"),
        )?);
        let client = self.client().await?;
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let mut names = Vec::new();
        let mut lists = Vec::new();
        for path in files {
            let text = std::fs::read_to_string(&path)
                .map_err(io(format!("reading {}", path.display())))?;
            let crd: CustomResourceDefinition =
                serde_yaml::from_str(&text).map_err(|source| HarnessError::Manifest {
                    path: path.clone(),
                    source,
                })?;
            let name = crd.metadata.name.clone().unwrap_or_default();
            for v in crd.spec.versions.iter().filter(|v| v.served) {
                lists.push(format!(
                    "/apis/{}/{}/{}",
                    crd.spec.group, v.name, crd.spec.names.plural
                ));
            }
            api.patch(&name, &params, &Patch::Apply(&crd))
                .await
                .map_err(|source| HarnessError::Kube {
                    context: format!("applying CRD {name}"),
                    source,
                })?;
            names.push(name);
        }
        for name in &names {
            let established = await_condition(api.clone(), name, conditions::is_crd_established());
            match tokio::time::timeout(ESTABLISHED_TIMEOUT, established).await {
                Ok(Ok(_)) => {}
                _ => return Err(HarnessError::NotEstablished(name.clone())),
            }
        }
        // Established is not yet served: the handler answers 429 until its informers
        // sync. Wait until every resource lists, as a client would.
        let client = self.client().await?;
        let started = Instant::now();
        for list in lists {
            loop {
                let req = http::Request::get(list.as_str())
                    .body(Vec::new())
                    .map_err(|e| HarnessError::Kube {
                        context: format!("building GET {list}"),
                        source: kube::Error::HttpError(e),
                    })?;
                match client.request_text(req).await {
                    Ok(_) => break,
                    Err(_) if started.elapsed() < ESTABLISHED_TIMEOUT => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(_) => return Err(HarnessError::NotEstablished(list)),
                }
            }
        }
        Ok(names)
    }
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, HarnessError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(format!("listing {}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

async fn client_for(kubeconfig: &Kubeconfig) -> Result<kube::Client, HarnessError> {
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig.clone(), &KubeConfigOptions::default())
            .await
            .map_err(|e| HarnessError::Kube {
                context: "building a client config from the kubeconfig".into(),
                source: kube::Error::InferKubeconfig(e),
            })?;
    kube::Client::try_from(config).map_err(|source| HarnessError::Kube {
        context: "building a client".into(),
        source,
    })
}

async fn readyz(client: &kube::Client) -> Result<String, kube::Error> {
    let req = http::Request::get("/readyz")
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    client.request_text(req).await
}
