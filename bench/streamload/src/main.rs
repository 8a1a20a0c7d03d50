//! streamload: the paced SSE mock and the many-stream load client of the `stream_load` bench phase.
//!
//! ```text
//! streamload serve --port P [--host 127.0.0.1] [--tokens 600] [--rate 20] [--model bench-model]
//! streamload load --port P [--mock-port M] [--streams 1000] [--tokens 600] [--rate 20] [--probes 50]
//!                 [--probe-tokens 4] [--connect-concurrency 200] [--deadline S] [--model bench-model]
//! ```
//! Both run on a single-threaded tokio runtime (the harness pins each to one core).

mod http;
mod load;
mod serve;
mod sse;
mod stats;

use std::collections::HashMap;
use std::process::ExitCode;

struct Args(HashMap<String, String>);

impl Args {
    fn parse(items: &[String]) -> Result<Self, String> {
        let mut map = HashMap::new();
        let mut it = items.iter();
        while let Some(key) = it.next() {
            let Some(name) = key.strip_prefix("--") else {
                return Err(format!("unexpected argument {key:?}"));
            };
            let value = it.next().ok_or(format!("--{name} needs a value"))?;
            map.insert(name.to_string(), value.clone());
        }
        Ok(Args(map))
    }

    fn get<T: std::str::FromStr>(&self, name: &str, default: Option<T>) -> Result<T, String> {
        match self.0.get(name) {
            Some(v) => v.parse().map_err(|_| format!("--{name}: bad value {v:?}")),
            None => default.ok_or(format!("--{name} is required")),
        }
    }

    fn check(&self, known: &[&str]) -> Result<(), String> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(format!("unknown option --{k}")),
            None => Ok(()),
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match run(&argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("streamload: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(argv: &[String]) -> Result<(), String> {
    let Some((cmd, rest)) = argv.split_first() else {
        return Err("usage: streamload serve|load --port P [options] (see bench/README.md)".into());
    };
    let args = Args::parse(rest)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let host: String = args.get("host", Some("127.0.0.1".to_string()))?;
    let model: String = args.get("model", Some("bench-model".to_string()))?;
    let rate: f64 = args.get("rate", Some(20.0))?;
    if rate <= 0.0 || !rate.is_finite() {
        return Err("--rate must be a positive number of tokens per second".into());
    }
    match cmd.as_str() {
        "serve" => {
            args.check(&["host", "port", "tokens", "rate", "model"])?;
            let tokens: usize = args.get("tokens", Some(600))?;
            let opts = serve::ServeOpts {
                host,
                port: args.get("port", None)?,
                tokens: tokens.max(1),
                rate,
                model,
            };
            runtime.block_on(serve::run(opts))
        }
        "load" => {
            args.check(&[
                "host",
                "port",
                "mock-port",
                "streams",
                "tokens",
                "rate",
                "probes",
                "probe-tokens",
                "connect-concurrency",
                "deadline",
                "model",
            ])?;
            let opts = load::LoadOpts {
                host,
                port: args.get("port", None)?,
                mock_port: args
                    .0
                    .contains_key("mock-port")
                    .then(|| args.get("mock-port", None))
                    .transpose()?,
                streams: args.get("streams", Some(1000))?,
                tokens: args.get::<usize>("tokens", Some(600))?.max(1),
                rate,
                probes: args.get("probes", Some(50))?,
                probe_tokens: args.get::<usize>("probe-tokens", Some(4))?.max(1),
                connect_concurrency: args.get("connect-concurrency", Some(200))?,
                deadline_s: args
                    .0
                    .contains_key("deadline")
                    .then(|| args.get("deadline", None))
                    .transpose()?,
                model,
            };
            let summary = runtime.block_on(load::run(opts))?;
            println!("{summary}");
            Ok(())
        }
        other => Err(format!("unknown subcommand {other:?} (serve or load)")),
    }
}
