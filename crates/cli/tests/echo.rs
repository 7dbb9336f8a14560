//! Tests of `biplane echo` on its own: the upstream every other end-to-end test relies on.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is a failure"
)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::net::TcpStream;

#[tokio::test]
async fn describes_the_request_as_json() {
    let echo = Echo::spawn("alpha");
    let r = client()
        .post(format!("http://{}/some/path?a=1&b=2", echo.addr))
        .header("x-test", "one")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-echo-name"], "alpha");
    assert_eq!(r.headers()["content-type"], "application/json");
    let v = json(&r.bytes().await.unwrap());
    assert_eq!(v["name"], "alpha");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/some/path");
    assert_eq!(v["query"], "a=1&b=2");
    assert_eq!(v["headers"]["x-test"], "one");
    assert_eq!(v["protocol"], "HTTP/1.1");
    assert_eq!(v["body_bytes"], 5);
}

#[tokio::test]
async fn default_name_is_the_bound_address() {
    let echo = Echo::spawn_unnamed();
    let r = client()
        .get(format!("http://{}/", echo.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-echo-name"].to_str().unwrap(),
        echo.addr.to_string()
    );
}

#[tokio::test]
async fn status_delay_and_body_bytes_controls() {
    let echo = Echo::spawn("e");
    let c = client();
    let r = c
        .get(format!("http://{}/?status=503", echo.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);

    let start = Instant::now();
    let r = c
        .get(format!("http://{}/?delay_ms=150", echo.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(start.elapsed() >= Duration::from_millis(150));

    let r = c
        .get(format!("http://{}/?body_bytes=100000", echo.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-length"], "100000");
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), 100_000);
    assert!(body.iter().all(|&b| b == b'x'));
}

#[tokio::test]
async fn echo_body_streams_back() {
    let echo = Echo::spawn("e");
    let payload = vec![7u8; 300_000];
    let r = client()
        .put(format!("http://{}/?echo_body=1", echo.addr))
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), payload.as_slice());
}

#[tokio::test]
async fn speaks_h2c_prior_knowledge() {
    let echo = Echo::spawn("e");
    let r = h2c_client()
        .get(format!("http://{}/h2", echo.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(json(&r.bytes().await.unwrap())["protocol"], "HTTP/2");
}

#[tokio::test]
async fn websocket_frames_are_echoed() {
    let echo = Echo::spawn("e");
    let mut s = TcpStream::connect(echo.addr).await.unwrap();
    let resp = ws_handshake(&mut s, "echo", "/ws").await;
    assert_eq!(resp.header("x-echo-name").as_deref(), Some("e"));
    ws_send(&mut s, 0x1, b"hello websocket").await;
    assert_eq!(ws_recv(&mut s).await, (0x1, b"hello websocket".to_vec()));
    let big = vec![0xABu8; 70_000];
    ws_send(&mut s, 0x2, &big).await;
    assert_eq!(ws_recv(&mut s).await, (0x2, big));
    ws_send(&mut s, 0x8, &[0x03, 0xE8]).await;
    assert_eq!(ws_recv(&mut s).await.0, 0x8);
}

#[tokio::test]
async fn grpc_message_echoed_with_trailers() {
    let echo = Echo::spawn("e");
    let s = TcpStream::connect(echo.addr).await.unwrap();
    let reply = grpc_call(s, "echo", "/test.Echo/Unary", b"ping-message", &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-type"], "application/grpc");
    assert_eq!(
        reply.messages,
        vec![bytes::Bytes::from_static(b"ping-message")]
    );
    assert_eq!(reply.trailers.unwrap()["grpc-status"], "0");

    let s = TcpStream::connect(echo.addr).await.unwrap();
    let reply = grpc_call(
        s,
        "echo",
        "/test.Echo/Unary",
        b"x",
        &[("x-echo-grpc-status", "14")],
    )
    .await;
    assert_eq!(reply.trailers.unwrap()["grpc-status"], "14");
}
