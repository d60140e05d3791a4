/* llama.cpp's mmproj GGUF for the Qwen3.5 vision tower (converter class Qwen3VLVisionModel):
 * the Conv3d patch embedding as two Conv2d kernels (v.patch_embd.weight = frame 0,
 * v.patch_embd.weight.1 = frame 1), v.position_embd, v.blk.N.{ln1,ln2,attn_qkv,attn_out,ffn_up,
 * ffn_down}, v.post_ln (the merger's LayerNorm), mm.0 / mm.2 (the merger's two linears). The
 * preprocessor's pixel limits ride along as clip.vision.image_{min,max}_pixels, the image token
 * ids as qmix.* keys (llama.cpp ignores keys it does not know). */
#include "quant/gguf_mmproj.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/gguf.h"
#include "formats/gguf_write.h"
#include "kernels/kernels.h"
#include "model/model.h"
#include "model/vision.h"
#include "quant/ggml_blocks.h"
#include "util/err.h"

void qmix_mmproj_path_for(const char *gguf_path, char *out, size_t len)
{
    const char *slash = strrchr(gguf_path, '/');
    if (slash) snprintf(out, len, "%.*s/mmproj-%s", (int)(slash - gguf_path), gguf_path, slash + 1);
    else snprintf(out, len, "mmproj-%s", gguf_path);
}

typedef struct mm_tensor {
    char name[64];
    int type, n_dims;
    int64_t ne[4];
    const qk_mat *mat;     /* rows of a matrix (ne[n_dims-1] rows of ne[0]... values) */
    int frame;             /* patch embedding: the frame whose columns to take; -1 otherwise */
    const float *vec;      /* or a float32 vector of all ne elements */
} mm_tensor;

static void add_mat(mm_tensor *t, int *n, const char *name, const qk_mat *m, int type)
{
    t[*n] = (mm_tensor){.type = type, .n_dims = 2, .ne = {m->cols, m->rows, 1, 1}, .mat = m,
                        .frame = -1};
    snprintf(t[*n].name, sizeof t[*n].name, "%s", name);
    (*n)++;
}

static void add_vec(mm_tensor *t, int *n, const char *name, const float *v, int64_t ne0, int64_t ne1)
{
    t[*n] = (mm_tensor){.type = QMIX_GGML_F32, .n_dims = ne1 > 1 ? 2 : 1, .ne = {ne0, ne1, 1, 1},
                        .vec = v, .frame = -1};
    snprintf(t[*n].name, sizeof t[*n].name, "%s", name);
    (*n)++;
}

static int write_values(qmix_ggw *w, const float *x, int64_t n, int type, void *buf, qmix_err *err)
{
    if (type == QMIX_GGML_F32) return qmix_ggw_write(w, x, (size_t)n * sizeof *x, err);
    uint16_t *h = buf;
    for (int64_t i = 0; i < n; i++) h[i] = qk_f32_to_f16(x[i]);
    return qmix_ggw_write(w, h, (size_t)n * 2, err);
}

int qmix_gguf_write_mmproj(const char *in, const char *out, int f32, int *written, qmix_err *err)
{
    *written = 0;
    qmix_model *m = NULL;
    qmix_vision *v = NULL;
    qmix_ggw *w = NULL;
    mm_tensor *t = NULL;
    float *row = NULL, *pick = NULL;
    void *buf = NULL;
    int rc = -1;
    if (qmix_model_open(in, &m, err)) return -1;
    if (!qmix_model_has_vision(m)) {
        qmix_model_close(m);
        return 0;
    }
    if (qmix_vision_open(m, &v, err)) goto done;
    const qmix_vision_config *c = &v->cfg;
    int64_t D = c->hidden, ps = c->patch, tp = c->temporal_patch, K = v->patch_embed.cols;
    int side = 1;
    while ((int64_t)side * side < c->n_pos) side++;
    int mat_type = f32 ? QMIX_GGML_F32 : QMIX_GGML_F16;
    int cap = 16 + 12 * c->depth, n = 0;
    t = calloc((size_t)cap, sizeof *t);
    if (!t) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    for (int f = 0; f < tp; f++) { /* torch [D, 3, ps, ps] per frame: ne [ps, ps, 3, D] */
        t[n] = (mm_tensor){.type = mat_type, .n_dims = 4, .ne = {ps, ps, 3, D},
                           .mat = &v->patch_embed, .frame = f};
        snprintf(t[n].name, sizeof t[n].name, f ? "v.patch_embd.weight.%d" : "v.patch_embd.weight", f);
        n++;
    }
    add_vec(t, &n, "v.patch_embd.bias", v->patch_b, D, 1);
    add_vec(t, &n, "v.position_embd.weight", v->pos_embed, D, c->n_pos);
    for (int i = 0; i < c->depth; i++) {
        const qmix_vision_block *b = &v->blocks[i];
        char name[64];
#define BLK(suffix) (snprintf(name, sizeof name, "v.blk.%d.%s", i, suffix), name)
        add_vec(t, &n, BLK("ln1.weight"), b->norm1_w, D, 1);
        add_vec(t, &n, BLK("ln1.bias"), b->norm1_b, D, 1);
        add_mat(t, &n, BLK("attn_qkv.weight"), &b->qkv, mat_type);
        add_vec(t, &n, BLK("attn_qkv.bias"), b->qkv_b, 3 * D, 1);
        add_mat(t, &n, BLK("attn_out.weight"), &b->proj, mat_type);
        add_vec(t, &n, BLK("attn_out.bias"), b->proj_b, D, 1);
        add_vec(t, &n, BLK("ln2.weight"), b->norm2_w, D, 1);
        add_vec(t, &n, BLK("ln2.bias"), b->norm2_b, D, 1);
        add_mat(t, &n, BLK("ffn_up.weight"), &b->fc1, mat_type);
        add_vec(t, &n, BLK("ffn_up.bias"), b->fc1_b, c->intermediate, 1);
        add_mat(t, &n, BLK("ffn_down.weight"), &b->fc2, mat_type);
        add_vec(t, &n, BLK("ffn_down.bias"), b->fc2_b, D, 1);
#undef BLK
    }
    add_vec(t, &n, "v.post_ln.weight", v->merge_norm_w, D, 1);
    add_vec(t, &n, "v.post_ln.bias", v->merge_norm_b, D, 1);
    add_mat(t, &n, "mm.0.weight", &v->merge_fc1, mat_type);
    add_vec(t, &n, "mm.0.bias", v->merge_fc1_b, v->merge_fc1.rows, 1);
    add_mat(t, &n, "mm.2.weight", &v->merge_fc2, mat_type);
    add_vec(t, &n, "mm.2.bias", v->merge_fc2_b, v->merge_fc2.rows, 1);

    if (!(w = qmix_ggw_new())) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    qmix_ggw_kv_str(w, "general.architecture", "clip");
    qmix_ggw_kv_str(w, "general.type", "mmproj");
    qmix_ggw_kv_u32(w, "general.file_type", f32 ? 0 : 1);
    qmix_ggw_kv_bool(w, "clip.has_vision_encoder", 1);
    qmix_ggw_kv_str(w, "clip.projector_type", "qwen3vl_merger");
    qmix_ggw_kv_bool(w, "clip.use_gelu", 1);
    qmix_ggw_kv_u32(w, "clip.vision.image_size", (uint32_t)(side * ps));
    qmix_ggw_kv_u32(w, "clip.vision.patch_size", (uint32_t)ps);
    qmix_ggw_kv_u32(w, "clip.vision.embedding_length", (uint32_t)D);
    qmix_ggw_kv_u32(w, "clip.vision.feed_forward_length", (uint32_t)c->intermediate);
    qmix_ggw_kv_u32(w, "clip.vision.block_count", (uint32_t)c->depth);
    qmix_ggw_kv_u32(w, "clip.vision.attention.head_count", (uint32_t)c->heads);
    qmix_ggw_kv_f32(w, "clip.vision.attention.layer_norm_epsilon", m->cfg.rms_eps);
    qmix_ggw_kv_u32(w, "clip.vision.projection_dim", (uint32_t)c->out_hidden);
    qmix_ggw_kv_u32(w, "clip.vision.spatial_merge_size", (uint32_t)c->merge);
    float mean[3], std[3];
    for (int i = 0; i < 3; i++) {
        mean[i] = (float)c->mean[i];
        std[i] = (float)c->std[i];
    }
    qmix_ggw_kv_arr(w, "clip.vision.image_mean", QMIX_GGUF_F32, 3, mean);
    qmix_ggw_kv_arr(w, "clip.vision.image_std", QMIX_GGUF_F32, 3, std);
    qmix_ggw_kv_u32(w, "clip.vision.image_min_pixels", (uint32_t)c->min_pixels);
    qmix_ggw_kv_u32(w, "clip.vision.image_max_pixels",
                    (uint32_t)(c->max_pixels > UINT32_MAX ? UINT32_MAX : c->max_pixels));
    qmix_ggw_kv_u32(w, "qmix.image_token_id", (uint32_t)c->image_token_id);
    qmix_ggw_kv_u32(w, "qmix.vision_start_token_id", (uint32_t)c->vision_start_id);
    qmix_ggw_kv_u32(w, "qmix.vision_end_token_id", (uint32_t)c->vision_end_id);
    for (int i = 0; i < n; i++) qmix_ggw_tensor(w, t[i].name, t[i].type, t[i].n_dims, t[i].ne);
    if (qmix_ggw_open(w, out, err)) goto done;
    int64_t widest = K;
    for (int i = 0; i < n; i++) {
        int64_t e = t[i].mat ? t[i].mat->cols : t[i].ne[0] * t[i].ne[1];
        if (e > widest) widest = e;
    }
    row = malloc((size_t)widest * sizeof *row);
    pick = malloc((size_t)K * sizeof *pick);
    buf = malloc((size_t)widest * 4);
    if (!row || !pick || !buf) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    for (int i = 0; i < n; i++) {
        const mm_tensor *x = &t[i];
        if (x->vec) {
            if (write_values(w, x->vec, x->ne[0] * x->ne[1], x->type, buf, err)) goto done;
            continue;
        }
        for (int64_t r = 0; r < x->mat->rows; r++) {
            qk_mat_row_f32(x->mat, r, row);
            const float *src = row;
            int64_t cnt = x->mat->cols;
            if (x->frame >= 0) { /* columns (channel, frame, y, x): this frame's */
                cnt = 0;
                for (int64_t ch = 0; ch < 3; ch++)
                    for (int64_t k = 0; k < ps * ps; k++)
                        pick[cnt++] = row[(ch * tp + x->frame) * ps * ps + k];
                src = pick;
            }
            if (write_values(w, src, cnt, x->type, buf, err)) goto done;
        }
    }
    rc = qmix_ggw_close(w, err);
    w = NULL;
    if (!rc) *written = 1;
done:
    if (w) qmix_ggw_discard(w);
    free(t);
    free(row);
    free(pick);
    free(buf);
    qmix_vision_free(v);
    qmix_model_close(m);
    return rc;
}
