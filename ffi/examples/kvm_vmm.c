/* kvm_vmm.c: a minimal KVM VMM that live-migrates its guest with libdwcp.
 *
 * One vCPU, one memory slot, no devices: the guest is the synthetic
 * workload of the Rust path (migration/src/kvm/), ported in
 * kvm_vmm_guest.h, so a migration made here and one made with
 * `dwcp migrate` move the same memory under the same write pattern.
 *
 * libdwcp knows nothing of KVM. This file issues every KVM ioctl itself and
 * hands the library a table of callbacks (start/read/stop the dirty log,
 * pause, resume, throttle, save/load the device state); the library runs
 * the pre-copy rounds, the stop-and-copy and the transfer.
 *
 *   destination:  kvm_vmm --incoming 127.0.0.1:7000 --insecure-no-auth --json
 *   source:       kvm_vmm --migrate-to 127.0.0.1:7000 --insecure-no-auth --json
 *
 * Build (Linux x86-64, see README.md):
 *   cc -std=c11 -Wall -Wextra -Werror -O2 -pthread ffi/examples/kvm_vmm.c \
 *      -I ffi/include -L target/release -ldwcp -o kvm_vmm
 *
 * Why long mode at CPL 3: the issue asks for a flat 32-bit guest, but this
 * follows the Rust VMM (migration/src/kvm/mod.rs). On KVM in PVM mode (no
 * VMX/SVM, as on the project's machines) code at CPL 0, in flat 32-bit
 * protected mode or in 32-bit compatibility mode is emulated instruction by
 * instruction (~2 us each: a flat 32-bit guest managed 0.4 MiB/s of page
 * writes), 32-bit paging does not start at all, while 64-bit CPL-3 code
 * runs natively. So the guest runs in 64-bit long mode at CPL 3 on
 * identity-mapped page tables, with no interrupts; on VMX/SVM hosts the
 * same setup simply runs.
 *
 * Sections: options and helpers; guest memory and vCPU setup; the vCPU
 * thread (rate control, pause, throttle); dirty log; device state; the
 * dwcp callbacks; source; destination; self-test; main.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "dwcp.h"
#include "kvm_vmm_guest.h"

/* ======================================================================
 * Helpers
 * ====================================================================== */

static void vmm_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static bool vmm_quiet; /* the self-test's expected failures */
/* Says what went wrong: on stderr, and to libdwcp, which quotes it in the
 * migration's error when a callback fails (outside a callback the library
 * ignores it). */
static void vmm_err(const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  dwcp_callback_error(msg);
  if (!vmm_quiet) fprintf(stderr, "kvm_vmm: %s\n", msg);
}

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void sleep_s(double s) {
  struct timespec t = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
  while (nanosleep(&t, &t) == -1 && errno == EINTR) {
  }
}

/* CLOCK_MONOTONIC deadline `d` seconds from now, for pthread_cond_timedwait. */
static struct timespec deadline_in(double d) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  long long ns = t.tv_nsec + (long long)(d * 1e9);
  t.tv_sec += (time_t)(ns / 1000000000);
  t.tv_nsec = (long)(ns % 1000000000);
  return t;
}

/* The message of the last failed dwcp call on this thread. */
static const char *dwcp_error(void) {
  static _Thread_local char buf[4096];
  size_t n = 0;
  if (dwcp_last_error(buf, sizeof buf, &n) != DWCP_STATUS_OK)
    snprintf(buf, sizeof buf, "(no error message: it is longer than %zu bytes)", sizeof buf);
  return buf;
}

/* Prints a failed dwcp call; returns true when `st` is a failure. */
static bool dwcp_failed(dwcp_status st, const char *what) {
  if (st == DWCP_STATUS_OK) return false;
  vmm_err("%s: status %d: %s", what, (int)st, dwcp_error());
  return true;
}

static void json_string(FILE *f, const char *s) {
  fputc('"', f);
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\')
      fprintf(f, "\\%c", c);
    else if (c < 0x20)
      fprintf(f, "\\u%04x", c);
    else
      fputc(c, f);
  }
  fputc('"', f);
}

static void hex32(const uint8_t d[32], char out[65]) {
  for (int i = 0; i < 32; i++) snprintf(out + 2 * i, 3, "%02x", d[i]);
}

/* ======================================================================
 * The guest: RAM, VM, vCPU
 * ====================================================================== */

enum want { WANT_RUN, WANT_PAUSE, WANT_EXIT };
enum run_state { STATE_PARKED, STATE_RUNNING, STATE_STOPPED };

/* The vCPU and the thread that runs it. The controller (main thread or the
 * library's callbacks) says what it wants in `want`; the thread says what
 * it does in `state`; both under `lock`, changes broadcast on `cv`. */
struct vcpu {
  int fd;
  struct kvm_run *run;
  size_t run_size;
  pthread_t thread;
  bool has_thread;
  pthread_mutex_t lock;
  pthread_cond_t cv;
  enum want want;
  enum run_state state;
  char failure[200]; /* why the thread stopped, if it failed */
  uint32_t dirty_mibps;
  uint32_t throttle; /* percent */
  double run_time;      /* seconds run before the current run */
  double running_since; /* start of the current run, < 0: none */
};

struct guest {
  struct guest_layout layout;
  int kvm, vm;
  uint8_t *ram;
  struct vcpu vcpu;
  bool dirty_log;
  bool report_all_dirty; /* next dirty-log read reports every page */
  bool ready;            /* the vCPU has registers to run with */
  bool started;          /* resumed at least once here */
  uint64_t writes_at_start;
  double last_pause_s;
};

#define SLOT 0

static uint64_t guest_ctl_u64(const struct guest *g, unsigned field) {
  /* One aligned load: a value the guest updates with one store never tears. */
  return __atomic_load_n((const uint64_t *)(g->ram + CONTROL_GPA + field), __ATOMIC_RELAXED);
}
static uint64_t guest_counter(const struct guest *g) { return guest_ctl_u64(g, CTL_WRITES); }
static uint64_t guest_ticks(const struct guest *g) { return guest_ctl_u64(g, CTL_TICKS); }

/* Registers (or re-registers with new flags) all of RAM as slot 0. */
static int set_memory_slot(struct guest *g, bool log_dirty) {
  struct kvm_userspace_memory_region r = {
      .slot = SLOT,
      .flags = log_dirty ? KVM_MEM_LOG_DIRTY_PAGES : 0,
      .guest_phys_addr = 0,
      .memory_size = g->layout.ram,
      .userspace_addr = (uint64_t)(uintptr_t)g->ram,
  };
  if (ioctl(g->vm, KVM_SET_USER_MEMORY_REGION, &r) < 0) {
    vmm_err("KVM_SET_USER_MEMORY_REGION (dirty log %s): %s", log_dirty ? "on" : "off",
            strerror(errno));
    return -1;
  }
  return 0;
}

/* Puts a fresh vCPU in 64-bit long mode at CPL 3 on the identity page
 * tables, at the program's entry (mod.rs setup_long_mode). */
static int setup_long_mode(struct guest *g) {
  struct kvm_sregs sregs;
  if (ioctl(g->vcpu.fd, KVM_GET_SREGS, &sregs) < 0) {
    vmm_err("KVM_GET_SREGS: %s", strerror(errno));
    return -1;
  }
  /* Flat user segments. Code: 64-bit, execute/read, accessed (type 11);
   * data: read/write, accessed (3). The selectors (RPL 3) are nominal:
   * there is no GDT and nothing reloads them. */
  struct kvm_segment seg = {
      .base = 0, .limit = 0xffffffff, .present = 1, .dpl = 3, .s = 1, .g = 1,
  };
  sregs.cs = seg;
  sregs.cs.selector = 0x2b;
  sregs.cs.type = 11;
  sregs.cs.l = 1;
  seg.selector = 0x23;
  seg.type = 3;
  seg.db = 1;
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = seg;
  sregs.cr3 = PML4_GPA;
  sregs.cr4 = 1u << 5;                                /* PAE */
  sregs.cr0 = 1u | (1u << 4) | (1u << 5) | (1u << 31); /* PE ET NE PG */
  sregs.efer = (1u << 8) | (1u << 10);                /* LME LMA */
  if (ioctl(g->vcpu.fd, KVM_SET_SREGS, &sregs) < 0) {
    vmm_err("KVM_SET_SREGS: %s", strerror(errno));
    return -1;
  }
  /* IOPL 3 lets CPL-3 code use `in`; IF clear: no interrupts; bit 1 is
   * reserved and set. */
  struct kvm_regs regs = {.rip = PROGRAM_GPA, .rflags = (3u << 12) | 0x2};
  if (ioctl(g->vcpu.fd, KVM_SET_REGS, &regs) < 0) {
    vmm_err("KVM_SET_REGS: %s", strerror(errno));
    return -1;
  }
  return 0;
}

/* ======================================================================
 * The vCPU thread (vcpu.rs)
 *
 * Rate control: the guest asks for a budget of page writes with `in` from
 * BUDGET_PORT. A token bucket fills at R*256 writes/s while the guest runs
 * unthrottled (at most BURST worth); a request is answered with every whole
 * token once a BATCH worth (or one) is there, and waits for it otherwise,
 * inside the VMM, so an idle guest costs no CPU. At 0 MiB/s the answer is
 * 0 after IDLE_TICK. The bucket restarts empty at every resume.
 *
 * Throttle p%: in every THROTTLE_PERIOD, once the vCPU has run (100-p)% of
 * it, it sleeps the other p% (checked at every exit), earning no budget.
 *
 * Pause: the controller sets `want`, then kicks the thread out of KVM_RUN
 * with a signal whose handler sets kvm_run->immediate_exit (so a kick that
 * lands just before KVM_RUN is not lost), and waits until the thread says
 * it is parked. A pending I/O exit is completed first (KVM_RUN with
 * immediate_exit set), as guest state is consistent only after that.
 * ====================================================================== */

#define BATCH_S 0.002           /* budget per answer: 2 ms of writes */
#define BURST_S 0.008           /* most budget banked: 8 ms of writes */
#define IDLE_TICK_S 0.010       /* answer period at 0 MiB/s */
#define THROTTLE_PERIOD_S 0.010 /* throttle run/sleep cycle */
#define WRITES_PER_MIB 256.0

/* &kvm_run->immediate_exit of the vCPU this thread runs; set by the vCPU
 * thread for itself, written by the kick handler (which interrupts that
 * very thread). */
static _Thread_local volatile __u8 *kick_target;

static void on_kick(int sig, siginfo_t *info, void *ctx) {
  (void)sig, (void)info, (void)ctx;
  volatile __u8 *p = kick_target;
  if (p) *p = 1; /* async-signal-safe: a TLS load and a byte store */
}

static int kick_signal(void) { return SIGRTMIN + 2; }

static pthread_once_t kick_once = PTHREAD_ONCE_INIT;
static int kick_installed = -1;
static void install_kick(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_kick;
  sa.sa_flags = SA_SIGINFO; /* no SA_RESTART: KVM_RUN must return EINTR */
  sigemptyset(&sa.sa_mask);
  kick_installed = sigaction(kick_signal(), &sa, NULL);
}

static void set_immediate_exit(struct vcpu *v, __u8 x) {
  *(volatile __u8 *)&v->run->immediate_exit = x;
}

static enum want vcpu_want(struct vcpu *v) {
  pthread_mutex_lock(&v->lock);
  enum want w = v->want;
  pthread_mutex_unlock(&v->lock);
  return w;
}

/* Sleeps up to `d` seconds unless the controller wants something else than
 * running; returns whether it still wants the vCPU running. */
static bool sleep_running(struct vcpu *v, double d) {
  struct timespec until = deadline_in(d);
  pthread_mutex_lock(&v->lock);
  while (v->want == WANT_RUN)
    if (pthread_cond_timedwait(&v->cv, &v->lock, &until) == ETIMEDOUT) break;
  bool run = v->want == WANT_RUN;
  pthread_mutex_unlock(&v->lock);
  return run;
}

/* Token bucket of page writes and the throttle's duty cycle. */
struct pacer {
  double tokens, last, period_start;
};

static void settings(struct vcpu *v, double *rate, uint32_t *percent) {
  pthread_mutex_lock(&v->lock);
  *rate = (double)v->dirty_mibps * WRITES_PER_MIB;
  *percent = v->throttle > 99 ? 99 : v->throttle;
  pthread_mutex_unlock(&v->lock);
}

static double max_d(double a, double b) { return a > b ? a : b; }

/* Adds the budget earned since the last call, up to BURST worth. */
static void pacer_accrue(struct pacer *p, double rate, double now) {
  double batch = max_d(rate * BATCH_S, 1.0);
  double cap = max_d(rate * BURST_S, batch);
  double tokens = p->tokens + rate * (now - p->last);
  p->tokens = tokens < cap ? tokens : cap;
  p->last = now;
}

/* Sleeps the throttle's share once the running share is used up. */
static void pacer_throttle(struct pacer *p, struct vcpu *v) {
  double rate;
  uint32_t percent;
  settings(v, &rate, &percent);
  double now = now_s();
  if (percent == 0) {
    p->period_start = now;
    return;
  }
  if (now - p->period_start >= THROTTLE_PERIOD_S * (100 - percent) / 100) {
    pacer_accrue(p, rate, now);
    sleep_running(v, THROTTLE_PERIOD_S * percent / 100);
    p->period_start = p->last = now_s();
  }
}

/* The number of page writes the guest may do now; waits (interruptibly)
 * for a batch worth. 0 when paused meanwhile, or after IDLE_TICK at 0. */
static uint32_t pacer_grant(struct pacer *p, struct vcpu *v) {
  for (;;) {
    double rate;
    uint32_t percent;
    settings(v, &rate, &percent);
    if (rate == 0.0) {
      sleep_running(v, IDLE_TICK_S);
      p->tokens = 0.0;
      p->last = now_s();
      return 0;
    }
    pacer_accrue(p, rate, now_s());
    double batch = max_d(rate * BATCH_S, 1.0);
    if (p->tokens >= batch) {
      double n = (double)(uint64_t)p->tokens; /* floor */
      p->tokens -= n;
      return (uint32_t)n;
    }
    if (!sleep_running(v, (batch - p->tokens) / rate)) return 0;
    pacer_throttle(p, v);
  }
}

/* Runs the guest until the controller wants something else; -1 (with
 * `why`) when the guest cannot go on. */
static int vcpu_run(struct vcpu *v, char *why, size_t why_len) {
  double t = now_s();
  struct pacer pacer = {0.0, t, t};
  bool pending_io = false;
  for (;;) {
    /* Clear before looking at `want`: a kick after the look sets it again,
     * and a kick before it comes with `want` already changed. */
    set_immediate_exit(v, 0);
    if (vcpu_want(v) == WANT_RUN)
      pacer_throttle(&pacer, v);
    else if (pending_io)
      set_immediate_exit(v, 1); /* complete the I/O, don't enter the guest */
    else
      return 0;
    int rc = ioctl(v->fd, KVM_RUN, 0);
    int err = errno;
    pending_io = false;
    if (rc < 0) {
      if (err == EINTR || err == EAGAIN) continue;
      snprintf(why, why_len, "KVM_RUN: %s", strerror(err));
      return -1;
    }
    struct kvm_run *run = v->run;
    switch (run->exit_reason) {
    case KVM_EXIT_IO:
      pending_io = true;
      if (run->io.direction == KVM_EXIT_IO_IN) {
        uint32_t answer = run->io.port == BUDGET_PORT ? pacer_grant(&pacer, v) : 0;
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        size_t n = (size_t)run->io.size * run->io.count;
        for (size_t i = 0; i < n; i++) data[i] = i < 4 ? (uint8_t)(answer >> (8 * i)) : 0;
      }
      break;
    case KVM_EXIT_INTR:
      break;
    case KVM_EXIT_INTERNAL_ERROR:
      snprintf(why, why_len, "unexpected vCPU exit: internal error, suberror %u",
               run->internal.suberror);
      return -1;
    case KVM_EXIT_FAIL_ENTRY:
      snprintf(why, why_len, "unexpected vCPU exit: entry failed, reason %#llx",
               (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
      return -1;
    default:
      snprintf(why, why_len, "unexpected vCPU exit %u", run->exit_reason);
      return -1;
    }
  }
}

static void stop_clock(struct vcpu *v) {
  if (v->running_since >= 0) {
    v->run_time += now_s() - v->running_since;
    v->running_since = -1;
  }
}

/* Parks until the controller wants the vCPU running (true) or the thread
 * to end (false). */
static bool park(struct vcpu *v) {
  pthread_mutex_lock(&v->lock);
  for (;;) {
    if (v->want == WANT_EXIT) {
      pthread_mutex_unlock(&v->lock);
      return false;
    }
    if (v->want == WANT_RUN) {
      v->state = STATE_RUNNING;
      v->running_since = now_s();
      pthread_cond_broadcast(&v->cv);
      pthread_mutex_unlock(&v->lock);
      return true;
    }
    if (v->state != STATE_PARKED) {
      v->state = STATE_PARKED;
      stop_clock(v);
      pthread_cond_broadcast(&v->cv);
    }
    pthread_cond_wait(&v->cv, &v->lock);
  }
}

static void *vcpu_main(void *arg) {
  struct vcpu *v = arg;
  char why[200] = "";
  bool failed = false;
  kick_target = &v->run->immediate_exit;
  while (park(v))
    if (vcpu_run(v, why, sizeof why) < 0) {
      failed = true;
      break;
    }
  kick_target = NULL;
  pthread_mutex_lock(&v->lock);
  stop_clock(v);
  v->state = STATE_STOPPED;
  if (failed) snprintf(v->failure, sizeof v->failure, "%s", why);
  pthread_cond_broadcast(&v->cv);
  pthread_mutex_unlock(&v->lock);
  if (failed) vmm_err("the vCPU stopped: %s", why);
  return NULL;
}

/* Starts the vCPU thread, parked. */
static int vcpu_spawn(struct vcpu *v, uint32_t dirty_mibps) {
  pthread_once(&kick_once, install_kick);
  if (kick_installed != 0) {
    vmm_err("installing the vCPU kick signal handler failed");
    return -1;
  }
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_mutex_init(&v->lock, NULL);
  pthread_cond_init(&v->cv, &ca);
  pthread_condattr_destroy(&ca);
  v->want = WANT_PAUSE;
  v->state = STATE_PARKED;
  v->dirty_mibps = dirty_mibps;
  v->running_since = -1;
  int rc = pthread_create(&v->thread, NULL, vcpu_main, v);
  if (rc != 0) {
    vmm_err("spawning the vCPU thread: %s", strerror(rc));
    return -1;
  }
  v->has_thread = true;
  return 0;
}

static void vcpu_kick(struct vcpu *v) {
  if (v->has_thread) pthread_kill(v->thread, kick_signal());
}

static int vcpu_stopped_error(struct vcpu *v, const char *what) {
  vmm_err("%s: the vCPU thread has stopped%s%s", what, v->failure[0] ? ": " : "", v->failure);
  return -1;
}

static int vcpu_resume(struct vcpu *v) {
  pthread_mutex_lock(&v->lock);
  if (v->state == STATE_STOPPED) {
    pthread_mutex_unlock(&v->lock);
    return vcpu_stopped_error(v, "resuming the vCPU");
  }
  v->want = WANT_RUN;
  pthread_cond_broadcast(&v->cv);
  pthread_mutex_unlock(&v->lock);
  return 0;
}

/* Stops the vCPU; returns once it runs no guest code. */
static int vcpu_pause(struct vcpu *v) {
  pthread_mutex_lock(&v->lock);
  v->want = WANT_PAUSE;
  pthread_cond_broadcast(&v->cv);
  pthread_mutex_unlock(&v->lock);
  vcpu_kick(v);
  pthread_mutex_lock(&v->lock);
  while (v->state == STATE_RUNNING) pthread_cond_wait(&v->cv, &v->lock);
  bool stopped = v->state == STATE_STOPPED;
  pthread_mutex_unlock(&v->lock);
  return stopped ? vcpu_stopped_error(v, "pausing the vCPU") : 0;
}

/* Whether the controller may use the vCPU fd: parked and not wanted
 * running (the thread then waits in park() until the controller, i.e. the
 * caller, says otherwise). */
static bool vcpu_parked(struct vcpu *v, const char *what) {
  pthread_mutex_lock(&v->lock);
  enum run_state s = v->state;
  enum want w = v->want;
  pthread_mutex_unlock(&v->lock);
  if (s == STATE_STOPPED) return vcpu_stopped_error(v, what), false;
  if (w == WANT_RUN || s != STATE_PARKED) {
    vmm_err("%s: the vCPU is running; pause it first", what);
    return false;
  }
  return true;
}

static void vcpu_set(struct vcpu *v, uint32_t *field, uint32_t value) {
  pthread_mutex_lock(&v->lock);
  *field = value;
  pthread_cond_broadcast(&v->cv);
  pthread_mutex_unlock(&v->lock);
}

static double vcpu_run_time(struct vcpu *v) {
  pthread_mutex_lock(&v->lock);
  double t = v->run_time + (v->running_since >= 0 ? now_s() - v->running_since : 0);
  pthread_mutex_unlock(&v->lock);
  return t;
}

static void vcpu_destroy(struct vcpu *v) {
  if (v->has_thread) {
    pthread_mutex_lock(&v->lock);
    v->want = WANT_EXIT;
    pthread_cond_broadcast(&v->cv);
    pthread_mutex_unlock(&v->lock);
    vcpu_kick(v);
    pthread_join(v->thread, NULL);
    v->has_thread = false;
    pthread_cond_destroy(&v->cv);
    pthread_mutex_destroy(&v->lock);
  }
  if (v->run) munmap(v->run, v->run_size);
  if (v->fd >= 0) close(v->fd);
  v->run = NULL;
  v->fd = -1;
}

/* ---- guest lifetime ---- */

/* Stops the vCPU thread, closes the vCPU and the VM, then unmaps the RAM
 * (last: KVM may use it while the VM exists). Fine on a partial guest. */
static void guest_destroy(struct guest *g) {
  vcpu_destroy(&g->vcpu);
  if (g->vm >= 0) close(g->vm);
  if (g->kvm >= 0) close(g->kvm);
  if (g->ram) munmap(g->ram, g->layout.ram);
  g->vm = g->kvm = -1;
  g->ram = NULL;
}

/* A VM with `ram` bytes of zero RAM in slot 0 and one parked vCPU. */
static int guest_create(struct guest *g, uint64_t ram, uint32_t dirty_mibps) {
  memset(g, 0, sizeof *g);
  g->kvm = g->vm = g->vcpu.fd = -1;
  const char *why = guest_layout_new(ram, &g->layout);
  if (why) {
    vmm_err("guest RAM of %" PRIu64 " bytes: %s", ram, why);
    return -1;
  }
  g->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (g->kvm < 0) {
    vmm_err("opening /dev/kvm: %s", strerror(errno));
    return -1;
  }
  if (ioctl(g->kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) {
    vmm_err("/dev/kvm: unexpected API version");
    goto fail;
  }
  g->vm = ioctl(g->kvm, KVM_CREATE_VM, 0);
  if (g->vm < 0) {
    vmm_err("KVM_CREATE_VM: %s", strerror(errno));
    goto fail;
  }
  /* Anonymous, private, no swap reservation: untouched pages read as zero
   * and cost no host memory. */
  void *p = mmap(NULL, ram, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) {
    vmm_err("mapping %" PRIu64 " bytes of guest RAM: %s", ram, strerror(errno));
    goto fail;
  }
  g->ram = p;
  if (set_memory_slot(g, false) < 0) goto fail;
  g->vcpu.fd = ioctl(g->vm, KVM_CREATE_VCPU, 0);
  if (g->vcpu.fd < 0) {
    vmm_err("KVM_CREATE_VCPU: %s", strerror(errno));
    goto fail;
  }
  int size = ioctl(g->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  if (size < (int)sizeof(struct kvm_run)) {
    vmm_err("KVM_GET_VCPU_MMAP_SIZE: %s", strerror(errno));
    goto fail;
  }
  p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, g->vcpu.fd, 0);
  if (p == MAP_FAILED) {
    vmm_err("mapping kvm_run: %s", strerror(errno));
    goto fail;
  }
  g->vcpu.run = p;
  g->vcpu.run_size = (size_t)size;
  if (vcpu_spawn(&g->vcpu, dirty_mibps) < 0) goto fail;
  return 0;
fail:
  guest_destroy(g);
  return -1;
}

static int guest_resume(struct guest *g) {
  if (!g->ready) {
    vmm_err("resuming the guest: no device state loaded yet");
    return -1;
  }
  if (!g->started) {
    g->writes_at_start = guest_counter(g);
    g->started = true;
  }
  return vcpu_resume(&g->vcpu);
}

static int guest_pause(struct guest *g) {
  double t = now_s();
  int rc = vcpu_pause(&g->vcpu);
  g->last_pause_s = now_s() - t;
  return rc;
}

/* A source guest: memory filled, vCPU set up and running. */
static int guest_source(struct guest *g, uint64_t ram, uint32_t dirty_mibps, uint64_t seed) {
  if (guest_create(g, ram, dirty_mibps) < 0) return -1;
  if (!guest_fill(g->ram, &g->layout, seed)) {
    vmm_err("out of memory filling the guest");
    goto fail;
  }
  if (!vcpu_parked(&g->vcpu, "setting up the vCPU") || setup_long_mode(g) < 0) goto fail;
  g->ready = true;
  if (guest_resume(g) < 0) goto fail;
  return 0;
fail:
  guest_destroy(g);
  return -1;
}

/* Page writes per second achieved here, in MiB/s (of run time). */
static double guest_dirty_rate(struct guest *g) {
  double secs = vcpu_run_time(&g->vcpu);
  return secs > 0 ? (double)(guest_counter(g) - g->writes_at_start) / WRITES_PER_MIB / secs : 0;
}

/* ======================================================================
 * Dirty log
 *
 * start: set KVM_MEM_LOG_DIRTY_PAGES on the slot; the first read after it
 * reports every page (every page counts as dirty until first read), later
 * reads what KVM_GET_DIRTY_LOG reports (without manual-protect mode, which
 * is not enabled here, the ioctl clears the log and write-protects the
 * pages again as it reads). stop: clear the flag.
 * ====================================================================== */

static size_t guest_pages(const struct guest *g) { return (size_t)(g->layout.ram / GUEST_PAGE); }
static size_t bitmap_words(size_t pages) { return (pages + 63) / 64; }

static int guest_set_dirty_log(struct guest *g, bool on) {
  if (set_memory_slot(g, on) < 0) return -1;
  g->dirty_log = on;
  g->report_all_dirty = on;
  return 0;
}

static int guest_read_dirty(struct guest *g, uint32_t region, uint64_t *bitmap, size_t words) {
  size_t pages = guest_pages(g);
  if (region != 0) {
    vmm_err("dirty log of region %u: the guest has one region (0)", region);
    return -1;
  }
  if (words != bitmap_words(pages)) {
    vmm_err("dirty log: bitmap of %zu words for %zu pages", words, pages);
    return -1;
  }
  if (!g->dirty_log) {
    vmm_err("dirty log: not started");
    return -1;
  }
  /* KVM writes ALIGN(pages, 64) / 8 bytes: exactly `words` words. */
  struct kvm_dirty_log log = {.slot = SLOT, .dirty_bitmap = bitmap};
  if (ioctl(g->vm, KVM_GET_DIRTY_LOG, &log) < 0) {
    vmm_err("KVM_GET_DIRTY_LOG: %s", strerror(errno));
    return -1;
  }
  if (g->report_all_dirty) {
    g->report_all_dirty = false;
    memset(bitmap, 0xff, words * 8);
    if (pages % 64) bitmap[words - 1] = (1ull << (pages % 64)) - 1;
  }
  return 0;
}

/* ======================================================================
 * Device state
 *
 * The vCPU's registers plus the RAM size and the dirty rate; the layout of
 * migration/src/kvm/state.rs (all integers little-endian):
 *
 *   magic "DWCPKVMC", version u16 = 1, reserved u16 = 0, body_len u32,
 *   body: ram u64, dirty_mibps u32, reserved u32,
 *         regs 18 x u64 (rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags),
 *         8 segments (cs ds es fs gs ss tr ldt): base u64, limit u32,
 *           selector u16, type present dpl db s l g avl unusable (9 x u8),
 *         gdt, idt: base u64, limit u16,
 *         cr0 cr2 cr3 cr4 cr8 efer apic_base (7 x u64),
 *         interrupt_bitmap 4 x u64,
 *   checksum u64: FNV-1a 64 of header and body.
 *
 * The Rust blob ends in BLAKE3 (a hash library this example does without),
 * hence its own magic: neither VMM takes the other's blob for its own.
 * The guest uses no FPU/SSE state, no MSR but EFER, no interrupts, no
 * TSC, and is saved parked after any pending I/O completed, so that is all.
 * ====================================================================== */

static const uint8_t STATE_MAGIC[8] = {'D', 'W', 'C', 'P', 'K', 'V', 'M', 'C'};
#define STATE_VERSION 1
#define STATE_HEADER 16
#define STATE_SEGMENT (8 + 4 + 2 + 9)
#define STATE_BODY (8 + 4 + 4 + 18 * 8 + 8 * STATE_SEGMENT + 2 * (8 + 2) + 7 * 8 + 4 * 8)
#define STATE_BLOB (STATE_HEADER + STATE_BODY + 8)

static uint64_t fnv1a64(const uint8_t *p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

struct writer {
  uint8_t *p;
};
static void w_bytes(struct writer *w, const void *b, size_t n) {
  memcpy(w->p, b, n);
  w->p += n;
}
static void w_u16(struct writer *w, uint16_t v) { w_bytes(w, &v, 2); } /* x86: LE */
static void w_u32(struct writer *w, uint32_t v) { w_bytes(w, &v, 4); }
static void w_u64(struct writer *w, uint64_t v) { w_bytes(w, &v, 8); }
static void w_segment(struct writer *w, const struct kvm_segment *s) {
  w_u64(w, s->base);
  w_u32(w, s->limit);
  w_u16(w, s->selector);
  const uint8_t b[9] = {s->type, s->present, s->dpl, s->db, s->s, s->l, s->g, s->avl, s->unusable};
  w_bytes(w, b, 9);
}

/* Reads off a slice whose length was checked before; a short read still
 * only sets `bad`. */
struct reader {
  const uint8_t *p;
  size_t left;
  bool bad;
};
static void r_bytes(struct reader *r, void *out, size_t n) {
  if (r->left < n) {
    r->bad = true;
    memset(out, 0, n);
    return;
  }
  memcpy(out, r->p, n);
  r->p += n;
  r->left -= n;
}
static uint16_t r_u16(struct reader *r) { uint16_t v; r_bytes(r, &v, 2); return v; }
static uint32_t r_u32(struct reader *r) { uint32_t v; r_bytes(r, &v, 4); return v; }
static uint64_t r_u64(struct reader *r) { uint64_t v; r_bytes(r, &v, 8); return v; }
static void r_segment(struct reader *r, struct kvm_segment *s) {
  memset(s, 0, sizeof *s);
  s->base = r_u64(r);
  s->limit = r_u32(r);
  s->selector = r_u16(r);
  uint8_t b[9];
  r_bytes(r, b, 9);
  s->type = b[0], s->present = b[1], s->dpl = b[2], s->db = b[3], s->s = b[4];
  s->l = b[5], s->g = b[6], s->avl = b[7], s->unusable = b[8];
}

#define REGS_LIST(r)                                                                            \
  &r->rax, &r->rbx, &r->rcx, &r->rdx, &r->rsi, &r->rdi, &r->rsp, &r->rbp, &r->r8, &r->r9,       \
      &r->r10, &r->r11, &r->r12, &r->r13, &r->r14, &r->r15, &r->rip, &r->rflags

static void state_encode(uint8_t out[STATE_BLOB], uint64_t ram, uint32_t dirty_mibps,
                         const struct kvm_regs *regs, const struct kvm_sregs *s) {
  struct writer w = {out};
  w_bytes(&w, STATE_MAGIC, 8);
  w_u16(&w, STATE_VERSION);
  w_u16(&w, 0);
  w_u32(&w, STATE_BODY);
  w_u64(&w, ram);
  w_u32(&w, dirty_mibps);
  w_u32(&w, 0);
  const __u64 *g[18] = {REGS_LIST(regs)};
  for (int i = 0; i < 18; i++) w_u64(&w, *g[i]);
  const struct kvm_segment *segs[8] = {&s->cs, &s->ds, &s->es, &s->fs,
                                       &s->gs, &s->ss, &s->tr, &s->ldt};
  for (int i = 0; i < 8; i++) w_segment(&w, segs[i]);
  w_u64(&w, s->gdt.base);
  w_u16(&w, s->gdt.limit);
  w_u64(&w, s->idt.base);
  w_u16(&w, s->idt.limit);
  const __u64 c[7] = {s->cr0, s->cr2, s->cr3, s->cr4, s->cr8, s->efer, s->apic_base};
  for (int i = 0; i < 7; i++) w_u64(&w, c[i]);
  for (int i = 0; i < 4; i++) w_u64(&w, s->interrupt_bitmap[i]);
  w_u64(&w, fnv1a64(out, STATE_HEADER + STATE_BODY));
}

/* Parses and checks a blob; NULL on success, else what is wrong. */
static const char *state_decode(const uint8_t *blob, size_t len, uint64_t *ram,
                                uint32_t *dirty_mibps, struct kvm_regs *regs,
                                struct kvm_sregs *s) {
  if (len < STATE_HEADER + 8) return "shorter than a header";
  if (memcmp(blob, STATE_MAGIC, 8) != 0) return "bad magic";
  struct reader r = {blob + 8, STATE_HEADER - 8, false};
  uint16_t version = r_u16(&r), reserved = r_u16(&r);
  uint32_t body = r_u32(&r);
  if (version != STATE_VERSION) return "unknown version";
  if (reserved != 0) return "reserved header field is not zero";
  if (body != STATE_BODY) return "wrong body length";
  if (len != STATE_BLOB) return "wrong blob length";
  uint64_t sum;
  memcpy(&sum, blob + STATE_HEADER + STATE_BODY, 8);
  if (sum != fnv1a64(blob, STATE_HEADER + STATE_BODY)) return "checksum mismatch";
  r = (struct reader){blob + STATE_HEADER, STATE_BODY, false};
  *ram = r_u64(&r);
  *dirty_mibps = r_u32(&r);
  if (r_u32(&r) != 0) return "reserved body field is not zero";
  memset(regs, 0, sizeof *regs);
  memset(s, 0, sizeof *s);
  __u64 *g[18] = {REGS_LIST(regs)};
  for (int i = 0; i < 18; i++) *g[i] = r_u64(&r);
  struct kvm_segment *segs[8] = {&s->cs, &s->ds, &s->es, &s->fs, &s->gs, &s->ss, &s->tr, &s->ldt};
  for (int i = 0; i < 8; i++) r_segment(&r, segs[i]);
  s->gdt.base = r_u64(&r);
  s->gdt.limit = r_u16(&r);
  s->idt.base = r_u64(&r);
  s->idt.limit = r_u16(&r);
  __u64 *c[7] = {&s->cr0, &s->cr2, &s->cr3, &s->cr4, &s->cr8, &s->efer, &s->apic_base};
  for (int i = 0; i < 7; i++) *c[i] = r_u64(&r);
  for (int i = 0; i < 4; i++) s->interrupt_bitmap[i] = r_u64(&r);
  return r.bad ? "truncated body" : NULL;
}

static int guest_save_state(struct guest *g, uint8_t *buf, size_t cap, size_t *len) {
  const char *what = "saving the device state";
  if (cap < STATE_BLOB) {
    vmm_err("%s: needs %d bytes, the buffer has %zu", what, STATE_BLOB, cap);
    return -1;
  }
  if (!vcpu_parked(&g->vcpu, what)) return -1;
  struct kvm_regs regs;
  struct kvm_sregs sregs;
  if (ioctl(g->vcpu.fd, KVM_GET_REGS, &regs) < 0 || ioctl(g->vcpu.fd, KVM_GET_SREGS, &sregs) < 0) {
    vmm_err("%s: %s", what, strerror(errno));
    return -1;
  }
  pthread_mutex_lock(&g->vcpu.lock);
  uint32_t mibps = g->vcpu.dirty_mibps;
  pthread_mutex_unlock(&g->vcpu.lock);
  state_encode(buf, g->layout.ram, mibps, &regs, &sregs);
  *len = STATE_BLOB;
  return 0;
}

static int guest_load_state(struct guest *g, const uint8_t *blob, size_t len) {
  const char *what = "loading the device state";
  uint64_t ram;
  uint32_t mibps;
  struct kvm_regs regs;
  struct kvm_sregs sregs;
  const char *bad = state_decode(blob, len, &ram, &mibps, &regs, &sregs);
  if (bad) {
    vmm_err("%s: %s (%zu bytes)", what, bad, len);
    return -1;
  }
  if (ram != g->layout.ram) {
    vmm_err("%s: the source has %" PRIu64 " bytes of RAM, this guest %" PRIu64, what, ram,
            g->layout.ram);
    return -1;
  }
  if (g->started) {
    vmm_err("%s: this guest has already run", what);
    return -1;
  }
  if (!vcpu_parked(&g->vcpu, what)) return -1;
  if (ioctl(g->vcpu.fd, KVM_SET_SREGS, &sregs) < 0 || ioctl(g->vcpu.fd, KVM_SET_REGS, &regs) < 0) {
    vmm_err("%s: %s", what, strerror(errno));
    return -1;
  }
  vcpu_set(&g->vcpu, &g->vcpu.dirty_mibps, mibps);
  g->ready = true;
  return 0;
}

/* ======================================================================
 * The dwcp callbacks: `user` is the struct guest. Source callbacks run on
 * the thread in dwcp_migration_migrate_to, destination ones on a library
 * thread; each returns 0 or -1 (having said why with vmm_err, which hands
 * the reason to dwcp_callback_error).
 * ====================================================================== */

static int cb_start_dirty_log(void *user) { return guest_set_dirty_log(user, true); }
static int cb_stop_dirty_log(void *user) { return guest_set_dirty_log(user, false); }

static int cb_read_and_clear_dirty(void *user, uint32_t region, uint64_t *bitmap, size_t words,
                                   size_t *written) {
  if (guest_read_dirty(user, region, bitmap, words) < 0) return -1;
  *written = words;
  return 0;
}

static int cb_pause(void *user) { return guest_pause(user); }
static int cb_resume(void *user) { return guest_resume(user); }

static int cb_throttle(void *user, uint32_t percent) {
  struct guest *g = user;
  if (percent > 99) {
    vmm_err("throttling the vCPU: %u%% is more than 99%%", percent);
    return -1;
  }
  vcpu_set(&g->vcpu, &g->vcpu.throttle, percent);
  return 0;
}

static int cb_save_device_state(void *user, uint8_t *buf, size_t cap, size_t *len) {
  return guest_save_state(user, buf, cap, len);
}

static int cb_load_device_state(void *user, const uint8_t *blob, size_t len) {
  return guest_load_state(user, blob, len);
}

static const dwcp_hv_callbacks source_callbacks = {
    .start_dirty_log = cb_start_dirty_log,
    .read_and_clear_dirty = cb_read_and_clear_dirty,
    .stop_dirty_log = cb_stop_dirty_log,
    .pause = cb_pause,
    .resume = cb_resume,
    .throttle = cb_throttle,
    .save_device_state = cb_save_device_state,
};

static const dwcp_hv_callbacks dest_callbacks = {
    .load_device_state = cb_load_device_state,
    .resume = cb_resume,
};

static const char *decision_name(uint32_t d) {
  return d == DWCP_DECISION_CONTINUE       ? "continue"
         : d == DWCP_DECISION_STOP_AND_COPY ? "stop and copy"
         : d == DWCP_DECISION_CANCEL        ? "give up"
                                            : "?";
}

static void on_round(void *user, const dwcp_round_report *r) {
  (void)user;
  fprintf(stderr,
          "round %u: %" PRIu64 " pages (%" PRIu64 " zero), %.1f MiB in %.1f MiB on the wire, "
          "%.0f..%.0f ms, %" PRIu64 " dirty, dirty rate %.1f MiB/s",
          r->round, r->pages_sent, r->zero_pages, (double)r->bytes_sent / MIB,
          (double)r->wire_bytes / MIB, r->started_ms, r->ended_ms, r->dirty_pages,
          r->dirty_rate_mibps);
  if (r->ratio >= 0) fprintf(stderr, ", ratio %.2f", r->ratio);
  if (r->bandwidth_gbps >= 0) fprintf(stderr, ", %.2f Gbit/s", r->bandwidth_gbps);
  if (r->predicted_downtime_ms >= 0)
    fprintf(stderr, ", predicted downtime %.1f ms", r->predicted_downtime_ms);
  fprintf(stderr, ", throttle %u%%: %s\n", r->throttle, decision_name(r->decision));
}

/* ======================================================================
 * Options
 * ====================================================================== */

struct opts {
  uint64_t ram;
  uint32_t dirty;
  const char *key_file;
  bool insecure;
  uint32_t downtime_ms, deadline_ms, warmup_ms, run_after_ms;
  uint32_t streams; /* 0 = auto */
  uint32_t mode;
  uint64_t rate_limit; /* bits/s */
  bool json;
  bool no_prealloc;
  const char *migrate_to, *incoming;
  uint64_t seed;
  bool selftest;
  const char *dump_image;
};

static int usage(void) {
  fprintf(stderr,
          "usage: kvm_vmm [--ram SIZE] [--dirty MIBPS] [--key FILE | --insecure-no-auth]\n"
          "               [--downtime MS] [--deadline MS] [--streams N|auto]\n"
          "               [--mode datacenter|internet|auto|none] [--rate-limit BITS_PER_SEC]\n"
          "               [--warmup MS] [--run-after MS] [--seed N] [--json] [--no-prealloc]\n"
          "               (--migrate-to HOST:PORT | --incoming HOST:PORT)\n"
          "  SIZE: 64MiB, 1GiB, ...; MS: 50, 50ms, 2s; BITS_PER_SEC: 1000000, 300mbit, 1gbit\n");
  return 2;
}

/* A number and its unit: "64MiB" -> 64, "MiB". */
static bool split_number(const char *s, double *n, const char **unit) {
  char *end;
  errno = 0;
  *n = strtod(s, &end);
  *unit = end;
  return !errno && end != s && *n >= 0 && *n < 1.8e19;
}

/* "64MiB", "1GiB", "512M", "4096": bytes (binary units, as dwcp's CLI). */
static bool parse_size(const char *s, uint64_t *out) {
  static const struct {
    const char *unit;
    double mul;
  } units[] = {{"", 1}, {"B", 1}, {"K", 1024}, {"k", 1024}, {"KiB", 1024}, {"M", MIB},
               {"MiB", MIB}, {"G", 1u << 30}, {"GiB", 1u << 30}};
  double n;
  const char *unit;
  if (!split_number(s, &n, &unit)) return false;
  for (size_t i = 0; i < sizeof units / sizeof units[0]; i++)
    if (!strcmp(unit, units[i].unit) && n * units[i].mul < 1.8e19) {
      *out = (uint64_t)(n * units[i].mul);
      return (double)*out == n * units[i].mul;
    }
  return false;
}

/* "50ms", "2s", "1min", "50" (ms): milliseconds. */
static bool parse_ms(const char *s, uint32_t *out) {
  double n, ms;
  const char *unit;
  if (!split_number(s, &n, &unit)) return false;
  if (!strcmp(unit, "") || !strcmp(unit, "ms"))
    ms = n;
  else if (!strcmp(unit, "us"))
    ms = n / 1e3;
  else if (!strcmp(unit, "s"))
    ms = n * 1e3;
  else if (!strcmp(unit, "min"))
    ms = n * 60e3;
  else
    return false;
  if (ms > UINT32_MAX) return false;
  *out = (uint32_t)(ms + 0.5);
  return true;
}

/* "300mbit", "1gbit", "125mbps" (bytes/s, as tc), "1000000" (bits/s). */
static bool parse_rate(const char *s, uint64_t *out) {
  static const struct {
    const char *unit;
    double mul;
  } units[] = {{"", 1},      {"bit", 1},     {"kbit", 1e3}, {"mbit", 1e6}, {"gbit", 1e9},
               {"tbit", 1e12}, {"bps", 8},   {"kbps", 8e3}, {"mbps", 8e6}, {"gbps", 8e9}};
  double n;
  const char *unit;
  if (!split_number(s, &n, &unit)) return false;
  for (size_t i = 0; i < sizeof units / sizeof units[0]; i++)
    if (!strcasecmp(unit, units[i].unit) && n * units[i].mul < 1.8e19) {
      *out = (uint64_t)(n * units[i].mul);
      return true;
    }
  return false;
}

static bool parse_u32(const char *s, uint32_t *out) {
  char *end;
  errno = 0;
  unsigned long v = strtoul(s, &end, 10);
  if (errno || end == s || *end || v > UINT32_MAX) return false;
  *out = (uint32_t)v;
  return true;
}

static int parse_opts(int argc, char **argv, struct opts *o) {
  *o = (struct opts){.ram = 1ull << 30, .dirty = 30, .downtime_ms = 50, .deadline_ms = 60000,
                     .warmup_ms = 0, .run_after_ms = 500, .streams = 2,
                     .mode = DWCP_MODE_DATACENTER, .seed = 1};
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    bool ok = true, takes = true;
    if (!strcmp(a, "--ram"))
      ok = v && parse_size(v, &o->ram);
    else if (!strcmp(a, "--dirty"))
      ok = v && parse_u32(v, &o->dirty);
    else if (!strcmp(a, "--key"))
      ok = (o->key_file = v) != NULL;
    else if (!strcmp(a, "--downtime"))
      ok = v && parse_ms(v, &o->downtime_ms);
    else if (!strcmp(a, "--deadline"))
      ok = v && parse_ms(v, &o->deadline_ms);
    else if (!strcmp(a, "--warmup"))
      ok = v && parse_ms(v, &o->warmup_ms);
    else if (!strcmp(a, "--run-after"))
      ok = v && parse_ms(v, &o->run_after_ms);
    else if (!strcmp(a, "--streams"))
      ok = v && (!strcmp(v, "auto") ? (o->streams = 0, true) : parse_u32(v, &o->streams));
    else if (!strcmp(a, "--rate-limit"))
      ok = v && parse_rate(v, &o->rate_limit);
    else if (!strcmp(a, "--seed"))
      ok = v && (o->seed = strtoull(v, NULL, 0), true);
    else if (!strcmp(a, "--migrate-to") || !strcmp(a, "--to")) /* --to: as dwcp migrate */
      ok = (o->migrate_to = v) != NULL;
    else if (!strcmp(a, "--incoming"))
      ok = (o->incoming = v) != NULL;
    else if (!strcmp(a, "--dump-image")) /* hidden: write the source's initial RAM */
      ok = (o->dump_image = v) != NULL;
    else if (!strcmp(a, "--mode")) {
      ok = v != NULL;
      if (ok && !strcmp(v, "datacenter")) o->mode = DWCP_MODE_DATACENTER;
      else if (ok && !strcmp(v, "internet")) o->mode = DWCP_MODE_INTERNET;
      else if (ok && !strcmp(v, "auto")) o->mode = DWCP_MODE_AUTO;
      else if (ok && !strcmp(v, "none")) o->mode = DWCP_MODE_NONE;
      else ok = false;
    } else {
      takes = false;
      if (!strcmp(a, "--insecure-no-auth"))
        o->insecure = true;
      else if (!strcmp(a, "--json"))
        o->json = true;
      else if (!strcmp(a, "--no-prealloc"))
        o->no_prealloc = true;
      else if (!strcmp(a, "--selftest-local")) /* hidden: KVM part alone */
        o->selftest = true;
      else
        ok = false;
    }
    if (!ok) {
      fprintf(stderr, "kvm_vmm: bad or missing value for %s\n", a);
      return usage();
    }
    i += takes;
  }
  if (o->selftest || o->dump_image) return 0;
  if (!o->migrate_to == !o->incoming) {
    fprintf(stderr, "kvm_vmm: give exactly one of --migrate-to or --incoming\n");
    return usage();
  }
  if (!o->key_file == !o->insecure) {
    fprintf(stderr, "kvm_vmm: give exactly one of --key FILE or --insecure-no-auth\n");
    return usage();
  }
  return 0;
}

/* ======================================================================
 * Ctrl-C: the handler only sets a flag; a watcher thread polls it and
 * calls dwcp_migration_cancel (not async-signal-safe, so never from the
 * handler). SIGINT is blocked in every other thread (main blocks it before
 * creating any), so it lands on the watcher; the handler resets itself, so
 * a second Ctrl-C kills the process the usual way.
 * ====================================================================== */

static volatile sig_atomic_t interrupted;
static void on_sigint(int sig) {
  (void)sig;
  interrupted = 1;
}

struct watcher {
  pthread_t thread;
  const dwcp_migration *m;
  atomic_bool finished;
  bool cancelled;
};

static void *watch_main(void *arg) {
  struct watcher *w = arg;
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_UNBLOCK, &set, NULL);
  while (!atomic_load(&w->finished)) {
    if (interrupted && !w->cancelled) {
      fprintf(stderr, "interrupted: cancelling the migration\n");
      w->cancelled = true;
      dwcp_failed(dwcp_migration_cancel(w->m), "cancelling the migration");
    }
    sleep_s(0.02);
  }
  return NULL;
}

static void block_sigint(void) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigint;
  sa.sa_flags = SA_RESTART | SA_RESETHAND;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
}

static bool watcher_start(struct watcher *w, const dwcp_migration *m) {
  w->m = m;
  w->cancelled = false;
  atomic_store(&w->finished, false);
  int rc = pthread_create(&w->thread, NULL, watch_main, w);
  if (rc) vmm_err("starting the Ctrl-C watcher: %s", strerror(rc));
  return rc == 0;
}

static void watcher_stop(struct watcher *w) {
  atomic_store(&w->finished, true);
  pthread_join(w->thread, NULL);
}

/* ======================================================================
 * Source: run the guest, migrate it, report
 * ====================================================================== */

static int run_source(const struct opts *o, const uint8_t *key) {
  struct guest g;
  if (guest_source(&g, o->ram, o->dirty, o->seed) < 0) return 1;
  if (!o->json)
    fprintf(stderr, "source guest: %" PRIu64 " MiB of RAM, dirtying %u MiB/s; migrating to %s\n",
            o->ram >> 20, o->dirty, o->migrate_to);
  sleep_s(o->warmup_ms / 1e3);

  int ret = 1;
  dwcp_engine *engine = NULL;
  dwcp_migration *m = NULL;
  if (dwcp_failed(dwcp_engine_new(NULL, &engine), "starting the engine")) goto out;

  dwcp_migration_options mo;
  if (dwcp_failed(dwcp_migration_options_default(&mo), "migration options")) goto out;
  mo.downtime_limit_ms = o->downtime_ms;
  mo.deadline_ms = o->deadline_ms;
  mo.mode = o->mode; /* the page codec */
  mo.link_rate = o->rate_limit;
  mo.on_round = o->json ? NULL : on_round;
  dwcp_region region = {.gpa = 0,
                        .host = g.ram,
                        .len = g.layout.ram,
                        .flags = DWCP_REGION_PRIVATE_ANONYMOUS};
  if (dwcp_failed(dwcp_migration_source_new(engine, &region, 1, &source_callbacks, &g, &mo, &m),
                  "creating the migration"))
    goto out;

  dwcp_connect_options co;
  if (dwcp_failed(dwcp_connect_options_default(&co), "connect options")) goto out;
  co.key = key;
  co.insecure_no_auth = o->insecure;
  co.streams = o->streams;
  co.mode = DWCP_MODE_NONE; /* pages are compressed by the page codec */
  co.rate_limit = o->rate_limit;
  /* A paused guest waits on a vanished destination: seconds, not the
   * transport's patient defaults (as `dwcp migrate` does). */
  co.connect_timeout_ms = 5000;
  co.stall_timeout_ms = 2000;
  co.resume_ms = 3000;

  uint64_t counter0 = guest_counter(&g);
  struct watcher w;
  bool watching = watcher_start(&w, m);
  dwcp_migration_report rep;
  dwcp_status st = dwcp_migration_migrate_to(m, o->migrate_to, &co, &rep);
  char error[4096] = "";
  if (st != DWCP_STATUS_OK) snprintf(error, sizeof error, "%s", dwcp_error());
  if (watching) watcher_stop(&w);

  if (st == DWCP_STATUS_OK) {
    if (watching && w.cancelled)
      fprintf(stderr, "interrupted too late: the guest had been handed over already\n");
    /* Paused for good: this is the memory at the pause, hashed as the
     * destination hashed what it received. */
    uint8_t digest[32];
    char hex[65] = "";
    if (!dwcp_failed(dwcp_memory_digest(&region, 1, digest), "memory digest")) hex32(digest, hex);
    uint64_t counter = guest_counter(&g);
    double secs = rep.total_ms / 1e3 > 1e-9 ? rep.total_ms / 1e3 : 1e-9;
    double mibps = (double)(counter - counter0) / WRITES_PER_MIB / secs;
    if (o->json)
      printf("{\"name\":\"migrate\",\"result\":\"ok\",\"total_ms\":%.3f,\"downtime_ms\":%.3f,"
             "\"rounds\":%u,\"guest_bytes\":%" PRIu64 ",\"wire_bytes\":%" PRIu64
             ",\"converged\":%s,\"throttled\":%u,\"counter_at_pause\":%" PRIu64
             ",\"guest_dirty_mibps\":%.3f,\"memory_digest\":\"%s\"}\n",
             rep.total_ms, rep.downtime_ms, rep.rounds, rep.bytes_sent, rep.wire_bytes,
             rep.converged ? "true" : "false", rep.max_throttle, counter, mibps, hex);
    else
      printf("migrated: %u rounds, total %.1f ms, downtime %.1f ms, %" PRIu64 " MiB of guest "
             "pages in %" PRIu64 " MiB on the wire, max throttle %u%%; the guest counter stopped "
             "here at %" PRIu64 " (last pause took %.0f us)\n",
             rep.rounds, rep.total_ms, rep.downtime_ms, rep.bytes_sent >> 20,
             rep.wire_bytes >> 20, rep.max_throttle, counter, g.last_pause_s * 1e6);
    ret = hex[0] ? 0 : 1;
  } else {
    /* The library resumed the guest: check that it runs on. */
    bool cancelled = st == DWCP_STATUS_CANCELLED || st == DWCP_STATUS_MIGRATION_CANCELLED;
    uint64_t before = guest_counter(&g), ticks0 = guest_ticks(&g);
    sleep_s(0.2);
    uint64_t after = guest_counter(&g), ticks1 = guest_ticks(&g);
    bool runs = after > before || (o->dirty == 0 && ticks1 > ticks0);
    if (o->json) {
      printf("{\"name\":\"migrate\",\"result\":\"%s\",\"status\":%d,\"error\":",
             cancelled ? "cancelled" : "failed", (int)st);
      json_string(stdout, error);
      printf(",\"interrupted\":%s,\"source_runs\":%s,\"counter_before\":%" PRIu64
             ",\"counter_after\":%" PRIu64 "}\n",
             watching && w.cancelled ? "true" : "false", runs ? "true" : "false", before, after);
    }
    vmm_err("migration %s (status %d): %s; source guest counter %" PRIu64 " -> %" PRIu64
            " in 200 ms%s",
            cancelled ? "cancelled" : "failed", (int)st, error, before, after,
            runs ? "" : ": it does NOT run on");
  }
out:
  fflush(stdout);
  dwcp_migration_free(m); /* before the RAM goes */
  dwcp_engine_free(engine);
  guest_destroy(&g);
  return ret;
}

/* ======================================================================
 * Destination: an empty guest, filled by the migration, started by it
 * ====================================================================== */

static int run_destination(const struct opts *o, const uint8_t *key) {
  struct guest g;
  /* The dirty rate comes with the device state. */
  if (guest_create(&g, o->ram, 0) < 0) return 1;
  /* Allocate all guest RAM before listening, as `dwcp migrate --incoming`
   * does: pages then arrive without a page fault each, and a host short of
   * memory fails here, before the source sends anything. Kernels before
   * 5.14 lack MADV_POPULATE_WRITE (EINVAL): pages are then allocated as
   * they arrive. */
  if (!o->no_prealloc && madvise(g.ram, g.layout.ram, 23 /* MADV_POPULATE_WRITE */) != 0 &&
      errno != EINVAL) {
    vmm_err("allocating %" PRIu64 " bytes of guest RAM: %s", (uint64_t)g.layout.ram,
            strerror(errno));
    guest_destroy(&g);
    return 1;
  }
  int ret = 1;
  dwcp_engine *engine = NULL;
  dwcp_migration *m = NULL;
  if (dwcp_failed(dwcp_engine_new(NULL, &engine), "starting the engine")) goto out;
  dwcp_migration_options mo;
  if (dwcp_failed(dwcp_migration_options_default(&mo), "migration options")) goto out;
  /* Fresh anonymous memory that nothing wrote yet: libdwcp need not read it
   * all to zero what is not zero. */
  mo.dest_memory_zero = true;
  /* Its page codec state too, before the source connects (as the guest RAM
   * is). */
  mo.dest_prealloc_state = true;
  dwcp_region region = {.gpa = 0,
                        .host = g.ram,
                        .len = g.layout.ram,
                        .flags = DWCP_REGION_PRIVATE_ANONYMOUS};
  if (dwcp_failed(dwcp_migration_dest_new(engine, &region, 1, &dest_callbacks, &g, &mo, &m),
                  "creating the migration"))
    goto out;
  dwcp_listen_options lo;
  if (dwcp_failed(dwcp_listen_options_default(&lo), "listen options")) goto out;
  lo.key = key;
  lo.insecure_no_auth = o->insecure;
  lo.grace_ms = 10000; /* longer than the source's resume_ms */
  if (dwcp_failed(dwcp_migration_listen(m, o->incoming, &lo), "listening")) goto out;
  char addr[128];
  size_t n;
  if (dwcp_failed(dwcp_migration_local_addr(m, addr, sizeof addr, &n), "local address")) goto out;
  if (o->json) {
    printf("{\"name\":\"listening\",\"addr\":\"%s\"}\n", addr);
    fflush(stdout); /* for tools that start the source once this is here */
  } else {
    fprintf(stderr, "destination: %" PRIu64 " MiB guest waiting; listening on %s\n",
            o->ram >> 20, addr);
  }

  struct watcher w;
  bool watching = watcher_start(&w, m);
  double give_up = now_s() + o->deadline_ms / 1e3 + 60.0;
  bool gave_up = false;
  dwcp_incoming_report rep;
  dwcp_status st;
  while ((st = dwcp_migration_wait_incoming(m, 100, &rep)) == DWCP_STATUS_TIMEOUT)
    if (!gave_up && now_s() > give_up) {
      vmm_err("no migration completed in time; giving up");
      gave_up = true;
      dwcp_failed(dwcp_migration_cancel(m), "cancelling the migration");
    }
  char error[4096] = "";
  if (st != DWCP_STATUS_OK) snprintf(error, sizeof error, "%s", dwcp_error());
  if (watching) watcher_stop(&w);
  if (st != DWCP_STATUS_OK) {
    if (o->json) {
      printf("{\"name\":\"incoming\",\"result\":\"discarded\",\"status\":%d,\"error\":", (int)st);
      json_string(stdout, error);
      printf("}\n");
    }
    vmm_err("the migration was discarded (status %d): %s", (int)st, error);
    goto out;
  }
  /* The guest's writes, and its budget requests (which go on at any dirty
   * rate, 0 included): either growing shows it runs. */
  uint64_t first = guest_counter(&g), ticks0 = guest_ticks(&g);
  sleep_s(o->run_after_ms / 1e3);
  uint64_t later = guest_counter(&g), ticks1 = guest_ticks(&g);
  char hex[65];
  hex32(rep.memory_digest, hex);
  if (o->json)
    printf("{\"name\":\"incoming\",\"result\":\"ok\",\"pages\":%" PRIu64 ",\"batches\":%" PRIu64
           ",\"finish_ms\":%.3f,\"counter_at_start\":%" PRIu64 ",\"counter_after\":%" PRIu64
           ",\"ticks_at_start\":%" PRIu64 ",\"ticks_after\":%" PRIu64
           ",\"memory_digest\":\"%s\"}\n",
           rep.pages, rep.batches, rep.finish_ms, first, later, ticks0, ticks1, hex);
  else
    printf("guest arrived (%" PRIu64 " pages in %" PRIu64 " batches) and runs here: counter "
           "%" PRIu64 " -> %" PRIu64 ", ticks %" PRIu64 " -> %" PRIu64 " over %u ms\n",
           rep.pages, rep.batches, first, later, ticks0, ticks1, o->run_after_ms);
  if (later <= first && ticks1 <= ticks0)
    vmm_err("the guest does not run on after the migration");
  else
    ret = 0;
out:
  fflush(stdout);
  dwcp_migration_free(m);
  dwcp_engine_free(engine);
  guest_destroy(&g);
  return ret;
}

/* ======================================================================
 * Self-test of the KVM side alone (hidden --selftest-local): rate, pause,
 * throttle, dirty log, device state, and a local "migration" by memcpy
 * into a second VM in this process.
 * ====================================================================== */

static int check_failures;
static void check(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(bool ok, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "selftest: %s: ", ok ? "ok  " : "FAIL");
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  check_failures += !ok;
}

static size_t popcount_words(const uint64_t *b, size_t n) {
  size_t c = 0;
  for (size_t i = 0; i < n; i++) c += (size_t)__builtin_popcountll(b[i]);
  return c;
}

static int run_selftest(const struct opts *o) {
  struct guest src, dst;
  double r = o->dirty;
  int rc;
  if (guest_source(&src, o->ram, o->dirty, o->seed) < 0) return 1;
  fprintf(stderr, "selftest: %" PRIu64 " MiB guest at %u MiB/s\n", o->ram >> 20, o->dirty);

  /* Rate: about R MiB/s. */
  uint64_t c0 = guest_counter(&src), t0 = guest_ticks(&src);
  double s0 = now_s();
  sleep_s(1.0);
  double rate = (double)(guest_counter(&src) - c0) / WRITES_PER_MIB / (now_s() - s0);
  check(r == 0 ? guest_ticks(&src) > t0 : rate > 0.9 * r && rate < 1.1 * r,
        "dirty rate %.1f MiB/s for %u requested (%" PRIu64 " budget requests)", rate, o->dirty,
        guest_ticks(&src) - t0);

  /* Pause: nothing moves; resume: it goes on. */
  rc = guest_pause(&src);
  check(rc == 0, "pause took %.0f us", src.last_pause_s * 1e6);
  uint64_t c1 = guest_counter(&src), t1 = guest_ticks(&src);
  sleep_s(0.1);
  check(guest_counter(&src) == c1 && guest_ticks(&src) == t1, "paused guest stands still");
  check(guest_resume(&src) == 0, "resume");
  sleep_s(0.1);
  check(guest_ticks(&src) > t1, "resumed guest runs (ticks %" PRIu64 " -> %" PRIu64 ")", t1,
        guest_ticks(&src));

  /* Throttle 50%: about half the rate. */
  if (o->dirty > 0) {
    cb_throttle(&src, 50);
    c0 = guest_counter(&src);
    s0 = now_s();
    sleep_s(0.5);
    rate = (double)(guest_counter(&src) - c0) / WRITES_PER_MIB / (now_s() - s0);
    check(rate > 0.35 * r && rate < 0.65 * r, "throttled 50%%: %.1f MiB/s", rate);
    cb_throttle(&src, 0);
  }

  /* Dirty log: all pages first, then only the control page and working
   * set, nothing while paused. */
  size_t pages = guest_pages(&src), words = bitmap_words(pages), written = 0;
  uint64_t *bm = calloc(words, 8);
  if (!bm) return 1;
  check(cb_start_dirty_log(&src) == 0, "start dirty log");
  check(cb_read_and_clear_dirty(&src, 0, bm, words, &written) == 0 && written == words &&
            popcount_words(bm, words) == pages,
        "first read: all %zu pages dirty", pages);
  sleep_s(0.2);
  check(cb_read_and_clear_dirty(&src, 0, bm, words, &written) == 0, "second read");
  size_t dirty = popcount_words(bm, words), outside = 0;
  uint64_t ws = src.layout.working_set_gpa, ws_end = ws + src.layout.working_set_len;
  for (size_t p = 0; p < pages; p++)
    if ((bm[p / 64] >> (p % 64)) & 1) {
      uint64_t gpa = (uint64_t)p * GUEST_PAGE;
      outside += gpa != CONTROL_GPA && !(gpa >= ws && gpa < ws_end);
    }
  check(dirty > 0 && outside == 0, "after 200 ms: %zu dirty pages, %zu outside the written areas",
        dirty, outside);
  guest_pause(&src);
  cb_read_and_clear_dirty(&src, 0, bm, words, &written);
  rc = cb_read_and_clear_dirty(&src, 0, bm, words, &written);
  check(rc == 0 && popcount_words(bm, words) == 0, "paused: no dirty page");
  check(cb_read_and_clear_dirty(&src, 1, bm, words, &written) != 0, "region 1 refused");
  check(cb_stop_dirty_log(&src) == 0, "stop dirty log");
  check(cb_read_and_clear_dirty(&src, 0, bm, words, &written) != 0, "read after stop refused");
  free(bm);

  /* Device state: save, refuse malformed blobs, load into a second VM
   * holding a copy of the memory; it counts on from where the source
   * stopped. */
  uint8_t blob[STATE_BLOB + 1], bad[STATE_BLOB + 1];
  size_t len = 0;
  check(cb_save_device_state(&src, blob, 10, &len) != 0, "save into a short buffer refused");
  rc = cb_save_device_state(&src, blob, sizeof blob, &len);
  check(rc == 0 && len == STATE_BLOB, "save device state (%zu bytes)", len);
  if (guest_create(&dst, o->ram, 0) < 0) return 1;
  int refused = 0, tries = 0;
  vmm_quiet = true;
  for (size_t n = 0; n < len; n++, tries++) refused += cb_load_device_state(&dst, blob, n) != 0;
  memcpy(bad, blob, len);
  bad[len] = 0;
  refused += cb_load_device_state(&dst, bad, len + 1) != 0, tries++;
  for (size_t i = 0; i < len; i++, tries++) {
    memcpy(bad, blob, len);
    bad[i] ^= 0x40;
    refused += cb_load_device_state(&dst, bad, len) != 0;
  }
  vmm_quiet = false;
  check(refused == tries, "%d of %d malformed blobs (every truncation, one byte more, every "
        "flipped byte) refused", refused, tries);
  check(cb_resume(&dst) != 0, "resume before any state refused");
  memcpy(dst.ram, src.ram, src.layout.ram);
  uint64_t at_pause = guest_counter(&src);
  check(cb_load_device_state(&dst, blob, len) == 0, "load device state");
  check(cb_resume(&dst) == 0, "resume the copy");
  sleep_s(0.3);
  uint64_t dc = guest_counter(&dst), dt = guest_ticks(&dst);
  check(o->dirty == 0 ? dt > guest_ticks(&src) : dc > at_pause,
        "the copy counts on: %" PRIu64 " -> %" PRIu64 " (%.1f MiB/s), ticks %" PRIu64, at_pause,
        dc, guest_dirty_rate(&dst), dt);
  check(guest_counter(&src) == at_pause, "the source stays paused");
  check(cb_load_device_state(&dst, blob, len) != 0, "loading into a running guest refused");
  guest_destroy(&dst);
  if (o->ram != MIN_RAM && guest_create(&dst, MIN_RAM, 0) == 0) {
    check(cb_load_device_state(&dst, blob, len) != 0, "a guest of another RAM size refuses it");
    guest_destroy(&dst);
  }
  guest_destroy(&src);
  fprintf(stderr, "selftest: %s\n", check_failures ? "FAILED" : "passed");
  return check_failures ? 1 : 0;
}

/* Hidden --dump-image FILE: the source's initial RAM, for comparing with
 * the Rust VMM's. */
static int dump_image(const struct opts *o) {
  struct guest_layout l;
  const char *why = guest_layout_new(o->ram, &l);
  if (why) return vmm_err("%s", why), 1;
  uint8_t *ram = mmap(NULL, o->ram, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (ram == MAP_FAILED) return vmm_err("mmap: %s", strerror(errno)), 1;
  FILE *f = NULL;
  int ret = 1;
  if (!guest_fill(ram, &l, o->seed)) goto out;
  f = fopen(o->dump_image, "wb");
  if (!f || fwrite(ram, 1, o->ram, f) != o->ram) {
    vmm_err("writing %s: %s", o->dump_image, strerror(errno));
    goto out;
  }
  ret = 0;
out:
  if (f && fclose(f) != 0) ret = 1;
  munmap(ram, o->ram);
  return ret;
}

/* ======================================================================
 * main
 * ====================================================================== */

int main(int argc, char **argv) {
  struct opts o;
  int rc = parse_opts(argc, argv, &o);
  if (rc) return rc;
  if (o.dump_image) return dump_image(&o);
  if (o.selftest) return run_selftest(&o);
  /* No ABI stability across releases: the library must be the header's. */
  if (strcmp(dwcp_version(), DWCP_VERSION_STRING) != 0) {
    vmm_err("libdwcp %s, but built against dwcp.h %s", dwcp_version(), DWCP_VERSION_STRING);
    return 1;
  }
  uint8_t key[32];
  if (o.key_file &&
      dwcp_failed(dwcp_key_load(o.key_file, key), "loading the key"))
    return 1;
  /* Before any thread exists, so that all of them inherit it: see the
   * Ctrl-C section. */
  block_sigint();
  rc = o.migrate_to ? run_source(&o, o.key_file ? key : NULL)
                    : run_destination(&o, o.key_file ? key : NULL);
  return rc;
}
