#include "quant/linalg.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Panel width of the blocked Cholesky, and right-hand sides solved together by the inverse:
 * a panel (NB rows of n doubles) stays in L2, a block of RHS is four AVX-512 vectors wide. */
#define CHOL_NB 64
#define INV_NB 32
#define ROWS_PER_TASK 16


/* ---- references -------------------------------------------------------------------------- */

int qmix_cholesky_lower_ref(double *a, int64_t n)
{
    for (int64_t j = 0; j < n; j++) {
        double *rj = a + j * n, d = rj[j];
        for (int64_t t = 0; t < j; t++) d -= rj[t] * rj[t];
        if (!(d > 0)) return -1;
        double l = sqrt(d);
        rj[j] = l;
        for (int64_t i = j + 1; i < n; i++) {
            double *ri = a + i * n, v = ri[j];
            for (int64_t t = 0; t < j; t++) v -= ri[t] * rj[t];
            ri[j] = v / l;
        }
    }
    return 0;
}

void qmix_tri_inverse_lower_ref(const double *l, double *out, int64_t n)
{
    memset(out, 0, (size_t)(n * n) * sizeof *out);
    for (int64_t j = 0; j < n; j++) /* column j of L⁻¹: forward substitution of e_j */
        for (int64_t i = j; i < n; i++) {
            double v = i == j ? 1.0 : 0.0;
            for (int64_t t = j; t < i; t++) v -= l[i * n + t] * out[t * n + j];
            out[i * n + j] = v / l[i * n + i];
        }
}

/* ---- blocked Cholesky -------------------------------------------------------------------- */

typedef struct chol_ctx {
    double *a;
    int64_t n, j0, j1;
    double *panel_t; /* [nb][n]: the panel transposed, so the trailing update reads rows */
} chol_ctx;

/* Rows below the diagonal block: L[i, j0:j1] = A[i, j0:j1] · L_dd⁻ᵀ (forward substitution). */
static void panel_task(void *arg, int task, int thread)
{
    (void)thread;
    chol_ctx *c = arg;
    int64_t n = c->n, j0 = c->j0, j1 = c->j1;
    int64_t r0 = j1 + (int64_t)task * ROWS_PER_TASK, r1 = r0 + ROWS_PER_TASK < n ? r0 + ROWS_PER_TASK : n;
    for (int64_t i = r0; i < r1; i++) {
        double *ri = c->a + i * n;
        for (int64_t col = j0; col < j1; col++) {
            const double *rc = c->a + col * n;
            double v = ri[col];
            for (int64_t t = j0; t < col; t++) v -= ri[t] * rc[t];
            ri[col] = v / rc[col];
            c->panel_t[(col - j0) * n + i] = ri[col];
        }
    }
}

/* Trailing update A[i, j1:i] −= L[i, j0:j1] · L[j1:i, j0:j1]ᵀ, four panel columns per sweep so
 * each element of row i is loaded and stored once per four multiply-adds. */
QMIX_HOT_LOOP static void trailing_task(void *arg, int task, int thread)
{
    (void)thread;
    chol_ctx *c = arg;
    int64_t n = c->n, j0 = c->j0, j1 = c->j1, nb = j1 - j0;
    int64_t r0 = j1 + (int64_t)task * ROWS_PER_TASK, r1 = r0 + ROWS_PER_TASK < n ? r0 + ROWS_PER_TASK : n;
    for (int64_t i = r0; i < r1; i++) {
        double *ri = c->a + i * n;
        const double *li = ri + j0;
        int64_t t = 0;
        for (; t + 4 <= nb; t += 4) {
            const double *p0 = c->panel_t + t * n, *p1 = p0 + n, *p2 = p1 + n, *p3 = p2 + n;
            double f0 = li[t], f1 = li[t + 1], f2 = li[t + 2], f3 = li[t + 3];
            for (int64_t col = j1; col <= i; col++)
                ri[col] -= f0 * p0[col] + f1 * p1[col] + f2 * p2[col] + f3 * p3[col];
        }
        for (; t < nb; t++) {
            const double *p0 = c->panel_t + t * n;
            double f0 = li[t];
            for (int64_t col = j1; col <= i; col++) ri[col] -= f0 * p0[col];
        }
    }
}

static void run(qmix_pool *pool, qmix_task_fn fn, void *ctx, int n_tasks)
{
    if (pool) {
        qmix_pool_run(pool, fn, ctx, n_tasks);
        return;
    }
    for (int t = 0; t < n_tasks; t++) fn(ctx, t, 0);
}

int qmix_cholesky_lower(double *a, int64_t n, qmix_pool *pool)
{
    if (n <= CHOL_NB) return qmix_cholesky_lower_ref(a, n);
    chol_ctx c = {.a = a, .n = n, .panel_t = malloc((size_t)(CHOL_NB * n) * sizeof(double))};
    if (!c.panel_t) return qmix_cholesky_lower_ref(a, n); /* slower, same result */
    int rc = 0;
    for (int64_t j0 = 0; j0 < n && !rc; j0 += CHOL_NB) {
        int64_t j1 = j0 + CHOL_NB < n ? j0 + CHOL_NB : n;
        /* the diagonal block: earlier panels are already subtracted from it */
        for (int64_t j = j0; j < j1 && !rc; j++) {
            double *rj = a + j * n, d = rj[j];
            for (int64_t t = j0; t < j; t++) d -= rj[t] * rj[t];
            if (!(d > 0)) {
                rc = -1;
                break;
            }
            rj[j] = sqrt(d);
            for (int64_t i = j + 1; i < j1; i++) {
                double *ri = a + i * n, v = ri[j];
                for (int64_t t = j0; t < j; t++) v -= ri[t] * rj[t];
                ri[j] = v / rj[j];
            }
        }
        if (rc || j1 == n) break;
        c.j0 = j0;
        c.j1 = j1;
        int tasks = (int)((n - j1 + ROWS_PER_TASK - 1) / ROWS_PER_TASK);
        run(pool, panel_task, &c, tasks);
        run(pool, trailing_task, &c, tasks);
    }
    free(c.panel_t);
    return rc;
}

/* ---- blocked triangular inverse ---------------------------------------------------------- */

typedef struct inv_ctx {
    const double *l;
    double *out;
    int64_t n;
    double *x; /* [threads][n][INV_NB]: one block of columns of L⁻¹ */
} inv_ctx;

/* Columns [j0, j0 + INV_NB) of L⁻¹, solved together: X = L⁻¹ E by forward substitution, each
 * step an INV_NB-wide multiply-add. Rows above j0 are zero (L⁻¹ is lower). */
QMIX_HOT_LOOP static void inverse_task(void *arg, int task, int thread)
{
    inv_ctx *c = arg;
    int64_t n = c->n, j0 = (int64_t)task * INV_NB;
    int64_t nb = j0 + INV_NB < n ? INV_NB : n - j0;
    double *x = c->x + (int64_t)thread * n * INV_NB;
    for (int64_t i = j0; i < n; i++) {
        double *xi = x + i * INV_NB;
        memset(xi, 0, INV_NB * sizeof *xi);
        if (i - j0 < nb) xi[i - j0] = 1.0;
        const double *li = c->l + i * n;
        for (int64_t t = j0; t < i; t++) {
            const double f = li[t], *xt = x + t * INV_NB;
            for (int b = 0; b < INV_NB; b++) xi[b] -= f * xt[b];
        }
        double inv = 1.0 / li[i];
        for (int b = 0; b < INV_NB; b++) xi[b] *= inv;
    }
    for (int64_t i = j0; i < n; i++) {
        double *oi = c->out + i * n + j0;
        const double *xi = x + i * INV_NB;
        for (int64_t b = 0; b < nb; b++) oi[b] = b + j0 <= i ? xi[b] : 0.0;
    }
    for (int64_t i = 0; i < j0; i++) memset(c->out + i * n + j0, 0, (size_t)nb * sizeof(double));
}

void qmix_tri_inverse_lower(const double *l, double *out, int64_t n, qmix_pool *pool)
{
    int threads = pool ? qmix_pool_threads(pool) : 1;
    inv_ctx c = {.l = l, .out = out, .n = n,
                 .x = malloc((size_t)(threads * n * INV_NB) * sizeof(double))};
    if (!c.x) {
        qmix_tri_inverse_lower_ref(l, out, n);
        return;
    }
    run(pool, inverse_task, &c, (int)((n + INV_NB - 1) / INV_NB));
    free(c.x);
}
