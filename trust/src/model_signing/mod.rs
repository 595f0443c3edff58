//! OpenSSF model-signing v1.0: verify and produce the bundles that the reference
//! `model_signing` 1.1.1 writes (key mode and certificate mode; `files` and `shards`
//! serialization).
//!
//! Verification is strict where the reference is lenient: certificate mode requires an
//! identity pin, checks validity at an explicit `now`, and needs key usage
//! digitalSignature (and EKU codeSigning when an EKU is present). The legacy v0.1
//! predicate, which carries no serialization parameters, is rejected.
//!
//! The submodules: `error` ([`SignatureError`]), `policy` (the [`TrustPolicy`] and who
//! signed), `verifier` ([`verify`], [`verify_bundle`]) and `signer` ([`sign`]), over the
//! bundle format ([`bundle`]), certificate paths ([`certs`]), model hashing ([`hashing`])
//! and keys ([`keys`]).

pub mod bundle;
pub mod certs;
mod error;
pub mod hashing;
pub mod keys;
mod policy;
mod signer;
mod verifier;

pub use crate::x509::NotValidAt;
pub use bundle::Bundle;
pub use certs::PinnedRoot;
pub use error::SignatureError;
pub use hashing::Method;
pub use keys::{PrivateKey, PublicKey};
pub use policy::{SignerIdentity, TrustPolicy, TrustedSigner};
pub use signer::{SignOptions, sign};
pub use verifier::{VerifiedModel, verify, verify_bundle};

/// Largest bundle accepted, in bytes.
pub const MAX_BUNDLE_BYTES: usize = 16 << 20;

/// Paths the reference always leaves out of a signature.
pub const DEFAULT_IGNORE_PATHS: [&str; 4] = [".git", ".gitattributes", ".github", ".gitignore"];
