/* Recipe parsing, the built-in presets, and per-tensor resolution (see recipe.h). */
#include "quant/recipe.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quant/affine.h"
#include "util/err.h"
#include "util/fileio.h"

#define ALL_ROLES ((1u << QMIX_ROLE_COUNT) - 1)

typedef struct preset { const char *name, *summary, *text; } preset;

#define UNIFORM(N)                                                                            \
    "# mlx-lm default predicate: router and shared-expert gate 8-bit\n"                       \
    "default bits=" #N " group=64\nrouter bits=8 group=64\nshared_expert_gate bits=8 group=64\n" \
    "vision keep\nmtp keep\n"

static const preset presets[] = {
    {"dynamic-2.6", "the published 35B-A3B dynamic 2/3-bit MLX recipe for 16 GB machines: experts 2-bit, attention/GDN/shared/embed/head 3-bit, router bf16",
     "# the published 35B-A3B dynamic 2/3-bit MLX recipe for 16 GB machines\n"
     "default bits=2 group=64\n"
     "router keep\n"
     "shared_expert_gate keep\n"
     "embed,lm_head bits=3 group=64\n"
     "shared_expert bits=3 group=64\n"
     "attn_q,attn_k,attn_v,attn_o bits=3 group=64\n"
     "gdn_qkv,gdn_z,gdn_a,gdn_b,gdn_out bits=3 group=64\n"
     "experts_gate_up,experts_down bits=2 group=64\n"
     "vision keep\nmtp keep\n"},
    {"tiered-4.7", "the published 122B-A10B five-tier MLX recipe: bf16/8/6/4/4 bits by role, edge layers (first 3 + last 3) at 8",
     "# the published 122B-A10B five-tier MLX recipe (edge layers = first 3 + last 3)\n"
     "default bits=4 group=64\n"
     "router keep\n"
     "shared_expert_gate keep\n"
     "vision keep\nmtp keep\n"
     "embed,lm_head bits=8 group=64\n"
     "attn_v,attn_o bits=8 group=64\n"
     "attn_q,attn_k bits=6 group=64\n"
     "shared_expert bits=6 group=64\n"
     "gdn_qkv,gdn_z,gdn_a,gdn_b,gdn_out bits=4 group=64\n"
     "experts_gate_up,experts_down bits=4 group=64\n"
     "attn_q,attn_k,attn_v,attn_o,gdn_qkv,gdn_z,gdn_a,gdn_b,gdn_out,shared_expert first=3 last=3 "
     "bits=8 group=64\n"},
    {"unsloth-4", "an Unsloth-dynamic-style GGUF mix: base 4-bit, attention/GDN inputs 6, o_proj/out_proj bf16",
     "# an Unsloth-dynamic-style mix at base 4 bits\n"
     "default bits=4 group=64\n"
     "embed bits=6 group=64\n"
     "lm_head bits=8 group=64\n"
     "attn_q,attn_k,attn_v bits=6 group=64\n"
     "gdn_qkv,gdn_z,gdn_a,gdn_b bits=6 group=64\n"
     "attn_o keep\n"
     "gdn_out keep\n"
     "experts_gate_up bits=4 group=64\n"
     "experts_down bits=5 group=64\n"
     "shared_expert bits=4 group=64\n"
     "shared_expert match=down_proj bits=5 group=64\n"
     "router,shared_expert_gate bits=8 group=64\n"
     "vision keep\nmtp keep\n"},
    {"experts-4", "the published GPTQ 4-bit export for vLLM: routed experts 4-bit group 32, everything else 16-bit",
     "# the published GPTQ 4-bit export for vLLM: routed experts only\n"
     "default keep\n"
     "experts_gate_up,experts_down bits=4 group=32\n"},
    {"uniform-2", "mlx-lm default at 2 bits (router, shared-expert gate 8-bit)", UNIFORM(2)},
    {"uniform-3", "mlx-lm default at 3 bits (router, shared-expert gate 8-bit)", UNIFORM(3)},
    {"uniform-4", "mlx-lm default at 4 bits (router, shared-expert gate 8-bit)", UNIFORM(4)},
    {"uniform-5", "mlx-lm default at 5 bits (router, shared-expert gate 8-bit)", UNIFORM(5)},
    {"uniform-6", "mlx-lm default at 6 bits (router, shared-expert gate 8-bit)", UNIFORM(6)},
    {"uniform-8", "mlx-lm default at 8 bits", UNIFORM(8)},
};
#define N_PRESETS (sizeof presets / sizeof presets[0])

const char *const qmix_recipe_preset_names[] = {
    "dynamic-2.6", "tiered-4.7", "unsloth-4", "experts-4", "uniform-2", "uniform-3",
    "uniform-4",   "uniform-5",  "uniform-6", "uniform-8", NULL};

static const preset *find_preset(const char *name)
{
    for (size_t i = 0; i < N_PRESETS; i++)
        if (!strcmp(presets[i].name, name)) return &presets[i];
    return NULL;
}

const char *qmix_recipe_preset_text(const char *name)
{
    const preset *p = find_preset(name);
    return p ? p->text : NULL;
}

const char *qmix_recipe_preset_summary(const char *name)
{
    const preset *p = find_preset(name);
    return p ? p->summary : NULL;
}

static int parse_int(const char *s, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < 0 || v > 1000000) return -1;
    *out = (int)v;
    return 0;
}

static int role_by_name(const char *s, size_t len)
{
    for (int r = 0; r < QMIX_ROLE_COUNT; r++) {
        const char *n = qmix_role_name((qmix_role)r);
        if (strlen(n) == len && !strncmp(n, s, len)) return r;
    }
    return -1;
}

static int parse_line(char *line, const char *label, int lineno, qmix_recipe_rule *rule,
                      qmix_err *err)
{
    memset(rule, 0, sizeof *rule);
    rule->lo = -1;
    rule->bits = -1;
    int group = 0, keep = 0;
    char *save = NULL;
    char *tok = strtok_r(line, " \t\r", &save);
    /* roles */
    if (!strcmp(tok, "default") || !strcmp(tok, "*") || !strcmp(tok, "all")) {
        rule->roles = ALL_ROLES;
    } else {
        const char *p = tok;
        while (*p) {
            size_t len = strcspn(p, ",");
            int r = role_by_name(p, len);
            if (r < 0 || r == QMIX_ROLE_OTHER)
                return qmix_errf(err, "recipe %s:%d: unknown role '%.*s' (roles: embed, lm_head, "
                                 "attn_q, attn_k, attn_v, attn_o, gdn_qkv, gdn_z, gdn_a, gdn_b, "
                                 "gdn_out, gdn_params, norm, router, shared_expert, "
                                 "shared_expert_gate, experts_gate_up, experts_down, vision, mtp, "
                                 "or default)", label, lineno, (int)len, p);
            rule->roles |= 1u << r;
            p += len;
            if (*p == ',') p++;
        }
    }
    while ((tok = strtok_r(NULL, " \t\r", &save))) {
        char *eq = strchr(tok, '=');
        if (!strcmp(tok, "keep")) {
            keep = 1;
            continue;
        }
        if (!eq) return qmix_errf(err, "recipe %s:%d: expected KEY=VALUE or 'keep', got '%s'",
                                  label, lineno, tok);
        *eq = 0;
        const char *k = tok, *v = eq + 1;
        int x;
        if (!strcmp(k, "bits")) {
            if (parse_int(v, &x) || !qmix_affine_valid(x, 64))
                return qmix_errf(err, "recipe %s:%d: bits=%s: expected 2, 3, 4, 5, 6 or 8", label,
                                 lineno, v);
            rule->bits = x;
        } else if (!strcmp(k, "group")) {
            if (parse_int(v, &x) || !qmix_affine_valid(4, x))
                return qmix_errf(err, "recipe %s:%d: group=%s: expected 32, 64 or 128", label,
                                 lineno, v);
            group = x;
        } else if (!strcmp(k, "layers")) {
            char *dash = strchr(v, '-');
            int lo, hi;
            if (dash) {
                *dash = 0;
                if (parse_int(v, &lo) || parse_int(dash + 1, &hi) || hi < lo)
                    return qmix_errf(err, "recipe %s:%d: layers=: expected N or A-B with A <= B",
                                     label, lineno);
            } else if (parse_int(v, &lo)) {
                return qmix_errf(err, "recipe %s:%d: layers=%s: expected N or A-B", label, lineno,
                                 v);
            } else {
                hi = lo;
            }
            rule->lo = lo;
            rule->hi = hi;
        } else if (!strcmp(k, "first") || !strcmp(k, "last")) {
            if (parse_int(v, &x) || x < 1)
                return qmix_errf(err, "recipe %s:%d: %s=%s: expected a positive layer count", label,
                                 lineno, k, v);
            if (k[0] == 'f') rule->first = x;
            else rule->last = x;
        } else if (!strcmp(k, "type")) {
            if (!strcmp(v, "full")) rule->type = QMIX_LAYERS_FULL;
            else if (!strcmp(v, "linear")) rule->type = QMIX_LAYERS_LINEAR;
            else return qmix_errf(err, "recipe %s:%d: type=%s: expected full or linear", label,
                                  lineno, v);
        } else if (!strcmp(k, "match")) {
            if (!*v || strlen(v) >= sizeof rule->match)
                return qmix_errf(err, "recipe %s:%d: match= needs a substring of at most %zu "
                                 "characters", label, lineno, sizeof rule->match - 1);
            strcpy(rule->match, v);
        } else if (!strcmp(k, "method")) {
            rule->method = qmix_method_parse(v);
            if (rule->method <= QMIX_METHOD_DEFAULT)
                return qmix_errf(err, "recipe %s:%d: method=%s: expected rtn, gptq, imatrix or "
                                  "awq", label, lineno, v);
        } else {
            return qmix_errf(err, "recipe %s:%d: unknown key '%s' (bits, group, layers, first, "
                             "last, type, match, method)", label, lineno, k);
        }
    }
    if (keep && (rule->bits >= 0 || group || rule->method))
        return qmix_errf(err, "recipe %s:%d: 'keep' cannot be combined with bits/group/method", label,
                         lineno);
    if (!keep && rule->bits < 0)
        return qmix_errf(err, "recipe %s:%d: missing bits=N (or keep)", label, lineno);
    if (keep) rule->bits = 0;
    rule->group = keep ? 0 : group ? group : 64;
    return 0;
}

int qmix_recipe_parse(const char *text, const char *label, qmix_recipe *out, qmix_err *err)
{
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "%s", label);
    int lineno = 0;
    const char *p = text;
    while (*p) {
        lineno++;
        size_t len = strcspn(p, "\n");
        char line[1024];
        if (len >= sizeof line)
            return qmix_errf(err, "recipe %s:%d: line too long", label, lineno);
        memcpy(line, p, len);
        line[len] = 0;
        p += len;
        if (*p == '\n') p++;
        char *hash = strchr(line, '#');
        if (hash) *hash = 0;
        char *s = line;
        while (*s == ' ' || *s == '\t' || *s == '\r') s++;
        if (!*s) continue;
        if (out->n_rules == (int)(sizeof out->rules / sizeof out->rules[0]))
            return qmix_errf(err, "recipe %s:%d: too many rules (at most %zu)", label, lineno,
                             sizeof out->rules / sizeof out->rules[0]);
        if (parse_line(s, label, lineno, &out->rules[out->n_rules], err)) return -1;
        out->n_rules++;
    }
    if (!out->n_rules) return qmix_errf(err, "recipe %s: no rules", label);
    return 0;
}

int qmix_recipe_load(const char *path, qmix_recipe *out, qmix_err *err)
{
    char *text;
    if (qmix_read_file(path, 1u << 20, &text, NULL, err)) return -1;
    int rc = qmix_recipe_parse(text, path, out, err);
    free(text);
    return rc;
}

int qmix_recipe_preset(const char *name, qmix_recipe *out, qmix_err *err)
{
    const preset *p = find_preset(name);
    if (!p)
        return qmix_errf(err, "unknown preset '%s' (presets: dynamic-2.6, tiered-4.7, unsloth-4, "
                         "experts-4, uniform-2, uniform-3, uniform-4, uniform-5, uniform-6, "
                         "uniform-8)", name);
    return qmix_recipe_parse(p->text, p->name, out, err);
}

int qmix_recipe_get(const char *name_or_file, qmix_recipe *out, qmix_err *err)
{
    if (find_preset(name_or_file)) return qmix_recipe_preset(name_or_file, out, err);
    FILE *f = fopen(name_or_file, "r");
    if (!f) {
        /* something that looks like a path is a missing file, not an unknown preset */
        size_t n = strlen(name_or_file);
        if (strchr(name_or_file, '/') || (n > 7 && !strcmp(name_or_file + n - 7, ".recipe")))
            return qmix_errf(err, "recipe file '%s': %s", name_or_file, strerror(errno));
        return qmix_errf(err, "unknown preset '%s', and no recipe file of that name (presets: "
                         "dynamic-2.6, tiered-4.7, unsloth-4, experts-4, uniform-2 … uniform-8; "
                         "qmix presets shows them)", name_or_file);
    }
    fclose(f);
    return qmix_recipe_load(name_or_file, out, err);
}

void qmix_recipe_set_group(qmix_recipe *r, int group)
{
    for (int i = 0; i < r->n_rules; i++)
        if (r->rules[i].bits) r->rules[i].group = group;
}

static int rule_matches(const qmix_recipe_rule *ru, qmix_role role, const char *name, int layer,
                        int is_full, int n_layers)
{
    if (!(ru->roles & (1u << role))) return 0;
    if (ru->match[0] && !strstr(name, ru->match)) return 0;
    if (ru->lo >= 0 || ru->first || ru->last || ru->type) {
        if (layer < 0) return 0;
        if (ru->lo >= 0 && (layer < ru->lo || layer > ru->hi)) return 0;
        if (ru->first || ru->last) {
            int in = (ru->first && layer < ru->first) ||
                     (ru->last && layer >= n_layers - ru->last);
            if (!in) return 0;
        }
        if (ru->type == QMIX_LAYERS_FULL && !is_full) return 0;
        if (ru->type == QMIX_LAYERS_LINEAR && is_full) return 0;
    }
    return 1;
}

qmix_qdecision qmix_recipe_resolve(const qmix_recipe *r, const char *name, int ndim,
                                   const int64_t *shape, int layer_is_full, int n_layers)
{
    qmix_qdecision d = {.role = qmix_role_of(name)};
    if (d.role == QMIX_ROLE_NORM || d.role == QMIX_ROLE_GDN_PARAMS) return d;
    int experts = d.role == QMIX_ROLE_EXPERTS_GATE_UP || d.role == QMIX_ROLE_EXPERTS_DOWN;
    if (!(ndim == 2 || (ndim == 3 && experts))) return d;
    int layer = qmix_layer_of(name);
    for (int i = 0; i < r->n_rules; i++) {
        const qmix_recipe_rule *ru = &r->rules[i];
        if (rule_matches(ru, d.role, name, layer, layer_is_full, n_layers)) {
            d.bits = ru->bits;
            d.group = ru->group;
            d.method = ru->method;
        }
    }
    if (d.bits && (shape[ndim - 1] % d.group || !qmix_affine_valid(d.bits, d.group))) d.bits = 0;
    if (!d.bits) d.group = d.method = 0;
    return d;
}

static const char *const method_names[] = {"default", "rtn", "gptq", "imatrix", "awq"};

const char *qmix_method_name(int method)
{
    return method >= 0 && method <= QMIX_METHOD_AWQ ? method_names[method] : "unknown";
}

int qmix_method_parse(const char *name)
{
    for (int m = QMIX_METHOD_RTN; m <= QMIX_METHOD_AWQ; m++)
        if (!strcmp(name, method_names[m])) return m;
    return -1;
}
