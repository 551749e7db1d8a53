//! The error-reply convention: a reply under a reserved packet code whose
//! body is a big-endian `i32` code and a UTF-8 message.
//!
//! Part of this crate's wire protocol (tbnet peers never send the reserved
//! code): responses are classified as they complete, wherever that is.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::Error;
use crate::packet::{Packet, PacketCode};

/// The packet code reserved for error replies: `i32::MIN`.
pub const ERROR_PCODE: PacketCode = PacketCode(i32::MIN);

/// Error-reply code: the server has no route for the request's packet code.
pub const ERROR_UNKNOWN_PCODE: i32 = -1;

/// Error-reply code: the request's body did not decode as its message type.
pub const ERROR_BAD_REQUEST: i32 = -2;

/// Error-reply code: the handler's response did not encode (a declared
/// service's codec refused it).
pub const ERROR_BAD_RESPONSE: i32 = -3;

/// The body of an error reply: `code` then `message`.
pub(crate) fn encode_error(code: i32, message: &str) -> Bytes {
    let mut body = BytesMut::with_capacity(4 + message.len());
    body.put_i32(code);
    body.put_slice(message.as_bytes());
    body.freeze()
}

/// Turns an error reply into [`Error::Remote`]; other packets pass through.
pub(crate) fn classify(response: Packet) -> Result<Packet, Error> {
    if response.pcode() != ERROR_PCODE {
        return Ok(response);
    }
    let mut body = response.into_body();
    if body.len() < 4 {
        return Err(Error::BadMessage {
            pcode: ERROR_PCODE.get(),
            reason: "error reply shorter than its code".into(),
        });
    }
    let code = body.get_i32();
    let message = String::from_utf8_lossy(&body).into();
    Err(Error::Remote { code, message })
}
