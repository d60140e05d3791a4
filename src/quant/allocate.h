/* Bit allocation for a byte budget (`qmix quantize --budget`): every tensor group (a role, or a
 * role in a band of layers) has candidate settings, each with the bytes it would be written in
 * and the end-to-end KLD measured when that group alone is quantized so. Choose one setting per
 * group to minimise the predicted loss Σ KLD subject to Σ bytes ≤ budget: a knapsack, solved
 * greedily by the best marginal KLD reduction per extra byte (a group may jump past settings that
 * buy less per byte). Pure logic: no model, no I/O. */
#ifndef QMIX_QUANT_ALLOCATE_H
#define QMIX_QUANT_ALLOCATE_H

#include <stddef.h>
#include <stdint.h>

#include "model/roles.h"
#include "qmix.h"

/* keep + 6 widths × 9 (group size, method) variants, and room to spare */
#define QMIX_ALLOC_MAX_OPTS 64

typedef struct qmix_alloc_opt {
    int bits;          /* 0: keep (16-bit) */
    int group;         /* group size; 0: the allocation's default */
    int method;        /* QMIX_METHOD_* (quant/recipe.h); 0 or RTN: no method= in the recipe */
    uint64_t bytes;    /* what the group is written in with this setting */
    double kld;        /* predicted loss: KLD with only this group so quantized (keep: 0) */
} qmix_alloc_opt;

typedef struct qmix_alloc_group {
    qmix_role role;
    uint32_t also;           /* bit r: role r shares the group's setting (modules a consumer
                                fuses); its bytes and loss are in the options */
    int layer_lo, layer_hi;  /* the band of layers; -1, -1: every layer of the role */
    int n_opts;
    qmix_alloc_opt opt[QMIX_ALLOC_MAX_OPTS];
    int choice;              /* out: the chosen index into opt */
} qmix_alloc_group;

/* Chooses g[i].choice for every group so that Σ bytes ≤ budget. Starts every group at its
 * cheapest setting, then repeatedly takes the upgrade (group, setting) with the largest KLD
 * reduction per extra byte that still fits. Returns 0, or -1 with err (naming the smallest
 * possible size) when even the cheapest settings exceed the budget. */
int qmix_allocate(qmix_alloc_group *g, int n, uint64_t budget, qmix_err *err);

/* Σ bytes and Σ kld of the chosen settings. */
uint64_t qmix_alloc_bytes(const qmix_alloc_group *g, int n);
double qmix_alloc_kld(const qmix_alloc_group *g, int n);

/* Merges the groups of the roles in `roles` that cover the same layers into one (the first),
 * whose settings are those every member can take (same bits, group size and method), bytes
 * and loss summed: for consumers that fuse those modules and need one setting. Returns the new
 * number of groups (g compacted, order kept). */
int qmix_alloc_link(qmix_alloc_group *g, int n, uint32_t roles);

/* The allocation as recipe text (docs/recipes.md format): one rule per group, at its setting's
 * group size (group_size where that is 0), after the header comment lines. -1 with err if buf is too small. */
int qmix_alloc_recipe(const qmix_alloc_group *g, int n, int group_size, const char *header,
                      char *buf, size_t len, qmix_err *err);

#endif
