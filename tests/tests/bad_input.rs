#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

//! Bad input, across every boundary the product has: each case feeds one hostile or
//! malformed input to the real code and asserts the named rejection it gets, and that
//! the process lives on. The cases are listed in docs/security.md.
//!
//! - `pure`: attestation evidence, model-signing bundles, bootstrap tokens and name
//!   patterns, plugin loading, fed to the real parsers and verifiers in this process.
//! - `live`: requests to a real operator's device gateway, OpenAI API bodies to a real
//!   agent serving the real model, and CRD objects to the real API server.

#[path = "bad_input/pure.rs"]
mod pure;

#[path = "bad_input/live.rs"]
mod live;
