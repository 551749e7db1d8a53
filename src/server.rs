//! The server side: adaptors that handle requests, and responders that
//! answer them.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::endpoint::ToEndpoint;
use crate::error::{Error, SendError};
use crate::packet::{ChannelId, Packet};
use crate::proto::{Codec, PacketStreamer};
use crate::transport::{
    AllowList, ConnectionEvents, ConnectionHandle, Policy, ReplyTo, RequestHandler, Security,
    Service, Sniffer, Transport,
};

pub use crate::transport::Dispatch;

/// Handles the requests arriving on a listener (tbnet's `IServerAdaptor`).
///
/// Implemented for every `Fn(Packet, Responder) + Send + Sync + 'static`
/// closure.
///
/// # Threads
/// With [`Dispatch::Workers`] (the default) it runs on a worker thread and
/// may block. With [`Dispatch::IoThread`] it runs on the IO thread and must
/// not block: every connection of the transport waits while it runs (hand
/// slow work to another thread and reply from there). A panic in a handler
/// is caught and logged; its request is left unanswered.
///
/// Client callbacks of the same transport also run on its workers: a
/// handler must not block waiting for one (with every worker so blocked,
/// none is left to run it). Wait with `call` or a future instead, or send
/// from a second transport.
///
/// # Examples
/// ```
/// use tbnet::{Packet, Responder, ServerAdaptor};
///
/// struct Echo;
///
/// impl ServerAdaptor for Echo {
///     fn handle_packet(&self, request: Packet, responder: Responder) {
///         let response = request.reply(request.body().clone());
///         let _ = responder.reply(response);
///     }
/// }
/// ```
pub trait ServerAdaptor: Send + Sync + 'static {
    /// Handles one request. Reply through `responder`, now or later from
    /// any thread; dropping it without replying leaves the request
    /// unanswered (the client's deadline then ends it).
    fn handle_packet(&self, request: Packet, responder: Responder);
}

impl<F> ServerAdaptor for F
where
    F: Fn(Packet, Responder) + Send + Sync + 'static,
{
    fn handle_packet(&self, request: Packet, responder: Responder) {
        self(request, responder)
    }
}

/// A [`ServerAdaptor`] as the transport's request handler: each request
/// runs in a `request` span (debug level) with a [`Responder`].
pub(crate) struct Adapted<A>(pub(crate) A);

impl<A: ServerAdaptor> RequestHandler for Adapted<A> {
    fn handle_request(&self, request: Packet, reply: ReplyTo) {
        let _span = tracing::debug_span!(
            "request",
            peer = %reply.conn().peer(),
            channel_id = %request.channel_id(),
            pcode = %request.pcode()
        )
        .entered();
        self.0.handle_packet(request, Responder::new(reply));
    }
}

impl Transport {
    /// Accepts connections on `addr` (IPv4 or IPv6; port 0 picks one) and
    /// hands their requests to `adaptor`, dispatched as the builder's
    /// [`dispatch`](crate::TransportBuilder::dispatch) says. Returns the bound
    /// address.
    ///
    /// `addr` is anything [`ToEndpoint`]: a [`SocketAddr`], or tbnet's spec
    /// string `"tcp:host:port"`, or plain `"host:port"` (a host name
    /// resolves with the system resolver to its first address).
    ///
    /// # Errors
    /// [`Error::Io`] if the address cannot be bound, [`Error::Shutdown`] if
    /// the transport stopped, [`Error::InvalidAddress`] for a spec that does
    /// not parse or resolve.
    ///
    /// # Examples
    /// ```
    /// use tbnet::{Packet, Responder, Transport};
    ///
    /// let transport = Transport::builder().start()?;
    /// let addr = transport.listen("tcp:127.0.0.1:0", |_: Packet, _: Responder| {})?;
    /// assert!(addr.ip().is_loopback() && addr.port() != 0);
    /// assert!(transport.listen("udp:127.0.0.1:0", |_: Packet, _: Responder| {}).is_err());
    /// # Ok::<(), tbnet::Error>(())
    /// ```
    pub fn listen<A: ServerAdaptor>(
        &self,
        addr: impl ToEndpoint,
        adaptor: A,
    ) -> Result<SocketAddr, Error> {
        self.listen_with(addr, adaptor, self.config().dispatch)
    }

    /// Like [`listen`](Self::listen), choosing where this listener's requests
    /// are handled.
    ///
    /// # Errors
    /// As for [`listen`](Self::listen).
    pub fn listen_with<A: ServerAdaptor>(
        &self,
        addr: impl ToEndpoint,
        adaptor: A,
        dispatch: Dispatch,
    ) -> Result<SocketAddr, Error> {
        self.listen_with_options(addr, adaptor, ListenOptions::new().dispatch(dispatch))
    }

    /// Like [`listen`](Self::listen), with this listener's own settings:
    /// who may connect and how many at once, where its requests are
    /// handled, hooks for its connections' events, its framing, and TLS.
    ///
    /// # Errors
    /// As for [`listen`](Self::listen).
    ///
    /// # Examples
    /// Only loopback peers, at most 100 at once:
    /// ```
    /// use tbnet::{AllowList, ListenOptions, Packet, Responder, Transport};
    ///
    /// let transport = Transport::builder().start()?;
    /// let options = ListenOptions::new()
    ///     .allow(AllowList::loopback())
    ///     .max_connections(100);
    /// let echo = |req: Packet, resp: Responder| { let _ = resp.reply(req.reply(req.body().clone())); };
    /// let addr = transport.listen_with_options("127.0.0.1:0", echo, options)?;
    /// # transport.stop();
    /// # Ok::<(), tbnet::Error>(())
    /// ```
    ///
    /// A server that greets every client with a one-way packet as it
    /// connects:
    /// ```
    /// use tbnet::{ConnectionEvent, ConnectionHandle, ConnectionManager, ListenOptions, Packet, Responder, Transport};
    ///
    /// let transport = Transport::builder().start()?;
    /// let greet = |conn: &ConnectionHandle, event: ConnectionEvent| {
    ///     if event == ConnectionEvent::Connected {
    ///         let _ = conn.post(Packet::new(7, "welcome"));
    ///     }
    /// };
    /// let addr = transport.listen_with_options(
    ///     "127.0.0.1:0",
    ///     |req: Packet, resp: Responder| { let _ = resp.reply(req.reply("ok")); },
    ///     ListenOptions::new().events(greet),
    /// )?;
    /// let (tx, rx) = std::sync::mpsc::sync_channel(1);
    /// let client = ConnectionManager::new(&transport);
    /// client.set_default_handler(move |packet: Packet, _: Responder| {
    ///     let _ = tx.try_send(packet);
    /// });
    /// client.call(addr, Packet::new(1, "hi"), None)?;
    /// assert_eq!(rx.recv().unwrap().body(), "welcome");
    /// transport.stop();
    /// # Ok::<(), tbnet::Error>(())
    /// ```
    pub fn listen_with_options<A: ServerAdaptor>(
        &self,
        addr: impl ToEndpoint,
        adaptor: A,
        options: ListenOptions,
    ) -> Result<SocketAddr, Error> {
        self.listen_service(addr, Arc::new(Adapted(adaptor)), false, options)
    }

    /// Starts a listener for `handler` with `options`.
    fn listen_service(
        &self,
        addr: impl ToEndpoint,
        handler: Arc<dyn RequestHandler>,
        batches: bool,
        options: ListenOptions,
    ) -> Result<SocketAddr, Error> {
        let addr = addr.to_endpoint()?;
        // The status page speaks HTTP on tbnet's port: not with another
        // framing.
        let sniffer = match options.codec {
            None => self.status_sniffer(),
            Some(_) => None,
        };
        let service = Service {
            handler,
            dispatch: options.dispatch.unwrap_or(self.config().dispatch),
            batches,
            sniffer,
            events: (options.events).or_else(|| self.shared().default_events.clone()),
            codec: options.codec,
            policy: Policy {
                allow: options.allow,
                max_connections: options.max_connections,
            },
            security: options.security,
        };
        self.shared().listen(addr, service)
    }

    /// The status page, if the builder asked for it, answering the peers
    /// its allow-list admits.
    fn status_sniffer(&self) -> Option<Arc<dyn Sniffer>> {
        let config = self.config();
        config.status_page.then(|| {
            Arc::new(crate::status::StatusPage {
                allow: config.status_allow.clone(),
            }) as Arc<dyn Sniffer>
        })
    }

    /// Like [`listen_with`](Self::listen_with) for an adaptor that takes
    /// requests in batches (tbnet's `handleBatchPacket`): every request one
    /// read of a connection brought in, or with [`Dispatch::Ordered`] every
    /// request of the connection waiting when a worker takes it up.
    ///
    /// # Errors
    /// As for [`listen`](Self::listen).
    pub fn listen_batch<B: BatchAdaptor>(
        &self,
        addr: impl ToEndpoint,
        adaptor: B,
        dispatch: Dispatch,
    ) -> Result<SocketAddr, Error> {
        let options = ListenOptions::new().dispatch(dispatch);
        self.listen_service(addr, Arc::new(AdaptedBatch(adaptor)), true, options)
    }
}

/// Handles a connection's requests a batch at a time (tbnet's
/// `IServerAdapter::handleBatchPacket`): one call for every request one
/// read brought in, in arrival order, on the IO thread or a worker as the
/// listener's [`Dispatch`] says.
///
/// Register it with [`Transport::listen_batch`]. Every request in the batch
/// has its own [`Responder`]; dropping the batch (or a responder) leaves
/// the rest unanswered, as for [`ServerAdaptor`].
///
/// # Examples
/// ```
/// use tbnet::{Batch, BatchAdaptor, Dispatch, Transport};
///
/// struct EchoAll;
///
/// impl BatchAdaptor for EchoAll {
///     fn handle_batch(&self, batch: Batch) {
///         for (request, responder) in batch {
///             let _ = responder.reply(request.reply(request.body().clone()));
///         }
///     }
/// }
///
/// let transport = Transport::builder().start()?;
/// let addr = transport.listen_batch("127.0.0.1:0", EchoAll, Dispatch::Ordered)?;
/// # let _ = addr;
/// transport.stop();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait BatchAdaptor: Send + Sync + 'static {
    /// Handles a batch of requests from one connection, in arrival order.
    fn handle_batch(&self, batch: Batch);
}

/// Requests from one connection, in arrival order, each with its
/// [`Responder`]: an iterator of `(Packet, Responder)`.
pub struct Batch {
    requests: std::vec::IntoIter<(Packet, ReplyTo)>,
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("len", &self.requests.len())
            .finish()
    }
}

impl Iterator for Batch {
    type Item = (Packet, Responder);

    fn next(&mut self) -> Option<Self::Item> {
        let (request, reply) = self.requests.next()?;
        Some((request, Responder::new(reply)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.requests.size_hint()
    }
}

impl ExactSizeIterator for Batch {}

/// A [`BatchAdaptor`] as the transport's request handler.
struct AdaptedBatch<B>(B);

impl<B: BatchAdaptor> RequestHandler for AdaptedBatch<B> {
    fn handle_request(&self, request: Packet, reply: ReplyTo) {
        self.handle_batch(vec![(request, reply)]);
    }

    fn handle_batch(&self, requests: Vec<(Packet, ReplyTo)>) {
        let _span = tracing::debug_span!("batch", len = requests.len()).entered();
        self.0.handle_batch(Batch {
            requests: requests.into_iter(),
        });
    }
}

/// One listener's settings ([`Transport::listen_with_options`]); each one
/// left unset is the transport's: everyone admitted, no connection limit
/// but the transport's
/// ([`TransportBuilder::max_connections`](crate::TransportBuilder::max_connections)),
/// the builder's dispatch, events and framing, plain TCP.
#[derive(Clone, Default)]
pub struct ListenOptions {
    dispatch: Option<Dispatch>,
    events: Option<Arc<dyn ConnectionEvents>>,
    codec: Option<Codec>,
    allow: AllowList,
    max_connections: Option<usize>,
    security: Security,
}

impl fmt::Debug for ListenOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenOptions")
            .field("dispatch", &self.dispatch)
            .field("events", &self.events.is_some())
            .field("codec", &self.codec)
            .field("allow", &self.allow)
            .field("max_connections", &self.max_connections)
            .field("tls", &!matches!(self.security, Security::Plain))
            .finish()
    }
}

impl ListenOptions {
    /// The transport's settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where this listener's requests are handled (default: the builder's
    /// [`dispatch`](crate::TransportBuilder::dispatch)).
    pub fn dispatch(mut self, dispatch: Dispatch) -> Self {
        self.dispatch = Some(dispatch);
        self
    }

    /// The peers admitted (default: everyone). Checked at accept, before
    /// any byte is read: any other peer's connection is closed at once and
    /// counted in [`StatsSnapshot::refused`](crate::StatsSnapshot::refused).
    pub fn allow(mut self, allow: AllowList) -> Self {
        self.allow = allow;
        self
    }

    /// Most connections open on this listener at once (default: no limit
    /// but the transport's). One over it is closed at accept and counted
    /// in [`StatsSnapshot::over_limit`](crate::StatsSnapshot::over_limit).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// Serves TLS instead of plain TCP (feature `tls`): the same frames
    /// inside.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::transport::TlsServerConfig) -> Self {
        self.security = Security::Server(tls);
        self
    }

    /// Hooks told when this listener's connections open and close (default:
    /// the builder's [`events`](crate::TransportBuilder::events), if any;
    /// see [`ConnectionEvents`] for the thread they run on).
    pub fn events<E: ConnectionEvents>(mut self, events: E) -> Self {
        self.events = Some(Arc::new(events));
        self
    }

    /// This listener's framing (tbnet's per-listener `IPacketStreamer`;
    /// default: the builder's
    /// [`streamer`](crate::TransportBuilder::streamer)). It may have no
    /// header at all (see [`PacketStreamer`]); the
    /// [`status_page`](crate::TransportBuilder::status_page) is then not
    /// served on this listener.
    pub fn streamer<S: PacketStreamer>(mut self, streamer: S) -> Self {
        self.codec = Some(Codec::new(streamer));
        self
    }
}

/// The way back to the client for one request: reply once, now or later,
/// from any thread.
///
/// A request that arrived with channel id 0 is one-way: its responder
/// discards any reply. Clients do not send it (even
/// [`post`](crate::ConnectionManager::post) takes a real id), but a server's
/// one-way packets ([`ConnectionHandle::post`](crate::ConnectionHandle::post))
/// carry it.
pub struct Responder {
    /// `None` once replied.
    reply: Option<ReplyTo>,
    peer: SocketAddr,
    channel_id: ChannelId,
    /// When the request arrived; read only when debug tracing is on.
    received: Option<Instant>,
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("peer", &self.peer)
            .field("channel_id", &self.channel_id)
            .finish()
    }
}

impl Responder {
    pub(crate) fn new(reply: ReplyTo) -> Self {
        let received = tracing::enabled!(tracing::Level::DEBUG).then(Instant::now);
        Responder {
            peer: reply.conn().peer(),
            channel_id: reply.channel_id(),
            reply: Some(reply),
            received,
        }
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The connection the request arrived on: to close it, or to send the
    /// client packets and requests of the server's own (see
    /// [`ConnectionHandle`]).
    pub fn connection(&self) -> ConnectionHandle {
        // Only the consuming methods take the reply out.
        let reply = (self.reply.as_ref()).expect("a responder keeps its reply until consumed");
        ConnectionHandle::new(reply.conn().clone())
    }

    /// The request's channel id, which the reply carries back.
    pub fn channel_id(&self) -> ChannelId {
        self.channel_id
    }

    /// Whether the request was one-way (channel id 0): no reply is sent.
    pub fn is_one_way(&self) -> bool {
        self.channel_id.is_none()
    }

    /// Sends `response` to the client with the request's channel id (the
    /// packet's own channel id is overwritten). Replies may leave in any
    /// order relative to other requests.
    ///
    /// # Errors
    /// [`Error::Disconnected`](crate::Error::Disconnected) (or [`Error::Shutdown`](crate::Error::Shutdown)) with the packet
    /// handed back if the connection closed meanwhile; the reply is counted
    /// in [`StatsSnapshot::replies_dropped`](crate::StatsSnapshot::replies_dropped).
    pub fn reply(mut self, mut response: Packet) -> Result<(), SendError<Packet>> {
        let Some(reply) = self.reply.take() else {
            return Ok(());
        };
        if self.channel_id.is_none() {
            tracing::debug!(peer = %self.peer, "reply to a one-way request discarded");
            return Ok(());
        }
        response.set_channel_id(self.channel_id);
        if let Some(received) = self.received {
            tracing::debug!(
                peer = %self.peer,
                channel_id = %self.channel_id,
                pcode = %response.pcode(),
                handled_us = received.elapsed().as_micros() as u64,
                "reply sent"
            );
        }
        reply.send(response)
    }
}

impl Responder {
    /// Replies with a typed message (see [`Message`](crate::Message)).
    ///
    /// # Errors
    /// As for [`reply`](Self::reply).
    pub fn reply_message<M: crate::Message>(self, response: &M) -> Result<(), SendError<Packet>> {
        self.reply(response.to_packet())
    }

    /// Replies with an error reply: packet code
    /// [`ERROR_PCODE`](crate::ERROR_PCODE), body `code` (big-endian `i32`)
    /// then `message`. This crate's clients see
    /// [`Error::Remote`](crate::Error::Remote). Use codes from 0 up; negative
    /// ones are the framework's.
    ///
    /// # Errors
    /// As for [`reply`](Self::reply).
    pub fn reply_error(self, code: i32, message: &str) -> Result<(), SendError<Packet>> {
        let body = crate::message::encode_error(code, message);
        self.reply(Packet::new(crate::ERROR_PCODE, body))
    }

    /// Drops the request unanswered, on purpose (no debug log).
    pub(crate) fn ignore(mut self) {
        self.reply.take();
    }

    /// Counts a request no route wanted (a [`Router`](crate::Router) told
    /// to drop unknown codes).
    pub(crate) fn count_unrouted(&self) {
        if let Some(reply) = &self.reply {
            reply.conn().count_unrouted();
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.reply.is_some() && !self.channel_id.is_none() {
            tracing::debug!(
                peer = %self.peer,
                channel_id = %self.channel_id,
                "request dropped without a reply"
            );
        }
    }
}
