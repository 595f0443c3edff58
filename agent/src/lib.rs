//! The edgefleet device agent: attests the device to the gateway, follows the desired
//! state the gateway gives it, and serves the model it is assigned on an
//! OpenAI-compatible API, with WebAssembly plugins in the request path.
//!
//! - [`cli`]: the command line and its commands (the binary only parses and calls it).
//! - [`config`]: the layered configuration (`agent.toml`, drop-ins, environment).
//! - [`gateway_session`]: fleet mode (`run`): enrol, attest, long-poll the desired
//!   state, converge, report, and keep serving through gateway outages.
//! - [`standalone`]: `serve`: one model from local files, no operator.
//! - [`activation`]: the one path both of them take to put a verified model (and its
//!   plugins) into service, plus the device owner's consent to plugin grants
//!   (allowlist and deny list), signature checks and the artifact store on disk.
//! - [`serve`]: the OpenAI-compatible API over whatever is being served.
//! - [`engine`]: llama.cpp behind a bounded queue.
//! - [`plugins`]: the wasmtime plugin sandbox and the per-request plugin chain.
//! - [`attest`], [`enrol`], [`gateway_client`]: evidence (TPM 2.0, SEV-SNP and TDX
//!   through configfs-tsm, a development key) and the attestation rounds with the
//!   gateway.
//! - [`systemd`]: `Type=notify` readiness, status and watchdog.

pub mod activation;
pub mod attest;
pub mod cli;
pub mod config;
pub mod durable;
pub mod engine;
pub mod enrol;
pub mod gateway_client;
pub mod gateway_session;
pub mod golden;
pub mod histogram;
pub mod plugins;
pub mod serve;
pub mod standalone;
pub mod systemd;
