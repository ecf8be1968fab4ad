/*
 * parlance: llama.cpp's matrix products for Q8_0 weights against one to eight tokens (a
 * decoding step's work for up to eight streams), with software prefetch.
 *
 * llama.cpp multiplies a lone token by Q8_0 weights with one dot product per row
 * (`ggml_vec_dot_q8_0_q8_0`), and two to eight tokens with its tiled kernel (tinyBLAS); on the
 * machines measured both stream the weights at about half the memory's speed or less: their
 * loops leave too few loads in flight for the hardware prefetcher. This file computes every
 * output by exactly the operations of llama.cpp's dot product in the same order (so each is
 * bit-identical to llama.cpp's, whichever of its kernels would have computed it), loads each
 * block of weights once for all the tokens, and asks for the weights 12 KiB ahead of use.
 *
 * It reaches llama.cpp through the GNU linker's `--wrap=llamafile_sgemm` (set by the build
 * scripts of `parlance-engine` and `parlance`): llama.cpp offers every matrix product to
 * `llamafile_sgemm` first. The wrapper takes the products of Q8_0 weights with at most eight
 * tokens once `parlance_gemv_q8_0_enable` has been called; everything else goes to llama.cpp's
 * own function unchanged. The engine enables it only after comparing it on random matrices
 * (`parlance_gemv_q8_0_both`) and finding every result bit-identical to
 * `ggml_vec_dot_q8_0_q8_0`'s in this build. Without the linker flag the wrapper is never called
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

/* The most tokens one product takes here; llama.cpp's tiled kernel takes larger batches. */
#define MAX_COLUMNS 8

/* ggml's type ids (`enum ggml_type`); the Rust side checks them against the bindings. */
enum { TYPE_F32 = 0, TYPE_Q8_0 = 8 };

/* How far ahead of the block being multiplied to ask for the weights: 12 KiB, about twenty of
 * the default model's rows (612 bytes each). Measured on an AVX-512 machine, one stream's
 * decoding speed over HTTP: none 91, 4 KiB 158, 8 KiB 160, 12 KiB 171, 16 KiB 150 tokens a
 * second (docs/benchmarks.md). */
#define PARLANCE_PREFETCH_BYTES 12288

/* The leading fields of ggml's `struct ggml_compute_params` (ggml-cpu-impl.h). This and the
 * signature of `llamafile_sgemm` are llama.cpp internals: llama-cpp-sys-2 is pinned exactly
 * (crates/engine/Cargo.toml), and an upgrade must check both again. */
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

/* llama.cpp's own dot product, the reference the engine compares against. */
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

/* Eight lanes of four-byte products summed, as integers (exact), then as floats: the weights'
 * magnitudes `ax` against the token's bytes carrying the weights' signs `sy`. */
static inline __m256 lane_dots(__m256i ax, __m256i sy) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy));
#elif defined(__AVXVNNI__)
    return _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), ax, sy));
#else
    const __m256i pairs = _mm256_maddubs_epi16(ax, sy);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

/* Rows [first, end) of A against N tokens (columns of B, ldb blocks apart), into C (ldc floats
 * between columns). Each output is llama.cpp's dot product: per block, the product of the two
 * FP16 scales times the lane sums, fused into one accumulator per output, then the same
 * horizontal sum. Each block of weights is loaded once for the N tokens. */
static inline __attribute__((always_inline)) void rows_n(const block_q8_0 *A, int64_t lda,
                                                         int64_t k, const block_q8_0 *B,
                                                         int64_t ldb, float *C, int64_t ldc,
                                                         int64_t first, int64_t end,
                                                         const int N) {
    for (int64_t r = first; r < end; ++r) {
        const block_q8_0 *x = A + r * lda;
        __m256 acc[MAX_COLUMNS];
        for (int j = 0; j < N; ++j) {
            acc[j] = _mm256_setzero_ps();
        }
        for (int64_t b = 0; b < k; ++b) {
            _mm_prefetch((const char *)(x + b) + PARLANCE_PREFETCH_BYTES, _MM_HINT_T0);
            const float dx = _cvtsh_ss(x[b].d);
            const __m256i qx = _mm256_loadu_si256((const __m256i *)x[b].qs);
            const __m256i ax = _mm256_sign_epi8(qx, qx);
            for (int j = 0; j < N; ++j) {
                const block_q8_0 *y = B + j * ldb + b;
                const __m256 d = _mm256_set1_ps(dx * _cvtsh_ss(y->d));
                const __m256i qy = _mm256_loadu_si256((const __m256i *)y->qs);
                acc[j] = _mm256_fmadd_ps(d, lane_dots(ax, _mm256_sign_epi8(qy, qx)), acc[j]);
            }
        }
        for (int j = 0; j < N; ++j) {
            C[j * ldc + r] = hsum8(acc[j]);
        }
    }
}
#endif

/* Rows [first, end) of A against n <= MAX_COLUMNS tokens, with N a constant in each case so
 * that the accumulators stay in registers. */
static void rows(const block_q8_0 *A, int64_t lda, int64_t k, const block_q8_0 *B, int64_t ldb,
                 float *C, int64_t ldc, int64_t first, int64_t end, int64_t n) {
#if PARLANCE_GEMV
    switch (n) {
    case 1: rows_n(A, lda, k, B, ldb, C, ldc, first, end, 1); break;
    case 2: rows_n(A, lda, k, B, ldb, C, ldc, first, end, 2); break;
    case 3: rows_n(A, lda, k, B, ldb, C, ldc, first, end, 3); break;
    case 4: rows_n(A, lda, k, B, ldb, C, ldc, first, end, 4); break;
    case 5: rows_n(A, lda, k, B, ldb, C, ldc, first, end, 5); break;
    case 6: rows_n(A, lda, k, B, ldb, C, ldc, first, end, 6); break;
    case 7: rows_n(A, lda, k, B, ldb, C, ldc, first, end, 7); break;
    default: rows_n(A, lda, k, B, ldb, C, ldc, first, end, 8); break;
    }
#else
    (void)A, (void)lda, (void)k, (void)B, (void)ldb, (void)C, (void)ldc, (void)first, (void)end,
        (void)n;
#endif
}

bool __wrap_llamafile_sgemm(const void *params, int64_t m, int64_t n, int64_t k, const void *A,
                            int64_t lda, const void *B, int64_t ldb, void *C, int64_t ldc,
                            int Atype, int Btype, int Ctype) {
    if (PARLANCE_GEMV && n >= 1 && n <= MAX_COLUMNS && Atype == TYPE_Q8_0 &&
        Btype == TYPE_Q8_0 && Ctype == TYPE_F32 && __atomic_load_n(&enabled, __ATOMIC_RELAXED)) {
        const struct compute_params_head *p = params;
        /* Contiguous shares, one per thread, so that each streams its own run of rows. */
        const int64_t share = (m + p->nth - 1) / p->nth;
        const int64_t first = share * p->ith;
        const int64_t end = first + share < m ? first + share : m;
        if (first < end) {
            rows(A, lda, k, B, ldb, C, ldc, first, end, n);
        }
        /* One thread counts the whole product, so the counter's cache line never bounces
         * between cores on this path. */
        if (p->ith == 0) {
            __atomic_fetch_add(&rows_computed, (uint64_t)(m * n), __ATOMIC_RELAXED);
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

/* Computes `count` rows of `blocks` blocks against `columns` tokens (at most MAX_COLUMNS, one
 * after the other in `y`) with this file's kernel and with `ggml_vec_dot_q8_0_q8_0`, into the
 * two outputs (column after column, `count` floats each). */
void parlance_gemv_q8_0_both(const void *A, const void *y, int64_t count, int64_t blocks,
                             int64_t columns, float *ours, float *llama) {
    const block_q8_0 *a = A;
    const block_q8_0 *b = y;
    rows(a, blocks, blocks, b, blocks, ours, count, 0, count, columns);
    for (int64_t j = 0; j < columns; ++j) {
        for (int64_t r = 0; r < count; ++r) {
            ggml_vec_dot_q8_0_q8_0((int)(blocks * 32), llama + j * count + r, 0, a + r * blocks,
                                   0, b + j * blocks, 0, 1);
        }
    }
}

void parlance_gemv_q8_0_enable(int on) { __atomic_store_n(&enabled, on, __ATOMIC_RELAXED); }

uint64_t parlance_gemv_q8_0_rows(void) {
    return __atomic_load_n(&rows_computed, __ATOMIC_RELAXED);
}
