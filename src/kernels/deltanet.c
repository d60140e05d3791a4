/* The gated delta rule for one head, in two forms that compute the same thing:
 *
 *   S_t = g_t·S_{t-1} + k_t ⊗ u_t,   u_t = β_t·(v_t − g_t·S_{t-1}ᵀk_t),   o_t = S_tᵀq_t
 *
 * recurrent: token by token (decode). chunked: blocks of tokens with the UT/WY transform
 * (prefill): inside a block of C tokens with cumulative decays γ_t = Π g, the u_t solve the
 * unit-lower-triangular system
 *   u_i + β_i Σ_{j<i} (γ_i/γ_j)(k_i·k_j) u_j = β_i (v_i − γ_i S_0ᵀk_i)
 * and then o_t = γ_t S_0ᵀq_t + Σ_{i≤t} (γ_t/γ_i)(q_t·k_i) u_i,
 *          S_C = γ_C S_0 + Σ_i (γ_C/γ_i) k_i ⊗ u_i.
 * Every decay ratio used is γ_t/γ_i with i ≤ t, i.e. ≤ 1, computed from log-decays. */
#include <math.h>
#include <string.h>

#include "kernels/kernels.h"

#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

MULTIVERSION
void qk_delta_rule_recurrent(float *restrict S, int dk, int dv, int n, const float *q,
                             const float *k, const float *v, int64_t ld_qk, int64_t ld_v,
                             const float *log_decay, const float *beta, float *o, int64_t ld_o,
                             float *restrict scratch)
{
    float *u = scratch; /* [dv] */
    for (int t = 0; t < n; t++) {
        const float *qt = q + t * ld_qk, *kt = k + t * ld_qk, *vt = v + t * ld_v;
        float *ot = o + t * ld_o;
        float g = expf(log_decay[t]), b = beta[t];
        for (int d = 0; d < dv; d++) u[d] = 0;
        for (int i = 0; i < dk; i++) {
            const float *Si = S + (int64_t)i * dv;
            float ki = kt[i];
            for (int d = 0; d < dv; d++) u[d] += Si[d] * ki;
        }
        for (int d = 0; d < dv; d++) u[d] = b * (vt[d] - g * u[d]);
        for (int d = 0; d < dv; d++) ot[d] = 0;
        for (int i = 0; i < dk; i++) {
            float *Si = S + (int64_t)i * dv;
            float ki = kt[i], qi = qt[i];
            for (int d = 0; d < dv; d++) {
                Si[d] = g * Si[d] + ki * u[d];
                ot[d] += Si[d] * qi;
            }
        }
    }
}

size_t qk_delta_rule_chunked_scratch(int dk, int dv, int chunk)
{
    return (size_t)chunk * (2 * (size_t)chunk + 2 + (size_t)dv) + (size_t)dk;
}

MULTIVERSION
void qk_delta_rule_chunked(float *restrict S, int dk, int dv, int n, const float *q,
                           const float *k, const float *v, int64_t ld_qk, int64_t ld_v,
                           const float *log_decay, const float *beta, float *o, int64_t ld_o,
                           int chunk, float *restrict scratch)
{
    float *A = scratch;                       /* [C][C]: β_i (γ_i/γ_j) k_i·k_j, j < i */
    float *QK = A + (size_t)chunk * chunk;    /* [C][C]: (γ_t/γ_i) q_t·k_i, i ≤ t */
    float *lg = QK + (size_t)chunk * chunk;   /* [C]: log γ_t */
    float *gam = lg + chunk;                  /* [C]: γ_t */
    float *U = gam + chunk;                   /* [C][dv] */
    float *kscaled = U + (size_t)chunk * dv;  /* [dk] */
    for (int c0 = 0; c0 < n; c0 += chunk) {
        int C = n - c0 < chunk ? n - c0 : chunk;
        const float *Q = q + c0 * ld_qk, *K = k + c0 * ld_qk, *Vv = v + c0 * ld_v;
        float *O = o + c0 * ld_o;
        float acc = 0;
        for (int t = 0; t < C; t++) {
            acc += log_decay[c0 + t];
            lg[t] = acc;
            gam[t] = expf(acc);
        }
        /* B_i = β_i (v_i − γ_i S_0ᵀk_i) into U, and O_t = γ_t S_0ᵀq_t */
        for (int t = 0; t < C; t++) {
            float *Ut = U + (int64_t)t * dv, *Ot = O + t * ld_o;
            const float *kt = K + t * ld_qk, *qt = Q + t * ld_qk;
            for (int d = 0; d < dv; d++) Ut[d] = Ot[d] = 0;
            for (int i = 0; i < dk; i++) {
                const float *Si = S + (int64_t)i * dv;
                float ki = kt[i], qi = qt[i];
                for (int d = 0; d < dv; d++) {
                    Ut[d] += Si[d] * ki;
                    Ot[d] += Si[d] * qi;
                }
            }
            float b = beta[c0 + t], g = gam[t];
            const float *vt = Vv + t * ld_v;
            for (int d = 0; d < dv; d++) {
                Ut[d] = b * (vt[d] - g * Ut[d]);
                Ot[d] *= g;
            }
        }
        /* the two decay-masked Gram matrices */
        for (int t = 0; t < C; t++) {
            const float *kt = K + t * ld_qk, *qt = Q + t * ld_qk;
            for (int i = 0; i <= t; i++) {
                const float *ki = K + i * ld_qk;
                float ratio = expf(lg[t] - lg[i]);
                QK[t * chunk + i] = ratio * qk_dot(qt, ki, dk);
                if (i < t) A[t * chunk + i] = beta[c0 + t] * ratio * qk_dot(kt, ki, dk);
            }
        }
        /* forward substitution: u_t -= Σ_{j<t} A[t][j] u_j */
        for (int t = 1; t < C; t++) {
            float *Ut = U + (int64_t)t * dv;
            for (int j = 0; j < t; j++) {
                const float *Uj = U + (int64_t)j * dv;
                float a = A[t * chunk + j];
                for (int d = 0; d < dv; d++) Ut[d] -= a * Uj[d];
            }
        }
        /* O_t += Σ_{i≤t} QK[t][i] u_i */
        for (int t = 0; t < C; t++) {
            float *Ot = O + t * ld_o;
            for (int i = 0; i <= t; i++) {
                const float *Ui = U + (int64_t)i * dv;
                float w = QK[t * chunk + i];
                for (int d = 0; d < dv; d++) Ot[d] += w * Ui[d];
            }
        }
        /* S = γ_C S + Σ_i (γ_C/γ_i) k_i ⊗ u_i */
        float gC = gam[C - 1];
        for (int i = 0; i < dk; i++) {
            float *Si = S + (int64_t)i * dv;
            for (int d = 0; d < dv; d++) Si[d] *= gC;
        }
        for (int t = 0; t < C; t++) {
            const float *kt = K + t * ld_qk, *Ut = U + (int64_t)t * dv;
            float ratio = expf(lg[C - 1] - lg[t]);
            for (int i = 0; i < dk; i++) kscaled[i] = ratio * kt[i];
            for (int i = 0; i < dk; i++) {
                float *Si = S + (int64_t)i * dv;
                float ki = kscaled[i];
                for (int d = 0; d < dv; d++) Si[d] += ki * Ut[d];
            }
        }
    }
}
