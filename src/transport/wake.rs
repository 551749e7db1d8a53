//! Waking the IO thread: at most one wakeup syscall per sleep.
//!
//! Senders queue a command, then call [`IoWaker::wake`]; the IO thread
//! announces a sleep with [`IoWaker::may_sleep`] and clears it with
//! [`IoWaker::awake`]. The flag is true while the IO thread is awake or
//! already woken, so senders skip the syscall then. The handshake (flag
//! cleared, queue looked at again; command queued, flag swapped) leaves no
//! window where a command waits with the IO thread asleep: a loom model
//! below checks it.

use std::io;

use crate::sync::{AtomicBool, Ordering};

/// What actually wakes the sleeping thread (`mio::Waker` in the transport).
pub(crate) trait Wake: Send + Sync {
    fn wake(&self) -> io::Result<()>;
}

impl Wake for mio::Waker {
    fn wake(&self) -> io::Result<()> {
        mio::Waker::wake(self)
    }
}

/// The IO thread's sleep/wake flag and its waker.
pub(crate) struct IoWaker<W: Wake = mio::Waker> {
    waker: W,
    /// True while the IO thread is awake (or already woken).
    awake: AtomicBool,
}

impl<W: Wake> IoWaker<W> {
    pub(crate) fn new(waker: W) -> Self {
        IoWaker {
            waker,
            awake: AtomicBool::new(true),
        }
    }

    /// Sender side, after queuing work: wakes the IO thread if it sleeps
    /// (or is about to).
    pub(crate) fn wake(&self) {
        if !self.awake.swap(true, Ordering::SeqCst) {
            if let Err(e) = self.waker.wake() {
                tracing::error!(error = %e, "could not wake the IO thread");
            }
        }
    }

    /// IO thread, before sleeping: announces the sleep, then looks at the
    /// work once more. False (and awake again) if work arrived: do not
    /// sleep.
    pub(crate) fn may_sleep(&self, idle: impl FnOnce() -> bool) -> bool {
        self.awake.store(false, Ordering::SeqCst);
        if idle() {
            return true;
        }
        self.awake.store(true, Ordering::SeqCst);
        false
    }

    /// IO thread, after sleeping.
    pub(crate) fn awake(&self) {
        self.awake.store(true, Ordering::SeqCst);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::{fence, Arc, AtomicUsize};
    use loom::thread;

    /// Counts wakeups; a wakeup stands for the syscall that ends a sleep.
    struct Counter(AtomicUsize);

    impl Wake for Arc<Counter> {
        fn wake(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// Two senders each queue a command and wake; the IO thread announces a
    /// sleep once. Checks: it never sleeps with a command queued and no
    /// wakeup, and one sleep costs at most one wakeup.
    ///
    /// The handshake relies on every step being `SeqCst`: the flag's store
    /// and swap here, the command queue's push and `is_empty` in the
    /// transport (crossbeam's `SegQueue`, which loom cannot see). loom
    /// models `SeqCst` loads, stores and read-modify-writes only as
    /// `AcqRel`, and reports this store-buffering shape as a lost wakeup
    /// although the C++20 model forbids it; it does model `SeqCst` fences.
    /// So the stand-in queue below puts a fence between its operation and
    /// the flag's, on both sides: what the model checks is the protocol's
    /// sequence of steps under one total order, not the orderings
    /// themselves.
    #[test]
    fn loom_io_waker_never_sleeps_through_a_command() {
        loom::model(|| {
            let wakes = Arc::new(Counter(AtomicUsize::new(0)));
            let waker = Arc::new(IoWaker::new(wakes.clone()));
            let queued = Arc::new(AtomicUsize::new(0));
            let senders: Vec<_> = (0..2)
                .map(|_| {
                    let (waker, queued) = (waker.clone(), queued.clone());
                    thread::spawn(move || {
                        queued.fetch_add(1, Ordering::SeqCst);
                        fence(Ordering::SeqCst);
                        waker.wake();
                    })
                })
                .collect();
            // The IO thread's turn: either it sees a command before
            // sleeping, or its sleep is ended by a wakeup.
            let sleeps = waker.may_sleep(|| {
                fence(Ordering::SeqCst);
                queued.load(Ordering::SeqCst) == 0
            });
            for sender in senders {
                sender.join().unwrap();
            }
            let wakes = wakes.0.load(Ordering::SeqCst);
            assert!(wakes <= 1, "{wakes} wakeups for one sleep");
            if sleeps {
                assert_eq!(wakes, 1, "slept with a command queued and no wakeup");
                waker.awake();
            }
            assert_eq!(queued.load(Ordering::SeqCst), 2);
        });
    }
}
