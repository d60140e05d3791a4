#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/cli_mm.h"
#include "cli/commands.h"
#include "kernels/kernels.h"
#include "formats/config.h"
#include "runtime/generate.h"
#include "runtime/sampler.h"
#include "runtime/session.h"
#include "runtime/speculative.h"
#include "text/tokenizer.h"
#include "util/fileio.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix generate MODEL (--tokens \"IDS\" | -p TEXT | --image F... -p TEXT |\n"
            "                            --messages conv.json) [-n N] [options]\n\n"
            "Continues a token sequence and prints the new token ids (--tokens), or continues a\n"
            "text with the model's tokenizer and streams the new text (-p); then prefill and decode\n"
            "tok/s on stderr.\n\n"
            "  --tokens IDS        prompt token ids separated by spaces or commas, or @FILE\n"
            "  -p TEXT             prompt text (raw: no chat template; see qmix chat), or @FILE;\n"
            "                      sampling then defaults to the model's generation_config.json\n"
            "                      (--tokens: greedy)\n"
            "  --stop STR          with -p: stop before this text (repeatable)\n"
            "  --image FILE        a PNG or JPEG image (repeatable, before the -p text): the\n"
            "                      prompt is one chat-formatted user message of the images and\n"
            "                      the text; the model needs a vision tower\n"
            "  --messages FILE     OpenAI-style chat messages (JSON list, or {\"messages\": [...]})\n"
            "                      rendered with the chat format; image parts as\n"
            "                      {\"type\": \"image_url\", \"image_url\": {\"url\": \"file://PATH\"}} or\n"
            "                      data:image/...;base64 URLs\n"
            "  --mmproj FILE       the vision tower as llama.cpp's separate projector GGUF (for\n"
            "                      a GGUF model; written beside it by qmix convert --to gguf)\n"
            "  --no-think          with --image / --messages: thinking off (empty think block)\n"
            "  --ignore-eos        with --image / --messages: generate past end-of-turn tokens\n"
            "  --print-ids         with --image / --messages: print generated token ids (one per\n"
            "                      line) instead of text\n"
            "  -n N                tokens to generate (default 16)\n"
            "%s"            "  --seed S            random seed for sampling (default 0)\n"
            "  --threads N         worker threads (default: all cores)\n"
            "  --ctx N             context size (default: prompt + n)\n"
            "  --stop-at-eos       stop at the model's end-of-generation tokens (always with -p)\n"
            "%s%s",
            cli_sampling_help, cli_kv_help, cli_mtp_help);
}

/* --kv-bits / --kv-type, for both paths */
static qmix_kv_type kv_type;

/* user: where to note whether the text so far ends a line (NULL: not tracked) */
static void print_text(void *user, const char *text, size_t len)
{
    int *ends_line = user;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    if (len && ends_line) *ends_line = text[len - 1] == '\n';
}

/* After streamed text: the output ends a line, as any text file does; then how the generation
 * ended and its speed, on stderr. */
static void end_text(const qmix_gen_result *res, int ends_line, int n_images)
{
    static const char *finish[] = {"stop", "length", "cancelled"};
    if (!ends_line) putchar('\n');
    fflush(stdout);
    char images[32] = "";
    if (n_images) snprintf(images, sizeof images, " (%d image%s)", n_images, n_images > 1 ? "s" : "");
    fprintf(stderr, "[%s] prefill: %d tokens%s in %.3f s (%.1f tok/s); decode: %d tokens in "
            "%.3f s (%.1f tok/s)\n", finish[res->finish], res->n_prompt, images, res->prefill_s,
            res->prefill_s > 0 ? res->n_prompt / res->prefill_s : 0.0, res->n_generated,
            res->decode_s, res->decode_s > 0 ? res->n_generated / res->decode_s : 0.0);
}

/* -p: text in, streamed text out, stopping at the model's end-of-generation tokens. */
static int generate_text(const char *model_path, const char *text, const char *const *stops,
                         int n_stops, qmix_sampling sp, int sampling_given, long n_gen, long seed,
                         long threads, long ctx, int draft)
{
    qmix_err err;
    qmix_model *model = NULL;
    qmix_session *sess = NULL;
    qmix_spec *spec = NULL;
    qmix_sampler *sampler = NULL;
    qmix_tokenizer *tok = NULL;
    char *owned = NULL, dir[4096];
    int32_t *prompt = NULL, *history = NULL;
    size_t n_prompt = 0;
    int rc = 1;
    qmix_generation_config gen;
    if (cli_model_dir(model_path, dir, sizeof dir)) goto usage_fail;
    if (text[0] == '@') {
        if (qmix_read_file(text + 1, 64u << 20, &owned, NULL, &err)) goto fail;
        text = owned;
    }
    if (qmix_model_open(model_path, &model, &err) || qmix_tok_load(dir, &tok, &err) ||
        qmix_generation_config_load(dir, &gen, &err) ||
        qmix_tok_encode(tok, text, strlen(text), 1, &prompt, &n_prompt, &err))
        goto fail;
    if (!n_prompt) {
        snprintf(err.msg, sizeof err.msg, "the prompt encodes to no tokens");
        goto fail;
    }
    if (!ctx) ctx = (long)n_prompt + n_gen;
    qmix_session_opts opts = {.max_ctx = (int)ctx, .n_threads = (int)threads, .kv_type = kv_type};
    if (!sampling_given) qmix_gen_sampling_defaults(&sp, &gen); /* the model's own defaults */
    sp.seed = (uint64_t)seed;
    if (qmix_session_new(model, &opts, &sess, &err)) goto fail;
    if (draft && qmix_spec_new(sess, draft, &spec, &err)) goto fail;
    sampler = qmix_sampler_new(&sp, qmix_model_config(model)->vocab_size);
    history = malloc(sizeof *history * (size_t)ctx);
    if (!sampler || !history) {
        snprintf(err.msg, sizeof err.msg, "out of memory");
        goto fail;
    }
    int n_history = 0, ends_line = 1;
    qmix_gen_opts go = {.max_tokens = (int)n_gen, .stop_ids = gen.eos, .n_stop_ids = gen.n_eos,
                        .stop_strings = stops, .n_stop_strings = n_stops, .spec = spec};
    qmix_gen_result res;
    if (qmix_generate(sess, sampler, tok, prompt, (int)n_prompt, history, &n_history, &go,
                      print_text, &ends_line, &res, &err))
        goto fail;
    end_text(&res, ends_line, 0);
    if (spec) cli_mtp_report(stderr, spec);
    rc = 0;
    goto done;
usage_fail:
    rc = 2;
    goto done;
fail:
    fprintf(stderr, "qmix generate: %s\n", err.msg);
done:
    free(owned);
    free(prompt);
    free(history);
    qmix_tok_free(tok);
    qmix_sampler_free(sampler);
    qmix_spec_free(spec);
    qmix_session_free(sess);
    qmix_model_close(model);
    return rc;
}

/* --messages / --image: a chat-formatted prompt, with images through the vision tower. */
static int generate_messages(const char *model_path, const char *messages_path,
                             const char *const *images, int n_images, const char *text,
                             qmix_sampling sp, int sampling_given, long n_gen, long seed,
                             long threads, long ctx, int ignore_eos, int print_ids, int think,
                             const char *mmproj)
{
    qmix_err err;
    qmix_model *model = NULL;
    qmix_session *sess = NULL;
    qmix_sampler *sampler = NULL;
    qmix_tokenizer *tok = NULL;
    qmix_mm_request req = {0};
    json_t *messages = NULL;
    int32_t *history = NULL;
    char dir[4096];
    int rc = 1;
    qmix_generation_config gen;
    if (cli_model_dir(model_path, dir, sizeof dir)) return 2;
    if (!(messages = cli_mm_messages(messages_path, images, n_images, text, &err)) ||
        qmix_model_open(model_path, &model, &err) ||
        qmix_generation_config_load(dir, &gen, &err) ||
        cli_mm_request(model, dir, mmproj, messages, (int)threads, think, &tok, &req, &err))
        goto fail;
    const qmix_mm_prompt *mp = &req.prompt;
    if (!ctx) ctx = (long)mp->n + n_gen;
    qmix_session_opts opts = {.max_ctx = (int)ctx, .n_threads = (int)threads, .kv_type = kv_type};
    if (!sampling_given) qmix_gen_sampling_defaults(&sp, &gen);
    sp.seed = (uint64_t)seed;
    if (qmix_session_new(model, &opts, &sess, &err)) goto fail;
    sampler = qmix_sampler_new(&sp, qmix_model_config(model)->vocab_size);
    history = malloc(sizeof *history * (size_t)ctx);
    if (!sampler || !history) {
        snprintf(err.msg, sizeof err.msg, "out of memory");
        goto fail;
    }
    int32_t stop[QMIX_MAX_EOS + 1];
    int n_stop = ignore_eos ? 0 : qmix_gen_chat_stop_ids(&gen, tok, stop);
    if (print_ids) { /* ids, one per line, as --tokens prints them */
        double t0 = cli_now();
        if (qmix_session_prefill_mm(sess, mp->tokens, mp->n, mp->embeds, mp->pos3, NULL, &err))
            goto fail;
        qmix_sampler_add_prompt(sampler, mp->tokens, mp->n);
        double t1 = cli_now();
        int generated = 0;
        for (; generated < n_gen; generated++) {
            int32_t next = qmix_sampler_sample(sampler, qmix_session_logits(sess));
            int is_stop = 0;
            for (int k = 0; k < n_stop; k++) is_stop |= next == stop[k];
            if (is_stop) break;
            qmix_sampler_accept(sampler, next);
            printf("%d\n", next);
            fflush(stdout);
            if (generated + 1 < n_gen && qmix_session_decode(sess, next, &err)) goto fail;
        }
        fprintf(stderr, "prefill: %d tokens (%d images) in %.3f s; %d tokens generated in %.3f s\n",
                mp->n, req.n_images, t1 - t0, generated, cli_now() - t1);
    } else {
        int n_history = 0, ends_line = 1;
        qmix_gen_opts go = {.max_tokens = (int)n_gen, .stop_ids = stop, .n_stop_ids = n_stop};
        qmix_gen_result res;
        if (qmix_generate_mm(sess, sampler, tok, mp->tokens, mp->embeds, mp->pos3, mp->n, history,
                             &n_history, &go, print_text, &ends_line, &res, &err))
            goto fail;
        end_text(&res, ends_line, req.n_images);
    }
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "qmix generate: %s\n", err.msg);
done:
    free(history);
    qmix_mm_request_free(&req);
    json_decref(messages);
    qmix_tok_free(tok);
    qmix_sampler_free(sampler);
    qmix_session_free(sess);
    qmix_model_close(model);
    return rc;
}

/* --tokens with --mtp: each generated id printed as it is decided. */
typedef struct ids_out {
    qmix_sampler *sampler;
    long n_gen, generated;
    int stop_at_eos, eos;
} ids_out;

static int emit_id(void *user, int32_t id, const float *logits, qmix_err *err)
{
    (void)logits;
    (void)err;
    ids_out *o = user;
    if (o->generated >= o->n_gen) return 1;
    qmix_sampler_accept(o->sampler, id);
    printf("%d\n", id);
    fflush(stdout);
    o->generated++;
    if (o->stop_at_eos && id == o->eos) return 1;
    return o->generated >= o->n_gen;
}

int qmix_cmd_generate(int argc, char **argv)
{
    const char *model_path = NULL, *tokens_spec = NULL, *prompt_text = NULL;
    const char *stops[16], *images[CLI_MAX_IMAGES], *messages_path = NULL, *mmproj = NULL;
    int n_stops = 0, n_images = 0, ignore_eos = 0, print_ids = 0, think = 1;
    long n_gen = 16, threads = 0, seed = 0, ctx = 0;
    qmix_sampling sp = qmix_sampling_greedy();
    int stop_at_eos = 0, sampling_given = 0, draft = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int handled;
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
        } else if ((handled = cli_kv_option("generate", argc, argv, &i, &kv_type)) != 0) {
            if (handled < 0) return 2;
        } else if ((handled = cli_sampling_option("generate", argc, argv, &i, &sp)) != 0) {
            if (handled < 0) return 2;
            sampling_given = 1;
        } else if ((handled = cli_mtp_option("generate", argc, argv, &i, &draft)) != 0) {
            if (handled < 0) return 2;
        } else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) {
            if (!(prompt_text = cli_value("generate", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--stop")) {
            if (!(v = cli_value("generate", argc, argv, &i))) return 2;
            if (n_stops == 16) {
                fprintf(stderr, "qmix generate: at most 16 --stop strings\n");
                return 2;
            }
            stops[n_stops++] = v;
        } else if (!strcmp(a, "--image")) {
            if (!(v = cli_value("generate", argc, argv, &i))) return 2;
            if (n_images == CLI_MAX_IMAGES) {
                fprintf(stderr, "qmix generate: at most %d --image files\n", CLI_MAX_IMAGES);
                return 2;
            }
            images[n_images++] = v;
        } else if (!strcmp(a, "--messages")) {
            if (!(messages_path = cli_value("generate", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--mmproj")) {
            if (!(mmproj = cli_value("generate", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--ignore-eos")) {
            ignore_eos = 1;
        } else if (!strcmp(a, "--print-ids")) {
            print_ids = 1;
        } else if (!strcmp(a, "--no-think")) {
            think = 0;
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
    if (model_path && (messages_path || n_images)) {
        if (tokens_spec || (messages_path && (n_images || prompt_text))) {
            fprintf(stderr, "qmix generate: --messages takes no --tokens, -p or --image; --image "
                    "takes -p, not --tokens\n");
            return 2;
        }
        return generate_messages(model_path, messages_path, images, n_images, prompt_text, sp,
                                 sampling_given, n_gen, seed, threads, ctx, ignore_eos, print_ids,
                                 think, mmproj);
    }
    if (!model_path) return cli_missing("generate", "MODEL");
    if (!tokens_spec == !prompt_text) {
        fprintf(stderr, "qmix generate: give exactly one of -p TEXT and --tokens IDS (or --image, --messages)\n");
        return 2;
    }
    if (prompt_text)
        return generate_text(model_path, prompt_text, stops, n_stops, sp, sampling_given, n_gen,
                             seed, threads, ctx, draft);
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
    qmix_spec *spec = NULL;
    int rc = 1;
    if (qmix_model_open(model_path, &model, &err)) goto fail;
    const qmix_config *cfg = qmix_model_config(model);
    qmix_session_opts opts = {.max_ctx = (int)ctx, .n_threads = (int)threads, .kv_type = kv_type};
    if (qmix_session_new(model, &opts, &sess, &err)) goto fail;
    sp.seed = (uint64_t)seed;
    sampler = qmix_sampler_new(&sp, cfg->vocab_size);
    if (!sampler) {
        snprintf(err.msg, sizeof err.msg, "out of memory for the sampler");
        goto fail;
    }
    qmix_sampler_add_prompt(sampler, prompt, n_prompt);

    double t0 = cli_now(), t1;
    int generated = 0;
    if (draft) {
        if (qmix_spec_new(sess, draft, &spec, &err) ||
            qmix_spec_prefill(spec, prompt, n_prompt, &err))
            goto fail;
        t1 = cli_now();
        ids_out o = {sampler, n_gen, 0, stop_at_eos, cfg->eos_token_id};
        if (n_gen && qmix_spec_generate(spec, sampler, emit_id, &o, NULL, NULL, NULL, &err))
            goto fail;
        generated = (int)o.generated;
    } else {
        if (qmix_session_prefill(sess, prompt, n_prompt, NULL, &err)) goto fail;
        t1 = cli_now();
    }
    for (; !draft && generated < n_gen; generated++) {
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
            "(%.1f tok/s); %d threads, %s kernels, %s KV cache; peak RSS %.1f MiB\n",
            n_prompt, t1 - t0, n_prompt / (t1 - t0), steps, t2 - t1,
            steps ? steps / (t2 - t1) : 0.0, qmix_session_threads(sess),
            qk_isa_name(qk_isa_active()), qmix_kv_type_name(kv_type), cli_peak_rss() / 1048576.0);
    if (spec) cli_mtp_report(stderr, spec);
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "qmix generate: %s\n", err.msg);
done:
    free(prompt);
    qmix_sampler_free(sampler);
    qmix_spec_free(spec);
    qmix_session_free(sess);
    qmix_model_close(model);
    return rc;
}
