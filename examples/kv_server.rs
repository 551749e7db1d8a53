//! A small in-memory key-value server: a service declared with
//! `tbnet::service!` (serde bodies), error replies, and the worker pool.
//!
//! ```sh
//! cargo run --release --features serde --example kv_server -- --addr 127.0.0.1:8766 --workers 4 --status
//! ```
//!
//! Serves `Get`, `Put`, `Delete` and `Scan` (see `examples/common/kv.rs`).
//! A missing key is an error reply with code 404, a scan over 1000 entries
//! one with code 400. `--status` also answers `curl http://ADDR/status`.
//! `GET /` on the same port is a live dashboard, `/metrics` has per-method
//! latency histograms. `-v` logs every request's life at debug level. Prints `listening on ADDR`
//! once ready and serves until killed.

#[path = "common/kv.rs"]
mod kv;

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

/// A small in-memory key-value server on tbnet.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    /// Address to listen on, `HOST:PORT` or tbnet's `tcp:HOST:PORT`.
    #[arg(long, default_value = "127.0.0.1:8766", value_parser = kv::endpoint)]
    addr: SocketAddr,
    /// Worker threads that handle requests.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Also answer HTTP `GET /` (dashboard), `/status` (JSON) and `/metrics` (Prometheus) on the same port.
    #[arg(long)]
    status: bool,
    /// Log each request's life at debug level (to stderr).
    #[arg(short, long)]
    verbose: bool,
}

fn main() -> ExitCode {
    let Args {
        addr,
        workers,
        status,
        verbose,
    } = Args::parse();
    if verbose {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(std::io::stderr)
            .init();
    }
    match kv::start(addr, workers, status) {
        Ok((transport, local)) => {
            println!("listening on {local}");
            transport.wait();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kv_server: cannot serve on {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}
