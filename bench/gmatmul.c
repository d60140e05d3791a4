/* build/bench/gmatmul [--isa NAME] [--types q8_0,q4_k,...] [--time S] [--pool-mib M]
 *
 * Single-thread microbenchmark of the ggml block-format matmul (qk_mat dtype U8) for every ISA
 * this CPU supports, on a 4096 x 2048 matrix of random blocks:
 *   decode  (n = 1): GB/s of blocks streamed, rotating over copies filling --pool-mib (default
 *                    512 MiB, beyond the LLC) like a decoded token;
 *   prefill (n = 64): GFLOP/s (2·rows·cols·n per call) over a calibrated row prefix.
 * AVX-512 runs with float activations; "avx512-i8" again with int8 ones (QMIX_ACT_INT8), which
 * only decode uses (its prefill column is the float path's). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "benchutil.h"
#include "kernels/kernels_impl.h"
#include "quant/ggml_blocks.h"


#define ROWS 4096
#define COLS 2048

static double min_time = 0.5;

/* Random blocks whose fp16 fields are small finite numbers: every block type keeps its scales
 * in its first bytes or last bytes; rewriting every 16-bit word would change the codes too, so
 * fp16 fields are located per type. */
static void fill(int type, uint8_t *p, size_t bytes)
{
    for (size_t i = 0; i + 8 <= bytes; i += 8) {
        uint64_t v = next();
        memcpy(p + i, &v, 8);
    }
    size_t bb = qmix_ggml_block_bytes(type);
    int off[2] = {0, -1};
    if (type == QMIX_GGML_Q4_1 || type == QMIX_GGML_Q5_1 || type == QMIX_GGML_Q4_K ||
        type == QMIX_GGML_Q5_K)
        off[1] = 2;
    if (type == QMIX_GGML_Q2_K) off[0] = 80, off[1] = 82;
    if (type == QMIX_GGML_Q3_K) off[0] = 108;
    if (type == QMIX_GGML_Q6_K) off[0] = 208;
    uint16_t h = qk_f32_to_f16(0.01f);
    for (size_t b = 0; b + bb <= bytes; b += bb)
        for (int k = 0; k < 2; k++)
            if (off[k] >= 0) memcpy(p + b + (size_t)off[k], &h, 2);
}

int main(int argc, char **argv)
{
    const char *only_isa = NULL, *types = "q8_0,q4_0,q4_k,q5_k,q6_k,q2_k,q3_k,iq4_xs";
    size_t pool_mib = 512;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--isa") && i + 1 < argc) only_isa = argv[++i];
        else if (!strcmp(argv[i], "--types") && i + 1 < argc) types = argv[++i];
        else if (!strcmp(argv[i], "--time") && i + 1 < argc) min_time = atof(argv[++i]);
        else if (!strcmp(argv[i], "--pool-mib") && i + 1 < argc) pool_mib = (size_t)atol(argv[++i]);
        else {
            fprintf(stderr, "usage: gmatmul [--isa NAME] [--types LIST] [--time S] [--pool-mib M]\n");
            return 2;
        }
    }
    float *x = malloc(sizeof(float) * 64 * COLS), *y = malloc(sizeof(float) * 64 * ROWS);
    for (int i = 0; i < 64 * COLS; i++) x[i] = (float)((int)(next() % 2001) - 1000) / 1000.0f;
    printf("%-8s %-9s %14s %16s\n", "type", "isa", "decode GB/s", "prefill GFLOP/s");
    char list[256];
    snprintf(list, sizeof list, "%s", types);
    for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
        int type = -1;
        for (int t = 0; t < QMIX_GGML_TYPE_LIMIT; t++)
            if (qmix_ggml_type_name(t) && !strcasecmp(qmix_ggml_type_name(t), tok)) type = t;
        if (type < 0 || !qmix_ggml_type_supported(type) || qmix_ggml_block_elems(type) == 1) {
            fprintf(stderr, "gmatmul: %s is not a block type qmix runs\n", tok);
            return 2;
        }
        size_t rb = qmix_ggml_row_bytes(type, COLS), mat = rb * ROWS;
        int copies = (int)(pool_mib * (1u << 20) / mat);
        if (copies < 1) copies = 1;
        uint8_t *pool = malloc(mat * (size_t)copies);
        if (!pool) return 1;
        fill(type, pool, mat * (size_t)copies);
        /* the AVX-512 rows twice: float activations, then int8 ones (decode only; "avx512-i8",
         * where the type has an int8 kernel and the CPU VNNI) */
        for (int row = 0; row <= QK_ISA_COUNT; row++) {
            int isa = row < QK_ISA_COUNT ? row : QK_ISA_AVX512, i8 = row == QK_ISA_COUNT;
            if (!qk_isa_supported((qk_isa)isa)) continue;
            if (only_isa && strcmp(only_isa, qk_isa_name((qk_isa)isa))) continue;
            qk_mat probe = {.dtype = QMIX_U8, .ggml_type = type, .rows = ROWS, .cols = COLS,
                            .row_bytes = rb, .data = pool};
            if (i8 && !qk_gq8_supported(&probe)) continue;
            qk_set_act_int8(i8);
            if (i8 && !qk_act_int8()) continue;
            qk_matmul_fn fn = qk_matmul_for((qk_isa)isa);
            qk_mat m = {.dtype = QMIX_U8, .ggml_type = type, .rows = ROWS, .cols = COLS,
                        .row_bytes = rb, .data = pool};
            fn(&m, 0, ROWS, x, 1, COLS, y, ROWS);
            long calls = 0;
            double t0 = now(), t;
            do {
                m.data = pool + (size_t)(++calls % copies) * mat;
                fn(&m, 0, ROWS, x, 1, COLS, y, ROWS);
                t = now() - t0;
            } while (t < min_time || calls < 3);
            double gbs = (double)calls * (double)mat / t / 1e9;
            m.data = pool;
            int64_t rows = 16;
            t0 = now();
            fn(&m, 0, rows, x, 64, COLS, y, ROWS);
            double t16 = now() - t0;
            int64_t want = (int64_t)(min_time / 4 / (t16 > 1e-9 ? t16 : 1e-9) * 16);
            rows = want < 16 ? 16 : want > ROWS ? ROWS : want;
            calls = 0;
            t0 = now();
            do {
                fn(&m, 0, rows, x, 64, COLS, y, ROWS);
                calls++;
                t = now() - t0;
            } while (t < min_time || calls < 2);
            double gf = 2.0 * (double)rows * COLS * 64 * (double)calls / t / 1e9;
            printf("%-8s %-9s %14.1f %16.1f\n", qmix_ggml_type_name(type),
                   i8 ? "avx512-i8" : qk_isa_name((qk_isa)isa), gbs, gf);
        }
        free(pool);
    }
    free(x);
    free(y);
    return 0;
}
