//! Issue 14: "A client that half-closes after its requests loses every reply
//! under worker dispatch".
//!
//! End of stream from a peer means "no more requests", not "drop what I
//! asked for". A server that reads it stops reading, lets the requests it
//! already read finish (on the workers or the IO thread), writes their
//! replies and closes once nothing is left to send; a peer that half-closes
//! and never reads is still closed by the idle limit. Each half-close is
//! counted in `StatsSnapshot::half_closes`. The client mirrors it: replies
//! that arrived before the server's end of stream are delivered, and only
//! the requests still unanswered fail with `Disconnected`.

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use tbnet::{
    ConnectionManager, Dispatch, Error, Packet, Responder, ServerAdaptor, Transport, WaitObject,
};

use crate::support::{
    echo, frame, loopback, raw_client, raw_server, read_frame, send_bytes, stop, transport,
    wait_until, within, Gate, RawFrame, Server, FLAG, NEVER, WAIT_LIMIT,
};

/// The packet code of every request the raw clients send.
const PCODE: i32 = 7;

/// How long a raw client waits for the next byte of replies or the end of
/// stream: a hang guard, shorter than `within`'s so a hang fails with the
/// bytes read so far.
const READ_LIMIT: Duration = Duration::from_secs(10);

/// A server on its own transport with two workers, handling requests as
/// `dispatch` says.
fn server_with(dispatch: Dispatch, adaptor: impl ServerAdaptor) -> Server {
    let transport = Transport::builder()
        .dispatch(dispatch)
        .workers(2)
        .start()
        .expect("start a server transport");
    let addr = transport.listen(loopback(), adaptor).expect("listen");
    Server { transport, addr }
}

/// The body of request `i`.
fn body(i: usize) -> Vec<u8> {
    format!("request-{i}").into_bytes()
}

/// `n` requests in one buffer: channel ids `1..=n`, bodies [`body`].
fn burst(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| frame(chid(i), PCODE, &body(i)))
        .collect()
}

/// The channel id of request `i`.
fn chid(i: usize) -> u32 {
    u32::try_from(i + 1).expect("a small request count")
}

/// A raw client connected to `addr`, whose reads give up after
/// [`READ_LIMIT`].
fn connect(addr: SocketAddr) -> TcpStream {
    let stream = raw_client(addr);
    stream.set_read_timeout(Some(READ_LIMIT)).unwrap();
    stream
}

/// Sends `n` requests, half-closes (after `pause`, if any), and reads every
/// reply until the server ends the stream.
fn requests_then_half_close(addr: SocketAddr, n: usize, pause: Option<Duration>) -> Vec<RawFrame> {
    let mut stream = connect(addr);
    stream.write_all(&burst(n)).expect("send the requests");
    if let Some(pause) = pause {
        // The pause before the half-close is what these tests vary.
        thread::sleep(pause);
    }
    stream.shutdown(Shutdown::Write).expect("half-close");
    replies_until_end_of_stream(&mut stream)
}

/// Reads until the server ends the stream and cuts what arrived into frames.
/// Fails on a reset, on [`READ_LIMIT`] without a byte, and on a torn frame.
fn replies_until_end_of_stream(stream: &mut TcpStream) -> Vec<RawFrame> {
    let mut bytes = Vec::new();
    if let Err(e) = stream.read_to_end(&mut bytes) {
        panic!(
            "reading replies until end of stream failed after {} bytes: {e}",
            bytes.len()
        );
    }
    let total = bytes.len() as u64;
    let mut cursor = Cursor::new(bytes);
    let mut frames = Vec::new();
    while cursor.position() < total {
        frames.push(read_frame(&mut cursor).expect("the stream ends between frames"));
    }
    frames
}

/// Asserts that `frames` answer requests `0..n` exactly: each channel id
/// once, with its own packet code and body.
fn assert_every_reply(frames: &[RawFrame], n: usize) {
    let mut replies = BTreeMap::new();
    for reply in frames {
        assert_eq!(reply.flag, FLAG, "reply to chid {}", reply.chid);
        assert_eq!(reply.pcode, PCODE, "reply to chid {}", reply.chid);
        let earlier = replies.insert(reply.chid, reply.body.clone());
        assert!(earlier.is_none(), "chid {} was answered twice", reply.chid);
    }
    let missing: Vec<u32> = (0..n)
        .map(chid)
        .filter(|id| !replies.contains_key(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {n} replies arrived before end of stream; missing chids {missing:?}",
        replies.len()
    );
    let expected: BTreeMap<u32, Vec<u8>> = (0..n).map(|i| (chid(i), body(i))).collect();
    assert_eq!(replies, expected);
}

/// Waits until `server` counted `n` half-closes (exactly) and closed every
/// connection.
fn assert_half_closes_counted(server: &Server, n: u64) {
    let stats = || server.transport.stats();
    assert!(
        wait_until(WAIT_LIMIT, || stats().half_closes >= n),
        "half_closes is {}, expected {n}",
        stats().half_closes
    );
    assert_eq!(stats().half_closes, n, "one half-close per connection");
    assert!(
        wait_until(WAIT_LIMIT, || stats().connections == 0),
        "{} server connections still open after their replies were read",
        stats().connections
    );
}

/// Sends a burst of 10 and then one of 200 requests (on two connections),
/// each followed by a half-close, and checks every reply arrives.
fn every_reply_arrives_after_a_half_close(dispatch: Dispatch, pause: Option<Duration>) {
    let server = server_with(dispatch, echo);
    for n in [10, 200] {
        let frames = requests_then_half_close(server.addr, n, pause);
        assert_every_reply(&frames, n);
    }
    assert_half_closes_counted(&server, 2);
    stop(&server.transport);
}

#[test]
fn a_client_that_half_closes_after_its_requests_gets_every_reply_with_io_thread_dispatch() {
    every_reply_arrives_after_a_half_close(Dispatch::IoThread, None);
}

#[test]
fn a_client_that_half_closes_after_its_requests_gets_every_reply_with_worker_dispatch() {
    every_reply_arrives_after_a_half_close(Dispatch::Workers, None);
}

#[test]
fn a_client_that_half_closes_after_a_pause_gets_every_reply_with_io_thread_dispatch() {
    every_reply_arrives_after_a_half_close(Dispatch::IoThread, Some(Duration::from_millis(50)));
}

#[test]
fn a_client_that_half_closes_after_a_pause_gets_every_reply_with_worker_dispatch() {
    every_reply_arrives_after_a_half_close(Dispatch::Workers, Some(Duration::from_millis(50)));
}

/// 16 raw clients at once, each sending 50 requests and half-closing.
fn many_half_closing_clients_each_get_every_reply(dispatch: Dispatch) {
    const CLIENTS: usize = 16;
    const REQUESTS: usize = 50;
    let server = server_with(dispatch, echo);
    let addr = server.addr;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| thread::spawn(move || requests_then_half_close(addr, REQUESTS, None)))
        .collect();
    let replies = within("half-closing clients", move || {
        (clients.into_iter())
            .map(|client| client.join())
            .collect::<Vec<_>>()
    });
    for (client, frames) in replies.into_iter().enumerate() {
        // A client's own panic message names what it missed.
        let frames = frames.unwrap_or_else(|panic| {
            eprintln!("half-closing client {client} failed");
            std::panic::resume_unwind(panic)
        });
        assert_every_reply(&frames, REQUESTS);
    }
    assert_half_closes_counted(&server, CLIENTS as u64);
    stop(&server.transport);
}

#[test]
fn many_clients_half_closing_at_once_each_get_every_reply_with_io_thread_dispatch() {
    many_half_closing_clients_each_get_every_reply(Dispatch::IoThread);
}

#[test]
fn many_clients_half_closing_at_once_each_get_every_reply_with_worker_dispatch() {
    many_half_closing_clients_each_get_every_reply(Dispatch::Workers);
}

#[test]
fn a_slow_worker_handler_still_answers_every_request_of_a_half_closed_client() {
    let server = server_with(
        Dispatch::Workers,
        |request: Packet, responder: Responder| {
            // A slow handler is the subject: most replies are produced after the
            // end of stream was read.
            thread::sleep(Duration::from_millis(3));
            echo(request, responder);
        },
    );
    let frames = requests_then_half_close(server.addr, 40, None);
    assert_every_reply(&frames, 40);
    assert_half_closes_counted(&server, 1);
    stop(&server.transport);
}

/// Opens its gate when dropped, so a failed test does not leave handlers
/// blocked.
struct OpenOnDrop(Gate);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// Waits until `server` read the end of stream of its one connection, and
/// asserts it did not close that connection instead.
fn assert_end_of_stream_read_and_connection_kept(server: &Server, unanswered: usize) {
    let stats = || server.transport.stats();
    assert!(
        wait_until(WAIT_LIMIT, || stats().connections_total >= 1),
        "the server accepted the connection"
    );
    assert!(
        wait_until(WAIT_LIMIT, || stats().half_closes >= 1
            || stats().connections == 0),
        "the server neither counted the half-close nor closed the connection"
    );
    assert_eq!(
        stats().connections,
        1,
        "the server closed the half-closed connection with {unanswered} requests unanswered"
    );
}

#[test]
fn replies_produced_after_the_end_of_stream_was_read_still_arrive() {
    const REQUESTS: usize = 20;
    let gate = OpenOnDrop(Gate::default());
    let server = {
        let gate = gate.0.clone();
        server_with(
            Dispatch::Workers,
            move |request: Packet, responder: Responder| {
                gate.pass();
                echo(request, responder);
            },
        )
    };
    let mut client = connect(server.addr);
    send_bytes(&mut client, &burst(REQUESTS));
    client.shutdown(Shutdown::Write).expect("half-close");

    // Every handler waits at the gate, so no request is answered before the
    // server reads the end of stream.
    assert_end_of_stream_read_and_connection_kept(&server, REQUESTS);
    gate.0.open();

    let frames = replies_until_end_of_stream(&mut client);
    assert_every_reply(&frames, REQUESTS);
    assert_half_closes_counted(&server, 1);
    stop(&server.transport);
}

/// Requests `n` from a server that keeps every responder, half-closes, and
/// only then answers them all, from the test thread, last first.
fn replies_through_kept_responders_arrive_after_a_half_close(dispatch: Dispatch) {
    const REQUESTS: usize = 10;
    let held: Arc<Mutex<Vec<(Packet, Responder)>>> = Arc::default();
    let server = {
        let held = held.clone();
        server_with(dispatch, move |request: Packet, responder: Responder| {
            held.lock().unwrap().push((request, responder));
        })
    };
    let mut client = connect(server.addr);
    send_bytes(&mut client, &burst(REQUESTS));
    client.shutdown(Shutdown::Write).expect("half-close");
    assert!(
        wait_until(WAIT_LIMIT, || held.lock().unwrap().len() == REQUESTS),
        "the server received {} of {REQUESTS} requests",
        held.lock().unwrap().len()
    );
    assert_end_of_stream_read_and_connection_kept(&server, REQUESTS);

    let requests = std::mem::take(&mut *held.lock().unwrap());
    for (request, responder) in requests.into_iter().rev() {
        responder
            .reply(request.reply(request.body().clone()))
            .expect("a reply to a half-closed client is accepted");
    }
    let frames = replies_until_end_of_stream(&mut client);
    assert_every_reply(&frames, REQUESTS);
    assert_half_closes_counted(&server, 1);
    stop(&server.transport);
}

#[test]
fn replies_through_kept_responders_reach_a_half_closed_client_with_io_thread_dispatch() {
    replies_through_kept_responders_arrive_after_a_half_close(Dispatch::IoThread);
}

#[test]
fn replies_through_kept_responders_reach_a_half_closed_client_with_worker_dispatch() {
    replies_through_kept_responders_arrive_after_a_half_close(Dispatch::Workers);
}

#[test]
fn a_half_closed_peer_that_never_reads_is_closed_by_the_idle_limit() {
    const REQUESTS: usize = 64;
    // Small requests, large replies: the requests fit in the socket buffers
    // (so sending them cannot block), while 16 MiB of replies cannot, and
    // stay unwritten once the peer stops reading.
    let reply = bytes::Bytes::from(vec![0x5A; 256 << 10]);
    let transport = Transport::builder()
        .workers(2)
        .idle_timeout(Some(Duration::from_millis(300)))
        .start()
        .expect("start a server transport");
    let addr = transport
        .listen(loopback(), move |request: Packet, responder: Responder| {
            let _ = responder.reply(request.reply(reply.clone()));
        })
        .expect("listen");
    let stats = || transport.stats();

    let requests = burst(REQUESTS);
    let mut client = connect(addr);
    send_bytes(&mut client, &requests);
    client.shutdown(Shutdown::Write).expect("half-close");
    assert!(
        wait_until(WAIT_LIMIT, || stats().connections_total >= 1),
        "the server accepted the connection"
    );

    // The client keeps its socket open and reads nothing.
    assert!(
        wait_until(Duration::from_secs(10), || stats().connections == 0),
        "a half-closed peer that never reads still holds its connection: {:?}",
        stats()
    );
    drop(client);
    stop(&transport);
}

/// Outcomes of client requests, logged in the order they ended, under one
/// lock: a request that ended twice shows up twice.
#[derive(Default)]
struct Ledger(Mutex<Vec<(usize, Result<Packet, Error>)>>);

impl Ledger {
    fn handler(self: &Arc<Self>, index: usize) -> impl FnOnce(Result<Packet, Error>) + Send {
        let ledger = self.clone();
        move |result| ledger.0.lock().unwrap().push((index, result))
    }

    fn log(&self) -> Vec<(usize, Result<Packet, Error>)> {
        self.0.lock().unwrap().clone()
    }

    /// How many times each of `n` requests ended.
    fn counts(&self, n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for (index, _) in self.0.lock().unwrap().iter() {
            counts[*index] += 1;
        }
        counts
    }

    /// Waits until each of `n` requests ended; asserts each ended once.
    fn assert_each_ended_once(&self, n: usize) {
        assert!(
            wait_until(WAIT_LIMIT, || self.counts(n).iter().all(|&c| c > 0)),
            "requests ended {:?} times",
            self.counts(n)
        );
        assert_eq!(self.counts(n), vec![1; n], "each request ends exactly once");
    }
}

/// The body of client request `i`, and of the raw server's reply to it.
fn call_body(i: usize) -> String {
    format!("call-{i}")
}

fn reply_body(request: &[u8]) -> Vec<u8> {
    [b"re:".as_slice(), request].concat()
}

/// A raw server for one connection: reads `answered + unanswered` requests,
/// replies to the first `answered` of them, then closes both directions.
/// Returns the bodies of the requests it answered.
fn answer_some_then_close(
    answered: usize,
    unanswered: usize,
) -> (SocketAddr, thread::JoinHandle<Vec<Vec<u8>>>) {
    raw_server(move |mut stream| {
        let requests: Vec<RawFrame> = (0..answered + unanswered)
            .map(|i| read_frame(&mut stream).unwrap_or_else(|e| panic!("request {i}: {e}")))
            .collect();
        for request in &requests[..answered] {
            send_bytes(
                &mut stream,
                &frame(request.chid, request.pcode, &reply_body(&request.body)),
            );
        }
        // Every request was read, so closing sends end of stream, not a
        // reset.
        let _ = stream.shutdown(Shutdown::Both);
        (requests.into_iter().take(answered))
            .map(|request| request.body)
            .collect()
    })
}

/// Checks the outcomes of requests `0..outcomes.len()` (bodies
/// [`call_body`]): those the server `answered` got their own reply, every
/// other one failed with `Disconnected`.
fn assert_answered_and_disconnected(outcomes: &[Result<Packet, Error>], answered: &[Vec<u8>]) {
    let mut succeeded = Vec::new();
    for (i, outcome) in outcomes.iter().enumerate() {
        let sent = call_body(i).into_bytes();
        match outcome {
            Ok(response) => {
                assert_eq!(response.body(), &reply_body(&sent), "request {i}");
                succeeded.push(sent);
            }
            Err(Error::Disconnected) => {}
            Err(e) => panic!("request {i} failed with {e:?}, not Disconnected"),
        }
    }
    let mut answered = answered.to_vec();
    answered.sort();
    succeeded.sort();
    assert_eq!(
        succeeded, answered,
        "exactly the answered requests succeed; the rest fail with Disconnected"
    );
}

const ANSWERED: usize = 5;
const UNANSWERED: usize = 7;

#[test]
fn replies_sent_before_the_server_closes_reach_their_callbacks_and_the_rest_fail_disconnected() {
    let (addr, server) = answer_some_then_close(ANSWERED, UNANSWERED);
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    let ledger = Arc::new(Ledger::default());
    for i in 0..ANSWERED + UNANSWERED {
        client
            .send(
                addr,
                Packet::new(1, call_body(i)),
                Some(NEVER),
                ledger.handler(i),
            )
            .expect("send");
    }
    let answered = within("raw server", move || server.join().unwrap());
    ledger.assert_each_ended_once(ANSWERED + UNANSWERED);
    stop(&client_transport);
    ledger.assert_each_ended_once(ANSWERED + UNANSWERED);

    let mut log = ledger.log();
    log.sort_by_key(|(index, _)| *index);
    let outcomes: Vec<_> = log.into_iter().map(|(_, outcome)| outcome).collect();
    assert_answered_and_disconnected(&outcomes, &answered);
}

#[test]
fn replies_sent_before_the_server_closes_resolve_their_futures_and_the_rest_fail_disconnected() {
    let (addr, server) = answer_some_then_close(ANSWERED, UNANSWERED);
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    let futures: Vec<_> = (0..ANSWERED + UNANSWERED)
        .map(|i| {
            client
                .call_async(addr, Packet::new(1, call_body(i)), Some(NEVER))
                .expect("submit")
        })
        .collect();
    let answered = within("raw server", move || server.join().unwrap());
    let outcomes = within("futures", move || {
        (futures.into_iter())
            .map(tokio_test::block_on)
            .collect::<Vec<_>>()
    });
    assert_answered_and_disconnected(&outcomes, &answered);
    stop(&client_transport);
}

#[test]
fn replies_sent_before_the_server_closes_reach_a_wait_object_and_the_rest_fail_disconnected() {
    let (addr, server) = answer_some_then_close(ANSWERED, UNANSWERED);
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    let mut wait = WaitObject::new();
    for i in 0..ANSWERED + UNANSWERED {
        let index = client
            .send_wait(addr, Packet::new(1, call_body(i)), Some(NEVER), &mut wait)
            .expect("send_wait");
        assert_eq!(index, i);
    }
    let answered = within("raw server", move || server.join().unwrap());
    let outcomes = within("wait_all", move || wait.wait_all());
    assert_eq!(outcomes.len(), ANSWERED + UNANSWERED);
    assert_answered_and_disconnected(&outcomes, &answered);
    stop(&client_transport);
}

#[test]
fn replies_that_arrived_before_the_servers_end_of_stream_are_delivered_before_the_failures() {
    let (addr, server) = answer_some_then_close(ANSWERED, UNANSWERED);
    // Inline callbacks run in the order the IO thread ends the requests.
    let client_transport = Transport::builder()
        .workers(2)
        .callbacks(Dispatch::IoThread)
        .start()
        .expect("start a client transport");
    let client = ConnectionManager::new(&client_transport);
    let ledger = Arc::new(Ledger::default());
    for i in 0..ANSWERED + UNANSWERED {
        client
            .send(
                addr,
                Packet::new(1, call_body(i)),
                Some(NEVER),
                ledger.handler(i),
            )
            .expect("send");
    }
    let answered = within("raw server", move || server.join().unwrap());
    ledger.assert_each_ended_once(ANSWERED + UNANSWERED);
    stop(&client_transport);

    let log = ledger.log();
    let order: Vec<bool> = log.iter().map(|(_, outcome)| outcome.is_ok()).collect();
    let first_failure = order.iter().position(|ok| !ok).unwrap_or(order.len());
    assert!(
        order[first_failure..].iter().all(|ok| !ok),
        "a reply was delivered after a pending request failed: {order:?}"
    );
    let mut by_index = log;
    by_index.sort_by_key(|(index, _)| *index);
    let outcomes: Vec<_> = by_index.into_iter().map(|(_, outcome)| outcome).collect();
    assert_answered_and_disconnected(&outcomes, &answered);
}
