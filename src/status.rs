//! The optional status page: a plain HTTP/1.x `GET` on a tbnet port.
//!
//! tbnet frames start with the flag `"AnEt"`; a connection whose first bytes
//! are `GET ` or `HEAD ` is HTTP instead. It gets one response and is
//! closed: `/status` is the transport's counters as JSON, `/metrics` the
//! same in Prometheus' text format, anything else 404. A request line or
//! header block that is malformed, or longer than 8 KiB, closes the
//! connection unanswered. Parsing and rendering here are pure; the IO thread
//! feeds them.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;

use crate::transport::{SniffContext, Sniffed, Sniffer, StatsSnapshot, TransportBuilder};

/// Longest request head (request line and headers) accepted.
pub(crate) const MAX_HEAD: usize = 8 * 1024;

/// What the start of a connection's input is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sniff {
    /// Too short to tell.
    Unsure,
    /// An HTTP request.
    Http,
    /// Anything else: tbnet frames.
    Frames,
}

/// Tells an HTTP request from tbnet frames by the first bytes.
pub(crate) fn sniff(input: &[u8]) -> Sniff {
    for method in [&b"GET "[..], b"HEAD "] {
        let n = input.len().min(method.len());
        if input[..n] == method[..n] {
            return if n == method.len() {
                Sniff::Http
            } else {
                Sniff::Unsure
            };
        }
    }
    Sniff::Frames
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) head_only: bool,
    pub(crate) path: String,
}

/// Parses the request head at the start of `input`: `Ok(None)` until the
/// blank line arrives.
pub(crate) fn parse(input: &[u8]) -> Result<Option<Request>, &'static str> {
    let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if input.len() > MAX_HEAD {
            Err("request head over 8 KiB")
        } else {
            Ok(None)
        };
    };
    if end > MAX_HEAD {
        return Err("request head over 8 KiB");
    }
    let head = std::str::from_utf8(&input[..end]).map_err(|_| "request head is not UTF-8")?;
    let line = head.split("\r\n").next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line");
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err("malformed request line");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err("unsupported method"),
    };
    let path = target.split('?').next().unwrap_or_default().to_string();
    Ok(Some(Request { head_only, path }))
}

impl TransportBuilder {
    /// Answers plain HTTP `GET /status` (JSON) and `GET /metrics`
    /// (Prometheus text) on every listener's port, beside tbnet frames
    /// (default off). A connection whose first bytes are `GET ` or `HEAD `
    /// gets one HTTP response and is closed; other paths get 404, malformed
    /// requests are closed unanswered. tbnet's own servers answered such
    /// status requests through their HTTP streamer.
    ///
    /// # Examples
    /// ```
    /// use std::io::{Read, Write};
    /// use tbnet::{Packet, Responder, Transport};
    ///
    /// let transport = Transport::builder().status_page(true).start()?;
    /// let addr = transport.listen("127.0.0.1:0", |_: Packet, _: Responder| {})?;
    /// let mut http = std::net::TcpStream::connect(addr)?;
    /// http.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")?;
    /// let mut response = String::new();
    /// http.read_to_string(&mut response)?;
    /// assert!(response.starts_with("HTTP/1.1 200 OK"));
    /// assert!(response.contains("\"connections\":"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn status_page(mut self, enabled: bool) -> Self {
        self.config_mut().status_page = enabled;
        self
    }
}

/// The status page as a listener's first-bytes sniffer.
pub(crate) struct StatusPage;

impl Sniffer for StatusPage {
    fn sniff(&self, first_bytes: &[u8], context: &SniffContext<'_>) -> Sniffed {
        match sniff(first_bytes) {
            Sniff::Unsure => Sniffed::NeedMore,
            Sniff::Frames => Sniffed::Frames,
            Sniff::Http => match parse(first_bytes) {
                Ok(None) => Sniffed::NeedMore,
                Ok(Some(request)) => {
                    tracing::debug!(path = %request.path, "status page request");
                    Sniffed::Respond(respond(&request, &(context.stats)(), context.uptime))
                }
                Err(reason) => Sniffed::Reject(reason),
            },
        }
    }
}

/// The whole response to `request`.
pub(crate) fn respond(request: &Request, stats: &StatsSnapshot, uptime: Duration) -> Bytes {
    let (status, content_type, body) = match request.path.as_str() {
        "/status" => ("200 OK", "application/json", status_json(stats, uptime)),
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            metrics_text(stats, uptime),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !request.head_only {
        out.push_str(&body);
    }
    Bytes::from(out)
}

/// The counters, with their Prometheus names and help.
fn counters(
    stats: &StatsSnapshot,
    uptime: Duration,
) -> [(&'static str, &'static str, &'static str, f64); 18] {
    [
        (
            "connections",
            "gauge",
            "Open connections",
            stats.connections as f64,
        ),
        (
            "connections_total",
            "counter",
            "Connections opened",
            stats.connections_total as f64,
        ),
        (
            "packets_in_total",
            "counter",
            "Packets received",
            stats.packets_in as f64,
        ),
        (
            "packets_out_total",
            "counter",
            "Packets sent",
            stats.packets_out as f64,
        ),
        (
            "bytes_in_total",
            "counter",
            "Bytes received",
            stats.bytes_in as f64,
        ),
        (
            "bytes_out_total",
            "counter",
            "Bytes sent",
            stats.bytes_out as f64,
        ),
        (
            "pending",
            "gauge",
            "Client requests awaiting a response",
            stats.pending as f64,
        ),
        (
            "timeouts_total",
            "counter",
            "Client requests that timed out",
            stats.timeouts as f64,
        ),
        (
            "late_responses_total",
            "counter",
            "Responses that matched no pending request",
            stats.late_responses as f64,
        ),
        (
            "replies_dropped_total",
            "counter",
            "Replies for connections that had closed",
            stats.replies_dropped as f64,
        ),
        (
            "bad_frames_total",
            "counter",
            "Connections closed for a malformed frame",
            stats.bad_frames as f64,
        ),
        (
            "unrouted_total",
            "counter",
            "Requests dropped for lack of a route",
            stats.unrouted as f64,
        ),
        (
            "half_closes_total",
            "counter",
            "Server connections whose peer ended its sending side",
            stats.half_closes as f64,
        ),
        (
            "connect_attempts_total",
            "counter",
            "Client connections tried",
            stats.connect_attempts as f64,
        ),
        (
            "early_failures_total",
            "counter",
            "Client connections that ended before they proved healthy",
            stats.early_failures as f64,
        ),
        (
            "post_replies_total",
            "counter",
            "Replies to one-way posts, discarded",
            stats.post_replies as f64,
        ),
        (
            "worker_queue",
            "gauge",
            "Requests waiting for a worker",
            stats.worker_queue as f64,
        ),
        (
            "uptime_seconds",
            "gauge",
            "Seconds since the transport started",
            uptime.as_secs_f64(),
        ),
    ]
}

fn status_json(stats: &StatsSnapshot, uptime: Duration) -> String {
    let mut out = String::from("{");
    let counters = counters(stats, uptime);
    for (i, (name, _, _, value)) in counters.iter().enumerate() {
        // Keys are the Prometheus names without `_total`, unless that names
        // another counter (`connections` is open now, `connections_total`
        // ever opened).
        let key = match name.strip_suffix("_total") {
            Some(short) if !counters.iter().any(|(other, ..)| other == &short) => short,
            _ => name,
        };
        if i > 0 {
            out.push(',');
        }
        if *name == "uptime_seconds" {
            let _ = write!(out, "\"{key}\":{value:.3}");
        } else {
            let _ = write!(out, "\"{key}\":{value}");
        }
    }
    out.push_str("}\n");
    out
}

fn metrics_text(stats: &StatsSnapshot, uptime: Duration) -> String {
    let mut out = String::new();
    for (name, kind, help, value) in counters(stats, uptime) {
        let _ = writeln!(out, "# HELP tbnet_{name} {help}.");
        let _ = writeln!(out, "# TYPE tbnet_{name} {kind}");
        let _ = writeln!(out, "tbnet_{name} {value}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_http_by_its_method() {
        assert_eq!(sniff(b"GET /status HTTP/1.1"), Sniff::Http);
        assert_eq!(sniff(b"HEAD / HTTP/1.0"), Sniff::Http);
        assert_eq!(sniff(b"GE"), Sniff::Unsure);
        assert_eq!(sniff(b"H"), Sniff::Unsure);
        assert_eq!(sniff(b""), Sniff::Unsure);
        assert_eq!(sniff(b"AnEt\0\0\0\x01"), Sniff::Frames);
        assert_eq!(sniff(b"POST / HTTP/1.1"), Sniff::Frames);
    }

    #[test]
    fn parses_complete_heads_only() {
        assert_eq!(parse(b"GET /status HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        let request = parse(b"GET /status?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            request,
            Request {
                head_only: false,
                path: "/status".into()
            }
        );
        let head = parse(b"HEAD /metrics HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(head.head_only);
    }

    #[test]
    fn rejects_malformed_heads() {
        for bad in [
            &b"GET /status\r\n\r\n"[..],
            b"GET status HTTP/1.1\r\n\r\n",
            b"GET /status SPDY/3\r\n\r\n",
            b"GET / HTTP/1.1 extra\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let endless = [b'a'; MAX_HEAD + 1];
        assert!(parse(&endless).is_err());
    }

    /// The keys of a flat JSON object of numbers, as the status page
    /// writes it.
    pub(crate) fn json_keys(json: &str) -> Vec<String> {
        let inner = json
            .trim()
            .strip_prefix('{')
            .and_then(|j| j.strip_suffix('}'));
        let inner = inner.unwrap_or_else(|| panic!("not a JSON object: {json}"));
        (inner.split(','))
            .map(|pair| {
                let (key, value) = pair.split_once(':').expect("\"key\":value");
                assert!(value.parse::<f64>().is_ok(), "{pair} is no number");
                let key = key.strip_prefix('"').and_then(|k| k.strip_suffix('"'));
                key.expect("a quoted key").to_string()
            })
            .collect()
    }

    #[test]
    fn status_json_keys_are_unique() {
        let json = status_json(&StatsSnapshot::default(), Duration::from_secs(1));
        let keys = json_keys(&json);
        let unique: std::collections::HashSet<&String> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len(), "a key repeats in {json}");
        // One key per counter, and both connection counts are there.
        assert_eq!(
            keys.len(),
            counters(&StatsSnapshot::default(), Duration::ZERO).len()
        );
        for key in [
            "connections",
            "connections_total",
            "post_replies",
            "uptime_seconds",
        ] {
            assert!(keys.iter().any(|k| k == key), "no {key} in {json}");
        }
    }

    #[test]
    fn renders_json_and_prometheus() {
        let stats = StatsSnapshot {
            connections: 3,
            packets_in: 10,
            ..StatsSnapshot::default()
        };
        let get = |path: &str| {
            let request = Request {
                head_only: false,
                path: path.into(),
            };
            String::from_utf8(respond(&request, &stats, Duration::from_secs(2)).to_vec()).unwrap()
        };
        let status = get("/status");
        assert!(status.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(status.contains("\"connections\":3,"));
        assert_eq!(status.matches("\"connections\":").count(), 1, "{status}");
        assert!(status.contains("\"connections_total\":"), "{status}");
        assert!(status.contains("\"packets_in\":10,"));
        assert!(status.contains("\"uptime_seconds\":2.000}"));
        let metrics = get("/metrics");
        assert!(
            metrics.contains("# TYPE tbnet_packets_in_total counter\ntbnet_packets_in_total 10\n")
        );
        assert!(get("/nope").starts_with("HTTP/1.1 404 Not Found\r\n"));
        let head = respond(
            &Request {
                head_only: true,
                path: "/status".into(),
            },
            &stats,
            Duration::ZERO,
        );
        assert!(head.ends_with(b"\r\n\r\n"));
    }
}
