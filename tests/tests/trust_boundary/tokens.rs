//! Enrolment tokens (`EdgeBootstrapToken`) and device-owned labels, against the real API
//! server and gateway:
//!
//! - an expired, a used-up, a wrong-name, an unknown (no such id, a wrong secret, a
//!   malformed token) and a missing token are each refused with their reason, counted,
//!   and create no EdgeDevice;
//! - a valid token enrols, its usage is counted (only for a new device), its labels are
//!   set and the EdgeDevice names it; a label the device asks for with a foreign prefix
//!   is refused `LabelNotDeviceOwned`, a bare one lands under `device.edgefleet.io/`;
//! - an enrolled device enrols again and attests (TPM) with no token at all;
//! - real processes: a token made by `edgefleet token create` enrols a real agent, which
//!   deletes its token file; `token list` shows the usage, `token delete` removes it;
//!   the agent, offline for longer than its certificate's life, comes back with neither
//!   the token file nor the token, attested again; an agent that is not enrolled and
//!   has no token says `NoBootstrapToken`.

use std::collections::BTreeMap;
use std::time::Duration;

use edgefleet_agent::gateway_client::GatewayClient;
use edgefleet_crds::device::EdgeDevice;
use edgefleet_crds::{EdgeBootstrapToken, EdgeBootstrapTokenSpec};
use edgefleet_operator::metrics::ReasonLabel;
use edgefleet_trust::attestation::identity::sha256_digest;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;

use super::{Setup, rejected, setup, spki_b64};

const SECRET: &str = "0123456789abcdef";

/// Creates the token `<id>.SECRET` (an hour long, one usage, any name, no labels, as
/// `edit` changes it); returns the token.
async fn token(s: &Setup, id: &str, edit: impl FnOnce(&mut EdgeBootstrapTokenSpec)) -> String {
    let mut spec = EdgeBootstrapTokenSpec {
        secret_hash: sha256_digest(SECRET.as_bytes()),
        expiration_time: Time(Timestamp::now() + Duration::from_secs(3600)),
        usage_limit: 1,
        device_name_pattern: "*".into(),
        device_labels: BTreeMap::new(),
        description: Some("test".into()),
    };
    edit(&mut spec);
    tokens(s)
        .await
        .create(&Default::default(), &EdgeBootstrapToken::new(id, spec))
        .await
        .unwrap();
    format!("{id}.{SECRET}")
}

async fn tokens(s: &Setup) -> Api<EdgeBootstrapToken> {
    Api::all(s.cp.client().await.unwrap())
}

async fn device_opt(s: &Setup, name: &str) -> Option<EdgeDevice> {
    Api::<EdgeDevice>::all(s.cp.client().await.unwrap())
        .get_opt(name)
        .await
        .unwrap()
}

fn client(s: &Setup, token: &str) -> GatewayClient {
    GatewayClient::new(&s.url, s.ca_pem.as_bytes(), token).unwrap()
}

fn request(
    name: &str,
    key: &rcgen::KeyPair,
    labels: &[(&str, &str)],
) -> edgefleet_proto::EnrolRequest {
    let mut r = super::enrol_request(key);
    r.device = name.into();
    r.labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    r
}

fn counted(s: &Setup, reason: &str) -> u64 {
    s.counters
        .refusals
        .get_or_create(&ReasonLabel {
            reason: reason.into(),
        })
        .get()
}

async fn usages(s: &Setup, id: &str) -> i64 {
    tokens(s).await.get(id).await.unwrap().usages()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_used_up_wrong_name_unknown_and_missing_tokens_are_refused_by_name() {
    let s = setup().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let expired = token(&s, "exp001", |t| {
        t.expiration_time = Time(Timestamp::now() - Duration::from_secs(60));
    })
    .await;
    let once = token(&s, "use001", |_| {}).await;
    let kiosks = token(&s, "nam001", |t| t.device_name_pattern = "kiosk-*".into()).await;

    let refusal = |token: &str, name: &str| {
        let c = client(&s, token);
        let req = request(name, &key, &[]);
        async move { rejected(c.enrol(&req).await.unwrap_err()) }
    };
    assert_eq!(
        refusal(&expired, "till-x").await,
        (401, "TokenExpired".to_owned())
    );
    // Used up: its one usage enrols one device, the next is refused.
    assert!(
        client(&s, &once)
            .enrol(&request("till-u1", &key, &[]))
            .await
            .unwrap()
            .created
    );
    assert_eq!(
        refusal(&once, "till-u2").await,
        (401, "TokenUsedUp".to_owned())
    );
    assert_eq!(usages(&s, "use001").await, 1);
    // A name outside the pattern; the pattern's own names enrol.
    assert_eq!(
        refusal(&kiosks, "till-n").await,
        (403, "DeviceNameNotAllowed".to_owned())
    );
    // Unknown: no such id, a wrong secret of a real id, a malformed token (one answer).
    assert_eq!(
        refusal("zzz999.0123456789abcdef", "till-z").await,
        (401, "UnknownToken".to_owned())
    );
    assert_eq!(
        refusal("nam001.0123456789abcdee", "kiosk-1").await,
        (401, "UnknownToken".to_owned())
    );
    assert_eq!(
        refusal("not-a-token", "kiosk-1").await,
        (401, "UnknownToken".to_owned())
    );
    assert_eq!(
        refusal("", "kiosk-1").await,
        (401, "TokenRequired".to_owned())
    );
    for name in ["till-x", "till-u2", "till-n", "till-z", "kiosk-1"] {
        assert!(device_opt(&s, name).await.is_none(), "{name} was enrolled");
    }
    for (reason, n) in [
        ("TokenExpired", 1),
        ("TokenUsedUp", 1),
        ("DeviceNameNotAllowed", 1),
        ("UnknownToken", 3),
        ("TokenRequired", 1),
    ] {
        assert_eq!(counted(&s, reason), n, "{reason}");
    }
    // Nothing refused used the tokens up.
    assert_eq!(usages(&s, "nam001").await, 0);
    assert!(
        client(&s, &kiosks)
            .enrol(&request("kiosk-1", &key, &[]))
            .await
            .unwrap()
            .created
    );
    assert_eq!(usages(&s, "nam001").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_enrols_counts_its_usages_and_gives_its_labels() {
    let s = setup().await;
    let t = token(&s, "val001", |t| {
        t.usage_limit = 2;
        t.device_name_pattern = "till-*".into();
        t.device_labels = [("edgefleet.io/pool".to_owned(), "retail".to_owned())].into();
    })
    .await;
    let with = client(&s, &t);
    let key = rcgen::KeyPair::generate().unwrap();

    // The device also asks for another architecture than it reports: its facts win.
    let first = with
        .enrol(&request(
            "till-1",
            &key,
            &[("zone", "front"), ("arch", "s390x")],
        ))
        .await
        .unwrap();
    assert!(first.created && first.approved);
    let d = device_opt(&s, "till-1").await.unwrap();
    assert_eq!(
        d.metadata.labels.clone().unwrap(),
        BTreeMap::from([
            ("device.edgefleet.io/arch".to_owned(), "x86_64".to_owned()),
            ("device.edgefleet.io/memory-gib".to_owned(), "8".to_owned()),
            ("device.edgefleet.io/zone".to_owned(), "front".to_owned()),
            ("edgefleet.io/pool".to_owned(), "retail".to_owned()),
        ])
    );
    assert_eq!(
        d.metadata
            .annotations
            .unwrap()
            .get(edgefleet_crds::token::TOKEN_ANNOTATION)
            .map(String::as_str),
        Some("val001")
    );
    let status = tokens(&s)
        .await
        .get("val001")
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.usages, 1);
    assert_eq!(status.last_device.as_deref(), Some("till-1"));
    assert!(status.last_used_time.is_some());

    // Enrolling again with the same key uses nothing, with the token or without any.
    assert!(
        !with
            .enrol(&request("till-1", &key, &[]))
            .await
            .unwrap()
            .created
    );
    assert!(
        !client(&s, "")
            .enrol(&request("till-1", &key, &[]))
            .await
            .unwrap()
            .created
    );
    assert_eq!(usages(&s, "val001").await, 1);

    // A device may not ask for an administrator's label: refused, nothing used.
    for foreign in ["edgefleet.io/pool", "example.com/tier"] {
        let err = with
            .enrol(&request("till-2", &key, &[(foreign, "lab")]))
            .await
            .unwrap_err();
        assert_eq!(rejected(err), (400, "LabelNotDeviceOwned".to_owned()));
    }
    assert_eq!(counted(&s, "LabelNotDeviceOwned"), 2);
    assert!(device_opt(&s, "till-2").await.is_none());
    assert_eq!(usages(&s, "val001").await, 1);
    // One already under the device-owned prefix stays there.
    let key2 = rcgen::KeyPair::generate().unwrap();
    assert!(
        with.enrol(&request(
            "till-2",
            &key2,
            &[("device.edgefleet.io/gpu", "none")]
        ))
        .await
        .unwrap()
        .created
    );
    let labels = device_opt(&s, "till-2")
        .await
        .unwrap()
        .metadata
        .labels
        .unwrap();
    assert_eq!(
        labels.get("device.edgefleet.io/gpu").map(String::as_str),
        Some("none")
    );
    assert_eq!(usages(&s, "val001").await, 2);
    let err = with.enrol(&request("till-3", &key, &[])).await.unwrap_err();
    assert_eq!(rejected(err), (401, "TokenUsedUp".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_device_enrols_again_and_attests_with_no_token_at_all() {
    let s = setup().await;
    let tokenless = client(&s, "");
    // Enrolled already (by `setup`): its own key is answered, with no token.
    let again = tokenless
        .enrol(&super::enrol_request(&s.agent))
        .await
        .unwrap();
    assert!(!again.created);
    // Attestation needs the key and the TPM, not the token.
    let mut attester = edgefleet_agent::attest::tpm::TpmAttester::open(&s.tpm_a.tcti()).unwrap();
    use base64::Engine as _;
    let b64 = |b: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(b);
    let ask = edgefleet_trust::attestation::service::ChallengeRequest {
        device: super::DEVICE.into(),
        agent_public_key: spki_b64(&s.agent),
        tee: edgefleet_trust::attestation::TeeKind::Tpm,
        tpm: Some(edgefleet_trust::attestation::service::TpmEnrolment {
            ek_certificate: b64(attester.ek_certificate().unwrap()),
            ak_public_area: b64(attester.ak_public_area().unwrap()),
        }),
    };
    let challenge = tokenless.challenge(&ask).await.unwrap();
    let appraisal = tokenless
        .evidence(&edgefleet_e2e::swtpm::tpm_evidence(
            &mut attester,
            challenge,
            super::DEVICE,
            super::csr(&s.agent),
        ))
        .await
        .unwrap();
    assert!(appraisal.decision.allow, "{:?}", appraisal.decision.deny);
    assert!(appraisal.certificate.is_some());

    // A new name without a token is refused, and so is another key for the name.
    let stranger = rcgen::KeyPair::generate().unwrap();
    let err = tokenless
        .enrol(&request("till-new", &stranger, &[]))
        .await
        .unwrap_err();
    assert_eq!(rejected(err), (401, "TokenRequired".to_owned()));
    let err = tokenless
        .challenge(&edgefleet_trust::attestation::service::ChallengeRequest {
            agent_public_key: spki_b64(&stranger),
            ..ask
        })
        .await
        .unwrap_err();
    assert_eq!(rejected(err), (403, "KeyMismatch".to_owned()));
}

/// A real operator (certificates living 60 s, the gateway's minimum) and real agents.
mod processes {
    use std::path::Path;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use edgefleet_crds::EdgeBootstrapToken;
    use edgefleet_crds::device::EdgeDevice;
    use edgefleet_e2e::local_fleet::{self, Proc};
    use edgefleet_e2e::wait::eventually;
    use edgefleet_e2e::{ControlPlane, free_port};
    use kube::api::Api;

    fn edgefleet(cp: &ControlPlane, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(local_fleet::binary("edgefleet").unwrap())
            .args(args)
            .env("KUBECONFIG", cp.kubeconfig_path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts agent `name` (dev evidence) whose token is the file `dir/<name>/token`
    /// (deleted after enrolment), not an inline one.
    fn agent(d: &Path, name: &str, gateway: &str) -> Proc {
        let dir = d.join(name);
        std::fs::create_dir_all(dir.join("agent.d")).unwrap();
        std::fs::write(
            dir.join("agent.d/token.toml"),
            format!(
                "[gateway]\nbootstrap_token = \"\"\nbootstrap_token_file = \"{}\"\ndelete_token_after_enrol = true\n",
                dir.join("token").display()
            ),
        )
        .unwrap();
        Proc(
            local_fleet::spawn_agent(&local_fleet::AgentSpec {
                name: name.into(),
                dir,
                gateway: gateway.into(),
                gateway_ca: d.join("gw-ca.crt"),
                port: free_port().unwrap(),
                tee: "dev".into(),
                tcti: None,
                netns: None,
                pool: "unused".into(),
                log: d.join(format!("{name}.log")),
            })
            .unwrap(),
        )
    }

    fn unix_now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }

    fn attested_at(d: &EdgeDevice) -> Option<(i64, i64)> {
        let s = d.status.as_ref()?;
        let ok = s
            .conditions
            .iter()
            .any(|c| c.type_ == "Attested" && c.status == "True");
        let a = s.attestation.as_ref()?;
        ok.then(|| (a.verified_time.0.as_second(), a.expiry_time.0.as_second()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cli_token_enrols_an_agent_that_comes_back_after_its_certificate_lapsed_without_it() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cp = ControlPlane::start().await.unwrap();
        cp.install_crds().await.unwrap();
        let client = cp.client().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let pki = local_fleet::GatewayPki::write(d, &[]).unwrap();
        let gw_port = free_port().unwrap();
        let _operator = Proc(
            local_fleet::spawn_operator_with(
                cp.kubeconfig_path(),
                &pki,
                &local_fleet::OperatorSpec {
                    gateway_addr: format!("127.0.0.1:{gw_port}"),
                    artifact_dir: d.join("artifacts"),
                    approval: "auto:edgefleet.io/pool=tok".into(),
                    ek_cas: vec![],
                    ek_intermediates: vec![],
                    heartbeat_lease_seconds: 8,
                    artifact_ca: None,
                    log: d.join("operator.log"),
                },
                &["--result-ttl-seconds=60"],
            )
            .unwrap(),
        );
        let gateway = format!("https://127.0.0.1:{gw_port}");
        let log =
            |name: &str| std::fs::read_to_string(d.join(format!("{name}.log"))).unwrap_or_default();

        // The CLI refuses what it cannot make, and makes a token, printing only it.
        let (ok, _, err) = edgefleet(&cp, &["token", "create", "--ttl", "0h"]);
        assert!(!ok && err.contains("0h"), "{err}");
        let (ok, _, err) = edgefleet(
            &cp,
            &["token", "create", "--label", "device.edgefleet.io/x=y"],
        );
        assert!(!ok, "{err}");
        let (ok, out, err) = edgefleet(
            &cp,
            &[
                "token",
                "create",
                "--ttl",
                "1h",
                "--usages",
                "1",
                "--names",
                "tok-*",
                "--label",
                "edgefleet.io/pool=tok",
                "--description",
                "till enrolment",
            ],
        );
        assert!(ok, "{err}");
        let token = out.trim().to_owned();
        let (id, _) = edgefleet_crds::token::parse_token(&token)
            .unwrap_or_else(|| panic!("not a token: {out:?}"));
        let id = id.to_owned();
        let stored = Api::<EdgeBootstrapToken>::all(client.clone())
            .get(&id)
            .await
            .unwrap();
        assert!(
            !serde_json::to_string(&stored)
                .unwrap()
                .contains(token.split('.').nth(1).unwrap())
        );

        // The agent enrols with it from a 0600 file, and deletes the file once enrolled.
        let file = d.join("tok-1/token");
        std::fs::create_dir_all(d.join("tok-1")).unwrap();
        std::fs::write(&file, &token).unwrap();
        std::fs::set_permissions(
            &file,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
        )
        .unwrap();
        let devices = Api::<EdgeDevice>::all(client.clone());
        let mut tok1 = Some(agent(d, "tok-1", &gateway));
        let (first, expiry) = eventually("tok-1 attested", Duration::from_secs(90), || async {
            attested_at(&devices.get_opt("tok-1").await.ok()??)
        })
        .await;
        let enrolled = devices.get("tok-1").await.unwrap();
        assert_eq!(
            enrolled
                .metadata
                .labels
                .unwrap()
                .get("edgefleet.io/pool")
                .map(String::as_str),
            Some("tok")
        );
        assert!(enrolled.spec.approved, "approved by the token's label");
        assert!(!file.exists(), "the token file is deleted after enrolment");
        assert!(
            log("tok-1").contains("deleted the bootstrap token file"),
            "{}",
            log("tok-1")
        );

        // `token list` shows its usage; `token delete` removes it.
        let (ok, out, err) = edgefleet(&cp, &["token", "list"]);
        assert!(ok, "{err}");
        let row = out
            .lines()
            .find(|l| l.starts_with(&id))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(
            row.contains("1/1") && row.contains("tok-*") && row.contains("till enrolment"),
            "{row}"
        );
        let (ok, _, err) = edgefleet(&cp, &["token", "delete", &id]);
        assert!(ok, "{err}");
        assert!(
            Api::<EdgeBootstrapToken>::all(client.clone())
                .get_opt(&id)
                .await
                .unwrap()
                .is_none()
        );
        let (ok, _, err) = edgefleet(&cp, &["token", "delete", &id]);
        assert!(!ok && err.contains("no bootstrap token"), "{err}");
        let (ok, _, err) = edgefleet(&cp, &["token", "delete", "NOT-AN-ID"]);
        assert!(!ok && err.contains("not a token id"), "{err}");

        // Offline longer than its certificate's life, then back: with neither the token
        // file nor the token, it enrols again (its own key) and attests afresh.
        drop(tok1.take());
        let wait = u64::try_from(expiry - unix_now()).unwrap_or(0) + 3;
        tokio::time::sleep(Duration::from_secs(wait)).await;
        assert!(unix_now() > expiry, "the certificate has lapsed");
        let started = Instant::now();
        let _tok1 = agent(d, "tok-1", &gateway);
        let (again, _) = eventually("tok-1 attested again", Duration::from_secs(90), || async {
            attested_at(&devices.get_opt("tok-1").await.ok()??).filter(|(v, _)| *v > first)
        })
        .await;
        assert!(again > expiry, "attested after the lapse");
        assert!(started.elapsed() < Duration::from_secs(90));
        assert!(!file.exists());

        // A device that is not enrolled and has no token is told so, by name.
        let _tok2 = agent(d, "tok-2", &gateway);
        eventually(
            "tok-2 says NoBootstrapToken",
            Duration::from_secs(30),
            || async { log("tok-2").contains("NoBootstrapToken").then_some(()) },
        )
        .await;
        assert!(devices.get_opt("tok-2").await.unwrap().is_none());

        // A device the administrator deleted is not enrolled again by the token its
        // running agent read at start, even with usages left: the token served the
        // first enrolment only.
        let (ok, out, err) = edgefleet(
            &cp,
            &[
                "token",
                "create",
                "--usages",
                "2",
                "--names",
                "tok-3",
                "--label",
                "edgefleet.io/pool=tok",
            ],
        );
        assert!(ok, "{err}");
        let (id3, _) = edgefleet_crds::token::parse_token(out.trim()).unwrap();
        let id3 = id3.to_owned();
        let file3 = d.join("tok-3/token");
        std::fs::create_dir_all(d.join("tok-3")).unwrap();
        std::fs::write(&file3, out.trim()).unwrap();
        std::fs::set_permissions(
            &file3,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
        )
        .unwrap();
        let _tok3 = agent(d, "tok-3", &gateway);
        eventually("tok-3 attested", Duration::from_secs(90), || async {
            attested_at(&devices.get_opt("tok-3").await.ok()??)
        })
        .await;
        devices.delete("tok-3", &Default::default()).await.unwrap();
        // Refused twice: its retries go without the token too.
        eventually(
            "tok-3 refused twice with NoBootstrapToken",
            Duration::from_secs(90),
            || async { (log("tok-3").matches("NoBootstrapToken").count() >= 2).then_some(()) },
        )
        .await;
        assert!(devices.get_opt("tok-3").await.unwrap().is_none());
        let usages = Api::<EdgeBootstrapToken>::all(client.clone())
            .get(&id3)
            .await
            .unwrap()
            .status
            .map_or(0, |s| s.usages);
        assert_eq!(usages, 1, "the deleted device used the token again");
    }
}
