//! Load on `taskhistory serve` (issue 27, "How it is measured"): Server-Sent Events clients,
//! 4 per user, connected to one server while 8 writers save through the library as fast as
//! they can, in phases of growing client counts in the same run (by default 0, 10, 1,000 and
//! 10,000 clients; 10,000 clients are 2,500 users).
//!
//! Every write must reach each of its user's clients exactly once, and nothing else any
//! client: the bench fails (exit status 1, the counts on stderr) on any missing, duplicate,
//! foreign or unexpected event, or a stream that ended, in any phase. It never fails on a
//! timing: it prints figures and ratios against the baseline of the same run.
//!
//! For each phase it prints the writers' saves per second; the database's event-log reads
//! per second (and the rows they returned), counted by `pg_stat_statements` on a PostgreSQL
//! cluster the bench starts for itself (the statements whose text contains
//! `pg_visible_in_snapshot`, over the writers' window); the delivery latency p50/p99 (from
//! the moment a save returned to the moment a client parsed its event); and the server's
//! resident memory per connected client.
//!
//! Over the same window it prints where the CPU went, in CPU seconds per second (1.00 is
//! one core kept busy), from `/proc/<pid>/stat` (utime + stime): the `serve` process
//! (formatting and sending the events); the client process (parsing them); the bench's
//! PostgreSQL cluster (its postmaster, found as the parent of the bench's own backend, and
//! all its children, the backends of the writers and of the server among them); and the
//! bench process itself (the writers). Then their sum as a share of the machine's cores,
//! next to the share busy over all the machine's processes (`/proc/stat`): when the latter
//! is near 100% the machine is saturated, and when it is well above the former something
//! else ran beside the bench.
//!
//! Then the ratios issue 27's targets are about: writers with the most clients / with none
//! (target >= 0.9), log reads per second with the most clients / with the fewest (target
//! <= 1.5), delivery p99 at 1,000 clients (target < 100 ms); and, with no target, writers
//! with the most clients / with the fewest (both phases' users all watched).
//!
//! The clients run in a process of their own (this binary again, with
//! `SERVE_BENCH_CLIENT_PROCESS` set, driven over its stdin and stdout as JSON lines), so that
//! parsing 10,000 streams does not slow the bench's writers: raw HTTP/1.1 over tokio
//! `TcpStream`s, parsing `data:` lines. The bench raises its open-files limit (soft up to
//! hard), which the server and the client process inherit. Times are compared across the
//! two processes on the system clock (one machine).
//!
//! ```sh
//! cargo bench -p taskhistory-cli --bench serve            # 0, 10, 1,000, 10,000 clients, 10 s each
//! BENCH_SHORT=1 cargo bench -p taskhistory-cli --bench serve                 # 0 and 200, 2 s
//! SERVE_CLIENTS=200 SERVE_SECS=2 cargo bench -p taskhistory-cli --bench serve  # 0 and 200 (CI)
//! SERVE_PHASES=0,1000 SERVE_SECS=5 cargo bench -p taskhistory-cli --bench serve
//! ```
//!
//! Also `SERVE_WRITERS` (8) and `SERVE_SETTLE_SECS` (60: how long, after the writes, the
//! clients may take to receive them all before the missing ones are counted missing).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use taskhistory_core::{TaskHistoryStore, TaskStepResult};
use taskhistory_postgres::{PgConfig, PgTaskHistoryStore, SslMode};
use taskhistory_testing::OwnServer;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};

#[path = "../tests/common/mod.rs"]
mod common;
use common::ADMIN;

/// Set in the environment of the client process (this binary, run again by the bench).
const CLIENT_PROCESS: &str = "SERVE_BENCH_CLIENT_PROCESS";
const CLIENTS_PER_USER: usize = 4;
/// Users the writers write to when no client watches (phase 0).
const USERS_WITHOUT_CLIENTS: usize = 250;
/// Streams the client process opens at once (the rest wait their turn).
const CONNECTING_AT_ONCE: usize = 256;
/// The bench's schema on its own cluster.
const SCHEMA: &str = "bench";

fn main() {
    if std::env::var_os(CLIENT_PROCESS).is_some() {
        clients::main();
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // Everything the bench started (cluster, server, client process) is dropped, so stopped,
    // when `run` returns, before the exit.
    let failure = runtime.block_on(run());
    drop(runtime);
    if let Err(e) = failure {
        eprintln!("serve bench failed: {e}");
        std::process::exit(1);
    }
}

/// The system clock in nanoseconds: comparable across the bench and its client process.
fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn env(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What to run: the client count of each phase, and for how long the writers write.
struct Plan {
    phases: Vec<usize>,
    secs: u64,
    writers: usize,
    settle: Duration,
}

fn plan() -> Result<Plan, String> {
    let short = std::env::var("BENCH_SHORT").is_ok_and(|v| v == "1");
    let phases = if let Ok(list) = std::env::var("SERVE_PHASES") {
        list.split(',')
            .map(|n| n.trim().replace('_', "").parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("SERVE_PHASES={list:?} is not a list of client counts: {e}"))?
    } else if let Ok(clients) = std::env::var("SERVE_CLIENTS") {
        let n = clients
            .parse()
            .map_err(|e| format!("SERVE_CLIENTS={clients:?}: {e}"))?;
        vec![0, n]
    } else if short {
        vec![0, 200]
    } else {
        vec![0, 10, 1_000, 10_000]
    };
    if phases.is_empty() {
        return Err("SERVE_PHASES is empty".into());
    }
    Ok(Plan {
        phases,
        secs: env("SERVE_SECS", if short { 2 } else { 10 }),
        writers: env("SERVE_WRITERS", 8) as usize,
        settle: Duration::from_secs(env("SERVE_SETTLE_SECS", 60)),
    })
}

/// Raises this process's open-files limit to its hard limit (the server and the client
/// process inherit it): the new soft limit.
fn raise_open_files_limit() -> Result<u64, String> {
    rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| format!("raising the open-files limit (RLIMIT_NOFILE): {e}"))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// A process's CPU times from `/proc/<pid>/stat`, in clock ticks.
struct ProcTimes {
    /// Its parent's pid (field 4).
    ppid: u32,
    /// Its own user and system time, all its threads (fields 14 and 15).
    own: u64,
    /// Its children's that it has waited for (fields 16 and 17).
    waited_children: u64,
}

fn proc_times(pid: &str) -> Option<ProcTimes> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2, the command name, is in parentheses and may hold spaces: count from the
    // last `)`, which ends it. Field n of proc(5) is then at n - 3.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    Some(ProcTimes {
        ppid: u32::try_from(field(4)?).ok()?,
        own: field(14)? + field(15)?,
        waited_children: field(16)? + field(17)?,
    })
}

/// The processes whose CPU time each phase measures over its writers' window.
struct CpuProbe {
    serve: u32,
    clients: Option<u32>,
    postmaster: u32,
    /// The unit of `/proc`'s times (`getconf CLK_TCK`, 100 on Linux).
    ticks_per_sec: f64,
}

/// CPU time used so far, in clock ticks.
#[derive(Clone, Copy)]
struct CpuTicks {
    serve: u64,
    clients: u64,
    postgres: u64,
    bench: u64,
    /// All the machine's processes, from `/proc/stat`: busy, and busy plus idle.
    machine_busy: u64,
    machine_all: u64,
}

/// CPU seconds used per second of a phase's window (1.0 is one core kept busy).
#[derive(Clone, Copy, Default)]
struct CpuUse {
    serve: f64,
    clients: f64,
    postgres: f64,
    bench: f64,
    /// The share of all the machine's cores busy, whatever process used them.
    machine_busy: f64,
}

impl CpuProbe {
    /// The postmaster is the parent of the backend serving `stats`, the bench's own
    /// connection to its cluster.
    async fn new(
        serve: u32,
        clients: Option<u32>,
        stats: &tokio_postgres::Client,
    ) -> Result<CpuProbe, String> {
        let backend: i32 = stats
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(|e| format!("SELECT pg_backend_pid(): {e}"))?
            .get(0);
        let postmaster = proc_times(&backend.to_string())
            .ok_or_else(|| format!("no /proc/{backend}/stat for the bench's own backend"))?
            .ppid;
        let ticks_per_sec = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0);
        Ok(CpuProbe {
            serve,
            clients,
            postmaster,
            ticks_per_sec,
        })
    }

    fn sample(&self) -> CpuTicks {
        let own = |pid: u32| proc_times(&pid.to_string()).map_or(0, |t| t.own);
        // The postmaster, what it has waited for of its exited children, and its live
        // children (backends, checkpointer, walwriter, autovacuum...): all of the cluster.
        // A backend that exits between the two samples of a window is counted only if the
        // postmaster has waited for it by the second (nearly always: it reaps them at once),
        // with what it had used before the first sample subtracted; at worst its last
        // moments are missed.
        let mut postgres =
            proc_times(&self.postmaster.to_string()).map_or(0, |t| t.own + t.waited_children);
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            if let Some(t) = proc_times(pid).filter(|t| t.ppid == self.postmaster) {
                postgres += t.own;
            }
        }
        // The `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal ...
        let machine: Vec<u64> = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned))
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .take(8)
                    .filter_map(|f| f.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let machine = |i: usize| machine.get(i).copied().unwrap_or(0);
        let machine_busy =
            machine(0) + machine(1) + machine(2) + machine(5) + machine(6) + machine(7);
        CpuTicks {
            serve: own(self.serve),
            clients: self.clients.map_or(0, own),
            postgres,
            bench: own(std::process::id()),
            machine_busy,
            machine_all: machine_busy + machine(3) + machine(4),
        }
    }

    /// What was used from `before` to `after`, `secs` apart, per second.
    fn per_sec(&self, before: CpuTicks, after: CpuTicks, secs: f64) -> CpuUse {
        let rate = |b: u64, a: u64| a.saturating_sub(b) as f64 / self.ticks_per_sec / secs;
        CpuUse {
            serve: rate(before.serve, after.serve),
            clients: rate(before.clients, after.clients),
            postgres: rate(before.postgres, after.postgres),
            bench: rate(before.bench, after.bench),
            machine_busy: after.machine_busy.saturating_sub(before.machine_busy) as f64
                / after.machine_all.saturating_sub(before.machine_all).max(1) as f64,
        }
    }
}

/// Whatever a blocking setup step panicked with, as a message.
fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic".into()),
        Err(e) => e.to_string(),
    }
}

/// Starts, once the calling process is gone however it ended, `kill <pid>`: a server the
/// bench started never outlives it.
fn kill_when_gone(pid: u32) {
    let me = std::process::id();
    let _ = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill {pid} 2>/dev/null"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// The one place where the `taskhistory serve` command line is built: its caps on
/// connections and streams sized for the largest phase.
fn serve_command(database_url: &str, most_clients: usize) -> std::process::Command {
    let mut command = common::bin();
    command
        .env("TASKHISTORY_SECRET", common::SECRET)
        .args(["--database-url", database_url, "--schema", SCHEMA])
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--max-connections", &(most_clients + 100).to_string()])
        .args(["--max-streams", &most_clients.max(1).to_string()])
        .args(["--max-streams-per-user", &CLIENTS_PER_USER.to_string()]);
    command
}

/// The `taskhistory serve` process, killed when dropped.
struct Serve {
    child: std::process::Child,
    base: String,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client process, driven by one JSON line per request and per answer; killed when
/// dropped (and it exits by itself when its standard input closes).
struct ClientProcess {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: Lines<BufReader<tokio::process::ChildStdout>>,
}

impl ClientProcess {
    fn start() -> Result<ClientProcess, String> {
        let exe = std::env::current_exe().map_err(|e| format!("this bench's path: {e}"))?;
        let mut child = tokio::process::Command::new(exe)
            .env(CLIENT_PROCESS, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting the client process: {e}"))?;
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Ok(ClientProcess {
            child,
            stdin,
            stdout,
        })
    }

    async fn ask(&mut self, request: Value) -> Result<Value, String> {
        let gone = |e: std::io::Error| format!("the client process is gone: {e}");
        self.stdin
            .write_all(format!("{request}\n").as_bytes())
            .await
            .map_err(gone)?;
        self.stdin.flush().await.map_err(gone)?;
        let line = self
            .stdout
            .next_line()
            .await
            .map_err(gone)?
            .ok_or_else(|| {
                format!(
                    "the client process exited ({:?}) answering {request}",
                    self.child.try_wait()
                )
            })?;
        serde_json::from_str(&line).map_err(|e| format!("the client process said {line:?}: {e}"))
    }
}

/// An event's identity: user, task, step.
type Key = (String, String, i64);

/// What one phase measured.
struct Phase {
    clients: usize,
    users: usize,
    connect_secs: f64,
    saves: usize,
    write_secs: f64,
    log_reads: i64,
    log_rows: i64,
    /// Over the writers' window, like `saves` and `log_reads`.
    cpu: CpuUse,
    expected: usize,
    delivered: usize,
    exact_clients: usize,
    inexact: Vec<String>,
    counts: [usize; 5],
    latencies_ns: Vec<u64>,
    settle_secs: f64,
    rss_connected: u64,
    rss_after: u64,
}

impl Phase {
    fn saves_per_sec(&self) -> f64 {
        self.saves as f64 / self.write_secs
    }
    fn reads_per_sec(&self) -> f64 {
        self.log_reads as f64 / self.write_secs
    }
    fn p(&self, q: f64) -> f64 {
        let l = &self.latencies_ns;
        if l.is_empty() {
            return f64::NAN;
        }
        l[((l.len() - 1) as f64 * q).round() as usize] as f64 / 1e6
    }
}

async fn run() -> Result<(), String> {
    let plan = plan()?;
    let open_files = raise_open_files_limit()?;
    let most = plan.phases.iter().copied().max().unwrap_or(0);
    if most as u64 + 200 > open_files {
        return Err(format!(
            "{most} clients need more open files than the limit allows ({open_files}; raise \
             the hard limit, e.g. ulimit -Hn)"
        ));
    }
    eprintln!(
        "serve bench: phases {:?} clients, {} writers, {} s each; open files limit {open_files}",
        plan.phases, plan.writers, plan.secs
    );

    // The bench's own cluster, counting statements; stopped when dropped, or when this
    // process exits however it ends.
    let cluster = tokio::task::spawn_blocking(|| {
        OwnServer::start(&[
            "shared_preload_libraries=pg_stat_statements",
            "max_connections=200",
        ])
    })
    .await
    .map_err(|e| format!("starting a PostgreSQL cluster: {}", panic_message(e)))?;
    let url = cluster.url();
    let (stats, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connecting to the bench's cluster: {e}"))?;
    tokio::spawn(connection);
    stats
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
        .map_err(|e| format!("CREATE EXTENSION pg_stat_statements: {e}"))?;
    let config = PgConfig::from_url(&url)
        .map_err(|e| format!("the cluster's URL: {e}"))?
        .ssl_mode(SslMode::Disable)
        .schema(SCHEMA)
        .pool_size(1, 8)
        .pool_timeout(Duration::from_secs(20));
    let store = PgTaskHistoryStore::connect(config)
        .await
        .map_err(|e| format!("connecting the writers' store: {e}"))?;
    store
        .init_database_schema()
        .await
        .map_err(|e| format!("migrating the bench's schema: {e}"))?;

    let command = serve_command(&url, most);
    let (child, base, stderr) = tokio::task::spawn_blocking(move || common::serving(command))
        .await
        .map_err(|e| format!("starting taskhistory serve: {}", panic_message(e)))?;
    kill_when_gone(child.id());
    let serve = Serve {
        child,
        base,
        stderr,
    };
    let pid = serve.child.id();
    let mut clients = if most > 0 {
        Some(ClientProcess::start()?)
    } else {
        None
    };
    let cpu = CpuProbe::new(pid, clients.as_ref().and_then(|c| c.child.id()), &stats).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = rss_kib(pid);

    let mut phases = Vec::new();
    for (index, &n) in plan.phases.iter().enumerate() {
        let phase = match run_phase(
            &plan,
            index,
            n,
            &store,
            &stats,
            &serve,
            &cpu,
            clients.as_mut(),
        )
        .await
        {
            Ok(phase) => phase,
            Err(e) => {
                // What the phases before it measured, then why this one could not.
                print_tables(&plan, &phases, idle_rss);
                return Err(format!("with {n} clients: {e}"));
            }
        };
        eprintln!(
            "serve bench: {n} clients: {:.0} saves/s, {:.0} log reads/s{}",
            phase.saves_per_sec(),
            phase.reads_per_sec(),
            if n == 0 {
                String::new()
            } else {
                format!(
                    ", p99 {:.1} ms, {} of {n} clients exact",
                    phase.p(0.99),
                    phase.exact_clients
                )
            }
        );
        phases.push(phase);
    }
    print_tables(&plan, &phases, idle_rss);

    drop(clients.take());
    drop(serve);
    store.close().await;
    drop(stats);
    drop(cluster);
    let failed: Vec<String> = phases
        .iter()
        .filter(|p| !p.inexact.is_empty())
        .map(|p| {
            let [missing, duplicates, foreign, unexpected, ended] = p.counts;
            format!(
                "with {} clients, {} of them did not receive exactly their user's writes \
                 ({missing} missing, {duplicates} duplicates, {foreign} of another user, \
                 {unexpected} not expected; {ended} streams ended early). First clients: {}",
                p.clients,
                p.inexact.len(),
                p.inexact
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("\n"))
    }
}

/// Event-log reads since the last reset: calls of the statements that read the log (their
/// text has `pg_visible_in_snapshot`), and the rows they returned.
async fn log_reads(stats: &tokio_postgres::Client) -> Result<(i64, i64), String> {
    let row = stats
        .query_one(
            "SELECT coalesce(sum(calls), 0)::int8, coalesce(sum(rows), 0)::int8 \
             FROM pg_stat_statements \
             WHERE query LIKE '%pg\\_visible\\_in\\_snapshot%' \
               AND query NOT LIKE '%pg\\_stat\\_statements%'",
            &[],
        )
        .await
        .map_err(|e| format!("reading pg_stat_statements: {e}"))?;
    Ok((row.get(0), row.get(1)))
}

#[allow(clippy::too_many_arguments)]
async fn run_phase(
    plan: &Plan,
    index: usize,
    n: usize,
    store: &PgTaskHistoryStore,
    stats: &tokio_postgres::Client,
    serve: &Serve,
    cpu: &CpuProbe,
    mut clients: Option<&mut ClientProcess>,
) -> Result<Phase, String> {
    // Users of this phase alone: earlier phases' writes are nobody's business here.
    let users = if n == 0 {
        USERS_WITHOUT_CLIENTS
    } else {
        n.div_ceil(CLIENTS_PER_USER)
    };
    let user = move |i: usize| format!("p{index}u{i}");
    let pid = serve.child.id();

    // Connect: each client's stream is open (its response's head arrived) at connected_at.
    let mut connected_at: Vec<u64> = Vec::new();
    let mut connect_secs = 0.0;
    if let (Some(process), true) = (clients.as_deref_mut(), n > 0) {
        let answer = process
            .ask(json!({"cmd": "open", "base": serve.base, "token": ADMIN,
                        "prefix": format!("p{index}u"), "clients": n, "users": users}))
            .await?;
        let refused: Vec<String> = serde_json::from_value(answer["refused"].clone())
            .map_err(|e| format!("the client process's answer: {e}"))?;
        if !refused.is_empty() {
            return Err(format!(
                "{} of {n} clients could not open their stream: {}; the server said: {}",
                refused.len(),
                refused
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; "),
                serve.stderr.lock().unwrap()
            ));
        }
        connected_at = serde_json::from_value(answer["connected_at"].clone())
            .map_err(|e| format!("the client process's answer: {e}"))?;
        connect_secs = answer["secs"].as_f64().unwrap_or(0.0);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = rss_kib(pid);

    // The writers: each write's key, when its save began and when it was acknowledged.
    stats
        .batch_execute("SELECT pg_stat_statements_reset()")
        .await
        .map_err(|e| format!("pg_stat_statements_reset(): {e}"))?;
    let saved: Arc<Mutex<HashMap<Key, (u64, u64)>>> = Arc::default();
    let cpu_before = cpu.sample();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(plan.secs);
    let mut writing = Vec::new();
    for w in 0..plan.writers {
        let (store, saved, writers) = (store.clone(), saved.clone(), plan.writers);
        writing.push(tokio::spawn(async move {
            let mut i = 0i64;
            while Instant::now() < deadline {
                let user = user((w + i as usize * writers) % users);
                let task = format!("w{w}");
                let step = TaskStepResult::running("s", json!({"i": i}), "load");
                let began = wall_ns();
                store
                    .save_task_history(&user, &task, i as i32, &step)
                    .await
                    .map_err(|e| format!("a writer's save failed: {e}"))?;
                saved
                    .lock()
                    .unwrap()
                    .insert((user, task, i), (began, wall_ns()));
                i += 1;
            }
            Ok::<(), String>(())
        }));
    }
    for w in writing {
        w.await
            .map_err(|e| format!("a writer: {}", panic_message(e)))??;
    }
    let write_secs = started.elapsed().as_secs_f64();
    let cpu_used = cpu.per_sec(cpu_before, cpu.sample(), write_secs);
    let (log_reads, log_rows) = log_reads(stats).await?;
    let saved = std::mem::take(&mut *saved.lock().unwrap());

    let mut phase = Phase {
        clients: n,
        users,
        connect_secs,
        saves: saved.len(),
        write_secs,
        log_reads,
        log_rows,
        cpu: cpu_used,
        expected: 0,
        delivered: 0,
        exact_clients: n,
        inexact: Vec::new(),
        counts: [0; 5],
        latencies_ns: Vec::new(),
        settle_secs: 0.0,
        rss_connected,
        rss_after: rss_kib(pid),
    };
    let Some(process) = clients.filter(|_| n > 0) else {
        return Ok(phase);
    };

    // Each client must receive, exactly once, every write of its user whose save began
    // after its stream was open (all of them here: the writers start once every client is
    // connected), and nothing else: no other user's event, no write acknowledged before it
    // connected, nothing that was not written.
    let mut by_user: HashMap<&str, Vec<(&Key, u64)>> = HashMap::new();
    for (key, (began, _)) in &saved {
        by_user
            .entry(key.0.as_str())
            .or_default()
            .push((key, *began));
    }
    let expected_per_client: Vec<HashSet<&Key>> = (0..n)
        .map(|c| {
            by_user
                .get(user(c % users).as_str())
                .map(|writes| {
                    writes
                        .iter()
                        .filter(|(_, began)| *began >= connected_at[c])
                        .map(|(key, _)| *key)
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect();
    phase.expected = expected_per_client.iter().map(HashSet::len).sum();
    let settle = Instant::now();
    loop {
        let answer = process.ask(json!({"cmd": "counts"})).await?;
        let counts: Vec<usize> = serde_json::from_value(answer["counts"].clone())
            .map_err(|e| format!("the client process's answer: {e}"))?;
        let done = counts
            .iter()
            .zip(&expected_per_client)
            .all(|(got, want)| *got >= want.len());
        if done || settle.elapsed() > plan.settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    phase.settle_secs = settle.elapsed().as_secs_f64();
    // A moment more, so a late duplicate or stray event is seen too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    phase.rss_after = rss_kib(pid);
    // The client process closes this phase's streams and hands over what they received:
    // per client, [user, task, step, parsed at (ns)] and whether its stream ended.
    let answer = process.ask(json!({"cmd": "close"})).await?;
    let received: Vec<Vec<(String, String, i64, u64)>> =
        serde_json::from_value(answer["events"].clone())
            .map_err(|e| format!("the client process's answer: {e}"))?;
    let ended: Vec<bool> = serde_json::from_value(answer["ended"].clone())
        .map_err(|e| format!("the client process's answer: {e}"))?;

    let [mut missing, mut duplicates, mut foreign, mut unexpected] = [0usize; 4];
    for (c, events) in received.into_iter().enumerate() {
        let user = user(c % users);
        let want = &expected_per_client[c];
        let mut seen = HashSet::new();
        let (mut c_dup, mut c_foreign, mut c_unexpected) = (0, 0, 0);
        for (u, task, step, at) in events {
            let key = (u, task, step);
            if key.0 != user {
                c_foreign += 1;
            } else if saved
                .get(&key)
                .is_none_or(|(_, acked)| *acked < connected_at[c])
            {
                // Not a write of this bench, or one acknowledged before the client
                // connected.
                c_unexpected += 1;
            }
            if !seen.insert(key.clone()) {
                c_dup += 1;
            } else if want.contains(&key) {
                phase.latencies_ns.push(at.saturating_sub(saved[&key].1));
            }
        }
        let c_missing = want.iter().filter(|k| !seen.contains(**k)).count();
        if c_dup + c_foreign + c_unexpected + c_missing > 0 || ended[c] {
            phase.inexact.push(format!(
                "client {c} ({user}): {c_missing} missing, {c_dup} duplicates, \
                 {c_foreign} of another user, {c_unexpected} not expected{}",
                if ended[c] { ", its stream ended" } else { "" }
            ));
        }
        missing += c_missing;
        duplicates += c_dup;
        foreign += c_foreign;
        unexpected += c_unexpected;
    }
    let ended = ended.iter().filter(|e| **e).count();
    phase.counts = [missing, duplicates, foreign, unexpected, ended];
    phase.delivered = phase.latencies_ns.len();
    phase.exact_clients = n - phase.inexact.len();
    phase.latencies_ns.sort_unstable();
    // The server lets go of the closed streams before the next phase.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(phase)
}

fn print_tables(plan: &Plan, phases: &[Phase], idle_rss: u64) {
    let row = |name: &str, cell: &dyn Fn(&Phase) -> String| {
        let cells: Vec<String> = phases.iter().map(cell).collect();
        println!("| {name} | {} |", cells.join(" | "));
    };
    let heads: Vec<String> = phases
        .iter()
        .map(|p| format!("{} clients", p.clients))
        .collect();
    println!("| figure | {} |", heads.join(" | "));
    println!("|---|{}", "---|".repeat(phases.len()));
    row("users (4 clients each, the last ones fewer)", &|p| {
        if p.clients == 0 {
            format!("{} (writes only)", p.users)
        } else {
            p.users.to_string()
        }
    });
    row("clients connected in", &|p| {
        format!("{:.2} s", p.connect_secs)
    });
    row(&format!("{} writers: saves (per s)", plan.writers), &|p| {
        format!("{} ({:.0}/s)", p.saves, p.saves_per_sec())
    });
    row("event-log reads per s (rows returned per s)", &|p| {
        format!(
            "{:.0} ({:.0})",
            p.reads_per_sec(),
            p.log_rows as f64 / p.write_secs
        )
    });
    row(
        "CPU s per s of window: serve / clients / PostgreSQL / writers (bench)",
        &|p| {
            let c = &p.cpu;
            format!(
                "{:.2} / {:.2} / {:.2} / {:.2}",
                c.serve, c.clients, c.postgres, c.bench
            )
        },
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    row(
        &format!("machine CPU share ({cores} cores): those four / all processes"),
        &|p| {
            let c = &p.cpu;
            let four = (c.serve + c.clients + c.postgres + c.bench) / cores as f64;
            format!("{:.0}% / {:.0}%", four * 100.0, c.machine_busy * 100.0)
        },
    );
    row("events expected / delivered", &|p| {
        format!("{} / {}", p.expected, p.delivered)
    });
    row("clients that received exactly their user's writes", &|p| {
        format!("{} of {}", p.exact_clients, p.clients)
    });
    row(
        "missing / duplicates / another user's / not expected / streams ended",
        &|p| {
            let [m, d, f, u, e] = p.counts;
            format!("{m} / {d} / {f} / {u} / {e}")
        },
    );
    row("all delivered within (after the writes)", &|p| {
        format!("{:.1} s", p.settle_secs)
    });
    row("delivery p50 / p99 / max", &|p| {
        if p.latencies_ns.is_empty() {
            "-".into()
        } else {
            format!("{:.1} / {:.1} / {:.1} ms", p.p(0.5), p.p(0.99), p.p(1.0))
        }
    });
    row("server RSS connected / after writes", &|p| {
        format!(
            "{:.1} / {:.1} MiB",
            p.rss_connected as f64 / 1024.0,
            p.rss_after as f64 / 1024.0
        )
    });
    row(
        &format!(
            "server memory per client (over {:.1} MiB idle)",
            idle_rss as f64 / 1024.0
        ),
        &|p| {
            if p.clients == 0 {
                "-".into()
            } else {
                format!(
                    "{:.1} KiB",
                    p.rss_connected.saturating_sub(idle_rss) as f64 / p.clients as f64
                )
            }
        },
    );

    // Issue 27's targets, against this run's own baselines.
    let none = phases.iter().find(|p| p.clients == 0);
    let most = phases.iter().max_by_key(|p| p.clients);
    let fewest = phases
        .iter()
        .filter(|p| p.clients > 0)
        .min_by_key(|p| p.clients);
    println!();
    println!("| ratio | this run | issue 27's target |");
    println!("|---|---|---|");
    if let (Some(none), Some(most)) = (none, most.filter(|p| p.clients > 0)) {
        println!(
            "| writers' saves/s, {} clients / none | {:.2} | >= 0.9 |",
            most.clients,
            most.saves_per_sec() / none.saves_per_sec()
        );
    }
    if let (Some(fewest), Some(most)) = (fewest, most) {
        if most.clients > fewest.clients {
            // Both phases' users are all watched: what the clients' count costs the writers,
            // apart from what watching at all costs.
            println!(
                "| writers' saves/s, {} clients / {} | {:.2} | - |",
                most.clients,
                fewest.clients,
                most.saves_per_sec() / fewest.saves_per_sec()
            );
            println!(
                "| event-log reads/s, {} clients / {} | {:.2} | <= 1.5 |",
                most.clients,
                fewest.clients,
                most.reads_per_sec() / fewest.reads_per_sec()
            );
        }
    }
    for p in phases.iter().filter(|p| p.clients == 1_000) {
        println!(
            "| delivery p99 at 1000 clients | {:.1} ms | < 100 ms |",
            p.p(0.99)
        );
    }
}

/// The client process: SSE clients over raw HTTP/1.1, opened, counted and closed on the
/// bench's requests (JSON lines on stdin; one JSON line answers each on stdout).
mod clients {
    use super::*;
    use tokio::net::TcpStream;
    use tokio::sync::Semaphore;
    use tokio::task::JoinHandle;

    /// What one client received: (user, task, step, parsed at), and whether its stream
    /// ended.
    #[derive(Default)]
    struct Log {
        events: Vec<(String, String, i64, u64)>,
        ended: bool,
    }

    pub(super) fn main() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(serve_the_bench());
    }

    async fn serve_the_bench() {
        let mut requests = BufReader::new(tokio::io::stdin()).lines();
        let mut out = tokio::io::stdout();
        let mut logs: Vec<Arc<Mutex<Log>>> = Vec::new();
        let mut tasks: Vec<JoinHandle<()>> = Vec::new();
        // Standard input closed: the bench is gone, and so is this process.
        while let Ok(Some(line)) = requests.next_line().await {
            let request: Value = serde_json::from_str(&line).unwrap();
            let answer = match request["cmd"].as_str() {
                Some("open") => {
                    let (answer, l, t) = open(&request).await;
                    (logs, tasks) = (l, t);
                    answer
                }
                Some("counts") => {
                    let counts: Vec<usize> = logs
                        .iter()
                        .map(|l| l.lock().unwrap().events.len())
                        .collect();
                    json!({ "counts": counts })
                }
                Some("close") => {
                    for t in tasks.drain(..) {
                        t.abort();
                        let _ = t.await;
                    }
                    let logs: Vec<Log> = logs
                        .drain(..)
                        .map(|l| std::mem::take(&mut *l.lock().unwrap()))
                        .collect();
                    let ended: Vec<bool> = logs.iter().map(|l| l.ended).collect();
                    let events: Vec<_> = logs.into_iter().map(|l| l.events).collect();
                    json!({ "events": events, "ended": ended })
                }
                other => json!({ "error": format!("unknown request {other:?}") }),
            };
            if out
                .write_all(format!("{answer}\n").as_bytes())
                .await
                .is_err()
                || out.flush().await.is_err()
            {
                return;
            }
        }
    }

    /// Opens `clients` streams (client c on user `prefix` + c % users): the answer (when each
    /// was open, or why not), and the clients' logs and tasks.
    async fn open(request: &Value) -> (Value, Vec<Arc<Mutex<Log>>>, Vec<JoinHandle<()>>) {
        let base = request["base"].as_str().unwrap_or_default();
        let address = base.trim_start_matches("http://").to_owned();
        let token = request["token"].as_str().unwrap_or_default().to_owned();
        let prefix = request["prefix"].as_str().unwrap_or_default().to_owned();
        let n = request["clients"].as_u64().unwrap_or(0) as usize;
        let users = request["users"].as_u64().unwrap_or(1) as usize;
        let started = Instant::now();
        let gate = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(n.max(1));
        let logs: Vec<Arc<Mutex<Log>>> = (0..n).map(|_| Arc::default()).collect();
        let tasks = logs
            .iter()
            .enumerate()
            .map(|(c, log)| {
                let request = format!(
                    "GET /v1/users/{prefix}{}/events HTTP/1.1\r\nHost: {address}\r\n\
                     Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n",
                    c % users
                );
                let (address, gate, ready, log) =
                    (address.clone(), gate.clone(), ready_tx.clone(), log.clone());
                tokio::spawn(async move {
                    let permit = gate.acquire_owned().await.unwrap();
                    let opened =
                        tokio::time::timeout(Duration::from_secs(60), connect(&address, &request))
                            .await
                            .unwrap_or_else(|_| Err("no answer in 60 s".into()));
                    drop(permit);
                    match opened {
                        Ok((stream, body)) => {
                            let _ = ready.send((c, Ok(wall_ns()))).await;
                            drop(ready);
                            receive(stream, body, &log).await;
                            log.lock().unwrap().ended = true;
                        }
                        Err(e) => {
                            let _ = ready.send((c, Err(e))).await;
                        }
                    }
                })
            })
            .collect();
        drop(ready_tx);
        let mut connected_at = vec![0u64; n];
        let mut refused = Vec::new();
        for _ in 0..n {
            match ready_rx.recv().await {
                Some((c, Ok(at))) => connected_at[c] = at,
                Some((c, Err(e))) => refused.push(format!("client {c}: {e}")),
                None => break,
            }
        }
        let answer = json!({
            "connected_at": connected_at,
            "refused": refused,
            "secs": started.elapsed().as_secs_f64(),
        });
        (answer, logs, tasks)
    }

    /// Sends the request and reads the response's head: the stream and whatever of the
    /// body came with the head, if it is a 200 with a chunked body.
    async fn connect(address: &str, request: &str) -> Result<(TcpStream, Vec<u8>), String> {
        let mut stream = TcpStream::connect(address)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        let mut head = Vec::new();
        let mut buffer = [0u8; 4096];
        let end = loop {
            if let Some(end) = find(&head, b"\r\n\r\n") {
                break end;
            }
            let read = stream
                .read(&mut buffer)
                .await
                .map_err(|e| format!("reading the response: {e}"))?;
            if read == 0 {
                return Err(format!(
                    "connection closed before the response's head: {:?}",
                    String::from_utf8_lossy(&head)
                ));
            }
            head.extend_from_slice(&buffer[..read]);
        };
        let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
        if !text.starts_with("http/1.1 200") {
            return Err(text.lines().next().unwrap_or_default().to_owned());
        }
        if !text.contains("transfer-encoding: chunked") {
            return Err(format!("not a chunked body: {text}"));
        }
        Ok((stream, head.split_off(end + 4)))
    }

    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    /// Reads the stream until it ends: HTTP/1.1 chunks, then SSE blocks separated by a
    /// blank line, each `data:` line an event's JSON.
    async fn receive(mut stream: TcpStream, mut raw: Vec<u8>, log: &Mutex<Log>) {
        // Bytes of the current chunk still to come; decoded body not yet a whole block.
        let mut left = 0usize;
        let mut body: Vec<u8> = Vec::new();
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            // Decode the chunks in `raw`: a size line, that many bytes, CRLF.
            let mut at = 0;
            loop {
                if left > 0 {
                    let take = left.min(raw.len() - at);
                    if take == 0 {
                        break;
                    }
                    body.extend_from_slice(&raw[at..at + take]);
                    (at, left) = (at + take, left - take);
                    continue;
                }
                let Some(eol) = find(&raw[at..], b"\r\n") else {
                    break;
                };
                let line = String::from_utf8_lossy(&raw[at..at + eol]).into_owned();
                at += eol + 2;
                // The CRLF closing a chunk's data is an empty line here.
                if line.is_empty() {
                    continue;
                }
                let size = line.split(';').next().unwrap_or_default().trim();
                match usize::from_str_radix(size, 16) {
                    Ok(0) | Err(_) => return,
                    Ok(size) => left = size,
                }
            }
            raw.drain(..at);
            while let Some(end) = find(&body, b"\n\n") {
                let block: Vec<u8> = body.drain(..end + 2).collect();
                let block = String::from_utf8_lossy(&block);
                let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else {
                    continue;
                };
                let v: Value = serde_json::from_str(data.trim()).unwrap();
                let event = (
                    v["user_id"].as_str().unwrap().to_owned(),
                    v["task_id"].as_str().unwrap().to_owned(),
                    v["step"].as_i64().unwrap(),
                    wall_ns(),
                );
                log.lock().unwrap().events.push(event);
            }
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => raw.extend_from_slice(&buffer[..read]),
            }
        }
    }
}
