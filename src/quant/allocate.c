#include "quant/allocate.h"

#include <stdio.h>

#include "quant/recipe.h"
#include "util/err.h"

/* A total order on settings (cheaper, then lower loss, then by what they are) so that ties are
 * broken the same way whatever order the candidates were listed in: the allocation must not
 * depend on the order of its inputs. */
static int opt_before(const qmix_alloc_opt *a, const qmix_alloc_opt *b)
{
    if (a->bytes != b->bytes) return a->bytes < b->bytes;
    if (a->kld != b->kld) return a->kld < b->kld;
    if (a->bits != b->bits) return a->bits < b->bits;
    if (a->group != b->group) return a->group < b->group;
    return a->method < b->method;
}

static int cheapest(const qmix_alloc_group *g)
{
    int best = 0;
    for (int o = 1; o < g->n_opts; o++)
        if (opt_before(&g->opt[o], &g->opt[best])) best = o;
    return best;
}

uint64_t qmix_alloc_bytes(const qmix_alloc_group *g, int n)
{
    uint64_t sum = 0;
    for (int i = 0; i < n; i++) sum += g[i].opt[g[i].choice].bytes;
    return sum;
}

double qmix_alloc_kld(const qmix_alloc_group *g, int n)
{
    double sum = 0;
    for (int i = 0; i < n; i++) sum += g[i].opt[g[i].choice].kld;
    return sum;
}

int qmix_allocate(qmix_alloc_group *g, int n, uint64_t budget, qmix_err *err)
{
    for (int i = 0; i < n; i++) {
        if (g[i].n_opts < 1 || g[i].n_opts > QMIX_ALLOC_MAX_OPTS)
            return qmix_errf(err, "allocation group %d (%s) has %d settings", i,
                             qmix_role_name(g[i].role), g[i].n_opts);
        g[i].choice = cheapest(&g[i]);
    }
    uint64_t used = qmix_alloc_bytes(g, n);
    if (used > budget)
        return qmix_errf(err, "the budget of %.1f MiB is below the smallest allocation the "
                         "constraints allow (%.1f MiB)", budget / 1048576.0, used / 1048576.0);
    /* Each step costs O(groups × settings); there are at most groups × settings steps, because
     * a group's bytes only grow. Fine for the few hundred groups of a per-band allocation. */
    for (;;) {
        int best_g = -1, best_o = -1;
        double best_ratio = 0;
        for (int i = 0; i < n; i++) {
            const qmix_alloc_opt *cur = &g[i].opt[g[i].choice];
            for (int o = 0; o < g[i].n_opts; o++) {
                const qmix_alloc_opt *c = &g[i].opt[o];
                if (c->bytes <= cur->bytes || c->kld >= cur->kld) continue;
                if (c->bytes - cur->bytes > budget - used) continue;
                double ratio = (cur->kld - c->kld) / (double)(c->bytes - cur->bytes);
                if (ratio > best_ratio ||
                    (ratio == best_ratio && best_g == i && opt_before(c, &g[i].opt[best_o]))) {
                    best_ratio = ratio;
                    best_g = i;
                    best_o = o;
                }
            }
        }
        if (best_g < 0) break;
        used += g[best_g].opt[best_o].bytes - g[best_g].opt[g[best_g].choice].bytes;
        g[best_g].choice = best_o;
    }
    return 0;
}

int qmix_alloc_link(qmix_alloc_group *g, int n, uint32_t roles)
{
    for (int i = 0; i < n; i++) {
        if (!(roles & (1u << g[i].role))) continue;
        for (int j = i + 1; j < n;) {
            if (!(roles & (1u << g[j].role)) || g[j].layer_lo != g[i].layer_lo ||
                g[j].layer_hi != g[i].layer_hi) {
                j++;
                continue;
            }
            int k = 0;
            for (int a = 0; a < g[i].n_opts; a++) {
                const qmix_alloc_opt *x = &g[i].opt[a];
                for (int b = 0; b < g[j].n_opts; b++) {
                    const qmix_alloc_opt *y = &g[j].opt[b];
                    if (x->bits != y->bits || (x->bits && (x->group != y->group ||
                                                           x->method != y->method)))
                        continue;
                    g[i].opt[k] = *x;
                    g[i].opt[k].bytes += y->bytes;
                    g[i].opt[k].kld += y->kld;
                    k++;
                    break;
                }
            }
            g[i].n_opts = k;
            g[i].also |= 1u << g[j].role | g[j].also;
            for (int m = j; m + 1 < n; m++) g[m] = g[m + 1];
            n--;
        }
    }
    return n;
}

int qmix_alloc_recipe(const qmix_alloc_group *g, int n, int group_size, const char *header,
                      char *buf, size_t len, qmix_err *err)
{
    size_t off = 0;
    int w = snprintf(buf, len, "%s", header ? header : "");
    if (w < 0 || (size_t)w >= len) return qmix_errf(err, "recipe text does not fit %zu bytes", len);
    off = (size_t)w;
    for (int i = 0; i < n; i++) {
        const qmix_alloc_opt *c = &g[i].opt[g[i].choice];
        char sel[48] = "";
        if (g[i].layer_lo >= 0)
            snprintf(sel, sizeof sel, g[i].layer_lo == g[i].layer_hi ? " layers=%d" : " layers=%d-%d",
                     g[i].layer_lo, g[i].layer_hi);
        char names[256];
        int nw = snprintf(names, sizeof names, "%s", qmix_role_name(g[i].role));
        for (int r = 0; r < 32 && nw > 0 && (size_t)nw < sizeof names; r++)
            if (g[i].also & (1u << r))
                nw += snprintf(names + nw, sizeof names - (size_t)nw, ",%s",
                               qmix_role_name((qmix_role)r));
        if (c->bits)
            w = snprintf(buf + off, len - off, "%s%s bits=%d group=%d%s%s\n", names, sel, c->bits, c->group ? c->group : group_size,
                         c->method > QMIX_METHOD_RTN ? " method=" : "",
                         c->method > QMIX_METHOD_RTN ? qmix_method_name(c->method) : "");
        else
            w = snprintf(buf + off, len - off, "%s%s keep\n", names, sel);
        if (w < 0 || (size_t)w >= len - off)
            return qmix_errf(err, "recipe text does not fit %zu bytes", len);
        off += (size_t)w;
    }
    return 0;
}
