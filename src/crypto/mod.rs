//! Stored payloads, encrypted at rest by envelope encryption.
//!
//! A payload is sealed with AES-256-GCM under a data key. The associated data
//! names the row the payload belongs to ([`PayloadContext`]), so ciphertext
//! copied into another row does not decrypt. Data keys are random, serve many
//! payloads, and are stored in `data_keys` wrapped by a key-encryption key
//! (KEK) from `PAYMENTS_KEK_FILE`, with the KEK's id beside them. The first
//! KEK in the file wraps new data keys; the others unwrap older ones until
//! `payments keys rewrap` moves those to the active KEK, after which an old
//! KEK can leave the file.
//!
//! A process seals with one data key for an hour or 100,000 payloads, then
//! makes another. Each key is committed before anything is sealed with it.
//! Unwrapped keys are cached, so a process queries `data_keys` once per key,
//! never per payload.

mod cipher;
pub mod cli;
mod data_keys;
mod kek;
mod rotation;

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, PoisonError},
};

use sqlx::PgPool;
use uuid::Uuid;

use self::data_keys::DataKey;
pub use self::{
    kek::{KeyEncryptionKey, KeyringConfig, SETTING, from_source},
    rotation::{KekUsage, KeyStatus, RewrapFailure, RewrapReport, rewrap, status},
};

/// Unwrapped data keys kept per process. Keys rotate hourly, so this covers
/// months of stored payloads; past it one key is dropped and reloaded later.
const CACHE_LIMIT: usize = 4096;

/// The row a payload belongs to; it is the associated data of the seal.
#[derive(Clone, Copy, Debug)]
pub enum PayloadContext<'a> {
    /// `webhook_events.payload` of the event with this Stripe id.
    Event(&'a str),
    /// `dead_letters.payload` of the entry with this id.
    DeadLetter(i64),
    /// `rejected_deliveries.body_prefix`. Nothing in that table is replayed,
    /// so the table alone is the context.
    RefusedDelivery,
}

impl PayloadContext<'_> {
    fn associated_data(self) -> Vec<u8> {
        let mut aad = b"payments payload v1\0".to_vec();
        match self {
            Self::Event(id) => {
                aad.extend_from_slice(b"webhook_events\0");
                aad.extend_from_slice(id.as_bytes());
            }
            Self::DeadLetter(id) => {
                aad.extend_from_slice(b"dead_letters\0");
                aad.extend_from_slice(id.to_string().as_bytes());
            }
            Self::RefusedDelivery => aad.extend_from_slice(b"rejected_deliveries"),
        }
        aad
    }
}

/// A sealed payload and the data key it needs, as they are stored.
#[derive(Clone, Debug)]
pub struct Sealed {
    pub key_id: Uuid,
    pub bytes: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("the payload was purged after the retention period; nothing is left to read")]
    Purged,
    #[error("the payload's data key {0} is not stored")]
    UnknownDataKey(Uuid),
    #[error(
        "data key {data_key} is wrapped by key-encryption key {kek_id}, \
         which PAYMENTS_KEK_FILE does not hold"
    )]
    UnknownKek { data_key: Uuid, kek_id: String },
    #[error(
        "data key {data_key} does not unwrap under key-encryption key {kek_id}: \
         the file holds other key material under that id, or the stored key was altered"
    )]
    Unwrap { data_key: Uuid, kek_id: String },
    #[error(
        "the payload does not decrypt under data key {0}: it was altered or belongs to another row"
    )]
    Undecryptable(Uuid),
    #[error("the system random number generator failed")]
    Random,
    #[error("AES-256-GCM refused the input")]
    Cipher,
    #[error("database error while storing or loading a data key")]
    Database(#[from] sqlx::Error),
}

/// Seals new payloads under the current data key; get one per batch from
/// [`Keyring::sealer`].
#[derive(Clone)]
pub struct Sealer(Arc<DataKey>);

impl Sealer {
    pub fn seal(
        &self,
        context: PayloadContext<'_>,
        plaintext: &[u8],
    ) -> Result<Sealed, PayloadError> {
        Ok(Sealed {
            key_id: self.0.id(),
            bytes: self.0.seal(context, plaintext)?,
        })
    }
}

/// The KEKs, the current data key and the cache of unwrapped ones. Cheap to
/// clone; clones share the cache.
#[derive(Clone)]
pub struct Keyring(Arc<Inner>);

struct Inner {
    pool: PgPool,
    keks: KeyringConfig,
    /// The data key new payloads are sealed with; the lock also keeps two
    /// tasks from each making a new one at the same moment.
    current: tokio::sync::Mutex<Option<Arc<DataKey>>>,
    unwrapped: Mutex<HashMap<Uuid, Arc<DataKey>>>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Keyring").field(&self.0.keks).finish()
    }
}

impl Keyring {
    pub fn new(keks: &KeyringConfig, pool: PgPool) -> Self {
        Self(Arc::new(Inner {
            pool,
            keks: keks.clone(),
            current: tokio::sync::Mutex::new(None),
            unwrapped: Mutex::new(HashMap::new()),
        }))
    }

    /// The current data key, or a new one (stored first) when there is none
    /// yet or the current one is spent.
    pub async fn sealer(&self) -> Result<Sealer, PayloadError> {
        let mut current = self.0.current.lock().await;
        if let Some(key) = current.as_ref().filter(|key| !key.is_spent()) {
            return Ok(Sealer(key.clone()));
        }
        let key = Arc::new(self.new_data_key().await?);
        self.remember(key.clone());
        *current = Some(key.clone());
        Ok(Sealer(key))
    }

    /// Seals one payload; a batch should take one [`Sealer`] instead.
    pub async fn seal(
        &self,
        context: PayloadContext<'_>,
        plaintext: &[u8],
    ) -> Result<Sealed, PayloadError> {
        self.sealer().await?.seal(context, plaintext)
    }

    /// Decrypts a payload sealed for `context` under data key `key_id`.
    pub async fn open(
        &self,
        context: PayloadContext<'_>,
        key_id: Uuid,
        sealed: &[u8],
    ) -> Result<Vec<u8>, PayloadError> {
        self.data_key(key_id).await?.open(context, sealed)
    }

    /// Like [`Self::open`], for columns that are null once purged.
    pub async fn open_stored(
        &self,
        context: PayloadContext<'_>,
        key_id: Option<Uuid>,
        sealed: Option<&[u8]>,
    ) -> Result<Vec<u8>, PayloadError> {
        match (key_id, sealed) {
            (Some(key_id), Some(sealed)) => self.open(context, key_id, sealed).await,
            _ => Err(PayloadError::Purged),
        }
    }

    fn active_kek(&self) -> &KeyEncryptionKey {
        self.0.keks.active()
    }

    fn kek(&self, id: &str) -> Option<&KeyEncryptionKey> {
        self.0.keks.keks().find(|kek| kek.id() == id)
    }

    fn pool(&self) -> &PgPool {
        &self.0.pool
    }

    async fn new_data_key(&self) -> Result<DataKey, PayloadError> {
        let id = Uuid::new_v4();
        let material = cipher::random_key()?;
        let kek = self.active_kek();
        let wrapped = kek.wrap(id, &material).await?;
        data_keys::insert(self.pool(), id, kek.id(), &wrapped).await?;
        tracing::info!(data_key = %id, kek_id = kek.id(), "new data key");
        DataKey::new(id, &material)
    }

    /// An unwrapped data key: from the cache, else from `data_keys`.
    async fn data_key(&self, id: Uuid) -> Result<Arc<DataKey>, PayloadError> {
        if let Some(key) = self.cached(id) {
            return Ok(key);
        }
        let material = self.unwrap_stored(id).await?;
        let key = Arc::new(DataKey::new(id, &material)?);
        self.remember(key.clone());
        Ok(key)
    }

    async fn unwrap_stored(&self, id: Uuid) -> Result<Vec<u8>, PayloadError> {
        let stored = data_keys::find(self.pool(), id)
            .await?
            .ok_or(PayloadError::UnknownDataKey(id))?;
        let kek = self
            .kek(&stored.kek_id)
            .ok_or_else(|| PayloadError::UnknownKek {
                data_key: id,
                kek_id: stored.kek_id.clone(),
            })?;
        kek.unwrap(id, &stored.wrapped).await
    }

    fn cached(&self, id: Uuid) -> Option<Arc<DataKey>> {
        let keys = self
            .0
            .unwrapped
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        keys.get(&id).cloned()
    }

    fn remember(&self, key: Arc<DataKey>) {
        let mut keys = self
            .0
            .unwrapped
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if keys.len() >= CACHE_LIMIT
            && let Some(evicted) = keys.keys().next().copied()
        {
            keys.remove(&evicted);
        }
        keys.insert(key.id(), key);
    }
}
