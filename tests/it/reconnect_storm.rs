//! Issue 15: "Reconnect storm".
//!
//! A connection that ends before it proved healthy (closed, reset or failed
//! with a bad frame before its first response, and within `Backoff::grace`
//! of opening) is a failed attempt: the backoff keeps growing across such
//! attempts, and resets only once a connection delivered a response or
//! stayed open for the grace. The first reconnect after a healthy connection
//! is lost is immediate. While in backoff, requests follow `WhileDown`.
//! Attempts and early failures are counted per server and per transport.
//!
//! With the default backoff (100 ms doubling, each delay drawn from the upper
//! half of its step) a client makes at most six attempts in two seconds at a
//! server that drops every connection; without it, one per request.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tbnet::{Backoff, ConnectionManager, Error, Packet, ServerStats, Transport, WhileDown};

use crate::support::{
    frame, header, loopback, read_frame, stop, transport, wait_until, within, Gate, HANG_GUARD,
    NEVER, WAIT_LIMIT,
};

/// Time between two requests of a storm: pacing the load, not
/// synchronisation.
const PACE: Duration = Duration::from_millis(5);

/// Most connect attempts allowed during a storm of at most two seconds. The
/// default backoff allows six; a client without backoff makes hundreds.
const MAX_STORM_ATTEMPTS: u64 = 15;

/// A backoff that never ends during a test, so "did the client back off" is
/// a yes-or-no question rather than a matter of timing.
const LONG: Duration = Duration::from_secs(60);

/// How much later than its own timeout a request may end: a hang guard
/// against waiting out a backoff instead, not a performance bound.
const LATENESS: Duration = Duration::from_secs(3);

/// The default delays (100 ms doubling to 10 s), with a grace no stalled
/// thread on a loaded machine can outlast: a connection the server drops
/// at once is then always an early failure.
fn default_delays() -> Backoff {
    Backoff {
        grace: NEVER,
        ..Backoff::default()
    }
}

/// What the raw server does with one accepted connection.
#[derive(Clone)]
enum Act {
    /// Closes it at once, reading nothing.
    Close,
    /// Writes a 16-byte header with a wrong flag, then waits for the client
    /// to close.
    BadFrame,
    /// Answers this many requests (echo), then closes.
    EchoThenClose(usize),
    /// Reads one request, then holds the connection open, unanswered, until
    /// the gate opens; then closes.
    Hold(Hold),
}

/// The handle of an [`Act::Hold`] connection.
#[derive(Clone, Default)]
struct Hold {
    read_one: Arc<AtomicBool>,
    release: Gate,
}

/// A plain `std::net` server that counts accepted connections and treats
/// each as `plan` says for its index (0 first).
struct RawListener {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
    accept_loop: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl RawListener {
    fn start(plan: impl Fn(usize) -> Act + Send + 'static) -> Self {
        let listener = TcpListener::bind(loopback()).expect("bind a raw server");
        let addr = listener.local_addr().expect("raw server address");
        let accepts = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let accept_loop = {
            let accepts = accepts.clone();
            let stopping = stopping.clone();
            thread::spawn(move || {
                let mut served = Vec::new();
                for stream in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let index = accepts.fetch_add(1, Ordering::SeqCst);
                    match plan(index) {
                        Act::Close => drop(stream),
                        act => served.push(thread::spawn(move || serve(stream, act))),
                    }
                }
                served
            })
        };
        RawListener {
            addr,
            accepts,
            stopping,
            accept_loop: Some(accept_loop),
        }
    }

    /// Connections accepted so far.
    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// Stops accepting and joins every connection's thread: their clients
    /// must have closed (stop the client transport first).
    fn stop(mut self) {
        self.signal_stop();
        let accept_loop = self.accept_loop.take().expect("stopped once");
        let served = within("raw accept loop", move || accept_loop.join().unwrap());
        within("raw connections", move || {
            served.into_iter().for_each(|c| c.join().unwrap())
        });
    }

    /// Sets the flag, then connects once so a blocked `accept` returns and
    /// sees it.
    fn signal_stop(&self) {
        if !self.stopping.swap(true, Ordering::SeqCst) {
            let _ = TcpStream::connect(self.addr);
        }
    }
}

impl Drop for RawListener {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

fn serve(mut stream: TcpStream, act: Act) {
    stream.set_read_timeout(Some(WAIT_LIMIT)).unwrap();
    match act {
        Act::Close => {}
        Act::BadFrame => {
            let _ = stream.write_all(&header(0xDEAD_BEEF, 1, 0, 0));
            // Until the client closes (it must, at a wrong flag).
            let mut sink = [0; 4096];
            while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
        }
        Act::EchoThenClose(n) => {
            for _ in 0..n {
                if !echo_one(&mut stream) {
                    return;
                }
            }
        }
        Act::Hold(hold) => {
            let _ = read_frame(&mut stream);
            hold.read_one.store(true, Ordering::SeqCst);
            hold.release.pass();
        }
    }
}

/// Reads one request and answers it with its own body; false once the
/// client closed.
fn echo_one(stream: &mut TcpStream) -> bool {
    match read_frame(stream) {
        Ok(request) => stream
            .write_all(&frame(request.chid, request.pcode, &request.body))
            .is_ok(),
        Err(_) => false,
    }
}

/// How one request ended, and when.
#[derive(Clone, Debug)]
struct End {
    result: Result<Packet, Error>,
    at: Instant,
}

/// One request: when it was sent, and every way it ended (a refused
/// submission or its callback).
#[derive(Clone, Debug)]
struct Entry {
    sent: Instant,
    ends: Vec<End>,
}

/// Every request of a storm, under one lock.
#[derive(Default)]
struct Ledger(Mutex<Vec<Entry>>);

impl Ledger {
    /// Registers a request sent now; returns its index.
    fn open(&self) -> usize {
        let mut entries = self.0.lock().unwrap();
        entries.push(Entry {
            sent: Instant::now(),
            ends: Vec::new(),
        });
        entries.len() - 1
    }

    fn end(&self, index: usize, result: Result<Packet, Error>) {
        let at = Instant::now();
        self.0.lock().unwrap()[index].ends.push(End { result, at });
    }

    fn handler(self: &Arc<Self>, index: usize) -> impl FnOnce(Result<Packet, Error>) + Send {
        let ledger = self.clone();
        move |result| ledger.end(index, result)
    }

    fn entries(&self) -> Vec<Entry> {
        self.0.lock().unwrap().clone()
    }

    fn all_ended(&self) -> bool {
        self.0.lock().unwrap().iter().all(|e| !e.ends.is_empty())
    }

    /// Asserts every request ended exactly once, in a way `allowed` accepts,
    /// and no later than `timeout` plus [`LATENESS`] after it was sent.
    fn assert_each_ended_once(&self, timeout: Duration, allowed: impl Fn(&Error) -> bool) {
        for (i, entry) in self.entries().iter().enumerate() {
            assert_eq!(entry.ends.len(), 1, "request {i} ended {:?}", entry.ends);
            let end = &entry.ends[0];
            match &end.result {
                Err(e) if allowed(e) => {}
                other => panic!("request {i} ended with {other:?}"),
            }
            let took = end.at - entry.sent;
            assert!(
                took <= timeout + LATENESS,
                "request {i} with a {timeout:?} timeout ended after {took:?}"
            );
        }
    }
}

/// Sends one request every [`PACE`] for `window`, each with `timeout`, and
/// waits until each ended.
fn storm(
    client: &ConnectionManager,
    addr: SocketAddr,
    window: Duration,
    timeout: Duration,
) -> Arc<Ledger> {
    let ledger = Arc::new(Ledger::default());
    let start = Instant::now();
    while start.elapsed() < window {
        let index = ledger.open();
        let request = Packet::new(1, format!("storm-{index}"));
        if let Err(refused) = client.send(addr, request, Some(timeout), ledger.handler(index)) {
            ledger.end(index, Err(refused.error().clone()));
        }
        thread::sleep(PACE);
    }
    assert!(
        wait_until(WAIT_LIMIT, || ledger.all_ended()),
        "storm requests never ended"
    );
    ledger
}

fn server_stats(client: &ConnectionManager, addr: SocketAddr) -> ServerStats {
    client
        .server_stats(addr)
        .expect("the client tried to connect")
}

/// The counters after a storm against a server that fails every connection
/// early: few attempts, each but possibly the last counted as an early
/// failure, per server and in the transport.
fn assert_backed_off(client: &ConnectionManager, transport: &Transport, server: &RawListener) {
    let stats = server_stats(client, server.addr);
    let accepts = server.accepts() as u64;
    assert!(
        stats.connect_attempts <= MAX_STORM_ATTEMPTS && accepts <= MAX_STORM_ATTEMPTS,
        "a reconnect storm: {stats:?}, {accepts} connections accepted"
    );
    assert!(
        stats.connect_attempts >= 3,
        "the client kept retrying, more slowly: {stats:?}"
    );
    assert!(
        stats.early_failures + 1 >= stats.connect_attempts,
        "every attempt but the last failed early: {stats:?}"
    );
    assert_eq!(
        u64::from(stats.failures_in_a_row),
        stats.early_failures,
        "no connection was ever healthy: {stats:?}"
    );
    assert!(
        wait_until(WAIT_LIMIT, || {
            let totals = transport.stats();
            totals.connect_attempts == stats.connect_attempts
                && totals.early_failures + 1 >= stats.connect_attempts
        }),
        "transport counters {:?} disagree with the server's {stats:?}",
        transport.stats()
    );
}

#[test]
fn a_server_that_closes_every_connection_at_once_is_retried_with_growing_backoff() {
    storm_against(Act::Close, |_| {});
}

#[test]
fn a_server_that_answers_every_connection_with_a_bad_frame_is_retried_with_growing_backoff() {
    storm_against(Act::BadFrame, |client_transport| {
        assert!(
            wait_until(WAIT_LIMIT, || client_transport.stats().bad_frames >= 1),
            "the client read the bad frames"
        );
    });
}

/// Two seconds of requests against a server that treats every connection
/// with `act`: each request fails `Disconnected` exactly once, and the
/// client backs off (`check` adds what is particular to `act`).
fn storm_against(act: Act, check: impl FnOnce(&Transport)) {
    let server = RawListener::start(move |_| act.clone());
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport).with_backoff(default_delays());
    let timeout = Duration::from_secs(2);

    let ledger = storm(&client, server.addr, Duration::from_secs(2), timeout);
    let disconnected = |e: &Error| matches!(e, Error::Disconnected);
    ledger.assert_each_ended_once(timeout, disconnected);
    check(&client_transport);
    assert_backed_off(&client, &client_transport, &server);

    stop(&client_transport);
    ledger.assert_each_ended_once(timeout, disconnected);
    server.stop();
}

#[test]
fn queued_requests_during_a_reconnect_storm_each_end_once_within_their_timeouts() {
    let server = RawListener::start(|_| Act::Close);
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport)
        .with_backoff(default_delays())
        .with_while_down(WhileDown::Queue);
    let timeout = Duration::from_millis(250);

    let ledger = storm(&client, server.addr, Duration::from_millis(1500), timeout);
    let lost_or_late = |e: &Error| matches!(e, Error::Disconnected | Error::Timeout);
    ledger.assert_each_ended_once(timeout, lost_or_late);
    let accepts = server.accepts() as u64;
    let stats = server_stats(&client, server.addr);
    assert!(
        accepts <= MAX_STORM_ATTEMPTS && stats.connect_attempts <= MAX_STORM_ATTEMPTS,
        "a reconnect storm: {stats:?}, {accepts} connections accepted"
    );

    stop(&client_transport);
    ledger.assert_each_ended_once(timeout, lost_or_late);
    server.stop();
}

#[test]
fn queued_requests_end_by_their_own_timeout_during_a_long_backoff() {
    let server = RawListener::start(|_| Act::Close);
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport)
        .with_backoff(Backoff {
            initial: LONG,
            max: LONG,
            grace: NEVER,
        })
        .with_while_down(WhileDown::Queue);

    // Usually the server's close fails this call. But if the close is seen
    // between the call's lookup of the connection and its submit, the call
    // goes to the next connection, which waits out the backoff: then it
    // ends by its own deadline (a hang guard, not a synchronisation).
    let first = client.call(server.addr, Packet::new(1, "first"), Some(HANG_GUARD / 10));
    assert!(
        matches!(first, Err(Error::Disconnected | Error::Timeout)),
        "{first:?}"
    );
    assert!(wait_until(WAIT_LIMIT, || server.accepts() == 1));

    // The next connect waits out a backoff of at least 30 s: these requests
    // can only end by their own deadlines.
    let timeout = Duration::from_millis(300);
    let ledger = storm(&client, server.addr, Duration::from_millis(200), timeout);
    ledger.assert_each_ended_once(timeout, |e| matches!(e, Error::Timeout));
    assert_eq!(server.accepts(), 1, "no connection during the backoff");

    stop(&client_transport);
    ledger.assert_each_ended_once(timeout, |e| matches!(e, Error::Timeout));
    server.stop();
}

#[test]
fn the_first_reconnect_after_a_healthy_connection_is_immediate_but_an_early_close_backs_off() {
    const ANSWERED: usize = 3;
    let server = RawListener::start(|index| match index {
        0 => Act::EchoThenClose(ANSWERED),
        _ => Act::Close,
    });
    let addr = server.addr;
    let client_transport = transport();
    // Grace far beyond the test, so only a response makes a connection
    // healthy; backoff far beyond it, so backing off means failing fast.
    let client = ConnectionManager::new(&client_transport).with_backoff(Backoff {
        initial: LONG,
        max: LONG,
        grace: NEVER,
    });

    for i in 0..ANSWERED {
        let body = format!("healthy-{i}");
        let response = client.call(addr, Packet::new(1, body.clone()), Some(NEVER));
        assert_eq!(response.expect("answered").body(), body.as_bytes());
    }
    // The server closes the connection after its third reply.
    assert!(
        wait_until(WAIT_LIMIT, || client.connections() == 0),
        "the client noticed the close"
    );

    // The lost connection had delivered responses: reconnect at once. The
    // new one is closed at once by the server.
    let after_healthy = client.call(addr, Packet::new(1, "after healthy"), Some(NEVER));
    assert!(
        matches!(after_healthy, Err(Error::Disconnected)),
        "{after_healthy:?}"
    );
    assert_eq!(
        server_stats(&client, addr).connect_attempts,
        2,
        "the first reconnect after a healthy connection does not wait"
    );
    assert!(
        wait_until(WAIT_LIMIT, || server.accepts() == 2),
        "the reconnect reached the server"
    );
    assert!(wait_until(WAIT_LIMIT, || client.connections() == 0));

    // That connection ended before any response: back off.
    for i in 0..3 {
        let fast = client.call(addr, Packet::new(1, "backing off"), Some(NEVER));
        assert!(
            matches!(fast, Err(Error::Disconnected)),
            "call {i}: {fast:?}"
        );
    }
    let stats = server_stats(&client, addr);
    assert_eq!(
        stats.connect_attempts, 2,
        "no attempt during the backoff: {stats:?}"
    );
    assert_eq!(stats.early_failures, 1, "{stats:?}");
    assert_eq!(stats.failures_in_a_row, 1, "{stats:?}");
    assert!(
        wait_until(WAIT_LIMIT, || {
            let totals = client_transport.stats();
            totals.connect_attempts == 2 && totals.early_failures == 1
        }),
        "transport counters: {:?}",
        client_transport.stats()
    );

    stop(&client_transport);
    assert_eq!(server.accepts(), 2);
    server.stop();
}

#[test]
fn a_connection_that_stayed_open_for_the_grace_counts_as_healthy() {
    let hold = Hold::default();
    let server = {
        let hold = hold.clone();
        RawListener::start(move |index| match index {
            0 => Act::Hold(hold.clone()),
            _ => Act::Close,
        })
    };
    let addr = server.addr;
    let client_transport = transport();
    // The default grace: the second connection, which the server drops at
    // once, must end within it even on a loaded machine.
    let grace = Backoff::default().grace;
    let client = ConnectionManager::new(&client_transport).with_backoff(Backoff {
        initial: LONG,
        max: LONG,
        grace,
    });

    let held = client
        .call_async(addr, Packet::new(1, "held"), Some(NEVER))
        .expect("submit");
    // The request was written, so the client had opened the connection.
    assert!(wait_until(WAIT_LIMIT, || hold
        .read_one
        .load(Ordering::SeqCst)));
    // The subject: the connection stays open, unanswered, past the grace.
    // It opened before the server read the request and closes after the
    // gate opens, so it is open for longer than this pause.
    thread::sleep(grace + Duration::from_millis(300));
    hold.release.open();
    let held = within("held request", move || tokio_test::block_on(held));
    assert!(matches!(held, Err(Error::Disconnected)), "{held:?}");
    assert!(wait_until(WAIT_LIMIT, || client.connections() == 0));

    // Healthy by the grace: the reconnect is immediate (the server closes
    // the new connection at once).
    let next = client.call(addr, Packet::new(1, "next"), Some(NEVER));
    assert!(matches!(next, Err(Error::Disconnected)), "{next:?}");
    assert_eq!(
        server_stats(&client, addr).connect_attempts,
        2,
        "a connection open for the grace is healthy: no backoff after it"
    );
    assert!(wait_until(WAIT_LIMIT, || client.connections() == 0));

    // The second connection closed within the grace with no response: back
    // off.
    let fast = client.call(addr, Packet::new(1, "backing off"), Some(NEVER));
    assert!(matches!(fast, Err(Error::Disconnected)), "{fast:?}");
    let stats = server_stats(&client, addr);
    assert_eq!(
        stats.connect_attempts, 2,
        "no attempt during the backoff: {stats:?}"
    );
    assert_eq!(
        stats.early_failures, 1,
        "only the second connection failed early: {stats:?}"
    );

    stop(&client_transport);
    server.stop();
}

#[test]
fn after_a_storm_of_early_closes_the_client_recovers_and_its_backoff_resets() {
    // Once serving, the server answers this many requests per connection,
    // then closes it: a healthy connection lost.
    const SERVED: usize = 6;
    let serving = Arc::new(AtomicBool::new(false));
    let server = {
        let serving = serving.clone();
        RawListener::start(move |_| {
            if serving.load(Ordering::SeqCst) {
                Act::EchoThenClose(SERVED)
            } else {
                Act::Close
            }
        })
    };
    let addr = server.addr;
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport).with_backoff(default_delays());
    let timeout = Duration::from_secs(2);

    let ledger = storm(&client, addr, Duration::from_secs(1), timeout);
    ledger.assert_each_ended_once(timeout, |e| matches!(e, Error::Disconnected));
    let during = server_stats(&client, addr);
    assert!(
        during.connect_attempts <= MAX_STORM_ATTEMPTS,
        "a reconnect storm: {during:?}"
    );
    assert!(
        during.failures_in_a_row >= 2,
        "the backoff grew: {during:?}"
    );

    // The server recovers; the client reconnects once its backoff ends (at
    // most a few seconds with the default backoff).
    serving.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        match client.call(addr, Packet::new(1, "recovered"), Some(timeout)) {
            Ok(response) => {
                assert_eq!(response.body(), "recovered");
                break;
            }
            Err(Error::Disconnected) => {}
            Err(e) => panic!("while recovering: {e:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "not served again: {:?}",
            server_stats(&client, addr)
        );
        // Pacing the retries, not synchronisation.
        thread::sleep(Duration::from_millis(10));
    }
    let recovered = server_stats(&client, addr);
    for i in 1..SERVED {
        let body = format!("served-{i}");
        let response = client.call(addr, Packet::new(1, body.clone()), Some(timeout));
        assert_eq!(response.expect("served").body(), body.as_bytes());
    }
    assert_eq!(
        server_stats(&client, addr).connect_attempts,
        recovered.connect_attempts,
        "served on the recovered connection"
    );

    // The server closes the recovered connection after its last answer. It
    // had delivered responses, so the backoff is reset: the next request
    // connects at once instead of failing fast.
    assert!(
        wait_until(WAIT_LIMIT, || client.connections() == 0),
        "the client noticed the close"
    );
    let after_healthy = client.call(addr, Packet::new(1, "at once"), Some(timeout));
    assert_eq!(
        after_healthy.expect("reconnected at once").body(),
        "at once"
    );
    let stats = server_stats(&client, addr);
    assert_eq!(
        stats.connect_attempts,
        recovered.connect_attempts + 1,
        "{stats:?}"
    );
    assert_eq!(
        stats.failures_in_a_row, 0,
        "a healthy connection resets the backoff: {stats:?}"
    );
    assert_eq!(
        stats.early_failures, recovered.early_failures,
        "losing a healthy connection is no early failure: {stats:?}"
    );

    stop(&client_transport);
    server.stop();
}
