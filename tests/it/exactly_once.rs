//! Every request completes exactly once, with the right outcome, however its
//! caller waits: {response, timeout, disconnect, shutdown} × {callback,
//! blocking, future}.
//!
//! Each case sends a few requests, provokes the outcome, collects what the
//! callers saw, then stops the client transport. `stop` joins every thread
//! that could still fire a completion, so the callback counts read after it
//! are final: exactly 1 each, not "at least 1 so far".

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use tbnet::{ConnectionManager, Error, Packet, ResponseFuture, WaitObject};

use crate::support::{
    echo_server, raw_server, read_frame, stop, transport, wait_until, within, Recorder, Server,
    SilentServer, NEVER, SHORT_TIMEOUT, WAIT_LIMIT,
};

const REQUESTS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Response,
    Timeout,
    Disconnect,
    Shutdown,
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Callback,
    Blocking,
    Future,
}

#[test]
fn response_callback() {
    exactly_once(Outcome::Response, Mode::Callback);
}

#[test]
fn response_blocking() {
    exactly_once(Outcome::Response, Mode::Blocking);
}

#[test]
fn response_future() {
    exactly_once(Outcome::Response, Mode::Future);
}

#[test]
fn timeout_callback() {
    exactly_once(Outcome::Timeout, Mode::Callback);
}

#[test]
fn timeout_blocking() {
    exactly_once(Outcome::Timeout, Mode::Blocking);
}

#[test]
fn timeout_future() {
    exactly_once(Outcome::Timeout, Mode::Future);
}

#[test]
fn disconnect_callback() {
    exactly_once(Outcome::Disconnect, Mode::Callback);
}

#[test]
fn disconnect_blocking() {
    exactly_once(Outcome::Disconnect, Mode::Blocking);
}

#[test]
fn disconnect_future() {
    exactly_once(Outcome::Disconnect, Mode::Future);
}

#[test]
fn shutdown_callback() {
    exactly_once(Outcome::Shutdown, Mode::Callback);
}

#[test]
fn shutdown_blocking() {
    exactly_once(Outcome::Shutdown, Mode::Blocking);
}

#[test]
fn shutdown_future() {
    exactly_once(Outcome::Shutdown, Mode::Future);
}

/// The peer each outcome needs.
enum Peer {
    /// Answers every request.
    Echo(Server),
    /// Never answers.
    Silent(SilentServer),
    /// Reads `REQUESTS` frames, then closes the connection unanswered.
    Dropper(JoinHandle<()>),
}

impl Peer {
    fn start(outcome: Outcome) -> (SocketAddr, Peer) {
        match outcome {
            Outcome::Response => {
                let server = echo_server();
                (server.addr, Peer::Echo(server))
            }
            Outcome::Timeout | Outcome::Shutdown => {
                let server = SilentServer::start();
                (server.addr, Peer::Silent(server))
            }
            Outcome::Disconnect => {
                let (addr, handle) = raw_server(|mut stream| {
                    for _ in 0..REQUESTS {
                        read_frame(&mut stream).expect("a request frame");
                    }
                    // Dropping the stream closes the connection.
                });
                (addr, Peer::Dropper(handle))
            }
        }
    }
}

fn exactly_once(outcome: Outcome, mode: Mode) {
    let (addr, peer) = Peer::start(outcome);
    let client_transport = transport();
    let client = Arc::new(ConnectionManager::new(&client_transport));
    let timeout = match outcome {
        Outcome::Timeout => SHORT_TIMEOUT,
        _ => NEVER,
    };
    let requests: Vec<Packet> = (0..REQUESTS)
        .map(|i| Packet::new(i as i32 + 1, format!("request-{i}")))
        .collect();

    let recorder = Recorder::new(REQUESTS);
    let pending = Pending::issue(mode, &client, addr, &requests, timeout, &recorder);
    if outcome == Outcome::Shutdown {
        let Peer::Silent(server) = &peer else {
            unreachable!("shutdown uses a silent server")
        };
        server.wait_received(REQUESTS);
        stop(&client_transport);
    }
    let results = pending.finish(&recorder);

    let stats = client_transport.stats();
    assert_eq!(stats.pending, 0, "no request left pending: {stats:?}");
    if outcome == Outcome::Timeout {
        assert_eq!(stats.timeouts, REQUESTS as u64, "{stats:?}");
    }
    stop(&client_transport);
    if let Mode::Callback = mode {
        assert_eq!(recorder.calls(), vec![1; REQUESTS], "callback invocations");
    }

    assert_eq!(results.len(), REQUESTS);
    for (request, result) in requests.iter().zip(&results) {
        match (outcome, result) {
            (Outcome::Response, Ok(response)) => {
                assert_eq!(response.pcode(), request.pcode());
                assert_eq!(response.body(), request.body());
            }
            (Outcome::Timeout, Err(Error::Timeout))
            | (Outcome::Disconnect, Err(Error::Disconnected))
            | (Outcome::Shutdown, Err(Error::Shutdown)) => {}
            (_, other) => panic!("{outcome:?}/{mode:?}: request {request:?} ended with {other:?}"),
        }
    }
    // Each request reached the server once: nothing was lost or resent.
    match peer {
        Peer::Echo(server) => assert_eq!(server.transport.stats().packets_in, REQUESTS as u64),
        Peer::Silent(server) => {
            server.wait_received(REQUESTS);
            assert_eq!(server.received(), REQUESTS);
        }
        Peer::Dropper(handle) => within("raw server", move || handle.join().unwrap()),
    }
}

/// Requests in flight, waited on one way.
enum Pending {
    Callback,
    Blocking(Vec<JoinHandle<Result<Packet, Error>>>),
    Future(Vec<ResponseFuture>),
}

impl Pending {
    fn issue(
        mode: Mode,
        client: &Arc<ConnectionManager>,
        addr: SocketAddr,
        requests: &[Packet],
        timeout: std::time::Duration,
        recorder: &Arc<Recorder>,
    ) -> Pending {
        let timeout = Some(timeout);
        match mode {
            Mode::Callback => {
                for (i, request) in requests.iter().enumerate() {
                    client
                        .send(addr, request.clone(), timeout, recorder.handler(i))
                        .expect("send");
                }
                Pending::Callback
            }
            Mode::Blocking => Pending::Blocking(
                (requests.iter().cloned())
                    .map(|request| {
                        let client = client.clone();
                        thread::spawn(move || client.call(addr, request, timeout))
                    })
                    .collect(),
            ),
            Mode::Future => Pending::Future(
                (requests.iter().cloned())
                    .map(|request| client.call_async(addr, request, timeout).expect("submit"))
                    .collect(),
            ),
        }
    }

    /// Waits (bounded) for every outcome, in request order.
    fn finish(self, recorder: &Recorder) -> Vec<Result<Packet, Error>> {
        match self {
            Pending::Callback => {
                recorder.wait_all_called();
                recorder.results()
            }
            Pending::Blocking(threads) => within("blocking calls", move || {
                (threads.into_iter())
                    .map(|t| t.join().expect("caller thread"))
                    .collect()
            }),
            Pending::Future(futures) => within("futures", move || {
                futures.into_iter().map(tokio_test::block_on).collect()
            }),
        }
    }
}

// Cancellation: the caller stops waiting, which removes the request too.

#[test]
fn dropping_a_future_cancels_its_request_and_a_later_reply_is_late() {
    let server = SilentServer::start();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    let future = client
        .call_async(server.addr, Packet::new(1, "abandoned"), Some(NEVER))
        .expect("submit");
    server.wait_received(1);
    assert_eq!(client_transport.stats().pending, 1);

    drop(future);
    assert_eq!(client_transport.stats().pending, 0, "dropping withdrew it");
    let (request, responder) = server.take().remove(0);
    responder.reply(request.reply("too late")).expect("reply");
    assert!(wait_until(WAIT_LIMIT, || {
        client_transport.stats().late_responses == 1
    }));
}

#[test]
fn wait_all_timeout_withdraws_what_did_not_arrive() {
    let server = SilentServer::start();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    let mut wait = WaitObject::new();
    for body in ["answered", "ignored"] {
        client
            .send_wait(server.addr, Packet::new(1, body), Some(NEVER), &mut wait)
            .expect("send_wait");
    }
    server.wait_received(2);
    for (request, responder) in server.take() {
        if request.body() == "answered" {
            responder.reply(request.reply("yes")).expect("reply");
        }
    }

    let (answered, rest) = within("waits", move || {
        let answered = wait.wait_any().expect("the answered request");
        (answered, wait.wait_all_timeout(SHORT_TIMEOUT))
    });
    let (index, response) = answered;
    assert_eq!(
        (index, &response.expect("a response").body()[..]),
        (0, &b"yes"[..])
    );
    assert_eq!(rest.len(), 1, "only what was not taken yet");
    assert!(matches!(rest[0], Err(Error::Timeout)), "{:?}", rest[0]);
    assert_eq!(
        client_transport.stats().pending,
        0,
        "the unanswered one was withdrawn"
    );
}
