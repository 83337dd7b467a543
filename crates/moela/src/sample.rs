//! Token samplers over a row of logits on the host.
//!
//! The pipeline follows HF transformers' `generate`: repetition penalty (and OpenAI's frequency and
//! presence penalties), then greedy argmax when the temperature is 0, else temperature, top-k, top-p, min-p, and a draw from the renormalised distribution.
//! The random generator is a seeded ChaCha8, so a seed reproduces a generation on every platform.

use std::cmp::Ordering;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the next token is chosen. The default is greedy decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingOptions {
    /// Softmax temperature; 0 picks the most likely token (greedy). Must be finite and >= 0.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 turns it off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability adds up to at least `top_p` (nucleus
    /// sampling); in (0, 1], 1 turns it off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; in [0, 1), 0 turns it off.
    pub min_p: f32,
    /// Penalty on tokens already in `previous` (CTRL / HF style: positive logits are divided by it, negative
    /// ones multiplied); > 0, 1 turns it off.
    pub repetition_penalty: f32,
    /// Subtracted from a token's logit once per time it appears in `previous` (OpenAI's
    /// `frequency_penalty`); in [-2, 2], 0 turns it off.
    pub frequency_penalty: f32,
    /// Subtracted from the logit of every token that appears in `previous` (OpenAI's `presence_penalty`); in
    /// [-2, 2], 0 turns it off.
    pub presence_penalty: f32,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingOptions {
    /// Checks every field; the error names the first bad one ([`invalid_field`](Self::invalid_field)).
    pub fn validate(&self) -> Result<()> {
        match self.invalid_field() {
            Some((_, message)) => Err(Error::InvalidArgument(message)),
            None => Ok(()),
        }
    }

    /// The first field out of its range, and a message saying what it must be: `(field, message)`, the
    /// field named as in this struct (and in OpenAI's requests).
    pub fn invalid_field(&self) -> Option<(&'static str, String)> {
        let bad = |field: &'static str, value: f32, rule: &str| {
            Some((field, format!("sampling option {field} = {value}: must be {rule}")))
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", self.temperature, "finite and >= 0 (0 = greedy)");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "in (0, 1] (1 = off)");
        }
        if !(self.min_p >= 0.0 && self.min_p < 1.0) {
            return bad("min_p", self.min_p, "in [0, 1) (0 = off)");
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(
                "repetition_penalty",
                self.repetition_penalty,
                "finite and > 0 (1 = off)",
            );
        }
        for (field, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return bad(field, value, "in [-2, 2] (0 = off)");
            }
        }
        None
    }

    /// True when the choice is the argmax of the raw logits (temperature 0, no penalty), so it can be made
    /// on the device without reading the logits back.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature == 0.0 && !self.has_penalties()
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }
}

/// A seeded sampler. Reuses its buffers, so sampling allocates nothing after the first token.
#[derive(Debug, Clone)]
pub struct Sampler {
    options: SamplingOptions,
    rng: ChaCha8Rng,
    /// (token id, scaled logit, then unnormalised probability).
    candidates: Vec<(u32, f32)>,
    /// The distinct previous tokens.
    seen: Vec<u32>,
}

impl Sampler {
    /// A sampler for `options`, which must pass [`SamplingOptions::validate`].
    pub fn new(options: SamplingOptions) -> Result<Self> {
        options.validate()?;
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(options.seed),
            options,
            candidates: Vec::new(),
            seen: Vec::new(),
        })
    }

    /// The options this sampler was built with.
    pub fn options(&self) -> &SamplingOptions {
        &self.options
    }

    /// Picks the next token from one row of `logits` (one per vocabulary entry).
    ///
    /// `previous` are the tokens the penalties apply to (usually prompt and generated tokens; ids beyond the
    /// row are ignored). The penalties are applied to `logits` in place. NaN logits are never
    /// chosen; greedy ties go to the lowest id. Costs O(V) without top-p, O(V log V) with it. Fails only on
    /// an empty row.
    pub fn sample(&mut self, logits: &mut [f32], previous: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::InvalidArgument("cannot sample from an empty logits row".into()));
        }
        if u32::try_from(logits.len()).is_err() {
            return Err(Error::InvalidArgument(format!(
                "logits row of {} entries exceeds the u32 token id range",
                logits.len()
            )));
        }
        self.apply_penalties(logits, previous);
        let opts = &self.options;
        if opts.temperature == 0.0 {
            return Ok(argmax(logits));
        }

        // Temperature. Clamping keeps +inf logits (and overflow from a tiny temperature) finite.
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, x)| !x.is_nan() && **x != f32::NEG_INFINITY)
                .map(|(i, &x)| (i as u32, (x / opts.temperature).clamp(-f32::MAX, f32::MAX))),
        );
        if self.candidates.is_empty() {
            return Ok(argmax(logits));
        }

        // Top-k: a partial sort, O(V).
        if opts.top_k > 0 && opts.top_k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(opts.top_k - 1, by_value_desc);
            self.candidates.truncate(opts.top_k);
        }

        // Unnormalised softmax: the most likely token gets weight 1.
        let max = self.candidates.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.1));
        for c in &mut self.candidates {
            c.1 = (c.1 - max).exp();
        }

        // Top-p over the sorted distribution, keeping at least one token.
        if opts.top_p < 1.0 {
            self.candidates.sort_unstable_by(by_value_desc);
            let total: f64 = self.candidates.iter().map(|c| f64::from(c.1)).sum();
            let target = f64::from(opts.top_p) * total;
            let mut cumulative = 0.0;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                cumulative += f64::from(c.1);
                if cumulative >= target {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep);
        }

        // Min-p relative to the most likely token (weight 1); that token always survives.
        if opts.min_p > 0.0 {
            self.candidates.retain(|c| c.1 >= opts.min_p);
        }

        let total: f64 = self.candidates.iter().map(|c| f64::from(c.1)).sum();
        let mut draw = self.rng.random::<f64>() * total;
        for &(id, weight) in &self.candidates {
            draw -= f64::from(weight);
            if draw < 0.0 {
                return Ok(id);
            }
        }
        // Rounding left a sliver past the last token: take the last one with any weight.
        let last = self.candidates.iter().rev().find(|c| c.1 > 0.0);
        Ok(last.map_or(self.candidates[0].0, |c| c.0))
    }

    /// Divides positive logits and multiplies negative ones of each distinct previous token by the penalty.
    fn apply_penalties(&mut self, logits: &mut [f32], previous: &[u32]) {
        let o = &self.options;
        if !o.has_penalties() || previous.is_empty() {
            return;
        }
        let (penalty, frequency, presence) = (o.repetition_penalty, o.frequency_penalty, o.presence_penalty);
        self.seen.clear();
        self.seen.extend_from_slice(previous);
        self.seen.sort_unstable();
        for run in self.seen.chunk_by(|a, b| a == b) {
            if let Some(x) = logits.get_mut(run[0] as usize) {
                if penalty != 1.0 {
                    *x = if *x > 0.0 { *x / penalty } else { *x * penalty };
                }
                *x -= frequency * run.len() as f32 + presence;
            }
        }
    }
}

/// The index of the largest logit; NaN never wins, ties go to the lowest index, an all-NaN row gives 0.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

/// Descending by value, then ascending by id: a total order, so results never depend on the sort algorithm.
fn by_value_desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(options: SamplingOptions) -> Sampler {
        Sampler::new(options).expect("valid options")
    }

    fn with(temperature: f32, seed: u64) -> SamplingOptions {
        SamplingOptions {
            temperature,
            seed,
            ..SamplingOptions::default()
        }
    }

    /// Pseudo-random logits without the sampler's generator.
    fn noisy_logits(n: usize, salt: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(salt);
        (0..n).map(|_| rng.random_range(-5.0..5.0)).collect()
    }

    /// Sampling frequencies over `draws` draws from fixed `logits`.
    fn frequencies(options: SamplingOptions, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut s = sampler(options);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            let id = s.sample(&mut logits.to_vec(), &[]).expect("samples");
            counts[id as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    fn ln(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    #[test]
    fn greedy_is_argmax_nan_safe_lowest_id_on_ties() {
        let mut s = sampler(SamplingOptions::default());
        assert!(s.options().is_plain_greedy());
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9], &[]).expect("samples"), 1);
        assert_eq!(
            s.sample(&mut [f32::NAN, 1.0, 5.0, 5.0, f32::NAN], &[])
                .expect("samples"),
            2
        );
        assert_eq!(s.sample(&mut [f32::NAN, f32::NAN], &[]).expect("samples"), 0);
        assert_eq!(
            s.sample(&mut [f32::NEG_INFINITY, f32::NEG_INFINITY], &[])
                .expect("samples"),
            0
        );
        assert_eq!(s.sample(&mut [1.0, f32::INFINITY, 2.0], &[]).expect("samples"), 1);
        assert!(s.sample(&mut [], &[]).is_err());
    }

    #[test]
    fn same_seed_same_sequence_different_seeds_differ() {
        let logits = vec![0.0f32; 1000];
        let run = |seed| {
            let mut s = sampler(with(1.0, seed));
            (0..64)
                .map(|_| s.sample(&mut logits.clone(), &[]).expect("samples"))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        for salt in 0..50 {
            let logits = noisy_logits(257, salt);
            let best = argmax(&logits);
            let top_k = SamplingOptions {
                top_k: 1,
                ..with(1.5, salt)
            };
            assert_eq!(sampler(top_k).sample(&mut logits.clone(), &[]).expect("samples"), best);
            let top_p = SamplingOptions {
                top_p: 1e-6,
                ..with(1.5, salt)
            };
            assert_eq!(sampler(top_p).sample(&mut logits.clone(), &[]).expect("samples"), best);
        }
    }

    #[test]
    fn top_k_and_top_p_keep_the_right_tokens() {
        let logits = ln(&[0.1, 0.4, 0.2, 0.3]);
        let top_k = SamplingOptions {
            top_k: 2,
            ..with(1.0, 1)
        };
        let f = frequencies(top_k, &logits, 4000);
        assert_eq!((f[0], f[2]), (0.0, 0.0));
        assert!((f[1] - 4.0 / 7.0).abs() < 0.03, "{f:?}");
        // 0.4 + 0.3 >= 0.65: tokens 1 and 3 only.
        let top_p = SamplingOptions {
            top_p: 0.65,
            ..with(1.0, 2)
        };
        let f = frequencies(top_p, &logits, 4000);
        assert_eq!((f[0], f[2]), (0.0, 0.0));
        assert!(f[1] > 0.5 && f[3] > 0.35, "{f:?}");
    }

    #[test]
    fn min_p_filters_relative_to_the_top_token() {
        let logits = ln(&[0.5, 0.3, 0.15, 0.05]);
        let keep_three = SamplingOptions {
            min_p: 0.2,
            ..with(1.0, 3)
        };
        let f = frequencies(keep_three, &logits, 4000);
        assert_eq!(f[3], 0.0);
        assert!(f[2] > 0.1, "{f:?}");
        let keep_one = SamplingOptions {
            min_p: 0.7,
            ..with(1.0, 4)
        };
        assert_eq!(frequencies(keep_one, &logits, 500)[0], 1.0);
    }

    #[test]
    fn frequency_and_presence_penalties_subtract_per_occurrence_and_once() {
        let opts = SamplingOptions {
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..SamplingOptions::default()
        };
        assert!(!opts.is_plain_greedy());
        let mut logits = [2.0, 1.9, -1.0, 0.5];
        // Token 0 seen twice: 2 - 2 * 0.5 - 0.25; token 2 once; id 99 ignored.
        assert_eq!(sampler(opts).sample(&mut logits, &[0, 0, 2, 99]).expect("samples"), 1);
        assert_eq!(logits, [0.75, 1.9, -1.75, 0.5]);
        let bad = SamplingOptions {
            presence_penalty: 2.5,
            ..SamplingOptions::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("presence_penalty"));
    }

    #[test]
    fn repetition_penalty_changes_the_argmax() {
        let opts = SamplingOptions {
            repetition_penalty: 1.5,
            ..SamplingOptions::default()
        };
        assert!(!opts.is_plain_greedy());
        let mut s = sampler(opts);
        let mut logits = [2.0, 1.9, -1.0, 0.5];
        assert_eq!(s.sample(&mut logits, &[0, 0, 2, 99]).expect("samples"), 1);
        // Positive logits divided, negative multiplied, each token once, out-of-range ids ignored.
        assert_eq!(logits, [2.0 / 1.5, 1.9, -1.5, 0.5]);
        assert_eq!(
            sampler(SamplingOptions::default())
                .sample(&mut [2.0, 1.9], &[0])
                .expect("samples"),
            0
        );
    }

    #[test]
    fn temperature_sampling_matches_the_distribution() {
        let probs = [0.5f32, 0.3, 0.2];
        let logits = ln(&probs);
        let draws = 40_000;
        let f = frequencies(with(1.0, 11), &logits, draws);
        for (got, want) in f.iter().zip(probs) {
            assert!((got - f64::from(want)).abs() < 0.015, "{f:?}");
        }
        // Temperature 0.5 squares the probabilities before renormalising.
        let squared: Vec<f64> = probs.iter().map(|&p| f64::from(p * p) / 0.38).collect();
        let f = frequencies(with(0.5, 12), &logits, draws);
        for (got, want) in f.iter().zip(&squared) {
            assert!((got - want).abs() < 0.015, "{f:?} vs {squared:?}");
        }
    }

    #[test]
    fn never_samples_nan_or_masked_tokens() {
        let mut s = sampler(with(1.0, 5));
        for _ in 0..500 {
            let mut logits = [f32::NAN, 0.0, f32::NEG_INFINITY, 0.0];
            let id = s.sample(&mut logits, &[]).expect("samples");
            assert!(id == 1 || id == 3);
        }
        assert_eq!(s.sample(&mut [f32::NAN, f32::NEG_INFINITY], &[]).expect("samples"), 1);
        assert_eq!(s.sample(&mut [0.0, f32::INFINITY, 1e30], &[]).expect("samples"), 1);
    }

    #[test]
    fn invalid_options_are_rejected_with_the_field_name() {
        let cases = [
            (
                "temperature",
                SamplingOptions {
                    temperature: -0.1,
                    ..Default::default()
                },
            ),
            (
                "temperature",
                SamplingOptions {
                    temperature: f32::NAN,
                    ..Default::default()
                },
            ),
            (
                "temperature",
                SamplingOptions {
                    temperature: f32::INFINITY,
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingOptions {
                    top_p: 0.0,
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingOptions {
                    top_p: 1.01,
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingOptions {
                    top_p: f32::NAN,
                    ..Default::default()
                },
            ),
            (
                "min_p",
                SamplingOptions {
                    min_p: -0.1,
                    ..Default::default()
                },
            ),
            (
                "min_p",
                SamplingOptions {
                    min_p: 1.0,
                    ..Default::default()
                },
            ),
            (
                "min_p",
                SamplingOptions {
                    min_p: f32::NAN,
                    ..Default::default()
                },
            ),
            (
                "repetition_penalty",
                SamplingOptions {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
            ),
            (
                "repetition_penalty",
                SamplingOptions {
                    repetition_penalty: f32::NAN,
                    ..Default::default()
                },
            ),
        ];
        for (field, opts) in cases {
            match Sampler::new(opts.clone()) {
                Err(Error::InvalidArgument(m)) => assert!(m.contains(field), "{field}: {m}"),
                other => panic!("{field}: expected InvalidArgument, got {other:?}"),
            }
            assert_eq!(opts.invalid_field().map(|(f, _)| f), Some(field));
        }
        assert!(SamplingOptions::default().validate().is_ok());
        assert!(SamplingOptions::default().invalid_field().is_none());
        let full = SamplingOptions {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.1,
            frequency_penalty: -0.5,
            presence_penalty: 2.0,
            seed: 1,
        };
        assert!(full.validate().is_ok());
    }

    #[test]
    fn options_deserialize_with_defaults() {
        let o: SamplingOptions = serde_json::from_str(r#"{"temperature": 0.6, "top_p": 0.95}"#).expect("parses");
        assert_eq!(
            o,
            SamplingOptions {
                temperature: 0.6,
                top_p: 0.95,
                ..Default::default()
            }
        );
    }
}
