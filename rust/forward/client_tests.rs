//! Unit tests of the upstream client against raw TCP servers: pooling, timeouts, streaming, abort.
#![allow(clippy::err_expect)]
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use super::{Abort, Timeouts, Upstream};
use crate::errors::{Error, Phase};
use crate::forward::tls::client_config;

/// A client with the system's roots only (and a 30 s pool idle timeout).
fn plain(timeouts: Timeouts) -> Upstream {
    Upstream::new(
        timeouts,
        Duration::from_secs(30),
        client_config(None).expect("tls"),
    )
}

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(1),
        first_byte: Duration::from_millis(300),
        idle: Duration::from_millis(300),
        total: Duration::from_secs(5),
    }
}

/// Read one request head (and its small body) from the socket; false at EOF.
async fn read_request<S: AsyncRead + Unpin>(sock: &mut S) -> bool {
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
    let upstream = plain(timeouts());
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
    let upstream = Arc::new(plain(timeouts()));
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
    let upstream = plain(timeouts());
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
    let upstream = plain(timeouts());
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
    let upstream = plain(timeouts());
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
    let upstream = plain(timeouts());
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
    let upstream = plain(timeouts());
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
    let upstream = plain(timeouts_with_first_byte(Duration::from_secs(2)));
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
    let upstream = plain(timeouts());
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
    let upstream = plain(limits);
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

// -- TLS ------------------------------------------------------------------------------------------

const TEST_CA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/rust/forward/testdata/ca.pem");

fn acceptor() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/rust/forward/testdata");
    let certs = CertificateDer::pem_file_iter(format!("{dir}/server.pem"))
        .expect("server.pem")
        .collect::<std::result::Result<Vec<_>, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(format!("{dir}/server.key")).expect("server.key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// Answer `body` to every request on `sock` until it closes; the request heads are kept.
async fn answer_all<S: AsyncRead + AsyncWrite + Unpin>(mut sock: S, body: &str) {
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
}

/// A keep-alive HTTPS server (the test CA's leaf for 127.0.0.1); counts TCP connections accepted,
/// each of which is one full TLS handshake.
async fn tls_server(body: &'static str) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let tls = acceptor();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let tls = tls.clone();
            tokio::spawn(async move {
                if let Ok(stream) = tls.accept(sock).await {
                    answer_all(stream, body).await;
                }
            });
        }
    });
    (
        format!("https://{addr}/openai/v1/chat/completions"),
        accepted,
    )
}

#[tokio::test]
async fn https_requests_reuse_one_pooled_tls_connection() {
    let (url, accepted) = tls_server("{\"tls\":true}").await;
    let upstream = Upstream::new(
        timeouts(),
        Duration::from_secs(30),
        client_config(Some(TEST_CA)).expect("ca_file"),
    );
    for _ in 0..5 {
        let mut response = upstream.send(request(&url)).await.expect("send");
        assert_eq!(response.status, 200);
        assert_eq!(
            response.body.read_all().await.expect("body"),
            Bytes::from_static(b"{\"tls\":true}")
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one handshake, then reuse"
    );
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_connect_error() {
    let (url, _) = tls_server("{}").await;
    let err = plain(timeouts())
        .send(request(&url))
        .await
        .err()
        .expect("must fail");
    match err {
        Error::Connect { reason, .. } => assert!(reason.contains("certificate"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_a_connect_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock); // accepts TCP, never answers the ClientHello
        }
    });
    let upstream = plain(Timeouts {
        connect: Duration::from_millis(200),
        first_byte: Duration::from_secs(5),
        ..timeouts()
    });
    let started = std::time::Instant::now();
    let err = upstream
        .send(request(&format!("https://{addr}/x")))
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_bad_ca_file_is_refused_with_a_clear_message() {
    let missing = client_config(Some("/nonexistent/ca.pem"))
        .err()
        .expect("missing");
    assert!(missing.to_string().contains("cannot be read"), "{missing}");
    let not_pem = client_config(Some(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")))
        .err()
        .expect("not pem");
    assert!(
        not_pem.to_string().contains("holds no PEM certificate"),
        "{not_pem}"
    );
    let key_only = client_config(Some(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/rust/forward/testdata/server.key"
    )))
    .err()
    .expect("a key is no certificate");
    assert!(
        matches!(key_only, Error::InvalidArgument(_)),
        "{key_only:?}"
    );
    assert!(client_config(Some(TEST_CA)).is_ok());
}

#[test]
fn urls_are_checked_and_host_is_the_backend_authority() {
    assert!(Upstream::build_request("GET", "ftp://x/", &[], Bytes::new()).is_err());
    assert!(Upstream::build_request("GET", "/v1/models", &[], Bytes::new()).is_err());
    let client_host = [("host".to_owned(), "gateway.example".to_owned())];
    for (url, host) in [
        ("https://gpu3.lan/openai/v1/chat/completions", "gpu3.lan"),
        ("https://gpu3.lan:8443/v1/models", "gpu3.lan:8443"),
        (
            "http://user:secret@10.0.0.5:8000/v1/models",
            "10.0.0.5:8000",
        ),
        ("http://[::1]:8001/v1/models", "[::1]:8001"),
    ] {
        let req = Upstream::build_request("POST", url, &client_host, Bytes::new()).expect(url);
        assert_eq!(
            req.headers().get("host").map(|v| v.as_bytes()),
            Some(host.as_bytes()),
            "{url}"
        );
        assert_eq!(req.headers().get_all("host").iter().count(), 1);
    }
}

/// A keep-alive plain-HTTP server like `tls_server` (same answer), for the comparison below.
async fn plain_server(body: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(answer_all(sock, body));
        }
    });
    format!("http://{addr}/v1/chat/completions")
}

/// Not a test: the numbers of docs/adr/010-upstream-tls.md. Run with an optimised build, e.g.
/// `CARGO_PROFILE_RELEASE_LTO=false cargo test --release --target-dir target/measure --lib \
///  measure_tls_against_plain -- --ignored --nocapture`. Client and server share this process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn measure_tls_against_plain() {
    let (https, _) = tls_server("{\"ok\":true}").await;
    let http = plain_server("{\"ok\":true}").await;
    for (name, url) in [("http", http), ("https", https)] {
        let client = || {
            Arc::new(Upstream::new(
                timeouts(),
                Duration::from_secs(30),
                client_config(Some(TEST_CA)).expect("tls"),
            ))
        };
        // A new connection per request (connect, plus the handshake for https).
        let fresh = 200;
        let started = std::time::Instant::now();
        for _ in 0..fresh {
            let upstream = client();
            let mut response = upstream.send(request(&url)).await.expect("send");
            response.body.read_all().await.expect("body");
        }
        let cold = started.elapsed() / fresh;
        // Pooled: 16 concurrent callers, 1,000 requests each, over 16 kept-alive connections.
        let upstream = client();
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let upstream = upstream.clone();
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..1000 {
                    let mut response = upstream.send(request(&url)).await.expect("send");
                    response.body.read_all().await.expect("body");
                }
            }));
        }
        for task in tasks {
            task.await.expect("join");
        }
        let rate = 16_000.0 / started.elapsed().as_secs_f64();
        println!("{name}: first request on a new connection {cold:?}, pooled {rate:.0} req/s");
    }
}

/// A server that writes `body` (raw chunked encoding) in one write after the head, then keeps the
/// connection open, or closes it when `close` (a body cut short).
async fn raw_body_server(body: &'static [u8], close: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                if !read_request(&mut sock).await {
                    return;
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                let mut all = head.as_bytes().to_vec();
                all.extend_from_slice(body);
                let _ = sock.write_all(&all).await;
                if !close {
                    std::future::pending::<()>().await;
                }
            });
        }
    });
    format!("http://{addr}/stream")
}

#[tokio::test]
async fn chunks_that_arrived_together_are_joined_and_later_ones_are_not_waited_for() {
    let url = raw_body_server(b"6\r\ndata:1\r\n6\r\ndata:2\r\n6\r\ndata:3\r\n", false).await;
    let upstream = plain(timeouts());
    let mut response = upstream.send(request(&url)).await.expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await; // all three are in by now
    let joined = response.body.next_ready(1 << 16).await.expect("read");
    assert_eq!(joined, Some(Bytes::from_static(b"data:1data:2data:3")));
    // nothing more has come: the next read waits for it (here: until the idle timeout)
    let err = response.body.next_ready(1 << 16).await.expect_err("idle");
    assert!(matches!(
        err,
        Error::Timeout {
            phase: Phase::Idle,
            ..
        }
    ));
}

#[tokio::test]
async fn joining_stops_at_the_byte_limit_and_the_end_is_answered_after_the_data() {
    let url = raw_body_server(
        b"6\r\ndata:1\r\n6\r\ndata:2\r\n6\r\ndata:3\r\n0\r\n\r\n",
        false,
    )
    .await;
    let upstream = plain(timeouts());
    let mut response = upstream.send(request(&url)).await.expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let first = response.body.next_ready(10).await.expect("read");
    assert_eq!(first, Some(Bytes::from_static(b"data:1data:2")));
    let rest = response.body.next_ready(10).await.expect("read");
    assert_eq!(rest, Some(Bytes::from_static(b"data:3")));
    assert_eq!(response.body.next_ready(10).await.expect("end"), None);
}

#[tokio::test]
async fn a_break_right_behind_ready_chunks_is_reported_by_the_next_read() {
    // two chunks, then the connection closes without the last chunk
    let url = raw_body_server(b"6\r\ndata:1\r\n6\r\ndata:2\r\n", true).await;
    let upstream = plain(timeouts());
    let mut response = upstream.send(request(&url)).await.expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let joined = response.body.next_ready(1 << 16).await.expect("data first");
    assert_eq!(joined, Some(Bytes::from_static(b"data:1data:2")));
    let err = response
        .body
        .next_ready(1 << 16)
        .await
        .expect_err("then the break");
    assert!(matches!(err, Error::Protocol { .. }), "{err:?}");
}
