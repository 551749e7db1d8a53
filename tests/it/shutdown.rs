//! Stopping a transport always returns, and leaves no caller waiting.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use tbnet::{ConnectionManager, Dispatch, Error, Packet, Responder, Transport};

use crate::support::{
    closed_by_peer, echo, echo_server, frame, loopback, one_request_each_way, raw_client,
    send_bytes, stop, transport, wait_until, within, Recorder, SilentServer, NEVER, WAIT_LIMIT,
};

#[test]
fn stop_returns_with_requests_pending_and_a_handler_that_never_returns() {
    // One transport is both server and client: its own workers are stuck in
    // the handler, and its own requests are pending.
    let both = transport();
    let (release, blocked) = mpsc::channel::<()>();
    let blocked = Arc::new(Mutex::new(blocked));
    let entered = Arc::new(AtomicUsize::new(0));
    let addr = {
        let (blocked, entered) = (blocked.clone(), entered.clone());
        both.listen(
            loopback(),
            move |_request: Packet, _responder: Responder| {
                entered.fetch_add(1, Ordering::SeqCst);
                // Blocks until the test ends (the sender is dropped).
                let _ = blocked.lock().unwrap().recv();
            },
        )
        .expect("listen")
    };
    let client = Arc::new(ConnectionManager::new(&both));
    let (recorder, future, blocking) = one_request_each_way(&client, addr);
    assert!(wait_until(WAIT_LIMIT, || {
        entered.load(Ordering::SeqCst) >= 1 && both.stats().pending == 3
    }));

    stop(&both);

    assert_eq!(recorder.calls(), [1], "the callback ran during stop");
    let callback = recorder.results().remove(0);
    assert!(matches!(callback, Err(Error::Shutdown)), "{callback:?}");
    let future = within("future", move || tokio_test::block_on(future));
    assert!(matches!(future, Err(Error::Shutdown)), "{future:?}");
    let blocking = within("blocking call", move || blocking.join().unwrap());
    assert!(matches!(blocking, Err(Error::Shutdown)), "{blocking:?}");
    assert_eq!(both.stats().pending, 0);
    drop(release);
}

#[test]
fn requests_after_stop_fail_with_shutdown_and_hand_the_packet_back() {
    let server = echo_server();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    let response = client.call(server.addr, Packet::new(1, "before"), Some(NEVER));
    assert_eq!(response.expect("a response").body(), "before");
    stop(&client_transport);
    assert!(client_transport.is_stopped());

    let call = client.call(server.addr, Packet::new(1, "call"), Some(NEVER));
    assert!(matches!(call, Err(Error::Shutdown)), "{call:?}");
    let recorder = Recorder::new(1);
    let sent = client.send(
        server.addr,
        Packet::new(2, "send"),
        None,
        recorder.handler(0),
    );
    let refused = sent.expect_err("stopped");
    assert!(matches!(refused.error(), Error::Shutdown));
    assert_eq!(refused.into_inner().body(), "send");
    let future = client.call_async(server.addr, Packet::new(3, "future"), None);
    assert!(matches!(
        future.expect_err("stopped").error(),
        Error::Shutdown
    ));
    let posted = client.post(server.addr, Packet::new(4, "post"));
    assert_eq!(posted.expect_err("stopped").into_inner().body(), "post");
    let listen = client_transport.listen(loopback(), echo);
    assert!(matches!(listen, Err(Error::Shutdown)), "{listen:?}");
    assert_eq!(
        recorder.calls(),
        [0],
        "a refused request's callback never runs"
    );
}

#[test]
fn stop_is_idempotent_and_releases_wait() {
    let t = transport();
    let waiter = {
        let t = t.clone();
        thread::spawn(move || t.wait())
    };
    stop(&t);
    stop(&t);
    within("Transport::wait", move || waiter.join().unwrap());
    within("wait after stop", move || t.wait());
}

#[test]
fn dropping_every_handle_stops_the_transport_and_fails_pending_requests() {
    let server = SilentServer::start();
    let recorder = Recorder::new(1);
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    client
        .send(
            server.addr,
            Packet::new(1, "orphan"),
            Some(NEVER),
            recorder.handler(0),
        )
        .expect("send");
    server.wait_received(1);

    within("dropping the last handles", move || {
        drop(client);
        drop(client_transport);
    });
    assert_eq!(recorder.calls(), [1]);
    let outcome = recorder.results().remove(0);
    assert!(matches!(outcome, Err(Error::Shutdown)), "{outcome:?}");
}

/// A server whose handler stops its own transport when asked (pcode 99) and
/// echoes everything else. Returns the address and a flag raised once the
/// handler's `stop` returned.
fn self_stopping_server(dispatch: Dispatch) -> (SocketAddr, Arc<AtomicBool>) {
    let server = Transport::builder()
        .workers(2)
        .dispatch(dispatch)
        .start()
        .expect("start");
    let handle = Arc::new(Mutex::new(Some(server.clone())));
    let stopped = Arc::new(AtomicBool::new(false));
    let addr = {
        let stopped = stopped.clone();
        server
            .listen(loopback(), move |request: Packet, responder: Responder| {
                if request.pcode().get() != 99 {
                    return echo(request, responder);
                }
                // The handler holds the last handle: stop and drop it here.
                if let Some(transport) = handle.lock().unwrap().take() {
                    transport.stop();
                }
                stopped.store(true, Ordering::SeqCst);
            })
            .expect("listen")
    };
    (addr, stopped)
}

/// Asks the server at `addr` to stop itself, then checks that it did: its
/// connection closes instead of answering another request.
fn assert_stops_itself(addr: SocketAddr, stopped: &AtomicBool) {
    let mut stream = raw_client(addr);
    send_bytes(&mut stream, &frame(1, 99, b"stop yourself"));
    assert!(wait_until(WAIT_LIMIT, || stopped.load(Ordering::SeqCst)));
    // Tolerate a write error: the server may have closed already.
    let _ = stream.write_all(&frame(2, 1, b"still serving?"));
    assert!(
        closed_by_peer(&mut stream),
        "the stopped transport still serves its connection"
    );
}

#[test]
fn stop_called_from_a_worker_handler_returns_and_stops() {
    let (addr, stopped) = self_stopping_server(Dispatch::Workers);
    assert_stops_itself(addr, &stopped);
}

#[test]
fn stop_called_from_an_io_thread_handler_returns_and_stops() {
    let (addr, stopped) = self_stopping_server(Dispatch::IoThread);
    assert_stops_itself(addr, &stopped);
}

#[test]
fn stop_called_from_a_callback_returns_and_fails_the_rest() {
    let server = SilentServer::start();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    let recorder = Recorder::new(2);
    let stopping = client_transport.clone();
    let first = recorder.handler(0);
    client
        .send(
            server.addr,
            Packet::new(1, "first"),
            Some(NEVER),
            move |result| {
                first(result);
                stopping.stop();
            },
        )
        .expect("send");
    client
        .send(
            server.addr,
            Packet::new(1, "second"),
            Some(NEVER),
            recorder.handler(1),
        )
        .expect("send");
    server.wait_received(2);
    let held = server.take();
    let (request, responder) = (held.into_iter())
        .find(|(request, _)| request.body() == "first")
        .expect("the first request");
    responder.reply(request.reply("go")).expect("reply");

    recorder.wait_all_called();
    let results = recorder.results();
    assert_eq!(results[0].as_ref().expect("the reply").body(), "go");
    assert!(
        matches!(results[1], Err(Error::Shutdown)),
        "{:?}",
        results[1]
    );
    within("Transport::wait", move || client_transport.wait());
    assert_eq!(recorder.calls(), [1, 1]);
}
