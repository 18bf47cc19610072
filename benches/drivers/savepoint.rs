//! savepoint: cycles of `SAVEPOINT` and `ROLLBACK TO SAVEPOINT` inside one transaction, each
//! driver the way its users make a savepoint. What it measures is a driver's cost for
//! transaction-control statements that carry no rows.
//!
//! - `libpq`: PQexec for each (the simple protocol), savepoint `s`: two round trips.
//! - `libpq-pipeline`: both statements prepared once, then sent in pipeline mode with one
//!   sync: one round trip, as a C program that takes the trouble gets it.
//! - `tokio-postgres`: `batch_execute` for each (the simple protocol), savepoint `s`: two.
//! - `pgengine`: `tx.savepoint(None)` (named `savepoint_<k>`, quoted) and `sp.rollback_to()`,
//!   on a pool of one warm connection. The savepoint goes out with the next statement (as
//!   Npgsql sends one), so a cycle is one round trip; the count per cycle, from the
//!   transaction connection's counters (`tx.stats()`), is reported.
//! - `raw`: the raw client sending what pgengine sends, pre-encoded: one simple Query of both
//!   statements (`SAVEPOINT s; ROLLBACK TO SAVEPOINT s`). The bound for a client on tokio.
//!
//! A rolled-back-to savepoint stays, so each cycle nests one savepoint deeper, for every
//! contender alike (reusing a name nests too: PostgreSQL keeps the older savepoint of the same
//! name). The transaction begins before the clock starts and is rolled back after it stops.

use std::time::Instant;

use pgengine::pool::PoolOptions;
use pq_sys::ExecStatusType;
use tokio_postgres::NoTls;

use bytes::BytesMut;
use pgengine::protocol::frontend;

use crate::{Bench, BenchResult, Contender, Measurement, libpq, raw};

pub fn contenders() -> Vec<Contender> {
    vec![
        Contender::new("libpq", libpq),
        Contender::new("libpq-pipeline", libpq_pipeline),
        Contender::new("tokio-postgres", tokio_postgres),
        Contender::new("pgengine", |bench, n| pgengine(bench, n, None)),
        Contender::new("pgengine-busy-poll", |bench, n| {
            pgengine(bench, n, Some(crate::BUSY_POLL))
        }),
        Contender::new("raw", raw),
    ]
}

fn libpq(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    let mut conn = libpq::Conn::connect(&bench.conninfo)?;
    conn.exec(c"BEGIN", ExecStatusType::PGRES_COMMAND_OK)?;

    let start = Instant::now();
    for _ in 0..n {
        conn.exec(c"SAVEPOINT s", ExecStatusType::PGRES_COMMAND_OK)?;
        conn.exec(c"ROLLBACK TO SAVEPOINT s", ExecStatusType::PGRES_COMMAND_OK)?;
    }
    let elapsed = start.elapsed();
    conn.exec(c"ROLLBACK", ExecStatusType::PGRES_COMMAND_OK)?;
    Ok(Measurement::new(n, elapsed))
}

fn libpq_pipeline(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    const SAVEPOINT: &std::ffi::CStr = c"savepoint_s";
    const ROLLBACK_TO: &std::ffi::CStr = c"rollback_to_s";
    let mut conn = libpq::Conn::connect(&bench.conninfo)?;
    conn.exec(c"BEGIN", ExecStatusType::PGRES_COMMAND_OK)?;
    conn.prepare(SAVEPOINT, "SAVEPOINT s", &[])?;
    conn.prepare(ROLLBACK_TO, "ROLLBACK TO SAVEPOINT s", &[])?;
    conn.enter_pipeline_mode()?;

    let start = Instant::now();
    for _ in 0..n {
        conn.send_prepared(SAVEPOINT, &[], &[], &[])?;
        conn.send_prepared(ROLLBACK_TO, &[], &[], &[])?;
        conn.pipeline_sync()?;
        // Each statement's result, then the null that ends it; then the sync's own result.
        for _ in 0..2 {
            conn.get_result()
                .ok_or("libpq: a pipelined statement had no result")?
                .expect(ExecStatusType::PGRES_COMMAND_OK)?;
            if conn.get_result().is_some() {
                return Err("libpq: a pipelined statement had two results".into());
            }
        }
        conn.get_result()
            .ok_or("libpq: no result for the pipeline sync")?
            .expect(ExecStatusType::PGRES_PIPELINE_SYNC)?;
    }
    let elapsed = start.elapsed();
    Ok(Measurement::new(n, elapsed))
}

fn tokio_postgres(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    bench.runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&bench.conninfo, NoTls).await?;
        let connection = tokio::spawn(connection);
        client.batch_execute("BEGIN").await?;

        let start = Instant::now();
        for _ in 0..n {
            client.batch_execute("SAVEPOINT s").await?;
            client.batch_execute("ROLLBACK TO SAVEPOINT s").await?;
        }
        let elapsed = start.elapsed();
        client.batch_execute("ROLLBACK").await?;
        drop(client);
        connection.await??;
        Ok(Measurement::new(n, elapsed))
    })
}

/// `busy_poll`: see [`crate::BUSY_POLL`].
fn pgengine(
    bench: &Bench,
    n: u64,
    busy_poll: Option<std::time::Duration>,
) -> BenchResult<Measurement> {
    bench.runtime.block_on(async {
        let mut builder = pgengine::PostgresEngine::builder(bench.config.clone());
        if let Some(limit) = busy_poll {
            builder = builder.busy_poll(limit);
        }
        let engine = builder.build();
        engine
            .start_connection_pool(PoolOptions::default().max_size(1))
            .await?;
        engine.query_one("SELECT 1").await?;
        let tx = engine.begin().await?;
        let before = tx.stats().await;

        let start = Instant::now();
        for _ in 0..n {
            let sp = tx.savepoint(None).await?;
            sp.rollback_to().await?;
        }
        let elapsed = start.elapsed();
        let after = tx.stats().await;
        tx.rollback().await?;
        drop(tx);
        engine.close_connection_pool().await?;
        let round_trips = (after.round_trips - before.round_trips) as f64 / n as f64;
        Ok(Measurement::new(n, elapsed).with("round_trips_per_cycle", format!("{round_trips:.2}")))
    })
}

fn raw(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    bench.runtime.block_on(async {
        let mut client = raw::Client::connect(&bench.config).await?;
        let mut statements = Vec::new();
        for sql in ["BEGIN", "SAVEPOINT s; ROLLBACK TO SAVEPOINT s", "ROLLBACK"] {
            let mut buf = BytesMut::new();
            frontend::query(&mut buf, sql)?;
            statements.push(buf);
        }
        let [begin, cycle, rollback] = &statements[..] else {
            unreachable!("three statements");
        };
        // CommandComplete is all each one answers.
        let complete = |tag: u8, _: &[u8]| match tag {
            b'C' => Ok(()),
            other => Err(format!("raw: unexpected message {:?}", other as char).into()),
        };
        client.send(begin).await?;
        client.read_until_ready(complete).await?;

        let start = Instant::now();
        for _ in 0..n {
            client.send(cycle).await?;
            client.read_until_ready(complete).await?;
        }
        let elapsed = start.elapsed();
        client.send(rollback).await?;
        client.read_until_ready(complete).await?;
        client.close().await?;
        Ok(Measurement::new(n, elapsed))
    })
}
