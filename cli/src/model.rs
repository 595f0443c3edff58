//! `edgefleet model sign|verify|encrypt`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Subcommand};
use edgefleet_trust::model_signing::{
    self, Method, PinnedRoot, PrivateKey, PublicKey, SignOptions, TrustPolicy, certs,
};

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Sign a model file or directory; writes a Sigstore bundle.
    Sign(SignArgs),
    /// Verify a model against a bundle and a pinned key or root.
    Verify(VerifyArgs),
    /// Encrypt a model file for release to attested devices only: AES-256-GCM in
    /// authenticated chunks, under a new random key (or `--key`). Sign the encrypted
    /// file, and put the key in the Secret the EdgeModel's `spec.encryption` names.
    Encrypt(EncryptArgs),
}

#[derive(Args, Debug)]
pub struct EncryptArgs {
    /// Where to write the new 32-byte key (mode 0600; refused if it exists). Put it
    /// in the Secret: `kubectl create secret generic NAME --from-file=key=KEYFILE`.
    #[arg(long, conflicts_with = "key")]
    key_out: Option<PathBuf>,
    /// An existing 32-byte key file to encrypt with instead.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Plaintext bytes per chunk (4 KiB to 64 MiB).
    #[arg(long, default_value_t = edgefleet_trust::sealed::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// Where to write the encrypted model.
    #[arg(short, long)]
    output: PathBuf,
    /// The model file (one file, such as a GGUF).
    model_path: PathBuf,
}

#[derive(Args, Debug)]
pub struct SignArgs {
    /// PEM private key (PKCS#8 or SEC1; P-256, P-384 or P-521).
    #[arg(long, env = "EDGEFLEET_SIGNING_KEY")]
    key: PathBuf,
    /// PEM leaf certificate for the key (certificate mode).
    #[arg(long, requires = "chain")]
    cert: Option<PathBuf>,
    /// PEM intermediates, leaf's issuer first (certificate mode; may be empty).
    #[arg(long, requires = "cert")]
    chain: Option<PathBuf>,
    /// Hash in shards of this many bytes instead of whole files.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    shard_size: Option<u64>,
    /// Paths, relative to the model, to leave out of the signature (repeatable).
    #[arg(long = "ignore-path")]
    ignore_paths: Vec<String>,
    /// Where to write the bundle.
    #[arg(short, long)]
    output: PathBuf,
    /// The model file or directory.
    model_path: PathBuf,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("trust").required(true).args(["public_key", "root"])))]
pub struct VerifyArgs {
    /// The bundle to verify.
    #[arg(long)]
    bundle: PathBuf,
    /// PEM public key the bundle must be signed with (key mode).
    #[arg(long)]
    public_key: Option<PathBuf>,
    /// PEM root certificate the signer's chain must end in (certificate mode).
    #[arg(long, requires = "identity")]
    root: Option<PathBuf>,
    /// Identity (SAN email or URI, or subject CN) the leaf must carry; repeatable, one must match.
    #[arg(long, conflicts_with = "public_key")]
    identity: Vec<String>,
    /// Verify certificates as of this time (RFC 3339) instead of now.
    #[arg(long)]
    now: Option<String>,
    /// Further paths, relative to the model, that the signature does not cover (repeatable).
    #[arg(long = "ignore-path")]
    ignore_paths: Vec<String>,
    /// The model file or directory.
    model_path: PathBuf,
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<String> {
    match cmd {
        ModelCommand::Sign(args) => sign(args),
        ModelCommand::Verify(args) => verify(args),
        ModelCommand::Encrypt(args) => encrypt(args),
    }
}

fn encrypt(args: EncryptArgs) -> anyhow::Result<String> {
    use edgefleet_trust::sealed::{self, ModelKey};
    use std::io::Write as _;
    if !edgefleet_trust::sealed::CHUNK_SIZES.contains(&args.chunk_size) {
        bail!("--chunk-size must be between 4096 and 67108864");
    }
    let key = match (&args.key, &args.key_out) {
        (Some(path), None) => {
            let bytes = zeroize::Zeroizing::new(
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            );
            ModelKey::from_bytes(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?
        }
        (None, Some(_)) => ModelKey::generate()?,
        _ => bail!("give exactly one of --key-out (a new key) and --key (an existing one)"),
    };
    let meta = std::fs::metadata(&args.model_path)
        .with_context(|| format!("reading {}", args.model_path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a file", args.model_path.display());
    }
    let digest = sealed::file_digest(&args.model_path)
        .with_context(|| format!("reading {}", args.model_path.display()))?;
    // The key first, so that no encrypted file exists whose key was not kept.
    if let Some(path) = &args.key_out {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| {
                format!(
                    "creating {} (an existing key is never overwritten)",
                    path.display()
                )
            })?;
        f.write_all(key.bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let name = args
        .output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = args
        .output
        .with_file_name(format!(".{name}.{}.partial", std::process::id()));
    let result = (|| -> anyhow::Result<sealed::Header> {
        let input = std::io::BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(&args.model_path)
                .with_context(|| format!("reading {}", args.model_path.display()))?,
        );
        let mut out = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .with_context(|| format!("writing {}", tmp.display()))?,
        );
        let header = sealed::encrypt(input, meta.len(), &digest, &key, args.chunk_size, &mut out)
            .map_err(|e| anyhow!("{}: {e}", e.reason()))?;
        out.into_inner()
            .map_err(|e| anyhow!("writing {}: {}", tmp.display(), e.error()))?
            .sync_all()?;
        Ok(header)
    })();
    let header = match result {
        Ok(h) => h,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    Ok(format!(
        "encrypted {} ({digest}, {} bytes) -> {} ({} chunks of {} bytes, key id {}){}",
        args.model_path.display(),
        header.plaintext_size,
        args.output.display(),
        header.chunks(),
        header.chunk_size,
        header.key_id,
        args.key_out.as_ref().map_or(String::new(), |k| format!(
            "; key -> {} (sign the encrypted file; kubectl create secret generic NAME --from-file=key={})",
            k.display(),
            k.display()
        ))
    ))
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The path of `file` relative to the model directory, when it lies inside it.
fn inside(model: &Path, file: &Path) -> Option<String> {
    let model = model.canonicalize().ok()?;
    let parent = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file = parent.canonicalize().ok()?.join(file.file_name()?);
    file.strip_prefix(&model)
        .ok()
        .and_then(|p| p.to_str().map(str::to_owned))
}

fn sign(args: SignArgs) -> anyhow::Result<String> {
    let key = PrivateKey::from_pem(&read_text(&args.key)?)
        .map_err(|e| anyhow!("{}: {e}", args.key.display()))?;
    let chain = match (&args.cert, &args.chain) {
        (Some(cert), Some(chain)) => {
            let mut ders = certs::pem_certificates(&read_text(cert)?)?;
            if ders.len() != 1 {
                bail!(
                    "{}: expected one leaf certificate, found {}",
                    cert.display(),
                    ders.len()
                );
            }
            ders.extend(certs::pem_certificates(&read_text(chain)?)?);
            Some(ders)
        }
        _ => None,
    };
    let mut ignore_paths = args.ignore_paths.clone();
    if let Some(rel) = inside(&args.model_path, &args.output) {
        ignore_paths.push(rel);
    }
    let method = args.shard_size.map_or(Method::Files, Method::Shards);
    let bundle = model_signing::sign(
        &args.model_path,
        &key,
        chain.as_deref(),
        &SignOptions {
            method,
            ignore_paths,
        },
    )
    .map_err(|e| anyhow!("signing failed: {}: {e}", e.reason()))?;
    let name = args
        .output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = args
        .output
        .with_file_name(format!(".{name}.{}.partial", std::process::id()));
    std::fs::write(&tmp, &bundle).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    Ok(format!(
        "signed {} ({}, {} key) -> {}",
        args.model_path.display(),
        if chain.is_some() {
            "certificate mode"
        } else {
            "key mode"
        },
        key.public_key().curve(),
        args.output.display()
    ))
}

fn verify(args: VerifyArgs) -> anyhow::Result<String> {
    let now = crate::attest::parse_now(args.now.as_deref())?;
    let policy = match (&args.public_key, &args.root) {
        (Some(pk), None) => {
            let key = PublicKey::from_pem(&read_text(pk)?)
                .map_err(|e| anyhow!("{}: {e}", pk.display()))?;
            TrustPolicy::keys([(pk.display().to_string(), key)])
        }
        (None, Some(root)) => {
            let der = certs::pem_certificates(&read_text(root)?)?
                .into_iter()
                .next()
                .ok_or_else(|| anyhow!("{}: no certificate", root.display()))?;
            TrustPolicy::roots([PinnedRoot {
                name: root.display().to_string(),
                der,
                identities: args.identity.clone(),
            }])
        }
        _ => bail!("give exactly one of --public-key and --root"),
    };
    let size = std::fs::metadata(&args.bundle)
        .with_context(|| format!("reading {}", args.bundle.display()))?
        .len();
    if size > model_signing::MAX_BUNDLE_BYTES as u64 {
        bail!(
            "{} is {size} bytes; bundles over {} bytes are refused",
            args.bundle.display(),
            model_signing::MAX_BUNDLE_BYTES
        );
    }
    let bundle = std::fs::read(&args.bundle)
        .with_context(|| format!("reading {}", args.bundle.display()))?;
    let mut ignore = args.ignore_paths.clone();
    if let Some(rel) = inside(&args.model_path, &args.bundle) {
        ignore.push(rel);
    }
    let verified = model_signing::verify(&bundle, &args.model_path, &policy, now, &ignore)
        .map_err(|e| anyhow!("verification failed: {}: {e}", e.reason()))?;
    let method = match verified.method {
        Method::Files => "files".to_owned(),
        Method::Shards(n) => format!("shards of {n} bytes"),
    };
    Ok(format!(
        "verified {}: {} resources ({method}), subject {}, signed by {}",
        args.model_path.display(),
        verified.resources.len(),
        verified.subject_digest,
        verified.signer
    ))
}
