//! A connection's state shared between the IO thread and everyone else.
//!
//! Callers and workers queue frames and register requests here under one
//! short lock; only the IO thread touches the socket, which it keeps in its
//! own table. Holding an `Arc<Conn>` (as a `Responder` does) names exactly
//! one connection: a reply for a connection that closed is dropped and
//! counted, never written to a newer connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::completion::{Cancel, Completion};
use crate::error::{Error, SendError};
use crate::packet::{ChannelId, Packet};
use crate::proto::{ChannelPool, Ready, WriteQueue};
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering};

use super::{Command, Shared};

/// The IO thread has not registered the connection yet.
pub(crate) const NO_TOKEN: usize = usize::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Server,
}

#[derive(Debug)]
pub(crate) enum Status {
    Connecting,
    Open,
    /// Closed; submissions fail with this error.
    Closed(Error),
}

pub(crate) struct ConnState {
    pool: ChannelPool,
    out: WriteQueue,
    status: Status,
    /// The connection reached `Open` at some point.
    opened: bool,
    /// Earliest deadline registered with the timer for this connection.
    timer_at: Option<Instant>,
    /// When the timer next checks this connection for idleness.
    idle_at: Option<Instant>,
}

/// A submission the connection refused, with everything handed back.
pub(crate) struct Rejected {
    pub(crate) error: Error,
    pub(crate) packet: Packet,
    pub(crate) completion: Completion,
}

pub(crate) struct Conn {
    /// Unique within its transport.
    id: u64,
    peer: SocketAddr,
    side: Side,
    pub(crate) shared: Arc<Shared>,
    state: Mutex<ConnState>,
    flush_scheduled: AtomicBool,
    token: AtomicUsize,
    /// When the peer last sent bytes, in ms since `Shared::epoch`.
    last_active_ms: AtomicU64,
}

impl Conn {
    pub(crate) fn new(
        shared: Arc<Shared>,
        peer: SocketAddr,
        side: Side,
        queue_limit: usize,
    ) -> Self {
        let status = match side {
            Side::Client => Status::Connecting,
            Side::Server => Status::Open,
        };
        Conn {
            id: shared.next_conn_id.fetch_add(1, Ordering::Relaxed),
            peer,
            side,
            shared,
            state: Mutex::new(ConnState {
                pool: ChannelPool::new(queue_limit),
                out: WriteQueue::new(),
                opened: side == Side::Server,
                status,
                timer_at: None,
                idle_at: None,
            }),
            flush_scheduled: AtomicBool::new(false),
            token: AtomicUsize::new(NO_TOKEN),
            last_active_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub(crate) fn side(&self) -> Side {
        self.side
    }

    pub(crate) fn token(&self) -> usize {
        self.token.load(Ordering::Acquire)
    }

    pub(crate) fn set_token(&self, token: usize) {
        self.token.store(token, Ordering::Release);
    }

    /// Whether submissions would fail (the connection closed).
    pub(crate) fn is_closed(&self) -> bool {
        matches!(self.state.lock().status, Status::Closed(_))
    }

    pub(crate) fn is_connecting(&self) -> bool {
        matches!(self.state.lock().status, Status::Connecting)
    }

    pub(crate) fn mark_open(&self) {
        let mut state = self.state.lock();
        if matches!(state.status, Status::Connecting) {
            state.status = Status::Open;
            state.opened = true;
        }
    }

    /// Whether the connection was ever established (a closed one that never
    /// was counts as a failed connect attempt).
    pub(crate) fn was_opened(&self) -> bool {
        self.state.lock().opened
    }

    /// Has the timer check at `at` whether the peer went silent, unless the
    /// connection closed. The registration happens under the connection's
    /// lock, so it can never outlive the close that removes it.
    pub(crate) fn arm_idle(self: &Arc<Self>, at: Instant) {
        let mut state = self.state.lock();
        if matches!(state.status, Status::Closed(_)) {
            return;
        }
        state.idle_at = Some(at);
        self.shared.timer.insert_idle(at, self.id, self.clone());
    }

    /// IO thread: the peer just sent something.
    pub(crate) fn touch(&self) {
        let ms = self.shared.epoch.elapsed().as_millis() as u64;
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }

    /// When the peer last sent something.
    pub(crate) fn last_active(&self) -> Instant {
        self.shared.epoch
            + std::time::Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed))
    }

    /// Registers a request and queues its frame. The request's channel id is
    /// set here.
    pub(crate) fn submit(
        self: &Arc<Self>,
        mut packet: Packet,
        sent: Instant,
        deadline: Instant,
        completion: Completion,
    ) -> Result<ChannelId, Rejected> {
        let register = {
            let mut state = self.state.lock();
            if let Status::Closed(error) = &state.status {
                let error = error.clone();
                return Err(Rejected {
                    error,
                    packet,
                    completion,
                });
            }
            if let Some(error) = self.too_large(&packet) {
                return Err(Rejected {
                    error,
                    packet,
                    completion,
                });
            }
            if state.out.len() >= self.shared.config.max_outbound {
                return Err(Rejected {
                    error: Error::QueueFull,
                    packet,
                    completion,
                });
            }
            let id = match state
                .pool
                .allocate_request(completion, packet.pcode(), sent, deadline)
            {
                Ok(id) => id,
                Err(completion) => {
                    return Err(Rejected {
                        error: Error::QueueFull,
                        packet,
                        completion,
                    })
                }
            };
            packet.set_channel_id(id);
            state.out.push(&*self.shared.streamer, &packet);
            let register = state.timer_at.map_or(true, |at| deadline < at);
            if register {
                state.timer_at = Some(deadline);
            }
            (id, register)
        };
        let (id, register) = register;
        tracing::debug!(
            peer = %self.peer,
            channel_id = %id,
            pcode = %packet.pcode(),
            body_len = packet.body().len(),
            "request sent"
        );
        self.shared.stats.pending_added();
        if register {
            self.shared.timer.register(deadline, self.clone());
        }
        self.schedule_flush();
        Ok(id)
    }

    /// `FrameTooLarge` if the streamer cannot frame `packet`'s body.
    fn too_large(&self, packet: &Packet) -> Option<Error> {
        let max = self.shared.streamer.max_body_len();
        let len = packet.body().len();
        (len > max).then_some(Error::FrameTooLarge {
            len: len as u64,
            max,
        })
    }

    /// Queues a frame that expects no response (channel id as given).
    pub(crate) fn send_frame(self: &Arc<Self>, packet: Packet) -> Result<(), SendError<Packet>> {
        if let Some(error) = self.too_large(&packet) {
            return Err(SendError::new(error, packet));
        }
        {
            let mut state = self.state.lock();
            if let Status::Closed(error) = &state.status {
                let error = error.clone();
                drop(state);
                return Err(SendError::new(error, packet));
            }
            // Replies are never refused (reading pauses instead); a client's
            // one-way messages are, like its requests.
            if self.side == Side::Client && state.out.len() >= self.shared.config.max_outbound {
                drop(state);
                return Err(SendError::new(Error::QueueFull, packet));
            }
            state.out.push(&*self.shared.streamer, &packet);
        }
        self.schedule_flush();
        Ok(())
    }

    /// Queues a reply: straight into the IO thread's queue when made by a
    /// handler running on it for this connection, else as any frame.
    pub(crate) fn send_reply(self: &Arc<Self>, packet: Packet) -> Result<(), SendError<Packet>> {
        if self.too_large(&packet).is_none() && super::inline::try_push(self, &packet) {
            return Ok(());
        }
        self.send_frame(packet)
    }

    /// Asks the IO thread to write this connection's queue, unless a request
    /// to do so is already on its way.
    pub(crate) fn schedule_flush(self: &Arc<Self>) {
        // The plain load keeps the common case (a flush already on its way)
        // free of read-modify-write traffic. Seeing `true` is enough: the IO
        // thread clears the flag before it takes the queue under its lock,
        // so a flush that is still pending will take this frame too.
        if self.flush_scheduled.load(Ordering::Acquire) {
            return;
        }
        if !self.flush_scheduled.swap(true, Ordering::AcqRel) {
            self.shared.command(Command::Flush(self.clone()));
        }
    }

    /// Bytes queued by senders and not yet taken by the IO thread.
    pub(crate) fn queued_len(&self) -> usize {
        self.state.lock().out.len()
    }

    /// Whether frames are queued and a flush was asked for.
    pub(crate) fn flush_pending(&self) -> bool {
        self.flush_scheduled.load(Ordering::Acquire)
    }

    /// IO thread: moves queued frames into its own write queue.
    pub(crate) fn take_output(&self, into: &mut WriteQueue) {
        // Clear first: a frame queued after the take schedules a new flush.
        self.flush_scheduled.store(false, Ordering::Release);
        let frames = {
            let mut state = self.state.lock();
            let frames = state.out.frames();
            into.append(&mut state.out);
            frames
        };
        // Counted here, once per batch, rather than by every sender.
        self.shared.stats.packets_out(frames);
    }

    /// IO thread: matches responses to pending requests. Responses that
    /// match nothing are counted and dropped.
    pub(crate) fn complete_responses(&self, responses: &mut Vec<Packet>, out: &mut Vec<Ready>) {
        let before = out.len();
        let mut late = 0;
        {
            let mut state = self.state.lock();
            for response in responses.drain(..) {
                let id = response.channel_id();
                match state.pool.finish(id, crate::proto::reply::classify(response)) {
                    Some(ready) => out.push(ready),
                    None => late += 1,
                }
            }
        }
        self.shared.stats.pending_removed(out.len() - before);
        self.trace_outcomes(&out[before..]);
        self.shared.stats.late_responses(late);
        if late > 0 {
            tracing::debug!(peer = %self.peer, late, "dropped responses matching no pending request");
        }
    }

    /// Timer thread: removes expired requests; returns the next deadline.
    pub(crate) fn expire(&self, now: Instant, out: &mut Vec<Ready>) -> Option<Instant> {
        let (expired, next) = {
            let mut state = self.state.lock();
            let expired = state.pool.expire(now, out);
            let next = state.pool.next_deadline();
            state.timer_at = next;
            (expired, next)
        };
        if expired > 0 {
            self.shared.stats.pending_removed(expired);
            self.shared.stats.timed_out(expired);
            self.trace_outcomes(&out[out.len() - expired..]);
        }
        next
    }

    /// Marks the connection closed and fails its pending requests: with
    /// `Shutdown` if `error` is `Shutdown`, else with `Disconnected`.
    /// Returns false if it was closed already.
    pub(crate) fn close(&self, error: Error, out: &mut Vec<Ready>) -> bool {
        let request_error = match error {
            Error::Shutdown => Error::Shutdown,
            _ => Error::Disconnected,
        };
        let before = out.len();
        let mut idle = None;
        {
            let mut state = self.state.lock();
            if matches!(state.status, Status::Closed(_)) {
                return false;
            }
            state.status = Status::Closed(request_error.clone());
            state.pool.fail_all(&request_error, out);
            // Release the table's memory: a closed connection may outlive its
            // close for a while (timer entries, responders still held).
            state.pool = ChannelPool::new(state.pool.capacity());
            state.out = WriteQueue::new();
            state.timer_at = None;
            if let Some(at) = state.idle_at.take() {
                // Dropped after the lock: it may be the last reference.
                idle = self.shared.timer.remove_idle(at, self.id);
            }
        }
        drop(idle);
        self.shared.stats.pending_removed(out.len() - before);
        self.trace_outcomes(&out[before..]);
        true
    }

    /// Logs how each request ended, at debug level (the counterpart of the
    /// "request sent" event, with the same fields).
    fn trace_outcomes(&self, readies: &[Ready]) {
        if !tracing::enabled!(tracing::Level::DEBUG) || readies.is_empty() {
            return;
        }
        let now = Instant::now();
        for ready in readies {
            let outcome = match ready.result() {
                Ok(_) => "response".to_string(),
                Err(e) => e.to_string(),
            };
            tracing::debug!(
                peer = %self.peer,
                channel_id = %ready.channel_id(),
                pcode = %ready.pcode(),
                outcome,
                elapsed_us = ready.elapsed(now).map_or(0, |d| d.as_micros() as u64),
                "request ended"
            );
        }
    }
}

impl Cancel for Conn {
    fn cancel(&self, id: ChannelId) {
        let ready = self.state.lock().pool.cancel(id);
        if let Some(ready) = ready {
            self.shared.stats.pending_removed(1);
            self.shared.deliver(ready);
        }
    }
}
