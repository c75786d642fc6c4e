// CPU kernel of the spanet kernel op lowrank_filter_kernel: the fused separable low-rank
// spectral filter (spanet_ops/plans.py explains the form).
//
// Per plane x (H x W) with the real partial-DFT bases A (2K x H) and B (2L x W):
//   analysis   G = A x B^T                  (2K x 2L)
//   scaling    Z = [[R, Q], [Q, -R]],  R = w (G_ac - G_bd),  Q = w (G_bc + G_ad)
//   synthesis  y = alpha * src + A^T Z B
// exactly as spanet_ops/algorithms.py (_coefficient_scale, analysis, synthesis).
// The bases arrive factored by the plan (spanet_ops.plans.Factors): A = S_A U_A with U_A the
// distinct non-zero rows (cosines of each distinct |k| first, even under h -> H - h, then sines,
// odd), and a row index and sign per row of A; likewise B. All passes run on U_A and U_B: the
// analysis computes U_A x U_B^T and spreads it with the signs; the synthesis first folds the
// signs into the coefficients, S_A^T Z S_B.
// Each plane is read once from memory (the synthesis re-reads it from L1/L2 for the
// constant term) and written once, in address order with streaming stores from the
// thread's workspace, while the next plane is requested; planes whose dtype or width does
// not suit the vector loops go through a per-thread padded buffer in the compute dtype.
// For the row structures of the published discs both passes are folded: a row of U_A and its
// mirror h -> H - h share their factors up to the parity, which halves the multiply-adds (see
// FoldedPasses); other masks take the plain passes.
// Planes are spread over threads with at::parallel_for (OpenMP); the inner loops work
// on register blocks of fixed size that the compiler vectorises.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../spanet_ops.h"

namespace spanet {
namespace {

// One 256-bit vector of the compute dtype (GCC/Clang vector extension: explicit SIMD
// without ISA intrinsics; split into two 128-bit halves where AVX is absent). Rows are
// whole vectors (the workspace copy of a plane, and the column basis, are padded with zero
// columns), so every inner loop runs on whole vectors. The unaligned vector type aliases
// its element type.
template <typename acc_t>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef float unaligned __attribute__((vector_size(32), aligned(4)));
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef double unaligned __attribute__((vector_size(32), aligned(8)));
};
template <typename acc_t>
using vec_t = typename Simd<acc_t>::type;
template <typename acc_t>
constexpr int64_t kLanes = sizeof(vec_t<acc_t>) / sizeof(acc_t);

template <typename acc_t>
inline vec_t<acc_t> load(const acc_t* p) {
  return *reinterpret_cast<const typename Simd<acc_t>::unaligned*>(p);
}
template <typename acc_t>
inline void store(acc_t* p, vec_t<acc_t> v) {
  *reinterpret_cast<typename Simd<acc_t>::unaligned*>(p) = v;
}
// Every lane a: one broadcast (from memory where a is loaded); the portable `vec_t{} + a`
// adds 0.0 first, an extra dependent instruction in the inner loops.
template <typename acc_t>
inline vec_t<acc_t> splat(acc_t a) {
#ifdef __AVX__
  if constexpr (std::is_same_v<acc_t, float>) {
    return (vec_t<acc_t>)_mm256_set1_ps(a);
  } else {
    return (vec_t<acc_t>)_mm256_set1_pd(a);
  }
#else
  return vec_t<acc_t>{} + a;
#endif
}
// Sum of a vector's lanes by halving shuffles in registers (a lane-by-lane loop goes through
// the stack, and its narrow reloads of a wide store stall store-to-load forwarding).
template <typename acc_t>
inline acc_t hsum(vec_t<acc_t> v) {
  if constexpr (kLanes<acc_t> == 8) {
    typedef acc_t half_t __attribute__((vector_size(16)));
    half_t h = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
    h += __builtin_shufflevector(h, h, 2, 3, 0, 1);
    h += __builtin_shufflevector(h, h, 1, 0, 3, 2);
    return h[0];
  } else {
    typedef acc_t half_t __attribute__((vector_size(16)));
    half_t h = __builtin_shufflevector(v, v, 0, 1) + __builtin_shufflevector(v, v, 2, 3);
    return h[0] + h[1];
  }
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The factored bases of one call, laid out for the plane loops.
template <typename acc_t>
struct Geometry {
  int64_t height, width, padded, k2, l2;  // k2 = 2K, l2 = 2L, padded = width rounded up to kLanes
  int64_t rows, cols;                     // rows of U_A and U_B
  std::vector<int64_t> row_of, col_of;    // (2K), (2L): row of U_A / U_B behind each row of A / B, -1 if zero
  std::vector<acc_t> row_sign, col_sign;  // (2K), (2L)
  std::vector<acc_t> unique_t;            // (H, rows): U_A transposed, a row's factors contiguous
  std::vector<acc_t> unique_w;            // (cols, padded): U_B with zero columns beyond W
  int64_t even_rows;                      // U_A's rows are [even_rows even, then odd] in h <-> H-h; -1: unknown

  Geometry(const LowRankArgs& f)
      : height(f.row_factors.size(1)), width(f.col_factors.size(1)), padded(round_up(width, kLanes<acc_t>)),
        k2(f.row_index.size(0)), l2(f.col_index.size(0)), rows(f.row_factors.size(0)), cols(f.col_factors.size(0)),
        even_rows(f.even_rows) {
    const at::Tensor ri = f.row_index.contiguous(), ci = f.col_index.contiguous();
    row_of.assign(ri.const_data_ptr<int64_t>(), ri.const_data_ptr<int64_t>() + k2);
    col_of.assign(ci.const_data_ptr<int64_t>(), ci.const_data_ptr<int64_t>() + l2);
    const at::Tensor rs = f.row_sign.contiguous(), cs = f.col_sign.contiguous();
    row_sign.assign(rs.const_data_ptr<acc_t>(), rs.const_data_ptr<acc_t>() + k2);
    col_sign.assign(cs.const_data_ptr<acc_t>(), cs.const_data_ptr<acc_t>() + l2);
    const at::Tensor ua = f.row_factors.contiguous(), ub = f.col_factors.contiguous();
    const acc_t* a = ua.const_data_ptr<acc_t>();
    const acc_t* b = ub.const_data_ptr<acc_t>();
    unique_t.resize(height * rows);
    for (int64_t u = 0; u < rows; ++u)
      for (int64_t h = 0; h < height; ++h) unique_t[h * rows + u] = a[u * height + h];
    unique_w.assign(cols * padded, acc_t(0));
    for (int64_t v = 0; v < cols; ++v)
      for (int64_t w = 0; w < width; ++w) unique_w[v * padded + w] = b[v * width + w];
  }
};

// Scratch of one thread, reused across its planes.
template <typename acc_t>
struct Workspace {
  std::vector<acc_t> plane;  // (H, padded): the plane in the compute dtype; the synthesis overwrites it
  std::vector<acc_t> proj;   // (rows, padded): U_A x, later S_A^T Z S_B U_B
  std::vector<acc_t> grid;   // (2K, 2L): G, later Z
  std::vector<acc_t> core;   // (rows, cols): U_A x U_B^T, later S_A^T Z S_B

  explicit Workspace(const Geometry<acc_t>& g)
      : plane(g.height * g.padded, acc_t(0)), proj(g.rows * g.padded), grid(g.k2 * g.l2), core(g.rows * g.cols) {}
};

template <typename scalar_t, typename acc_t>
void load_plane(const scalar_t* src, const Geometry<acc_t>& g, Workspace<acc_t>& ws) {
  acc_t* plane = ws.plane.data();
  for (int64_t h = 0; h < g.height; ++h) {
    acc_t* row = plane + h * g.padded;
    const scalar_t* in = src + h * g.width;
    for (int64_t w = 0; w < g.width; ++w) row[w] = static_cast<acc_t>(in[w]);
    for (int64_t w = g.width; w < g.padded; ++w) row[w] = 0;
  }
}

// Orders this thread's streaming stores before the parallel region ends.
inline void store_fence() {
#ifdef __AVX__
  _mm_sfence();
#endif
}

template <typename scalar_t, typename acc_t>
void store_plane(const Geometry<acc_t>& g, const Workspace<acc_t>& ws, scalar_t* dst) {
  const acc_t* plane = ws.plane.data();
  for (int64_t h = 0; h < g.height; ++h) {
    const acc_t* row = plane + h * g.padded;
    scalar_t* out = dst + h * g.width;
    for (int64_t w = 0; w < g.width; ++w) out[w] = static_cast<scalar_t>(row[w]);
  }
}

// proj[u0 + i, w0 : w0 + NV vectors] = sum_h U[u0 + i, h] x[h, ...] for PG rows of U, with
// PG x NV vector accumulators in registers (independent FMA chains).
template <typename acc_t, int PG, int NV>
inline void project_block(const acc_t* __restrict__ x, const acc_t* __restrict__ ut, acc_t* __restrict__ proj,
                          int64_t height, int64_t padded, int64_t rows, int64_t u0, int64_t w0) {
  constexpr int64_t lanes = kLanes<acc_t>;
  vec_t<acc_t> acc[PG][NV];
  for (int i = 0; i < PG; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = vec_t<acc_t>{};
  for (int64_t h = 0; h < height; ++h) {
    vec_t<acc_t> xv[NV];
    for (int j = 0; j < NV; ++j) xv[j] = load(x + h * padded + w0 + j * lanes);
    for (int i = 0; i < PG; ++i) {
      const vec_t<acc_t> a = splat(ut[h * rows + u0 + i]);
      for (int j = 0; j < NV; ++j) acc[i][j] += a * xv[j];
    }
  }
  for (int i = 0; i < PG; ++i)
    for (int j = 0; j < NV; ++j) store(proj + (u0 + i) * padded + w0 + j * lanes, acc[i][j]);
}

template <typename acc_t, int NV>
inline void project_columns(const Geometry<acc_t>& g, const acc_t* x, Workspace<acc_t>& ws, int64_t w0) {
  const acc_t* ut = g.unique_t.data();
  acc_t* proj = ws.proj.data();
  int64_t u0 = 0;
  for (; u0 + 4 <= g.rows; u0 += 4) project_block<acc_t, 4, NV>(x, ut, proj, g.height, g.padded, g.rows, u0, w0);
  for (; u0 + 2 <= g.rows; u0 += 2) project_block<acc_t, 2, NV>(x, ut, proj, g.height, g.padded, g.rows, u0, w0);
  for (; u0 < g.rows; ++u0) project_block<acc_t, 1, NV>(x, ut, proj, g.height, g.padded, g.rows, u0, w0);
}

// The folded passes (rows of U_A even then odd under h -> H - h, R rows of which E even):
// rows h and H - h share their factors up to the sign, so the analysis sums
// U[u, h] (x[h] +- x[H - h]) over h <= H/2 and the synthesis forms E = sum over even rows and
// O = sum over odd rows once for both output rows, h getting E + O and H - h getting E - O.
// Half the multiply-adds of the plain passes. Odd rows vanish at h = 0 and h = H/2.

// proj[0:R, w0 : w0 + NV vectors] = U_A x, folded: R x NV vector accumulators.
template <typename acc_t, int R, int E, int NV>
inline void project_folded(const acc_t* __restrict__ x, const acc_t* __restrict__ ut, acc_t* __restrict__ proj,
                           int64_t height, int64_t padded, int64_t w0) {
  constexpr int64_t lanes = kLanes<acc_t>;
  vec_t<acc_t> acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = vec_t<acc_t>{};
  auto accumulate = [&](int64_t h, const vec_t<acc_t>* sum, const vec_t<acc_t>* diff, bool paired) {
    for (int i = 0; i < R; ++i) {
      if (i >= E && !paired) break;
      const vec_t<acc_t> f = splat(ut[h * R + i]);
      for (int j = 0; j < NV; ++j) acc[i][j] += f * (i < E ? sum[j] : diff[j]);
    }
  };
  vec_t<acc_t> sum[NV], diff[NV];
  for (int j = 0; j < NV; ++j) sum[j] = load(x + w0 + j * lanes);
  accumulate(0, sum, diff, false);
  const int64_t pairs = (height - 1) / 2;
  for (int64_t h = 1; h <= pairs; ++h) {
    for (int j = 0; j < NV; ++j) {
      const vec_t<acc_t> a = load(x + h * padded + w0 + j * lanes), b = load(x + (height - h) * padded + w0 + j * lanes);
      sum[j] = a + b;
      diff[j] = a - b;
    }
    accumulate(h, sum, diff, true);
  }
  if (height % 2 == 0) {
    for (int j = 0; j < NV; ++j) sum[j] = load(x + (height / 2) * padded + w0 + j * lanes);
    accumulate(height / 2, sum, diff, false);
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) store(proj + i * padded + w0 + j * lanes, acc[i][j]);
}

// dst rows h and its mirror H - h (mirror < 0: none) = alpha * src + (E +- O), columns w0 : w0 + NV
// vectors. src and dst may be the same buffer: both source rows are read before either is written.
template <typename acc_t, int R, int E, int NV>
inline void synthesise_folded(const acc_t* src, acc_t* dst, const acc_t* __restrict__ ut, const acc_t* __restrict__ proj,
                              int64_t padded, acc_t alpha, int64_t h, int64_t mirror, int64_t w0) {
  constexpr int64_t lanes = kLanes<acc_t>;
  vec_t<acc_t> even[NV], odd[NV];
  for (int j = 0; j < NV; ++j) even[j] = odd[j] = vec_t<acc_t>{};
  for (int i = 0; i < R; ++i) {
    const vec_t<acc_t> f = splat(ut[h * R + i]);
    for (int j = 0; j < NV; ++j) {
      const vec_t<acc_t> p = load(proj + i * padded + w0 + j * lanes);
      if (i < E) {
        even[j] += f * p;
      } else {
        odd[j] += f * p;
      }
    }
  }
  const vec_t<acc_t> scale = splat(alpha);
  for (int j = 0; j < NV; ++j) {
    const int64_t at = h * padded + w0 + j * lanes;
    if (mirror >= 0) {
      const int64_t at_mirror = mirror * padded + w0 + j * lanes;
      const vec_t<acc_t> top = scale * load(src + at), bottom = scale * load(src + at_mirror);
      store(dst + at, top + even[j] + odd[j]);
      store(dst + at_mirror, bottom + even[j] - odd[j]);
    } else {
      store(dst + at, scale * load(src + at) + even[j] + odd[j]);
    }
  }
}

// Both folded passes over a whole plane, for one (R, E); NV = 2 vectors per column block.
template <typename acc_t, int R, int E>
struct FoldedPasses {
  static void project(const acc_t* x, const acc_t* ut, acc_t* proj, int64_t height, int64_t padded) {
    constexpr int64_t lanes = kLanes<acc_t>;
    int64_t w0 = 0;
    for (; w0 + 2 * lanes <= padded; w0 += 2 * lanes) project_folded<acc_t, R, E, 2>(x, ut, proj, height, padded, w0);
    if (w0 < padded) project_folded<acc_t, R, E, 1>(x, ut, proj, height, padded, w0);
  }

  static void synthesise(const acc_t* src, acc_t* dst, const acc_t* ut, const acc_t* proj, int64_t height,
                         int64_t padded, acc_t alpha) {
    constexpr int64_t lanes = kLanes<acc_t>;
    for (int64_t h = 0; h <= height / 2; ++h) {
      const int64_t mirror = (h == 0 || 2 * h == height) ? -1 : height - h;
      int64_t w0 = 0;
      for (; w0 + 2 * lanes <= padded; w0 += 2 * lanes)
        synthesise_folded<acc_t, R, E, 2>(src, dst, ut, proj, padded, alpha, h, mirror, w0);
      if (w0 < padded) synthesise_folded<acc_t, R, E, 1>(src, dst, ut, proj, padded, alpha, h, mirror, w0);
    }
  }
};

// The folded passes for the row structures of the published discs (r = 2: cos 0..2, sin 1..2;
// r = 1: cos 0..1, sin 1; r < 1: cos 0), or nullptrs: the plain passes then serve.
template <typename acc_t>
struct Folded {
  void (*project)(const acc_t*, const acc_t*, acc_t*, int64_t, int64_t) = nullptr;
  void (*synthesise)(const acc_t*, acc_t*, const acc_t*, const acc_t*, int64_t, int64_t, acc_t) = nullptr;

  explicit Folded(const Geometry<acc_t>& g) {
    if (g.height < 3) return;
    if (g.rows == 5 && g.even_rows == 3) set<5, 3>();
    if (g.rows == 3 && g.even_rows == 2) set<3, 2>();
    if (g.rows == 1 && g.even_rows == 1) set<1, 1>();
  }

  template <int R, int E>
  void set() {
    project = &FoldedPasses<acc_t, R, E>::project;
    synthesise = &FoldedPasses<acc_t, R, E>::synthesise;
  }
};

// Analysis of the plane x (H x padded): proj = U_A x (rows x padded), core = proj U_B^T, then
// grid = S_A core S_B^T = A x B^T (2K x 2L).
template <typename acc_t>
void analyse(const Geometry<acc_t>& g, const Folded<acc_t>& folded, const acc_t* x, Workspace<acc_t>& ws) {
  constexpr int64_t lanes = kLanes<acc_t>;
  if (folded.project != nullptr) {
    folded.project(x, g.unique_t.data(), ws.proj.data(), g.height, g.padded);
  } else {
    int64_t w0 = 0;
    for (; w0 + 2 * lanes <= g.padded; w0 += 2 * lanes) project_columns<acc_t, 2>(g, x, ws, w0);
    if (w0 < g.padded) project_columns<acc_t, 1>(g, x, ws, w0);
  }
  const acc_t* proj = ws.proj.data();
  const acc_t* ub = g.unique_w.data();
  acc_t* core = ws.core.data();
  for (int64_t u = 0; u < g.rows; ++u) {
    for (int64_t v = 0; v < g.cols; ++v) {
      vec_t<acc_t> lane{};  // per-lane partial sums, added up at the end
      for (int64_t w = 0; w < g.padded; w += lanes) lane += load(proj + u * g.padded + w) * load(ub + v * g.padded + w);
      core[u * g.cols + v] = hsum<acc_t>(lane);
    }
  }
  acc_t* grid = ws.grid.data();
  for (int64_t p = 0; p < g.k2; ++p) {
    for (int64_t q = 0; q < g.l2; ++q) {
      const bool zero = g.row_of[p] < 0 || g.col_of[q] < 0;
      grid[p * g.l2 + q] = zero ? acc_t(0) : g.row_sign[p] * g.col_sign[q] * core[g.row_of[p] * g.cols + g.col_of[q]];
    }
  }
}

// grid G -> Z in place, with the per-bin weights w (K x L) (algorithms._coefficient_scale).
template <typename acc_t>
void scale(const acc_t* weight, const Geometry<acc_t>& g, Workspace<acc_t>& ws) {
  const int64_t K = g.k2 / 2, L = g.l2 / 2, ld = g.l2;
  acc_t* z = ws.grid.data();
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t l = 0; l < L; ++l) {
      const acc_t pac = z[k * ld + l], pad = z[k * ld + L + l];
      const acc_t pbc = z[(K + k) * ld + l], pbd = z[(K + k) * ld + L + l];
      const acc_t w = weight[k * L + l];
      const acc_t r = w * (pac - pbd), q = w * (pbc + pad);
      z[k * ld + l] = r;
      z[k * ld + L + l] = q;
      z[(K + k) * ld + l] = q;
      z[(K + k) * ld + L + l] = -r;
    }
  }
}

// proj = (S_A^T Z S_B) U_B (rows x padded) from the coefficients z (2K x 2L), so that
// A^T Z B = U_A^T proj.
template <typename acc_t>
void expand(const acc_t* z, const Geometry<acc_t>& g, Workspace<acc_t>& ws) {
  acc_t* core = ws.core.data();
  std::fill(ws.core.begin(), ws.core.end(), acc_t(0));
  for (int64_t p = 0; p < g.k2; ++p) {
    if (g.row_of[p] < 0) continue;
    for (int64_t q = 0; q < g.l2; ++q) {
      if (g.col_of[q] < 0) continue;
      core[g.row_of[p] * g.cols + g.col_of[q]] += g.row_sign[p] * g.col_sign[q] * z[p * g.l2 + q];
    }
  }
  const acc_t* ub = g.unique_w.data();
  acc_t* proj = ws.proj.data();
  for (int64_t u = 0; u < g.rows; ++u) {
    for (int64_t w = 0; w < g.padded; w += kLanes<acc_t>) {
      vec_t<acc_t> acc{};
      for (int64_t v = 0; v < g.cols; ++v) acc += splat(core[u * g.cols + v]) * load(ub + v * g.padded + w);
      store(proj + u * g.padded + w, acc);
    }
  }
}

// Copy count values (a multiple of the vector width; dst vector-aligned) to dst with
// streaming stores, in address order: whole cache lines go out without first reading them.
// The synthesis writes its row blocks to the workspace first, because streaming its strided
// partial lines straight to memory is several times slower. Meanwhile the same span of the
// next plane (ahead, if any) is requested line by line, so that its analysis finds it in
// cache; one request per line written keeps the memory system busy without the stall that
// a burst of requests for a whole plane causes.
template <typename acc_t>
inline void stream_plane(const acc_t* __restrict__ src, acc_t* __restrict__ dst, int64_t count, const char* ahead) {
  constexpr int64_t kLineValues = 64 / sizeof(acc_t);
  for (int64_t i = 0; i < count; i += kLanes<acc_t>) {
    if (ahead != nullptr && i % kLineValues == 0) __builtin_prefetch(ahead + i * sizeof(acc_t), 0, 1);
#ifdef __AVX__
    if constexpr (std::is_same_v<acc_t, float>) {
      _mm256_stream_ps(dst + i, (__m256)load(src + i));
      continue;
    } else if constexpr (std::is_same_v<acc_t, double>) {
      _mm256_stream_pd(dst + i, (__m256d)load(src + i));
      continue;
    }
#endif
    store(dst + i, load(src + i));
  }
}

// dst[h0 + r, w0 : w0 + NV vectors] = alpha * src[...] + sum_u U_A[u, h0 + r] proj[u, ...] for RH
// rows, with RH x NV vector accumulators in registers. src and dst (stride padded) may be the
// same buffer: every value is read before any is written.
template <typename acc_t, int RH, int NV>
inline void synthesise_block(const acc_t* src, acc_t* dst, const acc_t* __restrict__ ut,
                             const acc_t* __restrict__ proj, int64_t padded, int64_t rows, acc_t alpha, int64_t h0,
                             int64_t w0) {
  constexpr int64_t lanes = kLanes<acc_t>;
  vec_t<acc_t> acc[RH][NV];
  const int64_t offset = h0 * padded + w0;
  const vec_t<acc_t> scale = splat(alpha);
  for (int r = 0; r < RH; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = scale * load(src + offset + r * padded + j * lanes);
  const acc_t* a = ut + h0 * rows;
  for (int64_t u = 0; u < rows; ++u) {
    vec_t<acc_t> v[NV];
    for (int j = 0; j < NV; ++j) v[j] = load(proj + u * padded + w0 + j * lanes);
    for (int r = 0; r < RH; ++r) {
      const vec_t<acc_t> f = splat(a[r * rows + u]);
      for (int j = 0; j < NV; ++j) acc[r][j] += f * v[j];
    }
  }
  for (int r = 0; r < RH; ++r)
    for (int j = 0; j < NV; ++j) store(dst + offset + r * padded + j * lanes, acc[r][j]);
}

template <typename acc_t, int NV>
inline void synthesise_columns(const Geometry<acc_t>& g, const Workspace<acc_t>& ws, acc_t alpha, const acc_t* src,
                               acc_t* dst, int64_t w0) {
  const acc_t* ut = g.unique_t.data();
  const acc_t* proj = ws.proj.data();
  int64_t h0 = 0;
  for (; h0 + 4 <= g.height; h0 += 4)
    synthesise_block<acc_t, 4, NV>(src, dst, ut, proj, g.padded, g.rows, alpha, h0, w0);
  for (; h0 < g.height; ++h0)
    synthesise_block<acc_t, 1, NV>(src, dst, ut, proj, g.padded, g.rows, alpha, h0, w0);
}

// dst = alpha * src + A^T Z B (planes H x padded), given proj from expand().
template <typename acc_t>
void synthesise(const Geometry<acc_t>& g, const Folded<acc_t>& folded, const Workspace<acc_t>& ws, acc_t alpha,
                const acc_t* src, acc_t* dst) {
  if (folded.synthesise != nullptr) {
    folded.synthesise(src, dst, g.unique_t.data(), ws.proj.data(), g.height, g.padded, alpha);
    return;
  }
  constexpr int64_t lanes = kLanes<acc_t>;
  int64_t w0 = 0;
  for (; w0 + 2 * lanes <= g.padded; w0 += 2 * lanes) synthesise_columns<acc_t, 2>(g, ws, alpha, src, dst, w0);
  if (w0 < g.padded) synthesise_columns<acc_t, 1>(g, ws, alpha, src, dst, w0);
}

// One plane: analysis of src, optional scaling, expansion, synthesis dst = alpha * base + A^T Z B.
// Where the storage is the compute dtype and rows are whole vectors, the kernels read the input
// and write the output in place (streaming stores when aligned); otherwise they work on the
// workspace's padded copy.
template <typename scalar_t, typename acc_t>
struct PlaneIO {
  static constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const Geometry<acc_t>& g;
  const Folded<acc_t> folded;
  bool direct;

  explicit PlaneIO(const Geometry<acc_t>& geometry)
      : g(geometry), folded(geometry), direct(kSameType && g.padded == g.width) {}

  // The plane as compute-dtype rows of stride padded.
  const acc_t* input(const scalar_t* src, Workspace<acc_t>& ws) const {
    if constexpr (kSameType) {
      if (direct) return src;
    }
    load_plane(src, g, ws);
    return ws.plane.data();
  }

  // dst = alpha * base + A^T Z B, with base as returned by input(); ahead: the next plane to
  // request from memory meanwhile, or nullptr.
  void output(const acc_t* base, acc_t alpha, Workspace<acc_t>& ws, scalar_t* dst, const void* ahead) const {
    if constexpr (kSameType) {
      if (direct) {
        if (reinterpret_cast<uintptr_t>(dst) % sizeof(vec_t<acc_t>) == 0) {
          synthesise<acc_t>(g, folded, ws, alpha, base, ws.plane.data());
          stream_plane(ws.plane.data(), dst, g.height * g.width, static_cast<const char*>(ahead));
        } else {
          synthesise<acc_t>(g, folded, ws, alpha, base, dst);
        }
        return;
      }
    }
    synthesise<acc_t>(g, folded, ws, alpha, base, ws.plane.data());
    store_plane(g, ws, dst);
  }
};

template <typename scalar_t, typename acc_t>
void lowrank_planes(const at::Tensor& x, const LowRankArgs& f, at::Tensor& out) {
  const Geometry<acc_t> g(f);
  const at::Tensor weight = f.weight.contiguous(), constant = f.constant.contiguous();
  const int64_t planes = weight.size(0);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = out.mutable_data_ptr<scalar_t>();
  const acc_t* wp = weight.const_data_ptr<acc_t>();
  const acc_t* cp = constant.const_data_ptr<acc_t>();
  const int64_t hw = g.height * g.width, kl = (g.k2 / 2) * (g.l2 / 2);
  const PlaneIO<scalar_t, acc_t> io(g);
  at::parallel_for(0, x.numel() / hw, 1, [&](int64_t begin, int64_t end) {
    Workspace<acc_t> ws(g);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t m = n % planes;  // plane n uses mask plane n % P
      const acc_t* plane = io.input(xp + n * hw, ws);
      analyse(g, io.folded, plane, ws);
      scale(wp + m * kl, g, ws);
      expand(ws.grid.data(), g, ws);
      io.output(plane, cp[m], ws, yp + n * hw, n + 2 < end ? xp + (n + 2) * hw : nullptr);
    }
    store_fence();
  });
}

at::Tensor lowrank_filter_cpu(const at::Tensor& x, const at::Tensor& row_factors, const at::Tensor& row_index,
                              const at::Tensor& row_sign, int64_t even_rows, const at::Tensor& col_factors,
                              const at::Tensor& col_index, const at::Tensor& col_sign, const at::Tensor& weight,
                              const at::Tensor& constant) {
  const LowRankArgs f{row_factors, row_index, row_sign, even_rows, col_factors, col_index, col_sign, weight, constant};
  check_lowrank_args(x, f);
  TORCH_CHECK(x.device().is_cpu(), "lowrank_filter_kernel (CPU): x must be a CPU tensor");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  if (xc.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "lowrank_filter_cpu", [&] {
    if (row_factors.scalar_type() == at::kDouble) {
      lowrank_planes<scalar_t, double>(xc, f, out);
    } else {
      lowrank_planes<scalar_t, float>(xc, f, out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spanet, CPU, m) {
  m.impl("lowrank_filter_kernel", &lowrank_filter_cpu);
}

}  // namespace spanet
