//! Drawing the next token from a row of logits: temperature, then nucleus
//! (`top_p`), then a seeded random draw.
//!
//! Why not llama.cpp's sampler chain: it copies the whole vocabulary into a
//! candidate array and takes an exponential of every logit for every token of
//! every sequence. Gemma's vocabulary has 262,144 entries, and this runs on the
//! engine thread between two decode steps while llama.cpp's own threads wait,
//! once per sequence per step. Here every pass over the vocabulary is written
//! lane by lane, without branches, so that the compiler vectorises it: one
//! finds the largest logit; a second weighs every token, `exp((l − max) / T)`
//! with an exponential of our own ([`exp_lanes`]), zero for those more than
//! `CUTOFF` nats below the best (together less than 2 × 10⁻⁸ of the total even
//! with every vocabulary entry counted), and sums the weights per block of
//! [`BLOCK`] tokens; the draw then walks the block sums and one block. Only a
//! nucleus (`top_p` < 1) sorts anything, and only the tokens heavy enough to be
//! in it. Buffers are reused between tokens. Measured: docs/benchmarks.md
//! ("The sampler in vector lanes").

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::params::Sampling;

/// Logits more than this many nats (after temperature) below the best are
/// left out: e^-30 ≈ 9 × 10⁻¹⁴ of the best token's weight each.
const CUTOFF: f32 = 30.0;

/// Lanes of the vectorised loops: 16 floats, four SSE2 registers (two AVX2
/// ones), so several are in flight at once.
const LANES: usize = 16;

/// Tokens per block sum: the draw walks 1,024 sums for Gemma's vocabulary,
/// then at most this many weights.
const BLOCK: usize = 256;

pub struct Sampler {
    inv_temperature: f32,
    top_p: f32,
    rng: StdRng,
    /// Weight of every token of the last row of logits (0 for those left out).
    weights: Vec<f32>,
    /// Sum of each [`BLOCK`] of `weights`.
    block_sums: Vec<f32>,
    /// (token, weight) of the nucleus, when `top_p` < 1.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// `None` for greedy decoding, which needs no sampler.
    pub fn new(s: &Sampling) -> Option<Sampler> {
        if s.is_greedy() {
            return None;
        }
        let seed = s.seed.map_or_else(rand::random, u64::from);
        Some(Sampler {
            inv_temperature: 1.0 / s.temperature,
            top_p: s.top_p,
            rng: StdRng::seed_from_u64(seed),
            weights: Vec::new(),
            block_sums: Vec::new(),
            candidates: Vec::new(),
        })
    }

    /// The next token id.
    pub fn sample(&mut self, logits: &[f32]) -> i32 {
        let max = max_logit(logits);
        if !max.is_finite() {
            return to_id(first_of(logits, max));
        }
        let total = self.weigh(logits, max);
        if self.top_p < 1.0 {
            return self.sample_nucleus(total);
        }
        let target = self.rng.gen::<f64>() * total;
        to_id(self.draw(target))
    }

    /// Fills `weights` and `block_sums` for `logits`; returns the total weight.
    fn weigh(&mut self, logits: &[f32], max: f32) -> f64 {
        self.weights.resize(logits.len(), 0.0);
        self.block_sums.clear();
        let (weights, sums, scale) = (&mut self.weights[..], &mut self.block_sums, self.inv_temperature);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { avx2::weigh(weights, sums, logits, max, scale) };
        }
        weigh_lanes(weights, sums, logits, max, scale)
    }

    /// The token at which the running sum of weights passes `target`
    /// (0 ≤ `target` < total): never one of weight 0.
    fn draw(&self, mut target: f64) -> usize {
        for (b, &sum) in self.block_sums.iter().enumerate() {
            let sum = f64::from(sum);
            if target < sum {
                let start = b * BLOCK;
                let block = &self.weights[start..(start + BLOCK).min(self.weights.len())];
                for (i, &w) in block.iter().enumerate() {
                    target -= f64::from(w);
                    if w > 0.0 && target < 0.0 {
                        return start + i;
                    }
                }
                // Rounding between the block's sum and its weights: its last token that counts.
                if let Some(i) = block.iter().rposition(|&w| w > 0.0) {
                    return start + i;
                }
            }
            target -= sum;
        }
        // Rounding left the draw past the end: the last token that counts.
        self.weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
    }

    /// Draws from the smallest set of most likely tokens whose share of the
    /// total reaches `top_p`. Only tokens of weight at least `bound` (relative
    /// to the best, which weighs 1) are collected and sorted; when they do not
    /// reach the share, the bound is lowered and they are collected again.
    fn sample_nucleus(&mut self, total: f64) -> i32 {
        let goal = f64::from(self.top_p) * total;
        let mut bound = 1e-3f32;
        loop {
            self.candidates.clear();
            let mut heavy = 0.0f64;
            for (i, &w) in self.weights.iter().enumerate() {
                if w >= bound && w > 0.0 {
                    heavy += f64::from(w);
                    self.candidates.push((i as u32, w));
                }
            }
            if heavy >= goal || bound == 0.0 {
                break;
            }
            bound = if bound > 1e-12 { bound * 1e-3 } else { 0.0 };
        }
        self.candidates
            .sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut sum = 0.0f64;
        let mut len = 0;
        for &(_, w) in &self.candidates {
            sum += f64::from(w);
            len += 1;
            if sum >= goal {
                break;
            }
        }
        self.candidates.truncate(len.max(1));
        let mut target = self.rng.gen::<f64>() * sum;
        for &(token, w) in &self.candidates {
            target -= f64::from(w);
            if target < 0.0 {
                return to_id(token as usize);
            }
        }
        self.candidates.last().map_or(0, |&(t, _)| to_id(t as usize))
    }
}

/// The weight of a logit `l`: `exp((l − max) · scale)`, or 0 when that is
/// more than `CUTOFF` nats below the best (NaN and −∞ included). Branch-free,
/// so that loops over it vectorise.
#[inline(always)]
fn weight(l: f32, max: f32, scale: f32) -> f32 {
    let x = (l - max) * scale;
    let w = exp_lanes(x.max(-CUTOFF - 1.0));
    if x >= -CUTOFF {
        w
    } else {
        0.0
    }
}

/// `e^x` for x in [−87, 0], within 5 × 10⁻⁷ of `f32::exp` (relative; a test checks),
/// branch-free: x = n·ln 2 + r with n whole and |r| ≤ ln 2 / 2, then
/// `e^r` by its degree-7 Taylor polynomial and `2^n` straight into the
/// exponent bits. Whole numbers are rounded by adding 1.5 × 2²³, which
/// needs no rounding instruction (the node is built for plain x86-64, SSE2).
#[inline(always)]
fn exp_lanes(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two, so that n · LN2_HI is exact for the n used here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0;
    let t = x * LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    // e^r = 1 + r + r²/2! + … + r⁷/7!, Horner's rule.
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // The low bits of t hold n (+ 2²² from ROUND's 1.5): 2^n as a float.
    let whole = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    p * f32::from_bits((whole.wrapping_add(127) << 23) as u32)
}

/// The largest logit, NaN left out (−∞ when there is none).
fn max_logit(logits: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2::max_logit(logits) };
    }
    max_lanes(logits)
}

/// [`max_logit`], written lane by lane so that it compiles to vector max
/// instructions.
#[inline(always)]
fn max_lanes(logits: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let blocks = logits.chunks_exact(LANES);
    let tail = blocks.remainder();
    for block in blocks {
        for (m, &l) in lanes.iter_mut().zip(block) {
            *m = if l > *m { l } else { *m };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &l in lanes.iter().chain(tail) {
        if l > max {
            max = l;
        }
    }
    max
}

/// Weighs every logit of `logits` into `weights` (as long) and appends
/// the sum of each [`BLOCK`] to `block_sums`; returns the total. Lane by
/// lane, so that it vectorises.
#[inline(always)]
fn weigh_lanes(weights: &mut [f32], block_sums: &mut Vec<f32>, logits: &[f32], max: f32, scale: f32) -> f64 {
    let mut total = 0.0f64;
    for (w, l) in weights.chunks_mut(BLOCK).zip(logits.chunks(BLOCK)) {
        let mut sums = [0.0f32; LANES];
        let mut wl = w.chunks_exact_mut(LANES);
        let mut ll = l.chunks_exact(LANES);
        for (w, l) in (&mut wl).zip(&mut ll) {
            for ((w, &l), sum) in w.iter_mut().zip(l).zip(sums.iter_mut()) {
                *w = weight(l, max, scale);
                *sum += *w;
            }
        }
        let mut block: f32 = sums.iter().sum();
        for (w, &l) in wl.into_remainder().iter_mut().zip(ll.remainder()) {
            *w = weight(l, max, scale);
            block += *w;
        }
        block_sums.push(block);
        total += f64::from(block);
    }
    total
}

/// The two passes over the whole vocabulary compiled again for AVX2: eight
/// floats to a register instead of SSE2's four. The node is built for plain
/// x86-64, and these are chosen at run time where the CPU has AVX2. The
/// arithmetic is the same, operation for operation (Rust fuses no
/// multiply-add on its own), so both give the same bits and the same draws.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2")]
    pub(super) fn max_logit(logits: &[f32]) -> f32 {
        super::max_lanes(logits)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn weigh(weights: &mut [f32], block_sums: &mut Vec<f32>, logits: &[f32], max: f32, scale: f32) -> f64 {
        super::weigh_lanes(weights, block_sums, logits, max, scale)
    }
}

/// Index of the first logit equal to `max` (0 when none is): for rows whose
/// best logit is not finite, which need no weights.
fn first_of(logits: &[f32], max: f32) -> usize {
    logits.iter().position(|&l| l == max).unwrap_or(0)
}

/// Index of the largest logit; ties go to the lower token id, as in llama.cpp.
/// One scalar pass: for greedy decoding, which needs nothing else.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

fn to_id(i: usize) -> i32 {
    i32::try_from(i).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f32, top_p: f32, seed: u32) -> Sampling {
        Sampling {
            temperature,
            top_p,
            seed: Some(seed),
        }
    }

    fn counts(s: &Sampling, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut sampler = Sampler::new(s).unwrap();
        let mut n = vec![0; logits.len()];
        for _ in 0..draws {
            n[sampler.sample(logits) as usize] += 1;
        }
        n
    }

    #[test]
    fn argmax_prefers_the_first_of_equal_logits() {
        assert_eq!(argmax(&[0.0, 2.0, 1.0, 2.0]), 1);
        assert_eq!(argmax(&[5.0]), 0);
    }

    #[test]
    fn greedy_needs_no_sampler() {
        assert!(Sampler::new(&sampling(0.0, 1.0, 1)).is_none());
    }

    #[test]
    fn draws_follow_the_softmax() {
        // ln(1), ln(2), ln(3), ln(4): probabilities 0.1, 0.2, 0.3, 0.4 at T = 1.
        let logits = [0.0f32, 2f32.ln(), 3f32.ln(), 4f32.ln()];
        let n = counts(&sampling(1.0, 1.0, 7), &logits, 100_000);
        for (i, want) in [0.1, 0.2, 0.3, 0.4].iter().enumerate() {
            let got = n[i] as f64 / 100_000.0;
            assert!((got - want).abs() < 0.01, "token {i}: {got} vs {want}");
        }
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [0.0f32, 1.0];
        // T = 0.5 doubles the gap: p(1) = e² / (1 + e²) ≈ 0.881.
        let sharp = counts(&sampling(0.5, 1.0, 3), &logits, 50_000);
        assert!((sharp[1] as f64 / 50_000.0 - 0.881).abs() < 0.01);
        // T = 2 halves it: p(1) = e^0.5 / (1 + e^0.5) ≈ 0.622.
        let flat = counts(&sampling(2.0, 1.0, 3), &logits, 50_000);
        assert!((flat[1] as f64 / 50_000.0 - 0.622).abs() < 0.01);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // 0.1, 0.2, 0.3, 0.4: top_p 0.6 keeps 0.4 and 0.3 (0.7 ≥ 0.6), renormalised.
        let logits = [0.0f32, 2f32.ln(), 3f32.ln(), 4f32.ln()];
        let n = counts(&sampling(1.0, 0.6, 11), &logits, 70_000);
        assert_eq!(n[0] + n[1], 0, "{n:?}");
        assert!((n[3] as f64 / 70_000.0 - 4.0 / 7.0).abs() < 0.01, "{n:?}");
        // A tiny top_p is greedy.
        let n = counts(&sampling(1.0, 0.01, 11), &logits, 1_000);
        assert_eq!(n[3], 1_000);
    }

    #[test]
    fn the_same_seed_gives_the_same_draws() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(&sampling(0.8, 0.95, seed)).unwrap();
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn far_below_the_best_is_never_drawn_and_odd_logits_are_safe() {
        let mut logits = vec![-1000.0f32; 262_144];
        logits[5] = 10.0;
        logits[9] = 10.0;
        let n = counts(&sampling(1.0, 1.0, 5), &logits, 200);
        assert_eq!(n[5] + n[9], 200);
        assert!(n[5] > 60 && n[9] > 60, "{} {}", n[5], n[9]);
        let mut s = Sampler::new(&sampling(1.0, 1.0, 5)).unwrap();
        assert_eq!(s.sample(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(s.sample(&[0.0, f32::INFINITY]), 1);
        assert_eq!(s.sample(&[]), 0);
    }

    #[test]
    fn the_lane_exponential_matches_the_library_one() {
        let mut worst = 0.0f64;
        for k in 0..=310_000 {
            let x = -(k as f32) * 1e-4;
            let (ours, std) = (f64::from(exp_lanes(x)), f64::from(x.exp()));
            worst = worst.max(((ours - std) / std).abs());
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_lanes(0.0), 1.0);
        assert!((f64::from(exp_lanes(-87.0)) / f64::from((-87.0f32).exp()) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn weights_leave_out_what_is_too_far_below_and_what_is_not_a_number() {
        assert_eq!(weight(-31.0, 0.0, 1.0), 0.0);
        assert_eq!(weight(f32::NAN, 0.0, 1.0), 0.0);
        assert_eq!(weight(f32::NEG_INFINITY, 0.0, 1.0), 0.0);
        assert!(weight(-29.0, 0.0, 1.0) > 0.0);
        // Temperature 0.5 doubles the distance: 16 below is 32 nats.
        assert_eq!(weight(-16.0, 0.0, 2.0), 0.0);
        assert_eq!(max_logit(&[f32::NAN, -3.0, 2.0, f32::NAN]), 2.0);
        assert_eq!(max_logit(&[]), f32::NEG_INFINITY);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_passes_give_the_same_bits_as_the_plain_ones() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("this CPU has no AVX2: only the plain passes run here");
            return;
        }
        // A Gemma-sized row with a short last block, NaN and infinities among
        // ordinary logits spread over more than the cutoff.
        let mut logits: Vec<f32> = (0..262_150u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 8) % 40_000) as f32 / 1_000.0 - 20.0)
            .collect();
        logits[17] = f32::NAN;
        logits[1_000] = f32::NEG_INFINITY;
        logits[77_777] = 25.0;
        // SAFETY (both calls below): the CPU has AVX2, checked above.
        let max = unsafe { avx2::max_logit(&logits) };
        assert_eq!(max.to_bits(), max_lanes(&logits).to_bits());
        for scale in [1.25f32, 1.0, 0.5] {
            let (mut plain, mut plain_sums) = (vec![0.0f32; logits.len()], Vec::new());
            let (mut wide, mut wide_sums) = (vec![0.0f32; logits.len()], Vec::new());
            let total = weigh_lanes(&mut plain, &mut plain_sums, &logits, max, scale);
            let wide_total = unsafe { avx2::weigh(&mut wide, &mut wide_sums, &logits, max, scale) };
            assert_eq!(total.to_bits(), wide_total.to_bits(), "scale {scale}");
            assert!(
                plain.iter().zip(&wide).all(|(a, b)| a.to_bits() == b.to_bits()),
                "scale {scale}"
            );
            assert!(plain_sums
                .iter()
                .zip(&wide_sums)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            assert_eq!(plain_sums.len(), 1_025);
        }
    }

    #[test]
    fn a_vocabulary_that_does_not_fill_its_last_block_is_drawn_from_whole() {
        // 1,000 tokens: three whole blocks of 256 and a short one; all equal.
        let logits = vec![1.5f32; 1_000];
        let n = counts(&sampling(1.0, 1.0, 9), &logits, 100_000);
        let last_block: usize = n[768..].iter().sum();
        assert!((last_block as f64 / 100_000.0 - 0.232).abs() < 0.01, "{last_block}");
        assert!(n[999] > 0 && n[0] > 0);
    }
}
