//! Interop with tbnet's wire format (`WIRE.md`), checked against frames
//! built and parsed by hand in the tests, not by the crate's codec.

use std::io::Read;

use tbnet::{ConnectionManager, Dispatch, Error, Packet, Transport};

use crate::support::{
    echo, echo_server, frame, header, loopback, raw_client, raw_server, read_frame, send_bytes,
    stop, transport, within, RawFrame, FLAG, NEVER,
};

/// The request of `WIRE.md`'s example: chid 2, pcode 0, a 1988-byte ASCII
/// body.
fn golden_request() -> Vec<u8> {
    let mut bytes = vec![
        0x41, 0x6E, 0x45, 0x74, // flag "AnEt"
        0x00, 0x00, 0x00, 0x02, // chid 2
        0x00, 0x00, 0x00, 0x00, // pcode 0
        0x00, 0x00, 0x07, 0xC4, // dataLen 1988
    ];
    bytes.extend((0..1988).map(|i| b'a' + (i % 26) as u8));
    bytes
}

#[test]
fn client_sends_exact_tbnet_frames_and_matches_replies_by_channel_id() {
    let (addr, raw) = raw_server(|mut stream| {
        let first = read_frame(&mut stream).expect("request 1");
        let second = read_frame(&mut stream).expect("request 2");
        // Answer in reverse order: the client must match by chid.
        send_bytes(&mut stream, &frame(second.chid, 21, b"re: second"));
        send_bytes(&mut stream, &frame(first.chid, 11, b"re: first"));
        // Nothing else arrives until the client closes.
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        (first, second, rest)
    });
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);

    let first = client.call_async(addr, Packet::new(10, "hello tbnet"), Some(NEVER));
    let second = client.call_async(addr, Packet::new(-5, ""), Some(NEVER));
    let (first, second) = within("responses", move || {
        let first = tokio_test::block_on(first.expect("submit"));
        let second = tokio_test::block_on(second.expect("submit"));
        (first, second)
    });
    let first = first.expect("response 1");
    let second = second.expect("response 2");
    assert_eq!(
        (first.pcode().get(), &first.body()[..]),
        (11, &b"re: first"[..])
    );
    assert_eq!(
        (second.pcode().get(), &second.body()[..]),
        (21, &b"re: second"[..])
    );

    stop(&client_transport);
    let (sent_first, sent_second, rest) = within("raw server", move || raw.join().unwrap());
    let expect = |chid, pcode, body: &[u8]| RawFrame {
        flag: FLAG,
        chid,
        pcode,
        body: body.to_vec(),
    };
    assert_eq!(sent_first, expect(sent_first.chid, 10, b"hello tbnet"));
    assert_eq!(sent_second, expect(sent_second.chid, -5, b""));
    assert_ne!(sent_first.chid, 0, "chid 0 is never issued");
    assert_ne!(sent_second.chid, 0, "chid 0 is never issued");
    assert_ne!(sent_first.chid, sent_second.chid);
    assert!(
        rest.is_empty(),
        "unexpected bytes after the requests: {rest:?}"
    );
}

#[test]
fn server_answers_the_golden_frame_byte_for_byte() {
    let server = echo_server();
    let mut stream = raw_client(server.addr);
    let request = golden_request();
    send_bytes(&mut stream, &request);

    let mut reply = vec![0; request.len()];
    stream.read_exact(&mut reply).expect("the echoed frame");
    assert_eq!(
        &reply[..16],
        [0x41, 0x6E, 0x45, 0x74, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0x07, 0xC4]
    );
    assert_eq!(reply, request, "an echo server replies with the same frame");
}

#[test]
fn server_decodes_frames_however_they_are_split() {
    let server = echo_server();
    let mut stream = raw_client(server.addr);
    let golden = golden_request();

    // The golden frame in growing pieces: 1 byte, 2 bytes, 3 bytes, ...
    let mut rest = &golden[..];
    let mut piece = 1;
    while !rest.is_empty() {
        let (now, later) = rest.split_at(piece.min(rest.len()));
        send_bytes(&mut stream, now);
        rest = later;
        piece += 1;
    }
    assert_eq!(read_frame(&mut stream).expect("reply").body, golden[16..]);

    // Three frames in one write.
    let mut pipelined = frame(10, 1, b"ten");
    pipelined.extend(frame(11, 2, b"eleven"));
    pipelined.extend(frame(12, 3, b""));
    send_bytes(&mut stream, &pipelined);
    let mut replies: Vec<RawFrame> = (0..3)
        .map(|_| read_frame(&mut stream).expect("reply"))
        .collect();
    replies.sort_by_key(|r| r.chid);
    let fields: Vec<_> = (replies.iter())
        .map(|r| (r.flag, r.chid, r.pcode, r.body.as_slice()))
        .collect();
    assert_eq!(
        fields,
        [
            (FLAG, 10, 1, &b"ten"[..]),
            (FLAG, 11, 2, &b"eleven"[..]),
            (FLAG, 12, 3, &b""[..])
        ]
    );
}

#[test]
fn server_treats_channel_id_zero_as_one_way() {
    // On the IO thread requests are handled, and replies queued, in arrival
    // order: a reply to the chid-0 request would come first.
    let server_transport = Transport::builder()
        .dispatch(Dispatch::IoThread)
        .start()
        .expect("start");
    let addr = server_transport.listen(loopback(), echo).expect("listen");
    let mut stream = raw_client(addr);
    let mut bytes = frame(0, 5, b"one-way");
    bytes.extend(frame(7, 5, b"two-way"));
    send_bytes(&mut stream, &bytes);

    let reply = read_frame(&mut stream).expect("a reply");
    assert_eq!((reply.chid, reply.body.as_slice()), (7, &b"two-way"[..]));
    assert_eq!(server_transport.stats().packets_in, 2, "both were received");
}

#[test]
fn large_bodies_cross_intact_both_ways() {
    let server = echo_server();
    let client = ConnectionManager::new(&transport());
    let body: Vec<u8> = (0..(1 << 20) + 3).map(|i: u32| (i % 251) as u8).collect();
    let response = client.call(server.addr, Packet::new(3, body.clone()), Some(NEVER));
    assert_eq!(response.expect("a response").body(), &body);
}

#[test]
fn client_closes_on_a_bad_frame_from_the_server_and_fails_pending_requests() {
    let (addr, raw) = raw_server(|mut stream| {
        read_frame(&mut stream).expect("request 1");
        read_frame(&mut stream).expect("request 2");
        send_bytes(&mut stream, &header(0x0BAD_F1A6, 1, 0, 0));
        // The client closes the connection in response.
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    });
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    let first = client.call_async(addr, Packet::new(1, "one"), Some(NEVER));
    let second = client.call_async(addr, Packet::new(1, "two"), Some(NEVER));
    let results = within("responses", move || {
        let first = tokio_test::block_on(first.expect("submit"));
        let second = tokio_test::block_on(second.expect("submit"));
        [first, second]
    });
    for result in &results {
        assert!(matches!(result, Err(Error::Disconnected)), "{result:?}");
    }
    assert_eq!(client_transport.stats().bad_frames, 1);
    within("raw server", move || raw.join().unwrap());
}
