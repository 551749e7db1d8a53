//! Leak regressions. They count the process's open file descriptors, so
//! they live in a binary of their own: tests running beside them in the main
//! suite would open and close descriptors under them.

#[allow(dead_code)]
#[path = "it/support.rs"]
mod support;

use std::sync::{Arc, Mutex};

use tbnet::{ConnectionManager, Packet, Responder, Transport};

use support::*;

/// Requests still in the worker queue when the workers exited kept the
/// transport's shared state (and its waker's descriptor) alive through
/// their responders: every stopped server leaked.
#[test]
fn stopped_transports_release_their_state_with_requests_still_queued() {
    let client = transport();
    let manager = ConnectionManager::new(&client).with_queue_limit(10_000);
    let before = open_fds();
    for _ in 0..20 {
        let server = Transport::builder()
            .workers(1)
            .worker_queue(64)
            .start()
            .unwrap();
        let held: Arc<Mutex<Vec<Responder>>> = Arc::default();
        let gate = Gate::default();
        let addr = {
            let gate = gate.clone();
            server
                .listen(loopback(), move |_: Packet, responder: Responder| {
                    gate.pass();
                    drop(responder);
                })
                .unwrap()
        };
        for i in 0..200 {
            let _ = manager.send(addr, Packet::new(1, format!("{i}")), Some(NEVER), |_| {});
        }
        assert!(wait_until(WAIT_LIMIT, || server.stats().worker_queue > 0));
        let stopping = {
            let server = server.clone();
            std::thread::spawn(move || server.stop())
        };
        gate.open();
        within("stop", move || stopping.join().unwrap());
        drop(held);
    }
    stop(&client);
    drop(manager);
    let after = open_fds();
    assert!(
        after <= before + 5,
        "descriptors: {before} before, {after} after 20 stopped servers"
    );
}
