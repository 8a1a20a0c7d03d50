//! `streamload load`: N concurrent streams through a proxy, timed per SSE event, plus probe streams.
//!
//! Every stream opens its own connection (at most `--connect-concurrency` connecting at once), sends
//! `sse::request_body` with its id, and stamps each complete SSE event with the time of the read that
//! completed it. Its decoded body must equal `sse::reference_body` byte for byte and end with
//! `data: [DONE]`. The steady window runs from the moment every stream has its first event to the
//! moment the first stream ends (`STEADY_START` / `STEADY_END` on stderr, for the harness's CPU
//! samples); only gaps that end inside it count. After the window opens, `--probes` short streams start
//! one by one, evenly spread over it, each on a new connection: their time to first event is TTFT
//! under load. At the end the mock's `GET /sendlog` gives the real send time of every frame. The JSON
//! summary goes to stdout.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::http::ResponseDecoder;
use crate::sse;
use crate::stats;

pub struct LoadOpts {
    pub host: String,
    pub port: u16,
    pub mock_port: Option<u16>,
    pub streams: usize,
    pub tokens: usize,
    pub rate: f64,
    pub probes: usize,
    pub probe_tokens: usize,
    pub connect_concurrency: usize,
    pub deadline_s: Option<f64>,
    pub model: String,
}

struct Progress {
    started: usize,
    steady_start: Option<u64>,
    steady_end: Option<u64>,
}

struct Shared {
    epoch: Instant,
    streams: usize,
    progress: Mutex<Progress>,
    steady: watch::Sender<Option<u64>>,
}

impl Shared {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// A main stream has its first event (or failed before it).
    fn started(&self) {
        let now = self.now();
        let Ok(mut p) = self.progress.lock() else {
            return;
        };
        p.started += 1;
        if p.started == self.streams && p.steady_start.is_none() {
            p.steady_start = Some(now);
            eprintln!("STEADY_START {now}");
            let _ = self.steady.send(Some(now));
        }
    }

    /// A main stream that had started has ended.
    fn ended(&self) {
        let now = self.now();
        let Ok(mut p) = self.progress.lock() else {
            return;
        };
        if p.steady_end.is_none() {
            p.steady_end = Some(now);
            eprintln!("STEADY_END {now}");
        }
    }
}

#[derive(Default)]
struct StreamOut {
    id: u64,
    error: Option<String>,
    arrivals: Vec<u64>,
    ttft_ns: Option<u64>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn build_request(host: &str, port: u16, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n\
         Accept: text/event-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

struct StreamSpec {
    id: u64,
    tokens: usize,
    main: bool,
}

async fn stream_body(
    spec: &StreamSpec,
    opts: &LoadOpts,
    reference: &[u8],
    shared: &Shared,
    out: &mut StreamOut,
    first: &mut bool,
    permit: &mut Option<OwnedSemaphorePermit>,
) -> Result<(), String> {
    let mut sock = TcpStream::connect((opts.host.as_str(), opts.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = sock.set_nodelay(true);
    let request = build_request(
        &opts.host,
        opts.port,
        &sse::request_body(&opts.model, spec.id, spec.tokens),
    );
    let t0 = shared.now();
    sock.write_all(&request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut resp = ResponseDecoder::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut decoded = Vec::with_capacity(16 * 1024);
    let mut pending: Vec<u8> = Vec::with_capacity(1024);
    let mut matched = 0usize;
    let mut identical = true;
    let mut done_seen = false;
    let mut events = 0usize;
    loop {
        let n = sock
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let now = shared.now();
        if n == 0 {
            resp.eof()?;
            break;
        }
        decoded.clear();
        resp.feed(&buf[..n], &mut decoded)?;
        if !decoded.is_empty() {
            let end = matched + decoded.len();
            if identical && (end > reference.len() || reference[matched..end] != decoded[..]) {
                identical = false;
            }
            matched = end;
            let mut from = pending.len().saturating_sub(1);
            pending.extend_from_slice(&decoded);
            let mut cut = 0;
            while let Some(at) = find(&pending[from..], b"\n\n") {
                let stop = from + at + 2;
                done_seen = &pending[cut..stop] == b"data: [DONE]\n\n";
                events += 1;
                if events <= spec.tokens + 1 {
                    out.arrivals.push(now);
                }
                cut = stop;
                from = stop;
            }
            pending.drain(..cut);
            if events > 0 && out.ttft_ns.is_none() {
                out.ttft_ns = Some(now - t0);
                // Connected and streaming: let the next stream connect.
                *permit = None;
                if spec.main && *first {
                    *first = false;
                    shared.started();
                }
            }
        }
        if resp.complete {
            break;
        }
    }
    if resp.status != 200 {
        return Err(format!("status {}", resp.status));
    }
    if !done_seen {
        return Err(format!("no [DONE] after {events} events"));
    }
    if !identical || matched != reference.len() {
        return Err(format!(
            "body differs from the reference ({matched} bytes, reference {})",
            reference.len()
        ));
    }
    Ok(())
}

async fn one_stream(
    spec: StreamSpec,
    opts: Arc<LoadOpts>,
    reference: Arc<Vec<u8>>,
    shared: Arc<Shared>,
    gate: Option<Arc<Semaphore>>,
    deadline: Instant,
) -> StreamOut {
    let mut out = StreamOut {
        id: spec.id,
        arrivals: Vec::with_capacity(spec.tokens + 1),
        ..StreamOut::default()
    };
    let mut permit = match &gate {
        Some(g) => g.clone().acquire_owned().await.ok(),
        None => None,
    };
    let mut first = true;
    let body = stream_body(
        &spec,
        &opts,
        &reference,
        &shared,
        &mut out,
        &mut first,
        &mut permit,
    );
    let result = tokio::time::timeout_at(deadline.into(), body).await;
    drop(permit);
    out.error = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some("deadline reached".to_string()),
    };
    if spec.main {
        if first {
            shared.started();
        } else {
            shared.ended();
        }
    }
    out
}

async fn http_get(host: &str, port: u16, path: &str) -> Result<Vec<u8>, String> {
    let mut sock = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n");
    sock.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut resp = ResponseDecoder::default();
    let mut body = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !resp.complete {
        let n = sock.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            resp.eof()?;
            break;
        }
        resp.feed(&buf[..n], &mut body)?;
    }
    if resp.status != 200 {
        return Err(format!("GET {path}: status {}", resp.status));
    }
    Ok(body)
}

/// `id t0 d1 d2 ...` lines into absolute send times per id.
pub fn parse_sendlog(text: &[u8]) -> HashMap<u64, Vec<u64>> {
    let mut out = HashMap::new();
    for line in text.split(|&b| b == b'\n') {
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        let mut nums = line
            .split_ascii_whitespace()
            .filter_map(|t| t.parse::<u64>().ok());
        let Some(id) = nums.next() else { continue };
        let mut sends = Vec::new();
        let mut at = 0u64;
        for (i, v) in nums.enumerate() {
            at = if i == 0 { v } else { at + v };
            sends.push(at);
        }
        out.insert(id, sends);
    }
    out
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub async fn run(opts: LoadOpts) -> Result<String, String> {
    let opts = Arc::new(opts);
    let epoch = Instant::now();
    let (steady_tx, mut steady_rx) = watch::channel(None);
    let shared = Arc::new(Shared {
        epoch,
        streams: opts.streams,
        progress: Mutex::new(Progress {
            started: 0,
            steady_start: None,
            steady_end: None,
        }),
        steady: steady_tx,
    });
    let duration_s = opts.tokens as f64 / opts.rate;
    let deadline =
        epoch + Duration::from_secs_f64(opts.deadline_s.unwrap_or(duration_s * 2.0 + 60.0));
    if let Some(mock) = opts.mock_port {
        // Forget send times of earlier runs.
        http_get(&opts.host, mock, "/sendlog")
            .await
            .map_err(|e| format!("mock /sendlog: {e}"))?;
    }
    let reference = Arc::new(sse::reference_body(&opts.model, opts.tokens));
    let probe_reference = Arc::new(sse::reference_body(&opts.model, opts.probe_tokens));
    let gate = Arc::new(Semaphore::new(opts.connect_concurrency.max(1)));
    let mut main = Vec::with_capacity(opts.streams);
    for i in 0..opts.streams {
        let spec = StreamSpec {
            id: i as u64,
            tokens: opts.tokens,
            main: true,
        };
        main.push(tokio::spawn(one_stream(
            spec,
            opts.clone(),
            reference.clone(),
            shared.clone(),
            Some(gate.clone()),
            deadline,
        )));
    }
    // Probes: spread over the expected steady window once it opens.
    let probe_task = {
        let (opts, shared) = (opts.clone(), shared.clone());
        tokio::spawn(async move {
            let mut outs = Vec::new();
            let start = loop {
                if let Some(at) = *steady_rx.borrow_and_update() {
                    break Some(at);
                }
                if tokio::time::timeout_at(deadline.into(), steady_rx.changed())
                    .await
                    .is_err()
                {
                    break None;
                }
            };
            let Some(start) = start else { return outs };
            let ramp_s = start as f64 / 1e9;
            let window_s = (duration_s - ramp_s).max(1.0) * 0.8;
            for j in 0..opts.probes {
                let offset = window_s * (j + 1) as f64 / (opts.probes + 1) as f64;
                let at = epoch + Duration::from_nanos(start) + Duration::from_secs_f64(offset);
                tokio::time::sleep_until(at.into()).await;
                let spec = StreamSpec {
                    id: (opts.streams + j) as u64,
                    tokens: opts.probe_tokens,
                    main: false,
                };
                outs.push(
                    one_stream(
                        spec,
                        opts.clone(),
                        probe_reference.clone(),
                        shared.clone(),
                        None,
                        deadline,
                    )
                    .await,
                );
            }
            outs
        })
    };
    let mut outs = Vec::with_capacity(opts.streams);
    for task in main {
        outs.push(task.await.map_err(|e| format!("stream task: {e}"))?);
    }
    let probes = probe_task.await.map_err(|e| format!("probe task: {e}"))?;
    let wall_s = epoch.elapsed().as_secs_f64();
    let client_cpu_s = cpu_seconds();

    let sendlog = match opts.mock_port {
        Some(mock) => Some(parse_sendlog(
            &http_get(&opts.host, mock, "/sendlog").await?,
        )),
        None => None,
    };
    let (steady_start, steady_end) = match shared.progress.lock() {
        Ok(p) => (p.steady_start, p.steady_end),
        Err(_) => (None, None),
    };
    let window = match (steady_start, steady_end) {
        (Some(lo), Some(hi)) if hi > lo => Some((lo, hi)),
        _ => None,
    };
    let interval_ns = (1e9 / opts.rate) as u64;
    let nominal: Vec<u64> = (0..=opts.tokens as u64).map(|j| j * interval_ns).collect();
    let mut delays = Vec::new();
    let mut late = Vec::new();
    let mut window_events = 0usize;
    let mut matched = 0usize;
    let mut errors: Vec<&str> = Vec::new();
    let mut ttft: Vec<i64> = Vec::new();
    // Streams that failed (a deadline, a wrong byte) still count for timing up to where they got.
    for out in &outs {
        if let Some(e) = &out.error {
            errors.push(e);
        }
        if let Some(t) = out.ttft_ns {
            ttft.push(t as i64);
        }
        let sends = match sendlog.as_ref().and_then(|log| log.get(&out.id)) {
            Some(s) if s.len() == opts.tokens + 1 => {
                matched += 1;
                stats::lateness(s, interval_ns, &mut late);
                s
            }
            _ => &nominal,
        };
        if let Some((lo, hi)) = window {
            window_events += stats::added_delays(&out.arrivals, sends, lo, hi, &mut delays);
        }
    }
    let mut probe_ttft: Vec<i64> = Vec::new();
    let mut probe_errors: Vec<&str> = Vec::new();
    for p in &probes {
        match (&p.error, p.ttft_ns) {
            (Some(e), _) => probe_errors.push(e),
            (None, Some(t)) => probe_ttft.push(t as i64),
            (None, None) => probe_errors.push("no first event"),
        }
    }
    let mut samples: Vec<&str> = Vec::new();
    for e in errors.iter().chain(probe_errors.iter()) {
        if samples.len() < 5 && !samples.contains(e) {
            samples.push(e);
        }
    }
    let send_times = if sendlog.is_none() {
        "nominal"
    } else if matched == outs.len() {
        "mock"
    } else {
        "mixed"
    };
    let window_s = window.map(|(lo, hi)| (hi - lo) as f64 / 1e9);
    Ok(format!(
        "{{\"streams\":{},\"tokens\":{},\"rate\":{},\"completed\":{},\"errors\":{},\"probes\":{},\
         \"probe_tokens\":{},\"probes_completed\":{},\"probe_errors\":{},\"error_samples\":[{}],\
         \"send_times\":\"{send_times}\",\"matched_streams\":{matched},\"steady_start_s\":{},\
         \"steady_end_s\":{},\"window_s\":{},\"window_events\":{window_events},\"delay_ms\":{},\
         \"mock_late_ms\":{},\"ttft_ms\":{},\"probe_ttft_ms\":{},\"client_cpu_s\":{client_cpu_s:.3},\
         \"wall_s\":{wall_s:.3}}}",
        opts.streams,
        opts.tokens,
        opts.rate,
        outs.len() - errors.len(),
        errors.len(),
        opts.probes,
        opts.probe_tokens,
        probe_ttft.len(),
        probe_errors.len(),
        samples.iter().map(|s| json_str(s)).collect::<Vec<_>>().join(","),
        steady_start.map(|v| format!("{:.3}", v as f64 / 1e9)).unwrap_or_else(|| "null".into()),
        steady_end.map(|v| format!("{:.3}", v as f64 / 1e9)).unwrap_or_else(|| "null".into()),
        window_s.map(|v| format!("{v:.3}")).unwrap_or_else(|| "null".into()),
        stats::summary_ms(&mut delays),
        stats::summary_ms(&mut late),
        stats::summary_ms(&mut ttft),
        stats::summary_ms(&mut probe_ttft),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sendlog_lines_become_absolute_times() {
        let log = parse_sendlog(b"7 100 50 51\n9 5\n\n");
        assert_eq!(log.get(&7), Some(&vec![100, 150, 201]));
        assert_eq!(log.get(&9), Some(&vec![5]));
        assert_eq!(log.len(), 2);
    }

    #[test]
    fn requests_carry_the_body_length() {
        let req = build_request("h", 1, b"abc");
        assert!(req.ends_with(b"Content-Length: 3\r\n\r\nabc"));
    }
}
