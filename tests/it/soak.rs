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

/// How every request ended, one byte per request number: how many times
/// (the [`TIMES`] bits, saturating) and how (an outcome bit per way it ended).
/// One atomic update writes both, so a request is never seen ended without
/// its outcome.
struct Ledger {
    ended: Vec<AtomicU8>,
    issued: AtomicU64,
}

const TIMES: u8 = 0x0F;
const OK: u8 = 0x10;
const FAILED: u8 = 0x20;
const MISMATCHED: u8 = 0x40;

impl Ledger {
    fn end(&self, id: usize, expected: &[u8], result: Result<Packet, Error>) {
        let outcome = match result {
            Ok(p) if p.body() == expected => OK,
            Ok(_) => MISMATCHED,
            Err(_) => FAILED,
        };
        let update = |slot: u8| Some((slot & !TIMES) | outcome | ((slot & TIMES) + 1).min(TIMES));
        let _ = self.ended[id].fetch_update(Ordering::SeqCst, Ordering::SeqCst, update);
    }

    /// How many times request `id` ended.
    fn times(&self, id: usize) -> u8 {
        self.ended[id].load(Ordering::SeqCst) & TIMES
    }

    /// How many of the first `n` requests ended exactly once, with `outcome`.
    fn ended_once_with(&self, n: usize, outcome: u8) -> u64 {
        (self.ended[..n].iter())
            .filter(|slot| slot.load(Ordering::SeqCst) == 1 | outcome)
            .count() as u64
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

/// A chaotic server on `addr`, a [`ReservedPort`]'s: the previous server
/// stopped, so its listener is closed, and the reservation kept the port.
fn start_server(addr: SocketAddr, late: &Arc<Mutex<Vec<(Packet, Responder)>>>) -> Transport {
    let server = Transport::builder()
        .workers(2)
        .shutdown_grace(Duration::from_millis(50))
        .start()
        .unwrap();
    let bound = (server.listen(addr, chaotic(late.clone())))
        .unwrap_or_else(|e| panic!("could not listen on {addr}: {e}"));
    assert_eq!(bound, addr);
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
    });
    // Every restarted server listens on this port.
    let port = reserve_port();
    let addr = port.addr();
    let late = Arc::new(Mutex::new(Vec::new()));
    let server = Arc::new(Mutex::new(start_server(addr, &late)));
    let client = Transport::builder().workers(2).start().unwrap();
    let manager = Arc::new(
        ConnectionManager::new(&client)
            .with_queue_limit(4096)
            .with_backoff(Backoff {
                initial: Duration::from_millis(5),
                max: Duration::from_millis(50),
                ..Backoff::default()
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
    let all_ended = wait_until(WAIT_LIMIT, || (0..issued).all(|i| ledger.times(i) >= 1));
    let twice = (0..issued).filter(|&i| ledger.times(i) > 1).count();
    let never = (0..issued).filter(|&i| ledger.times(i) == 0).count();
    stop(&client);
    stop(&server.lock().unwrap());
    drop(port);
    let rss_end = resident_bytes().unwrap_or(0);
    let fds_end = open_fds();
    let ok = ledger.ended_once_with(issued, OK);
    let failed = ledger.ended_once_with(issued, FAILED);
    let mismatched = (ledger.ended[..issued].iter())
        .filter(|slot| slot.load(Ordering::SeqCst) & MISMATCHED != 0)
        .count();
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
