// Shared declarations of the spanet_ops native kernels.
//
// The kernels implement the `spanet` kernel ops whose schemas live in
// spanet_ops/ops/kernels.py; they register themselves with TORCH_LIBRARY_IMPL in
// their translation units (cpu/lowrank_cpu.cpp, spg.cpp, cuda/kernels.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace spanet {

// The arguments of lowrank_filter_kernel after x: the factored bases of the plan
// (spanet_ops.plans.Factors) and the per-plane weights (P, K, L) and constants (P,).
struct LowRankArgs {
  const at::Tensor& row_factors;  // (R, H) distinct rows of A
  const at::Tensor& row_index;    // (2K,) int64: row of row_factors behind each row of A, -1 for zero
  const at::Tensor& row_sign;     // (2K,)
  int64_t even_rows;              // rows [0, even_rows) of row_factors are even under h -> H - h, the rest odd
  const at::Tensor& col_factors;  // (Q, W)
  const at::Tensor& col_index;    // (2L,)
  const at::Tensor& col_sign;     // (2L,)
  const at::Tensor& weight;       // (P, K, L)
  const at::Tensor& constant;     // (P,)
};

// Argument checks of lowrank_filter_kernel (TORCH_CHECK with a message naming the argument).
void check_lowrank_args(const at::Tensor& x, const LowRankArgs& f);

// Whether the extension was compiled with its CUDA kernels.
bool built_with_cuda();

// Why this build cannot run its CUDA kernels on a device of compute capability major.minor
// ("" when it can: SASS of a compatible architecture, or PTX the driver can compile for it).
std::string cuda_arch_problem(int major, int minor);

}  // namespace spanet
