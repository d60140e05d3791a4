/* `qmix quantize --budget/--memory/--bpw`: the allocation half of the quantize command. */
#ifndef QMIX_CLI_QUANTIZE_BUDGET_H
#define QMIX_CLI_QUANTIZE_BUDGET_H

#include <stdint.h>

#include "quant/quantize.h"

typedef struct budget_args {
    uint64_t budget;            /* --budget: weights + runtime at ctx */
    uint64_t memory, reserve;   /* --memory/--reserve */
    double bpw;                 /* --bpw */
    int ctx, kv_bits, vision, threads;
    const char *calib, *tokens;  /* calibration text / ids */
    const char *sensitivity[9];  /* saved `qmix sensitivity --json`, one per (group, method) */
    int n_sensitivity;
    int calib_ctx, calib_windows;
    int cand_bits[6], n_cand;   /* candidate bits (default 2,3,4,6,8; GGUF 2,3,4,5,6,8) */
    int cand_given;             /* --candidates was given */
    int gguf;                   /* --format gguf: candidates are the GGUF block types the
                                   writer gives each width, measured and sized as written */
    int groups[3], n_groups;    /* candidate group sizes (--group; default 32, 64 and 128 when
                                   measuring, MLX/GPTQ): each is measured */
    int group_given;            /* --group (or quantize's --group-size) was given */
    int methods[3], n_methods;  /* candidate methods (--methods rtn,gptq; default rtn) */
    const char *stats;          /* --stats: qmix calibrate's statistics for gptq/imatrix */
    int bands;                  /* layer bands per role (1: per role) */
    int min_bits[32];           /* per role; 0: none */
    uint32_t keep_roles;        /* bit r: keep role r at 16 bits */
    const char *fixed;          /* recipe file whose rules override the allocation */
    const char *recipe_out;
    int dry_run, verify, json;
    int refine;                 /* rounds of measured refinement (needs calibration tokens) */
    int sample;                 /* sensitivity sampling (layers, experts); -1: by model size */
} budget_args;

/* Parses one budget flag at argv[*i] (consuming its value): 1 if it was one, 0 if not, -1 after
 * printing an error. */
int budget_option(int argc, char **argv, int *i, budget_args *b);
void budget_defaults(budget_args *b);
int budget_requested(const budget_args *b);
extern const char budget_help[];
/* Allocates, writes the recipe, quantizes IN into OUT with it (unless dry_run) and verifies. */
int quantize_with_budget(const char *in, const char *out, const budget_args *b,
                         qmix_quant_opts *o);

/* --format gguf (cmd_quantize_gguf.c): the recipe r with o's method inputs (imatrix, calib,
 * progress) as a GGUF file out. Prints its own errors; returns the exit status. */
int quantize_to_gguf(const char *in, const char *out, const qmix_recipe *r,
                     const qmix_quant_opts *o);
/* What a GGUF write produced: bpw, size, types and bytes by role, and what could not be written
 * as asked (llama-quantize's fallbacks), under the line `what`. */
struct qmix_gguf_export_report;
void cli_print_gguf_report(const char *what, const struct qmix_gguf_export_report *rep, int imatrix);

#endif
