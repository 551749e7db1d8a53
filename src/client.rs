//! The client side: connections reused per server, and the four ways to
//! send.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::completion::{
    clamp_wait, CallWait, CancelHandle, Completion, PacketHandler, ResponseFuture,
    SharedPacketHandler, WaitObject,
};
use crate::endpoint::ToEndpoint;
use crate::error::{Error, SendError};
use crate::hash::FastMap;
use crate::message::{Message, MessageFuture};
use crate::packet::{ChannelId, Packet};
use crate::proto::{Codec, PacketStreamer, Side};
use crate::server::{Adapted, ServerAdaptor};
use crate::sync::Mutex;
use crate::transport::{
    Command, Conn, ConnectionEvents, DefaultHandler, Rejected, RequestHandler, Security, Transport,
};

/// Default limit of requests pending on one connection (tbnet's
/// ConnectionManager default).
pub const DEFAULT_QUEUE_LIMIT: usize = 256;

/// Default request timeout (tbnet's per-connection queue timeout).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(5000);

/// What requests to a server do while its connection is down: whether the
/// manager reconnects by itself, and what happens to requests while the
/// next reconnect attempt is still in its backoff delay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhileDown {
    /// Reconnect on the next request; during a backoff delay fail at once
    /// with [`Error::Disconnected`] (the default).
    #[default]
    FailFast,
    /// Reconnect when the backoff delay ends; meanwhile queue on the next
    /// connection (up to the queue limit), each request's own timeout still
    /// applying.
    Queue,
    /// Never reconnect by itself (tbnet's `autoReconn = false`): once a
    /// server's connection closed (lost, or
    /// [`disconnect`](ConnectionManager::disconnect)ed), requests to it fail
    /// at once with [`Error::Disconnected`] until
    /// [`connect`](ConnectionManager::connect) opens a new one. The first
    /// request to a server the manager never connected to still opens its
    /// connection.
    StayDown,
}

/// Exponential backoff with jitter between reconnect attempts.
///
/// A connection attempt *fails* when it ends before it proved healthy: the
/// connect failed or timed out, or the connection closed (by the peer, a
/// reset, or a bad frame) before any response arrived on it and within
/// `grace` of opening. A connection *proved healthy* once a response
/// arrived on it, or once it stayed open for `grace`.
///
/// - The delay grows with each failed attempt in a row: after `n` failures
///   it is drawn at random from the upper half of `initial × 2^(n-1)`
///   (capped at `max`), so many clients do not reconnect in lockstep.
/// - It resets when a connection proved healthy: after losing such a
///   connection the next one opens at once.
///
/// So a peer that accepts and closes at once (shedding load, a proxy with
/// no backend) sees a handful of attempts per client, not thousands; while
/// the delay runs, requests follow [`WhileDown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failed attempt (default 100 ms).
    pub initial: Duration,
    /// Longest delay (default 10 s).
    pub max: Duration,
    /// How long a connection must stay open to count as healthy when no
    /// response arrived on it (default 1 s).
    pub grace: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            grace: Duration::from_secs(1),
        }
    }
}

impl Backoff {
    /// The delay after `failures` failed attempts in a row (0: none), with
    /// jitter drawn from `random`: a value in `[max/2, max]` where `max` is
    /// the exponential step.
    ///
    /// # Examples
    /// ```
    /// use std::time::Duration;
    /// use tbnet::Backoff;
    ///
    /// let b = Backoff::default();
    /// assert_eq!(b.delay(0, 0), Duration::ZERO);
    /// assert!(b.delay(1, 0) >= Duration::from_millis(50) && b.delay(1, 0) <= Duration::from_millis(100));
    /// assert!(b.delay(30, u64::MAX) <= Duration::from_secs(10));
    /// ```
    pub fn delay(&self, failures: u32, random: u64) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let step = self
            .initial
            .saturating_mul(1u32 << (failures - 1).min(20))
            .min(self.max);
        let half = step / 2;
        let nanos = half.as_nanos() as u64;
        half + Duration::from_nanos(if nanos == 0 { 0 } else { random % (nanos + 1) })
    }
}

/// A random `u64` for jitter, from the standard library's per-process
/// random hash keys.
fn jitter_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(Instant::now().elapsed().as_nanos());
    hasher.finish()
}

/// One server's connection counters
/// ([`ConnectionManager::server_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Connections opened (or tried) to this server by this manager.
    pub connect_attempts: u64,
    /// Of those, connections that ended before they proved healthy: they
    /// failed to connect, or closed before their first response arrived and
    /// within [`Backoff::grace`].
    pub early_failures: u64,
    /// Early failures since the last healthy connection: what the current
    /// backoff delay is computed from.
    pub failures_in_a_row: u32,
    /// Submissions blocked now waiting for room in the connection's queue
    /// ([`ConnectionManager::with_queue_wait`]) or for it to connect
    /// ([`ConnectionManager::connect`]).
    pub waiting: u64,
}

/// One server's connection, its settings and its reconnect bookkeeping.
struct ServerSlot {
    /// `None` until the first connection opens.
    conn: Option<Arc<Conn>>,
    /// Requests pending at most on its connection.
    queue_limit: usize,
    /// The timeout of requests that pass `None`.
    default_timeout: Duration,
    /// Failed connect attempts in a row.
    failures: u32,
    /// No new connection before this (backoff).
    retry_at: Option<Instant>,
    /// The closed `conn` was already counted in `failures`.
    accounted: bool,
    /// A connection to this server opened once: the next one reconnects.
    opened_before: bool,
    stats: ServerStats,
}

/// tbnet's `u64` server id: `port << 32 | ipv4`, the address's four octets
/// in the low 32 bits first octet lowest (what tbnet computes from
/// `inet_addr` on little-endian hosts).
///
/// # Examples
/// ```
/// use std::net::SocketAddr;
/// use tbnet::ServerId;
///
/// let addr: SocketAddr = "10.0.0.1:5000".parse().unwrap();
/// let id = ServerId::try_from(addr).unwrap();
/// assert_eq!(id.0, (5000u64 << 32) | 0x0100_000A);
/// assert_eq!(SocketAddr::from(id), addr);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServerId(pub u64);

impl From<ServerId> for SocketAddr {
    fn from(id: ServerId) -> Self {
        let ip = (id.0 & 0xFFFF_FFFF) as u32;
        let port = (id.0 >> 32) as u16;
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip.to_le_bytes()), port))
    }
}

impl From<SocketAddrV4> for ServerId {
    fn from(addr: SocketAddrV4) -> Self {
        let ip = u32::from_le_bytes(addr.ip().octets());
        ServerId((u64::from(addr.port()) << 32) | u64::from(ip))
    }
}

impl TryFrom<SocketAddr> for ServerId {
    type Error = SocketAddr;

    /// IPv6 addresses have no tbnet server id: they are handed back.
    fn try_from(addr: SocketAddr) -> Result<Self, SocketAddr> {
        match addr {
            SocketAddr::V4(v4) => Ok(v4.into()),
            SocketAddr::V6(_) => Err(addr),
        }
    }
}

/// Connections to servers, opened on first use and reused (tbnet's
/// `ConnectionManager`). Dropping it closes them: keep it alive while its
/// requests are in flight.
///
/// One connection per server address carries every request to it, so
/// requests from many threads share it. A connection that closes fails its
/// pending requests with [`Error::Disconnected`]; the next request to that
/// server opens a new one (unless [`WhileDown::StayDown`]).
///
/// Outcomes reach the caller one of four ways: [`call`](Self::call) blocks,
/// [`send`](Self::send) runs a callback on a worker thread,
/// [`call_async`](Self::call_async) returns a future,
/// [`send_wait`](Self::send_wait) gathers several on a [`WaitObject`].
/// [`post`](Self::post) sends one-way.
///
/// A server is named by anything [`ToEndpoint`]: a [`SocketAddr`], a
/// [`ServerId`], or a spec string `"tcp:host:port"` / `"host:port"`
/// (resolved on every use: pass a [`SocketAddr`] on hot paths).
///
/// # Connections and settings
/// [`connect`](Self::connect), [`disconnect`](Self::disconnect) and
/// [`is_alive`](Self::is_alive) manage a server's connection by hand;
/// [`set_queue_limit`](Self::set_queue_limit) and
/// [`set_default_timeout`](Self::set_default_timeout) change one server's
/// settings while requests flow. With
/// [`with_queue_wait`](Self::with_queue_wait) a full queue makes a
/// submission wait for room instead of failing at once.
///
/// # Examples
/// ```
/// use tbnet::{ConnectionManager, Packet, Responder, Transport, WaitObject};
///
/// let transport = Transport::builder().start()?;
/// let addr = transport.listen("127.0.0.1:0", |req: Packet, resp: Responder| {
///     let _ = resp.reply(req.reply(req.body().clone()));
/// })?;
/// let client = ConnectionManager::new(&transport);
///
/// // Fan out three requests, then wait for all of them.
/// let mut wait = WaitObject::new();
/// for key in ["a", "b", "c"] {
///     client.send_wait(addr, Packet::new(1, key), None, &mut wait).unwrap();
/// }
/// let bodies: Vec<_> = wait.wait_all().into_iter().map(|r| r.unwrap().into_body()).collect();
/// assert_eq!(bodies, ["a", "b", "c"]);
/// # Ok::<(), tbnet::Error>(())
/// ```
pub struct ConnectionManager {
    transport: Transport,
    conns: Mutex<FastMap<SocketAddr, ServerSlot>>,
    queue_limit: usize,
    default_timeout: Duration,
    queue_wait: Duration,
    backoff: Backoff,
    while_down: WhileDown,
    security: Security,
    /// What hears this manager's connections open and close.
    events: Option<Arc<dyn ConnectionEvents>>,
    /// Where packets the servers send on their own go.
    default_handler: Arc<DefaultHandler>,
    /// This manager's framing, if not the transport's.
    codec: Option<Codec>,
}

impl Drop for ConnectionManager {
    /// Closes the manager's connections (requests still pending on them fail
    /// with [`Error::Shutdown`]); like tbnet's, a manager owns its
    /// connections.
    fn drop(&mut self) {
        let shared = self.transport.shared();
        let conns: Vec<Arc<Conn>> = self
            .conns
            .lock()
            .drain()
            .filter_map(|(_, slot)| slot.conn)
            .collect();
        for conn in conns {
            if !conn.is_closed() {
                shared.command(Command::Close(conn, Error::Shutdown));
            }
        }
    }
}

impl fmt::Debug for ConnectionManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionManager")
            .field("connections", &self.connections())
            .field("queue_limit", &self.queue_limit)
            .field("default_timeout", &self.default_timeout)
            .field("queue_wait", &self.queue_wait)
            .field("while_down", &self.while_down)
            .finish()
    }
}

impl ConnectionManager {
    /// A manager on `transport` with a queue limit of
    /// [`DEFAULT_QUEUE_LIMIT`] (256) requests per connection and a default
    /// timeout of [`DEFAULT_TIMEOUT`] (5 s).
    pub fn new(transport: &Transport) -> Self {
        ConnectionManager {
            transport: transport.clone(),
            conns: Mutex::new(FastMap::default()),
            queue_limit: DEFAULT_QUEUE_LIMIT,
            default_timeout: DEFAULT_TIMEOUT,
            queue_wait: Duration::ZERO,
            backoff: Backoff::default(),
            while_down: WhileDown::default(),
            security: Security::Plain,
            events: None,
            default_handler: Arc::new(Mutex::new(None)),
            codec: None,
        }
    }

    /// Hooks told when this manager's connections open, reopen after a loss
    /// ([`ConnectionEvents::on_reconnect`]) and close; see
    /// [`ConnectionEvents`] for the thread they run on. Applies to
    /// connections opened afterwards; without it, the transport's
    /// [`events`](crate::TransportBuilder::events) (if any) hear them.
    ///
    /// # Examples
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use tbnet::{ConnectionEvent, ConnectionHandle, ConnectionManager, Packet, Responder, Transport};
    ///
    /// let transport = Transport::builder().start()?;
    /// let addr = transport.listen("127.0.0.1:0", |req: Packet, resp: Responder| {
    ///     let _ = resp.reply(req.reply("ok"));
    /// })?;
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let log = seen.clone();
    /// let client = ConnectionManager::new(&transport).with_events(
    ///     move |_: &ConnectionHandle, event: ConnectionEvent| log.lock().unwrap().push(event),
    /// );
    /// client.call(addr, Packet::new(1, "hi"), None)?;
    /// transport.stop(); // waits for the hooks of the connections it closes
    /// assert_eq!(seen.lock().unwrap().first(), Some(&ConnectionEvent::Connected));
    /// # Ok::<(), tbnet::Error>(())
    /// ```
    pub fn with_events<E: ConnectionEvents>(mut self, events: E) -> Self {
        self.events = Some(Arc::new(events));
        self
    }

    /// This manager's framing (default: the transport's
    /// [`streamer`](crate::TransportBuilder::streamer)). Responses are
    /// matched by the channel id its `parse` returns. Applies to
    /// connections opened afterwards.
    pub fn with_streamer<S: PacketStreamer>(mut self, streamer: S) -> Self {
        self.codec = Some(Codec::new(streamer));
        self
    }

    /// Handles packets a server sends on its own (tbnet's default packet
    /// handler): one-way packets (channel id 0) and requests a server sent
    /// through a [`ConnectionHandle`](crate::ConnectionHandle) (bit 31 of
    /// the channel id set). The handler may answer a request through its
    /// [`Responder`](crate::Responder); a one-way packet's responder
    /// discards the reply. It runs where callbacks do (a worker by
    /// default, see [`send`](Self::send)). Replaces the previous handler;
    /// applies to every connection of this manager at once.
    ///
    /// Without a handler such packets are dropped and counted in
    /// [`StatsSnapshot::unhandled`](crate::StatsSnapshot::unhandled).
    /// Responses that match no pending request (late ones) are dropped and
    /// counted in
    /// [`StatsSnapshot::late_responses`](crate::StatsSnapshot::late_responses),
    /// handler or not.
    pub fn set_default_handler<A: ServerAdaptor>(&self, handler: A) {
        let handler: Arc<dyn RequestHandler> = Arc::new(Adapted(handler));
        let old = self.default_handler.lock().replace(handler);
        // Dropped after the lock: it is user code.
        drop(old);
    }

    /// Connects with TLS (feature `tls`): the same frames, inside TLS, to
    /// servers whose certificate `tls` trusts. Applies to connections
    /// opened afterwards. A failed handshake (untrusted or expired
    /// certificate, wrong name, a server that refuses the client's
    /// certificate) closes the connection: its requests fail with
    /// [`Error::Disconnected`], and it counts as a failed attempt for the
    /// reconnect [`Backoff`].
    #[cfg(feature = "tls")]
    pub fn with_tls(mut self, tls: crate::transport::TlsClientConfig) -> Self {
        self.security = Security::Client(tls);
        self
    }

    /// The delays between reconnect attempts (default: [`Backoff::default`],
    /// 100 ms doubling to 10 s, with jitter).
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Whether the manager reconnects by itself, and what requests do while
    /// a server is down (default [`WhileDown::FailFast`]).
    pub fn with_while_down(mut self, policy: WhileDown) -> Self {
        self.while_down = policy;
        self
    }

    /// Limits the requests pending on one connection (clamped to
    /// `1..=`[`MAX_PENDING`](crate::proto::MAX_PENDING)); past it,
    /// submissions fail with [`Error::QueueFull`] (or wait, see
    /// [`with_queue_wait`](Self::with_queue_wait)). The default for every
    /// server; [`set_queue_limit`](Self::set_queue_limit) changes one.
    ///
    /// Unlike tbnet, where a limit of 0 means "no limit", a limit is always
    /// at least 1: pass `MAX_PENDING` for the largest.
    ///
    /// The limit a connection opens with also sets how its channel ids split
    /// their 32 bits: the bits the limit needs name the slot, the rest but
    /// the top bit its generation. With the default (256) a slot's id
    /// repeats only after 2^22 reuses; with the largest limit, after 2^11. A
    /// response arriving so late that its slot has been reused exactly that
    /// many times is the only way one could reach a newer request: keep
    /// limits near what is needed.
    pub fn with_queue_limit(mut self, limit: usize) -> Self {
        self.queue_limit = limit.clamp(1, crate::proto::MAX_PENDING);
        self
    }

    /// The timeout used when a call passes `None`, for every server;
    /// [`set_default_timeout`](Self::set_default_timeout) changes one.
    ///
    /// Unlike tbnet, where a timeout of 0 means "a day", a zero timeout
    /// expires at once; pass `Duration::MAX` for "never" (clamped to about
    /// 30 years).
    pub fn with_default_timeout(mut self, timeout: Duration) -> Self {
        self.default_timeout = timeout;
        self
    }

    /// How long a submission waits for room when its connection's queue is
    /// full (tbnet's `noblocking = false`), instead of failing at once
    /// (default zero: fail at once, tbnet's `noblocking = true`).
    ///
    /// The submitting thread blocks in the call ([`call`](Self::call),
    /// [`send`](Self::send), [`call_async`](Self::call_async),
    /// [`send_wait`](Self::send_wait), [`post`](Self::post)) until a pending
    /// request on that connection ends (its response, timeout, cancel), its
    /// limit is raised, or the connection closes, and at most this long (and
    /// never past the request's own deadline): then it fails with
    /// [`Error::QueueFull`] and hands the packet back. Only the limit on
    /// pending requests waits; a connection over
    /// [`max_outbound`](crate::TransportBuilder::max_outbound) unwritten
    /// bytes, or a full callback queue, still refuses at once. Do not set it
    /// on a manager used from an async executor's threads or from inline
    /// callbacks ([`Dispatch::IoThread`](crate::Dispatch::IoThread)): they
    /// would block.
    pub fn with_queue_wait(mut self, wait: Duration) -> Self {
        self.queue_wait = clamp_wait(wait);
        self
    }

    /// The default per-connection queue limit.
    pub fn queue_limit(&self) -> usize {
        self.queue_limit
    }

    /// The default timeout used when a call passes `None`.
    pub fn default_timeout(&self) -> Duration {
        self.default_timeout
    }

    /// How long a submission waits for room in a full queue.
    pub fn queue_wait(&self) -> Duration {
        self.queue_wait
    }

    /// Changes `server`'s queue limit (tbnet's
    /// `setDefaultQueueLimit(id, n)`), clamped like
    /// [`with_queue_limit`](Self::with_queue_limit); later requests to it
    /// see the new limit. Requests already pending stay, even above a
    /// lowered limit. A raise wakes submissions waiting for room.
    ///
    /// An open connection's channel ids can number only so many slots: the
    /// larger of the server's and the manager's limit when it opened,
    /// rounded up to a power of two, minus one (511 for the default 256). A
    /// limit above that applies to it only up to that, and in full from its
    /// next connection. Applies to a server this manager has not connected
    /// to yet as well.
    ///
    /// # Errors
    /// [`Error::InvalidAddress`] for a spec that does not resolve.
    ///
    /// # Examples
    /// ```
    /// use std::time::Duration;
    /// use tbnet::{ConnectionManager, Packet, Responder, Transport};
    ///
    /// let transport = Transport::builder().start()?;
    /// let addr = transport.listen("127.0.0.1:0", |req: Packet, resp: Responder| {
    ///     let _ = resp.reply(req.reply(req.body().clone()));
    /// })?;
    /// let client = ConnectionManager::new(&transport);
    /// client.set_queue_limit(addr, 8)?;
    /// client.set_default_timeout(addr, Duration::from_secs(1))?;
    /// assert_eq!(client.call(addr, Packet::new(1, "hi"), None)?.body(), "hi");
    /// # Ok::<(), tbnet::Error>(())
    /// ```
    pub fn set_queue_limit(&self, server: impl ToEndpoint, limit: usize) -> Result<(), Error> {
        let server = server.to_endpoint()?;
        let limit = limit.clamp(1, crate::proto::MAX_PENDING);
        let conn = {
            let mut conns = self.conns.lock();
            let slot = self.slot(&mut conns, server);
            slot.queue_limit = limit;
            slot.conn.clone()
        };
        // After the map lock: a raise wakes waiting submitters.
        if let Some(conn) = conn {
            conn.set_queue_limit(limit);
        }
        Ok(())
    }

    /// Changes the timeout of later requests to `server` that pass `None`
    /// (tbnet's `setDefaultQueueTimeout(id, ms)`; see
    /// [`with_default_timeout`](Self::with_default_timeout) for what zero
    /// means). Applies to a server this manager has not connected to yet as
    /// well.
    ///
    /// # Errors
    /// [`Error::InvalidAddress`] for a spec that does not resolve.
    pub fn set_default_timeout(
        &self,
        server: impl ToEndpoint,
        timeout: Duration,
    ) -> Result<(), Error> {
        let server = server.to_endpoint()?;
        let mut conns = self.conns.lock();
        self.slot(&mut conns, server).default_timeout = timeout;
        Ok(())
    }

    /// Opens a connection to `server` now (unless one is open or opening),
    /// and blocks until it is connected, or failed, or the transport's
    /// [`connect_timeout`](crate::TransportBuilder::connect_timeout) passed
    /// (tbnet's `Transport::connect`). An explicit connect ignores the
    /// reconnect backoff and [`WhileDown::StayDown`].
    ///
    /// # Errors
    /// Why the connection failed: [`Error::Io`] (refused, unreachable,
    /// ...), [`Error::Timeout`] if it is still connecting when the connect
    /// timeout passed (it goes on, and ends by that timeout),
    /// [`Error::Disconnected`] if it closed meanwhile, [`Error::Shutdown`],
    /// [`Error::InvalidAddress`].
    ///
    /// # Examples
    /// ```
    /// use tbnet::{ConnectionManager, Packet, Responder, Transport};
    ///
    /// let transport = Transport::builder().start()?;
    /// let addr = transport.listen("tcp:127.0.0.1:0", |_: Packet, _: Responder| {})?;
    /// let client = ConnectionManager::new(&transport);
    /// client.connect(addr)?;
    /// assert!(client.is_alive(addr));
    /// client.disconnect(addr);
    /// assert!(!client.is_alive(addr));
    /// # Ok::<(), tbnet::Error>(())
    /// ```
    pub fn connect(&self, server: impl ToEndpoint) -> Result<(), Error> {
        let server = server.to_endpoint()?;
        let started = Instant::now();
        let conn = self.conn(server, true)?.0;
        // An open-or-opening connection may be waiting out a backoff delay
        // (`WhileDown::Queue`): an explicit connect does not wait.
        conn.connect_now();
        conn.wait_open(started + self.transport.config().connect_timeout)
    }

    /// Closes the connection to `server`, if any: its pending requests fail
    /// with [`Error::Disconnected`] (tbnet's
    /// `ConnectionManager::disconnect`). It is no failure of the server's
    /// (the backoff does not grow): the next request reconnects at once,
    /// unless [`WhileDown::StayDown`], under which it stays down until
    /// [`connect`](Self::connect). Returns whether a connection was open or
    /// opening. A spec that does not resolve names no connection.
    pub fn disconnect(&self, server: impl ToEndpoint) -> bool {
        let Ok(server) = server.to_endpoint() else {
            return false;
        };
        let conn = {
            let mut conns = self.conns.lock();
            let Some(slot) = conns.get_mut(&server) else {
                return false;
            };
            let Some(conn) = slot.conn.clone() else {
                return false;
            };
            if conn.is_closed() {
                return false;
            }
            conn
        };
        // After the map lock: failing requests may run callbacks.
        conn.disconnect();
        tracing::debug!(%server, "disconnected by its owner");
        true
    }

    /// Whether the connection to `server` is open or opening (tbnet's
    /// `isAlive`): false if this manager has none, or it closed. A spec that
    /// does not resolve is not alive.
    pub fn is_alive(&self, server: impl ToEndpoint) -> bool {
        let Ok(server) = server.to_endpoint() else {
            return false;
        };
        let conns = self.conns.lock();
        (conns.get(&server))
            .and_then(|slot| slot.conn.as_ref())
            .is_some_and(|conn| !conn.is_closed())
    }

    /// Sends `request` and blocks until its response, its timeout
    /// (`None`: the server's default), the loss of its connection, or
    /// shutdown.
    ///
    /// # Errors
    /// [`Error::Timeout`]; [`Error::Disconnected`] (the connection closed,
    /// or the server is in its reconnect backoff under
    /// [`WhileDown::FailFast`], or down under [`WhileDown::StayDown`]);
    /// [`Error::Shutdown`]; [`Error::QueueFull`] (a queue limit, see its
    /// docs); [`Error::FrameTooLarge`] if the body is over the streamer's
    /// limit; [`Error::Remote`] for an error reply; [`Error::BadMessage`]
    /// for an error reply that does not decode; [`Error::Io`] if the
    /// connection could not be set up; [`Error::InvalidAddress`].
    pub fn call(
        &self,
        server: impl ToEndpoint,
        request: Packet,
        timeout: Option<Duration>,
    ) -> Result<Packet, Error> {
        let (wait, completion) = CallWait::new();
        self.submit(server, request, timeout, completion)
            .map_err(SendError::into_parts)
            .map_err(|(error, _)| error)?;
        wait.wait()
    }

    /// Sends `request`; `handler` runs once with the outcome. By default it
    /// runs on a worker thread of the transport, never on the IO or timeout
    /// thread, so a slow callback delays only other callbacks. With
    /// [`TransportBuilder::callbacks`](crate::TransportBuilder::callbacks)`(Dispatch::IoThread)`
    /// callbacks for responses and disconnects run inline on the IO thread
    /// (timeouts and shutdown still go to the workers).
    ///
    /// # Errors
    /// The request handed back if it could not be queued
    /// ([`Error::QueueFull`] when the connection's queue, or the transport's
    /// queue of callbacks waiting to run, is full; [`Error::Shutdown`];
    /// ...); the handler then does not run.
    pub fn send<H: PacketHandler>(
        &self,
        server: impl ToEndpoint,
        request: Packet,
        timeout: Option<Duration>,
        handler: H,
    ) -> Result<(), SendError<Packet>> {
        self.send_to_callback(server, request, timeout, || Completion::callback(handler))
    }

    /// Queues `request` with a callback completion made by `completion`,
    /// only once the request may be queued: a completion dropped unfired
    /// would run its callback with [`Error::Shutdown`].
    fn send_to_callback(
        &self,
        server: impl ToEndpoint,
        request: Packet,
        timeout: Option<Duration>,
        completion: impl FnOnce() -> Completion,
    ) -> Result<(), SendError<Packet>> {
        if self.transport.shared().workers.callbacks_full() {
            return Err(SendError::new(Error::QueueFull, request));
        }
        self.submit(server, request, timeout, completion())
            .map(drop)
    }

    /// Sends `request`; `handler` receives the outcome with `args` (tbnet's
    /// `postPacket(packet, handler, args)`). One handler serves any number
    /// of requests, and sending costs no allocation for it (a closure per
    /// request, as [`send`](Self::send) takes, is boxed). It runs where
    /// [`send`](Self::send)'s callbacks run.
    ///
    /// # Errors
    /// As [`send`](Self::send); the handler then does not run.
    ///
    /// # Examples
    /// ```
    /// use std::sync::{mpsc, Arc, Mutex};
    /// use tbnet::{ConnectionManager, Error, Packet, Responder, SharedPacketHandler, Transport};
    ///
    /// struct Collect(Mutex<mpsc::Sender<(u64, bool)>>);
    ///
    /// impl SharedPacketHandler for Collect {
    ///     fn handle_packet(&self, result: Result<Packet, Error>, args: u64) {
    ///         let _ = self.0.lock().unwrap().send((args, result.is_ok()));
    ///     }
    /// }
    ///
    /// let server = Transport::builder().start()?;
    /// let addr = server.listen("127.0.0.1:0", |request: Packet, responder: Responder| {
    ///     let _ = responder.reply(Packet::new(2, request.body().clone()));
    /// })?;
    /// let client = Transport::builder().start()?;
    /// let manager = ConnectionManager::new(&client);
    /// let (tx, rx) = mpsc::channel();
    /// let handler = Arc::new(Collect(Mutex::new(tx)));
    /// for args in 1..=3 {
    ///     manager.send_shared(addr, Packet::new(1, "hello"), None, &handler, args)?;
    /// }
    /// let mut seen: Vec<(u64, bool)> = rx.iter().take(3).collect();
    /// seen.sort();
    /// assert_eq!(seen, [(1, true), (2, true), (3, true)]);
    /// client.stop();
    /// server.stop();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn send_shared<H: SharedPacketHandler>(
        &self,
        server: impl ToEndpoint,
        request: Packet,
        timeout: Option<Duration>,
        handler: &std::sync::Arc<H>,
        args: u64,
    ) -> Result<(), SendError<Packet>> {
        self.send_to_callback(server, request, timeout, || {
            let handler: std::sync::Arc<dyn SharedPacketHandler> = handler.clone();
            Completion::shared(handler, args)
        })
    }

    /// Sends `request` and returns a future of its outcome, usable on any
    /// executor. Dropping the future cancels the request.
    ///
    /// # Errors
    /// The request handed back if it could not be queued.
    pub fn call_async(
        &self,
        server: impl ToEndpoint,
        request: Packet,
        timeout: Option<Duration>,
    ) -> Result<ResponseFuture, SendError<Packet>> {
        let (mut future, completion) = ResponseFuture::new();
        let (conn, id) = self.submit(server, request, timeout, completion)?;
        future.attach_cancel(CancelHandle::new(conn, id));
        Ok(future)
    }

    /// Sends `request` with its outcome gathered on `wait`; returns its
    /// index there. Dropping `wait` cancels the requests still pending.
    ///
    /// # Errors
    /// The request handed back if it could not be queued; its slot on
    /// `wait` is then already complete and is not returned by any wait (it
    /// still counts in [`registered`](WaitObject::registered)).
    pub fn send_wait(
        &self,
        server: impl ToEndpoint,
        request: Packet,
        timeout: Option<Duration>,
        wait: &mut WaitObject,
    ) -> Result<usize, SendError<Packet>> {
        let completion = wait.completion();
        let index = wait.registered() - 1;
        let (conn, id) = self.submit(server, request, timeout, completion)?;
        wait.attach_cancel(index, CancelHandle::new(conn, id));
        Ok(index)
    }

    /// Sends `message` one-way (tbnet's `postPacket` with no handler): no
    /// caller waits for an answer.
    ///
    /// Like tbnet's client, it takes a real channel id (a tbnet server
    /// aborts on channel id 0) with the server's default timeout: a reply
    /// that comes back is discarded and counted in
    /// [`StatsSnapshot::post_replies`](crate::StatsSnapshot::post_replies),
    /// and a post no reply answers frees its place in the queue when that
    /// timeout passes (counted in
    /// [`timeouts`](crate::StatsSnapshot::timeouts)). Posts count against
    /// the queue limit like requests.
    ///
    /// # Errors
    /// The message handed back if it could not be queued
    /// ([`Error::QueueFull`], [`Error::Shutdown`], ...).
    pub fn post(&self, server: impl ToEndpoint, message: Packet) -> Result<(), SendError<Packet>> {
        self.submit(server, message, None, Completion::discard())
            .map(drop)
    }

    /// [`call`](Self::call) with typed messages: sends `request` under
    /// `Req::PCODE` and decodes the response as `Resp`.
    ///
    /// # Errors
    /// As for [`call`](Self::call); also [`Error::Remote`] for an error
    /// reply and [`Error::BadMessage`] for a response that does not decode.
    ///
    /// # Examples
    /// ```
    /// # use bytes::{Bytes, BytesMut};
    /// # use tbnet::*;
    /// # #[derive(Debug, PartialEq)] struct Echo(Bytes);
    /// # impl Message for Echo {
    /// #     const PCODE: PacketCode = PacketCode(1);
    /// #     fn encode(&self, dst: &mut BytesMut) { dst.extend_from_slice(&self.0) }
    /// #     fn decode(src: Bytes) -> Result<Self, DecodeError> { Ok(Echo(src)) }
    /// # }
    /// let transport = Transport::builder().start()?;
    /// let router = Router::new().route_message(|m: Echo, resp: Responder| {
    ///     let _ = resp.reply_message(&m);
    /// });
    /// let addr = transport.listen("127.0.0.1:0", router)?;
    /// let client = ConnectionManager::new(&transport);
    /// let back: Echo = client.call_message(addr, &Echo(Bytes::from("hi")), None)?;
    /// assert_eq!(back, Echo(Bytes::from("hi")));
    /// # Ok::<(), tbnet::Error>(())
    /// ```
    pub fn call_message<Req: Message, Resp: Message>(
        &self,
        server: impl ToEndpoint,
        request: &Req,
        timeout: Option<Duration>,
    ) -> Result<Resp, Error> {
        self.call(server, request.to_packet(), timeout)
            .and_then(Resp::from_packet)
    }

    /// [`send`](Self::send) with typed messages: `handler` gets the response
    /// decoded as `Resp`, on a worker thread.
    ///
    /// # Errors
    /// The encoded request handed back if it could not be queued.
    pub fn send_message<Req, Resp, F>(
        &self,
        server: impl ToEndpoint,
        request: &Req,
        timeout: Option<Duration>,
        handler: F,
    ) -> Result<(), SendError<Packet>>
    where
        Req: Message,
        Resp: Message,
        F: FnOnce(Result<Resp, Error>) + Send + 'static,
    {
        self.send(
            server,
            request.to_packet(),
            timeout,
            move |result: Result<Packet, Error>| handler(result.and_then(Resp::from_packet)),
        )
    }

    /// [`call_async`](Self::call_async) with typed messages.
    ///
    /// # Errors
    /// The encoded request handed back if it could not be queued.
    pub fn call_message_async<Req: Message, Resp: Message>(
        &self,
        server: impl ToEndpoint,
        request: &Req,
        timeout: Option<Duration>,
    ) -> Result<MessageFuture<Resp>, SendError<Packet>> {
        self.call_async(server, request.to_packet(), timeout)
            .map(MessageFuture::new)
    }

    /// Connection counters for `server`, or `None` if this manager never
    /// connected to it (or the spec does not resolve).
    pub fn server_stats(&self, server: impl ToEndpoint) -> Option<ServerStats> {
        let server = server.to_endpoint().ok()?;
        let mut conns = self.conns.lock();
        let slot = conns.get_mut(&server)?;
        let waiting = slot.conn.as_ref()?.room_waiters() as u64;
        self.account(slot);
        Some(ServerStats {
            waiting,
            ..slot.stats
        })
    }

    /// Connections currently held (open or connecting).
    pub fn connections(&self) -> usize {
        (self.conns.lock().values())
            .filter(|slot| slot.conn.as_ref().is_some_and(|c| !c.is_closed()))
            .count()
    }

    fn submit(
        &self,
        server: impl ToEndpoint,
        request: Packet,
        timeout: Option<Duration>,
        completion: Completion,
    ) -> Result<(Arc<Conn>, ChannelId), SendError<Packet>> {
        match server.to_endpoint() {
            Ok(server) => self.submit_to(server, request, timeout, completion),
            Err(error) => Err(Rejected::new(error, request, completion).into()),
        }
    }

    fn submit_to(
        &self,
        server: SocketAddr,
        request: Packet,
        timeout: Option<Duration>,
        completion: Completion,
    ) -> Result<(Arc<Conn>, ChannelId), SendError<Packet>> {
        let sent = Instant::now();
        let mut request = request;
        let mut completion = completion;
        // A connection can close between lookup and submit: then one retry
        // on a fresh connection.
        for attempt in 0..2 {
            let (conn, default_timeout) = match self.conn(server, false) {
                Ok(found) => found,
                Err(error) => return Err(Rejected::new(error, request, completion).into()),
            };
            let deadline = sent + clamp_wait(timeout.unwrap_or(default_timeout));
            let room_until =
                (!self.queue_wait.is_zero()).then(|| deadline.min(sent + self.queue_wait));
            match conn.submit(request, sent, deadline, completion, room_until) {
                Ok(id) => return Ok((conn, id)),
                Err(Rejected {
                    error: Error::Disconnected,
                    packet,
                    completion: back,
                }) if attempt == 0 => {
                    request = packet;
                    completion = back;
                }
                Err(rejected) => return Err(rejected.into()),
            }
        }
        unreachable!("the second attempt always returns")
    }

    /// `server`'s slot, made with the manager's defaults if it has none.
    fn slot<'m>(
        &self,
        conns: &'m mut FastMap<SocketAddr, ServerSlot>,
        server: SocketAddr,
    ) -> &'m mut ServerSlot {
        conns.entry(server).or_insert_with(|| ServerSlot {
            conn: None,
            queue_limit: self.queue_limit,
            default_timeout: self.default_timeout,
            failures: 0,
            retry_at: None,
            accounted: false,
            opened_before: false,
            stats: ServerStats::default(),
        })
    }

    /// Counts how `slot`'s closed connection ended, once, and sets when the
    /// next may open: at once after a healthy connection, after a growing
    /// delay after one that ended early.
    fn account(&self, slot: &mut ServerSlot) {
        if slot.accounted {
            return;
        }
        let Some(conn) = &slot.conn else {
            return;
        };
        let Some(ended) = conn.closed_early() else {
            return;
        };
        slot.accounted = true;
        if ended.by_owner {
            // No failure and no health proved: the streak stands, and the
            // next connection opens at once.
            slot.retry_at = None;
            return;
        }
        if ended.early {
            slot.failures = slot.failures.saturating_add(1);
            slot.stats.early_failures += 1;
        } else {
            slot.failures = 0;
        }
        slot.stats.failures_in_a_row = slot.failures;
        let delay = self.backoff.delay(slot.failures, jitter_seed());
        slot.retry_at = Some(ended.at + clamp_wait(delay));
        if ended.early {
            tracing::debug!(peer = %conn.peer(), failures = slot.failures, ?delay, "connection ended before it proved healthy; backing off");
        }
    }

    /// The open (or opening) connection to `server` and its default
    /// timeout, opening a connection if needed and allowed: by the backoff
    /// and [`WhileDown`], or always when `explicit` (`connect`).
    fn conn(&self, server: SocketAddr, explicit: bool) -> Result<(Arc<Conn>, Duration), Error> {
        let shared = self.transport.shared();
        if shared.is_stopping() {
            return Err(Error::Shutdown);
        }
        let mut conns = self.conns.lock();
        let mut connect_at = None;
        let slot = self.slot(&mut conns, server);
        if let Some(conn) = &slot.conn {
            if !conn.is_closed() {
                return Ok((conn.clone(), slot.default_timeout));
            }
            // Any connection to this server that opened makes the next
            // one a reconnect, not only the last attempt.
            slot.opened_before |= conn.was_opened();
            self.account(slot);
            let now = Instant::now();
            if !explicit {
                match (self.while_down, slot.retry_at) {
                    (WhileDown::StayDown, _) => return Err(Error::Disconnected),
                    (WhileDown::FailFast, Some(at)) if now < at => return Err(Error::Disconnected),
                    (WhileDown::Queue, Some(at)) if now < at => connect_at = Some(at),
                    _ => {}
                }
            }
        }
        // Channel ids are split for the larger of the server's limit and the
        // manager's, so the server's may later be raised up to the latter.
        let conn = Conn::new(
            shared.clone(),
            server,
            Side::Client,
            slot.queue_limit.max(self.queue_limit),
            self.backoff.grace,
        );
        let conn = Arc::new(
            conn.with_codec(self.codec.clone())
                .with_events(
                    (self.events.clone()).or_else(|| shared.default_events.clone()),
                    slot.opened_before,
                )
                .with_default_handler(self.default_handler.clone())
                .with_security(self.security.clone()),
        );
        if slot.queue_limit < self.queue_limit {
            conn.set_queue_limit(slot.queue_limit);
        }
        let failures = slot.failures;
        slot.conn = Some(conn.clone());
        slot.retry_at = None;
        slot.accounted = false;
        slot.stats.connect_attempts += 1;
        let default_timeout = slot.default_timeout;
        drop(conns);
        // Outside the map lock: if the IO thread is gone, queuing a command
        // fails other connections' requests, which may run callbacks. A
        // flush queued by another thread before this Connect is harmless:
        // the IO thread writes what is queued once the connect completes.
        match connect_at {
            None => shared.command(Command::Connect(conn.clone())),
            Some(at) => {
                if !conn.connect_at(at) {
                    drop(conn.close(Error::Shutdown));
                    return Err(Error::Shutdown);
                }
            }
        }
        tracing::debug!(%server, failures, "opening connection");
        Ok((conn, default_timeout))
    }
}
