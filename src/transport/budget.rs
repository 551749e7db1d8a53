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
//! holds less than its share, the buffers counted here never exceed twice
//! the budget plus one read chunk per connection.

/// The transport's memory budget and the connections it holds.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: usize,
    /// Connections (IO tokens) held because the budget was spent.
    held: Vec<usize>,
    /// Idle read buffers were given back since the budget was last under
    /// its limit (once per time it is spent: that walks every connection).
    swept: bool,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Self {
        Budget {
            limit: limit.max(1),
            used: 0,
            held: Vec::new(),
            swept: false,
        }
    }

    /// Bytes the buffers hold now.
    pub(crate) fn used(&self) -> usize {
        self.used
    }

    /// A connection's buffers now hold `now` bytes; `charged` is what they
    /// held before, and becomes `now`.
    pub(crate) fn recharge(&mut self, charged: &mut usize, now: usize) {
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

    /// Whether idle buffers should be given back now: the budget is spent
    /// and they were not given back since it last had room.
    pub(crate) fn should_sweep(&mut self) -> bool {
        if !self.spent() {
            self.swept = false;
            return false;
        }
        !std::mem::replace(&mut self.swept, true)
    }

    /// The held connections, to be looked at again (each one either goes
    /// back to reading or is [`hold`](Self::hold)'s again).
    pub(crate) fn take_held(&mut self) -> Vec<usize> {
        if !self.spent() {
            self.swept = false;
        }
        std::mem::take(&mut self.held)
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
        assert!(
            budget.should_sweep(),
            "idle buffers go once the budget is spent"
        );
        assert!(!budget.should_sweep(), "once per time it is spent");
        budget.hold(7);
        assert_eq!(budget.take_held(), vec![7]);
        assert!(
            !budget.may_grow(big, 2),
            "still above its share: held again"
        );
        budget.hold(7);
        budget.recharge(&mut big, 100);
        assert_eq!(budget.used(), 200);
        assert!(budget.may_grow(big, 2));
        assert_eq!(budget.take_held(), vec![7]);
        assert!(budget.take_held().is_empty());
        budget.recharge(&mut small, 900);
        assert!(budget.should_sweep(), "spent again: another sweep");
    }
}
