/* The .qcal reader (format in calib.h) and the tensor-name → input mapping: self-contained (no
 * model, session or threads), so the fuzzer links it alone (fuzz/fuzz_calib.c). */
#include "quant/calib.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/err.h"

static const char *const kind_names[QMIX_CIN_COUNT] = {
    "attn_in", "attn_o_in", "gdn_out_in", "ffn_in", "shared_down_in", "expert_in",
    "expert_down_in", "head_in"};

const char *qmix_calib_kind_name(int kind)
{
    return kind >= 0 && kind < QMIX_CIN_COUNT ? kind_names[kind] : "?";
}

int qmix_calib_kind_per_expert(int kind)
{
    return kind == QMIX_CIN_EXPERT || kind == QMIX_CIN_EXPERT_DOWN;
}

int qmix_calib_input_of(const char *n, int *layer, int *kind)
{
    *layer = -1;
    if (strstr(n, "vision") || strstr(n, "visual") || !strncmp(n, "mtp.", 4)) return 0;
    if (strstr(n, "lm_head")) {
        *kind = QMIX_CIN_HEAD;
        return 1;
    }
    const char *l = strstr(n, "layers.");
    if (!l) return 0;
    char *end;
    long li = strtol(l + 7, &end, 10);
    if (end == l + 7 || *end != '.' || li < 0 || li >= QMIX_MAX_LAYERS) return 0;
    *layer = (int)li;
    static const struct { const char *pat; int kind; } map[] = {
        {"self_attn.q_proj", QMIX_CIN_ATTN}, {"self_attn.k_proj", QMIX_CIN_ATTN},
        {"self_attn.v_proj", QMIX_CIN_ATTN}, {"self_attn.o_proj", QMIX_CIN_ATTN_O},
        {"linear_attn.in_proj_", QMIX_CIN_ATTN}, {"linear_attn.out_proj", QMIX_CIN_GDN_OUT},
        {"mlp.shared_expert_gate", QMIX_CIN_FFN},
        {"mlp.shared_expert.down_proj", QMIX_CIN_SHARED_DOWN},
        {"mlp.shared_expert.", QMIX_CIN_FFN},
        {"down_proj", QMIX_CIN_EXPERT_DOWN},   /* switch_mlp / experts (shared handled above) */
        {"switch_mlp.", QMIX_CIN_EXPERT}, {"mlp.experts.", QMIX_CIN_EXPERT},
        {"mlp.gate.", QMIX_CIN_FFN},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) {
        const char *p = strstr(n, map[i].pat);
        if (!p) continue;
        if (map[i].kind == QMIX_CIN_EXPERT_DOWN && !strstr(n, "switch_mlp.") && !strstr(n, "mlp.experts."))
            continue;
        *kind = map[i].kind;
        return 1;
    }
    if (strlen(n) >= 8 && !strcmp(n + strlen(n) - 8, "mlp.gate")) {
        *kind = QMIX_CIN_FFN;
        return 1;
    }
    return 0;
}

uint64_t qmix_calib_record_bytes(int64_t k, int hessian)
{
    return 8 * ((uint64_t)k + (hessian ? (uint64_t)k * (uint64_t)(k + 1) / 2 : 0));
}

/* ---- reading --------------------------------------------------------------------------- */

struct qmix_calib {
    void *map;
    size_t map_len;
    int n_layers, n_experts, hessian, sequential, n;
    uint64_t n_tokens;
    char dataset[4097];
    qmix_calib_entry *e;
    int32_t *index;      /* [n] entry numbers sorted by slot: memory follows the file's size,
                            not the layers × experts its header claims */
};

static size_t slot_of(const qmix_calib *c, int layer, int kind, int expert)
{
    return (((size_t)(layer + 1) * QMIX_CIN_COUNT + (size_t)kind) * (size_t)(c->n_experts + 1)) +
           (size_t)(expert + 1);
}

/* qsort has no context argument: the table being sorted, during parse (per thread) */
static _Thread_local const qmix_calib *sort_calib;

static size_t entry_slot(const qmix_calib *c, int32_t i)
{
    return slot_of(c, c->e[i].layer, c->e[i].kind, c->e[i].expert);
}

static int cmp_slot(const void *a, const void *b)
{
    size_t x = entry_slot(sort_calib, *(const int32_t *)a),
           y = entry_slot(sort_calib, *(const int32_t *)b);
    return (x > y) - (x < y);
}

static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static int parse(qmix_calib *c, const uint8_t *b, uint64_t len, const char *label, qmix_err *err)
{
    if (len < 48 || memcmp(b, "QMIXCAL1", 8))
        return qmix_errf(err, "%s: not a qmix calibration file (no QMIXCAL1 header)", label);
    uint32_t ver = rd32(b + 8), flags = rd32(b + 12);
    uint32_t nl = rd32(b + 16), ne = rd32(b + 20), n = rd32(b + 24);
    uint64_t ntok = rd64(b + 32);
    uint32_t dlen = rd32(b + 44);
    if (ver != 1) return qmix_errf(err, "%s: version %u (this qmix reads 1)", label, ver);
    if (flags & ~3u) return qmix_errf(err, "%s: unknown flags 0x%x", label, flags);
    if (nl == 0 || nl > QMIX_MAX_LAYERS || ne > 4096)
        return qmix_errf(err, "%s: %u layers / %u experts out of range", label, nl, ne);
    if (dlen > 4096) return qmix_errf(err, "%s: dataset name of %u bytes (at most 4096)", label, dlen);
    uint64_t off = 48 + ((uint64_t)dlen + 7) / 8 * 8;
    if (off > len) return qmix_errf(err, "%s: truncated header", label);
    uint64_t max_entries = (uint64_t)(nl + 1) * QMIX_CIN_COUNT * (ne + 1);
    if (n > max_entries)
        return qmix_errf(err, "%s: %u entries, more than %llu possible", label, n,
                         (unsigned long long)max_entries);
    memcpy(c->dataset, b + 48, dlen);
    c->dataset[dlen] = 0;
    c->n_layers = (int)nl;
    c->n_experts = (int)ne;
    c->hessian = (int)(flags & 1);
    c->sequential = (int)(flags >> 1 & 1);
    c->n_tokens = ntok;
    /* every record takes 32 bytes and one float64 at least: no allocation larger than the file
       asks for */
    if ((uint64_t)n > (len - off) / 40)
        return qmix_errf(err, "%s: %u records cannot fit in the %llu bytes after the header",
                         label, n, (unsigned long long)(len - off));
    c->e = calloc(n ? n : 1, sizeof *c->e);
    c->index = malloc((n ? n : 1) * sizeof *c->index);
    if (!c->e || !c->index) return qmix_errf(err, "out of memory");
    for (uint32_t i = 0; i < n; i++) {
        if (len - off < 32) return qmix_errf(err, "%s: record %u: truncated", label, i);
        const uint8_t *r = b + off;
        int32_t layer = (int32_t)rd32(r), expert = (int32_t)rd32(r + 8);
        uint32_t kind = rd32(r + 4), resv = rd32(r + 12);
        uint64_t k = rd64(r + 16), rows = rd64(r + 24);
        if (kind >= QMIX_CIN_COUNT || resv)
            return qmix_errf(err, "%s: record %u: bad kind %u", label, i, kind);
        if ((kind == QMIX_CIN_HEAD) != (layer == -1) || layer < -1 || layer >= (int32_t)nl)
            return qmix_errf(err, "%s: record %u: layer %d does not fit kind %s (%u layers)", label,
                             i, layer, kind_names[kind], nl);
        if (qmix_calib_kind_per_expert((int)kind) ? expert < 0 || expert >= (int32_t)ne : expert != -1)
            return qmix_errf(err, "%s: record %u: expert %d invalid for %s", label, i, expert,
                             kind_names[kind]);
        if (k == 0 || k > (1u << 20))
            return qmix_errf(err, "%s: record %u: %llu channels out of range", label, i,
                             (unsigned long long)k);
        uint64_t need = qmix_calib_record_bytes((int64_t)k, c->hessian);
        off += 32;
        if (len - off < need)
            return qmix_errf(err, "%s: record %u (layer %d %s): %llu bytes of data, %llu left",
                             label, i, layer, kind_names[kind], (unsigned long long)need,
                             (unsigned long long)(len - off));
        c->index[i] = (int32_t)i;
        const double *d = (const double *)(const void *)(b + off);
        for (uint64_t j = 0; j < need / 8; j++)
            if (!isfinite(d[j]) || (j < k && d[j] < 0))
                return qmix_errf(err, "%s: record %u (layer %d %s): value %llu is %g", label, i,
                                 layer, kind_names[kind], (unsigned long long)j, d[j]);
        c->e[i] = (qmix_calib_entry){.layer = layer, .kind = (int)kind, .expert = expert,
                                     .k = (int64_t)k, .n = rows, .sumsq = d,
                                     .xtx = c->hessian ? d + k : NULL};
        off += need;
    }
    if (off != len)
        return qmix_errf(err, "%s: %llu bytes after the last record", label,
                         (unsigned long long)(len - off));
    sort_calib = c;
    qsort(c->index, n, sizeof *c->index, cmp_slot);
    for (uint32_t j = 1; j < n; j++) {
        int32_t a = c->index[j - 1], i = c->index[j];
        if (entry_slot(c, a) != entry_slot(c, i)) continue;
        if (a > i) i = a; /* name the later of the two */
        return qmix_errf(err, "%s: record %d: duplicate entry layer %d %s expert %d", label, i,
                         c->e[i].layer, kind_names[c->e[i].kind], c->e[i].expert);
    }
    c->n = (int)n;
    return 0;
}

int qmix_calib_open_memory(const void *buf, uint64_t len, const char *label, qmix_calib **out,
                           qmix_err *err)
{
    *out = NULL;
    qmix_calib *c = calloc(1, sizeof *c);
    if (!c) return qmix_errf(err, "out of memory");
    if ((uintptr_t)buf % 8) {
        free(c);
        return qmix_errf(err, "%s: buffer not 8-byte aligned", label);
    }
    if (parse(c, buf, len, label, err)) {
        qmix_calib_close(c);
        return -1;
    }
    *out = c;
    return 0;
}

int qmix_calib_open(const char *path, qmix_calib **out, qmix_err *err)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return qmix_errf(err, "%s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) || !S_ISREG(sb.st_mode)) {
        close(fd);
        return qmix_errf(err, "%s: not a regular file", path);
    }
    size_t len = (size_t)sb.st_size;
    void *m = len ? mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
    close(fd);
    if (len && m == MAP_FAILED) return qmix_errf(err, "%s: mmap: %s", path, strerror(errno));
    qmix_calib *c = calloc(1, sizeof *c);
    if (!c) {
        if (len) munmap(m, len);
        return qmix_errf(err, "out of memory");
    }
    c->map = len ? m : NULL;
    c->map_len = len;
    if (parse(c, len ? m : (const void *)"", len, path, err)) {
        qmix_calib_close(c);
        return -1;
    }
    *out = c;
    return 0;
}

void qmix_calib_close(qmix_calib *c)
{
    if (!c) return;
    if (c->map) munmap(c->map, c->map_len);
    free(c->e);
    free(c->index);
    free(c);
}

const qmix_calib_entry *qmix_calib_get(const qmix_calib *c, int layer, int kind, int expert)
{
    if (!c || kind < 0 || kind >= QMIX_CIN_COUNT || layer < -1 || layer >= c->n_layers ||
        expert < -1 || expert >= c->n_experts)
        return NULL;
    size_t want = slot_of(c, layer, kind, expert);
    int lo = 0, hi = c->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        size_t s = entry_slot(c, c->index[mid]);
        if (s == want) return &c->e[c->index[mid]];
        if (s < want) lo = mid + 1;
        else hi = mid - 1;
    }
    return NULL;
}

int qmix_calib_count(const qmix_calib *c) { return c->n; }
const qmix_calib_entry *qmix_calib_at(const qmix_calib *c, int i) { return &c->e[i]; }
uint64_t qmix_calib_tokens(const qmix_calib *c) { return c->n_tokens; }
int qmix_calib_has_hessian(const qmix_calib *c) { return c->hessian; }
int qmix_calib_sequential(const qmix_calib *c) { return c->sequential; }
int qmix_calib_layers(const qmix_calib *c) { return c->n_layers; }
int qmix_calib_experts(const qmix_calib *c) { return c->n_experts; }
const char *qmix_calib_dataset(const qmix_calib *c) { return c->dataset; }

int64_t qmix_calib_failsafe_rows(uint64_t n_tokens, double pct)
{
    if (pct < 0) pct = QMIX_CALIB_FAILSAFE_PCT;
    return (int64_t)ceil(pct / 100.0 * (double)n_tokens);
}
