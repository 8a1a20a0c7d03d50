"""`/v1/embeddings` cached per input: only the inputs nobody computed yet go upstream.

Each input of a request (a string or a token array; a single input or a
batch) is one entry of the L1 `ResponseCache`, under
`cache_key("embeddings-input", model, credential scope, digest)` where the
digest covers the input (its kind too: the text "1 2" and the tokens [1, 2] are
different inputs) and every other field of the request but `input` and those
`request_digest` leaves out (`user`, `metadata`, `store`, `model`): so
`encoding_format`, `dimensions` and anything else that could change the vector
are part of the key. The entry's body is the vector exactly as the backend
wrote it (the JSON array or base64 string, kept as `msgspec.Raw`, never
re-encoded), its meta `"<prompt tokens>\\n<model>"`.

A request: each distinct input is found in the cache, or joined to an
identical input some other request is computing now (single flight: a dict of
futures), or computed by this request; those go upstream in one request, in
the client's order, each once however often the batch repeats it. The answer
is rebuilt: `data[]` in the client's input order with `index` rewritten (the
backend's items are mapped by their own `index`, never by position), `model`,
and `usage` for the whole request: the sum, over every input of the client's
request (duplicates included), of that input's prompt tokens. An input's
tokens are what the backend reported when it computed it alone; an input
computed in a batch gets its share of that batch's `prompt_tokens`, split in
proportion to the inputs' lengths (entries of a token array, characters of a
string; largest remainder, so the shares add up to the backend's figure). A
fully computed request without duplicates therefore reports exactly the
backend's `prompt_tokens`. `X-Cache`: `HIT` when nothing went upstream, `MISS`
when every distinct input did, else `PARTIAL`. A backend error is passed
through as it is and nothing is stored; requests waiting on its inputs then
compute them themselves (one more upstream request at most).

A batch mixing strings and token arrays is not per-input cached (backends
reject or interpret it as a whole): it takes the whole-request path.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from typing import TYPE_CHECKING, Any, Final

import msgspec
import xxhash

from ntonix.cache.policy import cache_key, request_digest
from ntonix.cache.value import JSON, header_value
from ntonix.errors import GatewayError
from ntonix.pipeline.exchange import OWN_RESPONSE_HEADERS
from ntonix.pipeline.usage import usage_of_body

if TYPE_CHECKING:
    from ntonix.pipeline.exchange import Exchange
    from ntonix.pipeline.proxy import Proxy
    from ntonix.upstream.pool import BackendPool

ROUTE: Final = "embeddings-input"

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class _Item(msgspec.Struct):
    index: int
    embedding: msgspec.Raw


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0


class _Reply(msgspec.Struct):
    data: list[_Item]
    model: str | None = None
    usage: _Usage | None = None


_decode_reply = msgspec.json.Decoder(_Reply).decode


class _OutItem(msgspec.Struct):
    object: str
    index: int
    embedding: msgspec.Raw


class _OutUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class _Out(msgspec.Struct):
    object: str
    data: list[_OutItem]
    model: str | None
    usage: _OutUsage


class Entry:
    """One input's vector as the backend wrote it, its prompt tokens and the model that computed it."""

    __slots__ = ("model", "tokens", "vector")

    def __init__(self, vector: bytes, tokens: int, model: str | None) -> None:
        self.vector = vector
        self.tokens = tokens
        self.model = model

    @classmethod
    def stored(cls, hit: tuple[bytes, str]) -> Entry:
        body, meta = hit
        tokens, _, model = meta.partition("\n")
        return cls(body, int(tokens) if tokens.isdigit() else 0, model or None)

    def meta(self) -> str:
        return f"{self.tokens}\n{self.model or ''}"


# An input: its kind ("s" a string, "t" a token array) and its value.
Input = tuple[str, Any]


def split_inputs(value: Any) -> tuple[list[Input], bool] | None:
    """The request's inputs and whether it was a batch; None for a mixed batch (not cached per input)."""
    if isinstance(value, str):
        return [("s", value)], False
    if not isinstance(value, list) or not value:
        return None
    if all(type(v) is int for v in value):
        return [("t", value)], False
    if all(isinstance(v, str) for v in value):
        return [("s", v) for v in value], True
    if all(isinstance(v, list) for v in value):
        return [("t", v) for v in value], True
    return None


def input_digest(base: int, item: Input) -> int:
    """The digest of one input under the request's other fields (`base`)."""
    kind, value = item
    raw = value.encode("utf-8", "surrogatepass") if kind == "s" else _encode(value)
    return xxhash.xxh3_128_intdigest(base.to_bytes(16, "little") + kind.encode() + raw)


def share_tokens(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights` (largest remainder: the parts add up to `total`)."""
    if not weights:
        return []
    weights = [max(1, w) for w in weights]
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    parts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


class EmbeddingInputs:
    """The per-input embeddings cache of one gateway process, with its in-flight inputs."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.pending: dict[int, asyncio.Future[Entry | None]] = {}  # inputs being computed now

    async def answer(
        self, proto: Any, headers: Any, pool: BackendPool, scope: str, no_cache: bool, ex: Exchange
    ) -> bool:
        """Answer an embeddings request input by input; False when it must take the whole-request path."""
        request = ex.request if ex.request is not None else _decode(ex.body)
        parsed = split_inputs(request.get("input"))
        if parsed is None:
            return False
        inputs = parsed[0]
        base = request_digest({k: v for k, v in request.items() if k != "input"})
        keys = [cache_key(ROUTE, ex.model, scope, input_digest(base, item)) for item in inputs]
        item_of = dict(zip(keys, inputs, strict=True))
        cache = self.proxy.cache
        assert cache is not None
        entries: dict[int, Entry] = {}
        waits: dict[int, asyncio.Future[Entry | None]] = {}
        mine: dict[int, asyncio.Future[Entry | None]] = {}
        send: list[int] = []  # keys this request computes, in the client's order
        for key in item_of:  # distinct inputs, first occurrence first
            if not no_cache:
                hit = cache.get(key)
                if hit is not None:
                    entries[key] = Entry.stored(hit)
                    continue
                other = self.pending.get(key)
                if other is not None:
                    waits[key] = other
                    continue
            send.append(key)
        if send and self.proxy.shared is not None and not no_cache:  # the Redis tier, one MGET
            for key, hit in (await self.proxy.shared.get_many(send)).items():
                entries[key] = Entry.stored(hit)
            waits.update((k, self.pending[k]) for k in send if k not in entries and k in self.pending)
            send = [key for key in send if key not in entries and key not in waits]
        sent = 0
        model: str | None = None
        try:
            whole = len(send) == len(inputs)  # nothing cached, no duplicate: the client's body as it is
            while True:
                if send:
                    sent += len(send)
                    for key in send:
                        mine[key] = self._claim(key)
                    batch = [(key, item_of[key]) for key in send]
                    failure, fresh = await self._compute(
                        proto, headers, pool, ex, request, batch, whole, mine, entries
                    )
                    if failure is not None:
                        status, answer_headers, body = failure
                        ex.cache = "MISS"
                        _respond(proto, status, answer_headers, body, ex)
                        return True
                    model = model or fresh
                if not waits:
                    break
                send, whole = [], False
                for key, future in waits.items():
                    entry = await asyncio.shield(future)
                    if entry is not None:
                        entries[key] = entry
                    else:  # that request failed or its client left: compute the input ourselves
                        send.append(key)
                waits = {}
        finally:
            for key, future in mine.items():
                if not future.done():
                    future.set_result(None)  # failed or cancelled: whoever waits computes it
                if self.pending.get(key) is future:
                    del self.pending[key]
        self._count(ex, len(inputs), sent, len(item_of))
        data = [_OutItem("embedding", i, msgspec.Raw(entries[key].vector)) for i, key in enumerate(keys)]
        tokens = sum(entries[key].tokens for key in keys)
        if model is None:
            model = entries[keys[0]].model or ex.model
        body = _encode(_Out("list", data, model, _OutUsage(tokens, tokens)))
        _respond(proto, 200, [("content-type", JSON)], body, ex)
        return True

    def _claim(self, key: int) -> asyncio.Future[Entry | None]:
        """A future for an input this request computes; published unless another one is already pending."""
        future: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        self.pending.setdefault(key, future)
        return future

    def _count(self, ex: Exchange, inputs: int, sent: int, distinct: int) -> None:
        metrics = self.proxy.metrics
        metrics.embedding_inputs_missed += sent
        metrics.embedding_inputs_hit += inputs - sent
        if sent == 0:
            ex.cache = "HIT"
            self.proxy.stats(ex).cache_hits += 1
        else:
            ex.cache = "MISS" if sent >= distinct else "PARTIAL"

    async def _compute(
        self,
        proto: Any,
        headers: Any,
        pool: BackendPool,
        ex: Exchange,
        request: dict[str, Any],
        send: list[tuple[int, Input]],
        whole: bool,
        mine: dict[int, asyncio.Future[Entry | None]],
        entries: dict[int, Entry],
    ) -> tuple[tuple[int, list[tuple[str, str]], bytes] | None, str | None]:
        """One upstream request for `send`; stores and publishes each vector. (error answer, model)."""
        proxy = self.proxy
        if not whole:
            ex.body = _encode({**request, "input": [item[1] for _, item in send]})
        lease, response = await proxy._forward(proto, headers, pool, ex, buffer=True, cacheable=True)
        body = response.body or b""
        pool.release(ex, lease, proxy._note_usage(ex, usage_of_body(response.status, body)))
        if not 200 <= response.status < 300:  # passed through as it is; nothing stored
            return (
                response.status,
                [h for h in response.headers if h[0] not in OWN_RESPONSE_HEADERS],
                body,
            ), None
        if (header_value(response.headers, "content-encoding") or "identity").lower() == "gzip":
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError, zlib.error):  # zlib.error: a corrupt deflate stream, not OSError
                raise GatewayError(502, "bad_gateway", "backend sent a corrupt gzip body") from None
        try:
            reply = _decode_reply(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            raise GatewayError(502, "bad_gateway", f"backend's embeddings answer unreadable: {err}") from None
        if sorted(item.index for item in reply.data) != list(range(len(send))):
            raise GatewayError(
                502, "bad_gateway", f"backend answered {len(reply.data)} embeddings for {len(send)} inputs"
            )
        total = reply.usage.prompt_tokens if reply.usage is not None else 0
        shares = share_tokens(total, [len(item[1]) for _, item in send])
        model = reply.model or ex.model
        cache = proxy.cache
        assert cache is not None
        for item in reply.data:  # by the backend's own index, never by position
            key = send[item.index][0]
            entry = entries[key] = Entry(bytes(item.embedding), shares[item.index], model)
            cache.put(key, entry.vector, entry.meta())
            if proxy.shared is not None:
                proxy.shared.put(key, entry.vector, entry.meta(), False)
            future = mine[key]
            if not future.done():
                future.set_result(entry)
            if self.pending.get(key) is future:
                del self.pending[key]
        return None, model


def _respond(proto: Any, status: int, headers: list[tuple[str, str]], body: bytes, ex: Exchange) -> None:
    ex.status = status
    ex.bytes_sent = len(body)
    proto.response_bytes(status, [*headers, ("x-request-id", ex.request_id), ("x-cache", ex.cache)], body)
