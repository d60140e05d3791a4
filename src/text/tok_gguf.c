/* GGUF tokenizer KVs <-> tokenizer.json. GGUF keeps the vocabulary as an id-ordered string array
 * with a type per token (control / user-defined tokens are HF's added tokens, special or not),
 * merges as "a b" strings and the pre-tokenizer only as a name, so the regex comes from this
 * table of the names qmix knows. */
#include "text/tok_gguf.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/err.h"

const char *const QMIX_REGEX_QWEN2 =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const char *const QMIX_REGEX_QWEN35 =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}"
    "\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

static int str_is(const char *s, uint64_t len, const char *lit)
{
    return len == strlen(lit) && !memcmp(s, lit, len);
}

static json_t *byte_level(void)
{
    return json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0,
                     "trim_offsets", 0, "use_regex", 0);
}

int qmix_tok_gguf_json(const qmix_gguf *g, char **json, size_t *len, qmix_err *err)
{
    *json = NULL;
    const char *path = qmix_gguf_file_path(g, 0), *s;
    uint64_t n;
    int r = qmix_gguf_get_str(g, "tokenizer.ggml.model", &s, &n, err);
    if (r < 0) return -1;
    if (!r) return qmix_errf(err, "%s: no tokenizer (KV 'tokenizer.ggml.model' missing)", path);
    if (!str_is(s, n, "gpt2"))
        return qmix_errf(err, "%s: tokenizer model '%.*s' is not supported (byte-level BPE "
                         "'gpt2' only)", path, (int)(n > 64 ? 64 : n), s);
    const char *regex = QMIX_REGEX_QWEN35;
    if ((r = qmix_gguf_get_str(g, "tokenizer.ggml.pre", &s, &n, err)) < 0) return -1;
    if (r && str_is(s, n, "qwen2")) regex = QMIX_REGEX_QWEN2;
    else if (r && !str_is(s, n, "qwen35"))
        return qmix_errf(err, "%s: tokenizer.ggml.pre '%.*s' is not supported (qwen35, qwen2)",
                         path, (int)(n > 64 ? 64 : n), s);
    const qmix_gguf_kv *tokens = qmix_gguf_kv_find(g, "tokenizer.ggml.tokens");
    const qmix_gguf_kv *types = qmix_gguf_kv_find(g, "tokenizer.ggml.token_type");
    const qmix_gguf_kv *merges = qmix_gguf_kv_find(g, "tokenizer.ggml.merges");
    if (!tokens || tokens->type != QMIX_GGUF_ARRAY || tokens->arr_type != QMIX_GGUF_STRING)
        return qmix_errf(err, "%s: KV 'tokenizer.ggml.tokens' missing or not a string array",
                         path);
    if (types && (types->type != QMIX_GGUF_ARRAY || types->arr_n != tokens->arr_n ||
                  types->arr_type == QMIX_GGUF_STRING || types->arr_type == QMIX_GGUF_F32 ||
                  types->arr_type == QMIX_GGUF_F64))
        return qmix_errf(err, "%s: KV 'tokenizer.ggml.token_type' is not an integer array of "
                         "one type per token", path);
    if (merges && (merges->type != QMIX_GGUF_ARRAY || merges->arr_type != QMIX_GGUF_STRING))
        return qmix_errf(err, "%s: KV 'tokenizer.ggml.merges' is not a string array", path);

    json_t *vocab = json_object(), *added = json_array(), *mlist = json_array();
    int rc = 0;
    const uint8_t *cur = tokens->data;
    for (uint64_t i = 0; i < tokens->arr_n && !rc; i++) {
        qmix_gguf_arr_str_next(&cur, &s, &n);
        int64_t type = types ? qmix_gguf_arr_int(types, i) : QMIX_TOKTYPE_NORMAL;
        if (type == QMIX_TOKTYPE_UNUSED) continue;
        json_t *content = json_stringn(s, n);
        if (!content) {
            rc = qmix_errf(err, "%s: token %llu is not valid UTF-8", path, (unsigned long long)i);
            break;
        }
        if (type == QMIX_TOKTYPE_CONTROL || type == QMIX_TOKTYPE_USER_DEFINED) {
            json_array_append_new(added, json_pack("{s:I, s:o, s:b, s:b, s:b, s:b, s:b}", "id",
                                                   (json_int_t)i, "content", content,
                                                   "single_word", 0, "lstrip", 0, "rstrip", 0,
                                                   "normalized", 0, "special",
                                                   type == QMIX_TOKTYPE_CONTROL));
        } else {
            json_object_set_new(vocab, json_string_value(content), json_integer((json_int_t)i));
            json_decref(content);
            if (memchr(s, 0, n))
                rc = qmix_errf(err, "%s: token %llu contains a NUL byte", path,
                               (unsigned long long)i);
        }
    }
    cur = merges ? merges->data : NULL;
    for (uint64_t i = 0; merges && i < merges->arr_n && !rc; i++) {
        qmix_gguf_arr_str_next(&cur, &s, &n);
        json_t *m = json_stringn(s, n);
        if (!m) rc = qmix_errf(err, "%s: merge %llu is not valid UTF-8", path,
                               (unsigned long long)i);
        else json_array_append_new(mlist, m);
    }
    if (rc) {
        json_decref(vocab);
        json_decref(added);
        json_decref(mlist);
        return rc;
    }
    json_t *root = json_pack(
        "{s:s, s:o, s:{s:s}, s:{s:s, s:[{s:s, s:{s:s}, s:s, s:b}, o]}, s:o, s:o,"
        " s:{s:s, s:n, s:n, s:s, s:s, s:b, s:b, s:b, s:o, s:o}}",
        "version", "1.0", "added_tokens", added, "normalizer", "type", "NFC", "pre_tokenizer",
        "type", "Sequence", "pretokenizers", "type", "Split", "pattern", "Regex", regex,
        "behavior", "Isolated", "invert", 0, byte_level(), "post_processor", byte_level(),
        "decoder", byte_level(), "model", "type", "BPE", "dropout", "unk_token",
        "continuing_subword_prefix", "", "end_of_word_suffix", "", "fuse_unk", 0,
        "byte_fallback", 0, "ignore_merges", 0, "vocab", vocab, "merges", mlist);
    if (!root) return qmix_errf(err, "%s: out of memory building the tokenizer", path);
    *json = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (!*json) return qmix_errf(err, "%s: out of memory building the tokenizer", path);
    *len = strlen(*json);
    return 0;
}

int qmix_tok_load_gguf(const char *path, qmix_tokenizer **out, qmix_err *err)
{
    *out = NULL;
    qmix_gguf *g;
    if (qmix_gguf_open(path, &g, err)) return -1;
    char *json;
    size_t len;
    int rc = qmix_tok_gguf_json(g, &json, &len, err);
    qmix_gguf_close(g);
    if (rc) return -1;
    rc = qmix_tok_load_json(json, len, path, out, err);
    free(json);
    return rc;
}

int qmix_gguf_chat_template(const char *path, char **text, size_t *len, qmix_err *err)
{
    *text = NULL;
    qmix_gguf *g;
    if (qmix_gguf_open(path, &g, err)) return -1;
    const char *s;
    uint64_t n;
    int r = qmix_gguf_get_str(g, "tokenizer.chat_template", &s, &n, err);
    if (!r) qmix_errf(err, "%s: no KV 'tokenizer.chat_template'", path);
    if (r > 0) {
        *text = malloc(n + 1);
        if (!*text) {
            r = qmix_errf(err, "out of memory");
        } else {
            memcpy(*text, s, n);
            (*text)[n] = 0;
            *len = n;
        }
    }
    qmix_gguf_close(g);
    return r > 0 ? 0 : -1;
}

/* ---- writing ---------------------------------------------------------------------------- */

static const char *split_regex(json_t *pre)
{
    const char *type = json_string_value(json_object_get(pre, "type"));
    if (type && !strcmp(type, "Split"))
        return json_string_value(json_object_get(json_object_get(pre, "pattern"), "Regex"));
    json_t *list = json_object_get(pre, "pretokenizers");
    for (size_t i = 0; i < json_array_size(list); i++) {
        const char *r = split_regex(json_array_get(list, i));
        if (r) return r;
    }
    return NULL;
}

int qmix_tok_gguf_declare(qmix_ggw *w, const char *json, size_t len, int n_vocab,
                          const char *eos_name, const char *pad_name, const char *chat_template,
                          size_t template_len, qmix_err *err)
{
    json_error_t jerr;
    json_t *root = json_loadb(json, len, 0, &jerr);
    if (!root) return qmix_errf(err, "tokenizer.json: %s (line %d)", jerr.text, jerr.line);
    json_t *model = json_object_get(root, "model"), *vocab = json_object_get(model, "vocab");
    json_t *merges = json_object_get(model, "merges"), *added = json_object_get(root, "added_tokens");
    const char *regex = split_regex(json_object_get(root, "pre_tokenizer")), *pre = NULL;
    int rc = 0;
    if (regex && !strcmp(regex, QMIX_REGEX_QWEN35)) pre = "qwen35";
    else if (regex && !strcmp(regex, QMIX_REGEX_QWEN2)) pre = "qwen2";
    if (!json_is_object(vocab) || !json_is_array(merges))
        rc = qmix_errf(err, "tokenizer.json: no BPE model vocab and merges");
    else if (!pre)
        rc = qmix_errf(err, "tokenizer.json: the pre-tokenizer regex is neither Qwen3.5's nor "
                       "Qwen2's, so no tokenizer.ggml.pre name describes it");
    int64_t n = n_vocab;
    const char *key;
    json_t *val;
    json_object_foreach(vocab, key, val) if (json_integer_value(val) >= n) n = json_integer_value(val) + 1;
    for (size_t i = 0; i < json_array_size(added); i++) {
        json_int_t id = json_integer_value(json_object_get(json_array_get(added, i), "id"));
        if (id >= n) n = id + 1;
    }
    const char **tok = calloc((size_t)n, sizeof *tok);
    int32_t *types = calloc((size_t)n, sizeof *types);
    if (!rc && (!tok || !types)) rc = qmix_errf(err, "out of memory");
    if (!rc) {
        json_object_foreach(vocab, key, val) {
            json_int_t id = json_integer_value(val);
            if (id < 0) continue;
            tok[id] = key;
            types[id] = QMIX_TOKTYPE_NORMAL;
        }
        for (size_t i = 0; i < json_array_size(added); i++) {
            json_t *a = json_array_get(added, i);
            json_int_t id = json_integer_value(json_object_get(a, "id"));
            const char *content = json_string_value(json_object_get(a, "content"));
            if (id < 0 || !content) continue;
            tok[id] = content;
            types[id] = json_is_true(json_object_get(a, "special")) ? QMIX_TOKTYPE_CONTROL
                                                                     : QMIX_TOKTYPE_USER_DEFINED;
        }
        qmix_ggw_kv_str(w, "tokenizer.ggml.model", "gpt2");
        qmix_ggw_kv_str(w, "tokenizer.ggml.pre", pre);
        qmix_ggw_kv_arr_str_begin(w, "tokenizer.ggml.tokens", (uint64_t)n);
        int64_t eos = -1, pad = -1;
        for (int64_t i = 0; i < n; i++) {
            char pad_tok[32];
            if (!tok[i]) { /* ids the embedding has but the tokenizer does not */
                snprintf(pad_tok, sizeof pad_tok, "[PAD%lld]", (long long)i);
                types[i] = QMIX_TOKTYPE_UNUSED;
            }
            const char *t = tok[i] ? tok[i] : pad_tok;
            qmix_ggw_arr_str(w, t, strlen(t));
            if (eos_name && tok[i] && !strcmp(tok[i], eos_name)) eos = i;
            if (pad_name && tok[i] && !strcmp(tok[i], pad_name)) pad = i;
        }
        qmix_ggw_kv_arr(w, "tokenizer.ggml.token_type", 5 /* i32 */, (uint64_t)n, types);
        qmix_ggw_kv_arr_str_begin(w, "tokenizer.ggml.merges", json_array_size(merges));
        for (size_t i = 0; i < json_array_size(merges); i++) {
            json_t *m = json_array_get(merges, i);
            if (json_is_string(m)) {
                qmix_ggw_arr_str(w, json_string_value(m), json_string_length(m));
            } else {
                const char *a = json_string_value(json_array_get(m, 0));
                const char *b = json_string_value(json_array_get(m, 1));
                char *joined = NULL;
                if (!a || !b || asprintf(&joined, "%s %s", a, b) < 0) {
                    rc = qmix_errf(err, "tokenizer.json: merges[%zu] is malformed", i);
                    qmix_ggw_arr_str(w, "", 0);
                    continue;
                }
                qmix_ggw_arr_str(w, joined, strlen(joined));
                free(joined);
            }
        }
        if (eos >= 0) qmix_ggw_kv_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)eos);
        if (pad >= 0) qmix_ggw_kv_u32(w, "tokenizer.ggml.padding_token_id", (uint32_t)pad);
        if (pad >= 0) qmix_ggw_kv_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)pad);
        qmix_ggw_kv_bool(w, "tokenizer.ggml.add_bos_token", 0);
        if (chat_template) qmix_ggw_kv_strn(w, "tokenizer.chat_template", chat_template,
                                            template_len);
    }
    free(tok);
    free(types);
    json_decref(root);
    return rc;
}
