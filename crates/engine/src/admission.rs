//! Estimates how long a new request would wait for a sequence, from the measured cost of the
//! engine's forward steps and the size of recent requests, so that overload is refused at once
//! (503) instead of being queued for minutes.
//!
//! A step costs about `a` per forward pass (reading the weights) plus `b` per token row. With
//! `s` sequences decoding together each gets a token every `a + b·s`, so a sequence with `p`
//! prompt tokens and `o` output tokens left ends after about `s·w`, where
//! `w = a·(o/s + p/batch) + b·(p + o)` is its share of the engine. The scheduler publishes, after
//! every step, when each running sequence should end; a new request that finds `k` requests
//! queued beyond the free sequences takes the `k`-th release: one of the running sequences', or,
//! past those, one of the requests queued ahead of it, each a usual request's `s·w` later.
//! Requests that start together end together, so a burst is seen in waves, not as a steady
//! trickle.
//!
//! `a` and `b` come from a least-squares fit over recent steps (forgetting old ones), seeded at
//! start-up by two timed passes; the usual request's size is an average over recently finished
//! ones, seeded by the first submitted one (before any, the new request's own estimate).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How much each new step's weight exceeds the one before's (older steps fade).
const FORGET: f64 = 0.98;
/// Weight of a finished request in the running averages of request size.
const SIZE_WEIGHT: f64 = 0.1;

/// A fit of step time against forward passes and token rows: `secs ≈ a·passes + b·rows`.
#[derive(Debug, Default, Clone)]
pub(crate) struct StepCost {
    pp: f64,
    pr: f64,
    rr: f64,
    pd: f64,
    rd: f64,
    fitted: Option<(f64, f64)>,
}

impl StepCost {
    /// Adds a step of `passes` forward passes over `rows` token rows that took `secs`.
    pub(crate) fn observe(&mut self, passes: usize, rows: usize, secs: f64) {
        if passes == 0 || rows == 0 || !secs.is_finite() || secs <= 0.0 {
            return;
        }
        let (p, r) = (passes as f64, rows as f64);
        for v in [
            &mut self.pp,
            &mut self.pr,
            &mut self.rr,
            &mut self.pd,
            &mut self.rd,
        ] {
            *v *= FORGET;
        }
        self.pp += p * p;
        self.pr += p * r;
        self.rr += r * r;
        self.pd += p * secs;
        self.rd += r * secs;
        let det = self.pp * self.rr - self.pr * self.pr;
        // Steps all of one shape leave the two costs apart undetermined: keep the last fit.
        if det <= 1e-9 * self.pp * self.rr {
            return;
        }
        let a = (self.pd * self.rr - self.rd * self.pr) / det;
        let b = (self.pp * self.rd - self.pr * self.pd) / det;
        if a.is_finite() && b.is_finite() && a >= 0.0 && b > 0.0 {
            self.fitted = Some((a, b));
        }
    }

    /// Seconds per forward pass and per token row, once known.
    pub(crate) fn coefficients(&self) -> Option<(f64, f64)> {
        self.fitted
    }
}

/// What the scheduler measured, read by submitting threads without locking (f64 bits; zero
/// while unknown).
#[derive(Debug, Default)]
pub(crate) struct Pace {
    per_pass: AtomicU64,
    per_row: AtomicU64,
    mean_prompt: AtomicU64,
    mean_output: AtomicU64,
    /// When the running sequences should end, in seconds from the instant (ascending).
    releases: Mutex<(Option<Instant>, Vec<f64>)>,
}

fn load(v: &AtomicU64) -> f64 {
    f64::from_bits(v.load(Ordering::Relaxed))
}

fn store(v: &AtomicU64, x: f64) {
    v.store(x.to_bits(), Ordering::Relaxed);
}

impl Pace {
    /// Publishes the step costs.
    pub(crate) fn set_costs(&self, (a, b): (f64, f64)) {
        store(&self.per_pass, a);
        store(&self.per_row, b);
    }

    /// Folds a finished sequence's computed prompt tokens and generated tokens into the
    /// averages (by the scheduler; a race with `seed` only loses an early estimate).
    pub(crate) fn finished(&self, prompt: usize, output: usize) {
        self.seed(prompt, output);
        let (p, o) = (prompt as f64, output as f64);
        let (mean_p, mean_o) = (load(&self.mean_prompt), load(&self.mean_output));
        store(&self.mean_prompt, mean_p + SIZE_WEIGHT * (p - mean_p));
        store(
            &self.mean_output,
            (mean_o + SIZE_WEIGHT * (o - mean_o)).max(1.0),
        );
    }

    /// Takes a submitted request's size (per sequence) as the usual one while none has
    /// finished.
    pub(crate) fn seed(&self, prompt: usize, output: usize) {
        if load(&self.mean_output) == 0.0 {
            store(&self.mean_prompt, prompt as f64);
            store(&self.mean_output, (output as f64).max(1.0));
        }
    }

    /// Seconds per forward pass and per token row, once known.
    pub(crate) fn costs(&self) -> Option<(f64, f64)> {
        let (a, b) = (load(&self.per_pass), load(&self.per_row));
        (b > 0.0).then_some((a, b))
    }

    /// The usual sequence's prompt tokens to compute and tokens generated, once known.
    pub(crate) fn usual(&self) -> Option<(f64, f64)> {
        let o = load(&self.mean_output);
        (o > 0.0).then(|| (load(&self.mean_prompt), o))
    }

    /// Publishes when each running sequence should end, in seconds from now.
    pub(crate) fn set_releases(&self, mut ends: Vec<f64>) {
        ends.sort_by(f64::total_cmp);
        if let Ok(mut r) = self.releases.lock() {
            *r = (Some(Instant::now()), ends);
        }
    }

    /// How long a request would wait that finds `queued` requests (itself not counted)
    /// waiting for `sequences` sequences, if it would use `own` (prompt, output) tokens while
    /// the usual size is unknown. `None` until the step costs are known.
    pub(crate) fn wait(
        &self,
        queued: usize,
        sequences: usize,
        batch: usize,
        own: (usize, usize),
    ) -> Option<Duration> {
        let costs = self.costs()?;
        let (p, o) = self.usual().unwrap_or((own.0 as f64, own.1 as f64));
        let s = sequences.max(1);
        let cycle = s as f64 * share(costs, s, batch, p, o);
        let (elapsed, mut ends) = match self.releases.lock() {
            Ok(r) => (r.0.map_or(0.0, |t| t.elapsed().as_secs_f64()), r.1.clone()),
            Err(_) => (0.0, Vec::new()),
        };
        let beyond = (queued + ends.len() + 1).saturating_sub(s);
        if beyond == 0 {
            return Some(Duration::ZERO);
        }
        for e in &mut ends {
            *e = (*e - elapsed).max(0.0);
        }
        // Free sequences are taken now by the first requests queued.
        ends.resize(s, cycle);
        ends.sort_by(f64::total_cmp);
        let k = beyond - 1;
        let secs = ends[k % s] + (k / s) as f64 * cycle;
        Duration::try_from_secs_f64(secs).ok()
    }
}

/// The engine seconds a sequence with `p` prompt tokens and `o` output tokens left takes while
/// `sequences` decode together.
pub(crate) fn share((a, b): (f64, f64), sequences: usize, batch: usize, p: f64, o: f64) -> f64 {
    a * (o / sequences.max(1) as f64 + p / batch.max(1) as f64) + b * (p + o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_separates_pass_and_row_costs() {
        let mut c = StepCost::default();
        assert_eq!(c.coefficients(), None);
        // One shape alone cannot tell the two apart.
        c.observe(1, 16, 0.010 + 16.0 * 0.002);
        assert_eq!(c.coefficients(), None);
        for (passes, rows) in [(1, 1), (1, 32), (2, 80), (1, 16), (3, 500)] {
            c.observe(passes, rows, 0.010 * passes as f64 + 0.002 * rows as f64);
        }
        let (a, b) = c.coefficients().unwrap();
        assert!((a - 0.010).abs() < 1e-6, "{a}");
        assert!((b - 0.002).abs() < 1e-7, "{b}");
        // A machine that slows down is followed.
        for _ in 0..400 {
            c.observe(1, 16, 2.0 * (0.010 + 16.0 * 0.002));
            c.observe(2, 100, 2.0 * (0.020 + 100.0 * 0.002));
        }
        let (a, b) = c.coefficients().unwrap();
        assert!((a - 0.020).abs() < 1e-4, "{a}");
        assert!((b - 0.004).abs() < 1e-5, "{b}");
        // Nonsense is ignored.
        c.observe(0, 5, 1.0);
        c.observe(1, 5, f64::NAN);
        assert_eq!(c.coefficients(), Some((a, b)));
    }

    #[test]
    fn waits_follow_the_releases_of_running_and_queued_sequences() {
        let p = Pace::default();
        assert_eq!(p.wait(100, 4, 512, (10, 10)), None);
        p.set_costs((0.0, 0.01));
        // A sequence of 10 + 10 tokens takes 0.2 s of the engine, 0.8 s among 4.
        let cycle = 0.8;
        let secs = |q: usize| p.wait(q, 4, 512, (10, 10)).unwrap().as_secs_f64();
        // Free sequences: no wait.
        assert_eq!(secs(0), 0.0);
        assert_eq!(secs(3), 0.0);
        // A cold burst: the first four start together and end together.
        assert!((secs(4) - cycle).abs() < 1e-9);
        assert!((secs(7) - cycle).abs() < 1e-9);
        assert!((secs(8) - 2.0 * cycle).abs() < 1e-9);
        // Running sequences ending at 0.1, 0.2, 0.3, 0.4 s release in turn.
        p.set_releases(vec![0.4, 0.1, 0.3, 0.2]);
        let w = |q: usize| p.wait(q, 4, 512, (10, 10)).unwrap().as_secs_f64();
        assert!(w(0) > 0.09 && w(0) <= 0.1, "{}", w(0));
        assert!(w(3) > 0.39 && w(3) <= 0.4);
        assert!(w(4) > 0.89 && w(4) <= 0.9, "{}", w(4));
        // Two running: two free sequences first.
        p.set_releases(vec![0.5, 0.25]);
        assert_eq!(p.wait(1, 4, 512, (10, 10)), Some(Duration::ZERO));
        let w2 = p.wait(2, 4, 512, (10, 10)).unwrap().as_secs_f64();
        assert!(w2 > 0.24 && w2 <= 0.25, "{w2}");
        // Once sizes are known they replace the request's own.
        p.finished(30, 30);
        p.set_releases(Vec::new());
        let w3 = p.wait(4, 4, 512, (10, 10)).unwrap().as_secs_f64();
        assert!((w3 - 4.0 * 0.6).abs() < 1e-9, "{w3}");
    }

    #[test]
    fn usual_size_is_seeded_then_averaged() {
        let p = Pace::default();
        assert_eq!(p.usual(), None);
        p.seed(100, 50);
        assert_eq!(p.usual(), Some((100.0, 50.0)));
        p.seed(1, 1);
        assert_eq!(p.usual(), Some((100.0, 50.0)));
        p.finished(0, 150);
        let (pp, o) = p.usual().unwrap();
        assert!(
            (pp - 90.0).abs() < 1e-9 && (o - 60.0).abs() < 1e-9,
            "{pp} {o}"
        );
    }
}
