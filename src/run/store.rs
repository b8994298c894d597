//! The backing store: a block device or a regular file holding the data
//! area followed by the metadata (see `core::meta`). Blocking calls; they
//! run on the volume's disk thread or in `hadb volume` commands.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::FallocateFlags;

use crate::core::meta::{self, Layout, Superblock};

#[derive(Debug)]
pub enum Error {
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    NoMetadata {
        path: PathBuf,
    },
    BadMetadata {
        path: PathBuf,
        source: meta::Error,
    },
    HasMetadata {
        path: PathBuf,
    },
    HasContents {
        path: PathBuf,
        what: &'static str,
    },
    Layout {
        path: PathBuf,
        source: meta::Error,
    },
    SizeChanged {
        path: PathBuf,
        recorded: u64,
        now: u64,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Open { path, source } => write!(
                f,
                "cannot open volume device {}: {source}; check volume.device and that nothing else (a mount, another hadb) holds it",
                path.display()
            ),
            Error::Io { path, what, source } => {
                write!(f, "{what} on {} failed: {source}", path.display())
            }
            Error::NoMetadata { path } => write!(
                f,
                "{} has no hadb metadata; create it with `hadb volume create-md` (this node's copy will then be synchronised from its peer)",
                path.display()
            ),
            Error::BadMetadata { path, source } => write!(
                f,
                "the metadata on {} is unreadable ({source}); nothing was written. If this node's copy is expendable, `hadb volume create-md --force` recreates it and a full resync from the peer follows",
                path.display()
            ),
            Error::HasMetadata { path } => write!(
                f,
                "{} already holds hadb metadata; refusing to overwrite it (its generations decide who has the newest data). Use --force only if this copy is to be discarded",
                path.display()
            ),
            Error::HasContents { path, what } => write!(
                f,
                "{} holds {what}; refusing to write metadata over it. Use --force if its contents may be lost",
                path.display()
            ),
            Error::Layout { path, source } => write!(f, "{}: {source}", path.display()),
            Error::SizeChanged {
                path,
                recorded,
                now,
            } => write!(
                f,
                "{} was {recorded} bytes when its metadata was written and is {now} now; resizing is not supported yet, restore the old size",
                path.display()
            ),
        }
    }
}

impl std::error::Error for Error {}

pub struct Store {
    path: PathBuf,
    file: File,
    pub layout: Layout,
    /// Which slot holds the newest superblock; the next write goes to the
    /// other one.
    newest_slot: usize,
    pub superblock: Superblock,
    /// The activity log's newest slot and sequence.
    al_slot: usize,
    al_seq: u64,
}

/// Opens the device for reading and writing. A block device is opened
/// exclusively, so the kernel refuses to mount it (or let another hadb open
/// it) behind our back.
pub fn open_device(path: &Path) -> Result<(File, u64), Error> {
    let is_block = std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    if is_block {
        opts.custom_flags(rustix::fs::OFlags::EXCL.bits() as i32);
    }
    let mut file = opts.open(path).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })?;
    let size = file.seek(SeekFrom::End(0)).map_err(|source| Error::Io {
        path: path.to_owned(),
        what: "finding the size",
        source,
    })?;
    Ok((file, size))
}

fn read_slots(
    path: &Path,
    file: &File,
    layout: &Layout,
) -> Result<[Result<Superblock, meta::Error>; 2], Error> {
    let mut out = [Err(meta::Error::BadMagic), Err(meta::Error::BadMagic)];
    for (i, off) in layout.slot_offsets.iter().enumerate() {
        let mut buf = vec![0u8; meta::SLOT_SIZE as usize];
        file.read_exact_at(&mut buf, *off)
            .map_err(|source| Error::Io {
                path: path.to_owned(),
                what: "reading metadata",
                source,
            })?;
        out[i] = Superblock::decode(&buf);
    }
    Ok(out)
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, Error> {
        let (file, size) = open_device(path)?;
        let layout = Layout::for_device(size).map_err(|source| Error::Layout {
            path: path.to_owned(),
            source,
        })?;
        let [a, b] = read_slots(path, &file, &layout)?;
        let (newest_slot, superblock) = match meta::pick(a, b) {
            Ok(found) => found,
            Err(meta::Error::BadMagic) => {
                return Err(Error::NoMetadata {
                    path: path.to_owned(),
                });
            }
            Err(source) => {
                return Err(Error::BadMetadata {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        if superblock.layout.device_size != layout.device_size {
            return Err(Error::SizeChanged {
                path: path.to_owned(),
                recorded: superblock.layout.device_size,
                now: layout.device_size,
            });
        }
        Ok(Store {
            path: path.to_owned(),
            file,
            layout,
            newest_slot,
            superblock,
            al_slot: 1,
            al_seq: 0,
        })
    }

    /// Writes fresh metadata. Refuses to overwrite metadata or recognisable
    /// contents unless forced.
    pub fn create(path: &Path, volume_id: [u8; 16], force: bool) -> Result<Store, Error> {
        let (file, size) = open_device(path)?;
        let layout = Layout::for_device(size).map_err(|source| Error::Layout {
            path: path.to_owned(),
            source,
        })?;
        if !force {
            let [a, b] = read_slots(path, &file, &layout)?;
            if a.is_ok() || b.is_ok() || !matches!(meta::pick(a, b), Err(meta::Error::BadMagic)) {
                return Err(Error::HasMetadata {
                    path: path.to_owned(),
                });
            }
            let mut head = vec![0u8; (70 * 1024).min(layout.data_size as usize)];
            file.read_exact_at(&mut head, 0)
                .map_err(|source| Error::Io {
                    path: path.to_owned(),
                    what: "reading the device head",
                    source,
                })?;
            if let Some(what) = meta::detect_contents(&head) {
                return Err(Error::HasContents {
                    path: path.to_owned(),
                    what,
                });
            }
        }
        let superblock = Superblock::new(layout, volume_id);
        let mut store = Store {
            path: path.to_owned(),
            file,
            layout,
            newest_slot: 1,
            superblock,
            al_slot: 1,
            al_seq: 0,
        };
        // Zero the bitmap and activity log, then write both slots so that a
        // stale slot from older metadata cannot win later.
        let zeros = vec![0u8; (layout.bitmap_bytes + layout.al_bytes) as usize];
        store
            .file
            .write_all_at(&zeros, layout.bitmap_offset)
            .map_err(|source| Error::Io {
                path: path.to_owned(),
                what: "clearing the bitmap",
                source,
            })?;
        let sb = store.superblock.clone();
        store.write_superblock(sb.clone())?;
        store.write_superblock(sb)?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A second handle for readers on other threads.
    pub fn reader(&self) -> Result<File, Error> {
        self.file.try_clone().map_err(|source| Error::Io {
            path: self.path.clone(),
            what: "duplicating the handle",
            source,
        })
    }

    /// Writes the superblock to the older slot and flushes, so a crash at
    /// any point leaves one valid copy.
    pub fn write_superblock(&mut self, mut sb: Superblock) -> Result<(), Error> {
        sb.seq = self.superblock.seq.max(sb.seq) + 1;
        let slot = 1 - self.newest_slot;
        let bytes = sb.encode();
        self.file
            .write_all_at(&bytes, self.layout.slot_offsets[slot])
            .and_then(|()| self.file.sync_data())
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                what: "writing metadata",
                source,
            })?;
        self.newest_slot = slot;
        self.superblock = sb;
        Ok(())
    }

    /// The on-disk bitmap (bits past the data area ignored).
    pub fn read_bitmap(&self) -> Result<crate::core::bitmap::Bitmap, Error> {
        let l = &self.layout;
        let mut buf = vec![0u8; l.bitmap_bytes as usize];
        self.file
            .read_exact_at(&mut buf, l.bitmap_offset)
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                what: "reading the bitmap",
                source,
            })?;
        let mut bits = crate::core::bitmap::Bitmap::default();
        let limit = l.data_size / meta::BLOCK;
        for (p, page) in buf.chunks(crate::core::bitmap::PAGE_BYTES).enumerate() {
            if page.iter().any(|&b| b != 0) {
                bits.merge_page(p as u64, page, limit);
            }
        }
        Ok(bits)
    }

    /// Writes bitmap pages and flushes, so they are durable before the
    /// activity-log transaction that relies on them.
    pub fn write_bitmap_pages(&self, pages: &[(u64, Vec<u8>)]) -> std::io::Result<()> {
        let l = &self.layout;
        for (p, img) in pages {
            let at = p * crate::core::bitmap::PAGE_BYTES as u64;
            if at + img.len() as u64 <= l.bitmap_bytes {
                self.file.write_all_at(img, l.bitmap_offset + at)?;
            }
        }
        self.file.sync_data()
    }

    /// The newest valid activity-log transaction: the extents in the log
    /// (none if it was never written).
    pub fn read_activity_log(&mut self) -> Result<Vec<u64>, Error> {
        let l = &self.layout;
        let n = crate::core::al::TRANSACTION_BYTES;
        let mut buf = vec![0u8; 2 * n];
        self.file
            .read_exact_at(&mut buf, l.al_offset)
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                what: "reading the activity log",
                source,
            })?;
        Ok(match crate::core::al::pick(&buf[..n], &buf[n..]) {
            Some((slot, seq, extents)) => {
                self.al_slot = slot;
                self.al_seq = seq;
                extents
            }
            None => Vec::new(),
        })
    }

    /// Makes every write before it durable, then writes the transaction to
    /// the older slot and flushes: a crash leaves the old or the new log.
    pub fn write_activity_log(&mut self, extents: &[u64]) -> std::io::Result<()> {
        self.file.sync_data()?;
        let slot = 1 - self.al_slot;
        self.al_seq += 1;
        let bytes = crate::core::al::encode(self.al_seq, extents);
        let at = self.layout.al_offset + (slot * crate::core::al::TRANSACTION_BYTES) as u64;
        self.file.write_all_at(&bytes, at)?;
        self.file.sync_data()?;
        self.al_slot = slot;
        Ok(())
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    pub fn read(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Zeroes a range. Punching a hole reads back as zeros on files and on
    /// block devices that support it; where it does not, zeros are written,
    /// so both copies always read the same.
    pub fn zero(&self, offset: u64, len: u64, punch: bool, fua: bool) -> std::io::Result<()> {
        let mode = if punch {
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
        } else {
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
        };
        if rustix::fs::fallocate(&self.file, mode, offset, len).is_err() {
            let chunk = vec![0u8; (len.min(1 << 20)) as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(chunk.len() as u64) as usize;
                self.file.write_all_at(&chunk[..n], at)?;
                at += n as u64;
            }
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

pub fn errno_of(e: &std::io::Error) -> u32 {
    use crate::core::nbd;
    match e.raw_os_error() {
        Some(28) => nbd::ENOSPC,
        Some(1) | Some(13) => nbd::EPERM,
        Some(12) => nbd::ENOMEM,
        Some(22) => nbd::EINVAL,
        _ => nbd::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, size: u64) -> PathBuf {
        let p = std::env::temp_dir().join(format!("hadb-store-{}-{name}", std::process::id()));
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    #[test]
    fn create_open_and_refuse_overwrite() {
        let p = temp("a", 16 << 20);
        let s = Store::create(&p, [1; 16], false).unwrap();
        assert!(s.layout.data_size < 16 << 20);
        drop(s);
        assert!(matches!(
            Store::create(&p, [2; 16], false),
            Err(Error::HasMetadata { .. })
        ));
        let mut s = Store::open(&p).unwrap();
        assert_eq!(s.superblock.volume_id, [1; 16]);
        let mut sb = s.superblock.clone();
        sb.current_gen = 99;
        s.write_superblock(sb).unwrap();
        assert_eq!(Store::open(&p).unwrap().superblock.current_gen, 99);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn torn_metadata_write_keeps_the_older_copy() {
        let p = temp("b", 16 << 20);
        let mut s = Store::create(&p, [1; 16], false).unwrap();
        let mut sb = s.superblock.clone();
        sb.current_gen = 5;
        s.write_superblock(sb.clone()).unwrap();
        // Tear the next write: garbage in the slot it would use.
        let slot = 1 - s.newest_slot;
        s.file
            .write_all_at(&[0xff; 100], s.layout.slot_offsets[slot] + 50)
            .unwrap();
        drop(s);
        assert_eq!(Store::open(&p).unwrap().superblock.current_gen, 5);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn damaged_metadata_refuses_with_recovery_hint() {
        let p = temp("c", 16 << 20);
        let s = Store::create(&p, [1; 16], false).unwrap();
        for off in s.layout.slot_offsets {
            s.file.write_all_at(&[0x11; 64], off + 16).unwrap();
        }
        drop(s);
        let err = Store::open(&p).err().unwrap();
        assert!(matches!(err, Error::BadMetadata { .. }));
        assert!(err.to_string().contains("create-md --force"));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn refuses_a_filesystem_without_force() {
        let p = temp("d", 16 << 20);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0x53, 0xef], 1080).unwrap();
        assert!(matches!(
            Store::create(&p, [1; 16], false),
            Err(Error::HasContents { .. })
        ));
        assert!(Store::create(&p, [1; 16], true).is_ok());
        std::fs::remove_file(&p).unwrap();
    }
}
