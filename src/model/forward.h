#ifndef QMIX_MODEL_FORWARD_H
#define QMIX_MODEL_FORWARD_H

#include "runtime/session.h"

/* Runs n (<= s->max_batch) tokens at positions s->pos.. through the model, appending to the
 * session's state. all_logits: NULL, or [n][vocab] for every token. s->logits always receives the
 * last token's logits. Token ids and capacity are checked by the caller. */
void qmix_forward(qmix_session *s, const int32_t *tokens, int n, float *all_logits);

#endif
