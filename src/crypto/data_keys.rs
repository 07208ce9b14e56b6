//! Data keys: random AES-256-GCM keys that seal payloads, stored wrapped in
//! the `data_keys` table and held unwrapped in memory.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use ring::aead::LessSafeKey;
use sqlx::PgPool;
use uuid::Uuid;

use super::{PayloadContext, PayloadError, cipher};

/// A data key seals new payloads for this long at most...
const MAX_AGE: Duration = Duration::from_secs(3600);
/// ...and at most this many of them, then a new one is made.
const MAX_SEALS: u64 = 100_000;
/// The first byte of every sealed payload: the layout and the associated
/// data scheme, so either can change without guessing.
const FORMAT_V1: u8 = 1;

pub(super) struct DataKey {
    id: Uuid,
    key: LessSafeKey,
    made: Instant,
    seals: AtomicU64,
}

impl DataKey {
    pub(super) fn new(id: Uuid, material: &[u8]) -> Result<Self, PayloadError> {
        Ok(Self {
            id,
            key: cipher::key(material).ok_or(PayloadError::Cipher)?,
            made: Instant::now(),
            seals: AtomicU64::new(0),
        })
    }

    pub(super) fn id(&self) -> Uuid {
        self.id
    }

    /// Whether new payloads should get a fresh key instead.
    pub(super) fn is_spent(&self) -> bool {
        self.made.elapsed() >= MAX_AGE || self.seals.load(Ordering::Relaxed) >= MAX_SEALS
    }

    /// `FORMAT_V1 || nonce || ciphertext || tag`.
    pub(super) fn seal(
        &self,
        context: PayloadContext<'_>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, PayloadError> {
        self.seals.fetch_add(1, Ordering::Relaxed);
        let mut sealed = Vec::with_capacity(1 + cipher::OVERHEAD + plaintext.len());
        sealed.push(FORMAT_V1);
        cipher::seal_into(
            &self.key,
            &context.associated_data(),
            plaintext,
            &mut sealed,
        )?;
        Ok(sealed)
    }

    pub(super) fn open(
        &self,
        context: PayloadContext<'_>,
        sealed: &[u8],
    ) -> Result<Vec<u8>, PayloadError> {
        let undecryptable = || PayloadError::Undecryptable(self.id);
        let (&format, rest) = sealed.split_first().ok_or_else(undecryptable)?;
        if format != FORMAT_V1 {
            return Err(undecryptable());
        }
        cipher::open(&self.key, &context.associated_data(), rest).ok_or_else(undecryptable)
    }
}

/// A row of `data_keys`.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct StoredKey {
    pub id: Uuid,
    pub kek_id: String,
    pub wrapped: Vec<u8>,
}

/// Stores a new data key. It commits on its own, before anything sealed
/// with it, so no payload can reference a key that was rolled back.
pub(super) async fn insert(
    pool: &PgPool,
    id: Uuid,
    kek_id: &str,
    wrapped: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO data_keys (id, kek_id, wrapped) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(kek_id)
        .bind(wrapped)
        .execute(pool)
        .await?;
    Ok(())
}

pub(super) async fn find(pool: &PgPool, id: Uuid) -> Result<Option<StoredKey>, sqlx::Error> {
    sqlx::query_as("SELECT id, kek_id, wrapped FROM data_keys WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_key() -> DataKey {
        DataKey::new(Uuid::new_v4(), &cipher::random_key().unwrap()).unwrap()
    }

    #[test]
    fn a_payload_opens_only_in_the_row_it_was_sealed_for() {
        let key = data_key();
        let sealed = key
            .seal(PayloadContext::Event("evt_1"), b"{\"id\":\"evt_1\"}")
            .unwrap();

        assert_eq!(sealed[0], FORMAT_V1);
        let opened = key.open(PayloadContext::Event("evt_1"), &sealed).unwrap();
        assert_eq!(opened, b"{\"id\":\"evt_1\"}");
        for other in [
            PayloadContext::Event("evt_2"),
            PayloadContext::DeadLetter(1),
            PayloadContext::RefusedDelivery,
        ] {
            assert!(matches!(
                key.open(other, &sealed),
                Err(PayloadError::Undecryptable(id)) if id == key.id()
            ));
        }
        assert!(
            data_key()
                .open(PayloadContext::Event("evt_1"), &sealed)
                .is_err()
        );
        assert!(key.open(PayloadContext::Event("evt_1"), &[]).is_err());
    }

    #[test]
    fn dead_letter_contexts_differ_by_id() {
        let key = data_key();
        let sealed = key.seal(PayloadContext::DeadLetter(12), b"x").unwrap();
        assert!(key.open(PayloadContext::DeadLetter(1), &sealed).is_err());
        assert!(key.open(PayloadContext::DeadLetter(12), &sealed).is_ok());
    }

    #[test]
    fn a_key_is_spent_after_its_quota_of_seals() {
        let key = data_key();
        assert!(!key.is_spent());
        key.seals.store(MAX_SEALS, Ordering::Relaxed);
        assert!(key.is_spent());
    }
}
