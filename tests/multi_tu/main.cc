// A program of two translation units that both include every public moxe header (and a
// third set of objects, one per header, from the header self-containment check): it must
// link, with and without relocatable device code, and run. A kernel, function or variable
// defined in a header without `inline` or a template would be defined twice and fail the
// link. Compiled as CUDA (MOXE_MULTI_TU_DEVICE) or, for the .hpp headers, as plain C++.
// (the generated wrapper that compiles this file includes every public header first)
#include "instantiate.inc"

int second_translation_unit();

int main() {
  int bad = moxe_multi_tu::exercise_references();
#if defined(MOXE_MULTI_TU_DEVICE)
  bad += moxe_multi_tu::exercise_launchers();
#endif
  bad += second_translation_unit();
  std::printf("multi-TU program: %s\n", bad == 0 ? "linked and ran" : "unexpected statuses");
  return bad == 0 ? 0 : 1;
}
