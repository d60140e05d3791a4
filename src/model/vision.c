/* The Qwen3.5 vision tower and the image side of a prompt (see vision.h). Hugging Face semantics
 * throughout (transformers' Qwen3_5MoeVisionModel and Qwen2VLImageProcessor); where llama.cpp's
 * mtmd differs (bilinear letterbox resize, fp16 convolution, tanh GELU in the merger) this
 * follows Hugging Face. */
#include "model/vision.h"

#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/gguf.h"
#include "model/model.h"
#include "quant/ggml_blocks.h"
#include "text/tokenizer.h"
#include "util/err.h"

#define VISION_LN_EPS 1e-6       /* every vision LayerNorm; config.json has no key for it */
#define VISION_ROPE_THETA 10000.0 /* constant in the HF code; config.json has no key for it */

/* ---- configuration ----------------------------------------------------------------------- */

static int json_int(json_t *obj, const char *key, int *out, const char *label, qmix_err *err)
{
    json_t *v = json_object_get(obj, key);
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT_MAX)
        return qmix_errf(err, "%s: missing or invalid integer '%s'", label, key);
    *out = (int)json_integer_value(v);
    return 0;
}

static int read_vision_config(const char *dir, qmix_vision_config *c, qmix_err *err)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/config.json", dir);
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root) return qmix_errf(err, "%s: %s (line %d)", path, je.text, je.line);
    json_t *vc = json_object_get(root, "vision_config");
    int rc = -1;
    if (!json_is_object(vc)) {
        qmix_errf(err, "this model has no vision tower (config.json has no vision_config): it "
                  "cannot take images");
        goto done;
    }
    char label[PATH_MAX + 32];
    snprintf(label, sizeof label, "%s: vision_config", path);
    if (json_int(vc, "hidden_size", &c->hidden, label, err) ||
        json_int(vc, "depth", &c->depth, label, err) ||
        json_int(vc, "num_heads", &c->heads, label, err) ||
        json_int(vc, "intermediate_size", &c->intermediate, label, err) ||
        json_int(vc, "patch_size", &c->patch, label, err) ||
        json_int(vc, "temporal_patch_size", &c->temporal_patch, label, err) ||
        json_int(vc, "spatial_merge_size", &c->merge, label, err) ||
        json_int(vc, "num_position_embeddings", &c->n_pos, label, err) ||
        json_int(vc, "out_hidden_size", &c->out_hidden, label, err) ||
        json_int(root, "image_token_id", &c->image_token_id, path, err) ||
        json_int(root, "vision_start_token_id", &c->vision_start_id, path, err) ||
        json_int(root, "vision_end_token_id", &c->vision_end_id, path, err))
        goto done;
    json_t *ds = json_object_get(vc, "deepstack_visual_indexes");
    if (ds && json_array_size(ds)) {
        qmix_errf(err, "%s: deepstack_visual_indexes is not empty (Qwen3-VL deepstack mergers are "
                  "not supported)", label);
        goto done;
    }
    int side = (int)lround(sqrt((double)c->n_pos));
    if (c->hidden <= 0 || c->heads <= 0 || c->hidden % c->heads || (c->hidden / c->heads) % 4 ||
        c->depth <= 0 || c->depth > 256 || c->intermediate <= 0 || c->patch <= 0 ||
        c->patch > 64 || c->temporal_patch <= 0 || c->temporal_patch > 4 || c->merge <= 0 ||
        c->merge > 4 || side < 2 || side * side != c->n_pos || c->out_hidden <= 0 ||
        c->hidden > 16384 || c->intermediate > 65536) {
        qmix_errf(err, "%s: unsupported geometry (hidden %d, heads %d, depth %d, patch %d, "
                  "merge %d, positions %d)", label, c->hidden, c->heads, c->depth, c->patch,
                  c->merge, c->n_pos);
        goto done;
    }
    rc = 0;
done:
    json_decref(root);
    return rc;
}

/* preprocessor_config.json: min/max pixels (size.shortest_edge / longest_edge are pixel counts;
 * older files say min_pixels / max_pixels), mean and std. Missing file: the released values. */
static int read_preprocessor(const char *dir, qmix_vision_config *c, qmix_err *err)
{
    c->min_pixels = 65536;
    c->max_pixels = 16777216;
    for (int i = 0; i < 3; i++) c->mean[i] = c->std[i] = 0.5;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/preprocessor_config.json", dir);
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    fclose(f);
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root) return qmix_errf(err, "%s: %s (line %d)", path, je.text, je.line);
    int rc = -1;
    json_t *size = json_object_get(root, "size"), *v;
    if (json_is_integer(v = json_object_get(size, "shortest_edge"))) c->min_pixels = json_integer_value(v);
    if (json_is_integer(v = json_object_get(size, "longest_edge"))) c->max_pixels = json_integer_value(v);
    if (json_is_integer(v = json_object_get(root, "min_pixels"))) c->min_pixels = json_integer_value(v);
    if (json_is_integer(v = json_object_get(root, "max_pixels"))) c->max_pixels = json_integer_value(v);
    static const char *const keys[2] = {"image_mean", "image_std"};
    for (int k = 0; k < 2; k++) {
        json_t *a = json_object_get(root, keys[k]);
        if (!a) continue;
        if (json_array_size(a) != 3) {
            qmix_errf(err, "%s: %s is not a list of 3 numbers", path, keys[k]);
            goto done;
        }
        for (int i = 0; i < 3; i++) {
            double x = json_number_value(json_array_get(a, (size_t)i));
            if (!json_is_number(json_array_get(a, (size_t)i)) || (k == 1 && !(x > 0))) {
                qmix_errf(err, "%s: %s[%d] is not a valid number", path, keys[k], i);
                goto done;
            }
            (k ? c->std : c->mean)[i] = x;
        }
    }
    static const char *const geo[3] = {"patch_size", "temporal_patch_size", "merge_size"};
    const int want[3] = {c->patch, c->temporal_patch, c->merge};
    for (int k = 0; k < 3; k++)
        if ((v = json_object_get(root, geo[k])) && json_integer_value(v) != want[k]) {
            qmix_errf(err, "%s: %s %lld disagrees with config.json's %d", path, geo[k],
                      (long long)json_integer_value(v), want[k]);
            goto done;
        }
    if (c->min_pixels <= 0 || c->max_pixels < c->min_pixels || c->max_pixels > (1LL << 40)) {
        qmix_errf(err, "%s: invalid pixel limits [%lld, %lld]", path, (long long)c->min_pixels,
                  (long long)c->max_pixels);
        goto done;
    }
    rc = 0;
done:
    json_decref(root);
    return rc;
}

/* ---- weights ----------------------------------------------------------------------------- */

typedef struct vbinder {
    const qmix_model *m;
    const char *prefix;
    qmix_err *err;
    float *next;             /* bump allocator in v->f32 */
    char name[256];
} vbinder;

static const qmix_tensor *vfind(vbinder *b, const char *suffix)
{
    snprintf(b->name, sizeof b->name, "%s%s", b->prefix, suffix);
    return qmix_st_find(b->m->store, b->name);
}

static int vcheck(vbinder *b, const qmix_tensor *t, int64_t count)
{
    if (!t) return qmix_errf(b->err, "missing vision tensor '%s'", b->name);
    if (t->dtype != QMIX_F32 && t->dtype != QMIX_F16 && t->dtype != QMIX_BF16)
        return qmix_errf(b->err, "vision tensor '%s': dtype %s not supported (BF16, F16 or F32; "
                         "the tower is kept 16-bit)", b->name, qmix_dtype_st_name(t->dtype));
    int64_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= t->shape[d];
    if (n != count || t->nbytes != (uint64_t)count * qmix_dtype_size(t->dtype))
        return qmix_errf(b->err, "vision tensor '%s' has %lld elements, expected %lld", b->name,
                         (long long)n, (long long)count);
    return 0;
}

static int vmat(vbinder *b, const char *suffix, int64_t rows, int64_t cols, qk_mat *out)
{
    const qmix_tensor *t = vfind(b, suffix);
    if (vcheck(b, t, rows * cols)) return -1;
    if (t->ndim < 2 || t->shape[0] != rows)
        return qmix_errf(b->err, "vision tensor '%s' does not have %lld rows", b->name,
                         (long long)rows);
    *out = (qk_mat){.dtype = t->dtype, .rows = rows, .cols = cols,
                    .row_bytes = (size_t)cols * qmix_dtype_size(t->dtype), .data = t->data};
    return 0;
}

static int vvec(vbinder *b, const char *suffix, int64_t n, float **out)
{
    const qmix_tensor *t = vfind(b, suffix);
    if (vcheck(b, t, n)) return -1;
    qk_mat row = {.dtype = t->dtype, .rows = 1, .cols = n,
                  .row_bytes = (size_t)n * qmix_dtype_size(t->dtype), .data = t->data};
    *out = b->next;
    b->next += n;
    qk_mat_row_f32(&row, 0, *out);
    return 0;
}

static const char *vision_prefix(const qmix_model *m)
{
    if (!m->store) return NULL;
    if (qmix_st_find(m->store, "model.visual.patch_embed.proj.weight")) return "model.visual.";
    if (qmix_st_find(m->store, "visual.patch_embed.proj.weight")) return "visual.";
    if (qmix_st_find(m->store, "vision_tower.patch_embed.proj.weight")) return "vision_tower.";
    return NULL;
}

/* The patch embedding as [D, 3·tp·ps·ps] with columns (channel, frame, row, column): the HF
 * Conv3d weight [D, 3, tp, ps, ps] is that already (a view); mlx-vlm stores it channels-last
 * [D, tp, ps, ps, 3], which is permuted here into a float32 copy (v->patch_copy). */
static int bind_patch_embed(vbinder *b, qmix_vision *v, int64_t D, qmix_err *err)
{
    const qmix_vision_config *c = &v->cfg;
    int64_t tp = c->temporal_patch, ps = c->patch, K = 3 * tp * ps * ps;
    const qmix_tensor *t = vfind(b, "patch_embed.proj.weight");
    if (vcheck(b, t, D * K)) return -1;
    int hf = t->ndim == 5 && t->shape[0] == D && t->shape[1] == 3 && t->shape[2] == tp &&
             t->shape[3] == ps && t->shape[4] == ps;
    int mlx = t->ndim == 5 && t->shape[0] == D && t->shape[1] == tp && t->shape[2] == ps &&
              t->shape[3] == ps && t->shape[4] == 3;
    if (!hf && !mlx)
        return qmix_errf(err, "vision tensor '%s' is neither [D, 3, tp, ps, ps] nor [D, tp, ps, ps, 3]",
                         b->name);
    if (hf) return vmat(b, "patch_embed.proj.weight", D, K, &v->patch_embed);
    qk_mat src = {.dtype = t->dtype, .rows = D, .cols = K,
                  .row_bytes = (size_t)K * qmix_dtype_size(t->dtype), .data = t->data};
    float *row = malloc((size_t)K * sizeof *row);
    v->patch_copy = malloc((size_t)(D * K) * sizeof(float));
    if (!row || !v->patch_copy) {
        free(row);
        return qmix_errf(err, "out of memory");
    }
    for (int64_t o = 0; o < D; o++) {
        qk_mat_row_f32(&src, o, row); /* (frame, row, column, channel) */
        float *dst = v->patch_copy + o * K;
        for (int64_t ch = 0; ch < 3; ch++)
            for (int64_t f = 0; f < tp; f++)
                for (int64_t y = 0; y < ps; y++)
                    for (int64_t x = 0; x < ps; x++)
                        dst[((ch * tp + f) * ps + y) * ps + x] = row[((f * ps + y) * ps + x) * 3 + ch];
    }
    free(row);
    v->patch_embed = (qk_mat){.dtype = QMIX_F32, .rows = D, .cols = K,
                              .row_bytes = (size_t)K * sizeof(float), .data = v->patch_copy};
    return 0;
}

int qmix_model_has_vision(const qmix_model *m) { return vision_prefix(m) != NULL; }

void qmix_vision_free(qmix_vision *v)
{
    if (!v) return;
    free(v->blocks);
    free(v->f32);
    free(v->patch_copy);
    qmix_gguf_close(v->gguf);
    free(v);
}

int qmix_vision_open(qmix_model *m, qmix_vision **out, qmix_err *err)
{
    *out = NULL;
    qmix_vision *v = calloc(1, sizeof *v);
    if (!v) return qmix_errf(err, "out of memory");
    qmix_vision_config *c = &v->cfg;
    const char *prefix = vision_prefix(m);
    if (!prefix) {
        if (m->gguf)
            qmix_errf(err, "a GGUF model's vision tower is a separate mmproj file: give it with "
                      "--mmproj FILE");
        else
            qmix_errf(err, "this model has no vision tower (no model.visual.* or vision_tower.* "
                      "tensors): it cannot take images");
        goto fail;
    }
    if (read_vision_config(m->dir, c, err) || read_preprocessor(m->dir, c, err)) goto fail;
    if (c->out_hidden != m->cfg.hidden_size) {
        qmix_errf(err, "vision_config.out_hidden_size %d differs from the text hidden size %d",
                  c->out_hidden, m->cfg.hidden_size);
        goto fail;
    }
    if (c->image_token_id < 0 || c->image_token_id >= m->cfg.vocab_size) {
        qmix_errf(err, "image_token_id %d is outside the vocabulary", c->image_token_id);
        goto fail;
    }
    int64_t D = c->hidden, I = c->intermediate, M = (int64_t)D * c->merge * c->merge;
    int64_t K = 3LL * c->temporal_patch * c->patch * c->patch, P = c->n_pos;
    size_t floats = (size_t)(D + P * D + 2 * M + c->out_hidden + 2 * D) +
                    (size_t)c->depth * (size_t)(4 * D + 3 * D + D + I + D);
    v->f32 = malloc(floats * sizeof(float));
    v->blocks = calloc((size_t)c->depth, sizeof *v->blocks);
    if (!v->f32 || !v->blocks) {
        qmix_errf(err, "out of memory");
        goto fail;
    }
    vbinder b = {.m = m, .prefix = prefix, .err = err, .next = v->f32};
    (void)K;
    if (bind_patch_embed(&b, v, D, err) ||
        vvec(&b, "patch_embed.proj.bias", D, &v->patch_b) ||
        vvec(&b, "pos_embed.weight", P * D, &v->pos_embed) ||
        vvec(&b, "merger.norm.weight", D, &v->merge_norm_w) ||
        vvec(&b, "merger.norm.bias", D, &v->merge_norm_b) ||
        vmat(&b, "merger.linear_fc1.weight", M, M, &v->merge_fc1) ||
        vvec(&b, "merger.linear_fc1.bias", M, &v->merge_fc1_b) ||
        vmat(&b, "merger.linear_fc2.weight", c->out_hidden, M, &v->merge_fc2) ||
        vvec(&b, "merger.linear_fc2.bias", c->out_hidden, &v->merge_fc2_b))
        goto fail;
    for (int i = 0; i < c->depth; i++) {
        qmix_vision_block *bl = &v->blocks[i];
        char s[12][96];
        static const char *const part[12] = {
            "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.weight",
            "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.linear_fc1.weight",
            "mlp.linear_fc1.bias", "mlp.linear_fc2.weight", "mlp.linear_fc2.bias"};
        for (int k = 0; k < 12; k++) snprintf(s[k], sizeof s[k], "blocks.%d.%s", i, part[k]);
        if (vvec(&b, s[0], D, &bl->norm1_w) || vvec(&b, s[1], D, &bl->norm1_b) ||
            vvec(&b, s[2], D, &bl->norm2_w) || vvec(&b, s[3], D, &bl->norm2_b) ||
            vmat(&b, s[4], 3 * D, D, &bl->qkv) || vvec(&b, s[5], 3 * D, &bl->qkv_b) ||
            vmat(&b, s[6], D, D, &bl->proj) || vvec(&b, s[7], D, &bl->proj_b) ||
            vmat(&b, s[8], I, D, &bl->fc1) || vvec(&b, s[9], I, &bl->fc1_b) ||
            vmat(&b, s[10], D, I, &bl->fc2) || vvec(&b, s[11], D, &bl->fc2_b))
            goto fail;
    }
    char beyond[64];
    snprintf(beyond, sizeof beyond, "blocks.%d.norm1.weight", c->depth);
    if (vfind(&b, beyond)) {
        qmix_errf(err, "vision_config says depth %d but the checkpoint has '%s'", c->depth,
                  b.name);
        goto fail;
    }
    *out = v;
    return 0;
fail:
    qmix_vision_free(v);
    return -1;
}

/* ---- llama.cpp's mmproj GGUF ----------------------------------------------------------- */

static int gguf_u32(const qmix_gguf *g, const char *key, int *out, int required, qmix_err *err)
{
    int64_t v;
    int r = qmix_gguf_get_int(g, key, &v, err);
    if (r < 0) return -1;
    if (!r) return required ? qmix_errf(err, "missing key '%s'", key) : 0;
    if (v < 0 || v > INT_MAX) return qmix_errf(err, "key '%s' = %lld is out of range", key, (long long)v);
    *out = (int)v;
    return 0;
}

static int gguf_f32_triple(const qmix_gguf *g, const char *key, double out[3], qmix_err *err)
{
    const qmix_gguf_kv *kv = qmix_gguf_kv_find(g, key);
    if (!kv) return 0;
    if (kv->type != QMIX_GGUF_ARRAY || kv->arr_type != QMIX_GGUF_F32 || kv->arr_n != 3)
        return qmix_errf(err, "key '%s' is not 3 float32 values", key);
    for (int i = 0; i < 3; i++) {
        float f;
        memcpy(&f, kv->data + 4 * i, 4);
        out[i] = f;
    }
    return 0;
}

/* A float tensor of the mmproj with exactly these dims (ne, innermost first). */
static const qmix_gguf_tensor *gtensor(const qmix_gguf *g, const char *name, int n_dims,
                                       const int64_t *ne, qmix_err *err)
{
    const qmix_gguf_tensor *t = qmix_gguf_find(g, name);
    if (!t) {
        qmix_errf(err, "missing tensor '%s'", name);
        return NULL;
    }
    if (t->type != QMIX_GGML_F32 && t->type != QMIX_GGML_F16 && t->type != QMIX_GGML_BF16) {
        qmix_errf(err, "tensor '%s': type %s not supported for the vision tower (F32, F16 or "
                  "BF16)", name, qmix_ggml_type_name(t->type));
        return NULL;
    }
    for (int d = 0; d < 4; d++)
        if (t->ne[d] != (d < n_dims ? ne[d] : 1)) {
            qmix_errf(err, "tensor '%s' has the wrong shape", name);
            return NULL;
        }
    return t;
}

static qmix_dtype gguf_dtype(int type)
{
    return type == QMIX_GGML_F32 ? QMIX_F32 : type == QMIX_GGML_F16 ? QMIX_F16 : QMIX_BF16;
}

static qk_mat gview(const qmix_gguf_tensor *t, int64_t rows, int64_t cols)
{
    qmix_dtype dt = gguf_dtype(t->type);
    return (qk_mat){.dtype = dt, .rows = rows, .cols = cols,
                    .row_bytes = (size_t)cols * qmix_dtype_size(dt), .data = t->data};
}

static int gmat(const qmix_gguf *g, const char *name, int64_t rows, int64_t cols, qk_mat *out,
                qmix_err *err)
{
    int64_t ne[2] = {cols, rows};
    const qmix_gguf_tensor *t = gtensor(g, name, 2, ne, err);
    if (!t) return -1;
    *out = gview(t, rows, cols);
    return 0;
}

static int gvec(const qmix_gguf *g, const char *name, int64_t ne0, int64_t ne1, float **next,
                float **out, qmix_err *err)
{
    int64_t ne[2] = {ne0, ne1};
    const qmix_gguf_tensor *t = gtensor(g, name, ne1 > 1 ? 2 : 1, ne, err);
    if (!t) return -1;
    qk_mat row = gview(t, 1, ne0 * ne1);
    *out = *next;
    *next += ne0 * ne1;
    qk_mat_row_f32(&row, 0, *out);
    return 0;
}

int qmix_vision_open_mmproj(qmix_model *m, const char *path, const struct qmix_tokenizer *tok,
                            qmix_vision **out, qmix_err *err)
{
    *out = NULL;
    qmix_vision *v = calloc(1, sizeof *v);
    if (!v) return qmix_errf(err, "out of memory");
    qmix_vision_config *c = &v->cfg;
    const qmix_gguf *g;
    if (qmix_gguf_open(path, &v->gguf, err)) goto fail;
    g = v->gguf;
    const char *ptype;
    uint64_t plen;
    int r = qmix_gguf_get_str(g, "clip.projector_type", &ptype, &plen, err);
    if (r < 0) goto fail;
    if (!r || plen != 14 || memcmp(ptype, "qwen3vl_merger", 14)) {
        qmix_errf(err, "not a Qwen3.5 vision projector (clip.projector_type is not "
                  "qwen3vl_merger)");
        goto fail;
    }
    int image_size = 0;
    if (gguf_u32(g, "clip.vision.embedding_length", &c->hidden, 1, err) ||
        gguf_u32(g, "clip.vision.block_count", &c->depth, 1, err) ||
        gguf_u32(g, "clip.vision.attention.head_count", &c->heads, 1, err) ||
        gguf_u32(g, "clip.vision.feed_forward_length", &c->intermediate, 1, err) ||
        gguf_u32(g, "clip.vision.patch_size", &c->patch, 1, err) ||
        gguf_u32(g, "clip.vision.spatial_merge_size", &c->merge, 1, err) ||
        gguf_u32(g, "clip.vision.projection_dim", &c->out_hidden, 1, err) ||
        gguf_u32(g, "clip.vision.image_size", &image_size, 1, err))
        goto fail;
    c->temporal_patch = qmix_gguf_find(g, "v.patch_embd.weight.1") ? 2 : 1;
    int side = c->patch > 0 ? image_size / c->patch : 0;
    c->n_pos = side * side;
    if (c->hidden <= 0 || c->heads <= 0 || c->hidden % c->heads || (c->hidden / c->heads) % 4 ||
        c->depth <= 0 || c->depth > 256 || c->intermediate <= 0 || c->intermediate > 65536 ||
        c->patch <= 0 || c->patch > 64 || c->merge <= 0 || c->merge > 4 || side < 2 ||
        side > 1024 || c->hidden > 16384 || c->out_hidden != m->cfg.hidden_size) {
        qmix_errf(err, "unsupported vision geometry (hidden %d, heads %d, blocks %d, patch %d, "
                  "merge %d, image size %d, projection %d for a text width of %d)", c->hidden,
                  c->heads, c->depth, c->patch, c->merge, image_size, c->out_hidden,
                  m->cfg.hidden_size);
        goto fail;
    }
    int minp = 65536, maxp = 16777216; /* the released preprocessor's, when the file has none */
    if (gguf_u32(g, "clip.vision.image_min_pixels", &minp, 0, err) ||
        gguf_u32(g, "clip.vision.image_max_pixels", &maxp, 0, err))
        goto fail;
    c->min_pixels = minp;
    c->max_pixels = maxp;
    for (int i = 0; i < 3; i++) c->mean[i] = c->std[i] = 0.5;
    if (gguf_f32_triple(g, "clip.vision.image_mean", c->mean, err) ||
        gguf_f32_triple(g, "clip.vision.image_std", c->std, err))
        goto fail;
    if (minp <= 0 || maxp < minp || !(c->std[0] > 0 && c->std[1] > 0 && c->std[2] > 0)) {
        qmix_errf(err, "invalid preprocessing settings");
        goto fail;
    }
    c->image_token_id = c->vision_start_id = c->vision_end_id = -1;
    if (gguf_u32(g, "qmix.image_token_id", &c->image_token_id, 0, err) ||
        gguf_u32(g, "qmix.vision_start_token_id", &c->vision_start_id, 0, err) ||
        gguf_u32(g, "qmix.vision_end_token_id", &c->vision_end_id, 0, err))
        goto fail;
    if (c->image_token_id < 0 && tok) {
        c->image_token_id = qmix_tok_token_to_id(tok, "<|image_pad|>");
        c->vision_start_id = qmix_tok_token_to_id(tok, "<|vision_start|>");
        c->vision_end_id = qmix_tok_token_to_id(tok, "<|vision_end|>");
    }
    if (c->image_token_id < 0 || c->image_token_id >= m->cfg.vocab_size) {
        qmix_errf(err, "the image token id is unknown (no <|image_pad|> in the vocabulary)");
        goto fail;
    }

    int64_t D = c->hidden, I = c->intermediate, M = (int64_t)D * c->merge * c->merge;
    int64_t ps = c->patch, tp = c->temporal_patch, K = 3 * tp * ps * ps, P = c->n_pos;
    size_t floats = (size_t)(D + P * D + 2 * M + c->out_hidden + 2 * D) +
                    (size_t)c->depth * (size_t)(4 * D + 3 * D + D + I + D);
    v->f32 = malloc(floats * sizeof(float));
    v->blocks = calloc((size_t)c->depth, sizeof *v->blocks);
    v->patch_copy = malloc((size_t)(D * K) * sizeof(float));
    float *row = malloc((size_t)(3 * ps * ps) * sizeof *row);
    if (!v->f32 || !v->blocks || !v->patch_copy || !row) {
        free(row);
        qmix_errf(err, "out of memory");
        goto fail;
    }
    /* the two Conv2d kernels (one per frame) back into the Conv3d's columns (channel, frame,
     * row, column) */
    for (int64_t f = 0; f < tp; f++) {
        char name[64];
        snprintf(name, sizeof name, f ? "v.patch_embd.weight.%d" : "v.patch_embd.weight", (int)f);
        int64_t ne[4] = {ps, ps, 3, D};
        const qmix_gguf_tensor *t = gtensor(g, name, 4, ne, err);
        if (!t) {
            free(row);
            goto fail;
        }
        qk_mat w = gview(t, D, 3 * ps * ps);
        for (int64_t o = 0; o < D; o++) {
            qk_mat_row_f32(&w, o, row);
            for (int64_t ch = 0; ch < 3; ch++)
                memcpy(v->patch_copy + o * K + (ch * tp + f) * ps * ps, row + ch * ps * ps,
                       (size_t)(ps * ps) * sizeof(float));
        }
    }
    free(row);
    v->patch_embed = (qk_mat){.dtype = QMIX_F32, .rows = D, .cols = K,
                              .row_bytes = (size_t)K * sizeof(float), .data = v->patch_copy};
    float *next = v->f32;
    if (gvec(g, "v.patch_embd.bias", D, 1, &next, &v->patch_b, err) ||
        gvec(g, "v.position_embd.weight", D, P, &next, &v->pos_embed, err) ||
        gvec(g, "v.post_ln.weight", D, 1, &next, &v->merge_norm_w, err) ||
        gvec(g, "v.post_ln.bias", D, 1, &next, &v->merge_norm_b, err) ||
        gmat(g, "mm.0.weight", M, M, &v->merge_fc1, err) ||
        gvec(g, "mm.0.bias", M, 1, &next, &v->merge_fc1_b, err) ||
        gmat(g, "mm.2.weight", c->out_hidden, M, &v->merge_fc2, err) ||
        gvec(g, "mm.2.bias", c->out_hidden, 1, &next, &v->merge_fc2_b, err))
        goto fail;
    for (int i = 0; i < c->depth; i++) {
        qmix_vision_block *bl = &v->blocks[i];
        char n[12][64];
        static const char *const part[12] = {
            "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "attn_qkv.weight",
            "attn_qkv.bias", "attn_out.weight", "attn_out.bias", "ffn_up.weight", "ffn_up.bias",
            "ffn_down.weight", "ffn_down.bias"};
        for (int k = 0; k < 12; k++) snprintf(n[k], sizeof n[k], "v.blk.%d.%s", i, part[k]);
        if (gvec(g, n[0], D, 1, &next, &bl->norm1_w, err) ||
            gvec(g, n[1], D, 1, &next, &bl->norm1_b, err) ||
            gvec(g, n[2], D, 1, &next, &bl->norm2_w, err) ||
            gvec(g, n[3], D, 1, &next, &bl->norm2_b, err) ||
            gmat(g, n[4], 3 * D, D, &bl->qkv, err) ||
            gvec(g, n[5], 3 * D, 1, &next, &bl->qkv_b, err) ||
            gmat(g, n[6], D, D, &bl->proj, err) || gvec(g, n[7], D, 1, &next, &bl->proj_b, err) ||
            gmat(g, n[8], I, D, &bl->fc1, err) || gvec(g, n[9], I, 1, &next, &bl->fc1_b, err) ||
            gmat(g, n[10], D, I, &bl->fc2, err) || gvec(g, n[11], D, 1, &next, &bl->fc2_b, err))
            goto fail;
    }
    *out = v;
    return 0;
fail:
    qmix_err_prefix(err, "%s", path);
    qmix_vision_free(v);
    return -1;
}

/* ---- preprocessing ----------------------------------------------------------------------- */

static qmix_image_prep prep_of(const qmix_vision_config *c)
{
    qmix_image_prep p = {.patch = c->patch, .temporal_patch = c->temporal_patch, .merge = c->merge,
                         .min_pixels = c->min_pixels, .max_pixels = c->max_pixels};
    for (int i = 0; i < 3; i++) {
        p.mean[i] = c->mean[i];
        p.std[i] = c->std[i];
    }
    return p;
}

int qmix_vision_smart_resize(const qmix_vision_config *c, int height, int width, int *out_h,
                             int *out_w, qmix_err *err)
{
    qmix_image_prep p = prep_of(c);
    return qmix_image_smart_resize(&p, height, width, out_h, out_w, err);
}

void qmix_vision_pixels_free(qmix_vision_pixels *p)
{
    if (!p) return;
    free(p->values);
    p->values = NULL;
}

int qmix_vision_preprocess(const qmix_vision_config *c, const qmix_image *img,
                           qmix_vision_pixels *out, qmix_err *err)
{
    *out = (qmix_vision_pixels){0};
    qmix_image_prep p = prep_of(c);
    return qmix_image_patches(&p, img, &out->values, &out->gh, &out->gw, &out->resized_h,
                              &out->resized_w, err);
}

/* ---- the tower --------------------------------------------------------------------------- */

typedef struct mm_ctx {
    const qk_mat *w;
    const float *x;
    int n;
    float *y;
    int64_t step;
} mm_ctx;

static void mm_task(void *arg, int task, int thread)
{
    const mm_ctx *c = arg;
    int64_t begin = task * c->step, end = begin + c->step < c->w->rows ? begin + c->step : c->w->rows;
    qk_matmul(c->w, begin, end, c->x, c->n, c->w->cols, c->y, c->w->rows);
}

/* y[n][rows] = x[n][cols]·Wᵀ + bias, output rows split across the pool. */
static void linear(qmix_pool *pool, const qk_mat *w, const float *bias, const float *x, int n,
                   float *y)
{
    int threads = qmix_pool_threads(pool);
    int64_t step = (w->rows + 4 * threads - 1) / (4 * threads);
    step = (step + 15) & ~(int64_t)15;
    mm_ctx c = {w, x, n, y, step};
    qmix_pool_run(pool, mm_task, &c, (int)((w->rows + step - 1) / step));
    for (int t = 0; t < n; t++)
        for (int64_t o = 0; o < w->rows; o++) y[t * w->rows + o] += bias[o];
}

static void layer_norm(float *out, const float *x, const float *w, const float *b, int64_t n)
{
    double mean = 0, var = 0;
    for (int64_t i = 0; i < n; i++) mean += x[i];
    mean /= (double)n;
    for (int64_t i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    var /= (double)n;
    float inv = (float)(1.0 / sqrt(var + VISION_LN_EPS));
    for (int64_t i = 0; i < n; i++) out[i] = (float)(x[i] - mean) * inv * w[i] + b[i];
}

static float gelu_tanh(float z)
{
    const float k = 0.7978845608028654f; /* sqrt(2/pi) */
    return 0.5f * z * (1.0f + tanhf(k * (z + 0.044715f * z * z * z)));
}

static float gelu_erf(float z) { return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f)); }

/* Full-resolution (row, column) of patch n in merge-block order. */
static void patch_rc(int n, int gw, int m, int *r, int *c)
{
    int blk = n / (m * m), in = n % (m * m), bw = gw / m;
    *r = (blk / bw) * m + in / m;
    *c = (blk % bw) * m + in % m;
}

typedef struct attn_job {
    const float *qkv;            /* [N][3D] with q, k rotated */
    const float *vt;             /* [D][N]: V transposed, head h in rows h·hd… */
    float *out;                  /* [N][D] */
    float *scores;               /* [threads][rows_per_task][N] */
    int N, D, hd, heads, rows_per_task;
} attn_job;

/* Task = a block of query patches for one head: non-causal softmax attention over all the
 * image's patches, as two matmuls through the SIMD kernels (scores = Q·Kᵀ, out = P·V, V
 * transposed so its rows are the output dimensions) around a row softmax. */
static void attn_task(void *arg, int task, int thread)
{
    const attn_job *a = arg;
    int per_head = (a->N + a->rows_per_task - 1) / a->rows_per_task;
    int h = task / per_head, r0 = (task % per_head) * a->rows_per_task;
    int rows = r0 + a->rows_per_task < a->N ? a->rows_per_task : a->N - r0;
    int64_t ld = 3LL * a->D, N = a->N;
    float scale = 1.0f / sqrtf((float)a->hd);
    float *sc = a->scores + (int64_t)thread * a->rows_per_task * N;
    qk_mat keys = {.dtype = QMIX_F32, .rows = N, .cols = a->hd, .row_bytes = (size_t)ld * 4,
                   .data = a->qkv + a->D + (int64_t)h * a->hd};
    qk_matmul(&keys, 0, N, a->qkv + r0 * ld + (int64_t)h * a->hd, rows, ld, sc, N);
    for (int r = 0; r < rows; r++) {
        float *p = sc + r * N, mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < N; j++) {
            p[j] *= scale;
            mx = p[j] > mx ? p[j] : mx;
        }
        for (int64_t j = 0; j < N; j++) sum += p[j] = expf(p[j] - mx);
        float inv = 1.0f / sum;
        for (int64_t j = 0; j < N; j++) p[j] *= inv;
    }
    qk_mat values = {.dtype = QMIX_F32, .rows = a->hd, .cols = N, .row_bytes = (size_t)N * 4,
                     .data = a->vt + (int64_t)h * a->hd * N};
    qk_matmul(&values, 0, a->hd, sc, rows, N, a->out + (int64_t)r0 * a->D + (int64_t)h * a->hd,
              a->D);
}

/* NeoX rotation of a whole head: pair (i, i + hd/2) by angle[i]. */
static void rotate_head(float *x, const float *cs, const float *sn, int hd)
{
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cs[i] - b * sn[i];
        x[i + half] = b * cs[i] + a * sn[i];
    }
}

#define MLP_ROWS 1024 /* rows of the MLP hidden activations held at once */

int qmix_vision_encode(const qmix_vision *v, qmix_pool *pool, const qmix_vision_pixels *px,
                       float *out, qmix_err *err)
{
    const qmix_vision_config *c = &v->cfg;
    int m = c->merge, gh = px->gh, gw = px->gw, N = gh * gw;
    int D = c->hidden, hd = D / c->heads, I = c->intermediate, M = D * m * m;
    int side = (int)lround(sqrt((double)c->n_pos)), threads = qmix_pool_threads(pool);
    if (gh <= 0 || gw <= 0 || gh % m || gw % m)
        return qmix_errf(err, "patch grid %dx%d is not a whole number of %dx%d merge blocks", gh,
                         gw, m, m);
    int chunk = N < MLP_ROWS ? N : MLP_ROWS;
    size_t nx = (size_t)N * D, hidden = (size_t)chunk * (I > M ? I : M);
    float *x = malloc(nx * sizeof *x), *h = malloc(nx * sizeof *h), *o = malloc(nx * sizeof *o);
    float *qkv = malloc(3 * nx * sizeof *qkv), *mid = malloc(hidden * sizeof *mid);
    int qblock = 32; /* query rows per attention task */
    float *scores = malloc((size_t)threads * qblock * N * sizeof *scores);
    float *vt = malloc(nx * sizeof *vt);
    float *cs = malloc((size_t)N * (hd / 2) * sizeof *cs), *sn = malloc((size_t)N * (hd / 2) * sizeof *sn);
    if (!x || !h || !o || !qkv || !mid || !scores || !vt || !cs || !sn) {
        free(x), free(h), free(o), free(qkv), free(mid), free(scores), free(vt), free(cs), free(sn);
        return qmix_errf(err, "out of memory running the vision tower on %d patches", N);
    }

    /* patch embedding: Conv3d with stride = kernel is a linear map of each flattened patch */
    linear(pool, &v->patch_embed, v->patch_b, px->values, N, x);

    /* absolute position embedding, bilinear (align_corners) from the side x side table, and the
     * 2-D rotary angles: hd/4 row frequencies then hd/4 column frequencies */
    int q4 = hd / 4;
    for (int n = 0; n < N; n++) {
        int r, col;
        patch_rc(n, gw, m, &r, &col);
        double sr = gh > 1 ? (double)r * (side - 1) / (gh - 1) : 0.0;
        double sc = gw > 1 ? (double)col * (side - 1) / (gw - 1) : 0.0;
        int r0 = (int)floor(sr), c0 = (int)floor(sc);
        int r1 = r0 + 1 < side ? r0 + 1 : side - 1, c1 = c0 + 1 < side ? c0 + 1 : side - 1;
        double fr = sr - r0, fc = sc - c0;
        const float *p00 = v->pos_embed + ((int64_t)r0 * side + c0) * D,
                    *p01 = v->pos_embed + ((int64_t)r0 * side + c1) * D,
                    *p10 = v->pos_embed + ((int64_t)r1 * side + c0) * D,
                    *p11 = v->pos_embed + ((int64_t)r1 * side + c1) * D;
        double w00 = (1 - fr) * (1 - fc), w01 = (1 - fr) * fc, w10 = fr * (1 - fc), w11 = fr * fc;
        float *xn = x + (int64_t)n * D;
        for (int d = 0; d < D; d++)
            xn[d] += (float)(w00 * p00[d] + w01 * p01[d] + w10 * p10[d] + w11 * p11[d]);
        for (int j = 0; j < q4; j++) {
            double inv = pow(VISION_ROPE_THETA, -2.0 * j / (hd / 2));
            double ar = r * inv, ac = col * inv;
            cs[(int64_t)n * (hd / 2) + j] = (float)cos(ar);
            sn[(int64_t)n * (hd / 2) + j] = (float)sin(ar);
            cs[(int64_t)n * (hd / 2) + q4 + j] = (float)cos(ac);
            sn[(int64_t)n * (hd / 2) + q4 + j] = (float)sin(ac);
        }
    }

    attn_job aj = {.qkv = qkv, .vt = vt, .out = o, .scores = scores, .N = N, .D = D, .hd = hd,
                   .heads = c->heads, .rows_per_task = qblock};
    int attn_tasks = c->heads * ((N + aj.rows_per_task - 1) / aj.rows_per_task);
    for (int i = 0; i < c->depth; i++) {
        const qmix_vision_block *bl = &v->blocks[i];
        for (int n = 0; n < N; n++)
            layer_norm(h + (int64_t)n * D, x + (int64_t)n * D, bl->norm1_w, bl->norm1_b, D);
        linear(pool, &bl->qkv, bl->qkv_b, h, N, qkv);
        for (int n = 0; n < N; n++)
            for (int hh = 0; hh < c->heads; hh++)
                for (int part = 0; part < 2; part++) /* q, then k */
                    rotate_head(qkv + (int64_t)n * 3 * D + (int64_t)part * D + (int64_t)hh * hd,
                                cs + (int64_t)n * (hd / 2), sn + (int64_t)n * (hd / 2), hd);
        for (int n = 0; n < N; n++)
            for (int d = 0; d < D; d++) vt[(int64_t)d * N + n] = qkv[(int64_t)n * 3 * D + 2 * D + d];
        qmix_pool_run(pool, attn_task, &aj, attn_tasks);
        linear(pool, &bl->proj, bl->proj_b, o, N, h);
        for (size_t k = 0; k < nx; k++) x[k] += h[k];
        for (int n = 0; n < N; n++)
            layer_norm(h + (int64_t)n * D, x + (int64_t)n * D, bl->norm2_w, bl->norm2_b, D);
        for (int r0 = 0; r0 < N; r0 += chunk) {
            int rows = N - r0 < chunk ? N - r0 : chunk;
            linear(pool, &bl->fc1, bl->fc1_b, h + (int64_t)r0 * D, rows, mid);
            for (size_t k = 0; k < (size_t)rows * I; k++) mid[k] = gelu_tanh(mid[k]);
            linear(pool, &bl->fc2, bl->fc2_b, mid, rows, o + (int64_t)r0 * D);
        }
        for (size_t k = 0; k < nx; k++) x[k] += o[k];
    }

    /* merger: LayerNorm per patch, 4 consecutive patches (one 2x2 block) concatenated, fc1,
     * exact GELU, fc2 */
    for (int n = 0; n < N; n++)
        layer_norm(h + (int64_t)n * D, x + (int64_t)n * D, v->merge_norm_w, v->merge_norm_b, D);
    int blocks = N / (m * m), bchunk = chunk / (m * m) > 0 ? chunk / (m * m) : 1;
    for (int b0 = 0; b0 < blocks; b0 += bchunk) {
        int rows = blocks - b0 < bchunk ? blocks - b0 : bchunk;
        linear(pool, &v->merge_fc1, v->merge_fc1_b, h + (int64_t)b0 * M, rows, mid);
        for (size_t k = 0; k < (size_t)rows * M; k++) mid[k] = gelu_erf(mid[k]);
        linear(pool, &v->merge_fc2, v->merge_fc2_b, mid, rows,
               out + (int64_t)b0 * c->out_hidden);
    }
    free(x), free(h), free(o), free(qkv), free(mid), free(scores), free(vt), free(cs), free(sn);
    return 0;
}

/* ---- prompts ----------------------------------------------------------------------------- */

static uint64_t fnv1a(uint64_t h, const void *data, size_t len)
{
    const uint8_t *p = data;
    for (size_t i = 0; i < len; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

void qmix_prompt_image_free(qmix_prompt_image *img)
{
    if (!img) return;
    free(img->embeds);
    img->embeds = NULL;
}

int qmix_vision_prompt_image(const qmix_vision *v, qmix_pool *pool, const void *data, size_t len,
                             const char *label, qmix_prompt_image *out, qmix_err *err)
{
    *out = (qmix_prompt_image){0};
    qmix_image img;
    qmix_vision_pixels px;
    if (qmix_image_decode(data, len, label, &img, err)) return -1;
    int rc = qmix_vision_preprocess(&v->cfg, &img, &px, err);
    qmix_image_free(&img);
    if (rc) return qmix_err_prefix(err, "%s", label);
    int m = v->cfg.merge, lh = px.gh / m, lw = px.gw / m;
    float *emb = malloc((size_t)lh * lw * v->cfg.out_hidden * sizeof *emb);
    if (!emb) {
        qmix_vision_pixels_free(&px);
        return qmix_errf(err, "%s: out of memory", label);
    }
    if (qmix_vision_encode(v, pool, &px, emb, err)) {
        free(emb);
        qmix_vision_pixels_free(&px);
        return -1;
    }
    uint64_t h = fnv1a(0xcbf29ce484222325ULL, &px.gh, sizeof px.gh);
    h = fnv1a(h, &px.gw, sizeof px.gw);
    h = fnv1a(h, px.values, (size_t)px.gh * px.gw * 3 * v->cfg.temporal_patch * v->cfg.patch *
                                v->cfg.patch * sizeof(float));
    qmix_vision_pixels_free(&px);
    *out = (qmix_prompt_image){.lh = lh, .lw = lw, .embeds = emb, .hash = h ? h : 1};
    return 0;
}

int qmix_mrope_positions(const int32_t *tokens, int n, int image_token_id, const int *lh,
                         const int *lw, int n_images, int start, int32_t *pos3)
{
    int p = start, img = 0;
    for (int t = 0; t < n;) {
        if (tokens[t] != image_token_id) {
            pos3[3 * t] = pos3[3 * t + 1] = pos3[3 * t + 2] = p++;
            t++;
            continue;
        }
        if (img >= n_images) return -1;
        int count = lh[img] * lw[img];
        if (t + count > n) return -1;
        for (int k = 0; k < count; k++) {
            if (tokens[t + k] != image_token_id) return -1;
            pos3[3 * (t + k)] = p;
            pos3[3 * (t + k) + 1] = p + k / lw[img];
            pos3[3 * (t + k) + 2] = p + k % lw[img];
        }
        t += count;
        p += lh[img] > lw[img] ? lh[img] : lw[img];
        img++;
    }
    return img == n_images ? p : -1;
}

void qmix_mm_prompt_free(qmix_mm_prompt *p)
{
    if (!p) return;
    free(p->tokens);
    free(p->embeds);
    free(p->pos3);
    free(p->keys);
    *p = (qmix_mm_prompt){0};
}

int qmix_mm_prompt_build(const int32_t *ids, int n_ids, int image_token_id,
                         const qmix_prompt_image *images, int n_images, int embed_dim,
                         qmix_mm_prompt *out, qmix_err *err)
{
    *out = (qmix_mm_prompt){0};
    int pads = 0;
    int64_t n = 0;
    for (int i = 0; i < n_ids; i++) {
        if (ids[i] == image_token_id) {
            if (pads < n_images) n += (int64_t)images[pads].lh * images[pads].lw;
            pads++;
        } else {
            n++;
        }
    }
    if (pads != n_images)
        return qmix_errf(err, "the prompt has %d image placeholders but %d images were given",
                         pads, n_images);
    if (n > INT_MAX / 4) return qmix_errf(err, "prompt too long (%lld tokens)", (long long)n);
    out->tokens = malloc(sizeof *out->tokens * (size_t)(n ? n : 1));
    out->embeds = calloc((size_t)(n ? n : 1), sizeof *out->embeds);
    out->pos3 = malloc(sizeof *out->pos3 * 3 * (size_t)(n ? n : 1));
    out->keys = malloc(sizeof *out->keys * (size_t)(n ? n : 1));
    int *lh = malloc(sizeof *lh * (size_t)(n_images + 1)), *lw = malloc(sizeof *lw * (size_t)(n_images + 1));
    if (!out->tokens || !out->embeds || !out->pos3 || !out->keys || !lh || !lw) {
        free(lh), free(lw);
        qmix_mm_prompt_free(out);
        return qmix_errf(err, "out of memory");
    }
    int at = 0, img = 0;
    uint64_t hash = 0;
    for (int i = 0; i < n_ids; i++) {
        if (ids[i] != image_token_id) {
            out->keys[at] = ids[i];
            out->tokens[at++] = ids[i];
            continue;
        }
        const qmix_prompt_image *im = &images[img++];
        for (int k = 0; k < im->lh * im->lw; k++) {
            uint64_t h = (im->hash ^ ((uint64_t)k * 0x9e3779b97f4a7c15ULL)) * 0xbf58476d1ce4e5b9ULL;
            out->keys[at] = -1 - (int32_t)((h ^ (h >> 31)) & 0x3fffffff);
            out->embeds[at] = im->embeds + (int64_t)k * embed_dim;
            out->tokens[at++] = image_token_id;
        }
        hash = (hash ^ im->hash) * 0x100000001b3ULL + 1;
    }
    out->n = (int)n;
    for (int k = 0; k < n_images; k++) {
        lh[k] = images[k].lh;
        lw[k] = images[k].lw;
    }
    out->next_pos = qmix_mrope_positions(out->tokens, out->n, image_token_id, lh, lw, n_images, 0,
                                         out->pos3);
    free(lh), free(lw);
    out->image_hash = hash;
    if (out->next_pos < 0) {
        qmix_mm_prompt_free(out);
        return qmix_errf(err, "image placeholders do not match the images");
    }
    return 0;
}
