"""`proxy._for_client`: a stored or shared answer's encoding against one client's Accept-Encoding."""

from __future__ import annotations

import gzip

from ntonix.pipeline.proxy import _for_client

PLAIN = b'{"id":"c1","choices":[]}'
HEADERS = [("content-type", "application/json"), ("content-encoding", "gzip")]


def test_gzip_accepted_goes_as_stored() -> None:
    body = gzip.compress(PLAIN)
    for accept in ("gzip", "gzip, deflate, br", "*", "br;q=1, gzip;q=0.5"):
        assert _for_client(accept, HEADERS, body, "gzip") == (HEADERS, body), accept


def test_gzip_not_accepted_is_decompressed_and_loses_its_content_encoding() -> None:
    body = gzip.compress(PLAIN)
    for accept in (None, "", "identity", "br", "gzip;q=0", "GZIP;q=0.0"):
        headers, out = _for_client(accept, HEADERS, body, "gzip")
        assert out == PLAIN, accept
        assert headers == [("content-type", "application/json")], accept
    assert HEADERS[1] == ("content-encoding", "gzip"), "the shared list is not changed"


def test_an_encoding_the_gateway_cannot_undo_goes_as_stored_with_its_header() -> None:
    br = [("content-type", "application/json"), ("content-encoding", "br")]
    assert _for_client("identity", br, b"\x8b\x00opaque", "br") == (br, b"\x8b\x00opaque")


def test_a_body_that_does_not_decompress_goes_as_stored() -> None:
    broken = gzip.compress(PLAIN)[:-6]
    assert _for_client("identity", HEADERS, broken, "gzip") == (HEADERS, broken)
    assert _for_client("identity", HEADERS, b"not gzip at all", "gzip") == (HEADERS, b"not gzip at all")
