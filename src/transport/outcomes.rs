//! Requests removed from a connection's table, completed by construction.
//!
//! Whoever removes pending requests (a response, a deadline, a cancel, a
//! close, shutdown) gets them back as [`Outcomes`]: removed under the
//! connection's lock, delivered once that lock is released. Dropping an
//! `Outcomes` delivers it, so no removal site can forget to; a site on the
//! hot path calls [`deliver`](Outcomes::deliver) instead to keep its buffer.

use crate::proto::Ready;

use super::Shared;

/// Completions to deliver after the lock they were removed under.
#[must_use = "an Outcomes delivers when dropped: keep it only until the lock is released"]
pub(crate) struct Outcomes<'s> {
    shared: &'s Shared,
    readies: Vec<Ready>,
}

impl<'s> Outcomes<'s> {
    /// Wraps removed requests; `readies` may be a reused buffer.
    pub(crate) fn new(shared: &'s Shared, readies: Vec<Ready>) -> Self {
        Outcomes { shared, readies }
    }

    /// How many requests ended.
    pub(crate) fn len(&self) -> usize {
        self.readies.len()
    }

    pub(crate) fn as_slice(&self) -> &[Ready] {
        &self.readies
    }

    /// Delivers every outcome and hands back the empty buffer for reuse,
    /// with whether another thread was given one (see
    /// [`Shared::deliver_all`]).
    pub(crate) fn deliver(mut self) -> (Vec<Ready>, bool) {
        let handed_off = self.deliver_all();
        (std::mem::take(&mut self.readies), handed_off)
    }

    fn deliver_all(&mut self) -> bool {
        !self.readies.is_empty() && self.shared.deliver_all(self.readies.drain(..))
    }
}

impl Drop for Outcomes<'_> {
    fn drop(&mut self) {
        self.deliver_all();
    }
}
