//! Load drivers shared by the `echo_client` and `bench` examples: keep
//! `depth` requests in flight per connection, in one of the three ways of
//! waiting, and check every echoed body byte for byte.

// Each example that includes this file uses a different part of it.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use tbnet::{ConnectionManager, Error, Packet, ResponseFuture};

/// How a driver waits for its responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// `ConnectionManager::call`, one blocked thread per request in flight.
    Call,
    /// `ConnectionManager::send`, each callback sending the next request.
    Callback,
    /// `ConnectionManager::call_async`, one polling thread per connection.
    Future,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Call => "call",
            Mode::Callback => "callback",
            Mode::Future => "future",
        }
    }
}

/// What one driver saw.
pub struct Tally {
    pub latency_us: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    pub mismatches: u64,
}

impl Tally {
    pub fn new() -> Self {
        Tally {
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)
                .expect("valid histogram bounds"),
            ok: 0,
            errors: 0,
            mismatches: 0,
        }
    }

    pub fn record(
        &mut self,
        result: Result<Packet, Error>,
        sent: &Bytes,
        bodies: &Bodies,
        (started, ended): (Instant, Instant),
        progress: &Progress,
    ) {
        match result {
            Ok(response) if bodies.echoed(sent, response.body()) => {
                let us = ended.saturating_duration_since(started).as_micros().max(1) as u64;
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

    pub fn merge(&mut self, other: &Tally) {
        self.latency_us
            .add(&other.latency_us)
            .expect("same histogram bounds");
        self.ok += other.ok;
        self.errors += other.errors;
        self.mismatches += other.mismatches;
    }
}

/// Counters a progress reporter can read while a run goes on.
#[derive(Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub errors: AtomicU64,
}

/// Request bodies: a fixed pattern with the request's sequence number in
/// front, so a response delivered to the wrong request is caught.
pub struct Bodies {
    template: Bytes,
    ascii: bool,
    /// Every body is the template itself (no sequence number): what the
    /// benchmark's raw client sends, so both sides of a comparison pay the
    /// same for their bodies (a reference count, no copy).
    fixed: bool,
}

/// Smallest and largest `--size` of an ASCII body (its NUL included).
pub const ASCII_SIZES: std::ops::RangeInclusive<usize> = 24..=4096;

/// Decimal digits of the sequence number at the front of an ASCII body.
const ASCII_DIGITS: usize = 20;

impl Bodies {
    /// Binary bodies: the sequence number's big-endian bytes, then letters.
    pub fn new(size: usize) -> Self {
        let template: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        Bodies {
            template: template.into(),
            ascii: false,
            fixed: false,
        }
    }

    /// The same binary body every time (letters, no sequence number), as
    /// the benchmark's raw client sends: a misdelivered response goes
    /// unnoticed, so only the benchmark uses these.
    pub fn fixed(size: usize) -> Self {
        Bodies {
            fixed: true,
            ..Bodies::new(size)
        }
    }

    /// C-string bodies for a C++ tbnet echo server, which treats a body as
    /// a NUL-terminated string: `size - 1` printable ASCII bytes (the
    /// sequence number in decimal, then letters) and a NUL. Its echo server
    /// answers with the string cut at the NUL and at 4095 bytes, byte 21
    /// forced to `'a'`: so `size` is at most 4096 and bytes 20 and 21 are
    /// `'a'` already. `size` must be in [`ASCII_SIZES`].
    pub fn ascii(size: usize) -> Self {
        assert!(ASCII_SIZES.contains(&size), "ASCII body size {size}");
        let mut template: Vec<u8> = (0..size - 1)
            .map(|i| match i {
                ..=21 => b'a',
                _ => b'a' + (i % 26) as u8,
            })
            .collect();
        template.push(0);
        Bodies {
            template: template.into(),
            ascii: true,
            fixed: false,
        }
    }

    pub fn make(&self, seq: u64) -> Bytes {
        if self.fixed {
            return self.template.clone();
        }
        let mut body = BytesMut::from(&self.template[..]);
        if self.ascii {
            let digits = format!("{seq:0width$}", width = ASCII_DIGITS);
            let digits = &digits.as_bytes()[digits.len() - ASCII_DIGITS..];
            body[..ASCII_DIGITS].copy_from_slice(digits);
        } else {
            let stamp = seq.to_be_bytes();
            let n = stamp.len().min(body.len());
            body[..n].copy_from_slice(&stamp[stamp.len() - n..]);
        }
        body.freeze()
    }

    /// Whether `got` echoes `sent`: byte for byte, or for ASCII bodies the
    /// same string (a terminating NUL on either side is not part of it).
    pub fn echoed(&self, sent: &[u8], got: &[u8]) -> bool {
        if !self.ascii {
            return got == sent;
        }
        fn string(body: &[u8]) -> &[u8] {
            body.split(|&b| b == 0).next().unwrap_or_default()
        }
        // Anything after the first NUL in the reply is not part of its
        // string; the string itself must be all there.
        string(got) == string(sent) && got.len() <= sent.len()
    }
}

/// One load run: a connection (manager) per simulated connection, all to
/// one server, until `deadline`.
pub struct Run {
    pub managers: Vec<Arc<ConnectionManager>>,
    pub addr: SocketAddr,
    pub bodies: Bodies,
    pub deadline: Instant,
    pub progress: Progress,
    pub seq: AtomicU64,
}

impl Run {
    fn next_body(&self) -> Bytes {
        self.bodies.make(self.seq.fetch_add(1, Ordering::Relaxed))
    }
}

pub fn drive_call(run: &Arc<Run>, depth: usize) -> Tally {
    let handles: Vec<_> = (run.managers.iter())
        .flat_map(|m| std::iter::repeat(m.clone()).take(depth))
        .map(|manager| {
            let run = run.clone();
            thread::spawn(move || {
                let mut tally = Tally::new();
                loop {
                    let started = Instant::now();
                    if started >= run.deadline {
                        break;
                    }
                    let body = run.next_body();
                    let result = manager.call(run.addr, Packet::new(0, body.clone()), None);
                    tally.record(
                        result,
                        &body,
                        &run.bodies,
                        (started, Instant::now()),
                        &run.progress,
                    );
                }
                tally
            })
        })
        .collect();
    join_drivers(handles)
}

/// Tallies the callback chains share, one per thread that runs callbacks
/// (as far as [`STRIPES`] go): a tally per chain made hundreds of large
/// histograms, and recording into them missed the cache every time.
struct Tallies([Mutex<Tally>; STRIPES]);

/// Stripes of [`Tallies`]: more than the threads that run callbacks.
const STRIPES: usize = 8;

static NEXT_STRIPE: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static STRIPE: usize = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) as usize % STRIPES;
}

impl Tallies {
    fn new() -> Self {
        Tallies(std::array::from_fn(|_| Mutex::new(Tally::new())))
    }

    /// This thread's tally.
    fn here(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.0[STRIPE.with(|s| *s)].lock().expect("tally lock")
    }
}

/// A callback chain: each completion records and sends the next request.
struct Chain {
    run: Arc<Run>,
    manager: Arc<ConnectionManager>,
    tallies: Arc<Tallies>,
    finished: Arc<(Mutex<usize>, Condvar)>,
}

impl Chain {
    /// Sends the next request, `started` now (the clock read that ended the
    /// previous one, so a request costs the chain one read).
    fn next(self: Arc<Self>, started: Instant) {
        if started >= self.run.deadline {
            let (live, cond) = &*self.finished;
            *live.lock().expect("chain counter lock") -= 1;
            cond.notify_all();
            return;
        }
        let body = self.run.next_body();
        let chain = self.clone();
        let sent = body.clone();
        let submitted =
            self.manager
                .send(self.run.addr, Packet::new(0, body), None, move |result| {
                    let ended = Instant::now();
                    chain.tallies.here().record(
                        result,
                        &sent,
                        &chain.run.bodies,
                        (started, ended),
                        &chain.run.progress,
                    );
                    chain.next(ended);
                });
        if let Err(e) = submitted {
            self.tallies.here().record(
                Err(e.error().clone()),
                &Bytes::new(),
                &self.run.bodies,
                (started, started),
                &self.run.progress,
            );
            thread::sleep(Duration::from_millis(1));
            self.next(Instant::now());
        }
    }
}

pub fn drive_callback(run: &Arc<Run>, depth: usize) -> Tally {
    let finished = Arc::new((Mutex::new(0usize), Condvar::new()));
    let tallies = Arc::new(Tallies::new());
    let chains: Vec<Arc<Chain>> = (run.managers.iter())
        .flat_map(|m| std::iter::repeat(m.clone()).take(depth))
        .map(|manager| {
            Arc::new(Chain {
                run: run.clone(),
                manager,
                tallies: tallies.clone(),
                finished: finished.clone(),
            })
        })
        .collect();
    *finished.0.lock().expect("chain counter lock") = chains.len();
    for chain in &chains {
        chain.clone().next(Instant::now());
    }
    let (live, cond) = &*finished;
    let mut live = live.lock().expect("chain counter lock");
    while *live > 0 {
        live = cond.wait(live).expect("chain counter lock");
    }
    drop(live);
    drop(chains);
    merge_all(
        (tallies.0.iter())
            .map(|t| std::mem::replace(&mut *t.lock().expect("tally lock"), Tally::new())),
    )
}

/// One thread per connection polls `depth` futures; no async runtime needed.
pub fn drive_future(run: &Arc<Run>, depth: usize) -> Tally {
    let handles: Vec<_> = (run.managers.iter().cloned())
        .map(|manager| {
            let run = run.clone();
            thread::spawn(move || {
                let mut tally = Tally::new();
                // One waker per slot, as an executor has one per task: a
                // wake names the slot to poll, so a response costs one
                // poll, not one per request in flight.
                let ready = Arc::new(Mutex::new(Vec::with_capacity(depth)));
                let wakers: Vec<Waker> = (0..depth)
                    .map(|index| {
                        Waker::from(Arc::new(SlotWaker {
                            index,
                            ready: ready.clone(),
                            thread: thread::current(),
                        }))
                    })
                    .collect();
                type InFlight = (ResponseFuture, Bytes, Instant);
                let start = |tally: &mut Tally| -> Option<InFlight> {
                    loop {
                        let started = Instant::now();
                        if started >= run.deadline {
                            return None;
                        }
                        let body = run.next_body();
                        match manager.call_async(run.addr, Packet::new(0, body.clone()), None) {
                            Ok(future) => return Some((future, body, started)),
                            Err(e) => tally.record(
                                Err(e.error().clone()),
                                &body,
                                &run.bodies,
                                (started, started),
                                &run.progress,
                            ),
                        }
                    }
                };
                let mut slots: Vec<Option<InFlight>> =
                    (0..depth).map(|_| start(&mut tally)).collect();
                let mut to_poll: Vec<usize> = (0..depth).collect();
                while slots.iter().any(Option::is_some) {
                    for &index in &to_poll {
                        let mut cx = Context::from_waker(&wakers[index]);
                        // Poll until pending, so a fresh future registers its waker.
                        while let Some((future, body, started)) = &mut slots[index] {
                            let Poll::Ready(result) = Pin::new(future).poll(&mut cx) else {
                                break;
                            };
                            tally.record(
                                result,
                                body,
                                &run.bodies,
                                (*started, Instant::now()),
                                &run.progress,
                            );
                            slots[index] = start(&mut tally);
                        }
                    }
                    to_poll.clear();
                    while slots.iter().any(Option::is_some) {
                        std::mem::swap(&mut to_poll, &mut *ready.lock().expect("ready lock"));
                        if !to_poll.is_empty() {
                            break;
                        }
                        thread::park_timeout(Duration::from_millis(50));
                    }
                }
                tally
            })
        })
        .collect();
    join_drivers(handles)
}

/// Wakes a [`drive_future`] thread for one of its slots.
struct SlotWaker {
    index: usize,
    ready: Arc<Mutex<Vec<usize>>>,
    thread: thread::Thread,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.lock().expect("ready lock").push(self.index);
        self.thread.unpark();
    }
}

/// Waits for every driver thread and adds up what they saw.
fn join_drivers(handles: Vec<thread::JoinHandle<Tally>>) -> Tally {
    merge_all(
        handles
            .into_iter()
            .map(|h| h.join().expect("driver thread panicked")),
    )
}

pub fn merge_all(tallies: impl Iterator<Item = Tally>) -> Tally {
    let mut total = Tally::new();
    for t in tallies {
        total.merge(&t);
    }
    total
}

/// Runs `mode` with `depth` requests in flight per connection.
pub fn drive(run: &Arc<Run>, mode: Mode, depth: usize) -> Tally {
    match mode {
        Mode::Call => drive_call(run, depth),
        Mode::Callback => drive_callback(run, depth),
        Mode::Future => drive_future(run, depth),
    }
}
