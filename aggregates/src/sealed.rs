//! A personal-data field as it travels in events: ciphertext only, never clear text.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An AEAD-sealed value in the text form `sealed:v1:<subject>:<base64url(nonce || ciphertext)>`.
/// The domain treats it as opaque; only the service layer, which holds the subject keys,
/// can open it. Its `Debug` shows no ciphertext, so logs stay short and clean.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sealed(pub String);

impl Sealed {
    pub const PREFIX: &'static str = "sealed:v1:";

    /// Whether the text has the sealed shape; a command carrying clear text is refused.
    pub fn is_well_formed(&self) -> bool {
        let Some(rest) = self.0.strip_prefix(Self::PREFIX) else {
            return false;
        };
        let mut parts = rest.splitn(2, ':');
        let subject_ok = parts
            .next()
            .is_some_and(|s| uuid::Uuid::parse_str(s).is_ok());
        let body_ok = parts.next().is_some_and(|b| {
            !b.is_empty()
                && b.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        });
        subject_ok && body_ok
    }
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealed(..)")
    }
}
