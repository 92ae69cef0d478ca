//! Helpers shared by the load and retention benches: settings from the environment, and
//! driving an operation from concurrent tokio tasks while recording latencies.
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A number from the environment, or `default`.
pub(crate) fn env_f64(key: &str, default: f64) -> f64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The short mode (`BENCH_SHORT=1`): the ratio sections only, short rounds, a tenth of the
/// data; a minute or two, for CI's log (no thresholds: the machines are noisy).
pub(crate) fn short() -> bool {
    std::env::var_os("BENCH_SHORT").is_some_and(|v| v != "0")
}

/// Whether `name` runs: every section unless `BENCH_ONLY` (comma-separated: save, batch,
/// compat, watch, reads, list, cleanup, memory, peak) says otherwise; in the short mode only
/// save, batch, compat, watch, reads and list.
pub(crate) fn section(name: &str) -> bool {
    match std::env::var("BENCH_ONLY") {
        Ok(only) => only.split(',').any(|o| o.trim() == name),
        Err(_) if short() => ["save", "batch", "compat", "watch", "reads", "list"].contains(&name),
        Err(_) => true,
    }
}

pub(crate) fn round_secs() -> Duration {
    Duration::from_secs_f64(env_f64("BENCH_SECS", if short() { 0.4 } else { 2.0 }))
}

pub(crate) fn scaled(n: usize) -> usize {
    let scale = env_f64("BENCH_SCALE", if short() { 0.1 } else { 1.0 });
    ((n as f64) * scale).max(1.0) as usize
}

/// Latencies of one run.
#[derive(Default, Clone)]
pub(crate) struct Sample {
    pub(crate) ops: u64,
    pub(crate) secs: f64,
    pub(crate) lat: Vec<Duration>,
}

impl Sample {
    pub(crate) fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    pub(crate) fn pct(&self, p: f64) -> Duration {
        let mut l = self.lat.clone();
        l.sort();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l[((l.len() - 1) as f64 * p).round() as usize]
    }
    pub(crate) fn merge(samples: &[Sample]) -> Sample {
        let mut out = Sample::default();
        for s in samples {
            out.ops += s.ops;
            out.secs += s.secs;
            out.lat.extend_from_slice(&s.lat);
        }
        out
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `op(worker, iteration)` from `workers` tasks for `dur`.
pub(crate) async fn drive<F, Fut>(workers: usize, dur: Duration, op: F) -> Sample
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let timer = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(dur).await;
        timer.store(true, Ordering::Relaxed);
    });
    drive_until(workers, stop, op).await
}

/// Runs `op(worker, iteration)` from `workers` tasks until `stop` is set.
pub(crate) async fn drive_until<F, Fut>(workers: usize, stop: Arc<AtomicBool>, op: F) -> Sample
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (op, stop) = (op.clone(), stop.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    op(w, i).await;
                    lat.push(t.elapsed());
                    i += 1;
                }
                lat
            })
        })
        .collect();
    let mut sample = Sample::default();
    for h in handles {
        sample.lat.extend(h.await.unwrap());
    }
    sample.ops = sample.lat.len() as u64;
    sample.secs = started.elapsed().as_secs_f64();
    sample
}
