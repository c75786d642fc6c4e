// CUDA kernels of the spanet kernel ops (registered for the CUDA dispatch key):
//
// * spanet::lowrank_filter_kernel — the fused low-rank filter, one thread block per plane:
//   analysis G = A x B^T, per-bin scaling to Z, synthesis y = c x + A^T Z B, with the bases
//   and the partial products in shared memory; the plane is read twice (the second read
//   mostly from L2) and written once.
// * spanet::circular_fft_filter_kernel — the fft algorithm of the published circular mask on
//   cuFFT (through ATen's rfft2/irfft2, which plan-cache cuFFT): the half spectrum is scaled
//   in place by the mask, computed per bin from (radius, lam_c), so no mask tensor is read.
//
// The maths matches spanet_ops/algorithms.py (lowrank_filter, fft_filter) and
// spanet_ops/plans.py (CircularPlan.half_mask). Kernels run on the current stream under a
// device guard; user errors are TORCH_CHECKs (csrc/checks.cpp). Only c10/cuda headers are used
// (not ATen/cuda), so the build needs nvcc and the CUDA runtime headers, not the cuBLAS/cuSPARSE ones.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include <array>

#include "../spanet_ops.h"

namespace spanet {

bool built_with_cuda() { return true; }

namespace {

constexpr int kThreads = 256;

// Shared-memory layout of one plane's work, in units of acc_t.
struct PlaneSmem {
  int64_t a, b, s, g, total;  // offsets of A (2K x H), B (2L x W), S (2K x W), G (2K x 2L); total size
  __host__ __device__ PlaneSmem(int64_t k, int64_t l, int64_t height, int64_t width)
      : a(0), b(2 * k * height), s(b + 2 * l * width), g(s + 2 * k * width), total(g + 4 * k * l) {}
};

// Stage A and B in shared memory and clear S.
template <typename acc_t>
__device__ void load_bases(const acc_t* __restrict__ basis_h, const acc_t* __restrict__ basis_w, acc_t* smem,
                           const PlaneSmem& lay, int k2, int l2, int height, int width) {
  for (int i = threadIdx.x; i < k2 * height; i += blockDim.x) smem[lay.a + i] = basis_h[i];
  for (int i = threadIdx.x; i < l2 * width; i += blockDim.x) smem[lay.b + i] = basis_w[i];
  for (int i = threadIdx.x; i < k2 * width; i += blockDim.x) smem[lay.s + i] = acc_t(0);
  __syncthreads();
}

// G = A x B^T into smem[lay.g] (2K x 2L): S = A x by shared-memory atomics, then S B^T.
template <typename scalar_t, typename acc_t>
__device__ void analyse(const scalar_t* __restrict__ x, acc_t* smem, const PlaneSmem& lay, int k2, int l2,
                        int height, int width) {
  const int hw = height * width;
  for (int i = threadIdx.x; i < hw; i += blockDim.x) {
    const int h = i / width, w = i - h * width;
    const acc_t v = static_cast<acc_t>(x[i]);
    for (int p = 0; p < k2; ++p) atomicAdd(&smem[lay.s + p * width + w], smem[lay.a + p * height + h] * v);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < k2 * l2; i += blockDim.x) {
    const int p = i / l2, q = i - p * l2;
    acc_t sum = 0;
    for (int w = 0; w < width; ++w) sum += smem[lay.s + p * width + w] * smem[lay.b + q * width + w];
    smem[lay.g + i] = sum;
  }
  __syncthreads();
}

// G -> Z = [[R, Q], [Q, -R]] in place with the per-bin weights (K x L); each (k, l) owns its four entries.
template <typename acc_t>
__device__ void scale(const acc_t* __restrict__ weight, acc_t* smem, const PlaneSmem& lay, int k, int l) {
  acc_t* z = smem + lay.g;
  const int ld = 2 * l;
  for (int i = threadIdx.x; i < k * l; i += blockDim.x) {
    const int kk = i / l, ll = i - kk * l;
    const acc_t pac = z[kk * ld + ll], pad = z[kk * ld + l + ll];
    const acc_t pbc = z[(k + kk) * ld + ll], pbd = z[(k + kk) * ld + l + ll];
    const acc_t r = weight[i] * (pac - pbd), q = weight[i] * (pbc + pad);
    z[kk * ld + ll] = r;
    z[kk * ld + l + ll] = q;
    z[(k + kk) * ld + ll] = q;
    z[(k + kk) * ld + l + ll] = -r;
  }
  __syncthreads();
}

// out = alpha * src + A^T Z B, with Z in smem[lay.g]; S is reused for Z B.
template <typename scalar_t, typename src_t, typename acc_t>
__device__ void synthesise(const src_t* __restrict__ src, acc_t alpha, scalar_t* __restrict__ out, acc_t* smem,
                           const PlaneSmem& lay, int k2, int l2, int height, int width) {
  for (int i = threadIdx.x; i < k2 * width; i += blockDim.x) {
    const int p = i / width, w = i - p * width;
    acc_t sum = 0;
    for (int q = 0; q < l2; ++q) sum += smem[lay.g + p * l2 + q] * smem[lay.b + q * width + w];
    smem[lay.s + i] = sum;
  }
  __syncthreads();
  const int hw = height * width;
  for (int i = threadIdx.x; i < hw; i += blockDim.x) {
    const int h = i / width, w = i - h * width;
    acc_t sum = alpha * static_cast<acc_t>(src[i]);
    for (int p = 0; p < k2; ++p) sum += smem[lay.a + p * height + h] * smem[lay.s + p * width + w];
    out[i] = static_cast<scalar_t>(sum);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void lowrank_filter_cuda_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                           const acc_t* __restrict__ basis_h, const acc_t* __restrict__ basis_w,
                                           const acc_t* __restrict__ weight, const acc_t* __restrict__ constant,
                                           int64_t planes, int k, int l, int height, int width) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const PlaneSmem lay(k, l, height, width);
  const int64_t n = blockIdx.x, m = n % planes;  // plane n uses mask plane n % P
  const int64_t offset = n * height * width;
  load_bases(basis_h, basis_w, smem, lay, 2 * k, 2 * l, height, width);
  analyse(x + offset, smem, lay, 2 * k, 2 * l, height, width);
  scale(weight + m * k * l, smem, lay, k, l);
  synthesise(x + offset, constant[m], y + offset, smem, lay, 2 * k, 2 * l, height, width);
}

// Dynamic shared memory for one plane, or 0 when it exceeds what the device grants a block
// (the callers then use the ATen composition, which has no such limit).
template <typename Kernel>
size_t plane_smem_bytes(Kernel kernel, const PlaneSmem& lay, size_t elem) {
  const size_t bytes = static_cast<size_t>(lay.total) * elem;
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > static_cast<size_t>(limit)) return 0;
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  return bytes;
}

// The low-rank filter with ATen matmuls (algorithms.lowrank_filter), for planes too large for
// one block's shared memory.
at::Tensor coefficient_scale(const at::Tensor& grid, const at::Tensor& weight, int64_t k, int64_t l) {
  const at::Tensor pac = grid.narrow(-2, 0, k).narrow(-1, 0, l), pad = grid.narrow(-2, 0, k).narrow(-1, l, l);
  const at::Tensor pbc = grid.narrow(-2, k, k).narrow(-1, 0, l), pbd = grid.narrow(-2, k, k).narrow(-1, l, l);
  const at::Tensor r = weight * (pac - pbd), q = weight * (pbc + pad);
  return at::cat({at::cat({r, q}, -1), at::cat({q, -r}, -1)}, -2);
}

at::Tensor lowrank_filter_aten(const at::Tensor& x, const at::Tensor& bh, const at::Tensor& bw,
                               const at::Tensor& weight, const at::Tensor& constant, const LowRankShape& s) {
  const at::Tensor xc = x.to(bh.scalar_type()).reshape({s.n / s.planes, s.planes, s.height, s.width});
  const at::Tensor grid = at::matmul(bh, at::matmul(xc, bw.t()));
  const at::Tensor z = coefficient_scale(grid, weight, s.k, s.l);
  const at::Tensor y = at::matmul(bh.t(), at::matmul(z, bw)) + xc * constant.view({s.planes, 1, 1});
  return y.reshape(x.sizes()).to(x.scalar_type()).contiguous();
}

at::Tensor lowrank_filter_cuda(const at::Tensor& x, const at::Tensor& basis_h, const at::Tensor& basis_w,
                               const at::Tensor& weight, const at::Tensor& constant) {
  const LowRankShape s = check_lowrank_args(x, basis_h, basis_w, weight, constant);
  TORCH_CHECK(x.is_cuda(), "lowrank_filter_kernel (CUDA): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), bh = basis_h.contiguous(), bw = basis_w.contiguous();
  const at::Tensor wc = weight.contiguous(), cc = constant.contiguous();
  at::Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  if (xc.numel() == 0) return out;
  const PlaneSmem lay(s.k, s.l, s.height, s.width);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  bool launched = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "lowrank_filter_cuda", [&] {
    auto launch = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      auto kernel = lowrank_filter_cuda_kernel<scalar_t, acc_t>;
      const size_t bytes = plane_smem_bytes(kernel, lay, sizeof(acc_t));
      if (bytes == 0) return;
      kernel<<<s.n, kThreads, bytes, stream>>>(xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                               bh.const_data_ptr<acc_t>(), bw.const_data_ptr<acc_t>(),
                                               wc.const_data_ptr<acc_t>(), cc.const_data_ptr<acc_t>(), s.planes,
                                               s.k, s.l, s.height, s.width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launched = true;
    };
    if (bh.scalar_type() == at::kDouble) {
      launch(double(0));
    } else {
      launch(float(0));
    }
  });
  return launched ? out : lowrank_filter_aten(xc, bh, bw, wc, cc, s);
}

// spectrum (N, H, W//2+1) *= the published circular mask of plane n's channel, in place.
template <typename acc_t>
__global__ void circular_mask_kernel(c10::complex<acc_t>* __restrict__ spectrum, int64_t total, int height,
                                     int width, int half_width, const float* __restrict__ lam, int64_t channels,
                                     double radius_sq) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int col = static_cast<int>(i % half_width);
  const int64_t row_plane = i / half_width;
  const int row = static_cast<int>(row_plane % height);
  const int64_t plane = row_plane / height;
  // Signed frequencies of the natural layout; the integer squared distance makes d == r exact.
  const int64_t u = row < (height + 1) / 2 ? row : row - height;
  const int64_t v = col < (width + 1) / 2 ? col : col - width;
  const double d2 = static_cast<double>(u * u + v * v);
  const float balance = lam[channels > 1 ? plane % channels : 0];
  // float32 values as the published mask: lam inside, 1/3 on the circle, 1 - lam outside.
  const float value = d2 < radius_sq ? balance : (d2 == radius_sq ? 1.0f / 3.0f : 1.0f - balance);
  spectrum[i] *= static_cast<acc_t>(value);
}

at::Tensor circular_fft_filter_cuda(const at::Tensor& x, const at::Tensor& lam, double radius) {
  TORCH_CHECK(x.is_cuda(), "circular_fft_filter_kernel (CUDA): x must be a CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "circular_fft_filter_kernel: x must be float32 or float64 (the compute dtype), got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, "circular_fft_filter_kernel: x must be (..., H, W), got shape ", x.sizes());
  TORCH_CHECK(lam.scalar_type() == at::kFloat, "circular_fft_filter_kernel: lam must be float32, got ",
              lam.scalar_type());
  TORCH_CHECK(lam.dim() <= 1, "circular_fft_filter_kernel: lam must be 0-d or (C,), got shape ", lam.sizes());
  TORCH_CHECK(lam.device() == x.device(), "circular_fft_filter_kernel: lam must be on x's device ", x.device());
  TORCH_CHECK(radius >= 0, "circular_fft_filter_kernel: radius must be non-negative, got ", radius);
  const int64_t channels = lam.numel();
  TORCH_CHECK(channels == 1 || (x.dim() >= 3 && x.size(-3) == channels), "circular_fft_filter_kernel: lam has ",
              channels, " entries but x of shape ", x.sizes(), " has ", x.dim() >= 3 ? x.size(-3) : 0,
              " channels (dim -3)");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t height = x.size(-2), width = x.size(-1);
  at::Tensor spectrum = at::fft_rfft2(x.contiguous(), std::nullopt, {-2, -1}, "ortho").contiguous();
  const int64_t total = spectrum.numel();
  if (total > 0) {
    const at::Tensor lam_c = lam.contiguous();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t blocks = (total + kThreads - 1) / kThreads;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circular_fft_filter_cuda", [&] {
      circular_mask_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          reinterpret_cast<c10::complex<scalar_t>*>(spectrum.data_ptr()), total, static_cast<int>(height),
          static_cast<int>(width), static_cast<int>(width / 2 + 1), lam_c.const_data_ptr<float>(), channels,
          radius * radius);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const std::array<int64_t, 2> size{height, width};
  return at::fft_irfft2(spectrum, at::IntArrayRef(size), {-2, -1}, "ortho");
}

}  // namespace

TORCH_LIBRARY_IMPL(spanet, CUDA, m) {
  m.impl("lowrank_filter_kernel", &lowrank_filter_cuda);
  m.impl("circular_fft_filter_kernel", &circular_fft_filter_cuda);
}

}  // namespace spanet
