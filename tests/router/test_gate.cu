// Device tests of the fused gate: forward and backward against the double reference (float,
// bf16 and half logits), the backward both from the forward's totals and without them,
// determinism, the forward's two-level finish rebuilt bit for bit on the host from the
// workspace's block partials, poisoned outputs, token counts that are not multiples of any
// block size, T = 1, grid-stride coverage, misaligned workspaces, a too small workspace,
// graph capture (replayed twice: the tickets), bad arguments.
// Small-size mode (MOXE_TEST_SMALL, the simulator) keeps every case, dtype, modulation, row
// shape and top-k algorithm, T = 1 and multi-block grids, with fewer tokens; the grid-stride
// pass runs once (float) at the smallest size that reaches it, T = 4097 at E = 129.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "device_utils.cuh"
#include "moxe/router/gate.cuh"
#include "moxe/router/reference.hpp"
#include "router_problem.hpp"
#include "test_utils.hpp"

using moxe::Status;
using moxe::router::Modulation;
namespace mt = moxe::test;

namespace {

template <class T>
struct DeviceGate {
  moxe::router::GateDims dims;
  mt::DeviceBuffer<T> logits, difficulty_logit, dlogits, ddifficulty;
  mt::DeviceBuffer<float> probs, lse, entropy, difficulty, topk_prob, topk_weight, losses, dweight, totals;
  mt::DeviceBuffer<int32_t> topk_idx, expert_counts;
  bool head;
  Modulation modulation;
  float gamma, tau;
  bool use_totals = true;  // GateForwardParams::totals: the forward writes them, the backward reads them

  explicit DeviceGate(const mt::GateProblem& g)
      : dims(g.dims),
        logits(mt::convert_to<T>(g.logits)),
        difficulty_logit(mt::convert_to<T>(g.difficulty_logit)),
        dlogits(g.logits.size()),
        ddifficulty(g.difficulty_logit.size()),
        probs(g.logits.size()),
        lse(dims.tokens),
        entropy(dims.tokens),
        difficulty(dims.tokens),
        topk_prob(dims.tokens * dims.top_k),
        topk_weight(dims.tokens * dims.top_k),
        losses(4),
        dweight(mt::convert_to<float>(g.dweight)),
        totals(g.dims.experts + 4),
        topk_idx(dims.tokens * dims.top_k),
        expert_counts(dims.experts),
        head(g.head),
        modulation(g.modulation),
        gamma(float(g.gamma)),
        tau(float(g.tau)) {
    poison();
  }

  void poison() {
    probs.poison(); lse.poison(); entropy.poison(); difficulty.poison(); topk_prob.poison();
    topk_weight.poison(); losses.poison(); topk_idx.poison(); expert_counts.poison();
    dlogits.poison(); ddifficulty.poison(); totals.poison();
  }

  moxe::router::GateForwardParams<T, float> fwd() const {
    auto p = mt::gate_forward_params<moxe::router::GateForwardParams<T, float>>(*this,
                                                                                [](const auto& b) { return b.get(); });
    p.totals = use_totals ? totals.get() : nullptr;
    return p;
  }

  moxe::router::GateBackwardParams<T, float> bwd(const mt::GateProblem& g) const {
    moxe::router::GateBackwardParams<T, float> b{};
    b.fwd = fwd();
    b.dweight = dweight.get();
    b.c_z = float(g.c_z);
    b.c_lb = float(g.c_lb);
    b.c_d = float(g.c_d);
    b.c_g = float(g.c_g);
    b.dlogits = dlogits.get();
    b.ddifficulty_logit = head ? ddifficulty.get() : nullptr;
    return b;
  }

  Status forward(cudaStream_t stream = nullptr, std::size_t offset = 1) {
    const auto p = fwd();
    mt::MisalignedWorkspace ws(moxe::router::gate_forward_workspace_size(p), offset);
    return moxe::router::gate_forward(p, ws.get(), ws.bytes(), stream);
  }
  Status backward(const mt::GateProblem& g, cudaStream_t stream = nullptr) {
    const auto b = bwd(g);
    mt::MisalignedWorkspace ws(moxe::router::gate_backward_workspace_size(b));
    return moxe::router::gate_backward(b, ws.get(), ws.bytes(), stream);
  }
};

template <class T>
double output_tolerance() { return std::is_same_v<T, float> ? 1e-4 : (std::is_same_v<T, __half> ? 2e-3 : 1e-2); }

/// The losses against the double reference: relative 1e-4, and L_g also 64 u absolute
/// (u = 2^-24). L_g = sum_g P_g log(2 P_g + eps) is ~2 (P_m - 1/2)^2 while each summand is
/// ~+-(P_m - 1/2), so near balanced groups (no modulation, large T: P_m -> 1/2) the value
/// cancels and its float error does not shrink with it: |dL_g| <= sum_g |1 + log 2P_g| |dP_g|
/// + P_g |d log|, where each token's group mass exp(lse_g - lse) carries ~30 u of relative
/// error (roundings of lse's of size <~ 10 at these logits) and its float sum a few u more,
/// and P |1 + log 2P| <= 1.7 P: |dL_g| <~ 55 u however small L_g is. The others do not
/// cancel so: L_z and L_d are means of squares of float values, and L_lb's u_e sum to the
/// mean top-k mass / K, well below sum_e 1/E = 1 for these logits.
void check_losses(const std::vector<float>& got, const std::vector<double>& want) {
  for (int i = 0; i < 4; ++i) {
    CAPTURE(i);
    CAPTURE(got[i]);
    CAPTURE(want[i]);
    const double allowed = 1e-4 * std::abs(want[i]) + (i == 3 ? 64 * 0x1p-24 : 1e-10);
    CHECK(std::abs(got[i] - want[i]) <= allowed);
  }
}

/// large_difficulty: difficulty logits in [10, 18], where sigmoid'(a) from the rounded
/// d = sigmoid(a) has lost its digits.
template <class T>
void check_against_reference(mt::Rng& rng, int64_t tokens, int experts, int mlstm_experts, int top_k, Modulation m,
                             bool head = true, bool large_difficulty = false) {
  CAPTURE(large_difficulty);
  CAPTURE(tokens);
  CAPTURE(experts);
  CAPTURE(mlstm_experts);
  CAPTURE(top_k);
  CAPTURE(int(m));
  CAPTURE(head);
  auto draw = [&] {
    mt::GateProblem g(rng, tokens, experts, mlstm_experts, top_k, m, head, 2.0);
    if (large_difficulty)
      for (double& a : g.difficulty_logit) a = rng.uniform(10.0, 18.0);
    // inputs on a bf16 grid; redraw when a selection is a near-tie float could order differently
    g.logits = mt::round_through<__nv_bfloat16>(g.logits);
    g.difficulty_logit = mt::round_through<T>(g.difficulty_logit);
    g.totals.assign(experts + 4, NAN);
    REQUIRE(g.forward() == Status::ok);
    return g;
  };
  mt::GateProblem g = draw();
  while (g.near_tie(1e-5)) g = draw();
  DeviceGate<T> dev(g);
  REQUIRE(dev.forward() == Status::ok);
  const auto idx = dev.topk_idx.download();
  CHECK(idx == g.topk_idx);
  CHECK(dev.expert_counts.download() == g.expert_counts);
  CHECK(mt::rel_error(dev.probs.download(), g.probs) < 1e-5);
  CHECK(mt::rel_error(dev.lse.download(), g.lse) < 1e-5);
  CHECK(mt::rel_error(dev.entropy.download(), g.entropy) < 1e-5);
  CHECK(mt::rel_error(dev.difficulty.download(), g.difficulty) < 1e-6);
  CHECK(mt::rel_error(dev.topk_prob.download(), g.topk_prob) < 1e-5);
  CHECK(mt::rel_error(dev.topk_weight.download(), g.topk_weight) < 1e-5);
  check_losses(dev.losses.download(), g.losses);
  const auto totals = dev.totals.download();  // loads, lse^2, (d - H)^2 and the masses: sums of float values
  CHECK(mt::rel_error(std::vector<float>(totals.begin(), totals.begin() + experts), 
                      std::vector<double>(g.totals.begin(), g.totals.begin() + experts)) < 1e-5);
  for (int i = experts; i < experts + 4; ++i) {
    CAPTURE(i);
    CHECK(std::abs(totals[i] - g.totals[i]) <= 1e-5 * std::abs(g.totals[i]) + 1e-6 * double(tokens));
  }

  // the backward twice: with the forward's totals (one launch), then without (the batch sums
  // again from the saved top-k and the logits)
  std::vector<double> dz(g.logits.size()), da(tokens);
  REQUIRE(moxe::router::reference::gate_backward(g.backward_params(dz, da)) == Status::ok);
  for (bool use_totals : {true, false}) {
    CAPTURE(use_totals);
    dev.use_totals = use_totals;
    dev.dlogits.poison();
    dev.ddifficulty.poison();
    REQUIRE(dev.backward(g) == Status::ok);
    CHECK(mt::rel_error(mt::convert_to_double(dev.dlogits.download()), dz) < output_tolerance<T>());
    if (head) CHECK(mt::rel_error(mt::convert_to_double(dev.ddifficulty.download()), da) < output_tolerance<T>());
  }
}

}  // namespace

TEST_CASE_TEMPLATE("gate device forward and backward match the reference", T, float, __nv_bfloat16) {
  mt::Rng rng(mt::fresh_seed());
  for (Modulation m : {Modulation::none, Modulation::standard, Modulation::proportional, Modulation::masked})
    check_against_reference<T>(rng, 37, 8, 4, 2, m);
  check_against_reference<T>(rng, 1, 2, 1, 1, Modulation::standard);  // T = 1
  check_against_reference<T>(rng, 7, 1, 0, 1, Modulation::standard);  // E = 1: H = 0, p = 1, an sLSTM group only
  check_against_reference<T>(rng, 5, 1, 1, 1, Modulation::masked);     // E = 1 in the mLSTM group
  check_against_reference<T>(rng, 19, 33, 17, 3, Modulation::masked);  // the (16, 4) shape's smallest E
  check_against_reference<T>(rng, 129, 4, 2, 1, Modulation::standard, false);
  check_against_reference<T>(rng, 77, 30, 12, 9, Modulation::masked);   // threshold top-k, 8 lanes
  // E > 32: 8 tokens a block, so the small sizes still span several blocks, the last partial
  check_against_reference<T>(rng, mt::size<int64_t>(203, 43), 64, 32, 8, Modulation::standard);
  check_against_reference<T>(rng, mt::size<int64_t>(65, 21), 64, 0, 32, Modulation::proportional);
  check_against_reference<T>(rng, mt::size<int64_t>(50, 21), 200, 100, 2, Modulation::standard);
  check_against_reference<T>(rng, mt::size<int64_t>(33, 17), 256, 128, 16, Modulation::standard);
  check_against_reference<T>(rng, 21, 512, 511, 4, Modulation::masked);
  check_against_reference<T>(rng, 9, 1000, 500, 32, Modulation::standard);
}

// More tokens than the capped grids cover in one pass (detail::gate_max_blocks: 1024 blocks
// x 8 tokens for E <= 128, 512 x 8 above), so the grid-stride loops and the prefetch of a
// next token run. Small mode: float, one token past the 512 x 8 pass at E = 129, the
// cheapest shape that loops (~5e8 simulated instructions; bf16 differs only in its loads).
TEST_CASE_TEMPLATE("gate device: more tokens than the capped grid covers in one pass", T, float, __nv_bfloat16) {
  mt::Rng rng(mt::fresh_seed());
  if (mt::small_sizes()) {
    if (std::is_same_v<T, float>) check_against_reference<T>(rng, 4096 + 1, 129, 64, 2, Modulation::standard);
    return;
  }
  check_against_reference<T>(rng, 8192 + 808, 64, 32, 2, Modulation::standard);
  check_against_reference<T>(rng, 4096 + 99, 200, 100, 2, Modulation::standard);
}

TEST_CASE_TEMPLATE("gate device: difficulty logits near saturation (sigmoid' from a)", T, float, __nv_bfloat16) {
  mt::Rng rng(mt::fresh_seed());
  check_against_reference<T>(rng, 37, 8, 4, 2, Modulation::standard, true, /*large_difficulty=*/true);
  check_against_reference<T>(rng, 45, 64, 32, 4, Modulation::proportional, true, /*large_difficulty=*/true);
}

TEST_CASE("gate device with half logits") {
  mt::Rng rng(mt::fresh_seed());
  check_against_reference<__half>(rng, 100, 16, 8, 2, Modulation::standard);
}

TEST_CASE("gate device: two runs give the same bits") {
  mt::Rng rng(mt::fresh_seed());
  mt::GateProblem g(rng, mt::size<int64_t>(3001, 77), 64, 32, 8, Modulation::standard);  // small: 10 blocks
  DeviceGate<__nv_bfloat16> dev(g);
  REQUIRE(dev.forward() == Status::ok);
  REQUIRE(dev.backward(g) == Status::ok);
  const auto losses = dev.losses.download();
  const auto totals = dev.totals.download();
  const auto counts = dev.expert_counts.download();
  const auto probs = dev.probs.download();
  const auto dz = dev.dlogits.download();
  const auto da = dev.ddifficulty.download();
  dev.poison();
  REQUIRE(dev.forward() == Status::ok);
  REQUIRE(dev.backward(g) == Status::ok);
  CHECK(std::memcmp(losses.data(), dev.losses.download().data(), 4 * sizeof(float)) == 0);
  CHECK(std::memcmp(totals.data(), dev.totals.download().data(), totals.size() * sizeof(float)) == 0);
  CHECK(counts == dev.expert_counts.download());
  CHECK(std::memcmp(probs.data(), dev.probs.download().data(), probs.size() * sizeof(float)) == 0);
  const auto dz2 = dev.dlogits.download();
  const auto da2 = dev.ddifficulty.download();
  CHECK(std::memcmp(dz.data(), dz2.data(), dz.size() * sizeof(dz[0])) == 0);
  CHECK(std::memcmp(da.data(), da2.data(), da.size() * sizeof(da[0])) == 0);
}

// The forward's finish (detail::gate_forward_kernel): the last block of each group of
// kFinishGroup blocks adds its group's rows of partials in block order, the last group
// finisher adds the group rows in group order. Here the same order on the host, in float,
// from the partials the blocks left in the workspace: the totals, counts and the losses that
// follow from them alone must match to the bit, whichever blocks finished last.
TEST_CASE("gate device: the finish adds the block partials in block order (bits)") {
  namespace rd = moxe::router::detail;
  mt::Rng rng(mt::fresh_seed());
  struct Case { int64_t tokens; int experts; };
  // several groups, the last one partial: E = 64 has 16 tokens a block, E = 8 64, E = 100 8
  const std::vector<Case> cases = mt::small_sizes()
      ? std::vector<Case>{{16 * 40 + 5, 64}, {64 * 33 + 1, 8}, {17, 100}}
      : std::vector<Case>{{65536, 64}, {65536 + 3, 8}, {8 * 700 + 1, 100}};
  for (const Case& c : cases) {
    CAPTURE(c.tokens);
    CAPTURE(c.experts);
    mt::GateProblem g(rng, c.tokens, c.experts, c.experts / 2, 2, Modulation::standard);
    DeviceGate<float> dev(g);
    const auto p = dev.fwd();
    mt::MisalignedWorkspace ws(moxe::router::gate_forward_workspace_size(p), 5);
    REQUIRE(moxe::router::gate_forward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
    MOXE_TEST_CUDA(cudaDeviceSynchronize());
    moxe::WorkspaceCarver carver(ws.get(), ws.bytes());
    const rd::GateForwardScratch sc = rd::carve_gate_forward(carver, p.dims);
    REQUIRE(carver.fits());
    const int E = c.experts, W = E + rd::kGateScalars;
    if (c.experts == 100) CHECK(sc.groups == 1);
    else CHECK(sc.groups >= 2);
    if (mt::small_sizes()) CHECK(sc.blocks % rd::kFinishGroup != 0);  // a partial last group
    std::vector<float> part(std::size_t(sc.blocks) * W);
    std::vector<int32_t> cpart(std::size_t(sc.blocks) * E);
    MOXE_TEST_CUDA(cudaMemcpy(part.data(), sc.partials, part.size() * sizeof(float), cudaMemcpyDeviceToHost));
    MOXE_TEST_CUDA(cudaMemcpy(cpart.data(), sc.count_partials, cpart.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));
    std::vector<float> want(W, 0.f);
    std::vector<int32_t> want_counts(E, 0);
    for (int gi = 0; gi < sc.groups; ++gi) {
      const int first = gi * rd::kFinishGroup, rows = std::min(rd::kFinishGroup, sc.blocks - first);
      for (int col = 0; col < W; ++col) {
        float acc = 0.f;
        for (int r = 0; r < rows; ++r) acc += part[std::size_t(first + r) * W + col];
        want[col] += acc;  // group rows in group order (the first: 0 + acc, exact)
      }
      for (int col = 0; col < E; ++col) {
        int32_t acc = 0;
        for (int r = 0; r < rows; ++r) acc += cpart[std::size_t(first + r) * E + col];
        want_counts[col] += acc;
      }
    }
    const auto totals = dev.totals.download();
    CHECK(std::memcmp(totals.data(), want.data(), W * sizeof(float)) == 0);
    CHECK(dev.expert_counts.download() == want_counts);
    const auto losses = dev.losses.download();
    const float inv_t = 1.f / static_cast<float>(c.tokens);
    const float lz = want[E] * inv_t, ld = want[E + 1] * inv_t;
    CHECK(std::memcmp(&losses[0], &lz, sizeof(float)) == 0);
    CHECK(std::memcmp(&losses[2], &ld, sizeof(float)) == 0);
  }
}

TEST_CASE("gate device: loss coefficients read from device memory give the scalars' bits") {
  mt::Rng rng(mt::fresh_seed());
  // c_g = 0 through memory must still be exact (without totals: the mass pass runs)
  for (bool use_totals : {true, false})
  for (double c_g : {0.01, 0.0}) {
    CAPTURE(use_totals);
    CAPTURE(c_g);
    mt::GateProblem g(rng, mt::size<int64_t>(777, 77), 16, 8, 2, Modulation::standard);  // small: 3 blocks
    g.c_g = c_g;
    DeviceGate<__nv_bfloat16> dev(g);
    dev.use_totals = use_totals;
    REQUIRE(dev.forward() == Status::ok);
    REQUIRE(dev.backward(g) == Status::ok);
    const auto dz = dev.dlogits.download();
    const auto da = dev.ddifficulty.download();
    dev.dlogits.poison();
    dev.ddifficulty.poison();
    mt::DeviceBuffer<float> coefficients(std::vector<float>{float(g.c_z), float(g.c_lb), float(g.c_d), float(g.c_g)});
    auto b = dev.bwd(g);
    b.c_z = b.c_lb = b.c_d = b.c_g = std::nanf("");  // ignored when loss_grad is set
    b.loss_grad = coefficients.get();
    mt::MisalignedWorkspace ws(moxe::router::gate_backward_workspace_size(b));
    REQUIRE(moxe::router::gate_backward(b, ws.get(), ws.bytes(), nullptr) == Status::ok);
    const auto dz2 = dev.dlogits.download();
    const auto da2 = dev.ddifficulty.download();
    CHECK(std::memcmp(dz.data(), dz2.data(), dz.size() * sizeof(dz[0])) == 0);
    CHECK(std::memcmp(da.data(), da2.data(), da.size() * sizeof(da[0])) == 0);
  }
}

TEST_CASE("gate device: strided logits with the difficulty column in the same matrix") {
  mt::Rng rng(mt::fresh_seed());
  mt::GateProblem g(rng, 45, 8, 4, 2, Modulation::standard);
  g.logits = mt::round_through<__nv_bfloat16>(g.logits);
  g.difficulty_logit = mt::round_through<__nv_bfloat16>(g.difficulty_logit);
  REQUIRE(g.forward() == Status::ok);
  std::vector<double> packed(45 * 9);
  for (int t = 0; t < 45; ++t) {
    for (int e = 0; e < 8; ++e) packed[t * 9 + e] = g.logits[t * 8 + e];
    packed[t * 9 + 8] = g.difficulty_logit[t];
  }
  DeviceGate<__nv_bfloat16> dev(g);
  mt::DeviceBuffer<__nv_bfloat16> dpacked(mt::convert_to<__nv_bfloat16>(packed));
  auto p = dev.fwd();
  p.logits = dpacked.get();
  p.logits_stride = 9;
  p.difficulty_logit = dpacked.get() + 8;
  p.difficulty_stride = 9;
  mt::MisalignedWorkspace ws(moxe::router::gate_forward_workspace_size(p));
  REQUIRE(moxe::router::gate_forward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
  CHECK(mt::rel_error(dev.probs.download(), g.probs) < 1e-5);
  CHECK(dev.topk_idx.download() == g.topk_idx);
}

TEST_CASE("gate device: graph capture replays the same results") {
  mt::Rng rng(mt::fresh_seed());
  mt::GateProblem g(rng, mt::size<int64_t>(300, 41), 64, 32, 2, Modulation::standard);  // small: 6 blocks
  DeviceGate<float> dev(g);
  REQUIRE(dev.forward() == Status::ok);
  const auto losses = dev.losses.download();
  dev.poison();
  cudaStream_t stream;
  MOXE_TEST_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const auto p = dev.fwd();
  mt::MisalignedWorkspace ws(moxe::router::gate_forward_workspace_size(p));
  cudaGraph_t graph;
  MOXE_TEST_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  const Status s = moxe::router::gate_forward(p, ws.get(), ws.bytes(), stream);
  MOXE_TEST_CUDA(cudaStreamEndCapture(stream, &graph));
  REQUIRE(s == Status::ok);
  cudaGraphExec_t exec;
  MOXE_TEST_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 2; ++replay) {  // the second one finds the tickets the first one left
    CAPTURE(replay);
    dev.losses.poison();
    MOXE_TEST_CUDA(cudaGraphLaunch(exec, stream));
    MOXE_TEST_CUDA(cudaStreamSynchronize(stream));
    CHECK(std::memcmp(losses.data(), dev.losses.download().data(), 4 * sizeof(float)) == 0);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

TEST_CASE("gate device: bad arguments and a small workspace launch nothing") {
  mt::Rng rng(mt::fresh_seed());
  mt::GateProblem g(rng, 10, 8, 4, 2, Modulation::standard);
  DeviceGate<float> dev(g);
  const auto p = dev.fwd();
  const std::size_t bytes = moxe::router::gate_forward_workspace_size(p);
  mt::MisalignedWorkspace ws(bytes);
  CHECK(moxe::router::gate_forward(p, ws.get(), bytes / 2, nullptr) == Status::workspace_too_small);
  auto q = p; q.dims.top_k = 9;
  CHECK(moxe::router::gate_forward(q, ws.get(), bytes, nullptr) == Status::invalid_argument);
  q = p; q.dims.mlstm_experts = 9;
  CHECK(moxe::router::gate_forward(q, ws.get(), bytes, nullptr) == Status::invalid_argument);
  q = p; q.dims.tokens = 0;
  CHECK(moxe::router::gate_forward(q, ws.get(), bytes, nullptr) == Status::invalid_argument);
  q = p; q.topk_weight = nullptr;
  CHECK(moxe::router::gate_forward(q, ws.get(), bytes, nullptr) == Status::invalid_argument);
  auto b = dev.bwd(g);
  b.dlogits = nullptr;
  CHECK(moxe::router::gate_backward(b, ws.get(), bytes, nullptr) == Status::invalid_argument);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  const auto losses = dev.losses.download();
  CHECK(std::all_of(losses.begin(), losses.end(), [](float x) { return std::isnan(x); }));
  const auto counts = dev.expert_counts.download();
  CHECK(std::all_of(counts.begin(), counts.end(), [](int32_t c) { return c == -1; }));
  const auto totals = dev.totals.download();
  CHECK(std::all_of(totals.begin(), totals.end(), [](float x) { return std::isnan(x); }));
  // the backward given the forward's totals needs no workspace; without them it does
  CHECK(moxe::router::gate_backward_workspace_size(dev.bwd(g)) == 0);
  auto recompute = dev.bwd(g);
  recompute.fwd.totals = nullptr;
  CHECK(moxe::router::gate_backward_workspace_size(recompute) > 0);
  CHECK(moxe::router::gate_backward(recompute, nullptr, 0, nullptr) == Status::workspace_too_small);
  moxe::router::GateForwardParams<float, float> big = p;
  big.dims.experts = 2048;
  big.dims.mlstm_experts = 0;
  CHECK(moxe::router::gate_forward(big, ws.get(), bytes, nullptr) == Status::unsupported);
}

TEST_CASE("gate device: the optional outputs may be null") {
  mt::Rng rng(mt::fresh_seed());
  mt::GateProblem g(rng, mt::size<int64_t>(99, 41), 64, 32, 4, Modulation::masked);
  g.logits = mt::round_through<__nv_bfloat16>(g.logits);
  REQUIRE(g.forward() == Status::ok);
  DeviceGate<float> dev(g);
  auto p = dev.fwd();
  p.probs = nullptr;
  p.lse = nullptr;
  p.entropy = nullptr;
  p.difficulty = nullptr;
  mt::MisalignedWorkspace ws(moxe::router::gate_forward_workspace_size(p), 3);
  REQUIRE(moxe::router::gate_forward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
  if (!g.near_tie(1e-5)) CHECK(dev.topk_idx.download() == g.topk_idx);
  check_losses(dev.losses.download(), g.losses);
  auto b = dev.bwd(g);
  b.fwd = p;
  b.dweight = nullptr;  // null: zero
  mt::MisalignedWorkspace wb(moxe::router::gate_backward_workspace_size(b));
  REQUIRE(moxe::router::gate_backward(b, wb.get(), wb.bytes(), nullptr) == Status::ok);
  std::vector<double> dz(g.logits.size()), da(g.dims.tokens);
  auto rb = g.backward_params(dz, da);
  rb.dweight = nullptr;
  REQUIRE(moxe::router::reference::gate_backward(rb) == Status::ok);
  CHECK(mt::rel_error(dev.dlogits.download(), dz) < 1e-4);
  CHECK(mt::rel_error(dev.ddifficulty.download(), da) < 1e-4);
}

TEST_CASE("gate device: a NaN or +inf logit routes to K distinct experts in range (no fault)") {
  // such a row's probabilities are NaN; before the fix every argmax round lost to the
  // (-inf, INT_MAX) sentinel and the kernel indexed its shared histogram with INT_MAX
  mt::Rng rng(mt::fresh_seed());
  for (int E : {8, 30, 64, 1000})
    for (int K : {2, 9}) {
      if (K > E) continue;
      CAPTURE(E);
      CAPTURE(K);
      mt::GateProblem g(rng, 19, E, E / 2, K, Modulation::standard);
      g.logits[0] = NAN;
      g.logits[3 * E + E - 1] = INFINITY;
      DeviceGate<__nv_bfloat16> dev(g);
      REQUIRE(dev.forward() == Status::ok);
      MOXE_TEST_CUDA(cudaDeviceSynchronize());
      const auto idx = dev.topk_idx.download();
      for (int k = 0; k < K; ++k) {  // rows 0 and 3 are all NaN: the lowest indices, as in the reference
        CHECK(idx[k] == k);
        CHECK(idx[3 * K + k] == k);
      }
      for (int t = 0; t < 19; ++t) {
        std::vector<int32_t> sel(idx.begin() + t * K, idx.begin() + (t + 1) * K);
        for (int32_t e : sel) CHECK((e >= 0 && e < E));
        std::sort(sel.begin(), sel.end());
        CHECK(std::adjacent_find(sel.begin(), sel.end()) == sel.end());
      }
      const auto counts = dev.expert_counts.download();
      int64_t routed = 0;
      for (int32_t c : counts) routed += c;
      CHECK(routed == 19 * K);
    }
}

TEST_CASE("gate device backward skips -1 and corrupt top-k slots, as the reference") {
  mt::Rng rng(mt::fresh_seed());
  for (int E : {6, 64}) {
    CAPTURE(E);
    mt::GateProblem g(rng, 29, E, E / 2, 3, Modulation::standard, true, 2.0);
    REQUIRE(g.forward() == Status::ok);
    DeviceGate<float> dev(g);
    dev.use_totals = false;  // the loads from the edited slots, as the reference (the forward's totals would not be)
    REQUIRE(dev.forward() == Status::ok);
    // drop slots after the forward: -1 (not routed) and corrupt indices far out of range
    auto idx = dev.topk_idx.download();
    for (std::size_t i = 0; i < idx.size(); i += 4) idx[i] = -1;
    for (std::size_t i = 2; i < idx.size(); i += 7) idx[i] = (i % 2) ? E + 100000 : -100000;
    g.topk_idx.assign(idx.begin(), idx.end());
    dev.topk_idx.upload(idx);
    dev.dlogits.poison();
    dev.ddifficulty.poison();
    REQUIRE(dev.backward(g) == Status::ok);
    std::vector<double> dz(g.logits.size()), da(g.dims.tokens);
    REQUIRE(moxe::router::reference::gate_backward(g.backward_params(dz, da)) == Status::ok);
    CHECK(mt::rel_error(mt::convert_to_double(dev.dlogits.download()), dz) < 1e-4);
    CHECK(mt::rel_error(mt::convert_to_double(dev.ddifficulty.download()), da) < 1e-4);
  }
}
