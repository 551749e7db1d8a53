//! The byte-stream layer between a socket and the framer.
//!
//! The IO loop reads and writes a [`Stream`] and never names the socket
//! type: a TLS session (feature `tls`) is a variant here, with its own
//! handshake state; the loop only asks whether a handshake is still going
//! on and whether the stream holds bytes of its own to flush.

use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

/// What a connection's bytes travel in: plain TCP, or TLS with the
/// settings of its listener or connection manager.
#[derive(Clone, Default)]
pub(crate) enum Security {
    /// Plain TCP: tbnet's frames as the C++ library puts them on the wire.
    #[default]
    Plain,
    /// TLS, as the client.
    #[cfg(feature = "tls")]
    Client(super::tls::TlsClientConfig),
    /// TLS, as the server.
    #[cfg(feature = "tls")]
    Server(super::tls::TlsServerConfig),
}

/// One connection's byte stream.
pub(crate) enum Stream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// A TLS session over TCP.
    #[cfg(feature = "tls")]
    Tls(Box<super::tls::TlsStream>),
}

impl Stream {
    /// Starts a non-blocking connect to `peer`.
    pub(crate) fn connect(peer: SocketAddr, security: &Security) -> io::Result<Stream> {
        let socket = TcpStream::connect(peer)?;
        match security {
            Security::Plain => Ok(Stream::Tcp(socket)),
            #[cfg(feature = "tls")]
            Security::Client(tls) => tls.session(socket, peer).map(|s| Stream::Tls(Box::new(s))),
            // Never plaintext in place of TLS, whatever the mix-up.
            #[cfg(feature = "tls")]
            Security::Server(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a server TLS configuration cannot open a client connection",
            )),
        }
    }

    /// An accepted connection from `peer`, as its listener's `security`
    /// says.
    pub(crate) fn accept(
        socket: TcpStream,
        peer: SocketAddr,
        security: &Security,
    ) -> io::Result<Stream> {
        let _ = peer;
        match security {
            #[cfg(feature = "tls")]
            Security::Server(tls) => tls.session(socket, peer).map(|s| Stream::Tls(Box::new(s))),
            Security::Plain => Ok(Stream::Tcp(socket)),
            // Never plaintext in place of TLS, whatever the mix-up.
            #[cfg(feature = "tls")]
            Security::Client(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a client TLS configuration cannot accept a connection",
            )),
        }
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.socket(),
        }
    }

    fn tcp_mut(&mut self) -> &mut TcpStream {
        match self {
            Stream::Tcp(s) => s,
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.socket_mut(),
        }
    }

    pub(crate) fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let interest = Interest::READABLE | Interest::WRITABLE;
        registry.register(self.tcp_mut(), token, interest)
    }

    pub(crate) fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(self.tcp_mut());
    }

    /// Whether a handshake (TLS) is still going on.
    pub(crate) fn is_handshaking(&self) -> bool {
        match self {
            Stream::Tcp(_) => false,
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.is_handshaking(),
        }
    }

    /// Whether the stream holds bytes of its own not yet on the socket
    /// (handshake messages, encrypted records).
    pub(crate) fn has_backlog(&self) -> bool {
        match self {
            Stream::Tcp(_) => false,
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.has_backlog(),
        }
    }

    /// Writes the stream's own bytes to the socket.
    ///
    /// # Errors
    /// `WouldBlock` if the socket takes no more; any write error.
    pub(crate) fn flush_backlog(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(_) => Ok(()),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.flush(),
        }
    }

    /// Whether a connect in progress finished: `Ok(true)` connected,
    /// `Ok(false)` still in progress.
    ///
    /// # Errors
    /// Why the connect failed.
    pub(crate) fn finish_connect(&mut self) -> io::Result<bool> {
        let s = self.tcp();
        match s.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match s.peer_addr() {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
                Err(e) => Err(e),
            },
        }
    }

    /// Socket options for an established connection: no Nagle delay, and
    /// keepalive probes after `keepalive` of silence if set.
    pub(crate) fn configure(&self, keepalive: Option<Duration>) {
        let s = self.tcp();
        let _ = s.set_nodelay(true);
        if let Some(idle) = keepalive {
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(idle);
            if let Err(e) = socket2::SockRef::from(s).set_tcp_keepalive(&keepalive) {
                tracing::debug!(error = %e, "could not enable TCP keepalive");
            }
        }
    }

    pub(crate) fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(slices),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.write_vectored(slices),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.read(buf),
        }
    }
}
