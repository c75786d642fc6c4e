// CPU kernel of the spanet kernel op depthwise_row_weight_grad_kernel: the weight and bias
// gradients of a depthwise (1, k) convolution (stride 1, dilation 1, padding (0, p)) on
// channels_last maps,
//   grad_weight[c, 0, 0, j] = sum_{b, h, w} g[b, c, h, w] x[b, c, h, w + j - p]   (x = 0 outside)
//   grad_bias[c]            = sum_{b, h, w} g[b, c, h, w].
// oneDNN's weight gradient for this shape (SPAM's (1, 7) conv) is several times slower than
// for its (7, 1) twin; this is one pass over g and x. Each task takes whole image rows: for a
// block of channels it keeps the k + 1 sums in registers across the row (channels are
// contiguous in channels_last), then adds them into its own float64 totals, so the result
// does not depend on the thread count beyond the order of those float64 additions.
// Other layouts and dtypes go to at::convolution_backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace spanet {
namespace {

constexpr int64_t kMaxTaps = 15;
constexpr int64_t kChannelBlock = 16;

// Sums of one image row for channels [c0, c0 + kChannelBlock): acc[j] for tap j, acc[taps] for the bias.
template <typename scalar_t>
void row_block_sums(const scalar_t* g, const scalar_t* x, int64_t width_out, int64_t width_in, int64_t channels,
                    int64_t taps, int64_t padding, scalar_t (*acc)[kChannelBlock]) {
  for (int64_t wo = 0; wo < width_out; ++wo) {
    const scalar_t* grow = g + wo * channels;
    for (int64_t cc = 0; cc < kChannelBlock; ++cc) acc[taps][cc] += grow[cc];
    const int64_t j_begin = std::max<int64_t>(0, padding - wo);
    const int64_t j_end = std::min<int64_t>(taps, width_in + padding - wo);
    for (int64_t j = j_begin; j < j_end; ++j) {
      const scalar_t* xrow = x + (wo + j - padding) * channels;
      for (int64_t cc = 0; cc < kChannelBlock; ++cc) acc[j][cc] += grow[cc] * xrow[cc];
    }
  }
}

template <typename scalar_t>
void weight_grad_channels_last(const at::Tensor& g, const at::Tensor& x, int64_t taps, int64_t padding,
                               at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width_in = x.size(3);
  const int64_t width_out = g.size(3);
  const int64_t rows = batch * height, full_blocks = channels / kChannelBlock;
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t threads = at::get_num_threads();
  // Per-task float64 totals, (taps + 1) x channels each, summed in task order at the end.
  std::vector<double> totals(static_cast<size_t>(threads * (taps + 1) * channels), 0.0);
  const int64_t grain = std::max<int64_t>(1, rows / threads);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    double* mine = totals.data() + at::get_thread_num() * (taps + 1) * channels;
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* grow = gp + row * width_out * channels;
      const scalar_t* xrow = xp + row * width_in * channels;
      for (int64_t block = 0; block < full_blocks; ++block) {
        const int64_t c0 = block * kChannelBlock;
        scalar_t acc[kMaxTaps + 1][kChannelBlock] = {};
        row_block_sums(grow + c0, xrow + c0, width_out, width_in, channels, taps, padding, acc);
        for (int64_t j = 0; j <= taps; ++j)
          for (int64_t cc = 0; cc < kChannelBlock; ++cc) mine[j * channels + c0 + cc] += acc[j][cc];
      }
      for (int64_t c = full_blocks * kChannelBlock; c < channels; ++c) {  // channels past the last block
        for (int64_t wo = 0; wo < width_out; ++wo) {
          const double gv = grow[wo * channels + c];
          mine[taps * channels + c] += gv;
          for (int64_t j = 0; j < taps; ++j) {
            const int64_t wi = wo + j - padding;
            if (wi >= 0 && wi < width_in) mine[j * channels + c] += gv * xrow[wi * channels + c];
          }
        }
      }
    }
  });
  std::vector<double> sum(static_cast<size_t>((taps + 1) * channels), 0.0);
  for (int64_t t = 0; t < threads; ++t)
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += totals[t * sum.size() + i];
  auto gw = grad_weight.accessor<scalar_t, 4>();
  auto gb = grad_bias.accessor<scalar_t, 1>();
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t j = 0; j < taps; ++j) gw[c][0][0][j] = static_cast<scalar_t>(sum[j * channels + c]);
    gb[c] = static_cast<scalar_t>(sum[taps * channels + c]);
  }
}

std::tuple<at::Tensor, at::Tensor> depthwise_row_weight_grad_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& weight, int64_t padding) {
  TORCH_CHECK(x.dim() == 4 && grad.dim() == 4, "depthwise_row_weight_grad_kernel: x and grad must be 4-D, got ",
              x.sizes(), " and ", grad.sizes());
  const int64_t channels = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == channels && weight.size(1) == 1 && weight.size(2) == 1,
              "depthwise_row_weight_grad_kernel: weight must be (C, 1, 1, k) with C = ", channels, ", got ",
              weight.sizes());
  const int64_t taps = weight.size(3);
  TORCH_CHECK(padding >= 0, "depthwise_row_weight_grad_kernel: padding must be >= 0, got ", padding);
  const int64_t width_out = x.size(3) + 2 * padding - taps + 1;
  TORCH_CHECK(grad.size(0) == x.size(0) && grad.size(1) == channels && grad.size(2) == x.size(2) &&
                  grad.size(3) == width_out,
              "depthwise_row_weight_grad_kernel: grad must be (", x.size(0), ", ", channels, ", ", x.size(2), ", ",
              width_out, "), got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "depthwise_row_weight_grad_kernel: grad, x and weight must share a dtype");
  const bool native = (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) && taps <= kMaxTaps &&
                      x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                      grad.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (!native) {
    auto grads = at::convolution_backward(grad, x, weight, at::IntArrayRef{channels}, {1, 1}, {0, padding}, {1, 1},
                                          false, {0, 0}, channels, {false, true, true});
    return {std::get<1>(grads), std::get<2>(grads)};
  }
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_bias = at::empty({channels}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_row_weight_grad_cpu", [&] {
    weight_grad_channels_last<scalar_t>(grad, x, taps, padding, grad_weight, grad_bias);
  });
  return {grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(spanet, CPU, m) {
  m.impl("depthwise_row_weight_grad_kernel", &depthwise_row_weight_grad_cpu);
}

}  // namespace spanet
