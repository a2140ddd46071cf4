//! Training the multitask model: loss, loop, metrics, checkpoints.

pub mod adamw;
pub mod checkpoint;
pub mod embedding_cache;
pub mod evaluate;
pub mod loss;
pub mod memory;
pub mod metrics;
mod prefix_cache;
pub mod prepared;
pub mod save_target;
pub mod schedule;
pub mod session;
pub mod sparse;
pub mod trainer;
pub mod verify;
