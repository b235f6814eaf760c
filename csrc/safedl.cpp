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
}
