//! The timer table: every deadline of the transport, and the thread that
//! fires them.
//!
//! One ordered table answers "what is due next" for the four kinds of
//! deadline: a connection's earliest request deadline (its
//! [`ChannelPool`](crate::ChannelPool) orders the rest), a connection's own
//! deadline from its state machine (connect timeout, idle timeout), and a
//! delayed reconnect. Entries are keyed by `(when, sequence)` and removed
//! when their connection closes, so a closed connection is never held until
//! a far deadline. The `tbnet-timer` thread sleeps until the earliest entry
//! (never longer than a tick) and fires what is due: request expiry here,
//! connection deadlines and reconnects on the IO thread. A tick costs what
//! is due, not how many requests or connections exist.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sync::{Condvar, Mutex};

use super::conn::Conn;
use super::{Command, Shared};

/// A registered deadline, for removing it again.
pub(crate) type TimerKey = (Instant, u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Expire the connection's due requests (on the timer thread).
    Requests,
    /// The connection's state machine has something due (on the IO thread).
    Connection,
    /// Start connecting: a reconnect delayed by backoff (on the IO thread).
    Reconnect,
}

struct Entry {
    kind: Kind,
    conn: Arc<Conn>,
}

#[derive(Default)]
struct State {
    table: BTreeMap<TimerKey, Entry>,
    seq: u64,
    /// When the sleeping thread will next look, if it sleeps.
    sleeping_until: Option<Instant>,
    stopping: bool,
}

pub(crate) struct TimerTable {
    state: Mutex<State>,
    wakeup: Condvar,
    tick: Duration,
}

impl TimerTable {
    pub(crate) fn new(tick: Duration) -> Self {
        TimerTable {
            state: Mutex::new(State::default()),
            wakeup: Condvar::new(),
            tick,
        }
    }

    /// Fires `kind` for `conn` at `at`. `None` if the timer has stopped: a
    /// caller waiting on the entry must then end `conn` itself.
    pub(crate) fn insert(&self, at: Instant, kind: Kind, conn: Arc<Conn>) -> Option<TimerKey> {
        let (key, wake) = self.insert_quietly(at, kind, conn)?;
        if wake {
            self.wake();
        }
        Some(key)
    }

    /// [`insert`](Self::insert) for a caller holding a connection's lock:
    /// says whether the timer thread must be woken (with
    /// [`wake`](Self::wake), once that lock is released) instead of waking
    /// it here.
    pub(crate) fn insert_quietly(
        &self,
        at: Instant,
        kind: Kind,
        conn: Arc<Conn>,
    ) -> Option<(TimerKey, bool)> {
        let mut state = self.state.lock();
        if state.stopping {
            return None;
        }
        state.seq += 1;
        let key = (at, state.seq);
        state.table.insert(key, Entry { kind, conn });
        Some((key, state.sleeping_until.is_some_and(|until| at < until)))
    }

    /// Wakes the timer thread to look at an earlier deadline.
    pub(crate) fn wake(&self) {
        self.wakeup.notify_one();
    }

    /// Removes an entry (its connection closed or its deadline moved).
    /// Returns its connection so the caller can drop it outside its locks.
    #[must_use]
    pub(crate) fn remove(&self, key: TimerKey) -> Option<Arc<Conn>> {
        self.state.lock().table.remove(&key).map(|e| e.conn)
    }

    /// Stops the timer thread. Returns the connections that were waiting
    /// for a delayed reconnect: nobody else knows them, so the caller fails
    /// their requests.
    pub(crate) fn stop(&self) -> Vec<Arc<Conn>> {
        let table = {
            let mut state = self.state.lock();
            state.stopping = true;
            std::mem::take(&mut state.table)
        };
        self.wakeup.notify_one();
        (table.into_values())
            .filter(|entry| entry.kind == Kind::Reconnect)
            .map(|entry| entry.conn)
            .collect()
    }

    /// Sleeps until something is due (or the timer stops: `false`), then
    /// moves every due entry into `due`.
    fn wait_due(&self, due: &mut Vec<(TimerKey, Kind, Arc<Conn>)>) -> bool {
        let mut state = self.state.lock();
        loop {
            if state.stopping {
                return false;
            }
            let now = Instant::now();
            while let Some(entry) = state.table.first_entry() {
                let key = *entry.key();
                if entry.key().0 > now {
                    break;
                }
                let Entry { kind, conn } = entry.remove();
                due.push((key, kind, conn));
            }
            if !due.is_empty() {
                state.sleeping_until = None;
                return true;
            }
            let next = state.table.first_key_value().map(|((at, _), _)| *at);
            let until = next.map_or(now + self.tick, |at| at.min(now + self.tick));
            state.sleeping_until = Some(until);
            state = self.wakeup.wait_until(state, until);
        }
    }
}

/// The `tbnet-timer` thread's body.
pub(crate) fn run(shared: &Shared) {
    let mut due = Vec::new();
    while shared.timer.wait_due(&mut due) {
        let now = Instant::now();
        for (key, kind, conn) in due.drain(..) {
            match kind {
                Kind::Requests => conn.expire(key, now),
                // The IO thread decides: input or a completed connect may
                // have moved the deadline meanwhile.
                Kind::Connection => shared.command(Command::Timeout(conn)),
                Kind::Reconnect => {
                    if !conn.is_closed() {
                        shared.command(Command::Connect(conn));
                    }
                }
            }
        }
    }
}
