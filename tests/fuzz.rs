//! Fuzzes every decoder of untrusted input (frames, hello, welcome, failure and batch payloads,
//! the all-rank modes' messages, typical payload types): random mutations of valid messages,
//! for `CMAN_FUZZ_SECONDS` (default 3; `scripts/fuzz.sh SECONDS` for long runs). A decoder
//! must never panic, and never allocate more than a small multiple of the bytes it was given:
//! the allocator below aborts, printing the input, on any single allocation past that bound.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use clusterman::fuzzing::{decode_untrusted, sample_messages};

/// Largest allocation allowed while decoding `n` bytes.
fn bound(n: usize) -> usize {
    32 * n + (2 << 20)
}

thread_local! {
    /// Set while decoding: the bound in force and where the input is.
    static GUARD: Cell<Option<(usize, *const u8, usize)>> = const { Cell::new(None) };
}

struct Bounded;

// SAFETY: delegates to the system allocator; only inspects sizes.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn check(size: usize) {
    let Ok(Some((limit, input, len))) = GUARD.try_with(Cell::get) else { return };
    if size > limit {
        GUARD.with(|g| g.set(None));
        // SAFETY: `input` points at the `len` bytes being decoded (set by `decode`).
        let bytes = unsafe { std::slice::from_raw_parts(input, len) };
        eprintln!("ALLOCATION OF {size} BYTES decoding {len} bytes (limit {limit}); input: {}", hex(bytes));
        std::process::abort();
    }
}

#[global_allocator]
static ALLOCATOR: Bounded = Bounded;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// xorshift64*
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Lengths a liar would claim.
const INTERESTING: [u64; 10] = [0, 1, 0x7f, 0xff, 0xffff, 0xffff_ffff, 1 << 31, 1 << 40, 1 << 60, u64::MAX];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(6) {
        let len = input.len();
        match rng.below(7) {
            0 if len > 0 => {
                let at = rng.below(len);
                input[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                input[at] = rng.next() as u8;
            }
            2 if len >= 8 => {
                let at = rng.below(len - 7);
                let v = INTERESTING[rng.below(INTERESTING.len())];
                input[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            3 if len >= 4 => {
                let at = rng.below(len - 3);
                let v = INTERESTING[rng.below(INTERESTING.len())] as u32;
                input[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(16));
                input.drain(at..at + n);
            }
            5 => {
                let at = rng.below(len + 1);
                let n = rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(at..at, bytes);
            }
            _ => {
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let at = rng.below(len + 1);
                    input.truncate(at);
                    input.extend_from_slice(&other[from..]);
                }
            }
        }
    }
}

fn decode(bytes: &[u8]) {
    GUARD.with(|g| g.set(Some((bound(bytes.len()), bytes.as_ptr(), bytes.len()))));
    let outcome = std::panic::catch_unwind(|| decode_untrusted(bytes));
    GUARD.with(|g| g.set(None));
    if outcome.is_err() {
        eprintln!("PANIC decoding {} bytes: {}", bytes.len(), hex(bytes));
        std::process::exit(1);
    }
}

fn main() {
    let seconds: u64 = std::env::var("CMAN_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let seed: u64 = std::env::var("CMAN_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1
    });
    let corpus = sample_messages();
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut runs = 0u64;
    for sample in &corpus {
        decode(sample);
    }
    while started.elapsed() < Duration::from_secs(seconds) {
        for _ in 0..256 {
            let mut input = corpus[rng.below(corpus.len())].clone();
            mutate(&mut rng, &mut input, &corpus);
            decode(&input);
            runs += 1;
        }
    }
    eprintln!("fuzz: {runs} inputs in {:.0?} (seed {seed}): no panic, no allocation past 32 × input + 2 MiB", started.elapsed());
    println!("test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
}
