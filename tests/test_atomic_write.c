/* Outputs are never left half-written: the helpers in util/fileio.h (temporary name + rename,
 * staged directories), writers killed with SIGKILL at random points, and writers that run out of
 * space (a tiny tmpfs where mounting is allowed, RLIMIT_FSIZE everywhere). */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>

#include "testutil.h"
#include "util/fileio.h"

#define DEMO "testdata/demo"

static int exists(const char *path)
{
    struct stat st;
    return !stat(path, &st);
}

/* Entries in dir (not . or ..). */
static int count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    closedir(d);
    return n;
}

START_TEST(file_helpers)
{
    char *dir = tu_tmpdir(), path[1100];
    qmix_err err;
    snprintf(path, sizeof path, "%s/a.json", dir);
    json_t *v = json_pack("{s:i}", "x", 1);
    ck_assert_int_eq(qmix_write_json(path, v, 0, &err), 0);
    json_decref(v);
    char *text = tu_read(path, NULL);
    ck_assert_str_eq(text, "{\"x\": 1}");
    free(text);
    /* replacing: the old content stays until the new one is complete */
    qmix_wfile w;
    ck_assert_int_eq(qmix_wfile_open(&w, path, &err), 0);
    fputs("{\"x\": 2", w.f);
    fflush(w.f);
    text = tu_read(path, NULL);
    ck_assert_str_eq(text, "{\"x\": 1}");
    free(text);
    qmix_wfile_abandon(&w); /* nothing of it remains */
    ck_assert_int_eq(count_entries(dir), 1);
    text = tu_read(path, NULL);
    ck_assert_str_eq(text, "{\"x\": 1}");
    free(text);
    ck_assert_int_eq(qmix_write_file(path, "new", 3, &err), 0);
    text = tu_read(path, NULL);
    ck_assert_str_eq(text, "new");
    free(text);
    ck_assert_int_eq(count_entries(dir), 1);
    /* errors name the path and errno */
    snprintf(path, sizeof path, "%s/no/such/dir/x", dir);
    ck_assert_int_eq(qmix_write_file(path, "x", 1, &err), -1);
    ck_assert_msg(strstr(err.msg, "No such file") && strstr(err.msg, "no/such"), "%s", err.msg);
    /* copying an absent file: fine when allowed, an error otherwise */
    char to[1100];
    snprintf(path, sizeof path, "%s/absent", dir);
    snprintf(to, sizeof to, "%s/copy", dir);
    ck_assert_int_eq(qmix_copy_file(path, to, 1, &err), 0);
    ck_assert(!exists(to));
    ck_assert_int_eq(qmix_copy_file(path, to, 0, &err), -1);
    /* a device is written in place, never replaced */
    ck_assert_int_eq(qmix_write_file("/dev/null", "x", 1, &err), 0);
    ck_assert(exists("/dev/null"));
    tu_rmdir(dir);
}
END_TEST

static void put(const char *dir, const char *name, const char *text)
{
    char path[1100];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    tu_write(path, text, strlen(text));
}

START_TEST(staged_directories)
{
    char *dir = tu_tmpdir(), out[1100], path[1200];
    qmix_err err;
    qmix_outdir d;
    snprintf(out, sizeof out, "%s/model", dir);
    /* a new directory appears whole, under its name only at the end */
    ck_assert_int_eq(qmix_outdir_begin(&d, out, &err), 0);
    put(d.work, "model.safetensors", "weights");
    put(d.work, "config.json", "{}");
    ck_assert(!exists(out));
    ck_assert_int_eq(qmix_outdir_commit(&d, &err), 0);
    snprintf(path, sizeof path, "%s/config.json", out);
    ck_assert(exists(path));
    ck_assert_int_eq(count_entries(dir), 1); /* no .partial left */
    /* a failed run leaves nothing: not the work directory, not the old model touched */
    ck_assert_int_eq(qmix_outdir_begin(&d, out, &err), 0);
    put(d.work, "model.safetensors", "half");
    qmix_outdir_abandon(&d);
    ck_assert_int_eq(count_entries(dir), 1);
    snprintf(path, sizeof path, "%s/model.safetensors", out);
    char *text = tu_read(path, NULL);
    ck_assert_str_eq(text, "weights");
    free(text);
    /* into an existing model (--force): files replaced, others kept, config.json last */
    put(out, "README.md", "mine");
    ck_assert_int_eq(qmix_outdir_begin(&d, out, &err), 0);
    put(d.work, "model.safetensors", "weights 2");
    put(d.work, "config.json", "{\"v\": 2}");
    ck_assert_int_eq(qmix_outdir_commit(&d, &err), 0);
    text = tu_read(path, NULL);
    ck_assert_str_eq(text, "weights 2");
    free(text);
    ck_assert_int_eq(count_entries(out), 3);
    ck_assert_int_eq(count_entries(dir), 1);
    /* an existing empty directory is replaced by the finished one; a trailing slash is fine */
    snprintf(out, sizeof out, "%s/empty/", dir);
    ck_assert_int_eq(mkdir(out, 0777), 0);
    ck_assert_int_eq(qmix_outdir_begin(&d, out, &err), 0);
    put(d.work, "config.json", "{}");
    ck_assert_int_eq(qmix_outdir_commit(&d, &err), 0);
    snprintf(path, sizeof path, "%s/empty/config.json", dir);
    ck_assert(exists(path));
    ck_assert_int_eq(count_entries(dir), 2);
    tu_rmdir(dir);
}
END_TEST

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Runs `qmix ARGS` (split on spaces) to completion or until SIGKILL after delay seconds (< 0:
 * never). Returns the seconds it ran. */
static double run_killed(const char *args, double delay)
{
    char buf[2048];
    snprintf(buf, sizeof buf, "%s", args);
    const char *argv[32] = {tu_qmix_bin()};
    int n = 1;
    for (char *tok = strtok(buf, " "); tok && n < 31; tok = strtok(NULL, " ")) argv[n++] = tok;
    argv[n] = NULL;
    double t0 = now_s();
    fflush(stdout);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        freopen("/dev/null", "w", stdout);
        freopen("/dev/null", "w", stderr);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    if (delay >= 0) {
        struct timespec ts = {(time_t)delay, (long)((delay - (time_t)delay) * 1e9)};
        nanosleep(&ts, NULL);
        kill(pid, SIGKILL);
    }
    int st;
    waitpid(pid, &st, 0);
    if (delay < 0) ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "qmix %s failed", args);
    return now_s() - t0;
}

/* Whether `qmix info PATH` accepts it as a model. */
static int loads(const char *path)
{
    char args[1600];
    snprintf(args, sizeof args, "info '%s'", path);
    tu_run_result r = tu_run(args);
    int ok = r.status == 0;
    tu_run_free(&r);
    return ok;
}

/* The bytes of a model: a file's, or a directory's weights, config and tokenizer. */
static char *model_bytes(const char *path, size_t *len)
{
    struct stat st;
    ck_assert_int_eq(stat(path, &st), 0);
    if (!S_ISDIR(st.st_mode)) return tu_read(path, len);
    static const char *const parts[] = {"config.json", "model.safetensors", "tokenizer.json"};
    char *all = NULL;
    size_t n = 0;
    for (size_t i = 0; i < 3; i++) {
        char p[1600];
        snprintf(p, sizeof p, "%s/%s", path, parts[i]);
        size_t k;
        char *b = tu_read(p, &k);
        all = realloc(all, n + k + 1);
        memcpy(all + n, b, k);
        n += k;
        free(b);
    }
    *len = n;
    return all;
}

/* Kills `qmix ARGS` (which writes OUT in dir) at random points; after each kill, anything in
 * dir that loads as a model is the complete model (what an uninterrupted run writes). */
static void kill_at_random(const char *fmt, const char *out_name, int runs)
{
    char *dir = tu_tmpdir(), out[1100], args[2048];
    snprintf(out, sizeof out, "%s/%s", dir, out_name);
    snprintf(args, sizeof args, fmt, out);
    double full = run_killed(args, -1);
    size_t ref_len;
    char *ref = model_bytes(out, &ref_len);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'/*", dir);
    ck_assert_int_eq(system(cmd), 0);
    unsigned seed = (unsigned)time(NULL);
    srand(seed);
    int cut = 0;
    for (int i = 0; i < runs; i++) {
        double delay = full * 1.2 * rand() / (double)RAND_MAX;
        run_killed(args, delay);
        DIR *d = opendir(dir);
        struct dirent *e;
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            char p[1400];
            snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
            if (!strcmp(e->d_name, out_name) || strstr(e->d_name, ".partial-") ||
                strstr(e->d_name, ".tmp-"))
                cut += strcmp(e->d_name, out_name) != 0;
            int final = !strcmp(e->d_name, out_name);
            /* the final name holds the complete model or nothing; the rest never load */
            ck_assert_msg(!final || loads(p), "killed after %.3f s: %s is there but does not load",
                          delay, p);
            if (!final && !loads(p)) continue;
            size_t len;
            char *got = model_bytes(p, &len);
            ck_assert_msg(len == ref_len && !memcmp(got, ref, len),
                          "killed after %.3f s (seed %u): %s loads but is not the complete model",
                          delay, seed, p);
            free(got);
        }
        closedir(d);
        ck_assert_int_eq(system(cmd), 0);
    }
    printf("info: %s: %d kills in a %.2f s run, %d left a partial output; only complete models load\n",
           out_name, runs, full, cut);
    free(ref);
    tu_rmdir(dir);
}

START_TEST(killed_writers)
{
    kill_at_random("quantize " DEMO " %s --recipe uniform-4 --quiet", "mlx", 8);
    kill_at_random("convert " DEMO " %s --to gguf --type q4_k --quiet", "m.gguf", 8);
}
END_TEST

/* A writer that runs out of space leaves nothing behind and says why. script: a sh command
 * that ends by listing the output's parent directory; $Q is qmix, $D the directory. */
static void expect_nothing_left(const char *script, const char *dir, const char *why)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "Q='%s' D='%s' sh -c '%s' 2>&1", tu_qmix_bin(), dir, script);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    char out[16384];
    size_t n = fread(out, 1, sizeof out - 1, p);
    out[n] = 0;
    int st = pclose(p);
    ck_assert_msg(WIFEXITED(st), "%s", out);
    if (WEXITSTATUS(st) == 77) {
        printf("info: cannot mount a small tmpfs here (%s): skipped\n", why);
        return;
    }
    ck_assert_msg(strstr(out, "rc=1") || strstr(out, "rc=2"), "%s: the writer did not fail:\n%s",
                  why, out);
    ck_assert_msg(strstr(out, why), "%s: the error does not say so:\n%s", why, out);
    ck_assert_msg(strstr(out, "listing:\n") && !strstr(out, "listing:\n")[9],
                  "%s: something was left:\n%s", why, out);
}

START_TEST(out_of_space)
{
    char *dir = tu_tmpdir();
    /* a full disk: tmpfs of 64 KiB (the side files do not fit) and 1.5 MiB (the weights do not);
     * its own mount namespace, so nothing outlives the test */
    static const char *const mlx =
        "unshare -m sh -c \"mount -t tmpfs -o size=%s none \\$D 2>/dev/null || exit 77; "
        "\\$Q quantize " DEMO " \\$D/out --recipe uniform-4 --quiet; echo rc=\\$?; "
        "echo listing:; ls -A \\$D\" || exit $?";
    char script[2048];
    snprintf(script, sizeof script, mlx, "64k");
    expect_nothing_left(script, dir, "No space left on device");
    snprintf(script, sizeof script, mlx, "1500k");
    expect_nothing_left(script, dir, "No space left on device");
    expect_nothing_left("unshare -m sh -c \"mount -t tmpfs -o size=1500k none \\$D 2>/dev/null "
                        "|| exit 77; \\$Q convert " DEMO " \\$D/m.gguf --to gguf --type q4_k "
                        "--quiet; echo rc=\\$?; echo listing:; ls -A \\$D\" || exit $?",
                        dir, "No space left on device");
    /* a file size limit (no privileges needed): EFBIG instead of a signal */
    expect_nothing_left("trap \"\" XFSZ; ulimit -f 2000; \"$Q\" quantize " DEMO " \"$D/out\" "
                        "--recipe uniform-4 --quiet; echo rc=$?; echo listing:; ls -A \"$D\"",
                        dir, "File too large");
    expect_nothing_left("trap \"\" XFSZ; ulimit -f 2000; \"$Q\" convert " DEMO " \"$D/m.gguf\" "
                        "--to gguf --type q4_k --quiet; echo rc=$?; echo listing:; ls -A \"$D\"",
                        dir, "File too large");
    tu_rmdir(dir);
}
END_TEST

static Suite *make_suite(void)
{
    Suite *s = suite_create("atomic_write");
    TCase *tc = tcase_create("writers");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, file_helpers);
    tcase_add_test(tc, staged_directories);
    tcase_add_test(tc, killed_writers);
    tcase_add_test(tc, out_of_space);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(make_suite)
