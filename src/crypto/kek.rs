//! Key-encryption keys (KEKs): the keys that wrap data keys, read once at
//! start from the file `PAYMENTS_KEK_FILE` names.
//!
//! The file holds one `KEY_ID:BASE64_KEY` line per key (32 random bytes,
//! standard base64); blank lines and `#` comments are skipped. The first key
//! is the active one and wraps new data keys; the others only unwrap data
//! keys made before a rotation. Errors name the setting and the line, never
//! the content.

use std::fmt;

use base64::{Engine, engine::general_purpose::STANDARD};
use ring::aead::LessSafeKey;
use uuid::Uuid;

use super::{PayloadError, cipher};
use crate::config::{ConfigError, Source, malformed, read_setting_file, required, value};

/// The setting that names the key file.
pub const SETTING: &str = "PAYMENTS_KEK_FILE";

/// Key ids starting with this mark a key that is public (committed for local
/// runs); a process with a live Stripe key refuses them.
const DEV_ONLY_PREFIX: &str = "dev-only";
const MAX_ID_CHARS: usize = 64;

/// A key-encryption key. Only keys read from `PAYMENTS_KEK_FILE` exist: a
/// KMS (whose wrap and unwrap are network calls, hence async here) would be
/// another variant, and is not implemented.
#[derive(Clone)]
pub enum KeyEncryptionKey {
    File { id: String, key: LessSafeKey },
}

impl KeyEncryptionKey {
    pub fn id(&self) -> &str {
        match self {
            Self::File { id, .. } => id,
        }
    }

    /// Wraps a data key. The associated data binds the result to the data
    /// key's id and to this KEK's id.
    pub async fn wrap(&self, data_key: Uuid, material: &[u8]) -> Result<Vec<u8>, PayloadError> {
        let aad = self.associated_data(data_key);
        match self {
            Self::File { key, .. } => {
                let mut wrapped = Vec::new();
                cipher::seal_into(key, &aad, material, &mut wrapped)?;
                Ok(wrapped)
            }
        }
    }

    /// The data key that [`Self::wrap`] wrapped.
    pub async fn unwrap(&self, data_key: Uuid, wrapped: &[u8]) -> Result<Vec<u8>, PayloadError> {
        let aad = self.associated_data(data_key);
        match self {
            Self::File { key, .. } => {
                cipher::open(key, &aad, wrapped).ok_or_else(|| PayloadError::Unwrap {
                    data_key,
                    kek_id: self.id().to_owned(),
                })
            }
        }
    }

    fn associated_data(&self, data_key: Uuid) -> Vec<u8> {
        let mut aad = b"payments data key v1\0".to_vec();
        aad.extend_from_slice(data_key.as_bytes());
        aad.extend_from_slice(self.id().as_bytes());
        aad
    }
}

/// The KEKs from the file: the active one first. Its `Debug` output shows
/// the ids only.
#[derive(Clone)]
pub struct KeyringConfig {
    active: KeyEncryptionKey,
    older: Vec<KeyEncryptionKey>,
}

impl KeyringConfig {
    /// The KEK that wraps new data keys.
    pub fn active(&self) -> &KeyEncryptionKey {
        &self.active
    }

    /// Every KEK, the active one first.
    pub fn keks(&self) -> impl Iterator<Item = &KeyEncryptionKey> {
        std::iter::once(&self.active).chain(&self.older)
    }
}

impl fmt::Debug for KeyringConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let older: Vec<&str> = self.older.iter().map(KeyEncryptionKey::id).collect();
        f.debug_struct("KeyringConfig")
            .field("active", &self.active.id())
            .field("older", &older)
            .finish()
    }
}

/// Reads and checks the key file. Required: payloads are never stored
/// unencrypted.
pub fn from_source(src: &dyn Source) -> Result<KeyringConfig, ConfigError> {
    let path = required(src, SETTING)?;
    let content = read_setting_file(SETTING, &path)?;
    let config = parse(&content).map_err(|reason| malformed(SETTING, reason))?;
    refuse_dev_keys_when_live(src, &config)?;
    Ok(config)
}

fn parse(content: &str) -> Result<KeyringConfig, String> {
    let mut keks: Vec<KeyEncryptionKey> = Vec::new();
    for (index, line) in content.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |reason: &str| format!("line {}: {reason}", index + 1);
        let kek = parse_line(line).map_err(at)?;
        if keks.iter().any(|k| k.id() == kek.id()) {
            return Err(at(&format!("key id {} appears twice", kek.id())));
        }
        keks.push(kek);
    }
    let mut keks = keks.into_iter();
    let active = keks
        .next()
        .ok_or("no key in the file; expected KEY_ID:BASE64_KEY lines, the active key first")?;
    Ok(KeyringConfig {
        active,
        older: keks.collect(),
    })
}

fn parse_line(line: &str) -> Result<KeyEncryptionKey, &'static str> {
    let (id, encoded) = line.split_once(':').ok_or("expected KEY_ID:BASE64_KEY")?;
    let id = id.trim();
    let id_chars = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if id.is_empty() || id.len() > MAX_ID_CHARS || !id.chars().all(id_chars) {
        return Err("the key id must be 1 to 64 letters, digits, '.', '_' or '-'");
    }
    let material = STANDARD
        .decode(encoded.trim())
        .map_err(|_| "the key is not standard base64")?;
    if material.len() != cipher::KEY_LEN {
        return Err("the key must be 32 bytes (44 base64 characters)");
    }
    let key = cipher::key(&material).ok_or("the key is not a usable AES-256 key")?;
    Ok(KeyEncryptionKey::File {
        id: id.to_owned(),
        key,
    })
}

/// The committed development key is public: a process holding a live Stripe
/// key must not encrypt customer data with it.
fn refuse_dev_keys_when_live(src: &dyn Source, config: &KeyringConfig) -> Result<(), ConfigError> {
    let stripe_key = value(src, "STRIPE_SECRET_KEY")?.unwrap_or_default();
    let live = ["sk_live_", "rk_live_"]
        .iter()
        .any(|p| stripe_key.starts_with(p));
    if live && config.keks().any(|k| k.id().starts_with(DEV_ONLY_PREFIX)) {
        return Err(malformed(
            SETTING,
            "holds a dev-only key, which is public, while STRIPE_SECRET_KEY is a live key",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const KEY_B: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    fn env_with_file(name: &str, content: &str) -> HashMap<String, String> {
        let dir = std::env::temp_dir().join(format!("payments-kek-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        HashMap::from([(SETTING.to_owned(), path.display().to_string())])
    }

    #[test]
    fn the_first_key_is_active_and_comments_are_skipped() {
        let content = format!("# rotation in progress\n\nnew-2:{KEY_B}\n  old-1 : {KEY_A}  \n");
        let config = from_source(&env_with_file("two", &content)).unwrap();

        assert_eq!(config.active().id(), "new-2");
        let ids: Vec<&str> = config.keks().map(KeyEncryptionKey::id).collect();
        assert_eq!(ids, ["new-2", "old-1"]);
        let debug = format!("{config:?}");
        assert!(!debug.contains(KEY_A) && !debug.contains(KEY_B), "{debug}");
    }

    #[test]
    fn a_missing_setting_or_file_is_named() {
        let err = from_source(&HashMap::new()).unwrap_err().to_string();
        assert!(err.contains(SETTING), "{err}");
        let env = HashMap::from([(SETTING.to_owned(), "/nonexistent/kek".to_owned())]);
        let err = from_source(&env).unwrap_err().to_string();
        assert!(
            err.contains(SETTING) && err.contains("cannot read"),
            "{err}"
        );
    }

    #[test]
    fn malformed_lines_are_named_by_number_without_their_content() {
        let short = "c2hvcnQgc2hvcnQgc2hvcnQ=";
        let cases = [
            (format!("a:{KEY_A}\n{KEY_B}"), "line 2: expected KEY_ID"),
            (format!("a:{short}"), "line 1: the key must be 32 bytes"),
            (
                format!("a:{KEY_A}!"),
                "line 1: the key is not standard base64",
            ),
            (format!("a b:{KEY_A}"), "line 1: the key id"),
            (
                format!("a:{KEY_A}\na:{KEY_B}"),
                "line 2: key id a appears twice",
            ),
            ("# nothing\n".to_owned(), "no key in the file"),
        ];
        for (content, expected) in cases {
            let err = from_source(&env_with_file("bad", &content))
                .unwrap_err()
                .to_string();
            assert!(err.contains(SETTING) && err.contains(expected), "{err}");
            for secret in [KEY_A, KEY_B, short] {
                assert!(!err.contains(secret), "key material in {err}");
            }
        }
    }

    #[test]
    fn a_dev_only_key_is_refused_beside_a_live_stripe_key() {
        let mut env = env_with_file("dev", &format!("dev-only-1:{KEY_A}\n"));
        env.insert("STRIPE_SECRET_KEY".into(), "sk_test_x".into());
        assert!(from_source(&env).is_ok());

        env.insert("STRIPE_SECRET_KEY".into(), "sk_live_x".into());
        let err = from_source(&env).unwrap_err().to_string();
        assert!(err.contains(SETTING) && err.contains("dev-only"), "{err}");
    }

    #[tokio::test]
    async fn a_wrapped_data_key_unwraps_only_for_its_own_id_and_kek() {
        let config =
            from_source(&env_with_file("wrap", &format!("k2:{KEY_B}\nk1:{KEY_A}"))).unwrap();
        let (k2, k1) = (config.active(), config.keks().nth(1).unwrap());
        let id = Uuid::new_v4();
        let material = cipher::random_key().unwrap();

        let wrapped = k2.wrap(id, &material).await.unwrap();

        assert_eq!(k2.unwrap(id, &wrapped).await.unwrap(), material);
        assert!(k2.unwrap(Uuid::new_v4(), &wrapped).await.is_err());
        assert!(k1.unwrap(id, &wrapped).await.is_err());
    }
}
