//! The chaos soak: many clients, all three ways of waiting, a server that
//! answers late, never, or restarts under them. At the end every request
//! ended exactly once, no thread is stuck and memory is back where it was.
//!
//! ```sh
//! TBNET_SOAK_SECS=300 cargo test --release --test it soak -- --ignored --nocapture
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tbnet::{Backoff, ConnectionManager, Error, Packet, Responder, Transport, WaitObject};

use crate::support::*;

/// A refused submission (server down, queue full) waits a moment before the
/// next, as a real client would.
fn pause() {
    thread::sleep(Duration::from_millis(1));
}

/// xorshift64: cheap, deterministic per thread.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Every request's outcome count, indexed by request number.
struct Ledger {
    ended: Vec<AtomicU8>,
    issued: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    mismatched: AtomicU64,
}

impl Ledger {
    fn end(&self, id: usize, expected: &[u8], result: Result<Packet, Error>) {
        self.ended[id].fetch_add(1, Ordering::SeqCst);
        match result {
            Ok(p) if p.body() == expected => self.ok.fetch_add(1, Ordering::Relaxed),
            Ok(_) => self.mismatched.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// The chaotic handler: most requests answered at once, some late (from
/// another thread), some never.
fn chaotic(late: Arc<Mutex<Vec<(Packet, Responder)>>>) -> impl Fn(Packet, Responder) + Send + Sync {
    move |request: Packet, responder: Responder| {
        let roll = request.body().first().copied().unwrap_or(0) % 20;
        match roll {
            0 => {} // never answered: the client's deadline ends it
            1 | 2 => late.lock().unwrap().push((request, responder)),
            _ => echo(request, responder),
        }
    }
}

fn start_server(addr: SocketAddr, late: &Arc<Mutex<Vec<(Packet, Responder)>>>) -> Transport {
    let server = Transport::builder()
        .workers(2)
        .shutdown_grace(Duration::from_millis(50))
        .start()
        .unwrap();
    assert!(
        wait_until(WAIT_LIMIT, || server
            .listen(addr, chaotic(late.clone()))
            .is_ok()),
        "could not listen on {addr}"
    );
    server
}

#[test]
#[ignore = "soak: run by name, TBNET_SOAK_SECS sets the duration (default 5)"]
fn soak_chaos_every_request_ends_exactly_once() {
    let secs: u64 = std::env::var("TBNET_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let max_requests = 150_000_000usize;
    let ledger = Arc::new(Ledger {
        ended: (0..max_requests).map(|_| AtomicU8::new(0)).collect(),
        issued: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        mismatched: AtomicU64::new(0),
    });
    let addr = {
        let probe = std::net::TcpListener::bind(loopback()).unwrap();
        probe.local_addr().unwrap()
    };
    let late = Arc::new(Mutex::new(Vec::new()));
    let server = Arc::new(Mutex::new(start_server(addr, &late)));
    let client = Transport::builder().workers(2).start().unwrap();
    let manager = Arc::new(
        ConnectionManager::new(&client)
            .with_queue_limit(4096)
            .with_backoff(Backoff {
                initial: Duration::from_millis(5),
                max: Duration::from_millis(50),
            }),
    );
    // Touch every ledger page now, so its memory counts from the start.
    for slot in &ledger.ended {
        slot.store(0, Ordering::Relaxed);
    }
    let fds_start = open_fds();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let running = Arc::new(AtomicBool::new(true));

    // Late answers, from a thread of their own.
    let answerer = {
        let late = late.clone();
        let running = running.clone();
        thread::spawn(move || {
            let mut rng = Rng(7);
            while running.load(Ordering::SeqCst) {
                let batch = std::mem::take(&mut *late.lock().unwrap());
                for (request, responder) in batch {
                    if rng.next() % 2 == 0 {
                        echo(request, responder);
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // Server restarts: every connection drops, pending requests fail.
    let chaos = {
        let server = server.clone();
        let late = late.clone();
        let running = running.clone();
        thread::spawn(move || {
            let mut restarts = 0u64;
            while running.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(700));
                let mut current = server.lock().unwrap();
                current.stop();
                late.lock().unwrap().clear();
                *current = start_server(addr, &late);
                restarts += 1;
            }
            restarts
        })
    };

    let clients: Vec<_> = (0..6)
        .map(|worker| {
            let ledger = ledger.clone();
            let manager = manager.clone();
            thread::spawn(move || {
                let mut rng = Rng(worker as u64 * 7919 + 1);
                let mut refused = 0u64;
                // Stop early rather than outgrow the ledger.
                while Instant::now() < deadline
                    && (ledger.issued.load(Ordering::SeqCst) as usize) < max_requests - 64
                {
                    let timeout = Some(Duration::from_millis(50 + rng.next() % 200));
                    let batch = 1 + (rng.next() % 16) as usize;
                    let mut ids = Vec::with_capacity(batch);
                    for _ in 0..batch {
                        let id = ledger.issued.fetch_add(1, Ordering::SeqCst) as usize;
                        let body = (rng.next() as u32).to_le_bytes().repeat(1 + id % 64);
                        ids.push((id, body));
                    }
                    match worker % 3 {
                        0 => {
                            for (id, body) in ids {
                                let request = Packet::new(1, body.clone());
                                let result = manager.call(addr, request, timeout);
                                if matches!(result, Err(Error::QueueFull | Error::Disconnected)) {
                                    refused += 1;
                                    pause();
                                }
                                ledger.end(id, &body, result);
                            }
                        }
                        1 => {
                            for (id, body) in ids {
                                let ledger2 = ledger.clone();
                                let expected = body.clone();
                                let sent =
                                    manager.send(addr, Packet::new(1, body), timeout, move |r| {
                                        ledger2.end(id, &expected, r)
                                    });
                                if let Err(e) = sent {
                                    refused += 1;
                                    ledger.end(id, &[], Err(e.into_parts().0));
                                    pause();
                                }
                            }
                        }
                        _ => {
                            // Futures and a WaitObject batch, alternately.
                            if rng.next() % 2 == 0 {
                                for (id, body) in ids {
                                    match manager.call_async(
                                        addr,
                                        Packet::new(1, body.clone()),
                                        timeout,
                                    ) {
                                        Ok(f) => ledger.end(id, &body, tokio_test::block_on(f)),
                                        Err(e) => {
                                            refused += 1;
                                            ledger.end(id, &[], Err(e.into_parts().0));
                                            pause();
                                        }
                                    }
                                }
                            } else {
                                let mut wait = WaitObject::new();
                                let mut registered = Vec::new();
                                for (id, body) in ids {
                                    match manager.send_wait(
                                        addr,
                                        Packet::new(1, body.clone()),
                                        timeout,
                                        &mut wait,
                                    ) {
                                        Ok(_) => registered.push((id, body)),
                                        Err(e) => {
                                            refused += 1;
                                            ledger.end(id, &[], Err(e.into_parts().0));
                                            pause();
                                        }
                                    }
                                }
                                let results = wait.wait_all();
                                assert_eq!(results.len(), registered.len());
                                for ((id, body), r) in registered.into_iter().zip(results) {
                                    ledger.end(id, &body, r);
                                }
                            }
                        }
                    }
                }
                refused
            })
        })
        .collect();

    // The starting range of memory is taken once the allocator has warmed
    // up (its per-thread arenas are set up in the first moments).
    thread::sleep(Duration::from_secs(secs.min(10) / 5));
    let rss_start = resident_bytes().unwrap_or(0);
    // The clients run until the deadline; only then does a hang guard apply.
    thread::sleep(deadline.saturating_duration_since(Instant::now()));
    let refused: u64 = clients
        .into_iter()
        .map(|h| within("a client thread", move || h.join().unwrap()))
        .sum();
    running.store(false, Ordering::SeqCst);
    let restarts = chaos.join().unwrap();
    answerer.join().unwrap();

    // Callbacks still pending end by their deadlines (at most 250 ms).
    let issued = ledger.issued.load(Ordering::SeqCst) as usize;
    let all_ended = wait_until(WAIT_LIMIT, || {
        (0..issued).all(|i| ledger.ended[i].load(Ordering::SeqCst) >= 1)
    });
    let twice = (0..issued)
        .filter(|&i| ledger.ended[i].load(Ordering::SeqCst) > 1)
        .count();
    let never = (0..issued)
        .filter(|&i| ledger.ended[i].load(Ordering::SeqCst) == 0)
        .count();
    stop(&client);
    stop(&server.lock().unwrap());
    let rss_end = resident_bytes().unwrap_or(0);
    let fds_end = open_fds();
    let ok = ledger.ok.load(Ordering::SeqCst);
    let failed = ledger.failed.load(Ordering::SeqCst);
    let mismatched = ledger.mismatched.load(Ordering::SeqCst);
    println!(
        "soak {secs}s: {issued} requests, {ok} ok, {failed} failed ({refused} refused or disconnected), \
         {mismatched} mismatched, {restarts} server restarts, rss {} -> {} MiB, fds {fds_start} -> {fds_end}",
        rss_start >> 20,
        rss_end >> 20
    );
    assert!(all_ended && never == 0, "{never} requests never ended");
    assert_eq!(twice, 0, "{twice} requests ended more than once");
    assert_eq!(mismatched, 0);
    assert_eq!(ok + failed, issued as u64);
    assert!(ok > 0);
    // Every restarted server released its descriptors.
    assert!(
        fds_end <= fds_start + 8,
        "descriptors: {fds_start} -> {fds_end}"
    );
    assert!(
        rss_end < rss_start + (64 << 20),
        "memory grew from {} to {} MiB",
        rss_start >> 20,
        rss_end >> 20
    );
}
