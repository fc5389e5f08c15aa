"""The native data plane's source side and its shared helpers (native/dp_common.c, native/dp_source.c)."""
from __future__ import annotations

import random

import pytest

from migrate._native import ffi, lib


@pytest.mark.parametrize("size", [0, 1, 7, 8, 31, 32, 33, 100, 4096, 3 * 4096 + 17])
def test_streaming_digest_equals_digest_of_concatenation(size: int) -> None:
    rnd = random.Random(size)
    data = rnd.randbytes(size)
    whole = lib.mig_digest(data, size)
    for _ in range(10):
        state = ffi.new("struct dp_digest *")
        lib.dp_digest_init(state)
        i = 0
        while i < size:
            piece = data[i:i + rnd.randint(1, 70)]
            lib.dp_digest_update(state, piece, len(piece))
            i += len(piece)
        assert lib.dp_digest_final(state) == whole


def test_zstd_is_found_at_run_time() -> None:
    assert lib.dp_zstd_available() == 1
    assert lib.dp_zstd_why_not() == ffi.NULL
