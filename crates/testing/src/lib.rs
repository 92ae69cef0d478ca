//! Test support of the taskhistory workspace (not published): a real PostgreSQL server and
//! a fresh schema per test, PgBouncer, and servers of a test's own to restart or kill.
//!
//! The server is, in order: `TEST_DATABASE_URL` if set; else the local server at
//! 127.0.0.1:5432 (user `postgres`) if it answers; else a throwaway server started from the
//! installed binaries (`/usr/lib/postgresql/<version>/bin`, via pgtemp), stopped when the
//! test process exits. If none can be had, the test fails with a message saying how to get
//! one: a missing database is never a silent skip.
//!
//! Each test process creates its own database (`th_<pid>_<time>`) and role
//! (`th_app_<pid>`), dropped by `psql` when the process exits; each call of [`fresh_config`]
//! makes a new schema in it, so tests run in parallel without sharing state. What a killed
//! run left is swept at the next start: a database whose process is gone from this machine
//! and that nobody is connected to (a run on another machine sharing `TEST_DATABASE_URL`
//! holds connections while it lives), or any over a day old.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use taskhistory_core::{DynStore, RetryPolicy, TaskHistoryStore};
use tokio::sync::OnceCell;

use taskhistory_postgres::{PgConfig, PgTaskHistoryStore, SslMode};

/// Every SQL statement of the PostgreSQL store, by name: what the statement tests, the plan
/// examples and the benchmarks' raw-driver baselines send.
pub use taskhistory_postgres::sql_texts as sql;

const HOW_TO_GET_ONE: &str = "no PostgreSQL server for the tests. Either set \
TEST_DATABASE_URL=postgres://user:password@host:port/db, or start a server at 127.0.0.1:5432 \
(trust auth for user postgres; on Debian: pg_ctlcluster <version> main start), or install \
Debian's postgresql package (apt-get install postgresql) so a throwaway server can be started \
from its binaries. `bash .ci/run` does all of this for you.";

/// The server the tests use: a connection URL for an administrative database.
#[derive(Debug, Clone)]
pub struct TestServer {
    /// URL of a database the tests may create databases from.
    pub admin_url: String,
    /// Where it came from: `TEST_DATABASE_URL`, `local` or `throwaway`.
    pub source: &'static str,
}

static SERVER: OnceCell<TestServer> = OnceCell::const_new();
static DATABASE: OnceCell<String> = OnceCell::const_new();
static THROWAWAY: OnceLock<pgtemp::PgTempDB> = OnceLock::new();
static COUNTER: AtomicU64 = AtomicU64::new(0);

async fn answers(url: &str) -> Result<(), String> {
    let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok((client, conn))) => {
            let task = tokio::spawn(conn);
            let r = client
                .simple_query("SELECT 1")
                .await
                .map(drop)
                .map_err(|e| e.to_string());
            drop(client);
            let _ = task.await;
            r
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// The newest installed PostgreSQL's binaries (`/usr/lib/postgresql/<version>/bin`).
pub fn postgres_bin_dir() -> Option<std::path::PathBuf> {
    let mut versions: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

async fn start_throwaway() -> Result<TestServer, String> {
    let bin = postgres_bin_dir().ok_or("no PostgreSQL binaries under /usr/lib/postgresql")?;
    let db = tokio::task::spawn_blocking(move || {
        pgtemp::PgTempDB::builder()
            .with_bin_path(bin)
            .with_config_param("max_connections", "300")
            .with_config_param("fsync", "off")
            .start()
    })
    .await
    .map_err(|e| format!("starting a throwaway server failed: {e}"))?;
    let url = db.connection_uri();
    // Stop the server when this process exits: statics are never dropped.
    if let Ok(pid_file) = std::fs::read_to_string(db.data_dir().join("postmaster.pid")) {
        if let Some(pid) = pid_file.lines().next() {
            let me = std::process::id();
            let script = format!(
                "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -INT {pid}; sleep 2; rm -rf '{}'",
                db.data_dir().display()
            );
            let _ = std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .spawn();
        }
    }
    for _ in 0..50 {
        if answers(&url).await.is_ok() {
            let _ = THROWAWAY.set(db);
            return Ok(TestServer {
                admin_url: url,
                source: "throwaway",
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err("the throwaway server did not start answering".into())
}

/// The server, found or started once per process. Panics with instructions if there is none.
pub async fn server() -> &'static TestServer {
    SERVER
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
                if let Err(e) = answers(&url).await {
                    panic!("TEST_DATABASE_URL does not answer ({e}); {HOW_TO_GET_ONE}");
                }
                return TestServer {
                    admin_url: url,
                    source: "TEST_DATABASE_URL",
                };
            }
            let local = "postgres://postgres@127.0.0.1:5432/postgres";
            if answers(local).await.is_ok() {
                return TestServer {
                    admin_url: local.to_owned(),
                    source: "local",
                };
            }
            match start_throwaway().await {
                Ok(s) => s,
                Err(e) => panic!("{HOW_TO_GET_ONE} ({e})"),
            }
        })
        .await
}

/// A plain tokio-postgres client on this process's test database (its connection driven
/// in the background), for tests that act beside the store.
pub async fn test_db_client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&database_url().await, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test database: {e}"));
    tokio::spawn(conn);
    client
}

/// Holds the summary row of `u`/`task` in `schema` locked in an open transaction, so writes
/// to that task wait until the returned client rolls back (or is dropped).
pub async fn lock_summary(schema: &str, task: &str) -> tokio_postgres::Client {
    let client = test_db_client().await;
    client
        .batch_execute(&format!(
            "SET search_path TO {schema}; BEGIN; \
             SELECT 1 FROM task_summary WHERE user_id = 'u' AND task_id = '{task}' FOR UPDATE"
        ))
        .await
        .unwrap_or_else(|e| panic!("locking the summary of {task}: {e}"));
    client
}

/// Runs SQL on the admin database.
pub async fn admin_execute(sql: &str) {
    execute(&server().await.admin_url, sql).await;
}

async fn execute(url: &str, sql: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test server: {e}"));
    let task = tokio::spawn(conn);
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    drop(client);
    let _ = task.await;
}

fn url_for(admin_url: &str, dbname: &str) -> String {
    let mut config: tokio_postgres::Config = admin_url
        .parse()
        .unwrap_or_else(|e| panic!("the test server's URL does not parse: {e}"));
    config.dbname(dbname);
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    match config.get_password() {
        Some(p) => format!(
            "postgres://{user}:{}@{host}:{port}/{dbname}",
            String::from_utf8_lossy(p)
        ),
        None => format!("postgres://{user}@{host}:{port}/{dbname}"),
    }
}

/// This process's test database, created on first use.
pub async fn database_url() -> String {
    let server = server().await;
    let name = DATABASE
        .get_or_init(|| async {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let name = format!("th_{}_{now}", std::process::id());
            sweep(&server.admin_url, now).await;
            admin_execute(&format!("CREATE DATABASE {name}")).await;
            // Dropped when this process exits, however it ends: statics are never dropped.
            drop_at_exit(
                &server.admin_url,
                &[
                    format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                    format!("DROP OWNED BY {}", app_role()),
                    format!("DROP ROLE IF EXISTS {}", app_role()),
                    format!("DROP OWNED BY {}", owner_role()),
                    format!("DROP ROLE IF EXISTS {}", owner_role()),
                ],
            );
            name
        })
        .await;
    url_for(&server.admin_url, name)
}

/// Runs each of `statements` on the server with `psql` once this process has exited.
fn drop_at_exit(admin_url: &str, statements: &[String]) {
    let psql = std::process::Command::new("psql")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status();
    if !psql.is_ok_and(|s| s.success()) {
        panic!(
            "psql is needed to drop the test database when the tests end: \
             apt-get install postgresql-client (scripts/ensure-postgres.sh installs PostgreSQL)"
        );
    }
    let me = std::process::id();
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; \
         for s in \"$@\"; do psql -X -q -d \"$TH_ADMIN_URL\" -c \"$s\" >/dev/null 2>&1; done"
    );
    let spawned = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(statements)
        .env("TH_ADMIN_URL", admin_url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if let Err(e) = spawned {
        panic!("cannot arrange the test database's removal at exit (sh): {e}");
    }
}

/// Whether process `pid` is alive on this machine (a zombie is not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Drops what test processes that are gone left behind (a killed run): their databases
/// `th_<pid>_<time>` and roles `th_app_<pid>`, and anything of that kind over a day old.
async fn sweep(admin_url: &str, now: u64) {
    let Ok((client, conn)) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls).await else {
        return;
    };
    let task = tokio::spawn(conn);
    let left = |name: &str, connected: i64| {
        let mut parts = name.split('_').skip(1);
        let pid = parts.next().and_then(|p| p.parse::<u32>().ok());
        let created = parts.next().and_then(|t| t.parse::<u64>().ok());
        match pid {
            Some(pid) if pid != std::process::id() => {
                (!alive(pid) && connected == 0)
                    || created.is_some_and(|c| now.saturating_sub(c) > 86_400)
            }
            _ => false,
        }
    };
    if let Ok(rows) = client
        .query(
            "SELECT d.datname, (SELECT count(*) FROM pg_stat_activity a WHERE a.datname = d.datname) \
             FROM pg_database d WHERE d.datname ~ '^th_[0-9]+_[0-9]+$'",
            &[],
        )
        .await
    {
        for row in rows {
            let name: String = row.get(0);
            let connected: i64 = row.get(1);
            if left(&name, connected) {
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        }
    }
    if let Ok(rows) = client
        .query(
            "SELECT rolname FROM pg_roles WHERE rolname ~ '^th_(app|owner)_[0-9]+$' \
             OR rolname = 'taskhistory_test_app'",
            &[],
        )
        .await
    {
        for row in rows {
            let name: String = row.get(0);
            let gone = name == "taskhistory_test_app"
                || name
                    .rsplit('_')
                    .next()
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_some_and(|pid| pid != std::process::id() && !alive(pid));
            if gone {
                let _ = client
                    .batch_execute(&format!("DROP OWNED BY {name}; DROP ROLE IF EXISTS {name}"))
                    .await;
            }
        }
    }
    drop(client);
    let _ = task.await;
}

/// A configuration for a new, empty schema of this process's test database: small pool,
/// fast timeouts, quick retries.
pub async fn fresh_config() -> PgConfig {
    let url = database_url().await;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    PgConfig::from_url(&url)
        .unwrap_or_else(|e| panic!("the test database URL does not parse: {e}"))
        .ssl_mode(SslMode::Disable)
        .schema(format!("t{n}_{nanos}"))
        .pool_size(1, 8)
        .pool_timeout(Duration::from_secs(20))
        .retry(RetryPolicy {
            initial_backoff: Duration::from_millis(5),
            ..RetryPolicy::default()
        })
}

/// A migrated store on a fresh schema.
pub async fn fresh_store() -> PgTaskHistoryStore {
    store_for(fresh_config().await).await
}

/// A migrated store for `config`.
pub async fn store_for(config: PgConfig) -> PgTaskHistoryStore {
    let store = PgTaskHistoryStore::connect(config)
        .await
        .unwrap_or_else(|e| panic!("connecting the test store: {e}"));
    store
        .init_database_schema()
        .await
        .unwrap_or_else(|e| panic!("migrating the test schema: {e}"));
    store
}

/// [`fresh_store`] as a [`DynStore`], for the behaviour suite.
pub async fn fresh_dyn_store() -> DynStore {
    std::sync::Arc::new(fresh_store().await)
}

/// A migrated store on a fresh schema whose batches of new tasks go by `COPY` from one row
/// up ([`PgConfig::copy_min_rows`]): the behaviour suite on the `COPY` path.
pub async fn copy_dyn_store() -> DynStore {
    let config = fresh_config().await.copy_min_rows(Some(1));
    std::sync::Arc::new(store_for(config).await)
}

/// A migrated store on a fresh schema whose batches never go by `COPY`
/// ([`PgConfig::copy_min_rows`] off): the behaviour suite on the upsert path, whatever the
/// batch's size.
pub async fn upsert_dyn_store() -> DynStore {
    let config = fresh_config().await.copy_min_rows(None);
    std::sync::Arc::new(store_for(config).await)
}

/// A migrated store on a fresh schema whose single saves and status checks all go through
/// the combined statements, on one lane each (concurrent calls queue and
/// are made together; a lone call takes the combined statement too): the behaviour suite
/// on the combining paths.
pub async fn combined_dyn_store() -> DynStore {
    let config = fresh_config()
        .await
        .save_lanes(1)
        .combine_lone_saves(true)
        .status_lanes(1)
        .combine_lone_statuses(true);
    std::sync::Arc::new(store_for(config).await)
}

/// A migrated store on a fresh schema in the partitioned layout (monthly, 3 ahead).
pub async fn partitioned_store() -> PgTaskHistoryStore {
    let config = fresh_config()
        .await
        .partitioning(Some(taskhistory_postgres::Partitioning::default()));
    store_for(config).await
}

/// [`partitioned_store`] as a [`DynStore`]: the behaviour suite on the partitioned layout.
pub async fn partitioned_dyn_store() -> DynStore {
    std::sync::Arc::new(partitioned_store().await)
}

/// The role [`least_privilege_dyn_store`] connects as: one per test process, dropped when
/// it exits.
pub fn app_role() -> String {
    format!("th_app_{}", std::process::id())
}

/// The password of [`app_role`] (made for this process; tests only).
pub fn app_password() -> String {
    format!("app-{}", std::process::id())
}

/// A store on a fresh schema migrated by the owner (the admin user), used through a role that
/// has only [`least_privilege_grants`](taskhistory_postgres::least_privilege_grants): the behaviour suite's
/// store for least-privilege runs.
pub async fn least_privilege_dyn_store() -> DynStore {
    least_privilege(None).await
}

/// [`least_privilege_dyn_store`] on a schema its owner converted to the partitioned layout
/// (monthly): the app role's start-up finds every partition it needs already made.
pub async fn least_privilege_partitioned_dyn_store() -> DynStore {
    least_privilege(Some(taskhistory_postgres::Partitioning::default())).await
}

async fn least_privilege(partitioning: Option<taskhistory_postgres::Partitioning>) -> DynStore {
    let owner_config = fresh_config().await;
    let migrating = owner_config.clone().partitioning(partitioning);
    let owner = store_for(migrating).await;
    owner.close().await;
    std::sync::Arc::new(app_role_store(&owner_config).await)
}

/// The store of `owner_config`'s schema (migrated by its owner) used through [`app_role`],
/// after giving that role [`least_privilege_grants`](taskhistory_postgres::least_privilege_grants).
pub async fn app_role_store(owner_config: &PgConfig) -> PgTaskHistoryStore {
    let schema = owner_config
        .get_schema()
        .unwrap_or_else(|| panic!("fresh_config() always sets a schema"))
        .to_owned();
    let role = app_role();
    let url = database_url().await;
    admin_execute(&format!(
        "DO $$ BEGIN CREATE ROLE {role} LOGIN PASSWORD '{}'; \
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$",
        app_password()
    ))
    .await;
    {
        // One at a time: concurrent grants of the same cluster-wide parameter right to the
        // same role conflict ("tuple concurrently updated").
        static GRANTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one = GRANTING.lock().await;
        execute(
            &url,
            &taskhistory_postgres::least_privilege_grants(&schema, &role),
        )
        .await;
    }
    let app = owner_config
        .clone()
        .user(&role)
        .password(app_password())
        .partitioning(None);
    store_for(app).await
}

/// The role that owns the schemas of row-level isolation's tests: not a superuser (a
/// superuser is never held by row-level security), so `FORCE ROW LEVEL SECURITY` holds
/// it. One per test process, made on first use, dropped when the process exits.
pub fn owner_role() -> String {
    format!("th_owner_{}", std::process::id())
}

/// The password of [`owner_role`] (made for this process; tests only).
pub fn owner_password() -> String {
    format!("owner-{}", std::process::id())
}

/// A configuration for a fresh schema that [`owner_role`] makes and owns.
pub async fn owner_config() -> PgConfig {
    let role = owner_role();
    let url = database_url().await;
    let dbname = url
        .parse::<tokio_postgres::Config>()
        .ok()
        .and_then(|c| c.get_dbname().map(str::to_owned))
        .unwrap_or_else(|| panic!("the test database URL names no database"));
    static MADE: OnceCell<()> = OnceCell::const_new();
    MADE.get_or_init(|| async {
        admin_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{}'; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$; \
             GRANT CREATE ON DATABASE {dbname} TO {role}",
            owner_password()
        ))
        .await;
    })
    .await;
    fresh_config().await.user(&role).password(owner_password())
}

/// A migrated store on a fresh schema owned by [`owner_role`], with row-level isolation
/// switched on: every operation declares its users, and the owner is held.
pub async fn isolated_store() -> PgTaskHistoryStore {
    isolated_store_for(owner_config().await).await
}

/// [`isolated_store`] for `config` (whose role owns its schema).
pub async fn isolated_store_for(config: PgConfig) -> PgTaskHistoryStore {
    let store = store_for(config).await;
    let state = store
        .set_isolation(true)
        .await
        .unwrap_or_else(|e| panic!("switching isolation on: {e}"));
    assert!(
        state.on() && state.declaring,
        "isolation is not on: {state:?}"
    );
    store
}

/// [`isolated_store`] as a [`DynStore`]: the behaviour suite under row-level isolation
/// (batches below the default `copy_min_rows` by the upsert statement, as in service).
pub async fn isolated_dyn_store() -> DynStore {
    std::sync::Arc::new(isolated_store().await)
}

/// The behaviour suite under row-level isolation behind [`pgbouncer`] (transaction
/// pooling): the schema made and switched on directly by [`owner_role`], used through the
/// pooler by the same role; its status checks all go through the combined statement (each
/// declares every user of its tasks), and every batch of new tasks the bulk path (one
/// `INSERT` of arrays after the claim of their summaries, where a store that does not
/// declare sends `COPY`).
pub async fn isolated_pgbouncer_dyn_store() -> DynStore {
    let direct = owner_config().await;
    isolated_store_for(direct.clone()).await.close().await;
    let bouncer = pgbouncer().await;
    let config = direct
        .host("127.0.0.1")
        .port(bouncer.port)
        .pgbouncer(true)
        .combine_lone_statuses(true)
        .copy_min_rows(Some(1))
        .listen_url(&database_url().await)
        .unwrap_or_else(|e| panic!("the test database URL does not parse: {e}"));
    std::sync::Arc::new(store_for(config).await)
}

/// A PgBouncer (Debian's package) in transaction pooling mode in front of the test server,
/// started once per process and stopped when the process exits.
#[derive(Debug)]
pub struct PgBouncer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The process (stopped by a watchdog when this process exits).
    child: std::sync::Mutex<std::process::Child>,
}

impl PgBouncer {
    /// Its process id (to stop or signal it in a test).
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|p| p.into_inner()).id()
    }
}

static PGBOUNCER: OnceCell<PgBouncer> = OnceCell::const_new();

const NO_PGBOUNCER: &str = "no pgbouncer binary: install Debian's package \
    (`apt-get install pgbouncer`; `bash scripts/ensure-postgres.sh` does it)";

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The PgBouncer of this process, started on first use. Panics with instructions when the
/// package is missing.
pub async fn pgbouncer() -> &'static PgBouncer {
    PGBOUNCER
        .get_or_init(|| async {
            let server = server().await;
            let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
                .into_iter()
                .find(|p| std::path::Path::new(p).exists())
                .unwrap_or_else(|| panic!("{NO_PGBOUNCER}"));
            let admin: tokio_postgres::Config = server
                .admin_url
                .parse()
                .unwrap_or_else(|e| panic!("the test server's URL does not parse: {e}"));
            let host = match admin.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                _ => "127.0.0.1".to_owned(),
            };
            let server_port = admin.get_ports().first().copied().unwrap_or(5432);
            let user = admin.get_user().unwrap_or("postgres").to_owned();
            let password = admin
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap_or_else(|e| panic!("no free port for pgbouncer: {e}"));
            let dir = std::env::temp_dir().join(format!("th-pgbouncer-{}", std::process::id()));
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
            let d = dir.display();
            std::fs::write(
                dir.join("userlist.txt"),
                format!(
                    "\"{user}\" \"{password}\"\n\"{}\" \"{}\"\n\"{}\" \"{}\"\n",
                    app_role(),
                    app_password(),
                    owner_role(),
                    owner_password()
                ),
            )
            .unwrap_or_else(|e| panic!("writing pgbouncer's userlist.txt: {e}"));
            std::fs::write(
                dir.join("pgbouncer.ini"),
                format!(
                    "[databases]\n* = host={host} port={server_port}\n\n[pgbouncer]\n\
                     listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                     auth_type = trust\nauth_file = {d}/userlist.txt\n\
                     pool_mode = transaction\n\
                     ignore_startup_parameters = options, extra_float_digits\n\
                     max_client_conn = 1000\ndefault_pool_size = 20\n\
                     logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n"
                ),
            )
            .unwrap_or_else(|e| panic!("writing pgbouncer.ini: {e}"));
            let mut command = if running_as_root() {
                let _ = std::process::Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&dir)
                    .status();
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", "postgres", "--", binary]);
                c
            } else {
                std::process::Command::new(binary)
            };
            let mut child = command
                .arg(dir.join("pgbouncer.ini"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting pgbouncer: {e}; {NO_PGBOUNCER}"));
            // Stop it when this process exits: statics are never dropped.
            let me = std::process::id();
            let script = format!(
                "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill {} 2>/dev/null; \
                 pkill -f '{d}/pgbouncer.ini'; rm -rf '{d}'",
                child.id()
            );
            let _ = std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .spawn();
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return PgBouncer {
                        port,
                        child: std::sync::Mutex::new(child),
                    };
                }
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("pgbouncer exited at start ({status}); see {d}/pgbouncer.log");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("pgbouncer did not start listening on port {port}; see {d}/pgbouncer.log");
        })
        .await
}

/// A store on a fresh schema, migrated on a direct connection, then used through
/// [`pgbouncer`] in transaction pooling mode: the behaviour suite's store for PgBouncer runs.
pub async fn pgbouncer_dyn_store() -> DynStore {
    std::sync::Arc::new(store_for(pgbouncer_config().await).await)
}

/// The configuration of [`pgbouncer_dyn_store`]: a fresh schema, migrated on a direct
/// connection, reached through [`pgbouncer`] in transaction pooling mode.
pub async fn pgbouncer_config() -> PgConfig {
    let direct = fresh_config().await;
    store_for(direct.clone()).await.close().await;
    let bouncer = pgbouncer().await;
    // Watchers LISTEN on a direct connection: LISTEN cannot work through transaction pooling.
    direct
        .host("127.0.0.1")
        .port(bouncer.port)
        .pgbouncer(true)
        .listen_url(&database_url().await)
        .unwrap_or_else(|e| panic!("the test database URL does not parse: {e}"))
}

/// A primary and a streaming standby of this test process's own (started on first use,
/// the standby applying commits 50 ms late), for the behaviour suite on a store whose
/// reads go to a replica.
static REPLICATED: OnceCell<(OwnServer, OwnServer)> = OnceCell::const_new();

/// A migrated store on a new schema of the process's own primary, reading from its
/// standby ([`PgConfig::read_urls`]): the behaviour suite's store for read-your-writes. Its
/// status checks all go through the combined statement (a combined check waits for every
/// one of its users' writes).
pub async fn replica_dyn_store() -> DynStore {
    let (primary, standby) = REPLICATED
        .get_or_init(|| async {
            let primary = OwnServer::start(&["max_connections=300"]);
            let standby = OwnServer::standby_of(
                &primary,
                &["max_connections=300", "recovery_min_apply_delay=50ms"],
            );
            (primary, standby)
        })
        .await;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let config = PgConfig::from_url(&primary.url())
        .unwrap_or_else(|e| panic!("the own server's URL: {e}"))
        .ssl_mode(SslMode::Disable)
        .schema(format!("replicated_{n}"))
        .pool_size(1, 4)
        .combine_lone_statuses(true)
        .read_urls([standby.url()])
        .unwrap_or_else(|e| panic!("the standby's URL: {e}"));
    std::sync::Arc::new(store_for(config).await)
}

/// A PostgreSQL server of a test's own, started from the installed binaries in a temporary
/// folder, for tests that restart, kill or reconfigure a server (never the shared one).
/// Stopped and removed when dropped.
#[derive(Debug)]
pub struct OwnServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    bin: std::path::PathBuf,
    dir: tempfile::TempDir,
    settings: Vec<String>,
}

impl OwnServer {
    /// Makes a cluster (trust auth, user `postgres`) and starts it with `settings`
    /// (`name=value` pairs for `postgres -c`). Panics saying what is missing.
    pub fn start(settings: &[&str]) -> OwnServer {
        let server = OwnServer::new(settings);
        let data = server.data();
        server.run(
            "initdb",
            &["-D", &data, "-U", "postgres", "--auth=trust", "--no-sync"],
        );
        server.pg_ctl_start();
        server.remove_at_exit();
        server
    }

    /// A streaming standby of `primary` (hot standby: it serves reads), copied by
    /// `pg_basebackup -R` and started with `settings` (e.g.
    /// `recovery_min_apply_delay=200ms`). The primary's defaults (PostgreSQL 15:
    /// `wal_level=replica`, 10 WAL senders, replication connections trusted from 127.0.0.1)
    /// suffice.
    pub fn standby_of(primary: &OwnServer, settings: &[&str]) -> OwnServer {
        let mut all = vec!["hot_standby=on"];
        all.extend_from_slice(settings);
        let server = OwnServer::new(&all);
        let data = server.data();
        let port = primary.port.to_string();
        server.run(
            "pg_basebackup",
            &[
                "-D",
                &data,
                "-R",
                "-X",
                "stream",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "--no-sync",
                "-c",
                "fast",
            ],
        );
        server.pg_ctl_start();
        server.remove_at_exit();
        server
    }

    /// A new folder and a free port, nothing started.
    fn new(settings: &[&str]) -> OwnServer {
        let bin = postgres_bin_dir().unwrap_or_else(|| {
            panic!("no PostgreSQL binaries under /usr/lib/postgresql: apt-get install postgresql")
        });
        let dir = tempfile::Builder::new()
            .prefix("th-own-server-")
            .tempdir()
            .unwrap_or_else(|e| panic!("a folder for a test server: {e}"));
        if running_as_root() {
            let _ = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port for a test server: {e}"));
        OwnServer {
            port,
            bin,
            dir,
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// Stopped and removed when this process exits, even if a test is killed before the
    /// server is dropped.
    fn remove_at_exit(&self) {
        let data = self.data();
        let me = std::process::id();
        let as_postgres = if running_as_root() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let stop = format!(
            "{as_postgres}'{}' -D '{data}' -m immediate -w stop",
            self.bin.join("pg_ctl").display()
        );
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {me} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf '{}'",
                self.dir.path().display()
            ))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }

    /// `pg_ctl stop -m immediate`: the server is gone until [`start_again`](Self::start_again).
    pub fn stop(&self) {
        let data = self.data();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }

    /// Starts a server [`stop`](Self::stop) stopped.
    pub fn start_again(&self) {
        self.pg_ctl_start();
    }

    /// The postmaster's process id (its server processes are its children).
    pub fn postmaster_pid(&self) -> u32 {
        std::fs::read_to_string(self.dir.path().join("data").join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no postmaster.pid in the test server's folder"))
    }

    /// `pg_ctl promote`: a standby leaves recovery and takes writes.
    pub fn promote(&self) {
        let data = self.data();
        self.run("pg_ctl", &["-D", &data, "-w", "promote"]);
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Runs one of the server's programs (as `postgres` when this process is root).
    fn command(&self, program: &str, args: &[&str]) -> std::process::Command {
        let path = self.bin.join(program);
        let mut c = if running_as_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            std::process::Command::new(path)
        };
        c.args(args).stdin(std::process::Stdio::null());
        c
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program, args)
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn options(&self) -> String {
        let mut o = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        for s in &self.settings {
            o.push_str(&format!(" -c {s}"));
        }
        o
    }

    /// Starts the server and waits until it accepts connections (after a crash, retried
    /// while the dead server's processes let go of its shared memory).
    fn pg_ctl_start(&self) {
        let data = self.data();
        let log = self.dir.path().join("server.log").display().to_string();
        let options = self.options();
        let args = [
            "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start",
        ];
        for _ in 0..50 {
            let out = self.command("pg_ctl", &args).output();
            if out.is_ok_and(|o| o.status.success()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        panic!("the test server did not start:\n{log}");
    }

    /// Its URL (user `postgres`, database `postgres`).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl restart -m fast`: every connection is closed by the server.
    pub fn restart(&self) {
        let data = self.data();
        self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
        self.pg_ctl_start();
    }

    /// Kills the postmaster with SIGKILL (a crash), then starts the server again.
    pub fn crash_and_start(&self) {
        let pid_file = self.dir.path().join("data").join("postmaster.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.lines().next().map(str::to_owned))
            .unwrap_or_else(|| panic!("no postmaster.pid in the test server's folder"));
        let killed = std::process::Command::new("kill")
            .args(["-9", &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(killed, "kill -9 {pid} failed");
        while alive(pid.parse().unwrap_or(0)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.pg_ctl_start();
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}
