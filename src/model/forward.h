#ifndef QMIX_MODEL_FORWARD_H
#define QMIX_MODEL_FORWARD_H

#include "runtime/session.h"

/* Runs n (<= s->max_batch) tokens at positions s->seq.pos.. through the model, appending to the
 * session's own sequence. all_logits: NULL, or [n][vocab] for every token. s->logits always
 * receives the last token's logits. Token ids and capacity are checked by the caller. */
void qmix_forward(qmix_session *s, const int32_t *tokens, int n, float *all_logits);

/* The same forward pass over the tokens of several sequences at once (continuous batching):
 * segment i is n_tokens[i] >= 1 consecutive tokens of seqs[i] (distinct sequences, each with
 * max_ctx <= the session's), at its positions seqs[i]->pos.., and the segments follow each other
 * in tokens (at most s->max_batch in all). Every matmul runs once over all rows; the causal conv,
 * delta rule and attention run per segment on that sequence's state. logits: [n_seqs][vocab],
 * each segment's last token; all_logits: NULL or [rows][vocab]. Each sequence advances by its
 * n_tokens[i]. The result for a sequence is that of running it alone, up to float rounding. */
void qmix_forward_batch(qmix_session *s, qmix_seq *const *seqs, const int *n_tokens, int n_seqs,
                        const int32_t *tokens, float *logits, float *all_logits);
/* After qmix_forward_batch / qmix_forward with all_logits, s->h[rows][hidden] holds every row's
 * final-normed hidden state (what the lm_head read; the MTP block's input). */

/* One decoder layer ly (a full-attention one, e.g. the MTP block's) over rows s->x[rows][hidden]
 * of the residual stream, updated in place; segments as in qmix_forward_batch, each sequence's
 * state[0] holding the layer's KV cache. Each sequence advances by n_tokens[i]. */
void qmix_forward_layer(qmix_session *s, const qmix_layer *ly, qmix_seq *const *seqs,
                        const int *n_tokens, int n_seqs);

/* The same with image rows: embeds NULL or [rows] (a non-NULL entry replaces that row's token
 * embedding), mpos NULL or [rows][3] M-RoPE (t, h, w) positions of every row. With mpos, each
 * sequence's rope_delta is set so that its next tokens continue after its last row's largest
 * position. */
void qmix_forward_batch_mm(qmix_session *s, qmix_seq *const *seqs, const int *n_tokens, int n_seqs,
                           const int32_t *tokens, const float *const *embeds, const int32_t *mpos,
                           float *logits, float *all_logits);

/* Layers [layer_lo, layer_hi) only, over n (<= s->max_batch) rows x[n][hidden] of the residual
 * stream of the session's own sequence at positions s->seq.pos.. — the stream entering layer_lo
 * (the embeddings when it is 0), left in x as it leaves layer_hi - 1 — and, with all_logits
 * ([n][vocab]), the final norm and lm_head after it (layer_hi should then be the last layer + 1).
 * The sequence advances by n. For passes that visit the layers in bands (calibration): keeping the
 * stream between bands makes the whole run one pass over the layers instead of one per band, with
 * the same floats as qmix_forward (the same operations on the same rows). */
void qmix_forward_hidden(qmix_session *s, int layer_lo, int layer_hi, float *x, int n,
                         float *all_logits);

#endif
