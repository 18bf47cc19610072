//! Drivers side by side: pgengine against libpq, tokio-postgres and a raw hand-written client,
//! on the same server, over the same transport, in interleaved rounds.
//!
//! ```text
//! cargo bench --bench drivers              # every workload
//! cargo bench --bench drivers -- ping      # only the named workloads
//! ```
//!
//! Each workload is a list of contenders (one function each) and a baseline to compare with.
//! After an untimed warm-up of every contender, the harness runs rounds; each round runs every
//! contender once, starting one further along the list each time, so slow drift of the machine
//! (a noisy neighbour, the server's caches, CPU frequency) falls on all of them alike. Every
//! measurement opens its own connection and times only the work, never connecting or preparing.
//! Per contender the median over the rounds is reported, because run-to-run noise on this kind
//! of VM is about ±25% and one outlier must not decide a comparison.
//!
//! Every single measurement is also printed as one line for scripts:
//! `workload=ping driver=raw rows=20000 secs=0.312000 rate=64102.6`.
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
//! - `PGENGINE_BENCH_ROUNDS`: rounds instead of 7.
//! - `PGENGINE_BENCH_WARMUP`: warm-up size per contender instead of a tenth of the size; 0 skips
//!   the warm-up (for instruction counts that scale exactly with the size).
//! - `PGENGINE_BENCH_DRIVERS`: a comma-separated list of the contenders to run, e.g. to profile
//!   one of them under `valgrind --tool=callgrind`.
//!
//! Async contenders run on one tokio `current_thread` runtime, driver tasks included (the
//! tokio-postgres connection task is spawned on it), so no contender gets a second thread.
//! This is a program that prints: there are no timing assertions anywhere.

#[path = "drivers/libpq.rs"]
mod libpq;
#[path = "drivers/ping.rs"]
mod ping;
#[path = "drivers/raw.rs"]
mod raw;

use std::env;
use std::error::Error;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
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
    /// The contender the others are compared with (besides `raw`, the lower bound).
    baseline: &'static str,
    contenders: fn() -> Vec<Contender>,
}

/// The workloads, in the order a full run takes them. A new one is a module with a
/// `contenders()` function, plus an entry here.
const WORKLOADS: &[Workload] = &[Workload {
    name: "ping",
    description: "serial `SELECT $1::int4` round trips with a prepared statement, binary int4 \
                  in and out, each answer checked",
    unit: "queries/s",
    default_size: 20_000,
    baseline: "libpq-prepared",
    contenders: ping::contenders,
}];

/// The name every workload compares with as its lower bound (for async clients; see `raw`).
const RAW: &str = "raw";

/// One driver's way of doing a workload.
pub struct Contender {
    /// Printed as `driver=<name>`.
    pub driver: &'static str,
    /// Opens its own connection(s), does `size` units of work and says how long the work took.
    pub run: fn(&Bench, u64) -> BenchResult<Measurement>,
}

/// What one run of a contender did, in how long.
pub struct Measurement {
    /// Units of work done (round trips, rows, transactions).
    pub rows: u64,
    /// The time the work took, connecting and preparing excluded.
    pub elapsed: Duration,
}

impl Measurement {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64()
    }
}

/// What every contender needs: where the server is, and the runtime for async drivers.
pub struct Bench {
    /// For libpq, tokio-postgres and pgengine alike: `key=value` or a URL.
    pub conninfo: String,
    /// The same settings parsed by pgengine, for pgengine and the raw client.
    pub config: pgengine::Config,
    /// The one `current_thread` runtime every async contender runs on.
    pub runtime: Runtime,
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
    rounds: usize,
    warmup: Option<u64>,
    drivers: Option<Vec<String>>,
    /// As asked for; resolved against the server in `run`.
    placement: Option<Placement>,
}

impl Settings {
    fn from_env() -> BenchResult<Settings> {
        let rounds = env_number("PGENGINE_BENCH_ROUNDS")?.unwrap_or(7);
        if rounds == 0 {
            return Err("PGENGINE_BENCH_ROUNDS must be at least 1".into());
        }
        Ok(Settings {
            size: env_number("PGENGINE_BENCH_ITERS")?,
            rounds: rounds as usize,
            warmup: env_number("PGENGINE_BENCH_WARMUP")?,
            drivers: env::var("PGENGINE_BENCH_DRIVERS")
                .ok()
                .filter(|s| !s.is_empty())
                .map(|s| s.split(',').map(|d| d.trim().to_owned()).collect()),
            placement: Placement::from_env()?,
        })
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
            let conninfo = cluster.socket_conninfo(TempCluster::SUPERUSER);
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
    let bench = Bench {
        config: pgengine::Config::parse(&conninfo)?,
        conninfo,
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    };
    print_setup(&bench, &machine, placement)?;

    for workload in workloads {
        run_workload(&bench, workload, &settings)?;
    }
    drop(cluster);
    Ok(())
}

/// The workloads named on the command line, or all of them. `cargo bench` adds `--bench` to the
/// arguments; flags are not ours, so they are skipped.
fn selected_workloads() -> BenchResult<Vec<&'static Workload>> {
    let names: Vec<String> = env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if names.is_empty() {
        return Ok(WORKLOADS.iter().collect());
    }
    names
        .iter()
        .map(|name| {
            WORKLOADS.iter().find(|w| w.name == name).ok_or_else(|| {
                let known: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
                format!(
                    "unknown workload {name:?}; known workloads: {}",
                    known.join(", ")
                )
                .into()
            })
        })
        .collect()
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
    println!("# libpq: {}", libpq::version());
    println!("# placement: {}", placement.describe());
    println!(
        "# async contenders: one tokio current_thread runtime (the tokio-postgres connection \
         task runs on it); libpq is synchronous, on the same thread"
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

fn run_workload(bench: &Bench, workload: &Workload, settings: &Settings) -> BenchResult<()> {
    let size = settings.size.unwrap_or(workload.default_size).max(1);
    let warmup = settings.warmup.unwrap_or(size / 10);
    let mut contenders = (workload.contenders)();
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
        "# {}: {}\n# size {size} per measurement; {} round(s), rotating order; warm-up {warmup} \
         per contender",
        workload.name, workload.description, settings.rounds
    );
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

    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); contenders.len()];
    for round in 0..settings.rounds {
        for k in 0..contenders.len() {
            let i = (round + k) % contenders.len();
            let contender = &contenders[i];
            let m = (contender.run)(bench, size).map_err(|e| failed(workload, contender, e))?;
            println!(
                "workload={} driver={} rows={} secs={:.6} rate={:.1}",
                workload.name,
                contender.driver,
                m.rows,
                m.elapsed.as_secs_f64(),
                m.rate()
            );
            rates[i].push(m.rate());
        }
    }
    print!("{}", summary(workload, &contenders, &rates));
    Ok(())
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

/// The table of medians, with each one's ratio to the baseline and to `raw` (blank when that
/// contender did not run).
fn summary(workload: &Workload, contenders: &[Contender], rates: &[Vec<f64>]) -> String {
    let medians: Vec<f64> = rates.iter().map(|r| median(r)).collect();
    let median_of = |driver: &str| {
        contenders
            .iter()
            .position(|c| c.driver == driver)
            .map(|i| medians[i])
    };
    let baseline = median_of(workload.baseline);
    let raw = median_of(RAW);
    let ratio = |m: f64, of: Option<f64>| of.map_or_else(String::new, |b| format!("{:.2}x", m / b));

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n# {}: median of {} round(s) ({})",
        workload.name,
        rates.first().map_or(0, Vec::len),
        workload.unit
    );
    let _ = writeln!(
        out,
        "{:<16} {:>12} {:>9} {:>12} {:>12} {:>10} {:>8}",
        "driver",
        "median",
        "µs/unit",
        "min",
        "max",
        format!("vs {}", short(workload.baseline)),
        "vs raw"
    );
    for (i, contender) in contenders.iter().enumerate() {
        let m = medians[i];
        let min = rates[i].iter().copied().fold(f64::INFINITY, f64::min);
        let max = rates[i].iter().copied().fold(0.0, f64::max);
        let _ = writeln!(
            out,
            "{:<16} {:>12.1} {:>9.2} {:>12.1} {:>12.1} {:>10} {:>8}",
            contender.driver,
            m,
            1e6 / m,
            min,
            max,
            ratio(m, baseline),
            ratio(m, raw)
        );
    }
    out
}

/// A column header's short name for a baseline: `libpq-prepared` → `libpq`.
fn short(driver: &str) -> &str {
    driver.split('-').next().unwrap_or(driver)
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
