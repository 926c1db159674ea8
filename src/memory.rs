//! Handing memory the process no longer uses back to the kernel.
//!
//! Loading the store and applying a relist build large temporary structures. The allocators
//! keep what they free for reuse: mimalloc (the static musl builds) returns it only when it is
//! next called after a delay, which an idle box never does; glibc keeps free memory at the top
//! of its heaps. On an idle box that is most of the difference between what it holds and what
//! it uses (BENCHMARKS.md, "Idle memory").

/// Returns free memory to the kernel now: what the calling thread freed (mimalloc keeps free
/// pages per thread) and, process-wide, what the allocator had set aside to purge later. Costs
/// a walk over the allocator's free pages; call it after bulk work, on the thread that did it,
/// not per request.
pub fn release_free() {
    #[cfg(target_env = "musl")]
    // SAFETY: mi_collect takes no pointers and only walks mimalloc's own state; it may be called
    // from any thread.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas and may be called from any thread.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// While alive, memory freed is returned to the kernel at once instead of after mimalloc's
/// purge delay; dropping it releases what is free and restores the delay. For start-up, where
/// everything loaded is built once and its temporaries are never needed again. Purging at once
/// costs a system call per freed page, so the request path runs with the delay. One at a time:
/// the guard restores the delay it found.
#[must_use = "the purge delay is restored when the guard is dropped"]
pub struct Bulk {
    #[cfg(target_env = "musl")]
    purge_delay: std::ffi::c_long,
}

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, v3; not among the crate's constants).
#[cfg(target_env = "musl")]
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

impl Bulk {
    pub fn start() -> Self {
        #[cfg(target_env = "musl")]
        // SAFETY: plain integer options, no pointers. mimalloc does not synchronise option
        // writes; this runs at start-up, before the listeners exist.
        unsafe {
            let purge_delay = libmimalloc_sys::mi_option_get(PURGE_DELAY);
            libmimalloc_sys::mi_option_set(PURGE_DELAY, 0);
            Self { purge_delay }
        }
        #[cfg(not(target_env = "musl"))]
        Self {}
    }
}

impl Drop for Bulk {
    fn drop(&mut self) {
        release_free();
        #[cfg(target_env = "musl")]
        // SAFETY: as in `start`.
        unsafe {
            libmimalloc_sys::mi_option_set(PURGE_DELAY, self.purge_delay);
        }
    }
}
