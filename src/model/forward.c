/* The Qwen3.5-MoE forward pass, in the order of spec/architecture.md. Every step works on a batch
 * of rows: matmuls stream each weight once per batch (qmix_run_matmuls), the recurrences run
 * token by token inside the batch. The rows are segments of one or more sequences (continuous
 * batching): everything per token (norms, projections, MoE) sees only rows, while the causal conv,
 * the delta rule and attention run per segment on its sequence's state and positions. */
#include "model/forward.h"

#include <math.h>
#include <string.h>

/* The batch being run: segment i is n_tokens[i] rows of seqs[i], from row s->seg_row[i]. */
typedef struct batch {
    qmix_seq *const *seqs;
    const int *n_tokens;
    int n_seqs, rows;
    int layer; /* the layer being run: which state of each sequence to use */
    const int32_t *mpos; /* [rows][3] M-RoPE (t, h, w) positions, or NULL: pos + rope_delta */
} batch;

typedef struct gdn_ctx { qmix_session *s; const qmix_layer *ly; const batch *b; int lin; } gdn_ctx;

static qmix_layer_state *seg_state(const batch *b, int seg) { return &b->seqs[seg]->state[b->layer]; }

/* Position in its sequence of a batch row. */
static int64_t row_pos(const qmix_session *s, const batch *b, int row)
{
    int seg = s->row_seg[row];
    return b->seqs[seg]->pos + (row - s->seg_row[seg]);
}

/* Rotary positions (t, h, w) of a batch row: given (image prompts), or the row's place in its
 * sequence shifted by the sequence's rope_delta (the same for all three). */
static void row_rope_pos(const qmix_session *s, const batch *b, int row, int64_t out[3])
{
    if (b->mpos) {
        for (int k = 0; k < 3; k++) out[k] = b->mpos[3 * row + k];
        return;
    }
    int64_t p = row_pos(s, b, row) + b->seqs[s->row_seg[row]]->rope_delta;
    out[0] = out[1] = out[2] = p;
}

static void rmsnorm_rows(float *out, const float *x, const float *w, int n, int64_t dim, float eps)
{
    for (int t = 0; t < n; t++) qk_rmsnorm(out + t * dim, x + t * dim, w, dim, eps);
}

static void add_rows(float *x, const float *y, int64_t count)
{
    for (int64_t i = 0; i < count; i++) x[i] += y[i];
}

static qmix_mm_job job(const qk_mat *w, const float *x, int n, int64_t ldx, float *y, int64_t ldy)
{
    return (qmix_mm_job){.w = w, .x = x, .n = n, .ldx = ldx, .y = y, .ldy = ldy};
}

/* ---- Gated DeltaNet ---------------------------------------------------------------------- */

/* Where a sequence that records its per-row state (qmix_seq.row_state) keeps row 0 of the l-th
 * linear-attention layer, or NULL. */
static float *row_state_at(const qmix_seq *seq, const qmix_config *c, int lin)
{
    if (!seq->row_state) return NULL;
    return seq->row_state + (size_t)lin * (size_t)seq->row_state_rows * qmix_seq_layer_state_floats(c);
}

/* Causal depthwise convolution over time with the carried last Kc-1 inputs, then SiLU, in place
 * on qkv[n][C]. rows (or NULL): the conv window after each of the first n_rows tokens, stride
 * floats apart. */
static void causal_conv_silu(float *qkv, float *conv_state, const float *w, int n, int64_t C, int Kc,
                             float *rows, int n_rows, size_t stride)
{
    for (int t = 0; t < n; t++) {
        float *u = qkv + t * C;
        for (int64_t ch = 0; ch < C; ch++) {
            const float *wc = w + ch * Kc;
            float acc = wc[Kc - 1] * u[ch];
            for (int j = 0; j < Kc - 1; j++) acc += wc[j] * conv_state[j * C + ch];
            for (int j = 0; j + 1 < Kc - 1; j++) conv_state[j * C + ch] = conv_state[(j + 1) * C + ch];
            conv_state[(Kc - 2) * C + ch] = u[ch];
            u[ch] = qk_silu(acc);
        }
        if (rows && t < n_rows)
            memcpy(rows + t * stride, conv_state, (size_t)(Kc - 1) * (size_t)C * sizeof(float));
    }
}

/* One value head over one segment's tokens: the delta-rule recurrence (chunked for prefill,
 * token by token for short segments) and the gated norm. Task = segment * nv + head. */
static void gdn_head(void *arg, int task, int thread)
{
    gdn_ctx *g = arg;
    qmix_session *s = g->s;
    const qmix_config *c = &s->model->cfg;
    const qmix_layer *ly = g->ly;
    int64_t nk = c->lin_n_k_heads, nv = c->lin_n_v_heads, dk = c->lin_k_head_dim,
            dv = c->lin_v_head_dim;
    int64_t C = 2 * nk * dk + nv * dv;
    int seg = task / (int)nv, j = task % (int)nv, n = g->b->n_tokens[seg];
    int64_t row0 = s->seg_row[seg];
    /* value heads grouped by key head (HF order), or tiled (GGUF order, see model_gguf.c) */
    int64_t key_head = s->model->gdn_v_tiled ? j % nk : j / (nv / nk);
    float *log_decay = s->gdn_scratch + (int64_t)thread * s->gdn_scratch_per_thread;
    float *beta = log_decay + s->max_batch, *scratch = beta + s->max_batch;
    const float *a = s->gdn_a + row0 * nv, *b = s->gdn_b + row0 * nv;
    for (int t = 0; t < n; t++) {
        log_decay[t] = ly->neg_exp_A[j] * qk_softplus(a[t * nv + j] + ly->dt_bias[j]);
        beta[t] = qk_sigmoid(b[t * nv + j]);
    }
    const float *qkv = s->qkv + row0 * C;
    const float *q = qkv + key_head * dk, *k = qkv + nk * dk + key_head * dk,
                *v = qkv + 2 * nk * dk + j * dv;
    float *o = s->gdn_o + row0 * nv * dv + j * dv, *S = seg_state(g->b, seg)->ssm + j * dk * dv;
    const qmix_seq *seq = g->b->seqs[seg];
    float *rows = row_state_at(seq, c, g->lin);
    if (rows) { /* token by token, keeping this head's state after each recorded row */
        size_t stride = qmix_seq_layer_state_floats(c), conv = (size_t)(c->conv_kernel - 1) * C;
        for (int t = 0; t < n; t++) {
            qk_delta_rule_recurrent(S, (int)dk, (int)dv, 1, q + t * C, k + t * C, v + t * C, C, C,
                                    log_decay + t, beta + t, o + t * nv * dv, nv * dv, scratch);
            if (t < seq->row_state_rows)
                memcpy(rows + t * stride + conv + j * dk * dv, S, (size_t)(dk * dv) * sizeof *S);
        }
    } else if (n >= QMIX_GDN_CHUNK_MIN)
        qk_delta_rule_chunked(S, (int)dk, (int)dv, n, q, k, v, C, C, log_decay, beta, o,
                              nv * dv, QMIX_GDN_CHUNK, scratch);
    else
        qk_delta_rule_recurrent(S, (int)dk, (int)dv, n, q, k, v, C, C, log_decay, beta, o,
                                nv * dv, scratch);
    for (int t = 0; t < n; t++) { /* gated RMSNorm: rmsnorm(o, w) · silu(z) */
        float *ot = o + t * nv * dv;
        const float *z = s->z + (row0 + t) * nv * dv + j * dv;
        qk_rmsnorm(ot, ot, ly->gdn_norm, dv, c->rms_eps);
        for (int64_t d = 0; d < dv; d++) ot[d] *= qk_silu(z[d]);
    }
}

static void linear_attention(qmix_session *s, const qmix_layer *ly, const batch *b)
{
    int n = b->rows;
    const qmix_config *c = &s->model->cfg;
    int64_t D = c->hidden_size, nk = c->lin_n_k_heads, nv = c->lin_n_v_heads,
            dk = c->lin_k_head_dim, dv = c->lin_v_head_dim;
    int64_t C = 2 * nk * dk + nv * dv;
    qmix_mm_job in[4] = {job(&ly->in_qkv, s->h, n, D, s->qkv, C),
                         job(&ly->in_z, s->h, n, D, s->z, nv * dv),
                         job(&ly->in_b, s->h, n, D, s->gdn_b, nv),
                         job(&ly->in_a, s->h, n, D, s->gdn_a, nv)};
    qmix_run_matmuls(s, in, 4);

    int lin = 0; /* this layer's index among the linear-attention layers */
    for (int i = 0; i < b->layer; i++) lin += !c->layer_is_full[i];
    for (int seg = 0; seg < b->n_seqs; seg++)
        causal_conv_silu(s->qkv + s->seg_row[seg] * C, seg_state(b, seg)->conv, ly->conv_w,
                         b->n_tokens[seg], C, c->conv_kernel, row_state_at(b->seqs[seg], c, lin),
                         b->seqs[seg]->row_state_rows, qmix_seq_layer_state_floats(c));
    float q_scale = 1.0f / sqrtf((float)dk);
    for (int t = 0; t < n; t++)
        for (int64_t hd = 0; hd < nk; hd++) {
            float *q = s->qkv + t * C + hd * dk, *k = s->qkv + t * C + nk * dk + hd * dk;
            qk_l2norm(q, dk, 1e-6f);
            qk_l2norm(k, dk, 1e-6f);
            for (int64_t i = 0; i < dk; i++) q[i] *= q_scale;
        }
    gdn_ctx g = {s, ly, b, lin};
    qmix_pool_run(s->pool, gdn_head, &g, b->n_seqs * (int)nv);

    qmix_mm_job out = job(&ly->out_proj, s->gdn_o, n, nv * dv, s->out, D);
    qmix_run_matmuls(s, &out, 1);
}

/* ---- gated full attention ---------------------------------------------------------------- */

/* NeoX-style rotation of the first rot dims: pairs (i, i + rot/2). Interleaved M-RoPE: pair i
 * turns by the h position if i % 3 == 1 and i < 3·sec[1], by w if i % 3 == 2 and i < 3·sec[2],
 * else by t (text tokens have t = h = w). */
static void rope(float *x, int rot, const int64_t pos[3], double theta, const int *sec)
{
    int half = rot / 2;
    for (int i = 0; i < half; i++) {
        int axis = i % 3 == 1 && i < 3 * sec[1] ? 1 : i % 3 == 2 && i < 3 * sec[2] ? 2 : 0;
        double f = (double)pos[axis] * pow(theta, -2.0 * i / rot);
        float cs = (float)cos(f), sn = (float)sin(f);
        float a = x[i], b = x[i + half];
        x[i] = a * cs - b * sn;
        x[i + half] = b * cs + a * sn;
    }
}

/* Attention tasks: a block of rows × a chunk of the query heads that share one KV head. Each
 * run of the block's rows that belongs to one sequence goes to the kernel as one call, so the
 * run's rows and the chunk's heads read that sequence's cached keys once. */
typedef struct attn_ctx {
    qmix_session *s;
    const batch *b;
    int rows_per_block, heads_per_chunk, chunks_per_group;
} attn_ctx;

/* Softmax over each row's sequence's cached keys up to the row's position, read in the form the
 * sequence stores them (bounded per-thread scratch, whatever the context), then the output gate. */
static void attn_block(void *arg, int task, int thread)
{
    attn_ctx *a = arg;
    qmix_session *s = a->s;
    const qmix_config *c = &s->model->cfg;
    int64_t H = c->n_heads, KV = c->n_kv_heads, hd = c->head_dim, group = H / KV;
    int per_kv = a->chunks_per_group, hc = a->heads_per_chunk;
    int block = task / ((int)KV * per_kv), g = task / per_kv % (int)KV, chunk = task % per_kv;
    int r0 = block * a->rows_per_block, r1 = r0 + a->rows_per_block;
    if (r1 > a->b->rows) r1 = a->b->rows;
    float *scratch = s->scores + (int64_t)thread * s->attn_scratch_per_thread;
    const float *q[QK_ATTN_MAX_Q];
    float *out[QK_ATTN_MAX_Q];
    int64_t n[QK_ATTN_MAX_Q];
    for (int t = r0; t < r1;) {
        int seg = s->row_seg[t], end = t + 1;
        while (end < r1 && s->row_seg[end] == seg) end++;
        const qmix_seq *seq = a->b->seqs[seg];
        const qmix_layer_state *st = &seq->state[a->b->layer];
        size_t head_bytes = qk_kv_bytes(seq->kv_type, hd);
        int nq = 0;
        for (int r = t; r < end; r++)
            for (int k = 0; k < hc; k++) {
                int64_t h = g * group + chunk * hc + k;
                q[nq] = s->q + r * H * 2 * hd + h * 2 * hd; /* [q(hd); gate(hd)] per head */
                out[nq] = s->attn + r * H * hd + h * hd;
                n[nq++] = row_pos(s, a->b, r) + 1;
            }
        qk_attend_kv(seq->kv_type, nq, q, out, n, st->k_cache + g * head_bytes,
                     st->v_cache + g * head_bytes, seq->kv_row_bytes, hd, 1.0f / sqrtf((float)hd),
                     scratch);
        for (int i = 0; i < nq; i++) {
            const float *gate = q[i] + hd;
            for (int64_t d = 0; d < hd; d++) out[i][d] *= qk_sigmoid(gate[d]);
        }
        t = end;
    }
}

static void full_attention(qmix_session *s, const qmix_layer *ly, const batch *b)
{
    int n = b->rows;
    const qmix_config *c = &s->model->cfg;
    int64_t D = c->hidden_size, H = c->n_heads, KV = c->n_kv_heads, hd = c->head_dim;
    qmix_mm_job in[3] = {job(&ly->q_proj, s->h, n, D, s->q, H * 2 * hd),
                         job(&ly->k_proj, s->h, n, D, s->k, KV * hd),
                         job(&ly->v_proj, s->h, n, D, s->v, KV * hd)};
    qmix_run_matmuls(s, in, 3);

    for (int t = 0; t < n; t++) {
        int64_t p = row_pos(s, b, t), rp[3];
        row_rope_pos(s, b, t, rp);
        const qmix_seq *seq = b->seqs[s->row_seg[t]];
        qmix_layer_state *st = seg_state(b, s->row_seg[t]);
        for (int64_t h = 0; h < H; h++) { /* q and gate interleave per head: [q(hd); gate(hd)] */
            float *q = s->q + t * H * 2 * hd + h * 2 * hd;
            qk_rmsnorm(q, q, ly->q_norm, hd, c->rms_eps);
            rope(q, c->rot_dim, rp, c->rope_theta, c->mrope_section);
        }
        for (int64_t g = 0; g < KV; g++) {
            float *k = s->k + t * KV * hd + g * hd;
            qk_rmsnorm(k, k, ly->k_norm, hd, c->rms_eps);
            rope(k, c->rot_dim, rp, c->rope_theta, c->mrope_section);
        }
        /* written once, in the sequence's KV type; attention reads it in that form */
        size_t row = seq->kv_row_bytes;
        qk_kv_quantize(seq->kv_type, s->k + t * KV * hd, KV * hd, st->k_cache + (size_t)p * row);
        qk_kv_quantize(seq->kv_type, s->v + t * KV * hd, KV * hd, st->v_cache + (size_t)p * row);
    }
    /* a GQA group's heads together, 32 queries a task; one head a task when that leaves too few
     * tasks for the threads (decoding a single sequence) */
    int group = (int)(H / KV), threads = qmix_pool_threads(s->pool);
    attn_ctx a = {s, b, 1, group, 1};
    if (group > 32 || (int64_t)n * KV < threads) a.heads_per_chunk = 1, a.chunks_per_group = group;
    a.rows_per_block = 32 / a.heads_per_chunk;
    int blocks = (n + a.rows_per_block - 1) / a.rows_per_block;
    qmix_pool_run(s->pool, attn_block, &a, blocks * (int)KV * a.chunks_per_group);

    qmix_mm_job out = job(&ly->o_proj, s->attn, n, H * hd, s->out, D);
    qmix_run_matmuls(s, &out, 1);
}

/* ---- MoE with shared expert -------------------------------------------------------------- */

/* softmax over all experts, top-k (ties: lower index), renormalised. */
static void route(float *probs, int E, int k, int *top, float *weight)
{
    qk_softmax(probs, E);
    float sum = 0;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int i = 0; i < j; i++) taken |= top[i] == e;
            if (!taken && (best < 0 || probs[e] > probs[best])) best = e;
        }
        top[j] = best;
        weight[j] = probs[best];
        sum += probs[best];
    }
    for (int j = 0; j < k; j++) weight[j] /= sum;
}

static void swiglu(float *gate, const float *up, int64_t count)
{
    for (int64_t i = 0; i < count; i++) gate[i] = qk_silu(gate[i]) * up[i];
}

static void moe(qmix_session *s, const qmix_layer *ly, int n)
{
    const qmix_config *c = &s->model->cfg;
    int64_t D = c->hidden_size, F = c->moe_ffn, Fs = c->shared_ffn;
    int E = c->n_experts, k = c->n_experts_used;

    qmix_mm_job first[4] = {job(&ly->router, s->h, n, D, s->router, E),
                            job(&ly->shared_gate, s->h, n, D, s->sh_gate, Fs),
                            job(&ly->shared_up, s->h, n, D, s->sh_up, Fs),
                            job(&ly->shared_expert_gate, s->h, n, D, s->sh_g, 1)};
    qmix_run_matmuls(s, first, 4);

    /* Group the (token, choice) slots by expert so each expert runs once on all its tokens. */
    memset(s->expert_count, 0, (size_t)E * sizeof(int));
    for (int t = 0; t < n; t++) {
        route(s->router + (int64_t)t * E, E, k, s->top_expert + t * k, s->top_weight + t * k);
        for (int j = 0; j < k; j++) s->expert_count[s->top_expert[t * k + j]]++;
    }
    for (int e = 0, at = 0; e < E; e++) {
        s->expert_start[e] = at;
        at += s->expert_count[e];
        s->expert_count[e] = 0; /* refilled below as a cursor */
    }
    for (int t = 0; t < n; t++)
        for (int j = 0; j < k; j++) {
            int e = s->top_expert[t * k + j];
            int slot = s->expert_start[e] + s->expert_count[e]++;
            s->slot_token[slot] = t;
            s->token_slot[t * k + j] = slot;
            memcpy(s->moe_x + slot * D, s->h + t * D, D * sizeof(float));
        }

    int n_jobs = 0;
    for (int e = 0; e < E; e++) {
        int cnt = s->expert_count[e];
        if (!cnt) continue;
        int64_t at = s->expert_start[e];
        s->jobs[n_jobs++] = job(&ly->experts[e].gate, s->moe_x + at * D, cnt, D, s->moe_gate + at * F, F);
        s->jobs[n_jobs++] = job(&ly->experts[e].up, s->moe_x + at * D, cnt, D, s->moe_up + at * F, F);
    }
    qmix_run_matmuls(s, s->jobs, n_jobs);
    swiglu(s->moe_gate, s->moe_up, (int64_t)n * k * F);
    swiglu(s->sh_gate, s->sh_up, n * Fs);

    n_jobs = 0;
    for (int e = 0; e < E; e++) {
        int cnt = s->expert_count[e];
        if (!cnt) continue;
        int64_t at = s->expert_start[e];
        s->jobs[n_jobs++] = job(&ly->experts[e].down, s->moe_gate + at * F, cnt, F, s->moe_y + at * D, D);
    }
    s->jobs[n_jobs++] = job(&ly->shared_down, s->sh_gate, n, Fs, s->sh_y, D);
    qmix_run_matmuls(s, s->jobs, n_jobs);

    for (int t = 0; t < n; t++) {
        float *o = s->out + t * D;
        float sg = qk_sigmoid(s->sh_g[t]);
        const float *sy = s->sh_y + t * D;
        for (int64_t d = 0; d < D; d++) o[d] = sg * sy[d];
        for (int j = 0; j < k; j++) {
            float w = s->top_weight[t * k + j];
            const float *y = s->moe_y + (int64_t)s->token_slot[t * k + j] * D;
            for (int64_t d = 0; d < D; d++) o[d] += w * y[d];
        }
    }
}

/* ---- top level --------------------------------------------------------------------------- */

/* One decoder layer over the batch's n rows of the residual stream s->x (state: b->layer). */
static void run_layer(qmix_session *s, const qmix_layer *ly, batch *b, int n)
{
    const qmix_config *c = &s->model->cfg;
    int64_t D = c->hidden_size;
    rmsnorm_rows(s->h, s->x, ly->input_norm, n, D, c->rms_eps);
    if (ly->is_full) full_attention(s, ly, b);
    else linear_attention(s, ly, b);
    add_rows(s->x, s->out, n * D);
    rmsnorm_rows(s->h, s->x, ly->post_norm, n, D, c->rms_eps);
    moe(s, ly, n);
    add_rows(s->x, s->out, n * D);
}

/* Decoder layers [lo, hi) over the batch's n rows of the residual stream s->x. */
static void run_layers(qmix_session *s, batch *b, int lo, int hi, int n)
{
    for (int i = lo; i < hi; i++) {
        b->layer = i;
        run_layer(s, &s->model->layers[i], b, n);
    }
}

void qmix_forward_layer(qmix_session *s, const qmix_layer *ly, qmix_seq *const *seqs,
                        const int *n_tokens, int n_seqs)
{
    batch b = {.seqs = seqs, .n_tokens = n_tokens, .n_seqs = n_seqs, .layer = 0};
    for (int seg = 0; seg < n_seqs; seg++) {
        s->seg_row[seg] = b.rows;
        for (int t = 0; t < n_tokens[seg]; t++) s->row_seg[b.rows++] = seg;
    }
    run_layer(s, ly, &b, b.rows);
    for (int seg = 0; seg < n_seqs; seg++) seqs[seg]->pos += n_tokens[seg];
}

void qmix_forward_batch_mm(qmix_session *s, qmix_seq *const *seqs, const int *n_tokens, int n_seqs,
                           const int32_t *tokens, const float *const *embeds, const int32_t *mpos,
                           float *logits, float *all_logits)
{
    const qmix_model *m = s->model;
    const qmix_config *c = &m->cfg;
    int64_t D = c->hidden_size, V = c->vocab_size;
    batch b = {.seqs = seqs, .n_tokens = n_tokens, .n_seqs = n_seqs, .mpos = mpos};
    for (int seg = 0; seg < n_seqs; seg++) {
        s->seg_row[seg] = b.rows;
        for (int t = 0; t < n_tokens[seg]; t++) s->row_seg[b.rows++] = seg;
    }
    int n = b.rows;

    for (int t = 0; t < n; t++) qk_mat_row_f32(&m->embed, tokens[t], s->x + t * D);
    if (embeds) /* image tokens: the vision tower's rows replace the token embeddings */
        for (int t = 0; t < n; t++)
            if (embeds[t]) memcpy(s->x + t * D, embeds[t], (size_t)D * sizeof(float));

    run_layers(s, &b, 0, c->n_layers, n);

    if (all_logits) {
        rmsnorm_rows(s->h, s->x, m->final_norm, n, D, c->rms_eps);
        qmix_mm_job head = job(&m->lm_head, s->h, n, D, all_logits, V);
        qmix_run_matmuls(s, &head, 1);
        for (int seg = 0; seg < n_seqs; seg++) {
            int64_t last = s->seg_row[seg] + n_tokens[seg] - 1;
            memcpy(logits + seg * V, all_logits + last * V, V * sizeof(float));
        }
    } else { /* only each segment's last token: its final norm in row seg of h */
        for (int seg = 0; seg < n_seqs; seg++) {
            int64_t last = s->seg_row[seg] + n_tokens[seg] - 1;
            qk_rmsnorm(s->h + seg * D, s->x + last * D, m->final_norm, D, c->rms_eps);
        }
        qmix_mm_job head = job(&m->lm_head, s->h, n_seqs, D, logits, V);
        qmix_run_matmuls(s, &head, 1);
    }
    for (int seg = 0; seg < n_seqs; seg++) {
        seqs[seg]->pos += n_tokens[seg];
        if (mpos) { /* later tokens continue after the largest position so far */
            const int32_t *last = mpos + 3 * (s->seg_row[seg] + n_tokens[seg] - 1);
            int32_t hi = last[0] > last[1] ? last[0] : last[1];
            hi = hi > last[2] ? hi : last[2];
            seqs[seg]->rope_delta = hi + 1 - seqs[seg]->pos;
        }
    }
}

void qmix_forward_batch(qmix_session *s, qmix_seq *const *seqs, const int *n_tokens, int n_seqs,
                        const int32_t *tokens, float *logits, float *all_logits)
{
    qmix_forward_batch_mm(s, seqs, n_tokens, n_seqs, tokens, NULL, NULL, logits, all_logits);
}

void qmix_forward(qmix_session *s, const int32_t *tokens, int n, float *all_logits)
{
    qmix_seq *self = &s->seq;
    qmix_forward_batch(s, &self, &n, 1, tokens, s->logits, all_logits);
}

void qmix_forward_hidden(qmix_session *s, int layer_lo, int layer_hi, float *x, int n,
                         float *all_logits)
{
    const qmix_model *m = s->model;
    const qmix_config *c = &m->cfg;
    int64_t D = c->hidden_size, V = c->vocab_size;
    qmix_seq *self = &s->seq;
    batch b = {.seqs = &self, .n_tokens = &n, .n_seqs = 1, .rows = n};
    s->seg_row[0] = 0;
    for (int t = 0; t < n; t++) s->row_seg[t] = 0;
    memcpy(s->x, x, (size_t)(n * D) * sizeof *x);
    run_layers(s, &b, layer_lo, layer_hi, n);
    memcpy(x, s->x, (size_t)(n * D) * sizeof *x);
    if (all_logits) {
        rmsnorm_rows(s->h, s->x, m->final_norm, n, D, c->rms_eps);
        qmix_mm_job head = job(&m->lm_head, s->h, n, D, all_logits, V);
        qmix_run_matmuls(s, &head, 1);
    }
    self->pos += n;
}
