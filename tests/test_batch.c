/* Continuous batching's forward pass: several sequences at different positions in one
 * qmix_forward_batch give the logits each gives alone (float32 tolerance), on every fixture and
 * the demo model, with every KV cache type; their states stay apart; and a sequence resumed from
 * a snapshot (the server's prefix cache) continues as a cold run of the whole prompt does. */
#include <dirent.h>
#include <math.h>
#include <sys/stat.h>

#include "kernels/kernels.h"
#include "model/forward.h"
#include "qmix.h"
#include "runtime/session.h"
#include "testutil.h"

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) ck_abort_msg(__VA_ARGS__);                                                    \
    } while (0)

#define REL_TOL 1e-4 /* max |Δlogit| relative to the largest |logit| of the row (at least 1) */
#define CTX 256
#define N_SEQS 5

/* The fixtures (testdata/fixtures/<name>/config.json) and the demo model. */
static char models[16][320];
static int n_models;

static void discover(void) { n_models = tu_model_dirs(models, 16); }

/* Every loop test runs each model with each KV cache type: index i is model i / N_KV. */
static const qmix_kv_type kv_types[] = {QMIX_KV_F32, QMIX_KV_F16, QMIX_KV_Q8_0, QMIX_KV_Q4_0};
#define N_KV 4

static double row_error(const float *got, const float *want, int vocab)
{
    double worst = 0, scale = 1;
    for (int v = 0; v < vocab; v++) {
        double d = fabs((double)got[v] - want[v]);
        if (d > worst) worst = d;
        if (fabs(want[v]) > scale) scale = fabs(want[v]);
    }
    return worst / scale;
}

/* What each sequence does: history tokens fed first, then a step of new tokens. Mixed on
 * purpose: decodes at different positions, prefills from 0 and from the middle, one long
 * enough for the chunked delta rule, one across a GDN chunk boundary. */
static const int history_len[N_SEQS] = {37, 0, 5, 64, 100};
static const int step_len[N_SEQS] = {1, 20, 1, 9, 70};

/* Runs the scenario on the model at path: alone in sessions, then together. */
static void check_batch(const char *path, uint64_t seed, qmix_kv_type kv)
{
    qmix_model *m;
    qmix_err err;
    ck_assert_msg(qmix_model_open(path, &m, &err) == 0, "%s: %s", path, err.msg);
    const qmix_config *c = qmix_model_config(m);
    int V = c->vocab_size;
    tu_rng_seed(seed);
    int32_t *hist[N_SEQS], *steps[N_SEQS];
    for (int i = 0; i < N_SEQS; i++) {
        hist[i] = malloc(sizeof(int32_t) * (size_t)(history_len[i] + 1));
        steps[i] = malloc(sizeof(int32_t) * (size_t)(step_len[i] + 4));
        for (int t = 0; t < history_len[i]; t++) hist[i][t] = (int32_t)(tu_rng_u64() % (uint64_t)V);
        for (int t = 0; t < step_len[i] + 4; t++) steps[i][t] = (int32_t)(tu_rng_u64() % (uint64_t)V);
    }

    /* alone: each sequence in its own session; the step's logits of every token, then three
     * decodes */
    qmix_session_opts so = {.max_ctx = CTX, .n_threads = 2, .kv_type = kv};
    float *alone_step[N_SEQS], *alone_decode[N_SEQS];
    for (int i = 0; i < N_SEQS; i++) {
        qmix_session *s;
        ck_assert_int_eq(qmix_session_new(m, &so, &s, &err), 0);
        if (history_len[i]) ck_assert_int_eq(qmix_session_prefill(s, hist[i], history_len[i], NULL, &err), 0);
        alone_step[i] = malloc(sizeof(float) * (size_t)step_len[i] * (size_t)V);
        alone_decode[i] = malloc(sizeof(float) * 3 * (size_t)V);
        ck_assert_int_eq(qmix_session_prefill(s, steps[i], step_len[i], alone_step[i], &err), 0);
        for (int d = 0; d < 3; d++) {
            ck_assert_int_eq(qmix_session_decode(s, steps[i][step_len[i] + d], &err), 0);
            memcpy(alone_decode[i] + (size_t)d * V, qmix_session_logits(s), sizeof(float) * (size_t)V);
        }
        qmix_session_free(s);
    }

    /* together: one shared session; the histories in one batch (the empty one left out), then
     * every step in one batch, then three batched decodes */
    qmix_session *shared;
    ck_assert_int_eq(qmix_session_new_shared(m, &so, &shared, &err), 0);
    qmix_seq *seqs[N_SEQS], *batch_seqs[N_SEQS];
    int n[N_SEQS], rows = 0, n_batch = 0;
    int32_t tokens[512];
    for (int i = 0; i < N_SEQS; i++) {
        ck_assert_int_eq(qmix_seq_new(c, CTX, kv, &seqs[i], &err), 0);
        if (!history_len[i]) continue;
        batch_seqs[n_batch] = seqs[i];
        n[n_batch++] = history_len[i];
        memcpy(tokens + rows, hist[i], sizeof(int32_t) * (size_t)history_len[i]);
        rows += history_len[i];
    }
    float *last = malloc(sizeof(float) * N_SEQS * (size_t)V);
    qmix_forward_batch(shared, batch_seqs, n, n_batch, tokens, last, NULL);
    for (int i = 0; i < N_SEQS; i++) ck_assert_int_eq(seqs[i]->pos, history_len[i]);

    rows = 0;
    for (int i = 0; i < N_SEQS; i++) {
        n[i] = step_len[i];
        memcpy(tokens + rows, steps[i], sizeof(int32_t) * (size_t)step_len[i]);
        rows += step_len[i];
    }
    float *all = malloc(sizeof(float) * (size_t)rows * (size_t)V);
    qmix_forward_batch(shared, seqs, n, N_SEQS, tokens, last, all);
    for (int i = 0, row = 0; i < N_SEQS; row += step_len[i], i++) {
        for (int t = 0; t < step_len[i]; t++) {
            double e = row_error(all + (size_t)(row + t) * V, alone_step[i] + (size_t)t * V, V);
            CHECK(e <= REL_TOL, "%s: sequence %d token %d of the step: relative error %.3g", path,
                  i, t, e);
        }
        /* the last-token logits equal that row of all_logits exactly */
        CHECK(!memcmp(last + (size_t)i * V, all + (size_t)(row + step_len[i] - 1) * V,
                      sizeof(float) * (size_t)V), "%s: sequence %d: last logits differ", path, i);
        ck_assert_int_eq(seqs[i]->pos, history_len[i] + step_len[i]);
    }
    for (int d = 0; d < 3; d++) {
        for (int i = 0; i < N_SEQS; i++) {
            n[i] = 1;
            tokens[i] = steps[i][step_len[i] + d];
        }
        qmix_forward_batch(shared, seqs, n, N_SEQS, tokens, last, NULL);
        for (int i = 0; i < N_SEQS; i++) {
            double e = row_error(last + (size_t)i * V, alone_decode[i] + (size_t)d * V, V);
            CHECK(e <= REL_TOL, "%s: sequence %d decode %d: relative error %.3g", path, i, d, e);
        }
    }
    printf("info: %s: %d sequences batched = alone (%s KV cache)\n", path, N_SEQS,
           qmix_kv_type_name(kv));

    for (int i = 0; i < N_SEQS; i++) {
        qmix_seq_free(seqs[i]);
        free(hist[i]);
        free(steps[i]);
        free(alone_step[i]);
        free(alone_decode[i]);
    }
    free(last);
    free(all);
    qmix_session_free(shared);
    qmix_model_close(m);
}

START_TEST(batch_equals_alone)
{
    check_batch(models[_i / N_KV], 42 + (uint64_t)_i, kv_types[_i % N_KV]);
}
END_TEST

/* The same with 4-bit weights (the demo model quantized uniform-4), whose matmuls take other
 * kernels. With int8 activations (the default on AVX-512 VNNI) a single row is computed with
 * int8-quantized activations and a batch with float ones, so a row's result depends on its
 * batch at that noise level (~1e-2): batch invariance holds on the float path only. */
START_TEST(quantized_batch_equals_alone)
{
    char *dir = tu_tmpdir(), args[1200], out[1100];
    snprintf(out, sizeof out, "%s/demo-u4", dir);
    snprintf(args, sizeof args, "quantize testdata/demo %s --recipe uniform-4", out);
    tu_expect(args, 0, NULL);
    qk_set_act_int8(0);
    check_batch(out, 99, QMIX_KV_F32);
    check_batch(out, 99, QMIX_KV_Q4_0);
    tu_rmdir(dir);
}
END_TEST

/* A sequence restored from a snapshot taken at a prefix continues exactly as the sequence it was
 * taken from, and as a cold run over the whole prompt up to float tolerance; restoring into a
 * sequence that held something else leaves nothing of that behind. */
START_TEST(snapshot_resume)
{
    const char *path = models[_i / N_KV];
    qmix_kv_type kv = kv_types[_i % N_KV];
    qmix_model *m;
    qmix_err err;
    ck_assert_int_eq(qmix_model_open(path, &m, &err), 0);
    const qmix_config *c = qmix_model_config(m);
    int V = c->vocab_size;
    enum { PREFIX = 30, REST = 12 };
    int32_t prompt[PREFIX + REST], other[50];
    tu_rng_seed(7);
    for (int t = 0; t < PREFIX + REST; t++) prompt[t] = (int32_t)(tu_rng_u64() % (uint64_t)V);
    for (int t = 0; t < 50; t++) other[t] = (int32_t)(tu_rng_u64() % (uint64_t)V);

    qmix_session_opts so = {.max_ctx = CTX, .n_threads = 2};
    qmix_session *shared;
    ck_assert_int_eq(qmix_session_new_shared(m, &so, &shared, &err), 0);
    qmix_seq *a, *b;
    ck_assert_int_eq(qmix_seq_new(c, CTX, kv, &a, &err), 0);
    ck_assert_int_eq(qmix_seq_new(c, CTX, kv, &b, &err), 0);
    float *warm = malloc(sizeof(float) * (size_t)V), *cold = malloc(sizeof(float) * (size_t)V);
    float *from_a = malloc(sizeof(float) * (size_t)V);

    int n = PREFIX;
    qmix_forward_batch(shared, &a, &n, 1, prompt, warm, NULL);
    void *snap = malloc(qmix_seq_snapshot_bytes(c, kv, PREFIX));
    qmix_seq_save(a, c, snap);
    n = REST;
    qmix_forward_batch(shared, &a, &n, 1, prompt + PREFIX, from_a, NULL);

    n = 50; /* b holds another sequence first */
    qmix_forward_batch(shared, &b, &n, 1, other, warm, NULL);
    qmix_seq_restore(b, c, snap, PREFIX);
    ck_assert_int_eq(b->pos, PREFIX);
    n = REST;
    qmix_forward_batch(shared, &b, &n, 1, prompt + PREFIX, warm, NULL);
    ck_assert_msg(!memcmp(warm, from_a, sizeof(float) * (size_t)V),
                  "%s (%s): the restored sequence differs from the one it was saved from", path,
                  qmix_kv_type_name(kv));

    qmix_seq_reset(b, c);
    n = PREFIX + REST;
    qmix_forward_batch(shared, &b, &n, 1, prompt, cold, NULL);
    double e = row_error(warm, cold, V);
    ck_assert_msg(e <= REL_TOL, "%s (%s): resumed vs cold: relative error %.3g", path,
                  qmix_kv_type_name(kv), e);

    /* the size: KV rows grow with the prefix in their stored form (blocks of 32 values with a
     * 2-byte scale when quantized), the recurrent state does not */
    size_t s1 = qmix_seq_snapshot_bytes(c, kv, 1), s2 = qmix_seq_snapshot_bytes(c, kv, 2);
    int n_full = 0;
    for (int i = 0; i < c->n_layers; i++) n_full += c->layer_is_full[i];
    size_t values = (size_t)n_full * 2 * (size_t)c->n_kv_heads * (size_t)c->head_dim;
    size_t want = kv == QMIX_KV_F32    ? values * 4
                  : kv == QMIX_KV_F16  ? values * 2
                  : kv == QMIX_KV_Q8_0 ? values / 32 * (2 + 32)
                                       : values / 32 * (2 + 16);
    ck_assert_uint_eq(s2 - s1, want);
    ck_assert_uint_eq(qmix_seq_snapshot_bytes(c, kv, 0) + 2 * want, s2);
    free(snap);
    free(warm);
    free(cold);
    free(from_a);
    qmix_seq_free(a);
    qmix_seq_free(b);
    qmix_session_free(shared);
    qmix_model_close(m);
}
END_TEST

/* qmix_forward (one sequence) is the one-segment case of the batched pass: same bits. */
START_TEST(single_is_one_segment)
{
    qmix_model *m;
    qmix_err err;
    ck_assert_int_eq(qmix_model_open(models[0], &m, &err), 0);
    const qmix_config *c = qmix_model_config(m);
    int V = c->vocab_size;
    int32_t prompt[24];
    for (int t = 0; t < 24; t++) prompt[t] = (int32_t)((t * 37 + 11) % V);
    qmix_session_opts so = {.max_ctx = CTX, .n_threads = 1};
    qmix_session *s, *shared;
    ck_assert_int_eq(qmix_session_new(m, &so, &s, &err), 0);
    ck_assert_int_eq(qmix_session_new_shared(m, &so, &shared, &err), 0);
    qmix_seq *q;
    ck_assert_int_eq(qmix_seq_new(c, CTX, QMIX_KV_DEFAULT, &q, &err), 0);
    float *logits = malloc(sizeof(float) * (size_t)V);
    ck_assert_int_eq(qmix_session_prefill(s, prompt, 24, NULL, &err), 0);
    int n = 24;
    qmix_forward_batch(shared, &q, &n, 1, prompt, logits, NULL);
    ck_assert(!memcmp(logits, qmix_session_logits(s), sizeof(float) * (size_t)V));
    free(logits);
    qmix_seq_free(q);
    qmix_session_free(s);
    qmix_session_free(shared);
    qmix_model_close(m);
}
END_TEST

static Suite *make_suite(void)
{
    discover();
    Suite *s = suite_create("batch");
    TCase *tc = tcase_create("forward");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, batch_equals_alone, 0, n_models * N_KV);
    tcase_add_loop_test(tc, snapshot_resume, 0, n_models * N_KV);
    tcase_add_test(tc, quantized_batch_equals_alone);
    tcase_add_test(tc, single_is_one_segment);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(make_suite)
