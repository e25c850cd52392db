//! Drawing the next token from a row of logits: temperature, then nucleus
//! (`top_p`), then a seeded random draw.
//!
//! Why not llama.cpp's sampler chain: it copies the whole vocabulary into a
//! candidate array and takes an exponential of every logit for every token of
//! every sequence. Gemma's vocabulary has 262,144 entries, so that is
//! hundreds of microseconds per token on the engine thread, while llama.cpp's
//! own threads wait; with several sequences per step it adds up. Here one pass
//! finds the largest logit, a second keeps only the logits close enough to it
//! to matter (weight at least `e^-CUTOFF` of the best: the rest add less than
//! 2 × 10⁻⁸ to the total even with every vocabulary entry counted), and only
//! those get an exponential. Buffers are reused between tokens.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::params::Sampling;

/// Logits more than this many nats (after temperature) below the best are
/// left out: e^-30 ≈ 9 × 10⁻¹⁴ of the best token's weight each.
const CUTOFF: f32 = 30.0;

pub struct Sampler {
    inv_temperature: f32,
    top_p: f32,
    rng: StdRng,
    /// (token, weight) of the tokens still in the running.
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
            candidates: Vec::new(),
        })
    }

    /// The next token id.
    pub fn sample(&mut self, logits: &[f32]) -> i32 {
        let best = argmax(logits);
        let Some(&max) = logits.get(best) else { return 0 };
        if !max.is_finite() {
            return to_id(best);
        }
        // Weight of token i: exp((l_i − max) / T). Keep those above e^-CUTOFF.
        let floor = max - CUTOFF / self.inv_temperature;
        self.candidates.clear();
        let mut total = 0.0f64;
        for (i, &l) in logits.iter().enumerate() {
            if l >= floor {
                let w = ((l - max) * self.inv_temperature).exp();
                total += f64::from(w);
                self.candidates.push((i as u32, w));
            }
        }
        let mut kept = total;
        if self.top_p < 1.0 {
            // The smallest set of most likely tokens whose share reaches top_p.
            self.candidates
                .sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let goal = f64::from(self.top_p) * total;
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
            kept = sum;
        }
        let mut target = self.rng.gen::<f64>() * kept;
        for &(token, w) in &self.candidates {
            target -= f64::from(w);
            if target < 0.0 {
                return to_id(token as usize);
            }
        }
        // Rounding left the draw past the end: the last candidate.
        self.candidates.last().map_or(to_id(best), |&(t, _)| to_id(t as usize))
    }
}

/// Index of the largest logit; ties go to the lower token id, as in llama.cpp.
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
}
