//! TLS (feature `tls`): the same frames inside, the same three ways of
//! waiting, reconnects and timeouts as on TCP; mutual TLS; certificates
//! that must be refused; hostile peers. Certificates are made at test time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tbnet::{
    ConnectionEvent, ConnectionHandle, ConnectionManager, Error, ListenOptions, Packet, Responder,
    TlsClientConfig, TlsServerConfig, Transport, WaitObject,
};

use crate::support::*;

/// A certificate authority made for one test.
struct Ca {
    cert: Certificate,
    key: KeyPair,
}

/// A certificate and its key, PEM.
struct Issued {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn pem(&self) -> Vec<u8> {
        self.cert.pem().into_bytes()
    }

    fn issue(&self, name: &str, usage: ExtendedKeyUsagePurpose, expired: bool) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn server(&self) -> Issued {
        self.issue("localhost", ExtendedKeyUsagePurpose::ServerAuth, false)
    }

    fn client(&self) -> Issued {
        self.issue("client", ExtendedKeyUsagePurpose::ClientAuth, false)
    }
}

fn tls_server_on(addr: SocketAddr, tls: TlsServerConfig) -> Server {
    tls_server_with(addr, tls, tbnet::DEFAULT_HANDSHAKE_TIMEOUT)
}

/// A TLS echo server whose handshakes must end within `handshake`.
fn tls_server_with(addr: SocketAddr, tls: TlsServerConfig, handshake: Duration) -> Server {
    let transport = Transport::builder()
        .workers(2)
        .handshake_timeout(handshake)
        .start()
        .unwrap();
    let addr = transport
        .listen_with_options(addr, echo, ListenOptions::new().tls(tls))
        .unwrap();
    Server { transport, addr }
}

fn tls_server(ca: &Ca) -> Server {
    let issued = ca.server();
    let tls = TlsServerConfig::new(issued.cert.as_bytes(), issued.key.as_bytes()).unwrap();
    tls_server_on(loopback(), tls)
}

fn tls_client(transport: &Transport, ca: &Ca, name: &str) -> Arc<ConnectionManager> {
    let tls = TlsClientConfig::new(&ca.pem(), name).unwrap();
    Arc::new(ConnectionManager::new(transport).with_tls(tls))
}

#[test]
fn the_three_ways_of_waiting_work_over_tls() {
    let ca = Ca::new("test CA");
    let server = tls_server(&ca);
    let client_transport = transport();
    let client = tls_client(&client_transport, &ca, "localhost");

    let (recorder, future, blocking) = one_request_each_way(&client, server.addr);
    recorder.wait_all_called();
    assert_eq!(recorder.results()[0].as_ref().unwrap().body(), "callback");
    let response = tokio_test::block_on(future).unwrap();
    assert_eq!(response.body(), "future");
    assert_eq!(blocking.join().unwrap().unwrap().body(), "blocking");

    // A burst larger than TLS records and session buffers, gathered.
    let big = vec![b'x'; 200_000];
    let mut wait = WaitObject::new();
    for i in 0..20u8 {
        let mut body = big.clone();
        body[0] = i;
        client
            .send_wait(server.addr, Packet::new(2, body), Some(NEVER), &mut wait)
            .unwrap();
    }
    for (i, result) in wait.wait_all().into_iter().enumerate() {
        let body = result.unwrap().into_body();
        assert_eq!((body.len(), body[0]), (big.len(), i as u8));
    }
    // Inside TLS the frames are tbnet's; on the wire they are not.
    let stats = server.transport.stats();
    assert_eq!(stats.packets_in, 23);
    assert_eq!(stats.handshake_failures, 0);
    stop(&client_transport);
    stop(&server.transport);
}

#[test]
fn mutual_tls_admits_certificate_holders_only() {
    let ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let stranger_ca = Ca::new("stranger CA");
    let issued = ca.server();
    let tls = TlsServerConfig::mutual(
        issued.cert.as_bytes(),
        issued.key.as_bytes(),
        &client_ca.pem(),
    )
    .unwrap();
    let server = tls_server_on(loopback(), tls);
    let client_transport = transport();

    let holder = client_ca.client();
    let with_cert = TlsClientConfig::with_client_cert(
        &ca.pem(),
        "localhost",
        holder.cert.as_bytes(),
        holder.key.as_bytes(),
    )
    .unwrap();
    let admitted = ConnectionManager::new(&client_transport).with_tls(with_cert);
    let reply = admitted
        .call(server.addr, Packet::new(1, "let me in"), Some(NEVER))
        .unwrap();
    assert_eq!(reply.body(), "let me in");

    let no_cert = tls_client(&client_transport, &ca, "localhost");
    let refused = no_cert.call(server.addr, Packet::new(1, "no cert"), Some(NEVER));
    assert!(matches!(refused, Err(Error::Disconnected)), "{refused:?}");

    let stranger = stranger_ca.client();
    let wrong_ca = TlsClientConfig::with_client_cert(
        &ca.pem(),
        "localhost",
        stranger.cert.as_bytes(),
        stranger.key.as_bytes(),
    )
    .unwrap();
    let wrong = ConnectionManager::new(&client_transport).with_tls(wrong_ca);
    let refused = wrong.call(server.addr, Packet::new(1, "stranger"), Some(NEVER));
    assert!(matches!(refused, Err(Error::Disconnected)), "{refused:?}");

    assert!(wait_until(WAIT_LIMIT, || server
        .transport
        .stats()
        .handshake_failures
        == 2));
    assert_eq!(
        server.transport.stats().packets_in,
        1,
        "only the holder got in"
    );
    // The holder's connection is untouched.
    let reply = admitted
        .call(server.addr, Packet::new(1, "still in"), Some(NEVER))
        .unwrap();
    assert_eq!(reply.body(), "still in");
    stop(&client_transport);
    stop(&server.transport);
}

/// A client of `server` that expects `name` and trusts `ca` fails its
/// call, counting a failed handshake, and the server handles nothing.
fn assert_refused_by_client(server: &Server, ca: &Ca, name: &str) {
    let client_transport = transport();
    let client = tls_client(&client_transport, ca, name);
    let result = client.call(server.addr, Packet::new(1, "hello?"), Some(NEVER));
    assert!(matches!(result, Err(Error::Disconnected)), "{result:?}");
    assert_eq!(client_transport.stats().handshake_failures, 1);
    assert_eq!(server.transport.stats().packets_in, 0);
    stop(&client_transport);
}

#[test]
fn a_certificate_for_another_name_is_refused() {
    let ca = Ca::new("test CA");
    let server = tls_server(&ca);
    assert_refused_by_client(&server, &ca, "other.example");
    stop(&server.transport);
}

#[test]
fn an_expired_certificate_is_refused() {
    let ca = Ca::new("test CA");
    let expired = ca.issue("localhost", ExtendedKeyUsagePurpose::ServerAuth, true);
    let tls = TlsServerConfig::new(expired.cert.as_bytes(), expired.key.as_bytes()).unwrap();
    let server = tls_server_on(loopback(), tls);
    assert_refused_by_client(&server, &ca, "localhost");
    stop(&server.transport);
}

#[test]
fn an_untrusted_ca_is_refused() {
    let ca = Ca::new("real CA");
    let other = Ca::new("other CA");
    let server = tls_server(&ca);
    assert_refused_by_client(&server, &other, "localhost");
    stop(&server.transport);
}

#[test]
fn bad_pem_is_a_configuration_error() {
    let ca = Ca::new("test CA");
    let issued = ca.server();
    // Every refusal is the documented `Io(InvalidInput)`.
    let invalid_input = |result: Result<(), Error>, what: &str| match result {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{what}"),
        other => panic!("{what}: {other:?}"),
    };
    let other = ca.client();
    invalid_input(
        TlsServerConfig::new(b"not pem", issued.key.as_bytes()).map(drop),
        "no certificate",
    );
    invalid_input(
        TlsServerConfig::new(issued.cert.as_bytes(), b"").map(drop),
        "no key",
    );
    invalid_input(
        TlsServerConfig::new(issued.cert.as_bytes(), other.key.as_bytes()).map(drop),
        "a key that does not match the certificate",
    );
    invalid_input(TlsClientConfig::new(b"", "localhost").map(drop), "no CA");
    invalid_input(
        TlsClientConfig::new(&ca.pem(), "not a name!").map(drop),
        "not a server name",
    );
}

/// A raw TLS client (rustls over a blocking socket), trusting `ca`.
fn raw_tls_client(
    addr: SocketAddr,
    ca: &Ca,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(
            ca.cert.der().to_vec(),
        ))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let session = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    rustls::StreamOwned::new(session, raw_client(addr))
}

/// Whether the server closed `stream`, perhaps after a TLS alert telling
/// why: reading ends (rather than timing out) with no tbnet frame.
fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => !rest.starts_with(&FLAG.to_be_bytes()) && rest.len() < 64,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
        ),
    }
}

#[test]
fn hostile_peers_over_tls_cost_only_their_connection() {
    let ca = Ca::new("test CA");
    let issued = ca.server();
    let tls = TlsServerConfig::new(issued.cert.as_bytes(), issued.key.as_bytes()).unwrap();
    // Long enough for a loaded machine's good handshakes, short enough for
    // the stalled ones to end soon.
    let server = tls_server_with(loopback(), tls, Duration::from_secs(1));
    let client_transport = transport();
    let good = tls_client(&client_transport, &ca, "localhost");
    let call = |body: &str| {
        let reply = good
            .call(server.addr, Packet::new(1, body.to_string()), Some(NEVER))
            .unwrap();
        assert_eq!(reply.body(), body.as_bytes());
    };
    call("before");

    // Plaintext tbnet frames on a TLS port.
    let mut plaintext = raw_client(server.addr);
    let _ = plaintext.write_all(&frame(1, 1, b"in the clear"));
    assert!(closed_by_server(&mut plaintext));
    call("after plaintext");

    // Garbage.
    let mut garbage = raw_client(server.addr);
    let _ = garbage.write_all(&[0xAB; 4096]);
    assert!(closed_by_server(&mut garbage));

    // A handshake that stalls halfway: a record header announcing a
    // ClientHello that never comes. The handshake deadline closes it.
    let mut stalled = raw_client(server.addr);
    send_bytes(&mut stalled, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
    assert!(closed_by_server(&mut stalled));
    call("after a stall");

    // A silent peer never even starts one.
    let mut silent = raw_client(server.addr);
    assert!(closed_by_server(&mut silent));

    // A valid TLS session carrying a bad frame: closed like on TCP.
    let mut inside = raw_tls_client(server.addr, &ca);
    inside.write_all(&header(0xDEAD_BEEF, 1, 1, 4)).unwrap();
    inside.flush().unwrap();
    let mut byte = [0; 1];
    // Closed: the end of the stream or an error, but not the read timeout.
    match inside.read(&mut byte) {
        Ok(n) => assert_eq!(n, 0),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        ),
    }

    let stats = server.transport.stats();
    assert_eq!(stats.bad_frames, 1);
    assert!(stats.handshake_failures >= 4, "{stats:?}");
    call("after all of them");
    stop(&client_transport);
    stop(&server.transport);
}

/// A TLS server on `addr` that keeps every responder and answers nothing.
fn silent_tls_server(
    addr: SocketAddr,
    tls: TlsServerConfig,
) -> (Transport, SocketAddr, Arc<std::sync::Mutex<Vec<Responder>>>) {
    let transport = Transport::builder().workers(1).start().unwrap();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let addr = {
        let held = held.clone();
        transport
            .listen_with_options(
                addr,
                move |_: Packet, responder: Responder| held.lock().unwrap().push(responder),
                ListenOptions::new().tls(tls),
            )
            .unwrap()
    };
    (transport, addr, held)
}

#[test]
fn timeouts_and_reconnects_behave_over_tls_as_on_tcp() {
    let ca = Ca::new("test CA");
    let issued = ca.server();
    let tls = TlsServerConfig::new(issued.cert.as_bytes(), issued.key.as_bytes()).unwrap();
    let reserved = reserve_port();
    let client_transport = transport();
    let client = Arc::new(
        ConnectionManager::new(&client_transport)
            .with_backoff(healthy_once_open())
            .with_tls(TlsClientConfig::new(&ca.pem(), "localhost").unwrap()),
    );

    // A request nobody answers times out; the others wait on.
    let (silent, addr, held) = silent_tls_server(reserved.addr(), tls.clone());
    // Open (and handshake) first: the short timeout covers only the request.
    client.connect(addr).expect("connect");
    let result = client.call(addr, Packet::new(1, "anyone?"), Some(SHORT_TIMEOUT));
    assert!(matches!(result, Err(Error::Timeout)), "{result:?}");

    // The server goes away: every way of waiting sees the disconnect.
    let (recorder, future, blocking) = one_request_each_way(&client, addr);
    assert!(wait_until(WAIT_LIMIT, || held.lock().unwrap().len() == 4));
    stop(&silent);
    recorder.wait_all_called();
    assert!(matches!(recorder.results()[0], Err(Error::Disconnected)));
    assert!(matches!(
        tokio_test::block_on(future),
        Err(Error::Disconnected)
    ));
    assert!(matches!(blocking.join().unwrap(), Err(Error::Disconnected)));

    // A new server on the same address: a new connection and handshake.
    let second = tls_server_on(reserved.addr(), tls);
    let reply = client
        .call(second.addr, Packet::new(1, "again"), Some(NEVER))
        .unwrap();
    assert_eq!(reply.body(), "again");
    assert_eq!(client_transport.stats().handshake_failures, 0);
    assert_eq!(client_transport.stats().timeouts, 1);
    stop(&client_transport);
    stop(&second.transport);
}

/// A directory of its own under the system's temporary one, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("tbnet-tls-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, contents: &[u8]) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_echo_pair_speaks_mutual_tls_through_its_flags() {
    use crate::examples::{assert_clean_run, assert_refused, run_client, try_client};
    use crate::faults::spawn_listening;

    let ca = Ca::new("test CA");
    let server_cert = ca.server();
    let client_cert = ca.client();
    let dir = TempDir::new();
    let ca_pem = dir.write("ca.pem", &ca.pem());
    let cert = dir.write("server.pem", server_cert.cert.as_bytes());
    let key = dir.write("server.key", server_cert.key.as_bytes());
    let client = dir.write("client.pem", client_cert.cert.as_bytes());
    let client_key = dir.write("client.key", client_cert.key.as_bytes());

    let (mut server, addr) = spawn_listening(
        "echo_server",
        &[
            "--addr",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca_pem,
        ],
    );
    let addr = addr.to_string();
    let fields = run_client(&[
        "--addr",
        &addr,
        "--tls-ca",
        &ca_pem,
        "--tls-name",
        "localhost",
        "--tls-cert",
        &client,
        "--tls-key",
        &client_key,
        "--conns",
        "2",
        "--depth",
        "4",
    ]);
    assert_clean_run(&fields);
    // Without a client certificate it does not get in.
    let (ok, fields) = try_client(&["--addr", &addr, "--tls-ca", &ca_pem]);
    assert_refused(ok, &fields);
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn a_server_that_never_finishes_the_handshake_is_left_by_its_deadline() {
    let ca = Ca::new("test CA");
    // Accepts, reads the ClientHello, and answers nothing.
    let (addr, mute) = raw_server(|mut stream| {
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    });
    let client_transport = Transport::builder()
        .workers(1)
        .handshake_timeout(Duration::from_millis(200))
        .start()
        .unwrap();
    let (client, heard) = tls_client_hearing_events(&client_transport, &ca);
    let result = client.call(addr, Packet::new(1, "hello?"), Some(NEVER));
    assert!(matches!(result, Err(Error::Disconnected)), "{result:?}");
    assert_eq!(client_transport.stats().handshake_failures, 1);
    // Stopping delivers every queued event first: a connection whose
    // handshake never finished was never announced, so it has no close
    // either.
    stop(&client_transport);
    assert_eq!(*heard.lock().unwrap(), []);
    mute.join().unwrap();
}

/// A TLS client for "localhost" whose connection events are kept.
fn tls_client_hearing_events(
    transport: &Transport,
    ca: &Ca,
) -> (
    ConnectionManager,
    Arc<std::sync::Mutex<Vec<ConnectionEvent>>>,
) {
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let tls = TlsClientConfig::new(&ca.pem(), "localhost").unwrap();
    let client = {
        let heard = heard.clone();
        ConnectionManager::new(transport).with_tls(tls).with_events(
            move |_: &ConnectionHandle, event: ConnectionEvent| {
                heard.lock().unwrap().push(event);
            },
        )
    };
    (client, heard)
}

#[test]
fn a_tls_connection_is_announced_once_its_handshake_is_done() {
    let ca = Ca::new("test CA");
    let server = tls_server(&ca);
    let client_transport = transport();
    let (client, heard) = tls_client_hearing_events(&client_transport, &ca);
    let response = client.call(server.addr, Packet::new(1, "hello"), Some(NEVER));
    assert_eq!(response.unwrap().body(), "hello");
    stop(&client_transport);
    let heard = heard.lock().unwrap().clone();
    assert!(
        matches!(
            heard[..],
            [ConnectionEvent::Connected, ConnectionEvent::Closed(_)]
        ),
        "{heard:?}"
    );
    stop(&server.transport);
}
