// Every schema of the safedl operator library, in one place. Kernels register per
// dispatch key in their own folders (ops/<op>/<op>_cpu.cpp, ops/<op>/<op>_cuda.cu);
// fake kernels and autograd are registered from Python (safedl_ext/ops).
#include <torch/library.h>

TORCH_LIBRARY(safedl, m) {
  // One fused, in-place projected-gradient step. x_adv, x0, grad: (N, ...) of one
  // floating dtype on one device. alpha, eps: one value or (N,) values.
  // norm: 'linf' (sign step, box projection onto the eps-ball) or 'l2' (step along
  // grad/||grad||_2 per sample, projection onto the L2 ball per sample); then the box
  // [lo, hi].
  m.def(
      "pgd_step_(Tensor(a!) x_adv, Tensor x0, Tensor grad, Tensor alpha, Tensor eps, "
      "str norm, float lo, float hi) -> ()");

  // ---- linalg: streamed decomposition of gradient matrices (ops/sketch) ----
  // Structured random projection of rows: out[b, j] = (1/sqrt(k)) * sum_i H[perm(j), i] *
  // sign(i) * rows[b, i], H the (unnormalised) Walsh-Hadamard matrix of size D = 2^ceil(log2 d),
  // sign and perm drawn from a counter-based generator keyed by seed (nothing d x k stored).
  // rows: (B, d) float32/float64. Returns (B, k) of rows' dtype.
  m.def("srht_project(Tensor rows, int out_dim, int seed) -> Tensor");
  // Per-class streamed Gram update. Rows are routed by class_ids into per-class buffers;
  // a full buffer is flushed as one symmetric rank-k update gram[c] += R^T R computed on
  // the upper-triangular blocks only (the lower triangle of gram is not maintained: read
  // it as triu(gram) + triu(gram, 1)^T). flush=true also flushes partial buffers.
  // sums[c] += rows_c.sum(0) and counts[c] += len(rows_c) at once.
  // gram: (C, d, d), sums: (C, d), buffer: (C, cap, d), all of rows' dtype and device
  // (cap = 0: no buffering); counts: (C,) int64 on that device; fill: (C,) int64 on the
  // CPU (rows held in each buffer); rows: (B, d); class_ids: (B,) int64 in [0, C).
  m.def(
      "gram_update_(Tensor(a!) gram, Tensor(b!) sums, Tensor(c!) counts, Tensor(d!) buffer, "
      "Tensor(e!) fill, Tensor rows, Tensor class_ids, bool flush) -> ()");
  // One class's Gram matrix as gram_update_ left it (upper triangle valid) -> the full
  // symmetric matrix, minus count * mean mean^T when center (computed in float64), in one
  // pass. gram: (d, d) float32/float64, mean: (d,) float64 on gram's device. Returns (d, d)
  // of gram's dtype.
  m.def("gram_symmetrize(Tensor gram, Tensor mean, int count, bool center) -> Tensor");

  // ---- linalg: batched EM for 2-component 1-D Gaussian mixtures (ops/gmm) ----
  // values: (C, L) float32/float64, padded; lengths: (C,) int64, group c uses
  // values[c, :lengths[c]]. weights, means, variances: (C, 2) float64 initial parameters.
  // EM as scikit-learn's GaussianMixture(2, covariance_type='full') in 1-D: variances get
  // + reg_covar; stops when the change of the mean log-likelihood per point is < tol, or
  // after max_iter iterations. Returns (weights, means, variances) (C, 2) float64,
  // mean log-likelihood (C,) float64, iterations used (C,) int64, converged (C,) bool.
  m.def(
      "gmm1d_em(Tensor values, Tensor lengths, Tensor weights, Tensor means, "
      "Tensor variances, int max_iter, float tol, float reg_covar) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- gradients: the cross-entropy seed of input gradients (ops/xent) ----
  // Row-wise softmax(logits) - onehot(labels): the gradient of the summed cross-entropy
  // w.r.t. the logits. logits: (N, K) float32/float64 (float16/bfloat16 on CUDA, computed
  // in float), any strides; labels: (N,) int64 in [0, K). Returns (N, K) contiguous of
  // logits' dtype.
  m.def("xent_seed(Tensor logits, Tensor labels) -> Tensor");
  // Its vector-Jacobian product: (diag(p) - p p^T) grad = p * (grad - (p . grad)) row-wise,
  // with p = softmax(logits) recomputed from logits. grad, logits: (N, K), same dtype and
  // device. Returns (N, K) contiguous. Differentiable itself (registered in Python).
  m.def("xent_seed_backward(Tensor grad, Tensor logits) -> Tensor");
}
