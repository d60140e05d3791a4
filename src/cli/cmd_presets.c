#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "formats/config.h"
#include "quant/quantize.h"
#include "quant/recipe.h"

static void usage(FILE *out)
{
    fprintf(out, "usage: qmix presets [--config CONFIG.json] [--show NAME]\n\n"
                 "Lists the built-in quantization recipes, each with its bits per weight as mlx-lm\n"
                 "computes it, on the Qwen3.5-35B-A3B text model (40 layers, 256 experts) or on the\n"
                 "geometry of --config. --show NAME prints a preset's recipe text (a valid recipe\n"
                 "file, see docs/recipes.md).\n");
}

/* Qwen3.5-35B-A3B text geometry (spec/quant-formats.md §0.2). */
static void geometry_35b(qmix_config *c)
{
    memset(c, 0, sizeof *c);
    c->hidden_size = 2048;
    c->n_layers = 40;
    c->vocab_size = 248320;
    c->n_heads = 16;
    c->n_kv_heads = 2;
    c->head_dim = 256;
    c->lin_n_k_heads = 16;
    c->lin_n_v_heads = 32;
    c->lin_k_head_dim = 128;
    c->lin_v_head_dim = 128;
    c->conv_kernel = 4;
    c->n_experts = 256;
    c->n_experts_used = 8;
    c->moe_ffn = 512;
    c->shared_ffn = 512;
    for (int i = 0; i < c->n_layers; i++) c->layer_is_full[i] = (i + 1) % 4 == 0;
}

int qmix_cmd_presets(int argc, char **argv)
{
    const char *config = NULL, *show = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--config")) {
            if (!(config = cli_value("presets", argc, argv, &i))) return 2;
        } else if (!strcmp(argv[i], "--show")) {
            if (!(show = cli_value("presets", argc, argv, &i))) return 2;
        } else {
            fprintf(stderr, "qmix presets: unexpected argument '%s' (see --help)\n", argv[i]);
            return 2;
        }
    }
    if (show) {
        const char *t = qmix_recipe_preset_text(show);
        if (!t) {
            fprintf(stderr, "qmix presets: unknown preset '%s'\n", show);
            return 1;
        }
        fputs(t, stdout);
        return 0;
    }
    qmix_config cfg;
    qmix_err err;
    if (config) {
        if (qmix_config_load(config, &cfg, &err)) {
            fprintf(stderr, "qmix presets: %s\n", err.msg);
            return 1;
        }
    } else {
        geometry_35b(&cfg);
    }
    printf("bits per weight (mlx-lm's count) on %s, text model:\n\n",
           config ? config : "Qwen3.5-35B-A3B");
    for (int i = 0; qmix_recipe_preset_names[i]; i++) {
        const char *name = qmix_recipe_preset_names[i];
        qmix_recipe r;
        qmix_quant_report rep;
        if (qmix_recipe_preset(name, &r, &err) || qmix_quant_estimate(&cfg, &r, &rep, &err)) {
            fprintf(stderr, "qmix presets: %s\n", err.msg);
            return 1;
        }
        char hb[32];
        cli_human_bytes((double)rep.bytes, hb, sizeof hb);
        printf("%-12s %6.3f bpw  %10s  %s\n", name, rep.bpw, hb, qmix_recipe_preset_summary(name));
    }
    return 0;
}
