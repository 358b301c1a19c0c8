//! Crypto-shredding of personal data: per-subject data keys, wrapped by the operator's master
//! key and kept outside the log; sealed fields; and the keyed blind index for e-mail
//! uniqueness. Erasing a subject deletes its key row, and every sealed field of it in the
//! log becomes unreadable while the chain, which covers only ciphertext, still verifies.
//! A message's content is sealed under a key of its own, wrapped by its author's key: deleting
//! the message destroys one key, erasing the author makes all of the author's messages unreadable.

use std::collections::HashMap;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ledgerline_aggregates::Sealed;
use rand::RngCore;
use sqlx::PgExecutor;
use uuid::Uuid;

/// The operator's 32-byte master key. Never printed.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(***)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the master key must be 64 hex characters (32 bytes); got {0} characters")]
    BadMasterKey(usize),
    #[error("a wrapped data key could not be opened: wrong master key or damaged key row")]
    Unwrap,
}

impl MasterKey {
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let t = text.trim();
        let bytes = hex::decode(t).map_err(|_| KeyError::BadMasterKey(t.len()))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::BadMasterKey(t.len()))?;
        Ok(Self(key))
    }

    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        Self(k)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// A subject's data key in the clear, only ever in memory.
#[derive(Clone)]
pub struct DataKey([u8; 32]);

impl DataKey {
    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }
}

/// Seals, opens and indexes personal data. Cheap to clone.
#[derive(Clone)]
pub struct Vault {
    wrapping: XChaCha20Poly1305,
    blind_index_key: [u8; 32],
    /// Seals the answers kept for `Idempotency-Key` replays: they can hold personal data
    /// (an invited user's address, a message's text), which the database holds only sealed.
    answers: XChaCha20Poly1305,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Vault(***)")
    }
}

fn seal_with(cipher: &XChaCha20Poly1305, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ct = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
    [nonce.as_slice(), &ct].concat()
}

fn open_with(cipher: &XChaCha20Poly1305, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < 24 {
        return None;
    }
    let (nonce, ct) = sealed.split_at(24);
    cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
        .ok()
}

impl Vault {
    pub fn new(master: &MasterKey) -> Self {
        // Separate keys per purpose, so that no two uses share key material.
        let wrap = blake3::derive_key("ledgerline 2026 data-key wrapping v1", &master.0);
        let blind = blake3::derive_key("ledgerline 2026 e-mail blind index v1", &master.0);
        let answers = blake3::derive_key("ledgerline 2026 kept answers v1", &master.0);
        Self {
            wrapping: XChaCha20Poly1305::new((&wrap).into()),
            blind_index_key: blind,
            answers: XChaCha20Poly1305::new((&answers).into()),
        }
    }

    /// Seals an answer kept for replays, bound to `binding` (its API key and idempotency
    /// key), so that it cannot be moved to another row. A server-held key, not a subject's:
    /// an answer names several subjects, and erasing one forgets the answers that name it
    /// (`api::idempotency::forget_answers_naming`).
    pub fn seal_answer(&self, binding: &[u8], answer: &[u8]) -> Vec<u8> {
        seal_with(&self.answers, binding, answer)
    }

    /// Opens what [`Vault::seal_answer`] sealed with the same `binding`.
    pub fn open_answer(&self, binding: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        open_with(&self.answers, binding, sealed)
    }

    /// Makes and stores a new data key for `subject`.
    pub async fn create_key<'e>(
        &self,
        db: impl PgExecutor<'e>,
        subject: Uuid,
        organization_id: Option<Uuid>,
    ) -> Result<DataKey, sqlx::Error> {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        let wrapped = seal_with(&self.wrapping, subject.as_bytes(), &k);
        sqlx::query("INSERT INTO subject_keys (subject_id, organization_id, wrapped_key) VALUES ($1, $2, $3)")
            .bind(subject)
            .bind(organization_id)
            .bind(wrapped)
            .execute(db)
            .await?;
        Ok(DataKey(k))
    }

    /// The data keys that still exist among `subjects`; erased subjects are simply absent.
    pub async fn keys<'e>(
        &self,
        db: impl PgExecutor<'e>,
        subjects: &[Uuid],
    ) -> Result<HashMap<Uuid, DataKey>, sqlx::Error> {
        let rows: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(
            "SELECT subject_id, wrapped_key FROM subject_keys WHERE subject_id = ANY($1)",
        )
        .bind(subjects)
        .fetch_all(db)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(subject, wrapped)| {
                self.unwrap_subject_key(subject, &wrapped)
                    .map(|k| (subject, k))
            })
            .collect())
    }

    /// Whether this vault's master key is the one the database's data keys are wrapped with:
    /// true when one of the newest few opens, or there is none yet. A wrong key must be
    /// caught before it is used: every user would read as erased, and what it sealed the
    /// right key could never open.
    pub async fn opens_stored_keys<'e>(
        &self,
        db: impl PgExecutor<'e>,
    ) -> Result<bool, sqlx::Error> {
        let rows: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(
            "SELECT subject_id, wrapped_key FROM subject_keys ORDER BY created_at DESC LIMIT 8",
        )
        .fetch_all(db)
        .await?;
        Ok(rows.is_empty()
            || rows.iter().any(|(subject, wrapped)| {
                open_with(&self.wrapping, subject.as_bytes(), wrapped).is_some()
            }))
    }

    /// Deletes a subject's key row: crypto-shredding.
    pub async fn destroy_key<'e>(
        &self,
        db: impl PgExecutor<'e>,
        subject: Uuid,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM subject_keys WHERE subject_id = $1")
            .bind(subject)
            .execute(db)
            .await?;
        Ok(())
    }

    /// The data key of `author`, a user of `organization_id`; `None` when erased (or not
    /// theirs: another organization's key is never read).
    pub async fn author_key(
        &self,
        db: &sqlx::PgPool,
        author: Uuid,
        organization_id: Uuid,
    ) -> Result<Option<DataKey>, sqlx::Error> {
        let wrapped: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT wrapped_key FROM subject_keys WHERE subject_id = $1 AND organization_id = $2",
        )
        .bind(author)
        .bind(organization_id)
        .fetch_optional(db)
        .await?;
        Ok(wrapped.and_then(|w| self.unwrap_subject_key(author, &w)))
    }

    /// Makes and stores a data key for one message, wrapped by its author's data key (read
    /// by [`Vault::author_key`], which a post does beside its other reads): erasing the
    /// author makes it unreadable, and deleting the message deletes it. `None` when the
    /// author's key is gone by the time of the write (erased meanwhile): a message key is
    /// never stored under a destroyed key.
    pub async fn store_message_key(
        &self,
        db: &sqlx::PgPool,
        message_id: Uuid,
        author_id: Uuid,
        author: &DataKey,
        organization_id: Uuid,
    ) -> Result<Option<DataKey>, sqlx::Error> {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        let wrapped = seal_with(&author.cipher(), &message_key_aad(message_id), &k);
        // Committed without waiting for the WAL flush: the post's event commits after it,
        // synchronously, and flushing its commit flushes this earlier one too. A crash
        // before that loses the key of a message that was never posted.
        let stored = sqlx::query(
            "INSERT INTO message_keys (message_id, author_id, organization_id, wrapped_key) \
             SELECT $1, $2, $3, $4 FROM (SELECT set_config('synchronous_commit', 'off', true)) s \
             WHERE EXISTS (SELECT 1 FROM subject_keys WHERE subject_id = $2)",
        )
        .bind(message_id)
        .bind(author_id)
        .bind(organization_id)
        .bind(wrapped)
        .execute(db)
        .await?;
        Ok((stored.rows_affected() == 1).then_some(DataKey(k)))
    }

    /// The data keys that can still be opened among `messages`: a deleted message, or one
    /// whose author was erased, is simply absent. One query for the message keys and their
    /// authors' keys together.
    pub async fn message_keys<'e>(
        &self,
        db: impl PgExecutor<'e>,
        messages: &[Uuid],
    ) -> Result<HashMap<Uuid, DataKey>, sqlx::Error> {
        let rows: Vec<(Uuid, Vec<u8>, Uuid, Vec<u8>)> = sqlx::query_as(
            "SELECT mk.message_id, mk.wrapped_key, sk.subject_id, sk.wrapped_key
             FROM message_keys mk JOIN subject_keys sk ON sk.subject_id = mk.author_id
             WHERE mk.message_id = ANY($1)",
        )
        .bind(messages)
        .fetch_all(db)
        .await?;
        Ok(self.open_message_keys(rows))
    }

    /// Unwraps message keys read with their authors' keys, as `(message, its wrapped key,
    /// author, the author's wrapped key)`: for readers that fetch them with the messages.
    pub fn open_message_keys(
        &self,
        rows: impl IntoIterator<Item = (Uuid, Vec<u8>, Uuid, Vec<u8>)>,
    ) -> HashMap<Uuid, DataKey> {
        let mut authors: HashMap<Uuid, Option<DataKey>> = HashMap::new();
        let mut out = HashMap::new();
        for (message, wrapped, author, author_wrapped) in rows {
            let author_key = authors
                .entry(author)
                .or_insert_with(|| self.unwrap_subject_key(author, &author_wrapped));
            let Some(author_key) = author_key else {
                continue;
            };
            match open_with(&author_key.cipher(), &message_key_aad(message), &wrapped) {
                Some(k) if k.len() == 32 => {
                    out.insert(message, DataKey(k.try_into().expect("checked length")));
                }
                _ => tracing::error!(%message, "{}", KeyError::Unwrap),
            }
        }
        out
    }

    /// Deletes a message's key row: its content and file names become unreadable.
    pub async fn destroy_message_key<'e>(
        &self,
        db: impl PgExecutor<'e>,
        message_id: Uuid,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM message_keys WHERE message_id = $1")
            .bind(message_id)
            .execute(db)
            .await?;
        Ok(())
    }

    fn unwrap_subject_key(&self, subject: Uuid, wrapped: &[u8]) -> Option<DataKey> {
        match open_with(&self.wrapping, subject.as_bytes(), wrapped) {
            Some(k) if k.len() == 32 => Some(DataKey(k.try_into().expect("checked length"))),
            _ => {
                tracing::error!(%subject, "{}", KeyError::Unwrap);
                None
            }
        }
    }

    /// Seals `value` as field `field` of `subject`. The field name and subject are bound as
    /// associated data, so a sealed value cannot be moved to another field or subject.
    pub fn seal(&self, key: &DataKey, subject: Uuid, field: &str, value: &str) -> Sealed {
        let body = seal_with(&key.cipher(), &aad(subject, field), value.as_bytes());
        Sealed(format!(
            "{}{}:{}",
            Sealed::PREFIX,
            subject,
            URL_SAFE_NO_PAD.encode(body)
        ))
    }

    /// Opens a sealed value, or `None` when its key is gone (erased) or it is not ours.
    pub fn open(&self, keys: &HashMap<Uuid, DataKey>, field: &str, sealed: &str) -> Option<String> {
        let rest = sealed.strip_prefix(Sealed::PREFIX)?;
        let (subject, body) = rest.split_once(':')?;
        let subject = Uuid::parse_str(subject).ok()?;
        let key = keys.get(&subject)?;
        let plain = open_with(
            &key.cipher(),
            &aad(subject, field),
            &URL_SAFE_NO_PAD.decode(body).ok()?,
        )?;
        String::from_utf8(plain).ok()
    }

    /// A keyed BLAKE3 of an e-mail identity within one organization: equal addresses give
    /// equal indexes, but without the master key the index reveals nothing.
    pub fn blind_index(&self, organization_id: Uuid, email_identity: &str) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.blind_index_key);
        h.update(organization_id.as_bytes());
        h.update(email_identity.as_bytes());
        h.finalize().to_hex().to_string()
    }
}

/// Binds a wrapped message key to its message, so a key row cannot be moved to another.
fn message_key_aad(message: Uuid) -> Vec<u8> {
    [b"message-key:".as_slice(), message.as_bytes()].concat()
}

fn aad(subject: Uuid, field: &str) -> Vec<u8> {
    [subject.as_bytes().as_slice(), b":", field.as_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_field_and_subject() {
        let vault = Vault::new(&MasterKey::generate());
        let subject = Uuid::new_v4();
        let key = DataKey([7u8; 32]);
        let sealed = vault.seal(&key, subject, "email", "ada@example.com");
        assert!(sealed.is_well_formed());
        // The body is random-looking base64, so a short substring such as "ada" turns up by
        // chance (it once failed CI); look for the plaintext's bytes in the decoded body.
        let body = sealed.0.rsplit_once(':').expect("subject:body").1;
        let body = URL_SAFE_NO_PAD.decode(body).expect("base64 body");
        assert!(!body.windows(15).any(|w| w == b"ada@example.com"));
        let keys = HashMap::from([(subject, key)]);
        assert_eq!(
            vault.open(&keys, "email", &sealed.0).as_deref(),
            Some("ada@example.com")
        );
        assert_eq!(
            vault.open(&keys, "full_name", &sealed.0),
            None,
            "field is bound"
        );
        assert_eq!(
            vault.open(&HashMap::new(), "email", &sealed.0),
            None,
            "no key, no data"
        );
    }

    #[test]
    fn blind_index_is_deterministic_keyed_and_scoped() {
        let a = Vault::new(&MasterKey::generate());
        let b = Vault::new(&MasterKey::generate());
        let org = Uuid::new_v4();
        assert_eq!(a.blind_index(org, "x@y.io"), a.blind_index(org, "x@y.io"));
        assert_ne!(a.blind_index(org, "x@y.io"), b.blind_index(org, "x@y.io"));
        assert_ne!(
            a.blind_index(org, "x@y.io"),
            a.blind_index(Uuid::new_v4(), "x@y.io")
        );
    }

    #[test]
    fn master_key_parsing_and_debug() {
        let k = MasterKey::generate();
        assert_eq!(MasterKey::from_hex(&k.to_hex()).unwrap().0, k.0);
        assert!(MasterKey::from_hex("abcd").is_err());
        assert_eq!(format!("{k:?}"), "MasterKey(***)");
    }
}
