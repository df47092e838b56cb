// Host tests of the per-token sLSTM (every position a length-1 sequence from the zero
// state): against the sequence reference at seq_len 1 over the same memory (y, dwx,
// dbias, dr), and its checks.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "moxe/slstm/per_token.hpp"
#include "moxe/slstm/reference.hpp"
#include "slstm_testing.hpp"
#include "test_utils.hpp"

namespace sl = moxe::slstm;
namespace mt = moxe::test;
using moxe::Status;

namespace {

struct Data {
  sl::Dims dims;
  std::vector<double> wx, r, bias, dy;
  mt::SequenceInputs<double, double> inputs() const {
    mt::SequenceInputs<double, double> in{};
    in.dims = dims;
    in.wx = wx.data();
    in.r = r.data();
    in.bias = bias.data();
    in.dy = dy.data();
    return in;
  }
};

Data draw(mt::Rng& rng, sl::Dims d) {
  Data x;
  x.dims = d;
  const int64_t H = sl::hidden(d), positions = d.seq_len * d.batch;
  x.wx = mt::normal_vector<double>(rng, positions * 4 * H, 2.0);
  x.r = mt::normal_vector<double>(rng, d.heads * 4 * d.head_dim * d.head_dim);
  x.bias = mt::normal_vector<double>(rng, 4 * H, 0.5);
  x.dy = mt::normal_vector<double>(rng, positions * H);
  return x;
}

}  // namespace

TEST_CASE("per-token sLSTM equals the sequence reference at seq_len 1, forward and backward") {
  mt::Rng rng(mt::fresh_seed());
  const sl::Dims shapes[] = {{1, 1, 1, 1}, {3, 5, 2, 4}, {2, 7, 3, 16}, {5, 1, 1, 8}};
  for (const sl::Dims& d : shapes) {
    CAPTURE(d.seq_len);
    CAPTURE(d.batch);
    const Data x = draw(rng, d);
    const auto in = x.inputs();
    const int64_t H = sl::hidden(d), positions = d.seq_len * d.batch;
    std::vector<double> y = mt::poisoned<double>(positions * H), y_ref(y.size());
    REQUIRE(sl::reference::per_token_forward(mt::forward_params(in, y.data(), nullptr, nullptr, nullptr, nullptr)) ==
            Status::ok);
    // the sequence reference over the same memory seen as one step of S * B sequences
    auto seq = in;
    seq.dims = sl::Dims{1, positions, d.heads, d.head_dim};
    REQUIRE(sl::reference::forward(mt::forward_params(seq, y_ref.data(), nullptr, nullptr, nullptr, nullptr)) ==
            Status::ok);
    CHECK(mt::rel_error(y, y_ref) < 1e-14);

    std::vector<double> dwx = mt::poisoned<double>(positions * 4 * H), dr = mt::poisoned<double>(x.r.size()),
                        dbias = mt::poisoned<double>(4 * H);
    std::vector<double> dwx_ref(dwx.size()), dr_ref(dr.size()), dbias_ref(dbias.size());
    REQUIRE(sl::reference::per_token_backward(
                mt::backward_params(in, false, dwx.data(), dr.data(), dbias.data(), nullptr, nullptr, nullptr,
                                    nullptr)) == Status::ok);
    REQUIRE(sl::reference::backward(mt::backward_params(seq, false, dwx_ref.data(), dr_ref.data(), dbias_ref.data(),
                                                        nullptr, nullptr, nullptr, nullptr)) == Status::ok);
    CHECK(mt::rel_error(dwx, dwx_ref) < 1e-13);
    CHECK(mt::rel_error(dbias, dbias_ref) < 1e-13);
    for (double v : dr) CHECK(v == 0.0);
    for (double v : dr_ref) CHECK(v == 0.0);  // y_0 = 0: the reference agrees
  }
}

TEST_CASE("per-token sLSTM rejects states, and bad arguments, writing nothing") {
  mt::Rng rng(mt::fresh_seed());
  const sl::Dims d{2, 3, 2, 4};
  const Data x = draw(rng, d);
  auto in = x.inputs();
  const int64_t H = sl::hidden(d), positions = d.seq_len * d.batch;
  std::vector<double> state(d.batch * H, 0.0), y = mt::poisoned<double>(positions * H);
  auto with_init = in;
  with_init.y_init = with_init.c_init = with_init.n_init = with_init.m_init = state.data();
  CHECK(sl::reference::per_token_forward(mt::forward_params(with_init, y.data(), nullptr, nullptr, nullptr,
                                                            nullptr)) == Status::unsupported);
  CHECK(sl::reference::per_token_forward(mt::forward_params(in, y.data(), state.data(), state.data(), state.data(),
                                                            state.data())) == Status::unsupported);
  CHECK(sl::reference::per_token_forward(mt::forward_params(in, nullptr, nullptr, nullptr, nullptr, nullptr)) ==
        Status::invalid_argument);
  std::vector<double> tape = mt::poisoned<double>(7 * positions * H);  // the sequence path's tape
  auto with_tape = mt::forward_params(in, y.data(), nullptr, nullptr, nullptr, nullptr);
  with_tape.tape_gates = tape.data();
  with_tape.tape_c = tape.data() + 4 * positions * H;
  with_tape.tape_n = tape.data() + 5 * positions * H;
  with_tape.tape_m = tape.data() + 6 * positions * H;
  CHECK(sl::reference::per_token_forward(with_tape) == Status::unsupported);
  for (double v : tape) CHECK(std::isnan(v));
  for (double v : y) CHECK(std::isnan(v));
  std::vector<double> dwx = mt::poisoned<double>(positions * 4 * H), dr(x.r.size()), dbias(4 * H);
  CHECK(sl::reference::per_token_backward(mt::backward_params(in, false, dwx.data(), dr.data(), dbias.data(),
                                                              state.data(), state.data(), state.data(),
                                                              state.data())) == Status::unsupported);
  for (double v : dwx) CHECK(std::isnan(v));
}
