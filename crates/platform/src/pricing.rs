//! Prices and costs. Money is an integer number of micro-units (a millionth of the operator's
//! currency unit); prices are micro-units per million tokens; a request's cost is rounded up to
//! a whole micro-unit once, so a reservation for the worst case always covers the real cost.

/// What a model costs, in micro-units per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Prompt tokens computed.
    #[serde(default)]
    pub prompt: i64,
    /// Prompt tokens reused from the cache.
    #[serde(default)]
    pub cached_prompt: i64,
    /// Completion tokens.
    #[serde(default)]
    pub completion: i64,
}

impl Price {
    /// Whether every token is free.
    pub fn is_free(&self) -> bool {
        self.prompt == 0 && self.cached_prompt == 0 && self.completion == 0
    }

    /// Checks that no price is negative.
    pub fn validate(&self) -> Result<(), String> {
        if self.prompt < 0 || self.cached_prompt < 0 || self.completion < 0 {
            return Err("prices cannot be negative".into());
        }
        Ok(())
    }

    /// The cost of a request, rounded up to a micro-unit: `prompt` tokens of which `cached`
    /// were reused, and `completion` tokens.
    pub fn cost(&self, prompt: u64, cached: u64, completion: u64) -> i64 {
        let cached = cached.min(prompt);
        let total = i128::from(prompt - cached) * i128::from(self.prompt)
            + i128::from(cached) * i128::from(self.cached_prompt)
            + i128::from(completion) * i128::from(self.completion);
        let micros = (total + 999_999).div_euclid(1_000_000);
        i64::try_from(micros).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_round_up_once_and_cache_is_cheaper() {
        let p = Price {
            prompt: 150_000,
            cached_prompt: 75_000,
            completion: 600_000,
        };
        // 1,000 prompt tokens at 0.15 per million = 150 micro-units.
        assert_eq!(p.cost(1_000, 0, 0), 150);
        assert_eq!(p.cost(1_000, 1_000, 0), 75);
        assert_eq!(p.cost(0, 0, 10), 6);
        // 1 prompt token = 0.15 micro-units: rounded up to 1.
        assert_eq!(p.cost(1, 0, 0), 1);
        // Cached never exceeds prompt.
        assert_eq!(p.cost(10, 50, 0), p.cost(10, 10, 0));
        // Worst case (nothing cached, every token used) covers any real outcome.
        for (prompt, cached, out) in [(100, 30, 7), (5, 5, 0), (999, 1, 1)] {
            assert!(p.cost(prompt, cached, out) <= p.cost(prompt, 0, 2_000));
        }
        assert!(Price::default().is_free());
        assert_eq!(Price::default().cost(1_000_000, 0, 1_000_000), 0);
        assert!(Price {
            prompt: -1,
            ..Price::default()
        }
        .validate()
        .is_err());
    }
}
