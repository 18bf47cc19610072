//! Cancellation and timeouts against the real server: a CancelRequest stopping `pg_sleep`,
//! query timeouts (the connection's, the engine's, a query's own) that cancel the statement
//! and leave the connection clean and reused, a timeout inside a transaction failing it,
//! dropped futures cancelled and drained, and a few hundred random cancel points under load
//! with no connection ever reused dirty.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{cluster, connect, tcp_config};
use pgengine::SqlState;
use pgengine::pool::PoolOptions;
use pgengine::testing::TempCluster;
use pgengine::transaction::TxState;
use pgengine::{ErrorKind, PostgresEngine, Query, TransactionError};

/// Whether the backend `pid` is still running a statement that mentions `needle`.
async fn still_running(pid: i32, needle: &str) -> bool {
    let mut admin = connect().await;
    for _ in 0..50 {
        let row = admin
            .query_one((
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE pid = $1 AND state = 'active' AND strpos(query, $2) > 0",
                (pid, needle),
            ))
            .await
            .unwrap();
        if row.get::<_, i64>(0) == 0 {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

async fn pooled_engine(builder: pgengine::engine::EngineBuilder, max: usize) -> PostgresEngine {
    let engine = builder.build();
    engine
        .start_connection_pool(
            PoolOptions::default()
                .max_size(max)
                .acquire_timeout(Duration::from_secs(20)),
        )
        .await
        .unwrap();
    engine
}

fn builder() -> pgengine::engine::EngineBuilder {
    PostgresEngine::builder(tcp_config(TempCluster::SUPERUSER))
}

#[tokio::test]
async fn cancel_token_stops_pg_sleep_and_the_connection_is_reused() {
    let mut conn = connect().await;
    let pid = conn.process_id();
    let token = conn.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        token.cancel_query().await
    });
    let started = Instant::now();
    let err = conn.execute("SELECT pg_sleep(30)").await.unwrap_err();
    let took = started.elapsed();
    eprintln!("pg_sleep(30) cancelled after {took:?}");
    assert_eq!(err.kind(), ErrorKind::Db, "{err}");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    // A bound far below the 30 s the statement would take, not a speed claim.
    assert!(took < Duration::from_secs(15), "{took:?}");
    canceller.await.unwrap().unwrap();
    assert!(conn.is_idle());
    assert_eq!(
        conn.query_one(("SELECT $1::int", (7,)))
            .await
            .unwrap()
            .get::<_, i32>(0),
        7
    );
    assert_eq!(conn.process_id(), pid);
}

#[tokio::test]
async fn connection_query_timeout_cancels_and_keeps_the_connection() {
    let mut conn = connect().await;
    let pid = conn.process_id();
    conn.set_query_timeout(Some(Duration::from_millis(300)));
    assert_eq!(
        conn.query_one("SELECT 1::int")
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
    let err = conn.simple_query("SELECT pg_sleep(30)").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(
        !conn.is_broken(),
        "a cancelled statement leaves the connection usable"
    );
    // The next request reads the cancelled statement's end first, then runs.
    let row = conn
        .query_one(("SELECT $1::text", ("after",)))
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "after");
    assert!(conn.is_idle());
    assert_eq!(conn.process_id(), pid);
    assert!(
        !still_running(pid, "pg_sleep(30)").await,
        "the statement was cancelled"
    );
}

#[tokio::test]
async fn a_query_of_its_own_time_limit() {
    let mut conn = connect().await;
    let q = Query::new("SELECT pg_sleep($1)")
        .bind(30.0f64)
        .timeout(Duration::from_millis(200));
    let err = conn.execute(&q).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    // Other queries have no limit: this one sleeps past the first's.
    conn.execute("SELECT pg_sleep(0.4)").await.unwrap();

    // Through a pooled engine (pipelined or not), with the connection reused afterwards.
    for pipeline in [0, 2] {
        let engine = PostgresEngine::builder(tcp_config(TempCluster::SUPERUSER)).build();
        engine
            .start_connection_pool(PoolOptions::default().max_size(1).pipeline(pipeline))
            .await
            .unwrap();
        let err = engine.execute(&q).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout, "pipeline {pipeline}: {err}");
        assert_eq!(
            engine
                .query_one("SELECT 2::int")
                .await
                .unwrap()
                .get::<_, i32>(0),
            2
        );
        let stats = engine.pool_stats().unwrap();
        assert_eq!(
            (stats.opened, stats.closed),
            (1, 0),
            "reused, not replaced: {stats:?}"
        );
    }
}

/// A cached statement's answer is read whole from its start; when its time limit passes
/// before the answer begins (the server sends BindComplete only with the result), the
/// statement is cancelled and the rest of its answer read before the error returns, as for a
/// statement run the first time: the connection is idle, and its next answer is its own.
#[tokio::test]
async fn a_cached_statement_out_of_time_before_its_answer_began() {
    let mut conn = connect().await;
    let sleep = |seconds: f64| {
        Query::new("SELECT pg_sleep($1), $2::int4")
            .bind(seconds)
            .bind(7i32)
            .timeout(Duration::from_millis(200))
    };
    conn.query_one(&sleep(0.0)).await.unwrap();
    let hits = conn.stats().cache_hits;
    let err = conn.query_one(&sleep(30.0)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert_eq!(
        conn.stats().cache_hits,
        hits + 1,
        "the cached statement ran"
    );
    assert!(conn.is_idle(), "its answer was read to the end");
    assert!(!conn.is_broken());
    let row = conn.query_one(&sleep(0.0)).await.unwrap();
    assert_eq!(row.get::<_, i32>(1), 7);
}

#[tokio::test]
async fn engine_query_timeout_through_the_pool_reuses_the_connection() {
    let engine = pooled_engine(builder().query_timeout(Duration::from_millis(300)), 1).await;
    let pid: i32 = engine
        .query_one("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    let err = engine.execute("SELECT pg_sleep(10)").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    let again: i32 = engine
        .query_one("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, pid, "the same connection, cleaned");
    let stats = engine.pool_stats().unwrap();
    assert_eq!((stats.opened, stats.closed), (1, 0), "{stats:?}");
}

#[tokio::test]
async fn a_timeout_inside_a_transaction_fails_it() {
    let engine = pooled_engine(builder().query_timeout(Duration::from_millis(300)), 2).await;
    engine
        .run_ddl("CREATE TABLE IF NOT EXISTS cancel_tx (id int PRIMARY KEY)")
        .await
        .unwrap();

    // Explicit begin/commit: the commit is refused and nothing is saved.
    let tx = engine.begin().await.unwrap();
    tx.execute("INSERT INTO cancel_tx VALUES (1)")
        .await
        .unwrap();
    let err = tx.execute("SELECT pg_sleep(10)").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert_eq!(tx.state().await, TxState::Failed);
    let err = tx
        .execute("INSERT INTO cancel_tx VALUES (2)")
        .await
        .unwrap_err();
    assert_eq!(
        err.transaction_error(),
        Some(TransactionError::Failed),
        "{err}"
    );
    let err = tx.commit().await.unwrap_err();
    assert_eq!(
        err.transaction_error(),
        Some(TransactionError::NotCommitted),
        "{err}"
    );
    assert_eq!(tx.state().await, TxState::RolledBack);
    drop(tx);

    // The closure form: the error comes out and the block is rolled back.
    let err: pgengine::Error = engine
        .transaction()
        .run(|tx| async move {
            tx.execute("INSERT INTO cancel_tx VALUES (3)").await?;
            tx.execute("SELECT pg_sleep(10)").await?;
            Ok(())
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");

    // Even when the statement beats its cancel, the caller saw an error: no commit.
    let tx = engine.begin().await.unwrap();
    tx.execute("INSERT INTO cancel_tx VALUES (4)")
        .await
        .unwrap();
    let q = Query::new("SELECT pg_sleep(0.35)").timeout(Duration::from_millis(300));
    let _ = tx.execute(&q).await.unwrap_err();
    assert!(tx.commit().await.is_err());
    drop(tx);

    let rows = engine.query("SELECT id FROM cancel_tx").await.unwrap();
    assert!(
        rows.is_empty(),
        "nothing of a timed-out transaction was saved: {rows:?}"
    );
}

#[tokio::test]
async fn a_dropped_query_is_cancelled_and_its_connection_cleaned() {
    let engine = pooled_engine(builder(), 1).await;
    let pid: i32 = engine
        .query_one("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    let dropped = tokio::time::timeout(
        Duration::from_millis(200),
        engine.execute("SELECT pg_sleep(30)"),
    )
    .await;
    assert!(dropped.is_err(), "the query was still running when dropped");
    let started = Instant::now();
    let again: i32 = engine
        .query_one("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    eprintln!("the next query waited {:?}", started.elapsed());
    assert_eq!(again, pid, "the same connection, cancelled and drained");
    assert!(!still_running(pid, "pg_sleep(30)").await);

    // With cancelling off, the statement runs to its end; one longer than the drain
    // timeout costs the connection instead.
    let mut conn = connect().await;
    conn.set_cancel_abandoned(false);
    conn.set_drain_timeout(Duration::from_millis(300));
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        conn.execute("SELECT pg_sleep(2)"),
    )
    .await;
    assert!(dropped.is_err());
    let err = conn.query_one("SELECT 1").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(conn.is_broken());
}

/// A small deterministic generator, so a failing run can be repeated from its seed.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_cancel_points_under_load_never_reuse_a_dirty_connection() {
    let engine = pooled_engine(builder().drain_timeout(Duration::from_secs(10)), 4).await;
    engine
        .run_ddl("CREATE TABLE IF NOT EXISTS cancel_load (task int, n int)")
        .await
        .unwrap();
    let cancelled = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(AtomicUsize::new(0));
    let tasks = 8;
    let per_task = 25;
    let mut handles = Vec::new();
    for task in 0..tasks {
        let engine = engine.clone();
        let (cancelled, completed) = (cancelled.clone(), completed.clone());
        handles.push(tokio::spawn(async move {
            let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ ((task as u64 + 1) * 0x1234_5678_9abc));
            for i in 0..per_task {
                let n = task * 1000 + i;
                let limit = Duration::from_micros(rng.below(20_000));
                let sleep = rng.below(30) as f64 / 1000.0;
                let work = async {
                    match rng.below(3) {
                        0 => engine
                            .query_one(("SELECT $1::int4, pg_sleep($2)", (n, sleep)))
                            .await
                            .map(drop),
                        1 => {
                            engine
                                .transaction()
                                .run(|tx| async move {
                                    tx.execute((
                                        "INSERT INTO cancel_load VALUES ($1, $2)",
                                        (task, n),
                                    ))
                                    .await?;
                                    tx.execute(("SELECT pg_sleep($1)", (sleep,))).await?;
                                    Ok(())
                                })
                                .await
                        }
                        _ => engine
                            .execute(
                                &Query::new("SELECT pg_sleep($1)")
                                    .bind(sleep)
                                    .timeout(limit / 2 + Duration::from_millis(1)),
                            )
                            .await
                            .map(drop),
                    }
                };
                match tokio::time::timeout(limit, work).await {
                    Err(_) | Ok(Err(_)) => cancelled.fetch_add(1, Ordering::Relaxed),
                    Ok(Ok(())) => completed.fetch_add(1, Ordering::Relaxed),
                };
                // Whatever happened, the next connection handed out is idle and the next
                // statement gets its own answer, outside any transaction (a left-over one
                // that inserted would have a transaction id).
                let mut conn = engine.acquire().await.unwrap();
                assert!(
                    conn.is_idle(),
                    "task {task} step {i}: handed out dirty: {conn:?}"
                );
                let row = conn
                    .query_one(("SELECT $1::int4, txid_current_if_assigned() IS NULL", (n,)))
                    .await
                    .unwrap_or_else(|e| panic!("task {task} step {i}: {e}"));
                assert_eq!(
                    row.get::<_, i32>(0),
                    n,
                    "task {task} step {i}: someone else's answer"
                );
                assert!(
                    row.get::<_, bool>(1),
                    "task {task} step {i}: inside an old transaction"
                );
                assert!(conn.is_idle(), "task {task} step {i}: {conn:?}");
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let (cancelled, completed) = (
        cancelled.load(Ordering::Relaxed),
        completed.load(Ordering::Relaxed),
    );
    let stats = engine.pool_stats().unwrap();
    eprintln!("cancelled {cancelled}, completed {completed}, pool {stats:?}");
    assert_eq!(cancelled + completed, tasks as usize * per_task as usize);
    assert!(
        cancelled >= 50,
        "too few cancel points exercised: {cancelled}"
    );
    // Every connection in the pool is clean once the background clean-ups are done.
    for _ in 0..100 {
        if engine.pool_stats().unwrap().in_use == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut held = Vec::new();
    for _ in 0..4 {
        let conn = engine.acquire().await.unwrap();
        assert!(conn.is_idle(), "{conn:?}");
        held.push(conn);
    }
    let _ = cluster();
}

#[tokio::test]
async fn server_timeouts_as_startup_options() {
    let mut config = tcp_config(TempCluster::SUPERUSER);
    config.options(
        "-c statement_timeout=300 -c lock_timeout=200 -c idle_in_transaction_session_timeout=400",
    );
    let mut conn = pgengine::Connection::connect(&config).await.unwrap();
    let shown = conn
        .query_one(
            "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), \
             current_setting('idle_in_transaction_session_timeout')",
        )
        .await
        .unwrap();
    assert_eq!(shown.get::<_, String>(0), "300ms");
    assert_eq!(shown.get::<_, String>(1), "200ms");
    assert_eq!(shown.get::<_, String>(2), "400ms");
    // statement_timeout: the server cancels the statement itself.
    let err = conn.execute("SELECT pg_sleep(5)").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    assert!(conn.is_idle());
    // idle_in_transaction_session_timeout: the server ends the session (FATAL 25P03).
    conn.simple_query("BEGIN").await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let err = conn.query_one("SELECT 1").await.unwrap_err();
    assert!(conn.is_broken(), "{err}");
}
