//! Connection events and handles: what the layers above learn about a
//! connection's life, and what they may do with a connection they hold.
//!
//! The IO thread notices a connection open or close and queues the event;
//! hooks run on one thread of their own (`tbnet-events`), in the order the
//! events happened, so a slow or panicking hook delays only later hooks,
//! never IO, timeouts or handlers, and a hook may call back into the
//! transport (send, close, even block on a call) without deadlocking it.

use std::fmt;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::completion::CallWait;
use crate::completion::{clamp_wait, CancelHandle, Completion, PacketHandler, ResponseFuture};
use crate::error::{Error, SendError};
use crate::packet::{ChannelId, Packet};
use crate::proto::Side;
use crate::sync::Mutex;

use super::conn::Conn;
use super::handler::RequestHandler;
use super::Command;

/// Most requests a server may have pending on one accepted connection
/// (requests it sent to the client through a [`ConnectionHandle`]).
pub(crate) const SERVER_QUEUE_LIMIT: usize = 256;

/// Timeout of a request sent through a [`ConnectionHandle`] with `None`.
const DEFAULT_HANDLE_TIMEOUT: Duration = Duration::from_millis(5000);

/// A client's handler for packets that match none of its requests (tbnet's
/// default packet handler), shared by a manager and its connections.
pub(crate) type DefaultHandler = Mutex<Option<Arc<dyn RequestHandler>>>;

/// Why a connection closed, as its [`ConnectionEvents::on_close`] hook
/// hears it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer ended the connection (end of stream; a server connection
    /// first answers what it read).
    PeerClosed,
    /// A read or write failed (connection reset, broken pipe, ...).
    Reset,
    /// The peer sent nothing for the
    /// [`idle_timeout`](crate::TransportBuilder::idle_timeout).
    Idle,
    /// The peer sent bytes the framing refused (bad flag, oversized or
    /// malformed frame); the reason is logged at `warn`.
    BadFrame,
    /// This side closed it: [`ConnectionHandle::close`], or the connection
    /// was done (a status page answered).
    Local,
    /// The transport stopped, or the manager that owned the connection was
    /// dropped.
    Shutdown,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseReason::PeerClosed => "closed by the peer",
            CloseReason::Reset => "reset",
            CloseReason::Idle => "idle",
            CloseReason::BadFrame => "bad frame",
            CloseReason::Local => "closed by this side",
            CloseReason::Shutdown => "shutdown",
        })
    }
}

/// One event in a connection's life (what a closure hook receives).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConnectionEvent {
    /// The connection opened: a server accepted it, or a client's connect
    /// completed for the first time to that server.
    Connected,
    /// A client connection opened to a server this manager was connected to
    /// before (the previous connection was lost).
    Reconnected,
    /// The connection closed.
    Closed(CloseReason),
}

/// Hooks called as connections open and close (DSTORE-style
/// `on_connect`/`on_close`; tbnet delivers a `DisconnPacket` instead).
///
/// Given to a listener ([`ListenOptions::events`](crate::ListenOptions::events))
/// for the connections it accepts, to a
/// [`ConnectionManager`](crate::ConnectionManager::with_events) for the
/// connections it opens, or to the
/// [`TransportBuilder`](crate::TransportBuilder::events) for every
/// connection whose listener or manager has none. Every method has a default that does nothing, and
/// any `Fn(&ConnectionHandle, ConnectionEvent)` closure is a hook.
///
/// # Guarantees
/// - Each connection that opened gets exactly one `on_connect` (or, for a
///   client that had a connection to that server before, one
///   `on_reconnect`), then exactly one `on_close`, in that order. A connect
///   that never completed gets neither (its requests fail instead).
/// - Hooks run on the transport's `tbnet-events` thread, one at a time, in
///   the order the events happened. A slow hook delays only the hooks after
///   it; a panicking one is caught and logged. A hook may use the handle
///   and the transport freely, including blocking calls.
/// - [`Transport::stop`](crate::Transport::stop) waits up to the shutdown
///   grace for the hooks of the connections it closed.
///
/// # Examples
/// ```
/// use std::sync::mpsc;
/// use tbnet::{ConnectionEvent, ConnectionHandle, ConnectionManager, ListenOptions, Packet, Responder, Transport};
///
/// let transport = Transport::builder().start()?;
/// let (tx, rx) = mpsc::channel();
/// let tx = std::sync::Mutex::new(tx);
/// let hook = move |conn: &ConnectionHandle, event: ConnectionEvent| {
///     let _ = tx.lock().unwrap().send((conn.peer(), event));
/// };
/// let addr = transport.listen_with_options(
///     "127.0.0.1:0",
///     |req: Packet, resp: Responder| { let _ = resp.reply(req.reply("ok")); },
///     ListenOptions::new().events(hook),
/// )?;
/// let client = ConnectionManager::new(&transport);
/// client.call(addr, Packet::new(1, "hi"), None)?;
/// let (_peer, event) = rx.recv().unwrap();
/// assert_eq!(event, ConnectionEvent::Connected);
/// transport.stop();
/// # Ok::<(), tbnet::Error>(())
/// ```
pub trait ConnectionEvents: Send + Sync + 'static {
    /// A connection opened.
    fn on_connect(&self, conn: &ConnectionHandle) {
        let _ = conn;
    }

    /// A client connection opened again to a server after the previous one
    /// was lost. Defaults to [`on_connect`](Self::on_connect).
    fn on_reconnect(&self, conn: &ConnectionHandle) {
        self.on_connect(conn);
    }

    /// The connection closed because of `reason`; its pending requests have
    /// failed.
    fn on_close(&self, conn: &ConnectionHandle, reason: CloseReason) {
        let _ = (conn, reason);
    }
}

impl<F> ConnectionEvents for F
where
    F: Fn(&ConnectionHandle, ConnectionEvent) + Send + Sync + 'static,
{
    fn on_connect(&self, conn: &ConnectionHandle) {
        self(conn, ConnectionEvent::Connected)
    }

    fn on_reconnect(&self, conn: &ConnectionHandle) {
        self(conn, ConnectionEvent::Reconnected)
    }

    fn on_close(&self, conn: &ConnectionHandle, reason: CloseReason) {
        self(conn, ConnectionEvent::Closed(reason))
    }
}

/// One connection, as its event hooks and a server's handlers hold it: its
/// peer and id, and a way to close it or to send over it.
///
/// On the server side this is tbnet's server-side `Connection`: a server
/// reaches it from a request ([`Responder::connection`](crate::Responder::connection))
/// or from its connect hook, and may send the client one-way packets
/// ([`post`](Self::post)) or requests of its own ([`call`](Self::call),
/// [`send`](Self::send), [`call_async`](Self::call_async)), which the client
/// hands to its default handler
/// ([`ConnectionManager::set_default_handler`](crate::ConnectionManager::set_default_handler)).
/// A server's requests carry channel ids with bit 31 set, so they never
/// collide with the client's, and end exactly once like any request.
///
/// Cheap to clone; safe to keep after the connection closed: operations
/// then fail with [`Error::Disconnected`] (or [`Error::Shutdown`]) and hand
/// the packet back.
#[derive(Clone)]
pub struct ConnectionHandle {
    conn: Arc<Conn>,
}

impl fmt::Debug for ConnectionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionHandle")
            .field("id", &self.id())
            .field("peer", &self.peer())
            .field("server_side", &self.is_server_side())
            .finish()
    }
}

impl ConnectionHandle {
    pub(crate) fn new(conn: Arc<Conn>) -> Self {
        ConnectionHandle { conn }
    }

    /// The connection's id: unique among the transport's connections (a
    /// reconnect gets a new one).
    pub fn id(&self) -> u64 {
        self.conn.id()
    }

    /// The address of the other end.
    pub fn peer(&self) -> SocketAddr {
        self.conn.peer()
    }

    /// Whether this side accepted the connection (a server connection).
    pub fn is_server_side(&self) -> bool {
        self.conn.side() == Side::Server
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// Closes the connection: requests pending on it fail with
    /// [`Error::Disconnected`], the close hook hears
    /// [`CloseReason::Local`]. Unwritten output is dropped. Does nothing
    /// if it closed already. A client manager opens a new connection on
    /// its next request to that server (unless it was told to stay down,
    /// `WhileDown::StayDown`), at once: like
    /// [`ConnectionManager::disconnect`](crate::ConnectionManager::disconnect),
    /// this close is no failure of the server's and grows no reconnect
    /// backoff.
    pub fn close(&self) {
        if self.conn.is_closed() {
            return;
        }
        // The owner's close, as `ConnectionManager::disconnect`: a client's
        // reconnect backoff does not grow.
        self.conn.disconnect();
    }

    /// Closes the connection once everything queued on it so far is
    /// written (tbnet's `setWriteFinishClose`): a last reply, say, followed
    /// by the close. Nothing more is read from it meanwhile; requests
    /// pending on it fail with [`Error::Disconnected`] when it closes, and
    /// the close hook hears [`CloseReason::Local`]. A peer that does not
    /// read is still bounded by the idle timeout (server side). Does
    /// nothing if it closed already.
    pub fn close_when_written(&self) {
        if !self.conn.is_closed() {
            (self.conn.shared).command(Command::CloseWhenWritten(self.conn.clone()));
        }
    }

    /// Sends `packet` one-way.
    ///
    /// On a server connection it carries channel id 0: the client expects
    /// to answer nothing and hands it to its default handler. On a client
    /// connection it takes a real channel id (a tbnet server aborts on id
    /// 0), held for 5 s (not the manager's per-server default timeout); a
    /// reply is discarded and
    /// counted in [`StatsSnapshot::post_replies`](crate::StatsSnapshot::post_replies),
    /// as for [`ConnectionManager::post`](crate::ConnectionManager::post).
    ///
    /// # Errors
    /// The packet handed back if the connection closed, if its unwritten
    /// output is at [`max_outbound`](crate::TransportBuilder::max_outbound)
    /// or (client) its queue limit is reached ([`Error::QueueFull`]), or if
    /// its body is too long for the framing.
    pub fn post(&self, mut packet: Packet) -> Result<(), SendError<Packet>> {
        match self.conn.side() {
            Side::Server => {
                packet.set_channel_id(ChannelId::NONE);
                self.conn.send_frame(packet)
            }
            Side::Client => self.submit(packet, None, Completion::discard()).map(drop),
        }
    }

    /// Sends `request` over this connection and blocks until its response,
    /// its timeout (`None`: 5 s), or the connection's loss.
    ///
    /// Do not call it from a handler running on the IO thread
    /// ([`Dispatch::IoThread`](crate::Dispatch::IoThread)): the response
    /// could not be read until it returned, so it would end by its timeout.
    ///
    /// # Errors
    /// [`Error::Timeout`], [`Error::Disconnected`], [`Error::Shutdown`],
    /// [`Error::QueueFull`] (the connection's queue limit reached: 256 on a
    /// server connection, the manager's on a client one; or its
    /// output at its limit), [`Error::FrameTooLarge`], or an error reply
    /// ([`Error::Remote`]).
    pub fn call(&self, request: Packet, timeout: Option<Duration>) -> Result<Packet, Error> {
        let (wait, completion) = CallWait::new();
        self.submit(request, timeout, completion)
            .map_err(|e| e.into_parts().0)?;
        wait.wait()
    }

    /// Sends `request` over this connection; `handler` runs once with the
    /// outcome, on a worker thread (as for
    /// [`ConnectionManager::send`](crate::ConnectionManager::send)).
    ///
    /// # Errors
    /// The request handed back if it could not be queued (see
    /// [`call`](Self::call)); the handler then does not run.
    pub fn send<H: PacketHandler>(
        &self,
        request: Packet,
        timeout: Option<Duration>,
        handler: H,
    ) -> Result<(), SendError<Packet>> {
        if self.conn.shared.workers.callbacks_full() {
            return Err(SendError::new(Error::QueueFull, request));
        }
        self.submit(request, timeout, Completion::callback(handler))
            .map(drop)
    }

    /// Sends `request` over this connection and returns a future of its
    /// outcome. Dropping the future cancels the request.
    ///
    /// # Errors
    /// The request handed back if it could not be queued.
    pub fn call_async(
        &self,
        request: Packet,
        timeout: Option<Duration>,
    ) -> Result<ResponseFuture, SendError<Packet>> {
        let (mut future, completion) = ResponseFuture::new();
        let id = self.submit(request, timeout, completion)?;
        future.attach_cancel(CancelHandle::new(self.conn.clone(), id));
        Ok(future)
    }

    fn submit(
        &self,
        request: Packet,
        timeout: Option<Duration>,
        completion: Completion,
    ) -> Result<ChannelId, SendError<Packet>> {
        let sent = Instant::now();
        let deadline = sent + clamp_wait(timeout.unwrap_or(DEFAULT_HANDLE_TIMEOUT));
        // Before the request can be written: its response will find the
        // flag set.
        self.conn.expect_responses();
        (self.conn)
            .submit(request, sent, deadline, completion, None)
            .map_err(SendError::from)
    }
}

impl PartialEq for ConnectionHandle {
    /// Handles are equal when they name the same connection.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.conn, &other.conn)
    }
}

impl Eq for ConnectionHandle {}

/// A queued event and the hooks it is for.
struct Event {
    hooks: Arc<dyn ConnectionEvents>,
    conn: ConnectionHandle,
    kind: ConnectionEvent,
}

impl Event {
    fn fire(&self) {
        match self.kind {
            ConnectionEvent::Connected => self.hooks.on_connect(&self.conn),
            ConnectionEvent::Reconnected => self.hooks.on_reconnect(&self.conn),
            ConnectionEvent::Closed(reason) => self.hooks.on_close(&self.conn, reason),
        }
    }
}

#[derive(Default)]
struct EventState {
    sender: Option<mpsc::Sender<Event>>,
    thread: Option<(JoinHandle<()>, mpsc::Receiver<()>)>,
    stopped: bool,
}

/// The queue between the IO thread and the `tbnet-events` thread, which
/// starts with the first event (a transport without hooks never has it).
///
/// Unbounded, but an event is queued only when a connection opens or
/// closes, at most three per connection.
pub(crate) struct EventQueue {
    state: Mutex<EventState>,
}

impl EventQueue {
    pub(crate) fn new() -> Self {
        EventQueue {
            state: Mutex::new(EventState::default()),
        }
    }

    /// Queues `kind` for `conn`'s `hooks`. Dropped if the transport stopped.
    pub(crate) fn emit(
        &self,
        hooks: Arc<dyn ConnectionEvents>,
        conn: Arc<Conn>,
        kind: ConnectionEvent,
    ) {
        let event = Event {
            hooks,
            conn: ConnectionHandle::new(conn),
            kind,
        };
        let refused = {
            let mut state = self.state.lock();
            if state.stopped {
                Some(event)
            } else {
                if state.sender.is_none() {
                    start(&mut state);
                }
                match &state.sender {
                    Some(sender) => sender.send(event).err().map(|e| e.0),
                    None => Some(event),
                }
            }
        };
        // Dropped after the lock: the hooks' own drop is user code.
        if let Some(event) = refused {
            tracing::debug!(peer = %event.conn.peer(), event = ?event.kind, "connection event dropped: no event thread");
        }
    }

    /// Lets the hooks already queued run, for at most `grace`, and joins the
    /// thread (unless called from a hook, or the hooks overrun: then it is
    /// left to finish alone). Later events are dropped.
    pub(crate) fn stop(&self, grace: Duration) {
        let (sender, thread) = {
            let mut state = self.state.lock();
            state.stopped = true;
            (state.sender.take(), state.thread.take())
        };
        drop(sender);
        let Some((handle, done)) = thread else {
            return;
        };
        if handle.thread().id() == std::thread::current().id() {
            return;
        }
        match done.recv_timeout(grace) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if handle.join().is_err() {
                    tracing::error!("the events thread panicked");
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    ?grace,
                    "connection event hooks still running; not waiting for them"
                );
            }
        }
    }
}

/// Starts the `tbnet-events` thread (on failure, events are dropped and
/// logged).
fn start(state: &mut EventState) {
    let (sender, events) = mpsc::channel::<Event>();
    let (done_tx, done) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("tbnet-events".into())
        .spawn(move || {
            for event in events {
                if catch_unwind(AssertUnwindSafe(|| event.fire())).is_err() {
                    tracing::error!(peer = %event.conn.peer(), event = ?event.kind, "a connection event hook panicked");
                }
            }
            let _ = done_tx.send(());
        });
    match spawned {
        Ok(handle) => {
            state.sender = Some(sender);
            state.thread = Some((handle, done));
        }
        Err(e) => tracing::error!(error = %e, "could not start the events thread"),
    }
}
