/* config.json parsing: the fixtures' and a real checkpoint's configs, the nested and flat forms,
 * defaults and precedence, and every way a config can be wrong (each error names the field). */
#include <jansson.h>
#include <math.h>

#include "formats/config.h"
#include "testutil.h"

#define TINY_A "testdata/fixtures/tiny-a/config.json"
#define TINY_B "testdata/fixtures/tiny-b/config.json"
#define REAP "testdata/assets/reap-35b-a3b.config.json"
#define LABEL "edited-config.json"

static const char *const required_keys[] = {
    "hidden_size",           "num_hidden_layers",      "vocab_size",
    "num_attention_heads",   "num_key_value_heads",    "head_dim",
    "linear_num_key_heads",  "linear_num_value_heads", "linear_key_head_dim",
    "linear_value_head_dim", "linear_conv_kernel_dim", "num_experts",
    "num_experts_per_tok",   "moe_intermediate_size",  "shared_expert_intermediate_size",
};
#define N_REQUIRED (sizeof required_keys / sizeof required_keys[0])

static json_t *load_json(const char *path)
{
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    ck_assert_msg(root != NULL, "%s: %s", path, jerr.text);
    return root;
}

/* The object holding the text settings: text_config if present, else the root. */
static json_t *text_of(json_t *root)
{
    json_t *tc = json_object_get(root, "text_config");
    return tc ? tc : root;
}

static int parse_json(json_t *root, qmix_config *cfg, qmix_err *err)
{
    char *text = json_dumps(root, JSON_COMPACT);
    ck_assert_ptr_nonnull(text);
    memset(err, 0, sizeof *err);
    int rc = qmix_config_parse(text, strlen(text), LABEL, cfg, err);
    free(text);
    return rc;
}

static void parse_ok(json_t *root, qmix_config *cfg)
{
    qmix_err err;
    int rc = parse_json(root, cfg, &err);
    ck_assert_msg(rc == 0, "valid config rejected: %s", err.msg);
}

static void assert_mentions(const char *msg, const char *const *needles)
{
    for (size_t i = 0; needles[i]; i++)
        ck_assert_msg(strstr(msg, needles[i]) != NULL, "error message '%s' does not mention '%s'",
                      msg, needles[i]);
}

static void expect_fail_json(json_t *root, const char *const *needles)
{
    qmix_config cfg;
    qmix_err err;
    int rc = parse_json(root, &cfg, &err);
    ck_assert_msg(rc == -1, "bad config accepted");
    ck_assert_msg(strstr(err.msg, LABEL) != NULL, "error message '%s' does not name the file",
                  err.msg);
    assert_mentions(err.msg, needles);
}

#define EXPECT_FAIL(root, ...)                                                                    \
    do {                                                                                          \
        const char *needles_[] = {__VA_ARGS__, NULL};                                             \
        expect_fail_json(root, needles_);                                                         \
    } while (0)

static void expect_fail_text(const char *text, const char *const *needles)
{
    qmix_config cfg;
    qmix_err err;
    memset(&err, 0, sizeof err);
    int rc = qmix_config_parse(text, strlen(text), LABEL, &cfg, &err);
    ck_assert_msg(rc == -1, "bad config accepted: %s", text);
    ck_assert_msg(strstr(err.msg, LABEL) != NULL, "error message '%s' does not name the file",
                  err.msg);
    assert_mentions(err.msg, needles);
}

#define EXPECT_FAIL_TEXT(text, ...)                                                               \
    do {                                                                                          \
        const char *needles_[] = {__VA_ARGS__, NULL};                                             \
        expect_fail_text(text, needles_);                                                         \
    } while (0)

/* "LLLF"-style pattern of the layer kinds */
static void pattern_of(const qmix_config *c, char *buf)
{
    for (int i = 0; i < c->n_layers; i++) buf[i] = c->layer_is_full[i] ? 'F' : 'L';
    buf[c->n_layers] = 0;
}

static void assert_pattern(const qmix_config *c, const char *want)
{
    char got[QMIX_MAX_LAYERS + 1];
    pattern_of(c, got);
    ck_assert_str_eq(got, want);
}

/* The tiny-a text_config moved to the top level, as a text-only checkpoint writes it. */
static json_t *flatten(json_t *root)
{
    json_t *flat = json_deep_copy(text_of(root));
    ck_assert_ptr_nonnull(flat);
    json_object_set(flat, "tie_word_embeddings", json_object_get(root, "tie_word_embeddings"));
    return flat;
}

/* ---- valid configs ------------------------------------------------------------------------- */

START_TEST(tiny_a_values)
{
    qmix_config c;
    qmix_err err;
    memset(&err, 0, sizeof err);
    ck_assert_msg(qmix_config_load(TINY_A, &c, &err) == 0, "%s", err.msg);
    ck_assert_int_eq(c.hidden_size, 64);
    ck_assert_int_eq(c.n_layers, 4);
    ck_assert_int_eq(c.vocab_size, 1024);
    ck_assert_int_eq(c.n_heads, 8);
    ck_assert_int_eq(c.n_kv_heads, 1);
    ck_assert_int_eq(c.head_dim, 256);
    ck_assert_int_eq(c.rot_dim, 64);
    ck_assert(c.rope_theta == 1e7);
    ck_assert_int_eq(c.lin_n_k_heads, 2);
    ck_assert_int_eq(c.lin_n_v_heads, 4);
    ck_assert_int_eq(c.lin_k_head_dim, 32);
    ck_assert_int_eq(c.lin_v_head_dim, 32);
    ck_assert_int_eq(c.conv_kernel, 4);
    ck_assert_int_eq(c.n_experts, 8);
    ck_assert_int_eq(c.n_experts_used, 2);
    ck_assert_int_eq(c.moe_ffn, 32);
    ck_assert_int_eq(c.shared_ffn, 32);
    ck_assert(c.rms_eps == 1e-6f);
    ck_assert_int_eq(c.tie_embeddings, 0);
    ck_assert_int_eq(c.mtp_layers, 1);
    ck_assert_int_eq(c.eos_token_id, 834);
    ck_assert_int_eq(c.max_position_embeddings, 262144);
    assert_pattern(&c, "LLLF");
}
END_TEST

START_TEST(tiny_b_values)
{
    qmix_config c;
    qmix_err err;
    memset(&err, 0, sizeof err);
    ck_assert_msg(qmix_config_load(TINY_B, &c, &err) == 0, "%s", err.msg);
    ck_assert_int_eq(c.hidden_size, 64);
    ck_assert_int_eq(c.n_layers, 8);
    ck_assert_int_eq(c.vocab_size, 768);
    ck_assert_int_eq(c.n_heads, 4);
    ck_assert_int_eq(c.n_kv_heads, 2);
    ck_assert_int_eq(c.head_dim, 128);
    ck_assert_int_eq(c.rot_dim, 32);
    ck_assert(c.rope_theta == 1e7);
    ck_assert_int_eq(c.lin_n_k_heads, 2);
    ck_assert_int_eq(c.lin_n_v_heads, 8);
    ck_assert_int_eq(c.n_experts, 16);
    ck_assert_int_eq(c.n_experts_used, 4);
    ck_assert_int_eq(c.moe_ffn, 32);
    ck_assert_int_eq(c.shared_ffn, 64);
    ck_assert_int_eq(c.eos_token_id, 676);
    assert_pattern(&c, "LLLFLLLF");
}
END_TEST

/* A real text-only (flat) config: Qwen3.5-35B-A3B pruned to 180 experts. */
START_TEST(real_flat_config)
{
    qmix_config c;
    qmix_err err;
    memset(&err, 0, sizeof err);
    ck_assert_msg(qmix_config_load(REAP, &c, &err) == 0, "%s", err.msg);
    ck_assert_int_eq(c.hidden_size, 2048);
    ck_assert_int_eq(c.n_layers, 40);
    ck_assert_int_eq(c.vocab_size, 248320);
    ck_assert_int_eq(c.n_heads, 16);
    ck_assert_int_eq(c.n_kv_heads, 2);
    ck_assert_int_eq(c.head_dim, 256);
    ck_assert_int_eq(c.rot_dim, 64);
    ck_assert(c.rope_theta == 1e7);
    ck_assert_int_eq(c.lin_n_k_heads, 16);
    ck_assert_int_eq(c.lin_n_v_heads, 32);
    ck_assert_int_eq(c.lin_k_head_dim, 128);
    ck_assert_int_eq(c.lin_v_head_dim, 128);
    ck_assert_int_eq(c.n_experts, 180);
    ck_assert_int_eq(c.n_experts_used, 8);
    ck_assert_int_eq(c.moe_ffn, 512);
    ck_assert_int_eq(c.shared_ffn, 512);
    ck_assert_int_eq(c.eos_token_id, 248044);
    ck_assert_int_eq(c.mtp_layers, 1);
    assert_pattern(&c, "LLLFLLLFLLLFLLLFLLLFLLLFLLLFLLLFLLLFLLLF");
}
END_TEST

START_TEST(flat_equals_nested)
{
    json_t *root = load_json(TINY_A);
    qmix_config nested, flat;
    parse_ok(root, &nested);
    json_t *f = flatten(root);
    parse_ok(f, &flat);
    ck_assert_int_eq(memcmp(&nested, &flat, sizeof nested), 0);
    json_decref(f);
    json_decref(root);
}
END_TEST

START_TEST(layer_types_derived)
{
    json_t *roots[2];
    roots[0] = load_json(TINY_A);
    roots[1] = flatten(roots[0]);
    for (int r = 0; r < 2; r++) {
        json_t *root = roots[r], *text = text_of(root);
        qmix_config c;
        json_object_del(text, "layer_types");
        parse_ok(root, &c);
        assert_pattern(&c, "LLLF");
        json_object_set_new(text, "full_attention_interval", json_integer(1));
        parse_ok(root, &c);
        assert_pattern(&c, "FFFF");
        json_object_set_new(text, "full_attention_interval", json_integer(2));
        parse_ok(root, &c);
        assert_pattern(&c, "LFLF");
        json_object_set_new(text, "full_attention_interval", json_integer(5));
        parse_ok(root, &c);
        assert_pattern(&c, "LLLL");
        json_object_set_new(text, "num_hidden_layers", json_integer(8));
        json_object_set_new(text, "full_attention_interval", json_integer(4));
        parse_ok(root, &c);
        assert_pattern(&c, "LLLFLLLF");
        /* the maximum layer count */
        json_object_set_new(text, "num_hidden_layers", json_integer(QMIX_MAX_LAYERS));
        parse_ok(root, &c);
        ck_assert_int_eq(c.n_layers, QMIX_MAX_LAYERS);
        ck_assert_int_eq(c.layer_is_full[QMIX_MAX_LAYERS - 1], 1);
        ck_assert_int_eq(c.layer_is_full[QMIX_MAX_LAYERS - 2], 0);
        /* an explicit layer_types wins over the interval */
        json_object_set_new(text, "num_hidden_layers", json_integer(4));
        json_object_set_new(text, "layer_types",
                            json_pack("[ssss]", "full_attention", "linear_attention",
                                      "full_attention", "linear_attention"));
        parse_ok(root, &c);
        assert_pattern(&c, "FLFL");
        /* with layer_types given, the interval is not needed */
        json_object_del(text, "full_attention_interval");
        parse_ok(root, &c);
        assert_pattern(&c, "FLFL");
        json_decref(root);
    }
}
END_TEST

START_TEST(rope_precedence)
{
    json_t *root = load_json(TINY_A), *text = text_of(root);
    json_t *rope = json_object_get(text, "rope_parameters");
    qmix_config c;
    /* flat values differ from rope_parameters: rope_parameters wins */
    json_object_set_new(text, "rope_theta", json_real(5000.0));
    json_object_set_new(text, "partial_rotary_factor", json_real(0.5));
    parse_ok(root, &c);
    ck_assert(c.rope_theta == 1e7);
    ck_assert_int_eq(c.rot_dim, 64);
    /* rope_parameters with only rope_theta: the flat partial factor applies */
    json_object_del(rope, "partial_rotary_factor");
    parse_ok(root, &c);
    ck_assert(c.rope_theta == 1e7);
    ck_assert_int_eq(c.rot_dim, 128);
    /* rope_parameters with only the partial factor: the flat theta applies */
    json_object_set_new(rope, "partial_rotary_factor", json_real(0.125));
    json_object_del(rope, "rope_theta");
    parse_ok(root, &c);
    ck_assert(c.rope_theta == 5000.0);
    ck_assert_int_eq(c.rot_dim, 32);
    /* no rope_parameters: the flat values */
    json_object_del(text, "rope_parameters");
    parse_ok(root, &c);
    ck_assert(c.rope_theta == 5000.0);
    ck_assert_int_eq(c.rot_dim, 128);
    /* nothing: theta 10000 and full rotation */
    json_object_del(text, "rope_theta");
    json_object_del(text, "partial_rotary_factor");
    parse_ok(root, &c);
    ck_assert(c.rope_theta == 10000.0);
    ck_assert_int_eq(c.rot_dim, 256);
    /* integer-valued numbers are numbers */
    json_object_set_new(text, "rope_theta", json_integer(1000000));
    json_object_set_new(text, "partial_rotary_factor", json_integer(1));
    parse_ok(root, &c);
    ck_assert(c.rope_theta == 1e6);
    ck_assert_int_eq(c.rot_dim, 256);
    json_decref(root);
}
END_TEST

START_TEST(optional_fields)
{
    json_t *root = load_json(TINY_A), *text = text_of(root);
    qmix_config c;
    /* defaults */
    const char *optional[] = {"rms_norm_eps", "mtp_num_hidden_layers", "max_position_embeddings",
                              "eos_token_id", "tie_word_embeddings"};
    for (size_t i = 0; i < sizeof optional / sizeof optional[0]; i++)
        json_object_del(text, optional[i]);
    json_object_del(root, "tie_word_embeddings");
    parse_ok(root, &c);
    ck_assert(c.rms_eps == 1e-6f);
    ck_assert_int_eq(c.mtp_layers, 0);
    ck_assert_int_eq(c.max_position_embeddings, 262144);
    ck_assert_int_eq(c.eos_token_id, -1);
    ck_assert_int_eq(c.tie_embeddings, 0);
    /* eos at the top level, or as a list (the first one is used) */
    json_object_set_new(root, "eos_token_id", json_integer(7));
    parse_ok(root, &c);
    ck_assert_int_eq(c.eos_token_id, 7);
    json_object_set_new(text, "eos_token_id", json_pack("[ii]", 11, 12));
    parse_ok(root, &c);
    ck_assert_int_eq(c.eos_token_id, 11);
    /* tie_word_embeddings at the top level, overridden by text_config */
    json_object_set_new(root, "tie_word_embeddings", json_true());
    parse_ok(root, &c);
    ck_assert_int_eq(c.tie_embeddings, 1);
    json_object_set_new(text, "tie_word_embeddings", json_false());
    parse_ok(root, &c);
    ck_assert_int_eq(c.tie_embeddings, 0);
    json_object_set_new(text, "rms_norm_eps", json_real(1e-5));
    parse_ok(root, &c);
    ck_assert(c.rms_eps == 1e-5f);
    json_decref(root);
}
END_TEST

/* ---- errors -------------------------------------------------------------------------------- */

START_TEST(missing_required_each)
{
    json_t *nested = load_json(TINY_A), *forms[] = {nested, flatten(nested)};
    for (int f = 0; f < 2; f++) {
        for (size_t k = 0; k < N_REQUIRED; k++) {
            json_t *root = json_deep_copy(forms[f]);
            ck_assert_int_eq(json_object_del(text_of(root), required_keys[k]), 0);
            char quoted[128];
            snprintf(quoted, sizeof quoted, "'%s'", required_keys[k]);
            EXPECT_FAIL(root, quoted, "missing");
            json_decref(root);
        }
        /* neither layer_types nor full_attention_interval */
        json_t *root = json_deep_copy(forms[f]);
        json_object_del(text_of(root), "layer_types");
        json_object_del(text_of(root), "full_attention_interval");
        EXPECT_FAIL(root, "neither", "layer_types", "full_attention_interval");
        json_decref(root);
    }
    json_decref(forms[1]);
    json_decref(nested);
}
END_TEST

/* Each required integer field given a bad value. */
START_TEST(bad_required_values)
{
    json_t *base = load_json(TINY_A);
    for (size_t k = 0; k < N_REQUIRED; k++) {
        char quoted[128];
        snprintf(quoted, sizeof quoted, "'%s'", required_keys[k]);
        struct { json_t *value; const char *why; } bad[] = {
            {json_string("64"), "not an integer"},
            {json_real(64.0), "not an integer"},
            {json_real(2.5), "not an integer"},
            {json_true(), "not an integer"},
            {json_null(), "not an integer"},
            {json_pack("[i]", 64), "not an integer"},
            {json_integer(-1), "out of range"},
            {json_integer(INT64_MIN), "out of range"},
            {json_integer((json_int_t)1 << 31), "out of range"},
            {json_integer(INT64_MAX), "out of range"},
            {json_integer(0), "positive"},
        };
        for (size_t b = 0; b < sizeof bad / sizeof bad[0]; b++) {
            json_t *root = json_deep_copy(base);
            json_object_set_new(text_of(root), required_keys[k], bad[b].value);
            EXPECT_FAIL(root, quoted, bad[b].why);
            json_decref(root);
        }
    }
    json_decref(base);
}
END_TEST

/* Sets key in the text config to value (stolen) and expects failure naming the needles. */
static void fail_with(json_t *base, const char *key, json_t *value, const char *const *needles)
{
    json_t *root = json_deep_copy(base);
    json_object_set_new(text_of(root), key, value);
    expect_fail_json(root, needles);
    json_decref(root);
}

#define FAIL_WITH(base, key, value, ...)                                                          \
    do {                                                                                          \
        const char *needles_[] = {__VA_ARGS__, NULL};                                             \
        fail_with(base, key, value, needles_);                                                    \
    } while (0)

START_TEST(bad_optional_values)
{
    json_t *base = load_json(TINY_A);
    FAIL_WITH(base, "rms_norm_eps", json_string("1e-6"), "'rms_norm_eps'", "not a number");
    FAIL_WITH(base, "rms_norm_eps", json_real(0.0), "rms_norm_eps", "positive");
    FAIL_WITH(base, "rms_norm_eps", json_real(-1e-6), "rms_norm_eps", "positive");
    FAIL_WITH(base, "rms_norm_eps", json_real(1e-56), "rms_norm_eps", "positive float");
    FAIL_WITH(base, "rms_norm_eps", json_real(1e300), "rms_norm_eps", "positive float");
    FAIL_WITH(base, "tie_word_embeddings", json_string("yes"), "'tie_word_embeddings'",
              "not a boolean");
    FAIL_WITH(base, "tie_word_embeddings", json_integer(1), "'tie_word_embeddings'",
              "not a boolean");
    FAIL_WITH(base, "mtp_num_hidden_layers", json_string("1"), "'mtp_num_hidden_layers'",
              "not an integer");
    FAIL_WITH(base, "mtp_num_hidden_layers", json_integer(-1), "'mtp_num_hidden_layers'",
              "out of range");
    FAIL_WITH(base, "max_position_embeddings", json_real(1.5), "'max_position_embeddings'",
              "not an integer");
    FAIL_WITH(base, "rope_parameters", json_string("default"), "rope_parameters",
              "not an object");
    FAIL_WITH(base, "rope_parameters", json_pack("[f]", 1e7), "rope_parameters", "not an object");
    FAIL_WITH(base, "rope_parameters", json_pack("{s:s}", "rope_theta", "1e7"), "'rope_theta'",
              "not a number");
    FAIL_WITH(base, "rope_parameters", json_pack("{s:f}", "rope_theta", 0.0), "rope_theta",
              "positive");
    FAIL_WITH(base, "rope_parameters", json_pack("{s:f}", "rope_theta", -1e7), "rope_theta",
              "positive");
    FAIL_WITH(base, "rope_parameters", json_pack("{s:f}", "partial_rotary_factor", 0.0),
              "partial_rotary_factor");
    FAIL_WITH(base, "rope_parameters", json_pack("{s:f}", "partial_rotary_factor", 1.5),
              "partial_rotary_factor");
    FAIL_WITH(base, "rope_parameters", json_pack("{s:f}", "partial_rotary_factor", -0.25),
              "partial_rotary_factor");
    FAIL_WITH(base, "rope_parameters", json_pack("{s:b}", "partial_rotary_factor", 1),
              "'partial_rotary_factor'", "not a number");
    /* head_dim x partial factor must be even: 256 x 3/256 = 3 */
    FAIL_WITH(base, "rope_parameters", json_pack("{s:f}", "partial_rotary_factor", 3.0 / 256),
              "rotary dimension 3", "odd");
    /* a factor so small the rotary dimension rounds to zero */
    FAIL_WITH(base, "rope_parameters", json_pack("{s:f}", "partial_rotary_factor", 1e-3),
              "rotary dimension 0", "zero");
    /* text_config must be an object */
    json_t *root = json_deep_copy(base);
    json_object_set_new(root, "text_config", json_string("{}"));
    EXPECT_FAIL(root, "text_config", "not an object");
    json_object_set_new(root, "text_config", json_null());
    EXPECT_FAIL(root, "text_config", "not an object");
    json_decref(root);
    /* tie_word_embeddings at the top level is checked too */
    root = json_deep_copy(base);
    json_object_set_new(root, "tie_word_embeddings", json_string("false"));
    EXPECT_FAIL(root, "'tie_word_embeddings'", "not a boolean");
    json_decref(root);
    json_decref(base);
}
END_TEST

START_TEST(bad_interval_when_layer_types_absent)
{
    /* a wrong-typed interval with no layer_types names the interval's real problem */
    json_t *root = load_json(TINY_A);
    json_object_del(text_of(root), "layer_types");
    json_object_set_new(text_of(root), "full_attention_interval", json_string("4"));
    EXPECT_FAIL(root, "'full_attention_interval'", "not an integer");
    qmix_config c;
    qmix_err err;
    ck_assert_int_eq(parse_json(root, &c, &err), -1);
    ck_assert_msg(strstr(err.msg, "neither") == NULL, "misleading message: %s", err.msg);
    FAIL_WITH(root, "full_attention_interval", json_integer(0), "full_attention_interval", ">= 1");
    FAIL_WITH(root, "full_attention_interval", json_integer(-4), "'full_attention_interval'",
              "out of range");
    FAIL_WITH(root, "full_attention_interval", json_real(4.0), "'full_attention_interval'",
              "not an integer");
    json_decref(root);
}
END_TEST

START_TEST(inconsistent_geometry)
{
    json_t *base = load_json(TINY_A);
    /* 8 heads over 3 kv heads */
    FAIL_WITH(base, "num_key_value_heads", json_integer(3), "num_attention_heads 8",
              "num_key_value_heads 3", "multiple");
    FAIL_WITH(base, "num_key_value_heads", json_integer(16), "num_attention_heads 8",
              "multiple");
    /* 4 value heads over 3 key heads */
    FAIL_WITH(base, "linear_num_key_heads", json_integer(3), "linear_num_value_heads 4",
              "linear_num_key_heads 3", "multiple");
    FAIL_WITH(base, "linear_num_value_heads", json_integer(1), "linear_num_value_heads 1",
              "multiple");
    /* top-9 of 8 experts */
    FAIL_WITH(base, "num_experts_per_tok", json_integer(9), "num_experts_per_tok 9",
              "num_experts 8");
    /* too many layers */
    FAIL_WITH(base, "num_hidden_layers", json_integer(QMIX_MAX_LAYERS + 1), "513 layers");
    /* a causal conv of width 1 carries no state */
    FAIL_WITH(base, "linear_conv_kernel_dim", json_integer(1), "linear_conv_kernel_dim 1",
              "at least 2");
    json_decref(base);
}
END_TEST

START_TEST(bad_layer_types)
{
    json_t *base = load_json(TINY_A);
    FAIL_WITH(base, "layer_types",
              json_pack("[sss]", "linear_attention", "linear_attention", "full_attention"),
              "layer_types", "num_hidden_layers (4)");
    FAIL_WITH(base, "layer_types",
              json_pack("[sssss]", "linear_attention", "linear_attention", "linear_attention",
                        "full_attention", "full_attention"),
              "layer_types", "(4)");
    FAIL_WITH(base, "layer_types", json_array(), "layer_types");
    FAIL_WITH(base, "layer_types", json_string("linear_attention"), "layer_types");
    FAIL_WITH(base, "layer_types", json_pack("{s:s}", "0", "full_attention"), "layer_types");
    FAIL_WITH(base, "layer_types",
              json_pack("[ssss]", "linear_attention", "sliding_attention", "linear_attention",
                        "full_attention"),
              "layer_types[1]", "sliding_attention");
    FAIL_WITH(base, "layer_types",
              json_pack("[sssi]", "linear_attention", "linear_attention", "linear_attention", 1),
              "layer_types[3]", "not a string");
    FAIL_WITH(base, "layer_types",
              json_pack("[sssn]", "linear_attention", "linear_attention", "linear_attention"),
              "layer_types[3]");
    FAIL_WITH(base, "layer_types",
              json_pack("[ssss]", "linear_attention", "linear_attention", "linear_attention",
                        "Full_Attention"),
              "layer_types[3]", "Full_Attention");
    json_decref(base);
}
END_TEST

START_TEST(not_a_config)
{
    EXPECT_FAIL_TEXT("", "JSON");
    EXPECT_FAIL_TEXT("   ", "JSON");
    EXPECT_FAIL_TEXT("{\"hidden_size\": 64,}", "JSON");
    EXPECT_FAIL_TEXT("{\"hidden_size\": 64", "JSON");
    EXPECT_FAIL_TEXT("hidden_size = 64", "JSON");
    EXPECT_FAIL_TEXT("{\"text_config\": {}} {}", "JSON");
    EXPECT_FAIL_TEXT("[{\"hidden_size\": 64}]", "not a JSON object");
    EXPECT_FAIL_TEXT("[]", "not a JSON object");
    /* scalars are not even accepted as a JSON document here */
    EXPECT_FAIL_TEXT("\"config\"", "JSON");
    EXPECT_FAIL_TEXT("42", "JSON");
    EXPECT_FAIL_TEXT("null", "JSON");
    /* an empty object: the first required field is missing */
    EXPECT_FAIL_TEXT("{}", "'hidden_size'", "missing");
    EXPECT_FAIL_TEXT("{\"text_config\": {}}", "'hidden_size'", "missing");
    /* a NUL in the middle of the text is not JSON (the length is honoured) */
    qmix_config c;
    qmix_err err;
    memset(&err, 0, sizeof err);
    ck_assert_int_eq(qmix_config_parse("{}\0{}", 5, LABEL, &c, &err), -1);
    ck_assert_ptr_nonnull(strstr(err.msg, LABEL));
}
END_TEST

START_TEST(duplicate_keys)
{
    EXPECT_FAIL_TEXT("{\"text_config\": {\"hidden_size\": 64, \"hidden_size\": 128}}", "duplicate",
                     "hidden_size");
    EXPECT_FAIL_TEXT("{\"text_config\": {}, \"text_config\": {}}", "duplicate", "text_config");
    /* in the real file, at the top level and inside text_config */
    size_t len;
    char *text = tu_read(TINY_A, &len);
    char *brace = strchr(text, '{');
    ck_assert_ptr_nonnull(brace);
    size_t n = len + 64;
    char *dup = malloc(n);
    ck_assert_ptr_nonnull(dup);
    snprintf(dup, n, "{\"tie_word_embeddings\": true,%s", brace + 1);
    EXPECT_FAIL_TEXT(dup, "duplicate", "line");
    char *tc = strstr(text, "\"text_config\": {");
    ck_assert_ptr_nonnull(tc);
    size_t head = (size_t)(tc - text) + strlen("\"text_config\": {");
    snprintf(dup, n, "%.*s\"num_experts\": 4,%s", (int)head, text, text + head);
    EXPECT_FAIL_TEXT(dup, "duplicate", "num_experts");
    free(dup);
    free(text);
}
END_TEST

START_TEST(load_errors)
{
    qmix_config c;
    qmix_err err;
    memset(&err, 0, sizeof err);
    ck_assert_int_eq(qmix_config_load("testdata/no/such/config.json", &c, &err), -1);
    ck_assert_ptr_nonnull(strstr(err.msg, "testdata/no/such/config.json"));
    /* errors from a real file name the path */
    char *dir = tu_tmpdir();
    char path[1024];
    snprintf(path, sizeof path, "%s/config.json", dir);
    tu_write(path, "{\"text_config\": []}", 19);
    memset(&err, 0, sizeof err);
    ck_assert_int_eq(qmix_config_load(path, &c, &err), -1);
    ck_assert_ptr_nonnull(strstr(err.msg, path));
    ck_assert_ptr_nonnull(strstr(err.msg, "text_config"));
    tu_rmdir(dir);
}
END_TEST

static Suite *config_suite(void)
{
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("valid");
    tcase_add_test(tc, tiny_a_values);
    tcase_add_test(tc, tiny_b_values);
    tcase_add_test(tc, real_flat_config);
    tcase_add_test(tc, flat_equals_nested);
    tcase_add_test(tc, layer_types_derived);
    tcase_add_test(tc, rope_precedence);
    tcase_add_test(tc, optional_fields);
    suite_add_tcase(s, tc);
    tc = tcase_create("errors");
    tcase_add_test(tc, missing_required_each);
    tcase_add_test(tc, bad_required_values);
    tcase_add_test(tc, bad_optional_values);
    tcase_add_test(tc, bad_interval_when_layer_types_absent);
    tcase_add_test(tc, inconsistent_geometry);
    tcase_add_test(tc, bad_layer_types);
    tcase_add_test(tc, not_a_config);
    tcase_add_test(tc, duplicate_keys);
    tcase_add_test(tc, load_errors);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(config_suite)
