//! `ConnectionManager::post` against a peer that behaves like a C++ tbnet
//! server: it asserts (and so dies) on channel id 0, and answers every
//! packet it gets.

use std::collections::HashSet;
use std::time::Duration;

use tbnet::{ConnectionManager, Error, Packet};

use crate::support::*;

/// What the strict peer saw before it stopped.
#[derive(Debug)]
struct Seen {
    chids: Vec<u32>,
    saw_zero: bool,
}

/// A raw peer that reads `n` frames and answers each (channel id copied,
/// packet code 0, its own body, as tbnet servers do), unless a frame
/// carries channel id 0: then it closes the connection at once, as a C++
/// tbnet server's `assert(chid != 0)` would.
fn strict_peer(n: usize) -> (std::net::SocketAddr, std::thread::JoinHandle<Seen>) {
    raw_server(move |mut stream| {
        let mut seen = Seen {
            chids: Vec::new(),
            saw_zero: false,
        };
        while seen.chids.len() < n {
            let Ok(frame) = read_frame(&mut stream) else {
                break;
            };
            if frame.chid == 0 {
                seen.saw_zero = true;
                break;
            }
            seen.chids.push(frame.chid);
            send_bytes(&mut stream, &crate::support::frame(frame.chid, 0, b"ok\0"));
        }
        seen
    })
}

#[test]
fn post_never_sends_channel_id_zero_and_replies_are_discarded_and_counted() {
    const POSTS: usize = 40;
    let (addr, peer) = strict_peer(POSTS + 1);
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    for i in 0..POSTS {
        client
            .post(addr, Packet::new(3, format!("post {i}")))
            .expect("post");
    }
    assert!(
        wait_until(WAIT_LIMIT, || client_transport.stats().post_replies
            == POSTS as u64),
        "{:?}",
        client_transport.stats()
    );
    // The connection survived every post: a call still goes through.
    let answer = client
        .call(addr, Packet::new(3, "call"), Some(NEVER))
        .expect("the peer is still there");
    assert_eq!(answer.body(), "ok\0");
    let stats = client_transport.stats();
    assert_eq!(stats.post_replies, POSTS as u64, "{stats:?}");
    assert_eq!(stats.late_responses, 0, "no reply went astray: {stats:?}");
    assert_eq!(stats.pending, 0, "{stats:?}");
    assert_eq!(stats.connections_total, 1, "never reconnected: {stats:?}");

    let seen = within("strict peer", move || peer.join().unwrap());
    assert!(!seen.saw_zero, "post sent channel id 0");
    assert_eq!(seen.chids.len(), POSTS + 1);
    let unique: HashSet<u32> = seen.chids[..POSTS].iter().copied().collect();
    assert_eq!(unique.len(), POSTS, "posts in flight share no id");
    stop(&client_transport);
}

#[test]
fn an_unanswered_post_holds_its_slot_until_the_default_timeout() {
    // A server that reads and never answers.
    let server = SilentServer::start();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport)
        .with_queue_limit(2)
        // Long enough that every post reaches the server under load.
        .with_default_timeout(Duration::from_secs(2));
    client.connect(server.addr).expect("connect");
    client.post(server.addr, Packet::new(1, "a")).expect("post");
    client.post(server.addr, Packet::new(1, "b")).expect("post");
    let refused = client
        .post(server.addr, Packet::new(1, "c"))
        .expect_err("two posts fill a queue of two");
    assert!(matches!(refused.error(), Error::QueueFull));
    assert_eq!(refused.into_inner().body(), "c");
    // Their timeout frees both slots.
    assert!(wait_until(WAIT_LIMIT, || client_transport.stats().timeouts == 2));
    client
        .post(server.addr, Packet::new(1, "d"))
        .expect("room again");
    server.wait_received(3);
    let stats = client_transport.stats();
    assert_eq!(stats.post_replies, 0);
    stop(&client_transport);
    stop(&server.transport);
}
