/* qmix chat in a pseudo-terminal, as a person would use it: type, read the streamed answer,
 * toggle /no_think, interrupt an answer with Ctrl-C, quit. */
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>

#include "testutil.h"

typedef struct term { int fd; pid_t pid; char buf[1 << 16]; size_t len; } term;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Reads until the screen text since `from` contains want, or the timeout. */
static int wait_for(term *t, size_t from, const char *want, double seconds)
{
    double end = now() + seconds;
    while (now() < end) {
        t->buf[t->len] = 0;
        if (strstr(t->buf + from, want)) return 1;
        struct pollfd p = {.fd = t->fd, .events = POLLIN};
        if (poll(&p, 1, 50) > 0) {
            ssize_t n = read(t->fd, t->buf + t->len, sizeof t->buf - 1 - t->len);
            if (n <= 0) break;
            t->len += (size_t)n;
        }
    }
    t->buf[t->len] = 0;
    return strstr(t->buf + from, want) != NULL;
}

static void type(term *t, const char *text)
{
    ck_assert_int_eq(write(t->fd, text, strlen(text)), (ssize_t)strlen(text));
}

static void start(term *t, const char *max_tokens, const char *extra)
{
    memset(t, 0, sizeof *t);
    t->pid = forkpty(&t->fd, NULL, NULL, NULL);
    ck_assert_int_ge(t->pid, 0);
    if (t->pid == 0) {
        execl(tu_qmix_bin(), tu_qmix_bin(), "chat", "testdata/fixtures/tiny-a", "--max-tokens",
              max_tokens, "--ctx", "40000", "--temp", "0", "--threads", "1", extra, (char *)NULL);
        _exit(127);
    }
}

static int finish(term *t)
{
    int status = 0;
    for (int i = 0; i < 100 && waitpid(t->pid, &status, WNOHANG) == 0; i++) usleep(50000);
    if (waitpid(t->pid, &status, WNOHANG) == 0) {
        kill(t->pid, SIGKILL);
        waitpid(t->pid, &status, 0);
        return -1;
    }
    close(t->fd);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

START_TEST(conversation)
{
    term t;
    start(&t, "12", NULL);
    ck_assert_msg(wait_for(&t, 0, "> ", 10), "no prompt; screen:\n%s", t.buf);
    size_t mark = t.len;
    type(&t, "hello there\r");
    /* the answer streams, then a new prompt appears */
    ck_assert_msg(wait_for(&t, mark, "tok/s]", 10), "no answer; screen:\n%s", t.buf + mark);
    ck_assert_msg(wait_for(&t, mark, "\n> ", 10), "no second prompt; screen:\n%s", t.buf + mark);
    const char *answer = strstr(t.buf + mark, "hello there");
    ck_assert_msg(answer != NULL, "the typed line was not echoed:\n%s", t.buf + mark);
    /* something besides the echo and the stats came out */
    size_t visible = 0;
    for (const char *c = answer + 11; *c && strncmp(c, "[12 tokens", 10); c++)
        visible += (unsigned char)*c > ' ' && *c != '\033';
    ck_assert_msg(visible > 3, "empty answer:\n%s", t.buf + mark);
    mark = t.len;
    type(&t, "/no_think\r");
    ck_assert_msg(wait_for(&t, mark, "thinking off", 10), "no toggle:\n%s", t.buf + mark);
    ck_assert_msg(wait_for(&t, mark, "(no think) > ", 10), "prompt does not show the mode");
    mark = t.len;
    type(&t, "and now?\r");
    ck_assert_msg(wait_for(&t, mark, "(no think) > ", 10), "no answer without thinking:\n%s",
                  t.buf + mark);
    type(&t, "/exit\r");
    ck_assert_int_eq(finish(&t), 0);
}
END_TEST

START_TEST(ctrl_c_stops_the_answer)
{
    term t;
    start(&t, "39000", "--ignore-eos"); /* still running when interrupted */
    ck_assert_msg(wait_for(&t, 0, "> ", 10), "no prompt; screen:\n%s", t.buf);
    size_t mark = t.len;
    type(&t, "write a lot\r");
    usleep(300000);
    type(&t, "\003");
    ck_assert_msg(wait_for(&t, mark, "[stopped]", 10), "Ctrl-C did not stop the answer:\n%.2000s",
                  t.buf + mark);
    ck_assert_msg(wait_for(&t, mark, "\n> ", 10), "no prompt after Ctrl-C");
    type(&t, "/exit\r");
    ck_assert_int_eq(finish(&t), 0);
}
END_TEST

static Suite *make_suite(void)
{
    Suite *s = suite_create("chat_cli");
    TCase *tc = tcase_create("pty");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, conversation);
    tcase_add_test(tc, ctrl_c_stops_the_answer);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(make_suite)
