//! tbnet echo server: answers every request with its own packet code and body.
//!
//! ```sh
//! cargo run --release --example echo_server -- --addr 127.0.0.1:8765 --workers 0
//! cargo run --release --example echo_server -- --addr tcp:127.0.0.1:8765
//! ```
//!
//! `--workers N` handles requests on N worker threads; `--workers 0` (the
//! default) handles them on the IO thread. `--ordered` (with `--workers N`)
//! handles each connection's requests in arrival order, connections in
//! parallel. `--status` also answers
//! `curl http://ADDR/status` (JSON), `/metrics` (Prometheus) and `/` (a live
//! dashboard for a browser) on the same
//! port. `-v` logs each request's life at debug level. Prints
//! `listening on ADDR` once ready and serves until killed.
//!
//! Admission: `--allow CIDR` (repeatable) admits only those peers,
//! `--max-conns N` at most N connections at once. TLS (built with
//! `--features tls`): `--tls-cert PATH --tls-key PATH` serve TLS with that
//! PEM certificate chain and key; `--tls-client-ca PATH` also requires
//! client certificates issued by that CA.
//!
//! ```sh
//! cargo run --release --features tls --example echo_server -- \
//!     --tls-cert server.pem --tls-key server.key --allow 127.0.0.0/8
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tbnet::{AllowList, Cidr, Dispatch, ListenOptions, Packet, Responder, ToEndpoint, Transport};

/// tbnet echo server: answers every request with its own packet code and body.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    /// Address to listen on, `HOST:PORT` or tbnet's `tcp:HOST:PORT`.
    #[arg(long, default_value = "127.0.0.1:8765", value_parser = endpoint)]
    addr: SocketAddr,
    /// Worker threads that handle requests; 0 handles them on the IO thread.
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Handle each connection's requests one after another in arrival
    /// order, replies leaving in that order, while connections run in
    /// parallel on the workers (`Dispatch::Ordered`). With `--workers 0`
    /// the IO thread already handles them in order.
    #[arg(long)]
    ordered: bool,
    /// Also answer HTTP `GET /` (dashboard), `/status` (JSON) and `/metrics` (Prometheus) on the same port.
    #[arg(long)]
    status: bool,
    /// Log each request's life at debug level (to stderr).
    #[arg(short, long)]
    verbose: bool,
    /// Admit only peers in this address range (`10.0.0.0/8`, `::1`); repeatable. Default: everyone.
    #[arg(long = "allow", value_name = "CIDR")]
    allow: Vec<Cidr>,
    /// Most connections open at once; one more is closed at accept.
    #[arg(long = "max-conns", value_name = "N")]
    max_conns: Option<usize>,
    /// Serve TLS with this PEM certificate chain (needs `--tls-key`; feature `tls`).
    #[arg(long = "tls-cert", value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long = "tls-key", value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates issued by the CA in this PEM file (mutual TLS).
    #[arg(long = "tls-client-ca", value_name = "PATH", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

/// The listener's settings from the command line.
fn listen_options(args: &Args) -> Result<ListenOptions, String> {
    let mut options = ListenOptions::new().allow(args.allow.iter().copied().collect::<AllowList>());
    if let Some(n) = args.max_conns {
        options = options.max_connections(n);
    }
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => tls(options, cert, key, args.tls_client_ca.as_deref()),
        _ => Ok(options),
    }
}

#[cfg(feature = "tls")]
fn tls(
    options: ListenOptions,
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> Result<ListenOptions, String> {
    let tls = tbnet::TlsServerConfig::from_pem_files(cert, key, client_ca)
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
    Ok(options.tls(tls))
}

#[cfg(not(feature = "tls"))]
fn tls(
    _: ListenOptions,
    _: &std::path::Path,
    _: &std::path::Path,
    _: Option<&std::path::Path>,
) -> Result<ListenOptions, String> {
    Err("built without TLS: rebuild with `--features tls`".into())
}

/// `HOST:PORT` or `tcp:HOST:PORT`, resolved once.
fn endpoint(s: &str) -> Result<SocketAddr, String> {
    s.to_endpoint().map_err(|e| e.to_string())
}

fn echo(request: Packet, responder: Responder) {
    let response = request.reply(request.body().clone());
    // A client that went away cannot be answered; nothing else to do.
    let _ = responder.reply(response);
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.verbose {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(std::io::stderr)
            .init();
    }
    let dispatch = match (args.workers, args.ordered) {
        (0, _) => Dispatch::IoThread,
        (_, true) => Dispatch::Ordered,
        (_, false) => Dispatch::Workers,
    };
    let options = match listen_options(&args) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("echo_server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let transport = match Transport::builder()
        .workers(args.workers.max(1))
        .dispatch(dispatch)
        .status_page(args.status)
        .start()
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("echo_server: cannot start the transport: {e}");
            return ExitCode::FAILURE;
        }
    };
    match transport.listen_with_options(args.addr, echo, options) {
        Ok(local) => println!("listening on {local}"),
        Err(e) => {
            eprintln!("echo_server: cannot listen on {}: {e}", args.addr);
            return ExitCode::FAILURE;
        }
    }
    transport.wait();
    ExitCode::SUCCESS
}
