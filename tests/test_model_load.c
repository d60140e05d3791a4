/* Model-level loading: copies of the tiny-a fixture rewritten here in C (a tensor removed, a shape
 * or dtype changed, experts split per expert, text-only names, f32/f16 weights, shards) must fail
 * with a message naming the culprit, or load and give the same logits. Then the CLI's exit codes. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "qmix.h"
#include "testutil.h"

#define FIXTURE "testdata/fixtures/tiny-a"
#define LM "model.language_model."

/* ---- an editable in-memory safetensors file ------------------------------------------------ */

typedef struct tz {
    char *name;
    char dtype[16];
    int ndim;
    int64_t shape[8];
    uint8_t *data;
    size_t nbytes;
} tz;

typedef struct tzset {
    tz *t;
    size_t n, cap;
    json_t *metadata; /* __metadata__ or NULL */
} tzset;

static size_t dtype_bytes(const char *dtype)
{
    if (!strcmp(dtype, "F32") || !strcmp(dtype, "I32") || !strcmp(dtype, "U32")) return 4;
    if (!strcmp(dtype, "BF16") || !strcmp(dtype, "F16")) return 2;
    if (!strcmp(dtype, "U8")) return 1;
    ck_abort_msg("dtype %s not handled by the test", dtype);
    return 0;
}

static size_t elems(const tz *t)
{
    size_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= (size_t)t->shape[d];
    return n;
}

/* Appends a tensor; data (nbytes of it) is copied. */
static tz *tz_add(tzset *s, const char *name, const char *dtype, int ndim, const int64_t *shape,
                  const void *data)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 64;
        s->t = realloc(s->t, s->cap * sizeof *s->t);
        ck_assert_ptr_nonnull(s->t);
    }
    tz *t = &s->t[s->n++];
    memset(t, 0, sizeof *t);
    t->name = strdup(name);
    snprintf(t->dtype, sizeof t->dtype, "%s", dtype);
    t->ndim = ndim;
    memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
    t->nbytes = elems(t) * dtype_bytes(dtype);
    t->data = malloc(t->nbytes ? t->nbytes : 1);
    ck_assert_ptr_nonnull(t->data);
    if (data) memcpy(t->data, data, t->nbytes);
    return t;
}

/* Reads a safetensors file with its own small parser (jansson for the header). */
static tzset tz_load(const char *path)
{
    size_t size;
    uint8_t *file = tu_read(path, &size);
    ck_assert_uint_ge(size, 8);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | file[i];
    ck_assert_uint_le(8 + hlen, size);
    json_error_t jerr;
    json_t *root = json_loadb((const char *)file + 8, hlen, 0, &jerr);
    ck_assert_msg(root != NULL, "%s: %s", path, jerr.text);
    const uint8_t *data = file + 8 + hlen;
    tzset s = {0};
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (!strcmp(key, "__metadata__")) {
            s.metadata = json_incref(val);
            continue;
        }
        json_t *shape = json_object_get(val, "shape"), *offs = json_object_get(val, "data_offsets");
        int64_t dims[8];
        int nd = (int)json_array_size(shape);
        for (int d = 0; d < nd; d++) dims[d] = json_integer_value(json_array_get(shape, (size_t)d));
        tz *t = tz_add(&s, key, json_string_value(json_object_get(val, "dtype")), nd, dims, NULL);
        size_t b = (size_t)json_integer_value(json_array_get(offs, 0));
        size_t e = (size_t)json_integer_value(json_array_get(offs, 1));
        ck_assert_uint_eq(e - b, t->nbytes);
        memcpy(t->data, data + b, t->nbytes);
    }
    json_decref(root);
    free(file);
    return s;
}

/* Writes the tensors back to back in list order, the header padded to 8-byte alignment. */
static void tz_save(const tzset *s, const char *path)
{
    json_t *root = json_object();
    if (s->metadata) json_object_set(root, "__metadata__", s->metadata);
    uint64_t off = 0;
    for (size_t i = 0; i < s->n; i++) {
        const tz *t = &s->t[i];
        json_t *shape = json_array();
        for (int d = 0; d < t->ndim; d++) json_array_append_new(shape, json_integer(t->shape[d]));
        json_t *ent = json_pack("{s:s, s:o, s:[I, I]}", "dtype", t->dtype, "shape", shape,
                                "data_offsets", (json_int_t)off, (json_int_t)(off + t->nbytes));
        ck_assert_ptr_nonnull(ent);
        ck_assert_int_eq(json_object_set_new(root, t->name, ent), 0);
        off += t->nbytes;
    }
    char *header = json_dumps(root, JSON_COMPACT);
    ck_assert_ptr_nonnull(header);
    json_decref(root);
    size_t hl = strlen(header), padded = (hl + 7) / 8 * 8;
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "cannot create %s", path);
    uint8_t len[8];
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    ck_assert_int_eq(fwrite(len, 1, 8, f), 8);
    ck_assert_int_eq(fwrite(header, 1, hl, f), hl);
    for (size_t i = hl; i < padded; i++) fputc(' ', f);
    for (size_t i = 0; i < s->n; i++)
        ck_assert_int_eq(fwrite(s->t[i].data, 1, s->t[i].nbytes, f), s->t[i].nbytes);
    ck_assert_int_eq(fclose(f), 0);
    free(header);
}

static void tz_free(tzset *s)
{
    for (size_t i = 0; i < s->n; i++) {
        free(s->t[i].name);
        free(s->t[i].data);
    }
    free(s->t);
    if (s->metadata) json_decref(s->metadata);
    memset(s, 0, sizeof *s);
}

static tz *tz_find(tzset *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->t[i].name, name)) return &s->t[i];
    return NULL;
}

static tz *tz_get(tzset *s, const char *name)
{
    tz *t = tz_find(s, name);
    ck_assert_msg(t != NULL, "fixture has no tensor %s", name);
    return t;
}

static void tz_remove(tzset *s, const char *name)
{
    tz *t = tz_get(s, name);
    free(t->name);
    free(t->data);
    size_t i = (size_t)(t - s->t);
    memmove(&s->t[i], &s->t[i + 1], (s->n - i - 1) * sizeof *t);
    s->n--;
}

/* ---- dtype conversions (independent of the library's) -------------------------------------- */

static float bf16_to_f32(uint16_t h)
{
    uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

/* Round to nearest even, with subnormals, infinities and NaN. */
static uint16_t f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, e8 = (x >> 23) & 0xff, mant = x & 0x7fffff;
    if (e8 == 0xff) return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
    int32_t exp = (int32_t)e8 - 127 + 15;
    if (exp >= 31) return (uint16_t)(sign | 0x7c00);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000;
        uint32_t shift = (uint32_t)(14 - exp), half = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)exp << 10) | (mant >> 13), rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++; /* may carry into the exponent */
    return (uint16_t)half;
}

START_TEST(f16_conversion)
{
    ck_assert_uint_eq(f32_to_f16(0.0f), 0x0000);
    ck_assert_uint_eq(f32_to_f16(-0.0f), 0x8000);
    ck_assert_uint_eq(f32_to_f16(1.0f), 0x3c00);
    ck_assert_uint_eq(f32_to_f16(-2.0f), 0xc000);
    ck_assert_uint_eq(f32_to_f16(65504.0f), 0x7bff);
    ck_assert_uint_eq(f32_to_f16(65520.0f), 0x7c00);     /* rounds up to infinity */
    ck_assert_uint_eq(f32_to_f16(6.103515625e-05f), 0x0400); /* smallest normal */
    ck_assert_uint_eq(f32_to_f16(5.9604644775390625e-08f), 0x0001); /* smallest subnormal */
    ck_assert_uint_eq(f32_to_f16(2.98023223876953125e-08f), 0x0000); /* half of it: to even */
    ck_assert_uint_eq(f32_to_f16(1.0f + 1.0f / 2048), 0x3c00); /* tie to even */
    ck_assert_uint_eq(f32_to_f16(1.0f + 3.0f / 2048), 0x3c02);
    ck_assert_uint_eq(f32_to_f16(INFINITY), 0x7c00);
    ck_assert_uint_eq(f32_to_f16(NAN) & 0x7c00, 0x7c00);
}
END_TEST

/* Rewrites every BF16 tensor as F32 (exact) or F16 (rounded). */
static void convert_all(tzset *s, const char *to)
{
    for (size_t i = 0; i < s->n; i++) {
        tz *t = &s->t[i];
        if (strcmp(t->dtype, "BF16")) continue;
        size_t n = elems(t);
        uint8_t *out = malloc(n * dtype_bytes(to));
        ck_assert_ptr_nonnull(out);
        for (size_t k = 0; k < n; k++) {
            uint16_t h;
            memcpy(&h, t->data + 2 * k, 2);
            float f = bf16_to_f32(h);
            if (!strcmp(to, "F32")) {
                memcpy(out + 4 * k, &f, 4);
            } else {
                uint16_t g = f32_to_f16(f);
                memcpy(out + 2 * k, &g, 2);
            }
        }
        free(t->data);
        t->data = out;
        t->nbytes = n * dtype_bytes(to);
        snprintf(t->dtype, sizeof t->dtype, "%s", to);
    }
}

/* ---- checkpoint directories ---------------------------------------------------------------- */

static void path_in(char *buf, size_t len, const char *dir, const char *name)
{
    ck_assert_int_lt(snprintf(buf, len, "%s/%s", dir, name), (int)len);
}

static void copy_file(const char *from, const char *dir, const char *name)
{
    size_t n;
    char *data = tu_read(from, &n);
    char to[1024];
    path_in(to, sizeof to, dir, name);
    tu_write(to, data, n);
    free(data);
}

static json_t *fixture_config(void)
{
    json_error_t jerr;
    json_t *cfg = json_load_file(FIXTURE "/config.json", 0, &jerr);
    ck_assert_msg(cfg != NULL, "%s", jerr.text);
    return cfg;
}

static void save_config(json_t *cfg, const char *dir)
{
    char path[1024];
    path_in(path, sizeof path, dir, "config.json");
    ck_assert_int_eq(json_dump_file(cfg, path, JSON_INDENT(2)), 0);
}

static void save_weights(const tzset *s, const char *dir)
{
    char path[1024];
    path_in(path, sizeof path, dir, "model.safetensors");
    tz_save(s, path);
}

/* A temp directory holding the fixture's config.json and the given weights. */
static char *checkpoint_with(const tzset *s)
{
    char *dir = tu_tmpdir();
    copy_file(FIXTURE "/config.json", dir, "config.json");
    save_weights(s, dir);
    return dir;
}

static void assert_mentions(const char *msg, const char *const *needles)
{
    for (size_t i = 0; needles[i]; i++)
        ck_assert_msg(strstr(msg, needles[i]) != NULL, "error message '%s' does not mention '%s'",
                      msg, needles[i]);
}

static void expect_open_fail(const char *path, const char *const *needles)
{
    qmix_err err;
    memset(&err, 0, sizeof err);
    qmix_model *m = (qmix_model *)&err;
    int rc = qmix_model_open(path, &m, &err);
    ck_assert_msg(rc == -1, "%s: bad checkpoint loaded", path);
    ck_assert_ptr_null(m);
    assert_mentions(err.msg, needles);
}

#define EXPECT_OPEN_FAIL(path, ...)                                                               \
    do {                                                                                          \
        const char *needles_[] = {__VA_ARGS__, NULL};                                             \
        expect_open_fail(path, needles_);                                                         \
    } while (0)

/* The fixture with one edit applied by the caller, checked to fail naming the needles. */
#define EDIT_FAILS(edit, ...)                                                                     \
    do {                                                                                          \
        tzset s_ = tz_load(FIXTURE "/model.safetensors");                                         \
        tzset *s = &s_;                                                                           \
        edit;                                                                                     \
        char *dir_ = checkpoint_with(s);                                                          \
        EXPECT_OPEN_FAIL(dir_, __VA_ARGS__);                                                      \
        tu_rmdir(dir_);                                                                           \
        tz_free(s);                                                                               \
    } while (0)

/* ---- logits -------------------------------------------------------------------------------- */

static int32_t *fixture_tokens(int *n)
{
    char *text = tu_read(FIXTURE "/golden/tokens.txt", NULL);
    int32_t *ids = malloc(256 * sizeof *ids);
    ck_assert_ptr_nonnull(ids);
    int count = 0;
    char *p = text, *end;
    while (count < 256) {
        long v = strtol(p, &end, 10);
        if (end == p) break;
        ids[count++] = (int32_t)v;
        p = end;
    }
    free(text);
    ck_assert_int_gt(count, 8);
    *n = count;
    return ids;
}

/* All prefill logits [n, V] of the checkpoint at path for the fixture's tokens. */
static float *prefill_logits(const char *path, int *n_out, int *vocab)
{
    qmix_err err;
    memset(&err, 0, sizeof err);
    qmix_model *m = NULL;
    ck_assert_msg(qmix_model_open(path, &m, &err) == 0, "%s: %s", path, err.msg);
    int n;
    int32_t *tokens = fixture_tokens(&n);
    qmix_session_opts opts = {.max_ctx = n, .n_threads = 1};
    qmix_session *sess = NULL;
    ck_assert_msg(qmix_session_new(m, &opts, &sess, &err) == 0, "%s", err.msg);
    int V = qmix_model_config(m)->vocab_size;
    float *logits = malloc((size_t)n * V * sizeof *logits);
    ck_assert_ptr_nonnull(logits);
    ck_assert_msg(qmix_session_prefill(sess, tokens, n, logits, &err) == 0, "%s", err.msg);
    qmix_session_free(sess);
    qmix_model_close(m);
    free(tokens);
    *n_out = n;
    *vocab = V;
    return logits;
}

/* Logits of path compared with the unmodified fixture's: bitwise when tol == 0. */
static void assert_same_logits(const char *path, double tol)
{
    int n0, v0, n1, v1;
    float *ref = prefill_logits(FIXTURE, &n0, &v0);
    float *got = prefill_logits(path, &n1, &v1);
    ck_assert_int_eq(n0, n1);
    ck_assert_int_eq(v0, v1);
    size_t count = (size_t)n0 * v0;
    if (tol == 0) {
        for (size_t i = 0; i < count; i++)
            ck_assert_msg(memcmp(&ref[i], &got[i], sizeof(float)) == 0,
                          "logit %zu differs: %.9g vs %.9g", i, ref[i], got[i]);
    } else {
        double worst = 0;
        size_t at = 0;
        for (size_t i = 0; i < count; i++) {
            ck_assert_msg(isfinite(got[i]), "logit %zu is %g", i, got[i]);
            double d = fabs((double)ref[i] - got[i]);
            if (d > worst) worst = d, at = i;
        }
        ck_assert_msg(worst <= tol, "max |dlogit| %.3g at %zu (%.6g vs %.6g) exceeds %.1g", worst,
                      at, ref[at], got[at], tol);
    }
    free(ref);
    free(got);
}

/* ---- bad checkpoints ----------------------------------------------------------------------- */

START_TEST(missing_tensor)
{
    const char *names[] = {
        LM "layers.2.linear_attn.in_proj_z.weight", LM "layers.3.self_attn.k_norm.weight",
        LM "layers.1.mlp.experts.gate_up_proj",     LM "layers.0.mlp.shared_expert_gate.weight",
        LM "layers.0.linear_attn.conv1d.weight",    LM "layers.3.mlp.experts.down_proj",
        LM "norm.weight",                           "lm_head.weight",
        LM "layers.1.linear_attn.A_log",            LM "layers.2.mlp.gate.weight",
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char quoted[256];
        snprintf(quoted, sizeof quoted, "'%s'", names[i]);
        EDIT_FAILS(tz_remove(s, names[i]), quoted, "missing");
    }
}
END_TEST

static void reshape(tzset *s, const char *name, int ndim, const int64_t *shape)
{
    tz *t = tz_get(s, name);
    t->ndim = ndim;
    memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
    ck_assert_uint_eq(elems(t) * dtype_bytes(t->dtype), t->nbytes); /* same bytes, new shape */
}

START_TEST(wrong_shape)
{
    int64_t q[2] = {2048, 128};
    EDIT_FAILS(reshape(s, LM "layers.3.self_attn.q_proj.weight", 2, q),
               "'" LM "layers.3.self_attn.q_proj.weight'", "[2048, 128]", "[4096, 64]");
    int64_t norm[2] = {1, 64};
    EDIT_FAILS(reshape(s, LM "layers.1.input_layernorm.weight", 2, norm),
               "'" LM "layers.1.input_layernorm.weight'", "[1, 64]", "expected [64]");
    int64_t gu[3] = {4, 128, 64};
    EDIT_FAILS(reshape(s, LM "layers.2.mlp.experts.gate_up_proj", 3, gu),
               "'" LM "layers.2.mlp.experts.gate_up_proj'", "[4, 128, 64]", "[8, 64, 64]");
    int64_t emb[1] = {1024 * 64};
    EDIT_FAILS(reshape(s, LM "embed_tokens.weight", 1, emb), "'" LM "embed_tokens.weight'",
               "[65536]", "[1024, 64]");
    int64_t conv[3] = {256, 4, 1};
    EDIT_FAILS(reshape(s, LM "layers.0.linear_attn.conv1d.weight", 3, conv),
               "'" LM "layers.0.linear_attn.conv1d.weight'", "[256, 4, 1]", "[256, 1, 4]");
}
END_TEST

/* conv1d may also be stored squeezed to [C, K]; the model loads and computes the same. */
START_TEST(conv1d_squeezed)
{
    tzset s = tz_load(FIXTURE "/model.safetensors");
    for (int i = 0; i < 3; i++) {
        char name[256];
        snprintf(name, sizeof name, LM "layers.%d.linear_attn.conv1d.weight", i);
        int64_t sq[2] = {256, 4};
        reshape(&s, name, 2, sq);
    }
    char *dir = checkpoint_with(&s);
    assert_same_logits(dir, 0);
    tu_rmdir(dir);
    tz_free(&s);
}
END_TEST

static void retype(tzset *s, const char *name, const char *dtype, int ndim, const int64_t *shape)
{
    tz *t = tz_get(s, name);
    snprintf(t->dtype, sizeof t->dtype, "%s", dtype);
    t->ndim = ndim;
    memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
    ck_assert_uint_eq(elems(t) * dtype_bytes(dtype), t->nbytes);
}

START_TEST(unsupported_dtype)
{
    int64_t half_rows[2] = {128, 64};
    EDIT_FAILS(retype(s, LM "layers.0.linear_attn.in_proj_qkv.weight", "I32", 2, half_rows),
               "'" LM "layers.0.linear_attn.in_proj_qkv.weight'", "I32", "not supported");
    int64_t bytes[2] = {512, 64};
    EDIT_FAILS(retype(s, LM "layers.0.linear_attn.in_proj_qkv.weight", "U8", 2, bytes),
               "'" LM "layers.0.linear_attn.in_proj_qkv.weight'", "U8", "not supported");
    int64_t norm[1] = {32};
    EDIT_FAILS(retype(s, LM "norm.weight", "U32", 1, norm), "'" LM "norm.weight'", "U32");
    int64_t gu[3] = {8, 32, 64};
    EDIT_FAILS(retype(s, LM "layers.3.mlp.experts.gate_up_proj", "I32", 3, gu),
               "'" LM "layers.3.mlp.experts.gate_up_proj'", "I32");
}
END_TEST

START_TEST(missing_files)
{
    /* no config.json */
    char *dir = tu_tmpdir();
    copy_file(FIXTURE "/model.safetensors", dir, "model.safetensors");
    char cfg[1024];
    path_in(cfg, sizeof cfg, dir, "config.json");
    EXPECT_OPEN_FAIL(dir, cfg, dir);
    /* a weights file given directly, with no config beside it */
    char weights[1024];
    path_in(weights, sizeof weights, dir, "model.safetensors");
    EXPECT_OPEN_FAIL(weights, cfg);
    /* no weights */
    remove(weights);
    copy_file(FIXTURE "/config.json", dir, "config.json");
    EXPECT_OPEN_FAIL(dir, dir, "model.safetensors");
    /* nothing at all */
    char gone[1024];
    path_in(gone, sizeof gone, dir, "nothing-here");
    EXPECT_OPEN_FAIL(gone, gone);
    /* an empty weights file */
    tu_write(weights, "", 0);
    EXPECT_OPEN_FAIL(dir, weights, "empty");
    /* weights that are not safetensors */
    tu_write(weights, "this is not a checkpoint, just text", 35);
    EXPECT_OPEN_FAIL(dir, weights);
    tu_rmdir(dir);
}
END_TEST

START_TEST(bad_config)
{
    const char *keys[] = {"num_experts", "hidden_size", "vocab_size", "linear_conv_kernel_dim"};
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        char *dir = tu_tmpdir();
        copy_file(FIXTURE "/model.safetensors", dir, "model.safetensors");
        json_t *cfg = fixture_config();
        json_object_del(json_object_get(cfg, "text_config"), keys[k]);
        save_config(cfg, dir);
        json_decref(cfg);
        char path[1024], quoted[128];
        path_in(path, sizeof path, dir, "config.json");
        snprintf(quoted, sizeof quoted, "'%s'", keys[k]);
        EXPECT_OPEN_FAIL(dir, path, quoted);
        tu_rmdir(dir);
    }
    /* a config that disagrees with the weights: the first tensor bound names the mismatch */
    char *dir = tu_tmpdir();
    copy_file(FIXTURE "/model.safetensors", dir, "model.safetensors");
    json_t *cfg = fixture_config();
    json_object_set_new(json_object_get(cfg, "text_config"), "hidden_size", json_integer(128));
    save_config(cfg, dir);
    EXPECT_OPEN_FAIL(dir, "'" LM "embed_tokens.weight'", "[1024, 64]", "[1024, 128]");
    json_object_set_new(json_object_get(cfg, "text_config"), "hidden_size", json_integer(64));
    json_object_set_new(json_object_get(cfg, "text_config"), "num_experts", json_integer(16));
    save_config(cfg, dir);
    EXPECT_OPEN_FAIL(dir, "'" LM "layers.0.mlp.gate.weight'", "[8, 64]", "[16, 64]");
    /* a vocabulary that disagrees */
    json_object_set_new(json_object_get(cfg, "text_config"), "num_experts", json_integer(8));
    json_object_set_new(json_object_get(cfg, "text_config"), "vocab_size", json_integer(1000));
    save_config(cfg, dir);
    EXPECT_OPEN_FAIL(dir, "embed_tokens.weight", "[1000, 64]");
    json_decref(cfg);
    tu_rmdir(dir);
}
END_TEST

/* ---- equivalent layouts -------------------------------------------------------------------- */

/* The fused [E, 2F, D] / [E, D, F] experts of every layer split into per-expert tensors. */
static void split_experts(tzset *s, int n_layers, int64_t E, int64_t F, int64_t D)
{
    for (int l = 0; l < n_layers; l++) {
        char gu_name[256], dn_name[256], name[256];
        snprintf(gu_name, sizeof gu_name, LM "layers.%d.mlp.experts.gate_up_proj", l);
        snprintf(dn_name, sizeof dn_name, LM "layers.%d.mlp.experts.down_proj", l);
        tz *gu = tz_get(s, gu_name), *dn = tz_get(s, dn_name);
        ck_assert_int_eq(gu->shape[0], E);
        ck_assert_int_eq(gu->shape[1], 2 * F);
        ck_assert_int_eq(dn->shape[2], F);
        size_t es = dtype_bytes(gu->dtype);
        uint8_t *gud = gu->data, *dnd = dn->data;
        gu->data = dn->data = NULL;
        char dtype[16];
        snprintf(dtype, sizeof dtype, "%s", gu->dtype);
        tz_remove(s, gu_name);
        tz_remove(s, dn_name);
        int64_t fd[2] = {F, D}, df[2] = {D, F};
        for (int64_t e = 0; e < E; e++) {
            const uint8_t *base = gud + (size_t)(e * 2 * F * D) * es;
            snprintf(name, sizeof name, LM "layers.%d.mlp.experts.%lld.gate_proj.weight", l,
                     (long long)e);
            tz_add(s, name, dtype, 2, fd, base);
            snprintf(name, sizeof name, LM "layers.%d.mlp.experts.%lld.up_proj.weight", l,
                     (long long)e);
            tz_add(s, name, dtype, 2, fd, base + (size_t)(F * D) * es);
            snprintf(name, sizeof name, LM "layers.%d.mlp.experts.%lld.down_proj.weight", l,
                     (long long)e);
            tz_add(s, name, dtype, 2, df, dnd + (size_t)(e * D * F) * es);
        }
        free(gud);
        free(dnd);
    }
}

START_TEST(per_expert_layout)
{
    tzset s = tz_load(FIXTURE "/model.safetensors");
    split_experts(&s, 4, 8, 32, 64);
    ck_assert_ptr_null(tz_find(&s, LM "layers.0.mlp.experts.gate_up_proj"));
    char *dir = checkpoint_with(&s);
    assert_same_logits(dir, 0);
    tu_rmdir(dir);
    /* one expert's projection missing is named */
    tz_remove(&s, LM "layers.2.mlp.experts.5.up_proj.weight");
    dir = checkpoint_with(&s);
    EXPECT_OPEN_FAIL(dir, "'" LM "layers.2.mlp.experts.5.up_proj.weight'", "missing");
    tu_rmdir(dir);
    tz_free(&s);
}
END_TEST

/* Text-only checkpoints: "model." instead of "model.language_model.", flat config.json. */
START_TEST(text_only_naming)
{
    tzset s = tz_load(FIXTURE "/model.safetensors");
    size_t lm = strlen(LM);
    for (size_t i = 0; i < s.n; i++) {
        if (strncmp(s.t[i].name, LM, lm)) continue;
        char *renamed = malloc(strlen(s.t[i].name) + 1);
        ck_assert_ptr_nonnull(renamed);
        sprintf(renamed, "model.%s", s.t[i].name + lm);
        free(s.t[i].name);
        s.t[i].name = renamed;
    }
    ck_assert_ptr_nonnull(tz_find(&s, "model.embed_tokens.weight"));
    char *dir = tu_tmpdir();
    save_weights(&s, dir);
    json_t *cfg = fixture_config();
    json_t *flat = json_deep_copy(json_object_get(cfg, "text_config"));
    json_object_set(flat, "tie_word_embeddings", json_object_get(cfg, "tie_word_embeddings"));
    json_object_set_new(flat, "architectures", json_pack("[s]", "Qwen3_5MoeForCausalLM"));
    save_config(flat, dir);
    assert_same_logits(dir, 0);
    /* the flat config with the original names, and the nested config with the text-only names */
    save_config(cfg, dir);
    assert_same_logits(dir, 0);
    /* a tensor missing under the text-only naming is named with that prefix */
    tz_remove(&s, "model.layers.1.linear_attn.in_proj_b.weight");
    save_weights(&s, dir);
    EXPECT_OPEN_FAIL(dir, "'model.layers.1.linear_attn.in_proj_b.weight'", "missing");
    tz_free(&s);
    s = tz_load(FIXTURE "/model.safetensors");
    save_weights(&s, dir);
    save_config(flat, dir);
    assert_same_logits(dir, 0);
    tz_free(&s);
    json_decref(flat);
    json_decref(cfg);
    tu_rmdir(dir);
}
END_TEST

START_TEST(weights_file_path)
{
    /* the .safetensors file itself as the model path, config.json beside it */
    assert_same_logits(FIXTURE "/model.safetensors", 0);
}
END_TEST

START_TEST(f32_weights)
{
    tzset s = tz_load(FIXTURE "/model.safetensors");
    convert_all(&s, "F32");
    char *dir = checkpoint_with(&s);
    assert_same_logits(dir, 1e-4);
    tu_rmdir(dir);
    tz_free(&s);
}
END_TEST

START_TEST(f16_weights)
{
    tzset s = tz_load(FIXTURE "/model.safetensors");
    convert_all(&s, "F16");
    char *dir = checkpoint_with(&s);
    assert_same_logits(dir, 1e-3);
    tu_rmdir(dir);
    tz_free(&s);
}
END_TEST

/* Mixed dtypes in one checkpoint: small parameters in F32 (as A_log often is), the rest BF16. */
START_TEST(mixed_dtypes)
{
    tzset all = tz_load(FIXTURE "/model.safetensors"), small = {0};
    /* convert only 1-D tensors */
    for (size_t i = 0; i < all.n; i++)
        if (all.t[i].ndim == 1) {
            tz *t = &all.t[i];
            tz_add(&small, t->name, t->dtype, t->ndim, t->shape, t->data);
        }
    convert_all(&small, "F32");
    for (size_t i = 0; i < small.n; i++) {
        tz *dst = tz_get(&all, small.t[i].name), *src = &small.t[i];
        free(dst->data);
        dst->data = src->data;
        dst->nbytes = src->nbytes;
        src->data = NULL;
        snprintf(dst->dtype, sizeof dst->dtype, "F32");
    }
    tz_free(&small);
    char *dir = checkpoint_with(&all);
    assert_same_logits(dir, 1e-4);
    tu_rmdir(dir);
    tz_free(&all);
}
END_TEST

/* The same tensors in two shards with an index. */
START_TEST(sharded_checkpoint)
{
    tzset s = tz_load(FIXTURE "/model.safetensors");
    tzset parts[2] = {{0}, {0}};
    json_t *index = json_object(), *map = json_object();
    json_object_set_new(index, "metadata", json_object());
    json_object_set_new(index, "weight_map", map);
    const char *files[2] = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"};
    for (size_t i = 0; i < s.n; i++) {
        int p = i % 2 ? 1 : 0;
        tz *t = &s.t[i];
        tz_add(&parts[p], t->name, t->dtype, t->ndim, t->shape, t->data);
        json_object_set_new(map, t->name, json_string(files[p]));
    }
    char *dir = tu_tmpdir();
    copy_file(FIXTURE "/config.json", dir, "config.json");
    char path[1024];
    for (int p = 0; p < 2; p++) {
        path_in(path, sizeof path, dir, files[p]);
        tz_save(&parts[p], path);
        tz_free(&parts[p]);
    }
    path_in(path, sizeof path, dir, "model.safetensors.index.json");
    ck_assert_int_eq(json_dump_file(index, path, JSON_INDENT(2)), 0);
    assert_same_logits(dir, 0);
    /* a shard gone: named */
    char shard[1024];
    path_in(shard, sizeof shard, dir, files[1]);
    remove(shard);
    EXPECT_OPEN_FAIL(dir, files[1]);
    json_decref(index);
    tu_rmdir(dir);
    tz_free(&s);
}
END_TEST

/* ---- the CLI ------------------------------------------------------------------------------- */

static void expect_exit(const char *args, int status, const char *const *needles)
{
    tu_run_result r = tu_run(args);
    ck_assert_msg(r.status == status, "qmix %s: exit %d, expected %d\nstdout: %s\nstderr: %s",
                  args, r.status, status, r.out, r.err);
    if (needles[0]) {
        char *both = malloc(strlen(r.out) + strlen(r.err) + 2);
        sprintf(both, "%s\n%s", r.out, r.err);
        assert_mentions(both, needles);
        free(both);
    }
    tu_run_free(&r);
}

#define EXPECT_EXIT(args, status, ...)                                                            \
    do {                                                                                          \
        const char *needles_[] = {__VA_ARGS__, NULL};                                             \
        expect_exit(args, status, needles_);                                                      \
    } while (0)

START_TEST(cli_binary_present)
{
    struct stat sb;
    ck_assert_msg(stat(tu_qmix_bin(), &sb) == 0, "%s: %s (set QMIX_BIN)", tu_qmix_bin(),
                  strerror(errno));
}
END_TEST

START_TEST(cli_help)
{
    EXPECT_EXIT("--help", 0, "usage", "info", "generate", "logits");
    EXPECT_EXIT("-h", 0, "usage");
    const char *cmds[] = {"info", "generate", "logits", "synth", "bench"};
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
        char args[64];
        snprintf(args, sizeof args, "%s --help", cmds[i]);
        tu_run_result r = tu_run(args);
        ck_assert_msg(r.status == 0, "qmix %s: exit %d\n%s", args, r.status, r.err);
        ck_assert_msg(strstr(r.out, "usage") != NULL, "qmix %s printed no usage: %s", args, r.out);
        ck_assert_msg(strstr(r.out, cmds[i]) != NULL, "qmix %s: usage does not name it", args);
        tu_run_free(&r);
        snprintf(args, sizeof args, "%s -h", cmds[i]);
        EXPECT_EXIT(args, 0, "usage");
    }
}
END_TEST

START_TEST(cli_usage_errors)
{
    EXPECT_EXIT("", 2, "usage");
    EXPECT_EXIT("frobnicate", 2, "frobnicate");
    EXPECT_EXIT("--bogus", 2, "--bogus");
    EXPECT_EXIT("info --bogus " FIXTURE, 2, "--bogus");
    EXPECT_EXIT("generate " FIXTURE " --tokens 1 --bogus", 2, "--bogus");
    EXPECT_EXIT("logits " FIXTURE " --tokens 1 --out /dev/null --bogus", 2, "--bogus");
    EXPECT_EXIT("synth --bogus", 2, "--bogus");
    /* missing or malformed values */
    EXPECT_EXIT("info", 2, "usage");
    EXPECT_EXIT("logits " FIXTURE " --tokens", 2, "--tokens");
    EXPECT_EXIT("logits " FIXTURE " --tokens 'a b' --out /dev/null", 2, "token");
    EXPECT_EXIT("logits " FIXTURE " --tokens 1 --out /dev/null --threads many", 2, "--threads");
    EXPECT_EXIT("logits " FIXTURE " --tokens 1 --out /dev/null --mode sideways", 2, "sideways");
}
END_TEST

START_TEST(cli_info)
{
    EXPECT_EXIT("info " FIXTURE, 0, "LLLF", "8 experts");
    EXPECT_EXIT("info testdata/no/such/checkpoint", 1, "testdata/no/such/checkpoint");
    /* a broken checkpoint: the message names the tensor */
    tzset s = tz_load(FIXTURE "/model.safetensors");
    tz_remove(&s, LM "layers.3.self_attn.v_proj.weight");
    char *dir = checkpoint_with(&s);
    char args[1200];
    snprintf(args, sizeof args, "info '%s'", dir);
    EXPECT_EXIT(args, 1, LM "layers.3.self_attn.v_proj.weight");
    tu_rmdir(dir);
    tz_free(&s);
}
END_TEST

START_TEST(cli_logits)
{
    char *dir = tu_tmpdir();
    char out[1024], args[2048];
    path_in(out, sizeof out, dir, "logits.f32");
    snprintf(args, sizeof args, "logits " FIXTURE " --tokens '1 2 3' --out '%s' --threads 1", out);
    EXPECT_EXIT(args, 0, "");
    size_t n;
    free(tu_read(out, &n));
    ck_assert_uint_eq(n, 3 * 1024 * sizeof(float));
    /* a token id past the vocabulary */
    snprintf(args, sizeof args, "logits " FIXTURE " --tokens '1 2 1024' --out '%s'", out);
    EXPECT_EXIT(args, 1, "1024", "vocabulary");
    snprintf(args, sizeof args, "logits " FIXTURE " --tokens 99999999 --out '%s'", out);
    EXPECT_EXIT(args, 1, "99999999", "vocabulary");
    snprintf(args, sizeof args, "logits " FIXTURE " --tokens '5 4096' --out '%s' --mode decode",
             out);
    EXPECT_EXIT(args, 1, "4096");
    /* a missing model */
    snprintf(args, sizeof args, "logits testdata/missing-model --tokens 1 --out '%s'", out);
    EXPECT_EXIT(args, 1, "testdata/missing-model");
    tu_rmdir(dir);
}
END_TEST

static Suite *model_load_suite(void)
{
    Suite *s = suite_create("model_load");
    TCase *tc = tcase_create("bad");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, missing_tensor);
    tcase_add_test(tc, wrong_shape);
    tcase_add_test(tc, unsupported_dtype);
    tcase_add_test(tc, missing_files);
    tcase_add_test(tc, bad_config);
    suite_add_tcase(s, tc);
    tc = tcase_create("equivalent");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, f16_conversion);
    tcase_add_test(tc, conv1d_squeezed);
    tcase_add_test(tc, per_expert_layout);
    tcase_add_test(tc, text_only_naming);
    tcase_add_test(tc, weights_file_path);
    tcase_add_test(tc, f32_weights);
    tcase_add_test(tc, f16_weights);
    tcase_add_test(tc, mixed_dtypes);
    tcase_add_test(tc, sharded_checkpoint);
    suite_add_tcase(s, tc);
    tc = tcase_create("cli");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, cli_binary_present);
    tcase_add_test(tc, cli_help);
    tcase_add_test(tc, cli_usage_errors);
    tcase_add_test(tc, cli_info);
    tcase_add_test(tc, cli_logits);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(model_load_suite)
