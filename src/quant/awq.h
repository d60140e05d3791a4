/* AWQ scale search (spec/quant-formats.md §4.1, §4.4): for a group of linear layers reading one
 * activation x, per-channel scales s_j = a_j^α (a_j = RMS of x_j, normalised by √(max·min)) are
 * tried for α = 0, 1/20, …, 19/20; each candidate quantizes W·diag(s) (MLX's rule) and scores
 * Σ_j c_j Σ_n (W[n,j] − Ŵ[n,j]/s_j)² — the output error E‖(W − Ŵ)x‖² when input channels are
 * uncorrelated (§4.4; the whole-block output of §4.1 would need the activations themselves).
 * The best α's s is folded by the caller (§4.2): the producer of x divides by s, every consumer
 * multiplies its columns by s. Rows are scored one at a time, so the search streams. No printing. */
#ifndef QMIX_QUANT_AWQ_H
#define QMIX_QUANT_AWQ_H

#include <stdint.h>

#define QMIX_AWQ_GRID 20

/* s[k] for α from act[k] (RMS per channel; channels with act 0 get the smallest scale). */
void qmix_awq_scales(const float *act, int64_t k, double alpha, float *s);
/* loss[α] += weight · Σ_j c_j (w_j − Ŵ_j)² for every α of the grid, where Ŵ = Q(w·s_α)/s_α;
 * s_tab[QMIX_AWQ_GRID][k]; c NULL: 1. scratch: 2·k floats + k·bits/32 + k/group·2 words. */
void qmix_awq_row_loss(const float *w, const float *c, double weight, int64_t k,
                       const float *s_tab, int bits, int group, float *scratch, double *loss);
/* Floats of scratch qmix_awq_row_loss needs for k channels. */
int64_t qmix_awq_scratch(int64_t k);

#endif
