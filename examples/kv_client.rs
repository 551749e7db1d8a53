//! A client for `kv_server` that uses every way of waiting: blocking calls,
//! futures, and a `WaitObject` batch; and shows error replies.
//!
//! ```sh
//! cargo run --release --example kv_client                       # embedded server
//! cargo run --release --example kv_client -- --addr 127.0.0.1:8766 --keys 1000
//! ```
//!
//! Checks every answer and exits 1 if any is wrong.

#[path = "common/kv.rs"]
mod kv;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use kv::{Delete, Deleted, Entries, Get, Put, Scan, Stored, Value, BAD_LIMIT, NOT_FOUND};
use tbnet::{ConnectionManager, Error, Message, Transport, WaitObject};

const TIMEOUT: Option<Duration> = Some(Duration::from_secs(5));

fn key(i: usize) -> Bytes {
    Bytes::from(format!("key-{i:06}"))
}

fn value(i: usize) -> Bytes {
    Bytes::from(format!("value of {i}"))
}

struct Unpark(thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls every future to completion on this thread: no runtime needed.
fn join_all<F: Future + Unpin>(mut futures: Vec<F>) -> Vec<F::Output> {
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    while outputs.iter().any(Option::is_none) {
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                if let Poll::Ready(v) = Pin::new(future).poll(&mut cx) {
                    *output = Some(v);
                }
            }
        }
        if outputs.iter().any(Option::is_none) {
            thread::park_timeout(Duration::from_millis(100));
        }
    }
    outputs.into_iter().flatten().collect()
}

fn run(client: &ConnectionManager, addr: SocketAddr, keys: usize) -> Result<(), String> {
    let fail = |what: &str, e: &dyn std::fmt::Debug| format!("{what}: {e:?}");

    // 1. Blocking calls: store every key.
    for i in 0..keys {
        let stored: Stored = client
            .call_message(
                addr,
                &Put {
                    key: key(i),
                    value: value(i),
                },
                TIMEOUT,
            )
            .map_err(|e| fail("put", &e))?;
        if stored.replaced {
            return Err(format!("key {i} was already there"));
        }
    }
    println!("put     {keys} keys with blocking calls");

    // 2. Futures: read ten keys at once.
    let futures = (0..keys.min(10))
        .map(|i| client.call_message_async::<Get, Value>(addr, &Get { key: key(i) }, TIMEOUT))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail("get (future)", &e))?;
    for (i, got) in join_all(futures).into_iter().enumerate() {
        let got = got.map_err(|e| fail("get (future)", &e))?;
        if got.value != value(i) {
            return Err(format!("key {i}: got {:?}", got.value));
        }
    }
    println!("get     {} keys as futures", keys.min(10));

    // 3. A WaitObject batch: fan out to many keys, wait for all.
    let mut wait = WaitObject::new();
    let batch: Vec<usize> = (0..keys).step_by((keys / 20).max(1)).collect();
    for &i in &batch {
        client
            .send_wait(addr, Get { key: key(i) }.to_packet(), TIMEOUT, &mut wait)
            .map_err(|e| fail("get (batch)", &e))?;
    }
    for (&i, result) in batch.iter().zip(wait.wait_all()) {
        let got = result
            .and_then(Value::from_packet)
            .map_err(|e| fail("get (batch)", &e))?;
        if got.value != value(i) {
            return Err(format!("key {i}: got {:?}", got.value));
        }
    }
    println!("get     {} keys in one WaitObject batch", batch.len());

    // 4. Scans, in key order, with a limit.
    let start = keys / 2;
    let entries: Entries = client
        .call_message(
            addr,
            &Scan {
                start: key(start),
                limit: 5,
            },
            TIMEOUT,
        )
        .map_err(|e| fail("scan", &e))?;
    let expected: Vec<_> = (start..keys.min(start + 5))
        .map(|i| (key(i), value(i)))
        .collect();
    if entries.entries != expected {
        return Err(format!("scan from {start}: got {:?}", entries.entries));
    }
    println!(
        "scan    {} entries from {:?}",
        entries.entries.len(),
        key(start)
    );

    // 5. Error replies: a missing key, an excessive limit.
    match client.call_message::<Get, Value>(
        addr,
        &Get {
            key: Bytes::from("missing"),
        },
        TIMEOUT,
    ) {
        Err(Error::Remote {
            code: NOT_FOUND,
            message,
        }) => println!("get     missing key -> error {NOT_FOUND}: {message}"),
        other => return Err(format!("a missing key gave {other:?}")),
    }
    match client.call_message::<Scan, Entries>(
        addr,
        &Scan {
            start: Bytes::new(),
            limit: 5000,
        },
        TIMEOUT,
    ) {
        Err(Error::Remote {
            code: BAD_LIMIT,
            message,
        }) => println!("scan    limit 5000 -> error {BAD_LIMIT}: {message}"),
        other => return Err(format!("an excessive scan gave {other:?}")),
    }

    // 6. Delete, then the key is gone.
    let deleted: Deleted = client
        .call_message(addr, &Delete { key: key(0) }, TIMEOUT)
        .map_err(|e| fail("delete", &e))?;
    let gone = client.call_message::<Get, Value>(addr, &Get { key: key(0) }, TIMEOUT);
    if !deleted.existed
        || !matches!(
            gone,
            Err(Error::Remote {
                code: NOT_FOUND,
                ..
            })
        )
    {
        return Err(format!(
            "delete: existed {}, then get gave {gone:?}",
            deleted.existed
        ));
    }
    println!("delete  {:?}, then get -> not found", key(0));
    Ok(())
}

/// A client for `kv_server` that uses every way of waiting and checks every answer.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Server to use, `HOST:PORT` or tbnet's `tcp:HOST:PORT`; absent, an
    /// embedded kv server on 127.0.0.1:0.
    #[arg(long, value_parser = kv::endpoint)]
    addr: Option<SocketAddr>,
    /// Keys to store, read back and scan.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
}

fn main() -> ExitCode {
    let Args { addr, keys } = Args::parse();
    let keys = keys as usize;
    let embedded = match addr {
        Some(_) => None,
        None => match kv::start("127.0.0.1:0".parse().expect("valid address"), 2, false) {
            Ok(pair) => Some(pair),
            Err(e) => {
                eprintln!("kv_client: cannot start the embedded server: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let addr = addr
        .or(embedded.as_ref().map(|(_, a)| *a))
        .expect("an address");
    let transport = match Transport::builder().start() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("kv_client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client = ConnectionManager::new(&transport);
    let outcome = run(&client, addr, keys);
    transport.stop();
    if let Some((server, _)) = embedded {
        server.stop();
    }
    match outcome {
        Ok(()) => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kv_client: {e}");
            ExitCode::FAILURE
        }
    }
}
