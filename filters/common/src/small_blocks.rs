//! The filters' allocator on wasm32: small blocks (up to 1 KiB, the host's buffers of
//! header maps, header values and properties, label strings, short vectors) are kept on free lists by size
//! class and reused, and everything else goes to the standard allocator (dlmalloc). A request
//! allocates and frees a dozen small blocks; dlmalloc spends about 240 wasm instructions on a
//! malloc and free, a free list about 20.
//!
//! Blocks on a free list are never given back to dlmalloc: what is kept is bounded by the
//! largest number of small blocks a VM ever had in use at once. A VM runs on one thread (the
//! modules are built without wasm threads), so the lists need no lock.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;

/// Size classes are multiples of this (also the largest alignment served from the lists).
const GRANULE: usize = 16;
const CLASSES: usize = 64;
/// The largest block served from the free lists.
pub const MAX_SMALL_BLOCK: usize = GRANULE * CLASSES;

pub struct SmallBlocks {
    /// The head of each class's free list; a free block holds the address of the next one.
    free: UnsafeCell<[*mut u8; CLASSES]>,
}

// SAFETY: a VM is single-threaded (wasm32 without the threads feature), see the module docs.
unsafe impl Sync for SmallBlocks {}

impl SmallBlocks {
    pub const fn new() -> SmallBlocks {
        SmallBlocks {
            free: UnsafeCell::new([std::ptr::null_mut(); CLASSES]),
        }
    }
}

impl Default for SmallBlocks {
    fn default() -> Self {
        SmallBlocks::new()
    }
}

/// The class of a block of this layout; `None` when the standard allocator serves it.
fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size();
    (size > 0 && size <= MAX_SMALL_BLOCK && layout.align() <= GRANULE).then(|| (size - 1) / GRANULE)
}

// SAFETY: every block handed out is at least `layout.size()` bytes and `GRANULE`-aligned (the
// standard allocator allocates each class's blocks with that size and alignment); a block is
// on a free list only after `dealloc`, which receives the layout it was allocated with, so it
// returns to the class it came from.
unsafe impl GlobalAlloc for SmallBlocks {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class_of(layout) else {
            return unsafe { System.alloc(layout) };
        };
        let free = unsafe { &mut *self.free.get() };
        let head = free[class];
        if head.is_null() {
            let block =
                unsafe { Layout::from_size_align_unchecked((class + 1) * GRANULE, GRANULE) };
            return unsafe { System.alloc(block) };
        }
        // SAFETY: a free block stores the next free block's address in its first word.
        free[class] = unsafe { head.cast::<*mut u8>().read() };
        head
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(class) = class_of(layout) else {
            return unsafe { System.dealloc(ptr, layout) };
        };
        let free = unsafe { &mut *self.free.get() };
        // SAFETY: the block is at least GRANULE bytes and aligned, and no longer in use.
        unsafe { ptr.cast::<*mut u8>().write(free[class]) };
        free[class] = ptr;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn blocks_are_reused_within_their_class_and_hold_their_size() {
        let blocks = SmallBlocks::new();
        unsafe {
            let small = Layout::from_size_align(20, 1).unwrap();
            let a = blocks.alloc(small);
            a.write_bytes(0xAB, 20);
            blocks.dealloc(a, small);
            let same_class = Layout::from_size_align(32, 8).unwrap();
            let b = blocks.alloc(same_class);
            assert_eq!(a, b, "a freed block is reused for its class");
            b.write_bytes(0xCD, 32);
            let other = blocks.alloc(same_class);
            assert_ne!(other, b);
            assert_eq!(other as usize % GRANULE, 0);
            blocks.dealloc(b, same_class);
            blocks.dealloc(other, same_class);
            let large = Layout::from_size_align(MAX_SMALL_BLOCK + 1, 8).unwrap();
            let c = blocks.alloc(large);
            c.write_bytes(1, MAX_SMALL_BLOCK + 1);
            blocks.dealloc(c, large);
        }
    }

    #[test]
    fn classes_cover_sizes_exactly() {
        let layout = |size| Layout::from_size_align(size, 1).unwrap();
        assert_eq!(class_of(layout(0)), None);
        assert_eq!(class_of(layout(1)), Some(0));
        assert_eq!(class_of(layout(16)), Some(0));
        assert_eq!(class_of(layout(17)), Some(1));
        assert_eq!(class_of(layout(1024)), Some(63));
        assert_eq!(class_of(layout(1025)), None);
        assert_eq!(class_of(Layout::from_size_align(8, 32).unwrap()), None);
    }
}
