/* A persistent pthread pool: threads are created once per backend and woken per call. Workers spin
 * briefly after a call (decode issues many small calls back to back, and a futex wake costs tens of
 * microseconds), then sleep on a condition variable. Tasks are handed out through an atomic counter.
 *
 * A call ends when its tasks are done, not when every worker has seen it: on a machine shared with
 * other processes a worker may not be scheduled for milliseconds, and a call whose tasks the caller ran
 * alone used to wait for that worker anyway (a batched decode step makes hundreds of calls). A worker
 * that wakes late finds no task left and goes back to waiting. Tasks are claimed by counting down: a
 * call writes its parameters while the count is <= 0 (nothing to claim), then stores the task count
 * (release); a claim that gets a positive count (acquire) therefore sees this call's parameters, which
 * stay until every claimed task is done. */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include "ab_internal.h"

/* How long an idle worker (or the waiting caller) spins before sleeping. Spinning uses a compiler
 * barrier, not the pause instruction: under a hypervisor, pause loops make the vCPU yield. */
#define AB_SPIN_NS 50000L

static inline long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

struct ab_pool {
    int n;                      /* threads including the caller */
    pthread_t *th;
    pthread_mutex_t mu, run_mu;
    pthread_cond_t cv_work, cv_done;
    ab_task_fn fn;
    void *ctx;
    int ntasks;
    atomic_int left;            /* tasks not yet claimed (<= 0: none) */
    atomic_int done;            /* tasks of the current call finished */
    atomic_uint gen;
    atomic_int stop;
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("" ::: "memory");
#endif
}

static void run_tasks(ab_pool *p) {
    for (;;) {
        int r = atomic_fetch_sub_explicit(&p->left, 1, memory_order_acquire);
        if (r <= 0) break;
        int n = p->ntasks;
        p->fn(p->ctx, n - r);
        if (atomic_fetch_add_explicit(&p->done, 1, memory_order_acq_rel) + 1 == n) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->cv_done);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

static void *worker(void *arg) {
    ab_pool *p = arg;
    unsigned seen = 0;
    for (;;) {
        long t0 = now_ns();
        for (int i = 1; atomic_load(&p->gen) == seen && !atomic_load(&p->stop); i++) {
            cpu_relax();
            if ((i & 255) == 0 && now_ns() - t0 > AB_SPIN_NS) break;
        }
        if (atomic_load(&p->gen) == seen) {
            pthread_mutex_lock(&p->mu);
            while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->cv_work, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop)) break;
        seen = atomic_load(&p->gen);
        run_tasks(p);
    }
    return NULL;
}

ab_pool *ab_pool_create(int nthreads) {
    if (nthreads < 1) nthreads = 1;
    ab_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = nthreads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_mutex_init(&p->run_mu, NULL);
    pthread_cond_init(&p->cv_work, NULL);
    pthread_cond_init(&p->cv_done, NULL);
    p->th = calloc((size_t)nthreads, sizeof(pthread_t));
    if (!p->th) { free(p); return NULL; }
    /* Workers block every signal (they inherit the mask they are created with): a Ctrl-C must reach the
     * thread that runs Python, not a worker waiting for tasks. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    for (int i = 1; i < nthreads; i++) {
        if (pthread_create(&p->th[i], NULL, worker, p) != 0) { p->n = i; break; }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return p;
}

void ab_pool_destroy(ab_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++) pthread_join(p->th[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_mutex_destroy(&p->run_mu);
    pthread_cond_destroy(&p->cv_work);
    pthread_cond_destroy(&p->cv_done);
    free(p->th);
    free(p);
}

int ab_pool_threads(ab_pool *p) { return p ? p->n : 1; }

void ab_pool_run(ab_pool *p, ab_task_fn fn, void *ctx, int ntasks) {
    if (ntasks <= 0) return;
    if (!p || p->n == 1 || ntasks == 1) {
        for (int i = 0; i < ntasks; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&p->run_mu);
    p->fn = fn;                             /* left <= 0 here: no claim can read these yet */
    p->ctx = ctx;
    p->ntasks = ntasks;
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    atomic_store_explicit(&p->left, ntasks, memory_order_release);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->gen, 1);
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);
    run_tasks(p);
    long t0 = now_ns();
    for (int i = 1; atomic_load_explicit(&p->done, memory_order_acquire) < ntasks; i++) {
        cpu_relax();
        if ((i & 255) == 0 && now_ns() - t0 > AB_SPIN_NS) break;
    }
    if (atomic_load_explicit(&p->done, memory_order_acquire) < ntasks) {
        pthread_mutex_lock(&p->mu);
        while (atomic_load_explicit(&p->done, memory_order_acquire) < ntasks) pthread_cond_wait(&p->cv_done, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
    pthread_mutex_unlock(&p->run_mu);
}

/* ---- self-check for the tests: every task of every call runs exactly once, and the call returns only
 * after all of them, with calls of varied sizes back to back and now and then a slow task (so that
 * workers wake late and overlap the next call). Returns the number of violations. */
typedef struct {
    atomic_int *hits;
    int slow;
} check_ctx;

static void check_task(void *ctx, int i) {
    check_ctx *c = ctx;
    if (c->slow == i) {
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    atomic_fetch_add(&c->hits[i], 1);
}

int ab_pool_check(ab_pool *pool, int calls, int max_tasks, unsigned seed) {
    if (calls < 0 || max_tasks < 1) return -3;
    atomic_int *hits = malloc((size_t)max_tasks * sizeof(atomic_int));
    if (!hits) return -1;
    int bad = 0;
    for (int k = 0; k < calls; k++) {
        seed = seed * 1103515245u + 12345u;
        int n = 1 + (int)((seed >> 8) % (unsigned)max_tasks);
        check_ctx c = {hits, (seed >> 4) % 16 == 0 ? (int)((seed >> 12) % (unsigned)n) : -1};
        for (int i = 0; i < n; i++) atomic_store(&hits[i], 0);
        ab_pool_run(pool, check_task, &c, n);
        for (int i = 0; i < n; i++) bad += atomic_load(&hits[i]) != 1;
    }
    free(hits);
    return bad;
}
