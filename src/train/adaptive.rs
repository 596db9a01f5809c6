//! The paper's Algorithm 1: adapting the ensemble size J and the repetitions r.
//!
//! Every τ iterations the test error t_n is compared with t_{n−1} (the first time, with
//! the error at iteration 0). If t_n < ε and t_n < t_{n−1}:
//! - when J > b_l and t_{n−1} − t_n ≤ κ (slow progress): J ← max(J − v, b_l), r ← max(r − 1, 1);
//! - else when t_{n−1} − t_n > κ (fast progress) and J < b_u: J ← min(J + v, b_u), r ← r + 1.
//!
//! `--adapt-rule authors` follows the driver the authors published instead, which is what
//! Fig. 10 shows (r lowered at every comparison from 500 on, J from 1500 on, neither ever
//! raised; Algorithm 1 as printed would raise both at 500, where the gain over iteration
//! 0 is some 80 points). If t_n < ε:
//! - when t_n ≤ t_{n−1}: r ← max(r − 1, 1), and J ← max(J − v, b_l) when J > b_l and
//!   t_{n−1} − t_n ≤ κ;
//! - else: r ← min(r + 1, r₀) (r₀ the configured r), and J ← min(J + v, b_u) when J < b_u
//!   and t_n − t_{n−1} > κ.
//!
//! (The driver as published compares `(accuracy, loss)` tuples with numbers, so it
//! cannot have run these lines as they stand; the rule above is what they spell out, in
//! test-error terms: ε = 10 % is its `eps = 90` accuracy. It also lets r reach 0, which
//! would end the run; we keep r ≥ 1.)
//!
//! (The authors' script only changed the 1/J factor of the covariances and never resized
//! the ensemble; we resize it, see [`crate::enkf::resize`].)

use super::config::AdaptRule;
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
    /// Which decision rule.
    pub rule: AdaptRule,
    /// r₀, the configured repetitions: the most that [`AdaptRule::Authors`] raises r to.
    pub max_repetitions: usize,
}

impl AdaptiveRule {
    /// The new (J, r) after comparing `previous` with `current` test errors (percent).
    /// A NaN error on either side (a diverged evaluation) changes nothing.
    pub fn decide(
        &self,
        members: usize,
        repetitions: usize,
        previous: f64,
        current: f64,
    ) -> (usize, usize) {
        if previous.is_nan() || current.is_nan() {
            return (members, repetitions);
        }
        match self.rule {
            AdaptRule::Algorithm => self.decide_algorithm(members, repetitions, previous, current),
            AdaptRule::Authors => self.decide_authors(members, repetitions, previous, current),
        }
    }

    /// J − v, not below b_l (nor below 0 when v > J).
    fn shrink(&self, members: usize) -> usize {
        members.saturating_sub(self.step).max(self.min_members)
    }

    /// J + v, not above b_u.
    fn grow(&self, members: usize) -> usize {
        members.saturating_add(self.step).min(self.max_members)
    }

    /// [`AdaptRule::Algorithm`], Algorithm 1 as printed (module documentation).
    fn decide_algorithm(
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
            (self.shrink(members), repetitions.saturating_sub(1).max(1))
        } else if gain > self.kappa && members < self.max_members {
            (self.grow(members), repetitions + 1)
        } else {
            (members, repetitions)
        }
    }

    /// [`AdaptRule::Authors`] (module documentation).
    fn decide_authors(
        &self,
        members: usize,
        repetitions: usize,
        previous: f64,
        current: f64,
    ) -> (usize, usize) {
        let below = current < self.epsilon;
        if !below {
            return (members, repetitions);
        }
        if current <= previous {
            let j = if members > self.min_members && previous - current <= self.kappa {
                self.shrink(members)
            } else {
                members
            };
            (j, repetitions.saturating_sub(1).max(1))
        } else {
            let j = if members < self.max_members && current - previous > self.kappa {
                self.grow(members)
            } else {
                members
            };
            (
                j,
                (repetitions + 1).min(self.max_repetitions.max(repetitions)),
            )
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
        rule: AdaptRule::Algorithm,
        max_repetitions: 8,
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
        // The first comparison is with iteration 0's error: at J = 5000 the paper's
        // 6.11 % at 500 after ≈ 88 % raises J and r (Fig. 10 says neither ever rose).
        assert_eq!(RULE.decide(5000, 8, 88.0, 6.11), (6000, 9));
    }

    /// The authors' driver: Fig. 10's course at the paper's bounds, then the rest.
    #[test]
    fn follows_the_authors_driver() {
        let rule = AdaptiveRule {
            rule: AdaptRule::Authors,
            ..RULE
        };
        // Fig. 10: 500 (a large gain) lowers r only; 1000 (1.5 points) r only; from 1500
        // (gains ≤ κ) J and r together.
        let mut state = (5000, 8);
        let mut course = vec![];
        for (prev, now) in [
            (88.0, 6.11),
            (6.11, 4.6),
            (4.6, 4.1),
            (4.1, 3.9),
            (3.9, 3.8),
        ] {
            state = rule.decide(state.0, state.1, prev, now);
            course.push(state);
        }
        assert_eq!(
            course,
            [(5000, 7), (5000, 6), (4000, 5), (3000, 4), (2000, 3)]
        );
        // Above ε nothing changes, better or worse.
        assert_eq!(rule.decide(5000, 8, 40.0, 12.0), (5000, 8));
        assert_eq!(rule.decide(5000, 8, 12.0, 40.0), (5000, 8));
        // An equal error counts as better (the driver's `>=` on accuracy): r and J fall.
        assert_eq!(rule.decide(5000, 8, 5.0, 5.0), (4000, 7));
        // Worse by at most κ: r rises, J stays; by more than κ: both rise.
        assert_eq!(rule.decide(3000, 4, 5.0, 5.5), (3000, 5));
        assert_eq!(rule.decide(3000, 4, 5.0, 7.0), (4000, 5));
        // Bounds: r stays in [1, r₀], J in [b_l, b_u].
        assert_eq!(rule.decide(1000, 1, 5.0, 4.9), (1000, 1));
        assert_eq!(rule.decide(10_000, 8, 5.0, 7.0), (10_000, 8));
        assert_eq!(rule.decide(1500, 2, 5.0, 4.9), (1000, 1));
        assert_eq!(rule.decide(9500, 3, 5.0, 7.0), (10_000, 4));
    }

    /// A step v larger than J (possible with scaled bounds: b_l = 200, v = 1000 from
    /// J = 500) lands on b_l under both rules instead of wrapping below 0; a NaN error
    /// changes nothing.
    #[test]
    fn a_step_larger_than_j_stops_at_the_lower_bound() {
        for rule in [AdaptRule::Algorithm, AdaptRule::Authors] {
            let rule = AdaptiveRule {
                min_members: 200,
                step: 1000,
                rule,
                ..RULE
            };
            assert_eq!(rule.decide(500, 4, 6.0, 5.5), (200, 3), "{:?}", rule.rule);
            assert_eq!(
                rule.decide(500, 4, f64::NAN, 5.5),
                (500, 4),
                "{:?}",
                rule.rule
            );
            assert_eq!(
                rule.decide(500, 4, 6.0, f64::NAN),
                (500, 4),
                "{:?}",
                rule.rule
            );
        }
    }
}
