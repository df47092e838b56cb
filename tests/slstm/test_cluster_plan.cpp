// Host tests of the sLSTM cluster split's index arithmetic (detail/plan.hpp): which cluster
// sizes and head dims are taken, which CTA of a cluster launch owns which group and units,
// and where each 16-byte chunk of the per-step exchange comes from and lands. Every unit of
// a head is owned by exactly one CTA, and every element of the y_t tile (forward) and of the
// dgates_t tile (backward) is gathered exactly once, from the CTA that owns it, for every
// allowed cluster size and head dim.
#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "moxe/slstm/detail/plan.hpp"

namespace {

namespace sd = moxe::slstm::detail;

}  // namespace

TEST_CASE("slstm cluster plan: the cluster sizes and head dims taken") {
  for (int cs : {-2, 0, 1, 3, 5, 6, 16}) {
    CAPTURE(cs);
    for (int64_t dh = 16; dh <= 256; dh += 16) CHECK(sd::cluster_units(dh, cs) == 0);
  }
  int taken = 0;
  for (int cs : {2, 4, 8}) {
    CAPTURE(cs);
    for (int64_t dh = -16; dh <= 512; dh += 8) {
      CAPTURE(dh);
      const int u = sd::cluster_units(dh, cs);
      // taken exactly when DH / cs is a whole number of 16-unit tiles of at most kMaxUnits
      const bool want = dh > 0 && dh % cs == 0 && (dh / cs) % 16 == 0 && dh / cs <= sd::kMaxUnits;
      CHECK((u != 0) == want);
      if (u != 0) {
        CHECK(static_cast<int64_t>(u) * cs == dh);
        ++taken;
      }
    }
  }
  // the shapes the device tests use: DH 64 (cs 2, 4), 128 (2, 4, 8), 256 (2, 4, 8)
  CHECK(sd::cluster_units(64, 2) == 32);
  CHECK(sd::cluster_units(64, 4) == 16);
  CHECK(sd::cluster_units(64, 8) == 0);  // 8 units: not a whole tile
  CHECK(sd::cluster_units(128, 8) == 16);
  CHECK(sd::cluster_units(256, 2) == 128);
  CHECK(sd::cluster_units(256, 8) == 32);
  CHECK(sd::cluster_units(512, 2) == 0);  // 256 units per CTA: more than kMaxUnits
  CHECK(taken > 0);
}

TEST_CASE("slstm cluster plan: every unit of every group is owned by exactly one CTA") {
  for (int cs : {2, 4, 8}) {
    for (int64_t dh = 16; dh <= 256; dh += 16) {
      const int u = sd::cluster_units(dh, cs);
      if (u == 0) continue;
      CAPTURE(cs);
      CAPTURE(dh);
      for (int64_t heads : {1, 3, 16}) {
        for (int64_t batch : {1, 9, 16, 33}) {
          CAPTURE(heads);
          CAPTURE(batch);
          const int64_t groups = sd::num_groups(batch, heads);
          // owner count per (batch row, head, unit); a launch of groups [g0, g0 + count)
          std::vector<int> owned(static_cast<std::size_t>(batch * heads * dh), 0);
          bool ranks_match = true, rows_in_batch = true;
          for (int64_t g0 = 0; g0 < groups; g0 += 2) {  // launches of (at most) 2 groups
            const int64_t count = groups - g0 < 2 ? groups - g0 : 2;
            for (int64_t block = 0; block < count * cs; ++block) {
              const sd::ClusterBlock cb = sd::cluster_block(block, cs);
              // the hardware rank of a (cs, 1, 1) cluster is blockIdx.x % cs
              ranks_match = ranks_match && cb.rank == block % cs && cb.group < count;
              const sd::BlockTile t = sd::block_tile(g0 + cb.group, cb.rank, u, heads);
              rows_in_batch = rows_in_batch && t.b0 < batch && t.h < heads;
              for (int64_t b = t.b0; b < t.b0 + sd::kBatchTile && b < batch; ++b)
                for (int64_t j = t.j0; j < t.j0 + u; ++j) ++owned[static_cast<std::size_t>((b * heads + t.h) * dh + j)];
            }
          }
          CHECK(ranks_match);
          CHECK(rows_in_batch);
          bool once = true;
          for (int c : owned) once = once && c == 1;
          CHECK(once);
        }
      }
    }
  }
}

TEST_CASE("slstm cluster plan: the exchange gathers every element of y_t / dgates_t once, from its owner") {
  for (int cs : {2, 4, 8}) {
    for (int64_t dh = 16; dh <= 256; dh += 16) {
      const int u = sd::cluster_units(dh, cs);
      if (u == 0) continue;
      for (unsigned gates : {1u, 4u}) {  // the forward's y_t, the backward's dgates_t
        for (unsigned elems : {4u, 8u}) {  // 16 bytes of float, of half / bf16
          for (int rows : {1, 4, 8, 9, 16}) {
            CAPTURE(cs);
            CAPTURE(dh);
            CAPTURE(gates);
            CAPTURE(elems);
            CAPTURE(rows);
            const int64_t width = gates * dh;  // the head's tile: column g*DH + j
            std::vector<int> got(static_cast<std::size_t>(rows * width), 0);
            bool in_slice = true, owner = true;
            const unsigned chunks = static_cast<unsigned>(rows) * (static_cast<unsigned>(width) / elems);
            const unsigned log2_cs = sd::cluster_log2(cs);
            CHECK((1 << log2_cs) == cs);
            for (unsigned c = 0; c < chunks; ++c) {
              const sd::ExchangeChunk e = sd::exchange_chunk(c, log2_cs, static_cast<unsigned>(u), elems, gates);
              // the chunk lies within one gate of one CTA's slice [rows][gates*U] (column g*U + jl),
              // and that CTA owns those units
              const int g = e.head_col / static_cast<int>(dh), j = e.head_col % static_cast<int>(dh);
              const int jl = e.slice_col % u;
              in_slice = in_slice && e.row >= 0 && e.row < rows && e.rank >= 0 && e.rank < cs && e.slice_col >= 0 &&
                         e.slice_col < static_cast<int>(gates) * u && e.slice_col / u == g &&
                         jl + static_cast<int>(elems) <= u && j + static_cast<int>(elems) <= dh;
              owner = owner && e.rank * u + jl == j &&
                      sd::block_tile(0, e.rank, u, 1).j0 == static_cast<int64_t>(e.rank) * u;
              for (unsigned i = 0; i < elems; ++i) {
                const int64_t col = e.head_col + static_cast<int64_t>(i);
                if (e.row >= 0 && e.row < rows && col >= 0 && col < width)
                  ++got[static_cast<std::size_t>(e.row * width + col)];
              }
            }
            CHECK(in_slice);
            CHECK(owner);
            bool once = true;
            for (int n : got) once = once && n == 1;
            CHECK(once);
          }
        }
      }
    }
  }
}

TEST_CASE("slstm cluster plan: the published slices follow the split block's shared memory") {
  for (int cs : {2, 4, 8}) {
    for (int64_t dh = 16; dh <= 256; dh += 16) {
      const int u = sd::cluster_units(dh, cs);
      if (u == 0) continue;
      for (int eb : {2, 4}) {
        CAPTURE(cs);
        CAPTURE(dh);
        CAPTURE(eb);
        const bool tc = eb == 2;
        const sd::ForwardClusterSmem s = sd::forward_cluster_smem(dh, u, eb, tc);
        const sd::ForwardSmem b = sd::forward_smem(dh, u, eb, tc);
        CHECK(s.block.bytes == b.bytes);  // the block's own layout, unchanged
        CHECK(s.block.y_off == b.y_off);
        CHECK(s.x_off >= b.bytes);
        CHECK(s.x_off % 16 == 0);  // 16-byte exchange loads
        CHECK(s.bytes >= s.x_off + std::size_t(2) * sd::kBatchTile * u * eb);
        CHECK(s.bytes % sd::kSmemAlign == 0);
        // slice rows of u elements are whole 16-byte chunks
        CHECK((u * eb) % 16 == 0);
        // the 16-bit y tile's rows (ldy) are 16-byte aligned: the gather stores 16 bytes at once
        if (tc) CHECK((b.ldy * eb) % 16 == 0);
        // the backward: its block's layout, then [2][16][4U]; the dgates tile's rows (ldk) too
        const sd::BackwardClusterSmem bs = sd::backward_cluster_smem(dh, u, eb, tc);
        const sd::BackwardSmem bb = sd::backward_smem(dh, u, eb, tc);
        CHECK(bs.block.bytes == bb.bytes);
        CHECK(bs.block.dg_off == bb.dg_off);
        CHECK(bs.x_off >= bb.bytes);
        CHECK(bs.x_off % 16 == 0);
        CHECK(bs.bytes >= bs.x_off + std::size_t(2) * sd::kBatchTile * 4 * u * eb);
        CHECK(bs.bytes % sd::kSmemAlign == 0);
        if (tc) CHECK((bb.ldk * eb) % 16 == 0);
      }
    }
  }
  // the benchmark shape, bf16 DH 128: cluster 4 -> U 32, r slice 128 x 136 x 2 bytes
  const sd::ForwardClusterSmem s = sd::forward_cluster_smem(128, 32, 2, true);
  CHECK(s.bytes - s.x_off == 2 * 16 * 32 * 2);
}
