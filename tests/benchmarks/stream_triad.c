/* STREAM-style triad, a[i] = b[i] + q*c[i] over double arrays: the reference that
 * bench_memory_vs_stream.py holds the memory.triad probe against.
 *
 * usage: stream_triad N NTIMES [WARMUP]
 *   N       elements per array (the probe's resolved size_mib * 2^20 / 8)
 *   NTIMES  timed iterations
 *   WARMUP  untimed iterations before them (default 1)
 *
 * Bandwidth is counted the STREAM way, 3 arrays x 8 bytes x N per iteration (no
 * write-allocate traffic), which is also how the probe's work model counts it, so the
 * two figures compare directly.
 *
 * Output (parsed by the bench script; keep the key=value lines stable):
 *   best_Bps=<float>      from the fastest timed iteration
 *   median_Bps=<float>    from the median timed iteration
 *   max_rel_err=<float>   result check; the program exits 1 if it fails
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SCALAR 3.0
/* The check recomputes the same expression; allow for FMA contraction differing
 * between the kernel loop and the check loop (at most an ulp or two). */
#define CHECK_TOLERANCE 1e-13

/* Deterministic, thread-independent value in [1, 2) for index i: non-zero and varied,
 * so neither zero pages nor constant propagation can flatter the kernel, and any
 * thread can initialise any element (first touch happens in the timed loop's layout). */
static inline double init_value(uint64_t i, uint64_t salt) {
    uint64_t z = i * 0x9E3779B97F4A7C15ull + salt;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return 1.0 + (double)(z >> 11) * 0x1.0p-53;
}

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static double *alloc_array(size_t n) {
    void *p = NULL;
    /* 64-byte alignment, as PyTorch's CPU allocator uses: no alignment advantage either way. */
    if (posix_memalign(&p, 64, n * sizeof(double)) != 0) {
        fprintf(stderr, "stream_triad: cannot allocate %zu bytes\n", n * sizeof(double));
        exit(2);
    }
    return (double *)p;
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: %s N NTIMES [WARMUP]\n", argv[0]);
        return 2;
    }
    const size_t n = strtoull(argv[1], NULL, 10);
    const int ntimes = atoi(argv[2]);
    const int warmup = argc == 4 ? atoi(argv[3]) : 1;
    if (n == 0 || ntimes < 1 || warmup < 0) {
        fprintf(stderr, "stream_triad: need N >= 1, NTIMES >= 1, WARMUP >= 0\n");
        return 2;
    }

    double *a = alloc_array(n), *b = alloc_array(n), *c = alloc_array(n);
    double *times = malloc((size_t)ntimes * sizeof(double));
    if (!times) return 2;

    /* First touch with the same static schedule as the kernel, so each thread's pages
     * are placed (NUMA) and faulted in by the thread that later streams them. */
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        a[i] = init_value(i, 0x1111);
        b[i] = init_value(i, 0x2222);
        c[i] = init_value(i, 0x3333);
    }

    for (int k = 0; k < warmup; k++) {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) a[i] = b[i] + SCALAR * c[i];
    }

    for (int k = 0; k < ntimes; k++) {
        double t0 = omp_get_wtime();
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) a[i] = b[i] + SCALAR * c[i];
        times[k] = omp_get_wtime() - t0;  /* the loop's implicit barrier ends the region */
    }

    /* b and c never change, so after any number of iterations a must equal b + q*c. */
    double max_err = 0.0;
#pragma omp parallel for schedule(static) reduction(max : max_err)
    for (size_t i = 0; i < n; i++) {
        double want = b[i] + SCALAR * c[i];
        double err = fabs(a[i] - want) / fabs(want);
        if (err > max_err) max_err = err;
    }

    qsort(times, (size_t)ntimes, sizeof(double), cmp_double);
    const double best = times[0];
    const double median = ntimes % 2 ? times[ntimes / 2] : 0.5 * (times[ntimes / 2 - 1] + times[ntimes / 2]);
    const double bytes = 3.0 * sizeof(double) * (double)n;

    printf("elements=%zu\n", n);
    printf("array_mib=%.3f\n", (double)n * sizeof(double) / (1024.0 * 1024.0));
    printf("threads=%d\n", omp_get_max_threads());
    printf("ntimes=%d\n", ntimes);
    printf("warmup=%d\n", warmup);
    printf("best_Bps=%.6e\n", bytes / best);
    printf("median_Bps=%.6e\n", bytes / median);
    printf("max_rel_err=%.3e\n", max_err);

    free(a);
    free(b);
    free(c);
    free(times);
    if (!(max_err <= CHECK_TOLERANCE)) {
        fprintf(stderr, "stream_triad: check FAILED, max relative error %.3e > %.1e\n", max_err, CHECK_TOLERANCE);
        return 1;
    }
    return 0;
}
