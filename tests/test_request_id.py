"""Generated request ids: UUID4s (llama-cpp-python accepts nothing else), never repeated, also after fork."""

from __future__ import annotations

import os
import uuid

from ntonix.pipeline import exchange
from ntonix.pipeline.exchange import client_request_id, new_request_id


def test_generated_ids_are_canonical_uuid4s_and_unique_across_pool_refills() -> None:
    ids = [new_request_id() for _ in range(3 * exchange._RANDOM_POOL // 16 + 7)]  # 3 refills and more
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(value)
        assert str(parsed) == value  # lower-case, hyphenated: exactly what str(uuid4()) gives
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_a_forked_child_does_not_repeat_its_parents_next_ids() -> None:
    new_request_id()  # the pool now holds bytes the child would otherwise reuse
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.write(write, ",".join(new_request_id() for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 4096).decode().split(",")
    os.close(read)
    os.waitpid(pid, 0)
    parent = [new_request_id() for _ in range(4)]
    assert len(child) == 4 and not set(child) & set(parent)


def test_a_valid_client_id_is_kept_and_an_invalid_one_replaced() -> None:
    assert client_request_id("client-chosen-id-42") == "client-chosen-id-42"
    replaced = client_request_id("bad id with spaces")
    assert uuid.UUID(replaced).version == 4
    assert uuid.UUID(client_request_id(None)).version == 4
