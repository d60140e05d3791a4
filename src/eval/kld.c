#include "eval/kld.h"

#include <math.h>
#include <stdlib.h>

double qmix_logsumexp(const float *logits, int64_t vocab)
{
    float max = logits[0];
    for (int64_t i = 1; i < vocab; i++)
        if (logits[i] > max) max = logits[i];
    double sum = 0;
    for (int64_t i = 0; i < vocab; i++) sum += exp((double)logits[i] - max);
    return max + log(sum);
}

double qmix_kld_full(const float *base, const float *quant, int64_t vocab)
{
    double lse_p = qmix_logsumexp(base, vocab), lse_q = qmix_logsumexp(quant, vocab), kl = 0;
    for (int64_t i = 0; i < vocab; i++) {
        double lp = base[i] - lse_p;
        kl += exp(lp) * (lp - (quant[i] - lse_q));
    }
    return kl > 0 ? kl : 0; /* rounding can leave -1e-17 for identical rows */
}

/* Min-heap of the top_k (logit, id) so far; the root is the weakest kept entry. "Weaker" means a
 * smaller logit, or an equal logit with a larger id, so ties keep the lower id. */
static int weaker(float la, int32_t ia, float lb, int32_t ib)
{
    return la < lb || (la == lb && ia > ib);
}

static void sift_down(float *val, int32_t *ids, int n, int i)
{
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && weaker(val[l], ids[l], val[m], ids[m])) m = l;
        if (r < n && weaker(val[r], ids[r], val[m], ids[m])) m = r;
        if (m == i) return;
        float tv = val[i];
        val[i] = val[m];
        val[m] = tv;
        int32_t ti = ids[i];
        ids[i] = ids[m];
        ids[m] = ti;
        i = m;
    }
}

void qmix_topk_logprobs(const float *logits, int64_t vocab, int top_k, int32_t *ids, float *logp)
{
    if (top_k > vocab) top_k = (int)vocab;
    /* logp doubles as the heap's value array */
    for (int i = 0; i < top_k; i++) {
        logp[i] = logits[i];
        ids[i] = i;
    }
    for (int i = top_k / 2 - 1; i >= 0; i--) sift_down(logp, ids, top_k, i);
    for (int64_t i = top_k; i < vocab; i++)
        if (weaker(logp[0], ids[0], logits[i], (int32_t)i)) {
            logp[0] = logits[i];
            ids[0] = (int32_t)i;
            sift_down(logp, ids, top_k, 0);
        }
    /* pop weakest-first into the back: descending order */
    for (int n = top_k - 1; n > 0; n--) {
        float tv = logp[0];
        logp[0] = logp[n];
        logp[n] = tv;
        int32_t ti = ids[0];
        ids[0] = ids[n];
        ids[n] = ti;
        sift_down(logp, ids, n, 0);
    }
    double lse = qmix_logsumexp(logits, vocab);
    for (int i = 0; i < top_k; i++) logp[i] = (float)(logp[i] - lse);
}

double qmix_kld_topk(const int32_t *ids, const float *logp, int top_k, const float *quant,
                     int64_t vocab)
{
    double lse_q = qmix_logsumexp(quant, vocab), kl = 0, p_in = 0, q_in = 0;
    for (int i = 0; i < top_k; i++) {
        double lp = logp[i], lq = quant[ids[i]] - lse_q;
        p_in += exp(lp);
        q_in += exp(lq);
        kl += exp(lp) * (lp - lq);
    }
    double p_rest = 1 - p_in, q_rest = 1 - q_in;
    if (p_rest > 1e-12) kl += p_rest * (log(p_rest) - log(q_rest > 1e-300 ? q_rest : 1e-300));
    return kl > 0 ? kl : 0;
}
