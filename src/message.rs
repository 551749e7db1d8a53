//! Typed messages on top of packets, and the error-reply convention.
//!
//! A [`Message`] knows its packet code and how to write itself into a body
//! and read itself back. The wire format is unchanged: a message is a
//! packet whose body the application chose.
//!
//! # Error replies
//! A server may answer a request with an *error reply* instead of a
//! response: a packet with the reserved code [`ERROR_PCODE`] (`i32::MIN`)
//! whose body is a big-endian `i32` error code followed by a UTF-8 message.
//! This crate's clients turn it into [`Error::Remote`]; raw tbnet peers never
//! see it unless they call a server that sends one. Negative codes are the
//! framework's: [`ERROR_UNKNOWN_PCODE`] (no route for the request's code)
//! and [`ERROR_BAD_REQUEST`] (its body did not decode); applications use
//! codes from 0 up.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};

use crate::completion::ResponseFuture;
use crate::error::Error;
use crate::packet::{Packet, PacketCode};

pub use crate::proto::reply::{ERROR_BAD_REQUEST, ERROR_PCODE, ERROR_UNKNOWN_PCODE};

/// Why a body could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError(String);

impl DecodeError {
    /// An error saying what was wrong with the body.
    pub fn new(reason: impl Into<String>) -> Self {
        DecodeError(reason.into())
    }

    /// The body ended before the field named `what`.
    pub fn truncated(what: &str) -> Self {
        DecodeError(format!("body ends before {what}"))
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DecodeError {}

/// A request or response type with its own packet code and body encoding.
///
/// # Examples
/// ```
/// use bytes::{Buf, BufMut, Bytes, BytesMut};
/// use tbnet::{DecodeError, Message, PacketCode};
///
/// #[derive(Debug, PartialEq)]
/// struct Add { a: i64, b: i64 }
///
/// impl Message for Add {
///     const PCODE: PacketCode = PacketCode(10);
///     fn encode(&self, dst: &mut BytesMut) {
///         dst.put_i64(self.a);
///         dst.put_i64(self.b);
///     }
///     fn decode(mut src: Bytes) -> Result<Self, DecodeError> {
///         if src.len() != 16 {
///             return Err(DecodeError::new(format!("expected 16 bytes, got {}", src.len())));
///         }
///         Ok(Add { a: src.get_i64(), b: src.get_i64() })
///     }
/// }
///
/// let packet = Add { a: 2, b: 3 }.to_packet();
/// assert_eq!(packet.pcode(), PacketCode(10));
/// assert_eq!(Add::from_packet(packet).unwrap(), Add { a: 2, b: 3 });
/// ```
pub trait Message: Sized + Send + 'static {
    /// The packet code this message travels under.
    const PCODE: PacketCode;

    /// Appends the body.
    fn encode(&self, dst: &mut BytesMut);

    /// Reads the body back.
    ///
    /// # Errors
    /// A [`DecodeError`] saying what was wrong; it fails only the request
    /// or response that carried it.
    fn decode(src: Bytes) -> Result<Self, DecodeError>;

    /// The message as a packet (channel id unset).
    fn to_packet(&self) -> Packet {
        let mut body = BytesMut::new();
        self.encode(&mut body);
        Packet::new(Self::PCODE, body.freeze())
    }

    /// Decodes a packet carrying this message.
    ///
    /// # Errors
    /// [`Error::BadMessage`] if the packet code is not [`PCODE`](Self::PCODE)
    /// or the body does not decode.
    fn from_packet(packet: Packet) -> Result<Self, Error> {
        let pcode = packet.pcode();
        if pcode != Self::PCODE {
            return Err(Error::BadMessage {
                pcode: pcode.get(),
                reason: format!("expected packet code {}", Self::PCODE).into(),
            });
        }
        Self::decode(packet.into_body()).map_err(|e| Error::BadMessage {
            pcode: pcode.get(),
            reason: e.to_string().into(),
        })
    }
}

pub(crate) use crate::proto::reply::encode_error;

/// A [`ResponseFuture`] whose response is decoded as `M`.
#[must_use = "a MessageFuture does nothing unless polled, and dropping it cancels the request"]
pub struct MessageFuture<M> {
    inner: ResponseFuture,
    _message: PhantomData<fn() -> M>,
}

impl<M> fmt::Debug for MessageFuture<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("MessageFuture").field(&self.inner).finish()
    }
}

impl<M: Message> MessageFuture<M> {
    pub(crate) fn new(inner: ResponseFuture) -> Self {
        MessageFuture {
            inner,
            _message: PhantomData,
        }
    }
}

impl<M: Message> Future for MessageFuture<M> {
    type Output = Result<M, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.inner)
            .poll(cx)
            .map(|result| result.and_then(M::from_packet))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::reply::classify;

    #[test]
    fn error_replies_round_trip() {
        let packet = Packet::new(ERROR_PCODE, encode_error(42, "no such key"));
        match classify(packet) {
            Err(Error::Remote { code, message }) => {
                assert_eq!((code, &*message), (42, "no such key"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn short_error_replies_are_bad_messages() {
        let packet = Packet::new(ERROR_PCODE, &b"\0\0"[..]);
        assert!(matches!(classify(packet), Err(Error::BadMessage { .. })));
    }

    #[test]
    fn ordinary_packets_pass_through() {
        let packet = Packet::new(5, "fine");
        assert_eq!(classify(packet.clone()).unwrap(), packet);
    }
}
