//! The timeout thread: where request deadlines and connect timeouts are
//! enforced.
//!
//! Each connection's [`ChannelPool`](crate::ChannelPool) orders its own
//! requests by deadline; this registry only holds, per connection, the
//! earliest deadline it was told about (plus connect timeouts). The thread
//! sleeps until the earliest one (never longer than a tick), visits just the
//! connections that are due and re-registers their next deadline. A tick's
//! cost follows what is due, not how many requests or connections exist.

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sync::{Condvar, Mutex};

use super::conn::Conn;
use super::{Command, Shared};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Expire the connection's due requests.
    Requests,
    /// Close the connection if it is still connecting.
    Connect,
    /// Start connecting (a reconnect delayed by backoff).
    ConnectAt,
}

struct Entry {
    at: Instant,
    seq: u64,
    kind: Kind,
    conn: Arc<Conn>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Default)]
struct State {
    heap: BinaryHeap<Reverse<Entry>>,
    /// Server connections by the time their idleness is next checked. Unlike
    /// the heap, entries leave when their connection closes, so a closed
    /// connection is never kept for the length of the idle timeout.
    idle: BTreeMap<(Instant, u64), Arc<Conn>>,
    seq: u64,
    /// When the sleeping thread will next look, if it sleeps.
    sleeping_until: Option<Instant>,
    stopping: bool,
}

pub(crate) struct TimerQueue {
    state: Mutex<State>,
    wakeup: Condvar,
    tick: Duration,
}

impl TimerQueue {
    pub(crate) fn new(tick: Duration) -> Self {
        TimerQueue {
            state: Mutex::new(State::default()),
            wakeup: Condvar::new(),
            tick,
        }
    }

    /// Makes sure `conn` is visited at `at` to expire its requests.
    pub(crate) fn register(&self, at: Instant, conn: Arc<Conn>) {
        self.push(at, Kind::Requests, conn);
    }

    /// Closes `conn` at `at` if it is still connecting then.
    pub(crate) fn register_connect(&self, at: Instant, conn: Arc<Conn>) {
        self.push(at, Kind::Connect, conn);
    }

    /// Asks the IO thread to start connecting `conn` at `at`. False if the
    /// timer has stopped: the caller must end `conn` itself.
    pub(crate) fn register_connect_at(&self, at: Instant, conn: Arc<Conn>) -> bool {
        self.push(at, Kind::ConnectAt, conn)
    }

    /// Checks at `at` whether connection `id`'s peer has been silent for the
    /// idle timeout. Called with the connection's state locked (see
    /// [`Conn::arm_idle`]).
    pub(crate) fn insert_idle(&self, at: Instant, id: u64, conn: Arc<Conn>) {
        let wake = {
            let mut state = self.state.lock();
            if state.stopping {
                return;
            }
            state.idle.insert((at, id), conn);
            state.sleeping_until.is_some_and(|until| at < until)
        };
        if wake {
            self.wakeup.notify_one();
        }
    }

    /// Forgets connection `id`'s idle check at `at` (it closed).
    pub(crate) fn remove_idle(&self, at: Instant, id: u64) -> Option<Arc<Conn>> {
        self.state.lock().idle.remove(&(at, id))
    }

    fn push(&self, at: Instant, kind: Kind, conn: Arc<Conn>) -> bool {
        let wake = {
            let mut state = self.state.lock();
            if state.stopping {
                return false;
            }
            state.seq += 1;
            let seq = state.seq;
            state.heap.push(Reverse(Entry {
                at,
                seq,
                kind,
                conn,
            }));
            state.sleeping_until.is_some_and(|until| at < until)
        };
        if wake {
            self.wakeup.notify_one();
        }
        true
    }

    /// Stops the timer thread. Returns the connections that were waiting
    /// for a delayed connect: nobody else knows them, so the caller fails
    /// their requests.
    pub(crate) fn stop(&self) -> Vec<Arc<Conn>> {
        let (dropped, idle) = {
            let mut state = self.state.lock();
            state.stopping = true;
            (
                std::mem::take(&mut state.heap),
                std::mem::take(&mut state.idle),
            )
        };
        drop(idle);
        self.wakeup.notify_one();
        (dropped.into_iter())
            .filter(|Reverse(entry)| entry.kind == Kind::ConnectAt)
            .map(|Reverse(entry)| entry.conn)
            .collect()
    }
}

/// The `tbnet-timer` thread's body.
pub(crate) fn run(shared: &Shared) {
    let timer = &shared.timer;
    let mut due: Vec<Entry> = Vec::new();
    let mut idle_due: Vec<Arc<Conn>> = Vec::new();
    let mut readies = Vec::new();
    loop {
        {
            let mut state = timer.state.lock();
            loop {
                if state.stopping {
                    return;
                }
                let now = Instant::now();
                while let Some(Reverse(top)) = state.heap.peek() {
                    if top.at > now {
                        break;
                    }
                    let Some(Reverse(entry)) = state.heap.pop() else {
                        break;
                    };
                    due.push(entry);
                }
                while let Some(entry) = state.idle.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    idle_due.push(entry.remove());
                }
                if !due.is_empty() || !idle_due.is_empty() {
                    state.sleeping_until = None;
                    break;
                }
                let next_idle = state.idle.first_key_value().map(|((at, _), _)| *at);
                let next = state.heap.peek().map(|Reverse(e)| e.at);
                let next = match (next, next_idle) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let until = next.map_or(now + timer.tick, |at| at.min(now + timer.tick));
                state.sleeping_until = Some(until);
                state = timer.wakeup.wait_until(state, until);
            }
        }
        let now = Instant::now();
        for entry in due.drain(..) {
            match entry.kind {
                Kind::Requests => {
                    if let Some(next) = entry.conn.expire(now, &mut readies) {
                        timer.register(next, entry.conn.clone());
                    }
                }
                Kind::Connect => {
                    // The IO thread decides: the connect may complete first.
                    if entry.conn.is_connecting() {
                        shared.command(Command::ConnectTimedOut(entry.conn));
                    }
                }
                Kind::ConnectAt => {
                    if !entry.conn.is_closed() {
                        shared.command(Command::Connect(entry.conn));
                    }
                }
            }
            for ready in readies.drain(..) {
                shared.deliver(ready);
            }
        }
        for conn in idle_due.drain(..) {
            let Some(limit) = shared.config.idle_timeout else {
                continue;
            };
            let due = conn.last_active() + limit;
            if due <= now {
                // The IO thread decides: a request may arrive first.
                shared.command(Command::IdleCheck(conn));
            } else {
                conn.arm_idle(due);
            }
        }
    }
}
