//! Load on `taskhistory serve`: 1,000 Server-Sent Events clients connected to one server
//! (4 per user, 250 users) while 8 writers save through the library as fast as they can.
//! Every event must reach each of its user's clients exactly once; it prints the delivery
//! latency (from the moment a save returned to the moment a client parsed its event), and
//! the server's resident memory per connected client.
//!
//! ```sh
//! cargo bench -p taskhistory-cli --bench serve            # 1,000 clients, 10 s of writes
//! SERVE_CLIENTS=200 SERVE_SECS=3 cargo bench -p taskhistory-cli --bench serve
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{HashMap, HashSet};
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

    // The clients: each parses its stream and records (key, arrival).
    let received: Received = Arc::new(Mutex::new(vec![Vec::new(); clients]));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut handles = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(clients);
    let connect_started = Instant::now();
    for c in 0..clients {
        let user = format!("u{}", c % users);
        let request = http
            .get(format!("{base}/v1/users/{user}/events"))
            .bearer_auth(ADMIN);
        let received = received.clone();
        let ready = ready_tx.clone();
        handles.push(tokio::spawn(async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            ready.send(()).await.unwrap();
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
        }));
    }
    for _ in 0..clients {
        ready_rx.recv().await.unwrap();
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connected_rss = rss_kib(pid);

    // The writers.
    let saved: Arc<Mutex<HashMap<Key, Instant>>> = Arc::default();
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
                store
                    .save_task_history(&user, &task, i as i32, &step)
                    .await
                    .unwrap();
                saved
                    .lock()
                    .unwrap()
                    .insert((user, task, i), Instant::now());
                i += 1;
            }
        }));
    }
    for w in writing {
        w.await.unwrap();
    }
    let writes = saved.lock().unwrap().len();
    let write_secs = secs as f64;
    // Every client must get every write to its user.
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for (user, _, _) in saved.lock().unwrap().keys() {
        *per_user.entry(user.clone()).or_default() += 1;
    }
    let expected: usize = (0..clients)
        .map(|c| {
            per_user
                .get(&format!("u{}", c % users))
                .copied()
                .unwrap_or(0)
        })
        .sum();
    let settle = Instant::now();
    loop {
        let got: usize = received.lock().unwrap().iter().map(Vec::len).sum();
        if got >= expected || settle.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peak_rss = rss_kib(pid);
    let (mut latencies, mut duplicates, mut missing, mut foreign) =
        (Vec::new(), 0usize, 0usize, 0usize);
    {
        let saved = saved.lock().unwrap();
        let received = received.lock().unwrap();
        for (c, events) in received.iter().enumerate() {
            let user = format!("u{}", c % users);
            let mut seen = HashSet::new();
            for (key, at) in events {
                if key.0 != user {
                    foreign += 1;
                }
                if !seen.insert(key.clone()) {
                    duplicates += 1;
                }
                if let Some(t) = saved.get(key) {
                    latencies.push(at.saturating_duration_since(*t));
                }
            }
            missing += per_user
                .get(&user)
                .copied()
                .unwrap_or(0)
                .saturating_sub(seen.len());
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
    println!("| duplicates / missing / another user's | {duplicates} / {missing} / {foreign} |");
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
    drop(server);
    for h in handles {
        h.abort();
    }
    store.close().await;
}
