//! TDX TCB status from Intel's collateral: genuine quotes against genuine, Intel-signed
//! TCB info and QE identity, and every way the collateral or the platform can fail it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{collateral_dir, intel_root, later, read as quote, when};
use edgefleet_trust::attestation::tdx::{self, TdxOptions};
use edgefleet_trust::attestation::tdx_collateral::{
    self, PckTcb, QuoteTcb, TcbStatus, TdxCollateral,
};
use edgefleet_trust::attestation::{AttestationError, pem_certificates};
use p256::ecdsa::signature::Signer as _;
use p256::pkcs8::DecodePrivateKey as _;
use rstest::rstest;
use serde_json::{Value, json};

fn genuine() -> TdxCollateral {
    TdxCollateral::load_dir(&collateral_dir()).unwrap()
}

fn verify(
    name: &str,
    collateral: TdxCollateral,
    now: SystemTime,
) -> Result<Value, AttestationError> {
    let opts = TdxOptions {
        allow_debug: false,
        expected_report_data: None,
        collateral: Some(Arc::new(collateral)),
    };
    tdx::verify(&quote(name), &intel_root(), now, &opts).map(|c| json!(c.tcb))
}

#[test]
fn a_current_platform_is_up_to_date_by_intels_collateral() {
    // PCK SGX TCB 4,4,2,2,4,1,0,5 and PCE SVN 13; TDX module 1.11, late microcode 4.
    let tcb = verify("gotdx-quote-v5.dat", genuine(), when()).unwrap();
    assert_eq!(tcb["fmspc"], "90c06f000000");
    assert_eq!(tcb["pck_sgx_tcb"], "04040202040100050000000000000000");
    assert_eq!(tcb["tcb_status"], "UpToDate", "{tcb:#}");
    assert_eq!(tcb["platform_tcb_status"], "UpToDate");
    assert_eq!(tcb["module_tcb_status"], "UpToDate");
    assert_eq!(tcb["qe_tcb_status"], "UpToDate");
    assert_eq!(tcb["tcb_date"], "2024-11-13T00:00:00Z");
    assert_eq!(tcb["advisory_ids"], json!([]));
    assert_eq!(tcb["tcb_evaluation_data_number"], 18);
}

#[test]
fn a_platform_older_than_every_level_is_not_supported() {
    // trustee's 2024 platform: SGX TCB component 1 is 1, and the lowest level of the 2026
    // TCB info for its FMSPC needs 2. Intel's verifier answers TCB_NOT_SUPPORTED.
    let err = verify("trustee-tdx_quote_5.dat", genuine(), when()).unwrap_err();
    assert_eq!(err.reason(), "TcbNotSupported", "{err}");
    assert!(err.to_string().contains("90c06f000000"), "{err}");
}

#[test]
fn without_collateral_the_status_is_unknown_but_the_platform_is_named() {
    let opts = TdxOptions::default();
    let c = tdx::verify(&quote("gotdx-quote-v5.dat"), &intel_root(), when(), &opts).unwrap();
    assert_eq!(c.tcb["tcb_status"], "unknown");
    assert_eq!(c.tcb["fmspc"], "90c06f000000");
    assert!(!c.tcb.contains_key("advisory_ids"));
}

#[test]
fn collateral_must_be_current() {
    // Genuine documents, a month apart: the 50806f000000 TCB info is not issued yet at
    // `when()`, and once it is, the QE identity is past its next update.
    let err = verify("gotdx-quote-v4.dat", genuine(), when()).unwrap_err();
    assert_eq!(err.reason(), "CollateralExpired", "{err}");
    assert!(err.to_string().contains("tcbInfo"), "{err}");
    let later = UNIX_EPOCH + Duration::from_secs(1_773_964_800); // 2026-03-20
    let err = verify("gotdx-quote-v4.dat", genuine(), later).unwrap_err();
    assert_eq!(err.reason(), "CollateralExpired", "{err}");
    assert!(err.to_string().contains("enclaveIdentity"), "{err}");
    // Before the 90c06f000000 TCB info was issued.
    let before = UNIX_EPOCH + Duration::from_secs(1_769_731_200); // 2026-01-30
    let err = verify("gotdx-quote-v5.dat", genuine(), before).unwrap_err();
    assert_eq!(err.reason(), "CollateralExpired", "{err}");
}

#[test]
fn a_platform_without_tcb_info_is_named() {
    let mut c = genuine();
    c.tcb_infos.remove("90c06f000000");
    let err = verify("gotdx-quote-v5.dat", c, when()).unwrap_err();
    assert_eq!(err.reason(), "CollateralMissing", "{err}");
    assert!(err.to_string().contains("90c06f000000"));
}

#[rstest]
#[case::status_upgraded("\"tcbStatus\":\"OutOfDate\"", "\"tcbStatus\":\"UpToDate\"")]
#[case::advisory_dropped("\"INTEL-SA-01036\",", "")]
#[case::svn_lowered("\"pcesvn\":13", "\"pcesvn\":1")]
fn tampered_tcb_info_is_refused(#[case] from: &str, #[case] to: &str) {
    let mut c = genuine();
    let text = c.tcb_infos.get_mut("90c06f000000").unwrap();
    assert!(text.contains(from));
    *text = text.replacen(from, to, 1);
    let err = verify("gotdx-quote-v5.dat", c, when()).unwrap_err();
    assert_eq!(err.reason(), "CollateralInvalid", "{err}");
    assert!(err.to_string().contains("does not verify"), "{err}");
}

#[test]
fn tampered_qe_identity_and_garbage_are_refused() {
    let mut c = genuine();
    c.qe_identity = c.qe_identity.replace("\"isvsvn\":4", "\"isvsvn\":1");
    let err = verify("gotdx-quote-v5.dat", c, when()).unwrap_err();
    assert_eq!(err.reason(), "CollateralInvalid", "{err}");
    let mut c = genuine();
    c.qe_identity = "{\"enclaveIdentity\":".into();
    let err = verify("gotdx-quote-v5.dat", c, when()).unwrap_err();
    assert_eq!(err.reason(), "CollateralInvalid", "{err}");
    let mut c = genuine();
    let info = c.tcb_infos["90c06f000000"].clone();
    // Another FMSPC's genuine document served under this one's name.
    c.tcb_infos
        .insert("90c06f000000".into(), c.tcb_infos["50806f000000"].clone());
    let later = UNIX_EPOCH + Duration::from_secs(1_773_964_800);
    let err = verify("gotdx-quote-v5.dat", c, later).unwrap_err();
    assert_eq!(err.reason(), "CollateralInvalid", "{err}");
    assert!(err.to_string().contains("FMSPC 50806f000000"), "{err}");
    assert!(!info.is_empty());
}

#[test]
fn only_the_tcb_signing_certificate_under_the_pinned_root_signs() {
    // The quote's own PCK chain chains to the same root, but a PCK key must not sign TCB
    // info: the leaf is issued by a PCK CA, not by the root.
    let q = quote("gotdx-quote-v5.dat");
    let start = q
        .windows(27)
        .position(|w| w == b"-----BEGIN CERTIFICATE-----")
        .unwrap();
    let mut c = genuine();
    c.signing_chain = q[start..].to_vec();
    let err = verify("gotdx-quote-v5.dat", c, when()).unwrap_err();
    assert_eq!(err.reason(), "ChainInvalid", "{err}");
    // The genuine signing certificate under an impostor root.
    let mut c = genuine();
    let leaf = pem_certificates(&c.signing_chain).unwrap().remove(0);
    let mut pem = pem_of(&leaf);
    pem.push_str(&pem_of(&Synthetic::new().root_der));
    c.signing_chain = pem.into_bytes();
    let err = verify("gotdx-quote-v5.dat", c, when()).unwrap_err();
    assert_eq!(err.reason(), "ChainInvalid", "{err}");
    // After the signing certificate's end.
    let err = verify("gotdx-quote-v5.dat", genuine(), later()).unwrap_err();
    assert_eq!(err.reason(), "CertificateNotValidAt", "{err}");
}

fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).unwrap());
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

// ---- level matching, on documents signed by a test key --------------------------------

/// A test root and a TCB signing certificate under it, to sign edited documents.
struct Synthetic {
    root_der: Vec<u8>,
    chain_pem: String,
    key: p256::ecdsa::SigningKey,
}

impl Synthetic {
    fn new() -> Self {
        Self::with_cn("Intel SGX TCB Signing")
    }

    fn with_cn(cn: &str) -> Self {
        let root_key = rcgen::KeyPair::generate().unwrap();
        let mut rp = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        rp.distinguished_name
            .push(rcgen::DnType::CommonName, "Test SGX Root CA");
        rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = rp.self_signed(&root_key).unwrap();
        let issuer = rcgen::Issuer::new(rp, root_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut lp = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        lp.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let leaf = lp.signed_by(&leaf_key, &issuer).unwrap();
        let key = p256::ecdsa::SigningKey::from_pkcs8_der(&leaf_key.serialize_der()).unwrap();
        Self {
            root_der: root.der().to_vec(),
            chain_pem: leaf.pem(),
            key,
        }
    }

    fn sign(&self, member: &str, body: &Value) -> String {
        let text = body.to_string();
        let sig: p256::ecdsa::Signature = self.key.sign(text.as_bytes());
        format!(
            "{{\"{member}\":{text},\"signature\":\"{}\"}}",
            hex::encode(sig.to_bytes())
        )
    }

    /// The genuine documents, edited, then signed by the test key.
    fn collateral(
        &self,
        edit_info: impl Fn(&mut Value),
        edit_qe: impl Fn(&mut Value),
    ) -> TdxCollateral {
        let g = genuine();
        let member =
            |text: &str, key: &str| serde_json::from_str::<Value>(text).unwrap()[key].clone();
        let mut info = member(&g.tcb_infos["90c06f000000"], "tcbInfo");
        edit_info(&mut info);
        let mut qe = member(&g.qe_identity, "enclaveIdentity");
        qe["nextUpdate"] = json!("2026-03-03T14:49:26Z");
        edit_qe(&mut qe);
        TdxCollateral {
            tcb_infos: [("90c06f000000".to_owned(), self.sign("tcbInfo", &info))].into(),
            qe_identity: self.sign("enclaveIdentity", &qe),
            signing_chain: self.chain_pem.clone().into_bytes(),
        }
    }
}

/// A platform at the genuine 90c06f000000 top level: SGX components 3,3,2,2,4,1,0,5,
/// PCE SVN 13, TDX module 1.6 with late microcode 3, and a TD QE at SVN 4.
struct Platform {
    pck: PckTcb,
    tee: [u8; 16],
    mr_signer_seam: [u8; 48],
    qe_report: Vec<u8>,
}

impl Platform {
    fn top() -> Self {
        let mut qe_report = vec![0u8; 384];
        qe_report[48] = 0x11; // ATTRIBUTES as the identity requires
        qe_report[128..160].copy_from_slice(
            &hex::decode("DC9E2A7C6F948F17474E34A7FC43ED030F7C1563F1BABDDF6340C82E0E54A8C5")
                .unwrap(),
        );
        qe_report[256] = 2; // ISVPRODID
        qe_report[258] = 4; // ISVSVN
        let mut tee = [0u8; 16];
        tee[..3].copy_from_slice(&[6, 1, 3]);
        Self {
            pck: PckTcb {
                fmspc: "90c06f000000".into(),
                pce_id: "0000".into(),
                sgx_components: [3, 3, 2, 2, 4, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0],
                pce_svn: 13,
            },
            tee,
            mr_signer_seam: [0; 48],
            qe_report,
        }
    }

    fn evaluate(
        &self,
        s: &Synthetic,
        c: &TdxCollateral,
    ) -> Result<tdx_collateral::TcbEvaluation, AttestationError> {
        tdx_collateral::evaluate(
            c,
            &s.root_der,
            when(),
            &self.pck,
            &QuoteTcb {
                tee_tcb_svn: &self.tee,
                mr_signer_seam: &self.mr_signer_seam,
                seam_attributes: &[0; 8],
                qe_report: &self.qe_report,
            },
        )
    }
}

fn unchanged(_: &mut Value) {}

#[test]
fn the_first_level_the_platform_meets_decides() {
    let s = Synthetic::new();
    let c = s.collateral(unchanged, unchanged);
    let e = Platform::top().evaluate(&s, &c).unwrap();
    assert_eq!(e.status, TcbStatus::UpToDate);
    assert_eq!(e.tcb_date, "2024-11-13T00:00:00Z");
    assert!(e.advisory_ids.is_empty());

    // Late microcode one step behind (SGX component 1): the second level.
    let mut p = Platform::top();
    p.pck.sgx_components[0] = 2;
    p.pck.sgx_components[1] = 2;
    let e = p.evaluate(&s, &c).unwrap();
    assert_eq!(e.platform, TcbStatus::OutOfDate);
    assert_eq!(e.status, TcbStatus::OutOfDate);
    assert_eq!(e.tcb_date, "2024-03-13T00:00:00Z");
    assert!(
        e.advisory_ids.contains(&"INTEL-SA-01111".to_owned()),
        "{e:?}"
    );

    // The TDX late microcode (TEE_TCB_SVN byte 2) behind: the second level too.
    let mut p = Platform::top();
    p.tee[2] = 2;
    assert_eq!(p.evaluate(&s, &c).unwrap().platform, TcbStatus::OutOfDate);

    // Below every level: not supported, named.
    let mut p = Platform::top();
    p.pck.pce_svn = 4;
    let err = p.evaluate(&s, &c).unwrap_err();
    assert_eq!(err.reason(), "TcbNotSupported", "{err}");
}

#[test]
fn the_tdx_module_is_judged_by_its_own_identity() {
    let s = Synthetic::new();
    let c = s.collateral(unchanged, unchanged);
    // Module 1.4: TDX_01's OutOfDate level, while the platform is up to date.
    let mut p = Platform::top();
    p.tee[0] = 4;
    let e = p.evaluate(&s, &c).unwrap();
    assert_eq!(e.platform, TcbStatus::UpToDate);
    assert_eq!(e.module, Some(TcbStatus::OutOfDate));
    assert_eq!(e.status, TcbStatus::OutOfDate);
    assert!(e.advisory_ids.contains(&"INTEL-SA-01099".to_owned()));
    // Module 1.1: below every level of TDX_01.
    p.tee[0] = 1;
    assert_eq!(p.evaluate(&s, &c).unwrap_err().reason(), "TcbNotSupported");
    // Major version 2 has no identity.
    let mut p = Platform::top();
    p.tee[1] = 2;
    let err = p.evaluate(&s, &c).unwrap_err();
    assert!(err.to_string().contains("TDX_02"), "{err}");
    // A module signed by someone else.
    let mut p = Platform::top();
    p.mr_signer_seam[0] = 1;
    let err = p.evaluate(&s, &c).unwrap_err();
    assert_eq!(err.reason(), "TcbNotSupported");
    assert!(err.to_string().contains("MRSIGNERSEAM"), "{err}");
}

#[rstest]
#[case::mrsigner(128, 0xff, "MRSIGNER")]
#[case::product(256, 3, "ISVPRODID")]
#[case::attributes(48, 0x13, "ATTRIBUTES")]
#[case::miscselect(16, 1, "MISCSELECT")]
fn a_quoting_enclave_that_is_not_intels_is_refused(
    #[case] at: usize,
    #[case] value: u8,
    #[case] field: &str,
) {
    let s = Synthetic::new();
    let c = s.collateral(unchanged, unchanged);
    let mut p = Platform::top();
    p.qe_report[at] = value;
    let err = p.evaluate(&s, &c).unwrap_err();
    assert_eq!(err.reason(), "QeIdentityMismatch", "{err}");
    assert!(err.to_string().contains(field), "{err}");
}

#[test]
fn statuses_converge_and_revocation_rejects() {
    let s = Synthetic::new();
    // The QE's only level says SWHardeningNeeded; the platform needs configuration.
    let c = s.collateral(
        |info| info["tcbLevels"][0]["tcbStatus"] = json!("ConfigurationNeeded"),
        |qe| qe["tcbLevels"][0]["tcbStatus"] = json!("SWHardeningNeeded"),
    );
    let e = Platform::top().evaluate(&s, &c).unwrap();
    assert_eq!(e.status, TcbStatus::ConfigurationAndSwHardeningNeeded);
    // A QE older than every level.
    let mut p = Platform::top();
    p.qe_report[258] = 3;
    assert_eq!(p.evaluate(&s, &c).unwrap_err().reason(), "TcbNotSupported");
    // A revoked platform level.
    let c = s.collateral(
        |info| info["tcbLevels"][0]["tcbStatus"] = json!("Revoked"),
        unchanged,
    );
    let err = Platform::top().evaluate(&s, &c).unwrap_err();
    assert_eq!(err.reason(), "TcbNotSupported");
    assert!(err.to_string().contains("revoked"), "{err}");
    // A status Intel does not define.
    let c = s.collateral(
        |info| info["tcbLevels"][0]["tcbStatus"] = json!("Fine"),
        unchanged,
    );
    assert_eq!(
        Platform::top().evaluate(&s, &c).unwrap_err().reason(),
        "CollateralInvalid"
    );
}

#[test]
fn documents_for_something_else_are_refused() {
    let s = Synthetic::new();
    for (edit, needle) in [
        (
            (|info: &mut Value| info["id"] = json!("SGX")) as fn(&mut Value),
            "not TDX version 3",
        ),
        (
            |info: &mut Value| info["version"] = json!(2),
            "not TDX version 3",
        ),
        (|info: &mut Value| info["pceId"] = json!("0001"), "PCE 0001"),
    ] {
        let c = s.collateral(edit, unchanged);
        let err = Platform::top().evaluate(&s, &c).unwrap_err();
        assert_eq!(err.reason(), "CollateralInvalid");
        assert!(err.to_string().contains(needle), "{err}");
    }
    let c = s.collateral(unchanged, |qe| qe["id"] = json!("QE"));
    let err = Platform::top().evaluate(&s, &c).unwrap_err();
    assert!(err.to_string().contains("not TD_QE"), "{err}");
    // Signed by a certificate under the root that is not the TCB signing certificate.
    let other = Synthetic::with_cn("Intel SGX PCK Platform CA");
    let c = other.collateral(unchanged, unchanged);
    let err = Platform::top().evaluate(&other, &c).unwrap_err();
    assert_eq!(err.reason(), "ChainInvalid");
    assert!(err.to_string().contains("TCB Signing"), "{err}");
}

#[test]
fn a_missing_directory_or_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = TdxCollateral::load_dir(dir.path()).unwrap_err();
    assert_eq!(err.reason(), "CollateralInvalid");
    assert!(err.to_string().contains("tcb_signing_chain.pem"), "{err}");
}
