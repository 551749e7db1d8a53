//! tbnet's frame: a 16-byte big-endian header, then the body (`WIRE.md`).

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use byteorder::{BigEndian, ByteOrder};
use bytes::BytesMut;

use crate::packet::{ChannelId, Packet, PacketCode};

/// The default frame flag, ASCII `"AnEt"`.
pub const DEFAULT_FLAG: u32 = 0x416E_4574;

/// The default maximum body length: 64 MiB (`0x4000000`), tbnet's own limit.
pub const DEFAULT_MAX_BODY_LEN: usize = 0x0400_0000;

/// Length of tbnet's frame header in bytes.
pub const HEADER_LEN: usize = 16;

/// Why a frame could not be decoded. Each one closes the connection it
/// arrived on.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The header's flag is not the streamer's.
    BadFlag {
        /// The flag that arrived.
        found: u32,
        /// The flag the streamer expects.
        expected: u32,
    },
    /// The header announced a negative body length.
    NegativeLength(i32),
    /// The header announced a body longer than the configured maximum (or a
    /// custom framing's frame grew past its
    /// [`max_frame_len`](PacketStreamer::max_frame_len) before it was whole).
    TooLarge {
        /// The announced body length.
        len: u64,
        /// The configured maximum.
        max: usize,
    },
    /// A custom framing could not make sense of the bytes.
    Malformed(&'static str),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BadFlag { found, expected } => {
                write!(f, "bad flag {found:#010x}, expected {expected:#010x}")
            }
            FrameError::NegativeLength(len) => write!(f, "negative body length {len}"),
            FrameError::TooLarge { len, max } => {
                write!(f, "body length {len} exceeds the maximum of {max}")
            }
            FrameError::Malformed(reason) => f.write_str(reason),
        }
    }
}

impl std::error::Error for FrameError {}

/// What a streamer found at the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parse {
    /// Not enough bytes to read the header: come back with at least `needed`.
    Incomplete {
        /// The number of buffered bytes needed to make progress.
        needed: usize,
    },
    /// A valid header. The frame is complete once `header_len + body_len`
    /// bytes are buffered.
    Frame(FrameHeader),
}

/// A validated frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// The packet code.
    pub pcode: PacketCode,
    /// The channel id.
    pub channel_id: ChannelId,
    /// Header length in bytes.
    pub header_len: usize,
    /// Body length in bytes, already checked against the maximum.
    pub body_len: usize,
}

/// How packets become bytes and back (tbnet's `IPacketStreamer` with its
/// `IPacketFactory` folded in).
///
/// A streamer only parses and writes headers; buffering, splitting bodies off
/// without copying, and memory limits live in
/// [`FrameDecoder`](crate::proto::FrameDecoder) and
/// [`WriteQueue`](crate::proto::WriteQueue), so every streamer gets them.
///
/// # Framings without a header
/// tbnet's `existPacketHeader = false` (an HTTP or line protocol) is a
/// streamer whose [`parse`](Self::parse) returns `header_len: 0` and the
/// whole message as the body, with a packet code and a non-zero channel id
/// of its choosing (id 0 would make the request one-way), and whose
/// [`encode_header`](Self::encode_header) writes nothing: a reply's body
/// goes on the wire as it is. Such a framing carries no channel ids, so it
/// suits a server (its replies leave in the order they are made: use
/// [`Dispatch::IoThread`](crate::Dispatch::IoThread) for one request at a
/// time per connection, or answer in order); a client matches responses by
/// the id `parse` returns.
///
/// # Limits
/// A frame never grows past [`max_frame_len`](Self::max_frame_len): bytes
/// that are still [`Parse::Incomplete`] beyond it, or a header announcing a
/// longer frame, close the connection ([`FrameError::TooLarge`]), whatever
/// `parse` does.
///
/// Transports use one streamer for every connection
/// ([`TransportBuilder::streamer`](crate::TransportBuilder::streamer)); a
/// listener ([`ListenOptions::streamer`](crate::ListenOptions::streamer)) or
/// a manager
/// ([`ConnectionManager::with_streamer`](crate::ConnectionManager::with_streamer))
/// may choose another for its own connections.
pub trait PacketStreamer: Send + Sync + 'static {
    /// Reads the header at the start of `src` (which may hold a partial
    /// frame, or several frames). A panic here closes only the connection
    /// the bytes came from. It must validate the header, including the
    /// body length against its maximum, before returning
    /// [`Parse::Frame`].
    ///
    /// # Errors
    /// A [`FrameError`] when the bytes cannot start a valid frame; the
    /// connection is then closed.
    fn parse(&self, src: &[u8]) -> Result<Parse, FrameError>;

    /// Appends the header for `packet` (whose body follows it unchanged).
    fn encode_header(&self, packet: &Packet, dst: &mut BytesMut);

    /// The longest body this streamer frames (default `i32::MAX`). Senders
    /// refuse longer packets with
    /// [`Error::FrameTooLarge`](crate::Error::FrameTooLarge) rather than put
    /// a frame on the wire that the peer would close the connection over.
    fn max_body_len(&self) -> usize {
        i32::MAX as usize
    }

    /// The longest whole frame, header included (default
    /// [`max_body_len`](Self::max_body_len) plus [`HEADER_LEN`]). The
    /// decoder closes a connection whose frame would exceed it.
    fn max_frame_len(&self) -> usize {
        self.max_body_len().saturating_add(HEADER_LEN)
    }

    /// Appends the whole frame for `packet`: header, then body.
    fn encode(&self, packet: &Packet, dst: &mut BytesMut) {
        self.encode_header(packet, dst);
        dst.extend_from_slice(packet.body());
    }
}

/// tbnet's default streamer: flag, chid, pcode, dataLen as big-endian 32-bit
/// fields, then the body.
///
/// # Examples
/// ```
/// use bytes::BytesMut;
/// use tbnet::proto::{DefaultStreamer, PacketStreamer, Parse};
/// use tbnet::{ChannelId, Packet};
///
/// let streamer = DefaultStreamer::new();
/// let mut packet = Packet::new(0, vec![b'x'; 1988]);
/// packet.set_channel_id(ChannelId(2));
/// let mut wire = BytesMut::new();
/// streamer.encode(&packet, &mut wire);
/// assert_eq!(&wire[..16], &[0x41, 0x6E, 0x45, 0x74, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0x07, 0xC4]);
///
/// let Parse::Frame(header) = streamer.parse(&wire).unwrap() else { unreachable!() };
/// assert_eq!(header.body_len, 1988);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DefaultStreamer {
    flag: u32,
    max_body_len: usize,
}

impl Default for DefaultStreamer {
    fn default() -> Self {
        DefaultStreamer {
            flag: DEFAULT_FLAG,
            max_body_len: DEFAULT_MAX_BODY_LEN,
        }
    }
}

impl DefaultStreamer {
    /// The streamer with flag [`DEFAULT_FLAG`] and a maximum body of
    /// [`DEFAULT_MAX_BODY_LEN`] (64 MiB).
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses `flag` instead of `0x416E4574` (tbnet lets each application pick one).
    pub fn with_flag(mut self, flag: u32) -> Self {
        self.flag = flag;
        self
    }

    /// Refuses bodies longer than `max` bytes (default 64 MiB). Values above
    /// `i32::MAX` are clamped: the wire cannot carry more.
    pub fn with_max_body_len(mut self, max: usize) -> Self {
        self.max_body_len = max.min(i32::MAX as usize);
        self
    }

    /// The flag this streamer writes and expects.
    pub fn flag(&self) -> u32 {
        self.flag
    }

    /// The longest body this streamer accepts.
    pub fn max_body_len(&self) -> usize {
        self.max_body_len
    }
}

impl PacketStreamer for DefaultStreamer {
    fn parse(&self, src: &[u8]) -> Result<Parse, FrameError> {
        let Some(header) = src.get(..HEADER_LEN) else {
            return Ok(Parse::Incomplete { needed: HEADER_LEN });
        };
        let flag = BigEndian::read_u32(&header[0..4]);
        if flag != self.flag {
            return Err(FrameError::BadFlag {
                found: flag,
                expected: self.flag,
            });
        }
        let channel_id = ChannelId(BigEndian::read_u32(&header[4..8]));
        let pcode = PacketCode(BigEndian::read_i32(&header[8..12]));
        let len = BigEndian::read_i32(&header[12..16]);
        let body_len = usize::try_from(len).map_err(|_| FrameError::NegativeLength(len))?;
        if body_len > self.max_body_len {
            return Err(FrameError::TooLarge {
                len: body_len as u64,
                max: self.max_body_len,
            });
        }
        Ok(Parse::Frame(FrameHeader {
            pcode,
            channel_id,
            header_len: HEADER_LEN,
            body_len,
        }))
    }

    fn max_body_len(&self) -> usize {
        self.max_body_len
    }

    fn encode_header(&self, packet: &Packet, dst: &mut BytesMut) {
        // A body longer than `max_body_len` (at most i32::MAX) is refused by
        // the transport before it reaches the streamer.
        let len = i32::try_from(packet.body().len()).unwrap_or(i32::MAX);
        // Built on the stack and appended once: one capacity check, not
        // four (this runs for every frame sent).
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&self.flag.to_be_bytes());
        header[4..8].copy_from_slice(&packet.channel_id().get().to_be_bytes());
        header[8..12].copy_from_slice(&packet.pcode().get().to_be_bytes());
        header[12..16].copy_from_slice(&len.to_be_bytes());
        dst.extend_from_slice(&header);
    }
}

/// A connection's streamer: tbnet's, called directly, or a custom one behind
/// a dynamic call.
///
/// The enum keeps the default path free of an indirect call per frame: the
/// decoder and write queue are generic over the streamer, so with
/// `Codec` the tbnet arm is inlined and a custom streamer costs one match
/// and one virtual call.
#[derive(Clone)]
pub(crate) enum Codec {
    Tbnet(DefaultStreamer),
    Custom(Arc<dyn PacketStreamer>),
}

impl Codec {
    /// `streamer` as a codec: tbnet's own streamer is recognised and called
    /// directly.
    pub(crate) fn new<S: PacketStreamer>(streamer: S) -> Self {
        match (&streamer as &dyn Any).downcast_ref::<DefaultStreamer>() {
            Some(tbnet) => Codec::Tbnet(*tbnet),
            None => Codec::Custom(Arc::new(streamer)),
        }
    }
}

impl Default for Codec {
    fn default() -> Self {
        Codec::Tbnet(DefaultStreamer::new())
    }
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::Tbnet(s) => s.fmt(f),
            Codec::Custom(_) => f.write_str("Custom"),
        }
    }
}

impl PacketStreamer for Codec {
    #[inline]
    fn parse(&self, src: &[u8]) -> Result<Parse, FrameError> {
        match self {
            Codec::Tbnet(s) => s.parse(src),
            // A framing that panics on a peer's bytes costs that peer's
            // connection, not the IO thread (free unless it panics).
            Codec::Custom(s) => catch_unwind(AssertUnwindSafe(|| s.parse(src)))
                .unwrap_or(Err(FrameError::Malformed("the framing panicked"))),
        }
    }

    #[inline]
    fn encode_header(&self, packet: &Packet, dst: &mut BytesMut) {
        match self {
            Codec::Tbnet(s) => s.encode_header(packet, dst),
            Codec::Custom(s) => s.encode_header(packet, dst),
        }
    }

    #[inline]
    fn max_body_len(&self) -> usize {
        match self {
            Codec::Tbnet(s) => s.max_body_len,
            Codec::Custom(s) => s.max_body_len(),
        }
    }

    #[inline]
    fn max_frame_len(&self) -> usize {
        match self {
            Codec::Tbnet(s) => s.max_body_len.saturating_add(HEADER_LEN),
            Codec::Custom(s) => s.max_frame_len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDEN_HEADER: [u8; 16] = [
        0x41, 0x6E, 0x45, 0x74, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07,
        0xC4,
    ];

    #[test]
    fn golden_header_encodes_byte_for_byte() {
        let mut packet = Packet::new(0, vec![b'a'; 1988]);
        packet.set_channel_id(ChannelId(2));
        let mut wire = BytesMut::new();
        DefaultStreamer::new().encode(&packet, &mut wire);
        assert_eq!(wire.len(), 16 + 1988);
        assert_eq!(&wire[..16], &GOLDEN_HEADER);
        assert!(wire[16..].iter().all(|&b| b == b'a'));
    }

    #[test]
    fn golden_header_parses() {
        let parsed = DefaultStreamer::new().parse(&GOLDEN_HEADER).unwrap();
        assert_eq!(
            parsed,
            Parse::Frame(FrameHeader {
                pcode: PacketCode(0),
                channel_id: ChannelId(2),
                header_len: 16,
                body_len: 1988,
            })
        );
    }

    #[test]
    fn negative_pcode_and_high_chid_round_trip() {
        let mut packet = Packet::new(-5, "x");
        packet.set_channel_id(ChannelId(0xFFFF_FFFF));
        let mut wire = BytesMut::new();
        DefaultStreamer::new().encode(&packet, &mut wire);
        assert_eq!(
            &wire[4..12],
            &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFB]
        );
        let Parse::Frame(h) = DefaultStreamer::new().parse(&wire).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(
            (h.pcode, h.channel_id, h.body_len),
            (PacketCode(-5), ChannelId(u32::MAX), 1)
        );
    }

    #[test]
    fn short_input_is_incomplete() {
        for n in 0..16 {
            assert_eq!(
                DefaultStreamer::new().parse(&GOLDEN_HEADER[..n]),
                Ok(Parse::Incomplete { needed: 16 })
            );
        }
    }

    #[test]
    fn wrong_flag_is_rejected() {
        let mut h = GOLDEN_HEADER;
        h[0] = b'G';
        assert_eq!(
            DefaultStreamer::new().parse(&h),
            Err(FrameError::BadFlag {
                found: 0x476E_4574,
                expected: DEFAULT_FLAG
            })
        );
    }

    #[test]
    fn custom_flag_is_used_both_ways() {
        let s = DefaultStreamer::new().with_flag(0x1234_5678);
        let mut wire = BytesMut::new();
        s.encode(&Packet::new(1, ""), &mut wire);
        assert_eq!(&wire[..4], &[0x12, 0x34, 0x56, 0x78]);
        assert!(s.parse(&wire).is_ok());
        assert!(DefaultStreamer::new().parse(&wire).is_err());
    }

    #[test]
    fn negative_length_is_rejected() {
        let mut h = GOLDEN_HEADER;
        h[12..16].copy_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            DefaultStreamer::new().parse(&h),
            Err(FrameError::NegativeLength(-1))
        );
    }

    #[test]
    fn length_limit_is_inclusive() {
        let s = DefaultStreamer::new().with_max_body_len(100);
        let mut h = GOLDEN_HEADER;
        h[12..16].copy_from_slice(&100i32.to_be_bytes());
        assert!(matches!(s.parse(&h), Ok(Parse::Frame(_))));
        h[12..16].copy_from_slice(&101i32.to_be_bytes());
        assert_eq!(
            s.parse(&h),
            Err(FrameError::TooLarge { len: 101, max: 100 })
        );
    }

    #[test]
    fn codec_calls_tbnets_streamer_directly_and_others_through_it() {
        let flagged = DefaultStreamer::new().with_flag(7).with_max_body_len(10);
        let codec = Codec::new(flagged);
        assert!(matches!(codec, Codec::Tbnet(s) if s == flagged));
        assert_eq!(codec.max_frame_len(), 10 + HEADER_LEN);

        struct Panicky;
        impl PacketStreamer for Panicky {
            fn parse(&self, _src: &[u8]) -> Result<Parse, FrameError> {
                panic!("a framing with a bug")
            }
            fn encode_header(&self, _packet: &Packet, _dst: &mut BytesMut) {}
            fn max_body_len(&self) -> usize {
                5
            }
        }
        let codec = Codec::new(Panicky);
        assert!(matches!(codec, Codec::Custom(_)));
        assert_eq!(codec.max_frame_len(), 5 + HEADER_LEN);
        assert_eq!(
            codec.parse(b"x"),
            Err(FrameError::Malformed("the framing panicked"))
        );
    }

    #[test]
    fn default_limit_is_tbnets_64_mib() {
        let mut h = GOLDEN_HEADER;
        h[12..16].copy_from_slice(&0x0400_0000i32.to_be_bytes());
        assert!(DefaultStreamer::new().parse(&h).is_ok());
        h[12..16].copy_from_slice(&0x0400_0001i32.to_be_bytes());
        assert!(matches!(
            DefaultStreamer::new().parse(&h),
            Err(FrameError::TooLarge { .. })
        ));
    }
}
