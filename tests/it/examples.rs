//! The echo example pair, driven the way outside tools drive it: by its
//! command-line flags and its `--json` line.

use std::process::Command;

use crate::faults::{example_binary, spawn_echo_server, spawn_listening};
use crate::support::{frame, raw_server, read_frame, send_bytes, within};

/// Runs `echo_client` with `args` and returns its JSON line's fields.
pub fn run_client(args: &[&str]) -> Vec<(String, String)> {
    let (success, fields) = try_client(args);
    assert!(success, "echo_client {args:?} failed: {fields:?}");
    fields
}

/// Runs `echo_client` with `args`: whether it exited 0, and its JSON
/// line's fields.
pub fn try_client(args: &[&str]) -> (bool, Vec<(String, String)>) {
    let output = Command::new(example_binary("echo_client"))
        .args(args)
        .args(["--secs", "0.3", "--json"])
        .output()
        .expect("run the echo_client example");
    let stdout = String::from_utf8(output.stdout).expect("utf-8 output");
    (output.status.success(), json_fields(&stdout))
}

/// The fields of the last line of `stdout`, a flat JSON object.
fn json_fields(stdout: &str) -> Vec<(String, String)> {
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
        .collect::<Vec<_>>()
}

pub fn field<'a>(fields: &'a [(String, String)], key: &str) -> &'a str {
    (fields.iter())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {fields:?}"))
}

/// An `echo_client` run the server refused: it exited non-zero, and its
/// JSON line says every request failed (not a crash or a usage error,
/// which print no such line).
pub fn assert_refused(ok: bool, fields: &[(String, String)]) {
    assert!(!ok, "the client was served: {fields:?}");
    let errors: u64 = field(fields, "errors").parse().unwrap();
    assert!(errors > 0, "{fields:?}");
    assert_eq!(
        field(fields, "requests"),
        errors.to_string(),
        "every request failed"
    );
    assert_eq!(field(fields, "rps"), "0.0");
}

pub fn assert_clean_run(fields: &[(String, String)]) {
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
fn echo_server_admits_only_its_allow_list_and_connection_limit() {
    let (mut closed, addr) = spawn_listening(
        "echo_server",
        &[
            "--addr",
            "127.0.0.1:0",
            "--allow",
            "10.0.0.0/8",
            "--allow",
            "::1",
        ],
    );
    let (ok, fields) = try_client(&["--addr", &addr.to_string()]);
    assert_refused(ok, &fields);
    closed.kill().unwrap();
    closed.wait().unwrap();

    let (mut open, addr) = spawn_listening(
        "echo_server",
        &[
            "--addr",
            "127.0.0.1:0",
            "--allow",
            "127.0.0.0/8",
            "--max-conns",
            "2",
        ],
    );
    let fields = run_client(&["--addr", &addr.to_string(), "--conns", "2"]);
    assert_clean_run(&fields);
    // Two of the three connections are served; the third's requests fail.
    let (ok, fields) = try_client(&["--addr", &addr.to_string(), "--conns", "3"]);
    assert!(!ok, "a third connection was served: {fields:?}");
    let count = |key| field(&fields, key).parse::<u64>().unwrap();
    assert!(count("errors") > 0, "{fields:?}");
    assert!(
        count("requests") > count("errors"),
        "the first two connections were served: {fields:?}"
    );
    assert_eq!(field(&fields, "mismatches"), "0");
    open.kill().unwrap();
    open.wait().unwrap();
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

#[test]
fn echo_client_ascii_against_an_echo_server_process_on_a_tcp_spec() {
    let (mut server, addr) = spawn_listening(
        "echo_server",
        &["--addr", "tcp:127.0.0.1:0", "--workers", "2"],
    );
    let spec = format!("tcp:{addr}");
    for mode in ["call", "future"] {
        let fields = run_client(&[
            "--addr", &spec, "--ascii", "--mode", mode, "--size", "1988", "--depth", "2",
        ]);
        assert_clean_run(&fields);
    }
    server.kill().unwrap();
    server.wait().unwrap();
}

/// What a C++ tbnet echo server answers to `body`: the request's string
/// (cut at its first NUL and at 4095 bytes, byte 21 forced to `'a'`) under
/// packet code 0, without the NUL. `corrupt` alters one more byte, as a
/// broken server would.
fn cpp_echo_reply(body: &[u8], corrupt: bool) -> Vec<u8> {
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let mut reply = body[..end.min(4095)].to_vec();
    if reply.len() > 21 {
        reply[21] = b'a';
    }
    if corrupt {
        reply[5] = b'#';
    }
    reply
}

/// A raw peer acting as the C++ tbnet echo server on one connection, until
/// the client closes it. Returns how many requests it answered, and
/// whether every body was printable ASCII ending in a NUL.
fn cpp_echo_server(
    corrupt: bool,
) -> (std::net::SocketAddr, std::thread::JoinHandle<(usize, bool)>) {
    raw_server(move |mut stream| {
        let (mut answered, mut c_strings) = (0, true);
        while let Ok(request) = read_frame(&mut stream) {
            let (last, text) = request.body.split_last().expect("a non-empty body");
            c_strings &= *last == 0 && text.iter().all(|b| (0x20..0x7f).contains(b));
            let reply = cpp_echo_reply(&request.body, corrupt);
            send_bytes(&mut stream, &frame(request.chid, 0, &reply));
            answered += 1;
        }
        (answered, c_strings)
    })
}

#[test]
fn echo_client_ascii_accepts_a_cpp_style_echo_server() {
    let (addr, peer) = cpp_echo_server(false);
    let addr = addr.to_string();
    let fields = run_client(&[
        "--addr", &addr, "--ascii", "--conns", "1", "--depth", "2", "--size", "100",
    ]);
    assert_clean_run(&fields);
    let (answered, c_strings) = within("C++-style echo peer", move || peer.join().unwrap());
    assert!(answered > 0);
    assert_eq!(field(&fields, "requests"), answered.to_string());
    assert!(c_strings, "every body is a C string of printable ASCII");
}

#[test]
fn echo_client_ascii_catches_an_altered_echo() {
    let (addr, peer) = cpp_echo_server(true);
    let addr = addr.to_string();
    let (success, fields) = try_client(&["--addr", &addr, "--ascii", "--size", "64"]);
    assert!(!success, "an altered echo must fail the run: {fields:?}");
    assert_eq!(field(&fields, "errors"), "0");
    assert_ne!(field(&fields, "mismatches"), "0");
    within("C++-style echo peer", move || peer.join().unwrap());
}

#[test]
fn echo_client_binary_bodies_do_not_pass_a_cpp_style_echo_server() {
    // Without --ascii the binary sequence number holds NUL bytes: the C++
    // server cuts the body there, and the client says so.
    let (addr, peer) = cpp_echo_server(false);
    let addr = addr.to_string();
    let (success, fields) = try_client(&["--addr", &addr, "--size", "64"]);
    assert!(!success, "{fields:?}");
    assert_ne!(field(&fields, "mismatches"), "0");
    within("C++-style echo peer", move || peer.join().unwrap());
}

#[test]
fn echo_client_refuses_ascii_sizes_a_cpp_server_cannot_echo() {
    for size in ["23", "4097"] {
        let output = Command::new(example_binary("echo_client"))
            .args(["--ascii", "--size", size, "--secs", "0.1"])
            .output()
            .expect("run the echo_client example");
        assert_eq!(output.status.code(), Some(2), "--size {size}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("24 to 4096"), "{stderr}");
    }
}

#[test]
fn echo_examples_take_tcp_specs_and_refuse_bad_ones() {
    let (mut server, addr) = spawn_listening(
        "echo_server",
        &["--addr", "tcp:127.0.0.1:0", "--workers", "1"],
    );
    let output = Command::new(example_binary("echo_client"))
        .args(["--addr", &format!("tcp:{addr}"), "--secs", "0.2", "--json"])
        .output()
        .expect("run the echo_client example");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    server.kill().unwrap();
    server.wait().unwrap();
    refuse_bad_specs(&["echo_server", "echo_client"]);
}

/// The kv pair needs feature `serde` (`cargo test --all-features`).
#[cfg(feature = "serde")]
#[test]
fn kv_examples_take_tcp_specs_and_refuse_bad_ones() {
    let (mut server, addr) = spawn_listening(
        "kv_server",
        &["--addr", "tcp:127.0.0.1:0", "--workers", "1"],
    );
    let output = Command::new(example_binary("kv_client"))
        .args(["--addr", &format!("tcp:{addr}"), "--keys", "10"])
        .output()
        .expect("run the kv_client example");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    server.kill().unwrap();
    server.wait().unwrap();
    refuse_bad_specs(&["kv_client", "kv_server"]);
}

/// Each example refuses a spec that is not tcp with clap's usage error.
fn refuse_bad_specs(bins: &[&str]) {
    for bin in bins {
        let output = Command::new(example_binary(bin))
            .args(["--addr", "udp:127.0.0.1:1"])
            .output()
            .expect("run the example");
        assert_eq!(output.status.code(), Some(2), "{bin}: clap's usage error");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("only the tcp protocol"), "{bin}: {stderr}");
    }
}
