//! Deterministic synthetic memory-image corpus.
//!
//! Benchmarks, the demo and the tests of the page codec need memory images
//! whose pages look like the pages of a real guest: many zero pages, some
//! prose-like text, some machine code and some incompressible data. This
//! module builds such images from a seed alone (no files, no environment),
//! so every run of a benchmark sees the same bytes.
//!
//! The character of each class is pinned by a test, measured by compressing
//! every 4 KiB page on its own with `lz4_flex::block::compress`:
//!
//! | class    | aggregate LZ4 ratio |
//! |----------|---------------------|
//! | `zero`   | very high           |
//! | `text`   | 1.9x to 2.3x        |
//! | `code`   | 1.4x to 1.6x        |
//! | `random` | at most 1.0x        |

use std::sync::OnceLock;

/// Page size of the corpus (the crate's page size).
const PAGE: usize = 4096;

// ---------------------------------------------------------------------------
// PRNG
// ---------------------------------------------------------------------------

/// One step of SplitMix64, used to expand a 64-bit seed into a full state.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Small, fast, deterministic pseudo-random generator (xoshiro256**,
/// seeded through SplitMix64). Not cryptographic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// Creates a generator whose whole output is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut s = [0u64; 4];
        for word in &mut s {
            *word = splitmix64(&mut sm);
        }
        // Four consecutive SplitMix64 outputs are distinct, so the state is
        // never all zero (the one forbidden xoshiro state).
        Self { s }
    }

    /// Returns the next 64 uniformly distributed bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Returns a value uniform in `0..n` (Lemire's multiply-shift; the bias
    /// is at most `n / 2^64`). Returns 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Fills `out` with uniformly random bytes.
    pub fn fill_bytes(&mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let bytes = self.next_u64().to_le_bytes();
            rest.copy_from_slice(&bytes[..rest.len()]);
        }
    }
}

/// Draws a few bits at a time from an [`Rng`], so that the generators spend
/// one `next_u64` on many small decisions.
struct Bits<'r> {
    rng: &'r mut Rng,
    buf: u64,
    left: u32,
}

impl<'r> Bits<'r> {
    fn new(rng: &'r mut Rng) -> Self {
        Self {
            rng,
            buf: 0,
            left: 0,
        }
    }

    /// Returns `n` (1..=32) uniformly random bits.
    #[inline]
    fn take(&mut self, n: u32) -> u64 {
        if self.left < n {
            self.buf = self.rng.next_u64();
            self.left = 64;
        }
        let v = self.buf & ((1u64 << n) - 1);
        self.buf >>= n;
        self.left -= n;
        v
    }

    /// Returns an entry of a 16-entry table, picked uniformly.
    #[inline]
    fn pick16<T: Copy>(&mut self, table: &[T; 16]) -> T {
        table[self.take(4) as usize]
    }

    /// Returns 64 fresh random bits.
    #[inline]
    fn word(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// True with probability `num / 256`.
    #[inline]
    fn chance(&mut self, num: u64) -> bool {
        self.take(8) < num
    }
}

// ---------------------------------------------------------------------------
// Page classes and mixes
// ---------------------------------------------------------------------------

/// The kind of content a synthetic page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageClass {
    /// All bytes zero (untouched or cleared memory).
    Zero,
    /// Prose-like ASCII text.
    Text,
    /// Bytes with the statistics of x86-64 machine code.
    Code,
    /// Uniformly random bytes (encrypted or already compressed data).
    Random,
}

impl PageClass {
    /// All classes, in the order used by [`Corpus::class_counts`].
    pub const ALL: [PageClass; 4] = [
        PageClass::Zero,
        PageClass::Text,
        PageClass::Code,
        PageClass::Random,
    ];

    /// Short lower-case name: `"zero"`, `"text"`, `"code"` or `"random"`.
    pub fn name(self) -> &'static str {
        match self {
            PageClass::Zero => "zero",
            PageClass::Text => "text",
            PageClass::Code => "code",
            PageClass::Random => "random",
        }
    }
}

/// Relative weights of the page classes in a corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClassMix {
    /// Weight of zero pages.
    pub zero: u32,
    /// Weight of text-like pages.
    pub text: u32,
    /// Weight of code-like pages.
    pub code: u32,
    /// Weight of random pages.
    pub random: u32,
}

impl ClassMix {
    /// The codec benchmark corpus: 50% zero, 20% text, 20% code, 10% random.
    pub const STANDARD: ClassMix = ClassMix {
        zero: 50,
        text: 20,
        code: 20,
        random: 10,
    };

    /// A VM working set during migration: 50% zero, 30% text, 20% random.
    pub const MIGRATION_WORKING_SET: ClassMix = ClassMix {
        zero: 50,
        text: 30,
        code: 0,
        random: 20,
    };

    /// The weights in the order of [`PageClass::ALL`].
    fn weights(self) -> [u32; 4] {
        [self.zero, self.text, self.code, self.random]
    }

    /// Number of pages of each class (in the order of [`PageClass::ALL`])
    /// among `pages` pages: proportional to the weights, rounded by the
    /// largest-remainder method (ties go to the earlier class), so the counts
    /// always add up to `pages`. If all weights are zero, every page is a
    /// zero page.
    pub fn page_counts(self, pages: usize) -> [usize; 4] {
        let weights = self.weights();
        let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
        if total == 0 {
            return [pages, 0, 0, 0];
        }
        let n = pages as u128;
        let mut counts = [0usize; 4];
        let mut remainders = [0u128; 4];
        let mut assigned = 0usize;
        for (i, &w) in weights.iter().enumerate() {
            let share = n * u128::from(w);
            // share / total <= pages, so it fits in usize.
            counts[i] = (share / total) as usize;
            remainders[i] = share % total;
            assigned += counts[i];
        }
        let mut order = [0usize, 1, 2, 3];
        order.sort_by_key(|&i| std::cmp::Reverse(remainders[i]));
        for &i in order.iter().take(pages - assigned) {
            counts[i] += 1;
        }
        counts
    }
}

// ---------------------------------------------------------------------------
// Page scratch buffer
// ---------------------------------------------------------------------------

/// Bytes past the end of a page that the generators may overwrite, so that
/// they can store fixed-size blocks without checking the remaining space.
const SLACK: usize = 64;

/// One page under construction: generators append at `pos` until the page
/// is full; whatever spills past the page is dropped.
struct Scratch {
    buf: [u8; PAGE + SLACK],
    pos: usize,
}

impl Scratch {
    fn new() -> Self {
        Self {
            buf: [0; PAGE + SLACK],
            pos: 0,
        }
    }

    #[inline]
    fn full(&self) -> bool {
        self.pos >= PAGE
    }

    /// Appends one byte.
    #[inline]
    fn push(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.pos) {
            *slot = b;
        }
        self.pos += 1;
    }

    /// Appends `bytes`.
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        let start = self.pos.min(self.buf.len());
        let end = (self.pos + bytes.len()).min(self.buf.len());
        self.buf[start..end].copy_from_slice(&bytes[..end - start]);
        self.pos += bytes.len();
    }

    /// Stores all 16 `bytes` but appends only the first `len` of them.
    #[inline]
    fn put16(&mut self, bytes: [u8; 16], len: usize) {
        if let Some(dst) = self.buf.get_mut(self.pos..self.pos + 16) {
            dst.copy_from_slice(&bytes);
        }
        self.pos += len;
    }

    /// Appends a copy of the already written bytes `from..to` (`to` at most
    /// the write position); returns where the copy landed.
    #[inline]
    fn copy_back(&mut self, from: usize, to: usize) -> std::ops::Range<usize> {
        let start = self.pos.min(PAGE);
        let len = to.min(start).saturating_sub(from).min(PAGE - start);
        self.buf.copy_within(from..from + len, start);
        self.pos = start + len;
        start..start + len
    }
}

/// Fills `out` in page-sized chunks, each generated by `page` into a
/// scratch page (a shorter last chunk takes a prefix of a full page).
fn fill_chunked(rng: &mut Rng, out: &mut [u8], page: fn(&mut Rng, &mut Scratch)) {
    let mut scratch = Scratch::new();
    for chunk in out.chunks_mut(PAGE) {
        scratch.pos = 0;
        page(rng, &mut scratch);
        chunk.copy_from_slice(&scratch.buf[..chunk.len()]);
    }
}

/// Remembers where the recent tokens (words, instructions) of a page start,
/// so that a generator can repeat a run of them.
struct Recent {
    starts: [usize; RECENT],
    count: usize,
}

/// Number of recent token starts remembered for repeats.
const RECENT: usize = 256;

impl Recent {
    fn new() -> Self {
        Self {
            starts: [0; RECENT],
            count: 0,
        }
    }

    /// Records that a token starts at `pos`.
    #[inline]
    fn record(&mut self, pos: usize) {
        self.starts[self.count % RECENT] = pos;
        self.count += 1;
    }

    /// Byte range of `n` consecutive recent tokens, picked with `pick`
    /// (random bits), ending at or before `here` (the current position).
    fn span(&self, n: usize, pick: usize, here: usize) -> std::ops::Range<usize> {
        let avail = self.count.min(RECENT);
        let n = n.min(avail);
        let first = self.count - avail + pick % (avail - n + 1);
        let from = self.starts[first % RECENT];
        let to = if first + n >= self.count {
            here
        } else {
            self.starts[(first + n) % RECENT]
        };
        from..to
    }
}

// ---------------------------------------------------------------------------
// Text pages
// ---------------------------------------------------------------------------

/// Common English words, roughly in order of frequency; picked with a
/// Zipf-like distribution over this order. None is longer than 16 bytes.
const WORDS: [&str; 339] = [
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
];

/// Common multi-word phrases (collocations); text mixes them in between
/// single words.
const PHRASES: [&str; 64] = [
    "of the",
    "in the",
    "to the",
    "on the",
    "and the",
    "for the",
    "to be",
    "at the",
    "it is",
    "with the",
    "from the",
    "by the",
    "it was",
    "there is a",
    "one of the",
    "as well as",
    "that the",
    "is a",
    "in order to",
    "at the same time",
    "the end of the",
    "there was",
    "he said",
    "we have",
    "you can",
    "they were",
    "do not",
    "the first time",
    "a lot of",
    "as soon as",
    "in front of the",
    "on the other hand",
    "the rest of the",
    "for example",
    "at least",
    "would have been",
    "it would be",
    "as long as",
    "all of the",
    "some of the",
    "out of the",
    "most of the",
    "part of the",
    "in this case",
    "at the time",
    "the same as",
    "each other",
    "so that",
    "more than",
    "even though",
    "in the world",
    "the number of",
    "this is a",
    "which is",
    "there are",
    "we can see",
    "is one of the",
    "will be",
    "has been",
    "had been",
    "could not",
    "the way to",
    "as a result",
    "at the end",
];
/// Probability (out of 256) that the next token is a phrase, not a word.
const PHRASE_CHANCE: u64 = 32;
/// log2 of the size of the word sampling table.
const ZIPF_BITS: u32 = 12;
/// Rank offset of the Zipf-Mandelbrot word distribution.
const ZIPF_Q: f64 = 2.0;
/// Number of habitual successors of each word.
const SUCCESSORS: usize = 4;
/// Probability (out of 256) that the next word is one of the habitual
/// successors of the previous word rather than a fresh draw.
const MARKOV_CHANCE: u64 = 64;
/// Probability (out of 256) that the next token repeats a run of recent
/// tokens of the same page (prose repeats its names and phrases).
const ECHO_CHANCE: u64 = 41;
/// A repeat covers `2 .. 2 + 2^ECHO_LEN_BITS` tokens.
const ECHO_LEN_BITS: u32 = 2;

/// Sampling tables of the text generator.
struct TextTables {
    /// `2^ZIPF_BITS` word indices in which word `i` appears about in
    /// proportion to `1 / (i + 1 + q)` (Zipf-Mandelbrot with exponent 1,
    /// computed with exactly rounded operations only, so the table is the
    /// same on every platform); indexing it uniformly picks a word.
    zipf: Vec<u16>,
    /// `SUCCESSORS` habitual successors of each word (Zipf-distributed),
    /// which make recurring word pairs as in real prose.
    next: Vec<u16>,
    /// Each word padded with zeros to 16 bytes, and its length.
    padded: Vec<([u8; 16], usize)>,
}

fn text_tables() -> &'static TextTables {
    static TABLES: OnceLock<TextTables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let slots = 1usize << ZIPF_BITS;
        let weights: Vec<f64> = (0..WORDS.len())
            .map(|i| 1.0 / (i as f64 + 1.0 + ZIPF_Q))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut zipf = Vec::with_capacity(slots);
        let mut cumulative = 0.0;
        for (i, w) in weights.iter().enumerate() {
            cumulative += w;
            let upto = ((cumulative / total) * slots as f64).round() as usize;
            while zipf.len() < upto.min(slots) {
                zipf.push(i as u16);
            }
        }
        while zipf.len() < slots {
            zipf.push((WORDS.len() - 1) as u16);
        }
        let mut state = 0x5eed_7e47_u64;
        let next = (0..WORDS.len() * SUCCESSORS)
            .map(|_| zipf[(splitmix64(&mut state) as usize) & (slots - 1)])
            .collect();
        let padded = WORDS
            .iter()
            .map(|w| {
                let mut bytes = [0u8; 16];
                let len = w.len().min(16);
                bytes[..len].copy_from_slice(&w.as_bytes()[..len]);
                (bytes, len)
            })
            .collect();
        TextTables { zipf, next, padded }
    })
}

/// Writes one page of prose: Zipf-distributed words that often follow one of
/// their habitual successors, common phrases, repeats of recent word runs,
/// sentences of 4 to 19 words, commas, capitals after a full stop and line
/// breaks.
fn text_page(rng: &mut Rng, s: &mut Scratch) {
    let tables = text_tables();
    let mut bits = Bits::new(rng);
    let mut recent = Recent::new();
    let mut sentence_left = 0u64;
    let mut capital = true;
    let mut prev = 0usize;
    while !s.full() {
        if sentence_left == 0 {
            sentence_left = 4 + bits.take(4);
        }
        let here = s.pos;
        if recent.count >= 16 && bits.chance(ECHO_CHANCE) {
            // Repeat `n` whole recent tokens (with their separators).
            let n = 2 + bits.take(ECHO_LEN_BITS) as usize;
            let span = recent.span(n, bits.take(16) as usize, here);
            recent.record(here);
            let copied = s.copy_back(span.start, span.end);
            if let Some(first) = s.buf.get_mut(copied.start) {
                *first = if capital {
                    first.to_ascii_uppercase()
                } else {
                    first.to_ascii_lowercase()
                };
            }
            let last = s.buf[copied]
                .iter()
                .rev()
                .find(|b| !b.is_ascii_whitespace())
                .copied();
            capital = matches!(last, Some(b'.' | b'?' | b'!'));
            sentence_left = if capital {
                0
            } else {
                sentence_left.saturating_sub(n as u64).max(1)
            };
            continue;
        }
        recent.record(here);
        if bits.chance(PHRASE_CHANCE) {
            let i = bits.take(6).min(bits.take(6)) as usize;
            s.put(PHRASES[i].as_bytes());
        } else {
            prev = if bits.chance(MARKOV_CHANCE) {
                let j = bits.take(2) as usize % SUCCESSORS;
                usize::from(tables.next[prev * SUCCESSORS + j])
            } else {
                usize::from(tables.zipf[bits.take(ZIPF_BITS) as usize])
            };
            let (bytes, len) = tables.padded[prev];
            s.put16(bytes, len);
        }
        if capital {
            if let Some(first) = s.buf.get_mut(here) {
                *first = first.to_ascii_uppercase();
            }
            capital = false;
        }
        sentence_left -= 1;
        if sentence_left == 0 {
            let end = match bits.take(4) {
                0 => b'?',
                1 => b'!',
                _ => b'.',
            };
            match bits.take(3) {
                0 => s.put(&[end, b'\n', b'\n']),
                1 => s.put(&[end, b'\n']),
                _ => s.put(&[end, b' ']),
            }
            capital = true;
        } else {
            match bits.take(4) {
                0 => s.put(b", "),
                1 if bits.take(2) == 0 => s.put(b"; "),
                _ => s.push(b' '),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Code pages
// ---------------------------------------------------------------------------

/// Instruction kinds of the code generator.
#[derive(Clone, Copy)]
enum Op {
    /// `mov r/m, r` / `mov r, r/m` (0x89 / 0x8b).
    Mov,
    /// `lea r, m` (0x8d).
    Lea,
    /// `call rel32` (0xe8).
    Call,
    /// `jmp rel32` (0xe9).
    JmpNear,
    /// `jmp rel8` (0xeb).
    JmpShort,
    /// `jcc rel32` (0x0f 0x8x).
    JccNear,
    /// `jcc rel8` (0x7x).
    JccShort,
    /// `alu r/m, imm8` (0x83).
    AluImm8,
    /// `alu r/m, imm32` (0x81).
    AluImm32,
    /// `xor r, r` (0x31 / 0x33).
    Xor,
    /// `test`/`cmp`/`add`/`sub` register forms.
    AluReg,
    /// `push r` / `pop r` (0x50-0x5f).
    PushPop,
    /// `mov r32, imm32` (0xb8+r).
    MovImm,
    /// `movzx r, r/m8` (0x0f 0xb6).
    Movzx,
    /// Multi-byte nop (0x66 0x0f 0x1f ...).
    Nop,
}

/// Relative weights of the instruction kinds (sum 248; function boundaries
/// and repeats are decided separately).
const OP_WEIGHTS: [(Op, u32); 15] = [
    (Op::Mov, 64),
    (Op::Lea, 18),
    (Op::Call, 18),
    (Op::JmpNear, 4),
    (Op::JmpShort, 8),
    (Op::JccNear, 8),
    (Op::JccShort, 14),
    (Op::AluImm8, 18),
    (Op::AluImm32, 4),
    (Op::Xor, 8),
    (Op::AluReg, 26),
    (Op::PushPop, 18),
    (Op::MovImm, 8),
    (Op::Movzx, 6),
    (Op::Nop, 26),
];

/// Register numbers 0-7 with compiler-like frequencies (rax, rdi, rsi, rdx,
/// rbx, rbp and rcx common; rsp rare outside stack addressing).
const REGS: [u8; 16] = [0, 0, 0, 0, 7, 7, 7, 6, 6, 2, 2, 3, 3, 5, 1, 4];
/// Typical 8-bit displacements (stack slots and struct fields).
const DISP8: [u8; 16] = [
    0x08, 0x10, 0x18, 0x20, 0x08, 0x10, 0xf8, 0xf0, 0xe8, 0x28, 0x30, 0x38, 0x40, 0x48, 0xe0, 0x50,
];
/// Typical 8-bit immediates.
const IMM8: [u8; 16] = [
    0x00, 0x01, 0x00, 0x01, 0x08, 0x10, 0xff, 0x02, 0x04, 0x20, 0x18, 0x03, 0x0f, 0x40, 0x7f, 0x30,
];
/// Register-form ALU opcodes: mostly test, cmp, add and sub.
const ALU_OPS: [u8; 16] = [
    0x85, 0x85, 0x85, 0x39, 0x39, 0x3b, 0x01, 0x01, 0x03, 0x29, 0x2b, 0x21, 0x09, 0x85, 0x39, 0x01,
];
/// Condition codes of conditional jumps (je/jne most common).
const CC: [u8; 16] = [4, 5, 4, 5, 4, 5, 4, 5, 0xc, 0xe, 0xf, 0xd, 2, 3, 6, 7];

/// One pre-assembled instruction (at most 15 bytes): its fixed bytes with
/// its length in the top byte, and the bits that are drawn afresh each time
/// it is emitted (branch targets, some displacements and immediates).
#[derive(Clone, Copy)]
struct Insn {
    bytes: u128,
    random: u128,
}

/// Builder of one [`Insn`].
struct Asm {
    bytes: [u8; 16],
    random: [u8; 16],
    len: usize,
}

impl Asm {
    /// Appends a byte whose bits in `random` are drawn at emission.
    fn byte(&mut self, b: u8, random: u8) {
        if self.len < 15 {
            self.bytes[self.len] = b & !random;
            self.random[self.len] = random;
            self.len += 1;
        }
    }

    fn fixed(&mut self, b: u8) {
        self.byte(b, 0);
    }

    /// Appends a REX prefix for a 64-bit operation most of the time.
    fn rex(&mut self, bits: &mut Bits<'_>) {
        match bits.take(3) {
            0..=4 => self.fixed(0x48),
            5 => self.fixed(0x49),
            6 => self.fixed(0x4c),
            _ => {} // 32-bit operand size, no prefix
        }
    }

    /// Appends a ModRM byte with `reg`, plus the SIB byte and displacement
    /// its addressing mode needs. `mem_only` forbids the register form.
    fn modrm(&mut self, bits: &mut Bits<'_>, reg: u8, mem_only: bool) {
        let md: u8 = match bits.take(3) {
            0..=2 if !mem_only => 3,
            0..=4 => 1,
            5 | 6 => 0,
            _ => 2,
        };
        let rm = bits.pick16(&REGS);
        self.fixed((md << 6) | ((reg & 7) << 3) | rm);
        if md != 3 && rm == 4 {
            self.fixed(0x24); // SIB: [rsp]
        }
        match md {
            1 if bits.take(3) == 0 => self.byte(0, 0xff),
            1 => {
                let d = bits.pick16(&DISP8);
                self.fixed(d);
            }
            2 => self.disp32(),
            0 if rm == 5 => self.rel32(bits), // RIP-relative
            _ => {}
        }
    }

    /// Appends a 32-bit displacement of a plausible size (a multiple of 8
    /// below 4096: a larger struct offset).
    fn disp32(&mut self) {
        self.byte(0, 0xf8);
        self.byte(0, 0x0f);
        self.fixed(0);
        self.fixed(0);
    }

    /// Appends a random-ish rel32: a signed offset within +-1 MiB.
    fn rel32(&mut self, bits: &mut Bits<'_>) {
        let sign = if bits.take(1) == 0 { 0x00 } else { 0xff };
        self.byte(0, 0xff);
        self.byte(0, 0xff);
        self.byte(sign, 0x0f);
        self.fixed(sign);
    }

    /// Appends a 32-bit immediate: mostly small constants, sometimes -1.
    fn imm32(&mut self, bits: &mut Bits<'_>) {
        match bits.take(2) {
            0 | 1 => {
                self.byte(0, 0xff);
                self.fixed(0);
            }
            2 => {
                self.byte(0, 0xf0);
                self.byte(0, 0x0f);
            }
            _ => {
                self.fixed(0xff);
                self.fixed(0xff);
            }
        }
        let high = if self.bytes[self.len.saturating_sub(1)] == 0xff {
            0xff
        } else {
            0
        };
        self.fixed(high);
        self.fixed(high);
    }

    /// Assembles one instruction of kind `op`.
    fn assemble(op: Op, bits: &mut Bits<'_>) -> Insn {
        let mut a = Asm {
            bytes: [0; 16],
            random: [0; 16],
            len: 0,
        };
        match op {
            Op::Mov => {
                a.rex(bits);
                a.fixed(if bits.take(1) == 0 { 0x89 } else { 0x8b });
                let reg = bits.pick16(&REGS);
                a.modrm(bits, reg, false);
            }
            Op::Lea => {
                a.fixed(if bits.take(2) == 0 { 0x4c } else { 0x48 });
                a.fixed(0x8d);
                let reg = bits.pick16(&REGS);
                a.modrm(bits, reg, true);
            }
            Op::Call => {
                a.fixed(0xe8);
                a.rel32(bits);
            }
            Op::JmpNear => {
                a.fixed(0xe9);
                a.rel32(bits);
            }
            Op::JmpShort => {
                a.fixed(0xeb);
                a.byte(0, 0x7f);
            }
            Op::JccNear => {
                a.fixed(0x0f);
                a.fixed(0x80 | bits.pick16(&CC));
                a.byte(0, 0xff);
                a.byte(0, 0x0f);
                a.fixed(0);
                a.fixed(0);
            }
            Op::JccShort => {
                a.fixed(0x70 | bits.pick16(&CC));
                a.byte(0, 0x7f);
            }
            Op::AluImm8 => {
                a.rex(bits);
                a.fixed(0x83);
                let ext = [0u8, 5, 7, 4, 0, 5, 7, 1][bits.take(3) as usize];
                a.modrm(bits, ext, false);
                let imm = bits.pick16(&IMM8);
                a.fixed(imm);
            }
            Op::AluImm32 => {
                a.rex(bits);
                a.fixed(0x81);
                let ext = [0u8, 5, 7, 4][bits.take(2) as usize];
                a.modrm(bits, ext, false);
                a.imm32(bits);
            }
            Op::Xor => {
                if bits.take(1) == 0 {
                    a.fixed(0x45);
                }
                a.fixed(if bits.take(2) == 0 { 0x33 } else { 0x31 });
                let r = bits.pick16(&REGS);
                a.fixed(0xc0 | (r << 3) | r);
            }
            Op::AluReg => {
                a.rex(bits);
                a.fixed(bits.pick16(&ALU_OPS));
                let reg = bits.pick16(&REGS);
                a.modrm(bits, reg, false);
            }
            Op::PushPop => {
                if bits.take(2) == 0 {
                    a.fixed(0x41);
                }
                let base = if bits.take(1) == 0 { 0x50 } else { 0x58 };
                a.fixed(base | bits.pick16(&REGS));
            }
            Op::MovImm => {
                a.fixed(0xb8 | bits.pick16(&REGS));
                a.imm32(bits);
            }
            Op::Movzx => {
                a.fixed(0x0f);
                a.fixed(if bits.take(2) == 0 { 0xb7 } else { 0xb6 });
                let reg = bits.pick16(&REGS);
                a.modrm(bits, reg, false);
            }
            Op::Nop => match bits.take(2) {
                0 => [0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00]
                    .iter()
                    .for_each(|&b| a.fixed(b)),
                1 => [0x0f, 0x1f, 0x40, 0x00].iter().for_each(|&b| a.fixed(b)),
                2 => [0x0f, 0x1f, 0x44, 0x00, 0x00]
                    .iter()
                    .for_each(|&b| a.fixed(b)),
                _ => a.fixed(0x90),
            },
        }
        a.bytes[15] = a.len as u8;
        Insn {
            bytes: u128::from_le_bytes(a.bytes),
            random: u128::from_le_bytes(a.random),
        }
    }
}

/// log2 of the number of pre-assembled instructions.
const POOL_BITS: u32 = 13;

/// Pre-assembled instructions, drawn with the frequencies of
/// [`OP_WEIGHTS`] (so common instructions appear many times). Emitting one
/// is a table lookup plus fresh random fields, which keeps code generation
/// fast.
fn insn_pool() -> &'static [Insn] {
    static POOL: OnceLock<Vec<Insn>> = OnceLock::new();
    POOL.get_or_init(|| {
        let total: u64 = OP_WEIGHTS.iter().map(|&(_, w)| u64::from(w)).sum();
        let mut rng = Rng::new(0x00c0_de0f_c0de);
        let mut bits = Bits::new(&mut rng);
        (0..1usize << POOL_BITS)
            .map(|i| {
                // Stratified: slot i of the pool gets the kind whose
                // cumulative weight covers i.
                let target = (i as u64 * total) >> POOL_BITS;
                let mut acc = 0;
                let mut op = Op::Nop;
                for &(o, w) in &OP_WEIGHTS {
                    acc += u64::from(w);
                    if target < acc {
                        op = o;
                        break;
                    }
                }
                Asm::assemble(op, &mut bits)
            })
            .collect()
    })
}

/// Common prologues (function entry after padding).
const PROLOGUES: [&[u8]; 4] = [
    &[0x55, 0x48, 0x89, 0xe5],
    &[0x41, 0x57, 0x41, 0x56, 0x53],
    &[0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5],
    &[0x53, 0x48, 0x83, 0xec, 0x20],
];
/// Common epilogues (just before `ret`).
const EPILOGUES: [&[u8]; 4] = [&[0x5d], &[0x5b, 0x41, 0x5e, 0x41, 0x5f], &[0xc9], &[]];

/// Probability (out of 256) that the next instructions repeat a recent run.
const CODE_ECHO_CHANCE: u64 = 37;
/// A repeat covers `1 .. 1 + 2^CODE_ECHO_LEN_BITS` instructions.
const CODE_ECHO_LEN_BITS: u32 = 2;
/// Probability (out of 256) that a function ends (epilogue, `ret`,
/// alignment padding, next prologue).
const RET_CHANCE: u64 = 8;

/// Writes one page of plausible x86-64 instructions.
fn code_page(rng: &mut Rng, s: &mut Scratch) {
    let pool = insn_pool();
    let mut bits = Bits::new(rng);
    let mut recent = Recent::new();
    while !s.full() {
        let here = s.pos;
        let roll = bits.take(8);
        if roll < CODE_ECHO_CHANCE && recent.count >= 8 {
            // Repeat a recent run of instructions (compilers repeat idioms).
            let n = 1 + bits.take(CODE_ECHO_LEN_BITS) as usize;
            let span = recent.span(n, bits.take(16) as usize, here);
            recent.record(here);
            s.copy_back(span.start, span.end);
            continue;
        }
        recent.record(here);
        if (CODE_ECHO_CHANCE..CODE_ECHO_CHANCE + RET_CHANCE).contains(&roll) {
            s.put(EPILOGUES[bits.take(2) as usize]);
            s.push(0xc3);
            let pad = if bits.take(1) == 0 { 0xcc } else { 0x90 };
            while !s.pos.is_multiple_of(16) && !s.full() {
                s.push(pad);
            }
            s.put(PROLOGUES[bits.take(2) as usize]);
        } else {
            let insn = pool[bits.take(POOL_BITS) as usize];
            let r = u128::from(bits.word());
            let v = insn.bytes | ((r | (r << 64)) & insn.random);
            // The length byte lands past the instruction and is overwritten.
            s.put16(v.to_le_bytes(), (insn.bytes >> 120) as usize);
        }
    }
}

// ---------------------------------------------------------------------------
// Pages
// ---------------------------------------------------------------------------

/// Fills `out` (any length; normally one 4096-byte page) with content of
/// `class`, drawing randomness from `rng`. A non-zero class never produces
/// an all-zero buffer (unless `out` is empty).
pub fn fill_page(class: PageClass, rng: &mut Rng, out: &mut [u8]) {
    match class {
        PageClass::Zero => {
            out.fill(0);
            return;
        }
        PageClass::Text => fill_chunked(rng, out, text_page),
        PageClass::Code => fill_chunked(rng, out, code_page),
        PageClass::Random => rng.fill_bytes(out),
    }
    if out.iter().all(|&b| b == 0)
        && let Some(first) = out.first_mut()
    {
        *first = 1;
    }
}

/// Dirties one page the way a running guest would between two copies:
/// changes `k` distinct aligned 8-byte little-endian words, `k` uniform in
/// `1..=8` (at most the number of words in `page`), each increased (wrapping)
/// by a value uniform in `1..=65535`, like counters.
pub fn dirty_page(rng: &mut Rng, page: &mut [u8]) {
    let words = page.len() / 8;
    if words == 0 {
        return;
    }
    let k = ((1 + rng.below(8)) as usize).min(words);
    let mut chosen = [0usize; 8];
    let mut n = 0;
    while n < k {
        let w = rng.below(words as u64) as usize;
        if chosen[..n].contains(&w) {
            continue;
        }
        chosen[n] = w;
        n += 1;
        let slot = &mut page[w * 8..w * 8 + 8];
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(slot);
        let delta = 1 + rng.below(65535);
        let new = u64::from_le_bytes(bytes).wrapping_add(delta);
        slot.copy_from_slice(&new.to_le_bytes());
    }
}

// ---------------------------------------------------------------------------
// Corpus
// ---------------------------------------------------------------------------

/// A synthetic memory image: whole 4 KiB pages and the class of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corpus {
    /// The image, `page_count() * 4096` bytes.
    pub data: Vec<u8>,
    /// The class of each page, in order.
    pub classes: Vec<PageClass>,
    /// The seed the corpus was generated from.
    pub seed: u64,
}

/// Generates a corpus of `size` bytes rounded down to whole 4 KiB pages (at
/// least one page if `size > 0`). The number of pages of each class follows
/// `mix` exactly (see [`ClassMix::page_counts`]), the pages are in a seeded
/// random order, and the result depends only on `(size, mix, seed)`.
pub fn generate(size: usize, mix: ClassMix, seed: u64) -> Corpus {
    let pages = if size == 0 { 0 } else { (size / PAGE).max(1) };
    let counts = mix.page_counts(pages);
    let mut classes = Vec::with_capacity(pages);
    for (class, &count) in PageClass::ALL.iter().zip(counts.iter()) {
        classes.extend(std::iter::repeat_n(*class, count));
    }
    let mut rng = Rng::new(seed);
    for i in (1..pages).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        classes.swap(i, j);
    }
    let mut data = vec![0u8; pages * PAGE];
    for (page, &class) in data.chunks_exact_mut(PAGE).zip(classes.iter()) {
        fill_page(class, &mut rng, page);
    }
    Corpus {
        data,
        classes,
        seed,
    }
}

impl Corpus {
    /// Number of 4 KiB pages.
    pub fn page_count(&self) -> usize {
        self.classes.len()
    }

    /// Page `i` (4096 bytes). Panics if `i >= page_count()`.
    pub fn page(&self, i: usize) -> &[u8] {
        &self.data[i * PAGE..(i + 1) * PAGE]
    }

    /// Indices of the pages whose class is not [`PageClass::Zero`], ascending.
    pub fn nonzero_indices(&self) -> Vec<usize> {
        self.classes
            .iter()
            .enumerate()
            .filter(|(_, c)| **c != PageClass::Zero)
            .map(|(i, _)| i)
            .collect()
    }

    /// The non-zero pages concatenated in order.
    pub fn nonzero_pages(&self) -> Vec<u8> {
        let indices = self.nonzero_indices();
        let mut out = Vec::with_capacity(indices.len() * PAGE);
        for i in indices {
            out.extend_from_slice(self.page(i));
        }
        out
    }

    /// Number of pages of each class, in the order of [`PageClass::ALL`].
    pub fn class_counts(&self) -> [(PageClass, usize); 4] {
        let mut counts = PageClass::ALL.map(|c| (c, 0usize));
        for &class in &self.classes {
            if let Some(entry) = counts.iter_mut().find(|(c, _)| *c == class) {
                entry.1 += 1;
            }
        }
        counts
    }

    /// A copy of `data` in which every non-zero page has been dirtied with
    /// [`dirty_page`] (seeded by `seed`); zero pages are unchanged.
    pub fn dirtied(&self, seed: u64) -> Vec<u8> {
        let mut out = self.data.clone();
        let mut rng = Rng::new(seed);
        for (page, &class) in out.chunks_exact_mut(PAGE).zip(self.classes.iter()) {
            if class != PageClass::Zero {
                dirty_page(&mut rng, page);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Aggregate LZ4 ratio of `pages` pages of `class`, each compressed alone.
    fn lz4_ratio(class: PageClass, pages: usize, seed: u64) -> f64 {
        let mut rng = Rng::new(seed);
        let mut page = vec![0u8; PAGE];
        let mut compressed = 0usize;
        for _ in 0..pages {
            fill_page(class, &mut rng, &mut page);
            compressed += lz4_flex::block::compress(&page).len();
        }
        (pages * PAGE) as f64 / compressed as f64
    }

    #[test]
    fn lz4_ratios_are_pinned() {
        for seed in [1u64, 0xdead_beef] {
            let text = lz4_ratio(PageClass::Text, 2000, seed);
            let code = lz4_ratio(PageClass::Code, 2000, seed);
            let random = lz4_ratio(PageClass::Random, 2000, seed);
            assert!((1.9..=2.3).contains(&text), "text ratio {text}");
            assert!((1.4..=1.6).contains(&code), "code ratio {code}");
            assert!(random <= 1.0, "random ratio {random}");
        }
    }

    #[test]
    fn deterministic() {
        let a = generate(1 << 20, ClassMix::STANDARD, 7);
        let b = generate(1 << 20, ClassMix::STANDARD, 7);
        let c = generate(1 << 20, ClassMix::STANDARD, 8);
        assert_eq!(a, b);
        assert_ne!(a.data, c.data);
        assert_eq!(a.dirtied(3), b.dirtied(3));
        assert_ne!(a.dirtied(3), a.dirtied(4));
    }

    #[test]
    fn sizes_round_to_pages() {
        assert_eq!(generate(0, ClassMix::STANDARD, 1).page_count(), 0);
        assert_eq!(generate(1, ClassMix::STANDARD, 1).page_count(), 1);
        assert_eq!(
            generate(3 * PAGE + 5, ClassMix::STANDARD, 1).page_count(),
            3
        );
        let c = generate(3 * PAGE + 5, ClassMix::STANDARD, 1);
        assert_eq!(c.data.len(), 3 * PAGE);
    }

    #[test]
    fn exact_class_counts() {
        let c = generate(1000 * PAGE, ClassMix::STANDARD, 42);
        assert_eq!(
            c.class_counts(),
            [
                (PageClass::Zero, 500),
                (PageClass::Text, 200),
                (PageClass::Code, 200),
                (PageClass::Random, 100),
            ]
        );
        assert_eq!(
            ClassMix::MIGRATION_WORKING_SET.page_counts(10),
            [5, 3, 0, 2]
        );
        // 7 pages at 50/20/20/10: quotas 3.5/1.4/1.4/0.7 -> 4/1/1/1.
        assert_eq!(ClassMix::STANDARD.page_counts(7), [4, 1, 1, 1]);
        for n in 0..50 {
            let counts = ClassMix::MIGRATION_WORKING_SET.page_counts(n);
            assert_eq!(counts.iter().sum::<usize>(), n);
            assert_eq!(counts[2], 0);
        }
        let none = ClassMix {
            zero: 0,
            text: 0,
            code: 0,
            random: 0,
        };
        assert_eq!(none.page_counts(5), [5, 0, 0, 0]);
        // The shuffle mixes the classes rather than leaving them in blocks.
        assert!(c.classes[..500].iter().any(|&k| k != PageClass::Zero));
    }

    #[test]
    fn contents_match_classes() {
        let c = generate(600 * PAGE, ClassMix::STANDARD, 5);
        for (i, &class) in c.classes.iter().enumerate() {
            let page = c.page(i);
            let zero = page.iter().all(|&b| b == 0);
            assert_eq!(zero, class == PageClass::Zero, "page {i} ({class:?})");
            match class {
                PageClass::Text => assert!(
                    page.iter()
                        .all(|&b| b.is_ascii_alphabetic() || b" .,;?!\n".contains(&b)),
                    "page {i} is not text"
                ),
                PageClass::Code => {
                    assert!(page.iter().filter(|&&b| b == 0x48).count() > 40);
                    assert!(page.contains(&0xe8));
                }
                PageClass::Random => {
                    let mut seen = [false; 256];
                    page.iter().for_each(|&b| seen[usize::from(b)] = true);
                    assert!(seen.iter().filter(|&&x| x).count() > 230);
                }
                PageClass::Zero => {}
            }
        }
        let nz = c.nonzero_indices();
        assert_eq!(nz.len(), 300);
        let pages = c.nonzero_pages();
        assert_eq!(pages.len(), nz.len() * PAGE);
        for (k, &i) in nz.iter().enumerate() {
            assert_eq!(&pages[k * PAGE..(k + 1) * PAGE], c.page(i));
        }
    }

    #[test]
    fn small_buffers_are_never_zero() {
        let mut rng = Rng::new(9);
        for class in [PageClass::Text, PageClass::Code, PageClass::Random] {
            for len in [8usize, 16, 64, 4096] {
                for _ in 0..200 {
                    let mut buf = vec![0u8; len];
                    fill_page(class, &mut rng, &mut buf);
                    assert!(buf.iter().any(|&b| b != 0), "{class:?} len {len}");
                }
            }
        }
    }

    #[test]
    fn dirtied_changes_few_counter_words() {
        let c = generate(400 * PAGE, ClassMix::STANDARD, 11);
        let d = c.dirtied(12);
        assert_eq!(d.len(), c.data.len());
        let mut seen_k = [false; 9];
        for (i, &class) in c.classes.iter().enumerate() {
            let old = c.page(i);
            let new = &d[i * PAGE..(i + 1) * PAGE];
            if class == PageClass::Zero {
                assert_eq!(old, new);
                continue;
            }
            let mut changed = 0;
            for (o, n) in old.chunks_exact(8).zip(new.chunks_exact(8)) {
                let mut ob = [0u8; 8];
                let mut nb = [0u8; 8];
                ob.copy_from_slice(o);
                nb.copy_from_slice(n);
                let diff = u64::from_le_bytes(nb).wrapping_sub(u64::from_le_bytes(ob));
                if diff != 0 {
                    changed += 1;
                    assert!((1..=65535).contains(&diff), "page {i} diff {diff}");
                }
            }
            assert!((1..=8).contains(&changed), "page {i} changed {changed}");
            seen_k[changed] = true;
        }
        assert!(seen_k[1..].iter().all(|&s| s), "k not spread: {seen_k:?}");
    }

    #[test]
    fn dirty_page_handles_tiny_pages() {
        let mut rng = Rng::new(1);
        for len in [0usize, 4, 8, 16, 24] {
            let mut page = vec![0u8; len];
            dirty_page(&mut rng, &mut page);
            if len >= 8 {
                assert!(page.iter().any(|&b| b != 0));
            }
        }
    }

    #[test]
    fn rng_basics() {
        let mut a = Rng::new(0);
        let mut b = Rng::new(0);
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(Rng::new(0).next_u64(), Rng::new(1).next_u64());
        let mut hist = [0u32; 10];
        for _ in 0..10_000 {
            let v = a.below(10);
            assert!(v < 10);
            hist[v as usize] += 1;
        }
        assert!(hist.iter().all(|&h| (800..1200).contains(&h)), "{hist:?}");
        assert_eq!(a.below(0), 0);
        let mut buf = [0u8; 13];
        a.fill_bytes(&mut buf);
        assert!(buf.iter().any(|&x| x != 0));
    }
}
