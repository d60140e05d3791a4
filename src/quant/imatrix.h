/* llama.cpp importance matrices (spec/quant-formats.md §4.5–4.6): the legacy `.dat` file and the
 * GGUF form, read into per-tensor, per-matrix mean squared inputs c_j = E[x_j²], and written from
 * qmix's calibration statistics. Entries are keyed by GGUF tensor names ("blk.3.attn_q.weight");
 * lookups take HF or MLX names and translate (§0.3), undoing the GDN tiled value-head order of
 * `ssm_out`'s input channels (§4.4, §5.9). Files are untrusted: every count, length and size is
 * checked against the file, values must be finite and non-negative. No printing. */
#ifndef QMIX_QUANT_IMATRIX_H
#define QMIX_QUANT_IMATRIX_H

#include <stdint.h>

#include "qmix.h"
#include "quant/calib.h"

typedef struct qmix_imatrix_entry {
    char *name;          /* GGUF tensor name */
    int64_t nval;        /* values: n_mat matrices × k channels, matrix-major */
    int n_mat;           /* GGUF form: from the counts tensor; .dat: 1 (experts: split by k) */
    float *values;       /* mean squares (the file's values / ncall, or in_sum2 / counts) */
    int64_t *counts;     /* [n_mat] rows per matrix (GGUF form), or NULL (.dat: per-expert
                            counts are lost, §4.5) */
    int32_t ncall;       /* .dat */
} qmix_imatrix_entry;

typedef struct qmix_imatrix {
    int n;
    qmix_imatrix_entry *e;
    int64_t chunk_count, chunk_size; /* chunk_size −1 when unknown (.dat) */
    char *dataset;
    char *path;          /* the file it was loaded from (qmix_imatrix_load), or NULL */
    int gguf;            /* read from the GGUF form */
} qmix_imatrix;

/* A .dat or GGUF imatrix (told apart by the GGUF magic). */
int qmix_imatrix_load(const char *path, qmix_imatrix **out, qmix_err *err);
int qmix_imatrix_load_dat_memory(const void *buf, uint64_t len, const char *label,
                                 qmix_imatrix **out, qmix_err *err);
void qmix_imatrix_free(qmix_imatrix *im);
const qmix_imatrix_entry *qmix_imatrix_find(const qmix_imatrix *im, const char *gguf_name);

/* The GGUF name of an HF or MLX linear ("...layers.3.self_attn.q_proj.weight" →
 * "blk.3.attn_q.weight"); -1 when it has none. */
int qmix_imatrix_gguf_name(const char *name, char *out, size_t len);

/* The importance of matrix `mat` (expert index for 3-D expert tensors, else 0) of tensor `name`
 * (HF or MLX) with k input channels, in HF channel order, into out[k]: 1 found (*count = rows
 * seen, −1 unknown), 0 no entry, -1 entry present but inconsistent (size disagrees). */
int qmix_imatrix_lookup(const qmix_imatrix *im, const char *name, int64_t mat, int64_t k,
                        const qmix_config *cfg, float *out, int64_t *count, qmix_err *err);

/* Writes the statistics as an imatrix: legacy .dat, or the GGUF form when path ends ".gguf".
 * chunk_size is the calibration window (ncall = ceil(rows / chunk_size), §4.5). */
int qmix_imatrix_write(const char *path, const qmix_calib *c, const qmix_config *cfg,
                       int chunk_size, qmix_err *err);

#endif
