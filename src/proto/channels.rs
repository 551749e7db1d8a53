//! The channel table: pending requests by channel id, with their deadlines.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::time::Instant;

use slab::Slab;

use crate::completion::Completion;
use crate::error::Error;
use crate::packet::{ChannelId, Packet, PacketCode};

/// The most requests one [`ChannelPool`] can hold pending (2^20 - 1).
///
/// A channel id spends the bits its pool's capacity needs on the slot index
/// and the rest but the top bit on the slot's generation; this cap keeps at
/// least 11 generation bits.
pub const MAX_PENDING: usize = (1 << 20) - 1;

/// Pending requests, keyed by the channel id their response will carry.
///
/// A [`ChannelId`] packs a slot index (low bits, plus one, so id 0 is never
/// issued) with that slot's generation (the bits above, up to bit 30).
/// Bit 31 tells who sent the request: clear in a pool made by
/// [`new`](Self::new) (what clients send), set in one made by
/// [`with_high_bit`](Self::with_high_bit) (requests a server sends to a
/// connected client), so the two never issue the same id and each end can
/// tell a response from a request by the id alone. A slot's generation
/// advances each time it is freed, so a response arriving after its request
/// timed out matches nothing, even when a newer request reuses the slot.
///
/// The pool is plain data: the owner wraps it in a lock. Every method that
/// removes an entry hands its [`Completion`] back inside a [`Ready`], which
/// the owner fires *after* releasing the lock: no user code and no wakeup
/// ever runs under it, and whoever removes an entry is the only one who can
/// complete it.
///
/// # Examples
/// ```
/// use std::time::{Duration, Instant};
/// use tbnet::{ChannelPool, Packet, ResponseFuture};
///
/// let mut pool = ChannelPool::new(16);
/// let (future, completion) = ResponseFuture::new();
/// let now = Instant::now();
/// let id = pool.allocate(completion, now + Duration::from_secs(1)).unwrap();
///
/// let response = Packet::new(1, "pong");
/// pool.complete(id, response).expect("pending").fire();
/// assert!(pool.is_empty());
/// # drop(future);
/// ```
pub struct ChannelPool {
    entries: Slab<Entry>,
    /// Generation of each slot ever used, indexed like `entries`.
    generations: Vec<u32>,
    /// Min-heap of deadlines. Entries removed by other means stay here until
    /// popped or compacted away (lazy deletion).
    deadlines: BinaryHeap<Reverse<(Instant, u32)>>,
    capacity: usize,
    /// How many may be pending now (`1..=`[`max_limit`](Self::max_limit)).
    limit: usize,
    index_bits: u32,
    /// Bit 31 of every id issued: 0, or `SERVER_BIT`.
    mark: u32,
}

/// Bit 31 of a channel id: set on requests a server sends to a client.
pub(crate) const SERVER_BIT: u32 = 0x8000_0000;

struct Entry {
    id: u32,
    /// The request's packet code and send time, for tracing its outcome.
    pcode: PacketCode,
    sent: Option<Instant>,
    deadline: Instant,
    completion: Completion,
}

/// A removed entry's completion paired with its outcome, to be fired once
/// the lock that guarded the pool is released.
#[must_use = "a Ready must be fired (after releasing the pool's lock)"]
pub struct Ready {
    completion: Completion,
    result: Result<Packet, Error>,
    channel_id: ChannelId,
    pcode: PacketCode,
    sent: Option<Instant>,
}

impl Ready {
    /// Pairs a completion with its outcome.
    pub fn new(completion: Completion, result: Result<Packet, Error>) -> Self {
        Ready {
            completion,
            result,
            channel_id: ChannelId::NONE,
            pcode: PacketCode(0),
            sent: None,
        }
    }

    fn from_entry(entry: Entry, result: Result<Packet, Error>) -> Self {
        Ready {
            completion: entry.completion,
            result,
            channel_id: ChannelId(entry.id),
            pcode: entry.pcode,
            sent: entry.sent,
        }
    }

    /// The request's channel id (`NONE` for a `Ready` made by hand).
    pub fn channel_id(&self) -> ChannelId {
        self.channel_id
    }

    /// The request's packet code, as given to
    /// [`ChannelPool::allocate_request`].
    pub fn pcode(&self) -> PacketCode {
        self.pcode
    }

    /// How long the request was pending at `now`, if its send time was
    /// recorded ([`ChannelPool::allocate_request`]).
    pub fn elapsed(&self, now: Instant) -> Option<std::time::Duration> {
        self.sent.map(|sent| now.saturating_duration_since(sent))
    }

    /// Delivers the outcome: runs the callback, or wakes the waiter.
    pub fn fire(self) {
        self.completion.complete(self.result);
    }

    /// Whether firing runs a user callback (which the transport moves off
    /// its IO thread).
    pub fn is_callback(&self) -> bool {
        self.completion.is_callback()
    }

    /// Whether this ends a one-way post, whose outcome nobody receives.
    pub(crate) fn is_discard(&self) -> bool {
        self.completion.is_discard()
    }

    /// The outcome this will deliver.
    pub fn result(&self) -> &Result<Packet, Error> {
        &self.result
    }
}

impl fmt::Debug for Ready {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ready")
            .field("result", &self.result)
            .finish()
    }
}

impl fmt::Debug for ChannelPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelPool")
            .field("pending", &self.entries.len())
            .field("capacity", &self.capacity)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl ChannelPool {
    /// A pool that holds at most `capacity` pending requests (clamped to
    /// `1..=MAX_PENDING`). It allocates nothing until the first request.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, MAX_PENDING);
        // Slot numbers 1..=capacity must fit in the index bits.
        let index_bits = usize::BITS - capacity.leading_zeros();
        ChannelPool {
            entries: Slab::new(),
            generations: Vec::new(),
            deadlines: BinaryHeap::new(),
            capacity,
            limit: capacity,
            index_bits,
            mark: 0,
        }
    }

    /// A pool like [`new`](Self::new) whose ids all have bit 31 set: the
    /// pool of requests a server sends over an accepted connection, whose
    /// ids can then never equal one its client issued.
    ///
    /// # Examples
    /// ```
    /// use std::time::Instant;
    /// use tbnet::{ChannelPool, ResponseFuture};
    ///
    /// let mut pool = ChannelPool::with_high_bit(4);
    /// let (_future, completion) = ResponseFuture::new();
    /// let id = pool.allocate(completion, Instant::now()).unwrap();
    /// assert_eq!(id.get() >> 31, 1);
    /// ```
    pub fn with_high_bit(capacity: usize) -> Self {
        ChannelPool {
            mark: SERVER_BIT,
            ..Self::new(capacity)
        }
    }

    /// The capacity the pool was made with (what its channel ids' bits
    /// were split for).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Most requests that may be pending now: the capacity, unless
    /// [`set_limit`](Self::set_limit) changed it.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The highest limit [`set_limit`](Self::set_limit) accepts: every slot
    /// number the ids' index bits can carry (at least the capacity, at most
    /// [`MAX_PENDING`]).
    pub fn max_limit(&self) -> usize {
        ((1usize << self.index_bits) - 1).min(MAX_PENDING)
    }

    /// Changes how many requests may be pending, clamped to
    /// `1..=`[`max_limit`](Self::max_limit); returns the limit now in force.
    /// Requests already pending stay, even above a lowered limit; new ones
    /// are refused until the count is below it.
    ///
    /// # Examples
    /// ```
    /// use tbnet::ChannelPool;
    ///
    /// let mut pool = ChannelPool::new(256);
    /// assert_eq!(pool.set_limit(8), 8);
    /// assert_eq!(pool.set_limit(100_000), 511); // 9 index bits
    /// ```
    pub fn set_limit(&mut self, limit: usize) -> usize {
        self.limit = limit.clamp(1, self.max_limit());
        self.limit
    }

    /// Whether a request could be allocated now.
    pub fn has_room(&self) -> bool {
        self.entries.len() < self.limit
    }

    /// Requests pending now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no request is pending.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `id` is pending.
    pub fn contains(&self, id: ChannelId) -> bool {
        self.slot_of(id).is_some()
    }

    /// Registers a pending request that must finish by `deadline` and returns
    /// the channel id its request must carry (never 0).
    ///
    /// # Errors
    /// The completion, given back untouched, when the pool is full.
    pub fn allocate(
        &mut self,
        completion: Completion,
        deadline: Instant,
    ) -> Result<ChannelId, Completion> {
        self.insert(completion, PacketCode(0), None, deadline)
    }

    /// Like [`allocate`](Self::allocate), also recording the request's packet
    /// code and send time, which its [`Ready`] reports (for tracing).
    ///
    /// # Errors
    /// The completion, given back untouched, when the pool is full.
    pub fn allocate_request(
        &mut self,
        completion: Completion,
        pcode: PacketCode,
        sent: Instant,
        deadline: Instant,
    ) -> Result<ChannelId, Completion> {
        self.insert(completion, pcode, Some(sent), deadline)
    }

    fn insert(
        &mut self,
        completion: Completion,
        pcode: PacketCode,
        sent: Option<Instant>,
        deadline: Instant,
    ) -> Result<ChannelId, Completion> {
        if !self.has_room() {
            return Err(completion);
        }
        let slot = self.entries.vacant_key();
        if slot == self.generations.len() {
            self.generations.push(0);
        }
        let id = self.mark | (self.generations[slot] << self.index_bits) | (slot as u32 + 1);
        self.entries.insert(Entry {
            id,
            pcode,
            sent,
            deadline,
            completion,
        });
        self.deadlines.push(Reverse((deadline, id)));
        Ok(ChannelId(id))
    }

    /// Removes the request `id` answered by `response`. `None` if no such
    /// request is pending (it finished already, or never existed): the
    /// caller drops the response and counts it.
    pub fn complete(&mut self, id: ChannelId, response: Packet) -> Option<Ready> {
        self.finish(id, Ok(response))
    }

    /// Removes the request `id` with the outcome `result` (a response, or an
    /// error the response stood for). `None` if no such request is pending.
    pub fn finish(&mut self, id: ChannelId, result: Result<Packet, Error>) -> Option<Ready> {
        let entry = self.remove(id)?;
        Some(Ready::from_entry(entry, result))
    }

    /// Removes the request `id` because its caller gave up on it; it finishes
    /// with [`Error::Cancelled`].
    pub fn cancel(&mut self, id: ChannelId) -> Option<Ready> {
        let entry = self.remove(id)?;
        Some(Ready::from_entry(entry, Err(Error::Cancelled)))
    }

    /// Removes every request whose deadline is at or before `now`, appending
    /// them to `out` (each finishing with [`Error::Timeout`]). Returns how
    /// many expired.
    ///
    /// The cost is proportional to the number that expired plus the stale
    /// heap records passed over (each removed request leaves at most one,
    /// popped once), never to the number still pending.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Ready>) -> usize {
        let before = out.len();
        while let Some(&Reverse((deadline, id))) = self.deadlines.peek() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            if let Some(slot) = self.slot_of(ChannelId(id)) {
                if self.entries[slot].deadline == deadline {
                    let entry = self.take_slot(slot);
                    out.push(Ready::from_entry(entry, Err(Error::Timeout)));
                }
            }
        }
        out.len() - before
    }

    /// The earliest deadline of any pending request.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((deadline, id))) = self.deadlines.peek() {
            match self.slot_of(ChannelId(id)) {
                Some(slot) if self.entries[slot].deadline == deadline => return Some(deadline),
                _ => {
                    self.deadlines.pop();
                }
            }
        }
        None
    }

    /// Removes every pending request (its connection closed, or the
    /// transport stopped), appending each with `error` to `out`.
    pub fn fail_all(&mut self, error: &Error, out: &mut Vec<Ready>) {
        out.extend(
            self.entries
                .drain()
                .map(|entry| Ready::from_entry(entry, Err(error.clone()))),
        );
        for generation in &mut self.generations {
            *generation = next_generation(*generation, self.index_bits);
        }
        self.deadlines.clear();
    }

    fn slot_of(&self, id: ChannelId) -> Option<usize> {
        let low = id.get() & ((1u32 << self.index_bits) - 1);
        let slot = (low as usize).checked_sub(1)?;
        match self.entries.get(slot) {
            Some(entry) if entry.id == id.get() => Some(slot),
            _ => None,
        }
    }

    fn remove(&mut self, id: ChannelId) -> Option<Entry> {
        let slot = self.slot_of(id)?;
        let entry = self.take_slot(slot);
        // Keep lazily deleted heap records from outgrowing the live set.
        if self.deadlines.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            let index_bits = self.index_bits;
            self.deadlines.retain(|Reverse((deadline, id))| {
                let slot = (id & ((1u32 << index_bits) - 1)) as usize - 1;
                matches!(entries.get(slot), Some(e) if e.id == *id && e.deadline == *deadline)
            });
        }
        Some(entry)
    }

    fn take_slot(&mut self, slot: usize) -> Entry {
        self.generations[slot] = next_generation(self.generations[slot], self.index_bits);
        self.entries.remove(slot)
    }
}

fn next_generation(generation: u32, index_bits: u32) -> u32 {
    // Bit 31 is the pool's mark, never a generation bit.
    let generation_bits = 31 - index_bits;
    generation.wrapping_add(1) & ((1u32 << generation_bits) - 1)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::completion::{ResponseFuture, WaitObject};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    fn counting(counter: &Arc<AtomicUsize>) -> Completion {
        let counter = counter.clone();
        Completion::callback(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        })
    }

    fn fire_all(out: Vec<Ready>) {
        out.into_iter().for_each(Ready::fire);
    }

    #[test]
    fn ids_are_never_zero_and_unique_while_pending() {
        let mut pool = ChannelPool::new(1000);
        let t0 = Instant::now();
        let fired = Arc::new(AtomicUsize::new(0));
        let mut ids = std::collections::HashSet::new();
        for _ in 0..1000 {
            let id = pool.allocate(counting(&fired), t0).unwrap();
            assert_ne!(id.get(), 0);
            assert!(ids.insert(id));
        }
        let mut out = Vec::new();
        pool.fail_all(&Error::Shutdown, &mut out);
        assert_eq!(out.len(), 1000);
        fire_all(out);
        assert_eq!(fired.load(Ordering::SeqCst), 1000);
    }

    #[test]
    fn full_pool_hands_the_completion_back() {
        let mut pool = ChannelPool::new(2);
        let t0 = Instant::now();
        let fired = Arc::new(AtomicUsize::new(0));
        pool.allocate(counting(&fired), t0).unwrap();
        pool.allocate(counting(&fired), t0).unwrap();
        let back = pool.allocate(counting(&fired), t0).unwrap_err();
        back.complete(Err(Error::QueueFull));
        assert_eq!(fired.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn late_response_never_completes_a_newer_request_in_the_same_slot() {
        let mut pool = ChannelPool::new(1);
        let t0 = Instant::now();
        let mut wait = WaitObject::new();
        let old = pool.allocate(wait.completion(), t0).unwrap();
        let mut out = Vec::new();
        assert_eq!(pool.expire(t0, &mut out), 1);
        fire_all(out);
        let new = pool
            .allocate(wait.completion(), t0 + Duration::from_secs(5))
            .unwrap();
        assert_ne!(old, new);
        assert_eq!(old.get() & 1, new.get() & 1, "same slot");
        assert!(pool.complete(old, Packet::new(0, "late")).is_none());
        assert!(pool.contains(new));
        pool.complete(new, Packet::new(0, "fresh")).unwrap().fire();
        let results = wait.wait_all();
        assert!(matches!(results[0], Err(Error::Timeout)));
        assert_eq!(results[1].as_ref().unwrap().body(), "fresh");
    }

    #[test]
    fn generation_uses_the_bits_the_index_does_not_need() {
        let mut pool = ChannelPool::new(1); // 1 index bit, 31 generation bits
        let t0 = Instant::now();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = pool.allocate(Completion::callback(|_| {}), t0).unwrap();
            assert!(seen.insert(id), "id {id} reused within 10k generations");
            pool.cancel(id).unwrap().fire();
        }
    }

    #[test]
    fn expire_returns_only_what_is_due_in_deadline_order() {
        let mut pool = ChannelPool::new(100);
        let t0 = Instant::now();
        let mut wait = WaitObject::new();
        let ms = Duration::from_millis;
        let late = pool.allocate(wait.completion(), t0 + ms(30)).unwrap();
        let early = pool.allocate(wait.completion(), t0 + ms(10)).unwrap();
        let mid = pool.allocate(wait.completion(), t0 + ms(20)).unwrap();
        let mut out = Vec::new();
        assert_eq!(pool.expire(t0 + ms(9), &mut out), 0);
        assert_eq!(pool.next_deadline(), Some(t0 + ms(10)));
        assert_eq!(pool.expire(t0 + ms(20), &mut out), 2);
        assert!(!pool.contains(early) && !pool.contains(mid) && pool.contains(late));
        assert_eq!(pool.next_deadline(), Some(t0 + ms(30)));
        fire_all(out);
        pool.complete(late, Packet::new(0, "")).unwrap().fire();
        assert_eq!(pool.next_deadline(), None);
        let results = wait.wait_all();
        assert!(results[0].is_ok());
        assert!(matches!(results[1], Err(Error::Timeout)));
        assert!(matches!(results[2], Err(Error::Timeout)));
    }

    #[test]
    fn completed_requests_do_not_expire_later() {
        let mut pool = ChannelPool::new(10);
        let t0 = Instant::now();
        let fired = Arc::new(AtomicUsize::new(0));
        let id = pool.allocate(counting(&fired), t0).unwrap();
        pool.complete(id, Packet::new(0, "")).unwrap().fire();
        let mut out = Vec::new();
        assert_eq!(pool.expire(t0 + Duration::from_secs(1), &mut out), 0);
        assert_eq!(fired.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn stale_deadline_records_stay_bounded() {
        let mut pool = ChannelPool::new(10);
        let t0 = Instant::now();
        let keep = pool.allocate(Completion::callback(|_| {}), t0).unwrap();
        for i in 0..100_000u64 {
            let id = pool
                .allocate(Completion::callback(|_| {}), t0 + Duration::from_nanos(i))
                .unwrap();
            pool.complete(id, Packet::new(0, "")).unwrap().fire();
            assert!(pool.deadlines.len() <= 2 * pool.len() + 65);
        }
        assert!(pool.contains(keep));
        assert_eq!(pool.next_deadline(), Some(t0));
    }

    #[test]
    fn expire_cost_follows_what_expired_not_what_is_pending() {
        let mut pool = ChannelPool::new(MAX_PENDING);
        let t0 = Instant::now();
        for _ in 0..100_000 {
            pool.allocate(Completion::callback(|_| {}), t0 + Duration::from_secs(60))
                .unwrap();
        }
        let due = pool.allocate(Completion::callback(|_| {}), t0).unwrap();
        let heap_before = pool.deadlines.len();
        let mut out = Vec::new();
        assert_eq!(pool.expire(t0, &mut out), 1);
        // One record popped; the 100k pending ones were not visited.
        assert_eq!(pool.deadlines.len(), heap_before - 1);
        assert!(!pool.contains(due));
        fire_all(out);
        let mut rest = Vec::new();
        pool.fail_all(&Error::Shutdown, &mut rest);
        fire_all(rest);
    }

    #[test]
    fn cancel_finishes_with_cancelled_and_only_once() {
        let mut pool = ChannelPool::new(4);
        let (future, completion) = ResponseFuture::new();
        let id = pool.allocate(completion, Instant::now()).unwrap();
        let ready = pool.cancel(id).unwrap();
        assert!(matches!(ready.result(), Err(Error::Cancelled)));
        ready.fire();
        assert!(pool.cancel(id).is_none());
        assert!(pool.complete(id, Packet::new(0, "")).is_none());
        let mut out = Vec::new();
        assert_eq!(pool.expire(Instant::now(), &mut out), 0);
        drop(future);
    }

    #[test]
    fn bit_31_tells_a_servers_ids_from_a_clients_in_every_generation() {
        for capacity in [1, 256, MAX_PENDING] {
            let mut client = ChannelPool::new(capacity);
            let mut server = ChannelPool::with_high_bit(capacity);
            let t0 = Instant::now();
            // Past the generation counter's wrap for the largest capacity.
            for _ in 0..5000 {
                let fired = Arc::new(AtomicUsize::new(0));
                let id = client.allocate(counting(&fired), t0).unwrap();
                assert_eq!(id.get() >> 31, 0, "client id {id}");
                client.cancel(id).unwrap().fire();
                let id = server.allocate(counting(&fired), t0).unwrap();
                assert_eq!(id.get() >> 31, 1, "server id {id}");
                assert!(server.contains(id));
                server.cancel(id).unwrap().fire();
            }
        }
    }

    #[test]
    fn fail_all_advances_generations() {
        let mut pool = ChannelPool::new(4);
        let t0 = Instant::now();
        let id = pool.allocate(Completion::callback(|_| {}), t0).unwrap();
        let mut out = Vec::new();
        pool.fail_all(&Error::Disconnected, &mut out);
        fire_all(out);
        let again = pool.allocate(Completion::callback(|_| {}), t0).unwrap();
        assert_ne!(id, again);
        assert!(pool.complete(id, Packet::new(0, "")).is_none());
        assert!(pool.cancel(again).is_some_and(|r| {
            r.fire();
            true
        }));
    }

    #[test]
    fn ids_are_unmatched_for_foreign_values() {
        let mut pool = ChannelPool::new(8);
        let id = pool
            .allocate(Completion::callback(|_| {}), Instant::now())
            .unwrap();
        for foreign in [0u32, u32::MAX, id.get() ^ 0x8000_0000, id.get() + 1] {
            assert!(pool
                .complete(ChannelId(foreign), Packet::new(0, ""))
                .is_none());
        }
        assert!(pool.contains(id));
        pool.cancel(id).unwrap().fire();
    }
}
