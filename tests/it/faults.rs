//! Faults: dead servers, refused connections, reconnect with backoff, idle
//! and half-open peers, a full worker queue, shutdown with work in flight.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tbnet::{Backoff, ConnectionManager, Error, Packet, Responder, Transport, WhileDown};

use crate::support::*;

/// An example binary, built by plain `cargo test` next to this test binary.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let path = dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run plain `cargo test` (it builds the examples) or `cargo build --example {name}`",
        path.display()
    );
    path
}

/// A child process that is killed (and reaped) when dropped, so a test
/// that fails before it kills its server leaves no process behind.
pub struct Spawned(Child);

impl std::ops::Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // Both fail harmlessly if the test killed and reaped it already.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the example `name` with `args` as a child process; returns it once
/// it printed `listening on ADDR`.
pub fn spawn_listening(name: &str, args: &[&str]) -> (Spawned, SocketAddr) {
    use std::io::{BufRead, BufReader};
    let child = Command::new(example_binary(name))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn the {name} example: {e}"));
    let mut child = Spawned(child);
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the server's first line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("an address");
    (child, addr)
}

/// Starts the `echo_server` example on a free port.
pub fn spawn_echo_server(workers: usize) -> (Spawned, SocketAddr) {
    spawn_listening(
        "echo_server",
        &["--addr", "127.0.0.1:0", "--workers", &workers.to_string()],
    )
}

#[test]
fn killing_the_server_process_ends_every_pending_call() {
    // Held past the kill, so a reconnect finds the port refusing rather than
    // another test's server that the OS gave it to.
    let port = reserve_port();
    let (mut child, addr) = spawn_listening(
        "echo_server",
        &["--addr", &port.addr().to_string(), "--workers", "2"],
    );
    assert_eq!(addr, port.addr());
    let client = transport();
    let manager = Arc::new(ConnectionManager::new(&client).with_queue_limit(100_000));
    // Warm up: the connection is open and the server answers.
    manager
        .call(addr, Packet::new(1, "up?"), Some(NEVER))
        .unwrap();

    let sent = 20_000;
    let recorder = Recorder::new(sent);
    let mut accepted = 0;
    for i in 0..sent {
        let body = vec![b'k'; 512];
        match manager.send(addr, Packet::new(1, body), Some(NEVER), recorder.handler(i)) {
            Ok(()) => accepted += 1,
            Err(refused) => {
                // Once the connection is gone, submissions are refused at
                // once (with the packet back) and their handlers never run.
                assert!(
                    matches!(refused.error(), Error::Disconnected),
                    "{refused:?}"
                );
                break;
            }
        }
        if i == sent / 10 {
            child.kill().unwrap();
        }
    }
    child.wait().unwrap();
    assert!(accepted > sent / 10);
    let ended = recorder.wait_calls(|calls| calls[..accepted].iter().all(|&n| n == 1));
    assert!(ended, "every accepted request ended once");
    let results: Vec<Result<Packet, Error>> = recorder.results_of(accepted);
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert!(failed > 0, "some requests were cut off by the kill");
    for r in &results {
        assert!(
            matches!(r, Ok(_) | Err(Error::Disconnected)),
            "{r:?}: a killed server means a response or Disconnected"
        );
    }
    stop(&client);
    assert!(recorder.calls()[..accepted].iter().all(|&n| n == 1));
    assert!(recorder.calls()[accepted..].iter().all(|&n| n == 0));
    stop(&client);
    drop(port);
}

#[test]
fn a_refused_connection_fails_fast_and_backs_off() {
    // Nobody listens on it, and nobody else can while it is held.
    let closed = reserve_port();
    let addr = closed.addr();
    let client = transport();
    let manager = ConnectionManager::new(&client).with_backoff(Backoff {
        initial: Duration::from_secs(60),
        max: Duration::from_secs(60),
        ..Backoff::default()
    });
    let first = within("a call to a closed port", {
        let client = client.clone();
        move || ConnectionManager::new(&client).call(addr, Packet::new(1, "x"), Some(NEVER))
    });
    assert!(matches!(first, Err(Error::Disconnected)), "{first:?}");

    assert!(matches!(
        manager.call(addr, Packet::new(1, "x"), Some(NEVER)),
        Err(Error::Disconnected)
    ));
    let attempts = client.stats().connections_total;
    // In backoff: no new connect attempt, immediate failure.
    for _ in 0..20 {
        let refused = manager.send(addr, Packet::new(1, "x"), Some(NEVER), |_| {});
        assert!(matches!(
            refused.map_err(|e| e.into_parts().0),
            Err(Error::Disconnected)
        ));
    }
    assert_eq!(client.stats().connections_total, attempts);
    stop(&client);
    drop(closed);
}

#[test]
fn queued_requests_wait_for_the_delayed_reconnect() {
    let port = reserve_port();
    let addr = port.addr();
    let client = transport();
    let manager = ConnectionManager::new(&client)
        .with_backoff(Backoff {
            initial: Duration::from_millis(300),
            max: Duration::from_millis(300),
            ..Backoff::default()
        })
        .with_while_down(WhileDown::Queue);
    assert!(manager
        .call(addr, Packet::new(1, "x"), Some(NEVER))
        .is_err());

    // The server comes (back) up on the port; the queued call rides the
    // delayed reconnect.
    let server = echo_server_on(addr);
    let response = manager
        .call(addr, Packet::new(1, "queued"), Some(NEVER))
        .unwrap();
    assert_eq!(response.body(), "queued");
    stop(&client);
    stop(&server.transport);
    drop(port);
}

#[test]
fn reconnecting_never_sees_the_dead_connections_partial_input() {
    let port = reserve_port();
    let (addr, first) = raw_server_on(port.addr(), |mut stream| {
        let request = read_frame(&mut stream).unwrap();
        // Half a response, then the connection dies.
        let full = frame(request.chid, 1, b"never finished");
        send_bytes(&mut stream, &full[..20]);
    });
    let client = transport();
    let manager = ConnectionManager::new(&client).with_backoff(healthy_once_open());
    let cut = manager.call(addr, Packet::new(1, "a"), Some(NEVER));
    assert!(matches!(cut, Err(Error::Disconnected)), "{cut:?}");
    // The raw server's listener closed with it; a new server takes the port.
    first.join().unwrap();

    let server = echo_server_on(addr);
    let response = manager
        .call(addr, Packet::new(1, "fresh"), Some(NEVER))
        .unwrap();
    assert_eq!(response.body(), "fresh");
    stop(&client);
    stop(&server.transport);
    drop(port);
}

#[test]
fn idle_server_connections_are_closed() {
    let transport = Transport::builder()
        .idle_timeout(Some(Duration::from_millis(200)))
        .timer_tick(Duration::from_millis(20))
        .start()
        .unwrap();
    let addr = transport.listen(loopback(), echo).unwrap();
    let mut idle = raw_client(addr);
    assert!(closed_by_peer(&mut idle), "the idle connection was closed");
    assert!(wait_until(WAIT_LIMIT, || transport.stats().connections == 0));
    stop(&transport);
}

#[test]
fn a_half_open_server_means_timeouts_not_hangs() {
    // Accepts, reads, never answers, never closes.
    let (addr, silent) = raw_server(|mut stream| {
        let _ = read_frame(&mut stream);
        let _ = read_frame(&mut stream);
    });
    let client = Transport::builder()
        .workers(1)
        .tcp_keepalive(Some(Duration::from_secs(1)))
        .start()
        .unwrap();
    let manager = ConnectionManager::new(&client);
    let result = within("a call to a silent server", move || {
        manager.call(addr, Packet::new(1, "anyone?"), Some(SHORT_TIMEOUT))
    });
    assert!(matches!(result, Err(Error::Timeout)), "{result:?}");
    assert_eq!(client.stats().timeouts, 1);
    stop(&client);
    drop(silent);
}

#[test]
fn a_full_worker_queue_pauses_reading_and_drops_nothing() {
    let gate = Gate::default();
    let handled = Arc::new(AtomicUsize::new(0));
    let server = Transport::builder()
        .workers(1)
        .worker_queue(2)
        .start()
        .unwrap();
    let addr = {
        let gate = gate.clone();
        let handled = handled.clone();
        server
            .listen(loopback(), move |request: Packet, responder: Responder| {
                gate.pass();
                handled.fetch_add(1, Ordering::SeqCst);
                echo(request, responder);
            })
            .unwrap()
    };
    let client = transport();
    let manager = ConnectionManager::new(&client).with_queue_limit(1000);
    let n = 500;
    let recorder = Recorder::new(n);
    for i in 0..n {
        manager
            .send(
                addr,
                Packet::new(1, format!("{i}")),
                Some(NEVER),
                recorder.handler(i),
            )
            .unwrap();
    }
    // The single worker is stuck; the queue holds two; the rest waits in
    // TCP buffers because the IO thread stopped reading.
    assert!(wait_until(WAIT_LIMIT, || server.stats().worker_queue == 2));
    assert_eq!(handled.load(Ordering::SeqCst), 0);
    gate.open();
    recorder.wait_all_called();
    for (i, result) in recorder.results().into_iter().enumerate() {
        assert_eq!(result.unwrap().body(), format!("{i}").as_bytes());
    }
    assert_eq!(handled.load(Ordering::SeqCst), n);
    // Every request counted into the queue was counted out of it.
    assert!(wait_until(WAIT_LIMIT, || server.stats().worker_queue == 0));
    stop(&client);
    stop(&server);
}

#[test]
fn replies_produced_during_shutdown_are_flushed_within_the_grace_period() {
    let server = Transport::builder()
        .shutdown_grace(Duration::from_secs(10))
        .start()
        .unwrap();
    let received = Gate::default();
    let addr = {
        let handle = server.clone();
        let received = received.clone();
        server
            .listen(loopback(), move |request: Packet, responder: Responder| {
                received.open();
                // Reply only once the transport is stopping.
                assert!(wait_until(WAIT_LIMIT, || handle.is_stopped()));
                echo(request, responder);
            })
            .unwrap()
    };
    let client = transport();
    let manager = ConnectionManager::new(&client);
    let future = manager
        .call_async(addr, Packet::new(1, "last words"), Some(NEVER))
        .unwrap();
    received.pass();
    stop(&server);
    let response = within("the reply sent during shutdown", move || {
        tokio_test::block_on(future)
    });
    assert_eq!(response.unwrap().body(), "last words");
    stop(&client);
}
