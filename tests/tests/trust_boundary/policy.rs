//! Cluster-owned trust roots (EdgeTrustPolicy), namespace-bound device pools, signer
//! withdrawal and local refusals: filled in by the trust-policy work.
