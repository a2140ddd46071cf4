//! Readable tables for training reports: epoch lines, per-head metrics, confusion matrices.

use crate::data::TASKS;
use crate::train::metrics::HeadMetrics;
use crate::train::trainer::EpochReport;

/// One line per epoch: loss per head, eval accuracy per head, time.
pub fn epoch_line(e: &EpochReport, epochs: usize) -> String {
    let eval = match &e.eval {
        Some([a, b]) => format!(
            "  eval accuracy class {:.4} sentiment {:.4}",
            a.accuracy, b.accuracy
        ),
        None => String::new(),
    };
    format!(
        "epoch {}/{epochs}  loss class {:.4} sentiment {:.4}{eval}  {:.1}s",
        e.epoch, e.loss[0], e.loss[1], e.seconds
    )
}

/// Accuracy, macro-F1, per-label scores and the confusion matrix of one head.
pub fn head_table(task: usize, labels: &[String], m: &HeadMetrics) -> String {
    let w = labels.iter().map(|l| l.len()).max().unwrap_or(5).max(9);
    let mut s = format!(
        "{} head: accuracy {:.4}  macro-F1 {:.4}  ({} rows)\n",
        TASKS[task], m.accuracy, m.macro_f1, m.count
    );
    s += &format!(
        "  {:<w$} {:>9} {:>9} {:>9} {:>8}\n",
        "label", "precision", "recall", "f1", "support"
    );
    for c in &m.per_class {
        s += &format!(
            "  {:<w$} {:>9.4} {:>9.4} {:>9.4} {:>8}\n",
            c.label, c.precision, c.recall, c.f1, c.support
        );
    }
    s += "  confusion matrix (rows: true label, columns: predicted)\n";
    let cw = labels.iter().map(|l| l.len()).max().unwrap_or(4).max(4);
    s += &format!("  {:<w$}", "");
    for l in labels {
        s += &format!(" {l:>cw$}");
    }
    s += "\n";
    for (l, row) in labels.iter().zip(&m.confusion) {
        s += &format!("  {l:<w$}");
        for n in row {
            s += &format!(" {n:>cw$}");
        }
        s += "\n";
    }
    s
}
