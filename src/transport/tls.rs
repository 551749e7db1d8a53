//! TLS over a connection's TCP socket (feature `tls`), with rustls.
//!
//! The crypto provider is rustls' `ring` one: it builds in a fraction of
//! the time `aws-lc-rs` takes (no cmake, a small C and assembly build) and
//! covers TLS 1.2 and 1.3 with the usual cipher suites.
//!
//! The frames inside are tbnet's, unchanged. The IO loop drives a
//! [`TlsStream`] like a socket, through the byte-stream seam
//! (`transport::stream`): reading feeds records to the session and returns
//! plaintext; writing encrypts into the session and pushes records out.
//! Bytes a peer sends that are not TLS (plaintext frames, garbage) fail the
//! session and close only that connection.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::error::Error;

/// Most bytes a session buffers on its own: plaintext written before the
/// handshake ended, or records the socket has not taken yet.
const SESSION_BUFFER: usize = 64 * 1024;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_error(what: &str, e: impl fmt::Display) -> Error {
    Error::from(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what}: {e}"),
    ))
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config_error(what, e))?;
    if certs.is_empty() {
        return Err(config_error(what, "no certificate in the PEM data"));
    }
    Ok(certs)
}

fn key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| config_error("private key", e))
}

fn roots(pem: &[u8], what: &str) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in certs(pem, what)? {
        roots.add(cert).map_err(|e| config_error(what, e))?;
    }
    Ok(roots)
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path)
        .map_err(|e| Error::from(io::Error::new(e.kind(), format!("{}: {e}", path.display()))))
}

/// A listener's TLS settings: its certificate chain and key, and
/// optionally the CA whose certificates clients must present (mutual TLS).
///
/// Set it with [`ListenOptions::tls`](crate::ListenOptions::tls).
///
/// # Examples
/// ```no_run
/// use tbnet::{ListenOptions, Packet, Responder, TlsServerConfig, Transport};
///
/// let tls = TlsServerConfig::from_pem_files("server.pem", "server.key", Some("clients-ca.pem".as_ref()))?;
/// let transport = Transport::builder().start()?;
/// let echo = |req: Packet, resp: Responder| { let _ = resp.reply(req.reply(req.body().clone())); };
/// transport.listen_with_options("127.0.0.1:0", echo, ListenOptions::new().tls(tls))?;
/// # Ok::<(), tbnet::Error>(())
/// ```
#[derive(Clone)]
pub struct TlsServerConfig {
    config: Arc<ServerConfig>,
}

impl fmt::Debug for TlsServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServerConfig").finish_non_exhaustive()
    }
}

impl TlsServerConfig {
    /// Serves `cert_chain_pem` (the server's certificate first, then any
    /// intermediates) with the private key in `key_pem` (PKCS#8, PKCS#1 or
    /// SEC1); clients need no certificate.
    ///
    /// # Errors
    /// [`Error::Io`] (`InvalidInput`) if the PEM data holds no certificate
    /// or key, or they do not match.
    pub fn new(cert_chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, Error> {
        Self::build(cert_chain_pem, key_pem, None)
    }

    /// Like [`new`](Self::new), and requires every client to present a
    /// certificate issued by a CA in `client_ca_pem` (mutual TLS): a peer
    /// without one does not get in.
    ///
    /// # Errors
    /// As for [`new`](Self::new); also if `client_ca_pem` holds no usable
    /// CA certificate.
    pub fn mutual(
        cert_chain_pem: &[u8],
        key_pem: &[u8],
        client_ca_pem: &[u8],
    ) -> Result<Self, Error> {
        Self::build(cert_chain_pem, key_pem, Some(client_ca_pem))
    }

    /// Reads the PEM files and calls [`new`](Self::new), or
    /// [`mutual`](Self::mutual) with a client CA.
    ///
    /// # Errors
    /// [`Error::Io`] if a file cannot be read; as for [`new`](Self::new).
    pub fn from_pem_files(
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
        client_ca: Option<&Path>,
    ) -> Result<Self, Error> {
        let chain = read(cert_chain.as_ref())?;
        let key = read(key.as_ref())?;
        let ca = client_ca.map(read).transpose()?;
        Self::build(&chain, &key, ca.as_deref())
    }

    /// Uses a rustls configuration as it is (its own provider, verifier,
    /// protocol versions).
    pub fn from_rustls(config: Arc<ServerConfig>) -> Self {
        TlsServerConfig { config }
    }

    fn build(chain: &[u8], key_pem: &[u8], client_ca: Option<&[u8]>) -> Result<Self, Error> {
        let chain = certs(chain, "certificate chain")?;
        let key = key(key_pem)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error("TLS versions", e))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(ca, "client CA")?),
                    provider(),
                )
                .build()
                .map_err(|e| config_error("client CA", e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| config_error("certificate and key", e))?;
        Ok(TlsServerConfig {
            config: Arc::new(config),
        })
    }

    pub(crate) fn session(&self, socket: TcpStream, peer: SocketAddr) -> io::Result<TlsStream> {
        let session = ServerConnection::new(self.config.clone()).map_err(io::Error::other)?;
        Ok(TlsStream::new(socket, peer, session.into()))
    }
}

/// A connection manager's TLS settings: the CAs it trusts, the name the
/// servers' certificates must carry, and optionally a client certificate
/// to present (for servers that require one).
///
/// Set it with [`ConnectionManager::with_tls`](crate::ConnectionManager::with_tls).
///
/// # Examples
/// ```no_run
/// use tbnet::{ConnectionManager, TlsClientConfig, Transport};
///
/// let tls = TlsClientConfig::from_pem_files("ca.pem", "server.example", None)?;
/// let transport = Transport::builder().start()?;
/// let client = ConnectionManager::new(&transport).with_tls(tls);
/// # Ok::<(), tbnet::Error>(())
/// ```
#[derive(Clone)]
pub struct TlsClientConfig {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl fmt::Debug for TlsClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClientConfig")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsClientConfig {
    /// Trusts the CA certificates in `ca_pem`, and expects every server's
    /// certificate to be valid for `server_name` (a DNS name or an IP
    /// address).
    ///
    /// # Errors
    /// [`Error::Io`] (`InvalidInput`) if `ca_pem` holds no usable
    /// certificate or `server_name` is not a valid name.
    pub fn new(ca_pem: &[u8], server_name: &str) -> Result<Self, Error> {
        Self::build(ca_pem, server_name, None)
    }

    /// Like [`new`](Self::new), presenting the certificate chain in
    /// `cert_chain_pem` with the key in `key_pem` to servers that ask for
    /// one.
    ///
    /// # Errors
    /// As for [`new`](Self::new); also if the certificate or key are
    /// missing or do not match.
    pub fn with_client_cert(
        ca_pem: &[u8],
        server_name: &str,
        cert_chain_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, Error> {
        Self::build(ca_pem, server_name, Some((cert_chain_pem, key_pem)))
    }

    /// Reads the PEM files and calls [`new`](Self::new), or
    /// [`with_client_cert`](Self::with_client_cert) with a certificate and
    /// key.
    ///
    /// # Errors
    /// [`Error::Io`] if a file cannot be read; as for [`new`](Self::new).
    pub fn from_pem_files(
        ca: impl AsRef<Path>,
        server_name: &str,
        client_cert: Option<(&Path, &Path)>,
    ) -> Result<Self, Error> {
        let ca = read(ca.as_ref())?;
        let pair = match client_cert {
            Some((cert, key)) => Some((read(cert)?, read(key)?)),
            None => None,
        };
        let pair = pair.as_ref().map(|(c, k)| (&c[..], &k[..]));
        Self::build(&ca, server_name, pair)
    }

    /// Uses a rustls configuration as it is, expecting `server_name`.
    ///
    /// # Errors
    /// [`Error::Io`] (`InvalidInput`) if `server_name` is not a valid name.
    pub fn from_rustls(config: Arc<ClientConfig>, server_name: &str) -> Result<Self, Error> {
        Ok(TlsClientConfig {
            config,
            server_name: name(server_name)?,
        })
    }

    fn build(ca: &[u8], server_name: &str, client: Option<(&[u8], &[u8])>) -> Result<Self, Error> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error("TLS versions", e))?
            .with_root_certificates(roots(ca, "CA certificates")?);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((chain, key_pem)) => builder
                .with_client_auth_cert(certs(chain, "client certificate")?, key(key_pem)?)
                .map_err(|e| config_error("client certificate and key", e))?,
        };
        Ok(TlsClientConfig {
            config: Arc::new(config),
            server_name: name(server_name)?,
        })
    }

    pub(crate) fn session(&self, socket: TcpStream, peer: SocketAddr) -> io::Result<TlsStream> {
        let session = ClientConnection::new(self.config.clone(), self.server_name.clone())
            .map_err(io::Error::other)?;
        Ok(TlsStream::new(socket, peer, session.into()))
    }
}

fn name(server_name: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(server_name.to_string()).map_err(|e| config_error("server name", e))
}

/// A TLS session over a non-blocking TCP socket.
pub(crate) struct TlsStream {
    socket: TcpStream,
    peer: SocketAddr,
    session: rustls::Connection,
}

impl TlsStream {
    fn new(socket: TcpStream, peer: SocketAddr, mut session: rustls::Connection) -> Self {
        session.set_buffer_limit(Some(SESSION_BUFFER));
        TlsStream {
            socket,
            peer,
            session,
        }
    }

    pub(crate) fn socket(&self) -> &TcpStream {
        &self.socket
    }

    pub(crate) fn socket_mut(&mut self) -> &mut TcpStream {
        &mut self.socket
    }

    pub(crate) fn is_handshaking(&self) -> bool {
        self.session.is_handshaking()
    }

    pub(crate) fn has_backlog(&self) -> bool {
        self.session.wants_write()
    }

    /// Writes the session's queued records.
    ///
    /// # Errors
    /// `WouldBlock` when the socket takes no more; any write error.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        while self.session.wants_write() {
            if self.session.write_tls(&mut self.socket)? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    /// Plaintext in: returns how much the session took. `WouldBlock` when
    /// it takes none until the socket takes its records.
    pub(crate) fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        self.flush()?;
        let n = self.session.writer().write_vectored(slices)?;
        if n == 0 && slices.iter().any(|s| !s.is_empty()) {
            // The session's buffer is full (mid-handshake): the records it
            // sends when the handshake ends make room; reading finishes it.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.flush() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }
}

impl Read for TlsStream {
    /// Plaintext out: reads records from the socket until the session has
    /// plaintext, the socket would block, or the stream ended (`Ok(0)`).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.session.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Closed without close_notify: an end of stream all the same.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if self.session.read_tls(&mut self.socket)? == 0 {
                return Ok(0);
            }
            if let Err(e) = self.session.process_new_packets() {
                tracing::warn!(peer = %self.peer, reason = %e, "closing connection: TLS failed");
                // Tell the peer why, if the socket takes it.
                let _ = self.flush();
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // Handshake messages, and plaintext queued while it went on.
            match self.flush() {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
        }
    }
}
