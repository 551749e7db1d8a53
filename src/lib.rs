//! A request/response RPC framework that speaks Taobao tbnet's wire format.
//!
//! tbnet is the C++ network library under TFS, Tair and early OceanBase.
//! This crate keeps its model (one IO thread, a timeout thread, a worker
//! pool; requests paired with responses by a channel id) and its bytes on the
//! wire, so it serves existing tbnet clients and calls existing tbnet
//! servers.
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
//! use tbnet::{ChannelPool, Error, Packet, WaitObject};
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
//! # let _: Option<Error> = None;
//! ```
//!
//! # tbnet names
//!
//! | tbnet (C++)          | this crate |
//! |----------------------|------------|
//! | `Packet`, `pcode`, `chid` | [`Packet`], [`PacketCode`], [`ChannelId`] |
//! | `IPacketStreamer` + `IPacketFactory` | [`PacketStreamer`](proto::PacketStreamer) (alias [`IPacketStreamer`]) |
//! | `DefaultPacketStreamer` | [`proto::DefaultStreamer`] |
//! | `IPacketHandler`     | [`PacketHandler`] (alias [`IPacketHandler`]), any `FnOnce(Result<Packet, Error>)` |
//! | `ChannelPool`        | [`ChannelPool`] |
//! | `WaitObject`         | [`WaitObject`] |
//! | `ControlPacket` (timeout, bad packet, disconnect) | [`Error`] |
//!
//! # Guarantees
//!
//! - **Exactly once.** A pending request leaves its [`ChannelPool`] by one
//!   of response, deadline, cancel or failure of its connection, and the
//!   remover fires its [`Completion`]. A completion dropped unfired fires
//!   [`Error::Shutdown`], so even a panic cannot leave a caller hanging.
//! - **No late delivery.** A channel id carries its slot's generation: a
//!   response for a request that already ended matches nothing.
//! - **Bounded memory.** Frame bodies are capped (64 MiB by default) and
//!   checked before any body byte is expected; decoder buffers grow only with
//!   bytes that actually arrived.
//! - **Hostile bytes never panic.** Every malformed header is a
//!   [`proto::FrameError`].

#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms)]

mod client;
mod completion;
mod error;
mod packet;
pub mod proto;
mod server;
mod sync;
mod transport;

pub use client::{ConnectionManager, ServerId, DEFAULT_QUEUE_LIMIT, DEFAULT_TIMEOUT};
pub use completion::{Completion, PacketHandler, ResponseFuture, WaitObject};
pub use error::{Error, SendError};
pub use packet::{ChannelId, Packet, PacketCode};
pub use proto::{ChannelPool, Ready};
pub use server::{Dispatch, Responder, ServerAdaptor};
pub use transport::{StatsSnapshot, Transport, TransportBuilder};

/// tbnet's name for [`ServerAdaptor`].
pub use server::ServerAdaptor as IServerAdaptor;

/// tbnet's name for [`PacketHandler`].
pub use completion::PacketHandler as IPacketHandler;
/// tbnet's name for [`proto::PacketStreamer`].
pub use proto::PacketStreamer as IPacketStreamer;
