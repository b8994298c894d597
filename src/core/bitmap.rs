//! The dirty bitmap: one bit per 4 KiB block the peer lacks. A bit array
//! rather than a set, so a full resync of a 5 GiB volume (1.3 million
//! blocks) costs 160 KiB, not tens of MiB of tree nodes, and so it can be
//! written to the metadata's bitmap region as it is.

/// A growable set of block numbers backed by 64-bit words.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    count: u64,
}

impl Bitmap {
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn contains(&self, block: &u64) -> bool {
        let (w, b) = ((*block / 64) as usize, block % 64);
        self.words.get(w).is_some_and(|word| word & (1 << b) != 0)
    }

    pub fn insert(&mut self, block: u64) -> bool {
        let (w, b) = ((block / 64) as usize, block % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let was = self.words[w] & (1 << b) != 0;
        self.words[w] |= 1 << b;
        if !was {
            self.count += 1;
        }
        !was
    }

    pub fn remove(&mut self, block: &u64) -> bool {
        let (w, b) = ((*block / 64) as usize, block % 64);
        let Some(word) = self.words.get_mut(w) else {
            return false;
        };
        let was = *word & (1 << b) != 0;
        *word &= !(1 << b);
        if was {
            self.count -= 1;
        }
        was
    }

    /// The first block at or after `from`, wrapping round to the start.
    pub fn first_from(&self, from: u64) -> Option<u64> {
        self.next_at_or_after(from)
            .or_else(|| self.next_at_or_after(0))
    }

    fn next_at_or_after(&self, from: u64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut mask = !0u64 << (from % 64);
        while w < self.words.len() {
            let bits = self.words[w] & mask;
            if bits != 0 {
                return Some(w as u64 * 64 + u64::from(bits.trailing_zeros()));
            }
            w += 1;
            mask = !0;
        }
        None
    }
}

impl Bitmap {
    /// The on-disk form of one page: `PAGE_BLOCKS` bits, little-endian
    /// words, bit `i` of the page standing for block `page * PAGE_BLOCKS + i`.
    pub fn page(&self, page: u64) -> Vec<u8> {
        let words = PAGE_BYTES / 8;
        let first = page as usize * words;
        let mut out = vec![0u8; PAGE_BYTES];
        for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
            if let Some(w) = self.words.get(first + i) {
                chunk.copy_from_slice(&w.to_le_bytes());
            }
        }
        out
    }

    /// Adds the bits of an on-disk page (as [`Bitmap::page`] writes it),
    /// ignoring any beyond `limit` blocks.
    pub fn merge_page(&mut self, page: u64, bytes: &[u8], limit: u64) {
        let base = page * PAGE_BLOCKS;
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            let mut w = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
            while w != 0 {
                let bit = u64::from(w.trailing_zeros());
                w &= w - 1;
                let block = base + i as u64 * 64 + bit;
                if block < limit {
                    self.insert(block);
                }
            }
        }
    }

    /// The marked blocks as runs (first, count), in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = 0;
        while let Some(b) = self.next_at_or_after(at) {
            match out.last_mut() {
                Some((first, count)) if *first + *count == b => *count += 1,
                _ => out.push((b, 1)),
            }
            at = b + 1;
        }
        out
    }
}

/// Bytes of one on-disk bitmap page.
pub const PAGE_BYTES: usize = 4096;
/// Blocks one page stands for.
pub const PAGE_BLOCKS: u64 = PAGE_BYTES as u64 * 8;

impl Extend<u64> for Bitmap {
    fn extend<I: IntoIterator<Item = u64>>(&mut self, blocks: I) {
        for b in blocks {
            self.insert(b);
        }
    }
}

impl FromIterator<u64> for Bitmap {
    fn from_iter<I: IntoIterator<Item = u64>>(blocks: I) -> Self {
        let mut b = Bitmap::default();
        b.extend(blocks);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations_and_search() {
        let mut b = Bitmap::default();
        assert!(b.is_empty());
        assert_eq!(b.first_from(0), None);
        b.extend([3, 64, 65, 200]);
        assert!(!b.insert(64), "already there");
        assert_eq!(b.len(), 4);
        assert!(b.contains(&65) && !b.contains(&66) && !b.contains(&10_000));
        assert_eq!(b.first_from(0), Some(3));
        assert_eq!(b.first_from(4), Some(64));
        assert_eq!(b.first_from(66), Some(200));
        assert_eq!(b.first_from(201), Some(3), "wraps round");
        assert!(b.remove(&64) && !b.remove(&64) && !b.remove(&99_999));
        assert_eq!(b.len(), 3);
        let full: Bitmap = (0..1000).collect();
        assert_eq!(full.len(), 1000);
        assert_eq!(full.first_from(999), Some(999));
    }

    #[test]
    fn pages_and_runs_roundtrip() {
        let mut b = Bitmap::default();
        b.extend([
            0,
            1,
            2,
            63,
            64,
            PAGE_BLOCKS - 1,
            PAGE_BLOCKS,
            PAGE_BLOCKS + 5,
        ]);
        assert_eq!(
            b.runs(),
            vec![(0, 3), (63, 2), (PAGE_BLOCKS - 1, 2), (PAGE_BLOCKS + 5, 1)]
        );
        let mut back = Bitmap::default();
        back.merge_page(0, &b.page(0), u64::MAX);
        back.merge_page(1, &b.page(1), PAGE_BLOCKS + 3);
        let mut want = b.clone();
        want.remove(&(PAGE_BLOCKS + 5));
        assert_eq!(back.runs(), want.runs(), "bits past the limit are ignored");
        assert!(Bitmap::default().page(3).iter().all(|&x| x == 0));
    }
}
