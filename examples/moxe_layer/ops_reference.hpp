// The small dense ops of the MoxE layer example, forward and backward, in double on the
// host: linear, LayerNorm / multi-head norm (one group norm), causal depthwise conv, SiLU,
// GELU. The recurrent cells, the gate and the dispatch come from the moxe references; these
// are the glue around them.
//
// Conventions: row-major, outermost dimension first; activations are [rows, features]
// with row = b * S + s for a batch of sequences. Every backward ADDS into its outputs (dx
// and the parameter gradients), so residual branches and shared inputs need no extra
// buffers; zero the gradients once before the backward pass.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "moxe/core/math.hpp"

namespace moxe_layer::ops {

using Vec = std::vector<double>;

// ---- linear: y[n, o] = sum_i x[n, i] w[o, i] + b[o]   (w [out, in], as torch.nn.Linear) ----

inline void linear_forward(const double* x, int64_t rows, int64_t in, const double* w,
                           const double* b, int64_t out, double* y) {
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t o = 0; o < out; ++o) {
      double acc = b ? b[o] : 0.0;
      for (int64_t i = 0; i < in; ++i) acc += x[n * in + i] * w[o * in + i];
      y[n * out + o] = acc;
    }
  }
}

/// dx += dy w, dw += dy^T x, db += sum_n dy (dx and db may be null).
inline void linear_backward(const double* x, int64_t rows, int64_t in, const double* w, int64_t out,
                            const double* dy, double* dx, double* dw, double* db) {
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t o = 0; o < out; ++o) {
      const double g = dy[n * out + o];
      if (db) db[o] += g;
      for (int64_t i = 0; i < in; ++i) {
        dw[o * in + i] += g * x[n * in + i];
        if (dx) dx[n * in + i] += g * w[o * in + i];
      }
    }
  }
}

// ---- group norm over the last axis split in groups: x [rows, groups, size] ----------------
// y = (x - mean) * rstd * w + b per (row, group); w, b [groups * size], b may be null.
// LayerNorm is groups = 1; the multi-head norm of xLSTM is groups = heads (a LayerNorm per
// head, no bias).

struct NormCache {
  Vec xhat;  // [rows * groups * size]: the normalised input
  Vec rstd;  // [rows * groups]
};

inline void group_norm_forward(const double* x, int64_t rows, int64_t groups, int64_t size,
                               const double* w, const double* b, double eps, double* y,
                               NormCache& cache) {
  cache.xhat.assign(rows * groups * size, 0.0);
  cache.rstd.assign(rows * groups, 0.0);
  for (int64_t g = 0; g < rows * groups; ++g) {
    const double* xg = x + g * size;
    double mean = 0.0;
    for (int64_t i = 0; i < size; ++i) mean += xg[i];
    mean /= double(size);
    double var = 0.0;
    for (int64_t i = 0; i < size; ++i) var += (xg[i] - mean) * (xg[i] - mean);
    var /= double(size);
    const double rstd = 1.0 / std::sqrt(var + eps);
    cache.rstd[g] = rstd;
    const int64_t c0 = (g % groups) * size;  // this group's slice of w and b
    for (int64_t i = 0; i < size; ++i) {
      const double xh = (xg[i] - mean) * rstd;
      cache.xhat[g * size + i] = xh;
      y[g * size + i] = xh * w[c0 + i] + (b ? b[c0 + i] : 0.0);
    }
  }
}

/// dx += rstd (gh - mean(gh) - xhat mean(gh xhat)) with gh = dy w; dw += dy xhat; db += dy.
inline void group_norm_backward(const double* dy, int64_t rows, int64_t groups, int64_t size,
                                const double* w, const NormCache& cache, double* dx, double* dw,
                                double* db) {
  for (int64_t g = 0; g < rows * groups; ++g) {
    const int64_t c0 = (g % groups) * size;
    const double* xh = cache.xhat.data() + g * size;
    const double* dyg = dy + g * size;
    double mean_gh = 0.0, mean_gh_xh = 0.0;
    for (int64_t i = 0; i < size; ++i) {
      const double gh = dyg[i] * w[c0 + i];
      mean_gh += gh;
      mean_gh_xh += gh * xh[i];
      dw[c0 + i] += dyg[i] * xh[i];
      if (db) db[c0 + i] += dyg[i];
    }
    mean_gh /= double(size);
    mean_gh_xh /= double(size);
    for (int64_t i = 0; i < size; ++i) {
      const double gh = dyg[i] * w[c0 + i];
      dx[g * size + i] += cache.rstd[g] * (gh - mean_gh - xh[i] * mean_gh_xh);
    }
  }
}

inline void layer_norm_forward(const double* x, int64_t rows, int64_t size, const double* w,
                               const double* b, double eps, double* y, NormCache& cache) {
  group_norm_forward(x, rows, 1, size, w, b, eps, y, cache);
}

inline void layer_norm_backward(const double* dy, int64_t rows, int64_t size, const double* w,
                                const NormCache& cache, double* dx, double* dw, double* db) {
  group_norm_backward(dy, rows, 1, size, w, cache, dx, dw, db);
}

// ---- causal depthwise conv over the sequence: x, y [batch, seq, channels], w [channels, width]
// y[b, t, c] = bias[c] + sum_j w[c, j] x[b, t - (width - 1) + j, c]   (zero before t = 0)

inline void causal_conv_forward(const double* x, int64_t batch, int64_t seq, int64_t channels,
                                const double* w, const double* bias, int64_t width, double* y) {
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < seq; ++t)
      for (int64_t c = 0; c < channels; ++c) {
        double acc = bias ? bias[c] : 0.0;
        for (int64_t j = 0; j < width; ++j) {
          const int64_t src = t - (width - 1) + j;
          if (src >= 0) acc += w[c * width + j] * x[(b * seq + src) * channels + c];
        }
        y[(b * seq + t) * channels + c] = acc;
      }
}

inline void causal_conv_backward(const double* x, int64_t batch, int64_t seq, int64_t channels,
                                 const double* w, int64_t width, const double* dy, double* dx,
                                 double* dw, double* dbias) {
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < seq; ++t)
      for (int64_t c = 0; c < channels; ++c) {
        const double g = dy[(b * seq + t) * channels + c];
        if (dbias) dbias[c] += g;
        for (int64_t j = 0; j < width; ++j) {
          const int64_t src = t - (width - 1) + j;
          if (src < 0) continue;
          dw[c * width + j] += g * x[(b * seq + src) * channels + c];
          dx[(b * seq + src) * channels + c] += g * w[c * width + j];
        }
      }
}

// ---- activations (elementwise) ----------------------------------------------------------

inline double silu(double x) { return x * moxe::math::sigmoid(x); }
inline double silu_grad(double x) {
  const double s = moxe::math::sigmoid(x);
  return s * (1.0 + x * (1.0 - s));
}

/// The exact (erf) GELU, as torch.nn.GELU().
inline double gelu(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
inline double gelu_grad(double x) {
  const double pi = 3.14159265358979323846;
  return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2.0 * pi);
}

inline void silu_forward(const double* x, int64_t n, double* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = silu(x[i]);
}
inline void silu_backward(const double* x, int64_t n, const double* dy, double* dx) {
  for (int64_t i = 0; i < n; ++i) dx[i] += dy[i] * silu_grad(x[i]);
}

// ---- small helpers ------------------------------------------------------------------------

/// Copy columns [col0, col0 + cols) of a [rows, stride] matrix into a [rows, cols] one.
inline void copy_columns(const double* src, int64_t rows, int64_t stride, int64_t col0, int64_t cols,
                         double* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = src[r * stride + col0 + c];
}

/// The transpose of copy_columns: dst[:, col0:col0+cols] += src.
inline void add_columns(const double* src, int64_t rows, int64_t cols, int64_t stride, int64_t col0,
                        double* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * stride + col0 + c] += src[r * cols + c];
}

}  // namespace moxe_layer::ops
