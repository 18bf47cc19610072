//! ping: serial `SELECT $1::int4` round trips with a prepared statement, each answer checked
//! against the value sent. What it measures is the per-request cost of a driver — encoding one
//! Bind/Execute/Sync, one write, waking up for the answer, framing and decoding four small
//! messages — on top of the server's own cost and the wake-up latency, which all contenders
//! share. Values are sent and received in binary.
//!
//! Every contender prepares (or, for pgengine, runs once to fill its statement cache) before
//! the clock starts, then sends values 1..=n.

use std::ffi::{CStr, c_char, c_int};
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use pgengine::protocol::frontend;
use tokio_postgres::NoTls;
use tokio_postgres::types::Type;

use crate::{Bench, BenchResult, Contender, Measurement, check_answer, libpq, raw};

/// The same SQL text for every contender.
const SQL: &str = "SELECT $1::int4";

/// The server-side name of the statement, for the contenders that name it themselves.
const STATEMENT: &CStr = c"ping";

/// The int4 type's OID.
const INT4_OID: u32 = 23;

pub fn contenders() -> Vec<Contender> {
    vec![
        Contender::new("pgengine", |bench, n| pgengine(bench, n, None)),
        Contender::new("pgengine-busy-poll", |bench, n| {
            pgengine(bench, n, Some(crate::BUSY_POLL))
        }),
        Contender::new("libpq-prepared", libpq_prepared),
        Contender::new("tokio-postgres", tokio_postgres),
        Contender::new("raw", raw),
    ]
}

/// The value sent in round trip `i` (counting from 1).
fn value(i: u64) -> i32 {
    // Wraps only past 2^31 round trips, far beyond any run.
    i as i32
}

/// `query_one` with a tuple of parameters; the connection's statement cache turns every call
/// after the first into one Bind/Execute/Sync. `busy_poll`: see [`crate::BUSY_POLL`].
fn pgengine(
    bench: &Bench,
    n: u64,
    busy_poll: Option<std::time::Duration>,
) -> BenchResult<Measurement> {
    bench.runtime.block_on(async {
        let mut conn = pgengine::Connection::connect(&bench.config).await?;
        conn.set_busy_poll(busy_poll);
        let row = conn.query_one((SQL, (0i32,))).await?;
        check_answer(0, row.get::<_, i32>(0))?;

        let start = Instant::now();
        for i in 1..=n {
            let sent = value(i);
            let row = conn.query_one((SQL, (sent,))).await?;
            check_answer(sent, row.get::<_, i32>(0))?;
        }
        let elapsed = start.elapsed();
        // The comparison is only fair if every timed query was one Bind/Execute/Sync of the
        // cached statement.
        let stats = conn.stats();
        if stats.parses != 1 || stats.binds != n + 1 || stats.cache_hits != n {
            return Err(format!("pgengine did not use its statement cache: {stats:?}").into());
        }
        conn.close().await?;
        Ok(Measurement::new(n, elapsed))
    })
}

/// PQprepare once, then PQexecPrepared with a binary int4 and a binary result.
fn libpq_prepared(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    let mut conn = libpq::Conn::connect(&bench.conninfo)?;
    conn.prepare(STATEMENT, SQL, &[INT4_OID])?;
    let lengths = [4 as c_int];
    let formats = [1 as c_int];

    let start = Instant::now();
    for i in 1..=n {
        let sent = value(i);
        let param = sent.to_be_bytes();
        let values = [param.as_ptr().cast::<c_char>()];
        let result = conn.exec_prepared(STATEMENT, &values, &lengths, &formats)?;
        check_answer(sent, result.single_int4()?)?;
    }
    let elapsed = start.elapsed();
    Ok(Measurement::new(n, elapsed))
}

/// `prepare_typed` once, then `query_one(&stmt, &[&i])`; its connection task is spawned on the
/// same current_thread runtime.
fn tokio_postgres(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    bench.runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&bench.conninfo, NoTls).await?;
        let connection = tokio::spawn(connection);
        let statement = client.prepare_typed(SQL, &[Type::INT4]).await?;

        let start = Instant::now();
        for i in 1..=n {
            let sent = value(i);
            let row = client.query_one(&statement, &[&sent]).await?;
            check_answer(sent, row.get::<_, i32>(0))?;
        }
        let elapsed = start.elapsed();
        drop(statement);
        drop(client);
        connection.await??;
        Ok(Measurement::new(n, elapsed))
    })
}

/// Parse once, then per round trip one pre-encoded Bind/Execute/Sync with the value patched in,
/// and only framing on the way back: the lower bound.
fn raw(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    bench.runtime.block_on(async {
        let mut client = raw::Client::connect(&bench.config).await?;
        let statement = STATEMENT.to_str()?;
        client.prepare(statement, SQL, &[INT4_OID]).await?;

        // Bind (binary parameter, binary result), Execute, Sync; `value_at` is where the
        // parameter's four bytes sit in the buffer.
        let mut request = BytesMut::new();
        let mut value_at = 0;
        frontend::bind::<pgengine::Error, _>(
            &mut request,
            "",
            statement,
            &[1],
            1,
            |_, buf| {
                value_at = buf.len();
                buf.put_i32(0);
                Ok(false)
            },
            &[1],
        )?;
        frontend::execute(&mut request, "", 0)?;
        frontend::sync(&mut request);

        let start = Instant::now();
        for i in 1..=n {
            let sent = value(i);
            request[value_at..value_at + 4].copy_from_slice(&sent.to_be_bytes());
            client.send(&request).await?;
            let mut got = None;
            client
                .read_until_ready(|tag, body| {
                    // DataRow: column count i16 = 1, length i32 = 4, the value.
                    if tag == b'D' {
                        let value: [u8; 4] = body
                            .get(6..10)
                            .and_then(|v| v.try_into().ok())
                            .filter(|_| body.len() == 10)
                            .ok_or("raw: expected one 4-byte column")?;
                        got = Some(i32::from_be_bytes(value));
                    }
                    Ok(())
                })
                .await?;
            check_answer(sent, got.ok_or("raw: no row in the answer")?)?;
        }
        let elapsed = start.elapsed();
        client.close().await?;
        Ok(Measurement::new(n, elapsed))
    })
}
