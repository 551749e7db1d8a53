//! The echo example pair, driven the way outside tools drive it: by its
//! command-line flags and its `--json` line.

use std::process::Command;

#[cfg(feature = "serde")]
use crate::faults::spawn_listening;
use crate::faults::{example_binary, spawn_echo_server};

/// Runs `echo_client` with `args` and returns its JSON line's fields.
fn run_client(args: &[&str]) -> Vec<(String, String)> {
    let output = Command::new(example_binary("echo_client"))
        .args(args)
        .args(["--secs", "0.3", "--json"])
        .output()
        .expect("run the echo_client example");
    let stdout = String::from_utf8(output.stdout).expect("utf-8 output");
    assert!(
        output.status.success(),
        "echo_client {args:?} failed: {stdout}"
    );
    let line = stdout.lines().last().expect("one JSON line");
    let inner = line
        .strip_prefix('{')
        .and_then(|l| l.strip_suffix('}'))
        .unwrap_or_else(|| panic!("not a JSON object: {line}"));
    inner
        .split(',')
        .map(|pair| {
            let (key, value) = pair.split_once(':').expect("key:value");
            (
                key.trim_matches('"').to_string(),
                value.trim_matches('"').to_string(),
            )
        })
        .collect()
}

fn field<'a>(fields: &'a [(String, String)], key: &str) -> &'a str {
    (fields.iter())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {fields:?}"))
}

fn assert_clean_run(fields: &[(String, String)]) {
    assert_eq!(field(fields, "errors"), "0");
    assert_eq!(field(fields, "mismatches"), "0");
    let rps: f64 = field(fields, "rps").parse().unwrap();
    assert!(rps > 0.0, "no request succeeded: {fields:?}");
    let p50: u64 = field(fields, "p50_us").parse().unwrap();
    let p99: u64 = field(fields, "p99_us").parse().unwrap();
    assert!(p50 > 0 && p50 <= p99);
}

#[test]
fn echo_client_with_its_embedded_server_in_every_mode() {
    for mode in ["call", "callback", "future"] {
        let fields = run_client(&[
            "--mode", mode, "--conns", "2", "--depth", "4", "--size", "100",
        ]);
        assert_eq!(field(&fields, "mode"), mode);
        assert_clean_run(&fields);
    }
}

#[test]
fn echo_client_against_an_echo_server_process() {
    for workers in ["0", "2"] {
        let (mut server, addr) = spawn_echo_server(workers.parse().unwrap());
        let addr = addr.to_string();
        let fields = run_client(&[
            "--addr", &addr, "--conns", "3", "--depth", "2", "--size", "5000",
        ]);
        assert_clean_run(&fields);
        server.kill().unwrap();
        server.wait().unwrap();
    }
}

#[cfg(feature = "serde")]
#[test]
fn kv_client_with_its_embedded_server() {
    let output = Command::new(example_binary("kv_client"))
        .args(["--keys", "200"])
        .output()
        .expect("run the kv_client example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "kv_client failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("in one WaitObject batch"));
    assert!(stdout.lines().last() == Some("ok"), "{stdout}");
}

#[cfg(feature = "serde")]
#[test]
fn kv_client_against_a_kv_server_process() {
    let (mut server, addr) =
        spawn_listening("kv_server", &["--addr", "127.0.0.1:0", "--workers", "2"]);
    let output = Command::new(example_binary("kv_client"))
        .args(["--addr", &addr.to_string(), "--keys", "50"])
        .output()
        .expect("run the kv_client example");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn tokio_client_with_many_tasks_checks_every_answer() {
    let output = Command::new(example_binary("tokio_client"))
        .args(["--tasks", "50", "--requests", "10"])
        .output()
        .expect("run the tokio_client example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "tokio_client failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("echo    500 answers checked from 50 tasks"),
        "{stdout}"
    );
    assert!(
        stdout.contains("upper   10 typed calls awaited"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().last(), Some("ok"), "{stdout}");
}

#[test]
fn tokio_client_against_an_echo_server_process() {
    let (mut server, addr) = spawn_echo_server(2);
    let output = Command::new(example_binary("tokio_client"))
        .args([
            "--addr",
            &addr.to_string(),
            "--tasks",
            "20",
            "--requests",
            "5",
        ])
        .output()
        .expect("run the tokio_client example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("echo    100 answers checked from 20 tasks"),
        "{stdout}"
    );
    server.kill().unwrap();
    server.wait().unwrap();
}
