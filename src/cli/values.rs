//! The parsers of flag values: each turns the text of one flag into its type, or says what
//! was expected.

use crate::config::OutputFormat;
use crate::model::freeze::{FreezePart, Scenario};
use crate::model::quant::Dtype;
use crate::train::metrics::Metric;

pub(super) fn dtype(s: &str) -> Result<Dtype, String> {
    s.parse::<Dtype>().map_err(|e| e.to_string())
}

pub(super) fn metric(s: &str) -> Result<Metric, String> {
    Metric::parse(s).ok_or_else(|| {
        let names: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
        format!("expected one of {}, got '{s}'", names.join(", "))
    })
}

pub(super) fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("expected a number of 0 or more, got '{s}'")),
    }
}

pub(super) fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..1.0).contains(&x) => Ok(x),
        _ => Err(format!(
            "expected a number from 0 up to (not including) 1, got '{s}'"
        )),
    }
}

pub(super) fn loss_weights(s: &str) -> Result<[f64; 2], String> {
    let parts: Vec<&str> = s.split(',').collect();
    let parsed: Vec<f64> = parts
        .iter()
        .filter_map(|p| non_negative(p.trim()).ok())
        .collect();
    match parsed.as_slice() {
        [a, b] if parts.len() == 2 && a + b > 0.0 => Ok([*a, *b]),
        _ => Err(format!(
            "expected two non-negative weights A,B, not both 0 (e.g. 1,0.5), got '{s}'"
        )),
    }
}

pub(super) fn freeze_part(s: &str) -> Result<FreezePart, String> {
    FreezePart::parse(s).map_err(|e| e.to_string())
}

pub(super) fn scenario(s: &str) -> Result<Scenario, String> {
    Scenario::parse(s).map_err(|e| e.to_string())
}

pub(super) fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v <= 1e9 => Ok(v),
        _ => Err(format!("{s} is not a positive number of seconds")),
    }
}

/// The name of a `--format` value as typed.
pub(super) fn format_name(f: OutputFormat) -> String {
    use clap::ValueEnum;
    f.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

pub(super) fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("expected a whole number above 0, got '{s}'")),
    }
}

/// `--task`: 1, 2, 3, or serve ([`super::SERVE`]).
pub(super) fn task(s: &str) -> Result<u8, String> {
    match s {
        "1" | "2" | "3" => Ok(s.parse().expect("a digit")),
        "serve" => Ok(super::SERVE),
        _ => Err(format!("expected 1, 2, 3 or serve, got '{s}'")),
    }
}
