//! The key-value service's messages, shared by `kv_server` and `kv_client`.
//!
//! Byte strings travel as a big-endian `u32` length then the bytes. Every
//! decoder checks each length against what actually arrived before slicing,
//! so a hostile length costs an error, not an allocation.

// Each example that includes this file uses a different part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Bound;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::RwLock;
use tbnet::{DecodeError, Dispatch, Message, PacketCode, Responder, Router, Transport};

/// Error-reply code: no such key.
pub const NOT_FOUND: i32 = 404;
/// Error-reply code: a scan asked for more than `MAX_SCAN` entries.
pub const BAD_LIMIT: i32 = 400;
/// Most entries one scan returns.
pub const MAX_SCAN: u32 = 1000;

fn put_bytes(dst: &mut BytesMut, b: &[u8]) {
    dst.put_u32(b.len() as u32);
    dst.put_slice(b);
}

fn get_bytes(src: &mut Bytes, what: &str) -> Result<Bytes, DecodeError> {
    if src.remaining() < 4 {
        return Err(DecodeError::truncated(what));
    }
    let len = src.get_u32() as usize;
    if src.remaining() < len {
        return Err(DecodeError::new(format!(
            "{what} claims {len} bytes, {} left",
            src.remaining()
        )));
    }
    Ok(src.split_to(len))
}

fn get_u32(src: &mut Bytes, what: &str) -> Result<u32, DecodeError> {
    if src.remaining() < 4 {
        return Err(DecodeError::truncated(what));
    }
    Ok(src.get_u32())
}

fn get_flag(src: &mut Bytes, what: &str) -> Result<bool, DecodeError> {
    if !src.has_remaining() {
        return Err(DecodeError::truncated(what));
    }
    Ok(src.get_u8() != 0)
}

fn done<T>(src: &Bytes, value: T) -> Result<T, DecodeError> {
    if src.has_remaining() {
        return Err(DecodeError::new(format!(
            "{} unexpected trailing bytes",
            src.remaining()
        )));
    }
    Ok(value)
}

macro_rules! message {
    ($name:ident, $code:expr, |$self_:ident, $dst:ident| $encode:block, |$src:ident| $decode:block) => {
        impl Message for $name {
            const PCODE: PacketCode = PacketCode($code);
            fn encode(&$self_, $dst: &mut BytesMut) $encode
            fn decode(mut $src: Bytes) -> Result<Self, DecodeError> $decode
        }
    };
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Get {
    pub key: Bytes,
}
message!(Get, 100, |self, dst| { put_bytes(dst, &self.key) }, |src| {
    let key = get_bytes(&mut src, "key")?;
    done(&src, Get { key })
});

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    pub value: Bytes,
}
message!(
    Value,
    101,
    |self, dst| { put_bytes(dst, &self.value) },
    |src| {
        let value = get_bytes(&mut src, "value")?;
        done(&src, Value { value })
    }
);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub key: Bytes,
    pub value: Bytes,
}
message!(
    Put,
    102,
    |self, dst| {
        put_bytes(dst, &self.key);
        put_bytes(dst, &self.value);
    },
    |src| {
        let key = get_bytes(&mut src, "key")?;
        let value = get_bytes(&mut src, "value")?;
        done(&src, Put { key, value })
    }
);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The key held a value before.
    pub replaced: bool,
}
message!(
    Stored,
    103,
    |self, dst| { dst.put_u8(self.replaced as u8) },
    |src| {
        let replaced = get_flag(&mut src, "replaced")?;
        done(&src, Stored { replaced })
    }
);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub key: Bytes,
}
message!(
    Delete,
    104,
    |self, dst| { put_bytes(dst, &self.key) },
    |src| {
        let key = get_bytes(&mut src, "key")?;
        done(&src, Delete { key })
    }
);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    /// The key held a value.
    pub existed: bool,
}
message!(
    Deleted,
    105,
    |self, dst| { dst.put_u8(self.existed as u8) },
    |src| {
        let existed = get_flag(&mut src, "existed")?;
        done(&src, Deleted { existed })
    }
);

/// Keys from `start` (inclusive), in order, at most `limit` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub start: Bytes,
    pub limit: u32,
}
message!(
    Scan,
    106,
    |self, dst| {
        put_bytes(dst, &self.start);
        dst.put_u32(self.limit);
    },
    |src| {
        let start = get_bytes(&mut src, "start")?;
        let limit = get_u32(&mut src, "limit")?;
        done(&src, Scan { start, limit })
    }
);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entries {
    pub entries: Vec<(Bytes, Bytes)>,
}
message!(
    Entries,
    107,
    |self, dst| {
        dst.put_u32(self.entries.len() as u32);
        for (k, v) in &self.entries {
            put_bytes(dst, k);
            put_bytes(dst, v);
        }
    },
    |src| {
        let count = get_u32(&mut src, "entry count")?;
        // Each entry takes at least 8 bytes: a claimed count is checked against
        // the body before anything is reserved for it.
        if count as usize > src.remaining() / 8 {
            return Err(DecodeError::new(format!(
                "{count} entries cannot fit in {} bytes",
                src.remaining()
            )));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let key = get_bytes(&mut src, "key")?;
            let value = get_bytes(&mut src, "value")?;
            entries.push((key, value));
        }
        done(&src, Entries { entries })
    }
);

// ---------------------------------------------------------------------------
// The server side.

type Store = Arc<RwLock<BTreeMap<Bytes, Bytes>>>;

/// The service: one handler per message, all sharing the store.
fn router(store: &Store) -> Router {
    let (get, put, delete, scan) = (store.clone(), store.clone(), store.clone(), store.clone());
    Router::new()
        .route_message(move |request: Get, responder: Responder| {
            let found = get.read().get(&request.key).cloned();
            let _ = match found {
                Some(value) => responder.reply_message(&Value { value }),
                None => responder.reply_error(NOT_FOUND, "no such key"),
            };
        })
        .route_message(move |request: Put, responder: Responder| {
            let replaced = put.write().insert(request.key, request.value).is_some();
            let _ = responder.reply_message(&Stored { replaced });
        })
        .route_message(move |request: Delete, responder: Responder| {
            let existed = delete.write().remove(&request.key).is_some();
            let _ = responder.reply_message(&Deleted { existed });
        })
        .route_message(move |request: Scan, responder: Responder| {
            if request.limit > MAX_SCAN {
                let _ = responder.reply_error(BAD_LIMIT, &format!("limit over {MAX_SCAN}"));
                return;
            }
            let entries = (scan
                .read()
                .range((Bound::Included(request.start), Bound::Unbounded)))
            .take(request.limit as usize)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
            let _ = responder.reply_message(&Entries { entries });
        })
}

/// `--addr`: `HOST:PORT` or tbnet's `tcp:HOST:PORT`, resolved once.
pub fn endpoint(s: &str) -> Result<SocketAddr, String> {
    tbnet::ToEndpoint::to_endpoint(s).map_err(|e| e.to_string())
}

/// Starts the server on `addr`; returns the transport and the bound address.
pub fn start(
    addr: SocketAddr,
    workers: usize,
    status: bool,
) -> Result<(Transport, SocketAddr), tbnet::Error> {
    let store = Store::default();
    let transport = Transport::builder()
        .workers(workers.max(1))
        .dispatch(Dispatch::Workers)
        .status_page(status)
        .start()?;
    let local = transport.listen(addr, router(&store))?;
    Ok((transport, local))
}
