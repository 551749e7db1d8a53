//! The worker pool: server requests and client callbacks run here.
//!
//! The IO thread is the single producer of the bounded request queue; when it
//! is full the IO thread stops reading (TCP pushes back on the peer) and the
//! next worker to free a place asks it to resume. Callbacks have their own
//! unbounded queue (bounded in practice by the pending-request limits), fed
//! by whichever thread completes a request, so a slow callback holds up
//! neither the IO thread nor the timer. Idle workers park; producers wake
//! one only when someone sleeps.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::packet::Packet;
use crate::proto::Ready;
use crate::sync::{fence, ArrayQueue, AtomicBool, AtomicUsize, Condvar, Mutex, Ordering, SegQueue};

use super::handler::{ReplyTo, RequestHandler};
use super::{Command, Shared};

/// Requests for a handler, run on a worker: one request; the requests one
/// decode pass of a connection read, run one by one (split among workers
/// when some are idle); or such a pass as one batch, for handlers that take
/// batches.
pub(crate) enum Job {
    One {
        handler: Arc<dyn RequestHandler>,
        request: Packet,
        reply: ReplyTo,
    },
    Requests {
        handler: Arc<dyn RequestHandler>,
        requests: Vec<(Packet, ReplyTo)>,
    },
    Batch {
        handler: Arc<dyn RequestHandler>,
        requests: Vec<(Packet, ReplyTo)>,
    },
    /// A pass a worker is running, shared so that idle workers help: its
    /// requests were counted taken when that worker took the pass.
    Share(Arc<Pass>),
}

/// A decode pass's requests shared by the workers running it: each takes
/// the next request under the lock.
pub(crate) struct Pass {
    state: Mutex<PassState>,
}

struct PassState {
    /// `None` while the pass waits in the pool.
    handler: Option<Arc<dyn RequestHandler>>,
    requests: VecDeque<(Packet, ReplyTo)>,
}

impl Job {
    /// How many requests the job holds.
    pub(crate) fn len(&self) -> usize {
        match self {
            Job::One { .. } => 1,
            Job::Requests { requests, .. } | Job::Batch { requests, .. } => requests.len(),
            Job::Share(_) => 0,
        }
    }
}

/// One connection's requests under [`Dispatch::Ordered`]: a queue that at
/// most one worker runs at a time, front to back.
///
/// The IO thread appends each decode pass's requests and schedules the
/// strand (puts it on the pool's strand queue) if no worker has it; the
/// worker that takes it runs requests until the strand is empty, then
/// unschedules it under the same lock the IO thread appends under, so a
/// request is never left in an unscheduled strand.
///
/// [`Dispatch::Ordered`]: super::Dispatch::Ordered
pub(crate) struct Strand {
    handler: Arc<dyn RequestHandler>,
    /// Hand the handler everything queued at once.
    batches: bool,
    state: Mutex<StrandState>,
}

struct StrandState {
    queue: VecDeque<(Packet, ReplyTo)>,
    /// On the strand queue or held by a worker.
    scheduled: bool,
}

impl Strand {
    pub(crate) fn new(handler: Arc<dyn RequestHandler>, batches: bool) -> Self {
        Strand {
            handler,
            batches,
            state: Mutex::new(StrandState {
                queue: VecDeque::new(),
                scheduled: false,
            }),
        }
    }
}

/// Puts a split `Job::Requests` back together, front first.
fn join(front: Job, rest: Job) -> Job {
    match (front, rest) {
        (
            Job::Requests {
                handler,
                requests: mut all,
            },
            Job::Requests { requests, .. },
        ) => {
            all.extend(requests);
            Job::Requests {
                handler,
                requests: all,
            }
        }
        _ => unreachable!("only Job::Requests are split"),
    }
}

/// What a worker took from a strand.
enum Taken {
    One(Packet, ReplyTo),
    Batch(Vec<(Packet, ReplyTo)>),
}

pub(crate) struct WorkQueues {
    requests: ArrayQueue<Job>,
    /// Emptied request vectors, for the IO thread to gather the next pass
    /// in: no allocation per pass at steady state.
    spare: ArrayQueue<Vec<(Packet, ReplyTo)>>,
    /// Finished shared passes, for the next pass to share.
    spare_passes: ArrayQueue<Arc<Pass>>,
    /// Worker threads started (sharing a pass needs a second one).
    workers: AtomicUsize,
    /// Ordered connections with requests waiting (bounded by the number
    /// of connections: a strand is queued at most once).
    strands: SegQueue<Arc<Strand>>,
    /// Requests waiting for a worker (in queued jobs and in strands), and
    /// how many may before the IO thread pauses reading. A decode pass is
    /// taken whole while there is room, so one pass may go over.
    queued: AtomicUsize,
    limit: usize,
    callbacks: SegQueue<Ready>,
    /// Callbacks queued and not yet run, and how many may be.
    callbacks_queued: AtomicUsize,
    callback_limit: usize,
    sleepers: AtomicUsize,
    /// Workers spinning for work now.
    spinners: AtomicUsize,
    park: Mutex<()>,
    wakeup: Condvar,
    /// The IO thread paused reading because `requests` was full.
    io_waiting: AtomicBool,
    stopping: AtomicBool,
    /// Workers inside a handler now.
    busy: AtomicUsize,
    running: Mutex<usize>,
    exited: Condvar,
    /// The cores this pool may use (see [`Self::may_wake_helper`]).
    cores: usize,
    /// Jobs (requests, shared requests, callbacks) taken by workers so far:
    /// the IO thread's measure of their progress (see [`Self::watch`]).
    progress: AtomicUsize,
    /// The IO thread sleeps (or is about to) with a timeout of at most
    /// [`STALL`], so it will look at jobs left waiting without a wake.
    io_watches: AtomicBool,
    /// A worker left jobs queued without waking a helper (one core).
    jobs_left: AtomicBool,
}

impl WorkQueues {
    pub(crate) fn new(capacity: usize, callback_limit: usize, workers: usize) -> Self {
        WorkQueues {
            // Room for `capacity` requests plus the shared passes (at most
            // one per worker running a pass), so a `Job::Share` never takes
            // a place the IO thread's requests are counted for.
            requests: ArrayQueue::new(capacity.max(1) + workers),
            spare: ArrayQueue::new(SPARE_VECS),
            spare_passes: ArrayQueue::new(SPARE_VECS),
            workers: AtomicUsize::new(0),
            strands: SegQueue::new(),
            queued: AtomicUsize::new(0),
            limit: capacity.max(1),
            callbacks: SegQueue::new(),
            callbacks_queued: AtomicUsize::new(0),
            callback_limit,
            sleepers: AtomicUsize::new(0),
            spinners: AtomicUsize::new(0),
            park: Mutex::new(()),
            wakeup: Condvar::new(),
            io_waiting: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            running: Mutex::new(0),
            exited: Condvar::new(),
            cores: if cfg!(loom) {
                usize::MAX
            } else {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            },
            progress: AtomicUsize::new(0),
            io_watches: AtomicBool::new(false),
            jobs_left: AtomicBool::new(false),
        }
    }

    /// Whether a worker that leaves jobs behind should wake a helper for
    /// them at once. With a core to spare, yes: the helper runs beside it.
    /// Without one (one core, or every core taken by busy workers and the
    /// IO thread) a helper could only take turns with it, so the jobs wait
    /// for the worker itself, unless it makes no progress for [`STALL`] (a
    /// handler that blocks): the IO thread watches for that
    /// ([`Self::watch`]) and wakes a helper then. `counted_busy`: whether
    /// the asking worker is already counted in `busy`.
    fn may_wake_helper(&self, counted_busy: bool) -> bool {
        // Busy workers (this one among them) and the IO thread, which feeds
        // them, are taken to hold a core each.
        let busy = self.busy.load(Ordering::Relaxed) + usize::from(!counted_busy);
        busy + 1 < self.cores
    }

    /// The cores this pool may use.
    pub(crate) fn cores(&self) -> usize {
        self.cores
    }

    /// IO thread: whether a core is spare for it to poll without sleeping
    /// (busy workers and the IO thread fit in the cores).
    pub(crate) fn core_for_io_spin(&self) -> bool {
        self.busy.load(Ordering::Relaxed) < self.cores
    }

    /// IO thread: whether jobs wait that a worker left without waking a
    /// helper, so it must look again within [`STALL`] rather than sleep.
    /// (Jobs the IO thread queued itself had a worker woken for them.)
    pub(crate) fn needs_watching(&self) -> bool {
        if !self.jobs_left.load(Ordering::SeqCst) {
            return false;
        }
        if self.has_jobs() {
            return true;
        }
        self.jobs_left.store(false, Ordering::SeqCst);
        // A job left after the look above set the flag again after its
        // push (all `SeqCst`): look once more.
        if self.has_jobs() {
            self.jobs_left.store(true, Ordering::SeqCst);
            return true;
        }
        false
    }

    /// Requests or callbacks wait (the jobs a worker may leave behind).
    fn has_jobs(&self) -> bool {
        !self.requests.is_empty() || !self.callbacks.is_empty()
    }

    /// IO thread, before it may sleep: whether its timeout lets it watch.
    /// Paired with [`Self::left_jobs`] (both `SeqCst`, as the IO thread's
    /// sleep handshake): either the IO thread sees the jobs left, or the
    /// worker sees that it does not watch and wakes it.
    pub(crate) fn set_io_watches(&self, watches: bool) {
        self.io_watches.store(watches, Ordering::SeqCst);
    }

    /// Worker that leaves jobs queued: wakes a helper for them if a core is
    /// spare, else makes sure the IO thread watches them for a stall.
    fn pass_wake_on(&self, shared: &Shared, counted_busy: bool) {
        if self.may_wake_helper(counted_busy) {
            self.notify();
        } else {
            self.left_jobs(shared);
        }
    }

    /// Worker with no core to spare: it left jobs queued without waking a
    /// helper; the IO thread must be watching for a stall.
    fn left_jobs(&self, shared: &Shared) {
        self.jobs_left.store(true, Ordering::SeqCst);
        if !self.io_watches.load(Ordering::SeqCst) {
            shared.wake_io();
        }
    }

    /// IO thread, on one core: wakes a helper if jobs waited for [`STALL`]
    /// while no request was taken. `seen` is the IO thread's record of the
    /// last progress it saw and when.
    pub(crate) fn watch(&self, seen: &mut (usize, Instant), now: Instant) {
        let progress = self.progress.load(Ordering::Relaxed);
        if progress != seen.0 || !self.has_jobs() {
            *seen = (progress, now);
        } else if now.saturating_duration_since(seen.1) >= STALL {
            *seen = (progress, now);
            self.notify();
        }
    }

    /// IO thread: queues requests, or hands back those the queue had no
    /// room for (the IO thread then pauses reading until a worker asks it
    /// to resume): the limit counts requests, not jobs.
    /// The caller wakes the workers with [`notify`](Self::notify) once per
    /// batch of requests: one fence per batch, not per request.
    pub(crate) fn push_request(&self, job: Job) -> Result<(), Job> {
        let job = match self.try_push(job) {
            Ok(()) => return Ok(()),
            Err(job) => job,
        };
        // Raise the flag before the retry so a worker that frees a place
        // after it either sees the flag or left room for the retry.
        self.io_waiting.store(true, Ordering::SeqCst);
        let retry = self.try_push(job);
        // Full: make sure someone is awake to drain it.
        self.notify();
        retry
    }

    /// Queues `job`, or as much of a `Job::Requests` as there is room
    /// for, handing back the rest. A batch for a batch handler is taken
    /// whole while there is any room.
    fn try_push(&self, job: Job) -> Result<(), Job> {
        let queued = self.queued.load(Ordering::SeqCst);
        if queued >= self.limit {
            return Err(job);
        }
        let room = self.limit - queued;
        let (job, rest) = match job {
            Job::Requests {
                handler,
                mut requests,
            } if requests.len() > room => {
                let mut front = self.spare_vec();
                front.extend(requests.drain(..room));
                let front = Job::Requests {
                    handler: handler.clone(),
                    requests: front,
                };
                (front, Some(Job::Requests { handler, requests }))
            }
            job => (job, None),
        };
        let n = job.len();
        self.queued.fetch_add(n, Ordering::SeqCst);
        if let Err(job) = self.requests.push(job) {
            self.queued.fetch_sub(n, Ordering::SeqCst);
            return Err(match rest {
                Some(rest) => join(job, rest),
                None => job,
            });
        }
        rest.map_or(Ok(()), Err)
    }

    /// IO thread: appends one decode pass's requests (emptying `requests`)
    /// to an ordered connection's strand, scheduling it if no worker has
    /// it. False when the requests waiting in strands reached the queue's
    /// capacity: the IO thread then pauses reading the connection (these
    /// requests were taken all the same) until a worker asks it to resume.
    /// The caller wakes the workers with [`notify`](Self::notify).
    pub(crate) fn push_ordered(
        &self,
        strand: &Arc<Strand>,
        requests: &mut Vec<(Packet, ReplyTo)>,
    ) -> bool {
        let n = requests.len();
        if n == 0 {
            return true;
        }
        let queued = self.queued.fetch_add(n, Ordering::SeqCst) + n;
        let schedule = {
            let mut state = strand.state.lock();
            state.queue.extend(requests.drain(..));
            !std::mem::replace(&mut state.scheduled, true)
        };
        if schedule {
            self.strands.push(strand.clone());
        }
        if queued < self.limit {
            return true;
        }
        // As for the request queue: raise the flag, then look again, so a
        // worker that took requests meanwhile either saw the flag or left
        // the room the second look finds.
        self.io_waiting.store(true, Ordering::SeqCst);
        self.queued.load(Ordering::SeqCst) < self.limit
    }

    /// An empty vector to gather requests in (one a worker emptied, if
    /// any).
    pub(crate) fn spare_vec(&self) -> Vec<(Packet, ReplyTo)> {
        self.spare.pop().unwrap_or_default()
    }

    /// A shared pass holding `requests` (a finished one, if any).
    fn pass(
        &self,
        handler: Arc<dyn RequestHandler>,
        requests: Vec<(Packet, ReplyTo)>,
    ) -> Arc<Pass> {
        let pass = self.spare_passes.pop().unwrap_or_else(|| {
            Arc::new(Pass {
                state: Mutex::new(PassState {
                    handler: None,
                    requests: VecDeque::new(),
                }),
            })
        });
        {
            let mut state = pass.state.lock();
            state.handler = Some(handler);
            // No allocation: the deque takes over the vector's buffer
            // (the empty one it had goes back to the vector pool).
            let empty = std::mem::replace(&mut state.requests, VecDeque::from(requests));
            let _ = self.spare.push(Vec::from(empty));
        }
        pass
    }

    /// A worker finished with `pass`: if no one else holds it, its buffer
    /// and itself go back to the pools.
    fn recycle(&self, pass: Arc<Pass>) {
        if Arc::strong_count(&pass) != 1 {
            return;
        }
        {
            let mut state = pass.state.lock();
            state.handler = None;
            if !state.requests.is_empty() {
                // (Only at shutdown, when requests are dropped.)
                state.requests.clear();
            }
        }
        let _ = self.spare_passes.push(pass);
    }

    /// Queues a callback; the caller wakes the workers with
    /// [`notify`](Self::notify) once per batch. (One entry per callback, so
    /// that a slow callback holds up only itself.)
    pub(crate) fn push_callback(&self, ready: Ready) {
        self.callbacks_queued.fetch_add(1, Ordering::Relaxed);
        self.callbacks.push(ready);
    }

    /// Whether as many callbacks wait as the limit allows: new requests with
    /// callbacks are then refused (`QueueFull`). Pending limits do not bound
    /// this queue, since a request leaves its pool before its callback runs.
    pub(crate) fn callbacks_full(&self) -> bool {
        self.callbacks_queued.load(Ordering::Relaxed) >= self.callback_limit
    }

    fn pop_callback(&self) -> Option<Ready> {
        let ready = self.callbacks.pop()?;
        self.callbacks_queued.fetch_sub(1, Ordering::Relaxed);
        Some(ready)
    }

    pub(crate) fn enter_busy(&self) {
        self.busy.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn leave_busy(&self) {
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }

    /// Workers inside a handler now.
    pub(crate) fn busy(&self) -> usize {
        self.busy.load(Ordering::SeqCst)
    }

    /// Requests queued for workers and not taken yet.
    pub(crate) fn queued_requests(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Wakes a worker, or on a thread that holds its wakes (see
    /// [`hold_wakes`]) notes one for [`take_held_wake`].
    pub(crate) fn notify_or_hold(&self) {
        let held = HELD_WAKE.with(|held| match held.get() {
            Hold::Off => false,
            Hold::On | Hold::Pending => {
                held.set(Hold::Pending);
                true
            }
        });
        if !held {
            self.notify();
        }
    }

    /// Wakes a parked worker, if any, for work queued before this call.
    pub(crate) fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.park.lock();
            self.wakeup.notify_one();
        }
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn is_idle(&self) -> bool {
        self.requests.is_empty() && self.callbacks.is_empty() && self.strands.is_empty()
    }

    /// A worker took `n` requests: if the IO thread paused for room, ask
    /// it to read on.
    fn took_requests(&self, shared: &Shared, n: usize) {
        if n > 0 {
            self.queued.fetch_sub(n, Ordering::SeqCst);
        }
        if self.io_waiting.load(Ordering::SeqCst) && self.io_waiting.swap(false, Ordering::SeqCst) {
            shared.command(Command::ResumeReading);
        }
    }

    /// Drops requests still queued: the transport stopped before a worker
    /// took them. (Their responders hold their connections, which hold the
    /// transport's shared state: left queued they would keep it alive.)
    pub(crate) fn drop_requests(&self) {
        while let Some(job) = self.requests.pop() {
            drop(job);
        }
        while let Some(strand) = self.strands.pop() {
            let mut state = strand.state.lock();
            state.queue.clear();
            state.scheduled = false;
        }
        self.queued.store(0, Ordering::SeqCst);
    }

    /// Runs callbacks still queued (on the calling thread). Used when the
    /// workers are gone.
    pub(crate) fn drain_callbacks(&self) {
        while let Some(ready) = self.pop_callback() {
            run_callback(ready);
        }
    }
}

/// Starts `n` workers named `tbnet-worker-N`.
pub(crate) fn spawn(shared: &Arc<Shared>, n: usize) -> std::io::Result<Vec<JoinHandle<()>>> {
    *shared.workers.running.lock() = n;
    shared.workers.workers.store(n, Ordering::Relaxed);
    (0..n)
        .map(|i| {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("tbnet-worker-{i}"))
                .spawn(move || {
                    work(&shared);
                    let queues = &shared.workers;
                    *queues.running.lock() -= 1;
                    queues.exited.notify_all();
                })
        })
        .collect()
}

fn work(shared: &Shared) {
    super::role::set(super::role::WORKER, shared);
    let queues = &shared.workers;
    // Spinning pays only with a core to spare: the IO thread needs one, so
    // at most `cores - 1` workers spin at once, and with one core none do
    // (a spinner would take the core from the thread that has the work).
    // `available_parallelism` honours this thread's affinity mask and the
    // cgroup CPU quota.
    let max_spinners = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1);
    // Callbacks and requests take turns, so a flood of one cannot starve
    // the other.
    let mut callback_first = true;
    loop {
        callback_first = !callback_first;
        type Runner = fn(&Shared) -> bool;
        let (first, second): (Runner, Runner) = if callback_first {
            (run_one_callback, run_one_request)
        } else {
            (run_one_request, run_one_callback)
        };
        let ran = first(shared) || second(shared);
        if ran {
            continue;
        }
        if queues.is_stopping() {
            return;
        }
        // Requests come in bursts: a short spin catches the next one without
        // the futex round trip of parking and being woken.
        if spin_for_work(queues, max_spinners) {
            continue;
        }
        let mut guard = queues.park.lock();
        queues.sleepers.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if queues.is_idle() && !queues.is_stopping() {
            guard = queues.wakeup.wait(guard);
        }
        queues.sleepers.fetch_sub(1, Ordering::SeqCst);
        drop(guard);
    }
}

fn run_one_callback(shared: &Shared) -> bool {
    let queues = &shared.workers;
    let Some(ready) = queues.pop_callback() else {
        return false;
    };
    queues.progress.fetch_add(1, Ordering::Relaxed);
    // Woken once per batch, a worker passes the wake on while more wait
    // (as for requests), so a slow callback holds up only itself (on one
    // core, the IO thread passes it on if the worker stalls).
    if !queues.callbacks.is_empty() {
        queues.pass_wake_on(shared, false);
    }
    run_callback(ready);
    true
}

fn run_one_request(shared: &Shared) -> bool {
    let queues = &shared.workers;
    let Some(job) = queues.requests.pop() else {
        return match queues.strands.pop() {
            Some(strand) => {
                run_strand(shared, strand);
                true
            }
            None => false,
        };
    };
    // (A shared pass's requests were counted taken, and count as progress,
    // where they are taken. Popping one still frees a place in the queue:
    // an IO thread paused for room reads on.)
    if job.len() > 0 {
        queues.progress.fetch_add(1, Ordering::Relaxed);
    }
    queues.took_requests(shared, job.len());
    if queues.is_stopping() {
        // Shutting down: the request is dropped unanswered.
        return true;
    }
    // The IO thread wakes one worker per batch; each worker that takes a
    // request passes the wake on while more are queued, so a slow handler
    // never holds up the rest of its batch (on one core, the IO thread
    // passes it on if the worker stalls).
    if !queues.requests.is_empty() {
        queues.pass_wake_on(shared, false);
    }
    queues.enter_busy();
    match job {
        Job::One {
            handler,
            request,
            reply,
        } => run_request(handler.as_ref(), request, reply),
        Job::Requests { handler, requests } => run_requests(shared, handler, requests),
        Job::Batch { handler, requests } => run_batch(handler.as_ref(), requests),
        Job::Share(pass) => run_pass(queues, pass),
    }
    queues.leave_busy();
    true
}

/// Runs one decode pass's requests in order. With other workers in the
/// pool the pass is shared first: it goes back on the queue (one push of a
/// reference), so any worker that comes free takes its next request, and a
/// slow handler never holds up the rest of its pass.
fn run_requests(
    shared: &Shared,
    handler: Arc<dyn RequestHandler>,
    mut requests: Vec<(Packet, ReplyTo)>,
) {
    let queues = &shared.workers;
    if requests.len() > 1 && queues.workers.load(Ordering::Relaxed) > 1 {
        let pass = queues.pass(handler, requests);
        if queues.requests.push(Job::Share(pass.clone())).is_ok() {
            queues.pass_wake_on(shared, true);
        }
        run_pass(queues, pass);
        return;
    }
    for (request, reply) in requests.drain(..) {
        run_request(handler.as_ref(), request, reply);
    }
    let _ = queues.spare.push(requests);
}

/// Takes a shared pass's requests one at a time until none is left.
fn run_pass(queues: &WorkQueues, pass: Arc<Pass>) {
    // Taken once per worker and pass, not per request.
    let mut handler: Option<Arc<dyn RequestHandler>> = None;
    loop {
        let (request, reply) = {
            let mut state = pass.state.lock();
            let Some(next) = state.requests.pop_front() else {
                break;
            };
            queues.progress.fetch_add(1, Ordering::Relaxed);
            if handler.is_none() {
                handler = state.handler.clone();
            }
            next
        };
        let handler = handler
            .as_ref()
            .expect("a pass with requests has its handler");
        run_request(handler.as_ref(), request, reply);
    }
    queues.recycle(pass);
}

/// Runs an ordered connection's requests one after another, for at most
/// [`STRAND_TURN`] requests (or batches); a strand with more left goes to
/// the back of the queue so that other connections get workers too.
fn run_strand(shared: &Shared, strand: Arc<Strand>) {
    let queues = &shared.workers;
    // Other connections' strands wait: pass the wake on.
    if !queues.strands.is_empty() {
        queues.notify();
    }
    queues.enter_busy();
    for _ in 0..STRAND_TURN {
        let taken = {
            let mut state = strand.state.lock();
            if state.queue.is_empty() {
                state.scheduled = false;
                queues.leave_busy();
                return;
            }
            if strand.batches {
                Taken::Batch(state.queue.drain(..).collect())
            } else {
                let (request, reply) = state.queue.pop_front().expect("not empty");
                Taken::One(request, reply)
            }
        };
        let n = match &taken {
            Taken::One(..) => 1,
            Taken::Batch(requests) => requests.len(),
        };
        queues.took_requests(shared, n);
        if queues.is_stopping() {
            // Shutting down: dropped unanswered, as queued requests are.
            continue;
        }
        match taken {
            Taken::One(request, reply) => run_request(strand.handler.as_ref(), request, reply),
            Taken::Batch(requests) => run_batch(strand.handler.as_ref(), requests),
        }
    }
    queues.strands.push(strand);
    queues.notify();
    queues.leave_busy();
}

/// Emptied request vectors kept for reuse.
const SPARE_VECS: usize = 64;

/// Requests (or batches) a worker runs from one strand before it lets
/// other connections' strands go first.
const STRAND_TURN: usize = 64;

/// Spins briefly, then yields once, watching for work, if a core is spare
/// for it. True if work came.
fn spin_for_work(queues: &WorkQueues, max_spinners: usize) -> bool {
    if queues.spinners.fetch_add(1, Ordering::Relaxed) >= max_spinners {
        queues.spinners.fetch_sub(1, Ordering::Relaxed);
        return !queues.is_idle();
    }
    let found = spin(queues);
    queues.spinners.fetch_sub(1, Ordering::Relaxed);
    found
}

fn spin(queues: &WorkQueues) -> bool {
    for _ in 0..SPINS {
        if !queues.is_idle() || queues.is_stopping() {
            return true;
        }
        std::hint::spin_loop();
    }
    #[cfg(not(loom))]
    std::thread::yield_now();
    #[cfg(loom)]
    loom::thread::yield_now();
    !queues.is_idle()
}

/// How long queued jobs may wait on one core while no worker takes a
/// request before the IO thread wakes a helper (a handler that blocks).
pub(crate) const STALL: std::time::Duration = std::time::Duration::from_millis(1);

/// Iterations a worker spins before parking (about a microsecond). loom
/// explores every interleaving at each iteration's `is_stopping` load, so
/// its models spin once: spinning only delays the park they check.
const SPINS: usize = if cfg!(loom) { 1 } else { 256 };

/// Runs a callback, catching (and logging) a panic in it.
pub(crate) fn run_callback(ready: Ready) {
    if catch_unwind(AssertUnwindSafe(|| ready.fire())).is_err() {
        tracing::error!("a response callback panicked");
    }
}

fn run_request(handler: &dyn RequestHandler, request: Packet, reply: ReplyTo) {
    let peer = reply.conn().peer();
    if catch_unwind(AssertUnwindSafe(|| handler.handle_request(request, reply))).is_err() {
        tracing::error!(%peer, "a request handler panicked");
    }
}

fn run_batch(handler: &dyn RequestHandler, requests: Vec<(Packet, ReplyTo)>) {
    let Some(peer) = requests.first().map(|(_, reply)| reply.conn().peer()) else {
        return;
    };
    if catch_unwind(AssertUnwindSafe(|| handler.handle_batch(requests))).is_err() {
        tracing::error!(%peer, "a batch handler panicked");
    }
}

/// Tells the workers to stop: they finish the handler they are in, drop
/// queued requests, run queued callbacks and exit.
pub(crate) fn begin_stop(queues: &WorkQueues) {
    queues.stopping.store(true, Ordering::SeqCst);
    let _guard = queues.park.lock();
    queues.wakeup.notify_all();
}

/// Waits until `deadline` for the workers to exit, joins those that did and
/// leaves the rest detached (a handler that never returns keeps its thread;
/// its replies are dropped). Returns how many were left behind.
pub(crate) fn finish_stop(
    queues: &WorkQueues,
    handles: Vec<JoinHandle<()>>,
    deadline: Instant,
) -> usize {
    // `stop` may run on a worker (the last handle dropped in a callback):
    // that worker cannot exit before `stop` returns, so it is not waited for.
    let me = std::thread::current().id();
    let on_worker = handles.iter().any(|h| h.thread().id() == me);
    let mut running = queues.running.lock();
    while *running > usize::from(on_worker) && Instant::now() < deadline {
        running = queues.exited.wait_until(running, deadline);
    }
    let all_exited = *running == usize::from(on_worker);
    drop(running);
    let mut stuck = 0;
    for handle in handles {
        if handle.thread().id() == me {
            continue;
        }
        // A worker that decremented `running` is past all user code.
        if all_exited || handle.is_finished() {
            let _ = handle.join();
        } else {
            stuck += 1;
        }
    }
    if stuck > 0 {
        tracing::warn!(
            stuck,
            "workers still inside a handler after the shutdown grace period; left detached"
        );
    }
    queues.drop_requests();
    queues.drain_callbacks();
    stuck
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::completion::Completion;
    use crate::error::Error;
    use crate::transport::Transport;

    /// A transport's shared state with the real worker loop running on it,
    /// and the poller, which must live as long.
    fn one_worker() -> (Arc<Shared>, mio::Poll, loom::thread::JoinHandle<()>) {
        let (shared, poll) =
            Shared::new(Transport::builder().workers(1)).expect("a poller and its waker");
        let shared = Arc::new(shared);
        let worker = {
            let shared = shared.clone();
            loom::thread::spawn(move || work(&shared))
        };
        (shared, poll, worker)
    }

    /// How many times the callback ran, for a caller to block on.
    struct Runs {
        count: Mutex<usize>,
        changed: Condvar,
    }

    /// A callback queued while the real worker loop spins, parks or wakes
    /// runs exactly once, and `begin_stop` then ends the loop wherever it
    /// is. The caller blocks until the callback ran: a lost wakeup leaves
    /// it and the parked worker both blocked, which loom reports as a
    /// deadlock.
    #[test]
    fn loom_worker_park_notify_never_loses_work() {
        loom::model(|| {
            let (shared, _poll, worker) = one_worker();
            let runs = Arc::new(Runs {
                count: Mutex::new(0),
                changed: Condvar::new(),
            });
            let callback = {
                let runs = runs.clone();
                Completion::callback(move |result: Result<Packet, Error>| {
                    assert!(result.is_ok());
                    *runs.count.lock() += 1;
                    runs.changed.notify_all();
                })
            };
            shared
                .workers
                .push_callback(Ready::new(callback, Ok(Packet::new(1, "x"))));
            shared.workers.notify();
            let mut count = runs.count.lock();
            while *count == 0 {
                count = runs.changed.wait(count);
            }
            drop(count);
            begin_stop(&shared.workers);
            worker.join().unwrap();
            assert_eq!(*runs.count.lock(), 1);
            assert!(shared.workers.is_idle());
        });
    }

    /// Records the bodies of the requests it handles, in order.
    struct Record {
        seen: Mutex<Vec<u8>>,
        changed: Condvar,
    }

    impl RequestHandler for Arc<Record> {
        fn handle_request(&self, request: Packet, reply: ReplyTo) {
            drop(reply);
            self.seen.lock().push(request.body()[0]);
            self.changed.notify_all();
        }
    }

    /// Two decode passes appended to one ordered connection's strand while
    /// the real worker loop runs it, unschedules it, parks or wakes: both
    /// requests run, once each, in order. A request left in an unscheduled
    /// strand leaves the caller and the parked worker blocked, which loom
    /// reports as a deadlock.
    #[test]
    fn loom_strand_never_strands_a_request() {
        // Two preemptions cover the race that matters (an append between
        // the worker's look at an empty strand and its unscheduling, which
        // share one lock) and keep the model to seconds rather than
        // minutes.
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(2);
        model.check(|| {
            let (shared, _poll, worker) = one_worker();
            let record = Arc::new(Record {
                seen: Mutex::new(Vec::new()),
                changed: Condvar::new(),
            });
            let conn = Arc::new(super::super::conn::Conn::new(
                shared.clone(),
                "127.0.0.1:1".parse().unwrap(),
                crate::proto::Side::Server,
                1,
                std::time::Duration::ZERO,
            ));
            let strand = Arc::new(Strand::new(Arc::new(record.clone()), false));
            for body in [1u8, 2] {
                let mut request = Packet::new(1, vec![body]);
                request.set_channel_id(crate::packet::ChannelId(u32::from(body)));
                let reply = ReplyTo::new(conn.clone(), &request, std::time::Instant::now());
                let mut pass = vec![(request, reply)];
                assert!(shared.workers.push_ordered(&strand, &mut pass));
                shared.workers.notify();
            }
            let mut seen = record.seen.lock();
            while seen.len() < 2 {
                seen = record.changed.wait(seen);
            }
            assert_eq!(*seen, vec![1, 2]);
            drop(seen);
            begin_stop(&shared.workers);
            worker.join().unwrap();
            assert_eq!(shared.workers.queued_requests(), 0);
        });
    }
}

/// Whether the current thread holds its worker wakes.
#[derive(Clone, Copy)]
enum Hold {
    Off,
    On,
    /// On, and a wake was held.
    Pending,
}

thread_local! {
    static HELD_WAKE: std::cell::Cell<Hold> = const { std::cell::Cell::new(Hold::Off) };
}

/// From now on, [`WorkQueues::notify_or_hold`] on this thread only notes
/// the wake: the IO thread on one core, where a worker woken in the middle
/// of a round would only switch the IO thread out. It calls
/// [`take_held_wake`] before it may sleep.
pub(crate) fn hold_wakes() {
    HELD_WAKE.with(|held| held.set(Hold::On));
}

/// Whether a wake was held since the last call (and forgets it).
pub(crate) fn take_held_wake() -> bool {
    HELD_WAKE.with(|held| match held.get() {
        Hold::Pending => {
            held.set(Hold::On);
            true
        }
        Hold::On | Hold::Off => false,
    })
}

/// Stops holding wakes on this thread; true if one was held.
pub(crate) fn release_wakes() -> bool {
    let held = take_held_wake();
    HELD_WAKE.with(|hold| hold.set(Hold::Off));
    held
}
