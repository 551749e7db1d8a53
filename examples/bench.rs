//! End-to-end benchmark: tbnet against a raw baseline, in one run.
//!
//! ```sh
//! cargo run --release --example bench                # the full table (a few minutes)
//! cargo run --release --example bench -- --quick     # 64 B and 4 KiB, shorter runs
//! ```
//!
//! Rows, for each payload size and shape (connections x requests in flight):
//! - `a raw`: a raw client (single-threaded mio, pipelined) against a raw
//!   echo server (single-threaded mio, same wire format, no framework);
//! - `b io-thread`: the same raw client against tbnet's server handling
//!   requests on its IO thread;
//! - `c workers`: the same raw client against tbnet's server with the
//!   worker pool (2 workers);
//! - `d call`, `d callback`, `d future`: tbnet's client against tbnet's
//!   IO-thread server, in each of the three ways of waiting; `d callback on
//!   io thread`: callbacks run inline (`TransportBuilder::callbacks`).
//!
//! Every row is compared with `a` of its size and shape. Rows run in rounds,
//! interleaved, so drift on a shared machine hits all rows alike.
//! Flags: `--secs S` per row (default 2), `--rounds R` (default 2),
//! `--sizes 64,4096,1048576`, `--shapes 1x1,4x32,64x4`,
//! `--rows a,b,c,call,callback,future,callback-io`, `--quick`, and
//! `--pin none|split|same` (default none): `split` pins every server thread
//! to one CPU and every client thread to another, `same` puts both on one
//! CPU (what a container with a one-CPU quota sees). Threads inherit the
//! affinity of the thread that spawns them, so each side is started from
//! the main thread pinned to that side's CPU.
//!
//! The `cs/req` column is context switches (voluntary and involuntary, from
//! `/proc/self/task/*/status`, sampled every 20 ms so threads that exit
//! are counted) per request, for the whole process: client and server.

#[path = "common/load.rs"]
mod load;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tbnet::{ConnectionManager, Dispatch, Packet, Responder, Transport};

const FLAG: u32 = 0x416E_4574;
const HEADER: usize = 16;
const WAKE: Token = Token(usize::MAX);

// ---------------------------------------------------------------------------
// The raw baseline server: one thread, mio, tbnet frames, nothing else.

struct RawServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: JoinHandle<()>,
}

impl RawServer {
    fn start() -> io::Result<RawServer> {
        let mut listener = TcpListener::bind("127.0.0.1:0".parse().expect("address"))?;
        let addr = listener.local_addr()?;
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let stop = Arc::new(AtomicBool::new(false));
        poll.registry()
            .register(&mut listener, Token(0), Interest::READABLE)?;
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name("raw-server".into())
            .spawn(move || raw_server_loop(poll, listener, &flag))?;
        Ok(RawServer {
            addr,
            stop,
            waker,
            thread,
        })
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        let _ = self.thread.join();
    }
}

struct RawConn {
    stream: TcpStream,
    input: Input,
    output: Vec<u8>,
    written: usize,
}

/// Received bytes, consumed from the front without moving the rest on every
/// frame (which would make large frames quadratic).
#[derive(Default)]
struct Input {
    buf: Vec<u8>,
    start: usize,
}

impl Input {
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

fn raw_server_loop(mut poll: Poll, listener: TcpListener, stop: &AtomicBool) {
    let mut events = Events::with_capacity(1024);
    let mut conns: Slab<RawConn> = Slab::new();
    let mut chunk = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        if poll.poll(&mut events, None).is_err() {
            continue;
        }
        for event in events.iter() {
            match event.token() {
                WAKE => {}
                Token(0) => {
                    while let Ok((mut stream, _)) = listener.accept() {
                        let _ = stream.set_nodelay(true);
                        let entry = conns.vacant_entry();
                        let token = Token(entry.key() + 1);
                        let interest = Interest::READABLE | Interest::WRITABLE;
                        if poll
                            .registry()
                            .register(&mut stream, token, interest)
                            .is_ok()
                        {
                            entry.insert(RawConn {
                                stream,
                                input: Input::default(),
                                output: Vec::new(),
                                written: 0,
                            });
                        }
                    }
                }
                Token(t) => {
                    let key = t - 1;
                    let Some(conn) = conns.get_mut(key) else {
                        continue;
                    };
                    if raw_serve(conn, &mut chunk).is_err() {
                        let mut conn = conns.remove(key);
                        let _ = poll.registry().deregister(&mut conn.stream);
                    }
                }
            }
        }
    }
}

/// Reads and echoes every whole frame, then writes until `WouldBlock`.
fn raw_serve(conn: &mut RawConn, chunk: &mut [u8]) -> io::Result<()> {
    loop {
        match conn.stream.read(chunk) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => conn.input.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        while let Some(len) = frame_len(conn.input.pending())? {
            conn.output.extend_from_slice(&conn.input.pending()[..len]);
            conn.input.consume(len);
        }
    }
    flush(&mut conn.stream, &mut conn.output, &mut conn.written)
}

/// The length of the whole frame at the start of `buf`, once it has arrived.
fn frame_len(buf: &[u8]) -> io::Result<Option<usize>> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    let word = |i: usize| u32::from_be_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    if word(0) != FLAG || word(12) > 0x0400_0000 {
        return Err(io::ErrorKind::InvalidData.into());
    }
    let len = HEADER + word(12) as usize;
    Ok((buf.len() >= len).then_some(len))
}

fn flush(stream: &mut TcpStream, output: &mut Vec<u8>, written: &mut usize) -> io::Result<()> {
    while *written < output.len() {
        match stream.write(&output[*written..]) {
            Ok(n) => *written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    output.clear();
    *written = 0;
    Ok(())
}

// ---------------------------------------------------------------------------
// The raw pipelined client: one thread, mio, `depth` frames in flight per
// connection, each answered frame replaced by a new one on its channel id.

struct Sample {
    ok: u64,
    bad: u64,
    secs: f64,
    latency_us: Histogram<u64>,
    switches: u64,
}

// ---------------------------------------------------------------------------
// CPU pinning and context switches.

/// Where each side's threads run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pin {
    None,
    Split,
    Same,
}

/// Pins the calling thread (and so the threads it spawns next) to the CPU
/// `pin` gives `side` (0 server, 1 client).
fn pin_side(pin: Pin, side: usize) {
    let core = match pin {
        Pin::None => return,
        Pin::Split => side,
        Pin::Same => 0,
    };
    let cores = cores();
    let Some(&id) = cores.get(core.min(cores.len().saturating_sub(1))) else {
        eprintln!("bench: no CPU to pin to");
        return;
    };
    if !core_affinity::set_for_current(id) {
        eprintln!("bench: could not pin to CPU {}", id.id);
    }
}

/// The CPUs this process may use, read once before anything is pinned:
/// afterwards the list would only hold the pinned thread's CPU.
fn cores() -> &'static [core_affinity::CoreId] {
    static CORES: std::sync::OnceLock<Vec<core_affinity::CoreId>> = std::sync::OnceLock::new();
    CORES.get_or_init(|| core_affinity::get_core_ids().unwrap_or_default())
}

/// Context switches of every live thread of this process, by thread id.
fn switches_by_thread() -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let n: u64 = (status.lines())
            .filter(|l| l.contains("ctxt_switches"))
            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .sum();
        out.insert(tid, n);
    }
    out
}

/// Counts the process's context switches over a run, sampling often
/// enough that threads which exit during it are counted.
struct SwitchCounter {
    stop: Arc<AtomicBool>,
    sampler: JoinHandle<BTreeMap<u64, u64>>,
    before: BTreeMap<u64, u64>,
}

impl SwitchCounter {
    fn start() -> SwitchCounter {
        let before = switches_by_thread();
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            thread::spawn(move || {
                let me: Option<u64> = std::fs::read_link("/proc/thread-self")
                    .ok()
                    .and_then(|p| p.file_name()?.to_str()?.parse().ok());
                let mut seen = BTreeMap::new();
                loop {
                    let done = stop.load(Ordering::SeqCst);
                    for (tid, n) in switches_by_thread() {
                        if Some(tid) != me {
                            let max = seen.entry(tid).or_insert(0);
                            *max = n.max(*max);
                        }
                    }
                    if done {
                        return seen;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            })
        };
        SwitchCounter {
            stop,
            sampler,
            before,
        }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let seen = self.sampler.join().unwrap_or_default();
        (seen.iter())
            .map(|(tid, n)| n.saturating_sub(self.before.get(tid).copied().unwrap_or(0)))
            .sum()
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn raw_client(
    addr: SocketAddr,
    conns: usize,
    depth: usize,
    size: usize,
    secs: f64,
) -> io::Result<Sample> {
    struct Client {
        stream: TcpStream,
        input: Input,
        output: Vec<u8>,
        written: usize,
        sent_at: Vec<Instant>,
        in_flight: usize,
    }
    let body: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let frame = |chid: u32, out: &mut Vec<u8>| {
        out.extend_from_slice(&FLAG.to_be_bytes());
        out.extend_from_slice(&chid.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&(body.len() as i32).to_be_bytes());
        out.extend_from_slice(&body);
    };
    let mut poll = Poll::new()?;
    let mut clients = Vec::with_capacity(conns);
    for i in 0..conns {
        let std_stream = std::net::TcpStream::connect(addr)?;
        std_stream.set_nodelay(true)?;
        std_stream.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(std_stream);
        poll.registry().register(
            &mut stream,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let mut output = Vec::new();
        let now = Instant::now();
        for chid in 1..=depth as u32 {
            frame(chid, &mut output);
        }
        clients.push(Client {
            stream,
            input: Input::default(),
            output,
            written: 0,
            sent_at: vec![now; depth + 1],
            in_flight: depth,
        });
    }
    let mut sample = Sample {
        ok: 0,
        bad: 0,
        secs: 0.0,
        latency_us: histogram(),
        switches: 0,
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut events = Events::with_capacity(1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut first_pass = true;
    loop {
        let now = Instant::now();
        let draining = now >= deadline;
        if draining && clients.iter().all(|c| c.in_flight == 0) {
            break;
        }
        if now >= deadline + Duration::from_secs(10) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "responses missing after the run",
            ));
        }
        let tokens: Vec<usize> = if first_pass {
            first_pass = false;
            (0..conns).collect()
        } else {
            poll.poll(&mut events, Some(Duration::from_millis(100)))?;
            events.iter().map(|e| e.token().0).collect()
        };
        for t in tokens {
            let c = &mut clients[t];
            loop {
                match c.stream.read(&mut chunk) {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => c.input.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            let now = Instant::now();
            while let Some(len) = frame_len(c.input.pending())? {
                let f = &c.input.pending()[..len];
                let chid = u32::from_be_bytes([f[4], f[5], f[6], f[7]]) as usize;
                if f[HEADER..] == body[..] && (1..=depth).contains(&chid) {
                    sample.ok += 1;
                    let us = now.duration_since(c.sent_at[chid]).as_micros().max(1) as u64;
                    sample.latency_us.saturating_record(us);
                } else {
                    sample.bad += 1;
                }
                c.input.consume(len);
                if now < deadline {
                    c.sent_at[chid] = now;
                    frame(chid as u32, &mut c.output);
                } else {
                    c.in_flight -= 1;
                }
            }
            flush(&mut c.stream, &mut c.output, &mut c.written)?;
        }
    }
    sample.secs = deadline.duration_since(start).as_secs_f64();
    Ok(sample)
}

// ---------------------------------------------------------------------------
// The rows.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Row {
    Raw,
    IoThread,
    Workers,
    Client(u8),
}

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::Raw => "a raw client + raw server",
            Row::IoThread => "b raw client + tbnet io-thread",
            Row::Workers => "c raw client + tbnet workers",
            Row::Client(0) => "d tbnet call + tbnet",
            Row::Client(1) => "d tbnet callback + tbnet",
            Row::Client(2) => "d tbnet future + tbnet",
            Row::Client(_) => "d tbnet callback on io thread + tbnet",
        }
    }

    fn parse(s: &str) -> Option<Row> {
        Some(match s {
            "a" | "raw" => Row::Raw,
            "b" | "io-thread" => Row::IoThread,
            "c" | "workers" => Row::Workers,
            "call" => Row::Client(0),
            "callback" => Row::Client(1),
            "future" => Row::Client(2),
            "callback-io" => Row::Client(3),
            _ => return None,
        })
    }
}

fn echo(request: Packet, responder: Responder) {
    let _ = responder.reply(request.reply(request.body().clone()));
}

fn tbnet_server(dispatch: Dispatch) -> (Transport, SocketAddr) {
    let workers = std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let transport = Transport::builder()
        .workers(workers)
        .dispatch(dispatch)
        .start()
        .expect("start a server transport");
    let addr = transport.listen("127.0.0.1:0", echo).expect("listen");
    (transport, addr)
}

fn run_row(row: Row, size: usize, conns: usize, depth: usize, secs: f64, pin: Pin) -> Sample {
    let switches = SwitchCounter::start();
    let mut sample = run_pinned(row, size, conns, depth, secs, pin);
    sample.switches = switches.finish();
    sample
}

fn run_pinned(row: Row, size: usize, conns: usize, depth: usize, secs: f64, pin: Pin) -> Sample {
    match row {
        Row::Raw => {
            pin_side(pin, 0);
            let server = RawServer::start().expect("start the raw server");
            pin_side(pin, 1);
            let sample = raw_client(server.addr, conns, depth, size, secs).expect("raw client run");
            server.stop();
            sample
        }
        Row::IoThread | Row::Workers => {
            let dispatch = if row == Row::IoThread {
                Dispatch::IoThread
            } else {
                Dispatch::Workers
            };
            pin_side(pin, 0);
            let (server, addr) = tbnet_server(dispatch);
            pin_side(pin, 1);
            let sample = raw_client(addr, conns, depth, size, secs).expect("raw client run");
            server.stop();
            sample
        }
        Row::Client(mode) => {
            let modes = [
                load::Mode::Call,
                load::Mode::Callback,
                load::Mode::Future,
                load::Mode::Callback,
            ];
            let callbacks = if mode == 3 {
                Dispatch::IoThread
            } else {
                Dispatch::Workers
            };
            let mode = modes[mode as usize];
            pin_side(pin, 0);
            let (server, addr) = tbnet_server(Dispatch::IoThread);
            pin_side(pin, 1);
            // Room for every request in flight, so large bodies meet
            // back-pressure rather than QueueFull.
            let client = Transport::builder()
                .workers(2)
                .callbacks(callbacks)
                .max_outbound(tbnet::DEFAULT_MAX_OUTBOUND.max(2 * depth * (size + 16)))
                .start()
                .expect("start a client transport");
            let managers = (0..conns)
                .map(|_| Arc::new(ConnectionManager::new(&client).with_queue_limit(depth.max(256))))
                .collect();
            let start = Instant::now();
            let run = Arc::new(load::Run {
                managers,
                addr,
                bodies: load::Bodies::fixed(size),
                deadline: start + Duration::from_secs_f64(secs),
                progress: load::Progress::default(),
                seq: AtomicU64::new(1),
            });
            let tally = load::drive(&run, mode, depth);
            let elapsed = start.elapsed().as_secs_f64();
            drop(run);
            client.stop();
            server.stop();
            Sample {
                ok: tally.ok,
                bad: tally.errors + tally.mismatches,
                secs: elapsed,
                latency_us: tally.latency_us,
                switches: 0,
            }
        }
    }
}

/// Where each side's threads run (`--pin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum PinArg {
    /// No pinning.
    None,
    /// Server threads on one CPU, client threads on another.
    Split,
    /// Both sides on one CPU.
    Same,
}

/// End-to-end benchmark: tbnet against a raw baseline; prints a Markdown table.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    /// Seconds per row, split over the rounds (default 2; 1 with --quick).
    #[arg(long)]
    secs: Option<f64>,
    /// Rounds the rows run in, interleaved (default 2; 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Payload sizes in bytes, comma-separated (default 64,4096,1048576; 64,4096 with --quick).
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// Shapes as CONNSxDEPTH, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1x1,4x32,64x4", value_parser = parse_shape)]
    shapes: Vec<(usize, usize)>,
    /// Rows to run, comma-separated: a, b, c, call, callback, future, callback-io (row a always runs).
    #[arg(long, value_delimiter = ',', default_value = "a,b,c,call,callback,future,callback-io", value_parser = parse_row)]
    rows: Vec<Row>,
    /// Pin threads: none, split (server and client on different CPUs), same (one CPU).
    #[arg(long, value_enum, default_value_t = PinArg::None)]
    pin: PinArg,
    /// Shorter runs: 64 B and 4 KiB, one round of 1 s (explicit flags win).
    #[arg(long)]
    quick: bool,
}

fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let (c, d) = s.split_once('x').ok_or(format!("{s} is not CxD"))?;
    Ok((
        c.parse()
            .map_err(|_| format!("{s}: bad connection count"))?,
        d.parse().map_err(|_| format!("{s}: bad depth"))?,
    ))
}

fn parse_row(s: &str) -> Result<Row, String> {
    Row::parse(s).ok_or(format!("unknown row {s}"))
}

struct Options {
    secs: f64,
    rounds: usize,
    sizes: Vec<usize>,
    shapes: Vec<(usize, usize)>,
    rows: Vec<Row>,
    pin: Pin,
}

fn parse_args() -> Options {
    let args = Args::parse();
    let (secs, rounds, sizes) = if args.quick {
        (1.0, 1, vec![64, 4096])
    } else {
        (2.0, 2, vec![64, 4096, 1 << 20])
    };
    let mut rows = args.rows;
    if !rows.contains(&Row::Raw) {
        rows.insert(0, Row::Raw);
    }
    Options {
        secs: args.secs.unwrap_or(secs),
        rounds: args.rounds.unwrap_or(rounds),
        sizes: args.sizes.unwrap_or(sizes),
        shapes: args.shapes,
        rows,
        pin: match args.pin {
            PinArg::None => Pin::None,
            PinArg::Split => Pin::Split,
            PinArg::Same => Pin::Same,
        },
    }
}

fn main() {
    cores();
    let o = parse_args();
    let per_round = o.secs / o.rounds.max(1) as f64;
    let mut results: BTreeMap<(usize, (usize, usize), Row), Sample> = BTreeMap::new();
    for round in 0..o.rounds.max(1) {
        for &size in &o.sizes {
            for &(conns, depth) in &o.shapes {
                for &row in &o.rows {
                    eprintln!(
                        "round {} {:>7} B {conns}x{depth} {}",
                        round + 1,
                        size,
                        row.name()
                    );
                    let s = run_row(row, size, conns, depth, per_round, o.pin);
                    let slot = results
                        .entry((size, (conns, depth), row))
                        .or_insert_with(|| Sample {
                            ok: 0,
                            bad: 0,
                            secs: 0.0,
                            latency_us: histogram(),
                            switches: 0,
                        });
                    slot.switches += s.switches;
                    slot.ok += s.ok;
                    slot.bad += s.bad;
                    slot.secs += s.secs;
                    slot.latency_us.add(&s.latency_us).expect("same bounds");
                }
            }
        }
    }
    eprintln!("pin: {:?}", o.pin);
    println!(
        "| size | shape | row | req/s | MB/s | p50 us | p99 us | cs/req | vs a |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|"
    );
    for &size in &o.sizes {
        for &shape in &o.shapes {
            let base = results
                .get(&(size, shape, Row::Raw))
                .map(|s| s.ok as f64 / s.secs);
            for &row in &o.rows {
                let s = &results[&(size, shape, row)];
                let rps = s.ok as f64 / s.secs;
                let ratio = base.map_or(0.0, |b| rps / b);
                let bad = if s.bad > 0 {
                    format!(" ({} bad)", s.bad)
                } else {
                    String::new()
                };
                let per_request = s.switches as f64 / s.ok.max(1) as f64;
                println!(
                    "| {} | {}x{} | {}{bad} | {:.0} | {:.1} | {} | {} | {:.3} | {:.2} |",
                    human(size),
                    shape.0,
                    shape.1,
                    row.name(),
                    rps,
                    rps * size as f64 / 1e6,
                    s.latency_us.value_at_quantile(0.5),
                    s.latency_us.value_at_quantile(0.99),
                    per_request,
                    ratio
                );
            }
        }
    }
}

fn human(size: usize) -> String {
    match size {
        s if s >= 1 << 20 && s % (1 << 20) == 0 => format!("{} MiB", s >> 20),
        s if s >= 1024 && s % 1024 == 0 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}
