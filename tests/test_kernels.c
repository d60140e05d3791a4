/* Kernels: every SIMD matmul against the scalar reference (and the scalar one against a float64
 * reference), row-range and token-split invariance, sentinels around the outputs, unaligned
 * weights; the float conversions exhaustively; the elementwise ops against float64. */
#include <math.h>

#include "kernels/kernels_impl.h"
#include "testutil.h"

/* ck_assert_msg reports every passing check to the parent process (one write(2) each); in the hot
 * loops below only failures may cost anything. */
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) ck_abort_msg(__VA_ARGS__);                                                    \
    } while (0)




/* ---- independent references for the 16-bit formats --------------------------------------- */

static double ref_f16(uint16_t h) /* NaN for NaNs */
{
    int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    double v;
    if (exp == 0x1f)
        v = mant ? NAN : INFINITY;
    else if (exp == 0)
        v = ldexp((double)mant, -24);
    else
        v = ldexp((double)(1024 + mant), exp - 25);
    return sign ? -v : v;
}

static double ref_bf16(uint16_t h)
{
    int sign = h >> 15, exp = (h >> 7) & 0xff, mant = h & 0x7f;
    double v;
    if (exp == 0xff)
        v = mant ? NAN : INFINITY;
    else if (exp == 0)
        v = ldexp((double)mant, -133);
    else
        v = ldexp((double)(128 + mant), exp - 134);
    return sign ? -v : v;
}

/* ---- matmul harness ----------------------------------------------------------------------- */

static const uint32_t SENTINEL = 0x7fa1b2c3u; /* a NaN no kernel produces */

static size_t dtype_bytes(qmix_dtype dt) { return dt == QMIX_F32 ? 4 : 2; }

/* A random weight matrix stored as dtype at a deliberately unaligned address (2 bytes past a
 * malloc'd block, so 16-bit data is 2-byte aligned only and f32 data not even 4-byte aligned),
 * rows padded by 3 elements of NaN bytes that a kernel must never read. wf holds the exact
 * widened values for the float64 reference. */
typedef struct tmat {
    qk_mat m;
    uint8_t *block;
    double *wf; /* [rows][cols] */
} tmat;

static void tmat_make(tmat *t, qmix_dtype dt, int64_t rows, int64_t cols)
{
    size_t esz = dtype_bytes(dt), row_bytes = (size_t)(cols + 3) * esz, offset = 2;
    size_t size = offset + (size_t)rows * row_bytes;
    t->block = malloc(size);
    ck_assert_ptr_nonnull(t->block);
    memset(t->block, 0xff, size); /* NaN in every format */
    t->wf = malloc(sizeof(double) * (size_t)(rows * cols));
    ck_assert_ptr_nonnull(t->wf);
    uint8_t *data = t->block + offset;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < cols; i++) {
            float v = tu_frand();
            uint8_t *p = data + (size_t)r * row_bytes + (size_t)i * esz;
            if (dt == QMIX_F32) {
                memcpy(p, &v, 4);
                t->wf[r * cols + i] = v;
            } else {
                uint16_t h = dt == QMIX_BF16 ? qk_f32_to_bf16(v) : qk_f32_to_f16(v);
                memcpy(p, &h, 2);
                t->wf[r * cols + i] = dt == QMIX_BF16 ? ref_bf16(h) : ref_f16(h);
            }
        }
    t->m = (qk_mat){.dtype = dt, .rows = rows, .cols = cols, .row_bytes = row_bytes, .data = data};
}

static void tmat_free(tmat *t)
{
    free(t->block);
    free(t->wf);
}

static float *new_y(int n, int64_t ldy)
{
    float *y = malloc(sizeof(float) * (size_t)(n * ldy));
    ck_assert_ptr_nonnull(y);
    for (int64_t i = 0; i < n * ldy; i++) y[i] = tu_u2f(SENTINEL);
    return y;
}

typedef struct mm_case {
    qmix_dtype dt;
    int64_t rows, cols, ldx, ldy;
    int n;
    tmat w;
    float *x;
    double *exact, *bound; /* [n][rows] */
    float *ys;             /* scalar, full range, [n][ldy] */
} mm_case;

static const char *case_str(const mm_case *c, char *buf, size_t size)
{
    snprintf(buf, size, "%s rows %lld cols %lld n %d ldx %lld ldy %lld", qmix_dtype_name(c->dt),
             (long long)c->rows, (long long)c->cols, c->n, (long long)c->ldx, (long long)c->ldy);
    return buf;
}

/* |y - ref| ≤ 1e-5·Σ|w_i x_i| + 1e-6 for every output of rows [rb, re); everything else in y
 * (other rows, the ldy padding) still holds the sentinel. */
static void check_y(const mm_case *c, const char *what, const float *y, const float *ref_f,
                    const double *ref_d, int64_t rb, int64_t re)
{
    char cs[160];
    for (int t = 0; t < c->n; t++)
        for (int64_t o = 0; o < c->ldy; o++) {
            float v = y[t * c->ldy + o];
            if (o < rb || o >= re) {
                CHECK(tu_f2u(v) == SENTINEL,
                      "%s, %s, rows [%lld, %lld): y[t=%d][o=%lld] outside the range was "
                      "written (0x%08x, sentinel 0x%08x)",
                      case_str(c, cs, sizeof cs), what, (long long)rb, (long long)re, t,
                      (long long)o, tu_f2u(v), SENTINEL);
                continue;
            }
            double ref = ref_f ? ref_f[t * c->ldy + o] : ref_d[t * c->rows + o];
            double tol = 1e-5 * c->bound[t * c->rows + o] + 1e-6, d = fabs((double)v - ref);
            CHECK(d <= tol,
                  "%s, %s: y[t=%d][o=%lld] = %.9g, reference %.9g: |Δ| %.3g > tolerance "
                  "%.3g (Σ|w·x| %.4g)",
                  case_str(c, cs, sizeof cs), what, t, (long long)o, v, ref, d, tol,
                  c->bound[t * c->rows + o]);
        }
}

/* Outputs of rows [rb, re) bitwise equal between a and b (both [n][ldy]). */
static void check_same(const mm_case *c, const char *what, const float *a, const float *b,
                       int64_t rb, int64_t re)
{
    char cs[160];
    for (int t = 0; t < c->n; t++)
        for (int64_t o = rb; o < re; o++) {
            uint32_t ua = tu_f2u(a[t * c->ldy + o]), ub = tu_f2u(b[t * c->ldy + o]);
            CHECK(ua == ub,
                  "%s: %s differs from one full call at y[t=%d][o=%lld]: %.9g (0x%08x) vs "
                  "%.9g (0x%08x)",
                  case_str(c, cs, sizeof cs), what, t, (long long)o, tu_u2f(ua), ua, tu_u2f(ub), ub);
        }
}

static void case_make(mm_case *c, qmix_dtype dt, int64_t rows, int64_t cols, int n)
{
    c->dt = dt;
    c->rows = rows;
    c->cols = cols;
    c->n = n;
    c->ldx = cols + 3;
    c->ldy = rows + 5;
    tmat_make(&c->w, dt, rows, cols);
    c->x = malloc(sizeof(float) * (size_t)(n * c->ldx));
    ck_assert_ptr_nonnull(c->x);
    for (int64_t i = 0; i < n * c->ldx; i++) c->x[i] = tu_u2f(0x7fc00000u | 0x1234); /* NaN padding */
    for (int t = 0; t < n; t++)
        for (int64_t i = 0; i < cols; i++) c->x[t * c->ldx + i] = tu_frand();
    c->exact = malloc(sizeof(double) * (size_t)(n * rows));
    c->bound = malloc(sizeof(double) * (size_t)(n * rows));
    ck_assert(c->exact && c->bound);
    for (int t = 0; t < n; t++)
        for (int64_t o = 0; o < rows; o++) {
            double s = 0, b = 0;
            const double *wr = c->w.wf + o * cols;
            const float *xt = c->x + t * c->ldx;
            for (int64_t i = 0; i < cols; i++) {
                double p = wr[i] * (double)xt[i];
                s += p;
                b += fabs(p);
            }
            c->exact[t * rows + o] = s;
            c->bound[t * rows + o] = b;
        }
    c->ys = new_y(n, c->ldy);
    qk_matmul_scalar(&c->w.m, 0, rows, c->x, n, c->ldx, c->ys, c->ldy);
    check_y(c, "scalar vs float64", c->ys, NULL, c->exact, 0, rows);
}

static void case_free(mm_case *c)
{
    tmat_free(&c->w);
    free(c->x);
    free(c->exact);
    free(c->bound);
    free(c->ys);
}

/* A sub-range that starts after 0 and ends before rows when the matrix is big enough. */
static void sub_range(int64_t rows, int64_t *rb, int64_t *re)
{
    *rb = rows > 1 ? 1 + rows / 5 : 0;
    *re = rows > 2 ? rows - 1 - rows / 7 : rows;
    if (*re <= *rb) *re = *rb + 1;
}

static void check_isa(const mm_case *c, qk_isa isa)
{
    qk_matmul_fn mm = qk_matmul_for(isa);
    CHECK(mm != NULL, "no matmul compiled for %s", qk_isa_name(isa));
    char what[96];
    int64_t rows = c->rows, n = c->n;

    float *full = new_y(c->n, c->ldy);
    mm(&c->w.m, 0, rows, c->x, c->n, c->ldx, full, c->ldy);
    snprintf(what, sizeof what, "%s vs scalar, full range", qk_isa_name(isa));
    check_y(c, what, full, c->ys, NULL, 0, rows);

    /* a range not starting at 0 nor ending at rows: same values, nothing else touched */
    int64_t rb, re;
    sub_range(rows, &rb, &re);
    float *part = new_y(c->n, c->ldy);
    mm(&c->w.m, rb, re, c->x, c->n, c->ldx, part, c->ldy);
    snprintf(what, sizeof what, "%s vs scalar, rows [%lld, %lld)", qk_isa_name(isa), (long long)rb,
             (long long)re);
    check_y(c, what, part, c->ys, NULL, rb, re);
    snprintf(what, sizeof what, "%s rows [%lld, %lld)", qk_isa_name(isa), (long long)rb,
             (long long)re);
    check_same(c, what, part, full, rb, re);

    /* rows [0, r) and [r, rows) in two calls, for two split points */
    int64_t splits[2] = {rows / 2, rows > 3 ? 3 : rows - 1};
    for (int s = 0; s < 2; s++) {
        int64_t r = splits[s];
        float *two = new_y(c->n, c->ldy);
        mm(&c->w.m, 0, r, c->x, c->n, c->ldx, two, c->ldy);
        mm(&c->w.m, r, rows, c->x, c->n, c->ldx, two, c->ldy);
        snprintf(what, sizeof what, "%s rows split at %lld", qk_isa_name(isa), (long long)r);
        check_same(c, what, two, full, 0, rows);
        check_y(c, what, two, c->ys, NULL, 0, rows); /* and the padding is untouched */
        free(two);
    }

    /* one call per token, and tokens in uneven groups */
    float *tok = new_y(c->n, c->ldy);
    for (int t = 0; t < n; t++)
        mm(&c->w.m, 0, rows, c->x + t * c->ldx, 1, c->ldx, tok + t * c->ldy, c->ldy);
    snprintf(what, sizeof what, "%s one call per token", qk_isa_name(isa));
    check_same(c, what, tok, full, 0, rows);
    if (n > 3) {
        float *grp = new_y(c->n, c->ldy);
        int at = 0, len = 3;
        while (at < n) {
            int k = n - at < len ? n - at : len;
            mm(&c->w.m, 0, rows, c->x + at * c->ldx, k, c->ldx, grp + at * c->ldy, c->ldy);
            at += k;
            len = len == 3 ? 5 : 3;
        }
        snprintf(what, sizeof what, "%s tokens in groups of 3 and 5", qk_isa_name(isa));
        check_same(c, what, grp, full, 0, rows);
        free(grp);
    }
    free(tok);
    free(part);
    free(full);
}

static const int64_t COLS[] = {1, 7, 15, 16, 17, 31, 33, 64, 100, 257, 2048};
static const int64_t ROWS[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 64};
static const int NS[] = {1, 2, 3, 4, 5, 8, 63, 64, 65, 130};
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))
/* Shapes whose rows·cols·n exceed this run only if listed in BIG (keeps ASan runs short). */
#define MAX_MACS 1000000
static const int64_t BIG[][3] = {{64, 2048, 8},  {13, 2048, 65}, {64, 257, 130},
                                 {5, 2048, 130}, {64, 100, 130}, {64, 2048, 1}};

static const qmix_dtype DTYPES[] = {QMIX_F32, QMIX_F16, QMIX_BF16};

static int simd_isas(qk_isa out[2])
{
    int k = 0;
    static int noted;
    qk_isa want[2] = {QK_ISA_AVX2, QK_ISA_AVX512};
    for (int i = 0; i < 2; i++) {
        if (qk_isa_supported(want[i]))
            out[k++] = want[i];
        else if (!noted)
            printf("note: this CPU lacks %s; its matmul is not tested\n", qk_isa_name(want[i]));
    }
    noted = 1;
    return k;
}

static void run_shape(qmix_dtype dt, int64_t rows, int64_t cols, int n, const qk_isa *isas,
                      int n_isas)
{
    mm_case c;
    case_make(&c, dt, rows, cols, n);
    for (int i = 0; i < n_isas; i++) check_isa(&c, isas[i]);
    case_free(&c);
}

START_TEST(matmul_simd_vs_scalar)
{
    qmix_dtype dt = DTYPES[_i];
    tu_rng_seed(0x5eed0000u + (uint64_t)_i);
    qk_isa isas[2];
    int n_isas = simd_isas(isas);
    int shapes = 0;
    for (size_t ci = 0; ci < COUNT(COLS); ci++)
        for (size_t ri = 0; ri < COUNT(ROWS); ri++)
            for (size_t ni = 0; ni < COUNT(NS); ni++) {
                if (COLS[ci] * ROWS[ri] * NS[ni] > MAX_MACS) continue;
                run_shape(dt, ROWS[ri], COLS[ci], NS[ni], isas, n_isas);
                shapes++;
            }
    for (size_t b = 0; b < COUNT(BIG); b++) {
        run_shape(dt, BIG[b][0], BIG[b][1], (int)BIG[b][2], isas, n_isas);
        shapes++;
    }
    printf("info: matmul %s: %d shapes, scalar vs float64 and %d SIMD ISA(s) vs scalar\n",
           qmix_dtype_name(dt), shapes, n_isas);
}
END_TEST

/* Large magnitudes (products near 1e35) stay finite, and a row of zeros gives exactly zero. */
START_TEST(matmul_special_values)
{
    qk_isa isas[3] = {QK_ISA_SCALAR};
    int n_isas = 1 + simd_isas(isas + 1);
    enum { ROWS_ = 9, COLS_ = 37, N_ = 3 };
    float w[ROWS_ * COLS_], x[N_ * COLS_];
    for (int r = 0; r < ROWS_; r++)
        for (int i = 0; i < COLS_; i++)
            w[r * COLS_ + i] = r == 4 ? 0.0f : (float)((r + 1) * (i % 5 - 2)) * 1e17f;
    for (int i = 0; i < N_ * COLS_; i++) x[i] = (float)(i % 3 + 1) * 1e17f;
    qk_mat m = {.dtype = QMIX_F32, .rows = ROWS_, .cols = COLS_, .row_bytes = COLS_ * 4, .data = w};
    for (int k = 0; k < n_isas; k++) {
        float y[N_ * ROWS_];
        qk_matmul_for(isas[k])(&m, 0, ROWS_, x, N_, COLS_, y, ROWS_);
        for (int t = 0; t < N_; t++)
            for (int r = 0; r < ROWS_; r++) {
                double s = 0, b = 0;
                for (int i = 0; i < COLS_; i++) {
                    double p = (double)w[r * COLS_ + i] * x[t * COLS_ + i];
                    s += p;
                    b += fabs(p);
                }
                float v = y[t * ROWS_ + r];
                CHECK(isfinite(v) && fabs(v - s) <= 1e-5 * b && (r != 4 || v == 0.0f),
                      "%s: large values: y[%d][%d] = %g, float64 %g (Σ|w·x| %g)",
                      qk_isa_name(isas[k]), t, r, v, s, b);
            }
    }
}
END_TEST

START_TEST(matmul_dispatch)
{
    CHECK(qk_isa_supported(QK_ISA_SCALAR), "scalar must always be supported");
    qk_isa active = qk_isa_active();
    CHECK(qk_isa_supported(active), "active ISA %s is not supported here", qk_isa_name(active));
    printf("info: active ISA: %s (avx2 %s, avx512 %s)\n", qk_isa_name(active),
           qk_isa_supported(QK_ISA_AVX2) ? "yes" : "no",
           qk_isa_supported(QK_ISA_AVX512) ? "yes" : "no");
    ck_assert_str_eq(qk_isa_name(QK_ISA_SCALAR), "scalar");
    ck_assert_str_eq(qk_isa_name(QK_ISA_AVX2), "avx2");
    ck_assert_str_eq(qk_isa_name(QK_ISA_AVX512), "avx512");
    for (int i = 0; i < QK_ISA_COUNT; i++)
        if (qk_isa_supported((qk_isa)i))
            CHECK(qk_matmul_for((qk_isa)i) != NULL, "%s supported but no matmul",
                  qk_isa_name((qk_isa)i));
    /* qk_matmul is the active ISA's kernel: bitwise the same result */
    tu_rng_seed(99);
    mm_case c;
    case_make(&c, QMIX_BF16, 13, 100, 5);
    float *a = new_y(c.n, c.ldy), *b = new_y(c.n, c.ldy);
    qk_matmul(&c.w.m, 0, c.rows, c.x, c.n, c.ldx, a, c.ldy);
    qk_matmul_for(active)(&c.w.m, 0, c.rows, c.x, c.n, c.ldx, b, c.ldy);
    check_same(&c, "qk_matmul vs the active ISA's matmul", a, b, 0, c.rows);
    check_y(&c, "qk_matmul vs scalar", a, c.ys, NULL, 0, c.rows);
    free(a);
    free(b);
    case_free(&c);
}
END_TEST

START_TEST(mat_row_f32)
{
    tu_rng_seed(7);
    for (size_t d = 0; d < COUNT(DTYPES); d++) {
        tmat t;
        tmat_make(&t, DTYPES[d], 5, 33);
        float row[33];
        for (int64_t r = 0; r < 5; r++) {
            qk_mat_row_f32(&t.m, r, row);
            for (int64_t i = 0; i < 33; i++)
                CHECK((double)row[i] == t.wf[r * 33 + i],
                      "%s row %lld col %lld: %.9g, expected %.9g", qmix_dtype_name(DTYPES[d]),
                      (long long)r, (long long)i, row[i], t.wf[r * 33 + i]);
        }
        tmat_free(&t);
    }
}
END_TEST

/* ---- conversions -------------------------------------------------------------------------- */

START_TEST(bf16_all_patterns)
{
    int nans = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = qk_bf16_to_f32((uint16_t)h);
        CHECK(tu_f2u(f) == h << 16, "bf16 0x%04x widened to 0x%08x, expected 0x%08x", h, tu_f2u(f),
              h << 16);
        uint16_t back = qk_f32_to_bf16(f);
        if (isnan(f)) {
            nans++;
            CHECK(isnan(qk_bf16_to_f32(back)), "bf16 NaN 0x%04x came back as 0x%04x (not a NaN)", h,
                  back);
            CHECK((back & 0x8000) == (h & 0x8000), "bf16 NaN 0x%04x lost its sign: 0x%04x", h,
                  back);
        } else {
            CHECK(back == h, "bf16 0x%04x round-tripped to 0x%04x", h, back);
        }
    }
    ck_assert_int_eq(nans, 2 * 127);
}
END_TEST

/* Every value half-way between two adjacent bf16 (or f16) values, and one float32 ulp either
 * side: ties go to the even neighbour, the rest to the nearer. */
static void check_midpoints(const char *name, uint16_t max_finite, double (*ref)(uint16_t),
                            uint16_t (*to16)(float))
{
    for (uint32_t h = 0; h <= max_finite; h++) {
        double lo = ref((uint16_t)h), hi = ref((uint16_t)(h + 1));
        if (isinf(hi)) hi = lo + (lo - ref((uint16_t)(h - 1))); /* the value inf stands for */
        double mid = (lo + hi) / 2;
        float fm = (float)mid;
        CHECK((double)fm == mid, "%s midpoint above 0x%04x not exact in float32", name, h);
        uint16_t even = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;
        for (int sign = 0; sign < 2; sign++) {
            uint16_t sb = sign ? 0x8000 : 0;
            float m = sign ? -fm : fm;
            uint16_t got = to16(m);
            CHECK(got == (even | sb),
                  "%s(%.9g) (a tie between 0x%04x and 0x%04x) = 0x%04x, expected 0x%04x", name, m,
                  h | sb, (h + 1) | sb, got, even | sb);
            float below = nextafterf(m, 0.0f), above = nextafterf(m, sign ? -INFINITY : INFINITY);
            got = to16(below);
            CHECK(got == (h | sb), "%s(%.9g) (just below a tie) = 0x%04x, expected 0x%04x", name,
                  below, got, h | sb);
            got = to16(above);
            CHECK(got == ((h + 1) | sb), "%s(%.9g) (just above a tie) = 0x%04x, expected 0x%04x",
                  name, above, got, (h + 1) | sb);
        }
    }
}

START_TEST(bf16_rounding)
{
    check_midpoints("qk_f32_to_bf16", 0x7f7f, ref_bf16, qk_f32_to_bf16);
    static const struct {
        uint32_t f;
        uint16_t want;
    } cases[] = {
        {0x3f808000u, 0x3f80}, /* 1 + 2^-8: tie, 0x3f80 even */
        {0x3f818000u, 0x3f82}, /* tie, 0x3f81 odd → up */
        {0x3f808001u, 0x3f81},
        {0x3f807fffu, 0x3f80},
        {0x7f7fffffu, 0x7f80}, /* FLT_MAX rounds to inf */
        {0x7f7f7fffu, 0x7f7f},
        {0x7f800000u, 0x7f80},
        {0xff800000u, 0xff80},
        {0x00008000u, 0x0000},
        {0x00018000u, 0x0002},
        {0x00000001u, 0x0000},
        {0x80000001u, 0x8000},
        {0x007fffffu, 0x0080}, /* largest subnormal rounds up to the smallest normal */
        {0x00000000u, 0x0000},
        {0x80000000u, 0x8000},
    };
    for (size_t i = 0; i < COUNT(cases); i++) {
        uint16_t got = qk_f32_to_bf16(tu_u2f(cases[i].f));
        CHECK(got == cases[i].want, "qk_f32_to_bf16(0x%08x = %g) = 0x%04x, expected 0x%04x",
              cases[i].f, tu_u2f(cases[i].f), got, cases[i].want);
    }
    /* NaNs with payloads only in the low 16 bits must stay NaN (not become inf) */
    static const uint32_t nans[] = {0x7f800001u, 0xff800001u, 0x7fc00000u, 0x7f80ffffu,
                                    0x7fffffffu};
    for (size_t i = 0; i < COUNT(nans); i++) {
        uint16_t got = qk_f32_to_bf16(tu_u2f(nans[i]));
        CHECK(isnan(qk_bf16_to_f32(got)), "qk_f32_to_bf16(NaN 0x%08x) = 0x%04x, not a NaN", nans[i],
              got);
    }
}
END_TEST

START_TEST(f16_all_patterns)
{
    int nans = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = qk_f16_to_f32((uint16_t)h);
        double ref = ref_f16((uint16_t)h);
        if (isnan(ref)) {
            nans++;
            CHECK(isnan(f), "f16 NaN 0x%04x widened to %g", h, f);
            CHECK(!!signbit(f) == ((h & 0x8000) != 0), "f16 NaN 0x%04x lost its sign", h);
            uint16_t back = qk_f32_to_f16(f);
            CHECK((back & 0x7c00) == 0x7c00 && (back & 0x3ff), "f16 NaN 0x%04x came back as 0x%04x",
                  h, back);
            continue;
        }
        CHECK((double)f == ref && !!signbit(f) == ((h & 0x8000) != 0),
              "qk_f16_to_f32(0x%04x) = %.9g, expected %.9g", h, f, ref);
        uint16_t back = qk_f32_to_f16(f);
        CHECK(back == h, "f16 0x%04x (%g) round-tripped to 0x%04x", h, f, back);
    }
    ck_assert_int_eq(nans, 2 * 1023);
}
END_TEST

START_TEST(f16_rounding)
{
    check_midpoints("qk_f32_to_f16", 0x7bff, ref_f16, qk_f32_to_f16);
    static const struct {
        float f;
        uint16_t want;
    } cases[] = {
        {1.0f, 0x3c00},
        {1.0f + 0x1p-11f, 0x3c00},     /* tie, even */
        {1.0f + 3 * 0x1p-11f, 0x3c02}, /* tie, odd → up */
        {65504.0f, 0x7bff},
        {65519.0f, 0x7bff},
        {65520.0f, 0x7c00}, /* tie between 65504 and 65536 (inf): even is inf */
        {1e6f, 0x7c00},
        {-1e6f, 0xfc00},
        {INFINITY, 0x7c00},
        {-INFINITY, 0xfc00},
        {3.4e38f, 0x7c00},
        {0x1p-24f, 0x0001},   /* smallest subnormal */
        {0x1p-25f, 0x0000},   /* tie between 0 and 2^-24: even is 0 */
        {0x1.8p-24f, 0x0002}, /* 1.5·2^-24: tie, odd 1 → 2 */
        {0x1p-26f, 0x0000},
        {0x1.000002p-25f, 0x0001},     /* just above the tie */
        {0x1p-14f, 0x0400},            /* smallest normal */
        {0x1p-14f - 0x1p-25f, 0x0400}, /* tie between 0x3ff and 0x400 */
        {0x1.ff8p-15f, 0x03ff},        /* largest subnormal exactly */
        {1e-10f, 0x0000},
        {-1e-10f, 0x8000},
        {-0.0f, 0x8000},
        {0.0f, 0x0000},
        {0x1p-149f, 0x0000}, /* float32 subnormal */
    };
    for (size_t i = 0; i < COUNT(cases); i++) {
        uint16_t got = qk_f32_to_f16(cases[i].f);
        CHECK(got == cases[i].want, "qk_f32_to_f16(%a) = 0x%04x, expected 0x%04x", cases[i].f, got,
              cases[i].want);
    }
    /* random float32 in the f16 range: the result is the nearest f16 (float64 check) */
    tu_rng_seed(1234);
    for (int i = 0; i < 200000; i++) {
        uint32_t bits = (uint32_t)tu_rng_u64();
        int e = 100 + (int)(tu_rng_u64() % 45); /* exponents 2^-27 .. 2^17 */
        bits = (bits & 0x807fffffu) | ((uint32_t)e << 23);
        float f = tu_u2f(bits);
        uint16_t h = qk_f32_to_f16(f);
        double v = ref_f16(h), a = fabs((double)f);
        if (a >= 65520.0) {
            CHECK((h & 0x7fff) == 0x7c00, "qk_f32_to_f16(%a) = 0x%04x, expected inf", f, h);
            continue;
        }
        uint16_t mag = h & 0x7fff;
        double up = ref_f16((uint16_t)(mag + 1)), down = mag ? ref_f16((uint16_t)(mag - 1)) : 0;
        double err = fabs(fabs(v) - a);
        CHECK(!isnan(v) && !!signbit(v) == !!signbit(f) && err <= fabs(up - a) &&
                  err <= fabs(a - down),
              "qk_f32_to_f16(%a) = 0x%04x (%.9g) is not the nearest f16", f, h, v);
    }
}
END_TEST

/* ---- ops ---------------------------------------------------------------------------------- */

START_TEST(op_dot)
{
    tu_rng_seed(42);
    static const int ns[] = {0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 256, 1000, 4099};
    float a[4099], b[4099];
    for (size_t k = 0; k < COUNT(ns); k++) {
        int n = ns[k];
        for (int i = 0; i < n; i++) a[i] = tu_frand() * 3, b[i] = tu_frand();
        double s = 0, bound = 0;
        for (int i = 0; i < n; i++) s += (double)a[i] * b[i], bound += fabs((double)a[i] * b[i]);
        float got = qk_dot(a, b, n);
        CHECK(fabs(got - s) <= 1e-5 * bound + 1e-7, "qk_dot n %d: %.9g, float64 %.9g (Σ|ab| %.4g)",
              n, got, s, bound);
    }
}
END_TEST

START_TEST(op_rmsnorm)
{
    tu_rng_seed(43);
    static const int ns[] = {1, 3, 64, 257};
    static const float scales[] = {1e-3f, 1.0f, 300.0f, 1e15f};
    float x[257], w[257], out[257];
    for (size_t k = 0; k < COUNT(ns); k++)
        for (size_t sc = 0; sc < COUNT(scales); sc++) {
            int n = ns[k];
            for (int i = 0; i < n; i++) x[i] = tu_frand() * scales[sc], w[i] = 1.0f + tu_frand() * 0.5f;
            float eps = 1e-6f;
            double ss = 0;
            for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
            double inv = 1.0 / sqrt(ss / n + eps);
            qk_rmsnorm(out, x, w, n, eps);
            for (int i = 0; i < n; i++) {
                double want = x[i] * inv * w[i];
                CHECK(fabs(out[i] - want) <= 1e-5 * fabs(want) + 1e-6,
                      "qk_rmsnorm n %d scale %g: out[%d] = %.9g, float64 %.9g", n, scales[sc], i,
                      out[i], want);
            }
            /* in place (the forward pass does this) gives the same */
            float in[257];
            memcpy(in, x, sizeof(float) * (size_t)n);
            qk_rmsnorm(in, in, w, n, eps);
            CHECK(!memcmp(in, out, sizeof(float) * (size_t)n),
                  "qk_rmsnorm in place differs from out of place (n %d)", n);
        }
    /* all zeros: eps keeps it finite */
    float z[8] = {0}, one[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    qk_rmsnorm(out, z, one, 8, 1e-6f);
    for (int i = 0; i < 8; i++)
        CHECK(out[i] == 0.0f, "qk_rmsnorm of zeros: out[%d] = %g", i, out[i]);
}
END_TEST

START_TEST(op_l2norm)
{
    tu_rng_seed(44);
    static const int ns[] = {1, 5, 32, 128, 1000};
    float x[1000];
    for (size_t k = 0; k < COUNT(ns); k++) {
        int n = ns[k];
        for (int i = 0; i < n; i++) x[i] = tu_frand() * 10;
        double ss = 0;
        for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
        double norm = sqrt(ss);
        float orig[1000];
        memcpy(orig, x, sizeof(float) * (size_t)n);
        qk_l2norm(x, n, 1e-6f);
        double after = 0;
        for (int i = 0; i < n; i++) after += (double)x[i] * x[i];
        CHECK(fabs(sqrt(after) - 1) < 1e-5, "qk_l2norm n %d: norm afterwards %.9g", n, sqrt(after));
        for (int i = 0; i < n; i++)
            CHECK(fabs(x[i] - orig[i] / norm) <= 1e-6 * fabs(orig[i] / norm) + 1e-7,
                  "qk_l2norm n %d: x[%d] = %.9g, float64 %.9g", n, i, x[i], orig[i] / norm);
    }
    float z[4] = {0};
    qk_l2norm(z, 4, 1e-6f);
    for (int i = 0; i < 4; i++) CHECK(z[i] == 0.0f, "qk_l2norm of zeros: x[%d] = %g", i, z[i]);
}
END_TEST

START_TEST(op_softmax)
{
    tu_rng_seed(45);
    static const int ns[] = {1, 2, 8, 100, 1024};
    static const float scales[] = {1.0f, 30.0f, 1e4f};
    float x[1024], orig[1024];
    for (size_t k = 0; k < COUNT(ns); k++)
        for (size_t sc = 0; sc < COUNT(scales); sc++) {
            int n = ns[k];
            for (int i = 0; i < n; i++) orig[i] = x[i] = tu_frand() * scales[sc];
            qk_softmax(x, n);
            double mx = -INFINITY, tot = 0, sum = 0;
            for (int i = 0; i < n; i++) mx = fmax(mx, orig[i]);
            for (int i = 0; i < n; i++) tot += exp((double)orig[i] - mx);
            for (int i = 0; i < n; i++) {
                double want = exp((double)orig[i] - mx) / tot;
                CHECK(isfinite(x[i]) && fabs(x[i] - want) <= 1e-5 * want + 1e-7,
                      "qk_softmax n %d scale %g: p[%d] = %.9g, float64 %.9g", n, scales[sc], i,
                      x[i], want);
                sum += x[i];
            }
            CHECK(fabs(sum - 1) < 1e-5, "qk_softmax n %d scale %g: sums to %.9g", n, scales[sc],
                  sum);
        }
    /* large inputs: no overflow, the largest wins */
    float big[4] = {1000.0f, 999.0f, -1000.0f, 88.8f};
    qk_softmax(big, 4);
    CHECK(fabs(big[0] - 1 / (1 + exp(-1.0))) < 1e-6 &&
              fabs(big[1] - exp(-1.0) / (1 + exp(-1.0))) < 1e-6 && big[2] == 0.0f &&
              big[3] >= 0.0f && big[3] < 1e-30f,
          "qk_softmax({1000, 999, -1000, 88.8}) = {%g, %g, %g, %g}", big[0], big[1], big[2],
          big[3]);
    float huge[3] = {3e38f, 3e38f, -3e38f};
    qk_softmax(huge, 3);
    CHECK(fabs(huge[0] - 0.5f) < 1e-6 && fabs(huge[1] - 0.5f) < 1e-6 && huge[2] == 0.0f,
          "qk_softmax({3e38, 3e38, -3e38}) = {%g, %g, %g}", huge[0], huge[1], huge[2]);
    float same[5] = {7, 7, 7, 7, 7};
    qk_softmax(same, 5);
    for (int i = 0; i < 5; i++)
        CHECK(fabs(same[i] - 0.2f) < 1e-7, "uniform softmax: p[%d] = %.9g", i, same[i]);
}
END_TEST

START_TEST(op_activations)
{
    for (double x = -30; x <= 30; x += 0.0625) {
        double sp = log1p(exp(x)), sg = 1 / (1 + exp(-x));
        float got = qk_softplus((float)x);
        CHECK(fabs(got - sp) <= 2e-6 * sp + 1e-30, "qk_softplus(%g) = %.9g, float64 %.9g", x, got,
              sp);
        got = qk_sigmoid((float)x);
        CHECK(fabs(got - sg) <= 1e-6 * sg, "qk_sigmoid(%g) = %.9g, float64 %.9g", x, got, sg);
        got = qk_silu((float)x);
        CHECK(fabs(got - x * sg) <= 1e-6 * fabs(x * sg) + 1e-30, "qk_silu(%g) = %.9g, float64 %.9g",
              x, got, x * sg);
    }
    static const float large[] = {20.0f, 20.5f, 50.0f, 88.0f, 89.0f, 100.0f, 1e4f, 1e30f, 3e38f};
    for (size_t i = 0; i < COUNT(large); i++) {
        float got = qk_softplus(large[i]);
        CHECK(isfinite(got) && fabs(got - large[i]) <= 1e-6 * large[i],
              "qk_softplus(%g) = %g (overflow or wrong)", large[i], got);
    }
    static const float neg[] = {-20.0f, -50.0f, -88.0f, -100.0f, -1e4f, -3e38f};
    for (size_t i = 0; i < COUNT(neg); i++) {
        float sp = qk_softplus(neg[i]), sg = qk_sigmoid(neg[i]), si = qk_silu(neg[i]);
        double want = exp((double)neg[i]);
        CHECK(sp >= 0 && isfinite(sp) && fabs(sp - want) <= 1e-5 * want + 1e-38,
              "qk_softplus(%g) = %g, float64 %g", neg[i], sp, want);
        CHECK(sg >= 0 && isfinite(sg), "qk_sigmoid(%g) = %g", neg[i], sg);
        CHECK(isfinite(si) && si <= 0, "qk_silu(%g) = %g", neg[i], si);
        CHECK(qk_sigmoid(-neg[i]) == 1.0f || neg[i] > -20, "qk_sigmoid(%g) = %.9g", -neg[i],
              qk_sigmoid(-neg[i]));
        CHECK(qk_silu(-neg[i]) == -neg[i] || neg[i] > -20, "qk_silu(%g) = %.9g", -neg[i],
              qk_silu(-neg[i]));
    }
}
END_TEST

static Suite *make_suite(void)
{
    Suite *s = suite_create("kernels");
    TCase *mm = tcase_create("matmul");
    tcase_set_timeout(mm, 120);
    tcase_add_loop_test(mm, matmul_simd_vs_scalar, 0, (int)COUNT(DTYPES));
    tcase_add_test(mm, matmul_special_values);
    tcase_add_test(mm, matmul_dispatch);
    tcase_add_test(mm, mat_row_f32);
    suite_add_tcase(s, mm);

    TCase *cv = tcase_create("convert");
    tcase_set_timeout(cv, 60);
    tcase_add_test(cv, bf16_all_patterns);
    tcase_add_test(cv, bf16_rounding);
    tcase_add_test(cv, f16_all_patterns);
    tcase_add_test(cv, f16_rounding);
    suite_add_tcase(s, cv);

    TCase *ops = tcase_create("ops");
    tcase_set_timeout(ops, 60);
    tcase_add_test(ops, op_dot);
    tcase_add_test(ops, op_rmsnorm);
    tcase_add_test(ops, op_l2norm);
    tcase_add_test(ops, op_softmax);
    tcase_add_test(ops, op_activations);
    suite_add_tcase(s, ops);
    return s;
}

TU_MAIN(make_suite)
