// A warp of 32 lanes on the host, to run lane-group device code under a host compiler:
// moxe::router::detail::LaneGroup<kLanes, EmulatedWarp> and the functions that take it use
// this class's static members wherever the device uses CUDA's intrinsics (CudaWarp).
//
// Each lane is a fiber (ucontext) with its own stack. The lanes run in lock-step from one
// warp primitive to the next: every lane must reach the same primitive (shuffle with the
// same offset, ballot, sync), as __*_sync(kFullMask, ...) requires on the device, or run()
// throws. Between two primitives the lanes run one after another in a fresh random order, so
// a lane reading what another wrote without a sync in between sees a stale value in some
// runs: a missing __syncwarp shows up as a wrong result.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace moxe::test {

class EmulatedWarp {
 public:
  static constexpr int kLanes = 32;

  // ---- the warp primitives (the members of router::detail::CudaWarp) --------------------

  /// threadIdx.x of the calling lane: the warp is the block's first, so its lane, 0..31.
  static unsigned thread_in_block() { return static_cast<unsigned>(active().lane_); }

  /// __shfl_xor_sync(kFullMask, x, offset): lane ^ offset's x.
  template <class A>
  static A shfl_xor(A x, int offset) {
    static_assert(std::is_trivially_copyable_v<A> && sizeof(A) <= sizeof(std::uint64_t), "a register value");
    std::uint64_t word = 0;
    std::memcpy(&word, &x, sizeof(A));
    EmulatedWarp& w = active();
    const Slot* slots = w.arrive(Op::shfl_xor, offset, static_cast<int>(sizeof(A)), word);
    A r;
    std::memcpy(&r, &slots[w.lane_ ^ offset].word, sizeof(A));
    return r;
  }

  /// __ballot_sync(kFullMask, p): bit l set when lane l's p holds.
  static unsigned ballot(bool p) {
    EmulatedWarp& w = active();
    const Slot* slots = w.arrive(Op::ballot, 0, 1, p ? 1u : 0u);
    unsigned bits = 0;
    for (int l = 0; l < kLanes; ++l) bits |= static_cast<unsigned>(slots[l].word & 1u) << l;
    return bits;
  }

  /// __syncwarp(): every lane arrives before any goes on.
  static void sync() { active().arrive(Op::sync, 0, 0, 0); }

  // ---- running a warp -------------------------------------------------------------------

  /// seed: the lanes' order between primitives.
  explicit EmulatedWarp(std::uint64_t seed, std::size_t stack_bytes = 256 * 1024)
      : order_rng_(seed), stack_bytes_(stack_bytes) {
    for (auto& s : stacks_) s = std::make_unique<char[]>(stack_bytes_);
    std::iota(order_.begin(), order_.end(), 0);
  }
  EmulatedWarp(const EmulatedWarp&) = delete;
  EmulatedWarp& operator=(const EmulatedWarp&) = delete;

  /// Runs body() once on each of the 32 lanes (each reads its lane with thread_in_block()), in
  /// lock-step; returns the number of warp primitives each lane went through. Throws
  /// std::logic_error when the lanes diverge. body must not throw.
  template <class Body>
  int run(Body&& body) {
    using B = std::remove_reference_t<Body>;
    body_ = static_cast<void*>(std::addressof(body));
    invoke_ = [](void* b) { (*static_cast<B*>(b))(); };
    struct Activation {
      EmulatedWarp* previous;
      ~Activation() { active_ = previous; }
    } activation{active_};
    active_ = this;
    for (int l = 0; l < kLanes; ++l) {
      done_[l] = false;
      getcontext(&lanes_[l]);
      lanes_[l].uc_stack.ss_sp = stacks_[l].get();
      lanes_[l].uc_stack.ss_size = stack_bytes_;
      lanes_[l].uc_link = &main_;
      makecontext(&lanes_[l], &EmulatedWarp::lane_entry, 0);
    }
    phase_ = 0;
    for (int steps = 0;; ++steps) {
      std::shuffle(order_.begin(), order_.end(), order_rng_);
      // each lane runs to its next primitive and passes on to the next lane in order (the
      // last one back here), or returns (back here too, and the next one goes on)
      for (pos_ = 0; pos_ < kLanes; ++pos_) {
        lane_ = order_[pos_];
        swapcontext(&main_, &lanes_[lane_]);
      }
      const int done = static_cast<int>(std::count(done_.begin(), done_.end(), true));
      if (done == kLanes) return steps;
      if (done > 0) throw std::logic_error("lanes diverged: some returned while others wait at a warp primitive");
      const Slot& first = slots_[phase_][0];
      for (int l = 1; l < kLanes; ++l) {
        const Slot& s = slots_[phase_][l];
        if (s.op != first.op || s.offset != first.offset || s.size != first.size)
          throw std::logic_error("lanes diverged at warp primitive " + std::to_string(steps) + ": lane " +
                                 std::to_string(l) + " differs from lane 0");
      }
      if (first.op == Op::shfl_xor && (first.offset < 0 || first.offset >= kLanes))
        throw std::logic_error("shfl_xor offset out of the warp");
      if (steps >= kMaxSteps) throw std::logic_error("more than kMaxSteps warp primitives: a runaway loop?");
      phase_ ^= 1;  // the lanes still to resume read this step's slots; the next step writes the others
    }
  }

 private:
  enum class Op { shfl_xor, ballot, sync };
  struct Slot {
    Op op;
    int offset, size;
    std::uint64_t word;
  };
  static constexpr int kMaxSteps = 1 << 20;

  static EmulatedWarp& active() {
    if (active_ == nullptr) throw std::logic_error("a warp primitive outside EmulatedWarp::run");
    return *active_;
  }

  static void lane_entry() {
    EmulatedWarp& w = *active_;
    w.invoke_(w.body_);
    w.done_[w.lane_] = true;  // then back to main_ (uc_link)
  }

  /// Deposits this lane's part of the primitive, waits for the others, and returns every
  /// lane's part.
  const Slot* arrive(Op op, int offset, int size, std::uint64_t word) {
    const int phase = phase_;
    const int me = lane_;
    slots_[phase][me] = Slot{op, offset, size, word};
    if (pos_ + 1 < kLanes) {
      lane_ = order_[++pos_];
      swapcontext(&lanes_[me], &lanes_[lane_]);
    } else {
      swapcontext(&lanes_[me], &main_);
    }
    return slots_[phase].data();
  }

  inline static thread_local EmulatedWarp* active_ = nullptr;

  std::mt19937_64 order_rng_;
  std::size_t stack_bytes_;
  std::array<std::unique_ptr<char[]>, kLanes> stacks_;
  std::array<ucontext_t, kLanes> lanes_{};
  ucontext_t main_{};
  std::array<int, kLanes> order_{};
  std::array<bool, kLanes> done_{};
  std::array<std::array<Slot, kLanes>, 2> slots_{};
  int phase_ = 0;
  int pos_ = 0;   // the running lane's place in order_
  int lane_ = 0;  // the running lane
  void* body_ = nullptr;
  void (*invoke_)(void*) = nullptr;
};

}  // namespace moxe::test
