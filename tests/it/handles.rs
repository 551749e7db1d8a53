//! The public handles can cross and be shared between threads.

use tbnet::{
    CloseReason, ConnectionEvent, ConnectionHandle, ConnectionManager, Error, ListenOptions,
    Packet, Responder, ResponseFuture, SendError, StatsSnapshot, Transport, WaitObject,
};

fn assert_send<T: Send>() {}
fn assert_sync<T: Sync>() {}

#[test]
fn public_handles_are_send_and_sync() {
    assert_send::<Transport>();
    assert_sync::<Transport>();
    assert_send::<ConnectionManager>();
    assert_sync::<ConnectionManager>();
    assert_send::<Responder>();
    assert_sync::<Responder>();
    assert_send::<ResponseFuture>();
    assert_sync::<ResponseFuture>();
    assert_send::<WaitObject>();
    assert_sync::<WaitObject>();
    assert_send::<ConnectionHandle>();
    assert_sync::<ConnectionHandle>();
    assert_send::<ListenOptions>();
    assert_sync::<ListenOptions>();
}

#[test]
fn values_are_send_and_sync() {
    assert_send::<Packet>();
    assert_sync::<Packet>();
    assert_send::<Error>();
    assert_sync::<Error>();
    assert_send::<SendError<Packet>>();
    assert_sync::<SendError<Packet>>();
    assert_send::<StatsSnapshot>();
    assert_sync::<StatsSnapshot>();
    assert_send::<ConnectionEvent>();
    assert_sync::<ConnectionEvent>();
    assert_send::<CloseReason>();
    assert_sync::<CloseReason>();
}
