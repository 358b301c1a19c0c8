//! API key secrets: made here, shown once, stored only as a BLAKE3 hash.
//!
//! A key reads `ll_<12 hex>_<43 base64url>`; `ll_<12 hex>` is its visible prefix, unique, used
//! to find the key and to name it in lists and logs.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use subtle::ConstantTimeEq;

pub struct NewSecret {
    /// The whole key, to be shown once and then forgotten.
    pub secret: String,
    pub prefix: String,
    pub hash: String,
}

pub fn generate() -> NewSecret {
    let mut id = [0u8; 6];
    let mut body = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut id);
    rand::rngs::OsRng.fill_bytes(&mut body);
    let prefix = format!("ll_{}", hex::encode(id));
    let secret = format!("{prefix}_{}", URL_SAFE_NO_PAD.encode(body));
    NewSecret {
        hash: hash(&secret),
        prefix,
        secret,
    }
}

pub fn hash(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

/// The prefix of a presented key, if it has the shape of one.
pub fn prefix_of(presented: &str) -> Option<&str> {
    let prefix = presented.get(..15)?;
    let ok = prefix.starts_with("ll_")
        && prefix[3..].bytes().all(|c| c.is_ascii_hexdigit())
        && presented.as_bytes().get(15) == Some(&b'_')
        && presented.len() == 15 + 1 + 43;
    ok.then_some(prefix)
}

/// Compares a presented key with a stored hash in constant time.
pub fn matches(presented: &str, stored_hash: &str) -> bool {
    hash(presented)
        .as_bytes()
        .ct_eq(stored_hash.as_bytes())
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_match_only_themselves() {
        let k = generate();
        assert_eq!(prefix_of(&k.secret), Some(k.prefix.as_str()));
        assert!(matches(&k.secret, &k.hash));
        let other = generate();
        assert!(!matches(&other.secret, &k.hash));
        assert_eq!(prefix_of("ll_zz"), None);
        assert_eq!(prefix_of(&k.secret[..40]), None);
    }
}
