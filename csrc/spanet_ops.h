// Shared declarations of the spanet_ops native kernels.
//
// The kernels implement the `spanet` kernel ops whose schemas live in
// spanet_ops/ops.py; they register themselves with TORCH_LIBRARY_IMPL in the
// CPU (cpu/lowrank_cpu.cpp) and CUDA (cuda/kernels.cu) translation units.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace spanet {

// Argument checks shared by the CPU and CUDA kernels (TORCH_CHECK with a
// message naming the argument). Returns the number of mask planes P.
struct LowRankShape {
  int64_t n, height, width, k, l, planes;
};
LowRankShape check_lowrank_args(const at::Tensor& x, const at::Tensor& basis_h, const at::Tensor& basis_w,
                                const at::Tensor& weight, const at::Tensor& constant);

// Whether the extension was compiled with its CUDA kernels.
bool built_with_cuda();

// Why this build cannot run its CUDA kernels on a device of compute capability major.minor
// ("" when it can: SASS of a compatible architecture, or PTX the driver can compile for it).
std::string cuda_arch_problem(int major, int minor);

}  // namespace spanet
