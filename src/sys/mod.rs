pub mod memory;
pub mod nbd_kernel;
