//! Files that hold a secret (the cluster key, the monitor's password, the
//! fence's ssh key, Azure's client secret or certificate): one reader for
//! all of them, with one rule.
//!
//! The rule: the file is a regular file, it belongs to root or to the user
//! hadb runs as, and neither its group nor others have any permission on
//! it. The owner matters as much as the mode: a mode-0600 file owned by
//! another account is one that account can rewrite (a key it then knows)
//! or read. The file is opened once and the checks are made on the open
//! descriptor (`fstat`), so the bytes read are those of the file checked,
//! not of one swapped in between.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Larger than any key, password or PEM bundle: a bigger "secret" is the
/// wrong file.
const MAX_BYTES: u64 = 1 << 20;

#[derive(Debug)]
pub enum SecretError {
    /// It could not be opened (missing, no permission).
    Open {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A directory, a device, a FIFO…
    NotAFile { what: &'static str, path: PathBuf },
    /// Owned by an account that is neither root nor hadb's own.
    Owner {
        what: &'static str,
        path: PathBuf,
        uid: u32,
        me: u32,
    },
    /// Group or others have some permission on it.
    Mode {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    /// Too large to be a secret.
    TooLarge {
        what: &'static str,
        path: PathBuf,
        len: u64,
    },
    /// Opened and checked, but reading failed.
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl SecretError {
    /// The file in question.
    pub fn path(&self) -> &Path {
        match self {
            SecretError::Open { path, .. }
            | SecretError::NotAFile { path, .. }
            | SecretError::Owner { path, .. }
            | SecretError::Mode { path, .. }
            | SecretError::TooLarge { path, .. }
            | SecretError::Read { path, .. } => path,
        }
    }

    /// The file could not be opened because it is not there.
    pub fn is_missing(&self) -> bool {
        matches!(self, SecretError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// The command that makes a file root's own, for the messages.
fn fix(path: &Path) -> String {
    let p = path.display();
    format!("`chown root:root {p}; chmod 600 {p}`")
}

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretError::Open { what, path, source } => {
                write!(f, "cannot open the {what} {}: {source}", path.display())
            }
            SecretError::NotAFile { what, path } => write!(
                f,
                "the {what} {} is not a regular file; point the setting at the file itself",
                path.display()
            ),
            SecretError::Owner {
                what,
                path,
                uid,
                me,
            } => write!(
                f,
                "the {what} {} belongs to uid {uid}, neither root nor the user hadb runs as (uid {me}), which could read or rewrite it; it was not used: {}",
                path.display(),
                fix(path)
            ),
            SecretError::Mode { what, path, mode } => write!(
                f,
                "the {what} {} has mode {mode:04o}, which lets its group or others at it; it was not used: {}",
                path.display(),
                fix(path)
            ),
            SecretError::TooLarge { what, path, len } => write!(
                f,
                "the {what} {} holds {len} bytes, more than any secret; check the setting names the right file",
                path.display()
            ),
            SecretError::Read { what, path, source } => {
                write!(f, "cannot read the {what} {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for SecretError {}

/// Reads the secret file `path` (`what` names it in messages: "key file"),
/// refusing one that breaks the rule in the module doc.
pub fn read_secret(what: &'static str, path: &Path) -> Result<Vec<u8>, SecretError> {
    let owned = || path.to_owned();
    // O_NONBLOCK: a FIFO put in the file's place must not hang the open;
    // it is refused below as not a regular file.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| SecretError::Open {
            what,
            path: owned(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| SecretError::Read {
        what,
        path: owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(SecretError::NotAFile {
            what,
            path: owned(),
        });
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(SecretError::Owner {
            what,
            path: owned(),
            uid: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretError::Mode {
            what,
            path: owned(),
            mode,
        });
    }
    if meta.len() > MAX_BYTES {
        return Err(SecretError::TooLarge {
            what,
            path: owned(),
            len: meta.len(),
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    (&mut file)
        .take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| SecretError::Read {
            what,
            path: owned(),
            source,
        })?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(SecretError::TooLarge {
            what,
            path: owned(),
            len: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(name: &str, mode: u32) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hadb-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, b"0123456789abcdef0123").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_private_file_of_its_own_is_read() {
        let path = file("ok", 0o600);
        assert_eq!(
            read_secret("key file", &path).unwrap(),
            b"0123456789abcdef0123"
        );
        let path = file("ro", 0o400);
        assert!(read_secret("key file", &path).is_ok());
    }

    #[test]
    fn a_file_owned_by_another_account_is_refused_whatever_its_mode() {
        let path = file("nobody", 0o600);
        // 65534: nobody. The tests run as root (see .ci/run), which may
        // give a file away.
        std::os::unix::fs::chown(&path, Some(65534), Some(65534))
            .expect("chown needs root: run the tests as root");
        let err = read_secret("key file", &path).unwrap_err();
        assert!(
            matches!(err, SecretError::Owner { uid: 65534, .. }),
            "{err}"
        );
        let said = err.to_string();
        assert!(
            said.contains(&path.display().to_string())
                && said.contains("uid 65534")
                && said.contains(&format!(
                    "chown root:root {0}; chmod 600 {0}",
                    path.display()
                )),
            "{said}"
        );
    }

    #[test]
    fn group_or_other_bits_are_refused() {
        for mode in [0o640, 0o604, 0o610, 0o620] {
            let path = file(&format!("m{mode:o}"), mode);
            let err = read_secret("key file", &path).unwrap_err();
            assert!(matches!(err, SecretError::Mode { .. }), "{mode:o}: {err}");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
    }

    #[test]
    fn not_a_regular_file_or_missing_is_refused() {
        let dir = std::env::temp_dir();
        let err = read_secret("key file", &dir).unwrap_err();
        assert!(matches!(err, SecretError::NotAFile { .. }), "{err}");
        let err = read_secret("key file", Path::new("/nonexistent/hadb/key")).unwrap_err();
        assert!(err.is_missing(), "{err}");
    }
}
