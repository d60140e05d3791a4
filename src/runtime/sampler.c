#include "runtime/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { SEEN_PROMPT = 1, SEEN_OUTPUT = 2 };

typedef struct cand_t { float prob; int32_t id; } cand_t;

#define N_BUCKETS 1024 /* probability buckets of 2^(1/16) down to 2^-64 */

struct qmix_sampler {
    qmix_sampling p;
    int n_vocab;
    uint64_t rng;
    uint32_t *out_count;  /* [V] occurrences among generated tokens */
    uint8_t *seen;        /* [V] SEEN_* flags */
    int32_t *seen_ids;    /* distinct seen tokens, so penalties cost O(seen), not O(V) */
    int n_seen;
    float *logits;        /* [V] penalised copy */
    float *prob;          /* [V] candidate probabilities */
    int32_t *cand;        /* [V] candidate ids */
    cand_t *sorted;       /* [V] top-p scratch */
    uint16_t *bucket;     /* [V] top-p scratch */
};

qmix_sampling qmix_sampling_greedy(void)
{
    return (qmix_sampling){.temperature = 0, .top_k = 0, .top_p = 1, .min_p = 0,
                           .presence_penalty = 0, .frequency_penalty = 0,
                           .repetition_penalty = 1, .seed = 0};
}

static const struct {
    const char *name;
    float temperature, top_p, presence;
    int thinking, max_tokens;
} profiles[] = {
    {"instruct-general", 0.7f, 0.8f, 1.5f, 0, 16384},
    {"instruct-reasoning", 1.0f, 0.95f, 2.0f, 0, 32768},
    {"thinking-general", 1.0f, 0.95f, 1.5f, 1, 32768},
    {"thinking-coding", 0.6f, 0.95f, 0.0f, 1, 32768},
};

const char *const qmix_sampling_profiles[] = {"instruct-general", "instruct-reasoning",
                                              "thinking-general", "thinking-coding", NULL};

int qmix_sampling_profile(const char *name, qmix_sampling *out, int *enable_thinking,
                          int *max_tokens)
{
    for (size_t i = 0; i < sizeof profiles / sizeof profiles[0]; i++) {
        if (strcmp(profiles[i].name, name)) continue;
        uint64_t seed = out->seed;
        *out = qmix_sampling_greedy();
        out->seed = seed;
        out->temperature = profiles[i].temperature;
        out->top_p = profiles[i].top_p;
        out->top_k = 20;
        out->presence_penalty = profiles[i].presence;
        if (enable_thinking) *enable_thinking = profiles[i].thinking;
        if (max_tokens) *max_tokens = profiles[i].max_tokens;
        return 0;
    }
    return -1;
}

qmix_sampler *qmix_sampler_new(const qmix_sampling *params, int n_vocab)
{
    qmix_sampler *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->p = *params;
    s->n_vocab = n_vocab;
    size_t V = (size_t)n_vocab;
    s->out_count = calloc(V, sizeof *s->out_count);
    s->seen = calloc(V, 1);
    s->seen_ids = malloc(V * sizeof *s->seen_ids);
    s->logits = malloc(V * sizeof *s->logits);
    s->prob = malloc(V * sizeof *s->prob);
    s->cand = malloc(V * sizeof *s->cand);
    s->sorted = malloc(V * sizeof *s->sorted);
    s->bucket = malloc(V * sizeof *s->bucket);
    if (!s->bucket ||!s->out_count || !s->seen || !s->seen_ids || !s->logits || !s->prob || !s->cand ||
        !s->sorted) {
        qmix_sampler_free(s);
        return NULL;
    }
    qmix_sampler_reset(s);
    return s;
}

void qmix_sampler_free(qmix_sampler *s)
{
    if (!s) return;
    free(s->out_count);
    free(s->seen);
    free(s->seen_ids);
    free(s->logits);
    free(s->prob);
    free(s->cand);
    free(s->sorted);
    free(s->bucket);
    free(s);
}

void qmix_sampler_reset(qmix_sampler *s)
{
    for (int i = 0; i < s->n_seen; i++) {
        s->seen[s->seen_ids[i]] = 0;
        s->out_count[s->seen_ids[i]] = 0;
    }
    s->n_seen = 0;
    /* splitmix64 of the seed, so nearby seeds give unrelated streams and 0 is a fine seed */
    uint64_t z = s->p.seed + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    s->rng = (z ^ (z >> 31)) | 1;
}

static void mark(qmix_sampler *s, int32_t id, int flag)
{
    if (id < 0 || id >= s->n_vocab) return;
    if (!s->seen[id]) s->seen_ids[s->n_seen++] = id;
    s->seen[id] |= (uint8_t)flag;
}

void qmix_sampler_add_prompt(qmix_sampler *s, const int32_t *ids, int n)
{
    for (int i = 0; i < n; i++) mark(s, ids[i], SEEN_PROMPT);
}

void qmix_sampler_accept(qmix_sampler *s, int32_t id)
{
    if (id < 0 || id >= s->n_vocab) return;
    mark(s, id, SEEN_OUTPUT);
    s->out_count[id]++;
}

static double uniform01(qmix_sampler *s)
{
    s->rng ^= s->rng >> 12;
    s->rng ^= s->rng << 25;
    s->rng ^= s->rng >> 27;
    return (double)((s->rng * 2685821657736338717ull) >> 11) * 0x1.0p-53;
}

double qmix_sampler_uniform(qmix_sampler *s) { return uniform01(s); }

int32_t qmix_argmax(const float *logits, int n)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

/* Only seen tokens change, so this copies and touches O(seen). */
static const float *penalised(qmix_sampler *s, const float *logits)
{
    const qmix_sampling *p = &s->p;
    if (!s->n_seen || (p->repetition_penalty == 1 && p->presence_penalty == 0 &&
                       p->frequency_penalty == 0))
        return logits;
    memcpy(s->logits, logits, (size_t)s->n_vocab * sizeof *logits);
    for (int i = 0; i < s->n_seen; i++) {
        int32_t id = s->seen_ids[i];
        float l = s->logits[id];
        if (p->repetition_penalty != 1) l = l > 0 ? l / p->repetition_penalty : l * p->repetition_penalty;
        if (s->out_count[id]) l -= p->presence_penalty + p->frequency_penalty * (float)s->out_count[id];
        s->logits[id] = l;
    }
    return s->logits;
}

/* The heap keeps the k best logits with the worst on top; among equal logits the larger id is
 * worse, so ties keep the lower ids. */
static int worse(const float *v, const int32_t *id, int a, int b)
{
    return v[a] < v[b] || (v[a] == v[b] && id[a] > id[b]);
}

static void sift_down(float *v, int32_t *id, int n, int i)
{
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && worse(v, id, l, m)) m = l;
        if (r < n && worse(v, id, r, m)) m = r;
        if (m == i) return;
        float tv = v[i];
        v[i] = v[m];
        v[m] = tv;
        int32_t ti = id[i];
        id[i] = id[m];
        id[m] = ti;
        i = m;
    }
}

static int cmp_cand(const void *a, const void *b)
{
    const cand_t *x = a, *y = b;
    if (x->prob != y->prob) return x->prob > y->prob ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* Keeps the smallest set of most likely candidates whose mass reaches top_p (ties: lower id
 * first), without sorting the vocabulary: candidates go into buckets of probability by powers of
 * 2^(1/16); whole buckets above the cut are kept, and only the bucket the cut falls in is sorted.
 * Returns the new count; the kept candidates end up first in s->cand / s->prob. */
static int nucleus(qmix_sampler *s, int n)
{
    float *val = s->prob;
    int32_t *id = s->cand;
    double mass[N_BUCKETS] = {0};
    for (int i = 0; i < n; i++) {
        int b = val[i] > 0 ? (int)(-log2f(val[i]) * 16) : N_BUCKETS - 1;
        s->bucket[i] = (uint16_t)(b < N_BUCKETS ? b : N_BUCKETS - 1);
        mass[s->bucket[i]] += val[i];
    }
    double cum = 0;
    int cut = 0;
    while (cut < N_BUCKETS - 1 && cum + mass[cut] < s->p.top_p) cum += mass[cut++];
    int kept = 0, m = 0;
    cand_t *edge = s->sorted;
    for (int i = 0; i < n; i++) {
        if (s->bucket[i] < cut) {
            val[kept] = val[i];
            id[kept++] = id[i];
        } else if (s->bucket[i] == cut) {
            edge[m++] = (cand_t){val[i], id[i]};
        }
    }
    qsort(edge, (size_t)m, sizeof *edge, cmp_cand);
    for (int i = 0; i < m && (i == 0 || cum < s->p.top_p); i++) {
        cum += edge[i].prob;
        val[kept] = edge[i].prob;
        id[kept++] = edge[i].id;
    }
    return kept;
}

/* Fills s->cand / s->prob with the surviving tokens and their normalised probabilities; returns
 * how many survive. */
static int filter(qmix_sampler *s, const float *logits)
{
    const qmix_sampling *p = &s->p;
    int V = s->n_vocab, n;
    float *val = s->prob;
    int32_t *id = s->cand;
    if (p->top_k > 0 && p->top_k < V) { /* top-k by a min-heap over the vocabulary: O(V log k) */
        n = p->top_k;
        for (int i = 0; i < n; i++) {
            val[i] = logits[i];
            id[i] = i;
        }
        for (int i = n / 2 - 1; i >= 0; i--) sift_down(val, id, n, i);
        for (int i = n; i < V; i++)
            if (logits[i] > val[0]) {
                val[0] = logits[i];
                id[0] = i;
                sift_down(val, id, n, 0);
            }
    } else {
        n = V;
        for (int i = 0; i < V; i++) {
            val[i] = logits[i];
            id[i] = i;
        }
    }
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) mx = val[i] > mx ? val[i] : mx;
    double sum = 0;
    for (int i = 0; i < n; i++) sum += val[i] = expf((val[i] - mx) / p->temperature);
    for (int i = 0; i < n; i++) val[i] = (float)(val[i] / sum);

    if (p->top_p < 1) n = nucleus(s, n);
    if (p->min_p > 0) {
        float pmax = 0;
        for (int i = 0; i < n; i++) pmax = val[i] > pmax ? val[i] : pmax;
        int m = 0;
        for (int i = 0; i < n; i++)
            if (val[i] >= p->min_p * pmax) {
                val[m] = val[i];
                id[m++] = id[i];
            }
        n = m;
    }
    sum = 0;
    for (int i = 0; i < n; i++) sum += val[i];
    for (int i = 0; i < n; i++) val[i] = (float)(val[i] / sum);
    return n;
}

void qmix_sampler_distribution(qmix_sampler *s, const float *logits, float *probs)
{
    const float *l = penalised(s, logits);
    memset(probs, 0, (size_t)s->n_vocab * sizeof *probs);
    if (s->p.temperature <= 0) {
        probs[qmix_argmax(l, s->n_vocab)] = 1;
        return;
    }
    int n = filter(s, l);
    for (int i = 0; i < n; i++) probs[s->cand[i]] = s->prob[i];
}

int32_t qmix_sampler_sample(qmix_sampler *s, const float *logits)
{
    const float *l = penalised(s, logits);
    if (s->p.temperature <= 0) return qmix_argmax(l, s->n_vocab);
    int n = filter(s, l);
    double r = uniform01(s), acc = 0;
    for (int i = 0; i < n; i++) {
        acc += s->prob[i];
        if (acc > r) return s->cand[i];
    }
    return s->cand[n - 1];
}
