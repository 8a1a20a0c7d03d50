"""Steady-state cost of `PrefixIndex.match_prefix` + `insert` from Python (docs/adr/006-prefix-index.md).

Fills an index with unrelated 16 KB prompts until it is full and evicting, then times conversation
turns (history already indexed + one 1 KB turn) of 1 KB, 10 KB and 100 KB prompts as CPU time of
the calling thread, so waiting for a core on a busy machine is not counted.

    python bench/prefix_steady.py [budget_mib=16] [block_chars=64]
"""

from __future__ import annotations

import random
import string
import sys
import time

from ntonix._core import PrefixIndex


def main() -> None:
    budget_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    block = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    rng = random.Random(1)

    def words(n: int) -> str:
        return "".join(rng.choices(string.ascii_lowercase + " ", k=n))

    index = PrefixIndex(budget_mib << 20, block)
    junk = words(16384)
    i = 0
    while index.stats()["evictions"] == 0:
        index.insert(f"{i:08}" + junk[8:], i % 4)
        i += 1
    systems = [words(2048) for _ in range(8)]
    for size in (1024, 10240, 102400):
        histories = []
        for c in range(64):
            head = systems[c % 8][: max(0, size - 1024)]
            histories.append(head + words(max(0, size - 1024 - len(head))))
        for c, history in enumerate(histories):
            index.insert(history, c % 4)
        turns = [words(1024) for _ in range(64)]
        n = 3000 if size < 50000 else 600
        prompts = [histories[k % 64] + turns[(k * 7) % 64] + f"{k:06}" for k in range(n)]
        took = []
        for k, prompt in enumerate(prompts):
            t0 = time.thread_time_ns()
            index.match_prefix(prompt)
            index.insert(prompt, k % 4)
            took.append(time.thread_time_ns() - t0)
        took.sort()
        print(
            f"{size:>7} B prompt: median {took[n // 2] / 1000:.1f} us, "
            f"p90 {took[n * 9 // 10] / 1000:.1f} us, min {took[0] / 1000:.1f} us"
        )
    stats = index.stats()
    print({k: stats[k] for k in ("blocks", "bytes_used", "bytes_reserved", "max_bytes", "evictions")})


if __name__ == "__main__":
    main()
