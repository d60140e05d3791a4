/* The published geometries of the Qwen3.5-MoE family (and a tiny one for tests), shared by
 * `qmix synth`, `qmix presets` and anything that plans for a model it has not loaded. */
#ifndef QMIX_MODEL_GEOMETRY_H
#define QMIX_MODEL_GEOMETRY_H

#include "qmix.h"

typedef struct qmix_geometry {
    const char *like;
    int D, L, V;
    int H, KV, hd;
    int nk, nv, dk, dv, Kc;
    int E, topk, F, Fs;
    int eos, image_tok, video_tok, vis_start, vis_end;
    double theta;
} qmix_geometry;

/* "35b-a3b", "122b-a10b", "397b-a17b" or "tiny"; NULL for anything else. */
const qmix_geometry *qmix_geometry_find(const char *like);
/* The text config of a geometry (3 linear : 1 full layers, partial rotary 0.25). */
void qmix_geometry_config(const qmix_geometry *g, qmix_config *cfg);

#endif
