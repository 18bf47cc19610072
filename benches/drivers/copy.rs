//! copy: rows `(id int8, name text, score float8)` loaded into an empty UNLOGGED table. What it
//! measures is a driver's cost per row of a bulk load, and what COPY saves over INSERT:
//!
//! - `libpq-copy`: `COPY … FROM STDIN` in the text format, one PQputCopyData per row (libpq
//!   buffers them), PQputCopyEnd, PQgetResult.
//! - `pgengine-text`: `Connection::copy_in` in the text format, one `CopyInSink::write` per
//!   row, the same line as libpq's.
//! - `pgengine-binary`: `COPY … FROM STDIN (FORMAT binary)` through `BinaryCopyInWriter`, one
//!   `write_row` per row: values encoded by postgres-types, nothing formatted as text.
//! - `tokio-postgres-binary`: the same through tokio-postgres's `BinaryCopyInWriter`.
//! - `pgengine-insert`: no COPY: `INSERT … SELECT * FROM unnest($1::int8[], $2::text[],
//!   $3::float8[])` with 1,000 rows per statement (one array parameter per column, in binary),
//!   all in one transaction: the best a driver without COPY does.
//!
//! Row `i` is `(i, 'name-<i>', i / 2)`; the text contenders format each line into a reused
//! buffer, the others reuse one `String` for the name. Every contender opens its connection
//! and empties the table (TRUNCATE) before the clock starts; afterwards the table must hold
//! exactly the rows sent (count, sum of ids, sum of scores), checked untimed.

use std::fmt::Write as _;
use std::time::Instant;

use pq_sys::ExecStatusType;
use tokio_postgres::NoTls;

use crate::{Bench, BenchResult, Contender, Measurement, libpq};

const TABLE: &str = "bench_copy";

/// The rows per INSERT of the `pgengine-insert` contender.
const INSERT_BATCH: u64 = 1_000;

pub fn setup(bench: &Bench, _size: u64) -> BenchResult<()> {
    bench.runtime.block_on(async {
        let mut conn = pgengine::Connection::connect(&bench.config).await?;
        conn.simple_query(&format!(
            "DROP TABLE IF EXISTS {TABLE}; \
             CREATE UNLOGGED TABLE {TABLE} (id int8 NOT NULL, name text NOT NULL, \
             score float8 NOT NULL)"
        ))
        .await?;
        conn.close().await?;
        Ok(())
    })
}

pub fn contenders() -> Vec<Contender> {
    vec![
        Contender::new("libpq-copy", libpq_copy),
        Contender::new("pgengine-text", pgengine_text),
        Contender::new("pgengine-binary", pgengine_binary),
        Contender::new("tokio-postgres-binary", tokio_postgres_binary),
        Contender::new("pgengine-insert", pgengine_insert),
    ]
}

/// Row `i`'s score: halves, so every value and every sum is exact in float8 and in text.
fn score(i: u64) -> f64 {
    i as f64 / 2.0
}

/// Row `i` as a line of the text COPY format, into `line` (cleared first).
fn text_line(line: &mut String, i: u64) {
    line.clear();
    let _ = writeln!(line, "{i}\tname-{i}\t{}", score(i));
}

/// Fails unless the table holds exactly rows `0..n`. Untimed.
async fn check_table(bench: &Bench, n: u64) -> BenchResult<()> {
    let mut conn = pgengine::Connection::connect(&bench.config).await?;
    let row = conn
        .query_one(
            format!(
                "SELECT count(*), coalesce(sum(id), 0)::int8, coalesce(sum(score), 0), \
                 count(*) FILTER (WHERE name <> 'name-' || id) FROM {TABLE}"
            )
            .as_str(),
        )
        .await?;
    conn.close().await?;
    let n_i = n as i64;
    let want = (
        n_i,
        n_i * (n_i - 1) / 2,
        (n_i * (n_i - 1) / 2) as f64 / 2.0,
        0,
    );
    let got = (
        row.get::<_, i64>(0),
        row.get::<_, i64>(1),
        row.get::<_, f64>(2),
        row.get::<_, i64>(3),
    );
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "the table holds (rows, sum of ids, sum of scores, wrong names) {got:?}, expected \
             {want:?}"
        )
        .into())
    }
}

/// Fails unless the COPY (or the INSERTs) reported `n` rows.
fn check_count(reported: u64, n: u64) -> BenchResult<()> {
    if reported == n {
        Ok(())
    } else {
        Err(format!("{reported} rows reported, {n} sent").into())
    }
}

async fn pgengine_connect(bench: &Bench) -> BenchResult<pgengine::Connection> {
    let mut conn = pgengine::Connection::connect(&bench.config).await?;
    conn.simple_query(&format!("TRUNCATE {TABLE}")).await?;
    Ok(conn)
}

fn libpq_copy(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    let mut conn = libpq::Conn::connect(&bench.conninfo)?;
    conn.exec(
        &std::ffi::CString::new(format!("TRUNCATE {TABLE}"))?,
        ExecStatusType::PGRES_COMMAND_OK,
    )?;
    let copy = std::ffi::CString::new(format!("COPY {TABLE} (id, name, score) FROM STDIN"))?;
    let mut line = String::new();

    let start = Instant::now();
    conn.exec(&copy, ExecStatusType::PGRES_COPY_IN)?;
    for i in 0..n {
        text_line(&mut line, i);
        conn.put_copy_data(line.as_bytes())?;
    }
    conn.put_copy_end()?;
    let result = conn
        .get_result()
        .ok_or("libpq: no result after PQputCopyEnd")?;
    result.expect(ExecStatusType::PGRES_COMMAND_OK)?;
    let copied = result.cmd_tuples();
    drop(result);
    if conn.get_result().is_some() {
        return Err("libpq: a second result after the COPY".into());
    }
    let elapsed = start.elapsed();
    drop(conn);
    check_count(copied, n)?;
    bench.runtime.block_on(check_table(bench, n))?;
    Ok(Measurement::new(n, elapsed))
}

fn pgengine_text(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    bench.runtime.block_on(async {
        let mut conn = pgengine_connect(bench).await?;
        let mut line = String::new();
        let before = conn.stats().round_trips;

        let start = Instant::now();
        let mut sink = conn
            .copy_in(&format!("COPY {TABLE} (id, name, score) FROM STDIN"))
            .await?;
        for i in 0..n {
            text_line(&mut line, i);
            sink.write(line.as_bytes()).await?;
        }
        let copied = sink.finish().await?;
        let elapsed = start.elapsed();
        let round_trips = conn.stats().round_trips - before;
        conn.close().await?;
        check_count(copied, n)?;
        check_table(bench, n).await?;
        Ok(Measurement::new(n, elapsed).with("round_trips", round_trips))
    })
}

fn pgengine_binary(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    use pgengine::{BinaryCopyInWriter, Type};
    bench.runtime.block_on(async {
        let mut conn = pgengine_connect(bench).await?;
        let mut name = String::new();

        let start = Instant::now();
        let sink = conn
            .copy_in(&format!(
                "COPY {TABLE} (id, name, score) FROM STDIN (FORMAT binary)"
            ))
            .await?;
        let mut writer = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::TEXT, Type::FLOAT8])?;
        for i in 0..n {
            name.clear();
            let _ = write!(name, "name-{i}");
            let id = i as i64;
            writer.write_row(&[&id, &name.as_str(), &score(i)]).await?;
        }
        let copied = writer.finish().await?;
        let elapsed = start.elapsed();
        conn.close().await?;
        check_count(copied, n)?;
        check_table(bench, n).await?;
        Ok(Measurement::new(n, elapsed))
    })
}

fn tokio_postgres_binary(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::Type;
    bench.runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&bench.conninfo, NoTls).await?;
        let connection = tokio::spawn(connection);
        client.batch_execute(&format!("TRUNCATE {TABLE}")).await?;
        let mut name = String::new();

        let start = Instant::now();
        let sink = client
            .copy_in::<_, bytes::Bytes>(&format!(
                "COPY {TABLE} (id, name, score) FROM STDIN (FORMAT binary)"
            ))
            .await?;
        let writer = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::TEXT, Type::FLOAT8]);
        futures::pin_mut!(writer);
        for i in 0..n {
            name.clear();
            let _ = write!(name, "name-{i}");
            let id = i as i64;
            writer
                .as_mut()
                .write(&[&id, &name.as_str(), &score(i)])
                .await?;
        }
        let copied = writer.finish().await?;
        let elapsed = start.elapsed();
        drop(client);
        connection.await??;
        check_count(copied, n)?;
        check_table(bench, n).await?;
        Ok(Measurement::new(n, elapsed))
    })
}

fn pgengine_insert(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    let insert = format!(
        "INSERT INTO {TABLE} (id, name, score) \
         SELECT * FROM unnest($1::int8[], $2::text[], $3::float8[])"
    );
    bench.runtime.block_on(async {
        let mut conn = pgengine_connect(bench).await?;
        // The statement prepared (and cached) before the clock starts, as a warm connection
        // has it; the row it inserts is gone with the rollback.
        conn.simple_query("BEGIN").await?;
        conn.execute((insert.as_str(), (vec![-1i64], vec!["x"], vec![0.0f64])))
            .await?;
        conn.simple_query("ROLLBACK").await?;
        let mut ids: Vec<i64> = Vec::with_capacity(INSERT_BATCH as usize);
        let mut names: Vec<String> = Vec::with_capacity(INSERT_BATCH as usize);
        let mut scores: Vec<f64> = Vec::with_capacity(INSERT_BATCH as usize);
        let mut inserted = 0;

        let start = Instant::now();
        conn.simple_query("BEGIN").await?;
        let mut next = 0;
        while next < n {
            let end = (next + INSERT_BATCH).min(n);
            ids.clear();
            names.clear();
            scores.clear();
            for i in next..end {
                ids.push(i as i64);
                names.push(format!("name-{i}"));
                scores.push(score(i));
            }
            inserted += conn
                .execute((insert.as_str(), (&ids, &names, &scores)))
                .await?;
            next = end;
        }
        conn.simple_query("COMMIT").await?;
        let elapsed = start.elapsed();
        conn.close().await?;
        check_count(inserted, n)?;
        check_table(bench, n).await?;
        Ok(Measurement::new(n, elapsed))
    })
}
