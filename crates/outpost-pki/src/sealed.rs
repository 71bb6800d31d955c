//! The CA private key sealed under a secret, so that it can sit at rest on disk (and later in a
//! database shared by several hub replicas) without giving the fleet away.
//!
//! Format: one line of text,
//!
//! ```text
//! outpost-sealed-v1:argon2id:<m KiB>:<t>:<p>:<salt, base64>:<nonce, base64>:<ciphertext+tag, base64>
//! ```
//!
//! The 256-bit key is derived from the secret with Argon2id (the parameters and a random 16-byte
//! salt are in the envelope, so they can be raised later without breaking old envelopes); the
//! PEM text is encrypted with ChaCha20-Poly1305 (ring) under a random 12-byte nonce, with the
//! header `outpost-sealed-v1` as associated data. A wrong secret, or any change to the
//! envelope, fails the tag check: [`SealError::WrongSecret`]. Each sealing draws a new salt and
//! nonce. Pure: no file I/O (the hub reads and writes the file).

use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

const HEADER: &str = "outpost-sealed-v1";
const SALT_LEN: usize = 16;
/// Argon2id cost: 19 MiB, 2 passes, 1 lane (OWASP's minimum for Argon2id); about 30-60 ms on
/// an edge-class core, paid once per hub start and per rotation.
const M_KIB: u32 = 19 * 1024;
const T_COST: u32 = 2;
const P_COST: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The secret is empty.
    #[error("the secret is empty; give a non-empty secret (e.g. `openssl rand -hex 32`)")]
    EmptySecret,
    /// Decryption failed: the secret is not the one the key was sealed with (or the envelope
    /// was altered).
    #[error("the secret does not open the sealed key (wrong secret, or the file was altered)")]
    WrongSecret,
    /// The text is not a sealed key this version can read.
    #[error("not a sealed key: {0}")]
    Corrupt(String),
    #[error("key derivation failed: {0}")]
    Kdf(String),
    #[error("no system randomness: {0}")]
    Random(String),
}

/// Whether `text` is a sealed envelope (as opposed to a plain PEM key).
pub fn is_sealed(text: &str) -> bool {
    text.trim_start().starts_with(HEADER)
}

fn derive(secret: &[u8], salt: &[u8], m: u32, t: u32, p: u32) -> Result<LessSafeKey, SealError> {
    if secret.is_empty() {
        return Err(SealError::EmptySecret);
    }
    let params = Params::new(m, t, p, Some(32)).map_err(|e| SealError::Kdf(e.to_string()))?;
    let mut key = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(secret, salt, &mut key)
        .map_err(|e| SealError::Kdf(e.to_string()))?;
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key).map_err(|_| SealError::Kdf("bad key length".into()))?;
    key.fill(0);
    Ok(LessSafeKey::new(unbound))
}

/// Seal `plain` (a PEM key) under `secret`.
pub fn seal(plain: &str, secret: &[u8]) -> Result<String, SealError> {
    let rng = SystemRandom::new();
    let mut salt = [0u8; SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut salt).map_err(|e| SealError::Random(e.to_string()))?;
    rng.fill(&mut nonce).map_err(|e| SealError::Random(e.to_string()))?;
    let key = derive(secret, &salt, M_KIB, T_COST, P_COST)?;
    let mut data = plain.as_bytes().to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(HEADER.as_bytes()),
        &mut data,
    )
    .map_err(|_| SealError::Kdf("encryption failed".into()))?;
    Ok(format!(
        "{HEADER}:argon2id:{M_KIB}:{T_COST}:{P_COST}:{}:{}:{}\n",
        B64.encode(salt),
        B64.encode(nonce),
        B64.encode(&data)
    ))
}

/// Open a sealed envelope with `secret`; returns the PEM key.
pub fn open(sealed: &str, secret: &[u8]) -> Result<String, SealError> {
    let parts: Vec<&str> = sealed.trim().split(':').collect();
    let [header, kdf, m, t, p, salt, nonce, data] = parts[..] else {
        return Err(SealError::Corrupt(format!("expected 8 fields, found {}", parts.len())));
    };
    if header != HEADER {
        return Err(SealError::Corrupt(format!("unknown header {header:?}")));
    }
    if kdf != "argon2id" {
        return Err(SealError::Corrupt(format!("unknown key derivation {kdf:?}")));
    }
    let num = |what: &str, v: &str| {
        v.parse::<u32>()
            .map_err(|_| SealError::Corrupt(format!("{what} {v:?} is not a number")))
    };
    let (m, t, p) = (num("memory", m)?, num("passes", t)?, num("lanes", p)?);
    // Bounds, so a crafted envelope cannot make the hub allocate gigabytes.
    if m > 1024 * 1024 || t > 64 || p > 16 {
        return Err(SealError::Corrupt("key derivation cost out of range".into()));
    }
    let b64 = |what: &str, v: &str| B64.decode(v).map_err(|e| SealError::Corrupt(format!("{what}: {e}")));
    let salt = b64("salt", salt)?;
    let nonce: [u8; NONCE_LEN] = b64("nonce", nonce)?
        .try_into()
        .map_err(|_| SealError::Corrupt("nonce has the wrong length".into()))?;
    let mut data = b64("data", data)?;
    let key = derive(secret, &salt, m, t, p)?;
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(HEADER.as_bytes()),
            &mut data,
        )
        .map_err(|_| SealError::WrongSecret)?;
    String::from_utf8(plain.to_vec()).map_err(|_| SealError::Corrupt("the sealed key is not text".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n";

    #[test]
    fn seals_and_opens_and_hides_the_key() {
        let s = seal(PEM, b"s3cret").unwrap();
        assert!(is_sealed(&s));
        assert!(!is_sealed(PEM));
        assert!(!s.contains("PRIVATE KEY") && !s.contains("abc"), "{s}");
        assert_eq!(open(&s, b"s3cret").unwrap(), PEM);
        // a new salt and nonce each time
        assert_ne!(seal(PEM, b"s3cret").unwrap(), s);
    }

    #[test]
    fn wrong_secret_altered_envelope_and_bad_input_are_refused() {
        let s = seal(PEM, b"right").unwrap();
        assert!(matches!(open(&s, b"wrong"), Err(SealError::WrongSecret)));
        assert!(matches!(open(&s, b""), Err(SealError::EmptySecret)));
        assert!(matches!(seal(PEM, b""), Err(SealError::EmptySecret)));
        // flip one character of the ciphertext
        let mut fields: Vec<String> = s.trim().split(':').map(String::from).collect();
        let last = fields.last_mut().unwrap();
        let c = if last.starts_with('A') { "B" } else { "A" };
        last.replace_range(0..1, c);
        assert!(matches!(open(&fields.join(":"), b"right"), Err(SealError::WrongSecret)));
        for bad in [
            "",
            "outpost-sealed-v1:argon2id:1",
            "outpost-sealed-v2:argon2id:1:1:1:AA==:AA==:AA==",
            "outpost-sealed-v1:scrypt:1:1:1:AA==:AA==:AA==",
            "outpost-sealed-v1:argon2id:99999999:1:1:AA==:AA==:AA==",
            "outpost-sealed-v1:argon2id:x:1:1:AA==:AA==:AA==",
            "outpost-sealed-v1:argon2id:19456:2:1:AA==:AA==:AA==",
        ] {
            assert!(matches!(open(bad, b"k"), Err(SealError::Corrupt(_))), "{bad}");
        }
    }
}
