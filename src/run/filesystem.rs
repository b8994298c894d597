//! The filesystem resource: the volume's kernel block device mounted at
//! the data directory on the primary (after the device is attached), and
//! unmounted before the volume steps down. A filesystem is made only by
//! the operator's `hadb volume mkfs`, never on a device that has data.

use std::path::Path;

use crate::config::MysqlConfig;

/// Where `device` is mounted, from /proc/self/mounts.
pub fn mounted_at(device: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let dev = device.to_string_lossy();
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next()? == dev).then(|| f.next().unwrap_or("?").to_owned())
    })
}

/// Held across every mkfs, mount and unmount: the promotion's mount
/// retries while the operator's `hadb volume mkfs` runs, and neither may
/// see the other half done (a mount of a filesystem being made, or two
/// mounts racing, which the kernel answers with EBUSY).
static FS_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fs_lock() -> std::sync::MutexGuard<'static, ()> {
    // A panic while holding it leaves no state behind to protect.
    FS_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Mounts the device at the data directory (the kernel replays the
/// journal). Already mounted there: nothing to do.
pub fn mount(device: &Path, fs: &MysqlConfig) -> Result<(), String> {
    let _held = fs_lock();
    if mounted_at(device).is_some_and(|at| Path::new(&at) == fs.datadir) {
        return Ok(());
    }
    std::fs::create_dir_all(&fs.datadir)
        .map_err(|e| format!("cannot create {}: {e}", fs.datadir.display()))?;
    let options = std::ffi::CString::new(fs.mount_options.as_str())
        .map_err(|_| "mysql.mount_options contains a NUL byte".to_string())?;
    rustix::mount::mount(
        device,
        &fs.datadir,
        fs.fstype.as_str(),
        rustix::mount::MountFlags::NOATIME,
        Some(options.as_c_str()),
    )
    .map_err(|e| {
        let hint = if e == rustix::io::Errno::INVAL {
            "; a new volume has no filesystem yet: `hadb volume mkfs` makes one"
        } else {
            ""
        };
        format!(
            "cannot mount {} ({}) at {}: {e}{hint}",
            device.display(),
            fs.fstype,
            fs.datadir.display()
        )
    })
}

/// The processes with files open under `dir`, for the refusal message.
fn holders(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let holds = std::fs::read_dir(p.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .chain(std::fs::read_link(p.path().join("cwd")).ok())
            .any(|target| target.starts_with(dir));
        if holds {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push(format!("{} ({})", pid, comm.trim()));
        }
    }
    out
}

/// The device and the filesystem settings, when hadb manages a mount.
pub type Managed = Option<(std::path::PathBuf, MysqlConfig)>;

pub fn managed(config: &crate::config::Config) -> Managed {
    match (&config.volume.nbd_device, &config.mysql) {
        (Some(d), Some(m)) if m.on_volume => Some((d.clone(), m.clone())),
        _ => None,
    }
}

/// Unmounts the data directory if the device is mounted there; refuses,
/// naming who holds it, if it is busy.
pub fn unmount(device: &Path, fs: &MysqlConfig) -> Result<(), String> {
    let _held = fs_lock();
    let Some(at) = mounted_at(device) else {
        return Ok(());
    };
    rustix::mount::unmount(Path::new(&at), rustix::mount::UnmountFlags::empty()).map_err(|e| {
        let who = holders(Path::new(&at));
        if e == rustix::io::Errno::BUSY && !who.is_empty() {
            format!(
                "{at} is busy: {} hold files there; stop them (mysqld is stopped by hadb itself once it supervises it)",
                who.join(", ")
            )
        } else {
            format!("cannot unmount {at} ({}): {e}", fs.datadir.display())
        }
    })
}

/// Makes a filesystem on the device, unless it holds data (a filesystem,
/// a partition table) and `force` is not given.
pub fn mkfs(device: &Path, fs: &MysqlConfig, force: bool) -> Result<(), String> {
    use std::io::Read;
    let _held = fs_lock();
    let mut head = vec![0u8; 70 * 1024];
    let n = std::fs::File::open(device)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| format!("cannot read {}: {e}", device.display()))?;
    if !force && let Some(what) = crate::core::meta::detect_contents(&head[..n]) {
        return Err(format!(
            "{} already holds {what}; refusing to make a filesystem over it (`--force` if you mean it)",
            device.display()
        ));
    }
    // Not even with --force: the filesystem is in use.
    if let Some(at) = mounted_at(device) {
        return Err(format!(
            "{} is mounted at {at}: its filesystem is in use; unmount it first (`hadb volume secondary` on this node) if you really mean to replace it",
            device.display()
        ));
    }
    // We checked for data above: the tool must not ask again (there is
    // no terminal to answer it).
    let quiet: &[&str] = match fs.fstype.as_str() {
        t if t.starts_with("ext") => &["-F", "-q"],
        "xfs" | "btrfs" => &["-f"],
        _ => &[],
    };
    let out = crate::run::process::output(
        std::process::Command::new(format!("mkfs.{}", fs.fstype))
            .args(quiet)
            .arg(device)
            .stdin(std::process::Stdio::null()),
    )
    .map_err(|e| format!("cannot run mkfs.{}: {e}", fs.fstype))?;
    if !out.status.success() {
        return Err(format!(
            "mkfs.{} {} failed: {}",
            fs.fstype,
            device.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
