//! Hostile or broken peers cost one connection, and no more memory than the
//! bytes they actually sent.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tbnet::{ConnectionManager, Dispatch, Error, Packet, Transport};

use crate::support::*;

/// A well-behaved client still gets its answers from `server`.
fn assert_still_serving(server: &Server) {
    let client = transport();
    let manager = ConnectionManager::new(&client);
    for i in 0..10 {
        let body = format!("still here {i}");
        let response = manager
            .call(server.addr, Packet::new(3, body.clone()), Some(NEVER))
            .expect("a well-behaved client is served");
        assert_eq!(response.body(), body.as_bytes());
    }
    stop(&client);
}

/// Deterministic noise (xorshift64).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn huge_announced_bodies_cost_only_the_bytes_that_arrived() {
    let server = echo_server();
    let before = resident_bytes();
    let announced = 64 << 20; // the default maximum: a valid header
    let mut peers: Vec<TcpStream> = (0..16)
        .map(|i| {
            let mut peer = raw_client(server.addr);
            send_bytes(&mut peer, &header(FLAG, i + 1, 0, announced));
            send_bytes(&mut peer, &[0x55; 1024]);
            peer
        })
        .collect();
    let arrived = 16 * (16 + 1024);
    assert!(wait_until(WAIT_LIMIT, || server.transport.stats().bytes_in >= arrived));
    if let (Some(before), Some(after)) = (before, resident_bytes()) {
        let grown = after.saturating_sub(before);
        // Allocating what the headers announce would cost 1 GiB.
        assert!(grown < 128 << 20, "resident memory grew by {grown} bytes");
    }
    assert_still_serving(&server);
    peers.clear();
    stop(&server.transport);
}

#[test]
fn random_bytes_close_only_their_connection() {
    let server = echo_server();
    let mut peers = Vec::new();
    for seed in 1..=8u64 {
        let mut peer = raw_client(server.addr);
        let _ = peer.write_all(&noise(seed, 4096));
        peers.push(peer);
    }
    for peer in &mut peers {
        assert!(
            closed_by_peer(peer),
            "the server closed the noisy connection"
        );
    }
    assert!(server.transport.stats().bad_frames >= 8);
    assert_still_serving(&server);
    stop(&server.transport);
}

#[test]
fn bad_flag_negative_length_and_oversize_each_close_the_connection() {
    let transport = Transport::builder()
        .streamer(tbnet::proto::DefaultStreamer::new().with_max_body_len(1000))
        .start()
        .unwrap();
    let addr = transport.listen(loopback(), echo).unwrap();
    let server = Server { transport, addr };
    let headers = [
        header(0x4745_5420, 1, 0, 0), // "GET " instead of "AnEt"
        header(FLAG, 1, 0, -1),
        header(FLAG, 1, 0, 1001),
    ];
    for bad in headers {
        let mut peer = raw_client(server.addr);
        send_bytes(&mut peer, &bad);
        assert!(
            closed_by_peer(&mut peer),
            "{bad:?} must close the connection"
        );
    }
    assert_eq!(server.transport.stats().bad_frames, 3);
    assert_still_serving(&server);
    stop(&server.transport);
}

#[test]
fn truncated_frames_and_abrupt_closes_are_harmless() {
    let server = echo_server();
    let cuts = [1, 8, 15, 16, 17, 30];
    for cut in cuts {
        let mut peer = raw_client(server.addr);
        send_bytes(&mut peer, &frame(7, 1, b"cut short by the peer")[..cut]);
        drop(peer);
    }
    // Only once the server accepted every truncated connection, read all
    // that was sent on it and closed it, is there something to survive.
    let sent: u64 = cuts.iter().sum::<usize>() as u64;
    let seen = wait_until(WAIT_LIMIT, || {
        let stats = server.transport.stats();
        stats.connections_total == cuts.len() as u64
            && stats.bytes_in == sent
            && stats.connections == 0
    });
    assert!(
        seen,
        "the server did not see and close every truncated connection: {:?}",
        server.transport.stats()
    );
    assert_eq!(server.transport.stats().packets_in, 0, "no frame completed");
    assert_still_serving(&server);
    stop(&server.transport);
}

#[test]
fn a_frame_trickled_one_byte_at_a_time_is_answered() {
    let server = echo_server();
    let mut peer = raw_client(server.addr);
    for byte in frame(9, 4, b"slowly, slowly") {
        send_bytes(&mut peer, &[byte]);
    }
    let reply = read_frame(&mut peer).unwrap();
    assert_eq!(
        (reply.chid, reply.pcode, &reply.body[..]),
        (9, 4, &b"slowly, slowly"[..])
    );
    stop(&server.transport);
}

#[test]
fn hundreds_of_idle_connections_do_not_block_anyone() {
    let server = echo_server();
    let idle: Vec<TcpStream> = (0..300).map(|_| raw_client(server.addr)).collect();
    assert!(wait_until(WAIT_LIMIT, || server
        .transport
        .stats()
        .connections
        >= 300));
    assert_still_serving(&server);
    drop(idle);
    stop(&server.transport);
}

#[test]
fn a_reset_with_thousands_of_requests_in_flight_harms_no_one_else() {
    let server = echo_server();
    let peer = raw_client(server.addr);
    let mut burst = Vec::new();
    for chid in 1..=5000 {
        burst.extend_from_slice(&frame(chid, 1, b"in flight"));
    }
    (&peer).write_all(&burst).unwrap();
    // Linger 0: close with RST while the server is still answering.
    socket2::SockRef::from(&peer)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(peer);
    assert_still_serving(&server);
    stop(&server.transport);
}

#[test]
fn channel_id_zero_is_one_way_and_keeps_the_connection() {
    let server = echo_server();
    let mut peer = raw_client(server.addr);
    send_bytes(&mut peer, &frame(0, 1, b"one-way"));
    send_bytes(&mut peer, &frame(5, 1, b"two-way"));
    let reply = read_frame(&mut peer).unwrap();
    assert_eq!((reply.chid, &reply.body[..]), (5, &b"two-way"[..]));
    stop(&server.transport);
}

#[test]
fn a_peer_that_never_reads_replies_is_paused_not_buffered() {
    let transport = Transport::builder()
        .dispatch(Dispatch::IoThread)
        .max_outbound(1 << 20)
        .start()
        .unwrap();
    let addr = transport.listen(loopback(), echo).unwrap();
    let server = Server { transport, addr };
    let before = resident_bytes();

    let mut greedy = raw_client(server.addr);
    greedy
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let request = frame(1, 1, &[0xAB; 64 * 1024]);
    let mut written = 0usize;
    let limit = 512usize << 20;
    while written < limit {
        // Continue the frame a short write left unfinished.
        match greedy.write(&request[written % request.len()..]) {
            Ok(n) => written += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("write failed: {e}"),
        }
    }
    assert!(
        written < limit,
        "the server kept reading {written} bytes from a peer that never reads"
    );
    if let (Some(before), Some(after)) = (before, resident_bytes()) {
        let grown = after.saturating_sub(before);
        assert!(grown < 96 << 20, "resident memory grew by {grown} bytes");
    }
    assert_still_serving(&server);

    // Once the peer reads, the server resumes reading it and answers every
    // whole request that was written.
    let expected = written / request.len() * request.len();
    let mut sink = vec![0u8; 1 << 20];
    let drained = std::thread::spawn(move || {
        let mut total = 0usize;
        loop {
            let n = match greedy.read(&mut sink) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    eprintln!("drain read error after {total}: {e}");
                    break;
                }
            };
            total += n;
            if total >= expected {
                break;
            }
        }
        total
    });
    assert_eq!(
        within("draining the replies", move || drained.join().unwrap()),
        expected
    );
    stop(&server.transport);
}

#[test]
fn a_server_sending_garbage_fails_only_its_own_requests() {
    let (bad_addr, bad) = raw_server(|mut stream| {
        let _ = read_frame(&mut stream);
        let _ = stream.write_all(&noise(42, 64));
        // Hold the socket until the client closes it.
        let _ = stream.read(&mut [0; 1]);
    });
    let good = echo_server();
    let client = transport();
    let manager = ConnectionManager::new(&client);
    let failed = manager.call(bad_addr, Packet::new(1, "hello?"), Some(NEVER));
    assert!(matches!(failed, Err(Error::Disconnected)), "{failed:?}");
    let ok = manager
        .call(good.addr, Packet::new(1, "fine"), Some(NEVER))
        .unwrap();
    assert_eq!(ok.body(), "fine");
    assert!(client.stats().bad_frames >= 1);
    stop(&client);
    stop(&good.transport);
    bad.join().unwrap();
}
