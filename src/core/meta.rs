//! On-disk volume metadata, kept at the end of the backing store like DRBD's
//! `meta-disk internal`.
//!
//! Layout, from the end of the device (every region 4 KiB aligned):
//!
//! ```text
//! 0 ............ data_size | bitmap | activity log | slot A | slot B | end
//! ```
//!
//! The superblock exists twice (slots A and B). An update writes the slot
//! that does *not* hold the newest copy, with a higher sequence number, and
//! flushes; a crash in the middle of a write therefore leaves the other slot
//! intact, and a reader takes the valid slot with the higher sequence. The
//! bitmap region holds one bit per 4 KiB block that may differ from the
//! peer's copy (`core::bitmap`); the activity-log region holds two
//! transaction slots (`core::al`).

use std::fmt;

pub const BLOCK: u64 = 4096;
pub const SLOT_SIZE: u64 = 4096;
/// Room for the activity log: 64 extents of 4 KiB each.
pub const AL_BYTES: u64 = 64 * 4096;
pub const MAGIC: [u8; 8] = *b"HADBMETA";
pub const VERSION: u32 = 1;
/// Bytes of data each bitmap bit stands for.
pub const BITMAP_GRANULE: u64 = 4096;
/// The smallest device we accept: the metadata must leave real room.
pub const MIN_DEVICE: u64 = 4 << 20;

/// Flags in the superblock.
pub mod flags {
    /// The data has been written consistently at least once (not a
    /// half-finished resync target).
    pub const CONSISTENT: u32 = 1 << 0;
    /// The node was primary when the metadata was last written; seen at start
    /// it means the node stopped while primary (a crash, a power-off).
    pub const PRIMARY: u32 = 1 << 1;
    /// The node was told, or found, that its peer has newer data.
    pub const OUTDATED: u32 = 1 << 2;
    /// hadb has the volume open; cleared by a clean stop. Seen at start it
    /// means the last stop was not clean (a crash, a power-off, kill -9):
    /// the activity log's regions may differ from the peer's copy.
    pub const ACTIVE: u32 = 1 << 3;
    /// This copy went on without its peer on the peer's own word that it
    /// is outdated (on its disk): the peer cannot be promoted before a
    /// resync from here, so this node may start as primary without
    /// hearing it first.
    pub const PEER_OUTDATED: u32 = 1 << 4;
    /// This copy stopped uncleanly since its last resync, so its disk may
    /// have lost acknowledged writes from its cache: at the same
    /// generation, the peer's copy is the better resync source. Kept
    /// through clean restarts until a resync ends.
    pub const LOST_CACHE: u32 = 1 << 5;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    TooSmall { size: u64 },
    BadMagic,
    BadVersion(u32),
    BadChecksum { stored: u32, computed: u32 },
    Inconsistent(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TooSmall { size } => write!(
                f,
                "the device has {size} bytes; hadb needs at least {MIN_DEVICE} (data plus metadata)"
            ),
            Error::BadMagic => write!(f, "no hadb metadata (magic not found)"),
            Error::BadVersion(v) => write!(
                f,
                "metadata version {v} is not understood by this hadb (knows {VERSION}); run the hadb that wrote it"
            ),
            Error::BadChecksum { stored, computed } => write!(
                f,
                "metadata checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            Error::Inconsistent(what) => write!(f, "metadata is inconsistent: {what}"),
        }
    }
}

impl std::error::Error for Error {}

/// Where each region lives on a device of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub device_size: u64,
    pub data_size: u64,
    pub bitmap_offset: u64,
    pub bitmap_bytes: u64,
    pub al_offset: u64,
    pub al_bytes: u64,
    pub slot_offsets: [u64; 2],
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

impl Layout {
    pub fn for_device(device_size: u64) -> Result<Layout, Error> {
        let device_size = device_size / BLOCK * BLOCK;
        if device_size < MIN_DEVICE {
            return Err(Error::TooSmall { size: device_size });
        }
        // Sized for the whole device: a few bits too many, never too few.
        let bitmap_bytes = round_up(device_size.div_ceil(BITMAP_GRANULE).div_ceil(8), BLOCK);
        let slot_a = device_size - 2 * SLOT_SIZE;
        let al_offset = slot_a - AL_BYTES;
        let bitmap_offset = al_offset - bitmap_bytes;
        Ok(Layout {
            device_size,
            data_size: bitmap_offset,
            bitmap_offset,
            bitmap_bytes,
            al_offset,
            al_bytes: AL_BYTES,
            slot_offsets: [slot_a, slot_a + SLOT_SIZE],
        })
    }
}

/// The superblock: one copy per slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Bumped on every write; the newer valid slot wins.
    pub seq: u64,
    /// Identifies the replicated volume; both nodes of a pair share it once
    /// they have synchronised.
    pub volume_id: [u8; 16],
    pub layout: Layout,
    pub flags: u32,
    /// Generation of the data: changes when a primary starts writing without
    /// its peer. 0: never used (a fresh volume).
    pub current_gen: u64,
    /// The generation the peer had when it left; what the bitmap is relative
    /// to. 0: none.
    pub bitmap_gen: u64,
    /// Older generations, newest first.
    pub history: [u64; 4],
}

const OFF_CRC: usize = SLOT_SIZE as usize - 4;

impl Superblock {
    pub fn new(layout: Layout, volume_id: [u8; 16]) -> Self {
        Superblock {
            seq: 1,
            volume_id,
            layout,
            flags: 0,
            current_gen: 0,
            bitmap_gen: 0,
            history: [0; 4],
        }
    }

    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SLOT_SIZE as usize];
        b[0..8].copy_from_slice(&MAGIC);
        put32(&mut b, 8, VERSION);
        put64(&mut b, 16, self.seq);
        b[24..40].copy_from_slice(&self.volume_id);
        let l = &self.layout;
        put64(&mut b, 40, l.device_size);
        put64(&mut b, 48, l.data_size);
        put64(&mut b, 56, l.bitmap_offset);
        put64(&mut b, 64, l.bitmap_bytes);
        put64(&mut b, 72, l.al_offset);
        put64(&mut b, 80, l.al_bytes);
        put32(&mut b, 88, BITMAP_GRANULE as u32);
        put32(&mut b, 92, self.flags);
        put64(&mut b, 96, self.current_gen);
        put64(&mut b, 104, self.bitmap_gen);
        for (i, h) in self.history.iter().enumerate() {
            put64(&mut b, 112 + 8 * i, *h);
        }
        let crc = crc32c::crc32c(&b[..OFF_CRC]);
        put32(&mut b, OFF_CRC, crc);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Superblock, Error> {
        if b.len() < SLOT_SIZE as usize {
            return Err(Error::Inconsistent(format!("slot has {} bytes", b.len())));
        }
        if b[0..8] != MAGIC {
            return Err(Error::BadMagic);
        }
        let stored = get32(b, OFF_CRC);
        let computed = crc32c::crc32c(&b[..OFF_CRC]);
        if stored != computed {
            return Err(Error::BadChecksum { stored, computed });
        }
        let version = get32(b, 8);
        if version != VERSION {
            return Err(Error::BadVersion(version));
        }
        let layout = Layout {
            device_size: get64(b, 40),
            data_size: get64(b, 48),
            bitmap_offset: get64(b, 56),
            bitmap_bytes: get64(b, 64),
            al_offset: get64(b, 72),
            al_bytes: get64(b, 80),
            slot_offsets: [0, 0],
        };
        let expected = Layout::for_device(layout.device_size)?;
        if (Layout {
            slot_offsets: expected.slot_offsets,
            ..layout
        }) != expected
            || get32(b, 88) as u64 != BITMAP_GRANULE
        {
            return Err(Error::Inconsistent(
                "region offsets do not match the recorded device size".into(),
            ));
        }
        let mut volume_id = [0u8; 16];
        volume_id.copy_from_slice(&b[24..40]);
        let mut history = [0u64; 4];
        for (i, h) in history.iter_mut().enumerate() {
            *h = get64(b, 112 + 8 * i);
        }
        Ok(Superblock {
            seq: get64(b, 16),
            volume_id,
            layout: expected,
            flags: get32(b, 92),
            current_gen: get64(b, 96),
            bitmap_gen: get64(b, 104),
            history,
        })
    }

    pub fn volume_id_hex(&self) -> String {
        self.volume_id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Chooses the superblock from the two slots: the valid one with the higher
/// sequence. Both invalid: the error of slot A if it had magic (damaged
/// metadata), else "no metadata".
pub fn pick(
    a: Result<Superblock, Error>,
    b: Result<Superblock, Error>,
) -> Result<(usize, Superblock), Error> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok(if b.seq > a.seq { (1, b) } else { (0, a) }),
        (Ok(a), Err(_)) => Ok((0, a)),
        (Err(_), Ok(b)) => Ok((1, b)),
        (Err(Error::BadMagic), Err(e)) | (Err(e), Err(_)) => Err(e),
    }
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Known signatures of data an operator would not want overwritten.
pub fn detect_contents(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, sig: &[u8]| {
        head.len() >= off + sig.len() && &head[off..off + sig.len()] == sig
    };
    if at(1080, &[0x53, 0xef]) {
        Some("an ext2/3/4 filesystem")
    } else if at(0, b"XFSB") {
        Some("an XFS filesystem")
    } else if at(65600, b"_BHRfS_M") {
        Some("a btrfs filesystem")
    } else if at(4086, b"SWAPSPACE2") {
        Some("swap space")
    } else if at(0, b"LUKS\xba\xbe") {
        Some("a LUKS volume")
    } else if at(512, b"EFI PART") {
        Some("a GPT partition table")
    } else if at(510, &[0x55, 0xaa]) {
        Some("a DOS partition table or boot sector")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_seed_disk() {
        let l = Layout::for_device(5 << 30).unwrap();
        assert_eq!(l.slot_offsets[1] + SLOT_SIZE, 5 << 30);
        // 5 GiB / 4 KiB = 1310720 bits = 163840 bytes = 40 blocks.
        assert_eq!(l.bitmap_bytes, 163840);
        assert_eq!(l.data_size % BLOCK, 0);
        assert!(l.data_size > (5 << 30) - (1 << 20));
        assert!(Layout::for_device(1 << 20).is_err());
    }

    #[test]
    fn roundtrip_and_checksum() {
        let l = Layout::for_device(64 << 20).unwrap();
        let mut sb = Superblock::new(l, [7; 16]);
        sb.current_gen = 42;
        sb.flags = flags::CONSISTENT;
        let mut bytes = sb.encode();
        assert_eq!(Superblock::decode(&bytes).unwrap(), sb);
        bytes[100] ^= 1;
        assert!(matches!(
            Superblock::decode(&bytes),
            Err(Error::BadChecksum { .. })
        ));
        assert_eq!(Superblock::decode(&[0u8; 4096]), Err(Error::BadMagic));
    }

    #[test]
    fn newer_valid_slot_wins_and_torn_slot_is_ignored() {
        let l = Layout::for_device(64 << 20).unwrap();
        let a = Superblock::new(l, [1; 16]);
        let mut b = a.clone();
        b.seq = 2;
        assert_eq!(pick(Ok(a.clone()), Ok(b.clone())).unwrap().0, 1);
        let torn = Err(Error::BadChecksum {
            stored: 0,
            computed: 1,
        });
        assert_eq!(pick(Ok(a.clone()), torn.clone()).unwrap().1, a);
        assert!(matches!(
            pick(Err(Error::BadMagic), Err(Error::BadMagic)),
            Err(Error::BadMagic)
        ));
        assert!(matches!(
            pick(torn.clone(), Err(Error::BadMagic)),
            Err(Error::BadChecksum { .. })
        ));
    }

    #[test]
    fn recognises_ext4() {
        let mut head = vec![0u8; 70000];
        assert_eq!(detect_contents(&head), None);
        head[1080] = 0x53;
        head[1081] = 0xef;
        assert_eq!(detect_contents(&head), Some("an ext2/3/4 filesystem"));
    }
}
