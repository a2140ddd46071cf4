//! One module per `--task`: wiring and printing only; the work lives in the library modules.

pub mod embed;
pub mod multitask;
mod notes;
mod printer;
pub mod report;
pub mod scenarios;
