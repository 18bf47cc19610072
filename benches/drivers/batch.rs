//! batch: a large result read whole — 1,000,000 rows of (int4, text, float8, timestamptz) from a
//! real table — with every value of every row decoded into a Rust value (`i32`, `&str`, `f64`,
//! `SystemTime`) and folded into a checksum that must come out exactly as expected. Every
//! contender decodes with the same `postgres-types` `FromSql` impls, so the work is equal;
//! what differs is how the rows travel and how much each driver spends per row and per batch.
//!
//! The batched contenders ask for `batch_size` rows at a time:
//!
//! - `libpq-cursor`: `BEGIN`, `DECLARE … CURSOR`, `FETCH n` (binary results through
//!   PQexecParams) until it comes back short, `COMMIT`: a full round trip per batch.
//! - `libpq-chunked`: PQsetChunkedRowsMode(n) (libpq 17+, loaded from `PGENGINE_LIBPQ18`; the
//!   contender is skipped without it).
//! - `tokio-postgres-portal`: a transaction, `bind`, then `query_portal(&portal, n)` until it
//!   comes back short: a round trip per batch, nothing prefetched.
//! - `pgengine`: `engine.batch(sql, n)` (its own `BEGIN READ ONLY`, a portal, two Executes in
//!   flight ahead of the caller), on a warm pooled connection.
//!
//! The others read the whole result as one stream, whatever the batch size; they are in every
//! batch size's table so that each table compares under the same conditions:
//!
//! - `libpq-single`: PQsetSingleRowMode, one PGresult per row.
//! - `libpq-exec`: one PQexecParams, the whole result in memory at once.
//! - `tokio-postgres-query-raw`: `query_raw`, rows decoded as the stream yields them.
//! - `pgengine-stream`: `Connection::query_stream`, likewise.
//! - `raw-decoded`: the raw client, decoding every value from the DataRow bodies.
//! - `raw`: the raw client, **frames only**: it counts the DataRows (checking each one's
//!   column count) and decodes nothing. It is not doing the work the others do; it is the bound
//!   set by the server and the socket, the rate no client can beat.
//! - `server-copy` (on the throwaway cluster only): no client at all: the server runs `COPY (query) TO '/dev/null'` in the
//!   binary format, producing and encoding every row and writing it nowhere. The rate at which
//!   this server can make these rows, whoever reads them.
//!
//! Every contender asks for binary results, sends the same SQL text, and is timed from its first
//! request to the last row (transaction control included); connecting and preparing are not
//! timed. `size` is the number of rows (`WHERE id <= size`), so a warm-up reads a tenth of them.

use std::ffi::CString;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::TryStreamExt;
use pgengine::pool::PoolOptions;
use pq_sys::ExecStatusType;
use tokio_postgres::NoTls;
use tokio_postgres::types::{FromSql, ToSql, Type};

use crate::{Bench, BenchResult, Contender, Measurement, libpq, raw};

/// The rows of the table, and of one measurement by default.
pub const DEFAULT_ROWS: u64 = 1_000_000;

/// The table the rows come from: `generate_series` in the query itself would materialise its
/// whole output before the first row went out.
const TABLE: &str = "bench_batch";

/// `at` of the row with id 0: 2024-01-01 00:00:00 UTC, in seconds since the Unix epoch; row i
/// is i seconds later.
const AT_EPOCH_SECS: u64 = 1_704_067_200;

/// The same SQL text for every contender.
fn query(rows: u64) -> String {
    format!("SELECT id, name, amount, at FROM {TABLE} WHERE id <= {rows}")
}

/// Creates the table with ids 1..=`rows`, unless it is there already with ids 1..=N for some
/// N ≥ `rows` (a larger table is kept: the query's `WHERE` picks the rows).
/// `amount` is id / 4, so sums of it are exact in any order (a sequential scan of a large table
/// may start in its middle: `synchronize_seqscans`).
pub fn setup(bench: &Bench, rows: u64) -> BenchResult<()> {
    bench.runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&bench.conninfo, NoTls).await?;
        let connection = tokio::spawn(connection);
        let exists = client
            .query_one(&format!("SELECT to_regclass('{TABLE}') IS NOT NULL"), &[])
            .await?
            .get::<_, bool>(0);
        // Only this bench makes the table, always with ids 1..=N: its count and range say N.
        let complete = if exists {
            let row = client
                .query_one(
                    &format!("SELECT count(*), min(id), max(id) FROM {TABLE}"),
                    &[],
                )
                .await?;
            let count = row.get::<_, i64>(0);
            let (min, max) = (row.get::<_, Option<i32>>(1), row.get::<_, Option<i32>>(2));
            min == Some(1) && max.is_some_and(|max| i64::from(max) == count && count >= rows as i64)
        } else {
            false
        };
        if !complete {
            println!("# creating table {TABLE} with {rows} rows");
            client
                .batch_execute(&format!(
                    "DROP TABLE IF EXISTS {TABLE};
                     CREATE TABLE {TABLE} (
                         id int4 NOT NULL, name text NOT NULL, amount float8 NOT NULL,
                         at timestamptz NOT NULL
                     );
                     INSERT INTO {TABLE}
                         SELECT i, 'name-' || i, i * 0.25,
                                to_timestamp({AT_EPOCH_SECS}) + i * interval '1 second'
                         FROM generate_series(1, {rows}) AS i;"
                ))
                .await?;
            // Outside a transaction block: sets the hint bits and the visibility map now, so
            // the first contender's scan does not pay for writing them.
            client
                .batch_execute(&format!("VACUUM (FREEZE, ANALYZE) {TABLE}"))
                .await?;
        }
        drop(client);
        connection.await??;
        Ok(())
    })
}

pub fn contenders(bench: &Bench, batch_size: usize) -> Vec<Contender> {
    let mut contenders = vec![
        Contender::new("libpq-cursor", move |b, n| libpq_cursor(b, n, batch_size)),
        Contender::new("libpq-single", libpq_single),
        Contender::new("libpq-exec", libpq_exec),
    ];
    match bench.libpq18 {
        Some(api) if api.has_chunked_rows_mode() => contenders
            .push(Contender::new("libpq-chunked", move |b, n| {
                libpq_chunked(b, api, n, batch_size)
            })),
        Some(api) => println!(
            "# libpq-chunked skipped: the libpq of PGENGINE_LIBPQ18 ({}) has no chunked rows mode",
            api.version()
        ),
        None => println!(
            "# libpq-chunked skipped: PGENGINE_LIBPQ18 is not set (chunked rows mode needs \
             libpq 17+; the system's is {})",
            libpq::version()
        ),
    }
    contenders.extend([
        Contender::new("tokio-postgres-portal", move |b, n| {
            tokio_postgres_portal(b, n, batch_size)
        }),
        Contender::new("tokio-postgres-query-raw", tokio_postgres_query_raw),
        Contender::new("raw", raw_frames),
        Contender::new("raw-decoded", raw_decoded),
        Contender::new("pgengine", move |b, n| pgengine_batch(b, n, batch_size)),
        Contender::new("pgengine-stream", pgengine_stream),
    ]);
    if bench.own_cluster {
        contenders.push(Contender::new("server-copy", server_copy));
    } else {
        println!(
            "# server-copy skipped: writing a server file needs the throwaway cluster's superuser"
        );
    }
    contenders
}

/// What the decoded values add up to. Every sum is exact and independent of the order of the
/// rows, so every contender must reach exactly [`Checksum::expected`].
#[derive(Debug, Default, PartialEq)]
struct Checksum {
    rows: u64,
    ids: i64,
    text_bytes: u64,
    amounts: f64,
    micros: u128,
}

impl Checksum {
    /// Folds in one row's decoded values.
    fn add(&mut self, id: i32, name: &str, amount: f64, at: SystemTime) -> BenchResult<()> {
        self.rows += 1;
        self.ids += i64::from(id);
        self.text_bytes += name.len() as u64;
        self.amounts += amount;
        self.micros += at.duration_since(UNIX_EPOCH)?.as_micros();
        Ok(())
    }

    /// Decodes one row given as its four binary values (`None` for NULL) and folds it in, with
    /// the `FromSql` impls tokio-postgres and pgengine use for `Row::get`.
    fn add_values(&mut self, values: [Option<&[u8]>; 4]) -> BenchResult<()> {
        let [Some(id), Some(name), Some(amount), Some(at)] = values else {
            return Err("a NULL where the table has none".into());
        };
        self.add(
            decode(&Type::INT4, id)?,
            decode(&Type::TEXT, name)?,
            decode(&Type::FLOAT8, amount)?,
            decode(&Type::TIMESTAMPTZ, at)?,
        )
    }

    /// The checksum of rows 1..=`rows`, from the formulas the table was made with.
    fn expected(rows: u64) -> Checksum {
        let ids = rows * (rows + 1) / 2;
        Checksum {
            rows,
            ids: ids as i64,
            text_bytes: text_bytes(rows),
            amounts: ids as f64 * 0.25,
            micros: (u128::from(rows) * u128::from(AT_EPOCH_SECS) + u128::from(ids)) * 1_000_000,
        }
    }

    /// Fails unless this is the checksum of rows 1..=`rows`: a driver that returns wrong
    /// values fast must not win.
    fn check(&self, rows: u64) -> BenchResult<()> {
        let expected = Checksum::expected(rows);
        if *self == expected {
            Ok(())
        } else {
            Err(format!("wrong checksum: got {self:?}, expected {expected:?}").into())
        }
    }
}

/// The bytes of the names of rows 1..=`rows`: `name-` and the id's decimal digits, counted
/// per number of digits (ids from 10^(d-1) to 10^d - 1 have d).
fn text_bytes(rows: u64) -> u64 {
    let mut total = 0;
    let mut low = 1;
    for digits in 1.. {
        if low > rows {
            break;
        }
        let high = (low * 10 - 1).min(rows);
        total += (high - low + 1) * (5 + digits);
        low *= 10;
    }
    total
}

/// One binary value as a `T`, as `Row::get` decodes it.
fn decode<'a, T: FromSql<'a>>(ty: &Type, raw: &'a [u8]) -> BenchResult<T> {
    T::from_sql(ty, raw).map_err(|e| -> Box<dyn std::error::Error> { e })
}

/// One libpq result's rows, decoded.
fn add_libpq_rows(sum: &mut Checksum, result: &libpq::PgResult) -> BenchResult<()> {
    for row in 0..result.rows() {
        sum.add_values([
            result.value(row, 0),
            result.value(row, 1),
            result.value(row, 2),
            result.value(row, 3),
        ])?;
    }
    Ok(())
}

fn libpq_cursor(bench: &Bench, n: u64, batch_size: usize) -> BenchResult<Measurement> {
    let mut conn = libpq::Conn::connect(&bench.conninfo)?;
    let declare = CString::new(format!(
        "DECLARE bench_cursor NO SCROLL CURSOR FOR {}",
        query(n)
    ))?;
    let fetch = CString::new(format!("FETCH {batch_size} FROM bench_cursor"))?;
    let mut sum = Checksum::default();

    let start = Instant::now();
    conn.exec(c"BEGIN", ExecStatusType::PGRES_COMMAND_OK)?;
    conn.exec(&declare, ExecStatusType::PGRES_COMMAND_OK)?;
    loop {
        // Through the extended protocol with binary results: the Bind's format decides a
        // FETCH's format (DECLARE's BINARY option is for the simple protocol).
        let result = conn.exec_binary(&fetch)?;
        if result.rows() == 0 {
            break;
        }
        result.expect_binary_columns(4)?;
        add_libpq_rows(&mut sum, &result)?;
        if result.rows() < batch_size {
            break;
        }
    }
    conn.exec(c"COMMIT", ExecStatusType::PGRES_COMMAND_OK)?;
    let elapsed = start.elapsed();
    sum.check(n)?;
    Ok(Measurement::new(n, elapsed))
}

fn libpq_single(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    let mut conn = libpq::Conn::connect(&bench.conninfo)?;
    let sql = CString::new(query(n))?;
    let mut sum = Checksum::default();

    let start = Instant::now();
    conn.send_binary(&sql)?;
    conn.set_single_row_mode()?;
    read_results(&mut conn, &mut sum, ExecStatusType::PGRES_SINGLE_TUPLE)?;
    let elapsed = start.elapsed();
    sum.check(n)?;
    Ok(Measurement::new(n, elapsed))
}

fn libpq_chunked(
    bench: &Bench,
    api: &'static libpq::Api,
    n: u64,
    batch_size: usize,
) -> BenchResult<Measurement> {
    let mut conn = libpq::Conn::connect_with(api, &bench.conninfo)?;
    let sql = CString::new(query(n))?;
    let mut sum = Checksum::default();

    let start = Instant::now();
    conn.send_binary(&sql)?;
    conn.set_chunked_rows_mode(batch_size.try_into()?)?;
    read_results(&mut conn, &mut sum, ExecStatusType::PGRES_TUPLES_CHUNK)?;
    let elapsed = start.elapsed();
    sum.check(n)?;
    Ok(Measurement::new(n, elapsed))
}

/// Reads the results of a query sent in single-row or chunked mode: results of `partial`
/// status with rows, then an empty PGRES_TUPLES_OK, then none.
fn read_results(
    conn: &mut libpq::Conn,
    sum: &mut Checksum,
    partial: ExecStatusType,
) -> BenchResult<()> {
    let mut checked = false;
    while let Some(result) = conn.get_result() {
        if result.status() != partial {
            result.expect(ExecStatusType::PGRES_TUPLES_OK)?;
        }
        if !checked && result.rows() > 0 {
            result.expect_binary_columns(4)?;
            checked = true;
        }
        add_libpq_rows(sum, &result)?;
    }
    Ok(())
}

fn libpq_exec(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    let mut conn = libpq::Conn::connect(&bench.conninfo)?;
    let sql = CString::new(query(n))?;
    let mut sum = Checksum::default();

    let start = Instant::now();
    let result = conn.exec_binary(&sql)?;
    result.expect_binary_columns(4)?;
    add_libpq_rows(&mut sum, &result)?;
    drop(result);
    let elapsed = start.elapsed();
    sum.check(n)?;
    Ok(Measurement::new(n, elapsed))
}

/// Decodes a tokio-postgres row.
fn add_tokio_postgres_row(sum: &mut Checksum, row: &tokio_postgres::Row) -> BenchResult<()> {
    sum.add(
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
    )
}

fn tokio_postgres_portal(bench: &Bench, n: u64, batch_size: usize) -> BenchResult<Measurement> {
    bench.runtime.block_on(async {
        let (mut client, connection) = tokio_postgres::connect(&bench.conninfo, NoTls).await?;
        let connection = tokio::spawn(connection);
        let statement = client.prepare(&query(n)).await?;
        let max_rows = i32::try_from(batch_size)?;
        let mut sum = Checksum::default();

        let start = Instant::now();
        let tx = client.transaction().await?;
        let portal = tx.bind(&statement, &[]).await?;
        loop {
            let rows = tx.query_portal(&portal, max_rows).await?;
            for row in &rows {
                add_tokio_postgres_row(&mut sum, row)?;
            }
            if rows.len() < batch_size {
                break;
            }
        }
        tx.commit().await?;
        let elapsed = start.elapsed();
        sum.check(n)?;
        drop(statement);
        drop(client);
        connection.await??;
        Ok(Measurement::new(n, elapsed))
    })
}

fn tokio_postgres_query_raw(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    bench.runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&bench.conninfo, NoTls).await?;
        let connection = tokio::spawn(connection);
        let statement = client.prepare(&query(n)).await?;
        let mut sum = Checksum::default();

        let start = Instant::now();
        let rows = client
            .query_raw(&statement, std::iter::empty::<&(dyn ToSql + Sync)>())
            .await?;
        let mut rows = std::pin::pin!(rows);
        while let Some(row) = rows.try_next().await? {
            add_tokio_postgres_row(&mut sum, &row)?;
        }
        let elapsed = start.elapsed();
        sum.check(n)?;
        drop(statement);
        drop(client);
        connection.await??;
        Ok(Measurement::new(n, elapsed))
    })
}

/// The raw client, preparing the statement before the clock starts; `on_row` gets each
/// DataRow's body.
fn raw_run(
    bench: &Bench,
    n: u64,
    mut on_row: impl FnMut(&[u8]) -> BenchResult<()>,
) -> BenchResult<Duration> {
    bench.runtime.block_on(async {
        let mut client = raw::Client::connect(&bench.config).await?;
        client.prepare("batch", &query(n), &[]).await?;
        let request = raw::bind_execute_sync("batch")?;

        let start = Instant::now();
        client.send(&request).await?;
        client
            .read_until_ready(|tag, body| match tag {
                b'D' => on_row(body),
                // BindComplete, CommandComplete.
                b'2' | b'C' => Ok(()),
                other => Err(format!("raw: unexpected message {:?}", other as char).into()),
            })
            .await?;
        let elapsed = start.elapsed();
        client.close().await?;
        Ok(elapsed)
    })
}

fn raw_frames(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    let mut rows = 0u64;
    let elapsed = raw_run(bench, n, |body| {
        if body.get(..2) != Some(&4i16.to_be_bytes()) {
            return Err("raw: expected a DataRow of 4 columns".into());
        }
        rows += 1;
        Ok(())
    })?;
    if rows != n {
        return Err(format!("raw: {rows} rows, expected {n}").into());
    }
    Ok(Measurement::new(n, elapsed))
}

/// The server alone: `COPY (query) TO '/dev/null'` in the binary format, so the rows are
/// produced and encoded but go to no client.
fn server_copy(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    bench.runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&bench.conninfo, NoTls).await?;
        let connection = tokio::spawn(connection);
        let copy = format!("COPY ({}) TO '/dev/null' (FORMAT binary)", query(n));

        let start = Instant::now();
        let messages = client.simple_query(&copy).await?;
        let elapsed = start.elapsed();
        let copied = messages.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::CommandComplete(rows) => Some(*rows),
            _ => None,
        });
        if copied != Some(n) {
            return Err(format!("server-copy: copied {copied:?} rows, expected {n}").into());
        }
        drop(client);
        connection.await??;
        Ok(Measurement::new(n, elapsed))
    })
}

fn raw_decoded(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    let mut sum = Checksum::default();
    let elapsed = raw_run(bench, n, |body| {
        let mut values = [None; 4];
        raw::data_row_values(body, &mut values)?;
        sum.add_values(values)
    })?;
    sum.check(n)?;
    Ok(Measurement::new(n, elapsed))
}

/// Decodes a pgengine row.
fn add_pgengine_row(sum: &mut Checksum, row: &pgengine::Row) -> BenchResult<()> {
    sum.add(
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
    )
}

/// `engine.batch` on a pool of one connection, opened (and used once) before the clock starts.
fn pgengine_batch(bench: &Bench, n: u64, batch_size: usize) -> BenchResult<Measurement> {
    bench.runtime.block_on(async {
        let engine = pgengine::PostgresEngine::new(bench.config.clone());
        engine
            .start_connection_pool(PoolOptions::default().max_size(1))
            .await?;
        engine.query_one("SELECT 1").await?;
        let sql = query(n);
        let mut sum = Checksum::default();

        let start = Instant::now();
        let mut batches = engine.batch(sql.as_str(), batch_size).await?;
        while let Some(rows) = batches.next_batch().await? {
            for row in &rows {
                add_pgengine_row(&mut sum, row)?;
            }
        }
        let elapsed = start.elapsed();
        drop(batches);
        sum.check(n)?;
        engine.close_connection_pool().await?;
        Ok(Measurement::new(n, elapsed))
    })
}

/// `Connection::query_stream`: one Bind/Execute, rows decoded as they are polled.
fn pgengine_stream(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    bench.runtime.block_on(async {
        let mut conn = pgengine::Connection::connect(&bench.config).await?;
        let sql = query(n);
        let mut sum = Checksum::default();

        let start = Instant::now();
        let mut rows = conn.query_stream(sql.as_str()).await?;
        while let Some(row) = rows.try_next().await? {
            add_pgengine_row(&mut sum, &row)?;
        }
        let elapsed = start.elapsed();
        drop(rows);
        sum.check(n)?;
        conn.close().await?;
        Ok(Measurement::new(n, elapsed))
    })
}
