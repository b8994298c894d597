//! Drivers: the smol tasks and threads that connect the pure cores to
//! sockets, disks and the kernel.

pub mod console;
pub mod control;
pub mod daemon;
pub mod fence;
pub mod filesystem;
pub mod heartbeat;
pub mod http;
pub mod human;
pub mod incarnation;
pub mod manager;
pub mod mysql_health;
pub mod mysqld;
pub mod nbd;
pub mod peer;
pub mod process;
pub mod resources;
pub mod secret;
pub mod stats;
pub mod store;
pub mod systemd;
pub mod volume;
pub mod watchdog;
pub mod witness;

use std::future::Future;
use std::sync::LazyLock;

/// Binds a unix socket only its owner (root) may use, replacing a stale
/// one left by an earlier run.
pub fn bind_private_socket(
    path: &std::path::Path,
) -> std::io::Result<smol::net::unix::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = smol::net::unix::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(listener)
}

static EXECUTOR: LazyLock<smol::Executor<'static>> = LazyLock::new(smol::Executor::new);

/// Spawns a task on hadb's executor (run by [`start_threads`]).
pub fn spawn<F>(future: F) -> smol::Task<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    EXECUTOR.spawn(future)
}

/// How much data a busy task moves before it lets the others run.
const FAIR_SHARE_BYTES: usize = 1 << 20;
/// What one small item (an ack, a 4 KiB write) counts for.
const FAIR_MIN_ITEM: usize = 4096;

/// Turn-taking for the data path's loops. One executor thread runs every
/// task, heartbeat and watchdog included, and a loop whose input is always
/// ready (a replication socket full of frames, a queue of NBD requests)
/// never returns Pending by itself: under load it could keep the heartbeat
/// from sending or the watchdog from being petted. Each loop counts its
/// work here and yields after about 1 MiB (about 8 ms of hashing on an
/// emulated CPU, far less on a real one).
#[derive(Default)]
pub struct Fair {
    since_yield: usize,
}

impl Fair {
    /// Counts one item of `bytes` of work; past the share, yields once.
    pub async fn done(&mut self, bytes: usize) {
        self.since_yield += bytes.max(FAIR_MIN_ITEM);
        if self.since_yield >= FAIR_SHARE_BYTES {
            self.since_yield = 0;
            smol::future::yield_now().await;
        }
    }
}

/// Runs the executor on `n` threads, and the given future on this one.
pub fn block_on<T>(n: usize, future: impl Future<Output = T>) -> T {
    for i in 0..n {
        let spawned = std::thread::Builder::new()
            .name(format!("hadb-exec-{i}"))
            .spawn(|| smol::block_on(EXECUTOR.run(smol::future::pending::<()>())));
        if let Err(e) = spawned {
            log::error!("cannot start executor thread: {e}");
        }
    }
    smol::block_on(EXECUTOR.run(future))
}
