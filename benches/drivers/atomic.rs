//! atomic: transactions of 10 inserts (int4, text), `BEGIN` and `COMMIT` included, each
//! committed before the next begins. What it measures is how many round trips a driver needs
//! for an all-or-nothing unit of work, and what it spends per statement:
//!
//! - `libpq-pipeline`: pipeline mode; BEGIN, 10 PQsendQueryPrepared and COMMIT (all prepared),
//!   one PQpipelineSync: one round trip per transaction.
//! - `tokio-postgres`: BEGIN, the inserts and COMMIT (all prepared) started together with
//!   `futures::join!`, so they go out together: one round trip (each statement has its own
//!   Sync, which does not end an explicit transaction block).
//! - `tokio-postgres-sequential`: `client.transaction()`, 10 awaited `execute`s, `commit()`:
//!   12 round trips.
//! - `pgengine`: `engine.atomic()` with the 10 inserts, on a pool of one warm connection: one
//!   pipeline and one Sync (its statement cache makes every run after the first Bind/Execute
//!   only). Its round trips per transaction are reported from the connection's counters.
//! - `raw`: the raw client with the same messages as libpq's pipeline (BEGIN, 10 inserts and
//!   COMMIT as Bind/Execute of prepared statements, one Sync), encoded per transaction, and
//!   only framing on the way back: the bound for a client on tokio.
//!
//! Every contender opens its connection, prepares (pgengine runs one transaction to fill its
//! cache), and empties the table before the clock starts; afterwards the table must hold
//! exactly the rows sent. Parameters go in binary everywhere.

use std::ffi::{CStr, c_char, c_int};
use std::time::Instant;

use pgengine::pool::PoolOptions;
use pq_sys::ExecStatusType;
use tokio_postgres::NoTls;
use tokio_postgres::types::{ToSql, Type};

use bytes::{BufMut, BytesMut};
use pgengine::protocol::frontend;

use crate::{Bench, BenchResult, Contender, Measurement, libpq, raw};

const TABLE: &str = "bench_atomic";

/// The inserts per transaction.
const INSERTS: u64 = 10;

/// The same SQL text for every contender.
const INSERT: &str = "INSERT INTO bench_atomic (id, name) VALUES ($1, $2)";

const INT4_OID: u32 = 23;
const TEXT_OID: u32 = 25;

pub fn setup(bench: &Bench, _size: u64) -> BenchResult<()> {
    bench.runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&bench.conninfo, NoTls).await?;
        let connection = tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (id int4 NOT NULL, name text NOT NULL)"
            ))
            .await?;
        drop(client);
        connection.await??;
        Ok(())
    })
}

pub fn contenders() -> Vec<Contender> {
    vec![
        Contender::new("libpq-pipeline", libpq_pipeline),
        Contender::new("tokio-postgres", tokio_postgres_joined),
        Contender::new("tokio-postgres-sequential", tokio_postgres_sequential),
        Contender::new("pgengine", pgengine),
        Contender::new("raw", raw),
    ]
}

/// The id of insert `j` of transaction `t`; its name is `name-<id>`.
fn id(t: u64, j: u64) -> i32 {
    (t * INSERTS + j) as i32
}

/// What the table must hold after `n` transactions: (rows, sum of ids).
fn expected(n: u64) -> (i64, i64) {
    let rows = (n * INSERTS) as i64;
    (rows, rows * (rows - 1) / 2)
}

/// Fails unless the table holds exactly the rows of `n` transactions. Untimed.
async fn check_table(client: &tokio_postgres::Client, n: u64) -> BenchResult<()> {
    let row = client
        .query_one(
            &format!("SELECT count(*), coalesce(sum(id), 0)::int8 FROM {TABLE}"),
            &[],
        )
        .await?;
    let got = (row.get::<_, i64>(0), row.get::<_, i64>(1));
    if got == expected(n) {
        Ok(())
    } else {
        Err(format!(
            "the table holds (rows, sum of ids) {got:?}, expected {:?}",
            expected(n)
        )
        .into())
    }
}

/// The table check from a tokio-postgres connection of its own, for the contenders that are
/// not tokio-postgres.
async fn check_table_apart(bench: &Bench, n: u64) -> BenchResult<()> {
    let (client, connection) = tokio_postgres::connect(&bench.conninfo, NoTls).await?;
    let connection = tokio::spawn(connection);
    check_table(&client, n).await?;
    drop(client);
    connection.await??;
    Ok(())
}

fn libpq_pipeline(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    const BEGIN: &CStr = c"atomic_begin";
    const COMMIT: &CStr = c"atomic_commit";
    const INSERT_NAME: &CStr = c"atomic_insert";
    let mut conn = libpq::Conn::connect(&bench.conninfo)?;
    conn.prepare(BEGIN, "BEGIN", &[])?;
    conn.prepare(COMMIT, "COMMIT", &[])?;
    conn.prepare(INSERT_NAME, INSERT, &[INT4_OID, TEXT_OID])?;
    conn.exec(
        &std::ffi::CString::new(format!("TRUNCATE {TABLE}"))?,
        ExecStatusType::PGRES_COMMAND_OK,
    )?;
    conn.enter_pipeline_mode()?;
    let formats = [1 as c_int, 1];

    let start = Instant::now();
    for t in 0..n {
        conn.send_prepared(BEGIN, &[], &[], &[])?;
        for j in 0..INSERTS {
            let id = id(t, j);
            let id_bytes = id.to_be_bytes();
            let name = format!("name-{id}");
            let values = [
                id_bytes.as_ptr().cast::<c_char>(),
                name.as_ptr().cast::<c_char>(),
            ];
            let lengths = [4, c_int::try_from(name.len())?];
            conn.send_prepared(INSERT_NAME, &values, &lengths, &formats)?;
        }
        conn.send_prepared(COMMIT, &[], &[], &[])?;
        conn.pipeline_sync()?;
        // Each query's result, then the null that ends it; then the sync's own result.
        for _ in 0..INSERTS + 2 {
            let result = conn
                .get_result()
                .ok_or("libpq: a pipelined query had no result")?;
            result.expect(ExecStatusType::PGRES_COMMAND_OK)?;
            if conn.get_result().is_some() {
                return Err("libpq: a pipelined query had two results".into());
            }
        }
        conn.get_result()
            .ok_or("libpq: no result for the pipeline sync")?
            .expect(ExecStatusType::PGRES_PIPELINE_SYNC)?;
    }
    let elapsed = start.elapsed();
    drop(conn);
    bench.runtime.block_on(check_table_apart(bench, n))?;
    Ok(Measurement::new(n, elapsed))
}

/// The prepared statements of the tokio-postgres contenders, and the table emptied.
async fn tokio_postgres_connect(
    bench: &Bench,
) -> BenchResult<(
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    tokio_postgres::Statement,
)> {
    let (client, connection) = tokio_postgres::connect(&bench.conninfo, NoTls).await?;
    let connection = tokio::spawn(connection);
    let insert = client
        .prepare_typed(INSERT, &[Type::INT4, Type::TEXT])
        .await?;
    client.batch_execute(&format!("TRUNCATE {TABLE}")).await?;
    Ok((client, connection, insert))
}

fn tokio_postgres_joined(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    bench.runtime.block_on(async {
        let (client, connection, insert) = tokio_postgres_connect(bench).await?;
        let begin = client.prepare("BEGIN").await?;
        let commit = client.prepare("COMMIT").await?;

        let start = Instant::now();
        for t in 0..n {
            let rows: Vec<(i32, String)> = (0..INSERTS)
                .map(|j| (id(t, j), format!("name-{}", id(t, j))))
                .collect();
            let params: Vec<[&(dyn ToSql + Sync); 2]> = rows
                .iter()
                .map(|(id, name)| [id as &(dyn ToSql + Sync), name])
                .collect();
            // join! polls its futures in order, and each sends its request on its first poll:
            // BEGIN, the inserts, COMMIT go out in that order, together.
            let inserts = params.iter().map(|p| client.execute(&insert, p));
            let (began, inserted, committed) = futures::join!(
                client.execute(&begin, &[]),
                futures::future::try_join_all(inserts),
                client.execute(&commit, &[]),
            );
            began?;
            inserted?;
            committed?;
        }
        let elapsed = start.elapsed();
        check_table(&client, n).await?;
        drop((insert, begin, commit));
        drop(client);
        connection.await??;
        Ok(Measurement::new(n, elapsed))
    })
}

fn tokio_postgres_sequential(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    bench.runtime.block_on(async {
        let (mut client, connection, insert) = tokio_postgres_connect(bench).await?;

        let start = Instant::now();
        for t in 0..n {
            let tx = client.transaction().await?;
            for j in 0..INSERTS {
                let id = id(t, j);
                tx.execute(&insert, &[&id, &format!("name-{id}")]).await?;
            }
            tx.commit().await?;
        }
        let elapsed = start.elapsed();
        check_table(&client, n).await?;
        drop(insert);
        drop(client);
        connection.await??;
        Ok(Measurement::new(n, elapsed))
    })
}

/// The Atomic of transaction `t`.
fn atomic_of(engine: &pgengine::PostgresEngine, t: u64) -> pgengine::atomic::Atomic<'static> {
    let mut atomic = engine.atomic();
    for j in 0..INSERTS {
        let id = id(t, j);
        atomic.add(
            pgengine::Query::new(INSERT)
                .bind(id)
                .bind(format!("name-{id}")),
        );
    }
    atomic
}

fn pgengine(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    bench.runtime.block_on(async {
        let engine = pgengine::PostgresEngine::new(bench.config.clone());
        engine
            .start_connection_pool(PoolOptions::default().max_size(1))
            .await?;
        // One transaction to open the connection and fill its statement cache; then empty
        // the table.
        atomic_of(&engine, 0).run().await?;
        engine.run_ddl(&format!("TRUNCATE {TABLE}")).await?;
        let before = engine.acquire().await?.stats();

        let start = Instant::now();
        for t in 0..n {
            atomic_of(&engine, t).run().await?;
        }
        let elapsed = start.elapsed();
        let after = engine.acquire().await?.stats();
        engine.close_connection_pool().await?;
        check_table_apart(bench, n).await?;
        let round_trips = (after.round_trips - before.round_trips) as f64 / n as f64;
        Ok(Measurement::new(n, elapsed).with("round_trips_per_tx", format!("{round_trips:.2}")))
    })
}

fn raw(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    bench.runtime.block_on(async {
        let mut client = raw::Client::connect(&bench.config).await?;
        client.prepare("atomic_begin", "BEGIN", &[]).await?;
        client.prepare("atomic_commit", "COMMIT", &[]).await?;
        client
            .prepare("atomic_insert", INSERT, &[INT4_OID, TEXT_OID])
            .await?;
        let mut truncate = BytesMut::new();
        frontend::query(&mut truncate, &format!("TRUNCATE {TABLE}"))?;
        client.send(&truncate).await?;
        client.read_until_ready(|_, _| Ok(())).await?;
        let mut request = BytesMut::new();
        let no_params = |_: usize, _: &mut BytesMut| Ok::<_, pgengine::Error>(false);

        let start = Instant::now();
        for t in 0..n {
            request.clear();
            frontend::bind(&mut request, "", "atomic_begin", &[], 0, no_params, &[])?;
            frontend::execute(&mut request, "", 0)?;
            for j in 0..INSERTS {
                let id = id(t, j);
                let name = format!("name-{id}");
                frontend::bind::<pgengine::Error, _>(
                    &mut request,
                    "",
                    "atomic_insert",
                    &[1],
                    2,
                    |i, buf| {
                        match i {
                            0 => buf.put_i32(id),
                            _ => buf.put_slice(name.as_bytes()),
                        }
                        Ok(false)
                    },
                    &[],
                )?;
                frontend::execute(&mut request, "", 0)?;
            }
            frontend::bind(&mut request, "", "atomic_commit", &[], 0, no_params, &[])?;
            frontend::execute(&mut request, "", 0)?;
            frontend::sync(&mut request);
            client.send(&request).await?;
            let mut completed = 0;
            client
                .read_until_ready(|tag, _| match tag {
                    // BindComplete, CommandComplete.
                    b'2' => Ok(()),
                    b'C' => {
                        completed += 1;
                        Ok(())
                    }
                    other => Err(format!("raw: unexpected message {:?}", other as char).into()),
                })
                .await?;
            if completed != INSERTS + 2 {
                return Err(
                    format!("raw: {completed} statements completed, not {}", INSERTS + 2).into(),
                );
            }
        }
        let elapsed = start.elapsed();
        client.close().await?;
        check_table_apart(bench, n).await?;
        Ok(Measurement::new(n, elapsed))
    })
}
