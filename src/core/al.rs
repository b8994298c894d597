//! The activity log: the extents (4 MiB of data each by default) this node
//! may be writing, kept on disk so that after an unclean stop the node
//! knows which regions may differ from its peer's copy, DRBD-style.
//!
//! Every node keeps one, in every role: the primary for the application's
//! writes, the secondary for the writes it applies from the primary. An
//! extent enters the log (a transaction written and flushed) before the
//! first write into it; it leaves only when no write in it is unfinished,
//! and the transaction that drops it flushes the disk first, so everything
//! written there is durable by then. After an unclean stop, every extent in
//! the log is marked out of sync; the bitmap exchange at the next connect
//! brings the two copies of those regions together, whichever side is newer.

use std::collections::BTreeMap;

/// Blocks (of 4 KiB) in one extent: 4 MiB, as DRBD's.
pub const EXTENT_BLOCKS: u64 = 1024;
/// The most extents one transaction can name (half the log region).
pub const MAX_EXTENTS: usize = (TRANSACTION_BYTES - HEADER) / 4;
/// Bytes of one transaction slot: half of the metadata's log region, so
/// a torn write of one leaves the other.
pub const TRANSACTION_BYTES: usize = 128 * 1024;
const HEADER: usize = 32;
const MAGIC: [u8; 8] = *b"HADBALOG";

#[derive(Debug, Clone, Copy)]
struct Extent {
    /// Writes into the extent not yet finished (see `Replica` for when a
    /// write is finished).
    holds: u32,
    /// Last use, for least-recently-used eviction.
    used: u64,
}

/// What it takes to admit a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Every extent it touches is in the log already.
    Ready,
    /// Extents enter (and maybe leave) the log: persist the bitmap of the
    /// `evicted` extents, then the log's new contents, before the write.
    Transaction { evicted: Vec<u64> },
    /// Every extent is busy and the log is at its hard limit: wait for a
    /// write to finish.
    Full,
}

#[derive(Debug, Clone)]
pub struct ActivityLog {
    extent_blocks: u64,
    capacity: usize,
    active: BTreeMap<u64, Extent>,
    clock: u64,
}

impl ActivityLog {
    /// `initial`: the extents found in the log at start; they stay until
    /// evicted, so a second crash still covers them.
    pub fn new(extent_blocks: u64, capacity: usize, initial: &[u64]) -> ActivityLog {
        ActivityLog {
            extent_blocks: extent_blocks.max(1),
            capacity: capacity.clamp(1, MAX_EXTENTS),
            active: initial
                .iter()
                .map(|&e| (e, Extent { holds: 0, used: 0 }))
                .collect(),
            clock: 1,
        }
    }

    pub fn extent_blocks(&self) -> u64 {
        self.extent_blocks
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The extents a block range [first, end) falls in.
    fn extents(&self, blocks: (u64, u64)) -> std::ops::Range<u64> {
        let end = blocks.1.max(blocks.0 + 1);
        blocks.0 / self.extent_blocks..end.div_ceil(self.extent_blocks)
    }

    /// The blocks of an extent, [first, end).
    pub fn blocks_of(&self, extent: u64) -> (u64, u64) {
        (
            extent * self.extent_blocks,
            (extent + 1) * self.extent_blocks,
        )
    }

    /// Takes a hold on the extents of a write about to be issued.
    pub fn begin(&mut self, blocks: (u64, u64)) -> Admit {
        let wanted = self.extents(blocks);
        let missing: Vec<u64> = wanted
            .clone()
            .filter(|e| !self.active.contains_key(e))
            .collect();
        let mut evicted = Vec::new();
        if !missing.is_empty() {
            let over = (self.active.len() + missing.len()).saturating_sub(self.capacity);
            let mut idle: Vec<(u64, u64)> = self
                .active
                .iter()
                .filter(|(e, x)| x.holds == 0 && !wanted.contains(e))
                .map(|(e, x)| (x.used, *e))
                .collect();
            idle.sort_unstable();
            evicted = idle.into_iter().take(over).map(|(_, e)| e).collect();
            // Over the soft capacity only while writes hold every extent;
            // never beyond what one transaction can name.
            if self.active.len() - evicted.len() + missing.len() > MAX_EXTENTS {
                return Admit::Full;
            }
            for e in &evicted {
                self.active.remove(e);
            }
        }
        self.clock += 1;
        for e in wanted {
            let x = self.active.entry(e).or_insert(Extent { holds: 0, used: 0 });
            x.holds += 1;
            x.used = self.clock;
        }
        if missing.is_empty() {
            Admit::Ready
        } else {
            Admit::Transaction { evicted }
        }
    }

    /// Releases the hold `begin` took.
    pub fn end(&mut self, blocks: (u64, u64)) {
        for e in self.extents(blocks) {
            if let Some(x) = self.active.get_mut(&e) {
                x.holds = x.holds.saturating_sub(1);
            }
        }
    }

    /// The log's contents, for a transaction.
    pub fn snapshot(&self) -> Vec<u64> {
        self.active.keys().copied().collect()
    }

    /// At a clean stop: drops every idle extent; what is left (writes
    /// still unfinished) must stay covered.
    pub fn drop_idle(&mut self) -> Vec<u64> {
        self.active.retain(|_, x| x.holds > 0);
        self.snapshot()
    }

    pub fn busy(&self) -> bool {
        self.active.values().any(|x| x.holds > 0)
    }
}

/// The on-disk form of one transaction: magic, sequence, count, CRC32C,
/// then the extent numbers as little-endian u32, zero-padded to
/// [`TRANSACTION_BYTES`].
pub fn encode(seq: u64, extents: &[u64]) -> Vec<u8> {
    let mut b = vec![0u8; TRANSACTION_BYTES];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    let n = extents.len().min(MAX_EXTENTS);
    b[16..20].copy_from_slice(&(n as u32).to_le_bytes());
    for (i, e) in extents.iter().take(n).enumerate() {
        let at = HEADER + 4 * i;
        b[at..at + 4].copy_from_slice(&(*e as u32).to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Reads a transaction slot: None if it holds no valid transaction (never
/// written, or torn).
pub fn decode(b: &[u8]) -> Option<(u64, Vec<u64>)> {
    if b.len() < TRANSACTION_BYTES || b[0..8] != MAGIC {
        return None;
    }
    let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let n = word(16) as usize;
    let stored = word(20);
    let mut copy = b[..TRANSACTION_BYTES].to_vec();
    copy[20..24].fill(0);
    if n > MAX_EXTENTS || crc32c::crc32c(&copy) != stored {
        return None;
    }
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    Some((
        seq,
        (0..n).map(|i| u64::from(word(HEADER + 4 * i))).collect(),
    ))
}

/// The newer of the two slots' valid transactions: (slot, seq, extents).
pub fn pick(a: &[u8], b: &[u8]) -> Option<(usize, u64, Vec<u64>)> {
    match (decode(a), decode(b)) {
        (Some((sa, ea)), Some((sb, eb))) => Some(if sb > sa { (1, sb, eb) } else { (0, sa, ea) }),
        (Some((s, e)), None) => Some((0, s, e)),
        (None, Some((s, e))) => Some((1, s, e)),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_evicts_least_recent_idle_and_waits_when_all_busy() {
        let mut al = ActivityLog::new(4, 2, &[]);
        assert_eq!(al.begin((0, 1)), Admit::Transaction { evicted: vec![] });
        assert_eq!(al.begin((1, 2)), Admit::Ready, "same extent");
        al.end((0, 1));
        al.end((1, 2));
        assert_eq!(al.begin((4, 5)), Admit::Transaction { evicted: vec![] });
        al.end((4, 5));
        // Extent 0 is the least recently used idle one.
        assert_eq!(al.begin((8, 9)), Admit::Transaction { evicted: vec![0] });
        assert_eq!(al.snapshot(), vec![1, 2]);
        // 2 is busy, 1 is idle: 1 goes.
        assert_eq!(al.begin((12, 13)), Admit::Transaction { evicted: vec![1] });
        // Both busy: over the soft capacity rather than waiting.
        assert_eq!(al.begin((0, 1)), Admit::Transaction { evicted: vec![] });
        assert_eq!(al.snapshot(), vec![0, 2, 3]);
        assert!(al.busy());
        for b in [(8, 9), (12, 13), (0, 1)] {
            al.end(b);
        }
        assert!(!al.busy());
        assert_eq!(al.drop_idle(), Vec::<u64>::new());
    }

    #[test]
    fn a_write_spanning_extents_holds_them_all() {
        let mut al = ActivityLog::new(4, 8, &[5]);
        assert_eq!(al.snapshot(), vec![5]);
        assert_eq!(al.begin((3, 9)), Admit::Transaction { evicted: vec![] });
        assert_eq!(al.snapshot(), vec![0, 1, 2, 5]);
        assert_eq!(al.drop_idle(), vec![0, 1, 2]);
    }

    #[test]
    fn transaction_roundtrip_and_torn_slot() {
        let a = encode(7, &[1, 2, 900]);
        let b = encode(8, &[3]);
        assert_eq!(decode(&a), Some((7, vec![1, 2, 900])));
        assert_eq!(pick(&a, &b), Some((1, 8, vec![3])));
        let mut torn = b.clone();
        torn[40] ^= 0xff;
        assert_eq!(pick(&a, &torn), Some((0, 7, vec![1, 2, 900])));
        assert_eq!(pick(&vec![0; TRANSACTION_BYTES], &torn), None);
    }
}
