//! The server side: where handlers run, hostile frames, back-pressure,
//! panicking handlers, replies to closed connections, idle connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use tbnet::{ConnectionManager, Dispatch, Error, Packet, Responder, Transport, WaitObject};

use crate::support::{
    closed_by_peer, echo, echo_server, frame, header, loopback, raw_client, read_frame, send_bytes,
    stop, transport, wait_until, within, Gate, FLAG, NEVER, SHORT_TIMEOUT, WAIT_LIMIT,
};

/// Answers with the name of the thread the handler ran on.
fn thread_name(request: Packet, responder: Responder) {
    let name = thread::current().name().unwrap_or("unnamed").to_owned();
    let _ = responder.reply(request.reply(name));
}

/// Calls `addr` once and returns the response body as text.
fn handler_thread(client: &ConnectionManager, addr: SocketAddr) -> String {
    let response = client.call(addr, Packet::new(1, "where"), Some(NEVER));
    let body = response.expect("a response").into_body();
    String::from_utf8(body.to_vec()).expect("a thread name")
}

#[test]
fn io_thread_dispatch_serves_requests_on_the_io_thread() {
    let server_transport = Transport::builder()
        .dispatch(Dispatch::IoThread)
        .start()
        .expect("start");
    let addr = server_transport
        .listen(loopback(), thread_name)
        .expect("listen");
    let client = ConnectionManager::new(&transport());
    assert_eq!(handler_thread(&client, addr), "tbnet-io");
}

#[test]
fn worker_dispatch_serves_requests_on_a_worker() {
    let server_transport = transport();
    let addr = server_transport
        .listen(loopback(), thread_name)
        .expect("listen");
    let client = ConnectionManager::new(&transport());
    let name = handler_thread(&client, addr);
    assert!(name.starts_with("tbnet-worker-"), "{name}");
}

#[test]
fn listen_with_overrides_the_builder_dispatch() {
    let io_default = Transport::builder()
        .dispatch(Dispatch::IoThread)
        .start()
        .expect("start");
    let on_workers = io_default
        .listen_with(loopback(), thread_name, Dispatch::Workers)
        .expect("listen");
    let workers_default = transport();
    let on_io = workers_default
        .listen_with(loopback(), thread_name, Dispatch::IoThread)
        .expect("listen");

    let client = ConnectionManager::new(&transport());
    let name = handler_thread(&client, on_workers);
    assert!(name.starts_with("tbnet-worker-"), "{name}");
    assert_eq!(handler_thread(&client, on_io), "tbnet-io");
}

#[test]
fn bad_frames_close_only_their_own_connection() {
    let server = echo_server();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    let call = |body: &'static str| {
        let response = client.call(server.addr, Packet::new(1, body), Some(NEVER));
        assert_eq!(response.expect("the good client is served").body(), body);
    };
    call("before");

    let bad_headers = [
        ("wrong flag", header(0xDEAD_BEEF, 1, 0, 4)),
        ("negative length", header(FLAG, 1, 0, -1)),
        ("length over 64 MiB", header(FLAG, 1, 0, 0x0400_0001)),
    ];
    for (n, (what, bad)) in bad_headers.iter().enumerate() {
        let mut hostile = raw_client(server.addr);
        // A good frame first: the connection is served until the bad one.
        send_bytes(&mut hostile, &frame(3, 0, b"fine"));
        let reply = read_frame(&mut hostile).expect("a reply");
        assert_eq!(reply.body, b"fine");
        send_bytes(&mut hostile, bad);
        assert!(closed_by_peer(&mut hostile), "{what}: the server closes it");
        assert_eq!(server.transport.stats().bad_frames, n as u64 + 1, "{what}");
        call("meanwhile");
    }

    assert_eq!(server.transport.stats().connections, 1, "only the good one");
    assert_eq!(
        client_transport.stats().connections_total,
        1,
        "the good client's connection was never lost"
    );
}

#[test]
fn full_worker_queue_pauses_reading_and_drops_no_request() {
    const REQUESTS: usize = 20;
    let server_transport = Transport::builder()
        .workers(1)
        .worker_queue(1)
        .start()
        .expect("start");
    let gate = Gate::default();
    let entered = Arc::new(AtomicUsize::new(0));
    let addr = {
        let (gate, entered) = (gate.clone(), entered.clone());
        server_transport
            .listen(loopback(), move |request: Packet, responder: Responder| {
                entered.fetch_add(1, Ordering::SeqCst);
                gate.pass();
                echo(request, responder);
            })
            .expect("listen")
    };
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    let mut wait = WaitObject::new();
    for i in 0..REQUESTS {
        let request = Packet::new(1, format!("queued-{i}"));
        client
            .send_wait(addr, request, Some(NEVER), &mut wait)
            .expect("send_wait");
    }

    // The only worker is stuck and the queue behind it is full.
    assert!(wait_until(WAIT_LIMIT, || {
        entered.load(Ordering::SeqCst) == 1 && server_transport.stats().worker_queue == 1
    }));
    gate.open();
    let results = within("wait_all", move || wait.wait_all());
    for (i, result) in results.into_iter().enumerate() {
        let response = result.unwrap_or_else(|e| panic!("request {i}: {e:?}"));
        assert_eq!(response.body(), &format!("queued-{i}"));
    }
    assert_eq!(entered.load(Ordering::SeqCst), REQUESTS);
    assert_eq!(server_transport.stats().packets_in, REQUESTS as u64);
}

#[test]
fn a_panicking_handler_leaves_its_request_unanswered_and_the_server_serving() {
    for dispatch in [Dispatch::Workers, Dispatch::IoThread] {
        let server_transport = transport();
        let addr = server_transport
            .listen_with(
                loopback(),
                |request: Packet, responder: Responder| {
                    if request.pcode().get() == 666 {
                        panic!("a handler bug (expected by this test)");
                    }
                    echo(request, responder);
                },
                dispatch,
            )
            .expect("listen");
        let client = ConnectionManager::new(&transport());

        let doomed = client.call(addr, Packet::new(666, "boom"), Some(SHORT_TIMEOUT));
        assert!(
            matches!(doomed, Err(Error::Timeout)),
            "{dispatch:?}: {doomed:?}"
        );
        let fine = client.call(addr, Packet::new(1, "still here"), Some(NEVER));
        assert_eq!(fine.expect("served after the panic").body(), "still here");
    }
}

#[test]
fn a_reply_for_a_closed_connection_is_dropped_and_counted_never_sent_to_a_newer_one() {
    // pcode 1 is held for later; anything else is echoed. The client's
    // close reads as an end of stream, so the server drains the connection
    // (its held request may still be answered) until the idle limit ends it.
    let server_transport = Transport::builder()
        .idle_timeout(Some(Duration::from_millis(200)))
        .start()
        .expect("start");
    let held = Arc::new(Mutex::new(Vec::new()));
    let addr = {
        let held = held.clone();
        server_transport
            .listen(loopback(), move |request: Packet, responder: Responder| {
                if request.pcode().get() == 1 {
                    held.lock().unwrap().push((request, responder));
                } else {
                    echo(request, responder);
                }
            })
            .expect("listen")
    };
    let old_client = transport();
    let old = ConnectionManager::new(&old_client);
    let pending = old.call_async(addr, Packet::new(1, "held"), Some(NEVER));
    assert!(wait_until(WAIT_LIMIT, || held.lock().unwrap().len() == 1));
    stop(&old_client);
    drop(pending);
    assert!(wait_until(WAIT_LIMIT, || server_transport
        .stats()
        .connections
        == 0));

    // A new connection, which may well reuse the old one's slot.
    let new_client = transport();
    let new = ConnectionManager::new(&new_client);
    let response = new.call(addr, Packet::new(2, "fresh"), Some(NEVER));
    assert_eq!(response.expect("a response").body(), "fresh");

    let (request, responder) = held.lock().unwrap().remove(0);
    let refused = responder
        .reply(request.reply("for the old connection"))
        .expect_err("its connection closed");
    assert!(matches!(
        refused.error(),
        Error::Disconnected | Error::Shutdown
    ));
    assert_eq!(refused.into_inner().body(), "for the old connection");
    assert_eq!(server_transport.stats().replies_dropped, 1);

    // Had it gone to the new connection, it would arrive before this reply.
    let response = new.call(addr, Packet::new(2, "again"), Some(NEVER));
    assert_eq!(response.expect("a response").body(), "again");
    assert_eq!(new_client.stats().late_responses, 0);
    assert_eq!(new_client.stats().packets_in, 2);
}

#[test]
fn idle_connections_are_closed_by_the_server_and_the_client_reconnects() {
    // Long enough that a loaded machine still delivers a request in time.
    const IDLE: Duration = Duration::from_millis(500);
    let server_transport = Transport::builder()
        .workers(2)
        .idle_timeout(Some(IDLE))
        .start()
        .expect("start");
    let addr = server_transport.listen(loopback(), echo).expect("listen");
    let mut silent_peer = raw_client(addr);
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);

    let response = client.call(addr, Packet::new(1, "hello"), Some(NEVER));
    assert_eq!(response.expect("a response").body(), "hello");
    assert!(
        wait_until(WAIT_LIMIT, || client.connections() == 0),
        "the server closed the idle connection"
    );
    let response = client.call(addr, Packet::new(1, "back"), Some(NEVER));
    assert_eq!(response.expect("a new connection").body(), "back");
    assert_eq!(client_transport.stats().connections_total, 2);
    assert!(
        closed_by_peer(&mut silent_peer),
        "a peer that never sent anything is closed too"
    );
}

/// The IO thread's polling after a hand-off (`io_spin`) changes when it
/// sleeps, never what it delivers: with it off, at its default and at its
/// longest, on both sides, every reply, callback and future arrives, and
/// a transport polling when told to stop still stops. (A delivery check:
/// whether the IO thread polls at all depends on a spare core, which a
/// loaded machine may not have.)
#[test]
fn every_io_spin_setting_delivers_every_reply_and_stops() {
    for spin in [
        Duration::ZERO,
        tbnet::DEFAULT_IO_SPIN,
        Duration::from_secs(1),
    ] {
        let builder = || Transport::builder().workers(2).io_spin(spin);
        let server = builder().dispatch(Dispatch::Workers).start().unwrap();
        let addr = server.listen(loopback(), echo).unwrap();
        let client_transport = builder().start().unwrap();
        let client = Arc::new(ConnectionManager::new(&client_transport));
        for i in 0..100 {
            let body = format!("call {i}");
            let reply = client.call(addr, Packet::new(1, body.clone()), Some(WAIT_LIMIT));
            assert_eq!(reply.unwrap().body(), body.as_bytes(), "spin {spin:?}");
        }
        // Callbacks on the client's workers, each sending the next request.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        chain(&client, addr, 0, 50, done_tx);
        let last = done_rx.recv_timeout(WAIT_LIMIT).expect("the chain ends");
        assert_eq!(last, Ok(50), "spin {spin:?}");
        let future = client.call_async(addr, Packet::new(1, "future"), Some(WAIT_LIMIT));
        let reply = tokio_test::block_on(future.expect("queued")).unwrap();
        assert_eq!(reply.body(), &b"future"[..]);
        stop(&client_transport);
        stop(&server);
    }
}

/// Sends request `i`; its callback checks the echo and sends the next,
/// until `n`, then reports how far it got (or the first error).
fn chain(
    client: &Arc<ConnectionManager>,
    addr: SocketAddr,
    i: usize,
    n: usize,
    done: std::sync::mpsc::Sender<Result<usize, String>>,
) {
    if i == n {
        let _ = done.send(Ok(n));
        return;
    }
    let body = format!("link {i}");
    let next = client.clone();
    let sent = client.send(
        addr,
        Packet::new(1, body.clone()),
        Some(WAIT_LIMIT),
        move |result: Result<Packet, Error>| match result {
            Ok(reply) if reply.body() == body.as_bytes() => chain(&next, addr, i + 1, n, done),
            other => {
                let _ = done.send(Err(format!("link {i}: {other:?}")));
            }
        },
    );
    assert!(sent.is_ok(), "link {i} sent");
}
