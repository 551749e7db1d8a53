//! One memory budget for the whole transport: the read buffers and the
//! unwritten output of every connection.
//!
//! Only the IO thread changes it (it owns those buffers), so it is plain
//! arithmetic, one add per buffer change and no atomics; the total is
//! published to the stats once per loop turn.
//!
//! While the budget is spent, a connection holding at least its fair share
//! (the budget divided by the open connections) is not read and its
//! requests are not decoded (so it makes no new replies); connections
//! below their share keep being served. Held connections are read again
//! once the total is back under the budget. Since a connection reads at
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
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Self {
        Budget {
            limit: limit.max(1),
            used: 0,
            held: Vec::new(),
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

    /// The connections to read again, once the budget has room.
    pub(crate) fn release(&mut self) -> Option<Vec<usize>> {
        (self.used < self.limit && !self.held.is_empty()).then(|| std::mem::take(&mut self.held))
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
        budget.hold(7);
        assert_eq!(budget.release(), None);
        budget.recharge(&mut big, 100);
        assert_eq!(budget.used(), 200);
        assert_eq!(budget.release(), Some(vec![7]));
        assert_eq!(budget.release(), None);
    }
}
