//! A minimal HTTP/1.1 server built on tbnet, as tbnet's `httpserver`
//! example is: a framing without tbnet's header (`existPacketHeader =
//! false`) cuts the byte stream into requests, and an ordinary adaptor
//! answers them.
//!
//! ```sh
//! cargo run --example http_server -- --addr 127.0.0.1:8080
//! curl -v http://127.0.0.1:8080/hello
//! ```
//!
//! `GET /` and `GET /hello` answer a greeting, `POST /echo` answers its
//! body, anything else 404. Connections are kept alive (HTTP/1.1's
//! default) until the client closes them or sends `Connection: close`
//! (then the server closes once the response is written). A request whose
//! head is not HTTP gets `400 Bad Request` and its connection is closed;
//! one whose head exceeds 8 KiB, or whose body exceeds 1 MiB, is closed at
//! once. Prints `listening on ADDR` once ready and serves until killed.

use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::{Bytes, BytesMut};
use clap::Parser;
use tbnet::proto::{FrameError, FrameHeader, PacketStreamer, Parse};
use tbnet::{ChannelId, Dispatch, ListenOptions, Packet, PacketCode, Responder, Transport};

/// A minimal HTTP/1.1 server built on tbnet.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
}

/// Longest request head (request line and headers).
const MAX_HEAD: usize = 8 * 1024;

/// Longest request body.
const MAX_BODY: usize = 1024 * 1024;

/// The packet code of a well-formed request.
const REQUEST: PacketCode = PacketCode(0);

/// The packet code of a delimited head that is not an HTTP request: the
/// adaptor answers it with 400 and closes.
const BAD_REQUEST: PacketCode = PacketCode(400);

/// HTTP/1.x framing: a request is its head, up to the blank line, plus
/// `Content-Length` bytes of body. The whole request is the packet's body;
/// replies go on the wire as they are.
struct HttpFraming;

impl PacketStreamer for HttpFraming {
    fn parse(&self, src: &[u8]) -> Result<Parse, FrameError> {
        let Some(end) = find(src, b"\r\n\r\n") else {
            if src.len() >= MAX_HEAD {
                return Err(FrameError::Malformed("request head over 8 KiB"));
            }
            return Ok(Parse::Incomplete {
                needed: src.len() + 1,
            });
        };
        let head_len = end + 4;
        let (pcode, body_len) = match head(&src[..end]) {
            Some(head) => (REQUEST, head.content_length()?),
            None => (BAD_REQUEST, 0),
        };
        Ok(Parse::Frame(FrameHeader {
            pcode,
            // Any id but 0 (which would make the request one-way): the
            // reply carries it back, and this framing writes no ids.
            channel_id: ChannelId(1),
            header_len: 0,
            body_len: head_len + body_len,
        }))
    }

    fn encode_header(&self, _packet: &Packet, _dst: &mut BytesMut) {}

    fn max_body_len(&self) -> usize {
        MAX_HEAD + MAX_BODY
    }
}

/// A request's head, parsed.
struct Head<'a> {
    method: &'a str,
    target: &'a str,
    headers: Vec<(&'a str, &'a str)>,
}

impl Head<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        (self.headers.iter())
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// The body's length, refused when it is not a plain length (chunked
    /// bodies are beyond this example) or is over the limit.
    fn content_length(&self) -> Result<usize, FrameError> {
        if self.header("transfer-encoding").is_some() {
            return Err(FrameError::Malformed("transfer-encoding is not supported"));
        }
        let Some(value) = self.header("content-length") else {
            return Ok(0);
        };
        match value.parse::<usize>() {
            Ok(len) if len <= MAX_BODY => Ok(len),
            Ok(_) => Err(FrameError::Malformed("request body over 1 MiB")),
            Err(_) => Err(FrameError::Malformed("bad content-length")),
        }
    }
}

/// Parses a head (without its blank line): `None` if it is not HTTP/1.x.
fn head(bytes: &[u8]) -> Option<Head<'_>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lines = text.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next().filter(|m| is_token(m))?;
    let target = request_line.next().filter(|t| t.starts_with('/'))?;
    let version = request_line.next()?;
    if request_line.next().is_some() || !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return None;
    }
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':')?;
            is_token(name).then(|| (name, value.trim()))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Head {
        method,
        target,
        headers,
    })
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.!#$%&'*+^`|~".contains(&b))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// An HTTP/1.1 response with a body and its length.
fn response(status: &str, body: &[u8], close: bool) -> Bytes {
    let connection = if close { "close" } else { "keep-alive" };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out.into()
}

fn handle(request: Packet, responder: Responder) {
    let raw = request.body();
    let parsed = (request.pcode() == REQUEST)
        .then(|| find(raw, b"\r\n\r\n"))
        .flatten()
        .and_then(|end| Some((head(&raw[..end])?, end + 4)));
    let conn = responder.connection();
    let Some((head, body_at)) = parsed else {
        let answer = response("400 Bad Request", b"bad request\n", true);
        let _ = responder.reply(request.reply(answer));
        // Closes once the answer is written (tbnet's setWriteFinishClose).
        conn.close_when_written();
        return;
    };
    let close = head
        .header("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let body = &raw[body_at..];
    let answer = match (head.method, head.target) {
        ("GET", "/") | ("GET", "/hello") => response("200 OK", b"hello from tbnet\n", close),
        ("POST", "/echo") => response("200 OK", body, close),
        _ => response("404 Not Found", b"not found\n", close),
    };
    let _ = responder.reply(request.reply(answer));
    if close {
        conn.close_when_written();
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let transport = match Transport::builder().start() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("http_server: cannot start the transport: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On the IO thread: one request at a time per connection, so replies
    // leave in request order, as HTTP/1.1 pipelining needs.
    let options = ListenOptions::new()
        .streamer(HttpFraming)
        .dispatch(Dispatch::IoThread);
    match transport.listen_with_options(args.addr, handle, options) {
        Ok(local) => println!("listening on {local}"),
        Err(e) => {
            eprintln!("http_server: cannot listen on {}: {e}", args.addr);
            return ExitCode::FAILURE;
        }
    }
    transport.wait();
    ExitCode::SUCCESS
}
