//! The IO thread: the only code that touches sockets.
//!
//! Each turn: run queued commands, sleep in `poll` (unless work is left over),
//! then for each event accept, finish a connect, read until `WouldBlock`
//! (decoding as it goes) or write until `WouldBlock`. Readiness is
//! edge-triggered, so every read and write loop runs until the socket says
//! `WouldBlock`, or the connection is put on a list to be continued next
//! turn: a connection that stops early for fairness or back-pressure must
//! not wait for an edge that will never come.

use std::io::{self, IoSlice, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::error::Error;
use crate::packet::Packet;
use crate::proto::{FrameDecoder, Ready, WriteQueue};
use crate::server::{Dispatch, Responder, ServerAdaptor};
use crate::status::{self, Sniff};

use super::inline;
use crate::sync::Ordering;

use super::conn::{Conn, Side, NO_TOKEN};
use super::workers::Job;
use super::{Command, Shared};

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

// Nearly every endpoint is a connection: boxing it would only add an
// indirection per event.
#[allow(clippy::large_enum_variant)]
enum Endpoint {
    Listener(IoListener),
    Conn(IoConn),
}

struct IoListener {
    socket: TcpListener,
    adaptor: Arc<dyn ServerAdaptor>,
    dispatch: Dispatch,
    /// The last accept failed for lack of resources (logged once).
    failing: bool,
}

struct IoConn {
    socket: TcpStream,
    conn: Arc<Conn>,
    decoder: FrameDecoder,
    out: WriteQueue,
    connecting: bool,
    /// Server connections: where requests go.
    server: Option<(Arc<dyn ServerAdaptor>, Dispatch)>,
    /// A request the full worker queue could not take yet.
    stalled: Option<Job>,
    /// Reading paused until the worker queue has room.
    paused: bool,
    /// Reading paused until the peer takes some of our unwritten output.
    out_blocked: bool,
    /// Server connections with the status page on: frames or HTTP decided.
    sniffed: bool,
    /// An HTTP response is queued: close once it is written.
    close_when_flushed: bool,
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
    readies: Vec<Ready>,
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
        readies: Vec::new(),
    };
    let mut events = Events::with_capacity(1024);
    loop {
        if io.run_commands() {
            break;
        }
        let timeout = if !io.again.is_empty() {
            Some(Duration::ZERO)
        } else if !io.accept_retry.is_empty() {
            Some(ACCEPT_RETRY)
        } else {
            None
        };
        // Announce the sleep, then look once more: a command queued after
        // this point finds the flag clear and wakes us.
        shared.io_awake.store(false, Ordering::SeqCst);
        if !shared.commands.is_empty() {
            shared.io_awake.store(true, Ordering::SeqCst);
            continue;
        }
        let polled = io.poll.poll(&mut events, timeout);
        shared.io_awake.store(true, Ordering::SeqCst);
        if let Err(e) = polled {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "poll failed; shutting the transport's IO down");
            break;
        }
        for event in events.iter() {
            io.handle_event(event);
        }
        for token in std::mem::take(&mut io.again) {
            io.read(token);
        }
        for token in std::mem::take(&mut io.accept_retry) {
            io.accept(token);
        }
    }
    io.shut_down();
    shared.io_exited.store(true, Ordering::SeqCst);
    shared.fail_commands();
}

impl IoLoop {
    /// Runs every queued command; true on `Shutdown`.
    fn run_commands(&mut self) -> bool {
        while let Some(command) = self.shared.commands.pop() {
            match command {
                Command::Listen(socket, adaptor, dispatch) => {
                    self.add_listener(socket, adaptor, dispatch)
                }
                Command::Connect(conn) => self.connect(conn),
                Command::Flush(conn) => {
                    if let Some(token) = self.token_of(&conn) {
                        self.write(token);
                    }
                }
                Command::Close(conn, error) => match self.token_of(&conn) {
                    Some(token) => self.close(token, error),
                    // Not connected yet (or never to be): end it all the same.
                    None => self.fail_conn(&conn, error),
                },
                Command::ConnectTimedOut(conn) => {
                    if let Some(token) = self.token_of(&conn) {
                        if self.conn_mut(token).is_some_and(|c| c.connecting) {
                            tracing::warn!(peer = %conn.peer(), "connect timed out");
                            self.close(token, Error::Timeout);
                        }
                    }
                }
                Command::IdleCheck(conn) => self.check_idle(conn),
                Command::ResumeReading => self.resume(),
                Command::Shutdown => return true,
            }
        }
        false
    }

    /// Closes `conn` if its peer has been silent for the idle timeout, or
    /// schedules the next look.
    fn check_idle(&mut self, conn: Arc<Conn>) {
        let (Some(token), Some(limit)) = (self.token_of(&conn), self.shared.config.idle_timeout)
        else {
            return;
        };
        let due = conn.last_active() + limit;
        if due <= Instant::now() {
            tracing::info!(peer = %conn.peer(), "closing idle connection");
            self.close(token, Error::Timeout);
        } else {
            conn.arm_idle(due);
        }
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

    fn add_listener(
        &mut self,
        mut socket: TcpListener,
        adaptor: Arc<dyn ServerAdaptor>,
        dispatch: Dispatch,
    ) {
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
            adaptor,
            dispatch,
            failing: false,
        }));
        // Connections may have queued before registration.
        self.accept(token.0);
    }

    fn connect(&mut self, conn: Arc<Conn>) {
        if conn.is_closed() {
            return;
        }
        let peer = conn.peer();
        let socket = match TcpStream::connect(peer) {
            Ok(socket) => socket,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "connect failed");
                self.fail_conn(&conn, Error::from(e));
                return;
            }
        };
        let deadline = Instant::now() + self.shared.config.connect_timeout;
        if self.insert_conn(socket, conn.clone(), None, true).is_some() {
            self.shared.timer.register_connect(deadline, conn);
        }
    }

    /// Registers a socket; on failure closes `conn`.
    fn insert_conn(
        &mut self,
        mut socket: TcpStream,
        conn: Arc<Conn>,
        server: Option<(Arc<dyn ServerAdaptor>, Dispatch)>,
        connecting: bool,
    ) -> Option<usize> {
        let entry = self.endpoints.vacant_entry();
        let token = entry.key();
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut socket, Token(token), interest)
        {
            tracing::warn!(peer = %conn.peer(), error = %e, "could not register a connection");
            self.fail_conn(&conn, Error::from(e));
            return None;
        }
        if !connecting {
            let _ = socket.set_nodelay(true);
        }
        if let Some(idle) = self.shared.config.tcp_keepalive {
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(idle);
            if let Err(e) = socket2::SockRef::from(&socket).set_tcp_keepalive(&keepalive) {
                tracing::debug!(peer = %conn.peer(), error = %e, "could not enable TCP keepalive");
            }
        }
        if let (Some(_), Some(idle)) = (&server, self.shared.config.idle_timeout) {
            conn.touch();
            conn.arm_idle(Instant::now() + idle);
        }
        conn.set_token(token);
        entry.insert(Endpoint::Conn(IoConn {
            socket,
            conn,
            decoder: FrameDecoder::with_read_chunk(self.shared.config.read_chunk),
            out: WriteQueue::new(),
            connecting,
            server,
            stalled: None,
            paused: false,
            out_blocked: false,
            sniffed: !self.shared.config.status_page,
            close_when_flushed: false,
        }));
        self.shared.stats.connection_opened();
        Some(token)
    }

    fn fail_conn(&mut self, conn: &Conn, error: Error) {
        conn.close(error, &mut self.readies);
        self.deliver();
    }

    fn deliver(&mut self) {
        for ready in self.readies.drain(..) {
            self.shared.deliver(ready);
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
                if c.connecting {
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
                    let server = Some((listener.adaptor.clone(), listener.dispatch));
                    let conn = Arc::new(Conn::new(self.shared.clone(), peer, Side::Server, 1));
                    tracing::debug!(%peer, "accepted");
                    self.insert_conn(socket, conn, server, false);
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
                    // retry after a pause instead of waiting for one.
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
        let Some(c) = self.conn_mut(token) else {
            return;
        };
        let result = match c.socket.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match c.socket.peer_addr() {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(false) => {} // still in progress; a later event finishes it
            Ok(true) => {
                c.connecting = false;
                let _ = c.socket.set_nodelay(true);
                c.conn.mark_open();
                tracing::debug!(peer = %c.conn.peer(), "connected");
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
        // Replies produced on this thread while decoding leave now rather
        // than after every other ready connection was read: with a fixed
        // number of requests in flight, latency is throughput.
        if let Some(c) = self.conn_mut(token) {
            if c.conn.flush_pending() || !c.out.is_empty() || c.close_when_flushed {
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
            let Some(c) = self.conn_mut(token) else {
                return;
            };
            // Only a server stops reading for unwritten output: a client reading
            // responses frees memory, and pausing both ends of one connection
            // would deadlock them. Clients are bounded by `QueueFull` instead.
            let out_paused = c.out_blocked && c.server.is_some();
            if c.paused || out_paused || c.connecting || c.close_when_flushed {
                return;
            }
            if reads == READS_PER_TURN {
                self.again.push(token);
                return;
            }
            if !written && c.server.is_some() && (c.conn.flush_pending() || !c.out.is_empty()) {
                // Answer what was read before reading more: this is also
                // where a peer that does not read is noticed.
                written = true;
                self.write(token);
                continue;
            }
            reads += 1;
            match c.decoder.read_from(&mut c.socket) {
                Ok(0) => {
                    tracing::debug!(peer = %c.conn.peer(), "peer closed the connection");
                    self.close(token, Error::Disconnected);
                    return;
                }
                Ok(n) => {
                    c.conn.touch();
                    self.shared.stats.bytes_in(n as u64);
                    written = false;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.decoder.release_if_idle();
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(peer = %c.conn.peer(), error = %e, "read failed");
                    self.close(token, Error::from(e));
                    return;
                }
            }
        }
    }

    /// Takes every whole packet out of the connection's buffer: responses
    /// complete their requests, requests go to the adaptor.
    fn decode(&mut self, token: usize) -> Result<(), Error> {
        let IoLoop {
            shared,
            endpoints,
            paused,
            responses,
            readies,
            ..
        } = self;
        let Some(Endpoint::Conn(c)) = endpoints.get_mut(token) else {
            return Ok(());
        };
        if c.close_when_flushed || c.decoder.buffered() == 0 {
            // Nothing to decode, or the status page answered and this
            // connection reads nothing more.
            return Ok(());
        }
        if !c.sniffed && c.server.is_some() {
            match status::sniff(c.decoder.buffered_bytes()) {
                Sniff::Unsure => return Ok(()),
                Sniff::Frames => c.sniffed = true,
                Sniff::Http => return serve_http(shared, c),
            }
        }
        let mut decoded = 0;
        let mut queued_jobs = false;
        let max_outbound = shared.config.max_outbound;
        // Replies made inline go straight into the write queue (see `inline`).
        let lend = matches!(c.server, Some((_, Dispatch::IoThread)));
        let frames_before = c.out.frames();
        if lend {
            inline::begin(&c.conn, std::mem::take(&mut c.out));
        }
        let result = loop {
            // (Only servers pause for output: see `read_until_blocked`.)
            if c.paused || (c.out_blocked && c.server.is_some()) {
                break Ok(());
            }
            // Replies can be far larger than requests: every few requests,
            // stop if this connection's unwritten output reached its limit
            // (`read` then writes, and reads on only once the peer took some).
            if c.server.is_some()
                && decoded % OUTPUT_CHECK_EVERY == OUTPUT_CHECK_EVERY - 1
                && c.out.len() + inline::len() + c.conn.queued_len() >= max_outbound
            {
                c.out_blocked = true;
                break Ok(());
            }
            let packet = match c.decoder.next_packet(&*shared.streamer) {
                Ok(Some(packet)) => packet,
                Ok(None) => break Ok(()),
                Err(e) => {
                    shared.stats.bad_frame();
                    tracing::warn!(peer = %c.conn.peer(), reason = %e, "closing connection: bad frame");
                    break Err(Error::from(e));
                }
            };
            decoded += 1;
            match &c.server {
                None => responses.push(packet),
                Some((adaptor, dispatch)) => {
                    tracing::debug!(
                        peer = %c.conn.peer(),
                        channel_id = %packet.channel_id(),
                        pcode = %packet.pcode(),
                        body_len = packet.body().len(),
                        "request received"
                    );
                    let responder = Responder::new(c.conn.clone(), packet.channel_id());
                    match dispatch {
                        Dispatch::IoThread => handle_inline(adaptor.as_ref(), packet, responder),
                        Dispatch::Workers => {
                            let job = Job {
                                adaptor: adaptor.clone(),
                                request: packet,
                                responder,
                            };
                            queued_jobs = true;
                            if let Err(job) = shared.workers.push_request(job) {
                                c.stalled = Some(job);
                                c.paused = true;
                                paused.push(token);
                            }
                        }
                    }
                }
            }
        };
        if lend {
            c.out = inline::end();
            shared.stats.packets_out(c.out.frames() - frames_before);
        }
        shared.stats.packets_in(decoded);
        if queued_jobs {
            shared.workers.notify();
        }
        if !responses.is_empty() {
            c.conn.complete_responses(responses, readies);
            for ready in readies.drain(..) {
                shared.deliver(ready);
            }
        }
        result
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
                if let Err(job) = self.shared.workers.push_request(job) {
                    c.stalled = Some(job);
                    self.paused.push(token);
                    break;
                }
            }
            c.paused = false;
            self.read(token);
        }
        self.paused.extend(rest);
        self.shared.workers.notify();
    }

    /// Writes the connection's queued frames until `WouldBlock`.
    ///
    /// Output beyond `max_outbound` unwritten bytes stays in the
    /// connection's shared queue (where clients then get `QueueFull`) and
    /// reading from the peer pauses, so a peer that sends requests but never
    /// reads replies cannot grow our memory.
    fn write(&mut self, token: usize) {
        let max_outbound = self.shared.config.max_outbound;
        let Some(Endpoint::Conn(c)) = self.endpoints.get_mut(token) else {
            return;
        };
        let failed = 'outer: loop {
            if c.out.len() < max_outbound {
                c.conn.take_output(&mut c.out);
            }
            if c.connecting || c.out.is_empty() {
                break None;
            }
            while !c.out.is_empty() {
                let written = {
                    let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                    let n = c.out.io_slices(&mut slices);
                    c.socket.write_vectored(&slices[..n])
                };
                match written {
                    Ok(0) => break 'outer Some(io::Error::from(io::ErrorKind::WriteZero)),
                    Ok(n) => {
                        c.out.advance(n);
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
        if c.close_when_flushed && c.out.is_empty() {
            self.close(token, Error::Disconnected);
            return;
        }
        let blocked = c.out.len() >= max_outbound;
        if blocked != c.out_blocked {
            c.out_blocked = blocked;
            if blocked && c.server.is_some() {
                tracing::debug!(peer = %c.conn.peer(), unwritten = c.out.len(), "peer is not reading; pausing its input");
            } else if c.server.is_some() {
                // Reading stopped short of `WouldBlock`: no edge will come.
                self.again.push(token);
            }
        }
    }

    /// Closes a connection: deregisters it and fails its pending requests.
    fn close(&mut self, token: usize, error: Error) {
        if !matches!(self.endpoints.get(token), Some(Endpoint::Conn(_))) {
            return;
        }
        let Endpoint::Conn(mut c) = self.endpoints.remove(token) else {
            unreachable!("checked above");
        };
        let _ = self.poll.registry().deregister(&mut c.socket);
        c.conn.set_token(NO_TOKEN);
        tracing::debug!(peer = %c.conn.peer(), side = ?c.conn.side(), reason = %error, "connection closed");
        c.conn.close(error, &mut self.readies);
        self.shared.stats.connection_closed();
        drop(c);
        self.deliver();
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
                if c.conn.side() == Side::Client {
                    c.conn.close(Error::Shutdown, &mut self.readies);
                }
            }
        }
        self.deliver();

        let deadline = Instant::now() + self.shared.config.shutdown_grace;
        let mut events = Events::with_capacity(256);
        loop {
            while let Some(command) = self.shared.commands.pop() {
                match command {
                    Command::Flush(conn) => {
                        if let Some(token) = self.token_of(&conn) {
                            self.write(token);
                        }
                    }
                    Command::Connect(conn) | Command::Close(conn, _) => {
                        self.fail_conn(&conn, Error::Shutdown);
                    }
                    Command::ConnectTimedOut(_) | Command::IdleCheck(_) => {}
                    Command::Listen(..) | Command::ResumeReading | Command::Shutdown => {}
                }
            }
            let tokens: Vec<usize> = self.endpoints.iter().map(|(t, _)| t).collect();
            for &token in &tokens {
                self.write(token);
            }
            let unflushed = self
                .endpoints
                .iter()
                .any(|(_, e)| matches!(e, Endpoint::Conn(c) if !c.out.is_empty()));
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

/// The span a server handler runs in: the request's peer, channel id and
/// packet code (debug level; free when disabled).
pub(crate) fn request_span(request: &Packet, responder: &Responder) -> tracing::Span {
    tracing::debug_span!(
        "request",
        peer = %responder.peer(),
        channel_id = %request.channel_id(),
        pcode = %request.pcode()
    )
}

/// Answers the status page's one request on this connection, once its head
/// has arrived, and stops reading it; `write` closes it once flushed.
fn serve_http(shared: &Shared, c: &mut IoConn) -> Result<(), Error> {
    match status::parse(c.decoder.buffered_bytes()) {
        Ok(None) => Ok(()),
        Ok(Some(request)) => {
            let mut stats = shared.stats.snapshot();
            stats.worker_queue = shared.workers.queued_requests() as u64;
            let response = status::respond(&request, &stats, shared.epoch.elapsed());
            tracing::debug!(peer = %c.conn.peer(), path = %request.path, "status page request");
            c.out.push_raw(response);
            c.close_when_flushed = true;
            Ok(())
        }
        Err(reason) => {
            tracing::warn!(peer = %c.conn.peer(), reason, "closing connection: bad HTTP request");
            Err(Error::Disconnected)
        }
    }
}

fn handle_inline(adaptor: &dyn ServerAdaptor, request: Packet, responder: Responder) {
    let peer = responder.peer();
    let _span = request_span(&request, &responder).entered();
    if catch_unwind(AssertUnwindSafe(|| {
        adaptor.handle_packet(request, responder)
    }))
    .is_err()
    {
        tracing::error!(%peer, "a server adaptor panicked on the IO thread");
    }
}
