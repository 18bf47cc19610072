//! The pool core with fake resources: ordering, limits, timeouts and cancellation, with no
//! database involved.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use super::*;

/// A resource that says whether it is dirty; the manager counts what it did.
#[derive(Debug)]
struct Fake {
    id: usize,
    dirty: bool,
    broken: bool,
}

#[derive(Default)]
struct Counts {
    opened: AtomicUsize,
    closed: AtomicUsize,
    recycled: AtomicUsize,
    fail_connect: AtomicBool,
}

struct FakeManager(Arc<Counts>);

impl Manager for FakeManager {
    type Resource = Fake;

    async fn connect(&self) -> Result<Fake> {
        tokio::task::yield_now().await;
        if self.0.fail_connect.load(Ordering::SeqCst) {
            return Err(Error::closed("refused"));
        }
        let id = self.0.opened.fetch_add(1, Ordering::SeqCst);
        Ok(Fake {
            id,
            dirty: false,
            broken: false,
        })
    }

    fn disposition(&self, r: &Fake) -> Disposition {
        if r.broken {
            Disposition::Discard
        } else if r.dirty {
            Disposition::Recycle
        } else {
            Disposition::Reuse
        }
    }

    async fn recycle(&self, r: &mut Fake) -> Result<()> {
        self.0.recycled.fetch_add(1, Ordering::SeqCst);
        r.dirty = false;
        Ok(())
    }

    async fn health_check(&self, _: &mut Fake) -> Result<()> {
        Ok(())
    }

    async fn close(&self, _: Fake) {
        self.0.closed.fetch_add(1, Ordering::SeqCst);
    }
}

fn pool(max: usize, timeout_ms: u64) -> (Pool<FakeManager>, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let options = PoolOptions::default()
        .max_size(max)
        .acquire_timeout(Duration::from_millis(timeout_ms))
        .idle_timeout(None)
        .max_lifetime(None);
    (Pool::new(FakeManager(counts.clone()), options), counts)
}

async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn reuses_and_respects_max_size() {
    let (pool, counts) = pool(2, 50);
    let a = pool.acquire().await.unwrap();
    let b = pool.acquire().await.unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!(pool.stats().in_use, 2);
    let err = pool.acquire().await.unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::Timeout);
    drop(a);
    let c = pool.acquire().await.unwrap();
    assert_eq!(
        counts.opened.load(Ordering::SeqCst),
        2,
        "the returned one was reused"
    );
    drop((b, c));
    let s = pool.stats();
    assert_eq!((s.size, s.idle, s.in_use, s.waiters), (2, 2, 0, 0));
    assert_eq!((s.acquired, s.timeouts, s.opened), (3, 1, 2));
}

#[tokio::test]
async fn a_resource_past_its_max_lifetime_is_closed_not_handed_out() {
    let counts = Arc::new(Counts::default());
    let options = PoolOptions::default()
        .max_size(1)
        .acquire_timeout(Duration::from_secs(5))
        .idle_timeout(None)
        .max_lifetime(Some(Duration::from_millis(100)));
    let pool = Pool::new(FakeManager(counts.clone()), options);
    let closed = || counts.closed.load(Ordering::SeqCst);
    // Young when it comes back: reused.
    let a = pool.acquire().await.unwrap();
    let first = a.id;
    drop(a);
    let a = pool.acquire().await.unwrap();
    assert_eq!(a.id, first);
    // Past its lifetime when it comes back with a task waiting: closed, and the waiter gets a
    // new one.
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.acquire().await.map(|r| r.id) }
    });
    settle().await;
    assert_eq!(pool.stats().waiters, 1);
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(a);
    let second = waiter.await.unwrap().unwrap();
    assert_ne!(second, first);
    settle().await;
    assert_eq!(closed(), 1);
    // Past its lifetime while idle: closed, whether by the checkout or by the pool's upkeep,
    // and never handed out.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let third = pool.acquire().await.unwrap();
    assert_ne!(third.id, second);
    settle().await;
    assert_eq!(closed(), 2);
    assert_eq!(counts.opened.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn waiters_are_served_first_come_first_served() {
    let (pool, _) = pool(1, 5_000);
    let held = pool.acquire().await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let (pool, order) = (pool.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let r = pool.acquire().await.unwrap();
            order.lock().unwrap().push(i);
            settle().await;
            drop(r);
        }));
        // Let task i join the queue before task i+1.
        settle().await;
    }
    assert_eq!(pool.stats().waiters, 5);
    drop(held);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn a_dropped_waiter_leaves_no_trace() {
    let (pool, _) = pool(1, 5_000);
    let held = pool.acquire().await.unwrap();
    {
        let waiting = pool.acquire();
        let r = tokio::time::timeout(Duration::from_millis(20), waiting).await;
        assert!(r.is_err());
    }
    assert_eq!(pool.stats().waiters, 0);
    drop(held);
    let again = pool.acquire().await.unwrap();
    assert_eq!(pool.stats().size, 1);
    drop(again);
}

/// Polls `acquire` a bounded number of times, then drops it — for every poll count — while a
/// resource is handed over to it part way: the pool must end with every slot accounted for.
#[tokio::test]
async fn cancelled_at_any_point_nothing_leaks() {
    for polls in 0..6 {
        let (pool, _) = pool(2, 5_000);
        let a = pool.acquire().await.unwrap();
        let mut b = Some(pool.acquire().await.unwrap());
        let mut fut = Box::pin(pool.acquire());
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut got = None;
        for i in 0..polls {
            if i == 1 {
                // Returned while the waiter is queued: it goes into the waiter's channel.
                drop(b.take());
            }
            if let std::task::Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
                got = Some(r.unwrap());
                break;
            }
        }
        drop(fut);
        drop(b);
        let s = pool.stats();
        assert_eq!(
            s.in_use,
            1 + usize::from(got.is_some()),
            "polls={polls}: {s:?}"
        );
        assert_eq!(s.waiters, 0, "polls={polls}: {s:?}");
        drop(got);
        drop(a);
        let s = pool.stats();
        assert_eq!(
            (s.size, s.idle, s.in_use, s.waiters),
            (2, 2, 0, 0),
            "polls={polls}"
        );
    }
}

#[tokio::test]
async fn dirty_resources_are_recycled_broken_ones_replaced() {
    let (pool, counts) = pool(1, 1_000);
    let mut r = pool.acquire().await.unwrap();
    r.dirty = true;
    drop(r);
    settle().await;
    let r = pool.acquire().await.unwrap();
    assert!(!r.dirty);
    assert_eq!(counts.recycled.load(Ordering::SeqCst), 1);
    assert_eq!(counts.opened.load(Ordering::SeqCst), 1);
    drop(r);

    let mut r = pool.acquire().await.unwrap();
    r.broken = true;
    // A waiter queued behind the broken one gets the right to open a fresh resource.
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.acquire().await.map(|r| r.id) }
    });
    settle().await;
    drop(r);
    let id = waiter.await.unwrap().unwrap();
    assert_eq!(id, 1, "a new resource was opened");
    settle().await;
    assert_eq!(counts.closed.load(Ordering::SeqCst), 1);
    let s = pool.stats();
    assert_eq!((s.size, s.in_use), (1, 0));
}

#[tokio::test]
async fn failed_connect_frees_the_slot() {
    let (pool, counts) = pool(1, 200);
    counts.fail_connect.store(true, Ordering::SeqCst);
    assert_eq!(
        pool.acquire().await.unwrap_err().kind(),
        crate::ErrorKind::Closed
    );
    assert_eq!(pool.stats().size, 0);
    counts.fail_connect.store(false, Ordering::SeqCst);
    assert!(pool.acquire().await.is_ok());
}

#[tokio::test]
async fn close_fails_waiters_and_waits_for_checked_out() {
    let (pool, counts) = pool(1, 5_000);
    let held = pool.acquire().await.unwrap();
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.acquire().await.map(|_| ()) }
    });
    settle().await;
    let closer = tokio::spawn({
        let pool = pool.clone();
        async move { pool.close(Duration::from_secs(5)).await }
    });
    settle().await;
    assert_eq!(
        waiter.await.unwrap().unwrap_err().kind(),
        crate::ErrorKind::Pool
    );
    drop(held);
    assert_eq!(closer.await.unwrap(), 0);
    settle().await;
    assert_eq!(counts.closed.load(Ordering::SeqCst), 1);
    assert_eq!(
        pool.acquire().await.unwrap_err().kind(),
        crate::ErrorKind::Pool
    );
}

#[tokio::test]
async fn min_idle_is_kept_warm() {
    let counts = Arc::new(Counts::default());
    let options = PoolOptions::default()
        .max_size(4)
        .min_idle(3)
        .idle_timeout(Some(Duration::from_millis(50)));
    let pool = Pool::new(FakeManager(counts.clone()), options);
    for _ in 0..100 {
        if pool.stats().idle >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pool.stats().idle, 3);
}
