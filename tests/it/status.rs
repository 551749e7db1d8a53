//! The status page on the RPC port, asked with plain `std::net` HTTP.

use std::io::{Read, Write};

use tbnet::{ConnectionManager, Packet, Transport};

use crate::support::*;

fn http(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = raw_client(addr);
    stream.write_all(request).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

fn status_server() -> Server {
    let transport = Transport::builder().status_page(true).start().unwrap();
    let addr = transport.listen(loopback(), echo).unwrap();
    Server { transport, addr }
}

#[test]
fn status_and_metrics_share_the_rpc_port() {
    let server = status_server();
    // Some RPC traffic first, so the counters have something to say.
    let client = transport();
    let manager = ConnectionManager::new(&client);
    for _ in 0..3 {
        manager
            .call(server.addr, Packet::new(1, "x"), Some(NEVER))
            .unwrap();
    }

    let status = http(
        server.addr,
        b"GET /status HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
    );
    assert!(status.starts_with("HTTP/1.1 200 OK\r\n"), "{status}");
    assert!(status.contains("Content-Type: application/json"));
    let body = status.split("\r\n\r\n").nth(1).unwrap();
    assert!(
        body.starts_with('{') && body.trim_end().ends_with('}'),
        "{body}"
    );
    assert!(body.contains("\"packets_in\":3,"), "{body}");
    assert!(
        body.contains("\"connections\":2,"),
        "the RPC connection and this one: {body}"
    );
    assert!(body.contains("\"uptime_seconds\":"));

    let metrics = http(server.addr, b"GET /metrics HTTP/1.0\r\n\r\n");
    assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"));
    assert!(
        metrics.contains("# TYPE tbnet_packets_in_total counter\ntbnet_packets_in_total 3\n"),
        "{metrics}"
    );

    let missing = http(server.addr, b"GET /nothing HTTP/1.1\r\n\r\n");
    assert!(missing.starts_with("HTTP/1.1 404 Not Found\r\n"));

    // RPC still works on the same port, on the connection it already had.
    manager
        .call(server.addr, Packet::new(1, "after"), Some(NEVER))
        .unwrap();
    assert_eq!(client.stats().connections_total, 1);
    stop(&client);
    stop(&server.transport);
}

#[test]
fn malformed_http_closes_the_connection_unanswered() {
    let server = status_server();
    for bad in [
        &b"GET /status\r\n\r\n"[..],
        b"GET status HTTP/1.1\r\n\r\n",
        b"HEAD /status HTTP/2\r\n\r\n",
    ] {
        assert_eq!(http(server.addr, bad), "", "{bad:?}");
    }
    let mut endless = raw_client(server.addr);
    let mut head = b"GET /status HTTP/1.1\r\n".to_vec();
    head.extend(std::iter::repeat(b'x').take(9000));
    let _ = endless.write_all(&head);
    assert!(closed_by_peer(&mut endless));
    stop(&server.transport);
}

#[test]
fn the_status_page_is_off_by_default() {
    let server = echo_server();
    // Without it, "GET " is a bad tbnet flag: the connection is closed.
    assert_eq!(http(server.addr, b"GET /status HTTP/1.1\r\n\r\n"), "");
    assert_eq!(server.transport.stats().bad_frames, 1);
    stop(&server.transport);
}

/// Regression: `connections_total` lost its `_total` in the JSON and
/// printed a second `connections` key. Every key of the real page, after
/// traffic of every kind counted there, appears once.
#[test]
fn status_json_keys_are_unique() {
    let server = status_server();
    let client = transport();
    let manager = ConnectionManager::new(&client);
    manager
        .call(server.addr, Packet::new(1, "x"), Some(NEVER))
        .unwrap();
    let status = http(server.addr, b"GET /status HTTP/1.1\r\n\r\n");
    let body = status.split("\r\n\r\n").nth(1).unwrap().trim();
    // The counters, before the per-code rows in `methods` (the last key).
    let (counters, methods) = body
        .split_once(",\"methods\":[")
        .unwrap_or_else(|| panic!("no methods in {body}"));
    assert!(methods.ends_with("]}"), "{body}");
    let inner = counters
        .strip_prefix('{')
        .unwrap_or_else(|| panic!("not a JSON object: {body}"));
    let keys: Vec<&str> = inner
        .split(',')
        .map(|pair| pair.split_once(':').expect("\"key\":value").0)
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), keys.len(), "a key repeats: {body}");
    for key in [
        "\"connections\"",
        "\"connections_total\"",
        "\"post_replies\"",
    ] {
        assert!(keys.contains(&key), "no {key} in {body}");
    }
    stop(&client);
    stop(&server.transport);
}
