# Reads the installed torch's include dirs, library dir, C++ standard and ABI flag.
execute_process(
  COMMAND "${Python3_EXECUTABLE}" "${CMAKE_CURRENT_LIST_DIR}/torch_info.py"
  OUTPUT_FILE "${CMAKE_BINARY_DIR}/torch_info.cmake"
  RESULT_VARIABLE _torch_info_rc
  ERROR_VARIABLE _torch_info_err)
if(NOT _torch_info_rc EQUAL 0)
  message(FATAL_ERROR "adaskip: could not query torch with ${Python3_EXECUTABLE}:\n${_torch_info_err}")
endif()
include("${CMAKE_BINARY_DIR}/torch_info.cmake")
if(NOT TORCH_CUDA_VERSION)
  message(FATAL_ERROR "adaskip: torch ${TORCH_VERSION} is a CPU-only build; the CUDA extension needs a CUDA build of torch")
endif()
message(STATUS "adaskip: torch ${TORCH_VERSION} (CUDA ${TORCH_CUDA_VERSION}), C++${TORCH_CXX_STANDARD}, cxx11 abi ${TORCH_CXX11_ABI}")
