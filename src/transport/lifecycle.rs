//! Where the transport is in its life: one enum, every transition of it
//! here. (The worker pool and the timer keep a stopping flag of their own
//! under their own locks, set by `Transport::stop` as it moves through
//! these phases; `wait` returns once `stop` is entirely done.)
//!
//! ```text
//! Running ──stop()──► Stopping ──IO thread gone──► IoStopped ──workers gone──► Stopped
//! ```
//! Phases only move forward. Other threads read the phase to decide what
//! to do with work they hand over: while the IO thread runs, commands go to
//! it; once it is gone, senders end their own commands; once the workers
//! are gone, callbacks run on the thread that completes them.

use crate::sync::{AtomicUsize, Condvar, Mutex, Ordering};

/// A transport's phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// Accepting work.
    Running = 0,
    /// `stop` was called: no new listeners or connections; what is queued
    /// is flushed or failed.
    Stopping = 1,
    /// The IO thread exited: commands fail at once with `Shutdown`.
    IoStopped = 2,
    /// Every thread is gone: callbacks run where they complete.
    Stopped = 3,
}

/// The phase, readable without a lock, and a way to wait for `Stopped`.
pub(crate) struct Lifecycle {
    phase: AtomicUsize,
    stopped: Mutex<bool>,
    stopped_cond: Condvar,
}

impl Lifecycle {
    pub(crate) fn new() -> Self {
        Lifecycle {
            phase: AtomicUsize::new(Phase::Running as usize),
            stopped: Mutex::new(false),
            stopped_cond: Condvar::new(),
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Running,
            1 => Phase::Stopping,
            2 => Phase::IoStopped,
            _ => Phase::Stopped,
        }
    }

    /// Moves forward to `phase` (never back).
    fn advance(&self, phase: Phase) {
        let mut current = self.phase.load(Ordering::SeqCst);
        while current < phase as usize {
            match (self.phase).compare_exchange(
                current,
                phase as usize,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return,
                Err(now) => current = now,
            }
        }
    }

    /// Whether `stop` was called.
    pub(crate) fn is_stopping(&self) -> bool {
        self.phase() >= Phase::Stopping
    }

    /// `stop` was called.
    pub(crate) fn begin_stop(&self) {
        self.advance(Phase::Stopping);
    }

    /// The IO thread exited.
    pub(crate) fn io_exited(&self) {
        self.advance(Phase::IoStopped);
    }

    pub(crate) fn is_io_gone(&self) -> bool {
        self.phase() >= Phase::IoStopped
    }

    /// The workers exited (or were left detached).
    pub(crate) fn workers_exited(&self) {
        self.advance(Phase::Stopped);
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.phase() == Phase::Stopped
    }

    /// `stop` is done with everything: wakes [`wait`](Self::wait)ers.
    pub(crate) fn notify_stopped(&self) {
        *self.stopped.lock() = true;
        self.stopped_cond.notify_all();
    }

    /// Blocks until [`notify_stopped`](Self::notify_stopped).
    pub(crate) fn wait(&self) {
        let mut stopped = self.stopped.lock();
        while !*stopped {
            stopped = self.stopped_cond.wait(stopped);
        }
    }
}
