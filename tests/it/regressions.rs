//! Regression tests, each named after the bug it pins down (found in
//! review; each failed before its fix).

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use tbnet::{ConnectionManager, Dispatch, Error, Packet, Responder, Transport};

use crate::support::*;

#[test]
fn inline_timeout_callbacks_ran_on_the_timer_thread_and_could_stop_every_timeout() {
    let silent = SilentServer::start();
    let client = Transport::builder()
        .callbacks(Dispatch::IoThread)
        .start()
        .unwrap();
    let manager = Arc::new(ConnectionManager::new(&client));
    let (thread_tx, thread_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    manager
        .send(
            silent.addr,
            Packet::new(1, "a"),
            Some(SHORT_TIMEOUT),
            move |r: Result<Packet, Error>| {
                let name = std::thread::current().name().map(str::to_string);
                thread_tx.send((name, r.is_err())).unwrap();
                // Blocks until the test says so: on the timer thread this would
                // stop the next call's timeout from ever firing.
                let _ = release_rx.recv_timeout(HANG_GUARD);
            },
        )
        .unwrap();
    let (name, failed) = thread_rx.recv_timeout(HANG_GUARD).unwrap();
    assert!(failed);
    assert!(
        name.unwrap().starts_with("tbnet-worker-"),
        "timeout callbacks run on a worker"
    );
    let other = {
        let manager = manager.clone();
        within("a call whose timeout must still fire", move || {
            manager.call(silent.addr, Packet::new(1, "b"), Some(SHORT_TIMEOUT))
        })
    };
    assert!(matches!(other, Err(Error::Timeout)), "{other:?}");
    release_tx.send(()).unwrap();
    stop(&client);
}

#[test]
fn replies_larger_than_requests_grew_past_max_outbound() {
    let server = Transport::builder()
        .dispatch(Dispatch::IoThread)
        .max_outbound(64 * 1024)
        .start()
        .unwrap();
    let big = bytes::Bytes::from(vec![7u8; 4096]);
    let addr = server
        .listen(loopback(), move |req: Packet, resp: Responder| {
            let _ = resp.reply(req.reply(big.clone()));
        })
        .unwrap();
    let before = resident_bytes();
    let mut greedy = raw_client(addr);
    greedy
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    // Header-only requests, each answered with 4 KiB, never read.
    let burst: Vec<u8> = (1..=4096u32).flat_map(|chid| frame(chid, 1, b"")).collect();
    let mut sent = 0usize;
    for _ in 0..50 {
        match greedy.write(&burst[sent % burst.len()..]) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // 50 bursts answered in full would be 800 MiB of replies.
    if let (Some(before), Some(after)) = (before, resident_bytes()) {
        let grown = after.saturating_sub(before);
        assert!(grown < 96 << 20, "resident memory grew by {grown} bytes");
    }
    drop(greedy);
    stop(&server);
}

#[test]
fn one_wake_per_batch_left_a_batch_behind_its_slowest_handler() {
    let gate = Gate::default();
    let server = Transport::builder().workers(4).start().unwrap();
    let addr = listen_echo_gated(&server, &gate);
    let mut raw = raw_client(addr);
    // Both requests in one segment: one decoded batch.
    let mut both = frame(1, 1, b"slow");
    both.extend_from_slice(&frame(2, 2, b"fast"));
    send_bytes(&mut raw, &both);
    let first = read_frame(&mut raw).unwrap();
    assert_eq!(
        (first.chid, &first.body[..]),
        (2, &b"fast"[..]),
        "the fast reply came first"
    );
    gate.open();
    assert_eq!(read_frame(&mut raw).unwrap().chid, 1);
    stop(&server);
}

#[test]
fn dropped_managers_left_their_connections_open() {
    let server = echo_server();
    let client = transport();
    for _ in 0..10 {
        let manager = ConnectionManager::new(&client);
        manager
            .call(server.addr, Packet::new(1, "x"), Some(NEVER))
            .unwrap();
    }
    assert!(
        wait_until(WAIT_LIMIT, || server.transport.stats().connections == 0),
        "{} server connections still open",
        server.transport.stats().connections
    );
    assert_eq!(server.transport.stats().connections_total, 10);
    stop(&client);
    stop(&server.transport);
}

#[test]
fn oversized_requests_killed_the_shared_connection() {
    let server = echo_server();
    let client = Transport::builder()
        .streamer(tbnet::proto::DefaultStreamer::new().with_max_body_len(1000))
        .start()
        .unwrap();
    let manager = ConnectionManager::new(&client);
    let pending = manager
        .call_async(server.addr, Packet::new(1, "small"), Some(NEVER))
        .unwrap();
    let refused = manager
        .send(
            server.addr,
            Packet::new(1, vec![0u8; 2000]),
            Some(NEVER),
            |_| {},
        )
        .unwrap_err();
    assert!(matches!(
        refused.error(),
        Error::FrameTooLarge {
            len: 2000,
            max: 1000
        }
    ));
    assert_eq!(refused.into_inner().body().len(), 2000);
    assert_eq!(tokio_test::block_on(pending).unwrap().body(), "small");
    assert_eq!(client.stats().connections_total, 1);
    stop(&client);
    stop(&server.transport);
}

#[test]
fn duration_max_overflowed_an_instant() {
    let server = echo_server();
    let client = Transport::builder()
        .connect_timeout(Duration::MAX)
        .idle_timeout(Some(Duration::MAX))
        .timer_tick(Duration::MAX)
        .shutdown_grace(Duration::MAX)
        .start()
        .unwrap();
    let manager = ConnectionManager::new(&client).with_default_timeout(Duration::MAX);
    let response = manager.call(server.addr, Packet::new(1, "forever"), Some(Duration::MAX));
    assert_eq!(response.unwrap().body(), "forever");
    assert!(manager
        .call(server.addr, Packet::new(1, "default"), None)
        .is_ok());
    stop(&client);
    stop(&server.transport);
}

#[test]
fn slow_callbacks_let_responses_queue_without_bound() {
    let server = echo_server();
    let client = Transport::builder()
        .workers(1)
        .callback_queue(8)
        .start()
        .unwrap();
    let manager = ConnectionManager::new(&client).with_queue_limit(1000);
    let gate = Gate::default();
    let ran = Arc::new(AtomicUsize::new(0));
    let mut accepted = 0;
    let mut refused = false;
    // The first callback blocks the only worker; each later response queues
    // its callback behind it, until sends are refused.
    for i in 0..100 {
        let (gate, counter) = (gate.clone(), ran.clone());
        let sent = manager.send(
            server.addr,
            Packet::new(1, format!("{i}")),
            Some(NEVER),
            move |_| {
                gate.pass();
                counter.fetch_add(1, Ordering::SeqCst);
            },
        );
        match sent {
            Ok(()) => accepted += 1,
            Err(e) => {
                assert!(matches!(e.error(), Error::QueueFull), "{e:?}");
                refused = true;
                break;
            }
        }
        assert!(wait_until(WAIT_LIMIT, || client.stats().pending == 0));
    }
    assert!(refused, "the callback queue never filled");
    gate.open();
    assert!(wait_until(WAIT_LIMIT, || ran.load(Ordering::SeqCst) == accepted));
    stop(&client);
    stop(&server.transport);
}

#[test]
fn stopping_the_client_counted_its_young_connections_as_early_failures() {
    let server = SilentServer::start();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    // An open connection with no response yet, well within the grace.
    let pending = client
        .call_async(server.addr, Packet::new(1, "held"), Some(NEVER))
        .expect("send");
    server.wait_received(1);
    stop(&client_transport);
    let outcome = within("the pending call", move || tokio_test::block_on(pending));
    assert!(matches!(outcome, Err(Error::Shutdown)), "{outcome:?}");
    let stats = client_transport.stats();
    assert_eq!(stats.connect_attempts, 1);
    assert_eq!(
        stats.early_failures, 0,
        "our own shutdown is no failure of the peer"
    );
    stop(&server.transport);
}
