// safedl::gram_update_: the fused per-class update of the exact (Gram) mode of
// StreamingSVD. Routing, buffering and the symmetric blocked rank-k update are written
// once on ATen calls (BLAS on the CPU, cuBLAS on CUDA) and registered for both devices.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../../common/checks.h"

namespace safedl {
namespace sketch {
namespace {

// Column block of the symmetric update. Only blocks on or above the diagonal are
// computed: (nb + 1) / (2 nb) of a full GEMM's work for nb blocks. 512: on 2 EPYC cores a
// (1024 x 3072) update took 70 ms in 512-column blocks, 91 ms in 1536 (nb = 2) and 121 ms
// as one GEMM (measured 2026-12-01); GEMMs of 512 columns keep BLAS efficient.
constexpr int64_t kGramBlock = 512;

// gram (d, d) += s^T s on the upper-triangular blocks; s: (k, d).
void syrk_upper(at::Tensor gram, const at::Tensor& s) {
  const int64_t d = gram.size(0);
  if (s.size(0) == 0) return;
  if (d <= kGramBlock) {
    gram.addmm_(s.t(), s);
    return;
  }
  const int64_t nb = (d + kGramBlock - 1) / kGramBlock;
  const int64_t bs = (d + nb - 1) / nb;  // equal blocks, the last one shorter
  for (int64_t i = 0; i < d; i += bs) {
    const int64_t ni = std::min(bs, d - i);
    const at::Tensor si = s.narrow(1, i, ni);
    // One call for the diagonal block and everything right of it.
    gram.narrow(0, i, ni).narrow(1, i, d - i).addmm_(si.t(), s.narrow(1, i, d - i));
  }
}

void check_gram_args(const at::Tensor& gram, const at::Tensor& sums, const at::Tensor& counts,
                     const at::Tensor& buffer, const at::Tensor& fill, const at::Tensor& rows,
                     const at::Tensor& class_ids) {
  check_floating(rows, "rows");
  TORCH_CHECK_VALUE(rows.dim() == 2, "rows must be a (B, d) matrix, got shape ", rows.sizes());
  TORCH_CHECK_VALUE(gram.dim() == 3 && gram.size(1) == gram.size(2),
                    "gram must have shape (C, d, d), got ", gram.sizes());
  const int64_t c = gram.size(0);
  const int64_t d = gram.size(1);
  TORCH_CHECK_VALUE(rows.size(1) == d, "rows must have d=", d, " columns (gram is ",
                    gram.sizes(), "), got shape ", rows.sizes());
  TORCH_CHECK_VALUE(sums.dim() == 2 && sums.size(0) == c && sums.size(1) == d,
                    "sums must have shape (", c, ", ", d, "), got ", sums.sizes());
  TORCH_CHECK_VALUE(buffer.dim() == 3 && buffer.size(0) == c && buffer.size(2) == d,
                    "buffer must have shape (", c, ", cap, ", d, "), got ", buffer.sizes());
  check_same_device_dtype(gram, "gram", rows, "rows");
  check_same_device_dtype(gram, "gram", sums, "sums");
  check_same_device_dtype(gram, "gram", buffer, "buffer");
  TORCH_CHECK_VALUE(gram.is_contiguous() && buffer.is_contiguous(),
                    "gram and buffer must be contiguous");
  TORCH_CHECK_VALUE(counts.dim() == 1 && counts.size(0) == c, "counts must have shape (", c,
                    ",), got ", counts.sizes());
  TORCH_CHECK_TYPE(counts.scalar_type() == at::kLong, "counts must be int64, got ",
                   counts.scalar_type());
  TORCH_CHECK_VALUE(counts.device() == gram.device(), "counts must be on ", gram.device(),
                    ", got ", counts.device());
  TORCH_CHECK_VALUE(fill.dim() == 1 && fill.size(0) == c, "fill must have shape (", c,
                    ",), got ", fill.sizes());
  TORCH_CHECK_TYPE(fill.scalar_type() == at::kLong, "fill must be int64, got ",
                   fill.scalar_type());
  TORCH_CHECK_VALUE(fill.device().is_cpu() && fill.is_contiguous(),
                    "fill must be a contiguous CPU tensor, got one on ", fill.device());
  TORCH_CHECK_VALUE(class_ids.dim() == 1 && class_ids.size(0) == rows.size(0),
                    "class_ids must have shape (", rows.size(0), ",), got ",
                    class_ids.sizes());
  TORCH_CHECK_TYPE(class_ids.scalar_type() == at::kLong, "class_ids must be int64, got ",
                   class_ids.scalar_type());
  TORCH_CHECK_VALUE(class_ids.device() == gram.device(), "class_ids must be on ",
                    gram.device(), ", got ", class_ids.device());
}

void gram_update_(const at::Tensor& gram, const at::Tensor& sums, const at::Tensor& counts,
                  const at::Tensor& buffer, const at::Tensor& fill, const at::Tensor& rows,
                  const at::Tensor& class_ids, bool flush) {
  check_gram_args(gram, sums, counts, buffer, fill, rows, class_ids);
  const int64_t c = gram.size(0);
  const int64_t cap = buffer.size(1);
  int64_t* fill_of = fill.data_ptr<int64_t>();
  for (int64_t k = 0; k < c; ++k) {
    TORCH_CHECK_VALUE(fill_of[k] >= 0 && fill_of[k] <= cap, "fill[", k, "] must be in [0, ",
                      cap, "], got ", fill_of[k]);
  }
  if (rows.size(0) > 0) {
    const auto lo = class_ids.min().item<int64_t>();
    const auto hi = class_ids.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < c, "class_ids must be in [0, ", c, "), got values in [",
                      lo, ", ", hi, "]");
    sums.index_add_(0, class_ids, rows);
    counts.index_add_(0, class_ids, at::ones_like(class_ids));
    // Group the batch by class once: a stable sort, then one contiguous segment per class.
    const at::Tensor order = std::get<1>(class_ids.sort(/*stable=*/true, 0, false));
    const at::Tensor grouped = rows.index_select(0, order);
    const at::Tensor per_class = class_ids.bincount({}, c).cpu();
    const int64_t* n_of = per_class.const_data_ptr<int64_t>();
    int64_t offset = 0;
    for (int64_t k = 0; k < c; ++k) {
      int64_t left = n_of[k];
      int64_t pos = offset;
      offset += left;
      if (left == 0) continue;
      at::Tensor g = gram.select(0, k);
      if (cap == 0) {
        syrk_upper(g, grouped.narrow(0, pos, left));
        continue;
      }
      at::Tensor buf = buffer.select(0, k);
      while (left > 0) {
        if (fill_of[k] == 0 && left >= cap) {  // whole buffers' worth: no copy needed
          const int64_t take = (left / cap) * cap;
          syrk_upper(g, grouped.narrow(0, pos, take));
          pos += take;
          left -= take;
          continue;
        }
        const int64_t take = std::min(cap - fill_of[k], left);
        buf.narrow(0, fill_of[k], take).copy_(grouped.narrow(0, pos, take));
        fill_of[k] += take;
        pos += take;
        left -= take;
        if (fill_of[k] == cap) {
          syrk_upper(g, buf);
          fill_of[k] = 0;
        }
      }
    }
  }
  if (flush) {
    for (int64_t k = 0; k < c; ++k) {
      if (fill_of[k] == 0) continue;
      syrk_upper(gram.select(0, k), buffer.select(0, k).narrow(0, 0, fill_of[k]));
      fill_of[k] = 0;
    }
  }
}

void check_symmetrize_args(const at::Tensor& gram, const at::Tensor& mean, int64_t count) {
  check_floating(gram, "gram");
  TORCH_CHECK_VALUE(gram.dim() == 2 && gram.size(0) == gram.size(1),
                    "gram must be a square (d, d) matrix, got ", gram.sizes());
  TORCH_CHECK_VALUE(mean.dim() == 1 && mean.size(0) == gram.size(0), "mean must have shape (",
                    gram.size(0), ",), got ", mean.sizes());
  TORCH_CHECK_TYPE(mean.scalar_type() == at::kDouble, "mean must be float64, got ",
                   mean.scalar_type());
  TORCH_CHECK_VALUE(mean.device() == gram.device(), "mean must be on ", gram.device(),
                    ", got ", mean.device());
  TORCH_CHECK_VALUE(count >= 0, "count must be >= 0, got ", count);
}

// Any device: composed of ATen ops (several passes).
at::Tensor gram_symmetrize_composite(const at::Tensor& gram, const at::Tensor& mean,
                                     int64_t count, bool center) {
  check_symmetrize_args(gram, mean, count);
  at::Tensor g = gram.to(at::kDouble).triu();
  at::Tensor out = g + g.triu(1).t();
  if (center) out.sub_(at::outer(mean, mean), static_cast<double>(count));
  return out.to(gram.scalar_type());
}

// CPU: one pass in 64 x 64 tiles; tile (I, J), I <= J, is read once from the upper
// triangle and written to (I, J) and, transposed, to (J, I). The threads share out the
// list of upper tiles, not the tile rows (row 0 of the tiles holds the most of them).
template <typename T>
void symmetrize_cpu(const T* __restrict__ g, int64_t d, const double* __restrict__ mu,
                    double scale, T* __restrict__ out) {
  constexpr int64_t kTile = 64;
  const int64_t tiles = (d + kTile - 1) / kTile;
  std::vector<std::pair<int64_t, int64_t>> upper;
  upper.reserve(static_cast<size_t>(tiles * (tiles + 1) / 2));
  for (int64_t ti = 0; ti < tiles; ++ti) {
    for (int64_t tj = ti; tj < tiles; ++tj) upper.emplace_back(ti, tj);
  }
  at::parallel_for(0, static_cast<int64_t>(upper.size()), 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t ti = upper[static_cast<size_t>(p)].first;
      const int64_t tj = upper[static_cast<size_t>(p)].second;
      const int64_t i0 = ti * kTile, i1 = std::min(d, i0 + kTile);
      const int64_t j0 = tj * kTile, j1 = std::min(d, j0 + kTile);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t js = std::max(j0, i);
        const double si = scale * mu[i];
        for (int64_t j = js; j < j1; ++j) {
          const T v = static_cast<T>(static_cast<double>(g[i * d + j]) - si * mu[j]);
          out[i * d + j] = v;
          out[j * d + i] = v;
        }
      }
    }
  });
}

at::Tensor gram_symmetrize_cpu(const at::Tensor& gram, const at::Tensor& mean, int64_t count,
                               bool center) {
  check_symmetrize_args(gram, mean, count);
  TORCH_CHECK_VALUE(gram.device().is_cpu(), "gram must be on the CPU for this kernel");
  const int64_t d = gram.size(0);
  const at::Tensor g = gram.contiguous();
  const at::Tensor mu = mean.contiguous();
  at::Tensor out = at::empty({d, d}, gram.options());
  const double scale = center ? static_cast<double>(count) : 0.0;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gram_symmetrize_cpu", [&] {
    symmetrize_cpu<scalar_t>(g.const_data_ptr<scalar_t>(), d, mu.const_data_ptr<double>(),
                             scale, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(safedl, CPU, m) {
  m.impl("gram_update_", &gram_update_);
  m.impl("gram_symmetrize", &gram_symmetrize_cpu);
}
TORCH_LIBRARY_IMPL(safedl, CUDA, m) {
  m.impl("gram_update_", &gram_update_);
  m.impl("gram_symmetrize", &gram_symmetrize_composite);
}

}  // namespace sketch
}  // namespace safedl
