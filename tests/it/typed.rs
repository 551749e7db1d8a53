//! Typed messages, the router, error replies.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tbnet::{
    ConnectionManager, DecodeError, Error, Message, Packet, PacketCode, Responder, Router,
    Transport, Unrouted, WaitObject, ERROR_BAD_REQUEST, ERROR_PCODE, ERROR_UNKNOWN_PCODE,
};

use crate::support::*;

#[derive(Debug, PartialEq)]
struct Add {
    a: i64,
    b: i64,
}

impl Message for Add {
    const PCODE: PacketCode = PacketCode(10);

    fn encode(&self, dst: &mut BytesMut) {
        dst.put_i64(self.a);
        dst.put_i64(self.b);
    }

    fn decode(mut src: Bytes) -> Result<Self, DecodeError> {
        if src.len() != 16 {
            return Err(DecodeError::new(format!(
                "expected 16 bytes, got {}",
                src.len()
            )));
        }
        Ok(Add {
            a: src.get_i64(),
            b: src.get_i64(),
        })
    }
}

#[derive(Debug, PartialEq)]
struct Sum(i64);

impl Message for Sum {
    const PCODE: PacketCode = PacketCode(11);

    fn encode(&self, dst: &mut BytesMut) {
        dst.put_i64(self.0);
    }

    fn decode(mut src: Bytes) -> Result<Self, DecodeError> {
        if src.len() != 8 {
            return Err(DecodeError::truncated("the sum"));
        }
        Ok(Sum(src.get_i64()))
    }
}

/// A calculator: adds, refuses overflow with an application error, and
/// answers code 20 later from another thread.
fn calculator() -> Router {
    Router::new()
        .route_message(
            |add: Add, responder: Responder| match add.a.checked_add(add.b) {
                Some(sum) => {
                    let _ = responder.reply_message(&Sum(sum));
                }
                None => {
                    let _ = responder.reply_error(1, "overflow");
                }
            },
        )
        .route(20, |request: Packet, responder: Responder| {
            std::thread::spawn(move || {
                let _ = responder.reply(request.reply("later"));
            });
        })
}

fn serve(router: Router) -> Server {
    let transport = transport();
    let addr = transport.listen(loopback(), router).unwrap();
    Server { transport, addr }
}

#[test]
fn typed_calls_in_all_three_ways_of_waiting() {
    let server = serve(calculator());
    let client = transport();
    let manager = ConnectionManager::new(&client);

    let sum: Sum = manager
        .call_message(server.addr, &Add { a: 2, b: 40 }, Some(NEVER))
        .unwrap();
    assert_eq!(sum, Sum(42));

    let future = manager
        .call_message_async::<Add, Sum>(server.addr, &Add { a: -1, b: 1 }, Some(NEVER))
        .unwrap();
    assert_eq!(tokio_test::block_on(future).unwrap(), Sum(0));

    let (tx, rx) = std::sync::mpsc::channel();
    manager
        .send_message(
            server.addr,
            &Add { a: 7, b: 8 },
            Some(NEVER),
            move |r: Result<Sum, Error>| tx.send(r).unwrap(),
        )
        .unwrap();
    assert_eq!(rx.recv_timeout(HANG_GUARD).unwrap().unwrap(), Sum(15));

    // A batch on one WaitObject, decoded afterwards.
    let mut wait = WaitObject::new();
    for i in 0..5 {
        manager
            .send_wait(
                server.addr,
                Add { a: i, b: i }.to_packet(),
                Some(NEVER),
                &mut wait,
            )
            .unwrap();
    }
    let sums: Vec<Sum> = wait
        .wait_all()
        .into_iter()
        .map(|r| Sum::from_packet(r.unwrap()).unwrap())
        .collect();
    assert_eq!(sums, (0..5).map(|i| Sum(2 * i)).collect::<Vec<_>>());

    let later = manager
        .call(server.addr, Packet::new(20, ""), Some(NEVER))
        .unwrap();
    assert_eq!(later.body(), "later");
    stop(&client);
    stop(&server.transport);
}

#[test]
fn application_errors_arrive_as_remote_errors() {
    let server = serve(calculator());
    let client = transport();
    let manager = ConnectionManager::new(&client);
    let refused =
        manager.call_message::<Add, Sum>(server.addr, &Add { a: i64::MAX, b: 1 }, Some(NEVER));
    match refused {
        Err(Error::Remote { code, message }) => assert_eq!((code, &*message), (1, "overflow")),
        other => panic!("{other:?}"),
    }
    // The raw reply is a packet under the reserved code: code, then text.
    let raw_refusal = manager.call(
        server.addr,
        Add { a: i64::MAX, b: 1 }.to_packet(),
        Some(NEVER),
    );
    assert!(matches!(raw_refusal, Err(Error::Remote { code: 1, .. })));
    stop(&client);
    stop(&server.transport);
}

#[test]
fn a_malformed_body_fails_only_its_request() {
    let server = serve(calculator());
    let client = transport();
    let manager = ConnectionManager::new(&client);
    let bad = manager.call(
        server.addr,
        Packet::new(Add::PCODE, "not sixteen bytes"),
        Some(NEVER),
    );
    match bad {
        Err(Error::Remote { code, message }) => {
            assert_eq!(code, ERROR_BAD_REQUEST);
            assert!(message.contains("expected 16 bytes"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // The same connection carries on.
    let sum: Sum = manager
        .call_message(server.addr, &Add { a: 1, b: 1 }, Some(NEVER))
        .unwrap();
    assert_eq!(sum, Sum(2));
    assert_eq!(client.stats().connections_total, 1);

    // A response that does not decode fails that call only.
    let wrong: Result<Sum, Error> = manager.call_message(server.addr, &WrongAdd, Some(NEVER));
    assert!(
        matches!(wrong, Err(Error::BadMessage { pcode: 20, .. })),
        "{wrong:?}"
    );
    assert_eq!(client.stats().connections_total, 1);
    stop(&client);
    stop(&server.transport);
}

/// A request for route 20, whose reply ("later") is not a `Sum`.
struct WrongAdd;

impl Message for WrongAdd {
    const PCODE: PacketCode = PacketCode(20);
    fn encode(&self, _: &mut BytesMut) {}
    fn decode(_: Bytes) -> Result<Self, DecodeError> {
        Ok(WrongAdd)
    }
}

#[test]
fn unknown_codes_get_an_error_reply_or_are_dropped_and_counted() {
    let server = serve(calculator());
    let client = transport();
    let manager = ConnectionManager::new(&client);
    let unknown = manager.call(server.addr, Packet::new(99, ""), Some(NEVER));
    assert!(
        matches!(
            unknown,
            Err(Error::Remote {
                code: ERROR_UNKNOWN_PCODE,
                ..
            })
        ),
        "{unknown:?}"
    );

    let dropping = serve(Router::new().on_unrouted(Unrouted::Drop));
    let silent = manager.call(dropping.addr, Packet::new(99, ""), Some(SHORT_TIMEOUT));
    assert!(matches!(silent, Err(Error::Timeout)), "{silent:?}");
    assert!(wait_until(WAIT_LIMIT, || dropping
        .transport
        .stats()
        .unrouted
        == 1));
    stop(&client);
    stop(&server.transport);
    stop(&dropping.transport);
}

#[test]
fn error_replies_are_plain_tbnet_frames() {
    let server = serve(calculator());
    let mut raw = raw_client(server.addr);
    send_bytes(&mut raw, &frame(5, 99, b""));
    let reply = read_frame(&mut raw).unwrap();
    assert_eq!(reply.chid, 5);
    assert_eq!(reply.pcode, ERROR_PCODE.get());
    assert_eq!(&reply.body[..4], &ERROR_UNKNOWN_PCODE.to_be_bytes());
    assert_eq!(&reply.body[4..], b"no handler for packet code 99");
    stop(&server.transport);
}

#[test]
fn handlers_run_on_workers_and_may_block() {
    let calls = Arc::new(AtomicUsize::new(0));
    let router = {
        let calls = calls.clone();
        Router::new().route(1, move |request: Packet, responder: Responder| {
            calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
            echo(request, responder);
        })
    };
    let server = Transport::builder().workers(2).start().unwrap();
    let addr = server.listen(loopback(), router).unwrap();
    let client = transport();
    let manager = ConnectionManager::new(&client);
    let mut wait = WaitObject::new();
    for i in 0..8 {
        manager
            .send_wait(addr, Packet::new(1, format!("{i}")), Some(NEVER), &mut wait)
            .unwrap();
    }
    let bodies: Vec<Bytes> = wait
        .wait_all()
        .into_iter()
        .map(|r| r.unwrap().into_body())
        .collect();
    assert_eq!(
        bodies,
        (0..8)
            .map(|i| Bytes::from(format!("{i}")))
            .collect::<Vec<_>>()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 8);
    stop(&client);
    stop(&server);
}
