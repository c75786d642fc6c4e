// The pybind11 module spanet_ops._C. Importing it loads this shared library, whose
// TORCH_LIBRARY_IMPL blocks (cpu/lowrank_cpu.cpp, cuda/kernels.cu) register the
// native kernels for the spanet kernel ops defined in spanet_ops/ops.py; the module
// itself only reports what was compiled in.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <vector>

#include "spanet_ops.h"

#ifndef SPANET_CUDA_ARCHS
#define SPANET_CUDA_ARCHS ""
#endif
#ifndef SPANET_CUDA_PTX
#define SPANET_CUDA_PTX ""
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

namespace {

std::vector<std::string> split_archs(const std::string& csv) {
  std::vector<std::string> out;
  std::stringstream stream(csv);
  for (std::string item; std::getline(stream, item, ',');) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// "90a" -> 90; the letter (a: this exact architecture only, f: its family) in *suffix.
int arch_number(const std::string& arch, char* suffix) {
  size_t digits = 0;
  while (digits < arch.size() && arch[digits] >= '0' && arch[digits] <= '9') ++digits;
  *suffix = digits < arch.size() ? arch[digits] : '\0';
  return std::stoi(arch.substr(0, digits));
}

}  // namespace

std::string cuda_arch_problem(int major, int minor) {
  if (!built_with_cuda()) {
    return std::string("the extension was built without its CUDA kernels (") + SPANET_CUDA_REASON + ")";
  }
  const int device = 10 * major + minor;
  // SASS runs on its own major version at an equal or higher minor (an "a" build only on
  // its exact architecture); PTX is compiled by the driver for any newer device.
  for (const std::string& arch : split_archs(SPANET_CUDA_ARCHS)) {
    char suffix = '\0';
    const int number = arch_number(arch, &suffix);
    if (suffix == 'a' ? number == device : number / 10 == major && number <= device) return "";
  }
  for (const std::string& arch : split_archs(SPANET_CUDA_PTX)) {
    char suffix = '\0';
    if (arch_number(arch, &suffix) <= device && suffix == '\0') return "";
  }
  std::string built = "sm_" + std::string(SPANET_CUDA_ARCHS);
  for (size_t i = 0; (i = built.find(',', i)) != std::string::npos; i += 5) built.replace(i, 1, ", sm_");
  if (*SPANET_CUDA_PTX) built += std::string(" and PTX for compute_") + SPANET_CUDA_PTX;
  return "spanet_ops._C has CUDA code for " + built + ", not for this device (sm_" + std::to_string(device) +
         "); rebuild it for the device with SPANET_CUDA_ARCHS=" + std::to_string(device) +
         " pip install --no-build-isolation -e .";
}
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
        info["cuda_ptx"] = std::string(SPANET_CUDA_PTX);
        info["build_type"] = std::string(SPANET_BUILD_TYPE);
#ifdef _OPENMP
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        return info;
      },
      "Build configuration: CUDA compiled in (and why not), CUDA architectures (SASS) and the PTX one, "
      "build type, OpenMP.");
  m.def("cuda_arch_problem", &spanet::cuda_arch_problem, pybind11::arg("major"), pybind11::arg("minor"),
        "Why the CUDA kernels cannot run on a device of compute capability major.minor; '' when they can.");
}
