/* ggml block quantization (writers), from spec/quant-formats.md §5.3 (field layouts) and §5.4
 * (how good blocks are chosen). Q8_0 reproduces the reference bit for bit; every other type runs
 * a scale search:
 *   - a sub-block's (scale, offset) or (scale) is fitted by trying a small fan of candidate
 *     inverse scales around the min/max one, rounding the codes for each, solving the weighted
 *     least-squares problem for the scale (and offset) given those codes, and keeping the fit with
 *     the lowest weighted squared error;
 *   - the K-quants then quantize their sub-block scales (and mins) against one fp16 super-scale
 *     with the same kind of weighted search (weights: the sub-blocks' total element weight), and
 *     finally re-derive every code from the scales actually stored, so rounding of the scales is
 *     absorbed by the codes instead of adding to the error.
 * Element weights: the importance c_j times sqrt(σ² + x_j²) (σ² = 2·mean(x²) of the block) when an
 * importance vector is given, else a type-specific default (x², or |x| + rms for the asymmetric
 * types), as in §5.4. Rows whose weights are all zero fall back to uniform weights. */
#include <math.h>
#include <string.h>

#include "kernels/kernels.h"
#include "quant/ggml_blocks.h"

/* ggml's nearest_int rounds half to even; lrintf does under the default rounding mode. */
static int nearest(float f) { return (int)lrintf(f); }

static int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

static void put_f16(uint8_t *p, float v)
{
    uint16_t h = qk_f32_to_f16(v);
    p[0] = (uint8_t)h;
    p[1] = (uint8_t)(h >> 8);
}

/* The value a float becomes once stored as fp16 (codes are re-derived from these). */
static float as_f16(float v) { return qk_f16_to_f32(qk_f32_to_f16(v)); }

void qmix_ggml_quantize_row_q8_0(const float *x, int64_t cols, void *out)
{
    uint8_t *b = out;
    for (int64_t k = 0; k < cols; k += 32, b += 34) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[k + j]));
        float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
        uint16_t h = qk_f32_to_f16(d);
        b[0] = (uint8_t)h;
        b[1] = (uint8_t)(h >> 8);
        for (int j = 0; j < 32; j++) b[2 + j] = (uint8_t)(int8_t)roundf(x[k + j] * id);
    }
}

/* ---- element weights ---------------------------------------------------------------------- */

enum { W_SQUARE, W_ABS_RMS, W_ABS };

/* Weights of the n elements of one block. With importance: c_j·sqrt(σ² + x_j²), σ² = sig_mul ·
 * mean(x²) (the element's own size matters, but never lets a small weight vanish). Without: the
 * default kind. All-zero weights (a zero row, or importance zero on the whole block) become 1 so
 * the fits below always have something to minimise. */
static void block_weights(const float *x, int n, const float *imp, int kind, float sig_mul,
                          float *w)
{
    float sum_x2 = 0;
    for (int j = 0; j < n; j++) sum_x2 += x[j] * x[j];
    float sigma2 = sig_mul * sum_x2 / (float)n, wsum = 0;
    for (int j = 0; j < n; j++) {
        if (imp) w[j] = imp[j] * sqrtf(sigma2 + x[j] * x[j]);
        else if (kind == W_SQUARE) w[j] = x[j] * x[j];
        else if (kind == W_ABS) w[j] = fabsf(x[j]);
        else w[j] = fabsf(x[j]); /* W_ABS_RMS: the rms is added per sub-block by the caller */
        wsum += w[j];
    }
    if (!(wsum > 0))
        for (int j = 0; j < n; j++) w[j] = 1;
}

/* |x| + rms of each sub-block of `sub` elements (§5.4's default for Q4_K/Q5_K), in place over w. */
static void add_subblock_rms(const float *x, int n, int sub, float *w)
{
    for (int s = 0; s < n; s += sub) {
        float sum_x2 = 0;
        for (int j = 0; j < sub; j++) sum_x2 += x[s + j] * x[s + j];
        float rms = sqrtf(sum_x2 / (float)sub);
        for (int j = 0; j < sub; j++) w[s + j] = fabsf(x[s + j]) + rms;
    }
}

/* ---- sub-block fits ----------------------------------------------------------------------- */

typedef struct search { float rmin, rdelta; int nstep; } search;

static float wsq_err_affine(int n, const float *x, const float *w, const uint8_t *L, float a,
                            float b)
{
    float e = 0;
    for (int j = 0; j < n; j++) {
        float diff = a * (float)L[j] + b - x[j];
        e += w[j] * diff * diff;
    }
    return e;
}

/* x ≈ a·L + b with integer codes L ∈ [0, nmax], a ≥ 0. With nonpos_offset (K-quants, whose min is
 * stored as a non-negative m subtracted), b ≤ 0. Codes of the fan of inverse scales
 * (nmax + rmin + rdelta·i)/(max − min) are tried; for each, (a, b) is the weighted least-squares
 * solution, falling back to b = 0 when it comes out positive and must not. Returns a, *offset = b,
 * codes in L. */
static float fit_affine(int n, const float *x, const float *w, int nmax, search s,
                        int nonpos_offset, uint8_t *L, float *offset)
{
    float lo = x[0], hi = x[0];
    for (int j = 1; j < n; j++) {
        lo = fminf(lo, x[j]);
        hi = fmaxf(hi, x[j]);
    }
    if (nonpos_offset && lo > 0) lo = 0;
    if (!(hi > lo)) {
        memset(L, 0, (size_t)n);
        *offset = lo;
        return 0;
    }
    float iscale = (float)nmax / (hi - lo), best_a = (hi - lo) / (float)nmax, best_b = lo;
    for (int j = 0; j < n; j++) L[j] = (uint8_t)clampi(nearest(iscale * (x[j] - lo)), 0, nmax);
    float best = wsq_err_affine(n, x, w, L, best_a, best_b), sxx = 0;
    for (int j = 0; j < n; j++) sxx += w[j] * x[j] * x[j];
    uint8_t cand[256];
    for (int i = 0; i <= s.nstep; i++) {
        iscale = ((float)nmax + s.rmin + s.rdelta * (float)i) / (hi - lo);
        float sw = 0, sl = 0, sll = 0, sx = 0, slx = 0;
        for (int j = 0; j < n; j++) {
            int l = clampi(nearest(iscale * (x[j] - lo)), 0, nmax);
            cand[j] = (uint8_t)l;
            float wl = w[j] * (float)l;
            sw += w[j];
            sl += wl;
            sll += wl * (float)l;
            sx += w[j] * x[j];
            slx += wl * x[j];
        }
        float det = sw * sll - sl * sl;
        if (!(det > 0)) continue; /* all codes equal: no slope to fit */
        float a = (sw * slx - sl * sx) / det, b = (sll * sx - sl * slx) / det;
        if (nonpos_offset && b > 0) {
            b = 0;
            a = slx / sll;
        }
        if (!(a >= 0)) continue;
        /* Σw(aL + b − x)² expanded over the sums at hand: no second pass over the elements */
        float e = a * a * sll + 2 * a * b * sl + b * b * sw - 2 * a * slx - 2 * b * sx + sxx;
        if (e < best) {
            best = e;
            best_a = a;
            best_b = b;
            memcpy(L, cand, (size_t)n);
        }
    }
    *offset = best_b;
    return best_a;
}

/* x ≈ a·L with integer codes L ∈ [−nmax, nmax − 1]. The anchor is the element of largest
 * magnitude (with its sign): inverse scales −(nmax + 0.1·i)/anchor map it to the roomier negative
 * end. For each candidate a = Σw·x·L / Σw·L² (the least-squares scale for those codes) and the
 * candidate with the largest (Σw·x·L)²/Σw·L² (= the smallest error at its best scale) wins; then
 * `passes` rounds of re-rounding with that scale and re-fitting. Returns a (signed); codes in L. */
static float fit_signed(int n, const float *x, const float *w, int nmax, int nsteps, int passes,
                        int8_t *L)
{
    float anchor = 0;
    for (int j = 0; j < n; j++)
        if (fabsf(x[j]) > fabsf(anchor)) anchor = x[j];
    if (anchor == 0) {
        memset(L, 0, (size_t)n);
        return 0;
    }
    float best_score = -1, best_a = 0;
    int8_t cand[256];
    for (int i = -nsteps; i <= nsteps; i++) {
        float iscale = -((float)nmax + 0.1f * (float)i) / anchor, sxl = 0, sll = 0;
        for (int j = 0; j < n; j++) {
            int l = clampi(nearest(iscale * x[j]), -nmax, nmax - 1);
            cand[j] = (int8_t)l;
            sxl += w[j] * x[j] * (float)l;
            sll += w[j] * (float)l * (float)l;
        }
        if (!(sll > 0)) continue;
        float score = sxl * sxl / sll;
        if (score > best_score) {
            best_score = score;
            best_a = sxl / sll;
            memcpy(L, cand, (size_t)n);
        }
    }
    if (best_score < 0) { /* every candidate rounded everything to 0 (weights on zeros only) */
        memset(L, 0, (size_t)n);
        return 0;
    }
    for (int p = 0; p < passes && best_a != 0; p++) {
        float sxl = 0, sll = 0;
        int changed = 0;
        for (int j = 0; j < n; j++) {
            int l = clampi(nearest(x[j] / best_a), -nmax, nmax - 1);
            changed |= l != L[j];
            cand[j] = (int8_t)l;
            sxl += w[j] * x[j] * (float)l;
            sll += w[j] * (float)l * (float)l;
        }
        if (!changed || !(sll > 0) || sxl * sxl / sll <= best_score) break;
        best_score = sxl * sxl / sll;
        best_a = sxl / sll;
        memcpy(L, cand, (size_t)n);
    }
    return best_a;
}

/* Quantizes n non-negative sub-block scales (or mins) v to codes in [0, nmax] against one scale
 * d (returned, before fp16 rounding): candidates (nmax + 0.1·i)/max(v), i = −5…5, each with its
 * weighted least-squares d, lowest weighted error kept. Weights: how much each sub-block's
 * elements count. */
static float fit_scales(int n, const float *v, const float *w, int nmax, uint8_t *codes)
{
    float vmax = 0;
    for (int s = 0; s < n; s++) vmax = fmaxf(vmax, v[s]);
    if (!(vmax > 0)) {
        memset(codes, 0, (size_t)n);
        return 0;
    }
    float best_d = vmax / (float)nmax, best = INFINITY;
    for (int s = 0; s < n; s++) codes[s] = (uint8_t)clampi(nearest(v[s] / best_d), 0, nmax);
    for (int i = -5; i <= 5; i++) {
        float iscale = ((float)nmax + 0.1f * (float)i) / vmax, svl = 0, sll = 0;
        uint8_t cand[16];
        for (int s = 0; s < n; s++) {
            int l = clampi(nearest(iscale * v[s]), 0, nmax);
            cand[s] = (uint8_t)l;
            svl += w[s] * v[s] * (float)l;
            sll += w[s] * (float)l * (float)l;
        }
        if (!(sll > 0)) continue;
        float d = svl / sll, e = 0;
        for (int s = 0; s < n; s++) {
            float diff = d * (float)cand[s] - v[s];
            e += w[s] * diff * diff;
        }
        if (e < best) {
            best = e;
            best_d = d;
            memcpy(codes, cand, (size_t)n);
        }
    }
    return best_d;
}

/* Codes re-derived from the stored scale: L = clamp(round((x − b)/a), 0, nmax). */
static void rederive_affine(int n, const float *x, float a, float b, int nmax, uint8_t *L)
{
    for (int j = 0; j < n; j++)
        L[j] = a > 0 ? (uint8_t)clampi(nearest((x[j] - b) / a), 0, nmax) : 0;
}

static void rederive_signed(int n, const float *x, float a, int nmax, int8_t *L)
{
    for (int j = 0; j < n; j++) L[j] = a != 0 ? (int8_t)clampi(nearest(x[j] / a), -nmax, nmax - 1) : 0;
}

/* ---- 32-element types --------------------------------------------------------------------- */

static const search SEARCH_32 = {-1.0f, 0.1f, 20};

/* Q4_0 / Q5_0: y = d·(q − 2^(bits−1)). */
static void quant_sym32(const float *x, int64_t cols, const float *imp, int bits, void *out)
{
    int nmax = 1 << (bits - 1);
    size_t bb = bits == 4 ? 18 : 22;
    uint8_t *b = out;
    float w[32];
    int8_t L[32];
    for (int64_t k = 0; k < cols; k += 32, b += bb) {
        block_weights(x + k, 32, imp ? imp + k : NULL, W_SQUARE, 2.0f, w);
        float a = fit_signed(32, x + k, w, nmax, 9, 4, L);
        put_f16(b, a);
        rederive_signed(32, x + k, as_f16(a), nmax, L);
        uint8_t *qs = b + (bits == 4 ? 2 : 6);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            int lo = L[j] + nmax, hi = L[j + 16] + nmax;
            qs[j] = (uint8_t)((lo & 15) | (hi & 15) << 4);
            qh |= (uint32_t)(lo >> 4 & 1) << j | (uint32_t)(hi >> 4 & 1) << (j + 16);
        }
        if (bits == 5)
            for (int i = 0; i < 4; i++) b[2 + i] = (uint8_t)(qh >> (8 * i));
    }
}

/* Q4_1 / Q5_1: y = d·q + m, m of either sign. */
static void quant_affine32(const float *x, int64_t cols, const float *imp, int bits, void *out)
{
    int nmax = (1 << bits) - 1;
    size_t bb = bits == 4 ? 20 : 24;
    uint8_t *b = out;
    float w[32];
    uint8_t L[32];
    for (int64_t k = 0; k < cols; k += 32, b += bb) {
        block_weights(x + k, 32, imp ? imp + k : NULL, W_ABS_RMS, 2.0f, w);
        if (!imp) add_subblock_rms(x + k, 32, 32, w);
        float off, a = fit_affine(32, x + k, w, nmax, SEARCH_32, 0, L, &off);
        put_f16(b, a);
        put_f16(b + 2, off);
        rederive_affine(32, x + k, as_f16(a), as_f16(off), nmax, L);
        uint8_t *qs = b + (bits == 4 ? 4 : 8);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            qs[j] = (uint8_t)((L[j] & 15) | (L[j + 16] & 15) << 4);
            qh |= (uint32_t)(L[j] >> 4 & 1) << j | (uint32_t)(L[j + 16] >> 4 & 1) << (j + 16);
        }
        if (bits == 5)
            for (int i = 0; i < 4; i++) b[4 + i] = (uint8_t)(qh >> (8 * i));
    }
}

void qmix_ggml_quantize_row_q4_0(const float *x, int64_t cols, const float *imp, void *out)
{
    quant_sym32(x, cols, imp, 4, out);
}

void qmix_ggml_quantize_row_q5_0(const float *x, int64_t cols, const float *imp, void *out)
{
    quant_sym32(x, cols, imp, 5, out);
}

void qmix_ggml_quantize_row_q4_1(const float *x, int64_t cols, const float *imp, void *out)
{
    quant_affine32(x, cols, imp, 4, out);
}

void qmix_ggml_quantize_row_q5_1(const float *x, int64_t cols, const float *imp, void *out)
{
    quant_affine32(x, cols, imp, 5, out);
}

/* ---- K-quants: 256-element super-blocks --------------------------------------------------- */

/* Q4_K / Q5_K: eight sub-blocks of 32, y = d·sc·q − dmin·m with 6-bit sc, m. */
static void quant_k45(const float *x, int64_t cols, const float *imp, int bits, void *out)
{
    int nmax = (1 << bits) - 1;
    size_t bb = bits == 4 ? 144 : 176;
    /* the finer fan when the importance says which elements matter (§5.4) */
    search srch = imp ? (search){-0.9f, 0.05f, 36}
                      : bits == 4 ? (search){-1.0f, 0.1f, 20} : (search){-0.5f, 0.1f, 15};
    uint8_t *b = out;
    float w[256], scale[8], mins[8], sw[8];
    uint8_t L[256], sc[8], mc[8];
    for (int64_t k = 0; k < cols; k += 256, b += bb) {
        const float *xb = x + k;
        block_weights(xb, 256, imp ? imp + k : NULL, W_ABS_RMS, 2.0f, w);
        if (!imp) add_subblock_rms(xb, 256, 32, w);
        for (int s = 0; s < 8; s++) {
            float off;
            scale[s] = fit_affine(32, xb + 32 * s, w + 32 * s, nmax, srch, 1, L + 32 * s, &off);
            mins[s] = -off;
            sw[s] = 0;
            for (int j = 0; j < 32; j++) sw[s] += w[32 * s + j];
        }
        float d = fit_scales(8, scale, sw, 63, sc), dmin = fit_scales(8, mins, sw, 63, mc);
        put_f16(b, d);
        put_f16(b + 2, dmin);
        float d16 = as_f16(d), dmin16 = as_f16(dmin);
        uint8_t *sp = b + 4;
        for (int s = 0; s < 4; s++) {
            sp[s] = (uint8_t)(sc[s] | (sc[s + 4] >> 4) << 6);
            sp[s + 4] = (uint8_t)(mc[s] | (mc[s + 4] >> 4) << 6);
            sp[s + 8] = (uint8_t)((sc[s + 4] & 15) | (mc[s + 4] & 15) << 4);
        }
        for (int s = 0; s < 8; s++)
            rederive_affine(32, xb + 32 * s, d16 * (float)sc[s], -dmin16 * (float)mc[s], nmax,
                            L + 32 * s);
        uint8_t *qs = b + (bits == 4 ? 16 : 48);
        if (bits == 5) memset(b + 16, 0, 32);
        for (int s = 0; s < 8; s++) {
            uint8_t *q = qs + 32 * (s / 2);
            for (int l = 0; l < 32; l++) {
                int v = L[32 * s + l];
                if (s % 2) q[l] = (uint8_t)(q[l] | (v & 15) << 4);
                else q[l] = (uint8_t)(v & 15);
                if (bits == 5) b[16 + l] = (uint8_t)(b[16 + l] | (v >> 4 & 1) << s);
            }
        }
    }
}

void qmix_ggml_quantize_row_q4_k(const float *x, int64_t cols, const float *imp, void *out)
{
    quant_k45(x, cols, imp, 4, out);
}

void qmix_ggml_quantize_row_q5_k(const float *x, int64_t cols, const float *imp, void *out)
{
    quant_k45(x, cols, imp, 5, out);
}

/* Signed sub-block scales (Q6_K: int8, Q3_K: 6-bit) against one fp16 super-scale anchored on the
 * largest-magnitude scale, which maps to the negative end −smax (the roomier one). */
static float super_signed(const float *scale, int n, int smax, int *codes)
{
    float anchor = 0;
    for (int s = 0; s < n; s++)
        if (fabsf(scale[s]) > fabsf(anchor)) anchor = scale[s];
    float d = anchor / (float)-smax, d16 = as_f16(d);
    for (int s = 0; s < n; s++)
        codes[s] = d16 != 0 ? clampi(nearest(scale[s] / d16), -smax, smax - 1) : 0;
    return d;
}

void qmix_ggml_quantize_row_q6_k(const float *x, int64_t cols, const float *imp, void *out)
{
    uint8_t *b = out;
    float w[256], scale[16];
    int8_t L[256];
    int sc[16];
    for (int64_t k = 0; k < cols; k += 256, b += 210) {
        const float *xb = x + k;
        /* §5.4: Q6_K weighs by the importance itself when there is one, else by x² */
        if (imp) {
            float wsum = 0;
            for (int j = 0; j < 256; j++) wsum += (w[j] = imp[k + j]);
            if (!(wsum > 0)) block_weights(xb, 256, NULL, W_SQUARE, 0, w);
        } else {
            block_weights(xb, 256, NULL, W_SQUARE, 0, w);
        }
        for (int s = 0; s < 16; s++)
            scale[s] = fit_signed(16, xb + 16 * s, w + 16 * s, 32, 9, 0, L + 16 * s);
        float d16 = as_f16(super_signed(scale, 16, 128, sc));
        put_f16(b + 208, d16);
        for (int s = 0; s < 16; s++) {
            b[192 + s] = (uint8_t)(int8_t)sc[s];
            rederive_signed(16, xb + 16 * s, d16 * (float)sc[s], 32, L + 16 * s);
        }
        memset(b, 0, 192);
        for (int j = 0; j < 256; j++) {
            int h = j / 128, t = (j % 128) / 32, l = j % 32, q = L[j] + 32;
            b[64 * h + 32 * (t & 1) + l] |= (uint8_t)((q & 15) << (t < 2 ? 0 : 4));
            b[128 + 32 * h + l] |= (uint8_t)((q >> 4) << (2 * t));
        }
    }
}

void qmix_ggml_quantize_row_q3_k(const float *x, int64_t cols, const float *imp, void *out)
{
    uint8_t *b = out;
    float w[256], scale[16];
    int8_t L[256];
    int sc[16];
    for (int64_t k = 0; k < cols; k += 256, b += 110) {
        const float *xb = x + k;
        block_weights(xb, 256, imp ? imp + k : NULL, W_SQUARE, 2.0f, w);
        for (int s = 0; s < 16; s++)
            scale[s] = fit_signed(16, xb + 16 * s, w + 16 * s, 4, 9, 5, L + 16 * s);
        float d16 = as_f16(super_signed(scale, 16, 32, sc));
        put_f16(b + 108, d16);
        memset(b, 0, 108);
        uint8_t *hmask = b, *qs = b + 32, *sp = b + 96;
        for (int s = 0; s < 16; s++) {
            int v = sc[s] + 32;
            if (s < 8) sp[s] = (uint8_t)(sp[s] | (v & 15));
            else sp[s - 8] = (uint8_t)(sp[s - 8] | (v & 15) << 4);
            sp[8 + s % 4] = (uint8_t)(sp[8 + s % 4] | (v >> 4) << (2 * (s / 4)));
            rederive_signed(16, xb + 16 * s, d16 * (float)sc[s], 4, L + 16 * s);
        }
        for (int j = 0; j < 256; j++) {
            int h = j / 128, t = (j % 128) / 32, l = j % 32, v = L[j] + 4;
            qs[32 * h + l] = (uint8_t)(qs[32 * h + l] | (v & 3) << (2 * t));
            hmask[j % 32] = (uint8_t)(hmask[j % 32] | (v >> 2) << (j / 32));
        }
    }
}

void qmix_ggml_quantize_row_q2_k(const float *x, int64_t cols, const float *imp, void *out)
{
    static const search srch = {-0.5f, 0.1f, 15};
    uint8_t *b = out;
    float w[256], scale[16], mins[16], sw[16];
    uint8_t L[256], sc[16], mc[16];
    for (int64_t k = 0; k < cols; k += 256, b += 84) {
        const float *xb = x + k;
        /* §5.4: Q2_K's σ² is mean(x²) (not twice it); default weights |x| */
        block_weights(xb, 256, imp ? imp + k : NULL, W_ABS, 1.0f, w);
        for (int s = 0; s < 16; s++) {
            float off;
            scale[s] = fit_affine(16, xb + 16 * s, w + 16 * s, 3, srch, 1, L + 16 * s, &off);
            mins[s] = -off;
            sw[s] = 0;
            for (int j = 0; j < 16; j++) sw[s] += w[16 * s + j];
        }
        float d = fit_scales(16, scale, sw, 15, sc), dmin = fit_scales(16, mins, sw, 15, mc);
        put_f16(b + 80, d);
        put_f16(b + 82, dmin);
        float d16 = as_f16(d), dmin16 = as_f16(dmin);
        memset(b + 16, 0, 64);
        for (int s = 0; s < 16; s++) {
            b[s] = (uint8_t)(sc[s] | mc[s] << 4);
            rederive_affine(16, xb + 16 * s, d16 * (float)sc[s], -dmin16 * (float)mc[s], 3,
                            L + 16 * s);
        }
        for (int j = 0; j < 256; j++) {
            int h = j / 128, t = (j % 128) / 32, l = j % 32;
            b[16 + 32 * h + l] = (uint8_t)(b[16 + 32 * h + l] | L[j] << (2 * t));
        }
    }
}

/* ---- non-linear 4-bit (IQ4_NL, IQ4_XS) ---------------------------------------------------- */

/* Index of the code-table value nearest to v (the table is sorted ascending). */
static int iq4_nearest(float v)
{
    const int8_t *t = qmix_ggml_iq4_table;
    if (v <= t[0]) return 0;
    if (v >= t[15]) return 15;
    int lo = 0, hi = 15;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (v < t[mid]) hi = mid;
        else lo = mid;
    }
    return v - t[lo] < t[hi] - v ? lo : hi;
}

/* One block of 32 on the non-linear grid: the scale a (y = a·table[L]) by the same fan of
 * inverse scales as fit_signed, anchored so the block's largest magnitude lands on the table's
 * roomy negative end (−127), each candidate with its least-squares scale, best weighted error
 * kept. Returns a; indices in L. */
static float fit_iq4(const float *x, const float *w, uint8_t *L)
{
    float anchor = 0;
    for (int j = 0; j < 32; j++)
        if (fabsf(x[j]) > fabsf(anchor)) anchor = x[j];
    if (anchor == 0) {
        for (int j = 0; j < 32; j++) L[j] = (uint8_t)iq4_nearest(0);
        return 0;
    }
    float best_score = -1, best_a = 0;
    uint8_t cand[32];
    for (int i = -7; i <= 7; i++) {
        float iscale = ((float)qmix_ggml_iq4_table[0] + (float)i) / anchor, sxl = 0, sll = 0;
        for (int j = 0; j < 32; j++) {
            int l = iq4_nearest(iscale * x[j]);
            float q = (float)qmix_ggml_iq4_table[l];
            cand[j] = (uint8_t)l;
            sxl += w[j] * x[j] * q;
            sll += w[j] * q * q;
        }
        if (!(sll > 0)) continue;
        float score = sxl * sxl / sll;
        if (score > best_score) {
            best_score = score;
            best_a = sxl / sll;
            memcpy(L, cand, 32);
        }
    }
    return best_score < 0 ? 0 : best_a;
}

static void iq4_rederive(const float *x, float a, uint8_t *L)
{
    for (int j = 0; j < 32; j++) L[j] = (uint8_t)iq4_nearest(a != 0 ? x[j] / a : 0);
}

/* IQ4_NL: blocks of 32, fp16 d, 16 bytes of indices (element j low nibble, j + 16 high). */
void qmix_ggml_quantize_row_iq4_nl(const float *x, int64_t cols, const float *imp, void *out)
{
    uint8_t *b = out;
    for (int64_t k = 0; k < cols; k += 32, b += 18) {
        float w[32];
        uint8_t L[32];
        block_weights(x + k, 32, imp ? imp + k : NULL, W_SQUARE, 1.0f, w);
        float d = as_f16(fit_iq4(x + k, w, L));
        put_f16(b, d);
        iq4_rederive(x + k, d, L);
        for (int j = 0; j < 16; j++) b[2 + j] = (uint8_t)(L[j] | L[j + 16] << 4);
    }
}

/* IQ4_XS: super-blocks of 256: fp16 d, eight 6-bit signed sub-block scales (ls − 32; low four
 * bits two per byte in scales_l, high two bits in the 16-bit scales_h), 128 bytes of indices. */
void qmix_ggml_quantize_row_iq4_xs(const float *x, int64_t cols, const float *imp, void *out)
{
    uint8_t *b = out;
    for (int64_t k = 0; k < cols; k += 256, b += 136) {
        const float *xs = x + k;
        float scale[8], sw[8], w[256];
        uint8_t L[256];
        for (int s = 0; s < 8; s++) {
            block_weights(xs + 32 * s, 32, imp ? imp + k + 32 * s : NULL, W_SQUARE, 1.0f, w + 32 * s);
            scale[s] = fit_iq4(xs + 32 * s, w + 32 * s, L + 32 * s);
            sw[s] = 0;
            for (int j = 0; j < 32; j++) sw[s] += w[32 * s + j];
        }
        /* the sub-block scales, signed, on a 6-bit grid [−32, 31] against one d: the largest
         * magnitude anchors at −32, then the weighted least-squares d for those codes */
        float anchor = 0;
        for (int s = 0; s < 8; s++)
            if (fabsf(scale[s]) > fabsf(anchor)) anchor = scale[s];
        int ls[8] = {0};
        float d = 0;
        if (anchor != 0) {
            float best = INFINITY;
            for (int i = -4; i <= 4; i++) {
                float iscale = (-32.0f + 0.25f * (float)i) / anchor, svl = 0, sll = 0;
                int c[8];
                for (int s = 0; s < 8; s++) {
                    c[s] = clampi(nearest(iscale * scale[s]), -32, 31);
                    svl += sw[s] * scale[s] * (float)c[s];
                    sll += sw[s] * (float)c[s] * (float)c[s];
                }
                if (!(sll > 0)) continue;
                float dd = svl / sll, e = 0;
                for (int s = 0; s < 8; s++) {
                    float diff = dd * (float)c[s] - scale[s];
                    e += sw[s] * diff * diff;
                }
                if (e < best) {
                    best = e;
                    d = dd;
                    memcpy(ls, c, sizeof ls);
                }
            }
        }
        d = as_f16(d);
        put_f16(b, d);
        unsigned scales_h = 0;
        memset(b + 4, 0, 4);
        for (int s = 0; s < 8; s++) {
            int code = ls[s] + 32;
            b[4 + s / 2] = (uint8_t)(b[4 + s / 2] | (code & 15) << (4 * (s % 2)));
            scales_h |= (unsigned)(code >> 4) << (2 * s);
            /* indices re-derived from the scale actually stored */
            iq4_rederive(xs + 32 * s, d * (float)ls[s], L + 32 * s);
            for (int j = 0; j < 16; j++)
                b[8 + 16 * s + j] = (uint8_t)(L[32 * s + j] | L[32 * s + j + 16] << 4);
        }
        b[2] = (uint8_t)scales_h;
        b[3] = (uint8_t)(scales_h >> 8);
    }
}

/* ---- dispatch ----------------------------------------------------------------------------- */

int qmix_ggml_can_quantize(int type)
{
    switch (type) {
    case QMIX_GGML_F32: case QMIX_GGML_F16: case QMIX_GGML_BF16: case QMIX_GGML_Q8_0:
    case QMIX_GGML_Q4_0: case QMIX_GGML_Q4_1: case QMIX_GGML_Q5_0: case QMIX_GGML_Q5_1:
    case QMIX_GGML_Q2_K: case QMIX_GGML_Q3_K: case QMIX_GGML_Q4_K: case QMIX_GGML_Q5_K:
    case QMIX_GGML_Q6_K: case QMIX_GGML_IQ4_NL: case QMIX_GGML_IQ4_XS:
        return 1;
    default:
        return 0;
    }
}

int qmix_ggml_quantize_row(int type, const float *x, int64_t cols, const float *imp, void *out)
{
    if (!qmix_ggml_can_quantize(type) || !qmix_ggml_row_bytes(type, cols)) return -1;
    uint8_t *o = out;
    switch (type) {
    case QMIX_GGML_F32: memcpy(out, x, (size_t)cols * 4); break;
    case QMIX_GGML_F16:
    case QMIX_GGML_BF16:
        for (int64_t i = 0; i < cols; i++) {
            uint16_t h = type == QMIX_GGML_BF16 ? qk_f32_to_bf16(x[i]) : qk_f32_to_f16(x[i]);
            o[2 * i] = (uint8_t)h;
            o[2 * i + 1] = (uint8_t)(h >> 8);
        }
        break;
    case QMIX_GGML_Q8_0: qmix_ggml_quantize_row_q8_0(x, cols, out); break;
    case QMIX_GGML_Q4_0: qmix_ggml_quantize_row_q4_0(x, cols, imp, out); break;
    case QMIX_GGML_Q4_1: qmix_ggml_quantize_row_q4_1(x, cols, imp, out); break;
    case QMIX_GGML_Q5_0: qmix_ggml_quantize_row_q5_0(x, cols, imp, out); break;
    case QMIX_GGML_Q5_1: qmix_ggml_quantize_row_q5_1(x, cols, imp, out); break;
    case QMIX_GGML_Q2_K: qmix_ggml_quantize_row_q2_k(x, cols, imp, out); break;
    case QMIX_GGML_Q3_K: qmix_ggml_quantize_row_q3_k(x, cols, imp, out); break;
    case QMIX_GGML_Q4_K: qmix_ggml_quantize_row_q4_k(x, cols, imp, out); break;
    case QMIX_GGML_Q5_K: qmix_ggml_quantize_row_q5_k(x, cols, imp, out); break;
    case QMIX_GGML_Q6_K: qmix_ggml_quantize_row_q6_k(x, cols, imp, out); break;
    case QMIX_GGML_IQ4_NL: qmix_ggml_quantize_row_iq4_nl(x, cols, imp, out); break;
    case QMIX_GGML_IQ4_XS: qmix_ggml_quantize_row_iq4_xs(x, cols, imp, out); break;
    }
    return 0;
}
