//! How a request's outcome reaches its caller: one path, three ways to wait.
//!
//! Every pending request owns exactly one [`Completion`]. Whoever removes the
//! request from its [`ChannelPool`](crate::ChannelPool) fires it, once, with
//! the response or an [`Error`]. The completion is either a callback
//! ([`PacketHandler`], or a [`SharedPacketHandler`] that serves many
//! requests), a slot a thread blocks on ([`WaitObject`]), or a slot an
//! executor polls ([`ResponseFuture`]). A completion dropped without
//! firing fires [`Error::Shutdown`], so no caller can be left waiting.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::packet::{ChannelId, Packet};
use crate::sync::{Arc, Condvar, Mutex};

/// The longest wait, timeout or delay this crate schedules (about 30
/// years): longer durations are clamped to it, so `Duration::MAX` means
/// "never" instead of overflowing an `Instant`.
pub(crate) const LONGEST_WAIT: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);

/// `d`, clamped to [`LONGEST_WAIT`].
pub(crate) fn clamp_wait(d: Duration) -> Duration {
    d.min(LONGEST_WAIT)
}

/// A callback run with a request's outcome (tbnet's `IPacketHandler`).
///
/// Implemented for every `FnOnce(Result<Packet, Error>) + Send + 'static`
/// closure, so most code never names it.
///
/// # Examples
/// ```
/// use tbnet::{Completion, Error, Packet};
///
/// let completion = Completion::callback(|result: Result<Packet, Error>| {
///     assert_eq!(result.unwrap().body(), "pong");
/// });
/// completion.complete(Ok(Packet::new(1, "pong")));
/// ```
pub trait PacketHandler: Send + 'static {
    /// Receives the request's response, or why there is none.
    fn handle_packet(self: Box<Self>, result: Result<Packet, Error>);
}

impl<F> PacketHandler for F
where
    F: FnOnce(Result<Packet, Error>) + Send + 'static,
{
    fn handle_packet(self: Box<Self>, result: Result<Packet, Error>) {
        (*self)(result)
    }
}

/// A handler that many requests share, told apart by the `args` each was
/// sent with: tbnet's `IPacketHandler::handlePacket(packet, args)`.
///
/// Sending with one ([`ConnectionManager::send_shared`]) costs no
/// allocation: the handler's `Arc` is cloned, where a closure per request
/// ([`PacketHandler`]) is boxed. It runs where callbacks run (a worker, or
/// the IO thread with [`Dispatch::IoThread`] callbacks), possibly on
/// several threads at once.
///
/// # Examples
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use tbnet::{Error, Packet, SharedPacketHandler};
///
/// /// Adds up the `args` of the requests that were answered.
/// #[derive(Default)]
/// struct Answered(AtomicU64);
///
/// impl SharedPacketHandler for Answered {
///     fn handle_packet(&self, result: Result<Packet, Error>, args: u64) {
///         if result.is_ok() {
///             self.0.fetch_add(args, Ordering::Relaxed);
///         }
///     }
/// }
/// ```
///
/// [`ConnectionManager::send_shared`]: crate::ConnectionManager::send_shared
/// [`Dispatch::IoThread`]: crate::Dispatch::IoThread
pub trait SharedPacketHandler: Send + Sync + 'static {
    /// Receives the outcome of the request that was sent with `args`.
    fn handle_packet(&self, result: Result<Packet, Error>, args: u64);
}

/// The one-shot end of a pending request: fires its outcome exactly once.
///
/// Dropping it unfired fires [`Error::Shutdown`].
pub struct Completion {
    kind: Option<Kind>,
}

enum Kind {
    Callback(Box<dyn PacketHandler>),
    /// A shared handler and the request's `args` (a `std` `Arc` also
    /// under loom: loom's cannot hold a trait object).
    Shared(std::sync::Arc<dyn SharedPacketHandler>, u64),
    Wait {
        shared: Arc<WaitShared>,
        index: usize,
    },
    Future(Arc<FutureShared>),
    Call(Arc<CallSlot>),
    /// A one-way post's slot: whatever ends it is dropped (a reply is
    /// counted by the connection that matched it).
    Discard,
}

impl Completion {
    /// A completion that runs `handler` with the outcome.
    pub fn callback<H: PacketHandler>(handler: H) -> Self {
        Completion {
            kind: Some(Kind::Callback(Box::new(handler))),
        }
    }

    /// A completion that runs a shared `handler` with the outcome and
    /// `args`.
    pub fn shared(handler: std::sync::Arc<dyn SharedPacketHandler>, args: u64) -> Self {
        Completion {
            kind: Some(Kind::Shared(handler, args)),
        }
    }

    /// Fires the outcome: runs the callback or wakes the waiter.
    pub fn complete(mut self, result: Result<Packet, Error>) {
        if let Some(kind) = self.kind.take() {
            kind.fire(result);
        }
    }

    /// Whether firing runs user code (a callback) rather than waking a waiter.
    pub fn is_callback(&self) -> bool {
        matches!(self.kind, Some(Kind::Callback(_) | Kind::Shared(..)))
    }

    /// The completion of a one-way post: nobody waits for its outcome.
    pub(crate) fn discard() -> Self {
        Completion {
            kind: Some(Kind::Discard),
        }
    }

    /// Whether this is a post's completion, whose outcome is dropped.
    pub(crate) fn is_discard(&self) -> bool {
        matches!(self.kind, Some(Kind::Discard))
    }

    /// Drops the completion without an outcome: the submission it belonged
    /// to was refused, and the caller learns that from the refusal itself.
    pub(crate) fn disarm(mut self) {
        if let Some(Kind::Wait { shared, index }) = self.kind.take() {
            shared.abandon(index);
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(kind) = self.kind.take() {
            kind.fire(Err(Error::Shutdown));
        }
    }
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Some(Kind::Callback(_)) => "callback",
            Some(Kind::Shared(..)) => "shared callback",
            Some(Kind::Wait { .. }) => "wait",
            Some(Kind::Future(_)) => "future",
            Some(Kind::Call(_)) => "call",
            Some(Kind::Discard) => "discard",
            None => "fired",
        };
        f.debug_tuple("Completion").field(&kind).finish()
    }
}

impl Kind {
    fn fire(self, result: Result<Packet, Error>) {
        match self {
            Kind::Callback(handler) => handler.handle_packet(result),
            Kind::Shared(handler, args) => handler.handle_packet(result, args),
            Kind::Wait { shared, index } => shared.fire(index, result),
            Kind::Future(shared) => FutureShared::fire(shared, result),
            Kind::Call(slot) => slot.fire(result),
            Kind::Discard => {}
        }
    }
}

/// Removes a pending request from wherever it waits (its connection's pool).
pub(crate) trait Cancel: Send + Sync {
    /// Cancels `id` if it is still pending; its completion then fires
    /// [`Error::Cancelled`].
    fn cancel(&self, id: ChannelId);
}

/// A bare pool as a cancel target, for the unit tests of the waiting side
/// (the transport's target is its connection).
#[cfg(test)]
impl Cancel for Mutex<crate::proto::ChannelPool> {
    fn cancel(&self, id: ChannelId) {
        let ready = self.lock().cancel(id);
        if let Some(ready) = ready {
            ready.fire();
        }
    }
}

/// What a waiter calls to withdraw its request when it stops waiting.
pub(crate) struct CancelHandle {
    target: std::sync::Arc<dyn Cancel>,
    id: ChannelId,
}

impl CancelHandle {
    pub(crate) fn new(target: std::sync::Arc<dyn Cancel>, id: ChannelId) -> Self {
        CancelHandle { target, id }
    }

    fn cancel(self) {
        self.target.cancel(self.id);
    }
}

// ---------------------------------------------------------------------------
// WaitObject

struct WaitShared {
    state: Mutex<WaitState>,
    ready: Condvar,
}

#[derive(Default)]
struct WaitState {
    slots: Vec<Slot>,
    /// Indices of arrived, untaken results, in arrival order.
    arrivals: VecDeque<usize>,
    pending: usize,
}

enum Slot {
    Pending,
    Arrived(Result<Packet, Error>),
    Taken,
}

impl WaitShared {
    /// Forgets slot `index`: its request was never sent.
    fn abandon(&self, index: usize) {
        let mut state = self.state.lock();
        if matches!(state.slots[index], Slot::Pending) {
            state.slots[index] = Slot::Taken;
            state.pending -= 1;
        }
    }

    fn fire(&self, index: usize, result: Result<Packet, Error>) {
        {
            let mut state = self.state.lock();
            let Some(slot) = state.slots.get_mut(index) else {
                return;
            };
            if !matches!(slot, Slot::Pending) {
                // Given up on by `wait_all_timeout`; nobody reads it.
                return;
            }
            *slot = Slot::Arrived(result);
            state.pending -= 1;
            state.arrivals.push_back(index);
        }
        self.ready.notify_one();
    }
}

/// Blocks a thread until responses arrive: one, the first of several, or all
/// of them (tbnet's `WaitObject`, with OceanBase's gather-N pattern).
///
/// Each [`completion`](Self::completion) registers one more expected
/// outcome. Every registered request is guaranteed to finish (response,
/// timeout, disconnect or shutdown), so the untimed waits always return once
/// the requests were handed to a transport. Dropping the `WaitObject` cancels
/// the requests still pending.
///
/// # Examples
/// ```
/// use tbnet::{Packet, WaitObject};
///
/// let mut wait = WaitObject::new();
/// let first = wait.completion();
/// let second = wait.completion();
/// std::thread::spawn(move || {
///     second.complete(Ok(Packet::new(0, "b")));
///     first.complete(Ok(Packet::new(0, "a")));
/// });
/// let all = wait.wait_all();
/// assert_eq!(all[0].as_ref().unwrap().body(), "a");
/// assert_eq!(all[1].as_ref().unwrap().body(), "b");
/// ```
pub struct WaitObject {
    shared: Arc<WaitShared>,
    cancels: Vec<Option<CancelHandle>>,
}

impl Default for WaitObject {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for WaitObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaitObject")
            .field("registered", &self.cancels.len())
            .field("pending", &self.pending())
            .finish()
    }
}

impl WaitObject {
    /// A WaitObject expecting nothing yet.
    pub fn new() -> Self {
        WaitObject {
            shared: Arc::new(WaitShared {
                state: Mutex::new(WaitState::default()),
                ready: Condvar::new(),
            }),
            cancels: Vec::new(),
        }
    }

    /// Registers one more expected outcome and returns the completion that
    /// delivers it. Its index (for [`wait_any`](Self::wait_any)) is the
    /// number of completions registered before it.
    pub fn completion(&mut self) -> Completion {
        let index = {
            let mut state = self.shared.state.lock();
            state.slots.push(Slot::Pending);
            state.pending += 1;
            state.slots.len() - 1
        };
        self.cancels.push(None);
        Completion {
            kind: Some(Kind::Wait {
                shared: self.shared.clone(),
                index,
            }),
        }
    }

    /// Lets dropping or timing out this WaitObject withdraw request `index`.
    pub(crate) fn attach_cancel(&mut self, index: usize, handle: CancelHandle) {
        self.cancels[index] = Some(handle);
    }

    /// How many completions were registered.
    pub fn registered(&self) -> usize {
        self.cancels.len()
    }

    /// How many registered outcomes have not arrived yet.
    pub fn pending(&self) -> usize {
        self.shared.state.lock().pending
    }

    /// Blocks until the next outcome arrives and returns it with its index,
    /// in arrival order. `None` once every registered outcome was taken.
    pub fn wait_any(&mut self) -> Option<(usize, Result<Packet, Error>)> {
        self.wait_any_inner(None)
    }

    /// Like [`wait_any`](Self::wait_any), giving up after `timeout`: `None`
    /// if nothing arrived by then (the requests stay pending; wait again or
    /// drop the WaitObject to cancel them).
    pub fn wait_any_timeout(
        &mut self,
        timeout: Duration,
    ) -> Option<(usize, Result<Packet, Error>)> {
        self.wait_any_inner(Some(Instant::now() + clamp_wait(timeout)))
    }

    /// Blocks until every registered outcome has arrived and returns those
    /// not taken yet, in registration order. The WaitObject is then empty
    /// and can be reused: indices start again at 0 (unless
    /// [`wait_all_timeout`](Self::wait_all_timeout) gave up on some).
    pub fn wait_all(&mut self) -> Vec<Result<Packet, Error>> {
        self.wait_all_inner(None)
    }

    /// Like [`wait_all`](Self::wait_all), giving up after `timeout`: requests
    /// still pending then are cancelled and reported as [`Error::Timeout`].
    pub fn wait_all_timeout(&mut self, timeout: Duration) -> Vec<Result<Packet, Error>> {
        self.wait_all_inner(Some(Instant::now() + clamp_wait(timeout)))
    }

    fn wait_any_inner(
        &mut self,
        deadline: Option<Instant>,
    ) -> Option<(usize, Result<Packet, Error>)> {
        let mut state = self.shared.state.lock();
        loop {
            if let Some(index) = state.arrivals.pop_front() {
                let slot = std::mem::replace(&mut state.slots[index], Slot::Taken);
                let Slot::Arrived(result) = slot else {
                    unreachable!("only arrived slots are queued");
                };
                return Some((index, result));
            }
            if state.pending == 0 {
                return None;
            }
            state = match deadline {
                None => self.shared.ready.wait(state),
                Some(d) if Instant::now() < d => self.shared.ready.wait_until(state, d),
                Some(_) => return None,
            };
        }
    }

    fn wait_all_inner(&mut self, deadline: Option<Instant>) -> Vec<Result<Packet, Error>> {
        let mut state = self.shared.state.lock();
        while state.pending > 0 {
            state = match deadline {
                None => self.shared.ready.wait(state),
                Some(d) if Instant::now() < d => self.shared.ready.wait_until(state, d),
                Some(_) => break,
            };
        }
        state.arrivals.clear();
        state.pending = 0;
        let mut gave_up = Vec::new();
        let results = state
            .slots
            .iter_mut()
            .enumerate()
            .filter_map(|(index, slot)| match std::mem::replace(slot, Slot::Taken) {
                Slot::Arrived(result) => Some(result),
                Slot::Pending => {
                    gave_up.push(index);
                    Some(Err(Error::Timeout))
                }
                Slot::Taken => None,
            })
            .collect();
        if gave_up.is_empty() {
            // Everything arrived and was taken: nothing can fire into these
            // slots any more, so start afresh (a reused WaitObject does not
            // grow with every batch).
            state.slots.clear();
            drop(state);
            self.cancels.clear();
            return results;
        }
        drop(state);
        for index in gave_up {
            if let Some(handle) = self.cancels[index].take() {
                handle.cancel();
            }
        }
        results
    }
}

impl Drop for WaitObject {
    fn drop(&mut self) {
        let pending: Vec<usize> = {
            let state = self.shared.state.lock();
            if state.pending == 0 {
                return;
            }
            (state.slots.iter().enumerate())
                .filter(|(_, slot)| matches!(slot, Slot::Pending))
                .map(|(index, _)| index)
                .collect()
        };
        for index in pending {
            if let Some(handle) = self.cancels[index].take() {
                handle.cancel();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// One blocking call

/// The slot one blocking [`call`](crate::ConnectionManager::call) waits on.
/// A thread keeps its slot between calls (when nothing else holds it any
/// more), so a call allocates nothing for its wait.
pub(crate) struct CallSlot {
    result: Mutex<Option<Result<Packet, Error>>>,
    ready: Condvar,
}

#[cfg(not(loom))]
thread_local! {
    static CALL_SLOT: std::cell::RefCell<Option<Arc<CallSlot>>> =
        const { std::cell::RefCell::new(None) };
}

impl CallSlot {
    fn fire(&self, result: Result<Packet, Error>) {
        *self.result.lock() = Some(result);
        self.ready.notify_one();
    }
}

/// The waiting end of a blocking call.
pub(crate) struct CallWait {
    slot: Arc<CallSlot>,
}

impl CallWait {
    /// A waiting end and the completion that ends its wait.
    pub(crate) fn new() -> (CallWait, Completion) {
        #[cfg(not(loom))]
        let cached = CALL_SLOT.with(|cell| cell.borrow_mut().take());
        #[cfg(loom)]
        let cached = None;
        let slot = cached.unwrap_or_else(|| {
            Arc::new(CallSlot {
                result: Mutex::new(None),
                ready: Condvar::new(),
            })
        });
        let completion = Completion {
            kind: Some(Kind::Call(slot.clone())),
        };
        (CallWait { slot }, completion)
    }

    /// Blocks until the outcome arrives (it always does: see [`Completion`]).
    pub(crate) fn wait(self) -> Result<Packet, Error> {
        let result = {
            let mut result = self.slot.result.lock();
            loop {
                if let Some(outcome) = result.take() {
                    break outcome;
                }
                result = self.slot.ready.wait(result);
            }
        };
        // Kept for this thread's next call only if the completion is gone
        // (it may still be dropping its reference after firing).
        #[cfg(not(loom))]
        if Arc::strong_count(&self.slot) == 1 {
            CALL_SLOT.with(|cell| *cell.borrow_mut() = Some(self.slot));
        }
        result
    }
}

// ---------------------------------------------------------------------------
// ResponseFuture

struct FutureShared {
    state: Mutex<FutureState>,
}

#[derive(Default)]
struct FutureState {
    result: Option<Result<Packet, Error>>,
    waker: Option<Waker>,
}

impl FutureShared {
    /// Sets the outcome, lets go of this reference, then wakes the future:
    /// by the time it runs, its state is its own again (and can be kept for
    /// its thread's next future).
    fn fire(shared: Arc<Self>, result: Result<Packet, Error>) {
        let waker = {
            let mut state = shared.state.lock();
            state.result = Some(result);
            state.waker.take()
        };
        drop(shared);
        if let Some(waker) = waker {
            // A waker is the executor's code: a panic in it must not take
            // down the transport thread that completed the request.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| waker.wake())).is_err() {
                tracing::error!("a future's waker panicked");
            }
        }
    }
}

/// A request's outcome as a [`Future`], for any executor (it uses only
/// `std::task` types).
///
/// Dropping it before it resolves cancels the request.
///
/// # Panics
/// Polling it again after it returned `Ready` panics.
///
/// # Examples
/// ```
/// use tbnet::{Packet, ResponseFuture};
///
/// let (future, completion) = ResponseFuture::new();
/// completion.complete(Ok(Packet::new(0, "done")));
/// let response = tokio_test::block_on(future).unwrap();
/// assert_eq!(response.body(), "done");
/// ```
#[must_use = "a ResponseFuture does nothing unless polled, and dropping it cancels the request"]
pub struct ResponseFuture {
    shared: Arc<FutureShared>,
    cancel: Option<CancelHandle>,
    finished: bool,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl ResponseFuture {
    /// A future and the completion that resolves it.
    pub fn new() -> (ResponseFuture, Completion) {
        #[cfg(not(loom))]
        let spare = SPARE_FUTURES
            .try_with(|spare| spare.borrow_mut().pop())
            .ok()
            .flatten();
        #[cfg(loom)]
        let spare = None;
        let shared = spare.unwrap_or_else(|| {
            Arc::new(FutureShared {
                state: Mutex::new(FutureState::default()),
            })
        });
        let completion = Completion {
            kind: Some(Kind::Future(shared.clone())),
        };
        let future = ResponseFuture {
            shared,
            cancel: None,
            finished: false,
        };
        (future, completion)
    }

    /// Lets dropping this future withdraw its request.
    pub(crate) fn attach_cancel(&mut self, handle: CancelHandle) {
        self.cancel = Some(handle);
    }
}

impl Future for ResponseFuture {
    type Output = Result<Packet, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        assert!(!self.finished, "ResponseFuture polled after completion");
        let mut state = self.shared.state.lock();
        if let Some(result) = state.result.take() {
            drop(state);
            self.finished = true;
            self.cancel = None;
            return Poll::Ready(result);
        }
        match &state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for ResponseFuture {
    fn drop(&mut self) {
        if let Some(handle) = self.cancel.take() {
            if self.shared.state.lock().result.is_none() {
                handle.cancel();
            }
        }
        // Kept for this thread's next future if the completion is gone
        // (then no one else can reach it): no allocation per call at
        // steady state.
        #[cfg(not(loom))]
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            *shared.state.get_mut() = FutureState::default();
            let spare = self.shared.clone();
            let _ = SPARE_FUTURES.try_with(|spares| {
                let mut spares = spares.borrow_mut();
                if spares.len() < SPARE_FUTURES_KEPT {
                    spares.push(spare);
                }
            });
        }
    }
}

/// Spare future states a thread keeps for its next futures.
#[cfg(not(loom))]
const SPARE_FUTURES_KEPT: usize = 64;

#[cfg(not(loom))]
thread_local! {
    static SPARE_FUTURES: std::cell::RefCell<Vec<Arc<FutureShared>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::proto::ChannelPool;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio_test::{assert_pending, assert_ready, task};

    #[test]
    fn a_finished_future_state_is_reused_and_a_pending_one_is_not() {
        let (future, completion) = ResponseFuture::new();
        let first = Arc::as_ptr(&future.shared);
        completion.complete(Ok(Packet::new(0, "done")));
        assert!(tokio_test::block_on(future).is_ok());
        let (future, completion) = ResponseFuture::new();
        assert_eq!(Arc::as_ptr(&future.shared), first, "reused");
        // Reset: the reused state holds no earlier result.
        let mut polled = task::spawn(future);
        assert_pending!(polled.poll());
        // Dropped while its completion is alive: not kept.
        drop(polled);
        let (future, _completion2) = ResponseFuture::new();
        assert_ne!(Arc::as_ptr(&future.shared), first);
        drop(completion);
    }

    #[test]
    fn dropped_completion_fires_shutdown() {
        let (future, completion) = ResponseFuture::new();
        drop(completion);
        let result = tokio_test::block_on(future);
        assert!(matches!(result, Err(Error::Shutdown)));

        let mut wait = WaitObject::new();
        drop(wait.completion());
        assert!(matches!(wait.wait_all()[..], [Err(Error::Shutdown)]));

        let fired = std::sync::Arc::new(AtomicUsize::new(0));
        let f = fired.clone();
        drop(Completion::callback(move |r: Result<Packet, Error>| {
            assert!(matches!(r, Err(Error::Shutdown)));
            f.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(fired.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn completion_dropped_during_a_panic_still_fires() {
        let (future, completion) = ResponseFuture::new();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = completion;
            panic!("handler bug");
        }));
        assert!(r.is_err());
        assert!(matches!(tokio_test::block_on(future), Err(Error::Shutdown)));
    }

    #[test]
    fn future_is_pending_until_completed_and_woken_once() {
        let (future, completion) = ResponseFuture::new();
        let mut task = task::spawn(future);
        assert_pending!(task.poll());
        assert_pending!(task.poll());
        assert_eq!(
            task.waker_ref_count(),
            2,
            "the future keeps one waker clone"
        );
        assert!(!task.is_woken());
        completion.complete(Ok(Packet::new(4, "four")));
        assert!(task.is_woken());
        let response = assert_ready!(task.poll()).unwrap();
        assert_eq!(
            (response.pcode().get(), &response.body()[..]),
            (4, &b"four"[..])
        );
    }

    #[test]
    fn future_completed_before_first_poll_is_ready_at_once() {
        let (future, completion) = ResponseFuture::new();
        completion.complete(Err(Error::Timeout));
        let mut task = task::spawn(future);
        assert!(matches!(assert_ready!(task.poll()), Err(Error::Timeout)));
    }

    #[test]
    fn dropped_future_cancels_its_entry() {
        let pool = std::sync::Arc::new(Mutex::new(ChannelPool::new(8)));
        let (mut future, completion) = ResponseFuture::new();
        let id = pool
            .lock()
            .allocate(completion, Instant::now() + Duration::from_secs(5))
            .unwrap();
        future.attach_cancel(CancelHandle::new(pool.clone(), id));
        let mut task = task::spawn(future);
        assert_pending!(task.poll());
        assert!(pool.lock().contains(id));
        drop(task);
        assert!(pool.lock().is_empty());
        // A response arriving now matches nothing.
        assert!(pool.lock().complete(id, Packet::new(0, "")).is_none());
    }

    #[test]
    fn wait_any_returns_in_arrival_order_then_none() {
        let mut wait = WaitObject::new();
        let a = wait.completion();
        let b = wait.completion();
        b.complete(Ok(Packet::new(0, "b")));
        let (index, result) = wait.wait_any().unwrap();
        assert_eq!((index, &result.unwrap().body()[..]), (1, &b"b"[..]));
        a.complete(Err(Error::Disconnected));
        let (index, result) = wait.wait_any().unwrap();
        assert!(index == 0 && matches!(result, Err(Error::Disconnected)));
        assert!(wait.wait_any().is_none());
        assert!(wait.wait_all().is_empty());
    }

    #[test]
    fn wait_all_timeout_cancels_and_reports_the_rest_as_timeouts() {
        let pool = std::sync::Arc::new(Mutex::new(ChannelPool::new(8)));
        let mut wait = WaitObject::new();
        let done = wait.completion();
        let stuck = wait.completion();
        let far = Instant::now() + Duration::from_secs(3600);
        let id = pool.lock().allocate(stuck, far).unwrap();
        wait.attach_cancel(1, CancelHandle::new(pool.clone(), id));
        done.complete(Ok(Packet::new(0, "ok")));
        let results = wait.wait_all_timeout(Duration::from_millis(1));
        assert!(results[0].is_ok());
        assert!(matches!(results[1], Err(Error::Timeout)));
        assert!(pool.lock().is_empty(), "the stuck request was withdrawn");
    }

    #[test]
    fn wait_any_timeout_leaves_requests_pending() {
        let mut wait = WaitObject::new();
        let c = wait.completion();
        assert!(wait.wait_any_timeout(Duration::from_millis(1)).is_none());
        assert_eq!(wait.pending(), 1);
        c.complete(Ok(Packet::new(0, "")));
        assert!(wait.wait_any_timeout(Duration::from_secs(60)).is_some());
    }

    #[test]
    fn dropped_wait_object_cancels_pending_requests() {
        let pool = std::sync::Arc::new(Mutex::new(ChannelPool::new(8)));
        let mut wait = WaitObject::new();
        let far = Instant::now() + Duration::from_secs(3600);
        for index in 0..3 {
            let id = pool.lock().allocate(wait.completion(), far).unwrap();
            wait.attach_cancel(index, CancelHandle::new(pool.clone(), id));
        }
        assert_eq!(pool.lock().len(), 3);
        drop(wait);
        assert!(pool.lock().is_empty());
    }

    #[test]
    fn handles_are_send() {
        fn assert_send<T: Send>() {}
        fn assert_sync<T: Sync>() {}
        assert_send::<Completion>();
        assert_send::<WaitObject>();
        assert_sync::<WaitObject>();
        assert_send::<ResponseFuture>();
        assert_sync::<ResponseFuture>();
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! The completion slots alone. Races between the ways a request ends
    //! (response, deadline, cancel, close) are modelled on the real path,
    //! through a connection: `transport::conn`'s loom models.

    use super::*;
    use loom::thread;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn loom_future_slot_fires_once_and_wakes_a_pending_poller() {
        loom::model(|| {
            let (mut future, completion) = ResponseFuture::new();
            let t = thread::spawn(move || completion.complete(Ok(Packet::new(1, "x"))));
            let counter = std::sync::Arc::new(CountingWaker(AtomicUsize::new(0)));
            let waker = Waker::from(counter.clone());
            let mut cx = Context::from_waker(&waker);
            let first = Pin::new(&mut future).poll(&mut cx);
            t.join().unwrap();
            match first {
                Poll::Ready(r) => {
                    assert!(r.is_ok());
                    assert_eq!(counter.0.load(Ordering::SeqCst), 0);
                }
                Poll::Pending => {
                    assert_eq!(counter.0.load(Ordering::SeqCst), 1);
                    assert!(matches!(
                        Pin::new(&mut future).poll(&mut cx),
                        Poll::Ready(Ok(_))
                    ));
                }
            }
        });
    }

    #[test]
    fn loom_wait_object_sees_a_concurrent_completion() {
        loom::model(|| {
            let mut wait = WaitObject::new();
            let completion = wait.completion();
            let t = thread::spawn(move || completion.complete(Ok(Packet::new(2, "y"))));
            let results = wait.wait_all();
            assert_eq!(results.len(), 1);
            assert!(results[0].is_ok());
            t.join().unwrap();
        });
    }
}
