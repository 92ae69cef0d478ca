//! Connection and pool settings: from `DATABASE_URL`, the Python service's `DB_*` variables,
//! or a builder in code.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use taskhistory_core::{RetryPolicy, StoreError};

use crate::layout::Partitioning;

/// How the connection is encrypted, with libpq's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS if the server offers it, plain otherwise; the certificate is not checked.
    #[default]
    Prefer,
    /// TLS or nothing; the certificate is not checked.
    Require,
    /// TLS, with the certificate checked against the trusted roots (`sslrootcert`, or the
    /// system's) and the host name checked against the certificate.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(format!(
                "unknown sslmode {other:?} (disable, prefer, require, verify-full)"
            )),
        }
    }
}

/// Everything the PostgreSQL store needs to connect.
///
/// Defaults follow the Python service: pool of 10 to 20 connections, 60 s command timeout,
/// application_name `taskhistory`, UTC. The password is never printed: `Debug` shows
/// `<redacted>`.
#[derive(Clone)]
pub struct PgConfig {
    pub(crate) pg: tokio_postgres::Config,
    /// See [`PgConfig::ssl_mode`].
    pub(crate) ssl_mode: SslMode,
    /// See [`PgConfig::ssl_root_cert`].
    pub(crate) ssl_root_cert: Option<PathBuf>,
    /// Connections kept open when idle.
    pub(crate) min_size: u32,
    /// Most connections open at once.
    pub(crate) max_size: u32,
    /// See [`PgConfig::command_timeout`].
    pub(crate) command_timeout: Duration,
    /// See [`PgConfig::statement_timeout`].
    pub(crate) statement_timeout: Duration,
    /// See [`PgConfig::connect_timeout`].
    pub(crate) connect_timeout: Duration,
    /// See [`PgConfig::pool_timeout`].
    pub(crate) pool_timeout: Duration,
    /// See [`PgConfig::schema`].
    pub(crate) schema: Option<String>,
    /// See [`PgConfig::retry`].
    pub(crate) retry: RetryPolicy,
    /// See [`PgConfig::notifications`].
    pub(crate) notifications: bool,
    /// See [`PgConfig::save_lanes`].
    pub(crate) save_lanes: u32,
    /// A save that finds no other save queued with it is written by the combined statement
    /// too (default false: it takes the single-step statement, whose plan the server
    /// keeps). For tests that must run every save through the combined statement, as the
    /// behaviour suite does on one of its stores.
    pub(crate) combine_lone_saves: bool,
    /// See [`PgConfig::status_lanes`].
    pub(crate) status_lanes: u32,
    /// A status check that finds no other queued with it is read by the combined statement
    /// too (tests only, as [`combine_lone_saves`](Self::combine_lone_saves)).
    pub(crate) combine_lone_statuses: bool,
    /// See [`PgConfig::declare_users`].
    pub(crate) declare_users: bool,
    /// Test-only: the user every declaration names instead of the operation's own (a store
    /// built to send one user's id while declaring another, for the isolation fault test).
    pub(crate) declare_as: Option<String>,
    /// See [`PgConfig::watch_poll`].
    pub(crate) watch_poll: Duration,
    /// See [`PgConfig::max_watchers`].
    pub(crate) max_watchers: u32,
    /// See [`PgConfig::listen_url`].
    pub(crate) listen: Option<tokio_postgres::Config>,
    /// See [`PgConfig::pgbouncer`].
    pub(crate) pgbouncer: bool,
    /// See [`PgConfig::observe_statements`].
    pub(crate) statement_observer: Option<StatementObserver>,
    /// See [`PgConfig::partitioning`].
    pub(crate) partitioning: Option<Partitioning>,
    /// See [`PgConfig::copy_min_rows`].
    pub(crate) copy_min_rows: Option<u32>,
    /// See [`PgConfig::copy_connections`].
    pub(crate) copy_connections: u32,
    /// See [`PgConfig::pipelined_reads`].
    pub(crate) pipelined_reads: u32,
    /// See [`PgConfig::read_urls`].
    pub(crate) read_urls: Vec<ReadUrl>,
    /// See [`PgConfig::replica_wait`].
    pub(crate) replica_wait: Duration,
    /// See [`PgConfig::max_replica_lag`].
    pub(crate) max_replica_lag: Duration,
}

/// A replica's connection settings, parsed from [`PgConfig::read_urls`]: the URL's own
/// settings, and its TLS options when it names them (else the primary's hold).
#[derive(Clone)]
pub(crate) struct ReadUrl {
    pg: tokio_postgres::Config,
    ssl_mode: Option<SslMode>,
    ssl_root_cert: Option<PathBuf>,
}

impl ReadUrl {
    /// `host:port/db` (never the password).
    fn shown(&self) -> String {
        let hosts: Vec<String> = self
            .pg
            .get_hosts()
            .iter()
            .zip(self.pg.get_ports().iter().chain(std::iter::repeat(&5432)))
            .map(|(host, port)| match host {
                tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                tokio_postgres::config::Host::Unix(p) => format!("{}:{port}", p.display()),
            })
            .collect();
        format!("{}/{}", hosts.join(","), self.pg.get_dbname().unwrap_or(""))
    }
}

/// A callback that sees the SQL text of every statement (bound values are not included).
pub type StatementObserver = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConfig")
            .field("hosts", &self.pg.get_hosts())
            .field("ports", &self.pg.get_ports())
            .field("dbname", &self.pg.get_dbname())
            .field("user", &self.pg.get_user())
            .field("password", &self.pg.get_password().map(|_| "<redacted>"))
            .field("application_name", &self.pg.get_application_name())
            .field("ssl_mode", &self.ssl_mode)
            .field("ssl_root_cert", &self.ssl_root_cert)
            .field("min_size", &self.min_size)
            .field("max_size", &self.max_size)
            .field("command_timeout", &self.command_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_timeout", &self.pool_timeout)
            .field("schema", &self.schema)
            .field("retry", &self.retry)
            .field("pgbouncer", &self.pgbouncer)
            .field("notifications", &self.notifications)
            .field("watch_poll", &self.watch_poll)
            .field("max_watchers", &self.max_watchers)
            .field("save_lanes", &self.save_lanes)
            .field("combine_lone_saves", &self.combine_lone_saves)
            .field("status_lanes", &self.status_lanes)
            .field("combine_lone_statuses", &self.combine_lone_statuses)
            .field("declare_users", &self.declare_users)
            .field(
                "listen",
                &self
                    .listen
                    .as_ref()
                    .map(|l| (l.get_hosts().to_vec(), l.get_ports().to_vec())),
            )
            .field("partitioning", &self.partitioning)
            .field("copy_min_rows", &self.copy_min_rows)
            .field("copy_connections", &self.copy_connections)
            .field("pipelined_reads", &self.pipelined_reads)
            .field("read_urls", &self.get_read_urls())
            .field("replica_wait", &self.replica_wait)
            .field("max_replica_lag", &self.max_replica_lag)
            .field(
                "statement_observer",
                &self.statement_observer.as_ref().map(|_| "<set>"),
            )
            .finish()
    }
}

impl Default for PgConfig {
    /// `postgres@localhost:5432/postgres`, with the defaults above.
    fn default() -> Self {
        let mut pg = tokio_postgres::Config::new();
        pg.host("localhost")
            .port(5432)
            .user("postgres")
            .dbname("postgres");
        PgConfig {
            pg,
            ssl_mode: SslMode::Prefer,
            ssl_root_cert: None,
            min_size: 10,
            max_size: 20,
            command_timeout: Duration::from_secs(60),
            statement_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            pool_timeout: Duration::from_secs(30),
            schema: None,
            retry: RetryPolicy::default(),
            statement_observer: None,
            pgbouncer: false,
            notifications: true,
            watch_poll: Duration::from_secs(1),
            max_watchers: 100_000,
            save_lanes: 2,
            combine_lone_saves: false,
            status_lanes: 4,
            combine_lone_statuses: false,
            declare_users: false,
            declare_as: None,
            listen: None,
            partitioning: None,
            copy_min_rows: Some(1_000),
            copy_connections: 2,
            pipelined_reads: 2,
            read_urls: Vec::new(),
            replica_wait: Duration::from_millis(50),
            max_replica_lag: Duration::from_secs(5),
        }
        .application_name("taskhistory")
    }
}

fn bad(variable: &str, reason: impl fmt::Display) -> StoreError {
    StoreError::configuration(variable, reason.to_string())
}

impl PgConfig {
    /// Settings from a URL (`postgres://user:password@host:port/db?sslmode=verify-full`) or
    /// a libpq key=value string. `sslmode` accepts disable, prefer, require and verify-full;
    /// `sslrootcert` names the roots for verify-full. Other settings keep their defaults.
    ///
    /// A URL that does not parse is a `StoreError::Configuration` for the setting `url`
    /// saying which part is wrong (the scheme, or the option or value tokio-postgres
    /// refused); [`from_env`](Self::from_env) names `DATABASE_URL` instead.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let mut config = PgConfig::default();
        config.apply_url("url", url)?;
        Ok(config)
    }

    /// Applies `url`, read from the setting `setting` (named in errors).
    fn apply_url(&mut self, setting: &str, url: &str) -> Result<(), StoreError> {
        let parsed = self.parse_url(setting, url)?;
        self.pg = parsed.pg;
        if let Some(mode) = parsed.ssl_mode {
            self.ssl_mode = mode;
        }
        if let Some(root) = parsed.ssl_root_cert {
            self.ssl_root_cert = Some(root);
        }
        Ok(())
    }

    /// Parses `url`, read from the setting `setting` (named in errors); the
    /// application name is this configuration's unless the URL names one.
    fn parse_url(&self, setting: &str, url: &str) -> Result<ReadUrl, StoreError> {
        if let Some((scheme, _)) = url.split_once("://") {
            if scheme != "postgres" && scheme != "postgresql" {
                return Err(bad(
                    setting,
                    format!(
                        "the scheme {scheme:?} is not PostgreSQL's: a URL starts with \
                         postgres:// or postgresql://"
                    ),
                ));
            }
        }
        // tokio-postgres knows no verify-full: take sslmode and sslrootcert out first.
        let (url, params) = take_params(url, &["sslmode", "sslrootcert"]);
        let mut pg = tokio_postgres::Config::from_str(&url).map_err(|e| {
            // tokio-postgres says "invalid connection string"; its source says which part.
            let part = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            bad(setting, format!("does not parse: {e}{part}"))
        })?;
        if pg.get_application_name().is_none() {
            pg.application_name(self.pg.get_application_name().unwrap_or("taskhistory"));
        }
        let mut parsed = ReadUrl {
            pg,
            ssl_mode: None,
            ssl_root_cert: None,
        };
        for (key, value) in params {
            match key.as_str() {
                "sslmode" => parsed.ssl_mode = Some(value.parse().map_err(|e| bad(setting, e))?),
                _ => parsed.ssl_root_cert = Some(PathBuf::from(value)),
            }
        }
        Ok(parsed)
    }

    /// Settings from the environment: `DATABASE_URL` if set, else `DB_HOST`, `DB_PORT`,
    /// `DB_NAME`, `DB_USER`, `DB_PASSWORD`; then, in both cases, `DB_MIN_SIZE`,
    /// `DB_MAX_SIZE`, `DB_COMMAND_TIMEOUT`, `DB_STATEMENT_TIMEOUT`, `DB_CONNECT_TIMEOUT`,
    /// `DB_POOL_TIMEOUT`, `DB_WATCH_POLL` (seconds), `DB_SSLMODE`, `DB_SSLROOTCERT`, `DB_APPLICATION_NAME`
    /// `DB_SCHEMA`, `DB_PGBOUNCER`, `DB_NOTIFY`, `DB_SAVE_LANES`, `DB_STATUS_LANES`, `DB_LISTEN_URL`, `DB_PARTITION_INTERVAL` and
    /// `DB_PARTITIONS_AHEAD`, `DB_COPY_MIN_ROWS`, `DB_COPY_CONNECTIONS`, `DB_PIPELINED_READS`, `DB_MAX_WATCHERS`, `DB_DECLARE_USERS`, `DB_READ_URLS`, `DB_REPLICA_WAIT`,
    /// `DB_MAX_REPLICA_LAG`. A bad value is a `StoreError::Configuration` naming the variable.
    pub fn from_env() -> Result<Self, StoreError> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// [`from_env`](Self::from_env) reading variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, StoreError> {
        let mut c = PgConfig::default();
        let get = |k: &str| lookup(k).filter(|v| !v.is_empty());
        if let Some(url) = get("DATABASE_URL") {
            c.apply_url("DATABASE_URL", &url)?;
        } else {
            let host = get("DB_HOST").unwrap_or_else(|| "localhost".to_owned());
            let port = match get("DB_PORT") {
                Some(v) => v
                    .parse()
                    .map_err(|e| bad("DB_PORT", format!("{v:?}: {e}")))?,
                None => 5432,
            };
            c = c.host(&host).port(port);
            if let Some(v) = get("DB_NAME") {
                c.pg.dbname(&v);
            }
            if let Some(v) = get("DB_USER") {
                c.pg.user(&v);
            }
            if let Some(v) = get("DB_PASSWORD") {
                c.pg.password(v);
            }
        }
        let num = |k: &str| -> Result<Option<u32>, StoreError> {
            get(k)
                .map(|v| v.parse::<u32>().map_err(|e| bad(k, format!("{v:?}: {e}"))))
                .transpose()
        };
        let secs = |k: &str| -> Result<Option<Duration>, StoreError> {
            get(k)
                .map(|v| {
                    v.parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s > 0.0)
                        .and_then(|s| Duration::try_from_secs_f64(s).ok())
                        .ok_or_else(|| bad(k, format!("{v:?} is not a positive number of seconds")))
                })
                .transpose()
        };
        if let Some(v) = num("DB_SAVE_LANES")? {
            c.save_lanes = v;
        }
        if let Some(v) = num("DB_STATUS_LANES")? {
            c.status_lanes = v;
        }
        if let Some(v) = num("DB_MAX_WATCHERS")? {
            c.max_watchers = v;
        }
        if let Some(v) = num("DB_MIN_SIZE")? {
            c.min_size = v;
        }
        if let Some(v) = num("DB_MAX_SIZE")? {
            c.max_size = v;
        }
        if let Some(v) = secs("DB_COMMAND_TIMEOUT")? {
            c.command_timeout = v;
            c.statement_timeout = v;
        }
        if let Some(v) = secs("DB_STATEMENT_TIMEOUT")? {
            c.statement_timeout = v;
        }
        if let Some(v) = secs("DB_CONNECT_TIMEOUT")? {
            c.connect_timeout = v;
        }
        if let Some(v) = secs("DB_POOL_TIMEOUT")? {
            c.pool_timeout = v;
        }
        if let Some(v) = secs("DB_WATCH_POLL")? {
            c.watch_poll = v;
        }
        if let Some(v) = get("DB_SSLMODE") {
            c.ssl_mode = v.parse().map_err(|e| bad("DB_SSLMODE", e))?;
        }
        if let Some(v) = get("DB_SSLROOTCERT") {
            c.ssl_root_cert = Some(PathBuf::from(v));
        }
        if let Some(v) = get("DB_APPLICATION_NAME") {
            c.pg.application_name(&v);
        }
        let flag = |k: &str| -> Result<Option<bool>, StoreError> {
            get(k)
                .map(|v| match v.to_ascii_lowercase().as_str() {
                    "1" | "true" | "yes" | "on" => Ok(true),
                    "0" | "false" | "no" | "off" => Ok(false),
                    _ => Err(bad(k, format!("{v:?}: expected true or false"))),
                })
                .transpose()
        };
        if let Some(v) = flag("DB_PGBOUNCER")? {
            c.pgbouncer = v;
        }
        if let Some(v) = flag("DB_DECLARE_USERS")? {
            c.declare_users = v;
        }
        if let Some(v) = get("DB_SCHEMA") {
            c.schema = Some(v);
        }
        if let Some(v) = get("DB_PARTITION_INTERVAL") {
            c.partitioning = Some(Partitioning {
                interval: v.parse().map_err(|e| bad("DB_PARTITION_INTERVAL", e))?,
                ..Partitioning::default()
            });
        }
        if let Some(ahead) = num("DB_PARTITIONS_AHEAD")? {
            let p = c.partitioning.get_or_insert_with(Partitioning::default);
            p.ahead = ahead;
        }
        if let Some(v) = num("DB_COPY_MIN_ROWS")? {
            c.copy_min_rows = (v > 0).then_some(v);
        }
        if let Some(v) = num("DB_COPY_CONNECTIONS")? {
            c.copy_connections = v;
        }
        if let Some(v) = num("DB_PIPELINED_READS")? {
            c.pipelined_reads = v;
        }
        if let Some(v) = get("DB_READ_URLS") {
            c = c.read_urls_from("DB_READ_URLS", v.split(','))?;
        }
        if let Some(v) = get("DB_REPLICA_WAIT") {
            // Zero is a wait too: a read not served by a replica at once goes to the primary.
            c.replica_wait = v
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .ok_or_else(|| {
                    bad(
                        "DB_REPLICA_WAIT",
                        format!("{v:?} is not a number of seconds (0 or more)"),
                    )
                })?;
        }
        if let Some(v) = secs("DB_MAX_REPLICA_LAG")? {
            c.max_replica_lag = v;
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the settings hang together; `connect` calls it.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.max_size == 0 {
            return Err(bad("DB_MAX_SIZE", "must be at least 1"));
        }
        if self.copy_connections == 0 {
            return Err(bad("DB_COPY_CONNECTIONS", "must be at least 1"));
        }
        if self.max_watchers == 0 {
            return Err(bad("DB_MAX_WATCHERS", "must be at least 1"));
        }
        if self.min_size > self.max_size {
            return Err(bad(
                "DB_MIN_SIZE",
                format!("{} is above DB_MAX_SIZE {}", self.min_size, self.max_size),
            ));
        }
        for (name, d) in [
            ("DB_COMMAND_TIMEOUT", self.command_timeout),
            ("DB_STATEMENT_TIMEOUT", self.statement_timeout),
            ("DB_CONNECT_TIMEOUT", self.connect_timeout),
            ("DB_POOL_TIMEOUT", self.pool_timeout),
            ("DB_WATCH_POLL", self.watch_poll),
            ("DB_MAX_REPLICA_LAG", self.max_replica_lag),
        ] {
            if d.is_zero() {
                return Err(bad(name, "must be above zero"));
            }
        }
        if let Some(s) = &self.schema {
            let valid = !s.is_empty()
                && s.len() <= 63
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !s.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err(bad(
                    "DB_SCHEMA",
                    format!("{s:?} is not a plain identifier (letters, digits, _; at most 63)"),
                ));
            }
        }
        if self.pg.get_hosts().is_empty() {
            return Err(bad("DB_HOST", "no host given"));
        }
        Ok(())
    }

    /// Sets the host (replacing any set before).
    pub fn host(mut self, host: &str) -> Self {
        let port = self.pg.get_ports().first().copied().unwrap_or(5432);
        self.pg = self.rebuilt(host, port);
        self
    }
    /// Sets the port (replacing any set before).
    pub fn port(mut self, port: u16) -> Self {
        let host = match self.pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "localhost".to_owned(),
        };
        self.pg = self.rebuilt(&host, port);
        self
    }

    /// The connection settings with one host and port (tokio-postgres only appends them).
    fn rebuilt(&self, host: &str, port: u16) -> tokio_postgres::Config {
        let mut pg = tokio_postgres::Config::new();
        pg.host(host).port(port);
        if let Some(u) = self.pg.get_user() {
            pg.user(u);
        }
        if let Some(p) = self.pg.get_password() {
            pg.password(p);
        }
        if let Some(d) = self.pg.get_dbname() {
            pg.dbname(d);
        }
        if let Some(a) = self.pg.get_application_name() {
            pg.application_name(a);
        }
        pg
    }
    /// Sets the database name.
    pub fn dbname(mut self, dbname: &str) -> Self {
        self.pg.dbname(dbname);
        self
    }
    /// Sets the user.
    pub fn user(mut self, user: &str) -> Self {
        self.pg.user(user);
        self
    }
    /// Sets the password.
    pub fn password(mut self, password: impl AsRef<[u8]>) -> Self {
        self.pg.password(password);
        self
    }
    /// Sets `application_name`, shown in `pg_stat_activity`.
    pub fn application_name(mut self, name: &str) -> Self {
        self.pg.application_name(name);
        self
    }
    /// Sets the pool's size bounds.
    pub fn pool_size(mut self, min: u32, max: u32) -> Self {
        self.min_size = min;
        self.max_size = max;
        self
    }
    /// How many single saves run as statements at once (`DB_SAVE_LANES`, default 2). More
    /// concurrent saves queue, and each lane then writes the queued saves in one statement
    /// and one commit, each caller getting its own outcome after that commit. A save that
    /// finds a lane free goes at once. 0 turns combining off: every save is then its own
    /// statement on its own pooled connection.
    pub fn save_lanes(mut self, lanes: u32) -> Self {
        self.save_lanes = lanes;
        self
    }
    /// How many status checks run as statements at once (`DB_STATUS_LANES`, default 4:
    /// two for each of the default two connections reads share, so each has one statement
    /// running and one waiting). More concurrent checks queue, and each lane then reads
    /// every queued task in one statement, each caller getting its own task's status. A
    /// check that finds a lane free goes at once, by its own statement. 0 turns combining
    /// off: every check is then its own statement. Other reads are never combined.
    pub fn status_lanes(mut self, lanes: u32) -> Self {
        self.status_lanes = lanes;
        self
    }
    /// How often a watcher reads the log of events without being woken (`DB_WATCH_POLL`,
    /// seconds, default 1): the latest a write whose wake-up never left (a process that
    /// died after its commit, a lost listener) reaches watchers.
    pub fn watch_poll(mut self, every: Duration) -> Self {
        self.watch_poll = every;
        self
    }
    /// How many watches (`watch_task`, `watch_user` streams) may be open at once in this
    /// store (`DB_MAX_WATCHERS`, default 100,000; at least 1). Past it a new watch fails
    /// with `StoreError::LimitReached` and nothing starts; a stream dropped or ended frees
    /// its place. Each open watch costs memory only (at most 256 buffered events), never
    /// a query of its own once it has caught up: the store reads the log once for all.
    pub fn max_watchers(mut self, max: u32) -> Self {
        self.max_watchers = max;
        self
    }
    /// Client-side limit for one operation's database work; past it the operation fails
    /// with `StoreError::Timeout` and its connection is discarded, never reused half-used.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }
    /// Server-side `statement_timeout` set on every connection.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }
    /// How long a caller waits for a free connection before `StoreError::Unavailable`.
    pub fn pool_timeout(mut self, timeout: Duration) -> Self {
        self.pool_timeout = timeout;
        self
    }
    /// Limit for opening one connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
    /// TLS mode.
    pub fn ssl_mode(mut self, mode: SslMode) -> Self {
        self.ssl_mode = mode;
        self
    }
    /// PEM file of trusted root certificates for `verify-full` (else the system's roots).
    pub fn ssl_root_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.ssl_root_cert = Some(path.into());
        self
    }
    /// PostgreSQL schema holding the store's tables (created if missing); `None` for the
    /// connection's default (`public`). Letters, digits and `_` only.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }
    /// Calls `observer` with the SQL text of every statement the store sends (migrations
    /// included), before sending it: for statement logs and audits (bound values are not
    /// included). None set costs nothing.
    pub fn observe_statements(mut self, observer: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.statement_observer = Some(std::sync::Arc::new(observer));
        self
    }

    /// A direct connection for the watchers' `LISTEN` when the store itself goes through
    /// PgBouncer in transaction mode, where `LISTEN` cannot work (`DB_LISTEN_URL`).
    pub fn listen_url(mut self, url: &str) -> Result<Self, StoreError> {
        self.listen = Some(
            url.parse()
                .map_err(|e| bad("DB_LISTEN_URL", format!("not a PostgreSQL URL: {e}")))?,
        );
        Ok(self)
    }

    /// Batches of at least this many steps whose tasks are all new go in by `COPY` (binary)
    /// into `task_history`, after one statement that creates their summaries (in a store
    /// that declares its users, by `INSERT`s of arrays, a statement per 10,000 rows:
    /// PostgreSQL refuses `COPY FROM` into a table with row-level security); other batches
    /// (and any batch touching a task that already exists) use the upsert statement. `None`:
    /// never. Default 1,000 (`DB_COPY_MIN_ROWS`, 0 = never).
    pub fn copy_min_rows(mut self, min_rows: Option<u32>) -> Self {
        self.copy_min_rows = min_rows;
        self
    }

    /// Connections shared by concurrent reads (status checks, history loads, task lists),
    /// whose statements are pipelined: many small reads then cost the client and the server
    /// a few socket reads and writes instead of one round trip each. Default 2
    /// (`DB_PIPELINED_READS`); 0 sends reads through the pool like writes. Not used behind a
    /// transaction pooler.
    pub fn pipelined_reads(mut self, connections: u32) -> Self {
        self.pipelined_reads = connections;
        self
    }

    /// After their commit, saves and cancellations wake the watchers of their users in
    /// every process (`pg_notify`, from the store's notifier, never a writer's
    /// transaction), so watchers read the new events at once. Default on;
    /// `DB_NOTIFY=false` turns it off: watchers then see this store's writes at their next
    /// poll ([`watch_poll`](Self::watch_poll)). A wake-up never carries an event: losing one
    /// costs latency, never an event.
    pub fn notifications(mut self, on: bool) -> Self {
        self.notifications = on;
        self
    }

    /// The server is reached through PgBouncer in transaction pooling mode (or another pooler
    /// that does not keep sessions): no start-up `options`, no cached prepared statements;
    /// each operation runs in its own transaction that sets `statement_timeout` and
    /// `search_path` with `SET LOCAL`. Two more round trips per operation. Migrations must
    /// then be run on a direct connection (`init_database_schema` only checks them).
    pub fn pgbouncer(mut self, on: bool) -> Self {
        self.pgbouncer = on;
        self
    }

    /// Retries of transient failures.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The partitioned layout: `init_database_schema` converts a plain `task_history` into
    /// it and makes partitions ahead (`DB_PARTITION_INTERVAL` = day, week or month turns it
    /// on; `DB_PARTITIONS_AHEAD`, default 3). `None` (the default) keeps the layout found,
    /// and still makes partitions ahead if it is partitioned.
    pub fn partitioning(mut self, partitioning: Option<Partitioning>) -> Self {
        self.partitioning = partitioning;
        self
    }

    /// Connections of the second, lazily opened pool that carries `COPY` batches (diesel-async
    /// cannot send `COPY`); a batch waits for one when all are busy. Default 2
    /// (`DB_COPY_CONNECTIONS`).
    pub fn copy_connections(mut self, connections: u32) -> Self {
        self.copy_connections = connections;
        self
    }

    /// Declares the users of every operation to the server even while row-level isolation
    /// is off (`DB_DECLARE_USERS`, default false). A store declares whenever isolation is on
    /// when it opens (or is switched on through it); this makes a store opened while it is
    /// off declare too, so that switching isolation on (`taskhistory isolation on`) finds
    /// every running service ready and no caller sees an empty answer in between. Costs a
    /// small statement sent ahead of each lone statement (no round trip of its own; reads
    /// on shared connections declare inside their own statement), batches of new tasks go
    /// by `INSERT`s of arrays instead of `COPY` (which PostgreSQL refuses into a table with
    /// row-level security), and the work on every user's rows (retention, statistics)
    /// needs the tables' owner. See docs/reliability.md, "Row-level isolation: the threat
    /// model".
    pub fn declare_users(mut self, on: bool) -> Self {
        self.declare_users = on;
        self
    }

    /// Test-only: every declaration names `user` instead of the operation's own users, as
    /// a store with a bug would (feature `test-internals`): with isolation on, such a store
    /// reads and writes nothing of the users its statements name.
    #[cfg(feature = "test-internals")]
    #[doc(hidden)]
    pub fn declare_as(mut self, user: Option<String>) -> Self {
        self.declare_as = user;
        self
    }

    /// Streaming replicas (standbys of this primary) that serve reads (`DB_READ_URLS`,
    /// comma-separated): status checks, history loads, task lists, counts and activity go
    /// to one that has replayed every write this store made for the user read (and every
    /// position given by [`require_position`](crate::PgTaskHistoryStore::require_position)),
    /// else to the primary; writes, cancels, batches, scans, watching, DDL and migrations
    /// stay on the primary. Each replica gets a pool like the primary's (same size, TLS,
    /// timeouts, schema and start-up settings; a URL's own `sslmode`/`sslrootcert` win).
    /// Replaces any set before; an empty list turns replicas off. A URL that does not
    /// parse is a `StoreError::Configuration` naming `DB_READ_URLS`.
    pub fn read_urls<S: AsRef<str>>(
        self,
        urls: impl IntoIterator<Item = S>,
    ) -> Result<Self, StoreError> {
        self.read_urls_from("DB_READ_URLS", urls)
    }

    fn read_urls_from<S: AsRef<str>>(
        mut self,
        setting: &str,
        urls: impl IntoIterator<Item = S>,
    ) -> Result<Self, StoreError> {
        let mut parsed = Vec::new();
        for url in urls {
            let url = url.as_ref().trim();
            if !url.is_empty() {
                parsed.push(self.parse_url(setting, url)?);
            }
        }
        self.read_urls = parsed;
        Ok(self)
    }

    /// How long a read waits for a replica to replay what it must see before it goes to
    /// the primary (`DB_REPLICA_WAIT`, seconds, default 0.05; 0: never wait).
    pub fn replica_wait(mut self, wait: Duration) -> Self {
        self.replica_wait = wait;
        self
    }

    /// A replica further behind the primary than this leaves the rotation until it
    /// catches up (`DB_MAX_REPLICA_LAG`, seconds, default 5; above zero).
    pub fn max_replica_lag(mut self, lag: Duration) -> Self {
        self.max_replica_lag = lag;
        self
    }

    /// The settings of replica `i` of [`read_urls`](Self::read_urls): these settings with
    /// the replica's connection settings (its URL's TLS options, when given, over these).
    pub(crate) fn for_replica(&self, i: usize) -> Option<PgConfig> {
        let url = self.read_urls.get(i)?;
        let mut c = self.clone();
        c.read_urls = Vec::new();
        c.pg = url.pg.clone();
        if let Some(mode) = url.ssl_mode {
            c.ssl_mode = mode;
        }
        if let Some(root) = &url.ssl_root_cert {
            c.ssl_root_cert = Some(root.clone());
        }
        Some(c)
    }

    /// Sets whether a lone save takes the combined statement too (default false). Only for
    /// the workspace's own tests, which run every save through the combined statement on
    /// one of the behaviour suite's stores (feature `test-internals`).
    #[cfg(feature = "test-internals")]
    #[doc(hidden)]
    pub fn combine_lone_saves(mut self, on: bool) -> Self {
        self.combine_lone_saves = on;
        self
    }

    /// Sets whether a lone status check takes the combined statement too (default false).
    /// Only for the workspace's own tests, as [`combine_lone_saves`](Self::combine_lone_saves).
    #[cfg(feature = "test-internals")]
    #[doc(hidden)]
    pub fn combine_lone_statuses(mut self, on: bool) -> Self {
        self.combine_lone_statuses = on;
        self
    }
}

/// Reading the settings back (the builder methods above set them; each is described there
/// and in `docs/operations.md`).
impl PgConfig {
    /// The database name.
    pub fn get_dbname(&self) -> Option<&str> {
        self.pg.get_dbname()
    }
    /// The user.
    pub fn get_user(&self) -> Option<&str> {
        self.pg.get_user()
    }
    /// `application_name`.
    pub fn get_application_name(&self) -> Option<&str> {
        self.pg.get_application_name()
    }
    /// The TLS mode.
    pub fn get_ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }
    /// The PEM file of trusted roots for verify-full, if set.
    pub fn get_ssl_root_cert(&self) -> Option<&std::path::Path> {
        self.ssl_root_cert.as_deref()
    }
    /// The pool's size bounds, `(min, max)`.
    pub fn get_pool_size(&self) -> (u32, u32) {
        (self.min_size, self.max_size)
    }
    /// The client-side command timeout.
    pub fn get_command_timeout(&self) -> Duration {
        self.command_timeout
    }
    /// The server-side `statement_timeout`.
    pub fn get_statement_timeout(&self) -> Duration {
        self.statement_timeout
    }
    /// The connect timeout.
    pub fn get_connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
    /// How long callers wait for a free connection.
    pub fn get_pool_timeout(&self) -> Duration {
        self.pool_timeout
    }
    /// The schema of the store's tables (`None`: the connection's default).
    pub fn get_schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }
    /// The retry policy.
    pub fn get_retry(&self) -> &RetryPolicy {
        &self.retry
    }
    /// Whether writes wake watchers in every process.
    pub fn get_notifications(&self) -> bool {
        self.notifications
    }
    /// How many single saves run as statements at once.
    pub fn get_save_lanes(&self) -> u32 {
        self.save_lanes
    }
    /// How many status checks run as statements at once.
    pub fn get_status_lanes(&self) -> u32 {
        self.status_lanes
    }
    /// How often watchers read without a wake-up.
    pub fn get_watch_poll(&self) -> Duration {
        self.watch_poll
    }
    /// How many watches may be open at once.
    pub fn get_max_watchers(&self) -> u32 {
        self.max_watchers
    }
    /// Whether the store declares its users even while isolation is off.
    pub fn get_declare_users(&self) -> bool {
        self.declare_users
    }
    /// Whether the store talks through a transaction pooler.
    pub fn get_pgbouncer(&self) -> bool {
        self.pgbouncer
    }
    /// The partitioned layout asked for, if any.
    pub fn get_partitioning(&self) -> Option<Partitioning> {
        self.partitioning
    }
    /// The smallest batch of new tasks that goes by `COPY` (`None`: never).
    pub fn get_copy_min_rows(&self) -> Option<u32> {
        self.copy_min_rows
    }
    /// The most connections of the `COPY` pool.
    pub fn get_copy_connections(&self) -> u32 {
        self.copy_connections
    }
    /// How many connections concurrent reads share.
    pub fn get_pipelined_reads(&self) -> u32 {
        self.pipelined_reads
    }
    /// The replicas that serve reads, as `host:port/database` (never a password).
    pub fn get_read_urls(&self) -> Vec<String> {
        self.read_urls.iter().map(ReadUrl::shown).collect()
    }
    /// How long a read waits for a replica to catch up.
    pub fn get_replica_wait(&self) -> Duration {
        self.replica_wait
    }
    /// The lag past which a replica leaves the rotation.
    pub fn get_max_replica_lag(&self) -> Duration {
        self.max_replica_lag
    }
}

/// Removes `keys` from a URL's query string or a key=value string, returning what remains and
/// the removed pairs.
fn take_params(url: &str, keys: &[&str]) -> (String, Vec<(String, String)>) {
    let mut taken = Vec::new();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), taken);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some((k, v)) if keys.contains(&k) => taken.push((k.to_owned(), v.to_owned())),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (rest, taken)
    } else {
        let mut kept = Vec::new();
        for pair in url.split_whitespace() {
            match pair.split_once('=') {
                Some((k, v)) if keys.contains(&k) => taken.push((k.to_owned(), v.to_owned())),
                _ => kept.push(pair),
            }
        }
        (kept.join(" "), taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn seed_variables_and_defaults() {
        let c = PgConfig::from_lookup(env(&[
            ("DB_HOST", "db.internal"),
            ("DB_PORT", "6543"),
            ("DB_NAME", "aiecs_db"),
            ("DB_USER", "aiecs_user"),
            ("DB_PASSWORD", "aiecs_password"),
            ("DB_MAX_SIZE", "50"),
        ]))
        .unwrap();
        assert_eq!(c.pg.get_ports(), [6543]);
        assert_eq!(c.pg.get_dbname(), Some("aiecs_db"));
        assert_eq!((c.min_size, c.max_size), (10, 50));
        assert_eq!(c.command_timeout, Duration::from_secs(60));
        assert_eq!(c.pg.get_application_name(), Some("taskhistory"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("DB_PORT", "x"),
            ("DB_MAX_SIZE", "-1"),
            ("DB_COMMAND_TIMEOUT", "0"),
            ("DB_SSLMODE", "maybe"),
            ("DB_SCHEMA", "a;b"),
            ("DB_PGBOUNCER", "maybe"),
        ] {
            match PgConfig::from_lookup(env(&[(k, v)])) {
                Err(StoreError::Configuration { setting, .. }) => assert_eq!(setting, k),
                other => panic!("{k}={v}: {other:?}"),
            }
        }
        let e = PgConfig::from_lookup(env(&[("DB_MIN_SIZE", "30"), ("DB_MAX_SIZE", "20")]))
            .unwrap_err();
        assert!(e.to_string().contains("DB_MIN_SIZE"));
        assert!(
            PgConfig::from_lookup(env(&[("DB_PGBOUNCER", "true")]))
                .unwrap()
                .pgbouncer
        );
        assert!(!PgConfig::from_lookup(env(&[])).unwrap().pgbouncer);
    }

    #[test]
    fn copy_batches_and_shared_reads_from_the_environment() {
        let d = PgConfig::from_lookup(env(&[])).unwrap();
        assert_eq!(
            (d.copy_min_rows, d.copy_connections, d.pipelined_reads),
            (Some(1_000), 2, 2)
        );
        let c = PgConfig::from_lookup(env(&[
            ("DB_COPY_MIN_ROWS", "0"),
            ("DB_COPY_CONNECTIONS", "3"),
            ("DB_PIPELINED_READS", "0"),
        ]))
        .unwrap();
        assert_eq!(
            (c.copy_min_rows, c.copy_connections, c.pipelined_reads),
            (None, 3, 0)
        );
        let c = PgConfig::from_lookup(env(&[("DB_COPY_MIN_ROWS", "500")])).unwrap();
        assert_eq!(c.copy_min_rows, Some(500));
        for (k, v) in [
            ("DB_COPY_CONNECTIONS", "0"),
            ("DB_COPY_MIN_ROWS", "-1"),
            ("DB_PIPELINED_READS", "x"),
        ] {
            match PgConfig::from_lookup(env(&[(k, v)])) {
                Err(StoreError::Configuration { setting, .. }) => assert_eq!(setting, k),
                other => panic!("{k}={v}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_bad_url_says_which_part_and_names_no_variable_it_did_not_read() {
        for (url, says) in [
            ("postgres://app@db:notaport/tasks", "port"),
            ("mysql://app@db:3306/tasks", "\"mysql\""),
        ] {
            match PgConfig::from_url(url) {
                Err(StoreError::Configuration { setting, reason }) => {
                    assert_eq!(setting, "url", "{url}");
                    assert!(reason.contains(says), "{url}: {reason}");
                }
                other => panic!("{url}: {other:?}"),
            }
            match PgConfig::from_lookup(env(&[("DATABASE_URL", url)])) {
                Err(StoreError::Configuration { setting, .. }) => {
                    assert_eq!(setting, "DATABASE_URL")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    #[test]
    fn url_with_verify_full_and_no_password_in_debug() {
        let c = PgConfig::from_lookup(env(&[(
            "DATABASE_URL",
            "postgres://app:s3cr3t-pw@db:5433/tasks?sslmode=verify-full&sslrootcert=/etc/ca.pem&connect_timeout=5",
        )]))
        .unwrap();
        assert_eq!(c.ssl_mode, SslMode::VerifyFull);
        assert_eq!(c.ssl_root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(c.pg.get_dbname(), Some("tasks"));
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t-pw"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn replicas_from_the_environment_with_no_password_shown() {
        let d = PgConfig::from_lookup(env(&[])).unwrap();
        assert!(d.read_urls.is_empty());
        assert_eq!(d.replica_wait, Duration::from_millis(50));
        assert_eq!(d.max_replica_lag, Duration::from_secs(5));
        let c = PgConfig::from_lookup(env(&[
            ("DATABASE_URL", "postgres://app:pw@primary:5432/tasks?sslmode=require"),
            (
                "DB_READ_URLS",
                "postgres://app:r3pl1ca-pw@r1:5433/tasks, postgres://app:r3pl1ca-pw@r2/tasks?sslmode=disable",
            ),
            ("DB_REPLICA_WAIT", "0"),
            ("DB_MAX_REPLICA_LAG", "2.5"),
        ]))
        .unwrap();
        assert_eq!(c.get_read_urls(), ["r1:5433/tasks", "r2:5432/tasks"]);
        assert_eq!(c.replica_wait, Duration::ZERO);
        assert_eq!(c.max_replica_lag, Duration::from_millis(2500));
        let shown = format!("{c:?}");
        assert!(!shown.contains("r3pl1ca-pw"), "{shown}");
        // The primary's TLS holds unless a replica's URL says otherwise.
        let r1 = c.for_replica(0).unwrap();
        assert_eq!(r1.ssl_mode, SslMode::Require);
        assert_eq!(r1.pg.get_ports(), [5433]);
        assert!(r1.read_urls.is_empty());
        assert_eq!(c.for_replica(1).unwrap().ssl_mode, SslMode::Disable);
        assert!(c.for_replica(2).is_none());
        for (k, v) in [
            ("DB_READ_URLS", "mysql://r1/tasks"),
            ("DB_READ_URLS", "postgres://r1:x/tasks"),
            ("DB_REPLICA_WAIT", "-1"),
            ("DB_MAX_REPLICA_LAG", "0"),
        ] {
            match PgConfig::from_lookup(env(&[(k, v)])) {
                Err(StoreError::Configuration { setting, .. }) => assert_eq!(setting, k),
                other => panic!("{k}={v}: {other:?}"),
            }
        }
    }
}
