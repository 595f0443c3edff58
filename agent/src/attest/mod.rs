//! Attesters: produce evidence whose report data carries the gateway's binding
//! (see `edgefleet_trust::attestation::binding`).

pub mod configfs_tsm;
pub mod dev;
pub mod tpm;

/// Errors of the attesters.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// Reading or writing the configfs-tsm interface failed.
    #[error("configfs-tsm {path}: {source}")]
    Configfs {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel produced a report for another request (concurrent writer).
    #[error("configfs-tsm generation changed from {before} to {after}: another request interfered")]
    Generation {
        /// Before the request.
        before: u64,
        /// After.
        after: u64,
    },
    /// The TPM refused or failed a command.
    #[error("TPM: {0}")]
    Tpm(#[from] tss_esapi::Error),
    /// Evidence could not be encoded.
    #[error("encoding evidence: {0}")]
    Encoding(String),
}
