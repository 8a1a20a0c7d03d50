"""`ntonix ...` with tracemalloc on and a SIGUSR1 hook that dumps what the process holds (bench only).

    TRACE_DIR=/tmp/x python bench/traced_run.py run --config ... --port ...

Each SIGUSR1 writes `TRACE_DIR/snap-N.pickle` (a tracemalloc snapshot, `TRACE_FRAMES` frames deep,
default 1) and `TRACE_DIR/info-N.json`: glibc's `mallinfo2()` (bytes in use in malloc's arenas, all
threads; Rust's and Granian's heap, and Python's objects over 512 bytes), the traced Python total, and
a count and `sys.getsizeof` sum per type of the objects the cyclic GC tracks. `bench/stream_memory.py
--trace` diffs two of them (idle and N streams open). RSS of a traced process is not the product's:
tracemalloc adds its own tables.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import json
import os
import pickle
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType


class _MallInfo2(ctypes.Structure):
    _names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    _fields_ = [(name, ctypes.c_size_t) for name in (*_names, "keepcost")]


def mallinfo() -> dict[str, int]:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {name: int(getattr(info, name)) for name, _ in _MallInfo2._fields_}


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


_count = 0


def dump(signum: int, frame: FrameType | None) -> None:
    global _count
    _count += 1
    out = Path(os.environ.get("TRACE_DIR", "."))
    snapshot = tracemalloc.take_snapshot()
    with (out / f"snap-{_count}.pickle").open("wb") as fh:
        pickle.dump(snapshot, fh)
    types: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        types[name] += 1
        sizes[name] += sys.getsizeof(obj)
    traced, _peak = tracemalloc.get_traced_memory()
    info = {
        "rss_kb": rss_kb(),
        "traced": traced,
        "mallinfo": mallinfo(),
        "types": dict(types),
        "sizes": dict(sizes),
    }
    (out / f"info-{_count}.json").write_text(json.dumps(info))
    (out / f"done-{_count}").write_text("ok")


def main() -> None:
    tracemalloc.start(int(os.environ.get("TRACE_FRAMES", "1")))
    signal.signal(signal.SIGUSR1, dump)
    from ntonix.cli import main as ntonix_main

    sys.argv = ["ntonix", *sys.argv[1:]]
    ntonix_main()


if __name__ == "__main__":
    main()
