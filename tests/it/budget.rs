//! The transport's memory budget: many peers that send requests and never
//! read the replies cannot make it hold more than the documented bound, and
//! a well-behaved client is served throughout.

use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use tbnet::{ConnectionManager, Dispatch, Packet, Transport, DEFAULT_MAX_OUTBOUND};

use crate::support::*;

const BUDGET: usize = 1 << 20;
const PEERS: usize = 12;
const READ_CHUNK: usize = 64 * 1024;

/// Writes requests with `body_len`-byte bodies until `total` bytes went
/// out, or the server stopped taking them (a write blocked for a while).
/// The caller keeps the connection open, never reading it.
fn flood(mut peer: TcpStream, body_len: usize, total: usize) {
    peer.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let request = frame(1, 9, &vec![b'r'; body_len]);
    let mut sent = 0;
    while sent < total && peer.write_all(&request).is_ok() {
        sent += request.len();
    }
}

#[test]
fn peers_that_never_read_share_one_budget_and_others_are_served() {
    let server = Transport::builder()
        .workers(1)
        .dispatch(Dispatch::IoThread)
        .read_chunk(READ_CHUNK)
        .memory_budget(BUDGET)
        .start()
        .unwrap();
    let addr = server.listen(loopback(), echo).unwrap();
    assert_eq!(server.stats().memory, 0);

    let peers: Vec<TcpStream> = (0..PEERS).map(|_| raw_client(addr)).collect();
    let floods: Vec<_> = peers
        .iter()
        .map(|peer| {
            let peer = peer.try_clone().unwrap();
            thread::spawn(move || flood(peer, 16 * 1024, 8 << 20))
        })
        .collect();

    // What one peer alone may hold without the budget: its output limit.
    const { assert!(DEFAULT_MAX_OUTBOUND * PEERS > 8 * BUDGET) };
    // The bound the crate docs state: twice the budget, plus per connection
    // one read chunk of input and the replies to it.
    let bound = (2 * BUDGET + (PEERS + 1) * 2 * READ_CHUNK) as u64;
    let mut most = 0;
    assert!(wait_until(WAIT_LIMIT, || {
        let stats = server.stats();
        most = most.max(stats.memory);
        stats.budget_holds > 0
    }));
    for handle in floods {
        handle.join().unwrap();
        most = most.max(server.stats().memory);
    }
    assert!(most <= bound, "held {most} bytes; the bound is {bound}");
    assert!(most >= BUDGET as u64, "the budget was spent: {most}");

    // A well-behaved client is served while the budget is spent.
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    for i in 0..20 {
        let body = format!("served {i}");
        let reply = client
            .call(addr, Packet::new(1, body.clone()), Some(NEVER))
            .unwrap();
        assert_eq!(reply.body(), body.as_bytes());
        most = most.max(server.stats().memory);
    }
    assert!(most <= bound, "held {most} bytes; the bound is {bound}");

    // The peers go: their memory is given back.
    drop(peers);
    assert!(wait_until(WAIT_LIMIT, || server.stats().connections == 1));
    assert!(wait_until(WAIT_LIMIT, || server.stats().memory < 4 * READ_CHUNK as u64));
    stop(&client_transport);
    stop(&server);
}

/// Idle connections whose read buffers grew in a burst keep the budget
/// spent on their own. A connection held in the middle of a large request
/// must still get it whole and answered: the idle buffers are given back
/// rather than the held request waiting for its deadline.
#[test]
fn idle_buffers_give_way_to_a_connection_held_mid_request() {
    idle_buffers_give_way(Dispatch::IoThread);
}

/// The same with replies made on workers (they reach the IO thread as
/// commands, which may give memory back without a poll round after them).
#[test]
fn idle_buffers_give_way_with_worker_dispatch() {
    idle_buffers_give_way(Dispatch::Workers);
}

fn idle_buffers_give_way(dispatch: Dispatch) {
    const BUDGET: usize = 256 * 1024;
    const IDLE: usize = 8;
    let server = Transport::builder()
        .workers(1)
        .dispatch(dispatch)
        .read_chunk(READ_CHUNK)
        .memory_budget(BUDGET)
        .start()
        .unwrap();
    let addr = server.listen(loopback(), echo).unwrap();

    // Each idle peer sends a burst of small requests in one write (its
    // buffer grows with reads that fill it), reads every reply, then stays
    // connected and silent.
    let burst: Vec<u8> = (1..=64u32)
        .flat_map(|i| frame(i, 9, &[b'b'; 1000]))
        .collect();
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        let mut peer = raw_client(addr);
        peer.write_all(&burst).unwrap();
        for i in 1..=64u32 {
            assert_eq!(read_frame(&mut peer).unwrap().chid, i);
        }
        idle.push(peer);
    }

    // One request far larger than a connection's share of the budget.
    let mut peer = raw_client(addr);
    let body = vec![b'L'; 2 * READ_CHUNK];
    peer.write_all(&frame(77, 9, &body)).unwrap();
    let reply = read_frame(&mut peer).expect("the held request is answered");
    assert_eq!(reply.chid, 77);
    assert_eq!(reply.body, body);
    // The request went through because buffers were given back.
    assert!(server.stats().budget_releases > 0, "{:?}", server.stats());
    drop(idle);
    stop(&server);
}
