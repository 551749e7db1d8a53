//! The sans-IO core: frame codec, frame decoder, channel table, outbound
//! queue, the per-connection state machine and the error-reply convention.
//!
//! Nothing here opens a socket, spawns a thread, takes a lock or reads the
//! clock: inputs are bytes, ids and `Instant`s handed in, outputs are values
//! handed back. The transport (`crate::transport`) drives it.

mod channels;
mod connection;
mod framer;
mod outbound;
pub(crate) mod reply;
mod streamer;

pub(crate) use channels::SERVER_BIT;
pub use channels::{ChannelPool, Ready, MAX_PENDING};
pub use connection::{CloseReason, Connection, Hold, Limits, Phase, Side};
pub use framer::{FrameDecoder, DEFAULT_READ_CHUNK};
pub use outbound::WriteQueue;
pub(crate) use streamer::Codec;
pub use streamer::{
    DefaultStreamer, FrameError, FrameHeader, PacketStreamer, Parse, DEFAULT_FLAG,
    DEFAULT_MAX_BODY_LEN, HEADER_LEN,
};
