/* qmix serve: the OpenAI-compatible HTTP server (src/server) until SIGINT or SIGTERM. */
#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "server/server.h"
#include "text/chat.h"

/* "1G", "512M", "64KiB", "2GB" (binary units) or plain bytes; -1 if malformed. */
static long long parse_size(const char *v)
{
    char *end;
    double n = strtod(v, &end);
    if (end == v || !(n >= 0)) return -1;
    static const char units[] = "KMGT";
    const char *u = *end ? strchr(units, *end & ~0x20) : NULL;
    double scale = 1;
    if (u) {
        for (const char *k = units; k <= u; k++) scale *= 1024;
        end++;
        if (*end == 'i') end++;
        if (*end == 'B') end++;
    }
    if (*end || n * scale > 9e18) return -1;
    return (long long)(n * scale);
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix serve MODEL [options]\n\n"
            "An OpenAI-compatible HTTP server: GET /health, GET /v1/models,\n"
            "POST /v1/chat/completions (streaming or not), POST /v1/completions.\n"
            "SIGINT or SIGTERM shut it down cleanly.\n\n"
            "  --host ADDR         address to listen on (default 127.0.0.1: this machine only)\n"
            "  --port N            TCP port (default 8080; 0: any free port)\n"
            "  --api-key KEY       require 'Authorization: Bearer KEY' (except on /health)\n"
            "  --model-name NAME   the model id clients use (default: the directory's name)\n"
            "  --ctx N             context per slot, prompt plus answer (default 8192)\n"
            "  --parallel N        slots: requests decoded together (default 1), one pass\n"
            "                      over the weights per step for all of them (continuous\n"
            "                      batching); each slot holds ctx tokens of KV cache\n"
            "  --queue N           requests that may wait for a slot before 503 (default 64)\n"
            "  --threads N         compute threads (default: all cores)\n"
            "  --prefill-chunk N   prompt tokens per step while other requests decode\n"
            "                      (default 128): bounds how long a new prompt stalls them\n"
            "  --prefix-cache SIZE memory for prefix snapshots (KV rows + recurrent state),\n"
            "                      shared by all slots, least recently used evicted first:\n"
            "                      e.g. 512M, 2G; 0 turns it off (default 1G)\n"
            "  --max-body BYTES    request body limit (default 8388608); larger gets 413\n"
            "  --mmproj FILE       the vision tower as llama.cpp's separate projector GGUF (for a\n"
            "                      GGUF model)\n"
            "  --max-images N      images one chat request may carry (default 8); images\n"
            "                      come as image_url parts with data: URLs (models with a\n"
            "                      vision tower; remote URLs are refused)\n"
            "  --chat-template-args JSON  default chat_template_kwargs, e.g.\n"
            "                      '{\"enable_thinking\": false}'\n"
            "  --seed S            seed for requests that give none (default: a fresh one each)\n"
            "%s%s"
            "Sampling flags set the defaults for fields a request leaves out; without them the\n"
            "model's generation_config.json gives temperature, top_p and top_k.\n",
            cli_kv_help, cli_sampling_help);
}

int qmix_cmd_serve(int argc, char **argv)
{
    qmix_server_opts o = {.host = "127.0.0.1", .port = 8080, .ctx = 8192, .parallel = 1,
                          .max_queue = 64, .max_body = 8u << 20, .prefill_chunk = 128,
                          .prefix_cache_bytes = (size_t)1 << 30,
                          .sampling = qmix_sampling_greedy()};
    const char *template_args = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int handled;
        long n;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if ((handled = cli_kv_option("serve", argc, argv, &i, &o.kv_type)) != 0) {
            if (handled < 0) return 2;
        } else if ((handled = cli_sampling_option("serve", argc, argv, &i, &o.sampling)) != 0) {
            if (handled < 0) return 2;
            o.sampling_given = 1;
        } else if (!strcmp(a, "--mmproj")) {
            if (!(o.mmproj = cli_value("serve", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--host") || !strcmp(a, "--api-key") ||
                   !strcmp(a, "--chat-template-args") || !strcmp(a, "--model-name")) {
            if (!(v = cli_value("serve", argc, argv, &i))) return 2;
            if (a[2] == 'h') o.host = v;
            else if (a[2] == 'a') o.api_key = v;
            else if (a[2] == 'c') template_args = v;
            else o.model_id = v;
        } else if (!strcmp(a, "--prefix-cache")) {
            if (!(v = cli_value("serve", argc, argv, &i))) return 2;
            long long bytes = parse_size(v);
            if (bytes < 0) {
                fprintf(stderr, "qmix serve: --prefix-cache: '%s' is not a size (e.g. 512M, "
                                "2G, 0)\n", v);
                return 2;
            }
            o.prefix_cache_bytes = (size_t)bytes;
        } else if (!strcmp(a, "--port") || !strcmp(a, "--ctx") || !strcmp(a, "--parallel") ||
                   !strcmp(a, "--queue") || !strcmp(a, "--threads") || !strcmp(a, "--max-body") ||
                   !strcmp(a, "--seed") || !strcmp(a, "--prefill-chunk") ||
                   !strcmp(a, "--max-images")) {
            static const struct { const char *flag; long lo, hi; } ranges[] = {
                {"--port", 0, 65535}, {"--ctx", 16, 1 << 24}, {"--parallel", 1, 256},
                {"--queue", 0, 1 << 20}, {"--threads", 0, 1024}, {"--max-body", 1024, 1L << 32},
                {"--prefill-chunk", 1, 1 << 20}, {"--seed", 0, LONG_MAX}, {"--max-images", 1, 1024}};
            size_t k = 0;
            while (strcmp(a, ranges[k].flag)) k++;
            if (!(v = cli_value("serve", argc, argv, &i)) ||
                cli_int("serve", a, v, ranges[k].lo, ranges[k].hi, &n))
                return 2;
            switch (k) {
            case 0: o.port = (int)n; break;
            case 1: o.ctx = (int)n; break;
            case 2: o.parallel = (int)n; break;
            case 3: o.max_queue = (int)n; break;
            case 4: o.threads = (int)n; break;
            case 5: o.max_body = (size_t)n; break;
            case 6: o.prefill_chunk = (int)n; break;
            case 7: o.sampling.seed = (uint64_t)n, o.seed_given = 1; break;
            default: o.max_images = (int)n; break;
            }
        } else if (a[0] == '-') {
            fprintf(stderr, "qmix serve: unknown option '%s' (see --help)\n", a);
            return 2;
        } else if (!o.model_path) {
            o.model_path = a;
        } else {
            fprintf(stderr, "qmix serve: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!o.model_path) return cli_missing("serve", "MODEL");
    json_t *targs = NULL;
    if (template_args) {
        json_error_t je;
        targs = json_loads(template_args, 0, &je);
        if (!json_is_object(targs)) {
            fprintf(stderr, "qmix serve: --chat-template-args must be a JSON object%s%s\n",
                    targs ? "" : ": ", targs ? "" : je.text);
            json_decref(targs);
            return 2;
        }
        json_t *et = json_object_get(targs, "enable_thinking");
        if (et && !json_is_boolean(et)) {
            fprintf(stderr, "qmix serve: --chat-template-args: enable_thinking must be true or "
                            "false\n");
            json_decref(targs);
            return 2;
        }
        o.template_args = targs;
    }
    char dir[PATH_MAX], real[PATH_MAX];
    if (cli_model_dir(o.model_path, dir, sizeof dir)) {
        json_decref(targs);
        return 1;
    }
    o.model_dir = realpath(dir, real) ? real : dir;

    char *tmpl = NULL;
    size_t tmpl_len = 0;
    qmix_err terr;
    if (qmix_chat_template_load(o.model_dir, false, &tmpl, &tmpl_len, NULL, 0, &terr) ||
        !qmix_chat_template_is_qwen35(tmpl, tmpl_len))
        fprintf(stderr, "qmix serve: %s has no official Qwen3.5 chat template; using the "
                "built-in Qwen3.5 format\n", o.model_dir);
    free(tmpl);

    /* SIGINT/SIGTERM are taken by sigwait below, never by a server thread: block them before
     * any thread starts (threads inherit the mask). A client that hangs up must not kill us. */
    sigset_t stop_sigs;
    sigemptyset(&stop_sigs);
    sigaddset(&stop_sigs, SIGINT);
    sigaddset(&stop_sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop_sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    qmix_err err;
    qmix_server *srv = NULL;
    if (qmix_server_start(&o, &srv, &err)) {
        fprintf(stderr, "qmix serve: %s\n", err.msg);
        json_decref(targs);
        return 1;
    }
    const char *host = o.host;
    int v6 = strchr(host, ':') != NULL;
    fprintf(stderr, "qmix serve: %s on http://%s%s%s:%d (%d slot%s, ctx %d)%s\n",
            qmix_server_model_id(srv), v6 ? "[" : "", host, v6 ? "]" : "",
            qmix_server_port(srv), o.parallel, o.parallel == 1 ? "" : "s", o.ctx,
            o.api_key ? ", API key required" : "");
    int sig = 0;
    sigwait(&stop_sigs, &sig);
    fprintf(stderr, "qmix serve: %s, shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    qmix_server_stop(srv);
    json_decref(targs);
    return 0;
}
