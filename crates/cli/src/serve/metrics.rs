//! `GET /metrics`: Prometheus text (OpenMetrics) with the server's and the store's figures,
//! every name `taskhistory_*`.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use taskhistory_postgres::PgTaskHistoryStore;

use super::streams::Cap;

/// Labels of an operation's figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
    outcome: &'static str,
}

/// Labels of a request count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    code: u16,
}

/// Labels of a refused stream: the cap that refused it (`streams.rs`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CapLabels {
    cap: &'static str,
}

/// The server's figures.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    operations: Family<OperationLabels, Histogram>,
    watchers: Gauge<i64, AtomicI64>,
    events: Counter,
    auth_failures: Counter,
    auth_limited: Counter,
    connections_refused: Counter,
    streams_refused: Family<CapLabels, Counter>,
}

/// The store's own counters and pool, read at each scrape.
#[derive(Debug)]
struct StoreCollector(Option<PgTaskHistoryStore>);

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Some(pg) = &self.0 else { return Ok(()) };
        let m = pg.metrics();
        let p = pg.pool_stats();
        let e = &mut encoder;
        counter(
            e,
            "taskhistory_store_queries",
            "Database attempts made (each retry counts)",
            m.queries,
        )?;
        counter(
            e,
            "taskhistory_store_errors",
            "Database attempts that failed",
            m.errors,
        )?;
        counter(
            e,
            "taskhistory_store_retries",
            "Retries after transient failures",
            m.retries,
        )?;
        gauge(
            e,
            "taskhistory_store_watchers",
            "Watches open in the store (its limit is DB_MAX_WATCHERS)",
            m.watchers,
        )?;
        counter(
            e,
            "taskhistory_store_tail_reads",
            "Reads of the event log by the store's one tail, for all watchers",
            m.tail_reads,
        )?;
        counter(
            e,
            "taskhistory_store_watcher_reads",
            "Reads of the event log by watchers catching up by themselves",
            m.watcher_reads,
        )?;
        counter(
            e,
            "taskhistory_store_watcher_fallbacks",
            "Watchers that fell behind (buffer full) and read by themselves",
            m.watcher_fallbacks,
        )?;
        gauge(
            e,
            "taskhistory_store_tail_lag_milliseconds",
            "From the first write its latest read served to its events handed out",
            m.tail_lag_ms,
        )?;
        gauge(
            e,
            "taskhistory_store_tail_lag_events",
            "Events the tail's latest read handed out",
            m.tail_lag_events,
        )?;
        // Reads replicas may serve, per server that served them (issue 31).
        {
            let mut family = e.encode_descriptor(
                "taskhistory_store_reads",
                "Reads that replicas may serve (status, history, lists, counts, activity), by the server that served them",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            let primary = ConstCounter::new(m.reads_primary);
            primary.encode(family.encode_family(&[("server", "primary".to_owned())])?)?;
            for r in pg.replicas() {
                let c = ConstCounter::new(r.reads);
                c.encode(family.encode_family(&[("server", r.server.clone())])?)?;
            }
        }
        counter(
            e,
            "taskhistory_store_replica_fallbacks",
            "Reads whose attempt on a replica failed and that the primary served",
            m.replica_fallbacks,
        )?;
        gauge(
            e,
            "taskhistory_store_replica_lag_milliseconds",
            "The largest lag of a replica behind the primary at the latest check",
            m.replica_lag_ms,
        )?;
        gauge(
            e,
            "taskhistory_store_replicas_in_rotation",
            "Replicas that serve reads now (its limit of lag is DB_MAX_REPLICA_LAG)",
            m.replicas_in_rotation,
        )?;
        gauge(
            e,
            "taskhistory_store_queued_saves",
            "Single saves waiting for a save lane (DB_SAVE_LANES); a lane writes them together",
            m.queued_saves,
        )?;
        gauge(
            e,
            "taskhistory_store_queued_status_checks",
            "Status checks waiting for a status lane (DB_STATUS_LANES); a lane reads them together",
            m.queued_status_checks,
        )?;
        gauge(
            e,
            "taskhistory_pool_connections",
            "Open pooled connections",
            u64::from(p.connections),
        )?;
        gauge(
            e,
            "taskhistory_pool_idle",
            "Idle pooled connections",
            u64::from(p.idle),
        )?;
        gauge(
            e,
            "taskhistory_pool_in_use",
            "Pooled connections in use",
            u64::from(p.in_use),
        )?;
        gauge(
            e,
            "taskhistory_pool_max",
            "The pool's maximum size",
            u64::from(p.max),
        )?;
        counter(
            e,
            "taskhistory_pool_waits",
            "Checkouts that had to wait",
            p.waits,
        )?;
        counter(
            e,
            "taskhistory_pool_wait_timeouts",
            "Checkouts that gave up",
            p.wait_timeouts,
        )?;
        Ok(())
    }
}

impl Metrics {
    /// The figures of a server on `pg` (`None`: the in-memory store).
    pub(crate) fn new(pg: Option<PgTaskHistoryStore>) -> Arc<Self> {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "taskhistory_http_requests",
            "HTTP requests answered, by route and status code",
            requests.clone(),
        );
        let operations = Family::<OperationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
        });
        registry.register(
            "taskhistory_operation_duration_seconds",
            "Store operations the server ran, by operation and outcome (ok, or the error's class)",
            operations.clone(),
        );
        let watchers = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "taskhistory_watchers",
            "Event streams open (SSE and WebSocket): what --max-streams counts",
            watchers.clone(),
        );
        let events = Counter::default();
        registry.register(
            "taskhistory_events_sent",
            "Events sent to event streams",
            events.clone(),
        );
        let auth_failures = Counter::default();
        registry.register(
            "taskhistory_auth_failures",
            "Requests refused 401 (no token, or a malformed, forged or expired one)",
            auth_failures.clone(),
        );
        let auth_limited = Counter::default();
        registry.register(
            "taskhistory_auth_rate_limited",
            "Requests refused 429: their address failed authentication too often",
            auth_limited.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "taskhistory_connections_refused",
            "Connections closed at once: --max-connections were open",
            connections_refused.clone(),
        );
        let streams_refused = Family::<CapLabels, Counter>::default();
        registry.register(
            "taskhistory_streams_refused",
            "Event streams refused (SSE 429, WebSocket close 1013), by the cap reached: \
             max_streams, max_streams_per_user, store_watchers",
            streams_refused.clone(),
        );
        // Every cap's count shown from the start, zero until it refuses one.
        for cap in [Cap::Streams, Cap::PerUser, Cap::StoreWatchers] {
            let _ = streams_refused.get_or_create(&CapLabels { cap: cap.label() });
        }
        registry.register_collector(Box::new(StoreCollector(pg)));
        Arc::new(Metrics {
            registry,
            requests,
            operations,
            watchers,
            events,
            auth_failures,
            auth_limited,
            connections_refused,
            streams_refused,
        })
    }

    /// Counts a request's answer.
    pub(crate) fn request(&self, route: String, code: u16) {
        self.requests
            .get_or_create(&RequestLabels { route, code })
            .inc();
    }

    /// Records an operation's time and outcome.
    pub(crate) fn operation(&self, operation: &'static str, outcome: &'static str, took: Duration) {
        self.operations
            .get_or_create(&OperationLabels { operation, outcome })
            .observe(took.as_secs_f64());
    }

    /// A request refused 401.
    pub(crate) fn auth_failed(&self) {
        self.auth_failures.inc();
    }

    /// A request refused 429.
    pub(crate) fn auth_limited(&self) {
        self.auth_limited.inc();
    }

    /// A connection closed at the connection limit.
    pub(crate) fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// A stream refused at `cap`.
    pub(crate) fn stream_refused(&self, cap: Cap) {
        self.streams_refused
            .get_or_create(&CapLabels { cap: cap.label() })
            .inc();
    }

    /// One more event sent.
    pub(crate) fn event_sent(&self) {
        self.events.inc();
    }

    /// A stream opened; its figure goes down when the guard drops (held by the stream's
    /// slot, `streams.rs`).
    pub(crate) fn watcher(self: &Arc<Self>) -> WatcherGuard {
        self.watchers.inc();
        WatcherGuard(self.clone())
    }

    /// The text exposition.
    pub(crate) fn render(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// Streams connected now.
    pub(crate) fn watchers_now(&self) -> i64 {
        self.watchers.get()
    }
}

/// Keeps a stream counted while it lives.
#[derive(Debug)]
pub(crate) struct WatcherGuard(Arc<Metrics>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.watchers.dec();
    }
}
