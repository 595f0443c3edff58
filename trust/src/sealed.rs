//! Encrypted models and the release of their keys.
//!
//! **The file.** `edgefleet model encrypt` writes a model as fixed-size chunks, each
//! sealed with AES-256-GCM, so that it streams and every chunk is authenticated on its
//! own:
//!
//! ```text
//! "EFMSEAL1" | header length (u32, big endian) | header (JSON) | chunk 0 | chunk 1 | ...
//! chunk i = AES-256-GCM(chunk key, nonce = 0^32 | i (u64 BE),
//!                       aad = SHA-256(magic | length | header) | i (u64 BE) | final (u8))
//! ```
//!
//! - Every chunk but the last holds `chunkSize` plaintext bytes; the last holds the rest
//!   (an empty model is one empty final chunk). Each carries its 16-byte tag.
//! - The chunk index and the final flag are in the associated data, so chunks cannot be
//!   reordered, dropped, repeated or cut off: a file that ends early lacks its final
//!   chunk, and bytes after it are refused.
//! - The header (plaintext size and SHA-256, chunk size, a random salt, the key's id) is
//!   bound into every chunk by its hash; the plaintext's digest is checked again after
//!   decryption.
//! - The chunk key is HKDF-SHA256 of the model key with the file's salt, so a model key
//!   used for two files still never repeats a (key, nonce) pair.
//! - The signature bundle (OpenSSF model signing) signs this file, the ciphertext; the
//!   header names the plaintext digest.
//!
//! **The key.** A 32-byte model key lives in a Kubernetes Secret. The gateway releases
//! it to an attested device by HPKE (RFC 9180, base mode: DHKEM(X25519, HKDF-SHA256),
//! HKDF-SHA256, AES-256-GCM), sealed to a key the device made for that request alone and
//! signed with the key its attestation bound ([`key_request_message`]). The HPKE `info`
//! names the device, model, revision and ciphertext digest, so a release opens only for
//! what it was asked for.

use std::io::Read;

use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable as _, Kem as _, Serializable as _};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, Tag, UnboundKey};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize as _, Zeroizing};

/// The first bytes of an encrypted model.
pub const MAGIC: &[u8; 8] = b"EFMSEAL1";
/// A model key's length in bytes (AES-256).
pub const KEY_LEN: usize = 32;
/// The AEAD tag after each chunk.
pub const TAG_LEN: usize = 16;
/// The chunk size `edgefleet model encrypt` uses unless told otherwise (1 MiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Smallest and largest chunk sizes accepted.
pub const CHUNK_SIZES: std::ops::RangeInclusive<u32> = 4096..=(64 << 20);
/// Longest header accepted.
pub const MAX_HEADER_LEN: u32 = 4096;
/// Largest plaintext accepted (1 TiB).
pub const MAX_PLAINTEXT: u64 = 1 << 40;
/// The HPKE suite keys are released with, as devices and gateways name it.
pub const KEY_RELEASE_SUITE: &str = "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM";

const HEADER_VERSION: u32 = 1;
const AEAD_NAME: &str = "AES-256-GCM";
const CHUNK_KEY_INFO: &[u8] = b"edgefleet model chunks v1";
const KEY_ID_CONTEXT: &[u8] = b"edgefleet model key id v1\0";
const RELEASE_INFO: &[u8] = b"edgefleet model key release v1\0";
const REQUEST_CONTEXT: &[u8] = b"edgefleet model key request v1\0";

type Kem = X25519HkdfSha256;
type HpkeAead = hpke::aead::AesGcm256;
type HpkeKdf = hpke::kdf::HkdfSha256;

/// Why an encrypted model or a key release was refused; [`SealError::reason`] names it.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// Not an encrypted model (no magic), or a header that does not parse or is out of
    /// bounds.
    #[error("not an encrypted model: {0}")]
    NotSealed(String),
    /// The key is not the one the file was encrypted with.
    #[error("the key (id {given}) is not the file's (id {expected})")]
    WrongKey {
        /// The file's key id.
        expected: String,
        /// The given key's.
        given: String,
    },
    /// A chunk does not authenticate: tampered, reordered, or from another file.
    #[error("chunk {index} does not authenticate (tampered, reordered or not this file's)")]
    ChunkAuthentication {
        /// Its index.
        index: u64,
    },
    /// The file ends before its final chunk.
    #[error("the file ends in chunk {index}, before its final chunk (truncated)")]
    Truncated {
        /// The chunk it ends in.
        index: u64,
    },
    /// Bytes follow the final chunk.
    #[error("bytes follow the final chunk")]
    TrailingData,
    /// The decrypted model's SHA-256 is not the one the header names.
    #[error("the decrypted model is {actual}, the header names {expected}")]
    PlaintextDigest {
        /// The header's.
        expected: String,
        /// The decrypted bytes'.
        actual: String,
    },
    /// The output does not have the plaintext's size.
    #[error("the output holds {given} bytes, the model {expected}")]
    OutputSize {
        /// The plaintext size.
        expected: u64,
        /// The output's.
        given: u64,
    },
    /// A key of the wrong length, or a malformed HPKE key or release.
    #[error("{0}")]
    BadKey(String),
    /// A key release that does not open for this request.
    #[error("the key release does not open for this device, model and revision")]
    ReleaseOpen,
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl SealError {
    /// The reason's name, as reports and logs give it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotSealed(_) => "NotEncrypted",
            Self::WrongKey { .. } => "WrongModelKey",
            Self::ChunkAuthentication { .. } | Self::TrailingData | Self::Truncated { .. } => {
                "CiphertextTampered"
            }
            Self::PlaintextDigest { .. } => "PlaintextDigestMismatch",
            Self::OutputSize { .. } => "Internal",
            Self::BadKey(_) => "BadKey",
            Self::ReleaseOpen => "KeyReleaseInvalid",
            Self::Io(_) => "Io",
        }
    }
}

/// A model key: 32 bytes, zeroed when dropped. The agent keeps it in locked memory too.
#[derive(Clone)]
pub struct ModelKey(Zeroizing<[u8; KEY_LEN]>);

impl std::fmt::Debug for ModelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ModelKey(id {})", self.id())
    }
}

impl ModelKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, SealError> {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), k.as_mut())
            .map_err(|_| SealError::BadKey("no randomness".into()))?;
        Ok(Self(k))
    }

    /// The key in `bytes` (exactly 32).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        let k: [u8; KEY_LEN] = bytes.try_into().map_err(|_| {
            SealError::BadKey(format!(
                "a model key is {KEY_LEN} bytes, not {}",
                bytes.len()
            ))
        })?;
        Ok(Self(Zeroizing::new(k)))
    }

    /// Its bytes.
    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Its id: the first 8 bytes of a domain-separated SHA-256, in hex. It tells a
    /// wrong key from a tampered file and says nothing of the key.
    pub fn id(&self) -> String {
        let mut c = ring::digest::Context::new(&ring::digest::SHA256);
        c.update(KEY_ID_CONTEXT);
        c.update(self.0.as_ref());
        hex::encode(&c.finish().as_ref()[..8])
    }

    fn chunk_key(&self, salt: &[u8]) -> Result<LessSafeKey, SealError> {
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt).extract(self.0.as_ref());
        let okm = prk
            .expand(&[CHUNK_KEY_INFO], &AES_256_GCM)
            .map_err(|_| SealError::BadKey("HKDF".into()))?;
        Ok(LessSafeKey::new(UnboundKey::from(okm)))
    }
}

/// An encrypted model's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Header {
    /// Format version (1).
    pub version: u32,
    /// The chunk AEAD (`AES-256-GCM`).
    pub aead: String,
    /// Plaintext bytes per chunk (the last may hold fewer).
    pub chunk_size: u32,
    /// The model's size.
    pub plaintext_size: u64,
    /// The model's SHA-256 (`sha256:<hex>`).
    pub plaintext_digest: String,
    /// 32 random bytes (hex) the chunk key is derived with.
    pub salt: String,
    /// The model key's id ([`ModelKey::id`]).
    pub key_id: String,
}

impl Header {
    /// How many chunks the file holds.
    pub fn chunks(&self) -> u64 {
        self.plaintext_size
            .div_ceil(u64::from(self.chunk_size.max(1)))
            .max(1)
    }

    /// The encrypted file's size: the prefix, then every chunk with its tag.
    pub fn file_size(&self, header_len: usize) -> u64 {
        (MAGIC.len() + 4 + header_len) as u64 + self.plaintext_size + self.chunks() * TAG_LEN as u64
    }

    fn check(&self) -> Result<(), SealError> {
        let bad = |why: String| Err(SealError::NotSealed(why));
        if self.version != HEADER_VERSION {
            return bad(format!("format version {} (this reads 1)", self.version));
        }
        if self.aead != AEAD_NAME {
            return bad(format!(
                "chunk cipher {:?} (this reads {AEAD_NAME})",
                self.aead
            ));
        }
        if !CHUNK_SIZES.contains(&self.chunk_size) {
            return bad(format!("chunk size {} out of bounds", self.chunk_size));
        }
        if self.plaintext_size > MAX_PLAINTEXT {
            return bad(format!("plaintext size {} too large", self.plaintext_size));
        }
        // Lowercase only: ids and digests are compared as strings.
        let hex_of = |s: &str, n: usize| {
            s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let digest_ok = self
            .plaintext_digest
            .strip_prefix("sha256:")
            .is_some_and(|h| hex_of(h, 64));
        if !digest_ok || !hex_of(&self.salt, 64) || !hex_of(&self.key_id, 16) {
            return bad("malformed digest, salt or key id".into());
        }
        Ok(())
    }
}

/// An encrypted model being read: its header read and checked, its chunks not yet.
#[derive(Debug)]
pub struct Sealed<R> {
    header: Header,
    header_len: usize,
    header_hash: [u8; 32],
    reader: R,
}

/// Whether `prefix` (a file's first bytes) starts like an encrypted model.
pub fn is_sealed(prefix: &[u8]) -> bool {
    prefix.starts_with(MAGIC)
}

impl<R: Read> Sealed<R> {
    /// Reads and checks the header from `reader`.
    pub fn open(mut reader: R) -> Result<Self, SealError> {
        let mut prefix = [0u8; 12];
        reader
            .read_exact(&mut prefix)
            .map_err(|_| SealError::NotSealed("shorter than a header".into()))?;
        if !is_sealed(&prefix) {
            return Err(SealError::NotSealed("no EFMSEAL1 magic".into()));
        }
        let len = u32::from_be_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]);
        if len == 0 || len > MAX_HEADER_LEN {
            return Err(SealError::NotSealed(format!("header length {len}")));
        }
        let mut json = vec![0u8; len as usize];
        reader
            .read_exact(&mut json)
            .map_err(|_| SealError::NotSealed("the header is cut off".into()))?;
        let header: Header = serde_json::from_slice(&json)
            .map_err(|e| SealError::NotSealed(format!("header: {e}")))?;
        header.check()?;
        let mut c = ring::digest::Context::new(&ring::digest::SHA256);
        c.update(&prefix);
        c.update(&json);
        let mut header_hash = [0u8; 32];
        header_hash.copy_from_slice(c.finish().as_ref());
        Ok(Self {
            header,
            header_len: json.len(),
            header_hash,
            reader,
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The size of the whole file this header describes (a reader checks it against
    /// the file before sizing anything by the header).
    pub fn file_size(&self) -> u64 {
        self.header.file_size(self.header_len)
    }

    /// Decrypts every chunk into `out` (exactly the plaintext's size), checking each
    /// chunk, that none is missing or extra, and the plaintext's digest. On any error
    /// `out` is zeroed: no partial plaintext is left behind.
    pub fn decrypt_into(mut self, key: &ModelKey, out: &mut [u8]) -> Result<(), SealError> {
        let result = self.decrypt_chunks(key, out);
        if result.is_err() {
            out.zeroize();
        }
        result
    }

    fn decrypt_chunks(&mut self, key: &ModelKey, out: &mut [u8]) -> Result<(), SealError> {
        let h = &self.header;
        if out.len() as u64 != h.plaintext_size {
            return Err(SealError::OutputSize {
                expected: h.plaintext_size,
                given: out.len() as u64,
            });
        }
        if key.id() != h.key_id {
            return Err(SealError::WrongKey {
                expected: h.key_id.clone(),
                given: key.id(),
            });
        }
        let salt = hex::decode(&h.salt).map_err(|e| SealError::NotSealed(e.to_string()))?;
        let aead = key.chunk_key(&salt)?;
        let chunks = h.chunks();
        let size = h.chunk_size as usize;
        let header_hash = self.header_hash;
        let reader = &mut self.reader;
        // An empty model is one empty final chunk.
        let mut empty: [u8; 0] = [];
        // Decryption here, the plaintext's digest on another thread as each chunk is
        // done (the two take about as long; on two cores they overlap).
        let digest = std::thread::scope(|scope| -> Result<ring::digest::Digest, SealError> {
            let (done, finished) = std::sync::mpsc::sync_channel::<&[u8]>(16);
            let hasher = scope.spawn(move || {
                let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
                for part in finished {
                    digest.update(part);
                }
                digest.finish()
            });
            let parts: Box<dyn Iterator<Item = &mut [u8]>> = if out.is_empty() {
                Box::new(std::iter::once(&mut empty[..]))
            } else {
                Box::new(out.chunks_mut(size))
            };
            for (index, part) in (0u64..).zip(parts) {
                read_full(reader, part, index)?;
                let mut tag = [0u8; TAG_LEN];
                read_full(reader, &mut tag, index)?;
                let last = index + 1 == chunks;
                aead.open_in_place_separate_tag(
                    nonce(index),
                    Aad::from(aad(&header_hash, index, last)),
                    Tag::from(tag),
                    part,
                    0..,
                )
                .map_err(|_| SealError::ChunkAuthentication { index })?;
                if done.send(part).is_err() {
                    return Err(SealError::BadKey("the digest thread ended".into()));
                }
            }
            drop(done);
            hasher
                .join()
                .map_err(|_| SealError::BadKey("the digest thread failed".into()))
        })?;
        let mut extra = [0u8; 1];
        if self.reader.read(&mut extra)? != 0 {
            return Err(SealError::TrailingData);
        }
        let actual = format!("sha256:{}", hex::encode(digest.as_ref()));
        if actual != h.plaintext_digest {
            return Err(SealError::PlaintextDigest {
                expected: h.plaintext_digest.clone(),
                actual,
            });
        }
        Ok(())
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8], index: u64) -> Result<(), SealError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => SealError::Truncated { index },
        _ => SealError::Io(e),
    })
}

fn nonce(index: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&index.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aad(header_hash: &[u8; 32], index: u64, last: bool) -> [u8; 41] {
    let mut a = [0u8; 41];
    a[..32].copy_from_slice(header_hash);
    a[32..40].copy_from_slice(&index.to_be_bytes());
    a[40] = u8::from(last);
    a
}

/// Encrypts `plaintext_size` bytes read from `input`, whose SHA-256 is
/// `plaintext_digest` (`sha256:<hex>`, known beforehand: it goes into the header), with
/// `key` in chunks of `chunk_size`, writing the encrypted model to `out`. The digest is
/// checked as the bytes go by; a mismatch fails (and what was written is garbage).
pub fn encrypt(
    mut input: impl Read,
    plaintext_size: u64,
    plaintext_digest: &str,
    key: &ModelKey,
    chunk_size: u32,
    out: &mut impl std::io::Write,
) -> Result<Header, SealError> {
    let mut salt = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| SealError::BadKey("no randomness".into()))?;
    let header = Header {
        version: HEADER_VERSION,
        aead: AEAD_NAME.into(),
        chunk_size,
        plaintext_size,
        plaintext_digest: plaintext_digest.to_owned(),
        salt: hex::encode(salt),
        key_id: key.id(),
    };
    header.check()?;
    let json = serde_json::to_vec(&header).map_err(|e| SealError::NotSealed(e.to_string()))?;
    let mut prefix = Vec::with_capacity(12 + json.len());
    prefix.extend_from_slice(MAGIC);
    prefix.extend_from_slice(&(json.len() as u32).to_be_bytes());
    prefix.extend_from_slice(&json);
    out.write_all(&prefix)?;
    let header_hash: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, &prefix)
        .as_ref()
        .try_into()
        .map_err(|_| SealError::BadKey("digest length".into()))?;
    let aead = key.chunk_key(&salt)?;
    let chunks = header.chunks();
    let mut buf = vec![0u8; chunk_size as usize];
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut left = plaintext_size;
    for index in 0..chunks {
        let n = left.min(u64::from(chunk_size)) as usize;
        let part = &mut buf[..n];
        read_full(&mut input, part, index)?;
        digest.update(part);
        let last = index + 1 == chunks;
        let tag = aead
            .seal_in_place_separate_tag(
                nonce(index),
                Aad::from(aad(&header_hash, index, last)),
                part,
            )
            .map_err(|_| SealError::BadKey("sealing failed".into()))?;
        out.write_all(part)?;
        out.write_all(tag.as_ref())?;
        left -= n as u64;
    }
    buf.zeroize();
    let actual = format!("sha256:{}", hex::encode(digest.finish().as_ref()));
    if actual != plaintext_digest {
        return Err(SealError::PlaintextDigest {
            expected: plaintext_digest.to_owned(),
            actual,
        });
    }
    Ok(header)
}

/// The SHA-256 of the file at `path`, as `sha256:<hex>`.
pub fn file_digest(path: &std::path::Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut c = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        c.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(c.finish().as_ref())))
}

/// What a key release is for: the device, the model (`namespace/name`), its revision and
/// the encrypted artifact's digest. The HPKE `info` and the request's signature cover
/// all four.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseFor<'a> {
    /// The device.
    pub device: &'a str,
    /// The model, `namespace/name`.
    pub model: &'a str,
    /// The revision.
    pub revision: &'a str,
    /// The encrypted artifact's digest (`sha256:<hex>`).
    pub digest: &'a str,
}

impl ReleaseFor<'_> {
    fn encode(&self, context: &[u8], extra: &[u8]) -> Vec<u8> {
        let mut v = context.to_vec();
        for f in [
            self.device.as_bytes(),
            self.model.as_bytes(),
            self.revision.as_bytes(),
            self.digest.as_bytes(),
            extra,
        ] {
            v.extend_from_slice(&(f.len() as u64).to_be_bytes());
            v.extend_from_slice(f);
        }
        v
    }
}

/// What a device signs, with the key its attestation bound (its certified key), to ask
/// for a model key sealed to `recipient` (its one-request HPKE public key).
pub fn key_request_message(what: &ReleaseFor<'_>, recipient: &[u8]) -> Vec<u8> {
    what.encode(REQUEST_CONTEXT, recipient)
}

/// A device's one-request HPKE key pair (X25519), held in memory only.
pub struct Recipient {
    secret: <Kem as hpke::Kem>::PrivateKey,
    public: <Kem as hpke::Kem>::PublicKey,
}

impl std::fmt::Debug for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recipient").finish_non_exhaustive()
    }
}

impl Recipient {
    /// A fresh key pair.
    pub fn generate() -> Self {
        let (secret, public) = Kem::gen_keypair();
        Self { secret, public }
    }

    /// The public key (32 bytes) to send with the request.
    pub fn public_key(&self) -> Vec<u8> {
        self.public.to_bytes().to_vec()
    }

    /// Opens a release ([`release`]) made for `what`.
    pub fn open(
        &self,
        what: &ReleaseFor<'_>,
        encapsulated: &[u8],
        wrapped: &[u8],
    ) -> Result<ModelKey, SealError> {
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(encapsulated)
            .map_err(|e| SealError::BadKey(format!("encapsulated key: {e}")))?;
        let mut key = hpke::single_shot_open::<HpkeAead, HpkeKdf, Kem>(
            &hpke::OpModeR::Base,
            &self.secret,
            &enc,
            &what.encode(RELEASE_INFO, &[]),
            wrapped,
            &[],
        )
        .map_err(|_| SealError::ReleaseOpen)?;
        let k = ModelKey::from_bytes(&key);
        key.zeroize();
        k
    }
}

/// Seals `key` to `recipient` (a device's 32-byte X25519 public key) for `what`:
/// (encapsulated key, wrapped key).
pub fn release(
    recipient: &[u8],
    what: &ReleaseFor<'_>,
    key: &ModelKey,
) -> Result<(Vec<u8>, Vec<u8>), SealError> {
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(recipient)
        .map_err(|e| SealError::BadKey(format!("recipient key: {e}")))?;
    let (enc, wrapped) = hpke::single_shot_seal::<HpkeAead, HpkeKdf, Kem>(
        &hpke::OpModeS::Base,
        &pk,
        &what.encode(RELEASE_INFO, &[]),
        key.bytes(),
        &[],
    )
    .map_err(|e| SealError::BadKey(format!("sealing the key: {e}")))?;
    Ok((enc.to_bytes().to_vec(), wrapped))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

    use super::*;

    fn sealed(plain: &[u8], key: &ModelKey, chunk: u32) -> Vec<u8> {
        let digest = format!(
            "sha256:{}",
            hex::encode(ring::digest::digest(&ring::digest::SHA256, plain))
        );
        let mut out = Vec::new();
        encrypt(plain, plain.len() as u64, &digest, key, chunk, &mut out).unwrap();
        out
    }

    fn open(file: &[u8], key: &ModelKey) -> Result<Vec<u8>, SealError> {
        let s = Sealed::open(file)?;
        let mut out = vec![0u8; s.header().plaintext_size as usize];
        s.decrypt_into(key, &mut out)?;
        Ok(out)
    }

    fn plain(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn a_model_round_trips_in_chunks_and_the_file_has_its_computed_size() {
        let key = ModelKey::generate().unwrap();
        for n in [0, 1, 4095, 4096, 4097, 3 * 4096, 10_000] {
            let p = plain(n);
            let f = sealed(&p, &key, 4096);
            let s = Sealed::open(f.as_slice()).unwrap();
            let header_len =
                f.len() as u64 - s.header().plaintext_size - s.header().chunks() * 16 - 12;
            assert_eq!(s.header().file_size(header_len as usize), f.len() as u64);
            assert_eq!(s.header().chunks(), (n as u64).div_ceil(4096).max(1));
            assert_eq!(open(&f, &key).unwrap(), p, "{n} bytes");
            // The plaintext appears nowhere in the file.
            if n >= 64 {
                assert!(!f.windows(64).any(|w| w == &p[..64]));
            }
        }
    }

    /// The offset of chunk `i` (of `chunk` plaintext bytes) in `f`.
    fn chunk_at(f: &[u8], i: usize, chunk: usize) -> usize {
        let len = u32::from_be_bytes(f[8..12].try_into().unwrap()) as usize;
        12 + len + i * (chunk + TAG_LEN)
    }

    #[test]
    fn tampered_reordered_dropped_cut_or_extended_files_are_refused_by_name() {
        let key = ModelKey::generate().unwrap();
        let p = plain(3 * 4096 + 100);
        let f = sealed(&p, &key, 4096);
        let c = 4096 + TAG_LEN;
        let (c0, c1, c2) = (
            chunk_at(&f, 0, 4096),
            chunk_at(&f, 1, 4096),
            chunk_at(&f, 2, 4096),
        );
        // One flipped byte in a chunk, or in a tag.
        for at in [c1 + 7, c1 + 4096 + 3] {
            let mut t = f.clone();
            t[at] ^= 1;
            let e = open(&t, &key).unwrap_err();
            assert!(
                matches!(e, SealError::ChunkAuthentication { index: 1 }),
                "{e}"
            );
            assert_eq!(e.reason(), "CiphertextTampered");
        }
        // Two chunks swapped.
        let mut t = f.clone();
        let (a, b) = (f[c0..c0 + c].to_vec(), f[c1..c1 + c].to_vec());
        t[c0..c0 + c].copy_from_slice(&b);
        t[c1..c1 + c].copy_from_slice(&a);
        assert!(matches!(
            open(&t, &key).unwrap_err(),
            SealError::ChunkAuthentication { index: 0 }
        ));
        // A chunk dropped: the next takes its place and fails there.
        let mut t = f[..c1].to_vec();
        t.extend_from_slice(&f[c2..]);
        assert!(matches!(
            open(&t, &key).unwrap_err(),
            SealError::ChunkAuthentication { index: 1 } | SealError::Truncated { .. }
        ));
        // Cut at a chunk boundary, before the final chunk: truncated, not accepted as
        // a shorter model.
        let t = &f[..chunk_at(&f, 3, 4096)];
        assert!(matches!(
            open(t, &key).unwrap_err(),
            SealError::Truncated { index: 3 }
        ));
        // A non-final chunk cannot end the file: a header claiming fewer bytes fails
        // its hash in every chunk, and bytes after the final chunk are refused.
        let mut t = f.clone();
        t.push(0);
        assert!(matches!(
            open(&t, &key).unwrap_err(),
            SealError::TrailingData
        ));
        // The header's plaintext digest, changed: it is bound into every chunk.
        let mut t = f.clone();
        let at = t.windows(7).position(|w| w == b"sha256:").unwrap() + 7;
        t[at] = if t[at] == b'0' { b'1' } else { b'0' };
        assert!(matches!(
            open(&t, &key).unwrap_err(),
            SealError::ChunkAuthentication { index: 0 }
        ));
        // A chunk from another file under the same key: its salt differs.
        let g = sealed(&p, &key, 4096);
        let mut t = f.clone();
        t[c2..c2 + c].copy_from_slice(&g[c2..c2 + c]);
        assert!(matches!(
            open(&t, &key).unwrap_err(),
            SealError::ChunkAuthentication { index: 2 }
        ));
    }

    #[test]
    fn a_wrong_key_is_named_and_leaves_no_plaintext() {
        let key = ModelKey::generate().unwrap();
        let other = ModelKey::generate().unwrap();
        let f = sealed(&plain(9000), &key, 4096);
        let e = open(&f, &other).unwrap_err();
        assert!(matches!(e, SealError::WrongKey { .. }), "{e}");
        assert_eq!(e.reason(), "WrongModelKey");
        // A failure midway zeroes what was decrypted so far.
        let mut t = f.clone();
        let c2 = chunk_at(&f, 2, 4096);
        t[c2] ^= 1;
        let s = Sealed::open(t.as_slice()).unwrap();
        let mut out = vec![0u8; 9000];
        assert!(s.decrypt_into(&key, &mut out).is_err());
        assert!(out.iter().all(|b| *b == 0));
    }

    #[test]
    fn what_is_not_an_encrypted_model_is_refused_before_any_work() {
        for (bytes, why) in [
            (
                b"GGUF\x03\0\0\0\0\0\0\0\0\0\0\0".to_vec(),
                "no EFMSEAL1 magic",
            ),
            (b"EFMS".to_vec(), "shorter than a header"),
            (
                [MAGIC.as_slice(), &0u32.to_be_bytes()].concat(),
                "header length 0",
            ),
            (
                [MAGIC.as_slice(), &5000u32.to_be_bytes()].concat(),
                "header length 5000",
            ),
            (
                [MAGIC.as_slice(), &4u32.to_be_bytes(), b"{}"].concat(),
                "cut off",
            ),
            (
                [MAGIC.as_slice(), &2u32.to_be_bytes(), b"{}"].concat(),
                "header: missing field",
            ),
        ] {
            let e = Sealed::open(bytes.as_slice()).unwrap_err();
            assert!(matches!(e, SealError::NotSealed(_)), "{e}");
            assert!(e.to_string().contains(why), "{e} lacks {why:?}");
            assert_eq!(e.reason(), "NotEncrypted");
        }
        // Out-of-bounds header values.
        let key = ModelKey::generate().unwrap();
        let f = sealed(&plain(10), &key, 4096);
        let text = String::from_utf8_lossy(&f[12..]).into_owned();
        let json = &text[..text.find('}').unwrap() + 1];
        for (from, to) in [
            ("\"chunkSize\":4096", "\"chunkSize\":16"),
            ("\"version\":1", "\"version\":2"),
        ] {
            let bad = json.replace(from, to);
            let t = [
                MAGIC.as_slice(),
                &(bad.len() as u32).to_be_bytes(),
                bad.as_bytes(),
            ]
            .concat();
            assert!(matches!(
                Sealed::open(t.as_slice()).unwrap_err(),
                SealError::NotSealed(_)
            ));
        }
    }

    #[test]
    fn encrypting_checks_the_digest_it_was_told() {
        let key = ModelKey::generate().unwrap();
        let p = plain(100);
        let wrong = format!("sha256:{}", "00".repeat(32));
        let e = encrypt(p.as_slice(), 100, &wrong, &key, 4096, &mut Vec::new()).unwrap_err();
        assert!(matches!(e, SealError::PlaintextDigest { .. }), "{e}");
        // Fewer bytes than announced.
        let digest = format!(
            "sha256:{}",
            hex::encode(ring::digest::digest(&ring::digest::SHA256, &p))
        );
        let e = encrypt(&p[..50], 100, &digest, &key, 4096, &mut Vec::new()).unwrap_err();
        assert!(matches!(e, SealError::Truncated { .. }), "{e}");
    }

    #[test]
    fn a_release_opens_only_for_what_it_was_made_for() {
        let key = ModelKey::generate().unwrap();
        let r = Recipient::generate();
        let what = ReleaseFor {
            device: "dev-1",
            model: "ns/m",
            revision: "r1",
            digest: "sha256:ab",
        };
        let (enc, wrapped) = release(&r.public_key(), &what, &key).unwrap();
        assert_eq!(r.open(&what, &enc, &wrapped).unwrap().bytes(), key.bytes());
        // Another device, model, revision or artifact: it does not open.
        for other in [
            ReleaseFor {
                device: "dev-2",
                ..what.clone()
            },
            ReleaseFor {
                model: "ns/n",
                ..what.clone()
            },
            ReleaseFor {
                revision: "r2",
                ..what.clone()
            },
            ReleaseFor {
                digest: "sha256:cd",
                ..what.clone()
            },
        ] {
            assert!(matches!(
                r.open(&other, &enc, &wrapped),
                Err(SealError::ReleaseOpen)
            ));
        }
        // Nor for another recipient, nor with a flipped byte.
        let eve = Recipient::generate();
        assert!(matches!(
            eve.open(&what, &enc, &wrapped),
            Err(SealError::ReleaseOpen)
        ));
        let mut t = wrapped.clone();
        t[0] ^= 1;
        assert!(matches!(
            r.open(&what, &enc, &t),
            Err(SealError::ReleaseOpen)
        ));
        // Malformed keys are named.
        assert!(matches!(
            release(&[1, 2, 3], &what, &key),
            Err(SealError::BadKey(_))
        ));
        assert!(matches!(
            r.open(&what, &[1], &wrapped),
            Err(SealError::BadKey(_))
        ));
        assert!(matches!(
            ModelKey::from_bytes(&[0; 31]),
            Err(SealError::BadKey(_))
        ));
        // The request message separates its fields.
        assert_ne!(
            key_request_message(&what, b"k"),
            key_request_message(
                &ReleaseFor {
                    device: "dev-1n",
                    model: "s/m",
                    ..what.clone()
                },
                b"k"
            )
        );
    }
}
