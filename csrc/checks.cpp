// Argument validation shared by every native kernel: user errors are TORCH_CHECKs
// that name the offending argument, whatever the device.
#include "spanet_ops.h"

#include <c10/util/Exception.h>

namespace spanet {
namespace {

bool is_storage_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_compute_tensor(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64 (the compute dtype), got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of basis_h (", ref.scalar_type(),
              "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
}

void check_bases(const at::Tensor& basis_h, const at::Tensor& basis_w, int64_t height, int64_t width,
                 const at::Tensor& x) {
  TORCH_CHECK(basis_h.scalar_type() == at::kFloat || basis_h.scalar_type() == at::kDouble,
              "basis_h must be float32 or float64 (the compute dtype), got ", basis_h.scalar_type());
  TORCH_CHECK(basis_h.device() == x.device(), "basis_h must be on x's device ", x.device(), ", got ",
              basis_h.device());
  TORCH_CHECK(basis_h.dim() == 2 && basis_h.size(0) % 2 == 0 && basis_h.size(1) == height,
              "basis_h must be (2K, H) with H = ", height, ", got shape ", basis_h.sizes());
  check_compute_tensor(basis_w, "basis_w", basis_h);
  TORCH_CHECK(basis_w.dim() == 2 && basis_w.size(0) % 2 == 0 && basis_w.size(1) == width,
              "basis_w must be (2L, W) with W = ", width, ", got shape ", basis_w.sizes());
}

}  // namespace

LowRankShape check_lowrank_args(const at::Tensor& x, const at::Tensor& basis_h, const at::Tensor& basis_w,
                                const at::Tensor& weight, const at::Tensor& constant) {
  TORCH_CHECK(x.dim() == 3, "lowrank_filter_kernel takes planes x (N, H, W), got shape ", x.sizes());
  TORCH_CHECK(is_storage_dtype(x.scalar_type()), "x must be float64, float32, float16 or bfloat16, got ",
              x.scalar_type());
  LowRankShape s{x.size(0), x.size(1), x.size(2), 0, 0, 0};
  check_bases(basis_h, basis_w, s.height, s.width, x);
  s.k = basis_h.size(0) / 2;
  s.l = basis_w.size(0) / 2;
  check_compute_tensor(weight, "weight", basis_h);
  TORCH_CHECK(weight.dim() == 3 && weight.size(1) == s.k && weight.size(2) == s.l,
              "weight must be (P, K, L) with K = ", s.k, ", L = ", s.l, ", got shape ", weight.sizes());
  s.planes = weight.size(0);
  check_compute_tensor(constant, "constant", basis_h);
  TORCH_CHECK(constant.dim() == 1 && constant.size(0) == s.planes, "constant must be (P,) with P = ", s.planes,
              ", got shape ", constant.sizes());
  TORCH_CHECK(s.planes > 0 && s.n % s.planes == 0, "the number of planes N = ", s.n,
              " must be a multiple of the mask planes P = ", s.planes);
  return s;
}

}  // namespace spanet
