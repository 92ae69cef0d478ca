//! The dashboard in a real browser: Debian's Chromium, headless, driven through WebDriver
//! (`chromedriver`, by fantoccini). It opens the page, sees a task saved from outside
//! appear and change status without a reload, cancels another with the button (confirming
//! the dialog) and checks the store says cancelled. Needs `chromium` and `chromedriver`
//! (`scripts/test.sh` installs Debian's packages `chromium` and `chromium-driver`).
//!
//! A second test opens the page with a user token only (the user comes from the token),
//! clicks a status chip and sees as many rows as the chip says, compares the charts' bars
//! with the activity API, finds tasks by id prefix, and cancels two tasks at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use taskhistory_core::{TaskHistoryStore, TaskStatus, TaskStepResult};

mod common;
use common::{token, Server, ADMIN, SECRET};

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

/// Runs `script` in the page until `done` holds for its value (20 s at most): the value.
async fn until(
    client: &Client,
    what: &str,
    script: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let value = client.execute(script, vec![]).await.unwrap();
        if done(&value) {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: never; last {value}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The rows of the task list: `[task, status]` pairs.
const ROWS: &str = "return [...document.querySelectorAll('#tasks tr')].map(r => [r.dataset.task, r.dataset.status]);";

/// The count a status chip shows (`null` before it is drawn).
fn chip(status: &str) -> String {
    format!(
        "const n = document.querySelector('#chips button[data-status=\"{status}\"] .n'); \
         return n ? Number(n.textContent) : null;"
    )
}

fn tasks_of(rows: &serde_json::Value) -> Vec<String> {
    let mut tasks: Vec<String> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_str().unwrap().to_owned())
        .collect();
    tasks.sort();
    tasks
}

#[tokio::test(flavor = "multi_thread")]
async fn chips_filter_the_list_charts_equal_the_api_and_a_prefix_finds_tasks() {
    use chrono::{DateTime, Duration as Span, Utc};
    use taskhistory_core::{ErrorCode, StepRecord};

    let _ = rustls::crypto::ring::default_provider().install_default();
    let s = Server::start(&[]).await;
    let now = Utc::now();
    let ago = |minutes: i64| now - Span::minutes(minutes);
    let running = TaskStepResult::running("load", json!({"rows": 10}), "loading");
    let done = TaskStepResult::success("load", json!({"rows": 10}), "loaded");
    let failed = TaskStepResult::failure("load", ErrorCode::Execution, "broken");
    let mut records = Vec::new();
    for (i, hours) in [1i64, 5, 9].into_iter().enumerate() {
        let task = format!("report-{i}");
        records.push(StepRecord::new("u7", &task, 0, running.clone()).at(ago(hours * 60 + 10)));
        records.push(StepRecord::new("u7", &task, 1, done.clone()).at(ago(hours * 60)));
    }
    // Three days ago: in the week's chart, not the day's.
    records.push(StepRecord::new("u7", "report-old", 0, done.clone()).at(ago(72 * 60)));
    records.push(StepRecord::new("u7", "sync-1", 0, failed.clone()).at(ago(2 * 60)));
    records.push(StepRecord::new("u7", "sync-2", 0, failed.clone()).at(ago(7 * 60)));
    records.push(StepRecord::new("u7", "import-1", 0, running.clone()).at(ago(30)));
    records.push(StepRecord::new("u7", "import-2", 0, running.clone()).at(ago(20)));
    records.push(StepRecord::new("u7", "clean-1", 0, running.clone()).at(ago(40)));
    // Another user's task: never counted or listed here.
    records.push(StepRecord::new("u8", "sync-9", 0, failed.clone()).at(ago(60)));
    s.store.save_batch_task_history(&records).await.unwrap();
    s.store
        .mark_task_as_cancelled("u7", "clean-1")
        .await
        .unwrap();
    let counts = s.store.task_counts("u7").await.unwrap();
    assert_eq!(
        [
            counts.completed,
            counts.failed,
            counts.running,
            counts.cancelled
        ],
        [4, 2, 2, 1]
    );

    let own = token("u7", "1h", SECRET);
    let (_driver, client) = browser().await;
    // Only the token: the page asks the server whose it is.
    client
        .goto(&format!("{}/#token={own}", s.base))
        .await
        .unwrap();
    let live = client.wait().for_element(Locator::Css("#live.on")).await;
    assert!(live.is_ok(), "the event stream never opened");
    until(
        &client,
        "the user from the token",
        "return document.getElementById('user').value;",
        |v| v == "u7",
    )
    .await;

    // Each chip says the store's count; clicking one lists as many rows, all in its status.
    for status in ["running", "completed", "failed", "cancelled"] {
        let n = counts.get(status.parse().unwrap());
        until(&client, &format!("the {status} chip"), &chip(status), |v| {
            v == &json!(n)
        })
        .await;
        client
            .find(Locator::Css(&format!(
                "#chips button[data-status=\"{status}\"]"
            )))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let rows = until(&client, &format!("{n} {status} rows"), ROWS, |rows| {
            let rows = rows.as_array().unwrap();
            rows.len() as u64 == n && rows.iter().all(|r| r[1] == status)
        })
        .await;
        assert_eq!(rows.as_array().unwrap().len() as u64, n);
    }
    until(&client, "the all chip", &chip(""), |v| {
        v == &json!(counts.total())
    })
    .await;
    client
        .find(Locator::Css("#chips button[data-status=\"\"]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(&client, "every task listed", ROWS, |rows| {
        rows.as_array().unwrap().len() as u64 == counts.total()
    })
    .await;

    // The charts' bars: each hour the chart draws holds what the activity API says of it.
    for (id, hours, completed) in [("chart-24h", 24, 3), ("chart-7d", 168, 4)] {
        let script = format!(
            "return [...document.querySelectorAll('#{id} g.bar')].map(g => \
             [g.dataset.hour, Number(g.dataset.completed), Number(g.dataset.failed), \
              Number(g.dataset.cancelled)]);"
        );
        let bars = until(&client, &format!("the bars of {id}"), &script, |bars| {
            let bars = bars.as_array().unwrap();
            bars.len() == hours
                && bars.iter().map(|b| b[1].as_u64().unwrap()).sum::<u64>() == completed
        })
        .await;
        let bars = bars.as_array().unwrap();
        let hour =
            |b: &serde_json::Value| -> DateTime<Utc> { b[0].as_str().unwrap().parse().unwrap() };
        let (first, last) = (hour(&bars[0]), hour(&bars[bars.len() - 1]));
        let api = s
            .store
            .task_activity("u7", first, last + Span::hours(1))
            .await
            .unwrap();
        let http = reqwest::Client::new()
            .get(s.url(&format!(
                "/v1/users/u7/activity?from={}&to={}",
                first.format("%Y-%m-%dT%H:%M:%SZ"),
                (last + Span::hours(1)).format("%Y-%m-%dT%H:%M:%SZ")
            )))
            .bearer_auth(&own)
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap();
        assert_eq!(http["hours"], serde_json::to_value(&api).unwrap());
        for bar in bars {
            let h = hour(bar);
            let (c, f, x) = api
                .iter()
                .find(|a| a.hour == h)
                .map_or((0, 0, 0), |a| (a.completed, a.failed, a.cancelled));
            assert_eq!(
                (bar[1].as_u64(), bar[2].as_u64(), bar[3].as_u64()),
                (Some(c), Some(f), Some(x)),
                "{id} at {h}"
            );
        }
        let failed_bars: u64 = bars.iter().map(|b| b[2].as_u64().unwrap()).sum();
        assert_eq!(failed_bars, 2, "{id}");
    }

    // A search by task id prefix.
    let prefix = client.find(Locator::Id("prefix")).await.unwrap();
    prefix.send_keys("sync").await.unwrap();
    let rows = until(&client, "the tasks starting with sync", ROWS, |rows| {
        tasks_of(rows) == ["sync-1", "sync-2"]
    })
    .await;
    assert_eq!(tasks_of(&rows), ["sync-1", "sync-2"]);
    prefix.clear().await.unwrap();
    prefix.send_keys("imp").await.unwrap();
    until(&client, "the tasks starting with imp", ROWS, |rows| {
        tasks_of(rows) == ["import-1", "import-2"]
    })
    .await;

    // Both ticked, cancelled with one confirmation; the counts follow.
    for task in ["import-1", "import-2"] {
        client
            .find(Locator::Css(&format!(
                "tr[data-task=\"{task}\"] td.pick input"
            )))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }
    client
        .find(Locator::Id("cancel-picked"))
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
    until(&client, "no running task left", &chip("running"), |v| {
        v == &json!(0)
    })
    .await;
    until(&client, "three cancelled", &chip("cancelled"), |v| {
        v == &json!(3)
    })
    .await;
    for task in ["import-1", "import-2"] {
        assert_eq!(
            s.store.check_task_status("u7", task).await.unwrap(),
            TaskStatus::Cancelled
        );
    }
    assert!(
        client.accept_alert().await.is_err(),
        "a second confirmation was asked"
    );

    // The timeline says how long each step took.
    prefix.clear().await.unwrap();
    prefix.send_keys("report-0").await.unwrap();
    row_status(&client, "report-0", "completed").await;
    client
        .find(Locator::Css("tr[data-task=\"report-0\"] td.task"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &client,
        "the step's duration",
        "const d = document.querySelector('#timeline .duration'); return d ? d.textContent : null;",
        |v| v == " · took 10 min 0 s",
    )
    .await;
    client.close().await.unwrap();
    s.store.close().await;
}
