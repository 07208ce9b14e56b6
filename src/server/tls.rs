//! One listener's TLS: its settings, the rustls config built from its files,
//! and the reloader that rebuilds that config when the files change.
//!
//! With a client CA configured the listener requires a client certificate
//! that chains to it (mTLS). webpki refuses expired certificates; with a CRL
//! configured it refuses revoked ones, and refuses everyone once the CRL is
//! past its next update, so a stale list cannot let a revoked holder in.

use std::{
    fmt,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use rustls::{
    RootCertStore, ServerConfig,
    client::VerifierBuilderError,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject as _},
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::config::{ConfigError, Source, malformed, number, value};

/// Served in ALPN: this server speaks HTTP/1.1 only.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The TLS settings of one listener, checked at start by building them once.
#[derive(Clone)]
pub struct ListenerTls {
    files: TlsFiles,
    reload_every: Duration,
    initial: Loaded,
}

impl fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerTls")
            .field("files", &self.files)
            .field("reload_every", &self.reload_every)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug)]
struct TlsFiles {
    cert: SettingFile,
    key: SettingFile,
    client_ca: Option<SettingFile>,
    client_crl: Option<SettingFile>,
}

/// A file path and the setting that named it, for error messages.
#[derive(Clone, Debug)]
struct SettingFile {
    setting: String,
    path: PathBuf,
}

/// A built config and the fingerprint of the file contents it came from.
#[derive(Clone)]
struct Loaded {
    config: Arc<ServerConfig>,
    fingerprint: Option<[u8; 32]>,
}

impl ListenerTls {
    /// Reads `{prefix}_TLS_CERT`, `_TLS_KEY`, `_TLS_CLIENT_CA` and
    /// `_TLS_CLIENT_CRL` (such as `PAYMENTS_ADMIN_TLS_CERT`), and
    /// `PAYMENTS_TLS_RELOAD_INTERVAL_MS`. `None` when the listener serves
    /// plain HTTP. Unreadable files or bad PEM are errors naming the setting.
    pub fn from_source(src: &dyn Source, prefix: &str) -> Result<Option<Self>, ConfigError> {
        let cert = setting_file(src, format!("{prefix}_TLS_CERT"))?;
        let key = setting_file(src, format!("{prefix}_TLS_KEY"))?;
        let client_ca = setting_file(src, format!("{prefix}_TLS_CLIENT_CA"))?;
        let client_crl = setting_file(src, format!("{prefix}_TLS_CLIENT_CRL"))?;
        let (cert, key) = match (cert, key) {
            (Some(cert), Some(key)) => (cert, key),
            (None, None) => return no_tls(prefix, [client_ca, client_crl]),
            (Some(_), None) => return Err(missing(format!("{prefix}_TLS_KEY"))),
            (None, Some(_)) => return Err(missing(format!("{prefix}_TLS_CERT"))),
        };
        if let (Some(crl), None) = (&client_crl, &client_ca) {
            let reason = format!("needs {prefix}_TLS_CLIENT_CA: a CRL revokes client certificates");
            return Err(malformed(&crl.setting, reason));
        }
        let reload_ms = number(
            src,
            "PAYMENTS_TLS_RELOAD_INTERVAL_MS",
            5000,
            100..=3_600_000,
        )?;
        let files = TlsFiles {
            cert,
            key,
            client_ca,
            client_crl,
        };
        let contents = files.read()?;
        let config = build(&files, &contents)?;
        Ok(Some(Self {
            files,
            reload_every: Duration::from_millis(reload_ms),
            initial: Loaded {
                config: Arc::new(config),
                fingerprint: Some(contents.fingerprint()),
            },
        }))
    }

    /// Whether the listener demands a client certificate (mTLS).
    pub fn requires_client_certificate(&self) -> bool {
        self.files.client_ca.is_some()
    }
}

fn setting_file(src: &dyn Source, setting: String) -> Result<Option<SettingFile>, ConfigError> {
    let path = value(src, &setting)?.map(PathBuf::from);
    Ok(path.map(|path| SettingFile { setting, path }))
}

fn missing(name: String) -> ConfigError {
    ConfigError::Missing { name }
}

/// A client CA or CRL without a certificate of the server's own would be
/// silently ignored; refuse it instead.
fn no_tls<const N: usize>(
    prefix: &str,
    extras: [Option<SettingFile>; N],
) -> Result<Option<ListenerTls>, ConfigError> {
    match extras.into_iter().flatten().next() {
        Some(extra) => Err(malformed(
            &extra.setting,
            format!("needs {prefix}_TLS_CERT and {prefix}_TLS_KEY"),
        )),
        None => Ok(None),
    }
}

/// The bytes of every file, read once, so that the fingerprint and the
/// config built from them describe the same contents.
struct TlsContents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
    client_crl: Option<Vec<u8>>,
}

impl TlsFiles {
    fn read(&self) -> Result<TlsContents, ConfigError> {
        let optional = |file: &Option<SettingFile>| file.as_ref().map(read_file).transpose();
        Ok(TlsContents {
            cert: read_file(&self.cert)?,
            key: read_file(&self.key)?,
            client_ca: optional(&self.client_ca)?,
            client_crl: optional(&self.client_crl)?,
        })
    }
}

fn read_file(file: &SettingFile) -> Result<Vec<u8>, ConfigError> {
    let path = file.path.display();
    let bytes = std::fs::read(&file.path)
        .map_err(|e| malformed(&file.setting, format!("cannot read {path}: {}", e.kind())))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(malformed(&file.setting, format!("{path} is empty")));
    }
    Ok(bytes)
}

impl TlsContents {
    fn fingerprint(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        let parts = [Some(&self.cert), Some(&self.key)];
        let optional = [self.client_ca.as_ref(), self.client_crl.as_ref()];
        for part in parts.into_iter().chain(optional) {
            let bytes = part.map_or(&[][..], Vec::as_slice);
            hash.update((bytes.len() as u64).to_be_bytes());
            hash.update(bytes);
        }
        hash.finalize().into()
    }
}

/// Builds the rustls config. Errors name the setting and the kind of
/// problem, never the content: the key file's bytes are never shown.
fn build(files: &TlsFiles, contents: &TlsContents) -> Result<ServerConfig, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&files.cert, &contents.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&contents.key).map_err(|_| {
        let path = files.key.path.display();
        malformed(
            &files.key.setting,
            format!("{path} holds no PEM private key"),
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| malformed(&files.cert.setting, e.to_string()))?;
    let builder = match client_verifier(files, contents, provider)? {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        let reason = format!("does not fit {}: {e}", files.cert.setting);
        malformed(&files.key.setting, reason)
    })?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(config)
}

fn certificates(
    file: &SettingFile,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let path = file.path.display();
    let chain: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|_| malformed(&file.setting, format!("{path} is not valid PEM")))?;
    if chain.is_empty() {
        return Err(malformed(
            &file.setting,
            format!("{path} holds no certificate"),
        ));
    }
    Ok(chain)
}

fn client_verifier(
    files: &TlsFiles,
    contents: &TlsContents,
    provider: Arc<CryptoProvider>,
) -> Result<Option<Arc<dyn ClientCertVerifier>>, ConfigError> {
    let (Some(ca_file), Some(ca_pem)) = (&files.client_ca, &contents.client_ca) else {
        return Ok(None);
    };
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca_file, ca_pem)? {
        roots.add(cert).map_err(|e| {
            let reason = format!("{} holds an unusable CA: {e}", ca_file.path.display());
            malformed(&ca_file.setting, reason)
        })?;
    }
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if let (Some(crl_file), Some(crl_pem)) = (&files.client_crl, &contents.client_crl) {
        builder = builder
            .with_crls(revocation_lists(crl_file, crl_pem)?)
            .enforce_revocation_expiration();
    }
    let verifier = builder.build().map_err(|e| {
        let setting = match (&e, &files.client_crl) {
            (VerifierBuilderError::InvalidCrl(_), Some(crl)) => &crl.setting,
            _ => &ca_file.setting,
        };
        malformed(setting, e.to_string())
    })?;
    Ok(Some(verifier))
}

fn revocation_lists(
    file: &SettingFile,
    pem: &[u8],
) -> Result<Vec<CertificateRevocationListDer<'static>>, ConfigError> {
    let path = file.path.display();
    let crls: Vec<_> = CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|_| malformed(&file.setting, format!("{path} is not valid PEM")))?;
    if crls.is_empty() {
        let reason = format!("{path} holds no X509 CRL");
        return Err(malformed(&file.setting, reason));
    }
    Ok(crls)
}

/// Holds the config new connections get, and swaps in a rebuilt one when
/// the files change. Connections already open keep the config they began with.
pub struct TlsReloader {
    files: TlsFiles,
    every: Duration,
    state: Mutex<Loaded>,
}

/// What one look at the files found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Reloaded,
    /// The files changed but cannot be used (half-written, mismatched, gone):
    /// the previous config stays. Not retried until they change again.
    Kept,
}

impl TlsReloader {
    pub fn new(tls: &ListenerTls) -> Arc<Self> {
        Arc::new(Self {
            files: tls.files.clone(),
            every: tls.reload_every,
            state: Mutex::new(tls.initial.clone()),
        })
    }

    /// The config for a connection accepted now.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.lock().config.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the files and rebuilds the config when their contents changed.
    /// Blocking file I/O: call it from a blocking thread.
    pub fn reload_if_changed(&self) -> Reload {
        let contents = self.files.read();
        let fingerprint = contents.as_ref().ok().map(TlsContents::fingerprint);
        if fingerprint == self.lock().fingerprint {
            return Reload::Unchanged;
        }
        let built = contents.and_then(|contents| build(&self.files, &contents));
        let mut state = self.lock();
        state.fingerprint = fingerprint;
        match built {
            Ok(config) => {
                state.config = Arc::new(config);
                tracing::info!(setting = %self.files.cert.setting, "tls files changed; reloaded");
                Reload::Reloaded
            }
            Err(err) => {
                tracing::warn!(error = %err, "tls files changed but are unusable; kept the old");
                Reload::Kept
            }
        }
    }

    /// Looks at the files every reload interval until `stopping` turns true.
    pub async fn watch(self: Arc<Self>, mut stopping: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(self.every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stopping.wait_for(|stop| *stop) => return,
            }
            let reloader = self.clone();
            let looked = tokio::task::spawn_blocking(move || reloader.reload_if_changed());
            if let Err(err) = looked.await {
                tracing::error!(error = %err, "tls reload check ended abnormally");
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::{collections::HashMap, path::Path};

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };

    use super::*;

    /// A CA and a server certificate for 127.0.0.1, written as PEM files.
    pub(in crate::server) struct TestPki {
        pub ca: CertifiedIssuer<'static, KeyPair>,
        pub dir: PathBuf,
    }

    impl TestPki {
        pub fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "payments-server-{name}-{}",
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let mut params = CertificateParams::default();
            params
                .distinguished_name
                .push(DnType::CommonName, format!("{name} CA"));
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
            Self { ca, dir }
        }

        /// Writes `{stem}.crt` and `{stem}.key`, issued by this CA.
        pub fn issue(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
            let key = KeyPair::generate().unwrap();
            let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, stem);
            let cert = params.signed_by(&key, &self.ca).unwrap();
            let cert_path = self.write(&format!("{stem}.crt"), &cert.pem());
            let key_path = self.write(&format!("{stem}.key"), &key.serialize_pem());
            (cert_path, key_path)
        }

        pub fn write(&self, file: &str, content: &str) -> PathBuf {
            let path = self.dir.join(file);
            std::fs::write(&path, content).unwrap();
            path
        }

        pub fn ca_path(&self) -> PathBuf {
            self.write("ca.crt", &self.ca.pem())
        }
    }

    impl Drop for TestPki {
        fn drop(&mut self) {
            if let Err(err) = std::fs::remove_dir_all(&self.dir) {
                eprintln!("remove {}: {err}", self.dir.display());
            }
        }
    }

    fn env(pairs: &[(&str, &Path)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.display().to_string()))
            .collect()
    }

    #[test]
    fn no_settings_means_plain_http() {
        let tls = ListenerTls::from_source(&HashMap::new(), "PAYMENTS_PUBLIC").unwrap();
        assert!(tls.is_none());
    }

    #[test]
    fn a_certificate_without_its_key_is_refused() {
        let pki = TestPki::new("nokey");
        let (cert, _) = pki.issue("server", &["127.0.0.1"]);
        let src = env(&[("PAYMENTS_PUBLIC_TLS_CERT", &cert)]);
        let err = ListenerTls::from_source(&src, "PAYMENTS_PUBLIC").unwrap_err();
        assert!(err.to_string().contains("PAYMENTS_PUBLIC_TLS_KEY"), "{err}");
    }

    #[test]
    fn a_client_ca_without_a_server_certificate_is_refused() {
        let pki = TestPki::new("onlyca");
        let src = env(&[("PAYMENTS_ADMIN_TLS_CLIENT_CA", &pki.ca_path())]);
        let err = ListenerTls::from_source(&src, "PAYMENTS_ADMIN").unwrap_err();
        assert!(
            err.to_string().contains("PAYMENTS_ADMIN_TLS_CLIENT_CA"),
            "{err}"
        );
    }

    #[test]
    fn a_crl_without_a_client_ca_is_refused() {
        let pki = TestPki::new("onlycrl");
        let (cert, key) = pki.issue("server", &["127.0.0.1"]);
        let crl = pki.write("crl.pem", "x");
        let src = env(&[
            ("PAYMENTS_ADMIN_TLS_CERT", &cert),
            ("PAYMENTS_ADMIN_TLS_KEY", &key),
            ("PAYMENTS_ADMIN_TLS_CLIENT_CRL", &crl),
        ]);
        let err = ListenerTls::from_source(&src, "PAYMENTS_ADMIN").unwrap_err();
        assert!(
            err.to_string().contains("PAYMENTS_ADMIN_TLS_CLIENT_CRL"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_file_is_named_by_its_setting() {
        let pki = TestPki::new("missing");
        let (cert, _) = pki.issue("server", &["127.0.0.1"]);
        let absent = pki.dir.join("absent.key");
        let src = env(&[
            ("PAYMENTS_WEBHOOK_TLS_CERT", &cert),
            ("PAYMENTS_WEBHOOK_TLS_KEY", &absent),
        ]);
        let err = ListenerTls::from_source(&src, "PAYMENTS_WEBHOOK").unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("PAYMENTS_WEBHOOK_TLS_KEY") && err.contains("not found"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_key_is_named_without_showing_its_content() {
        let pki = TestPki::new("badkey");
        let (cert, key) = pki.issue("server", &["127.0.0.1"]);
        let pem = std::fs::read_to_string(&key).unwrap();
        let body_line = pem.lines().nth(1).unwrap().to_owned();
        pki.write("server.key", &pem[..pem.len() / 2]);
        let src = env(&[
            ("PAYMENTS_PUBLIC_TLS_CERT", &cert),
            ("PAYMENTS_PUBLIC_TLS_KEY", &key),
        ]);

        let err = ListenerTls::from_source(&src, "PAYMENTS_PUBLIC")
            .unwrap_err()
            .to_string();

        assert!(err.contains("PAYMENTS_PUBLIC_TLS_KEY"), "{err}");
        assert!(!err.contains(&body_line[..16]), "{err}");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let pki = TestPki::new("mismatch");
        let (cert, _) = pki.issue("server", &["127.0.0.1"]);
        let (_, other_key) = pki.issue("other", &["127.0.0.1"]);
        let src = env(&[
            ("PAYMENTS_PUBLIC_TLS_CERT", &cert),
            ("PAYMENTS_PUBLIC_TLS_KEY", &other_key),
        ]);
        let err = ListenerTls::from_source(&src, "PAYMENTS_PUBLIC").unwrap_err();
        assert!(err.to_string().contains("PAYMENTS_PUBLIC_TLS_KEY"), "{err}");
    }

    #[test]
    fn the_reloader_swaps_only_for_usable_files() {
        let pki = TestPki::new("reload");
        let (cert, key) = pki.issue("server", &["127.0.0.1"]);
        let src = env(&[
            ("PAYMENTS_PUBLIC_TLS_CERT", &cert),
            ("PAYMENTS_PUBLIC_TLS_KEY", &key),
        ]);
        let tls = ListenerTls::from_source(&src, "PAYMENTS_PUBLIC")
            .unwrap()
            .unwrap();
        let reloader = TlsReloader::new(&tls);
        let first = reloader.current();
        assert_eq!(reloader.reload_if_changed(), Reload::Unchanged);

        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nMIIB").unwrap();
        assert_eq!(reloader.reload_if_changed(), Reload::Kept);
        assert!(Arc::ptr_eq(&first, &reloader.current()));
        assert_eq!(
            reloader.reload_if_changed(),
            Reload::Unchanged,
            "no retry until it changes"
        );

        pki.issue("server", &["127.0.0.1"]);
        assert_eq!(reloader.reload_if_changed(), Reload::Reloaded);
        assert!(!Arc::ptr_eq(&first, &reloader.current()));
    }
}
