//! What the server's tests share: a `taskhistory serve` process on a fresh schema, and
//! tokens from the binary.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};
use taskhistory_core::TaskStepResult;
use taskhistory_postgres::{PgConfig, PgTaskHistoryStore};
use taskhistory_testing::{database_url, fresh_config, store_for};

pub(crate) const ADMIN: &str = "admin-token-for-tests";
pub(crate) const SECRET: &str = "a-signing-secret-of-at-least-32-bytes!";

/// A `taskhistory serve` process on a fresh schema, and the library's store on it.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) base: String,
    pub(crate) store: PgTaskHistoryStore,
    pub(crate) config: PgConfig,
    /// Everything the server printed on stderr so far.
    pub(crate) stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn bin() -> Command {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("taskhistory"));
    for var in [
        "DATABASE_URL",
        "DB_HOST",
        "DB_SCHEMA",
        "TASKHISTORY_ADMIN_TOKEN",
        "TASKHISTORY_SECRET",
        "TASKHISTORY_SECRET_PREVIOUS",
        "TASKHISTORY_METRICS_TOKEN",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

impl Server {
    pub(crate) async fn start(extra: &[&str]) -> Server {
        let config = fresh_config().await;
        let store = store_for(config.clone()).await;
        Server::on(store, config, extra).await
    }

    pub(crate) async fn on(store: PgTaskHistoryStore, config: PgConfig, extra: &[&str]) -> Server {
        Server::on_with(store, config, &[], extra).await
    }

    /// A server on a fresh schema with more environment (`env`) and flags (`extra`).
    pub(crate) async fn start_with(env: &[(&str, &str)], extra: &[&str]) -> Server {
        let config = fresh_config().await;
        let store = store_for(config.clone()).await;
        Server::on_with(store, config, env, extra).await
    }

    pub(crate) async fn on_with(
        store: PgTaskHistoryStore,
        config: PgConfig,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> Server {
        let url = database_url().await;
        let schema = config.get_schema().unwrap().to_owned();
        let (child, base, stderr) = spawn(&url, &schema, env, extra);
        Server {
            child,
            base,
            store,
            config,
            stderr,
        }
    }

    /// Stops the server with SIGTERM and waits for it: its exit code.
    pub(crate) fn stop(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().ok().and_then(|s| s.code())
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// A user token from the binary (`taskhistory token`), signed with `secret`.
pub(crate) fn token(user: &str, ttl: &str, secret: &str) -> String {
    let out = bin()
        .env("TASKHISTORY_SECRET", secret)
        .args(["token", user, "--ttl", ttl])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Starts `taskhistory serve` on `url` and `schema` (the operator token and the secret set,
/// plus `env`): the process, its base URL and what it says on stderr.
pub(crate) fn spawn(
    url: &str,
    schema: &str,
    env: &[(&str, &str)],
    extra: &[&str],
) -> (Child, String, std::sync::Arc<std::sync::Mutex<String>>) {
    let mut command = bin();
    command
        .env("TASKHISTORY_SECRET", SECRET)
        .envs(env.iter().copied())
        .args(["--database-url", url, "--schema", schema])
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra);
    serving(command)
}

/// Runs `command` (a `taskhistory ... serve` with the operator token set) until it says
/// where it serves: the process, its base URL and what it says on stderr (read on, so the
/// server never blocks on it).
pub(crate) fn serving(
    mut command: Command,
) -> (Child, String, std::sync::Arc<std::sync::Mutex<String>>) {
    // reqwest's TLS takes the process's crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut child = command
        .env("TASKHISTORY_ADMIN_TOKEN", ADMIN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http"))
        .unwrap_or_else(|| panic!("serve did not start: {line}"))
        .trim_end_matches('/')
        .to_owned();
    // Keep reading stderr (so the server never blocks on it), and keep what it said.
    let said = std::sync::Arc::new(std::sync::Mutex::new(line.clone()));
    let keep = said.clone();
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            keep.lock().unwrap().push_str(&(l + "\n"));
        }
    });
    (child, base, said)
}

/// A GET with an optional bearer token: the status and the body (JSON, or the text as a
/// JSON string).
pub(crate) async fn get(url: &str, bearer: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(t) = bearer {
        request = request.bearer_auth(t);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A running step whose message is `message`.
pub(crate) fn step(message: &str) -> TaskStepResult {
    TaskStepResult::running("work", json!({"n": 1}), message)
}
