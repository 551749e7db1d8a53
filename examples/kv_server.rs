//! A small in-memory key-value server: typed messages, a router, error
//! replies, and the worker pool.
//!
//! ```sh
//! cargo run --release --example kv_server -- --addr 127.0.0.1:8766 --workers 4 --status
//! ```
//!
//! Serves `Get`, `Put`, `Delete` and `Scan` (see `examples/common/kv.rs`).
//! A missing key is an error reply with code 404, a scan over 1000 entries
//! one with code 400. `--status` also answers `curl http://ADDR/status`.
//! `-v` logs every request's life at debug level. Prints `listening on ADDR`
//! once ready and serves until killed.

#[path = "common/kv.rs"]
mod kv;

use std::net::SocketAddr;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut addr: SocketAddr = "127.0.0.1:8766".parse().expect("valid default address");
    let mut workers = 4;
    let mut status = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let parsed = match flag.as_str() {
            "--addr" => value()
                .and_then(|v| v.parse().map_err(|e| format!("--addr: {e}")))
                .map(|a| addr = a),
            "--workers" => value()
                .and_then(|v| v.parse().map_err(|e| format!("--workers: {e}")))
                .map(|n| workers = n),
            "--status" => {
                status = true;
                Ok(())
            }
            "-v" | "--verbose" => {
                tracing_subscriber::fmt()
                    .with_max_level(tracing::Level::DEBUG)
                    .with_writer(std::io::stderr)
                    .init();
                Ok(())
            }
            other => Err(format!("unknown argument {other}")),
        };
        if let Err(e) = parsed {
            return usage(&e);
        }
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

fn usage(error: &str) -> ExitCode {
    eprintln!(
        "kv_server: {error}\nusage: kv_server [--addr HOST:PORT] [--workers N] [--status] [-v]"
    );
    ExitCode::from(2)
}
