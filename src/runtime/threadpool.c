/* Workers spin for a short while after a job before sleeping: decode issues hundreds of small
 * jobs per token, and a condition-variable wake-up for each would cost more than the work. */
#include "runtime/threadpool.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#define SPIN_ITERS 200000

struct qmix_pool {
    int n_threads;
    pthread_t *workers;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    /* the current job */
    qmix_task_fn fn;
    void *ctx;
    int n_tasks;
    int next_task;      /* atomic */
    int pending;        /* atomic: workers still inside the job */
    unsigned generation; /* atomic: bumped per job */
    int quit;
};

typedef struct worker_arg { qmix_pool *pool; int thread; } worker_arg;

static void drain(qmix_pool *p, int thread)
{
    for (;;) {
        int task = __atomic_fetch_add(&p->next_task, 1, __ATOMIC_RELAXED);
        if (task >= p->n_tasks) break;
        p->fn(p->ctx, task, thread);
    }
}

static void *worker_main(void *arg)
{
    worker_arg *wa = arg;
    qmix_pool *p = wa->pool;
    int thread = wa->thread;
    free(wa);
    unsigned seen = 0;
    for (;;) {
        unsigned gen;
        int spins = 0;
        while ((gen = __atomic_load_n(&p->generation, __ATOMIC_ACQUIRE)) == seen &&
               !__atomic_load_n(&p->quit, __ATOMIC_ACQUIRE) && spins < SPIN_ITERS) {
            __builtin_ia32_pause();
            spins++;
        }
        if (gen == seen && !__atomic_load_n(&p->quit, __ATOMIC_ACQUIRE)) {
            pthread_mutex_lock(&p->lock);
            while ((gen = __atomic_load_n(&p->generation, __ATOMIC_ACQUIRE)) == seen && !p->quit)
                pthread_cond_wait(&p->wake, &p->lock);
            pthread_mutex_unlock(&p->lock);
        }
        if (__atomic_load_n(&p->quit, __ATOMIC_ACQUIRE)) return NULL;
        seen = gen;
        drain(p, thread);
        __atomic_fetch_sub(&p->pending, 1, __ATOMIC_ACQ_REL);
    }
}

qmix_pool *qmix_pool_new(int n_threads)
{
    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int)n : 1;
    }
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
    __atomic_store_n(&p->quit, 1, __ATOMIC_RELEASE);
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
    if (p->n_threads == 1 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++) fn(ctx, t, 0);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    __atomic_store_n(&p->next_task, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&p->pending, p->n_threads - 1, __ATOMIC_RELAXED);
    pthread_mutex_lock(&p->lock);
    __atomic_fetch_add(&p->generation, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    drain(p, 0);
    while (__atomic_load_n(&p->pending, __ATOMIC_ACQUIRE)) __builtin_ia32_pause();
}
