//! The syslog sink: RFC 5424 frames, octet-counted, over TCP or TLS (with a
//! client certificate when the receiver wants one).
//!
//! TCP syslog has no acknowledgement. A write that succeeded only reached
//! this host's socket buffer, so the exporter rewinds on every new
//! connection (see [`super::Rewind`]). Before each batch the connection is
//! polled once for a close by the receiver, so a receiver that went away
//! between batches costs a reconnect, not a lost batch.

use std::{fmt, future::poll_fn, path::PathBuf, pin::Pin, sync::Arc, task::Poll, time::Duration};

use anyhow::Context;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

use super::{SyslogTarget, format};
use crate::config::{ConfigError, Source, malformed, value};

const CA: &str = "PAYMENTS_AUDIT_SYSLOG_CA";
const SERVER_NAME: &str = "PAYMENTS_AUDIT_SYSLOG_SERVER_NAME";
const CLIENT_CERT: &str = "PAYMENTS_AUDIT_SYSLOG_CLIENT_CERT";
const CLIENT_KEY: &str = "PAYMENTS_AUDIT_SYSLOG_CLIENT_KEY";

/// TLS to the receiver: the CA that signed its certificate, the name to
/// verify, and optionally a client certificate. The files are read again on
/// every connect, so rotated certificates are picked up without a restart.
#[derive(Clone)]
pub struct SyslogTls {
    ca: PathBuf,
    client: Option<(PathBuf, PathBuf)>,
    server_name: ServerName<'static>,
}

impl fmt::Debug for SyslogTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyslogTls")
            .field("ca", &self.ca)
            .field("client_cert", &self.client.as_ref().map(|(cert, _)| cert))
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl SyslogTls {
    /// Reads the TLS settings and builds the config once, so a bad file
    /// stops the start with the setting's name.
    pub(super) fn from_source(src: &dyn Source, host: &str) -> Result<Self, ConfigError> {
        let ca = value(src, CA)?.ok_or_else(|| ConfigError::Missing { name: CA.into() })?;
        let name = value(src, SERVER_NAME)?.unwrap_or_else(|| host.to_owned());
        let server_name = ServerName::try_from(name)
            .map_err(|_| malformed(SERVER_NAME, "not a DNS name or an IP address"))?;
        let client = match (value(src, CLIENT_CERT)?, value(src, CLIENT_KEY)?) {
            (Some(cert), Some(key)) => Some((cert.into(), key.into())),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::Missing {
                    name: CLIENT_KEY.into(),
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError::Missing {
                    name: CLIENT_CERT.into(),
                });
            }
        };
        let tls = Self {
            ca: ca.into(),
            client,
            server_name,
        };
        tls.client_config()?;
        Ok(tls)
    }

    fn client_config(&self) -> Result<Arc<ClientConfig>, ConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in certificates(CA, &self.ca)? {
            roots
                .add(cert)
                .map_err(|e| malformed(CA, format!("unusable CA certificate: {e}")))?;
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| malformed(CA, e.to_string()))?
            .with_root_certificates(roots);
        let config = match &self.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = certificates(CLIENT_CERT, cert)?;
                let key = private_key(key)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    malformed(CLIENT_KEY, format!("does not fit {CLIENT_CERT}: {e}"))
                })?
            }
        };
        Ok(Arc::new(config))
    }
}

/// With `PAYMENTS_AUDIT_SYSLOG_TLS=false`, TLS files would be ignored:
/// refuse them instead.
pub(super) fn refuse_tls_files(src: &dyn Source) -> Result<(), ConfigError> {
    for name in [CA, SERVER_NAME, CLIENT_CERT, CLIENT_KEY] {
        if value(src, name)?.is_some() {
            let reason = "set, but PAYMENTS_AUDIT_SYSLOG_TLS is false";
            return Err(malformed(name, reason));
        }
    }
    Ok(())
}

fn read(setting: &str, path: &PathBuf) -> Result<Vec<u8>, ConfigError> {
    let shown = path.display();
    std::fs::read(path)
        .map_err(|e| malformed(setting, format!("cannot read {shown}: {}", e.kind())))
}

fn certificates(
    setting: &str,
    path: &PathBuf,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = read(setting, path)?;
    let shown = path.display();
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|_| malformed(setting, format!("{shown} is not valid PEM")))?;
    if certs.is_empty() {
        return Err(malformed(setting, format!("{shown} holds no certificate")));
    }
    Ok(certs)
}

/// The key's bytes never appear in an error.
fn private_key(path: &PathBuf) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let pem = read(CLIENT_KEY, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        let reason = format!("{} holds no PEM private key", path.display());
        malformed(CLIENT_KEY, reason)
    })
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Stream for T {}

pub(super) struct SyslogSink {
    target: SyslogTarget,
    timeout: Duration,
    stream: Option<Box<dyn Stream>>,
}

impl SyslogSink {
    pub(super) fn new(target: SyslogTarget, timeout: Duration) -> Self {
        Self {
            target,
            timeout,
            stream: None,
        }
    }

    pub(super) fn target(&self) -> &SyslogTarget {
        &self.target
    }

    pub(super) fn is_connected(&self) -> bool {
        self.stream.is_some()
    }

    pub(super) fn disconnect(&mut self) {
        self.stream = None;
    }

    pub(super) async fn connect(&mut self) -> anyhow::Result<()> {
        let (host, port) = (self.target.host.as_str(), self.target.port);
        let tcp = tokio::time::timeout(self.timeout, TcpStream::connect((host, port)))
            .await
            .with_context(|| format!("connect to syslog receiver {host}:{port}: timed out"))?
            .with_context(|| format!("connect to syslog receiver {host}:{port}"))?;
        tcp.set_nodelay(true).context("set TCP_NODELAY")?;
        let stream: Box<dyn Stream> = match &self.target.tls {
            None => Box::new(tcp),
            Some(tls) => {
                let config = tls.client_config().context("reload syslog TLS files")?;
                let handshake = TlsConnector::from(config).connect(tls.server_name.clone(), tcp);
                let stream = tokio::time::timeout(self.timeout, handshake)
                    .await
                    .context("TLS handshake with the syslog receiver: timed out")?
                    .context("TLS handshake with the syslog receiver")?;
                Box::new(stream)
            }
        };
        self.stream = Some(stream);
        Ok(())
    }

    /// Writes the records as one burst of frames.
    pub(super) async fn send(&mut self, records: &[format::ExportRecord]) -> anyhow::Result<()> {
        let stream = self.stream.as_mut().context("not connected")?;
        anyhow::ensure!(
            !closed_by_peer(stream).await,
            "the syslog receiver closed the connection"
        );
        let host = format::hostname();
        let mut frames = Vec::with_capacity(records.len() * 640);
        for record in records {
            format::syslog_frame(record, host, &mut frames);
        }
        let write = async {
            stream.write_all(&frames).await?;
            stream.flush().await
        };
        tokio::time::timeout(self.timeout, write)
            .await
            .context("write to the syslog receiver: timed out")?
            .context("write to the syslog receiver")
    }
}

/// Polls the connection for reading once, without waiting. A syslog
/// receiver never sends data, so end of stream or an error means it closed
/// the connection (or reset it); anything else (TLS session tickets, which
/// rustls consumes itself) means it is still open.
async fn closed_by_peer(stream: &mut Box<dyn Stream>) -> bool {
    let mut buf = [0u8; 512];
    poll_fn(|cx| {
        let mut read = ReadBuf::new(&mut buf);
        Poll::Ready(match Pin::new(&mut **stream).poll_read(cx, &mut read) {
            Poll::Pending => false,
            Poll::Ready(Ok(())) => read.filled().is_empty(),
            Poll::Ready(Err(_)) => true,
        })
    })
    .await
}
