//! tbnet echo client: drives an echo server and checks every answer.
//!
//! ```sh
//! # one command: starts an embedded echo server on 127.0.0.1:0
//! cargo run --release --example echo_client
//! # against a running server
//! cargo run --release --example echo_client -- --addr 127.0.0.1:8765 --conns 4 --depth 32
//! # against C++ tbnet's echo server
//! cargo run --release --example echo_client -- --addr tcp:127.0.0.1:8765 --ascii --size 1988
//! ```
//!
//! Flags: `--addr HOST:PORT` or `tcp:HOST:PORT` (absent: embedded server),
//! `--conns N` connections, `--depth D` requests in flight per connection,
//! `--size BYTES` per body, `--secs S` to run, `--mode
//! call|callback|future`, `--ascii` for C-string bodies, `--json` for one
//! JSON line (`rps`, `p50_us`, `p99_us`, `errors`, `mismatches`, ...)
//! instead of the summary. Progress goes to stderr once a second. Every
//! response body is compared byte for byte with its request's (with
//! `--ascii`, as a string). Exits 1 if any request failed or came back
//! altered.
//!
//! `--ascii` drives a C++ tbnet echo server, which treats a body as a
//! NUL-terminated string and answers with packet code 0 and that string:
//! bodies are `--size` bytes (24 to 4096) of printable ASCII ending in a
//! NUL, and a reply counts as an echo when its string (up to any NUL) is
//! the request's, whatever its packet code.
//!
//! TLS (built with `--features tls`, needs `--addr`): `--tls-ca PATH`
//! trusts the CA certificates in that PEM file, `--tls-name NAME` is the
//! name the server's certificate must carry (default `localhost`), and
//! `--tls-cert PATH --tls-key PATH` present a client certificate.

#[path = "common/load.rs"]
mod load;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use load::{Bodies, Mode, Progress, Run};
use tbnet::{ConnectionManager, Dispatch, Packet, Responder, ToEndpoint, Transport};

/// tbnet echo client: drives an echo server and checks every answer.
#[derive(Parser, Clone, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    /// Server to drive, `HOST:PORT` or tbnet's `tcp:HOST:PORT`; absent, an
    /// embedded echo server on 127.0.0.1:0.
    #[arg(long, value_parser = endpoint)]
    addr: Option<SocketAddr>,
    /// Connections (one `ConnectionManager` each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    conns: u64,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    depth: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0, value_parser = positive_secs)]
    secs: f64,
    /// How to wait for answers.
    #[arg(long, value_enum, default_value_t = Mode::Call)]
    mode: Mode,
    /// Bodies of printable ASCII ending in a NUL (24 to 4096 bytes), checked
    /// as strings: for C++ tbnet's echo server, which answers with packet
    /// code 0 and the request's string.
    #[arg(long)]
    ascii: bool,
    /// Print one JSON line (`rps`, `p50_us`, `p99_us`, `errors`, `mismatches`, ...) instead of the summary.
    #[arg(long)]
    json: bool,
    /// Connect with TLS, trusting the CA certificates in this PEM file (feature `tls`).
    #[arg(long = "tls-ca", value_name = "PATH", requires = "addr")]
    tls_ca: Option<PathBuf>,
    /// The name the server's certificate must carry.
    #[arg(
        long = "tls-name",
        value_name = "NAME",
        default_value = "localhost",
        requires = "tls_ca"
    )]
    tls_name: String,
    /// Present this PEM client certificate chain (needs `--tls-key`).
    #[arg(long = "tls-cert", value_name = "PATH", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long = "tls-key", value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// A connection manager for `transport`, speaking TLS if asked to.
fn manager(
    transport: &Transport,
    args: &Args,
    queue_limit: usize,
) -> Result<ConnectionManager, String> {
    let manager = ConnectionManager::new(transport).with_queue_limit(queue_limit);
    match &args.tls_ca {
        None => Ok(manager),
        Some(ca) => with_tls(manager, ca, args),
    }
}

#[cfg(feature = "tls")]
fn with_tls(
    manager: ConnectionManager,
    ca: &std::path::Path,
    args: &Args,
) -> Result<ConnectionManager, String> {
    let client = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
    let tls = tbnet::TlsClientConfig::from_pem_files(ca, &args.tls_name, client)
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
    Ok(manager.with_tls(tls))
}

#[cfg(not(feature = "tls"))]
fn with_tls(
    _: ConnectionManager,
    _: &std::path::Path,
    _: &Args,
) -> Result<ConnectionManager, String> {
    Err("built without TLS: rebuild with `--features tls`".into())
}

/// `HOST:PORT` or `tcp:HOST:PORT`, resolved once.
fn endpoint(s: &str) -> Result<SocketAddr, String> {
    s.to_endpoint().map_err(|e| e.to_string())
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s} is not a positive number of seconds")),
    }
}

fn echo(request: Packet, responder: Responder) {
    let _ = responder.reply(request.reply(request.body().clone()));
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.ascii && !load::ASCII_SIZES.contains(&args.size) {
        eprintln!(
            "echo_client: --ascii bodies are {} to {} bytes (their NUL included), not {}",
            load::ASCII_SIZES.start(),
            load::ASCII_SIZES.end(),
            args.size
        );
        return ExitCode::from(2);
    }
    let (conns, depth) = (args.conns as usize, args.depth as usize);
    // The embedded server gets its own transport, as a separate process would.
    let embedded = if args.addr.is_none() {
        let server = Transport::builder()
            .dispatch(Dispatch::IoThread)
            .workers(1)
            .start();
        match server.and_then(|t| t.listen("127.0.0.1:0", echo).map(|a| (t, a))) {
            Ok(pair) => Some(pair),
            Err(e) => {
                eprintln!("echo_client: cannot start the embedded server: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let addr = args
        .addr
        .or(embedded.as_ref().map(|(_, a)| *a))
        .expect("an address");
    // Room for every request in flight, so large bodies meet back-pressure
    // rather than QueueFull.
    let max_outbound = tbnet::DEFAULT_MAX_OUTBOUND.max(2 * depth * (args.size + 16));
    let transport = match Transport::builder().max_outbound(max_outbound).start() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("echo_client: cannot start the transport: {e}");
            return ExitCode::FAILURE;
        }
    };
    let managers = match (0..conns)
        .map(|_| manager(&transport, &args, depth.max(256)).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(managers) => managers,
        Err(e) => {
            eprintln!("echo_client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let run = Arc::new(Run {
        managers,
        addr,
        bodies: if args.ascii {
            Bodies::ascii(args.size)
        } else {
            Bodies::new(args.size)
        },
        deadline: started + Duration::from_secs_f64(args.secs),
        progress: Progress::default(),
        seq: AtomicU64::new(1),
    });

    let reporting = Arc::new(AtomicUsize::new(1));
    let reporter = {
        let run = run.clone();
        let reporting = reporting.clone();
        thread::spawn(move || {
            let mut last = 0;
            let mut ticks = 0u64;
            while reporting.load(Ordering::Relaxed) == 1 {
                thread::park_timeout(Duration::from_secs(1));
                if reporting.load(Ordering::Relaxed) == 0 {
                    break;
                }
                ticks += 1;
                let done = run.progress.done.load(Ordering::Relaxed);
                eprintln!(
                    "[{ticks:>3}s] {done} requests, {} req/s, {} errors",
                    done - last,
                    run.progress.errors.load(Ordering::Relaxed)
                );
                last = done;
            }
        })
    };

    let tally = load::drive(&run, args.mode, depth);
    let elapsed = started.elapsed().as_secs_f64();
    reporting.store(0, Ordering::Relaxed);
    reporter.thread().unpark();
    let _ = reporter.join();
    drop(run);
    transport.stop();
    if let Some((server, _)) = embedded {
        server.stop();
    }

    let requests = tally.ok + tally.errors + tally.mismatches;
    let rps = tally.ok as f64 / elapsed;
    let mb_per_s = rps * args.size as f64 / 1e6;
    let p = |q: f64| tally.latency_us.value_at_quantile(q);
    let mode = args.mode.name();
    if args.json {
        println!(
            "{{\"mode\":\"{mode}\",\"conns\":{},\"depth\":{},\"size\":{},\"secs\":{elapsed:.3},\
             \"requests\":{requests},\"rps\":{rps:.1},\"mb_per_s\":{mb_per_s:.3},\
             \"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{},\"mismatches\":{}}}",
            args.conns,
            args.depth,
            args.size,
            p(0.5),
            p(0.99),
            p(0.999),
            tally.errors,
            tally.mismatches
        );
    } else {
        println!(
            "echo {mode}: {} conns x {} deep, {}-byte bodies, {elapsed:.1} s against {addr}{}",
            args.conns,
            args.depth,
            args.size,
            if args.addr.is_none() {
                " (embedded server)"
            } else {
                ""
            }
        );
        println!("requests   {requests} ({rps:.0} req/s, {mb_per_s:.1} MB/s echoed)");
        println!(
            "latency    p50 {} us, p99 {} us, p999 {} us",
            p(0.5),
            p(0.99),
            p(0.999)
        );
        println!("errors     {}", tally.errors);
        println!("mismatches {}", tally.mismatches);
    }
    if tally.errors > 0 || tally.mismatches > 0 || tally.ok == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
