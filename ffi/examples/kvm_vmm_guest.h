/* kvm_vmm_guest.h: the workload of ffi/examples/kvm_vmm.c, a C port of the
 * Rust test guest (migration/src/kvm/{layout,memory,program}.rs and the
 * page generators of codec/src/corpus.rs).
 *
 * It knows nothing of KVM or of libdwcp: it says where things live in the
 * guest's physical memory, what the guest runs, and what the memory holds
 * before the guest starts. The C and Rust VMMs are benchmarked against each
 * other, so this port is exact: for the same RAM size and seed,
 * guest_fill() writes the same bytes as the Rust `memory::fill` (checked by
 * comparing the two images), hence the same compression ratios.
 *
 * Header-only (static functions), included by kvm_vmm.c alone.
 */
#ifndef KVM_VMM_GUEST_H
#define KVM_VMM_GUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ======================================================================
 * Layout (layout.rs)
 *
 *   0x0000_0000  page 0            never touched (zero)
 *   0x0000_1000  program           the guest's code (at most 16 KiB)
 *   0x0000_8000  page tables       PML4, PDPT, one page directory per GiB:
 *                                  RAM identity-mapped with 2 MiB user pages
 *   0x0020_0000  control page      counters, RNG state, parameters; the
 *                                  stack grows down from its end
 *   0x0040_0000  working set       RAM/2: 50% zero, 30% text, 20% random
 *                                  pages, shuffled; the only pages the guest
 *                                  dirties (with the control page)
 *     then       code area         RAM*80/1024 of code-like pages, never
 *                                  changed
 *     then       page table        one u32 per non-zero working-set page:
 *                                  its address, bit 0 set for a random page
 *     then       text pool         RAM/16 (1..16 MiB) of text that new text
 *                                  content is copied from
 *     then       zero up to the end of RAM
 *
 * Only the 2 MiB pages of the control page and of the working set are
 * mapped writable (accessed and dirty bits preset); everything else is
 * read-only, so KVM never maps a page the guest only reads as writable
 * (shadow paging, as in PVM, marks a page dirty when it maps it writable).
 * ====================================================================== */

#define GUEST_PAGE 4096u
#define MIB (1ull << 20)
#define LARGE_PAGE (2 * MIB)

#define PROGRAM_GPA 0x1000ull
#define PROGRAM_MAX 0x4000u
#define CONTROL_GPA 0x200000ull
#define STACK_TOP (CONTROL_GPA + 0x1000)
#define PML4_GPA 0x8000ull
#define PDPT_GPA (PML4_GPA + 0x1000)
#define PD_GPA (PDPT_GPA + 0x1000)
#define WORKING_SET_GPA 0x400000ull
#define BUDGET_PORT 0xd0

/* Control page fields (offsets from CONTROL_GPA, little-endian). */
#define CTL_WRITES 0x00     /* u64 page writes done */
#define CTL_TICKS 0x08      /* u64 budget requests made */
#define CTL_RNG 0x10        /* u64 xorshift64* state */
#define CTL_BATCH_LEFT 0x20 /* u32 writes left in the current batch */
#define CTL_TABLE_GPA 0x40  /* u32 page table address */
#define CTL_TABLE_LEN 0x44  /* u32 page table entries */
#define CTL_POOL_GPA 0x48   /* u32 text pool address */
#define CTL_POOL_SPAN 0x4c  /* u32 valid copy offsets in the pool */
#define CTL_MAGIC 0x50      /* u32 "DWKG" */
#define CONTROL_MAGIC 0x474b5744u /* "DWKG" little-endian */

#define TEXT_COPY GUEST_PAGE /* longest copy from the pool */
#define MIN_RAM (16 * MIB)
#define RAM_GRAIN (2 * LARGE_PAGE) /* working set = whole 2 MiB pages */
#define MAX_RAM (3ull << 30)       /* addresses are u32s; 3 page directories */

/* Page classes, in the order of corpus.rs PageClass::ALL. */
enum page_class { CLASS_ZERO, CLASS_TEXT, CLASS_CODE, CLASS_RANDOM };

struct guest_layout {
  uint64_t ram;
  uint64_t working_set_gpa, working_set_len;
  uint64_t code_gpa, code_len;
  uint64_t table_gpa, table_entries;
  uint64_t pool_gpa, pool_len;
  size_t class_counts[4]; /* pages of each class in the working set */
};

/* ClassMix::page_counts: proportional to the weights, largest remainder
 * (ties to the earlier class), always adding up to `pages`. */
static void page_counts(const uint32_t w[4], size_t pages, size_t out[4]) {
  uint64_t total = (uint64_t)w[0] + w[1] + w[2] + w[3];
  if (total == 0) {
    out[0] = pages;
    out[1] = out[2] = out[3] = 0;
    return;
  }
  uint64_t rem[4];
  size_t assigned = 0;
  for (int i = 0; i < 4; i++) {
    uint64_t share = (uint64_t)pages * w[i];
    out[i] = (size_t)(share / total);
    rem[i] = share % total;
    assigned += out[i];
  }
  int order[4] = {0, 1, 2, 3}; /* stable sort, largest remainder first */
  for (int i = 1; i < 4; i++)
    for (int j = i; j > 0 && rem[order[j]] > rem[order[j - 1]]; j--) {
      int t = order[j];
      order[j] = order[j - 1];
      order[j - 1] = t;
    }
  for (size_t k = 0; k < pages - assigned && k < 4; k++) out[order[k]]++;
}

/* GuestLayout::new; returns NULL on success, else why not. */
static const char *guest_layout_new(uint64_t ram, struct guest_layout *l) {
  static const uint32_t working_set_mix[4] = {50, 30, 0, 20}; /* MIGRATION_WORKING_SET */
  if (ram < MIN_RAM || ram > MAX_RAM) return "RAM must be 16 MiB to 3 GiB";
  if (ram % RAM_GRAIN) return "RAM must be a whole number of 4 MiB";
  memset(l, 0, sizeof *l);
  l->ram = ram;
  l->working_set_gpa = WORKING_SET_GPA;
  l->working_set_len = ram / 2;
  page_counts(working_set_mix, (size_t)(l->working_set_len / GUEST_PAGE), l->class_counts);
  l->table_entries = l->class_counts[1] + l->class_counts[2] + l->class_counts[3];
  l->code_len = ram * 80 / 1024 / GUEST_PAGE * GUEST_PAGE;
  l->pool_len = ram / 16 < MIB ? MIB : ram / 16 > 16 * MIB ? 16 * MIB : ram / 16;
  l->code_gpa = WORKING_SET_GPA + l->working_set_len;
  l->table_gpa = l->code_gpa + l->code_len;
  l->pool_gpa = l->table_gpa + (l->table_entries * 4 + GUEST_PAGE - 1) / GUEST_PAGE * GUEST_PAGE;
  if (l->pool_gpa + l->pool_len > ram) return "RAM too small for the layout";
  return NULL;
}

/* Whether the guest may write the 2 MiB page at `gpa`. */
static bool guest_layout_writable(const struct guest_layout *l, uint64_t gpa) {
  return gpa >= CONTROL_GPA && gpa < l->working_set_gpa + l->working_set_len;
}

/* ======================================================================
 * The guest program (program.rs)
 *
 * 64-bit long mode, CPL 3, identity-mapped, no interrupts. It loops:
 *  1. `in eax, dx` from BUDGET_PORT: the VMM answers how many page writes
 *     the guest may do now (waiting in the VMM while there are none); the
 *     guest counts the request (CTL_TICKS);
 *  2. that many times: picks a random page-table entry (a non-zero
 *     working-set page and its class) and rewrites either the whole page or
 *     one 64-byte piece (half each) with new content of its class: text is
 *     copied from a random offset of the text pool and stamped with the
 *     write counter (and, for a whole page, a random word); random content
 *     comes from xorshift64*; then counts the write (CTL_WRITES).
 * r15 = control page, rsp = stack in the control page; `rng` returns the
 * next xorshift64* output in rax; `below` returns rax uniform in 0..rcx.
 *
 * These bytes are what program.rs assembles with iced-x86 (obtained by
 * calling dwcp_migration::kvm::program::assemble() and disassembled with
 * `objdump -D -M intel -b binary -mi386:x86-64 --adjust-vma=0x1000`);
 * they are identical, 334 bytes. The constants inside (0x201000 =
 * STACK_TOP, 0x200000 = CONTROL_GPA, 0xd0 = BUDGET_PORT, the CTL_* offsets)
 * are the ones above.
 * ====================================================================== */

static const uint8_t guest_program[] = {
    /* --- entry --- */
    0x48, 0xbc, 0x00, 0x10, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, /* 1000: movabs rsp,0x201000 */
    0x49, 0xbf, 0x00, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, /* 100a: movabs r15,0x200000 */
    0xfc,                                                       /* 1014: cld */
    /* --- main loop: ask for a budget, do that many writes --- */
    0x66, 0xba, 0xd0, 0x00,                     /* 1015: mov dx,0xd0 */
    0xed,                                       /* 1019: in eax,dx */
    0x49, 0xff, 0x47, 0x08,                     /* 101a: inc qword [r15+0x8] (ticks) */
    0x85, 0xc0,                                 /* 101e: test eax,eax */
    0x74, 0xf3,                                 /* 1020: je 0x1015 */
    0x41, 0x89, 0x47, 0x20,                     /* 1022: mov dword [r15+0x20],eax */
    0xe8, 0x08, 0x00, 0x00, 0x00,               /* 1026: call 0x1033 (write_one) */
    0x41, 0xff, 0x4f, 0x20,                     /* 102b: dec dword [r15+0x20] */
    0x75, 0xf5,                                 /* 102f: jne 0x1026 */
    0xeb, 0xe2,                                 /* 1031: jmp 0x1015 */
    /* --- write_one: pick a page --- */
    0x41, 0x8b, 0x4f, 0x44,                     /* 1033: mov ecx,dword [r15+0x44] */
    0xe8, 0xcf, 0x00, 0x00, 0x00,               /* 1037: call 0x110b (below) */
    0x41, 0x8b, 0x77, 0x40,                     /* 103c: mov esi,dword [r15+0x40] */
    0x8b, 0x1c, 0x86,                           /* 1040: mov ebx,dword [rsi+rax*4] */
    0x89, 0xdf,                                 /* 1043: mov edi,ebx */
    0x81, 0xe7, 0x00, 0xf0, 0xff, 0xff,         /* 1045: and edi,0xfffff000 */
    0xe8, 0xc7, 0x00, 0x00, 0x00,               /* 104b: call 0x1117 (rng) */
    0x48, 0x85, 0xc0,                           /* 1050: test rax,rax */
    0x78, 0x5e,                                 /* 1053: js 0x10b3 (piece) */
    0xf6, 0xc3, 0x01,                           /* 1055: test bl,0x1 */
    0x75, 0x47,                                 /* 1058: jne 0x10a1 (random page) */
    /* whole text page: a 4 KiB window of the pool */
    0x41, 0x8b, 0x4f, 0x4c,                     /* 105a: mov ecx,dword [r15+0x4c] */
    0xe8, 0xa8, 0x00, 0x00, 0x00,               /* 105e: call 0x110b (below) */
    0x41, 0x8b, 0x77, 0x48,                     /* 1063: mov esi,dword [r15+0x48] */
    0x48, 0x01, 0xc6,                           /* 1067: add rsi,rax */
    0xb9, 0x00, 0x02, 0x00, 0x00,               /* 106a: mov ecx,0x200 */
    0xf3, 0x48, 0xa5,                           /* 106f: rep movs qword [rdi],qword [rsi] */
    0x48, 0x81, 0xef, 0x00, 0x10, 0x00, 0x00,   /* 1072: sub rdi,0x1000 */
    0xb9, 0x00, 0x02, 0x00, 0x00,               /* 1079: mov ecx,0x200 */
    0xe8, 0x88, 0x00, 0x00, 0x00,               /* 107e: call 0x110b (below) */
    0x49, 0x8b, 0x17,                           /* 1083: mov rdx,qword [r15] */
    0x48, 0x89, 0x14, 0xc7,                     /* 1086: mov qword [rdi+rax*8],rdx */
    0xb9, 0x00, 0x04, 0x00, 0x00,               /* 108a: mov ecx,0x400 */
    0xe8, 0x77, 0x00, 0x00, 0x00,               /* 108f: call 0x110b (below) */
    0x48, 0x8d, 0x1c, 0x87,                     /* 1094: lea rbx,[rdi+rax*4] */
    0xe8, 0x7a, 0x00, 0x00, 0x00,               /* 1098: call 0x1117 (rng) */
    0x89, 0x03,                                 /* 109d: mov dword [rbx],eax */
    0xeb, 0x66,                                 /* 109f: jmp 0x1107 (done) */
    /* whole random page: 512 fresh words */
    0xbd, 0x00, 0x02, 0x00, 0x00,               /* 10a1: mov ebp,0x200 */
    0xe8, 0x6c, 0x00, 0x00, 0x00,               /* 10a6: call 0x1117 (rng) */
    0x48, 0xab,                                 /* 10ab: stos qword [rdi],rax */
    0xff, 0xcd,                                 /* 10ad: dec ebp */
    0x75, 0xf5,                                 /* 10af: jne 0x10a6 */
    0xeb, 0x54,                                 /* 10b1: jmp 0x1107 (done) */
    /* piece: one 64-byte piece at a random 64-byte offset */
    0xb9, 0x40, 0x00, 0x00, 0x00,               /* 10b3: mov ecx,0x40 */
    0xe8, 0x4e, 0x00, 0x00, 0x00,               /* 10b8: call 0x110b (below) */
    0xc1, 0xe0, 0x06,                           /* 10bd: shl eax,0x6 */
    0x48, 0x01, 0xc7,                           /* 10c0: add rdi,rax */
    0xf6, 0xc3, 0x01,                           /* 10c3: test bl,0x1 */
    0x75, 0x2f,                                 /* 10c6: jne 0x10f7 (random piece) */
    /* text piece: 64 bytes of the pool, then the counter */
    0x41, 0x8b, 0x4f, 0x4c,                     /* 10c8: mov ecx,dword [r15+0x4c] */
    0xe8, 0x3a, 0x00, 0x00, 0x00,               /* 10cc: call 0x110b (below) */
    0x41, 0x8b, 0x77, 0x48,                     /* 10d1: mov esi,dword [r15+0x48] */
    0x48, 0x01, 0xc6,                           /* 10d5: add rsi,rax */
    0xb9, 0x08, 0x00, 0x00, 0x00,               /* 10d8: mov ecx,0x8 */
    0xf3, 0x48, 0xa5,                           /* 10dd: rep movs qword [rdi],qword [rsi] */
    0x48, 0x83, 0xef, 0x40,                     /* 10e0: sub rdi,0x40 */
    0xb9, 0x08, 0x00, 0x00, 0x00,               /* 10e4: mov ecx,0x8 */
    0xe8, 0x1d, 0x00, 0x00, 0x00,               /* 10e9: call 0x110b (below) */
    0x49, 0x8b, 0x17,                           /* 10ee: mov rdx,qword [r15] */
    0x48, 0x89, 0x14, 0xc7,                     /* 10f1: mov qword [rdi+rax*8],rdx */
    0xeb, 0x10,                                 /* 10f5: jmp 0x1107 (done) */
    /* random piece: 8 fresh words */
    0xbd, 0x08, 0x00, 0x00, 0x00,               /* 10f7: mov ebp,0x8 */
    0xe8, 0x16, 0x00, 0x00, 0x00,               /* 10fc: call 0x1117 (rng) */
    0x48, 0xab,                                 /* 1101: stos qword [rdi],rax */
    0xff, 0xcd,                                 /* 1103: dec ebp */
    0x75, 0xf5,                                 /* 1105: jne 0x10fc */
    /* done: count the write */
    0x49, 0xff, 0x07,                           /* 1107: inc qword [r15] (writes) */
    0xc3,                                       /* 110a: ret */
    /* --- below: rax = high half of rng * rcx (Lemire) --- */
    0xe8, 0x07, 0x00, 0x00, 0x00,               /* 110b: call 0x1117 (rng) */
    0x48, 0xf7, 0xe1,                           /* 1110: mul rcx */
    0x48, 0x89, 0xd0,                           /* 1113: mov rax,rdx */
    0xc3,                                       /* 1116: ret */
    /* --- rng: xorshift64*, state at [r15+0x10] --- */
    0x52,                                       /* 1117: push rdx */
    0x49, 0x8b, 0x47, 0x10,                     /* 1118: mov rax,qword [r15+0x10] */
    0x48, 0x89, 0xc2,                           /* 111c: mov rdx,rax */
    0x48, 0xc1, 0xea, 0x0c,                     /* 111f: shr rdx,0xc */
    0x48, 0x31, 0xd0,                           /* 1123: xor rax,rdx */
    0x48, 0x89, 0xc2,                           /* 1126: mov rdx,rax */
    0x48, 0xc1, 0xe2, 0x19,                     /* 1129: shl rdx,0x19 */
    0x48, 0x31, 0xd0,                           /* 112d: xor rax,rdx */
    0x48, 0x89, 0xc2,                           /* 1130: mov rdx,rax */
    0x48, 0xc1, 0xea, 0x1b,                     /* 1133: shr rdx,0x1b */
    0x48, 0x31, 0xd0,                           /* 1137: xor rax,rdx */
    0x49, 0x89, 0x47, 0x10,                     /* 113a: mov qword [r15+0x10],rax */
    0x48, 0xba, 0x1d, 0xdd, 0x6c, 0x4f, 0x91, 0xf4, 0x45, 0x25,
                                                /* 113e: movabs rdx,0x2545f4914f6cdd1d */
    0x48, 0x0f, 0xaf, 0xc2,                     /* 1148: imul rax,rdx */
    0x5a,                                       /* 114c: pop rdx */
    0xc3,                                       /* 114d: ret */
};
_Static_assert(sizeof guest_program == 334, "the program of program.rs is 334 bytes");
_Static_assert(sizeof guest_program <= PROGRAM_MAX, "program too long");

/* ======================================================================
 * Page content generators (codec/src/corpus.rs), bit-for-bit
 * ====================================================================== */

__extension__ typedef unsigned __int128 u128;

static uint64_t splitmix64(uint64_t *state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* xoshiro256**, seeded through SplitMix64 (corpus::Rng). */
struct rng {
  uint64_t s[4];
};

static struct rng rng_new(uint64_t seed) {
  struct rng r;
  for (int i = 0; i < 4; i++) r.s[i] = splitmix64(&seed);
  return r;
}

static uint64_t rng_next(struct rng *r) {
  uint64_t *s = r->s;
  uint64_t result = rotl64(s[1] * 5, 7) * 9;
  uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl64(s[3], 45);
  return result;
}

/* Uniform in 0..n (Lemire's multiply-shift). */
static uint64_t rng_below(struct rng *r, uint64_t n) {
  return (uint64_t)(((u128)rng_next(r) * n) >> 64);
}

/* A few random bits at a time (corpus::Bits). */
struct bits {
  struct rng *rng;
  uint64_t buf;
  unsigned left;
};

static uint64_t bits_take(struct bits *b, unsigned n) {
  if (b->left < n) {
    b->buf = rng_next(b->rng);
    b->left = 64;
  }
  uint64_t v = b->buf & ((1ull << n) - 1);
  b->buf >>= n;
  b->left -= n;
  return v;
}

static bool bits_chance(struct bits *b, uint64_t num) { return bits_take(b, 8) < num; }

/* One page under construction, with slack for fixed-size stores
 * (corpus::Scratch). */
#define SLACK 64
struct scratch {
  uint8_t buf[GUEST_PAGE + SLACK];
  size_t pos;
};

static bool scratch_full(const struct scratch *s) { return s->pos >= GUEST_PAGE; }

static void scratch_push(struct scratch *s, uint8_t b) {
  if (s->pos < sizeof s->buf) s->buf[s->pos] = b;
  s->pos++;
}

static void scratch_put(struct scratch *s, const void *bytes, size_t len) {
  size_t start = s->pos < sizeof s->buf ? s->pos : sizeof s->buf;
  size_t end = s->pos + len < sizeof s->buf ? s->pos + len : sizeof s->buf;
  memcpy(s->buf + start, bytes, end - start);
  s->pos += len;
}

/* Stores all 16 bytes, appends `len` of them. */
static void scratch_put16(struct scratch *s, const uint8_t bytes[16], size_t len) {
  if (s->pos + 16 <= sizeof s->buf) memcpy(s->buf + s->pos, bytes, 16);
  s->pos += len;
}

/* Appends a copy of bytes from..to; returns where it landed. */
static void scratch_copy_back(struct scratch *s, size_t from, size_t to, size_t *at, size_t *len) {
  size_t start = s->pos < GUEST_PAGE ? s->pos : GUEST_PAGE;
  size_t upto = to < start ? to : start;
  size_t n = upto > from ? upto - from : 0;
  if (n > GUEST_PAGE - start) n = GUEST_PAGE - start;
  memmove(s->buf + start, s->buf + from, n);
  s->pos = start + n;
  *at = start;
  *len = n;
}

/* Starts of the recent tokens of a page (corpus::Recent). */
#define RECENT 256
struct recent {
  size_t starts[RECENT];
  size_t count;
};

static void recent_record(struct recent *r, size_t pos) { r->starts[r->count++ % RECENT] = pos; }

static void recent_span(const struct recent *r, size_t n, size_t pick, size_t here, size_t *from,
                        size_t *to) {
  size_t avail = r->count < RECENT ? r->count : RECENT;
  if (n > avail) n = avail;
  size_t first = r->count - avail + pick % (avail - n + 1);
  *from = r->starts[first % RECENT];
  *to = first + n >= r->count ? here : r->starts[(first + n) % RECENT];
}

/* --- text pages --- */

static const char *const WORDS[339] = {
    "the", "of", "and", "to", "a", "in", "is", "it", "you", "that", "he", "was", "for", "on",
    "are", "with", "as", "his", "they", "be", "at", "one", "have", "this", "from", "or", "had",
    "by", "not", "word", "but", "what", "some", "we", "can", "out", "other", "were", "all",
    "there", "when", "up", "use", "your", "how", "said", "an", "each", "she", "which", "do",
    "their", "time", "if", "will", "way", "about", "many", "then", "them", "write", "would",
    "like", "so", "these", "her", "long", "make", "thing", "see", "him", "two", "has", "look",
    "more", "day", "could", "go", "come", "did", "number", "sound", "no", "most", "people", "my",
    "over", "know", "water", "than", "call", "first", "who", "may", "down", "side", "been", "now",
    "find", "any", "new", "work", "part", "take", "get", "place", "made", "live", "where", "after",
    "back", "little", "only", "round", "man", "year", "came", "show", "every", "good", "me",
    "give", "our", "under", "name", "very", "through", "just", "form", "sentence", "great",
    "think", "say", "help", "low", "line", "differ", "turn", "cause", "much", "mean", "before",
    "move", "right", "boy", "old", "too", "same", "tell", "does", "set", "three", "want", "air",
    "well", "also", "play", "small", "end", "put", "home", "read", "hand", "port", "large",
    "spell", "add", "even", "land", "here", "must", "big", "high", "such", "follow", "act", "why",
    "ask", "men", "change", "went", "light", "kind", "off", "need", "house", "picture", "try",
    "us", "again", "animal", "point", "mother", "world", "near", "build", "self", "earth",
    "father", "head", "stand", "own", "page", "should", "country", "found", "answer", "school",
    "grow", "study", "still", "learn", "plant", "cover", "food", "sun", "four", "between", "state",
    "keep", "eye", "never", "last", "let", "thought", "city", "tree", "cross", "farm", "hard",
    "start", "might", "story", "saw", "far", "sea", "draw", "left", "late", "run", "while",
    "press", "close", "night", "real", "life", "few", "north", "open", "seem", "together", "next",
    "white", "children", "begin", "got", "walk", "example", "ease", "paper", "group", "always",
    "music", "those", "both", "mark", "often", "letter", "until", "mile", "river", "car", "feet",
    "care", "second", "book", "carry", "took", "science", "eat", "room", "friend", "began", "idea",
    "fish", "mountain", "stop", "once", "base", "hear", "horse", "cut", "sure", "watch", "color",
    "face", "wood", "main", "enough", "plain", "girl", "usual", "young", "ready", "above", "ever",
    "red", "list", "though", "feel", "talk", "bird", "soon", "body", "dog", "family", "direct",
    "pose", "leave", "song", "measure", "door", "product", "black", "short", "numeral", "class",
    "wind", "question", "happen", "complete", "ship", "area", "half", "rock", "order", "fire",
    "south", "problem",
};
#define N_WORDS (sizeof WORDS / sizeof WORDS[0])

static const char *const PHRASES[64] = {
    "of the", "in the", "to the", "on the", "and the", "for the", "to be", "at the", "it is",
    "with the", "from the", "by the", "it was", "there is a", "one of the", "as well as",
    "that the", "is a", "in order to", "at the same time", "the end of the", "there was",
    "he said", "we have", "you can", "they were", "do not", "the first time", "a lot of",
    "as soon as", "in front of the", "on the other hand", "the rest of the", "for example",
    "at least", "would have been", "it would be", "as long as", "all of the", "some of the",
    "out of the", "most of the", "part of the", "in this case", "at the time", "the same as",
    "each other", "so that", "more than", "even though", "in the world", "the number of",
    "this is a", "which is", "there are", "we can see", "is one of the", "will be", "has been",
    "had been", "could not", "the way to", "as a result", "at the end",
};

#define PHRASE_CHANCE 32
#define ZIPF_BITS 12
#define ZIPF_Q 2.0
#define SUCCESSORS 4
#define MARKOV_CHANCE 64
#define ECHO_CHANCE 41
#define ECHO_LEN_BITS 2

static struct {
  bool ready;
  uint16_t zipf[1u << ZIPF_BITS];
  uint16_t next[N_WORDS * SUCCESSORS];
  uint8_t padded[N_WORDS][16];
  uint8_t len[N_WORDS];
} text_tables;

/* Round half away from zero of a non-negative double (Rust's f64::round),
 * exact: x - trunc(x) loses nothing. */
static double round_half_away(double x) {
  double t = (double)(uint64_t)x;
  return x - t >= 0.5 ? t + 1.0 : t;
}

static void text_tables_init(void) {
  if (text_tables.ready) return;
  const size_t slots = 1u << ZIPF_BITS;
  double weights[N_WORDS], total = 0.0, cumulative = 0.0;
  for (size_t i = 0; i < N_WORDS; i++) weights[i] = 1.0 / ((double)i + 1.0 + ZIPF_Q);
  for (size_t i = 0; i < N_WORDS; i++) total += weights[i];
  size_t n = 0;
  for (size_t i = 0; i < N_WORDS; i++) {
    cumulative += weights[i];
    size_t upto = (size_t)round_half_away((cumulative / total) * (double)slots);
    while (n < (upto < slots ? upto : slots)) text_tables.zipf[n++] = (uint16_t)i;
  }
  while (n < slots) text_tables.zipf[n++] = (uint16_t)(N_WORDS - 1);
  uint64_t state = 0x5eed7e47ull;
  for (size_t i = 0; i < N_WORDS * SUCCESSORS; i++)
    text_tables.next[i] = text_tables.zipf[splitmix64(&state) & (slots - 1)];
  for (size_t i = 0; i < N_WORDS; i++) {
    size_t len = strlen(WORDS[i]);
    memcpy(text_tables.padded[i], WORDS[i], len > 16 ? 16 : len);
    text_tables.len[i] = (uint8_t)(len > 16 ? 16 : len);
  }
  text_tables.ready = true;
}

static uint8_t ascii_upper(uint8_t c) { return c >= 'a' && c <= 'z' ? c - 32 : c; }
static uint8_t ascii_lower(uint8_t c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }
static bool ascii_space(uint8_t c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\f' || c == '\r';
}

/* One page of prose (corpus::text_page). */
static void text_page(struct rng *rng, struct scratch *s) {
  struct bits bits = {rng, 0, 0};
  struct recent recent = {{0}, 0};
  uint64_t sentence_left = 0;
  bool capital = true;
  size_t prev = 0;
  while (!scratch_full(s)) {
    if (sentence_left == 0) sentence_left = 4 + bits_take(&bits, 4);
    size_t here = s->pos;
    if (recent.count >= 16 && bits_chance(&bits, ECHO_CHANCE)) {
      /* Repeat n whole recent tokens (with their separators). */
      size_t n = 2 + (size_t)bits_take(&bits, ECHO_LEN_BITS);
      size_t from, to, at, len;
      recent_span(&recent, n, (size_t)bits_take(&bits, 16), here, &from, &to);
      recent_record(&recent, here);
      scratch_copy_back(s, from, to, &at, &len);
      s->buf[at] = capital ? ascii_upper(s->buf[at]) : ascii_lower(s->buf[at]);
      int last = -1;
      for (size_t k = len; k-- > 0;)
        if (!ascii_space(s->buf[at + k])) {
          last = s->buf[at + k];
          break;
        }
      capital = last == '.' || last == '?' || last == '!';
      if (capital)
        sentence_left = 0;
      else
        sentence_left = sentence_left > n ? sentence_left - n : 1;
      continue;
    }
    recent_record(&recent, here);
    if (bits_chance(&bits, PHRASE_CHANCE)) {
      uint64_t a = bits_take(&bits, 6), b = bits_take(&bits, 6);
      const char *p = PHRASES[a < b ? a : b];
      scratch_put(s, p, strlen(p));
    } else {
      if (bits_chance(&bits, MARKOV_CHANCE)) {
        size_t j = (size_t)bits_take(&bits, 2) % SUCCESSORS;
        prev = text_tables.next[prev * SUCCESSORS + j];
      } else {
        prev = text_tables.zipf[bits_take(&bits, ZIPF_BITS)];
      }
      scratch_put16(s, text_tables.padded[prev], text_tables.len[prev]);
    }
    if (capital) {
      if (here < sizeof s->buf) s->buf[here] = ascii_upper(s->buf[here]);
      capital = false;
    }
    if (--sentence_left == 0) {
      uint64_t e = bits_take(&bits, 4);
      uint8_t end = e == 0 ? '?' : e == 1 ? '!' : '.';
      uint64_t brk = bits_take(&bits, 3);
      uint8_t tail[3] = {end, brk <= 1 ? '\n' : ' ', '\n'};
      scratch_put(s, tail, brk == 0 ? 3 : 2);
      capital = true;
    } else {
      uint64_t sep = bits_take(&bits, 4);
      if (sep == 0)
        scratch_put(s, ", ", 2);
      else if (sep == 1 && bits_take(&bits, 2) == 0)
        scratch_put(s, "; ", 2);
      else
        scratch_push(s, ' ');
    }
  }
}

/* --- code pages --- */

enum op {
  OP_MOV, OP_LEA, OP_CALL, OP_JMP_NEAR, OP_JMP_SHORT, OP_JCC_NEAR, OP_JCC_SHORT, OP_ALU_IMM8,
  OP_ALU_IMM32, OP_XOR, OP_ALU_REG, OP_PUSH_POP, OP_MOV_IMM, OP_MOVZX, OP_NOP,
};
static const struct {
  enum op op;
  uint32_t weight;
} OP_WEIGHTS[15] = {
    {OP_MOV, 64},      {OP_LEA, 18},       {OP_CALL, 18},      {OP_JMP_NEAR, 4},
    {OP_JMP_SHORT, 8}, {OP_JCC_NEAR, 8},   {OP_JCC_SHORT, 14}, {OP_ALU_IMM8, 18},
    {OP_ALU_IMM32, 4}, {OP_XOR, 8},        {OP_ALU_REG, 26},   {OP_PUSH_POP, 18},
    {OP_MOV_IMM, 8},   {OP_MOVZX, 6},      {OP_NOP, 26},
};
static const uint8_t REGS[16] = {0, 0, 0, 0, 7, 7, 7, 6, 6, 2, 2, 3, 3, 5, 1, 4};
static const uint8_t DISP8[16] = {0x08, 0x10, 0x18, 0x20, 0x08, 0x10, 0xf8, 0xf0,
                                  0xe8, 0x28, 0x30, 0x38, 0x40, 0x48, 0xe0, 0x50};
static const uint8_t IMM8[16] = {0x00, 0x01, 0x00, 0x01, 0x08, 0x10, 0xff, 0x02,
                                 0x04, 0x20, 0x18, 0x03, 0x0f, 0x40, 0x7f, 0x30};
static const uint8_t ALU_OPS[16] = {0x85, 0x85, 0x85, 0x39, 0x39, 0x3b, 0x01, 0x01,
                                    0x03, 0x29, 0x2b, 0x21, 0x09, 0x85, 0x39, 0x01};
static const uint8_t CC[16] = {4, 5, 4, 5, 4, 5, 4, 5, 0xc, 0xe, 0xf, 0xd, 2, 3, 6, 7};

static uint8_t pick16(struct bits *b, const uint8_t t[16]) { return t[bits_take(b, 4)]; }

/* One pre-assembled instruction: fixed bytes (length in byte 15) and the
 * bits drawn afresh at each emission. */
struct insn {
  uint8_t bytes[16];
  uint8_t random[16];
};

static void asm_byte(struct insn *a, uint8_t b, uint8_t random) {
  uint8_t len = a->bytes[15];
  if (len < 15) {
    a->bytes[len] = b & (uint8_t)~random;
    a->random[len] = random;
    a->bytes[15] = len + 1;
  }
}
static void asm_fixed(struct insn *a, uint8_t b) { asm_byte(a, b, 0); }

static void asm_rex(struct insn *a, struct bits *b) {
  uint64_t v = bits_take(b, 3);
  if (v <= 4)
    asm_fixed(a, 0x48);
  else if (v == 5)
    asm_fixed(a, 0x49);
  else if (v == 6)
    asm_fixed(a, 0x4c);
}

static void asm_rel32(struct insn *a, struct bits *b) {
  uint8_t sign = bits_take(b, 1) == 0 ? 0x00 : 0xff;
  asm_byte(a, 0, 0xff);
  asm_byte(a, 0, 0xff);
  asm_byte(a, sign, 0x0f);
  asm_fixed(a, sign);
}

static void asm_disp32(struct insn *a) {
  asm_byte(a, 0, 0xf8);
  asm_byte(a, 0, 0x0f);
  asm_fixed(a, 0);
  asm_fixed(a, 0);
}

static void asm_imm32(struct insn *a, struct bits *b) {
  uint64_t v = bits_take(b, 2);
  if (v <= 1) {
    asm_byte(a, 0, 0xff);
    asm_fixed(a, 0);
  } else if (v == 2) {
    asm_byte(a, 0, 0xf0);
    asm_byte(a, 0, 0x0f);
  } else {
    asm_fixed(a, 0xff);
    asm_fixed(a, 0xff);
  }
  uint8_t len = a->bytes[15];
  uint8_t high = a->bytes[len ? len - 1 : 0] == 0xff ? 0xff : 0;
  asm_fixed(a, high);
  asm_fixed(a, high);
}

static void asm_modrm(struct insn *a, struct bits *b, uint8_t reg, bool mem_only) {
  uint64_t v = bits_take(b, 3);
  uint8_t md = (v <= 2 && !mem_only) ? 3 : v <= 4 ? 1 : (v == 5 || v == 6) ? 0 : 2;
  uint8_t rm = pick16(b, REGS);
  asm_fixed(a, (uint8_t)((md << 6) | ((reg & 7) << 3) | rm));
  if (md != 3 && rm == 4) asm_fixed(a, 0x24); /* SIB: [rsp] */
  if (md == 1) {
    if (bits_take(b, 3) == 0)
      asm_byte(a, 0, 0xff);
    else
      asm_fixed(a, pick16(b, DISP8));
  } else if (md == 2) {
    asm_disp32(a);
  } else if (md == 0 && rm == 5) {
    asm_rel32(a, b); /* RIP-relative */
  }
}

static struct insn asm_assemble(enum op op, struct bits *b) {
  static const uint8_t ext8[8] = {0, 5, 7, 4, 0, 5, 7, 1}, ext32[4] = {0, 5, 7, 4};
  struct insn a;
  memset(&a, 0, sizeof a);
  uint8_t reg;
  switch (op) {
  case OP_MOV:
    asm_rex(&a, b);
    asm_fixed(&a, bits_take(b, 1) == 0 ? 0x89 : 0x8b);
    reg = pick16(b, REGS);
    asm_modrm(&a, b, reg, false);
    break;
  case OP_LEA:
    asm_fixed(&a, bits_take(b, 2) == 0 ? 0x4c : 0x48);
    asm_fixed(&a, 0x8d);
    reg = pick16(b, REGS);
    asm_modrm(&a, b, reg, true);
    break;
  case OP_CALL:
    asm_fixed(&a, 0xe8);
    asm_rel32(&a, b);
    break;
  case OP_JMP_NEAR:
    asm_fixed(&a, 0xe9);
    asm_rel32(&a, b);
    break;
  case OP_JMP_SHORT:
    asm_fixed(&a, 0xeb);
    asm_byte(&a, 0, 0x7f);
    break;
  case OP_JCC_NEAR:
    asm_fixed(&a, 0x0f);
    asm_fixed(&a, 0x80 | pick16(b, CC));
    asm_byte(&a, 0, 0xff);
    asm_byte(&a, 0, 0x0f);
    asm_fixed(&a, 0);
    asm_fixed(&a, 0);
    break;
  case OP_JCC_SHORT:
    asm_fixed(&a, 0x70 | pick16(b, CC));
    asm_byte(&a, 0, 0x7f);
    break;
  case OP_ALU_IMM8:
    asm_rex(&a, b);
    asm_fixed(&a, 0x83);
    reg = ext8[bits_take(b, 3)];
    asm_modrm(&a, b, reg, false);
    asm_fixed(&a, pick16(b, IMM8));
    break;
  case OP_ALU_IMM32:
    asm_rex(&a, b);
    asm_fixed(&a, 0x81);
    reg = ext32[bits_take(b, 2)];
    asm_modrm(&a, b, reg, false);
    asm_imm32(&a, b);
    break;
  case OP_XOR:
    if (bits_take(b, 1) == 0) asm_fixed(&a, 0x45);
    asm_fixed(&a, bits_take(b, 2) == 0 ? 0x33 : 0x31);
    reg = pick16(b, REGS);
    asm_fixed(&a, (uint8_t)(0xc0 | (reg << 3) | reg));
    break;
  case OP_ALU_REG:
    asm_rex(&a, b);
    asm_fixed(&a, pick16(b, ALU_OPS));
    reg = pick16(b, REGS);
    asm_modrm(&a, b, reg, false);
    break;
  case OP_PUSH_POP: {
    if (bits_take(b, 2) == 0) asm_fixed(&a, 0x41);
    uint8_t base = bits_take(b, 1) == 0 ? 0x50 : 0x58;
    asm_fixed(&a, base | pick16(b, REGS));
    break;
  }
  case OP_MOV_IMM:
    asm_fixed(&a, 0xb8 | pick16(b, REGS));
    asm_imm32(&a, b);
    break;
  case OP_MOVZX:
    asm_fixed(&a, 0x0f);
    asm_fixed(&a, bits_take(b, 2) == 0 ? 0xb7 : 0xb6);
    reg = pick16(b, REGS);
    asm_modrm(&a, b, reg, false);
    break;
  case OP_NOP: {
    static const uint8_t n6[] = {0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00};
    static const uint8_t n4[] = {0x0f, 0x1f, 0x40, 0x00}, n5[] = {0x0f, 0x1f, 0x44, 0x00, 0x00};
    static const uint8_t n1[] = {0x90};
    const uint8_t *p;
    size_t n;
    switch (bits_take(b, 2)) {
    case 0: p = n6; n = sizeof n6; break;
    case 1: p = n4; n = sizeof n4; break;
    case 2: p = n5; n = sizeof n5; break;
    default: p = n1; n = sizeof n1; break;
    }
    for (size_t i = 0; i < n; i++) asm_fixed(&a, p[i]);
    break;
  }
  }
  return a;
}

#define POOL_BITS 13
static struct insn insn_pool[1u << POOL_BITS];
static bool insn_pool_ready;

/* Pre-assembled instructions, stratified by OP_WEIGHTS (corpus::insn_pool). */
static void insn_pool_init(void) {
  if (insn_pool_ready) return;
  uint64_t total = 0;
  for (size_t k = 0; k < 15; k++) total += OP_WEIGHTS[k].weight;
  struct rng rng = rng_new(0x00c0de0fc0deull);
  struct bits bits = {&rng, 0, 0};
  for (uint64_t i = 0; i < (1u << POOL_BITS); i++) {
    uint64_t target = (i * total) >> POOL_BITS, acc = 0;
    enum op op = OP_NOP;
    for (size_t k = 0; k < 15; k++) {
      acc += OP_WEIGHTS[k].weight;
      if (target < acc) {
        op = OP_WEIGHTS[k].op;
        break;
      }
    }
    insn_pool[i] = asm_assemble(op, &bits);
  }
  insn_pool_ready = true;
}

static const uint8_t PROLOGUE_0[] = {0x55, 0x48, 0x89, 0xe5};
static const uint8_t PROLOGUE_1[] = {0x41, 0x57, 0x41, 0x56, 0x53};
static const uint8_t PROLOGUE_2[] = {0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5};
static const uint8_t PROLOGUE_3[] = {0x53, 0x48, 0x83, 0xec, 0x20};
static const uint8_t EPILOGUE_0[] = {0x5d}, EPILOGUE_1[] = {0x5b, 0x41, 0x5e, 0x41, 0x5f},
                     EPILOGUE_2[] = {0xc9};
static const struct {
  const uint8_t *p;
  size_t n;
} PROLOGUES[4] = {{PROLOGUE_0, 4}, {PROLOGUE_1, 5}, {PROLOGUE_2, 8}, {PROLOGUE_3, 5}},
  EPILOGUES[4] = {{EPILOGUE_0, 1}, {EPILOGUE_1, 5}, {EPILOGUE_2, 1}, {NULL, 0}};

#define CODE_ECHO_CHANCE 37
#define CODE_ECHO_LEN_BITS 2
#define RET_CHANCE 8

/* One page of plausible x86-64 instructions (corpus::code_page). */
static void code_page(struct rng *rng, struct scratch *s) {
  struct bits bits = {rng, 0, 0};
  struct recent recent = {{0}, 0};
  while (!scratch_full(s)) {
    size_t here = s->pos;
    uint64_t roll = bits_take(&bits, 8);
    if (roll < CODE_ECHO_CHANCE && recent.count >= 8) {
      size_t n = 1 + (size_t)bits_take(&bits, CODE_ECHO_LEN_BITS);
      size_t from, to, at, len;
      recent_span(&recent, n, (size_t)bits_take(&bits, 16), here, &from, &to);
      recent_record(&recent, here);
      scratch_copy_back(s, from, to, &at, &len);
      continue;
    }
    recent_record(&recent, here);
    if (roll >= CODE_ECHO_CHANCE && roll < CODE_ECHO_CHANCE + RET_CHANCE) {
      uint64_t e = bits_take(&bits, 2);
      if (EPILOGUES[e].n) scratch_put(s, EPILOGUES[e].p, EPILOGUES[e].n);
      scratch_push(s, 0xc3);
      uint8_t pad = bits_take(&bits, 1) == 0 ? 0xcc : 0x90;
      while (s->pos % 16 != 0 && !scratch_full(s)) scratch_push(s, pad);
      uint64_t p = bits_take(&bits, 2);
      scratch_put(s, PROLOGUES[p].p, PROLOGUES[p].n);
    } else {
      const struct insn *in = &insn_pool[bits_take(&bits, POOL_BITS)];
      uint64_t r = rng_next(bits.rng);
      uint8_t v[16];
      for (int k = 0; k < 16; k++)
        v[k] = in->bytes[k] | (in->random[k] & (uint8_t)(r >> (8 * (k & 7))));
      scratch_put16(s, v, in->bytes[15]);
    }
  }
}

/* Fills one 4096-byte page with content of `class` (corpus::fill_page). */
static void fill_page(enum page_class class, struct rng *rng, uint8_t *out) {
  struct scratch s;
  switch (class) {
  case CLASS_ZERO:
    memset(out, 0, GUEST_PAGE);
    return;
  case CLASS_TEXT:
  case CLASS_CODE:
    memset(s.buf, 0, sizeof s.buf);
    s.pos = 0;
    if (class == CLASS_TEXT)
      text_page(rng, &s);
    else
      code_page(rng, &s);
    memcpy(out, s.buf, GUEST_PAGE);
    break;
  case CLASS_RANDOM:
    for (size_t i = 0; i < GUEST_PAGE; i += 8) {
      uint64_t w = rng_next(rng);
      memcpy(out + i, &w, 8); /* little-endian host */
    }
    break;
  }
  for (size_t i = 0; i < GUEST_PAGE; i++)
    if (out[i]) return;
  out[0] = 1;
}

/* ======================================================================
 * Initial content (memory.rs `fill`)
 * ====================================================================== */

#define TABLE_FLAGS 0x27ull    /* present, writable, user, accessed */
#define WRITABLE_PAGE 0xe7ull  /* ... dirty, 2 MiB page */
#define READ_ONLY_PAGE 0xa5ull /* present, user, accessed, 2 MiB page */

static void put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static void put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* Writes the program, control page, page tables, working set (classes
 * shuffled by `seed`), code area, page table and text pool into `ram`
 * (zero on entry). Returns false when out of memory. */
static bool guest_fill(uint8_t *ram, const struct guest_layout *l, uint64_t seed) {
  text_tables_init();
  insn_pool_init();
  struct rng rng = rng_new(seed);

  /* Working set: the standard mix, in a seeded random order. */
  size_t n = (size_t)(l->working_set_len / GUEST_PAGE), k = 0;
  uint8_t *classes = malloc(n);
  if (!classes) return false;
  for (int c = 0; c < 4; c++)
    for (size_t i = 0; i < l->class_counts[c]; i++) classes[k++] = (uint8_t)c;
  for (size_t i = n - 1; i >= 1; i--) {
    size_t j = (size_t)rng_below(&rng, i + 1);
    uint8_t t = classes[i];
    classes[i] = classes[j];
    classes[j] = t;
  }
  uint8_t *table = ram + l->table_gpa;
  size_t entries = 0;
  for (size_t i = 0; i < n; i++) {
    if (classes[i] == CLASS_ZERO) continue;
    uint64_t gpa = l->working_set_gpa + i * GUEST_PAGE;
    fill_page((enum page_class)classes[i], &rng, ram + gpa);
    put_u32(table + 4 * entries++, (uint32_t)gpa | (classes[i] == CLASS_RANDOM));
  }
  free(classes);

  /* Code area and text pool. */
  for (uint64_t off = 0; off < l->code_len; off += GUEST_PAGE)
    fill_page(CLASS_CODE, &rng, ram + l->code_gpa + off);
  for (uint64_t off = 0; off < l->pool_len; off += GUEST_PAGE)
    fill_page(CLASS_TEXT, &rng, ram + l->pool_gpa + off);

  /* Program and control page. */
  memcpy(ram + PROGRAM_GPA, guest_program, sizeof guest_program);
  uint8_t *ctl = ram + CONTROL_GPA;
  put_u64(ctl + CTL_RNG, rng_next(&rng) | 1); /* xorshift64* needs non-zero */
  put_u32(ctl + CTL_TABLE_GPA, (uint32_t)l->table_gpa);
  put_u32(ctl + CTL_TABLE_LEN, (uint32_t)entries);
  put_u32(ctl + CTL_POOL_GPA, (uint32_t)l->pool_gpa);
  put_u32(ctl + CTL_POOL_SPAN, (uint32_t)(l->pool_len - TEXT_COPY + 1));
  put_u32(ctl + CTL_MAGIC, CONTROL_MAGIC);

  /* Page tables: identity map with 2 MiB user pages, writable only where
   * the guest writes; accessed/dirty preset so nothing writes the tables. */
  put_u64(ram + PML4_GPA, PDPT_GPA | TABLE_FLAGS);
  for (uint64_t i = 0; i < (l->ram + (1ull << 30) - 1) >> 30; i++)
    put_u64(ram + PDPT_GPA + 8 * i, (PD_GPA + i * GUEST_PAGE) | TABLE_FLAGS);
  for (uint64_t base = 0, i = 0; base < l->ram; base += LARGE_PAGE, i++)
    put_u64(ram + PD_GPA + 8 * i,
            base | (guest_layout_writable(l, base) ? WRITABLE_PAGE : READ_ONLY_PAGE));
  return true;
}

#endif /* KVM_VMM_GUEST_H */
