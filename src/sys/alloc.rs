//! A global allocator that keeps a few freed large blocks for reuse.
//!
//! Every replicated write carries its data in a buffer of up to 32 MiB.
//! musl's malloc (the static binary's) hands such sizes to mmap and back to
//! munmap each time, so every write paid a page fault per 4 KiB and the
//! kernel's zeroing: a third of the throughput of the same code linked
//! against glibc. Keeping up to [`SLOTS`] freed blocks per power-of-two
//! size class (4 KiB to 32 MiB) removes that without touching the code
//! that allocates. Small allocations go straight to the system allocator.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

const MIN_SHIFT: u32 = 12; // 4 KiB
const MAX_SHIFT: u32 = 25; // 32 MiB
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
/// Freed blocks kept per class: never more than the process had in use at
/// its busiest, and in practice a few MiB (most buffers are 4 KiB to 1 MiB).
const SLOTS: usize = 16;
const ALIGN: usize = 4096;

pub struct CachingAlloc {
    cache: [[AtomicPtr<u8>; SLOTS]; CLASSES],
}

impl CachingAlloc {
    pub const fn new() -> Self {
        CachingAlloc {
            cache: [const { [const { AtomicPtr::new(ptr::null_mut()) }; SLOTS] }; CLASSES],
        }
    }
}

impl Default for CachingAlloc {
    fn default() -> Self {
        Self::new()
    }
}

/// The class of a layout, or None for what the system allocator keeps.
fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size();
    if !((1 << MIN_SHIFT)..=(1 << MAX_SHIFT)).contains(&size) || layout.align() > ALIGN {
        return None;
    }
    let shift = usize::BITS - (size - 1).leading_zeros();
    Some((shift.max(MIN_SHIFT) - MIN_SHIFT) as usize)
}

fn class_layout(class: usize) -> Layout {
    // A power of two between 64 KiB and 32 MiB with 4 KiB alignment is
    // always a valid layout.
    Layout::from_size_align(1 << (class as u32 + MIN_SHIFT), ALIGN).expect("valid class layout")
}

// SAFETY: every block handed out is either from `System` with the layout
// the caller asked for, or (for the large classes) from `System` with the
// class layout, which is at least as large and as aligned as any layout
// mapped to that class; a block goes back to `System` with the same layout
// it was allocated with. Cached pointers are owned by exactly one slot at a
// time: a slot is claimed with an atomic swap, so no block is handed out
// twice.
unsafe impl GlobalAlloc for CachingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class_of(layout) else {
            // SAFETY: forwarded unchanged; the caller upholds alloc's contract.
            return unsafe { System.alloc(layout) };
        };
        for slot in &self.cache[class] {
            let p = slot.swap(ptr::null_mut(), Ordering::Acquire);
            if !p.is_null() {
                return p;
            }
        }
        // SAFETY: class_layout has a non-zero size.
        unsafe { System.alloc(class_layout(class)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(class) = class_of(layout) else {
            // SAFETY: this block came from System.alloc with this layout.
            return unsafe { System.dealloc(ptr, layout) };
        };
        for slot in &self.cache[class] {
            if slot
                .compare_exchange(ptr::null_mut(), ptr, Ordering::Release, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
        // SAFETY: blocks of this class come from System with class_layout.
        unsafe { System.dealloc(ptr, class_layout(class)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if class_of(layout).is_none() {
            // SAFETY: forwarded unchanged.
            return unsafe { System.alloc_zeroed(layout) };
        }
        // SAFETY: the caller upholds alloc's contract for this layout.
        let p = unsafe { self.alloc(layout) };
        if !p.is_null() {
            // SAFETY: p points to at least layout.size() writable bytes.
            unsafe { ptr::write_bytes(p, 0, layout.size()) };
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let l = |n| Layout::from_size_align(n, 1).unwrap();
        assert_eq!(class_of(l(1000)), None);
        assert_eq!(class_of(l(4096)), Some(0));
        assert_eq!(class_of(l(4097)), Some(1));
        assert_eq!(class_of(l(1 << 20)), Some(8));
        assert_eq!(class_of(l(32 << 20)), Some(13));
        assert_eq!(class_of(l((32 << 20) + 1)), None);
        assert_eq!(
            class_of(Layout::from_size_align(1 << 20, 8192).unwrap()),
            None
        );
    }

    #[test]
    fn reuses_and_zeroes() {
        let a = CachingAlloc::new();
        let layout = Layout::from_size_align(100_000, 8).unwrap();
        // SAFETY: test of the allocator's own contract, sizes as above.
        unsafe {
            let p = a.alloc(layout);
            p.write_bytes(0xaa, layout.size());
            a.dealloc(p, layout);
            let q = a.alloc_zeroed(layout);
            assert_eq!(p, q, "a freed block of the class is reused");
            assert!((0..layout.size()).all(|i| *q.add(i) == 0));
            a.dealloc(q, layout);
        }
    }
}
