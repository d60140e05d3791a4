/* The MTP block: u = fc · [norm_embed(embed(token)); norm_hidden(h)], one gated full-attention MoE
 * decoder layer over u with its own KV cache, then mtp.norm and the shared lm_head. The layer is
 * the trunk's own code (qmix_forward_layer); only the fusion in front and the head differ. */
#include "model/mtp.h"

#include <string.h>

#include "model/forward.h"
#include "util/err.h"

int qmix_mtp_seq_new(const qmix_model *m, int max_ctx, qmix_seq **out, qmix_err *err)
{
    *out = NULL;
    if (!m->mtp) return qmix_errf(err, "the checkpoint has no MTP block (mtp.* tensors)");
    qmix_config one = m->cfg; /* one full-attention layer of the trunk's geometry */
    one.n_layers = 1;
    one.layer_is_full[0] = 1;
    return qmix_seq_new(&one, max_ctx, QMIX_KV_DEFAULT, out, err); /* float32: a few rows */
}

void qmix_mtp_forward(qmix_session *s, qmix_seq *seq, const float *hidden, const int32_t *tokens,
                      int n, float *cat, float *out_hidden, float *logits)
{
    const qmix_model *m = s->model;
    const qmix_mtp *mtp = m->mtp;
    const qmix_config *c = &m->cfg;
    int64_t D = c->hidden_size;
    for (int t = 0; t < n; t++) {
        float *row = cat + t * 2 * D;
        qk_mat_row_f32(&m->embed, tokens[t], row);
        qk_rmsnorm(row, row, mtp->norm_embed, D, c->rms_eps);
        qk_rmsnorm(row + D, hidden + t * D, mtp->norm_hidden, D, c->rms_eps);
    }
    qmix_mm_job fc = {.w = &mtp->fc, .x = cat, .n = n, .ldx = 2 * D, .y = s->x, .ldy = D};
    qmix_run_matmuls(s, &fc, 1);
    qmix_forward_layer(s, &mtp->layer, &seq, &n, 1);
    if (!out_hidden) return;
    qk_rmsnorm(out_hidden, s->x + (n - 1) * D, mtp->norm, D, c->rms_eps);
    if (!logits) return;
    qmix_mm_job head = {.w = &m->lm_head, .x = out_hidden, .n = 1, .ldx = D, .y = logits,
                        .ldy = c->vocab_size};
    qmix_run_matmuls(s, &head, 1);
}
