//! A connection's outbound bytes: frames queued for vectored writes.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

use super::streamer::PacketStreamer;
use crate::packet::Packet;

/// Bodies up to this size are copied next to their header (one iovec for
/// many small frames); larger ones are queued as their own `Bytes`, uncopied.
const COPY_MAX: usize = 2048;

/// Appended bytes up to this size are copied onto the tail rather than
/// queued as a chunk of their own.
const COPY_APPEND_MAX: usize = 2048;

/// Headers up to this size travel inline in the chunk list, so a large
/// body's frame costs no allocation.
const INLINE_MAX: usize = 32;

/// One contiguous piece of queued output.
#[derive(Debug)]
enum Chunk {
    /// Bytes shared with their owner: a large body, or a run of small frames.
    Shared(Bytes),
    /// A frame header, kept by value; `start..end` is still to be written.
    Inline {
        bytes: [u8; INLINE_MAX],
        start: u8,
        end: u8,
    },
}

impl Chunk {
    fn as_slice(&self) -> &[u8] {
        match self {
            Chunk::Shared(b) => b,
            Chunk::Inline { bytes, start, end } => &bytes[*start as usize..*end as usize],
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn advance(&mut self, n: usize) {
        match self {
            Chunk::Shared(b) => b.advance(n),
            // n < len <= INLINE_MAX, so the sum fits in a u8.
            Chunk::Inline { start, .. } => *start += n as u8,
        }
    }
}

/// Encoded frames waiting to be written, as a list of byte chunks.
///
/// Headers and small bodies are packed into a shared tail buffer; large
/// bodies are queued by reference. [`io_slices`](Self::io_slices) lists the
/// chunks for one `write_vectored` call and [`advance`](Self::advance)
/// consumes what the socket took.
///
/// # Examples
/// ```
/// use std::io::{IoSlice, Write};
/// use tbnet::proto::{DefaultStreamer, WriteQueue};
/// use tbnet::Packet;
///
/// let mut queue = WriteQueue::new();
/// queue.push(&DefaultStreamer::new(), &Packet::new(1, vec![0u8; 10_000]));
/// assert_eq!(queue.len(), 16 + 10_000);
///
/// let mut socket = Vec::new();
/// while !queue.is_empty() {
///     let mut slices = [IoSlice::new(&[]); 8];
///     let n = queue.io_slices(&mut slices);
///     let written = socket.write_vectored(&slices[..n]).unwrap();
///     queue.advance(written);
/// }
/// assert_eq!(socket.len(), 16 + 10_000);
/// ```
#[derive(Debug, Default)]
pub struct WriteQueue {
    chunks: VecDeque<Chunk>,
    tail: BytesMut,
    len: usize,
    /// Frames pushed (or appended) since they were last moved out.
    frames: usize,
}

impl WriteQueue {
    /// An empty queue; allocates nothing until the first push.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Frames pushed into this queue since it was created or last appended
    /// elsewhere (a queue appended to this one brings its count along).
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Encodes `packet` at the end of the queue.
    pub fn push<S: PacketStreamer + ?Sized>(&mut self, streamer: &S, packet: &Packet) {
        let before = self.tail.len();
        streamer.encode_header(packet, &mut self.tail);
        let header_len = self.tail.len() - before;
        self.len += header_len;
        self.frames += 1;
        let body = packet.body();
        self.len += body.len();
        if body.len() <= COPY_MAX {
            self.tail.extend_from_slice(body);
            return;
        }
        if header_len <= INLINE_MAX {
            let mut bytes = [0; INLINE_MAX];
            bytes[..header_len].copy_from_slice(&self.tail[before..]);
            self.tail.truncate(before);
            self.seal_tail();
            self.chunks.push_back(Chunk::Inline {
                bytes,
                start: 0,
                end: header_len as u8,
            });
        } else {
            self.seal_tail();
        }
        self.chunks.push_back(Chunk::Shared(body.clone()));
    }

    /// Queues raw bytes that are not a frame (the status page's HTTP
    /// response), uncopied.
    pub fn push_raw(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.seal_tail();
        self.len += bytes.len();
        self.chunks.push_back(Chunk::Shared(bytes));
    }

    /// Moves everything queued in `other` to the end of this queue, leaving
    /// `other` empty (with its spare capacity kept for reuse).
    ///
    /// Allocates nothing in the common cases: into an empty queue the two
    /// queues trade places (each keeps an allocation to reuse), and a few
    /// small frames are copied onto this queue's tail.
    pub fn append(&mut self, other: &mut WriteQueue) {
        if other.is_empty() {
            return;
        }
        if self.is_empty() {
            let frames = self.frames + other.frames;
            std::mem::swap(self, other);
            self.frames = frames;
            other.frames = 0;
            return;
        }
        if other.chunks.is_empty() && other.tail.len() <= COPY_APPEND_MAX {
            self.tail.extend_from_slice(&other.tail);
            self.len += other.len;
            self.frames += other.frames;
            other.tail.clear();
            other.len = 0;
            other.frames = 0;
            return;
        }
        self.seal_tail();
        self.chunks.append(&mut other.chunks);
        if !other.tail.is_empty() {
            self.chunks
                .push_back(Chunk::Shared(other.tail.split().freeze()));
        }
        self.len += other.len;
        self.frames += other.frames;
        other.len = 0;
        other.frames = 0;
    }

    /// Fills `dst` with the queued chunks, in order; returns how many slices
    /// were filled.
    pub fn io_slices<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let tail = (!self.tail.is_empty()).then_some(&self.tail[..]);
        let chunks = self.chunks.iter().map(Chunk::as_slice).chain(tail);
        let mut n = 0;
        for (slot, chunk) in dst.iter_mut().zip(chunks) {
            *slot = IoSlice::new(chunk);
            n += 1;
        }
        n
    }

    /// Drops the first `n` queued bytes (what a write took).
    ///
    /// # Panics
    /// If `n` exceeds [`len`](Self::len).
    pub fn advance(&mut self, mut n: usize) {
        assert!(n <= self.len, "advance past the end of the write queue");
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                self.tail.advance(n);
                break;
            };
            if n < front.len() {
                front.advance(n);
                break;
            }
            n -= front.len();
            self.chunks.pop_front();
        }
        if self.len == 0 {
            // Reuse the tail's allocation from its start when it is ours alone.
            self.tail.clear();
        }
    }

    /// Moves the tail's bytes into the chunk list so later bytes go after them.
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            self.chunks
                .push_back(Chunk::Shared(self.tail.split().freeze()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{DefaultStreamer, FrameDecoder};
    use proptest::prelude::*;

    fn flush(queue: &mut WriteQueue, max_slices: usize, max_write: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while !queue.is_empty() {
            let mut slices = vec![IoSlice::new(&[]); max_slices];
            let n = queue.io_slices(&mut slices);
            let mut budget = max_write;
            let mut written = 0;
            for s in &slices[..n] {
                let take = s.len().min(budget);
                out.extend_from_slice(&s[..take]);
                written += take;
                budget -= take;
            }
            queue.advance(written);
        }
        out
    }

    #[test]
    fn large_bodies_are_queued_by_reference() {
        let body = Bytes::from(vec![5u8; 100_000]);
        let mut q = WriteQueue::new();
        q.push(&DefaultStreamer::new(), &Packet::new(1, body.clone()));
        let mut slices = [IoSlice::new(&[]); 4];
        assert_eq!(q.io_slices(&mut slices), 2);
        assert_eq!(slices[1].as_ptr(), body.as_ptr());
    }

    #[test]
    fn small_frames_share_one_slice() {
        let mut q = WriteQueue::new();
        for _ in 0..100 {
            q.push(&DefaultStreamer::new(), &Packet::new(1, "tiny"));
        }
        let mut slices = [IoSlice::new(&[]); 4];
        assert_eq!(q.io_slices(&mut slices), 1);
        assert_eq!(slices[0].len(), 100 * 20);
    }

    #[test]
    fn append_keeps_order_and_counts_in_every_path() {
        let s = DefaultStreamer::new();
        let frame = |n: usize| Packet::new(1, Bytes::from(vec![n as u8; n]));
        let mut expected = Vec::new();
        let mut into = WriteQueue::new();
        // Into an empty queue: the two trade places.
        let mut other = WriteQueue::new();
        other.push(&s, &frame(3));
        into.append(&mut other);
        assert!(other.is_empty());
        expected.push(frame(3));
        // A few small frames: copied onto the tail.
        other.push(&s, &frame(5));
        other.push(&s, &frame(7));
        into.append(&mut other);
        expected.extend([frame(5), frame(7)]);
        // A large body: moved as chunks.
        other.push(&s, &frame(5000));
        into.append(&mut other);
        expected.push(frame(5000));
        assert_eq!((other.len(), other.frames()), (0, 0));
        assert_eq!(into.frames(), 4);
        let bytes = flush(&mut into, 3, 1000);
        let mut decoder = FrameDecoder::new();
        decoder.extend_from_slice(&bytes);
        for want in expected {
            assert_eq!(
                decoder.next_packet(&s).unwrap().unwrap().body(),
                want.body()
            );
        }
        assert!(decoder.next_packet(&s).unwrap().is_none());
        // The queue traded away keeps working.
        other.push(&s, &frame(2));
        assert_eq!(other.len(), 16 + 2);
    }

    #[test]
    #[should_panic(expected = "advance past the end")]
    fn advancing_too_far_panics() {
        let mut q = WriteQueue::new();
        q.push(&DefaultStreamer::new(), &Packet::new(1, "x"));
        q.advance(18);
    }

    proptest! {
        #[test]
        fn partial_writes_reassemble_to_the_same_frames(
            sizes in prop::collection::vec(0usize..6000, 0..12),
            max_slices in 1usize..5,
            max_write in 1usize..9000,
            split_at in 0usize..12,
        ) {
            let s = DefaultStreamer::new();
            let packets: Vec<Packet> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| Packet::new(i as i32, vec![i as u8; n]))
                .collect();
            let mut q = WriteQueue::new();
            let mut other = WriteQueue::new();
            for (i, p) in packets.iter().enumerate() {
                if i < split_at { q.push(&s, p) } else { other.push(&s, p) }
            }
            q.append(&mut other);
            prop_assert!(other.is_empty());
            let wire = flush(&mut q, max_slices, max_write);
            let mut d = FrameDecoder::new();
            d.extend_from_slice(&wire);
            let mut out = Vec::new();
            while let Some(p) = d.next_packet(&s).unwrap() {
                out.push(p);
            }
            prop_assert_eq!(out, packets);
        }
    }
}
