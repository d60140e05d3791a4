#include "formats/config.h"
#include "formats/gguf.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/err.h"
#include "util/fileio.h"

/* Upper bound on any single dimension: far above real models, low enough that products of a few
 * of them cannot overflow 64-bit sizes. */
#define MAX_DIM (1 << 24)

static int get_int(json_t *obj, const char *key, int required, int fallback, int *out,
                   const char *label, qmix_err *err)
{
    json_t *v = json_object_get(obj, key);
    if (!v) {
        if (required) return qmix_errf(err, "%s: missing required field '%s'", label, key);
        *out = fallback;
        return 0;
    }
    if (!json_is_integer(v))
        return qmix_errf(err, "%s: field '%s' is not an integer", label, key);
    json_int_t x = json_integer_value(v);
    if (x < 0 || x > MAX_DIM)
        return qmix_errf(err, "%s: field '%s' = %lld is out of range", label, key, (long long)x);
    *out = (int)x;
    return 0;
}

static int get_num(json_t *obj, const char *key, double fallback, double *out, const char *label,
                   qmix_err *err)
{
    json_t *v = json_object_get(obj, key);
    if (!v) {
        *out = fallback;
        return 0;
    }
    if (!json_is_number(v)) return qmix_errf(err, "%s: field '%s' is not a number", label, key);
    *out = json_number_value(v);
    if (!isfinite(*out)) return qmix_errf(err, "%s: field '%s' is not finite", label, key);
    return 0;
}

static int get_bool(json_t *obj, const char *key, int *out, const char *label, qmix_err *err)
{
    json_t *v = json_object_get(obj, key);
    if (!v) return 0;
    if (!json_is_boolean(v)) return qmix_errf(err, "%s: field '%s' is not a boolean", label, key);
    *out = json_is_true(v);
    return 0;
}

static int read_layer_types(json_t *text, qmix_config *c, const char *label, qmix_err *err)
{
    json_t *types = json_object_get(text, "layer_types");
    if (types) {
        if (!json_is_array(types) || json_array_size(types) != (size_t)c->n_layers)
            return qmix_errf(err, "%s: layer_types must be an array of num_hidden_layers (%d) "
                             "strings", label, c->n_layers);
        for (int i = 0; i < c->n_layers; i++) {
            const char *s = json_string_value(json_array_get(types, i));
            if (s && !strcmp(s, "full_attention")) c->layer_is_full[i] = 1;
            else if (s && !strcmp(s, "linear_attention")) c->layer_is_full[i] = 0;
            else return qmix_errf(err, "%s: layer_types[%d] is '%s', expected full_attention or "
                                  "linear_attention", label, i, s ? s : "(not a string)");
        }
        return 0;
    }
    int interval;
    if (!json_object_get(text, "full_attention_interval"))
        return qmix_errf(err, "%s: neither layer_types nor full_attention_interval given", label);
    if (get_int(text, "full_attention_interval", 1, 0, &interval, label, err)) return -1;
    if (interval < 1) return qmix_errf(err, "%s: full_attention_interval must be >= 1", label);
    for (int i = 0; i < c->n_layers; i++) c->layer_is_full[i] = (i + 1) % interval == 0;
    return 0;
}

static int read_text_config(json_t *root, json_t *text, qmix_config *c, const char *label,
                            qmix_err *err)
{
    static const struct { const char *key; size_t offset; } required[] = {
        {"hidden_size", offsetof(qmix_config, hidden_size)},
        {"num_hidden_layers", offsetof(qmix_config, n_layers)},
        {"vocab_size", offsetof(qmix_config, vocab_size)},
        {"num_attention_heads", offsetof(qmix_config, n_heads)},
        {"num_key_value_heads", offsetof(qmix_config, n_kv_heads)},
        {"head_dim", offsetof(qmix_config, head_dim)},
        {"linear_num_key_heads", offsetof(qmix_config, lin_n_k_heads)},
        {"linear_num_value_heads", offsetof(qmix_config, lin_n_v_heads)},
        {"linear_key_head_dim", offsetof(qmix_config, lin_k_head_dim)},
        {"linear_value_head_dim", offsetof(qmix_config, lin_v_head_dim)},
        {"linear_conv_kernel_dim", offsetof(qmix_config, conv_kernel)},
        {"num_experts", offsetof(qmix_config, n_experts)},
        {"num_experts_per_tok", offsetof(qmix_config, n_experts_used)},
        {"moe_intermediate_size", offsetof(qmix_config, moe_ffn)},
        {"shared_expert_intermediate_size", offsetof(qmix_config, shared_ffn)},
    };
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++) {
        int *field = (int *)((char *)c + required[i].offset);
        if (get_int(text, required[i].key, 1, 0, field, label, err)) return -1;
        if (*field <= 0)
            return qmix_errf(err, "%s: field '%s' must be positive", label, required[i].key);
    }
    if (c->n_layers > QMIX_MAX_LAYERS)
        return qmix_errf(err, "%s: %d layers (at most %d supported)", label, c->n_layers,
                         QMIX_MAX_LAYERS);
    if (c->conv_kernel < 2)
        return qmix_errf(err, "%s: linear_conv_kernel_dim %d must be at least 2", label,
                         c->conv_kernel);
    if (c->n_heads % c->n_kv_heads)
        return qmix_errf(err, "%s: num_attention_heads %d is not a multiple of "
                         "num_key_value_heads %d", label, c->n_heads, c->n_kv_heads);
    if (c->lin_n_v_heads % c->lin_n_k_heads)
        return qmix_errf(err, "%s: linear_num_value_heads %d is not a multiple of "
                         "linear_num_key_heads %d", label, c->lin_n_v_heads, c->lin_n_k_heads);
    if (c->n_experts_used > c->n_experts)
        return qmix_errf(err, "%s: num_experts_per_tok %d exceeds num_experts %d", label,
                         c->n_experts_used, c->n_experts);

    /* rope_parameters wins over the flat keys, as in llama.cpp's reading of real configs. */
    json_t *rope = json_object_get(text, "rope_parameters");
    if (rope && !json_is_object(rope))
        return qmix_errf(err, "%s: rope_parameters is not an object", label);
    double partial, theta, eps;
    if (get_num(text, "partial_rotary_factor", 1.0, &partial, label, err)) return -1;
    if (get_num(text, "rope_theta", 10000.0, &theta, label, err)) return -1;
    if (rope && (get_num(rope, "partial_rotary_factor", partial, &partial, label, err) ||
                 get_num(rope, "rope_theta", theta, &theta, label, err)))
        return -1;
    if (partial <= 0 || partial > 1)
        return qmix_errf(err, "%s: partial_rotary_factor %g must be in (0, 1]", label, partial);
    if (theta <= 0) return qmix_errf(err, "%s: rope_theta must be positive", label);
    c->rot_dim = (int)lround(c->head_dim * partial);
    if (c->rot_dim % 2 || c->rot_dim == 0)
        return qmix_errf(err, "%s: rotary dimension %d (head_dim x partial_rotary_factor) is %s",
                         label, c->rot_dim, c->rot_dim ? "odd" : "zero");
    c->rope_theta = theta;
    /* M-RoPE sections (interleaved): only image tokens have differing (t, h, w) positions */
    json_t *sec = json_object_get(rope ? rope : text, "mrope_section");
    if (!sec && rope) sec = json_object_get(text, "mrope_section");
    memset(c->mrope_section, 0, sizeof c->mrope_section);
    if (sec) { /* sections past the rotary pairs are harmless: the interleaving stops there */
        if (json_array_size(sec) != 3)
            return qmix_errf(err, "%s: mrope_section is not a list of 3 integers", label);
        for (int i = 0; i < 3; i++) {
            json_t *v = json_array_get(sec, (size_t)i);
            if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 65536)
                return qmix_errf(err, "%s: mrope_section[%d] is not a valid section", label, i);
            c->mrope_section[i] = (int)json_integer_value(v);
        }
    }
    if (get_num(text, "rms_norm_eps", 1e-6, &eps, label, err)) return -1;
    /* checked as the float it is used as: 1e-50 would become 0, 1e300 infinity */
    if (!(eps > 0) || !((float)eps > 0) || !isfinite((float)eps))
        return qmix_errf(err, "%s: rms_norm_eps %g must be a positive float", label, eps);
    c->rms_eps = (float)eps;

    c->tie_embeddings = 0;
    if (get_bool(root, "tie_word_embeddings", &c->tie_embeddings, label, err)) return -1;
    if (text != root && get_bool(text, "tie_word_embeddings", &c->tie_embeddings, label, err))
        return -1;
    if (get_int(text, "mtp_num_hidden_layers", 0, 0, &c->mtp_layers, label, err)) return -1;
    if (get_int(text, "max_position_embeddings", 0, 262144, &c->max_position_embeddings, label,
                err))
        return -1;
    json_t *eos = json_object_get(text, "eos_token_id");
    if (!eos) eos = json_object_get(root, "eos_token_id");
    if (json_is_array(eos)) eos = json_array_get(eos, 0);
    c->eos_token_id = json_is_integer(eos) ? (int)json_integer_value(eos) : -1;
    return read_layer_types(text, c, label, err);
}

int qmix_config_parse(const char *text, size_t len, const char *label, qmix_config *cfg,
                      qmix_err *err)
{
    memset(cfg, 0, sizeof *cfg);
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) return qmix_errf(err, "%s: bad JSON at line %d: %s", label, jerr.line, jerr.text);
    int rc;
    if (!json_is_object(root)) {
        rc = qmix_errf(err, "%s: not a JSON object", label);
    } else {
        json_t *tc = json_object_get(root, "text_config");
        if (tc && !json_is_object(tc)) rc = qmix_errf(err, "%s: text_config is not an object", label);
        else rc = read_text_config(root, tc ? tc : root, cfg, label, err);
    }
    json_decref(root);
    return rc;
}

int qmix_config_load(const char *path, qmix_config *cfg, qmix_err *err)
{
    char *text;
    size_t len;
    if (qmix_read_file(path, 64u << 20, &text, &len, err)) return -1;
    int rc = qmix_config_parse(text, len, path, cfg, err);
    free(text);
    return rc;
}

int qmix_generation_config_load(const char *model_dir, qmix_generation_config *out,
                                qmix_err *err)
{
    memset(out, 0, sizeof *out);
    size_t dlen = strlen(model_dir);
    if (dlen > 5 && !strcmp(model_dir + dlen - 5, ".gguf")) { /* GGUF: only its eos id */
        qmix_gguf *g;
        int64_t eos;
        if (qmix_gguf_open(model_dir, &g, err)) return -1;
        int r = qmix_gguf_get_int(g, "tokenizer.ggml.eos_token_id", &eos, err);
        if (r > 0 && eos >= 0 && eos <= INT32_MAX) out->eos[out->n_eos++] = (int)eos;
        qmix_gguf_close(g);
        return r < 0 ? -1 : 0;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/generation_config.json", model_dir);
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    fclose(f);
    char *text;
    size_t len;
    if (qmix_read_file(path, 16u << 20, &text, &len, err)) return -1;
    json_error_t jerr;
    json_t *root = json_loadb(text, len, 0, &jerr);
    free(text);
    if (!json_is_object(root)) {
        json_decref(root);
        return qmix_errf(err, "%s: not a JSON object (%s)", path, jerr.text);
    }
    json_t *eos = json_object_get(root, "eos_token_id"), *v;
    if (json_is_integer(eos)) {
        out->eos[out->n_eos++] = (int)json_integer_value(eos);
    } else if (json_is_array(eos)) {
        size_t i;
        json_array_foreach(eos, i, v) if (json_is_integer(v) && out->n_eos < QMIX_MAX_EOS)
            out->eos[out->n_eos++] = (int)json_integer_value(v);
    }
    if (json_is_number(v = json_object_get(root, "temperature")))
        out->has_temperature = 1, out->temperature = json_number_value(v);
    if (json_is_number(v = json_object_get(root, "top_p")))
        out->has_top_p = 1, out->top_p = json_number_value(v);
    if (json_is_integer(v = json_object_get(root, "top_k")))
        out->has_top_k = 1, out->top_k = (int)json_integer_value(v);
    json_decref(root);
    return 0;
}
