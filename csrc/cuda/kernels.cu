// CUDA kernels of the spanet kernel ops (registered for the CUDA dispatch key):
//
// * spanet::circular_fft_filter_kernel — the fft algorithm of the published circular mask on
//   cuFFT (through ATen's rfft2/irfft2, which plan-cache cuFFT): the half spectrum is scaled
//   in place by the mask, computed per bin from the disc's exact integer thresholds and lam_c
//   (spanet_ops.masks.DiscThresholds), so no mask tensor is read.
//   Both transforms run unnormalised and the 1/(H W) of the ortho pair is folded into the
//   mask, so the spectrum is touched once between them.
//
// The low-rank filter has no native CUDA kernel: on CUDA it is the Triton kernel
// spanet_ops/triton/kernel.py. The maths matches spanet_ops/algorithms.py (fft_filter)
// and spanet_ops/plans.py (CircularPlan.half_mask). Kernels run on the current stream under a
// device guard, after a check that this build has code for the device (cuda_arch_problem in
// csrc/binding.cpp); user errors are TORCH_CHECKs. Only c10/cuda headers are used (not
// ATen/cuda), so the build needs nvcc and the CUDA runtime headers, not the cuBLAS/cuSPARSE ones.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <string>
#include <vector>

#include "../spanet_ops.h"

namespace spanet {

bool built_with_cuda() { return true; }

namespace {

constexpr int kThreads = 256;

// TORCH_CHECK that this build has code for the device (SASS of its architecture or PTX it
// can JIT-compile); checked once per device.
void check_device_supported(const c10::Device& device) {
  static std::mutex mutex;
  static std::vector<bool> checked;
  const auto index = static_cast<size_t>(device.index());
  const std::lock_guard<std::mutex> lock(mutex);
  if (index < checked.size() && checked[index]) return;
  cudaDeviceProp props{};
  C10_CUDA_CHECK(cudaGetDeviceProperties(&props, device.index()));
  const std::string problem = cuda_arch_problem(props.major, props.minor);
  TORCH_CHECK(problem.empty(), "spanet_ops: ", device, " (", props.name, "): ", problem);
  if (checked.size() <= index) checked.resize(index + 1, false);
  checked[index] = true;
}

// spectrum (N, H, W//2+1) *= the published circular mask of plane n's channel, in place.
// `scale` is the 1/(H W) of the unnormalised transform pair.
template <typename acc_t>
__global__ void circular_mask_kernel(c10::complex<acc_t>* __restrict__ spectrum, int64_t total, int height,
                                     int width, int half_width, const float* __restrict__ lam, int64_t channels,
                                     int64_t inside_limit, int64_t edge, acc_t scale) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int col = static_cast<int>(i % half_width);
  const int64_t row_plane = i / half_width;
  const int row = static_cast<int>(row_plane % height);
  const int64_t plane = row_plane / height;
  // Signed frequencies of the natural layout; the decisions on the integer squared distance are exact.
  const int64_t u = row < (height + 1) / 2 ? row : row - height;
  const int64_t v = col < (width + 1) / 2 ? col : col - width;
  const int64_t d2 = u * u + v * v;
  const float balance = lam[channels > 1 ? plane % channels : 0];
  // float32 values as the published mask: lam inside (d < r), 1/3 on the circle (d == r), 1 - lam outside.
  const float value = d2 < inside_limit ? balance : (d2 == edge ? 1.0f / 3.0f : 1.0f - balance);
  spectrum[i] *= static_cast<acc_t>(value) * scale;
}

at::Tensor circular_fft_filter_cuda(const at::Tensor& x, const at::Tensor& lam, int64_t inside_limit, int64_t edge) {
  TORCH_CHECK(x.is_cuda(), "circular_fft_filter_kernel (CUDA): x must be a CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "circular_fft_filter_kernel: x must be float32 or float64 (the compute dtype), got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, "circular_fft_filter_kernel: x must be (..., H, W), got shape ", x.sizes());
  TORCH_CHECK(lam.scalar_type() == at::kFloat, "circular_fft_filter_kernel: lam must be float32, got ",
              lam.scalar_type());
  TORCH_CHECK(lam.dim() <= 1, "circular_fft_filter_kernel: lam must be 0-d or (C,), got shape ", lam.sizes());
  TORCH_CHECK(lam.device() == x.device(), "circular_fft_filter_kernel: lam must be on x's device ", x.device());
  TORCH_CHECK(inside_limit >= 0, "circular_fft_filter_kernel: inside_limit must be non-negative, got ", inside_limit);
  const int64_t channels = lam.numel();
  TORCH_CHECK(channels == 1 || (x.dim() >= 3 && x.size(-3) == channels), "circular_fft_filter_kernel: lam has ",
              channels, " entries but x of shape ", x.sizes(), " has ", x.dim() >= 3 ? x.size(-3) : 0,
              " channels (dim -3)");
  const c10::cuda::CUDAGuard guard(x.device());
  check_device_supported(x.device());
  const int64_t height = x.size(-2), width = x.size(-1);
  // Unnormalised forward ("backward" norm) and inverse ("forward" norm) transforms: the ortho
  // pair's 1/sqrt(H W) twice is the mask kernel's `scale`.
  at::Tensor spectrum = at::fft_rfft2(x.contiguous(), std::nullopt, {-2, -1}, "backward").contiguous();
  const int64_t total = spectrum.numel();
  if (total > 0) {
    const at::Tensor lam_c = lam.contiguous();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t blocks = (total + kThreads - 1) / kThreads;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circular_fft_filter_cuda", [&] {
      circular_mask_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          reinterpret_cast<c10::complex<scalar_t>*>(spectrum.data_ptr()), total, static_cast<int>(height),
          static_cast<int>(width), static_cast<int>(width / 2 + 1), lam_c.const_data_ptr<float>(), channels,
          inside_limit, edge, static_cast<scalar_t>(1.0 / static_cast<double>(height * width)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const std::array<int64_t, 2> size{height, width};
  return at::fft_irfft2(spectrum, at::IntArrayRef(size), {-2, -1}, "forward");
}

}  // namespace

TORCH_LIBRARY_IMPL(spanet, CUDA, m) { m.impl("circular_fft_filter_kernel", &circular_fft_filter_cuda); }

}  // namespace spanet
