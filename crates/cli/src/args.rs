//! Command-line arguments, and the configuration lookup: flags over environment over
//! defaults.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use taskhistory_core::TaskStatus;
use taskhistory_postgres::PartitionInterval;

use crate::error::exit;

/// The operator tool of the taskhistory store.
#[derive(Debug, Parser)]
#[command(name = "taskhistory", version, about, after_help = exit::HELP)]
pub(crate) struct Cli {
    /// Where the store is.
    #[command(flatten)]
    pub(crate) db: DbArgs,
    /// Print JSON for scripts instead of tables (one document, or one line per record).
    #[arg(long, global = true, help_heading = "Global options (every command)")]
    pub(crate) json: bool,
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Connection settings; each overrides the environment variable named in its help. A
/// subcommand's help lists them apart from its own options.
#[derive(Debug, Args)]
#[command(next_help_heading = "Connection options (every command)")]
pub(crate) struct DbArgs {
    /// PostgreSQL URL, e.g. postgres://user@host/db?sslmode=verify-full [env: DATABASE_URL]
    #[arg(long, global = true, value_name = "URL")]
    pub(crate) database_url: Option<String>,
    /// Schema holding the store's tables [env: DB_SCHEMA; default: the search path]
    #[arg(long, global = true, value_name = "NAME")]
    pub(crate) schema: Option<String>,
    /// disable, prefer, require or verify-full [env: DB_SSLMODE]
    #[arg(long, global = true, value_name = "MODE")]
    pub(crate) sslmode: Option<String>,
    /// CA certificate (PEM) for verify-full [env: DB_SSLROOTCERT]
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) sslrootcert: Option<PathBuf>,
    /// Seconds a statement may take [env: DB_COMMAND_TIMEOUT; default 60]
    #[arg(long, global = true, value_name = "SECS")]
    pub(crate) command_timeout: Option<String>,
    /// Seconds to wait for a connection [env: DB_CONNECT_TIMEOUT; default 10]
    #[arg(long, global = true, value_name = "SECS")]
    pub(crate) connect_timeout: Option<String>,
    /// Use an empty in-memory store instead of PostgreSQL: to try commands, or to check an
    /// import file without a database. Nothing is kept.
    #[arg(long, global = true, conflicts_with = "database_url")]
    pub(crate) memory: bool,
    /// Set for `serve`: a long-lived process with many clients gets a larger pool.
    #[arg(skip)]
    pub(crate) serving: bool,
}

impl DbArgs {
    /// The value of configuration variable `key`: the flag, else the environment, else the
    /// tool's default (a small pool: each command is one short process).
    pub(crate) fn lookup(&self, key: &str) -> Option<String> {
        let flag = match key {
            "DATABASE_URL" => self.database_url.clone(),
            "DB_SCHEMA" => self.schema.clone(),
            "DB_SSLMODE" => self.sslmode.clone(),
            "DB_SSLROOTCERT" => self
                .sslrootcert
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            "DB_COMMAND_TIMEOUT" => self.command_timeout.clone(),
            "DB_CONNECT_TIMEOUT" => self.connect_timeout.clone(),
            _ => None,
        };
        flag.or_else(|| std::env::var(key).ok().filter(|v| !v.is_empty()))
            .or_else(|| {
                match key {
                    "DB_MIN_SIZE" => Some("1"),
                    "DB_MAX_SIZE" if self.serving => Some("16"),
                    "DB_MAX_SIZE" => Some("4"),
                    "DB_APPLICATION_NAME" => Some("taskhistory-cli"),
                    _ => None,
                }
                .map(str::to_owned)
            })
    }
}

/// The commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Apply pending migrations (safe to run from several places at once).
    Migrate {
        /// Only list applied and pending migrations.
        #[arg(long)]
        status: bool,
    },
    /// Check the store: exit 0 when healthy, 1 otherwise, with the reason.
    Health,
    /// Pool figures, tasks and steps per status, table and index sizes, oldest and newest
    /// activity.
    Stats {
        /// Instead: the store's statements from pg_stat_statements, most total time first.
        #[arg(long)]
        queries: bool,
        /// How many statements --queries lists.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// The plans PostgreSQL uses for the store's statements, on the current data.
    Explain {
        /// Sample user for the plans (they are generic plans: the value does not change them).
        #[arg(long, default_value = "user_123")]
        user: String,
        /// Sample task.
        #[arg(long, default_value = "task_456")]
        task: String,
        /// Also run each statement (EXPLAIN ANALYZE, BUFFERS) in a transaction rolled back.
        #[arg(long)]
        analyze: bool,
    },
    /// A task's steps, in step order.
    History {
        /// The task's user.
        user: String,
        /// The task.
        task: String,
    },
    /// A task's status; `pending` for a task the store has never seen (as the API says).
    Status {
        /// The task's user.
        user: String,
        /// The task.
        task: String,
    },
    /// A user's tasks, newest activity first, one page at a time.
    Tasks {
        /// The user.
        user: String,
        /// Tasks per page (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Continue after this cursor (printed after each page).
        #[arg(long)]
        cursor: Option<String>,
        /// Only tasks in this status.
        #[arg(long, value_parser = parse_status)]
        status: Option<TaskStatus>,
        /// Only tasks last updated at or after this RFC 3339 time (inclusive).
        #[arg(long, value_parser = parse_time)]
        updated_after: Option<DateTime<Utc>>,
        /// Only tasks last updated before this RFC 3339 time (exclusive).
        #[arg(long, value_parser = parse_time)]
        updated_before: Option<DateTime<Utc>>,
        /// Only tasks whose id starts with these bytes.
        #[arg(long, visible_alias = "task-id-prefix")]
        prefix: Option<String>,
    },
    /// A user's tasks per status and their total (kept by the writes: no scan).
    Counts {
        /// The user.
        user: String,
    },
    /// A user's activity per hour: steps saved, tasks completed, failed, cancelled, timed
    /// out (only hours with any activity, oldest first).
    Activity {
        /// The user.
        user: String,
        /// From this RFC 3339 time, cut to the hour (default: 24 hours before --to).
        #[arg(long, value_parser = parse_time)]
        from: Option<DateTime<Utc>>,
        /// Until this RFC 3339 time, exclusive, cut to the hour (default: the next hour
        /// boundary); at most 92 days after --from.
        #[arg(long, value_parser = parse_time)]
        to: Option<DateTime<Utc>>,
    },
    /// Cancel a task; later saves to it are refused.
    Cancel {
        /// The task's user.
        user: String,
        /// The task.
        task: String,
    },
    /// Remove whole tasks inactive for more than N days, in bounded batches.
    Cleanup {
        /// Retention in days (the Python service's default: 30).
        #[arg(long, default_value_t = 30, allow_negative_numbers = true)]
        days: i64,
        /// Only count what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Tasks removed per transaction.
        #[arg(long, default_value_t = 1000)]
        batch_size: i64,
        /// Stop after this many seconds; the next run continues.
        #[arg(long, value_name = "SECS")]
        time_limit: Option<f64>,
        /// Only tasks in this status (per-status retention: run once per status and period).
        #[arg(long, value_parser = parse_status)]
        status: Option<TaskStatus>,
    },
    /// Write a user's history (or one task's) as JSON Lines, one step per line, streaming.
    Export {
        /// The user.
        user: String,
        /// Only this task.
        task: Option<String>,
        /// Write to this file (replaced only when the export is complete) instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Read JSON Lines written by `export` and save them in batches; running it twice
    /// changes nothing. A batch holding a bad line is not written at all.
    Import {
        /// The file to read; `-` for stdin.
        file: PathBuf,
        /// Lines per batch (one all-or-nothing write each).
        #[arg(long, default_value_t = 1000)]
        batch_size: usize,
    },
    /// Print a user's task events (a task's only, when given) as they are committed, until
    /// interrupted; `--json` prints one JSON object per line, with its `cursor`. On exit,
    /// stderr names the cursor to go on from with `--after`.
    Watch {
        /// The user.
        user: String,
        /// Only this task.
        task: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Start after this event's cursor (from an earlier watch) instead of now: every
        /// write after it is printed once.
        #[arg(long)]
        after: Option<String>,
    },
    /// The Python compatibility mode, while the Python service still writes beside this
    /// one: its state, or switch it on or off (see docs/migrating-from-python.md).
    Compat {
        /// What to do (default: show the state).
        #[command(subcommand)]
        action: Option<CompatAction>,
    },
    /// Row-level isolation by user: its state, or switch it on or off (run as the tables'
    /// owner; see docs/reliability.md, "Row-level isolation").
    Isolation {
        /// What to do (default: show the state).
        #[command(subcommand)]
        action: Option<IsolationAction>,
    },
    /// The partitioned layout: list partitions, make them ahead, or convert the plain table.
    Partitions {
        /// What to do.
        #[command(subcommand)]
        action: PartitionsAction,
    },
    /// Serve the history over HTTP until interrupted: a JSON API, live events (SSE and
    /// WebSocket), a dashboard at `/` and Prometheus metrics. Tokens: TASKHISTORY_ADMIN_TOKEN
    /// (the operator: every user) and user tokens signed with TASKHISTORY_SECRET (`taskhistory
    /// token USER`).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: std::net::SocketAddr,
        /// Certificate chain (PEM): serve HTTPS (with --tls-key).
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// Private key (PEM) of --tls-cert.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// An origin whose pages may call the API (repeat for several); none by default.
        #[arg(long = "cors-origin", value_name = "ORIGIN")]
        cors_origins: Vec<String>,
        /// Seconds between heartbeats on an idle event stream (keeps proxies from closing it).
        #[arg(long, default_value_t = 15, value_name = "SECS")]
        heartbeat: u64,
        /// The bounds every client is held to.
        #[command(flatten)]
        limits: crate::serve::Limits,
    },
    /// Print a token that reaches USER's history only (for that user's browser), signed
    /// with TASKHISTORY_SECRET.
    Token {
        /// The user.
        user: String,
        /// How long it stays valid, e.g. 3600, 90s, 30m, 12h, 7d (at most --max-ttl).
        #[arg(long, default_value = "1h", value_parser = crate::serve::parse_duration)]
        ttl: std::time::Duration,
        /// The longest --ttl allowed; the server refuses tokens reaching further than its own
        /// --max-token-ttl (30d by default).
        #[arg(long, default_value = "30d", value_parser = crate::serve::parse_duration)]
        max_ttl: std::time::Duration,
    },
    /// The seed's section 4 scenarios end to end, on the in-memory store (or on PostgreSQL,
    /// in schema `taskhistory_demo`, with --database-url).
    Demo,
}

/// `taskhistory compat ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum CompatAction {
    /// Whether the mode is on, when the last Python write arrived, and how many there were.
    Status,
    /// Switch it on: the Python service's unchanged statements keep the store's rules
    /// (`migrate` does this when it adopts the Python service's table).
    On,
    /// Switch it off once no Python service writes any more: a Python INSERT then fails.
    Off,
}

/// `taskhistory isolation ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum IsolationAction {
    /// Per table: row-level security enabled, forced, the store's policies present.
    Status,
    /// Switch it on: every operation then sees and writes only the users it declares, the
    /// tables' owner included. Services opened before declare only with
    /// DB_DECLARE_USERS=true: set it (and restart them) first.
    On,
    /// Switch it off: the policies stay, and hold nothing.
    Off,
}

/// `taskhistory partitions ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum PartitionsAction {
    /// The layout and each partition: range, size, estimated rows.
    List,
    /// Make partitions for this period and N more (moving any rows the default partition
    /// holds for them). Run it from cron well before a period starts.
    Ensure {
        /// Periods past the current one.
        #[arg(long, default_value_t = 3)]
        ahead: u32,
    },
    /// Convert the plain table into the partitioned layout, in one transaction: writes wait
    /// while rows are copied (reads go on). Grants on the table must be given again after.
    Convert {
        /// Time one partition covers: day, week or month.
        #[arg(long, default_value = "month", value_parser = parse_interval)]
        interval: PartitionInterval,
        /// Periods past the current one to make.
        #[arg(long, default_value_t = 3)]
        ahead: u32,
    },
}

fn parse_interval(value: &str) -> Result<PartitionInterval, String> {
    value.parse()
}

fn parse_status(value: &str) -> Result<TaskStatus, String> {
    value.parse().map_err(|e| format!("{e}"))
}

fn parse_time(value: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 time (e.g. 2026-12-06T10:00:00Z): {e}"))
}
