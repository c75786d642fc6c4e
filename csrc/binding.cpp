// The pybind11 module spanet_ops._C. Importing it loads this shared library, whose
// TORCH_LIBRARY_IMPL blocks (cpu/lowrank_cpu.cpp, cuda/kernels.cu) register the
// native kernels for the spanet kernel ops defined in spanet_ops/ops.py; the module
// itself only reports what was compiled in.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "spanet_ops.h"

#ifndef SPANET_CUDA_ARCHS
#define SPANET_CUDA_ARCHS ""
#endif
#ifndef SPANET_CUDA_REASON
#define SPANET_CUDA_REASON ""
#endif
#ifndef SPANET_BUILD_TYPE
#define SPANET_BUILD_TYPE ""
#endif

namespace spanet {
#ifndef SPANET_WITH_CUDA
bool built_with_cuda() { return false; }
#endif
}  // namespace spanet

PYBIND11_MODULE(_C, m) {
  m.doc() = "spanet_ops native kernels (CPU, and CUDA when compiled in); importing registers them.";
  m.def("has_cuda", &spanet::built_with_cuda, "Whether the CUDA kernels were compiled into the extension.");
  m.def(
      "build_info",
      [] {
        pybind11::dict info;
        info["cuda"] = spanet::built_with_cuda();
        info["cuda_reason"] = std::string(SPANET_CUDA_REASON);
        info["cuda_archs"] = std::string(SPANET_CUDA_ARCHS);
        info["build_type"] = std::string(SPANET_BUILD_TYPE);
#ifdef _OPENMP
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        return info;
      },
      "Build configuration: CUDA compiled in (and why not), CUDA architectures, build type, OpenMP.");
}
