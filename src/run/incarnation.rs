//! Takes this run's heartbeat incarnation: reads the last one from
//! `<state_dir>/incarnation`, chooses the next with the pure
//! [`crate::core::incarnation::next`], and writes it durably (temporary
//! file, fsync, rename, fsync of the directory) before any heartbeat
//! carries it. A number sent before it is on disk could be handed out
//! again after a crash, and the peer would drop that run as a replay.
//!
//! Blocking; called once at start, before the heartbeat exists.

use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::core::incarnation;

/// The state file's name in `state_dir`.
pub const FILE: &str = "incarnation";

/// Why no incarnation was taken. In every case nothing was sent and hadb
/// does not start: a guessed number could be lower than the last run's,
/// and the peer would drop this node's heartbeats, lose it and fence it.
#[derive(Debug)]
pub enum Error {
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    Damaged {
        path: PathBuf,
        text: String,
    },
    Exhausted {
        path: PathBuf,
        last: u64,
    },
    Write {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Dir { path, source } => write!(
                f,
                "cannot create the state directory {}: {source}; hadb keeps the last heartbeat incarnation there and does not start without it: create it (owned by root, mode 0700) or set `state_dir` to a directory on a local disk that hadb can write",
                path.display()
            ),
            Error::Read { path, source } => write!(
                f,
                "cannot read the last heartbeat incarnation from {}: {source}; hadb does not start rather than guess one (a lower number than the last run's makes the peer drop this node as a replay and fence it): check the file's permissions (root, 0600) and the disk",
                path.display()
            ),
            Error::Damaged { path, text } => write!(
                f,
                "{} holds {text:?}, not an incarnation (a decimal number): the file is damaged; hadb does not start rather than guess. If this host's clock is right (`timedatectl`), remove the file and the next start takes the clock; otherwise write into it a number above this node's last incarnation (on the peer, `hadb status --json`: heartbeat.peer_incarnation)",
                path.display()
            ),
            Error::Exhausted { path, last } => write!(
                f,
                "{} holds {last}, so close to the largest number that no later incarnation is left; hadb does not start. Set the clock right, stop the peer, remove the file, then start both (the peer forgets this node's old runs when it restarts)",
                path.display()
            ),
            Error::Write { path, what, source } => write!(
                f,
                "cannot {what} {}: {source}; the new heartbeat incarnation must be on disk before a heartbeat carries it, so hadb does not start: check free space and permissions in that directory (`state_dir`)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for Error {}

/// The wall clock in µs since the epoch; 0 for a clock before it (not
/// set), which the stored value then makes up for.
fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Takes this run's incarnation (see the module's doc); `parity` is the
/// node's place in name order, 0 on the witness.
pub fn take(state_dir: &Path, parity: u64) -> Result<u64, Error> {
    take_at(state_dir, parity, wall_us())
}

/// [`take`] with the clock's reading passed in.
pub fn take_at(state_dir: &Path, parity: u64, wall_us: u64) -> Result<u64, Error> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|source| Error::Dir {
            path: state_dir.to_owned(),
            source,
        })?;
    let path = state_dir.join(FILE);
    let last = match std::fs::read(&path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            Some(incarnation::decode(&text).ok_or_else(|| Error::Damaged {
                path: path.clone(),
                text: text.chars().take(40).collect(),
            })?)
        }
        // A first start, or a new state directory: the clock alone.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(Error::Read { path, source }),
    };
    let Some(next) = incarnation::next(last, wall_us, parity) else {
        return Err(Error::Exhausted {
            path,
            last: last.unwrap_or(u64::MAX),
        });
    };
    write_durably(state_dir, &path, &incarnation::encode(next))?;
    Ok(next)
}

/// Replaces `path` so that after a crash at any point it holds either the
/// old contents or the new, never a mix or nothing.
fn write_durably(dir: &Path, path: &Path, text: &str) -> Result<(), Error> {
    // One temporary name per process: two daemons sharing a state
    // directory (tests with both nodes on one host) never write into
    // each other's.
    let tmp = dir.join(format!(".{FILE}.{}.tmp", std::process::id()));
    let fail = |what: &'static str, at: &Path| {
        let at = at.to_owned();
        move |source| Error::Write {
            path: at,
            what,
            source,
        }
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail("create", &tmp))?;
    f.write_all(text.as_bytes()).map_err(fail("write", &tmp))?;
    f.sync_all().map_err(fail("fsync", &tmp))?;
    drop(f);
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail("rename into place", path)(e));
    }
    // The rename is durable only once the directory is.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail("fsync the directory of", path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_US: u64 = 3_600_000_000;
    const NOW_US: u64 = 1_735_689_600_000_000;

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("hadb-incarnation-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn each_start_is_higher_and_kept_whatever_the_clock_does() {
        let d = dir("steps").join("state");
        let first = take_at(&d, 0, NOW_US).unwrap();
        assert_eq!(first, NOW_US);
        let mut last = first;
        for wall in [NOW_US - HOUR_US, 0, NOW_US] {
            let n = take_at(&d, 0, wall).unwrap();
            assert!(n > last, "{n} after {last} at clock {wall}");
            assert_eq!(
                std::fs::read_to_string(d.join(FILE)).unwrap(),
                format!("{n}\n")
            );
            last = n;
        }
        assert!(take_at(&d, 0, NOW_US + HOUR_US).unwrap() >= NOW_US + HOUR_US);
        // Only the state file is left: no temporary files.
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE]);
        let _ = std::fs::remove_dir_all(d.parent().unwrap());
    }

    #[test]
    fn a_damaged_file_stops_the_start_and_is_left_alone() {
        let d = dir("damaged");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(FILE), "17356896\u{0}\u{0}").unwrap();
        let err = take_at(&d, 0, NOW_US).unwrap_err().to_string();
        assert!(
            err.contains(&d.join(FILE).display().to_string()) && err.contains("damaged"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(d.join(FILE)).unwrap(),
            b"17356896\0\0",
            "not rewritten"
        );
        std::fs::write(d.join(FILE), format!("{}\n", u64::MAX)).unwrap();
        let err = take_at(&d, 0, NOW_US).unwrap_err().to_string();
        assert!(err.contains("no later incarnation"), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_state_dir_that_is_a_file_names_it() {
        let d = dir("notadir");
        std::fs::create_dir_all(&d).unwrap();
        let file = d.join("plain");
        std::fs::write(&file, "").unwrap();
        let err = take_at(&file, 0, NOW_US).unwrap_err().to_string();
        assert!(
            err.contains(&file.display().to_string()) && err.contains("state_dir"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
