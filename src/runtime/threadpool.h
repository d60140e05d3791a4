/* A persistent pool: the caller plus n_threads-1 workers run the tasks of one job, then wait. */
#ifndef QMIX_RUNTIME_THREADPOOL_H
#define QMIX_RUNTIME_THREADPOOL_H

typedef struct qmix_pool qmix_pool;
/* task in [0, n_tasks); thread in [0, n_threads) identifies per-thread scratch. */
typedef void (*qmix_task_fn)(void *ctx, int task, int thread);

qmix_pool *qmix_pool_new(int n_threads); /* n_threads <= 0: qmix_pool_default_threads() */
int qmix_pool_default_threads(void);     /* cores this process may run on */
void qmix_pool_free(qmix_pool *pool);
int qmix_pool_threads(const qmix_pool *pool);
/* Runs every task once and returns when all are done. Not reentrant. */
void qmix_pool_run(qmix_pool *pool, qmix_task_fn fn, void *ctx, int n_tasks);

#endif
