// x (M, K) fp32 @ (q (N, K) int8 * scale (N,))^T -> (M, N) fp32, for few rows M (decoding), with
// AVX-512 VNNI: each row of x is quantized to int16 with one scale (relative error <= 2^-16 of the row's
// largest value, far below the int8 weights' own rounding), and each weight row is read once per call,
// 32 int8 values at a time widened to int16 and multiplied into int32 accumulators by vpdpwssd (two
// instructions per 32 weights: fp32 FMAs need six, and ran at half the memory's speed per core).
// Rows of q are split over torch's threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t ROWS = 4;  // weight rows per block: 4 x 2 independent accumulator chains per x row

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

VNNI inline __m512i widen(const int8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

VNNI inline __m512i widen_masked(const int8_t* p, __mmask32 m) {
  return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, p));
}

// R weight rows (n0 .. n0 + R) against the M int16 rows xq (each Kp long, zero-padded past K).
template <int R>
VNNI void block(const int16_t* xq, const float* xs, int64_t M, int64_t K, int64_t Kp, const int8_t* q,
                const float* scale, float* out, int64_t N, int64_t n0) {
  for (int64_t m = 0; m < M; ++m) {
    const int16_t* xm = xq + m * Kp;
    __m512i a[R], b[R];
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      const __m512i x0 = _mm512_loadu_si512(xm + k), x1 = _mm512_loadu_si512(xm + k + 32);
      for (int r = 0; r < R; ++r) {
        const int8_t* qr = q + (n0 + r) * K + k;
        a[r] = _mm512_dpwssd_epi32(a[r], x0, widen(qr));
        b[r] = _mm512_dpwssd_epi32(b[r], x1, widen(qr + 32));
      }
    }
    for (; k < K; k += 32) {  // the tail: masked weight loads (x is zero-padded)
      const __mmask32 mk = (K - k >= 32) ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1);
      const __m512i x0 = _mm512_loadu_si512(xm + k);
      for (int r = 0; r < R; ++r) a[r] = _mm512_dpwssd_epi32(a[r], x0, widen_masked(q + (n0 + r) * K + k, mk));
    }
    for (int r = 0; r < R; ++r) {  // lanes summed in fp32: only each lane's own sum must fit int32
      const float dot = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_cvtepi32_ps(a[r]), _mm512_cvtepi32_ps(b[r])));
      out[m * N + n0 + r] = dot * xs[m] * scale[n0 + r];
    }
  }
}

// One x row against weight rows n0 .. n1 in S sequential streams: the range is cut into S parts and
// each step takes the next row of every part, prefetched PREFETCH bytes ahead (2 KiB rows: one stream
// with the hardware prefetcher alone read 18 GB/s on 2 threads, with software prefetch 24, two streams
// 26, the machine's fp32 GEMV 30).
constexpr int64_t PREFETCH = 4096;  // measured: 1 KiB 21.7, 2 KiB 22.9-24.2, 3-8 KiB 23.8-24.7 GB/s (1 stream)

template <int S>
VNNI void rows_for_one_token(const int16_t* xm, float xs, int64_t K, const int8_t* q, const float* scale,
                             float* out, int64_t n0, int64_t n1) {
  const int64_t part = (n1 - n0) / S;
  for (int64_t i = 0; i < part; ++i) {
    const int8_t* qr[S];
    __m512i a[S], b[S];
    for (int j = 0; j < S; ++j) {
      qr[j] = q + (n0 + j * part + i) * K;
      a[j] = b[j] = _mm512_setzero_si512();
    }
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      const __m512i x0 = _mm512_loadu_si512(xm + k), x1 = _mm512_loadu_si512(xm + k + 32);
      for (int j = 0; j < S; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(qr[j] + k + PREFETCH), _MM_HINT_T0);
        a[j] = _mm512_dpwssd_epi32(a[j], x0, widen(qr[j] + k));
        b[j] = _mm512_dpwssd_epi32(b[j], x1, widen(qr[j] + k + 32));
      }
    }
    for (; k < K; k += 32) {  // the tail: masked weight loads (x is zero-padded)
      const __mmask32 mk = (K - k >= 32) ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1);
      const __m512i x0 = _mm512_loadu_si512(xm + k);
      for (int j = 0; j < S; ++j) a[j] = _mm512_dpwssd_epi32(a[j], x0, widen_masked(qr[j] + k, mk));
    }
    for (int j = 0; j < S; ++j) {
      const int64_t n = n0 + j * part + i;
      out[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_cvtepi32_ps(a[j]), _mm512_cvtepi32_ps(b[j]))) * xs * scale[n];
    }
  }
  if (S > 1 && n0 + S * part < n1) rows_for_one_token<1>(xm, xs, K, q, scale, out, n0 + S * part, n1);
}

// x rows -> int16 (zero-padded to Kp) and their scales. The largest |value| maps to xmax, chosen so that
// no int32 lane can overflow: a lane adds Kp / 16 products of at most 127 * xmax.
void quantize_x(const float* x, int64_t M, int64_t K, int64_t Kp, int16_t* xq, float* xs) {
  const double bound = 2147483647.0 * 16.0 / (127.0 * (double)Kp);
  const float xmax = (float)std::min(32767.0, std::floor(bound) - 1.0);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      amax = std::max(amax, std::fabs(xm[k]));
      finite = finite && std::isfinite(xm[k]);
    }
    if (!finite) {  // NaN or inf in the row: its outputs are NaN, as a float matmul's
      for (int64_t k = 0; k < Kp; ++k) xq[m * Kp + k] = 0;
      xs[m] = NAN;
      continue;
    }
    const float s = amax > 0.f ? amax / xmax : 1.f;
    const float inv = 1.f / s;
    for (int64_t k = 0; k < K; ++k) xq[m * Kp + k] = (int16_t)std::nearbyint(xm[k] * inv);
    for (int64_t k = K; k < Kp; ++k) xq[m * Kp + k] = 0;
    xs[m] = s;
  }
}

}  // namespace

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scale.dim() == 1, "int8_gemv: x (M, K), q (N, K), scale (N,)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "int8_gemv: x fp32, q int8, scale fp32");
  TORCH_CHECK(x.size(1) == q.size(1) && scale.size(0) == q.size(0), "int8_gemv: shapes do not match");
  TORCH_CHECK(x.is_cpu() && q.is_cpu() && scale.is_cpu(), "int8_gemv: CPU tensors");
  x = x.contiguous();
  q = q.contiguous();
  scale = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), Kp = (K + 63) / 64 * 64;
  auto out = torch::empty({M, N}, x.options());
  std::vector<int16_t> xq(M * Kp);
  std::vector<float> xs(M);
  quantize_x(x.data_ptr<float>(), M, K, Kp, xq.data(), xs.data());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, ROWS * K));  // >= 64 KiB a task
  if (M == 1) {  // decoding one token: rows in one sequential stream per thread
    at::parallel_for(0, N, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, K)), [&](int64_t n0, int64_t n1) {
      rows_for_one_token<2>(xq.data(), xs[0], K, qp, sp, op, n0, n1);
    });
    return out;
  }
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * ROWS;
      if (N - n0 >= ROWS) {
        block<ROWS>(xq.data(), xs.data(), M, K, Kp, qp, sp, op, N, n0);
      } else {
        for (int64_t n = n0; n < N; ++n) block<1>(xq.data(), xs.data(), M, K, Kp, qp, sp, op, N, n);
      }
    }
  });
  return out;
}

bool vnni_supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_gemv", &int8_gemv, "x (M, K) fp32 @ (q (N, K) int8 * scale (N,))^T -> (M, N) fp32");
  m.def("vnni_supported", &vnni_supported, "whether this CPU has AVX-512 F, BW, VL and VNNI");
}
