// Device use of moxe: the umbrella header compiles with nvcc in a consumer project.
#include <moxe/moxe.cuh>

int main() { return moxe::to_string(moxe::Status::ok)[0] == 'o' ? 0 : 1; }
