//! Endpoints named by tbnet's spec strings (`"tcp:host:port"`), plain
//! `"host:port"`, `SocketAddr` or `ServerId`, for listening and sending.

use tbnet::{ConnectionManager, Error, Packet, ServerId};

use crate::support::*;

#[test]
fn listen_and_send_by_spec_string() {
    let server = transport();
    let addr = server.listen("tcp:127.0.0.1:0", echo).expect("listen");
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    let spec = format!("tcp:{addr}");
    let plain = addr.to_string();
    let id = ServerId::try_from(addr).unwrap();
    assert_eq!(
        client
            .call(&*spec, Packet::new(1, "spec"), Some(NEVER))
            .unwrap()
            .body(),
        "spec"
    );
    assert_eq!(
        client
            .call(plain, Packet::new(1, "plain"), Some(NEVER))
            .unwrap()
            .body(),
        "plain"
    );
    assert_eq!(
        client
            .call(id, Packet::new(1, "id"), Some(NEVER))
            .unwrap()
            .body(),
        "id"
    );
    // A host name goes through the resolver.
    let by_name = format!("tcp:localhost:{}", addr.port());
    if let Ok(resolved) = tbnet::ToEndpoint::to_endpoint(&by_name) {
        if resolved.is_ipv4() {
            let answer = client.call(by_name, Packet::new(1, "name"), Some(NEVER));
            assert_eq!(answer.unwrap().body(), "name");
        }
    }
    // Every form names the same server: one connection.
    assert_eq!(client.connections(), 1);
    assert_eq!(client_transport.stats().connect_attempts, 1);
    stop(&client_transport);
    stop(&server);
}

#[test]
fn bad_specs_are_refused_with_the_packet_back() {
    let server = transport();
    for spec in ["udp:127.0.0.1:0", "127.0.0.1", "tcp:127.0.0.1:port"] {
        match server.listen(spec, echo) {
            Err(Error::InvalidAddress { spec: s, .. }) => assert_eq!(&*s, spec),
            other => panic!("listen({spec:?}) gave {other:?}"),
        }
    }
    let client_transport = transport();
    let client = ConnectionManager::new(&client_transport);
    let bad = "tcp:127.0.0.1";
    assert!(matches!(
        client.call(bad, Packet::new(1, "call"), None),
        Err(Error::InvalidAddress { .. })
    ));
    let refused = client
        .send(bad, Packet::new(1, "send"), None, |_| {})
        .unwrap_err();
    assert!(matches!(refused.error(), Error::InvalidAddress { .. }));
    assert_eq!(refused.into_inner().body(), "send");
    let refused = client
        .call_async(bad, Packet::new(1, "async"), None)
        .unwrap_err();
    assert!(matches!(refused.error(), Error::InvalidAddress { .. }));
    assert_eq!(refused.into_inner().body(), "async");
    let refused = client.post(bad, Packet::new(1, "post")).unwrap_err();
    assert!(matches!(refused.error(), Error::InvalidAddress { .. }));
    assert_eq!(refused.into_inner().body(), "post");
    let mut wait = tbnet::WaitObject::new();
    let refused = client
        .send_wait(bad, Packet::new(1, "wait"), None, &mut wait)
        .unwrap_err();
    assert!(matches!(refused.error(), Error::InvalidAddress { .. }));
    assert_eq!(refused.into_inner().body(), "wait");
    assert!(
        wait.wait_all().is_empty(),
        "the refused slot is not waited for"
    );
    assert_eq!(client_transport.stats().connect_attempts, 0);
    stop(&client_transport);
    stop(&server);
}
