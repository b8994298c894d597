pub mod alloc;
pub mod cred;
pub mod memory;
pub mod nbd_kernel;
pub mod nbd_netlink;
pub mod watchdog;
