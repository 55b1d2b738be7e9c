/* Worker pool with sub-pools, and the FIFO task queue.
 *
 * One queue thread takes submitted tasks in order and runs them; it is also
 * thread 0 of sub-pool 0, so a pool of N threads runs N compute threads and
 * nothing else.  Inside a task, kt_pool_parallel() fans work out to every
 * thread: each sub-pool drains its own atomic task counter, then helps the
 * others.  Idle workers spin briefly on a generation counter, then sleep on
 * a condition variable; the thread that called ktmoe_pool_sync() sleeps. */
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KT_PAUSE() _mm_pause()
#else
#define KT_PAUSE() ((void)0)
#endif

/* How an idle thread waits before it sleeps: KT_SPIN_PAUSES pause
 * instructions (a few microseconds: the gap between two parallel regions
 * of one task), then sched_yield() in a loop until KT_SPIN_NS have passed.
 * A spinner that yields gives its core to any thread that wants one: the
 * caller woken by ktmoe_pool_sync(), PyTorch's threads.  Pure spinning on
 * every core held the caller's wake-up back by the whole spin (0.55 ms of
 * a 1.3 ms decode token at 2 threads on 2 cores). */
#define KT_SPIN_PAUSES 200
#define KT_SPIN_NS 500000

typedef struct kt_spin {
    int n;
    uint64_t until;
} kt_spin;

static uint64_t kt_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* One step of a wait; 0 once the thread should sleep instead. */
static int kt_spin_step(kt_spin *s) {
    if (s->n < KT_SPIN_PAUSES) {
        s->n++;
        KT_PAUSE();
        return 1;
    }
    uint64_t now = kt_now_ns();
    if (s->n == KT_SPIN_PAUSES) {
        s->n++;
        s->until = now + KT_SPIN_NS;
    } else if (now >= s->until) {
        return 0;
    }
    sched_yield();
    return 1;
}

typedef struct kt_task {
    ktmoe_task_fn fn;
    void *user;
    void (*release)(void *user); /* frees user after the run, may be NULL */
    struct kt_task *next;
} kt_task;

typedef struct kt_counter {
    _Alignas(64) atomic_llong next;
    int64_t total;
    char pad[64 - sizeof(int64_t)];
} kt_counter;

typedef struct kt_thread {
    ktmoe_pool *pool;
    pthread_t handle;
    kt_worker_ctx ctx;
    int started;
} kt_thread;

struct ktmoe_pool {
    int nsub;
    int total;
    int *sub_threads;
    int *sub_first; /* global index of each sub-pool's thread 0 */
    kt_thread *threads; /* [total]; threads[0] is the queue thread */

    /* queue */
    pthread_mutex_t qmu;
    pthread_cond_t qcv, qdone;
    kt_task *head, *tail;
    int64_t submitted, completed;
    atomic_int queued; /* tasks in the list: read without qmu by the spinning queue thread */
    ktmoe_status first_error;
    char first_message[512];
    int qstop;

    /* parallel region */
    pthread_mutex_t pmu;
    pthread_cond_t pcv, pdone;
    atomic_ullong generation;
    atomic_int active;
    int pstop;
    kt_par_fn job_fn;
    void *job_ctx;
    kt_counter *counters; /* [nsub] */
};

/* ---- parallel regions ---- */

static void kt_run_share(ktmoe_pool *pool, const kt_worker_ctx *w) {
    for (int k = 0; k < pool->nsub; k++) {
        int sub = (w->sub + k) % pool->nsub;
        kt_counter *c = &pool->counters[sub];
        for (;;) {
            if (atomic_load_explicit(&c->next, memory_order_relaxed) >= c->total)
                break;
            int64_t t = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed);
            if (t >= c->total) break;
            pool->job_fn(pool->job_ctx, w, sub, t);
        }
    }
}

static void *kt_worker_main(void *arg) {
    kt_thread *self = arg;
    ktmoe_pool *pool = self->pool;
    unsigned long long seen = 0;
    for (;;) {
        unsigned long long g = 0;
        kt_spin sp = {0, 0};
        do {
            g = atomic_load_explicit(&pool->generation, memory_order_acquire);
        } while (g == seen && kt_spin_step(&sp));
        if (g == seen) {
            pthread_mutex_lock(&pool->pmu);
            while ((g = atomic_load(&pool->generation)) == seen && !pool->pstop)
                pthread_cond_wait(&pool->pcv, &pool->pmu);
            int stop = pool->pstop && g == seen;
            pthread_mutex_unlock(&pool->pmu);
            if (stop) break;
        }
        seen = g;
        kt_run_share(pool, &self->ctx);
        if (atomic_fetch_sub_explicit(&pool->active, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&pool->pmu);
            pthread_cond_signal(&pool->pdone);
            pthread_mutex_unlock(&pool->pmu);
        }
    }
    return NULL;
}

void kt_pool_parallel(ktmoe_pool *pool, const int64_t *ntasks, kt_par_fn fn,
                      void *ctx) {
    int64_t sum = 0;
    for (int s = 0; s < pool->nsub; s++) {
        atomic_store_explicit(&pool->counters[s].next, 0, memory_order_relaxed);
        pool->counters[s].total = ntasks[s];
        sum += ntasks[s];
    }
    if (sum == 0) return;
    pool->job_fn = fn;
    pool->job_ctx = ctx;
    kt_thread *master = &pool->threads[0];
    if (pool->total == 1 || sum == 1) {
        kt_run_share(pool, &master->ctx);
        return;
    }
    atomic_store(&pool->active, pool->total - 1);
    pthread_mutex_lock(&pool->pmu);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->pcv);
    pthread_mutex_unlock(&pool->pmu);
    kt_run_share(pool, &master->ctx);
    kt_spin sp = {0, 0};
    do {
        if (atomic_load_explicit(&pool->active, memory_order_acquire) == 0) return;
    } while (kt_spin_step(&sp));
    pthread_mutex_lock(&pool->pmu);
    while (atomic_load(&pool->active) != 0)
        pthread_cond_wait(&pool->pdone, &pool->pmu);
    pthread_mutex_unlock(&pool->pmu);
}

void kt_pool_parallel_all(ktmoe_pool *pool, int64_t ntasks, kt_par_fn fn,
                          void *ctx) {
    int64_t n[KT_MAX_SUBPOOLS] = {0};
    n[0] = ntasks;
    kt_pool_parallel(pool, n, fn, ctx);
}

/* ---- queue ---- */

static void *kt_queue_main(void *arg) {
    kt_thread *self = arg;
    ktmoe_pool *pool = self->pool;
    pthread_mutex_lock(&pool->qmu);
    for (;;) {
        if (!pool->head && !pool->qstop) {
            /* spin a little before sleeping: a task submitted right after
             * the last one (a decode loop) then starts without the wake-up
             * of a sleeping thread (tens of microseconds on a VM) */
            pthread_mutex_unlock(&pool->qmu);
            kt_spin sp = {0, 0};
            while (!atomic_load_explicit(&pool->queued, memory_order_acquire) && kt_spin_step(&sp)) {
            }
            pthread_mutex_lock(&pool->qmu);
        }
        while (!pool->head && !pool->qstop) pthread_cond_wait(&pool->qcv, &pool->qmu);
        if (!pool->head) break;
        kt_task *t = pool->head;
        pool->head = t->next;
        if (!pool->head) pool->tail = NULL;
        atomic_fetch_sub_explicit(&pool->queued, 1, memory_order_relaxed);
        pthread_mutex_unlock(&pool->qmu);

        kt_error_clear();
        ktmoe_status st = t->fn(t->user);
        if (t->release) t->release(t->user);
        free(t);

        pthread_mutex_lock(&pool->qmu);
        if (st != KTMOE_OK && pool->first_error == KTMOE_OK) {
            pool->first_error = st;
            kt_error_copy(pool->first_message, sizeof pool->first_message);
            if (!pool->first_message[0])
                snprintf(pool->first_message, sizeof pool->first_message,
                         "task failed with %s", ktmoe_status_name(st));
        }
        pool->completed++;
        if (pool->completed == pool->submitted) pthread_cond_broadcast(&pool->qdone);
    }
    pthread_mutex_unlock(&pool->qmu);
    return NULL;
}

ktmoe_status kt_pool_submit_owned(ktmoe_pool *pool, ktmoe_task_fn fn, void *user,
                                  void (*release)(void *)) {
    if (!pool || !fn) {
        if (release) release(user);
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "pool and task must not be NULL");
    }
    kt_task *t = malloc(sizeof *t);
    if (!t) {
        if (release) release(user);
        return kt_error(KTMOE_ERR_OUT_OF_MEMORY, "out of memory queuing a task");
    }
    t->fn = fn;
    t->user = user;
    t->release = release;
    t->next = NULL;
    pthread_mutex_lock(&pool->qmu);
    if (pool->tail) pool->tail->next = t;
    else pool->head = t;
    pool->tail = t;
    pool->submitted++;
    atomic_fetch_add_explicit(&pool->queued, 1, memory_order_release);
    pthread_cond_signal(&pool->qcv);
    pthread_mutex_unlock(&pool->qmu);
    return KTMOE_OK;
}

KTMOE_API ktmoe_status ktmoe_pool_submit(ktmoe_pool *pool, ktmoe_task_fn fn,
                                         void *user_data) {
    return kt_pool_submit_owned(pool, fn, user_data, NULL);
}

KTMOE_API ktmoe_status ktmoe_pool_sync(ktmoe_pool *pool) {
    if (!pool) return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "pool must not be NULL");
    pthread_mutex_lock(&pool->qmu);
    while (pool->completed != pool->submitted)
        pthread_cond_wait(&pool->qdone, &pool->qmu);
    ktmoe_status st = pool->first_error;
    if (st != KTMOE_OK) kt_error_set_message(st, pool->first_message);
    pool->first_error = KTMOE_OK;
    pool->first_message[0] = '\0';
    pthread_mutex_unlock(&pool->qmu);
    return st;
}

/* ---- creation ---- */

KTMOE_API void ktmoe_pool_config_init(ktmoe_pool_config *c) {
    if (!c) return;
    memset(c, 0, sizeof *c);
    c->struct_size = sizeof *c;
    c->subpool_count = 1;
    c->total_threads = 1;
    c->pin_threads = -1;
}

static void kt_pin(kt_thread *t, int node) {
#if defined(__linux__)
    int cpus[1024];
    int n = kt_numa_node_cpus(node, cpus, 1024);
    if (n <= 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int i = 0; i < n; i++)
        if (cpus[i] >= 0 && cpus[i] < CPU_SETSIZE) CPU_SET(cpus[i], &set);
    pthread_setaffinity_np(t->handle, sizeof set, &set);
#else
    KT_UNUSED(t);
    KT_UNUSED(node);
#endif
}

KTMOE_API ktmoe_status ktmoe_pool_create(const ktmoe_pool_config *cfg,
                                         ktmoe_pool **out) {
    if (!cfg || !out)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "config and out must not be NULL");
    *out = NULL;
    if (cfg->struct_size < sizeof(ktmoe_pool_config))
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT,
                        "ktmoe_pool_config.struct_size is %u, expected %zu",
                        cfg->struct_size, sizeof(ktmoe_pool_config));
    if (cfg->subpool_count < 1 || cfg->subpool_count > KT_MAX_SUBPOOLS)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT,
                        "subpool_count must be in [1, %d], got %d",
                        KT_MAX_SUBPOOLS, cfg->subpool_count);
    if (cfg->total_threads < cfg->subpool_count || cfg->total_threads > 4096)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT,
                        "total_threads (%d) must be at least subpool_count (%d) "
                        "and at most 4096",
                        cfg->total_threads, cfg->subpool_count);

    ktmoe_pool *p = calloc(1, sizeof *p);
    if (!p) return kt_error(KTMOE_ERR_OUT_OF_MEMORY, "out of memory");
    p->nsub = cfg->subpool_count;
    p->total = cfg->total_threads;
    p->sub_threads = calloc((size_t)p->nsub, sizeof(int));
    p->sub_first = calloc((size_t)p->nsub, sizeof(int));
    p->threads = calloc((size_t)p->total, sizeof(kt_thread));
    p->counters = kt_alloc(sizeof(kt_counter) * (size_t)p->nsub);
    pthread_mutex_init(&p->qmu, NULL);
    pthread_cond_init(&p->qcv, NULL);
    pthread_cond_init(&p->qdone, NULL);
    pthread_mutex_init(&p->pmu, NULL);
    pthread_cond_init(&p->pcv, NULL);
    pthread_cond_init(&p->pdone, NULL);
    atomic_init(&p->generation, 0);
    atomic_init(&p->active, 0);
    atomic_init(&p->queued, 0);
    if (!p->sub_threads || !p->sub_first || !p->threads || !p->counters) {
        ktmoe_pool_destroy(p);
        return kt_error(KTMOE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (int s = 0; s < p->nsub; s++) atomic_init(&p->counters[s].next, 0);

    int base = p->total / p->nsub, rem = p->total % p->nsub, g = 0;
    for (int s = 0; s < p->nsub; s++) {
        p->sub_threads[s] = base + (s < rem ? 1 : 0);
        p->sub_first[s] = g;
        for (int t = 0; t < p->sub_threads[s]; t++, g++) {
            kt_thread *th = &p->threads[g];
            th->pool = p;
            th->ctx.sub = s;
            th->ctx.tid = t;
            th->ctx.nthreads = p->sub_threads[s];
            th->ctx.gtid = g;
            th->ctx.scratch = kt_alloc(KT_SCRATCH_BYTES);
            if (!th->ctx.scratch) {
                ktmoe_pool_destroy(p);
                return KTMOE_ERR_OUT_OF_MEMORY;
            }
        }
    }

    int nodes = kt_numa_node_count();
    int pin = cfg->pin_threads < 0 ? nodes > 1 : cfg->pin_threads != 0;
    for (int i = 0; i < p->total; i++) {
        kt_thread *th = &p->threads[i];
        int rc = pthread_create(&th->handle, NULL, i == 0 ? kt_queue_main : kt_worker_main, th);
        if (rc != 0) {
            ktmoe_pool_destroy(p);
            return kt_error(KTMOE_ERR_INTERNAL, "could not start thread %d of %d (error %d)",
                            i, cfg->total_threads, rc);
        }
        th->started = 1;
        if (pin) kt_pin(th, th->ctx.sub % nodes);
    }
    *out = p;
    return KTMOE_OK;
}

KTMOE_API void ktmoe_pool_destroy(ktmoe_pool *p) {
    if (!p) return;
    if (p->threads && p->threads[0].started) {
        ktmoe_pool_sync(p);
        pthread_mutex_lock(&p->qmu);
        p->qstop = 1;
        pthread_cond_broadcast(&p->qcv);
        pthread_mutex_unlock(&p->qmu);
        pthread_join(p->threads[0].handle, NULL);
    }
    pthread_mutex_lock(&p->pmu);
    p->pstop = 1;
    pthread_cond_broadcast(&p->pcv);
    pthread_mutex_unlock(&p->pmu);
    if (p->threads) {
        for (int i = 1; i < p->total; i++)
            if (p->threads[i].started) pthread_join(p->threads[i].handle, NULL);
        for (int i = 0; i < p->total; i++) kt_free(p->threads[i].ctx.scratch);
    }
    pthread_mutex_destroy(&p->qmu);
    pthread_cond_destroy(&p->qcv);
    pthread_cond_destroy(&p->qdone);
    pthread_mutex_destroy(&p->pmu);
    pthread_cond_destroy(&p->pcv);
    pthread_cond_destroy(&p->pdone);
    free(p->sub_threads);
    free(p->sub_first);
    free(p->threads);
    kt_free(p->counters);
    free(p);
}

KTMOE_API int32_t ktmoe_pool_subpool_count(const ktmoe_pool *pool) {
    return pool ? pool->nsub : 0;
}

KTMOE_API int32_t ktmoe_pool_subpool_threads(const ktmoe_pool *pool, int32_t i) {
    if (!pool || i < 0 || i >= pool->nsub) return 0;
    return pool->sub_threads[i];
}
