"""Streamed, per-class decomposition of gradient matrices.

A backdoor scan reduces, for every class c, an (N_c, d) matrix of input gradients to its top
right singular vector(s), the singular values and each row's projection. The rows arrive
in batches that mix classes; :class:`StreamingSVD` routes them by class without a Python
loop per row or per class and never holds a class's matrix at full precision.

Two modes, for two regimes:

``mode="gram"`` (exact; moderate d, e.g. CIFAR's 3,072)
    keeps, per class, the d x d Gram matrix ``X^T X`` (a streamed symmetric rank-k update,
    native op ``safedl::gram_update_``), the row sum and the count: ``C * d^2`` floats. The
    top eigenvectors of the (optionally centred) Gram matrix are the exact top right
    singular vectors, whatever the spectrum: right in the *hard regime* (a few percent of
    rows sharing one direction on top of a flat noise spectrum with tens of times the
    signal's energy), where a single-pass randomized sketch is not. The projections need
    the rows once more: :meth:`StreamingSVD.project` (a second pass; a vector learned from
    the rows cannot project them in the same pass without keeping them).

``mode="sketch"`` (bounded memory; large d, e.g. ImageNet's 150,528)
    keeps, per row, a compact k-dimensional structured random projection of it (sign flips,
    fast Walsh-Hadamard transform, subsampling; native op ``safedl::srht_project``, drawn
    from a counter-based generator so nothing of size d x k is stored): ``N * k`` floats.
    :meth:`finalize` runs block power (subspace) iterations on the compact rows in memory,
    so the top vector is found with as many passes as needed over the compact rows, not
    over the data. The projections it gives are approximate (the projection of the noise
    grows from ~1/d to ~1/k per row); :meth:`refine` re-streams only the chosen classes'
    rows twice to get their exact input-space vectors and projections.

Determinism: the result depends on the *set* of (row, class, sample id), not on batch
size, batch order or how rows are split across processes, up to floating-point rounding of
the sums (float32 state: relative differences ~1e-6; ``dtype=torch.float64``: ~1e-12).
Bitwise identity is not promised: floating-point sums depend on their order. Give
``sample_ids`` when the order may change; the default numbers rows in arrival order.
Partial states merge by addition (Gram) or concatenation (sketch): :meth:`merge_`,
:meth:`state_dict`; :meth:`load_state_dict` checks a state's structure before it takes it.

Checks: sample ids must be unique within a class, in both modes (one error); the second
passes (:meth:`project`, :meth:`refine`) must see exactly the rows :meth:`update` counted,
by count and by sample id (gram mode keeps no ids, only a per-class fingerprint of them
that merges by addition); rows whose squared norms would overflow the state are refused
when they arrive, with the advice to scale them or use float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..ops import sketch as sketch_ops

__all__ = ["ClassSVD", "StreamingSVD", "streamed_svd"]

Mode = Literal["gram", "sketch"]
Batch = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]

_GRAM_MAX_BYTES = 16 * 2**30
_BUFFER_BYTES = 128 * 2**20
_KRYLOV_WIDTH = 160
_DENSE_EIGH = 256
_ENERGY_MARGIN = 16.0
_FP_PRIME = 2**31 - 1
_F64 = torch.float64


@dataclass(frozen=True)
class ClassSVD:
    """The decomposition of one class's (N, d) row matrix X (centred when asked).

    Attributes:
        label: the class id.
        count: N, rows seen.
        singular_values: (r,) float64, descending (r = rank; in sketch mode at most the
            class's row count). Values below ~sqrt(eps) * the top one are rounding noise
            of the state's dtype (eps of float32: 6e-8). Sketch mode before :meth:`refine`: those
            of the compact rows (estimates); after: ``||X_c v_j||``.
        vectors: (r, d) float32 unit right singular vectors in input space, or ``None``
            (sketch mode before :meth:`refine`). Sign: the largest-magnitude entry is
            positive (sketch vectors likewise).
        sketch_vectors: (r, k) unit right singular vectors of the compact rows (sketch mode).
        sample_ids: (N,) int64 ascending, or ``None`` before projections exist.
        projections: (N, r) float32, row ``i`` is ``(x_i - mean) . v_j`` for the sample
            ``sample_ids[i]``; ``None`` before they exist.
        exact_projections: whether projections were computed from the rows themselves
            (``False``: from the compact rows of sketch mode).
        converged: whether the eigensolver met its tolerance.
        iterations: eigensolver iterations used.
    """

    label: int
    count: int
    singular_values: Tensor
    vectors: Tensor | None
    sketch_vectors: Tensor | None
    sample_ids: Tensor | None
    projections: Tensor | None
    exact_projections: bool
    converged: bool
    iterations: int


def _top_eigenpairs(
    apply: Callable[[Tensor], Tensor], m: int, r: int, q: int, max_iter: int, tol: float,
    generator: torch.Generator, device: torch.device, dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, bool, int]:
    """Top-r eigenpairs of a symmetric PSD (m, m) operator, in ``dtype`` (``apply`` takes
    and returns (m, q) blocks of it; float32 halves the cost of the basis's upkeep, for
    operators that are float32-accurate and a ``tol`` well above float32 rounding).

    Block Krylov (block Lanczos with full reorthogonalisation and Rayleigh-Ritz on the
    whole Krylov space; thick restart from the top q Ritz vectors when the space reaches
    ``_KRYLOV_WIDTH`` columns). Each iteration applies the operator to one block of q
    vectors; Krylov methods converge on a small eigengap far faster than subspace
    iteration. Stops when every residual ``||A x - l x||`` of the top r Ritz pairs is
    <= tol * l_1, or after max_iter iterations.

    Returns (eigenvalues (r,), eigenvectors (m, r), converged, iterations).
    """
    if m <= _DENSE_EIGH:  # small: the operator itself, one symmetric eigensolve
        dense = apply(torch.eye(m, dtype=dtype, device=device))
        evals, evecs = torch.linalg.eigh((dense + dense.T) * 0.5)
        return evals.flip(0)[:r].clamp_min(0.0), evecs.flip(1)[:, :r], True, 1
    # The block width rounded up to a multiple of 8: BLAS multiplies a 3,072^2 float32
    # matrix by 16 columns in 3.5 ms and by 11 in 12 ms (2 EPYC cores, measured); wider
    # blocks also converge in fewer iterations.
    q = min(-(-max(q, r) // 8) * 8, m)
    block = torch.randn((m, q), generator=generator, dtype=torch.float64).to(device, dtype)
    basis = _extend_basis(block.new_zeros((m, 0)), block)
    image = apply(basis)  # A basis
    small = basis.T @ image  # the projected operator basis^T A basis, grown with the basis
    values = torch.zeros(r, dtype=dtype, device=device)
    vecs = basis[:, :r]
    for it in range(1, max_iter + 1):
        evals, evecs = torch.linalg.eigh((small + small.T) * 0.5)
        order = torch.argsort(evals, descending=True)
        evals, evecs = evals[order], evecs[:, order]
        vecs = basis @ evecs[:, :r]
        values = evals[:r].clamp_min(0.0)
        scale = float(values[0])
        if scale <= 0.0:  # zero operator: any basis is an eigenbasis
            return values, vecs, True, it
        residual = image @ evecs[:, :r] - vecs * evals[:r]
        if float(torch.linalg.vector_norm(residual, dim=0).max()) <= tol * scale:
            return values, vecs, True, it
        if basis.shape[1] + q > min(_KRYLOV_WIDTH, m):  # thick restart
            keep = evecs[:, :q]
            basis, image = basis @ keep, image @ keep
            small = basis.T @ image
            block = image
        else:
            block = image[:, -q:] if basis.shape[1] > q else image
        grown = _extend_basis(basis, block)
        if grown.shape[1] == basis.shape[1]:  # invariant subspace: the Ritz pairs are exact
            return values, vecs, True, it
        new = grown[:, basis.shape[1]:]
        basis = grown
        fresh = apply(new)
        # only the new rows and columns of basis^T A basis: new^T [A basis_old, A new]
        # (A symmetric), not the whole product again
        cross = new.T @ image
        small = torch.cat((torch.cat((small, cross.T), dim=1),
                           torch.cat((cross, new.T @ fresh), dim=1)), dim=0)
        image = torch.cat((image, fresh), dim=1)
    return values, vecs, False, max_iter


def _extend_basis(basis: Tensor, block: Tensor) -> Tensor:
    """Append the part of ``block``'s columns orthogonal to ``basis`` (orthonormal) to it.

    Block Gram-Schmidt twice with a QR each time (BCGS2: a few BLAS-3 calls); when the
    block is (numerically) rank-deficient, column by column instead, dropping the columns
    that add nothing (relative norm < :func:`_drop_below`), so the basis stays
    orthonormal."""
    if block.shape[1] > 1 and block.shape[0] >= basis.shape[1] + block.shape[1]:
        size = torch.linalg.vector_norm(block, dim=0)
        w = block - basis @ (basis.T @ block)
        q1, r1 = torch.linalg.qr(w)
        w = q1 - basis @ (basis.T @ q1)
        q2, r2 = torch.linalg.qr(w)
        diag = torch.diagonal(r2 @ r1).abs()
        if bool((size > 0).all()) and bool((diag > _drop_below(block.dtype) * size).all()):
            return torch.cat((basis, q2), dim=1)
    return _extend_basis_columns(basis, block)


def _extend_basis_columns(basis: Tensor, block: Tensor) -> Tensor:
    """:func:`_extend_basis` column by column (two Gram-Schmidt passes per column)."""
    cols = [basis]
    current = basis
    for j in range(block.shape[1]):
        w = block[:, j:j + 1]
        size = float(torch.linalg.vector_norm(w))
        for _ in range(2):
            w = w - current @ (current.T @ w)
        norm = float(torch.linalg.vector_norm(w))
        if size > 0 and norm > _drop_below(block.dtype) * size:
            current = torch.cat((current, w / norm), dim=1)
            cols = [current]
    return cols[0]


def _drop_below(dtype: torch.dtype) -> float:
    """A projected column's relative norm under which it is rounding noise: 1e-10 in
    float64, 1e-5 in float32 (~100 eps)."""
    return max(1e-10, 100.0 * torch.finfo(dtype).eps)


def _orient(vectors: Tensor) -> Tensor:
    """Flip each row of (r, d) so that its largest-magnitude entry is positive."""
    idx = vectors.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(vectors.gather(1, idx))
    sign[sign == 0] = 1
    return vectors * sign


def _check_batch(rows: Tensor, class_ids: Tensor, sample_ids: Tensor | None, d: int,
                 num_classes: int) -> Tensor:
    """Check one batch; return its rows' Euclidean norms, (B,) float64 (for the overflow
    check of :func:`_check_energy`)."""
    if not isinstance(rows, Tensor):
        raise TypeError(f"rows must be a tensor, got {type(rows).__name__}")
    if rows.dim() != 2 or rows.shape[1] != d:
        raise ValueError(f"rows must have shape (B, {d}), got {tuple(rows.shape)}")
    if not rows.is_floating_point():
        raise TypeError(f"rows must be a floating-point tensor, got {rows.dtype}")
    _check_ids("class_ids", class_ids, rows.shape[0])
    norms = rows.new_zeros(rows.shape[0], dtype=_F64)
    if rows.shape[0]:
        lo, hi = int(class_ids.min()), int(class_ids.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"class_ids must be in [0, {num_classes}), got values in "
                             f"[{lo}, {hi}]")
        # A row's norm is non-finite when it holds NaN/Inf or when its squared norm
        # overflows: check those rows exactly, and redo their norms in float64.
        # torch.isfinite(rows) on the whole batch would cost ~1.7x the batch in
        # temporaries (260 MB at 256 x 150,528).
        norms = torch.linalg.vector_norm(rows.detach(), dim=1).to(_F64)
        bad = ~torch.isfinite(norms)
        if bool(bad.any()):
            sub = rows.detach()[bad]
            if not bool(torch.isfinite(sub).all()):
                raise ValueError("rows must be finite, got NaN or Inf")
            norms[bad] = torch.linalg.vector_norm(sub.to(_F64), dim=1)
    if sample_ids is not None:
        _check_ids("sample_ids", sample_ids, rows.shape[0])
    return norms


def _check_ids(name: str, ids: object, n: int) -> None:
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex \
            or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)}")
    if tuple(ids.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(ids.shape)}")


def _energy_limit(dtype: torch.dtype) -> float:
    """Largest per-class sum of squared row norms a state of ``dtype`` accumulates safely:
    every Gram entry, every eigensolver product and every partial sum on the way is
    bounded by it (the margin covers centring)."""
    return torch.finfo(dtype).max / _ENERGY_MARGIN


def _check_energy(energy: Tensor, dtype: torch.dtype, what: str) -> None:
    """Refuse (before the state changes) a class whose squared norms would overflow."""
    limit = _energy_limit(dtype)
    over = torch.nonzero(~(energy <= limit)).flatten()
    if over.numel():
        c = int(over[0])
        hint = ("divide the rows by a common scale (for example their largest norm: the "
                "singular vectors do not change, singular values and projections scale "
                "with it)")
        if dtype != _F64:
            hint += " or use dtype=torch.float64"
        raise ValueError(f"class {c}: the rows' squared norms {what} sum to "
                         f"{float(energy[c]):.3g}, beyond what a {dtype} state holds without "
                         f"overflow ({limit:.3g}); {hint}")


def _id_fingerprint(ids: Tensor) -> Tensor:
    """A per-id hash in [0, 2^31 - 1) (int64; exact integer arithmetic, no overflow).

    Summed per class, it is a fingerprint of the *set* of sample ids that merges by
    addition like the Gram state: two different sets of ids agree with probability about
    5e-10. Gram mode keeps no ids, so this is how :meth:`StreamingSVD.project` is checked
    against :meth:`StreamingSVD.update`.
    """
    p = _FP_PRIME
    ids = ids.to(torch.int64)
    a = torch.remainder(ids, p)
    b = torch.remainder(torch.div(ids, p, rounding_mode="floor"), p)
    h = torch.remainder(a * 1_000_003 + b * 69_069 + 12_345, p)
    h = torch.remainder(h * h, p)
    h = torch.remainder(h * 48_271 + a, p)
    return torch.remainder(h * h, p)


def _check_unique_ids(c: int, sorted_ids: Tensor, where: str) -> None:
    """One message for a sample id repeated within a class, in every mode."""
    if sorted_ids.numel() > 1:
        dup = torch.nonzero(sorted_ids[1:] == sorted_ids[:-1]).flatten()
        if dup.numel():
            raise ValueError(f"class {c}: sample id {int(sorted_ids[int(dup[0])])} given more "
                             f"than once to {where}; sample ids must be unique within a class")


def _check_same_rows(c: int, where: str, n: int, fingerprint: int, f: dict) -> None:
    """A second pass over class ``c`` saw the rows the first pass counted (by count and by
    sample-id fingerprint)."""
    if n != f["count"]:
        raise ValueError(f"class {c}: {where} saw {n} rows, update() counted {f['count']}; "
                         "pass every row of the first pass once, with the sample ids given "
                         "to update()")
    if fingerprint != f["id_hash"]:
        raise ValueError(f"class {c}: {where} saw sample ids that update() did not (same "
                         f"count, {n}); pass the sample ids given to update()")


class StreamingSVD:
    """Per-class top right singular vectors, singular values and row projections of row
    batches routed by class. See the module docstring for the two modes and their regimes.

    Example::

        svd = StreamingSVD(num_classes=10, dim=3072, mode="gram", center=True)
        for rows, labels, idx in loader:            # rows: (B, 3072) gradients
            svd.update(rows, labels, idx)
        svd.finalize()
        for rows, labels, idx in loader:            # second pass: exact projections
            svd.project(rows, labels, idx)
        top = svd.results()[3]                      # ClassSVD of class 3

    Args:
        num_classes: C, class ids are in [0, C).
        dim: d, the row length.
        mode: ``"gram"`` (exact) or ``"sketch"`` (bounded memory).
        rank: r, how many top singular vectors per class.
        center: subtract each class's mean row first (exactly, in both modes).
        sketch_dim: k of sketch mode (memory: N * k floats). 2,048 keeps the projections'
            |cosine| >= 0.98 at N = 1,300, d = 150,528 in the hard regime (measured; see
            bench/README.md). Ignored in gram mode.
        seed: selects the structured projection and the eigensolver's start.
        dtype: state dtype, float32 (default) or float64.
        device: where the state lives; rows are moved there.
        buffer_rows: gram mode: rows buffered per class before a rank-k update (larger k
            runs the update at GEMM speed when batches mix many classes, and fewer
            passes over the Gram matrices). ``None``: up to 2,048, within 128 MiB for all
            classes; 0: no buffering.
        oversample: extra vectors in the subspace iteration (block size r + oversample).
        max_iter, tol: eigensolver stop (residual <= tol * top eigenvalue).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        mode: Mode = "gram",
        rank: int = 1,
        center: bool = False,
        sketch_dim: int = 2048,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        buffer_rows: int | None = None,
        oversample: int = 10,
        max_iter: int = 300,
        tol: float = 1e-6,
    ) -> None:
        for name, v, lo in (("num_classes", num_classes, 1), ("dim", dim, 1), ("rank", rank, 1),
                            ("sketch_dim", sketch_dim, 1), ("oversample", oversample, 0),
                            ("max_iter", max_iter, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if mode not in ("gram", "sketch"):
            raise ValueError(f"mode must be 'gram' or 'sketch', got {mode!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if not (isinstance(tol, float) and tol > 0):
            raise ValueError(f"tol must be a float > 0, got {tol!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.num_classes, self.dim, self.mode, self.rank = num_classes, dim, mode, rank
        self.center, self.seed, self.dtype = center, seed, dtype
        self.device = torch.device(device)
        self.oversample, self.max_iter, self.tol = oversample, max_iter, tol
        n_transform = 1 << sketch_ops.reference.transform_bits(dim)
        self.sketch_dim = min(sketch_dim, n_transform)
        if rank > (dim if mode == "gram" else self.sketch_dim):
            raise ValueError(f"rank must be <= {dim if mode == 'gram' else self.sketch_dim}, "
                             f"got {rank}")
        self._next_id = 0
        self._proj_next_id = 0
        self._stack_cache: tuple[Tensor, Tensor, Tensor] | None = None
        self._final: dict[int, dict] | None = None
        self._proj: list[tuple[Tensor, Tensor, Tensor]] = []
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=self.device)
        # Per class: sum of squared norms of what the state accumulates (float64), for the
        # overflow check; rows projected so far in the current second pass.
        self._energy = torch.zeros(num_classes, dtype=_F64, device=self.device)
        self._proj_seen = torch.zeros(num_classes, dtype=torch.int64, device=self.device)
        if mode == "gram":
            need = num_classes * dim * dim * torch.finfo(dtype).bits // 8
            if need > _GRAM_MAX_BYTES:
                raise ValueError(
                    f"gram mode needs {need / 2**30:.1f} GiB for {num_classes} classes x "
                    f"{dim}^2; use mode='sketch' for large dim")
            if buffer_rows is None:
                per_row = num_classes * dim * torch.finfo(dtype).bits // 8
                buffer_rows = int(min(2048, _BUFFER_BYTES // per_row))
            if isinstance(buffer_rows, bool) or not isinstance(buffer_rows, int) or \
                    buffer_rows < 0:
                raise ValueError(f"buffer_rows must be an int >= 0, got {buffer_rows!r}")
            kw = {"dtype": dtype, "device": self.device}
            self.gram = torch.zeros((num_classes, dim, dim), **kw)
            self.sums = torch.zeros((num_classes, dim), **kw)
            self._buffer = torch.zeros((num_classes, buffer_rows, dim), **kw)
            self._fill = torch.zeros(num_classes, dtype=torch.int64)
            self.id_hash = torch.zeros(num_classes, dtype=torch.int64, device=self.device)
        else:
            self._z: list[Tensor] = []
            self._z_cls: list[Tensor] = []
            self._z_ids: list[Tensor] = []

    # ---- streaming ----------------------------------------------------------------

    def update(self, rows: Tensor, class_ids: Tensor, sample_ids: Tensor | None = None) -> None:
        """Add a batch of rows.

        Args:
            rows: (B, d) float tensor (moved to the state's device and dtype).
            class_ids: (B,) integer class of each row, in [0, C).
            sample_ids: (B,) int64 identifiers (unique per class), kept with the
                projections; default: a running counter in arrival order.

        Raises:
            ValueError: bad shapes or class ids, non-finite rows, or rows whose squared
                norms would overflow the state's dtype (summed per class; the batch is
                refused before the state changes: scale the rows, or use float64).
        """
        if self._final is not None:
            raise RuntimeError("update() after finalize(): the decomposition is fixed; "
                               "use project() or a new StreamingSVD")
        norms = _check_batch(rows, class_ids, sample_ids, self.dim, self.num_classes)
        b = rows.shape[0]
        if b == 0:
            return
        if sample_ids is None:
            sample_ids = torch.arange(self._next_id, self._next_id + b)
        ids = sample_ids.detach().to(device=self.device, dtype=torch.int64)
        rows = rows.detach().to(device=self.device, dtype=self.dtype)
        cls = class_ids.detach().to(device=self.device, dtype=torch.int64)
        z = None
        if self.mode == "sketch":
            z = sketch_ops.srht_project(rows, self.sketch_dim, self.seed)
            norms = torch.linalg.vector_norm(z, dim=1).to(_F64)  # what the state keeps
        energy = self._energy.index_add(0, cls, norms.to(self.device).square())
        _check_energy(energy, self.dtype, "accumulated")  # before the state changes
        self._energy = energy
        self._next_id += b
        if self.mode == "gram":
            self.id_hash.index_add_(0, cls, _id_fingerprint(ids))
            sketch_ops.gram_update_(self.gram, self.sums, self.counts, self._buffer, self._fill,
                                    rows.contiguous(), cls, False)
        else:
            self.counts.index_add_(0, cls, torch.ones_like(cls))
            self._z.append(z)
            self._z_cls.append(cls)
            self._z_ids.append(ids)

    # ---- partial states -------------------------------------------------------------

    def _flush(self) -> None:
        if self.mode == "gram" and int(self._fill.sum()):
            empty = self.gram.new_zeros((0, self.dim))
            sketch_ops.gram_update_(self.gram, self.sums, self.counts, self._buffer, self._fill,
                                    empty, empty.new_zeros(0, dtype=torch.int64), True)

    def state_dict(self) -> dict[str, Tensor]:
        """The streamed state as tensors (flushed): gram mode ``gram``/``sums``/``counts``
        and ``id_hash`` (a per-class fingerprint of the sample ids; all merge by sum, e.g.
        ``all_reduce``), sketch mode ``z``/``class_ids``/``sample_ids`` plus ``counts``
        (merge by concatenation, e.g. ``all_gather``; ``counts`` by sum). For checkpoints of
        a long stream and for torch.distributed."""
        self._flush()
        if self.mode == "gram":
            return {"gram": self.gram, "sums": self.sums, "counts": self.counts,
                    "id_hash": self.id_hash}
        z = torch.cat(self._z) if self._z else torch.zeros((0, self.sketch_dim),
                                                           dtype=self.dtype, device=self.device)
        cls = torch.cat(self._z_cls) if self._z_cls else self.counts.new_zeros(0)
        ids = torch.cat(self._z_ids) if self._z_ids else self.counts.new_zeros(0)
        self._z, self._z_cls, self._z_ids = [z], [cls], [ids]
        return {"z": z, "class_ids": cls, "sample_ids": ids, "counts": self.counts}

    def _state_energy(self, state: dict[str, Tensor]) -> Tensor:
        """Check a state's structure against this object's settings (keys, then each
        tensor's type, dtype and shape, then their consistency) and return its per-class
        sum of squared norms. One ValueError names the first mismatch."""
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict of tensors, got {type(state).__name__}")
        keys = {"gram": ("gram", "sums", "counts", "id_hash"),
                "sketch": ("z", "class_ids", "sample_ids", "counts")}
        mine, other = keys[self.mode], keys["sketch" if self.mode == "gram" else "gram"]
        if set(state) != set(mine):
            if set(state) == set(other):
                raise ValueError(f"state is a {'sketch' if self.mode == 'gram' else 'gram'}-"
                                 f"mode state (keys {sorted(state)}); this StreamingSVD is "
                                 f"in {self.mode!r} mode")
            missing = sorted(set(mine) - set(state))
            extra = sorted(set(state) - set(mine), key=str)
            raise ValueError(f"state must have the keys {list(mine)} of mode {self.mode!r}; "
                             f"missing {missing}, unexpected {extra}")
        c, d, k = self.num_classes, self.dim, self.sketch_dim
        n = state["z"].shape[0] if self.mode == "sketch" and isinstance(state["z"], Tensor) \
            else 0
        want = {"gram": ((c, d, d), self.dtype), "sums": ((c, d), self.dtype),
                "counts": ((c,), torch.int64), "id_hash": ((c,), torch.int64),
                "z": ((n, k), self.dtype), "class_ids": ((n,), torch.int64),
                "sample_ids": ((n,), torch.int64)}
        for name in mine:
            t = state[name]
            shape, dtype = want[name]
            if not isinstance(t, Tensor):
                raise ValueError(f"state[{name!r}] must be a tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                raise ValueError(f"state[{name!r}] must be {dtype} (this StreamingSVD's), "
                                 f"got {t.dtype}")
            if tuple(t.shape) != shape:
                raise ValueError(f"state[{name!r}] must have shape {shape}, got "
                                 f"{tuple(t.shape)}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"state[{name!r}] must be finite, got NaN or Inf")
        counts = state["counts"].to(self.device)
        if bool((counts < 0).any()):
            raise ValueError(f"state['counts'] must be >= 0, got {counts.tolist()}")
        if self.mode == "gram":
            diag = torch.diagonal(state["gram"], dim1=1, dim2=2).to(self.device, _F64)
            if bool((diag < 0).any()):
                raise ValueError("state['gram'] must have a non-negative diagonal (sums of "
                                 "squares)")
            empty = (counts == 0) & ((diag.abs().sum(1) > 0) |
                                     (state["sums"].to(self.device).abs().sum(1) > 0))
            if bool(empty.any()):
                raise ValueError(f"state: class {int(torch.nonzero(empty)[0])} has rows in "
                                 "state['gram']/state['sums'] but a count of 0")
            return diag.sum(1)
        cls = state["class_ids"].to(self.device)
        if n and (int(cls.min()) < 0 or int(cls.max()) >= c):
            raise ValueError(f"state['class_ids'] must be in [0, {c}), got values in "
                             f"[{int(cls.min())}, {int(cls.max())}]")
        per_class = torch.bincount(cls, minlength=c)
        if not torch.equal(per_class, counts):
            raise ValueError(f"state['counts'] must count state['class_ids'] per class "
                             f"({per_class.tolist()}), got {counts.tolist()}")
        z = state["z"].to(self.device)
        return torch.zeros(c, dtype=_F64, device=self.device).index_add_(
            0, cls, torch.linalg.vector_norm(z, dim=1).to(_F64).square())

    def load_state_dict(self, state: dict[str, Tensor], *, add: bool = False) -> None:
        """Replace the streamed state with ``state`` (or add it: ``add=True``).

        The state is checked first (nothing changes when it is refused): the keys of this
        mode, each tensor's dtype (this object's ``dtype``, int64 for counts and ids) and
        shape (``num_classes``, ``dim``, ``sketch_dim``), finiteness, class ids in range,
        counts that agree with them, and no overflow once added.

        Raises:
            ValueError: the state does not fit this StreamingSVD (the message says how).
        """
        if self._final is not None:
            raise RuntimeError("load_state_dict() after finalize()")
        energy = self._state_energy(state)
        energy = energy + self._energy if add else energy
        _check_energy(energy, self.dtype, "of the state")
        self._flush()
        self._energy = energy
        if self.mode == "gram":
            for name in ("gram", "sums", "counts", "id_hash"):
                mine = getattr(self, name)
                other = state[name].to(mine.device)
                if add:
                    mine.add_(other)
                else:
                    mine.copy_(other)
            return
        parts = [state[k].to(self.device) for k in ("z", "class_ids", "sample_ids")]
        if add:
            self._z.append(parts[0])
            self._z_cls.append(parts[1])
            self._z_ids.append(parts[2])
            self.counts.add_(state["counts"].to(self.device))
        else:
            self._z, self._z_cls, self._z_ids = [parts[0]], [parts[1]], [parts[2]]
            self.counts.copy_(state["counts"].to(self.device))

    def merge_(self, other: StreamingSVD) -> StreamingSVD:
        """Add another partial state with the same settings (rows split across workers)."""
        same = ("num_classes", "dim", "mode", "sketch_dim", "seed")
        for name in same:
            if getattr(self, name) != getattr(other, name):
                raise ValueError(f"cannot merge: {name} differs ({getattr(self, name)!r} vs "
                                 f"{getattr(other, name)!r})")
        self.load_state_dict(other.state_dict(), add=True)
        return self

    # ---- decomposition ----------------------------------------------------------------

    def finalize(self) -> dict[int, ClassSVD]:
        """Decompose every class seen. Gram mode: exact vectors and singular values,
        projections after :meth:`project`. Sketch mode: vectors of the compact rows and
        approximate projections; :meth:`refine` makes chosen classes exact.

        Returns:
            ``{class id: ClassSVD}`` for every class with at least one row.
        """
        if self._final is not None:
            return self.results()
        self._flush()
        gen = torch.Generator().manual_seed(self.seed)
        q = self.rank + self.oversample
        final: dict[int, dict] = {}
        counts = self.counts.tolist()
        if self.mode == "gram":
            for c in range(self.num_classes):
                n = counts[c]
                if n == 0:
                    continue
                mean = self.sums[c].to(torch.float64) / n
                g = sketch_ops.gram_symmetrize(self.gram[c], mean, n, self.center)
                # The operator runs in the state's dtype (a float32 Gram matrix holds no
                # more than float32 precision; the Krylov basis stays float64): half the
                # memory traffic per iteration, same convergence to tol=1e-6 (measured).
                vals, vecs, ok, its = _top_eigenpairs(
                    lambda b, g=g: (g @ b.to(g.dtype)).to(torch.float64), self.dim,
                                                      self.rank, q, self.max_iter, self.tol,
                                                      gen, self.device)
                final[c] = {"count": n, "values": vals.sqrt(), "vectors":
                            _orient(vecs.T).to(torch.float32), "sketch": None,
                            "mean": mean if self.center else None, "converged": ok,
                            "iterations": its, "ids": None, "proj": None, "exact": True,
                            "id_hash": int(self.id_hash[c])}
            self.gram = self._buffer = self.sums = None  # type: ignore[assignment]
        else:
            chunks = list(zip(self._z, self._z_cls, self._z_ids, strict=True))
            self._z, self._z_cls, self._z_ids = [], [], []
            for c in range(self.num_classes):
                if counts[c] == 0:
                    continue
                # Gather the class from the chunks (no concatenated copy of the whole store).
                parts = [(z[cls == c], ids[cls == c]) for z, cls, ids in chunks]
                ids_c = torch.cat([i for _, i in parts])
                order = torch.argsort(ids_c)
                ids_c = ids_c[order]
                _check_unique_ids(c, ids_c, "update()")
                zc = torch.cat([z for z, _ in parts]).index_select(0, order)
                del parts
                if self.center:
                    zc = zc - zc.to(torch.float64).mean(dim=0).to(zc.dtype)
                n, k = zc.shape
                r = min(self.rank, n, k)
                if n < k:  # work in the smaller space: left vectors, then right
                    vals, u, ok, its = _top_eigenpairs(
                        lambda b, zc=zc: (zc @ (zc.T @ b.to(zc.dtype))).to(_F64), n, r, q,
                        self.max_iter, self.tol, gen, self.device)
                    sv = vals.sqrt()
                    w = (zc.T.to(_F64) @ u) / sv.clamp_min(torch.finfo(_F64).tiny)
                    w = w.T
                else:
                    vals, w, ok, its = _top_eigenpairs(
                        lambda b, zc=zc: (zc.T @ (zc @ b.to(zc.dtype))).to(_F64), k, r, q,
                        self.max_iter, self.tol, gen, self.device)
                    sv = vals.sqrt()
                    w = w.T
                w = _orient(w)
                proj = zc.to(_F64) @ w.T
                final[c] = {"count": n, "values": sv, "vectors": None,
                            "sketch": w.to(torch.float32), "mean": None, "converged": ok,
                            "iterations": its, "ids": ids_c, "proj": proj.to(torch.float32),
                            "exact": False, "id_hash": int(_id_fingerprint(ids_c).sum())}
        self._final = final
        return self.results()

    def results(self) -> dict[int, ClassSVD]:
        """The current per-class results (projections included once they exist).

        Raises:
            ValueError: a class's projections do not cover exactly the rows that
                :meth:`update` counted (fewer rows, or other sample ids), or repeat a
                sample id; call it once the second pass is complete.
        """
        if self._final is None:
            raise RuntimeError("results() before finalize()")
        self._collect_projections()
        return {
            c: ClassSVD(label=c, count=f["count"], singular_values=f["values"],
                        vectors=f["vectors"], sketch_vectors=f["sketch"], sample_ids=f["ids"],
                        projections=f["proj"], exact_projections=f["exact"],
                        converged=f["converged"], iterations=f["iterations"])
            for c, f in self._final.items()
        }

    # ---- second passes ------------------------------------------------------------------

    def project(self, rows: Tensor, class_ids: Tensor, sample_ids: Tensor | None = None) -> None:
        """Second pass: exact projections of rows onto their class's input-space vectors.

        Rows of classes without input-space vectors (sketch mode, not refined) are skipped.
        Shapes as :meth:`update`; ``sample_ids`` default to arrival order of this pass. The
        pass must give every row that :meth:`update` got, once, with the same sample ids:
        more rows of a class than counted fail here, fewer rows or other ids (checked by
        count and by a fingerprint of the ids) when :meth:`results` is called.
        """
        if self._final is None:
            raise RuntimeError("project() before finalize()")
        norms = _check_batch(rows, class_ids, sample_ids, self.dim, self.num_classes)
        f32_limit = torch.finfo(torch.float32).max / _ENERGY_MARGIN
        if rows.shape[0] and float(norms.max()) > f32_limit:
            raise ValueError(f"rows: a row of norm {float(norms.max()):.3g} overflows the "
                             f"float32 projections ({f32_limit:.3g}); divide the rows by a "
                             "common scale (the one used for update())")
        if sample_ids is None:
            start = self._proj_next_id
            sample_ids = torch.arange(start, start + rows.shape[0])
            self._proj_next_id = start + rows.shape[0]
        cls = class_ids.to(device=self.device, dtype=torch.int64)
        v_all, mv, has = self._stacked_vectors()
        keep = has[cls]
        if not bool(keep.any()):
            return
        rows = rows.detach().to(device=self.device, dtype=torch.float32)
        ids = sample_ids.to(self.device, torch.int64)
        if not bool(keep.all()):  # no copy of the (B, d) rows when every row is kept
            rows, cls, ids = rows[keep], cls[keep], ids[keep]
        r = self.rank
        if self.num_classes * r <= 64:
            p = (rows @ v_all.reshape(-1, self.dim).T).reshape(-1, self.num_classes, r)
            p = p[torch.arange(rows.shape[0], device=self.device), cls]
        else:  # one product per class present in the batch: B r d flops, no (B, r, d) gather
            p = rows.new_empty((rows.shape[0], r))
            order = torch.argsort(cls, stable=True)
            present, sizes = torch.unique_consecutive(cls[order], return_counts=True)
            start = 0
            for c, size in zip(present.tolist(), sizes.tolist(), strict=True):
                idx = order[start:start + size]
                p[idx] = rows.index_select(0, idx) @ v_all[c].T
                start += size
        p = p - mv[cls]
        seen = self._proj_seen.index_add(0, cls, torch.ones_like(cls))
        over = torch.nonzero(seen > self.counts).flatten()
        if over.numel():
            c = int(over[0])
            raise ValueError(f"class {c}: project() got {int(seen[c])} rows of it, more than "
                             f"the {int(self.counts[c])} update() counted; pass every row of "
                             "the first pass once")
        self._proj_seen = seen
        self._proj.append((cls, ids, p))

    def _stacked_vectors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(C, r, d) vectors (zeros where none), (C, r) mean . vector offsets and (C,) bool
        "has input-space vectors", built once per decomposition (not per batch)."""
        assert self._final is not None
        if self._stack_cache is not None:
            return self._stack_cache
        v_all = torch.zeros((self.num_classes, self.rank, self.dim), device=self.device)
        mv = torch.zeros((self.num_classes, self.rank), device=self.device)
        has = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
        for c, f in self._final.items():
            if f["vectors"] is None:
                continue
            has[c] = True
            r = f["vectors"].shape[0]
            v_all[c, :r] = f["vectors"]
            if f["mean"] is not None:
                mv[c, :r] = (f["vectors"].to(torch.float64) @ f["mean"]).to(torch.float32)
        self._stack_cache = (v_all, mv, has)
        return v_all, mv, has

    def _collect_projections(self, where: str = "project()") -> None:
        """Fold the projections gathered by project() into the per-class results, once
        they cover exactly the rows update() counted (checked first: on a refusal the
        results and the gathered projections stay as they were)."""
        if not self._proj:
            return
        assert self._final is not None
        cls = torch.cat([t[0] for t in self._proj])
        ids = torch.cat([t[1] for t in self._proj])
        p = torch.cat([t[2] for t in self._proj])
        folded = {}
        for c, f in self._final.items():
            sel = torch.nonzero(cls == c).flatten()
            if sel.numel() == 0:
                continue
            # a class with fewer vectors than rank (sketch mode, fewer rows than rank)
            c_ids, c_p = ids[sel], p[sel][:, :f["vectors"].shape[0]]
            if f["ids"] is not None and f["exact"]:
                c_ids = torch.cat([f["ids"], c_ids])
                c_p = torch.cat([f["proj"], c_p])
            order = torch.argsort(c_ids)
            c_ids, c_p = c_ids[order], c_p[order]
            _check_unique_ids(c, c_ids, where)
            _check_same_rows(c, where, c_ids.numel(), int(_id_fingerprint(c_ids).sum()), f)
            folded[c] = (c_ids, c_p)
        self._proj = []
        for c, (c_ids, c_p) in folded.items():
            f = self._final[c]
            f["ids"], f["proj"], f["exact"] = c_ids, c_p, True

    def refine(self, batches: Callable[[], Iterable[Batch]], classes: Iterable[int]) -> None:
        """Sketch mode: exact input-space vectors and projections for ``classes`` by
        re-streaming only their rows, twice.

        Pass 1 forms ``v = X_c^T u`` from the compact rows' left singular vectors ``u``
        (one power-iteration step in input space: more accurate than the sketch), pass 2
        projects the rows on it. Rows of other classes are skipped cheaply.

        Args:
            batches: a callable returning a fresh iterable of ``(rows, class_ids,
                sample_ids)`` (sample ids as given to :meth:`update`).
            classes: the class ids to refine (for example the flagged class).
        """
        if self._final is None:
            raise RuntimeError("refine() before finalize()")
        if self.mode != "sketch":
            raise ValueError("refine() is for sketch mode; gram mode's vectors are exact "
                             "already: use project() for the projections")
        if not callable(batches):
            raise TypeError("batches must be a callable returning a fresh iterable of "
                            f"(rows, class_ids, sample_ids), got {type(batches).__name__}")
        if not isinstance(classes, Iterable) or isinstance(classes, (str, bytes)) or (
                isinstance(classes, Tensor) and classes.dim() != 1):
            raise TypeError(f"classes must be an iterable of class ids, got {classes!r}")
        chosen = sorted({int(c) for c in classes})
        for c in chosen:
            if c not in self._final:
                raise ValueError(f"classes: class {c} has no rows")
        if not chosen:
            return
        want = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
        want[chosen] = True
        acc = {c: torch.zeros((self._final[c]["proj"].shape[1], self.dim), dtype=torch.float64,
                              device=self.device) for c in chosen}
        total = {c: torch.zeros(self.dim, dtype=torch.float64, device=self.device)
                 for c in chosen}
        weight = {c: torch.zeros(self._final[c]["proj"].shape[1], dtype=torch.float64,
                                 device=self.device) for c in chosen}
        seen = dict.fromkeys(chosen, 0)
        fingerprint = dict.fromkeys(chosen, 0)
        for batch in batches():
            rows, cls, ids = self._unpack(batch)
            keep = want[cls]
            if not bool(keep.any()):
                continue
            rows, cls, ids = rows[keep].to(torch.float64), cls[keep], ids[keep]
            for c in chosen:  # few classes: the flagged ones
                sel = cls == c
                if not bool(sel.any()):
                    continue
                f = self._final[c]
                pos = torch.searchsorted(f["ids"], ids[sel])
                if bool((pos >= f["ids"].numel()).any()) or \
                        not bool((f["ids"][pos.clamp_max(f["ids"].numel() - 1)]
                                  == ids[sel]).all()):
                    raise ValueError(f"class {c}: refine() saw a sample id that update() did "
                                     "not")
                # Left vectors u = p / sigma; components with sigma ~ 0 (rank-deficient
                # class) get u = 0 rather than an overflow.
                sv = f["values"]
                live = sv > 1e-12 * sv[0].clamp_min(1e-300)
                u = torch.where(live, f["proj"][pos].to(torch.float64)
                                / torch.where(live, sv, torch.ones_like(sv)), 0.0)
                acc[c] += u.T @ rows[sel]
                total[c] += rows[sel].sum(dim=0)
                weight[c] += u.sum(dim=0)
                seen[c] += int(sel.sum())
                fingerprint[c] += int(_id_fingerprint(ids[sel]).sum())
        for c in chosen:
            _check_same_rows(c, "refine()'s first pass", seen[c], fingerprint[c],
                             self._final[c])
        for c in chosen:
            f = self._final[c]
            n = f["count"]
            mean = total[c] / n
            v = acc[c] - weight[c][:, None] * mean[None, :] if self.center else acc[c]
            v = torch.linalg.qr(v.T).Q.T  # orthonormal rows, same span order
            f["vectors"] = _orient(v).to(torch.float32)
            f["mean"] = mean if self.center else None
            f["ids"], f["proj"], f["exact"] = None, None, True
        self._stack_cache = None
        self._proj_seen[chosen] = 0
        for batch in batches():
            rows, cls, ids = self._unpack(batch)
            keep = want[cls]
            if bool(keep.any()):
                self.project(rows[keep], cls[keep], ids[keep])
        self._collect_projections("refine()'s second pass")
        for c in chosen:
            f = self._final[c]
            if f["proj"] is None:
                raise ValueError(f"class {c}: refine() saw no rows of it")
            f["values"] = torch.linalg.vector_norm(f["proj"].to(torch.float64), dim=0)

    def _unpack(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 3:
            raise ValueError("batches() must yield (rows, class_ids, sample_ids) tuples")
        rows, cls, ids = batch
        if ids is None:
            raise TypeError("batches() must yield sample_ids as an integer tensor (refine() "
                            "matches rows to the sample ids given to update()), got None")
        _check_batch(rows, cls, ids, self.dim, self.num_classes)
        return (rows.detach().to(self.device), cls.to(self.device, torch.int64),
                ids.to(self.device, torch.int64))


def streamed_svd(
    batches: Callable[[], Iterable[Batch]], num_classes: int, dim: int, *,
    refine_classes: Iterable[int] = (), **options,
) -> dict[int, ClassSVD]:
    """Run a :class:`StreamingSVD` over ``batches()`` and return the per-class results.

    Gram mode streams twice (decomposition, then exact projections); sketch mode once,
    plus two passes over ``refine_classes`` when given.

    Args:
        batches: callable returning a fresh iterable of ``(rows (B, d), class_ids (B,),
            sample_ids (B,))``.
        num_classes, dim, options: as :class:`StreamingSVD`.
    """
    svd = StreamingSVD(num_classes, dim, **options)
    for batch in batches():
        svd.update(*batch)
    svd.finalize()
    if svd.mode == "gram":
        for batch in batches():
            svd.project(*batch)
    elif refine_classes:
        svd.refine(batches, refine_classes)
    return svd.results()
