//! Unit tests of the upstream client against raw TCP servers: pooling, timeouts, streaming, abort.
#![allow(clippy::err_expect)]
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Abort, Timeouts, Upstream};
use crate::errors::{Error, Phase};

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(1),
        first_byte: Duration::from_millis(300),
        idle: Duration::from_millis(300),
        total: Duration::from_secs(5),
    }
}

/// Read one request head (and its small body) from the socket; false at EOF.
async fn read_request(sock: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1024];
    loop {
        match sock.read(&mut byte).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&byte[..n]),
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                match sock.read(&mut byte).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => buf.extend_from_slice(&byte[..n]),
                }
            }
            return true;
        }
    }
}

/// A keep-alive server answering `body` to every request; counts accepted connections.
async fn keepalive_server(body: &'static str) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                while read_request(&mut sock).await {
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
                        body.len(),
                        body
                    );
                    if sock.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}/v1/chat/completions"), accepted)
}

fn request(url: &str) -> hyper::Request<http_body_util::Full<Bytes>> {
    let headers = vec![
        ("Content-Type".to_owned(), "application/json".to_owned()),
        ("Connection".to_owned(), "close".to_owned()),
    ];
    Upstream::build_request("POST", url, &headers, Bytes::from_static(b"{}")).expect("request")
}

#[tokio::test]
async fn sequential_requests_reuse_one_pooled_connection() {
    let (url, accepted) = keepalive_server("{\"ok\":true}").await;
    let upstream = Upstream::new(timeouts(), Duration::from_secs(30));
    for _ in 0..5 {
        let mut response = upstream.send(request(&url)).await.expect("send");
        assert_eq!(response.status, 200);
        assert_eq!(
            response.body.read_all().await.expect("body"),
            Bytes::from_static(b"{\"ok\":true}")
        );
        assert!(response
            .headers
            .iter()
            .any(|(n, v)| n == "content-type" && v == "application/json"));
        assert!(!response.headers.iter().any(|(n, _)| n == "content-length"));
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "keep-alive connection was not reused"
    );
}

#[tokio::test]
async fn concurrent_requests_are_not_capped_by_the_pool() {
    let (url, accepted) = keepalive_server("{}").await;
    let upstream = Arc::new(Upstream::new(timeouts(), Duration::from_secs(30)));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let upstream = upstream.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut response = upstream.send(request(&url)).await.expect("send");
            response.body.read_all().await.expect("body")
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("join"), Bytes::from_static(b"{}"));
    }
    let opened = accepted.load(Ordering::SeqCst);
    assert!((1..=50).contains(&opened), "opened {opened}");
    // The idle connections are all kept: another burst opens none.
    let before = accepted.load(Ordering::SeqCst);
    let mut response = upstream.send(request(&url)).await.expect("send");
    response.body.read_all().await.expect("body");
    assert_eq!(accepted.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn refused_connection_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let upstream = Upstream::new(timeouts(), Duration::from_secs(30));
    let err = upstream
        .send(request(&format!("http://{addr}/x")))
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
}

#[tokio::test]
async fn silent_backend_hits_the_first_byte_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let upstream = Upstream::new(timeouts(), Duration::from_secs(30));
    let started = std::time::Instant::now();
    let err = upstream
        .send(request(&format!("http://{addr}/x")))
        .await
        .err()
        .expect("must fail");
    assert!(
        matches!(
            err,
            Error::Timeout {
                phase: Phase::FirstByte,
                ..
            }
        ),
        "{err:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(290) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
}

/// A server that sends a chunked body: `first` at once, then waits `gap`, then `second` and the end.
async fn chunked_server(gap: Duration, closed: Arc<tokio::sync::Notify>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let closed = closed.clone();
            tokio::spawn(async move {
                if !read_request(&mut sock).await {
                    return;
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                let (mut rd, mut wr) = sock.split();
                let _ = wr.write_all(head.as_bytes()).await;
                let _ = wr.write_all(b"6\r\ndata:1\r\n").await;
                let rest = async {
                    tokio::time::sleep(gap).await;
                    let _ = wr.write_all(b"6\r\ndata:2\r\n0\r\n\r\n").await;
                    std::future::pending::<()>().await;
                };
                // Whatever the writer is doing, notice the client closing the connection.
                let eof = async {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = rd.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                };
                tokio::select! {
                    () = rest => {}
                    () = eof => {}
                }
                closed.notify_one();
            });
        }
    });
    format!("http://{addr}/stream")
}

#[tokio::test]
async fn stream_chunks_arrive_one_by_one_as_sent() {
    let closed = Arc::new(tokio::sync::Notify::new());
    let url = chunked_server(Duration::from_millis(150), closed).await;
    let upstream = Upstream::new(timeouts(), Duration::from_secs(30));
    let mut response = upstream.send(request(&url)).await.expect("send");
    let started = std::time::Instant::now();
    let first = response
        .body
        .next_chunk()
        .await
        .expect("chunk")
        .expect("some");
    assert_eq!(first, Bytes::from_static(b"data:1"));
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "first chunk was held back"
    );
    let second = response
        .body
        .next_chunk()
        .await
        .expect("chunk")
        .expect("some");
    assert_eq!(second, Bytes::from_static(b"data:2"));
    assert!(started.elapsed() >= Duration::from_millis(140));
    assert!(response.body.next_chunk().await.expect("end").is_none());
}

#[tokio::test]
async fn stalled_stream_hits_the_idle_timeout() {
    let closed = Arc::new(tokio::sync::Notify::new());
    let url = chunked_server(Duration::from_secs(3), closed).await;
    let upstream = Upstream::new(timeouts(), Duration::from_secs(30));
    let mut response = upstream.send(request(&url)).await.expect("send");
    response.body.next_chunk().await.expect("chunk");
    let err = response.body.next_chunk().await.expect_err("must time out");
    assert!(
        matches!(
            err,
            Error::Timeout {
                phase: Phase::Idle,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn aborted_body_closes_the_upstream_connection() {
    let closed = Arc::new(tokio::sync::Notify::new());
    let url = chunked_server(Duration::from_secs(3), closed.clone()).await;
    let upstream = Upstream::new(timeouts(), Duration::from_secs(30));
    let mut response = upstream.send(request(&url)).await.expect("send");
    response.body.next_chunk().await.expect("chunk");
    let handle = response.body.abort_handle();
    handle.trigger();
    assert!(response.body.next_chunk().await.expect("aborted").is_none());
    drop(response);
    tokio::time::timeout(Duration::from_secs(1), closed.notified())
        .await
        .expect("backend did not see the connection close within 1 s");
}

#[test]
fn hop_by_hop_request_headers_are_dropped_and_host_is_set() {
    let headers = vec![
        ("Connection".to_owned(), "keep-alive".to_owned()),
        ("Transfer-Encoding".to_owned(), "chunked".to_owned()),
        ("Host".to_owned(), "client.example".to_owned()),
        ("X-Request-ID".to_owned(), "abc".to_owned()),
    ];
    let req = Upstream::build_request("POST", "http://127.0.0.1:9/v1", &headers, Bytes::new())
        .expect("build");
    assert_eq!(
        req.headers().get("host").map(|v| v.as_bytes()),
        Some(&b"127.0.0.1:9"[..])
    );
    assert!(req.headers().get("connection").is_none());
    assert!(req.headers().get("transfer-encoding").is_none());
    assert_eq!(
        req.headers().get("x-request-id").map(|v| v.as_bytes()),
        Some(&b"abc"[..])
    );
    assert!(Upstream::build_request("BAD METHOD", "http://x/", &[], Bytes::new()).is_err());
    assert!(Upstream::build_request("GET", "not a url", &[], Bytes::new()).is_err());
}

/// A server that sends the status line and headers at once, the first chunk after `delay` (or with
/// the headers when `delay` is zero), then ends the body.
async fn late_first_chunk_server(delay: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                if !read_request(&mut sock).await {
                    return;
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                if delay.is_zero() {
                    let both = format!("{head}6\r\ndata:1\r\n");
                    let _ = sock.write_all(both.as_bytes()).await;
                } else {
                    let _ = sock.write_all(head.as_bytes()).await;
                    tokio::time::sleep(delay).await;
                    let _ = sock.write_all(b"6\r\ndata:1\r\n").await;
                }
                let _ = sock.write_all(b"0\r\n\r\n").await;
                let mut buf = [0u8; 64];
                while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    format!("http://{addr}/stream")
}

#[tokio::test]
async fn headers_are_answered_before_a_late_first_chunk() {
    let url = late_first_chunk_server(Duration::from_millis(400)).await;
    let upstream = Upstream::new(
        timeouts_with_first_byte(Duration::from_secs(2)),
        Duration::from_secs(30),
    );
    let started = std::time::Instant::now();
    let mut response = upstream.send(request(&url)).await.expect("send");
    let early = response
        .body
        .chunk_if_ready(Duration::from_millis(2))
        .await
        .expect("no error");
    assert!(
        early.is_none(),
        "the first chunk was not sent yet: {early:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "headers were held back: {:?}",
        started.elapsed()
    );
    // The first chunk still comes under the first-byte budget (2 s), not the idle one (300 ms).
    let first = response.body.next_chunk().await.expect("chunk");
    assert_eq!(first, Some(Bytes::from_static(b"data:1")));
    assert!(started.elapsed() >= Duration::from_millis(390));
    assert!(response.body.next_chunk().await.expect("end").is_none());
}

#[tokio::test]
async fn a_first_chunk_sent_with_the_headers_is_ready_at_once() {
    let url = late_first_chunk_server(Duration::ZERO).await;
    let upstream = Upstream::new(timeouts(), Duration::from_secs(30));
    let mut response = upstream.send(request(&url)).await.expect("send");
    let early = response
        .body
        .chunk_if_ready(Duration::from_millis(2))
        .await
        .expect("no error");
    assert_eq!(early, Some(Bytes::from_static(b"data:1")));
    assert!(response.body.next_chunk().await.expect("end").is_none());
}

#[tokio::test]
async fn a_missing_first_chunk_is_a_first_byte_timeout() {
    let url = late_first_chunk_server(Duration::from_secs(3)).await;
    let mut limits = timeouts_with_first_byte(Duration::from_millis(300));
    limits.idle = Duration::from_secs(5);
    let upstream = Upstream::new(limits, Duration::from_secs(30));
    let started = std::time::Instant::now();
    let mut response = upstream.send(request(&url)).await.expect("send");
    let err = response.body.next_chunk().await.expect_err("must time out");
    assert!(
        matches!(
            err,
            Error::Timeout {
                phase: Phase::FirstByte,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

fn timeouts_with_first_byte(first_byte: Duration) -> Timeouts {
    Timeouts {
        first_byte,
        ..timeouts()
    }
}

#[tokio::test]
async fn a_trigger_before_the_wait_is_seen() {
    let abort = Abort::default();
    abort.trigger();
    let waited = tokio::time::timeout(
        Duration::from_secs(1),
        abort.unless_triggered(std::future::pending::<()>()),
    )
    .await
    .expect("a trigger that came first was lost");
    assert!(waited.is_none());
}

/// Issue 9 item 17: a `trigger()` from another thread racing the start of a wait must never be
/// lost (the wait must end at once, not at the next frame or the idle timeout). Each round starts
/// a wait while another thread triggers at a slightly different moment, sweeping the window.
#[test]
fn a_trigger_racing_the_start_of_a_wait_is_never_lost() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    for round in 0..4000u32 {
        let abort = Arc::new(Abort::default());
        let other = abort.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let spin = round % 200;
        let trigger = std::thread::spawn(move || {
            let _ = ready_rx.recv();
            for _ in 0..spin {
                std::hint::spin_loop();
            }
            other.trigger();
        });
        let waited = runtime.block_on(async {
            let _ = ready_tx.send(());
            tokio::time::timeout(
                Duration::from_secs(1),
                abort.unless_triggered(std::future::pending::<()>()),
            )
            .await
        });
        trigger.join().expect("trigger thread");
        assert!(
            matches!(waited, Ok(None)),
            "round {round}: the trigger was lost"
        );
    }
}
