//! tbnet echo server: answers every request with its own packet code and body.
//!
//! ```sh
//! cargo run --release --example echo_server -- --addr 127.0.0.1:8765 --workers 0
//! ```
//!
//! `--workers N` handles requests on N worker threads; `--workers 0` (the
//! default) handles them on the IO thread. `--status` also answers
//! `curl http://ADDR/status` (JSON) and `/metrics` (Prometheus) on the same
//! port. `-v` logs each request's life at debug level. Prints
//! `listening on ADDR` once ready and serves until killed.

use std::net::SocketAddr;
use std::process::ExitCode;

use tbnet::{Dispatch, Packet, Responder, Transport};

struct Args {
    addr: SocketAddr,
    workers: usize,
    status: bool,
    verbose: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: "127.0.0.1:8765".parse().expect("valid default address"),
        workers: 0,
        status: false,
        verbose: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => args.addr = value()?.parse().map_err(|e| format!("--addr: {e}"))?,
            "--workers" => {
                args.workers = value()?.parse().map_err(|e| format!("--workers: {e}"))?
            }
            "--status" => args.status = true,
            "-v" | "--verbose" => args.verbose = true,
            "-h" | "--help" => {
                println!("usage: echo_server [--addr HOST:PORT] [--workers N] [--status] [-v]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn echo(request: Packet, responder: Responder) {
    let response = request.reply(request.body().clone());
    // A client that went away cannot be answered; nothing else to do.
    let _ = responder.reply(response);
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("echo_server: {e}");
            return ExitCode::from(2);
        }
    };
    if args.verbose {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(std::io::stderr)
            .init();
    }
    let dispatch = if args.workers == 0 {
        Dispatch::IoThread
    } else {
        Dispatch::Workers
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
