//! `Dispatch::Ordered` (one connection's requests one after another, in
//! arrival order, connections in parallel) and batch adaptors (tbnet's
//! `handleBatchPacket`), over loopback.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use tbnet::{
    Batch, BatchAdaptor, ConnectionManager, Dispatch, Error, Packet, Responder, Transport,
};

use crate::faults::spawn_listening;
use crate::support::WAIT_LIMIT;
use crate::support::{frame, raw_client, read_frame, stop, transport, wait_until, Gate};

/// Writes `n` requests (channel ids 1..=n, body = the id) in one write.
fn send_pipelined(stream: &mut TcpStream, n: u32) {
    let mut bytes = Vec::new();
    for chid in 1..=n {
        bytes.extend_from_slice(&frame(chid, 7, &chid.to_be_bytes()));
    }
    stream.write_all(&bytes).expect("write the requests");
}

/// Reads `n` replies and returns their channel ids in arrival order,
/// checking each body is its request's.
fn reply_order(stream: &mut TcpStream, n: u32) -> Vec<u32> {
    (0..n)
        .map(|_| {
            let reply = read_frame(stream).expect("a reply");
            assert_eq!(reply.body, reply.chid.to_be_bytes(), "an altered body");
            reply.chid
        })
        .collect()
}

/// Handles requests with uneven delays, checking that no two of one
/// connection ever run at once.
#[derive(Default)]
struct Uneven {
    running: Mutex<HashMap<SocketAddr, usize>>,
    overlapped: AtomicBool,
    handled: AtomicUsize,
}

impl Uneven {
    fn handle(&self, request: Packet, responder: Responder) {
        let peer = responder.peer();
        {
            let mut running = self.running.lock().unwrap();
            let n = running.entry(peer).or_default();
            *n += 1;
            if *n > 1 {
                self.overlapped.store(true, Ordering::SeqCst);
            }
        }
        // Uneven work, so that a pool free to reorder would: every third
        // request gives its core away for a while.
        let chid = u32::from_be_bytes(request.body()[..4].try_into().expect("4 bytes"));
        if chid % 3 == 0 {
            for _ in 0..50 {
                thread::yield_now();
            }
        }
        *self
            .running
            .lock()
            .unwrap()
            .get_mut(&peer)
            .expect("entered") -= 1;
        self.handled.fetch_add(1, Ordering::SeqCst);
        let _ = responder.reply(request.reply(request.body().clone()));
    }
}

#[test]
fn ordered_dispatch_answers_each_connection_in_arrival_order() {
    let server = Transport::builder().workers(4).start().unwrap();
    let uneven = Arc::new(Uneven::default());
    let handler = {
        let uneven = uneven.clone();
        move |request: Packet, responder: Responder| uneven.handle(request, responder)
    };
    let addr = server
        .listen_with("127.0.0.1:0", handler, Dispatch::Ordered)
        .unwrap();
    let per_conn = 300;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(move || {
                let mut stream = raw_client(addr);
                send_pipelined(&mut stream, per_conn);
                reply_order(&mut stream, per_conn)
            })
        })
        .collect();
    for client in clients {
        let order = client.join().expect("a client thread");
        assert_eq!(order, (1..=per_conn).collect::<Vec<_>>());
    }
    assert!(
        !uneven.overlapped.load(Ordering::SeqCst),
        "two requests of one connection ran at once"
    );
    assert_eq!(uneven.handled.load(Ordering::SeqCst), 4 * per_conn as usize);
    stop(&server);
}

#[test]
fn ordered_dispatch_runs_different_connections_in_parallel() {
    // A's request waits until B's was handled: with two workers this ends
    // only if B's connection is not queued behind A's.
    let server = Transport::builder().workers(2).start().unwrap();
    let gate = Gate::default();
    let (entered_tx, entered) = mpsc::channel();
    let entered_tx = Mutex::new(entered_tx);
    let handler = {
        let gate = gate.clone();
        move |request: Packet, responder: Responder| {
            match &request.body()[..] {
                b"wait" => {
                    let _ = entered_tx.lock().unwrap().send(());
                    gate.pass();
                }
                _ => gate.open(),
            }
            let _ = responder.reply(request.reply(request.body().clone()));
        }
    };
    let addr = server
        .listen_with("127.0.0.1:0", handler, Dispatch::Ordered)
        .unwrap();
    let client = transport();
    let (a, b) = (
        ConnectionManager::new(&client),
        ConnectionManager::new(&client),
    );
    let waiting = a
        .call_async(addr, Packet::new(1, "wait"), Some(WAIT_LIMIT))
        .expect("queued");
    entered
        .recv_timeout(WAIT_LIMIT)
        .expect("A's request reached its handler");
    let freed = b.call(addr, Packet::new(1, "free"), Some(WAIT_LIMIT));
    // Opened whatever happened, so no worker stays blocked.
    gate.open();
    assert_eq!(freed.expect("B answered while A waited").body(), "free");
    let waited = tokio_test::block_on(waiting).expect("A answered once B was");
    assert_eq!(waited.body(), "wait");
    stop(&client);
    stop(&server);
}

#[test]
fn a_full_ordered_queue_pauses_reading_and_loses_nothing() {
    // Two queue places, one worker held: the IO thread must stop reading
    // rather than queue everything, and read on once the worker frees up.
    // Small reads, so that one decode pass (which an ordered connection
    // queues whole) is a few hundred requests, far below `n`.
    let read_chunk = 4096;
    let server = Transport::builder()
        .workers(1)
        .worker_queue(2)
        .read_chunk(read_chunk)
        .start()
        .unwrap();
    let gate = Gate::default();
    let handler = {
        let gate = gate.clone();
        move |request: Packet, responder: Responder| {
            gate.pass();
            let _ = responder.reply(request.reply(request.body().clone()));
        }
    };
    let addr = server
        .listen_with("127.0.0.1:0", handler, Dispatch::Ordered)
        .unwrap();
    let n = 2000;
    let mut stream = raw_client(addr);
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        thread::spawn(move || send_pipelined(&mut stream, n))
    };
    // The server reads some, fills the queue and pauses.
    assert!(wait_until(WAIT_LIMIT, || server.stats().worker_queue >= 2));
    let queued = server.stats().worker_queue;
    // Below worker_queue(2) the IO thread reads on; the read that reaches
    // it is queued whole, then it pauses. The gated worker takes one
    // request, which may resume reading once more: at most the bound plus
    // two reads, far below `n`.
    let per_read = read_chunk / frame(1, 7, &1u32.to_be_bytes()).len() + 1;
    assert!(
        queued <= (2 + 2 * per_read) as u64,
        "the IO thread queued {queued} requests instead of pausing"
    );
    gate.open();
    assert_eq!(reply_order(&mut stream, n), (1..=n).collect::<Vec<_>>());
    writer.join().unwrap();
    assert!(wait_until(WAIT_LIMIT, || server.stats().worker_queue == 0));
    stop(&server);
}

#[test]
fn echo_server_ordered_answers_every_connection_in_order() {
    let (mut child, addr) = spawn_listening(
        "echo_server",
        &["--addr", "127.0.0.1:0", "--workers", "4", "--ordered"],
    );
    let clients: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(move || {
                let mut stream = raw_client(addr);
                send_pipelined(&mut stream, 500);
                reply_order(&mut stream, 500)
            })
        })
        .collect();
    let orders: Vec<_> = clients.into_iter().map(|c| c.join()).collect();
    let _ = child.kill();
    let _ = child.wait();
    for order in orders {
        assert_eq!(
            order.expect("a client thread"),
            (1..=500).collect::<Vec<_>>()
        );
    }
}

/// Records every batch's size and the thread it ran on; answers each
/// request with its own body. The first batch may be held at a gate.
struct Batches {
    sizes: Mutex<Vec<usize>>,
    threads: Mutex<Vec<String>>,
    hold_first: Option<(mpsc::Sender<()>, Gate)>,
    seen: AtomicUsize,
}

impl Batches {
    fn new(hold_first: Option<(mpsc::Sender<()>, Gate)>) -> Arc<Self> {
        Arc::new(Batches {
            sizes: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            hold_first,
            seen: AtomicUsize::new(0),
        })
    }
}

struct Shared(Arc<Batches>);

impl BatchAdaptor for Shared {
    fn handle_batch(&self, batch: Batch) {
        let b = &self.0;
        b.sizes.lock().unwrap().push(batch.len());
        let name = thread::current().name().unwrap_or("").to_string();
        b.threads.lock().unwrap().push(name);
        if b.seen.fetch_add(1, Ordering::SeqCst) == 0 {
            if let Some((entered, gate)) = &b.hold_first {
                let _ = entered.send(());
                gate.pass();
            }
        }
        for (request, responder) in batch {
            let _ = responder.reply(request.reply(request.body().clone()));
        }
    }
}

#[test]
fn an_ordered_batch_adaptor_gets_everything_waiting_at_once() {
    let server = Transport::builder().workers(1).start().unwrap();
    let (entered_tx, entered) = mpsc::channel();
    let gate = Gate::default();
    let batches = Batches::new(Some((entered_tx, gate.clone())));
    let addr = server
        .listen_batch("127.0.0.1:0", Shared(batches.clone()), Dispatch::Ordered)
        .unwrap();
    let mut stream = raw_client(addr);
    stream.write_all(&frame(1, 7, &1u32.to_be_bytes())).unwrap();
    entered
        .recv_timeout(WAIT_LIMIT)
        .expect("the first batch reached the handler");
    // While the first batch is held, 49 more arrive and wait in the strand.
    let mut rest = Vec::new();
    for chid in 2..=50u32 {
        rest.extend_from_slice(&frame(chid, 7, &chid.to_be_bytes()));
    }
    stream.write_all(&rest).unwrap();
    assert!(wait_until(WAIT_LIMIT, || server.stats().packets_in == 50));
    gate.open();
    assert_eq!(reply_order(&mut stream, 50), (1..=50).collect::<Vec<_>>());
    assert_eq!(*batches.sizes.lock().unwrap(), vec![1, 49]);
    assert!(batches
        .threads
        .lock()
        .unwrap()
        .iter()
        .all(|t| t.starts_with("tbnet-worker")));
    stop(&server);
}

#[test]
fn a_batch_adaptor_answers_every_request_on_the_io_thread_and_on_workers() {
    for dispatch in [Dispatch::IoThread, Dispatch::Workers] {
        let server = Transport::builder().workers(2).start().unwrap();
        let batches = Batches::new(None);
        let addr = server
            .listen_batch("127.0.0.1:0", Shared(batches.clone()), dispatch)
            .unwrap();
        let n = 400;
        let mut stream = raw_client(addr);
        send_pipelined(&mut stream, n);
        let mut order = reply_order(&mut stream, n);
        if dispatch == Dispatch::IoThread {
            // One thread, batches in arrival order: replies in order too.
            assert_eq!(order, (1..=n).collect::<Vec<_>>());
        }
        order.sort_unstable();
        assert_eq!(order, (1..=n).collect::<Vec<_>>(), "{dispatch:?}");
        assert_eq!(
            batches.sizes.lock().unwrap().iter().sum::<usize>(),
            n as usize
        );
        let expected = if dispatch == Dispatch::IoThread {
            "tbnet-io"
        } else {
            "tbnet-worker"
        };
        let threads = batches.threads.lock().unwrap().clone();
        assert!(
            threads.iter().all(|t| t.starts_with(expected)),
            "{dispatch:?}: {threads:?}"
        );
        stop(&server);
    }
}

#[test]
fn a_panicking_batch_handler_costs_only_its_batch() {
    struct PanicOnce(AtomicBool);
    impl BatchAdaptor for PanicOnce {
        fn handle_batch(&self, batch: Batch) {
            let batch: Vec<_> = batch.into_iter().collect();
            if batch.iter().any(|(request, _)| request.body() == "lost")
                && !self.0.swap(true, Ordering::SeqCst)
            {
                panic!("the batch holding \"lost\"");
            }
            for (request, responder) in batch {
                let _ = responder.reply(request.reply(request.body().clone()));
            }
        }
    }
    let server = Transport::builder().workers(1).start().unwrap();
    let addr = server
        .listen_batch(
            "127.0.0.1:0",
            PanicOnce(AtomicBool::new(false)),
            Dispatch::Ordered,
        )
        .unwrap();
    let client = transport();
    let manager = ConnectionManager::new(&client);
    let lost = manager.call(
        addr,
        Packet::new(1, "lost"),
        Some(crate::support::SHORT_TIMEOUT),
    );
    assert!(
        matches!(lost, Err(Error::Timeout)),
        "the panicked batch's request was answered: {lost:?}"
    );
    let answered = manager
        .call(addr, Packet::new(1, "next"), Some(WAIT_LIMIT))
        .unwrap();
    assert_eq!(answered.body(), "next");
    stop(&client);
    stop(&server);
}
