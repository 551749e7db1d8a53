//! The IO thread: the only code that touches sockets.
//!
//! Each turn: run queued commands, sleep in `poll` (unless work is left over),
//! then for each event accept, finish a connect, read until `WouldBlock`
//! (decoding as it goes) or write until `WouldBlock`. Each connection's
//! state machine ([`Connection`]) decides what may be read, what is due and
//! when to close; this file moves bytes and hands frames on. Readiness is
//! edge-triggered, so every read and write loop runs until the socket says
//! `WouldBlock`, or the connection is put on a list to be continued next
//! turn: a connection that stops early for fairness or back-pressure must
//! not wait for an edge that will never come.

use std::io::{self, IoSlice};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::error::Error;
use crate::packet::Packet;
use crate::proto::{CloseReason, Connection, FrameError, Hold, Limits, Phase, Ready, Side};

use super::admission::{Refusal, RefusalLog};
use super::budget::Budget;
use super::conn::{Conn, NO_TOKEN};
use super::events::{CloseReason as EventReason, ConnectionEvent, SERVER_QUEUE_LIMIT};
use super::handler::{ReplyTo, RequestHandler, Service, SniffContext, Sniffed};
use super::stream::Stream;
use super::timer::{Kind, TimerKey};
use super::workers::{Job, Strand};
use super::{Command, Dispatch, Shared};

/// The token of the shared `mio::Waker`.
pub(crate) const WAKER: Token = Token(usize::MAX);

/// Reads per connection per turn before others get a go.
const READS_PER_TURN: usize = 16;

/// Requests decoded between two looks at a connection's unwritten output.
const OUTPUT_CHECK_EVERY: usize = 32;

/// Pause before retrying an accept that failed for lack of resources.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Slices handed to one `write_vectored` call.
const MAX_IOVECS: usize = 64;

/// The most events a round may have handled for the IO thread to poll
/// without sleeping after it (a light load, where latency is what counts).
const SPIN_MAX_EVENTS: usize = 2;

// Nearly every endpoint is a connection: boxing it would only add an
// indirection per event.
#[allow(clippy::large_enum_variant)]
enum Endpoint {
    Listener(IoListener),
    Conn(IoConn),
}

struct IoListener {
    socket: TcpListener,
    service: Arc<Service>,
    /// The last accept failed for lack of resources (logged once).
    failing: bool,
    /// Connections accepted here and open now.
    open: usize,
}

struct IoConn {
    stream: Stream,
    conn: Arc<Conn>,
    state: Connection,
    /// Server connections: what handles their requests.
    service: Option<Arc<Service>>,
    /// Requests the full worker queue could not take yet.
    stalled: Option<Job>,
    /// Ordered server connections: the queue their requests wait in.
    strand: Option<Arc<Strand>>,
    /// The connection's deadline registered with the timer.
    timer: Option<TimerKey>,
    /// Accepted connections: their listener's token.
    listener: Option<usize>,
    /// What its buffers hold, as last counted in the memory budget.
    charged: usize,
    /// Its connect event was queued: its close event will be too.
    announced: bool,
    /// It told its `Conn` that every answer should wake this thread (an
    /// in-flight hold), and has not taken that back.
    awaiting_answers: bool,
}

impl IoConn {
    /// The memory budget is spent: gives the read buffer back if it holds
    /// no input, and charges the connection for what is left. True if it
    /// held one.
    fn give_back_input(&mut self, budget: &mut Budget, stats: &super::stats::Stats) -> bool {
        if !self.state.release_idle_input() {
            return false;
        }
        budget.recharge(&mut self.charged, self.state.memory());
        stats.budget_releases(1);
        true
    }
}

struct IoLoop {
    shared: Arc<Shared>,
    poll: Poll,
    endpoints: Slab<Endpoint>,
    /// Connections paused by a full worker queue.
    paused: Vec<usize>,
    /// Connections that stopped reading for fairness, to continue next turn.
    again: Vec<usize>,
    /// Listeners whose accept failed for lack of resources.
    accept_retry: Vec<usize>,
    responses: Vec<Packet>,
    /// A reused buffer for the requests completed by a batch of responses.
    completed: Vec<Ready>,
    /// Accepted connections open now (all listeners).
    accepted: usize,
    budget: Budget,
    refusals: RefusalLog,
    /// A reused buffer for a decode pass's requests bound for an ordered
    /// connection's strand.
    gathered: Vec<(Packet, ReplyTo)>,
    /// Jobs were queued this round and no worker was woken for them yet.
    wake_workers: bool,
    /// The workers' progress when last seen, and when.
    progress_seen: (usize, Instant),
    /// What this thread last told the workers about its watching.
    io_watches: bool,
    /// Whether this thread has a core to spare for a worker (see
    /// `WorkQueues::may_wake_helper`).
    spare_core: bool,
    /// This round handed work to another thread (requests to workers,
    /// responses to their callers) whose answer comes back as a command.
    handed_off: bool,
    /// Until when this thread polls without sleeping, for that answer.
    spin_until: Option<Instant>,
}

/// The `tbnet-io` thread's body.
pub(crate) fn run(shared: Arc<Shared>, poll: Poll) {
    super::role::set(super::role::IO, &shared);
    let mut io = IoLoop {
        shared: shared.clone(),
        poll,
        endpoints: Slab::new(),
        paused: Vec::new(),
        again: Vec::new(),
        accept_retry: Vec::new(),
        responses: Vec::new(),
        completed: Vec::new(),
        accepted: 0,
        budget: Budget::new(shared.config.memory_budget()),
        refusals: RefusalLog::default(),
        gathered: Vec::new(),
        wake_workers: false,
        progress_seen: (0, Instant::now()),
        io_watches: false,
        spare_core: shared.workers.cores() > 1,
        handed_off: false,
        spin_until: None,
    };
    let mut events = Events::with_capacity(1024);
    // Requests answered on this thread are counted before each write (see
    // `CodeTable::defer_here`).
    shared.metrics.server.defer_here();
    if !io.spare_core {
        super::workers::hold_wakes();
    }
    loop {
        if io.run_commands() {
            break;
        }
        // Commands (flushes, closes) may have given memory back, and a
        // round need not follow them before this thread sleeps.
        let budget_again = io.release_budget_holds();
        // Jobs queued last round (or by commands) wake a worker before this
        // thread may sleep.
        if std::mem::take(&mut io.wake_workers) | super::workers::take_held_wake() {
            shared.workers.notify();
        }
        // On one core, jobs left queued behind a worker are watched for a
        // stall (`WorkQueues::watch`).
        let watching = shared.workers.needs_watching();
        // After handing work to another thread, with a core to spare, poll
        // without sleeping for a while: its answer (a reply or the next
        // request) then needs no wakeup, on either side.
        if io.spin_until.is_some_and(|until| Instant::now() >= until) {
            io.spin_until = None;
        }
        // (While spinning, the zero timeout counts as watching for stalled
        // workers: `watch` runs after the spin, at most `io_spin` late.)
        let spinning = io.spin_until.is_some() && shared.workers.core_for_io_spin();
        let timeout = if !io.again.is_empty() || spinning || budget_again {
            Some(Duration::ZERO)
        } else if watching {
            Some(super::workers::STALL)
        } else if !io.accept_retry.is_empty() {
            Some(ACCEPT_RETRY)
        } else {
            None
        };
        // Stored only when it changes (a `SeqCst` store every turn costs a
        // full barrier); an unchanged value is visible already.
        let watches = timeout.is_some_and(|t| t <= super::workers::STALL);
        if watches != io.io_watches {
            io.io_watches = watches;
            shared.workers.set_io_watches(watches);
        }
        let idle = || shared.commands.is_empty() && (watching || !shared.workers.needs_watching());
        if !spinning && !shared.waker.may_sleep(idle) {
            continue;
        }
        let polled = io.poll.poll(&mut events, timeout);
        if spinning && polled.is_ok() && events.is_empty() && io.again.is_empty() && !budget_again {
            // Nothing yet: other threads on this core go first, then look
            // again (commands at the top of the loop).
            std::thread::yield_now();
            continue;
        }
        shared.waker.awake();
        shared.stats.poll_wakeup();
        if let Err(e) = polled {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "poll failed; shutting the transport's IO down");
            break;
        }
        // With a core to spare, the first jobs of a round wake a worker at
        // once, to run beside this thread while it reads on; the rest wait
        // for the round's end (a woken worker passes the wake on while jobs
        // are queued). On one core, every wake waits for the round's end:
        // an early one would only switch this thread out.
        let mut woke = false;
        let mut handled = 0;
        for event in events.iter() {
            handled += 1;
            io.handle_event(event);
            if io.spare_core && io.wake_workers && !woke {
                io.wake_workers = false;
                woke = true;
                shared.workers.notify();
            }
        }
        for token in std::mem::take(&mut io.again) {
            io.read(token);
        }
        // Only after a light round: under load the next events come
        // anyway, and polling would take time the other threads need.
        if std::mem::take(&mut io.handed_off)
            && io.spare_core
            && handled <= SPIN_MAX_EVENTS
            && !shared.config.io_spin.is_zero()
        {
            io.spin_until = Some(Instant::now() + shared.config.io_spin);
        }
        for token in std::mem::take(&mut io.accept_retry) {
            io.accept(token);
        }
        if shared.workers.needs_watching() {
            shared.workers.watch(&mut io.progress_seen, Instant::now());
        }
        shared.stats.set_memory(io.budget.used());
        shared.metrics.server.flush_deferred();
    }
    // Wakes from here on are not held: shutting down fails requests whose
    // callbacks the workers must run.
    if super::workers::release_wakes() {
        shared.workers.notify();
    }
    io.shut_down();
    shared.metrics.server.flush_deferred();
    shared.lifecycle.io_exited();
    shared.fail_commands();
}

/// The error a connection's pending requests and logs see for `reason`.
fn close_error(reason: CloseReason) -> Error {
    match reason {
        CloseReason::ConnectTimedOut
        | CloseReason::Idle
        | CloseReason::FirstFrameTimedOut
        | CloseReason::HandshakeTimedOut => Error::Timeout,
        CloseReason::PeerClosed | CloseReason::Drained | CloseReason::Answered => {
            Error::Disconnected
        }
    }
}

/// What a connection's close hook hears for the state machine's `reason`.
fn event_reason(reason: CloseReason) -> EventReason {
    match reason {
        // (A connection that never opened has no close event.) A peer too
        // slow with its first frame or handshake is one that idled.
        CloseReason::ConnectTimedOut
        | CloseReason::Idle
        | CloseReason::FirstFrameTimedOut
        | CloseReason::HandshakeTimedOut => EventReason::Idle,
        CloseReason::PeerClosed | CloseReason::Drained => EventReason::PeerClosed,
        CloseReason::Answered => EventReason::Local,
    }
}

/// What a connection's close hook hears when it closes with `error` (the
/// sites that know better say so).
fn error_reason(error: &Error) -> EventReason {
    match error {
        Error::Shutdown => EventReason::Shutdown,
        Error::Timeout => EventReason::Idle,
        Error::Io(_) => EventReason::Reset,
        Error::MalformedFrame(_) | Error::FrameTooLarge { .. } => EventReason::BadFrame,
        _ => EventReason::PeerClosed,
    }
}

impl IoLoop {
    /// Runs every queued command; true on `Shutdown`.
    fn run_commands(&mut self) -> bool {
        while let Some(command) = self.shared.commands.pop() {
            if self.run_command(command) {
                return true;
            }
        }
        false
    }

    /// Runs one command; true for `Shutdown`. The only place commands are
    /// interpreted while the IO thread runs, shutting down or not (once it
    /// has exited, `Shared::fail_commands` ends what is left).
    fn run_command(&mut self, command: Command) -> bool {
        let stopping = self.shared.is_stopping();
        match command {
            // `listen` reports `Shutdown` for a listener that races `stop`.
            Command::Listen(..) if stopping => {}
            Command::Listen(socket, service) => self.add_listener(socket, service),
            Command::Connect(conn) if stopping => drop(conn.close(Error::Shutdown)),
            Command::Connect(conn) => self.connect(conn),
            Command::Flush(conn) => {
                if let Some(token) = self.token_of(&conn) {
                    self.write(token);
                }
            }
            Command::Close(conn, error) => match self.token_of(&conn) {
                // Only this side asks for a close.
                Some(token) => {
                    let reason = match error {
                        Error::Shutdown => EventReason::Shutdown,
                        _ => EventReason::Local,
                    };
                    self.close_because(token, reason, error);
                }
                // Not connected yet (or never to be): end it all the same.
                None => drop(conn.close(error)),
            },
            Command::Timeout(conn) => {
                if let Some(token) = self.token_of(&conn) {
                    self.timeout(token);
                }
            }
            Command::CloseWhenWritten(conn) => match self.token_of(&conn) {
                Some(token) => self.close_when_written(token),
                None => drop(conn.close(Error::Disconnected)),
            },
            // Shutting down reads no more requests.
            Command::ResumeReading if stopping => {}
            Command::ResumeReading => self.resume(),
            Command::Shutdown => return true,
        }
        false
    }

    fn token_of(&self, conn: &Arc<Conn>) -> Option<usize> {
        let token = conn.token();
        match self.endpoints.get(token) {
            Some(Endpoint::Conn(c)) if Arc::ptr_eq(&c.conn, conn) => Some(token),
            _ => None,
        }
    }

    fn conn_mut(&mut self, token: usize) -> Option<&mut IoConn> {
        match self.endpoints.get_mut(token) {
            Some(Endpoint::Conn(c)) => Some(c),
            _ => None,
        }
    }

    fn limits(&self) -> Limits {
        let config = &self.shared.config;
        Limits {
            max_outbound: config.max_outbound,
            idle_timeout: config.idle_timeout,
            connect_timeout: config.connect_timeout,
            read_chunk: config.read_chunk,
            first_frame_timeout: config.first_frame_timeout,
            handshake_timeout: config.handshake_timeout,
            max_in_flight: config.max_in_flight,
        }
    }

    fn add_listener(&mut self, mut socket: TcpListener, service: Arc<Service>) {
        let entry = self.endpoints.vacant_entry();
        let token = Token(entry.key());
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut socket, token, Interest::READABLE)
        {
            tracing::error!(error = %e, "could not register a listener");
            return;
        }
        entry.insert(Endpoint::Listener(IoListener {
            socket,
            service,
            failing: false,
            open: 0,
        }));
        // Connections may have queued before registration.
        self.accept(token.0);
    }

    fn connect(&mut self, conn: Arc<Conn>) {
        if conn.is_closed() {
            return;
        }
        self.shared.stats.connect_attempt();
        let peer = conn.peer();
        let stream = match Stream::connect(peer, conn.security()) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "connect failed");
                drop(conn.close(Error::from(e)));
                return;
            }
        };
        let state = Connection::client(Instant::now(), self.limits());
        self.insert_conn(stream, conn, state, None, None);
    }

    /// Registers a connection's stream (accepted on `listener`, if it
    /// was); on failure closes `conn` and returns false.
    fn insert_conn(
        &mut self,
        mut stream: Stream,
        conn: Arc<Conn>,
        mut state: Connection,
        service: Option<Arc<Service>>,
        listener: Option<usize>,
    ) -> bool {
        let entry = self.endpoints.vacant_entry();
        let token = entry.key();
        if let Err(e) = stream.register(self.poll.registry(), Token(token)) {
            tracing::warn!(peer = %conn.peer(), error = %e, "could not register a connection");
            drop(conn.close(Error::from(e)));
            return false;
        }
        if state.phase() != Phase::Connecting {
            stream.configure(self.shared.config.tcp_keepalive);
            if stream.is_handshaking() {
                state.start_handshake(Instant::now());
            }
        }
        conn.set_token(token);
        entry.insert(Endpoint::Conn(IoConn {
            stream,
            conn,
            state,
            service,
            stalled: None,
            strand: None,
            timer: None,
            listener,
            charged: 0,
            announced: false,
            awaiting_answers: false,
        }));
        self.shared.stats.connection_opened();
        if listener.is_some() {
            self.accepted += 1;
            if let Some(Endpoint::Listener(l)) = listener.and_then(|l| self.endpoints.get_mut(l)) {
                l.open += 1;
            }
        }
        self.arm(token);
        self.announce(token);
        true
    }

    /// Queues the connection's connect event, if it is open and has hooks.
    fn announce(&mut self, token: usize) {
        // Called after every read: no reference counting before the cheap
        // checks.
        let IoLoop {
            shared, endpoints, ..
        } = self;
        let Some(Endpoint::Conn(c)) = endpoints.get_mut(token) else {
            return;
        };
        // Announced once open: connected, and a TLS handshake done.
        if c.announced || c.state.phase() == Phase::Connecting || c.state.in_handshake() {
            return;
        }
        if let Some(events) = c.conn.events() {
            c.announced = true;
            let kind = if c.conn.is_reconnect() {
                ConnectionEvent::Reconnected
            } else {
                ConnectionEvent::Connected
            };
            shared.events.emit(events.clone(), c.conn.clone(), kind);
        }
    }

    /// Registers the connection's next deadline with the timer, if its
    /// state machine asks for it.
    fn arm(&mut self, token: usize) {
        let shared = self.shared.clone();
        let Some(c) = self.conn_mut(token) else {
            return;
        };
        let Some(at) = c.state.deadline_to_arm() else {
            return;
        };
        let old = c.timer.take().and_then(|key| shared.timer.remove(key));
        c.timer = shared.timer.insert(at, Kind::Connection, c.conn.clone());
        drop(old);
    }

    /// Takes what is queued on the connection, stops its reading, and
    /// writes: `write` closes it once everything is out.
    fn close_when_written(&mut self, token: usize) {
        let Some(c) = self.conn_mut(token) else {
            return;
        };
        if c.state.phase() == Phase::Connecting {
            // Nothing was written yet, nor can be.
            self.close_because(token, EventReason::Local, Error::Disconnected);
            return;
        }
        let answered = c.conn.take_output(c.state.out());
        c.state.set_answered(answered);
        c.state.close_when_written();
        self.write(token);
    }

    /// Something may be due on the connection: closes it, or re-arms.
    fn timeout(&mut self, token: usize) {
        let Some(Endpoint::Conn(c)) = self.endpoints.get_mut(token) else {
            return;
        };
        c.timer = None;
        match c.state.handle_timeout(Instant::now()) {
            Some(reason) => {
                match reason {
                    CloseReason::ConnectTimedOut => {
                        tracing::warn!(peer = %c.conn.peer(), "connect timed out");
                    }
                    // Slow peers can come in floods: debug, not warn.
                    CloseReason::FirstFrameTimedOut => {
                        self.shared.stats.first_frame_timeout();
                        tracing::debug!(peer = %c.conn.peer(), "closing: no first frame in time");
                    }
                    CloseReason::HandshakeTimedOut => {
                        self.shared.stats.handshake_failure();
                        tracing::debug!(peer = %c.conn.peer(), "closing: handshake timed out");
                    }
                    _ => tracing::info!(peer = %c.conn.peer(), "closing idle connection"),
                }
                self.close_because(token, event_reason(reason), close_error(reason));
            }
            None => self.arm(token),
        }
    }

    fn handle_event(&mut self, event: &mio::event::Event) {
        let token = event.token().0;
        if event.token() == WAKER {
            return;
        }
        match self.endpoints.get(token) {
            Some(Endpoint::Listener(_)) => self.accept(token),
            Some(Endpoint::Conn(c)) => {
                if c.state.phase() == Phase::Connecting {
                    self.finish_connect(token);
                    return;
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.read(token);
                }
                if event.is_writable() {
                    self.write(token);
                }
            }
            None => {}
        }
    }

    fn accept(&mut self, token: usize) {
        loop {
            let Some(Endpoint::Listener(listener)) = self.endpoints.get_mut(token) else {
                return;
            };
            match listener.socket.accept() {
                Ok((socket, peer)) => {
                    if listener.failing {
                        tracing::info!("accepting again");
                        listener.failing = false;
                    }
                    let verdict = listener.service.policy.judge(
                        peer.ip(),
                        listener.open,
                        self.accepted,
                        self.shared.config.max_connections,
                    );
                    if let Err(refusal) = verdict {
                        match refusal {
                            Refusal::NotAllowed => self.shared.stats.refused(),
                            Refusal::ListenerFull | Refusal::TransportFull => {
                                self.shared.stats.over_limit();
                            }
                        }
                        self.refusals.refusal(peer, refusal);
                        // Closed before a byte is read.
                        drop(socket);
                        continue;
                    }
                    let service = listener.service.clone();
                    let stream = match Stream::accept(socket, peer, &service.security) {
                        Ok(stream) => stream,
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "could not set up an accepted connection");
                            continue;
                        }
                    };
                    let conn = Conn::new(
                        self.shared.clone(),
                        peer,
                        Side::Server,
                        SERVER_QUEUE_LIMIT,
                        Duration::ZERO,
                    );
                    let conn = Arc::new(
                        conn.with_codec(service.codec.clone())
                            .with_events(service.events.clone(), false),
                    );
                    tracing::debug!(%peer, "accepted");
                    let sniff = service.sniffer.is_some();
                    let state = Connection::server(Instant::now(), self.limits(), sniff);
                    self.insert_conn(stream, conn, state, Some(service), Some(token));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // The peer gave up before we took it: take the next one.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(e) => {
                    // Out of descriptors or memory. The backlog still holds
                    // connections, but no new edge will announce them:
                    // retry after a pause instead of waiting for one (and
                    // not at once: that would spin until descriptors free).
                    self.shared.stats.accept_error();
                    if let Some(Endpoint::Listener(listener)) = self.endpoints.get_mut(token) {
                        if !listener.failing {
                            tracing::warn!(error = %e, "accept failed; retrying every {ACCEPT_RETRY:?}");
                            listener.failing = true;
                        }
                    }
                    self.accept_retry.push(token);
                    return;
                }
            }
        }
    }

    fn finish_connect(&mut self, token: usize) {
        let shared = self.shared.clone();
        let keepalive = shared.config.tcp_keepalive;
        let Some(c) = self.conn_mut(token) else {
            return;
        };
        match c.stream.finish_connect() {
            Ok(false) => {} // still in progress; a later event finishes it
            Ok(true) => {
                let now = Instant::now();
                c.state.connected(now);
                c.stream.configure(keepalive);
                if c.stream.is_handshaking() {
                    c.state.start_handshake(now);
                }
                c.conn.mark_open(now);
                // The connect deadline is gone; a TLS handshake's may follow.
                let old = c.timer.take().and_then(|key| shared.timer.remove(key));
                drop(old);
                tracing::debug!(peer = %c.conn.peer(), "connected");
                self.arm(token);
                self.announce(token);
                self.write(token);
                self.read(token);
            }
            Err(e) => {
                tracing::warn!(peer = %c.conn.peer(), error = %e, "connect failed");
                self.close(token, Error::from(e));
            }
        }
    }

    /// Reads until `WouldBlock`, decoding and dispatching as it goes.
    fn read(&mut self, token: usize) {
        self.read_until_blocked(token);
        // A TLS handshake that these reads finished opens the connection
        // for its hooks.
        self.announce(token);
        // Replies produced on this thread while decoding leave now rather
        // than after every other ready connection was read: with a fixed
        // number of requests in flight, latency is throughput.
        if let Some(c) = self.conn_mut(token) {
            if c.conn.flush_pending()
                || c.state.unwritten() > 0
                || c.stream.has_backlog()
                || c.state.poll_close().is_some()
            {
                self.write(token);
            }
        }
    }

    fn read_until_blocked(&mut self, token: usize) {
        let mut reads = 0;
        // Whether output was written since the last read (once per read is
        // enough: the socket may take no more until the peer reads).
        let mut written = true;
        loop {
            if let Err(error) = self.decode(token) {
                self.close(token, error);
                return;
            }
            let conns = self.endpoints.len();
            let Some(Endpoint::Conn(c)) = self.endpoints.get_mut(token) else {
                return;
            };
            // Decoding split frames off the buffer: the charge follows.
            let memory = c.state.memory();
            self.budget.recharge(&mut c.charged, memory);
            if let Some(hold) = c.state.hold() {
                // Short of memory, a stopped connection whose input is all
                // decoded gives its buffer back while it waits.
                if self.budget.spent() {
                    c.give_back_input(&mut self.budget, &self.shared.stats);
                }
                if hold == Hold::InFlight {
                    // Answers may have come meanwhile; the ones after this
                    // wake the IO thread.
                    let answered = c.conn.await_answers(c.state.out());
                    c.awaiting_answers = true;
                    c.state.set_answered(answered);
                    if c.state.hold().is_none() {
                        continue;
                    }
                    self.shared.stats.in_flight_hold();
                }
                return;
            }
            if std::mem::take(&mut c.awaiting_answers) {
                // Reading again: answers need not wake this thread.
                c.conn.stop_awaiting_answers();
            }
            if !self.budget.may_grow(c.charged, conns) {
                // Short of memory: this connection's emptied buffer goes
                // back first, then (once per time the budget is spent)
                // every idle connection's.
                if c.give_back_input(&mut self.budget, &self.shared.stats) {
                    continue;
                }
                if self.budget.should_sweep() {
                    self.give_back_idle_buffers();
                    continue;
                }
                tracing::debug!(peer = %c.conn.peer(), holds = c.charged, "memory budget spent; pausing the connection");
                c.state.set_budget_hold(true);
                self.budget.hold(token);
                self.shared.stats.budget_hold();
                return;
            }
            if reads == READS_PER_TURN {
                self.again.push(token);
                return;
            }
            let server = c.state.side() == Side::Server;
            if !written && server && (c.conn.flush_pending() || c.state.unwritten() > 0) {
                // Answer what was read before reading more: this is also
                // where a peer that does not read is noticed.
                written = true;
                self.write(token);
                continue;
            }
            reads += 1;
            // Whether the read buffer was there before this read (an empty
            // socket's read may allocate one only to give it back).
            let had_buffer = c.state.has_read_buffer();
            let read = c.state.read_from(&mut c.stream, Instant::now());
            if c.state.in_handshake() && !c.stream.is_handshaking() {
                c.state.handshake_done();
            }
            // (What the read added is charged at the top of the loop, after
            // decoding; a close charges nothing.)
            match read {
                Ok(0) => {
                    if c.state.in_handshake() {
                        self.shared.stats.handshake_failure();
                    }
                    tracing::debug!(peer = %c.conn.peer(), "peer ended its sending side");
                    if server {
                        let answered = c.conn.set_draining(c.state.out());
                        c.state.set_answered(answered);
                    }
                    let eof = c.state.handle_eof();
                    if server {
                        self.shared.stats.half_close();
                    }
                    match eof {
                        Some(reason) => {
                            self.close_because(token, event_reason(reason), close_error(reason));
                            return;
                        }
                        // Draining: decode what is buffered, then stop.
                        None => continue,
                    }
                }
                Ok(n) => {
                    self.shared.stats.bytes_in(n as u64);
                    written = false;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.state.read_blocked();
                    if !self.budget.spent() {
                        if c.state.buffered() == 0 && c.state.has_read_buffer() {
                            self.budget.kept_idle();
                        }
                    } else if had_buffer {
                        c.give_back_input(&mut self.budget, &self.shared.stats);
                    } else {
                        // Allocated by this read only: not memory given back.
                        c.state.release_idle_input();
                    }
                    let memory = c.state.memory();
                    self.budget.recharge(&mut c.charged, memory);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if c.state.in_handshake() {
                        self.shared.stats.handshake_failure();
                    }
                    tracing::debug!(peer = %c.conn.peer(), error = %e, "read failed");
                    self.close(token, Error::from(e));
                    return;
                }
            }
        }
    }

    /// Takes every whole packet out of the connection's buffer: responses
    /// complete their requests, requests go to the handler.
    fn decode(&mut self, token: usize) -> Result<(), Error> {
        let IoLoop {
            shared,
            endpoints,
            paused,
            responses,
            completed,
            refusals,
            gathered,
            wake_workers,
            handed_off,
            ..
        } = self;
        let Some(Endpoint::Conn(c)) = endpoints.get_mut(token) else {
            return Ok(());
        };
        if c.state.buffered() == 0 {
            return Ok(());
        }
        if let Some(first) = c.state.first_bytes() {
            sniff(shared, refusals, c, first.len())?;
        }
        if !c.state.may_decode() {
            return Ok(());
        }
        match c.state.side() {
            Side::Client => {
                let decoded = decode_responses(shared, c, responses);
                // Counted before delivery: a caller that sees its response
                // sees it counted. Responses before a bad frame are still
                // delivered; the requests after it fail when it closes.
                shared.stats.packets_in(responses.len());
                if !responses.is_empty() {
                    let outcomes =
                        (c.conn).complete_responses(responses, std::mem::take(completed));
                    let elsewhere;
                    (*completed, elsewhere) = outcomes.deliver();
                    *handed_off |= elsewhere;
                }
                decoded
            }
            Side::Server => {
                let inline = c.service.as_ref().map(|s| s.dispatch) == Some(Dispatch::IoThread);
                let mut batch = RequestBatch {
                    shared,
                    paused,
                    gathered,
                    wake_workers,
                    token,
                    inline,
                    decoded: 0,
                    queued_jobs: false,
                    out_of_room: false,
                };
                loop {
                    batch.begin(c);
                    let result = batch.decode(c);
                    if inline {
                        // (Workers' replies are taken by the write that follows.)
                        batch.end(c);
                    }
                    // Stopped at the in-flight limit, whose places the
                    // inline handlers may have given back already: no
                    // read would bring the buffered requests back.
                    let again = std::mem::take(&mut batch.out_of_room)
                        && result.is_ok()
                        && c.state.in_flight_room() > 0;
                    if !again {
                        *handed_off |= batch.queued_jobs;
                        batch.finish();
                        return result;
                    }
                }
            }
        }
    }

    /// The memory budget is spent: every connection with an empty read
    /// buffer gives it back (a burst may have grown it; idle, it would keep
    /// the budget spent and held connections waiting).
    fn give_back_idle_buffers(&mut self) {
        let mut freed = 0;
        for (_, endpoint) in self.endpoints.iter_mut() {
            if let Endpoint::Conn(c) = endpoint {
                freed += usize::from(c.give_back_input(&mut self.budget, &self.shared.stats));
            }
        }
        tracing::debug!(
            freed,
            used = self.budget.used(),
            "memory budget spent; idle read buffers given back"
        );
    }

    /// Reads again from the connections held for the memory budget that
    /// may grow now: all of them once the total is under the budget, else
    /// those whose own charge fell under their share. The rest stay held.
    ///
    /// Returns whether to look again soon (it stopped after a few looks).
    fn release_budget_holds(&mut self) -> bool {
        // A connection released late in a pass may bring the total under
        // the budget for one kept earlier: look again (each look needs
        // memory given back since the one before; a few per turn).
        for _ in 0..4 {
            let conns = self.endpoints.len();
            // Nothing to look at unless memory was given back (or a
            // connection opened or closed, which changes every share)
            // since the last look.
            let Some(held) = self.budget.take_held(conns) else {
                return false;
            };
            self.look_at_budget_holds(held, conns);
        }
        self.budget.may_release()
    }

    fn look_at_budget_holds(&mut self, held: Vec<usize>, conns: usize) {
        for token in held {
            // A token whose connection closed may belong to a new one now.
            let Some(Endpoint::Conn(c)) = self.endpoints.get_mut(token) else {
                continue;
            };
            if !c.state.budget_held() {
                continue;
            }
            let memory = c.state.memory();
            self.budget.recharge(&mut c.charged, memory);
            if self.budget.may_grow(c.charged, conns) {
                c.state.set_budget_hold(false);
                self.read(token);
            } else {
                self.budget.hold(token);
            }
        }
    }

    /// The worker queue has room again: hand over stalled requests and read on.
    fn resume(&mut self) {
        let paused = std::mem::take(&mut self.paused);
        let mut rest = paused.into_iter();
        for token in rest.by_ref() {
            let Some(Endpoint::Conn(c)) = self.endpoints.get_mut(token) else {
                continue;
            };
            if let Some(job) = c.stalled.take() {
                let n = job.len();
                if let Err(rest) = self.shared.workers.push_request(job) {
                    c.state.dispatched(n - rest.len());
                    c.stalled = Some(rest);
                    self.paused.push(token);
                    break;
                }
                c.state.dispatched(n);
            }
            c.state.workers_free();
            self.read(token);
        }
        self.paused.extend(rest);
        self.shared.workers.notify();
    }

    /// Writes the connection's queued frames until `WouldBlock`, then lets
    /// its state machine say whether it is done.
    ///
    /// Output beyond `max_outbound` unwritten bytes stays in the
    /// connection's shared queue (where clients then get `QueueFull`) and
    /// a server stops reading from the peer, so a peer that sends requests
    /// but never reads replies cannot grow our memory.
    fn write(&mut self, token: usize) {
        // Replies about to go out are counted first: a peer never sees a
        // reply its request is not counted for.
        self.shared.metrics.server.flush_deferred();
        let Some(Endpoint::Conn(c)) = self.endpoints.get_mut(token) else {
            return;
        };
        let was_full = c.state.output_full();
        let was_backlogged = c.state.backlogged();
        let failed = 'outer: loop {
            // Only when something was asked to be flushed: frames queued
            // without a flush request are taken by `end_batch` or
            // `set_draining` instead.
            if c.state.wants_output() && c.conn.flush_pending() {
                let answered = c.conn.take_output(c.state.out());
                c.state.set_answered(answered);
            }
            if c.state.phase() == Phase::Connecting {
                break None;
            }
            if c.state.unwritten() == 0 {
                // The stream's own bytes (TLS records, handshake messages).
                break match c.stream.flush_backlog() {
                    Err(e) if e.kind() != io::ErrorKind::WouldBlock => Some(e),
                    _ => None,
                };
            }
            while c.state.unwritten() > 0 {
                let written = {
                    let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                    let n = c.state.out().io_slices(&mut slices);
                    c.stream.write_vectored(&slices[..n])
                };
                match written {
                    Ok(0) => break 'outer Some(io::Error::from(io::ErrorKind::WriteZero)),
                    Ok(n) => {
                        c.state.wrote(n);
                        self.shared.stats.bytes_out(n as u64);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 'outer None,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break 'outer Some(e),
                }
            }
        };
        if let Some(e) = failed {
            tracing::debug!(peer = %c.conn.peer(), error = %e, "write failed");
            self.close(token, Error::from(e));
            return;
        }
        let memory = c.state.memory();
        self.budget.recharge(&mut c.charged, memory);
        if let Some(reason) = c.state.poll_close().filter(|_| !c.stream.has_backlog()) {
            tracing::debug!(peer = %c.conn.peer(), ?reason, "connection done");
            self.close_because(token, event_reason(reason), close_error(reason));
            return;
        }
        if !was_full && c.state.output_full() {
            tracing::debug!(peer = %c.conn.peer(), unwritten = c.state.unwritten(), "peer is not reading; pausing its input");
        }
        if (was_backlogged && !c.state.backlogged()) || (was_full && !c.state.output_full()) {
            // Decoding (and reading) stopped short: no edge will come, and a
            // draining connection may still hold whole requests. (Still
            // stopped for requests in flight, the read then registers to
            // hear of their answers.)
            self.again.push(token);
        }
    }

    /// Closes a connection: deregisters it and fails its pending requests.
    fn close(&mut self, token: usize, error: Error) {
        self.close_because(token, error_reason(&error), error);
    }

    /// [`close`](Self::close), telling the close hook `reason`.
    fn close_because(&mut self, token: usize, reason: EventReason, error: Error) {
        if !matches!(self.endpoints.get(token), Some(Endpoint::Conn(_))) {
            return;
        }
        let Endpoint::Conn(mut c) = self.endpoints.remove(token) else {
            unreachable!("checked above");
        };
        c.stream.deregister(self.poll.registry());
        c.conn.set_token(NO_TOKEN);
        self.budget.recharge(&mut c.charged, 0);
        if let Some(listener) = c.listener {
            self.accepted = self.accepted.saturating_sub(1);
            if let Some(Endpoint::Listener(l)) = self.endpoints.get_mut(listener) {
                l.open = l.open.saturating_sub(1);
            }
        }
        let timer = c.timer.take().and_then(|key| self.shared.timer.remove(key));
        drop(timer);
        tracing::debug!(peer = %c.conn.peer(), side = ?c.state.side(), reason = %error, "connection closed");
        drop(c.conn.close(error));
        self.shared.stats.connection_closed();
        if c.announced {
            if let Some(events) = c.conn.events() {
                let kind = ConnectionEvent::Closed(reason);
                self.shared
                    .events
                    .emit(events.clone(), c.conn.clone(), kind);
            }
        }
    }

    /// Stops listening, fails client requests with `Shutdown`, flushes
    /// server replies for up to the grace period, then closes everything.
    fn shut_down(&mut self) {
        let listeners: Vec<usize> = (self.endpoints.iter())
            .filter(|(_, e)| matches!(e, Endpoint::Listener(_)))
            .map(|(token, _)| token)
            .collect();
        for token in listeners {
            if let Endpoint::Listener(mut l) = self.endpoints.remove(token) {
                let _ = self.poll.registry().deregister(&mut l.socket);
            }
        }
        for (_, endpoint) in self.endpoints.iter() {
            if let Endpoint::Conn(c) = endpoint {
                if c.state.side() == Side::Client {
                    drop(c.conn.close(Error::Shutdown));
                }
            }
        }

        let deadline = Instant::now() + self.shared.config.shutdown_grace;
        let mut events = Events::with_capacity(256);
        loop {
            while let Some(command) = self.shared.commands.pop() {
                self.run_command(command);
            }
            let tokens: Vec<usize> = self.endpoints.iter().map(|(t, _)| t).collect();
            for &token in &tokens {
                self.write(token);
            }
            let unflushed = (self.endpoints.iter())
                .any(|(_, e)| matches!(e, Endpoint::Conn(c) if c.state.unwritten() > 0 || c.stream.has_backlog()));
            let busy = self.shared.workers.busy() > 0;
            let now = Instant::now();
            if (!unflushed && !busy) || now >= deadline {
                break;
            }
            let wait = (deadline - now).min(Duration::from_millis(10));
            if self.poll.poll(&mut events, Some(wait)).is_err() {
                break;
            }
        }
        let tokens: Vec<usize> = self.endpoints.iter().map(|(t, _)| t).collect();
        for token in tokens {
            self.close(token, Error::Shutdown);
        }
    }
}

/// Shows a sniffing connection's first `len` bytes to its listener's
/// sniffer and moves the state machine on as it says.
fn sniff(
    shared: &Shared,
    refusals: &mut RefusalLog,
    c: &mut IoConn,
    len: usize,
) -> Result<(), Error> {
    let Some(sniffer) = c.service.as_ref().and_then(|s| s.sniffer.clone()) else {
        c.state.frames_confirmed();
        return Ok(());
    };
    let stats = || {
        let mut stats = shared.stats.snapshot();
        stats.worker_queue = shared.workers.queued_requests() as u64;
        stats
    };
    let context = SniffContext {
        peer: c.conn.peer(),
        stats: &stats,
        uptime: shared.epoch.elapsed(),
        metrics: &shared.metrics,
    };
    let first = c.state.first_bytes().map_or(&[][..], |b| &b[..len]);
    match sniffer.sniff(first, &context) {
        Sniffed::NeedMore => Ok(()),
        Sniffed::Frames => {
            c.state.frames_confirmed();
            Ok(())
        }
        Sniffed::Respond(response) => {
            c.state.respond_and_close(response);
            Ok(())
        }
        Sniffed::Reject(reason) => {
            tracing::warn!(peer = %c.conn.peer(), reason, "closing connection: bad first bytes");
            Err(Error::MalformedFrame(FrameError::Malformed(reason)))
        }
        Sniffed::Refuse(reason) => {
            shared.stats.status_refused();
            refusals.refused(c.conn.peer(), reason);
            Err(Error::Disconnected)
        }
    }
}

/// Decodes a client connection's responses into `responses`.
fn decode_responses(
    shared: &Shared,
    c: &mut IoConn,
    responses: &mut Vec<Packet>,
) -> Result<(), Error> {
    loop {
        match c.state.next_frame(c.conn.codec()) {
            Ok(Some(packet)) => responses.push(packet),
            Ok(None) => return Ok(()),
            Err(e) => {
                shared.stats.bad_frame();
                tracing::warn!(peer = %c.conn.peer(), reason = %e, "closing connection: bad frame");
                return Err(Error::from(e));
            }
        }
    }
}

/// One pass over a server connection's buffered requests: the context
/// passed down the decode, from the first request to the last.
///
/// With inline dispatch, replies made while it runs (by the handlers on
/// this thread, or any thread they hand a responder to) join the
/// connection's queue without a flush request each; the IO thread takes
/// them when the pass ends. Worker replies ask for flushes as usual.
struct RequestBatch<'a> {
    shared: &'a Shared,
    paused: &'a mut Vec<usize>,
    /// Requests held back for the end of the pass: those of services that
    /// take batches, and those of ordered connections.
    gathered: &'a mut Vec<(Packet, ReplyTo)>,
    /// The IO loop's flag: set when this pass queued jobs.
    wake_workers: &'a mut bool,
    token: usize,
    /// Handlers run inline: their replies join the connection's queue
    /// without a flush request each (worker replies come at their own pace
    /// and ask for flushes as usual).
    inline: bool,
    decoded: usize,
    queued_jobs: bool,
    /// The pass stopped at the in-flight limit.
    out_of_room: bool,
}

impl RequestBatch<'_> {
    fn begin(&self, c: &IoConn) {
        if self.inline {
            c.conn.begin_batch();
        }
    }

    /// Takes the replies made so far into the state machine's queue, with
    /// the count of answered requests they cover.
    fn end(&self, c: &mut IoConn) {
        let answered = if self.inline {
            c.conn.end_batch(c.state.out())
        } else {
            c.conn.take_output(c.state.out())
        };
        c.state.set_answered(answered);
    }

    fn decode(&mut self, c: &mut IoConn) -> Result<(), Error> {
        // Lent out of the connection for the pass rather than cloned: no
        // refcount traffic per pass.
        let Some(service) = c.service.take() else {
            return Ok(());
        };
        let result = self.decode_with(c, &service);
        // Requests decoded before a bad frame are handled all the same.
        self.hand_over_gathered(c, &service);
        c.service = Some(service);
        result
    }

    /// Hands the requests gathered in this pass to the handler: as one
    /// batch (inline or on a worker), or to the connection's strand.
    fn hand_over_gathered(&mut self, c: &mut IoConn, service: &Service) {
        if self.gathered.is_empty() {
            return;
        }
        let n = self.gathered.len();
        match service.dispatch {
            Dispatch::IoThread => {
                c.state.dispatched(n);
                let spare = self.shared.workers.spare_vec();
                handle_inline_batch(
                    service.handler.as_ref(),
                    std::mem::replace(self.gathered, spare),
                );
            }
            Dispatch::Workers => {
                let handler = service.handler.clone();
                let job = if service.batches {
                    Job::Batch {
                        handler,
                        requests: std::mem::replace(self.gathered, self.shared.workers.spare_vec()),
                    }
                } else if n == 1 {
                    let (request, reply) = self.gathered.pop().expect("one request");
                    Job::One {
                        handler,
                        request,
                        reply,
                    }
                } else {
                    let spare = self.shared.workers.spare_vec();
                    Job::Requests {
                        handler,
                        requests: std::mem::replace(self.gathered, spare),
                    }
                };
                self.queued_jobs = true;
                match self.shared.workers.push_request(job) {
                    Ok(()) => c.state.dispatched(n),
                    Err(rest) => {
                        c.state.dispatched(n - rest.len());
                        c.stalled = Some(rest);
                        c.state.workers_full();
                        self.paused.push(self.token);
                    }
                }
            }
            Dispatch::Ordered => {
                let strand = c
                    .strand
                    .get_or_insert_with(|| {
                        Arc::new(Strand::new(service.handler.clone(), service.batches))
                    })
                    .clone();
                self.queued_jobs = true;
                c.state.dispatched(n);
                if !self.shared.workers.push_ordered(&strand, self.gathered) {
                    c.state.workers_full();
                    self.paused.push(self.token);
                }
            }
        }
    }

    fn decode_with(&mut self, c: &mut IoConn, service: &Service) -> Result<(), Error> {
        // When this pass's requests arrived, for their latency: one clock
        // read per pass, not per request.
        let received = Instant::now();
        // Once per pass, not per frame: a response can only follow the
        // request that set it, written before this pass's bytes were read.
        let outgoing = c.conn.expects_responses();
        loop {
            // Replies can be far larger than requests: every few requests,
            // gather this pass's replies so the state machine sees whether
            // the unwritten output reached its limit (it then stops
            // decoding; `read` writes, and reads on once the peer took some).
            if self.decoded % OUTPUT_CHECK_EVERY == OUTPUT_CHECK_EVERY - 1 {
                self.end(c);
                self.begin(c);
            }
            // Requests gathered for the end of the pass are in flight too.
            if self.gathered.len() as u64 >= c.state.in_flight_room() {
                self.out_of_room = true;
                return Ok(());
            }
            let packet = match c.state.next_frame(c.conn.codec()) {
                Ok(Some(packet)) => packet,
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.shared.stats.bad_frame();
                    tracing::warn!(peer = %c.conn.peer(), reason = %e, "closing connection: bad frame");
                    return Err(Error::from(e));
                }
            };
            self.decoded += 1;
            let packet = if outgoing {
                // A response to a request this server sent, or a request.
                match c.conn.take_response(packet) {
                    Ok(()) => continue,
                    Err(request) => request,
                }
            } else {
                packet
            };
            tracing::debug!(
                peer = %c.conn.peer(),
                channel_id = %packet.channel_id(),
                pcode = %packet.pcode(),
                body_len = packet.body().len(),
                "request received"
            );
            let reply = ReplyTo::new(c.conn.clone(), &packet, received);
            // Workers take a pass at a time (one queue operation), batch
            // handlers too; plain handlers on this thread run at once.
            if service.batches || service.dispatch != Dispatch::IoThread {
                self.gathered.push((packet, reply));
                continue;
            }
            c.state.dispatched(1);
            handle_inline(service.handler.as_ref(), packet, reply);
        }
    }

    fn finish(self) {
        self.shared.stats.packets_in(self.decoded);
        if self.queued_jobs {
            *self.wake_workers = true;
        }
    }
}

fn handle_inline_batch(handler: &dyn RequestHandler, requests: Vec<(Packet, ReplyTo)>) {
    let Some(peer) = requests.first().map(|(_, reply)| reply.conn().peer()) else {
        return;
    };
    if catch_unwind(AssertUnwindSafe(|| handler.handle_batch(requests))).is_err() {
        tracing::error!(%peer, "a batch handler panicked on the IO thread");
    }
}

fn handle_inline(handler: &dyn RequestHandler, request: Packet, reply: ReplyTo) {
    let peer = reply.conn().peer();
    if catch_unwind(AssertUnwindSafe(|| handler.handle_request(request, reply))).is_err() {
        tracing::error!(%peer, "a request handler panicked on the IO thread");
    }
}
