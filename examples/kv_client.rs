//! A client for `kv_server` through the client that `service!` generated:
//! blocking calls, futures, callbacks, and a `WaitObject` batch of packets
//! built with the service's codec; and shows error replies.
//!
//! ```sh
//! cargo run --release --features serde --example kv_client                       # embedded server
//! cargo run --release --features serde --example kv_client -- --addr 127.0.0.1:8766 --keys 1000
//! ```
//!
//! Checks every answer and exits 1 if any is wrong.

#[path = "common/kv.rs"]
mod kv;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::Duration;

use clap::Parser;
use kv::{store, Delete, Get, Put, Scan, Value, BAD_LIMIT, NOT_FOUND};
use tbnet::codec::{Codec, Postcard};
use tbnet::{ConnectionManager, Error, Transport, WaitObject};

const TIMEOUT: Duration = Duration::from_secs(5);

fn key(i: usize) -> String {
    format!("key-{i:06}")
}

fn value(i: usize) -> String {
    format!("value of {i}")
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

fn run(manager: &ConnectionManager, addr: SocketAddr, keys: usize) -> Result<(), String> {
    let fail = |what: &str, e: &dyn std::fmt::Debug| format!("{what}: {e:?}");
    let client = store::Client::new(manager, addr);

    // 1. Blocking calls: store every key.
    for i in 0..keys {
        let put = Put {
            key: key(i),
            value: value(i),
        };
        let stored = (client.put(&put).timeout(TIMEOUT).wait()).map_err(|e| fail("put", &e))?;
        if stored.replaced {
            return Err(format!("key {i} was already there"));
        }
    }
    println!("put     {keys} keys with blocking calls");

    // 2. Futures: read ten keys at once.
    let futures = (0..keys.min(10))
        .map(|i| client.get(&Get { key: key(i) }).timeout(TIMEOUT).future())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail("get (future)", &e))?;
    for (i, got) in join_all(futures).into_iter().enumerate() {
        let got = got.map_err(|e| fail("get (future)", &e))?;
        if got.value != value(i) {
            return Err(format!("key {i}: got {:?}", got.value));
        }
    }
    println!("get     {} keys as futures", keys.min(10));

    // 3. Callbacks: each answer arrives on a worker thread.
    let (tx, rx) = mpsc::channel();
    let some: Vec<usize> = (0..keys).step_by((keys / 10).max(1)).collect();
    for &i in &some {
        let tx = tx.clone();
        (client.get(&Get { key: key(i) }).timeout(TIMEOUT))
            .then(move |result| drop(tx.send((i, result))))
            .map_err(|e| fail("get (callback)", &e))?;
    }
    for _ in &some {
        let (i, result) = rx
            .recv_timeout(TIMEOUT * 2)
            .map_err(|e| fail("get (callback)", &e))?;
        let got = result.map_err(|e| fail("get (callback)", &e))?;
        if got.value != value(i) {
            return Err(format!("key {i}: got {:?}", got.value));
        }
    }
    println!("get     {} keys with callbacks", some.len());

    // 4. A WaitObject batch of packets built with the service's codec and
    //    codes: fan out to many keys, wait for all.
    let mut wait = WaitObject::new();
    let batch: Vec<usize> = (0..keys).step_by((keys / 20).max(1)).collect();
    for &i in &batch {
        let packet = Postcard::to_packet(store::codes::get, &Get { key: key(i) })
            .map_err(|e| fail("get (batch)", &e))?;
        manager
            .send_wait(addr, packet, Some(TIMEOUT), &mut wait)
            .map_err(|e| fail("get (batch)", &e))?;
    }
    for (&i, result) in batch.iter().zip(wait.wait_all()) {
        let got: Value = result
            .and_then(Postcard::from_packet)
            .map_err(|e| fail("get (batch)", &e))?;
        if got.value != value(i) {
            return Err(format!("key {i}: got {:?}", got.value));
        }
    }
    println!("get     {} keys in one WaitObject batch", batch.len());

    // 5. Scans, in key order, with a limit.
    let start = keys / 2;
    let scan = Scan {
        start: key(start),
        limit: 5,
    };
    let entries = (client.scan(&scan).timeout(TIMEOUT).wait()).map_err(|e| fail("scan", &e))?;
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

    // 6. Error replies: a missing key, an excessive limit.
    let missing = Get {
        key: "missing".into(),
    };
    match client.get(&missing).timeout(TIMEOUT).wait() {
        Err(Error::Remote {
            code: NOT_FOUND,
            message,
        }) => println!("get     missing key -> error {NOT_FOUND}: {message}"),
        other => return Err(format!("a missing key gave {other:?}")),
    }
    let huge = Scan {
        start: String::new(),
        limit: 5000,
    };
    match client.scan(&huge).timeout(TIMEOUT).wait() {
        Err(Error::Remote {
            code: BAD_LIMIT,
            message,
        }) => println!("scan    limit 5000 -> error {BAD_LIMIT}: {message}"),
        other => return Err(format!("an excessive scan gave {other:?}")),
    }

    // 7. Delete, then the key is gone.
    let deleted = (client
        .delete(&Delete { key: key(0) })
        .timeout(TIMEOUT)
        .wait())
    .map_err(|e| fail("delete", &e))?;
    let gone = client.get(&Get { key: key(0) }).timeout(TIMEOUT).wait();
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
#[command(version, args_override_self = true)]
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
