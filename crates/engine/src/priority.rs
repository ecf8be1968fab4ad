//! Runs the engine's compute below the server's own threads in the CPU scheduler's eyes, so that
//! accepting connections, refusing requests and streaming tokens never wait behind a forward pass.
//!
//! A forward pass keeps every core busy (llama.cpp's OpenMP workers, one a core). The async
//! runtime that serves HTTP needs little CPU but needs it at once: a request refused for overload
//! should be answered in milliseconds, and a token sampled should reach its client before the
//! next pass starts. Raising the engine thread's nice value before llama.cpp starts its workers
//! (they inherit it) makes the kernel prefer the runtime's threads whenever both are runnable;
//! when nothing else wants the CPU the passes run exactly as fast as before.

#![allow(unsafe_code, reason = "nice(2) on the calling thread")]

/// Raises the calling thread's nice value by `by`; on Linux the nice value is a thread's, and
/// threads it starts later inherit it. Returns the value now in force; `None` where it could not
/// be changed or the platform has no per-thread nice value.
///
/// With `compute_nice` at its default of 10, a runnable server thread weighs nine times a
/// compute thread in Linux's fair scheduler and preempts it on waking. On two cores shared with
/// the load generator, W5's refusals in the opening burst of 256 requests took p99 58-117 ms
/// against 91-144 ms at 0 (four runs each).
pub(crate) fn lower_this_thread(by: i32) -> Option<i32> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `nice` only changes the scheduling priority of the calling thread; errno is
        // cleared first because -1 is also a valid result.
        unsafe {
            *libc::__errno_location() = 0;
            let now = libc::nice(by);
            (now != -1 || *libc::__errno_location() == 0).then_some(now)
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = by;
        None
    }
}
