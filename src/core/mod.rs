//! The pure cores: wire formats and state machines with no sockets, clocks
//! or processes, so tests and the simulation can drive them directly.

pub mod al;
pub mod bitmap;
pub mod fence;
pub mod gate;
pub mod heartbeat;
pub mod incarnation;
pub mod manager;
pub mod meta;
pub mod mysql_wire;
pub mod nbd;
pub mod quorum;
pub mod replica;
pub mod service;
pub mod settings;
pub mod wire;
