//! The key-value service, declared once with `tbnet::service!` and shared by
//! `kv_server` and `kv_client`. Bodies are serde types in postcard's format
//! (feature `serde`): no hand-written encoding. (`echo_server` and
//! `echo_client` are the examples that work with raw `Packet`s.)

// Each example that includes this file uses a different part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Bound;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tbnet::codec::Postcard;
use tbnet::{service, Dispatch, ErrorReply, Transport};

/// Error-reply code: no such key.
pub const NOT_FOUND: i32 = 404;
/// Error-reply code: a scan asked for more than `MAX_SCAN` entries.
pub const BAD_LIMIT: i32 = 400;
/// Most entries one scan returns.
pub const MAX_SCAN: u32 = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Get {
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Value {
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Put {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// The key held a value before.
    pub replaced: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delete {
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// The key held a value.
    pub existed: bool,
}

/// Keys from `start` (inclusive), in order, at most `limit` of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scan {
    pub start: String,
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entries {
    pub entries: Vec<(String, String)>,
}

service! {
    /// An in-memory key-value store.
    pub service store {
        codec = Postcard;
        /// The value of a key; error 404 if there is none.
        rpc get(Get) -> Value = 100;
        /// Stores a value, saying whether it replaced one.
        rpc put(Put) -> Stored = 102;
        /// Removes a key, saying whether it existed.
        rpc delete(Delete) -> Deleted = 104;
        /// Keys in order from a start key; error 400 past `MAX_SCAN`.
        rpc scan(Scan) -> Entries = 106;
    }
}

/// The server side: one map behind a lock.
#[derive(Default)]
struct Store(RwLock<BTreeMap<String, String>>);

impl store::Service for Store {
    fn get(&self, request: Get) -> Result<Value, ErrorReply> {
        match self.0.read().get(&request.key) {
            Some(value) => Ok(Value {
                value: value.clone(),
            }),
            None => Err(ErrorReply::new(NOT_FOUND, "no such key")),
        }
    }

    fn put(&self, request: Put) -> Result<Stored, ErrorReply> {
        let replaced = self.0.write().insert(request.key, request.value).is_some();
        Ok(Stored { replaced })
    }

    fn delete(&self, request: Delete) -> Result<Deleted, ErrorReply> {
        let existed = self.0.write().remove(&request.key).is_some();
        Ok(Deleted { existed })
    }

    fn scan(&self, request: Scan) -> Result<Entries, ErrorReply> {
        if request.limit > MAX_SCAN {
            return Err(ErrorReply::new(BAD_LIMIT, format!("limit over {MAX_SCAN}")));
        }
        let entries = (self.0.read())
            .range::<String, _>((Bound::Included(request.start), Bound::Unbounded))
            .take(request.limit as usize)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Entries { entries })
    }
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
    let transport = Transport::builder()
        .workers(workers.max(1))
        .dispatch(Dispatch::Workers)
        .status_page(status)
        .start()?;
    let router = store::Service::into_router(Store::default());
    let local = transport.listen(addr, router)?;
    Ok((transport, local))
}
