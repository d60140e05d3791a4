/* qmix serve: the OpenAI-compatible HTTP server (src/server) until SIGINT or SIGTERM. */
#include <jansson.h>
#include <errno.h>
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

/* The API key from --api-key, --api-key-file or QMIX_API_KEY. An empty one is refused: it would
 * start a server that accepts an empty bearer token, which is no protection at all. */
static int serve_api_key(const char **key, const char *file, char *buf, size_t cap)
{
    if (*key && file) {
        fprintf(stderr, "qmix serve: give --api-key or --api-key-file, not both\n");
        return -1;
    }
    const char *from = "--api-key";
    if (file) {
        FILE *f = fopen(file, "r");
        if (!f) {
            fprintf(stderr, "qmix serve: --api-key-file %s: %s\n", file, strerror(errno));
            return -1;
        }
        if (!fgets(buf, (int)cap, f)) buf[0] = 0;
        fclose(f);
        size_t n = strlen(buf);
        while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ')) buf[--n] = 0;
        *key = buf;
        from = "--api-key-file";
    } else if (!*key && getenv("QMIX_API_KEY")) {
        *key = getenv("QMIX_API_KEY");
        from = "QMIX_API_KEY";
    }
    if (*key && !**key) {
        fprintf(stderr, "qmix serve: %s: the API key is empty (it would accept an empty bearer "
                "token); give a key, or none to run without one\n", from);
        return -1;
    }
    for (const char *c = *key; c && *c; c++)
        if ((unsigned char)*c <= ' ' || *c == 0x7f) {
            fprintf(stderr, "qmix serve: %s: the API key has whitespace or control characters\n",
                    from);
            return -1;
        }
    return 0;
}

/* Bound beyond this machine: anyone who can reach the port can use the model. */
static int host_is_loopback(const char *host)
{
    return !strcmp(host, "localhost") || !strncmp(host, "127.", 4) || !strcmp(host, "::1");
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
            "  --api-key KEY       require 'Authorization: Bearer KEY' (except on /health and\n"
            "                      /metrics); the environment's QMIX_API_KEY if not given\n"
            "  --api-key-file PATH the key from a file (first line), kept out of `ps`\n"
            "  --cors ORIGIN       allow browser pages from ORIGIN (e.g. http://localhost:3000,\n"
            "                      or *) to call the API; default: cross-origin requests get 403\n"
            "  --max-connections N open connections at most (default 1024)\n"
            "  --max-conn-per-ip N connections per client address, loopback exempt (default\n"
            "                      32; 0: no limit)\n"
            "  --idle-timeout S    close a connection silent for S seconds while its request\n"
            "                      is incomplete or between requests (default 10; a request\n"
            "                      being answered may stay silent for 600)\n"
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
    const char *template_args = NULL, *key_file = NULL;
    o.per_ip_limit = 32;
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
        } else if (!strcmp(a, "--api-key-file") || !strcmp(a, "--cors")) {
            if (!(v = cli_value("serve", argc, argv, &i))) return 2;
            if (a[2] == 'a') key_file = v;
            else o.cors_origin = v;
        } else if (!strcmp(a, "--max-connections") || !strcmp(a, "--max-conn-per-ip") ||
                   !strcmp(a, "--idle-timeout")) {
            long lo = a[2] == 'i' || a[6] == 'o' ? 1 : 0;
            if (!(v = cli_value("serve", argc, argv, &i)) ||
                cli_int("serve", a, v, lo, a[2] == 'i' ? 3600 : 65536, &n))
                return 2;
            if (a[2] == 'i') o.idle_timeout = (unsigned)n;
            else if (a[6] == 'o') o.max_connections = (unsigned)n;
            else o.per_ip_limit = (unsigned)n;
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
    char key_buf[1024];
    if (serve_api_key(&o.api_key, key_file, key_buf, sizeof key_buf)) {
        json_decref(targs);
        return 2;
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
    if (!o.api_key && !host_is_loopback(host))
        fprintf(stderr, "qmix serve: warning: listening on %s without an API key: anyone who "
                "can reach this port can use the model (--api-key-file PATH)\n", host);
    int sig = 0;
    sigwait(&stop_sigs, &sig);
    fprintf(stderr, "qmix serve: %s, shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    qmix_server_stop(srv);
    json_decref(targs);
    return 0;
}
