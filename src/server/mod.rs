//! Serves a router on one listener with our own accept loop, so every
//! connection gets the limits a public edge needs: a TLS handshake (and, for
//! mTLS, a client certificate) within a deadline, a deadline and a size cap
//! on request headers, a cap on open connections, and a graceful drain.
//!
//! Handlers see the peer as [`ConnectInfo<SocketAddr>`] and, under mTLS, the
//! verified client certificate as a [`ClientCertificate`] extension.

mod body;
mod tls;
mod x509;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, body::Body, extract::ConnectInfo, http::Request};
use chrono::{DateTime, Utc};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::{GracefulShutdown, Watcher},
};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

pub use body::body_deadline;
pub use tls::{ListenerTls, Reload, TlsReloader};

use crate::config::{ConfigError, Source, number};

/// Request line and headers together; past it the answer is 431.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// hyper's default, said out loud.
const MAX_HEADERS: usize = 100;
/// The connection's read buffer: headers plus some room.
const MAX_BUF_BYTES: usize = 32 * 1024;
/// How long to wait before accepting again after `accept` failed (such as
/// running out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Per-connection limits, the same for every listener.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Time for a request's line and headers to arrive once the connection
    /// waits for them; an idle keep-alive connection is closed after it too.
    pub header_read_timeout: Duration,
    /// Time for a whole request body to arrive once a handler reads it.
    pub body_read_timeout: Duration,
    /// Time for a TLS handshake, client certificate included.
    pub handshake_timeout: Duration,
    /// Open connections per listener; past it, new ones wait in the
    /// kernel's backlog.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

impl ConnectionLimits {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let ms = |name, default: Duration| {
            let default = u64::try_from(default.as_millis()).unwrap_or(u64::MAX);
            number(src, name, default, 100..=300_000).map(Duration::from_millis)
        };
        let defaults = Self::default();
        let max_connections = number(src, "PAYMENTS_MAX_CONNECTIONS", 1024, 1..=100_000)?;
        Ok(Self {
            header_read_timeout: ms(
                "PAYMENTS_HEADER_READ_TIMEOUT_MS",
                defaults.header_read_timeout,
            )?,
            body_read_timeout: ms("PAYMENTS_BODY_READ_TIMEOUT_MS", defaults.body_read_timeout)?,
            handshake_timeout: ms(
                "PAYMENTS_TLS_HANDSHAKE_TIMEOUT_MS",
                defaults.handshake_timeout,
            )?,
            max_connections: usize::try_from(max_connections).unwrap_or(defaults.max_connections),
        })
    }
}

/// The verified client certificate of an mTLS connection, as a request
/// extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCertificate {
    /// RFC 4514 form, such as `CN=ops-alice,O=Example`.
    pub subject: String,
    /// Lowercase hex of the SHA-256 of the certificate's DER bytes.
    pub sha256_fingerprint: String,
    pub not_after: DateTime<Utc>,
}

/// Serves `app` until `shutdown` turns true, then stops accepting and
/// waits for requests in flight (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<TlsReloader>>,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let reload = tls
        .clone()
        .map(|reloader| tokio::spawn(reloader.watch(shutdown.clone())));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connection = Connection {
        app,
        tls,
        limits: Arc::new(limits),
    };
    loop {
        let accepted = tokio::select! {
            accepted = accept(&listener, &slots) => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        if let Some((stream, peer, slot)) = accepted {
            let task = connection
                .clone()
                .run(stream, peer, graceful.watcher(), slot);
            tokio::spawn(task);
        }
    }
    drop(listener);
    graceful.shutdown().await;
    if let Some(reload) = reload
        && let Err(err) = reload.await
    {
        tracing::error!(error = %err, "tls reloader ended abnormally");
    }
}

/// Waits for a free slot, then for a connection. `None` after a failed
/// accept, which is logged and followed by a short pause.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let slot = match slots.clone().acquire_owned().await {
        Ok(slot) => slot,
        Err(closed) => {
            tracing::error!(error = %closed, "connection slots closed");
            std::future::pending().await
        }
    };
    match listener.accept().await {
        Ok((stream, peer)) => Some((stream, peer, slot)),
        Err(err) => {
            tracing::warn!(error = %err, "accept failed; pausing");
            tokio::time::sleep(ACCEPT_BACKOFF).await;
            None
        }
    }
}

/// What every connection of one listener shares.
#[derive(Clone)]
struct Connection {
    app: Router,
    tls: Option<Arc<TlsReloader>>,
    limits: Arc<ConnectionLimits>,
}

impl Connection {
    async fn run(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        watcher: Watcher,
        _slot: OwnedSemaphorePermit,
    ) {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, %peer, "cannot set TCP_NODELAY");
        }
        let Some(reloader) = &self.tls else {
            return self.http(stream, peer, None, watcher).await;
        };
        let acceptor = TlsAcceptor::from(reloader.current());
        let handshake =
            tokio::time::timeout(self.limits.handshake_timeout, acceptor.accept(stream));
        let stream = match handshake.await {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                tracing::info!(error = %err, %peer, "tls handshake refused");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "tls handshake timed out");
                return;
            }
        };
        let client = match client_certificate(stream.get_ref().1) {
            Ok(client) => client,
            Err(fingerprint) => {
                tracing::warn!(%peer, %fingerprint, "client certificate unreadable; closing");
                return;
            }
        };
        self.http(stream, peer, client, watcher).await;
    }

    async fn http<I>(
        self,
        io: I,
        peer: SocketAddr,
        client: Option<ClientCertificate>,
        watcher: Watcher,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let app = self.app;
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            if let Some(client) = &client {
                request.extensions_mut().insert(client.clone());
            }
            app.clone().oneshot(request)
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .max_header_size(MAX_HEADER_BYTES)
            .max_headers(MAX_HEADERS)
            .max_buf_size(MAX_BUF_BYTES);
        let connection = builder.serve_connection(TokioIo::new(io), service);
        if let Err(err) = watcher.watch(connection).await {
            tracing::debug!(error = %err, %peer, "connection closed with an error");
        }
    }
}

/// The verified end-entity certificate, if the client sent one. `Err` with
/// its fingerprint when it cannot be read, which closes the connection: a
/// holder we cannot name is not served.
fn client_certificate(tls: &rustls::ServerConnection) -> Result<Option<ClientCertificate>, String> {
    let Some(end_entity) = tls.peer_certificates().and_then(|chain| chain.first()) else {
        return Ok(None);
    };
    let sha256_fingerprint = hex::encode(Sha256::digest(end_entity));
    match x509::summarize(end_entity) {
        Some(summary) => Ok(Some(ClientCertificate {
            subject: summary.subject,
            sha256_fingerprint,
            not_after: summary.not_after,
        })),
        None => Err(sha256_fingerprint),
    }
}

#[cfg(test)]
mod tests;
