// moxe_layer: one MoxE layer (arXiv 2505.01459) forward and backward on the HOST REFERENCE
// PATH, in double (the build without CUDA; main.cu adds the device path). See host_main.hpp.
//
//   ./moxe_layer            (no arguments; no GPU needed)
#include "host_main.hpp"

int main() { return moxe_layer::host_example::host_main(); }
