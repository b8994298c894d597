//! hadb: a replicated volume, heartbeat, manager and fencing for a
//! two-node MySQL pair, in one binary. The library exists so that tests and
//! tools can drive the same code the daemon runs.

#![deny(unsafe_code)]

pub mod config;
pub mod core;
pub mod logging;
pub mod run;
pub mod sys;
