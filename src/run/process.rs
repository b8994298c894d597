//! Process hygiene: hadb is a child subreaper, so the orphans of what it
//! starts (a mysqld helper whose parent exited, say) become its children,
//! and it reaps every one of them; it can also run as PID 1.
//!
//! hadb's own children are waited for by whoever started them (mysqld's
//! driver, `mkfs`); reaping them here would steal their exit status. So
//! every child hadb starts goes through [`spawn`], which records its pid
//! under the same lock the reaper holds while it looks for zombies: the
//! reaper takes only zombies nobody owns.

use std::collections::BTreeSet;
use std::io;
use std::process::{Child, Command, Output};
use std::sync::Mutex;
use std::time::Duration;

static OWNED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn owned() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    OWNED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts `cmd`; the caller waits for it and then calls [`release`].
pub fn spawn(cmd: &mut Command) -> io::Result<Child> {
    let mut owned = owned();
    let child = cmd.spawn()?;
    owned.insert(child.id());
    Ok(child)
}

/// The child `pid` was waited for by its owner.
pub fn release(pid: u32) {
    owned().remove(&pid);
}

/// `Command::output` for a child the reaper must leave alone.
pub fn output(cmd: &mut Command) -> io::Result<Output> {
    use std::process::Stdio;
    let child = spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))?;
    let pid = child.id();
    let out = child.wait_with_output();
    release(pid);
    out
}

/// Orphans reparented to hadb end here instead of at init.
pub fn become_subreaper() {
    if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        log::warn!("process: cannot become a child subreaper ({e}); orphans of mysqld go to init");
    }
}

/// Reaps every exited child nobody owns; returns (pid, name) of each.
pub fn reap_orphans() -> Vec<(u32, String)> {
    let owned = owned();
    let me = rustix::process::getpid().as_raw_nonzero().get() as u32;
    let mut reaped = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return reaped;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if owned.contains(&pid) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            continue;
        };
        // "pid (comm) S ppid ...": comm may hold spaces and parentheses,
        // so the fields start after the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (state, ppid) = (f.next(), f.next().and_then(|s| s.parse::<u32>().ok()));
        if state != Some("Z") || ppid != Some(me) {
            continue;
        }
        let name = head.split_once('(').map_or("", |(_, c)| c).to_owned();
        if let Some(p) = rustix::process::Pid::from_raw(pid as i32)
            && let Ok(Some(_)) =
                rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG)
        {
            reaped.push((pid, name));
        }
    }
    reaped
}

/// Reaps orphans as they exit, for as long as hadb runs.
pub async fn reaper() {
    let mut sigchld = async_signal::Signals::new([async_signal::Signal::Child]).ok();
    loop {
        use smol::future::FutureExt;
        use smol::stream::StreamExt;
        // SIGCHLD wakes it at once; the timer catches a signal that came
        // while a scan ran (signals of one kind merge).
        let signal = async {
            match sigchld.as_mut() {
                Some(s) => {
                    s.next().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        signal
            .or(async {
                smol::Timer::after(Duration::from_secs(1)).await;
            })
            .await;
        for (pid, name) in smol::unblock(reap_orphans).await {
            log::info!("process: reaped orphan {pid} ({name})");
        }
    }
}

/// As PID 1 (hadb as a system's or container's init): mounts /proc,
/// /sys and /dev where they are missing, so the rest of hadb finds them.
pub fn init_as_pid1() {
    if rustix::process::getpid().as_raw_nonzero().get() != 1 {
        return;
    }
    log::info!("process: running as PID 1");
    use rustix::mount::{MountFlags, mount};
    let nosuid = MountFlags::NOSUID | MountFlags::NOEXEC | MountFlags::NODEV;
    for (what, at, fstype, flags, probe) in [
        ("proc", "/proc", "proc", nosuid, "/proc/self/stat"),
        ("sysfs", "/sys", "sysfs", nosuid, "/sys/kernel"),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MountFlags::NOSUID,
            "/dev/null",
        ),
    ] {
        if std::path::Path::new(probe).exists() {
            continue;
        }
        let _ = std::fs::create_dir_all(at);
        match mount(what, at, fstype, flags, None) {
            Ok(()) => log::info!("process: mounted {fstype} at {at}"),
            Err(e) => log::warn!("process: cannot mount {fstype} at {at}: {e}"),
        }
    }
}
