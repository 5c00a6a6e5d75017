/* A persistent pthread pool: threads are created once per backend and woken per call. Workers spin
 * briefly after a call (decode issues many small calls back to back, and a futex wake costs tens of
 * microseconds), then sleep on a condition variable. Tasks are handed out through an atomic counter. */
#include <pthread.h>
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
    atomic_int next;
    atomic_int pending;         /* workers still busy with the current generation */
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
        int i = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
        if (i >= p->ntasks) break;
        p->fn(p->ctx, i);
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
        if (atomic_fetch_sub(&p->pending, 1) == 1) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->cv_done);
            pthread_mutex_unlock(&p->mu);
        }
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
    for (int i = 1; i < nthreads; i++) {
        if (pthread_create(&p->th[i], NULL, worker, p) != 0) { p->n = i; break; }
    }
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
    p->fn = fn;
    p->ctx = ctx;
    p->ntasks = ntasks;
    atomic_store(&p->next, 0);
    atomic_store(&p->pending, p->n - 1);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->gen, 1);
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);
    run_tasks(p);
    long t0 = now_ns();
    for (int i = 1; atomic_load(&p->pending) > 0; i++) {
        cpu_relax();
        if ((i & 255) == 0 && now_ns() - t0 > AB_SPIN_NS) break;
    }
    if (atomic_load(&p->pending) > 0) {
        pthread_mutex_lock(&p->mu);
        while (atomic_load(&p->pending) > 0) pthread_cond_wait(&p->cv_done, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
    pthread_mutex_unlock(&p->run_mu);
}
