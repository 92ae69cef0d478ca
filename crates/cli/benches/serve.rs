//! Load on `taskhistory serve`: 1,000 Server-Sent Events clients connected to one server
//! (4 per user, 250 users) while 8 writers save through the library as fast as they can.
//! Every write must reach each of its user's clients exactly once, and nothing else any
//! client: the bench fails (exit status 1, the counts on stderr) on any missing, duplicate,
//! foreign or unexpected event, or a stream that ended. It prints the delivery latency
//! (from the moment a save returned to the moment a client parsed its event), and the
//! server's resident memory per connected client.
//!
//! ```sh
//! cargo bench -p taskhistory-cli --bench serve            # 1,000 clients, 10 s of writes
//! SERVE_CLIENTS=200 SERVE_SECS=3 cargo bench -p taskhistory-cli --bench serve
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use taskhistory_core::{TaskHistoryStore, TaskStepResult};

#[path = "../tests/common/mod.rs"]
mod common;
use common::ADMIN;
const USERS_PER: usize = 4;

fn env(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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

type Key = (String, String, i64);
/// Per client, the events it parsed and when.
type Received = Arc<Mutex<Vec<Vec<(Key, Instant)>>>>;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let clients = env("SERVE_CLIENTS", 1_000) as usize;
    let secs = env("SERVE_SECS", 10);
    let writers = env("SERVE_WRITERS", 8) as usize;
    let users = clients.div_ceil(USERS_PER);
    // The tests' server helper: a fresh schema, its store, and the server process (stopped
    // however the bench ends).
    let server = common::Server::start(&[]).await;
    let (store, base) = (server.store.clone(), server.base.clone());
    let pid = server.child.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = rss_kib(pid);

    // The clients: each parses its stream and records (key, arrival); each says when its
    // stream was open (the response's head arrived), or why it was not.
    let received: Received = Arc::new(Mutex::new(vec![Vec::new(); clients]));
    let streams_ended = Arc::new(AtomicUsize::new(0));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut handles = Vec::new();
    let (ready_tx, mut ready_rx) =
        tokio::sync::mpsc::channel::<(usize, Result<Instant, String>)>(clients);
    let connect_started = Instant::now();
    for c in 0..clients {
        let user = format!("u{}", c % users);
        let request = http
            .get(format!("{base}/v1/users/{user}/events"))
            .bearer_auth(ADMIN);
        let (received, ended) = (received.clone(), streams_ended.clone());
        let ready = ready_tx.clone();
        handles.push(tokio::spawn(async move {
            let response = match request.send().await {
                Ok(r) if r.status() == 200 => r,
                Ok(r) => {
                    let _ = ready.send((c, Err(format!("status {}", r.status())))).await;
                    return;
                }
                Err(e) => {
                    let _ = ready.send((c, Err(e.to_string()))).await;
                    return;
                }
            };
            let _ = ready.send((c, Ok(Instant::now()))).await;
            // Every client's sender dropped: the bench has every answer.
            drop(ready);
            let mut body = response.bytes_stream();
            let mut buffer = String::new();
            while let Some(chunk) = body.next().await {
                let Ok(chunk) = chunk else { break };
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let block: String = buffer.drain(..end + 2).collect();
                    let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else {
                        continue;
                    };
                    let v: Value = serde_json::from_str(data.trim()).unwrap();
                    let key = (
                        v["user_id"].as_str().unwrap().to_owned(),
                        v["task_id"].as_str().unwrap().to_owned(),
                        v["step"].as_i64().unwrap(),
                    );
                    received.lock().unwrap()[c].push((key, Instant::now()));
                }
            }
            // The server never ends a stream while it runs: counted as a failure.
            ended.fetch_add(1, Ordering::Relaxed);
        }));
    }
    drop(ready_tx);
    let mut connected_at = vec![None; clients];
    let mut refused = Vec::new();
    while let Some((c, outcome)) = ready_rx.recv().await {
        match outcome {
            Ok(at) => connected_at[c] = Some(at),
            Err(e) => refused.push(format!("client {c}: {e}")),
        }
    }
    if !refused.is_empty() {
        drop(server);
        eprintln!(
            "serve bench failed: {} of {clients} clients could not open their stream: {}",
            refused.len(),
            refused
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
        std::process::exit(1);
    }
    let connected_at: Vec<Instant> = connected_at.into_iter().map(Option::unwrap).collect();
    let connect_secs = connect_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connected_rss = rss_kib(pid);

    // The writers: each write's key, when its save began and when it was acknowledged.
    let saved: Arc<Mutex<HashMap<Key, (Instant, Instant)>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut writing = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        let saved = saved.clone();
        writing.push(tokio::spawn(async move {
            let mut i = 0i64;
            while Instant::now() < deadline {
                let user = format!("u{}", (w + i as usize * writers) % users);
                let task = format!("w{w}");
                let step = TaskStepResult::running("s", json!({"i": i}), "load");
                let began = Instant::now();
                store
                    .save_task_history(&user, &task, i as i32, &step)
                    .await
                    .unwrap();
                saved
                    .lock()
                    .unwrap()
                    .insert((user, task, i), (began, Instant::now()));
                i += 1;
            }
        }));
    }
    for w in writing {
        w.await.unwrap();
    }
    let writes = saved.lock().unwrap().len();
    let write_secs = secs as f64;
    // Each client must receive, exactly once, every write of its user whose save began
    // after its stream was open (all of them here: the writers start once every client is
    // connected), and nothing else: no other user's event, no write acknowledged before it
    // connected, nothing that was not written.
    let expected_per_client: Vec<HashSet<Key>> = {
        let saved = saved.lock().unwrap();
        (0..clients)
            .map(|c| {
                let user = format!("u{}", c % users);
                saved
                    .iter()
                    .filter(|(key, (began, _))| key.0 == user && *began >= connected_at[c])
                    .map(|(key, _)| key.clone())
                    .collect()
            })
            .collect()
    };
    let expected: usize = expected_per_client.iter().map(HashSet::len).sum();
    let settle = Instant::now();
    loop {
        let done = received
            .lock()
            .unwrap()
            .iter()
            .zip(&expected_per_client)
            .all(|(got, want)| got.len() >= want.len());
        if done || settle.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A moment more, so a late duplicate or stray event is seen too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let peak_rss = rss_kib(pid);
    let (mut latencies, mut duplicates, mut missing, mut foreign, mut unexpected) =
        (Vec::new(), 0usize, 0usize, 0usize, 0usize);
    let mut inexact_clients = Vec::new();
    {
        let saved = saved.lock().unwrap();
        let received = received.lock().unwrap();
        for (c, events) in received.iter().enumerate() {
            let user = format!("u{}", c % users);
            let want = &expected_per_client[c];
            let mut seen = HashSet::new();
            let (mut c_dup, mut c_foreign, mut c_unexpected) = (0, 0, 0);
            for (key, at) in events {
                if key.0 != user {
                    c_foreign += 1;
                } else if saved
                    .get(key)
                    .is_none_or(|(_, acked)| *acked < connected_at[c])
                {
                    // Not a write of this bench, or one acknowledged before the client
                    // connected.
                    c_unexpected += 1;
                }
                if !seen.insert(key.clone()) {
                    c_dup += 1;
                } else if want.contains(key) {
                    latencies.push(at.saturating_duration_since(saved[key].1));
                }
            }
            let c_missing = want.iter().filter(|k| !seen.contains(*k)).count();
            if c_dup + c_foreign + c_unexpected + c_missing > 0 {
                inexact_clients.push(format!(
                    "client {c} ({user}): {c_missing} missing, {c_dup} duplicates, \
                     {c_foreign} of another user, {c_unexpected} not expected"
                ));
            }
            (duplicates, missing, foreign, unexpected) = (
                duplicates + c_dup,
                missing + c_missing,
                foreign + c_foreign,
                unexpected + c_unexpected,
            );
        }
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("| figure | value |");
    println!("|---|---|");
    println!("| clients (users x clients each) | {clients} ({users} x {USERS_PER}) |");
    println!("| clients connected in | {connect_secs:.2} s |");
    println!("| writers, seconds | {writers}, {secs} s |");
    println!("| saves | {writes} ({:.0}/s) |", writes as f64 / write_secs);
    println!(
        "| events expected / delivered | {expected} / {} |",
        latencies.len()
    );
    println!(
        "| clients that received exactly their user's writes | {} of {clients} |",
        clients - inexact_clients.len()
    );
    println!(
        "| missing / duplicates / another user's / not expected | {missing} / {duplicates} / {foreign} / {unexpected} |"
    );
    println!(
        "| delivery p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |",
        ms(pct(&latencies, 0.5)),
        ms(pct(&latencies, 0.99)),
        ms(pct(&latencies, 1.0))
    );
    println!(
        "| server RSS idle / {clients} connected / after writes | {:.1} / {:.1} / {:.1} MiB |",
        idle_rss as f64 / 1024.0,
        connected_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    println!(
        "| server memory per connected client | {:.1} KiB |",
        connected_rss.saturating_sub(idle_rss) as f64 / clients as f64
    );
    let ended = streams_ended.load(Ordering::Relaxed);
    drop(server);
    for h in handles {
        h.abort();
    }
    store.close().await;
    if !inexact_clients.is_empty() || ended > 0 {
        eprintln!(
            "serve bench failed: {} of {clients} clients did not receive exactly their user's \
             writes ({missing} missing, {duplicates} duplicates, {foreign} of another user, \
             {unexpected} not expected); {ended} streams ended early. First clients: {}",
            inexact_clients.len(),
            inexact_clients
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
        std::process::exit(1);
    }
}
