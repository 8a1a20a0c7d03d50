"""Process-level limits a server needs before it accepts thousands of connections."""

from __future__ import annotations

import os
import resource

# Set by the supervisor in each worker process (server.workers > 1).
WORKER_ENV = "NTONIX_WORKER_ID"


def worker_id() -> int:
    """This process's worker number (1..N), or 0 when the gateway runs as a single process."""
    try:
        return int(os.environ.get(WORKER_ENV, "0"))
    except ValueError:
        return 0


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard limit; answers the limit now in force.

    Each open stream holds two sockets in the gateway (client and backend): 10,000 streams need
    far more than the usual soft limit of 1024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            return soft
        return wanted
    return soft
