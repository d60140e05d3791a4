/* MTP speculative decoding: the MTP block loads and predicts; greedy with it gives exactly the
 * tokens of plain greedy decoding (every fixture, the demo model, every draft length, both rollback
 * modes, drafts forced to be accepted up to every offset, a resumed conversation) and leaves the
 * model state as plain decoding does; speculative sampling draws from the target distribution
 * (the acceptance rule alone, with wrong rules as controls that the test must reject, and end to
 * end on the demo model). */
#include <dirent.h>
#include <math.h>
#include <sys/stat.h>

#include "model/forward.h"
#include "model/mtp.h"
#include "qmix.h"
#include "runtime/generate.h"
#include "runtime/sampler.h"
#include "runtime/session.h"
#include "runtime/speculative.h"
#include "text/tokenizer.h"
#include "testutil.h"

#define CTX 160
#define N_GEN 96

static char models[16][320];
static int n_models;

static void discover(void) { n_models = tu_model_dirs(models, 16); }

/* Plain greedy: n tokens after the prompt, the way qmix generate --tokens does it. */
static void plain_greedy(qmix_model *m, const int32_t *prompt, int n_prompt, int n, int32_t *out,
                         float *logits_after)
{
    qmix_err err;
    qmix_session_opts so = {.max_ctx = CTX, .n_threads = 2};
    qmix_session *s;
    ck_assert_int_eq(qmix_session_new(m, &so, &s, &err), 0);
    ck_assert_int_eq(qmix_session_prefill(s, prompt, n_prompt, NULL, &err), 0);
    int V = qmix_model_config(m)->vocab_size;
    for (int i = 0; i < n; i++) {
        out[i] = qmix_argmax(qmix_session_logits(s), V);
        ck_assert_int_eq(qmix_session_decode(s, out[i], &err), 0);
    }
    /* the state after all n fed: the logits of the next position */
    memcpy(logits_after, qmix_session_logits(s), sizeof(float) * (size_t)V);
    qmix_session_free(s);
}

typedef struct collect {
    qmix_sampler *smp;
    int32_t *ids;
    int n, max;
} collect;

static int collect_emit(void *user, int32_t id, const float *logits, qmix_err *err)
{
    (void)logits;
    (void)err;
    collect *c = user;
    ck_assert_int_lt(c->n, c->max);
    qmix_sampler_accept(c->smp, id);
    c->ids[c->n++] = id;
    return c->n == c->max;
}

/* Drafts replaced by the true greedy continuation, wrong from the ((pos / 3) % (n + 1))-th on:
 * every number of accepted drafts 0..n occurs. */
typedef struct oracle { const int32_t *truth; int n_truth, n_prompt, V; } oracle;

static void oracle_hook(void *user, int pos, int32_t *drafts, int n, float *q)
{
    oracle *o = user;
    int wrong_from = (pos / 3) % (n + 1);
    for (int i = 0; i < n; i++) {
        int at = pos + 1 + i - o->n_prompt; /* past the known continuation: any token */
        int32_t t = at < o->n_truth ? o->truth[at] : 0;
        drafts[i] = i < wrong_from ? t : (t + 1) % o->V;
        memset(q + (size_t)i * o->V, 0, sizeof(float) * (size_t)o->V);
        q[(size_t)i * o->V + drafts[i]] = 1;
    }
}

static double rel_error(const float *a, const float *b, int n)
{
    double worst = 0, scale = 1;
    for (int i = 0; i < n; i++) {
        if (fabs(a[i] - b[i]) > worst) worst = fabs(a[i] - b[i]);
        if (fabs(b[i]) > scale) scale = fabs(b[i]);
    }
    return worst / scale;
}

/* Speculative greedy with draft n (rollback mode, optional oracle): same tokens as plain greedy,
 * the history it reports is what was fed, and the state it leaves gives the same next logits. */
static void check_greedy(qmix_model *m, const char *path, const int32_t *prompt, int n_prompt,
                         const int32_t *want, const float *want_after, int n_draft,
                         qmix_spec_rollback mode, int use_oracle)
{
    qmix_err err;
    const qmix_config *c = qmix_model_config(m);
    int V = c->vocab_size;
    qmix_session_opts so = {.max_ctx = CTX, .n_threads = 2};
    qmix_session *s;
    qmix_spec *sp;
    ck_assert_int_eq(qmix_session_new(m, &so, &s, &err), 0);
    ck_assert_msg(qmix_spec_new(s, n_draft, &sp, &err) == 0, "%s: %s", path, err.msg);
    qmix_spec_set_rollback(sp, mode);
    oracle o = {want, N_GEN + 1, n_prompt, V};
    if (use_oracle) qmix_spec_set_draft_hook(sp, oracle_hook, &o);
    qmix_sampling g = qmix_sampling_greedy();
    qmix_sampler *smp = qmix_sampler_new(&g, V);
    int32_t got[N_GEN + 1], history[CTX];
    int n_history = 0;
    collect col = {smp, got, 0, N_GEN + 1};
    ck_assert_int_eq(qmix_spec_prefill(sp, prompt, n_prompt, &err), 0);
    ck_assert_int_eq(qmix_spec_generate(sp, smp, collect_emit, &col, NULL, history, &n_history,
                                        &err), 0);
    ck_assert_int_eq(col.n, N_GEN + 1);
    for (int i = 0; i < N_GEN + 1; i++)
        ck_assert_msg(got[i] == want[i], "%s draft %d mode %d oracle %d: token %d is %d, plain "
                      "greedy %d", path, n_draft, mode, use_oracle, i, got[i], want[i]);
    /* fed: every generated token but the last */
    ck_assert_int_eq(n_history, N_GEN);
    ck_assert_int_eq(qmix_session_pos(s), n_prompt + N_GEN);
    ck_assert(!memcmp(history, got, sizeof(int32_t) * N_GEN));
    /* the recurrent state and KV cache are those of plain decoding: feed the last token */
    ck_assert_int_eq(qmix_session_decode(s, got[N_GEN], &err), 0);
    double e = rel_error(qmix_session_logits(s), want_after, V);
    ck_assert_msg(e < 1e-4, "%s draft %d mode %d: logits after differ by %g", path, n_draft, mode,
                  e);
    const qmix_spec_stats *st = qmix_spec_get_stats(sp);
    ck_assert_int_eq(st->kept, N_GEN);
    ck_assert_int_le(st->accepted, st->drafted);
    if (use_oracle) {
        ck_assert_msg(st->accepted > 0 && st->rollbacks > 0, "%s: oracle accepted %lld, rolled "
                      "back %lld", path, (long long)st->accepted, (long long)st->rollbacks);
    }
    qmix_sampler_free(smp);
    qmix_spec_free(sp);
    qmix_session_free(s);
}

START_TEST(greedy_equals_plain)
{
    const char *path = models[_i];
    qmix_model *m;
    qmix_err err;
    ck_assert_msg(qmix_model_open(path, &m, &err) == 0, "%s: %s", path, err.msg);
    ck_assert_msg(m->mtp != NULL, "%s: no MTP block bound", path);
    const qmix_config *c = qmix_model_config(m);
    int V = c->vocab_size;
    int32_t prompt[9], want[N_GEN + 1];
    tu_rng_seed(77 + (uint64_t)_i);
    for (int i = 0; i < 9; i++) prompt[i] = (int32_t)(tu_rng_u64() % (uint64_t)V);
    float *after = malloc(sizeof(float) * (size_t)V);
    plain_greedy(m, prompt, 9, N_GEN + 1, want, after);
    static const int drafts[] = {1, 2, 3, 5};
    for (size_t k = 0; k < sizeof drafts / sizeof drafts[0]; k++)
        check_greedy(m, path, prompt, 9, want, after, drafts[k], QMIX_SPEC_SNAPSHOT, 0);
    check_greedy(m, path, prompt, 9, want, after, 3, QMIX_SPEC_RECOMPUTE, 0);
    check_greedy(m, path, prompt, 9, want, after, 4, QMIX_SPEC_SNAPSHOT, 1);
    check_greedy(m, path, prompt, 9, want, after, 4, QMIX_SPEC_RECOMPUTE, 1);
    /* 9 rows: past the chunked delta rule's threshold, still token by token */
    check_greedy(m, path, prompt, 9, want, after, QMIX_SPEC_MAX_DRAFT, QMIX_SPEC_SNAPSHOT, 1);
    check_greedy(m, path, prompt, 9, want, after, QMIX_SPEC_MAX_DRAFT, QMIX_SPEC_RECOMPUTE, 1);
    free(after);
    qmix_model_close(m);
}
END_TEST

/* The demo model's MTP head is trained: on held-out text it predicts the token after next far
 * better than chance and than the unigram distribution (ln 914.8 = 6.82 nats), close to its
 * training loss (4.72). A wrong wiring (pre-norm hidden, swapped concat halves, a misplaced
 * position) costs nats. */
START_TEST(demo_mtp_predicts)
{
    qmix_model *m;
    qmix_err err;
    ck_assert_int_eq(qmix_model_open("testdata/demo", &m, &err), 0);
    qmix_tokenizer *tok;
    ck_assert_int_eq(qmix_tok_load("testdata/demo", &tok, &err), 0);
    size_t len;
    char *text = tu_read("testdata/demo/heldout.txt", &len);
    int32_t *ids;
    size_t n_ids;
    ck_assert_int_eq(qmix_tok_encode(tok, text, len < 6000 ? len : 6000, 0, &ids, &n_ids, &err), 0);
    int n = n_ids < 512 ? (int)n_ids : 512;
    ck_assert_int_ge(n, 256);
    free(text);
    qmix_tok_free(tok);
    const qmix_config *c = qmix_model_config(m);
    int V = c->vocab_size, D = c->hidden_size;
    qmix_session_opts so = {.max_ctx = 512, .n_threads = 2};
    qmix_session *s;
    ck_assert_int_eq(qmix_session_new(m, &so, &s, &err), 0);
    float *all = malloc(sizeof(float) * (size_t)n * (size_t)V);
    float *hid = malloc(sizeof(float) * (size_t)n * (size_t)D);
    ck_assert_int_eq(qmix_session_prefill(s, ids, n, all, &err), 0);
    memcpy(hid, s->h, sizeof(float) * (size_t)n * (size_t)D);
    qmix_seq *mseq;
    ck_assert_int_eq(qmix_mtp_seq_new(m, 512, &mseq, &err), 0);
    float *cat = malloc(sizeof(float) * 2 * (size_t)D), *out = malloc(sizeof(float) * (size_t)D);
    float *logits = malloc(sizeof(float) * (size_t)V);
    double loss = 0, trunk_loss = 0;
    int top1 = 0, scored = 0;
    for (int t = 0; t + 2 < n; t++) { /* pair (h_t, token t+1) predicts token t+2 */
        qmix_mtp_forward(s, mseq, hid + (size_t)t * D, &ids[t + 1], 1, cat, out, logits);
        double mx = logits[0], sum = 0;
        for (int v = 1; v < V; v++) mx = logits[v] > mx ? logits[v] : mx;
        for (int v = 0; v < V; v++) sum += exp(logits[v] - mx);
        loss += -(logits[ids[t + 2]] - mx - log(sum));
        top1 += qmix_argmax(logits, V) == ids[t + 2];
        const float *tl = all + (size_t)(t + 1) * V; /* the trunk's own next-token loss there */
        mx = tl[0];
        sum = 0;
        for (int v = 1; v < V; v++) mx = tl[v] > mx ? tl[v] : mx;
        for (int v = 0; v < V; v++) sum += exp(tl[v] - mx);
        trunk_loss += -(tl[ids[t + 2]] - mx - log(sum));
        scored++;
    }
    loss /= scored;
    trunk_loss /= scored;
    printf("info: demo MTP on %d held-out tokens: loss %.3f nats (trunk next-token %.3f), top-1 "
           "%d\n", scored, loss, trunk_loss, top1);
    ck_assert_int_eq(mseq->pos, scored);
    ck_assert_msg(loss < 5.9, "MTP loss %.3f: the block is wired wrong", loss);
    ck_assert_msg(loss > trunk_loss - 0.5, "MTP loss %.3f below the trunk's %.3f?", loss, trunk_loss);
    free(cat);
    free(out);
    free(logits);
    free(all);
    free(hid);
    free(ids);
    qmix_seq_free(mseq);
    qmix_session_free(s);
    qmix_model_close(m);
}
END_TEST

typedef struct text_sink { char buf[8192]; size_t len; } text_sink;

static void sink_text(void *user, const char *text, size_t len)
{
    text_sink *t = user;
    if (t->len + len < sizeof t->buf) {
        memcpy(t->buf + t->len, text, len);
        t->len += len;
        t->buf[t->len] = 0;
    }
}

/* A conversation through qmix_generate: the second turn extends the first's history, so the
 * session (and the MTP block's cache) resume instead of starting over; text equals plain. */
START_TEST(resume_equals_plain)
{
    qmix_model *m;
    qmix_tokenizer *tok;
    qmix_err err;
    ck_assert_int_eq(qmix_model_open("testdata/demo", &m, &err), 0);
    ck_assert_int_eq(qmix_tok_load("testdata/demo", &tok, &err), 0);
    int V = qmix_model_config(m)->vocab_size;
    text_sink out[2][2];
    int reused[2][2];
    for (int mode = 0; mode < 2; mode++) {
        qmix_session_opts so = {.max_ctx = 256, .n_threads = 2};
        qmix_session *s;
        qmix_spec *sp = NULL;
        ck_assert_int_eq(qmix_session_new(m, &so, &s, &err), 0);
        if (mode) ck_assert_int_eq(qmix_spec_new(s, 3, &sp, &err), 0);
        qmix_sampling g = qmix_sampling_greedy();
        qmix_sampler *smp = qmix_sampler_new(&g, V);
        int32_t history[256], prompt[256];
        int n_history = 0;
        const char *turns[2] = {"The package manager", " Python is a language that"};
        int n_prompt = 0;
        for (int turn = 0; turn < 2; turn++) {
            int32_t *ids;
            size_t n_ids;
            ck_assert_int_eq(qmix_tok_encode(tok, turns[turn], strlen(turns[turn]), 0, &ids, &n_ids,
                                             &err), 0);
            if (turn) { /* the conversation so far, then the new text */
                memcpy(prompt, history, sizeof(int32_t) * (size_t)n_history);
                n_prompt = n_history;
            }
            memcpy(prompt + n_prompt, ids, sizeof(int32_t) * n_ids);
            n_prompt += (int)n_ids;
            free(ids);
            memset(&out[mode][turn], 0, sizeof out[mode][turn]);
            qmix_gen_opts go = {.max_tokens = 40, .spec = sp};
            qmix_gen_result res;
            qmix_sampler_reset(smp);
            ck_assert_int_eq(qmix_generate(s, smp, tok, prompt, n_prompt, history, &n_history, &go,
                                           sink_text, &out[mode][turn], &res, &err), 0);
            reused[mode][turn] = res.n_prompt_reused;
        }
        qmix_sampler_free(smp);
        qmix_spec_free(sp);
        qmix_session_free(s);
    }
    for (int turn = 0; turn < 2; turn++) {
        ck_assert_str_eq(out[1][turn].buf, out[0][turn].buf);
        ck_assert_int_eq(reused[1][turn], reused[0][turn]);
    }
    ck_assert_int_gt(reused[1][1], 0); /* the second turn did resume */
    qmix_tok_free(tok);
    qmix_model_close(m);
}
END_TEST

/* Pearson's chi-square of counts[n] against probabilities p[n] (cells with p = 0 must be empty:
 * any count there returns infinity). */
static double chi_square(const long *counts, const double *p, int n, long total)
{
    double x2 = 0;
    for (int i = 0; i < n; i++) {
        if (p[i] <= 0) {
            if (counts[i]) return INFINITY;
            continue;
        }
        double e = p[i] * (double)total;
        x2 += (counts[i] - e) * (counts[i] - e) / e;
    }
    return x2;
}

/* The acceptance rule on a small vocabulary: drafts from q, the rule's output counted; it must
 * match p (chi-square below the 0.1 % critical value), while two plausible wrong rules — keeping
 * every draft, or resampling from p instead of the residual — must be rejected by the same
 * statistic. p and q disagree on purpose, with a token only p allows and one only q allows. */
START_TEST(accept_rule_keeps_target)
{
    enum { V = 6 };
    const float p[V] = {0.30f, 0.25f, 0.20f, 0.15f, 0.10f, 0.0f};
    const float q[V] = {0.05f, 0.40f, 0.10f, 0.0f, 0.25f, 0.20f};
    const double pd[V] = {0.30, 0.25, 0.20, 0.15, 0.10, 0.0};
    const long trials = 200000;
    const double critical = 20.52; /* chi-square, 5 degrees of freedom, p = 0.001 */
    qmix_sampling sp = qmix_sampling_greedy();
    sp.temperature = 1;
    sp.seed = 12345;
    qmix_sampler *smp = qmix_sampler_new(&sp, V);
    long right[V] = {0}, keep_all[V] = {0}, from_p[V] = {0}, accepted = 0;
    for (long t = 0; t < trials; t++) {
        int32_t d = qmix_spec_draw(smp, q, V);
        ck_assert(q[d] > 0);
        int ok;
        int32_t y = qmix_spec_accept(smp, p, q, V, d, &ok);
        ck_assert(ok ? y == d : 1);
        accepted += ok;
        right[y]++;
        keep_all[d]++;
        /* wrong: on rejection draw from p itself */
        from_p[ok ? d : qmix_spec_draw(smp, p, V)]++;
    }
    double x_right = chi_square(right, pd, V, trials);
    double x_keep = chi_square(keep_all, pd, V, trials);
    double x_from_p = chi_square(from_p, pd, V, trials);
    double want_accept = 0; /* sum_v min(p, q) */
    for (int v = 0; v < V; v++) want_accept += fmin(pd[v], q[v]);
    printf("info: acceptance rule: chi2 %.2f (critical %.2f); keep-all %.1f; resample-from-p "
           "%.1f; acceptance %.4f (expected %.4f)\n", x_right, critical, x_keep, x_from_p,
           (double)accepted / trials, want_accept);
    ck_assert_msg(x_right < critical, "speculative sampling does not keep p: chi2 %.2f", x_right);
    ck_assert_msg(x_keep > critical, "control not rejected: %.2f", x_keep);
    ck_assert_msg(x_from_p > critical, "control not rejected: %.2f", x_from_p);
    ck_assert(fabs((double)accepted / trials - want_accept) < 0.005);
    qmix_sampler_free(smp);
}
END_TEST

/* End to end on the demo model: with temperature 1 and top-k 3, the first two generated tokens
 * (the second chosen by the MTP draft's acceptance or the residual) follow the model's joint
 * distribution p(x) p(y | x), computed exactly with plain forwards. */
START_TEST(sampling_keeps_target_end_to_end)
{
    if (tu_light_skip("end-to-end speculative sampling")) return;
    qmix_model *m;
    qmix_err err;
    ck_assert_int_eq(qmix_model_open("testdata/demo", &m, &err), 0);
    int V = qmix_model_config(m)->vocab_size;
    const int32_t prompt[4] = {319, 507, 1936, 298}; /* "The package manager is" */
    for (int i = 0; i < 4; i++) ck_assert_int_lt(prompt[i], V);
    qmix_sampling sp = qmix_sampling_greedy();
    sp.temperature = 1;
    sp.top_k = 3;
    qmix_session_opts so = {.max_ctx = 32, .n_threads = 2};
    qmix_session *s, *plain;
    ck_assert_int_eq(qmix_session_new(m, &so, &s, &err), 0);
    ck_assert_int_eq(qmix_session_new(m, &so, &plain, &err), 0);
    /* exact joint distribution over the 3 x 3 cells */
    qmix_sampler *ref = qmix_sampler_new(&sp, V);
    float *p0 = malloc(sizeof(float) * (size_t)V), *p1 = malloc(sizeof(float) * (size_t)V);
    ck_assert_int_eq(qmix_session_prefill(plain, prompt, 4, NULL, &err), 0);
    qmix_sampler_distribution(ref, qmix_session_logits(plain), p0);
    int32_t first[3], second[3][3];
    double joint[9];
    int nf = 0;
    for (int v = 0; v < V; v++)
        if (p0[v] > 0) first[nf++] = v;
    ck_assert_int_eq(nf, 3);
    for (int a = 0; a < 3; a++) {
        qmix_session_reset(plain);
        ck_assert_int_eq(qmix_session_prefill(plain, prompt, 4, NULL, &err), 0);
        ck_assert_int_eq(qmix_session_decode(plain, first[a], &err), 0);
        qmix_sampler_distribution(ref, qmix_session_logits(plain), p1);
        int ns = 0;
        for (int v = 0; v < V; v++)
            if (p1[v] > 0) {
                second[a][ns] = v;
                joint[a * 3 + ns++] = (double)p0[first[a]] * p1[v];
            }
        ck_assert_int_eq(ns, 3);
    }
    /* speculative draws */
    qmix_spec *spec;
    ck_assert_int_eq(qmix_spec_new(s, 2, &spec, &err), 0);
    long counts[9] = {0};
    const long trials = 4000;
    for (long t = 0; t < trials; t++) {
        sp.seed = (uint64_t)t + 1;
        qmix_sampler *smp = qmix_sampler_new(&sp, V);
        int32_t got[2];
        collect col = {smp, got, 0, 2};
        qmix_spec_reset(spec);
        ck_assert_int_eq(qmix_spec_prefill(spec, prompt, 4, &err), 0);
        ck_assert_int_eq(qmix_spec_generate(spec, smp, collect_emit, &col, NULL, NULL, NULL, &err),
                         0);
        int cell = -1;
        for (int a = 0; a < 3; a++)
            for (int b = 0; b < 3; b++)
                if (got[0] == first[a] && got[1] == second[a][b]) cell = a * 3 + b;
        ck_assert_msg(cell >= 0, "draw (%d, %d) outside the target's support", got[0], got[1]);
        counts[cell]++;
        qmix_sampler_free(smp);
    }
    const qmix_spec_stats *st = qmix_spec_get_stats(spec);
    double x2 = chi_square(counts, joint, 9, trials);
    printf("info: end-to-end speculative sampling: chi2 %.2f over 9 cells (critical 26.12), "
           "acceptance %.3f\n", x2, (double)st->accepted / (double)st->drafted);
    ck_assert_msg(x2 < 26.12, "speculative sampling is off the target: chi2 %.2f", x2);
    ck_assert_int_gt(st->accepted, 0);
    ck_assert_int_lt(st->accepted, st->drafted);
    free(p0);
    free(p1);
    qmix_sampler_free(ref);
    qmix_spec_free(spec);
    qmix_session_free(s);
    qmix_session_free(plain);
    qmix_model_close(m);
}
END_TEST

/* GGUF carries the MTP block as llama.cpp's converter writes it (block n_layers with nextn.*):
 * qmix's GGUF writer emits it (kept 16-bit under a quantized --type) and the loader binds it, so
 * the block computes what the Hugging Face checkpoint's does and drafts the same tokens. */
START_TEST(gguf_keeps_mtp)
{
    char *dir = tu_tmpdir();
    char args[1200], f32[1100], q8[1100];
    snprintf(f32, sizeof f32, "%s/demo-f32.gguf", dir);
    snprintf(q8, sizeof q8, "%s/demo-q8.gguf", dir);
    snprintf(args, sizeof args, "convert testdata/demo '%s' --to gguf --type f32", f32);
    tu_expect(args, 0, "\nmtp "); /* the summary's role table lists the MTP block */
    snprintf(args, sizeof args, "convert testdata/demo '%s' --to gguf --type q8_0", q8);
    tu_expect(args, 0, NULL);
    qmix_model *hf, *gg, *gq;
    qmix_err err;
    ck_assert_int_eq(qmix_model_open("testdata/demo", &hf, &err), 0);
    ck_assert_msg(qmix_model_open(f32, &gg, &err) == 0, "%s", err.msg);
    ck_assert_msg(qmix_model_open(q8, &gq, &err) == 0, "%s", err.msg);
    ck_assert_ptr_nonnull(gg->mtp);
    ck_assert_ptr_nonnull(gq->mtp);
    ck_assert_int_eq(gq->mtp->fc.dtype, QMIX_BF16); /* kept 16-bit */
    ck_assert_int_eq(gq->mtp->layer.experts[3].down.dtype, QMIX_BF16);
    ck_assert_int_eq(gq->layers[0].experts[0].down.dtype, QMIX_U8); /* the trunk: Q8_0 */
    const qmix_config *c = qmix_model_config(hf);
    int V = c->vocab_size, D = c->hidden_size;
    /* the MTP block's logits for the same pairs, HF vs GGUF f32 */
    qmix_session_opts so = {.max_ctx = 32, .n_threads = 1};
    float *lg[2], *hid = malloc(sizeof(float) * (size_t)D * 8);
    float *cat = malloc(sizeof(float) * 2 * (size_t)D), *out = malloc(sizeof(float) * (size_t)D);
    qmix_model *pair[2] = {hf, gg};
    const int32_t toks[8] = {319, 507, 1936, 298, 262, 763, 558, 44};
    for (int k = 0; k < 2; k++) {
        qmix_session *s;
        qmix_seq *mseq;
        ck_assert_int_eq(qmix_session_new(pair[k], &so, &s, &err), 0);
        ck_assert_int_eq(qmix_mtp_seq_new(pair[k], 32, &mseq, &err), 0);
        float *all = malloc(sizeof(float) * 8 * (size_t)V);
        ck_assert_int_eq(qmix_session_prefill(s, toks, 8, all, &err), 0);
        memcpy(hid, s->h, sizeof(float) * 8 * (size_t)D);
        lg[k] = malloc(sizeof(float) * 7 * (size_t)V);
        for (int t = 0; t < 7; t++)
            qmix_mtp_forward(s, mseq, hid + t * D, &toks[t + 1], 1, cat, out, lg[k] + t * V);
        free(all);
        qmix_seq_free(mseq);
        qmix_session_free(s);
    }
    double e = rel_error(lg[1], lg[0], 7 * V);
    ck_assert_msg(e < 1e-4, "GGUF MTP logits differ from HF by %g", e);
    /* the same tokens and the same drafts accepted */
    tu_run_result a = tu_run("generate testdata/demo --tokens '319 507 1936' -n 40 --draft 2");
    snprintf(args, sizeof args, "generate '%s' --tokens '319 507 1936' -n 40 --draft 2", f32);
    tu_run_result b = tu_run(args);
    ck_assert_int_eq(a.status, 0);
    ck_assert_int_eq(b.status, 0);
    ck_assert_str_eq(a.out, b.out);
    char *sa = strstr(a.err, "mtp: "), *sb = strstr(b.err, "mtp: ");
    ck_assert(sa && sb);
    char *ea = strstr(sa, "tokens per verification"), *eb = strstr(sb, "tokens per verification");
    ck_assert(ea && eb && ea - sa == eb - sb && !memcmp(sa, sb, (size_t)(ea - sa)));
    ck_assert(!strstr(sa, "acceptance 0.0 %"));
    tu_run_free(&a);
    tu_run_free(&b);
    free(lg[0]);
    free(lg[1]);
    free(hid);
    free(cat);
    free(out);
    qmix_model_close(hf);
    qmix_model_close(gg);
    qmix_model_close(gq);
    tu_rmdir(dir);
}
END_TEST

/* A GPTQ checkpoint (vLLM's layout) keeps the MTP block 16-bit beside the quantized experts, and
 * --mtp on it gives plain greedy's tokens (float activations everywhere: QMIX_ACT_INT8=0, so
 * single rows and verified batches run the same arithmetic). */
START_TEST(gptq_keeps_mtp)
{
    char *dir = tu_tmpdir();
    char args[1200], out[1100];
    snprintf(out, sizeof out, "%s/gptq", dir);
    snprintf(args, sizeof args, "quantize testdata/demo '%s' --recipe experts-4 --format gptq", out);
    tu_expect(args, 0, NULL);
    qmix_model *m;
    qmix_err err;
    ck_assert_msg(qmix_model_open(out, &m, &err) == 0, "%s", err.msg);
    ck_assert_ptr_nonnull(m->mtp);
    ck_assert_int_eq(m->mtp->fc.dtype, QMIX_BF16);
    ck_assert_int_eq(m->mtp->layer.experts[0].gate.dtype, QMIX_BF16);
    ck_assert_int_eq(m->layers[0].experts[0].gate.dtype, QMIX_U32); /* repacked GPTQ codes */
    qmix_model_close(m);
    setenv("QMIX_ACT_INT8", "0", 1);
    snprintf(args, sizeof args, "generate '%s' --tokens '319 507 1936' -n 40", out);
    tu_run_result a = tu_run(args);
    snprintf(args, sizeof args, "generate '%s' --tokens '319 507 1936' -n 40 --draft 2", out);
    tu_run_result b = tu_run(args);
    unsetenv("QMIX_ACT_INT8");
    ck_assert_int_eq(a.status, 0);
    ck_assert_int_eq(b.status, 0);
    ck_assert_str_eq(a.out, b.out);
    ck_assert_ptr_nonnull(strstr(b.err, "tokens per verification"));
    ck_assert_ptr_null(strstr(b.err, "acceptance 0.0 %"));
    tu_run_free(&a);
    tu_run_free(&b);
    tu_rmdir(dir);
}
END_TEST

START_TEST(errors)
{
    qmix_model *m;
    qmix_err err;
    ck_assert_int_eq(qmix_model_open(models[0], &m, &err), 0);
    qmix_session_opts so = {.max_ctx = 16, .n_threads = 1};
    qmix_session *s;
    qmix_spec *sp;
    ck_assert_int_eq(qmix_session_new(m, &so, &s, &err), 0);
    ck_assert_int_eq(qmix_spec_new(s, 0, &sp, &err), -1);
    ck_assert_ptr_nonnull(strstr(err.msg, "draft length"));
    ck_assert_int_eq(qmix_spec_new(s, QMIX_SPEC_MAX_DRAFT + 1, &sp, &err), -1);
    ck_assert_int_eq(qmix_spec_new(s, 2, &sp, &err), 0);
    int32_t bad = qmix_model_config(m)->vocab_size;
    ck_assert_int_eq(qmix_spec_prefill(sp, &bad, 1, &err), -1);
    ck_assert_ptr_nonnull(strstr(err.msg, "outside the vocabulary"));
    int32_t many[17] = {0};
    ck_assert_int_eq(qmix_spec_prefill(sp, many, 17, &err), -1);
    ck_assert_ptr_nonnull(strstr(err.msg, "context full"));
    /* generating to the end of the context stops there (greedy, 16 positions) */
    ck_assert_int_eq(qmix_spec_prefill(sp, many, 4, &err), 0);
    qmix_sampling g = qmix_sampling_greedy();
    qmix_sampler *smp = qmix_sampler_new(&g, qmix_model_config(m)->vocab_size);
    int32_t got[64];
    collect col = {smp, got, 0, 64};
    ck_assert_int_eq(qmix_spec_generate(sp, smp, collect_emit, &col, NULL, NULL, NULL, &err), 0);
    ck_assert_int_eq(qmix_session_pos(s), 16);
    ck_assert_int_eq(col.n, 13); /* 12 fed after the prompt, the 13th has no room */
    qmix_sampler_free(smp);
    qmix_spec_free(sp);
    qmix_session_free(s);
    qmix_model_close(m);

    /* CLI: flags, and a checkpoint without an MTP block */
    tu_expect("generate testdata/demo --tokens 1 --draft 0", 2, "--draft");
    tu_expect("generate testdata/demo --tokens 1 --draft 99", 2, "--draft");
    char *dir = tu_tmpdir();
    char args[1200];
    snprintf(args, sizeof args, "synth --like tiny --no-mtp --layers 2 '%s/m'", dir);
    tu_expect(args, 0, NULL);
    snprintf(args, sizeof args, "generate '%s/m' --tokens '1 2' -n 4 --mtp", dir);
    tu_expect(args, 1, "no MTP block");
    tu_rmdir(dir);
    tu_expect("generate testdata/demo --tokens '1 2 3' -n 8 --mtp", 0, "tokens per verification");
}
END_TEST

static Suite *make_suite(void)
{
    discover();
    Suite *s = suite_create("mtp");
    TCase *tc = tcase_create("mtp");
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, greedy_equals_plain, 0, n_models);
    tcase_add_test(tc, demo_mtp_predicts);
    tcase_add_test(tc, resume_equals_plain);
    tcase_add_test(tc, accept_rule_keeps_target);
    tcase_add_test(tc, sampling_keeps_target_end_to_end);
    tcase_add_test(tc, gguf_keeps_mtp);
    tcase_add_test(tc, gptq_keeps_mtp);
    tcase_add_test(tc, errors);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(make_suite)
