//! Encrypted models: decrypting the verified ciphertext, with a key held in locked
//! memory ([`edgefleet_secmem::LockedSecret`]), into a sealed, locked memfd
//! ([`edgefleet_secmem::SealedModel`]) that llama.cpp loads through `/proc/self/fd/N`.
//! No plaintext byte is written to a file, and none can be swapped out. The process is
//! made non-dumpable first, so that neither a core dump nor another user's debugger
//! reads the key or the model from it.
//!
//! The signature was checked on the ciphertext before this runs; this checks every
//! chunk and then the plaintext's digest against the one the (signed) header names.

use std::path::Path;
use std::sync::Arc;

use edgefleet_secmem::{LockedSecret, SealedModel};
use edgefleet_trust::sealed::{KEY_LEN, ModelKey, SealError, Sealed};

use super::ActivateError;

/// A model key held in a locked page that core dumps leave out.
pub type HeldKey = LockedSecret<KEY_LEN>;

/// Holds `key` in locked memory, after locking all of the process's memory
/// ([`lock_all_memory`]).
pub fn hold(key: &ModelKey) -> Result<HeldKey, ActivateError> {
    no_dumps();
    lock_all_memory()?;
    LockedSecret::new(key.bytes())
        .map_err(|e| ActivateError::Encryption(format!("PlaintextNotLockable: the model key: {e}")))
}

/// Locks every page of the process, now and from now on, as it is touched
/// (`mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`), for the rest of its life: the
/// copies llama.cpp makes of the weights (repacked for the CPU, or when it does not
/// map the file), the derived chunk key and any transient copy of the key are never
/// swapped out either. It needs the limit on locked memory lifted
/// (`LimitMEMLOCK=infinity`, as the package's unit sets) or `CAP_IPC_LOCK`; otherwise
/// later allocations would fail at random, so it refuses first.
pub fn lock_all_memory() -> Result<(), ActivateError> {
    use rustix::process::{Resource, getrlimit};
    let unlimited = getrlimit(Resource::Memlock).current.is_none();
    // CAP_IPC_LOCK (bit 14 of the effective set) lifts the limit too.
    let capable = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 14) != 0);
    if !unlimited && !capable {
        return Err(ActivateError::Encryption(
            "PlaintextNotLockable: decrypted models need LimitMEMLOCK=infinity (or CAP_IPC_LOCK)"
                .into(),
        ));
    }
    use rustix::mm::MlockAllFlags;
    rustix::mm::mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT)
        .map_err(|e| ActivateError::Encryption(format!("PlaintextNotLockable: mlockall: {e}")))
}

/// Makes the process non-dumpable (no core dumps, no ptrace by other users), once it
/// holds a key or a decrypted model.
fn no_dumps() {
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!(error = %e, "could not make the agent non-dumpable");
    }
}

/// Whether the file at `path` is an encrypted model (by its magic).
pub fn is_encrypted(path: &Path) -> bool {
    use std::io::Read as _;
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && edgefleet_trust::sealed::is_sealed(&magic)
}

fn refused(e: &SealError) -> ActivateError {
    ActivateError::Encryption(format!("{}: {e}", e.reason()))
}

/// Decrypts the encrypted model at `file` with `key` into a sealed memfd. Blocking
/// (call it on a blocking thread).
pub fn decrypt(file: &Path, key: &HeldKey) -> Result<Arc<SealedModel>, ActivateError> {
    no_dumps();
    let f = std::fs::File::open(file)
        .map_err(|e| ActivateError::State(format!("{}: {e}", file.display())))?;
    let len = f
        .metadata()
        .map_err(|e| ActivateError::State(format!("{}: {e}", file.display())))?
        .len();
    let sealed = Sealed::open(f).map_err(|e| refused(&e))?;
    // The header sizes the memory: it must describe this file before any is taken.
    if sealed.file_size() != len {
        return Err(ActivateError::Encryption(format!(
            "CiphertextTampered: the header describes a file of {} bytes, this one has {len}",
            sealed.file_size()
        )));
    }
    let size = sealed.header().plaintext_size;
    let mut filling = SealedModel::create("edgefleet-model", size).map_err(|e| {
        ActivateError::Encryption(format!("PlaintextNotLockable: {size} bytes: {e}"))
    })?;
    let key = ModelKey::from_bytes(key.bytes()).map_err(|e| refused(&e))?;
    sealed
        .decrypt_into(&key, filling.bytes_mut())
        .map_err(|e| refused(&e))?;
    let model = filling
        .seal()
        .map_err(|e| ActivateError::Encryption(format!("PlaintextNotLockable: sealing: {e}")))?;
    Ok(Arc::new(model))
}
