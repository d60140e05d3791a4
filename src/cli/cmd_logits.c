#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/cli_mm.h"
#include "cli/commands.h"
#include "runtime/session.h"
#include "util/fileio.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix logits MODEL (--tokens \"IDS\" | --messages conv.json) --out FILE [options]\n\n"
            "Writes raw little-endian float32 logits [n_tokens, vocab], row-major: row i holds the\n"
            "logits after token i.\n\n"
            "  --tokens IDS        token ids separated by spaces or commas, or @FILE\n"
            "  --messages FILE     OpenAI-style chat messages rendered with the chat format, image\n"
            "                      parts (file:// or data: URLs) through the vision tower\n"
            "  --tokens-out FILE   with --messages: the rendered prompt's ids (space separated)\n"
            "  --no-think          with --messages: thinking off\n"
            "  --mmproj FILE       the vision tower as llama.cpp's separate projector GGUF\n"
            "  --out FILE          output file\n"
            "  --mode MODE         prefill: one batched pass (default); decode: one token per step\n"
            "  --threads N         worker threads (default: all cores)\n");
}

int qmix_cmd_logits(int argc, char **argv)
{
    const char *model_path = NULL, *tokens_spec = NULL, *out_path = NULL, *mode = "prefill";
    const char *messages_path = NULL, *tokens_out = NULL, *mmproj = NULL;
    long threads = 0;
    int think = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--tokens")) {
            if (!(tokens_spec = cli_value("logits", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--out") || !strcmp(a, "-o")) {
            if (!(out_path = cli_value("logits", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--messages")) {
            if (!(messages_path = cli_value("logits", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--tokens-out")) {
            if (!(tokens_out = cli_value("logits", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--mmproj")) {
            if (!(mmproj = cli_value("logits", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--no-think")) {
            think = 0;
        } else if (!strcmp(a, "--mode")) {
            if (!(mode = cli_value("logits", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--threads")) {
            if (!(v = cli_value("logits", argc, argv, &i)) ||
                cli_int("logits", a, v, 0, 1024, &threads))
                return 2;
        } else if (a[0] == '-') {
            fprintf(stderr, "qmix logits: unknown option '%s' (see --help)\n", a);
            return 2;
        } else if (!model_path) {
            model_path = a;
        } else {
            fprintf(stderr, "qmix logits: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!model_path || !out_path || !tokens_spec == !messages_path)
        return cli_missing("logits", !model_path ? "MODEL" : !out_path ? "--out FILE"
                                                 : "--tokens IDS or --messages FILE");
    if (tokens_out && !messages_path) {
        fprintf(stderr, "qmix logits: --tokens-out goes with --messages\n");
        return 2;
    }
    if (strcmp(mode, "prefill") && strcmp(mode, "decode")) {
        fprintf(stderr, "qmix logits: --mode must be prefill or decode, not '%s'\n", mode);
        return 2;
    }
    int32_t *tokens = NULL;
    int n = 0;
    if (tokens_spec && cli_tokens("logits", tokens_spec, &tokens, &n)) return 2;

    qmix_err err;
    qmix_model *model = NULL;
    qmix_session *sess = NULL;
    qmix_tokenizer *tok = NULL;
    qmix_mm_request req = {0};
    json_t *messages = NULL;
    float *logits = NULL;
    FILE *f = NULL;
    int rc = 1;
    if (qmix_model_open(model_path, &model, &err)) goto fail;
    if (messages_path) {
        char dir[4096];
        if (cli_model_dir(model_path, dir, sizeof dir)) {
            rc = 2;
            goto done;
        }
        if (!(messages = cli_mm_messages(messages_path, NULL, 0, NULL, &err)) ||
            cli_mm_request(model, dir, mmproj, messages, (int)threads, think, &tok, &req, &err))
            goto fail;
        n = req.prompt.n;
        if (tokens_out) { /* written whole under a temporary name, like every output */
            qmix_wfile tw;
            if (qmix_wfile_open(&tw, tokens_out, &err)) goto fail;
            for (int i = 0; i < n; i++) fprintf(tw.f, i ? " %d" : "%d", req.prompt.tokens[i]);
            fputc('\n', tw.f);
            if (qmix_wfile_commit(&tw, &err)) goto fail;
        }
    }
    int64_t V = qmix_model_config(model)->vocab_size;
    qmix_session_opts opts = {.max_ctx = n, .n_threads = (int)threads};
    if (qmix_session_new(model, &opts, &sess, &err)) goto fail;
    logits = malloc((size_t)n * V * sizeof *logits);
    if (!logits) {
        snprintf(err.msg, sizeof err.msg, "out of memory for %d x %lld logits", n, (long long)V);
        goto fail;
    }
    if (messages_path && strcmp(mode, "prefill")) {
        snprintf(err.msg, sizeof err.msg, "--messages runs in --mode prefill only");
        goto fail;
    }
    if (messages_path) {
        if (qmix_session_prefill_mm(sess, req.prompt.tokens, n, req.prompt.embeds, req.prompt.pos3,
                                    logits, &err))
            goto fail;
    } else if (!strcmp(mode, "prefill")) {
        if (qmix_session_prefill(sess, tokens, n, logits, &err)) goto fail;
    } else {
        for (int i = 0; i < n; i++) {
            if (qmix_session_decode(sess, tokens[i], &err)) goto fail;
            memcpy(logits + (int64_t)i * V, qmix_session_logits(sess), V * sizeof *logits);
        }
    }
    if (qmix_write_file(out_path, logits, (size_t)n * V * sizeof *logits, &err)) goto fail;
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "qmix logits: %s\n", err.msg);
    if (f) fclose(f);
done:
    free(logits);
    free(tokens);
    qmix_mm_request_free(&req);
    qmix_tok_free(tok);
    json_decref(messages);
    qmix_session_free(sess);
    qmix_model_close(model);
    return rc;
}
