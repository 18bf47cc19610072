//! One task's statements never reach into another's, pipelined pool or exclusive: no
//! acknowledged write is undone by someone else's ROLLBACK, no query runs inside another's
//! transaction block, sees another's setting or role, or fails because of another's error.
//!
//! Against the real cluster, many tasks at once, both pool modes (the exclusive pool is the
//! control). One case needs a server that breaks the rules on purpose — a plain query whose
//! Sync leaves a transaction block open, which the engine's reading of the SQL never lets
//! through to a real server — and uses the scripted server for it.

mod common;
mod mock;

use std::future::Future;
use std::time::Duration;

use pgengine::pool::PoolOptions;
use pgengine::protocol::{BackendMessage, TransactionStatus};
use pgengine::testing::TempCluster;
use pgengine::{ErrorKind, PostgresEngine, Query, TransactionError};

use mock::{Kind, MockServer, Step, command_complete, int4_columns, int4_row, ready, script};

/// Turns a hang into a failure: far above what any case here needs.
async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

async fn engine(pipelined: bool) -> PostgresEngine {
    let engine = PostgresEngine::new(common::tcp_config(TempCluster::SUPERUSER));
    let mut options = PoolOptions::default()
        .max_size(4)
        .acquire_timeout(Duration::from_secs(30));
    if pipelined {
        options = options.pipeline(4);
    }
    engine.start_connection_pool(options).await.unwrap();
    engine
}

fn refused_control(e: &pgengine::Error) -> bool {
    e.kind() == ErrorKind::Transaction
        && e.transaction_error() == Some(TransactionError::ControlStatement)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_transaction_control_is_refused_and_no_acknowledged_write_is_lost() {
    for pipelined in [true, false] {
        let engine = engine(pipelined).await;
        let table = format!("iso_writes_{pipelined}");
        engine
            .run_ddl(&format!(
                "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (task int, n int)"
            ))
            .await
            .unwrap();
        // One task ports code that drives transactions with raw statements, as Piccolo-era
        // code does, in every spelling; sixteen others insert rows meanwhile.
        let porter = {
            let engine = engine.clone();
            let table = table.clone();
            tokio::spawn(async move {
                let mut refused = 0;
                for round in 0..40 {
                    for control in [
                        "BEGIN",
                        "  /* ported */ begin isolation level serializable",
                        "START TRANSACTION",
                        "ROLLBACK",
                        "commit",
                        "END",
                        "ABORT",
                        "SAVEPOINT s1",
                        "ROLLBACK TO SAVEPOINT s1",
                        "RELEASE s1",
                        "PREPARE TRANSACTION 'x'",
                    ] {
                        let e = engine.execute(control).await.unwrap_err();
                        assert!(refused_control(&e), "{control}: {e}");
                        refused += 1;
                    }
                    // Its own writes between them are plain autocommit statements.
                    engine
                        .execute((
                            format!("INSERT INTO {table} VALUES (-1, $1)").as_str(),
                            (round,),
                        ))
                        .await
                        .unwrap();
                }
                refused
            })
        };
        let writers: Vec<_> = (0..16i32)
            .map(|task| {
                let engine = engine.clone();
                let table = table.clone();
                tokio::spawn(async move {
                    let sql = format!("INSERT INTO {table} VALUES ($1, $2)");
                    let mut acknowledged = 0u64;
                    for n in 0..150i32 {
                        // Not one fails: no other task's block can abort it.
                        acknowledged += engine.execute((sql.as_str(), (task, n))).await.unwrap();
                    }
                    acknowledged
                })
            })
            .collect();
        let refused = bounded("the porter", porter).await.unwrap();
        assert_eq!(refused, 40 * 11);
        let mut acknowledged = 40;
        for w in writers {
            acknowledged += bounded("a writer", w).await.unwrap();
        }
        let stored: i64 = engine
            .query_one(format!("SELECT count(*) FROM {table}").as_str())
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            stored as u64, acknowledged,
            "pipelined {pipelined}: every acknowledged write is in the table"
        );
        // Nobody's connection was left inside a block: the pool is clean.
        let conn = engine.acquire().await.unwrap();
        assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
        drop(conn);
        engine.close_connection_pool().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tasks_session_changes_are_seen_by_no_other_task() {
    let setup = engine(false).await;
    setup
        .run_ddl(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'iso_intruder') \
             THEN CREATE ROLE iso_intruder; END IF; END $$",
        )
        .await
        .unwrap();
    let login: String = setup
        .query_one("SELECT current_user::text")
        .await
        .unwrap()
        .get(0);
    setup.close_connection_pool().await.unwrap();

    for pipelined in [true, false] {
        let engine = engine(pipelined).await;
        let intruder = {
            let engine = engine.clone();
            tokio::spawn(async move {
                for _ in 0..60 {
                    engine
                        .execute("SET application_name = 'intruder'")
                        .await
                        .unwrap();
                    engine.execute("SET ROLE iso_intruder").await.unwrap();
                    engine.execute("SET work_mem = '7777kB'").await.unwrap();
                    engine
                        .query("SELECT set_config('application_name', 'intruder2', false)")
                        .await
                        .unwrap();
                    engine
                        .query("SELECT pg_catalog.set_config('search_path', 'nowhere', false)")
                        .await
                        .unwrap();
                    // statement_timeout last: a statement after it in the same string would
                    // run under the 1 ms limit, and on a busy machine be cancelled.
                    engine
                        .run_ddl("SET lock_timeout = '1ms'; SET statement_timeout = '1ms'")
                        .await
                        .unwrap();
                    tokio::task::yield_now().await;
                }
            })
        };
        let readers: Vec<_> = (0..16)
            .map(|_| {
                let engine = engine.clone();
                let login = login.clone();
                tokio::spawn(async move {
                    for _ in 0..200 {
                        let row = engine
                            .query_one(
                                "SELECT current_setting('application_name'), current_user::text, \
                                 current_setting('work_mem'), current_setting('search_path'), \
                                 current_setting('statement_timeout')",
                            )
                            .await
                            .unwrap();
                        let (app, user, work_mem, path, timeout): (
                            String,
                            String,
                            String,
                            String,
                            String,
                        ) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
                        assert!(!app.starts_with("intruder"), "saw {app:?}");
                        assert_eq!(user, login, "ran as another task's role");
                        assert_ne!(work_mem, "7777kB");
                        assert_ne!(path, "nowhere");
                        assert_ne!(timeout, "1ms");
                    }
                })
            })
            .collect();
        bounded("the intruder", intruder).await.unwrap();
        for r in readers {
            bounded("a reader", r).await.unwrap();
        }
        // And a SET through the engine outside a transaction lasts for its statement alone.
        engine.execute("SET work_mem = '7777kB'").await.unwrap();
        let work_mem: String = engine
            .query_one("SELECT current_setting('work_mem')")
            .await
            .unwrap()
            .get(0);
        assert_ne!(work_mem, "7777kB", "pipelined {pipelined}");
        engine.close_connection_pool().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_taken_by_one_task_is_released_before_the_next_user() {
    for pipelined in [true, false] {
        // One connection: every statement lands on the same server session.
        let engine = PostgresEngine::new(common::tcp_config(TempCluster::SUPERUSER));
        let mut options = PoolOptions::default().max_size(1);
        if pipelined {
            options = options.pipeline(1);
        }
        engine.start_connection_pool(options).await.unwrap();
        let pid = |engine: PostgresEngine| async move {
            engine
                .query_one("SELECT pg_backend_pid()")
                .await
                .unwrap()
                .get::<_, i32>(0)
        };
        let backend = pid(engine.clone()).await;
        engine.query("SELECT pg_advisory_lock(4242)").await.unwrap();
        engine
            .execute("CREATE TEMP TABLE iso_scratch (x int)")
            .await
            .unwrap();
        engine.execute("PREPARE iso_q AS SELECT 1").await.unwrap();
        assert_eq!(pid(engine.clone()).await, backend, "the same session");
        let row = engine
            .query_one(
                "SELECT (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
                 AND pid = pg_backend_pid()), \
                 (SELECT count(*) FROM pg_class WHERE relname = 'iso_scratch'), \
                 (SELECT count(*) FROM pg_prepared_statements WHERE from_sql), \
                 (SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql)",
            )
            .await
            .unwrap();
        let counts: (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(counts, (0, 0, 0), "pipelined {pipelined}");
        // The statement cache's own statements were kept (the pid query's, at least).
        assert!(row.get::<_, i64>(3) > 0, "pipelined {pipelined}");
        engine.close_connection_pool().await.unwrap();
    }
}

#[tokio::test]
async fn an_atomic_with_transaction_control_is_refused_before_anything_is_sent() {
    let engine = engine(false).await;
    engine
        .run_ddl("DROP TABLE IF EXISTS iso_atomic; CREATE TABLE iso_atomic (x int)")
        .await
        .unwrap();
    for control in ["COMMIT", "ROLLBACK", "BEGIN", "SAVEPOINT a", "end"] {
        let mut atomic = engine.atomic();
        atomic.add(Query::new("INSERT INTO iso_atomic VALUES (1)"));
        atomic.add(control);
        atomic.add(Query::new("INSERT INTO iso_atomic VALUES (1/0)"));
        let e = atomic.await.unwrap_err();
        assert!(refused_control(&e), "{control}: {e}");
        assert!(e.to_string().contains("query 2 of 3"), "{e}");
    }
    // Inside a transaction, where an Atomic joins the open block, too.
    let inner = engine.clone();
    let e = engine
        .transaction()
        .run(|_tx| async move {
            let mut atomic = inner.atomic();
            atomic.add(Query::new("INSERT INTO iso_atomic VALUES (2)"));
            atomic.add("COMMIT");
            atomic.await
        })
        .await
        .unwrap_err();
    assert!(refused_control(&e), "{e}");
    let n: i64 = engine
        .query_one("SELECT count(*) FROM iso_atomic")
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "nothing was committed");
    // A batch's portal lives in a transaction: transaction control is refused there too.
    let e = engine.batch("COMMIT", 10).await.unwrap_err();
    assert!(refused_control(&e), "{e}");
    engine.close_connection_pool().await.unwrap();
}

#[tokio::test]
async fn run_ddl_may_hold_a_whole_block_but_never_half_of_one() {
    let engine = engine(false).await;
    engine
        .run_ddl("DROP TABLE IF EXISTS iso_ddl; CREATE TABLE iso_ddl (x int)")
        .await
        .unwrap();
    // A whole block in one text runs on one connection: it is atomic and committed.
    engine
        .run_ddl("BEGIN; INSERT INTO iso_ddl VALUES (1); SAVEPOINT a; RELEASE a; COMMIT")
        .await
        .unwrap();
    // Half of one is refused before anything is sent.
    for sql in [
        "BEGIN; INSERT INTO iso_ddl VALUES (2)",
        "INSERT INTO iso_ddl VALUES (3); COMMIT",
        "ROLLBACK",
        "SAVEPOINT a",
    ] {
        let e = engine.run_ddl(sql).await.unwrap_err();
        assert!(refused_control(&e), "{sql}: {e}");
    }
    let rows: Vec<i32> = engine
        .query("SELECT x FROM iso_ddl ORDER BY x")
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, [1]);
    // Inside a transaction scope raw control is the transaction's business, not refused
    // here: the transaction follows ReadyForQuery.
    engine.close_connection_pool().await.unwrap();
}

/// Ends the scripted server's session (its script must have run whole) and returns the text
/// of the first simple Query the client sent.
async fn first_simple_query(server: MockServer) -> Option<String> {
    let transcript = server.finish().await;
    assert!(transcript.failure.is_none(), "{:?}", transcript.failure);
    transcript.messages.iter().find_map(|m| match m {
        pgengine::protocol::FrontendMessage::Query(sql) => Some(sql.clone()),
        _ => None,
    })
}

/// The messages of one uncached pipelined `SELECT n` (Parse, Describe, Bind, Execute, Sync).
fn expect_query() -> Vec<Step> {
    [
        Kind::Parse,
        Kind::Describe,
        Kind::Bind,
        Kind::Execute,
        Kind::Sync,
    ]
    .into_iter()
    .map(Step::Expect)
    .collect()
}

/// The answer to one of them, ending with ReadyForQuery of `status`.
fn answer(n: i32, status: TransactionStatus) -> Vec<Step> {
    vec![
        Step::Send(BackendMessage::ParseComplete),
        Step::Send(BackendMessage::ParameterDescription(Vec::new())),
        Step::Send(int4_columns(&["n"])),
        Step::Send(BackendMessage::BindComplete),
        Step::Send(int4_row(&[n])),
        Step::Send(command_complete("SELECT 1")),
        Step::Send(ready(status)),
    ]
}

#[tokio::test]
async fn a_pipelined_query_whose_sync_leaves_a_block_open_is_rolled_back_with_those_behind_it() {
    use TransactionStatus::{Idle, InTransaction};
    // A server that answers a plain query with "in a transaction block": what a BEGIN the
    // engine did not recognise would do. The three queries travel in one write.
    let server = MockServer::start(script([
        mock::trust_login(),
        expect_query(),
        expect_query(),
        expect_query(),
        answer(1, InTransaction),
        answer(2, InTransaction),
        answer(3, InTransaction),
        // The engine sends nothing more on the connection but the rollback.
        vec![
            Step::Expect(Kind::Query),
            Step::Send(command_complete("ROLLBACK")),
            Step::Send(ready(Idle)),
        ],
        // Then the connection is clean, and serves the next query as usual.
        expect_query(),
        answer(4, Idle),
    ]))
    .await;
    let engine = PostgresEngine::new(server.config());
    engine
        .start_connection_pool(PoolOptions::default().max_size(1).pipeline(1))
        .await
        .unwrap();
    // Spawned before the driver runs (one thread): all three are queued for one write.
    let queries: Vec<_> = (1..=3)
        .map(|n| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.query_one(format!("SELECT {n}").as_str()).await })
        })
        .collect();
    for q in queries {
        let e = bounded("a query of the block", q)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Transaction, "{e}");
        assert_eq!(
            e.transaction_error(),
            Some(TransactionError::NotCommitted),
            "{e}"
        );
        assert!(e.to_string().contains("rolled back"), "{e}");
    }
    let row = bounded("the next query", engine.query_one("SELECT 4"))
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 4);
    engine.close_connection_pool().await.unwrap();
    let rollback = first_simple_query(server)
        .await
        .expect("a rollback was sent");
    assert_eq!(rollback, "ROLLBACK");
}

#[tokio::test]
async fn a_pipelined_query_that_changes_a_reported_parameter_takes_its_connection_out() {
    use TransactionStatus::Idle;
    // A function that calls set_config on a reported parameter: the text shows nothing, the
    // server's ParameterStatus does. The query behind it has run; nothing more is sent on the
    // connection until it has been reset.
    let mut first = answer(1, Idle);
    first.insert(
        4,
        Step::Send(mock::parameter("application_name", "changed")),
    );
    let server = MockServer::start(script([
        mock::trust_login(),
        expect_query(),
        expect_query(),
        first,
        answer(2, Idle),
        // The reset, in one simple query, before anything else.
        vec![
            Step::Expect(Kind::Query),
            Step::Send(command_complete("SET")),
            Step::Send(command_complete("RESET")),
            Step::Send(command_complete("UNLISTEN")),
            Step::Send(command_complete("CLOSE CURSOR ALL")),
            Step::Send(int4_columns(&["pg_advisory_unlock_all"])),
            Step::Send(command_complete("SELECT 1")),
            Step::Send(command_complete("DISCARD TEMP")),
            Step::Send(command_complete("DISCARD SEQUENCES")),
            Step::Send(ready(Idle)),
        ],
        expect_query(),
        answer(3, Idle),
    ]))
    .await;
    let engine = PostgresEngine::new(server.config());
    engine
        .start_connection_pool(PoolOptions::default().max_size(1).pipeline(1))
        .await
        .unwrap();
    let queries: Vec<_> = [1, 2]
        .into_iter()
        .map(|n| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.query_one(format!("SELECT {n}").as_str()).await })
        })
        .collect();
    for (n, q) in (1..).zip(queries) {
        let row = bounded("a query", q).await.unwrap().unwrap();
        assert_eq!(row.get::<_, i32>(0), n);
    }
    let row = bounded("the next query", engine.query_one("SELECT 3"))
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 3);
    engine.close_connection_pool().await.unwrap();
    let reset = first_simple_query(server).await.expect("a reset was sent");
    assert!(
        reset.starts_with("SET SESSION AUTHORIZATION DEFAULT"),
        "{reset:?}"
    );
}
