/* Continuous batching's forward pass without the server around it: B sequences, each at the end
 * of its own short prompt, decode together with qmix_forward_batch; the step time gives the
 * aggregate decode tok/s for each B. Each B's figure is the best of several rounds, and the Bs are
 * interleaved round by round, so a machine whose load changes disturbs them alike.
 *   build/bench/batch MODEL [--streams 1,4,16] [--steps 8] [--rounds 3] [--threads N] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "benchutil.h"
#include "model/forward.h"
#include "qmix.h"
#include "runtime/session.h"

#define MAX_STREAMS 32 /* their prompts fill one batch of 512 */
#define PROMPT 16

int main(int argc, char **argv)
{
    const char *path = NULL, *streams_arg = "1,4,16";
    int steps = 8, rounds = 3, threads = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--streams") && i + 1 < argc) streams_arg = argv[++i];
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--rounds") && i + 1 < argc) rounds = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (argv[i][0] != '-' && !path) path = argv[i];
        else {
            fprintf(stderr, "usage: batch MODEL [--streams 1,4,16] [--steps 8] [--rounds 3] "
                            "[--threads N]\n");
            return 2;
        }
    }
    if (!path || steps < 1 || rounds < 1) {
        fprintf(stderr, "usage: batch MODEL [--streams 1,4,16] [--steps 8] [--rounds 3]\n");
        return 2;
    }
    int counts[16], n_counts = 0, max_streams = 1;
    for (const char *p = streams_arg; *p && n_counts < 16;) {
        int n = atoi(p);
        if (n < 1 || n > MAX_STREAMS) {
            fprintf(stderr, "batch: stream counts are 1..%d\n", MAX_STREAMS);
            return 2;
        }
        counts[n_counts++] = n;
        if (n > max_streams) max_streams = n;
        p = strchr(p, ',') ? strchr(p, ',') + 1 : p + strlen(p);
    }
    qmix_model *m;
    qmix_err err;
    if (qmix_model_open(path, &m, &err)) {
        fprintf(stderr, "batch: %s\n", err.msg);
        return 1;
    }
    const qmix_config *c = qmix_model_config(m);
    /* the prompts of all sequences go in one batch: the session's batch (min(ctx, 512)) must
     * hold them */
    int ctx = PROMPT + steps + 8;
    if (ctx < max_streams * PROMPT) ctx = max_streams * PROMPT;
    qmix_session_opts so = {.max_ctx = ctx, .n_threads = threads};
    qmix_session *s;
    qmix_seq *seqs[MAX_STREAMS];
    if (qmix_session_new_shared(m, &so, &s, &err)) {
        fprintf(stderr, "batch: %s\n", err.msg);
        return 1;
    }
    for (int i = 0; i < max_streams; i++)
        if (qmix_seq_new(c, so.max_ctx, so.kv_type, &seqs[i], &err)) {
            fprintf(stderr, "batch: %s\n", err.msg);
            return 1;
        }
    float *logits = malloc(sizeof(float) * (size_t)max_streams * (size_t)c->vocab_size);
    int32_t tokens[MAX_STREAMS * PROMPT];
    int n_tokens[MAX_STREAMS];
    double best[16];
    for (int k = 0; k < n_counts; k++) best[k] = 1e30;
    for (int round = 0; round < rounds; round++)
        for (int k = 0; k < n_counts; k++) {
            int b = counts[k];
            for (int i = 0; i < b; i++) { /* a fresh prompt per sequence, all in one batch */
                qmix_seq_reset(seqs[i], c);
                n_tokens[i] = PROMPT;
                for (int t = 0; t < PROMPT; t++)
                    tokens[i * PROMPT + t] = (int32_t)(next() % (uint64_t)c->vocab_size);
            }
            qmix_forward_batch(s, seqs, n_tokens, b, tokens, logits, NULL);
            double t0 = now();
            for (int step = 0; step < steps; step++) {
                for (int i = 0; i < b; i++) {
                    n_tokens[i] = 1;
                    tokens[i] = (int32_t)(next() % (uint64_t)c->vocab_size);
                }
                qmix_forward_batch(s, seqs, n_tokens, b, tokens, logits, NULL);
            }
            double per_step = (now() - t0) / steps;
            if (per_step < best[k]) best[k] = per_step;
        }
    printf("%s, %d threads: decode steps of B sequences (best of %d rounds of %d steps)\n", path,
           qmix_pool_threads(s->pool), rounds, steps);
    for (int k = 0; k < n_counts; k++)
        printf("B = %2d: %7.1f ms/step, %7.1f tok/s aggregate, %6.1f tok/s per sequence (%.2fx "
               "B = 1)\n", counts[k], best[k] * 1e3, counts[k] / best[k], 1 / best[k],
               counts[k] / best[k] / (1 / best[0]) / counts[0]);
    free(logits);
    for (int i = 0; i < max_streams; i++) qmix_seq_free(seqs[i]);
    qmix_session_free(s);
    qmix_model_close(m);
    return 0;
}
