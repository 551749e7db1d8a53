//! The load driver the peers' echo clients share: `conns` connections, each
//! with `depth` tasks sending one request after another for `secs`, every
//! answer checked byte for byte, latencies in an HDR histogram; one JSON
//! line out, in the shape of tbnet's `echo_client --json`.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// The flags every peer client takes (the names of tbnet's `echo_client`).
#[derive(clap::Parser, Debug, Clone)]
pub struct ClientArgs {
    /// Server to drive.
    #[arg(long)]
    pub addr: SocketAddr,
    /// Connections.
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    pub depth: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    pub secs: f64,
    /// Print one JSON line (always on; kept for the same command lines).
    #[arg(long)]
    pub json: bool,
}

/// The flags every peer server takes.
#[derive(clap::Parser, Debug, Clone)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub addr: SocketAddr,
}

/// A body of `size` bytes, different per task so mix-ups show.
pub fn body(size: usize, seed: usize) -> Vec<u8> {
    (0..size).map(|i| (i + seed) as u8).collect()
}

struct Tally {
    ok: u64,
    errors: u64,
    mismatches: u64,
    latency_us: Histogram<u64>,
}

/// Runs the load: `connect` opens one connection's client, `call` sends one
/// body on it and returns the answer. Prints the JSON line.
pub async fn drive<C, Mk, MkFut, Call, CallFut>(
    stack: &str,
    args: &ClientArgs,
    connect: Mk,
    call: Call,
) where
    C: Clone + Send + 'static,
    Mk: Fn(SocketAddr) -> MkFut,
    MkFut: Future<Output = Result<C, String>>,
    Call: Fn(C, Vec<u8>) -> CallFut + Clone + Send + 'static,
    CallFut: Future<Output = Result<Vec<u8>, String>> + Send,
{
    let mut clients = Vec::with_capacity(args.conns);
    for _ in 0..args.conns {
        match connect(args.addr).await {
            Ok(client) => clients.push(client),
            Err(e) => {
                eprintln!("{stack}: cannot connect to {}: {e}", args.addr);
                std::process::exit(1);
            }
        }
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.secs);
    let mut tasks = Vec::new();
    for (c, client) in clients.into_iter().enumerate() {
        for d in 0..args.depth {
            let client = client.clone();
            let call = call.clone();
            let body = body(args.size, c * 131 + d);
            tasks.push(tokio::spawn(async move {
                let mut tally = Tally {
                    ok: 0,
                    errors: 0,
                    mismatches: 0,
                    latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
                };
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    match call(client.clone(), body.clone()).await {
                        Ok(answer) if answer == body => {
                            tally.ok += 1;
                            let us = sent.elapsed().as_micros() as u64;
                            let _ = tally.latency_us.record(us.max(1));
                        }
                        Ok(_) => tally.mismatches += 1,
                        Err(_) => tally.errors += 1,
                    }
                }
                tally
            }));
        }
    }
    let mut total = Tally {
        ok: 0,
        errors: 0,
        mismatches: 0,
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
    };
    for task in tasks {
        let tally = task.await.expect("a load task panicked");
        total.ok += tally.ok;
        total.errors += tally.errors;
        total.mismatches += tally.mismatches;
        total
            .latency_us
            .add(&tally.latency_us)
            .expect("same bounds");
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"stack\":\"{stack}\",\"conns\":{},\"depth\":{},\"size\":{},\"secs\":{secs:.2},\"requests\":{},\"rps\":{:.0},\"p50_us\":{},\"p99_us\":{},\"errors\":{},\"mismatches\":{}}}",
        args.conns,
        args.depth,
        args.size,
        total.ok,
        total.ok as f64 / secs,
        total.latency_us.value_at_quantile(0.5),
        total.latency_us.value_at_quantile(0.99),
        total.errors,
        total.mismatches,
    );
    if total.errors + total.mismatches > 0 {
        std::process::exit(1);
    }
}
