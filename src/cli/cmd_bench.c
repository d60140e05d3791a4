/* qmix bench: prefill and decode throughput, peak RSS, and decode as a fraction of the
 * machine's measured memory read bandwidth (decode of a MoE model is memory-bound: every token
 * streams the dense weights plus its top-k experts). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "runtime/sampler.h"
#include "eval/membw.h"
#include "formats/gguf.h"
#include "kernels/kernels.h"
#include "model/model.h"
#include "runtime/speculative.h"
#include "util/err.h"

#define MAX_RUNS 64

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix bench MODEL [--ctx LIST | --prompt N] [--gen N] [--threads LIST]\n"
            "                  [--kv-bits 32|16|8|4] [--no-membw] [--no-prefault] [--json]\n\n"
            "For each thread count and each context length N: opens a session, prefills N\n"
            "pseudo-random token ids in one call (prefill tok/s), then decodes greedily (argmax) from\n"
            "that context, timing every step (generation tok/s = steps / total time; the median step\n"
            "time is shown too). Decode reads the weights of every dense\n"
            "matrix plus the top-k experts per token, so its GB/s = (bytes of weights per token) x\n"
            "(tok/s) is compared with the machine's read bandwidth, measured with the same number of\n"
            "threads on a 1 GiB buffer just before and just after the row (in a child process, so\n"
            "it stays out of the RSS; '!' marks a row where the two differ by more than 15%%).\n"
            "Peak RSS is the row's peak (the kernel's high-water mark, reset before each row; where\n"
            "that is not allowed, the process's peak so far), including the pages of the\n"
            "memory-mapped checkpoint that were touched.\n\n"
            "  --ctx LIST        comma-separated context lengths to prefill, e.g. 1024,4096; each\n"
            "                    row's session holds context + gen tokens\n"
            "  --prompt N        a single context length (the same as --ctx N; default 512)\n"
            "  --gen N           decode steps to time after each prefill (default 128 with --ctx,\n"
            "                    else 64)\n"
            "  --threads LIST    comma-separated thread counts, e.g. 1,2 (default: 1,2)\n"
            "  --seed S          seed of the pseudo-random prompt ids (default 1)\n"
            "  --no-prefault     do not map in the weights before the first run (by default every\n"
            "                    matrix the forward pass can read is prefaulted, untimed, so the\n"
            "                    first row does not pay page faults / disk reads the others skip)\n"
            "  --no-membw        skip the memory-bandwidth measurement (and the %% column)\n"
            "  --mtp             also decode with MTP speculative decoding (the model's MTP block\n"
            "                    drafts, one batched pass verifies) from the same context, per\n"
            "                    row: tok/s, speed-up over plain decoding, acceptance rate, tokens\n"
            "                    per verification pass, and whether the tokens equal plain greedy's\n"
            "  --draft LIST      draft lengths to run with --mtp, e.g. 1,2,3 (default %d; implies\n"
            "                    --mtp)\n"
            "  --rollback snapshot|recompute\n"
            "                    how --mtp restores the Gated DeltaNet state when a draft is\n"
            "                    rejected: copy back the state recorded after the kept token\n"
            "                    (default), or restore the state from before the verification\n"
            "                    and run the kept tokens again (to compare their cost)\n"
            "  --json            print one JSON object instead of the table\n"
            "%s",
            QMIX_SPEC_DEFAULT_DRAFT, cli_kv_help);
}

/* --kv-bits / --kv-type: the cache every row's session uses */
static qmix_kv_type kv_type;

typedef struct bench_run {
    int threads, ctx;
    int peak_is_row;       /* peak_rss is this row's own peak (high-water mark reset before it) */
    double prefill_s, decode_s, median_step_s;
    double bw_before, bw_after, membw_gbs; /* read GB/s around the row; < 0: not measured */
    int bw_unstable;
    int decode_steps;
    uint64_t peak_rss;
    /* --mtp: per draft length */
    double mtp_s[MAX_RUNS], mtp_draft_s[MAX_RUNS], mtp_verify_s[MAX_RUNS];
    double mtp_acceptance[MAX_RUNS], mtp_per_step[MAX_RUNS];
    int64_t mtp_steps[MAX_RUNS], mtp_drafted[MAX_RUNS];
    int mtp_same[MAX_RUNS];
} bench_run;

/* "1,2" / "1024,4096": up to MAX_RUNS integers in [1, hi], each digits only, no empty items. */
static int parse_list(const char *flag, const char *what, const char *spec, long hi, int *out,
                      int *n)
{
    *n = 0;
    const char *p = spec;
    while (*p) {
        char *end;
        long v = *p >= '0' && *p <= '9' ? strtol(p, &end, 10) : (end = (char *)p, 0);
        if (end == p || v < 1 || v > hi || (*end && *end != ',') || (*end == ',' && !end[1]) ||
            *n == MAX_RUNS) {
            fprintf(stderr, "qmix bench: %s expects a comma-separated list of at most %d %s in "
                            "[1, %ld], got '%s'\n", flag, MAX_RUNS, what, hi, spec);
            return -1;
        }
        out[(*n)++] = (int)v;
        p = *end ? end + 1 : end;
    }
    if (!*n) {
        fprintf(stderr, "qmix bench: %s: no %s given\n", flag, what);
        return -1;
    }
    return 0;
}

/* Resets the kernel's peak-RSS mark (VmHWM) to the current RSS, so that the next row's peak is
 * its own and not the largest earlier row's; 0 if the kernel allowed it. */
static int reset_peak_rss(void)
{
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (!f) return -1;
    int ok = fputs("5", f) >= 0;
    return fclose(f) == 0 && ok ? 0 : -1;
}

/* VmHWM of /proc/self/status in bytes; 0 if unreadable. */
static uint64_t hwm_rss(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    uint64_t kb = 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6)) kb = strtoull(line + 6, NULL, 10);
    fclose(f);
    return kb * 1024;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

static volatile uint8_t prefault_sink;

/* Populates the page tables of one weight matrix (reading it from disk if it is not cached). */
static uint64_t prefault_mat(const qk_mat *m, long page)
{
    if (!m->data || m->rows <= 0) return 0;
    uintptr_t begin = (uintptr_t)m->data, end = begin + (uintptr_t)m->rows * m->row_bytes;
    uintptr_t a = begin & ~(uintptr_t)(page - 1);
    if (madvise((void *)a, end - a, MADV_POPULATE_READ)) {
        /* older kernels: touch one byte per page */
        for (uintptr_t p = a; p < end; p += (uintptr_t)page)
            prefault_sink += *(const volatile uint8_t *)(p < begin ? begin : p);
    }
    return end - begin;
}

/* Every matrix a forward pass may read except the embedding table (one row per token is read;
 * with tied embeddings it is the lm_head and so included). Returns the bytes covered. */
static uint64_t prefault_weights(const qmix_model *m)
{
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0) page = 4096;
    const qmix_config *c = &m->cfg;
    uint64_t bytes = prefault_mat(&m->lm_head, page);
    for (int i = 0; i < c->n_layers; i++) {
        const qmix_layer *ly = &m->layers[i];
        const qk_mat *mats[] = {&ly->in_qkv, &ly->in_z, &ly->in_b, &ly->in_a, &ly->out_proj,
                                &ly->q_proj, &ly->k_proj, &ly->v_proj, &ly->o_proj, &ly->router,
                                &ly->shared_gate, &ly->shared_up, &ly->shared_down,
                                &ly->shared_expert_gate};
        for (size_t k = 0; k < sizeof mats / sizeof mats[0]; k++)
            bytes += prefault_mat(mats[k], page);
        for (int e = 0; ly->experts && e < c->n_experts; e++) {
            bytes += prefault_mat(&ly->experts[e].gate, page);
            bytes += prefault_mat(&ly->experts[e].up, page);
            bytes += prefault_mat(&ly->experts[e].down, page);
        }
    }
    return bytes;
}

static void json_num(const char *key, double v, int decimals)
{
    if (v < 0)
        printf("\"%s\": null, ", key);
    else
        printf("\"%s\": %.*f, ", key, decimals, v);
}

/* Read bandwidth with n threads, measured in a child process so that its 1 GiB buffer never
 * counts in this process's peak RSS (falls back to measuring here if fork fails). */
static double probe_membw(int threads)
{
    int fds[2];
    if (pipe(fds)) return qmix_membw_read_gbs(threads, QMIX_MEMBW_DEFAULT_BYTES, 3);
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        return qmix_membw_read_gbs(threads, QMIX_MEMBW_DEFAULT_BYTES, 3);
    }
    if (pid == 0) {
        close(fds[0]);
        double gbs = qmix_membw_read_gbs(threads, QMIX_MEMBW_DEFAULT_BYTES, 3);
        ssize_t w = write(fds[1], &gbs, sizeof gbs);
        _exit(w == (ssize_t)sizeof gbs ? 0 : 1);
    }
    close(fds[1]);
    double gbs = -1;
    size_t got = 0;
    while (got < sizeof gbs) {
        ssize_t n = read(fds[0], (char *)&gbs + got, sizeof gbs - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        got += (size_t)n;
    }
    close(fds[0]);
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    return got == sizeof gbs ? gbs : -1;
}

typedef struct mtp_check { const int32_t *want; int n, at, same; } mtp_check;

/* Greedy tokens of the speculative run, compared with plain decoding's as they come. */
static int mtp_emit(void *user, int32_t id, const float *logits, qmix_err *err)
{
    (void)logits;
    (void)err;
    mtp_check *c = user;
    if (c->at < c->n && id != c->want[c->at]) c->same = 0;
    return ++c->at >= c->n;
}

/* Speculative greedy decoding of n_gen steps from the same context (a session of its own). */
static int run_mtp(qmix_model *model, int threads, int ctx, const int32_t *prompt, int n_prompt,
                   int n_gen, int draft, qmix_spec_rollback mode, const int32_t *want,
                   bench_run *r, int k, qmix_err *err)
{
    const qmix_config *cfg = qmix_model_config(model);
    qmix_session *sess = NULL;
    qmix_spec *spec = NULL;
    qmix_sampling g = qmix_sampling_greedy();
    qmix_sampler *smp = qmix_sampler_new(&g, cfg->vocab_size);
    qmix_session_opts opts = {.max_ctx = ctx, .n_threads = threads};
    int rc = -1;
    if (!smp) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    if (qmix_session_new(model, &opts, &sess, err) || qmix_spec_new(sess, draft, &spec, err) ||
        qmix_spec_prefill(spec, prompt, n_prompt, err))
        goto done;
    qmix_spec_set_rollback(spec, mode);
    mtp_check c = {want, n_gen + 1, 0, 1};
    double t0 = cli_now();
    if (qmix_spec_generate(spec, smp, mtp_emit, &c, NULL, NULL, NULL, err)) goto done;
    r->mtp_s[k] = cli_now() - t0;
    const qmix_spec_stats *st = qmix_spec_get_stats(spec);
    r->mtp_same[k] = c.same && c.at == n_gen + 1;
    r->mtp_acceptance[k] = st->drafted ? (double)st->accepted / (double)st->drafted : 0;
    r->mtp_per_step[k] = st->steps ? (double)st->kept / (double)st->steps : 0;
    r->mtp_draft_s[k] = st->draft_s;
    r->mtp_verify_s[k] = st->verify_s;
    r->mtp_steps[k] = st->steps;
    r->mtp_drafted[k] = st->drafted;
    rc = 0;
done:
    qmix_sampler_free(smp);
    qmix_spec_free(spec);
    qmix_session_free(sess);
    return rc;
}

static int run_one(qmix_model *model, int threads, int ctx, const int32_t *prompt, int n_prompt,
                   int n_gen, double *steps, bench_run *r, int32_t *tokens, qmix_err *err)
{
    const qmix_config *cfg = qmix_model_config(model);
    qmix_session *sess = NULL;
    qmix_session_opts opts = {.max_ctx = ctx, .n_threads = threads, .kv_type = kv_type};
    if (qmix_session_new(model, &opts, &sess, err)) return -1;
    r->threads = qmix_session_threads(sess);
    double t0 = cli_now();
    if (qmix_session_prefill(sess, prompt, n_prompt, NULL, err)) goto fail;
    r->prefill_s = cli_now() - t0;
    int32_t next = qmix_argmax(qmix_session_logits(sess), cfg->vocab_size);
    tokens[0] = next;
    double total = 0;
    for (int i = 0; i < n_gen; i++) {
        double s0 = cli_now();
        if (qmix_session_decode(sess, next, err)) goto fail;
        next = qmix_argmax(qmix_session_logits(sess), cfg->vocab_size);
        tokens[i + 1] = next;
        steps[i] = cli_now() - s0;
        total += steps[i];
    }
    r->decode_s = total;
    r->decode_steps = n_gen;
    qsort(steps, (size_t)n_gen, sizeof *steps, cmp_double);
    r->median_step_s = !n_gen ? 0
                       : n_gen % 2 ? steps[n_gen / 2]
                                   : 0.5 * (steps[n_gen / 2 - 1] + steps[n_gen / 2]);
    /* read before the session is freed: its buffers are part of the row's peak */
    uint64_t hwm = r->peak_is_row ? hwm_rss() : 0;
    qmix_session_free(sess);
    if (hwm) r->peak_rss = hwm;
    else {
        r->peak_is_row = 0;
        r->peak_rss = cli_peak_rss();
    }
    return 0;
fail:
    qmix_session_free(sess);
    return -1;
}

int qmix_cmd_bench(int argc, char **argv)
{
    const char *model_path = NULL;
    long n_prompt = 0, n_gen = -1, seed = 1;
    int thread_list[MAX_RUNS] = {1, 2}, n_threads = 2, do_membw = 1, json = 0, prefault = 1;
    int ctx_list[MAX_RUNS] = {512}, n_ctx = 1, have_ctx = 0;
    int draft_list[MAX_RUNS] = {QMIX_SPEC_DEFAULT_DRAFT}, n_draft = 0;
    qmix_spec_rollback rollback = QMIX_SPEC_SNAPSHOT;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int handled;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if ((handled = cli_kv_option("bench", argc, argv, &i, &kv_type)) != 0) {
            if (handled < 0) return 2;
        } else if (!strcmp(a, "--prompt")) {
            if (!(v = cli_value("bench", argc, argv, &i)) ||
                cli_int("bench", a, v, 1, 1 << 24, &n_prompt))
                return 2;
        } else if (!strcmp(a, "--gen")) {
            if (!(v = cli_value("bench", argc, argv, &i)) ||
                cli_int("bench", a, v, 0, 1 << 24, &n_gen))
                return 2;
        } else if (!strcmp(a, "--ctx")) {
            if (!(v = cli_value("bench", argc, argv, &i)) ||
                parse_list("--ctx", "context lengths", v, 1 << 24, ctx_list, &n_ctx))
                return 2;
            have_ctx = 1;
        } else if (!strcmp(a, "--seed")) {
            if (!(v = cli_value("bench", argc, argv, &i)) ||
                cli_int("bench", a, v, 0, 0x7fffffffL, &seed))
                return 2;
        } else if (!strcmp(a, "--threads")) {
            if (!(v = cli_value("bench", argc, argv, &i)) ||
                parse_list("--threads", "thread counts", v, 1024, thread_list, &n_threads))
                return 2;
        } else if (!strcmp(a, "--mtp")) {
            if (!n_draft) n_draft = 1;
        } else if (!strcmp(a, "--draft")) {
            if (!(v = cli_value("bench", argc, argv, &i)) ||
                parse_list("--draft", "draft lengths", v, QMIX_SPEC_MAX_DRAFT, draft_list,
                           &n_draft))
                return 2;
        } else if (!strcmp(a, "--rollback")) {
            if (!(v = cli_value("bench", argc, argv, &i))) return 2;
            if (!strcmp(v, "snapshot")) rollback = QMIX_SPEC_SNAPSHOT;
            else if (!strcmp(v, "recompute")) rollback = QMIX_SPEC_RECOMPUTE;
            else {
                fprintf(stderr, "qmix bench: --rollback expects snapshot or recompute, got '%s'\n",
                        v);
                return 2;
            }
        } else if (!strcmp(a, "--no-prefault")) {
            prefault = 0;
        } else if (!strcmp(a, "--no-membw")) {
            do_membw = 0;
        } else if (!strcmp(a, "--json")) {
            json = 1;
        } else if (a[0] == '-') {
            fprintf(stderr, "qmix bench: unknown option '%s' (see --help)\n", a);
            return 2;
        } else if (!model_path) {
            model_path = a;
        } else {
            fprintf(stderr, "qmix bench: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!model_path) return cli_missing("bench", "MODEL");
    if (have_ctx && n_prompt) {
        fprintf(stderr, "qmix bench: --prompt N is the single-context form of --ctx LIST: give "
                        "one of them\n");
        return 2;
    }
    if (n_prompt) ctx_list[0] = (int)n_prompt; /* the single-context alias */
    if (n_gen < 0) n_gen = have_ctx ? 128 : 64;
    int max_ctx = 0;
    for (int k = 0; k < n_ctx; k++) {
        if ((long)ctx_list[k] + n_gen > (1L << 30)) {
            fprintf(stderr, "qmix bench: context %d + gen %ld is too long\n", ctx_list[k], n_gen);
            return 2;
        }
        if (ctx_list[k] > max_ctx) max_ctx = ctx_list[k];
    }
    n_prompt = max_ctx; /* one pseudo-random stream; each row prefills a prefix of it */
    int n_runs = n_threads * n_ctx;

    qmix_err err;
    qmix_model *model = NULL;
    if (qmix_model_open(model_path, &model, &err)) {
        fprintf(stderr, "qmix bench: %s\n", err.msg);
        return 1;
    }
    const qmix_config *c = qmix_model_config(model);
    int32_t *prompt = malloc((size_t)n_prompt * sizeof *prompt);
    double *steps = malloc(((size_t)n_gen + 1) * sizeof *steps);
    int32_t *plain_tokens = malloc(((size_t)n_gen + 1) * sizeof *plain_tokens);
    bench_run *runs = calloc((size_t)n_runs, sizeof *runs);
    int rc = 1;
    if (!prompt || !steps || !runs || !plain_tokens) {
        fprintf(stderr, "qmix bench: out of memory\n");
        goto done;
    }
    uint64_t state = 0x9e3779b97f4a7c15ull ^ (uint64_t)seed * 0xbf58476d1ce4e5b9ull;
    for (long i = 0; i < n_prompt; i++) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        prompt[i] = (int32_t)(state % (uint64_t)c->vocab_size);
    }

    int n_full = 0;
    for (int i = 0; i < c->n_layers; i++) n_full += c->layer_is_full[i];
    uint64_t file_bytes = 0;
    if (model->store)
        for (uint64_t i = 0; i < qmix_st_count(model->store); i++)
            file_bytes += qmix_st_at(model->store, i)->nbytes;
    else if (model->gguf)
        for (uint64_t i = 0; i < qmix_gguf_tensor_count(model->gguf); i++)
            file_bytes += qmix_gguf_tensor_at(model->gguf, i)->nbytes;
    uint64_t tok_bytes = qmix_model_decode_bytes(model);
    const char *isa = qk_isa_name(qk_isa_active());

    if (!json) {
        char hf[32], ht[32];
        cli_human_bytes((double)file_bytes, hf, sizeof hf);
        cli_human_bytes((double)tok_bytes, ht, sizeof ht);
        printf("model   %s\n", model_path);
        printf("geometry %d layers (%d Gated DeltaNet + %d full attention), hidden %d, vocab %d, "
               "%d experts top-%d (ffn %d, shared %d), attention %d/%d heads x %d; tensors %s, "
               "read per decoded token %s\n",
               c->n_layers, c->n_layers - n_full, n_full, c->hidden_size, c->vocab_size,
               c->n_experts, c->n_experts_used, c->moe_ffn, c->shared_ffn, c->n_heads,
               c->n_kv_heads, c->head_dim, hf, ht);
        printf("kernels %s, KV cache %s; per row: prefill of the context (pseudo-random token ids, one call), "
               "then %ld greedy decode steps from it\n",
               isa, qmix_kv_type_name(kv_type), n_gen);
        fflush(stdout);
    }

    uint64_t prefault_bytes = 0;
    double prefault_s = 0;
    if (prefault) {
        double t0 = cli_now();
        prefault_bytes = prefault_weights(model);
        prefault_s = cli_now() - t0;
        if (!json) {
            char hb[32];
            cli_human_bytes((double)prefault_bytes, hb, sizeof hb);
            printf("prefaulted %s of weights in %.2f s (untimed)\n\n", hb, prefault_s);
            fflush(stdout);
        }
    }

    for (int r = 0; r < n_runs; r++) {
        bench_run *b = &runs[r];
        int th = thread_list[r / n_ctx];
        b->ctx = ctx_list[r % n_ctx];
        b->bw_before = b->bw_after = -1;
        /* the probe brackets the row: the bandwidth a VM gets can change from minute to minute */
        if (do_membw) b->bw_before = probe_membw(th);
        /* after the probe (its child's memory is not ours anyway) and after the previous row's
         * session was freed: the mark restarts from the mapped weights */
        b->peak_is_row = reset_peak_rss() == 0;
        if (run_one(model, th, b->ctx + (int)n_gen, prompt, b->ctx, (int)n_gen, steps, b,
                    plain_tokens, &err)) {
            fprintf(stderr, "qmix bench: %d threads, context %d: %s\n", th, b->ctx, err.msg);
            goto done;
        }
        for (int k = 0; k < n_draft; k++)
            if (run_mtp(model, th, b->ctx + (int)n_gen, prompt, b->ctx, (int)n_gen, draft_list[k],
                        rollback, plain_tokens, b, k, &err)) {
                fprintf(stderr, "qmix bench: --mtp, %d threads, context %d: %s\n", th, b->ctx,
                        err.msg);
                goto done;
            }
        if (do_membw) b->bw_after = probe_membw(b->threads);
        b->membw_gbs = b->bw_before > 0 && b->bw_after > 0 ? 0.5 * (b->bw_before + b->bw_after)
                       : b->bw_before > 0                  ? b->bw_before
                                                           : b->bw_after;
        b->bw_unstable = b->bw_before > 0 && b->bw_after > 0 &&
                         (b->bw_before > 1.15 * b->bw_after || b->bw_after > 1.15 * b->bw_before);
    }

    int any_unstable = 0, all_row_peaks = 1;
    for (int r = 0; r < n_runs; r++) all_row_peaks &= runs[r].peak_is_row;
    if (json) {
        printf("{\"model\": ");
        json_str(model_path);
        printf(", \"isa\": \"%s\", \"kv_type\": \"%s\", \"n_layers\": %d, \"n_full_attention\": %d, \"hidden_size\": %d, "
               "\"vocab_size\": %d, \"n_experts\": %d, \"n_experts_used\": %d, \"moe_ffn\": %d, "
               "\"shared_ffn\": %d, \"tensor_bytes\": %llu, \"decode_weight_bytes_per_token\": "
               "%llu, \"contexts\": [",
               isa, qmix_kv_type_name(kv_type), c->n_layers, n_full, c->hidden_size, c->vocab_size, c->n_experts,
               c->n_experts_used, c->moe_ffn, c->shared_ffn, (unsigned long long)file_bytes,
               (unsigned long long)tok_bytes);
        for (int k = 0; k < n_ctx; k++) printf("%s%d", k ? ", " : "", ctx_list[k]);
        printf("], \"decode_steps\": %ld, \"prefaulted_bytes\": %llu, \"prefault_s\": %.3f, "
               "\"peak_rss_is_process_peak\": %s, \"runs\": [",
               n_gen, (unsigned long long)prefault_bytes, prefault_s,
               all_row_peaks ? "false" : "true");
        for (int r = 0; r < n_runs; r++) {
            const bench_run *b = &runs[r];
            double dec = b->decode_s > 0 ? b->decode_steps / b->decode_s : 0;
            double gbs = dec * (double)tok_bytes / 1e9;
            double pre = b->ctx / b->prefill_s;
            /* prefill_tps / decode_tps are the seed tables' names; *_tok_s kept for scripts */
            printf("%s{\"threads\": %d, \"ctx\": %d, \"session_ctx\": %ld, \"prefill_s\": %.6f, "
                   "\"prefill_tok_s\": %.3f, \"prefill_tps\": %.3f, ",
                   r ? ", " : "", b->threads, b->ctx, b->ctx + n_gen, b->prefill_s, pre, pre);
            if (b->decode_steps)
                printf("\"decode_s\": %.6f, \"decode_tok_s\": %.3f, \"decode_tps\": %.3f, "
                       "\"decode_median_step_ms\": %.4f, \"decode_gb_s\": %.3f, ",
                       b->decode_s, dec, dec, b->median_step_s * 1e3, gbs);
            else
                printf("\"decode_s\": null, \"decode_tok_s\": null, \"decode_tps\": null, "
                       "\"decode_median_step_ms\": null, \"decode_gb_s\": null, ");
            json_num("read_bw_before_gb_s", b->bw_before, 3);
            json_num("read_bw_after_gb_s", b->bw_after, 3);
            json_num("read_bw_gb_s", b->membw_gbs, 3);
            json_num("decode_pct_of_read_bw",
                     b->membw_gbs > 0 && b->decode_steps ? 100 * gbs / b->membw_gbs : -1, 2);
            printf("\"read_bw_unstable\": %s, \"peak_rss_bytes\": %llu, \"peak_rss_is_row\": %s",
                   b->bw_unstable ? "true" : "false", (unsigned long long)b->peak_rss,
                   b->peak_is_row ? "true" : "false");
            if (n_draft) {
                printf(", \"mtp\": [");
                for (int k = 0; k < n_draft; k++)
                    printf("%s{\"draft\": %d, \"decode_s\": %.6f, \"decode_tok_s\": %.3f, "
                           "\"speedup\": %.4f, \"acceptance\": %.4f, "
                           "\"tokens_per_verification\": %.4f, \"draft_s\": %.6f, "
                           "\"verify_s\": %.6f, \"verifications\": %lld, \"drafted\": %lld, "
                           "\"same_tokens\": %s}", k ? ", " : "",
                           draft_list[k], b->mtp_s[k], b->mtp_s[k] > 0 ? n_gen / b->mtp_s[k] : 0,
                           b->mtp_s[k] > 0 ? b->decode_s / b->mtp_s[k] : 0,
                           b->mtp_acceptance[k], b->mtp_per_step[k], b->mtp_draft_s[k],
                           b->mtp_verify_s[k], (long long)b->mtp_steps[k],
                           (long long)b->mtp_drafted[k], b->mtp_same[k] ? "true" : "false");
                printf("]");
            }
            printf("}");
        }
        printf("]}\n");
    } else {
        char ht[32];
        cli_human_bytes((double)tok_bytes, ht, sizeof ht);
        printf("| Threads | Context Window | Prefill (tok/s) | Generation (tok/s) | Median step | "
               "Weights/token | Decode GB/s | %% of read BW | Peak RSS* |\n");
        printf("|---|---|---|---|---|---|---|---|---|\n");
        for (int r = 0; r < n_runs; r++) {
            const bench_run *b = &runs[r];
            double dec = b->decode_s > 0 ? b->decode_steps / b->decode_s : 0;
            double gbs = dec * (double)tok_bytes / 1e9;
            char pct[96], rss[32];
            if (b->membw_gbs > 0 && b->decode_steps && b->bw_unstable) {
                snprintf(pct, sizeof pct, "%.1f%%! (read BW %.1f -> %.1f GB/s)",
                         100 * gbs / b->membw_gbs, b->bw_before, b->bw_after);
                any_unstable = 1;
            } else if (b->membw_gbs > 0 && b->decode_steps) {
                snprintf(pct, sizeof pct, "%.1f%% (of %.1f GB/s)", 100 * gbs / b->membw_gbs,
                         b->membw_gbs);
            } else {
                snprintf(pct, sizeof pct, "-");
            }
            cli_human_bytes((double)b->peak_rss, rss, sizeof rss);
            char cw[32];
            /* the seed cards' "1k tokens" (k = 1024) */
            if (b->ctx % 1024 == 0) snprintf(cw, sizeof cw, "%dk tokens", b->ctx / 1024);
            else snprintf(cw, sizeof cw, "%d tokens", b->ctx);
            if (b->decode_steps)
                printf("| %d | %s | %.1f | %.2f | %.2f ms | %s | %.2f | %s | %s |\n", b->threads, cw,
                       b->ctx / b->prefill_s, dec, b->median_step_s * 1e3, ht, gbs, pct, rss);
            else
                printf("| %d | %s | %.1f | - | - | %s | - | - | %s |\n", b->threads, cw,
                       b->ctx / b->prefill_s, ht, rss);
        }
        if (all_row_peaks)
            printf("\n* Peak RSS is each row's own peak (VmHWM, reset before the row): the pages of "
                   "the memory-mapped\n  checkpoint that were touched, plus that row's session "
                   "buffers.\n");
        else
            printf("\n* Peak RSS is this process's peak so far (getrusage ru_maxrss), cumulative "
                   "over the rows above;\n  it includes the pages of the memory-mapped checkpoint "
                   "that were touched, plus the session buffers.\n");
        if (do_membw)
            printf("  Read BW: best of 3 passes over a 1 GiB buffer with the row's thread count "
                   "(%s loop, in a child\n  process so it stays out of the RSS), measured before "
                   "and after the row and averaged;\n  GB/s = 1e9 B/s.\n", qmix_membw_isa());
        if (any_unstable)
            printf("  !: the read bandwidth changed by more than 15%% during the row (a shared "
                   "or virtual machine);\n  rerun it.\n");
        if (n_draft) {
            printf("\nMTP speculative decoding (greedy, the same %ld steps from the same context; "
                   "speed-up over the plain row above;\nverify ms/pass vs the plain median step: "
                   "the cost of checking the drafts):\n\n", n_gen);
            printf("| Threads | Context Window | Draft | Generation (tok/s) | Speed-up | "
                   "Acceptance | Tokens/verification | Draft ms/token | Verify ms/pass | "
                   "Same tokens |\n");
            printf("|---|---|---|---|---|---|---|---|---|---|\n");
            for (int r = 0; r < n_runs; r++)
                for (int k = 0; k < n_draft; k++) {
                    const bench_run *b = &runs[r];
                    double t = b->mtp_s[k];
                    printf("| %d | %d tokens | %d | %.2f | %.2fx | %.1f%% | %.2f | %.2f | %.2f | "
                           "%s |\n", b->threads, b->ctx, draft_list[k], t > 0 ? n_gen / t : 0,
                           t > 0 ? b->decode_s / t : 0, 100 * b->mtp_acceptance[k],
                           b->mtp_per_step[k],
                           b->mtp_drafted[k] ? 1e3 * b->mtp_draft_s[k] / (double)b->mtp_drafted[k] : 0,
                           b->mtp_steps[k] ? 1e3 * b->mtp_verify_s[k] / (double)b->mtp_steps[k] : 0,
                           b->mtp_same[k] ? "yes" : "NO");
                }
        }
    }
    rc = 0;
done:
    free(runs);
    free(prompt);
    free(steps);
    free(plain_tokens);
    qmix_model_close(model);
    return rc;
}
