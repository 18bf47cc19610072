//! A connection pool that knows nothing of PostgreSQL: it holds resources made by a
//! [`Manager`] and asks the manager, when one comes back, whether it can be reused.
//!
//! Rules, in the order they matter:
//!
//! - **First come, first served.** A task that finds no idle resource and no room to open one
//!   waits in a FIFO queue. A returned resource goes to the first waiter, never to a task that
//!   arrived later.
//! - **Cancel-safe.** What is handed to a waiter travels as a guard: a checked-out resource
//!   ([`Pooled`]) or the right to open one (`Permit`). If the waiter gave up (timed out, was
//!   dropped) before taking it, the guard's `Drop` gives it back, so nothing leaks; a waiter
//!   that leaves also takes its place in the queue with it.
//! - **Only clean resources return.** On return the manager says [`Disposition::Reuse`],
//!   [`Disposition::Recycle`] (clean it first, e.g. roll back an open transaction) or
//!   [`Disposition::Discard`] (its state is unknown: close it, and the slot frees for a new one).
//!
//! The locking rule is simple: `PoolInner::state` (a `std::sync::Mutex`) guards the idle list,
//! the count of live resources and the waiter queue; it is never held across an `.await`.

mod pipelined;
mod postgres;

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

use crate::error::{Error, Result};

pub(crate) use pipelined::Pipeline;
pub use postgres::{AfterConnect, ConnectionManager};

/// What to do with a resource that comes back to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disposition {
    /// It is clean: put it back.
    Reuse,
    /// It can be made clean with [`Manager::recycle`] (e.g. an open transaction to roll back).
    Recycle,
    /// Its state is unknown or broken: close it.
    Discard,
}

/// Makes and judges the resources of a [`Pool`].
pub trait Manager: Send + Sync + 'static {
    /// What the pool holds.
    type Resource: Send + 'static;

    /// Opens a new resource.
    fn connect(&self) -> impl Future<Output = Result<Self::Resource>> + Send;

    /// Says what to do with a resource that comes back. Must not block.
    fn disposition(&self, resource: &Self::Resource) -> Disposition;

    /// Cleans a resource judged [`Disposition::Recycle`].
    fn recycle(&self, resource: &mut Self::Resource) -> impl Future<Output = Result<()>> + Send;

    /// Checks that a resource which sat idle for a while still works.
    fn health_check(
        &self,
        resource: &mut Self::Resource,
    ) -> impl Future<Output = Result<()>> + Send;

    /// A quick check, without waiting, that an idle resource is still alive before it is
    /// handed out.
    fn is_alive(&self, _resource: &mut Self::Resource) -> bool {
        true
    }

    /// Whether `connect` failed because the other side has no room for another resource
    /// right now (PostgreSQL's 53300 too_many_connections): a waiter then waits for one of
    /// the pool's own to come back, within its deadline, instead of failing at once.
    fn is_full(&self, _error: &Error) -> bool {
        false
    }

    /// Closes a resource politely (it is dropped afterwards either way).
    fn close(&self, resource: Self::Resource) -> impl Future<Output = ()> + Send;
}

/// How a pool behaves. Made from [`PoolOptions::default`] and its setters (new options may
/// be added, so it cannot be built field by field); the fields can be read.
///
/// ```
/// use std::time::Duration;
/// use pgengine::pool::PoolOptions;
///
/// let options = PoolOptions::default()
///     .max_size(20)
///     .acquire_timeout(Duration::from_secs(5));
/// assert_eq!(options.max_size, 20);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PoolOptions {
    /// The most resources open at once, idle or in use.
    pub max_size: usize,
    /// How many idle resources the pool keeps open in the background.
    pub min_idle: usize,
    /// How long `acquire` waits before giving up with a timeout error.
    pub acquire_timeout: Duration,
    /// Resources older than this are closed when they come back or are found idle.
    pub max_lifetime: Option<Duration>,
    /// Idle resources unused for this long are closed (down to `min_idle`).
    pub idle_timeout: Option<Duration>,
    /// A resource idle for longer than this is health-checked before it is handed out.
    pub health_check_after: Option<Duration>,
    /// With `PostgresEngine`: the most connections that carry pipelined queries (queries
    /// outside a transaction from many tasks, many in flight per connection); 0 turns
    /// pipelining off, so every query checks a connection out for itself. A pipelined
    /// connection is held only while it has queries to carry; see
    /// [`pipeline_depth`](PoolOptions::pipeline_depth) for how queries are shared among them.
    ///
    /// One task's statements never reach into another's:
    ///
    /// - Transaction control through the engine outside a transaction (`BEGIN`, `COMMIT`,
    ///   `ROLLBACK`, `SAVEPOINT`, `PREPARE TRANSACTION`, …) is refused with
    ///   [`TransactionError::ControlStatement`](crate::TransactionError::ControlStatement),
    ///   pipelined or not: use `engine.transaction()`.
    /// - A statement that changes the session (`SET`, `RESET`, `SET ROLE`, `LISTEN`,
    ///   `DECLARE`, `PREPARE`, `DISCARD`, `LOAD`, `DO`, a temporary table, a call of
    ///   `set_config` or of a session advisory lock function) is never pipelined: it runs on a
    ///   connection of its own, which is put back as it began before its next use (so a `SET`
    ///   through the engine outside a transaction lasts for that statement only; settings for
    ///   every connection belong in the configuration, `options=-c …`).
    /// - Whatever the text hides is caught from the server's answers: a query whose Sync
    ///   leaves a transaction block open is rolled back with every query sent behind it, each
    ///   answered with [`TransactionError::NotCommitted`](crate::TransactionError::NotCommitted);
    ///   a parameter reported with a new value takes the connection out of the pipeline to be
    ///   reset.
    ///
    /// What remains the caller's: a function that changes a setting the server does not
    /// report (a `set_config` inside PL/pgSQL, say), takes a session advisory lock or creates
    /// a temporary table affects the queries already sent behind it on the same connection;
    /// call such functions inside a transaction (`engine.transaction()`), whose connection is
    /// its own. And `currval`/`lastval` only mean something inside a transaction, pipelined or
    /// not: consecutive statements may run on different connections.
    pub pipeline: usize,
    /// With [`pipeline`](PoolOptions::pipeline): how many queries (waiting or in flight) one
    /// pipelined connection carries before the next is brought in; once every one carries
    /// that many, each query goes to the least loaded. Fewer, deeper pipelines cost the
    /// server less than many shallow ones: its process is woken once per many queries
    /// instead of once per query. A connection also stops taking queries while those it has
    /// would keep a new one waiting more than 50 ms (judged from how long its answers have
    /// lately taken, and how long its oldest query has been out), so slow queries are spread
    /// over the connections and new quick ones are not queued behind them. Queries already
    /// queued behind a slow one still wait for it: run long queries with a time limit (never
    /// pipelined) or on a connection of their own. A depth of 1 spreads the queries over all
    /// the connections at once.
    pub pipeline_depth: usize,
}

impl Default for PoolOptions {
    fn default() -> PoolOptions {
        PoolOptions {
            max_size: 10,
            min_idle: 0,
            acquire_timeout: Duration::from_secs(30),
            max_lifetime: Some(Duration::from_secs(30 * 60)),
            idle_timeout: Some(Duration::from_secs(10 * 60)),
            health_check_after: Some(Duration::from_secs(30)),
            pipeline: 0,
            pipeline_depth: 16,
        }
    }
}

impl PoolOptions {
    /// Sets [`PoolOptions::max_size`].
    pub fn max_size(mut self, n: usize) -> Self {
        self.max_size = n;
        self
    }
    /// Sets [`PoolOptions::min_idle`].
    pub fn min_idle(mut self, n: usize) -> Self {
        self.min_idle = n;
        self
    }
    /// Sets [`PoolOptions::acquire_timeout`].
    pub fn acquire_timeout(mut self, d: Duration) -> Self {
        self.acquire_timeout = d;
        self
    }
    /// Sets [`PoolOptions::max_lifetime`].
    pub fn max_lifetime(mut self, d: Option<Duration>) -> Self {
        self.max_lifetime = d;
        self
    }
    /// Sets [`PoolOptions::idle_timeout`].
    pub fn idle_timeout(mut self, d: Option<Duration>) -> Self {
        self.idle_timeout = d;
        self
    }
    /// Sets [`PoolOptions::pipeline`].
    pub fn pipeline(mut self, connections: usize) -> Self {
        self.pipeline = connections;
        self
    }

    /// Sets [`PoolOptions::pipeline_depth`] (at least 1).
    pub fn pipeline_depth(mut self, queries: usize) -> Self {
        self.pipeline_depth = queries.max(1);
        self
    }

    /// Sets [`PoolOptions::health_check_after`].
    pub fn health_check_after(mut self, d: Option<Duration>) -> Self {
        self.health_check_after = d;
        self
    }
}

/// Counts that describe a pool at one moment and over its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Resources open now (idle + in use + being opened).
    pub size: usize,
    /// Idle resources.
    pub idle: usize,
    /// Resources checked out.
    pub in_use: usize,
    /// Tasks waiting for a resource.
    pub waiters: usize,
    /// Successful acquires, ever.
    pub acquired: u64,
    /// Acquires that timed out, ever.
    pub timeouts: u64,
    /// Resources opened, ever.
    pub opened: u64,
    /// Resources closed or discarded, ever.
    pub closed: u64,
    /// Attempts to open a resource that failed, ever (a refused or failed connect, a failed
    /// `after_connect` hook).
    pub connect_failures: u64,
    /// The time acquires spent waiting, in all: from the call until a resource was handed
    /// over or the acquire gave up.
    pub acquire_wait_total: Duration,
    /// The longest any one acquire waited.
    pub acquire_wait_max: Duration,
}

struct Idle<R> {
    resource: R,
    created: Instant,
    idle_since: Instant,
}

/// What a waiter is handed.
enum Handoff<M: Manager> {
    Resource(Pooled<M>),
    Permit(Permit<M>),
}

struct Waiter<M: Manager> {
    id: u64,
    tx: oneshot::Sender<Handoff<M>>,
}

struct State<M: Manager> {
    idle: Vec<Idle<M::Resource>>,
    /// Live resources: idle, checked out, or being opened under a permit.
    size: usize,
    waiters: VecDeque<Waiter<M>>,
}

struct PoolInner<M: Manager> {
    manager: M,
    options: PoolOptions,
    state: Mutex<State<M>>,
    closed: AtomicBool,
    /// Woken whenever a resource is returned or closed (for `close` to wait on).
    returned: Notify,
    next_waiter: AtomicU64,
    acquired: AtomicU64,
    timeouts: AtomicU64,
    opened: AtomicU64,
    closed_count: AtomicU64,
    connect_failures: AtomicU64,
    /// Nanoseconds acquires waited, in all and at most.
    wait_total_ns: AtomicU64,
    wait_max_ns: AtomicU64,
}

/// A pool of resources made by `M`. Cheap to clone: clones share the pool.
pub struct Pool<M: Manager> {
    inner: Arc<PoolInner<M>>,
}

impl<M: Manager> Clone for Pool<M> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

impl<M: Manager> fmt::Debug for Pool<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<M: Manager> Pool<M> {
    /// A pool with no resources yet. With `min_idle > 0` it opens them in the background
    /// (which needs a tokio runtime).
    pub fn new(manager: M, options: PoolOptions) -> Pool<M> {
        let inner = Arc::new(PoolInner {
            manager,
            options,
            state: Mutex::new(State {
                idle: Vec::new(),
                size: 0,
                waiters: VecDeque::new(),
            }),
            closed: AtomicBool::new(false),
            returned: Notify::new(),
            next_waiter: AtomicU64::new(0),
            acquired: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            closed_count: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            wait_total_ns: AtomicU64::new(0),
            wait_max_ns: AtomicU64::new(0),
        });
        let pool = Pool { inner };
        if (pool.inner.options.min_idle > 0
            || pool.inner.options.idle_timeout.is_some()
            || pool.inner.options.max_lifetime.is_some())
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(maintain(Arc::downgrade(&pool.inner)));
        }
        pool
    }

    /// The pool's options.
    pub fn options(&self) -> &PoolOptions {
        &self.inner.options
    }

    /// Takes a resource: an idle one, a new one if there is room, or the first one returned
    /// to the waiters' queue — within `acquire_timeout`.
    pub async fn acquire(&self) -> Result<Pooled<M>> {
        let started = tokio::time::Instant::now();
        self.acquire_within(started, started + self.inner.options.acquire_timeout)
            .await
    }

    /// [`acquire`](Self::acquire) within a deadline of the caller's (a pipelined query's
    /// counts from when it was queued).
    pub(crate) async fn acquire_by(&self, deadline: tokio::time::Instant) -> Result<Pooled<M>> {
        self.acquire_within(tokio::time::Instant::now(), deadline)
            .await
    }

    /// An acquire that began at `started` (one clock reading serves the deadline and the
    /// wait's measure). The timeout error says what the time went on: every resource in use,
    /// opening one, or the other side refusing new ones while none came back.
    async fn acquire_within(
        &self,
        started: tokio::time::Instant,
        deadline: tokio::time::Instant,
    ) -> Result<Pooled<M>> {
        let mut waited_on = WaitedOn::Others;
        // The deadline's timer is made only if the acquire has to wait: an idle connection is
        // handed over without one.
        let outcome = {
            let mut acquiring = std::pin::pin!(self.acquire_inner(&mut waited_on));
            let mut timer = std::pin::pin!(None::<tokio::time::Sleep>);
            std::future::poll_fn(|cx| {
                if let std::task::Poll::Ready(r) = acquiring.as_mut().poll(cx) {
                    return std::task::Poll::Ready(Ok(r));
                }
                if timer.is_none() {
                    timer.set(Some(tokio::time::sleep_until(deadline)));
                }
                match timer.as_mut().as_pin_mut() {
                    Some(sleep) => sleep.poll(cx).map(Err),
                    None => unreachable!("the timer was just set"),
                }
            })
            .await
        };
        let waited = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.inner
            .wait_total_ns
            .fetch_add(waited, Ordering::Relaxed);
        self.inner.wait_max_ns.fetch_max(waited, Ordering::Relaxed);
        match outcome {
            Ok(r) => r,
            Err(_) => {
                self.inner.timeouts.fetch_add(1, Ordering::Relaxed);
                let limit = deadline.saturating_duration_since(started);
                let max = self.inner.options.max_size;
                Err(match waited_on {
                    WaitedOn::Others => Error::timeout(format!(
                        "no connection was free within {limit:?} (pool of {max}, all in use)"
                    )),
                    WaitedOn::Connecting => Error::timeout(format!(
                        "opening a new connection took longer than {limit:?} (the server \
                         accepted but did not finish the startup, or the network is slow)"
                    )),
                    WaitedOn::Full(refusal) => refusal.timed_out(format!(
                        "the server refused new connections and none of the pool's {max} came \
                         back within {limit:?}"
                    )),
                })
            }
        }
    }

    async fn acquire_inner(&self, waited_on: &mut WaitedOn) -> Result<Pooled<M>> {
        // Once the other side refused a new resource for lack of room: how long to wait in
        // line for one of ours to come back before trying to open one again.
        let mut backoff = None::<Duration>;
        loop {
            let handoff = {
                let mut state = self.inner.lock();
                if self.inner.closed.load(Ordering::Acquire) {
                    return Err(Error::pool("the connection pool is closed"));
                }
                if !state.waiters.is_empty() {
                    None
                } else if let Some(idle) = state.idle.pop() {
                    Some(Handoff::Resource(Pooled::new(
                        &self.inner,
                        idle.resource,
                        idle.created,
                        Some(idle.idle_since),
                    )))
                } else if backoff.is_none() {
                    self.inner.permit(&mut state).map(Handoff::Permit)
                } else {
                    None
                }
            };
            let handoff = match (handoff, backoff) {
                (Some(h), _) => h,
                (None, None) => self.wait_in_line().await?,
                (None, Some(pause)) => match tokio::time::timeout(pause, self.wait_in_line()).await
                {
                    Ok(h) => h?,
                    // Nothing came back meanwhile: try opening one again, if there is room.
                    Err(_) => match self.inner.permit(&mut self.inner.lock()) {
                        Some(permit) => Handoff::Permit(permit),
                        None => continue,
                    },
                },
            };
            let pooled = match handoff {
                Handoff::Resource(pooled) => match self.check_out(pooled).await {
                    Some(p) => p,
                    None => continue,
                },
                Handoff::Permit(permit) => {
                    if !matches!(waited_on, WaitedOn::Full(_)) {
                        *waited_on = WaitedOn::Connecting;
                    }
                    match permit.open().await {
                        Ok(pooled) => pooled,
                        // The other side is full, but the pool has resources of its own: one
                        // coming back serves as well as a new one.
                        Err(e) if self.inner.manager.is_full(&e) && self.inner.lock().size > 0 => {
                            *waited_on = WaitedOn::Full(e);
                            backoff = Some(
                                backoff.map_or(FULL_BACKOFF, |b| (b * 2).min(FULL_BACKOFF_MAX)),
                            );
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            self.inner.acquired.fetch_add(1, Ordering::Relaxed);
            return Ok(pooled);
        }
    }

    /// Waits in the FIFO queue for a handoff. Leaving (by being dropped) removes the entry.
    async fn wait_in_line(&self) -> Result<Handoff<M>> {
        let (tx, rx) = oneshot::channel();
        let id = self.inner.next_waiter.fetch_add(1, Ordering::Relaxed);
        {
            let mut state = self.inner.lock();
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(Error::pool("the connection pool is closed"));
            }
            state.waiters.push_back(Waiter { id, tx });
        }
        let mut place = PlaceInLine {
            pool: &self.inner,
            id,
            served: false,
        };
        let r = rx.await;
        place.served = r.is_ok();
        drop(place);
        r.map_err(|_| Error::pool("the connection pool was closed while waiting"))
    }

    /// Checks an idle resource before handing it out: too old → close; idle long → health
    /// check. Returns `None` if it was discarded (the caller tries again).
    async fn check_out(&self, mut pooled: Pooled<M>) -> Option<Pooled<M>> {
        // A resource handed straight over by the task that returned it (no idle time) was in
        // use a moment ago, and its return found it clean and young enough: asking again
        // whether the other side has closed it, or whether it has outlived `max_lifetime`,
        // could only catch what happened in those microseconds, as it could after the
        // checkout. One that sat idle is asked both.
        let Some(idle_since) = pooled.idle_since.take() else {
            return Some(pooled);
        };
        let opts = &self.inner.options;
        if opts
            .max_lifetime
            .is_some_and(|max| pooled.created.elapsed() >= max)
            || !self.inner.manager.is_alive(pooled.resource_mut())
        {
            pooled.discard();
            return None;
        }
        if let Some(after) = opts.health_check_after
            && idle_since.elapsed() >= after
        {
            let ok = self
                .inner
                .manager
                .health_check(pooled.resource_mut())
                .await
                .is_ok();
            if !ok {
                pooled.discard();
                return None;
            }
        }
        Some(pooled)
    }

    /// The pool's counts now.
    pub fn stats(&self) -> PoolStats {
        let state = self.inner.lock();
        let waiters = state.waiters.iter().filter(|w| !w.tx.is_closed()).count();
        PoolStats {
            size: state.size,
            idle: state.idle.len(),
            in_use: state.size - state.idle.len(),
            waiters,
            acquired: self.inner.acquired.load(Ordering::Relaxed),
            timeouts: self.inner.timeouts.load(Ordering::Relaxed),
            opened: self.inner.opened.load(Ordering::Relaxed),
            closed: self.inner.closed_count.load(Ordering::Relaxed),
            connect_failures: self.inner.connect_failures.load(Ordering::Relaxed),
            acquire_wait_total: Duration::from_nanos(
                self.inner.wait_total_ns.load(Ordering::Relaxed),
            ),
            acquire_wait_max: Duration::from_nanos(self.inner.wait_max_ns.load(Ordering::Relaxed)),
        }
    }

    /// True once [`Pool::close`] has been called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Closes the pool: refuses new acquires, fails every waiter, closes idle resources, and
    /// waits up to `wait` for checked-out ones to come back (they are closed when they do).
    /// Returns how many were still checked out when the wait ended.
    pub async fn close(&self, wait: Duration) -> usize {
        self.inner.closed.store(true, Ordering::Release);
        let (idle, waiters) = {
            let mut state = self.inner.lock();
            let idle: Vec<_> = state.idle.drain(..).collect();
            state.size -= idle.len();
            (idle, std::mem::take(&mut state.waiters))
        };
        drop(waiters); // their receivers now fail with "closed"
        for i in idle {
            self.inner.closed_count.fetch_add(1, Ordering::Relaxed);
            self.inner.manager.close(i.resource).await;
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register for the wake-up before looking, so a return in between is not missed.
            let mut notified = std::pin::pin!(self.inner.returned.notified());
            notified.as_mut().enable();
            let in_use = self.inner.lock().size;
            if in_use == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.inner.lock().size;
            }
        }
    }
}

impl<M: Manager> PoolInner<M> {
    fn lock(&self) -> MutexGuard<'_, State<M>> {
        // A panic while holding the lock cannot leave the state half-changed (every change is
        // a single push, pop or counter update), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The right to open a resource, if the pool has room for one more.
    fn permit(self: &Arc<Self>, state: &mut State<M>) -> Option<Permit<M>> {
        if state.size >= self.options.max_size {
            return None;
        }
        state.size += 1;
        Some(Permit {
            pool: Some(self.clone()),
        })
    }

    /// Gives a clean resource back: to the first waiter still waiting, else to the idle list.
    fn give_back(self: &Arc<Self>, resource: M::Resource, created: Instant) {
        if self.closed.load(Ordering::Acquire) {
            self.forget_one();
            self.spawn_close(resource);
            return;
        }
        let mut state = self.lock();
        let mut pooled = Pooled::new(self, resource, created, None);
        while let Some(w) = state.waiters.pop_front() {
            match w.tx.send(Handoff::Resource(pooled)) {
                Ok(()) => return,
                // That waiter has gone: try the next one. The guard came back unused, and
                // must not run its Drop (which would lock the state again).
                Err(Handoff::Resource(p)) => pooled = p,
                Err(Handoff::Permit(_)) => unreachable!("we sent a resource"),
            }
        }
        let (resource, created) = pooled.into_parts();
        state.idle.push(Idle {
            resource,
            created,
            idle_since: Instant::now(),
        });
        drop(state);
        self.returned.notify_waiters();
    }

    /// A live resource is gone (closed or never opened): free its slot, and if someone waits,
    /// hand them the right to open a new one.
    fn forget_one(self: &Arc<Self>) {
        let mut state = self.lock();
        state.size -= 1;
        if !self.closed.load(Ordering::Acquire) {
            while let Some(w) = state.waiters.pop_front() {
                state.size += 1;
                let permit = Permit {
                    pool: Some(self.clone()),
                };
                match w.tx.send(Handoff::Permit(permit)) {
                    Ok(()) => break,
                    Err(Handoff::Permit(mut p)) => {
                        p.pool = None; // not opened: undo without recursing
                        state.size -= 1;
                    }
                    Err(Handoff::Resource(_)) => unreachable!("we sent a permit"),
                }
            }
        }
        drop(state);
        self.returned.notify_waiters();
    }

    fn spawn_close(self: &Arc<Self>, resource: M::Resource) {
        self.closed_count.fetch_add(1, Ordering::Relaxed);
        let pool = self.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move { pool.manager.close(resource).await });
            }
            Err(_) => drop(resource),
        }
    }
}

/// What an acquire that timed out was waiting on, for its error message.
enum WaitedOn {
    /// A resource in use to come back.
    Others,
    /// A new resource to open.
    Connecting,
    /// A resource to come back, after the other side refused a new one for lack of room.
    Full(Error),
}

/// The first pause before opening again after a refusal for lack of room; it doubles up to
/// [`FULL_BACKOFF_MAX`] while refusals go on.
const FULL_BACKOFF: Duration = Duration::from_millis(20);
const FULL_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Removes a waiter's entry from the queue when it stops waiting.
struct PlaceInLine<'a, M: Manager> {
    pool: &'a Arc<PoolInner<M>>,
    id: u64,
    /// Set once a handoff arrived: the entry was popped by the one who sent it.
    served: bool,
}

impl<M: Manager> Drop for PlaceInLine<'_, M> {
    fn drop(&mut self) {
        if self.served {
            // Whoever served us took our entry off the queue already.
            return;
        }
        let mut state = self.pool.lock();
        state.waiters.retain(|w| w.id != self.id);
    }
}

/// The right to open one resource in a reserved slot. Dropped unused, it frees the slot.
struct Permit<M: Manager> {
    pool: Option<Arc<PoolInner<M>>>,
}

impl<M: Manager> Permit<M> {
    async fn open(mut self) -> Result<Pooled<M>> {
        let pool = self.pool.clone().expect("an unused permit has its pool");
        match pool.manager.connect().await {
            Ok(resource) => {
                self.pool = None; // the slot now belongs to the resource
                pool.opened.fetch_add(1, Ordering::Relaxed);
                Ok(Pooled::new(&pool, resource, Instant::now(), None))
            }
            Err(e) => {
                pool.connect_failures.fetch_add(1, Ordering::Relaxed);
                Err(e) // Drop frees the slot and passes it on
            }
        }
    }
}

impl<M: Manager> Drop for Permit<M> {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.forget_one();
        }
    }
}

/// A resource checked out of a [`Pool`]. Dereferences to the resource; dropping it returns the
/// resource to the pool (after [`Manager::disposition`] says how).
pub struct Pooled<M: Manager> {
    resource: Option<M::Resource>,
    pool: Weak<PoolInner<M>>,
    created: Instant,
    /// Set while the resource sits in a handoff fresh from the idle list.
    idle_since: Option<Instant>,
}

impl<M: Manager> Pooled<M> {
    fn new(
        pool: &Arc<PoolInner<M>>,
        resource: M::Resource,
        created: Instant,
        idle_since: Option<Instant>,
    ) -> Pooled<M> {
        Pooled {
            resource: Some(resource),
            pool: Arc::downgrade(pool),
            created,
            idle_since,
        }
    }

    fn resource_mut(&mut self) -> &mut M::Resource {
        self.resource
            .as_mut()
            .expect("a checked-out resource is present until dropped")
    }

    fn into_parts(mut self) -> (M::Resource, Instant) {
        let r = self.resource.take().expect("present");
        (r, self.created)
    }

    /// Closes the resource instead of returning it (its slot frees for a new one).
    pub fn discard(mut self) {
        if let (Some(resource), Some(pool)) = (self.resource.take(), self.pool.upgrade()) {
            pool.forget_one();
            pool.spawn_close(resource);
        }
    }

    /// When the resource was opened.
    pub fn created(&self) -> Instant {
        self.created
    }
}

impl<M: Manager> Deref for Pooled<M> {
    type Target = M::Resource;
    fn deref(&self) -> &M::Resource {
        self.resource
            .as_ref()
            .expect("a checked-out resource is present until dropped")
    }
}

impl<M: Manager> DerefMut for Pooled<M> {
    fn deref_mut(&mut self) -> &mut M::Resource {
        self.resource_mut()
    }
}

impl<M: Manager> fmt::Debug for Pooled<M>
where
    M::Resource: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pooled").field(&self.resource).finish()
    }
}

impl<M: Manager> Drop for Pooled<M> {
    fn drop(&mut self) {
        let Some(mut resource) = self.resource.take() else {
            return;
        };
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let too_old = pool
            .options
            .max_lifetime
            .is_some_and(|max| self.created.elapsed() >= max);
        let disposition = if too_old {
            Disposition::Discard
        } else {
            pool.manager.disposition(&resource)
        };
        match disposition {
            Disposition::Reuse => pool.give_back(resource, self.created),
            Disposition::Discard => {
                pool.forget_one();
                pool.spawn_close(resource);
            }
            Disposition::Recycle => {
                // Cleaning needs the network; it runs in its own task so dropping never blocks.
                let created = self.created;
                match tokio::runtime::Handle::try_current() {
                    Ok(handle) => {
                        handle.spawn(async move {
                            let clean = pool.manager.recycle(&mut resource).await.is_ok()
                                && pool.manager.disposition(&resource) == Disposition::Reuse;
                            if clean {
                                pool.give_back(resource, created);
                            } else {
                                pool.forget_one();
                                pool.spawn_close(resource);
                            }
                        });
                    }
                    Err(_) => {
                        pool.forget_one();
                        pool.closed_count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// Background upkeep: closes resources idle too long or too old, and opens new ones up to
/// `min_idle`. Ends when the pool is dropped or closed.
async fn maintain<M: Manager>(pool: Weak<PoolInner<M>>) {
    let period = {
        let Some(p) = pool.upgrade() else { return };
        let o = &p.options;
        [o.idle_timeout, o.max_lifetime, Some(Duration::from_secs(1))]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(50), Duration::from_secs(1))
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(p) = pool.upgrade() else { return };
        if p.closed.load(Ordering::Acquire) {
            return;
        }
        // Reap.
        let expired: Vec<M::Resource> = {
            let mut state = p.lock();
            let o = &p.options;
            let min_idle = o.min_idle;
            let mut keep = Vec::with_capacity(state.idle.len());
            let mut gone = Vec::new();
            let idle = std::mem::take(&mut state.idle);
            let total = idle.len();
            for (i, e) in idle.into_iter().enumerate() {
                let old = o.max_lifetime.is_some_and(|m| e.created.elapsed() >= m);
                // Oldest idle first in the list; keep at least min_idle of the rest.
                let lazy = o.idle_timeout.is_some_and(|t| e.idle_since.elapsed() >= t)
                    && total - i > min_idle;
                if old || lazy {
                    gone.push(e.resource)
                } else {
                    keep.push(e)
                }
            }
            state.idle = keep;
            state.size -= gone.len();
            gone
        };
        if !expired.is_empty() {
            p.returned.notify_waiters();
        }
        for r in expired {
            p.closed_count.fetch_add(1, Ordering::Relaxed);
            p.manager.close(r).await;
        }
        // Top up to min_idle.
        loop {
            let permit = {
                let mut state = p.lock();
                if state.idle.len() >= p.options.min_idle
                    || state.size >= p.options.max_size
                    || !state.waiters.is_empty()
                {
                    break;
                }
                state.size += 1;
                Permit {
                    pool: Some(p.clone()),
                }
            };
            match permit.open().await {
                Ok(pooled) => drop(pooled), // returns to the idle list (or a waiter)
                Err(e) => {
                    tracing::warn!(
                        target: "pgengine::pool",
                        "could not open a connection: {}",
                        e.redacted()
                    );
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
