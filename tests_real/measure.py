"""Timings against the real servers: prefill and generation rates, TTFT direct vs through NTONIX.

    .venv/bin/python -m tests_real.measure [--runs 20] [--prompt-words 150]

Starts one llama-cpp-python server and a gateway in front of it (the same helpers the
tests use), sends alternating direct and gateway streamed completions with distinct
prompts (so llama.cpp's prefix reuse does not help either side) and prints a JSON
summary. Numbers from a shared 2-core machine are noisy: compare medians in one run.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests_real.realservers import Cluster, Proc, no_eos, sse_events

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hum",
    "old",
    "songs",
]


def ttft(url: str, prompt: str, max_tokens: int) -> tuple[float, float]:
    """Seconds to the first streamed token and to the end of the stream."""
    body = {"model": "tiny-a", "prompt": prompt, "max_tokens": max_tokens, "stream": True, **no_eos()}
    start = time.perf_counter()
    first = 0.0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as answer:
        answer.raise_for_status()
        for data in sse_events(answer.iter_lines()):
            if data != "[DONE]" and not first:
                first = time.perf_counter() - start
    return first, time.perf_counter() - start


def perf_lines(server: Proc) -> dict[str, list[float]]:
    """tokens/s from llama.cpp's own perf lines in the server log."""
    text = server.log()
    return {
        "prompt_tokens_per_s": [
            float(x) for x in re.findall(r"prompt eval time =.*?([\d.]+) tokens per second", text)
        ],
        "eval_tokens_per_s": [
            float(x) for x in re.findall(r"\beval time =.*runs.*?([\d.]+) tokens per second", text)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--prompt-words", type=int, default=150)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp))
        try:
            server = cluster.llama_server("tiny-a")
            gateway = cluster.gateway([server.url])
            ttft(server.url, "warm up", 4)
            ttft(gateway.url, "warm up again", 4)
            results: dict[str, list[tuple[float, float]]] = {"direct": [], "gateway": []}
            for i in range(args.runs * 2):
                side = "direct" if i % 2 == 0 else "gateway"
                words = [str(i)] + [rng.choice(WORDS) for _ in range(args.prompt_words)]
                url = server.url if side == "direct" else gateway.url
                results[side].append(ttft(url, " ".join(words), args.max_tokens))
            summary: dict[str, Any] = {"runs_each": args.runs, "prompt_words": args.prompt_words}
            for side, samples in results.items():
                firsts = sorted(s[0] for s in samples)
                summary[side] = {
                    "ttft_ms_p50": round(statistics.median(firsts) * 1000, 1),
                    "ttft_ms_min": round(firsts[0] * 1000, 1),
                    "total_ms_p50": round(statistics.median(s[1] for s in samples) * 1000, 1),
                }
            summary["gateway_minus_direct_ttft_ms_p50"] = round(
                summary["gateway"]["ttft_ms_p50"] - summary["direct"]["ttft_ms_p50"], 1
            )
            rates = perf_lines(server)
            summary["server_prompt_tokens_per_s_p50"] = round(
                statistics.median(rates["prompt_tokens_per_s"]), 1
            )
            summary["server_eval_tokens_per_s_p50"] = round(statistics.median(rates["eval_tokens_per_s"]), 1)
            summary["gateway_models_metrics"] = httpx.get(gateway.url + "/metrics").json().get("models")
            print(json.dumps(summary, indent=2))
        finally:
            cluster.close()


if __name__ == "__main__":
    main()
