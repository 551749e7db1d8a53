//! The transport: one IO thread, one timeout thread, a worker pool.

mod conn;
mod inline;
mod io;
pub(crate) mod role;
mod stats;
mod timer;
pub(crate) mod workers;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_queue::SegQueue;

use crate::completion::clamp_wait;
use crate::error::Error;
use crate::proto::{DefaultStreamer, PacketStreamer, Ready, DEFAULT_READ_CHUNK};
use crate::server::{Dispatch, ServerAdaptor};
use crate::sync::{AtomicBool, Condvar, Mutex, Ordering};

pub(crate) use conn::{Conn, Rejected, Side};
use stats::Stats;
pub use stats::StatsSnapshot;
use timer::TimerQueue;
use workers::WorkQueues;

/// Default for [`TransportBuilder::max_outbound`]: 8 MiB.
pub const DEFAULT_MAX_OUTBOUND: usize = 8 << 20;

/// Work handed to the IO thread.
pub(crate) enum Command {
    Listen(mio::net::TcpListener, Arc<dyn ServerAdaptor>, Dispatch),
    Connect(Arc<Conn>),
    Flush(Arc<Conn>),
    Close(Arc<Conn>, Error),
    /// The connect timeout passed: close the connection if still connecting.
    ConnectTimedOut(Arc<Conn>),
    /// The idle timeout may have passed: close the connection if its peer
    /// is still silent.
    IdleCheck(Arc<Conn>),
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
}

/// State every transport thread and handle shares.
///
/// Connections point back to it, so whatever holds a connection (a queued
/// command, job or timer entry) keeps it alive: `stop` empties every such
/// queue once the threads are gone.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) streamer: Arc<dyn PacketStreamer>,
    pub(crate) stats: Stats,
    /// Origin of the coarse millisecond clock connections stamp activity with.
    pub(crate) epoch: std::time::Instant,
    pub(crate) next_conn_id: crate::sync::AtomicU64,
    pub(crate) timer: TimerQueue,
    pub(crate) workers: WorkQueues,
    commands: SegQueue<Command>,
    waker: mio::Waker,
    /// True while the IO thread is awake (or already woken): senders then
    /// skip the wakeup syscall.
    io_awake: AtomicBool,
    pub(crate) stopping: AtomicBool,
    /// The IO thread is gone: senders fail their own commands.
    io_exited: AtomicBool,
    /// The workers are gone: callbacks run on the completing thread.
    workers_exited: AtomicBool,
}

impl Shared {
    /// Hands `command` to the IO thread, waking it if it sleeps.
    pub(crate) fn command(&self, command: Command) {
        self.commands.push(command);
        if !self.io_awake.swap(true, Ordering::SeqCst) {
            if let Err(e) = self.waker.wake() {
                tracing::error!(error = %e, "could not wake the IO thread");
            }
        }
        if self.io_exited.load(Ordering::SeqCst) {
            self.fail_commands();
        }
    }

    /// After the IO thread exited: ends whatever commands are left, failing
    /// their connections' requests with `Shutdown`.
    fn fail_commands(&self) {
        let mut readies = Vec::new();
        while let Some(command) = self.commands.pop() {
            match command {
                Command::Connect(conn)
                | Command::Flush(conn)
                | Command::Close(conn, _)
                | Command::ConnectTimedOut(conn)
                | Command::IdleCheck(conn) => {
                    conn.close(Error::Shutdown, &mut readies);
                }
                Command::Listen(..) | Command::ResumeReading | Command::Shutdown => {}
            }
        }
        readies.into_iter().for_each(|ready| self.deliver(ready));
    }

    /// Fires a completion: waiters are woken here; callbacks go to the
    /// worker pool (so user code never runs on the IO or timer thread),
    /// unless the builder asked for them inline.
    pub(crate) fn deliver(&self, ready: Ready) {
        if !ready.is_callback() {
            ready.fire();
            return;
        }
        let inline = self.config.callbacks == Dispatch::IoThread && role::is(role::IO, self);
        if inline || self.workers_exited.load(Ordering::SeqCst) {
            workers::run_callback(ready);
            return;
        }
        self.workers.push_callback(ready);
        if self.workers_exited.load(Ordering::SeqCst) {
            self.workers.drain_callbacks();
        }
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
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
    streamer: Arc<dyn PacketStreamer>,
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
            },
            streamer: Arc::new(DefaultStreamer::new()),
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
    /// `call_async`.
    pub fn callbacks(mut self, dispatch: Dispatch) -> Self {
        self.config.callbacks = dispatch;
        self
    }

    /// The frame format (default [`DefaultStreamer`]: tbnet's, 64 MiB body
    /// limit).
    pub fn streamer<S: PacketStreamer>(mut self, streamer: S) -> Self {
        self.streamer = Arc::new(streamer);
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
    /// (default 900 s, tbnet's; `None` keeps them forever).
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

    /// Answers plain HTTP `GET /status` (JSON) and `GET /metrics`
    /// (Prometheus text) on every listener's port, beside tbnet frames
    /// (default off). A connection whose first bytes are `GET ` or `HEAD `
    /// gets one HTTP response and is closed; other paths get 404, malformed
    /// requests are closed unanswered. tbnet's own servers answered such
    /// status requests through their HTTP streamer.
    ///
    /// # Examples
    /// ```
    /// use std::io::{Read, Write};
    /// use tbnet::{Packet, Responder, Transport};
    ///
    /// let transport = Transport::builder().status_page(true).start()?;
    /// let addr = transport.listen("127.0.0.1:0".parse().unwrap(), |_: Packet, _: Responder| {})?;
    /// let mut http = std::net::TcpStream::connect(addr)?;
    /// http.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")?;
    /// let mut response = String::new();
    /// http.read_to_string(&mut response)?;
    /// assert!(response.starts_with("HTTP/1.1 200 OK"));
    /// assert!(response.contains("\"connections\":"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn status_page(mut self, enabled: bool) -> Self {
        self.config.status_page = enabled;
        self
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
        let poll = mio::Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), io::WAKER)?;
        let shared = Arc::new(Shared {
            timer: TimerQueue::new(self.config.timer_tick),
            workers: WorkQueues::new(self.config.worker_queue, self.config.callback_queue),
            config: self.config,
            streamer: self.streamer,
            stats: Stats::default(),
            epoch: std::time::Instant::now(),
            next_conn_id: crate::sync::AtomicU64::new(0),
            commands: SegQueue::new(),
            waker,
            io_awake: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            io_exited: AtomicBool::new(false),
            workers_exited: AtomicBool::new(false),
        });
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
                stopped: Mutex::new(false),
                stopped_cond: Condvar::new(),
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
/// let addr = transport.listen("127.0.0.1:0".parse().unwrap(), |req: Packet, resp: Responder| {
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
    stopped: Mutex<bool>,
    stopped_cond: Condvar,
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

    /// Accepts connections on `addr` (IPv4 or IPv6; port 0 picks one) and
    /// hands their requests to `adaptor`, dispatched as the builder's
    /// [`dispatch`](TransportBuilder::dispatch) says. Returns the bound
    /// address.
    ///
    /// # Errors
    /// [`Error::Io`] if the address cannot be bound, [`Error::Shutdown`] if
    /// the transport stopped.
    pub fn listen<A: ServerAdaptor>(
        &self,
        addr: SocketAddr,
        adaptor: A,
    ) -> Result<SocketAddr, Error> {
        self.listen_with(addr, adaptor, self.inner.shared.config.dispatch)
    }

    /// Like [`listen`](Self::listen), choosing where this listener's requests
    /// are handled.
    ///
    /// # Errors
    /// As for [`listen`](Self::listen).
    pub fn listen_with<A: ServerAdaptor>(
        &self,
        addr: SocketAddr,
        adaptor: A,
        dispatch: Dispatch,
    ) -> Result<SocketAddr, Error> {
        let shared = &self.inner.shared;
        if shared.is_stopping() {
            return Err(Error::Shutdown);
        }
        let listener = mio::net::TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        shared.command(Command::Listen(listener, Arc::new(adaptor), dispatch));
        if shared.is_stopping() {
            // `stop` began meanwhile: the IO thread may drop the listener
            // unregistered, so do not report it as listening.
            return Err(Error::Shutdown);
        }
        tracing::info!(%local, ?dispatch, "listening");
        Ok(local)
    }

    /// A copy of the counters.
    pub fn stats(&self) -> StatsSnapshot {
        let mut snapshot = self.inner.shared.stats.snapshot();
        snapshot.worker_queue = self.inner.shared.workers.queued_requests() as u64;
        snapshot
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
        let mut stopped = self.inner.stopped.lock();
        while !*stopped {
            stopped = self.inner.stopped_cond.wait(stopped);
        }
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.inner.shared.is_stopping()
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
        shared.stopping.store(true, Ordering::SeqCst);
        workers::begin_stop(&shared.workers);
        shared.command(Command::Shutdown);
        // On the IO thread itself (stop called from an IO-thread handler) the
        // Shutdown command must stay queued: the loop takes it once the
        // handler returns, and fails what is left on its way out.
        if join(threads.io, "IO") {
            shared.fail_commands();
        }
        let mut readies = Vec::new();
        for conn in shared.timer.stop() {
            conn.close(Error::Shutdown, &mut readies);
        }
        readies.into_iter().for_each(|ready| shared.deliver(ready));
        let _ = join(threads.timer, "timer");
        workers::finish_stop(&shared.workers, threads.workers, deadline);
        shared.workers_exited.store(true, Ordering::SeqCst);
        shared.workers.drop_requests();
        shared.workers.drain_callbacks();
        if on_worker {
            shared.workers.enter_busy();
        }
        *self.stopped.lock() = true;
        self.stopped_cond.notify_all();
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
