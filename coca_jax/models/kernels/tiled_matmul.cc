// Weight-streaming matmuls for cached decoding on CPU: y [M, N] = x [M, K] . W [K, N] with W
// stored narrow (int8 with one float32 scale per output column, or bfloat16) and widened to
// float32 in registers, float32 accumulation.
//
// A decoding step multiplies a few rows (batch x beams) by every decoder matrix, so its time is
// the time to stream the weights from memory. XLA:CPU widens a narrow weight into a float32
// copy in memory before its dot, which streams more bytes than the float32 weight itself; here
// the weight is read once, in its narrow format.
//
// Layout ("tiles"): W [K, N] is stored as [ceil(N / 64), K, 64], column blocks of 64 (zero
// padded), so one block's K rows are one contiguous run of memory that the hardware prefetchers
// stream at full speed; the strided [K, N] layout reaches less than half of it. Each 64-column
// block is reduced over all of K in registers for up to 4 rows of x at a time; all row groups
// use a block while it is in cache, so the weights are read from memory once for any M.
// Column blocks are split over XLA's intra-op thread pool (the calling thread works too, and
// finishes alone if no pool thread is free).
//
// Compiled on first use by coca_jax/kernels/cpu.py with the host compiler (-march=native).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(COCA_JAX_PORTABLE)
#define COCA_JAX_AVX512 1
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kCols = 64;      // Columns per tile (one 64-byte line of int8 weights).
constexpr int kMaxRows = 4;        // Rows of x per register block.
constexpr int64_t kPrefetch = 512; // Bytes ahead of the weight stream to prefetch.
#ifndef COCA_JAX_PARALLEL_BYTES
#define COCA_JAX_PARALLEL_BYTES (1 << 18)  // Smaller weights: one thread (waking costs more).
#endif
constexpr int64_t kParallelBytes = COCA_JAX_PARALLEL_BYTES;
constexpr int64_t kChunksPerThread = 4;

inline float WidenScalar(int8_t w) { return static_cast<float>(w); }
inline float WidenScalar(uint16_t w) {
  const uint32_t bits = static_cast<uint32_t>(w) << 16;  // bfloat16 = the top half of a float32.
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

#ifdef COCA_JAX_AVX512
inline __m512 Widen16(const int8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
}
inline __m512 Widen16(const uint16_t* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// One tile (K rows of 64 columns) times R rows of x -> y[:R, n0 : n0 + 64] (clipped to N).
template <int R, typename WT>
void TileRows(const float* x, int64_t K, const WT* tile, int64_t N, int64_t n0,
              const float* scale, float* y) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const WT* row = tile + k * kCols;
    __builtin_prefetch(reinterpret_cast<const char*>(row) + kPrefetch, 0, 0);
    __m512 w[4];
    for (int j = 0; j < 4; ++j) w[j] = Widen16(row + 16 * j);
    for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * K + k]);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(xr, w[j], acc[r][j]);
    }
  }
  for (int j = 0; j < 4; ++j) {
    const int64_t c = n0 + 16 * j;
    if (c >= N) break;
    const __mmask16 mask = c + 16 <= N ? __mmask16(0xFFFF) : __mmask16((1u << (N - c)) - 1);
    const __m512 s = scale ? _mm512_maskz_loadu_ps(mask, scale + c) : _mm512_set1_ps(1.0f);
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(y + r * N + c, mask, _mm512_mul_ps(acc[r][j], s));
  }
}
#else
// Portable version of the same loop (the compiler vectorises the 64-wide inner loops).
template <int R, typename WT>
void TileRows(const float* x, int64_t K, const WT* tile, int64_t N, int64_t n0,
              const float* scale, float* y) {
  float acc[R][kCols] = {};
  for (int64_t k = 0; k < K; ++k) {
    const WT* row = tile + k * kCols;
    __builtin_prefetch(reinterpret_cast<const char*>(row) + kPrefetch, 0, 0);
    float w[kCols];
    for (int64_t j = 0; j < kCols; ++j) w[j] = WidenScalar(row[j]);
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * K + k];
      for (int64_t j = 0; j < kCols; ++j) acc[r][j] += xr * w[j];
    }
  }
  const int64_t cols = std::min(kCols, N - n0);
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < cols; ++j)
      y[r * N + n0 + j] = acc[r][j] * (scale ? scale[n0 + j] : 1.0f);
}
#endif

// Tiles [b0, b1) for every row of x, 4 rows at a time while the tile is in cache.
template <typename WT>
void Tiles(const float* x, int64_t M, int64_t K, const WT* tiles, int64_t N, const float* scale,
           float* y, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const WT* tile = tiles + b * K * kCols;
    for (int64_t m = 0; m < M; m += kMaxRows) {
      const float* xm = x + m * K;
      float* ym = y + m * N;
      switch (std::min<int64_t>(kMaxRows, M - m)) {
        case 1: TileRows<1>(xm, K, tile, N, b * kCols, scale, ym); break;
        case 2: TileRows<2>(xm, K, tile, N, b * kCols, scale, ym); break;
        case 3: TileRows<3>(xm, K, tile, N, b * kCols, scale, ym); break;
        default: TileRows<4>(xm, K, tile, N, b * kCols, scale, ym); break;
      }
    }
  }
}

// Chunks of work claimed from a counter by the calling thread and any pool threads that start
// in time; the caller waits only for chunks already claimed, so it never waits on a pool thread
// that has not started. Shared ownership keeps the state alive for late starters.
struct Work {
  std::function<void(int64_t)> run_chunk;
  int64_t chunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      run_chunk(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <typename WT>
void TiledMatmul(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, const WT* tiles,
                 int64_t N, const float* scale, float* y) {
  const int64_t blocks = (N + kCols - 1) / kCols;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const bool parallel = threads > 1 && K * blocks * kCols * int64_t(sizeof(WT)) >= kParallelBytes;
  const int64_t chunks = parallel ? std::min(blocks, threads * kChunksPerThread) : 1;
  auto work = std::make_shared<Work>();
  work->chunks = chunks;
  work->run_chunk = [=](int64_t c) {
    Tiles(x, M, K, tiles, N, scale, y, blocks * c / chunks, blocks * (c + 1) / chunks);
  };
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < chunks) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
}

// x [M, K], tiles [ceil(N/64), K, 64], y [M, N]: the shapes must agree.
ffi::Error CheckShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> tiles,
                       ffi::Span<const int64_t> y, int64_t scale_size) {
  if (x.size() != 2 || tiles.size() != 3 || y.size() != 2 || tiles[2] != kCols ||
      tiles[1] != x[1] || y[0] != x[0] || tiles[0] != (y[1] + kCols - 1) / kCols ||
      (scale_size >= 0 && scale_size != y[1])) {
    return ffi::Error::InvalidArgument(
        "tiled_matmul: expected x [M, K], tiles [ceil(N/64), K, 64], scale [N], out [M, N]");
  }
  return ffi::Error::Success();
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> tiles,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  auto e = CheckShapes(xd, tiles.dimensions(), yd, scale.element_count());
  if (e.failure()) return e;
  TiledMatmul(pool, x.typed_data(), xd[0], xd[1], tiles.typed_data(), yd[1], scale.typed_data(),
              y->typed_data());
  return ffi::Error::Success();
}

ffi::Error Bf16Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> tiles,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  if (auto e = CheckShapes(xd, tiles.dimensions(), yd, -1); e.failure()) return e;
  const auto* bits = reinterpret_cast<const uint16_t*>(tiles.untyped_data());
  TiledMatmul(pool, x.typed_data(), xd[0], xd[1], bits, yd[1], static_cast<const float*>(nullptr),
              y->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CocaJaxTiledMatmulInt8, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CocaJaxTiledMatmulBf16, Bf16Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
