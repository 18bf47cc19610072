//! The server goes away under load — backends killed with pg_terminate_backend, then the
//! whole cluster restarted — and the engine's pool recovers without a restart of its own.
//! A private cluster, in its own test binary, so the restart disturbs no other test.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use pgengine::pool::PoolOptions;
use pgengine::testing::TempCluster;
use pgengine::{Config, PostgresEngine};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_recovers_from_killed_backends_and_a_cluster_restart() {
    let cluster = Arc::new(TempCluster::start().expect("a private cluster"));
    let config = Config::parse(&cluster.url(TempCluster::SUPERUSER)).unwrap();
    let engine = PostgresEngine::new(config);
    let options = PoolOptions::default()
        .max_size(4)
        .acquire_timeout(Duration::from_secs(5));
    engine.start_connection_pool(options).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..8i64)
        .map(|w| {
            let (engine, stop, ok, failed) =
                (engine.clone(), stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let mut i = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let v = w * 1_000_000 + i;
                    // Each query must finish (answer or error) well within the guard: a hang
                    // fails the test instead of stalling it.
                    let q = engine.query_one(("SELECT $1::int8", (v,)));
                    match tokio::time::timeout(Duration::from_secs(20), q).await {
                        Err(_) => panic!("a query hung"),
                        Ok(Ok(row)) => {
                            assert_eq!(
                                row.get::<_, i64>(0),
                                v,
                                "an answer went to the wrong query"
                            );
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => {
                            assert!(
                                e.is_closed()
                                    || e.code().is_some()
                                    || e.kind() == pgengine::ErrorKind::Timeout,
                                "untyped failure: {e}"
                            );
                            failed.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            })
        })
        .collect();

    let wait_for_progress = |ok: Arc<AtomicU64>| async move {
        let start = ok.load(Ordering::Relaxed);
        for _ in 0..500 {
            if ok.load(Ordering::Relaxed) > start + 100 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no progress: the pool did not recover");
    };
    wait_for_progress(ok.clone()).await;

    // Kill every backend but the one doing the killing.
    let admin = PostgresEngine::new(Config::parse(&cluster.url(TempCluster::SUPERUSER)).unwrap());
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed > 0);
    wait_for_progress(ok.clone()).await;

    // Restart the whole cluster (blocking: off the runtime's threads).
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart())
        .await
        .unwrap()
        .unwrap();
    wait_for_progress(ok.clone()).await;

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let stats = engine.pool_stats().unwrap();
    eprintln!(
        "ok {} failed {} pool {stats:?}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    assert!(
        failed.load(Ordering::Relaxed) > 0,
        "the outages were noticed"
    );
    // The counts add up: everything opened is either closed or still in the pool, and
    // nothing is left checked out or waiting.
    assert_eq!((stats.in_use, stats.waiters), (0, 0), "{stats:?}");
    assert!(stats.size <= 4);
    assert_eq!(stats.opened - stats.closed, stats.size as u64, "{stats:?}");
    assert!(
        stats.opened > 4,
        "broken connections were replaced: {stats:?}"
    );
    engine.close_connection_pool().await.unwrap();
}
