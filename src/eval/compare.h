/* Structural comparison of two checkpoints of the same model in any formats qmix opens (HF, MLX,
 * GGUF): every weight both models bind, dequantized row by row, compared by cosine similarity,
 * relative error and largest absolute difference — per tensor, and per role and layer type as
 * seed 003's conversion report groups them. A GGUF model's value heads sit in llama.cpp's tiled
 * order; they are compared in Hugging Face order, so a head order that went wrong shows as a drop
 * in cosine on the Gated DeltaNet value-head tensors. Library code: no printing. */
#ifndef QMIX_EVAL_COMPARE_H
#define QMIX_EVAL_COMPARE_H

#include <signal.h>
#include <stdint.h>

#include "model/roles.h"
#include "qmix.h"

typedef struct qmix_cmp_stat {
    double dot, norm_a, norm_b, err2; /* Σab, Σa², Σb², Σ(a−b)² */
    double max_abs;
    int64_t n;
} qmix_cmp_stat;

double qmix_cmp_cosine(const qmix_cmp_stat *s);   /* 1 for two zero tensors */
double qmix_cmp_rel_err(const qmix_cmp_stat *s);  /* ‖a−b‖/‖a‖ */

typedef struct qmix_cmp_tensor {
    char name[96];        /* "layers.3.gdn_qkv", "layers.3.experts_down", "final_norm" … */
    qmix_role role;
    int layer;            /* -1: not in a layer */
    qmix_cmp_stat stat;
    double min_cosine;    /* the lowest over its parts (experts), else its own cosine */
} qmix_cmp_tensor;

typedef struct qmix_cmp_result {
    qmix_cmp_tensor *tensors;
    int n_tensors;
} qmix_cmp_result;

/* Compares a and b (same geometry, else an error naming what differs). progress(user, done,
 * total) per layer; *stop ends early (0 is returned with what was compared). */
int qmix_compare_models(const qmix_model *a, const qmix_model *b,
                        void (*progress)(void *user, int done, int total), void *user,
                        const volatile sig_atomic_t *stop, qmix_cmp_result *out, qmix_err *err);
void qmix_cmp_result_free(qmix_cmp_result *r);

#endif
