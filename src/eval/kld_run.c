/* KLD over a token stream: a quantized model against its base, live or from a saved compact base. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "eval/kld.h"
#include "eval/windows.h"
#include "runtime/session.h"
#include "util/err.h"
#include "util/fileio.h"

#define BASE_MAGIC "QMIXKLB1"
#define BASE_HEADER_BYTES (8 + 4 * 4)

struct qmix_kld_base {
    FILE *f;
    char *path;
    qmix_kld_base_info info;
    int32_t *tokens;
    int32_t *ids;      /* [top_k]: the row being read */
    float *logp;       /* [top_k] */
    int64_t rows_read;
};

static uint32_t get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* The file format is little-endian, and so is every machine qmix runs on (x86-64, arm64). */
_Static_assert(sizeof(float) == 4 && sizeof(int32_t) == 4, "32-bit rows");

int qmix_kld_base_open(const char *path, qmix_kld_base **out, qmix_err *err)
{
    *out = NULL;
    qmix_kld_base *b = calloc(1, sizeof *b);
    if (!b) return qmix_errf(err, "out of memory");
    b->path = strdup(path);
    b->f = fopen(path, "rb");
    if (!b->f) {
        qmix_errf(err, "%s: %s", path, strerror(errno));
        goto fail;
    }
    unsigned char h[BASE_HEADER_BYTES];
    struct stat st;
    if (fstat(fileno(b->f), &st) || fread(h, 1, sizeof h, b->f) != sizeof h ||
        memcmp(h, BASE_MAGIC, 8)) {
        qmix_errf(err, "%s: not a qmix base-logits file (written by qmix kld --save-base)", path);
        goto fail;
    }
    uint32_t vocab = get_u32(h + 8), ctx = get_u32(h + 12), windows = get_u32(h + 16),
             top_k = get_u32(h + 20);
    if (vocab < 2 || vocab > (1u << 24) || ctx < 2 || ctx > (1u << 24) || windows > (1u << 24) ||
        top_k < 1 || top_k > vocab || top_k > 65536) {
        qmix_errf(err, "%s: implausible header (vocab %u, ctx %u, windows %u, top_k %u)", path,
                  vocab, ctx, windows, top_k);
        goto fail;
    }
    /* all factors are < 2^24 and top_k ≤ 2^16, so none of these products overflows 64 bits */
    uint64_t n_tok = (uint64_t)windows * ctx, n_rows = (uint64_t)windows * (ctx - 1);
    uint64_t want = BASE_HEADER_BYTES + 4 * n_tok + n_rows * (8ull * top_k + 4);
    if ((uint64_t)st.st_size != want) {
        qmix_errf(err, "%s: %lld bytes, but its header (vocab %u, ctx %u, windows %u, top_k %u) "
                  "describes %llu: truncated or corrupt", path, (long long)st.st_size, vocab, ctx,
                  windows, top_k, (unsigned long long)want);
        goto fail;
    }
    b->info = (qmix_kld_base_info){(int)vocab, (int)ctx, (int)windows, (int)top_k, NULL};
    b->tokens = malloc(n_tok ? 4 * n_tok : 4);
    b->ids = malloc(4ull * top_k);
    b->logp = malloc(4ull * top_k);
    if (!b->tokens || !b->ids || !b->logp) {
        qmix_errf(err, "%s: out of memory", path);
        goto fail;
    }
    long tokens_at = (long)(want - 4 * n_tok);
    if (fseek(b->f, tokens_at, SEEK_SET) || fread(b->tokens, 4, n_tok, b->f) != n_tok ||
        fseek(b->f, BASE_HEADER_BYTES, SEEK_SET)) {
        qmix_errf(err, "%s: read error", path);
        goto fail;
    }
    for (uint64_t i = 0; i < n_tok; i++)
        if (b->tokens[i] < 0 || (uint32_t)b->tokens[i] >= vocab) {
            qmix_errf(err, "%s: token %d at index %llu is outside the vocabulary [0, %u)", path,
                      b->tokens[i], (unsigned long long)i, vocab);
            goto fail;
        }
    b->info.tokens = b->tokens;
    *out = b;
    return 0;
fail:
    qmix_kld_base_close(b);
    return -1;
}

const qmix_kld_base_info *qmix_kld_base_get_info(const qmix_kld_base *b) { return &b->info; }

void qmix_kld_base_close(qmix_kld_base *b)
{
    if (!b) return;
    if (b->f) fclose(b->f);
    free(b->path);
    free(b->tokens);
    free(b->ids);
    free(b->logp);
    free(b);
}

/* Reads the next row; *logp_next gets the base's log-probability of the token that followed. */
static int base_next_row(qmix_kld_base *b, float *logp_next, qmix_err *err)
{
    int k = b->info.top_k;
    if (fread(b->ids, 4, (size_t)k, b->f) != (size_t)k ||
        fread(b->logp, 4, (size_t)k, b->f) != (size_t)k || fread(logp_next, 4, 1, b->f) != 1)
        return qmix_errf(err, "%s: read error at row %lld", b->path, (long long)b->rows_read);
    for (int i = 0; i < k; i++)
        if (b->ids[i] < 0 || b->ids[i] >= b->info.vocab || !(b->logp[i] <= 0))
            return qmix_errf(err, "%s: row %lld holds an invalid entry (id %d, log-prob %g)",
                             b->path, (long long)b->rows_read, b->ids[i], b->logp[i]);
    if (!(*logp_next <= 0))
        return qmix_errf(err, "%s: row %lld: invalid log-probability %g", b->path,
                         (long long)b->rows_read, *logp_next);
    b->rows_read++;
    return 0;
}

/* ---- saving ------------------------------------------------------------------------------ */

typedef struct save_ctx {
    FILE *f;
    const char *path;
    int64_t vocab;
    int top_k;
    int32_t *ids;
    float *logp;
} save_ctx;

static int save_rows(void *user, int window, int row0, int n_rows, const float *logits,
                     const int32_t *win, qmix_err *err)
{
    save_ctx *c = user;
    for (int i = 0; i < n_rows; i++) {
        const float *row = logits + (int64_t)i * c->vocab;
        qmix_topk_logprobs(row, c->vocab, c->top_k, c->ids, c->logp);
        float next = (float)(row[win[row0 + i + 1]] - qmix_logsumexp(row, c->vocab));
        if (next > 0) next = 0;
        if (fwrite(c->ids, 4, (size_t)c->top_k, c->f) != (size_t)c->top_k ||
            fwrite(c->logp, 4, (size_t)c->top_k, c->f) != (size_t)c->top_k ||
            fwrite(&next, 4, 1, c->f) != 1)
            return qmix_errf(err, "%s: write error: %s", c->path, strerror(errno));
    }
    return 0;
}

static int write_header(FILE *f, int vocab, int ctx, int windows, int top_k)
{
    unsigned char h[BASE_HEADER_BYTES];
    memcpy(h, BASE_MAGIC, 8);
    put_u32(h + 8, (uint32_t)vocab);
    put_u32(h + 12, (uint32_t)ctx);
    put_u32(h + 16, (uint32_t)windows);
    put_u32(h + 20, (uint32_t)top_k);
    return fwrite(h, 1, sizeof h, f) == sizeof h ? 0 : -1;
}

int qmix_kld_save_base(qmix_session *base, const int32_t *tokens, int ctx, int n_windows,
                       int top_k, const char *path,
                       void (*progress)(void *user, int done, int total), void *user,
                       const volatile sig_atomic_t *stop, int *done, qmix_err *err)
{
    *done = 0;
    int vocab = base->model->cfg.vocab_size;
    if (top_k < 1 || top_k > vocab || top_k > 65536)
        return qmix_errf(err, "top-k %d must be in [1, min(vocab %d, 65536)]", top_k, vocab);
    if (n_windows < 1) return qmix_errf(err, "no window of %d tokens to evaluate", ctx);
    save_ctx c = {.path = path, .vocab = vocab, .top_k = top_k};
    qmix_wfile out; /* renamed to path only once complete (or cleanly stopped) */
    if (qmix_wfile_open(&out, path, err)) return -1;
    c.f = out.f;
    c.ids = malloc(4ull * top_k);
    c.logp = malloc(4ull * top_k);
    int rc = -1;
    if (!c.ids || !c.logp) {
        qmix_errf(err, "out of memory");
        goto out;
    }
    if (write_header(c.f, vocab, ctx, n_windows, top_k)) {
        qmix_errf(err, "%s: write error: %s", path, strerror(errno));
        goto out;
    }
    rc = qmix_eval_windows(base, tokens, ctx, n_windows, save_rows, &c, progress, user, stop, done,
                           err);
    if (rc < 0) goto out;
    /* Rows come before the tokens so that a stopped run keeps a valid file: the complete windows'
     * rows, then their tokens, the header rewritten with their count. */
    long rows_end = BASE_HEADER_BYTES + (long)*done * (ctx - 1) * (8l * top_k + 4);
    if (fflush(c.f) || fseek(c.f, rows_end, SEEK_SET) ||
        fwrite(tokens, 4, (size_t)*done * ctx, c.f) != (size_t)*done * ctx ||
        fflush(c.f) || ftruncate(out.fd, rows_end + 4l * *done * ctx) ||
        fseek(c.f, 0, SEEK_SET) || write_header(c.f, vocab, ctx, *done, top_k)) {
        rc = qmix_errf(err, "%s: write error: %s", path, strerror(errno));
        goto out;
    }
out:
    if (rc < 0) qmix_wfile_abandon(&out);
    else if (qmix_wfile_commit(&out, err)) rc = -1;
    free(c.ids);
    free(c.logp);
    return rc;
}

/* ---- comparing --------------------------------------------------------------------------- */

typedef struct cmp_ctx {
    qmix_kld_result *r;
    int64_t vocab, cap;
    qmix_session *base;
    qmix_kld_base *file;
    float *base_logits;          /* [chunk][vocab], live base only */
    int ctx;
    /* the window in progress: added to the result only once it completes */
    int64_t w_n, w_top1;
    double w_dp, w_dp2, w_base_nll, w_quant_nll;
} cmp_ctx;

static int compare_rows(void *user, int window, int row0, int n_rows, const float *logits,
                        const int32_t *win, qmix_err *err)
{
    cmp_ctx *c = user;
    qmix_kld_result *r = c->r;
    int64_t V = c->vocab;
    if (row0 == 0) {
        c->w_n = c->w_top1 = 0;
        c->w_dp = c->w_dp2 = c->w_base_nll = c->w_quant_nll = 0;
    }
    if (c->base) {
        if (row0 == 0) qmix_session_reset(c->base);
        if (qmix_session_prefill(c->base, win + row0, n_rows, c->base_logits, err)) return -1;
    }
    for (int i = 0; i < n_rows; i++) {
        const float *q = logits + (int64_t)i * V;
        int32_t next = win[row0 + i + 1];
        double lse_q = qmix_logsumexp(q, V), lq_next = q[next] - lse_q, lp_next, kl;
        int32_t top_base;
        if (c->base) {
            const float *p = c->base_logits + (int64_t)i * V;
            kl = qmix_kld_full(p, q, V);
            lp_next = p[next] - qmix_logsumexp(p, V);
            top_base = qmix_argmax(p, (int)V);
        } else {
            float lp;
            if (base_next_row(c->file, &lp, err)) return -1;
            kl = qmix_kld_topk(c->file->ids, c->file->logp, c->file->info.top_k, q, V);
            lp_next = lp;
            top_base = c->file->ids[0];
        }
        double dp = exp(lq_next) - exp(lp_next);
        r->kld[r->n + c->w_n++] = kl;
        c->w_top1 += qmix_argmax(q, (int)V) == top_base;
        c->w_dp += dp;
        c->w_dp2 += dp * dp;
        c->w_base_nll -= lp_next;
        c->w_quant_nll -= lq_next;
    }
    if (row0 + n_rows == c->ctx - 1) {
        r->n += c->w_n;
        r->top1_same += c->w_top1;
        r->dp_sum += c->w_dp;
        r->dp_sq_sum += c->w_dp2;
        r->base_nll_sum += c->w_base_nll;
        r->quant_nll_sum += c->w_quant_nll;
    }
    return 0;
}

int qmix_kld_compare(qmix_session *quant, qmix_session *base, qmix_kld_base *base_file,
                     const int32_t *tokens, int ctx, int n_windows,
                     void (*progress)(void *user, int done, int total), void *user,
                     const volatile sig_atomic_t *stop, qmix_kld_result *out, qmix_err *err)
{
    memset(out, 0, sizeof *out);
    int64_t V = quant->model->cfg.vocab_size;
    cmp_ctx c = {.r = out, .vocab = V, .base = base, .file = base_file};
    if (base) {
        if (base->model->cfg.vocab_size != V)
            return qmix_errf(err, "the base model's vocabulary (%d) differs from the quantized "
                             "model's (%lld)", base->model->cfg.vocab_size, (long long)V);
    } else {
        const qmix_kld_base_info *in = &base_file->info;
        if (in->vocab != V)
            return qmix_errf(err, "%s was saved from a model with vocabulary %d, this one has %lld",
                             base_file->path, in->vocab, (long long)V);
        tokens = in->tokens;
        ctx = in->ctx;
        if (n_windows <= 0 || n_windows > in->windows) n_windows = in->windows;
        out->top_k = in->top_k;
        if (fseek(base_file->f, BASE_HEADER_BYTES, SEEK_SET))
            return qmix_errf(err, "%s: seek failed", base_file->path);
        base_file->rows_read = 0;
    }
    out->ctx = c.ctx = ctx;
    if (n_windows < 1) return qmix_errf(err, "no window of %d tokens to evaluate", ctx);
    c.cap = (int64_t)n_windows * (ctx - 1);
    out->kld = malloc((size_t)c.cap * sizeof *out->kld);
    if (base) c.base_logits = malloc((size_t)qmix_eval_chunk_rows(V) * V * sizeof(float));
    if (!out->kld || (base && !c.base_logits)) {
        free(c.base_logits);
        return qmix_errf(err, "out of memory");
    }
    int done = 0;
    int rc = qmix_eval_windows(quant, tokens, ctx, n_windows, compare_rows, &c, progress, user,
                               stop, &done, err);
    free(c.base_logits);
    out->windows = done;
    return rc;
}

void qmix_kld_result_free(qmix_kld_result *r)
{
    free(r->kld);
    r->kld = NULL;
}
