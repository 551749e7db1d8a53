//! Per packet code numbers after real traffic: the transport's rows, the
//! Prometheus histograms on `/metrics`, the percentiles on `/status`, and
//! the dashboard on `/`.

use std::io::{Read, Write};
use std::net::SocketAddr;

use tbnet::metrics::{ErrorKind, Side};
use tbnet::{ConnectionManager, Error, Packet, PacketCode, Responder, Router, Transport};

use crate::support::*;

fn http(addr: SocketAddr, path: &str) -> String {
    let mut stream = raw_client(addr);
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

/// Code 1 answers, 2 refuses, 3 never answers; anything else has no route.
fn server() -> Server {
    let transport = Transport::builder()
        .workers(2)
        .status_page(true)
        .start()
        .unwrap();
    let router = Router::new()
        .route(1, echo)
        .route(2, |_: Packet, resp: Responder| {
            let _ = resp.reply_error(5, "no");
        })
        .route(3, |_: Packet, resp: Responder| drop(resp));
    let addr = transport.listen(loopback(), router).unwrap();
    Server { transport, addr }
}

fn row(
    rows: &[tbnet::metrics::CodeMetrics],
    side: Side,
    code: i32,
) -> &tbnet::metrics::CodeMetrics {
    rows.iter()
        .find(|r| r.side == side && r.pcode == Some(PacketCode(code)))
        .unwrap_or_else(|| panic!("no {side:?} row for {code}: {rows:?}"))
}

#[test]
fn each_code_counts_requests_errors_and_latency_on_both_sides() {
    let server = server();
    let client = transport();
    let manager = ConnectionManager::new(&client);
    for _ in 0..5 {
        manager
            .call(server.addr, Packet::new(1, "x"), Some(NEVER))
            .unwrap();
    }
    for _ in 0..2 {
        let refused = manager.call(server.addr, Packet::new(2, "x"), Some(NEVER));
        assert!(matches!(refused, Err(Error::Remote { code: 5, .. })));
    }
    // It must reach the server (counted below): 1 s, not SHORT_TIMEOUT.
    let silent = manager.call(
        server.addr,
        Packet::new(3, "x"),
        Some(std::time::Duration::from_secs(1)),
    );
    assert!(matches!(silent, Err(Error::Timeout)));
    let unknown = manager.call(server.addr, Packet::new(4, "x"), Some(NEVER));
    assert!(matches!(unknown, Err(Error::Remote { .. })));

    // The server counts a request when its reply is queued, which can
    // follow the client's outcome by a moment.
    assert!(wait_until(WAIT_LIMIT, || {
        let rows = server.transport.method_metrics();
        rows.iter().map(|r| r.requests).sum::<u64>() == 9
    }));
    let rows = server.transport.method_metrics();
    assert!(rows.iter().all(|r| r.side == Side::Server), "{rows:?}");
    let ok = row(&rows, Side::Server, 1);
    assert_eq!((ok.requests, ok.errors()), (5, 0));
    assert!(ok.latency.percentile(0.5).is_some());
    let refused = row(&rows, Side::Server, 2);
    assert_eq!(
        (refused.requests, refused.errors_of(ErrorKind::Remote)),
        (2, 2)
    );
    let silent = row(&rows, Side::Server, 3);
    assert_eq!(silent.errors_of(ErrorKind::Unanswered), 1);
    let unknown = row(&rows, Side::Server, 4);
    assert_eq!(unknown.errors_of(ErrorKind::Remote), 1);

    let rows = client.method_metrics();
    assert_eq!(row(&rows, Side::Client, 1).requests, 5);
    assert_eq!(row(&rows, Side::Client, 2).errors_of(ErrorKind::Remote), 2);
    let timed_out = row(&rows, Side::Client, 3);
    assert_eq!(
        (timed_out.requests, timed_out.errors_of(ErrorKind::Timeout)),
        (1, 1)
    );
    assert!(timed_out.latency.percentile(1.0).unwrap() >= SHORT_TIMEOUT / 2);
    stop(&client);
    stop(&server.transport);
}

#[test]
fn metrics_export_histograms_and_status_adds_percentiles() {
    let server = server();
    let client = transport();
    let manager = ConnectionManager::new(&client);
    for _ in 0..7 {
        manager
            .call(server.addr, Packet::new(1, "x"), Some(NEVER))
            .unwrap();
    }
    let _ = manager.call(server.addr, Packet::new(2, "x"), Some(NEVER));
    assert!(wait_until(WAIT_LIMIT, || {
        (server.transport.method_metrics().iter())
            .map(|r| r.requests)
            .sum::<u64>()
            == 8
    }));

    let metrics = http(server.addr, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
    assert!(
        metrics.contains("# TYPE tbnet_server_request_duration_seconds histogram\n"),
        "{metrics}"
    );
    for line in [
        "tbnet_server_request_duration_seconds_bucket{pcode=\"1\",le=\"+Inf\"} 7\n",
        "tbnet_server_request_duration_seconds_count{pcode=\"1\"} 7\n",
        "tbnet_server_request_duration_seconds_count{pcode=\"2\"} 1\n",
        "tbnet_server_request_errors_total{pcode=\"2\",kind=\"remote\"} 1\n",
    ] {
        assert!(metrics.contains(line), "no {line:?} in {metrics}");
    }
    // Buckets are cumulative and end at the count.
    let buckets: Vec<u64> = metrics
        .lines()
        .filter(|l| l.starts_with("tbnet_server_request_duration_seconds_bucket{pcode=\"1\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), 29, "28 power-of-two bounds and +Inf");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert_eq!(*buckets.last().unwrap(), 7);
    assert!(metrics.contains("tbnet_server_request_duration_seconds_sum{pcode=\"1\"} "));

    let status = http(server.addr, "/status");
    let body = status.split("\r\n\r\n").nth(1).unwrap();
    assert!(
        body.contains("\"methods\":[{\"side\":\"server\",\"pcode\":1,\"requests\":7,\"errors\":0,"),
        "{body}"
    );
    for key in [
        "\"p50_us\":",
        "\"p99_us\":",
        "\"p999_us\":",
        "\"errors_by_kind\":{\"remote\":1}",
    ] {
        assert!(body.contains(key), "no {key} in {body}");
    }

    let page = http(server.addr, "/");
    assert!(
        page.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/html"),
        "{page}"
    );
    assert!(page.contains("<table id=\"codes\">"));
    stop(&client);
    stop(&server.transport);
}
