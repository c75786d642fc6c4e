// Argument validation of the native kernels: user errors are TORCH_CHECKs that name the
// offending argument, whatever the device.
#include "spanet_ops.h"

#include <c10/util/Exception.h>

namespace spanet {
namespace {

bool is_storage_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of row_factors (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " must be on x's device ", x.device(), ", got ", t.device());
}

void check_factors(const at::Tensor& factors, const at::Tensor& index, const at::Tensor& sign, int64_t n,
                   const char* name, const at::Tensor& ref, const at::Tensor& x) {
  check_like(factors, name, ref, x);
  TORCH_CHECK(factors.dim() == 2 && factors.size(1) == n, name, " must be (R, ", n, "), got shape ", factors.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.size(0) % 2 == 0,
              name, "'s index must be int64 (2K,), got ", index.scalar_type(), " ", index.sizes());
  TORCH_CHECK(index.device() == x.device(), name, "'s index must be on x's device ", x.device());
  check_like(sign, "sign", ref, x);
  TORCH_CHECK(sign.dim() == 1 && sign.size(0) == index.size(0), name, "'s sign must be (", index.size(0),
              ",), got shape ", sign.sizes());
  if (index.device().is_cpu()) {  // the kernels index U with it: out-of-range rows would read stray memory
    const at::Tensor idx = index.contiguous();
    const int64_t* p = idx.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < idx.numel(); ++i) {
      TORCH_CHECK(p[i] >= -1 && p[i] < factors.size(0), name, "'s index holds ", p[i], ", outside [-1, ",
                  factors.size(0), ")");
    }
  }
}

}  // namespace

void check_lowrank_args(const at::Tensor& x, const LowRankArgs& f) {
  TORCH_CHECK(x.dim() >= 2, "lowrank_filter_kernel takes planes x (..., H, W), got shape ", x.sizes());
  TORCH_CHECK(is_storage_dtype(x.scalar_type()), "x must be float64, float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(f.row_factors.scalar_type() == at::kFloat || f.row_factors.scalar_type() == at::kDouble,
              "row_factors must be float32 or float64 (the compute dtype), got ", f.row_factors.scalar_type());
  check_factors(f.row_factors, f.row_index, f.row_sign, x.size(-2), "row_factors", f.row_factors, x);
  check_factors(f.col_factors, f.col_index, f.col_sign, x.size(-1), "col_factors", f.row_factors, x);
  TORCH_CHECK(f.even_rows >= -1 && f.even_rows <= f.row_factors.size(0), "even_rows must be in [-1, ",
              f.row_factors.size(0), "], got ", f.even_rows);
  const int64_t k = f.row_index.size(0) / 2, l = f.col_index.size(0) / 2;
  check_like(f.weight, "weight", f.row_factors, x);
  TORCH_CHECK(f.weight.dim() == 3 && f.weight.size(1) == k && f.weight.size(2) == l,
              "weight must be (P, K, L) with K = ", k, ", L = ", l, ", got shape ", f.weight.sizes());
  const int64_t planes = f.weight.size(0);
  check_like(f.constant, "constant", f.row_factors, x);
  TORCH_CHECK(f.constant.dim() == 1 && f.constant.size(0) == planes, "constant must be (P,) with P = ", planes,
              ", got shape ", f.constant.sizes());
  const int64_t n = x.size(-2) * x.size(-1) == 0 ? 0 : x.numel() / (x.size(-2) * x.size(-1));
  TORCH_CHECK(planes > 0 && n % planes == 0, "the number of planes N = ", n,
              " must be a multiple of the mask planes P = ", planes);
}

}  // namespace spanet
