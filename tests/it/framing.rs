//! Framings other than the transport's: per listener and per manager, with
//! and without tbnet's header, hostile input through them, and the HTTP
//! example served over loopback.

use std::io::{Read, Write};
use std::net::TcpStream;

use bytes::BytesMut;
use tbnet::proto::{DefaultStreamer, FrameError, FrameHeader, PacketStreamer, Parse};
use tbnet::{
    ChannelId, CloseReason, ConnectionEvent, ConnectionHandle, ConnectionManager, Dispatch, Error,
    ListenOptions, Packet, Responder,
};

use crate::faults::spawn_listening;
use crate::support::{
    closed_by_peer, echo, frame, loopback, raw_client, read_frame, send_bytes, stop, transport,
    wait_until, NEVER, WAIT_LIMIT,
};

/// Lines of text, at most 64 bytes each: no header, the line (without its
/// newline) is the body.
struct Lines;

const MAX_LINE: usize = 64;

impl PacketStreamer for Lines {
    fn parse(&self, src: &[u8]) -> Result<Parse, FrameError> {
        match src.iter().position(|&b| b == b'\n') {
            Some(end) => Ok(Parse::Frame(FrameHeader {
                pcode: tbnet::PacketCode(0),
                channel_id: ChannelId(1),
                header_len: 0,
                body_len: end + 1,
            })),
            None => Ok(Parse::Incomplete {
                needed: src.len() + 1,
            }),
        }
    }

    fn encode_header(&self, _packet: &Packet, _dst: &mut BytesMut) {}

    fn max_body_len(&self) -> usize {
        MAX_LINE
    }

    // No header: a frame is at most its body.
    fn max_frame_len(&self) -> usize {
        MAX_LINE
    }
}

fn shout(request: Packet, responder: Responder) {
    let upper = request.body().to_ascii_uppercase();
    let _ = responder.reply(request.reply(upper));
}

#[test]
fn a_headerless_framing_round_trips_on_its_listener_only() {
    let transport = transport();
    let closes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = closes.clone();
    let hook = move |_: &ConnectionHandle, event: ConnectionEvent| {
        if let ConnectionEvent::Closed(reason) = event {
            record.lock().unwrap().push(reason);
        }
    };
    let lines = transport
        .listen_with_options(
            loopback(),
            shout,
            ListenOptions::new()
                .streamer(Lines)
                .dispatch(Dispatch::IoThread)
                .events(hook),
        )
        .unwrap();
    let tbnet = transport.listen(loopback(), echo).unwrap();

    let mut raw = raw_client(lines);
    send_bytes(&mut raw, b"hello\nwor");
    send_bytes(&mut raw, b"ld\n");
    let mut got = [0; 12];
    raw.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"HELLO\nWORLD\n");

    // The transport's other listener still speaks tbnet.
    let mut other = raw_client(tbnet);
    send_bytes(&mut other, &frame(5, 1, b"tb"));
    assert_eq!(read_frame(&mut other).unwrap().body, b"tb");

    // A line that never ends costs its connection, not more memory.
    send_bytes(&mut raw, &[b'x'; 1000]);
    assert!(closed_by_peer(&mut raw));
    assert!(wait_until(WAIT_LIMIT, || closes.lock().unwrap().len() == 1));
    assert_eq!(closes.lock().unwrap()[0], CloseReason::BadFrame);
    assert_eq!(transport.stats().bad_frames, 1);

    // Others are untouched.
    let mut again = raw_client(lines);
    send_bytes(&mut again, b"still here\n");
    let mut got = [0; 11];
    again.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"STILL HERE\n");
    stop(&transport);
}

/// tbnet's frame with another flag: a manager and a listener that both use
/// it understand each other; a manager with the default flag does not.
#[test]
fn a_manager_and_a_listener_share_a_custom_framing() {
    const FLAG: u32 = 0x5442_4E31;
    let server = transport();
    let addr = server
        .listen_with_options(
            loopback(),
            echo,
            ListenOptions::new().streamer(DefaultStreamer::new().with_flag(FLAG)),
        )
        .unwrap();
    let client_transport = transport();
    let custom = ConnectionManager::new(&client_transport)
        .with_streamer(DefaultStreamer::new().with_flag(FLAG));
    let back = custom
        .call(addr, Packet::new(3, "flagged"), Some(NEVER))
        .unwrap();
    assert_eq!(back.body(), "flagged");

    let plain = ConnectionManager::new(&client_transport);
    let refused = plain.call(addr, Packet::new(3, "plain"), Some(NEVER));
    assert!(matches!(refused, Err(Error::Disconnected)), "{refused:?}");
    assert!(wait_until(WAIT_LIMIT, || server.stats().bad_frames == 1));

    // On the wire: the custom flag, then tbnet's other fields.
    let mut raw = raw_client(addr);
    let mut request = frame(9, 3, b"raw");
    request[..4].copy_from_slice(&FLAG.to_be_bytes());
    send_bytes(&mut raw, &request);
    let mut reply = [0; 19];
    raw.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..4], &FLAG.to_be_bytes());
    assert_eq!(&reply[4..8], &9u32.to_be_bytes());
    assert_eq!(&reply[16..], b"raw");
    stop(&client_transport);
    stop(&server);
}

/// A client-side framing whose responses carry the channel id in a line
/// prefix: `ID BODY\n`, and a server that answers with the same framing.
struct IdLines;

impl PacketStreamer for IdLines {
    fn parse(&self, src: &[u8]) -> Result<Parse, FrameError> {
        let Some(end) = src.iter().position(|&b| b == b'\n') else {
            return Ok(Parse::Incomplete {
                needed: src.len() + 1,
            });
        };
        let space =
            (src[..end].iter().position(|&b| b == b' ')).ok_or(FrameError::Malformed("no id"))?;
        let id = std::str::from_utf8(&src[..space])
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or(FrameError::Malformed("bad id"))?;
        Ok(Parse::Frame(FrameHeader {
            pcode: tbnet::PacketCode(0),
            channel_id: ChannelId(id),
            header_len: space + 1,
            body_len: end - space,
        }))
    }

    fn encode_header(&self, packet: &Packet, dst: &mut BytesMut) {
        dst.extend_from_slice(format!("{} ", packet.channel_id().get()).as_bytes());
    }
}

#[test]
fn a_custom_framing_carries_channel_ids_both_ways() {
    let server = transport();
    let addr = server
        .listen_with_options(
            loopback(),
            |request: Packet, responder: Responder| {
                let mut body = request.body().to_ascii_uppercase();
                // Bodies end with their newline.
                if body.last() != Some(&b'\n') {
                    body.push(b'\n');
                }
                let _ = responder.reply(request.reply(body));
            },
            ListenOptions::new().streamer(IdLines),
        )
        .unwrap();
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport).with_streamer(IdLines);
    let futures: Vec<_> = (0..5)
        .map(|i| {
            client
                .call_async(addr, Packet::new(0, format!("word{i}\n")), Some(NEVER))
                .unwrap()
        })
        .collect();
    for (i, future) in futures.into_iter().enumerate() {
        let back = crate::support::within("a response", move || tokio_test::block_on(future));
        assert_eq!(back.unwrap().body(), format!("WORD{i}\n").as_bytes());
    }
    stop(&client_transport);
    stop(&server);
}

/// Reads one HTTP response: its head and a body of `Content-Length` bytes.
fn read_response(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("a response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("an ASCII head");
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map(|v| v.trim().parse::<usize>().unwrap())
        .expect("a content length");
    let mut body = vec![0; len];
    stream.read_exact(&mut body).unwrap();
    (head, body)
}

#[test]
fn http_server_example_keeps_alive_and_refuses_malformed_requests() {
    let (mut server, addr) = spawn_listening("http_server", &["--addr", "127.0.0.1:0"]);

    // Two requests on one connection, then a pipelined pair.
    let mut client = raw_client(addr);
    client
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (head, body) = read_response(&mut client);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Connection: keep-alive"));
    assert_eq!(body, b"hello from tbnet\n");
    client
        .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde")
        .unwrap();
    let (head, body) = read_response(&mut client);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body, b"abcde");
    client
        .write_all(b"GET /nowhere HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n")
        .unwrap();
    assert!(read_response(&mut client).0.starts_with("HTTP/1.1 404"));
    let (head, body) = read_response(&mut client);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"hello from tbnet\n");

    // A head that is not HTTP: 400, then the connection closes.
    let mut bad = raw_client(addr);
    bad.write_all(b"HELLO THERE\r\n\r\n").unwrap();
    let (head, _) = read_response(&mut bad);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(closed_by_peer(&mut bad));

    // A head that never ends: closed without an answer.
    let mut endless = raw_client(addr);
    let _ = endless.write_all(&[b'a'; 9000]);
    assert!(closed_by_peer(&mut endless));

    // The first connection is still served; it asks to be closed after.
    client
        .write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (head, body) = read_response(&mut client);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("Connection: close"));
    assert_eq!(body, b"hello from tbnet\n");
    assert!(closed_by_peer(&mut client));

    server.kill().unwrap();
    server.wait().unwrap();
}

/// Lines, except that a `!` makes the framing panic.
struct Fragile;

impl PacketStreamer for Fragile {
    fn parse(&self, src: &[u8]) -> Result<Parse, FrameError> {
        assert!(!src.contains(&b'!'), "a framing with a bug");
        Lines.parse(src)
    }

    fn encode_header(&self, _packet: &Packet, _dst: &mut BytesMut) {}
}

#[test]
fn a_framing_that_panics_costs_only_its_connection() {
    let transport = transport();
    let addr = transport
        .listen_with_options(loopback(), shout, ListenOptions::new().streamer(Fragile))
        .unwrap();
    let mut good = raw_client(addr);
    send_bytes(&mut good, b"one\n");
    let mut got = [0; 4];
    good.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ONE\n");

    let mut bad = raw_client(addr);
    send_bytes(&mut bad, b"boom!\n");
    assert!(closed_by_peer(&mut bad));

    send_bytes(&mut good, b"two\n");
    good.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"TWO\n");
    assert_eq!(transport.stats().bad_frames, 1);
    stop(&transport);
}
