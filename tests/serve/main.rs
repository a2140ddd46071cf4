//! Serve mode (`--task=serve`), through the real binary on 127.0.0.1 with port 0: vectors equal
//! to task 1's, dynamic batching under concurrent clients, every limit and bad request,
//! shutdown, /predict, the official OpenAI client and schemathesis.

#[path = "../common/mod.rs"]
mod common;

mod batching;
mod early;
mod faults;
mod harness;
mod lifecycle;
mod limits;
mod predict;
mod python;
mod vectors;
