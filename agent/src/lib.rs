//! The edgefleet device agent. Today: the attesters that produce evidence for the
//! gateway (TPM 2.0 through tss-esapi, SEV-SNP and TDX through Linux configfs-tsm, and a
//! development key). Fetching, verifying and serving models join later.

pub mod attest;
pub mod config;
pub mod engine;
pub mod enrol;
pub mod fleet;
pub mod gateway_client;
pub mod plugins;
pub mod serve;
pub mod systemd;
