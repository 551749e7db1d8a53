//! The incremental frame decoder: bytes in, whole packets out.

use std::io::{self, Read};

use bytes::{Buf, BytesMut};

use super::streamer::{FrameError, PacketStreamer, Parse};
use crate::packet::Packet;

/// Default size of one read into a connection's buffer: 64 KiB.
pub const DEFAULT_READ_CHUNK: usize = 64 * 1024;

/// Smallest spare room offered to one read.
const MIN_READ: usize = 4 * 1024;

/// Buffers a connection's input and cuts it into packets.
///
/// Feed it any chunks ([`read_from`](Self::read_from) or
/// [`extend_from_slice`](Self::extend_from_slice)); take whole packets out
/// with [`next_packet`](Self::next_packet). Bodies are split off the buffer
/// as [`Bytes`](bytes::Bytes): no copy per packet.
///
/// # Memory
/// A header is validated by the streamer (flag, length limit) before any body
/// byte is expected, and the buffer grows only by what reads actually
/// deliver, at most one read chunk at a time: a header announcing 64 MiB
/// costs nothing until 64 MiB arrive. The buffer's capacity stays below
/// twice the buffered bytes plus two read chunks.
///
/// # Examples
/// ```
/// use bytes::BytesMut;
/// use tbnet::proto::{DefaultStreamer, FrameDecoder, PacketStreamer};
/// use tbnet::Packet;
///
/// let streamer = DefaultStreamer::new();
/// let mut wire = BytesMut::new();
/// streamer.encode(&Packet::new(3, "hello"), &mut wire);
///
/// let mut decoder = FrameDecoder::new();
/// decoder.extend_from_slice(&wire[..7]);
/// assert!(decoder.next_packet(&streamer).unwrap().is_none());
/// decoder.extend_from_slice(&wire[7..]);
/// let packet = decoder.next_packet(&streamer).unwrap().unwrap();
/// assert_eq!(packet.body(), "hello");
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    /// `buf[..filled]` holds received bytes; `buf[filled..]` is zeroed spare
    /// room for the next read (kept, so it is zeroed once, not per read).
    buf: BytesMut,
    filled: usize,
    /// Most room offered to one read.
    read_chunk: usize,
    /// Room offered to the next read: doubles while reads fill it (a burst),
    /// halves when they use little of it, so a quiet connection keeps a small
    /// buffer and a busy one amortises each allocation over many frames.
    chunk: usize,
    /// Bytes needed before parsing again is worth it.
    needed: usize,
    /// A decoder that failed stays failed: its stream has no frame boundary.
    failed: Option<FrameError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// An empty decoder reading [`DEFAULT_READ_CHUNK`] bytes at a time.
    /// It allocates nothing until the first read.
    pub fn new() -> Self {
        Self::with_read_chunk(DEFAULT_READ_CHUNK)
    }

    /// An empty decoder that offers each read `chunk` bytes of room (at
    /// least 4 KiB).
    pub fn with_read_chunk(chunk: usize) -> Self {
        FrameDecoder {
            buf: BytesMut::new(),
            filled: 0,
            read_chunk: chunk.max(MIN_READ),
            chunk: MIN_READ,
            needed: 1,
            failed: None,
        }
    }

    /// Bytes received but not yet returned as packets.
    pub fn buffered(&self) -> usize {
        self.filled
    }

    /// The bytes received but not yet returned as packets.
    pub fn buffered_bytes(&self) -> &[u8] {
        &self.buf[..self.filled]
    }

    /// The buffer's current capacity in bytes (what this connection's input
    /// costs in memory).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Appends received bytes.
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.buf.truncate(self.filled);
        self.buf.extend_from_slice(data);
        self.filled = self.buf.len();
    }

    /// Reads once from `src` into spare room and returns what `read`
    /// returned (0 means end of stream).
    ///
    /// The room offered adapts between 4 KiB and the read chunk: it grows
    /// while reads fill it and shrinks when they do not. It never depends on
    /// a length announced by the peer beyond one read chunk.
    ///
    /// # Errors
    /// Whatever `src.read` returns, including `WouldBlock`.
    pub fn read_from<R: Read + ?Sized>(&mut self, src: &mut R) -> io::Result<usize> {
        let frame_rest = self.needed.saturating_sub(self.filled);
        let mut want = self.chunk.max(frame_rest.min(self.read_chunk));
        // Packets split off the front share the buffer's allocation; while
        // one is still held elsewhere (a response on its way to a caller),
        // growing the buffer allocates a new one. So while the allocation
        // has room for a useful read and the frame in progress, read into
        // that room: a buffer is replaced once it is used up, not at every
        // read.
        let room = self.buf.capacity() - self.filled;
        if room >= MIN_READ / 4 && room >= frame_rest {
            want = want.min(room);
        }
        if self.buf.len() - self.filled < want {
            self.buf.resize(self.filled + want, 0);
        }
        let offered = self.buf.len() - self.filled;
        let n = src.read(&mut self.buf[self.filled..])?;
        self.filled += n;
        if n == offered {
            self.chunk = (self.chunk * 2).min(self.read_chunk);
        } else if n < offered / 4 {
            self.chunk = (self.chunk / 2).max(MIN_READ);
        }
        Ok(n)
    }

    /// Releases the buffer if nothing is buffered and it is larger than a
    /// read chunk (a large frame or a burst passed): an idle connection
    /// then costs no more than its next read needs.
    pub fn release_if_idle(&mut self) {
        self.release_idle_over(self.read_chunk);
    }

    /// Releases the buffer, whatever its size, if nothing is buffered;
    /// returns whether it held memory. For a transport short of memory: an
    /// idle connection then costs nothing until its next read.
    pub fn release_idle(&mut self) -> bool {
        self.release_idle_over(0)
    }

    /// Releases the buffer if nothing is buffered and it holds more than
    /// `keep` bytes; returns whether it did.
    fn release_idle_over(&mut self, keep: usize) -> bool {
        if self.filled > 0 || self.buf.capacity() <= keep {
            return false;
        }
        self.buf = BytesMut::new();
        self.chunk = MIN_READ;
        true
    }

    /// Drops buffered input and releases the buffer (used when a connection
    /// is replaced: a new socket never sees stale partial input).
    pub fn reset(&mut self) {
        *self = Self::with_read_chunk(self.read_chunk);
    }

    /// Keeps `error`: the decoder stays failed.
    fn fail(&mut self, error: FrameError) -> FrameError {
        self.failed = Some(error.clone());
        error
    }

    /// Returns the next whole packet, `None` if more bytes are needed.
    ///
    /// # Errors
    /// The streamer's [`FrameError`] for a bad header. The decoder stays
    /// failed: the stream has no recoverable frame boundary, so the
    /// connection must be closed.
    pub fn next_packet<S>(&mut self, streamer: &S) -> Result<Option<Packet>, FrameError>
    where
        S: PacketStreamer + ?Sized,
    {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.filled < self.needed {
            return Ok(None);
        }
        let header = match streamer.parse(&self.buf[..self.filled]) {
            Ok(Parse::Frame(header)) => header,
            Ok(Parse::Incomplete { needed }) => {
                let max = streamer.max_frame_len();
                if self.filled >= max {
                    // A framing that keeps asking for more (no end of header
                    // in sight) cannot grow the buffer past its limit.
                    return Err(self.fail(FrameError::TooLarge {
                        len: self.filled as u64,
                        max,
                    }));
                }
                self.needed = needed.max(self.filled + 1);
                return Ok(None);
            }
            Err(e) => return Err(self.fail(e)),
        };
        let frame_len = match header.header_len.checked_add(header.body_len) {
            Some(len) if len <= streamer.max_frame_len() => len,
            _ => {
                return Err(self.fail(FrameError::TooLarge {
                    len: (header.header_len as u64).saturating_add(header.body_len as u64),
                    max: streamer.max_frame_len(),
                }))
            }
        };
        if self.filled < frame_len {
            self.needed = frame_len;
            return Ok(None);
        }
        let mut frame = self.buf.split_to(frame_len);
        self.filled -= frame_len;
        self.needed = 1;
        if frame_len > self.read_chunk {
            // The bytes after a large frame share its allocation: a small
            // body kept from them would keep all of it alive. Move them to
            // a buffer of their own (a copy of at most what arrived with it).
            let mut fresh = BytesMut::with_capacity(self.filled.max(MIN_READ));
            fresh.extend_from_slice(&self.buf[..self.filled]);
            self.buf = fresh;
            self.chunk = MIN_READ;
        }
        frame.advance(header.header_len);
        Ok(Some(Packet::from_parts(
            header.pcode,
            header.channel_id,
            frame.freeze(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{DefaultStreamer, DEFAULT_FLAG};
    use crate::ChannelId;
    use proptest::prelude::*;

    fn encode_all(packets: &[Packet]) -> Vec<u8> {
        let mut wire = BytesMut::new();
        for p in packets {
            DefaultStreamer::new().encode(p, &mut wire);
        }
        wire.to_vec()
    }

    fn drain(d: &mut FrameDecoder, s: &DefaultStreamer) -> Result<Vec<Packet>, FrameError> {
        let mut out = Vec::new();
        while let Some(p) = d.next_packet(s)? {
            out.push(p);
        }
        Ok(out)
    }

    fn arb_packet() -> impl Strategy<Value = Packet> {
        (
            any::<i32>(),
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(pcode, chid, body)| {
                let mut p = Packet::new(pcode, body);
                p.set_channel_id(ChannelId(chid));
                p
            })
    }

    /// A reader that hands out a byte stream in the given chunk sizes.
    struct Chunked<'a> {
        data: &'a [u8],
        sizes: Vec<usize>,
        next: usize,
    }

    impl Read for Chunked<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.data.is_empty() {
                return Ok(0);
            }
            let size = self
                .sizes
                .get(self.next)
                .copied()
                .unwrap_or(usize::MAX)
                .max(1);
            self.next += 1;
            let n = size.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn an_idle_buffer_is_released_whatever_its_size_and_a_busy_one_is_kept() {
        let s = DefaultStreamer::new();
        let wire = encode_all(&[
            Packet::new(1, vec![7u8; 100]),
            Packet::new(2, vec![8u8; 100]),
        ]);
        let mut d = FrameDecoder::new();
        // One whole frame and part of the next.
        d.extend_from_slice(&wire[..wire.len() - 10]);
        assert!(d.next_packet(&s).unwrap().is_some());
        assert!(!d.release_idle(), "part of a frame is buffered");
        assert!(d.capacity() > 0);
        d.extend_from_slice(&wire[wire.len() - 10..]);
        let held = d.next_packet(&s).unwrap().expect("the second frame");
        d.release_idle();
        assert_eq!((d.buffered(), d.capacity()), (0, 0));
        assert_eq!(held.body(), &[8u8; 100][..], "packets outlive the buffer");
        assert!(!d.release_idle(), "nothing left to release");
    }

    #[test]
    fn body_is_split_off_without_copy() {
        let wire = encode_all(&[
            Packet::new(1, vec![7u8; 100]),
            Packet::new(2, vec![8u8; 50]),
        ]);
        let mut d = FrameDecoder::new();
        d.extend_from_slice(&wire);
        let s = DefaultStreamer::new();
        let a = d.next_packet(&s).unwrap().unwrap();
        let b = d.next_packet(&s).unwrap().unwrap();
        // Both bodies are views into one allocation, 16 header bytes apart.
        let gap = b.body().as_ptr() as usize - a.body().as_ptr() as usize;
        assert_eq!(gap, 100 + 16);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn held_bodies_do_not_make_every_read_allocate() {
        // One small response per read, each body kept (as a caller on
        // another thread may still hold it when the next read comes): the
        // reads fill the same allocation until it is used up.
        let packets: Vec<Packet> = (0..8).map(|i| Packet::new(i, vec![i as u8; 64])).collect();
        let wire = encode_all(&packets);
        let frame = 16 + 64;
        let mut src = Chunked {
            data: &wire,
            sizes: vec![frame; packets.len()],
            next: 0,
        };
        let mut d = FrameDecoder::new();
        let s = DefaultStreamer::new();
        let mut held = Vec::new();
        for _ in 0..packets.len() {
            assert_eq!(d.read_from(&mut src).unwrap(), frame);
            held.push(d.next_packet(&s).unwrap().expect("a whole frame"));
        }
        for (i, pair) in held.windows(2).enumerate() {
            let gap = pair[1].body().as_ptr() as usize - pair[0].body().as_ptr() as usize;
            assert_eq!(gap, frame, "read {} reused the buffer", i + 1);
        }
    }

    #[test]
    fn huge_announced_length_reserves_nothing() {
        let mut header = Vec::new();
        header.extend_from_slice(&DEFAULT_FLAG.to_be_bytes());
        header.extend_from_slice(&1u32.to_be_bytes());
        header.extend_from_slice(&0i32.to_be_bytes());
        header.extend_from_slice(&(64i32 << 20).to_be_bytes());
        let mut src = Chunked {
            data: &header,
            sizes: vec![16],
            next: 0,
        };
        let mut d = FrameDecoder::new();
        let s = DefaultStreamer::new();
        d.read_from(&mut src).unwrap();
        assert!(d.next_packet(&s).unwrap().is_none());
        // The next read is offered one chunk, not 64 MiB.
        let mut empty: &[u8] = &[];
        d.read_from(&mut empty).unwrap();
        assert!(
            d.capacity() <= 2 * (16 + DEFAULT_READ_CHUNK),
            "{}",
            d.capacity()
        );
    }

    #[test]
    fn bodies_after_a_large_frame_do_not_share_its_buffer() {
        let s = DefaultStreamer::new();
        let wire = encode_all(&[Packet::new(1, vec![1u8; 1 << 20]), Packet::new(2, "tiny")]);
        let mut d = FrameDecoder::new();
        d.extend_from_slice(&wire);
        let big = d.next_packet(&s).unwrap().unwrap();
        let tiny = d.next_packet(&s).unwrap().unwrap();
        // Shared, the tiny body would sit right after the big one's bytes and
        // its own header, in the same allocation.
        let shared_at = big.body().as_ptr() as usize + (1 << 20) + 16;
        assert_ne!(tiny.body().as_ptr() as usize, shared_at);
        assert_eq!(tiny.body(), "tiny");
    }

    #[test]
    fn error_is_sticky() {
        let mut d = FrameDecoder::new();
        d.extend_from_slice(&[0u8; 32]);
        let s = DefaultStreamer::new();
        assert!(d.next_packet(&s).is_err());
        d.extend_from_slice(&encode_all(&[Packet::new(1, "ok")]));
        assert!(d.next_packet(&s).is_err());
        d.reset();
        d.extend_from_slice(&encode_all(&[Packet::new(1, "ok")]));
        assert_eq!(d.next_packet(&s).unwrap().unwrap().body(), "ok");
    }

    /// A framing without a header that never finds its frame's end, and
    /// one whose header announces more than its limit.
    struct Endless {
        announce: Option<usize>,
    }

    impl PacketStreamer for Endless {
        fn parse(&self, src: &[u8]) -> Result<Parse, FrameError> {
            match self.announce {
                None => Ok(Parse::Incomplete {
                    needed: src.len() + 1,
                }),
                Some(body_len) => Ok(Parse::Frame(crate::proto::FrameHeader {
                    pcode: crate::PacketCode(0),
                    channel_id: ChannelId(1),
                    header_len: 0,
                    body_len,
                })),
            }
        }

        fn encode_header(&self, _packet: &Packet, _dst: &mut BytesMut) {}

        fn max_frame_len(&self) -> usize {
            100
        }
    }

    #[test]
    fn a_frame_that_never_ends_fails_at_the_framings_limit() {
        let s = Endless { announce: None };
        let mut d = FrameDecoder::new();
        d.extend_from_slice(&[b'x'; 99]);
        assert_eq!(d.next_packet(&s), Ok(None));
        d.extend_from_slice(b"x");
        assert_eq!(
            d.next_packet(&s),
            Err(FrameError::TooLarge { len: 100, max: 100 })
        );
        assert!(d.next_packet(&s).is_err(), "the error is sticky");
    }

    #[test]
    fn a_framing_announcing_more_than_its_limit_fails_at_once() {
        for announce in [101, usize::MAX] {
            let s = Endless {
                announce: Some(announce),
            };
            let mut d = FrameDecoder::new();
            d.extend_from_slice(b"x");
            assert!(matches!(
                d.next_packet(&s),
                Err(FrameError::TooLarge { max: 100, .. })
            ));
        }
        let s = Endless { announce: Some(3) };
        let mut d = FrameDecoder::new();
        d.extend_from_slice(b"abcd");
        assert_eq!(d.next_packet(&s).unwrap().unwrap().body(), "abc");
    }

    #[test]
    fn reads_large_frames_in_bounded_steps() {
        let wire = encode_all(&[Packet::new(9, vec![3u8; 1 << 20])]);
        let mut src = Chunked {
            data: &wire,
            sizes: vec![],
            next: 0,
        };
        let mut d = FrameDecoder::new();
        let s = DefaultStreamer::new();
        let mut got = None;
        while got.is_none() {
            let n = d.read_from(&mut src).unwrap();
            assert!(n <= DEFAULT_READ_CHUNK);
            assert!(d.capacity() <= 2 * (d.buffered() + 2 * DEFAULT_READ_CHUNK));
            got = d.next_packet(&s).unwrap();
        }
        assert_eq!(got.unwrap().body().len(), 1 << 20);
    }

    proptest! {
        #[test]
        fn any_chunking_yields_the_same_packets(
            packets in prop::collection::vec(arb_packet(), 0..20),
            sizes in prop::collection::vec(1usize..64, 0..200),
        ) {
            let wire = encode_all(&packets);
            let mut src = Chunked { data: &wire, sizes, next: 0 };
            let mut d = FrameDecoder::with_read_chunk(0);
            let s = DefaultStreamer::new();
            let mut out = Vec::new();
            loop {
                out.extend(drain(&mut d, &s).unwrap());
                let arrived = d.buffered();
                prop_assert!(d.capacity() <= 2 * (arrived + 2 * MIN_READ) + 64);
                if d.read_from(&mut src).unwrap() == 0 {
                    break;
                }
            }
            prop_assert_eq!(d.buffered(), 0);
            prop_assert_eq!(out, packets);
        }

        #[test]
        fn random_bytes_never_panic(
            data in prop::collection::vec(any::<u8>(), 0..2000),
            flagged in any::<bool>(),
        ) {
            let mut d = FrameDecoder::new();
            if flagged {
                // Start with a valid flag so the length paths get exercised.
                d.extend_from_slice(&DEFAULT_FLAG.to_be_bytes());
            }
            d.extend_from_slice(&data);
            let s = DefaultStreamer::new().with_max_body_len(1000);
            for _ in 0..2000 {
                match d.next_packet(&s) {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            prop_assert!(d.capacity() <= 2 * (data.len() + 4) + 64);
        }
    }
}
