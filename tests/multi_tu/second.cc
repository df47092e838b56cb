// The second translation unit of the multi-TU programs (see main.cc).
// (the generated wrapper that compiles this file includes every public header first)
#include "instantiate.inc"

int second_translation_unit() {
  int bad = moxe_multi_tu::exercise_references();
#if defined(MOXE_MULTI_TU_DEVICE)
  bad += moxe_multi_tu::exercise_launchers();
#endif
  return bad;
}
