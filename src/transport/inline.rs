//! Replies made on the IO thread while it decodes a connection's requests
//! ([`Dispatch::IoThread`](crate::Dispatch::IoThread)) go straight into that
//! connection's write queue: no lock and no flush request per reply.
//!
//! The IO thread lends the queue to a thread-local slot for the length of a
//! decoded batch; a reply for that same connection made on this thread
//! meanwhile lands in it. Anything else (another connection, another
//! thread, a reply after the batch) takes the ordinary path.

use std::cell::RefCell;
use std::sync::Arc;

use super::conn::Conn;
use crate::packet::Packet;
use crate::proto::WriteQueue;

struct Lent {
    /// The connection, by address (compared, never dereferenced).
    conn: usize,
    queue: WriteQueue,
}

thread_local! {
    static LENT: RefCell<Option<Lent>> = const { RefCell::new(None) };
}

fn key(conn: &Arc<Conn>) -> usize {
    Arc::as_ptr(conn) as usize
}

/// IO thread: lends `queue` for replies to `conn` until [`end`].
pub(crate) fn begin(conn: &Arc<Conn>, queue: WriteQueue) {
    LENT.with(|lent| {
        *lent.borrow_mut() = Some(Lent {
            conn: key(conn),
            queue,
        })
    });
}

/// IO thread: takes the lent queue back, with the replies it gathered.
pub(crate) fn end() -> WriteQueue {
    LENT.with(|lent| {
        lent.borrow_mut()
            .take()
            .map(|l| l.queue)
            .unwrap_or_default()
    })
}

/// Bytes in the lent queue (0 if none is lent).
pub(crate) fn len() -> usize {
    LENT.with(|lent| lent.borrow().as_ref().map_or(0, |l| l.queue.len()))
}

/// Queues `packet` in the lent queue if it belongs to `conn`.
pub(crate) fn try_push(conn: &Arc<Conn>, packet: &Packet) -> bool {
    LENT.with(|lent| match lent.borrow_mut().as_mut() {
        Some(l) if l.conn == key(conn) => {
            l.queue.push(&*conn.shared.streamer, packet);
            true
        }
        _ => false,
    })
}
