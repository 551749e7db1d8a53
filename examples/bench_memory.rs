//! Memory benchmark: heap and resident memory per idle connection and per
//! pending request, and heap allocations per request on the server's
//! steady-state path.
//!
//! ```sh
//! cargo run --release --example bench_memory
//! cargo run --release --example bench_memory -- --conns 5000 --pending 1000000 --requests 200000
//! ```
//!
//! Heap figures come from dhat's counting allocator (installed as this
//! binary's global allocator), resident figures from `/proc/self/statm`.
//! Opening 5,000 connections needs about 10,500 file descriptors
//! (`ulimit -n`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use tbnet::{ConnectionManager, Dispatch, Packet, Responder, Transport};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const FLAG: u32 = 0x416E_4574;

fn resident() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

struct Mem {
    heap: u64,
    blocks: u64,
    allocations: u64,
    rss: u64,
}

fn measure() -> Mem {
    let stats = dhat::HeapStats::get();
    Mem {
        heap: stats.curr_bytes as u64,
        blocks: stats.curr_blocks as u64,
        allocations: stats.total_blocks,
        rss: resident(),
    }
}

fn frame(chid: u32, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(16 + body.len());
    f.extend_from_slice(&FLAG.to_be_bytes());
    f.extend_from_slice(&chid.to_be_bytes());
    f.extend_from_slice(&1i32.to_be_bytes());
    f.extend_from_slice(&(body.len() as i32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn echo(request: Packet, responder: Responder) {
    let _ = responder.reply(request.reply(request.body().clone()));
}

fn server(dispatch: Dispatch) -> (Transport, SocketAddr) {
    let t = Transport::builder()
        .workers(2)
        .dispatch(dispatch)
        .start()
        .expect("server transport");
    let addr = t.listen("127.0.0.1:0", echo).expect("listen");
    (t, addr)
}

/// Bytes per idle server connection: `n` raw clients connect, do one
/// request/response each (so every buffer has been used), then stay idle.
fn idle_connections(n: usize) {
    let (transport, addr) = server(Dispatch::IoThread);
    let request = frame(1, b"hello");
    let before = measure();
    let mut clients = Vec::with_capacity(n);
    let mut reply = [0u8; 21];
    for _ in 0..n {
        let mut c = TcpStream::connect(addr).expect("connect (raise ulimit -n?)");
        c.write_all(&request).unwrap();
        c.read_exact(&mut reply).unwrap();
        clients.push(c);
    }
    wait_for("connections", Duration::from_secs(60), || {
        transport.stats().connections >= n as u64
    });
    let after = measure();
    let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / n as f64;
    println!(
        "idle connection (after one request), {n} conns: heap {:.0} B/conn ({:.1} blocks), resident {:.0} B/conn \
         (server and client sockets in one process)",
        per(after.heap, before.heap),
        per(after.blocks, before.blocks),
        per(after.rss, before.rss)
    );
    drop(clients);
    transport.stop();
}

/// A raw server that reads and discards everything: requests stay pending.
fn sink() -> (SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = vec![0u8; 1 << 16];
        while !flag.load(Ordering::SeqCst) {
            // Timeouts only let the loop see the stop flag.
            if let Ok(0) = s.read(&mut buf) {
                break;
            }
        }
    });
    (addr, stop)
}

/// Bytes per pending request: `n` requests to a server that never answers.
fn pending_requests(n: usize) {
    let (addr, stop) = sink();
    let client = Transport::builder().workers(1).start().unwrap();
    let manager = ConnectionManager::new(&client).with_queue_limit(n + 1);
    // Open the connection first, so only requests are counted.
    manager.post(addr, Packet::new(0, "")).unwrap();
    wait_for("the connection", Duration::from_secs(10), || {
        client.stats().bytes_out >= 16
    });
    let before = measure();
    let body = bytes::Bytes::from_static(b"0123456789abcdef");
    for _ in 0..n {
        manager
            .send(
                addr,
                Packet::new(1, body.clone()),
                Some(Duration::from_secs(3600)),
                |_| {},
            )
            .expect("queue");
    }
    let frames = 16 + (n as u64) * (16 + 16);
    wait_for("requests written", Duration::from_secs(120), || {
        client.stats().bytes_out >= frames
    });
    let after = measure();
    let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / n as f64;
    println!(
        "pending request (callback), {n} pending: heap {:.1} B/request ({:.2} blocks), resident {:.1} B/request",
        per(after.heap, before.heap),
        per(after.blocks, before.blocks),
        per(after.rss, before.rss)
    );
    // And the post that opened the connection: it takes a channel id too,
    // held until its deadline (the sink never answers).
    assert_eq!(client.stats().pending, n as u64 + 1);
    client.stop();
    stop.store(true, Ordering::SeqCst);
}

/// Heap allocations per request on the server's steady-state path: a raw
/// pipelined client (which allocates nothing per request) drives the server.
fn allocations_per_request(dispatch: Dispatch, requests: usize, size: usize) {
    let (transport, addr) = server(dispatch);
    let depth = 32;
    let body = vec![b'x'; size];
    let one = frame(7, &body);
    let batch: Vec<u8> = one
        .iter()
        .copied()
        .cycle()
        .take(one.len() * depth)
        .collect();
    let mut reply = vec![0u8; one.len() * depth];
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    let mut round = |c: &mut TcpStream| {
        c.write_all(&batch).unwrap();
        c.read_exact(&mut reply).unwrap();
    };
    // Warm up: buffers reach their steady sizes.
    for _ in 0..200 {
        round(&mut c);
    }
    let before = measure();
    let rounds = requests / depth;
    for _ in 0..rounds {
        round(&mut c);
    }
    let after = measure();
    let n = (rounds * depth) as f64;
    println!(
        "server allocations per request ({dispatch:?}, {size} B bodies, depth {depth}): {:.3} ({} allocations for {} requests)",
        (after.allocations - before.allocations) as f64 / n,
        after.allocations - before.allocations,
        n
    );
    drop(c);
    transport.stop();
}

/// Polls `future` on this thread, parking between polls: no runtime, and
/// no allocation per call (the waker is made once per thread).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    thread_local! {
        static WAKER: Waker = Waker::from(Arc::new(Unpark(thread::current())));
    }
    let mut future = std::pin::pin!(future);
    WAKER.with(|waker| {
        let mut cx = Context::from_waker(waker);
        loop {
            if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
                return output;
            }
            thread::park();
        }
    })
}

/// Heap allocations per request on the client's steady-state path, in
/// each way of waiting: a `ConnectionManager` with `depth` requests in
/// flight against an IO-thread server in the same process (which
/// allocates next to nothing per request: see the server rows).
fn client_allocations_per_request(requests: usize) {
    let (server, addr) = server(Dispatch::IoThread);
    for (name, callbacks, shared) in [
        ("callback on workers", Dispatch::Workers, false),
        ("callback inline", Dispatch::IoThread, false),
        ("shared handler on workers", Dispatch::Workers, true),
        ("shared handler inline", Dispatch::IoThread, true),
    ] {
        let client = Transport::builder().callbacks(callbacks).start().unwrap();
        let manager = Arc::new(ConnectionManager::new(&client).with_queue_limit(1024));
        let body = bytes::Bytes::from(vec![b'x'; 64]);
        let run = |n: usize| Chain::new(manager.clone(), addr, body.clone(), n, shared).run();
        client_allocations(name, CHAIN_DEPTH, 20_000, requests, run);
        client.stop();
    }
    for (name, future) in [("call", false), ("future", true)] {
        let client = Transport::builder().start().unwrap();
        let manager = ConnectionManager::new(&client);
        let body = bytes::Bytes::from(vec![b'x'; 64]);
        let one = |manager: &ConnectionManager| {
            let request = Packet::new(1, body.clone());
            if future {
                let f = manager.call_async(addr, request, None).expect("queued");
                block_on(f).expect("an answer");
            } else {
                manager.call(addr, request, None).expect("an answer");
            }
        };
        client_allocations(name, 1, 2_000, requests / 10, |n| {
            for _ in 0..n {
                one(&manager);
            }
        });
        client.stop();
    }
    server.stop();
}

/// Runs `run(warmup)`, then counts the allocations of `run(requests)` and
/// prints them per request.
fn client_allocations(
    name: &str,
    depth: usize,
    warmup: usize,
    requests: usize,
    run: impl Fn(usize),
) {
    run(warmup);
    let before = measure();
    run(requests);
    let after = measure();
    println!(
        "client allocations per request ({name}, 64 B bodies, depth {depth}): {:.3} ({} allocations for {} requests)",
        (after.allocations - before.allocations) as f64 / requests as f64,
        after.allocations - before.allocations,
        requests
    );
}

/// Memory and allocations per connection, pending request and request (dhat).
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    /// Idle connections to open and measure.
    #[arg(long, default_value_t = 5000)]
    conns: usize,
    /// Requests to leave pending and measure.
    #[arg(long, default_value_t = 1_000_000)]
    pending: usize,
    /// Requests whose allocations are counted (a tenth of them for 4 KiB bodies and for blocking and future calls).
    #[arg(long, default_value_t = 100_000)]
    requests: usize,
}

fn main() {
    let Args {
        conns,
        pending,
        requests,
    } = Args::parse();
    let _profiler = dhat::Profiler::builder().testing().build();
    allocations_per_request(Dispatch::IoThread, requests, 64);
    allocations_per_request(Dispatch::Workers, requests, 64);
    allocations_per_request(Dispatch::IoThread, requests / 10, 4096);
    client_allocations_per_request(requests);
    idle_connections(conns);
    pending_requests(pending);
}

/// Requests a [`Chain`] keeps in flight.
const CHAIN_DEPTH: usize = 32;

/// [`CHAIN_DEPTH`] chains of requests, each response sending the next,
/// until `n` were sent: through one [`tbnet::SharedPacketHandler`] for
/// every request (`shared`), or a closure per request.
struct Chain {
    manager: Arc<ConnectionManager>,
    addr: SocketAddr,
    body: bytes::Bytes,
    sent: std::sync::atomic::AtomicUsize,
    n: usize,
    shared: bool,
    /// Chains that ended, and their waiter.
    done: (std::sync::Mutex<usize>, std::sync::Condvar),
    this: std::sync::Weak<Chain>,
}

impl Chain {
    fn new(
        manager: Arc<ConnectionManager>,
        addr: SocketAddr,
        body: bytes::Bytes,
        n: usize,
        shared: bool,
    ) -> Arc<Self> {
        Arc::new_cyclic(|this| Chain {
            manager,
            addr,
            body,
            sent: std::sync::atomic::AtomicUsize::new(0),
            n,
            shared,
            done: Default::default(),
            this: this.clone(),
        })
    }

    fn next(&self) {
        if self.sent.fetch_add(1, Ordering::Relaxed) >= self.n {
            *self.done.0.lock().unwrap() += 1;
            self.done.1.notify_all();
            return;
        }
        let this = self.this.upgrade().expect("the run holds its chain");
        let request = Packet::new(1, self.body.clone());
        let sent = if self.shared {
            (self.manager).send_shared(self.addr, request, None, &this, 0)
        } else {
            (self.manager).send(self.addr, request, None, move |result| {
                tbnet::SharedPacketHandler::handle_packet(&*this, result, 0)
            })
        };
        sent.expect("queued");
    }

    /// Starts the chains and waits until every one ended.
    fn run(&self) {
        for _ in 0..CHAIN_DEPTH {
            self.next();
        }
        let mut finished = self.done.0.lock().unwrap();
        while *finished < CHAIN_DEPTH {
            finished = self.done.1.wait(finished).unwrap();
        }
    }
}

impl tbnet::SharedPacketHandler for Chain {
    fn handle_packet(&self, result: Result<Packet, tbnet::Error>, _args: u64) {
        result.expect("an answer");
        self.next();
    }
}
