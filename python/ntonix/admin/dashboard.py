"""The live dashboard page (`GET /dashboard`), shipped in the wheel as package data.

`dashboard.html` is one self-contained file (HTML, CSS and a hand-drawn SVG
chart in plain JavaScript; no CDN, no external font). It polls the relative
URLs `metrics` and `cache/stats` every second and computes rates from counter
deltas in the browser, so an open dashboard adds no per-request work to the
gateway. The page is read once at import; `HEADERS` carries a Content-Security-
Policy that pins the inline script and style by hash and allows fetches to the
page's own origin only, so the browser itself refuses any request elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources
from typing import Any

PAGE: bytes = resources.files("ntonix.admin").joinpath("dashboard.html").read_bytes()


def _hashes(tag: str) -> str:
    blocks = re.findall(rb"<" + tag.encode() + rb">(.*?)</" + tag.encode() + rb">", PAGE, re.DOTALL)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'" for b in blocks)


CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_hashes('script')}; style-src {_hashes('style')}; "
    "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS: list[tuple[str, str]] = [
    ("content-type", "text/html; charset=utf-8"),
    ("cache-control", "no-cache"),
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
]


def serve(scope: Any, proto: Any) -> None:
    """RSGI handler for `GET /dashboard`: the page, as is."""
    proto.response_bytes(200, HEADERS, PAGE)
