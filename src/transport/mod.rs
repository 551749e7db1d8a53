//! The transport: one IO thread, one timeout thread, a worker pool.
//!
//! It knows frames, connections and threads, and of the layers above only
//! the small interface in `handler`: what to do with a request frame and
//! with a connection's first bytes. Files, by what they decide:
//! - `lifecycle`: where the transport is (running, stopping, stopped);
//! - `io`: moving bytes between sockets and connection state machines
//!   (`proto::Connection`), through the byte-stream layer in `stream`;
//! - `conn`: a connection's state shared with callers and workers (its
//!   pending requests and queued frames);
//! - `timer`: every deadline, in one table;
//! - `outcomes`: delivering removed requests after the lock;
//! - `wake`: waking the IO thread; `workers`: the worker pool.

mod admission;
mod budget;
mod conn;
mod events;
mod handler;
mod io;
mod lifecycle;
mod outcomes;
pub(crate) mod role;
mod stats;
mod stream;
mod timer;
#[cfg(feature = "tls")]
mod tls;
mod wake;
pub(crate) mod workers;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_queue::SegQueue;

use crate::completion::clamp_wait;
use crate::error::Error;
use crate::metrics::ErrorKind;
use crate::proto::{Codec, PacketStreamer, Ready, DEFAULT_READ_CHUNK};
use crate::sync::{AtomicU64, Mutex, Ordering};

pub(crate) use admission::Policy;
pub use admission::{AllowList, Cidr, CidrParseError};
pub(crate) use conn::{Conn, Rejected};
pub(crate) use events::DefaultHandler;
use events::EventQueue;
pub use events::{CloseReason, ConnectionEvent, ConnectionEvents, ConnectionHandle};
pub use handler::Dispatch;
pub(crate) use handler::{ReplyTo, RequestHandler, Service, SniffContext, Sniffed, Sniffer};
use lifecycle::Lifecycle;
use stats::Stats;
pub use stats::StatsSnapshot;
pub(crate) use stream::Security;
use timer::TimerTable;
#[cfg(feature = "tls")]
pub use tls::{TlsClientConfig, TlsServerConfig};
use wake::IoWaker;
use workers::WorkQueues;

/// Default for [`TransportBuilder::max_outbound`]: 8 MiB.
pub const DEFAULT_MAX_OUTBOUND: usize = 8 << 20;

/// Default for [`TransportBuilder::max_connections`]: 16384 accepted
/// connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16384;

/// Default for [`TransportBuilder::max_in_flight`]: 1024 requests.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// Default for [`TransportBuilder::first_frame_timeout`]: 10 s.
pub const DEFAULT_FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`TransportBuilder::io_spin`]: 50 µs.
pub const DEFAULT_IO_SPIN: Duration = Duration::from_micros(50);

/// Default for [`TransportBuilder::handshake_timeout`]: 10 s.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The memory budget's default is this many times
/// [`max_outbound`](TransportBuilder::max_outbound): 64 × 8 MiB = 512 MiB.
pub const DEFAULT_BUDGET_CONNECTIONS: usize = 64;

/// Work handed to the IO thread.
pub(crate) enum Command {
    Listen(mio::net::TcpListener, Arc<Service>),
    Connect(Arc<Conn>),
    Flush(Arc<Conn>),
    Close(Arc<Conn>, Error),
    /// Close once what is queued is written.
    CloseWhenWritten(Arc<Conn>),
    /// The connection's deadline came: its state machine decides what is due.
    Timeout(Arc<Conn>),
    ResumeReading,
    Shutdown,
}

/// Settings fixed when the transport starts.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) workers: usize,
    pub(crate) worker_queue: usize,
    pub(crate) callback_queue: usize,
    pub(crate) dispatch: Dispatch,
    pub(crate) callbacks: Dispatch,
    pub(crate) read_chunk: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) shutdown_grace: Duration,
    pub(crate) timer_tick: Duration,
    pub(crate) max_outbound: usize,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) tcp_keepalive: Option<Duration>,
    pub(crate) status_page: bool,
    pub(crate) status_allow: AllowList,
    pub(crate) max_connections: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) first_frame_timeout: Option<Duration>,
    pub(crate) handshake_timeout: Duration,
    pub(crate) io_spin: Duration,
    /// `None`: [`DEFAULT_BUDGET_CONNECTIONS`] × `max_outbound`.
    pub(crate) memory_budget: Option<usize>,
}

impl Config {
    /// The memory budget in bytes.
    pub(crate) fn memory_budget(&self) -> usize {
        self.memory_budget
            .unwrap_or_else(|| self.max_outbound.saturating_mul(DEFAULT_BUDGET_CONNECTIONS))
    }
}

/// State every transport thread and handle shares.
///
/// Connections point back to it, so whatever holds a connection (a queued
/// command, job or timer entry) keeps it alive: `stop` empties every such
/// queue once the threads are gone.
pub(crate) struct Shared {
    pub(crate) config: Config,
    /// The transport's framing; listeners and managers may choose another.
    pub(crate) codec: Codec,
    /// Hooks for connections whose listener or manager names none.
    pub(crate) default_events: Option<Arc<dyn ConnectionEvents>>,
    pub(crate) stats: Stats,
    /// Per packet code requests, errors and latency, both sides.
    pub(crate) metrics: crate::metrics::Metrics,
    /// Runs connection event hooks on their own thread.
    pub(crate) events: EventQueue,
    /// The next connection's id.
    next_conn_id: AtomicU64,
    /// When the transport started (the status page's uptime).
    pub(crate) epoch: std::time::Instant,
    pub(crate) timer: TimerTable,
    pub(crate) workers: WorkQueues,
    pub(crate) lifecycle: Lifecycle,
    commands: SegQueue<Command>,
    waker: IoWaker,
}

impl Shared {
    /// The shared state of a transport about to start, and the poller its
    /// IO thread will own (no thread is started here).
    pub(crate) fn new(builder: TransportBuilder) -> Result<(Shared, mio::Poll), Error> {
        let poll = mio::Poll::new()?;
        let waker = IoWaker::new(mio::Waker::new(poll.registry(), io::WAKER)?);
        let config = builder.config;
        let shared = Shared {
            timer: TimerTable::new(config.timer_tick),
            workers: WorkQueues::new(config.worker_queue, config.callback_queue, config.workers),
            config,
            codec: builder.streamer,
            default_events: builder.events,
            stats: Stats::default(),
            metrics: crate::metrics::Metrics::default(),
            events: EventQueue::new(),
            next_conn_id: AtomicU64::new(1),
            epoch: std::time::Instant::now(),
            lifecycle: Lifecycle::new(),
            commands: SegQueue::new(),
            waker,
        };
        Ok((shared, poll))
    }

    /// Wakes the IO thread with no command: it looks at its deadlines and
    /// at the workers again.
    pub(crate) fn wake_io(&self) {
        self.waker.wake();
    }

    /// Hands `command` to the IO thread, waking it if it sleeps.
    pub(crate) fn command(&self, command: Command) {
        self.commands.push(command);
        self.waker.wake();
        if self.lifecycle.is_io_gone() {
            self.fail_commands();
        }
    }

    /// After the IO thread exited: ends whatever commands are left, failing
    /// their connections' requests with `Shutdown`.
    fn fail_commands(&self) {
        while let Some(command) = self.commands.pop() {
            match command {
                Command::Connect(conn)
                | Command::Flush(conn)
                | Command::Close(conn, _)
                | Command::CloseWhenWritten(conn)
                | Command::Timeout(conn) => drop(conn.close(Error::Shutdown)),
                Command::Listen(..) | Command::ResumeReading | Command::Shutdown => {}
            }
        }
    }

    /// Fires completions: waiters are woken here; callbacks go to the
    /// worker pool (so user code never runs on the IO or timer thread),
    /// unless the builder asked for them inline. The workers are woken once
    /// for all the callbacks of the batch (on one core, the IO thread holds
    /// that wake until its round ends).
    ///
    /// Returns whether another thread was given one: a waiter or future
    /// woken, or a callback queued for the workers (not callbacks run
    /// here).
    pub(crate) fn deliver_all(&self, readies: impl Iterator<Item = Ready>) -> bool {
        // The workers are woken once for all the callbacks of the batch.
        let mut queued = false;
        let mut woke = false;
        // One clock read per batch for every request's latency.
        let now = std::time::Instant::now();
        for ready in readies {
            self.record_client(&ready, now);
            // (A post's reply wakes nobody.)
            woke |= !ready.is_callback() && !ready.is_discard();
            if let Some(ready) = self.fire_here(ready) {
                self.workers.push_callback(ready);
                queued = true;
            }
        }
        if queued {
            self.workers_take_callbacks();
        }
        woke || queued
    }

    /// Counts a client request that ended, under its packet code.
    fn record_client(&self, ready: &Ready, now: std::time::Instant) {
        if let Some(latency) = ready.elapsed(now) {
            let error = ready.result().as_ref().err().map(ErrorKind::of);
            self.metrics.client.record(ready.pcode(), latency, error);
        }
    }

    /// Fires `ready` on this thread if it wakes a waiter or its callback
    /// runs inline; otherwise hands it back for the workers.
    fn fire_here(&self, ready: Ready) -> Option<Ready> {
        if !ready.is_callback() {
            ready.fire();
            return None;
        }
        let inline = self.config.callbacks == Dispatch::IoThread && role::is(role::IO, self);
        if inline || self.lifecycle.is_stopped() {
            workers::run_callback(ready);
            return None;
        }
        Some(ready)
    }

    /// Callbacks were queued: wakes a worker, or runs them here if the
    /// workers are gone.
    fn workers_take_callbacks(&self) {
        self.workers.notify_or_hold();
        if self.lifecycle.is_stopped() {
            self.workers.drain_callbacks();
        }
    }

    /// A new connection's id (unique within the transport).
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.lifecycle.is_stopping()
    }

    /// Starts listening on `addr` for `service` (the server layer's
    /// `listen`). Returns the bound address.
    pub(crate) fn listen(&self, addr: SocketAddr, service: Service) -> Result<SocketAddr, Error> {
        if self.is_stopping() {
            return Err(Error::Shutdown);
        }
        let listener = mio::net::TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        let dispatch = service.dispatch;
        self.command(Command::Listen(listener, Arc::new(service)));
        if self.is_stopping() {
            // `stop` began meanwhile: the IO thread may drop the listener
            // unregistered, so do not report it as listening.
            return Err(Error::Shutdown);
        }
        tracing::info!(%local, ?dispatch, "listening");
        Ok(local)
    }
}

/// Builds a [`Transport`]; every setting has a documented default.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use tbnet::Transport;
///
/// let transport = Transport::builder()
///     .workers(2)
///     .connect_timeout(Duration::from_secs(1))
///     .start()
///     .unwrap();
/// transport.stop();
/// ```
#[derive(Clone)]
pub struct TransportBuilder {
    config: Config,
    streamer: Codec,
    events: Option<Arc<dyn ConnectionEvents>>,
}

impl fmt::Debug for TransportBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Default for TransportBuilder {
    fn default() -> Self {
        TransportBuilder {
            config: Config {
                workers: std::thread::available_parallelism()
                    .map_or(2, |n| n.get())
                    .max(2),
                worker_queue: 4096,
                callback_queue: 65536,
                dispatch: Dispatch::Workers,
                callbacks: Dispatch::Workers,
                read_chunk: DEFAULT_READ_CHUNK,
                connect_timeout: Duration::from_secs(3),
                shutdown_grace: Duration::from_millis(500),
                timer_tick: Duration::from_millis(100),
                max_outbound: DEFAULT_MAX_OUTBOUND,
                idle_timeout: Some(Duration::from_secs(900)),
                tcp_keepalive: None,
                status_page: false,
                status_allow: AllowList::loopback(),
                max_connections: DEFAULT_MAX_CONNECTIONS,
                max_in_flight: DEFAULT_MAX_IN_FLIGHT,
                first_frame_timeout: Some(DEFAULT_FIRST_FRAME_TIMEOUT),
                io_spin: DEFAULT_IO_SPIN,
                handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
                memory_budget: None,
            },
            streamer: Codec::default(),
            events: None,
        }
    }
}

impl TransportBuilder {
    /// Worker threads for server requests and client callbacks (default:
    /// the number of CPUs, at least 2; at least 1).
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n.max(1);
        self
    }

    /// Capacity of the queue between the IO thread and the workers (default
    /// 4096 requests). When it is full the IO thread stops reading until a
    /// worker frees a place; no request is dropped.
    pub fn worker_queue(mut self, capacity: usize) -> Self {
        self.config.worker_queue = capacity.max(1);
        self
    }

    /// Most client callbacks waiting for a worker (default 65536). Past it,
    /// [`ConnectionManager::send`](crate::ConnectionManager::send) refuses
    /// new requests with [`Error::QueueFull`] until the workers catch up: a
    /// slow callback cannot make responses pile up without bound.
    pub fn callback_queue(mut self, capacity: usize) -> Self {
        self.config.callback_queue = capacity.max(1);
        self
    }

    /// Where [`Transport::listen`] runs server adaptors (default
    /// [`Dispatch::Workers`]).
    pub fn dispatch(mut self, dispatch: Dispatch) -> Self {
        self.config.dispatch = dispatch;
        self
    }

    /// Where client callbacks ([`ConnectionManager::send`](crate::ConnectionManager::send))
    /// run (default [`Dispatch::Workers`]).
    ///
    /// With [`Dispatch::IoThread`] a callback for a response or a
    /// disconnect runs inline on `tbnet-io`, as in tbnet: no hand-off, so
    /// pipelined callbacks are much faster. Callbacks ended elsewhere
    /// (timeouts, shutdown) still go to the workers, so the timeout thread
    /// never runs user code. An inline callback must not block: while it
    /// runs, every connection of the transport waits, and a blocking
    /// [`call`](crate::ConnectionManager::call) made from it can only end by
    /// its timeout. It may send further requests with `send` or
    /// `call_async`. [`Dispatch::Ordered`] means [`Dispatch::Workers`]
    /// here: callbacks may run in parallel.
    pub fn callbacks(mut self, dispatch: Dispatch) -> Self {
        self.config.callbacks = dispatch;
        self
    }

    /// The frame format (default
    /// [`DefaultStreamer`](crate::proto::DefaultStreamer): tbnet's, 64 MiB
    /// body limit). A listener
    /// ([`ListenOptions::streamer`](crate::ListenOptions::streamer)) or a
    /// manager
    /// ([`ConnectionManager::with_streamer`](crate::ConnectionManager::with_streamer))
    /// may use another for its own connections. tbnet's streamer (with any
    /// flag and limit) is called directly; another costs one virtual call
    /// per frame.
    pub fn streamer<S: PacketStreamer>(mut self, streamer: S) -> Self {
        self.streamer = Codec::new(streamer);
        self
    }

    /// Hooks told when any connection of this transport opens and closes
    /// (default none), unless its listener
    /// ([`ListenOptions::events`](crate::ListenOptions::events)) or manager
    /// ([`ConnectionManager::with_events`](crate::ConnectionManager::with_events))
    /// has hooks of its own. See [`ConnectionEvents`] for where they run.
    pub fn events<E: ConnectionEvents>(mut self, events: E) -> Self {
        self.events = Some(Arc::new(events));
        self
    }

    /// Bytes offered to each socket read (default 64 KiB).
    pub fn read_chunk(mut self, bytes: usize) -> Self {
        self.config.read_chunk = bytes;
        self
    }

    /// How long a client connection may take to connect (default 3 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = clamp_wait(timeout);
        self
    }

    /// How long [`Transport::stop`] keeps flushing replies and waiting for
    /// busy workers (default 500 ms).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.config.shutdown_grace = clamp_wait(grace);
        self
    }

    /// Unwritten bytes one connection may hold (default 8 MiB). Past it, a
    /// server connection stops reading its peer's requests until the peer
    /// reads some replies, and a client connection refuses new requests with
    /// [`Error::QueueFull`]. A single larger frame still goes through.
    pub fn max_outbound(mut self, bytes: usize) -> Self {
        self.config.max_outbound = bytes.max(1);
        self
    }

    /// Closes server-side connections that sent nothing for this long
    /// (default 900 s, tbnet's; `None` keeps them forever). This also
    /// bounds a connection whose peer ended its sending side: it is drained
    /// (what it asked is answered and written) and closes once done, or
    /// when this much time has passed since the peer last sent anything.
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.idle_timeout = timeout.map(clamp_wait);
        self
    }

    /// Enables TCP keepalive probes on every connection after this much
    /// silence, repeated at the same interval (default `None`: off). With it
    /// the kernel detects a peer that vanished without FIN or RST, and the
    /// connection's pending requests fail with [`Error::Disconnected`]
    /// instead of waiting for their deadlines.
    pub fn tcp_keepalive(mut self, idle: Option<Duration>) -> Self {
        self.config.tcp_keepalive = idle.map(clamp_wait);
        self
    }

    /// Most accepted connections open at once across the transport's
    /// listeners (default [`DEFAULT_MAX_CONNECTIONS`], 16384; at least 1).
    /// A connection over it is closed at accept, before a byte is read, and
    /// counted in [`StatsSnapshot::over_limit`]; the others are served on.
    /// Client connections do not count. Each listener may have a lower
    /// limit of its own ([`ListenOptions::max_connections`](crate::ListenOptions::max_connections)).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.config.max_connections = n.max(1);
        self
    }

    /// Most requests one server connection may have handed to handlers and
    /// not yet answered (default [`DEFAULT_MAX_IN_FLIGHT`], 1024; at least
    /// 1). At the limit the connection stops being read until replies go
    /// out (or responders are dropped), so one peer cannot fill the worker
    /// queue for everyone; counted in [`StatsSnapshot::in_flight_holds`].
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.config.max_in_flight = n.max(1);
        self
    }

    /// Closes a server connection that has not sent a whole first frame
    /// (or status-page request head) this long after it was accepted
    /// (default [`DEFAULT_FIRST_FRAME_TIMEOUT`], 10 s; `None`: no limit
    /// but the idle timeout). It includes the TLS handshake. Counted in
    /// [`StatsSnapshot::first_frame_timeouts`].
    pub fn first_frame_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.first_frame_timeout = timeout.map(clamp_wait);
        self
    }

    /// How long the IO thread polls without sleeping after handing work to
    /// another thread (requests to workers, responses to callers and
    /// callbacks), waiting for its answer: the reply, or the next request
    /// (default [`DEFAULT_IO_SPIN`], 50 µs; at most 10 ms; `Duration::ZERO`
    /// turns it off).
    ///
    /// Waking a sleeping IO thread costs a system call and a scheduler
    /// round trip, several microseconds on a virtual machine, on every
    /// hand-off; polling for a while saves it, at the price of that CPU
    /// time. The thread polls only after a light round (at most two
    /// connections ready; under load the next events come anyway), only
    /// while a core is spare for it (busy workers and the IO thread fit in
    /// the cores this process may use, as
    /// [`std::thread::available_parallelism`] counts them, which honours
    /// affinity masks and CPU quotas), and it yields to other threads
    /// between polls. Never on one core.
    ///
    /// The price is CPU time: up to `io_spin` per light round that handed
    /// work off, so with the default a server answering 10,000 such rounds
    /// a second may keep up to half a core busy polling (the yields give
    /// it to any other thread that wants it). Under load rounds are not
    /// light and nothing is spent; turn it off where idle CPU matters more
    /// than latency.
    pub fn io_spin(mut self, spin: Duration) -> Self {
        self.config.io_spin = spin.min(Duration::from_millis(10));
        self
    }

    /// How long a TLS handshake may take, on either side (default
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`], 10 s). A handshake still going on
    /// then closes its connection; its requests fail with
    /// [`Error::Disconnected`]. Counted in
    /// [`StatsSnapshot::handshake_failures`].
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.config.handshake_timeout = clamp_wait(timeout);
        self
    }

    /// The most memory all connections' read buffers and unwritten output
    /// may hold together (default [`DEFAULT_BUDGET_CONNECTIONS`] ×
    /// [`max_outbound`](Self::max_outbound): 512 MiB). While it is spent,
    /// the connections holding more than their share (the budget divided by
    /// the open connections) are not read and their requests not decoded;
    /// the others are served on. See the crate docs for the bound this
    /// gives.
    pub fn memory_budget(mut self, bytes: usize) -> Self {
        self.config.memory_budget = Some(bytes.max(1));
        self
    }

    /// The peers the status page ([`status_page`](Self::status_page))
    /// answers (default [`AllowList::loopback`]). Others' status requests
    /// are closed unanswered and counted in
    /// [`StatsSnapshot::status_refused`]; their tbnet frames are served as
    /// usual.
    pub fn status_allow(mut self, allow: AllowList) -> Self {
        self.config.status_allow = allow;
        self
    }

    /// The settings, for the layers that add builder options of their own.
    pub(crate) fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }

    /// Longest the timeout thread sleeps between looks (default 100 ms; it
    /// also wakes for every earlier deadline).
    pub fn timer_tick(mut self, tick: Duration) -> Self {
        self.config.timer_tick = clamp_wait(tick).max(Duration::from_millis(1));
        self
    }

    /// Starts the IO thread (`tbnet-io`), the timeout thread (`tbnet-timer`)
    /// and the workers (`tbnet-worker-N`).
    ///
    /// # Errors
    /// [`Error::Io`] if the poller or a thread cannot be created.
    pub fn start(self) -> Result<Transport, Error> {
        let (shared, poll) = Shared::new(self)?;
        let shared = Arc::new(shared);
        let workers = workers::spawn(&shared, shared.config.workers)?;
        let io = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("tbnet-io".into())
                .spawn(move || io::run(shared, poll))?
        };
        let timer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("tbnet-timer".into())
                .spawn(move || timer::run(&shared))?
        };
        Ok(Transport {
            inner: Arc::new(Inner {
                shared,
                threads: Mutex::new(Some(Threads { io, timer, workers })),
            }),
        })
    }
}

/// A running transport: the IO thread, the timeout thread and the workers.
///
/// A cheap, cloneable handle. The threads stop when [`stop`](Self::stop) is
/// called or the last handle (including those held by
/// [`ConnectionManager`](crate::ConnectionManager)s) is dropped. A handle
/// held by the transport's own adaptor or callbacks makes a cycle that
/// dropping cannot break: such a transport must be stopped explicitly.
///
/// # Examples
/// A server and a client on one transport:
/// ```
/// use tbnet::{ConnectionManager, Packet, Responder, Transport};
///
/// let transport = Transport::builder().start()?;
/// let addr = transport.listen("127.0.0.1:0", |req: Packet, resp: Responder| {
///     let _ = resp.reply(req.reply(req.body().clone()));
/// })?;
/// let client = ConnectionManager::new(&transport);
/// let response = client.call(addr, Packet::new(1, "hello"), None)?;
/// assert_eq!(response.body(), "hello");
/// transport.stop();
/// # Ok::<(), tbnet::Error>(())
/// ```
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    threads: Mutex<Option<Threads>>,
}

struct Threads {
    io: JoinHandle<()>,
    timer: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// A builder with the default settings.
    pub fn builder() -> TransportBuilder {
        TransportBuilder::default()
    }

    /// A copy of the counters.
    pub fn stats(&self) -> StatsSnapshot {
        let mut snapshot = self.inner.shared.stats.snapshot();
        snapshot.worker_queue = self.inner.shared.workers.queued_requests() as u64;
        snapshot
    }

    /// Requests, errors by kind and a latency histogram per packet code, for
    /// the requests this transport's listeners answered (server rows) and
    /// those its clients sent (client rows); rows with no request yet are
    /// left out. Server latency runs from the request's frame decoded to its
    /// reply queued (or the responder dropped); client latency from the
    /// request queued to its outcome (response, error reply, timeout,
    /// disconnect, cancel or shutdown). Recording allocates nothing and
    /// takes no lock; see [`metrics`](crate::metrics).
    ///
    /// # Examples
    /// ```
    /// use tbnet::metrics::Side;
    /// use tbnet::{ConnectionManager, Packet, PacketCode, Responder, Transport};
    ///
    /// let transport = Transport::builder().start()?;
    /// let addr = transport.listen("127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap(), |req: Packet, resp: Responder| {
    ///     let _ = resp.reply(req.reply("ok"));
    /// })?;
    /// let client = ConnectionManager::new(&transport);
    /// client.call(addr, Packet::new(9, "hi"), None)?;
    /// let rows = transport.method_metrics();
    /// let sent = rows.iter().find(|r| r.side == Side::Client).unwrap();
    /// assert_eq!((sent.pcode, sent.requests, sent.errors()), (Some(PacketCode(9)), 1, 0));
    /// assert!(sent.latency.percentile(0.5).is_some());
    /// # Ok::<(), tbnet::Error>(())
    /// ```
    pub fn method_metrics(&self) -> Vec<crate::metrics::CodeMetrics> {
        self.inner.shared.metrics.snapshot()
    }

    /// Stops the transport: stops accepting, fails every pending request with
    /// [`Error::Shutdown`], flushes queued replies for up to the shutdown
    /// grace period, and joins the threads. A worker stuck in a handler past
    /// the grace period is left detached (its replies are dropped). Always
    /// returns; calling it again does nothing.
    pub fn stop(&self) {
        self.inner.stop();
    }

    /// Blocks until the transport is stopped (by [`stop`](Self::stop) on
    /// another handle or thread).
    pub fn wait(&self) {
        self.inner.shared.lifecycle.wait();
    }

    /// Whether [`stop`](Self::stop) was called (the transport may still be
    /// stopping: [`wait`](Self::wait) blocks until it is done).
    pub fn is_stopped(&self) -> bool {
        self.inner.shared.is_stopping()
    }

    /// The settings the transport started with.
    pub(crate) fn config(&self) -> &Config {
        &self.inner.shared.config
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }
}

impl Inner {
    fn stop(&self) {
        let Some(threads) = self.threads.lock().take() else {
            return;
        };
        let shared = &self.shared;
        // Called from inside a worker's handler: that handler is not work the
        // shutdown should wait for.
        let on_worker = role::is(role::WORKER, shared);
        if on_worker {
            shared.workers.leave_busy();
        }
        let deadline = std::time::Instant::now() + shared.config.shutdown_grace;
        shared.lifecycle.begin_stop();
        workers::begin_stop(&shared.workers);
        shared.command(Command::Shutdown);
        // On the IO thread itself (stop called from an IO-thread handler) the
        // Shutdown command must stay queued: the loop takes it once the
        // handler returns, and fails what is left on its way out.
        if join(threads.io, "IO") {
            shared.fail_commands();
        }
        for conn in shared.timer.stop() {
            drop(conn.close(Error::Shutdown));
        }
        let _ = join(threads.timer, "timer");
        // Every close event was queued by now (the IO thread is gone).
        shared.events.stop(shared.config.shutdown_grace);
        workers::finish_stop(&shared.workers, threads.workers, deadline);
        shared.lifecycle.workers_exited();
        shared.workers.drop_requests();
        shared.workers.drain_callbacks();
        if on_worker {
            shared.workers.enter_busy();
        }
        shared.lifecycle.notify_stopped();
        tracing::info!("transport stopped");
    }
}

/// Joins `handle` unless it is the calling thread (the last handle was
/// dropped, or `stop` called, from inside a handler on that thread): a thread
/// cannot join itself, and it exits on its own once `stop` returns. Returns
/// whether it joined.
fn join(handle: JoinHandle<()>, name: &str) -> bool {
    if handle.thread().id() == std::thread::current().id() {
        return false;
    }
    if handle.join().is_err() {
        tracing::error!("the {name} thread panicked");
    }
    true
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}
