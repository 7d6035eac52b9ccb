#!/usr/bin/env bash
# Build dit_sample with CMake and run its ctest; `make test` calls this with the venv's python.
#   tests/cpp/build_and_run.sh PYTHON
# Skips, saying why, where it cannot build: without cmake or a C++ compiler, and with a CUDA
# build of torch whose CMake package cannot find a complete CUDA toolkit (it refuses to load
# then, though dit_sample compiles no CUDA code itself). Any other failure fails.
set -euo pipefail
python=$1
if ! command -v cmake >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then
  echo "skipped: the C++ sampler (CMakeLists.txt) needs cmake and a C++ compiler"
  exit 0
fi
configure() {
  mkdir -p build
  cmake -S . -B build -DPython3_EXECUTABLE="$python" >build/configure.log 2>&1
}
configured=true
configure || configured=false
if ! $configured && grep -q "This build directory links the torch" build/configure.log; then
  # Configured before for another Python's torch (CMake keeps its paths): start this one afresh.
  echo "build/ was configured for another torch; configuring it afresh for $python"
  rm -rf build
  configured=true
  configure || configured=false
fi
if ! $configured; then
  cuda=$("$python" -c "import torch; print(torch.version.cuda or '')")
  if [[ -n $cuda ]]; then
    echo "skipped: the C++ sampler: this torch is built for CUDA $cuda, and CMake finds no complete CUDA toolkit" \
         "to link against it (set CUDA_TOOLKIT_ROOT_DIR or CUDA_HOME); see build/configure.log"
    exit 0
  fi
  cat build/configure.log
  exit 1
fi
cmake --build build -j 2
ctest --test-dir build --output-on-failure
