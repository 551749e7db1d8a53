//! Who gets in: allow-lists, connection limits, requests in flight per
//! connection, the first-frame deadline and the status page's allow-list.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tbnet::{AllowList, ConnectionManager, Dispatch, ListenOptions, Packet, Responder, Transport};

use crate::support::*;

/// A raw client connected to `addr` from the loopback address `from`
/// (Linux routes all of 127.0.0.0/8 to the loopback interface).
fn raw_client_from(from: &str, addr: SocketAddr) -> TcpStream {
    let from: SocketAddr = format!("{from}:0").parse().unwrap();
    let domain = if from.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket
        .bind(&from.into())
        .expect("bind the client's source address");
    socket.connect(&addr.into()).expect("connect");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(HANG_GUARD)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Sends one request on a raw connection and checks its echo.
fn echo_once(stream: &mut TcpStream, chid: u32, body: &[u8]) {
    send_bytes(stream, &frame(chid, 5, body));
    let reply = read_frame(stream).expect("an answer");
    assert_eq!((reply.chid, &reply.body[..]), (chid, body));
}

fn server_with(builder: tbnet::TransportBuilder, options: ListenOptions) -> Server {
    let transport = builder.workers(2).start().unwrap();
    let addr = transport
        .listen_with_options(loopback(), echo, options)
        .unwrap();
    Server { transport, addr }
}

#[test]
fn the_allow_list_refuses_other_peers_before_reading_and_admits_listed_ones() {
    let allow: AllowList = ["127.0.0.2".parse().unwrap()].into_iter().collect();
    let server = server_with(Transport::builder(), ListenOptions::new().allow(allow));

    // 127.0.0.1 is not listed: closed at once, even with a request sent.
    let mut refused = raw_client(server.addr);
    let _ = refused.write_all(&frame(1, 5, b"let me in"));
    assert!(closed_by_peer(&mut refused));
    assert!(wait_until(WAIT_LIMIT, || server.transport.stats().refused == 1));
    assert_eq!(server.transport.stats().packets_in, 0);

    let mut admitted = raw_client_from("127.0.0.2", server.addr);
    echo_once(&mut admitted, 7, b"welcome");
    let stats = server.transport.stats();
    assert_eq!(stats.refused, 1);
    assert_eq!(stats.connections, 1, "only the admitted peer is open");
    stop(&server.transport);
}

#[test]
fn ipv6_peers_are_matched_against_ipv6_ranges() {
    let transport = Transport::builder().workers(1).start().unwrap();
    let v4_only: AllowList = ["127.0.0.0/8".parse().unwrap()].into_iter().collect();
    let v6: SocketAddr = "[::1]:0".parse().unwrap();
    if std::net::TcpListener::bind(v6).is_err() {
        // No IPv6 loopback on this machine: nothing to test.
        stop(&transport);
        return;
    }
    // IPv6 works here: the transport must listen on it too.
    let closed = transport
        .listen_with_options(v6, echo, ListenOptions::new().allow(v4_only))
        .unwrap();
    let open = transport
        .listen_with_options(v6, echo, ListenOptions::new().allow(AllowList::loopback()))
        .unwrap();
    assert!(closed_by_peer(&mut raw_client(closed)));
    echo_once(&mut raw_client(open), 3, b"v6");
    assert_eq!(transport.stats().refused, 1);
    stop(&transport);
}

#[test]
fn a_listener_over_its_connection_limit_closes_the_newcomer_and_serves_the_rest() {
    let server = server_with(
        Transport::builder(),
        ListenOptions::new().max_connections(2),
    );
    let mut first = raw_client(server.addr);
    let mut second = raw_client(server.addr);
    echo_once(&mut first, 1, b"one");
    echo_once(&mut second, 1, b"two");

    let mut third = raw_client(server.addr);
    assert!(closed_by_peer(&mut third));
    assert_eq!(server.transport.stats().over_limit, 1);
    echo_once(&mut first, 2, b"one again");
    echo_once(&mut second, 2, b"two again");

    // A place frees up: the next newcomer gets in.
    drop(first);
    assert!(wait_until(WAIT_LIMIT, || server
        .transport
        .stats()
        .connections
        == 1));
    let mut fourth = raw_client(server.addr);
    echo_once(&mut fourth, 1, b"four");
    stop(&server.transport);
}

#[test]
fn the_transport_limit_spans_its_listeners() {
    let transport = Transport::builder()
        .workers(1)
        .max_connections(1)
        .start()
        .unwrap();
    let a = transport.listen(loopback(), echo).unwrap();
    let b = transport.listen(loopback(), echo).unwrap();
    let mut on_a = raw_client(a);
    echo_once(&mut on_a, 1, b"a");
    assert!(closed_by_peer(&mut raw_client(b)));
    assert_eq!(transport.stats().over_limit, 1);
    echo_once(&mut on_a, 2, b"a still");
    stop(&transport);
}

#[test]
fn a_connection_at_its_in_flight_limit_stops_being_read_until_answers_go_out() {
    let transport = Transport::builder()
        .workers(2)
        .max_in_flight(4)
        .start()
        .unwrap();
    let held: Arc<Mutex<Vec<Responder>>> = Arc::default();
    let addr = {
        let held = held.clone();
        transport
            .listen(loopback(), move |request: Packet, responder: Responder| {
                if request.body() == "hold" {
                    held.lock().unwrap().push(responder);
                } else {
                    echo(request, responder);
                }
            })
            .unwrap()
    };
    let mut greedy = raw_client(addr);
    let mut burst = Vec::new();
    for chid in 1..=10 {
        burst.extend(frame(chid, 5, b"hold"));
    }
    send_bytes(&mut greedy, &burst);
    assert!(wait_until(WAIT_LIMIT, || held.lock().unwrap().len() == 4));
    assert!(wait_until(WAIT_LIMIT, || transport.stats().in_flight_holds >= 1));

    // Another peer is served meanwhile.
    let mut other = raw_client(addr);
    echo_once(&mut other, 1, b"not held up");
    assert_eq!(held.lock().unwrap().len(), 4);

    // Answers let more in; a dropped responder counts as an answer.
    let mut answered = 0;
    while answered < 10 {
        assert!(
            wait_until(WAIT_LIMIT, || !held.lock().unwrap().is_empty()),
            "reading resumed after {answered} answers"
        );
        let batch: Vec<Responder> = std::mem::take(&mut *held.lock().unwrap());
        assert!(batch.len() <= 4, "{} requests in flight", batch.len());
        for responder in batch {
            if answered % 2 == 0 {
                let _ = responder.reply(Packet::new(5, "done"));
            } else {
                drop(responder);
            }
            answered += 1;
        }
    }
    assert_eq!(transport.stats().packets_in, 11);
    stop(&transport);
}

#[test]
fn a_peer_that_sends_no_whole_first_frame_in_time_is_closed() {
    let transport = Transport::builder()
        .workers(1)
        .first_frame_timeout(Some(Duration::from_secs(2)))
        .start()
        .unwrap();
    let addr = transport.listen(loopback(), echo).unwrap();
    let mut silent = raw_client(addr);
    let mut half = raw_client(addr);
    send_bytes(&mut half, &frame(1, 5, b"never finished")[..20]);
    let opened = std::time::Instant::now();
    let mut prompt = raw_client(addr);
    echo_once(&mut prompt, 1, b"on time");
    assert!(closed_by_peer(&mut silent));
    assert!(closed_by_peer(&mut half));
    assert_eq!(transport.stats().first_frame_timeouts, 2);
    // Once its first frame came, a connection lives by the idle timeout:
    // it is served on well past the first-frame deadline.
    let mut chid = 2;
    while opened.elapsed() < Duration::from_secs(3) {
        echo_once(&mut prompt, chid, b"still open");
        chid += 1;
    }
    stop(&transport);
}

fn http_get(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

#[test]
fn the_status_page_answers_only_its_allow_list() {
    let only_two: AllowList = ["127.0.0.2".parse().unwrap()].into_iter().collect();
    let transport = Transport::builder()
        .workers(1)
        .status_page(true)
        .status_allow(only_two)
        .start()
        .unwrap();
    let addr = transport.listen(loopback(), echo).unwrap();
    let refused = http_get(&mut raw_client(addr));
    assert_eq!(refused, "", "closed unanswered");
    let answered = http_get(&mut raw_client_from("127.0.0.2", addr));
    assert!(answered.starts_with("HTTP/1.1 200 OK"), "{answered}");
    assert!(answered.contains("\"status_refused\":1"), "{answered}");
    // The refused peer may still speak tbnet.
    let client = ConnectionManager::new(&transport);
    let reply = client
        .call(addr, Packet::new(1, "rpc"), Some(NEVER))
        .unwrap();
    assert_eq!(reply.body(), "rpc");
    stop(&transport);
}

#[test]
fn the_status_page_defaults_to_loopback_peers() {
    let transport = Transport::builder()
        .workers(1)
        .status_page(true)
        .start()
        .unwrap();
    let addr = transport.listen(loopback(), echo).unwrap();
    let answered = http_get(&mut raw_client_from("127.0.0.3", addr));
    assert!(answered.contains("\"refused\":0"), "{answered}");
    stop(&transport);
}

#[test]
fn listen_options_choose_the_dispatch() {
    let transport = Transport::builder().workers(1).start().unwrap();
    let addr = transport
        .listen_with_options(
            loopback(),
            |request: Packet, responder: Responder| {
                let name = std::thread::current().name().unwrap_or("").to_string();
                let _ = responder.reply(request.reply(name));
            },
            ListenOptions::new().dispatch(Dispatch::IoThread),
        )
        .unwrap();
    let client = ConnectionManager::new(&transport);
    let reply = client
        .call(addr, Packet::new(1, "who"), Some(NEVER))
        .unwrap();
    assert_eq!(reply.body(), "tbnet-io");
    stop(&transport);
}

#[test]
fn requests_dropped_unanswered_by_workers_free_their_in_flight_places() {
    for dispatch in [Dispatch::Workers, Dispatch::Ordered, Dispatch::IoThread] {
        let transport = Transport::builder()
            .workers(2)
            .max_in_flight(2)
            .start()
            .unwrap();
        let addr = transport
            .listen_with(
                loopback(),
                |request: Packet, responder: Responder| {
                    if request.body() != "drop" {
                        echo(request, responder);
                    }
                },
                dispatch,
            )
            .unwrap();
        let mut peer = raw_client(addr);
        let mut burst = Vec::new();
        for chid in 1..=20 {
            burst.extend(frame(chid, 5, b"drop"));
        }
        burst.extend(frame(21, 5, b"last"));
        send_bytes(&mut peer, &burst);
        let reply = read_frame(&mut peer)
            .unwrap_or_else(|e| panic!("{dispatch:?}: the last request unanswered: {e}"));
        assert_eq!(
            (reply.chid, &reply.body[..]),
            (21, &b"last"[..]),
            "{dispatch:?}"
        );
        assert_eq!(transport.stats().packets_in, 21);
        stop(&transport);
    }
}

/// A connection stopped both for a peer that does not read and at its
/// in-flight limit: once the peer reads, the answers still owed (here,
/// dropped responders) must let the rest of its requests in.
#[test]
fn a_connection_full_both_ways_reads_on_once_its_output_drains_and_answers_come() {
    const BIG: usize = 32 << 20;
    let transport = Transport::builder()
        .workers(2)
        // Handled inline: the packet is queued in the same pass that
        // reaches the in-flight limit, so both limits are met at once.
        .dispatch(Dispatch::IoThread)
        .max_in_flight(2)
        .max_outbound(64 << 10)
        .start()
        .unwrap();
    let held: Arc<Mutex<Vec<Responder>>> = Arc::default();
    let big = bytes::Bytes::from(vec![b'B'; BIG]);
    let addr = {
        let held = held.clone();
        transport
            .listen(loopback(), move |request: Packet, responder: Responder| {
                match request.pcode().0 {
                    // Held, after sending the client a one-way packet
                    // larger than the kernel buffers and the output limit
                    // (no answer: it frees no in-flight place).
                    2 => {
                        let post = responder.connection().post(Packet::new(9, big.clone()));
                        assert!(post.is_ok(), "the one-way packet is queued");
                        held.lock().unwrap().push(responder);
                    }
                    1 => held.lock().unwrap().push(responder),
                    _ => echo(request, responder),
                }
            })
            .unwrap()
    };
    let mut peer = raw_client(addr);
    // A and C are held (the in-flight limit is reached, and C's packet
    // fills the output); D waits behind them.
    let mut burst = frame(1, 1, b"A");
    burst.extend(frame(3, 2, b"C"));
    burst.extend(frame(4, 3, b"D"));
    send_bytes(&mut peer, &burst);
    // The peer reads the big packet: the output drains while the
    // connection is still at its in-flight limit.
    let packet = read_frame(&mut peer).expect("the one-way packet");
    assert_eq!((packet.chid, packet.body.len()), (0, BIG));
    assert!(wait_until(WAIT_LIMIT, || held.lock().unwrap().len() == 2));
    // D is held back by the in-flight limit, now the only one.
    assert!(wait_until(WAIT_LIMIT, || transport.stats().in_flight_holds >= 1));
    // Both held requests end unanswered: D gets in and is answered.
    held.lock().unwrap().clear();
    let reply = read_frame(&mut peer).expect("D is answered");
    assert_eq!((reply.chid, reply.body), (4, b"D".to_vec()));
    stop(&transport);
}
