#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "formats/gguf.h"
#include "model/model.h"
#include "model/roles.h"
#include "quant/ggml_blocks.h"
#include "quant/quantize.h"

static void usage(FILE *out)
{
    fprintf(out, "usage: qmix info MODEL\n\n"
                 "Prints the architecture, the layer pattern, and parameter counts and bytes by tensor\n"
                 "role (every tensor in the checkpoint, vision and MTP included).\n");
}

static void gguf_summary(const qmix_model *m)
{
    uint64_t n = qmix_gguf_tensor_count(m->gguf), count[QMIX_GGML_TYPE_LIMIT] = {0};
    uint64_t params[QMIX_GGML_TYPE_LIMIT] = {0}, bytes[QMIX_GGML_TYPE_LIMIT] = {0}, tp = 0, tb = 0;
    for (uint64_t i = 0; i < n; i++) {
        const qmix_gguf_tensor *t = qmix_gguf_tensor_at(m->gguf, i);
        uint64_t e = (uint64_t)t->ne[0] * (uint64_t)t->ne[1] * (uint64_t)t->ne[2] * (uint64_t)t->ne[3];
        count[t->type]++;
        params[t->type] += e;
        bytes[t->type] += t->nbytes;
        tp += e;
        tb += t->nbytes;
    }
    printf("files        %d GGUF file(s), %llu tensors\n", qmix_gguf_file_count(m->gguf),
           (unsigned long long)n);
    printf("\n%-20s %8s %16s %12s\n", "ggml type", "tensors", "parameters", "bytes");
    char hb[32];
    for (int t = 0; t < QMIX_GGML_TYPE_LIMIT; t++) {
        if (!count[t]) continue;
        cli_human_bytes((double)bytes[t], hb, sizeof hb);
        printf("%-20s %8llu %16llu %12s\n", qmix_ggml_type_name(t), (unsigned long long)count[t],
               (unsigned long long)params[t], hb);
    }
    cli_human_bytes((double)tb, hb, sizeof hb);
    printf("%-20s %8llu %16llu %12s\n", "total", (unsigned long long)n, (unsigned long long)tp, hb);
    if (tp) printf("bits per weight %.3f\n", 8.0 * (double)tb / (double)tp);
    cli_human_bytes((double)qmix_model_decode_bytes(m), hb, sizeof hb);
    printf("\nweights read per decoded token: %s (top-%d of %d experts)\n", hb,
           m->cfg.n_experts_used, m->cfg.n_experts);
}

int qmix_cmd_info(int argc, char **argv)
{
    const char *model_path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
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
        usage(stderr);
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
    printf("model        %s\n", model_path);
    printf("architecture Qwen3.5-MoE (hybrid Gated DeltaNet + gated attention, routed experts)\n");
    printf("layers       %d: %d Gated DeltaNet (L), %d full attention (F)\n", c->n_layers,
           c->n_layers - n_full, n_full);
    printf("pattern      %s\n", pattern);
    printf("hidden       %d, vocab %d, rms_eps %g, %s embeddings\n", c->hidden_size, c->vocab_size,
           c->rms_eps, c->tie_embeddings ? "tied" : "untied");
    printf("attention    %d heads / %d kv heads x %d, rotary %d dims, theta %g\n", c->n_heads,
           c->n_kv_heads, c->head_dim, c->rot_dim, c->rope_theta);
    printf("deltanet     %d key heads x %d, %d value heads x %d, conv kernel %d\n",
           c->lin_n_k_heads, c->lin_k_head_dim, c->lin_n_v_heads, c->lin_v_head_dim,
           c->conv_kernel);
    printf("moe          %d experts, top-%d, expert ffn %d, shared expert ffn %d (%s layout)\n",
           c->n_experts, c->n_experts_used, c->moe_ffn, c->shared_ffn,
           m->experts_fused ? "fused 3-D" : "per-expert");
    printf("mtp          %d layer(s)\n", c->mtp_layers);
    if (m->gguf) { /* GGUF: tensors by ggml type (its names are not HF's, so no role table) */
        gguf_summary(m);
        qmix_model_close(m);
        return 0;
    }
    printf("files        %d shard(s), %llu tensors\n", qmix_st_file_count(m->store),
           (unsigned long long)qmix_st_count(m->store));

    uint64_t params[QMIX_ROLE_COUNT] = {0}, bytes[QMIX_ROLE_COUNT] = {0}, tensors[QMIX_ROLE_COUNT] = {0};
    uint64_t total_p = 0, total_b = 0;
    char dtypes[QMIX_ROLE_COUNT][QMIX_DTYPE_COUNT] = {{0}};
    for (uint64_t i = 0; i < qmix_st_count(m->store); i++) {
        const qmix_tensor *t = qmix_st_at(m->store, i);
        qmix_role r = qmix_role_of(t->name);
        uint64_t n = 1;
        for (int d = 0; d < t->ndim; d++) n *= (uint64_t)t->shape[d];
        params[r] += n;
        bytes[r] += t->nbytes;
        tensors[r]++;
        dtypes[r][t->dtype] = 1;
        total_p += n;
        total_b += t->nbytes;
    }
    printf("\n%-20s %8s %16s %12s  %s\n", "role", "tensors", "parameters", "bytes", "dtypes");
    for (int r = 0; r < QMIX_ROLE_COUNT; r++) {
        if (!tensors[r]) continue;
        char hb[32], dt[64] = "";
        cli_human_bytes((double)bytes[r], hb, sizeof hb);
        for (int d = 0; d < QMIX_DTYPE_COUNT; d++)
            if (dtypes[r][d]) {
                if (dt[0]) strcat(dt, ",");
                strcat(dt, qmix_dtype_name((qmix_dtype)d));
            }
        printf("%-20s %8llu %16llu %12s  %s\n", qmix_role_name((qmix_role)r),
               (unsigned long long)tensors[r], (unsigned long long)params[r], hb, dt);
    }
    char hb[32], hd[32];
    cli_human_bytes((double)total_b, hb, sizeof hb);
    printf("%-20s %8llu %16llu %12s\n", "total", (unsigned long long)qmix_st_count(m->store),
           (unsigned long long)total_p, hb);
    double bpw;
    uint64_t bpw_params, bpw_bytes;
    if (!qmix_store_bpw(m->store, m->qconfig, &bpw, &bpw_params, &bpw_bytes, &err))
        printf("bits per weight %.3f (mlx-lm's count: %llu bytes over %llu parameters)\n", bpw,
               (unsigned long long)bpw_bytes, (unsigned long long)bpw_params);
    cli_human_bytes((double)qmix_model_decode_bytes(m), hd, sizeof hd);
    printf("\nweights read per decoded token: %s (top-%d of %d experts)\n", hd, c->n_experts_used,
           c->n_experts);
    qmix_model_close(m);
    return 0;
}
