//! One handler for many requests (`ConnectionManager::send_shared`, tbnet's
//! `postPacket(packet, handler, args)`): every outcome reaches it exactly
//! once, with the `args` its request was sent with.

use std::sync::Arc;

use tbnet::{ConnectionManager, Dispatch, Error, Packet, SharedPacketHandler, Transport};

use crate::support::*;

/// Records each outcome in the slot its `args` name.
struct ToRecorder(Arc<Recorder>);

impl SharedPacketHandler for ToRecorder {
    fn handle_packet(&self, result: Result<Packet, Error>, args: u64) {
        (self.0.handler(args as usize))(result);
    }
}

#[test]
fn one_shared_handler_serves_many_requests_each_once_with_its_args() {
    let server = echo_server();
    for callbacks in [Dispatch::Workers, Dispatch::IoThread] {
        let client = Transport::builder().callbacks(callbacks).start().unwrap();
        let manager = ConnectionManager::new(&client);
        const N: usize = 200;
        let recorder = Recorder::new(N);
        let handler = Arc::new(ToRecorder(recorder.clone()));
        for i in 0..N {
            let body = format!("request {i}");
            manager
                .send_shared(
                    server.addr,
                    Packet::new(7, body),
                    Some(NEVER),
                    &handler,
                    i as u64,
                )
                .unwrap();
        }
        recorder.wait_all_called();
        for (i, result) in recorder.results().into_iter().enumerate() {
            let response = result.unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(response.body(), format!("request {i}").as_bytes());
        }
        // After the stop, which runs any callback still queued: a second
        // delivery would show.
        stop(&client);
        assert!(recorder.calls().iter().all(|&n| n == 1), "{callbacks:?}");
    }
    stop(&server.transport);
}

#[test]
fn timeouts_and_disconnects_reach_the_shared_handler_with_their_args() {
    let server = SilentServer::start();
    let client = transport();
    let manager = ConnectionManager::new(&client);
    let recorder = Recorder::new(4);
    let handler = Arc::new(ToRecorder(recorder.clone()));
    // The requests without a deadline reach the server first; the
    // expiring ones time out whether or not they reach it.
    for args in 2..4 {
        let request = Packet::new(1, "disconnected");
        manager
            .send_shared(server.addr, request, Some(NEVER), &handler, args)
            .unwrap();
    }
    server.wait_received(2);
    for args in 0..2 {
        let request = Packet::new(1, "expires");
        manager
            .send_shared(server.addr, request, Some(SHORT_TIMEOUT), &handler, args)
            .unwrap();
    }
    assert!(recorder.wait_calls(|calls| calls[..2] == [1, 1]));
    // The server goes away: the requests without a deadline fail.
    drop(server.take());
    stop(&server.transport);
    recorder.wait_all_called();
    stop(&client);
    assert_eq!(recorder.calls(), [1, 1, 1, 1]);
    let results = recorder.results();
    assert!(
        results[..2]
            .iter()
            .all(|r| matches!(r, Err(Error::Timeout))),
        "{results:?}"
    );
    assert!(
        results[2..]
            .iter()
            .all(|r| matches!(r, Err(Error::Disconnected))),
        "{results:?}"
    );
}
