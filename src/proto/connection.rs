//! One connection's state machine, sans-IO.
//!
//! A [`Connection`] owns what the IO thread keeps per socket: the frame
//! decoder, the write queue, where the connection is in its life
//! ([`Phase`]), why it is not reading ([`Hold`]) and its deadlines
//! (connect, idle). It never touches a socket or reads the clock: the
//! driver hands it bytes read, bytes written, end of stream and the time,
//! and asks what is due ([`next_deadline`](Connection::next_deadline)) and
//! whether to close ([`poll_close`](Connection::poll_close)). Every
//! transition is in this file.
//!
//! ```text
//!  client:  Connecting ──connected──► Open
//!  server:  Sniffing ──frames──► Open            Sniffing ──respond──► Closing
//!  Open ──end of stream (server)──► Draining ──all answered, written──► closed
//!  Closing ──written──► closed
//!  any ──timeout, error, end of stream (client)──► closed
//! ```

use std::io::{self, Read};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::packet::Packet;

use super::{FrameDecoder, FrameError, PacketStreamer, WriteQueue};

/// Which end of the connection this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// We connected: we send requests and read responses.
    Client,
    /// We accepted: we read requests and send replies.
    Server,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A client's TCP connect is in progress.
    Connecting,
    /// A server connection whose first bytes decide between tbnet frames
    /// and another protocol (the status page).
    Sniffing,
    /// Frames flow both ways.
    Open,
    /// The peer ended its sending side (a server connection): nothing more
    /// is read; it closes once every request read was answered and every
    /// reply written.
    Draining,
    /// A last response is queued (the sniffer answered): it closes once
    /// that is written.
    Closing,
}

/// Why a connection is not reading now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The connect has not completed.
    Connecting,
    /// The worker queue is full; reading resumes when a worker frees room.
    WorkersFull,
    /// A server's unwritten replies reached the output limit: the peer is
    /// not reading them. Reading resumes once some are written.
    PeerNotReading,
    /// The peer ended its sending side ([`Phase::Draining`]).
    PeerClosed,
    /// Closing after a last response ([`Phase::Closing`]).
    Closing,
    /// A server connection has [`Limits::max_in_flight`] requests handed to
    /// handlers and unanswered: reading resumes as answers go out.
    InFlight,
    /// The transport's memory budget is spent and this connection holds
    /// more than its share: reading resumes when the budget has room.
    MemoryBudget,
}

/// Why the state machine decided the connection should close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The connect did not complete in time.
    ConnectTimedOut,
    /// The peer sent nothing for the idle timeout.
    Idle,
    /// A client's peer closed the connection.
    PeerClosed,
    /// A draining server connection answered everything it read.
    Drained,
    /// The last response after sniffing is written.
    Answered,
    /// A server connection sent no complete first frame (or status-page
    /// request head) within [`Limits::first_frame_timeout`].
    FirstFrameTimedOut,
    /// The byte stream's handshake (TLS) did not finish within
    /// [`Limits::handshake_timeout`].
    HandshakeTimedOut,
}

/// Limits a connection lives by.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Unwritten bytes past which a server stops reading.
    pub max_outbound: usize,
    /// Server connections: close after this much silence from the peer.
    pub idle_timeout: Option<Duration>,
    /// Client connections: how long the connect may take.
    pub connect_timeout: Duration,
    /// Bytes offered to one read at most.
    pub read_chunk: usize,
    /// Server connections: close unless a whole first frame (or status-page
    /// request head) arrives within this long of the accept.
    pub first_frame_timeout: Option<Duration>,
    /// How long a byte-stream handshake (TLS) may take once it starts.
    pub handshake_timeout: Duration,
    /// Server connections: requests handed to handlers and not yet answered
    /// past which reading stops.
    pub max_in_flight: usize,
}

/// One connection's state: decoder, write queue, phase, holds and deadlines.
#[derive(Debug)]
pub struct Connection {
    side: Side,
    phase: Phase,
    limits: Limits,
    decoder: FrameDecoder,
    out: WriteQueue,
    /// A request the full worker queue could not take yet.
    workers_full: bool,
    /// When the peer last sent bytes (or the connection opened).
    last_input: Instant,
    connect_deadline: Option<Instant>,
    /// Until the first whole frame (servers; `None` once it arrived).
    first_frame_deadline: Option<Instant>,
    /// Until the byte stream's handshake ends (`None` without one, or done).
    handshake_deadline: Option<Instant>,
    /// Held by the transport's memory budget.
    budget_held: bool,
    /// The deadline registered with the timer, if any.
    armed: Option<Instant>,
    /// Every whole frame received was decoded: what is buffered (if
    /// anything) is the start of a frame. A draining connection closes only
    /// then, so no request it read goes unanswered.
    decoded_all: bool,
    /// Requests handed to a handler, and how many of those were answered
    /// (replied to, or dropped unanswered).
    dispatched: u64,
    answered: u64,
}

impl Connection {
    /// A client connection whose connect started at `now`.
    pub fn client(now: Instant, limits: Limits) -> Self {
        let mut c = Self::new(Side::Client, Phase::Connecting, now, limits);
        c.connect_deadline = Some(now + limits.connect_timeout);
        c
    }

    /// A server connection accepted at `now`; with `sniff` its first bytes
    /// go to a sniffer before any frame is decoded.
    pub fn server(now: Instant, limits: Limits, sniff: bool) -> Self {
        let phase = if sniff { Phase::Sniffing } else { Phase::Open };
        let mut c = Self::new(Side::Server, phase, now, limits);
        c.first_frame_deadline = limits.first_frame_timeout.map(|t| now + t);
        c
    }

    fn new(side: Side, phase: Phase, now: Instant, limits: Limits) -> Self {
        Connection {
            side,
            phase,
            limits,
            decoder: FrameDecoder::with_read_chunk(limits.read_chunk),
            out: WriteQueue::new(),
            workers_full: false,
            last_input: now,
            connect_deadline: None,
            first_frame_deadline: None,
            handshake_deadline: None,
            budget_held: false,
            armed: None,
            decoded_all: true,
            dispatched: 0,
            answered: 0,
        }
    }

    /// Which end this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// Where the connection is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Why the connection is not reading, or `None` if it may read.
    pub fn hold(&self) -> Option<Hold> {
        match self.phase {
            Phase::Connecting => Some(Hold::Connecting),
            Phase::Closing => Some(Hold::Closing),
            Phase::Draining => Some(Hold::PeerClosed),
            Phase::Sniffing | Phase::Open if self.workers_full => Some(Hold::WorkersFull),
            Phase::Sniffing | Phase::Open if self.output_full() => Some(Hold::PeerNotReading),
            Phase::Sniffing | Phase::Open if self.in_flight_full() => Some(Hold::InFlight),
            Phase::Sniffing | Phase::Open if self.budget_held => Some(Hold::MemoryBudget),
            Phase::Sniffing | Phase::Open => None,
        }
    }

    /// Whether buffered frames may be decoded now: reading may have stopped
    /// (a draining connection still answers what it read), but neither the
    /// workers nor the peer are behind.
    pub fn may_decode(&self) -> bool {
        match self.phase {
            // A memory-budget hold stops reading only: decoding what is
            // buffered lets the buffer empty and be given back.
            Phase::Open | Phase::Draining => {
                !self.workers_full && !self.output_full() && !self.in_flight_full()
            }
            Phase::Connecting | Phase::Sniffing | Phase::Closing => false,
        }
    }

    /// Whether a server's unwritten output reached its limit (decoding and
    /// reading stop until some is written). Only servers stop for unwritten output: a client reading responses
    /// frees memory, and pausing both ends of one connection would deadlock
    /// them (clients are bounded by refusing new requests instead).
    pub fn output_full(&self) -> bool {
        self.side == Side::Server && self.out.len() >= self.limits.max_outbound
    }

    /// Whether a server has [`Limits::max_in_flight`] requests unanswered
    /// (decoding and reading stop until answers go out).
    pub fn in_flight_full(&self) -> bool {
        self.side == Side::Server && self.unanswered() >= self.limits.max_in_flight as u64
    }

    /// How many more requests a server may hand to handlers before
    /// [`Limits::max_in_flight`] holds it (unlimited for clients).
    pub fn in_flight_room(&self) -> u64 {
        match self.side {
            Side::Server => (self.limits.max_in_flight as u64).saturating_sub(self.unanswered()),
            Side::Client => u64::MAX,
        }
    }

    /// Whether the peer is behind: unwritten output or unanswered requests
    /// at their limits. Reading resumes once neither is.
    pub fn backlogged(&self) -> bool {
        self.output_full() || self.in_flight_full()
    }

    /// The transport's memory budget holds (`true`) or releases this
    /// connection's reading and decoding.
    pub fn set_budget_hold(&mut self, held: bool) {
        self.budget_held = held;
    }

    /// Whether [`set_budget_hold`](Self::set_budget_hold) stopped reading.
    pub fn budget_held(&self) -> bool {
        self.budget_held
    }

    /// Memory this connection's buffers hold: the read buffer's capacity
    /// and the unwritten output.
    pub fn memory(&self) -> usize {
        self.decoder.capacity() + self.out.len()
    }

    /// A byte-stream handshake (TLS) starts at `now`; it must end within
    /// [`Limits::handshake_timeout`].
    pub fn start_handshake(&mut self, now: Instant) {
        self.handshake_deadline = Some(now + self.limits.handshake_timeout);
    }

    /// Whether a handshake started and has not ended.
    pub fn in_handshake(&self) -> bool {
        self.handshake_deadline.is_some()
    }

    /// The handshake ended.
    pub fn handshake_done(&mut self) {
        self.handshake_deadline = None;
    }

    // ----- input -----

    /// The connect completed at `now`.
    pub fn connected(&mut self, now: Instant) {
        if self.phase == Phase::Connecting {
            self.phase = Phase::Open;
            self.connect_deadline = None;
            // The connect deadline registered for it is gone.
            self.armed = None;
            self.last_input = now;
        }
    }

    /// Reads once from `src` (the connection's byte stream). `Ok(0)` is end
    /// of stream: pass it to [`handle_eof`](Self::handle_eof).
    ///
    /// # Errors
    /// Whatever the stream's `read` returns, including `WouldBlock`.
    pub fn read_from<R: Read + ?Sized>(&mut self, src: &mut R, now: Instant) -> io::Result<usize> {
        let n = self.decoder.read_from(src)?;
        if n > 0 {
            self.last_input = now;
            self.decoded_all = false;
        }
        Ok(n)
    }

    /// Input that arrived by other means (tests, other framings).
    pub fn handle_input(&mut self, bytes: &[u8], now: Instant) {
        self.decoder.extend_from_slice(bytes);
        self.last_input = now;
        self.decoded_all = bytes.is_empty() && self.decoded_all;
    }

    /// Nothing more to read for now: lets an idle read buffer go.
    pub fn read_blocked(&mut self) {
        self.decoder.release_if_idle();
    }

    /// Whether a read buffer is allocated (empty or not).
    pub fn has_read_buffer(&self) -> bool {
        self.decoder.capacity() > 0
    }

    /// Lets the read buffer go, whatever its size, if it holds no input;
    /// returns whether that freed memory (for a transport whose memory
    /// budget is spent).
    pub fn release_idle_input(&mut self) -> bool {
        self.decoder.release_idle()
    }

    /// The peer ended its sending side. A server connection drains (what
    /// it read is still answered); a client's closes.
    pub fn handle_eof(&mut self) -> Option<CloseReason> {
        match (self.side, self.phase) {
            (Side::Client, _) => Some(CloseReason::PeerClosed),
            // Not even a first request arrived whole: nothing to answer.
            (Side::Server, Phase::Sniffing | Phase::Connecting) => Some(CloseReason::PeerClosed),
            (Side::Server, Phase::Open) => {
                self.phase = Phase::Draining;
                self.poll_close()
            }
            (Side::Server, Phase::Draining | Phase::Closing) => self.poll_close(),
        }
    }

    /// Bytes received and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.decoder.buffered()
    }

    /// Sniffing: the first bytes received so far.
    pub fn first_bytes(&self) -> Option<&[u8]> {
        (self.phase == Phase::Sniffing).then(|| self.decoder.buffered_bytes())
    }

    /// Sniffing: the first bytes are tbnet frames.
    pub fn frames_confirmed(&mut self) {
        if self.phase == Phase::Sniffing {
            self.phase = Phase::Open;
        }
    }

    /// Sniffing: answers with `response` and closes once it is written.
    pub fn respond_and_close(&mut self, response: Bytes) {
        self.first_frame_deadline = None;
        self.out.push_raw(response);
        self.phase = Phase::Closing;
    }

    /// Closes once everything queued is written (tbnet's
    /// `setWriteFinishClose`): nothing more is read or decoded. A client
    /// still connecting has nothing to write: it stays as it is (the
    /// driver closes it).
    pub fn close_when_written(&mut self) {
        if self.phase != Phase::Connecting {
            self.phase = Phase::Closing;
        }
    }

    /// The next whole frame, if decoding may go on and one is buffered.
    ///
    /// # Errors
    /// A bad frame: the stream has no frame boundary left, close it.
    pub fn next_frame<S: PacketStreamer + ?Sized>(
        &mut self,
        streamer: &S,
    ) -> Result<Option<Packet>, FrameError> {
        if !self.may_decode() {
            return Ok(None);
        }
        let frame = self.decoder.next_packet(streamer)?;
        self.decoded_all = frame.is_none();
        if frame.is_some() {
            self.first_frame_deadline = None;
        }
        Ok(frame)
    }

    // ----- requests handed to handlers (server) -----

    /// `n` requests went to handlers.
    pub fn dispatched(&mut self, n: usize) {
        self.dispatched += n as u64;
    }

    /// The total number of requests answered so far (a count kept where
    /// replies are made).
    pub fn set_answered(&mut self, total: u64) {
        self.answered = total;
    }

    /// Requests handed to handlers and not answered yet.
    pub fn unanswered(&self) -> u64 {
        self.dispatched.saturating_sub(self.answered)
    }

    /// A request could not be queued for the workers: reading stops.
    pub fn workers_full(&mut self) {
        self.workers_full = true;
    }

    /// The worker queue took the held request: reading may resume.
    pub fn workers_free(&mut self) {
        self.workers_full = false;
    }

    // ----- output -----

    /// The write queue: frames to send.
    pub fn out(&mut self) -> &mut WriteQueue {
        &mut self.out
    }

    /// Bytes waiting to be written.
    pub fn unwritten(&self) -> usize {
        self.out.len()
    }

    /// Whether the write queue may take more from senders (below the limit).
    pub fn wants_output(&self) -> bool {
        self.out.len() < self.limits.max_outbound
    }

    /// `n` bytes of the write queue were written.
    pub fn wrote(&mut self, n: usize) {
        self.out.advance(n);
    }

    /// Whether the connection is done and should close now.
    pub fn poll_close(&self) -> Option<CloseReason> {
        match self.phase {
            Phase::Closing if self.out.is_empty() => Some(CloseReason::Answered),
            Phase::Draining
                if self.out.is_empty()
                    && self.unanswered() == 0
                    && !self.workers_full
                    && self.decoded_all =>
            {
                Some(CloseReason::Drained)
            }
            _ => None,
        }
    }

    // ----- time -----

    /// The earliest time something is due on this connection.
    pub fn next_deadline(&self) -> Option<Instant> {
        let own = match (self.phase, self.side) {
            (Phase::Connecting, _) => return self.connect_deadline,
            (_, Side::Server) => self.limits.idle_timeout.map(|idle| self.last_input + idle),
            (_, Side::Client) => None,
        };
        [own, self.first_frame_deadline, self.handshake_deadline]
            .into_iter()
            .flatten()
            .min()
    }

    /// What is due at `now`: the reason to close, if any.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<CloseReason> {
        self.armed = None;
        let due = |deadline: Option<Instant>| deadline.is_some_and(|at| at <= now);
        match self.phase {
            Phase::Connecting => due(self.connect_deadline).then_some(CloseReason::ConnectTimedOut),
            _ if due(self.handshake_deadline) => Some(CloseReason::HandshakeTimedOut),
            _ if due(self.first_frame_deadline) => Some(CloseReason::FirstFrameTimedOut),
            _ => due(self.next_deadline()).then_some(CloseReason::Idle),
        }
    }

    /// The deadline to register with the timer, if it must be registered:
    /// one earlier than the registered one. A later one waits for the
    /// registered deadline to fire and is registered then (input moves the
    /// idle deadline on every read, and the timer need not hear of it).
    #[must_use]
    pub fn deadline_to_arm(&mut self) -> Option<Instant> {
        let next = self.next_deadline()?;
        if self.armed.is_some_and(|armed| armed <= next) {
            return None;
        }
        self.armed = Some(next);
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::DefaultStreamer;

    const MS: Duration = Duration::from_millis(1);

    fn limits() -> Limits {
        Limits {
            max_outbound: 1024,
            idle_timeout: Some(100 * MS),
            connect_timeout: 50 * MS,
            read_chunk: 4096,
            first_frame_timeout: None,
            handshake_timeout: 30 * MS,
            max_in_flight: 16,
        }
    }

    fn frame(chid: u32, body: &[u8]) -> Vec<u8> {
        let mut out = WriteQueue::new();
        let mut p = Packet::new(1, Bytes::copy_from_slice(body));
        p.set_channel_id(crate::ChannelId(chid));
        out.push(&DefaultStreamer::new(), &p);
        let mut bytes = Vec::new();
        let mut slices = [io::IoSlice::new(&[]); 8];
        let n = out.io_slices(&mut slices);
        for s in &slices[..n] {
            bytes.extend_from_slice(s);
        }
        bytes
    }

    #[test]
    fn client_connects_then_opens_and_has_no_idle_deadline() {
        let t0 = Instant::now();
        let mut c = Connection::client(t0, limits());
        assert_eq!(c.phase(), Phase::Connecting);
        assert_eq!(c.hold(), Some(Hold::Connecting));
        assert_eq!(c.next_deadline(), Some(t0 + 50 * MS));
        c.connected(t0 + MS);
        assert_eq!(c.phase(), Phase::Open);
        assert_eq!(c.hold(), None);
        assert_eq!(c.next_deadline(), None);
        assert_eq!(c.handle_timeout(t0 + 10_000 * MS), None);
    }

    #[test]
    fn connect_timeout_fires_only_while_connecting() {
        let t0 = Instant::now();
        let mut c = Connection::client(t0, limits());
        assert_eq!(c.handle_timeout(t0 + 49 * MS), None);
        assert_eq!(
            c.handle_timeout(t0 + 50 * MS),
            Some(CloseReason::ConnectTimedOut)
        );
    }

    #[test]
    fn idle_deadline_moves_with_input() {
        let t0 = Instant::now();
        let mut c = Connection::server(t0, limits(), false);
        assert_eq!(c.next_deadline(), Some(t0 + 100 * MS));
        c.handle_input(b"x", t0 + 60 * MS);
        assert_eq!(c.handle_timeout(t0 + 100 * MS), None);
        assert_eq!(c.next_deadline(), Some(t0 + 160 * MS));
        assert_eq!(c.handle_timeout(t0 + 160 * MS), Some(CloseReason::Idle));
    }

    #[test]
    fn deadlines_are_armed_only_when_earlier_than_the_armed_one() {
        let t0 = Instant::now();
        let mut c = Connection::server(t0, limits(), false);
        assert_eq!(c.deadline_to_arm(), Some(t0 + 100 * MS));
        c.handle_input(b"x", t0 + 10 * MS);
        assert_eq!(c.deadline_to_arm(), None, "a later deadline waits");
        assert_eq!(c.handle_timeout(t0 + 100 * MS), None);
        assert_eq!(
            c.deadline_to_arm(),
            Some(t0 + 110 * MS),
            "re-armed after firing"
        );
    }

    #[test]
    fn a_deadline_fires_while_output_is_blocked() {
        let t0 = Instant::now();
        let mut c = Connection::server(t0, limits(), false);
        c.out().push_raw(Bytes::from(vec![0; 2048]));
        assert_eq!(c.hold(), Some(Hold::PeerNotReading));
        assert!(!c.may_decode());
        assert_eq!(c.handle_timeout(t0 + 100 * MS), Some(CloseReason::Idle));
    }

    #[test]
    fn output_over_the_limit_holds_reading_until_written() {
        let t0 = Instant::now();
        let mut c = Connection::server(t0, limits(), false);
        c.out().push_raw(Bytes::from(vec![0; 1500]));
        assert_eq!(c.hold(), Some(Hold::PeerNotReading));
        c.wrote(1000);
        assert_eq!(c.hold(), None);
        // Clients never hold for output.
        let mut client = Connection::client(t0, limits());
        client.connected(t0);
        client.out().push_raw(Bytes::from(vec![0; 1500]));
        assert_eq!(client.hold(), None);
    }

    #[test]
    fn workers_full_holds_reading_and_decoding() {
        let t0 = Instant::now();
        let s = DefaultStreamer::new();
        let mut c = Connection::server(t0, limits(), false);
        c.handle_input(&frame(1, b"a"), t0);
        c.workers_full();
        assert_eq!(c.hold(), Some(Hold::WorkersFull));
        assert!(c.next_frame(&s).unwrap().is_none());
        c.workers_free();
        assert!(c.next_frame(&s).unwrap().is_some());
    }

    #[test]
    fn end_of_stream_drains_a_server_until_every_request_is_answered_and_written() {
        let t0 = Instant::now();
        let s = DefaultStreamer::new();
        let mut c = Connection::server(t0, limits(), false);
        let mut input = frame(1, b"a");
        input.extend(frame(2, b"b"));
        c.handle_input(&input, t0);
        assert!(c.next_frame(&s).unwrap().is_some());
        c.dispatched(1);
        assert_eq!(c.handle_eof(), None, "one request is still buffered");
        assert_eq!(c.phase(), Phase::Draining);
        assert_eq!(c.hold(), Some(Hold::PeerClosed));
        // What was read before the end of stream is still decoded.
        assert!(c.next_frame(&s).unwrap().is_some());
        c.dispatched(1);
        assert!(c.next_frame(&s).unwrap().is_none());
        c.set_answered(1);
        assert_eq!(c.poll_close(), None);
        c.set_answered(2);
        c.out().push_raw(Bytes::from_static(b"reply"));
        assert_eq!(c.poll_close(), None, "the replies are not written yet");
        c.wrote(5);
        assert_eq!(c.poll_close(), Some(CloseReason::Drained));
    }

    #[test]
    fn a_draining_connection_decodes_what_it_read_before_it_closes() {
        let t0 = Instant::now();
        let s = DefaultStreamer::new();
        let mut c = Connection::server(t0, limits(), false);
        let mut input = frame(1, b"a");
        input.extend(frame(2, b"b"));
        c.handle_input(&input, t0);
        assert!(c.next_frame(&s).unwrap().is_some());
        c.dispatched(1);
        // The reply fills the output: decoding stops with frame 2 buffered.
        c.out().push_raw(Bytes::from(vec![0; 2048]));
        assert!(c.next_frame(&s).unwrap().is_none());
        assert_eq!(c.handle_eof(), None);
        c.set_answered(1);
        c.wrote(2048);
        assert_eq!(c.poll_close(), None, "frame 2 is still to be answered");
        assert!(c.next_frame(&s).unwrap().is_some());
        c.dispatched(1);
        assert!(c.next_frame(&s).unwrap().is_none());
        c.set_answered(2);
        assert_eq!(c.poll_close(), Some(CloseReason::Drained));
    }

    #[test]
    fn end_of_stream_while_sniffing_closes() {
        let t0 = Instant::now();
        let mut c = Connection::server(t0, limits(), true);
        c.handle_input(b"GET /sta", t0);
        assert_eq!(c.handle_eof(), Some(CloseReason::PeerClosed));
    }

    #[test]
    fn a_draining_connection_with_a_held_request_waits_for_the_workers() {
        let t0 = Instant::now();
        let mut c = Connection::server(t0, limits(), false);
        c.workers_full();
        assert_eq!(c.handle_eof(), None);
        c.workers_free();
        c.dispatched(1);
        assert_eq!(c.poll_close(), None);
        c.set_answered(1);
        assert_eq!(c.poll_close(), Some(CloseReason::Drained));
    }

    #[test]
    fn a_draining_peer_that_never_reads_is_closed_by_the_idle_deadline() {
        let t0 = Instant::now();
        let mut c = Connection::server(t0, limits(), false);
        c.out().push_raw(Bytes::from(vec![0; 4096]));
        assert_eq!(c.handle_eof(), None);
        assert_eq!(c.handle_timeout(t0 + 100 * MS), Some(CloseReason::Idle));
    }

    #[test]
    fn client_end_of_stream_closes() {
        let t0 = Instant::now();
        let mut c = Connection::client(t0, limits());
        c.connected(t0);
        assert_eq!(c.handle_eof(), Some(CloseReason::PeerClosed));
    }

    #[test]
    fn sniffing_then_frames_or_a_last_response() {
        let t0 = Instant::now();
        let mut c = Connection::server(t0, limits(), true);
        assert_eq!(c.phase(), Phase::Sniffing);
        assert!(!c.may_decode());
        c.handle_input(b"GE", t0);
        assert_eq!(c.first_bytes(), Some(&b"GE"[..]));
        c.respond_and_close(Bytes::from_static(b"HTTP/1.1 200 OK\r\n\r\n"));
        assert_eq!(c.phase(), Phase::Closing);
        assert_eq!(c.hold(), Some(Hold::Closing));
        assert_eq!(c.poll_close(), None);
        let n = c.unwritten();
        c.wrote(n);
        assert_eq!(c.poll_close(), Some(CloseReason::Answered));

        let mut c = Connection::server(t0, limits(), true);
        c.frames_confirmed();
        assert_eq!(c.phase(), Phase::Open);
        assert_eq!(c.first_bytes(), None);
    }

    #[test]
    fn a_server_without_a_whole_first_frame_in_time_is_closed() {
        let t0 = Instant::now();
        let s = DefaultStreamer::new();
        let with_deadline = Limits {
            first_frame_timeout: Some(20 * MS),
            ..limits()
        };
        let mut c = Connection::server(t0, with_deadline, false);
        assert_eq!(c.next_deadline(), Some(t0 + 20 * MS));
        // Half a frame does not count, however recent.
        let f = frame(1, b"abc");
        c.handle_input(&f[..10], t0 + 19 * MS);
        assert!(c.next_frame(&s).unwrap().is_none());
        assert_eq!(
            c.handle_timeout(t0 + 20 * MS),
            Some(CloseReason::FirstFrameTimedOut)
        );

        let mut c = Connection::server(t0, with_deadline, false);
        c.handle_input(&f, t0 + MS);
        assert!(c.next_frame(&s).unwrap().is_some());
        assert_eq!(c.handle_timeout(t0 + 20 * MS), None, "the first frame came");
        assert_eq!(c.next_deadline(), Some(t0 + 101 * MS), "only idle is left");
    }

    #[test]
    fn a_status_request_head_counts_as_a_first_frame() {
        let t0 = Instant::now();
        let with_deadline = Limits {
            first_frame_timeout: Some(20 * MS),
            ..limits()
        };
        let mut c = Connection::server(t0, with_deadline, true);
        c.handle_input(b"GET / HTTP/1.1\r\n\r\n", t0);
        c.respond_and_close(Bytes::from_static(b"HTTP/1.1 200 OK\r\n\r\n"));
        assert_eq!(c.handle_timeout(t0 + 50 * MS), None);
    }

    #[test]
    fn a_handshake_has_its_own_deadline() {
        let t0 = Instant::now();
        let mut c = Connection::client(t0, limits());
        c.connected(t0 + MS);
        c.start_handshake(t0 + MS);
        assert!(c.in_handshake());
        assert_eq!(c.next_deadline(), Some(t0 + 31 * MS));
        assert_eq!(
            c.handle_timeout(t0 + 31 * MS),
            Some(CloseReason::HandshakeTimedOut)
        );
        c.handshake_done();
        assert_eq!(c.next_deadline(), None);
        assert_eq!(c.handle_timeout(t0 + 1000 * MS), None);
    }

    #[test]
    fn unanswered_requests_at_the_limit_hold_reading_until_answered() {
        let t0 = Instant::now();
        let s = DefaultStreamer::new();
        let two = Limits {
            max_in_flight: 2,
            ..limits()
        };
        let mut c = Connection::server(t0, two, false);
        let mut input = frame(1, b"a");
        input.extend(frame(2, b"b"));
        input.extend(frame(3, b"c"));
        c.handle_input(&input, t0);
        for _ in 0..2 {
            assert!(c.next_frame(&s).unwrap().is_some());
            c.dispatched(1);
        }
        assert_eq!(c.hold(), Some(Hold::InFlight));
        assert!(c.backlogged());
        assert!(c.next_frame(&s).unwrap().is_none(), "frame 3 waits");
        assert_eq!(c.in_flight_room(), 0);
        c.set_answered(1);
        assert_eq!(c.in_flight_room(), 1);
        assert_eq!(c.hold(), None);
        assert!(c.next_frame(&s).unwrap().is_some());
        // Clients are never held for requests in flight.
        let mut client = Connection::client(t0, two);
        client.connected(t0);
        client.dispatched(5);
        assert_eq!(client.hold(), None);
    }

    #[test]
    fn the_memory_budget_holds_reading_not_decoding() {
        let t0 = Instant::now();
        let s = DefaultStreamer::new();
        let mut c = Connection::server(t0, limits(), false);
        c.handle_input(&frame(1, b"a"), t0);
        assert!(c.memory() >= c.buffered());
        c.set_budget_hold(true);
        assert_eq!(c.hold(), Some(Hold::MemoryBudget));
        assert!(!c.release_idle_input(), "input is buffered");
        assert!(c.next_frame(&s).unwrap().is_some());
        c.release_idle_input();
        assert_eq!(c.memory(), 0, "the emptied buffer holds nothing");
        c.set_budget_hold(false);
        assert_eq!(c.hold(), None);
    }

    #[test]
    fn close_when_written_reads_no_more_and_closes_once_flushed() {
        let t0 = Instant::now();
        for side in [Side::Server, Side::Client] {
            let mut c = match side {
                Side::Server => Connection::server(t0, limits(), false),
                Side::Client => {
                    let mut c = Connection::client(t0, limits());
                    c.connected(t0);
                    c
                }
            };
            c.handle_input(&frame(1, b"unread"), t0);
            c.out().push_raw(Bytes::from_static(b"last words"));
            c.close_when_written();
            assert_eq!(c.hold(), Some(Hold::Closing));
            assert!(!c.may_decode());
            assert_eq!(c.next_frame(&DefaultStreamer::new()), Ok(None));
            assert_eq!(c.poll_close(), None);
            c.wrote(4);
            assert_eq!(c.poll_close(), None);
            c.wrote(6);
            assert_eq!(c.poll_close(), Some(CloseReason::Answered));
        }
        let mut connecting = Connection::client(t0, limits());
        connecting.close_when_written();
        assert_eq!(connecting.phase(), Phase::Connecting);
    }
}
