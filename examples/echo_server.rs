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
//! `curl http://ADDR/status` (JSON) and `/metrics` (Prometheus) on the same
//! port. `-v` logs each request's life at debug level. Prints
//! `listening on ADDR` once ready and serves until killed.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use tbnet::{Dispatch, Packet, Responder, ToEndpoint, Transport};

/// tbnet echo server: answers every request with its own packet code and body.
#[derive(Parser, Debug)]
#[command(version)]
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
    /// Also answer HTTP `GET /status` (JSON) and `/metrics` (Prometheus) on the same port.
    #[arg(long)]
    status: bool,
    /// Log each request's life at debug level (to stderr).
    #[arg(short, long)]
    verbose: bool,
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
    match transport.listen(args.addr, echo) {
        Ok(local) => println!("listening on {local}"),
        Err(e) => {
            eprintln!("echo_server: cannot listen on {}: {e}", args.addr);
            return ExitCode::FAILURE;
        }
    }
    transport.wait();
    ExitCode::SUCCESS
}
