//! Retrying transactions and the outcome of a COMMIT whose answer was lost, against the real
//! cluster: serialization failures and deadlocks are retried, the caller's own failures are
//! not, a connection lost before COMMIT is retried on a fresh one, and a COMMIT lost on the
//! wire is resolved by asking the server (`pg_xact_status`) — checked against the table, many
//! times, with the backend killed at random moments around its COMMIT.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pgengine::testing::TempCluster;
use pgengine::{
    Config, ErrorKind, IsolationLevel, PostgresEngine, RetryPolicy, SqlState, TransactionError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Barrier;

fn engine() -> PostgresEngine {
    PostgresEngine::new(common::tcp_config(TempCluster::SUPERUSER))
}

/// Fails the test instead of hanging it.
async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 120 s"))
}

/// A quick policy for tests.
fn policy() -> RetryPolicy {
    RetryPolicy::default().backoff(Duration::from_millis(1), Duration::from_millis(20))
}

async fn fresh_table(engine: &PostgresEngine, name: &str, columns: &str) {
    engine
        .run_ddl(&format!(
            "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} ({columns})"
        ))
        .await
        .unwrap();
}

async fn count_where(engine: &PostgresEngine, sql: String) -> i64 {
    engine.query_one(sql).await.unwrap().get(0)
}

#[tokio::test]
async fn a_serialization_failure_is_retried_until_both_transactions_commit() {
    bounded("serialization", async {
        let engine = engine();
        fresh_table(&engine, "retry_serial", "k int, v int").await;
        engine
            .execute("INSERT INTO retry_serial VALUES (1, 0), (2, 0)")
            .await
            .unwrap();
        // Both read both rows, then each writes one: a write skew, which SERIALIZABLE refuses
        // to one of them at its first attempt (the barrier makes the overlap certain).
        let barrier = Arc::new(Barrier::new(2));
        let attempts = Arc::new(AtomicU32::new(0));
        let run = |k: i32| {
            let (engine, barrier, attempts) = (engine.clone(), barrier.clone(), attempts.clone());
            tokio::spawn(async move {
                engine
                    .transaction()
                    .isolation_level(IsolationLevel::Serializable)
                    .retry(policy())
                    .run(|tx| {
                        let (barrier, attempts) = (barrier.clone(), attempts.clone());
                        async move {
                            let n = attempts.fetch_add(1, Ordering::SeqCst);
                            let sum: i64 = tx
                                .query_one("SELECT sum(v) FROM retry_serial")
                                .await?
                                .get(0);
                            if n < 2 {
                                barrier.wait().await;
                            }
                            tx.execute((
                                "UPDATE retry_serial SET v = $2 WHERE k = $1",
                                (k, sum as i32 + 1),
                            ))
                            .await?;
                            Ok::<_, pgengine::Error>(())
                        }
                    })
                    .await
            })
        };
        let (a, b) = (run(1), run(2));
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
        // One of them ran twice: the first attempts conflicted.
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
        let rows = engine
            .query("SELECT v FROM retry_serial ORDER BY k")
            .await
            .unwrap();
        let values: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        // Serial order: one wrote 1, the other saw it and wrote 2.
        let mut sorted = values.clone();
        sorted.sort();
        assert_eq!(sorted, [1, 2], "{values:?}");
    })
    .await;
}

#[tokio::test]
async fn a_deadlock_is_retried() {
    bounded("deadlock", async {
        let engine = engine();
        fresh_table(&engine, "retry_deadlock", "k int PRIMARY KEY, v int").await;
        engine
            .execute("INSERT INTO retry_deadlock VALUES (1, 0), (2, 0)")
            .await
            .unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let attempts = Arc::new(AtomicU32::new(0));
        let run = |first: i32, second: i32| {
            let (engine, barrier, attempts) = (engine.clone(), barrier.clone(), attempts.clone());
            tokio::spawn(async move {
                engine
                    .transaction()
                    .retry(policy())
                    .run(|tx| {
                        let (barrier, attempts) = (barrier.clone(), attempts.clone());
                        async move {
                            let n = attempts.fetch_add(1, Ordering::SeqCst);
                            let bump = "UPDATE retry_deadlock SET v = v + 1 WHERE k = $1";
                            tx.execute((bump, (first,))).await?;
                            if n < 2 {
                                barrier.wait().await;
                            }
                            tx.execute((bump, (second,))).await?;
                            Ok::<_, pgengine::Error>(())
                        }
                    })
                    .await
            })
        };
        let (a, b) = (run(1, 2), run(2, 1));
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
        let total = count_where(&engine, "SELECT sum(v)::int8 FROM retry_deadlock".into()).await;
        assert_eq!(total, 4, "each transaction bumped both rows exactly once");
    })
    .await;
}

#[tokio::test]
async fn the_callers_own_failures_are_never_retried() {
    bounded("own failures", async {
        let engine = engine();
        fresh_table(&engine, "retry_own", "k int PRIMARY KEY").await;
        engine
            .execute("INSERT INTO retry_own VALUES (1)")
            .await
            .unwrap();
        let attempts = AtomicU32::new(0);
        let err = engine
            .transaction()
            .retry(policy())
            .run(|tx| {
                attempts.fetch_add(1, Ordering::SeqCst);
                async move { tx.execute("INSERT INTO retry_own VALUES (1)").await }
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION), "{err}");
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        assert!(err.to_string().contains("attempted 1 time"), "{err}");
        assert_eq!(err.attempts(), Some(1));

        // An application error, in its own type.
        #[derive(Debug)]
        enum AppError {
            SoldOut,
            Db(#[allow(dead_code)] pgengine::Error),
        }
        impl From<pgengine::Error> for AppError {
            fn from(e: pgengine::Error) -> AppError {
                AppError::Db(e)
            }
        }
        impl pgengine::RetryError for AppError {
            fn pgengine_error(&self) -> Option<&pgengine::Error> {
                match self {
                    AppError::Db(e) => Some(e),
                    AppError::SoldOut => None,
                }
            }
            fn pgengine_error_mut(&mut self) -> Option<&mut pgengine::Error> {
                match self {
                    AppError::Db(e) => Some(e),
                    AppError::SoldOut => None,
                }
            }
        }
        let attempts = AtomicU32::new(0);
        let outcome: Result<(), AppError> = engine
            .transaction()
            .retry(policy())
            .run(|tx| {
                attempts.fetch_add(1, Ordering::SeqCst);
                async move {
                    tx.execute("INSERT INTO retry_own VALUES (2)").await?;
                    Err(AppError::SoldOut)
                }
            })
            .await;
        assert!(matches!(outcome, Err(AppError::SoldOut)));
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        assert_eq!(
            count_where(&engine, "SELECT count(*) FROM retry_own WHERE k = 2".into()).await,
            0
        );

        // Attempts are bounded: a conflict that never goes away gives up with the last error.
        let attempts = AtomicU32::new(0);
        let err = engine
            .transaction()
            .retry(policy().max_attempts(3))
            .run(|tx| {
                attempts.fetch_add(1, Ordering::SeqCst);
                async move {
                    tx.execute(
                        "DO $$ BEGIN RAISE EXCEPTION 'always' USING ERRCODE = '40001'; END $$",
                    )
                    .await
                }
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::T_R_SERIALIZATION_FAILURE));
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
        assert!(err.to_string().contains("attempted 3 time"), "{err}");
        assert_eq!(err.attempts(), Some(3));
    })
    .await;
}

#[tokio::test]
async fn a_connection_lost_before_commit_is_retried_on_a_fresh_one() {
    bounded("lost before commit", async {
        let engine = engine();
        fresh_table(&engine, "retry_lost", "k int").await;
        let killer = engine.clone();
        let attempts = AtomicU32::new(0);
        engine
            .transaction()
            .retry(policy())
            .run(|tx| {
                let n = attempts.fetch_add(1, Ordering::SeqCst);
                let killer = killer.clone();
                async move {
                    tx.execute("INSERT INTO retry_lost VALUES (1)").await?;
                    if n == 0 {
                        // The first attempt's backend is terminated under it.
                        let pid: i32 = tx.query_one("SELECT pg_backend_pid()").await?.get(0);
                        let mut other = killer.acquire().await?;
                        other
                            .execute(("SELECT pg_terminate_backend($1)", (pid,)))
                            .await?;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    tx.execute("INSERT INTO retry_lost VALUES (2)").await?;
                    Ok::<_, pgengine::Error>(())
                }
            })
            .await
            .unwrap();
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        let rows = engine
            .query("SELECT k FROM retry_lost ORDER BY k")
            .await
            .unwrap();
        let keys: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(keys, [1, 2], "the first attempt left nothing behind");
    })
    .await;
}

#[tokio::test]
async fn a_retrying_transaction_refuses_to_join_an_outer_one() {
    bounded("nested retry", async {
        let engine = engine();
        let inner = engine.clone();
        engine
            .transaction()
            .run(|_tx| async move {
                let err = inner
                    .transaction()
                    .retry(policy())
                    .run(|tx| async move { tx.execute("SELECT 1").await })
                    .await
                    .unwrap_err();
                assert_eq!(err.transaction_error(), Some(TransactionError::Nested));
                Ok::<_, pgengine::Error>(())
            })
            .await
            .unwrap();
    })
    .await;
}

/// A proxy between the engine and the cluster that, once it has passed on a COMMIT, lets
/// `replies_after_commit` more ReadyForQuery messages through and then cuts the connection:
/// the server runs the COMMIT, its answer never arrives.
async fn cutting_proxy(replies_after_commit: usize) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server_port = common::cluster().port();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let server = tokio::net::TcpStream::connect(("127.0.0.1", server_port))
                    .await
                    .unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let (commit_tx, mut commit_rx) = tokio::sync::watch::channel(false);
                let upstream = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = client_read.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        let chunk = &buf[..n];
                        // A COMMIT: a simple Query message whose text is exactly that, or
                        // a Parse of it.
                        if chunk.windows(7).any(|w| w == b"COMMIT\0") {
                            let _ = commit_tx.send(true);
                        }
                        if server_write.write_all(chunk).await.is_err() {
                            return;
                        }
                    }
                };
                let downstream = async move {
                    let mut parser = MessageCounter::default();
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut allowed: Option<usize> = None;
                    loop {
                        let n = server_read.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        if allowed.is_none() && *commit_rx.borrow_and_update() {
                            allowed = Some(parser.ready_for_query + replies_after_commit);
                        }
                        let mut end = n;
                        if let Some(limit) = allowed {
                            if parser.ready_for_query >= limit {
                                end = 0;
                            } else if let Some(cut) = parser.feed_until(&buf[..n], limit) {
                                end = cut;
                            }
                            if parser.ready_for_query >= limit {
                                let _ = client_write.write_all(&buf[..end]).await;
                                // Cut: the rest (the COMMIT's answer) never arrives.
                                return;
                            }
                        } else {
                            parser.feed_until(&buf[..n], usize::MAX);
                        }
                        if client_write.write_all(&buf[..end]).await.is_err() {
                            return;
                        }
                    }
                };
                // When either side ends, both sockets close.
                tokio::select! {
                    _ = upstream => {}
                    _ = downstream => {}
                }
            });
        }
    });
    port
}

/// Counts the ReadyForQuery messages in a server's byte stream, across reads.
#[derive(Default)]
struct MessageCounter {
    ready_for_query: usize,
    header: Vec<u8>,
    body_left: usize,
}

impl MessageCounter {
    /// Reads `bytes`; returns the offset just after the ReadyForQuery that brings the count
    /// to `limit`, if it is in them.
    fn feed_until(&mut self, bytes: &[u8], limit: usize) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            if self.body_left > 0 {
                let take = self.body_left.min(bytes.len() - i);
                self.body_left -= take;
                i += take;
                continue;
            }
            self.header.push(bytes[i]);
            i += 1;
            if self.header.len() == 5 {
                let len = u32::from_be_bytes(self.header[1..5].try_into().unwrap()) as usize;
                self.body_left = len - 4;
                if self.header[0] == b'Z' {
                    // The body is one status byte: count it once the whole message is here.
                    let take = self.body_left.min(bytes.len() - i);
                    self.body_left -= take;
                    i += take;
                    if self.body_left == 0 {
                        self.ready_for_query += 1;
                        self.header.clear();
                        if self.ready_for_query == limit {
                            return Some(i);
                        }
                        continue;
                    }
                }
                self.header.clear();
            }
        }
        None
    }
}

fn proxied_engine(port: u16) -> PostgresEngine {
    let config: Config = format!(
        "host=127.0.0.1 port={port} user={} dbname=postgres sslmode=disable",
        TempCluster::SUPERUSER
    )
    .parse()
    .unwrap();
    PostgresEngine::new(config)
}

#[tokio::test]
async fn a_commit_whose_answer_was_lost_is_found_committed() {
    bounded("lost answer", async {
        let engine = engine();
        fresh_table(&engine, "retry_lost_answer", "k int").await;
        // Let the transaction's id through (one ReadyForQuery), cut before COMMIT's answer.
        let proxied = proxied_engine(cutting_proxy(1).await);
        let attempts = AtomicU32::new(0);
        proxied
            .transaction()
            .retry(policy())
            .run(|tx| {
                attempts.fetch_add(1, Ordering::SeqCst);
                async move { tx.execute("INSERT INTO retry_lost_answer VALUES (1)").await }
            })
            .await
            .expect("the server says it committed");
        // Found committed: not run again, so not applied twice.
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        assert_eq!(
            count_where(&engine, "SELECT count(*) FROM retry_lost_answer".into()).await,
            1
        );

        // Cut before even the id's answer: nobody can tell, and it says so (never retried).
        let proxied = proxied_engine(cutting_proxy(0).await);
        let attempts = AtomicU32::new(0);
        let err = proxied
            .transaction()
            .retry(policy())
            .run(|tx| {
                attempts.fetch_add(1, Ordering::SeqCst);
                async move { tx.execute("INSERT INTO retry_lost_answer VALUES (2)").await }
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.transaction_error(),
            Some(TransactionError::OutcomeUnknown),
            "{err}"
        );
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        // (It did commit: the cut only hid the answer.)
        assert_eq!(
            count_where(
                &engine,
                "SELECT count(*) FROM retry_lost_answer WHERE k = 2".into()
            )
            .await,
            1
        );

        // Without tracking, a lost COMMIT is never called "nothing was saved".
        let proxied = proxied_engine(cutting_proxy(0).await);
        let tx = proxied.begin().await.unwrap();
        tx.execute("INSERT INTO retry_lost_answer VALUES (3)")
            .await
            .unwrap();
        let err = tx.commit().await.unwrap_err();
        assert_eq!(
            err.transaction_error(),
            Some(TransactionError::OutcomeUnknown),
            "{err}"
        );
    })
    .await;
}

#[tokio::test]
async fn backends_killed_around_their_commit_never_give_a_wrong_answer() {
    bounded("killed at commit", async {
        let engine = engine();
        // No key: a write applied twice would show as two rows.
        fresh_table(&engine, "retry_killed", "id int").await;
        // The COMMIT runs a deferred trigger that takes a moment, so a kill can land before,
        // during or after the commit itself.
        engine
            .run_ddl(
                "CREATE OR REPLACE FUNCTION retry_killed_slow() RETURNS trigger LANGUAGE plpgsql \
                 AS $$ BEGIN PERFORM pg_sleep(random() * 0.01); RETURN NULL; END $$;
                 CREATE CONSTRAINT TRIGGER retry_killed_slow AFTER INSERT ON retry_killed \
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION retry_killed_slow()",
            )
            .await
            .unwrap();
        let killer = engine.clone();
        let (mut ok, mut not_committed, mut unknown, mut retried) = (0, 0, 0, 0);
        for id in 0..60i32 {
            let attempts = AtomicU32::new(0);
            let delay = Duration::from_micros(rand_below(15_000));
            let outcome = engine
                .transaction()
                .retry(policy().max_attempts(2))
                .run(|tx| {
                    let n = attempts.fetch_add(1, Ordering::SeqCst);
                    let killer = killer.clone();
                    async move {
                        tx.execute(("INSERT INTO retry_killed VALUES ($1)", (id,)))
                            .await?;
                        if n == 0 {
                            let pid: i32 = tx.query_one("SELECT pg_backend_pid()").await?.get(0);
                            // Terminated a random moment after the COMMIT goes out.
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = killer
                                    .execute(("SELECT pg_terminate_backend($1)", (pid,)))
                                    .await;
                            });
                        }
                        Ok::<_, pgengine::Error>(())
                    }
                })
                .await;
            let rows = count_where(
                &engine,
                format!("SELECT count(*) FROM retry_killed WHERE id = {id}"),
            )
            .await;
            if attempts.load(Ordering::SeqCst) > 1 {
                retried += 1;
            }
            match outcome {
                Ok(()) => {
                    ok += 1;
                    assert_eq!(rows, 1, "id {id}: acknowledged, so present exactly once");
                }
                Err(e) if e.transaction_error() == Some(TransactionError::OutcomeUnknown) => {
                    unknown += 1;
                    assert!(rows <= 1, "id {id}: applied twice");
                }
                Err(e) => {
                    not_committed += 1;
                    assert_eq!(rows, 0, "id {id}: reported failed ({e}), yet present");
                    assert!(
                        matches!(
                            e.kind(),
                            ErrorKind::Transaction
                                | ErrorKind::Db
                                | ErrorKind::Closed
                                | ErrorKind::Io
                        ),
                        "{e}"
                    );
                }
            }
        }
        println!(
            "60 transactions killed around COMMIT: {ok} acknowledged, {not_committed} not \
             committed, {unknown} unknown; {retried} needed a second attempt"
        );
        assert_eq!(ok + not_committed + unknown, 60);
        // Every abort the server confirmed, and every loss before COMMIT, was retried (the
        // second attempt is not killed).
        assert_eq!(not_committed, 0);
    })
    .await;
}

/// A random number below `n`, without another dependency.
fn rand_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    h.finish() % n
}

#[tokio::test]
async fn a_server_crash_at_commit_is_never_called_success_or_failure_wrongly() {
    bounded("crash at commit", async {
        // A cluster of its own: every kill -9 of a backend restarts the whole server. With
        // synchronous_commit on (the test clusters turn it off for speed), as an acknowledged
        // COMMIT is durable only then.
        let cluster = tokio::task::spawn_blocking(|| {
            TempCluster::builder()
                .setting("synchronous_commit", "on")
                .start()
        })
        .await
        .unwrap()
        .expect("a private cluster starts");
        let config: Config = cluster.url(TempCluster::SUPERUSER).parse().unwrap();
        let engine = PostgresEngine::new(config);
        fresh_table(&engine, "crash_writes", "id int").await;
        engine
            .run_ddl(
                "CREATE FUNCTION crash_slow() RETURNS trigger LANGUAGE plpgsql \
                 AS $$ BEGIN PERFORM pg_sleep(random() * 0.01); RETURN NULL; END $$;
                 CREATE CONSTRAINT TRIGGER crash_slow AFTER INSERT ON crash_writes \
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION crash_slow()",
            )
            .await
            .unwrap();
        let (mut ok, mut not_committed, mut unknown) = (0, 0, 0);
        let rounds = 8;
        for id in 0..rounds {
            // (The server may still be coming back from the last crash.)
            let mut tries = 0;
            let (tx, pid) = loop {
                let started = async {
                    let tx = engine.transaction().track_commit(true).begin().await?;
                    tx.execute(("INSERT INTO crash_writes VALUES ($1)", (id,)))
                        .await?;
                    let pid: i32 = tx.query_one("SELECT pg_backend_pid()").await?.get(0);
                    Ok::<_, pgengine::Error>((tx, pid))
                };
                match started.await {
                    Ok(started) => break started,
                    Err(e) if tries < 100 => {
                        tries += 1;
                        eprintln!("not ready yet: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("the server did not come back: {e}"),
                }
            };
            let delay = Duration::from_micros(rand_below(12_000));
            let kill = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                // SAFETY: kill(2) with a process id and a signal number has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            });
            let outcome = tx.commit().await;
            kill.await.unwrap();
            // Wait for the server to be back from its crash restart.
            let rows = loop {
                match engine
                    .query_one(format!("SELECT count(*) FROM crash_writes WHERE id = {id}"))
                    .await
                {
                    Ok(row) => break row.get::<_, i64>(0),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            match outcome {
                Ok(()) => {
                    ok += 1;
                    assert_eq!(rows, 1, "id {id}: acknowledged, so present");
                }
                Err(e) if e.transaction_error() == Some(TransactionError::OutcomeUnknown) => {
                    unknown += 1;
                }
                Err(e) => {
                    not_committed += 1;
                    assert_eq!(
                        rows, 0,
                        "id {id}: reported not committed ({e}), yet present"
                    );
                }
            }
        }
        println!(
            "{rounds} backends killed -9 around COMMIT: {ok} acknowledged, {not_committed} not \
             committed, {unknown} unknown"
        );
    })
    .await;
}

#[tokio::test]
async fn a_read_only_error_is_retried_only_when_the_engine_wants_a_primary() {
    bounded("read only", async {
        let base = common::tcp_config(TempCluster::SUPERUSER);
        let plain = PostgresEngine::new(base.clone());
        fresh_table(&plain, "retry_read_only", "k int").await;
        let mut wants_primary = base.clone();
        wants_primary.target_session_attrs(pgengine::config::TargetSessionAttrs::ReadWrite);
        for (engine, retried) in [(PostgresEngine::new(wants_primary), true), (plain, false)] {
            let attempts = AtomicU32::new(0);
            let outcome = engine
                .transaction()
                .retry(policy())
                .run(|tx| {
                    let n = attempts.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if n == 0 {
                            // As on a node that stopped being the primary: 25006.
                            tx.execute("SET TRANSACTION READ ONLY").await?;
                        }
                        tx.execute("INSERT INTO retry_read_only VALUES (1)").await
                    }
                })
                .await;
            if retried {
                outcome.unwrap();
                assert_eq!(attempts.load(Ordering::SeqCst), 2);
            } else {
                assert_eq!(
                    outcome.unwrap_err().code(),
                    Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
                );
                assert_eq!(attempts.load(Ordering::SeqCst), 1);
            }
        }
    })
    .await;
}

#[tokio::test]
async fn an_atomic_retries_a_serialization_failure_in_one_round_trip_per_attempt() {
    bounded("atomic retry", async {
        let engine = engine();
        fresh_table(&engine, "retry_atomic", "k int").await;
        engine
            .run_ddl("DROP SEQUENCE IF EXISTS retry_atomic_seq; CREATE SEQUENCE retry_atomic_seq")
            .await
            .unwrap();
        let mut atomic = engine.atomic();
        atomic.add("INSERT INTO retry_atomic VALUES (1)");
        // The first run fails as a serialization failure would (a sequence is not undone).
        atomic.add(
            "DO $$ BEGIN IF nextval('retry_atomic_seq') = 1 THEN \
             RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END IF; END $$",
        );
        atomic.retry(policy());
        atomic.run().await.unwrap();
        assert_eq!(
            count_where(&engine, "SELECT count(*) FROM retry_atomic".into()).await,
            1
        );
        let runs: i64 = engine
            .query_one("SELECT last_value FROM retry_atomic_seq")
            .await
            .unwrap()
            .get(0);
        assert_eq!(runs, 2);
    })
    .await;
}

#[tokio::test]
async fn an_atomic_whose_commit_answer_was_lost_is_resolved_or_called_unknown() {
    bounded("atomic lost answer", async {
        let engine = engine();
        fresh_table(&engine, "retry_atomic_lost", "k int").await;
        // Tracked: the pipeline's and the id's ReadyForQuery get through, the COMMIT's not.
        let proxied = proxied_engine(cutting_proxy(2).await);
        let mut atomic = proxied.atomic();
        atomic.add("INSERT INTO retry_atomic_lost VALUES (1)");
        atomic.retry(policy());
        atomic.run().await.expect("the server says it committed");
        assert_eq!(
            count_where(&engine, "SELECT count(*) FROM retry_atomic_lost".into()).await,
            1,
            "committed once, not run again"
        );

        // Untracked: the COMMIT travels inside the pipeline; a loss is an unknown outcome,
        // never "nothing was committed".
        let proxied = proxied_engine(cutting_proxy(0).await);
        let mut atomic = proxied.atomic();
        atomic.add("INSERT INTO retry_atomic_lost VALUES (2)");
        let err = atomic.run().await.unwrap_err();
        assert_eq!(
            err.transaction_error(),
            Some(TransactionError::OutcomeUnknown),
            "{err}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_pooled_connection_to_a_read_only_server_is_not_given_out_again() {
    bounded("read-only connection discarded", async {
        let mut config = common::tcp_config(TempCluster::SUPERUSER);
        config.target_session_attrs(pgengine::config::TargetSessionAttrs::ReadWrite);
        // No session reset: only the discard stands between the next user and the read-only
        // session.
        let engine = PostgresEngine::builder(config).reset_session(false).build();
        engine
            .start_connection_pool(pgengine::pool::PoolOptions::default().max_size(1))
            .await
            .unwrap();
        {
            let mut conn = engine.acquire().await.unwrap();
            // As a server demoted under its sessions reports: they are read-only now.
            conn.execute("SET default_transaction_read_only = on")
                .await
                .unwrap();
        }
        let mut conn = engine.acquire().await.unwrap();
        let read_only: String = conn
            .query_one("SHOW default_transaction_read_only")
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            read_only, "off",
            "a fresh connection, not the read-only one"
        );
        drop(conn);
        assert_eq!(engine.pool_stats().unwrap().closed, 1);
        engine.close_connection_pool().await.unwrap();
    })
    .await;
}
