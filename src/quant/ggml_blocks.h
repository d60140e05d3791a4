/* ggml block formats (spec/quant-formats.md §5.2–5.3): the type table every GGUF reader and
 * writer needs, and a scalar dequantize reference for each type qmix can run. A row of cols
 * elements is cols/block consecutive blocks; every row is independent. */
#ifndef QMIX_QUANT_GGML_BLOCKS_H
#define QMIX_QUANT_GGML_BLOCKS_H

#include <stddef.h>
#include <stdint.h>

/* ggml type ids as stored in GGUF tensor infos. */
enum {
    QMIX_GGML_F32 = 0, QMIX_GGML_F16 = 1, QMIX_GGML_Q4_0 = 2, QMIX_GGML_Q4_1 = 3,
    QMIX_GGML_Q5_0 = 6, QMIX_GGML_Q5_1 = 7, QMIX_GGML_Q8_0 = 8, QMIX_GGML_Q8_1 = 9,
    QMIX_GGML_Q2_K = 10, QMIX_GGML_Q3_K = 11, QMIX_GGML_Q4_K = 12, QMIX_GGML_Q5_K = 13,
    QMIX_GGML_Q6_K = 14, QMIX_GGML_Q8_K = 15, QMIX_GGML_IQ4_NL = 20, QMIX_GGML_IQ4_XS = 23,
    QMIX_GGML_BF16 = 30, QMIX_GGML_TYPE_LIMIT = 64
};

/* Name ("Q4_K"), or NULL for an id ggml does not define. */
const char *qmix_ggml_type_name(int type);
/* Elements per block and bytes per block; 0 for ids whose geometry qmix does not know (the
 * reader refuses such tensors since it cannot even size them). */
int qmix_ggml_block_elems(int type);
size_t qmix_ggml_block_bytes(int type);
/* 1 if qmix can dequantize (and therefore run) this type. */
int qmix_ggml_type_supported(int type);
/* Bytes of one row of cols elements (cols a multiple of the block size), 0 if unknown. */
size_t qmix_ggml_row_bytes(int type, int64_t cols);

/* Dequantizes one block (qmix_ggml_block_elems(type) outputs) of a supported type. */
void qmix_ggml_dequant_block(int type, const uint8_t *block, float *out);
/* Dequantizes a row of cols elements (a multiple of the block size) of a supported type. */
void qmix_ggml_dequant_row(int type, const void *row, int64_t cols, float *out);

/* Q8_0 reference quantization (ggml_quant.c) (§5.3: d = max|x|/127, codes roundf(x·(1/d)), fp16 d): writes
 * cols/32 blocks. */
void qmix_ggml_quantize_row_q8_0(const float *x, int64_t cols, void *out);

/* Searched quantizers (ggml_quant.c, spec §5.4): each writes cols / block consecutive blocks of
 * its type (cols a multiple of 32, or of 256 for the K-quants). importance is NULL or cols
 * non-negative per-element weights (an imatrix row: mean squared input of each column); with it,
 * the scales minimise the importance-weighted squared error. Finite input always gives valid
 * blocks; a zero row dequantizes to zeros. */
void qmix_ggml_quantize_row_q4_0(const float *x, int64_t cols, const float *importance, void *out);
void qmix_ggml_quantize_row_q4_1(const float *x, int64_t cols, const float *importance, void *out);
void qmix_ggml_quantize_row_q5_0(const float *x, int64_t cols, const float *importance, void *out);
void qmix_ggml_quantize_row_q5_1(const float *x, int64_t cols, const float *importance, void *out);
void qmix_ggml_quantize_row_q2_k(const float *x, int64_t cols, const float *importance, void *out);
void qmix_ggml_quantize_row_q3_k(const float *x, int64_t cols, const float *importance, void *out);
void qmix_ggml_quantize_row_q4_k(const float *x, int64_t cols, const float *importance, void *out);
/* The non-linear 4-bit types: each element is a scale times a value of the fixed 16-entry table
 * qmix_ggml_iq4_table; IQ4_NL in blocks of 32 with an fp16 scale (4.5 bits per weight), IQ4_XS in
 * super-blocks of 256 with 6-bit sub-block scales (4.25 bits per weight). */
void qmix_ggml_quantize_row_iq4_nl(const float *x, int64_t cols, const float *importance, void *out);
void qmix_ggml_quantize_row_iq4_xs(const float *x, int64_t cols, const float *importance, void *out);
void qmix_ggml_quantize_row_q5_k(const float *x, int64_t cols, const float *importance, void *out);
void qmix_ggml_quantize_row_q6_k(const float *x, int64_t cols, const float *importance, void *out);

/* 1 if qmix_ggml_quantize_row can write this type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
 * Q5_1, Q2_K…Q6_K). */
int qmix_ggml_can_quantize(int type);
/* Any writable type (importance ignored by the float types and Q8_0); -1 if the type cannot be
 * written or cols is not a multiple of its block. */
int qmix_ggml_quantize_row(int type, const float *x, int64_t cols, const float *importance,
                           void *out);

/* The IQ4_NL / IQ4_XS code table (§5.3). */
extern const int8_t qmix_ggml_iq4_table[16];

#endif
