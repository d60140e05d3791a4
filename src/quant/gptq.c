/* GPTQ and importance-weighted RTN into MLX affine groups (see gptq.h). */
#include "quant/gptq.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"
#include "quant/affine.h"
#include "quant/linalg.h"
#include "util/err.h"

float qmix_round_to_dtype(float v, qmix_dtype dt)
{
    if (dt == QMIX_BF16) return qk_bf16_to_f32(qk_f32_to_bf16(v));
    if (dt == QMIX_F16) return qk_f16_to_f32(qk_f32_to_f16(v));
    return v;
}

void qmix_mlx_group_params(const float *x, int n, int bits, qmix_dtype sdt, float *s_out,
                           float *b_out)
{
    /* §1.2, CPU backend: exact min/max, the far edge snapped so the near edge is a code */
    const float n_bins = (float)((1 << bits) - 1);
    float mx = -INFINITY, mn = INFINITY;
    for (int j = 0; j < n; j++) {
        mx = mx < x[j] ? x[j] : mx;
        mn = x[j] < mn ? x[j] : mn;
    }
    int neg_edge = fabsf(mn) > fabsf(mx);
    float s = fmaxf((mx - mn) / n_bins, 1e-7f);
    s = neg_edge ? s : -s;
    float edge = neg_edge ? mn : mx;
    float q0 = nearbyintf(edge / s), b = 0;
    if (q0 != 0) {
        s = edge / q0;
        b = edge;
    }
    *s_out = qmix_round_to_dtype(s, sdt);
    *b_out = qmix_round_to_dtype(b, sdt);
}

static inline float code_of(float x, float s, float b, float n_bins)
{
    if (s == 0) return 0; /* a scale that underflowed in the storage dtype: every code is β */
    float q = nearbyintf((x - b) / s);
    return q > 0 ? (q < n_bins ? q : n_bins) : 0; /* NaN → 0 */
}

/* ---- GPTQ preparation ------------------------------------------------------------------ */

/* Square tiles of the transposing copies below: two 64×64 tiles of doubles fit L1/L2. */
#define TILE 64

typedef struct keyed { double key; int32_t idx; } keyed;

static int cmp_desc(const void *a, const void *b)
{
    const keyed *x = a, *y = b;
    if (x->key != y->key) return x->key > y->key ? -1 : 1;
    return x->idx < y->idx ? -1 : x->idx > y->idx; /* stable */
}

/* GAR (§3.5): inside each group by diag(H) descending, groups by their largest diag descending. */
static int gar_order(const double *diag, int64_t k, int group, int32_t *perm)
{
    int64_t ng = k / group;
    keyed *ks = malloc((size_t)(k > ng ? k : ng) * sizeof *ks);
    int32_t *inner = malloc((size_t)k * sizeof *inner);
    if (!ks || !inner) {
        free(ks);
        free(inner);
        return -1;
    }
    for (int64_t g = 0; g < ng; g++) {
        for (int j = 0; j < group; j++)
            ks[j] = (keyed){diag[g * group + j], (int32_t)(g * group + j)};
        qsort(ks, (size_t)group, sizeof *ks, cmp_desc);
        for (int j = 0; j < group; j++) inner[g * group + j] = ks[j].idx;
    }
    for (int64_t g = 0; g < ng; g++) ks[g] = (keyed){diag[inner[g * group]], (int32_t)g};
    qsort(ks, (size_t)ng, sizeof *ks, cmp_desc);
    for (int64_t p = 0; p < ng; p++)
        memcpy(perm + p * group, inner + (int64_t)ks[p].idx * group, (size_t)group * sizeof *perm);
    free(ks);
    free(inner);
    return 0;
}

void qmix_gptq_prep_free(qmix_gptq_prep *p)
{
    free(p->u);
    free(p->perm);
    free(p->dead);
    free(p->hdiag);
    memset(p, 0, sizeof *p);
}

int qmix_gptq_prepare(const double *h_upper, const double *h_full, int64_t k, int group,
                      const qmix_gptq_opts *o, qmix_gptq_prep *out, qmix_err *err)
{
    memset(out, 0, sizeof *out);
    if (k <= 0 || group <= 0 || k % group || (!h_upper && !h_full))
        return qmix_errf(err, "gptq: bad arguments (k %lld, group %d)", (long long)k, group);
    double damp0 = o && o->damp > 0 ? o->damp : 0.01;
    if (!(damp0 < 1)) return qmix_errf(err, "gptq: damping %g must be in (0, 1)", damp0);
    int block = o && o->block > 0 ? o->block : 128;
    /* groups never straddle a block, so a group's parameters see all feedback of its block */
    block = (block + group - 1) / group * group;
    size_t kk = (size_t)k * (size_t)k;
    double *h = malloc(kk * sizeof *h), *a = malloc(kk * sizeof *a), *diag = malloc((size_t)k * sizeof *diag);
    out->perm = malloc((size_t)k * sizeof *out->perm);
    out->dead = calloc((size_t)k, 1);
    out->u = malloc(kk * sizeof *out->u);
    if (!h || !a || !diag || !out->perm || !out->dead || !out->u) {
        free(h); free(a); free(diag);
        qmix_gptq_prep_free(out);
        return qmix_errf(err, "gptq: out of memory for a %lld×%lld Hessian", (long long)k,
                         (long long)k);
    }
    out->k = k;
    out->group = group;
    out->grid = o ? o->grid : QMIX_GRID_MLX;
    out->block = block;
    /* H's lower triangle, original order (the packed upper triangle read row by row, in
     * tiles so the transposed writes stay in cache) */
    for (int64_t ib = 0; ib < k; ib += TILE)
        for (int64_t jb = ib; jb < k; jb += TILE)
            for (int64_t i = ib; i < ib + TILE && i < k; i++) {
                const double *src = h_upper ? h_upper + i * k - i * (i - 1) / 2 - i
                                            : h_full + i * k;
                for (int64_t j = jb > i ? jb : i; j < jb + TILE && j < k; j++) h[j * k + i] = src[j];
            }
    for (int64_t i = 0; i < k; i++) {
        if (h[i * k + i] == 0) { /* §3.3: a channel that was never non-zero */
            out->dead[i] = 1;
            out->n_dead++;
            h[i * k + i] = 1;
        }
        diag[i] = h[i * k + i];
    }
    if (o && o->act_order) {
        if (gar_order(diag, k, group, out->perm)) {
            free(h); free(a); free(diag);
            qmix_gptq_prep_free(out);
            return qmix_errf(err, "gptq: out of memory");
        }
    } else {
        for (int64_t i = 0; i < k; i++) out->perm[i] = (int32_t)i;
    }
    /* permute once: h becomes H[perm][perm] (only h's lower triangle is filled) */
    for (int64_t i = 0; i < k; i++)
        for (int64_t j = 0; j <= i; j++) {
            int64_t pi = out->perm[i], pj = out->perm[j];
            a[i * k + j] = pi >= pj ? h[pi * k + pj] : h[pj * k + pi];
        }
    for (int64_t i = 0; i < k; i++)
        for (int64_t j = 0; j <= i; j++) h[i * k + j] = a[i * k + j];
    double mean = 0, maxd = 0;
    for (int64_t i = 0; i < k; i++) {
        mean += h[i * k + i];
        if (fabs(h[i * k + i]) > maxd) maxd = fabs(h[i * k + i]);
    }
    mean /= (double)k;
    if (!o || !o->mlx_rule) { /* group search weights: diag(H) in processing order */
        out->hdiag = malloc((size_t)k * sizeof *out->hdiag);
        if (!out->hdiag) {
            free(h); free(a); free(diag);
            qmix_gptq_prep_free(out);
            return qmix_errf(err, "gptq: out of memory");
        }
        for (int64_t i = 0; i < k; i++) out->hdiag[i] = (float)h[i * k + i];
    }
    /* U with UᵀU = (H + λI)⁻¹ without forming the inverse: with J the order reversal,
     * J(H + λI)J = W Wᵀ (Cholesky) gives (H + λI)⁻¹ = J W⁻ᵀ W⁻¹ J = UᵀU for U = J W⁻¹ J, which is
     * upper triangular. One factorisation and one triangular inverse (≈ k³/2 flops) instead of
     * factor, invert, factor again (≈ k³), and never the explicit inverse's rounding.
     * §3.4 step 3: raise the damping, then add growing diagonal floors. */
    qmix_pool *pool = o ? o->pool : NULL;
    int ok = 0;
    for (int t = 0; t <= 6 && !ok; t++) {
        double floor_v = t ? maxd * 1e-6 * pow(10.0, t - 1) : 0;
        for (double damp = damp0; damp < 1 && !ok; damp += 0.01) {
            /* (JHJ)[i][j] = H[k-1-i][k-1-j] = h[k-1-j][k-1-i] (lower half), in cache tiles */
            for (int64_t ib = 0; ib < k; ib += TILE)
                for (int64_t jb = 0; jb <= ib; jb += TILE)
                    for (int64_t i = ib; i < ib + TILE && i < k; i++)
                        for (int64_t j = jb; j < jb + TILE && j <= i; j++)
                            a[i * k + j] = h[(k - 1 - j) * k + (k - 1 - i)];
            for (int64_t i = 0; i < k; i++) a[i * k + i] += damp * mean + floor_v;
            if (!qmix_cholesky_lower(a, k, pool)) {
                ok = 1;
                out->damp = damp;
            }
        }
    }
    int rc = 0;
    if (ok) {
        qmix_tri_inverse_lower(a, h, k, pool); /* h = W⁻¹ (h's copy of H is no longer needed) */
        for (int64_t i = 0; i < k; i++)
            for (int64_t j = 0; j < k; j++)
                out->u[i * k + j] = j >= i ? (float)h[(k - 1 - i) * k + (k - 1 - j)] : 0.0f;
    } else {
        qmix_gptq_prep_free(out);
        rc = 1;
    }
    free(h);
    free(a);
    free(diag);
    return rc;
}

static void wsearch(const float *x, const float *c, int group, int bits, qmix_dtype sdt, float *q,
                    float *s_out, float *b_out);

/* ---- the column loop, one row ----------------------------------------------------------- */

QMIX_HOT_LOOP void qmix_gptq_quantize_row(const qmix_gptq_prep *p, const float *w, int bits,
                            qmix_dtype sdt, float *work, uint32_t *packed, float *scales,
                            float *biases)
{
    const int64_t k = p->k;
    const int g = p->group, B = p->block;
    const float n_bins = (float)((1 << bits) - 1);
    float *x = work, *e = work + k; /* e: B error terms, then g floats of search scratch */
    for (int64_t i = 0; i < k; i++) x[i] = p->dead[p->perm[i]] ? 0.0f : w[p->perm[i]];
    memset(packed, 0, (size_t)qmix_affine_row_words(k, bits) * sizeof *packed);
    float s = 0, b = 0;
    for (int64_t b0 = 0; b0 < k; b0 += B) {
        int64_t b1 = b0 + B < k ? b0 + B : k;
        for (int64_t i = b0; i < b1; i++) {
            if (i % g == 0) { /* group parameters from the fully updated values (gptq.h) */
                if (p->grid == QMIX_GRID_SYM)
                    qmix_sym_group_params(x + i, p->hdiag ? p->hdiag + i : NULL, g, bits, sdt,
                                          p->hdiag != NULL, &s, &b);
                else if (p->hdiag) wsearch(x + i, p->hdiag + i, g, bits, sdt, e + (B < k ? B : k), &s, &b);
                else qmix_mlx_group_params(x + i, g, bits, sdt, &s, &b);
                int64_t grp = p->perm[i] / g;
                scales[grp] = s;
                biases[grp] = b;
            }
            float q = code_of(x[i], s, b, n_bins);
            qmix_affine_set_code(packed, p->perm[i], bits, (uint32_t)q);
            const float *ui = p->u + i * k;
            float err = (x[i] - (s * q + b)) / ui[i];
            for (int64_t j = i + 1; j < b1; j++) x[j] -= err * ui[j];
            e[i - b0] = err;
        }
        /* lazy update of the columns after the block: W[:, b1:] −= E · U[b0:b1, b1:] */
        for (int64_t i = b0; i < b1; i++) {
            const float *ui = p->u + i * k;
            float err = e[i - b0];
            if (err == 0) continue;
            for (int64_t j = b1; j < k; j++) x[j] -= err * ui[j];
        }
    }
}

/* ---- importance-weighted RTN ------------------------------------------------------------ */

/* Σ c (x − ŵ)² of a group at (s, b); codes into q. */
static double werr(const float *x, const float *c, int n, float s, float b, float n_bins, float *q)
{
    double e = 0;
    for (int j = 0; j < n; j++) {
        q[j] = code_of(x[j], s, b, n_bins);
        double d = (double)x[j] - ((double)s * q[j] + b);
        e += (c ? c[j] : 1.0) * d * d;
    }
    return e;
}

/* The scale/bias of one group minimising Σ c (x − ŵ)² (c NULL: plain squared error): the MLX
 * rule, and the range shrunk at either end, each candidate refined once by weighted least squares
 * on its codes (the 2×2 normal equations of Σ c (x − s·q − b)²). q: n floats of scratch. */
static void wsearch(const float *x, const float *c, int group, int bits, qmix_dtype sdt, float *q,
                    float *s_out, float *b_out)
{
    const float n_bins = (float)((1 << bits) - 1);
    double csum = 0;
    if (c)
        for (int j = 0; j < group; j++) csum += c[j];
    if (c && !(csum > 0)) c = NULL; /* no information: plain squared error */
    float bs, bb;
    qmix_mlx_group_params(x, group, bits, sdt, &bs, &bb);
    double best = werr(x, c, group, bs, bb, n_bins, q);
    float mn = INFINITY, mx = -INFINITY;
    for (int j = 0; j < group; j++) {
        mn = x[j] < mn ? x[j] : mn;
        mx = x[j] > mx ? x[j] : mx;
    }
    float range = mx - mn;
    static const float shrink[] = {0.0f, 0.05f, 0.1f, 0.15f, 0.2f};
    for (int a = 0; a < 5 && range > 0; a++)
        for (int z = 0; z < 5; z++) {
            float lo = mn + shrink[a] * range, hi = mx - shrink[z] * range;
            float s = qmix_round_to_dtype((hi - lo) / n_bins, sdt);
            float b = qmix_round_to_dtype(lo, sdt);
            double e0 = werr(x, c, group, s, b, n_bins, q);
            if (e0 < best) { best = e0; bs = s; bb = b; }
            double sw = 0, sq = 0, sqq = 0, sx = 0, sqx = 0;
            for (int j = 0; j < group; j++) {
                double cj = c ? c[j] : 1.0;
                sw += cj; sq += cj * q[j]; sqq += cj * q[j] * q[j];
                sx += cj * x[j]; sqx += cj * q[j] * x[j];
            }
            double det = sqq * sw - sq * sq;
            if (!(fabs(det) > 1e-12 * sw * sw)) continue;
            float s2 = qmix_round_to_dtype((float)((sqx * sw - sq * sx) / det), sdt);
            float b2 = qmix_round_to_dtype((float)((sqq * sx - sq * sqx) / det), sdt);
            if (!isfinite(s2) || !isfinite(b2)) continue;
            double e1 = werr(x, c, group, s2, b2, n_bins, q);
            if (e1 < best) { best = e1; bs = s2; bb = b2; }
        }
    *s_out = bs;
    *b_out = bb;
}

void qmix_wrtn_quantize_row(const float *w, const float *imp, int64_t k, int bits, int group,
                            qmix_dtype sdt, float *work, uint32_t *packed, float *scales,
                            float *biases)
{
    const float n_bins = (float)((1 << bits) - 1);
    memset(packed, 0, (size_t)qmix_affine_row_words(k, bits) * sizeof *packed);
    for (int64_t g0 = 0; g0 + group <= k; g0 += group) {
        const float *x = w + g0;
        float bs, bb;
        wsearch(x, imp ? imp + g0 : NULL, group, bits, sdt, work, &bs, &bb);
        scales[g0 / group] = bs;
        biases[g0 / group] = bb;
        for (int j = 0; j < group; j++)
            qmix_affine_set_code(packed, g0 + j, bits, (uint32_t)code_of(x[j], bs, bb, n_bins));
    }
}

/* ---- the symmetric (GPTQ) grid -------------------------------------------------------------- */

static float sym_code(float x, float s, int bits)
{
    const float zero = (float)(1 << (bits - 1)), maxq = (float)((1 << bits) - 1);
    if (s == 0) return zero; /* an all-zero group (or a scale that underflowed): every weight 0 */
    float q = nearbyintf(x / s) + zero;
    return q > 0 ? (q < maxq ? q : maxq) : 0; /* NaN → 0 */
}

static double sym_err(const float *x, const float *c, int n, float s, int bits)
{
    const float zero = (float)(1 << (bits - 1));
    double e = 0;
    for (int j = 0; j < n; j++) {
        double d = (double)x[j] - (double)s * (sym_code(x[j], s, bits) - zero);
        e += (c ? c[j] : 1.0) * d * d;
    }
    return e;
}

void qmix_sym_group_params(const float *x, const float *c, int n, int bits, qmix_dtype sdt,
                           int search, float *s_out, float *b_out)
{
    const float half = (float)(1 << (bits - 1));
    float mn = 0, mx = 0;
    for (int j = 0; j < n; j++) {
        mn = x[j] < mn ? x[j] : mn;
        mx = x[j] > mx ? x[j] : mx;
    }
    /* codes 0 … maxq mean −half … half − 1 steps: the negative side has one step more */
    float s0 = fmaxf(-mn / half, mx / (half - 1));
    float best_s = qmix_round_to_dtype(s0, sdt);
    if (search && s0 > 0) {
        double best = sym_err(x, c, n, best_s, bits);
        for (int t = 1; t <= 8; t++) { /* shrink by 4 % steps: clipping pays at low bits */
            float s = qmix_round_to_dtype(s0 * (1.0f - 0.04f * (float)t), sdt);
            double e = sym_err(x, c, n, s, bits);
            if (e < best) {
                best = e;
                best_s = s;
            }
        }
    }
    *s_out = best_s;
    *b_out = -best_s * half; /* exact: half is a power of two */
}

void qmix_sym_quantize_row(const float *w, const float *imp, int64_t k, int bits, int group,
                           qmix_dtype sdt, int search, uint32_t *packed, float *scales,
                           float *biases)
{
    memset(packed, 0, (size_t)qmix_affine_row_words(k, bits) * sizeof *packed);
    for (int64_t g0 = 0; g0 + group <= k; g0 += group) {
        float s, b;
        qmix_sym_group_params(w + g0, imp ? imp + g0 : NULL, group, bits, sdt, search, &s, &b);
        scales[g0 / group] = s;
        biases[g0 / group] = b;
        for (int j = 0; j < group; j++)
            qmix_affine_set_code(packed, g0 + j, bits, (uint32_t)sym_code(w[g0 + j], s, bits));
    }
}
