//! Bodies in tbnet's `DataBuffer` layout, over a socket: the bytes a raw
//! peer receives are the layout's, and what it sends back reads back.

use tbnet::{ConnectionManager, DataBuffer, DataReader, Packet};

use crate::support::*;

#[test]
fn data_buffer_bodies_cross_the_wire_byte_for_byte() {
    let (addr, peer) = raw_server(|mut stream| {
        let request = read_frame(&mut stream).expect("a request");
        // Answer with a body a C++ peer would write: int32 7, "ok", int16 -1.
        let reply = [0, 0, 0, 7, 0, 0, 0, 3, b'o', b'k', 0, 0xFF, 0xFF];
        send_bytes(&mut stream, &frame(request.chid, 0, &reply));
        request.body
    });
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    let mut body = DataBuffer::new();
    body.put_i64(1);
    body.put_string("key");
    body.put_string("");
    body.put_i8(-1);
    let reply = client
        .call(addr, Packet::new(5, body.freeze()), Some(NEVER))
        .expect("a reply");
    let sent = within("raw peer", move || peer.join().unwrap());
    assert_eq!(
        sent,
        [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 4, b'k', b'e', b'y', 0, 0, 0, 0, 0, 0xFF]
    );
    let mut input = DataReader::new(reply.into_body());
    assert_eq!(input.get_i32().unwrap(), 7);
    assert_eq!(input.get_string().unwrap(), "ok");
    assert_eq!(input.get_i16().unwrap(), -1);
    assert!(input.get_i8().is_err(), "the body ends there");
    stop(&client_transport);
}
