//! The dashboard in a real browser: Debian's Chromium, headless, driven through WebDriver
//! (`chromedriver`, by fantoccini). It opens the page, sees a task saved from outside
//! appear and change status without a reload, cancels another with the button (confirming
//! the dialog) and checks the store says cancelled. Needs `chromium` and `chromedriver`
//! (`scripts/test.sh` installs Debian's packages `chromium` and `chromium-driver`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use taskhistory_core::{TaskHistoryStore, TaskStatus, TaskStepResult};

mod common;
use common::{Server, ADMIN};

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn which(name: &str) -> Option<String> {
    ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"]
        .iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| std::path::Path::new(p).exists())
}

async fn browser() -> (Driver, Client) {
    let (Some(chromium), Some(chromedriver)) = (which("chromium"), which("chromedriver")) else {
        panic!(
            "this test needs Chromium and ChromeDriver: apt-get install chromium chromium-driver \
             (scripts/test.sh installs them)"
        );
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let driver = Driver(
        Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".to_owned(),
        json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,900"]
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ClientBuilder::rustls()
            .unwrap()
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(client) => return (driver, client),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("chromedriver did not start a browser: {e}"),
        }
    }
}

/// Waits until the status cell of `task`'s row reads `status`.
async fn row_status(client: &Client, task: &str, status: &str) {
    let css = format!("tr[data-task=\"{task}\"] td.status");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(cell) = client.find(Locator::Css(&css)).await {
            if cell.text().await.unwrap_or_default() == status {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the row of {task} never said {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_follows_writes_live_and_cancels_a_task() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s = Server::start(&[]).await;
    let (_driver, client) = browser().await;
    client
        .goto(&format!("{}/#user=u1&token={ADMIN}", s.base))
        .await
        .unwrap();
    // Marks this page load: a reload would lose it.
    client
        .execute("window.__loaded = 'once'; return true;", vec![])
        .await
        .unwrap();
    let live = client.wait().for_element(Locator::Css("#live.on")).await;
    assert!(live.is_ok(), "the event stream never opened");

    // Saved from outside (the library, as a service would): the row appears, then changes.
    let running = TaskStepResult::running("load", json!({"rows": 10}), "loading");
    s.store
        .save_task_history("u1", "import-1", 0, &running)
        .await
        .unwrap();
    row_status(&client, "import-1", "running").await;
    let done = TaskStepResult::success("load", json!({"rows": 10}), "loaded");
    s.store
        .save_task_history("u1", "import-1", 1, &done)
        .await
        .unwrap();
    row_status(&client, "import-1", "completed").await;

    // A running task, cancelled with the button (after the confirmation dialog).
    s.store
        .save_task_history("u1", "report-7", 0, &running)
        .await
        .unwrap();
    row_status(&client, "report-7", "running").await;
    client
        .find(Locator::Css("tr[data-task=\"report-7\"]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    client
        .wait()
        .for_element(Locator::Css("#timeline li.s-running"))
        .await
        .unwrap();
    client
        .find(Locator::Id("cancel"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.accept_alert().await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no confirmation dialog: {e}"),
        }
    }
    row_status(&client, "report-7", "cancelled").await;
    assert_eq!(
        s.store.check_task_status("u1", "report-7").await.unwrap(),
        TaskStatus::Cancelled
    );
    // The operator's panel shows the store.
    client
        .wait()
        .for_element(Locator::Css("#by-status tr"))
        .await
        .unwrap();
    let loaded = client
        .execute("return window.__loaded;", vec![])
        .await
        .unwrap();
    assert_eq!(loaded, json!("once"), "the page was reloaded");
    let png = client.screenshot().await.unwrap();
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&out, png).unwrap();
    client.close().await.unwrap();
    s.store.close().await;
}
