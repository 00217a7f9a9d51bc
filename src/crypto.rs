//! Secrets at rest and the random tokens in URLs.
//!
//! Rule: every secret a tenant gives us (Exotel token, webhook secret, CRM tokens) is stored
//! only as [`Sealer::seal`] output (AES-256-GCM, random 96-bit nonce, `v1:` version prefix);
//! every bearer-style token we hand out (API keys, callback tokens) is stored only as its
//! SHA-256, so a leaked database cannot be replayed against us.

use std::path::Path;

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, AeadCore, OsRng},
};
use anyhow::{Context, bail};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Seals and opens secrets with the master key.
#[derive(Clone)]
pub struct Sealer {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(***)")
    }
}

const PREFIX: &str = "v1:";

impl Sealer {
    /// A sealer from a base64 (standard or URL-safe) 32-byte key.
    ///
    /// # Errors
    /// The key is not base64 or not 32 bytes.
    pub fn from_base64(key: &str) -> anyhow::Result<Self> {
        let key = key.trim();
        let bytes = STANDARD
            .decode(key)
            .or_else(|_| URL_SAFE_NO_PAD.decode(key))
            .context("master key is not base64")?;
        if bytes.len() != 32 {
            bail!("master key must be 32 bytes, got {}", bytes.len());
        }
        let cipher = Aes256Gcm::new_from_slice(&bytes).context("master key")?;
        Ok(Self { cipher })
    }

    /// Read the key file, or create one (mode 0600) holding a fresh random key.
    /// Returns the sealer and whether the file was created.
    ///
    /// # Errors
    /// The file cannot be read or written, or holds a bad key.
    pub fn from_key_file(path: &Path) -> anyhow::Result<(Self, bool)> {
        if path.exists() {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading key file {}", path.display()))?;
            return Ok((Self::from_base64(&text)?, false));
        }
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        let encoded = STANDARD.encode(key);
        write_private(path, &encoded)
            .with_context(|| format!("creating key file {}", path.display()))?;
        Ok((Self::from_base64(&encoded)?, true))
    }

    /// Encrypt `plaintext`.
    #[must_use]
    pub fn seal(&self, plaintext: &str) -> String {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        // Encryption with a valid key and nonce cannot fail for in-memory buffers.
        let ct = self
            .cipher
            .encrypt(&nonce, plaintext.as_bytes())
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        format!("{PREFIX}{}", STANDARD.encode(out))
    }

    /// Decrypt a value produced by [`Sealer::seal`].
    ///
    /// # Errors
    /// Wrong key, tampered or malformed value.
    pub fn open(&self, sealed: &str) -> anyhow::Result<String> {
        let body = sealed
            .strip_prefix(PREFIX)
            .context("sealed value has an unknown version")?;
        let raw = STANDARD
            .decode(body)
            .context("sealed value is not base64")?;
        if raw.len() < 12 + 16 {
            bail!("sealed value is too short");
        }
        let (nonce, ct) = raw.split_at(12);
        let pt = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), ct)
            .map_err(|_| anyhow::anyhow!("sealed value does not open with this master key"))?;
        String::from_utf8(pt).context("sealed value is not UTF-8")
    }
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

/// A URL-safe random token with `bytes` bytes of entropy, prefixed for recognisability.
#[must_use]
pub fn random_token(prefix: &str, bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(buf))
}

/// A Standard Webhooks signing secret: `whsec_` + base64 of 32 random bytes.
#[must_use]
pub fn webhook_secret() -> String {
    let mut buf = [0u8; 32];
    rand::rng().fill_bytes(&mut buf);
    format!("whsec_{}", STANDARD.encode(buf))
}

/// Hex SHA-256 of a token, the only form in which tokens are stored.
#[must_use]
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The last four characters, for showing a secret without revealing it.
#[must_use]
pub fn last4(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    let start = chars.len().saturating_sub(4);
    chars[start..].iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::from_base64(&STANDARD.encode([7u8; 32])).unwrap()
    }

    #[test]
    fn sealed_values_open_and_hide_the_plaintext() {
        let s = sealer();
        let sealed = s.seal("exotel-token-123");
        assert!(!sealed.contains("exotel-token-123"));
        assert_ne!(sealed, s.seal("exotel-token-123"), "nonces differ");
        assert_eq!(s.open(&sealed).unwrap(), "exotel-token-123");
    }

    #[test]
    fn another_key_or_tampering_is_refused() {
        let sealed = sealer().seal("x");
        let other = Sealer::from_base64(&STANDARD.encode([8u8; 32])).unwrap();
        assert!(other.open(&sealed).is_err());
        let mut bad = sealed.clone();
        bad.pop();
        bad.push('A');
        assert!(sealer().open(&bad).is_err());
        assert!(sealer().open("garbage").is_err());
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(Sealer::from_base64(&STANDARD.encode([1u8; 16])).is_err());
    }

    #[test]
    fn tokens_are_long_and_distinct() {
        let a = random_token("ct_", 16);
        assert!(a.len() >= 3 + 22);
        assert_ne!(a, random_token("ct_", 16));
        assert_eq!(last4("abcdef"), "cdef");
        assert_eq!(last4("ab"), "ab");
    }
}
