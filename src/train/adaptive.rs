//! The paper's Algorithm 1: adapting the ensemble size J and the repetitions r.
//!
//! Every τ iterations the test error t_n is compared with t_{n−1} (the first time, with
//! the error at iteration 0). If t_n < ε and t_n < t_{n−1}:
//! - when J > b_l and t_{n−1} − t_n ≤ κ (slow progress): J ← max(J − v, b_l), r ← max(r − 1, 1);
//! - else when t_{n−1} − t_n > κ (fast progress) and J < b_u: J ← min(J + v, b_u), r ← r + 1.
//!
//! (The authors' script only changed the 1/J factor of the covariances and never resized
//! the ensemble; we resize it, see [`crate::enkf::resize`].)

use serde::{Deserialize, Serialize};

/// One row of `adaptive.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveLogRow {
    /// Iteration of the comparison.
    pub iteration: usize,
    /// Test error (%) at the previous comparison.
    pub previous_error: f64,
    /// Test error (%) now.
    pub error: f64,
    /// Ensemble size after the decision.
    pub members: usize,
    /// Repetitions after the decision.
    pub repetitions: usize,
    /// Iterations left after the decision.
    pub remaining_iterations: usize,
}

/// Bounds and thresholds of Algorithm 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveRule {
    /// b_l.
    pub min_members: usize,
    /// b_u.
    pub max_members: usize,
    /// v.
    pub step: usize,
    /// κ in percentage points.
    pub kappa: f64,
    /// ε in percent.
    pub epsilon: f64,
}

impl AdaptiveRule {
    /// The new (J, r) after comparing `previous` with `current` test errors (percent).
    pub fn decide(
        &self,
        members: usize,
        repetitions: usize,
        previous: f64,
        current: f64,
    ) -> (usize, usize) {
        if !(current < self.epsilon && current < previous) {
            return (members, repetitions);
        }
        let gain = previous - current;
        if members > self.min_members && gain <= self.kappa {
            (
                (members - self.step).max(self.min_members),
                (repetitions - 1).max(1),
            )
        } else if gain > self.kappa && members < self.max_members {
            ((members + self.step).min(self.max_members), repetitions + 1)
        } else {
            (members, repetitions)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: AdaptiveRule = AdaptiveRule {
        min_members: 1000,
        max_members: 10_000,
        step: 1000,
        kappa: 1.0,
        epsilon: 10.0,
    };

    #[test]
    fn follows_algorithm_1() {
        // Above ε: nothing changes, however fast the progress.
        assert_eq!(RULE.decide(5000, 8, 40.0, 12.0), (5000, 8));
        // Worse than before: nothing changes.
        assert_eq!(RULE.decide(5000, 8, 5.0, 5.5), (5000, 8));
        // Slow progress (≤ κ) below ε: shrink J and r.
        assert_eq!(RULE.decide(5000, 8, 6.0, 5.5), (4000, 7));
        // Fast progress (> κ) below ε: grow J and r.
        assert_eq!(RULE.decide(5000, 8, 9.5, 7.0), (6000, 9));
        // Bounds: no shrink at b_l, no growth at b_u, r never below 1.
        assert_eq!(RULE.decide(1000, 3, 6.0, 5.5), (1000, 3));
        assert_eq!(RULE.decide(10_000, 3, 9.5, 7.0), (10_000, 3));
        assert_eq!(RULE.decide(2000, 1, 6.0, 5.5), (1000, 1));
        // Clamped to the bounds rather than stepping past them.
        assert_eq!(RULE.decide(1500, 4, 6.0, 5.5), (1000, 3));
        assert_eq!(RULE.decide(9500, 4, 9.5, 7.0), (10_000, 5));
    }
}
