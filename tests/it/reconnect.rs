//! Losing a server: pending requests fail with `Disconnected`, and the next
//! request opens a new connection.

use std::net::TcpListener;
use std::sync::Arc;
use std::thread;

use tbnet::{Backoff, ConnectionManager, Error, Packet, WhileDown};

use crate::support::{
    echo_server, echo_server_on, frame, healthy_once_open, loopback, one_request_each_way,
    read_frame, reserve_port, send_bytes, stop, transport, within, SilentServer, HANG_GUARD, NEVER,
    SHORT_TIMEOUT,
};

#[test]
fn pending_calls_fail_when_the_server_stops_and_later_calls_reconnect() {
    // Held across both servers, so the second gets the first one's port.
    let port = reserve_port();
    let addr = port.addr();
    let first = SilentServer::start_on(addr);
    let client_transport = transport();
    let client =
        Arc::new(ConnectionManager::new(&client_transport).with_backoff(healthy_once_open()));

    let (recorder, future, blocking) = one_request_each_way(&client, addr);
    first.wait_received(3);
    stop(&first.transport);

    recorder.wait_all_called();
    let callback = recorder.results().remove(0);
    assert!(matches!(callback, Err(Error::Disconnected)), "{callback:?}");
    let future = within("future", move || tokio_test::block_on(future));
    assert!(matches!(future, Err(Error::Disconnected)), "{future:?}");
    let blocking = within("blocking call", move || blocking.join().unwrap());
    assert!(matches!(blocking, Err(Error::Disconnected)), "{blocking:?}");
    assert_eq!(client.connections(), 0, "the lost connection is not reused");

    // A connection that was open and got lost is retried at once.

    let second = echo_server_on(addr);
    let response = client.call(addr, Packet::new(1, "again"), Some(NEVER));
    assert_eq!(response.expect("served by the new server").body(), "again");
    assert_eq!(client.connections(), 1);
    assert_eq!(client_transport.stats().connections_total, 2);
    assert_eq!(second.transport.stats().packets_in, 1);
    stop(&client_transport);
    stop(&second.transport);
    drop(port);
}

#[test]
fn a_call_after_the_server_dropped_the_connection_opens_a_new_one() {
    let listener = TcpListener::bind(loopback()).expect("bind");
    let addr = listener.local_addr().unwrap();
    let raw = thread::spawn(move || {
        // First connection: read the request, close without answering.
        let (mut stream, _) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(HANG_GUARD)).unwrap();
        read_frame(&mut stream).expect("request 1");
        drop(stream);
        // Second connection: answer.
        let (mut stream, _) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(HANG_GUARD)).unwrap();
        let request = read_frame(&mut stream).expect("request 2");
        send_bytes(&mut stream, &frame(request.chid, request.pcode, b"second"));
        let _ = read_frame(&mut stream); // until the client closes
    });
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport).with_backoff(healthy_once_open());

    let first = client.call(addr, Packet::new(1, "one"), Some(NEVER));
    assert!(matches!(first, Err(Error::Disconnected)), "{first:?}");
    let second = client.call(addr, Packet::new(1, "two"), Some(NEVER));
    assert_eq!(second.expect("a new connection").body(), "second");
    assert_eq!(client_transport.stats().connections_total, 2);

    stop(&client_transport);
    within("raw server", move || raw.join().unwrap());
}

#[test]
fn while_down_requests_fail_fast_during_the_backoff_without_connecting() {
    // Refuses connections: nobody listens on it while it is held.
    let dead = reserve_port();
    let addr = dead.addr();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport).with_backoff(Backoff {
        initial: NEVER,
        max: NEVER,
        ..Backoff::default()
    });

    let refused = client.call(addr, Packet::new(1, "refused"), Some(NEVER));
    assert!(matches!(refused, Err(Error::Disconnected)), "{refused:?}");
    let attempts = client_transport.stats().connections_total;
    for _ in 0..3 {
        let fast = client.call(addr, Packet::new(1, "backing off"), Some(NEVER));
        assert!(matches!(fast, Err(Error::Disconnected)), "{fast:?}");
    }
    assert_eq!(
        client_transport.stats().connections_total,
        attempts,
        "no connect attempt during the backoff"
    );
    stop(&client_transport);
    drop(dead);
}

#[test]
fn while_down_queue_waits_out_the_backoff_then_connects() {
    // Refuses connections until a server listens on it.
    let port = reserve_port();
    let addr = port.addr();
    let client_transport = transport();
    let backoff = Backoff {
        initial: SHORT_TIMEOUT,
        max: SHORT_TIMEOUT,
        ..Backoff::default()
    };
    let client = ConnectionManager::new(&client_transport)
        .with_backoff(backoff)
        .with_while_down(WhileDown::Queue);

    let refused = client.call(addr, Packet::new(1, "refused"), Some(NEVER));
    assert!(matches!(refused, Err(Error::Disconnected)), "{refused:?}");
    let server = echo_server_on(addr);
    // Queued on a connection that starts connecting when the backoff ends.
    let response = client.call(addr, Packet::new(1, "queued"), Some(NEVER));
    assert_eq!(response.expect("served after the backoff").body(), "queued");
    stop(&client_transport);
    stop(&server.transport);
    drop(port);
}

#[test]
fn connections_are_reused_per_server() {
    let a = echo_server();
    let b = echo_server();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    for round in 0..3 {
        for server in [&a, &b] {
            let response = client.call(server.addr, Packet::new(1, "hi"), Some(NEVER));
            assert_eq!(response.expect("a response").body(), "hi", "round {round}");
        }
    }
    assert_eq!(client.connections(), 2);
    assert_eq!(a.transport.stats().connections, 1);
    assert_eq!(client_transport.stats().connections_total, 2);
}
