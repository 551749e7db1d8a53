//! The client inside a tokio application: many tasks awaiting `call_async`
//! (and a declared service's calls) on one shared `ConnectionManager`.
//!
//! ```sh
//! cargo run --example tokio_client                                   # embedded echo server
//! cargo run --example tokio_client -- --addr 127.0.0.1:8765 --tasks 200 --requests 50
//! ```
//!
//! tbnet's futures need no runtime of their own: tokio polls them, and the
//! transport's IO thread wakes the task when its response arrives. Checks
//! every answer and exits 1 if any is wrong; prints `ok` last.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tbnet::codec::Raw;
use tbnet::{service, ConnectionManager, Error, ErrorReply, Packet, Responder, Transport};

service! {
    /// What the embedded server also answers: a typed method next to the
    /// raw echo.
    pub service shout {
        codec = Raw;
        /// The text, upper-cased.
        rpc upper(String) -> String = 7;
    }
}

struct Shout;

impl shout::Service for Shout {
    fn upper(&self, text: String) -> Result<String, ErrorReply> {
        Ok(text.to_uppercase())
    }
}

/// Many tokio tasks awaiting tbnet calls on one shared client.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    /// Echo server to call; absent, an embedded one on 127.0.0.1:0 (which
    /// also serves the typed `upper` method).
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// Concurrent tokio tasks.
    #[arg(long, default_value_t = 100)]
    tasks: usize,
    /// Requests each task awaits, one after another.
    #[arg(long, default_value_t = 20)]
    requests: usize,
}

/// One task: `requests` echo calls, each answer checked.
async fn echo_task(
    manager: Arc<ConnectionManager>,
    addr: SocketAddr,
    task: usize,
    requests: usize,
) -> Result<usize, String> {
    for i in 0..requests {
        let body = format!("task {task} request {i}");
        let future = manager
            .call_async(
                addr,
                Packet::new(0, body.clone()),
                Some(Duration::from_secs(10)),
            )
            .map_err(|e| format!("task {task}: send: {e}"))?;
        let response = future.await.map_err(|e| format!("task {task}: {e}"))?;
        if response.body() != body.as_bytes() {
            return Err(format!("task {task}: got {:?}", response.body()));
        }
    }
    Ok(requests)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let embedded = match args.addr {
        Some(_) => None,
        None => {
            let started = Transport::builder().start().and_then(|server| {
                let router = shout::Service::into_router(Shout).route(
                    0,
                    |request: Packet, responder: Responder| {
                        let _ = responder.reply(request.reply(request.body().clone()));
                    },
                );
                let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
                let addr = server.listen(any, router)?;
                Ok((server, addr))
            });
            match started {
                Ok(pair) => Some(pair),
                Err(e) => {
                    eprintln!("tokio_client: cannot start the embedded server: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let addr = args
        .addr
        .or(embedded.as_ref().map(|(_, addr)| *addr))
        .expect("an address");
    let transport = match Transport::builder().start() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tokio_client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let manager =
        Arc::new(ConnectionManager::new(&transport).with_queue_limit(args.tasks.max(256)));

    let mut handles = Vec::with_capacity(args.tasks);
    for task in 0..args.tasks {
        handles.push(tokio::spawn(echo_task(
            manager.clone(),
            addr,
            task,
            args.requests,
        )));
    }
    let mut answered = 0;
    let mut failure: Option<String> = None;
    for handle in handles {
        match handle.await {
            Ok(Ok(n)) => answered += n,
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(e) => failure = failure.or(Some(format!("task panicked: {e}"))),
        }
    }
    println!(
        "echo    {answered} answers checked from {} tasks",
        args.tasks
    );

    // The typed client is awaited the same way.
    if failure.is_none() && embedded.is_some() {
        let client = shout::Client::new(manager.clone(), addr);
        let calls: Vec<_> = (0..10)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    let text = format!("word {i}");
                    let got: Result<String, Error> = client.upper(&text).await;
                    match got {
                        Ok(upper) if upper == text.to_uppercase() => Ok(()),
                        other => Err(format!("upper {text:?}: {other:?}")),
                    }
                })
            })
            .collect();
        for call in calls {
            match call.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(e) => failure = failure.or(Some(format!("task panicked: {e}"))),
            }
        }
        if failure.is_none() {
            println!("upper   10 typed calls awaited from tasks");
        }
    }

    transport.stop();
    if let Some((server, _)) = embedded {
        server.stop();
    }
    match failure {
        None => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Some(e) => {
            eprintln!("tokio_client: {e}");
            ExitCode::FAILURE
        }
    }
}
