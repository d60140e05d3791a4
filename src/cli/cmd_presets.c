#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "model/geometry.h"
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

/* Qwen3.5-35B-A3B text geometry. */
static void geometry_35b(qmix_config *c)
{
    qmix_geometry_config(qmix_geometry_find("35b-a3b"), c);
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
