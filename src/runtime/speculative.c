/* MTP speculative decoding (see speculative.h). One step, with x the token chosen last and the
 * trunk at position P (x not yet fed):
 *   draft   the MTP block runs the pairs it has not seen yet — (trunk hidden at t, token t+1) for
 *           every token kept since its last run, ending with (hidden at P-1, x) — and then its
 *           own output with each draft, giving d1..dN and their distributions q1..qN;
 *   verify  the trunk runs [x, d1..dN] as one batch (positions P..P+N): the logits of row i-1 are
 *           the target for d_i, and every routed expert is read once for all rows that chose it;
 *   accept  d_i is kept while the acceptance rule says so; the first rejection yields the
 *           correction token, full acceptance a token drawn from the last row;
 *   rollback the trunk's position moves to P + kept (later KV rows are left behind), the Gated
 *           DeltaNet state is put back to that row's, and the MTP block's draft rows are dropped
 *           (its position back to P; the kept pairs are queued with the trunk's real hidden
 *           states for its next run).
 * Invariant between steps: mseq->pos == trunk pos - 1 - n_pend, and h_last is the trunk's
 * final-normed hidden state of the last token fed. */
#include "runtime/speculative.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/forward.h"
#include "model/mtp.h"
#include "util/err.h"

struct qmix_spec {
    qmix_session *s;
    int n_draft, B;
    int64_t D, V;
    qmix_spec_rollback mode;
    qmix_seq *mseq;          /* the MTP block's KV cache */
    float *cat;              /* [B][2D] MTP input scratch */
    float *x, *hid;          /* [B][D]: prefill residual stream; trunk final-normed hidden rows */
    float *pend_h;           /* [B][D]: pairs queued for the MTP block */
    int32_t *pend_tok;       /* [B] */
    int n_pend;
    float *h_last;           /* [D] */
    int have_last;
    float *mtp_h, *mtp_logits; /* [D], [V] */
    float *vlogits;          /* [N+1][V] verification logits */
    float *q, *p;            /* [N][V] draft distributions, [V] target distribution */
    int32_t rows[QMIX_SPEC_MAX_DRAFT + 1];
    int n_lin;               /* linear-attention layers */
    size_t stride;           /* floats of one layer's recorded state */
    float *row_state;        /* [n_lin][N][stride] (SNAPSHOT) */
    float *saved;            /* [n_lin][stride] (RECOMPUTE) */
    qmix_spec_draft_hook hook;
    void *hook_user;
    qmix_spec_stats stats;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void qmix_spec_free(qmix_spec *sp)
{
    if (!sp) return;
    qmix_seq_free(sp->mseq);
    free(sp->cat);
    free(sp->x);
    free(sp->hid);
    free(sp->pend_h);
    free(sp->pend_tok);
    free(sp->h_last);
    free(sp->mtp_h);
    free(sp->mtp_logits);
    free(sp->vlogits);
    free(sp->q);
    free(sp->p);
    free(sp->row_state);
    free(sp->saved);
    free(sp);
}

int qmix_spec_new(qmix_session *s, int n_draft, qmix_spec **out, qmix_err *err)
{
    *out = NULL;
    const qmix_config *c = &s->model->cfg;
    if (n_draft < 1 || n_draft > QMIX_SPEC_MAX_DRAFT)
        return qmix_errf(err, "draft length %d outside 1..%d", n_draft, QMIX_SPEC_MAX_DRAFT);
    qmix_spec *sp = calloc(1, sizeof *sp);
    if (!sp) return qmix_errf(err, "out of memory");
    sp->s = s;
    sp->n_draft = n_draft;
    sp->B = s->max_batch;
    sp->D = c->hidden_size;
    sp->V = c->vocab_size;
    for (int i = 0; i < c->n_layers; i++) sp->n_lin += !c->layer_is_full[i];
    sp->stride = qmix_seq_layer_state_floats(c);
    size_t B = (size_t)sp->B, D = (size_t)sp->D, V = (size_t)sp->V, N = (size_t)n_draft;
    if (qmix_mtp_seq_new(s->model, s->max_ctx, &sp->mseq, err)) {
        free(sp);
        return -1;
    }
    sp->cat = malloc(B * 2 * D * sizeof(float));
    sp->x = malloc(B * D * sizeof(float));
    sp->hid = malloc(B * D * sizeof(float));
    sp->pend_h = malloc(B * D * sizeof(float));
    sp->pend_tok = malloc(B * sizeof(int32_t));
    sp->h_last = malloc(D * sizeof(float));
    sp->mtp_h = malloc(D * sizeof(float));
    sp->mtp_logits = malloc(V * sizeof(float));
    sp->vlogits = malloc((N + 1) * V * sizeof(float));
    sp->q = malloc(N * V * sizeof(float));
    sp->p = malloc(V * sizeof(float));
    sp->row_state = malloc(((size_t)sp->n_lin * N * sp->stride + 1) * sizeof(float));
    if (!sp->cat || !sp->x || !sp->hid || !sp->pend_h || !sp->pend_tok || !sp->h_last ||
        !sp->mtp_h || !sp->mtp_logits || !sp->vlogits || !sp->q || !sp->p || !sp->row_state) {
        qmix_spec_free(sp);
        return qmix_errf(err, "out of memory for speculative decoding (%d draft tokens)", n_draft);
    }
    qmix_spec_reset(sp);
    *out = sp;
    return 0;
}

void qmix_spec_set_draft_hook(qmix_spec *sp, qmix_spec_draft_hook hook, void *user)
{
    sp->hook = hook;
    sp->hook_user = user;
}

void qmix_spec_set_rollback(qmix_spec *sp, qmix_spec_rollback mode) { sp->mode = mode; }
const qmix_spec_stats *qmix_spec_get_stats(const qmix_spec *sp) { return &sp->stats; }
int qmix_spec_draft(const qmix_spec *sp) { return sp->n_draft; }

void qmix_spec_reset(qmix_spec *sp)
{
    qmix_session_reset(sp->s);
    sp->mseq->pos = 0; /* its one layer has only a KV cache: nothing to clear */
    sp->n_pend = 0;
    sp->have_last = 0;
}

/* Runs the queued pairs through the MTP block (no head): its KV cache catches up. */
static void flush_pending(qmix_spec *sp)
{
    if (!sp->n_pend) return;
    qmix_mtp_forward(sp->s, sp->mseq, sp->pend_h, sp->pend_tok, sp->n_pend, sp->cat, NULL, NULL);
    sp->n_pend = 0;
}

static void push_pair(qmix_spec *sp, const float *h, int32_t tok)
{
    if (sp->n_pend == sp->B) flush_pending(sp);
    memcpy(sp->pend_h + sp->n_pend * sp->D, h, (size_t)sp->D * sizeof *h);
    sp->pend_tok[sp->n_pend++] = tok;
}

int qmix_spec_prefill(qmix_spec *sp, const int32_t *tokens, int n, qmix_err *err)
{
    qmix_session *s = sp->s;
    const qmix_model *m = s->model;
    const qmix_config *c = &m->cfg;
    int64_t D = sp->D;
    if (qmix_session_check_tokens(s, tokens, n, err)) return -1;
    for (int at = 0; at < n; at += sp->B) {
        int len = n - at < sp->B ? n - at : sp->B;
        /* the trunk over the batch, keeping every row's hidden state (qmix_forward's floats) */
        for (int t = 0; t < len; t++) qk_mat_row_f32(&m->embed, tokens[at + t], sp->x + t * D);
        qmix_forward_hidden(s, 0, c->n_layers, sp->x, len, NULL);
        for (int t = 0; t < len; t++)
            qk_rmsnorm(sp->hid + t * D, sp->x + t * D, m->final_norm, D, c->rms_eps);
        qmix_mm_job head = {.w = &m->lm_head, .x = sp->hid + (len - 1) * D, .n = 1, .ldx = D,
                            .y = s->logits, .ldy = sp->V};
        qmix_run_matmuls(s, &head, 1);
        /* the MTP block's pairs: each row's hidden state with the following token */
        if (sp->have_last) push_pair(sp, sp->h_last, tokens[at]);
        for (int t = 1; t < len; t++) push_pair(sp, sp->hid + (t - 1) * D, tokens[at + t]);
        memcpy(sp->h_last, sp->hid + (len - 1) * D, (size_t)D * sizeof(float));
        sp->have_last = 1;
    }
    return 0;
}

int32_t qmix_spec_draw(qmix_sampler *smp, const float *probs, int n)
{
    double total = 0;
    for (int i = 0; i < n; i++) total += probs[i];
    double r = qmix_sampler_uniform(smp) * total, acc = 0;
    int32_t last = 0;
    for (int i = 0; i < n; i++) {
        if (probs[i] <= 0) continue;
        acc += probs[i];
        last = i;
        if (acc > r) return i;
    }
    return last;
}

int32_t qmix_spec_accept(qmix_sampler *smp, const float *p, const float *q, int n, int32_t d,
                         int *accepted)
{
    double u = qmix_sampler_uniform(smp);
    if (q[d] > 0 && u * q[d] < p[d]) {
        *accepted = 1;
        return d;
    }
    *accepted = 0;
    double total = 0;
    for (int i = 0; i < n; i++)
        if (p[i] > q[i]) total += (double)p[i] - q[i];
    if (total <= 0) return qmix_spec_draw(smp, p, n); /* p == q: cannot reject; rounding only */
    double r = qmix_sampler_uniform(smp) * total, acc = 0;
    int32_t last = 0;
    for (int i = 0; i < n; i++) {
        if (p[i] <= q[i]) continue;
        acc += (double)p[i] - q[i];
        last = i;
        if (acc > r) return i;
    }
    return last;
}

/* The draft: n tokens after x (n may be 0: the pair then just waits in the queue). */
static void draft(qmix_spec *sp, qmix_sampler *smp, int32_t x, int n)
{
    push_pair(sp, sp->h_last, x);
    if (!n) return;
    qmix_mtp_forward(sp->s, sp->mseq, sp->pend_h, sp->pend_tok, sp->n_pend, sp->cat, sp->mtp_h,
                     sp->mtp_logits);
    sp->n_pend = 0;
    for (int i = 0; i < n; i++) {
        if (i)
            qmix_mtp_forward(sp->s, sp->mseq, sp->mtp_h, &sp->rows[i], 1, sp->cat, sp->mtp_h,
                             sp->mtp_logits);
        float *q = sp->q + i * sp->V;
        qmix_sampler_distribution(smp, sp->mtp_logits, q);
        sp->rows[i + 1] = qmix_spec_draw(smp, q, (int)sp->V);
    }
}

/* Each linear-attention layer's conv window and delta-rule state, to or from buf ([n_lin] slots
 * `slot_stride` floats apart). */
static void copy_state(qmix_spec *sp, float *buf, size_t slot_stride, int save)
{
    const qmix_config *c = &sp->s->model->cfg;
    size_t conv = (size_t)(c->conv_kernel - 1) *
                  (size_t)(2 * c->lin_n_k_heads * c->lin_k_head_dim +
                           c->lin_n_v_heads * c->lin_v_head_dim);
    size_t ssm = sp->stride - conv;
    for (int i = 0, l = 0; i < c->n_layers; i++) {
        if (c->layer_is_full[i]) continue;
        qmix_layer_state *st = &sp->s->seq.state[i];
        float *slot = buf + (size_t)l++ * slot_stride;
        if (save) {
            memcpy(slot, st->conv, conv * sizeof(float));
            memcpy(slot + conv, st->ssm, ssm * sizeof(float));
        } else {
            memcpy(st->conv, slot, conv * sizeof(float));
            memcpy(st->ssm, slot + conv, ssm * sizeof(float));
        }
    }
}

int qmix_spec_generate(qmix_spec *sp, qmix_sampler *smp, qmix_spec_emit_fn emit, void *user,
                       volatile sig_atomic_t *cancel, int32_t *history, int *n_history,
                       qmix_err *err)
{
    qmix_session *s = sp->s;
    int64_t D = sp->D, V = sp->V;
    if (!sp->have_last) return qmix_errf(err, "speculative decoding needs a prefilled prompt");
    if (sp->mode == QMIX_SPEC_RECOMPUTE && !sp->saved &&
        !(sp->saved = malloc(((size_t)sp->n_lin * sp->stride + 1) * sizeof(float))))
        return qmix_errf(err, "out of memory");
    /* the first token comes from the prefill's logits */
    qmix_sampler_distribution(smp, s->logits, sp->p);
    int32_t x = qmix_spec_draw(smp, sp->p, (int)V);
    int r = emit(user, x, s->logits, err);
    while (r == 0) {
        if (cancel && *cancel) break;
        int P = s->seq.pos;
        if (P + 1 > s->max_ctx) break; /* x cannot be fed: the context is full */
        int n = sp->n_draft < s->max_ctx - P - 1 ? sp->n_draft : s->max_ctx - P - 1;
        double t0 = now();
        draft(sp, smp, x, n);
        if (sp->hook && n) sp->hook(sp->hook_user, P, sp->rows + 1, n, sp->q);
        double t1 = now();

        /* verify [x, d1..dn] in one pass, the delta rule token by token as in plain decoding,
         * recording the recurrent state after each row (SNAPSHOT) */
        sp->rows[0] = x;
        s->seq.row_state = sp->row_state;
        s->seq.row_state_rows = sp->mode == QMIX_SPEC_SNAPSHOT ? n : 0;
        if (sp->mode == QMIX_SPEC_RECOMPUTE && n) copy_state(sp, sp->saved, sp->stride, 1);
        qmix_forward(s, sp->rows, n + 1, sp->vlogits);
        s->seq.row_state = NULL;
        s->seq.row_state_rows = 0;
        memcpy(sp->hid, s->h, (size_t)(n + 1) * (size_t)D * sizeof(float));
        double t2 = now();

        /* accept: row i-1's logits are the target for d_i */
        int kept = n + 1, accepted = 0;
        for (int i = 1; i <= n + 1; i++) {
            const float *row = sp->vlogits + (i - 1) * V;
            qmix_sampler_distribution(smp, row, sp->p);
            int ok = 0;
            if (i <= n) x = qmix_spec_accept(smp, sp->p, sp->q + (i - 1) * V, (int)V,
                                             sp->rows[i], &ok);
            else x = qmix_spec_draw(smp, sp->p, (int)V);
            r = emit(user, x, row, err);
            accepted += ok;
            if (ok && r == 0) continue;
            kept = i; /* rows x..d_{i-1}; x is now the correction or the token after d_n */
            break;
        }
        sp->stats.steps++;
        sp->stats.drafted += n;
        sp->stats.accepted += accepted;
        sp->stats.kept += kept;

        /* rollback to the kept rows */
        if (kept < n + 1) {
            if (sp->mode == QMIX_SPEC_SNAPSHOT) {
                copy_state(sp, sp->row_state + (size_t)(kept - 1) * sp->stride,
                           (size_t)n * sp->stride, 0);
            } else {
                copy_state(sp, sp->saved, sp->stride, 0);
                s->seq.pos = P;
                s->seq.row_state = sp->row_state; /* token by token, nothing recorded */
                qmix_forward(s, sp->rows, kept, NULL);
                s->seq.row_state = NULL;
            }
            sp->stats.rollbacks++;
        }
        s->seq.pos = P + kept;
        if (n) sp->mseq->pos = P; /* drop the MTP block's rows built on drafts */
        for (int j = 0; j + 1 < kept; j++) push_pair(sp, sp->hid + j * D, sp->rows[j + 1]);
        memcpy(sp->h_last, sp->hid + (kept - 1) * D, (size_t)D * sizeof(float));
        if (history)
            for (int j = 0; j < kept; j++) history[(*n_history)++] = sp->rows[j];
        double t3 = now();
        sp->stats.draft_s += t1 - t0;
        sp->stats.verify_s += t2 - t1;
        sp->stats.accept_s += t3 - t2;
    }
    return r < 0 ? -1 : 0;
}
