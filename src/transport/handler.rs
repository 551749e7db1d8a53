//! What the transport asks of the layer above it, and nothing more: what to
//! do with a request frame, with a connection's first bytes, and where to
//! run it. The server API (`ServerAdaptor`, `Responder`, routers, the status
//! page) is built on these; the transport knows none of it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::SendError;
use crate::metrics::ErrorKind;
use crate::packet::{ChannelId, Packet, PacketCode};
use crate::proto::reply::ERROR_PCODE;
use crate::proto::Codec;

use super::conn::Conn;
use super::events::ConnectionEvents;
use super::stats::StatsSnapshot;

/// Where a listener's requests are handled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dispatch {
    /// On the IO thread, as soon as decoded: the fastest path, for handlers
    /// that never block.
    IoThread,
    /// On the worker pool, through a bounded queue; when it is full the IO
    /// thread stops reading until there is room (TCP pushes back on clients).
    /// A decode pass goes to a worker as one job; while a core is spare,
    /// another worker takes the pass's next requests beside it, and
    /// otherwise the IO thread wakes one if the first worker takes no
    /// request for 1 ms (a handler that blocks holds up the rest of its
    /// pass for at most that long).
    #[default]
    Workers,
    /// On the worker pool, one connection's requests one after another in
    /// arrival order (the next starts once the previous handler returned),
    /// so replies made before a handler returns leave in request order;
    /// different connections still run in parallel. The queue limit counts
    /// requests waiting across all ordered connections; past it the IO
    /// thread stops reading (one decode pass per connection may go over).
    Ordered,
}

/// Handles one request frame that arrived on a server connection.
pub(crate) trait RequestHandler: Send + Sync + 'static {
    /// Handles `request`; the answer (if any) goes through `reply`.
    fn handle_request(&self, request: Packet, reply: ReplyTo);

    /// Handles the requests one decode pass (or, ordered, one strand) holds,
    /// in arrival order. Called only for services that ask for batches.
    fn handle_batch(&self, requests: Vec<(Packet, ReplyTo)>) {
        for (request, reply) in requests {
            self.handle_request(request, reply);
        }
    }
}

/// What a listener's connection's first bytes are.
pub(crate) enum Sniffed {
    /// Not enough bytes to tell.
    NeedMore,
    /// tbnet frames: decode on.
    Frames,
    /// Another protocol, answered: send this and close.
    Respond(Bytes),
    /// Another protocol, malformed: close at once.
    Reject(&'static str),
    /// Another protocol this peer may not use: close at once, unanswered,
    /// counted as a refusal.
    Refuse(&'static str),
}

/// What a sniffer may look at besides the bytes.
pub(crate) struct SniffContext<'a> {
    /// Who sent the bytes.
    pub(crate) peer: std::net::SocketAddr,
    /// The transport's counters, read only if asked for.
    pub(crate) stats: &'a dyn Fn() -> StatsSnapshot,
    /// Time since the transport started.
    pub(crate) uptime: Duration,
    /// Per packet code numbers.
    pub(crate) metrics: &'a crate::metrics::Metrics,
}

/// Looks at a server connection's first bytes before any frame is decoded.
pub(crate) trait Sniffer: Send + Sync + 'static {
    fn sniff(&self, first_bytes: &[u8], context: &SniffContext<'_>) -> Sniffed;
}

/// Everything a listener's connections need from the layer above.
pub(crate) struct Service {
    pub(crate) handler: Arc<dyn RequestHandler>,
    pub(crate) dispatch: Dispatch,
    /// Hand the handler each decode pass's requests as one batch.
    pub(crate) batches: bool,
    pub(crate) sniffer: Option<Arc<dyn Sniffer>>,
    /// Who may connect, and how many at once.
    pub(crate) policy: super::admission::Policy,
    /// Plain TCP or TLS.
    pub(crate) security: super::stream::Security,
    /// What hears the listener's connections open and close.
    pub(crate) events: Option<Arc<dyn ConnectionEvents>>,
    /// The listener's framing, if not the transport's.
    pub(crate) codec: Option<Codec>,
}

/// The way back for one request: the transport's half of a responder.
///
/// Ends exactly once, by [`send`](Self::send) or by being dropped; either
/// way its connection counts the request as answered (a draining
/// connection closes once every request it read is answered).
///
/// It also counts the request in the transport's per-code metrics, with
/// the time since its frame was decoded.
pub(crate) struct ReplyTo {
    conn: Arc<Conn>,
    channel_id: ChannelId,
    pcode: PacketCode,
    received: Instant,
    done: bool,
}

impl ReplyTo {
    pub(crate) fn new(conn: Arc<Conn>, request: &Packet, received: Instant) -> Self {
        ReplyTo {
            conn,
            channel_id: request.channel_id(),
            pcode: request.pcode(),
            received,
            done: false,
        }
    }

    fn record(&self, error: Option<ErrorKind>) {
        let server = &self.conn.shared.metrics.server;
        server.record_since(self.pcode, self.received, error);
    }

    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    pub(crate) fn channel_id(&self) -> ChannelId {
        self.channel_id
    }

    /// Queues `response` (its channel id already set) on the connection.
    ///
    /// # Errors
    /// The packet handed back if the connection closed.
    pub(crate) fn send(mut self, response: Packet) -> Result<(), SendError<Packet>> {
        self.done = true;
        let error_reply = response.pcode() == ERROR_PCODE;
        let sent = self.conn.send_reply(response);
        self.record(match (&sent, error_reply) {
            (Err(_), _) => Some(ErrorKind::ReplyDropped),
            (Ok(()), true) => Some(ErrorKind::Remote),
            (Ok(()), false) => None,
        });
        sent
    }
}

impl Drop for ReplyTo {
    fn drop(&mut self) {
        if !self.done {
            // A one-way request is not expected to be answered.
            self.record((!self.channel_id.is_none()).then_some(ErrorKind::Unanswered));
            self.conn.answered_without_reply();
        }
    }
}
