//! The client side: connections reused per server, and the four ways to
//! send.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::completion::{
    clamp_wait, CallWait, CancelHandle, Completion, PacketHandler, ResponseFuture, WaitObject,
};
use crate::error::{Error, SendError};
use crate::message::{Message, MessageFuture};
use crate::packet::{ChannelId, Packet};
use crate::proto::{Codec, PacketStreamer, Side};
use crate::server::{Adapted, ServerAdaptor};
use crate::sync::Mutex;
use crate::transport::{
    Command, Conn, ConnectionEvents, DefaultHandler, Rejected, RequestHandler, Transport,
};

/// Default limit of requests pending on one connection (tbnet's
/// ConnectionManager default).
pub const DEFAULT_QUEUE_LIMIT: usize = 256;

/// Default request timeout (tbnet's per-connection queue timeout).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(5000);

/// What requests to a server do while its connection is down and the next
/// reconnect attempt is still in its backoff delay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhileDown {
    /// Fail at once with [`Error::Disconnected`] (the default).
    #[default]
    FailFast,
    /// Queue on the next connection (up to the queue limit); it connects
    /// when the backoff delay ends, and each request's own timeout still
    /// applies.
    Queue,
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
}

/// One server's connection and its reconnect bookkeeping.
struct ServerSlot {
    conn: Arc<Conn>,
    /// Failed connect attempts in a row.
    failures: u32,
    /// No new connection before this (backoff).
    retry_at: Option<Instant>,
    /// The closed `conn` was already counted in `failures`.
    accounted: bool,
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
/// server opens a new one.
///
/// Outcomes reach the caller one of four ways: [`call`](Self::call) blocks,
/// [`send`](Self::send) runs a callback on a worker thread,
/// [`call_async`](Self::call_async) returns a future,
/// [`send_wait`](Self::send_wait) gathers several on a [`WaitObject`].
/// [`post`](Self::post) sends one-way.
///
/// # Examples
/// ```
/// use tbnet::{ConnectionManager, Packet, Responder, Transport, WaitObject};
///
/// let transport = Transport::builder().start()?;
/// let addr = transport.listen("127.0.0.1:0".parse().unwrap(), |req: Packet, resp: Responder| {
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
    conns: Mutex<HashMap<SocketAddr, ServerSlot>>,
    queue_limit: usize,
    default_timeout: Duration,
    backoff: Backoff,
    while_down: WhileDown,
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
            .map(|(_, slot)| slot.conn)
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
            .field("connections", &self.conns.lock().len())
            .field("queue_limit", &self.queue_limit)
            .field("default_timeout", &self.default_timeout)
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
            conns: Mutex::new(HashMap::new()),
            queue_limit: DEFAULT_QUEUE_LIMIT,
            default_timeout: DEFAULT_TIMEOUT,
            backoff: Backoff::default(),
            while_down: WhileDown::default(),
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
    /// let addr = transport.listen("127.0.0.1:0".parse().unwrap(), |req: Packet, resp: Responder| {
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

    /// The delays between reconnect attempts (default: [`Backoff::default`],
    /// 100 ms doubling to 10 s, with jitter).
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// What requests do while a server is down and in backoff (default
    /// [`WhileDown::FailFast`]).
    pub fn with_while_down(mut self, policy: WhileDown) -> Self {
        self.while_down = policy;
        self
    }

    /// Limits the requests pending on one connection (clamped to
    /// `1..=`[`MAX_PENDING`](crate::proto::MAX_PENDING)); past it,
    /// submissions fail with [`Error::QueueFull`]. Applies to connections
    /// opened afterwards.
    ///
    /// The limit also sets how channel ids split their 32 bits: the bits
    /// the limit needs name the slot, the rest its generation. With the
    /// default (256) a slot's id repeats only after 2^22 reuses; with the
    /// largest limit, after 2^11. A response arriving so late that its slot
    /// has been reused exactly that many times is the only way one could
    /// reach a newer request: keep limits near what is needed.
    pub fn with_queue_limit(mut self, limit: usize) -> Self {
        self.queue_limit = limit.clamp(1, crate::proto::MAX_PENDING);
        self
    }

    /// The timeout used when a call passes `None`.
    pub fn with_default_timeout(mut self, timeout: Duration) -> Self {
        self.default_timeout = timeout;
        self
    }

    /// The per-connection queue limit.
    pub fn queue_limit(&self) -> usize {
        self.queue_limit
    }

    /// The timeout used when a call passes `None`.
    pub fn default_timeout(&self) -> Duration {
        self.default_timeout
    }

    /// Sends `request` and blocks until its response, its timeout
    /// (`None`: the default), the loss of its connection, or shutdown.
    ///
    /// # Errors
    /// [`Error::Timeout`]; [`Error::Disconnected`] (the connection closed,
    /// or the server is in its reconnect backoff under
    /// [`WhileDown::FailFast`]); [`Error::Shutdown`]; [`Error::QueueFull`]
    /// (a queue limit, see its docs); [`Error::FrameTooLarge`] if the body
    /// is over the streamer's limit; [`Error::Remote`] for an error reply;
    /// [`Error::BadMessage`] for an error reply that does not decode;
    /// [`Error::Io`] if the connection could not be set up.
    pub fn call(
        &self,
        server: impl Into<SocketAddr>,
        request: Packet,
        timeout: Option<Duration>,
    ) -> Result<Packet, Error> {
        let (wait, completion) = CallWait::new();
        self.submit(server.into(), request, timeout, completion)
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
        server: impl Into<SocketAddr>,
        request: Packet,
        timeout: Option<Duration>,
        handler: H,
    ) -> Result<(), SendError<Packet>> {
        if self.transport.shared().workers.callbacks_full() {
            return Err(SendError::new(Error::QueueFull, request));
        }
        self.submit(
            server.into(),
            request,
            timeout,
            Completion::callback(handler),
        )
        .map(drop)
    }

    /// Sends `request` and returns a future of its outcome, usable on any
    /// executor. Dropping the future cancels the request.
    ///
    /// # Errors
    /// The request handed back if it could not be queued.
    pub fn call_async(
        &self,
        server: impl Into<SocketAddr>,
        request: Packet,
        timeout: Option<Duration>,
    ) -> Result<ResponseFuture, SendError<Packet>> {
        let (mut future, completion) = ResponseFuture::new();
        let (conn, id) = self.submit(server.into(), request, timeout, completion)?;
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
        server: impl Into<SocketAddr>,
        request: Packet,
        timeout: Option<Duration>,
        wait: &mut WaitObject,
    ) -> Result<usize, SendError<Packet>> {
        let completion = wait.completion();
        let index = wait.registered() - 1;
        let (conn, id) = self.submit(server.into(), request, timeout, completion)?;
        wait.attach_cancel(index, CancelHandle::new(conn, id));
        Ok(index)
    }

    /// Sends `message` one-way: channel id 0, no response expected, nothing
    /// pending.
    ///
    /// # Errors
    /// The message handed back if the connection is closed or the
    /// transport stopped.
    pub fn post(
        &self,
        server: impl Into<SocketAddr>,
        mut message: Packet,
    ) -> Result<(), SendError<Packet>> {
        message.set_channel_id(ChannelId::NONE);
        let server = server.into();
        let conn = match self.conn(server) {
            Ok(conn) => conn,
            Err(error) => return Err(SendError::new(error, message)),
        };
        conn.send_frame(message)
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
    /// let addr = transport.listen("127.0.0.1:0".parse().unwrap(), router)?;
    /// let client = ConnectionManager::new(&transport);
    /// let back: Echo = client.call_message(addr, &Echo(Bytes::from("hi")), None)?;
    /// assert_eq!(back, Echo(Bytes::from("hi")));
    /// # Ok::<(), tbnet::Error>(())
    /// ```
    pub fn call_message<Req: Message, Resp: Message>(
        &self,
        server: impl Into<SocketAddr>,
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
        server: impl Into<SocketAddr>,
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
        server: impl Into<SocketAddr>,
        request: &Req,
        timeout: Option<Duration>,
    ) -> Result<MessageFuture<Resp>, SendError<Packet>> {
        self.call_async(server, request.to_packet(), timeout)
            .map(MessageFuture::new)
    }

    /// Connection counters for `server`, or `None` if this manager never
    /// connected to it.
    pub fn server_stats(&self, server: impl Into<SocketAddr>) -> Option<ServerStats> {
        let mut conns = self.conns.lock();
        let slot = conns.get_mut(&server.into())?;
        self.account(slot);
        Some(slot.stats)
    }

    /// Connections currently held (open or connecting).
    pub fn connections(&self) -> usize {
        self.conns
            .lock()
            .values()
            .filter(|c| !c.conn.is_closed())
            .count()
    }

    fn submit(
        &self,
        server: SocketAddr,
        request: Packet,
        timeout: Option<Duration>,
        completion: Completion,
    ) -> Result<(Arc<Conn>, ChannelId), SendError<Packet>> {
        let sent = Instant::now();
        let deadline = sent + clamp_wait(timeout.unwrap_or(self.default_timeout));
        let mut request = request;
        let mut completion = completion;
        // A connection can close between lookup and submit: then one retry
        // on a fresh connection.
        for attempt in 0..2 {
            let conn = match self.conn(server) {
                Ok(conn) => conn,
                Err(error) => {
                    completion.disarm();
                    return Err(SendError::new(error, request));
                }
            };
            match conn.submit(request, sent, deadline, completion) {
                Ok(id) => return Ok((conn, id)),
                Err(Rejected {
                    error: Error::Disconnected,
                    packet,
                    completion: back,
                }) if attempt == 0 => {
                    request = packet;
                    completion = back;
                }
                Err(rejected) => {
                    rejected.completion.disarm();
                    return Err(SendError::new(rejected.error, rejected.packet));
                }
            }
        }
        unreachable!("the second attempt always returns")
    }

    /// Counts how `slot`'s closed connection ended, once, and sets when the
    /// next may open: at once after a healthy connection, after a growing
    /// delay after one that ended early.
    fn account(&self, slot: &mut ServerSlot) {
        if slot.accounted {
            return;
        }
        let Some((early, closed_at)) = slot.conn.closed_early() else {
            return;
        };
        slot.accounted = true;
        if early {
            slot.failures = slot.failures.saturating_add(1);
            slot.stats.early_failures += 1;
        } else {
            slot.failures = 0;
        }
        slot.stats.failures_in_a_row = slot.failures;
        let delay = self.backoff.delay(slot.failures, jitter_seed());
        slot.retry_at = Some(closed_at + clamp_wait(delay));
        if early {
            tracing::debug!(peer = %slot.conn.peer(), failures = slot.failures, ?delay, "connection ended before it proved healthy; backing off");
        }
    }

    /// The open (or opening) connection to `server`, opening one if needed
    /// and the backoff allows.
    fn conn(&self, server: SocketAddr) -> Result<Arc<Conn>, Error> {
        let shared = self.transport.shared();
        if shared.is_stopping() {
            return Err(Error::Shutdown);
        }
        let now = Instant::now();
        let mut conns = self.conns.lock();
        let mut connect_at = None;
        let reconnect = conns
            .get(&server)
            .is_some_and(|slot| slot.conn.was_opened());
        if let Some(slot) = conns.get_mut(&server) {
            if !slot.conn.is_closed() {
                return Ok(slot.conn.clone());
            }
            self.account(slot);
            match slot.retry_at {
                Some(at) if now < at => match self.while_down {
                    WhileDown::FailFast => return Err(Error::Disconnected),
                    WhileDown::Queue => connect_at = Some(at),
                },
                _ => {}
            }
        }
        let conn = Conn::new(
            shared.clone(),
            server,
            Side::Client,
            self.queue_limit,
            self.backoff.grace,
        );
        let conn = Arc::new(
            conn.with_codec(self.codec.clone())
                .with_events(
                    (self.events.clone()).or_else(|| shared.default_events.clone()),
                    reconnect,
                )
                .with_default_handler(self.default_handler.clone()),
        );
        let failures = conns.get(&server).map_or(0, |slot| slot.failures);
        let mut stats = conns
            .get(&server)
            .map_or_else(ServerStats::default, |slot| slot.stats);
        stats.connect_attempts += 1;
        conns.insert(
            server,
            ServerSlot {
                conn: conn.clone(),
                failures,
                retry_at: None,
                accounted: false,
                stats,
            },
        );
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
        Ok(conn)
    }
}
