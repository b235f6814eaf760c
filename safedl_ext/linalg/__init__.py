"""Streamed decomposition of gradient matrices and batched 1-D Gaussian mixtures.

* :class:`StreamingSVD` (and :func:`streamed_svd`) — per-class top right singular
  vectors, singular values and row projections of matrices that arrive as row batches
  routed by class (exact Gram mode for moderate d, bounded-memory structured-sketch mode
  for large d).
* :func:`gmm1d` — batched EM for 2-component 1-D Gaussian mixtures over many groups at once.
* :func:`wasserstein2_gaussian1d` — closed-form 2-Wasserstein distance of 1-D Gaussians.
"""

from __future__ import annotations

from .gmm import GMM1DResult, gmm1d, wasserstein2_gaussian1d
from .svd import ClassSVD, StreamingSVD, streamed_svd

__all__ = [
    "ClassSVD",
    "GMM1DResult",
    "StreamingSVD",
    "gmm1d",
    "streamed_svd",
    "wasserstein2_gaussian1d",
]
