#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "formats/gguf.h"
#include "model/model.h"
#include "model/roles.h"
#include "quant/ggml_blocks.h"
#include "quant/gptq_format.h"
#include "quant/quantize.h"

static void usage(FILE *out)
{
    fprintf(out, "usage: qmix info MODEL [--json]\n\n"
                 "Prints the architecture, the layer pattern, and by tensor role: parameters (real\n"
                 "weights, not packed words), the precision each role is stored in (bits and group\n"
                 "size, a GGUF block type, or a float type), bytes and bits per weight. Every tensor\n"
                 "in the checkpoint is counted (vision and MTP included).\n\n"
                 "  --json   the same as one JSON object on stdout\n");
}

#define MAX_LABELS 8

/* One role's row: what the bound matrices say (precision, real parameters) and what the files
 * hold (tensors, bytes, dtypes). */
typedef struct role_row {
    uint64_t tensors, file_params, bytes;
    uint64_t mat_params, mat_bytes, n_mats;
    char dtypes[QMIX_DTYPE_COUNT];
    char labels[MAX_LABELS][24];
    uint64_t label_params[MAX_LABELS];
    int n_labels;
} role_row;

static void precision_label(const qk_mat *w, char *buf, size_t len)
{
    if (w->dtype == QMIX_U8) snprintf(buf, len, "%s", qmix_ggml_type_name(w->ggml_type));
    else if (w->dtype == QMIX_U32) snprintf(buf, len, "%d-bit g%d", w->bits, w->group_size);
    else snprintf(buf, len, "%s", qmix_dtype_name(w->dtype));
}

static void add_matrix(void *user, qmix_role role, int layer, int expert, const qk_mat *w)
{
    role_row *r = (role_row *)user + role;
    uint64_t params = (uint64_t)w->rows * (uint64_t)w->cols;
    r->mat_params += params;
    r->mat_bytes += qmix_mat_bytes(w);
    r->n_mats++;
    char label[24];
    precision_label(w, label, sizeof label);
    int i = 0;
    while (i < r->n_labels && strcmp(r->labels[i], label)) i++;
    if (i == r->n_labels) {
        if (r->n_labels == MAX_LABELS) return;
        snprintf(r->labels[r->n_labels++], sizeof r->labels[0], "%s", label);
    }
    r->label_params[i] += params;
}

/* "2-bit g64" or "2-bit g64 (67%), 3-bit g64": the precisions of a role, largest share first. */
static void role_precision(const role_row *r, char *buf, size_t len)
{
    int order[MAX_LABELS];
    for (int i = 0; i < r->n_labels; i++) order[i] = i;
    for (int i = 1; i < r->n_labels; i++)
        for (int j = i; j > 0 && r->label_params[order[j]] > r->label_params[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    size_t off = 0;
    buf[0] = 0;
    for (int i = 0; i < r->n_labels && off < len; i++) {
        const int k = order[i];
        if (r->n_labels == 1)
            off += (size_t)snprintf(buf + off, len - off, "%s", r->labels[k]);
        else
            off += (size_t)snprintf(buf + off, len - off, "%s%s (%.0f%%)", i ? ", " : "",
                                    r->labels[k], 100.0 * (double)r->label_params[k] / (double)r->mat_params);
    }
}

static void dtype_list(const role_row *r, char *buf, size_t len)
{
    buf[0] = 0;
    for (int d = 0; d < QMIX_DTYPE_COUNT; d++)
        if (r->dtypes[d]) {
            size_t off = strlen(buf);
            snprintf(buf + off, len - off, "%s%s", off ? "," : "", qmix_dtype_name((qmix_dtype)d));
        }
}

/* Real parameters of one stored tensor: packed MLX codes count 32/bits weights per word, GPTQ
 * qweight words likewise; scales, biases, zeros and g_idx of a quantized module count none. */
static uint64_t tensor_params(const qmix_model *m, const qmix_tensor *t)
{
    uint64_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= (uint64_t)t->shape[d];
    size_t len = strlen(t->name);
    static const char *aux[] = {".scales", ".biases", ".qzeros", ".g_idx"};
    for (size_t k = 0; k < sizeof aux / sizeof aux[0]; k++) {
        size_t a = strlen(aux[k]);
        if (len > a && !strcmp(t->name + len - a, aux[k])) {
            char sib[600];
            snprintf(sib, sizeof sib, "%.*s%s", (int)(len - a), t->name,
                     k < 2 ? ".weight" : ".qweight");
            const qmix_tensor *w = qmix_st_find(m->store, sib);
            if (w && (w->dtype == QMIX_U32 || w->dtype == QMIX_I32)) return 0;
        }
    }
    /* a GPTQ qweight outside the bound matrices: at the checkpoint's default bits */
    if (len > 8 && !strcmp(t->name + len - 8, ".qweight") && m->gptq && m->gptq->bits > 0)
        return n * 32 / (uint64_t)m->gptq->bits;
    if (t->dtype == QMIX_U32 && m->qconfig) {
        char mod[600];
        if (len > 7 && !strcmp(t->name + len - 7, ".weight")) {
            snprintf(mod, sizeof mod, "%.*s", (int)(len - 7), t->name);
            char sc[620];
            snprintf(sc, sizeof sc, "%s.scales", mod);
            int bits, group;
            qmix_err err;
            if (qmix_qconfig_module(m->qconfig, mod, qmix_st_find(m->store, sc) != NULL, &bits,
                                    &group, &err) > 0 && bits > 0)
                return n * 32 / (uint64_t)bits;
        }
    }
    return n;
}

int qmix_cmd_info(int argc, char **argv)
{
    const char *model_path = NULL;
    int json = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--json")) {
            json = 1;
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "qmix info: unknown option '%s' (see --help)\n", argv[i]);
            return 2;
        } else if (!model_path) {
            model_path = argv[i];
        } else {
            fprintf(stderr, "qmix info: unexpected argument '%s'\n", argv[i]);
            return 2;
        }
    }
    if (!model_path) {
        fprintf(stderr, "qmix info: missing MODEL (a checkpoint directory, .safetensors or .gguf)\n"
                        "usage: qmix info MODEL [--json]   (qmix info --help for more)\n");
        return 2;
    }
    qmix_err err;
    qmix_model *m;
    if (qmix_model_open(model_path, &m, &err)) {
        fprintf(stderr, "qmix info: %s\n", err.msg);
        return 1;
    }
    const qmix_config *c = &m->cfg;
    int n_full = 0;
    char pattern[QMIX_MAX_LAYERS + 1];
    for (int i = 0; i < c->n_layers; i++) {
        pattern[i] = c->layer_is_full[i] ? 'F' : 'L';
        n_full += c->layer_is_full[i];
    }
    pattern[c->n_layers] = 0;

    /* by role: the bound matrices, then the stored tensors (safetensors) or the rest (GGUF) */
    role_row rows[QMIX_ROLE_COUNT];
    memset(rows, 0, sizeof rows);
    qmix_model_for_each_matrix(m, add_matrix, rows);
    uint64_t total_tensors = 0, total_bytes = 0;
    int n_files;
    if (m->gguf) {
        n_files = qmix_gguf_file_count(m->gguf);
        total_tensors = qmix_gguf_tensor_count(m->gguf);
        for (uint64_t i = 0; i < total_tensors; i++) {
            const qmix_gguf_tensor *t = qmix_gguf_tensor_at(m->gguf, i);
            role_row *r = &rows[qmix_role_of_gguf(t->name, c->n_layers)];
            r->tensors++;
            r->bytes += t->nbytes;
            r->file_params += (uint64_t)t->ne[0] * (uint64_t)t->ne[1] * (uint64_t)t->ne[2] *
                              (uint64_t)t->ne[3];
            total_bytes += t->nbytes;
            if (!r->n_mats) { /* roles the forward pass does not bind: their block types */
                char label[24];
                /* float types named as the bound matrices name them (f32, not F32) */
                snprintf(label, sizeof label, "%s",
                         t->type == QMIX_GGML_F32 ? "f32" : t->type == QMIX_GGML_F16 ? "f16" :
                         t->type == QMIX_GGML_BF16 ? "bf16" : qmix_ggml_type_name(t->type));
                int k = 0;
                while (k < r->n_labels && strcmp(r->labels[k], label)) k++;
                if (k == r->n_labels && k < MAX_LABELS) snprintf(r->labels[r->n_labels++], 24, "%s", label);
            }
        }
    } else {
        n_files = qmix_st_file_count(m->store);
        total_tensors = qmix_st_count(m->store);
        for (uint64_t i = 0; i < total_tensors; i++) {
            const qmix_tensor *t = qmix_st_at(m->store, i);
            role_row *r = &rows[qmix_role_of(t->name)];
            r->tensors++;
            r->bytes += t->nbytes;
            r->dtypes[t->dtype] = 1;
            r->file_params += tensor_params(m, t);
            total_bytes += t->nbytes;
        }
    }
    /* a role's parameters: its matrices' where the forward pass binds them (exact in every
     * format, GPTQ modules of other bits included), else the stored tensors' */
    uint64_t total_params = 0;
    for (int r = 0; r < QMIX_ROLE_COUNT; r++) {
        if (rows[r].n_mats) rows[r].file_params = rows[r].mat_params;
        total_params += rows[r].file_params;
    }

    json_t *js = json ? json_object() : NULL, *jroles = json ? json_array() : NULL;
    if (json) {
        json_object_set_new(js, "model", json_string(model_path));
        json_object_set_new(js, "format", json_string(m->gguf ? "gguf" : m->gptq ? "gptq" :
                                                      m->qconfig ? "mlx" : m->mlx_layout ? "mlx" : "hf"));
        json_object_set_new(js, "layers", json_integer(c->n_layers));
        json_object_set_new(js, "pattern", json_string(pattern));
        json_object_set_new(js, "hidden_size", json_integer(c->hidden_size));
        json_object_set_new(js, "vocab_size", json_integer(c->vocab_size));
        json_object_set_new(js, "experts", json_integer(c->n_experts));
        json_object_set_new(js, "experts_per_token", json_integer(c->n_experts_used));
        json_object_set_new(js, "mtp_layers", json_integer(c->mtp_layers));
        json_object_set_new(js, "files", json_integer(n_files));
        json_object_set_new(js, "tensors", json_integer((json_int_t)total_tensors));
    } else {
        printf("model        %s\n", model_path);
        printf("architecture Qwen3.5-MoE (hybrid Gated DeltaNet + gated attention, routed experts)\n");
        printf("layers       %d: %d Gated DeltaNet (L), %d full attention (F)\n", c->n_layers,
               c->n_layers - n_full, n_full);
        printf("pattern      %s\n", pattern);
        printf("hidden       %d, vocab %d, rms_eps %g, %s embeddings\n", c->hidden_size,
               c->vocab_size, c->rms_eps, c->tie_embeddings ? "tied" : "untied");
        printf("attention    %d heads / %d kv heads x %d, rotary %d dims, theta %g\n", c->n_heads,
               c->n_kv_heads, c->head_dim, c->rot_dim, c->rope_theta);
        printf("deltanet     %d key heads x %d, %d value heads x %d, conv kernel %d\n",
               c->lin_n_k_heads, c->lin_k_head_dim, c->lin_n_v_heads, c->lin_v_head_dim,
               c->conv_kernel);
        printf("moe          %d experts, top-%d, expert ffn %d, shared expert ffn %d (%s layout)\n",
               c->n_experts, c->n_experts_used, c->moe_ffn, c->shared_ffn,
               m->gguf ? "GGUF" : m->experts_fused ? "fused 3-D" : "per-expert");
        printf("mtp          %d layer(s)\n", c->mtp_layers);
        printf("files        %d %s file(s), %llu tensors\n", n_files, m->gguf ? "GGUF" : "safetensors",
               (unsigned long long)total_tensors);
        printf("\n%-20s %7s %14s  %-24s %11s %6s %6s\n", "role", "tensors", "parameters",
               "precision", "bytes", "share", "bpw");
    }
    for (int r = 0; r < QMIX_ROLE_COUNT; r++) {
        const role_row *row = &rows[r];
        if (!row->tensors) continue;
        char prec[128], hb[32];
        if (row->n_mats) {
            role_precision(row, prec, sizeof prec);
        } else if (m->gguf) {
            prec[0] = 0;
            for (int k = 0; k < row->n_labels; k++)
                snprintf(prec + strlen(prec), sizeof prec - strlen(prec), "%s%s", k ? "," : "",
                         row->labels[k]);
        } else {
            dtype_list(row, prec, sizeof prec);
        }
        double bpw = row->file_params ? 8.0 * (double)row->bytes / (double)row->file_params : 0;
        const char *name = qmix_role_name((qmix_role)r);
        if (json) {
            json_array_append_new(jroles, json_pack("{s:s, s:I, s:I, s:s, s:I, s:f}", "role", name,
                                                    "tensors", (json_int_t)row->tensors,
                                                    "parameters", (json_int_t)row->file_params,
                                                    "precision", prec, "bytes",
                                                    (json_int_t)row->bytes, "bits_per_weight", bpw));
        } else {
            cli_human_bytes((double)row->bytes, hb, sizeof hb);
            printf("%-20s %7llu %14llu  %-24s %11s %5.1f%% %6.2f\n", name,
                   (unsigned long long)row->tensors, (unsigned long long)row->file_params, prec, hb,
                   total_bytes ? 100.0 * (double)row->bytes / (double)total_bytes : 0, bpw);
        }
    }
    double bpw = total_params ? 8.0 * (double)total_bytes / (double)total_params : 0;
    uint64_t decode = qmix_model_decode_bytes(m);
    if (json) {
        json_object_set_new(js, "roles", jroles);
        json_object_set_new(js, "parameters", json_integer((json_int_t)total_params));
        json_object_set_new(js, "bytes", json_integer((json_int_t)total_bytes));
        json_object_set_new(js, "bits_per_weight", json_real(bpw));
        json_object_set_new(js, "decode_bytes_per_token", json_integer((json_int_t)decode));
        char *s = json_dumps(js, JSON_INDENT(2));
        if (s) puts(s);
        free(s);
        json_decref(js);
    } else {
        char hb[32], hd[32];
        cli_human_bytes((double)total_bytes, hb, sizeof hb);
        printf("%-20s %7llu %14llu  %-24s %11s %6s %6.2f\n", "total",
               (unsigned long long)total_tensors, (unsigned long long)total_params, "", hb, "", bpw);
        printf("bits per weight %.3f (all bytes over real parameters)\n", bpw);
        cli_human_bytes((double)decode, hd, sizeof hd);
        printf("\nweights read per decoded token: %s (top-%d of %d experts)\n", hd,
               c->n_experts_used, c->n_experts);
    }
    qmix_model_close(m);
    return 0;
}
