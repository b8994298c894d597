pub mod alloc;
pub mod memory;
pub mod nbd_kernel;
pub mod nbd_netlink;
