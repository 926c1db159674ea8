//! Handing memory the process no longer uses back to the kernel.
//!
//! Loading the store and applying a relist build large temporary structures. The allocators
//! keep what they free for reuse: mimalloc (the static musl builds) returns it only when it is
//! next called after a delay, which an idle box never does; glibc keeps free memory at the top
//! of its heaps. On an idle box that is most of the difference between what it holds and what
//! it uses (BENCHMARKS.md, "Idle memory").

/// Returns free memory to the kernel now. Costs a walk over the allocator's free pages (well
/// under a millisecond on an idle box); call it after bulk work, not per request.
pub fn release_free() {
    #[cfg(target_env = "musl")]
    // SAFETY: mi_collect only walks mimalloc's own state and may be called from any thread.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas and may be called from any thread.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
