//! `streamload serve`: a paced SSE mock of an OpenAI chat backend.
//!
//! Each stream's frames have absolute deadlines (`t0 + j / rate`, t0 = when frame 0 was written). One
//! ticker task owns the write half of every running stream and, each time it wakes, writes every frame
//! that is due (non-blocking; a frame the socket cannot take is retried 1 ms later). The actual write
//! time of every frame is recorded per stream id (`sl-<id>-` in the prompt) and handed out, then
//! forgotten, by `GET /sendlog`: one line per stream, `id t0 d1 d2 ...` in ns (t0 since the mock
//! started, then the gaps), so the load client subtracts real send gaps, not the nominal ones.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::http::{parse_request, Parse};
use crate::sse::{self, Frames};

pub struct ServeOpts {
    pub host: String,
    pub port: u16,
    pub tokens: usize,
    pub rate: f64,
    pub model: String,
}

struct Ctx {
    frames: Frames,
    tokens: usize,
    model: String,
    epoch: Instant,
    debug: bool,
    sendlog: Mutex<HashMap<u64, Vec<u64>>>,
    streams: mpsc::UnboundedSender<Active>,
}

impl Ctx {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// A stream between frame 0 and its last frame, owned by the ticker.
struct Active {
    w: OwnedWriteHalf,
    id: Option<u64>,
    tokens: usize,
    next: usize,
    written: usize,
    sends: Vec<u64>,
    done: oneshot::Sender<Option<OwnedWriteHalf>>,
}

pub async fn run(opts: ServeOpts) -> Result<(), String> {
    let addr: std::net::SocketAddr = format!("{}:{}", opts.host, opts.port)
        .parse()
        .map_err(|e| format!("bad address: {e}"))?;
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket.set_reuseaddr(true).map_err(|e| e.to_string())?;
    socket
        .bind(addr)
        .map_err(|e| format!("cannot bind {addr}: {e}"))?;
    let listener = socket.listen(4096).map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(Ctx {
        frames: Frames::new(&opts.model, opts.tokens),
        tokens: opts.tokens,
        model: opts.model,
        epoch: Instant::now(),
        debug: std::env::var_os("STREAMLOAD_DEBUG").is_some(),
        sendlog: Mutex::new(HashMap::new()),
        streams: tx,
    });
    let interval_ns = (1e9 / opts.rate.max(0.001)) as u64;
    tokio::spawn(ticker(rx, ctx.clone(), interval_ns));
    eprintln!(
        "streamload serve: listening on {addr}, {} tokens at {} /s",
        opts.tokens, opts.rate
    );
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, ctx.clone()));
            }
            Err(e) => {
                // Out of descriptors, most likely: back off rather than spin.
                eprintln!("streamload serve: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

enum Wrote {
    Frame,
    Blocked,
    Failed,
}

fn write_due(a: &mut Active, frames: &Frames) -> Wrote {
    let frame = frames.get(a.next, a.tokens);
    while a.written < frame.len() {
        match a.w.try_write(&frame[a.written..]) {
            Ok(0) => return Wrote::Failed,
            Ok(n) => a.written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Wrote::Blocked,
            Err(_) => return Wrote::Failed,
        }
    }
    Wrote::Frame
}

async fn ticker(mut rx: mpsc::UnboundedReceiver<Active>, ctx: Arc<Ctx>, interval_ns: u64) {
    let mut slots: Vec<Option<Active>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut due: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    loop {
        let next = due.peek().map(|Reverse((at, _))| *at);
        let wake = ctx.epoch + Duration::from_nanos(next.unwrap_or(0));
        tokio::select! {
            biased;
            msg = rx.recv() => {
                let Some(a) = msg else { return };
                let at = a.sends[0] + interval_ns * a.next as u64;
                let slot = match free.pop() {
                    Some(s) => { slots[s] = Some(a); s }
                    None => { slots.push(Some(a)); slots.len() - 1 }
                };
                due.push(Reverse((at, slot)));
            }
            _ = tokio::time::sleep_until(wake.into()), if next.is_some() => {
                let now = ctx.now();
                while let Some(&Reverse((at, slot))) = due.peek() {
                    if at > now {
                        break;
                    }
                    due.pop();
                    let Some(mut a) = slots[slot].take() else { continue };
                    match write_due(&mut a, &ctx.frames) {
                        Wrote::Frame => {
                            a.sends.push(ctx.now());
                            a.next += 1;
                            a.written = 0;
                            if a.next > a.tokens {
                                free.push(slot);
                                if let Some(id) = a.id {
                                    if let Ok(mut log) = ctx.sendlog.lock() {
                                        log.insert(id, std::mem::take(&mut a.sends));
                                    }
                                }
                                let _ = a.done.send(Some(a.w));
                            } else {
                                due.push(Reverse((a.sends[0] + interval_ns * a.next as u64, slot)));
                                slots[slot] = Some(a);
                            }
                        }
                        Wrote::Blocked => {
                            due.push(Reverse((now + 1_000_000, slot)));
                            slots[slot] = Some(a);
                        }
                        Wrote::Failed => {
                            free.push(slot);
                            let _ = a.done.send(None);
                        }
                    }
                }
            }
        }
    }
}

fn response(status: &str, content_type: &str, body: &[u8], close: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{}\r\n",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn completion(model: &str) -> Vec<u8> {
    format!(
        "{{\"id\":\"chatcmpl-streamload\",\"object\":\"chat.completion\",\"created\":1700000000,\"model\":\"{model}\",\
         \"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"tok0 tok1 tok2\"}},\
         \"finish_reason\":\"stop\"}}],\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8}}}}"
    )
    .into_bytes()
}

fn sendlog_text(log: HashMap<u64, Vec<u64>>) -> Vec<u8> {
    let mut out = String::with_capacity(log.values().map(|v| v.len() * 9 + 24).sum());
    for (id, sends) in log {
        let _ = write!(out, "{id}");
        let mut prev = None;
        for s in sends {
            let _ = match prev {
                None => write!(out, " {s}"),
                Some(p) => write!(out, " {}", s - p),
            };
            prev = Some(s);
        }
        out.push('\n');
    }
    out.into_bytes()
}

async fn connection(stream: TcpStream, ctx: Arc<Ctx>) {
    let _ = stream.set_nodelay(true);
    let (mut r, mut w) = stream.into_split();
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    loop {
        let req = loop {
            match parse_request(&buf) {
                Parse::Done(req, used) => {
                    buf.drain(..used);
                    break req;
                }
                Parse::Bad(msg) => {
                    let body = format!("{{\"error\":{{\"message\":\"{msg}\",\"type\":\"invalid_request_error\"}}}}");
                    let _ = w
                        .write_all(&response(
                            "400 Bad Request",
                            "application/json",
                            body.as_bytes(),
                            true,
                        ))
                        .await;
                    return;
                }
                Parse::Incomplete => match r.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                },
            }
        };
        let close = req.close;
        let path = req.path.split('?').next().unwrap_or("");
        if ctx.debug {
            eprintln!(
                "{} {} {}",
                req.method,
                req.path,
                String::from_utf8_lossy(&req.body)
            );
        }
        let answer = match (req.method.as_str(), path) {
            ("GET", "/health") => {
                response("200 OK", "application/json", b"{\"status\":\"ok\"}", close)
            }
            ("GET", "/v1/models") => {
                let body = format!(
                    "{{\"object\":\"list\",\"data\":[{{\"id\":\"{}\",\"object\":\"model\",\"created\":1700000000,\
                     \"owned_by\":\"streamload\"}}]}}",
                    ctx.model
                );
                response("200 OK", "application/json", body.as_bytes(), close)
            }
            ("GET", "/sendlog") => {
                let log = ctx
                    .sendlog
                    .lock()
                    .map(|mut l| std::mem::take(&mut *l))
                    .unwrap_or_default();
                response("200 OK", "text/plain", &sendlog_text(log), close)
            }
            ("POST", "/v1/chat/completions") if sse::wants_stream(&req.body) => {
                let tokens = sse::max_tokens(&req.body)
                    .unwrap_or(ctx.tokens)
                    .clamp(1, ctx.tokens);
                let mut head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
                     Transfer-Encoding: chunked\r\n{}\r\n",
                    if close { "Connection: close\r\n" } else { "" }
                )
                .into_bytes();
                head.extend_from_slice(ctx.frames.get(0, tokens));
                if w.write_all(&head).await.is_err() {
                    return;
                }
                let (done, back) = oneshot::channel();
                let active = Active {
                    w,
                    id: sse::stream_id(&req.body),
                    tokens,
                    next: 1,
                    written: 0,
                    sends: {
                        let mut v = Vec::with_capacity(tokens + 1);
                        v.push(ctx.now());
                        v
                    },
                    done,
                };
                if ctx.streams.send(active).is_err() {
                    return;
                }
                match back.await {
                    Ok(Some(half)) => w = half,
                    _ => return,
                }
                if close {
                    return;
                }
                continue;
            }
            ("POST", "/v1/chat/completions") => {
                response("200 OK", "application/json", &completion(&ctx.model), close)
            }
            _ => response(
                "404 Not Found",
                "application/json",
                b"{\"error\":{\"message\":\"not found\",\"type\":\"invalid_request_error\"}}",
                close,
            ),
        };
        if w.write_all(&answer).await.is_err() || close {
            return;
        }
    }
}
