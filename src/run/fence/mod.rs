//! Fence methods: ways to make sure the peer is powered off before this
//! node takes over from it.

pub mod azure;
