//! The report-data binding: SHA-512 over a canonical encoding of the challenge nonce,
//! the agent's public key and the device name. Putting all three in the evidence ties
//! the evidence to this challenge (no replay), to the key that will get the client
//! certificate (no key swap), and to the device (no relaying another device's evidence).

use sha2::{Digest as _, Sha512};

/// Domain separation for the binding hash.
const CONTEXT: &[u8] = b"edgefleet attestation binding v1\0";

fn field(h: &mut Sha512, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

/// The 64 bytes an attester puts in its report data.
pub fn report_data(nonce: &[u8], agent_public_key_der: &[u8], device: &str) -> [u8; 64] {
    let mut h = Sha512::new();
    h.update(CONTEXT);
    field(&mut h, nonce);
    field(&mut h, agent_public_key_der);
    field(&mut h, device.as_bytes());
    h.finalize().into()
}

/// What a TPM quotes as qualifying data: SHA-256 of the binding. TPM2B_DATA holds at
/// most one digest of the TPM's largest hash (32 bytes on SHA-256-only TPMs), so the
/// 64-byte binding itself does not fit on real chips.
pub fn tpm_qualifying_data(report_data: &[u8; 64]) -> [u8; 32] {
    use sha2::Sha256;
    Sha256::digest(report_data).into()
}

#[cfg(test)]
mod tests {
    use super::report_data;

    #[test]
    fn each_input_changes_the_binding() {
        let base = report_data(b"nonce", b"key", "dev-1");
        assert_eq!(base, report_data(b"nonce", b"key", "dev-1"));
        assert_ne!(base, report_data(b"nonce2", b"key", "dev-1"));
        assert_ne!(base, report_data(b"nonce", b"key2", "dev-1"));
        assert_ne!(base, report_data(b"nonce", b"key", "dev-2"));
        // Length prefixes keep field boundaries: moving a byte across fields changes it.
        assert_ne!(report_data(b"ab", b"c", "d"), report_data(b"a", b"bc", "d"));
    }
}
