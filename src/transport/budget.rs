//! One memory budget for the whole transport: the read buffers and the
//! unwritten output of every connection.
//!
//! Only the IO thread changes it (it owns those buffers), so it is plain
//! arithmetic, one add per buffer change and no atomics; the total is
//! published to the stats once per loop turn.
//!
//! While the budget is spent, a connection holding at least its fair share
//! (the budget divided by the open connections) is not read; connections
//! below their share keep being served. A held connection still decodes
//! and answers the whole requests it holds, and every connection whose
//! read buffer is empty gives the buffer back (so idle buffers, which a
//! burst may have grown, cannot keep the budget spent on their own). A
//! held connection is read again once the total is back under the budget,
//! or once its own charge is under its share. Since a connection reads at
//! most one read chunk at a time, and only while the budget has room or it
//! holds less than its share, the input buffers counted here never exceed
//! twice the budget plus one read chunk per connection; the output of each
//! connection (replies to what it had read, including a held connection's)
//! stays under its own `max_outbound`.

/// The transport's memory budget and the connections it holds.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: usize,
    /// Connections (IO tokens) held because the budget was spent.
    held: Vec<usize>,
    /// A connection went idle keeping its read buffer since idle buffers
    /// were last given back (only then is a walk over every connection
    /// worth it).
    kept_idle: bool,
    /// A connection's charge fell since the held ones were last looked at.
    gave_back: bool,
    /// Connections open when the held ones were last looked at.
    looked_at: usize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Self {
        Budget {
            limit: limit.max(1),
            used: 0,
            held: Vec::new(),
            kept_idle: false,
            gave_back: false,
            looked_at: 0,
        }
    }

    /// Bytes the buffers hold now.
    pub(crate) fn used(&self) -> usize {
        self.used
    }

    /// A connection's buffers now hold `now` bytes; `charged` is what they
    /// held before, and becomes `now`.
    pub(crate) fn recharge(&mut self, charged: &mut usize, now: usize) {
        self.gave_back |= now < *charged;
        self.used = self.used - *charged + now;
        *charged = now;
    }

    /// Whether a connection whose buffers hold `charged` bytes, one of
    /// `conns` open, may read (and decode) more.
    pub(crate) fn may_grow(&self, charged: usize, conns: usize) -> bool {
        self.used < self.limit || charged < self.limit / conns.max(1)
    }

    /// The connection `token` stopped reading for the budget.
    pub(crate) fn hold(&mut self, token: usize) {
        self.held.push(token);
    }

    /// Whether the buffers hold the whole budget or more.
    pub(crate) fn spent(&self) -> bool {
        self.used >= self.limit
    }

    /// A connection went idle (nothing left to read) keeping a read buffer.
    pub(crate) fn kept_idle(&mut self) {
        self.kept_idle = true;
    }

    /// Whether idle buffers should be given back now: the budget is spent
    /// and a connection went idle keeping its buffer since they were last
    /// given back (with none, a walk over the connections finds nothing).
    pub(crate) fn should_sweep(&mut self) -> bool {
        self.spent() && std::mem::take(&mut self.kept_idle)
    }

    /// Whether [`take_held`](Self::take_held) would hand out connections
    /// with the count of open connections unchanged.
    pub(crate) fn may_release(&self) -> bool {
        !self.held.is_empty() && self.gave_back
    }

    /// The held connections, to be looked at again (each one either goes
    /// back to reading or is [`hold`](Self::hold)'s again), if one may
    /// read now: some connection's charge fell, or the count of open
    /// connections (which sets every share) changed, since they were last
    /// looked at.
    pub(crate) fn take_held(&mut self, conns: usize) -> Option<Vec<usize>> {
        if self.held.is_empty() || !(self.gave_back || conns != self.looked_at) {
            return None;
        }
        self.gave_back = false;
        self.looked_at = conns;
        Some(std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_above_their_share_stop_once_the_budget_is_spent() {
        let mut budget = Budget::new(1000);
        let (mut big, mut small) = (0, 0);
        budget.recharge(&mut big, 900);
        assert!(budget.may_grow(big, 2), "room left");
        budget.recharge(&mut small, 100);
        assert_eq!(budget.used(), 1000);
        assert!(!budget.may_grow(big, 2), "the big one holds more than half");
        assert!(budget.may_grow(small, 2), "the small one is still served");
        assert!(budget.spent());
        assert!(!budget.should_sweep(), "no connection kept an idle buffer");
        budget.kept_idle();
        assert!(budget.should_sweep(), "idle buffers go once spent");
        assert!(!budget.should_sweep(), "none went idle since");
        budget.hold(7);
        assert_eq!(budget.take_held(2), Some(vec![7]), "first look");
        assert!(!budget.may_grow(big, 2), "still above its share");
        budget.hold(7);
        assert_eq!(budget.take_held(2), None, "nothing given back since");
        assert_eq!(budget.take_held(3), Some(vec![7]), "the shares changed");
        budget.hold(7);
        budget.recharge(&mut big, 100);
        assert_eq!(budget.used(), 200);
        assert!(budget.may_grow(big, 3));
        assert_eq!(budget.take_held(3), Some(vec![7]), "memory given back");
        assert_eq!(budget.take_held(3), None, "none held");
        budget.kept_idle();
        assert!(!budget.should_sweep(), "not spent");
        budget.recharge(&mut small, 900);
        assert!(
            budget.should_sweep(),
            "spent again, with an idle buffer kept"
        );
    }
}
