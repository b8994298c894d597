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
}
