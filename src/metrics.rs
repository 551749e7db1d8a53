//! Per packet code numbers: requests, errors by kind, and a latency
//! histogram, for the server and the client side of a transport.
//!
//! Recording takes no lock and allocates nothing: a side's table has a fixed
//! number of slots ([`MAX_CODES`]), each claimed for a packet code by one
//! compare-and-swap the first time the code is seen, and every number in a
//! slot is an atomic counter. Codes seen after the table filled up share one
//! overflow row (reported with `pcode` `"other"`).
//!
//! The histogram has fixed logarithmic buckets: four per power of two of
//! microseconds, from 1 µs to 2^27 µs (about 134 s), plus one for anything
//! longer. A percentile read from it is off by at most a quarter of its
//! power of two (under 19 %), which is what a dashboard and an alert need.
//!
//! These counters never synchronise anything, so they are plain `std`
//! atomics rather than the loom-swappable ones in `sync`: loom would model
//! thousands of them for nothing.

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::packet::PacketCode;

/// How many packet codes each side of a transport tracks on their own rows;
/// codes seen after these share one overflow row.
pub const MAX_CODES: usize = 64;

// The row hash takes the top bits of a product: a power of two of rows.
const _: () = assert!(MAX_CODES.is_power_of_two());

/// Buckets with a finite upper bound: four per power of two up to 2^27 µs.
const FINITE_BUCKETS: usize = 104;
/// The finite buckets and one for longer latencies.
const BUCKETS: usize = FINITE_BUCKETS + 1;

/// A slot's key while no code has claimed it (packet codes are `i32`).
const FREE: i64 = i64::MAX;
/// The overflow row's key.
const OVERFLOW: i64 = i64::MIN;

/// Which side of a request a row counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Side {
    /// Requests this transport's listeners answered.
    Server,
    /// Requests this transport's clients sent.
    Client,
}

impl Side {
    /// `"server"` or `"client"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }
}

/// How a request that did not succeed ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Answered with an error reply ([`Error::Remote`] on the client).
    Remote,
    /// Client: the deadline passed ([`Error::Timeout`]).
    Timeout,
    /// Client: the connection closed first ([`Error::Disconnected`]).
    Disconnected,
    /// Client: the transport stopped first ([`Error::Shutdown`]).
    Shutdown,
    /// Client: the caller gave up ([`Error::Cancelled`]).
    Cancelled,
    /// Server: the handler dropped its responder without replying.
    Unanswered,
    /// Server: the reply was dropped because its connection had closed.
    ReplyDropped,
    /// Anything else (a bad error reply, an I/O error, ...).
    Other,
}

impl ErrorKind {
    /// Every kind, in the order snapshots list them.
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Remote,
        ErrorKind::Timeout,
        ErrorKind::Disconnected,
        ErrorKind::Shutdown,
        ErrorKind::Cancelled,
        ErrorKind::Unanswered,
        ErrorKind::ReplyDropped,
        ErrorKind::Other,
    ];

    /// The kind's name in `/status` and `/metrics` (`"timeout"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Remote => "remote",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Disconnected => "disconnected",
            ErrorKind::Shutdown => "shutdown",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Unanswered => "unanswered",
            ErrorKind::ReplyDropped => "reply_dropped",
            ErrorKind::Other => "other",
        }
    }

    /// The kind a client request that ended with `error` counts under.
    pub fn of(error: &Error) -> Self {
        match error {
            Error::Remote { .. } => ErrorKind::Remote,
            Error::Timeout => ErrorKind::Timeout,
            Error::Disconnected => ErrorKind::Disconnected,
            Error::Shutdown => ErrorKind::Shutdown,
            Error::Cancelled => ErrorKind::Cancelled,
            _ => ErrorKind::Other,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The histogram bucket of a latency of `micros`.
fn bucket_of(micros: u64) -> usize {
    if micros < 4 {
        return micros as usize;
    }
    let octave = 63 - micros.leading_zeros() as usize;
    let sub = ((micros >> (octave - 2)) & 3) as usize;
    (4 * (octave - 1) + sub).min(FINITE_BUCKETS)
}

/// Bucket `i`'s bounds in µs: it holds latencies `lower <= t < upper`.
fn bucket_bounds(i: usize) -> (u64, u64) {
    if i < 4 {
        return (i as u64, i as u64 + 1);
    }
    let octave = i / 4 + 1;
    let sub = (i % 4) as u64;
    ((4 + sub) << (octave - 2), (5 + sub) << (octave - 2))
}

/// One packet code's counters on one side.
struct Row {
    key: AtomicI64,
    buckets: [AtomicU64; BUCKETS],
    sum_micros: AtomicU64,
    errors: [AtomicU64; ErrorKind::ALL.len()],
}

impl Row {
    fn new(key: i64) -> Self {
        Row {
            key: AtomicI64::new(key),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Counts `count` requests that each took `latency`.
    fn record(&self, latency: Duration, error: Option<ErrorKind>, count: u64) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(micros)].fetch_add(count, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(micros.saturating_mul(count), Ordering::Relaxed);
        if let Some(kind) = error {
            self.errors[kind.index()].fetch_add(count, Ordering::Relaxed);
        }
    }

    fn snapshot(&self, side: Side, pcode: Option<PacketCode>) -> CodeMetrics {
        let buckets: [u64; BUCKETS] =
            std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        CodeMetrics {
            side,
            pcode,
            requests: buckets.iter().sum(),
            errors: std::array::from_fn(|i| self.errors[i].load(Ordering::Relaxed)),
            latency: Histogram {
                buckets,
                sum_micros: self.sum_micros.load(Ordering::Relaxed),
            },
        }
    }
}

/// One side's rows: a fixed open-addressed table of packet codes.
pub(crate) struct CodeTable {
    rows: Box<[Row]>,
    overflow: Row,
}

impl CodeTable {
    fn new() -> Self {
        CodeTable {
            rows: (0..MAX_CODES).map(|_| Row::new(FREE)).collect(),
            overflow: Row::new(OVERFLOW),
        }
    }

    /// The row of `pcode`, claiming a free slot on first sight.
    fn row(&self, pcode: PacketCode) -> &Row {
        let key = i64::from(pcode.get());
        // Fibonacci hashing: the product's top bits mix every bit of the
        // code (its low bits would be the code's own low bits).
        let start = ((pcode.get() as u32).wrapping_mul(0x9E37_79B9)
            >> (32 - MAX_CODES.trailing_zeros())) as usize;
        for probe in 0..MAX_CODES {
            let row = &self.rows[(start + probe) % MAX_CODES];
            match row.key.load(Ordering::Acquire) {
                k if k == key => return row,
                FREE => {
                    match row
                        .key
                        .compare_exchange(FREE, key, Ordering::AcqRel, Ordering::Acquire)
                    {
                        Ok(_) => return row,
                        Err(k) if k == key => return row,
                        Err(_) => {}
                    }
                }
                _ => {}
            }
        }
        &self.overflow
    }

    /// Counts one request of `pcode` that took `latency`.
    pub(crate) fn record(&self, pcode: PacketCode, latency: Duration, error: Option<ErrorKind>) {
        self.row(pcode).record(latency, error, 1);
    }

    /// Counts one request of `pcode` that arrived at `received` and ends
    /// now; deferred if this thread defers for this table (see
    /// [`defer_here`](Self::defer_here)).
    pub(crate) fn record_since(
        &self,
        pcode: PacketCode,
        received: Instant,
        error: Option<ErrorKind>,
    ) {
        let deferred = DEFERRED
            .try_with(|deferred| deferred.borrow_mut().add(self.id(), pcode, received, error))
            .unwrap_or(false);
        if !deferred {
            self.record(pcode, received.elapsed(), error);
        }
    }

    /// From now on, requests of this table that end on this thread are
    /// counted when the thread calls [`flush_deferred`](Self::flush_deferred),
    /// with one clock read for all of them, rather than one read and a few
    /// atomic adds each. For the IO thread, which flushes before every
    /// write: a reply is counted before it can reach its peer, and its
    /// latency runs from its decode pass to the write that sends it.
    pub(crate) fn defer_here(&self) {
        DEFERRED.with(|deferred| deferred.borrow_mut().table = self.id());
    }

    /// Counts what this thread deferred for this table.
    pub(crate) fn flush_deferred(&self) {
        let _ = DEFERRED.try_with(|deferred| {
            let mut deferred = deferred.borrow_mut();
            if deferred.table != self.id() || deferred.runs.is_empty() {
                return;
            }
            let now = Instant::now();
            for run in deferred.runs.drain(..) {
                let latency = now.saturating_duration_since(run.received);
                self.row(run.pcode).record(latency, run.error, run.count);
            }
        });
    }

    /// This table's identity, for [`Deferred::table`]: its address (never
    /// dereferenced). Tables live in an `Arc`'d transport, so the address
    /// is stable while the table is in use.
    fn id(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    fn snapshot(&self, side: Side, out: &mut Vec<CodeMetrics>) {
        for row in self.rows.iter() {
            let key = row.key.load(Ordering::Acquire);
            if key != FREE {
                // Keys other than FREE are packet codes (i32 by construction).
                out.push(row.snapshot(side, Some(PacketCode(key as i32))));
            }
        }
        let overflow = self.overflow.snapshot(side, None);
        if overflow.requests > 0 {
            out.push(overflow);
        }
    }
}

/// Requests that ended on one thread and are not counted yet, in runs of
/// equal packet code, arrival and outcome: one decode pass's requests
/// usually make one run.
struct Deferred {
    /// The table this thread defers for (its [`CodeTable::id`]; 0: none).
    table: usize,
    runs: Vec<DeferredRun>,
}

struct DeferredRun {
    pcode: PacketCode,
    received: Instant,
    error: Option<ErrorKind>,
    count: u64,
}

/// Runs a thread holds at most; past this, requests are counted at once.
const MAX_DEFERRED_RUNS: usize = 256;

impl Deferred {
    /// Defers one request if this thread defers for `table`.
    fn add(
        &mut self,
        table: usize,
        pcode: PacketCode,
        received: Instant,
        error: Option<ErrorKind>,
    ) -> bool {
        if self.table != table {
            return false;
        }
        if let Some(last) = self.runs.last_mut() {
            if last.pcode == pcode && last.received == received && last.error == error {
                last.count += 1;
                return true;
            }
        }
        if self.runs.len() == MAX_DEFERRED_RUNS {
            return false;
        }
        self.runs.push(DeferredRun {
            pcode,
            received,
            error,
            count: 1,
        });
        true
    }
}

thread_local! {
    static DEFERRED: RefCell<Deferred> = const {
        RefCell::new(Deferred {
            table: 0,
            runs: Vec::new(),
        })
    };
}

/// Both sides' tables, one per transport.
pub(crate) struct Metrics {
    pub(crate) server: CodeTable,
    pub(crate) client: CodeTable,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            server: CodeTable::new(),
            client: CodeTable::new(),
        }
    }
}

impl Metrics {
    /// Every row that has seen a request: server rows, then client rows,
    /// each ordered by packet code.
    pub(crate) fn snapshot(&self) -> Vec<CodeMetrics> {
        // On the IO thread (the status page), what it deferred counts too.
        self.server.flush_deferred();
        let mut out = Vec::new();
        self.server.snapshot(Side::Server, &mut out);
        self.client.snapshot(Side::Client, &mut out);
        out.retain(|row| row.requests > 0);
        out.sort_by_key(|row| (row.side == Side::Client, row.pcode.is_none(), row.pcode));
        out
    }
}

/// A latency histogram with fixed logarithmic buckets (see the
/// [`Transport::method_metrics`](crate::Transport::method_metrics) docs).
#[derive(Clone)]
pub struct Histogram {
    buckets: [u64; BUCKETS],
    sum_micros: u64,
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .field("p50", &self.percentile(0.5))
            .field("p99", &self.percentile(0.99))
            .finish()
    }
}

impl Histogram {
    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The sum of every recorded latency (whole microseconds each).
    pub fn sum(&self) -> Duration {
        Duration::from_micros(self.sum_micros)
    }

    /// The latency below which a fraction `q` (0.0 to 1.0) of the recorded
    /// ones fall, interpolated within its bucket; `None` if nothing was
    /// recorded. Latencies beyond the last bucket read as its lower bound.
    pub fn percentile(&self, q: f64) -> Option<Duration> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * count as f64).max(1.0);
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (seen + n) as f64 >= rank {
                if i == FINITE_BUCKETS {
                    return Some(Duration::from_micros(bucket_bounds(i - 1).1));
                }
                let (lower, upper) = bucket_bounds(i);
                let within = (rank - seen as f64) / n as f64;
                let micros = lower as f64 + within * (upper - lower) as f64;
                return Some(Duration::from_secs_f64(micros / 1e6));
            }
            seen += n;
        }
        Some(Duration::from_micros(bucket_bounds(FINITE_BUCKETS - 1).1))
    }

    /// The buckets that hold latencies: `(lower, upper, count)`, each
    /// counting latencies `lower <= t < upper`, in order. The last bucket,
    /// for latencies of 2^27 µs (about 134 s) and more, has no upper bound.
    pub fn buckets(&self) -> impl Iterator<Item = (Duration, Option<Duration>, u64)> + '_ {
        (self.buckets.iter().enumerate())
            .filter(|(_, &n)| n > 0)
            .map(|(i, &n)| {
                if i == FINITE_BUCKETS {
                    let lower = bucket_bounds(i - 1).1;
                    return (Duration::from_micros(lower), None, n);
                }
                let (lower, upper) = bucket_bounds(i);
                let upper = Some(Duration::from_micros(upper));
                (Duration::from_micros(lower), upper, n)
            })
    }

    /// Cumulative counts at power-of-two bounds: `(le, count of latencies
    /// below le)` for le = 1 µs, 2 µs, ... 2^27 µs, as Prometheus' `le`
    /// buckets (the `+Inf` bucket is [`count`](Self::count)).
    pub fn cumulative(&self) -> impl Iterator<Item = (Duration, u64)> + '_ {
        let mut seen = 0u64;
        let mut next = 0usize;
        (0..=27u32).map(move |power| {
            let le = 1u64 << power;
            while next < FINITE_BUCKETS && bucket_bounds(next).1 <= le {
                seen += self.buckets[next];
                next += 1;
            }
            (Duration::from_micros(le), seen)
        })
    }
}

/// One packet code's numbers on one side of a transport
/// ([`Transport::method_metrics`](crate::Transport::method_metrics)).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CodeMetrics {
    /// Server rows count requests answered here; client rows, requests sent.
    pub side: Side,
    /// The requests' packet code; `None` for the row shared by codes seen
    /// after [`MAX_CODES`] others.
    pub pcode: Option<PacketCode>,
    /// Requests that ended (each counts once, however it ended).
    pub requests: u64,
    /// Requests by how they failed, indexed like [`ErrorKind::ALL`]; see
    /// [`errors_of`](Self::errors_of).
    errors: [u64; ErrorKind::ALL.len()],
    /// How long they took: on the server from the request's frame decoded
    /// to its reply queued, on the client from sent to ended.
    pub latency: Histogram,
}

impl CodeMetrics {
    /// Requests that ended with an error of `kind`.
    pub fn errors_of(&self, kind: ErrorKind) -> u64 {
        self.errors[kind.index()]
    }

    /// Requests that ended with any error.
    pub fn errors(&self) -> u64 {
        self.errors.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_latency_in_order() {
        let mut last = 0;
        for micros in [0u64, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 100, 1_000, 1 << 20] {
            let i = bucket_of(micros);
            let (lower, upper) = bucket_bounds(i);
            assert!(lower <= micros && micros < upper, "{micros} in {i}");
            assert!(i >= last);
            last = i;
        }
        for i in 0..FINITE_BUCKETS - 1 {
            assert_eq!(bucket_bounds(i).1, bucket_bounds(i + 1).0, "bucket {i}");
        }
        assert_eq!(bucket_bounds(FINITE_BUCKETS - 1).1, 1 << 27);
        assert_eq!(bucket_of((1 << 27) - 1), FINITE_BUCKETS - 1);
        assert_eq!(bucket_of(1 << 27), FINITE_BUCKETS);
        assert_eq!(bucket_of(u64::MAX), FINITE_BUCKETS);
    }

    fn requests_of(table: &CodeTable, pcode: i32) -> u64 {
        let mut rows = Vec::new();
        table.snapshot(Side::Server, &mut rows);
        (rows.iter())
            .filter(|row| row.pcode == Some(PacketCode(pcode)))
            .map(|row| row.requests)
            .sum()
    }

    #[test]
    fn a_deferring_thread_counts_its_table_on_flush_and_others_at_once() {
        let table = CodeTable::new();
        let other = CodeTable::new();
        std::thread::spawn(move || {
            table.defer_here();
            let received = Instant::now();
            for _ in 0..10 {
                table.record_since(PacketCode(1), received, None);
            }
            table.record_since(PacketCode(2), received, Some(ErrorKind::Unanswered));
            other.record_since(PacketCode(1), received, None);
            // Deferred: not counted yet. The other table counts at once.
            assert_eq!(requests_of(&table, 1), 0);
            assert_eq!(requests_of(&other, 1), 1);
            table.flush_deferred();
            assert_eq!(requests_of(&table, 1), 10);
            assert_eq!(requests_of(&table, 2), 1);
            let mut rows = Vec::new();
            table.snapshot(Side::Server, &mut rows);
            let errors: u64 = rows.iter().map(CodeMetrics::errors).sum();
            assert_eq!(errors, 1);
            // A thread holds so many runs; a request that starts a new
            // one past that counts at once.
            for i in 0..MAX_DEFERRED_RUNS as i32 {
                table.record_since(PacketCode(100 + i % 2), received, None);
            }
            for _ in 0..5 {
                table.record_since(PacketCode(102), received, None);
            }
            assert_eq!(requests_of(&table, 100) + requests_of(&table, 101), 0);
            assert_eq!(requests_of(&table, 102), 5);
            table.flush_deferred();
            assert_eq!(
                requests_of(&table, 100) + requests_of(&table, 101),
                MAX_DEFERRED_RUNS as u64
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn percentiles_fall_within_a_quarter_octave() {
        let table = CodeTable::new();
        for micros in 1..=1000u64 {
            table.record(PacketCode(7), Duration::from_micros(micros), None);
        }
        let mut rows = Vec::new();
        table.snapshot(Side::Server, &mut rows);
        let row = &rows[0];
        assert_eq!(row.requests, 1000);
        assert_eq!(row.latency.sum(), Duration::from_micros(500_500));
        for (q, exact) in [(0.5, 500.0), (0.99, 990.0), (0.999, 999.0)] {
            let got = row.latency.percentile(q).unwrap().as_secs_f64() * 1e6;
            assert!((got - exact).abs() / exact < 0.19, "p{q}: {got} vs {exact}");
        }
        let buckets: Vec<_> = row.latency.buckets().collect();
        assert_eq!(buckets.iter().map(|b| b.2).sum::<u64>(), 1000);
        assert_eq!(
            buckets[0],
            (Duration::from_micros(1), Some(Duration::from_micros(2)), 1)
        );
        let cumulative: Vec<_> = row.latency.cumulative().collect();
        assert_eq!(cumulative[0], (Duration::from_micros(1), 0));
        assert_eq!(cumulative[10], (Duration::from_micros(1024), 1000));
        assert_eq!(cumulative[9].1, 511);
    }

    #[test]
    fn codes_claim_rows_until_the_table_is_full() {
        let table = CodeTable::new();
        for code in 0..MAX_CODES as i32 + 10 {
            table.record(PacketCode(code), Duration::ZERO, Some(ErrorKind::Timeout));
        }
        table.record(PacketCode(3), Duration::ZERO, None);
        let mut rows = Vec::new();
        table.snapshot(Side::Client, &mut rows);
        assert_eq!(rows.len(), MAX_CODES + 1);
        let overflow = rows.iter().find(|r| r.pcode.is_none()).unwrap();
        assert_eq!(overflow.requests, 10);
        let three = rows
            .iter()
            .find(|r| r.pcode == Some(PacketCode(3)))
            .unwrap();
        assert_eq!(
            (three.requests, three.errors_of(ErrorKind::Timeout)),
            (2, 1)
        );
        assert_eq!(three.errors(), 1);
    }

    #[test]
    fn the_largest_codes_fit_their_rows() {
        let table = CodeTable::new();
        for code in [i32::MIN, i32::MAX, -1, 0] {
            table.record(PacketCode(code), Duration::from_millis(1), None);
        }
        let mut rows = Vec::new();
        table.snapshot(Side::Server, &mut rows);
        let mut codes: Vec<_> = rows.iter().map(|r| r.pcode.unwrap().get()).collect();
        codes.sort();
        assert_eq!(codes, [i32::MIN, -1, 0, i32::MAX]);
    }
}
