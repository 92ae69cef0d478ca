//! `taskhistory serve` against a hostile network (issue 28): the real binary, attacked from
//! outside. Slow and idle connections, too many connections, a large WebSocket message, a
//! silent WebSocket peer, tokens in URLs, far expiries, secret rotation, stream tickets,
//! the metrics token, failed-authentication limits, caps on event streams (per user and in
//! all), store errors (a database of the test's own, stopped) and the security headers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use taskhistory_core::TaskHistoryStore;
use taskhistory_testing::OwnServer;

mod common;
use common::{bin, get, spawn, step, token, Server, ADMIN, SECRET};

const METRICS: &str = "metrics-token-for-tests";
const OLD_SECRET: &str = "the-previous-signing-secret-of-32-bytes!";

/// A GET that asks for a WebSocket upgrade (so the WebSocket route gets past axum's own
/// checks to the token's); other routes ignore the headers.
async fn get_upgrade(url: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(url)
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn addr(s: &Server) -> String {
    s.base.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes the connection (or `limit` passes): how long it took.
fn time_to_close(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_headers_idle_connections_and_too_many_connections_are_closed() {
    let s = Server::start(&[
        "--header-timeout",
        "2",
        "--max-connections",
        "5",
        "--heartbeat",
        "1",
    ])
    .await;
    // An event stream is no slow client: it outlives the header timeout (checked below).
    let stream = reqwest::Client::new()
        .get(s.url("/v1/users/u1/events"))
        .bearer_auth(token("u1", "1h", SECRET))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut stream = stream.bytes_stream();
    // A client that sends its headers a byte at a time, never finishing: closed within the
    // timeout (+5 s), though it keeps sending.
    let mut slow = TcpStream::connect(addr(&s)).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let writer = {
        let mut w = slow.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..40 {
                if w.write_all(b"X").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let closed = time_to_close(&mut slow, Duration::from_secs(9));
    assert!(
        closed.is_some(),
        "a slow-header client was still connected after 9 s"
    );
    let _ = writer.join();

    // An idle keep-alive connection: closed within the timeout (+5 s) after its answer.
    let mut idle = TcpStream::connect(addr(&s)).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let closed = time_to_close(&mut idle, Duration::from_secs(9));
    assert!(
        closed.is_some(),
        "an idle keep-alive connection stayed open"
    );

    // Four connections open (silent): a fifth is closed at once, without an answer.
    let held: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(addr(&s)).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut fifth = TcpStream::connect(addr(&s)).unwrap();
    let _ = fifth.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut answer = Vec::new();
    fifth
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let _ = fifth.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("200 OK"),
        "a connection over the cap was served"
    );
    drop(held);
    // The stream opened first still gets its heartbeats, well past the header timeout.
    let mut heartbeats = 0;
    while heartbeats < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the event stream was cut")
            .expect("the event stream ended")
            .unwrap();
        heartbeats += String::from_utf8_lossy(&chunk).matches("heartbeat").count();
    }
    drop(stream);
    // Once they are gone, the server answers again, and counted the refusal.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let r = reqwest::Client::new()
            .get(s.url("/metrics"))
            .bearer_auth(ADMIN)
            .send()
            .await;
        if let Ok(r) = r {
            if r.status() == 200 {
                break r.text().await.unwrap();
            }
        }
        assert!(Instant::now() < deadline, "the server never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        metrics.contains("taskhistory_connections_refused_total 1")
            || metrics.contains("taskhistory_connections_refused_total 2"),
        "{metrics}"
    );
    s.store.close().await;
}

/// The server's peak resident memory, in KiB.
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_websocket_message_closes_the_socket_without_being_buffered() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::Message;
    let s = Server::start(&[]).await;
    let own = token("u1", "1h", SECRET);
    let ws = s.base.replace("http://", "ws://");
    let url = format!("{ws}/v1/users/u1/ws?access_token={own}");
    // Warm up (one socket, one small message), then measure the peak.
    let (mut warm, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    warm.send(Message::text("hello")).await.unwrap();
    warm.close(None).await.unwrap();
    let before = peak_kib(s.child.id());
    let mut sockets = Vec::new();
    for _ in 0..8 {
        let (socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        sockets.push(socket);
    }
    let big = vec![7u8; 1024 * 1024];
    let mut tasks = Vec::new();
    for socket in sockets {
        let big = big.clone();
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = socket.split();
            let sending = tokio::spawn(async move {
                let _ = sink.send(Message::binary(big)).await;
            });
            let mut code = None;
            let deadline = tokio::time::sleep(Duration::from_secs(15));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = &mut deadline => break,
                    m = stream.next() => match m {
                        Some(Ok(Message::Close(frame))) => {
                            code = frame.map(|f| f.code);
                            break;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    },
                }
            }
            sending.abort();
            code
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), Some(CloseCode::Size), "no close 1009");
    }
    let after = peak_kib(s.child.id());
    // 8 MiB were sent; buffered, the peak would grow by at least that.
    assert!(
        after.saturating_sub(before) < 4 * 1024,
        "the server's peak memory grew by {} KiB",
        after - before
    );
    s.store.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_peer_that_never_answers_pings_is_disconnected() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::Message;
    let s = Server::start(&["--heartbeat", "1", "--ws-pong-timeout", "2"]).await;
    let own = token("u1", "1h", SECRET);
    let ws = s.base.replace("http://", "ws://");
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("{ws}/v1/users/u1/ws?access_token={own}"))
            .await
            .unwrap();
    // Not reading: the client answers no ping (tungstenite answers them when it reads).
    tokio::time::sleep(Duration::from_secs(6)).await;
    // Now reading (and so answering pings): the server has closed the socket already (its
    // close frame 1008, or the end of the connection when the queued pongs hit the closed
    // socket first). Still open, pings would keep coming for 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut closed = None;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(2), socket.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                closed = Some(frame.map(|f| f.code));
                break;
            }
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(Some(Err(_)) | None) => {
                closed = Some(None);
                break;
            }
        }
    }
    assert!(
        matches!(closed, Some(None | Some(CloseCode::Policy))),
        "still connected: {closed:?}"
    );
    s.store.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_in_urls_tickets_and_the_metrics_token() {
    let s = Server::start_with(&[("TASKHISTORY_METRICS_TOKEN", METRICS)], &[]).await;
    s.store
        .save_task_history("u1", "t1", 0, &step("first"))
        .await
        .unwrap();
    let own = token("u1", "1h", SECRET);
    // The operator token in a URL: refused everywhere, event routes included.
    for path in [
        "/metrics",
        "/v1/admin/stats",
        "/v1/users/u1/tasks",
        "/v1/users/u1/tasks/t1",
        "/v1/users/u1/events",
        "/v1/users/u1/ws",
        "/v1/users/u1/counts",
        "/v1/users/u1/activity",
        "/v1/overview",
        "/v1/whoami",
    ] {
        let (code, body) = get_upgrade(&s.url(&format!("{path}?access_token={ADMIN}"))).await;
        assert_eq!(code, 401, "{path}: {body}");
    }
    // A user token in the URL of the routes the dashboard reads: refused too.
    for path in ["/v1/users/u1/counts", "/v1/users/u1/activity", "/v1/whoami"] {
        let (code, body) = get(&s.url(&format!("{path}?access_token={own}")), None).await;
        assert_eq!(code, 401, "{path}: {body}");
    }
    let cancel = reqwest::Client::new()
        .post(s.url(&format!("/v1/users/u1/tasks/t1/cancel?access_token={own}")))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 401);
    // A user token in the URL: only on the event routes.
    let (code, _) = get(
        &s.url(&format!("/v1/users/u1/tasks?access_token={own}")),
        None,
    )
    .await;
    assert_eq!(code, 401);
    let events = reqwest::Client::new()
        .get(s.url(&format!("/v1/users/u1/events?access_token={own}")))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    drop(events);

    // A ticket: asked for with the header, good for its stream only.
    let ticket = |query: &'static str, bearer: String| {
        let url = s.url(&format!("/v1/users/u1/events/ticket{query}"));
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(bearer)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (code, t) = ticket("", own.clone()).await;
    assert_eq!(code, 200, "{t}");
    assert_eq!(t["expires_in"], 60);
    let t = t["ticket"].as_str().unwrap().to_owned();
    assert!(!t.contains(&own));
    let sse = reqwest::Client::new()
        .get(s.url(&format!("/v1/users/u1/events?access_token={t}")))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    drop(sse);
    for (path, expected) in [
        (format!("/v1/users/u1/events?task=t1&access_token={t}"), 403),
        (format!("/v1/users/u1/ws?access_token={t}"), 403),
        (format!("/v1/users/u2/events?access_token={t}"), 403),
    ] {
        let (code, body) = get_upgrade(&s.url(&path)).await;
        assert_eq!(code, expected, "{path}: {body}");
    }
    for path in [
        "/v1/users/u1/tasks",
        "/v1/users/u1/counts",
        "/v1/users/u1/activity",
        "/v1/overview",
    ] {
        let (code, _) = get(&s.url(path), Some(&t)).await;
        assert_eq!(code, 403, "{path}: a ticket reads nothing but its stream");
    }
    let (_, ws_ticket) = ticket("?stream=ws", ADMIN.to_owned()).await;
    let ws_ticket = ws_ticket["ticket"].as_str().unwrap().to_owned();
    let ws = s.base.replace("http://", "ws://");
    assert!(tokio_tungstenite::connect_async(format!(
        "{ws}/v1/users/u1/ws?access_token={ws_ticket}"
    ))
    .await
    .is_ok());
    let (code, _) = ticket("", token("u2", "1h", SECRET)).await;
    assert_eq!(code, 403, "a ticket for another user");
    let (code, _) = ticket("?stream=carrier-pigeon", own.clone()).await;
    assert_eq!(code, 400);

    // The metrics token reads /metrics and nothing else.
    assert_eq!(get(&s.url("/metrics"), Some(METRICS)).await.0, 200);
    for path in [
        "/v1/users/u1/tasks",
        "/v1/admin/stats",
        "/v1/users/u1/tasks/t1",
        "/v1/users/u1/counts",
        "/v1/users/u1/activity",
        "/v1/overview",
    ] {
        assert_eq!(get(&s.url(path), Some(METRICS)).await.0, 403, "{path}");
    }
    let (code, body) = get(&s.url("/v1/whoami"), Some(METRICS)).await;
    assert_eq!((code, body), (200, json!({"access": "metrics"})));
    // /healthz: only healthy or not without the operator's token.
    let (_, plain) = get(&s.url("/healthz"), None).await;
    assert_eq!(plain, json!({"healthy": true}));
    let (_, full) = get(&s.url("/healthz"), Some(ADMIN)).await;
    assert!(
        full["schema_version"].is_string() || full["schema_version"].is_number(),
        "{full}"
    );
    s.store.close().await;
}

fn python_token(secret: &str, user: &str, ttl: &str) -> String {
    // The documented snippet (docs/operations.md, "Tokens").
    let docs = include_str!("../../../docs/operations.md");
    let start = docs
        .find("import base64, hashlib, hmac, json, time")
        .unwrap();
    let snippet = &docs[start..start + docs[start..].find("```").unwrap()];
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "{snippet}\nimport sys\nprint(user_token(sys.argv[1].encode(), '{user}', {ttl}))"
        ))
        .arg(secret)
        .output()
        .expect("python3 is needed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn far_expiries_are_refused_and_the_previous_secret_works_only_while_configured() {
    // `taskhistory token` refuses a lifetime over its cap (exit 2).
    let out = bin()
        .env("TASKHISTORY_SECRET", SECRET)
        .args(["token", "u1", "--ttl", "31d"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let s = Server::start_with(
        &[("TASKHISTORY_SECRET_PREVIOUS", OLD_SECRET)],
        &["--max-token-ttl", "1d"],
    )
    .await;
    // A far exp (signed, but beyond the server's cap), and a huge one: refused.
    let far = {
        let out = bin()
            .env("TASKHISTORY_SECRET", SECRET)
            .args(["token", "u1", "--ttl", "300d", "--max-ttl", "400d"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let huge = python_token(SECRET, "u1", "2**70");
    let fine = python_token(SECRET, "u1", "3600");
    for (t, expected) in [(&far, 401), (&huge, 401), (&fine, 200)] {
        let (code, body) = get(&s.url("/v1/users/u1/tasks"), Some(t)).await;
        assert_eq!(code, expected, "{body}");
    }
    // A token of the previous secret works while it is configured ...
    let old = token("u1", "1h", OLD_SECRET);
    assert_eq!(get(&s.url("/v1/users/u1/tasks"), Some(&old)).await.0, 200);
    s.store.close().await;
    drop(s);
    // ... and not once it is gone.
    let s = Server::start(&[]).await;
    assert_eq!(get(&s.url("/v1/users/u1/tasks"), Some(&old)).await.0, 401);
    assert_eq!(get(&s.url("/v1/users/u1/tasks"), Some(&fine)).await.0, 200);
    s.store.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_authentication_is_limited_per_address() {
    let s = Server::start(&["--auth-failures-per-minute", "3"]).await;
    let own = token("u1", "1h", SECRET);
    for _ in 0..3 {
        assert_eq!(
            get(&s.url("/v1/users/u1/tasks"), Some("guess")).await.0,
            401
        );
    }
    // Now even a good token from that address waits.
    let limited = reqwest::Client::new()
        .get(s.url("/v1/users/u1/tasks"))
        .bearer_auth(&own)
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
    // Another address is not limited (127.0.0.2 is loopback too).
    let other = reqwest::Client::builder()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .build()
        .unwrap();
    let metrics = other
        .get(s.url("/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains("taskhistory_auth_failures_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("taskhistory_auth_rate_limited_total 1"),
        "{metrics}"
    );
    s.store.close().await;
}

/// Opens `user`'s Server-Sent Events with `token`: the answer (while it lives, the stream
/// stays open).
async fn open_sse(s: &Server, user: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(s.url(&format!("/v1/users/{user}/events")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// Opens `user`'s WebSocket with `token` in the URL (the upgrade must be accepted).
async fn open_ws(
    s: &Server,
    user: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let ws = s.base.replace("http://", "ws://");
    let url = format!("{ws}/v1/users/{user}/ws?access_token={token}");
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// The close code the server sends first on `socket` (within 5 s), if any.
async fn close_code(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Option<(u16, String)> {
    use tokio_tungstenite::tungstenite::Message;
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline.into(), socket.next()).await {
        if let Message::Close(frame) = m {
            return frame.map(|f| (u16::from(f.code), f.reason.to_string()));
        }
    }
    None
}

/// A metric's value (`name` with its labels, as the text shows them).
async fn metric(s: &Server, name: &str) -> Option<f64> {
    let (code, text) = get(&s.url("/metrics"), Some(ADMIN)).await;
    assert_eq!(code, 200, "{text}");
    let text = text.as_str().unwrap().to_owned();
    text.lines()
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
}

/// Waits (10 s at most) until `taskhistory_watchers` is `n`: the server has seen streams
/// end and given their slots back.
async fn wait_for_streams(s: &Server, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = metric(s, "taskhistory_watchers").await;
        if now == Some(n) {
            return;
        }
        assert!(Instant::now() < deadline, "streams open: {now:?}, not {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A 429 past a stream cap: `Retry-After`, and the JSON error naming the cap (not its
/// size, nor anything of the server's).
async fn assert_refused(answer: reqwest::Response, cap: &str) {
    assert_eq!(answer.status(), 429);
    assert_eq!(answer.headers()["retry-after"], "10");
    let body: Value = answer.json().await.unwrap();
    let error = &body["error"];
    assert_eq!(error["class"], "limit_reached", "{body}");
    assert_eq!(error["limit"], cap, "{body}");
    assert!(error["request_id"].is_string(), "{body}");
    let mut keys: Vec<_> = error.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["class", "limit", "message", "request_id"], "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_past_the_per_user_cap_are_refused_until_one_ends() {
    let s = Server::start(&["--max-streams-per-user", "2", "--heartbeat", "1"]).await;
    let a = token("ua", "1h", SECRET);
    let b = token("ub", "1h", SECRET);
    let a1 = open_sse(&s, "ua", &a).await;
    let a2 = open_sse(&s, "ua", &a).await;
    assert_eq!((a1.status().as_u16(), a2.status().as_u16()), (200, 200));
    // A third of ua's: 429, naming the per-user cap.
    assert_refused(open_sse(&s, "ua", &a).await, "max_streams_per_user").await;
    // Another user is not held back.
    let b1 = open_sse(&s, "ub", &b).await;
    assert_eq!(b1.status(), 200);
    // A WebSocket of ua: accepted, then closed with 1013 (Try Again Later).
    let mut refused = open_ws(&s, "ua", &a).await;
    let (code, reason) = close_code(&mut refused).await.expect("no close frame");
    assert_eq!(code, 1013, "{reason}");
    assert!(reason.contains("try again later"), "{reason}");
    drop(refused);
    // One of ua's streams ends (the client goes away): its slot comes back.
    drop(a1);
    wait_for_streams(&s, 2.0).await;
    let a3 = open_sse(&s, "ua", &a).await;
    assert_eq!(a3.status(), 200);
    // A WebSocket holds a slot too, and gives it back when it closes.
    drop(a2);
    wait_for_streams(&s, 2.0).await;
    let mut socket = open_ws(&s, "ua", &a).await;
    assert_refused(open_sse(&s, "ua", &a).await, "max_streams_per_user").await;
    socket.close(None).await.unwrap();
    drop(socket);
    wait_for_streams(&s, 2.0).await;
    let a4 = open_sse(&s, "ua", &a).await;
    assert_eq!(a4.status(), 200);
    // The refusals, by cap.
    for (cap, n) in [
        ("max_streams_per_user", 3.0),
        ("max_streams", 0.0),
        ("store_watchers", 0.0),
    ] {
        let name = format!("taskhistory_streams_refused_total{{cap=\"{cap}\"}}");
        assert_eq!(metric(&s, &name).await, Some(n), "{name}");
    }
    assert_eq!(metric(&s, "taskhistory_watchers").await, Some(3.0));
    drop((a3, a4, b1));
    s.store.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_past_the_server_cap_are_refused_for_every_user() {
    let s = Server::start(&["--max-streams", "3"]).await;
    let mut open = Vec::new();
    for user in ["u1", "u2", "u3"] {
        let answer = open_sse(&s, user, &token(user, "1h", SECRET)).await;
        assert_eq!(answer.status(), 200, "{user}");
        open.push(answer);
    }
    let u4 = token("u4", "1h", SECRET);
    assert_refused(open_sse(&s, "u4", &u4).await, "max_streams").await;
    let mut refused = open_ws(&s, "u4", &u4).await;
    let (code, reason) = close_code(&mut refused).await.expect("no close frame");
    assert_eq!(code, 1013, "{reason}");
    let name = "taskhistory_streams_refused_total{cap=\"max_streams\"}";
    assert_eq!(metric(&s, name).await, Some(2.0));
    // Refused requests count as 429 answers of their route.
    let name = "taskhistory_http_requests_total{route=\"/v1/users/{user}/events\",code=\"429\"}";
    assert_eq!(metric(&s, name).await, Some(1.0));
    drop(open);
    s.store.close().await;
}

#[test]
fn zero_stream_caps_are_a_configuration_error() {
    for flag in ["--max-streams", "--max-streams-per-user"] {
        let out = bin()
            .args(["--memory", "serve", "--listen", "127.0.0.1:0", flag, "0"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains("at least 1") && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_database_reaches_clients_without_its_details() {
    let db = OwnServer::start(&[]);
    let url = db.url();
    let migrated = bin()
        .args(["--database-url", &url, "--schema", "attack", "migrate"])
        .output()
        .unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let (mut child, base, said) = spawn(&url, "attack", &[], &["--request-timeout", "5"]);
    let (code, body) = get(&format!("{base}/v1/users/u1/tasks"), Some(ADMIN)).await;
    assert_eq!(code, 200, "{body}");
    drop(db); // stops the server (immediate)
    let port = url
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let mut seen = Vec::new();
    for path in ["/v1/users/u1/tasks", "/v1/users/u1/tasks/t1", "/healthz"] {
        let response = reqwest::Client::new()
            .get(format!("{base}{path}"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        let code = response.status().as_u16();
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let text = response.text().await.unwrap();
        assert_eq!(code, 503, "{path}: {text}");
        for secret in [
            port.as_str(),
            "127.0.0.1",
            "postgres",
            "refused",
            "connect",
            "attack",
        ] {
            assert!(
                !text.contains(secret),
                "{path} told the client {secret:?}: {text}"
            );
        }
        let body: Value = serde_json::from_str(&text).unwrap();
        let said_id = body["error"]["request_id"]
            .as_str()
            .or(body["request_id"].as_str())
            .unwrap();
        assert_eq!(said_id, id);
        seen.push(id);
    }
    // The log has the detail under each request id.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = said.lock().unwrap().clone();
        let all = seen.iter().all(|id| {
            log.lines()
                .any(|l| l.contains(id.as_str()) && l.contains("detail="))
        });
        if all {
            assert!(
                log.contains(&port) || log.to_lowercase().contains("connect"),
                "{log}"
            );
            assert!(!log.contains(ADMIN) && !log.contains(SECRET));
            break;
        }
        assert!(Instant::now() < deadline, "no detail in the log:\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn assert_secure(what: &str, headers: &reqwest::header::HeaderMap) {
    let csp = headers
        .get("content-security-policy")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert!(csp.contains("frame-ancestors 'none'"), "{what}: {csp:?}");
    assert!(csp.contains("script-src 'sha256-"), "{what}: {csp:?}");
    assert!(!csp.contains("unsafe-inline"), "{what}: {csp:?}");
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
        ("x-frame-options", "DENY"),
    ] {
        assert_eq!(
            headers.get(name).map(|v| v.to_str().unwrap()),
            Some(value),
            "{what}: {name}"
        );
    }
    assert!(headers.contains_key("x-request-id"), "{what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn security_headers_on_every_answer_and_a_paged_history() {
    let s = Server::start(&["--max-history-bytes", "3000"]).await;
    let own = token("u1", "1h", SECRET);
    let big = "x".repeat(1000);
    for n in 0..5 {
        s.store
            .save_task_history("u1", "t", n, &step(&big))
            .await
            .unwrap();
    }
    let client = reqwest::Client::new();
    for (what, request) in [
        ("page", client.get(s.url("/"))),
        ("health", client.get(s.url("/healthz"))),
        (
            "json",
            client.get(s.url("/v1/users/u1/tasks")).bearer_auth(&own),
        ),
        ("401", client.get(s.url("/v1/users/u1/tasks"))),
        ("404", client.get(s.url("/nothing"))),
        (
            "stream",
            client.get(s.url("/v1/users/u1/events")).bearer_auth(&own),
        ),
    ] {
        let response = request.send().await.unwrap();
        assert_secure(what, response.headers());
    }
    // Paging: limit, after_step, and the cap on the answer's bytes.
    let page = |q: &'static str| {
        let url = s.url(&format!("/v1/users/u1/tasks/t{q}"));
        let own = own.clone();
        async move { get(&url, Some(&own)).await }
    };
    let (code, first) = page("?limit=2").await;
    assert_eq!(code, 200, "{first}");
    let steps = |v: &Value| -> Vec<i64> {
        v["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["step"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(steps(&first), [0, 1]);
    assert_eq!(first["next_after_step"], 1);
    assert_eq!(first["history"][0]["result"]["message"], big.as_str());
    let (_, capped) = page("?after_step=1").await;
    assert_eq!(steps(&capped), [2, 3], "{capped}");
    assert_eq!(capped["next_after_step"], 3);
    let (_, last) = page("?after_step=3").await;
    assert_eq!(steps(&last), [4]);
    assert_eq!(last["next_after_step"], Value::Null);
    for (q, field) in [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?after_step=x", "after_step"),
    ] {
        let url = s.url(&format!("/v1/users/u1/tasks/t{q}"));
        let (code, body) = get(&url, Some(&own)).await;
        assert_eq!(
            (code, body["error"]["field"].as_str()),
            (400, Some(field)),
            "{q}: {body}"
        );
    }
    s.store.close().await;
}

#[test]
fn cors_with_any_origin_is_a_configuration_error_not_a_panic() {
    for origin in ["*", "null"] {
        let out = bin()
            .args([
                "--memory",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--cors-origin",
                origin,
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{origin}: {stderr}");
        assert!(
            stderr.contains("--cors-origin") && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}
