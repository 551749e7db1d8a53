//! A request/response RPC framework that speaks Taobao tbnet's wire format.
//!
//! tbnet is the C++ network library under TFS, Tair and early OceanBase.
//! This crate keeps its model (one IO thread, a timeout thread, a worker
//! pool; requests paired with responses by a channel id) and its bytes on the
//! wire, so it serves existing tbnet clients and calls existing tbnet
//! servers.
//!
//! # Quick start
//!
//! A server and a client in one process, on a port the OS picks:
//!
//! ```
//! use std::time::Duration;
//! use tbnet::{ConnectionManager, Packet, Responder, Transport};
//!
//! // Server: an adaptor is any `Fn(Packet, Responder)`; reply now or later.
//! let server = Transport::builder().start()?;
//! let addr = server.listen("127.0.0.1:0", |request: Packet, responder: Responder| {
//!     let _ = responder.reply(request.reply(request.body().clone()));
//! })?;
//!
//! // Client: one connection per server, opened on first use.
//! let client = Transport::builder().start()?;
//! let manager = ConnectionManager::new(&client);
//!
//! // 1. Block on the response.
//! let response = manager.call(addr, Packet::new(1, "blocking"), Some(Duration::from_secs(1)))?;
//! assert_eq!(response.body(), "blocking");
//!
//! // 2. A callback, run on one of the client transport's worker threads.
//! let (tx, rx) = std::sync::mpsc::channel();
//! manager
//!     .send(addr, Packet::new(1, "callback"), None, move |result| tx.send(result).unwrap())
//!     .unwrap();
//! assert_eq!(rx.recv().unwrap()?.body(), "callback");
//!
//! // 3. A future, for any executor.
//! let future = manager.call_async(addr, Packet::new(1, "future"), None).unwrap();
//! assert_eq!(tokio_test::block_on(future)?.body(), "future");
//!
//! client.stop();
//! server.stop();
//! # Ok::<(), tbnet::Error>(())
//! ```
//!
//! # Walkthrough: define a message, serve it, call it three ways
//!
//! **1. Define the messages.** A [`Message`] has a packet code and writes
//! its own body; nothing else changes on the wire.
//!
//! ```
//! use bytes::{Buf, BufMut, Bytes, BytesMut};
//! use tbnet::{DecodeError, Message, PacketCode};
//!
//! #[derive(Debug, PartialEq)]
//! pub struct Add { pub a: i64, pub b: i64 }
//! #[derive(Debug, PartialEq)]
//! pub struct Sum(pub i64);
//!
//! impl Message for Add {
//!     const PCODE: PacketCode = PacketCode(10);
//!     fn encode(&self, dst: &mut BytesMut) {
//!         dst.put_i64(self.a);
//!         dst.put_i64(self.b);
//!     }
//!     fn decode(mut src: Bytes) -> Result<Self, DecodeError> {
//!         if src.len() != 16 {
//!             return Err(DecodeError::new("expected 16 bytes"));
//!         }
//!         Ok(Add { a: src.get_i64(), b: src.get_i64() })
//!     }
//! }
//!
//! impl Message for Sum {
//!     const PCODE: PacketCode = PacketCode(11);
//!     fn encode(&self, dst: &mut BytesMut) {
//!         dst.put_i64(self.0);
//!     }
//!     fn decode(mut src: Bytes) -> Result<Self, DecodeError> {
//!         if src.len() != 8 {
//!             return Err(DecodeError::truncated("the sum"));
//!         }
//!         Ok(Sum(src.get_i64()))
//!     }
//! }
//!
//! assert_eq!(Add::from_packet(Add { a: 1, b: 2 }.to_packet()).unwrap(), Add { a: 1, b: 2 });
//! ```
//!
//! **2. Serve them.** A [`Router`] sends each packet code to its handler;
//! a handler replies with a message, or with an error reply the caller sees
//! as [`Error::Remote`]. Handlers run on the worker pool and may also keep
//! the [`Responder`] and reply later from another thread.
//!
//! ```
//! # use bytes::{Buf, BufMut, Bytes, BytesMut};
//! # use tbnet::{DecodeError, Message, PacketCode};
//! # #[derive(Debug, PartialEq)] pub struct Add { pub a: i64, pub b: i64 }
//! # #[derive(Debug, PartialEq)] pub struct Sum(pub i64);
//! # impl Message for Add {
//! #     const PCODE: PacketCode = PacketCode(10);
//! #     fn encode(&self, dst: &mut BytesMut) { dst.put_i64(self.a); dst.put_i64(self.b); }
//! #     fn decode(mut src: Bytes) -> Result<Self, DecodeError> {
//! #         if src.len() != 16 { return Err(DecodeError::new("expected 16 bytes")); }
//! #         Ok(Add { a: src.get_i64(), b: src.get_i64() })
//! #     }
//! # }
//! # impl Message for Sum {
//! #     const PCODE: PacketCode = PacketCode(11);
//! #     fn encode(&self, dst: &mut BytesMut) { dst.put_i64(self.0); }
//! #     fn decode(mut src: Bytes) -> Result<Self, DecodeError> {
//! #         if src.len() != 8 { return Err(DecodeError::truncated("the sum")); }
//! #         Ok(Sum(src.get_i64()))
//! #     }
//! # }
//! use tbnet::{Responder, Router, Transport};
//!
//! let calculator = Router::new().route_message(|add: Add, responder: Responder| {
//!     let _ = match add.a.checked_add(add.b) {
//!         Some(sum) => responder.reply_message(&Sum(sum)),
//!         None => responder.reply_error(1, "overflow"),
//!     };
//! });
//! let server = Transport::builder().start()?;
//! let addr = server.listen("127.0.0.1:0", calculator)?;
//! println!("serving on {addr}");
//! # server.stop();
//! # Ok::<(), tbnet::Error>(())
//! ```
//!
//! **3. Call them, three ways.** A [`ConnectionManager`] opens one
//! connection per server on first use and shares it.
//!
//! ```
//! # use bytes::{Buf, BufMut, Bytes, BytesMut};
//! # use tbnet::{DecodeError, Message, PacketCode};
//! # #[derive(Debug, PartialEq)] pub struct Add { pub a: i64, pub b: i64 }
//! # #[derive(Debug, PartialEq)] pub struct Sum(pub i64);
//! # impl Message for Add {
//! #     const PCODE: PacketCode = PacketCode(10);
//! #     fn encode(&self, dst: &mut BytesMut) { dst.put_i64(self.a); dst.put_i64(self.b); }
//! #     fn decode(mut src: Bytes) -> Result<Self, DecodeError> {
//! #         if src.len() != 16 { return Err(DecodeError::new("expected 16 bytes")); }
//! #         Ok(Add { a: src.get_i64(), b: src.get_i64() })
//! #     }
//! # }
//! # impl Message for Sum {
//! #     const PCODE: PacketCode = PacketCode(11);
//! #     fn encode(&self, dst: &mut BytesMut) { dst.put_i64(self.0); }
//! #     fn decode(mut src: Bytes) -> Result<Self, DecodeError> {
//! #         if src.len() != 8 { return Err(DecodeError::truncated("the sum")); }
//! #         Ok(Sum(src.get_i64()))
//! #     }
//! # }
//! # use tbnet::{Responder, Router, Transport};
//! # fn calculator() -> Router {
//! #     Router::new().route_message(|add: Add, responder: Responder| {
//! #         let _ = match add.a.checked_add(add.b) {
//! #             Some(sum) => responder.reply_message(&Sum(sum)),
//! #             None => responder.reply_error(1, "overflow"),
//! #         };
//! #     })
//! # }
//! # let server = Transport::builder().start()?;
//! # let addr = server.listen("127.0.0.1:0", calculator())?;
//! use tbnet::{ConnectionManager, Error, WaitObject};
//!
//! let client = Transport::builder().start()?;
//! let manager = ConnectionManager::new(&client);
//!
//! // Blocking.
//! let sum: Sum = manager.call_message(addr, &Add { a: 2, b: 40 }, None)?;
//! assert_eq!(sum, Sum(42));
//!
//! // A callback, on a worker thread of the client transport.
//! let (tx, rx) = std::sync::mpsc::channel();
//! manager
//!     .send_message(addr, &Add { a: 1, b: 1 }, None, move |r: Result<Sum, Error>| tx.send(r).unwrap())
//!     .unwrap();
//! assert_eq!(rx.recv().unwrap()?, Sum(2));
//!
//! // A future, on any executor (here tokio-test's block_on).
//! let future = manager.call_message_async::<Add, Sum>(addr, &Add { a: 5, b: 5 }, None).unwrap();
//! assert_eq!(tokio_test::block_on(future)?, Sum(10));
//!
//! // Or fan out and gather on one WaitObject.
//! let mut wait = WaitObject::new();
//! for i in 0..3 {
//!     manager.send_wait(addr, Add { a: i, b: i }.to_packet(), None, &mut wait).unwrap();
//! }
//! let sums: Vec<Sum> = wait.wait_all().into_iter().map(|r| Sum::from_packet(r?)).collect::<Result<_, _>>()?;
//! assert_eq!(sums, [Sum(0), Sum(2), Sum(4)]);
//!
//! // Application errors come back as `Error::Remote`.
//! let overflow = manager.call_message::<Add, Sum>(addr, &Add { a: i64::MAX, b: 1 }, None);
//! assert!(matches!(overflow, Err(Error::Remote { code: 1, .. })));
//! # client.stop();
//! # server.stop();
//! # Ok::<(), tbnet::Error>(())
//! ```
//!
//! # Connection events, server-initiated messages, other framings
//!
//! - **Events.** A listener ([`ListenOptions::events`]), a manager
//!   ([`ConnectionManager::with_events`]) or the whole transport
//!   ([`TransportBuilder::events`]) takes [`ConnectionEvents`] hooks:
//!   `on_connect`, `on_reconnect` (clients) and `on_close` with a
//!   [`CloseReason`] (peer closed, reset, idle, bad frame, closed by this
//!   side, shutdown). They run on `tbnet-events`, in order, exactly once
//!   each per connection that opened.
//! - **Handles.** A [`ConnectionHandle`] names one connection (id, peer);
//!   a server gets it from [`Responder::connection`] or its hooks and may
//!   [`close`](ConnectionHandle::close) it, [`post`](ConnectionHandle::post)
//!   one-way packets to the client, or send requests of its own
//!   ([`call`](ConnectionHandle::call), [`send`](ConnectionHandle::send),
//!   [`call_async`](ConnectionHandle::call_async)) that end exactly once
//!   like any request. Their channel ids have bit 31 set; a client's never
//!   do.
//! - **Default handler.** A client hands what a server sends on its own to
//!   [`ConnectionManager::set_default_handler`] (which may reply), or
//!   counts it in [`StatsSnapshot::unhandled`].
//! - **Framings.** [`ListenOptions::streamer`] and
//!   [`ConnectionManager::with_streamer`] replace tbnet's frame for one
//!   listener or manager, including framings without a header
//!   (`examples/http_server.rs` serves HTTP/1.1). tbnet's streamer is
//!   called directly; a custom one costs one virtual call per frame.
//!
//! ```
//! use tbnet::{ConnectionManager, Packet, Responder, Transport};
//!
//! let transport = Transport::builder().start()?;
//! // The server asks the client something before it answers.
//! let addr = transport.listen("127.0.0.1:0", |req: Packet, resp: Responder| {
//!     let name = resp.connection().call(Packet::new(2, "name?"), None);
//!     let name = name.map(Packet::into_body).unwrap_or_default();
//!     let _ = resp.reply(req.reply([&b"hello "[..], &name].concat()));
//! })?;
//! let client = ConnectionManager::new(&transport);
//! client.set_default_handler(|req: Packet, resp: Responder| {
//!     let _ = resp.reply(req.reply("ada"));
//! });
//! assert_eq!(client.call(addr, Packet::new(1, "hi"), None)?.body(), "hello ada");
//! transport.stop();
//! # Ok::<(), tbnet::Error>(())
//! ```
//!
//! # Threads
//!
//! ```text
//!  caller threads               tbnet-io (mio, edge-triggered)            tbnet-worker-N
//!  ──────────────               ──────────────────────────────            ──────────────
//!  ConnectionManager::call ─┐   poll ─► accept / finish connect
//!    ChannelPool::allocate  │          read until WouldBlock ─► decode
//!    frame ─► conn queue ───┼─►        writev until WouldBlock            │
//!    wake IO (if asleep) ───┘          response ─► ChannelPool::complete ─┼─► callbacks
//!                                      request  ─► bounded queue ─────────┼─► ServerAdaptor
//!                                                                         │   Responder::reply
//!  tbnet-timer: sleeps until the next due deadline ─► Timeout            ─┘   ─► conn queue
//! ```
//!
//! - Only `tbnet-io` touches sockets. Other threads queue frames on a
//!   connection and wake it through one `mio::Waker`, and only when it is
//!   asleep: while it works, wakeups are free. After a light round that
//!   handed work to another thread, and while a core is spare, it polls
//!   for a while ([`TransportBuilder::io_spin`], 50 µs) instead of
//!   sleeping, so the answer needs no wakeup.
//! - `tbnet-timer` keeps one table of every deadline (requests, connect,
//!   idle, delayed reconnects) and sleeps until the earliest. It expires
//!   requests itself and hands connection deadlines to the IO thread.
//! - Workers run server adaptors ([`Dispatch::Workers`]) and client
//!   callbacks (unless [`TransportBuilder::callbacks`] runs them inline).
//!   Blocking waits and futures are woken from whichever thread ended the
//!   request (IO or timer).
//! - `tbnet-events` (started with the first connection event) runs
//!   [`ConnectionEvents`] hooks, so a slow or panicking hook never holds up
//!   IO.
//!
//! # Layout
//!
//! Layers point one way, from user to used; nothing points back up:
//!
//! ```text
//! proto        sans-IO: frames, decoder, write queue, ChannelPool, the
//!              error-reply convention, and proto::Connection, the
//!              per-connection state machine (phase, why it is not reading,
//!              its deadlines; bytes, ids and Instants in, decisions out)
//!   ← completion   callback / WaitObject / ResponseFuture
//!   ← transport    mio IO thread, timer table and thread, workers, the
//!                  byte-stream seam, lifecycle; its own small handler
//!                  interface (a request frame, a connection's first bytes)
//!   ← server, router, message, status, client   the APIs users see
//! ```
//!
//! Where to look: a frame is parsed in `proto/framer.rs` and
//! `proto/streamer.rs`; what a connection does next is decided in
//! `proto/connection.rs`; every timeout is registered in
//! `transport/timer.rs`; requests end in `transport/conn.rs` and are
//! delivered by `transport/outcomes.rs`; the transport's phase is
//! `transport/lifecycle.rs`; the status page is a first-bytes sniffer that
//! `server.rs` plugs into its listeners from `status.rs`; who may connect
//! is decided at accept in `transport/admission.rs`, the memory budget in
//! `transport/budget.rs`, TLS sessions live in `transport/tls.rs` behind
//! the byte-stream seam `transport/stream.rs`.
//!
//! # The pure core
//!
//! Everything that decides *what* happens lives in [`proto`] and
//! [`completion`](crate::Completion), with no sockets, threads or clock reads:
//!
//! 1. A [`Packet`] is a [`PacketCode`], a [`ChannelId`] and a body
//!    ([`bytes::Bytes`]).
//! 2. A [`PacketStreamer`](proto::PacketStreamer) turns packets into frames;
//!    [`proto::DefaultStreamer`] is tbnet's 16-byte big-endian header.
//!    [`proto::FrameDecoder`] cuts received bytes into packets without
//!    copying bodies; [`proto::WriteQueue`] lines frames up for vectored writes.
//! 3. A [`ChannelPool`] holds pending requests by channel id, with deadlines.
//!    Whatever removes an entry (response, timeout, cancel, closed
//!    connection) gets its [`Completion`] and fires it once, after releasing
//!    its lock.
//! 4. A caller waits with a callback ([`PacketHandler`]), a blocking
//!    [`WaitObject`], or a [`ResponseFuture`].
//!
//! A request's whole life, with the network left out:
//!
//! ```
//! use std::time::{Duration, Instant};
//! use bytes::BytesMut;
//! use tbnet::proto::{DefaultStreamer, FrameDecoder, PacketStreamer};
//! use tbnet::{ChannelPool, Packet, WaitObject};
//!
//! let streamer = DefaultStreamer::new();
//! let mut pool = ChannelPool::new(256);
//! let mut wait = WaitObject::new();
//! let now = Instant::now();
//!
//! // Client: register the request and frame it.
//! let mut request = Packet::new(1, "ping");
//! let id = pool.allocate(wait.completion(), now + Duration::from_secs(5)).unwrap();
//! request.set_channel_id(id);
//! let mut wire = BytesMut::new();
//! streamer.encode(&request, &mut wire);
//!
//! // Server: decode it and answer on the same channel id.
//! let mut server_in = FrameDecoder::new();
//! server_in.extend_from_slice(&wire);
//! let got = server_in.next_packet(&streamer).unwrap().unwrap();
//! let mut reply = BytesMut::new();
//! streamer.encode(&got.reply("pong"), &mut reply);
//!
//! // Client: the response finds its caller by channel id.
//! let mut client_in = FrameDecoder::new();
//! client_in.extend_from_slice(&reply);
//! let response = client_in.next_packet(&streamer).unwrap().unwrap();
//! let ready = pool.complete(response.channel_id(), response).expect("pending");
//! ready.fire(); // after releasing whatever lock guards the pool
//! assert_eq!(wait.wait_all()[0].as_ref().unwrap().body(), "pong");
//!
//! // A second response with that id is late: nothing is pending under it.
//! assert!(pool.complete(id, Packet::new(1, "again")).is_none());
//! ```
//!
//! # tbnet names
//!
//! | tbnet (C++)          | this crate |
//! |----------------------|------------|
//! | `Transport`          | [`Transport`] |
//! | `Transport::listen(spec, streamer, adaptor)` | [`Transport::listen`] (`"tcp:host:port"`, `"host:port"` or a `SocketAddr`: [`ToEndpoint`]) |
//! | `Transport::connect(spec, streamer, autoReconn)` | [`ConnectionManager::connect`] |
//! | spec strings `"tcp:host:port"` | [`ToEndpoint`] (for `&str`, `String`, `SocketAddr`, [`ServerId`]) |
//! | `ConnectionManager`  | [`ConnectionManager`] |
//! | `ConnectionManager::sendPacket(id, packet, handler, args)` | [`ConnectionManager::send`] (callback), [`call`](ConnectionManager::call) (blocking), [`call_async`](ConnectionManager::call_async) (future), [`send_wait`](ConnectionManager::send_wait) |
//! | `Connection::postPacket` with no handler | [`ConnectionManager::post`] (a real channel id; the reply is discarded and counted in [`StatsSnapshot::post_replies`]) |
//! | `ConnectionManager::connect` / `disconnect` / `isAlive` | [`ConnectionManager::connect`], [`disconnect`](ConnectionManager::disconnect), [`is_alive`](ConnectionManager::is_alive) |
//! | `setDefaultQueueLimit(id, n)` / `setDefaultQueueTimeout(id, ms)` | [`ConnectionManager::set_queue_limit`], [`set_default_timeout`](ConnectionManager::set_default_timeout) (and manager-wide [`with_queue_limit`](ConnectionManager::with_queue_limit), [`with_default_timeout`](ConnectionManager::with_default_timeout)) |
//! | `noblocking = false` (wait for room in a full queue) | [`ConnectionManager::with_queue_wait`] |
//! | `autoReconn` | [`WhileDown`]: `FailFast`/`Queue` reconnect, [`WhileDown::StayDown`] does not |
//! | `IServerAdaptor`     | [`ServerAdaptor`] (alias [`IServerAdaptor`]), any `Fn(Packet, Responder)` |
//! | `IServerAdaptor::handleBatchPacket` | [`BatchAdaptor`], [`Transport::listen_batch`] |
//! | `IPacketHandler`     | [`PacketHandler`] (alias [`IPacketHandler`]), any `FnOnce(Result<Packet, Error>)` |
//! | `postPacket(packet, handler, args)` with one handler for many requests | [`ConnectionManager::send_shared`] with a [`SharedPacketHandler`] (no allocation for the handler) |
//! | `IPacketStreamer` + `IPacketFactory` | [`PacketStreamer`](proto::PacketStreamer) (alias [`IPacketStreamer`]) |
//! | `DefaultPacketStreamer` | [`proto::DefaultStreamer`] |
//! | (no equivalent) a connection's requests handled in order on the pool | [`Dispatch::Ordered`] |
//! | `DataBuffer` (`writeInt8..64`, `writeString`, `readInt*`, `readString`) | [`DataBuffer`] (`put_i8..i64`, `put_string`), [`DataReader`] (`get_*`, errors instead of over-reads) |
//! | `Packet`, `pcode`, `chid` | [`Packet`], [`PacketCode`], [`ChannelId`] |
//! | `ChannelPool`        | [`ChannelPool`] |
//! | `WaitObject`         | [`WaitObject`] |
//! | `PacketQueueThread`  | the worker pool ([`Dispatch::Workers`]) |
//! | `ControlPacket` (timeout, bad packet, disconnect) | [`Error`] |
//! | `DisconnPacket` / `ControlPacket::CMD_DISCONN_PACKET` | [`Error::Disconnected`] |
//! | `HttpPacketStreamer` status pages | [`TransportBuilder::status_page`] |
//! | `IPacketStreamer` per listener / connection, `existPacketHeader = false` (custom framings, `HttpPacketStreamer`) | [`ListenOptions::streamer`], [`ConnectionManager::with_streamer`]; a streamer whose header is empty |
//! | `IServerAdaptor` connection callbacks, `DisconnPacket`; DSTORE `on_connect`/`on_close` | [`ConnectionEvents`], [`CloseReason`] |
//! | `IOComponent` / server-side `Connection` (`postPacket`, `getPeerId`, `close`, `setWriteFinishClose`) | [`ConnectionHandle`] ([`Responder::connection`]; [`ConnectionHandle::close_when_written`]) |
//! | default packet handler (`ConnectionManager(..., defaultPacketHandler)`, `setDefaultPacketHandler`) | [`ConnectionManager::set_default_handler`] (only for packets the server sent on its own: channel id 0 or bit 31 set; late responses and post replies are counted, as before) |
//! | (no equivalent) typed messages and dispatch by `pcode` | [`Message`], [`Router`] |
//! | server id `u64` (`port << 32 \| ip`) | [`ServerId`] |
//!
//! Where the meaning differs:
//!
//! - **Queue limit 0**: tbnet's means "no limit"; here every limit is at
//!   least 1 ([`MAX_PENDING`](proto::MAX_PENDING) is the largest).
//! - **Timeout 0**: tbnet's means "a day"; here a zero timeout expires at
//!   once (pass `Duration::MAX`, clamped to about 30 years, for "never").
//! - **Reconnect**: tbnet reconnects a dropped connection on its timeout
//!   thread; here the next request reconnects, with exponential backoff and
//!   jitter after failed attempts ([`Backoff`]), and [`WhileDown::StayDown`]
//!   turns it off until [`ConnectionManager::connect`].
//! - **Posts**: tbnet delivers a post's reply to the default packet handler;
//!   here it is discarded and counted (a post still holds its queue slot
//!   until the reply or the default timeout, as in tbnet).
//! - **Waiting for room**: tbnet's `noblocking = false` waits without a
//!   bound; [`with_queue_wait`](ConnectionManager::with_queue_wait) bounds
//!   the wait and then fails with [`Error::QueueFull`].
//! - **Default handler**: tbnet's gets every packet that matches no
//!   request; here only what a server sent on its own (channel id 0, or bit
//!   31 set: a server's requests never share an id with its client's).
//! - **Connection events**: tbnet tells the adaptor of a lost connection
//!   with a `DisconnPacket`; here [`ConnectionEvents`] hooks hear every
//!   open, reopen and close with its [`CloseReason`], on their own thread.
//!
//! # Guarantees
//!
//! **Exactly once.** A pending request leaves its [`ChannelPool`] by one of
//! response, deadline, cancel (its future or `WaitObject` dropped), failure
//! of its connection, or shutdown, and the remover fires its [`Completion`]
//! once. A completion dropped unfired fires [`Error::Shutdown`], so even a
//! panic cannot leave a caller hanging. A submission that is refused
//! returns the packet instead ([`SendError::into_inner`]) and fires nothing.
//! A channel id carries its slot's generation, so a response for a request
//! that already ended matches nothing; it is dropped and counted in
//! [`StatsSnapshot::late_responses`].
//!
//! **Bounded memory.** Every buffer has a limit, and none grows with what a
//! peer merely announces:
//!
//! | what | limit (default) | when reached |
//! |------|-----------------|--------------|
//! | frame body | [`proto::DefaultStreamer::with_max_body_len`] (64 MiB) | connection closed |
//! | read buffer | grows only with bytes received, one [`read_chunk`](TransportBuilder::read_chunk) (64 KiB) at a time | — |
//! | requests pending per connection | [`ConnectionManager::with_queue_limit`] (256) | [`Error::QueueFull`], packet handed back |
//! | unwritten bytes per connection | [`TransportBuilder::max_outbound`] (8 MiB) | server: stops reading that peer; client: [`Error::QueueFull`] |
//! | worker queue | [`TransportBuilder::worker_queue`] (4096) | the IO thread stops reading until there is room; nothing dropped |
//! | silent server connections | [`TransportBuilder::idle_timeout`] (900 s) | connection closed |
//! | requests in flight per server connection | [`TransportBuilder::max_in_flight`] (1024) | that connection stops being read until answers go out |
//! | time to a server connection's first whole frame (or status request) | [`TransportBuilder::first_frame_timeout`] (10 s) | connection closed |
//! | TLS handshake | [`TransportBuilder::handshake_timeout`] (10 s) | connection closed |
//! | accepted connections | [`TransportBuilder::max_connections`] (16384), and per listener [`ListenOptions::max_connections`] (none) | the newcomer is closed at accept |
//! | peers admitted | per listener [`ListenOptions::allow`] (everyone); the status page [`TransportBuilder::status_allow`] (loopback) | closed at accept, before a byte is read / closed unanswered |
//! | all connections' read buffers and unwritten output | [`TransportBuilder::memory_budget`] (64 × `max_outbound` = 512 MiB) | the connections holding more than their share stop being read |
//!
//! **The memory bound.** Call the budget *B*, the read chunk *r* and the
//! open connections *n*. What the transport's connections hold in read
//! buffers and unwritten output never exceeds *2B + n × 2r*, whatever the
//! peers do: a connection reads (at most *r* at a time) only while the
//! total is under *B* or it holds less than *B / n*, and what it decodes
//! from one read makes at most the replies to one read chunk of requests
//! before the next look (with inline dispatch; with worker dispatch add
//! the replies to `max_in_flight` requests per connection, which the
//! handlers make, not the peers). With the defaults and the connection
//! limit that is 1 GiB + 16384 × 128 KiB = 3 GiB at worst; lower
//! [`max_connections`](TransportBuilder::max_connections),
//! [`read_chunk`](TransportBuilder::read_chunk) or the budget for less.
//! Kernel socket buffers and TLS session buffers (64 KiB each way per TLS
//! connection) come on top. The bound comes first: a connection held in
//! the middle of a request larger than its share reads on once memory is
//! given back (idle connections give back their read buffers while the
//! budget is spent), but a request larger than the whole budget, or a
//! budget spent entirely on the partial requests of connections over
//! their share, waits for those connections' idle timeout. Keep the
//! budget well above the largest request you accept.
//!
//! **What a hostile peer can do.** A wrong flag, a negative or oversized
//! length, or any bytes that do not parse close that one connection with a
//! `warn!` naming the peer and the reason; its pending requests fail with
//! [`Error::Disconnected`]; nothing panics and no other connection notices.
//! A header announcing 64 MiB costs the bytes that actually follow it. A
//! request with channel id 0 is one-way: the adaptor sees it, and its
//! [`Responder`] discards any reply (tbnet's C++ server aborts on it). A
//! peer that never reads costs at most `max_outbound` plus its socket
//! buffers, and all such peers together no more than the memory budget
//! allows. A peer off a listener's allow-list, or over a connection limit,
//! is closed at accept before a byte is read, counted
//! ([`StatsSnapshot::refused`], [`StatsSnapshot::over_limit`]) and logged at
//! debug level at most once a second, so a flood of them cannot flood the
//! log. A peer that connects and sends nothing whole is closed by the
//! first-frame deadline. One peer cannot fill the worker queue for
//! everyone: past `max_in_flight` unanswered requests its connection is no
//! longer read. When the process runs out of descriptors (`EMFILE`,
//! `ENFILE`), established connections are served on and the listener
//! retries every 100 ms ([`StatsSnapshot::accept_errors`]) without
//! spinning. What a peer *can* do is send valid requests as fast as TCP
//! lets it, which the worker queue turns into back-pressure.
//!
//! **TLS** (cargo feature `tls`, rustls with its `ring` provider, chosen
//! because it builds quickly). A listener serves TLS with
//! `ListenOptions::tls` and a `TlsServerConfig` (certificate chain and
//! key in PEM, optionally a CA whose client certificates it requires); a
//! [`ConnectionManager`] connects with `ConnectionManager::with_tls` and a
//! `TlsClientConfig` (trusted CAs, the server name, optionally a client
//! certificate). The frames inside are unchanged and everything else
//! (the three ways of waiting, timeouts, reconnects) behaves as on TCP.
//! Plaintext, garbage or a stalled handshake costs only its connection; a
//! failed handshake is counted in [`StatsSnapshot::handshake_failures`].
//! Plain TCP stays byte-for-byte tbnet's wire format.
//!
//! **What runs where.** Only `tbnet-io` touches sockets. Server adaptors run
//! on the workers, or on `tbnet-io` with [`Dispatch::IoThread`] (then they
//! must not block). Client callbacks run on the workers by default: a slow
//! callback delays other callbacks, never IO or timeouts. With
//! [`TransportBuilder::callbacks`]`(Dispatch::IoThread)` they run inline on
//! the thread that ended the request (faster, and then they must not
//! block). A client's default handler runs where its callbacks do.
//! Connection event hooks run on `tbnet-events`, one at a time in event
//! order, and may block or call back into the transport. Blocking waits and
//! futures are woken from `tbnet-io` (responses, disconnects) or
//! `tbnet-timer` (timeouts). A panicking handler, callback or hook is
//! caught and logged.
//!
//! **Faults.** A connection that closes, resets or fails to connect fails
//! its pending requests with [`Error::Disconnected`] at once; the next
//! request reconnects, with exponential backoff and jitter after failed
//! attempts ([`Backoff`], [`WhileDown`]). A new connection never sees the
//! old one's partial input. A peer that vanished without FIN or RST is
//! noticed by request deadlines, and, with
//! [`TransportBuilder::tcp_keepalive`], by the kernel, which then closes it.
//!
//! **Shutdown always returns.** [`Transport::stop`] (or dropping the last
//! handle) stops accepting, fails pending client requests with
//! [`Error::Shutdown`], lets running handlers finish and flushes their
//! replies for up to [`TransportBuilder::shutdown_grace`] (500 ms), then
//! joins its threads. A handler still running after the grace period keeps
//! its (detached) worker thread; its reply is dropped.

#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms)]

mod buffer;
mod client;
pub mod codec;
mod completion;
mod endpoint;
mod error;
mod hash;
mod message;
pub mod metrics;
mod packet;
pub mod proto;
mod router;
mod server;
pub mod service;
mod status;
mod sync;
mod transport;

pub use buffer::{DataBuffer, DataReader};
pub use client::{
    Backoff, ConnectionManager, ServerId, ServerStats, WhileDown, DEFAULT_QUEUE_LIMIT,
    DEFAULT_TIMEOUT,
};
pub use completion::{Completion, PacketHandler, ResponseFuture, SharedPacketHandler, WaitObject};
pub use endpoint::ToEndpoint;
pub use error::{Error, SendError};
pub use message::{
    DecodeError, Message, MessageFuture, ERROR_BAD_REQUEST, ERROR_PCODE, ERROR_UNKNOWN_PCODE,
};
pub use packet::{ChannelId, Packet, PacketCode};
pub use proto::{ChannelPool, Ready};
pub use router::{Router, Unrouted};
pub use server::{Batch, BatchAdaptor, Dispatch, ListenOptions, Responder, ServerAdaptor};
pub use service::{ErrorReply, ERROR_BAD_RESPONSE};
pub use transport::{
    AllowList, Cidr, CidrParseError, CloseReason, ConnectionEvent, ConnectionEvents,
    ConnectionHandle, StatsSnapshot, Transport, TransportBuilder, DEFAULT_BUDGET_CONNECTIONS,
    DEFAULT_FIRST_FRAME_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_IO_SPIN,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_OUTBOUND,
};
#[cfg(feature = "tls")]
pub use transport::{TlsClientConfig, TlsServerConfig};

/// tbnet's name for [`ServerAdaptor`].
pub use server::ServerAdaptor as IServerAdaptor;

/// tbnet's name for [`PacketHandler`].
pub use completion::PacketHandler as IPacketHandler;
/// tbnet's name for [`proto::PacketStreamer`].
pub use proto::PacketStreamer as IPacketStreamer;
