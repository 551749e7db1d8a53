//! The only place that names lock and atomic types, and the workers' queue
//! types, so loom can swap them in. (The IO thread's command queue stays
//! crossbeam's: loom models reach it only through the waker, whose own
//! model stands in for it.)
//!
//! Lock order (a thread holding one may take only those below it):
//! 1. the connection manager's map of connections;
//! 2. a connection's state (its `ChannelPool` and outbound queue);
//! 3. the timer's deadline registry;
//! 4. a completion slot (`WaitObject` or `ResponseFuture` state).
//!
//! No user code runs and no waker is woken while any of them is held.

#[cfg(not(loom))]
mod imp {
    pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
    pub(crate) use std::sync::Arc;

    pub(crate) use parking_lot::{Mutex, MutexGuard};
    use std::time::Instant;

    /// A condition variable paired with [`Mutex`], by-value guard API so the
    /// loom build can share it.
    #[derive(Default, Debug)]
    pub(crate) struct Condvar(parking_lot::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Self {
            Condvar(parking_lot::Condvar::new())
        }

        pub(crate) fn wait<'a, T>(&self, mut guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
            self.0.wait(&mut guard);
            guard
        }

        /// Waits until notified or `deadline`; spurious returns are possible.
        pub(crate) fn wait_until<'a, T>(
            &self,
            mut guard: MutexGuard<'a, T>,
            deadline: Instant,
        ) -> MutexGuard<'a, T> {
            self.0.wait_until(&mut guard, deadline);
            guard
        }

        pub(crate) fn notify_one(&self) {
            self.0.notify_one();
        }

        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
    }
}

#[cfg(loom)]
mod imp {
    pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
    pub(crate) use loom::sync::Arc;
    use std::time::Instant;

    /// loom's mutex behind parking_lot's infallible `lock()`.
    #[derive(Debug)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Mutex(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            // loom reports poisoning only after a panic, which fails the model anyway.
            self.0.lock().unwrap()
        }
    }

    #[derive(Debug)]
    pub(crate) struct Condvar(loom::sync::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Self {
            Condvar(loom::sync::Condvar::new())
        }

        pub(crate) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
            self.0.wait(guard).unwrap()
        }

        /// loom has no clock: a timed wait is an untimed one.
        pub(crate) fn wait_until<'a, T>(
            &self,
            guard: MutexGuard<'a, T>,
            _deadline: Instant,
        ) -> MutexGuard<'a, T> {
            self.wait(guard)
        }

        pub(crate) fn notify_one(&self) {
            self.0.notify_one();
        }

        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
    }
}

#[allow(unused_imports)]
pub(crate) use imp::*;

/// The workers' queues: crossbeam's, or under loom stand-ins it can see.
#[cfg(not(loom))]
pub(crate) use crossbeam_queue::{ArrayQueue, SegQueue};
#[cfg(loom)]
pub(crate) use loom_queue::{ArrayQueue, SegQueue};

/// The two queues as loom sees them. crossbeam's atomics are invisible to
/// loom, so with the real queues it would not know that a push and a
/// worker's emptiness check conflict, and would never try the interleaving
/// where a wakeup is lost. Here a loom atomic carries what `is_empty`
/// reads (as crossbeam's `SeqCst` indices do) and a lock holds the items.
#[cfg(loom)]
mod loom_queue {
    use std::collections::VecDeque;

    use super::imp::{AtomicUsize, Mutex, Ordering};

    pub(crate) struct ArrayQueue<T> {
        items: Mutex<VecDeque<T>>,
        len: AtomicUsize,
        capacity: usize,
    }

    impl<T> ArrayQueue<T> {
        pub(crate) fn new(capacity: usize) -> Self {
            ArrayQueue {
                items: Mutex::new(VecDeque::new()),
                len: AtomicUsize::new(0),
                capacity,
            }
        }

        pub(crate) fn push(&self, item: T) -> Result<(), T> {
            let mut items = self.items.lock();
            if items.len() >= self.capacity {
                return Err(item);
            }
            items.push_back(item);
            self.len.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        pub(crate) fn pop(&self) -> Option<T> {
            let item = self.items.lock().pop_front()?;
            self.len.fetch_sub(1, Ordering::SeqCst);
            Some(item)
        }

        pub(crate) fn len(&self) -> usize {
            self.len.load(Ordering::SeqCst)
        }

        pub(crate) fn is_empty(&self) -> bool {
            self.len() == 0
        }
    }

    /// Unbounded: an `ArrayQueue` that is never full.
    pub(crate) struct SegQueue<T>(ArrayQueue<T>);

    impl<T> SegQueue<T> {
        pub(crate) fn new() -> Self {
            SegQueue(ArrayQueue::new(usize::MAX))
        }

        pub(crate) fn push(&self, item: T) {
            // Never full.
            let _ = self.0.push(item);
        }

        pub(crate) fn pop(&self) -> Option<T> {
            self.0.pop()
        }

        pub(crate) fn is_empty(&self) -> bool {
            self.0.is_empty()
        }
    }
}
