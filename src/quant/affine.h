/* MLX affine group-wise quantization (spec/quant-formats.md §1): w ≈ s·q + β per group of
 * group_size consecutive inputs of a row; codes packed LSB-first into one little-endian bit
 * stream per row (code k at bit k·bits), rows ending on a uint32 boundary. */
#ifndef QMIX_QUANT_AFFINE_H
#define QMIX_QUANT_AFFINE_H

#include <stddef.h>
#include <stdint.h>

#include "qmix.h"

/* bits in {2,3,4,5,6,8}, group_size in {32,64,128}. */
int qmix_affine_valid(int bits, int group_size);
/* uint32 words one packed row of cols codes takes: cols·bits/32 (cols is a multiple of 32). */
int64_t qmix_affine_row_words(int64_t cols, int bits);

uint32_t qmix_affine_get_code(const uint32_t *row, int64_t k, int bits);
void qmix_affine_set_code(uint32_t *row, int64_t k, int bits, uint32_t code);

/* Quantizes one row with mx.quantize's rule (§1.2, CPU backend: exact min/max, round half to
 * even): packed[row_words] codes, scales/biases[cols/group_size] in float32 (the caller stores
 * them in the model dtype; codes were chosen with the float32 values, as MLX does). */
void qmix_affine_quantize_row(const float *w, int64_t cols, int bits, int group_size,
                              uint32_t *packed, float *scales, float *biases);
/* out[cols] = s·q + β, scales/biases of scale_dtype (BF16, F16 or F32). */
void qmix_affine_dequantize_row(const uint32_t *packed, const void *scales, const void *biases,
                                qmix_dtype scale_dtype, int64_t cols, int bits, int group_size,
                                float *out);

#endif
