"""The on-disk row store: chunks read back what was appended, from reused buffers."""

from __future__ import annotations

import pytest
import torch

from safedl_ext.poison._store import RowStore


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_chunks_return_the_appended_rows_from_two_reused_buffers(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(103, 40, generator=g)
    store = RowStore(tmp_path / "r.rows", 40, dtype)
    for part in rows.split(17):
        store.append(part)
    want = rows.to(store.torch_dtype).to(torch.float32)
    seen, ptrs = [], set()
    for start, chunk in store.chunks(25):
        assert chunk.dtype == torch.float32 and chunk.is_contiguous()
        torch.testing.assert_close(chunk, want[start:start + chunk.shape[0]], rtol=0, atol=0)
        seen.append((start, chunk.shape[0]))
        ptrs.add(chunk.data_ptr())
    assert seen == [(0, 25), (25, 25), (50, 25), (75, 25), (100, 3)]
    assert len(ptrs) == 1  # one float32 buffer refilled, not one per chunk
    torch.testing.assert_close(store.read(30, 60), want[30:60], rtol=0, atol=0)
    # a chunk larger than the store, and appending after reading
    assert [c.shape[0] for _, c in store.chunks(10_000)] == [103]
    store.append(rows[:2])
    assert store.rows == 105
    torch.testing.assert_close(store.read(103, 105), want[:2], rtol=0, atol=0)
    store.close(delete=True)
    assert not (tmp_path / "r.rows").exists()


def test_resume_keeps_the_checkpointed_rows_and_rejects_a_short_file(tmp_path):
    store = RowStore(tmp_path / "r.rows", 8, "float32")
    store.append(torch.arange(80, dtype=torch.float32).reshape(10, 8))
    store.close()
    again = RowStore(tmp_path / "r.rows", 8, "float32", rows=6)
    assert again.rows == 6
    torch.testing.assert_close(again.read(0, 6), torch.arange(48.0).reshape(6, 8))
    again.close()
    with pytest.raises(ValueError, match="damaged"):
        RowStore(tmp_path / "r.rows", 8, "float32", rows=7)
