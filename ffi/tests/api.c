/*
 * api.c: calls every export of dwcp.h, NULL and error paths included, and
 * exits non-zero on the first failed check (file:line, the status by name,
 * and the library's last error message).
 *
 * Built and run by ffi/tests/c_clients.rs against the shared and the static
 * library under AddressSanitizer and UBSan, and (with --quick, which skips
 * the slowest parts) under valgrind.
 *
 * Migration runs against an in-process fake hypervisor: guest memory is
 * plain mmap'd and malloc'd buffers, a "guest" thread writes random pages
 * while it runs and marks them in a software dirty bitmap.
 *
 * Usage: api [--quick] [-v]
 *   --quick       skips the slowest parts (for valgrind)
 *   -v            prints every migration round
 */

#define _GNU_SOURCE

#include "dwcp.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------ */
/* Checks                                                                    */
/* ------------------------------------------------------------------------ */

static bool g_quick;
static bool g_verbose; /* -v: print every migration round */
static const char *g_area = "start";

/* The calling thread's last error message (a copy, valid until the next
 * call of this function on the thread). */
static const char *last_error_text(void) {
    static _Thread_local char buf[4096];
    size_t n = 0;
    dwcp_status st = dwcp_last_error(buf, sizeof buf, &n);
    if (st != DWCP_STATUS_OK) {
        snprintf(buf, sizeof buf, "(dwcp_last_error: %s)", dwcp_status_name(st));
    } else if (n != strlen(buf)) {
        snprintf(buf, sizeof buf, "(dwcp_last_error: written %zu, strlen %zu)", n, strlen(buf));
    }
    return buf;
}

__attribute__((format(printf, 3, 4))) _Noreturn static void fail(const char *file, int line,
                                                                  const char *fmt, ...) {
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "%s:%d: FAILED [%s]: ", file, line, g_area);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
    exit(1);
}

/* `cond` must hold. */
#define CHECK(cond)                                                                               \
    do {                                                                                          \
        if (!(cond))                                                                              \
            fail(__FILE__, __LINE__, "`%s` is false (last error: \"%s\")", #cond,                 \
                 last_error_text());                                                              \
    } while (0)

/* `cond` must hold; otherwise print the message. */
#define CHECKF(cond, ...)                                                                         \
    do {                                                                                          \
        if (!(cond))                                                                              \
            fail(__FILE__, __LINE__, __VA_ARGS__);                                                \
    } while (0)

/* Compares a status; a failure must leave a message, a success none. */
static void check_status(const char *file, int line, const char *call, dwcp_status got,
                         dwcp_status want) {
    const char *msg = last_error_text(); /* first: nothing may run before it */
    if (got != want)
        fail(file, line, "%s returned %s (%u), expected %s (%u); last error: \"%s\"", call,
             dwcp_status_name(got), got, dwcp_status_name(want), want, msg);
    if (want == DWCP_STATUS_OK && msg[0] != '\0')
        fail(file, line, "%s succeeded but left the last error \"%s\"", call, msg);
    if (want != DWCP_STATUS_OK && msg[0] == '\0')
        fail(file, line, "%s failed with %s but left no message", call, dwcp_status_name(got));
}

#define CHECK_ST(want, call) check_status(__FILE__, __LINE__, #call, (call), (want))
#define CHECK_OK(call) CHECK_ST(DWCP_STATUS_OK, call)

/* The call must fail (any status but OK) and leave a message; returns the
 * status. */
static dwcp_status check_fails(const char *file, int line, const char *call, dwcp_status got) {
    const char *msg = last_error_text();
    if (got == DWCP_STATUS_OK)
        fail(file, line, "%s succeeded, expected a failure", call);
    if (msg[0] == '\0')
        fail(file, line, "%s failed with %s but left no message", call, dwcp_status_name(got));
    return got;
}

#define CHECK_FAILS(call) check_fails(__FILE__, __LINE__, #call, (call))

/* ------------------------------------------------------------------------ */
/* Helpers                                                                   */
/* ------------------------------------------------------------------------ */

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static void sleep_ms(double ms) {
    struct timespec t = {(time_t)(ms / 1e3), (long)(((long long)(ms * 1e6)) % 1000000000LL)};
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {
    }
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    CHECKF(p != NULL, "out of memory (%zu bytes)", n);
    return p;
}

/* xorshift64* */
static uint64_t rng_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* Bytes that differ by position and seed, half random, half compressible. */
static void fill_pattern(uint8_t *p, size_t len, uint64_t seed) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 1;
    for (size_t i = 0; i < len; i++) {
        if ((i / 8192) % 2 == 0) {
            if (i % 8 == 0)
                s = rng_next(&s) | 1;
            p[i] = (uint8_t)(s >> (8 * (i % 8)));
        } else {
            p[i] = (uint8_t)((i * 7 + seed) & 0xff);
        }
    }
}

static void fill_random(uint8_t *p, size_t len, uint64_t seed) {
    uint64_t s = seed | 1;
    for (size_t i = 0; i < len; i += 8) {
        uint64_t v = rng_next(&s);
        memcpy(p + i, &v, len - i < 8 ? len - i : 8);
    }
}

static char g_tmp[512];

static void tmp_path(char *out, size_t cap, const char *name) {
    int n = snprintf(out, cap, "%s/%s", g_tmp, name);
    CHECK(n > 0 && (size_t)n < cap);
}

static void write_file(const char *path, const void *data, size_t len, mode_t mode) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    CHECKF(fd >= 0, "open %s: %s", path, strerror(errno));
    CHECKF(fchmod(fd, mode) == 0, "chmod %s: %s", path, strerror(errno));
    const uint8_t *p = data;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        CHECKF(w > 0, "write %s: %s", path, strerror(errno));
        p += w;
        len -= (size_t)w;
    }
    CHECK(close(fd) == 0);
}

/* The whole file at `path` (malloc'd) and its length. */
static uint8_t *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    CHECKF(f != NULL, "open %s: %s", path, strerror(errno));
    CHECK(fseek(f, 0, SEEK_END) == 0);
    long n = ftell(f);
    CHECK(n >= 0);
    CHECK(fseek(f, 0, SEEK_SET) == 0);
    uint8_t *b = xmalloc((size_t)n);
    CHECK(fread(b, 1, (size_t)n, f) == (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return b;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    (void)flag;
    (void)ftw;
    if (remove(path) != 0)
        fprintf(stderr, "warning: could not remove %s: %s\n", path, strerror(errno));
    return 0;
}

/* Removes the temporary directory and everything in it. */
static void rm_tree(const char *path) {
    nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* ------------------------------------------------------------------------ */
/* Shared fixtures                                                           */
/* ------------------------------------------------------------------------ */

static dwcp_engine *g_tx;  /* the sending side's engine */
static dwcp_engine *g_rx;  /* the receiving side's engine */
static uint8_t g_key[DWCP_KEY_LEN];
static uint8_t g_key2[DWCP_KEY_LEN];

static void listen_opts(dwcp_listen_options *o, const uint8_t *key) {
    CHECK_OK(dwcp_listen_options_default(o));
    o->key = key;
    o->insecure_no_auth = key == NULL;
}

static void connect_opts(dwcp_connect_options *o, const uint8_t *key) {
    CHECK_OK(dwcp_connect_options_default(o));
    o->key = key;
    o->insecure_no_auth = key == NULL;
    o->streams = 2;
    o->connect_timeout_ms = 5000;
    o->stall_timeout_ms = 5000;
    o->resume_ms = 3000;
}

/* Listens on loopback with `key` (NULL: insecure) into memory or `dir`. */
static dwcp_listener *listen_on(const uint8_t *key, const char *dir, char *addr, size_t cap) {
    dwcp_listen_options o;
    listen_opts(&o, key);
    o.dir = dir;
    dwcp_listener *l = NULL;
    CHECK_OK(dwcp_listen(g_rx, "127.0.0.1:0", &o, &l));
    CHECK(l != NULL);
    size_t n = 0;
    CHECK_OK(dwcp_listener_local_addr(l, addr, cap, &n));
    CHECK(n == strlen(addr));
    CHECKF(strncmp(addr, "127.0.0.1:", 10) == 0 && strcmp(addr, "127.0.0.1:0") != 0,
           "listener address %s", addr);
    return l;
}

static dwcp_session *connect_to(const char *addr, const uint8_t *key) {
    dwcp_connect_options o;
    connect_opts(&o, key);
    dwcp_session *s = NULL;
    CHECK_OK(dwcp_connect(g_tx, addr, &o, &s));
    CHECK(s != NULL);
    return s;
}

/* Takes the next transfer and checks its name and bytes. */
static void expect_received(dwcp_listener *l, const char *name, const uint8_t *data, uint64_t len) {
    dwcp_received *r = NULL;
    CHECK_OK(dwcp_listener_next(l, 20000, &r));
    CHECK(r != NULL);
    char got[256];
    size_t n = 0;
    CHECK_OK(dwcp_received_name(r, got, sizeof got, &n));
    CHECKF(strcmp(got, name) == 0, "received \"%s\", expected \"%s\"", got, name);
    CHECK(n == strlen(name));
    const uint8_t *d = NULL;
    uint64_t dl = UINT64_MAX;
    CHECK_OK(dwcp_received_data(r, &d, &dl));
    CHECKF(dl == len, "%s: received %" PRIu64 " bytes, expected %" PRIu64, name, dl, len);
    CHECK(len == 0 || d != NULL);
    if (len > 0)
        CHECKF(memcmp(d, data, (size_t)len) == 0, "%s: the received bytes differ", name);
    dwcp_received_free(r);
}

/* ------------------------------------------------------------------------ */
/* Progress callbacks                                                        */
/* ------------------------------------------------------------------------ */

#define MAX_PROGRESS 64

typedef struct {
    pthread_mutex_t mu;
    atomic_int inside;
    atomic_uint overlaps;
    unsigned calls, shrinks, overruns, overflow;
    size_t n;
    struct {
        uint32_t region;
        uint64_t done, total;
        unsigned calls;
    } r[MAX_PROGRESS];
} progress_log;

static void progress_init(progress_log *log) {
    memset(log, 0, sizeof *log);
    CHECK(pthread_mutex_init(&log->mu, NULL) == 0);
}

static void on_progress(void *user, const dwcp_progress *p) {
    progress_log *log = user;
    if (atomic_fetch_add(&log->inside, 1) != 0)
        atomic_fetch_add(&log->overlaps, 1);
    pthread_mutex_lock(&log->mu);
    log->calls++;
    size_t i = 0;
    while (i < log->n && log->r[i].region != p->region)
        i++;
    if (i == log->n) {
        if (log->n == MAX_PROGRESS) {
            log->overflow++;
            goto out;
        }
        log->n++;
        log->r[i].region = p->region;
        log->r[i].done = 0;
    }
    if (p->done < log->r[i].done)
        log->shrinks++;
    if (p->total != UINT64_MAX && p->done > p->total)
        log->overruns++;
    log->r[i].done = p->done;
    log->r[i].total = p->total;
    log->r[i].calls++;
out:
    pthread_mutex_unlock(&log->mu);
    atomic_fetch_sub(&log->inside, 1);
}

/* Waits up to `ms` for a region whose total is `total` to report
 * done == total. */
static bool progress_reached(progress_log *log, uint64_t total, double ms) {
    double end = now_ms() + ms;
    for (;;) {
        bool found = false;
        pthread_mutex_lock(&log->mu);
        for (size_t i = 0; i < log->n; i++)
            if (log->r[i].total == total && log->r[i].done == total)
                found = true;
        pthread_mutex_unlock(&log->mu);
        if (found)
            return true;
        if (now_ms() > end)
            return false;
        sleep_ms(5);
    }
}

/* Waits up to `ms` for a region to report done == `done`, its total
 * either `done` or unknown (UINT64_MAX: a stream); true if one did. */
static bool progress_done(progress_log *log, uint64_t done, double ms) {
    double end = now_ms() + ms;
    for (;;) {
        bool found = false;
        pthread_mutex_lock(&log->mu);
        for (size_t i = 0; i < log->n; i++)
            if (log->r[i].done == done &&
                (log->r[i].total == done || log->r[i].total == UINT64_MAX))
                found = true;
        pthread_mutex_unlock(&log->mu);
        if (found)
            return true;
        if (now_ms() > end)
            return false;
        sleep_ms(5);
    }
}

static void progress_check_sane(progress_log *log, const char *who) {
    pthread_mutex_lock(&log->mu);
    CHECKF(log->calls > 0, "%s: the progress callback was never called", who);
    CHECKF(log->shrinks == 0, "%s: progress went backwards %u times", who, log->shrinks);
    CHECKF(log->overruns == 0, "%s: progress passed its total %u times", who, log->overruns);
    CHECKF(atomic_load(&log->overlaps) == 0, "%s: progress callbacks ran concurrently", who);
    CHECKF(log->overflow == 0, "%s: more than %d regions", who, MAX_PROGRESS);
    pthread_mutex_unlock(&log->mu);
}

/* ------------------------------------------------------------------------ */
/* Version, status names, last error                                         */
/* ------------------------------------------------------------------------ */

static void test_version(void) {
    CHECKF(strcmp(dwcp_version(), DWCP_VERSION_STRING) == 0, "library %s, header %s",
           dwcp_version(), DWCP_VERSION_STRING);
    CHECK(dwcp_version_number() == (uint32_t)DWCP_VERSION_NUMBER);
    char v[32];
    snprintf(v, sizeof v, "%d.%d.%d", DWCP_VERSION_MAJOR, DWCP_VERSION_MINOR, DWCP_VERSION_PATCH);
    CHECK(strcmp(v, DWCP_VERSION_STRING) == 0);

    uint64_t caps = 0xdeadbeef;
    CHECK_OK(dwcp_capabilities(&caps));
    uint64_t known = DWCP_CAP_TCP | DWCP_CAP_RDMA | DWCP_CAP_LZ4 | DWCP_CAP_ZSTD |
                     DWCP_CAP_MIGRATION | DWCP_CAP_AUTH;
    CHECKF((caps & ~known) == 0, "unknown capability bits %#" PRIx64, caps);
    uint64_t need =
        DWCP_CAP_TCP | DWCP_CAP_LZ4 | DWCP_CAP_ZSTD | DWCP_CAP_MIGRATION | DWCP_CAP_AUTH;
    CHECKF((caps & need) == need, "capabilities %#" PRIx64 " lack %#" PRIx64, caps,
           need & ~caps);
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_capabilities(NULL));
}

static void test_status_names(void) {
#define NAME(s) {s, #s}
    static const struct {
        uint32_t value;
        const char *name;
    } names[] = {
        NAME(DWCP_STATUS_OK),
        NAME(DWCP_STATUS_NULL_ARGUMENT),
        NAME(DWCP_STATUS_INVALID_ARGUMENT),
        NAME(DWCP_STATUS_BUFFER_TOO_SMALL),
        NAME(DWCP_STATUS_PANIC),
        NAME(DWCP_STATUS_TIMEOUT),
        NAME(DWCP_STATUS_CANCELLED),
        NAME(DWCP_STATUS_BUSY),
        NAME(DWCP_STATUS_IO),
        NAME(DWCP_STATUS_ENGINE),
        NAME(DWCP_STATUS_UNSUPPORTED),
        NAME(DWCP_STATUS_AUTH),
        NAME(DWCP_STATUS_PROTOCOL),
        NAME(DWCP_STATUS_REFUSED),
        NAME(DWCP_STATUS_SESSION_LOST),
        NAME(DWCP_STATUS_VERIFY),
        NAME(DWCP_STATUS_MIGRATION_CANCELLED),
        NAME(DWCP_STATUS_CALLBACK_FAILED),
        NAME(DWCP_STATUS_CALLBACK_BAD_DATA),
        NAME(DWCP_STATUS_MIGRATION_DISCARDED),
        NAME(DWCP_STATUS_CODEC),
        NAME(DWCP_STATUS_MIGRATION_OUTCOME_UNKNOWN),
    };
#undef NAME
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const char *got = dwcp_status_name(names[i].value);
        CHECK(got != NULL);
        CHECKF(strcmp(got, names[i].name) == 0, "dwcp_status_name(%u) is %s, expected %s",
               names[i].value, got, names[i].name);
        /* Static: the same pointer every time. */
        CHECK(dwcp_status_name(names[i].value) == got);
    }
    static const uint32_t unknown[] = {1, 99, 107, 199, 203, 299, 305, 399, 406, 1000, UINT32_MAX};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++)
        CHECKF(strcmp(dwcp_status_name(unknown[i]), "DWCP_STATUS_UNKNOWN") == 0,
               "dwcp_status_name(%u) is %s", unknown[i], dwcp_status_name(unknown[i]));
}

typedef struct {
    size_t len_at_start;
    size_t len_after_failure;
    dwcp_status st;
} other_thread_errors;

static void *last_error_thread(void *p) {
    other_thread_errors *o = p;
    dwcp_last_error_len(&o->len_at_start);
    o->st = dwcp_key_load(NULL, NULL);
    dwcp_last_error_len(&o->len_after_failure);
    return NULL;
}

static void test_last_error(void) {
    uint64_t caps;
    size_t n = 12345;
    char buf[512];

    /* Empty after a success. */
    CHECK_OK(dwcp_capabilities(&caps));
    CHECK(dwcp_last_error_len(&n) == DWCP_STATUS_OK && n == 0);
    memset(buf, 'x', sizeof buf);
    n = 12345;
    CHECK(dwcp_last_error(buf, sizeof buf, &n) == DWCP_STATUS_OK);
    CHECK(n == 0 && buf[0] == '\0');
    /* Even the empty message needs room for its NUL. */
    CHECK(dwcp_last_error(buf, 0, &n) == DWCP_STATUS_BUFFER_TOO_SMALL);
    CHECK(dwcp_last_error(buf, 1, &n) == DWCP_STATUS_OK && n == 0);

    /* A message after a failure. */
    uint32_t workers = 77;
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_engine_workers(NULL, &workers));
    CHECK(workers == 77); /* outputs written only on success */
    size_t len = 0;
    CHECK(dwcp_last_error_len(&len) == DWCP_STATUS_OK);
    CHECK(len > 0 && len < sizeof buf);
    n = 0;
    CHECK(dwcp_last_error(buf, sizeof buf, &n) == DWCP_STATUS_OK);
    CHECK(n == len && strlen(buf) == len);
    CHECKF(strstr(buf, "engine") != NULL, "the message \"%s\" does not name the argument", buf);
    char msg[512];
    memcpy(msg, buf, len + 1);

    /* Too small: nothing written, not even `written`. Exactly `len` bytes
     * is too small too (no room for the NUL). */
    size_t sizes[] = {0, 1, len / 2, len};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        memset(buf, '#', sizeof buf);
        n = 999;
        CHECK(dwcp_last_error(buf, sizes[i], &n) == DWCP_STATUS_BUFFER_TOO_SMALL);
        CHECK(n == 999);
        for (size_t k = 0; k < sizeof buf; k++)
            CHECKF(buf[k] == '#', "dwcp_last_error wrote byte %zu into a %zu-byte buffer", k,
                   sizes[i]);
    }
    /* len + 1 fits exactly. */
    CHECK(dwcp_last_error(buf, len + 1, &n) == DWCP_STATUS_OK && n == len);
    CHECK(strcmp(buf, msg) == 0);

    /* NULL arguments, which do not replace the message. */
    CHECK(dwcp_last_error(NULL, 10, &n) == DWCP_STATUS_NULL_ARGUMENT);
    CHECK(dwcp_last_error(buf, sizeof buf, NULL) == DWCP_STATUS_NULL_ARGUMENT);
    CHECK(dwcp_last_error(NULL, 0, NULL) == DWCP_STATUS_NULL_ARGUMENT);
    CHECK(dwcp_last_error_len(NULL) == DWCP_STATUS_NULL_ARGUMENT);
    CHECK(dwcp_last_error(buf, sizeof buf, &n) == DWCP_STATUS_OK);
    CHECK(strcmp(buf, msg) == 0);
    /* Functions that return no status leave it too. */
    (void)dwcp_status_name(0);
    (void)dwcp_version();
    (void)dwcp_version_number();
    CHECK(dwcp_last_error_len(&n) == DWCP_STATUS_OK && n == len);

    /* Per thread: another thread starts empty and its failure leaves ours. */
    other_thread_errors o = {99, 0, 0};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, last_error_thread, &o) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    CHECK(o.len_at_start == 0);
    CHECK(o.st == DWCP_STATUS_NULL_ARGUMENT && o.len_after_failure > 0);
    CHECK(dwcp_last_error(buf, sizeof buf, &n) == DWCP_STATUS_OK);
    CHECK(strcmp(buf, msg) == 0);

    /* The next successful call clears it. */
    CHECK_OK(dwcp_capabilities(&caps));
    CHECK(dwcp_last_error_len(&n) == DWCP_STATUS_OK && n == 0);
}

/* ------------------------------------------------------------------------ */
/* Engine                                                                    */
/* ------------------------------------------------------------------------ */

static dwcp_engine *engine_one_worker(void) {
    dwcp_engine_options o;
    CHECK_OK(dwcp_engine_options_default(&o));
    o.workers = 1;
    o.pin = false;
    dwcp_engine *e = NULL;
    CHECK_OK(dwcp_engine_new(&o, &e));
    CHECK(e != NULL);
    return e;
}

static void test_engine(void) {
    dwcp_engine_options a, b;
    memset(&a, 0xAB, sizeof a);
    memset(&b, 0x11, sizeof b);
    CHECK_OK(dwcp_engine_options_default(&a));
    CHECK_OK(dwcp_engine_options_default(&b));
    CHECK(a.workers == b.workers && a.pin == b.pin);
    CHECK(a.workers <= 1024);
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_engine_options_default(NULL));

    uint64_t known = DWCP_ENGINE_SEND_ZC | DWCP_ENGINE_RECV_MULTISHOT |
                     DWCP_ENGINE_REGISTERED_BUFFERS | DWCP_ENGINE_DEFER_TASKRUN;

    /* NULL options: the defaults (one worker per CPU). */
    dwcp_engine *e = NULL;
    CHECK_OK(dwcp_engine_new(NULL, &e));
    CHECK(e != NULL);
    uint32_t workers = 0;
    CHECK_OK(dwcp_engine_workers(e, &workers));
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    CHECKF(workers >= 1 && (cpus <= 0 || workers <= (uint32_t)cpus), "%u workers, %ld CPUs",
           workers, cpus);
    uint64_t features = UINT64_MAX;
    CHECK_OK(dwcp_engine_features(e, &features));
    CHECKF((features & ~known) == 0, "unknown engine feature bits %#" PRIx64, features);
    dwcp_engine_free(e);

    /* One worker, not pinned. */
    e = engine_one_worker();
    CHECK_OK(dwcp_engine_workers(e, &workers));
    CHECK(workers == 1);
    features = UINT64_MAX;
    CHECK_OK(dwcp_engine_features(e, &features));
    CHECK((features & ~known) == 0);
    printf("  engine features: %#" PRIx64 "\n", features);

    /* NULL arguments; outputs untouched. */
    workers = 42;
    features = 42;
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_engine_workers(NULL, &workers));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_engine_workers(e, NULL));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_engine_features(NULL, &features));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_engine_features(e, NULL));
    CHECK(workers == 42 && features == 42);
    dwcp_engine_free(e);

    /* Out of range. */
    CHECK_OK(dwcp_engine_options_default(&a));
    a.workers = 1025;
    a.pin = false;
    dwcp_engine *sentinel = (dwcp_engine *)(uintptr_t)0x1234;
    e = sentinel;
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_engine_new(&a, &e));
    CHECK(e == sentinel);
    a.workers = UINT32_MAX;
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_engine_new(&a, &e));
    CHECK(e == sentinel);
    a.workers = 1;
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_engine_new(&a, NULL));

    dwcp_engine_free(NULL);
}

/* ------------------------------------------------------------------------ */
/* Keys                                                                      */
/* ------------------------------------------------------------------------ */

static void test_keys(void) {
    char path[600], other[600];
    tmp_path(path, sizeof path, "key1");
    uint8_t key[DWCP_KEY_LEN], loaded[DWCP_KEY_LEN], zero[DWCP_KEY_LEN] = {0};

    CHECK_OK(dwcp_key_generate(path, key));
    CHECK(memcmp(key, zero, sizeof key) != 0);
    struct stat st;
    CHECK(stat(path, &st) == 0);
    CHECKF((st.st_mode & 0777) == 0600, "key file mode %o, expected 600",
           (unsigned)(st.st_mode & 0777));
    memset(loaded, 0, sizeof loaded);
    CHECK_OK(dwcp_key_load(path, loaded));
    CHECK(memcmp(key, loaded, sizeof key) == 0);
    memcpy(g_key, key, sizeof key);

    /* An existing file is not overwritten; the output is untouched. */
    uint8_t again[DWCP_KEY_LEN];
    memset(again, 0x5A, sizeof again);
    CHECK_ST(DWCP_STATUS_IO, dwcp_key_generate(path, again));
    for (size_t i = 0; i < sizeof again; i++)
        CHECK(again[i] == 0x5A);
    CHECK_OK(dwcp_key_load(path, loaded));
    CHECK(memcmp(key, loaded, sizeof key) == 0);

    /* A second, different key. */
    tmp_path(other, sizeof other, "key2");
    CHECK_OK(dwcp_key_generate(other, g_key2));
    CHECK(memcmp(g_key, g_key2, sizeof g_key) != 0);

    /* A missing file. */
    tmp_path(other, sizeof other, "no-such-key");
    memset(loaded, 0x5A, sizeof loaded);
    CHECK_ST(DWCP_STATUS_IO, dwcp_key_load(other, loaded));
    for (size_t i = 0; i < sizeof loaded; i++)
        CHECK(loaded[i] == 0x5A);
    /* In a missing directory. */
    tmp_path(other, sizeof other, "no-such-dir/key");
    CHECK_ST(DWCP_STATUS_IO, dwcp_key_generate(other, again));

    /* A malformed key file, and one readable by others: refused. */
    tmp_path(other, sizeof other, "bad-key");
    write_file(other, "not a key\n", 10, 0600);
    dwcp_status s = CHECK_FAILS(dwcp_key_load(other, loaded));
    printf("  malformed key file: %s\n", dwcp_status_name(s));
    size_t hexlen = 0;
    uint8_t *hex = read_file(path, &hexlen);
    tmp_path(other, sizeof other, "open-key");
    write_file(other, hex, hexlen, 0644);
    free(hex);
    s = CHECK_FAILS(dwcp_key_load(other, loaded));
    printf("  key file readable by others: %s\n", dwcp_status_name(s));
    CHECK(loaded[0] == 0x5A);

    /* NULL arguments; nothing is created without somewhere to put the key. */
    tmp_path(other, sizeof other, "never-created");
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_key_generate(NULL, again));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_key_generate(other, NULL));
    CHECK(access(other, F_OK) != 0);
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_key_load(NULL, loaded));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_key_load(path, NULL));
    /* Not UTF-8. */
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_key_load("/tmp/\xff\xfe", loaded));
}

/* ------------------------------------------------------------------------ */
/* Transfers                                                                 */
/* ------------------------------------------------------------------------ */

static void test_options_defaults(void) {
    dwcp_connect_options c;
    memset(&c, 0xEE, sizeof c);
    CHECK_OK(dwcp_connect_options_default(&c));
    CHECK(c.key == NULL && !c.insecure_no_auth);
    CHECK(c.streams == 4 && c.mode == DWCP_MODE_DATACENTER && c.rate_limit == 0);
    CHECK(c.connect_timeout_ms == 10000 && c.stall_timeout_ms == 10000 && c.resume_ms == 30000);
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_connect_options_default(NULL));

    dwcp_listen_options l;
    memset(&l, 0xEE, sizeof l);
    CHECK_OK(dwcp_listen_options_default(&l));
    CHECK(l.key == NULL && !l.insecure_no_auth && l.dir == NULL);
    CHECK(l.memory_limit == (uint64_t)1 << 30 && l.grace_ms == 30000);
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_listen_options_default(NULL));
}

static void test_listen_errors(void) {
    dwcp_listen_options o;
    listen_opts(&o, g_key);
    dwcp_listener *sentinel = (dwcp_listener *)(uintptr_t)0x4321, *l = sentinel;
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_listen(NULL, "127.0.0.1:0", &o, &l));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_listen(g_rx, NULL, &o, &l));
    CHECK_ST(DWCP_STATUS_AUTH, dwcp_listen(g_rx, "127.0.0.1:0", NULL, &l));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_listen(g_rx, "127.0.0.1:0", &o, NULL));
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_listen(g_rx, "not an address", &o, &l));
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_listen(g_rx, "127.0.0.1", &o, &l));
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_listen(g_rx, "127.0.0.1:\xff", &o, &l));
    /* No key without insecure_no_auth; both at once. */
    o.key = NULL;
    CHECK_ST(DWCP_STATUS_AUTH, dwcp_listen(g_rx, "127.0.0.1:0", &o, &l));
    o.key = g_key;
    o.insecure_no_auth = true;
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_listen(g_rx, "127.0.0.1:0", &o, &l));
    /* A directory that does not exist. */
    char dir[600];
    tmp_path(dir, sizeof dir, "no-such-inbox");
    listen_opts(&o, g_key);
    o.dir = dir;
    CHECK_ST(DWCP_STATUS_IO, dwcp_listen(g_rx, "127.0.0.1:0", &o, &l));
    CHECK(l == sentinel);

    /* An address in use. */
    char addr[64];
    dwcp_listener *first = listen_on(g_key, NULL, addr, sizeof addr);
    listen_opts(&o, g_key);
    CHECK_FAILS(dwcp_listen(g_rx, addr, &o, &l));
    CHECK(l == sentinel);

    /* local_addr: small buffers, NULLs. */
    char small[8];
    size_t n = 77;
    memset(small, '#', sizeof small);
    CHECK_ST(DWCP_STATUS_BUFFER_TOO_SMALL,
             dwcp_listener_local_addr(first, small, sizeof small, &n));
    CHECK(n == 77 && small[0] == '#');
    CHECK_ST(DWCP_STATUS_BUFFER_TOO_SMALL, dwcp_listener_local_addr(first, small, 0, &n));
    CHECK_ST(DWCP_STATUS_BUFFER_TOO_SMALL, dwcp_listener_local_addr(first, addr, strlen(addr), &n));
    CHECK_OK(dwcp_listener_local_addr(first, addr, strlen(addr) + 1, &n));
    CHECK(n == strlen(addr));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_listener_local_addr(NULL, addr, sizeof addr, &n));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_listener_local_addr(first, NULL, sizeof addr, &n));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_listener_local_addr(first, addr, sizeof addr, NULL));

    /* next: timeout, NULLs. */
    dwcp_received *r = (dwcp_received *)(uintptr_t)0x99;
    double t0 = now_ms();
    CHECK_ST(DWCP_STATUS_TIMEOUT, dwcp_listener_next(first, 10, &r));
    double took = now_ms() - t0;
    CHECKF(took >= 9 && took < 2000, "a 10 ms wait took %.1f ms", took);
    CHECK(r == (dwcp_received *)(uintptr_t)0x99);
    CHECK_ST(DWCP_STATUS_TIMEOUT, dwcp_listener_next(first, 0, &r));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_listener_next(NULL, 10, &r));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_listener_next(first, 10, NULL));

    /* metrics and progress: NULLs; metrics of an idle listener. */
    dwcp_metrics m;
    memset(&m, 0xFF, sizeof m);
    CHECK_OK(dwcp_listener_metrics(first, &m));
    CHECK(m.bytes_in == 0 && m.bytes_acked == 0 && m.resumes == 0);
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_listener_metrics(NULL, &m));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_listener_metrics(first, NULL));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_listener_set_progress(NULL, on_progress, NULL));
    CHECK_OK(dwcp_listener_set_progress(first, NULL, NULL));
    dwcp_listener_free(first);
    dwcp_listener_free(NULL);
}

static void test_connect_errors(const char *addr) {
    dwcp_connect_options o;
    connect_opts(&o, g_key);
    dwcp_session *sentinel = (dwcp_session *)(uintptr_t)0x777, *s = sentinel;
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_connect(NULL, addr, &o, &s));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_connect(g_tx, NULL, &o, &s));
    CHECK_ST(DWCP_STATUS_AUTH, dwcp_connect(g_tx, addr, NULL, &s));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_connect(g_tx, addr, &o, NULL));
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_connect(g_tx, "nowhere", &o, &s));
    o.streams = 65;
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_connect(g_tx, addr, &o, &s));
    connect_opts(&o, g_key);
    o.mode = 99;
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_connect(g_tx, addr, &o, &s));
    connect_opts(&o, g_key);
    o.connect_timeout_ms = 0;
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_connect(g_tx, addr, &o, &s));
    connect_opts(&o, g_key);
    o.stall_timeout_ms = 0;
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_connect(g_tx, addr, &o, &s));
    /* The header: "no key where one is required" is DWCP_STATUS_AUTH. */
    connect_opts(&o, g_key);
    o.key = NULL;
    CHECK_ST(DWCP_STATUS_AUTH, dwcp_connect(g_tx, addr, &o, &s));
    connect_opts(&o, g_key);
    o.insecure_no_auth = true;
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_connect(g_tx, addr, &o, &s));
    /* The wrong key. */
    connect_opts(&o, g_key2);
    CHECK_ST(DWCP_STATUS_AUTH, dwcp_connect(g_tx, addr, &o, &s));
    /* Without a key, to a listener that wants one. */
    connect_opts(&o, NULL);
    dwcp_status st = CHECK_FAILS(dwcp_connect(g_tx, addr, &o, &s));
    CHECKF(st == DWCP_STATUS_AUTH || st == DWCP_STATUS_REFUSED, "insecure to keyed: %s",
           dwcp_status_name(st));
    CHECK(s == sentinel);
}

static void session_null_args(dwcp_session *s) {
    uint8_t b[4] = {1, 2, 3, 4};
    dwcp_metrics m;
    dwcp_stream *st = (dwcp_stream *)(uintptr_t)0x55;
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_session_send_buffer(NULL, "x", b, 4));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_session_send_buffer(s, NULL, b, 4));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_session_send_buffer(s, "x", NULL, 4));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_session_send_file(NULL, "/etc/hostname", NULL));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_session_send_file(s, NULL, "x"));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_session_stream_open(NULL, "x", &st));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_session_stream_open(s, NULL, &st));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_session_stream_open(s, "x", NULL));
    CHECK(st == (dwcp_stream *)(uintptr_t)0x55);
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_session_metrics(NULL, &m));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_session_metrics(s, NULL));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_session_set_progress(NULL, on_progress, NULL));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_session_cancel(NULL));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_session_close(NULL, &m));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_stream_write(NULL, b, 4));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_stream_finish(NULL, NULL));
    dwcp_session_free(NULL);
    dwcp_stream_free(NULL);
}

static void received_null_args(dwcp_listener *l, dwcp_session *s) {
    uint8_t b[3] = {7, 8, 9};
    CHECK_OK(dwcp_session_send_buffer(s, "probe", b, sizeof b));
    dwcp_received *r = NULL;
    CHECK_OK(dwcp_listener_next(l, 20000, &r));
    char name[16];
    size_t n = 5;
    memset(name, '#', sizeof name);
    CHECK_ST(DWCP_STATUS_BUFFER_TOO_SMALL, dwcp_received_name(r, name, 5, &n));
    CHECK(n == 5 && name[0] == '#');
    CHECK_OK(dwcp_received_name(r, name, 6, &n));
    CHECK(n == 5 && strcmp(name, "probe") == 0);
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_received_name(NULL, name, sizeof name, &n));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_received_name(r, NULL, sizeof name, &n));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_received_name(r, name, sizeof name, NULL));
    const uint8_t *d = (const uint8_t *)(uintptr_t)0x1;
    uint64_t len = 1234;
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_received_data(NULL, &d, &len));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_received_data(r, NULL, &len));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_received_data(r, &d, NULL));
    CHECK(len == 1234 && d == (const uint8_t *)(uintptr_t)0x1);
    CHECK_OK(dwcp_received_data(r, &d, &len));
    CHECK(len == 3 && memcmp(d, b, 3) == 0);
    dwcp_received_free(r);
    dwcp_received_free(NULL);
}

/* What a log callback heard. */
typedef struct {
    pthread_mutex_t lock;
    char text[4096];
    unsigned lines;
} log_lines;

static void on_log(void *user, const char *message) {
    log_lines *l = user;
    pthread_mutex_lock(&l->lock);
    size_t used = strlen(l->text);
    snprintf(l->text + used, sizeof l->text - used, "%s\n", message);
    l->lines++;
    pthread_mutex_unlock(&l->lock);
}

/* Log callbacks: a listener hears the connection it refused (the library
 * never prints it); NULL handles and NULL callbacks. */
static void test_log_callbacks(void) {
    char addr[64];
    dwcp_listener *l = listen_on(g_key, NULL, addr, sizeof addr);
    static log_lines heard = {PTHREAD_MUTEX_INITIALIZER, {0}, 0};
    CHECK_OK(dwcp_listener_set_log(l, on_log, &heard));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_listener_set_log(NULL, on_log, &heard));
    dwcp_connect_options o;
    connect_opts(&o, g_key2);
    dwcp_session *s = NULL;
    CHECK_ST(DWCP_STATUS_AUTH, dwcp_connect(g_tx, addr, &o, &s));
    bool found = false;
    for (int i = 0; i < 200 && !found; i++) {
        pthread_mutex_lock(&heard.lock);
        found = strstr(heard.text, "key") != NULL;
        pthread_mutex_unlock(&heard.lock);
        if (!found) sleep_ms(10);
    }
    CHECKF(found, "the listener's log heard: \"%s\"", heard.text);
    s = connect_to(addr, g_key);
    static log_lines session_heard = {PTHREAD_MUTEX_INITIALIZER, {0}, 0};
    CHECK_OK(dwcp_session_set_log(s, on_log, &session_heard));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_session_set_log(NULL, on_log, &session_heard));
    uint8_t b[100] = {0};
    CHECK_OK(dwcp_session_send_buffer(s, "log/quiet", b, sizeof b));
    CHECKF(session_heard.lines == 0, "a clean transfer logged: %s", session_heard.text);
    CHECK_OK(dwcp_session_set_log(s, NULL, NULL));
    CHECK_OK(dwcp_listener_set_log(l, NULL, NULL));
    dwcp_received *r = NULL;
    CHECK_OK(dwcp_listener_next(l, 5000, &r));
    dwcp_received_free(r);
    dwcp_session_free(s);
    dwcp_listener_free(l);
}

static void test_transfers(void) {
    char addr[64];
    dwcp_listener *l = listen_on(g_key, NULL, addr, sizeof addr);
    progress_log rx_log, tx_log;
    progress_init(&rx_log);
    progress_init(&tx_log);
    CHECK_OK(dwcp_listener_set_progress(l, on_progress, &rx_log));

    test_connect_errors(addr);

    dwcp_session *s = connect_to(addr, g_key);
    CHECK_OK(dwcp_session_set_progress(s, on_progress, &tx_log));
    session_null_args(s);
    received_null_args(l, s);

    /* 3 MiB of patterned data. */
    size_t big = g_quick ? (512 << 10) + 3 : (3 << 20) + 3;
    uint8_t *data = xmalloc(big);
    fill_pattern(data, big, 1);
    CHECK_OK(dwcp_session_send_buffer(s, "data/three.bin", data, big));
    expect_received(l, "data/three.bin", data, big);
    CHECKF(progress_reached(&tx_log, big, 5000), "sender: no progress with done == total == %zu",
           big);
    CHECKF(progress_reached(&rx_log, big, 5000),
           "receiver: no progress with done == total == %zu", big);
    progress_check_sane(&tx_log, "sender");
    progress_check_sane(&rx_log, "receiver");

    /* The caller's buffer may change as soon as the call returned. */
    uint8_t *copy = xmalloc(big);
    memcpy(copy, data, big);
    CHECK_OK(dwcp_session_send_buffer(s, "data/again.bin", data, big));
    memset(data, 0, big);
    expect_received(l, "data/again.bin", copy, big);
    free(copy);

    /* An empty buffer (NULL data with length 0 is allowed). */
    CHECK_OK(dwcp_session_send_buffer(s, "empty", NULL, 0));
    expect_received(l, "empty", NULL, 0);
    uint8_t one = 0x42;
    CHECK_OK(dwcp_session_send_buffer(s, "empty2", &one, 0));
    expect_received(l, "empty2", NULL, 0);

    /* Names that would leave a directory, or are no relative path. */
    static const char *bad[] = {"..", "../x", "a/../../x", "a/..", "/etc/passwd", ""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_session_send_buffer(s, bad[i], &one, 1));
        dwcp_stream *st = (dwcp_stream *)(uintptr_t)0x55;
        CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_session_stream_open(s, bad[i], &st));
        CHECK(st == (dwcp_stream *)(uintptr_t)0x55);
    }
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_session_send_buffer(s, "bad\xff", &one, 1));

    /* A file, under its own name and under another. */
    char path[600];
    tmp_path(path, sizeof path, "file.bin");
    size_t flen = (300 << 10) + 17;
    uint8_t *fdata = xmalloc(flen);
    fill_pattern(fdata, flen, 2);
    write_file(path, fdata, flen, 0640);
    CHECK_OK(dwcp_session_send_file(s, path, NULL));
    expect_received(l, "file.bin", fdata, flen);
    CHECK_OK(dwcp_session_send_file(s, path, "files/renamed.bin"));
    expect_received(l, "files/renamed.bin", fdata, flen);
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_session_send_file(s, path, "../up"));
    tmp_path(path, sizeof path, "no-such-file");
    CHECK_ST(DWCP_STATUS_IO, dwcp_session_send_file(s, path, NULL));
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_session_send_file(s, g_tmp, "dir"));
    free(fdata);

    /* Metrics. */
    dwcp_metrics m;
    memset(&m, 0, sizeof m);
    CHECK_OK(dwcp_session_metrics(s, &m));
    CHECKF(m.bytes_acked >= 2 * big + flen * 2, "bytes_acked %" PRIu64, m.bytes_acked);
    CHECK(m.bytes_in >= m.bytes_acked);
    CHECK(m.wire_bytes > 0 && m.streams >= 1 && m.ratio > 0);
    CHECK(m.retransmitted_chunks == 0 && m.stream_failures == 0 && m.resumes == 0);
    dwcp_metrics lm;
    CHECK_OK(dwcp_listener_metrics(l, &lm));
    CHECKF(lm.bytes_in >= 2 * big, "listener bytes_in %" PRIu64, lm.bytes_in);
    CHECK(lm.wire_bytes > 0);

    /* Close: final figures, then the handle is used up. */
    dwcp_metrics fin;
    memset(&fin, 0, sizeof fin);
    CHECK_OK(dwcp_session_close(s, &fin));
    CHECK(fin.bytes_acked >= m.bytes_acked);
    CHECK_ST(DWCP_STATUS_BUSY, dwcp_session_close(s, NULL));
    CHECK_ST(DWCP_STATUS_BUSY, dwcp_session_send_buffer(s, "late", &one, 1));
    CHECK_ST(DWCP_STATUS_BUSY, dwcp_session_metrics(s, &m));
    dwcp_stream *st = NULL;
    CHECK_ST(DWCP_STATUS_BUSY, dwcp_session_stream_open(s, "late", &st));
    CHECK_OK(dwcp_session_cancel(s)); /* nothing left to cancel */
    CHECK_OK(dwcp_session_set_progress(s, NULL, NULL));
    dwcp_session_free(s);

    /* Nothing more arrived. */
    dwcp_received *r = NULL;
    CHECK_ST(DWCP_STATUS_TIMEOUT, dwcp_listener_next(l, 10, &r));
    CHECK_OK(dwcp_listener_set_progress(l, NULL, NULL));
    dwcp_listener_free(l);
    free(data);
}

/* A listener's memory_limit: "more is refused". */
static void test_memory_limit(void) {
    dwcp_listen_options o;
    listen_opts(&o, g_key);
    o.memory_limit = 256 << 10;
    dwcp_listener *l = NULL;
    CHECK_OK(dwcp_listen(g_rx, "127.0.0.1:0", &o, &l));
    char addr[64];
    size_t n;
    CHECK_OK(dwcp_listener_local_addr(l, addr, sizeof addr, &n));
    dwcp_session *s = connect_to(addr, g_key);
    size_t len = 1 << 20;
    uint8_t *data = xmalloc(len);
    fill_pattern(data, len, 30);
    dwcp_status st = CHECK_FAILS(dwcp_session_send_buffer(s, "too-big", data, len));
    printf("  1 MiB to a listener holding 256 KiB: %s\n", dwcp_status_name(st));
    dwcp_received *r = NULL;
    CHECK_ST(DWCP_STATUS_TIMEOUT, dwcp_listener_next(l, 100, &r));
    /* What fits still goes through, on a new session if that one died. */
    dwcp_session_free(s);
    s = connect_to(addr, g_key);
    CHECK_OK(dwcp_session_send_buffer(s, "fits", data, 100 << 10));
    expect_received(l, "fits", data, 100 << 10);
    CHECK_OK(dwcp_session_close(s, NULL));
    dwcp_session_free(s);
    dwcp_listener_free(l);
    free(data);
}

typedef struct {
    const dwcp_session *s;
    char name[32];
    uint8_t *data;
    size_t len;
    dwcp_status st;
    char err[256];
} sender_job;

static void *send_job(void *p) {
    sender_job *j = p;
    j->st = dwcp_session_send_buffer(j->s, j->name, j->data, j->len);
    snprintf(j->err, sizeof j->err, "%s", last_error_text());
    return NULL;
}

/* "Transfers may run from several threads at once." */
static void test_concurrent_sends(void) {
    char addr[64];
    dwcp_listener *l = listen_on(g_key, NULL, addr, sizeof addr);
    dwcp_session *s = connect_to(addr, g_key);
    enum { JOBS = 4 };
    sender_job jobs[JOBS];
    pthread_t t[JOBS];
    for (int i = 0; i < JOBS; i++) {
        jobs[i].s = s;
        snprintf(jobs[i].name, sizeof jobs[i].name, "parallel/%d", i);
        jobs[i].len = (size_t)(100000 + 77777 * i);
        jobs[i].data = xmalloc(jobs[i].len);
        fill_pattern(jobs[i].data, jobs[i].len, 20 + (uint64_t)i);
        CHECK(pthread_create(&t[i], NULL, send_job, &jobs[i]) == 0);
    }
    for (int i = 0; i < JOBS; i++) {
        CHECK(pthread_join(t[i], NULL) == 0);
        CHECKF(jobs[i].st == DWCP_STATUS_OK, "%s: %s: %s", jobs[i].name,
               dwcp_status_name(jobs[i].st), jobs[i].err);
        CHECKF(jobs[i].err[0] == '\0', "%s succeeded and left \"%s\"", jobs[i].name, jobs[i].err);
    }
    bool seen[JOBS] = {false};
    for (int k = 0; k < JOBS; k++) {
        dwcp_received *r = NULL;
        CHECK_OK(dwcp_listener_next(l, 20000, &r));
        char name[64];
        size_t n;
        CHECK_OK(dwcp_received_name(r, name, sizeof name, &n));
        int i = -1;
        CHECKF(sscanf(name, "parallel/%d", &i) == 1 && i >= 0 && i < JOBS && !seen[i],
               "unexpected %s", name);
        seen[i] = true;
        const uint8_t *d;
        uint64_t dl;
        CHECK_OK(dwcp_received_data(r, &d, &dl));
        CHECK(dl == jobs[i].len && memcmp(d, jobs[i].data, jobs[i].len) == 0);
        dwcp_received_free(r);
    }
    for (int i = 0; i < JOBS; i++)
        free(jobs[i].data);
    CHECK_OK(dwcp_session_close(s, NULL));
    dwcp_session_free(s);
    dwcp_listener_free(l);
}

/* A session closed with NULL for the figures, and a listener that is freed
 * with transfers not taken. */
static void test_close_null_and_untaken(void) {
    char addr[64];
    dwcp_listener *l = listen_on(g_key, NULL, addr, sizeof addr);
    dwcp_session *s = connect_to(addr, g_key);
    uint8_t b[1000];
    fill_pattern(b, sizeof b, 3);
    CHECK_OK(dwcp_session_send_buffer(s, "untaken/1", b, sizeof b));
    CHECK_OK(dwcp_session_send_buffer(s, "untaken/2", b, sizeof b));
    CHECK_OK(dwcp_session_close(s, NULL));
    dwcp_session_free(s);
    dwcp_listener_free(l); /* frees both transfers */
}

static void test_insecure(void) {
    char addr[64];
    dwcp_listener *l = listen_on(NULL, NULL, addr, sizeof addr);
    /* A keyed sender to a listener without authentication. */
    dwcp_connect_options o;
    connect_opts(&o, g_key);
    dwcp_session *s = NULL;
    dwcp_status st = CHECK_FAILS(dwcp_connect(g_tx, addr, &o, &s));
    CHECKF(st == DWCP_STATUS_AUTH || st == DWCP_STATUS_REFUSED, "keyed to insecure: %s",
           dwcp_status_name(st));
    CHECK(s == NULL);
    /* Both insecure. */
    s = connect_to(addr, NULL);
    uint8_t b[70000];
    fill_pattern(b, sizeof b, 4);
    CHECK_OK(dwcp_session_send_buffer(s, "insecure.bin", b, sizeof b));
    expect_received(l, "insecure.bin", b, sizeof b);
    CHECK_OK(dwcp_session_close(s, NULL));
    dwcp_session_free(s);
    dwcp_listener_free(l);
}

static void test_stream(void) {
    char addr[64];
    dwcp_listener *l = listen_on(g_key, NULL, addr, sizeof addr);
    dwcp_session *s = connect_to(addr, g_key);
    progress_log tx_log;
    progress_init(&tx_log);
    CHECK_OK(dwcp_session_set_progress(s, on_progress, &tx_log));

    dwcp_stream *st = NULL;
    CHECK_OK(dwcp_session_stream_open(s, "stream/s1", &st));
    CHECK(st != NULL);
    static const size_t sizes[] = {1, 7, 4093, 0, 65537, 3, 131071, 99999, 1, 262147, 12345};
    size_t total = 0, rounds = g_quick ? 1 : 4;
    for (size_t k = 0; k < rounds; k++)
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
            total += sizes[i];
    uint8_t *all = xmalloc(total);
    fill_pattern(all, total, 5);
    uint8_t *piece = xmalloc(300000);
    size_t off = 0;
    for (size_t k = 0; k < rounds; k++) {
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            /* Copied: the piece is overwritten right after the call. */
            memcpy(piece, all + off, sizes[i]);
            CHECK_OK(dwcp_stream_write(st, piece, sizes[i]));
            memset(piece, 0xCC, sizes[i]);
            off += sizes[i];
        }
        /* While the stream is open, the session is busy. */
        if (k == 0)
            CHECK_ST(DWCP_STATUS_BUSY, dwcp_session_close(s, NULL));
    }
    CHECK_OK(dwcp_stream_write(st, NULL, 0));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_stream_write(st, NULL, 5));
    uint64_t len = 0;
    CHECK_OK(dwcp_stream_finish(st, &len));
    CHECKF(len == total, "stream_finish says %" PRIu64 " bytes, wrote %zu", len, total);
    expect_received(l, "stream/s1", all, total);
    /* Ended: no more writes, no second finish. */
    CHECK_ST(DWCP_STATUS_BUSY, dwcp_stream_write(st, all, 1));
    CHECK_ST(DWCP_STATUS_BUSY, dwcp_stream_finish(st, &len));
    /* Finished, not yet freed: no longer "running" (dwcp_session_close). */
    dwcp_status cs = dwcp_session_close(s, NULL);
    CHECKF(cs != DWCP_STATUS_BUSY,
              "dwcp_session_close is BUSY after dwcp_stream_finish until the stream is freed");
    dwcp_stream_free(st);
    if (cs == DWCP_STATUS_OK) { /* closed: go on with a new session */
        dwcp_session_free(s);
        s = connect_to(addr, g_key);
    }
    progress_check_sane(&tx_log, "stream sender");
    CHECKF(progress_done(&tx_log, total, 5000), "stream sender: no progress reached %zu bytes",
           total);

    /* finish with NULL length; an empty stream. */
    CHECK_OK(dwcp_session_stream_open(s, "stream/empty", &st));
    CHECK_OK(dwcp_stream_finish(st, NULL));
    dwcp_stream_free(st);
    expect_received(l, "stream/empty", NULL, 0);

    /* Two streams at once, interleaved. */
    dwcp_stream *a = NULL, *b = NULL;
    CHECK_OK(dwcp_session_stream_open(s, "stream/a", &a));
    CHECK_OK(dwcp_session_stream_open(s, "stream/b", &b));
    uint8_t *bufa = xmalloc(200000), *bufb = xmalloc(200000);
    fill_pattern(bufa, 200000, 6);
    fill_pattern(bufb, 200000, 7);
    for (size_t o = 0; o < 200000; o += 40000) {
        CHECK_OK(dwcp_stream_write(a, bufa + o, 40000));
        CHECK_OK(dwcp_stream_write(b, bufb + o, 40000));
    }
    uint64_t la = 0, lb = 0;
    CHECK_OK(dwcp_stream_finish(b, &lb));
    CHECK_OK(dwcp_stream_finish(a, &la));
    CHECK(la == 200000 && lb == 200000);
    dwcp_stream_free(a);
    dwcp_stream_free(b);
    /* Either order. */
    for (int i = 0; i < 2; i++) {
        dwcp_received *r = NULL;
        CHECK_OK(dwcp_listener_next(l, 20000, &r));
        char name[64];
        size_t n;
        CHECK_OK(dwcp_received_name(r, name, sizeof name, &n));
        const uint8_t *d;
        uint64_t dl;
        CHECK_OK(dwcp_received_data(r, &d, &dl));
        CHECK(dl == 200000);
        CHECKF(strcmp(name, "stream/a") == 0 || strcmp(name, "stream/b") == 0, "got %s", name);
        CHECK(memcmp(d, strcmp(name, "stream/a") == 0 ? bufa : bufb, 200000) == 0);
        dwcp_received_free(r);
    }
    free(bufa);
    free(bufb);

    /* All streams freed: the session closes. */
    CHECK_OK(dwcp_session_close(s, NULL));
    dwcp_session_free(s);
    dwcp_listener_free(l);
    free(all);
    free(piece);
}

/* A stream freed without finish is never delivered as complete; the
 * session carries on. */
static void test_stream_abandoned(void) {
    char addr[64];
    dwcp_listener *l = listen_on(g_key, NULL, addr, sizeof addr);
    dwcp_session *s = connect_to(addr, g_key);
    dwcp_stream *st = NULL;
    CHECK_OK(dwcp_session_stream_open(s, "stream/abandoned", &st));
    uint8_t *b = xmalloc(100000);
    fill_pattern(b, 100000, 8);
    for (int i = 0; i < 3; i++)
        CHECK_OK(dwcp_stream_write(st, b, 100000));
    dwcp_stream_free(st);
    dwcp_received *r = NULL;
    CHECK_ST(DWCP_STATUS_TIMEOUT, dwcp_listener_next(l, 300, &r));

    /* An abandoned stream right after open, with nothing written. */
    CHECK_OK(dwcp_session_stream_open(s, "stream/abandoned2", &st));
    dwcp_stream_free(st);

    /* The session still works, and nothing abandoned shows up. */
    CHECK_OK(dwcp_session_send_buffer(s, "after", b, 1000));
    expect_received(l, "after", b, 1000);
    CHECK_ST(DWCP_STATUS_TIMEOUT, dwcp_listener_next(l, 100, &r));
    CHECK_OK(dwcp_session_close(s, NULL));
    dwcp_session_free(s);
    CHECK_ST(DWCP_STATUS_TIMEOUT, dwcp_listener_next(l, 10, &r));
    dwcp_listener_free(l);
    free(b);
}

/* Handles may be freed in any order: the engine first, a session while its
 * stream is open. */
static void test_free_order(void) {
    dwcp_engine *e = engine_one_worker();
    dwcp_listen_options lo;
    listen_opts(&lo, g_key);
    dwcp_listener *l = NULL;
    CHECK_OK(dwcp_listen(e, "127.0.0.1:0", &lo, &l));
    char addr[64];
    size_t n;
    CHECK_OK(dwcp_listener_local_addr(l, addr, sizeof addr, &n));
    dwcp_connect_options co;
    connect_opts(&co, g_key);
    dwcp_session *s = NULL;
    CHECK_OK(dwcp_connect(e, addr, &co, &s));
    dwcp_engine_free(e); /* the session and the listener keep it alive */
    uint8_t b[5000];
    fill_pattern(b, sizeof b, 9);
    CHECK_OK(dwcp_session_send_buffer(s, "after-engine-free", b, sizeof b));
    expect_received(l, "after-engine-free", b, sizeof b);

    /* The session freed under an open stream: the stream fails, cleanly. */
    dwcp_stream *st = NULL;
    CHECK_OK(dwcp_session_stream_open(s, "orphan", &st));
    CHECK_OK(dwcp_stream_write(st, b, sizeof b));
    dwcp_session_free(s);
    dwcp_status ws = DWCP_STATUS_OK;
    for (int i = 0; i < 200 && ws == DWCP_STATUS_OK; i++)
        ws = dwcp_stream_write(st, b, sizeof b);
    dwcp_status fs = dwcp_stream_finish(st, NULL);
    CHECKF(fs != DWCP_STATUS_OK, "a stream of a freed session finished (write: %s)",
           dwcp_status_name(ws));
    printf("  stream of a freed session: write %s, finish %s\n", dwcp_status_name(ws),
           dwcp_status_name(fs));
    dwcp_stream_free(st);
    dwcp_received *r = NULL;
    CHECK_ST(DWCP_STATUS_TIMEOUT, dwcp_listener_next(l, 200, &r));
    dwcp_listener_free(l);
}

static void test_listener_dir(void) {
    char dir[600];
    tmp_path(dir, sizeof dir, "inbox");
    CHECK(mkdir(dir, 0700) == 0);
    char addr[64];
    dwcp_listener *l = listen_on(g_key, dir, addr, sizeof addr);
    dwcp_session *s = connect_to(addr, g_key);

    size_t len = (200 << 10) + 5;
    uint8_t *data = xmalloc(len);
    fill_pattern(data, len, 10);
    CHECK_OK(dwcp_session_send_buffer(s, "sub/x.bin", data, len));
    dwcp_received *r = NULL;
    CHECK_OK(dwcp_listener_next(l, 20000, &r));
    char name[128];
    size_t n;
    CHECK_OK(dwcp_received_name(r, name, sizeof name, &n));
    CHECKF(strcmp(name, "sub/x.bin") == 0, "received %s", name);
    const uint8_t *d = (const uint8_t *)(uintptr_t)0x1;
    uint64_t dl = 0;
    CHECK_OK(dwcp_received_data(r, &d, &dl));
    CHECK(d == NULL && dl == len);
    dwcp_received_free(r);
    char path[700];
    snprintf(path, sizeof path, "%s/sub/x.bin", dir);
    size_t got_len = 0;
    uint8_t *got = read_file(path, &got_len);
    CHECK(got_len == len && memcmp(got, data, len) == 0);
    free(got);

    /* A file keeps its permission bits and modification time. */
    char src[600];
    tmp_path(src, sizeof src, "perm.bin");
    write_file(src, data, 4321, 0640);
    struct timespec times[2] = {{1600000000, 123456789}, {1600000000, 123456789}};
    CHECK(utimensat(AT_FDCWD, src, times, 0) == 0);
    CHECK_OK(dwcp_session_send_file(s, src, "perm.bin"));
    CHECK_OK(dwcp_listener_next(l, 20000, &r));
    CHECK_OK(dwcp_received_data(r, &d, &dl));
    CHECK(d == NULL && dl == 4321);
    dwcp_received_free(r);
    snprintf(path, sizeof path, "%s/perm.bin", dir);
    struct stat st;
    CHECK(stat(path, &st) == 0);
    CHECKF((st.st_mode & 0777) == 0640, "received mode %o", (unsigned)(st.st_mode & 0777));
    CHECKF(st.st_mtim.tv_sec == 1600000000, "received mtime %lld", (long long)st.st_mtim.tv_sec);
    got = read_file(path, &got_len);
    CHECK(got_len == 4321 && memcmp(got, data, 4321) == 0);
    free(got);

    /* An empty file. */
    CHECK_OK(dwcp_session_send_buffer(s, "empty.bin", NULL, 0));
    CHECK_OK(dwcp_listener_next(l, 20000, &r));
    CHECK_OK(dwcp_received_data(r, &d, &dl));
    CHECK(d == NULL && dl == 0);
    dwcp_received_free(r);
    snprintf(path, sizeof path, "%s/empty.bin", dir);
    CHECK(stat(path, &st) == 0 && st.st_size == 0);

    CHECK_OK(dwcp_session_close(s, NULL));
    dwcp_session_free(s);
    CHECK_ST(DWCP_STATUS_TIMEOUT, dwcp_listener_next(l, 10, &r));
    dwcp_listener_free(l);
    free(data);
}

typedef struct {
    const dwcp_session *s;
    double after_ms;
    dwcp_status st;
    double took_ms;
} canceller;

static void *cancel_session_later(void *p) {
    canceller *c = p;
    sleep_ms(c->after_ms);
    double t0 = now_ms();
    c->st = dwcp_session_cancel(c->s);
    c->took_ms = now_ms() - t0;
    return NULL;
}

static void test_session_cancel(void) {
    char addr[64];
    dwcp_listener *l = listen_on(g_key, NULL, addr, sizeof addr);
    dwcp_connect_options o;
    connect_opts(&o, g_key);
    o.mode = DWCP_MODE_NONE;
    o.rate_limit = 80000000; /* 80 Mbit/s: 32 MiB take ~3.4 s */
    dwcp_session *s = NULL;
    CHECK_OK(dwcp_connect(g_tx, addr, &o, &s));
    size_t len = 32 << 20;
    uint8_t *data = xmalloc(len);
    fill_random(data, len, 11);
    canceller c = {s, 300, DWCP_STATUS_PANIC, 0};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, cancel_session_later, &c) == 0);
    double t0 = now_ms();
    CHECK_ST(DWCP_STATUS_CANCELLED, dwcp_session_send_buffer(s, "cancelled.bin", data, len));
    double took = now_ms() - t0;
    dwcp_metrics at_return;
    CHECK_OK(dwcp_listener_metrics(l, &at_return));
    CHECK(pthread_join(t, NULL) == 0);
    CHECK(c.st == DWCP_STATUS_OK);
    CHECKF(took < 3000, "the cancelled send returned after %.0f ms", took);
    printf("  cancelled send returned after %.0f ms; dwcp_session_cancel took %.0f ms\n", took,
           c.took_ms);
    /* "Nothing more is sent": the cancel neither waits for, nor lets
     * through, the rest of the buffer. */
    CHECKF(c.took_ms < 1000, "dwcp_session_cancel blocked for %.0f ms", c.took_ms);
    sleep_ms(200);
    dwcp_metrics after;
    CHECK_OK(dwcp_listener_metrics(l, &after));
    CHECKF(after.bytes_in < len / 2,
              "after the cancel the receiver got %" PRIu64 " of %zu bytes (%" PRIu64
              " when the send returned)",
              after.bytes_in, len, at_return.bytes_in);
    /* Later transfers are cancelled too; nothing was delivered. */
    CHECK_ST(DWCP_STATUS_CANCELLED, dwcp_session_send_buffer(s, "later", data, 10));
    dwcp_received *r = NULL;
    CHECK_ST(DWCP_STATUS_TIMEOUT, dwcp_listener_next(l, 200, &r));
    dwcp_session_free(s);
    dwcp_listener_free(l);
    free(data);
}

/* ------------------------------------------------------------------------ */
/* Migration: a fake hypervisor                                              */
/* ------------------------------------------------------------------------ */

#define PAGE 4096u
#define MAX_REGIONS 4

enum fault {
    FAULT_NONE,
    FAULT_START_LOG,        /* start_dirty_log returns non-zero */
    FAULT_READ,             /* read_and_clear_dirty returns non-zero (read n) */
    FAULT_READ_PAUSED,      /* ... on the first read while paused */
    FAULT_WRITTEN,          /* *written is one short (read n) */
    FAULT_TAIL,             /* a bit past the last page of the last region */
    FAULT_PAUSE,            /* pause returns non-zero */
    FAULT_SAVE,             /* save_device_state returns non-zero */
    FAULT_STATE_TOO_LONG,   /* save_device_state says len > cap */
    FAULT_LOAD,             /* destination: load_device_state returns non-zero */
    FAULT_DEST_RESUME,      /* destination: resume returns non-zero */
};

typedef struct {
    char magic[8];
    uint32_t version;
    uint32_t counter;
    uint64_t writes;
    uint64_t check;
} device_state;

static const char STATE_MAGIC[8] = {'F', 'A', 'K', 'E', 'V', 'M', '0', '1'};

static uint64_t state_check(const device_state *s) {
    return (uint64_t)s->counter * 0x9E3779B97F4A7C15ULL ^ s->writes ^ s->version;
}

typedef struct {
    size_t n;
    dwcp_region r[MAX_REGIONS];
    bool mapped[MAX_REGIONS]; /* mmap'd (else malloc'd) */
    uint64_t pages[MAX_REGIONS];
    uint64_t words[MAX_REGIONS];
    uint64_t *dirty[MAX_REGIONS];

    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t guest;
    bool has_guest;
    bool running; /* vCPUs run */
    unsigned burst;     /* pages the guest writes at each wake-up */
    uint64_t hot_pages; /* > 0: the guest writes only region 0's first pages */
    bool harsh;         /* whole-page writes; throttled, the guest all but stops (see guest_thread) */
    bool quit;
    uint64_t rng;
    uint64_t writes;

    bool dirty_log;
    uint32_t throttle, max_throttle;
    unsigned starts, stops, reads, pauses, resumes, throttles, saves, loads;
    uint32_t state_counter;  /* source: states saved */
    uint32_t loaded_counter; /* destination: the counter of the state loaded */
    pthread_t owner;         /* source callbacks must run on this thread */
    bool check_owner;
    unsigned violations;
    char violation[256];

    enum fault fault;
    unsigned fault_read; /* FAULT_READ / FAULT_WRITTEN / FAULT_TAIL: on read n */
} fake_vm;

typedef struct {
    size_t n;
    struct {
        uint64_t gpa, len;
        bool mmap;
    } r[MAX_REGIONS];
} layout;

/* 8 MiB at 0 and 4 MiB at 256 MiB, mmap'd. */
static const layout MAIN_LAYOUT = {2, {{0, 8 << 20, true}, {0x10000000, 4 << 20, true}}};
/* Small, and the last region's page count (45) is not a multiple of 64;
 * that one is malloc'd, so that AddressSanitizer sees any access past it. */
static const layout SMALL_LAYOUT = {2, {{0, 1 << 20, true}, {0x100000, 45 * PAGE, false}}};
/* SMALL_LAYOUT with a different last length. */
static const layout OTHER_LAYOUT = {2, {{0, 1 << 20, true}, {0x100000, 46 * PAGE, false}}};

static void violation(fake_vm *vm, const char *what) {
    /* Called with vm->mu held. */
    if (vm->violations++ == 0)
        snprintf(vm->violation, sizeof vm->violation, "%s", what);
}

/* A callback failing on purpose: says why (dwcp_callback_error) and
 * returns `rc`. Called with vm->mu held. */
static int injected(fake_vm *vm, const char *cb, int rc) {
    char m[128];
    snprintf(m, sizeof m, "fake-vm: %s refused (injected fault)", cb);
    if (dwcp_callback_error(m) != DWCP_STATUS_OK)
        violation(vm, "dwcp_callback_error failed inside a callback");
    return rc;
}

static void check_thread(fake_vm *vm, const char *cb) {
    if (vm->check_owner && !pthread_equal(pthread_self(), vm->owner)) {
        char m[128];
        snprintf(m, sizeof m, "%s ran on another thread than migrate_to's", cb);
        violation(vm, m);
    }
}

static void mark_dirty(fake_vm *vm, size_t region, uint64_t page) {
    if (vm->dirty_log)
        vm->dirty[region][page / 64] |= 1ULL << (page % 64);
}

/* The guest: while it runs, writes random words into random pages and
 * marks them dirty; the write and the mark happen under the lock, so that
 * a pause (which takes it) leaves no write half done and unmarked. */
static void *guest_thread(void *p) {
    fake_vm *vm = p;
    pthread_mutex_lock(&vm->mu);
    while (!vm->quit) {
        if (!vm->running) {
            pthread_cond_wait(&vm->cv, &vm->mu);
            continue;
        }
        unsigned burst = vm->harsh && vm->throttle ? 1 : vm->burst;
        for (unsigned b = 0; b < burst; b++) {
            uint64_t x = rng_next(&vm->rng);
            size_t region = vm->hot_pages ? 0 : (size_t)(x % vm->n);
            uint64_t page = (x >> 8) % (vm->hot_pages ? vm->hot_pages : vm->pages[region]);
            uint64_t room = vm->r[region].len - page * PAGE;
            if (room > PAGE)
                room = PAGE;
            uint8_t *base = (uint8_t *)vm->r[region].host + page * PAGE;
            /* Two words (a small delta), or for a harsh guest the whole
             * page with random bytes (no delta, no compression helps). */
            int words = vm->harsh ? (int)(room / 8) : 2;
            for (int k = 0; k < words; k++) {
                uint64_t v = rng_next(&vm->rng);
                uint64_t off = vm->harsh ? (uint64_t)k * 8 : (v >> 40) % room;
                size_t n = room - off < 8 ? (size_t)(room - off) : 8;
                memcpy(base + off, &v, n);
            }
            mark_dirty(vm, region, page);
            vm->writes++;
        }
        uint32_t th = vm->throttle;
        pthread_mutex_unlock(&vm->mu);
        /* ~3000 wake-ups a second; throttled: idle `th` percent more, and
         * a harsh guest wakes up only every 10 ms. */
        double period = vm->harsh && th ? 10 : 0.3;
        sleep_ms(th ? period * 100.0 / (100.0 - th) : period);
        pthread_mutex_lock(&vm->mu);
    }
    pthread_mutex_unlock(&vm->mu);
    return NULL;
}

static void vm_init(fake_vm *vm, const layout *lay, uint64_t seed, bool guest) {
    memset(vm, 0, sizeof *vm);
    CHECK(pthread_mutex_init(&vm->mu, NULL) == 0);
    CHECK(pthread_cond_init(&vm->cv, NULL) == 0);
    vm->n = lay->n;
    vm->rng = seed * 7919 + 1;
    vm->burst = 1;
    for (size_t i = 0; i < lay->n; i++) {
        uint64_t len = lay->r[i].len;
        void *host;
        if (lay->r[i].mmap) {
            host = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            CHECK(host != MAP_FAILED);
        } else {
            host = xmalloc(len);
        }
        vm->mapped[i] = lay->r[i].mmap;
        vm->r[i] = (dwcp_region){lay->r[i].gpa, host, len, 0};
        /* Private anonymous mappings say so: their untouched pages go as
         * zero pages unread (the migrations below check every byte). */
        if (lay->r[i].mmap) vm->r[i].flags = DWCP_REGION_PRIVATE_ANONYMOUS;
        vm->pages[i] = (len + PAGE - 1) / PAGE;
        vm->words[i] = (vm->pages[i] + 63) / 64;
        vm->dirty[i] = calloc(vm->words[i], sizeof(uint64_t));
        CHECK(vm->dirty[i] != NULL);
        uint8_t *m = host;
        if (seed == 0) {
            /* A destination: fresh memory, all zero (what the library
             * expects; see test_migration_dirty_destination). */
            memset(m, 0, len);
            continue;
        }
        for (uint64_t p = 0; p < vm->pages[i]; p++) {
            uint64_t off = p * PAGE, n = len - off < PAGE ? len - off : PAGE;
            switch ((p + i) % 7) {
            case 0:
                memset(m + off, 0, n); /* zero pages, sent as tags */
                break;
            case 1:
            case 2:
                for (uint64_t k = 0; k < n; k++)
                    m[off + k] = (uint8_t)(p * 31 + k / 16);
                break;
            default:
                fill_random(m + off, n, seed ^ (i << 32) ^ p);
            }
        }
    }
    vm->running = true;
    if (guest) {
        CHECK(pthread_create(&vm->guest, NULL, guest_thread, vm) == 0);
        vm->has_guest = true;
    }
}

static void vm_stop_guest(fake_vm *vm) {
    if (!vm->has_guest)
        return;
    pthread_mutex_lock(&vm->mu);
    vm->quit = true;
    pthread_cond_broadcast(&vm->cv);
    pthread_mutex_unlock(&vm->mu);
    CHECK(pthread_join(vm->guest, NULL) == 0);
    vm->has_guest = false;
}

static void vm_free(fake_vm *vm) {
    vm_stop_guest(vm);
    for (size_t i = 0; i < vm->n; i++) {
        if (vm->mapped[i])
            munmap(vm->r[i].host, vm->r[i].len);
        else
            free(vm->r[i].host);
        free(vm->dirty[i]);
    }
    pthread_cond_destroy(&vm->cv);
    pthread_mutex_destroy(&vm->mu);
}

static int cb_start_dirty_log(void *user) {
    fake_vm *vm = user;
    pthread_mutex_lock(&vm->mu);
    check_thread(vm, "start_dirty_log");
    vm->starts++;
    if (vm->dirty_log)
        violation(vm, "start_dirty_log while logging");
    int rc = 0;
    if (vm->fault == FAULT_START_LOG) {
        rc = injected(vm, "start_dirty_log", -3);
    } else {
        vm->dirty_log = true;
        /* Every page counts as dirty until the first read. */
        for (size_t i = 0; i < vm->n; i++) {
            memset(vm->dirty[i], 0xFF, vm->words[i] * 8);
            if (vm->pages[i] % 64)
                vm->dirty[i][vm->words[i] - 1] = (1ULL << (vm->pages[i] % 64)) - 1;
        }
    }
    pthread_mutex_unlock(&vm->mu);
    return rc;
}

static int cb_read_and_clear_dirty(void *user, uint32_t region, uint64_t *bitmap, size_t words,
                                   size_t *written) {
    fake_vm *vm = user;
    pthread_mutex_lock(&vm->mu);
    check_thread(vm, "read_and_clear_dirty");
    vm->reads++;
    if (!vm->dirty_log)
        violation(vm, "read_and_clear_dirty without a dirty log");
    if (region >= vm->n || words != vm->words[region] || bitmap == NULL || written == NULL) {
        violation(vm, "read_and_clear_dirty: bad arguments");
        pthread_mutex_unlock(&vm->mu);
        return -100;
    }
    bool this_read = vm->reads == vm->fault_read;
    if ((vm->fault == FAULT_READ && this_read) ||
        (vm->fault == FAULT_READ_PAUSED && !vm->running)) {
        int rc = injected(vm, "read_and_clear_dirty", -4);
        pthread_mutex_unlock(&vm->mu);
        return rc;
    }
    memcpy(bitmap, vm->dirty[region], words * 8);
    memset(vm->dirty[region], 0, words * 8);
    *written = words;
    if (vm->fault == FAULT_WRITTEN && this_read)
        *written = words - 1;
    if (vm->fault == FAULT_TAIL && this_read && region == vm->n - 1)
        bitmap[words - 1] |= 1ULL << (vm->pages[region] % 64);
    pthread_mutex_unlock(&vm->mu);
    return 0;
}

static int cb_stop_dirty_log(void *user) {
    fake_vm *vm = user;
    pthread_mutex_lock(&vm->mu);
    check_thread(vm, "stop_dirty_log");
    vm->stops++;
    vm->dirty_log = false;
    pthread_mutex_unlock(&vm->mu);
    return 0;
}

static int cb_pause(void *user) {
    fake_vm *vm = user;
    pthread_mutex_lock(&vm->mu);
    check_thread(vm, "pause");
    if (!vm->running)
        violation(vm, "pause while paused");
    int rc = 0;
    if (vm->fault == FAULT_PAUSE) {
        rc = injected(vm, "pause", -5);
    } else {
        /* Holding the lock, the guest is between writes: stopped. */
        vm->running = false;
        vm->pauses++;
    }
    pthread_mutex_unlock(&vm->mu);
    return rc;
}

static int cb_resume(void *user) {
    fake_vm *vm = user;
    pthread_mutex_lock(&vm->mu);
    check_thread(vm, "resume");
    if (vm->running)
        violation(vm, "resume while running");
    int rc = 0;
    if (vm->fault == FAULT_DEST_RESUME) {
        rc = injected(vm, "resume", -6);
    } else {
        vm->running = true;
        vm->resumes++;
        pthread_cond_broadcast(&vm->cv);
    }
    pthread_mutex_unlock(&vm->mu);
    return rc;
}

static int cb_throttle(void *user, uint32_t percent) {
    fake_vm *vm = user;
    pthread_mutex_lock(&vm->mu);
    check_thread(vm, "throttle");
    if (percent > 99)
        violation(vm, "throttle over 99 percent");
    vm->throttles++;
    vm->throttle = percent;
    if (percent > vm->max_throttle)
        vm->max_throttle = percent;
    pthread_mutex_unlock(&vm->mu);
    return 0;
}

static int cb_save_device_state(void *user, uint8_t *buf, size_t cap, size_t *len) {
    fake_vm *vm = user;
    pthread_mutex_lock(&vm->mu);
    check_thread(vm, "save_device_state");
    vm->saves++;
    if (vm->running)
        violation(vm, "save_device_state while running");
    int rc = 0;
    if (vm->fault == FAULT_SAVE) {
        rc = injected(vm, "save_device_state", -8);
    } else if (cap < sizeof(device_state)) {
        violation(vm, "save_device_state: cap too small");
        rc = -9;
    } else {
        device_state s;
        memset(&s, 0, sizeof s);
        memcpy(s.magic, STATE_MAGIC, sizeof s.magic);
        s.version = 1;
        s.counter = ++vm->state_counter;
        s.writes = vm->writes;
        s.check = state_check(&s);
        memcpy(buf, &s, sizeof s);
        *len = vm->fault == FAULT_STATE_TOO_LONG ? cap + 1 : sizeof s;
    }
    pthread_mutex_unlock(&vm->mu);
    return rc;
}

static int cb_load_device_state(void *user, const uint8_t *blob, size_t len) {
    fake_vm *vm = user;
    pthread_mutex_lock(&vm->mu);
    vm->loads++;
    int rc = 0;
    device_state s;
    if (vm->fault == FAULT_LOAD) {
        rc = injected(vm, "load_device_state", -7);
    } else if (blob == NULL || len != sizeof s) {
        violation(vm, "load_device_state: wrong length");
        rc = -10;
    } else {
        memcpy(&s, blob, sizeof s);
        if (memcmp(s.magic, STATE_MAGIC, sizeof s.magic) != 0 || s.version != 1 ||
            s.check != state_check(&s)) {
            violation(vm, "load_device_state: a malformed blob");
            rc = -11;
        } else {
            vm->loaded_counter = s.counter;
        }
    }
    pthread_mutex_unlock(&vm->mu);
    return rc;
}

static const dwcp_hv_callbacks SOURCE_CBS = {
    .start_dirty_log = cb_start_dirty_log,
    .read_and_clear_dirty = cb_read_and_clear_dirty,
    .stop_dirty_log = cb_stop_dirty_log,
    .pause = cb_pause,
    .resume = cb_resume,
    .throttle = cb_throttle,
    .save_device_state = cb_save_device_state,
    .load_device_state = NULL,
};

static const dwcp_hv_callbacks DEST_CBS = {
    .resume = cb_resume,
    .load_device_state = cb_load_device_state,
};

typedef struct {
    unsigned calls;
    unsigned bad;
    uint32_t next_round;
    uint32_t last_decision;
    uint64_t round0_pages;
    char why[200];
} round_log;

static void on_round(void *user, const dwcp_round_report *r) {
    round_log *log = user;
    if (g_verbose)
        printf("    round %u: %.1f-%.1f ms, %" PRIu64 " pages (%" PRIu64 " zero), %" PRIu64
               " wire bytes, %" PRIu64 " dirty, %.1f MiB/s dirtied, %.3f Gbit/s, ratio %.2f, "
               "predicted %.1f ms, throttle %u, decision %u\n",
               r->round, r->started_ms, r->ended_ms, r->pages_sent, r->zero_pages, r->wire_bytes,
               r->dirty_pages, r->dirty_rate_mibps, r->bandwidth_gbps, r->ratio,
               r->predicted_downtime_ms, r->throttle, r->decision);
    const char *bad = NULL;
    if (r->round != log->next_round)
        bad = "rounds out of order";
    else if (r->ended_ms < r->started_ms || r->started_ms < 0)
        bad = "a round ended before it started";
    else if (r->decision > DWCP_DECISION_CANCEL)
        bad = "an unknown decision";
    else if (r->throttle > 99)
        bad = "throttle over 99";
    else if (r->zero_pages > r->pages_sent || r->bytes_sent != r->pages_sent * PAGE)
        bad = "page counts do not add up";
    if (bad != NULL && log->bad++ == 0)
        snprintf(log->why, sizeof log->why, "round %u: %s", r->round, bad);
    if (r->round == 0)
        log->round0_pages = r->pages_sent;
    log->next_round = r->round + 1;
    log->last_decision = r->decision;
    log->calls++;
}

static uint64_t vm_pages(const fake_vm *vm) {
    uint64_t n = 0;
    for (size_t i = 0; i < vm->n; i++)
        n += vm->pages[i];
    return n;
}

/* The source guest runs on: not paused, unthrottled, dirty log stopped,
 * and it still writes. */
static void check_runs_on(const char *file, int line, fake_vm *vm) {
    pthread_mutex_lock(&vm->mu);
    bool ok = vm->running && !vm->dirty_log && vm->throttle == 0 && vm->pauses == vm->resumes;
    unsigned pauses = vm->pauses, resumes = vm->resumes, throttle = vm->throttle;
    bool running = vm->running, log = vm->dirty_log;
    uint64_t writes = vm->writes;
    pthread_mutex_unlock(&vm->mu);
    if (!ok)
        fail(file, line,
             "the source guest does not run on: running %d, dirty log %d, throttle %u, "
             "pauses %u, resumes %u",
             running, log, throttle, pauses, resumes);
    if (!vm->has_guest)
        return;
    double end = now_ms() + 5000;
    for (;;) {
        pthread_mutex_lock(&vm->mu);
        bool more = vm->writes > writes;
        pthread_mutex_unlock(&vm->mu);
        if (more)
            break;
        if (now_ms() > end)
            fail(file, line, "the source guest stopped writing");
        sleep_ms(2);
    }
}

#define CHECK_RUNS_ON(vm) check_runs_on(__FILE__, __LINE__, (vm))

static void check_no_violation(const char *file, int line, fake_vm *vm, const char *who) {
    pthread_mutex_lock(&vm->mu);
    unsigned n = vm->violations;
    pthread_mutex_unlock(&vm->mu);
    if (n)
        fail(file, line, "%s: %u callback contract violations, first: %s", who, n, vm->violation);
}

#define CHECK_NO_VIOLATION(vm, who) check_no_violation(__FILE__, __LINE__, (vm), (who))

/* A destination waiting for its migration on its own thread. */
typedef struct {
    dwcp_migration *m;
    double limit_ms;
    dwcp_status st;
    dwcp_incoming_report rep;
    unsigned timeouts;
    char err[1024];
    pthread_t t;
} waiter;

static void *wait_incoming_thread(void *p) {
    waiter *w = p;
    double end = now_ms() + w->limit_ms;
    for (;;) {
        w->st = dwcp_migration_wait_incoming(w->m, 100, &w->rep);
        if (w->st != DWCP_STATUS_TIMEOUT || now_ms() > end)
            break;
        w->timeouts++;
    }
    /* Per thread: read it here. */
    snprintf(w->err, sizeof w->err, "%s", last_error_text());
    return NULL;
}

static void waiter_start(waiter *w, dwcp_migration *m) {
    memset(w, 0, sizeof *w);
    w->m = m;
    w->limit_ms = 60000;
    w->st = DWCP_STATUS_PANIC;
    CHECK(pthread_create(&w->t, NULL, wait_incoming_thread, w) == 0);
}

static void waiter_join(waiter *w) {
    CHECK(pthread_join(w->t, NULL) == 0);
}

static void migration_opts(dwcp_migration_options *o, round_log *rounds) {
    CHECK_OK(dwcp_migration_options_default(o));
    o->on_round = rounds ? on_round : NULL;
    o->on_round_user = rounds;
}

/* A destination listening on loopback with g_key. */
static dwcp_migration *dest_listening_with(fake_vm *dst, char *addr, size_t cap,
                                           bool prealloc_state) {
    dwcp_migration_options mo;
    migration_opts(&mo, NULL);
    mo.dest_prealloc_state = prealloc_state;
    dwcp_migration *m = NULL;
    CHECK_OK(dwcp_migration_dest_new(g_rx, dst->r, dst->n, &DEST_CBS, dst, &mo, &m));
    CHECK(m != NULL);
    dwcp_listen_options lo;
    listen_opts(&lo, g_key);
    CHECK_OK(dwcp_migration_listen(m, "127.0.0.1:0", &lo));
    size_t n = 0;
    CHECK_OK(dwcp_migration_local_addr(m, addr, cap, &n));
    CHECK(n == strlen(addr) && strncmp(addr, "127.0.0.1:", 10) == 0);
    return m;
}

static dwcp_migration *dest_listening(fake_vm *dst, char *addr, size_t cap) {
    return dest_listening_with(dst, addr, cap, false);
}

static void migration_connect_opts(dwcp_connect_options *o) {
    connect_opts(o, g_key);
    o->stall_timeout_ms = 5000;
    o->resume_ms = 3000;
}

static void check_digest(const char *what, const uint8_t *a, const uint8_t *b) {
    if (memcmp(a, b, 32) != 0) {
        char ha[65], hb[65];
        for (int i = 0; i < 32; i++) {
            snprintf(ha + 2 * i, 3, "%02x", a[i]);
            snprintf(hb + 2 * i, 3, "%02x", b[i]);
        }
        CHECKF(false, "%s: digests differ: %s vs %s", what, ha, hb);
    }
}

static void test_migration(void) {
    fake_vm src, dst;
    vm_init(&src, &MAIN_LAYOUT, 42, true);
    vm_init(&dst, &MAIN_LAYOUT, 0, false);
    dst.running = false; /* started by the migration */

    char addr[64];
    dwcp_migration *dm = dest_listening(&dst, addr, sizeof addr);
    /* Nothing came yet. */
    dwcp_incoming_report in;
    memset(&in, 0xAB, sizeof in);
    CHECK_ST(DWCP_STATUS_TIMEOUT, dwcp_migration_wait_incoming(dm, 10, &in));
    CHECK(in.pages == 0xABABABABABABABABULL);
    waiter w;
    waiter_start(&w, dm);

    round_log rounds = {0};
    dwcp_migration_options mo;
    migration_opts(&mo, &rounds);
    dwcp_migration *sm = NULL;
    CHECK_OK(dwcp_migration_source_new(g_tx, src.r, src.n, &SOURCE_CBS, &src, &mo, &sm));
    CHECK(sm != NULL);
    src.owner = pthread_self();
    src.check_owner = true;
    dwcp_connect_options co;
    migration_connect_opts(&co);
    dwcp_migration_report rep;
    memset(&rep, 0, sizeof rep);
    double t0 = now_ms();
    CHECK_OK(dwcp_migration_migrate_to(sm, addr, &co, &rep));
    double took = now_ms() - t0;
    waiter_join(&w);
    CHECKF(w.st == DWCP_STATUS_OK, "wait_incoming: %s: %s", dwcp_status_name(w.st), w.err);
    CHECKF(w.err[0] == '\0', "wait_incoming succeeded and left \"%s\"", w.err);
    printf("  migrated %" PRIu64 " pages in %.0f ms: %u rounds, downtime %.1f ms, wire %" PRIu64
           " bytes, throttle %u, converged %d; destination %" PRIu64 " pages in %" PRIu64
           " batches\n",
           vm_pages(&src), took, rep.rounds, rep.downtime_ms, rep.wire_bytes, rep.max_throttle,
           rep.converged, w.rep.pages, w.rep.batches);

    /* The source stays paused; the destination runs. */
    CHECK_NO_VIOLATION(&src, "source");
    CHECK_NO_VIOLATION(&dst, "destination");
    CHECK(!src.running && src.pauses == 1 && src.resumes == 0);
    CHECK(src.starts == 1 && !src.dirty_log && src.saves == 1);
    CHECK(dst.running && dst.resumes == 1 && dst.loads == 1);
    CHECK(dst.loaded_counter == src.state_counter && src.state_counter == 1);

    /* The report. */
    uint64_t pages = vm_pages(&src);
    CHECK(rep.rounds >= 1 && rep.rounds <= mo.max_rounds);
    CHECKF(rep.pages_sent >= pages, "pages_sent %" PRIu64 " of %" PRIu64, rep.pages_sent, pages);
    CHECK(rep.bytes_sent == rep.pages_sent * PAGE);
    CHECK(rep.wire_bytes > 0);
    CHECK(rep.total_ms > 0 && rep.downtime_ms >= 0 && rep.downtime_ms <= rep.total_ms);
    CHECK(rep.total_ms <= took + 1);
    CHECK(rep.max_throttle <= 99 && rep.max_throttle == src.max_throttle);
    CHECK(w.rep.pages > 0 && w.rep.batches > 0 && w.rep.finish_ms >= 0);

    /* The round callback heard every round, the last one stopping. */
    CHECKF(rounds.bad == 0, "round callback: %s", rounds.why);
    CHECKF(rounds.calls == rep.rounds, "%u round callbacks, %u rounds", rounds.calls, rep.rounds);
    CHECK(rounds.last_decision == DWCP_DECISION_STOP_AND_COPY);
    CHECK(rounds.round0_pages == pages);

    /* The same memory on both sides. */
    uint8_t ds[32], dd[32];
    CHECK_OK(dwcp_memory_digest(src.r, src.n, ds));
    CHECK_OK(dwcp_memory_digest(dst.r, dst.n, dd));
    check_digest("source vs incoming report", ds, w.rep.memory_digest);
    check_digest("source vs destination", ds, dd);
    for (size_t i = 0; i < src.n; i++)
        CHECKF(memcmp(src.r[i].host, dst.r[i].host, src.r[i].len) == 0,
               "region %zu differs after the migration", i);
    CHECK(src.writes > 0);

    /* A handle migrates once; waiting again says the same. */
    CHECK_ST(DWCP_STATUS_BUSY, dwcp_migration_migrate_to(sm, addr, &co, &rep));
    dwcp_incoming_report again;
    CHECK_OK(dwcp_migration_wait_incoming(dm, 0, &again));
    check_digest("second wait_incoming", again.memory_digest, w.rep.memory_digest);
    /* Cancelling a finished migration changes nothing. */
    CHECK_OK(dwcp_migration_cancel(dm));
    CHECK_OK(dwcp_migration_wait_incoming(dm, 0, &again));
    CHECK_OK(dwcp_migration_cancel(sm));

    dwcp_migration_free(sm);
    dwcp_migration_free(dm);
    vm_free(&src);
    vm_free(&dst);
}

/* Migrates `lay` from a running source to a destination whose memory is
 * all `dst_fill`; returns migrate_to's status (its message in `err`) and,
 * when it succeeded, whether the source's digest, the incoming report's,
 * the destination memory's, and the bytes of the regions agree. */
typedef struct {
    dwcp_status st, dst_st;
    char err[512];
    bool report_matches_source, memory_matches_report, bytes_match;
} simple_result;

static simple_result migrate_simple(const layout *lay, uint8_t dst_fill, bool round0_state,
                                    bool prealloc_state) {
    simple_result res;
    memset(&res, 0, sizeof res);
    fake_vm src, dst;
    vm_init(&src, lay, 9, true);
    vm_init(&dst, lay, 0, false);
    dst.running = false;
    for (size_t i = 0; i < dst.n; i++)
        memset(dst.r[i].host, dst_fill, dst.r[i].len);
    char addr[64];
    dwcp_migration *dm = dest_listening_with(&dst, addr, sizeof addr, prealloc_state);
    waiter w;
    waiter_start(&w, dm);
    dwcp_migration_options mo;
    migration_opts(&mo, NULL);
    mo.round0_codec_state = round0_state;
    dwcp_migration *sm = NULL;
    CHECK_OK(dwcp_migration_source_new(g_tx, src.r, src.n, &SOURCE_CBS, &src, &mo, &sm));
    dwcp_connect_options co;
    migration_connect_opts(&co);
    dwcp_migration_report rep;
    res.st = dwcp_migration_migrate_to(sm, addr, &co, &rep);
    snprintf(res.err, sizeof res.err, "%s", last_error_text());
    waiter_join(&w);
    res.dst_st = w.st;
    if (res.st == DWCP_STATUS_OK) {
        CHECKF(w.st == DWCP_STATUS_OK, "wait_incoming: %s: %s", dwcp_status_name(w.st), w.err);
        uint8_t ds[32], dd[32];
        CHECK_OK(dwcp_memory_digest(src.r, src.n, ds));
        CHECK_OK(dwcp_memory_digest(dst.r, dst.n, dd));
        res.report_matches_source = memcmp(ds, w.rep.memory_digest, 32) == 0;
        res.memory_matches_report = memcmp(dd, w.rep.memory_digest, 32) == 0;
        res.bytes_match = true;
        for (size_t i = 0; i < src.n; i++)
            res.bytes_match &= memcmp(src.r[i].host, dst.r[i].host, src.r[i].len) == 0;
    } else {
        CHECK_RUNS_ON(&src);
    }
    dwcp_migration_free(sm);
    dwcp_migration_free(dm);
    vm_free(&src);
    vm_free(&dst);
    return res;
}

/* A destination whose memory is not zero at the start: the header does not
 * ask for zeroed memory, and the incoming report's digest is meant to be
 * the digest of the destination's memory. */
static void test_migration_dirty_destination(void) {
    simple_result r = migrate_simple(&SMALL_LAYOUT, 0x5A, true, false);
    CHECKF(r.st == DWCP_STATUS_OK, "migrate_to: %s: %s", dwcp_status_name(r.st), r.err);
    CHECK(r.report_matches_source);
    CHECKF(r.memory_matches_report && r.bytes_match,
              "destination memory that was not zero: the report's memory_digest %s the "
              "destination's memory, whose bytes %s the source's (zero pages are never written)",
              r.memory_matches_report ? "matches" : "does not match",
              r.bytes_match ? "match" : "do not match");
}

/* The same with round 0 sent through stateless encoders (the default
 * keeps it in the codec state): the other kind of page batch. */
static void test_migration_round0_stateless(void) {
    simple_result r = migrate_simple(&SMALL_LAYOUT, 0, false, false);
    CHECKF(r.st == DWCP_STATUS_OK, "migrate_to: %s: %s", dwcp_status_name(r.st), r.err);
    CHECK(r.report_matches_source && r.memory_matches_report && r.bytes_match);
}

/* A destination that allocated its page codec state in advance decodes
 * into it (its arenas hold no meaningful bytes). */
static void test_migration_dest_prealloc_state(void) {
    simple_result r = migrate_simple(&SMALL_LAYOUT, 0, true, true);
    CHECKF(r.st == DWCP_STATUS_OK, "migrate_to: %s: %s", dwcp_status_name(r.st), r.err);
    CHECK(r.report_matches_source && r.memory_matches_report && r.bytes_match);
}

/* A guest that dirties memory faster than the link carries it: the
 * controller throttles it (through the throttle callback) until the
 * migration converges. */
static void test_migration_throttled(void) {
    fake_vm src, dst;
    vm_init(&src, &MAIN_LAYOUT, 11, true);
    vm_init(&dst, &MAIN_LAYOUT, 0, false);
    /* Tens of thousands of whole-page random writes a second into an 8 MiB
     * hot set: every round finds much of it dirty, and neither deltas nor
     * compression shrink it (with two-word writes, deltas of ~40 bytes let
     * rounds shrink to nothing and it converged unthrottled), too much to
     * stop under 50 ms at 80 Mbit/s, until the throttle (harsh: a page
     * every 10 ms) calms the guest. */
    pthread_mutex_lock(&src.mu);
    src.burst = 64;
    src.hot_pages = 2048;
    src.harsh = true;
    pthread_mutex_unlock(&src.mu);
    dst.running = false;
    char addr[64];
    dwcp_migration *dm = dest_listening(&dst, addr, sizeof addr);
    waiter w;
    waiter_start(&w, dm);
    round_log rounds = {0};
    dwcp_migration_options mo;
    migration_opts(&mo, &rounds);
    mo.deadline_ms = 30000;
    dwcp_migration *sm = NULL;
    CHECK_OK(dwcp_migration_source_new(g_tx, src.r, src.n, &SOURCE_CBS, &src, &mo, &sm));
    src.owner = pthread_self();
    src.check_owner = true;
    dwcp_connect_options co;
    migration_connect_opts(&co);
    co.rate_limit = 80000000;
    dwcp_migration_report rep;
    double t0 = now_ms();
    CHECK_OK(dwcp_migration_migrate_to(sm, addr, &co, &rep));
    double took = now_ms() - t0;
    waiter_join(&w);
    CHECKF(w.st == DWCP_STATUS_OK, "wait_incoming: %s: %s", dwcp_status_name(w.st), w.err);
    printf("  %u rounds in %.0f ms, throttle up to %u%% (%u calls), downtime %.1f ms, "
           "converged %d\n",
           rep.rounds, took, rep.max_throttle, src.throttles, rep.downtime_ms, rep.converged);
    CHECKF(rounds.bad == 0, "round callback: %s", rounds.why);
    CHECK_NO_VIOLATION(&src, "source");
    CHECK(rep.max_throttle > 0 && rep.max_throttle <= 99);
    CHECK(src.max_throttle == rep.max_throttle);
    uint8_t ds[32];
    CHECK_OK(dwcp_memory_digest(src.r, src.n, ds));
    check_digest("throttled: source vs incoming report", ds, w.rep.memory_digest);
    for (size_t i = 0; i < src.n; i++)
        CHECK(memcmp(src.r[i].host, dst.r[i].host, src.r[i].len) == 0);
    dwcp_migration_free(sm);
    dwcp_migration_free(dm);
    vm_free(&src);
    vm_free(&dst);
}

typedef struct {
    dwcp_migration *m;
    uint32_t timeout_ms;
    dwcp_status st;
    double took_ms;
} one_wait;

static void *wait_once(void *p) {
    one_wait *w = p;
    dwcp_incoming_report r;
    double t0 = now_ms();
    w->st = dwcp_migration_wait_incoming(w->m, w->timeout_ms, &r);
    w->took_ms = now_ms() - t0;
    return NULL;
}

/* A destination's wait_incoming on one thread while others call in. */
static void test_migration_dest_threads(void) {
    fake_vm dst;
    vm_init(&dst, &SMALL_LAYOUT, 0, false);
    dst.running = false;
    char addr[64];

    /* Cancelled from another thread: the wait ends at once, discarded. */
    dwcp_migration *dm = dest_listening(&dst, addr, sizeof addr);
    one_wait w = {dm, 10000, DWCP_STATUS_PANIC, 0};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, wait_once, &w) == 0);
    sleep_ms(100);
    CHECK_OK(dwcp_migration_cancel(dm));
    CHECK(pthread_join(t, NULL) == 0);
    CHECKF(w.st == DWCP_STATUS_MIGRATION_DISCARDED, "wait_incoming: %s", dwcp_status_name(w.st));
    CHECKF(w.took_ms < 3000, "the cancelled wait took %.0f ms", w.took_ms);
    dwcp_migration_free(dm);

    /* local_addr (a const handle) while another thread waits. */
    if (!g_quick) {
        dm = dest_listening(&dst, addr, sizeof addr);
        w = (one_wait){dm, 1500, DWCP_STATUS_PANIC, 0};
        CHECK(pthread_create(&t, NULL, wait_once, &w) == 0);
        sleep_ms(100);
        char again[64];
        size_t n = 0;
        double t0 = now_ms();
        CHECK_OK(dwcp_migration_local_addr(dm, again, sizeof again, &n));
        double took = now_ms() - t0;
        CHECK(strcmp(again, addr) == 0);
        CHECK(pthread_join(t, NULL) == 0);
        CHECK(w.st == DWCP_STATUS_TIMEOUT);
        CHECKF(took < 500,
                  "dwcp_migration_local_addr waited %.0f ms for a wait_incoming on another "
                  "thread to end",
                  took);
        dwcp_migration_free(dm);
    }
    CHECK(dst.loads == 0 && dst.resumes == 0);
    vm_free(&dst);
}

/* One failing migration: what the source and the destination say. */
typedef struct {
    const char *name;
    const layout *src_layout, *dst_layout;
    enum fault src_fault;
    unsigned fault_read;
    enum fault dst_fault;
    dwcp_status want_src; /* DWCP_STATUS_OK: any error */
    dwcp_status want_dst; /* DWCP_STATUS_OK: any error */
    uint64_t rate_limit;
    uint32_t deadline_ms;
    double cancel_after_ms; /* > 0: dwcp_migration_cancel from another thread */
} failure;

typedef struct {
    dwcp_migration *m;
    double after_ms;
    dwcp_status st;
} migration_canceller;

static void *cancel_migration_later(void *p) {
    migration_canceller *c = p;
    sleep_ms(c->after_ms);
    c->st = dwcp_migration_cancel(c->m);
    return NULL;
}

static void run_failure(const failure *f) {
    fake_vm src, dst;
    vm_init(&src, f->src_layout, 7, true);
    vm_init(&dst, f->dst_layout, 0, false);
    dst.running = false;
    src.fault = f->src_fault;
    src.fault_read = f->fault_read;
    dst.fault = f->dst_fault;

    char addr[64];
    dwcp_migration *dm = dest_listening(&dst, addr, sizeof addr);
    waiter w;
    waiter_start(&w, dm);
    round_log rounds = {0};
    dwcp_migration_options mo;
    migration_opts(&mo, &rounds);
    mo.deadline_ms = f->deadline_ms;
    dwcp_migration *sm = NULL;
    CHECK_OK(dwcp_migration_source_new(g_tx, src.r, src.n, &SOURCE_CBS, &src, &mo, &sm));
    src.owner = pthread_self();
    src.check_owner = true;
    dwcp_connect_options co;
    migration_connect_opts(&co);
    co.rate_limit = f->rate_limit;

    migration_canceller c = {sm, f->cancel_after_ms, DWCP_STATUS_PANIC};
    pthread_t ct;
    if (f->cancel_after_ms > 0)
        CHECK(pthread_create(&ct, NULL, cancel_migration_later, &c) == 0);
    dwcp_migration_report rep;
    memset(&rep, 0xCD, sizeof rep);
    double t0 = now_ms();
    dwcp_status st = dwcp_migration_migrate_to(sm, addr, &co, &rep);
    double took = now_ms() - t0;
    const char *msg = last_error_text();
    if (f->cancel_after_ms > 0) {
        CHECK(pthread_join(ct, NULL) == 0);
        CHECK(c.st == DWCP_STATUS_OK);
        CHECKF(took < f->cancel_after_ms + 5000, "%s: migrate_to returned %.0f ms after the start",
               f->name, took);
    }
    CHECKF(st != DWCP_STATUS_OK, "%s: the migration succeeded", f->name);
    CHECKF(f->want_src == DWCP_STATUS_OK || st == f->want_src,
           "%s: migrate_to returned %s, expected %s: %s", f->name, dwcp_status_name(st),
           dwcp_status_name(f->want_src), msg);
    CHECKF(msg[0] != '\0', "%s: migrate_to failed without a message", f->name);
    /* The reason the callback gave is quoted. */
    CHECKF(st != DWCP_STATUS_CALLBACK_FAILED || strstr(msg, "fake-vm: ") != NULL,
           "%s: the message does not quote dwcp_callback_error's reason: %s", f->name, msg);
    CHECKF(rep.rounds == 0xCDCDCDCD, "%s: the report was written on failure", f->name);
    CHECK_RUNS_ON(&src);
    CHECK_NO_VIOLATION(&src, f->name);

    waiter_join(&w);
    CHECKF(w.st != DWCP_STATUS_OK && w.st != DWCP_STATUS_TIMEOUT,
           "%s: the destination's wait_incoming returned %s", f->name, dwcp_status_name(w.st));
    CHECKF(f->want_dst == DWCP_STATUS_OK || w.st == f->want_dst,
           "%s: wait_incoming returned %s, expected %s: %s", f->name, dwcp_status_name(w.st),
           dwcp_status_name(f->want_dst), w.err);
    CHECKF(w.err[0] != '\0', "%s: wait_incoming failed without a message", f->name);
    CHECKF(w.st != DWCP_STATUS_CALLBACK_FAILED || strstr(w.err, "fake-vm: ") != NULL,
           "%s: the message does not quote dwcp_callback_error's reason: %s", f->name, w.err);
    CHECKF(dst.resumes == 0 && !dst.running, "%s: the destination guest was started", f->name);
    CHECK_NO_VIOLATION(&dst, f->name);
    printf("  %-34s source %-31s destination %-31s %6.0f ms\n", f->name, dwcp_status_name(st),
           dwcp_status_name(w.st), took);

    /* Used up, whatever happened. */
    CHECK_ST(DWCP_STATUS_BUSY, dwcp_migration_migrate_to(sm, addr, &co, &rep));
    dwcp_migration_free(sm);
    dwcp_migration_free(dm);
    vm_free(&src);
    vm_free(&dst);
}

static void test_migration_failures(void) {
    const uint64_t slow = 40000000; /* 40 Mbit/s: MAIN_LAYOUT takes ~1.5 s */
    const failure cases[] = {
        {"start_dirty_log fails", &SMALL_LAYOUT, &SMALL_LAYOUT, FAULT_START_LOG, 0, FAULT_NONE,
         DWCP_STATUS_CALLBACK_FAILED, DWCP_STATUS_MIGRATION_DISCARDED, 0, 0, 0},
        {"first read_and_clear_dirty fails", &SMALL_LAYOUT, &SMALL_LAYOUT, FAULT_READ, 1,
         FAULT_NONE, DWCP_STATUS_CALLBACK_FAILED, DWCP_STATUS_MIGRATION_DISCARDED, 0, 0, 0},
        {"a later read_and_clear_dirty fails", &SMALL_LAYOUT, &SMALL_LAYOUT, FAULT_READ, 3,
         FAULT_NONE, DWCP_STATUS_CALLBACK_FAILED, DWCP_STATUS_MIGRATION_DISCARDED, 0, 0, 0},
        {"read while paused fails", &SMALL_LAYOUT, &SMALL_LAYOUT, FAULT_READ_PAUSED, 0,
         FAULT_NONE, DWCP_STATUS_CALLBACK_FAILED, DWCP_STATUS_MIGRATION_DISCARDED, 0, 0, 0},
        {"*written one short", &SMALL_LAYOUT, &SMALL_LAYOUT, FAULT_WRITTEN, 2, FAULT_NONE,
         DWCP_STATUS_CALLBACK_BAD_DATA, DWCP_STATUS_MIGRATION_DISCARDED, 0, 0, 0},
        {"bits past the last page", &SMALL_LAYOUT, &SMALL_LAYOUT, FAULT_TAIL, 2, FAULT_NONE,
         DWCP_STATUS_CALLBACK_BAD_DATA, DWCP_STATUS_MIGRATION_DISCARDED, 0, 0, 0},
        {"pause fails", &SMALL_LAYOUT, &SMALL_LAYOUT, FAULT_PAUSE, 0, FAULT_NONE,
         DWCP_STATUS_CALLBACK_FAILED, DWCP_STATUS_MIGRATION_DISCARDED, 0, 0, 0},
        {"save_device_state fails", &SMALL_LAYOUT, &SMALL_LAYOUT, FAULT_SAVE, 0, FAULT_NONE,
         DWCP_STATUS_CALLBACK_FAILED, DWCP_STATUS_MIGRATION_DISCARDED, 0, 0, 0},
        {"device state len > cap", &SMALL_LAYOUT, &SMALL_LAYOUT, FAULT_STATE_TOO_LONG, 0,
         FAULT_NONE, DWCP_STATUS_CALLBACK_BAD_DATA, DWCP_STATUS_MIGRATION_DISCARDED, 0, 0, 0},
        {"dest load_device_state fails", &SMALL_LAYOUT, &SMALL_LAYOUT, FAULT_NONE, 0, FAULT_LOAD,
         DWCP_STATUS_OK, DWCP_STATUS_CALLBACK_FAILED, 0, 0, 0},
        {"dest resume fails", &SMALL_LAYOUT, &SMALL_LAYOUT, FAULT_NONE, 0, FAULT_DEST_RESUME,
         DWCP_STATUS_OK, DWCP_STATUS_CALLBACK_FAILED, 0, 0, 0},
        {"regions differ", &SMALL_LAYOUT, &OTHER_LAYOUT, FAULT_NONE, 0, FAULT_NONE,
         DWCP_STATUS_OK, DWCP_STATUS_OK, 0, 0, 0},
        {"cancelled from another thread", &MAIN_LAYOUT, &MAIN_LAYOUT, FAULT_NONE, 0, FAULT_NONE,
         DWCP_STATUS_CANCELLED, DWCP_STATUS_MIGRATION_DISCARDED, slow, 0, 200},
        {"deadline too short", &MAIN_LAYOUT, &MAIN_LAYOUT, FAULT_NONE, 0, FAULT_NONE,
         DWCP_STATUS_MIGRATION_CANCELLED, DWCP_STATUS_MIGRATION_DISCARDED, slow, 100, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        if (g_quick && cases[i].rate_limit)
            continue;
        run_failure(&cases[i]);
    }
}

/* A source whose destination is not there. */
static void test_migration_no_destination(void) {
    fake_vm src;
    vm_init(&src, &SMALL_LAYOUT, 3, true);
    /* A port nobody listens on: a listener's, freed. */
    char addr[64];
    dwcp_listener *l = listen_on(g_key, NULL, addr, sizeof addr);
    dwcp_listener_free(l);
    dwcp_migration_options mo;
    migration_opts(&mo, NULL);
    dwcp_migration *sm = NULL;
    CHECK_OK(dwcp_migration_source_new(g_tx, src.r, src.n, &SOURCE_CBS, &src, &mo, &sm));
    dwcp_connect_options co;
    migration_connect_opts(&co);
    co.connect_timeout_ms = 1000;
    co.resume_ms = 0;
    dwcp_migration_report rep;
    dwcp_status st = CHECK_FAILS(dwcp_migration_migrate_to(sm, addr, &co, &rep));
    printf("  no destination: %s\n", dwcp_status_name(st));
    CHECK(src.starts == 0); /* nothing was asked of the hypervisor */
    CHECK_RUNS_ON(&src);
    dwcp_migration_free(sm);
    vm_free(&src);
}

static void test_migration_api_errors(void) {
    fake_vm vm;
    vm_init(&vm, &SMALL_LAYOUT, 5, false);
    dwcp_migration_options mo;
    memset(&mo, 0xEE, sizeof mo);
    CHECK_OK(dwcp_migration_options_default(&mo));
    CHECK(mo.downtime_limit_ms == 50 && mo.deadline_ms == 0 && mo.max_rounds == 30);
    CHECK(mo.allow_throttle && mo.mode == DWCP_MODE_DATACENTER && mo.shards == 2);
    CHECK(mo.max_device_state == 1 << 20 && mo.max_buffered == (uint64_t)1 << 30);
    CHECK(mo.link_rate == 0 && mo.on_round == NULL && mo.on_round_user == NULL);
    CHECK(mo.codec_state == 0 && mo.round0_codec_state && !mo.dest_prealloc_state);
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_migration_options_default(NULL));

    dwcp_migration *sentinel = (dwcp_migration *)(uintptr_t)0x808, *m = sentinel;
    /* NULL options are the defaults; a destination's memory is zeroed
     * where it is not zero (the migration writes only non-zero pages). */
    CHECK_OK(dwcp_migration_source_new(g_tx, vm.r, vm.n, &SOURCE_CBS, &vm, NULL, &m));
    dwcp_migration_free(m);
    {
        static uint8_t page[2 * 4096] __attribute__((aligned(4096)));
        memset(page, 0x77, sizeof page);
        dwcp_region one = {0, page, sizeof page, 0};
        CHECK_OK(dwcp_migration_dest_new(g_rx, &one, 1, &DEST_CBS, &vm, NULL, &m));
        dwcp_migration_free(m);
        for (size_t i = 0; i < sizeof page; i++)
            CHECKF(page[i] == 0, "destination memory not zeroed at byte %zu", i);
    }
    m = sentinel;
    /* NULL arguments. */
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT,
             dwcp_migration_source_new(NULL, vm.r, vm.n, &SOURCE_CBS, &vm, &mo, &m));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT,
             dwcp_migration_source_new(g_tx, NULL, vm.n, &SOURCE_CBS, &vm, &mo, &m));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT,
             dwcp_migration_source_new(g_tx, vm.r, vm.n, NULL, &vm, &mo, &m));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT,
             dwcp_migration_source_new(g_tx, vm.r, vm.n, &SOURCE_CBS, &vm, &mo, NULL));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT,
             dwcp_migration_dest_new(NULL, vm.r, vm.n, &DEST_CBS, &vm, &mo, &m));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT,
             dwcp_migration_dest_new(g_rx, NULL, vm.n, &DEST_CBS, &vm, &mo, &m));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT,
             dwcp_migration_dest_new(g_rx, vm.r, vm.n, NULL, &vm, &mo, &m));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT,
             dwcp_migration_dest_new(g_rx, vm.r, vm.n, &DEST_CBS, &vm, &mo, NULL));
    CHECK(m == sentinel);

    /* dwcp_callback_error outside a callback: no effect, not even on the
     * thread's last error. */
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_engine_workers(NULL, NULL));
    size_t before = 0, after = 0;
    CHECK(dwcp_last_error_len(&before) == DWCP_STATUS_OK && before > 0);
    CHECK(dwcp_callback_error("not in a callback") == DWCP_STATUS_OK);
    CHECK(dwcp_callback_error(NULL) == DWCP_STATUS_NULL_ARGUMENT);
    CHECK(dwcp_last_error_len(&after) == DWCP_STATUS_OK && after == before);
    CHECK_OK(dwcp_migration_options_default(&mo));

    /* Region validation. */
    dwcp_region r[3];
    uint8_t *host = vm.r[0].host;
    const struct {
        const char *what;
        dwcp_region regions[2];
        size_t n;
    } bad[] = {
        {"gpa not aligned", {{0x1001, host, PAGE, 0}}, 1},
        {"gpa not aligned (2)", {{0, host, PAGE, 0}, {0x100800, host + PAGE, PAGE, 0}}, 2},
        {"length 0", {{0, host, 0, 0}}, 1},
        {"length not a multiple of 4096", {{0, host, PAGE + 123, 0}}, 1},
        {"host NULL", {{0, NULL, PAGE, 0}}, 1},
        {"overlap", {{0, host, 2 * PAGE, 0}, {PAGE, host + 2 * PAGE, PAGE, 0}}, 2},
        {"same base", {{0x2000, host, PAGE, 0}, {0x2000, host + PAGE, PAGE, 0}}, 2},
        {"gpa + len overflows", {{UINT64_MAX - PAGE + 1, host, 2 * PAGE, 0}}, 1},
        {"unknown flags", {{0, host, PAGE, 0x80}}, 1},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memcpy(r, bad[i].regions, sizeof bad[i].regions);
        dwcp_status s = dwcp_migration_source_new(g_tx, r, bad[i].n, &SOURCE_CBS, &vm, &mo, &m);
        CHECKF(s == DWCP_STATUS_INVALID_ARGUMENT, "source regions \"%s\": %s", bad[i].what,
               dwcp_status_name(s));
        CHECK(last_error_text()[0] != '\0');
        s = dwcp_migration_dest_new(g_rx, r, bad[i].n, &DEST_CBS, &vm, &mo, &m);
        CHECKF(s == DWCP_STATUS_INVALID_ARGUMENT, "destination regions \"%s\": %s", bad[i].what,
               dwcp_status_name(s));
        s = dwcp_memory_digest(r, bad[i].n, (uint8_t[32]){0});
        CHECKF(s == DWCP_STATUS_INVALID_ARGUMENT, "digest of regions \"%s\": %s", bad[i].what,
               dwcp_status_name(s));
    }
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT,
             dwcp_migration_source_new(g_tx, vm.r, 0, &SOURCE_CBS, &vm, &mo, &m));
    CHECK(m == sentinel);
    /* Regions out of gpa order, not overlapping: fine. */
    r[0] = (dwcp_region){0x10000, host, PAGE, 0};
    r[1] = (dwcp_region){0, host + PAGE, PAGE, 0};
    CHECK_OK(dwcp_migration_source_new(g_tx, r, 2, &SOURCE_CBS, &vm, &mo, &m));
    dwcp_migration_free(m);

    /* Required callbacks. */
    static const size_t source_needs[] = {
        offsetof(dwcp_hv_callbacks, start_dirty_log),
        offsetof(dwcp_hv_callbacks, read_and_clear_dirty),
        offsetof(dwcp_hv_callbacks, stop_dirty_log),
        offsetof(dwcp_hv_callbacks, pause),
        offsetof(dwcp_hv_callbacks, resume),
        offsetof(dwcp_hv_callbacks, save_device_state),
    };
    for (size_t i = 0; i < sizeof source_needs / sizeof source_needs[0]; i++) {
        dwcp_hv_callbacks cb = SOURCE_CBS;
        memset((char *)&cb + source_needs[i], 0, sizeof(void (*)(void)));
        m = sentinel;
        CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT,
                 dwcp_migration_source_new(g_tx, vm.r, vm.n, &cb, &vm, &mo, &m));
        CHECK(m == sentinel);
    }
    dwcp_hv_callbacks cb = SOURCE_CBS;
    cb.throttle = NULL; /* optional */
    CHECK_OK(dwcp_migration_source_new(g_tx, vm.r, vm.n, &cb, &vm, &mo, &m));
    dwcp_migration_free(m);
    cb = DEST_CBS;
    cb.resume = NULL;
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT,
             dwcp_migration_dest_new(g_rx, vm.r, vm.n, &cb, &vm, &mo, &m));
    cb = DEST_CBS;
    cb.load_device_state = NULL;
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT,
             dwcp_migration_dest_new(g_rx, vm.r, vm.n, &cb, &vm, &mo, &m));
    /* A full table serves a destination too. */
    cb = SOURCE_CBS;
    cb.load_device_state = cb_load_device_state;
    CHECK_OK(dwcp_migration_dest_new(g_rx, vm.r, vm.n, &cb, &vm, &mo, &m));
    dwcp_migration_free(m);

    /* Options out of range. */
    enum { SHARDS, MAX_STATE, MAX_BUFFERED, MODE, DOWNTIME, MAX_ROUNDS };
    const struct {
        const char *what;
        int field;
        uint64_t value;
    } bad_opts[] = {
        {"shards 0", SHARDS, 0},
        {"shards 65", SHARDS, 65},
        {"max_device_state 0", MAX_STATE, 0},
        {"max_device_state 16 MiB + 1", MAX_STATE, (16 << 20) + 1},
        {"max_buffered 1 MiB", MAX_BUFFERED, 1 << 20},
        {"mode 9", MODE, 9},
        {"downtime_limit_ms 0", DOWNTIME, 0},
        {"max_rounds 0", MAX_ROUNDS, 0},
    };
    m = sentinel;
    for (size_t i = 0; i < sizeof bad_opts / sizeof bad_opts[0]; i++) {
        dwcp_migration_options o;
        CHECK_OK(dwcp_migration_options_default(&o));
        uint64_t v = bad_opts[i].value;
        switch (bad_opts[i].field) {
        case SHARDS:
            o.shards = (uint32_t)v;
            break;
        case MAX_STATE:
            o.max_device_state = v;
            break;
        case MAX_BUFFERED:
            o.max_buffered = v;
            break;
        case MODE:
            o.mode = (uint32_t)v;
            break;
        case DOWNTIME:
            o.downtime_limit_ms = (uint32_t)v;
            break;
        default:
            o.max_rounds = (uint32_t)v;
        }
        dwcp_status s = dwcp_migration_source_new(g_tx, vm.r, vm.n, &SOURCE_CBS, &vm, &o, &m);
        CHECKF(s == DWCP_STATUS_INVALID_ARGUMENT, "options \"%s\": source %s", bad_opts[i].what,
               dwcp_status_name(s));
        CHECK(last_error_text()[0] != '\0');
        s = dwcp_migration_dest_new(g_rx, vm.r, vm.n, &DEST_CBS, &vm, &o, &m);
        CHECKF(s == DWCP_STATUS_INVALID_ARGUMENT, "options \"%s\": destination %s",
               bad_opts[i].what, dwcp_status_name(s));
    }
    CHECK(m == sentinel);

    /* A source: the destination's calls are refused, and the other way. */
    dwcp_migration *src = NULL, *dst = NULL;
    CHECK_OK(dwcp_migration_source_new(g_tx, vm.r, vm.n, &SOURCE_CBS, &vm, &mo, &src));
    CHECK_OK(dwcp_migration_dest_new(g_rx, vm.r, vm.n, &DEST_CBS, &vm, &mo, &dst));
    dwcp_listen_options lo;
    listen_opts(&lo, g_key);
    char addr[64];
    size_t n = 0;
    dwcp_incoming_report in;
    dwcp_migration_report rep;
    dwcp_connect_options co;
    migration_connect_opts(&co);
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_migration_listen(src, "127.0.0.1:0", &lo));
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_migration_local_addr(src, addr, sizeof addr, &n));
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_migration_wait_incoming(src, 0, &in));
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT,
             dwcp_migration_migrate_to(dst, "127.0.0.1:1", &co, &rep));

    /* The destination before and while it listens. */
    CHECK_ST(DWCP_STATUS_BUSY, dwcp_migration_local_addr(dst, addr, sizeof addr, &n));
    CHECK_ST(DWCP_STATUS_TIMEOUT, dwcp_migration_wait_incoming(dst, 0, &in));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_migration_listen(NULL, "127.0.0.1:0", &lo));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_migration_listen(dst, NULL, &lo));
    CHECK_ST(DWCP_STATUS_AUTH, dwcp_migration_listen(dst, "127.0.0.1:0", NULL));
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_migration_listen(dst, "no address", &lo));
    lo.dir = g_tmp;
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_migration_listen(dst, "127.0.0.1:0", &lo));
    lo.dir = NULL;
    lo.key = NULL;
    CHECK_ST(DWCP_STATUS_AUTH, dwcp_migration_listen(dst, "127.0.0.1:0", &lo));
    lo.key = g_key;
    CHECK_OK(dwcp_migration_listen(dst, "127.0.0.1:0", &lo));
    CHECK_ST(DWCP_STATUS_BUSY, dwcp_migration_listen(dst, "127.0.0.1:0", &lo));
    char small[4];
    n = 55;
    CHECK_ST(DWCP_STATUS_BUFFER_TOO_SMALL, dwcp_migration_local_addr(dst, small, sizeof small, &n));
    CHECK(n == 55);
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_migration_local_addr(NULL, addr, sizeof addr, &n));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_migration_local_addr(dst, NULL, sizeof addr, &n));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_migration_local_addr(dst, addr, sizeof addr, NULL));
    CHECK_OK(dwcp_migration_local_addr(dst, addr, sizeof addr, &n));
    double t0 = now_ms();
    CHECK_ST(DWCP_STATUS_TIMEOUT, dwcp_migration_wait_incoming(dst, 10, &in));
    CHECK(now_ms() - t0 >= 9);
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_migration_wait_incoming(NULL, 10, &in));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_migration_wait_incoming(dst, 10, NULL));

    /* migrate_to: NULLs and a bad address leave the handle usable ... */
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_migration_migrate_to(NULL, addr, &co, &rep));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_migration_migrate_to(src, NULL, &co, &rep));
    CHECK_ST(DWCP_STATUS_AUTH, dwcp_migration_migrate_to(src, addr, NULL, &rep));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_migration_migrate_to(src, addr, &co, NULL));
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_migration_migrate_to(src, "nowhere", &co, &rep));
    co.key = NULL;
    CHECK_ST(DWCP_STATUS_AUTH, dwcp_migration_migrate_to(src, addr, &co, &rep));
    migration_connect_opts(&co);
    CHECK(vm.starts == 0);
    /* ... and a cancel before the start makes it return CANCELLED at once,
     * asking nothing of the hypervisor. */
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_migration_cancel(NULL));
    CHECK_OK(dwcp_migration_cancel(src));
    CHECK_ST(DWCP_STATUS_CANCELLED, dwcp_migration_migrate_to(src, addr, &co, &rep));
    CHECK(vm.starts == 0 && vm.pauses == 0 && vm.throttles == 0);
    CHECK_ST(DWCP_STATUS_BUSY, dwcp_migration_migrate_to(src, addr, &co, &rep));

    /* A destination cancelled while it waits discards the migration. */
    CHECK_OK(dwcp_migration_cancel(dst));
    CHECK_ST(DWCP_STATUS_MIGRATION_DISCARDED, dwcp_migration_wait_incoming(dst, 1000, &in));
    CHECK(vm.loads == 0 && vm.resumes == 0);

    dwcp_migration_free(src);
    dwcp_migration_free(dst);
    dwcp_migration_free(NULL);

    /* A destination freed while it listens, nothing having come. */
    CHECK_OK(dwcp_migration_dest_new(g_rx, vm.r, vm.n, &DEST_CBS, &vm, &mo, &dst));
    CHECK_OK(dwcp_migration_listen(dst, "127.0.0.1:0", &lo));
    dwcp_migration_free(dst);

    /* The digest: NULLs, and what it tells apart. */
    uint8_t d1[32], d2[32], d3[32];
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_memory_digest(vm.r, vm.n, NULL));
    CHECK_ST(DWCP_STATUS_NULL_ARGUMENT, dwcp_memory_digest(NULL, 1, d1));
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_memory_digest(vm.r, 0, d1));
    CHECK_OK(dwcp_memory_digest(vm.r, vm.n, d1));
    CHECK_OK(dwcp_memory_digest(vm.r, vm.n, d2));
    CHECK(memcmp(d1, d2, 32) == 0);
    ((uint8_t *)vm.r[1].host)[vm.r[1].len - 1] ^= 1;
    CHECK_OK(dwcp_memory_digest(vm.r, vm.n, d3));
    CHECK(memcmp(d1, d3, 32) != 0);
    /* One page of zeros hashes as a page of the region, whatever its gpa. */
    uint8_t *z = calloc(1, PAGE);
    CHECK(z != NULL);
    dwcp_region zr = {0x5000, z, PAGE, 0}, zr2 = {0, z, PAGE, 0}, zr3 = {0, z, 100, 0};
    CHECK_OK(dwcp_memory_digest(&zr, 1, d1));
    CHECK_OK(dwcp_memory_digest(&zr2, 1, d2));
    CHECK(memcmp(d1, d2, 32) == 0);
    /* Regions are whole pages, here as for a migration. */
    CHECK_ST(DWCP_STATUS_INVALID_ARGUMENT, dwcp_memory_digest(&zr3, 1, d3));
    free(z);
    vm_free(&vm);
}

/* ------------------------------------------------------------------------ */

static void run(const char *area, void (*f)(void)) {
    g_area = area;
    double t0 = now_ms();
    f();
    printf("ok   %-28s %8.0f ms\n", area, now_ms() - t0);
    fflush(stdout);
}

static void setup_engines(void) {
    g_tx = engine_one_worker();
    g_rx = engine_one_worker();
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) {
            g_quick = true;
        } else if (strcmp(argv[i], "-v") == 0) {
            g_verbose = true;
        } else {
            fprintf(stderr, "usage: %s [--quick] [-v]\n", argv[0]);
            return 2;
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *base = getenv("TMPDIR");
    snprintf(g_tmp, sizeof g_tmp, "%s/dwcp-api-XXXXXX", base && *base ? base : "/tmp");
    CHECKF(mkdtemp(g_tmp) != NULL, "mkdtemp %s: %s", g_tmp, strerror(errno));
    printf("libdwcp %s (header %s)%s, in %s\n", dwcp_version(), DWCP_VERSION_STRING,
           g_quick ? ", quick" : "", g_tmp);
    double t0 = now_ms();

    run("version", test_version);
    run("status names", test_status_names);
    run("last error", test_last_error);
    run("engine", test_engine);
    run("engines for the rest", setup_engines);
    run("keys", test_keys);
    run("options defaults", test_options_defaults);
    run("listen errors", test_listen_errors);
    run("transfers", test_transfers);
    run("log callbacks", test_log_callbacks);
    run("concurrent sends", test_concurrent_sends);
    run("memory limit", test_memory_limit);
    run("close and untaken", test_close_null_and_untaken);
    run("insecure", test_insecure);
    run("stream", test_stream);
    run("stream abandoned", test_stream_abandoned);
    run("free order", test_free_order);
    run("listener dir", test_listener_dir);
    if (!g_quick)
        run("session cancel", test_session_cancel);
    run("migration api errors", test_migration_api_errors);
    run("migration", test_migration);
    run("migration destination threads", test_migration_dest_threads);
    if (!g_quick)
        run("migration throttled", test_migration_throttled);
    run("migration dirty destination", test_migration_dirty_destination);
    run("migration round 0 stateless", test_migration_round0_stateless);
    run("migration with the destination's codec state allocated first",
        test_migration_dest_prealloc_state);
    run("migration failures", test_migration_failures);
    run("migration no destination", test_migration_no_destination);

    g_area = "teardown";
    dwcp_engine_free(g_tx);
    dwcp_engine_free(g_rx);
    rm_tree(g_tmp);
    printf("api: all checks passed in %.0f ms\n", now_ms() - t0);
    return 0;
}
