//! Certificates for the MQTT TLS listener and for HTTPS: read from PEM files, rebuilt when the
//! operator asks (SIGHUP), and the HTTPS acceptor that hands poem finished TLS connections.
//!
//! A reload builds the new configuration completely before it replaces the old one, so a bad
//! file (half-copied, wrong key) leaves the running certificates in force and is reported. New
//! connections use the new certificates; established ones keep theirs. This module knows no
//! MQTT and no HTTP routes; handshakes never run on an accept loop, so a client that stalls its
//! handshake delays only itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {message}")]
    File {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("the TLS configuration is not usable: {0}")]
    Config(String),
}

/// The files: the server's certificate chain and key, and optionally the CA whose client
/// certificates devices may present (mutual TLS on the MQTT listener).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The configurations in force, replaced whole by `reload`.
#[derive(Debug)]
pub struct Certificates {
    files: TlsFiles,
    current: RwLock<Configs>,
}

#[derive(Clone, Debug)]
struct Configs {
    /// With the client-certificate verifier, when a client CA is given.
    mqtt: Arc<ServerConfig>,
    /// Never asks for a client certificate: browsers would prompt for one.
    https: Arc<ServerConfig>,
}

impl Certificates {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let current = RwLock::new(build(&files)?);
        Ok(Self { files, current })
    }

    /// Reads the files again; on error the current certificates stay in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let configs = build(&self.files)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = configs;
        Ok(())
    }

    pub fn mqtt(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.configs().mqtt)
    }

    pub fn https(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.configs().https)
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn configs(&self) -> Configs {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn build(files: &TlsFiles) -> Result<Configs, TlsError> {
    let certs = read_certs(&files.cert, "the TLS certificate")?;
    if certs.is_empty() {
        return Err(TlsError::File {
            what: "the TLS certificate",
            path: files.cert.display().to_string(),
            message: "no PEM certificate in it".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::File {
        what: "the TLS key",
        path: files.key.display().to_string(),
        message: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = |verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>| {
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match verifier {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        builder
            .with_single_cert(certs.clone(), key.clone_key())
            .map(Arc::new)
            .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))
    };
    let verifier = match &files.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(path, "the client CA")? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Config(format!("client CA: {e}")))?;
            }
            // Optional: a device without a certificate may still log in with a password.
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| TlsError::Config(format!("client CA: {e}")))?;
            Some(verifier)
        }
        None => None,
    };
    Ok(Configs {
        mqtt: config(verifier)?,
        https: config(None)?,
    })
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |message: String| TlsError::File {
        what,
        path: path.display().to_string(),
        message,
    };
    CertificateDer::pem_file_iter(path)
        .map_err(|e| error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(e.to_string()))
}

/// The subject's common name of a DER certificate (the first one, when several).
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(name.to_owned())
}

/// The client certificate's common name of an established TLS connection.
pub fn peer_common_name(stream: &TlsStream<TcpStream>) -> Option<String> {
    let (_, session) = stream.get_ref();
    session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| common_name(cert))
}

/// HTTPS for poem: an accept loop that runs each handshake in a task of its own and passes
/// the finished connections on.
#[derive(Debug)]
pub struct HttpsAcceptor {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl HttpsAcceptor {
    /// Accepts on `listener` until `stop`; the accept loop runs as a task of the current
    /// runtime and ends with `stop` or when the acceptor is dropped.
    pub fn new(
        listener: std::net::TcpListener,
        certificates: Arc<Certificates>,
        stop: CancellationToken,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let (tx, ready) = mpsc::channel(64);
        let handshakes = tokio_util::task::TaskTracker::new();
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            tracing::warn!(error = %e, "HTTPS accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = stop.cancelled() => break,
                    () = tx.closed() => break,
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(certificates.https());
                let tx = tx.clone();
                handshakes.spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTPS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "HTTPS handshake timed out"),
                    }
                });
            }
            handshakes.close();
        });
        Ok(Self { local, ready })
    }
}

impl Acceptor for HttpsAcceptor {
    type Io = TlsStream<TcpStream>;

    fn local_addr(&self) -> Vec<LocalAddr> {
        vec![LocalAddr(self.local.into())]
    }

    async fn accept(
        &mut self,
    ) -> std::io::Result<(Self::Io, LocalAddr, RemoteAddr, poem::http::uri::Scheme)> {
        match self.ready.recv().await {
            Some((stream, peer)) => Ok((
                stream,
                LocalAddr(self.local.into()),
                RemoteAddr(peer.into()),
                poem::http::uri::Scheme::HTTPS,
            )),
            None => Err(std::io::Error::other("the HTTPS listener stopped")),
        }
    }
}
