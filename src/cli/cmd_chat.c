/* Interactive chat: the conversation is rendered with the Qwen3.5 chat format each turn, the
 * answer streams as it is generated (reasoning dimmed), and the parsed answer (reasoning, content,
 * tool calls) goes back into the conversation. Ctrl-C stops the answer, not the program. */
#include <errno.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/cli_mm.h"
#include "cli/commands.h"
#include "formats/config.h"
#include "model/vision.h"
#include "runtime/mm_input.h"
#include "runtime/session.h"
#include "runtime/generate.h"
#include "runtime/sampler.h"
#include "runtime/speculative.h"
#include "text/chat.h"
#include "text/tokenizer.h"
#include "text/toolcall.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix chat MODEL_DIR [options]\n\n"
            "Talk to the model. Type a message and Enter; /think and /no_think switch thinking,\n"
            "/reset starts over, /exit (or Ctrl-D) quits; Ctrl-C stops the current answer.\n"
            "/image PATH attaches a PNG or JPEG image to the next message (models with a vision\n"
            "tower; repeat for several images).\n\n"
            "  --system TEXT       system message\n"
            "  --mmproj FILE       the vision tower as llama.cpp's separate projector GGUF\n"
            "  --max-tokens N      longest answer (default 4096)\n"
            "  --no-think          start with thinking off (default on)\n"
            "  --ignore-eos        keep generating past end-of-generation tokens (benchmarks)\n"
            "  --ctx N             context size (default 8192)\n"
            "  --threads N         worker threads (default: all cores)\n"
            "  --seed S            random seed (default 0)\n"
            "  --verbose           after each answer, speculative decoding statistics (--mtp)\n"
            "%s%s%s"
            "Sampling defaults come from the model's generation_config.json.\n",
            cli_kv_help, cli_sampling_help, cli_mtp_help);
}

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    interrupted = 1;
}

typedef struct view {
    qmix_toolcall_parser *parser;
    size_t shown_reasoning, shown_content;
    int tty;
} view;

/* Prints what the parser added to reasoning (dimmed) and content since the last call. */
static void show(view *v)
{
    size_t rl, cl;
    const char *r = qmix_toolcall_reasoning(v->parser, &rl);
    const char *c = qmix_toolcall_content(v->parser, &cl);
    if (rl > v->shown_reasoning) {
        printf("%s%.*s%s", v->tty ? "\033[2m" : "", (int)(rl - v->shown_reasoning),
               r + v->shown_reasoning, v->tty ? "\033[0m" : "");
        v->shown_reasoning = rl;
    }
    if (cl > v->shown_content) {
        if (v->shown_content == 0 && v->shown_reasoning) printf("\n\n");
        printf("%.*s", (int)(cl - v->shown_content), c + v->shown_content);
        v->shown_content = cl;
    }
    fflush(stdout);
}

static void on_text(void *user, const char *text, size_t len)
{
    view *v = user;
    qmix_toolcall_feed(v->parser, text, len);
    show(v);
}

static char *read_line(void)
{
    size_t cap = 256, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        int c = getchar();
        if (c == EOF) {
            if (errno == EINTR && interrupted) { /* Ctrl-C at the prompt: an empty line */
                clearerr(stdin);
                interrupted = 0;
                buf[0] = 0;
                return buf;
            }
            if (!len) {
                free(buf);
                return NULL;
            }
            break;
        }
        if (c == '\n') break;
        if (len + 2 > cap) buf = realloc(buf, cap *= 2);
        buf[len++] = (char)c;
    }
    buf[len] = 0;
    return buf;
}

int qmix_cmd_chat(int argc, char **argv)
{
    const char *model_path = NULL, *system_text = NULL, *mmproj = NULL;
    long max_tokens = 4096, ctx = 8192, threads = 0, seed = 0;
    int thinking = 1, sampling_given = 0, ignore_eos = 0, draft = 0, verbose = 0;
    qmix_sampling sp = qmix_sampling_greedy();
    qmix_kv_type kv_type = QMIX_KV_DEFAULT;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int handled;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if ((handled = cli_kv_option("chat", argc, argv, &i, &kv_type)) != 0) {
            if (handled < 0) return 2;
        } else if ((handled = cli_sampling_option("chat", argc, argv, &i, &sp)) != 0) {
            if (handled < 0) return 2;
            sampling_given = 1;
        } else if (!strcmp(a, "--mmproj")) {
            if (!(mmproj = cli_value("chat", argc, argv, &i))) return 2;
        } else if ((handled = cli_mtp_option("chat", argc, argv, &i, &draft)) != 0) {
            if (handled < 0) return 2;
        } else if (!strcmp(a, "--verbose")) {
            verbose = 1;
        } else if (!strcmp(a, "--system")) {
            if (!(system_text = cli_value("chat", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--no-think")) {
            thinking = 0;
        } else if (!strcmp(a, "--ignore-eos")) {
            ignore_eos = 1;
        } else if (!strcmp(a, "--max-tokens") || !strcmp(a, "--ctx") || !strcmp(a, "--threads") ||
                   !strcmp(a, "--seed")) {
            long *dst = a[2] == 'm' ? &max_tokens : a[2] == 'c' ? &ctx : a[2] == 't' ? &threads : &seed;
            if (!(v = cli_value("chat", argc, argv, &i)) ||
                cli_int("chat", a, v, a[2] == 't' || a[2] == 's' ? 0 : 1, 1 << 24, dst))
                return 2;
        } else if (a[0] == '-') {
            fprintf(stderr, "qmix chat: unknown option '%s' (see --help)\n", a);
            return 2;
        } else if (!model_path) {
            model_path = a;
        } else {
            fprintf(stderr, "qmix chat: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!model_path) return cli_missing("chat", "MODEL");
    char dir[4096];
    if (cli_model_dir(model_path, dir, sizeof dir)) return 1;

    qmix_err err;
    qmix_model *model = NULL;
    qmix_session *sess = NULL;
    qmix_spec *spec = NULL;
    qmix_sampler *sampler = NULL;
    qmix_tokenizer *tok = NULL;
    json_t *messages = json_array(), *pending = json_array(); /* pending: image parts */
    qmix_vision *vision = NULL;
    int32_t *history = NULL;
    int n_history = 0, rc = 1;
    qmix_generation_config gen;
    if (qmix_model_open(model_path, &model, &err) || qmix_tok_load(dir, &tok, &err) ||
        qmix_generation_config_load(dir, &gen, &err))
        goto fail;
    char *tmpl = NULL;
    size_t tmpl_len = 0;
    qmix_err terr;
    if (qmix_chat_template_load(dir, false, &tmpl, &tmpl_len, NULL, 0, &terr) ||
        !qmix_chat_template_is_qwen35(tmpl, tmpl_len))
        fprintf(stderr, "qmix chat: %s has no official Qwen3.5 chat template; using the built-in "
                "Qwen3.5 format\n", dir);
    free(tmpl);
    if (!sampling_given) qmix_gen_sampling_defaults(&sp, &gen); /* the model's own defaults */
    sp.seed = (uint64_t)seed;
    int32_t stop_ids[QMIX_MAX_EOS + 1];
    int n_stop = qmix_gen_chat_stop_ids(&gen, tok, stop_ids);

    qmix_session_opts opts = {.max_ctx = (int)ctx, .n_threads = (int)threads, .kv_type = kv_type};
    if (qmix_session_new(model, &opts, &sess, &err)) goto fail;
    if (draft && qmix_spec_new(sess, draft, &spec, &err)) goto fail;
    sampler = qmix_sampler_new(&sp, qmix_model_config(model)->vocab_size);
    history = malloc(sizeof *history * (size_t)ctx);
    if (!sampler || !history || !messages) {
        snprintf(err.msg, sizeof err.msg, "out of memory");
        goto fail;
    }
    if (system_text)
        json_array_append_new(messages, json_pack("{s:s, s:s}", "role", "system", "content",
                                                  system_text));
    struct sigaction sa = {.sa_handler = on_sigint}; /* no SA_RESTART: Ctrl-C interrupts reads */
    sigaction(SIGINT, &sa, NULL);
    int tty = isatty(STDOUT_FILENO) && isatty(STDIN_FILENO);
    for (;;) {
        printf("%s", tty ? (thinking ? "\n> " : "\n(no think) > ") : "> ");
        fflush(stdout);
        char *line = read_line();
        if (!line) break;
        if (!line[0]) {
            free(line);
            continue;
        }
        if (!strcmp(line, "/exit") || !strcmp(line, "/quit")) {
            free(line);
            break;
        }
        if (!strcmp(line, "/think") || !strcmp(line, "/no_think")) {
            thinking = line[1] == 't';
            printf("thinking %s\n", thinking ? "on" : "off");
            free(line);
            continue;
        }
        if (!strncmp(line, "/image", 6) && (line[6] == ' ' || !line[6])) {
            const char *path = line + 6;
            while (*path == ' ') path++;
            qmix_image probe;
            qmix_err ierr;
            if (!*path) {
                printf("usage: /image PATH\n");
            } else if (!vision && cli_mm_vision(model, mmproj, tok, &vision, &ierr)) {
                printf("cannot attach an image: %s\n", ierr.msg);
            } else if (qmix_image_load(path, &probe, &ierr)) {
                printf("cannot attach %s: %s\n", path, ierr.msg);
            } else {
                printf("image attached (%dx%d); it goes with your next message\n", probe.width,
                       probe.height);
                qmix_image_free(&probe);
                json_array_append_new(pending, json_pack("{s:s, s:{s:s}}", "type", "image_url",
                                                         "image_url", "url", path));
            }
            free(line);
            continue;
        }
        if (!strcmp(line, "/reset")) {
            n_history = 0; /* a new conversation's images may differ under the same token ids */
            json_array_clear(pending);
            json_array_clear(messages);
            if (system_text)
                json_array_append_new(messages, json_pack("{s:s, s:s}", "role", "system",
                                                          "content", system_text));
            printf("conversation cleared\n");
            free(line);
            continue;
        }
        if (json_array_size(pending)) {
            json_array_append_new(pending, json_pack("{s:s, s:s}", "type", "text", "text", line));
            json_array_append_new(messages, json_pack("{s:s, s:o}", "role", "user", "content",
                                                      pending));
            pending = json_array();
        } else {
            json_array_append_new(messages, json_pack("{s:s, s:s}", "role", "user", "content", line));
        }
        free(line);

        qmix_chat_opts co;
        qmix_chat_opts_default(&co);
        co.enable_thinking = thinking;
        /* the whole conversation, images encoded again each turn (the tower is cheap next to
         * the answer at chat sizes) */
        qmix_mm_request req;
        if (qmix_mm_request_build(model, vision, sess->pool, tok, messages, NULL, &co, 1, 64, &req,
                                  &err)) {
            if (!vision) goto fail;
            fprintf(stderr, "qmix chat: %s\n", err.msg); /* a bad image: drop the message */
            json_array_remove(messages, json_array_size(messages) - 1);
            continue;
        }
        size_t n_prompt = (size_t)req.prompt.n;
        if ((long)n_prompt + 1 >= ctx) {
            fprintf(stderr, "qmix chat: the conversation (%zu tokens) fills the context (%ld); "
                    "/reset or use --ctx\n", n_prompt, ctx);
            json_array_remove(messages, json_array_size(messages) - 1);
            qmix_mm_request_free(&req);
            continue;
        }
        view v = {.parser = qmix_toolcall_parser_new(NULL, thinking), .tty = tty};
        qmix_gen_opts go = {.max_tokens = (int)(max_tokens < ctx - (long)n_prompt
                                                     ? max_tokens : ctx - (long)n_prompt),
                            .stop_ids = stop_ids, .n_stop_ids = ignore_eos ? 0 : n_stop,
                            .cancel = &interrupted, .spec = spec};
        qmix_gen_result res;
        interrupted = 0;
        qmix_sampler_reset(sampler);
        int grc = qmix_generate_mm(sess, sampler, tok, req.prompt.tokens, req.prompt.embeds,
                                   req.prompt.pos3, (int)n_prompt, history, &n_history, &go,
                                   on_text, &v, &res, &err);
        qmix_mm_request_free(&req);
        if (grc) {
            qmix_toolcall_parser_free(v.parser);
            goto fail;
        }
        qmix_toolcall_finish(v.parser);
        show(&v);
        size_t rl, cl;
        const char *r = qmix_toolcall_reasoning(v.parser, &rl);
        const char *c = qmix_toolcall_content(v.parser, &cl);
        json_t *answer = json_pack("{s:s, s:s#}", "role", "assistant", "content", c, cl);
        if (rl) json_object_set_new(answer, "reasoning_content", json_stringn(r, rl));
        json_array_append_new(messages, answer);
        if (res.finish == QMIX_FINISH_CANCEL) printf("\n[stopped]");
        if (tty) {
            /* the reasoning's dim attribute ends on stdout before the status goes to stderr, so
             * the status line is never drawn dimmed whatever the two streams' buffering */
            printf("\033[0m");
            fflush(stdout);
            fprintf(stderr, "\n[%d tokens, %.1f tok/s]", res.n_generated,
                    res.decode_s > 0 ? res.n_generated / res.decode_s : 0.0);
        }
        if (verbose && spec) {
            fprintf(stderr, "\n[since the start] ");
            cli_mtp_report(stderr, spec);
        }
        printf("\n");
        qmix_toolcall_parser_free(v.parser);
    }
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "qmix chat: %s\n", err.msg);
done:
    json_decref(messages);
    json_decref(pending);
    qmix_vision_free(vision);
    free(history);
    qmix_tok_free(tok);
    qmix_sampler_free(sampler);
    qmix_spec_free(spec);
    qmix_session_free(sess);
    qmix_model_close(model);
    return rc;
}
