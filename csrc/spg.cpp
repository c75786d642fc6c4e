// The spg kernel ops (spanet::spg_lowrank_kernel and its two gradients) as ATen GEMM
// compositions, registered for the CPU and CUDA dispatch keys: the same arithmetic as
// spanet_ops/algorithms.py (spg_lowrank, spg_lowrank_input_grad, spg_lowrank_weight_grad)
// without a Python call per step, which at SPANet's small late-stage maps costs more than the
// GEMMs themselves. NCHW and channels_last maps are used in place (views, no copies):
//   forward      out = (W diag(c)) x + sum_j e_j (W diag(s_j) <e_j, x>) + b e_0 sqrt(HW)
//   input grad   SPF(W^T g)
//   weight grad  c * g x^T + sum_j <e_j, g> (s_j <e_j, x>)^T
// with e_j the plan's orthonormal real basis images (J, HW), s (J, C) the per-channel scales
// and c (C,) the constants. Inputs are in the compute dtype (the op layer casts).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

namespace spanet {
namespace {

bool channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// (B, C, H, W) as pixels: (B, HW, C) for channels_last, (B, C, HW) otherwise (views where laid out so).
at::Tensor pixels(const at::Tensor& x, bool cl) {
  const int64_t b = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  return cl ? x.permute({0, 2, 3, 1}).reshape({b, hw, c}) : x.reshape({b, c, hw});
}

at::Tensor from_pixels(const at::Tensor& x3, int64_t height, int64_t width, bool cl) {
  if (cl) return x3.reshape({x3.size(0), height, width, x3.size(2)}).permute({0, 3, 1, 2});
  return x3.reshape({x3.size(0), x3.size(1), height, width});
}

// The 1x1 conv `weight` (O, C) of pixels: one GEMM (channels_last) or a batched one.
at::Tensor dense_1x1(const at::Tensor& x3, const at::Tensor& weight, bool cl) {
  return cl ? at::matmul(x3, weight.t()) : at::matmul(weight, x3);
}

// Coefficients <e_j, x_c> (B, J, C).
at::Tensor project(const at::Tensor& x3, const at::Tensor& basis, bool cl) {
  return at::matmul(basis, cl ? x3 : x3.transpose(1, 2));
}

// out3 += sum_j coefficients[:, j] e_j for coefficients (B, J, O), in place.
void synthesise_(at::Tensor& out3, const at::Tensor& coefficients, const at::Tensor& basis, bool cl) {
  const int64_t b = coefficients.size(0), j = coefficients.size(1), o = coefficients.size(2);
  if (cl) {
    out3.baddbmm_(basis.t().expand({b, -1, -1}), coefficients);
  } else {
    out3.view({b * o, -1}).addmm_(coefficients.transpose(1, 2).reshape({b * o, j}), basis);
  }
}

at::Tensor spg_lowrank(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& basis, const at::Tensor& scale, const at::Tensor& constant) {
  const int64_t height = x.size(2), width = x.size(3);
  const bool cl = channels_last(x);
  const at::Tensor x3 = pixels(x, cl);
  at::Tensor mixed = at::matmul(project(x3, basis, cl).mul_(scale), weight.t());  // (B, J, O)
  if (bias.has_value() && bias->defined()) {
    // The bias rides on the constant image e_0 = 1 / sqrt(HW).
    mixed.select(1, 0).add_(*bias, std::sqrt(static_cast<double>(height * width)));
  }
  at::Tensor out3 = dense_1x1(x3, weight * constant, cl);
  synthesise_(out3, mixed, basis, cl);
  return from_pixels(out3, height, width, cl);
}

at::Tensor spg_lowrank_input_grad(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& basis,
                                  const at::Tensor& scale, const at::Tensor& constant) {
  const bool cl = channels_last(grad);
  const at::Tensor g3 = pixels(grad, cl);
  at::Tensor back = dense_1x1(g3, (weight * constant).t(), cl);
  const at::Tensor mixed = at::matmul(project(g3, basis, cl), weight).mul_(scale);  // (B, J, C)
  synthesise_(back, mixed, basis, cl);
  return from_pixels(back, grad.size(2), grad.size(3), cl);
}

at::Tensor spg_lowrank_weight_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& basis,
                                   const at::Tensor& scale, const at::Tensor& constant) {
  const bool cl = channels_last(x);
  const at::Tensor x3 = pixels(x, cl), g3 = pixels(grad, cl);
  const at::Tensor filtered = project(x3, basis, cl).mul_(scale);  // (B, J, C)
  const at::Tensor coefficients = project(g3, basis, cl);         // (B, J, O)
  at::Tensor out = at::mm(coefficients.flatten(0, 1).t(), filtered.flatten(0, 1));
  // Batched over B in NCHW, so neither map is permuted into a (C, B*H*W) copy.
  const at::Tensor dense = cl ? at::mm(g3.reshape({-1, g3.size(2)}).t(), x3.reshape({-1, x3.size(2)}))
                              : at::bmm(g3, x3.transpose(1, 2)).sum(0);
  return out.add_(dense * constant);
}

}  // namespace

TORCH_LIBRARY_IMPL(spanet, CPU, m) {
  m.impl("spg_lowrank_kernel", &spg_lowrank);
  m.impl("spg_lowrank_input_grad_kernel", &spg_lowrank_input_grad);
  m.impl("spg_lowrank_weight_grad_kernel", &spg_lowrank_weight_grad);
}

TORCH_LIBRARY_IMPL(spanet, CUDA, m) {
  m.impl("spg_lowrank_kernel", &spg_lowrank);
  m.impl("spg_lowrank_input_grad_kernel", &spg_lowrank_input_grad);
  m.impl("spg_lowrank_weight_grad_kernel", &spg_lowrank_weight_grad);
}

}  // namespace spanet
