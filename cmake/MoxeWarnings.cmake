# Warning flags for moxe's own tests, benchmarks and examples (never for consumers).
option(MOXE_CUDA_LINEINFO "Compile moxe's own device code with -lineinfo (source lines in profilers)" ON)
add_library(moxe_warnings INTERFACE)
target_compile_options(moxe_warnings INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter>
  $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall -Xcompiler=-Wno-unused-parameter -Xptxas=-warn-spills>)
if(MOXE_CUDA_LINEINFO)
  target_compile_options(moxe_warnings INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:-lineinfo>)
endif()
