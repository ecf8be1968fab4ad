//! Hands back to the kernel the KV-cache memory llama.cpp zeroes when it creates a context, so
//! that the cache is resident only as far as sequences have written to it.
//!
//! llama.cpp allocates the whole KV cache up front (`sequences × context length` cells) and
//! clears it with `memset`, which makes every page of it resident: 720 MiB for the default model
//! with 16 sequences of 2,048 tokens, before any request. The memory is an anonymous private
//! mapping, so `madvise(MADV_DONTNEED)` on a page that holds only zeros changes nothing a reader
//! can see (the page reads back as zeros, now from the kernel's shared zero page) while giving
//! the physical page back. A sequence then faults in only the pages of the cells it writes.
//!
//! Only memory that is safe to treat this way is touched: mappings that appeared while the
//! context was created (compared with a snapshot taken just before, on the engine thread, before
//! the server serves anything), at least [`MIN_REGION`] long, and within them only blocks that
//! are entirely zero when looked at.

#![allow(
    unsafe_code,
    reason = "madvise on memory llama.cpp allocated and zeroed"
)]

/// Smaller new mappings are left alone (the KV cache of any model is far larger).
const MIN_REGION: usize = 16 << 20;
/// Zero-checked and released in blocks of this many bytes.
const BLOCK: usize = 64 << 10;

/// Anonymous read-write private mappings of this process, as `[start, end)` address ranges.
#[derive(Debug, Default)]
pub(crate) struct Snapshot(Vec<(usize, usize)>);

impl Snapshot {
    /// The process's anonymous mappings now (none where `/proc/self/maps` cannot be read).
    pub(crate) fn take() -> Self {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        Self(maps.lines().filter_map(anonymous_range).collect())
    }

    /// Parts of the mappings in `self` not covered by any in `before`, of at least `min` bytes.
    fn new_since(&self, before: &Snapshot, min: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for &(start, end) in &self.0 {
            let mut parts = vec![(start, end)];
            for &(b0, b1) in &before.0 {
                parts = parts
                    .into_iter()
                    .flat_map(|(s, e)| {
                        if b1 <= s || e <= b0 {
                            vec![(s, e)]
                        } else {
                            [(s, b0.max(s)), (b1.min(e), e)]
                                .into_iter()
                                .filter(|(a, b)| a < b)
                                .collect()
                        }
                    })
                    .collect();
            }
            out.extend(parts.into_iter().filter(|(s, e)| e - s >= min));
        }
        out
    }
}

/// `start-end rw-p offset dev 0` with no path: an anonymous private writable mapping.
fn anonymous_range(line: &str) -> Option<(usize, usize)> {
    let mut fields = line.split_whitespace();
    let range = fields.next()?;
    let perms = fields.next()?;
    let _offset = fields.next()?;
    let _dev = fields.next()?;
    let inode = fields.next()?;
    if perms != "rw-p" || inode != "0" || fields.next().is_some() {
        return None;
    }
    let (a, b) = range.split_once('-')?;
    Some((
        usize::from_str_radix(a, 16).ok()?,
        usize::from_str_radix(b, 16).ok()?,
    ))
}

/// Releases the all-zero blocks of the large mappings that appeared since `before`; returns the
/// bytes released.
pub(crate) fn release_zeroed(before: &Snapshot) -> usize {
    if !cfg!(target_os = "linux") {
        return 0;
    }
    release_in(&Snapshot::take().new_since(before, MIN_REGION))
}

/// Releases the all-zero blocks of the given address ranges (which must be anonymous private
/// mappings nothing else writes meanwhile); returns the bytes released.
fn release_in(ranges: &[(usize, usize)]) -> usize {
    let page = page_size();
    let mut released = 0;
    for &(start, end) in ranges {
        // Whole pages only.
        let mut at = start.div_ceil(page) * page;
        let end = end / page * page;
        while at < end {
            let len = BLOCK.min(end - at);
            if is_zero(at, len) && dont_need(at, len) {
                released += len;
            }
            at += len;
        }
    }
    released
}

fn is_zero(addr: usize, len: usize) -> bool {
    // SAFETY: `[addr, addr + len)` lies inside a readable, writable mapping of this process
    // (read from /proc/self/maps a moment ago, page aligned). It was created by llama.cpp while
    // its context was made on this thread, and nothing else uses that context yet, so nothing
    // writes it while it is read; the bytes are read as plain integers, valid for any value.
    let words = unsafe { std::slice::from_raw_parts(addr as *const u64, len / 8) };
    words.iter().all(|&w| w == 0)
}

#[cfg(target_os = "linux")]
fn dont_need(addr: usize, len: usize) -> bool {
    // SAFETY: the range is page aligned, inside an anonymous private mapping, and holds only
    // zeros (checked just before, with no other writer): after MADV_DONTNEED it reads back as
    // zeros, so its contents are unchanged for every reader.
    unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn dont_need(_addr: usize, _len: usize) -> bool {
    false
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096).max(4096)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn parses_only_anonymous_private_writable_mappings() {
        assert_eq!(
            anonymous_range("7f58781 1e000-7f58ac000000 rw-p 00000000 00:00 0"),
            None
        );
        assert_eq!(
            anonymous_range("7f587811e000-7f58ac000000 rw-p 00000000 00:00 0 "),
            Some((0x7f58_7811_e000, 0x7f58_ac00_0000))
        );
        assert_eq!(
            anonymous_range("5585e2af0000-5585e4dbc000 rw-p 00000000 00:00 0  [heap]"),
            None
        );
        assert_eq!(
            anonymous_range("7f58b3bb3000-7f58b97cf000 r--p 00000000 08:01 1234 /m.gguf"),
            None
        );
        assert_eq!(
            anonymous_range("7f58b3bb3000-7f58b97cf000 rw-s 00000000 00:00 0"),
            None
        );
    }

    #[test]
    fn new_parts_exclude_what_existed_before() {
        let before = Snapshot(vec![(100, 200), (300, 400)]);
        let after = Snapshot(vec![(50, 450), (1000, 1010)]);
        assert_eq!(
            after.new_since(&before, 1),
            vec![(50, 100), (200, 300), (400, 450), (1000, 1010)]
        );
        assert_eq!(after.new_since(&before, 60), vec![(200, 300)]);
    }

    #[test]
    fn zeroed_memory_is_released_and_still_reads_as_zeros() {
        // Resident memory (written, not just allocated), zero but for one marker.
        let mut v = std::hint::black_box(vec![1u8; 8 << 20]);
        v.fill(0);
        let mid = v.len() / 2;
        v[mid] = 7;
        let start = v.as_ptr() as usize;
        let released = release_in(&[(start, start + v.len())]);
        if cfg!(target_os = "linux") {
            // Everything but the marker's block and the partial pages at the ends.
            assert!(
                released >= v.len() - 3 * BLOCK,
                "released only {released} bytes"
            );
            assert!(released < v.len());
        }
        assert_eq!(v[mid], 7);
        assert_eq!(v.iter().map(|&b| u64::from(b)).sum::<u64>(), 7);
    }
}
