/* qmix synth (run as a subprocess via QMIX_BIN) and the streaming safetensors writer. */
#include <math.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "formats/config.h"
#include "formats/safetensors.h"
#include "formats/safetensors_write.h"
#include "testutil.h"

/* Runs `qmix ARGS` with output discarded; returns the exit status. */
static int run_qmix(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int run_qmix(const char *fmt, ...)
{
    char args[2048], cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(cmd, sizeof cmd, "'%s' %s >/dev/null 2>&1", tu_qmix_bin(), args);
    int st = system(cmd);
    ck_assert_msg(st != -1 && WIFEXITED(st), "could not run: %s", cmd);
    return WEXITSTATUS(st);
}

static char *join(const char *dir, const char *name)
{
    char *p = malloc(strlen(dir) + strlen(name) + 2);
    ck_assert_ptr_nonnull(p);
    sprintf(p, "%s/%s", dir, name);
    return p;
}

static int files_equal(const char *a, const char *b)
{
    size_t na, nb;
    void *da = tu_read(a, &na), *db = tu_read(b, &nb);
    int eq = na == nb && !memcmp(da, db, na);
    free(da);
    free(db);
    return eq;
}

static int file_exists(const char *dir, const char *name)
{
    char *p = join(dir, name);
    struct stat st;
    int ok = !stat(p, &st);
    free(p);
    return ok;
}

static qmix_st_store *open_store(const char *path)
{
    qmix_st_store *s = NULL;
    qmix_err err = {{0}};
    int rc = qmix_st_open(path, &s, &err);
    ck_assert_msg(rc == 0, "qmix_st_open(%s): %s", path, err.msg);
    return s;
}

static const qmix_tensor *expect(const qmix_st_store *s, const char *name, qmix_dtype dtype,
                                 int ndim, int64_t d0, int64_t d1, int64_t d2)
{
    const qmix_tensor *t = qmix_st_find(s, name);
    ck_assert_msg(t != NULL, "tensor %s missing", name);
    ck_assert_msg(t->dtype == dtype, "%s: dtype %d, want %d", name, t->dtype, dtype);
    ck_assert_msg(t->ndim == ndim, "%s: ndim %d, want %d", name, t->ndim, ndim);
    int64_t want[3] = {d0, d1, d2};
    for (int d = 0; d < ndim && d < 3; d++)
        ck_assert_msg(t->shape[d] == want[d], "%s: dim %d is %lld, want %lld", name, d,
                      (long long)t->shape[d], (long long)want[d]);
    return t;
}

#define LM "model.language_model."
/* tiny: D 64, L 4, H 4, KV 2, hd 64, nk 2, nv 4, dk=dv 32, E 8, top-2, F=Fs 32, V 512 */
#define TINY_TENSORS 113

START_TEST(test_deterministic)
{
    char *a = tu_tmpdir(), *b = tu_tmpdir(), *c = tu_tmpdir();
    ck_assert_int_eq(run_qmix("synth --like tiny --seed 7 '%s'", a), 0);
    ck_assert_int_eq(run_qmix("synth --like tiny --seed 7 '%s'", b), 0);
    ck_assert_int_eq(run_qmix("synth --like tiny --seed 8 '%s'", c), 0);
    const char *files[] = {"model.safetensors", "config.json"};
    for (int i = 0; i < 2; i++) {
        char *pa = join(a, files[i]), *pb = join(b, files[i]);
        ck_assert_msg(files_equal(pa, pb), "%s differs between two runs with one seed", files[i]);
        free(pa);
        free(pb);
    }
    ck_assert(!file_exists(a, "model.safetensors.index.json"));
    char *pa = join(a, "model.safetensors"), *pc = join(c, "model.safetensors");
    ck_assert_msg(!files_equal(pa, pc), "seeds 7 and 8 gave the same weights");
    /* Same geometry, so same header and size; only values differ. */
    qmix_st_store *sa = open_store(pa), *sc = open_store(pc);
    const qmix_tensor *ta = qmix_st_find(sa, LM "embed_tokens.weight");
    const qmix_tensor *tc = qmix_st_find(sc, LM "embed_tokens.weight");
    ck_assert(ta && tc && ta->nbytes == tc->nbytes);
    ck_assert(memcmp(ta->data, tc->data, ta->nbytes) != 0);
    qmix_st_close(sa);
    qmix_st_close(sc);
    free(pa);
    free(pc);
    tu_rmdir(a);
    tu_rmdir(b);
    tu_rmdir(c);
}
END_TEST

START_TEST(test_layout_and_config)
{
    char *d = tu_tmpdir();
    ck_assert_int_eq(run_qmix("synth --like tiny --seed 7 '%s'", d), 0);
    qmix_st_store *s = open_store(d);
    ck_assert_int_eq(qmix_st_count(s), TINY_TENSORS);
    ck_assert_int_eq(qmix_st_file_count(s), 1);
    const char *fmt = qmix_st_metadata(s, 0, "format");
    ck_assert_ptr_nonnull(fmt);
    ck_assert_str_eq(fmt, "pt");
    expect(s, LM "embed_tokens.weight", QMIX_BF16, 2, 512, 64, 0);
    expect(s, "lm_head.weight", QMIX_BF16, 2, 512, 64, 0);
    expect(s, LM "norm.weight", QMIX_BF16, 1, 64, 0, 0);
    expect(s, LM "layers.0.linear_attn.in_proj_qkv.weight", QMIX_BF16, 2, 256, 64, 0);
    expect(s, LM "layers.0.linear_attn.in_proj_z.weight", QMIX_BF16, 2, 128, 64, 0);
    expect(s, LM "layers.0.linear_attn.conv1d.weight", QMIX_BF16, 3, 256, 1, 4);
    expect(s, LM "layers.0.linear_attn.A_log", QMIX_BF16, 1, 4, 0, 0);
    expect(s, LM "layers.0.linear_attn.norm.weight", QMIX_BF16, 1, 32, 0, 0);
    expect(s, LM "layers.0.linear_attn.out_proj.weight", QMIX_BF16, 2, 64, 128, 0);
    expect(s, LM "layers.3.self_attn.q_proj.weight", QMIX_BF16, 2, 512, 64, 0);
    expect(s, LM "layers.3.self_attn.k_proj.weight", QMIX_BF16, 2, 128, 64, 0);
    expect(s, LM "layers.3.self_attn.o_proj.weight", QMIX_BF16, 2, 64, 256, 0);
    expect(s, LM "layers.3.self_attn.q_norm.weight", QMIX_BF16, 1, 64, 0, 0);
    expect(s, LM "layers.1.mlp.gate.weight", QMIX_BF16, 2, 8, 64, 0);
    expect(s, LM "layers.1.mlp.experts.gate_up_proj", QMIX_BF16, 3, 8, 64, 64);
    expect(s, LM "layers.1.mlp.experts.down_proj", QMIX_BF16, 3, 8, 64, 32);
    expect(s, LM "layers.1.mlp.shared_expert_gate.weight", QMIX_BF16, 2, 1, 64, 0);
    expect(s, "mtp.fc.weight", QMIX_BF16, 2, 64, 128, 0);
    expect(s, "mtp.layers.0.mlp.experts.7.down_proj.weight", QMIX_BF16, 2, 64, 32, 0);
    expect(s, "mtp.layers.0.self_attn.q_proj.weight", QMIX_BF16, 2, 512, 64, 0);
    ck_assert_ptr_null(qmix_st_find(s, LM "layers.3.linear_attn.in_proj_qkv.weight"));
    ck_assert_ptr_null(qmix_st_find(s, LM "layers.0.mlp.experts.0.down_proj.weight"));

    /* Values are finite, centred, of the intended scale: embed std ~1, linear 1/sqrt(in). */
    const qmix_tensor *e = qmix_st_find(s, LM "embed_tokens.weight");
    const uint8_t *p = e->data;
    double sum = 0, sq = 0;
    size_t n = e->nbytes / 2;
    for (size_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)(p[2 * i] | p[2 * i + 1] << 8) << 16;
        float v;
        memcpy(&v, &u, 4);
        ck_assert(v == v && v > -10 && v < 10);
        sum += v;
        sq += (double)v * v;
    }
    double mean = sum / (double)n, sd = sqrt(sq / (double)n - mean * mean);
    ck_assert_msg(mean > -0.05 && mean < 0.05 && sd > 0.9 && sd < 1.1, "embed mean %g sd %g",
                  mean, sd);
    qmix_st_close(s);

    qmix_config cfg;
    qmix_err err = {{0}};
    char *cp = join(d, "config.json");
    ck_assert_msg(qmix_config_load(cp, &cfg, &err) == 0, "%s", err.msg);
    ck_assert_int_eq(cfg.hidden_size, 64);
    ck_assert_int_eq(cfg.n_layers, 4);
    ck_assert_int_eq(cfg.vocab_size, 512);
    ck_assert_int_eq(cfg.n_heads, 4);
    ck_assert_int_eq(cfg.n_kv_heads, 2);
    ck_assert_int_eq(cfg.head_dim, 64);
    ck_assert_int_eq(cfg.rot_dim, 16);
    ck_assert_int_eq(cfg.lin_n_k_heads, 2);
    ck_assert_int_eq(cfg.lin_n_v_heads, 4);
    ck_assert_int_eq(cfg.n_experts, 8);
    ck_assert_int_eq(cfg.n_experts_used, 2);
    ck_assert_int_eq(cfg.moe_ffn, 32);
    ck_assert_int_eq(cfg.shared_ffn, 32);
    ck_assert_int_eq(cfg.mtp_layers, 1);
    ck_assert_int_eq(cfg.tie_embeddings, 0);
    ck_assert(!cfg.layer_is_full[0] && !cfg.layer_is_full[2] && cfg.layer_is_full[3]);
    /* The released multimodal form: text settings nested, real architecture name. */
    char *text = tu_read(cp, NULL);
    ck_assert_ptr_nonnull(strstr(text, "\"Qwen3_5MoeForConditionalGeneration\""));
    ck_assert_ptr_nonnull(strstr(text, "\"text_config\""));
    ck_assert_ptr_nonnull(strstr(text, "\"qwen3_5_moe_text\""));
    ck_assert_ptr_nonnull(strstr(text, "\"mrope_section\""));
    free(text);
    free(cp);
    tu_rmdir(d);
}
END_TEST

/* Per-expert tensors are slices of the fused ones (same seed, same model). */
START_TEST(test_per_expert)
{
    char *f = tu_tmpdir(), *pe = tu_tmpdir();
    ck_assert_int_eq(run_qmix("synth --like tiny --seed 3 '%s'", f), 0);
    ck_assert_int_eq(run_qmix("synth --like tiny --seed 3 --expert-layout per-expert '%s'", pe),
                     0);
    qmix_st_store *sf = open_store(f), *sp = open_store(pe);
    ck_assert_int_eq(qmix_st_count(sp), TINY_TENSORS - 4 * 2 + 4 * 8 * 3);
    const qmix_tensor *gu = expect(sf, LM "layers.2.mlp.experts.gate_up_proj", QMIX_BF16, 3, 8,
                                   64, 64);
    const qmix_tensor *dn = expect(sf, LM "layers.2.mlp.experts.down_proj", QMIX_BF16, 3, 8, 64,
                                   32);
    ck_assert_ptr_null(qmix_st_find(sp, LM "layers.2.mlp.experts.gate_up_proj"));
    const qmix_tensor *g3 = expect(sp, LM "layers.2.mlp.experts.3.gate_proj.weight", QMIX_BF16, 2,
                                   32, 64, 0);
    const qmix_tensor *u3 = expect(sp, LM "layers.2.mlp.experts.3.up_proj.weight", QMIX_BF16, 2,
                                   32, 64, 0);
    const qmix_tensor *d3 = expect(sp, LM "layers.2.mlp.experts.3.down_proj.weight", QMIX_BF16, 2,
                                   64, 32, 0);
    const uint8_t *gub = gu->data, *dnb = dn->data;
    size_t ex_gu = 2 * 32 * 64 * 2, half = 32 * 64 * 2, ex_dn = 64 * 32 * 2;
    ck_assert(!memcmp(g3->data, gub + 3 * ex_gu, half));
    ck_assert(!memcmp(u3->data, gub + 3 * ex_gu + half, half));
    ck_assert(!memcmp(d3->data, dnb + 3 * ex_dn, ex_dn));
    /* Everything else is identical. */
    const qmix_tensor *a = qmix_st_find(sf, LM "layers.3.self_attn.q_proj.weight");
    const qmix_tensor *b = qmix_st_find(sp, LM "layers.3.self_attn.q_proj.weight");
    ck_assert(a && b && a->nbytes == b->nbytes && !memcmp(a->data, b->data, a->nbytes));
    qmix_st_close(sf);
    qmix_st_close(sp);
    tu_rmdir(f);
    tu_rmdir(pe);
}
END_TEST

START_TEST(test_sharded)
{
    char *one = tu_tmpdir(), *sh = tu_tmpdir();
    ck_assert_int_eq(run_qmix("synth --like tiny --seed 5 '%s'", one), 0);
    ck_assert_int_eq(run_qmix("synth --like tiny --seed 5 --shard-size 100K '%s'", sh), 0);
    ck_assert(file_exists(sh, "model.safetensors.index.json"));
    ck_assert(!file_exists(sh, "model.safetensors"));
    qmix_st_store *s1 = open_store(one), *ss = open_store(sh);
    int nf = qmix_st_file_count(ss);
    ck_assert_int_gt(nf, 2);
    ck_assert_uint_eq(qmix_st_count(ss), qmix_st_count(s1));
    for (uint64_t i = 0; i < qmix_st_count(s1); i++) {
        const qmix_tensor *t = qmix_st_at(s1, i);
        const qmix_tensor *u = qmix_st_find(ss, t->name);
        ck_assert_msg(u != NULL, "%s missing from the sharded checkpoint", t->name);
        ck_assert(u->nbytes == t->nbytes && !memcmp(u->data, t->data, t->nbytes));
    }
    /* Shards are named like the releases and none exceeds the limit unless it is a single
     * tensor too big for any shard. */
    for (int f = 0; f < nf; f++) {
        const char *path = qmix_st_file_path(ss, f);
        char want[64];
        snprintf(want, sizeof want, "model-%05d-of-%05d.safetensors", f + 1, nf);
        ck_assert_msg(strstr(path, "model-") && strstr(path, ".safetensors"), "%s", path);
        struct stat st;
        ck_assert_int_eq(stat(path, &st), 0);
        int n_in = 0;
        for (uint64_t i = 0; i < qmix_st_count(ss); i++) n_in += qmix_st_at(ss, i)->file == f;
        ck_assert_int_gt(n_in, 0);
        if (n_in > 1) ck_assert_int_le(st.st_size, 100 * 1024);
        ck_assert(file_exists(sh, want));
    }
    qmix_st_close(s1);
    qmix_st_close(ss);
    char *ip = join(sh, "model.safetensors.index.json");
    char *idx = tu_read(ip, NULL);
    ck_assert_ptr_nonnull(strstr(idx, "\"total_size\""));
    ck_assert_ptr_nonnull(strstr(idx, "\"total_parameters\": 588344"));
    ck_assert_ptr_nonnull(strstr(idx, "\"weight_map\""));
    free(idx);
    free(ip);
    tu_rmdir(one);
    tu_rmdir(sh);
}
END_TEST

START_TEST(test_overrides)
{
    char *d = tu_tmpdir();
    ck_assert_int_eq(run_qmix("synth --like tiny --layers 6 --experts 1 --dtype f16 --no-mtp "
                              "'%s'",
                              d),
                     0);
    qmix_config cfg;
    qmix_err err = {{0}};
    char *cp = join(d, "config.json");
    ck_assert_msg(qmix_config_load(cp, &cfg, &err) == 0, "%s", err.msg);
    ck_assert_int_eq(cfg.n_layers, 6);
    ck_assert_int_eq(cfg.n_experts, 1);
    ck_assert_int_eq(cfg.n_experts_used, 1);
    ck_assert_int_eq(cfg.mtp_layers, 0);
    ck_assert(cfg.layer_is_full[3] && !cfg.layer_is_full[4] && !cfg.layer_is_full[5]);
    qmix_st_store *s = open_store(d);
    expect(s, LM "layers.5.linear_attn.in_proj_qkv.weight", QMIX_F16, 2, 256, 64, 0);
    expect(s, LM "layers.5.mlp.experts.gate_up_proj", QMIX_F16, 3, 1, 64, 64);
    for (uint64_t i = 0; i < qmix_st_count(s); i++)
        ck_assert_msg(strncmp(qmix_st_at(s, i)->name, "mtp.", 4), "%s with --no-mtp",
                      qmix_st_at(s, i)->name);
    qmix_st_close(s);
    free(cp);

    /* A non-empty directory is refused, unless --force, which replaces the checkpoint. */
    ck_assert_int_ne(run_qmix("synth --like tiny '%s'", d), 0);
    ck_assert_int_eq(run_qmix("synth --like tiny --dtype f32 --force '%s'", d), 0);
    s = open_store(d);
    expect(s, LM "embed_tokens.weight", QMIX_F32, 2, 512, 64, 0);
    ck_assert_int_eq(qmix_st_count(s), TINY_TENSORS);
    qmix_st_close(s);
    tu_rmdir(d);
}
END_TEST

START_TEST(test_bad_usage)
{
    char *d = tu_tmpdir();
    ck_assert_int_eq(run_qmix("synth --help"), 0);
    ck_assert_int_eq(run_qmix("synth --like tiny --bogus '%s'", d), 2);
    ck_assert_int_eq(run_qmix("synth --like huge '%s'", d), 2);
    ck_assert_int_eq(run_qmix("synth '%s'", d), 2);
    ck_assert_int_eq(run_qmix("synth --like tiny"), 2);
    ck_assert_int_eq(run_qmix("synth --like tiny --dtype q4 '%s'", d), 2);
    ck_assert_int_eq(run_qmix("synth --like tiny --layers 0 '%s'", d), 2);
    ck_assert_int_eq(run_qmix("synth --like tiny --layers 3x '%s'", d), 2);
    ck_assert_int_eq(run_qmix("synth --like tiny --experts -1 '%s'", d), 2);
    ck_assert_int_eq(run_qmix("synth --like tiny --seed -4 '%s'", d), 2);
    ck_assert_int_eq(run_qmix("synth --like tiny --shard-size 0 '%s'", d), 2);
    ck_assert_int_eq(run_qmix("synth --like tiny --shard-size 4X '%s'", d), 2);
    ck_assert_int_eq(run_qmix("synth --like tiny --expert-layout both '%s'", d), 2);
    ck_assert_int_eq(run_qmix("synth --like tiny '%s' '%s'", d, d), 2);
    ck_assert_int_eq(run_qmix("synth --like tiny --layers"), 2);
    /* Nothing was written by any of those. */
    ck_assert(!file_exists(d, "config.json"));
    /* An unwritable destination is an I/O error, 1. */
    ck_assert_int_eq(run_qmix("synth --like tiny /dev/null/sub"), 1);
    tu_rmdir(d);
}
END_TEST

/* ---- writer unit tests ------------------------------------------------------------------ */

static qmix_stw_tensor spec(const char *name, qmix_dtype dt, int ndim, int64_t d0, int64_t d1)
{
    qmix_stw_tensor t;
    memset(&t, 0, sizeof t);
    t.name = name;
    t.dtype = dt;
    t.ndim = ndim;
    t.shape[0] = d0;
    t.shape[1] = d1;
    return t;
}

START_TEST(test_writer_roundtrip)
{
    char *d = tu_tmpdir();
    char *path = join(d, "w.safetensors");
    /* Awkward names (quotes, backslash, control character, UTF-8) exercise the JSON escaping;
     * odd sizes make the unpadded header length odd. */
    qmix_stw_tensor t[4] = {
        spec("a\"quoted\"\\name", QMIX_F32, 2, 3, 5),
        spec("tab\there", QMIX_U8, 1, 7, 0),
        spec("caf\xc3\xa9.weight", QMIX_BF16, 1, 3, 0),
        spec("scalar", QMIX_I64, 0, 0, 0),
    };
    qmix_stw_kv meta[2] = {{"format", "pt"}, {"note", "line\nwith \"quotes\" and \\"}};
    qmix_err err = {{0}};
    qmix_stw *w;
    ck_assert_msg(qmix_stw_open(path, t, 4, meta, 2, &w, &err) == 0, "%s", err.msg);
    float f[15];
    for (int i = 0; i < 15; i++) f[i] = (float)i * 0.5f - 3;
    ck_assert_int_eq(qmix_stw_begin(w, t[0].name, &err), 0);
    /* Chunks of any size, including empty ones. */
    ck_assert_int_eq(qmix_stw_write(w, f, 7, &err), 0);
    ck_assert_int_eq(qmix_stw_write(w, (char *)f + 7, 0, &err), 0);
    ck_assert_int_eq(qmix_stw_write(w, (char *)f + 7, sizeof f - 7, &err), 0);
    ck_assert_int_eq(qmix_stw_begin(w, t[1].name, &err), 0);
    ck_assert_int_eq(qmix_stw_write(w, "abcdefg", 7, &err), 0);
    ck_assert_int_eq(qmix_stw_begin(w, t[2].name, &err), 0);
    ck_assert_int_eq(qmix_stw_write(w, "\x80\x3f\x00\x40\x40\x40", 6, &err), 0);
    ck_assert_int_eq(qmix_stw_begin(w, t[3].name, &err), 0);
    int64_t sc = -42;
    ck_assert_int_eq(qmix_stw_write(w, &sc, 8, &err), 0);
    uint64_t written = qmix_stw_bytes_written(w);
    ck_assert_msg(qmix_stw_close(w, &err) == 0, "%s", err.msg);

    size_t size;
    uint8_t *raw = tu_read(path, &size);
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++) hlen |= (uint64_t)raw[i] << (8 * i);
    ck_assert_uint_eq(hlen % 8, 0);
    ck_assert_uint_eq(size, 8 + hlen + sizeof f + 7 + 6 + 8);
    ck_assert_uint_eq(written, size);
    ck_assert(raw[8] == '{');
    uint64_t predicted;
    ck_assert_int_eq(qmix_stw_file_size(t, 4, meta, 2, &predicted, &err), 0);
    ck_assert_uint_eq(predicted, size);
    free(raw);

    qmix_st_store *s = open_store(path);
    ck_assert_int_eq(qmix_st_count(s), 4);
    ck_assert_str_eq(qmix_st_metadata(s, 0, "format"), "pt");
    ck_assert_str_eq(qmix_st_metadata(s, 0, "note"), "line\nwith \"quotes\" and \\");
    ck_assert_ptr_null(qmix_st_metadata(s, 0, "absent"));
    const qmix_tensor *a = expect(s, t[0].name, QMIX_F32, 2, 3, 5, 0);
    ck_assert(a->nbytes == sizeof f && !memcmp(a->data, f, sizeof f));
    const qmix_tensor *b = expect(s, "tab\there", QMIX_U8, 1, 7, 0, 0);
    ck_assert(!memcmp(b->data, "abcdefg", 7));
    expect(s, "caf\xc3\xa9.weight", QMIX_BF16, 1, 3, 0, 0);
    const qmix_tensor *c = expect(s, "scalar", QMIX_I64, 0, 0, 0, 0);
    ck_assert(c->nbytes == 8 && !memcmp(c->data, &sc, 8));
    qmix_st_close(s);
    free(path);
    tu_rmdir(d);
}
END_TEST

START_TEST(test_writer_size_mismatch)
{
    char *d = tu_tmpdir();
    char *path = join(d, "bad.safetensors");
    qmix_stw_tensor t[2] = {spec("x", QMIX_F32, 1, 4, 0), spec("y", QMIX_F16, 2, 2, 2)};
    qmix_err err = {{0}};
    qmix_stw *w;
    char zero[64] = {0};

    /* Too few bytes, noticed when the next tensor starts. */
    ck_assert_int_eq(qmix_stw_open(path, t, 2, NULL, 0, &w, &err), 0);
    ck_assert_int_eq(qmix_stw_begin(w, "x", &err), 0);
    ck_assert_int_eq(qmix_stw_write(w, zero, 12, &err), 0);
    ck_assert_int_eq(qmix_stw_begin(w, "y", &err), -1);
    ck_assert_msg(strstr(err.msg, "x") && strstr(err.msg, "12") && strstr(err.msg, "16") &&
                      strstr(err.msg, path),
                  "%s", err.msg);
    qmix_stw_discard(w);
    ck_assert(!file_exists(d, "bad.safetensors"));

    /* Too many bytes. */
    ck_assert_int_eq(qmix_stw_open(path, t, 2, NULL, 0, &w, &err), 0);
    ck_assert_int_eq(qmix_stw_begin(w, "x", &err), 0);
    ck_assert_int_eq(qmix_stw_write(w, zero, 10, &err), 0);
    ck_assert_int_eq(qmix_stw_write(w, zero, 7, &err), -1);
    ck_assert_msg(strstr(err.msg, "exceed"), "%s", err.msg);
    qmix_stw_discard(w);

    /* Out of order, and data before begin. */
    ck_assert_int_eq(qmix_stw_open(path, t, 2, NULL, 0, &w, &err), 0);
    ck_assert_int_eq(qmix_stw_write(w, zero, 4, &err), -1);
    ck_assert_int_eq(qmix_stw_begin(w, "y", &err), -1);
    ck_assert_msg(strstr(err.msg, "y") && strstr(err.msg, "x"), "%s", err.msg);
    qmix_stw_discard(w);

    /* Closing early fails and removes the file. */
    ck_assert_int_eq(qmix_stw_open(path, t, 2, NULL, 0, &w, &err), 0);
    ck_assert_int_eq(qmix_stw_begin(w, "x", &err), 0);
    ck_assert_int_eq(qmix_stw_write(w, zero, 16, &err), 0);
    ck_assert_int_eq(qmix_stw_close(w, &err), -1);
    ck_assert_msg(strstr(err.msg, "1 of 2"), "%s", err.msg);
    ck_assert(!file_exists(d, "bad.safetensors"));

    /* Last tensor short. */
    ck_assert_int_eq(qmix_stw_open(path, t, 2, NULL, 0, &w, &err), 0);
    ck_assert_int_eq(qmix_stw_begin(w, "x", &err), 0);
    ck_assert_int_eq(qmix_stw_write(w, zero, 16, &err), 0);
    ck_assert_int_eq(qmix_stw_begin(w, "y", &err), 0);
    ck_assert_int_eq(qmix_stw_write(w, zero, 7, &err), 0);
    ck_assert_int_eq(qmix_stw_close(w, &err), -1);
    ck_assert_msg(strstr(err.msg, "y") && strstr(err.msg, "7"), "%s", err.msg);

    /* Bad declarations never create the file. */
    qmix_stw_tensor dup[2] = {spec("x", QMIX_F32, 1, 4, 0), spec("x", QMIX_F32, 1, 4, 0)};
    ck_assert_int_eq(qmix_stw_open(path, dup, 2, NULL, 0, &w, &err), -1);
    ck_assert_msg(strstr(err.msg, "twice"), "%s", err.msg);
    qmix_stw_tensor neg = spec("n", QMIX_F32, 1, -1, 0);
    ck_assert_int_eq(qmix_stw_open(path, &neg, 1, NULL, 0, &w, &err), -1);
    qmix_stw_tensor unk = spec("u", QMIX_DTYPE_UNKNOWN, 1, 1, 0);
    ck_assert_int_eq(qmix_stw_open(path, &unk, 1, NULL, 0, &w, &err), -1);
    qmix_stw_tensor res = spec("__metadata__", QMIX_F32, 1, 1, 0);
    ck_assert_int_eq(qmix_stw_open(path, &res, 1, NULL, 0, &w, &err), -1);
    ck_assert(!file_exists(d, "bad.safetensors"));
    free(path);
    tu_rmdir(d);
}
END_TEST

START_TEST(test_writer_enospc)
{
    if (access("/dev/full", W_OK)) return; /* not on this system */
    qmix_stw_tensor t = spec("x", QMIX_U8, 1, 8 << 20, 0);
    qmix_err err = {{0}};
    qmix_stw *w;
    ck_assert_int_eq(qmix_stw_open("/dev/full", &t, 1, NULL, 0, &w, &err), 0);
    ck_assert_int_eq(qmix_stw_begin(w, "x", &err), 0);
    char *buf = calloc(1, 8 << 20);
    int rc = qmix_stw_write(w, buf, 8 << 20, &err);
    if (!rc) rc = qmix_stw_close(w, &err);
    else qmix_stw_discard(w);
    free(buf);
    ck_assert_int_eq(rc, -1);
    ck_assert_msg(strstr(err.msg, "/dev/full") && strstr(err.msg, "No space"), "%s", err.msg);
    struct stat st;
    ck_assert_int_eq(stat("/dev/full", &st), 0); /* a device is never removed */
}
END_TEST

START_TEST(test_index_writer)
{
    char *d = tu_tmpdir();
    qmix_err err = {{0}};
    qmix_stw_tensor a = spec("layer.b", QMIX_F32, 1, 2, 0), b = spec("layer.a", QMIX_F32, 1, 3, 0);
    float v[3] = {1, 2, 3};
    const char *files[2] = {"model-00001-of-00002.safetensors",
                            "model-00002-of-00002.safetensors"};
    const qmix_stw_tensor *ts[2] = {&a, &b};
    for (int i = 0; i < 2; i++) {
        char *p = join(d, files[i]);
        qmix_stw *w;
        ck_assert_int_eq(qmix_stw_open(p, ts[i], 1, NULL, 0, &w, &err), 0);
        ck_assert_int_eq(qmix_stw_begin(w, ts[i]->name, &err), 0);
        ck_assert_int_eq(qmix_stw_write(w, v, (size_t)ts[i]->shape[0] * 4, &err), 0);
        ck_assert_int_eq(qmix_stw_close(w, &err), 0);
        free(p);
    }
    const char *names[2] = {"layer.b", "layer.a"};
    char *ip = join(d, "model.safetensors.index.json");
    ck_assert_msg(qmix_st_write_index(ip, 20, 5, names, files, 2, &err) == 0, "%s", err.msg);
    char *text = tu_read(ip, NULL);
    /* Sorted keys, as in the released indexes. */
    ck_assert(strstr(text, "\"layer.a\"") < strstr(text, "\"layer.b\""));
    ck_assert_ptr_nonnull(strstr(text, "\"total_size\": 20"));
    ck_assert_ptr_nonnull(strstr(text, "\"total_parameters\": 5"));
    free(text);
    qmix_st_store *s = open_store(d);
    ck_assert_int_eq(qmix_st_file_count(s), 2);
    const qmix_tensor *t = expect(s, "layer.a", QMIX_F32, 1, 3, 0, 0);
    ck_assert(!memcmp(t->data, v, 12));
    qmix_st_close(s);
    const char *dup[2] = {"layer.a", "layer.a"};
    ck_assert_int_eq(qmix_st_write_index(ip, 20, 5, dup, files, 2, &err), -1);
    ck_assert_msg(strstr(err.msg, "twice"), "%s", err.msg);
    free(ip);
    tu_rmdir(d);
}
END_TEST

static Suite *synth_suite(void)
{
    Suite *s = suite_create("synth");
    TCase *cli = tcase_create("cli");
    tcase_set_timeout(cli, 60);
    tcase_add_test(cli, test_deterministic);
    tcase_add_test(cli, test_layout_and_config);
    tcase_add_test(cli, test_per_expert);
    tcase_add_test(cli, test_sharded);
    tcase_add_test(cli, test_overrides);
    tcase_add_test(cli, test_bad_usage);
    suite_add_tcase(s, cli);
    TCase *wr = tcase_create("writer");
    tcase_add_test(wr, test_writer_roundtrip);
    tcase_add_test(wr, test_writer_size_mismatch);
    tcase_add_test(wr, test_writer_enospc);
    tcase_add_test(wr, test_index_writer);
    suite_add_tcase(s, wr);
    return s;
}

TU_MAIN(synth_suite)
