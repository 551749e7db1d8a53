//! The one error type every request can end with, and the error that hands a
//! rejected packet back.

use std::fmt;
use std::io;
use std::sync::Arc;

use crate::proto::FrameError;

/// Why a request, a connection or a submission failed.
///
/// Every pending request ends exactly once: with its response or with one of
/// these. The type is `Clone` because one lost connection fails many requests
/// with the same cause.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Error {
    /// The request's deadline passed before its response arrived.
    Timeout,
    /// The connection the request travelled on closed before its response
    /// arrived (peer closed, reset, protocol error, or connect failure).
    Disconnected,
    /// The transport stopped, or the `ConnectionManager` that sent the
    /// request was dropped, or its completion was dropped without firing,
    /// before the request finished.
    Shutdown,
    /// The caller gave up on the request (dropped its `ResponseFuture` or
    /// `WaitObject`, or cancelled it); nobody is left to see this outcome
    /// but callbacks and counters.
    Cancelled,
    /// A limit refused the request: the connection's pending requests are
    /// at its queue limit
    /// ([`with_queue_limit`](crate::ConnectionManager::with_queue_limit)),
    /// its unwritten bytes are at
    /// [`max_outbound`](crate::TransportBuilder::max_outbound), or (for
    /// callbacks) the transport's queue of callbacks waiting to run is at
    /// [`callback_queue`](crate::TransportBuilder::callback_queue).
    QueueFull,
    /// A frame announced a body longer than the configured maximum.
    FrameTooLarge {
        /// The announced body length in bytes.
        len: u64,
        /// The configured maximum body length in bytes.
        max: usize,
    },
    /// A frame could not be decoded (wrong flag, negative length, ...).
    MalformedFrame(FrameError),
    /// An operating-system level I/O error.
    Io(Arc<io::Error>),
    /// A message body could not be decoded as the expected type (the
    /// connection is fine; only this request failed).
    BadMessage {
        /// The packet code the body arrived under.
        pcode: i32,
        /// What was wrong with it.
        reason: Arc<str>,
    },
    /// An address spec (`"tcp:host:port"` or `"host:port"`) could not be
    /// parsed or resolved ([`ToEndpoint`](crate::ToEndpoint)).
    InvalidAddress {
        /// The spec as given.
        spec: Arc<str>,
        /// What was wrong with it.
        reason: Arc<str>,
    },
    /// The server answered with an error reply (see
    /// [`ERROR_PCODE`](crate::ERROR_PCODE)): the request arrived and was
    /// refused by the application.
    Remote {
        /// The application's error code; negative codes are the
        /// framework's ([`ERROR_UNKNOWN_PCODE`](crate::ERROR_UNKNOWN_PCODE),
        /// [`ERROR_BAD_REQUEST`](crate::ERROR_BAD_REQUEST)).
        code: i32,
        /// The error's text.
        message: Arc<str>,
    },
}

impl Error {
    /// Whether this error means the request's deadline passed.
    ///
    /// # Examples
    /// ```
    /// assert!(tbnet::Error::Timeout.is_timeout());
    /// assert!(!tbnet::Error::Shutdown.is_timeout());
    /// ```
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Timeout => f.write_str("request timed out"),
            Error::Disconnected => f.write_str("connection closed before the response arrived"),
            Error::Shutdown => f.write_str("transport shut down"),
            Error::Cancelled => f.write_str("request cancelled by its caller"),
            Error::QueueFull => f.write_str("connection queue is full"),
            Error::FrameTooLarge { len, max } => {
                write!(f, "frame body of {len} bytes exceeds the maximum of {max}")
            }
            Error::MalformedFrame(e) => write!(f, "malformed frame: {e}"),
            Error::Io(e) => write!(f, "i/o error: {e}"),
            Error::BadMessage { pcode, reason } => {
                write!(f, "bad message body for packet code {pcode}: {reason}")
            }
            Error::Remote { code, message } => write!(f, "server error {code}: {message}"),
            Error::InvalidAddress { spec, reason } => {
                write!(f, "invalid address {spec:?}: {reason}")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(&**e),
            Error::MalformedFrame(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(Arc::new(e))
    }
}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLarge { len, max } => Error::FrameTooLarge { len, max },
            other => Error::MalformedFrame(other),
        }
    }
}

/// A submission that was refused, with the value that could not be sent.
///
/// Like crossbeam's `SendError`, it hands the value back so the caller can
/// retry or reroute it, and its `Debug` does not require `T: Debug`.
///
/// # Examples
/// ```
/// use tbnet::{Error, Packet, SendError};
///
/// let err = SendError::new(Error::QueueFull, Packet::new(7, "hello"));
/// assert!(matches!(err.error(), Error::QueueFull));
/// assert_eq!(err.into_inner().body(), "hello");
/// ```
pub struct SendError<T> {
    error: Error,
    value: T,
}

impl<T> SendError<T> {
    /// Pairs `error` with the `value` that could not be sent.
    pub fn new(error: Error, value: T) -> Self {
        SendError { error, value }
    }

    /// Why the value was refused.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The value that was refused, given back.
    pub fn into_inner(self) -> T {
        self.value
    }

    /// Splits into the error and the value.
    pub fn into_parts(self) -> (Error, T) {
        (self.error, self.value)
    }
}

impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Display for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "send failed: {}", self.error)
    }
}

impl<T> std::error::Error for SendError<T> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<T> From<SendError<T>> for Error {
    fn from(e: SendError<T>) -> Self {
        e.error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + Clone>() {}

    #[test]
    fn error_is_send_sync_clone() {
        assert_send_sync::<Error>();
    }

    #[test]
    fn display_is_lowercase_without_period() {
        let all = [
            Error::Timeout,
            Error::Disconnected,
            Error::Shutdown,
            Error::Cancelled,
            Error::QueueFull,
            Error::FrameTooLarge { len: 9, max: 8 },
            Error::MalformedFrame(FrameError::NegativeLength(-1)),
            Error::from(io::Error::other("boom")),
            Error::BadMessage {
                pcode: 1,
                reason: "short".into(),
            },
            Error::Remote {
                code: 7,
                message: "no such key".into(),
            },
        ];
        for e in all {
            let s = e.to_string();
            assert!(s.chars().next().unwrap().is_lowercase(), "{s}");
            assert!(!s.ends_with('.'), "{s}");
        }
    }

    #[test]
    fn too_large_frame_error_maps_to_its_own_variant() {
        let e = Error::from(FrameError::TooLarge { len: 10, max: 5 });
        assert!(matches!(e, Error::FrameTooLarge { len: 10, max: 5 }));
    }
}
