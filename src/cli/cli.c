#include "cli/cli.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "runtime/sampler.h"
#include "text/tokenizer.h"
#include "util/fileio.h"

int cli_int(const char *cmd, const char *flag, const char *value, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(value, &end, 10);
    if (errno || end == value || *end || v < lo || v > hi) {
        fprintf(stderr, "qmix %s: %s expects an integer in [%ld, %ld], got '%s'\n", cmd, flag, lo,
                hi, value);
        return -1;
    }
    *out = v;
    return 0;
}

int cli_double(const char *cmd, const char *flag, const char *value, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(value, &end);
    if (errno || end == value || *end) {
        fprintf(stderr, "qmix %s: %s expects a number, got '%s'\n", cmd, flag, value);
        return -1;
    }
    *out = v;
    return 0;
}

int cli_tokens(const char *cmd, const char *spec, int32_t **tokens, int *n)
{
    char *owned = NULL;
    if (spec[0] == '@') {
        qmix_err err;
        if (qmix_read_file(spec + 1, 256u << 20, &owned, NULL, &err)) {
            fprintf(stderr, "qmix %s: --tokens: %s\n", cmd, err.msg);
            return -1;
        }
        spec = owned;
    }
    size_t cap = 64;
    int count = 0;
    int32_t *ids = malloc(cap * sizeof *ids);
    const char *p = spec;
    int rc = 0;
    while (ids) {
        while (*p == ' ' || *p == ',' || *p == '\n' || *p == '\t' || *p == '\r') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX) {
            fprintf(stderr, "qmix %s: --tokens: '%.20s' is not a token id\n", cmd, p);
            rc = -1;
            break;
        }
        if ((size_t)count == cap) {
            int32_t *grown = realloc(ids, 2 * cap * sizeof *ids);
            if (!grown) {
                free(ids);
                ids = NULL;
                break;
            }
            ids = grown;
            cap *= 2;
        }
        ids[count++] = (int32_t)v;
        p = end;
    }
    free(owned);
    if (!ids) {
        fprintf(stderr, "qmix %s: out of memory\n", cmd);
        return -1;
    }
    if (!rc && count == 0) {
        fprintf(stderr, "qmix %s: --tokens: no token ids given\n", cmd);
        rc = -1;
    }
    if (rc) {
        free(ids);
        return -1;
    }
    *tokens = ids;
    *n = count;
    return 0;
}

const char *cli_value(const char *cmd, int argc, char **argv, int *i)
{
    if (*i + 1 >= argc) {
        fprintf(stderr, "qmix %s: %s needs a value\n", cmd, argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

double cli_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

uint64_t cli_peak_rss(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (uint64_t)ru.ru_maxrss * 1024;
}

void cli_human_bytes(double bytes, char *buf, size_t len)
{
    const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (bytes >= 1024 && u < 4) {
        bytes /= 1024;
        u++;
    }
    snprintf(buf, len, u ? "%.2f %s" : "%.0f %s", bytes, units[u]);
}

const char cli_sampling_help[] =
    "  --temp T            sampling temperature; 0 = greedy\n"
    "  --top-k K           keep the K most likely tokens (0 = off)\n"
    "  --top-p P           keep the smallest set of mass >= P (1 = off)\n"
    "  --min-p P           drop tokens below P x the top probability (0 = off)\n"
    "  --presence-penalty X, --frequency-penalty X\n"
    "                      subtract X once / per occurrence from generated tokens' logits\n"
    "  --repetition-penalty X  divide positive (multiply negative) logits of prompt and\n"
    "                      generated tokens by X (1 = off)\n"
    "  --profile NAME      Qwen's recommended settings: instruct-general,\n"
    "                      instruct-reasoning, thinking-general, thinking-coding\n";

int cli_sampling_option(const char *cmd, int argc, char **argv, int *i, qmix_sampling *sp)
{
    static const char *const floats[] = {"--temp", "--top-p", "--min-p", "--presence-penalty",
                                         "--frequency-penalty", "--repetition-penalty"};
    const char *flag = argv[*i], *v;
    if (!strcmp(flag, "--profile")) {
        if (!(v = cli_value(cmd, argc, argv, i))) return -1;
        if (qmix_sampling_profile(v, sp, NULL, NULL)) {
            fprintf(stderr, "qmix %s: unknown --profile '%s' (see --help)\n", cmd, v);
            return -1;
        }
        return 1;
    }
    if (!strcmp(flag, "--top-k")) {
        long k;
        if (!(v = cli_value(cmd, argc, argv, i)) || cli_int(cmd, flag, v, 0, 1 << 24, &k)) return -1;
        sp->top_k = (int)k;
        return 1;
    }
    size_t which = 0;
    while (which < sizeof floats / sizeof floats[0] && strcmp(flag, floats[which])) which++;
    if (which == sizeof floats / sizeof floats[0]) return 0;
    double x;
    if (!(v = cli_value(cmd, argc, argv, i)) || cli_double(cmd, flag, v, &x)) return -1;
    int ok = 1;
    switch (which) {
    case 0: ok = x >= 0, sp->temperature = (float)x; break;
    case 1: ok = x > 0 && x <= 1, sp->top_p = (float)x; break;
    case 2: ok = x >= 0 && x <= 1, sp->min_p = (float)x; break;
    case 3: sp->presence_penalty = (float)x; break;
    case 4: sp->frequency_penalty = (float)x; break;
    default: ok = x > 0, sp->repetition_penalty = (float)x; break;
    }
    if (!ok) fprintf(stderr, "qmix %s: %s %g is out of range\n", cmd, flag, x);
    return ok ? 1 : -1;
}

int cli_model_dir(const char *model_path, char *dir, size_t len)
{
    struct stat sb;
    if (stat(model_path, &sb)) {
        fprintf(stderr, "qmix: %s: %s\n", model_path, strerror(errno));
        return -1;
    }
    snprintf(dir, len, "%s", model_path);
    size_t plen = strlen(model_path);
    /* a GGUF holds its tokenizer and chat template: the file itself stands for the directory */
    if (!S_ISDIR(sb.st_mode) && plen > 5 && !strcmp(model_path + plen - 5, ".gguf")) return 0;
    if (!S_ISDIR(sb.st_mode)) {
        char *slash = strrchr(dir, '/');
        if (slash) *slash = 0;
        else snprintf(dir, len, ".");
    }
    return 0;
}

int cli_eval_tokens(const char *cmd, const char *model_path, const char *text_path,
                    const char *token_path, int32_t **tokens, int64_t *n)
{
    *tokens = NULL;
    *n = 0;
    if (token_path) {
        char spec[4096];
        snprintf(spec, sizeof spec, "@%s", token_path);
        int count;
        if (cli_tokens(cmd, spec, tokens, &count)) return -1;
        *n = count;
        return 0;
    }
    char dir[4096];
    if (cli_model_dir(model_path, dir, sizeof dir)) return -1;
    qmix_err err;
    qmix_tokenizer *tok = NULL;
    char *text = NULL;
    size_t len = 0, n_ids = 0;
    int rc = -1;
    if (qmix_tok_load(dir, &tok, &err)) {
        fprintf(stderr, "qmix %s: %s (pass --tokens FILE to give token ids instead)\n", cmd,
                err.msg);
        return -1;
    }
    if (qmix_read_file(text_path, (size_t)1 << 31, &text, &len, &err)) {
        fprintf(stderr, "qmix %s: %s\n", cmd, err.msg);
    } else if (qmix_tok_encode(tok, text, len, 0, tokens, &n_ids, &err)) {
        fprintf(stderr, "qmix %s: tokenizing %s: %s\n", cmd, text_path, err.msg);
    } else {
        *n = (int64_t)n_ids;
        rc = 0;
    }
    free(text);
    qmix_tok_free(tok);
    return rc;
}

int cli_eval_option(const char *cmd, int argc, char **argv, int *i, cli_eval_args *a)
{
    const char *flag = argv[*i], *v;
    if (!strcmp(flag, "--json")) return a->json = 1;
    long *num = !strcmp(flag, "--ctx")       ? &a->ctx
                : !strcmp(flag, "--windows") ? &a->windows
                : !strcmp(flag, "--threads") ? &a->threads
                                             : NULL;
    const char **str = !strcmp(flag, "--text") ? &a->text : !strcmp(flag, "--tokens") ? &a->tokens : NULL;
    if (!num && !str) return 0;
    if (!(v = cli_value(cmd, argc, argv, i))) return -1;
    if (str) {
        *str = v;
        return 1;
    }
    long lo = num == &a->ctx ? 2 : num == &a->windows ? 1 : 0;
    long hi = num == &a->threads ? 1024 : 1 << 24;
    return cli_int(cmd, flag, v, lo, hi, num) ? -1 : 1;
}

volatile sig_atomic_t cli_stop;

static void on_sigint(int sig)
{
    (void)sig;
    if (cli_stop) _exit(130); /* a second Ctrl-C: the user really wants out */
    cli_stop = 1;
}

void cli_catch_sigint(void)
{
    struct sigaction sa = {.sa_handler = on_sigint};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
}

static int progress_shown;

/* Seconds between progress lines when stderr is a log, not a terminal (QMIX_PROGRESS_SECONDS
 * overrides; 0 prints every update). */
static double log_interval(void)
{
    static double interval = -1;
    if (interval < 0) {
        const char *e = getenv("QMIX_PROGRESS_SECONDS");
        interval = e && *e ? atof(e) : 15;
        if (interval < 0) interval = 0;
    }
    return interval;
}

void cli_progress(const char *label, int64_t done, int64_t total, double t_start)
{
    double elapsed = cli_now() - t_start, frac = total > 0 ? (double)done / (double)total : 1;
    char eta[32] = "--:--";
    if (done > 0 && done < total) {
        long s = (long)(elapsed / frac * (1 - frac) + 0.5);
        snprintf(eta, sizeof eta, "%ld:%02ld", s / 60, s % 60);
    } else if (done >= total) {
        snprintf(eta, sizeof eta, "done");
    }
    if (!isatty(STDERR_FILENO)) {
        /* a log (CI, nohup, a pipe): a plain line now and then, so a long run is not silent */
        static double last_line;
        static const char *last_label;
        double now = cli_now();
        if (label != last_label) last_line = t_start;
        /* nothing for a run shorter than the interval; the final line only after others */
        if (now - last_line < log_interval()) return;
        last_line = now;
        last_label = label;
        fprintf(stderr, "%s: %lld/%lld (%.0f%%), %.0fs elapsed, ETA %s\n", label, (long long)done,
                (long long)total, 100 * frac, elapsed, eta);
        return;
    }
    int width = 30, fill = (int)(frac * width + 0.5);
    char bar[64];
    for (int i = 0; i < width; i++) bar[i] = i < fill ? '#' : '.';
    bar[width] = 0;
    fprintf(stderr, "\r%s [%s] %lld/%lld  %.0fs elapsed, ETA %s  ", label, bar, (long long)done,
            (long long)total, elapsed, eta);
    progress_shown = 1;
}

void cli_progress_end(void)
{
    if (progress_shown) fputc('\n', stderr);
    progress_shown = 0;
}

int cli_missing(const char *cmd, const char *what)
{
    fprintf(stderr, "qmix %s: missing %s (qmix %s --help for the usage)\n", cmd, what, cmd);
    return 2;
}

const char cli_kv_help[] =
    "  --kv-bits B         KV cache storage: 32 float32 (default, exact), 16 float16, 8 q8_0,\n"
    "                      4 q4_0 (blocks of 32 values with a float16 scale: 8.5 and 4.5 bits\n"
    "                      per value; quantized once per token, read quantized)\n"
    "  --kv-type T         the same by name: f32, f16, q8_0, q4_0\n";

int cli_kv_option(const char *cmd, int argc, char **argv, int *i, qmix_kv_type *kv)
{
    const char *flag = argv[*i], *v;
    int bits = !strcmp(flag, "--kv-bits");
    if (!bits && strcmp(flag, "--kv-type")) return 0;
    if (!(v = cli_value(cmd, argc, argv, i))) return -1;
    qmix_kv_type t = qmix_kv_type_parse(v);
    /* each flag takes its own spelling only, so a typo cannot pick the other meaning */
    if (t == QMIX_KV_DEFAULT || (bits && !isdigit((unsigned char)v[0])) ||
        (!bits && isdigit((unsigned char)v[0]))) {
        fprintf(stderr, "qmix %s: %s must be %s, not '%s'\n", cmd, flag,
                bits ? "32, 16, 8 or 4" : "f32, f16, q8_0 or q4_0", v);
        return -1;
    }
    *kv = t;
    return 1;
}
