//! The unit of exchange: a packet code, a channel id and a body.

use std::fmt;

use bytes::Bytes;

/// A packet's type, chosen by the application (tbnet's `pcode`, an `i32` on
/// the wire).
///
/// # Examples
/// ```
/// use tbnet::PacketCode;
///
/// let code = PacketCode::from(42);
/// assert_eq!(code.get(), 42);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PacketCode(pub i32);

impl PacketCode {
    /// The raw code as it travels on the wire.
    pub const fn get(self) -> i32 {
        self.0
    }
}

impl From<i32> for PacketCode {
    fn from(code: i32) -> Self {
        PacketCode(code)
    }
}

impl fmt::Display for PacketCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The id that pairs a response with its request (tbnet's `chid`).
///
/// A requester picks it; the responder copies it unchanged. This crate's
/// [`ChannelPool`](crate::ChannelPool) never issues [`ChannelId::NONE`] (0),
/// which marks one-way packets.
///
/// # Examples
/// ```
/// use tbnet::ChannelId;
///
/// assert!(ChannelId::NONE.is_none());
/// assert_eq!(ChannelId::from(7).get(), 7);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(pub u32);

impl ChannelId {
    /// Channel id 0: no response is expected.
    pub const NONE: ChannelId = ChannelId(0);

    /// The raw id as it travels on the wire.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Whether this is [`ChannelId::NONE`].
    pub const fn is_none(self) -> bool {
        self.0 == 0
    }
}

impl From<u32> for ChannelId {
    fn from(id: u32) -> Self {
        ChannelId(id)
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One request, response or one-way message.
///
/// The body is a [`Bytes`], so cloning a packet or handing it between threads
/// never copies the payload, and a received body is a slice of the read buffer.
///
/// # Examples
/// ```
/// use tbnet::Packet;
///
/// let request = Packet::new(1, &b"ping"[..]);
/// let response = request.reply(&b"pong"[..]);
/// assert_eq!(response.pcode().get(), 1);
/// assert_eq!(response.channel_id(), request.channel_id());
/// assert_eq!(response.body(), "pong");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Packet {
    pcode: PacketCode,
    channel_id: ChannelId,
    body: Bytes,
}

impl Packet {
    /// A packet with `pcode` and `body`; the channel id is assigned when it
    /// is sent as a request.
    pub fn new(pcode: impl Into<PacketCode>, body: impl Into<Bytes>) -> Self {
        Packet {
            pcode: pcode.into(),
            channel_id: ChannelId::NONE,
            body: body.into(),
        }
    }

    /// A packet with every field given, as a decoder produces it.
    pub fn from_parts(pcode: PacketCode, channel_id: ChannelId, body: Bytes) -> Self {
        Packet {
            pcode,
            channel_id,
            body,
        }
    }

    /// A response to this packet: same packet code and channel id, new body.
    pub fn reply(&self, body: impl Into<Bytes>) -> Packet {
        Packet {
            pcode: self.pcode,
            channel_id: self.channel_id,
            body: body.into(),
        }
    }

    /// The packet code.
    pub fn pcode(&self) -> PacketCode {
        self.pcode
    }

    /// The channel id.
    pub fn channel_id(&self) -> ChannelId {
        self.channel_id
    }

    /// Sets the channel id (the transport does this when it sends a request).
    pub fn set_channel_id(&mut self, id: ChannelId) {
        self.channel_id = id;
    }

    /// Sets the packet code.
    pub fn set_pcode(&mut self, pcode: impl Into<PacketCode>) {
        self.pcode = pcode.into();
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Takes the body out, leaving the packet's other fields behind.
    pub fn into_body(self) -> Bytes {
        self.body
    }
}

impl fmt::Debug for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Packet")
            .field("pcode", &self.pcode.0)
            .field("channel_id", &self.channel_id.0)
            .field("body_len", &self.body.len())
            .finish()
    }
}
