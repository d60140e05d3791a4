/* Dense float64 linear algebra GPTQ needs (spec/quant-formats.md §3.4): the Cholesky factor of a
 * k×k Hessian and the inverse of a triangular factor, for k up to the hidden size (2048-4096)
 * and once per quantized matrix — hundreds of times per MoE layer, so they are blocked (every
 * inner loop a contiguous multiply-add the compiler vectorises) and spread over a thread pool.
 * Matrices are row-major n×n; only the lower triangle is read or written. The plain versions are
 * the references the blocked ones are tested against. */
#ifndef QMIX_QUANT_LINALG_H
#define QMIX_QUANT_LINALG_H

#include <stdint.h>

#include "runtime/threadpool.h"
#include "util/hot.h"


/* A = L·Lᵀ: L overwrites the lower triangle of a. Returns 0, or -1 when A is not positive
 * definite (a is then partly overwritten). pool may be NULL (this thread only). */
int qmix_cholesky_lower(double *a, int64_t n, qmix_pool *pool);
int qmix_cholesky_lower_ref(double *a, int64_t n);

/* out = L⁻¹ for the lower-triangular L (its lower triangle; the strict upper triangle of out is
 * set to 0). l and out must not overlap. pool may be NULL. */
void qmix_tri_inverse_lower(const double *l, double *out, int64_t n, qmix_pool *pool);
void qmix_tri_inverse_lower_ref(const double *l, double *out, int64_t n);

#endif
