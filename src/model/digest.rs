//! Content digests (`algorithm:encoded`), checked when built, and the hashing that verifies a
//! body against the digest it claims.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256, Sha512};

/// A content digest as the OCI image spec defines it.
///
/// `sha256` and `sha512` digests must be lowercase hex of the right length; other algorithms
/// only need to match the general grammar, and cannot be verified (see [`Digest::verify`]).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

/// Why a string is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// There is no `:` between algorithm and encoded part.
    #[error("digest {0:?} has no algorithm prefix (expected sha256:<64 hex>)")]
    NoAlgorithm(String),
    /// The algorithm or encoded part breaks the grammar, or a known algorithm's length.
    #[error("digest {0:?} is malformed: {1}")]
    Malformed(String, &'static str),
}

impl Digest {
    /// Parses and checks a digest.
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let Some((alg, enc)) = s.split_once(':') else {
            return Err(DigestError::NoAlgorithm(s.to_string()));
        };
        let alg_ok = !alg.is_empty()
            && alg.split(['+', '.', '_', '-']).all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            });
        if !alg_ok {
            return Err(DigestError::Malformed(s.to_string(), "bad algorithm"));
        }
        let enc_ok = !enc.is_empty()
            && enc
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'));
        if !enc_ok {
            return Err(DigestError::Malformed(s.to_string(), "bad encoded part"));
        }
        let hex_len = match alg {
            "sha256" => Some(64),
            "sha512" => Some(128),
            _ => None,
        };
        if let Some(len) = hex_len {
            let lower_hex = enc
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if enc.len() != len || !lower_hex {
                return Err(DigestError::Malformed(
                    s.to_string(),
                    "wrong length or not lower hex",
                ));
            }
        }
        Ok(Digest(s.to_string()))
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Self {
        Digest(format!("sha256:{}", hex(&Sha256::digest(bytes))))
    }

    /// The algorithm, e.g. `sha256`.
    pub fn algorithm(&self) -> &str {
        self.0.split_once(':').map_or("", |(a, _)| a)
    }

    /// The encoded part after the colon.
    pub fn encoded(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, e)| e)
    }

    /// The digest as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A short form for humans: algorithm and the first 12 characters.
    pub fn short(&self) -> String {
        let enc = self.encoded();
        format!("{}:{}", self.algorithm(), &enc[..enc.len().min(12)])
    }

    /// Hashes `bytes` with this digest's algorithm and says whether they match.
    ///
    /// `None` means the algorithm is not one we can compute, so the claim cannot be checked.
    pub fn verify(&self, bytes: &[u8]) -> Option<bool> {
        let computed = match self.algorithm() {
            "sha256" => hex(&Sha256::digest(bytes)),
            "sha512" => hex(&Sha512::digest(bytes)),
            _ => return None,
        };
        Some(computed == self.encoded())
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn sha256_of_empty_input_is_the_well_known_value() {
        assert_eq!(Digest::sha256_of(b"").as_str(), EMPTY_SHA256);
    }

    #[test]
    fn verify_detects_a_body_that_does_not_hash_to_the_digest() {
        let d = Digest::parse(EMPTY_SHA256).unwrap();
        assert_eq!(d.verify(b""), Some(true));
        assert_eq!(d.verify(b"x"), Some(false));
        let other = Digest::parse("blake3:abc").unwrap();
        assert_eq!(other.verify(b""), None);
    }

    #[test]
    fn malformed_digests_are_rejected() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            "sha256:abc",
            "SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            ":abc",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85!",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn short_form_keeps_the_algorithm() {
        let d = Digest::parse(EMPTY_SHA256).unwrap();
        assert_eq!(d.short(), "sha256:e3b0c44298fc");
    }
}
