#include "kernels/fused_attention.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace kvcompact::kernels {
namespace {

constexpr int kThreads = 128;  // 4 warps, each owning 16 rows of an m16 tile
constexpr int kWarps = kThreads / 32;
// Forward pass: 64 query rows per block, key tiles of 64.
constexpr int kQueryTile = kWarps * 16;
constexpr int kKeyTile = 64;
// Blocks resident per multiprocessor the register budget is set for (measured on an H200: 3 beat
// 2; key tiles of 64 beat 32).
constexpr int kMinBlocks = 3;
// Scores pass: 32 keys (two m-tiles) per warp, 128 per block; query tiles of 64.
constexpr int kScoreMTiles = 2;
constexpr int kScoreKeys = kWarps * 16 * kScoreMTiles;
constexpr int kScoreQueries = 64;
// The 16-bit copies are padded to whole tiles (zero rows), so every tile load is in bounds.
constexpr int64_t kPad = 128;
static_assert(kQueryTile <= kPad && kKeyTile <= kPad && kScoreKeys <= kPad && kScoreQueries <= kPad);

// Shared-memory row strides (16-bit elements) of 8 mod 64: the eight 16-byte rows an ldmatrix
// phase reads fall in distinct banks, and every row starts 16-byte aligned for cp.async.
__host__ __device__ constexpr int Stride(int cols) { return cols + 8; }
__host__ __device__ constexpr int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void CpAsync16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(SharedAddress(dst)), "l"(src));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8 x 8 matrices of 16-bit elements, one register each; lane l gives the address of row
// l % 8 of matrix l / 8 and receives elements (l / 4, 2 (l % 4) + {0, 1}) of each (.trans: of
// each matrix's transpose).
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(row)));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(row)));
}

template <typename T16>
struct Half;
template <>
struct Half<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 From(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};
template <>
struct Half<__half> {
  static __device__ __forceinline__ __half From(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};

// c += a (16 x 16, row-major) * b (16 x 8, column-major), 16-bit inputs, fp32 accumulators (exact
// products). Lane l (g = l / 4, t = l % 4) holds a: (g, 2t..) (g+8, 2t..) (g, 2t+8..) (g+8, 2t+8..);
// b: (2t.., g) (2t+8.., g); c: (g, 2t) (g, 2t+1) (g+8, 2t) (g+8, 2t+1).
template <typename T16>
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T16, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// The A fragment of rows [0, 16) x columns [k, k + 16) of a row-major tile (row stride S).
template <int S, typename T16>
__device__ __forceinline__ void LoadA(uint32_t (&a)[4], const T16* tile, int k, int lane) {
  LdMatrixX4(a, tile + ((lane & 7) + 8 * ((lane >> 3) & 1)) * S + k + 8 * ((lane >> 4) & 1));
}
// B fragments of two n-tiles from a tile stored n-major (row = n, 16 rows, columns = k, stride S),
// columns [k, k + 16): b[0], b[1] for rows [0, 8), b[2], b[3] for rows [8, 16).
template <int S, typename T16>
__device__ __forceinline__ void LoadB2(uint32_t (&b)[4], const T16* tile, int k, int lane) {
  LdMatrixX4(b, tile + ((lane & 7) + 8 * ((lane >> 4) & 1)) * S + k + 8 * ((lane >> 3) & 1));
}
// B fragments of two n-tiles from a tile stored k-major (row = k, columns = n, stride S): rows
// [k, k + 16), columns [n, n + 8) and [n + 8, n + 16).
template <int S, typename T16>
__device__ __forceinline__ void LoadB2Trans(uint32_t (&b)[4], const T16* tile, int k, int n, int lane) {
  LdMatrixX4Trans(b, tile + (k + (lane & 7) + 8 * ((lane >> 3) & 1)) * S + n + 8 * ((lane >> 4) & 1));
}

// rows x COLS elements from global (row stride COLS) into shared memory (row stride Stride(COLS)),
// 16 bytes per cp.async.
template <int COLS, typename T16>
__device__ __forceinline__ void CopyTile(T16* dst, const T16* src, int rows) {
  constexpr int kVec = COLS / 8;
  for (int i = threadIdx.x; i < rows * kVec; i += kThreads) {
    const int r = i / kVec, c = (i % kVec) * 8;
    CpAsync16(dst + r * Stride(COLS) + c, src + static_cast<int64_t>(r) * COLS + c);
  }
}

// dst[h][r][c] = src[h][r][c] in 16 bits for r < rows, 0 up to padded_rows.
template <typename T16>
__global__ void ConvertRowsKernel(const float* src, int64_t rows, int64_t padded_rows, int64_t cols, int64_t total,
                                  T16* dst) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t h = i / (padded_rows * cols), r = i / cols % padded_rows, c = i % cols;
    dst[i] = Half<T16>::From(r < rows ? src[(h * rows + r) * cols + c] : 0.f);
  }
}

template <typename T16>
struct Prepared {
  const T16 *q, *k, *v;
  int64_t n_pad, t_pad;
};

template <int D, int DV>
struct ForwardLayout {
  static constexpr int kStage = kKeyTile * (Stride(D) + Stride(DV));  // a K tile and a V tile
  static constexpr int kStages = 2 * kStage > kQueryTile * Stride(D) ? 2 * kStage : kQueryTile * Stride(D);
  static constexpr size_t kBytes = 2 * kStages + sizeof(float) * 2 * kKeyTile;
};

// Row max, mass and outputs of a 64-row query tile of one head (grid: query tiles x heads) by the
// online softmax over key tiles, K and V tiles double-buffered by cp.async; the probabilities go
// from the logits' accumulators to the A fragments of P V in registers.
template <typename T16, int D, int DV>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    ForwardKernel(Prepared<T16> in, int64_t n, const float* bias, int64_t T, float scale, float* row_max, float* mass,
                  float* outputs) {
  using L = ForwardLayout<D, DV>;
  constexpr int KS = Stride(D), VS = Stride(DV);
  // Logits are carried in base 2 (x = log2(e) L): exp2 is the hardware's exponential.
  constexpr float kLog2e = 1.4426950408889634f;
  const float scale2 = scale * kLog2e;
  extern __shared__ float4 shared4[];
  T16* stages = reinterpret_cast<T16*>(shared4);
  float* key_bias = reinterpret_cast<float*>(stages + L::kStages);  // two tiles, log2(e) b

  const int64_t h = blockIdx.y, r0 = int64_t{blockIdx.x} * kQueryTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T16* kh = in.k + h * in.t_pad * D;
  const T16* vh = in.v + h * in.t_pad * DV;
  if (bias) bias += h * T;

  // The warp's 16 query rows stay in registers as A fragments.
  CopyTile<D>(stages, in.q + (h * in.n_pad + r0) * D, kQueryTile);
  CpAsyncCommit();
  CpAsyncWait<0>();
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) LoadA<KS>(qf[kk], stages + warp * 16 * KS, kk * 16, lane);
  __syncthreads();

  auto load_tile = [&](int64_t j0, int stage) {
    T16* ks = stages + stage * L::kStage;
    CopyTile<D>(ks, kh + j0 * D, kKeyTile);
    CopyTile<DV>(ks + kKeyTile * KS, vh + j0 * DV, kKeyTile);
  };
  float o[DV / 8][4] = {};
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};  // rows g and g + 8
  const int64_t tiles = (T + kKeyTile - 1) / kKeyTile;
  load_tile(0, 0);
  CpAsyncCommit();
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int stage = static_cast<int>(tile & 1);
    const int64_t j0 = tile * kKeyTile;
    if (tile + 1 < tiles) load_tile(j0 + kKeyTile, stage ^ 1);
    CpAsyncCommit();
    if (threadIdx.x < kKeyTile) {
      const int64_t j = j0 + threadIdx.x;
      key_bias[stage * kKeyTile + threadIdx.x] = j < T ? (bias ? kLog2e * bias[j] : 0.f) : -INFINITY;
    }
    CpAsyncWait<1>();
    __syncthreads();
    const T16* ks = stages + stage * L::kStage;
    const T16* vs = ks + kKeyTile * KS;
    const float* bs = key_bias + stage * kKeyTile;

    float s[kKeyTile / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int pair = 0; pair < kKeyTile / 16; ++pair) {
        uint32_t b[4];
        LoadB2<KS>(b, ks + pair * 16 * KS, kk * 16, lane);
        Mma<T16>(s[2 * pair], qf[kk], b[0], b[1]);
        Mma<T16>(s[2 * pair + 1], qf[kk], b[2], b[3]);
      }
    }
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kKeyTile / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = fmaf(s[nt][e], scale2, bs[nt * 8 + 2 * t + (e & 1)]);
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[nt][e]);
      }
    }
    float m_new[2], corr[2], sum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
      m_new[r] = fmaxf(m_run[r], tile_max[r]);
      // Nothing finite yet (a bias of -inf so far): keep everything at zero.
      corr[r] = m_new[r] == -INFINITY ? 1.f : exp2f(m_run[r] - m_new[r]);
    }
#pragma unroll
    for (int nt = 0; nt < kKeyTile / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        s[nt][e] = m_new[r] == -INFINITY ? 0.f : exp2f(s[nt][e] - m_new[r]);
        sum[r] += s[nt][e];
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      sum[r] += __shfl_xor_sync(0xffffffff, sum[r], 1);
      sum[r] += __shfl_xor_sync(0xffffffff, sum[r], 2);
      l_run[r] = l_run[r] * corr[r] + sum[r];
      m_run[r] = m_new[r];
    }
#pragma unroll
    for (int nt = 0; nt < DV / 8; ++nt) {
      o[nt][0] *= corr[0];
      o[nt][1] *= corr[0];
      o[nt][2] *= corr[1];
      o[nt][3] *= corr[1];
    }
#pragma unroll
    for (int kk = 0; kk < kKeyTile / 16; ++kk) {
      // Logit tiles 2kk and 2kk + 1 are, element for element, the A fragment of keys [16kk, 16kk + 16).
      const uint32_t a[4] = {Half<T16>::Pack(s[2 * kk][0], s[2 * kk][1]), Half<T16>::Pack(s[2 * kk][2], s[2 * kk][3]),
                             Half<T16>::Pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Half<T16>::Pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int pair = 0; pair < DV / 16; ++pair) {
        uint32_t b[4];
        LoadB2Trans<VS>(b, vs, kk * 16, pair * 16, lane);
        Mma<T16>(o[2 * pair], a, b[0], b[1]);
        Mma<T16>(o[2 * pair + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // this stage is reloaded next iteration
  }
  CpAsyncWait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = r0 + warp * 16 + g + 8 * r;
    if (row >= n) continue;
    if (t == 0) {
      row_max[h * n + row] = m_run[r] / kLog2e;
      mass[h * n + row] = l_run[r];
    }
    const float inv = 1.f / l_run[r];
    float* y = outputs + (h * n + row) * DV;
#pragma unroll
    for (int nt = 0; nt < DV / 8; ++nt) {
      *reinterpret_cast<float2*>(y + nt * 8 + 2 * t) = make_float2(o[nt][2 * r] * inv, o[nt][2 * r + 1] * inv);
    }
  }
}

template <int D>
struct ScoresLayout {
  static constexpr int kStage = kScoreQueries * Stride(D);
  static constexpr int kStages = 2 * kStage > kScoreKeys * Stride(D) ? 2 * kStage : kScoreKeys * Stride(D);
  static constexpr size_t kBytes = 2 * kStages + sizeof(float) * 2 * kScoreQueries;
};

// Finished scores of 128 keys of one head (grid: key tiles x heads) over every query: the
// probabilities exp(L - M) / m = 2^(log2(e) (L - M - ln m)) recomputed from the forward pass's M
// and m, query tiles double-buffered by cp.async, each warp's 32 keys in registers as the A
// fragments of two m-tiles (so each query fragment read from shared memory serves both).
template <typename T16, int D>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    ScoresKernel(Prepared<T16> in, int64_t n, const float* bias, int64_t T, float scale, const float* row_max,
                 const float* mass, int reduce, float* scores) {
  using L = ScoresLayout<D>;
  constexpr int KS = Stride(D), QS = Stride(D);
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ float4 shared4[];
  T16* stages = reinterpret_cast<T16*>(shared4);
  float* lse2 = reinterpret_cast<float*>(stages + L::kStages);  // per stage: log2(e) (M + ln m) of each query

  const int64_t h = blockIdx.y, j0 = int64_t{blockIdx.x} * kScoreKeys;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T16* qh = in.q + h * in.n_pad * D;
  row_max += h * n;
  mass += h * n;

  CopyTile<D>(stages, in.k + (h * in.t_pad + j0) * D, kScoreKeys);
  CpAsyncCommit();
  CpAsyncWait<0>();
  __syncthreads();
  uint32_t kf[kScoreMTiles][D / 16][4];
#pragma unroll
  for (int m = 0; m < kScoreMTiles; ++m) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) LoadA<KS>(kf[m][kk], stages + (warp * kScoreMTiles + m) * 16 * KS, kk * 16, lane);
  }
  __syncthreads();

  float key_bias2[kScoreMTiles][2];  // log2(e) b_j of the thread's keys
#pragma unroll
  for (int m = 0; m < kScoreMTiles; ++m) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t j = j0 + (warp * kScoreMTiles + m) * 16 + g + 8 * r;
      key_bias2[m][r] = bias && j < T ? kLog2e * bias[h * T + j] : 0.f;
    }
  }
  const float scale2 = scale * kLog2e;
  const bool is_max = reduce == static_cast<int>(ScoreReduceKind::kMax);
  const bool squares = reduce == static_cast<int>(ScoreReduceKind::kRms);
  float acc[kScoreMTiles][2] = {};  // probabilities are >= 0, so 0 also starts the max

  const int64_t tiles = (n + kScoreQueries - 1) / kScoreQueries;
  CopyTile<D>(stages, qh, kScoreQueries);
  CpAsyncCommit();
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int stage = static_cast<int>(tile & 1);
    const int64_t i0 = tile * kScoreQueries;
    if (tile + 1 < tiles) CopyTile<D>(stages + (stage ^ 1) * L::kStage, qh + (i0 + kScoreQueries) * D, kScoreQueries);
    CpAsyncCommit();
    float* ls = lse2 + stage * kScoreQueries;
    if (threadIdx.x < kScoreQueries) {
      const int64_t i = i0 + threadIdx.x;
      ls[threadIdx.x] = i < n ? kLog2e * (row_max[i] + logf(mass[i])) : INFINITY;  // rows past n add 2^-inf = 0
    }
    CpAsyncWait<1>();
    __syncthreads();
    const T16* qs = stages + stage * L::kStage;
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // 32 queries at a time bound the accumulators
      float sc[kScoreMTiles][kScoreQueries / 16][4] = {};
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int pair = 0; pair < kScoreQueries / 32; ++pair) {
          uint32_t b[4];
          LoadB2<QS>(b, qs + (half * kScoreQueries / 2 + pair * 16) * QS, kk * 16, lane);
#pragma unroll
          for (int m = 0; m < kScoreMTiles; ++m) {
            Mma<T16>(sc[m][2 * pair], kf[m][kk], b[0], b[1]);
            Mma<T16>(sc[m][2 * pair + 1], kf[m][kk], b[2], b[3]);
          }
        }
      }
#pragma unroll
      for (int m = 0; m < kScoreMTiles; ++m) {
#pragma unroll
        for (int nt = 0; nt < kScoreQueries / 16; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e >> 1, col = half * kScoreQueries / 2 + nt * 8 + 2 * t + (e & 1);
            const float p = exp2f(fmaf(sc[m][nt][e], scale2, key_bias2[m][r] - ls[col]));
            acc[m][r] = is_max ? fmaxf(acc[m][r], p) : acc[m][r] + (squares ? p * p : p);
          }
        }
      }
    }
    __syncthreads();  // this stage is reloaded next iteration
  }
  CpAsyncWait<0>();
#pragma unroll
  for (int m = 0; m < kScoreMTiles; ++m) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      for (int o = 1; o <= 2; o <<= 1) {
        const float other = __shfl_xor_sync(0xffffffff, acc[m][r], o);
        acc[m][r] = is_max ? fmaxf(acc[m][r], other) : acc[m][r] + other;
      }
      const int64_t j = j0 + (warp * kScoreMTiles + m) * 16 + g + 8 * r;
      if (t != 0 || j >= T) continue;
      const float mean = acc[m][r] / static_cast<float>(n);
      scores[h * T + j] = is_max ? acc[m][r] : (squares ? sqrtf(mean) : mean);
    }
  }
}

bool Aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool DeviceHasMma16() {
  static const bool has = [] {
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
    return major >= 8;
  }();
  return has;
}

unsigned GridFor(int64_t total) { return static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, int64_t{1} << 16)); }

template <typename T16, int D, int DV>
void Launch(const float* q, int64_t n, const float* k, const float* v, const float* bias, int64_t heads, int64_t T,
            float scale, float* row_max, float* mass, float* outputs, std::optional<ScoreReduceKind> reduce, float* scores,
            void* workspace, cudaStream_t stream) {
  const int64_t n_pad = RoundUp(n, kPad), t_pad = RoundUp(T, kPad);
  T16* qp = static_cast<T16*>(workspace);
  T16* kp = qp + heads * n_pad * D;
  T16* vp = kp + heads * t_pad * D;
  ConvertRowsKernel<T16><<<GridFor(heads * n_pad * D), 256, 0, stream>>>(q, n, n_pad, D, heads * n_pad * D, qp);
  ConvertRowsKernel<T16><<<GridFor(heads * t_pad * D), 256, 0, stream>>>(k, T, t_pad, D, heads * t_pad * D, kp);
  ConvertRowsKernel<T16><<<GridFor(heads * t_pad * DV), 256, 0, stream>>>(v, T, t_pad, DV, heads * t_pad * DV, vp);
  const Prepared<T16> in{qp, kp, vp, n_pad, t_pad};

  constexpr size_t forward_bytes = ForwardLayout<D, DV>::kBytes;
  static const cudaError_t forward_attr =
      cudaFuncSetAttribute(ForwardKernel<T16, D, DV>, cudaFuncAttributeMaxDynamicSharedMemorySize, forward_bytes);
  (void)forward_attr;  // a failure shows as the launch's error
  const dim3 forward_grid(static_cast<unsigned>(n_pad / kQueryTile), static_cast<unsigned>(heads));
  ForwardKernel<T16, D, DV><<<forward_grid, kThreads, forward_bytes, stream>>>(in, n, bias, T, scale, row_max, mass,
                                                                                outputs);
  if (!reduce) return;
  constexpr size_t scores_bytes = ScoresLayout<D>::kBytes;
  static const cudaError_t scores_attr =
      cudaFuncSetAttribute(ScoresKernel<T16, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, scores_bytes);
  (void)scores_attr;
  const dim3 scores_grid(static_cast<unsigned>(t_pad / kScoreKeys), static_cast<unsigned>(heads));
  ScoresKernel<T16, D><<<scores_grid, kThreads, scores_bytes, stream>>>(in, n, bias, T, scale, row_max, mass,
                                                                        static_cast<int>(*reduce), scores);
}

template <typename T16>
void Dispatch(int64_t d, int64_t dv, const float* q, int64_t n, const float* k, const float* v, const float* bias,
              int64_t heads, int64_t T, float scale, float* row_max, float* mass, float* outputs,
              std::optional<ScoreReduceKind> reduce, float* scores, void* workspace, cudaStream_t stream) {
  if (d == 64 && dv == 64) Launch<T16, 64, 64>(q, n, k, v, bias, heads, T, scale, row_max, mass, outputs, reduce, scores, workspace, stream);
  if (d == 64 && dv == 128) Launch<T16, 64, 128>(q, n, k, v, bias, heads, T, scale, row_max, mass, outputs, reduce, scores, workspace, stream);
  if (d == 128 && dv == 64) Launch<T16, 128, 64>(q, n, k, v, bias, heads, T, scale, row_max, mass, outputs, reduce, scores, workspace, stream);
  if (d == 128 && dv == 128) Launch<T16, 128, 128>(q, n, k, v, bias, heads, T, scale, row_max, mass, outputs, reduce, scores, workspace, stream);
}

}  // namespace

bool FusedStatsSupported(DType inputs, int64_t d, int64_t dv) {
  return (inputs == DType::kBFloat16 || inputs == DType::kFloat16) && (d == 64 || d == 128) && (dv == 64 || dv == 128) &&
         DeviceHasMma16();
}

size_t FusedStatsWorkspaceBytes(int64_t heads, int64_t n, int64_t T, int64_t d, int64_t dv) {
  return 2 * static_cast<size_t>(heads * (RoundUp(n, kPad) * d + RoundUp(T, kPad) * (d + dv)));
}

bool FusedAttentionStats(DType inputs, const float* q, int64_t n, const float* k, const float* v, const float* bias,
                         int64_t heads, int64_t T, int64_t d, int64_t dv, float scale, float* row_max, float* mass,
                         float* outputs, std::optional<ScoreReduceKind> reduce, float* scores, void* workspace,
                         cudaStream_t stream) {
  if (!FusedStatsSupported(inputs, d, dv) || n <= 0 || T <= 0 || heads <= 0) return false;
  if (!Aligned(workspace) || !Aligned(outputs)) return false;
  if (inputs == DType::kBFloat16) {
    Dispatch<__nv_bfloat16>(d, dv, q, n, k, v, bias, heads, T, scale, row_max, mass, outputs, reduce, scores, workspace,
                            stream);
  } else {
    Dispatch<__half>(d, dv, q, n, k, v, bias, heads, T, scale, row_max, mass, outputs, reduce, scores, workspace, stream);
  }
  return true;
}

}  // namespace kvcompact::kernels
