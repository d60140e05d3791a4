/* Attention over the KV cache per ISA and cache type, one thread: decode (one query against n
 * cached keys, as a decoded token's head does) and a prefill block (nq queries sharing the rows,
 * as a GQA group's heads × a block of rows do). Reports ns per (query, key) and, for decode, the
 * cache bytes read per second. Timed on the thread's CPU clock, so a shared machine's other jobs
 * inflate the figures less than wall time would.
 *
 *   build/bench/attention [--dim 256] [--ctx 1024,32768] [--nq 16] [--isa NAME] [--time S] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "benchutil.h"
#include "kernels/kernels_impl.h"

static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int parse_list(const char *s, int *out, int max)
{
    int n = 0;
    while (*s && n < max) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v <= 0) return -1;
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
    }
    return n;
}

/* Seconds per call of fn over n keys with nq queries, repeated for at least min_s. */
static double time_call(qk_attend_kv_fn fn, qmix_kv_type kv, int nq, const float *const *q,
                        float *const *out, const int64_t *n, const void *k, const void *v,
                        size_t ld, int dim, float *scratch, double min_s)
{
    fn(kv, nq, q, out, n, k, v, ld, dim, 0.1f, scratch); /* warm */
    int reps = 0;
    double t0 = cpu_now(), t;
    do {
        fn(kv, nq, q, out, n, k, v, ld, dim, 0.1f, scratch);
        reps++;
    } while ((t = cpu_now() - t0) < min_s);
    return t / reps;
}

int main(int argc, char **argv)
{
    int dim = 256, nq_block = 16, ctxs[8] = {1024, 32768}, n_ctx = 2;
    double min_s = 0.3;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dim") && i + 1 < argc) dim = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--nq") && i + 1 < argc) nq_block = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--time") && i + 1 < argc) min_s = atof(argv[++i]);
        else if (!strcmp(argv[i], "--isa") && i + 1 < argc) only = argv[++i];
        else if (!strcmp(argv[i], "--ctx") && i + 1 < argc) n_ctx = parse_list(argv[++i], ctxs, 8);
        else {
            fprintf(stderr, "usage: %s [--dim D] [--ctx LIST] [--nq N] [--isa NAME] [--time S]\n",
                    argv[0]);
            return 2;
        }
    }
    if (dim <= 0 || dim % QK_KV_BLOCK || n_ctx <= 0 || nq_block < 1 || nq_block > QK_ATTN_MAX_Q) {
        fprintf(stderr, "attention: dim a multiple of 32, --nq 1..%d, contexts > 0\n",
                QK_ATTN_MAX_Q);
        return 2;
    }
    static const qmix_kv_type types[] = {QMIX_KV_F32, QMIX_KV_F16, QMIX_KV_Q8_0, QMIX_KV_Q4_0};
    int max_ctx = 0;
    for (int c = 0; c < n_ctx; c++) max_ctx = ctxs[c] > max_ctx ? ctxs[c] : max_ctx;
    float *x = malloc(sizeof(float) * (size_t)dim);
    float *qbuf = malloc(sizeof(float) * (size_t)dim * QK_ATTN_MAX_Q);
    float *obuf = malloc(sizeof(float) * (size_t)dim * QK_ATTN_MAX_Q);
    float *scratch = malloc(sizeof(float) * qk_attend_kv_scratch(QK_ATTN_MAX_Q, dim));
    const float *q[QK_ATTN_MAX_Q];
    float *out[QK_ATTN_MAX_Q];
    int64_t n[QK_ATTN_MAX_Q];
    for (int i = 0; i < dim * QK_ATTN_MAX_Q; i++) qbuf[i] = frand();
    for (int i = 0; i < QK_ATTN_MAX_Q; i++) q[i] = qbuf + i * dim, out[i] = obuf + i * dim;

    printf("| ISA | cache | ctx | decode ns/key | decode cache GB/s | block of %d: ns per query-key |\n",
           nq_block);
    printf("|---|---|---|---|---|---|\n");
    for (int t = 0; t < 4; t++) {
        qmix_kv_type kv = types[t];
        size_t ld = qk_kv_bytes(kv, dim);
        uint8_t *k = malloc(ld * (size_t)max_ctx), *v = malloc(ld * (size_t)max_ctx);
        if (!k || !v) return 1;
        for (int j = 0; j < max_ctx; j++) {
            for (int i = 0; i < dim; i++) x[i] = frand();
            qk_kv_quantize(kv, x, dim, k + (size_t)j * ld);
            for (int i = 0; i < dim; i++) x[i] = frand();
            qk_kv_quantize(kv, x, dim, v + (size_t)j * ld);
        }
        for (int isa = 0; isa < QK_ISA_COUNT; isa++) {
            if (!qk_isa_supported((qk_isa)isa) || (only && strcmp(only, qk_isa_name((qk_isa)isa))))
                continue;
            qk_attend_kv_fn fn = qk_attend_kv_for((qk_isa)isa);
            for (int c = 0; c < n_ctx; c++) {
                int64_t len = ctxs[c];
                n[0] = len;
                double dec = time_call(fn, kv, 1, q, out, n, k, v, ld, dim, scratch, min_s);
                for (int i = 0; i < nq_block; i++) n[i] = len - i > 1 ? len - i : 1;
                double blk = time_call(fn, kv, nq_block, q, out, n, k, v, ld, dim, scratch, min_s);
                printf("| %s | %s | %lld | %.2f | %.1f | %.2f |\n", qk_isa_name((qk_isa)isa),
                       qmix_kv_type_name(kv), (long long)len, dec / (double)len * 1e9,
                       2.0 * (double)ld * (double)len / dec / 1e9,
                       blk / ((double)len * nq_block) * 1e9);
                fflush(stdout);
            }
        }
        free(k);
        free(v);
    }
    free(x), free(qbuf), free(obuf), free(scratch);
    return 0;
}
