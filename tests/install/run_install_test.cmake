# Install moxe into a scratch prefix, then configure, build and run a consumer project
# that finds it with find_package(moxe).
file(REMOVE_RECURSE ${WORK_DIR})
set(prefix ${WORK_DIR}/prefix)

execute_process(COMMAND ${CMAKE_COMMAND} --install ${MOXE_BINARY_DIR} --prefix ${prefix}
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "install failed: ${rc}")
endif()

execute_process(COMMAND ${CMAKE_COMMAND} -S ${MOXE_SOURCE_DIR}/tests/install/consumer
                        -B ${WORK_DIR}/build -G ${GENERATOR}
                        -DCMAKE_PREFIX_PATH=${prefix} -DWITH_CUDA=${WITH_CUDA}
                        -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "consumer configure failed: ${rc}")
endif()

execute_process(COMMAND ${CMAKE_COMMAND} --build ${WORK_DIR}/build RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "consumer build failed: ${rc}")
endif()

execute_process(COMMAND ${WORK_DIR}/build/consumer_host RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "consumer_host failed: ${rc}")
endif()
message(STATUS "consumer built against the installed moxe (CUDA: ${WITH_CUDA})")
