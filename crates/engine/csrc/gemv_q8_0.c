/*
 * parlance: llama.cpp's matrix-vector product for Q8_0 weights (one token against every row of
 * a weight matrix, the whole of a lone decoding stream's work), with software prefetch.
 *
 * llama.cpp multiplies a lone token by Q8_0 weights with one dot product per row
 * (`ggml_vec_dot_q8_0_q8_0`), which on the machines measured streams the weights at about half
 * the memory's speed: its loop leaves too few loads in flight for the hardware prefetcher. This
 * file computes each row by exactly the same operations in the same order (so every output is
 * bit-identical to llama.cpp's, and to its tiled kernel's for batches) and asks for the bytes a
 * few KiB ahead of use.
 *
 * It reaches llama.cpp through the GNU linker's `--wrap=llamafile_sgemm` (set by the build
 * scripts of `parlance-engine` and `parlance`): llama.cpp offers every matrix product to
 * `llamafile_sgemm` first, which declines a single token (n < 2) so that `ggml_vec_dot` does it.
 * The wrapper takes exactly that case, for Q8_0 weights, once `parlance_gemv_q8_0_enable` has
 * been called; everything else goes to llama.cpp's own function unchanged. The engine enables it
 * only after `parlance_gemv_q8_0_probe` has found its results bit-identical to
 * `ggml_vec_dot_q8_0_q8_0` in this build. Without the linker flag the wrapper is never called
 * and llama.cpp runs as built.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define PARLANCE_GEMV 1
#else
#define PARLANCE_GEMV 0
#endif

/* ggml's type ids (`enum ggml_type`); the Rust side checks them against the bindings. */
enum { TYPE_F32 = 0, TYPE_Q8_0 = 8 };

/* How far ahead of the block being multiplied to ask for the weights: 12 KiB, about twenty of
 * the default model's rows (612 bytes each). Measured on an AVX-512 machine, one stream's
 * decoding speed over HTTP: none 91, 4 KiB 158, 8 KiB 160, 12 KiB 171, 16 KiB 150 tokens a
 * second (docs/benchmarks.md). */
#define PARLANCE_PREFETCH_BYTES 12288

/* The leading fields of ggml's `struct ggml_compute_params` (ggml-cpu-impl.h). */
struct compute_params_head {
    int ith;
    int nth;
};

/* ggml's `block_q8_0`: an FP16 scale and 32 signed bytes (34 bytes, no padding). */
typedef struct {
    uint16_t d;
    int8_t qs[32];
} block_q8_0;

_Static_assert(sizeof(block_q8_0) == 34, "block_q8_0 is 34 bytes");

/* llama.cpp's function, reached through `--wrap`; weak so that a link without the flag leaves
 * it null (and the wrapper uncalled) rather than failing. */
extern bool __real_llamafile_sgemm(const void *params, int64_t m, int64_t n, int64_t k,
                                   const void *A, int64_t lda, const void *B, int64_t ldb,
                                   void *C, int64_t ldc, int Atype, int Btype, int Ctype)
    __attribute__((weak));

/* llama.cpp's own lone-row kernel, the reference the probe compares against. */
extern void ggml_vec_dot_q8_0_q8_0(int n, float *s, size_t bs, const void *vx, size_t bx,
                                   const void *vy, size_t by, int nrc);

static int enabled;
static uint64_t rows_computed;

#if PARLANCE_GEMV
/* The sum of a row's lanes, in the order llama.cpp's `hsum_float_8` and tinyBLAS's `hsum` add
 * them. */
static inline float hsum8(__m256 x) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* Eight lanes of four-byte products summed, as integers (exact), then as floats. */
static inline __m256 lane_dots(__m256i x, __m256i y) {
    const __m256i ax = _mm256_sign_epi8(x, x);
    const __m256i sy = _mm256_sign_epi8(y, x);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy));
#elif defined(__AVXVNNI__)
    return _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), ax, sy));
#else
    const __m256i pairs = _mm256_maddubs_epi16(ax, sy);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

/* One row: per block, scale product times the lane sums, fused into one accumulator. */
static inline float dot_row(const block_q8_0 *x, const block_q8_0 *y, int64_t blocks) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
        _mm_prefetch((const char *)(x + b) + PARLANCE_PREFETCH_BYTES, _MM_HINT_T0);
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(x[b].d) * _cvtsh_ss(y[b].d));
        const __m256i qx = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const __m256i qy = _mm256_loadu_si256((const __m256i *)y[b].qs);
        acc = _mm256_fmadd_ps(d, lane_dots(qx, qy), acc);
    }
    return hsum8(acc);
}
#endif

/* Rows [first, end) of A (row stride lda blocks, k blocks a row) against the column y. */
static void rows(const block_q8_0 *A, int64_t lda, int64_t k, const block_q8_0 *y, float *out,
                 int64_t first, int64_t end) {
#if PARLANCE_GEMV
    for (int64_t r = first; r < end; ++r) {
        out[r] = dot_row(A + r * lda, y, k);
    }
#else
    (void)A, (void)lda, (void)k, (void)y, (void)out, (void)first, (void)end;
#endif
}

bool __wrap_llamafile_sgemm(const void *params, int64_t m, int64_t n, int64_t k, const void *A,
                            int64_t lda, const void *B, int64_t ldb, void *C, int64_t ldc,
                            int Atype, int Btype, int Ctype) {
    if (PARLANCE_GEMV && n == 1 && Atype == TYPE_Q8_0 && Btype == TYPE_Q8_0 &&
        Ctype == TYPE_F32 && __atomic_load_n(&enabled, __ATOMIC_RELAXED)) {
        const struct compute_params_head *p = params;
        /* Contiguous shares, one per thread, so that each streams its own run of rows. */
        const int64_t share = (m + p->nth - 1) / p->nth;
        const int64_t first = share * p->ith;
        const int64_t end = first + share < m ? first + share : m;
        if (first < end) {
            rows(A, lda, k, B, C, first, end);
            __atomic_fetch_add(&rows_computed, (uint64_t)(end - first), __ATOMIC_RELAXED);
        }
        return true;
    }
    if (!__real_llamafile_sgemm) {
        return false;
    }
    return __real_llamafile_sgemm(params, m, n, k, A, lda, B, ldb, C, ldc, Atype, Btype, Ctype);
}

/* Whether this build has the kernel (x86-64 with AVX2, FMA and F16C). */
int parlance_gemv_q8_0_compiled(void) { return PARLANCE_GEMV; }

/* Whether the linker routed llama.cpp's calls here (`--wrap=llamafile_sgemm`). */
int parlance_gemv_q8_0_linked(void) { return __real_llamafile_sgemm != NULL; }

/* Computes `count` rows of `blocks` blocks each with this file's kernel and with
 * `ggml_vec_dot_q8_0_q8_0` into the two outputs. */
void parlance_gemv_q8_0_both(const void *A, const void *y, int64_t count, int64_t blocks,
                             float *ours, float *llama) {
    const block_q8_0 *a = A;
    rows(a, blocks, blocks, y, ours, 0, count);
    for (int64_t r = 0; r < count; ++r) {
        ggml_vec_dot_q8_0_q8_0((int)(blocks * 32), llama + r, 0, a + r * blocks, 0, y, 0, 1);
    }
}

void parlance_gemv_q8_0_enable(int on) { __atomic_store_n(&enabled, on, __ATOMIC_RELAXED); }

uint64_t parlance_gemv_q8_0_rows(void) {
    return __atomic_load_n(&rows_computed, __ATOMIC_RELAXED);
}
