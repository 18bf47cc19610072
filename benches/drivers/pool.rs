//! pool: 64 tasks share 8 connections for point selects — pgbench's select-only script,
//! `SELECT abalance FROM pgbench_accounts WHERE aid = $1` with a random aid, on pgbench's own
//! tables at scale 10 (1,000,000 accounts). What it measures is a pool under contention:
//! checkout and return, waking the next waiter, and how well the connections are kept busy.
//!
//! - `pgbench`: `pgbench -n -S -M prepared -c 8 -j 2 -t <size/8>` as a child process (8
//!   connections, 2 threads, no tasks beyond the connections): the reference, in C. Its rate
//!   is the `tps` it reports without initial connection time.
//! - `pgbench-pipeline`: pipelining in C, with the same semantics as `pgengine-pipelined`.
//!   pgbench 17+ (found beside `PGENGINE_LIBPQ18`; skipped without it) in its pipeline mode,
//!   with a script of 8 of the same selects, each followed by its own Sync (`\syncpipeline`):
//!   every query is still its own implicit transaction with its own ReadyForQuery, so the
//!   server does the same work per query as for pgengine-pipelined. 8 connections, up to 8
//!   queries in flight on each, from a client that does little besides.
//! - `deadpool-postgres`: a pool of 8 tokio-postgres clients (fast recycling, no query on
//!   return); each query checks one out, uses its `prepare_cached` statement, returns it.
//! - `tokio-postgres-shared`: 8 clients shared without a pool, task k on client k % 8; the
//!   8 tasks of a client pipeline their requests on its connection.
//! - `pgengine`: `engine.query_one` on an engine whose pool has `max_size(8)`: each query
//!   checks a connection out for itself.
//! - `pgengine-pipelined`: the same with `pipeline(8)`: queries are handed to up to 8 driver
//!   tasks, each writing every query waiting for it in one write on a pooled connection (the
//!   counterpart of `tokio-postgres-shared`). With the default `pipeline_depth` of 16, one
//!   driver takes 16 queries before the next is brought in, so 64 tasks keep about 4 of the
//!   connections busy.
//!
//! The async contenders run 64 tasks on a multi-thread runtime with 2 workers, each task doing
//! its share of the queries in turn, with its own sequence of aids (the same for every
//! contender); each answer is decoded and summed (every abalance is 0 after `pgbench -i`).
//! Before the clock starts, each opens its 8 connections and prepares its statement by running
//! a few queries from every task.

use std::error::Error;
use std::future::Future;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{ManagerConfig, RecyclingMethod};
use pgengine::pool::PoolOptions;
use tokio_postgres::NoTls;
use tokio_postgres::types::Type;

use crate::{Bench, BenchResult, Contender, Measurement, Pg18};

/// The same SQL text as pgbench's built-in select-only script.
const SQL: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";

/// pgbench's scale: 100,000 accounts each.
const SCALE: u32 = 10;
const ACCOUNTS: u64 = 100_000 * SCALE as u64;

const TASKS: u64 = 64;
const CONNECTIONS: usize = 8;

/// Queries each task runs before the clock starts, to open every connection and prepare.
const WARM_QUERIES_PER_TASK: u64 = 4;

/// What a task may fail with: it crosses threads.
type TaskError = Box<dyn Error + Send + Sync>;

/// Initialises pgbench's tables at scale 10 with `pgbench -i`, unless they are there already.
pub fn setup(bench: &Bench, _size: u64) -> BenchResult<()> {
    let accounts = bench.runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&bench.conninfo, NoTls).await?;
        let connection = tokio::spawn(connection);
        let exists = client
            .query_one("SELECT to_regclass('pgbench_accounts') IS NOT NULL", &[])
            .await?
            .get::<_, bool>(0);
        let accounts = if exists {
            client
                .query_one("SELECT count(*) FROM pgbench_accounts", &[])
                .await?
                .get::<_, i64>(0)
        } else {
            0
        };
        drop(client);
        connection.await??;
        Ok::<_, Box<dyn Error>>(accounts)
    })?;
    if accounts == ACCOUNTS as i64 {
        return Ok(());
    }
    println!("# initialising pgbench's tables: pgbench -i -s {SCALE}");
    let output = Command::new(&bench.pgbench)
        .args(["-i", "-q", "-s", &SCALE.to_string(), &bench.conninfo])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run {}: {e}", bench.pgbench.display()))?;
    if !output.status.success() {
        return Err(format!(
            "pgbench -i failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        )
        .into());
    }
    Ok(())
}

pub fn contenders(bench: &Bench) -> Vec<Contender> {
    let mut contenders = vec![Contender::new("pgbench", pgbench)];
    match &bench.pg18 {
        Some(pg18) => {
            let pg18 = pg18.clone();
            contenders.push(Contender::new("pgbench-pipeline", move |b, n| {
                pgbench_pipeline(b, &pg18, n)
            }))
        }
        None => println!(
            "# pgbench-pipeline skipped: it needs pgbench 17+ (\\syncpipeline), looked for beside \
             PGENGINE_LIBPQ18"
        ),
    }
    contenders.extend([
        Contender::new("deadpool-postgres", deadpool_postgres),
        Contender::new("tokio-postgres-shared", tokio_postgres_shared),
        Contender::new("pgengine", |b, n| pgengine(b, n, 0)),
        Contender::new("pgengine-pipelined", |b, n| {
            pgengine(b, n, pipelined_connections())
        }),
    ]);
    contenders
}

/// How many of the pool's 8 connections `pgengine-pipelined` pipelines over: 8 unless
/// `PGENGINE_BENCH_PIPELINE` says otherwise.
fn pipelined_connections() -> usize {
    knob("PGENGINE_BENCH_PIPELINE").unwrap_or(CONNECTIONS)
}

/// A number from the environment, if set.
fn knob(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// `pgbench -S -M prepared -c 8 -j 2`, each client running size/8 transactions.
fn pgbench(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    let per_client = (n / CONNECTIONS as u64).max(1);
    let mut command = Command::new(&bench.pgbench);
    command.args(["-S"]);
    let tps = run_pgbench(command, bench, per_client)?;
    let rows = per_client * CONNECTIONS as u64;
    Ok(Measurement::new(
        rows,
        Duration::from_secs_f64(rows as f64 / tps),
    ))
}

/// Queries in one run of `pgbench-pipeline`'s script.
const PIPELINE_DEPTH: u64 = 8;

/// pgbench's pipeline mode: each run of the script sends 8 selects, each followed by a Sync,
/// before it reads their answers.
fn pgbench_pipeline(bench: &Bench, pg18: &Pg18, n: u64) -> BenchResult<Measurement> {
    let mut script = String::from("\\startpipeline\n");
    for i in 0..PIPELINE_DEPTH {
        script.push_str(&format!(
            "\\set aid random(1, {ACCOUNTS})\n{}\n",
            SQL.replace("$1", ":aid")
        ));
        if i + 1 < PIPELINE_DEPTH {
            // The last one's Sync is \endpipeline's.
            script.push_str("\\syncpipeline\n");
        }
    }
    script.push_str("\\endpipeline\n");
    let path = std::env::temp_dir().join(format!("pgengine-bench-{}.pgbench", std::process::id()));
    std::fs::write(&path, script)?;

    let runs = (n / (CONNECTIONS as u64 * PIPELINE_DEPTH)).max(1);
    let mut command = Command::new(&pg18.pgbench);
    command
        .env("LD_LIBRARY_PATH", &pg18.lib_dir)
        .arg("-f")
        .arg(&path);
    let tps = run_pgbench(command, bench, runs);
    let _ = std::fs::remove_file(&path);
    let rows = runs * CONNECTIONS as u64 * PIPELINE_DEPTH;
    Ok(Measurement::new(
        rows,
        Duration::from_secs_f64(rows as f64 / (tps? * PIPELINE_DEPTH as f64)),
    ))
}

/// Runs `command` (a pgbench, its script already chosen) with 8 clients on 2 threads, each
/// running its script `per_client` times with prepared statements; returns the scripts run
/// per second, without the time spent connecting.
fn run_pgbench(mut command: Command, bench: &Bench, per_client: u64) -> BenchResult<f64> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command
        .args([
            "-n",
            "-M",
            "prepared",
            "-c",
            &CONNECTIONS.to_string(),
            "-j",
            "2",
            "-t",
            &per_client.to_string(),
            &bench.conninfo,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run {program}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "pgbench failed ({}): {}{}",
            output.status,
            stdout.trim_end(),
            String::from_utf8_lossy(&output.stderr).trim_end()
        )
        .into());
    }
    let runs = per_client * CONNECTIONS as u64;
    let processed = format!("number of transactions actually processed: {runs}/{runs}");
    if !stdout.contains(&processed) {
        return Err(format!("pgbench did not process {runs} transactions: {stdout}").into());
    }
    stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")?
                .strip_suffix(" (without initial connection time)")
        })
        .and_then(|tps| tps.parse().ok())
        .ok_or_else(|| format!("no tps in pgbench's output: {stdout}").into())
}

/// Task `task`'s aids: xorshift64*, seeded by the task, in 1..=ACCOUNTS.
struct Aids(u64);

impl Aids {
    fn new(task: u64) -> Aids {
        Aids(0x9E37_79B9_7F4A_7C15 ^ (task + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9))
    }

    fn next(&mut self) -> i32 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) % ACCOUNTS + 1) as i32
    }
}

/// Runs `n` queries from 64 tasks (task k does n/64, plus one if k < n % 64), each calling
/// `query(task, aid)` in turn; returns how long they all took. Every answer must be 0.
async fn run_tasks<F, Fut>(n: u64, query: F) -> BenchResult<Duration>
where
    F: Fn(u64, i32) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<i32, TaskError>> + Send,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let query = query.clone();
            let count = n / TASKS + u64::from(task < n % TASKS);
            tokio::spawn(async move {
                let mut aids = Aids::new(task);
                let mut sum = 0i64;
                for _ in 0..count {
                    sum += i64::from(query(task, aids.next()).await?);
                }
                Ok::<_, TaskError>((count, sum))
            })
        })
        .collect();
    let mut done = 0;
    for task in tasks {
        let (count, sum) = task.await?.map_err(|e| e.to_string())?;
        if sum != 0 {
            return Err(format!("abalance summed to {sum}, expected 0 after pgbench -i").into());
        }
        done += count;
    }
    let elapsed = start.elapsed();
    if done != n {
        return Err(format!("{done} queries done, expected {n}").into());
    }
    Ok(elapsed)
}

fn deadpool_postgres(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    bench.multi_runtime.block_on(async {
        let config: tokio_postgres::Config = bench.conninfo.parse()?;
        let manager = deadpool_postgres::Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(CONNECTIONS)
            .build()?;
        let query = move |_task: u64, aid: i32| {
            let pool = pool.clone();
            async move {
                let client = pool.get().await?;
                let statement = client.prepare_cached(SQL).await?;
                let row = client.query_one(&statement, &[&aid]).await?;
                Ok::<_, TaskError>(row.try_get::<_, i32>(0)?)
            }
        };
        run_tasks(TASKS * WARM_QUERIES_PER_TASK, query.clone()).await?;

        let elapsed = run_tasks(n, query).await?;
        Ok(Measurement::new(n, elapsed))
    })
}

fn tokio_postgres_shared(bench: &Bench, n: u64) -> BenchResult<Measurement> {
    bench.multi_runtime.block_on(async {
        let mut clients = Vec::new();
        let mut connections = Vec::new();
        for _ in 0..CONNECTIONS {
            let (client, connection) = tokio_postgres::connect(&bench.conninfo, NoTls).await?;
            connections.push(tokio::spawn(connection));
            let statement = client.prepare_typed(SQL, &[Type::INT4]).await?;
            clients.push((client, statement));
        }
        let clients = Arc::new(clients);
        let query = {
            let clients = clients.clone();
            move |task: u64, aid: i32| {
                let clients = clients.clone();
                async move {
                    let (client, statement) = &clients[task as usize % CONNECTIONS];
                    let row = client.query_one(statement, &[&aid]).await?;
                    Ok::<_, TaskError>(row.try_get::<_, i32>(0)?)
                }
            }
        };
        run_tasks(TASKS * WARM_QUERIES_PER_TASK, query.clone()).await?;

        let elapsed = run_tasks(n, query).await?;
        drop(clients);
        for connection in connections {
            connection.await??;
        }
        Ok(Measurement::new(n, elapsed))
    })
}

/// `engine.query_one` on a pool of 8, with `pipeline` connections carrying pipelined queries
/// (0: none, every query checks a connection out).
fn pgengine(bench: &Bench, n: u64, pipeline: usize) -> BenchResult<Measurement> {
    bench.multi_runtime.block_on(async {
        let engine = pgengine::PostgresEngine::new(bench.config.clone());
        let mut options = PoolOptions::default()
            .max_size(CONNECTIONS)
            .pipeline(pipeline);
        if let Some(depth) = knob("PGENGINE_BENCH_PIPELINE_DEPTH") {
            options = options.pipeline_depth(depth);
        }
        engine.start_connection_pool(options).await?;
        let query = {
            let engine = engine.clone();
            move |_task: u64, aid: i32| {
                let engine = engine.clone();
                async move {
                    let row = engine.query_one((SQL, (aid,))).await?;
                    Ok::<_, TaskError>(row.try_get::<_, i32>(0)?)
                }
            }
        };
        run_tasks(TASKS * WARM_QUERIES_PER_TASK, query.clone()).await?;
        // Pipelined drivers hold a connection only while they have work, so only checkout per
        // query is sure to have opened all 8.
        let size = engine.pool_stats().map_or(0, |s| s.size);
        if pipeline == 0 && size != CONNECTIONS {
            return Err(
                format!("pgengine's pool opened {size} connections, not {CONNECTIONS}").into(),
            );
        }

        let elapsed = run_tasks(n, query).await?;
        engine.close_connection_pool().await?;
        Ok(Measurement::new(n, elapsed))
    })
}
