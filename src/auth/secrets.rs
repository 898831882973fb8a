//! Secrets and their stored forms: device tokens, session tokens, enrolment codes and
//! password hashes. Owns the formats and the hashing; randomness comes in as a parameter (the
//! caller reads the OS generator), so this stays pure and testable. Must not store, log or
//! display a secret: only [`SecretHash`]es and argon2 PHC strings leave this module for disk.

use std::fmt;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};

/// Prefix of device tokens (`fsd_` + 64 hex digits = 256 random bits).
pub const DEVICE_TOKEN_PREFIX: &str = "fsd_";
/// Prefix of staff session tokens (the cookie value).
pub const SESSION_TOKEN_PREFIX: &str = "fss_";

/// A bearer secret handed to a client exactly once. `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn device_token(random: [u8; 32]) -> Self {
        Self(format!("{DEVICE_TOKEN_PREFIX}{}", hex::encode(random)))
    }

    pub fn session_token(random: [u8; 32]) -> Self {
        Self(format!("{SESSION_TOKEN_PREFIX}{}", hex::encode(random)))
    }

    /// What the client sends back; also for cookies and JSON answers.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> SecretHash {
        SecretHash::of(&self.0)
    }
}

/// The CSRF token of a session, derived from the session token so it is never stored: the
/// page echoes it in `X-CSRF-Token`; a forged cross-site request cannot read it.
pub fn csrf_token(session_token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"fieldsync csrf v1\0");
    h.update(session_token.as_bytes());
    hex::encode(&h.finalize()[..16])
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// SHA-256 of a high-entropy secret, hex-encoded: what the store keeps. (Tokens carry 256
/// random bits, so a fast hash is enough; passwords use argon2.)
#[derive(Clone, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
pub struct SecretHash(String);

impl SecretHash {
    pub fn of(secret: &str) -> Self {
        Self(hex::encode(Sha256::digest(secret.as_bytes())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Crockford base32: no I, L, O, U, so codes read aloud or typed from paper survive.
const CODE_ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A one-time enrolment code, `XXXX-XXXX-XXXX` (60 random bits). Short enough to type on a
/// phone; it expires in minutes and works once, so its entropy only has to outlast guessing
/// through the (throttled) enrolment endpoint.
pub fn enrolment_code(random: [u8; 8]) -> Secret {
    let mut n = u64::from_be_bytes(random);
    let mut chars = Vec::with_capacity(14);
    for i in 0..12 {
        if i > 0 && i % 4 == 0 {
            chars.push(b'-');
        }
        chars.push(CODE_ALPHABET[(n & 31) as usize]);
        n >>= 5;
    }
    Secret(String::from_utf8(chars).expect("alphabet is ASCII"))
}

/// The canonical form of a typed enrolment code: upper case, without separators, with the
/// letters people confuse mapped to digits. Hash this, not the raw input.
pub fn normalise_code(typed: &str) -> String {
    typed
        .chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .map(|c| match c.to_ascii_uppercase() {
            'O' => '0',
            'I' | 'L' => '1',
            other => other,
        })
        .collect()
}

/// Why a password was not accepted for storage.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PasswordError {
    #[error("the password is shorter than {MIN_PASSWORD_CHARS} characters")]
    TooShort,
    #[error("the password could not be hashed: {0}")]
    Hash(String),
}

pub const MIN_PASSWORD_CHARS: usize = 10;

/// An argon2id PHC string (`$argon2id$v=19$...`) for storage. The salt comes from the caller.
pub fn hash_password(password: &str, salt: [u8; 16]) -> Result<String, PasswordError> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(PasswordError::TooShort);
    }
    let salt = SaltString::encode_b64(&salt).map_err(|e| PasswordError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

/// Whether `password` matches a stored PHC string. A malformed stored hash never matches.
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// argon2's working memory (about 19 MiB with the default parameters), kept by a thread that
/// checks many passwords: allocating it for every check makes the allocator keep a growing
/// pile of freed 19 MiB buffers (measured: +19 MiB per check up to about 200 MiB per thread).
#[derive(Default)]
pub struct PasswordMemory(Vec<argon2::Block>);

/// Like [`verify_password`], computing in `memory` instead of allocating.
pub fn verify_password_in(password: &str, phc: &str, memory: &mut PasswordMemory) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let Ok(params) = argon2::Params::try_from(&parsed) else {
        return false;
    };
    let Ok(algorithm) = argon2::Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    let version = match parsed.version.map(argon2::Version::try_from) {
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
        None => argon2::Version::default(),
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let blocks = params.block_count();
    if memory.0.len() != blocks {
        memory.0 = vec![argon2::Block::default(); blocks];
    }
    let expected = expected.as_bytes();
    let mut out = vec![0u8; expected.len()];
    let ok = Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut memory.0[..])
        .is_ok();
    ok && out.len() == expected.len()
        && out
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_carry_256_bits_and_debug_hides_them() {
        let t = Secret::device_token([7; 32]);
        assert!(t.expose().starts_with("fsd_"));
        assert_eq!(t.expose().len(), 4 + 64);
        assert_eq!(format!("{t:?}"), "Secret(<redacted>)");
        assert_ne!(t.hash().as_str(), t.expose());
        assert_eq!(t.hash(), SecretHash::of(t.expose()));
    }

    #[test]
    fn enrolment_codes_survive_sloppy_typing() {
        let code = enrolment_code([0xA5; 8]);
        let shown = code.expose();
        assert_eq!(shown.len(), 14);
        assert_eq!(shown.matches('-').count(), 2);
        let typed = shown.to_lowercase().replace('-', " ");
        assert_eq!(normalise_code(&typed), normalise_code(shown));
        assert_eq!(normalise_code("o1l-I"), "0111");
    }

    #[test]
    fn passwords_are_hashed_with_argon2_and_verified() {
        let phc = hash_password("correct horse battery", [1; 16]).unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(!phc.contains("correct horse"));
        assert!(verify_password("correct horse battery", &phc));
        assert!(!verify_password("wrong horse battery", &phc));
        assert!(!verify_password("anything", "not a hash"));
        // The memory-reusing check agrees, with one buffer for many checks.
        let mut memory = PasswordMemory::default();
        for _ in 0..3 {
            assert!(verify_password_in(
                "correct horse battery",
                &phc,
                &mut memory
            ));
            assert!(!verify_password_in(
                "wrong horse battery",
                &phc,
                &mut memory
            ));
        }
        assert!(!verify_password_in("anything", "not a hash", &mut memory));
        assert_eq!(
            hash_password("short", [1; 16]).unwrap_err(),
            PasswordError::TooShort
        );
    }
}
