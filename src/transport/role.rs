//! Which transport thread the current thread is, if any.
//!
//! Set once when a transport thread starts; read where behaviour depends on
//! the thread (inline callbacks only on the IO thread, `stop` from inside a
//! handler). A role names its transport by the address of its shared state,
//! so one transport's threads are never taken for another's.

use std::cell::Cell;

use super::Shared;

/// A transport's IO thread.
pub(crate) const IO: u8 = 1;
/// A transport's worker.
pub(crate) const WORKER: u8 = 2;

thread_local! {
    static ROLE: Cell<(u8, usize)> = const { Cell::new((0, 0)) };
}

/// Marks the current thread as `role` of the transport owning `shared`.
pub(crate) fn set(role: u8, shared: &Shared) {
    ROLE.with(|r| r.set((role, shared as *const Shared as usize)));
}

/// Whether the current thread is `role` of the transport owning `shared`.
pub(crate) fn is(role: u8, shared: &Shared) -> bool {
    ROLE.with(|r| r.get() == (role, shared as *const Shared as usize))
}
