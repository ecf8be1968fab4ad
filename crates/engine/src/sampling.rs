//! Token sampling in Rust on the model's logits, one seeded random stream per sequence.
//!
//! Order of operations, the same for every request: logit bias, then penalties (repetition over
//! prompt and output as vLLM defines it; presence and frequency over the output as OpenAI defines
//! them), then greedy choice when the temperature is 0, otherwise temperature, top-k, top-p and
//! min-p filters and a draw from the renormalised distribution. The random stream belongs to the
//! sequence (seed plus choice index), so the same seed draws the same numbers whatever else
//! shares the batch.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling parameters of one request, already validated by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass, in (0, 1].
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: u32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables.
    pub min_p: f32,
    /// OpenAI presence penalty, −2..2.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty, −2..2.
    pub frequency_penalty: f32,
    /// vLLM repetition penalty (> 0; 1 disables), applied over prompt and output tokens.
    pub repetition_penalty: f32,
    /// Added to the logit of each token id; −100 bans it.
    pub logit_bias: Vec<(u32, f32)>,
    /// Seed of the random stream; `None` picks one at random.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

/// Tokens further below the best logit than this carry less than e^-30 of its probability each;
/// dropping them before sorting changes no draw in practice and saves sorting the whole vocabulary.
const NEGLIGIBLE_LOGIT_GAP: f32 = 30.0;

/// The sampling state of one sequence.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Tokens seen in the prompt, for the repetition penalty.
    prompt_tokens: Vec<u32>,
    /// How often each token was generated.
    counts: HashMap<u32, u32>,
    scratch: Vec<f32>,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler for choice `stream` of a request; choices of one request draw from distinct
    /// streams of the same seed.
    pub fn new(params: SamplingParams, prompt: &[u32], stream: u64) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        let mut prompt_tokens = Vec::new();
        if params.repetition_penalty != 1.0 {
            prompt_tokens = prompt.to_vec();
            prompt_tokens.sort_unstable();
            prompt_tokens.dedup();
        }
        Self {
            params,
            rng,
            prompt_tokens,
            counts: HashMap::new(),
            scratch: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// Records a token that was generated, for the penalties.
    pub fn accept(&mut self, token: u32) {
        *self.counts.entry(token).or_insert(0) += 1;
    }

    /// Picks the next token from `logits`. Tokens in `banned` are never chosen.
    pub fn sample(&mut self, logits: &[f32], banned: &[u32]) -> u32 {
        self.sample_allowed(logits, banned, |_| true)
    }

    /// Like [`Sampler::sample`], choosing only among tokens for which `allowed` is true.
    pub fn sample_allowed(
        &mut self,
        logits: &[f32],
        banned: &[u32],
        allowed: impl Fn(u32) -> bool,
    ) -> u32 {
        self.scratch.clear();
        self.scratch.extend_from_slice(logits);
        let l = &mut self.scratch;
        let vocab = l.len();
        for &(tok, bias) in &self.params.logit_bias {
            if let Some(v) = l.get_mut(tok as usize) {
                *v = if bias <= -100.0 {
                    f32::NEG_INFINITY
                } else {
                    *v + bias
                };
            }
        }
        let rp = self.params.repetition_penalty;
        if rp != 1.0 {
            let penalise = |v: &mut f32| *v = if *v > 0.0 { *v / rp } else { *v * rp };
            for &t in &self.prompt_tokens {
                if let Some(v) = l.get_mut(t as usize) {
                    penalise(v);
                }
            }
            for &t in self.counts.keys() {
                if self.prompt_tokens.binary_search(&t).is_err() {
                    if let Some(v) = l.get_mut(t as usize) {
                        penalise(v);
                    }
                }
            }
        }
        let (pp, fp) = (self.params.presence_penalty, self.params.frequency_penalty);
        if pp != 0.0 || fp != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(v) = l.get_mut(t as usize) {
                    *v -= fp * c as f32 + pp;
                }
            }
        }
        for &t in banned {
            if let Some(v) = l.get_mut(t as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        for (i, v) in l.iter_mut().enumerate() {
            if !allowed(i as u32) {
                *v = f32::NEG_INFINITY;
            }
        }

        // Greedy: the highest logit, lowest id on ties.
        let best = argmax(l);
        if self.params.temperature <= 0.0 || self.params.top_k == 1 || vocab == 0 {
            return best;
        }
        let max = l[best as usize];
        if !max.is_finite() {
            return best;
        }
        let inv_t = 1.0 / self.params.temperature;
        self.candidates.clear();
        let floor = max - NEGLIGIBLE_LOGIT_GAP * self.params.temperature;
        self.candidates.extend(
            l.iter()
                .enumerate()
                .filter(|(_, v)| **v >= floor)
                .map(|(i, v)| (i as u32, (*v - max) * inv_t)),
        );
        // Descending by logit, then ascending by id: a total, deterministic order.
        self.candidates
            .sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            self.candidates.truncate(self.params.top_k as usize);
        }
        let mut probs: Vec<f64> = self
            .candidates
            .iter()
            .map(|(_, v)| f64::from(*v).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let mut keep = probs.len();
        if self.params.min_p > 0.0 {
            let cut = probs[0] * f64::from(self.params.min_p);
            keep = probs.iter().take_while(|p| **p >= cut).count().max(1);
        }
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let mut n = 0;
            for p in &probs[..keep] {
                acc += p;
                n += 1;
                if acc >= f64::from(self.params.top_p) {
                    break;
                }
            }
            keep = n.max(1);
        }
        let mass: f64 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f64>() * mass;
        for (i, p) in probs[..keep].iter().enumerate() {
            if r < *p {
                return self.candidates[i].0;
            }
            r -= p;
        }
        self.candidates[keep - 1].0
    }
}

/// Log probabilities from the model's raw distribution (the logits before bias, penalties,
/// temperature and filters): the chosen token's, and the `top` most likely tokens', most likely
/// first (ties by lower id).
pub fn log_probs(logits: &[f32], chosen: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|v| f64::from(*v - max).exp()).sum();
    let lse = f64::from(max) + sum.ln();
    let lp = |v: f32| (f64::from(v) - lse) as f32;
    let chosen_lp = logits
        .get(chosen as usize)
        .map_or(f32::NEG_INFINITY, |v| lp(*v));
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let order = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let k = top.min(idx.len());
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, order);
            idx.truncate(k);
        }
        idx.sort_unstable_by(order);
        best = idx
            .into_iter()
            .map(|i| (i, lp(logits[i as usize])))
            .collect();
    }
    (chosen_lp, best)
}

fn argmax(l: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, v) in l.iter().enumerate() {
        if *v > l[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_highest_logit() {
        let mut s = Sampler::new(params(0.0), &[], 0);
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn bias_minus_100_bans() {
        let mut p = params(0.0);
        p.logit_bias = vec![(1, -100.0)];
        let mut s = Sampler::new(p, &[], 0);
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[]), 2);
    }

    #[test]
    fn banned_tokens_never_chosen() {
        let mut s = Sampler::new(params(1.0), &[], 0);
        for _ in 0..200 {
            assert_ne!(s.sample(&[5.0, 5.0, 5.0], &[1]), 1);
        }
    }

    #[test]
    fn same_seed_same_draws_other_stream_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |stream| {
            let mut s = Sampler::new(params(1.0), &[], stream);
            (0..40).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(0), draw(0));
        assert_ne!(draw(0), draw(1));
    }

    #[test]
    fn top_k_limits_choices() {
        let mut p = params(5.0);
        p.top_k = 2;
        let mut s = Sampler::new(p, &[], 0);
        for _ in 0..300 {
            let t = s.sample(&[1.0, 4.0, 3.9, 0.5], &[]);
            assert!(t == 1 || t == 2, "got {t}");
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let mut p = params(1.0);
        p.top_p = 0.5;
        let mut s = Sampler::new(p, &[], 0);
        // token 0 has ~0.88 of the mass: it alone covers top_p 0.5.
        for _ in 0..300 {
            assert_eq!(s.sample(&[4.0, 2.0, 0.0], &[]), 0);
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let mut p = params(1.0);
        p.min_p = 0.5;
        let mut s = Sampler::new(p, &[], 0);
        for _ in 0..300 {
            let t = s.sample(&[3.0, 2.9, 0.0], &[]);
            assert!(t < 2);
        }
    }

    #[test]
    fn frequency_penalty_moves_greedy_choice() {
        let mut p = params(0.0);
        p.frequency_penalty = 2.0;
        let mut s = Sampler::new(p, &[], 0);
        assert_eq!(s.sample(&[1.0, 2.0], &[]), 1);
        s.accept(1);
        assert_eq!(s.sample(&[1.0, 2.0], &[]), 0);
    }

    #[test]
    fn repetition_penalty_covers_prompt_tokens() {
        let mut p = params(0.0);
        p.repetition_penalty = 3.0;
        let mut s = Sampler::new(p, &[1], 0);
        assert_eq!(s.sample(&[1.0, 2.0], &[]), 0);
    }

    #[test]
    fn log_probs_are_a_normalised_raw_distribution() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let (lp, top) = log_probs(&logits, 2, 3);
        let total: f32 = logits
            .iter()
            .map(|v| (log_probs(&logits, 0, 0).0 - 1.0 + v).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!((top[2].1 - lp).abs() < 1e-6);
        assert!(top[0].1 >= top[1].1 && top[1].1 >= top[2].1);
        assert_eq!(log_probs(&logits, 1, 0).1, vec![]);
        assert_eq!(log_probs(&logits, 1, 10).1.len(), 4);
    }

    #[test]
    fn distribution_follows_probabilities() {
        let mut s = Sampler::new(params(1.0), &[], 3);
        let logits = [0.0f32, (3.0f32).ln()];
        let ones = (0..4000).filter(|_| s.sample(&logits, &[]) == 1).count();
        // Expect 3000 of 4000; allow a wide statistical margin.
        assert!((2800..3200).contains(&ones), "{ones}");
    }
}
