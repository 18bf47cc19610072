//! Transactions, savepoints, Atomic and AsyncBatch against the real cluster — Piccolo's engine
//! tests in Rust, plus the rules a Rust driver owes its users (failed blocks never commit,
//! dropped transactions roll back, errors are typed) and a model-based property test.

mod common;
mod mock;

use std::time::Duration;

use futures::TryStreamExt;
use pgengine::SqlState;
use pgengine::connection::BinaryCopyInWriter;
use pgengine::pool::PoolOptions;
use pgengine::testing::TempCluster;
use pgengine::{
    ErrorKind, PostgresEngine, Query, TransactionError, TransactionStatus, TxState, Type,
};

fn engine() -> PostgresEngine {
    PostgresEngine::new(common::tcp_config(TempCluster::SUPERUSER))
}

/// A table of its own for each test, so tests running at once do not see each other's rows.
async fn table(engine: &PostgresEngine, name: &str) -> String {
    engine
        .run_ddl(&format!(
            "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (v int)"
        ))
        .await
        .unwrap();
    name.to_owned()
}

/// The table's values as the transaction sees them.
async fn tx_values(tx: &pgengine::PostgresTransaction, table: &str) -> Vec<i32> {
    let rows = tx
        .query(format!("SELECT v FROM {table} ORDER BY v"))
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

async fn values(engine: &PostgresEngine, table: &str) -> Vec<i32> {
    let rows = engine
        .query(format!("SELECT v FROM {table} ORDER BY v"))
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test]
async fn atomic_with_a_malformed_query_leaves_no_table_behind() {
    let engine = engine();
    engine
        .run_ddl("DROP TABLE IF EXISTS atomic_gone")
        .await
        .unwrap();
    let mut atomic = engine.atomic();
    atomic.add("CREATE TABLE atomic_gone (v int)");
    atomic.add("INSERT INTO atomic_gone VALUES (1)");
    atomic.add("MALFORMED QUERY");
    let err = atomic.run().await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::SYNTAX_ERROR), "{err}");
    assert!(err.to_string().contains("query 3 of 3"), "{err}");
    let exists = engine
        .query_one("SELECT to_regclass('atomic_gone') IS NOT NULL")
        .await
        .unwrap();
    assert!(!exists.get::<_, bool>(0), "the table was rolled back");
}

#[tokio::test]
async fn atomic_success_with_await_and_the_pool_running() {
    let engine = engine();
    engine
        .start_connection_pool(PoolOptions::default().max_size(1))
        .await
        .unwrap();
    let t = table(&engine, "atomic_ok").await;
    // One round trip for the whole Atomic: BEGIN, the queries and COMMIT in one pipeline.
    let before = engine.acquire().await.unwrap().stats().round_trips;
    let mut atomic = engine.atomic();
    atomic.add(Query::new(format!("INSERT INTO {t} VALUES ($1)")).bind(1i32));
    atomic.add(
        Query::new(format!("INSERT INTO {t} VALUES ($1), ($2)"))
            .bind(2i32)
            .bind(3i32),
    );
    atomic.add(format!("SELECT count(*) FROM {t}"));
    let results = atomic.await.unwrap();
    let after = engine.acquire().await.unwrap().stats().round_trips;
    assert_eq!(after - before, 1, "one round trip");
    assert_eq!(results.len(), 3);
    assert_eq!(results[1].1, 2, "rows affected by the second insert");
    assert_eq!(results[2].0[0].get::<_, i64>(0), 3);
    assert_eq!(values(&engine, &t).await, [1, 2, 3]);
}

#[test]
fn atomic_run_sync_outside_a_runtime_and_refused_inside_one() {
    let engine = engine();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t = rt.block_on(table(&engine, "atomic_sync"));
    let mut atomic = engine.atomic();
    atomic.add(format!("INSERT INTO {t} VALUES (7)"));
    atomic.run_sync().unwrap();
    assert_eq!(rt.block_on(values(&engine, &t)), [7]);
    let err = rt.block_on(async { atomic.run_sync() }).unwrap_err();
    assert_eq!(
        err.transaction_error(),
        Some(TransactionError::BlockingInRuntime)
    );
}

#[tokio::test]
async fn manual_commit_and_manual_rollback_inside_a_scoped_transaction() {
    let engine = engine();
    let t = table(&engine, "manual").await;
    engine
        .transaction()
        .run(|tx| {
            let t = t.clone();
            async move {
                tx.execute(format!("INSERT INTO {t} VALUES (1)")).await?;
                tx.commit().await?;
                assert_eq!(tx.state().await, TxState::Committed);
                Ok::<_, pgengine::Error>(())
            }
        })
        .await
        .unwrap();
    engine
        .transaction()
        .run(|tx| {
            let t = t.clone();
            async move {
                tx.execute(format!("INSERT INTO {t} VALUES (2)")).await?;
                tx.rollback().await?;
                // Using it afterwards is an error, never a silent autocommit.
                let err = tx
                    .execute(format!("INSERT INTO {t} VALUES (3)"))
                    .await
                    .unwrap_err();
                assert_eq!(err.transaction_error(), Some(TransactionError::Finished));
                Ok::<_, pgengine::Error>(())
            }
        })
        .await
        .unwrap();
    assert_eq!(values(&engine, &t).await, [1]);
}

#[tokio::test]
async fn txid_is_equal_within_one_transaction_and_different_across_two() {
    let engine = engine();
    let ids = || {
        engine.transaction().run(|tx| async move {
            let a: i64 = tx.query_one("SELECT txid_current()").await?.get(0);
            let b: i64 = tx.query_one("SELECT txid_current()").await?.get(0);
            Ok::<_, pgengine::Error>((a, b))
        })
    };
    let (a1, a2) = ids().await.unwrap();
    let (b1, b2) = ids().await.unwrap();
    assert_eq!(a1, a2);
    assert_eq!(b1, b2);
    assert_ne!(a1, b1);
}

#[tokio::test]
async fn engine_queries_on_the_task_join_the_transaction() {
    let engine = engine();
    assert!(!engine.transaction_exists());
    let inner = engine.clone();
    let (a, b) = engine
        .transaction()
        .run(|tx| async move {
            assert!(inner.transaction_exists());
            let a: i64 = tx.query_one("SELECT txid_current()").await?.get(0);
            // Through the engine, not the handle: same transaction.
            let b: i64 = inner.query_one("SELECT txid_current()").await?.get(0);
            // A spawned task does not silently share the connection.
            let spawned = tokio::spawn({
                let inner = inner.clone();
                async move { inner.transaction_exists() }
            });
            assert!(!spawned.await.unwrap());
            Ok::<_, pgengine::Error>((a, b))
        })
        .await
        .unwrap();
    assert_eq!(a, b);
    assert!(!engine.transaction_exists());
}

#[tokio::test]
async fn savepoint_rollback_keeps_only_the_first_row() {
    let engine = engine();
    let t = table(&engine, "sp_first").await;
    let tx = engine.begin().await.unwrap();
    tx.execute(format!("INSERT INTO {t} VALUES (1)"))
        .await
        .unwrap();
    let sp = tx.savepoint(None).await.unwrap();
    assert_eq!(sp.name(), "savepoint_1");
    tx.execute(format!("INSERT INTO {t} VALUES (2)"))
        .await
        .unwrap();
    sp.rollback_to().await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(values(&engine, &t).await, [1]);
}

#[tokio::test]
async fn named_savepoints_rollback_to_release_and_failed_recovery() {
    let engine = engine();
    let t = table(&engine, "sp_named").await;
    let tx = engine.begin().await.unwrap();
    tx.execute(format!("INSERT INTO {t} VALUES (1)"))
        .await
        .unwrap();
    tx.savepoint(Some("my_savepoint")).await.unwrap();
    tx.execute(format!("INSERT INTO {t} VALUES (2)"))
        .await
        .unwrap();
    // A failure makes the transaction Failed: other queries are refused without a round trip.
    tx.execute("SELECT 1/0").await.unwrap_err();
    assert_eq!(tx.state().await, TxState::Failed);
    let err = tx.execute("SELECT 1").await.unwrap_err();
    assert_eq!(err.transaction_error(), Some(TransactionError::Failed));
    // Rolling back to the savepoint makes it active again.
    tx.rollback_to("my_savepoint").await.unwrap();
    assert_eq!(tx.state().await, TxState::Active);
    let later = tx.savepoint(Some("later")).await.unwrap();
    tx.rollback_to("my_savepoint").await.unwrap();
    // "later" was rolled past: it cannot be used again.
    let err = later.release().await.unwrap_err();
    assert_eq!(
        err.transaction_error(),
        Some(TransactionError::SavepointGone)
    );
    tx.release("my_savepoint").await.unwrap();
    let err = tx.rollback_to("my_savepoint").await.unwrap_err();
    assert_eq!(
        err.transaction_error(),
        Some(TransactionError::SavepointGone)
    );
    tx.commit().await.unwrap();
    assert_eq!(values(&engine, &t).await, [1]);
}

#[tokio::test]
async fn a_bad_savepoint_name_is_refused_before_anything_is_sent() {
    let engine = engine();
    engine
        .start_connection_pool(PoolOptions::default().max_size(1))
        .await
        .unwrap();
    let tx = engine.begin().await.unwrap();
    let before = tx.stats().await.round_trips;
    for name in ["x; SELECT pg_sleep(10)", "a\"b", "1abc", ""] {
        let err = tx.savepoint(Some(name)).await.unwrap_err();
        assert_eq!(
            err.transaction_error(),
            Some(TransactionError::InvalidSavepointName),
            "{name}"
        );
        assert!(err.safe_to_retry());
    }
    assert_eq!(
        tx.stats().await.round_trips,
        before,
        "nothing reached the server"
    );
    assert_eq!(tx.state().await, TxState::Active);
    // A valid savepoint goes out with the next statement: with its rollback, one round trip.
    let sp = tx.savepoint(Some("ok_name")).await.unwrap();
    assert_eq!(tx.stats().await.round_trips, before);
    sp.rollback_to().await.unwrap();
    assert_eq!(tx.stats().await.round_trips, before + 1);
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn a_savepoint_goes_out_with_whatever_the_transaction_sends_next() {
    let engine = engine();
    engine
        .start_connection_pool(PoolOptions::default().max_size(1))
        .await
        .unwrap();
    let t = table(&engine, "savepoint_carried").await;
    let tx = engine.begin().await.unwrap();
    tx.execute(format!("INSERT INTO {t} VALUES (1)"))
        .await
        .unwrap();
    let trips = tx.stats().await.round_trips;

    // With a statement: the savepoint was made before it, and it costs no trip of its own.
    let sp = tx.savepoint(None).await.unwrap();
    tx.execute(format!("INSERT INTO {t} VALUES (2)"))
        .await
        .unwrap();
    assert_eq!(tx.stats().await.round_trips, trips + 1);
    let err = tx
        .execute(format!("INSERT INTO {t} VALUES ('x')"))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_TEXT_REPRESENTATION),
        "{err}"
    );
    assert_eq!(tx.state().await, TxState::Failed);
    sp.rollback_to().await.unwrap();
    assert_eq!(tx.state().await, TxState::Active);
    assert_eq!(
        tx_values(&tx, &t).await,
        [1],
        "the row inserted after the savepoint is undone"
    );

    // With a simple query, a row stream, a batch and a lent connection: each finds the
    // savepoint made before what it sends.
    let sp = tx.savepoint(None).await.unwrap();
    tx.simple_query(&format!("INSERT INTO {t} VALUES (3)"))
        .await
        .unwrap();
    sp.rollback_to().await.unwrap();
    let sp = tx.savepoint(None).await.unwrap();
    {
        let stream = tx
            .query_stream(format!("INSERT INTO {t} VALUES (4) RETURNING v"))
            .await
            .unwrap();
        let rows: Vec<_> = stream.try_collect().await.unwrap();
        assert_eq!(rows[0].get::<_, i32>(0), 4);
    }
    sp.rollback_to().await.unwrap();
    let sp = tx.savepoint(None).await.unwrap();
    {
        let mut batch = tx
            .batch(format!("INSERT INTO {t} VALUES (5) RETURNING v"), 10)
            .await
            .unwrap();
        while batch.next_batch().await.unwrap().is_some() {}
    }
    sp.rollback_to().await.unwrap();
    let sp = tx.savepoint(None).await.unwrap();
    {
        let mut conn = tx.connection().await.unwrap();
        conn.simple_query(&format!("INSERT INTO {t} VALUES (6)"))
            .await
            .unwrap();
    }
    sp.rollback_to().await.unwrap();
    assert_eq!(
        tx_values(&tx, &t).await,
        [1],
        "every row after a savepoint was undone"
    );

    // More savepoints in a row than wait to be sent at once: all are made, in order.
    let first = tx.savepoint(None).await.unwrap();
    let mut last = None;
    for _ in 0..100 {
        last = Some(tx.savepoint(None).await.unwrap());
    }
    tx.execute(format!("INSERT INTO {t} VALUES (7)"))
        .await
        .unwrap();
    last.unwrap().rollback_to().await.unwrap();
    assert_eq!(tx_values(&tx, &t).await, [1]);
    first.release().await.unwrap();

    // A savepoint right before COMMIT or ROLLBACK ends with the transaction.
    tx.savepoint(None).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(values(&engine, &t).await, vec![1]);
    let tx = engine.begin().await.unwrap();
    tx.execute(format!("INSERT INTO {t} VALUES (8)"))
        .await
        .unwrap();
    tx.savepoint(None).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(values(&engine, &t).await, vec![1]);
    // Dropped with a savepoint not sent: rolled back, and nothing of it rides with the
    // connection's next user.
    let tx = engine.begin().await.unwrap();
    tx.execute(format!("INSERT INTO {t} VALUES (9)"))
        .await
        .unwrap();
    tx.savepoint(None).await.unwrap();
    drop(tx);
    assert_eq!(values(&engine, &t).await, vec![1]);
    let conn = engine.acquire().await.unwrap();
    assert!(conn.is_idle());
    drop(conn);
    let tx = engine.begin().await.unwrap();
    tx.execute(format!("INSERT INTO {t} VALUES (10)"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(values(&engine, &t).await, vec![1, 10]);
}

/// What no real server does on demand — refuse a valid SAVEPOINT (it would for want of
/// shared memory) — from the scripted server: the statement the savepoint went out with
/// reports the savepoint's error, with its SQLSTATE; the block has failed and is never
/// committed.
#[tokio::test]
async fn a_refused_savepoint_is_the_error_of_the_statement_it_went_out_with() {
    use TransactionStatus::{Failed, Idle, InTransaction};
    // A Query answered by a command's tag, as BEGIN and ROLLBACK are.
    let answered = |tag: &str, status| {
        vec![
            Step::Expect(Kind::Query),
            Step::Send(command_complete(tag)),
            Step::Send(ready(status)),
        ]
    };
    use mock::{Kind, MockServer, Step, command_complete, error_response, ready, script};
    use pgengine::protocol::FrontendMessage;
    let server = MockServer::start(script([
        mock::trust_login(),
        answered("BEGIN", InTransaction),
        // The savepoint and the statement, one after the other.
        vec![
            Step::Expect(Kind::Query),
            Step::Expect(Kind::Query),
            Step::Send(error_response("ERROR", "53200", "out of shared memory")),
            Step::Send(ready(Failed)),
            Step::Send(error_response(
                "ERROR",
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            )),
            Step::Send(ready(Failed)),
        ],
        answered("ROLLBACK", Idle),
        // The next transaction: a savepoint and its release, in one Query message.
        answered("BEGIN", InTransaction),
        vec![
            Step::Expect(Kind::Query),
            Step::Send(error_response("ERROR", "53200", "out of shared memory")),
            Step::Send(ready(Failed)),
        ],
        answered("ROLLBACK", Idle),
        // A third: the savepoint is made, and the command after it in the same Query fails.
        answered("BEGIN", InTransaction),
        vec![
            Step::Expect(Kind::Query),
            Step::Send(command_complete("SAVEPOINT")),
            Step::Send(error_response(
                "ERROR",
                "3B001",
                "savepoint \"c\" does not exist",
            )),
            Step::Send(ready(Failed)),
        ],
        answered("ROLLBACK", Idle),
    ]))
    .await;
    let engine = PostgresEngine::new(server.config());
    engine
        .start_connection_pool(PoolOptions::default().max_size(1))
        .await
        .unwrap();
    let hang = Duration::from_secs(60);
    let run = async {
        let tx = engine.begin().await.unwrap();
        tx.savepoint(Some("sp")).await.unwrap();
        let err = tx.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::OUT_OF_MEMORY), "{err}");
        assert!(err.to_string().contains("savepoint"), "{err}");
        assert_eq!(tx.state().await, TxState::Failed);
        let err = tx.commit().await.unwrap_err();
        assert_eq!(
            err.transaction_error(),
            Some(TransactionError::NotCommitted),
            "{err}"
        );

        let tx = engine.begin().await.unwrap();
        let sp = tx.savepoint(Some("b")).await.unwrap();
        let err = sp.release().await.unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::OUT_OF_MEMORY), "{err}");
        assert!(err.to_string().contains("savepoint"), "{err}");
        assert_eq!(tx.state().await, TxState::Failed);
        tx.rollback().await.unwrap();

        // The command's own error is its own, not the savepoint's.
        let tx = engine.begin().await.unwrap();
        let sp = tx.savepoint(Some("c")).await.unwrap();
        let err = sp.release().await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&SqlState::S_E_INVALID_SPECIFICATION),
            "{err}"
        );
        assert!(!err.to_string().contains("savepoint made before"), "{err}");
        assert_eq!(tx.state().await, TxState::Failed);
        tx.rollback().await.unwrap();
        engine.close_connection_pool().await.unwrap();
    };
    tokio::time::timeout(hang, run).await.expect("no hang");
    let transcript = server.finish().await;
    assert!(transcript.failure.is_none(), "{:?}", transcript.failure);
    let queries: Vec<&str> = transcript
        .messages
        .iter()
        .filter_map(|m| match m {
            FrontendMessage::Query(sql) => Some(sql.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        queries,
        [
            "BEGIN",
            "SAVEPOINT \"sp\"",
            "SELECT 1",
            "ROLLBACK",
            "BEGIN",
            "SAVEPOINT \"b\"; RELEASE SAVEPOINT \"b\"",
            "ROLLBACK",
            "BEGIN",
            "SAVEPOINT \"c\"; RELEASE SAVEPOINT \"c\"",
            "ROLLBACK"
        ]
    );
}

#[tokio::test]
async fn nested_transactions_join_or_are_refused() {
    let engine = engine();
    let t = table(&engine, "nested").await;
    let inner = engine.clone();
    engine
        .transaction()
        .run(|tx| {
            let t = t.clone();
            async move {
                let outer_id: i64 = tx.query_one("SELECT txid_current()").await?.get(0);
                // Nested by default: joined, a no-op that neither begins nor commits.
                inner
                    .transaction()
                    .run(|nested| async move {
                        assert!(nested.is_nested());
                        let id: i64 = nested.query_one("SELECT txid_current()").await?.get(0);
                        assert_eq!(id, outer_id);
                        nested.savepoint(None).await?;
                        Ok(())
                    })
                    .await?;
                // Refused with allow_nested(false).
                let err = inner
                    .transaction()
                    .allow_nested(false)
                    .begin()
                    .await
                    .unwrap_err();
                assert_eq!(err.transaction_error(), Some(TransactionError::Nested));
                assert!(err.to_string().contains("already active"));
                tx.execute(format!("INSERT INTO {t} VALUES (1)")).await?;
                Ok::<_, pgengine::Error>(())
            }
        })
        .await
        .unwrap();
    assert_eq!(values(&engine, &t).await, [1]);
}

#[tokio::test]
async fn a_failed_block_is_never_committed() {
    let engine = engine();
    let t = table(&engine, "never").await;
    // Scoped: the closure swallowed the query's error, but the block failed: not committed.
    let err: pgengine::Error = engine
        .transaction()
        .run(|tx| {
            let t = t.clone();
            async move {
                tx.execute(format!("INSERT INTO {t} VALUES (1)")).await?;
                let _ = tx.execute("SELECT 1/0").await;
                Ok(())
            }
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.transaction_error(),
        Some(TransactionError::NotCommitted),
        "{err}"
    );
    // Explicit: commit of a failed transaction is an error, and it rolls back.
    let tx = engine.begin().await.unwrap();
    tx.execute(format!("INSERT INTO {t} VALUES (2)"))
        .await
        .unwrap();
    tx.execute("SELECT 1/0").await.unwrap_err();
    let err = tx.commit().await.unwrap_err();
    assert_eq!(
        err.transaction_error(),
        Some(TransactionError::NotCommitted)
    );
    assert_eq!(tx.state().await, TxState::RolledBack);
    let err = tx.commit().await.unwrap_err();
    assert_eq!(
        err.transaction_error(),
        Some(TransactionError::Finished),
        "commit twice"
    );
    assert!(values(&engine, &t).await.is_empty());
}

#[tokio::test]
async fn a_failing_commit_carries_its_sqlstate_and_leaves_the_connection_clean() {
    let engine = engine();
    engine
        .start_connection_pool(PoolOptions::default().max_size(1))
        .await
        .unwrap();
    engine
        .run_ddl(
            "DROP TABLE IF EXISTS deferred; \
             CREATE TABLE deferred (v int UNIQUE DEFERRABLE INITIALLY DEFERRED)",
        )
        .await
        .unwrap();
    let tx = engine.begin().await.unwrap();
    tx.execute("INSERT INTO deferred VALUES (1), (1)")
        .await
        .unwrap();
    let err = tx.commit().await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION), "{err}");
    assert_eq!(tx.state().await, TxState::RolledBack);
    drop(tx);
    let conn = engine.acquire().await.unwrap();
    assert!(conn.is_idle());
    drop(conn);
    assert_eq!(
        engine
            .query_one("SELECT count(*) FROM deferred")
            .await
            .unwrap()
            .get::<_, i64>(0),
        0
    );
}

#[tokio::test]
async fn dropping_a_transaction_rolls_it_back() {
    let engine = engine();
    engine
        .start_connection_pool(PoolOptions::default().max_size(1))
        .await
        .unwrap();
    let t = table(&engine, "dropped").await;
    {
        let tx = engine.begin().await.unwrap();
        tx.execute(format!("INSERT INTO {t} VALUES (1)"))
            .await
            .unwrap();
    }
    // The same (only) connection, rolled back before it was handed out again.
    let mut conn = engine.acquire().await.unwrap();
    assert!(conn.is_idle());
    let row = conn
        .query_one(format!("SELECT count(*) FROM {t}"))
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0);
}

#[tokio::test]
async fn isolation_and_read_only_reach_the_server() {
    let engine = engine();
    let tx = engine
        .transaction()
        .isolation_level(pgengine::IsolationLevel::Serializable)
        .read_only(true)
        .begin()
        .await
        .unwrap();
    let level: String = tx
        .query_one("SHOW transaction_isolation")
        .await
        .unwrap()
        .get(0);
    let ro: String = tx
        .query_one("SHOW transaction_read_only")
        .await
        .unwrap()
        .get(0);
    assert_eq!((level.as_str(), ro.as_str()), ("serializable", "on"));
    let err = tx
        .execute("CREATE TEMP TABLE nope (v int)")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::READ_ONLY_SQL_TRANSACTION));
    tx.rollback().await.unwrap();
}

async fn series_table(engine: &PostgresEngine, name: &str, n: i32) {
    engine
        .run_ddl(&format!(
            "DROP TABLE IF EXISTS {name}; \
             CREATE TABLE {name} AS SELECT g AS v FROM generate_series(1, {n}) g"
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn batch_of_1000_rows_with_batch_size_10_gives_100_batches() {
    let engine = engine();
    series_table(&engine, "batch_src", 1000).await;
    let mut batch = engine
        .batch("SELECT v FROM batch_src ORDER BY v", 10)
        .await
        .unwrap();
    let mut count = 0;
    let mut seen = Vec::new();
    while let Some(rows) = batch.next_batch().await.unwrap() {
        assert_eq!(rows.len(), 10);
        seen.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
        count += 1;
    }
    assert_eq!(count, 100);
    assert_eq!(seen, (1..=1000).collect::<Vec<_>>());
    // And as a Stream.
    let batches: Vec<_> = engine
        .batch("SELECT v FROM batch_src", 300)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        batches.iter().map(Vec::len).collect::<Vec<_>>(),
        [300, 300, 300, 100]
    );
}

#[tokio::test]
async fn batch_edge_cases_empty_zero_error_and_early_drop() {
    let engine = engine();
    engine
        .start_connection_pool(PoolOptions::default().max_size(1))
        .await
        .unwrap();
    series_table(&engine, "batch_edges", 1000).await;
    // An empty result yields no batch.
    let mut b = engine
        .batch("SELECT v FROM batch_edges WHERE false", 10)
        .await
        .unwrap();
    assert!(b.next_batch().await.unwrap().is_none());
    drop(b);
    // batch_size 0 is an error.
    let err = engine.batch("SELECT 1", 0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    // An error in the middle is delivered, not swallowed.
    let mut b = engine
        .batch("SELECT 1 / (v - 500) FROM batch_edges ORDER BY v", 100)
        .await
        .unwrap();
    let mut got = 0;
    let err = loop {
        match b.next_batch().await {
            Ok(Some(rows)) => got += rows.len(),
            Ok(None) => panic!("the division by zero was swallowed"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
    assert!(got < 500);
    drop(b);
    // Dropped early: the connection is clean for the next user.
    let mut b = engine.batch("SELECT v FROM batch_edges", 10).await.unwrap();
    b.next_batch().await.unwrap().unwrap();
    drop(b);
    let mut conn = tokio::time::timeout(Duration::from_secs(10), engine.acquire())
        .await
        .unwrap()
        .unwrap();
    assert!(conn.is_idle());
    assert_eq!(
        conn.query_one("SELECT 42").await.unwrap().get::<_, i32>(0),
        42
    );
}

#[tokio::test]
async fn batch_inside_a_transaction_uses_it() {
    let engine = engine();
    series_table(&engine, "batch_tx", 50).await;
    let inner = engine.clone();
    engine
        .transaction()
        .run(|tx| async move {
            tx.execute("INSERT INTO batch_tx VALUES (1000)").await?;
            // The uncommitted row is visible: the batch runs in this transaction.
            let mut b = inner
                .batch("SELECT v FROM batch_tx WHERE v = 1000", 5)
                .await?;
            let rows = b.next_batch().await?.expect("the transaction's own row");
            assert_eq!(rows.len(), 1);
            drop(b);
            tx.rollback().await
        })
        .await
        .unwrap();
}

mod model {
    //! Random sequences of transaction operations, run against the server and against a small
    //! model of what PostgreSQL should do; they must agree on every state and on the rows that
    //! end up committed.

    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Begin,
        Insert(i32),
        Fail,
        Savepoint,
        RollbackTo(usize),
        Release(usize),
        Commit,
        Rollback,
        Drop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => Just(Op::Begin),
            4 => (0i32..1000).prop_map(Op::Insert),
            1 => Just(Op::Fail),
            2 => Just(Op::Savepoint),
            2 => (0usize..4).prop_map(Op::RollbackTo),
            1 => (0usize..4).prop_map(Op::Release),
            1 => Just(Op::Commit),
            1 => Just(Op::Rollback),
            1 => Just(Op::Drop),
        ]
    }

    /// What PostgreSQL should do.
    struct Tx {
        failed: bool,
        rows: Vec<i32>,
        /// Live savepoints: name and the rows when it was taken.
        savepoints: Vec<(String, Vec<i32>)>,
    }

    struct Model {
        committed: Vec<i32>,
        tx: Option<Tx>,
    }

    async fn run(ops: Vec<Op>) -> std::result::Result<(), TestCaseError> {
        let engine = engine();
        engine
            .start_connection_pool(PoolOptions::default().max_size(2))
            .await
            .unwrap();
        engine.run_ddl("DELETE FROM model_rows").await.unwrap();
        let mut model = Model {
            committed: Vec::new(),
            tx: None,
        };
        let mut tx: Option<pgengine::PostgresTransaction> = None;
        for op in ops {
            match (op, &mut model.tx) {
                (Op::Begin, None) => {
                    tx = Some(engine.begin().await.unwrap());
                    model.tx = Some(Tx {
                        failed: false,
                        rows: model.committed.clone(),
                        savepoints: vec![],
                    });
                }
                (Op::Begin, Some(_)) => {}
                (Op::Insert(v), None) => {
                    engine
                        .execute(("INSERT INTO model_rows VALUES ($1)", (v,)))
                        .await
                        .unwrap();
                    model.committed.push(v);
                }
                (Op::Insert(v), Some(m)) => {
                    let r = tx
                        .as_ref()
                        .unwrap()
                        .execute(("INSERT INTO model_rows VALUES ($1)", (v,)))
                        .await;
                    if m.failed {
                        prop_assert_eq!(
                            r.unwrap_err().transaction_error(),
                            Some(TransactionError::Failed)
                        );
                    } else {
                        r.unwrap();
                        m.rows.push(v);
                    }
                }
                (Op::Fail, None) => {
                    engine.execute("SELECT 1/0").await.unwrap_err();
                }
                (Op::Fail, Some(m)) => {
                    tx.as_ref()
                        .unwrap()
                        .execute("SELECT 1/0")
                        .await
                        .unwrap_err();
                    m.failed = true;
                }
                (Op::Savepoint, Some(m)) => {
                    let r = tx.as_ref().unwrap().savepoint(None).await;
                    if m.failed {
                        prop_assert!(r.is_err());
                    } else {
                        let sp = r.unwrap();
                        m.savepoints.push((sp.name().to_owned(), m.rows.clone()));
                    }
                }
                (Op::RollbackTo(k), Some(m)) if k < m.savepoints.len() => {
                    let (name, rows) = m.savepoints[k].clone();
                    tx.as_ref().unwrap().rollback_to(&name).await.unwrap();
                    m.rows = rows;
                    m.failed = false;
                    m.savepoints.truncate(k + 1);
                }
                (Op::Release(k), Some(m)) if k < m.savepoints.len() => {
                    let name = m.savepoints[k].0.clone();
                    let r = tx.as_ref().unwrap().release(&name).await;
                    if m.failed {
                        prop_assert!(r.is_err());
                    } else {
                        r.unwrap();
                        m.savepoints.truncate(k);
                    }
                }
                (Op::Commit, Some(m)) => {
                    let r = tx.take().unwrap().commit().await;
                    if m.failed {
                        prop_assert_eq!(
                            r.unwrap_err().transaction_error(),
                            Some(TransactionError::NotCommitted)
                        );
                    } else {
                        r.unwrap();
                        model.committed = m.rows.clone();
                    }
                    model.tx = None;
                }
                (Op::Rollback, Some(_)) => {
                    tx.take().unwrap().rollback().await.unwrap();
                    model.tx = None;
                }
                (Op::Drop, Some(_)) => {
                    drop(tx.take());
                    model.tx = None;
                }
                _ => {}
            }
            // Every state agrees.
            if let (Some(t), Some(m)) = (&tx, &model.tx) {
                let expected = if m.failed {
                    TxState::Failed
                } else {
                    TxState::Active
                };
                prop_assert_eq!(t.state().await, expected);
            }
        }
        drop(tx);
        // Only what was committed is there (the pool rolls back a dropped transaction before
        // anyone else uses its connection).
        let mut got = values(&engine, "model_rows").await;
        got.sort();
        let mut expected = model.committed.clone();
        expected.sort();
        prop_assert_eq!(got, expected);
        Ok(())
    }

    #[test]
    fn transactions_agree_with_the_model() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            engine()
                .run_ddl("DROP TABLE IF EXISTS model_rows; CREATE TABLE model_rows (v int)")
                .await
                .unwrap();
        });
        let config = ProptestConfig {
            cases: 48,
            ..ProptestConfig::default()
        };
        proptest!(config, |(ops in proptest::collection::vec(op(), 1..24))| {
            rt.block_on(run(ops))?;
        });
    }
}

#[tokio::test]
async fn copy_runs_inside_a_transaction_through_its_connection() {
    let engine = engine();
    let t = table(&engine, "tx_copy").await;
    let tx = engine.begin().await.unwrap();
    {
        let mut conn = tx.connection().await.unwrap();
        let mut sink = conn
            .copy_in(&format!("COPY {t} (v) FROM STDIN"))
            .await
            .unwrap();
        sink.write(b"1\n2\n").await.unwrap();
        assert_eq!(sink.finish().await.unwrap(), 2);
        let sink = conn
            .copy_in(&format!("COPY {t} (v) FROM STDIN (FORMAT binary)"))
            .await
            .unwrap();
        let mut writer = BinaryCopyInWriter::new(sink, &[Type::INT4]).unwrap();
        writer.write_row(&[&3i32]).await.unwrap();
        assert_eq!(writer.finish().await.unwrap(), 1);
    }
    assert_eq!(tx.state().await, TxState::Active);
    let inside: i64 = tx
        .query_one(format!("SELECT count(*) FROM {t}"))
        .await
        .unwrap()
        .get(0);
    assert_eq!(inside, 3, "the copied rows are in the transaction");
    assert_eq!(
        values(&engine, &t).await,
        Vec::<i32>::new(),
        "not yet outside it"
    );
    {
        let mut conn = tx.connection().await.unwrap();
        let mut out = conn
            .copy_out(&format!("COPY (SELECT v FROM {t} ORDER BY v) TO STDOUT"))
            .await
            .unwrap();
        let mut text = Vec::new();
        while let Some(chunk) = out.try_next().await.unwrap() {
            text.extend_from_slice(&chunk);
        }
        assert_eq!(text, b"1\n2\n3\n");
    }
    tx.commit().await.unwrap();
    assert_eq!(values(&engine, &t).await, vec![1, 2, 3]);
}

/// Starts a text COPY into `table` on `conn` and writes `data`, leaving the COPY open.
async fn copy_into<'c>(
    conn: &'c mut pgengine::Connection,
    table: &str,
    data: &[u8],
) -> pgengine::CopyInSink<'c> {
    let mut sink = conn
        .copy_in(&format!("COPY {table} (v) FROM STDIN"))
        .await
        .unwrap();
    sink.write(data).await.unwrap();
    sink
}

#[tokio::test]
async fn a_failed_or_abandoned_copy_fails_the_transaction() {
    let engine = engine();
    let t = table(&engine, "tx_copy_fail").await;

    // Bad data: the COPY's error, then the transaction refuses everything but a rollback.
    let tx = engine.begin().await.unwrap();
    tx.execute(format!("INSERT INTO {t} VALUES (9)"))
        .await
        .unwrap();
    {
        let mut conn = tx.connection().await.unwrap();
        let sink = copy_into(&mut conn, &t, b"not a number\n").await;
        let err = sink.finish().await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&SqlState::INVALID_TEXT_REPRESENTATION),
            "{err}"
        );
    }
    assert_eq!(tx.state().await, TxState::Failed);
    let err = tx.query("SELECT 1").await.unwrap_err();
    assert_eq!(err.transaction_error(), Some(TransactionError::Failed));
    let err = tx.connection().await.unwrap_err();
    assert_eq!(err.transaction_error(), Some(TransactionError::Failed));
    tx.rollback().await.unwrap();

    // A sink dropped before `finish`: nothing of the transaction may commit.
    let tx = engine.begin().await.unwrap();
    tx.execute(format!("INSERT INTO {t} VALUES (10)"))
        .await
        .unwrap();
    {
        let mut conn = tx.connection().await.unwrap();
        let _dropped_unfinished = copy_into(&mut conn, &t, b"11\n").await;
    }
    assert_eq!(tx.state().await, TxState::Failed);
    let err = tx.commit().await.unwrap_err();
    assert_eq!(
        err.transaction_error(),
        Some(TransactionError::NotCommitted),
        "{err}"
    );
    assert_eq!(values(&engine, &t).await, Vec::<i32>::new());
    // The connection came back clean: the next transaction works.
    let tx = engine.begin().await.unwrap();
    tx.execute(format!("INSERT INTO {t} VALUES (12)"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(values(&engine, &t).await, vec![12]);
}

#[tokio::test]
async fn while_its_connection_is_lent_the_transaction_refuses_instead_of_waiting() {
    let engine = engine();
    let t = table(&engine, "tx_lent").await;
    let same = engine.clone();
    let table = t.clone();
    let copied = tokio::time::timeout(
        Duration::from_secs(10),
        engine.transaction().run(|tx| async move {
            let mut conn = tx.connection().await?;
            // On this task, each of these would otherwise wait for the connection forever.
            let err = tx.query("SELECT 1").await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
            let err = same.query("SELECT 1").await.unwrap_err();
            assert_eq!(
                err.kind(),
                ErrorKind::Busy,
                "engine queries go to the transaction"
            );
            let err = same.batch("SELECT 1", 10).start().await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
            let err = tx.connection().await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
            let copied = copy_into(&mut conn, &table, b"1\n").await.finish().await?;
            drop(conn);
            // Given back: everything works again, in the same transaction.
            tx.execute(format!("INSERT INTO {table} VALUES (2)"))
                .await?;
            Ok::<_, pgengine::Error>(copied)
        }),
    )
    .await
    .expect("nothing waited forever")
    .unwrap();
    assert_eq!(copied, 1);
    assert_eq!(values(&engine, &t).await, vec![1, 2]);
}

/// An application's own error type, as a service would have one.
#[derive(Debug)]
enum AppError {
    Db(pgengine::Error),
    OutOfStock(&'static str),
}

impl From<pgengine::Error> for AppError {
    fn from(e: pgengine::Error) -> AppError {
        AppError::Db(e)
    }
}

#[tokio::test]
async fn a_scope_fails_with_the_callers_own_error_and_a_panic_rolls_back_too() {
    let engine = engine();
    engine
        .start_connection_pool(PoolOptions::default().max_size(1))
        .await
        .unwrap();
    engine
        .run_ddl("DROP TABLE IF EXISTS tx_app; CREATE TABLE tx_app (item text)")
        .await
        .unwrap();
    let count = |engine: PostgresEngine| async move {
        engine
            .query_one("SELECT count(*) FROM tx_app")
            .await
            .unwrap()
            .get::<_, i64>(0)
    };

    // The application's error comes back unchanged, and the transaction was rolled back.
    let result: Result<(), AppError> = engine
        .transaction()
        .run(|tx| async move {
            tx.execute("INSERT INTO tx_app VALUES ('widget')").await?;
            Err(AppError::OutOfStock("widget"))
        })
        .await;
    assert!(
        matches!(result, Err(AppError::OutOfStock("widget"))),
        "{result:?}"
    );
    assert_eq!(count(engine.clone()).await, 0);
    // A server error converts into it through From.
    let result: Result<(), AppError> = engine
        .transaction()
        .run(|tx| async move {
            tx.execute("SELECT 1/0").await?;
            Ok(())
        })
        .await;
    assert!(
        matches!(&result, Err(AppError::Db(e)) if e.code() == Some(&SqlState::DIVISION_BY_ZERO)),
        "{result:?}"
    );

    // A savepoint scope too: its work is undone, the transaction goes on and commits.
    engine
        .transaction()
        .run(|tx| async move {
            tx.execute("INSERT INTO tx_app VALUES ('kept')").await?;
            let inner: Result<(), AppError> = tx
                .savepoint_scope(|tx| async move {
                    tx.execute("INSERT INTO tx_app VALUES ('undone')").await?;
                    Err(AppError::OutOfStock("undone"))
                })
                .await;
            assert!(matches!(inner, Err(AppError::OutOfStock(_))));
            Ok::<_, AppError>(())
        })
        .await
        .unwrap();
    let items: Vec<String> = engine
        .query("SELECT item FROM tx_app")
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(items, ["kept"]);

    // A panic rolls back, and the panic goes on to the caller.
    let panicked = tokio::spawn({
        let engine = engine.clone();
        async move {
            engine
                .transaction()
                .run(|tx| async move {
                    tx.execute("INSERT INTO tx_app VALUES ('panicked')").await?;
                    if tx.get_savepoint_id() > 0 {
                        panic!("the application gave up");
                    }
                    Ok::<_, pgengine::Error>(())
                })
                .await
        }
    })
    .await;
    assert!(panicked.unwrap_err().is_panic());
    assert_eq!(count(engine.clone()).await, 1, "only 'kept' is there");
    // And the connection was rolled back before it went back: the pool is clean.
    let conn = engine.acquire().await.unwrap();
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
}

#[tokio::test]
async fn a_finished_transaction_gives_its_connection_back_at_once() {
    let engine = engine();
    engine
        .start_connection_pool(
            PoolOptions::default()
                .max_size(1)
                .acquire_timeout(Duration::from_secs(2)),
        )
        .await
        .unwrap();
    for commit in [true, false] {
        let tx = engine.begin().await.unwrap();
        tx.query("SELECT 1").await.unwrap();
        assert_eq!(engine.pool_stats().unwrap().in_use, 1);
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        // The handle lives on; the pool's only connection serves someone else already.
        assert_eq!(engine.pool_stats().unwrap().in_use, 0, "commit {commit}");
        let one: i32 = engine.query_one("SELECT 1").await.unwrap().get(0);
        assert_eq!(one, 1);
        // What the handle can still tell needs no connection; what it would send is refused.
        assert!(tx.stats().await.round_trips >= 3);
        let e = tx.query("SELECT 1").await.unwrap_err();
        assert_eq!(e.transaction_error(), Some(TransactionError::Finished));
        drop(tx);
    }
}
