//! SEV-SNP and TDX evidence through Linux configfs-tsm
//! (`/sys/kernel/config/tsm/report`, Documentation/ABI/testing/configfs-tsm).
//!
//! One request: create an entry directory, read `generation`, write the 64 bytes of
//! report data to `inblob`, read `outblob` (the SNP report or TDX quote), `auxblob`
//! (SNP certificate table, if the host supplies one) and `provider`, read `generation`
//! again — it must have advanced by exactly one, or another writer raced us — and remove
//! the entry. No SNP or TDX hardware is available to this project's machines: this code
//! is tested against a fake configfs tree that behaves like the kernel.

use std::path::{Path, PathBuf};

use super::AttestError;

/// Default configfs-tsm report directory.
pub const DEFAULT_ROOT: &str = "/sys/kernel/config/tsm/report";

/// What the kernel returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsmReport {
    /// `sev_guest` or `tdx_guest`.
    pub provider: String,
    /// The report (SNP) or quote (TDX).
    pub outblob: Vec<u8>,
    /// SNP certificate table (VCEK etc.), when present.
    pub auxblob: Option<Vec<u8>>,
}

/// The configfs-tsm interface.
#[derive(Debug, Clone)]
pub struct ConfigfsTsm {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AttestError + '_ {
    move |source| AttestError::Configfs {
        path: path.to_path_buf(),
        source,
    }
}

impl ConfigfsTsm {
    /// Uses `root` (normally [`DEFAULT_ROOT`]).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn generation(entry: &Path) -> Result<u64, AttestError> {
        let path = entry.join("generation");
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        text.trim().parse().map_err(|e| AttestError::Configfs {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e}")),
        })
    }

    /// Requests a report binding `report_data`.
    pub fn report(&self, report_data: &[u8; 64]) -> Result<TsmReport, AttestError> {
        let entry = self.root.join(format!("edgefleet-{}", std::process::id()));
        match std::fs::create_dir(&entry) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(AttestError::Configfs {
                    path: entry,
                    source: e,
                });
            }
        }
        let result = (|| {
            let before = Self::generation(&entry)?;
            let inblob = entry.join("inblob");
            std::fs::write(&inblob, report_data).map_err(io(&inblob))?;
            let outblob_path = entry.join("outblob");
            let outblob = std::fs::read(&outblob_path).map_err(io(&outblob_path))?;
            let aux_path = entry.join("auxblob");
            let auxblob = match std::fs::read(&aux_path) {
                Ok(b) if !b.is_empty() => Some(b),
                Ok(_) => None,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(AttestError::Configfs {
                        path: aux_path,
                        source: e,
                    });
                }
            };
            let provider_path = entry.join("provider");
            let provider = std::fs::read_to_string(&provider_path)
                .map_err(io(&provider_path))?
                .trim()
                .to_owned();
            let after = Self::generation(&entry)?;
            if before.checked_add(1) != Some(after) {
                return Err(AttestError::Generation { before, after });
            }
            Ok(TsmReport {
                provider,
                outblob,
                auxblob,
            })
        })();
        // The kernel removes the entry's attributes with the directory.
        let _ = std::fs::remove_dir(&entry);
        result
    }
}
