//! A connection's state shared between the IO thread and everyone else.
//!
//! Callers and workers queue frames and register requests here under one
//! short lock; only the IO thread touches the socket, which it keeps in its
//! own table. Holding an `Arc<Conn>` (as a `Responder` does) names exactly
//! one connection: a reply for a connection that closed is dropped and
//! counted, never written to a newer connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::completion::{Cancel, Completion};
use crate::error::{Error, SendError};
use crate::packet::{ChannelId, Packet};
use crate::proto::{ChannelPool, Codec, PacketStreamer, Ready, Side, WriteQueue, SERVER_BIT};
use crate::sync::{AtomicBool, AtomicUsize, Condvar, Mutex, Ordering};

use super::events::{ConnectionEvents, DefaultHandler};
use super::handler::ReplyTo;
use super::outcomes::Outcomes;
use super::stream::Security;
use super::timer::{Kind, TimerKey};
use super::{Command, Shared};

/// The IO thread has not registered the connection yet.
pub(crate) const NO_TOKEN: usize = usize::MAX;

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
    /// When the connection reached `Open`, if it did.
    opened_at: Option<Instant>,
    /// A response matched one of its requests (a client proved healthy).
    responded: bool,
    /// Closed before it proved healthy (clients; set when closed).
    ended_early: bool,
    /// Closed by its owner (`disconnect`, a handle's `close`): no word on
    /// the peer's health either way.
    closed_by_owner: bool,
    /// When it closed.
    closed_at: Option<Instant>,
    /// Why it closed (what `close` was given: an I/O error, a bad frame,
    /// `Shutdown`, ...), for `wait_open`.
    cause: Option<Error>,
    /// The timer entry that expires this connection's requests.
    requests_timer: Option<TimerKey>,
    /// The timer entry of a delayed reconnect.
    reconnect_timer: Option<TimerKey>,
    /// Requests handed to handlers that were answered (replied to, or
    /// dropped unanswered): a draining connection waits for all of them.
    answered: u64,
    /// The IO thread stopped reading for requests in flight: every answer
    /// may be the one it waits for, so even a dropped request wakes it.
    awaiting_answers: bool,
    /// The peer ended its sending side: every answer may be the last one
    /// the connection waits for, so even a dropped request wakes the IO
    /// thread.
    draining: bool,
    /// Submitters blocked in `room` until a request slot frees: whoever
    /// frees one (or closes) notifies them after releasing the lock.
    room_waiters: usize,
}

/// How a client connection ended, for its manager's reconnect backoff.
pub(crate) struct Ended {
    /// Before it proved healthy.
    pub(crate) early: bool,
    /// Closed by its owner: says nothing about the peer.
    pub(crate) by_owner: bool,
    /// When it closed.
    pub(crate) at: Instant,
}

/// A submission the connection refused, with everything handed back.
pub(crate) struct Rejected {
    pub(crate) error: Error,
    pub(crate) packet: Packet,
    pub(crate) completion: Completion,
}

impl Rejected {
    pub(crate) fn new(error: Error, packet: Packet, completion: Completion) -> Self {
        Rejected {
            error,
            packet,
            completion,
        }
    }
}

impl From<Rejected> for SendError<Packet> {
    /// The caller's error: the packet handed back, the completion disarmed
    /// (the caller hears of the refusal from this error, not from it).
    fn from(rejected: Rejected) -> Self {
        rejected.completion.disarm();
        SendError::new(rejected.error, rejected.packet)
    }
}

pub(crate) struct Conn {
    peer: SocketAddr,
    side: Side,
    /// Unique among the transport's connections.
    id: u64,
    /// How packets become bytes on this connection.
    codec: Codec,
    /// What hears this connection open and close.
    events: Option<Arc<dyn ConnectionEvents>>,
    /// A client connection to a server its manager was connected to before.
    reconnect: bool,
    /// Clients: where packets matching no request go.
    default_handler: Option<Arc<DefaultHandler>>,
    /// Servers: a request was sent over this connection, so frames from the
    /// client may be responses (checked once per decode pass).
    expects_responses: AtomicBool,
    pub(crate) shared: Arc<Shared>,
    state: Mutex<ConnState>,
    /// Signalled when a full channel pool gets room or the connection
    /// closes, for submitters that wait for room.
    room: Condvar,
    flush_scheduled: AtomicBool,
    /// The IO thread's inline decode passes going on now: replies made
    /// meanwhile need no flush request each, the pass's end takes them.
    batches: AtomicUsize,
    token: AtomicUsize,
    /// Clients: how long an open connection must last to count as healthy
    /// when no response arrived on it.
    grace: Duration,
    /// Clients: plain TCP or TLS.
    security: Security,
}

impl Conn {
    pub(crate) fn new(
        shared: Arc<Shared>,
        peer: SocketAddr,
        side: Side,
        queue_limit: usize,
        grace: Duration,
    ) -> Self {
        let status = match side {
            Side::Client => Status::Connecting,
            Side::Server => Status::Open,
        };
        let pool = match side {
            Side::Client => ChannelPool::new(queue_limit),
            Side::Server => ChannelPool::with_high_bit(queue_limit),
        };
        Conn {
            peer,
            side,
            id: shared.next_conn_id(),
            codec: shared.codec.clone(),
            events: None,
            reconnect: false,
            default_handler: None,
            expects_responses: AtomicBool::new(false),
            shared,
            state: Mutex::new(ConnState {
                pool,
                out: WriteQueue::new(),
                opened_at: None,
                responded: false,
                ended_early: false,
                closed_by_owner: false,
                closed_at: None,
                cause: None,
                status,
                requests_timer: None,
                reconnect_timer: None,
                answered: 0,
                awaiting_answers: false,
                draining: false,
                room_waiters: 0,
            }),
            room: Condvar::new(),
            flush_scheduled: AtomicBool::new(false),
            batches: AtomicUsize::new(0),
            token: AtomicUsize::new(NO_TOKEN),
            grace,
            security: Security::Plain,
        }
    }

    /// A client connection that speaks `security` (default plain TCP).
    pub(crate) fn with_security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    pub(crate) fn security(&self) -> &Security {
        &self.security
    }

    /// IO thread: reading stopped for requests in flight; from now on every
    /// answer wakes the IO thread. Returns how many requests were answered
    /// in all, taking the replies queued so far into `into` (an answer
    /// given before this woke nobody).
    pub(crate) fn await_answers(&self, into: &mut WriteQueue) -> u64 {
        self.state.lock().awaiting_answers = true;
        self.take_output(into)
    }

    /// IO thread: the in-flight hold lifted; answers need not wake it.
    pub(crate) fn stop_awaiting_answers(&self) {
        self.state.lock().awaiting_answers = false;
    }

    /// Frames this connection with `codec` instead of the transport's.
    pub(crate) fn with_codec(mut self, codec: Option<Codec>) -> Self {
        if let Some(codec) = codec {
            self.codec = codec;
        }
        self
    }

    /// Tells `events` (if any) when this connection opens and closes; a
    /// `reconnect` reports its opening as a reconnect.
    pub(crate) fn with_events(
        mut self,
        events: Option<Arc<dyn ConnectionEvents>>,
        reconnect: bool,
    ) -> Self {
        self.events = events;
        self.reconnect = reconnect;
        self
    }

    /// Clients: hands packets matching no request to `handler`'s handler.
    pub(crate) fn with_default_handler(mut self, handler: Arc<DefaultHandler>) -> Self {
        self.default_handler = Some(handler);
        self
    }

    pub(crate) fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn side(&self) -> Side {
        self.side
    }

    pub(crate) fn codec(&self) -> &Codec {
        &self.codec
    }

    pub(crate) fn events(&self) -> Option<&Arc<dyn ConnectionEvents>> {
        self.events.as_ref()
    }

    pub(crate) fn is_reconnect(&self) -> bool {
        self.reconnect
    }

    /// Whether the connection ever opened.
    pub(crate) fn was_opened(&self) -> bool {
        let state = self.state.lock();
        state.opened_at.is_some() || self.side == Side::Server
    }

    /// Servers: requests go out on this connection from now on.
    pub(crate) fn expect_responses(&self) {
        if !self.expects_responses.load(Ordering::Relaxed) {
            self.expects_responses.store(true, Ordering::Release);
        }
    }

    /// Servers: whether frames from the client may be responses.
    pub(crate) fn expects_responses(&self) -> bool {
        self.expects_responses.load(Ordering::Acquire)
    }

    /// Servers that sent requests on this connection: completes the request
    /// `response` answers, or hands it back (it is a request from the
    /// client). An id with bit 31 that matches nothing is a late answer
    /// (its request timed out or was cancelled): counted and dropped, never
    /// taken for a request, which the handler would answer with an id the
    /// client takes for a server-initiated packet.
    pub(crate) fn take_response(&self, response: Packet) -> Result<(), Packet> {
        // Ids this server issues carry bit 31: anything else is a request,
        // told apart without the lock.
        let id = response.channel_id();
        if id.get() & SERVER_BIT == 0 {
            return Err(response);
        }
        let ready = (self.state.lock().pool).finish(id, crate::proto::reply::classify(response));
        match ready {
            Some(ready) => {
                self.shared.stats.pending_removed(1);
                self.trace_outcomes(std::slice::from_ref(&ready));
                self.shared.deliver_all(std::iter::once(ready));
            }
            None => self.shared.stats.late_responses(1),
        }
        Ok(())
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

    /// The connect completed at `now`.
    pub(crate) fn mark_open(&self, now: Instant) {
        let waiters = {
            let mut state = self.state.lock();
            if matches!(state.status, Status::Connecting) {
                state.status = Status::Open;
                state.opened_at = Some(now);
            }
            state.room_waiters > 0
        };
        self.wake_room_waiters(waiters);
    }

    /// Blocks until the connection is open (`Ok`), closed (the cause it
    /// closed with), or `until` passes (`Timeout`). Woken by `mark_open` and
    /// `close`.
    pub(crate) fn wait_open(&self, until: Instant) -> Result<(), Error> {
        let mut state = self.state.lock();
        loop {
            match &state.status {
                Status::Open => return Ok(()),
                Status::Closed(error) => {
                    return Err(state.cause.clone().unwrap_or_else(|| error.clone()))
                }
                Status::Connecting if Instant::now() >= until => return Err(Error::Timeout),
                Status::Connecting => {
                    state.room_waiters += 1;
                    state = self.room.wait_until(state, until);
                    state.room_waiters -= 1;
                }
            }
        }
    }

    /// `None` while open; once closed, when, whether by its owner, and
    /// whether before it proved healthy: it never opened, or it closed
    /// within the grace with no response (always false for server
    /// connections and closes by the owner).
    pub(crate) fn closed_early(&self) -> Option<Ended> {
        let state = self.state.lock();
        state.closed_at.map(|at| Ended {
            early: state.ended_early,
            by_owner: state.closed_by_owner,
            at,
        })
    }

    /// Has the timer start connecting at `at` (a reconnect delayed by
    /// backoff). False if the timer has stopped: the caller ends `conn`.
    pub(crate) fn connect_at(self: &Arc<Self>, at: Instant) -> bool {
        let inserted = {
            let mut state = self.state.lock();
            if matches!(state.status, Status::Closed(_)) {
                return true;
            }
            let inserted = (self.shared.timer).insert_quietly(at, Kind::Reconnect, self.clone());
            state.reconnect_timer = inserted.map(|(key, _)| key);
            inserted
        };
        match inserted {
            Some((_, wake)) => {
                if wake {
                    self.shared.timer.wake();
                }
                true
            }
            None => false,
        }
    }

    /// Changes how many requests may be pending (see
    /// `ChannelPool::set_limit`); returns the limit now in force. A raise
    /// wakes submitters waiting for room.
    pub(crate) fn set_queue_limit(&self, limit: usize) -> usize {
        let (limit, notify) = {
            let mut state = self.state.lock();
            let limit = state.pool.set_limit(limit);
            (limit, state.room_waiters > 0 && state.pool.has_room())
        };
        if notify {
            self.room.notify_all();
        }
        limit
    }

    /// Submitters blocked now waiting for room (or for the connect).
    pub(crate) fn room_waiters(&self) -> usize {
        self.state.lock().room_waiters
    }

    /// After a removal: wakes the submitters waiting for room, if any (the
    /// caller read `room_waiters` under the lock and calls this after it).
    fn wake_room_waiters(&self, waiters: bool) {
        if waiters {
            self.room.notify_all();
        }
    }

    /// A reconnect delayed by backoff starts now (an explicit connect):
    /// takes its timer entry and hands the connect to the IO thread. Does
    /// nothing if no delayed connect is waiting, or the timer already took
    /// it (then it is on its way).
    pub(crate) fn connect_now(self: &Arc<Self>) {
        let taken = {
            let mut state = self.state.lock();
            (state.reconnect_timer.take()).and_then(|key| self.shared.timer.remove(key))
        };
        // After the lock: it may be the last reference, and a command may
        // fail requests.
        if let Some(conn) = taken {
            self.shared.command(Command::Connect(conn));
        }
    }

    /// Registers a request and queues its frame. The request's channel id is
    /// set here.
    ///
    /// When the channel pool is full and `room_until` is given, waits until
    /// then for a slot to free (woken by whatever frees one, or by the
    /// connection closing) instead of refusing at once.
    pub(crate) fn submit(
        self: &Arc<Self>,
        mut packet: Packet,
        sent: Instant,
        deadline: Instant,
        completion: Completion,
        room_until: Option<Instant>,
    ) -> Result<ChannelId, Rejected> {
        let mut completion = completion;
        let register = {
            let mut state = self.state.lock();
            let id = loop {
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
                match (state.pool).allocate_request(completion, packet.pcode(), sent, deadline) {
                    Ok(id) => break id,
                    Err(back) => completion = back,
                }
                // Full: wait for room if asked to (a slot freed, a raised
                // limit or a close notifies), else refuse at once.
                match room_until {
                    Some(until) if Instant::now() < until => {
                        state.room_waiters += 1;
                        state = self.room.wait_until(state, until);
                        state.room_waiters -= 1;
                    }
                    _ => {
                        return Err(Rejected {
                            error: Error::QueueFull,
                            packet,
                            completion,
                        })
                    }
                }
            };
            packet.set_channel_id(id);
            state.out.push(&self.codec, &packet);
            // One timer entry per connection, at its earliest deadline: an
            // earlier one replaces it (the old connection reference is
            // dropped after the lock).
            let earlier = state.requests_timer.map_or(true, |(at, _)| deadline < at);
            let mut wake = false;
            let replaced = if earlier {
                let old = state.requests_timer.take();
                let inserted =
                    (self.shared.timer).insert_quietly(deadline, Kind::Requests, self.clone());
                state.requests_timer = inserted.map(|(key, _)| key);
                wake = inserted.is_some_and(|(_, wake)| wake);
                old.and_then(|key| self.shared.timer.remove(key))
            } else {
                None
            };
            (id, replaced, wake)
        };
        let (id, replaced, wake) = register;
        drop(replaced);
        if wake {
            // After the lock: no thread is woken while one is held.
            self.shared.timer.wake();
        }
        tracing::debug!(
            peer = %self.peer,
            channel_id = %id,
            pcode = %packet.pcode(),
            body_len = packet.body().len(),
            "request sent"
        );
        self.shared.stats.pending_added();
        self.schedule_flush();
        Ok(id)
    }

    /// `FrameTooLarge` if the streamer cannot frame `packet`'s body.
    fn too_large(&self, packet: &Packet) -> Option<Error> {
        let max = self.codec.max_body_len();
        let len = packet.body().len();
        (len > max).then_some(Error::FrameTooLarge {
            len: len as u64,
            max,
        })
    }

    /// Queues a server's reply and counts its request as answered; a reply
    /// refused (the connection closed, or too large) is counted as dropped.
    pub(crate) fn send_reply(self: &Arc<Self>, packet: Packet) -> Result<(), SendError<Packet>> {
        self.queue_frame(packet, true)
    }

    /// Queues a frame that expects no response (channel id as given): a
    /// server's one-way packet to its client.
    pub(crate) fn send_frame(self: &Arc<Self>, packet: Packet) -> Result<(), SendError<Packet>> {
        self.queue_frame(packet, false)
    }

    /// A request no route wanted: counted in the transport's stats.
    pub(crate) fn count_unrouted(&self) {
        self.shared.stats.unrouted();
    }

    /// A request handed to a handler ended without a reply.
    pub(crate) fn answered_without_reply(self: &Arc<Self>) {
        let flush = {
            let mut state = self.state.lock();
            state.answered += 1;
            (state.draining || state.awaiting_answers)
                && !self.in_batch()
                && !matches!(state.status, Status::Closed(_))
        };
        // The IO thread looks at the count when it flushes: a draining
        // connection may be done now.
        if flush {
            self.schedule_flush();
        }
    }

    fn queue_frame(self: &Arc<Self>, packet: Packet, reply: bool) -> Result<(), SendError<Packet>> {
        if let Some(error) = self.too_large(&packet) {
            if reply {
                self.answered_without_reply();
                self.shared.stats.reply_dropped();
            }
            return Err(SendError::new(error, packet));
        }
        let flush = {
            let mut state = self.state.lock();
            if reply {
                state.answered += 1;
            }
            if let Status::Closed(error) = &state.status {
                let error = error.clone();
                drop(state);
                if reply {
                    self.shared.stats.reply_dropped();
                }
                return Err(SendError::new(error, packet));
            }
            // Replies are never refused (reading pauses instead); one-way
            // messages are, like requests.
            if !reply && state.out.len() >= self.shared.config.max_outbound {
                drop(state);
                return Err(SendError::new(Error::QueueFull, packet));
            }
            state.out.push(&self.codec, &packet);
            // Read under the lock: see `end_batch`.
            !self.in_batch()
        };
        if flush {
            self.schedule_flush();
        }
        Ok(())
    }

    /// IO thread: the peer ended its sending side. Moves queued replies
    /// into `into` and returns how many requests were answered in all (the
    /// count and the replies it covers are taken together, so a request
    /// never counts as answered while its reply is left behind). From now
    /// on every answer wakes the IO thread.
    pub(crate) fn set_draining(&self, into: &mut WriteQueue) -> u64 {
        let mut state = self.state.lock();
        state.draining = true;
        self.shared.stats.packets_out(state.out.frames());
        into.append(&mut state.out);
        state.answered
    }

    /// IO thread: a decode batch begins; replies made during it are taken
    /// by [`end_batch`](Self::end_batch) without a flush request each.
    pub(crate) fn begin_batch(&self) {
        self.batches.fetch_add(1, Ordering::SeqCst);
    }

    fn in_batch(&self) -> bool {
        self.batches.load(Ordering::SeqCst) > 0
    }

    /// IO thread: the decode batch ended; moves the replies it produced into
    /// `into` and returns how many requests were answered in all.
    ///
    /// A reply queued under the lock either comes before this take (and is
    /// taken) or after it, and then it sees the flag cleared (the clear
    /// precedes the take) and asks for a flush itself: none is left behind.
    pub(crate) fn end_batch(&self, into: &mut WriteQueue) -> u64 {
        self.batches.fetch_sub(1, Ordering::SeqCst);
        let mut state = self.state.lock();
        self.shared.stats.packets_out(state.out.frames());
        into.append(&mut state.out);
        state.answered
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

    /// Whether a flush was asked for and not yet taken (frames may have been
    /// taken meanwhile by `end_batch` or `set_draining`: then the flush
    /// finds nothing, which is harmless).
    pub(crate) fn flush_pending(&self) -> bool {
        self.flush_scheduled.load(Ordering::Acquire)
    }

    /// IO thread: moves queued frames into its own write queue; returns
    /// how many requests were answered in all.
    pub(crate) fn take_output(&self, into: &mut WriteQueue) -> u64 {
        // Clear first: a frame queued after the take schedules a new flush.
        self.flush_scheduled.store(false, Ordering::Release);
        let (frames, answered) = {
            let mut state = self.state.lock();
            let frames = state.out.frames();
            into.append(&mut state.out);
            (frames, state.answered)
        };
        // Counted here, once per batch, rather than by every sender.
        self.shared.stats.packets_out(frames);
        answered
    }

    /// IO thread: matches responses to pending requests. Responses that
    /// match nothing are counted and dropped; packets the server sent on
    /// its own (channel id 0 or bit 31 set) go to the default handler.
    /// `buffer` is reused.
    pub(crate) fn complete_responses(
        self: &Arc<Self>,
        responses: &mut Vec<Packet>,
        mut buffer: Vec<Ready>,
    ) -> Outcomes<'_> {
        let mut late = 0;
        // Allocates only when the server sent something of its own.
        let mut unsolicited = Vec::new();
        let mut discarded = 0;
        let room_waiters = {
            let mut state = self.state.lock();
            for response in responses.drain(..) {
                let id = response.channel_id();
                if id.get() & SERVER_BIT != 0 || id.is_none() {
                    unsolicited.push(response);
                    continue;
                }
                match state
                    .pool
                    .finish(id, crate::proto::reply::classify(response))
                {
                    // A post's reply: nobody waits for it; its `Ready`
                    // fires nothing.
                    Some(ready) if ready.is_discard() => discarded += 1,
                    Some(ready) => buffer.push(ready),
                    None => late += 1,
                }
            }
            let freed = !buffer.is_empty() || discarded > 0;
            if freed {
                state.responded = true;
            }
            // Only a batch that freed slots makes room (a batch of late or
            // unsolicited packets does not).
            freed && state.room_waiters > 0
        };
        self.wake_room_waiters(room_waiters);
        self.shared.stats.pending_removed(buffer.len() + discarded);
        self.shared.stats.post_replies(discarded);
        self.trace_outcomes(&buffer);
        self.shared.stats.late_responses(late);
        if late > 0 {
            tracing::debug!(peer = %self.peer, late, "dropped responses matching no pending request");
        }
        for packet in unsolicited {
            self.unsolicited(packet, &mut buffer);
        }
        Outcomes::new(&self.shared, buffer)
    }

    /// A packet the server sent on its own: queued for the default handler
    /// (with a way to reply, on the same thread as callbacks), or counted
    /// as unhandled (no handler, or the callback queue is full).
    fn unsolicited(self: &Arc<Self>, packet: Packet, into: &mut Vec<Ready>) {
        let handler = self.default_handler.as_ref().and_then(|h| h.lock().clone());
        // A server flooding the client cannot grow its callback queue
        // past the limit that bounds its own callbacks.
        let handler = handler.filter(|_| !self.shared.workers.callbacks_full());
        let Some(handler) = handler else {
            self.shared.stats.unhandled();
            tracing::debug!(peer = %self.peer, channel_id = %packet.channel_id(), pcode = %packet.pcode(), "packet from the server matching no request, and no default handler");
            return;
        };
        // Counted with the requests this transport answers (server rows).
        let reply = ReplyTo::new(self.clone(), &packet, Instant::now());
        let run = move |packet: Result<Packet, Error>| {
            if let Ok(packet) = packet {
                handler.handle_request(packet, reply);
            }
        };
        into.push(Ready::new(Completion::callback(run), Ok(packet)));
    }

    /// Timer thread: ends the requests due at `now` with `Timeout` and
    /// registers the next deadline.
    ///
    /// `fired` is the entry that brought the timer here; it has left the
    /// table. A submit may have registered an earlier entry meanwhile: that
    /// one stays the connection's, so no entry is ever left untracked.
    pub(crate) fn expire(self: &Arc<Self>, fired: TimerKey, now: Instant) {
        let mut expired = Vec::new();
        let room_waiters;
        let replaced = {
            let mut state = self.state.lock();
            if state.requests_timer == Some(fired) {
                state.requests_timer = None;
            }
            if matches!(state.status, Status::Closed(_)) {
                return;
            }
            state.pool.expire(now, &mut expired);
            room_waiters = state.room_waiters > 0 && !expired.is_empty();
            let next = state.pool.next_deadline();
            match (next, state.requests_timer) {
                (Some(next), tracked) if tracked.map_or(true, |(at, _)| next < at) => {
                    // On the timer thread itself: nobody to wake.
                    state.requests_timer = (self.shared.timer)
                        .insert_quietly(next, Kind::Requests, self.clone())
                        .map(|(key, _)| key);
                    tracked.and_then(|key| self.shared.timer.remove(key))
                }
                _ => None,
            }
        };
        // Dropped after the lock: it may be the last reference.
        drop(replaced);
        self.wake_room_waiters(room_waiters);
        let outcomes = Outcomes::new(&self.shared, expired);
        if outcomes.len() > 0 {
            self.shared.stats.pending_removed(outcomes.len());
            self.shared.stats.timed_out(outcomes.len());
            self.trace_outcomes(outcomes.as_slice());
        }
    }

    /// Marks the connection closed and takes its pending requests, failed
    /// with `Shutdown` if `error` is `Shutdown`, else with `Disconnected`.
    /// Empty if it was closed already.
    pub(crate) fn close(&self, error: Error) -> Outcomes<'_> {
        self.close_as(error, false)
    }

    /// Closed by its owner (`ConnectionManager::disconnect`, a handle's
    /// `close`): pending requests fail with `Disconnected` now, the close
    /// says nothing about the peer's health (it is no early failure), and
    /// the IO thread is asked to drop the socket (or the pending connect).
    pub(crate) fn disconnect(self: &Arc<Self>) {
        // Callbacks of the failed requests run after the lock.
        drop(self.close_by_owner());
        (self.shared).command(Command::Close(self.clone(), Error::Disconnected));
    }

    fn close_by_owner(&self) -> Outcomes<'_> {
        self.close_as(Error::Disconnected, true)
    }

    fn close_as(&self, error: Error, by_owner: bool) -> Outcomes<'_> {
        let request_error = match error {
            Error::Shutdown => Error::Shutdown,
            _ => Error::Disconnected,
        };
        let mut failed = Vec::new();
        let mut timers = Vec::new();
        let room_waiters = {
            let mut state = self.state.lock();
            if matches!(state.status, Status::Closed(_)) {
                return Outcomes::new(&self.shared, failed);
            }
            let now = Instant::now();
            state.closed_at = Some(now);
            state.closed_by_owner = by_owner;
            // Our own shutdown or disconnect says nothing about the peer's
            // health.
            if self.side == Side::Client && !by_owner && !matches!(error, Error::Shutdown) {
                let proved =
                    state.responded || state.opened_at.is_some_and(|at| now - at >= self.grace);
                state.ended_early = !proved;
            }
            state.status = Status::Closed(request_error.clone());
            state.cause = Some(error);
            state.pool.fail_all(&request_error, &mut failed);
            // Release the table's memory: a closed connection may outlive its
            // close for a while (responders still held).
            state.pool = ChannelPool::new(state.pool.capacity());
            state.out = WriteQueue::new();
            for key in [state.requests_timer.take(), state.reconnect_timer.take()]
                .into_iter()
                .flatten()
            {
                // Dropped after the lock: it may be the last reference.
                timers.extend(self.shared.timer.remove(key));
            }
            if state.ended_early {
                self.shared.stats.early_failure();
            }
            state.room_waiters > 0
        };
        drop(timers);
        // Waiters see the close and give up.
        self.wake_room_waiters(room_waiters);
        self.shared.stats.pending_removed(failed.len());
        self.trace_outcomes(&failed);
        Outcomes::new(&self.shared, failed)
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
        let (cancelled, room_waiters) = {
            let mut state = self.state.lock();
            (state.pool.cancel(id), state.room_waiters > 0)
        };
        if let Some(ready) = cancelled {
            self.wake_room_waiters(room_waiters);
            self.shared.stats.pending_removed(1);
            self.shared.deliver_all(std::iter::once(ready));
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! The ways a request ends, raced through the real connection: its
    //! response (IO thread), its deadline (timer thread), its caller giving
    //! up (any thread) and the connection closing. Each model checks that
    //! exactly one of them ends the request, that its caller sees that one
    //! outcome, and that the counters agree with it.

    use super::*;
    use crate::completion::{CancelHandle, ResponseFuture};
    use crate::transport::Transport;
    use loom::thread;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Wake, Waker};

    const PCODE: i32 = 7;

    /// A client connection opened at `t0`, and the poller its waker belongs
    /// to (kept so the waker stays registered).
    fn open_client(t0: Instant) -> (Arc<Conn>, mio::Poll) {
        let (shared, poll) = Shared::new(Transport::builder()).expect("a poller and its waker");
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        let conn = Conn::new(Arc::new(shared), peer, Side::Client, 4, Duration::ZERO);
        conn.mark_open(t0);
        (Arc::new(conn), poll)
    }

    /// Submits a request pending until `deadline`.
    fn request(conn: &Arc<Conn>, t0: Instant, deadline: Instant) -> (ChannelId, ResponseFuture) {
        let (future, completion) = ResponseFuture::new();
        match conn.submit(Packet::new(PCODE, "ping"), t0, deadline, completion, None) {
            Ok(id) => (id, future),
            Err(rejected) => panic!("submit refused: {}", rejected.error),
        }
    }

    /// What the IO thread does with a response read for `id`.
    fn respond(conn: &Arc<Conn>, id: ChannelId) {
        let mut response = Packet::new(PCODE, "pong");
        response.set_channel_id(id);
        drop(conn.complete_responses(&mut vec![response], Vec::new()));
    }

    struct NoWake;

    impl Wake for NoWake {
        fn wake(self: Arc<Self>) {}
    }

    /// The future's outcome, which must have arrived by now.
    fn outcome(mut future: ResponseFuture) -> Result<Packet, Error> {
        let waker = Waker::from(Arc::new(NoWake));
        match Pin::new(&mut future).poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(result) => result,
            Poll::Pending => panic!("the request was never ended"),
        }
    }

    /// Breaks the cycles through the shared state (the queued flush
    /// command, timer entries) so each execution frees what it built.
    fn teardown(conn: Arc<Conn>) {
        let shared = conn.shared.clone();
        drop(conn);
        while let Some(command) = shared.commands.pop() {
            drop(command);
        }
        drop(shared.timer.stop());
    }

    /// Response, deadline, cancel and close race for one request whose
    /// deadline has passed, so each of them could end it. A second request,
    /// due later, makes the timer path re-register the connection's next
    /// deadline while the close may be removing it.
    ///
    /// A completion fires at most once by construction (`complete`
    /// consumes it); what can go wrong is two paths each believing they
    /// ended the request (counted twice), none delivering (the future
    /// stays pending, or sees `Shutdown` from a dropped completion), or a
    /// closed connection left in the timer table.
    #[test]
    fn loom_conn_complete_expire_cancel_close_end_a_request_exactly_once() {
        let mut model = loom::model::Builder::new();
        // Unbounded, four threads take hundreds of thousands of executions
        // (minutes); four preemptions cover every order of the four
        // removals with room to spare, in seconds.
        model.preemption_bound = Some(4);
        model.check(|| {
            let t0 = Instant::now();
            let (conn, _poll) = open_client(t0);
            let (id, future) = request(&conn, t0, t0);
            let (_, later) = request(&conn, t0, t0 + Duration::from_secs(7200));
            let key = conn.state.lock().requests_timer;
            let key = key.expect("the earliest deadline is in the timer table");
            let responder = {
                let conn = conn.clone();
                thread::spawn(move || respond(&conn, id))
            };
            // The timer thread takes the due entry out of the table (as
            // `wait_due` does; a close may have removed it first), then
            // expires the connection's due requests.
            let timer = {
                let conn = conn.clone();
                thread::spawn(move || {
                    if let Some(due) = conn.shared.timer.remove(key) {
                        due.expire(key, t0 + Duration::from_secs(3600));
                    }
                })
            };
            let caller = {
                let conn = conn.clone();
                thread::spawn(move || Cancel::cancel(&*conn, id))
            };
            drop(conn.close(Error::Disconnected));
            for racer in [responder, timer, caller] {
                racer.join().unwrap();
            }

            let result = outcome(future);
            let responded = matches!(&result, Ok(p) if &p.body()[..] == b"pong");
            assert!(
                responded
                    || matches!(
                        result,
                        Err(Error::Timeout | Error::Cancelled | Error::Disconnected)
                    ),
                "unexpected outcome {result:?}"
            );
            assert!(matches!(outcome(later), Err(Error::Disconnected)));
            let stats = conn.shared.stats.snapshot();
            assert_eq!(stats.pending, 0);
            assert_eq!(
                stats.timeouts,
                u64::from(matches!(result, Err(Error::Timeout))),
                "counted as a timeout iff it timed out"
            );
            assert_eq!(
                stats.late_responses,
                u64::from(!responded),
                "the response was dropped as late iff something else ended the request"
            );
            {
                let state = conn.state.lock();
                assert!(state.pool.is_empty());
                assert!(matches!(state.status, Status::Closed(_)));
                assert!(
                    state.requests_timer.is_none(),
                    "a closed connection keeps a deadline"
                );
            }
            teardown(conn);
        });
    }

    /// A submission finds the queue full and waits for room while the
    /// response that frees it arrives: whichever comes first, the waiter is
    /// not left asleep (loom reports a deadlock if the wakeup is lost).
    #[test]
    fn loom_conn_a_submission_waiting_for_room_is_woken_by_a_response() {
        loom::model(|| {
            let t0 = Instant::now();
            let far = t0 + Duration::from_secs(3600);
            let (conn, _poll) = open_client(t0);
            conn.set_queue_limit(1);
            let (id, first) = request(&conn, t0, far);
            let responder = {
                let conn = conn.clone();
                thread::spawn(move || respond(&conn, id))
            };
            let (second, completion) = ResponseFuture::new();
            let submitted =
                conn.submit(Packet::new(PCODE, "second"), t0, far, completion, Some(far));
            responder.join().unwrap();

            assert!(submitted.is_ok(), "the freed slot went to the waiter");
            assert!(matches!(outcome(first), Ok(p) if &p.body()[..] == b"pong"));
            assert_eq!(conn.room_waiters(), 0);
            assert_eq!(conn.state.lock().pool.len(), 1);
            drop(second);
            teardown(conn);
        });
    }

    /// A caller drops its future, which withdraws the request through the
    /// connection (the `CancelHandle` the client attaches), while the
    /// response arrives: the request leaves the table once, by one of them.
    #[test]
    fn loom_conn_future_dropped_while_its_response_arrives() {
        loom::model(|| {
            let t0 = Instant::now();
            let (conn, _poll) = open_client(t0);
            let (id, mut future) = request(&conn, t0, t0 + Duration::from_secs(3600));
            future.attach_cancel(CancelHandle::new(conn.clone(), id));
            let responder = {
                let conn = conn.clone();
                thread::spawn(move || respond(&conn, id))
            };
            drop(future);
            responder.join().unwrap();

            assert!(
                conn.state.lock().pool.is_empty(),
                "neither answered nor withdrawn"
            );
            let stats = conn.shared.stats.snapshot();
            assert_eq!(stats.pending, 0);
            assert!(stats.late_responses <= 1);
            teardown(conn);
        });
    }
}
