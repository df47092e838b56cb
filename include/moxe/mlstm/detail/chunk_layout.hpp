// moxe::mlstm::detail: how the chunkwise algorithm cuts the sequence axis into chunks, and
// the bookkeeping both chunkwise designs share: chunk-size limits, batch passes
// (ForwardParams::batch_per_pass), element loads and stores, the chunk table and the
// workspace of the fused design (detail/fused_chunk.hpp, chunkwise_fused_host.hpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "moxe/core/config.hpp"
#include "moxe/core/math.hpp"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/mlstm/params.hpp"

namespace moxe::mlstm::detail {

inline constexpr int kMinChunkSize = 16;
inline constexpr int kMaxChunkSize = 128;
inline constexpr int kChunkSizeMultiple = 16;

MOXE_HD inline bool chunk_size_valid(int chunk_size) {
  return chunk_size >= kMinChunkSize && chunk_size <= kMaxChunkSize &&
         chunk_size % kChunkSizeMultiple == 0;
}

/// Independent sequences along the sequence axis: batch entries, or segments.
inline int64_t sequence_units(const Dims& d, int64_t num_segments) {
  return num_segments > 0 ? num_segments : d.batch;
}

/// Chunks of all units together, an upper bound that needs no segment offsets: a segment
/// adds at most one partial chunk.
inline int64_t chunk_bound(const Dims& d, int64_t num_segments, int chunk_size) {
  const int64_t per_sequence = ceil_div<int64_t>(d.seq_len, chunk_size);
  return num_segments > 0 ? per_sequence + num_segments : d.batch * per_sequence;
}

/// Batch entries per pass (ForwardParams::batch_per_pass): all of them, or fewer.
template <class T, class A>
int64_t pass_batch(const ForwardParams<T, A>& p) {
  if (p.num_segments > 0 || p.batch_per_pass <= 0 || p.batch_per_pass >= p.dims.batch) return p.dims.batch;
  return p.batch_per_pass;
}

/// The dims of one pass (what the workspace is carved for).
template <class T, class A>
Dims pass_dims(const ForwardParams<T, A>& p) {
  Dims d = p.dims;
  d.batch = pass_batch(p);
  return d;
}

/// p restricted to the batch entries [b0, b0 + nb): every pointer moved to entry b0.
template <class T, class A>
ForwardParams<T, A> batch_slice(const ForwardParams<T, A>& p, int64_t b0, int64_t nb) {
  ForwardParams<T, A> s = p;
  const Dims& d = p.dims;
  const int64_t rows = b0 * d.heads * d.seq_len, slots = b0 * d.heads;  // before entry b0
  s.dims.batch = nb;
  s.q = p.q + rows * d.dqk;
  s.k = p.k + rows * d.dqk;
  s.v = p.v + rows * d.dv;
  s.igate = p.igate + rows;
  s.fgate = p.fgate + rows;
  if (p.h) s.h = p.h + rows * d.dv;
  if (p.c_init) {
    s.c_init = p.c_init + slots * d.dqk * d.dv;
    s.n_init = p.n_init + slots * d.dqk;
    s.m_init = p.m_init + slots;
  }
  if (p.c_last) {
    s.c_last = p.c_last + slots * d.dqk * d.dv;
    s.n_last = p.n_last + slots * d.dqk;
    s.m_last = p.m_last + slots;
  }
  return s;
}

template <class T, class A>
BackwardParams<T, A> batch_slice(const BackwardParams<T, A>& b, int64_t b0, int64_t nb) {
  BackwardParams<T, A> s = b;
  const Dims& d = b.fwd.dims;
  const int64_t rows = b0 * d.heads * d.seq_len, slots = b0 * d.heads;
  s.fwd = batch_slice(b.fwd, b0, nb);
  s.dh = b.dh + rows * d.dv;
  s.dq = b.dq + rows * d.dqk;
  s.dk = b.dk + rows * d.dqk;
  s.dv = b.dv + rows * d.dv;
  s.digate = b.digate + rows;
  s.dfgate = b.dfgate + rows;
  if (b.dc_last) {
    s.dc_last = b.dc_last + slots * d.dqk * d.dv;
    s.dn_last = b.dn_last + slots * d.dqk;
    s.dm_last = b.dm_last + slots;
  }
  if (b.dc_init) {
    s.dc_init = b.dc_init + slots * d.dqk * d.dv;
    s.dn_init = b.dn_init + slots * d.dqk;
    s.dm_init = b.dm_init + slots;
  }
  return s;
}

/// Runs pass(b0, nb) for the batch passes of p in order (entries [b0, b0 + nb)); the first
/// status that is not ok stops it.
template <class T, class A, class Pass>
Status for_each_batch_pass(const ForwardParams<T, A>& p, Pass&& pass) {
  const int64_t per_pass = pass_batch(p);
  for (int64_t b0 = 0; b0 < p.dims.batch; b0 += per_pass)
    MOXE_RETURN_IF_ERROR(pass(b0, math::min(per_pass, p.dims.batch - b0)));
  return Status::ok;
}

/// The checks of the chunkwise algorithm on top of validate(): the chunk size.
template <class T, class Acc>
Status validate_chunkwise(const ForwardParams<T, Acc>& p, bool need_h) {
  MOXE_RETURN_IF_ERROR(validate(p, need_h));
  MOXE_REQUIRE(chunk_size_valid(p.chunk_size));
  return Status::ok;
}

template <class A, class T>
MOXE_HD MOXE_FORCEINLINE A load_acc(T x) {
  if constexpr (std::is_arithmetic_v<T>) {
    return static_cast<A>(x);
  } else {
    return static_cast<A>(static_cast<float>(x));  // __half, __nv_bfloat16
  }
}

template <class T, class A>
MOXE_HD MOXE_FORCEINLINE T store_elem(A x) {
  if constexpr (std::is_arithmetic_v<T>) {
    return static_cast<T>(x);
  } else {
    return T(static_cast<float>(x));
  }
}


// ---- the chunk table ------------------------------------------------------------------------

/// The chunks of every sequence unit (batch entry, or segment), unit after unit. Chunk c
/// covers positions [chunk_start[c], chunk_start[c] + chunk_len[c]) of the sequence axis
/// of unit chunk_unit[c]; unit u owns chunks [unit_first[u], unit_first[u] + unit_chunks[u]).
/// Entries past the chunks in use have length 0.
struct ChunkTable {
  int64_t* chunk_start = nullptr;  ///< [K]
  int32_t* chunk_len = nullptr;    ///< [K]
  int64_t* chunk_unit = nullptr;   ///< [K]
  int64_t* unit_first = nullptr;   ///< [U]
  int64_t* unit_chunks = nullptr;  ///< [U]
};

/// Boundary b of the clamped segment offsets: min(S, max(0, o_0, ..., o_b)), a prefix max.
/// Bad offsets thus become a non-decreasing sequence in [0, S] (valid offsets are
/// unchanged) and cannot index out of bounds; positions before o_0 or after the last
/// boundary then belong to no segment. `previous` is boundary b - 1 (0 for b = 0): the
/// sequential form; a parallel builder takes a max-scan of the offsets instead.
MOXE_HD inline int64_t clamped_boundary(int64_t offset, int64_t previous, int64_t seq_len) {
  return math::min(math::max(offset, previous), seq_len);
}

/// Fills the chunk table (K = `capacity` entries, U = `units`): without segments
/// (`offsets` null) unit u is batch entry u, positions [0, S); with segments, segment u,
/// positions [b_u, b_{u+1}) of the clamped boundaries. Chunks start at the unit's first
/// position, the last one of a unit may be shorter, none crosses a unit boundary; an empty
/// unit has none. chunk_bound() bounds the total, so capacity = chunk_bound() never cuts a
/// unit short. Sequential (one thread); a device builder counts the chunks per unit, scans
/// the counts and fills the entries in parallel, with the same result.
MOXE_HD inline void build_chunk_table(const ChunkTable& t, int64_t units, int64_t capacity, int64_t seq_len,
                                      int chunk_size, const int64_t* offsets) {
  int64_t next = 0, begin = offsets ? clamped_boundary(offsets[0], 0, seq_len) : 0;
  for (int64_t u = 0; u < units; ++u) {
    const int64_t end = offsets ? clamped_boundary(offsets[u + 1], begin, seq_len) : seq_len;
    const int64_t count = ceil_div<int64_t>(end - begin, chunk_size);
    const int64_t first = next;
    for (int64_t c = 0; c < count && next < capacity; ++c, ++next) {
      t.chunk_start[next] = begin + c * chunk_size;
      t.chunk_len[next] = static_cast<int32_t>(math::min<int64_t>(chunk_size, end - begin - c * chunk_size));
      t.chunk_unit[next] = u;
    }
    t.unit_first[u] = first;
    t.unit_chunks[u] = next - first;
    if (offsets) begin = end;
  }
  for (; next < capacity; ++next) {
    t.chunk_start[next] = 0;
    t.chunk_len[next] = 0;
    t.chunk_unit[next] = 0;
  }
}

/// Row (index into the gates; times DQK or DV into q, k, v, h) of position j of chunk c,
/// head `head`: rows of a chunk are consecutive.
MOXE_HD inline int64_t chunk_row(const ChunkTable& t, bool segments, int64_t heads, int64_t seq_len, int64_t c,
                                 int64_t head, int64_t j) {
  const int64_t pos = t.chunk_start[c] + j;
  return segments ? head * seq_len + pos : (t.chunk_unit[c] * heads + head) * seq_len + pos;
}

// ---- the workspace of the fused design ------------------------------------------------------

/// The scratch the fused kernels pass between launches (chunkwise_fused_host.hpp runs the same
/// steps over it). kh = chunk * NH + head indexes per-chunk arrays, row the gates' index
/// [B * NH * S], slot = unit * NH + head.
template <class A>
struct FusedWorkspace {
  ChunkTable table;
  double* m_prev = nullptr;   ///< [K*NH] stabiliser before the chunk (the gate scan, in double)
  double* m_final = nullptr;  ///< [U*NH] stabiliser after the unit's last chunk
  A* state = nullptr;         ///< [K*NH][DQK][DV+1] checkpoint C'_c = [C | n] before the chunk
  // backward
  A* dstate = nullptr;        ///< [K*NH][DQK][DV+1] dC'_{c+1}: gradient of the state after the chunk
  A* inv_den = nullptr;       ///< [rows] 1 / den_j
  A* ddot = nullptr;          ///< [rows] gradient of dot_j = n_j . qs_j
  A* dmf = nullptr;           ///< [rows] gradient of m_j through the normaliser's floor exp(-m_j)
  A* da_row = nullptr;        ///< [rows] gradient of a_j through row j: -eps (dh_j . h_j) inv_den_j
  A* dlogw = nullptr;         ///< [rows] gradient of log w_j
  A* dlogd_col = nullptr;     ///< [rows] sum_j dlogD_js, stored at source row s
  A* dloge = nullptr;         ///< [rows] gradient of log E_s
  A* dlogw_last = nullptr;    ///< [K*NH] gradient of log w_L (through the next state)
  A* dmp_local = nullptr;     ///< [K*NH] gradient of m_prev with the next chunk's share left out
  int32_t* dmp_pass = nullptr;  ///< [K*NH] 1: m_next's gradient passes to m_prev (origin_L = -1)
  A* dm_next = nullptr;       ///< [K*NH] gradient of the chunk's m_next (the suffix scan)
};

/// The one description of the fused workspace: sizing and carving both call it. Sizes
/// that validate() rejects carve nothing. Any chunk_size >= 1 is carved (the host twin
/// runs any; the device launchers check chunk_size_valid() first). forward_parts false
/// (a backward reading a forward tape, ForwardParams::tape): the table, m_prev, m_final and
/// the checkpoints are not carved here (the tape holds them).
template <class A>
FusedWorkspace<A> carve_fused_workspace(WorkspaceCarver& c, const Dims& d, int64_t num_segments, int chunk_size,
                                        bool backward, bool forward_parts = true) {
  FusedWorkspace<A> w;
  if (d.batch <= 0 || d.heads <= 0 || d.seq_len <= 0 || d.dqk <= 0 || d.dv <= 0 || num_segments < 0 ||
      chunk_size < 1)
    return w;
  const std::size_t K = static_cast<std::size_t>(chunk_bound(d, num_segments, chunk_size));
  const std::size_t U = static_cast<std::size_t>(sequence_units(d, num_segments));
  const std::size_t H = static_cast<std::size_t>(d.heads);
  const std::size_t rows = static_cast<std::size_t>(d.batch * d.heads * d.seq_len);
  const std::size_t state = static_cast<std::size_t>(d.dqk * (d.dv + 1));
  if (forward_parts) {
    w.table.chunk_start = c.carve<int64_t>(K);
    w.table.chunk_len = c.carve<int32_t>(K);
    w.table.chunk_unit = c.carve<int64_t>(K);
    w.table.unit_first = c.carve<int64_t>(U);
    w.table.unit_chunks = c.carve<int64_t>(U);
    w.m_prev = c.carve<double>(K * H);
    w.m_final = c.carve<double>(U * H);
    w.state = c.carve<A>(K * H * state);
  }
  if (backward) {
    w.dstate = c.carve<A>(K * H * state);
    w.inv_den = c.carve<A>(rows);
    w.ddot = c.carve<A>(rows);
    w.dmf = c.carve<A>(rows);
    w.da_row = c.carve<A>(rows);
    w.dlogw = c.carve<A>(rows);
    w.dlogd_col = c.carve<A>(rows);
    w.dloge = c.carve<A>(rows);
    w.dlogw_last = c.carve<A>(K * H);
    w.dmp_local = c.carve<A>(K * H);
    w.dmp_pass = c.carve<int32_t>(K * H);
    w.dm_next = c.carve<A>(K * H);
  }
  return w;
}

}  // namespace moxe::mlstm::detail
