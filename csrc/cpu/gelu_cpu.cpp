// CPU kernel of the spanet kernel op gelu_slope_kernel: the exact (erf) GELU and its
// derivative in one pass,
//   gelu(x) = x Phi(x),   slope(x) = Phi(x) + x phi(x),
//   Phi(x) = (1 + erf(x / sqrt 2)) / 2,   phi(x) = exp(-x^2 / 2) / sqrt(2 pi),
// so that a backward is one multiply by the saved slope instead of torch's gelu_backward,
// which re-evaluates erf and exp.
//
// The float32 vector loop evaluates erf as PyTorch's own vectorised GELU does (Abramowitz &
// Stegun 7.1.26, |error| < 1.5e-7), whose exp(-z^2) at z = x / sqrt 2 is exp(-x^2 / 2): one
// exponential serves both Phi and phi. Other dtypes, non-AVX2 builds and loop tails use
// std::erf/std::exp in the compute dtype (float32 for half types, float64 for float64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace spanet {
namespace {

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
// Elements per parallel task: large enough to amortise the thread hand-off.
constexpr int64_t kGrain = 1 << 15;

template <typename acc_t>
inline void gelu_slope_scalar(acc_t x, acc_t& value, acc_t& slope) {
  const acc_t cdf = acc_t(0.5) * (acc_t(1) + std::erf(x * acc_t(kInvSqrt2)));
  value = x * cdf;
  slope = cdf + x * std::exp(acc_t(-0.5) * x * x) * acc_t(kInvSqrt2Pi);
}

#if defined(__AVX2__) && defined(__FMA__)
// exp(a) for a <= 0 (Cephes expf: Cody-Waite reduction by ln 2, degree-5 polynomial),
// flushed to zero below exp(-87.3), where the result would leave the normal range.
inline __m256 exp_nonpositive(__m256 a) {
  const __m256 lowest = _mm256_set1_ps(-87.3f);
  const __m256 underflow = _mm256_cmp_ps(a, lowest, _CMP_LT_OQ);
  a = _mm256_max_ps(a, lowest);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), a);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 e = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(e, _mm256_castsi256_ps(bits)));
}

inline void gelu_slope_avx2(__m256 x, __m256& value, __m256& slope) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(static_cast<float>(kInvSqrt2)));
  const __m256 sign = _mm256_and_ps(sign_bit, z);
  const __m256 abs_z = _mm256_xor_ps(sign, z);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), abs_z, one));
  __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
  const __m256 gauss = exp_nonpositive(_mm256_mul_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(-0.5f)));  // exp(-z^2)
  const __m256 erf_abs = _mm256_fnmadd_ps(_mm256_mul_ps(r, t), gauss, one);
  const __m256 cdf = _mm256_mul_ps(half, _mm256_add_ps(one, _mm256_xor_ps(sign, erf_abs)));
  value = _mm256_mul_ps(x, cdf);
  slope = _mm256_fmadd_ps(_mm256_mul_ps(x, gauss), _mm256_set1_ps(static_cast<float>(kInvSqrt2Pi)), cdf);
}
#endif

template <typename scalar_t>
void gelu_slope_range(const scalar_t* x, scalar_t* value, scalar_t* slope, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t i = begin;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + 8 <= end; i += 8) {
      __m256 v, s;
      gelu_slope_avx2(_mm256_loadu_ps(x + i), v, s);
      _mm256_storeu_ps(value + i, v);
      _mm256_storeu_ps(slope + i, s);
    }
  }
#endif
  for (; i < end; ++i) {
    acc_t v, s;
    gelu_slope_scalar<acc_t>(static_cast<acc_t>(x[i]), v, s);
    value[i] = static_cast<scalar_t>(v);
    slope[i] = static_cast<scalar_t>(s);
  }
}

std::tuple<at::Tensor, at::Tensor> gelu_slope_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "gelu_slope_kernel (CPU): x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gelu_slope_kernel: x must be floating point, got ",
              x.scalar_type());
  // A dense tensor is walked in memory order with outputs of the same strides (so channels_last
  // stays channels_last); anything else is made contiguous first.
  const at::Tensor xd = x.is_non_overlapping_and_dense() ? x : x.contiguous();
  at::Tensor value = at::empty_like(xd), slope = at::empty_like(xd);
  TORCH_INTERNAL_ASSERT(value.strides() == xd.strides() && slope.strides() == xd.strides());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xd.scalar_type(), "gelu_slope_cpu", [&] {
    const scalar_t* xp = xd.const_data_ptr<scalar_t>();
    scalar_t* vp = value.mutable_data_ptr<scalar_t>();
    scalar_t* sp = slope.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, xd.numel(), kGrain, [&](int64_t begin, int64_t end) {
      gelu_slope_range<scalar_t>(xp, vp, sp, begin, end);
    });
  });
  return {value, slope};
}

}  // namespace

TORCH_LIBRARY_IMPL(spanet, CPU, m) {
  m.impl("gelu_slope_kernel", &gelu_slope_cpu);
}

}  // namespace spanet
