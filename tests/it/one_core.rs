//! A transport started on a thread confined to one CPU runs as in a
//! one-CPU container: no worker spins, wakes wait for the IO thread's round,
//! and a worker that leaves jobs queued wakes no helper unless it stalls
//! (the IO thread watches for that). These tests start their transports on
//! such a thread, so they check those paths on any machine.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::sync::mpsc;
use std::thread;

use tbnet::{ConnectionManager, Packet, Transport};

use crate::support::*;

/// Runs `body` on a thread confined to the first CPU this process may use
/// (the transports it starts inherit the confinement).
fn on_one_core(body: impl FnOnce() + Send + 'static) {
    within("a test confined to one CPU", move || {
        thread::spawn(move || {
            let core = *core_affinity::get_core_ids()
                .expect("the CPUs this process may use")
                .first()
                .expect("one CPU at least");
            assert!(core_affinity::set_for_current(core), "confine to {core:?}");
            assert_eq!(
                thread::available_parallelism().unwrap().get(),
                1,
                "the confinement shows"
            );
            body();
        })
        .join()
        .unwrap();
    });
}

#[test]
fn on_one_core_a_blocked_handler_never_holds_up_the_rest_of_its_pass() {
    on_one_core(|| {
        let gate = Gate::default();
        let server = Transport::builder().workers(2).start().unwrap();
        let addr = listen_echo_gated(&server, &gate);
        let mut raw = raw_client(addr);
        // One segment, one decoded pass: the blocked request first, then
        // five that answer at once.
        let mut pass = frame(1, 1, b"blocked");
        for chid in 2..7 {
            pass.extend_from_slice(&frame(chid, 2, b"fast"));
        }
        send_bytes(&mut raw, &pass);
        let fast: HashSet<u32> = (0..5).map(|_| read_frame(&mut raw).unwrap().chid).collect();
        assert_eq!(fast, (2..7).collect(), "every fast reply came first");
        gate.open();
        assert_eq!(read_frame(&mut raw).unwrap().chid, 1);
        stop(&server);
    });
}

#[test]
fn on_one_core_pipelined_requests_of_many_connections_are_each_answered_once() {
    on_one_core(|| {
        let server = Transport::builder().workers(2).start().unwrap();
        let addr = server.listen(loopback(), echo).unwrap();
        const CONNS: usize = 4;
        const DEPTH: u32 = 64;
        let mut clients: Vec<_> = (0..CONNS).map(|_| raw_client(addr)).collect();
        for (i, client) in clients.iter_mut().enumerate() {
            let mut burst = Vec::new();
            for chid in 1..=DEPTH {
                burst.extend_from_slice(&frame(chid, 3, format!("{i}/{chid}").as_bytes()));
            }
            send_bytes(client, &burst);
        }
        for (i, client) in clients.iter_mut().enumerate() {
            let mut seen = HashSet::new();
            for _ in 1..=DEPTH {
                let reply = read_frame(client).unwrap();
                assert_eq!(reply.body, format!("{i}/{}", reply.chid).into_bytes());
                assert!(
                    seen.insert(reply.chid),
                    "channel {} answered twice",
                    reply.chid
                );
            }
        }
        stop(&server);
    });
}

#[test]
fn on_one_core_a_blocked_callback_never_holds_up_the_others_of_its_batch() {
    on_one_core(|| {
        // Answers both requests in one write: the client reads them as one
        // batch of responses.
        let (addr, server) = raw_server(|mut stream| {
            let a = read_frame(&mut stream).unwrap();
            let b = read_frame(&mut stream).unwrap();
            let mut both = frame(a.chid, 1, b"a");
            both.extend_from_slice(&frame(b.chid, 1, b"b"));
            stream.write_all(&both).unwrap();
            // Until the client closes.
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
        });
        let client = Transport::builder().workers(2).start().unwrap();
        let manager = ConnectionManager::new(&client);
        let (second_ran, wait_for_second) = mpsc::channel::<()>();
        let (both_ran, wait_for_both) = mpsc::channel::<()>();
        // The first callback blocks until the second one has run.
        manager
            .send(
                addr,
                Packet::new(1, "a"),
                Some(NEVER),
                move |result: Result<Packet, tbnet::Error>| {
                    assert_eq!(result.unwrap().body(), "a");
                    wait_for_second
                        .recv_timeout(WAIT_LIMIT)
                        .expect("the second callback ran");
                    both_ran.send(()).unwrap();
                },
            )
            .unwrap();
        manager
            .send(
                addr,
                Packet::new(1, "b"),
                Some(NEVER),
                move |result: Result<Packet, tbnet::Error>| {
                    assert_eq!(result.unwrap().body(), "b");
                    second_ran.send(()).unwrap();
                },
            )
            .unwrap();
        wait_for_both
            .recv_timeout(WAIT_LIMIT)
            .expect("both callbacks ran");
        stop(&client);
        server.join().unwrap();
    });
}
