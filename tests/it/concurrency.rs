//! Many requests in flight on one shared connection: concurrent callers
//! answered out of order from a thread other than the handler's, gathers on
//! a `WaitObject`, and large pipelined requests. Every caller gets its own
//! response.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tbnet::{ConnectionManager, Error, Packet, Responder, WaitObject};

use crate::support::{
    echo_server, gather_reversed, loopback, transport, within, SilentServer, HANG_GUARD, NEVER,
    WAIT_LIMIT,
};

const CALLERS: usize = 8;
const CALLS_PER_CALLER: usize = 25;

/// Requests the handler parked for the replier thread.
#[derive(Default)]
struct Parked {
    requests: Mutex<Vec<(Packet, Responder)>>,
    arrived: Condvar,
}

#[test]
fn concurrent_callers_on_one_connection_get_their_own_out_of_order_replies() {
    let server_transport = transport();
    let parked = Arc::new(Parked::default());
    let addr = {
        let parked = parked.clone();
        server_transport
            .listen(loopback(), move |request: Packet, responder: Responder| {
                parked.requests.lock().unwrap().push((request, responder));
                parked.arrived.notify_one();
            })
            .expect("listen")
    };
    let active = Arc::new(AtomicUsize::new(CALLERS));
    let replier = {
        let (parked, active) = (parked.clone(), active.clone());
        thread::spawn(move || reply_in_reverse_batches(&parked, &active))
    };

    let client_transport = transport();
    let client = Arc::new(ConnectionManager::new(&client_transport));
    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let (client, active) = (client.clone(), active.clone());
            thread::spawn(move || {
                for call in 0..CALLS_PER_CALLER {
                    let body = format!("caller-{caller}-call-{call}");
                    let request = Packet::new(caller as i32, body.clone());
                    let response = match caller % 3 {
                        0 => client.call(addr, request, Some(NEVER)),
                        1 => {
                            let (done, outcome) = mpsc::channel();
                            client
                                .send(addr, request, Some(NEVER), move |r| {
                                    let _ = done.send(r);
                                })
                                .expect("send");
                            outcome.recv_timeout(HANG_GUARD).expect("callback ran")
                        }
                        _ => {
                            let future = client.call_async(addr, request, Some(NEVER));
                            tokio_test::block_on(future.expect("submit"))
                        }
                    };
                    let response = response.expect("a response");
                    assert_eq!(
                        response.body(),
                        &body,
                        "caller {caller} got another's reply"
                    );
                    assert_eq!(response.pcode().get(), caller as i32);
                }
                active.fetch_sub(1, Ordering::SeqCst);
            })
        })
        .collect();
    within("callers", move || {
        for caller in callers {
            caller.join().expect("caller thread");
        }
    });

    let largest_batch = within("replier", move || replier.join().expect("replier thread"));
    assert_eq!(
        largest_batch, CALLERS,
        "the first batch held one request from every caller, answered in reverse"
    );
    assert_eq!(client.connections(), 1);
    assert_eq!(
        client_transport.stats().connections_total,
        1,
        "one shared connection"
    );
}

/// Waits until every caller still running has a request parked, then
/// answers the batch in reverse arrival order. Returns the largest batch.
fn reply_in_reverse_batches(parked: &Parked, active: &AtomicUsize) -> usize {
    let total = CALLERS * CALLS_PER_CALLER;
    let deadline = Instant::now() + WAIT_LIMIT;
    let (mut replied, mut largest) = (0, 0);
    while replied < total && Instant::now() < deadline {
        let batch = {
            let mut requests = parked.requests.lock().unwrap();
            // Callers finishing do not notify: poll `active` as well.
            while requests.is_empty() || requests.len() < active.load(Ordering::SeqCst) {
                if Instant::now() >= deadline {
                    return largest;
                }
                let poll = Duration::from_millis(5);
                requests = parked.arrived.wait_timeout(requests, poll).unwrap().0;
            }
            std::mem::take(&mut *requests)
        };
        largest = largest.max(batch.len());
        replied += batch.len();
        for (request, responder) in batch.into_iter().rev() {
            responder
                .reply(request.reply(request.body().clone()))
                .expect("reply on an open connection");
        }
    }
    largest
}

#[test]
fn wait_object_gathers_replies_in_registration_and_arrival_order() {
    const REQUESTS: usize = 5;
    let server = SilentServer::start();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);

    let mut wait = WaitObject::new();
    // Replies leave in reverse order on one connection, so they arrive so.
    gather_reversed(&client, &server, &mut wait, "gather", REQUESTS);

    let (arrivals, wait) = within("wait_any", move || {
        let arrivals: Vec<_> = (0..REQUESTS)
            .map(|_| wait.wait_any().expect("an outcome"))
            .collect();
        (arrivals, wait)
    });
    let order: Vec<usize> = arrivals.iter().map(|(index, _)| *index).collect();
    assert_eq!(order, [4, 3, 2, 1, 0], "wait_any yields in arrival order");
    for (index, result) in arrivals {
        let response = result.expect("a response");
        assert_eq!(response.body(), &format!("gather-{index}"));
    }
    let mut wait = wait;
    assert!(wait.wait_any().is_none(), "every outcome was taken");
    assert_eq!(client_transport.stats().pending, 0);
}

#[test]
fn wait_all_returns_every_response_in_registration_order() {
    const REQUESTS: usize = 5;
    let server = SilentServer::start();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);

    let mut wait = WaitObject::new();
    gather_reversed(&client, &server, &mut wait, "all", REQUESTS);
    let results = within("wait_all", move || wait.wait_all());
    let bodies: Vec<_> = (results.into_iter())
        .map(|r| r.expect("a response").into_body())
        .collect();
    let expected: Vec<String> = (0..REQUESTS).map(|i| format!("all-{i}")).collect();
    assert_eq!(bodies, expected);
}

/// More large requests than the outbound limits and socket buffers hold, on
/// one connection: both ends are busy writing, and both must keep reading.
#[test]
fn pipelined_large_requests_on_one_connection_all_complete() {
    const REQUESTS: usize = 64;
    let server = echo_server();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    let body = Bytes::from(vec![b'x'; 1 << 20]);

    let mut wait = WaitObject::new();
    let mut done = 0;
    for i in 0..REQUESTS {
        let mut request = Packet::new(i as i32, body.clone());
        loop {
            match client.send_wait(server.addr, request, Some(NEVER), &mut wait) {
                Ok(_) => break,
                Err(refused) => {
                    assert!(matches!(refused.error(), Error::QueueFull), "{refused:?}");
                    request = refused.into_inner();
                    // Too much unwritten: wait for one response, then retry.
                    let (_, result) = wait
                        .wait_any_timeout(HANG_GUARD)
                        .unwrap_or_else(|| panic!("no progress after {done} responses"));
                    result.expect("a response");
                    done += 1;
                }
            }
        }
    }
    let results = within("pipelined responses", move || wait.wait_all());
    assert_eq!(done + results.len(), REQUESTS);
    for result in results {
        assert_eq!(result.expect("a response").body().len(), 1 << 20);
    }
}
