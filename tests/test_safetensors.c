/* The safetensors reader: valid files of every dtype, zero-size tensors, metadata, single files on
 * disk and sharded checkpoints; then hostile headers, each of which must fail with a message that
 * names the file (and the tensor, where there is one). Files are built here, in C. */
#include <jansson.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <time.h>

#include "formats/safetensors.h"
#include "testutil.h"

#define LABEL "hostile.safetensors"

/* ---- building files ------------------------------------------------------------------------ */

/* JSON written with single quotes for readability: 'x' -> "x". Returns a malloc'd string. */
static char *jq(const char *s)
{
    char *out = strdup(s);
    ck_assert_ptr_nonnull(out);
    for (char *p = out; *p; p++)
        if (*p == '\'') *p = '"';
    return out;
}

/* data byte i of every test file: a pattern that shows up misplaced data */
static uint8_t pattern(size_t i) { return (uint8_t)(i * 7 + 1); }

/* A whole file image: 8-byte little-endian header length, the header as given (single quotes
 * become double quotes), then data_len pattern bytes. The buffer is exactly *len bytes, so ASan
 * sees any read past its end. */
static uint8_t *image(const char *header_sq, size_t data_len, size_t *len)
{
    char *header = jq(header_sq);
    size_t hl = strlen(header);
    *len = 8 + hl + data_len;
    uint8_t *p = malloc(*len);
    ck_assert_ptr_nonnull(p);
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)((uint64_t)hl >> (8 * i));
    memcpy(p + 8, header, hl);
    for (size_t i = 0; i < data_len; i++) p[8 + hl + i] = pattern(i);
    free(header);
    return p;
}

static void write_file(const char *dir, const char *name, const char *header_sq, size_t data_len)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    size_t len;
    uint8_t *img = image(header_sq, data_len, &len);
    tu_write(path, img, len);
    free(img);
}

static void write_text(const char *dir, const char *name, const char *text_sq)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    char *text = jq(text_sq);
    tu_write(path, text, strlen(text));
    free(text);
}

static void assert_mentions(const char *msg, const char *const *needles)
{
    for (size_t i = 0; needles[i]; i++)
        ck_assert_msg(strstr(msg, needles[i]) != NULL, "error message '%s' does not mention '%s'",
                      msg, needles[i]);
}

/* Opening the image must fail, return no store, and name LABEL and every needle. */
static void expect_fail_image(const uint8_t *img, size_t len, const char *const *needles)
{
    qmix_err err;
    memset(&err, 0, sizeof err);
    qmix_st_store *st = (qmix_st_store *)&err; /* must be reset to NULL */
    int rc = qmix_st_open_memory(img, len, LABEL, &st, &err);
    ck_assert_msg(rc == -1, "hostile input accepted (rc %d)", rc);
    ck_assert_ptr_null(st);
    ck_assert_msg(err.msg[0] != 0, "no error message");
    ck_assert_msg(strstr(err.msg, LABEL) != NULL, "error message '%s' does not name the file",
                  err.msg);
    assert_mentions(err.msg, needles);
}

static void expect_fail_header(const char *header_sq, size_t data_len, const char *const *needles)
{
    size_t len;
    uint8_t *img = image(header_sq, data_len, &len);
    expect_fail_image(img, len, needles);
    free(img);
}

/* EXPECT_FAIL(header, data bytes, "words", "the message", "must contain") */
#define EXPECT_FAIL(header, data_len, ...)                                                        \
    do {                                                                                          \
        const char *needles_[] = {__VA_ARGS__, NULL};                                             \
        expect_fail_header(header, data_len, needles_);                                           \
    } while (0)

static qmix_st_store *open_ok(const uint8_t *img, size_t len)
{
    qmix_err err;
    memset(&err, 0, sizeof err);
    qmix_st_store *st = NULL;
    int rc = qmix_st_open_memory(img, len, "valid.safetensors", &st, &err);
    ck_assert_msg(rc == 0, "valid file rejected: %s", err.msg);
    ck_assert_ptr_nonnull(st);
    return st;
}

static qmix_st_store *open_path_ok(const char *path)
{
    qmix_err err;
    memset(&err, 0, sizeof err);
    qmix_st_store *st = NULL;
    int rc = qmix_st_open(path, &st, &err);
    ck_assert_msg(rc == 0, "opening %s failed: %s", path, err.msg);
    ck_assert_ptr_nonnull(st);
    return st;
}

/* qmix_st_open(path) must fail naming every needle. */
static void expect_open_fail(const char *path, const char *const *needles)
{
    qmix_err err;
    memset(&err, 0, sizeof err);
    qmix_st_store *st = (qmix_st_store *)&err;
    int rc = qmix_st_open(path, &st, &err);
    ck_assert_msg(rc == -1, "%s: hostile checkpoint accepted", path);
    ck_assert_ptr_null(st);
    assert_mentions(err.msg, needles);
}

#define EXPECT_OPEN_FAIL(path, ...)                                                               \
    do {                                                                                          \
        const char *needles_[] = {__VA_ARGS__, NULL};                                             \
        expect_open_fail(path, needles_);                                                         \
    } while (0)

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- valid files --------------------------------------------------------------------------- */

static const struct {
    const char *name;
    qmix_dtype dtype;
    size_t size;
    const char *lower;
} dtypes[] = {
    {"F32", QMIX_F32, 4, "f32"},   {"F16", QMIX_F16, 2, "f16"},  {"BF16", QMIX_BF16, 2, "bf16"},
    {"U32", QMIX_U32, 4, "u32"},   {"I32", QMIX_I32, 4, "i32"},  {"U8", QMIX_U8, 1, "u8"},
    {"I8", QMIX_I8, 1, "i8"},      {"I64", QMIX_I64, 8, "i64"},  {"U16", QMIX_U16, 2, "u16"},
    {"I16", QMIX_I16, 2, "i16"},   {"F64", QMIX_F64, 8, "f64"},  {"BOOL", QMIX_BOOL, 1, "bool"},
};
#define N_DTYPES (sizeof dtypes / sizeof dtypes[0])

START_TEST(dtype_names)
{
    for (size_t i = 0; i < N_DTYPES; i++) {
        ck_assert_int_eq(qmix_dtype_from_st_name(dtypes[i].name), dtypes[i].dtype);
        ck_assert_str_eq(qmix_dtype_st_name(dtypes[i].dtype), dtypes[i].name);
        ck_assert_str_eq(qmix_dtype_name(dtypes[i].dtype), dtypes[i].lower);
        ck_assert_uint_eq(qmix_dtype_size(dtypes[i].dtype), dtypes[i].size);
    }
    ck_assert_int_eq(qmix_dtype_from_st_name("F8_E9M9"), QMIX_DTYPE_UNKNOWN);
    ck_assert_int_eq(qmix_dtype_from_st_name("f32"), QMIX_DTYPE_UNKNOWN);
    ck_assert_int_eq(qmix_dtype_from_st_name(""), QMIX_DTYPE_UNKNOWN);
    ck_assert_uint_eq(qmix_dtype_size(QMIX_DTYPE_UNKNOWN), 0);
    ck_assert_str_eq(qmix_dtype_name(QMIX_DTYPE_COUNT), "unknown");
    ck_assert_str_eq(qmix_dtype_name((qmix_dtype)-1), "unknown");
    ck_assert_str_eq(qmix_dtype_st_name(QMIX_DTYPE_COUNT), "UNKNOWN");
}
END_TEST

/* One [2, 3] tensor of each dtype, placed after a 5-byte U8 tensor so the data is unaligned. */
START_TEST(each_dtype)
{
    for (size_t i = 0; i < N_DTYPES; i++) {
        size_t nb = 6 * dtypes[i].size;
        char header[512];
        snprintf(header, sizeof header,
                 "{'pad': {'dtype': 'U8', 'shape': [5], 'data_offsets': [0, 5]},"
                 " 'w': {'dtype': '%s', 'shape': [2, 3], 'data_offsets': [5, %zu]}}",
                 dtypes[i].name, 5 + nb);
        size_t len;
        uint8_t *img = image(header, 5 + nb, &len);
        qmix_st_store *st = open_ok(img, len);
        ck_assert_uint_eq(qmix_st_count(st), 2);
        const qmix_tensor *t = qmix_st_find(st, "w");
        ck_assert_ptr_nonnull(t);
        ck_assert_str_eq(t->name, "w");
        ck_assert_int_eq(t->dtype, dtypes[i].dtype);
        ck_assert_int_eq(t->ndim, 2);
        ck_assert_int_eq(t->shape[0], 2);
        ck_assert_int_eq(t->shape[1], 3);
        ck_assert_uint_eq(t->nbytes, nb);
        ck_assert_int_eq(t->file, 0);
        const uint8_t *data = img + len - (5 + nb);
        ck_assert_ptr_eq(t->data, data + 5);
        for (size_t b = 0; b < nb; b++) ck_assert_uint_eq(((const uint8_t *)t->data)[b], pattern(5 + b));
        const qmix_tensor *pad = qmix_st_find(st, "pad");
        ck_assert_ptr_nonnull(pad);
        ck_assert_ptr_eq(pad->data, data);
        ck_assert_int_eq(pad->dtype, QMIX_U8);
        qmix_st_close(st);
        free(img);
    }
}
END_TEST

START_TEST(lookup_and_enumeration)
{
    size_t len;
    uint8_t *img = image("{'b': {'dtype': 'F32', 'shape': [1], 'data_offsets': [4, 8]},"
                         " 'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 4]},"
                         " 'c': {'dtype': 'I32', 'shape': [1, 1, 1, 1, 1, 1, 1, 2],"
                         "       'data_offsets': [8, 16]}}",
                         16, &len);
    qmix_st_store *st = open_ok(img, len);
    ck_assert_uint_eq(qmix_st_count(st), 3);
    ck_assert_int_eq(qmix_st_file_count(st), 1);
    ck_assert_str_eq(qmix_st_file_path(st, 0), "valid.safetensors");
    ck_assert_ptr_null(qmix_st_file_path(st, 1));
    ck_assert_ptr_null(qmix_st_file_path(st, -1));
    /* enumeration follows the header; every enumerated tensor is also found by name */
    const char *order[] = {"b", "a", "c"};
    for (uint64_t i = 0; i < 3; i++) {
        const qmix_tensor *t = qmix_st_at(st, i);
        ck_assert_ptr_nonnull(t);
        ck_assert_str_eq(t->name, order[i]);
        ck_assert_ptr_eq(qmix_st_find(st, order[i]), t);
    }
    ck_assert_ptr_null(qmix_st_at(st, 3));
    ck_assert_ptr_null(qmix_st_find(st, "d"));
    ck_assert_ptr_null(qmix_st_find(st, ""));
    ck_assert_ptr_null(qmix_st_find(st, "a "));
    const qmix_tensor *c = qmix_st_find(st, "c");
    ck_assert_int_eq(c->ndim, QMIX_MAX_DIMS); /* exactly 8 dims is allowed */
    ck_assert_int_eq(c->shape[7], 2);
    qmix_st_close(st);
    free(img);
}
END_TEST

START_TEST(zero_size_tensors)
{
    size_t len;
    /* empty tensors at the start, between, inside and at the end of the data; a scalar */
    uint8_t *img = image("{'z0': {'dtype': 'F32', 'shape': [0], 'data_offsets': [0, 0]},"
                         " 'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]},"
                         " 'z1': {'dtype': 'BF16', 'shape': [3, 0], 'data_offsets': [8, 8]},"
                         " 'z2': {'dtype': 'F16', 'shape': [0, 4], 'data_offsets': [4, 4]},"
                         " 's': {'dtype': 'F32', 'shape': [], 'data_offsets': [8, 12]},"
                         " 'z3': {'dtype': 'U8', 'shape': [0, 0, 0], 'data_offsets': [12, 12]}}",
                         12, &len);
    qmix_st_store *st = open_ok(img, len);
    ck_assert_uint_eq(qmix_st_count(st), 6);
    const char *empties[] = {"z0", "z1", "z2", "z3"};
    for (int i = 0; i < 4; i++) {
        const qmix_tensor *t = qmix_st_find(st, empties[i]);
        ck_assert_ptr_nonnull(t);
        ck_assert_uint_eq(t->nbytes, 0);
    }
    const qmix_tensor *s = qmix_st_find(st, "s");
    ck_assert_int_eq(s->ndim, 0);
    ck_assert_uint_eq(s->nbytes, 4);
    qmix_st_close(st);
    free(img);

    /* the same with the empty tensor listed after the one it shares an offset with */
    img = image("{'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]},"
                " 'z': {'dtype': 'F32', 'shape': [0], 'data_offsets': [0, 0]}}",
                8, &len);
    st = open_ok(img, len);
    ck_assert_uint_eq(qmix_st_count(st), 2);
    qmix_st_close(st);
    free(img);

    /* a file holding only empty tensors and no data bytes at all */
    img = image("{'e': {'dtype': 'F32', 'shape': [0, 16], 'data_offsets': [0, 0]}}", 0, &len);
    st = open_ok(img, len);
    ck_assert_uint_eq(qmix_st_find(st, "e")->nbytes, 0);
    qmix_st_close(st);
    free(img);

    /* no tensors at all */
    img = image("{}", 0, &len);
    st = open_ok(img, len);
    ck_assert_uint_eq(qmix_st_count(st), 0);
    ck_assert_ptr_null(qmix_st_find(st, "x"));
    ck_assert_ptr_null(qmix_st_at(st, 0));
    qmix_st_close(st);
    free(img);
}
END_TEST

START_TEST(metadata)
{
    size_t len;
    uint8_t *img = image("{'__metadata__': {'format': 'pt', 'note': 'q\\u00e9 \\'x\\''},"
                         " 'w': {'dtype': 'BF16', 'shape': [2], 'data_offsets': [0, 4]}}",
                         4, &len);
    qmix_st_store *st = open_ok(img, len);
    ck_assert_uint_eq(qmix_st_count(st), 1); /* __metadata__ is not a tensor */
    ck_assert_ptr_null(qmix_st_find(st, "__metadata__"));
    ck_assert_str_eq(qmix_st_metadata(st, 0, "format"), "pt");
    ck_assert_str_eq(qmix_st_metadata(st, 0, "note"), "q\xc3\xa9 \"x\"");
    ck_assert_ptr_null(qmix_st_metadata(st, 0, "missing"));
    ck_assert_ptr_null(qmix_st_metadata(st, 1, "format"));
    ck_assert_ptr_null(qmix_st_metadata(st, -1, "format"));
    qmix_st_close(st);
    free(img);

    /* metadata last, empty metadata, no metadata */
    img = image("{'w': {'dtype': 'U8', 'shape': [1], 'data_offsets': [0, 1]}, '__metadata__': {}}",
                1, &len);
    st = open_ok(img, len);
    ck_assert_ptr_null(qmix_st_metadata(st, 0, "format"));
    qmix_st_close(st);
    free(img);
    img = image("{'w': {'dtype': 'U8', 'shape': [1], 'data_offsets': [0, 1]}}", 1, &len);
    st = open_ok(img, len);
    ck_assert_ptr_null(qmix_st_metadata(st, 0, "format"));
    qmix_st_close(st);
    free(img);
}
END_TEST

/* Writers pad the header with spaces to align the data; unknown extra keys are ignored. */
START_TEST(padding_and_extra_keys)
{
    size_t len;
    uint8_t *img = image("{'w': {'dtype': 'F16', 'shape': [3], 'data_offsets': [0, 6],"
                         "       'extra': [1, {'x': null}]}}        ",
                         6, &len);
    qmix_st_store *st = open_ok(img, len);
    const qmix_tensor *t = qmix_st_find(st, "w");
    ck_assert_ptr_nonnull(t);
    ck_assert_ptr_eq(t->data, img + len - 6);
    qmix_st_close(st);
    free(img);
}
END_TEST

START_TEST(files_on_disk)
{
    char *dir = tu_tmpdir();
    write_file(dir, "model.safetensors",
               "{'x': {'dtype': 'F32', 'shape': [2, 2], 'data_offsets': [0, 16]}}", 16);
    char path[1024];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    /* by file and by directory */
    const char *paths[] = {path, dir};
    for (int i = 0; i < 2; i++) {
        qmix_st_store *st = open_path_ok(paths[i]);
        const qmix_tensor *t = qmix_st_find(st, "x");
        ck_assert_ptr_nonnull(t);
        ck_assert_uint_eq(t->nbytes, 16);
        for (int b = 0; b < 16; b++) ck_assert_uint_eq(((const uint8_t *)t->data)[b], pattern((size_t)b));
        ck_assert_str_eq(qmix_st_file_path(st, 0), path);
        qmix_st_close(st);
    }

    /* an empty file */
    snprintf(path, sizeof path, "%s/empty.safetensors", dir);
    tu_write(path, "", 0);
    EXPECT_OPEN_FAIL(path, path, "empty");
    /* a missing file */
    snprintf(path, sizeof path, "%s/missing.safetensors", dir);
    EXPECT_OPEN_FAIL(path, path, "No such file");
    /* a directory without weights */
    char sub[512];
    snprintf(sub, sizeof sub, "%s/sub", dir);
    ck_assert_int_eq(mkdir(sub, 0755), 0);
    EXPECT_OPEN_FAIL(sub, sub, "model.safetensors");
    /* model.safetensors that is a directory */
    snprintf(path, sizeof path, "%s/model.safetensors", sub);
    ck_assert_int_eq(mkdir(path, 0755), 0);
    EXPECT_OPEN_FAIL(sub, path, "not a regular file");
    /* a hostile file on disk names its path */
    write_file(dir, "bad.safetensors",
               "{'x': {'dtype': 'F32', 'shape': [2, 2], 'data_offsets': [0, 16]}}", 15);
    snprintf(path, sizeof path, "%s/bad.safetensors", dir);
    EXPECT_OPEN_FAIL(path, path, "'x'", "past the end");
    tu_rmdir(dir);
}
END_TEST

/* ---- hostile single files ------------------------------------------------------------------ */

START_TEST(hostile_empty_and_short)
{
    uint8_t bytes[16] = {0};
    const char *none[] = {NULL};
    expect_fail_image(bytes, 0, none);
    const char *trunc[] = {"truncated", NULL};
    for (size_t n = 1; n < 8; n++) expect_fail_image(bytes, n, trunc);
    /* a zero header length: nothing to parse */
    const char *not_st[] = {"not a safetensors file", NULL};
    expect_fail_image(bytes, 8, not_st);
    expect_fail_image(bytes, 16, not_st);
}
END_TEST

static void put_len(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

START_TEST(hostile_header_length)
{
    uint8_t img[64];
    memset(img, ' ', sizeof img);
    memcpy(img + 8, "{}", 2);
    /* longer than the file */
    const char *past100[] = {"truncated", "header claims 100 bytes", "56", NULL};
    put_len(img, 100);
    expect_fail_image(img, sizeof img, past100);
    const char *past57[] = {"truncated", "header claims 57 bytes", "56", NULL};
    put_len(img, 57);
    expect_fail_image(img, sizeof img, past57);
    /* over the 100 MB limit, and absurd values that would overflow size arithmetic */
    const char *limit[] = {"100 MB", NULL};
    const uint64_t huge[] = {QMIX_ST_MAX_HEADER + 1ull, 1ull << 40, UINT64_MAX, UINT64_MAX - 7};
    for (size_t i = 0; i < sizeof huge / sizeof huge[0]; i++) {
        put_len(img, huge[i]);
        expect_fail_image(img, sizeof img, limit);
    }
    /* exactly the file: valid */
    put_len(img, 56);
    qmix_st_store *st = open_ok(img, sizeof img);
    ck_assert_uint_eq(qmix_st_count(st), 0);
    qmix_st_close(st);
}
END_TEST

START_TEST(hostile_not_json)
{
    EXPECT_FAIL("{not json}", 0, "JSON");
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 4]}", 4, "JSON");
    EXPECT_FAIL("{'w': 1} trailing", 0, "JSON");
    EXPECT_FAIL("{'w\\u0000x': {}}", 0, "JSON");
    /* a NUL inside the header */
    size_t len;
    uint8_t *img = image("{'w': 1}", 0, &len);
    img[10] = 0;
    const char *json[] = {"JSON", NULL};
    expect_fail_image(img, len, json);
    free(img);
    /* invalid UTF-8 */
    img = image("{'w': 1}", 0, &len);
    img[10] = 0xff;
    expect_fail_image(img, len, json);
    free(img);
}
END_TEST

START_TEST(hostile_not_object)
{
    EXPECT_FAIL("[1, 2, 3]", 0, "not a JSON object");
    EXPECT_FAIL("42", 0, "not a JSON object");
    EXPECT_FAIL("'str'", 0, "not a JSON object");
    EXPECT_FAIL("null", 0, "not a JSON object");
    EXPECT_FAIL("{'w': [0, 4]}", 4, "'w'", "not an object");
    EXPECT_FAIL("{'w': 'F32'}", 4, "'w'", "not an object");
    EXPECT_FAIL("{'w': null}", 4, "'w'", "not an object");
}
END_TEST

START_TEST(hostile_truncated_data)
{
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 16]}}", 15, "'w'",
                "past the end", "truncated");
    EXPECT_FAIL("{'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 4]},"
                " 'w': {'dtype': 'F32', 'shape': [1], 'data_offsets': [4000000000000, 4000000000004]}}",
                8, "'w'", "past the end");
    EXPECT_FAIL("{'w': {'dtype': 'U8', 'shape': [0], 'data_offsets': [5, 5]}}", 4, "'w'",
                "past the end");
}
END_TEST

START_TEST(hostile_offsets)
{
    /* begin > end */
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [1], 'data_offsets': [8, 4]}}", 8, "'w'",
                "data_offsets");
    /* negative */
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [1], 'data_offsets': [-4, 0]}}", 8, "'w'",
                "data_offsets");
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, -4]}}", 8, "'w'",
                "data_offsets");
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [1],"
                " 'data_offsets': [-9223372036854775808, -9223372036854775804]}}",
                8, "'w'", "data_offsets");
    /* not integers, wrong arity, not an array, missing */
    const char *bad[] = {"[0.0, 4.0]", "[0, 4.0]", "['0', '4']", "[0, null]", "[true, 4]",
                         "[0]", "[0, 4, 8]", "[]", "{'begin': 0, 'end': 4}", "'0,4'", "4",
                         "[[0], [4]]", "[0, 1e1]"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char header[256];
        snprintf(header, sizeof header,
                 "{'w': {'dtype': 'F32', 'shape': [1], 'data_offsets': %s}}", bad[i]);
        EXPECT_FAIL(header, 8, "'w'", "data_offsets");
    }
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [1]}}", 8, "'w'", "data_offsets");
    /* integers beyond int64 are a JSON error */
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 99999999999999999999]}}",
                8, "JSON");
}
END_TEST

START_TEST(hostile_overlap)
{
    EXPECT_FAIL("{'first': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 16]},"
                " 'second': {'dtype': 'F32', 'shape': [4], 'data_offsets': [8, 24]}}",
                24, "'first'", "'second'", "overlap");
    /* the same data twice */
    EXPECT_FAIL("{'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]},"
                " 'b': {'dtype': 'I32', 'shape': [2], 'data_offsets': [0, 8]}}",
                8, "'a'", "'b'", "overlap");
    /* one inside another, listed out of order, with a clean tensor between them */
    EXPECT_FAIL("{'inner': {'dtype': 'U8', 'shape': [2], 'data_offsets': [20, 22]},"
                " 'ok': {'dtype': 'U8', 'shape': [4], 'data_offsets': [40, 44]},"
                " 'outer': {'dtype': 'U8', 'shape': [32], 'data_offsets': [8, 40]}}",
                44, "'inner'", "'outer'", "overlap");
    /* touching is fine */
    size_t len;
    uint8_t *img = image("{'a': {'dtype': 'U8', 'shape': [4], 'data_offsets': [4, 8]},"
                         " 'b': {'dtype': 'U8', 'shape': [4], 'data_offsets': [0, 4]}}",
                         8, &len);
    qmix_st_close(open_ok(img, len));
    free(img);
}
END_TEST

START_TEST(hostile_size_mismatch)
{
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [2, 2], 'data_offsets': [0, 12]}}", 16, "'w'",
                "12 bytes", "16");
    EXPECT_FAIL("{'w': {'dtype': 'BF16', 'shape': [2, 2], 'data_offsets': [0, 16]}}", 16, "'w'",
                "16 bytes", "BF16", "8");
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [], 'data_offsets': [0, 0]}}", 16, "'w'",
                "0 bytes", "4");
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [0], 'data_offsets': [0, 4]}}", 16, "'w'",
                "4 bytes");
}
END_TEST

START_TEST(hostile_dtype)
{
    EXPECT_FAIL("{'w': {'dtype': 'F8_E9M9', 'shape': [1], 'data_offsets': [0, 1]}}", 1, "'w'",
                "F8_E9M9");
    EXPECT_FAIL("{'w': {'dtype': 'f32', 'shape': [1], 'data_offsets': [0, 4]}}", 4, "'w'",
                "dtype");
    EXPECT_FAIL("{'w': {'dtype': '', 'shape': [1], 'data_offsets': [0, 4]}}", 4, "'w'", "dtype");
    EXPECT_FAIL("{'w': {'dtype': 4, 'shape': [1], 'data_offsets': [0, 4]}}", 4, "'w'", "dtype");
    EXPECT_FAIL("{'w': {'dtype': ['F32'], 'shape': [1], 'data_offsets': [0, 4]}}", 4, "'w'",
                "dtype");
    EXPECT_FAIL("{'w': {'shape': [1], 'data_offsets': [0, 4]}}", 4, "'w'", "dtype");
}
END_TEST

START_TEST(hostile_shape)
{
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [2, -1], 'data_offsets': [0, 4]}}", 8, "'w'",
                "shape[1]");
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [1.5], 'data_offsets': [0, 4]}}", 8, "'w'",
                "shape[0]");
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': ['2'], 'data_offsets': [0, 8]}}", 8, "'w'",
                "shape[0]");
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [null], 'data_offsets': [0, 4]}}", 8, "'w'",
                "shape[0]");
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': 2, 'data_offsets': [0, 8]}}", 8, "'w'", "shape");
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'data_offsets': [0, 8]}}", 8, "'w'", "shape");
    /* 9 dimensions */
    EXPECT_FAIL("{'w': {'dtype': 'U8', 'shape': [1, 1, 1, 1, 1, 1, 1, 1, 1],"
                " 'data_offsets': [0, 1]}}",
                1, "'w'", "9 dimensions");
    EXPECT_FAIL("{'w': {'dtype': 'U8', 'shape': [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,"
                " 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 'data_offsets': [0, 1]}}",
                1, "'w'", "dimensions");
    /* element count x dtype size past 64 bits: must not wrap around to a small size */
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [4294967296, 4294967296], 'data_offsets': [0, 0]}}",
                8, "'w'", "overflow");
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [4611686018427387904], 'data_offsets': [0, 0]}}",
                8, "'w'", "overflow");
    EXPECT_FAIL("{'w': {'dtype': 'U8', 'shape': [9223372036854775807, 3, 1],"
                " 'data_offsets': [0, 2]}}",
                8, "'w'", "overflow");
    /* 2^32 * 2^32 * 4 wraps to exactly 0: the wrapped value must not be taken as a size */
    EXPECT_FAIL("{'w': {'dtype': 'F32', 'shape': [65536, 65536, 65536, 65536],"
                " 'data_offsets': [0, 0]}}",
                8, "'w'");
}
END_TEST

START_TEST(hostile_duplicates)
{
    EXPECT_FAIL("{'twice': {'dtype': 'U8', 'shape': [1], 'data_offsets': [0, 1]},"
                " 'twice': {'dtype': 'U8', 'shape': [1], 'data_offsets': [1, 2]}}",
                2, "twice", "duplicate");
    /* real tensor names are long (jansson itself only quotes keys of up to 18 characters) */
    EXPECT_FAIL("{'model.language_model.layers.0.mlp.experts.gate_up_proj':"
                "   {'dtype': 'U8', 'shape': [1], 'data_offsets': [0, 1]},"
                " 'model.language_model.layers.0.mlp.experts.gate_up_proj'  \n "
                "   : {'dtype': 'U8', 'shape': [1], 'data_offsets': [1, 2]}}",
                2, "duplicate", "'model.language_model.layers.0.mlp.experts.gate_up_proj'");
    /* escaped quotes and backslashes inside the repeated name */
    EXPECT_FAIL("{'a\\'b\\\\c\\u00e9 long enough to lose jansson context': 1,"
                " 'a\\'b\\\\c\\u00e9 long enough to lose jansson context': 2}",
                0, "duplicate", "'a\"b\\c\xc3\xa9 long enough");
    EXPECT_FAIL("{'w': {'dtype': 'U8', 'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 1]}}",
                4, "duplicate");
    EXPECT_FAIL("{'__metadata__': {}, '__metadata__': {}}", 0, "duplicate");
}
END_TEST

START_TEST(hostile_metadata)
{
    EXPECT_FAIL("{'__metadata__': ['format', 'pt']}", 0, "__metadata__", "not an object");
    EXPECT_FAIL("{'__metadata__': 'pt'}", 0, "__metadata__", "not an object");
    EXPECT_FAIL("{'__metadata__': null}", 0, "__metadata__", "not an object");
    EXPECT_FAIL("{'__metadata__': {'format': 'pt', 'n_layers': 4}}", 0, "__metadata__",
                "'n_layers'", "not a string");
    EXPECT_FAIL("{'__metadata__': {'nested': {'a': 'b'}}}", 0, "'nested'", "not a string");
    EXPECT_FAIL("{'w': {'dtype': 'U8', 'shape': [1], 'data_offsets': [0, 1]},"
                " '__metadata__': {'ok': 'yes', 'bad': null}}",
                1, "'bad'", "not a string");
}
END_TEST

/* Every prefix of a valid file must be rejected cleanly (ASan checks the reads). */
START_TEST(hostile_every_truncation)
{
    size_t len;
    uint8_t *full = image("{'__metadata__': {'format': 'pt'},"
                          " 'a': {'dtype': 'BF16', 'shape': [2, 3], 'data_offsets': [0, 12]},"
                          " 'b': {'dtype': 'F32', 'shape': [2], 'data_offsets': [12, 20]}}",
                          20, &len);
    qmix_st_close(open_ok(full, len));
    const char *none[] = {NULL};
    for (size_t n = 0; n < len; n++) {
        uint8_t *prefix = malloc(n ? n : 1);
        ck_assert_ptr_nonnull(prefix);
        memcpy(prefix, full, n);
        expect_fail_image(prefix, n, none);
        free(prefix);
    }
    free(full);
}
END_TEST

/* ---- sharded checkpoints ------------------------------------------------------------------- */

#define SHARD1 "model-00001-of-00002.safetensors"
#define SHARD2 "model-00002-of-00002.safetensors"

static void write_two_shards(const char *dir)
{
    write_file(dir, SHARD1,
               "{'__metadata__': {'format': 'pt'},"
               " 'embed': {'dtype': 'BF16', 'shape': [4, 2], 'data_offsets': [0, 16]},"
               " 'layers.0.w': {'dtype': 'F32', 'shape': [2], 'data_offsets': [16, 24]}}",
               24);
    write_file(dir, SHARD2,
               "{'layers.1.w': {'dtype': 'F16', 'shape': [3], 'data_offsets': [0, 6]},"
               " 'head': {'dtype': 'F32', 'shape': [1], 'data_offsets': [6, 10]}}",
               10);
}

static const char *const good_index =
    "{'metadata': {'total_size': 34},"
    " 'weight_map': {'embed': '" SHARD1 "', 'layers.0.w': '" SHARD1 "',"
    "                'layers.1.w': '" SHARD2 "', 'head': '" SHARD2 "'}}";

START_TEST(sharded_ok)
{
    char *dir = tu_tmpdir();
    write_two_shards(dir);
    write_text(dir, "model.safetensors.index.json", good_index);
    char index[1024], shard1[1024], shard2[1024];
    snprintf(index, sizeof index, "%s/model.safetensors.index.json", dir);
    snprintf(shard1, sizeof shard1, "%s/" SHARD1, dir);
    snprintf(shard2, sizeof shard2, "%s/" SHARD2, dir);
    /* by directory and by index path */
    const char *paths[] = {dir, index};
    for (int p = 0; p < 2; p++) {
        qmix_st_store *st = open_path_ok(paths[p]);
        ck_assert_int_eq(qmix_st_file_count(st), 2);
        ck_assert_uint_eq(qmix_st_count(st), 4);
        const struct { const char *name; const char *file; qmix_dtype dt; uint64_t nbytes; size_t off; } want[] = {
            {"embed", shard1, QMIX_BF16, 16, 0},
            {"layers.0.w", shard1, QMIX_F32, 8, 16},
            {"layers.1.w", shard2, QMIX_F16, 6, 0},
            {"head", shard2, QMIX_F32, 4, 6},
        };
        for (int i = 0; i < 4; i++) {
            const qmix_tensor *t = qmix_st_find(st, want[i].name);
            ck_assert_msg(t != NULL, "%s not found", want[i].name);
            ck_assert_str_eq(qmix_st_file_path(st, t->file), want[i].file);
            ck_assert_int_eq(t->dtype, want[i].dt);
            ck_assert_uint_eq(t->nbytes, want[i].nbytes);
            for (uint64_t b = 0; b < t->nbytes; b++)
                ck_assert_uint_eq(((const uint8_t *)t->data)[b], pattern(want[i].off + b));
        }
        /* metadata is per file */
        const qmix_tensor *e = qmix_st_find(st, "embed"), *h = qmix_st_find(st, "head");
        ck_assert_str_eq(qmix_st_metadata(st, e->file, "format"), "pt");
        ck_assert_ptr_null(qmix_st_metadata(st, h->file, "format"));
        qmix_st_close(st);
    }
    /* the index wins over a model.safetensors beside it */
    write_file(dir, "model.safetensors",
               "{'other': {'dtype': 'U8', 'shape': [1], 'data_offsets': [0, 1]}}", 1);
    qmix_st_store *st = open_path_ok(dir);
    ck_assert_uint_eq(qmix_st_count(st), 4);
    ck_assert_ptr_null(qmix_st_find(st, "other"));
    qmix_st_close(st);
    tu_rmdir(dir);
}
END_TEST

/* Writes index_sq as the directory's index and expects opening the directory to fail. */
static void sharded_case(const char *index_sq, const char *const *needles)
{
    char *dir = tu_tmpdir();
    write_two_shards(dir);
    write_text(dir, "model.safetensors.index.json", index_sq);
    expect_open_fail(dir, needles);
    tu_rmdir(dir);
}

#define SHARDED_FAIL(index, ...)                                                                  \
    do {                                                                                          \
        const char *needles_[] = {__VA_ARGS__, NULL};                                             \
        sharded_case(index, needles_);                                                            \
    } while (0)

START_TEST(sharded_missing_shard)
{
    SHARDED_FAIL("{'weight_map': {'embed': '" SHARD1 "', 'layers.0.w': '" SHARD1 "',"
                 " 'gone': 'model-00003-of-00002.safetensors'}}",
                 "model.safetensors.index.json", "model-00003-of-00002.safetensors", "'gone'",
                 "missing");
}
END_TEST

START_TEST(sharded_tensor_not_in_shard)
{
    SHARDED_FAIL("{'weight_map': {'embed': '" SHARD1 "', 'phantom': '" SHARD2 "'}}",
                 "model.safetensors.index.json", "'phantom'", SHARD2);
    /* the index puts a tensor in the other shard */
    SHARDED_FAIL("{'weight_map': {'embed': '" SHARD2 "', 'layers.0.w': '" SHARD1 "'}}",
                 "'embed'", SHARD1, SHARD2);
}
END_TEST

START_TEST(sharded_tensor_in_two_shards)
{
    char *dir = tu_tmpdir();
    write_two_shards(dir);
    write_file(dir, "model-extra.safetensors",
               "{'embed': {'dtype': 'BF16', 'shape': [4, 2], 'data_offsets': [0, 16]}}", 16);
    write_text(dir, "model.safetensors.index.json",
               "{'weight_map': {'embed': '" SHARD1 "', 'head': '" SHARD2 "',"
               " 'x': 'model-extra.safetensors'}}");
    EXPECT_OPEN_FAIL(dir, "'embed'", SHARD1, "model-extra.safetensors", "twice");
    tu_rmdir(dir);
}
END_TEST

START_TEST(sharded_bad_shard_names)
{
    const char *bad[] = {"../" SHARD1, "sub/" SHARD1, "/etc/passwd", "..", "", "./" SHARD1};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char index[512];
        snprintf(index, sizeof index, "{'weight_map': {'embed': '" SHARD1 "', 'evil': '%s'}}",
                 bad[i]);
        SHARDED_FAIL(index, "model.safetensors.index.json", "'evil'");
    }
    SHARDED_FAIL("{'weight_map': {'embed': 7}}", "'embed'", "not a file name");
    SHARDED_FAIL("{'weight_map': {'embed': null}}", "'embed'", "not a file name");
    /* '.' is the directory itself */
    SHARDED_FAIL("{'weight_map': {'embed': '.'}}", "not a regular file");
}
END_TEST

START_TEST(sharded_bad_index)
{
    SHARDED_FAIL("{'weight_map': {'embed': '" SHARD1 "',}}", "model.safetensors.index.json");
    SHARDED_FAIL("{'weight_map': ", "model.safetensors.index.json");
    SHARDED_FAIL("", "model.safetensors.index.json");
    SHARDED_FAIL("[1, 2]", "model.safetensors.index.json", "weight_map");
    SHARDED_FAIL("{'metadata': {}}", "model.safetensors.index.json", "weight_map");
    SHARDED_FAIL("{'weight_map': ['" SHARD1 "']}", "model.safetensors.index.json", "weight_map");
    SHARDED_FAIL("{'weight_map': {'embed': '" SHARD1 "', 'embed': '" SHARD1 "'}}",
                 "model.safetensors.index.json", "duplicate");
}
END_TEST

START_TEST(sharded_hostile_shard)
{
    char *dir = tu_tmpdir();
    write_two_shards(dir);
    write_file(dir, SHARD2, "{'head': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 4]}}", 3);
    write_text(dir, "model.safetensors.index.json", good_index);
    char shard2[1024];
    snprintf(shard2, sizeof shard2, "%s/" SHARD2, dir);
    EXPECT_OPEN_FAIL(dir, shard2, "'head'");
    tu_rmdir(dir);
}
END_TEST

START_TEST(sharded_empty_weight_map)
{
    char *dir = tu_tmpdir();
    write_text(dir, "model.safetensors.index.json", "{'weight_map': {}}");
    qmix_st_store *st = open_path_ok(dir);
    ck_assert_uint_eq(qmix_st_count(st), 0);
    ck_assert_int_eq(qmix_st_file_count(st), 0);
    ck_assert_ptr_null(qmix_st_find(st, "embed"));
    qmix_st_close(st);
    tu_rmdir(dir);
}
END_TEST

/* ---- scale --------------------------------------------------------------------------------- */

#define BIG_N 200000
#define BIG_EXPERTS 256

static void big_name(char *buf, size_t len, int i)
{
    snprintf(buf, len, "layers.%d.mlp.experts.%d.gate_proj.weight", i / BIG_EXPERTS,
             i % BIG_EXPERTS);
}

/* A growable text buffer for headers too big to write by hand. */
typedef struct sbuf { char *p; size_t n, cap; } sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void sb_printf(sbuf *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int w = vsnprintf(b->p + b->n, b->cap - b->n, fmt, ap);
        va_end(ap);
        ck_assert_int_ge(w, 0);
        if ((size_t)w < b->cap - b->n) {
            b->n += (size_t)w;
            return;
        }
        b->cap = b->cap ? b->cap * 2 : 4096;
        while (b->cap - b->n <= (size_t)w) b->cap *= 2;
        b->p = realloc(b->p, b->cap);
        ck_assert_ptr_nonnull(b->p);
    }
}

/* Opens a header of n one-element tensors (listed in reverse data order, so the overlap check has
 * to sort) and finds every one of them; returns the CPU seconds this process spent on it. */
static double big_header_cpu_seconds(int n)
{
    sbuf h = {0};
    sb_printf(&h, "{\"__metadata__\": {\"format\": \"pt\"}");
    char name[128];
    for (int i = 0; i < n; i++) {
        big_name(name, sizeof name, i);
        uint64_t off = (uint64_t)(n - 1 - i) * 2;
        sb_printf(&h, ", \"%s\": {\"dtype\": \"BF16\", \"shape\": [1], \"data_offsets\": [%llu, %llu]}",
                  name, (unsigned long long)off, (unsigned long long)off + 2);
    }
    sb_printf(&h, "}");
    size_t data_len = (size_t)n * 2, len = 8 + h.n + data_len;
    uint8_t *img = malloc(len);
    ck_assert_ptr_nonnull(img);
    put_len(img, h.n);
    memcpy(img + 8, h.p, h.n);
    memset(img + 8 + h.n, 0x3f, data_len);
    free(h.p);

    double t0 = cpu_s();
    qmix_st_store *st = open_ok(img, len);
    ck_assert_uint_eq(qmix_st_count(st), (unsigned)n);
    const uint8_t *data = img + 8 + (len - 8 - data_len);
    for (int i = 0; i < n; i++) {
        big_name(name, sizeof name, i);
        const qmix_tensor *t = qmix_st_find(st, name);
        ck_assert_msg(t != NULL, "%s not found", name);
        ck_assert_str_eq(t->name, name);
        ck_assert_ptr_eq(t->data, data + (size_t)(n - 1 - i) * 2);
    }
    ck_assert_ptr_null(qmix_st_find(st, "layers.0.mlp.experts.256.gate_proj.weight"));
    double t = cpu_s() - t0;
    qmix_st_close(st);
    free(img);
    return t;
}

/* Linear (or n log n) in the tensor count, judged by how the cost grows from n/10 to n tensors
 * rather than by a wall-clock limit: a loaded machine slows both sizes alike, while quadratic
 * behaviour makes the larger one ~100x dearer. CPU time of this process. */
START_TEST(large_header_linear)
{
    double small = big_header_cpu_seconds(BIG_N / 10), big = big_header_cpu_seconds(BIG_N);
    ck_assert_msg(big < 30 * small + 0.05,
                  "%d tensors cost %.3f s, %d cost %.3f s: %.1fx for 10x the tensors "
                  "(quadratic behaviour?)", BIG_N / 10, small, BIG_N, big, big / small);
}
END_TEST

/* A real index (22,213 tensors in 10 shards) with stand-in shards: every named tensor [1] F32. */
#define REAP_INDEX "testdata/assets/reap-35b-a3b.model.safetensors.index.json"

START_TEST(real_index_reap)
{
    json_error_t jerr;
    json_t *root = json_load_file(REAP_INDEX, 0, &jerr);
    ck_assert_msg(root != NULL, "%s: %s", REAP_INDEX, jerr.text);
    json_t *map = json_object_get(root, "weight_map");
    ck_assert(json_is_object(map));
    size_t n = json_object_size(map);
    ck_assert_uint_eq(n, 22213);

    char *dir = tu_tmpdir();
    char path[1024];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    size_t index_len;
    char *index_text = tu_read(REAP_INDEX, &index_len);
    tu_write(path, index_text, index_len);
    free(index_text);

    /* group names by shard: shard name -> header being built */
    json_t *shards = json_object();
    const char *name;
    json_t *file;
    json_object_foreach(map, name, file) {
        ck_assert(json_is_string(file));
        json_t *hdr = json_object_get(shards, json_string_value(file));
        if (!hdr) {
            hdr = json_object();
            json_object_set_new(shards, json_string_value(file), hdr);
        }
        uint64_t off = 4 * json_object_size(hdr);
        json_t *ent = json_pack("{s:s, s:[i], s:[I, I]}", "dtype", "F32", "shape", 1,
                                "data_offsets", (json_int_t)off, (json_int_t)(off + 4));
        ck_assert_ptr_nonnull(ent);
        json_object_set_new(hdr, name, ent);
    }
    ck_assert_uint_eq(json_object_size(shards), 10);
    const char *shard;
    json_t *hdr;
    json_object_foreach(shards, shard, hdr) {
        char *text = json_dumps(hdr, JSON_COMPACT);
        ck_assert_ptr_nonnull(text);
        size_t hl = strlen(text), dl = 4 * json_object_size(hdr), len = 8 + hl + dl;
        uint8_t *img = calloc(1, len);
        ck_assert_ptr_nonnull(img);
        put_len(img, hl);
        memcpy(img + 8, text, hl);
        free(text);
        snprintf(path, sizeof path, "%s/%s", dir, shard);
        tu_write(path, img, len);
        free(img);
    }

    qmix_st_store *st = open_path_ok(dir);
    ck_assert_uint_eq(qmix_st_count(st), 22213);
    ck_assert_int_eq(qmix_st_file_count(st), 10);
    json_object_foreach(map, name, file) {
        const qmix_tensor *t = qmix_st_find(st, name);
        ck_assert_msg(t != NULL, "%s not found", name);
        const char *p = qmix_st_file_path(st, t->file), *slash = strrchr(p, '/');
        ck_assert_str_eq(slash ? slash + 1 : p, json_string_value(file));
        ck_assert_int_eq(t->dtype, QMIX_F32);
        ck_assert_uint_eq(t->nbytes, 4);
    }
    /* the per-expert layout of this derivative */
    ck_assert_ptr_nonnull(
        qmix_st_find(st, "model.language_model.layers.0.mlp.experts.179.gate_proj.weight"));
    ck_assert_ptr_null(
        qmix_st_find(st, "model.language_model.layers.0.mlp.experts.180.gate_proj.weight"));
    qmix_st_close(st);
    json_decref(shards);
    json_decref(root);
    tu_rmdir(dir);
}
END_TEST

static Suite *safetensors_suite(void)
{
    Suite *s = suite_create("safetensors");
    TCase *tc = tcase_create("valid");
    tcase_add_test(tc, dtype_names);
    tcase_add_test(tc, each_dtype);
    tcase_add_test(tc, lookup_and_enumeration);
    tcase_add_test(tc, zero_size_tensors);
    tcase_add_test(tc, metadata);
    tcase_add_test(tc, padding_and_extra_keys);
    tcase_add_test(tc, files_on_disk);
    suite_add_tcase(s, tc);

    tc = tcase_create("hostile");
    tcase_add_test(tc, hostile_empty_and_short);
    tcase_add_test(tc, hostile_header_length);
    tcase_add_test(tc, hostile_not_json);
    tcase_add_test(tc, hostile_not_object);
    tcase_add_test(tc, hostile_truncated_data);
    tcase_add_test(tc, hostile_offsets);
    tcase_add_test(tc, hostile_overlap);
    tcase_add_test(tc, hostile_size_mismatch);
    tcase_add_test(tc, hostile_dtype);
    tcase_add_test(tc, hostile_shape);
    tcase_add_test(tc, hostile_duplicates);
    tcase_add_test(tc, hostile_metadata);
    tcase_add_test(tc, hostile_every_truncation);
    suite_add_tcase(s, tc);

    tc = tcase_create("sharded");
    tcase_add_test(tc, sharded_ok);
    tcase_add_test(tc, sharded_missing_shard);
    tcase_add_test(tc, sharded_tensor_not_in_shard);
    tcase_add_test(tc, sharded_tensor_in_two_shards);
    tcase_add_test(tc, sharded_bad_shard_names);
    tcase_add_test(tc, sharded_bad_index);
    tcase_add_test(tc, sharded_hostile_shard);
    tcase_add_test(tc, sharded_empty_weight_map);
    suite_add_tcase(s, tc);

    tc = tcase_create("scale");
    tcase_set_timeout(tc, 60); /* the tests assert their own, tighter bounds */
    tcase_add_test(tc, large_header_linear);
    tcase_add_test(tc, real_index_reap);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(safetensors_suite)
