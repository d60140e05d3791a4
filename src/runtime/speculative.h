/* MTP speculative decoding: the model's own MTP block drafts up to N tokens, the trunk verifies
 * them in one batched forward pass, and the accepted ones are kept. Exact: with greedy sampling
 * the tokens are those of plain greedy decoding; with sampling, speculative sampling (accept the
 * draft d with min(1, p(d)/q(d)), else draw from norm(max(0, p - q))) keeps the target
 * distribution p — the sampler's processed distribution (penalties, temperature, top-k/p, min-p) —
 * exactly. On a rejection the KV cache rows past the kept tokens are simply left behind, and the
 * Gated DeltaNet conv and delta-rule state is put back to where the last kept token left it. */
#ifndef QMIX_RUNTIME_SPECULATIVE_H
#define QMIX_RUNTIME_SPECULATIVE_H

#include <signal.h>
#include <stdint.h>

#include "runtime/sampler.h"
#include "runtime/session.h"

#define QMIX_SPEC_MAX_DRAFT 8
/* Chosen by measurement on the demo model (README, "MTP speculative decoding"). */
#define QMIX_SPEC_DEFAULT_DRAFT 1

/* How a rejection restores the Gated DeltaNet state: SNAPSHOT records the state after every
 * verified row (token by token) and copies back the kept row's; RECOMPUTE saves the state before
 * the verification and re-runs the kept tokens through the trunk. */
typedef enum qmix_spec_rollback { QMIX_SPEC_SNAPSHOT, QMIX_SPEC_RECOMPUTE } qmix_spec_rollback;

typedef struct qmix_spec_stats {
    int64_t steps;            /* verification passes */
    int64_t drafted, accepted; /* draft tokens proposed, and accepted */
    int64_t kept;             /* tokens the passes fed for good (accepted drafts + 1 each) */
    int64_t rollbacks;        /* passes that restored the recurrent state */
    double draft_s, verify_s, accept_s; /* MTP drafting; the verification pass; acceptance + rollback */
} qmix_spec_stats;

typedef struct qmix_spec qmix_spec;

/* Speculative decoding over session s's own sequence (which it then drives: use qmix_spec_*
 * instead of qmix_session_prefill/decode), drafting n_draft (1..QMIX_SPEC_MAX_DRAFT) tokens a
 * step. Fails if the model has no MTP block. The session must be at position 0. */
int qmix_spec_new(qmix_session *s, int n_draft, qmix_spec **out, qmix_err *err);
void qmix_spec_free(qmix_spec *sp);
void qmix_spec_set_rollback(qmix_spec *sp, qmix_spec_rollback mode);
/* Resets the session and the MTP block's state. */
void qmix_spec_reset(qmix_spec *sp);
/* Feeds tokens to the trunk (in batches) and the MTP block; the session's logits are then the
 * last token's, exactly as qmix_session_prefill leaves them. */
int qmix_spec_prefill(qmix_spec *sp, const int32_t *tokens, int n, qmix_err *err);

/* Receives each generated token with the logits it was chosen from. Returns 0 if the token is to
 * be fed to the model (the callee has passed it to qmix_sampler_accept), 1 if the generation is
 * over (the token is not fed), -1 on error. */
typedef int (*qmix_spec_emit_fn)(void *user, int32_t id, const float *logits, qmix_err *err);

/* Generates from the session's current logits until emit says stop, cancel is set, or the
 * context is full. history (or NULL; capacity max_ctx) gets every token fed appended. Returns 0,
 * or -1 on error. */
int qmix_spec_generate(qmix_spec *sp, qmix_sampler *smp, qmix_spec_emit_fn emit, void *user,
                       volatile sig_atomic_t *cancel, int32_t *history, int *n_history,
                       qmix_err *err);

/* Replaces the MTP block's drafts (tests drive the acceptance and rollback paths with chosen
 * drafts this way): called after each draft with the trunk position P of x, the n draft tokens
 * (for positions P+1..) and their distributions q[n][vocab], both of which it may rewrite. */
typedef void (*qmix_spec_draft_hook)(void *user, int pos, int32_t *drafts, int n, float *q);
void qmix_spec_set_draft_hook(qmix_spec *sp, qmix_spec_draft_hook hook, void *user);

const qmix_spec_stats *qmix_spec_get_stats(const qmix_spec *sp);
int qmix_spec_draft(const qmix_spec *sp);

/* Speculative sampling's step for draft d drawn from q: accepts it with probability
 * min(1, p(d)/q(d)) (*accepted = 1, returns d), else returns a draw from norm(max(0, p - q)).
 * p, q: distributions over n tokens. Uses the sampler's random stream. */
int32_t qmix_spec_accept(qmix_sampler *smp, const float *p, const float *q, int n, int32_t d,
                         int *accepted);
/* A draw from probs[n] (normalised by their sum). */
int32_t qmix_spec_draw(qmix_sampler *smp, const float *probs, int n);

#endif
