// moxe_layer: one MoxE layer (arXiv 2505.01459) forward and backward on the HOST REFERENCE
// PATH, in double (the build without CUDA; main.cu adds the device path). See host_main.hpp.
//
//   ./moxe_layer            (no GPU needed)
//   ./moxe_layer --dump DIR (the tiny layers' numbers for benchmarks/compare_torch.py)
#include <cstdio>

#include "host_main.hpp"

int main(int argc, char** argv) {
  namespace ex = moxe_layer::host_example;
  const ex::Options o = ex::parse_options(argc, argv);
  if (!o.valid) return 2;
  if (!o.dump_dir.empty()) return ex::dump_cases(o.dump_dir);
  if (o.bench || !o.json_path.empty()) {
    std::fprintf(stderr, "moxe_layer: --bench and --json need the CUDA build and a device\n");
    return 2;
  }
  return ex::host_main();
}
