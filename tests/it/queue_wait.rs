//! Per-server settings changed at run time, and submissions that wait for
//! room in a full queue (`with_queue_wait`, tbnet's `noblocking = false`).

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tbnet::{ConnectionManager, Error, Packet};

use crate::support::*;

/// Waits until `n` submissions to `server` are blocked waiting for room.
fn wait_blocked(client: &ConnectionManager, server: std::net::SocketAddr, n: u64) {
    assert!(
        wait_until(WAIT_LIMIT, || client
            .server_stats(server)
            .is_some_and(|s| s.waiting == n)),
        "{n} submissions never blocked: {:?}",
        client.server_stats(server)
    );
}

/// Answers every request `server` holds (echo).
fn answer_all(server: &SilentServer) {
    for (request, responder) in server.take() {
        echo(request, responder);
    }
}

/// How a blocked submission is made, one per way of waiting.
#[derive(Clone, Copy, Debug)]
enum Way {
    Call,
    Callback,
    Future,
}

/// Submits `body` in `way` on its own thread and returns its outcome.
fn submit(
    client: &Arc<ConnectionManager>,
    server: std::net::SocketAddr,
    way: Way,
    body: &'static str,
) -> thread::JoinHandle<Result<Packet, Error>> {
    let client = client.clone();
    thread::spawn(move || {
        let request = Packet::new(1, body);
        match way {
            Way::Call => client.call(server, request, Some(NEVER)),
            Way::Callback => {
                let (tx, rx) = std::sync::mpsc::channel();
                client
                    .send(server, request, Some(NEVER), move |r| {
                        let _ = tx.send(r);
                    })
                    .map_err(|e| e.into_parts().0)?;
                rx.recv_timeout(HANG_GUARD).expect("the callback ran")
            }
            Way::Future => {
                let future = client
                    .call_async(server, request, Some(NEVER))
                    .map_err(|e| e.into_parts().0)?;
                tokio_test::block_on(future)
            }
        }
    })
}

#[test]
fn a_full_queue_waits_for_room_freed_by_a_response_in_every_way() {
    for way in [Way::Call, Way::Callback, Way::Future] {
        let server = SilentServer::start();
        let client_transport = transport();
        let client = Arc::new(
            ConnectionManager::new(&client_transport)
                .with_queue_limit(1)
                .with_queue_wait(NEVER),
        );
        let first = submit(&client, server.addr, way, "first");
        server.wait_received(1);
        let second = submit(&client, server.addr, way, "second");
        wait_blocked(&client, server.addr, 1);
        assert_eq!(server.received(), 1, "{way:?}: the second waits for room");

        // The first response frees the slot: the second goes out.
        answer_all(&server);
        let first = within("first", move || first.join().unwrap());
        assert_eq!(first.unwrap().body(), "first", "{way:?}");
        server.wait_received(2);
        answer_all(&server);
        let second = within("second", move || second.join().unwrap());
        assert_eq!(second.unwrap().body(), "second", "{way:?}");
        assert_eq!(client.server_stats(server.addr).unwrap().waiting, 0);
        stop(&client_transport);
        stop(&server.transport);
    }
}

#[test]
fn a_wait_for_room_ends_with_queue_full_and_the_packet_back() {
    let server = SilentServer::start();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport)
        .with_queue_limit(1)
        .with_queue_wait(SHORT_TIMEOUT);
    assert_eq!(client.queue_wait(), SHORT_TIMEOUT);
    client
        .send(server.addr, Packet::new(1, "held"), Some(NEVER), |_| {})
        .unwrap();
    let refused = client
        .call_async(server.addr, Packet::new(2, "no room"), Some(NEVER))
        .expect_err("no room came");
    assert!(matches!(refused.error(), Error::QueueFull), "{refused:?}");
    assert_eq!(refused.into_inner().body(), "no room");
    let call = client.call(server.addr, Packet::new(2, "no room"), Some(NEVER));
    assert!(matches!(call, Err(Error::QueueFull)), "{call:?}");
    let posted = client.post(server.addr, Packet::new(2, "post"));
    assert!(matches!(posted.unwrap_err().error(), Error::QueueFull));
    assert_eq!(server.received(), 1);
    stop(&client_transport);
    stop(&server.transport);
}

#[test]
fn a_timeout_or_a_raised_limit_makes_room_for_a_waiting_submission() {
    let server = SilentServer::start();
    let client_transport = transport();
    let client = Arc::new(
        ConnectionManager::new(&client_transport)
            .with_queue_limit(2)
            .with_queue_wait(NEVER),
    );
    client.set_queue_limit(server.addr, 1).unwrap();
    client.connect(server.addr).expect("connect");
    // The held request times out: its slot goes to the waiting one. Its
    // timeout is long enough that it reaches the server under load.
    client
        .send(
            server.addr,
            Packet::new(1, "expires"),
            Some(Duration::from_secs(2)),
            |_| {},
        )
        .unwrap();
    let waiting = submit(&client, server.addr, Way::Call, "after timeout");
    server.wait_received(2);
    assert!(wait_until(WAIT_LIMIT, || client_transport.stats().timeouts == 1));

    // A raised limit lets a waiting one through with nothing answered.
    let raised = submit(&client, server.addr, Way::Future, "after raise");
    wait_blocked(&client, server.addr, 1);
    client.set_queue_limit(server.addr, 2).unwrap();
    server.wait_received(3);
    answer_all(&server);
    for handle in [waiting, raised] {
        assert!(within("waiting", move || handle.join().unwrap()).is_ok());
    }
    stop(&client_transport);
    stop(&server.transport);
}

#[test]
fn a_waiting_submission_ends_when_the_transport_stops() {
    let server = SilentServer::start();
    let client_transport = transport();
    let client = Arc::new(
        ConnectionManager::new(&client_transport)
            .with_queue_limit(1)
            .with_queue_wait(NEVER),
    );
    let first = submit(&client, server.addr, Way::Callback, "first");
    server.wait_received(1);
    let second = submit(&client, server.addr, Way::Call, "second");
    wait_blocked(&client, server.addr, 1);
    stop(&client_transport);
    for handle in [first, second] {
        let outcome = within("a stopped submission", move || handle.join().unwrap());
        assert!(matches!(outcome, Err(Error::Shutdown)), "{outcome:?}");
    }
    stop(&server.transport);
}

#[test]
fn queue_limits_are_per_server_and_change_at_run_time() {
    let a = SilentServer::start();
    let b = SilentServer::start();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    // Set before the first connection: it opens with the limit.
    client.set_queue_limit(a.addr, 2).unwrap();
    let send =
        |addr, body: &'static str| client.send(addr, Packet::new(1, body), Some(NEVER), |_| {});
    send(a.addr, "a1").unwrap();
    send(a.addr, "a2").unwrap();
    assert!(matches!(
        send(a.addr, "a3").unwrap_err().error(),
        Error::QueueFull
    ));
    for i in 0..5 {
        send(b.addr, ["b0", "b1", "b2", "b3", "b4"][i]).expect("b keeps the default limit");
    }
    // Lowered on the open connection: the two pending stay, none joins.
    client.set_queue_limit(a.addr, 1).unwrap();
    a.wait_received(2);
    answer_all(&a);
    assert!(wait_until(WAIT_LIMIT, || client_transport.stats().pending == 5));
    send(a.addr, "a4").unwrap();
    assert!(matches!(
        send(a.addr, "a5").unwrap_err().error(),
        Error::QueueFull
    ));
    // Raised again.
    client.set_queue_limit(a.addr, 3).unwrap();
    send(a.addr, "a5").unwrap();
    send(a.addr, "a6").unwrap();
    assert!(matches!(
        send(a.addr, "a7").unwrap_err().error(),
        Error::QueueFull
    ));
    assert!(matches!(
        client.set_queue_limit("tcp:no-port", 1),
        Err(Error::InvalidAddress { .. })
    ));
    stop(&client_transport);
    stop(&a.transport);
    stop(&b.transport);
}

#[test]
fn default_timeouts_are_per_server_and_change_at_run_time() {
    let a = SilentServer::start();
    let b = SilentServer::start();
    let client_transport = transport();
    let client = Arc::new(ConnectionManager::new(&client_transport).with_default_timeout(NEVER));
    client.set_default_timeout(a.addr, SHORT_TIMEOUT).unwrap();
    let recorder = Recorder::new(1);
    client
        .send(b.addr, Packet::new(1, "b"), None, recorder.handler(0))
        .unwrap();
    b.wait_received(1);
    // a's own timeout, not the manager's default (NEVER): ends within the
    // hang guard.
    let caller = client.clone();
    let addr = a.addr;
    let timed_out = within("a call with a's timeout", move || {
        caller.call(addr, Packet::new(1, "a"), None)
    });
    assert!(matches!(timed_out, Err(Error::Timeout)), "{timed_out:?}");
    assert_eq!(recorder.total_calls(), 0, "b keeps the manager's default");

    // Changed on the open connection: later requests to b use it.
    client
        .set_default_timeout(b.addr, Duration::from_millis(100))
        .unwrap();
    let timed_out = client.call(b.addr, Packet::new(1, "b2"), None);
    assert!(matches!(timed_out, Err(Error::Timeout)), "{timed_out:?}");
    assert_eq!(
        recorder.total_calls(),
        0,
        "the earlier request keeps its own"
    );
    // "b2" may time out before it is written: it need not reach b.
    drop(b.take());
    stop(&client_transport);
    stop(&a.transport);
    stop(&b.transport);
}
