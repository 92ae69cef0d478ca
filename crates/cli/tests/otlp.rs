//! Traces reach OpenTelemetry: `serve` with `OTEL_EXPORTER_OTLP_ENDPOINT` set exports the
//! store's spans over OTLP (HTTP, protobuf) to a receiver this test runs, each with its
//! operation and ids, and no token or secret in any of them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

mod common;
use common::{bin, get, token, Server, ADMIN, SECRET};

/// An OTLP/HTTP receiver: every POSTed body, answered 200 with an empty response message.
fn receiver() -> (String, mpsc::Receiver<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut request = String::new();
                    if reader.read_line(&mut request).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut length = 0;
                    loop {
                        let mut header = String::new();
                        reader.read_line(&mut header).unwrap();
                        let header = header.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = header.split_once(':') {
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap();
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    let path = request.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let _ = tx.send((path, body));
                    stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
                        )
                        .unwrap();
                }
            });
        }
    });
    (url, rx)
}

/// A received span's operation and user.
type Span = (Option<String>, Option<String>);

/// The `taskhistory` spans of the OTLP requests received until none came for `wait`:
/// (operation, user); and every request's bytes.
fn received(bodies: &mpsc::Receiver<(String, Vec<u8>)>, wait: Duration) -> (Vec<Span>, Vec<u8>) {
    let mut operations = Vec::new();
    let mut raw = Vec::new();
    while let Ok((path, body)) = bodies.recv_timeout(wait) {
        assert_eq!(path, "/v1/traces");
        raw.extend_from_slice(&body);
        let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        for span in request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .filter(|s| s.name == "taskhistory")
        {
            let attribute = |key: &str| {
                span.attributes
                    .iter()
                    .find(|a| a.key == key)
                    .and_then(|a| a.value.as_ref())
                    .and_then(|v| match &v.value {
                        Some(AnyValue::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    })
            };
            operations.push((attribute("operation"), attribute("user_id")));
        }
    }
    (operations, raw)
}

/// A one-shot command exports its spans too, flushed before it exits.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_flushes_its_spans_before_it_exits() {
    let (endpoint, bodies) = receiver();
    let config = taskhistory_testing::fresh_config().await;
    let store = taskhistory_testing::store_for(config.clone()).await;
    let url = taskhistory_testing::database_url().await;
    let out = bin()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .args([
            "--database-url",
            &url,
            "--schema",
            config.get_schema().unwrap(),
        ])
        .args(["status", "otlp_cli_user", "t1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (spans, _) = received(&bodies, Duration::from_secs(2));
    let status = (
        Some("check_task_status".to_owned()),
        Some("otlp_cli_user".to_owned()),
    );
    assert!(spans.contains(&status), "spans received: {spans:?}");
    use taskhistory_core::TaskHistoryStore;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_store_s_spans_reach_an_otlp_receiver_without_secrets() {
    let (endpoint, bodies) = receiver();
    let mut server = Server::start_with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)], &[]).await;
    let user_token = token("otlp_user", "1h", SECRET);
    let (status, _) = get(
        &server.url("/v1/users/otlp_user/tasks?limit=5"),
        Some(&user_token),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = get(&server.url("/v1/users/otlp_user/tasks/t1"), Some(ADMIN)).await;
    assert_eq!(status, 404);
    // Stopped: the exporter flushes what it holds before the process exits.
    assert_eq!(server.stop(), Some(0));

    let (operations, raw) = received(&bodies, Duration::from_secs(2));
    let list = (
        Some("get_user_tasks_page".to_owned()),
        Some("otlp_user".to_owned()),
    );
    assert!(operations.contains(&list), "spans received: {operations:?}");
    assert!(
        operations
            .iter()
            .any(|(op, _)| op.as_deref() == Some("scan_history")
                || op.as_deref() == Some("check_task_status")),
        "the task route's store call has no span: {operations:?}"
    );
    let raw = String::from_utf8_lossy(&raw);
    for secret in [user_token.as_str(), ADMIN, SECRET] {
        assert!(!raw.contains(secret), "a secret in the exported spans");
    }
}
