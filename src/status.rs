//! The optional status page: a plain HTTP/1.x `GET` on a tbnet port.
//!
//! tbnet frames start with the flag `"AnEt"`; a connection whose first bytes
//! are `GET ` or `HEAD ` is HTTP instead. It gets one response and is
//! closed: `/` is a live dashboard (an HTML page whose small script polls
//! `/status`), `/status` the transport's counters and per packet code
//! numbers as JSON, `/metrics` the same in Prometheus' text format (latency
//! as histograms), anything else 404. A request line or
//! header block that is malformed, or longer than 8 KiB, closes the
//! connection unanswered. Parsing and rendering here are pure; the IO thread
//! feeds them.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;

use crate::metrics::{CodeMetrics, ErrorKind, Side};
use crate::transport::{
    AllowList, SniffContext, Sniffed, Sniffer, StatsSnapshot, TransportBuilder,
};

/// The dashboard: one self-contained page (no external asset).
const DASHBOARD: &str = include_str!("dashboard.html");

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
    /// Answers plain HTTP `GET /` (a live dashboard page), `GET /status`
    /// (JSON) and `GET /metrics` (Prometheus text, with per packet code
    /// latency histograms) on every listener's port, beside tbnet frames
    /// (default off). The dashboard needs no internet access: its script
    /// and styles are served from the crate. A connection whose first bytes are `GET ` or `HEAD `
    /// gets one HTTP response and is closed; other paths get 404, malformed
    /// requests are closed unanswered. tbnet's own servers answered such
    /// status requests through their HTTP streamer.
    ///
    /// Only peers on [`status_allow`](Self::status_allow) (default:
    /// loopback) are answered: the counters say much about a server.
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

/// The status page as a listener's first-bytes sniffer, answering the
/// peers `allow` admits.
pub(crate) struct StatusPage {
    pub(crate) allow: AllowList,
}

impl Sniffer for StatusPage {
    fn sniff(&self, first_bytes: &[u8], context: &SniffContext<'_>) -> Sniffed {
        match sniff(first_bytes) {
            Sniff::Unsure => Sniffed::NeedMore,
            Sniff::Frames => Sniffed::Frames,
            Sniff::Http if !self.allow.admits(context.peer.ip()) => {
                Sniffed::Refuse("peer not on the status page's allow-list")
            }
            Sniff::Http => match parse(first_bytes) {
                Ok(None) => Sniffed::NeedMore,
                Ok(Some(request)) => {
                    tracing::debug!(path = %request.path, "status page request");
                    let page = Page {
                        stats: (context.stats)(),
                        uptime: context.uptime,
                        methods: match request.path.as_str() {
                            "/status" | "/metrics" => context.metrics.snapshot(),
                            _ => Vec::new(),
                        },
                    };
                    Sniffed::Respond(respond(&request, &page))
                }
                Err(reason) => Sniffed::Reject(reason),
            },
        }
    }
}

/// What the pages show.
pub(crate) struct Page {
    pub(crate) stats: StatsSnapshot,
    pub(crate) uptime: Duration,
    /// Per packet code rows (read only for `/status` and `/metrics`).
    pub(crate) methods: Vec<CodeMetrics>,
}

/// The whole response to `request`.
pub(crate) fn respond(request: &Request, page: &Page) -> Bytes {
    let (stats, uptime) = (&page.stats, page.uptime);
    let (status, content_type, body) = match request.path.as_str() {
        "/" => ("200 OK", "text/html; charset=utf-8", DASHBOARD.to_string()),
        "/status" => (
            "200 OK",
            "application/json",
            status_json(stats, uptime, &page.methods),
        ),
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            metrics_text(stats, uptime, &page.methods),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
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
) -> [(&'static str, &'static str, &'static str, f64); 30] {
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
            "unhandled_total",
            "counter",
            "Packets from servers that matched no request, with no default handler to take them",
            stats.unhandled as f64,
        ),
        (
            "refused_total",
            "counter",
            "Connections refused by a listener's allow-list",
            stats.refused as f64,
        ),
        (
            "over_limit_total",
            "counter",
            "Connections closed at accept for a connection limit",
            stats.over_limit as f64,
        ),
        (
            "accept_errors_total",
            "counter",
            "Accepts that failed for lack of resources",
            stats.accept_errors as f64,
        ),
        (
            "first_frame_timeouts_total",
            "counter",
            "Connections closed for sending no first frame in time",
            stats.first_frame_timeouts as f64,
        ),
        (
            "handshake_failures_total",
            "counter",
            "TLS handshakes that failed or timed out",
            stats.handshake_failures as f64,
        ),
        (
            "status_refused_total",
            "counter",
            "Status requests from peers not on the status allow-list",
            stats.status_refused as f64,
        ),
        (
            "poll_wakeups_total",
            "counter",
            "Times the IO thread woke from waiting for events",
            stats.poll_wakeups as f64,
        ),
        (
            "memory_bytes",
            "gauge",
            "Bytes held in read buffers and unwritten output",
            stats.memory as f64,
        ),
        (
            "budget_holds_total",
            "counter",
            "Connections paused because the memory budget was spent",
            stats.budget_holds as f64,
        ),
        (
            "in_flight_holds_total",
            "counter",
            "Connections paused at their limit of requests in flight",
            stats.in_flight_holds as f64,
        ),
        (
            "budget_releases_total",
            "counter",
            "Empty read buffers given back because the memory budget was spent",
            stats.budget_releases as f64,
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

fn status_json(stats: &StatsSnapshot, uptime: Duration, methods: &[CodeMetrics]) -> String {
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
    out.push_str(",\"methods\":[");
    for (i, row) in methods.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"side\":\"{}\",\"pcode\":{},\"requests\":{},\"errors\":{},\"errors_by_kind\":{{",
            row.side.as_str(),
            row.pcode
                .map_or("null".to_string(), |c| c.get().to_string()),
            row.requests,
            row.errors(),
        );
        let mut first = true;
        for kind in ErrorKind::ALL {
            let n = row.errors_of(kind);
            if n > 0 {
                let comma = if first { "" } else { "," };
                let _ = write!(out, "{comma}\"{}\":{n}", kind.as_str());
                first = false;
            }
        }
        out.push('}');
        for (name, q) in [("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)] {
            let micros = row.latency.percentile(q).unwrap_or_default().as_secs_f64() * 1e6;
            let _ = write!(out, ",\"{name}\":{micros:.1}");
        }
        let mean = row.latency.sum().as_secs_f64() * 1e6 / row.requests.max(1) as f64;
        let _ = write!(out, ",\"mean_us\":{mean:.1},\"buckets\":[");
        // Non-empty buckets as [lower_us, upper_us, count], so a reader can
        // take percentiles over an interval from two snapshots' difference.
        for (i, (lower, upper, count)) in row.latency.buckets().enumerate() {
            let lower = lower.as_micros();
            let upper = upper.map_or(lower * 2, |u| u.as_micros());
            let comma = if i > 0 { "," } else { "" };
            let _ = write!(out, "{comma}[{lower},{upper},{count}]");
        }
        out.push_str("]}");
    }
    out.push_str("]}\n");
    out
}

fn metrics_text(stats: &StatsSnapshot, uptime: Duration, methods: &[CodeMetrics]) -> String {
    let mut out = String::new();
    for (name, kind, help, value) in counters(stats, uptime) {
        let _ = writeln!(out, "# HELP tbnet_{name} {help}.");
        let _ = writeln!(out, "# TYPE tbnet_{name} {kind}");
        let _ = writeln!(out, "tbnet_{name} {value}");
    }
    for side in [Side::Server, Side::Client] {
        let rows: Vec<&CodeMetrics> = methods.iter().filter(|r| r.side == side).collect();
        if rows.is_empty() {
            continue;
        }
        let side = side.as_str();
        let what = if side == "server" {
            "from decoded to answered"
        } else {
            "from sent to ended"
        };
        let name = format!("tbnet_{side}_request_duration_seconds");
        let _ = writeln!(
            out,
            "# HELP {name} Latency of {side} requests by packet code, {what}."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        for row in &rows {
            let pcode = row
                .pcode
                .map_or("other".to_string(), |c| c.get().to_string());
            for (le, count) in row.latency.cumulative() {
                let _ = writeln!(
                    out,
                    "{name}_bucket{{pcode=\"{pcode}\",le=\"{}\"}} {count}",
                    le.as_secs_f64()
                );
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{pcode=\"{pcode}\",le=\"+Inf\"}} {}",
                row.requests
            );
            let _ = writeln!(
                out,
                "{name}_sum{{pcode=\"{pcode}\"}} {}",
                row.latency.sum().as_secs_f64()
            );
            let _ = writeln!(out, "{name}_count{{pcode=\"{pcode}\"}} {}", row.requests);
        }
        let errors = format!("tbnet_{side}_request_errors_total");
        let _ = writeln!(
            out,
            "# HELP {errors} Failed {side} requests by packet code and kind."
        );
        let _ = writeln!(out, "# TYPE {errors} counter");
        for row in &rows {
            let pcode = row
                .pcode
                .map_or("other".to_string(), |c| c.get().to_string());
            for kind in ErrorKind::ALL {
                let n = row.errors_of(kind);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "{errors}{{pcode=\"{pcode}\",kind=\"{}\"}} {n}",
                        kind.as_str()
                    );
                }
            }
        }
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
        let with_methods = status_json(&StatsSnapshot::default(), Duration::from_secs(1), &[]);
        // The counters are numbers; the per-code rows follow in `methods`.
        let json = with_methods.replace(",\"methods\":[]", "");
        assert_ne!(json, with_methods);
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
            "unhandled",
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
            let page = Page {
                stats,
                uptime: Duration::from_secs(2),
                methods: Vec::new(),
            };
            String::from_utf8(respond(&request, &page).to_vec()).unwrap()
        };
        let status = get("/status");
        assert!(status.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(status.contains("\"connections\":3,"));
        assert_eq!(status.matches("\"connections\":").count(), 1, "{status}");
        assert!(status.contains("\"connections_total\":"), "{status}");
        assert!(status.contains("\"packets_in\":10,"));
        assert!(status.contains("\"uptime_seconds\":2.000,\"methods\":[]}"));
        let metrics = get("/metrics");
        assert!(
            metrics.contains("# TYPE tbnet_packets_in_total counter\ntbnet_packets_in_total 10\n")
        );
        assert!(get("/nope").starts_with("HTTP/1.1 404 Not Found\r\n"));
        let dashboard = get("/");
        assert!(dashboard.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/html"));
        assert!(dashboard.contains("fetch('/status'"), "{dashboard}");
        assert!(!dashboard.contains("http://") && !dashboard.contains("https://"));
        let head = respond(
            &Request {
                head_only: true,
                path: "/status".into(),
            },
            &Page {
                stats,
                uptime: Duration::ZERO,
                methods: Vec::new(),
            },
        );
        assert!(head.ends_with(b"\r\n\r\n"));
    }
}
