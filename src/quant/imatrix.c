/* llama.cpp imatrix files (see imatrix.h). */
#include "quant/imatrix.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/gguf.h"
#include "formats/gguf_write.h"
#include "util/err.h"
#include "util/fileio.h"

void qmix_imatrix_free(qmix_imatrix *im)
{
    if (!im) return;
    for (int i = 0; i < im->n; i++) {
        free(im->e[i].name);
        free(im->e[i].values);
        free(im->e[i].counts);
    }
    free(im->e);
    free(im->dataset);
    free(im->path);
    free(im);
}

const qmix_imatrix_entry *qmix_imatrix_find(const qmix_imatrix *im, const char *name)
{
    for (int i = 0; i < im->n; i++)
        if (!strcmp(im->e[i].name, name)) return &im->e[i];
    return NULL;
}

/* ---- names -------------------------------------------------------------------------------- */

int qmix_imatrix_gguf_name(const char *n, char *out, size_t len)
{
    if (strstr(n, "vision") || strstr(n, "visual") || !strncmp(n, "mtp.", 4)) return -1;
    if (strstr(n, "lm_head")) return snprintf(out, len, "output.weight") < (int)len ? 0 : -1;
    const char *l = strstr(n, "layers.");
    if (!l) return -1;
    char *end;
    long li = strtol(l + 7, &end, 10);
    if (end == l + 7 || *end != '.' || li < 0) return -1;
    static const struct { const char *pat, *gguf; } map[] = {
        {"self_attn.q_proj", "attn_q"}, {"self_attn.k_proj", "attn_k"},
        {"self_attn.v_proj", "attn_v"}, {"self_attn.o_proj", "attn_output"},
        {"linear_attn.in_proj_qkv", "attn_qkv"}, {"linear_attn.in_proj_z", "attn_gate"},
        {"linear_attn.in_proj_b", "ssm_beta"}, {"linear_attn.in_proj_a", "ssm_alpha"},
        {"linear_attn.out_proj", "ssm_out"},
        {"mlp.shared_expert_gate", "ffn_gate_inp_shexp"},
        {"mlp.shared_expert.gate_proj", "ffn_gate_shexp"},
        {"mlp.shared_expert.up_proj", "ffn_up_shexp"},
        {"mlp.shared_expert.down_proj", "ffn_down_shexp"},
        {"gate_proj", "ffn_gate_exps"}, {"up_proj", "ffn_up_exps"},
        {"down_proj", "ffn_down_exps"},
        {"mlp.gate", "ffn_gate_inp"},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) {
        if (!strstr(end, map[i].pat)) continue;
        if (!strncmp(map[i].gguf, "ffn_", 4) && strstr(map[i].gguf, "_exps") &&
            !strstr(end, "switch_mlp.") && !strstr(end, "mlp.experts."))
            continue;
        return snprintf(out, len, "blk.%ld.%s.weight", li, map[i].gguf) < (int)len ? 0 : -1;
    }
    return -1;
}

/* GGUF tiled value-head position p holds HF head (p mod nk)·r + p div nk (§5.9). */
static int64_t hf_head_at(int64_t p, int64_t nk, int64_t r) { return (p % nk) * r + p / nk; }

int qmix_imatrix_lookup(const qmix_imatrix *im, const char *name, int64_t mat, int64_t k,
                        const qmix_config *cfg, float *out, int64_t *count, qmix_err *err)
{
    char g[128];
    *count = -1;
    if (qmix_imatrix_gguf_name(name, g, sizeof g)) return 0;
    const qmix_imatrix_entry *e = qmix_imatrix_find(im, g);
    if (!e) return 0;
    if (k <= 0 || e->nval % k || mat < 0 || (mat + 1) * k > e->nval)
        return qmix_errf(err, "imatrix entry %s: %lld values, but %s needs %lld channels for "
                         "matrix %lld", g, (long long)e->nval, name, (long long)k, (long long)mat);
    const float *v = e->values + mat * k;
    if (e->counts) {
        if (e->n_mat != e->nval / k)
            return qmix_errf(err, "imatrix entry %s: %d matrices of %lld values disagree with %s's "
                             "%lld channels", g, e->n_mat, (long long)(e->nval / e->n_mat), name,
                             (long long)k);
        *count = e->counts[mat];
    }
    int64_t nk = cfg->lin_n_k_heads, nv = cfg->lin_n_v_heads, dv = cfg->lin_v_head_dim;
    if (strstr(g, "ssm_out") && nk > 0 && nv > nk && nv % nk == 0 && k == nv * dv) {
        int64_t r = nv / nk;
        for (int64_t p = 0; p < nv; p++)
            memcpy(out + hf_head_at(p, nk, r) * dv, v + p * dv, (size_t)dv * sizeof *out);
    } else {
        memcpy(out, v, (size_t)k * sizeof *out);
    }
    return 1;
}

/* ---- reading ------------------------------------------------------------------------------ */

static int add_entry(qmix_imatrix *im, qmix_imatrix_entry *e, qmix_err *err)
{
    qmix_imatrix_entry *a = realloc(im->e, (size_t)(im->n + 1) * sizeof *a);
    if (!a) return qmix_errf(err, "out of memory");
    im->e = a;
    im->e[im->n++] = *e;
    return 0;
}

static int rd_i32(const uint8_t *b, uint64_t len, uint64_t *off, int32_t *v)
{
    if (len - *off < 4) return -1;
    memcpy(v, b + *off, 4);
    *off += 4;
    return 0;
}

int qmix_imatrix_load_dat_memory(const void *buf, uint64_t len, const char *label,
                                 qmix_imatrix **out, qmix_err *err)
{
    *out = NULL;
    const uint8_t *b = buf;
    uint64_t off = 0;
    int32_t n;
    qmix_imatrix *im = calloc(1, sizeof *im);
    if (!im) return qmix_errf(err, "out of memory");
    im->chunk_size = -1;
    if (rd_i32(b, len, &off, &n) || n < 0 || (uint64_t)n > len / 12) {
        qmix_errf(err, "%s: bad entry count (not an imatrix .dat file?)", label);
        goto fail;
    }
    for (int32_t i = 0; i < n; i++) {
        int32_t nl, ncall, nval;
        if (rd_i32(b, len, &off, &nl) || nl <= 0 || nl > 1024 || len - off < (uint64_t)nl) {
            qmix_errf(err, "%s: entry %d: bad name length", label, i);
            goto fail;
        }
        qmix_imatrix_entry e = {0};
        e.name = malloc((size_t)nl + 1);
        if (!e.name) { qmix_errf(err, "out of memory"); goto fail; }
        memcpy(e.name, b + off, (size_t)nl);
        e.name[nl] = 0;
        off += (uint64_t)nl;
        if (strlen(e.name) != (size_t)nl) {
            free(e.name);
            qmix_errf(err, "%s: entry %d: NUL inside the name", label, i);
            goto fail;
        }
        if (rd_i32(b, len, &off, &ncall) || rd_i32(b, len, &off, &nval) || ncall < 0 || nval <= 0 ||
            (len - off) / 4 < (uint64_t)nval) {
            qmix_errf(err, "%s: entry %d (%s): bad ncall/nval or truncated values", label, i, e.name);
            free(e.name);
            goto fail;
        }
        if (qmix_imatrix_find(im, e.name)) {
            qmix_errf(err, "%s: entry %d: duplicate name %s", label, i, e.name);
            free(e.name);
            goto fail;
        }
        e.nval = nval;
        e.n_mat = 1;
        e.ncall = ncall;
        e.values = malloc((size_t)nval * sizeof *e.values);
        if (!e.values) { free(e.name); qmix_errf(err, "out of memory"); goto fail; }
        memcpy(e.values, b + off, (size_t)nval * 4);
        off += (uint64_t)nval * 4;
        for (int32_t j = 0; j < nval; j++) {
            if (!isfinite(e.values[j]) || e.values[j] < 0) {
                qmix_errf(err, "%s: entry %s: value %d is %g", label, e.name, j, e.values[j]);
                free(e.name); free(e.values);
                goto fail;
            }
            if (ncall) e.values[j] /= (float)ncall; /* §4.5: stored as mean · ncall */
        }
        if (add_entry(im, &e, err)) { free(e.name); free(e.values); goto fail; }
    }
    if (off < len) { /* optional trailer: chunks, dataset name */
        int32_t chunks, dl;
        if (rd_i32(b, len, &off, &chunks) || chunks < 0 || rd_i32(b, len, &off, &dl) || dl < 0 ||
            len - off != (uint64_t)dl) {
            qmix_errf(err, "%s: malformed trailer after %d entries", label, n);
            goto fail;
        }
        im->chunk_count = chunks;
        im->dataset = malloc((size_t)dl + 1);
        if (!im->dataset) { qmix_errf(err, "out of memory"); goto fail; }
        memcpy(im->dataset, b + off, (size_t)dl);
        im->dataset[dl] = 0;
    }
    *out = im;
    return 0;
fail:
    qmix_imatrix_free(im);
    return -1;
}

static int load_gguf(const char *path, qmix_imatrix **out, qmix_err *err)
{
    qmix_gguf *g;
    if (qmix_gguf_open(path, &g, err)) return -1;
    qmix_imatrix *im = calloc(1, sizeof *im);
    const char *s;
    uint64_t sl;
    int64_t cc, cs;
    int r;
    if (!im) { qmix_gguf_close(g); return qmix_errf(err, "out of memory"); }
    if ((r = qmix_gguf_get_str(g, "general.type", &s, &sl, err)) < 0) goto fail;
    if (!r || sl != 7 || memcmp(s, "imatrix", 7)) {
        qmix_errf(err, "%s: a GGUF file but not an imatrix (general.type is not \"imatrix\")", path);
        goto fail;
    }
    const qmix_gguf_kv *ds = qmix_gguf_kv_find(g, "imatrix.datasets");
    if ((r = qmix_gguf_get_int(g, "imatrix.chunk_count", &cc, err)) < 0) goto fail;
    int r2 = qmix_gguf_get_int(g, "imatrix.chunk_size", &cs, err);
    if (r2 < 0) goto fail;
    if (!r || !r2 || !ds) {
        qmix_errf(err, "%s: imatrix GGUF without imatrix.datasets / chunk_count / chunk_size", path);
        goto fail;
    }
    im->gguf = 1;
    im->chunk_count = cc;
    im->chunk_size = cs;
    if (ds->type == QMIX_GGUF_ARRAY && ds->arr_type == QMIX_GGUF_STRING && ds->arr_n > 0) {
        const uint8_t *cur = ds->data;
        qmix_gguf_arr_str_next(&cur, &s, &sl);
        im->dataset = strndup(s, sl);
    }
    for (uint64_t i = 0; i < qmix_gguf_tensor_count(g); i++) {
        const qmix_gguf_tensor *t = qmix_gguf_tensor_at(g, i);
        size_t nl = strlen(t->name);
        if (nl < 8 || strcmp(t->name + nl - 8, ".in_sum2")) continue;
        char cname[QMIX_GGUF_MAX_NAME + 8];
        snprintf(cname, sizeof cname, "%.*s.counts", (int)(nl - 8), t->name);
        const qmix_gguf_tensor *c = qmix_gguf_find(g, cname);
        if (!c) { qmix_errf(err, "%s: %s has no %s", path, t->name, cname); goto fail; }
        if (t->type != 0 || c->type != 0 || t->n_dims > 2 || c->ne[0] != 1 ||
            c->ne[1] != t->ne[1] || t->ne[2] != 1 || t->ne[3] != 1 || c->ne[2] != 1 ||
            c->ne[3] != 1 || t->ne[0] <= 0 || t->ne[1] <= 0 || t->ne[1] > 65536) {
            qmix_errf(err, "%s: %s / %s: expected F32 {K, n_mat} and {1, n_mat}", path, t->name,
                      cname);
            goto fail;
        }
        int64_t k = t->ne[0], nm = t->ne[1];
        qmix_imatrix_entry e = {.nval = k * nm, .n_mat = (int)nm};
        e.name = strndup(t->name, nl - 8 + 0);
        e.values = malloc((size_t)(k * nm) * sizeof *e.values);
        e.counts = malloc((size_t)nm * sizeof *e.counts);
        if (!e.name || !e.values || !e.counts || add_entry(im, &e, err)) {
            free(e.name); free(e.values); free(e.counts);
            qmix_errf(err, "out of memory");
            goto fail;
        }
        /* entry names are the weight names ("blk.0.attn_q.weight") */
        const float *sum = t->data, *cnt = c->data;
        for (int64_t m = 0; m < nm; m++) {
            float cn;
            memcpy(&cn, cnt + m, 4);
            if (!isfinite(cn) || cn < 0 || cn >= 0x1p62f) { /* a row count: int64 holds it */
                qmix_errf(err, "%s: %s[%lld] = %g", path, cname, (long long)m, cn);
                goto fail;
            }
            e.counts[m] = (int64_t)cn;
            for (int64_t j = 0; j < k; j++) {
                float v;
                memcpy(&v, sum + m * k + j, 4);
                if (!isfinite(v) || v < 0) {
                    qmix_errf(err, "%s: %s value %lld is %g", path, t->name, (long long)(m * k + j), v);
                    goto fail;
                }
                e.values[m * k + j] = cn > 0 ? v / cn : 1.0f; /* §4.6: no rows → 1.0 */
            }
        }
    }
    qmix_gguf_close(g);
    *out = im;
    return 0;
fail:
    qmix_gguf_close(g);
    qmix_imatrix_free(im);
    return -1;
}

int qmix_imatrix_load(const char *path, qmix_imatrix **out, qmix_err *err)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return qmix_errf(err, "%s: %s", path, strerror(errno));
    char magic[4] = {0};
    size_t got = fread(magic, 1, 4, f);
    fclose(f);
    int rc;
    if (got == 4 && !memcmp(magic, "GGUF", 4)) {
        rc = load_gguf(path, out, err);
    } else {
        char *buf;
        size_t len;
        if (qmix_read_file(path, (size_t)4 << 30, &buf, &len, err)) return -1;
        rc = qmix_imatrix_load_dat_memory(buf, len, path, out, err);
        free(buf);
    }
    /* remembered for writers that record their inputs (GGUF's quantize.imatrix.file) */
    if (!rc && !((*out)->path = strdup(path))) {
        qmix_imatrix_free(*out);
        *out = NULL;
        return qmix_errf(err, "out of memory");
    }
    return rc;
}

/* ---- writing ------------------------------------------------------------------------------ */

typedef struct wentry {
    char name[96];
    int kind, layer, n_mat;
    int reorder;   /* ssm_out: HF → tiled channel order */
} wentry;

static int cmp_wentry(const void *a, const void *b)
{
    return strcmp(((const wentry *)a)->name, ((const wentry *)b)->name);
}

/* The GGUF tensors each statistic feeds (§0.3), for the entries present in c. */
static int list_entries(const qmix_calib *c, const qmix_config *cfg, wentry **out, int *n_out)
{
    int cap = 16 * (cfg->n_layers + 1), n = 0;
    wentry *w = calloc((size_t)cap, sizeof *w);
    if (!w) return -1;
    for (int l = -1; l < cfg->n_layers; l++) {
#define ADD(KIND, NM, NMAT, RE)                                                                  \
    do {                                                                                         \
        w[n].kind = KIND; w[n].layer = l; w[n].n_mat = NMAT; w[n].reorder = RE;                  \
        if (l < 0) snprintf(w[n].name, sizeof w[n].name, "%s", NM);                              \
        else snprintf(w[n].name, sizeof w[n].name, "blk.%d.%s.weight", l, NM);                    \
        n++;                                                                                     \
    } while (0)
        if (l < 0) {
            if (qmix_calib_get(c, -1, QMIX_CIN_HEAD, -1)) ADD(QMIX_CIN_HEAD, "output.weight", 1, 0);
            continue;
        }
        if (!qmix_calib_get(c, l, QMIX_CIN_ATTN, -1)) continue; /* layer not in the file */
        if (cfg->layer_is_full[l]) {
            ADD(QMIX_CIN_ATTN, "attn_q", 1, 0); ADD(QMIX_CIN_ATTN, "attn_k", 1, 0);
            ADD(QMIX_CIN_ATTN, "attn_v", 1, 0); ADD(QMIX_CIN_ATTN_O, "attn_output", 1, 0);
        } else {
            ADD(QMIX_CIN_ATTN, "attn_qkv", 1, 0); ADD(QMIX_CIN_ATTN, "attn_gate", 1, 0);
            ADD(QMIX_CIN_ATTN, "ssm_beta", 1, 0); ADD(QMIX_CIN_ATTN, "ssm_alpha", 1, 0);
            ADD(QMIX_CIN_GDN_OUT, "ssm_out", 1, 1);
        }
        ADD(QMIX_CIN_FFN, "ffn_gate_inp", 1, 0);
        if (cfg->shared_ffn > 0) {
            ADD(QMIX_CIN_FFN, "ffn_gate_inp_shexp", 1, 0);
            ADD(QMIX_CIN_FFN, "ffn_gate_shexp", 1, 0); ADD(QMIX_CIN_FFN, "ffn_up_shexp", 1, 0);
            ADD(QMIX_CIN_SHARED_DOWN, "ffn_down_shexp", 1, 0);
        }
        ADD(QMIX_CIN_EXPERT, "ffn_gate_exps", cfg->n_experts, 0);
        ADD(QMIX_CIN_EXPERT, "ffn_up_exps", cfg->n_experts, 0);
        ADD(QMIX_CIN_EXPERT_DOWN, "ffn_down_exps", cfg->n_experts, 0);
#undef ADD
    }
    qsort(w, (size_t)n, sizeof *w, cmp_wentry);
    *out = w;
    *n_out = n;
    return 0;
}

/* Σx² and rows of matrix m of a written entry, in GGUF channel order (tiled for ssm_out). */
static const qmix_calib_entry *stat_of(const qmix_calib *c, const wentry *w, int m)
{
    return qmix_calib_get(c, w->layer, w->kind, qmix_calib_kind_per_expert(w->kind) ? m : -1);
}

static void gguf_order(const wentry *w, const qmix_config *cfg, const double *src, int64_t k,
                       double *dst)
{
    int64_t nk = cfg->lin_n_k_heads, nv = cfg->lin_n_v_heads, dv = cfg->lin_v_head_dim;
    if (w->reorder && nk > 0 && nv > nk && nv % nk == 0 && k == nv * dv) {
        for (int64_t p = 0; p < nv; p++)
            memcpy(dst + p * dv, src + hf_head_at(p, nk, nv / nk) * dv, (size_t)dv * sizeof *dst);
    } else {
        memcpy(dst, src, (size_t)k * sizeof *dst);
    }
}

int qmix_imatrix_write(const char *path, const qmix_calib *c, const qmix_config *cfg,
                       int chunk_size, qmix_err *err)
{
    wentry *w;
    int n;
    if (chunk_size <= 0) return qmix_errf(err, "imatrix: chunk size must be positive");
    if (list_entries(c, cfg, &w, &n)) return qmix_errf(err, "out of memory");
    size_t pl = strlen(path);
    int gguf = pl > 5 && !strcmp(path + pl - 5, ".gguf");
    int64_t kmax = 1;
    for (int i = 0; i < qmix_calib_count(c); i++)
        if (qmix_calib_at(c, i)->k > kmax) kmax = qmix_calib_at(c, i)->k;
    double *tmp = malloc((size_t)kmax * sizeof *tmp);
    float *row = malloc((size_t)kmax * sizeof *row);
    FILE *f = NULL;
    qmix_ggw *gw = NULL;
    int rc = -1;
    if (!tmp || !row) { qmix_errf(err, "out of memory"); goto done; }
    /* entries with no rows at all are omitted (§4.5); k from the statistics */
    int kept = 0;
    for (int i = 0; i < n; i++) {
        uint64_t rows = 0;
        for (int m = 0; m < w[i].n_mat; m++) {
            const qmix_calib_entry *e = stat_of(c, &w[i], m);
            if (!e) { w[i].n_mat = 0; break; }
            rows += e->n;
        }
        if (!w[i].n_mat || (!rows && !gguf)) continue;
        w[kept++] = w[i];
    }
    n = kept;
    const char *ds = qmix_calib_dataset(c);
    if (gguf) {
        gw = qmix_ggw_new();
        if (!gw) { qmix_errf(err, "out of memory"); goto done; }
        qmix_ggw_kv_str(gw, "general.type", "imatrix");
        qmix_ggw_kv_arr_str_begin(gw, "imatrix.datasets", 1);
        qmix_ggw_arr_str(gw, ds, strlen(ds));
        uint64_t tok = qmix_calib_tokens(c);
        qmix_ggw_kv_u32(gw, "imatrix.chunk_count", (uint32_t)(tok / (uint64_t)chunk_size));
        qmix_ggw_kv_u32(gw, "imatrix.chunk_size", (uint32_t)chunk_size);
        for (int i = 0; i < n; i++) {
            int64_t k = stat_of(c, &w[i], 0)->k;
            int64_t ne_s[2] = {k, w[i].n_mat}, ne_c[2] = {1, w[i].n_mat};
            char nm[128];
            snprintf(nm, sizeof nm, "%s.in_sum2", w[i].name);
            qmix_ggw_tensor(gw, nm, 0, 2, ne_s);
            snprintf(nm, sizeof nm, "%s.counts", w[i].name);
            qmix_ggw_tensor(gw, nm, 0, 2, ne_c);
        }
        if (qmix_ggw_open(gw, path, err)) goto done;
        for (int i = 0; i < n; i++) {
            for (int m = 0; m < w[i].n_mat; m++) {
                const qmix_calib_entry *e = stat_of(c, &w[i], m);
                gguf_order(&w[i], cfg, e->sumsq, e->k, tmp);
                for (int64_t j = 0; j < e->k; j++) row[j] = (float)tmp[j];
                if (qmix_ggw_write(gw, row, (size_t)e->k * 4, err)) goto done;
            }
            for (int m = 0; m < w[i].n_mat; m++) {
                float cn = (float)stat_of(c, &w[i], m)->n;
                if (qmix_ggw_write(gw, &cn, 4, err)) goto done;
            }
        }
        rc = qmix_ggw_close(gw, err);
        gw = NULL;
        goto done;
    }
    qmix_wfile out;
    if (qmix_wfile_open(&out, path, err)) goto done;
    f = out.f;
    int32_t n32 = n;
    int ok = fwrite(&n32, 4, 1, f) == 1;
    for (int i = 0; i < n && ok; i++) {
        uint64_t maxn = 0;
        for (int m = 0; m < w[i].n_mat; m++)
            if (stat_of(c, &w[i], m)->n > maxn) maxn = stat_of(c, &w[i], m)->n;
        int32_t ncall = (int32_t)((maxn + (uint64_t)chunk_size - 1) / (uint64_t)chunk_size);
        int64_t k = stat_of(c, &w[i], 0)->k;
        int32_t len = (int32_t)strlen(w[i].name), nval = (int32_t)(k * w[i].n_mat);
        ok = fwrite(&len, 4, 1, f) == 1 && fwrite(w[i].name, 1, (size_t)len, f) == (size_t)len &&
             fwrite(&ncall, 4, 1, f) == 1 && fwrite(&nval, 4, 1, f) == 1;
        for (int m = 0; m < w[i].n_mat && ok; m++) {
            const qmix_calib_entry *e = stat_of(c, &w[i], m);
            gguf_order(&w[i], cfg, e->sumsq, e->k, tmp);
            /* (Σ x² / count) · ncall; an expert that saw nothing: 1.0 · ncall (§4.5) */
            for (int64_t j = 0; j < k; j++)
                row[j] = e->n ? (float)(tmp[j] / (double)e->n * ncall) : (float)ncall;
            ok = fwrite(row, 4, (size_t)k, f) == (size_t)k;
        }
    }
    if (ok) {
        int32_t chunks = (int32_t)(qmix_calib_tokens(c) / (uint64_t)chunk_size);
        int32_t dl = (int32_t)strlen(ds);
        ok = fwrite(&chunks, 4, 1, f) == 1 && fwrite(&dl, 4, 1, f) == 1 &&
             fwrite(ds, 1, (size_t)dl, f) == (size_t)dl;
    }
    if (!ok) {
        qmix_errf(err, "cannot write %s: %s", path, strerror(errno));
        qmix_wfile_abandon(&out);
    } else {
        rc = qmix_wfile_commit(&out, err);
    }
    f = NULL;
done:
    if (gw) qmix_ggw_discard(gw);
    free(tmp);
    free(row);
    free(w);
    return rc;
}
