// Host-only use of moxe: the references and the core compile with a plain C++ compiler.
#include <moxe/core/math.hpp>
#include <moxe/core/status.hpp>
#include <moxe/core/workspace.hpp>

#include <cstdio>

int main() {
  moxe::WorkspaceCarver sizing;
  sizing.carve<float>(10);
  const bool ok = sizing.required_bytes() >= 40 && moxe::math::sigmoid(0.0) == 0.5 &&
                  moxe::to_string(moxe::Status::ok)[0] == 'o';
  std::printf("consumer_host: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
