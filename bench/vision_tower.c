/* Vision tower time per image at the real Qwen3.5-35B-A3B geometry (hidden 1152, 27 blocks, 16
 * heads, MLP 4304, patch 16, merge 2, 48x48 positions, text width 2048), random bf16 weights:
 *
 *     build/bench/vision_tower [SIDE...] [--threads 1,2]     (default sides: 256)
 *
 * For each square image side and thread count: seconds per image (the best of the runs within a
 * few seconds) and GFLOP/s over the tower's matmul and attention FLOPs. Bigger images cost
 * quadratically more in attention: 1024 is ~4,400 GFLOP, 2048 ~36,000 GFLOP. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "benchutil.h"
#include "kernels/kernels.h"
#include "model/vision.h"
#include "runtime/threadpool.h"

#define D 1152
#define DEPTH 27
#define HEADS 16
#define INTER 4304
#define PATCH 16
#define MERGE 2
#define SIDE_POS 48
#define DT 2048

static qk_mat random_mat(int64_t rows, int64_t cols)
{
    uint16_t *w = malloc(sizeof *w * (size_t)(rows * cols));
    float scale = 1.0f / (float)cols;
    for (int64_t i = 0; i < rows * cols; i++) w[i] = qk_f32_to_bf16(frand() * scale * 1.7f);
    return (qk_mat){.dtype = QMIX_BF16, .rows = rows, .cols = cols,
                    .row_bytes = (size_t)cols * 2, .data = w};
}

static float *random_vec(int64_t n, float scale, float offset)
{
    float *v = malloc(sizeof *v * (size_t)n);
    for (int64_t i = 0; i < n; i++) v[i] = offset + scale * frand();
    return v;
}

/* FLOPs of one image of N patches: 2·N·(weights of the blocks) + attention (QKᵀ and ·V) +
 * patch embedding + merger. */
static double tower_flops(double N)
{
    double K = 3.0 * 2 * PATCH * PATCH, M = (double)D * MERGE * MERGE;
    double block = 2 * N * ((double)D * 3 * D + (double)D * D + 2.0 * D * INTER) + 4 * N * N * D;
    return 2 * N * K * D + DEPTH * block + 2 * (N / 4) * (M * M + M * DT);
}

int main(int argc, char **argv)
{
    int sides[8], n_sides = 0, threads[8] = {1, 2}, n_threads = 2;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            n_threads = 0;
            for (char *p = argv[++i]; *p && n_threads < 8;) {
                threads[n_threads++] = (int)strtol(p, &p, 10);
                if (*p == ',') p++;
            }
        } else if (n_sides < 8) {
            sides[n_sides++] = atoi(argv[i]);
        }
    }
    if (!n_sides) sides[n_sides++] = 256;

    qmix_vision v = {.cfg = {.hidden = D, .depth = DEPTH, .heads = HEADS, .intermediate = INTER,
                             .patch = PATCH, .temporal_patch = 2, .merge = MERGE,
                             .n_pos = SIDE_POS * SIDE_POS, .out_hidden = DT, .min_pixels = 65536,
                             .max_pixels = 16777216, .mean = {0.5, 0.5, 0.5},
                             .std = {0.5, 0.5, 0.5}}};
    int64_t K = 3 * 2 * PATCH * PATCH, M = D * MERGE * MERGE;
    v.patch_embed = random_mat(D, K);
    v.patch_b = random_vec(D, 0.02f, 0);
    v.pos_embed = random_vec((int64_t)SIDE_POS * SIDE_POS * D, 0.1f, 0);
    v.blocks = calloc(DEPTH, sizeof *v.blocks);
    for (int i = 0; i < DEPTH; i++) {
        qmix_vision_block *b = &v.blocks[i];
        b->norm1_w = random_vec(D, 0.1f, 1);
        b->norm1_b = random_vec(D, 0.02f, 0);
        b->norm2_w = random_vec(D, 0.1f, 1);
        b->norm2_b = random_vec(D, 0.02f, 0);
        b->qkv = random_mat(3 * D, D);
        b->qkv_b = random_vec(3 * D, 0.02f, 0);
        b->proj = random_mat(D, D);
        b->proj_b = random_vec(D, 0.02f, 0);
        b->fc1 = random_mat(INTER, D);
        b->fc1_b = random_vec(INTER, 0.02f, 0);
        b->fc2 = random_mat(D, INTER);
        b->fc2_b = random_vec(D, 0.02f, 0);
    }
    v.merge_norm_w = random_vec(D, 0.1f, 1);
    v.merge_norm_b = random_vec(D, 0.02f, 0);
    v.merge_fc1 = random_mat(M, M);
    v.merge_fc1_b = random_vec(M, 0.02f, 0);
    v.merge_fc2 = random_mat(DT, M);
    v.merge_fc2_b = random_vec(DT, 0.02f, 0);

    printf("vision tower, 35B-A3B geometry (%d blocks, hidden %d), %s kernels\n", DEPTH, D,
           qk_isa_name(qk_isa_active()));
    printf("%-10s %8s %8s %9s %10s %9s\n", "image", "patches", "threads", "GFLOP", "s/image",
           "GFLOP/s");
    for (int si = 0; si < n_sides; si++) {
        int side = sides[si];
        qmix_image img = {.width = side, .height = side, .rgb = malloc((size_t)side * side * 3)};
        for (size_t i = 0; i < (size_t)side * side * 3; i++) img.rgb[i] = (uint8_t)next();
        qmix_vision_pixels px;
        qmix_err err;
        if (qmix_vision_preprocess(&v.cfg, &img, &px, &err)) {
            fprintf(stderr, "%s\n", err.msg);
            return 1;
        }
        int N = px.gh * px.gw;
        float *out = malloc(sizeof *out * (size_t)(N / 4) * DT);
        for (int ti = 0; ti < n_threads; ti++) {
            qmix_pool *pool = qmix_pool_new(threads[ti]);
            double best = 1e30, spent = 0;
            for (int run = 0; run < 3 && (run == 0 || spent < 5); run++) {
                double t0 = now();
                if (qmix_vision_encode(&v, pool, &px, out, &err)) {
                    fprintf(stderr, "%s\n", err.msg);
                    return 1;
                }
                double t = now() - t0;
                spent += t;
                if (t < best) best = t;
            }
            double gf = tower_flops(N) * 1e-9;
            printf("%4dx%-5d %8d %8d %9.0f %10.3f %9.1f\n", side, side, N, threads[ti], gf, best,
                   gf / best);
            fflush(stdout);
            qmix_pool_free(pool);
        }
        free(out);
        qmix_vision_pixels_free(&px);
        qmix_image_free(&img);
    }
    return 0;
}
