//! tbnet echo client: drives an echo server and checks every answer.
//!
//! ```sh
//! # one command: starts an embedded echo server on 127.0.0.1:0
//! cargo run --release --example echo_client
//! # against a running server
//! cargo run --release --example echo_client -- --addr 127.0.0.1:8765 --conns 4 --depth 32
//! ```
//!
//! Flags: `--addr HOST:PORT` (absent: embedded server), `--conns N`
//! connections, `--depth D` requests in flight per connection, `--size BYTES`
//! per body, `--secs S` to run, `--mode call|callback|future`, `--json` for
//! one JSON line (`rps`, `p50_us`, `p99_us`, `errors`, `mismatches`, ...)
//! instead of the summary. Progress goes to stderr once a second. Every
//! response body is compared byte for byte with its request's. Exits 1 if
//! any request failed or came back altered.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use tbnet::{ConnectionManager, Dispatch, Error, Packet, Responder, ResponseFuture, Transport};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Call,
    Callback,
    Future,
}

#[derive(Clone, Debug)]
struct Args {
    addr: Option<SocketAddr>,
    conns: usize,
    depth: usize,
    size: usize,
    secs: f64,
    mode: Mode,
    json: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: None,
        conns: 1,
        depth: 1,
        size: 64,
        secs: 5.0,
        mode: Mode::Call,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
            v.parse().map_err(|_| format!("{flag}: not a number: {v}"))
        }
        match flag.as_str() {
            "--addr" => args.addr = Some(value()?.parse().map_err(|e| format!("--addr: {e}"))?),
            "--conns" => args.conns = num(&flag, value()?)?,
            "--depth" => args.depth = num(&flag, value()?)?,
            "--size" => args.size = num(&flag, value()?)?,
            "--secs" => args.secs = num(&flag, value()?)?,
            "--mode" => {
                args.mode = match value()?.as_str() {
                    "call" => Mode::Call,
                    "callback" => Mode::Callback,
                    "future" => Mode::Future,
                    other => {
                        return Err(format!(
                            "--mode: expected call|callback|future, got {other}"
                        ))
                    }
                }
            }
            "--json" => args.json = true,
            "-h" | "--help" => {
                println!(
                    "usage: echo_client [--addr HOST:PORT] [--conns N] [--depth D] [--size BYTES] \
                     [--secs S] [--mode call|callback|future] [--json]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.conns == 0 || args.depth == 0 {
        return Err("--conns and --depth must be at least 1".into());
    }
    if args.secs.is_nan() || args.secs <= 0.0 {
        return Err("--secs must be positive".into());
    }
    Ok(args)
}

/// What one driver saw.
struct Tally {
    latency_us: Histogram<u64>,
    ok: u64,
    errors: u64,
    mismatches: u64,
}

impl Tally {
    fn new() -> Self {
        Tally {
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)
                .expect("valid histogram bounds"),
            ok: 0,
            errors: 0,
            mismatches: 0,
        }
    }

    fn record(
        &mut self,
        result: Result<Packet, Error>,
        sent: &Bytes,
        started: Instant,
        progress: &Progress,
    ) {
        match result {
            Ok(response) if response.body() == sent => {
                let us = started.elapsed().as_micros().max(1) as u64;
                self.latency_us.saturating_record(us);
                self.ok += 1;
            }
            Ok(_) => self.mismatches += 1,
            Err(e) => {
                if self.errors == 0 {
                    eprintln!("echo_client: request failed: {e}");
                }
                self.errors += 1;
                progress.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        progress.done.fetch_add(1, Ordering::Relaxed);
    }

    fn merge(&mut self, other: &Tally) {
        self.latency_us
            .add(&other.latency_us)
            .expect("same histogram bounds");
        self.ok += other.ok;
        self.errors += other.errors;
        self.mismatches += other.mismatches;
    }
}

#[derive(Default)]
struct Progress {
    done: AtomicU64,
    errors: AtomicU64,
}

/// Request bodies: a fixed pattern with the request's sequence number in
/// front, so a response delivered to the wrong request is caught.
struct Bodies {
    template: Bytes,
}

impl Bodies {
    fn new(size: usize) -> Self {
        let template: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        Bodies {
            template: template.into(),
        }
    }

    fn make(&self, seq: u64) -> Bytes {
        let mut body = BytesMut::from(&self.template[..]);
        let stamp = seq.to_be_bytes();
        let n = stamp.len().min(body.len());
        body[..n].copy_from_slice(&stamp[stamp.len() - n..]);
        body.freeze()
    }
}

struct Run {
    managers: Vec<Arc<ConnectionManager>>,
    addr: SocketAddr,
    bodies: Bodies,
    deadline: Instant,
    progress: Progress,
    seq: AtomicU64,
}

impl Run {
    fn next_body(&self) -> Bytes {
        self.bodies.make(self.seq.fetch_add(1, Ordering::Relaxed))
    }
}

fn drive_call(run: &Arc<Run>, depth: usize) -> Tally {
    let handles: Vec<_> = (run.managers.iter())
        .flat_map(|m| std::iter::repeat(m.clone()).take(depth))
        .map(|manager| {
            let run = run.clone();
            thread::spawn(move || {
                let mut tally = Tally::new();
                while Instant::now() < run.deadline {
                    let body = run.next_body();
                    let started = Instant::now();
                    let result = manager.call(run.addr, Packet::new(0, body.clone()), None);
                    tally.record(result, &body, started, &run.progress);
                }
                tally
            })
        })
        .collect();
    merge_all(
        handles
            .into_iter()
            .map(|h| h.join().expect("driver thread panicked")),
    )
}

/// A callback chain: each completion records and sends the next request.
struct Chain {
    run: Arc<Run>,
    manager: Arc<ConnectionManager>,
    tally: Mutex<Tally>,
    finished: Arc<(Mutex<usize>, Condvar)>,
}

impl Chain {
    fn next(self: Arc<Self>) {
        if Instant::now() >= self.run.deadline {
            let (live, cond) = &*self.finished;
            *live.lock().expect("chain counter lock") -= 1;
            cond.notify_all();
            return;
        }
        let body = self.run.next_body();
        let started = Instant::now();
        let chain = self.clone();
        let sent = body.clone();
        let submitted =
            self.manager
                .send(self.run.addr, Packet::new(0, body), None, move |result| {
                    chain.tally.lock().expect("tally lock").record(
                        result,
                        &sent,
                        started,
                        &chain.run.progress,
                    );
                    chain.next();
                });
        if let Err(e) = submitted {
            self.tally.lock().expect("tally lock").record(
                Err(e.error().clone()),
                &Bytes::new(),
                started,
                &self.run.progress,
            );
            thread::sleep(Duration::from_millis(1));
            self.next();
        }
    }
}

fn drive_callback(run: &Arc<Run>, depth: usize) -> Tally {
    let finished = Arc::new((Mutex::new(0usize), Condvar::new()));
    let chains: Vec<Arc<Chain>> = (run.managers.iter())
        .flat_map(|m| std::iter::repeat(m.clone()).take(depth))
        .map(|manager| {
            Arc::new(Chain {
                run: run.clone(),
                manager,
                tally: Mutex::new(Tally::new()),
                finished: finished.clone(),
            })
        })
        .collect();
    *finished.0.lock().expect("chain counter lock") = chains.len();
    for chain in &chains {
        chain.clone().next();
    }
    let (live, cond) = &*finished;
    let mut live = live.lock().expect("chain counter lock");
    while *live > 0 {
        live = cond.wait(live).expect("chain counter lock");
    }
    drop(live);
    merge_all(
        chains
            .iter()
            .map(|c| std::mem::replace(&mut *c.tally.lock().expect("tally lock"), Tally::new())),
    )
}

struct Unpark(thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// One thread per connection polls `depth` futures; no async runtime needed.
fn drive_future(run: &Arc<Run>, depth: usize) -> Tally {
    let handles: Vec<_> = (run.managers.iter().cloned())
        .map(|manager| {
            let run = run.clone();
            thread::spawn(move || {
                let mut tally = Tally::new();
                let waker = Waker::from(Arc::new(Unpark(thread::current())));
                let mut cx = Context::from_waker(&waker);
                type InFlight = (ResponseFuture, Bytes, Instant);
                let start = |tally: &mut Tally| -> Option<InFlight> {
                    loop {
                        if Instant::now() >= run.deadline {
                            return None;
                        }
                        let body = run.next_body();
                        let started = Instant::now();
                        match manager.call_async(run.addr, Packet::new(0, body.clone()), None) {
                            Ok(future) => return Some((future, body, started)),
                            Err(e) => {
                                tally.record(Err(e.error().clone()), &body, started, &run.progress)
                            }
                        }
                    }
                };
                let mut slots: Vec<Option<InFlight>> =
                    (0..depth).map(|_| start(&mut tally)).collect();
                while slots.iter().any(Option::is_some) {
                    for slot in slots.iter_mut() {
                        // Poll until pending, so a fresh future registers its waker.
                        while let Some((future, body, started)) = slot {
                            let Poll::Ready(result) = Pin::new(future).poll(&mut cx) else {
                                break;
                            };
                            tally.record(result, body, *started, &run.progress);
                            *slot = start(&mut tally);
                        }
                    }
                    thread::park_timeout(Duration::from_millis(50));
                }
                tally
            })
        })
        .collect();
    merge_all(
        handles
            .into_iter()
            .map(|h| h.join().expect("driver thread panicked")),
    )
}

fn merge_all(tallies: impl Iterator<Item = Tally>) -> Tally {
    let mut total = Tally::new();
    for t in tallies {
        total.merge(&t);
    }
    total
}

fn echo(request: Packet, responder: Responder) {
    let _ = responder.reply(request.reply(request.body().clone()));
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("echo_client: {e}");
            return ExitCode::from(2);
        }
    };
    // The embedded server gets its own transport, as a separate process would.
    let embedded = if args.addr.is_none() {
        let server = Transport::builder()
            .dispatch(Dispatch::IoThread)
            .workers(1)
            .start();
        match server.and_then(|t| {
            t.listen("127.0.0.1:0".parse().expect("valid address"), echo)
                .map(|a| (t, a))
        }) {
            Ok(pair) => Some(pair),
            Err(e) => {
                eprintln!("echo_client: cannot start the embedded server: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let addr = args
        .addr
        .or(embedded.as_ref().map(|(_, a)| *a))
        .expect("an address");
    let transport = match Transport::builder().start() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("echo_client: cannot start the transport: {e}");
            return ExitCode::FAILURE;
        }
    };
    let managers = (0..args.conns)
        .map(|_| Arc::new(ConnectionManager::new(&transport).with_queue_limit(args.depth.max(256))))
        .collect();
    let started = Instant::now();
    let run = Arc::new(Run {
        managers,
        addr,
        bodies: Bodies::new(args.size),
        deadline: started + Duration::from_secs_f64(args.secs),
        progress: Progress::default(),
        seq: AtomicU64::new(1),
    });

    let reporting = Arc::new(AtomicUsize::new(1));
    let reporter = {
        let run = run.clone();
        let reporting = reporting.clone();
        thread::spawn(move || {
            let mut last = 0;
            let mut ticks = 0u64;
            while reporting.load(Ordering::Relaxed) == 1 {
                thread::park_timeout(Duration::from_secs(1));
                if reporting.load(Ordering::Relaxed) == 0 {
                    break;
                }
                ticks += 1;
                let done = run.progress.done.load(Ordering::Relaxed);
                eprintln!(
                    "[{ticks:>3}s] {done} requests, {} req/s, {} errors",
                    done - last,
                    run.progress.errors.load(Ordering::Relaxed)
                );
                last = done;
            }
        })
    };

    let tally = match args.mode {
        Mode::Call => drive_call(&run, args.depth),
        Mode::Callback => drive_callback(&run, args.depth),
        Mode::Future => drive_future(&run, args.depth),
    };
    let elapsed = started.elapsed().as_secs_f64();
    reporting.store(0, Ordering::Relaxed);
    reporter.thread().unpark();
    let _ = reporter.join();
    drop(run);
    transport.stop();
    if let Some((server, _)) = embedded {
        server.stop();
    }

    let requests = tally.ok + tally.errors + tally.mismatches;
    let rps = tally.ok as f64 / elapsed;
    let mb_per_s = rps * args.size as f64 / 1e6;
    let p = |q: f64| tally.latency_us.value_at_quantile(q);
    let mode = format!("{:?}", args.mode).to_lowercase();
    if args.json {
        println!(
            "{{\"mode\":\"{mode}\",\"conns\":{},\"depth\":{},\"size\":{},\"secs\":{elapsed:.3},\
             \"requests\":{requests},\"rps\":{rps:.1},\"mb_per_s\":{mb_per_s:.3},\
             \"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{},\"mismatches\":{}}}",
            args.conns,
            args.depth,
            args.size,
            p(0.5),
            p(0.99),
            p(0.999),
            tally.errors,
            tally.mismatches
        );
    } else {
        println!(
            "echo {mode}: {} conns x {} deep, {}-byte bodies, {elapsed:.1} s against {addr}{}",
            args.conns,
            args.depth,
            args.size,
            if args.addr.is_none() {
                " (embedded server)"
            } else {
                ""
            }
        );
        println!("requests   {requests} ({rps:.0} req/s, {mb_per_s:.1} MB/s echoed)");
        println!(
            "latency    p50 {} us, p99 {} us, p999 {} us",
            p(0.5),
            p(0.99),
            p(0.999)
        );
        println!("errors     {}", tally.errors);
        println!("mismatches {}", tally.mismatches);
    }
    if tally.errors > 0 || tally.mismatches > 0 || tally.ok == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
