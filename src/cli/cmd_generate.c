#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "kernels/kernels.h"
#include "runtime/sampler.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix generate MODEL --tokens \"IDS\" [-n N] [options]\n\n"
            "Continues a token sequence and prints the new token ids, then prefill and decode tok/s.\n\n"
            "  --tokens IDS        prompt token ids separated by spaces or commas, or @FILE\n"
            "  -n N                tokens to generate (default 16)\n"
            "  --temp T            sampling temperature; 0 = greedy (default 0)\n"
            "  --top-k K           keep the K most likely tokens (default 0 = off)\n"
            "  --top-p P           keep the smallest set of mass >= P (default 1 = off)\n"
            "  --min-p P           drop tokens below P x the top probability (default 0 = off)\n"
            "  --presence-penalty X, --frequency-penalty X\n"
            "                      subtract X once / per occurrence from generated tokens' logits\n"
            "  --repetition-penalty X  divide positive (multiply negative) logits of prompt and\n"
            "                      generated tokens by X (default 1 = off)\n"
            "  --profile NAME      Qwen's recommended settings: instruct-general,\n"
            "                      instruct-reasoning, thinking-general, thinking-coding\n"
            "  --seed S            random seed for sampling (default 0)\n"
            "  --threads N         worker threads (default: all cores)\n"
            "  --ctx N             context size (default: prompt + n)\n"
            "  --stop-at-eos       stop at the model's eos_token_id\n");
}

static const char *const float_flags[] = {"--temp", "--top-p", "--min-p", "--presence-penalty",
                                          "--frequency-penalty", "--repetition-penalty", NULL};

static int sampling_flag(const char *a)
{
    for (int i = 0; float_flags[i]; i++)
        if (!strcmp(a, float_flags[i])) return 1;
    return 0;
}

/* Sets and range-checks one float sampling parameter; prints the error. */
static int set_sampling(qmix_sampling *sp, const char *flag, double x)
{
    int ok = 1;
    if (!strcmp(flag, "--temp")) ok = x >= 0, sp->temperature = (float)x;
    else if (!strcmp(flag, "--top-p")) ok = x > 0 && x <= 1, sp->top_p = (float)x;
    else if (!strcmp(flag, "--min-p")) ok = x >= 0 && x <= 1, sp->min_p = (float)x;
    else if (!strcmp(flag, "--presence-penalty")) sp->presence_penalty = (float)x;
    else if (!strcmp(flag, "--frequency-penalty")) sp->frequency_penalty = (float)x;
    else ok = x > 0, sp->repetition_penalty = (float)x;
    if (!ok) fprintf(stderr, "qmix generate: %s %g is out of range\n", flag, x);
    return ok ? 0 : -1;
}

int qmix_cmd_generate(int argc, char **argv)
{
    const char *model_path = NULL, *tokens_spec = NULL;
    long n_gen = 16, threads = 0, seed = 0, ctx = 0;
    qmix_sampling sp = qmix_sampling_greedy();
    int stop_at_eos = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--tokens")) {
            if (!(tokens_spec = cli_value("generate", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "-n")) {
            if (!(v = cli_value("generate", argc, argv, &i)) ||
                cli_int("generate", a, v, 0, 1 << 24, &n_gen))
                return 2;
        } else if (!strcmp(a, "--threads")) {
            if (!(v = cli_value("generate", argc, argv, &i)) ||
                cli_int("generate", a, v, 0, 1024, &threads))
                return 2;
        } else if (!strcmp(a, "--seed")) {
            if (!(v = cli_value("generate", argc, argv, &i)) ||
                cli_int("generate", a, v, 0, 0x7fffffffL, &seed))
                return 2;
        } else if (!strcmp(a, "--ctx")) {
            if (!(v = cli_value("generate", argc, argv, &i)) ||
                cli_int("generate", a, v, 1, 1 << 24, &ctx))
                return 2;
        } else if (!strcmp(a, "--profile")) {
            if (!(v = cli_value("generate", argc, argv, &i))) return 2;
            if (qmix_sampling_profile(v, &sp, NULL, NULL)) {
                fprintf(stderr, "qmix generate: unknown --profile '%s' (see --help)\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--top-k")) {
            long k;
            if (!(v = cli_value("generate", argc, argv, &i)) ||
                cli_int("generate", a, v, 0, 1 << 24, &k))
                return 2;
            sp.top_k = (int)k;
        } else if (sampling_flag(a)) {
            double x;
            if (!(v = cli_value("generate", argc, argv, &i)) || cli_double("generate", a, v, &x) ||
                set_sampling(&sp, a, x))
                return 2;
        } else if (!strcmp(a, "--stop-at-eos")) {
            stop_at_eos = 1;
        } else if (a[0] == '-') {
            fprintf(stderr, "qmix generate: unknown option '%s' (see --help)\n", a);
            return 2;
        } else if (!model_path) {
            model_path = a;
        } else {
            fprintf(stderr, "qmix generate: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!model_path || !tokens_spec) {
        usage(stderr);
        return 2;
    }
    int32_t *prompt;
    int n_prompt;
    if (cli_tokens("generate", tokens_spec, &prompt, &n_prompt)) return 2;
    if (!ctx) ctx = n_prompt + n_gen;
    if (ctx < n_prompt + n_gen) {
        fprintf(stderr, "qmix generate: --ctx %ld is smaller than prompt + n = %ld\n", ctx,
                n_prompt + n_gen);
        free(prompt);
        return 2;
    }

    qmix_err err;
    qmix_model *model = NULL;
    qmix_session *sess = NULL;
    qmix_sampler *sampler = NULL;
    int rc = 1;
    if (qmix_model_open(model_path, &model, &err)) goto fail;
    const qmix_config *cfg = qmix_model_config(model);
    qmix_session_opts opts = {.max_ctx = (int)ctx, .n_threads = (int)threads};
    if (qmix_session_new(model, &opts, &sess, &err)) goto fail;
    sp.seed = (uint64_t)seed;
    sampler = qmix_sampler_new(&sp, cfg->vocab_size);
    if (!sampler) {
        snprintf(err.msg, sizeof err.msg, "out of memory for the sampler");
        goto fail;
    }
    qmix_sampler_add_prompt(sampler, prompt, n_prompt);

    double t0 = cli_now();
    if (qmix_session_prefill(sess, prompt, n_prompt, NULL, &err)) goto fail;
    double t1 = cli_now();
    int generated = 0;
    for (; generated < n_gen; generated++) {
        int32_t next = qmix_sampler_sample(sampler, qmix_session_logits(sess));
        qmix_sampler_accept(sampler, next);
        printf("%d\n", next);
        fflush(stdout);
        if (stop_at_eos && next == cfg->eos_token_id) {
            generated++;
            break;
        }
        if (generated + 1 < n_gen && qmix_session_decode(sess, next, &err)) goto fail;
    }
    double t2 = cli_now();
    /* the last sampled token is never fed back, so decode steps = generated - 1 */
    int steps = generated > 0 ? generated - 1 : 0;
    fprintf(stderr, "prefill: %d tokens in %.3f s (%.1f tok/s); decode: %d tokens in %.3f s "
            "(%.1f tok/s); %d threads, %s kernels\n",
            n_prompt, t1 - t0, n_prompt / (t1 - t0), steps, t2 - t1,
            steps ? steps / (t2 - t1) : 0.0, qmix_session_threads(sess),
            qk_isa_name(qk_isa_active()));
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "qmix generate: %s\n", err.msg);
done:
    free(prompt);
    qmix_sampler_free(sampler);
    qmix_session_free(sess);
    qmix_model_close(model);
    return rc;
}
