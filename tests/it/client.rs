//! `ConnectionManager` behaviour beyond the exactly-once matrix: queue
//! limits (pending requests and unwritten bytes), late responses, one-way
//! posts.

use std::sync::{mpsc, Arc, Mutex};

use bytes::Bytes;
use tbnet::{ChannelId, ConnectionManager, Error, Packet, Responder, Transport};

use crate::support::{
    echo, frame, loopback, raw_server, read_frame, send_bytes, stop, transport, wait_until, within,
    Recorder, SilentServer, HANG_GUARD, NEVER, SHORT_TIMEOUT, WAIT_LIMIT,
};

#[test]
fn full_connection_queue_refuses_with_queue_full_and_hands_the_packet_back() {
    let server = SilentServer::start();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport).with_queue_limit(2);
    let recorder = Recorder::new(4);

    for i in 0..2 {
        let request = Packet::new(1, format!("fits-{i}"));
        client
            .send(server.addr, request, Some(NEVER), recorder.handler(i))
            .expect("within the limit");
    }
    let refused = client
        .send(
            server.addr,
            Packet::new(7, "third"),
            Some(NEVER),
            recorder.handler(2),
        )
        .expect_err("over the limit");
    assert!(matches!(refused.error(), Error::QueueFull), "{refused:?}");
    let packet = refused.into_inner();
    assert_eq!(
        (packet.pcode().get(), &packet.body()[..]),
        (7, &b"third"[..])
    );

    let call = client.call(server.addr, Packet::new(1, "blocking"), Some(NEVER));
    assert!(matches!(call, Err(Error::QueueFull)), "{call:?}");
    let future = client.call_async(server.addr, Packet::new(1, "future"), Some(NEVER));
    let refused = future.expect_err("over the limit");
    assert!(matches!(refused.error(), Error::QueueFull));
    assert_eq!(refused.into_inner().body(), "future");

    // The limit is on requests pending, not sent: answering one frees a place.
    server.wait_received(2);
    let (request, responder) = server.take().swap_remove(0);
    responder.reply(request.reply("done")).expect("reply");
    assert!(wait_until(WAIT_LIMIT, || recorder.total_calls() == 1));
    client
        .send(
            server.addr,
            Packet::new(1, "room again"),
            Some(NEVER),
            recorder.handler(3),
        )
        .expect("a place was freed");

    // Stopping fails what is pending; `stop` joins every thread, so the
    // counts are final. The refused callback never runs.
    stop(&client_transport);
    assert_eq!(recorder.calls(), [1, 1, 0, 1]);
}

#[test]
fn late_response_is_dropped_and_counted_never_delivered_to_another_request() {
    let (addr, raw) = raw_server(|mut stream| {
        let first = read_frame(&mut stream).expect("request 1");
        // The client sends request 2 only after request 1 timed out.
        let second = read_frame(&mut stream).expect("request 2");
        send_bytes(
            &mut stream,
            &frame(first.chid, first.pcode, b"late reply to 1"),
        );
        send_bytes(
            &mut stream,
            &frame(second.chid, second.pcode, b"reply to 2"),
        );
        // Hold the connection until the client is done with it.
        let _ = read_frame(&mut stream);
        (first.chid, second.chid)
    });
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);

    let first = client.call(addr, Packet::new(1, "one"), Some(SHORT_TIMEOUT));
    assert!(matches!(first, Err(Error::Timeout)), "{first:?}");
    let second = client
        .call(addr, Packet::new(2, "two"), Some(NEVER))
        .expect("request 2's own reply");
    assert_eq!(second.body(), "reply to 2");
    assert_eq!(client_transport.stats().late_responses, 1);
    assert_eq!(client_transport.stats().timeouts, 1);

    stop(&client_transport);
    let (first_chid, second_chid) = within("raw server", move || raw.join().unwrap());
    assert_ne!(
        first_chid, second_chid,
        "a reused slot gets a new channel id"
    );
    assert!(first_chid != 0 && second_chid != 0);
}

#[test]
fn post_reaches_our_server_with_a_real_channel_id_and_its_reply_is_discarded() {
    let server_transport = transport();
    // Requests the handler finished: kept and counted in one step.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let addr = {
        let seen = seen.clone();
        server_transport
            .listen(loopback(), move |request: Packet, responder: Responder| {
                assert!(!responder.is_one_way(), "a post carries a channel id");
                seen.lock().unwrap().push(request.clone());
                echo(request, responder);
            })
            .expect("listen")
    };
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);

    let mut message = Packet::new(9, "fire and forget");
    message.set_channel_id(ChannelId(1234));
    client.post(addr, message).expect("post");
    assert!(wait_until(WAIT_LIMIT, || client_transport
        .stats()
        .post_replies
        == 1));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_ne!(seen[0].channel_id(), ChannelId::NONE);
    assert_ne!(
        seen[0].channel_id(),
        ChannelId(1234),
        "the manager picks the id"
    );
    assert_eq!(
        (seen[0].pcode().get(), &seen[0].body()[..]),
        (9, &b"fire and forget"[..])
    );
    let client_stats = client_transport.stats();
    assert_eq!(client_stats.pending, 0, "the reply freed the post's slot");
    assert_eq!(client_stats.late_responses, 0, "{client_stats:?}");

    let response = client.call(addr, Packet::new(1, "after"), Some(NEVER));
    assert_eq!(response.expect("a response").body(), "after");
    let client_stats = client_transport.stats();
    assert_eq!(client_stats.packets_in, 2, "{client_stats:?}");
    assert_eq!(client_stats.post_replies, 1, "{client_stats:?}");
    assert_eq!(client_stats.late_responses, 0, "{client_stats:?}");
    stop(&client_transport);
    stop(&server_transport);
}

#[test]
fn a_server_that_does_not_read_fills_the_outbound_limit_and_requests_get_queue_full() {
    // Accepts and never reads, until told to go.
    let (go, told) = mpsc::channel::<()>();
    let (accepted_tx, accepted) = mpsc::channel::<()>();
    let (addr, raw) = raw_server(move |stream| {
        let _ = accepted_tx.send(());
        let _ = told.recv_timeout(HANG_GUARD);
        drop(stream);
    });
    let client_transport = Transport::builder()
        .workers(2)
        .max_outbound(64 << 10)
        .start()
        .expect("start");
    // Pending-request slots to spare: only the byte limit can refuse.
    let client = ConnectionManager::new(&client_transport).with_queue_limit(100_000);

    // Kernel buffers take some megabytes first; bodies share one buffer.
    let body = Bytes::from(vec![7u8; 1 << 20]);
    let refused = (0..1000).find_map(|i| {
        let request = Packet::new(i, body.clone());
        client.send(addr, request, Some(NEVER), |_| {}).err()
    });
    let refused = refused.expect("the outbound limit refused a request");
    assert!(matches!(refused.error(), Error::QueueFull), "{refused:?}");
    assert_eq!(
        refused.into_inner().body().len(),
        1 << 20,
        "the packet came back"
    );

    // The refusal can come before the connect completes (the first body
    // alone fills the limit): let the server see the connection before the
    // transport stops, or it would wait in `accept` for nobody.
    accepted
        .recv_timeout(HANG_GUARD)
        .expect("the client connected");
    drop(go);
    stop(&client_transport);
    within("raw server", move || raw.join().unwrap());
}

#[test]
fn callbacks_can_run_inline_on_the_io_thread_and_send_more_requests() {
    let server = crate::support::echo_server();
    let client = tbnet::Transport::builder()
        .callbacks(tbnet::Dispatch::IoThread)
        .start()
        .unwrap();
    let manager = std::sync::Arc::new(ConnectionManager::new(&client));
    let (tx, rx) = std::sync::mpsc::channel();
    let chained = manager.clone();
    let addr = server.addr;
    manager
        .send(
            addr,
            Packet::new(1, "first"),
            Some(NEVER),
            move |first: Result<Packet, Error>| {
                let thread = std::thread::current().name().map(str::to_string);
                // A callback may send the next request from where it runs.
                chained
                    .send(
                        addr,
                        Packet::new(1, "second"),
                        Some(NEVER),
                        move |second: Result<Packet, Error>| {
                            tx.send((thread, first, second)).unwrap();
                        },
                    )
                    .unwrap();
            },
        )
        .unwrap();
    let (thread, first, second) = rx.recv_timeout(HANG_GUARD).unwrap();
    assert_eq!(thread.as_deref(), Some("tbnet-io"));
    assert_eq!(first.unwrap().body(), "first");
    assert_eq!(second.unwrap().body(), "second");
    stop(&client);
    stop(&server.transport);
}
