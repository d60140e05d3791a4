/* Byte-level BPE from a Hugging Face tokenizer.json; see tokenizer.h for the behaviour.
 *
 * Layout: every token (vocab and added) has its tokenizer.json spelling and the raw bytes it stands
 * for, both in one string arena. BPE runs on raw bytes: the 256 byte tokens are the initial symbols
 * and merges are a hash map (left id, right id) -> (rank, merged id). Each pre-token is merged with
 * a binary heap ordered by (rank, position), as the Rust crate does, and the result cached by word. */
#include "text/tokenizer.h"
#include "text/tok_gguf.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <jansson.h>
#include <pcre2.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <utf8proc.h>

#include "util/err.h"
#include "util/fileio.h"

#define MAX_FILE_BYTES ((size_t)1 << 30)
#define MAX_VOCAB (1 << 22) /* ids above this are refused (Qwen3.5: 248,320) */
#define CACHE_SLOTS (1u << 16)    /* power of two */
#define CACHE_MAX_ENTRIES (CACHE_SLOTS / 2)
#define CACHE_MAX_WORD 128        /* longer pre-tokens are not cached */

/* The GPT-2 pre-tokenizer regex, used by ByteLevel with use_regex = true. */
static const char GPT2_REGEX[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/* ------------------------------------------------------------------------------------------ */
/* UTF-8                                                                                        */

enum { U8_VALID = 1, U8_INVALID = 0, U8_TRUNCATED = -1 };

/* Scans one UTF-8 sequence at s[0..n) (n >= 1) per Unicode's table 3-7. Returns its length when
 * valid; otherwise the length of the maximal invalid subpart (>= 1), with *state U8_TRUNCATED when
 * that subpart is a valid prefix cut off by the end of the input. */
static size_t u8_scan(const unsigned char *s, size_t n, int *state)
{
    unsigned c = s[0];
    *state = U8_VALID;
    if (c < 0x80) return 1;
    unsigned lo = 0x80, hi = 0xBF;
    size_t need;
    if (c >= 0xC2 && c <= 0xDF) {
        need = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        *state = U8_INVALID;
        return 1;
    }
    for (size_t k = 1; k <= need; k++) {
        if (k >= n) {
            *state = U8_TRUNCATED;
            return k;
        }
        unsigned b = s[k];
        if (b < lo || b > hi) {
            *state = U8_INVALID;
            return k;
        }
        lo = 0x80;
        hi = 0xBF;
    }
    return need + 1;
}

static const char REPLACEMENT[3] = {(char)0xEF, (char)0xBF, (char)0xBD};

/* Growable byte buffer. */
typedef struct buf {
    char *p;
    size_t n, cap;
} buf;

static int buf_reserve(buf *b, size_t extra)
{
    if (b->n + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_put(buf *b, const void *data, size_t n)
{
    if (buf_reserve(b, n + 1)) return -1;
    if (n) memcpy(b->p + b->n, data, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}

/* Appends s with every invalid UTF-8 subpart replaced by U+FFFD (lossy decoding). */
static int buf_put_lossy(buf *b, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, run = 0;
    while (i < n) {
        if (u[i] < 0x80) {
            i++;
            continue;
        }
        int st;
        size_t k = u8_scan(u + i, n - i, &st);
        if (st == U8_VALID) {
            i += k;
            continue;
        }
        if (buf_put(b, s + run, i - run) || buf_put(b, REPLACEMENT, 3)) return -1;
        i += k;
        run = i;
    }
    return buf_put(b, s + run, n - run);
}

/* 1 if s[0..n) is valid UTF-8. */
static int u8_valid(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        if (u[i] < 0x80) {
            i++;
            continue;
        }
        int st;
        size_t k = u8_scan(u + i, n - i, &st);
        if (st != U8_VALID) return 0;
        i += k;
    }
    return 1;
}

static uint64_t hash_bytes(const void *data, size_t n)
{
    const unsigned char *p = data;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h ^ (h >> 29);
}

static uint64_t hash_u64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

/* ------------------------------------------------------------------------------------------ */
/* The tokenizer                                                                                */

typedef enum { NORM_NFC, NORM_NFD, NORM_NFKC, NORM_NFKD } norm_kind;

typedef enum { SPLIT_REMOVED, SPLIT_ISOLATED, SPLIT_MERGED_PREV, SPLIT_MERGED_NEXT, SPLIT_CONTIGUOUS } split_behavior;

typedef struct pre_step {
    int byte_level;       /* ByteLevel step; else a Split */
    int add_prefix_space; /* ByteLevel */
    pcre2_code *re;       /* Split regex, or the GPT-2 regex of ByteLevel(use_regex) (may be NULL) */
    split_behavior behavior;
    int invert;
} pre_step;

typedef struct tok_entry {
    uint32_t str;  /* arena offset of the tokenizer.json spelling (NUL-terminated); 0 = none */
    uint32_t bytes; /* arena offset of the raw bytes */
    uint32_t nbytes;
    uint8_t present, special, added;
} tok_entry;

typedef struct added_tok {
    int32_t id;
    uint32_t str, len; /* content in the arena */
    int lstrip, rstrip;
} added_tok;

typedef struct merge_slot {
    uint64_t key; /* (left << 32 | right) + 1; 0 = empty */
    uint32_t rank;
    int32_t id;
} merge_slot;

typedef struct str_slot {
    uint32_t str; /* arena offset, 0 = empty */
    uint32_t len;
    int32_t id;
} str_slot;

typedef struct cache_slot {
    uint32_t key, klen; /* offsets into cache_bytes; klen 0 = empty */
    uint32_t ids, nids; /* offsets into cache_ids */
} cache_slot;

typedef struct heap_item {
    uint32_t rank, pos;
} heap_item;

struct qmix_tokenizer {
    buf arena; /* spellings and bytes; offset 0 is a dummy byte */
    tok_entry *tokens;
    int32_t n_tokens;

    str_slot *smap; /* spelling -> id */
    size_t smap_mask;

    merge_slot *merges;
    size_t merge_mask;

    int32_t byte_id[256];
    uint32_t byte_cp[256];
    int32_t unk_id;
    int ignore_merges;

    added_tok *added;
    int n_added;
    unsigned char added_first[256];

    norm_kind *norms;
    int n_norms;

    pre_step *steps;
    int n_steps;

    qmix_tok_specials specials;
    size_t max_token_bytes;

    /* Mutable encode state, under lock. */
    pthread_mutex_t lock;
    pcre2_match_data *md;
    cache_slot *cache;
    size_t cache_entries;
    buf cache_bytes;
    int32_t *cache_ids;
    size_t cache_nids, cache_ids_cap;
    /* BPE scratch */
    int32_t *sym_id;
    int32_t *sym_prev, *sym_next;
    heap_item *heap;
    size_t scratch_cap, heap_cap;
    /* output ids */
    int32_t *out;
    size_t n_out, out_cap;
    const char *split_base; /* the buffer the spans being split point into */
};

/* GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100.. in order. */
static void byte_level_tables(uint32_t byte_cp[256], int16_t cp_byte[512])
{
    for (int i = 0; i < 512; i++) cp_byte[i] = -1;
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        byte_cp[b] = printable ? (uint32_t)b : (uint32_t)(256 + n++);
        cp_byte[byte_cp[b]] = (int16_t)b;
    }
}

static uint32_t arena_add(qmix_tokenizer *t, const char *s, size_t n)
{
    uint32_t off = (uint32_t)t->arena.n;
    if (t->arena.n + n + 1 > UINT32_MAX || buf_put(&t->arena, s, n)) return 0;
    t->arena.n++; /* keep the NUL */
    return off;
}

static const char *arena_at(const qmix_tokenizer *t, uint32_t off)
{
    return t->arena.p + off;
}

/* The bytes a spelling decodes to through the ByteLevel decoder: each character's byte, or the
 * spelling's own UTF-8 when some character is outside the byte alphabet (as the Rust crate does). */
static int spelling_bytes(qmix_tokenizer *t, const char *s, size_t n, const int16_t cp_byte[512],
                          uint32_t *off, uint32_t *nbytes)
{
    char small[256];
    char *tmp = n <= sizeof small ? small : malloc(n);
    if (!tmp) return -1;
    size_t m = 0;
    int ok = 1;
    for (size_t i = 0; i < n && ok;) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
        if (k <= 0 || cp >= 512 || cp_byte[cp] < 0) {
            ok = 0;
            break;
        }
        tmp[m++] = (char)cp_byte[cp];
        i += (size_t)k;
    }
    const char *src = ok && m ? tmp : s; /* m == 0 only for an empty spelling */
    size_t len = ok ? m : n;
    *off = arena_add(t, src, len);
    *nbytes = (uint32_t)len;
    if (tmp != small) free(tmp);
    return *off ? 0 : -1;
}

/* spelling -> id map */
static int smap_find(const qmix_tokenizer *t, const char *s, size_t n, size_t *slot)
{
    size_t i = hash_bytes(s, n) & t->smap_mask;
    for (;; i = (i + 1) & t->smap_mask) {
        const str_slot *e = &t->smap[i];
        if (!e->str) {
            *slot = i;
            return 0;
        }
        if (e->len == n && !memcmp(arena_at(t, e->str), s, n)) {
            *slot = i;
            return 1;
        }
    }
}

static int32_t smap_get(const qmix_tokenizer *t, const char *s, size_t n)
{
    size_t slot;
    return smap_find(t, s, n, &slot) ? t->smap[slot].id : -1;
}

static void merge_put(qmix_tokenizer *t, int32_t a, int32_t b, uint32_t rank, int32_t id)
{
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    size_t i = hash_u64(key) & t->merge_mask;
    while (t->merges[i].key && t->merges[i].key != key) i = (i + 1) & t->merge_mask;
    t->merges[i] = (merge_slot){key, rank, id}; /* a repeated pair keeps its last rank, as HF */
}

static inline const merge_slot *merge_get(const qmix_tokenizer *t, int32_t a, int32_t b)
{
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    size_t i = hash_u64(key) & t->merge_mask;
    for (;; i = (i + 1) & t->merge_mask) {
        const merge_slot *e = &t->merges[i];
        if (e->key == key) return e;
        if (!e->key) return NULL;
    }
}

void qmix_tok_free(qmix_tokenizer *t)
{
    if (!t) return;
    for (int i = 0; i < t->n_steps; i++) pcre2_code_free(t->steps[i].re);
    free(t->steps);
    free(t->norms);
    free(t->added);
    free(t->tokens);
    free(t->smap);
    free(t->merges);
    free(t->arena.p);
    pcre2_match_data_free(t->md);
    free(t->cache);
    free(t->cache_bytes.p);
    free(t->cache_ids);
    free(t->sym_id);
    free(t->sym_prev);
    free(t->sym_next);
    free(t->heap);
    free(t->out);
    pthread_mutex_destroy(&t->lock);
    free(t);
}

/* ------------------------------------------------------------------------------------------ */
/* Loading                                                                                      */

static const char *jstr(json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static int jtrue(json_t *obj, const char *key)
{
    return json_is_true(json_object_get(obj, key));
}

/* Oniguruma (the Rust crate's regex engine) reads \s as the Unicode White_Space property; PCRE2's
 * \s also takes U+180E. Spell \s and \S as the property, inside and outside classes; \Q...\E
 * literals are copied as they are. */
static int translate_regex(const char *p, size_t n, buf *out)
{
    for (size_t i = 0; i < n; i++) {
        if (p[i] != '\\' || i + 1 >= n) {
            if (buf_put(out, p + i, 1)) return -1;
            continue;
        }
        char c = p[++i];
        int bad;
        if (c == 's') {
            bad = buf_put(out, "\\p{White_Space}", 15);
        } else if (c == 'S') {
            bad = buf_put(out, "\\P{White_Space}", 15);
        } else if (c == 'Q') {
            size_t j = i + 1;
            while (j + 1 < n && !(p[j] == '\\' && p[j + 1] == 'E')) j++;
            size_t end = j + 1 < n ? j + 2 : n;
            bad = buf_put(out, p + i - 1, end - (i - 1));
            i = end - 1;
        } else {
            bad = buf_put(out, p + i - 1, 2);
        }
        if (bad) return -1;
    }
    return 0;
}

static int compile_regex(const char *pattern, size_t len, pcre2_code **out, const char *label,
                         qmix_err *err)
{
    buf tr = {0};
    if (translate_regex(pattern, len, &tr) || buf_put(&tr, "", 0)) {
        free(tr.p);
        return qmix_errf(err, "%s: out of memory", label);
    }
    int ec;
    PCRE2_SIZE eoff;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)tr.p, tr.n, PCRE2_UTF | PCRE2_UCP, &ec, &eoff, NULL);
    free(tr.p);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ec, msg, sizeof msg);
        return qmix_errf(err, "%s: pre_tokenizer regex does not compile: %s", label, (const char *)msg);
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* falls back to the interpreter if unavailable */
    *out = re;
    return 0;
}

static int add_step(qmix_tokenizer *t, pre_step st)
{
    pre_step *p = realloc(t->steps, (size_t)(t->n_steps + 1) * sizeof *p);
    if (!p) {
        pcre2_code_free(st.re);
        return -1;
    }
    t->steps = p;
    t->steps[t->n_steps++] = st;
    return 0;
}

static int parse_pre(qmix_tokenizer *t, json_t *pt, const char *label, int depth, qmix_err *err)
{
    if (json_is_null(pt) || !pt) return 0;
    const char *type = jstr(pt, "type");
    if (!json_is_object(pt) || !type)
        return qmix_errf(err, "%s: pre_tokenizer is not an object with a \"type\"", label);
    if (!strcmp(type, "Sequence")) {
        json_t *list = json_object_get(pt, "pretokenizers");
        if (!json_is_array(list) || depth > 8)
            return qmix_errf(err, "%s: pre_tokenizer Sequence without a \"pretokenizers\" array", label);
        for (size_t i = 0; i < json_array_size(list); i++)
            if (parse_pre(t, json_array_get(list, i), label, depth + 1, err)) return -1;
        return 0;
    }
    pre_step st = {0};
    if (!strcmp(type, "ByteLevel")) {
        st.byte_level = 1;
        st.add_prefix_space = jtrue(pt, "add_prefix_space");
        json_t *ur = json_object_get(pt, "use_regex");
        if ((!ur || json_is_true(ur)) && compile_regex(GPT2_REGEX, strlen(GPT2_REGEX), &st.re, label, err))
            return -1;
        st.behavior = SPLIT_ISOLATED;
    } else if (!strcmp(type, "Split")) {
        json_t *pat = json_object_get(pt, "pattern");
        json_t *rx = json_object_get(pat, "Regex");
        json_t *lit = json_object_get(pat, "String");
        const char *beh = jstr(pt, "behavior");
        if (!json_is_string(rx) && !json_is_string(lit))
            return qmix_errf(err, "%s: Split pre_tokenizer without a pattern", label);
        if (!beh) return qmix_errf(err, "%s: Split pre_tokenizer without a behavior", label);
        if (!strcmp(beh, "Removed")) st.behavior = SPLIT_REMOVED;
        else if (!strcmp(beh, "Isolated")) st.behavior = SPLIT_ISOLATED;
        else if (!strcmp(beh, "MergedWithPrevious")) st.behavior = SPLIT_MERGED_PREV;
        else if (!strcmp(beh, "MergedWithNext")) st.behavior = SPLIT_MERGED_NEXT;
        else if (!strcmp(beh, "Contiguous")) st.behavior = SPLIT_CONTIGUOUS;
        else return qmix_errf(err, "%s: unknown Split behavior \"%s\"", label, beh);
        st.invert = jtrue(pt, "invert");
        if (json_is_string(rx)) {
            if (compile_regex(json_string_value(rx), json_string_length(rx), &st.re, label, err)) return -1;
        } else {
            /* a literal string: quote it with \Q...\E (no \E inside a tokenizer's literal) */
            const char *s = json_string_value(lit);
            if (strstr(s, "\\E")) return qmix_errf(err, "%s: unsupported Split string pattern", label);
            buf q = {0};
            int bad = buf_put(&q, "\\Q", 2) || buf_put(&q, s, json_string_length(lit)) || buf_put(&q, "\\E", 2);
            if (bad) {
                free(q.p);
                return qmix_errf(err, "%s: out of memory", label);
            }
            int rc = compile_regex(q.p, q.n, &st.re, label, err);
            free(q.p);
            if (rc) return -1;
        }
    } else {
        return qmix_errf(err, "%s: unsupported pre_tokenizer type \"%s\"", label, type);
    }
    if (add_step(t, st)) return qmix_errf(err, "%s: out of memory", label);
    return 0;
}

static int parse_norm(qmix_tokenizer *t, json_t *nm, const char *label, int depth, qmix_err *err)
{
    if (!nm || json_is_null(nm)) return 0;
    const char *type = jstr(nm, "type");
    if (!type) return qmix_errf(err, "%s: normalizer without a \"type\"", label);
    if (!strcmp(type, "Sequence")) {
        json_t *list = json_object_get(nm, "normalizers");
        if (!json_is_array(list) || depth > 8)
            return qmix_errf(err, "%s: normalizer Sequence without a \"normalizers\" array", label);
        for (size_t i = 0; i < json_array_size(list); i++)
            if (parse_norm(t, json_array_get(list, i), label, depth + 1, err)) return -1;
        return 0;
    }
    norm_kind k;
    if (!strcmp(type, "NFC")) k = NORM_NFC;
    else if (!strcmp(type, "NFD")) k = NORM_NFD;
    else if (!strcmp(type, "NFKC")) k = NORM_NFKC;
    else if (!strcmp(type, "NFKD")) k = NORM_NFKD;
    else return qmix_errf(err, "%s: unsupported normalizer type \"%s\"", label, type);
    norm_kind *p = realloc(t->norms, (size_t)(t->n_norms + 1) * sizeof *p);
    if (!p) return qmix_errf(err, "%s: out of memory", label);
    t->norms = p;
    t->norms[t->n_norms++] = k;
    return 0;
}

static int check_decoder(json_t *dec, const char *label, int depth, qmix_err *err)
{
    const char *type = jstr(dec, "type");
    if (type && !strcmp(type, "ByteLevel")) return 1;
    if (type && !strcmp(type, "Sequence") && depth < 8) {
        json_t *list = json_object_get(dec, "decoders");
        int found = 0;
        for (size_t i = 0; i < json_array_size(list); i++) {
            int r = check_decoder(json_array_get(list, i), label, depth + 1, err);
            if (r < 0) return -1;
            found |= r;
        }
        if (found) return 1;
    }
    qmix_errf(err, "%s: unsupported decoder (a ByteLevel decoder is required)", label);
    return -1;
}

static size_t pow2_at_least(size_t n)
{
    size_t p = 16;
    while (p < n) p *= 2;
    return p;
}

/* Registers a spelling for id (vocab or added). */
static int set_token(qmix_tokenizer *t, int32_t id, const char *s, size_t n, const int16_t cp_byte[512],
                     int is_added, int special, const char *label, qmix_err *err)
{
    tok_entry *e = &t->tokens[id];
    size_t slot;
    if (smap_find(t, s, n, &slot)) {
        if (t->smap[slot].id != id && !is_added)
            return qmix_errf(err, "%s: token \"%s\" appears twice in the vocab", label, s);
        t->smap[slot].id = id; /* an added token wins, as in HF */
        e->str = t->smap[slot].str;
    } else {
        uint32_t off = arena_add(t, s, n);
        if (!off) return qmix_errf(err, "%s: out of memory", label);
        t->smap[slot] = (str_slot){off, (uint32_t)n, id};
        e->str = off;
    }
    if (e->present && !is_added) return qmix_errf(err, "%s: id %d is used twice in the vocab", label, (int)id);
    if (spelling_bytes(t, s, n, cp_byte, &e->bytes, &e->nbytes)) return qmix_errf(err, "%s: out of memory", label);
    e->present = 1;
    e->added |= (uint8_t)is_added;
    e->special |= (uint8_t)special;
    if (e->nbytes > t->max_token_bytes) t->max_token_bytes = e->nbytes;
    return 0;
}

static int load_root(qmix_tokenizer *t, json_t *root, const char *label, qmix_err *err)
{
    uint32_t byte_cp[256];
    int16_t cp_byte[512];
    byte_level_tables(byte_cp, cp_byte);

    if (!json_is_object(root)) return qmix_errf(err, "%s: not a JSON object", label);
    json_t *model = json_object_get(root, "model");
    if (!json_is_object(model)) return qmix_errf(err, "%s: no \"model\" object", label);
    const char *mtype = jstr(model, "type");
    if (mtype && strcmp(mtype, "BPE"))
        return qmix_errf(err, "%s: model type \"%s\" is not supported (byte-level BPE only)", label, mtype);
    json_t *vocab = json_object_get(model, "vocab");
    json_t *merges = json_object_get(model, "merges");
    if (!json_is_object(vocab)) return qmix_errf(err, "%s: model has no \"vocab\" object", label);
    if (!json_is_array(merges)) return qmix_errf(err, "%s: model has no \"merges\" array", label);
    if (jtrue(model, "byte_fallback"))
        return qmix_errf(err, "%s: byte_fallback BPE is not supported", label);
    const char *cs = jstr(model, "continuing_subword_prefix"), *ews = jstr(model, "end_of_word_suffix");
    if ((cs && *cs) || (ews && *ews))
        return qmix_errf(err, "%s: continuing_subword_prefix / end_of_word_suffix are not supported", label);
    json_t *dropout = json_object_get(model, "dropout");
    if (json_is_number(dropout) && json_number_value(dropout) > 0)
        return qmix_errf(err, "%s: BPE dropout is not supported", label);
    t->ignore_merges = jtrue(model, "ignore_merges");

    json_t *added = json_object_get(root, "added_tokens");
    if (added && !json_is_null(added) && !json_is_array(added))
        return qmix_errf(err, "%s: \"added_tokens\" is not an array", label);

    /* ids */
    int64_t max_id = -1;
    const char *key;
    json_t *val;
    json_object_foreach(vocab, key, val) {
        if (!json_is_integer(val) || json_integer_value(val) < 0 || json_integer_value(val) >= MAX_VOCAB)
            return qmix_errf(err, "%s: vocab entry \"%s\" has no valid id", label, key);
        if (json_integer_value(val) > max_id) max_id = json_integer_value(val);
    }
    size_t n_added = json_array_size(added);
    for (size_t i = 0; i < n_added; i++) {
        json_t *a = json_array_get(added, i);
        json_t *id = json_object_get(a, "id");
        if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) >= MAX_VOCAB ||
            !json_is_string(json_object_get(a, "content")) || !json_string_length(json_object_get(a, "content")))
            return qmix_errf(err, "%s: added_tokens[%zu] needs an \"id\" and a non-empty \"content\"", label, i);
        if (json_integer_value(id) > max_id) max_id = json_integer_value(id);
    }
    if (max_id < 0) return qmix_errf(err, "%s: empty vocab", label);
    t->n_tokens = (int32_t)(max_id + 1);
    t->tokens = calloc((size_t)t->n_tokens, sizeof *t->tokens);
    size_t n_strings = json_object_size(vocab) + n_added;
    t->smap_mask = pow2_at_least(n_strings * 2) - 1;
    t->smap = calloc(t->smap_mask + 1, sizeof *t->smap);
    t->merge_mask = pow2_at_least(json_array_size(merges) * 2) - 1;
    t->merges = calloc(t->merge_mask + 1, sizeof *t->merges);
    if (!t->tokens || !t->smap || !t->merges || buf_reserve(&t->arena, 16 * n_strings + 16))
        return qmix_errf(err, "%s: out of memory", label);
    t->arena.p[0] = 0;
    t->arena.n = 1;

    json_object_foreach(vocab, key, val) {
        if (set_token(t, (int32_t)json_integer_value(val), key, strlen(key), cp_byte, 0, 0, label, err))
            return -1;
    }

    /* byte tokens */
    for (int b = 0; b < 256; b++) {
        char s[4];
        utf8proc_ssize_t k = utf8proc_encode_char((utf8proc_int32_t)byte_cp[b], (utf8proc_uint8_t *)s);
        t->byte_id[b] = smap_get(t, s, (size_t)k);
        t->byte_cp[b] = byte_cp[b];
    }
    const char *unk = jstr(model, "unk_token");
    t->unk_id = unk ? smap_get(t, unk, strlen(unk)) : -1;

    /* merges */
    buf cat = {0};
    for (size_t r = 0; r < json_array_size(merges); r++) {
        json_t *m = json_array_get(merges, r);
        const char *a, *b;
        size_t na, nb;
        if (json_is_string(m)) {
            a = json_string_value(m);
            const char *sp = strchr(a, ' ');
            if (!sp) {
                free(cat.p);
                return qmix_errf(err, "%s: merges[%zu] \"%s\" is not two tokens separated by a space", label, r, a);
            }
            na = (size_t)(sp - a);
            b = sp + 1;
            nb = strlen(b);
        } else if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
                   json_is_string(json_array_get(m, 1))) {
            a = json_string_value(json_array_get(m, 0));
            na = json_string_length(json_array_get(m, 0));
            b = json_string_value(json_array_get(m, 1));
            nb = json_string_length(json_array_get(m, 1));
        } else {
            free(cat.p);
            return qmix_errf(err, "%s: merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", label, r);
        }
        int32_t ia = smap_get(t, a, na), ib = smap_get(t, b, nb);
        cat.n = 0;
        if (buf_put(&cat, a, na) || buf_put(&cat, b, nb)) {
            free(cat.p);
            return qmix_errf(err, "%s: out of memory", label);
        }
        int32_t im = smap_get(t, cat.p, cat.n);
        if (ia < 0 || ib < 0 || im < 0) {
            qmix_errf(err, "%s: merges[%zu] (\"%.*s\" \"%.*s\") uses a token not in the vocab", label, r,
                      (int)na, a, (int)nb, b);
            free(cat.p);
            return -1;
        }
        merge_put(t, ia, ib, (uint32_t)r, im);
    }
    free(cat.p);

    /* added tokens */
    t->added = calloc(n_added ? n_added : 1, sizeof *t->added);
    if (!t->added) return qmix_errf(err, "%s: out of memory", label);
    for (size_t i = 0; i < n_added; i++) {
        json_t *a = json_array_get(added, i);
        json_t *c = json_object_get(a, "content");
        int32_t id = (int32_t)json_integer_value(json_object_get(a, "id"));
        if (set_token(t, id, json_string_value(c), json_string_length(c), cp_byte, 1, jtrue(a, "special"), label, err))
            return -1;
        added_tok *at = &t->added[t->n_added++];
        at->id = id;
        at->str = t->tokens[id].str;
        at->len = (uint32_t)json_string_length(c);
        at->lstrip = jtrue(a, "lstrip");
        at->rstrip = jtrue(a, "rstrip");
        t->added_first[(unsigned char)json_string_value(c)[0]] = 1;
    }
    /* longest first, so the first match at a position is the longest */
    for (int i = 1; i < t->n_added; i++)
        for (int j = i; j > 0 && t->added[j].len > t->added[j - 1].len; j--) {
            added_tok x = t->added[j];
            t->added[j] = t->added[j - 1];
            t->added[j - 1] = x;
        }

    if (parse_norm(t, json_object_get(root, "normalizer"), label, 0, err)) return -1;
    if (parse_pre(t, json_object_get(root, "pre_tokenizer"), label, 0, err)) return -1;
    json_t *dec = json_object_get(root, "decoder");
    if (check_decoder(dec, label, 0, err) < 0) return -1;

    qmix_tok_specials *sp = &t->specials;
    sp->endoftext = qmix_tok_token_to_id(t, "<|endoftext|>");
    sp->im_start = qmix_tok_token_to_id(t, "<|im_start|>");
    sp->im_end = qmix_tok_token_to_id(t, "<|im_end|>");
    sp->think = qmix_tok_token_to_id(t, "<think>");
    sp->think_end = qmix_tok_token_to_id(t, "</think>");
    sp->tool_call = qmix_tok_token_to_id(t, "<tool_call>");
    sp->tool_call_end = qmix_tok_token_to_id(t, "</tool_call>");
    return 0;
}

int qmix_tok_load_json(const char *json, size_t len, const char *label, qmix_tokenizer **out,
                       qmix_err *err)
{
    *out = NULL;
    json_error_t jerr;
    json_t *root = json_loadb(json, len, JSON_ALLOW_NUL, &jerr);
    if (!root)
        return qmix_errf(err, "%s: malformed JSON at line %d column %d: %s", label, jerr.line,
                         jerr.column, jerr.text);
    qmix_tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        json_decref(root);
        return qmix_errf(err, "%s: out of memory", label);
    }
    pthread_mutex_init(&t->lock, NULL);
    int rc = load_root(t, root, label, err);
    json_decref(root);
    if (!rc) {
        t->md = pcre2_match_data_create(4, NULL);
        t->cache = calloc(CACHE_SLOTS, sizeof *t->cache);
        if (!t->md || !t->cache) rc = qmix_errf(err, "%s: out of memory", label);
    }
    if (rc) {
        qmix_tok_free(t);
        return -1;
    }
    *out = t;
    return 0;
}

int qmix_tok_load(const char *path, qmix_tokenizer **out, qmix_err *err)
{
    *out = NULL;
    size_t plen = strlen(path);
    if (plen > 5 && !strcmp(path + plen - 5, ".gguf")) return qmix_tok_load_gguf(path, out, err);
    char full[4096];
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        snprintf(full, sizeof full, "%s/tokenizer.json", path);
    else
        snprintf(full, sizeof full, "%s", path);
    char *text;
    size_t len;
    if (qmix_read_file(full, MAX_FILE_BYTES, &text, &len, err)) return -1;
    int rc = qmix_tok_load_json(text, len, full, out, err);
    free(text);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Lookups                                                                                      */

int32_t qmix_tok_vocab_size(const qmix_tokenizer *t)
{
    return t->n_tokens;
}

int32_t qmix_tok_token_to_id(const qmix_tokenizer *t, const char *token)
{
    return smap_get(t, token, strlen(token));
}

const char *qmix_tok_id_to_token(const qmix_tokenizer *t, int32_t id)
{
    if (id < 0 || id >= t->n_tokens || !t->tokens[id].present) return NULL;
    return arena_at(t, t->tokens[id].str);
}

const char *qmix_tok_id_bytes(const qmix_tokenizer *t, int32_t id, size_t *len)
{
    if (id < 0 || id >= t->n_tokens || !t->tokens[id].present) return NULL;
    *len = t->tokens[id].nbytes;
    return arena_at(t, t->tokens[id].bytes);
}

int qmix_tok_is_special(const qmix_tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_tokens && t->tokens[id].special;
}

const qmix_tok_specials *qmix_tok_special_ids(const qmix_tokenizer *t)
{
    return &t->specials;
}

/* ------------------------------------------------------------------------------------------ */
/* Encoding                                                                                     */

static int out_push(qmix_tokenizer *t, int32_t id)
{
    if (t->n_out == t->out_cap) {
        size_t cap = t->out_cap ? t->out_cap * 2 : 1024;
        int32_t *p = realloc(t->out, cap * sizeof *p);
        if (!p) return -1;
        t->out = p;
        t->out_cap = cap;
    }
    t->out[t->n_out++] = id;
    return 0;
}

static int scratch_reserve(qmix_tokenizer *t, size_t n)
{
    if (n > t->scratch_cap) {
        size_t cap = pow2_at_least(n);
        int32_t *a = realloc(t->sym_id, cap * sizeof *a);
        if (a) t->sym_id = a;
        int32_t *b = realloc(t->sym_prev, cap * sizeof *b);
        if (b) t->sym_prev = b;
        int32_t *c = realloc(t->sym_next, cap * sizeof *c);
        if (c) t->sym_next = c;
        if (!a || !b || !c) return -1;
        t->scratch_cap = cap;
    }
    if (2 * n > t->heap_cap) {
        size_t cap = pow2_at_least(2 * n);
        heap_item *h = realloc(t->heap, cap * sizeof *h);
        if (!h) return -1;
        t->heap = h;
        t->heap_cap = cap;
    }
    return 0;
}

static inline int heap_less(heap_item a, heap_item b)
{
    return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos);
}

static int heap_push(qmix_tokenizer *t, size_t *n, heap_item x)
{
    if (*n == t->heap_cap) {
        heap_item *h = realloc(t->heap, 2 * t->heap_cap * sizeof *h);
        if (!h) return -1;
        t->heap = h;
        t->heap_cap *= 2;
    }
    heap_item *h = t->heap;
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(x, h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = x;
    return 0;
}

static heap_item heap_pop(qmix_tokenizer *t, size_t *n)
{
    heap_item *h = t->heap, top = h[0], x = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && heap_less(h[c + 1], h[c])) c++;
        if (!heap_less(h[c], x)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
    return top;
}

/* BPE-merges one pre-token's bytes, appending the ids to t->out. */
static int bpe_word(qmix_tokenizer *t, const unsigned char *w, size_t n)
{
    if (t->ignore_merges) { /* a word that is a token is taken whole: look up its spelling */
        buf sp = {0};
        int bad = 0;
        for (size_t i = 0; i < n && !bad; i++) {
            utf8proc_uint8_t c[4];
            utf8proc_ssize_t k = utf8proc_encode_char((utf8proc_int32_t)t->byte_cp[w[i]], c);
            bad = buf_put(&sp, c, (size_t)k);
        }
        int32_t id = bad ? -1 : smap_get(t, sp.p, sp.n);
        free(sp.p);
        if (bad) return -1;
        if (id >= 0) return out_push(t, id);
    }
    if (scratch_reserve(t, n)) return -1;
    int32_t *sid = t->sym_id, *prev = t->sym_prev, *next = t->sym_next;
    /* initial symbols: the byte tokens (bytes without a token become unk, or are dropped) */
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->byte_id[w[i]];
        if (id < 0) id = t->unk_id;
        if (id < 0) continue;
        sid[m] = id;
        prev[m] = (int32_t)m - 1;
        next[m] = (int32_t)m + 1;
        m++;
    }
    if (m == 0) return 0;
    next[m - 1] = -1;
    size_t nh = 0;
    for (size_t i = 0; i + 1 < m; i++) {
        const merge_slot *ms = merge_get(t, sid[i], sid[i + 1]);
        if (ms && heap_push(t, &nh, (heap_item){ms->rank, (uint32_t)i})) return -1;
    }
    while (nh) {
        heap_item top = heap_pop(t, &nh);
        int32_t i = (int32_t)top.pos, j = next[i];
        if (sid[i] < 0 || j < 0) continue;
        const merge_slot *ms = merge_get(t, sid[i], sid[j]);
        if (!ms || ms->rank != top.rank) continue; /* stale */
        sid[i] = ms->id;
        sid[j] = -1;
        next[i] = next[j];
        if (next[j] >= 0) prev[next[j]] = i;
        if (prev[i] >= 0) {
            const merge_slot *l = merge_get(t, sid[prev[i]], sid[i]);
            if (l && heap_push(t, &nh, (heap_item){l->rank, (uint32_t)prev[i]})) return -1;
        }
        if (next[i] >= 0) {
            const merge_slot *r = merge_get(t, sid[i], sid[next[i]]);
            if (r && heap_push(t, &nh, (heap_item){r->rank, (uint32_t)i})) return -1;
        }
    }
    for (int32_t i = 0; i >= 0; i = next[i])
        if (out_push(t, sid[i])) return -1;
    return 0;
}

static void cache_clear(qmix_tokenizer *t)
{
    memset(t->cache, 0, CACHE_SLOTS * sizeof *t->cache);
    t->cache_entries = 0;
    t->cache_bytes.n = 0;
    t->cache_nids = 0;
}

static int bpe_cached(qmix_tokenizer *t, const unsigned char *w, size_t n)
{
    if (n == 1 && t->byte_id[w[0]] >= 0) return out_push(t, t->byte_id[w[0]]);
    if (n > CACHE_MAX_WORD) return bpe_word(t, w, n);
    size_t i = hash_bytes(w, n) & (CACHE_SLOTS - 1);
    for (;; i = (i + 1) & (CACHE_SLOTS - 1)) {
        cache_slot *c = &t->cache[i];
        if (!c->klen) break;
        if (c->klen == n && !memcmp(t->cache_bytes.p + c->key, w, n)) {
            for (uint32_t k = 0; k < c->nids; k++)
                if (out_push(t, t->cache_ids[c->ids + k])) return -1;
            return 0;
        }
    }
    size_t start = t->n_out;
    if (bpe_word(t, w, n)) return -1;
    size_t nids = t->n_out - start;
    if (t->cache_entries >= CACHE_MAX_ENTRIES || t->cache_bytes.n > (1u << 24)) {
        cache_clear(t);
        i = hash_bytes(w, n) & (CACHE_SLOTS - 1);
        while (t->cache[i].klen) i = (i + 1) & (CACHE_SLOTS - 1);
    }
    if (t->cache_nids + nids > t->cache_ids_cap) {
        size_t cap = pow2_at_least(t->cache_nids + nids + 1024);
        int32_t *p = realloc(t->cache_ids, cap * sizeof *p);
        if (!p) return 0; /* caching is optional */
        t->cache_ids = p;
        t->cache_ids_cap = cap;
    }
    uint32_t key = (uint32_t)t->cache_bytes.n;
    if (buf_put(&t->cache_bytes, w, n)) return 0;
    /* a word of bytes without tokens yields no ids: cache_ids may still be NULL then */
    if (nids) memcpy(t->cache_ids + t->cache_nids, t->out + start, nids * sizeof(int32_t));
    t->cache[i] = (cache_slot){key, (uint32_t)n, (uint32_t)t->cache_nids, (uint32_t)nids};
    t->cache_nids += nids;
    t->cache_entries++;
    return 0;
}

/* A span of the working buffer. */
typedef struct span {
    size_t off, len;
    int match;
} span;

typedef struct spans {
    span *p;
    size_t n, cap;
} spans;

static int spans_push(spans *s, size_t off, size_t len)
{
    if (!len) return 0;
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        span *p = realloc(s->p, cap * sizeof *p);
        if (!p) return -1;
        s->p = p;
        s->cap = cap;
    }
    s->p[s->n++] = (span){off, len, 0};
    return 0;
}

static int spans_push_flag(spans *s, size_t off, size_t len, int match)
{
    if (spans_push(s, off, len)) return -1;
    s->p[s->n - 1].match = match;
    return 0;
}

/* Splits one span by a regex step into out, as the Rust crate's Split: the matches and the gaps
 * between them (flags inverted when asked), then combined by the behaviour. */
static int split_span(qmix_tokenizer *t, const pre_step *st, span sp, spans *segs, spans *out)
{
    const char *s = t->split_base + sp.off;
    size_t n = sp.len, pos = 0;
    segs->n = 0;
    while (pos < n) {
        int rc = pcre2_match(st->re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, t->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) return -1;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(t->md);
        size_t ms = ov[0], me = ov[1];
        if (me == ms) { /* an empty match splits nothing: move on one character */
            pos = ms + 1;
            while (pos < n && ((unsigned char)s[pos] & 0xC0) == 0x80) pos++;
            continue;
        }
        if (ms > pos && spans_push_flag(segs, sp.off + pos, ms - pos, 0)) return -1;
        if (spans_push_flag(segs, sp.off + ms, me - ms, 1)) return -1;
        pos = me;
    }
    /* the gap after the last match: positions before pos that are not yet covered */
    size_t covered = segs->n ? segs->p[segs->n - 1].off + segs->p[segs->n - 1].len - sp.off : 0;
    if (covered < n && spans_push_flag(segs, sp.off + covered, n - covered, 0)) return -1;
    if (st->invert)
        for (size_t i = 0; i < segs->n; i++) segs->p[i].match = !segs->p[i].match;
    size_t first = out->n;
    int prev_match = 0;
    switch (st->behavior) {
    case SPLIT_REMOVED:
        for (size_t i = 0; i < segs->n; i++)
            if (!segs->p[i].match && spans_push(out, segs->p[i].off, segs->p[i].len)) return -1;
        break;
    case SPLIT_ISOLATED:
        for (size_t i = 0; i < segs->n; i++)
            if (spans_push(out, segs->p[i].off, segs->p[i].len)) return -1;
        break;
    case SPLIT_MERGED_PREV:
        for (size_t i = 0; i < segs->n; i++) {
            span g = segs->p[i];
            if (g.match && !prev_match && out->n > first) out->p[out->n - 1].len = g.off + g.len - out->p[out->n - 1].off;
            else if (spans_push(out, g.off, g.len)) return -1;
            prev_match = g.match;
        }
        break;
    case SPLIT_MERGED_NEXT: /* walk backwards, then restore the order */
        for (size_t i = segs->n; i-- > 0;) {
            span g = segs->p[i];
            if (g.match && !prev_match && out->n > first) {
                span *l = &out->p[out->n - 1];
                l->len = l->off + l->len - g.off;
                l->off = g.off;
            } else if (spans_push(out, g.off, g.len)) {
                return -1;
            }
            prev_match = g.match;
        }
        for (size_t i = first, j = out->n; i + 1 < j; i++, j--) {
            span x = out->p[i];
            out->p[i] = out->p[j - 1];
            out->p[j - 1] = x;
        }
        break;
    case SPLIT_CONTIGUOUS:
        for (size_t i = 0; i < segs->n; i++) {
            span g = segs->p[i];
            if (g.match == prev_match && out->n > first) out->p[out->n - 1].len = g.off + g.len - out->p[out->n - 1].off;
            else if (spans_push(out, g.off, g.len)) return -1;
            prev_match = g.match;
        }
        break;
    }
    return 0;
}

/* Pre-tokenizes and BPE-encodes one normalized segment held in work[0..n). */
static int encode_segment(qmix_tokenizer *t, buf *work, size_t n, spans *a, spans *b, spans *segs)
{
    a->n = 0;
    if (spans_push(a, 0, n)) return -1;
    for (int k = 0; k < t->n_steps; k++) {
        const pre_step *st = &t->steps[k];
        if (st->byte_level && st->add_prefix_space) {
            for (size_t i = 0; i < a->n; i++) {
                span sp = a->p[i];
                if (work->p[sp.off] == ' ') continue;
                if (buf_reserve(work, sp.len + 2)) return -1;
                size_t off = work->n;
                work->p[off] = ' ';
                memcpy(work->p + off + 1, work->p + sp.off, sp.len);
                work->n += sp.len + 1;
                a->p[i] = (span){off, sp.len + 1, 0};
            }
        }
        if (!st->re) continue;
        t->split_base = work->p;
        b->n = 0;
        for (size_t i = 0; i < a->n; i++)
            if (split_span(t, st, a->p[i], segs, b)) return -1;
        spans tmp = *a;
        *a = *b;
        *b = tmp;
    }
    for (size_t i = 0; i < a->n; i++)
        if (bpe_cached(t, (const unsigned char *)work->p + a->p[i].off, a->p[i].len)) return -1;
    return 0;
}

static int normalize_into(const qmix_tokenizer *t, const char *s, size_t n, buf *work)
{
    work->n = 0;
    int ascii = 1;
    for (size_t i = 0; i < n && ascii; i++) ascii = (unsigned char)s[i] < 0x80;
    if (!t->n_norms || ascii) return buf_put(work, s, n);
    utf8proc_uint8_t *cur = NULL;
    utf8proc_ssize_t len = (utf8proc_ssize_t)n;
    const utf8proc_uint8_t *src = (const utf8proc_uint8_t *)s;
    for (int k = 0; k < t->n_norms; k++) {
        int opt = UTF8PROC_STABLE;
        switch (t->norms[k]) {
        case NORM_NFC: opt |= UTF8PROC_COMPOSE; break;
        case NORM_NFD: opt |= UTF8PROC_DECOMPOSE; break;
        case NORM_NFKC: opt |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT; break;
        case NORM_NFKD: opt |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT; break;
        }
        utf8proc_uint8_t *dst = NULL;
        utf8proc_ssize_t r = utf8proc_map(src, len, &dst, (utf8proc_option_t)opt);
        free(cur);
        if (r < 0) return -1;
        cur = dst;
        src = dst;
        len = r;
    }
    int rc = buf_put(work, cur, (size_t)len);
    free(cur);
    return rc;
}

/* The leftmost-longest added token in s[from..n): its id, start and end (lstrip/rstrip applied). */
static int find_added(const qmix_tokenizer *t, const char *s, size_t n, size_t from, size_t *ms, size_t *me)
{
    for (size_t i = from; i < n; i++) {
        if (!t->added_first[(unsigned char)s[i]]) continue;
        for (int k = 0; k < t->n_added; k++) {
            const added_tok *a = &t->added[k];
            if (a->len > n - i || memcmp(s + i, arena_at(t, a->str), a->len)) continue;
            size_t st = i, en = i + a->len;
            if (a->lstrip)
                while (st > from && (s[st - 1] == ' ' || (s[st - 1] >= '\t' && s[st - 1] <= '\r'))) st--;
            if (a->rstrip)
                while (en < n && (s[en] == ' ' || (s[en] >= '\t' && s[en] <= '\r'))) en++;
            *ms = st;
            *me = en;
            return a->id;
        }
    }
    return -1;
}

int qmix_tok_encode(qmix_tokenizer *t, const char *text, size_t len, int allow_special,
                    int32_t **ids, size_t *n_ids, qmix_err *err)
{
    *ids = NULL;
    *n_ids = 0;
    buf clean = {0}, work = {0};
    spans a = {0}, b = {0}, segs = {0};
    const char *s = text;
    if (!u8_valid(text, len)) {
        if (buf_put_lossy(&clean, text, len)) return qmix_errf(err, "tokenize: out of memory");
        s = clean.p;
        len = clean.n;
    }
    pthread_mutex_lock(&t->lock);
    t->n_out = 0;
    int rc = 0;
    size_t pos = 0;
    while (pos < len && !rc) {
        size_t ms = len, me = len;
        int32_t id = allow_special && t->n_added ? find_added(t, s, len, pos, &ms, &me) : -1;
        if (id < 0) ms = me = len;
        if (ms > pos) {
            rc = normalize_into(t, s + pos, ms - pos, &work);
            if (!rc) rc = encode_segment(t, &work, work.n, &a, &b, &segs);
        }
        if (!rc && id >= 0) rc = out_push(t, id);
        pos = me;
    }
    if (!rc && t->n_out) {
        *ids = malloc(t->n_out * sizeof **ids);
        if (*ids) {
            memcpy(*ids, t->out, t->n_out * sizeof **ids);
            *n_ids = t->n_out;
        } else {
            rc = -1;
        }
    }
    pthread_mutex_unlock(&t->lock);
    free(clean.p);
    free(work.p);
    free(a.p);
    free(b.p);
    free(segs.p);
    if (rc) return qmix_errf(err, "tokenize: out of memory or regex failure");
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Decoding                                                                                     */

static int decode_impl(const qmix_tokenizer *t, const int32_t *ids, size_t n, int skip_special,
                       int lossy, char **out, size_t *out_len, qmix_err *err)
{
    *out = NULL;
    if (out_len) *out_len = 0;
    buf raw = {0};
    if (buf_reserve(&raw, 1)) return qmix_errf(err, "detokenize: out of memory");
    raw.p[0] = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->n_tokens || !t->tokens[id].present) {
            free(raw.p);
            return qmix_errf(err, "detokenize: id %d is not in the vocabulary (size %d)", (int)id,
                             (int)t->n_tokens);
        }
        if (skip_special && t->tokens[id].special) continue;
        if (buf_put(&raw, arena_at(t, t->tokens[id].bytes), t->tokens[id].nbytes)) {
            free(raw.p);
            return qmix_errf(err, "detokenize: out of memory");
        }
    }
    if (lossy && !u8_valid(raw.p, raw.n)) {
        buf fixed = {0};
        int bad = buf_put_lossy(&fixed, raw.p, raw.n);
        free(raw.p);
        if (bad) {
            free(fixed.p);
            return qmix_errf(err, "detokenize: out of memory");
        }
        raw = fixed;
    }
    *out = raw.p;
    if (out_len) *out_len = raw.n;
    return 0;
}

int qmix_tok_decode(const qmix_tokenizer *t, const int32_t *ids, size_t n, int skip_special,
                    char **out, size_t *out_len, qmix_err *err)
{
    return decode_impl(t, ids, n, skip_special, 1, out, out_len, err);
}

int qmix_tok_decode_raw(const qmix_tokenizer *t, const int32_t *ids, size_t n, int skip_special,
                        char **out, size_t *out_len, qmix_err *err)
{
    return decode_impl(t, ids, n, skip_special, 0, out, out_len, err);
}

void qmix_tok_stream_init(qmix_tok_stream *s, const qmix_tokenizer *tok, int skip_special)
{
    memset(s, 0, sizeof *s);
    s->tok = tok;
    s->skip_special = skip_special;
}

size_t qmix_tok_stream_max(const qmix_tokenizer *t)
{
    return 3 * (t->max_token_bytes + 4);
}

int qmix_tok_stream_push(qmix_tok_stream *s, int32_t id, char *out, size_t cap, size_t *out_len,
                         qmix_err *err)
{
    const qmix_tokenizer *t = s->tok;
    *out_len = 0;
    if (id < 0 || id >= t->n_tokens || !t->tokens[id].present)
        return qmix_errf(err, "detokenize: id %d is not in the vocabulary (size %d)", (int)id, (int)t->n_tokens);
    if (s->skip_special && t->tokens[id].special) return 0;
    const unsigned char *b = (const unsigned char *)arena_at(t, t->tokens[id].bytes);
    size_t n = t->tokens[id].nbytes, i = 0, o = 0;
    if (cap < 3 * (n + 4)) return qmix_errf(err, "detokenize: stream output buffer too small");
    /* first complete (or reject) the held-back sequence: pend is a valid prefix, so the scan of
     * pend + b's first bytes ends at or after it */
    if (s->npend && n) {
        unsigned char tmp[4];
        size_t np = (size_t)s->npend, k = np;
        memcpy(tmp, s->pend, np);
        while (k < 4 && k - np < n) {
            tmp[k] = b[k - np];
            k++;
        }
        int st;
        size_t len = u8_scan(tmp, k, &st);
        if (st == U8_TRUNCATED) { /* still incomplete: all of b joined it */
            memcpy(s->pend, tmp, k);
            s->npend = (int)k;
            *out_len = 0;
            return 0;
        }
        if (st == U8_VALID) {
            memcpy(out + o, tmp, len);
            o += len;
        } else {
            memcpy(out + o, REPLACEMENT, 3);
            o += 3;
        }
        i = len - np;
        s->npend = 0;
    }
    while (i < n) {
        if (b[i] < 0x80) {
            out[o++] = (char)b[i++];
            continue;
        }
        int st;
        size_t len = u8_scan(b + i, n - i, &st);
        if (st == U8_TRUNCATED) {
            memcpy(s->pend, b + i, len);
            s->npend = (int)len;
            i += len;
            break;
        }
        if (st == U8_VALID) memcpy(out + o, b + i, len), o += len;
        else memcpy(out + o, REPLACEMENT, 3), o += 3;
        i += len;
    }
    *out_len = o;
    return 0;
}

size_t qmix_tok_stream_flush(qmix_tok_stream *s, char *out)
{
    if (!s->npend) return 0;
    s->npend = 0; /* a valid prefix cut short is one maximal subpart: one U+FFFD */
    memcpy(out, REPLACEMENT, 3);
    return 3;
}
