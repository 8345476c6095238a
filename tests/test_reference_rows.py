"""The reference-on-demand plan as pure functions (no engine)."""

import numpy as np
import pytest

from vllm_align.engine.reference_rows import kv_cache_salt, row_tokens


@pytest.mark.parametrize("seed", range(5))
def test_row_tokens_match_a_python_loop(seed):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 9, size=int(rng.integers(1, 12)))
    qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    rows = np.sort(rng.choice(len(lens), size=int(rng.integers(1, len(lens) + 1)),
                              replace=False))
    tokens, sub = row_tokens(qsl, rows)
    expected = [t for r in rows for t in range(qsl[r], qsl[r + 1])]
    assert tokens.tolist() == expected
    assert sub.tolist() == [0, *np.cumsum([qsl[r + 1] - qsl[r] for r in rows]).tolist()]
    assert tokens.dtype == np.int64 and sub.dtype == np.int32


def test_row_tokens_of_no_rows():
    tokens, sub = row_tokens(np.array([0, 3, 5], dtype=np.int32), np.zeros(0, dtype=np.int64))
    assert tokens.tolist() == [] and sub.tolist() == [0]


def test_salts_of_the_two_kinds_never_collide():
    """Whatever salt a client sends, a request that skips the reference never gets the
    salt of one that reads it (their cached blocks hold different KV)."""
    clients = [None, "", "a", "vllm-align:reference:a", "vllm-align:aligned:a"]
    reads = {kv_cache_salt(s, True) for s in clients}
    skips = {kv_cache_salt(s, False) for s in clients}
    assert not reads & skips
    assert kv_cache_salt(None, False) is None  # shares blocks with plain requests
    assert len(reads) == len(clients) - 1  # None and "" are the same (no salt)
