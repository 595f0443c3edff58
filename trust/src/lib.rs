//! edgefleet's trust library, shared by the operator, the agent and the CLI. It has no
//! Kubernetes dependency, so everything here is unit-testable.
//!
//! - [`model_signing`]: OpenSSF model-signing v1.0 (Sigstore bundle v0.3 + DSSE + in-toto)
//!   signing and verification, interoperable with the reference `model_signing` 1.1.1.
//! - [`attestation`]: SEV-SNP, TDX and TPM 2.0 evidence verification into normalized
//!   claims, and their Rego appraisal.
//! - [`sealed`]: encrypted models and their key release.
//! - [`receipt`]: signed answers, verifiable with the device CA alone.

pub mod attestation;
pub mod jws;
pub mod model_signing;
pub mod receipt;
pub mod sealed;
mod x509;
