//! Classification metrics per head: accuracy, macro-F1, per-class precision/recall/F1 and the
//! confusion matrix.

use serde::{Deserialize, Serialize};

/// An evaluation figure to select checkpoints by (`--keep-best`, `--early-stop`): higher is
/// better for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Metric {
    #[serde(rename = "class.accuracy")]
    ClassAccuracy,
    #[serde(rename = "class.macro_f1")]
    ClassMacroF1,
    #[serde(rename = "sentiment.accuracy")]
    SentimentAccuracy,
    #[serde(rename = "sentiment.macro_f1")]
    SentimentMacroF1,
    /// The mean of both heads' accuracies.
    #[serde(rename = "mean.accuracy")]
    MeanAccuracy,
    /// The mean of both heads' macro-F1.
    #[serde(rename = "mean.macro_f1")]
    MeanMacroF1,
}

impl Metric {
    pub const ALL: [Metric; 6] = [
        Metric::ClassAccuracy,
        Metric::ClassMacroF1,
        Metric::SentimentAccuracy,
        Metric::SentimentMacroF1,
        Metric::MeanAccuracy,
        Metric::MeanMacroF1,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::ClassAccuracy => "class.accuracy",
            Metric::ClassMacroF1 => "class.macro_f1",
            Metric::SentimentAccuracy => "sentiment.accuracy",
            Metric::SentimentMacroF1 => "sentiment.macro_f1",
            Metric::MeanAccuracy => "mean.accuracy",
            Metric::MeanMacroF1 => "mean.macro_f1",
        }
    }

    /// Parses a name such as `class.macro_f1`.
    pub fn parse(s: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.name() == s)
    }

    /// The figure in a pair of head metrics.
    pub fn of(self, m: &[HeadMetrics; 2]) -> f64 {
        match self {
            Metric::ClassAccuracy => m[0].accuracy,
            Metric::ClassMacroF1 => m[0].macro_f1,
            Metric::SentimentAccuracy => m[1].accuracy,
            Metric::SentimentMacroF1 => m[1].macro_f1,
            Metric::MeanAccuracy => (m[0].accuracy + m[1].accuracy) / 2.0,
            Metric::MeanMacroF1 => (m[0].macro_f1 + m[1].macro_f1) / 2.0,
        }
    }
}

/// Precision, recall and F1 of one label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScores {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Rows whose true label is this one.
    pub support: usize,
}

/// Metrics of one head over the rows that have its label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadMetrics {
    pub accuracy: f64,
    /// Unweighted mean F1 over the labels that occur in the truth or the predictions
    /// (scikit-learn's default).
    pub macro_f1: f64,
    pub per_class: Vec<ClassScores>,
    /// `confusion[true][predicted]` counts, in label order.
    pub confusion: Vec<Vec<usize>>,
    /// Rows scored.
    pub count: usize,
}

impl HeadMetrics {
    /// Scores `(truth, predicted)` index pairs against `labels`. An undefined ratio
    /// (no predictions of a label, say) counts as 0.
    pub fn compute(labels: &[String], pairs: &[(u32, u32)]) -> Self {
        let k = labels.len();
        let mut confusion = vec![vec![0usize; k]; k];
        for &(t, p) in pairs {
            confusion[t as usize][p as usize] += 1;
        }
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let mut per_class = Vec::with_capacity(k);
        let (mut f1_sum, mut f1_n) = (0.0, 0usize);
        for (i, label) in labels.iter().enumerate() {
            let tp = confusion[i][i];
            let support: usize = confusion[i].iter().sum();
            let predicted: usize = (0..k).map(|r| confusion[r][i]).sum();
            let precision = ratio(tp, predicted);
            let recall = ratio(tp, support);
            let f1 = if precision + recall == 0.0 {
                0.0
            } else {
                2.0 * precision * recall / (precision + recall)
            };
            if support > 0 || predicted > 0 {
                f1_sum += f1;
                f1_n += 1;
            }
            per_class.push(ClassScores {
                label: label.clone(),
                precision,
                recall,
                f1,
                support,
            });
        }
        let correct: usize = (0..k).map(|i| confusion[i][i]).sum();
        Self {
            accuracy: ratio(correct, pairs.len()),
            macro_f1: if f1_n == 0 { 0.0 } else { f1_sum / f1_n as f64 },
            per_class,
            confusion,
            count: pairs.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Labels a, b, c. Truth/prediction pairs chosen so that:
    /// confusion = [[2,1,0],[0,1,1],[1,0,0]].
    #[test]
    fn matches_a_hand_computed_confusion_matrix() {
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        // (truth, pred): a->a twice, a->b once, b->b once, b->c once, c->a once
        let pairs = [(0, 0), (0, 0), (0, 1), (1, 1), (1, 2), (2, 0)];
        let m = HeadMetrics::compute(&labels, &pairs);
        assert_eq!(
            m.confusion,
            vec![vec![2, 1, 0], vec![0, 1, 1], vec![1, 0, 0]]
        );
        assert!((m.accuracy - 3.0 / 6.0).abs() < 1e-12);
        // a: tp 2, predicted 3, support 3 -> p 2/3, r 2/3, f1 2/3
        // b: tp 1, predicted 2, support 2 -> p 1/2, r 1/2, f1 1/2
        // c: tp 0, predicted 1, support 1 -> 0, 0, 0
        let want = [
            (2.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0, 3),
            (0.5, 0.5, 0.5, 2),
            (0.0, 0.0, 0.0, 1),
        ];
        for (s, (p, r, f, n)) in m.per_class.iter().zip(want) {
            assert!(
                (s.precision - p).abs() < 1e-12
                    && (s.recall - r).abs() < 1e-12
                    && (s.f1 - f).abs() < 1e-12,
                "{s:?}"
            );
            assert_eq!(s.support, n);
        }
        assert!((m.macro_f1 - (2.0 / 3.0 + 0.5 + 0.0) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn labels_absent_from_truth_and_predictions_do_not_count_in_macro_f1() {
        let labels: Vec<String> = ["x", "y", "z"].iter().map(|s| s.to_string()).collect();
        let m = HeadMetrics::compute(&labels, &[(0, 0), (1, 1), (1, 0)]);
        // x: p 1/2 r 1 f1 2/3; y: p 1 r 1/2 f1 2/3; z absent
        assert!((m.macro_f1 - 2.0 / 3.0).abs() < 1e-12, "{}", m.macro_f1);
        assert_eq!(m.per_class[2].support, 0);
    }
}
