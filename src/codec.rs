//! Body codecs: how a request or response value becomes a packet body and
//! back, for [`service!`](macro@crate::service) declarations and by hand.
//!
//! A codec is a marker type implementing [`Codec<T>`] for the values it can
//! carry; the wire format around the body (tbnet's 16-byte header) never
//! changes.
//!
//! | codec | carries | feature |
//! |-------|---------|---------|
//! | [`Raw`] | [`Bytes`] and `String` bodies as they are | — |
//! | [`MessageBody`] | any [`Message`], by its own `encode`/`decode` | — |
//! | `Postcard` | any `serde::Serialize + serde::de::DeserializeOwned` type | `serde` |
//! | `Protobuf` | any `prost::Message + Default` type (protobuf) | `prost` |
//!
//! Decoding never trusts a length inside the body beyond the bytes that
//! arrived (the body itself is bounded by the streamer's maximum frame
//! size): a body that does not decode is an error for its one request, on
//! the client [`Error::BadMessage`], on the server an error reply with code
//! [`ERROR_BAD_REQUEST`](crate::ERROR_BAD_REQUEST).

use std::fmt;

use bytes::{Bytes, BytesMut};

use crate::error::Error;
use crate::message::{DecodeError, Message};
use crate::packet::{Packet, PacketCode};

/// Why a value could not be encoded as a body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodeError(String);

impl EncodeError {
    /// An error saying what could not be encoded.
    pub fn new(reason: impl Into<String>) -> Self {
        EncodeError(reason.into())
    }
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EncodeError {}

/// Turns values of type `T` into packet bodies and back.
///
/// # Examples
/// ```
/// use bytes::Bytes;
/// use tbnet::codec::{Codec, Raw};
/// use tbnet::PacketCode;
///
/// let packet = Raw::to_packet(PacketCode(3), &Bytes::from("hello")).unwrap();
/// assert_eq!(packet.body(), "hello");
/// let back: Bytes = Raw::from_packet(packet).unwrap();
/// assert_eq!(back, "hello");
/// ```
pub trait Codec<T>: 'static {
    /// Appends `value`'s encoding to `dst`.
    ///
    /// # Errors
    /// An [`EncodeError`] if the codec cannot represent `value`.
    fn encode(value: &T, dst: &mut BytesMut) -> Result<(), EncodeError>;

    /// Reads a value back from a whole body.
    ///
    /// # Errors
    /// A [`DecodeError`] saying what was wrong with the body.
    fn decode(src: Bytes) -> Result<T, DecodeError>;

    /// `value` as a packet with code `pcode` (channel id unset).
    ///
    /// # Errors
    /// [`Error::BadMessage`] if `value` does not encode.
    fn to_packet(pcode: PacketCode, value: &T) -> Result<Packet, Error> {
        let mut body = BytesMut::new();
        Self::encode(value, &mut body).map_err(|e| Error::BadMessage {
            pcode: pcode.get(),
            reason: format!("cannot encode: {e}").into(),
        })?;
        Ok(Packet::new(pcode, body.freeze()))
    }

    /// The value carried by `packet`'s body (its code is not checked).
    ///
    /// # Errors
    /// [`Error::BadMessage`] if the body does not decode.
    fn from_packet(packet: Packet) -> Result<T, Error> {
        let pcode = packet.pcode().get();
        Self::decode(packet.into_body()).map_err(|e| Error::BadMessage {
            pcode,
            reason: e.to_string().into(),
        })
    }
}

/// Bodies as they are: [`Bytes`] unchanged, `String` checked to be UTF-8.
#[derive(Clone, Copy, Debug, Default)]
pub struct Raw;

impl Codec<Bytes> for Raw {
    fn encode(value: &Bytes, dst: &mut BytesMut) -> Result<(), EncodeError> {
        dst.extend_from_slice(value);
        Ok(())
    }

    fn decode(src: Bytes) -> Result<Bytes, DecodeError> {
        Ok(src)
    }
}

impl Codec<String> for Raw {
    fn encode(value: &String, dst: &mut BytesMut) -> Result<(), EncodeError> {
        dst.extend_from_slice(value.as_bytes());
        Ok(())
    }

    fn decode(src: Bytes) -> Result<String, DecodeError> {
        String::from_utf8(src.to_vec()).map_err(|_| DecodeError::new("body is not UTF-8"))
    }
}

/// Any [`Message`], by its own hand-written `encode`/`decode` (its
/// [`PCODE`](Message::PCODE) is not used: a service names its codes).
#[derive(Clone, Copy, Debug, Default)]
pub struct MessageBody;

impl<M: Message> Codec<M> for MessageBody {
    fn encode(value: &M, dst: &mut BytesMut) -> Result<(), EncodeError> {
        value.encode(dst);
        Ok(())
    }

    fn decode(src: Bytes) -> Result<M, DecodeError> {
        M::decode(src)
    }
}

#[cfg(feature = "serde")]
pub use self::postcard_codec::Postcard;

#[cfg(feature = "serde")]
mod postcard_codec {
    use super::*;

    /// Any serde type, in [postcard]'s compact format (feature `serde`).
    ///
    /// postcard is a stable, documented binary format (varint integers,
    /// length-prefixed strings and sequences, no field names): small and
    /// fast, and its decoder checks every length against the bytes that
    /// arrived. A body with bytes left after the value is refused.
    ///
    /// # Examples
    /// ```
    /// use serde::{Deserialize, Serialize};
    /// use tbnet::codec::{Codec, Postcard};
    /// use tbnet::PacketCode;
    ///
    /// #[derive(Debug, PartialEq, Serialize, Deserialize)]
    /// struct Point { x: i32, y: i32 }
    ///
    /// let packet = Postcard::to_packet(PacketCode(1), &Point { x: 1, y: -2 }).unwrap();
    /// assert_eq!(packet.body().len(), 2);
    /// let back: Point = Postcard::from_packet(packet).unwrap();
    /// assert_eq!(back, Point { x: 1, y: -2 });
    /// ```
    ///
    /// [postcard]: https://docs.rs/postcard
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Postcard;

    impl<T> Codec<T> for Postcard
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
    {
        fn encode(value: &T, dst: &mut BytesMut) -> Result<(), EncodeError> {
            let out = std::mem::take(dst);
            *dst = postcard::to_extend(value, out).map_err(|e| EncodeError::new(e.to_string()))?;
            Ok(())
        }

        fn decode(src: Bytes) -> Result<T, DecodeError> {
            let (value, rest) =
                postcard::take_from_bytes(&src).map_err(|e| DecodeError::new(e.to_string()))?;
            if !rest.is_empty() {
                return Err(DecodeError::new(format!(
                    "{} unexpected trailing bytes",
                    rest.len()
                )));
            }
            Ok(value)
        }
    }
}

#[cfg(feature = "prost")]
pub use self::prost_codec::Protobuf;

#[cfg(feature = "prost")]
mod prost_codec {
    use super::*;

    /// Any protobuf message generated or derived with [prost] (feature
    /// `prost`), so a service can share `.proto` files with other stacks.
    ///
    /// # Examples
    /// ```
    /// use tbnet::codec::{Codec, Protobuf};
    /// use tbnet::PacketCode;
    ///
    /// #[derive(Clone, PartialEq, prost::Message)]
    /// struct Greeting {
    ///     #[prost(string, tag = "1")]
    ///     text: String,
    /// }
    ///
    /// let packet = Protobuf::to_packet(PacketCode(1), &Greeting { text: "hi".into() }).unwrap();
    /// let back: Greeting = Protobuf::from_packet(packet).unwrap();
    /// assert_eq!(back.text, "hi");
    /// ```
    ///
    /// [prost]: https://docs.rs/prost
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Protobuf;

    impl<T> Codec<T> for Protobuf
    where
        T: prost::Message + Default,
    {
        fn encode(value: &T, dst: &mut BytesMut) -> Result<(), EncodeError> {
            dst.reserve(value.encoded_len());
            value
                .encode(dst)
                .map_err(|e| EncodeError::new(e.to_string()))
        }

        fn decode(src: Bytes) -> Result<T, DecodeError> {
            T::decode(src).map_err(|e| DecodeError::new(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_strings_must_be_utf8() {
        let bad = Packet::new(1, &b"\xff\xfe"[..]);
        let decoded: Result<String, Error> = Raw::from_packet(bad);
        assert!(matches!(decoded, Err(Error::BadMessage { pcode: 1, .. })));
    }

    #[cfg(feature = "serde")]
    #[test]
    fn postcard_refuses_what_a_body_merely_claims() {
        // A sequence claiming u32::MAX elements, with four bytes following.
        let mut claim = vec![0xFF, 0xFF, 0xFF, 0xFF, 0x0F];
        claim.extend_from_slice(&[1, 2, 3, 4]);
        let decoded: Result<Vec<u64>, _> = <Postcard as Codec<Vec<u64>>>::decode(claim.into());
        assert!(decoded.is_err());
        let trailing: Result<u8, _> = <Postcard as Codec<u8>>::decode(Bytes::from_static(&[1, 2]));
        assert!(trailing.unwrap_err().to_string().contains("trailing"));
    }

    #[cfg(feature = "prost")]
    #[test]
    fn protobuf_refuses_lengths_past_the_body() {
        #[derive(Clone, PartialEq, prost::Message)]
        struct Blob {
            #[prost(bytes = "vec", tag = "1")]
            data: Vec<u8>,
        }
        // Field 1, length-delimited, claiming 2^28 bytes, with three present.
        let body = Bytes::from_static(&[0x0A, 0x80, 0x80, 0x80, 0x80, 0x01, 1, 2, 3]);
        assert!(<Protobuf as Codec<Blob>>::decode(body).is_err());
    }
}
