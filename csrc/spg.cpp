// The spg kernel ops (spanet::spg_lowrank_kernel and its two gradients) as ATen GEMM
// compositions, registered for the CPU and CUDA dispatch keys: the same arithmetic as
// spanet_ops/algorithms.py (spg_lowrank, spg_lowrank_input_grad, spg_lowrank_weight_grad)
// without a Python call per step, which at SPANet's small late-stage maps costs more than the
// GEMMs themselves:
//   forward      out = (W diag(c)) x + sum_j e_j (W diag(s_j) <e_j, x>) + b
//   input grad   SPF(W^T g)
//   weight grad  c * g x^T + sum_j <e_j, g> (s_j <e_j, x>)^T
// with e_j the plan's orthonormal real basis images (J, HW), s (J, C) the per-channel scales
// and c (C,) the constants. Inputs are in the compute dtype (the op layer casts).
//
// NCHW and channels_last maps are used in place: a map is viewed as pixels, (B, C, HW) or
// (B*HW, C), and every product is an explicit mm/bmm/addmm on 2-D or 3-D views (at::matmul's
// broadcasting plumbing costs more than the products at the late stages' sizes). Coefficients
// are (B, J, C) in both layouts, so the channel mix and the weight gradient's pairing are one GEMM.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

namespace spanet {
namespace {

bool channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The shapes of one call, and its maps as pixels: NCHW (B, C, HW), channels_last (B*HW, C).
struct Pixels {
  int64_t batch, channels, height, width, hw;
  bool cl;
  at::Tensor x;

  Pixels(const at::Tensor& map, bool layout)
      : batch(map.size(0)), channels(map.size(1)), height(map.size(2)), width(map.size(3)),
        hw(map.size(2) * map.size(3)), cl(layout) {
    x = cl ? map.permute({0, 2, 3, 1}).reshape({batch * hw, channels}) : map.reshape({batch, channels, hw});
  }

  // out (B, O, HW) or (B*HW, O) back to the map (B, O, H, W) in the same layout.
  at::Tensor map_of(const at::Tensor& out) const {
    if (cl) return out.view({batch, height, width, out.size(1)}).permute({0, 3, 1, 2});
    return out.view({batch, out.size(1), height, width});
  }

  // Coefficients <e_j, x_c> (B, J, C) in both layouts: one batched product with the basis
  // broadcast, which beats a (B*C, HW) x (HW, J) GEMM (a J-wide output) by up to 1.7x at stage 1;
  // a batch of one takes the plain 2-D product (bmm's set-up shows at the late stages' sizes).
  at::Tensor project(const at::Tensor& basis) const {
    const at::Tensor x3 = cl ? x.view({batch, hw, channels}) : x.transpose(1, 2);  // (B, HW, C)
    return batch == 1 ? at::mm(basis, x3[0]).unsqueeze(0) : at::bmm(basis.expand({batch, -1, -1}), x3);
  }
};

// out += sum_j coefficients[:, j] e_j for coefficients (B, J, O). NCHW: out (B, O, HW);
// channels_last: out (B*HW, O).
void synthesise_(at::Tensor& out, const at::Tensor& coefficients, const at::Tensor& basis, const Pixels& p) {
  if (p.batch == 1) {
    if (p.cl) out.addmm_(basis.t(), coefficients[0]);
    else out[0].addmm_(coefficients[0].t(), basis);
  } else if (p.cl) {
    out.view({p.batch, p.hw, -1}).baddbmm_(basis.t().expand({p.batch, -1, -1}), coefficients);
  } else {
    out.baddbmm_(coefficients.transpose(1, 2), basis.expand({p.batch, -1, -1}));
  }
}

// Coefficients (B, J, C') mixed by `mix` (O', C'), or by its transpose: (B, J, O'), one GEMM.
at::Tensor mix(const at::Tensor& coefficients, const at::Tensor& weight, bool transpose_mix) {
  const at::Tensor w = transpose_mix ? weight.t() : weight;  // (O', C')
  const int64_t batch = coefficients.size(0), j = coefficients.size(1);
  return at::mm(coefficients.reshape({batch * j, coefficients.size(2)}), w.t()).view({batch, j, w.size(0)});
}

// The dense 1x1 conv `weight` (O, C) of the pixels, plus an optional bias.
at::Tensor dense(const Pixels& p, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  if (p.cl) return has_bias ? at::addmm(*bias, p.x, weight.t()) : at::mm(p.x, weight.t());
  if (p.batch == 1) {
    const at::Tensor out = has_bias ? at::addmm(bias->unsqueeze(1), weight, p.x[0]) : at::mm(weight, p.x[0]);
    return out.unsqueeze(0);
  }
  const at::Tensor w = weight.expand({p.batch, -1, -1});
  return has_bias ? at::baddbmm(bias->view({1, -1, 1}), w, p.x) : at::bmm(w, p.x);
}

at::Tensor spg_lowrank(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& basis, const at::Tensor& scale, const at::Tensor& constant) {
  const Pixels p(x, channels_last(x));
  // Coefficients scaled per channel, then mixed to the output channels.
  const at::Tensor mixed = mix(p.project(basis).mul_(scale), weight, false);
  at::Tensor out = dense(p, weight * constant, bias);
  synthesise_(out, mixed, basis, p);
  return p.map_of(out);
}

at::Tensor spg_lowrank_input_grad(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& basis,
                                  const at::Tensor& scale, const at::Tensor& constant) {
  const Pixels p(grad, channels_last(grad));
  at::Tensor back = dense(p, (weight * constant).t(), std::nullopt);
  // The gradient's coefficients mixed back to the input channels, then scaled per input channel.
  const at::Tensor mixed = mix(p.project(basis), weight, true).mul_(scale);
  synthesise_(back, mixed, basis, p);
  return p.map_of(back);
}

at::Tensor spg_lowrank_weight_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& basis,
                                   const at::Tensor& scale, const at::Tensor& constant) {
  const bool cl = channels_last(x);
  const Pixels px(x, cl), pg(grad, cl);
  const at::Tensor filtered = px.project(basis).mul_(scale);  // s_j <e_j, x>  (B, J, C)
  const at::Tensor coefficients = pg.project(basis);          // <e_j, g>      (B, J, O)
  at::Tensor out;
  if (cl) {  // (O, B*HW) x (B*HW, C)
    out = at::mm(pg.x.t(), px.x);
  } else {  // per sample, so neither map is permuted into a (C, B*HW) copy
    out = at::mm(pg.x[0], px.x[0].t());
    for (int64_t b = 1; b < px.batch; ++b) out.addmm_(pg.x[b], px.x[b].t());
  }
  // Plus the coefficient pairing over (B*J).
  const int64_t pairs = coefficients.size(0) * coefficients.size(1);
  return out.mul_(constant).addmm_(coefficients.reshape({pairs, -1}).t(), filtered.reshape({pairs, -1}));
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
