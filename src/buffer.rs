//! Bodies laid out as tbnet's `DataBuffer` writes them.
//!
//! tbnet's packets encode their fields with `DataBuffer`: integers
//! big-endian (`writeInt8/16/32/64`), byte strings as they are, and strings
//! as an `int32` length that counts the terminating NUL, the bytes, then
//! the NUL; an empty or null string is the length 0 alone. [`DataBuffer`]
//! writes that layout; [`DataReader`] reads it back and, unlike the
//! original, returns a [`DecodeError`] on short or inconsistent input
//! instead of reading past the end, and never allocates a length the input
//! merely claims.
//!
//! # Examples
//! ```
//! use tbnet::{DataBuffer, DataReader};
//!
//! let mut out = DataBuffer::new();
//! out.put_i32(7);
//! out.put_string("key");
//! out.put_i64(-1);
//! let body = out.freeze();
//! assert_eq!(&body[..8], [0, 0, 0, 7, 0, 0, 0, 4]);
//!
//! let mut input = DataReader::new(body);
//! assert_eq!(input.get_i32()?, 7);
//! assert_eq!(input.get_string()?, "key");
//! assert_eq!(input.get_i64()?, -1);
//! assert!(input.get_i8().is_err(), "nothing left");
//! # Ok::<(), tbnet::DecodeError>(())
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::message::DecodeError;

/// A body being written in tbnet's `DataBuffer` layout (big-endian
/// integers, length-prefixed NUL-terminated strings).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataBuffer {
    buf: BytesMut,
}

impl DataBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        DataBuffer::default()
    }

    /// An empty buffer with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        DataBuffer {
            buf: BytesMut::with_capacity(capacity),
        }
    }

    /// Writes `n` (tbnet's `writeInt8`).
    pub fn put_i8(&mut self, n: i8) {
        self.buf.put_i8(n);
    }

    /// Writes `n` big-endian (tbnet's `writeInt16`).
    pub fn put_i16(&mut self, n: i16) {
        self.buf.put_i16(n);
    }

    /// Writes `n` big-endian (tbnet's `writeInt32`).
    pub fn put_i32(&mut self, n: i32) {
        self.buf.put_i32(n);
    }

    /// Writes `n` big-endian (tbnet's `writeInt64`).
    pub fn put_i64(&mut self, n: i64) {
        self.buf.put_i64(n);
    }

    /// Writes `bytes` as they are, with no length (tbnet's `writeBytes`).
    pub fn put_bytes(&mut self, bytes: &[u8]) {
        self.buf.put_slice(bytes);
    }

    /// Writes `s` as tbnet's `writeString` does: an `int32` length counting
    /// the terminating NUL, the bytes, the NUL; an empty string is the
    /// length 0 alone (as is tbnet's null string).
    ///
    /// A C++ reader sees the string only up to its first NUL: keep NUL
    /// bytes out of strings meant for one.
    ///
    /// # Panics
    /// If `s` is 2 GiB or longer (its length does not fit an `int32`).
    pub fn put_string(&mut self, s: &str) {
        self.put_string_bytes(s.as_bytes());
    }

    /// [`put_string`](Self::put_string) for bytes that need not be UTF-8.
    ///
    /// # Panics
    /// If `s` is 2 GiB or longer.
    pub fn put_string_bytes(&mut self, s: &[u8]) {
        if s.is_empty() {
            self.buf.put_i32(0);
            return;
        }
        let len = i32::try_from(s.len() + 1).expect("a string shorter than 2 GiB");
        self.buf.reserve(4 + s.len() + 1);
        self.buf.put_i32(len);
        self.buf.put_slice(s);
        self.buf.put_u8(0);
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The body written, ready for [`Packet::new`](crate::Packet::new).
    pub fn freeze(self) -> Bytes {
        self.buf.freeze()
    }

    /// The bytes, to write more with [`BufMut`] or hand to a
    /// [`Message::encode`](crate::Message::encode) destination.
    pub fn into_inner(self) -> BytesMut {
        self.buf
    }
}

impl From<BytesMut> for DataBuffer {
    /// Appends to what `buf` holds.
    fn from(buf: BytesMut) -> Self {
        DataBuffer { buf }
    }
}

/// Reads a body in tbnet's `DataBuffer` layout. Every read checks what is
/// left first: short or inconsistent input is a [`DecodeError`] (and the
/// reader is left where it was), never a panic, and no read allocates more
/// than the bytes actually there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataReader {
    buf: Bytes,
}

impl DataReader {
    /// A reader over `body` (a [`Packet`](crate::Packet)'s body, say).
    pub fn new(body: impl Into<Bytes>) -> Self {
        DataReader { buf: body.into() }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// What is left, unread.
    pub fn into_inner(self) -> Bytes {
        self.buf
    }

    fn need(&self, n: usize, what: &str) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::truncated(what));
        }
        Ok(())
    }

    /// Reads an `int8` (tbnet's `readInt8`).
    ///
    /// # Errors
    /// [`DecodeError`] if no byte is left.
    pub fn get_i8(&mut self) -> Result<i8, DecodeError> {
        self.need(1, "an int8")?;
        Ok(self.buf.get_i8())
    }

    /// Reads a big-endian `int16` (tbnet's `readInt16`).
    ///
    /// # Errors
    /// [`DecodeError`] if fewer than 2 bytes are left.
    pub fn get_i16(&mut self) -> Result<i16, DecodeError> {
        self.need(2, "an int16")?;
        Ok(self.buf.get_i16())
    }

    /// Reads a big-endian `int32` (tbnet's `readInt32`).
    ///
    /// # Errors
    /// [`DecodeError`] if fewer than 4 bytes are left.
    pub fn get_i32(&mut self) -> Result<i32, DecodeError> {
        self.need(4, "an int32")?;
        Ok(self.buf.get_i32())
    }

    /// Reads a big-endian `int64` (tbnet's `readInt64`).
    ///
    /// # Errors
    /// [`DecodeError`] if fewer than 8 bytes are left.
    pub fn get_i64(&mut self) -> Result<i64, DecodeError> {
        self.need(8, "an int64")?;
        Ok(self.buf.get_i64())
    }

    /// Reads `n` bytes as they are (tbnet's `readBytes`), without copying.
    ///
    /// # Errors
    /// [`DecodeError`] if fewer than `n` bytes are left.
    pub fn get_bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n, "the bytes")?;
        Ok(self.buf.split_to(n))
    }

    /// Reads a string written as tbnet's `writeString` does, without its
    /// NUL and without copying; an empty string (length 0) is empty.
    ///
    /// # Errors
    /// [`DecodeError`] if the length is negative, claims more bytes than
    /// are left, or its last byte is not the NUL.
    pub fn get_string_bytes(&mut self) -> Result<Bytes, DecodeError> {
        self.need(4, "a string's length")?;
        let len = i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        let len = usize::try_from(len)
            .map_err(|_| DecodeError::new(format!("negative string length {len}")))?;
        if len == 0 {
            self.buf.advance(4);
            return Ok(Bytes::new());
        }
        if self.buf.len() - 4 < len {
            return Err(DecodeError::new(format!(
                "string length {len} exceeds the {} bytes left",
                self.buf.len() - 4
            )));
        }
        if self.buf[4 + len - 1] != 0 {
            return Err(DecodeError::new("string without its terminating NUL"));
        }
        self.buf.advance(4);
        let mut s = self.buf.split_to(len);
        s.truncate(len - 1);
        Ok(s)
    }

    /// [`get_string_bytes`](Self::get_string_bytes) as UTF-8 text.
    ///
    /// # Errors
    /// As for [`get_string_bytes`](Self::get_string_bytes); also if the
    /// string is not UTF-8 (the reader is then past it).
    pub fn get_string(&mut self) -> Result<String, DecodeError> {
        let bytes = self.get_string_bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::new("string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn integers_are_big_endian_as_data_buffer_writes_them() {
        let mut out = DataBuffer::new();
        out.put_i8(-2);
        out.put_i16(0x0102);
        out.put_i32(0x0304_0506);
        out.put_i64(0x0708_090A_0B0C_0D0E);
        out.put_i32(-1);
        assert_eq!(
            &out.freeze()[..],
            [
                0xFE, // i8
                0x01, 0x02, // i16
                0x03, 0x04, 0x05, 0x06, // i32
                0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, // i64
                0xFF, 0xFF, 0xFF, 0xFF, // -1
            ]
        );
    }

    #[test]
    fn strings_carry_their_nul_in_the_length_and_empty_is_zero() {
        let mut out = DataBuffer::new();
        out.put_string("ab");
        out.put_string("");
        out.put_string_bytes(b"\xFF");
        assert_eq!(
            &out.freeze()[..],
            [
                0, 0, 0, 3, b'a', b'b', 0, // "ab": length 3 with the NUL
                0, 0, 0, 0, // "": length 0, nothing else
                0, 0, 0, 2, 0xFF, 0, // bytes that are not UTF-8
            ]
        );
    }

    #[test]
    fn reads_the_golden_layout_back() {
        let body: &[u8] = &[
            0x80, 0x7F, 0xFF, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x2A, 0, 0, 0, 4, b'k', b'e', b'y', 0, 0, 0, 0, 0,
        ];
        let mut input = DataReader::new(Bytes::copy_from_slice(body));
        assert_eq!(input.get_i8().unwrap(), i8::MIN);
        assert_eq!(input.get_i16().unwrap(), 0x7FFF);
        assert_eq!(input.get_i32().unwrap(), 1 << 8);
        assert_eq!(input.get_i64().unwrap(), 42);
        assert_eq!(input.get_string().unwrap(), "key");
        assert_eq!(input.get_string().unwrap(), "");
        assert!(input.is_empty());
    }

    #[test]
    fn short_input_is_an_error_and_reads_nothing() {
        let mut input = DataReader::new(Bytes::from_static(&[1, 2, 3]));
        assert!(input.get_i32().is_err());
        assert!(input.get_i64().is_err());
        assert!(input.get_bytes(4).is_err());
        assert_eq!(input.remaining(), 3, "a failed read consumes nothing");
        assert_eq!(input.get_i16().unwrap(), 0x0102);
        assert!(input.get_i16().is_err());
        assert_eq!(input.get_i8().unwrap(), 3);
        assert!(input.get_i8().is_err());
    }

    #[test]
    fn inconsistent_strings_are_errors() {
        for (body, why) in [
            (&[0, 0, 0][..], "ends before"),
            (&[0xFF, 0xFF, 0xFF, 0xFF], "negative"),
            // Claims 2 GiB: refused by what is left, nothing allocated.
            (&[0x7F, 0xFF, 0xFF, 0xFF, b'a', 0], "exceeds"),
            (&[0, 0, 0, 3, b'a', 0], "exceeds"),
            (&[0, 0, 0, 2, b'a', b'b'], "NUL"),
        ] {
            let mut input = DataReader::new(Bytes::copy_from_slice(body));
            let error = input.get_string().unwrap_err();
            assert!(format!("{error}").contains(why), "{body:?}: {error}");
            assert_eq!(input.remaining(), body.len(), "nothing consumed");
        }
        let mut input = DataReader::new(Bytes::from_static(&[0, 0, 0, 2, 0xFF, 0]));
        assert!(input.get_string().is_err(), "not UTF-8");
    }

    #[derive(Clone, Debug)]
    enum Field {
        I8(i8),
        I16(i16),
        I32(i32),
        I64(i64),
        Str(String),
    }

    fn field() -> impl Strategy<Value = Field> {
        prop_oneof![
            any::<i8>().prop_map(Field::I8),
            any::<i16>().prop_map(Field::I16),
            any::<i32>().prop_map(Field::I32),
            any::<i64>().prop_map(Field::I64),
            "[^\u{0}]{0,40}".prop_map(Field::Str),
        ]
    }

    proptest! {
        #[test]
        fn any_fields_round_trip(fields in proptest::collection::vec(field(), 0..20)) {
            let mut out = DataBuffer::new();
            for f in &fields {
                match f {
                    Field::I8(n) => out.put_i8(*n),
                    Field::I16(n) => out.put_i16(*n),
                    Field::I32(n) => out.put_i32(*n),
                    Field::I64(n) => out.put_i64(*n),
                    Field::Str(s) => out.put_string(s),
                }
            }
            let mut input = DataReader::new(out.freeze());
            for f in &fields {
                match f {
                    Field::I8(n) => prop_assert_eq!(input.get_i8().unwrap(), *n),
                    Field::I16(n) => prop_assert_eq!(input.get_i16().unwrap(), *n),
                    Field::I32(n) => prop_assert_eq!(input.get_i32().unwrap(), *n),
                    Field::I64(n) => prop_assert_eq!(input.get_i64().unwrap(), *n),
                    Field::Str(s) => prop_assert_eq!(&input.get_string().unwrap(), s),
                }
            }
            prop_assert!(input.is_empty());
        }

        #[test]
        fn any_bytes_read_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let len = body.len();
            let mut input = DataReader::new(body);
            // Whatever the bytes, every read returns, consuming at most
            // what is there.
            let _ = input.get_string_bytes();
            let _ = input.get_i64();
            let _ = input.get_i32();
            let _ = input.get_i16();
            let _ = input.get_i8();
            prop_assert!(input.remaining() <= len);
        }
    }
}
