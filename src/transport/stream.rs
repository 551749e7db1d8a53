//! The byte-stream layer between a socket and the framer.
//!
//! The IO loop reads and writes a [`Stream`] and never names the socket
//! type: a TLS session or another framing slots in here as a new variant
//! (with its own handshake state), without touching the loop.

use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

/// One connection's byte stream.
pub(crate) enum Stream {
    /// Plain TCP.
    Tcp(TcpStream),
}

impl Stream {
    /// Starts a non-blocking connect to `peer`.
    pub(crate) fn connect(peer: SocketAddr) -> io::Result<Stream> {
        TcpStream::connect(peer).map(Stream::Tcp)
    }

    pub(crate) fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let interest = Interest::READABLE | Interest::WRITABLE;
        match self {
            Stream::Tcp(s) => registry.register(s, token, interest),
        }
    }

    pub(crate) fn deregister(&mut self, registry: &Registry) {
        match self {
            Stream::Tcp(s) => {
                let _ = registry.deregister(s);
            }
        }
    }

    /// Whether a connect in progress finished: `Ok(true)` connected,
    /// `Ok(false)` still in progress.
    ///
    /// # Errors
    /// Why the connect failed.
    pub(crate) fn finish_connect(&mut self) -> io::Result<bool> {
        match self {
            Stream::Tcp(s) => match s.take_error() {
                Ok(Some(e)) | Err(e) => Err(e),
                Ok(None) => match s.peer_addr() {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
                    Err(e) => Err(e),
                },
            },
        }
    }

    /// Socket options for an established connection: no Nagle delay, and
    /// keepalive probes after `keepalive` of silence if set.
    pub(crate) fn configure(&self, keepalive: Option<Duration>) {
        match self {
            Stream::Tcp(s) => {
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
        }
    }

    pub(crate) fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(slices),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
        }
    }
}
