//! Counters readable from a running transport.

use crate::sync::{AtomicU64, Ordering};

/// Counters written mostly by one thread, kept on their own cache line so
/// writers on different threads do not contend for it.
#[repr(align(64))]
struct Line<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for Line<N> {
    fn default() -> Self {
        Line(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl<const N: usize> Line<N> {
    fn add(&self, i: usize, n: u64) {
        self.0[i].fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&self, i: usize, n: u64) {
        self.0[i].fetch_sub(n, Ordering::Relaxed);
    }

    fn set(&self, i: usize, n: u64) {
        self.0[i].store(n, Ordering::Relaxed);
    }

    fn get(&self, i: usize) -> u64 {
        self.0[i].load(Ordering::Relaxed)
    }
}

// IO thread counters.
const PACKETS_IN: usize = 0;
const BYTES_IN: usize = 1;
const BYTES_OUT: usize = 2;
const CONNECTIONS: usize = 3;
const CONNECTIONS_TOTAL: usize = 4;
const LATE_RESPONSES: usize = 5;
const BAD_FRAMES: usize = 6;
const HALF_CLOSES: usize = 7;
const CONNECT_ATTEMPTS: usize = 8;
const EARLY_FAILURES: usize = 9;
const POST_REPLIES: usize = 10;
const UNHANDLED: usize = 11;
const REFUSED: usize = 12;
const OVER_LIMIT: usize = 13;
const ACCEPT_ERRORS: usize = 14;
const FIRST_FRAME_TIMEOUTS: usize = 15;
const HANDSHAKE_FAILURES: usize = 16;
const STATUS_REFUSED: usize = 17;
const POLL_WAKEUPS: usize = 18;
const MEMORY: usize = 19;
const BUDGET_HOLDS: usize = 20;
const IN_FLIGHT_HOLDS: usize = 21;
const BUDGET_RELEASES: usize = 22;

// Caller, worker and timer counters.
const PACKETS_OUT: usize = 0;
const PENDING: usize = 1;
const TIMEOUTS: usize = 2;
const REPLIES_DROPPED: usize = 3;
const UNROUTED: usize = 4;

#[derive(Default)]
pub(crate) struct Stats {
    io: Line<23>,
    callers: Line<5>,
}

impl Stats {
    pub(crate) fn packets_in(&self, n: usize) {
        self.io.add(PACKETS_IN, n as u64);
    }
    pub(crate) fn bytes_in(&self, n: u64) {
        self.io.add(BYTES_IN, n);
    }
    pub(crate) fn bytes_out(&self, n: u64) {
        self.io.add(BYTES_OUT, n);
    }
    pub(crate) fn connection_opened(&self) {
        self.io.add(CONNECTIONS, 1);
        self.io.add(CONNECTIONS_TOTAL, 1);
    }
    pub(crate) fn connection_closed(&self) {
        self.io.sub(CONNECTIONS, 1);
    }
    pub(crate) fn late_responses(&self, n: usize) {
        if n > 0 {
            self.io.add(LATE_RESPONSES, n as u64);
        }
    }
    pub(crate) fn bad_frame(&self) {
        self.io.add(BAD_FRAMES, 1);
    }
    pub(crate) fn half_close(&self) {
        self.io.add(HALF_CLOSES, 1);
    }
    pub(crate) fn connect_attempt(&self) {
        self.io.add(CONNECT_ATTEMPTS, 1);
    }
    pub(crate) fn early_failure(&self) {
        self.io.add(EARLY_FAILURES, 1);
    }
    pub(crate) fn post_replies(&self, n: usize) {
        if n > 0 {
            self.io.add(POST_REPLIES, n as u64);
        }
    }
    pub(crate) fn refused(&self) {
        self.io.add(REFUSED, 1);
    }
    pub(crate) fn over_limit(&self) {
        self.io.add(OVER_LIMIT, 1);
    }
    pub(crate) fn accept_error(&self) {
        self.io.add(ACCEPT_ERRORS, 1);
    }
    pub(crate) fn first_frame_timeout(&self) {
        self.io.add(FIRST_FRAME_TIMEOUTS, 1);
    }
    pub(crate) fn handshake_failure(&self) {
        self.io.add(HANDSHAKE_FAILURES, 1);
    }
    pub(crate) fn status_refused(&self) {
        self.io.add(STATUS_REFUSED, 1);
    }
    pub(crate) fn poll_wakeup(&self) {
        self.io.add(POLL_WAKEUPS, 1);
    }
    pub(crate) fn set_memory(&self, bytes: usize) {
        self.io.set(MEMORY, bytes as u64);
    }
    pub(crate) fn budget_hold(&self) {
        self.io.add(BUDGET_HOLDS, 1);
    }
    pub(crate) fn in_flight_hold(&self) {
        self.io.add(IN_FLIGHT_HOLDS, 1);
    }
    pub(crate) fn budget_releases(&self, n: usize) {
        self.io.add(BUDGET_RELEASES, n as u64);
    }
    pub(crate) fn packets_out(&self, n: usize) {
        if n > 0 {
            self.callers.add(PACKETS_OUT, n as u64);
        }
    }
    pub(crate) fn pending_added(&self) {
        self.callers.add(PENDING, 1);
    }
    pub(crate) fn pending_removed(&self, n: usize) {
        self.callers.sub(PENDING, n as u64);
    }
    pub(crate) fn timed_out(&self, n: usize) {
        self.callers.add(TIMEOUTS, n as u64);
    }
    pub(crate) fn reply_dropped(&self) {
        self.callers.add(REPLIES_DROPPED, 1);
    }
    pub(crate) fn unrouted(&self) {
        self.callers.add(UNROUTED, 1);
    }

    pub(crate) fn unhandled(&self) {
        self.io.add(UNHANDLED, 1);
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            packets_in: self.io.get(PACKETS_IN),
            packets_out: self.callers.get(PACKETS_OUT),
            bytes_in: self.io.get(BYTES_IN),
            bytes_out: self.io.get(BYTES_OUT),
            connections: self.io.get(CONNECTIONS),
            connections_total: self.io.get(CONNECTIONS_TOTAL),
            // Added after, and removed by other threads: a snapshot can
            // catch a removal before its addition.
            pending: (self.callers.get(PENDING) as i64).max(0) as u64,
            timeouts: self.callers.get(TIMEOUTS),
            late_responses: self.io.get(LATE_RESPONSES),
            replies_dropped: self.callers.get(REPLIES_DROPPED),
            bad_frames: self.io.get(BAD_FRAMES),
            worker_queue: 0,
            unrouted: self.callers.get(UNROUTED),
            half_closes: self.io.get(HALF_CLOSES),
            connect_attempts: self.io.get(CONNECT_ATTEMPTS),
            early_failures: self.io.get(EARLY_FAILURES),
            post_replies: self.io.get(POST_REPLIES),
            unhandled: self.io.get(UNHANDLED),
            refused: self.io.get(REFUSED),
            over_limit: self.io.get(OVER_LIMIT),
            accept_errors: self.io.get(ACCEPT_ERRORS),
            first_frame_timeouts: self.io.get(FIRST_FRAME_TIMEOUTS),
            handshake_failures: self.io.get(HANDSHAKE_FAILURES),
            status_refused: self.io.get(STATUS_REFUSED),
            poll_wakeups: self.io.get(POLL_WAKEUPS),
            memory: self.io.get(MEMORY),
            budget_holds: self.io.get(BUDGET_HOLDS),
            in_flight_holds: self.io.get(IN_FLIGHT_HOLDS),
            budget_releases: self.io.get(BUDGET_RELEASES),
        }
    }
}

/// A point-in-time copy of a transport's counters
/// ([`Transport::stats`](crate::Transport::stats)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Packets decoded from all connections (requests and responses).
    pub packets_in: u64,
    /// Packets handed to the IO thread for sending (requests, one-way posts
    /// and replies).
    pub packets_out: u64,
    /// Bytes read from sockets.
    pub bytes_in: u64,
    /// Bytes written to sockets.
    pub bytes_out: u64,
    /// Connections open now (client and server side).
    pub connections: u64,
    /// Connections opened since start.
    pub connections_total: u64,
    /// Client requests waiting for their response now.
    pub pending: u64,
    /// Client requests that ended with [`Error::Timeout`](crate::Error::Timeout).
    pub timeouts: u64,
    /// Responses that matched no pending request (late or unknown), dropped.
    pub late_responses: u64,
    /// Server replies dropped because their connection had closed.
    pub replies_dropped: u64,
    /// Connections closed because of a malformed frame.
    pub bad_frames: u64,
    /// Requests waiting in the worker queue now.
    pub worker_queue: u64,
    /// Requests a [`Router`](crate::Router) had no route for and dropped.
    pub unrouted: u64,
    /// Server connections whose peer ended its sending side (end of stream):
    /// the server then drains them, answering what it read before closing
    /// (a connection still being sniffed just closes).
    pub half_closes: u64,
    /// Client connections this transport tried to open (first connects and
    /// reconnects).
    pub connect_attempts: u64,
    /// Client connections that ended before they proved healthy (failed to
    /// connect, or closed before their first response and within the
    /// health grace): each made the next reconnect wait longer.
    pub early_failures: u64,
    /// Replies to one-way messages sent with
    /// [`ConnectionManager::post`](crate::ConnectionManager::post): matched
    /// to their channel id, then discarded.
    pub post_replies: u64,
    /// Packets a server sent a client on its own (one-way, or requests)
    /// that found no default handler
    /// ([`ConnectionManager::set_default_handler`](crate::ConnectionManager::set_default_handler)),
    /// or found the callback queue full, and were dropped.
    pub unhandled: u64,
    /// Connections refused at accept because the peer is not on the
    /// listener's allow-list.
    pub refused: u64,
    /// Connections closed at accept because the listener or the transport
    /// had its maximum open.
    pub over_limit: u64,
    /// Accepts that failed for lack of resources (`EMFILE`, `ENFILE`,
    /// `ENOMEM`); the listener retries every 100 ms meanwhile.
    pub accept_errors: u64,
    /// Server connections closed because no whole first frame (or
    /// status-page request) arrived within
    /// [`first_frame_timeout`](crate::TransportBuilder::first_frame_timeout).
    pub first_frame_timeouts: u64,
    /// Connections whose TLS handshake failed or timed out.
    pub handshake_failures: u64,
    /// Status-page requests from peers not on the status allow-list
    /// (closed unanswered).
    pub status_refused: u64,
    /// Times the IO thread woke from waiting for events.
    pub poll_wakeups: u64,
    /// Bytes held now in connections' read buffers and unwritten output
    /// (what the [`memory_budget`](crate::TransportBuilder::memory_budget)
    /// counts).
    pub memory: u64,
    /// Times a connection stopped being read because the memory budget was
    /// spent and it held more than its share.
    pub budget_holds: u64,
    /// Times a server connection stopped being read because it had
    /// [`max_in_flight`](crate::TransportBuilder::max_in_flight) requests
    /// unanswered.
    pub in_flight_holds: u64,
    /// Read buffers given back, empty, because the memory budget was spent
    /// (an idle connection's buffer costs nothing until its next read).
    pub budget_releases: u64,
}
