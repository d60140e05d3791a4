/* The Qwen3.5 vision tower (Hugging Face Qwen3_5MoeVisionModel) and the image side of a prompt:
 * preprocessing (smart_resize, Pillow bicubic, normalisation, merge-block patch order), the tower
 * (patch embedding, interpolated absolute position embedding, 2-D rotary, pre-norm LayerNorm
 * blocks with tanh-GELU MLPs, the 2x2 merger with erf-GELU), and the interleaved M-RoPE (t, h, w)
 * positions of image tokens and the text after them. */
#ifndef QMIX_MODEL_VISION_H
#define QMIX_MODEL_VISION_H

#include <stdint.h>

#include "formats/image.h"
#include "kernels/kernels.h"
#include "qmix.h"
#include "runtime/threadpool.h"

typedef struct qmix_vision_config {
    int hidden, depth, heads, intermediate;   /* D, blocks, nh, I */
    int patch, temporal_patch, merge;         /* ps, tp, m */
    int n_pos;                                /* P = side * side */
    int out_hidden;                           /* Dt */
    int image_token_id, vision_start_id, vision_end_id;
    int64_t min_pixels, max_pixels;           /* preprocessor_config.json size.{shortest,longest}_edge */
    double mean[3], std[3];
} qmix_vision_config;

typedef struct qmix_vision_block {
    float *norm1_w, *norm1_b, *norm2_w, *norm2_b;
    qk_mat qkv, proj, fc1, fc2;
    float *qkv_b, *proj_b, *fc1_b, *fc2_b;
} qmix_vision_block;

typedef struct qmix_vision {
    qmix_vision_config cfg;
    qk_mat patch_embed;          /* [D, 3·tp·ps·ps] */
    float *patch_b;              /* [D] */
    float *pos_embed;            /* [P, D], widened */
    qmix_vision_block *blocks;
    float *merge_norm_w, *merge_norm_b;
    qk_mat merge_fc1, merge_fc2;
    float *merge_fc1_b, *merge_fc2_b;
    float *f32;                  /* every widened vector above */
    float *patch_copy;           /* patch_embed permuted from mlx-vlm's channels-last or joined
                                    from an mmproj's two frames, or NULL */
    struct qmix_gguf *gguf;      /* the mmproj file the views point into, or NULL */
} qmix_vision;

/* An image ready for the tower: normalised patches [gh·gw][3·tp·ps·ps] in merge-block order. */
typedef struct qmix_vision_pixels {
    int gh, gw;                  /* patch grid of the resized image */
    int resized_h, resized_w;
    float *values;
} qmix_vision_pixels;

struct qmix_model;
/* The model's tower (config.json vision_config, model.visual.* or vision_tower.* tensors,
 * preprocessor_config.json beside it). A model without one is an error saying so. */
int qmix_vision_open(struct qmix_model *model, qmix_vision **out, qmix_err *err);
/* The tower from llama.cpp's separate mmproj GGUF (projector qwen3vl_merger) for model (any
 * form, typically a text GGUF). tok (may be NULL) gives the image token ids when the file does
 * not. F32/F16/BF16 tensors only. */
struct qmix_tokenizer;
int qmix_vision_open_mmproj(struct qmix_model *model, const char *path,
                            const struct qmix_tokenizer *tok, qmix_vision **out, qmix_err *err);
void qmix_vision_free(qmix_vision *v);
/* 1 when the checkpoint has a vision_config and tower tensors (cheap: no allocation). */
int qmix_model_has_vision(const struct qmix_model *model);

/* smart_resize: the size an H x W image is stretched to (multiples of ps·m, pixel count within
 * [min_pixels, max_pixels], Python's half-to-even rounding); aspect ratio over 200 is an error. */
int qmix_vision_smart_resize(const qmix_vision_config *c, int height, int width, int *out_h,
                             int *out_w, qmix_err *err);
int qmix_vision_preprocess(const qmix_vision_config *c, const qmix_image *img,
                           qmix_vision_pixels *out, qmix_err *err);
void qmix_vision_pixels_free(qmix_vision_pixels *p);

/* Runs the tower on one image: out [gh·gw/m²][Dt], one row per merged 2x2 block, raster order. */
int qmix_vision_encode(const qmix_vision *v, qmix_pool *pool, const qmix_vision_pixels *px,
                       float *out, qmix_err *err);

/* One image of a prompt: its merged grid and embeddings (owned). */
typedef struct qmix_prompt_image {
    int lh, lw;                  /* merged grid: gh/m x gw/m; lh·lw image tokens */
    float *embeds;               /* [lh·lw][Dt] */
    uint64_t hash;               /* of the normalised pixels and grid: prefix-cache identity */
} qmix_prompt_image;

/* Decodes, preprocesses and encodes an encoded image (PNG/JPEG bytes). */
int qmix_vision_prompt_image(const qmix_vision *v, qmix_pool *pool, const void *data, size_t len,
                             const char *label, qmix_prompt_image *out, qmix_err *err);
void qmix_prompt_image_free(qmix_prompt_image *img);

/* A prompt with its images spliced in: tokens with each single <|image_pad|> expanded to lh·lw
 * copies, per token the embedding that replaces the token's own (NULL for text) and the M-RoPE
 * (t, h, w) positions, and the position the next token takes. */
typedef struct qmix_mm_prompt {
    int32_t *tokens;
    int n;
    const float **embeds;        /* [n] */
    int32_t *pos3;               /* [n][3] */
    int32_t *keys;               /* [n]: tokens, but image rows get negative ids derived from the
                                    image's hash and the row: prefix matching on keys tells
                                    different images apart (prefix caches) */
    int next_pos;
    uint64_t image_hash;         /* combined hash of the images, in order (0: none) */
} qmix_mm_prompt;

/* ids: a rendered prompt holding exactly n_images <|image_pad|> tokens, one per image;
 * embed_dim: the text hidden size (the images' embedding rows). The embeds point into images,
 * which must outlive the prompt. */
int qmix_mm_prompt_build(const int32_t *ids, int n_ids, int image_token_id,
                         const qmix_prompt_image *images, int n_images, int embed_dim,
                         qmix_mm_prompt *out, qmix_err *err);
void qmix_mm_prompt_free(qmix_mm_prompt *p);

/* The M-RoPE positions of tokens[n] starting at running position start (HF get_rope_index):
 * text tokens (p, p, p), the k-th run of image_token_id (lh·lw tokens of image k) (s, s+i, s+j),
 * text after it resuming at s + max(lh, lw). Returns the next running position, or -1 when the
 * runs do not match the images. */
int qmix_mrope_positions(const int32_t *tokens, int n, int image_token_id, const int *lh,
                         const int *lw, int n_images, int start, int32_t *pos3);

#endif
