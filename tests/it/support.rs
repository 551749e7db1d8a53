//! Fixtures shared by the tests: loopback servers, hand-built tbnet frames,
//! callback recorders, and bounded waits.
//!
//! Two kinds of durations appear in the tests. *Hang guards* (`HANG_GUARD`,
//! `WAIT_LIMIT`) are long: they only turn a hang into a failure and never
//! pass on a healthy run, however loaded the machine. *Provoking* timeouts
//! (`SHORT_TIMEOUT`) are short: they are meant to pass, to produce
//! `Error::Timeout`.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tbnet::{Backoff, Error, Packet, Responder, Transport};

/// The longest a test waits for something that should happen at once.
pub const HANG_GUARD: Duration = Duration::from_secs(30);

/// The longest [`wait_until`] polls a condition in these tests.
pub const WAIT_LIMIT: Duration = Duration::from_secs(20);

/// A request timeout that never passes during a test.
pub const NEVER: Duration = Duration::from_secs(300);

/// A request timeout meant to pass: provokes `Error::Timeout`.
pub const SHORT_TIMEOUT: Duration = Duration::from_millis(200);

/// tbnet's default frame flag, ASCII "AnEt", spelled out independently of
/// the crate's constant.
pub const FLAG: u32 = 0x416E_4574;

/// The address every server binds: loopback, port chosen by the OS.
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A loopback port held for one test: connecting to it is refused while no
/// server listens on it, and servers may listen on it, stop, and listen on it
/// again.
///
/// It is a socket bound with `SO_REUSEADDR` that never listens. While it
/// lives the OS hands the port to nobody else (binding port 0 skips bound
/// ports), yet a listener that also sets `SO_REUSEADDR`, as mio's (so
/// `Transport::listen`'s) and std's do on Unix, may bind it too: Linux
/// refuses to share a port only with a socket that listens on it. Releasing
/// a port and binding it again later instead would race with parallel tests
/// that get it from the OS meanwhile.
pub struct ReservedPort {
    addr: SocketAddr,
    _socket: socket2::Socket,
}

impl ReservedPort {
    /// The reserved address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Reserves a loopback port chosen by the OS for as long as the result lives.
pub fn reserve_port() -> ReservedPort {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .expect("a socket to reserve a port");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket
        .bind(&loopback().into())
        .expect("bind a reserved port");
    let addr = (socket.local_addr().ok())
        .and_then(|addr| addr.as_socket())
        .expect("the reserved address");
    ReservedPort {
        addr,
        _socket: socket,
    }
}

/// Polls `condition` every few milliseconds until it holds (true) or `limit`
/// passes (false).
pub fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Runs `f` on its own thread and returns its result; panics if it takes
/// longer than [`HANG_GUARD`], and re-raises its panic if it panics.
pub fn within<T, F>(what: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (done, finished) = mpsc::channel();
    let handle = thread::spawn(move || {
        let _ = done.send(f());
    });
    match finished.recv_timeout(HANG_GUARD) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(payload) => panic::resume_unwind(payload),
            Ok(()) => unreachable!("{what} returned without sending its result"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what} still running after {HANG_GUARD:?}"),
    }
}

/// Stops `transport` under the hang guard.
pub fn stop(transport: &Transport) {
    let transport = transport.clone();
    within("Transport::stop", move || transport.stop());
}

/// A transport with a small worker pool, as every test uses.
pub fn transport() -> Transport {
    Transport::builder()
        .workers(2)
        .start()
        .expect("start a transport")
}

/// A server transport and the address it listens on.
pub struct Server {
    pub transport: Transport,
    pub addr: SocketAddr,
}

/// A server that answers every request with its own packet code and body.
pub fn echo_server() -> Server {
    echo_server_on(loopback())
}

/// An echo server listening on `addr` (a [`ReservedPort`]'s, or
/// [`loopback`]).
pub fn echo_server_on(addr: SocketAddr) -> Server {
    let transport = transport();
    let bound = transport.listen(addr, echo).expect("listen");
    if addr.port() != 0 {
        assert_eq!(bound, addr);
    }
    Server {
        transport,
        addr: bound,
    }
}

/// A server that never replies: it keeps every request with its responder,
/// so a test can answer later, in any order, or never.
pub struct SilentServer {
    pub transport: Transport,
    pub addr: SocketAddr,
    held: Arc<Mutex<Held>>,
}

/// What a [`SilentServer`] received, counted and kept under one lock, so a
/// count never runs ahead of the requests it counts.
#[derive(Default)]
struct Held {
    requests: Vec<(Packet, Responder)>,
    received: usize,
}

impl SilentServer {
    pub fn start() -> Self {
        Self::start_on(loopback())
    }

    /// A silent server listening on `addr` (a [`ReservedPort`]'s, or
    /// [`loopback`]).
    pub fn start_on(addr: SocketAddr) -> Self {
        let transport = transport();
        let held = Arc::new(Mutex::new(Held::default()));
        let bound = {
            let held = held.clone();
            transport
                .listen(addr, move |request: Packet, responder: Responder| {
                    let mut held = held.lock().unwrap();
                    held.requests.push((request, responder));
                    held.received += 1;
                })
                .expect("listen")
        };
        if addr.port() != 0 {
            assert_eq!(bound, addr);
        }
        SilentServer {
            transport,
            addr: bound,
            held,
        }
    }

    /// Requests received so far.
    pub fn received(&self) -> usize {
        self.held.lock().unwrap().received
    }

    /// Waits until `n` requests arrived; fails the test if they do not.
    pub fn wait_received(&self, n: usize) {
        assert!(
            wait_until(WAIT_LIMIT, || self.received() >= n),
            "the server received {} of {n} requests",
            self.received()
        );
    }

    /// Takes the requests held so far, in arrival order.
    pub fn take(&self) -> Vec<(Packet, Responder)> {
        std::mem::take(&mut self.held.lock().unwrap().requests)
    }
}

/// Answers `request` with its own packet code and body (a reply for a
/// connection that closed meanwhile is dropped).
pub fn echo(request: Packet, responder: Responder) {
    let _ = responder.reply(request.reply(request.body().clone()));
}

/// Counts and keeps the outcomes delivered to callbacks, one slot per
/// request.
pub struct Recorder {
    slots: Mutex<Slots>,
    changed: Condvar,
}

/// Per slot, how many times its callback ran and the last outcome. One lock
/// covers both, so a count is never seen without its outcome.
struct Slots {
    calls: Vec<usize>,
    results: Vec<Option<Result<Packet, Error>>>,
}

impl Recorder {
    pub fn new(requests: usize) -> Arc<Self> {
        Arc::new(Recorder {
            slots: Mutex::new(Slots {
                calls: vec![0; requests],
                results: vec![None; requests],
            }),
            changed: Condvar::new(),
        })
    }

    /// A callback that records its outcome in slot `index`.
    pub fn handler(self: &Arc<Self>, index: usize) -> impl FnOnce(Result<Packet, Error>) + Send {
        let recorder = self.clone();
        move |result| {
            let mut slots = recorder.slots.lock().unwrap();
            slots.calls[index] += 1;
            slots.results[index] = Some(result);
            drop(slots);
            recorder.changed.notify_all();
        }
    }

    /// How many times each slot's callback ran.
    pub fn calls(&self) -> Vec<usize> {
        self.slots.lock().unwrap().calls.clone()
    }

    /// How many callbacks ran, in all.
    pub fn total_calls(&self) -> usize {
        self.slots.lock().unwrap().calls.iter().sum()
    }

    /// Waits until `condition` holds for the call counts (true) or
    /// [`WAIT_LIMIT`] passes (false).
    pub fn wait_calls(&self, mut condition: impl FnMut(&[usize]) -> bool) -> bool {
        let deadline = Instant::now() + WAIT_LIMIT;
        let mut slots = self.slots.lock().unwrap();
        loop {
            if condition(&slots.calls) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            slots = self.changed.wait_timeout(slots, deadline - now).unwrap().0;
        }
    }

    /// Waits until every callback ran; fails the test if one does not.
    pub fn wait_all_called(&self) {
        assert!(
            self.wait_calls(|calls| calls.iter().all(|&n| n > 0)),
            "callbacks ran {:?} times",
            self.calls()
        );
    }

    /// The recorded outcomes of the first `n` slots.
    pub fn results_of(&self, n: usize) -> Vec<Result<Packet, Error>> {
        let slots = self.slots.lock().unwrap();
        (slots.results[..n].iter())
            .map(|r| r.clone().expect("every callback ran"))
            .collect()
    }

    /// The recorded outcomes, by slot.
    pub fn results(&self) -> Vec<Result<Packet, Error>> {
        let n = self.slots.lock().unwrap().results.len();
        self.results_of(n)
    }
}

/// A latch a server handler can block on until the test opens it.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    pub fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }

    /// Blocks until the gate is open.
    pub fn pass(&self) {
        let mut open = self.0 .0.lock().unwrap();
        while !*open {
            open = self.0 .1.wait(open).unwrap();
        }
    }
}

/// Listens on `transport` with an echo handler whose requests of packet
/// code 1 first wait for `gate` (a handler that blocks).
pub fn listen_echo_gated(transport: &Transport, gate: &Gate) -> SocketAddr {
    let gate = gate.clone();
    transport
        .listen(loopback(), move |request: Packet, responder: Responder| {
            if request.pcode().get() == 1 {
                gate.pass();
            }
            echo(request, responder);
        })
        .expect("listen")
}

/// One frame as it travels on the wire, parsed by hand from `WIRE.md`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawFrame {
    pub flag: u32,
    pub chid: u32,
    pub pcode: i32,
    pub body: Vec<u8>,
}

/// A 16-byte tbnet header: flag, chid, pcode, dataLen, all big-endian.
pub fn header(flag: u32, chid: u32, pcode: i32, len: i32) -> [u8; 16] {
    let mut bytes = [0; 16];
    bytes[0..4].copy_from_slice(&flag.to_be_bytes());
    bytes[4..8].copy_from_slice(&chid.to_be_bytes());
    bytes[8..12].copy_from_slice(&pcode.to_be_bytes());
    bytes[12..16].copy_from_slice(&len.to_be_bytes());
    bytes
}

/// A whole frame with the default flag.
pub fn frame(chid: u32, pcode: i32, body: &[u8]) -> Vec<u8> {
    let len = i32::try_from(body.len()).expect("test bodies are small");
    let mut bytes = header(FLAG, chid, pcode, len).to_vec();
    bytes.extend_from_slice(body);
    bytes
}

/// Reads one frame (the announced length is trusted: the peer is ours).
pub fn read_frame(stream: &mut impl Read) -> io::Result<RawFrame> {
    let mut header = [0; 16];
    stream.read_exact(&mut header)?;
    let field = |i: usize| [header[i], header[i + 1], header[i + 2], header[i + 3]];
    let len = i32::from_be_bytes(field(12));
    let len = usize::try_from(len).expect("a non-negative length");
    let mut body = vec![0; len];
    stream.read_exact(&mut body)?;
    Ok(RawFrame {
        flag: u32::from_be_bytes(field(0)),
        chid: u32::from_be_bytes(field(4)),
        pcode: i32::from_be_bytes(field(8)),
        body,
    })
}

/// A plain `std::net` server for one connection: `serve` runs on its own
/// thread with the accepted stream (reads time out after [`HANG_GUARD`]).
pub fn raw_server<T, F>(serve: F) -> (SocketAddr, JoinHandle<T>)
where
    T: Send + 'static,
    F: FnOnce(TcpStream) -> T + Send + 'static,
{
    raw_server_on(loopback(), serve)
}

/// Like [`raw_server`], listening on `addr` (a [`ReservedPort`]'s, or
/// [`loopback`]); the listener closes when `serve` returns.
pub fn raw_server_on<T, F>(addr: SocketAddr, serve: F) -> (SocketAddr, JoinHandle<T>)
where
    T: Send + 'static,
    F: FnOnce(TcpStream) -> T + Send + 'static,
{
    let listener = TcpListener::bind(addr).expect("bind a raw server");
    let addr = listener.local_addr().expect("raw server address");
    let handle = thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(HANG_GUARD)).unwrap();
        serve(stream)
    });
    (addr, handle)
}

/// A plain `std::net` client connected to `addr` (reads time out after
/// [`HANG_GUARD`]).
pub fn raw_client(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect a raw client");
    stream.set_read_timeout(Some(HANG_GUARD)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Whether the peer closed `stream`: a read returns end of file or a reset
/// (rather than data, or timing out).
pub fn closed_by_peer(stream: &mut TcpStream) -> bool {
    let mut byte = [0; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
        ),
    }
}

/// Writes `bytes` and flushes.
pub fn send_bytes(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).expect("write to the peer");
    stream.flush().expect("flush");
}

/// One request each way of waiting, all pending on `client` to `addr`: a
/// callback (recorded in the returned recorder's slot 0), a future, and a
/// blocking call on its own thread.
pub fn one_request_each_way(
    client: &Arc<tbnet::ConnectionManager>,
    addr: std::net::SocketAddr,
) -> (
    Arc<Recorder>,
    tbnet::ResponseFuture,
    JoinHandle<Result<Packet, Error>>,
) {
    let recorder = Recorder::new(1);
    client
        .send(
            addr,
            Packet::new(1, "callback"),
            Some(NEVER),
            recorder.handler(0),
        )
        .expect("send");
    let future = client
        .call_async(addr, Packet::new(1, "future"), Some(NEVER))
        .expect("submit");
    let blocking = {
        let client = client.clone();
        thread::spawn(move || client.call(addr, Packet::new(1, "blocking"), Some(NEVER)))
    };
    (recorder, future, blocking)
}

/// Resident memory of this process in bytes (Linux; `None` elsewhere).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Open file descriptors of this process (Linux; 0 elsewhere).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count())
}

/// Registers `n` requests with bodies `"{prefix}-{i}"` on `wait`, waits until
/// `server` holds them all, and answers them in reverse order of arrival.
pub fn gather_reversed(
    client: &tbnet::ConnectionManager,
    server: &SilentServer,
    wait: &mut tbnet::WaitObject,
    prefix: &str,
    n: usize,
) {
    for i in 0..n {
        let index = client
            .send_wait(
                server.addr,
                Packet::new(1, format!("{prefix}-{i}")),
                Some(NEVER),
                wait,
            )
            .expect("send_wait");
        assert_eq!(index, i);
    }
    server.wait_received(n);
    let mut held = server.take();
    // By the number, not the text: "10" sorts before "2".
    held.sort_by_key(|(request, _)| {
        let body = std::str::from_utf8(request.body()).expect("a text body");
        let (_, index) = body.rsplit_once('-').expect("a body \"{prefix}-{i}\"");
        index.parse::<usize>().expect("a numeric index")
    });
    for (request, responder) in held.into_iter().rev() {
        responder
            .reply(request.reply(request.body().clone()))
            .expect("reply");
    }
}

/// A backoff under which an open connection counts as healthy at once (no
/// grace), for tests about a connection lost after it was in use, which
/// reconnects at once, rather than about early closes.
pub fn healthy_once_open() -> Backoff {
    Backoff {
        grace: Duration::ZERO,
        ..Backoff::default()
    }
}
