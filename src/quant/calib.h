/* Calibration statistics for the quantizers (spec/quant-formats.md §3.2, §4.4): per distinct
 * linear-layer input, and per routed expert, the rows seen n, the per-channel sums Σ x_j² (the
 * importance matrix is their mean) and, optionally, the GPTQ Hessian Σ x xᵀ (its upper triangle),
 * accumulated in float64 while the model runs over calibration text (the session's mm_tap).
 *
 * "Distinct input": matrices that read the same activation share one entry — q/k/v (or
 * in_proj_qkv/z/a/b) read the input norm's output; the router, shared-expert gate/up and
 * shared_expert_gate the post-attention norm's; each expert's gate/up the rows routed to it.
 *
 * File format (.qcal, little-endian, every record 8-byte aligned so the float64 arrays are read
 * in place from a mapping):
 *   header (48 bytes + dataset):
 *     char   magic[8] = "QMIXCAL1"
 *     u32    version = 1
 *     u32    flags            bit 0: records carry Hessians
 *                              bit 1: sequential (qmix calibrate --sequential): layer L's
 *                                     statistics were collected with layers 0…L−1 running
 *                                     quantized; the records are the same either way
 *     u32    n_layers, n_experts
 *     u32    n_entries
 *     u32    ctx              tokens per calibration window
 *     u64    n_tokens         calibration tokens run
 *     u32    n_windows
 *     u32    dataset_len      ≤ 4096; the bytes follow, zero-padded to a multiple of 8
 *   n_entries records:
 *     i32 layer (−1: lm_head input), u32 kind (QMIX_CIN_*), i32 expert (−1: not per expert),
 *     u32 reserved = 0, u64 k (input channels), u64 n (rows accumulated),
 *     f64 sumsq[k], then if flags bit 0: f64 xtx[k·(k+1)/2] (row i holds Σ x_i x_j, j = i…k−1).
 * Readers check every field and size (hostile files give an error naming the record), and that
 * (layer, kind, expert) is unique. */
#ifndef QMIX_QUANT_CALIB_H
#define QMIX_QUANT_CALIB_H

#include <stdint.h>
#include <stdio.h>

#include "qmix.h"

enum {
    QMIX_CIN_ATTN,         /* input_layernorm output: q/k/v_proj, in_proj_qkv/z/a/b */
    QMIX_CIN_ATTN_O,       /* o_proj input (gated attention output) */
    QMIX_CIN_GDN_OUT,      /* out_proj input (gated-norm output) */
    QMIX_CIN_FFN,          /* post_attention_layernorm output: router, shared expert gate/up, gate */
    QMIX_CIN_SHARED_DOWN,  /* shared expert down_proj input */
    QMIX_CIN_EXPERT,       /* routed expert gate/up input: only the tokens routed to it */
    QMIX_CIN_EXPERT_DOWN,  /* routed expert down_proj input */
    QMIX_CIN_HEAD,         /* lm_head input (final norm output) */
    QMIX_CIN_COUNT
};

typedef struct qmix_calib_entry {
    int layer, kind, expert;
    int64_t k;
    uint64_t n;
    const double *sumsq;   /* [k] */
    const double *xtx;     /* packed upper triangle, or NULL */
} qmix_calib_entry;

typedef struct qmix_calib qmix_calib;

/* Which statistics a tensor (HF or MLX name, ".weight" optional) reads: 1 with *layer, *kind
 * (per-expert kinds take the expert from the matrix index), 0 when it is not a calibrated linear
 * (embedding, norms, vision, MTP...). */
int qmix_calib_input_of(const char *tensor_name, int *layer, int *kind);
int qmix_calib_kind_per_expert(int kind);
const char *qmix_calib_kind_name(int kind);

/* ---- reading ---- */
int qmix_calib_open(const char *path, qmix_calib **out, qmix_err *err);
int qmix_calib_open_memory(const void *buf, uint64_t len, const char *label, qmix_calib **out,
                           qmix_err *err);
void qmix_calib_close(qmix_calib *c);
const qmix_calib_entry *qmix_calib_get(const qmix_calib *c, int layer, int kind, int expert);
int qmix_calib_count(const qmix_calib *c);
const qmix_calib_entry *qmix_calib_at(const qmix_calib *c, int i);
uint64_t qmix_calib_tokens(const qmix_calib *c);
/* GPTQ's RTN failsafe threshold (spec §3.10): inputs that saw fewer calibration rows are rounded
 * to nearest. pct percent of n_tokens, rounded up; pct < 0: GPTQModel's default, 0.5 %. */
#define QMIX_CALIB_FAILSAFE_PCT 0.5
int64_t qmix_calib_failsafe_rows(uint64_t n_tokens, double pct);
int qmix_calib_has_hessian(const qmix_calib *c);
int qmix_calib_sequential(const qmix_calib *c);
int qmix_calib_layers(const qmix_calib *c);
int qmix_calib_experts(const qmix_calib *c);
const char *qmix_calib_dataset(const qmix_calib *c);

/* ---- collecting ---- */
struct qmix_session;

/* Data bytes of one record with k input channels (sums of squares, and the Hessian triangle). */
uint64_t qmix_calib_record_bytes(int64_t k, int hessian);
/* Bytes the statistics of layer `layer` (−1: the lm_head input) take while collected. */
uint64_t qmix_calib_layer_bytes(const qmix_config *cfg, int layer, int hessian);
/* Entries a whole model has (the header's n_entries). */
int qmix_calib_total_entries(const qmix_config *cfg);

typedef struct qmix_calib_collector qmix_calib_collector;
/* Collects layers [lo, hi) (and the lm_head input when with_head) of the session's model;
 * attaches itself as the session's mm_tap. */
int qmix_calib_collector_new(struct qmix_session *s, int lo, int hi, int with_head, int hessian,
                             qmix_calib_collector **out, qmix_err *err);
/* Detaches from the session and frees. */
void qmix_calib_collector_free(qmix_calib_collector *c);
/* Out of memory inside the tap (it cannot return errors) is reported here. */
int qmix_calib_collector_failed(const qmix_calib_collector *c);
/* The statistics accumulated so far for (layer, kind, expert), as a reader's entry whose arrays
 * point into the collector (valid until it is freed): 1, or 0 when it does not collect them. */
int qmix_calib_collector_entry(const qmix_calib_collector *c, int layer, int kind, int expert,
                               qmix_calib_entry *out);

typedef struct qmix_calib_header {
    int hessian, sequential, n_layers, n_experts, n_entries, ctx, n_windows;
    uint64_t n_tokens;
    const char *dataset;
} qmix_calib_header;
int qmix_calib_write_header(FILE *f, const qmix_calib_header *h, qmix_err *err);
/* Appends the collector's records (canonical order: by layer; per layer ATTN, ATTN_O or
 * GDN_OUT, FFN, SHARED_DOWN, EXPERT ×E, EXPERT_DOWN ×E; HEAD last). Returns records written. */
int qmix_calib_write_records(FILE *f, const qmix_calib_collector *c, qmix_err *err);

#endif
