//! Connection events on both sides, the server's connection handle, and
//! messages a server sends on its own (one-way and requests) to a client's
//! default handler.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tbnet::{
    CloseReason, ConnectionEvent, ConnectionEvents, ConnectionHandle, ConnectionManager, Dispatch,
    Error, ListenOptions, Packet, Responder, Transport,
};

use crate::support::{
    closed_by_peer, echo, frame, loopback, raw_client, read_frame, send_bytes, stop, wait_until,
    within, NEVER, WAIT_LIMIT,
};

/// Every event a hook heard, with the connection's id.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<(u64, ConnectionEvent)>>>);

impl Events {
    fn hook(&self) -> impl ConnectionEvents {
        let seen = self.0.clone();
        move |conn: &ConnectionHandle, event: ConnectionEvent| {
            seen.lock().unwrap().push((conn.id(), event));
        }
    }

    fn all(&self) -> Vec<(u64, ConnectionEvent)> {
        self.0.lock().unwrap().clone()
    }

    fn kinds(&self) -> Vec<ConnectionEvent> {
        self.all().into_iter().map(|(_, e)| e).collect()
    }

    /// Waits until `n` events arrived; fails the test if they do not.
    fn wait(&self, n: usize) -> Vec<ConnectionEvent> {
        assert!(
            wait_until(WAIT_LIMIT, || self.all().len() >= n),
            "heard {:?}, waiting for {n} events",
            self.all()
        );
        self.kinds()
    }
}

/// A transport listening with `options` plus `events`, answering with echo.
fn server_with(
    builder: tbnet::TransportBuilder,
    events: &Events,
) -> (Transport, std::net::SocketAddr) {
    let transport = builder.workers(2).start().expect("start");
    let addr = transport
        .listen_with_options(loopback(), echo, ListenOptions::new().events(events.hook()))
        .expect("listen");
    (transport, addr)
}

#[test]
fn server_hooks_hear_connect_then_peer_closed_once() {
    let events = Events::default();
    let (transport, addr) = server_with(Transport::builder(), &events);
    let mut raw = raw_client(addr);
    send_bytes(&mut raw, &frame(1, 3, b"hi"));
    assert_eq!(read_frame(&mut raw).unwrap().body, b"hi");
    assert_eq!(events.wait(1), [ConnectionEvent::Connected]);
    drop(raw);
    let heard = events.wait(2);
    assert_eq!(
        heard,
        [
            ConnectionEvent::Connected,
            ConnectionEvent::Closed(CloseReason::PeerClosed)
        ]
    );
    let ids: Vec<u64> = events.all().iter().map(|(id, _)| *id).collect();
    assert_eq!(ids[0], ids[1], "both events name the same connection");
    stop(&transport);
    assert_eq!(events.all().len(), 2, "no event twice: {:?}", events.all());
}

#[test]
fn idle_connection_closes_with_reason_idle() {
    let events = Events::default();
    let builder = Transport::builder()
        .idle_timeout(Some(Duration::from_millis(100)))
        .timer_tick(Duration::from_millis(10));
    let (transport, addr) = server_with(builder, &events);
    let mut raw = raw_client(addr);
    assert!(closed_by_peer(&mut raw), "the idle connection stays open");
    assert_eq!(
        events.wait(2),
        [
            ConnectionEvent::Connected,
            ConnectionEvent::Closed(CloseReason::Idle)
        ]
    );
    stop(&transport);
    assert_eq!(events.all().len(), 2);
}

#[test]
fn bad_frame_closes_with_reason_bad_frame() {
    let events = Events::default();
    let (transport, addr) = server_with(Transport::builder(), &events);
    let mut raw = raw_client(addr);
    let mut bad = frame(1, 3, b"x");
    bad[0] = b'G';
    send_bytes(&mut raw, &bad);
    assert!(closed_by_peer(&mut raw));
    assert_eq!(
        events.wait(2),
        [
            ConnectionEvent::Connected,
            ConnectionEvent::Closed(CloseReason::BadFrame)
        ]
    );
    stop(&transport);
    assert_eq!(events.all().len(), 2);
}

#[test]
fn our_shutdown_closes_both_sides_with_reason_shutdown() {
    let server_events = Events::default();
    let client_events = Events::default();
    let (transport, addr) = server_with(Transport::builder(), &server_events);
    let client = ConnectionManager::new(&transport).with_events(client_events.hook());
    client.call(addr, Packet::new(1, "x"), Some(NEVER)).unwrap();
    server_events.wait(1);
    client_events.wait(1);
    // `stop` waits for the hooks of the connections it closed.
    stop(&transport);
    let closed = ConnectionEvent::Closed(CloseReason::Shutdown);
    assert_eq!(client_events.kinds(), [ConnectionEvent::Connected, closed]);
    assert_eq!(server_events.kinds(), [ConnectionEvent::Connected, closed]);
}

#[test]
fn dropping_the_manager_closes_its_connections_with_reason_shutdown() {
    let (server, addr) = server_with(Transport::builder(), &Events::default());
    let client_transport = crate::support::transport();
    let events = Events::default();
    let client = ConnectionManager::new(&client_transport).with_events(events.hook());
    client.call(addr, Packet::new(1, "x"), Some(NEVER)).unwrap();
    drop(client);
    assert_eq!(
        events.wait(2),
        [
            ConnectionEvent::Connected,
            ConnectionEvent::Closed(CloseReason::Shutdown)
        ]
    );
    stop(&client_transport);
    stop(&server);
}

#[test]
fn a_lost_connection_reopens_with_a_reconnect_event() {
    let server_events = Events::default();
    let transport = crate::support::transport();
    // The first request closes its connection from the server side.
    let addr = transport
        .listen_with_options(
            loopback(),
            |request: Packet, responder: Responder| {
                let conn = responder.connection();
                let _ = responder.reply(request.reply(request.body().clone()));
                if request.body() == "close" {
                    conn.close();
                }
            },
            ListenOptions::new().events(server_events.hook()),
        )
        .unwrap();
    let client_transport = crate::support::transport();
    let events = Events::default();
    let client = ConnectionManager::new(&client_transport)
        .with_backoff(crate::support::healthy_once_open())
        .with_events(events.hook());
    // The reply may or may not leave before the close: either ends the call.
    let _ = client.call(addr, Packet::new(1, "close"), Some(NEVER));
    assert_eq!(
        events.wait(2),
        [
            ConnectionEvent::Connected,
            ConnectionEvent::Closed(CloseReason::PeerClosed)
        ]
    );
    assert_eq!(
        server_events.wait(2)[1],
        ConnectionEvent::Closed(CloseReason::Local),
        "the server closed it itself"
    );
    assert!(wait_until(WAIT_LIMIT, || client.connections() == 0));
    let back = client
        .call(addr, Packet::new(1, "again"), Some(NEVER))
        .unwrap();
    assert_eq!(back.body(), "again");
    assert_eq!(events.wait(3)[2], ConnectionEvent::Reconnected);
    let ids: Vec<u64> = events.all().iter().map(|(id, _)| *id).collect();
    assert_ne!(ids[0], ids[2], "a reconnect is a new connection");
    stop(&client_transport);
    assert_eq!(
        events.kinds()[3..],
        [ConnectionEvent::Closed(CloseReason::Shutdown)]
    );
    stop(&transport);
}

#[test]
fn handle_close_ends_pending_requests_both_ways() {
    let transport = crate::support::transport();
    let (held_tx, held_rx) = std::sync::mpsc::channel::<(Packet, Responder)>();
    let held_tx = Mutex::new(held_tx);
    let addr = transport
        .listen(loopback(), move |request: Packet, responder: Responder| {
            let _ = held_tx.lock().unwrap().send((request, responder));
        })
        .unwrap();
    let client_transport = crate::support::transport();
    let client = ConnectionManager::new(&client_transport);
    let pending = client
        .call_async(addr, Packet::new(1, "wait"), Some(NEVER))
        .unwrap();
    let (_request, responder) = held_rx.recv_timeout(WAIT_LIMIT).unwrap();
    let conn = responder.connection();
    assert!(conn.is_server_side());
    assert!(!conn.is_closed());
    // A request of the server's own, which the client (no default handler)
    // never answers.
    let ours = conn
        .call_async(Packet::new(2, "from the server"), Some(NEVER))
        .unwrap();
    assert!(wait_until(WAIT_LIMIT, || client_transport
        .stats()
        .unhandled
        == 1));
    conn.close();
    let client_side = within("the client's request", move || {
        tokio_test::block_on(pending)
    });
    assert!(
        matches!(client_side, Err(Error::Disconnected)),
        "{client_side:?}"
    );
    let server_side = within("the server's request", move || tokio_test::block_on(ours));
    assert!(
        matches!(server_side, Err(Error::Disconnected)),
        "{server_side:?}"
    );
    assert!(conn.is_closed());
    // A handle kept after the close fails cleanly, handing packets back.
    let refused = conn.post(Packet::new(3, "late")).unwrap_err();
    assert!(matches!(refused.error(), Error::Disconnected));
    assert_eq!(refused.into_inner().body(), "late");
    assert!(matches!(
        conn.call(Packet::new(3, "late"), Some(NEVER)),
        Err(Error::Disconnected)
    ));
    // The responder's reply is dropped and counted.
    let dropped = responder.reply(Packet::new(1, "too late")).unwrap_err();
    assert!(matches!(dropped.error(), Error::Disconnected));
    stop(&client_transport);
    stop(&transport);
}

#[test]
fn a_server_request_is_answered_by_the_clients_default_handler() {
    let transport = crate::support::transport();
    // Each request makes the server ask the client something back, from a
    // worker, before it replies with what the client said.
    let addr = transport
        .listen(loopback(), |request: Packet, responder: Responder| {
            let conn = responder.connection();
            let answer = conn.call(Packet::new(9, request.body().clone()), Some(NEVER));
            let body = match answer {
                Ok(packet) => packet.into_body(),
                Err(e) => e.to_string().into(),
            };
            let _ = responder.reply(request.reply(body));
        })
        .unwrap();
    let client_transport = crate::support::transport();
    let client = ConnectionManager::new(&client_transport);
    let ids = Arc::new(Mutex::new(Vec::new()));
    let seen = ids.clone();
    client.set_default_handler(move |request: Packet, responder: Responder| {
        seen.lock().unwrap().push(responder.channel_id().get());
        let upper = request.body().to_ascii_uppercase();
        let _ = responder.reply(request.reply(upper));
    });
    for word in ["ping", "pong"] {
        let back = client
            .call(addr, Packet::new(1, word), Some(NEVER))
            .unwrap();
        assert_eq!(back.body(), word.to_ascii_uppercase().as_bytes());
    }
    let ids = ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 2);
    assert!(
        ids.iter().all(|id| id >> 31 == 1),
        "a server's channel ids have bit 31 set: {ids:x?}"
    );
    assert_eq!(client_transport.stats().unhandled, 0);
    assert_eq!(client_transport.stats().late_responses, 0);
    stop(&client_transport);
    stop(&transport);
}

#[test]
fn server_packets_without_a_default_handler_are_counted() {
    // The connect hook posts a one-way packet and sends a request that
    // nobody answers: both are counted, the request times out once.
    let transport = crate::support::transport();
    let outcome = Arc::new(Mutex::new(Vec::new()));
    let record = outcome.clone();
    let hook = move |conn: &ConnectionHandle, event: ConnectionEvent| {
        if event != ConnectionEvent::Connected {
            return;
        }
        conn.post(Packet::new(5, "hello")).unwrap();
        let record = record.clone();
        conn.send(
            Packet::new(6, "anyone?"),
            // Long enough that it is written even under load.
            Some(Duration::from_secs(2)),
            move |r: Result<Packet, Error>| {
                record.lock().unwrap().push(r.map(|p| p.into_body()));
            },
        )
        .unwrap();
    };
    let addr = transport
        .listen_with_options(loopback(), echo, ListenOptions::new().events(hook))
        .unwrap();
    let client_transport = crate::support::transport();
    let client = ConnectionManager::new(&client_transport);
    client.call(addr, Packet::new(1, "x"), Some(NEVER)).unwrap();
    assert!(
        wait_until(WAIT_LIMIT, || client_transport.stats().unhandled == 2),
        "{:?}",
        client_transport.stats()
    );
    assert!(wait_until(WAIT_LIMIT, || !outcome
        .lock()
        .unwrap()
        .is_empty()));
    stop(&client_transport);
    stop(&transport);
    let outcome = outcome.lock().unwrap();
    assert_eq!(outcome.len(), 1, "the request ended exactly once");
    assert!(matches!(outcome[0], Err(Error::Timeout)), "{outcome:?}");
}

#[test]
fn a_panicking_or_slow_hook_holds_up_no_io() {
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let calls = Arc::new(Mutex::new(0));
    let counted = calls.clone();
    let (entered, hook_blocked) = std::sync::mpsc::channel::<()>();
    let entered = Mutex::new(entered);
    let hook = move |_: &ConnectionHandle, event: ConnectionEvent| {
        let n = {
            let mut calls = counted.lock().unwrap();
            *calls += 1;
            *calls
        };
        if n == 1 {
            panic!("a hook that panics");
        }
        if n == 2 && event == ConnectionEvent::Connected {
            // Blocks until the test has been answered meanwhile (or gave
            // up: its sender is dropped).
            let _ = entered.lock().unwrap().send(());
            let _ = gate.lock().unwrap().recv();
        }
    };
    let transport = crate::support::transport();
    let addr = transport
        .listen_with_options(loopback(), echo, ListenOptions::new().events(hook))
        .unwrap();
    let client_transport = crate::support::transport();
    let first = ConnectionManager::new(&client_transport);
    first.call(addr, Packet::new(1, "a"), Some(NEVER)).unwrap();
    // A second connection, whose hook blocks: while it is blocked, requests
    // are still answered (within a deadline: a hook holding up IO fails
    // the call).
    let second = ConnectionManager::new(&client_transport);
    second.connect(addr).unwrap();
    hook_blocked
        .recv_timeout(WAIT_LIMIT)
        .expect("the second connection's hook runs and blocks");
    assert_eq!(
        second
            .call(addr, Packet::new(1, "b"), Some(WAIT_LIMIT))
            .unwrap()
            .body(),
        "b"
    );
    release.send(()).unwrap();
    drop(first);
    assert!(
        wait_until(WAIT_LIMIT, || *calls.lock().unwrap() >= 3),
        "hooks run on after a panic"
    );
    stop(&client_transport);
    stop(&transport);
}

#[test]
fn a_hook_may_block_on_a_request_over_its_own_connection() {
    // The server's connect hook asks the client a question and waits for
    // the answer (the client's default handler) before anything else.
    let transport = Transport::builder()
        .workers(2)
        .dispatch(Dispatch::IoThread)
        .start()
        .unwrap();
    let answers = Arc::new(Mutex::new(Vec::new()));
    let record = answers.clone();
    let hook = move |conn: &ConnectionHandle, event: ConnectionEvent| {
        if event == ConnectionEvent::Connected {
            let answer = conn.call(Packet::new(4, "who are you?"), Some(NEVER));
            record.lock().unwrap().push(answer.map(|p| p.into_body()));
        }
    };
    let addr = transport
        .listen_with_options(loopback(), echo, ListenOptions::new().events(hook))
        .unwrap();
    let client_transport = crate::support::transport();
    let client = ConnectionManager::new(&client_transport);
    client.set_default_handler(|request: Packet, responder: Responder| {
        let _ = responder.reply(request.reply("a client"));
    });
    client.call(addr, Packet::new(1, "x"), Some(NEVER)).unwrap();
    assert!(wait_until(WAIT_LIMIT, || !answers
        .lock()
        .unwrap()
        .is_empty()));
    assert_eq!(
        answers.lock().unwrap()[0].as_deref().ok(),
        Some(&b"a client"[..])
    );
    stop(&client_transport);
    stop(&transport);
}

#[test]
fn a_tbnet_peer_gets_server_packets_as_frames() {
    // What a C++ tbnet client sees: a one-way packet with channel id 0, and
    // a request whose id has bit 31 set, answered by echoing that id.
    let transport = crate::support::transport();
    let answers = Arc::new(Mutex::new(Vec::new()));
    let record = answers.clone();
    let addr = transport
        .listen(loopback(), move |request: Packet, responder: Responder| {
            let conn = responder.connection();
            let _ = responder.reply(request.reply("ok"));
            conn.post(Packet::new(7, "note")).unwrap();
            let record = record.clone();
            conn.send(
                Packet::new(8, "q"),
                Some(NEVER),
                move |r: Result<Packet, Error>| {
                    record.lock().unwrap().push(r.map(|p| p.into_body()));
                },
            )
            .unwrap();
        })
        .unwrap();
    let mut raw = raw_client(addr);
    send_bytes(&mut raw, &frame(1, 1, b"hi"));
    let reply = read_frame(&mut raw).unwrap();
    assert_eq!((reply.chid, reply.body.as_slice()), (1, &b"ok"[..]));
    let note = read_frame(&mut raw).unwrap();
    assert_eq!(
        (note.chid, note.pcode, note.body.as_slice()),
        (0, 7, &b"note"[..])
    );
    let question = read_frame(&mut raw).unwrap();
    assert_eq!(question.chid >> 31, 1);
    raw.write_all(&frame(question.chid, 8, b"answer")).unwrap();
    assert!(wait_until(WAIT_LIMIT, || !answers
        .lock()
        .unwrap()
        .is_empty()));
    assert_eq!(
        answers.lock().unwrap()[0].as_deref().ok(),
        Some(&b"answer"[..])
    );
    stop(&transport);
}

#[test]
fn the_builders_hooks_hear_connections_with_none_of_their_own() {
    let events = Events::default();
    let transport = Transport::builder()
        .workers(2)
        .events(events.hook())
        .start()
        .unwrap();
    let addr = transport.listen(loopback(), echo).unwrap();
    let client = ConnectionManager::new(&transport);
    client.call(addr, Packet::new(1, "x"), Some(NEVER)).unwrap();
    // The client's connection and the server's.
    assert_eq!(
        events.wait(2),
        [ConnectionEvent::Connected, ConnectionEvent::Connected]
    );
    // A listener with hooks of its own: the builder's hear nothing of it.
    let own = Events::default();
    let other = transport
        .listen_with_options(loopback(), echo, ListenOptions::new().events(own.hook()))
        .unwrap();
    client
        .call(other, Packet::new(1, "y"), Some(NEVER))
        .unwrap();
    own.wait(1);
    assert_eq!(
        events.wait(3).len(),
        3,
        "only the client side of the second"
    );
    stop(&transport);
    assert_eq!(events.all().len(), 6);
    assert_eq!(own.all().len(), 2);
}

#[test]
fn a_client_handle_posts_with_a_real_channel_id() {
    // A tbnet server aborts on channel id 0: a client's one-way packet
    // takes a real one (its reply is discarded).
    let (addr, server) = crate::support::raw_server(|mut stream| {
        let request = read_frame(&mut stream).unwrap();
        stream
            .write_all(&frame(request.chid, 0, &request.body))
            .unwrap();
        let posted = read_frame(&mut stream).unwrap();
        stream
            .write_all(&frame(posted.chid, 0, b"ignored"))
            .unwrap();
        // Hold the connection until the client is done.
        let _ = closed_by_peer(&mut stream);
        posted
    });
    let handles = Arc::new(Mutex::new(Vec::new()));
    let keep = handles.clone();
    let transport = crate::support::transport();
    let client =
        ConnectionManager::new(&transport).with_events(move |conn: &ConnectionHandle, _| {
            keep.lock().unwrap().push(conn.clone());
        });
    client.call(addr, Packet::new(1, "x"), Some(NEVER)).unwrap();
    assert!(wait_until(WAIT_LIMIT, || !handles
        .lock()
        .unwrap()
        .is_empty()));
    let conn = handles.lock().unwrap()[0].clone();
    assert!(!conn.is_server_side());
    assert_eq!(conn.peer(), addr);
    conn.post(Packet::new(2, "one-way")).unwrap();
    assert!(wait_until(WAIT_LIMIT, || transport.stats().pending == 0));
    drop(client);
    let posted = server.join().unwrap();
    assert_ne!(posted.chid, 0);
    assert_eq!(posted.body, b"one-way");
    assert_eq!(transport.stats().late_responses, 0);
    stop(&transport);
}

#[test]
fn a_client_hook_may_call_back_into_its_manager() {
    // On connect, the hook sends a request through the very manager whose
    // connection it hears about, and waits for it.
    let server = crate::support::echo_server();
    let transport = crate::support::transport();
    let manager: Arc<std::sync::OnceLock<std::sync::Weak<ConnectionManager>>> = Arc::default();
    let answers = Arc::new(Mutex::new(Vec::new()));
    let (weak, record, addr) = (manager.clone(), answers.clone(), server.addr);
    let client = Arc::new(ConnectionManager::new(&transport).with_events(
        move |_: &ConnectionHandle, event: ConnectionEvent| {
            let Some(client) = weak.get().and_then(|w| w.upgrade()) else {
                return;
            };
            if event == ConnectionEvent::Connected {
                let stats = client.server_stats(addr).map(|s| s.connect_attempts);
                let answer = client.call(addr, Packet::new(1, "from the hook"), Some(NEVER));
                record
                    .lock()
                    .unwrap()
                    .push((stats, answer.map(|p| p.into_body())));
            }
        },
    ));
    manager.set(Arc::downgrade(&client)).unwrap();
    client.call(addr, Packet::new(1, "x"), Some(NEVER)).unwrap();
    assert!(wait_until(WAIT_LIMIT, || !answers
        .lock()
        .unwrap()
        .is_empty()));
    let (stats, answer) = answers.lock().unwrap()[0].clone();
    assert_eq!(stats, Some(1));
    assert_eq!(answer.unwrap(), "from the hook");
    drop(client);
    stop(&transport);
    stop(&server.transport);
}

#[test]
fn a_hook_may_stop_its_own_transport() {
    let transport = crate::support::transport();
    let handle = Mutex::new(Some(transport.clone()));
    let hook = move |_: &ConnectionHandle, event: ConnectionEvent| {
        if event == ConnectionEvent::Connected {
            if let Some(transport) = handle.lock().unwrap().take() {
                transport.stop();
            }
        }
    };
    let addr = transport
        .listen_with_options(loopback(), echo, ListenOptions::new().events(hook))
        .unwrap();
    let mut raw = raw_client(addr);
    let waiting = transport.clone();
    within("the transport stopped by its hook", move || waiting.wait());
    assert!(transport.is_stopped());
    assert!(closed_by_peer(&mut raw));
}

#[test]
fn close_when_written_sends_everything_queued_then_closes() {
    // A last reply far larger than the socket buffers, then the close.
    const LAST: usize = 4 << 20;
    let events = Events::default();
    let transport = crate::support::transport();
    let addr = transport
        .listen_with_options(
            loopback(),
            |request: Packet, responder: Responder| {
                let conn = responder.connection();
                let _ = responder.reply(request.reply(vec![7u8; LAST]));
                conn.close_when_written();
            },
            ListenOptions::new().events(events.hook()),
        )
        .unwrap();
    let mut raw = raw_client(addr);
    send_bytes(&mut raw, &frame(3, 1, b"last"));
    let reply = read_frame(&mut raw).unwrap();
    assert_eq!(reply.chid, 3);
    assert_eq!(reply.body.len(), LAST);
    assert!(reply.body.iter().all(|&b| b == 7));
    assert!(closed_by_peer(&mut raw));
    assert_eq!(
        events.wait(2),
        [
            ConnectionEvent::Connected,
            ConnectionEvent::Closed(CloseReason::Local)
        ]
    );
    stop(&transport);
}

#[test]
fn many_connections_each_hear_one_connect_then_one_close() {
    const CONNS: usize = 32;
    let events = Events::default();
    let (transport, addr) = server_with(Transport::builder(), &events);
    let clients: Vec<_> = (0..CONNS)
        .map(|i| {
            std::thread::spawn(move || {
                let mut raw = raw_client(addr);
                let body = i.to_string();
                send_bytes(&mut raw, &frame(1, 1, body.as_bytes()));
                assert_eq!(read_frame(&mut raw).unwrap().body, body.as_bytes());
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    events.wait(2 * CONNS);
    stop(&transport);
    let mut by_conn = std::collections::BTreeMap::<u64, Vec<ConnectionEvent>>::new();
    for (id, event) in events.all() {
        by_conn.entry(id).or_default().push(event);
    }
    assert_eq!(by_conn.len(), CONNS);
    for (id, heard) in by_conn {
        assert_eq!(
            heard,
            [
                ConnectionEvent::Connected,
                ConnectionEvent::Closed(CloseReason::PeerClosed)
            ],
            "connection {id}"
        );
    }
}

#[test]
fn a_server_request_pending_at_shutdown_ends_with_shutdown() {
    let transport = crate::support::transport();
    let (pending_tx, pending_rx) = std::sync::mpsc::channel();
    let pending_tx = Mutex::new(pending_tx);
    let addr = transport
        .listen(loopback(), move |request: Packet, responder: Responder| {
            let conn = responder.connection();
            let _ = responder.reply(request.reply("ok"));
            // Nobody on the client side answers it.
            let future = conn.call_async(Packet::new(2, "?"), Some(NEVER)).unwrap();
            let _ = pending_tx.lock().unwrap().send(future);
        })
        .unwrap();
    let mut raw = raw_client(addr);
    send_bytes(&mut raw, &frame(1, 1, b"x"));
    assert_eq!(read_frame(&mut raw).unwrap().body, b"ok");
    let future = pending_rx.recv_timeout(WAIT_LIMIT).unwrap();
    assert_eq!(transport.stats().pending, 1);
    stop(&transport);
    let outcome = within("the server's request", move || tokio_test::block_on(future));
    assert!(matches!(outcome, Err(Error::Shutdown)), "{outcome:?}");
    assert_eq!(transport.stats().pending, 0);
}
