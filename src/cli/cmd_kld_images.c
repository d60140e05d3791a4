/* `qmix kld BASE QUANT --images DIR --prompt TEXT`: what quantizing costs on images. For each PNG
 * or JPEG in DIR, one chat turn (the image, then TEXT); BASE answers greedily, and both models
 * are scored on that answer (each through its own vision tower): KL(P_base || P_quant) per answer
 * token, summarised over all images, and top-1 agreement. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cli/cli.h"
#include "cli/cli_mm.h"
#include "cli/commands.h"
#include "eval/kld.h"
#include "eval/stats.h"
#include "formats/config.h"
#include "runtime/generate.h"
#include "runtime/session.h"
#include "util/err.h"

#define MAX_IMAGES 4096

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix kld BASE QUANT --images DIR --prompt TEXT [options]\n\n"
            "KL divergence on images: for each PNG or JPEG in DIR (sorted by name), one user turn\n"
            "(the image, then TEXT) in the chat format; BASE answers greedily (up to --answer-tokens,\n"
            "stopping at the end of its turn), and both models are scored on that answer, each\n"
            "through its own vision tower: KL(P_base || P_quant) per answer token (mean, median,\n"
            "p90, p99, max over all of them), per image, and top-1 agreement.\n\n"
            "  --images DIR        the images\n"
            "  --prompt TEXT       the question asked with each image\n"
            "  --answer-tokens N   longest answer scored (default 64)\n"
            "  --mmproj FILE       BASE's vision tower as an mmproj GGUF (a GGUF BASE)\n"
            "  --quant-mmproj FILE QUANT's (a GGUF QUANT)\n"
            "  --no-think          thinking off (empty think block)\n"
            "  --ctx N             context per model (default 8192)\n"
            "  --threads N         worker threads (default: all cores)\n"
            "  --json              one JSON object on stdout: mean, median, p90, p99, max, top1,\n"
            "                      tokens, images (per image: file, tokens, mean, top1)\n");
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int is_image_name(const char *n)
{
    const char *dot = strrchr(n, '.');
    return dot && (!strcasecmp(dot, ".png") || !strcasecmp(dot, ".jpg") || !strcasecmp(dot, ".jpeg"));
}

typedef struct side {
    const char *path, *mmproj;
    qmix_model *model;
    qmix_session *sess;
    char dir[4096];
} side;

/* One image through both models: appends the answer tokens' KLDs to kld[*n] and counts top-1. */
static int score_image(side *s, const char *image, const char *prompt, int think, int threads,
                       int max_answer, const int32_t *stop, int n_stop, double *kld, int64_t *n,
                       int64_t *top1, qmix_err *err)
{
    const char *images[1] = {image};
    json_t *msgs = cli_mm_messages(NULL, images, 1, prompt, err);
    qmix_tokenizer *tok[2] = {NULL, NULL};
    qmix_mm_request req[2];
    memset(req, 0, sizeof req);
    int V = qmix_model_config(s[0].model)->vocab_size, rc = -1;
    float *base_rows = malloc(sizeof *base_rows * (size_t)max_answer * V);
    int32_t *answer = malloc(sizeof *answer * (size_t)max_answer);
    if (!msgs || !base_rows || !answer) {
        if (msgs) qmix_errf(err, "out of memory");
        goto done;
    }
    for (int k = 0; k < 2; k++)
        if (cli_mm_request(s[k].model, s[k].dir, s[k].mmproj, msgs, threads, think, &tok[k],
                           &req[k], err)) {
            qmix_err_prefix(err, "%s", s[k].path);
            goto done;
        }
    const qmix_mm_prompt *p = &req[0].prompt, *q = &req[1].prompt;
    if (p->n != q->n || memcmp(p->tokens, q->tokens, sizeof *p->tokens * (size_t)p->n)) {
        qmix_errf(err, "BASE and QUANT render different prompts (tokenizers or image sizes differ)");
        goto done;
    }
    if (p->n + max_answer > s[0].sess->max_ctx) {
        qmix_errf(err, "the prompt has %d tokens: too long for the context", p->n);
        goto done;
    }
    /* BASE answers greedily; its logits for each answer token are kept */
    qmix_session_reset(s[0].sess);
    if (qmix_session_prefill_mm(s[0].sess, p->tokens, p->n, p->embeds, p->pos3, NULL, err))
        goto done;
    int len = 0;
    for (; len < max_answer; len++) {
        const float *l = qmix_session_logits(s[0].sess);
        memcpy(base_rows + (size_t)len * V, l, sizeof *l * (size_t)V);
        int32_t id = qmix_argmax(l, V);
        answer[len] = id;
        int end = 0;
        for (int k = 0; k < n_stop; k++) end |= id == stop[k];
        if (end) {
            len++;
            break;
        }
        if (len + 1 < max_answer && qmix_session_decode(s[0].sess, id, err)) goto done;
    }
    /* QUANT on the same prompt and answer */
    qmix_session_reset(s[1].sess);
    if (qmix_session_prefill_mm(s[1].sess, q->tokens, q->n, q->embeds, q->pos3, NULL, err))
        goto done;
    for (int t = 0; t < len; t++) {
        const float *l = qmix_session_logits(s[1].sess), *b = base_rows + (size_t)t * V;
        kld[(*n)++] = qmix_kld_full(b, l, V);
        *top1 += qmix_argmax(l, V) == answer[t];
        if (t + 1 < len && qmix_session_decode(s[1].sess, answer[t], err)) goto done;
    }
    rc = 0;
done:
    for (int k = 0; k < 2; k++) {
        qmix_mm_request_free(&req[k]);
        qmix_tok_free(tok[k]);
    }
    json_decref(msgs);
    free(base_rows);
    free(answer);
    return rc;
}

int qmix_cmd_kld_images(int argc, char **argv)
{
    side s[2];
    memset(s, 0, sizeof s);
    const char *dir_path = NULL, *prompt = NULL, *v;
    long answer_tokens = 64, threads = 0, ctx = 8192;
    int think = 1, json = 0, n_paths = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--images")) {
            if (!(dir_path = cli_value("kld", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--prompt") || !strcmp(a, "-p")) {
            if (!(prompt = cli_value("kld", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--mmproj")) {
            if (!(s[0].mmproj = cli_value("kld", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--quant-mmproj")) {
            if (!(s[1].mmproj = cli_value("kld", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--answer-tokens")) {
            if (!(v = cli_value("kld", argc, argv, &i)) ||
                cli_int("kld", a, v, 1, 1 << 16, &answer_tokens))
                return 2;
        } else if (!strcmp(a, "--ctx")) {
            if (!(v = cli_value("kld", argc, argv, &i)) || cli_int("kld", a, v, 64, 1 << 20, &ctx))
                return 2;
        } else if (!strcmp(a, "--threads")) {
            if (!(v = cli_value("kld", argc, argv, &i)) || cli_int("kld", a, v, 0, 1024, &threads))
                return 2;
        } else if (!strcmp(a, "--no-think")) {
            think = 0;
        } else if (!strcmp(a, "--json")) {
            json = 1;
        } else if (a[0] == '-') {
            fprintf(stderr, "qmix kld: unknown option '%s' with --images (see --images --help)\n", a);
            return 2;
        } else if (n_paths < 2) {
            s[n_paths++].path = a;
        } else {
            fprintf(stderr, "qmix kld: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (n_paths != 2 || !dir_path || !prompt) {
        usage(stderr);
        return 2;
    }
    char *names[MAX_IMAGES];
    int n_images = 0;
    DIR *d = opendir(dir_path);
    if (!d) {
        fprintf(stderr, "qmix kld: cannot open --images %s\n", dir_path);
        return 1;
    }
    struct dirent *e;
    while ((e = readdir(d)) && n_images < MAX_IMAGES)
        if (e->d_name[0] != '.' && is_image_name(e->d_name)) names[n_images++] = strdup(e->d_name);
    closedir(d);
    qsort(names, (size_t)n_images, sizeof *names, cmp_name);
    qmix_err err;
    int rc = 1;
    double *kld = malloc(sizeof *kld * (size_t)(n_images ? n_images : 1) * (size_t)answer_tokens);
    double *per_mean = calloc((size_t)(n_images ? n_images : 1), sizeof *per_mean);
    int64_t *per_n = calloc((size_t)(n_images ? n_images : 1), sizeof *per_n),
            *per_top1 = calloc((size_t)(n_images ? n_images : 1), sizeof *per_top1);
    qmix_generation_config gen;
    int32_t stop[QMIX_MAX_EOS + 1];
    int n_stop = 0;
    qmix_tokenizer *tok = NULL;
    if (!kld || !per_mean || !per_n || !per_top1) {
        snprintf(err.msg, sizeof err.msg, "out of memory");
        goto fail;
    }
    if (!n_images) {
        snprintf(err.msg, sizeof err.msg, "%s holds no .png or .jpg images", dir_path);
        goto fail;
    }
    for (int k = 0; k < 2; k++) {
        if (cli_model_dir(s[k].path, s[k].dir, sizeof s[k].dir)) goto fail_quiet;
        qmix_session_opts o = {.max_ctx = (int)ctx, .n_threads = (int)threads};
        if (qmix_model_open(s[k].path, &s[k].model, &err) ||
            qmix_session_new(s[k].model, &o, &s[k].sess, &err)) {
            qmix_err_prefix(&err, "%s", s[k].path);
            goto fail;
        }
    }
    if (qmix_model_config(s[0].model)->vocab_size != qmix_model_config(s[1].model)->vocab_size) {
        snprintf(err.msg, sizeof err.msg, "BASE and QUANT have different vocabularies");
        goto fail;
    }
    if (qmix_generation_config_load(s[0].dir, &gen, &err) || qmix_tok_load(s[0].dir, &tok, &err))
        goto fail;
    n_stop = qmix_gen_chat_stop_ids(&gen, tok, stop);
    int64_t n = 0, top1 = 0;
    for (int i = 0; i < n_images; i++) {
        char path[8192];
        snprintf(path, sizeof path, "%s/%s", dir_path, names[i]);
        int64_t before = n, t1 = top1;
        if (score_image(s, path, prompt, think, (int)threads, (int)answer_tokens, stop, n_stop, kld,
                        &n, &top1, &err)) {
            qmix_err_prefix(&err, "%s", path);
            goto fail;
        }
        per_n[i] = n - before;
        per_top1[i] = top1 - t1;
        for (int64_t t = before; t < n; t++) per_mean[i] += kld[t];
        if (per_n[i]) per_mean[i] /= (double)per_n[i];
        if (!json)
            fprintf(stderr, "%-32s %4lld answer tokens  mean KLD %.5f  top-1 %.1f %%\n", names[i],
                    (long long)per_n[i], per_mean[i],
                    per_n[i] ? 100.0 * (double)per_top1[i] / (double)per_n[i] : 0.0);
    }
    qmix_summary sm;
    qmix_summarize(kld, n, 0, &sm);
    double t1p = n ? (double)top1 / (double)n : 0;
    if (json) {
        json_t *imgs = json_array();
        for (int i = 0; i < n_images; i++)
            json_array_append_new(imgs, json_pack("{s:s, s:I, s:f, s:f}", "file", names[i],
                                                  "tokens", (json_int_t)per_n[i], "mean",
                                                  per_mean[i], "top1",
                                                  per_n[i] ? (double)per_top1[i] / (double)per_n[i]
                                                           : 0.0));
        json_t *o = json_pack("{s:f, s:f, s:f, s:f, s:f, s:f, s:I, s:o}", "mean", sm.mean,
                              "median", sm.median, "p90", sm.p90, "p99", sm.p99, "max", sm.max,
                              "top1", t1p, "tokens", (json_int_t)n, "images", imgs);
        char *text = json_dumps(o, JSON_COMPACT);
        printf("%s\n", text);
        free(text);
        json_decref(o);
    } else {
        printf("KLD on images: %d images, %lld answer tokens: mean %.5f, median %.5f, p90 %.5f, "
               "p99 %.5f, max %.5f; top-1 agreement %.2f %%\n", n_images, (long long)n, sm.mean,
               sm.median, sm.p90, sm.p99, sm.max, 100 * t1p);
    }
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "qmix kld: %s\n", err.msg);
fail_quiet:
done:
    for (int i = 0; i < n_images; i++) free(names[i]);
    for (int k = 0; k < 2; k++) {
        qmix_session_free(s[k].sess);
        qmix_model_close(s[k].model);
    }
    qmix_tok_free(tok);
    free(kld);
    free(per_mean);
    free(per_n);
    free(per_top1);
    return rc;
}
