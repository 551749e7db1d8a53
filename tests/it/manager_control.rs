//! Managing a server's connection by hand: `connect`, `disconnect`,
//! `is_alive`, and `WhileDown::StayDown` (no automatic reconnect).

use std::sync::Arc;
use std::time::Duration;

use tbnet::{ConnectionManager, Error, Packet, WhileDown};

use crate::support::*;

#[test]
fn connect_opens_at_once_and_is_alive_follows_the_connection() {
    let server = echo_server();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    assert!(!client.is_alive(server.addr), "never connected");
    assert!(!client.is_alive("tcp:nonsense"), "a bad spec is not alive");

    client.connect(server.addr).expect("connect");
    assert!(client.is_alive(server.addr));
    assert!(client.is_alive(format!("tcp:{}", server.addr)));
    assert_eq!(client.connections(), 1);
    assert!(wait_until(WAIT_LIMIT, || server
        .transport
        .stats()
        .connections
        == 1));
    // Connecting again reuses the open connection.
    client.connect(server.addr).expect("connect again");
    let answer = client.call(server.addr, Packet::new(1, "hi"), Some(NEVER));
    assert_eq!(answer.unwrap().body(), "hi");
    assert_eq!(client_transport.stats().connect_attempts, 1);
    stop(&client_transport);
    stop(&server.transport);
}

#[test]
fn connect_to_a_refusing_port_fails_with_the_cause() {
    let port = reserve_port();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    match client.connect(port.addr()) {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!client.is_alive(port.addr()));
    match client.connect("tcp:127.0.0.1") {
        Err(Error::InvalidAddress { reason, .. }) => assert!(reason.contains("host:port")),
        other => panic!("{other:?}"),
    }
    stop(&client_transport);
}

#[test]
fn disconnect_fails_pending_requests_every_way_and_the_next_use_reconnects_at_once() {
    let server = SilentServer::start();
    let client_transport = transport();
    let client = Arc::new(ConnectionManager::new(&client_transport));
    let (recorder, future, blocking) = one_request_each_way(&client, server.addr);
    server.wait_received(3);

    assert!(client.disconnect(server.addr));
    assert!(!client.is_alive(server.addr));
    assert!(!client.disconnect(server.addr), "already closed");
    recorder.wait_all_called();
    assert!(matches!(recorder.results()[0], Err(Error::Disconnected)));
    assert!(matches!(
        tokio_test::block_on(future),
        Err(Error::Disconnected)
    ));
    let blocking = within("blocking call", move || blocking.join().unwrap());
    assert!(matches!(blocking, Err(Error::Disconnected)));
    // The socket is gone too (the server, holding unanswered requests,
    // drains its side until it answers them).
    assert!(wait_until(WAIT_LIMIT, || client_transport
        .stats()
        .connections
        == 0));

    // No failure of the server's: no backoff, the next request reconnects.
    let stats = client.server_stats(server.addr).unwrap();
    assert_eq!((stats.early_failures, stats.failures_in_a_row), (0, 0));
    client
        .send(server.addr, Packet::new(1, "again"), Some(NEVER), |_| {})
        .expect("reconnects on use");
    server.wait_received(4);
    assert!(client.is_alive(server.addr));
    assert_eq!(
        client.server_stats(server.addr).unwrap().connect_attempts,
        2
    );
    drop(server.take());
    stop(&client_transport);
    stop(&server.transport);
}

#[test]
fn stay_down_keeps_a_lost_connection_down_until_connect() {
    let port = reserve_port();
    // A first server that answers one request, then closes the connection.
    let (addr, first) = raw_server_on(port.addr(), |mut stream| {
        let request = read_frame(&mut stream).expect("a request");
        send_bytes(&mut stream, &frame(request.chid, request.pcode, b"once"));
    });
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport)
        .with_backoff(healthy_once_open())
        .with_while_down(WhileDown::StayDown);
    let answer = client.call(addr, Packet::new(1, "first"), Some(NEVER));
    assert_eq!(answer.unwrap().body(), "once");
    within("first server", move || first.join().unwrap());
    assert!(wait_until(WAIT_LIMIT, || !client.is_alive(addr)));

    // Down, and it stays down: every way of sending fails at once.
    let server = echo_server_on(addr);
    assert!(matches!(
        client.call(addr, Packet::new(1, "x"), Some(NEVER)),
        Err(Error::Disconnected)
    ));
    let refused = client.post(addr, Packet::new(1, "y")).unwrap_err();
    assert!(matches!(refused.error(), Error::Disconnected));
    let Err(refused) = client.call_async(addr, Packet::new(1, "z"), None) else {
        panic!("call_async was accepted while down");
    };
    assert!(matches!(refused.error(), Error::Disconnected));
    assert_eq!(client_transport.stats().connect_attempts, 1);
    assert!(!client.is_alive(addr));

    // Until connect.
    client.connect(addr).expect("connect");
    let answer = client.call(addr, Packet::new(1, "back"), Some(NEVER));
    assert_eq!(answer.unwrap().body(), "back");
    assert_eq!(client_transport.stats().connect_attempts, 2);

    // A disconnect keeps it down as well.
    assert!(client.disconnect(addr));
    assert!(matches!(
        client.call(addr, Packet::new(1, "x"), Some(NEVER)),
        Err(Error::Disconnected)
    ));
    client
        .connect(format!("tcp:{addr}"))
        .expect("connect by spec");
    assert!(client.call(addr, Packet::new(1, "x"), Some(NEVER)).is_ok());
    stop(&client_transport);
    stop(&server.transport);
}

#[test]
fn connect_does_not_wait_out_a_queued_reconnect_delay() {
    let port = reserve_port();
    let client_transport = transport();
    // After one failed attempt the next waits at least a minute.
    let client = ConnectionManager::new(&client_transport)
        .with_backoff(tbnet::Backoff {
            initial: Duration::from_secs(120),
            max: Duration::from_secs(120),
            ..tbnet::Backoff::default()
        })
        .with_while_down(WhileDown::Queue);
    match client.connect(port.addr()) {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused),
        other => panic!("nobody listens yet: expected a refusal, got {other:?}"),
    }
    assert_eq!(
        client.server_stats(port.addr()).unwrap().failures_in_a_row,
        1
    );
    // Queued on a connection that opens when the delay ends.
    let queued = client
        .call_async(port.addr(), Packet::new(1, "queued"), Some(NEVER))
        .expect("queued");
    let server = echo_server_on(port.addr());
    client.connect(port.addr()).expect("connects now");
    assert_eq!(
        tokio_test::block_on(queued).expect("answered").body(),
        "queued"
    );
    stop(&client_transport);
    stop(&server.transport);
}

#[test]
fn closing_a_client_connection_by_its_handle_is_no_failure_of_the_server() {
    let server = echo_server();
    let client_transport = transport();
    // The handle of the connection that opened last.
    let opened = Arc::new(std::sync::Mutex::new(None));
    let hook = opened.clone();
    // A failure would hold the next connection back for a minute or more;
    // the long grace keeps the connection unproven however late the hook
    // runs.
    let client = ConnectionManager::new(&client_transport)
        .with_events(move |conn: &tbnet::ConnectionHandle, event| {
            if event == tbnet::ConnectionEvent::Connected {
                *hook.lock().unwrap() = Some(conn.clone());
            }
        })
        .with_backoff(tbnet::Backoff {
            initial: Duration::from_secs(120),
            max: Duration::from_secs(120),
            grace: Duration::from_secs(120),
        });
    // Open, and closed before it proved healthy (no response yet).
    client.connect(server.addr).expect("connect");
    assert!(wait_until(WAIT_LIMIT, || opened.lock().unwrap().is_some()));
    let handle = opened.lock().unwrap().take().unwrap();
    handle.close();
    assert!(wait_until(WAIT_LIMIT, || !client.is_alive(server.addr)));

    let stats = client.server_stats(server.addr).unwrap();
    assert_eq!((stats.early_failures, stats.failures_in_a_row), (0, 0));
    let reply = client.call(server.addr, Packet::new(1, "again"), Some(NEVER));
    assert_eq!(reply.expect("reconnects at once").body(), &b"again"[..]);
    assert_eq!(
        client.server_stats(server.addr).unwrap().connect_attempts,
        2
    );
    stop(&client_transport);
    stop(&server.transport);
}
