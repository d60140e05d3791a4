/* The MTP (Multi-Token Prediction) block's forward pass: the model's own draft head for
 * speculative decoding (src/runtime/speculative.c). */
#ifndef QMIX_MODEL_MTP_H
#define QMIX_MODEL_MTP_H

#include "runtime/session.h"

/* A sequence state for the MTP block's one layer (its KV cache of max_ctx positions), in the
 * session layout, so qmix_forward_layer runs it as any full-attention layer. */
int qmix_mtp_seq_new(const qmix_model *m, int max_ctx, qmix_seq **out, qmix_err *err);

/* Runs the MTP block over n (<= s->max_batch) rows of one sequence, at its positions seq->pos..:
 * row t pairs hidden[t] — the trunk's final-normed hidden state at position p, or the block's own
 * output for a further draft — with tokens[t], the token at p + 1, and sits at position p (the
 * trained block places it at p + 1: the same attention, RoPE being relative). cat: scratch of
 * n * 2 * hidden floats. out_hidden (or NULL): the last row after mtp.norm [hidden], the input of
 * a further draft; logits (or NULL; needs out_hidden): the lm_head of it [vocab]. The sequence
 * advances by n. */
void qmix_mtp_forward(qmix_session *s, qmix_seq *seq, const float *hidden, const int32_t *tokens,
                      int n, float *cat, float *out_hidden, float *logits);

#endif
