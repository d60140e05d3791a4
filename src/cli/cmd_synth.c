/* qmix synth: a random checkpoint with the real Qwen3.5-MoE HF text layout and geometry, for
 * benchmarks and loader tests when the real weights are too big or unavailable.
 *
 * Values come from a counter-based generator (splitmix64 applied to key + index·γ), so element
 * i of a tensor depends only on (seed, tensor, i): output is independent of chunking and of the
 * expert layout — the per-expert tensors are exact slices of the fused ones, so both layouts
 * describe the same model. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "cli/commands.h"
#include "formats/safetensors.h"
#include "formats/safetensors_write.h"
#include "model/geometry.h"
#include "util/err.h"
#include "util/fileio.h"

/* ---- options ---------------------------------------------------------------------------- */

typedef struct opts {
    qmix_geometry g;
    uint64_t seed;
    qmix_dtype dtype;
    int per_expert;
    uint64_t shard_size;
    int mtp;
    int force;
    int quiet;
    const char *out_dir;
} opts;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: qmix synth --like 35b-a3b|122b-a10b|397b-a17b|tiny [options] OUT_DIR\n"
            "\n"
            "Writes a random checkpoint in the real Hugging Face Qwen3.5-MoE text layout:\n"
            "config.json, model.safetensors or model-0000K-of-0000N.safetensors shards plus\n"
            "model.safetensors.index.json. The same seed always gives the same bytes.\n"
            "\n"
            "options:\n"
            "  --like NAME             geometry to copy (required)\n"
            "  --layers N              number of decoder layers (default: the model's); layer\n"
            "                          types always follow the 3 linear : 1 full pattern\n"
            "  --experts E             routed experts per layer (top-k is clamped to E)\n"
            "  --seed S                random seed, an unsigned integer (default 0)\n"
            "  --dtype bf16|f16|f32    storage type of every tensor (default bf16)\n"
            "  --expert-layout fused|per-expert\n"
            "                          trunk experts as fused 3-D gate_up_proj/down_proj like the\n"
            "                          releases (default), or one tensor per expert and projection;\n"
            "                          both hold the same values\n"
            "  --shard-size SIZE       largest shard file, bytes with optional K/M/G/T suffix\n"
            "                          (binary, e.g. 4G = 4 GiB; default 4G); a tensor is never split\n"
            "  --no-mtp                leave out the MTP block (mtp_num_hidden_layers 0)\n"
            "  --force                 write into a non-empty OUT_DIR, removing an earlier\n"
            "                          checkpoint's config.json and model*.safetensors* first\n"
            "  --quiet                 no progress or summary output\n"
            "  -h, --help              this help\n"
            "\n"
            "exit status: 0 success, 1 I/O error or non-empty OUT_DIR, 2 bad usage\n");
}

static int bad_usage(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int bad_usage(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("qmix synth: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\n(qmix synth --help for usage)\n", stderr);
    return 2;
}

static int parse_i64(const char *s, long long lo, long long hi, long long *out)
{
    if (!s || !*s) return -1;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

static int parse_u64(const char *s, uint64_t *out)
{
    if (!s || !*s || *s == '-' || *s == '+') return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end) return -1;
    *out = v;
    return 0;
}

/* "4G", "4GB", "4GiB", "512m", "65536": binary multiples, because that is what people mean
 * when they size shards against RAM and page sizes. */
static int parse_size(const char *s, uint64_t *out)
{
    if (!s || *s < '0' || *s > '9') return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno) return -1;
    int shift = 0;
    switch (*end) {
    case 'k': case 'K': shift = 10; end++; break;
    case 'm': case 'M': shift = 20; end++; break;
    case 'g': case 'G': shift = 30; end++; break;
    case 't': case 'T': shift = 40; end++; break;
    default: break;
    }
    if (shift && (!strcmp(end, "iB") || !strcmp(end, "ib"))) end += 2;
    else if (!strcmp(end, "B") || !strcmp(end, "b")) end++;
    if (*end || v == 0 || v > (UINT64_MAX >> shift)) return -1;
    *out = (uint64_t)v << shift;
    return 0;
}

/* Returns 0 to go on, or the exit code (0 for --help is signalled by *done). */
static int parse_args(int argc, char **argv, opts *o, int *done)
{
    *done = 0;
    memset(o, 0, sizeof *o);
    o->dtype = QMIX_BF16;
    o->shard_size = (uint64_t)4 << 30;
    o->mtp = 1;
    const char *like = NULL;
    long long layers = -1, experts = -1;
    int only_positional = 0;
    for (int i = 1; i < argc; i++) {
        char *a = argv[i];
        if (only_positional || a[0] != '-' || !a[1]) {
            if (o->out_dir) return bad_usage("more than one OUT_DIR ('%s' and '%s')", o->out_dir, a);
            o->out_dir = a;
            continue;
        }
        if (!strcmp(a, "--")) {
            only_positional = 1;
            continue;
        }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            *done = 1;
            return 0;
        }
        if (!strcmp(a, "--no-mtp")) { o->mtp = 0; continue; }
        if (!strcmp(a, "--force")) { o->force = 1; continue; }
        if (!strcmp(a, "--quiet") || !strcmp(a, "-q")) { o->quiet = 1; continue; }

        /* Flags with a value: "--flag VALUE" or "--flag=VALUE". */
        static const char *const valued[] = {"--like", "--layers", "--experts", "--seed",
                                             "--dtype", "--expert-layout", "--shard-size"};
        const char *flag = NULL, *val = NULL;
        for (size_t k = 0; k < sizeof valued / sizeof valued[0]; k++) {
            size_t n = strlen(valued[k]);
            if (!strncmp(a, valued[k], n) && (a[n] == '\0' || a[n] == '=')) {
                flag = valued[k];
                if (a[n] == '=') val = a + n + 1;
                else if (i + 1 < argc) val = argv[++i];
                else return bad_usage("%s needs a value", flag);
                break;
            }
        }
        if (!flag) return bad_usage("unknown option '%s'", a);
        if (!strcmp(flag, "--like")) {
            like = val;
        } else if (!strcmp(flag, "--layers")) {
            if (parse_i64(val, 1, QMIX_MAX_LAYERS, &layers))
                return bad_usage("--layers wants an integer in 1..%d, not '%s'", QMIX_MAX_LAYERS,
                                 val);
        } else if (!strcmp(flag, "--experts")) {
            if (parse_i64(val, 1, 65536, &experts))
                return bad_usage("--experts wants an integer in 1..65536, not '%s'", val);
        } else if (!strcmp(flag, "--seed")) {
            if (parse_u64(val, &o->seed))
                return bad_usage("--seed wants an unsigned 64-bit integer, not '%s'", val);
        } else if (!strcmp(flag, "--dtype")) {
            if (!strcmp(val, "bf16")) o->dtype = QMIX_BF16;
            else if (!strcmp(val, "f16")) o->dtype = QMIX_F16;
            else if (!strcmp(val, "f32")) o->dtype = QMIX_F32;
            else return bad_usage("--dtype wants bf16, f16 or f32, not '%s'", val);
        } else if (!strcmp(flag, "--expert-layout")) {
            if (!strcmp(val, "fused")) o->per_expert = 0;
            else if (!strcmp(val, "per-expert")) o->per_expert = 1;
            else return bad_usage("--expert-layout wants fused or per-expert, not '%s'", val);
        } else if (!strcmp(flag, "--shard-size")) {
            if (parse_size(val, &o->shard_size))
                return bad_usage("--shard-size wants a positive size like 4G, 500M or 65536, "
                                 "not '%s'",
                                 val);
        }
    }
    if (!like) return bad_usage("--like is required (35b-a3b, 122b-a10b, 397b-a17b or tiny)");
    const qmix_geometry *g = qmix_geometry_find(like);
    if (!g) return bad_usage("--like wants 35b-a3b, 122b-a10b, 397b-a17b or tiny, not '%s'", like);
    if (!o->out_dir || !*o->out_dir) return bad_usage("missing OUT_DIR");
    o->g = *g;
    if (layers > 0) o->g.L = (int)layers;
    if (experts > 0) o->g.E = (int)experts;
    if (o->g.topk > o->g.E) o->g.topk = o->g.E;
    return 0;
}

/* ---- the tensor plan -------------------------------------------------------------------- */

typedef enum { DIST_NORMAL, DIST_LOG_UNIFORM } dist_kind;

typedef struct ptensor {
    char *name;
    int ndim;
    int64_t shape[4];
    dist_kind dist;
    double a, b;         /* normal: mean, std; log-uniform: log(uniform(a, b)) */
    uint64_t key;        /* generator stream */
    uint64_t base;       /* index of element 0 within its stream */
    uint64_t count, nbytes;
    int shard;
} ptensor;

typedef struct plan {
    ptensor *t;
    size_t n, cap;
    int n_shards;
    uint64_t total_bytes;   /* tensor data, as the index's total_size */
    uint64_t total_params;
    uint64_t file_bytes;    /* everything written, headers included */
    size_t n_oversized;
} plan;

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t stream_key(uint64_t seed, const char *logical_name)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (const char *s = logical_name; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return mix64(mix64(seed) ^ h);
}

static void plan_free(plan *p)
{
    for (size_t i = 0; i < p->n; i++) free(p->t[i].name);
    free(p->t);
    memset(p, 0, sizeof *p);
}

/* Appends a tensor. stream names the generator stream (NULL: the tensor's own name) and base
 * is the element offset into it, which is how per-expert tensors become slices of fused ones. */
static int add(plan *p, uint64_t seed, const char *stream, uint64_t base, dist_kind dist,
               double a, double b, int ndim, const int64_t *shape, const char *fmt, ...)
    __attribute__((format(printf, 10, 11)));
static int add(plan *p, uint64_t seed, const char *stream, uint64_t base, dist_kind dist,
               double a, double b, int ndim, const int64_t *shape, const char *fmt, ...)
{
    if (p->n == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 256;
        ptensor *t = realloc(p->t, cap * sizeof *t);
        if (!t) return -1;
        p->t = t;
        p->cap = cap;
    }
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    ptensor *t = &p->t[p->n];
    memset(t, 0, sizeof *t);
    if (!(t->name = strdup(name))) return -1;
    t->ndim = ndim;
    t->count = 1;
    for (int d = 0; d < ndim; d++) {
        t->shape[d] = shape[d];
        t->count *= (uint64_t)shape[d];
    }
    t->dist = dist;
    t->a = a;
    t->b = b;
    t->key = stream_key(seed, stream ? stream : name);
    t->base = base;
    p->n++;
    return 0;
}

/* Linear weight [out, in]: std 1/sqrt(in) keeps activations O(1) through the stack. */
#define LIN(p, seed, out, in, ...) \
    add(p, seed, NULL, 0, DIST_NORMAL, 0.0, 1.0 / sqrt((double)(in)), 2, (const int64_t[]){out, in}, __VA_ARGS__)
/* Zero-centred RMSNorm weight (applied as 1 + w): small values around 0. */
#define NORM(p, seed, n, ...) \
    add(p, seed, NULL, 0, DIST_NORMAL, 0.0, 0.1, 1, (const int64_t[]){n}, __VA_ARGS__)

static int add_full_attn(plan *p, const qmix_geometry *g, uint64_t seed, const char *pre)
{
    int64_t D = g->D, H = g->H, KV = g->KV, hd = g->hd;
    return LIN(p, seed, H * hd * 2, D, "%sself_attn.q_proj.weight", pre) ||
           LIN(p, seed, KV * hd, D, "%sself_attn.k_proj.weight", pre) ||
           LIN(p, seed, KV * hd, D, "%sself_attn.v_proj.weight", pre) ||
           LIN(p, seed, D, H * hd, "%sself_attn.o_proj.weight", pre) ||
           NORM(p, seed, hd, "%sself_attn.q_norm.weight", pre) ||
           NORM(p, seed, hd, "%sself_attn.k_norm.weight", pre);
}

static int add_linear_attn(plan *p, const qmix_geometry *g, uint64_t seed, const char *pre)
{
    int64_t D = g->D, nv = g->nv, C = 2 * (int64_t)g->nk * g->dk + (int64_t)g->nv * g->dv;
    return LIN(p, seed, C, D, "%slinear_attn.in_proj_qkv.weight", pre) ||
           LIN(p, seed, nv * g->dv, D, "%slinear_attn.in_proj_z.weight", pre) ||
           LIN(p, seed, nv, D, "%slinear_attn.in_proj_b.weight", pre) ||
           LIN(p, seed, nv, D, "%slinear_attn.in_proj_a.weight", pre) ||
           /* A depthwise kernel of 4 taps with std 0.3 neither explodes nor vanishes. */
           add(p, seed, NULL, 0, DIST_NORMAL, 0.0, 0.3, 3, (const int64_t[]){C, 1, g->Kc},
               "%slinear_attn.conv1d.weight", pre) ||
           add(p, seed, NULL, 0, DIST_NORMAL, 0.0, 0.1, 1, (const int64_t[]){nv},
               "%slinear_attn.dt_bias", pre) ||
           /* Decay rates spread like the reference initialisation: A = uniform(1, 16). */
           add(p, seed, NULL, 0, DIST_LOG_UNIFORM, 1.0, 16.0, 1, (const int64_t[]){nv},
               "%slinear_attn.A_log", pre) ||
           /* Plain (not zero-centred) gated RMSNorm: around 1. */
           add(p, seed, NULL, 0, DIST_NORMAL, 1.0, 0.1, 1, (const int64_t[]){g->dv},
               "%slinear_attn.norm.weight", pre) ||
           LIN(p, seed, D, nv * g->dv, "%slinear_attn.out_proj.weight", pre);
}

static int add_moe(plan *p, const qmix_geometry *g, uint64_t seed, const char *pre, int per_expert)
{
    int64_t D = g->D, E = g->E, F = g->F, Fs = g->Fs;
    if (LIN(p, seed, E, D, "%smlp.gate.weight", pre)) return -1;
    char gu[256], dn[256];
    snprintf(gu, sizeof gu, "%smlp.experts.gate_up_proj", pre);
    snprintf(dn, sizeof dn, "%smlp.experts.down_proj", pre);
    double sd_in = 1.0 / sqrt((double)D), sd_f = 1.0 / sqrt((double)F);
    if (!per_expert) {
        if (add(p, seed, NULL, 0, DIST_NORMAL, 0.0, sd_in, 3, (const int64_t[]){E, 2 * F, D},
                "%s", gu) ||
            add(p, seed, NULL, 0, DIST_NORMAL, 0.0, sd_f, 3, (const int64_t[]){E, D, F}, "%s",
                dn))
            return -1;
    } else {
        for (int64_t e = 0; e < E; e++) {
            uint64_t gu0 = (uint64_t)(e * 2 * F * D), dn0 = (uint64_t)(e * D * F);
            if (add(p, seed, gu, gu0, DIST_NORMAL, 0.0, sd_in, 2, (const int64_t[]){F, D},
                    "%smlp.experts.%lld.gate_proj.weight", pre, (long long)e) ||
                add(p, seed, gu, gu0 + (uint64_t)(F * D), DIST_NORMAL, 0.0, sd_in, 2,
                    (const int64_t[]){F, D}, "%smlp.experts.%lld.up_proj.weight", pre,
                    (long long)e) ||
                add(p, seed, dn, dn0, DIST_NORMAL, 0.0, sd_f, 2, (const int64_t[]){D, F},
                    "%smlp.experts.%lld.down_proj.weight", pre, (long long)e))
                return -1;
        }
    }
    return LIN(p, seed, Fs, D, "%smlp.shared_expert.gate_proj.weight", pre) ||
           LIN(p, seed, Fs, D, "%smlp.shared_expert.up_proj.weight", pre) ||
           LIN(p, seed, D, Fs, "%smlp.shared_expert.down_proj.weight", pre) ||
           LIN(p, seed, 1, D, "%smlp.shared_expert_gate.weight", pre);
}

static int layer_is_full(int i) { return (i + 1) % 4 == 0; }

static int build_plan(const opts *o, plan *p)
{
    const qmix_geometry *g = &o->g;
    uint64_t s = o->seed;
    int64_t D = g->D, V = g->V;
    const char *lm = "model.language_model.";
    char pre[128];
    if (add(p, s, NULL, 0, DIST_NORMAL, 0.0, 1.0, 2, (const int64_t[]){V, D},
            "%sembed_tokens.weight", lm))
        return -1;
    for (int i = 0; i < g->L; i++) {
        snprintf(pre, sizeof pre, "%slayers.%d.", lm, i);
        if (NORM(p, s, D, "%sinput_layernorm.weight", pre) ||
            (layer_is_full(i) ? add_full_attn(p, g, s, pre) : add_linear_attn(p, g, s, pre)) ||
            NORM(p, s, D, "%spost_attention_layernorm.weight", pre) ||
            add_moe(p, g, s, pre, o->per_expert))
            return -1;
    }
    if (NORM(p, s, D, "%snorm.weight", lm) || LIN(p, s, V, D, "lm_head.weight")) return -1;
    if (o->mtp) {
        /* One full-attention MoE layer; its experts per expert, as in the releases. */
        if (LIN(p, s, D, 2 * D, "mtp.fc.weight") ||
            NORM(p, s, D, "mtp.pre_fc_norm_embedding.weight") ||
            NORM(p, s, D, "mtp.pre_fc_norm_hidden.weight") ||
            NORM(p, s, D, "mtp.layers.0.input_layernorm.weight") ||
            add_full_attn(p, g, s, "mtp.layers.0.") ||
            NORM(p, s, D, "mtp.layers.0.post_attention_layernorm.weight") ||
            add_moe(p, g, s, "mtp.layers.0.", 1) || NORM(p, s, D, "mtp.norm.weight"))
            return -1;
    }
    return 0;
}

static const qmix_stw_kv st_meta[] = {{"format", "pt"}};
#define N_ST_META 1

static void to_spec(const ptensor *t, qmix_dtype dtype, qmix_stw_tensor *spec)
{
    memset(spec, 0, sizeof *spec);
    spec->name = t->name;
    spec->dtype = dtype;
    spec->ndim = t->ndim;
    for (int d = 0; d < t->ndim; d++) spec->shape[d] = t->shape[d];
}

/* Conservative bytes a tensor adds to a header: name, dtype, shape and offsets at their
 * longest. Used to pack shards without building a header per candidate. */
static uint64_t header_bound(const ptensor *t)
{
    return strlen(t->name) + 64 + 21 * (uint64_t)t->ndim + 2 * 21;
}

/* Greedy packing in declaration order, as the HF savers do; a tensor larger than a shard gets a
 * shard of its own (tensors are never split). */
static int plan_shards(const opts *o, plan *p, qmix_err *err)
{
    size_t esize = qmix_dtype_size(o->dtype);
    uint64_t fixed = 8 + 8 + 64; /* length, padding, {"__metadata__":{"format":"pt"}} and braces */
    uint64_t cur = 0;
    int shard = -1;
    for (size_t i = 0; i < p->n; i++) {
        ptensor *t = &p->t[i];
        t->nbytes = t->count * esize;
        p->total_bytes += t->nbytes;
        p->total_params += t->count;
        uint64_t need = t->nbytes + header_bound(t);
        if (shard < 0 || cur + need > o->shard_size) {
            shard++;
            cur = fixed;
        }
        if (fixed + need > o->shard_size) p->n_oversized++;
        cur += need;
        t->shard = shard;
    }
    p->n_shards = shard + 1;

    /* Exact file sizes, for progress, the disk-space check and the shard limit. */
    qmix_stw_tensor *specs = malloc((p->n ? p->n : 1) * sizeof *specs);
    if (!specs) return qmix_errf(err, "out of memory");
    size_t i = 0;
    for (int sh = 0; sh < p->n_shards; sh++) {
        size_t j = i;
        while (j < p->n && p->t[j].shard == sh) {
            to_spec(&p->t[j], o->dtype, &specs[j - i]);
            j++;
        }
        uint64_t size;
        if (qmix_stw_file_size(specs, j - i, st_meta, N_ST_META, &size, err)) {
            free(specs);
            return -1;
        }
        p->file_bytes += size;
        i = j;
    }
    free(specs);
    return 0;
}

/* ---- value generation ------------------------------------------------------------------- */

static uint16_t f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1);                                          /* to nearest even */
    return (uint16_t)(u >> 16);
}

static uint16_t f32_to_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00;
    if (a >= 0x477ff000u) return sign | 0x7c00; /* >= 65520 rounds to infinity */
    if (a >= 0x38800000u) {                      /* normal half: drop 13 bits, to nearest even */
        a += 0xfffu + ((a >> 13) & 1);
        return sign | (uint16_t)((a - 0x38000000u) >> 13);
    }
    /* Subnormal half: scaling by 2^24 is exact, and lrintf rounds to nearest even. */
    float x;
    a = u & 0x7fffffffu;
    memcpy(&x, &a, 4);
    return sign | (uint16_t)lrintf(x * 16777216.0f);
}

#define GOLDEN 0x9e3779b97f4a7c15ull

/* Writes n values (elements first .. first+n-1 of tensor t) into out in dtype's byte order.
 * Normal-ish values are an Irwin–Hall sum of four 16-bit uniforms from one 64-bit draw:
 * bell-shaped, bounded at ±3.46σ (no outliers to upset low-precision formats), and cheap. */
static void gen_values(const ptensor *t, uint64_t first, size_t n, qmix_dtype dtype,
                       unsigned char *out)
{
    const double ih_scale = 1.0 / (65536.0 * sqrt(4.0 / 12.0));
    const float scale = (float)(t->b * ih_scale), mean = (float)t->a;
    uint64_t ctr = t->key + (t->base + first + 1) * GOLDEN;
    for (size_t j = 0; j < n; j++, ctr += GOLDEN) {
        uint64_t r = mix64(ctr);
        float v;
        if (t->dist == DIST_NORMAL) {
            int32_t s = (int32_t)(r & 0xffff) + (int32_t)((r >> 16) & 0xffff) +
                        (int32_t)((r >> 32) & 0xffff) + (int32_t)(r >> 48) - 131070;
            v = mean + scale * (float)s;
        } else {
            double u = (double)(r >> 11) * (1.0 / 9007199254740992.0);
            v = (float)log(t->a + (t->b - t->a) * u);
        }
        if (dtype == QMIX_BF16 || dtype == QMIX_F16) {
            uint16_t h = dtype == QMIX_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
            out[2 * j] = (unsigned char)h;
            out[2 * j + 1] = (unsigned char)(h >> 8);
        } else {
            uint32_t w;
            memcpy(&w, &v, 4);
            for (int b = 0; b < 4; b++) out[4 * j + b] = (unsigned char)(w >> (8 * b));
        }
    }
}

/* ---- output ----------------------------------------------------------------------------- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct progress {
    int on, tty;
    double t0, last;
    uint64_t done, total;
} progress;

static void progress_show(progress *pr, int final)
{
    double t = now_s();
    if (!pr->on || (!final && t - pr->last < 1.0)) return;
    pr->last = t;
    double el = t - pr->t0, mb = (double)pr->done / 1e6;
    fprintf(stderr, "%ssynth: %.0f / %.0f MB (%.0f%%), %.0f MB/s%s", pr->tty ? "\r" : "", mb,
            (double)pr->total / 1e6, pr->total ? 100.0 * (double)pr->done / (double)pr->total : 100.0,
            el > 0 ? mb / el : 0.0, pr->tty ? (final ? "\n" : "   ") : "\n");
    fflush(stderr);
}

static char *path_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    size_t k = a;
    if (a && dir[a - 1] != '/') p[k++] = '/';
    memcpy(p + k, name, b + 1);
    return p;
}

static void shard_name(const plan *p, int sh, char *buf, size_t len)
{
    if (p->n_shards == 1) snprintf(buf, len, "model.safetensors");
    else snprintf(buf, len, "model-%05d-of-%05d.safetensors", sh + 1, p->n_shards);
}

/* Generation and the write syscalls cost about the same (page-cache copies dominate the
 * latter), so a producer thread generates chunks into a small ring while this thread writes:
 * both cores busy, memory bounded by the ring. Chunks match the writer's buffer size so they
 * go straight to write() without another copy. */
#define CHUNK_BYTES QMIX_STW_BUF_BYTES
#define RING 3

typedef struct ring {
    const plan *p;
    qmix_dtype dtype;
    size_t esize;
    unsigned char *buf[RING];
    size_t len[RING];
    uint64_t produced, consumed; /* chunks so far; slot = count % RING */
    int stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} ring;

/* Both sides walk the same (tensor, chunk) sequence, so a slot needs no label. */
static void *producer(void *arg)
{
    ring *r = arg;
    size_t per = CHUNK_BYTES / r->esize;
    for (size_t k = 0; k < r->p->n; k++) {
        const ptensor *t = &r->p->t[k];
        for (uint64_t e = 0; e < t->count; e += per) {
            pthread_mutex_lock(&r->mu);
            while (!r->stop && r->produced - r->consumed == RING) pthread_cond_wait(&r->cv, &r->mu);
            int stop = r->stop;
            pthread_mutex_unlock(&r->mu);
            if (stop) return NULL;
            size_t slot = (size_t)(r->produced % RING);
            size_t n = t->count - e < per ? (size_t)(t->count - e) : per;
            gen_values(t, e, n, r->dtype, r->buf[slot]);
            r->len[slot] = n * r->esize;
            pthread_mutex_lock(&r->mu);
            r->produced++;
            pthread_cond_broadcast(&r->cv);
            pthread_mutex_unlock(&r->mu);
        }
    }
    return NULL;
}

static const unsigned char *ring_take(ring *r, size_t *len)
{
    pthread_mutex_lock(&r->mu);
    while (r->produced == r->consumed) pthread_cond_wait(&r->cv, &r->mu);
    pthread_mutex_unlock(&r->mu);
    size_t slot = (size_t)(r->consumed % RING);
    *len = r->len[slot];
    return r->buf[slot];
}

static void ring_release(ring *r)
{
    pthread_mutex_lock(&r->mu);
    r->consumed++;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

static int write_shards(const opts *o, const plan *p, progress *pr, qmix_err *err)
{
    ring r;
    memset(&r, 0, sizeof r);
    r.p = p;
    r.dtype = o->dtype;
    r.esize = qmix_dtype_size(o->dtype);
    qmix_stw_tensor *specs = malloc((p->n ? p->n : 1) * sizeof *specs);
    int oom = !specs;
    for (int i = 0; i < RING; i++) oom |= !(r.buf[i] = malloc(CHUNK_BYTES));
    if (oom) {
        for (int i = 0; i < RING; i++) free(r.buf[i]);
        free(specs);
        return qmix_errf(err, "out of memory");
    }
    pthread_mutex_init(&r.mu, NULL);
    pthread_cond_init(&r.cv, NULL);
    pthread_t th;
    int rc = 0;
    if (pthread_create(&th, NULL, producer, &r)) {
        rc = qmix_errf(err, "cannot start the generator thread");
        goto out;
    }

    size_t per = CHUNK_BYTES / r.esize;
    size_t i = 0;
    for (int sh = 0; !rc && sh < p->n_shards; sh++) {
        char fname[64];
        shard_name(p, sh, fname, sizeof fname);
        char *path = path_join(o->out_dir, fname);
        if (!path) {
            rc = qmix_errf(err, "out of memory");
            break;
        }
        size_t j = i;
        while (j < p->n && p->t[j].shard == sh) {
            to_spec(&p->t[j], o->dtype, &specs[j - i]);
            j++;
        }
        qmix_stw *w;
        rc = qmix_stw_open(path, specs, j - i, st_meta, N_ST_META, &w, err);
        free(path);
        if (rc) break;
        uint64_t before = pr->done;
        for (size_t k = i; !rc && k < j; k++) {
            const ptensor *t = &p->t[k];
            rc = qmix_stw_begin(w, t->name, err);
            for (uint64_t e = 0; !rc && e < t->count; e += per) {
                size_t len;
                const unsigned char *data = ring_take(&r, &len);
                rc = qmix_stw_write(w, data, len, err);
                ring_release(&r);
                pr->done = before + qmix_stw_bytes_written(w);
                progress_show(pr, 0);
            }
        }
        if (rc) qmix_stw_discard(w);
        else rc = qmix_stw_close(w, err);
        i = j;
    }
    pthread_mutex_lock(&r.mu);
    r.stop = 1;
    pthread_cond_broadcast(&r.cv);
    pthread_mutex_unlock(&r.mu);
    pthread_join(th, NULL);
out:
    pthread_cond_destroy(&r.cv);
    pthread_mutex_destroy(&r.mu);
    for (int k = 0; k < RING; k++) free(r.buf[k]);
    free(specs);
    return rc;
}

static int write_index(const opts *o, const plan *p, qmix_err *err)
{
    const char **names = malloc((p->n ? p->n : 1) * sizeof *names);
    const char **files = malloc((p->n ? p->n : 1) * sizeof *files);
    char (*fn)[64] = malloc((size_t)p->n_shards * sizeof *fn);
    char *path = path_join(o->out_dir, "model.safetensors.index.json");
    int rc;
    if (!names || !files || !fn || !path) {
        rc = qmix_errf(err, "out of memory");
    } else {
        for (int sh = 0; sh < p->n_shards; sh++) shard_name(p, sh, fn[sh], sizeof fn[sh]);
        for (size_t i = 0; i < p->n; i++) {
            names[i] = p->t[i].name;
            files[i] = fn[p->t[i].shard];
        }
        rc = qmix_st_write_index(path, p->total_bytes, p->total_params, names, files, p->n, err);
    }
    free(names);
    free(files);
    free(fn);
    free(path);
    return rc;
}

static int set_int(json_t *o, const char *k, long long v)
{
    return json_object_set_new(o, k, json_integer(v));
}

/* config.json in the released multimodal form (text settings under text_config). Vision
 * settings are the 35B's so the file parses as the real thing; no vision tensors exist. */
static json_t *make_config(const opts *o)
{
    const qmix_geometry *g = &o->g;
    json_t *root = json_object(), *tc = json_object(), *rope = json_object(),
           *types = json_array(), *sect = json_array(), *vis = json_object(),
           *syn = json_object();
    int bad = !root || !tc || !rope || !types || !sect || !vis || !syn;
    for (int i = 0; !bad && i < g->L; i++)
        bad = json_array_append_new(types, json_string(layer_is_full(i) ? "full_attention"
                                                                         : "linear_attention"));
    /* mrope_section splits the rot/2 rotary pairs 11:11:10 as the releases do for rot 64. */
    int half = g->hd / 4 / 2, s0 = (half * 11 + 16) / 32, s2 = half - 2 * s0;
    bad = bad || json_array_append_new(sect, json_integer(s0)) ||
          json_array_append_new(sect, json_integer(s0)) ||
          json_array_append_new(sect, json_integer(s2));
    const char *dt = o->dtype == QMIX_BF16 ? "bfloat16" : o->dtype == QMIX_F16 ? "float16"
                                                                                 : "float32";
    bad = bad || json_object_set_new(rope, "mrope_interleaved", json_true()) ||
          json_object_set_new(rope, "mrope_section", sect) ||
          json_object_set_new(rope, "partial_rotary_factor", json_real(0.25)) ||
          set_int(rope, "rope_theta", (long long)g->theta) ||
          json_object_set_new(rope, "rope_type", json_string("default"));
    bad = bad || json_object_set_new(tc, "attention_bias", json_false()) ||
          json_object_set_new(tc, "attention_dropout", json_real(0.0)) ||
          json_object_set_new(tc, "attn_output_gate", json_true()) ||
          json_object_set_new(tc, "dtype", json_string(dt)) ||
          set_int(tc, "eos_token_id", g->eos) || set_int(tc, "full_attention_interval", 4) ||
          set_int(tc, "head_dim", g->hd) ||
          json_object_set_new(tc, "hidden_act", json_string("silu")) ||
          set_int(tc, "hidden_size", g->D) ||
          json_object_set_new(tc, "initializer_range", json_real(0.02)) ||
          json_object_set_new(tc, "layer_types", types) ||
          set_int(tc, "linear_conv_kernel_dim", g->Kc) ||
          set_int(tc, "linear_key_head_dim", g->dk) ||
          set_int(tc, "linear_num_key_heads", g->nk) ||
          set_int(tc, "linear_num_value_heads", g->nv) ||
          set_int(tc, "linear_value_head_dim", g->dv) ||
          json_object_set_new(tc, "mamba_ssm_dtype", json_string("float32")) ||
          set_int(tc, "max_position_embeddings", 262144) ||
          json_object_set_new(tc, "mlp_only_layers", json_array()) ||
          json_object_set_new(tc, "model_type", json_string("qwen3_5_moe_text")) ||
          set_int(tc, "moe_intermediate_size", g->F) ||
          set_int(tc, "mtp_num_hidden_layers", o->mtp ? 1 : 0) ||
          json_object_set_new(tc, "mtp_use_dedicated_embeddings", json_false()) ||
          set_int(tc, "num_attention_heads", g->H) || set_int(tc, "num_experts", g->E) ||
          set_int(tc, "num_experts_per_tok", g->topk) ||
          set_int(tc, "num_hidden_layers", g->L) || set_int(tc, "num_key_value_heads", g->KV) ||
          json_object_set_new(tc, "output_router_logits", json_false()) ||
          json_object_set_new(tc, "partial_rotary_factor", json_real(0.25)) ||
          json_object_set_new(tc, "rms_norm_eps", json_real(1e-6)) ||
          json_object_set_new(tc, "rope_parameters", rope) ||
          json_object_set_new(tc, "router_aux_loss_coef", json_real(0.001)) ||
          set_int(tc, "shared_expert_intermediate_size", g->Fs) ||
          json_object_set_new(tc, "tie_word_embeddings", json_false()) ||
          json_object_set_new(tc, "use_cache", json_true()) ||
          set_int(tc, "vocab_size", g->V);
    json_t *arch = json_array();
    bad = bad || !arch ||
          json_array_append_new(arch, json_string("Qwen3_5MoeForConditionalGeneration"));
    bad = bad || json_object_set_new(vis, "deepstack_visual_indexes", json_array()) ||
          set_int(vis, "depth", 27) ||
          json_object_set_new(vis, "hidden_act", json_string("gelu_pytorch_tanh")) ||
          set_int(vis, "hidden_size", 1152) || set_int(vis, "in_channels", 3) ||
          json_object_set_new(vis, "initializer_range", json_real(0.02)) ||
          set_int(vis, "intermediate_size", 4304) ||
          json_object_set_new(vis, "model_type", json_string("qwen3_5_moe")) ||
          set_int(vis, "num_heads", 16) || set_int(vis, "num_position_embeddings", 2304) ||
          set_int(vis, "out_hidden_size", g->D) || set_int(vis, "patch_size", 16) ||
          set_int(vis, "spatial_merge_size", 2) || set_int(vis, "temporal_patch_size", 2);
    /* Provenance, so nobody mistakes these weights for a real model. */
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)o->seed);
    bad = bad || json_object_set_new(syn, "like", json_string(g->like)) ||
          json_object_set_new(syn, "seed", json_string(seed)) ||
          json_object_set_new(syn, "expert_layout",
                              json_string(o->per_expert ? "per-expert" : "fused"));
    bad = bad || json_object_set_new(root, "architectures", arch) ||
          set_int(root, "image_token_id", g->image_tok) ||
          json_object_set_new(root, "model_type", json_string("qwen3_5_moe")) ||
          json_object_set_new(root, "qmix_synth", syn) ||
          json_object_set_new(root, "text_config", tc) ||
          json_object_set_new(root, "tie_word_embeddings", json_false()) ||
          json_object_set_new(root, "transformers_version", json_string("4.57.0.dev0")) ||
          set_int(root, "video_token_id", g->video_tok) ||
          json_object_set_new(root, "vision_config", vis) ||
          set_int(root, "vision_end_token_id", g->vis_end) ||
          set_int(root, "vision_start_token_id", g->vis_start);
    if (bad) {
        /* Only reachable when out of memory; pieces not yet attached to root leak. */
        json_decref(root);
        return NULL;
    }
    return root;
}

static int write_text_file(const char *path, const char *text, qmix_err *err)
{
    qmix_wfile w;
    if (qmix_wfile_open(&w, path, err)) return -1;
    fputs(text, w.f);
    fputc('\n', w.f);
    return qmix_wfile_commit(&w, err); /* an error names errno; nothing is left at path */
}

static int write_config(const opts *o, qmix_err *err)
{
    json_t *cfg = make_config(o);
    if (!cfg) return qmix_errf(err, "out of memory building config.json");
    char *text = json_dumps(cfg, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(15));
    json_decref(cfg);
    char *path = path_join(o->out_dir, "config.json");
    int rc = !text || !path ? qmix_errf(err, "out of memory") : write_text_file(path, text, err);
    free(text);
    free(path);
    return rc;
}

/* ---- the output directory --------------------------------------------------------------- */

static int mkdir_p(const char *dir, qmix_err *err)
{
    char *p = strdup(dir);
    if (!p) return qmix_errf(err, "out of memory");
    for (char *s = p + 1;; s++) {
        int end = *s == '\0';
        if (*s == '/' || end) {
            char c = *s;
            *s = '\0';
            if (mkdir(p, 0755) && errno != EEXIST) {
                int e = errno;
                int rc = qmix_errf(err, "cannot create directory %s: %s", p, strerror(e));
                free(p);
                return rc;
            }
            *s = c;
        }
        if (end) break;
    }
    free(p);
    struct stat st;
    if (stat(dir, &st)) return qmix_errf(err, "%s: %s", dir, strerror(errno));
    if (!S_ISDIR(st.st_mode)) return qmix_errf(err, "%s exists and is not a directory", dir);
    return 0;
}

/* What an earlier checkpoint left that a loader would pick up instead of (or besides) ours. */
static int is_checkpoint_file(const char *n)
{
    size_t len = strlen(n);
    const char *ext = ".safetensors";
    size_t el = strlen(ext);
    return !strcmp(n, "config.json") || !strcmp(n, "model.safetensors.index.json") ||
           (!strncmp(n, "model", 5) && len > el && !strcmp(n + len - el, ext));
}

/* Returns 1 if the directory has entries, 0 if empty; with clean, removes checkpoint files. */
static int prepare_dir(const char *dir, int clean, qmix_err *err)
{
    DIR *d = opendir(dir);
    if (!d) return qmix_errf(err, "cannot open %s: %s", dir, strerror(errno));
    int any = 0, rc = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        any = 1;
        if (clean && is_checkpoint_file(e->d_name)) {
            char *p = path_join(dir, e->d_name);
            if (!p) {
                rc = qmix_errf(err, "out of memory");
                break;
            }
            if (unlink(p) && errno != ENOENT) {
                rc = qmix_errf(err, "cannot remove %s: %s", p, strerror(errno));
                free(p);
                break;
            }
            free(p);
        }
    }
    closedir(d);
    return rc ? -1 : any;
}

static int check_space(const char *dir, uint64_t need, qmix_err *err)
{
    struct statvfs vfs;
    if (statvfs(dir, &vfs)) return 0; /* unknown: let the writes tell */
    uint64_t avail = (uint64_t)vfs.f_bavail * vfs.f_frsize;
    if (need > avail)
        return qmix_errf(err, "%s: the checkpoint needs %.2f GB, only %.2f GB free", dir,
                         (double)need / 1e9, (double)avail / 1e9);
    return 0;
}

int qmix_cmd_synth(int argc, char **argv)
{
    opts o;
    int done;
    int code = parse_args(argc, argv, &o, &done);
    if (code || done) return code;

    qmix_err err = {{0}};
    plan p = {0};
    int writing = 0;
    double t0 = now_s();
    if (build_plan(&o, &p)) {
        plan_free(&p);
        fprintf(stderr, "qmix synth: out of memory\n");
        return 1;
    }
    if (plan_shards(&o, &p, &err)) goto fail;
    if (mkdir_p(o.out_dir, &err)) goto fail;
    int nonempty = prepare_dir(o.out_dir, o.force, &err);
    if (nonempty < 0) goto fail;
    if (nonempty && !o.force) {
        fprintf(stderr, "qmix synth: %s is not empty (use --force to write into it)\n",
                o.out_dir);
        plan_free(&p);
        return 1;
    }
    if (check_space(o.out_dir, p.file_bytes, &err)) goto fail;
    if (p.n_oversized && !o.quiet)
        fprintf(stderr, "qmix synth: note: %zu tensor(s) exceed --shard-size; each gets a shard "
                        "of its own\n",
                p.n_oversized);

    progress pr = {0};
    pr.tty = isatty(STDERR_FILENO);
    pr.on = !o.quiet && (pr.tty || p.file_bytes > 100u * 1000 * 1000);
    pr.t0 = pr.last = now_s();
    pr.total = p.file_bytes;
    writing = 1;
    if (write_shards(&o, &p, &pr, &err)) goto fail;
    progress_show(&pr, 1);
    if (p.n_shards > 1 && write_index(&o, &p, &err)) goto fail;
    /* Last, so that a directory with a config.json holds a complete checkpoint. */
    if (write_config(&o, &err)) goto fail;

    double el = now_s() - t0;
    if (!o.quiet)
        printf("synth: %s-like, %zu tensors, %llu params, %llu bytes in %d shard%s -> %s "
               "(%.1f s, %.0f MB/s)\n",
               o.g.like, p.n, (unsigned long long)p.total_params,
               (unsigned long long)p.file_bytes, p.n_shards, p.n_shards == 1 ? "" : "s",
               o.out_dir, el, el > 0 ? (double)p.file_bytes / 1e6 / el : 0.0);
    plan_free(&p);
    return 0;

fail:
    fprintf(stderr, "qmix synth: %s\n", err.msg);
    if (writing) { /* no half checkpoint: remove the shards already written */
        qmix_err cerr;
        prepare_dir(o.out_dir, 1, &cerr);
    }
    plan_free(&p);
    return 1;
}
