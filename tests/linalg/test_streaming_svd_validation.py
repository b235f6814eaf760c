"""StreamingSVD refuses what it cannot decompose correctly, with one clear error each:
repeated or unseen sample ids, incomplete second passes, states that do not fit, rows
whose squared norms overflow the state, and malformed refine() arguments."""

from __future__ import annotations

import pytest
import torch

from safedl_ext.linalg import StreamingSVD

DUPLICATE = r"class 0: sample id 1 given more than once to \w+\(\); sample ids must be unique " \
            r"within a class"


def _rows(n: int = 10, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _zeros(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


def _fed(mode: str, n: int = 10, ids: torch.Tensor | None = None, **kw) -> StreamingSVD:
    s = StreamingSVD(1, 8, mode=mode, sketch_dim=8, **kw)
    s.update(_rows(n), _zeros(n), torch.arange(n) if ids is None else ids)
    return s


# ---------------------------------------------------------------- sample ids


def test_duplicate_sample_ids_raise_the_same_error_in_both_modes():
    ids = torch.tensor([0, 1, 1, 2])
    sketch = _fed("sketch", 4, ids)
    with pytest.raises(ValueError, match=DUPLICATE.replace(r"\w+", "update")):
        sketch.finalize()
    gram = _fed("gram", 4, ids)
    gram.finalize()
    gram.project(_rows(4), _zeros(4), ids)
    with pytest.raises(ValueError, match=DUPLICATE.replace(r"\w+", "project")):
        gram.results()


def test_gram_project_rejects_unseen_ids_and_missing_or_extra_rows():
    x = _rows()
    s = _fed("gram")
    s.finalize()
    s.project(x, _zeros(10), torch.arange(100, 110))
    with pytest.raises(ValueError, match=r"class 0: project\(\) saw sample ids that update\(\) "
                                         r"did not \(same count, 10\)"):
        s.results()

    s = _fed("gram")
    s.finalize()
    s.project(x[:6], _zeros(6), torch.arange(6))
    with pytest.raises(ValueError, match=r"class 0: project\(\) saw 6 rows, update\(\) counted "
                                         r"10; pass every row"):
        s.results()
    s.project(x[6:], _zeros(4), torch.arange(6, 10))  # the refusal kept what was projected
    res = s.results()[0]
    assert torch.equal(res.sample_ids, torch.arange(10)) and res.projections.shape == (10, 1)
    with pytest.raises(ValueError, match=r"class 0: project\(\) got 11 rows of it, more than "
                                         r"the 10 update\(\) counted"):
        s.project(x[:1], _zeros(1), torch.tensor([0]))


def test_refine_checks_its_passes_against_update():
    x = _rows()
    s = _fed("sketch")
    s.finalize()
    with pytest.raises(ValueError, match=r"class 0: refine\(\)'s first pass saw 5 rows, "
                                         r"update\(\) counted 10"):
        s.refine(lambda: iter([(x[:5], _zeros(5), torch.arange(5))]), [0])
    s.refine(lambda: iter([(x, _zeros(10), torch.arange(10))]), [0])
    assert s.results()[0].projections.shape == (10, 1)


def test_refine_argument_errors():
    x = _rows()
    s = _fed("sketch")
    s.finalize()
    with pytest.raises(TypeError, match=r"batches\(\) must yield sample_ids as an integer "
                                        r"tensor .* got None"):
        s.refine(lambda: iter([(x, _zeros(10), None)]), [0])
    with pytest.raises(TypeError, match="classes must be an iterable of class ids, got None"):
        s.refine(lambda: iter([]), None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="batches must be a callable"):
        s.refine(None, [0])  # type: ignore[arg-type]
    gram = _fed("gram")
    gram.finalize()
    with pytest.raises(ValueError, match=r"refine\(\) is for sketch mode"):
        gram.refine(lambda: iter([]), [0])


# ---------------------------------------------------------------- load_state_dict


def _state(mode: str) -> dict[str, torch.Tensor]:
    s = StreamingSVD(3, 8, mode=mode, sketch_dim=8)
    s.update(_rows(6), torch.tensor([0, 0, 1, 1, 1, 0]), torch.arange(6))
    return {k: v.clone() for k, v in s.state_dict().items()}


@pytest.mark.parametrize("mode, edit, match", [
    ("gram", lambda st: _state("sketch"), r"state is a sketch-mode state .* 'gram' mode"),
    ("sketch", lambda st: _state("gram"), r"state is a gram-mode state .* 'sketch' mode"),
    ("gram", lambda st: {k: v for k, v in st.items() if k != "id_hash"},
     r"missing \['id_hash'\], unexpected \[\]"),
    ("gram", lambda st: {**st, "counts": torch.zeros(4, dtype=torch.long)},
     r"state\['counts'\] must have shape \(3,\), got \(4,\)"),
    ("gram", lambda st: {**st, "counts": st["counts"].float()},
     r"state\['counts'\] must be torch.int64 .* got torch.float32"),
    ("gram", lambda st: {**st, "gram": st["gram"].double()},
     r"state\['gram'\] must be torch.float32 .* got torch.float64"),
    ("gram", lambda st: {**st, "counts": torch.tensor([3, 3, -1])}, r"must be >= 0"),
    ("gram", lambda st: {**st, "counts": torch.tensor([3, 3, 0]), "sums": st["sums"]
                         .index_fill(0, torch.tensor([2]), 1.0)},
     r"class 2 has rows in state\['gram'\]/state\['sums'\] but a count of 0"),
    ("gram", lambda st: {**st, "gram": st["gram"].index_fill(1, torch.tensor([0]),
                                                             float("inf"))},
     r"state\['gram'\] must be finite"),
    ("sketch", lambda st: {**st, "class_ids": torch.tensor([0, 0, 1, 1, 1, 3])},
     r"state\['class_ids'\] must be in \[0, 3\), got values in \[0, 3\]"),
    ("sketch", lambda st: {**st, "counts": torch.tensor([3, 2, 1])},
     r"state\['counts'\] must count state\['class_ids'\] per class \(\[3, 3, 0\]\), got "
     r"\[3, 2, 1\]"),
    ("sketch", lambda st: {**st, "sample_ids": st["sample_ids"][:5]},
     r"state\['sample_ids'\] must have shape \(6,\), got \(5,\)"),
    ("sketch", lambda st: {**st, "z": st["z"][:, :4]},
     r"state\['z'\] must have shape \(6, 8\), got \(6, 4\)"),
    ("sketch", lambda st: {**st, "z": st["z"].tolist()}, r"state\['z'\] must be a tensor"),
    ("sketch", lambda st: list(st), r"state must be a dict of tensors, got list"),
])
def test_load_state_dict_refuses_states_that_do_not_fit(mode, edit, match):
    target = StreamingSVD(3, 8, mode=mode, sketch_dim=8)
    good = _state(mode)
    target.load_state_dict(good)
    for add in (False, True):
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(edit(_state(mode)), add=add)
    # refused states leave it unchanged
    assert torch.equal(target.state_dict()["counts"], good["counts"])


# ---------------------------------------------------------------- overflow


@pytest.mark.parametrize("mode", ["gram", "sketch"])
def test_rows_whose_squared_norms_overflow_float32_are_refused(mode):
    """Finite rows of ~1e19 per entry: their Gram matrix overflows float32 (it used to end
    in torch.linalg's _LinAlgError); float64, or the same rows scaled, decompose fine."""
    x = _rows(20) * 1e19
    s = StreamingSVD(2, 8, mode=mode, sketch_dim=8)
    s.update(_rows(3), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"class 1: the rows' squared norms accumulated sum to "
                                         r".* torch.float32 state .*divide the rows by a common "
                                         r"scale .* or use dtype=torch.float64"):
        s.update(x, torch.ones(20, dtype=torch.long))
    assert s.counts.tolist() == [1, 2]  # refused before the state changed
    big = StreamingSVD(1, 8, mode=mode, sketch_dim=8, dtype=torch.float64)
    big.update(x, _zeros(20))
    scaled = StreamingSVD(1, 8, mode=mode, sketch_dim=8)
    scaled.update(x / 1e19, _zeros(20))
    a, b = big.finalize()[0], scaled.finalize()[0]
    torch.testing.assert_close(a.singular_values / 1e19, b.singular_values, rtol=1e-5, atol=0)
    # A sum of rows each safe on its own overflows as well: refused at the batch that tips it.
    s = StreamingSVD(1, 8, mode=mode, sketch_dim=8)
    row = torch.full((1, 8), 1e18)  # squared norm 8e36; the float32 limit ~2.1e37
    with pytest.raises(ValueError, match=r"class 0: the rows' squared norms accumulated"):
        for _ in range(100):
            s.update(row, _zeros(1))
    assert 0 < int(s.counts[0]) < 100
    if mode == "gram":
        s = StreamingSVD(1, 8)
        s.update(_rows(4), _zeros(4))
        s.finalize()
        with pytest.raises(ValueError, match=r"rows: a row of norm .* overflows the float32 "
                                             r"projections"):
            s.project(_rows(4).double() * 1e40, _zeros(4))


def test_refined_class_with_fewer_rows_than_rank_projects_on_its_own_vectors():
    """One row, rank 2: one vector, so one projection column (it came with two, the second
    all zeros; found by the hypothesis test of test_streaming_svd.py)."""
    x = _rows(1, 2)
    s = StreamingSVD(1, 2, mode="sketch", rank=2, sketch_dim=16)
    s.update(x, _zeros(1), torch.arange(1))
    s.finalize()
    s.refine(lambda: iter([(x, _zeros(1), torch.arange(1))]), [0])
    res = s.results()[0]
    assert res.vectors.shape == (1, 2) and res.projections.shape == (1, 1)
