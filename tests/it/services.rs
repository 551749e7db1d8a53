//! Declared services (`service!`) and their codecs, over loopback: the three
//! ways to call, timeouts, and the error-reply convention kept for unknown
//! codes, undecodable bodies and handler refusals.

use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;
use tbnet::codec::{Codec, Raw};
use tbnet::{
    service, ConnectionManager, Error, ErrorReply, Packet, Responder, Router, ERROR_BAD_REQUEST,
    ERROR_UNKNOWN_PCODE,
};

use crate::support::*;

service! {
    /// Text in, text out.
    pub service words {
        codec = Raw;
        /// The text, upper-cased.
        rpc shout(String) -> String = 11;
        /// Refuses every request with error 7.
        rpc refuse(String) -> String = 12;
        /// Sleeps for as many milliseconds as the text says, then answers.
        rpc nap(String) -> String = 13;
    }
}

struct Words;

impl words::Service for Words {
    fn shout(&self, text: String) -> Result<String, ErrorReply> {
        Ok(text.to_uppercase())
    }

    fn refuse(&self, text: String) -> Result<String, ErrorReply> {
        Err(ErrorReply::new(7, format!("refused {text}")))
    }

    fn nap(&self, text: String) -> Result<String, ErrorReply> {
        let millis = text
            .parse()
            .map_err(|_| ErrorReply::new(1, "not a number"))?;
        std::thread::sleep(Duration::from_millis(millis));
        Ok(text)
    }
}

fn words_server() -> Server {
    let transport = transport();
    let addr = transport
        .listen(loopback(), words::Service::into_router(Words))
        .unwrap();
    Server { transport, addr }
}

#[test]
fn a_declared_service_answers_all_three_ways() {
    let server = words_server();
    let client_transport = transport();
    let manager = Arc::new(ConnectionManager::new(&client_transport));
    let client = words::Client::new(manager.clone(), server.addr);

    assert_eq!(client.shout(&"hi".into()).wait().unwrap(), "HI");

    let future = client
        .shout(&"future".into())
        .timeout(NEVER)
        .future()
        .unwrap();
    assert_eq!(tokio_test::block_on(future).unwrap(), "FUTURE");
    let awaited = tokio_test::block_on(async { client.shout(&"await".into()).await });
    assert_eq!(awaited.unwrap(), "AWAIT");

    let (tx, rx) = mpsc::channel();
    (client.shout(&"callback".into()).timeout(NEVER))
        .then(move |result| tx.send(result).unwrap())
        .unwrap();
    assert_eq!(rx.recv_timeout(HANG_GUARD).unwrap().unwrap(), "CALLBACK");

    // A borrowed manager works too, and the codes are the declared ones.
    let borrowed = words::Client::new(&*manager, server.addr);
    assert_eq!(borrowed.shout(&"b".into()).wait().unwrap(), "B");
    assert_eq!(words::codes::shout.get(), 11);
    let raw = manager
        .call(server.addr, Packet::new(11, "raw"), Some(NEVER))
        .unwrap();
    assert_eq!((raw.pcode().get(), raw.body().as_ref()), (11, &b"RAW"[..]));
    stop(&client_transport);
    stop(&server.transport);
}

#[test]
fn refusals_unknown_codes_and_bad_bodies_are_error_replies() {
    let server = words_server();
    let client_transport = transport();
    let manager = ConnectionManager::new(&client_transport);
    let client = words::Client::new(&manager, server.addr);

    match client.refuse(&"this".into()).wait() {
        Err(Error::Remote { code: 7, message }) => assert_eq!(&*message, "refused this"),
        other => panic!("{other:?}"),
    }
    let unknown = manager.call(server.addr, Packet::new(99, "?"), Some(NEVER));
    assert!(
        matches!(unknown, Err(Error::Remote { code, .. }) if code == ERROR_UNKNOWN_PCODE),
        "{unknown:?}"
    );
    // Not UTF-8: the Raw codec refuses it as a String, the server replies.
    let bad = manager.call(server.addr, Packet::new(11, &b"\xff"[..]), Some(NEVER));
    assert!(
        matches!(bad, Err(Error::Remote { code, .. }) if code == ERROR_BAD_REQUEST),
        "{bad:?}"
    );
    // The connection survived all of it.
    assert_eq!(client.shout(&"still".into()).wait().unwrap(), "STILL");
    stop(&client_transport);
    stop(&server.transport);
}

#[test]
fn a_typed_call_times_out_and_a_bad_response_is_a_bad_message() {
    let server = words_server();
    // A server that answers code 11 with a body that is not UTF-8, and 12
    // under another code.
    let liar = transport();
    let liar_addr = liar
        .listen(
            loopback(),
            Router::new()
                .route(11, |req: Packet, resp: Responder| {
                    let _ = resp.reply(req.reply(&b"\xff\xfe"[..]));
                })
                .route(12, |_: Packet, resp: Responder| {
                    let _ = resp.reply(Packet::new(3, "wrong code"));
                }),
        )
        .unwrap();
    let client_transport = transport();
    let manager = Arc::new(ConnectionManager::new(&client_transport));

    let napping = words::Client::new(manager.clone(), server.addr);
    let slow = napping.nap(&"2000".into()).timeout(SHORT_TIMEOUT).wait();
    assert!(matches!(slow, Err(Error::Timeout)), "{slow:?}");

    let lied_to = words::Client::new(manager.clone(), liar_addr);
    let garbled = lied_to.shout(&"x".into()).wait();
    assert!(
        matches!(garbled, Err(Error::BadMessage { pcode: 11, .. })),
        "{garbled:?}"
    );
    let future = lied_to.shout(&"x".into()).future().unwrap();
    assert!(matches!(
        tokio_test::block_on(future),
        Err(Error::BadMessage { .. })
    ));
    let wrong_code = lied_to.refuse(&"x".into()).wait();
    assert!(
        matches!(wrong_code, Err(Error::BadMessage { pcode: 3, .. })),
        "{wrong_code:?}"
    );
    stop(&client_transport);
    stop(&liar);
    stop(&server.transport);
}

#[test]
fn a_call_that_cannot_be_sent_fails_each_way_without_hanging() {
    let client_transport = transport();
    let manager = Arc::new(ConnectionManager::new(&client_transport));
    let port = reserve_port();
    let client = words::Client::new(manager.clone(), port.addr());
    let refused = client.shout(&"x".into()).timeout(NEVER).wait();
    assert!(refused.is_err(), "{refused:?}");
    stop(&client_transport);
    // After shutdown: every form reports the error, none hangs.
    assert!(matches!(
        client.shout(&"x".into()).wait(),
        Err(Error::Shutdown)
    ));
    assert!(matches!(
        tokio_test::block_on(async { client.shout(&"x".into()).await }),
        Err(Error::Shutdown)
    ));
    assert!(matches!(
        client.shout(&"x".into()).then(|_| panic!("must not run")),
        Err(Error::Shutdown)
    ));
}

#[test]
fn raw_codec_round_trips_bytes() {
    let body = Bytes::from_static(b"\x00\x01binary");
    let packet = Raw::to_packet(tbnet::PacketCode(5), &body).unwrap();
    assert_eq!(<Raw as Codec<Bytes>>::from_packet(packet).unwrap(), body);
}

#[cfg(feature = "serde")]
mod serde_bodies {
    use serde::{Deserialize, Serialize};
    use tbnet::codec::Postcard;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Order {
        pub id: u64,
        pub items: Vec<String>,
        pub note: Option<String>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub enum Verdict {
        Accepted { total: u32 },
        Rejected(String),
    }

    service! {
        pub service orders {
            codec = Postcard;
            /// Accepts orders with at most three items.
            rpc place(Order) -> Verdict = 200;
        }
    }

    struct Shop;

    impl orders::Service for Shop {
        fn place(&self, order: Order) -> Result<Verdict, ErrorReply> {
            if order.items.is_empty() {
                return Err(ErrorReply::new(1, "empty order"));
            }
            Ok(match order.items.len() {
                n @ 1..=3 => Verdict::Accepted { total: n as u32 },
                _ => Verdict::Rejected(format!("order {} is too big", order.id)),
            })
        }
    }

    #[test]
    fn serde_types_travel_as_postcard_bodies() {
        let server = transport();
        let addr = server
            .listen(loopback(), orders::Service::into_router(Shop))
            .unwrap();
        let client_transport = transport();
        let manager = Arc::new(ConnectionManager::new(&client_transport));
        let client = orders::Client::new(manager.clone(), addr);
        let order = |id, n| Order {
            id,
            items: (0..n).map(|i| format!("item {i}")).collect(),
            note: Some("fragile".into()),
        };
        assert_eq!(
            client.place(&order(1, 2)).wait().unwrap(),
            Verdict::Accepted { total: 2 }
        );
        let future = client.place(&order(2, 5)).future().unwrap();
        assert_eq!(
            tokio_test::block_on(future).unwrap(),
            Verdict::Rejected("order 2 is too big".into())
        );
        assert!(matches!(
            client.place(&order(3, 0)).wait(),
            Err(Error::Remote { code: 1, .. })
        ));

        // A body claiming a huge item list costs an error reply, not memory.
        let mut claim = vec![7u8, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F];
        claim.extend_from_slice(b"xy");
        let hostile = manager.call(addr, Packet::new(200, claim), Some(NEVER));
        assert!(
            matches!(hostile, Err(Error::Remote { code, .. }) if code == ERROR_BAD_REQUEST),
            "{hostile:?}"
        );
        // A response that is not a Verdict is a BadMessage on the client.
        let encoded = Postcard::to_packet(orders::codes::place, &order(4, 1)).unwrap();
        let not_a_verdict: Result<Verdict, Error> = Postcard::from_packet(encoded);
        assert!(matches!(not_a_verdict, Err(Error::BadMessage { .. })));
        stop(&client_transport);
        stop(&server);
    }
}

#[cfg(feature = "prost")]
mod protobuf_bodies {
    use tbnet::codec::Protobuf;

    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Lookup {
        #[prost(string, tag = "1")]
        pub name: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Found {
        #[prost(uint32, tag = "1")]
        pub id: u32,
        #[prost(string, repeated, tag = "2")]
        pub aliases: Vec<String>,
    }

    service! {
        pub service directory {
            codec = Protobuf;
            /// Finds a user by name.
            rpc lookup(Lookup) -> Found = 300;
        }
    }

    struct Directory;

    impl directory::Service for Directory {
        fn lookup(&self, request: Lookup) -> Result<Found, ErrorReply> {
            match request.name.as_str() {
                "ada" => Ok(Found {
                    id: 1,
                    aliases: vec!["countess".into()],
                }),
                _ => Err(ErrorReply::new(404, "unknown user")),
            }
        }
    }

    #[test]
    fn prost_messages_travel_as_protobuf_bodies() {
        let server = transport();
        let addr = server
            .listen(loopback(), directory::Service::into_router(Directory))
            .unwrap();
        let client_transport = transport();
        let manager = ConnectionManager::new(&client_transport);
        let client = directory::Client::new(&manager, addr);
        let found = client
            .lookup(&Lookup { name: "ada".into() })
            .timeout(NEVER)
            .wait()
            .unwrap();
        assert_eq!((found.id, found.aliases), (1, vec!["countess".to_string()]));
        let (tx, rx) = mpsc::channel();
        client
            .lookup(&Lookup { name: "bob".into() })
            .then(move |r| tx.send(r).unwrap())
            .unwrap();
        assert!(matches!(
            rx.recv_timeout(HANG_GUARD).unwrap(),
            Err(Error::Remote { code: 404, .. })
        ));
        // Field 1 claiming 2^28 bytes with three present: an error reply.
        let hostile = Packet::new(300, &[0x0A, 0x80, 0x80, 0x80, 0x80, 0x01, 1, 2, 3][..]);
        let answer = manager.call(addr, hostile, Some(NEVER));
        assert!(
            matches!(answer, Err(Error::Remote { code, .. }) if code == ERROR_BAD_REQUEST),
            "{answer:?}"
        );
        let garbage: Result<Found, Error> =
            Protobuf::from_packet(Packet::new(300, &[0xFF, 0xFF][..]));
        assert!(matches!(garbage, Err(Error::BadMessage { pcode: 300, .. })));
        stop(&client_transport);
        stop(&server);
    }
}

/// A codec that refuses to encode odd numbers: exercises both sides'
/// encode failures.
struct EvenOnly;

impl tbnet::codec::Codec<u32> for EvenOnly {
    fn encode(value: &u32, dst: &mut bytes::BytesMut) -> Result<(), tbnet::codec::EncodeError> {
        if value % 2 == 1 {
            return Err(tbnet::codec::EncodeError::new("odd"));
        }
        dst.extend_from_slice(&value.to_be_bytes());
        Ok(())
    }

    fn decode(src: Bytes) -> Result<u32, tbnet::DecodeError> {
        let bytes: [u8; 4] = (src.as_ref())
            .try_into()
            .map_err(|_| tbnet::DecodeError::new("not 4 bytes"))?;
        Ok(u32::from_be_bytes(bytes))
    }
}

service! {
    pub service numbers {
        codec = EvenOnly;
        /// Adds one (so an even request gets an odd, unencodable, answer).
        rpc succ(u32) -> u32 = 40;
        /// Adds two.
        rpc add_two(u32) -> u32 = 41;
    }
}

struct Numbers;

impl numbers::Service for Numbers {
    fn succ(&self, n: u32) -> Result<u32, ErrorReply> {
        Ok(n + 1)
    }

    fn add_two(&self, n: u32) -> Result<u32, ErrorReply> {
        Ok(n + 2)
    }
}

#[test]
fn values_that_do_not_encode_fail_their_own_request_only() {
    let server = transport();
    let addr = server
        .listen(loopback(), numbers::Service::into_router(Numbers))
        .unwrap();
    let client_transport = transport();
    let manager = ConnectionManager::new(&client_transport);
    let client = numbers::Client::new(&manager, addr);

    // The request does not encode: an error at once, nothing sent.
    assert!(matches!(
        client.add_two(&3).wait(),
        Err(Error::BadMessage { pcode: 41, .. })
    ));
    assert!(matches!(
        client.add_two(&3).then(|_| panic!("must not run")),
        Err(Error::BadMessage { .. })
    ));
    // The response does not encode: an error reply with its own code.
    let answer = client.succ(&2).wait();
    assert!(
        matches!(answer, Err(Error::Remote { code, .. }) if code == tbnet::ERROR_BAD_RESPONSE),
        "{answer:?}"
    );
    assert_eq!(client.add_two(&4).wait().unwrap(), 6);
    assert_eq!(client_transport.stats().packets_out, 2, "two requests sent");
    stop(&client_transport);
    stop(&server);
}
