//! Scoring logits on the host and the per-iteration metrics record.

use serde::{Deserialize, Serialize};

/// Classes per row of a score matrix of `len` values for `n` samples (at least 1).
fn classes_of(len: usize, n: usize) -> usize {
    (len / n.max(1)).max(1)
}

/// Mean softmax cross-entropy (natural log, as PyTorch's `CrossEntropyLoss`) and the
/// number of correct arg-max predictions. `logits` is n × k row-major (k classes),
/// `labels` n. Ties in the arg-max go to the lowest class index, as `torch.argmax`.
pub fn score_logits(logits: &[f32], labels: &[u8]) -> (f64, usize) {
    let mut loss = 0.0f64;
    let mut correct = 0usize;
    let k = classes_of(logits.len(), labels.len());
    for (row, &label) in logits.chunks_exact(k).zip(labels) {
        let (best, max) = argmax(row);
        let lse = max as f64
            + row
                .iter()
                .map(|&v| ((v - max) as f64).exp())
                .sum::<f64>()
                .ln();
        loss += lse - row[label as usize] as f64;
        correct += usize::from(best == label as usize);
    }
    (loss / labels.len().max(1) as f64, correct)
}

/// Scores averaged class probabilities (n × k, rows summing to 1): mean −ln p\[label\]
/// and correct arg-max count. Probabilities are floored at 1e-300 to keep the loss finite.
pub fn score_probabilities(probs: &[f64], labels: &[u8]) -> (f64, usize) {
    let mut loss = 0.0f64;
    let mut correct = 0usize;
    let classes = classes_of(probs.len(), labels.len());
    for (row, &label) in probs.chunks_exact(classes).zip(labels) {
        let mut best = 0;
        for k in 1..classes {
            if row[k] > row[best] {
                best = k;
            }
        }
        loss -= row[label as usize].max(1e-300).ln();
        correct += usize::from(best == label as usize);
    }
    (loss / labels.len().max(1) as f64, correct)
}

/// Mean squared error of `outputs` against `targets` (same length), averaged over every
/// value (PyTorch's `MSELoss` with its default `reduction='mean'`), in f64. NaN when
/// there are no values.
pub fn mean_squared_error(outputs: &[f32], targets: &[f32]) -> f64 {
    let sum: f64 = outputs
        .iter()
        .zip(targets)
        .map(|(&o, &t)| (f64::from(o) - f64::from(t)).powi(2))
        .sum();
    sum / targets.len() as f64
}

/// Softmax of one row of logits, added into `acc` (f64).
pub fn add_softmax(row: &[f32], acc: &mut [f64]) {
    let (_, max) = argmax(row);
    let e: Vec<f64> = row.iter().map(|&v| ((v - max) as f64).exp()).collect();
    let s: f64 = e.iter().sum();
    for (a, v) in acc.iter_mut().zip(e) {
        *a += v / s;
    }
}

fn argmax(row: &[f32]) -> (usize, f32) {
    let mut best = 0;
    for k in 1..row.len() {
        if row[k] > row[best] || (row[best].is_nan() && !row[k].is_nan()) {
            best = k;
        }
    }
    (best, row[best])
}

/// One row of `metrics.csv`. Test columns are empty on iterations without an evaluation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricsRow {
    /// Updates done so far (0 = the initial ensemble).
    pub iteration: usize,
    /// Epochs done so far (fractional).
    pub epoch: f64,
    /// Ensemble size J at this iteration.
    pub members: usize,
    /// Repetitions r at this iteration.
    pub repetitions: usize,
    /// Cross-entropy of the mean network on this iteration's mini-batch (regression: the
    /// mean squared error).
    #[serde(deserialize_with = "nan_if_null")]
    pub train_loss: f64,
    /// Accuracy (fraction) of the mean network on this iteration's mini-batch (NaN for
    /// real targets).
    #[serde(deserialize_with = "nan_if_null")]
    pub train_accuracy: f64,
    /// Test error in percent of the first `--eval` mode (the mean network by default).
    pub test_error: Option<f64>,
    /// Test cross-entropy of the first `--eval` mode.
    pub test_loss: Option<f64>,
    /// Test error (%) of the last member, when `--eval` includes `last`.
    pub test_error_last: Option<f64>,
    /// Test cross-entropy of the last member.
    pub test_loss_last: Option<f64>,
    /// Test error (%) of the averaged prediction, when `--eval` includes `ensemble`.
    pub test_error_ensemble: Option<f64>,
    /// Test cross-entropy of the averaged prediction.
    pub test_loss_ensemble: Option<f64>,
    /// Test error (%) of the mean network, when `--eval` includes `mean`.
    pub test_error_mean: Option<f64>,
    /// Test cross-entropy of the mean network.
    pub test_loss_mean: Option<f64>,
    /// Wall-clock seconds since training started (evaluation time included).
    pub elapsed_s: f64,
    /// The EnKF step Δt of this iteration's update (Γ was scaled by 1/Δt; 0: no update,
    /// `--step dmc` after the batch's algorithm time reached 1); empty at iteration 0
    /// and for gradient runs.
    #[serde(default)]
    pub dt: Option<f64>,
    /// The ensemble's spread on evaluated iterations: √(mean over the weights of each
    /// weight's variance over the members), before this row's evaluation (σ for the
    /// N(0, σ²) initial ensemble; a collapse of the ensemble drives it to 0). Empty on
    /// other iterations and for gradient runs.
    #[serde(default)]
    pub spread: Option<f64>,
}

/// A float that JSON wrote as `null` (JSON has no NaN: a checkpoint's rows of a
/// regression run hold NaN accuracies) reads back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl MetricsRow {
    /// A row with the training columns filled and no evaluation yet (test columns empty,
    /// `elapsed_s` 0): what each iteration starts from before an evaluation adds to it.
    pub fn training(
        iteration: usize,
        epoch: f64,
        members: usize,
        repetitions: usize,
        train_loss: f64,
        train_accuracy: f64,
    ) -> Self {
        MetricsRow {
            iteration,
            epoch,
            members,
            repetitions,
            train_loss,
            train_accuracy,
            test_error: None,
            test_loss: None,
            test_error_last: None,
            test_loss_last: None,
            test_error_ensemble: None,
            test_loss_ensemble: None,
            test_error_mean: None,
            test_loss_mean: None,
            elapsed_s: 0.0,
            dt: None,
            spread: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_matches_hand_values() {
        // Row 0: uniform logits → loss ln 10, arg-max tie → class 0 (label 0: correct).
        // Row 1: logit 0 for every class but class 3 at ln 9 → p(3) = 9/18 = 0.5.
        let mut logits = vec![0.0f32; 20];
        logits[10 + 3] = 9f32.ln();
        let (loss, correct) = score_logits(&logits, &[0, 3]);
        let expect = (10f64.ln() + 2f64.ln()) / 2.0;
        assert!((loss - expect).abs() < 1e-6, "{loss} vs {expect}");
        assert_eq!(correct, 2);
        let (_, correct) = score_logits(&logits, &[1, 2]);
        assert_eq!(correct, 0);
    }

    #[test]
    fn averaged_softmax_scores() {
        let mut acc = vec![0.0f64; 10];
        let mut row = vec![0.0f32; 10];
        row[7] = 1000.0; // overflow-safe: p(7) = 1
        add_softmax(&row, &mut acc);
        add_softmax(&[0.0; 10], &mut acc);
        for a in &mut acc {
            *a /= 2.0;
        }
        assert!((acc.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let (loss, correct) = score_probabilities(&acc, &[7]);
        assert!((loss + (0.5f64 + 0.05).ln()).abs() < 1e-9);
        assert_eq!(correct, 1);
    }
}
