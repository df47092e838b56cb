// sLSTM sequence forward and forward+backward: moxe's persistent kernels against the
// alternating scheme of NX-AI's xlstm CUDA backend (per time step one cuBLAS strided-batched
// GEMM over the heads for r y_{t-1}, then a pointwise kernel; the backward walks time with
// a pointwise kernel and a GEMM per step, then one GEMM for dr and a dbias reduction).
// bf16 inputs, float states.
//
//   */dh:{64,128,256}/batch:16     B = 16, S = 1024, NH = 4
//   */dh:128/batch:{2..256}        the batch sweep
//   slstm_cluster_*/dh:128/batch:{4,16}/cluster:{2,4}   the cluster path (sm_90)
//
// FLOPs count the recurrent products only (2*S*B*4H*DH forward; 3x that for forward +
// backward: the forward, dy_{t-1} = r^T dgates_t, and dr); bytes count the tensors each pass
// must read and write once (wx, y, r, bias; plus dy, dwx, dr, dbias for the backward).
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>

#include <vector>

#include "harness.cuh"
#include "moxe/slstm/detail/cell.hpp"
#include "moxe/slstm/sequence.cuh"

namespace {

namespace sl = moxe::slstm;
using moxe::bench::DeviceMemory;
using moxe::bench::EventTimer;
using T = __nv_bfloat16;

constexpr int64_t kSeq = 1024, kHeads = 4;

__global__ void fill_uniform(T* p, std::size_t n, uint32_t seed, float scale) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ (seed * 0x9E3779B9u);
    x ^= x >> 15;
    x *= 0x2C1B3C6Du;
    x ^= x >> 12;
    p[i] = __float2bfloat16((static_cast<float>(x) * 2.3283064e-10f * 2.f - 1.f) * scale);
  }
}

DeviceMemory random_bf16(std::size_t n, uint32_t seed, float scale) {
  DeviceMemory m(n * sizeof(T));
  fill_uniform<<<1024, 256>>>(m.as<T>(), n, seed, scale);
  MOXE_BENCH_CUDA(cudaGetLastError());
  return m;
}

struct Shape {
  int64_t B, DH;
  int64_t H() const { return kHeads * DH; }
  std::size_t units() const { return static_cast<std::size_t>(kSeq * B * H()); }  // S*B*H
  std::size_t r_elems() const { return static_cast<std::size_t>(kHeads * 4 * DH * DH); }
  double flops_forward() const { return 2.0 * kSeq * B * 4 * H() * DH; }
  double bytes_forward() const { return 2.0 * (units() * 5 + r_elems() + 4 * H()); }
  double bytes_backward() const { return bytes_forward() + 2.0 * (units() * 5 + r_elems() + 4 * H()); }
};

Shape shape_of(const benchmark::State& state) { return Shape{state.range(1), state.range(0)}; }

/// Per-iteration inputs (rotated past L2): the input projections and the output gradient.
struct Inputs {
  DeviceMemory wx, dy;
};

moxe::bench::Rotation<Inputs> make_inputs(const Shape& s) {
  return moxe::bench::Rotation<Inputs>(s.units() * 5 * sizeof(T), [&](int i) {
    Inputs in;
    in.wx = random_bf16(s.units() * 4, 11u + i, 1.f);
    in.dy = random_bf16(s.units(), 101u + i, 1.f);
    return in;
  }, 8);
}

/// The timing loop of both schemes: per iteration the next input set, prepare(in) untimed,
/// then launch(in, stream) timed with events (it returns an error message, or null). Sets
/// the counters of the pass afterwards.
template <class Prepare, class Launch>
void time_iterations(benchmark::State& state, const Shape& s, bool with_backward,
                     moxe::bench::Rotation<Inputs>& inputs, Prepare prepare, Launch launch) {
  cudaStream_t stream;
  MOXE_BENCH_CUDA(cudaStreamCreate(&stream));
  MOXE_BENCH_CUDA(cudaDeviceSynchronize());
  EventTimer timer;
  for (auto _ : state) {
    const Inputs& in = inputs.next();
    prepare(in);
    timer.start(stream);
    const char* error = launch(in, stream);
    const double seconds = timer.stop_seconds(stream);
    if (error != nullptr) {
      state.SkipWithError(error);
      break;
    }
    state.SetIterationTime(seconds);
  }
  moxe::bench::set_counters(state, with_backward ? s.bytes_backward() : s.bytes_forward(),
                            with_backward ? 3 * s.flops_forward() : s.flops_forward());
  MOXE_BENCH_CUDA(cudaStreamDestroy(stream));
}

// ---- moxe ---------------------------------------------------------------------------------

/// `cluster` > 0: the cluster path (ForwardParams::cluster_size, sm_90) with that many CTAs
/// per head.
void run_moxe(benchmark::State& state, bool with_backward, int cluster = 0) {
  const Shape s = shape_of(state);
  auto inputs = make_inputs(s);
  DeviceMemory r = random_bf16(s.r_elems(), 3u, 1.f / std::sqrt(float(s.DH)));
  DeviceMemory bias = random_bf16(4 * s.H(), 5u, 0.5f);
  DeviceMemory y(s.units() * sizeof(T)), dwx(s.units() * 4 * sizeof(T)), dr(s.r_elems() * sizeof(T)),
      dbias(4 * s.H() * sizeof(T));
  sl::ForwardParams<T, float> f{};
  f.dims = sl::Dims{kSeq, s.B, kHeads, s.DH};
  f.r = r.as<T>();
  f.bias = bias.as<T>();
  f.y = y.as<T>();
  f.cluster_size = cluster;
  sl::BackwardParams<T, float> b{};
  b.fwd = f;
  b.dwx = dwx.as<T>();
  b.dr = dr.as<T>();
  b.dbias = dbias.as<T>();
  DeviceMemory workspace(std::max(sl::sequence_forward_workspace_size(f), sl::sequence_backward_workspace_size(b)));
  auto prepare = [&](const Inputs& in) {
    f.wx = in.wx.as<T>();
    b.fwd.wx = in.wx.as<T>();
    b.dy = in.dy.as<T>();
  };
  auto launch = [&](const Inputs&, cudaStream_t stream) -> const char* {
    moxe::Status st = sl::sequence_forward(f, workspace.as<void>(), workspace.bytes(), stream);
    if (st == moxe::Status::ok && with_backward)
      st = sl::sequence_backward(b, workspace.as<void>(), workspace.bytes(), stream);
    return st == moxe::Status::ok ? nullptr : moxe::to_string(st);
  };
  time_iterations(state, s, with_backward, inputs, prepare, launch);
}

void BM_slstm_forward(benchmark::State& state) { run_moxe(state, false); }
void BM_slstm_forward_backward(benchmark::State& state) { run_moxe(state, true); }
void BM_slstm_cluster_forward(benchmark::State& state) { run_moxe(state, false, static_cast<int>(state.range(2))); }
void BM_slstm_cluster_forward_backward(benchmark::State& state) {
  run_moxe(state, true, static_cast<int>(state.range(2)));
}

// ---- baseline: cuBLAS GEMM + pointwise kernel per time step -------------------------------

/// Forward pointwise step: gates [B][NH][4DH] (r y_{t-1}), wx_t [B][4][NH][DH].
__global__ void baseline_forward_pointwise(const float* gates, const T* wx_t, const T* bias, const float* c_prev,
                                           const float* n_prev, const float* m_prev, float* c_next, float* n_next,
                                           float* m_next, T* y_t, float* raw_t, int64_t B, int64_t NH, int64_t DH) {
  const int64_t H = NH * DH;
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= B * H) return;
  const int64_t b = idx / H, h = (idx % H) / DH, j = idx % DH;
  float raw[4];
  for (int g = 0; g < 4; ++g) {
    raw[g] = __bfloat162float(wx_t[((b * 4 + g) * NH + h) * DH + j]) + gates[(b * NH + h) * 4 * DH + g * DH + j] +
             __bfloat162float(bias[(g * NH + h) * DH + j]);
    if (raw_t) raw_t[(b * NH + h) * 4 * DH + g * DH + j] = raw[g];
  }
  const auto o = sl::detail::cell_forward(sl::detail::GatesRaw<float>{raw[0], raw[1], raw[2], raw[3]}, c_prev[idx],
                                          n_prev[idx], m_prev[idx]);
  c_next[idx] = o.c;
  n_next[idx] = o.n;
  m_next[idx] = o.m;
  y_t[idx] = __float2bfloat16(o.y);
}

/// Backward pointwise step: dgates_t into dg_t [B][NH][4DH] (bf16, for the GEMMs) and dwx_t.
__global__ void baseline_backward_pointwise(const T* dy_t, const float* dy_rec, const float* raw_t, const float* c_prev,
                                            const float* n_prev, const float* m_prev, float* dc, float* dn, float* dm,
                                            T* dg_t, T* dwx_t, int64_t B, int64_t NH, int64_t DH) {
  const int64_t H = NH * DH;
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= B * H) return;
  const int64_t b = idx / H, h = (idx % H) / DH, j = idx % DH;
  const float* raw = raw_t + (b * NH + h) * 4 * DH + j;
  const auto gd = sl::detail::cell_backward(sl::detail::GatesRaw<float>{raw[0], raw[DH], raw[2 * DH], raw[3 * DH]},
                                            c_prev[idx], n_prev[idx], m_prev[idx],
                                            __bfloat162float(dy_t[idx]) + dy_rec[idx], dc[idx], dn[idx], dm[idx]);
  dc[idx] = gd.dc0;
  dn[idx] = gd.dn0;
  dm[idx] = gd.dm0;
  const float d4[4] = {gd.d.i, gd.d.f, gd.d.z, gd.d.o};
  for (int g = 0; g < 4; ++g) {
    dg_t[(b * NH + h) * 4 * DH + g * DH + j] = __float2bfloat16(d4[g]);
    dwx_t[((b * 4 + g) * NH + h) * DH + j] = __float2bfloat16(d4[g]);
  }
}

/// dbias[g][h][j] = sum over (t, b) of dg [S*B][NH][4DH].
__global__ void baseline_dbias(const T* dg, int64_t rows, int64_t NH, int64_t DH, T* dbias) {
  const int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;  // (h, g, j)
  if (col >= NH * 4 * DH) return;
  float s = 0.f;
  for (int64_t k = 0; k < rows; ++k) s += __bfloat162float(dg[k * NH * 4 * DH + col]);
  const int64_t h = col / (4 * DH), g = (col % (4 * DH)) / DH, j = col % DH;
  dbias[(g * NH + h) * DH + j] = __float2bfloat16(s);
}

struct Baseline {
  Shape s;
  cublasHandle_t handle{};
  DeviceMemory gates, y_full, c, n, m, raw, dg, dy_rec, dc, dn, dm, dr;
  const float one = 1.f, zero = 0.f;

  explicit Baseline(const Shape& shape, bool training) : s(shape) {
    const std::size_t bh = static_cast<std::size_t>(s.B * s.H());
    const std::size_t slots = training ? kSeq + 1 : 2;  // states of every step, or ping-pong
    gates = DeviceMemory(bh * 4 * sizeof(float));
    y_full = DeviceMemory((s.units() + bh) * sizeof(T));  // slot 0: y_{-1} = 0
    c = DeviceMemory(slots * bh * sizeof(float));
    n = DeviceMemory(slots * bh * sizeof(float));
    m = DeviceMemory(slots * bh * sizeof(float));
    if (training) {
      raw = DeviceMemory(s.units() * 4 * sizeof(float));
      dg = DeviceMemory(s.units() * 4 * sizeof(T));
      dy_rec = DeviceMemory(bh * sizeof(float));
      dc = DeviceMemory(bh * sizeof(float));
      dn = DeviceMemory(bh * sizeof(float));
      dm = DeviceMemory(bh * sizeof(float));
      dr = DeviceMemory(s.r_elems() * sizeof(float));
    }
    if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) std::exit(1);
  }
  ~Baseline() { cublasDestroy(handle); }

  bool forward(const T* wx, const T* r, const T* bias, bool training, cudaStream_t stream) {
    const int64_t B = s.B, NH = kHeads, DH = s.DH, H = s.H(), bh = B * H;
    cublasSetStream(handle, stream);
    const std::size_t slots = training ? kSeq + 1 : 2;
    MOXE_BENCH_CUDA(cudaMemsetAsync(y_full.as<T>(), 0, bh * sizeof(T), stream));
    MOXE_BENCH_CUDA(cudaMemsetAsync(c.as<float>(), 0, bh * sizeof(float), stream));
    MOXE_BENCH_CUDA(cudaMemsetAsync(n.as<float>(), 0, bh * sizeof(float), stream));
    MOXE_BENCH_CUDA(cudaMemsetAsync(m.as<float>(), 0, bh * sizeof(float), stream));
    for (int64_t t = 0; t < kSeq; ++t) {
      // gates_h (4DH x B, col-major, ld 4H) = r_h^T-view (4DH x DH) * y_h (DH x B, ld H)
      if (cublasGemmStridedBatchedEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(4 * DH), int(B), int(DH), &one, r,
                                     CUDA_R_16BF, int(DH), 4 * DH * DH, y_full.as<T>() + t * bh, CUDA_R_16BF,
                                     int(H), DH, &zero, gates.as<float>(), CUDA_R_32F, int(4 * H), 4 * DH, int(NH),
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
        return false;
      const std::size_t prev = training ? t : t % 2, next = training ? t + 1 : (t + 1) % 2;
      (void)slots;
      baseline_forward_pointwise<<<unsigned((bh + 255) / 256), 256, 0, stream>>>(
          gates.as<float>(), wx + t * B * 4 * H, bias, c.as<float>() + prev * bh, n.as<float>() + prev * bh,
          m.as<float>() + prev * bh, c.as<float>() + next * bh, n.as<float>() + next * bh, m.as<float>() + next * bh,
          y_full.as<T>() + (t + 1) * bh, training ? raw.as<float>() + t * 4 * bh : nullptr, B, NH, DH);
    }
    return cudaGetLastError() == cudaSuccess;
  }

  bool backward(const T* dy, const T* r, T* dwx, T* dbias, cudaStream_t stream) {
    const int64_t B = s.B, NH = kHeads, DH = s.DH, H = s.H(), bh = B * H;
    MOXE_BENCH_CUDA(cudaMemsetAsync(dy_rec.as<float>(), 0, bh * sizeof(float), stream));
    MOXE_BENCH_CUDA(cudaMemsetAsync(dc.as<float>(), 0, bh * sizeof(float), stream));
    MOXE_BENCH_CUDA(cudaMemsetAsync(dn.as<float>(), 0, bh * sizeof(float), stream));
    MOXE_BENCH_CUDA(cudaMemsetAsync(dm.as<float>(), 0, bh * sizeof(float), stream));
    for (int64_t t = kSeq - 1; t >= 0; --t) {
      baseline_backward_pointwise<<<unsigned((bh + 255) / 256), 256, 0, stream>>>(
          dy + t * bh, dy_rec.as<float>(), raw.as<float>() + t * 4 * bh, c.as<float>() + t * bh,
          n.as<float>() + t * bh, m.as<float>() + t * bh, dc.as<float>(), dn.as<float>(), dm.as<float>(),
          dg.as<T>() + t * 4 * bh, dwx + t * 4 * bh, B, NH, DH);
      // dy_rec_h (DH x B, ld H) = r_h-view (DH x 4DH, ld DH) * dg_h (4DH x B, ld 4H)
      if (cublasGemmStridedBatchedEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, int(DH), int(B), int(4 * DH), &one, r,
                                     CUDA_R_16BF, int(DH), 4 * DH * DH, dg.as<T>() + t * 4 * bh, CUDA_R_16BF,
                                     int(4 * H), 4 * DH, &zero, dy_rec.as<float>(), CUDA_R_32F, int(H), DH, int(NH),
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
        return false;
    }
    // dr_h (DH x 4DH view of [4DH][DH]) = y_prev_h (DH x SB, ld H) * dg_h^T (SB x 4DH)
    if (cublasGemmStridedBatchedEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, int(DH), int(4 * DH), int(kSeq * B), &one,
                                   y_full.as<T>(), CUDA_R_16BF, int(H), DH, dg.as<T>(), CUDA_R_16BF, int(4 * H),
                                   4 * DH, &zero, dr.as<float>(), CUDA_R_32F, int(DH), 4 * DH * DH, int(NH),
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
      return false;
    baseline_dbias<<<unsigned((4 * H + 255) / 256), 256, 0, stream>>>(dg.as<T>(), kSeq * B, NH, DH, dbias);
    return cudaGetLastError() == cudaSuccess;
  }
};

void run_baseline(benchmark::State& state, bool with_backward) {
  const Shape s = shape_of(state);
  auto inputs = make_inputs(s);
  DeviceMemory r = random_bf16(s.r_elems(), 3u, 1.f / std::sqrt(float(s.DH)));
  DeviceMemory bias = random_bf16(4 * s.H(), 5u, 0.5f);
  DeviceMemory dwx(s.units() * 4 * sizeof(T)), dbias(4 * s.H() * sizeof(T));
  Baseline base(s, with_backward);
  auto launch = [&](const Inputs& in, cudaStream_t stream) -> const char* {
    bool ok = base.forward(in.wx.as<T>(), r.as<T>(), bias.as<T>(), with_backward, stream);
    if (ok && with_backward) ok = base.backward(in.dy.as<T>(), r.as<T>(), dwx.as<T>(), dbias.as<T>(), stream);
    return ok ? nullptr : "baseline launch failed";
  };
  time_iterations(state, s, with_backward, inputs, [](const Inputs&) {}, launch);
}

void BM_baseline_forward(benchmark::State& state) { run_baseline(state, false); }
void BM_baseline_forward_backward(benchmark::State& state) { run_baseline(state, true); }

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"dh", "batch"});
  for (int64_t dh : {64, 128, 256}) b->Args({dh, 16});
  for (int64_t batch = 2; batch <= 256; batch *= 2)
    if (batch != 16) b->Args({128, batch});
  b->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
}

/// The cluster path (sm_90; an error elsewhere): DH 128 at B = 4 and 16, clusters of 2 and 4.
void cluster_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"dh", "batch", "cluster"});
  for (int64_t batch : {4, 16})
    for (int64_t cluster : {2, 4}) b->Args({128, batch, cluster});
  b->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
}

BENCHMARK(BM_slstm_forward)->Apply(shapes);
BENCHMARK(BM_slstm_cluster_forward)->Apply(cluster_shapes);
BENCHMARK(BM_slstm_cluster_forward_backward)->Apply(cluster_shapes);
BENCHMARK(BM_baseline_forward)->Apply(shapes);
BENCHMARK(BM_slstm_forward_backward)->Apply(shapes);
BENCHMARK(BM_baseline_forward_backward)->Apply(shapes);

}  // namespace

MOXE_BENCHMARK_MAIN();
