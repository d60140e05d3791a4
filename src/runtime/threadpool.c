/* A job is published as one 64-bit word: generation | task count | next task. Threads claim tasks
 * by compare-and-swap on it, so a thread that wakes late for a job that is already finished claims
 * nothing and touches nothing: the caller waits only for the tasks, never for every worker. That
 * keeps jobs cheap when there are more threads than free cores. Workers spin briefly after a job
 * before sleeping, because decode issues dozens of small jobs per token. */
#include "runtime/threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#define SPIN_ITERS 20000

#define TASK_BITS 18
#define MAX_TASKS ((1u << TASK_BITS) - 1)  /* larger jobs run in rounds */
#define WORD(gen, count, next) \
    (((uint64_t)(gen) << (2 * TASK_BITS)) | ((uint64_t)(count) << TASK_BITS) | (uint64_t)(next))
#define WORD_GEN(w) ((w) >> (2 * TASK_BITS))
#define WORD_COUNT(w) (((w) >> TASK_BITS) & MAX_TASKS)
#define WORD_NEXT(w) ((w) & MAX_TASKS)

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

struct qmix_pool {
    int n_threads;
    pthread_t *workers;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int sleepers;        /* atomic */
    int quit;            /* atomic */
    uint64_t word;       /* atomic: the current job */
    uint64_t done;       /* atomic: tasks of the current round finished */
    /* the current job; stable while any of its tasks is claimed but not done */
    qmix_task_fn fn;
    void *ctx;
    int task_base;       /* first task of this round */
};

typedef struct worker_arg { qmix_pool *pool; int thread; } worker_arg;

/* Claims and runs tasks of generation gen until none are left. */
static void drain(qmix_pool *p, uint64_t gen, int thread)
{
    uint64_t w = __atomic_load_n(&p->word, __ATOMIC_ACQUIRE);
    while (WORD_GEN(w) == gen && WORD_NEXT(w) < WORD_COUNT(w)) {
        if (!__atomic_compare_exchange_n(&p->word, &w, w + 1, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            continue; /* w was reloaded */
        p->fn(p->ctx, p->task_base + (int)WORD_NEXT(w), thread);
        __atomic_fetch_add(&p->done, 1, __ATOMIC_RELEASE);
        w = __atomic_load_n(&p->word, __ATOMIC_ACQUIRE);
    }
}

static void *worker_main(void *arg)
{
    worker_arg *wa = arg;
    qmix_pool *p = wa->pool;
    int thread = wa->thread;
    free(wa);
    uint64_t seen = 0;
    for (;;) {
        uint64_t gen;
        for (int spins = 0; spins < SPIN_ITERS; spins++) {
            gen = WORD_GEN(__atomic_load_n(&p->word, __ATOMIC_ACQUIRE));
            if (gen != seen || __atomic_load_n(&p->quit, __ATOMIC_ACQUIRE)) break;
            cpu_relax();
        }
        if (gen == seen && !__atomic_load_n(&p->quit, __ATOMIC_ACQUIRE)) {
            pthread_mutex_lock(&p->lock);
            __atomic_fetch_add(&p->sleepers, 1, __ATOMIC_SEQ_CST);
            while ((gen = WORD_GEN(__atomic_load_n(&p->word, __ATOMIC_SEQ_CST))) == seen &&
                   !__atomic_load_n(&p->quit, __ATOMIC_SEQ_CST))
                pthread_cond_wait(&p->wake, &p->lock);
            __atomic_fetch_sub(&p->sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&p->lock);
        }
        if (__atomic_load_n(&p->quit, __ATOMIC_ACQUIRE)) return NULL;
        seen = gen;
        drain(p, gen, thread);
    }
}

int qmix_pool_default_threads(void)
{
    cpu_set_t set; /* the cores this process may run on, not all the machine has */
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

qmix_pool *qmix_pool_new(int n_threads)
{
    if (n_threads <= 0) n_threads = qmix_pool_default_threads();
    qmix_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n_threads = n_threads;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    p->workers = calloc((size_t)n_threads, sizeof *p->workers);
    if (!p->workers) {
        free(p);
        return NULL;
    }
    for (int i = 1; i < n_threads; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (wa) *wa = (worker_arg){p, i};
        if (!wa || pthread_create(&p->workers[i], NULL, worker_main, wa)) {
            free(wa);
            p->n_threads = i; /* run with the workers we got */
            break;
        }
    }
    return p;
}

void qmix_pool_free(qmix_pool *p)
{
    if (!p) return;
    pthread_mutex_lock(&p->lock);
    __atomic_store_n(&p->quit, 1, __ATOMIC_SEQ_CST);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (int i = 1; i < p->n_threads; i++) pthread_join(p->workers[i], NULL);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->wake);
    free(p->workers);
    free(p);
}

int qmix_pool_threads(const qmix_pool *p) { return p->n_threads; }

void qmix_pool_run(qmix_pool *p, qmix_task_fn fn, void *ctx, int n_tasks)
{
    if (p->n_threads == 1 || n_tasks <= 1) {
        for (int t = 0; t < n_tasks; t++) fn(ctx, t, 0);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    for (int base = 0; base < n_tasks; base += MAX_TASKS) {
        uint64_t count = (uint64_t)(n_tasks - base < (int)MAX_TASKS ? n_tasks - base : (int)MAX_TASKS);
        p->task_base = base;
        __atomic_store_n(&p->done, 0, __ATOMIC_RELAXED);
        uint64_t gen = WORD_GEN(__atomic_load_n(&p->word, __ATOMIC_RELAXED)) + 1;
        __atomic_store_n(&p->word, WORD(gen, count, 0), __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&p->sleepers, __ATOMIC_SEQ_CST)) {
            pthread_mutex_lock(&p->lock);
            pthread_cond_broadcast(&p->wake);
            pthread_mutex_unlock(&p->lock);
        }
        drain(p, gen, 0);
        /* a claimed task may belong to a thread that is not running now: give it the CPU */
        for (int spins = 0; __atomic_load_n(&p->done, __ATOMIC_ACQUIRE) < count; spins++) {
            if (spins < SPIN_ITERS) cpu_relax();
            else sched_yield();
        }
    }
}
