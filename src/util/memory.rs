//! Facts about the machine's memory, used to size caches and to refuse decompression bombs.

/// Total physical memory in bytes, or `None` where it cannot be read.
pub fn total_ram_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_field(&text, "MemTotal:")
}

/// Memory the kernel says is available for new allocations, in bytes.
pub fn available_ram_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_field(&text, "MemAvailable:")
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    meminfo_field(&text, "VmHWM:")
}

/// Starts a new peak: `peak_rss_bytes` then reports the peak since this call (Linux: writing 5 to
/// `/proc/self/clear_refs`). False where the kernel does not allow it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Current resident set size of this process in bytes (Linux `VmRSS`).
pub fn current_rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    meminfo_field(&text, "VmRSS:")
}

fn meminfo_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The default tile-cache budget: an eighth of physical memory, between 256 MiB and 4 GiB
/// (QuPath uses a quarter of its heap; a viewer shares the machine with other programs).
pub fn default_cache_budget_bytes() -> u64 {
    const MIB: u64 = 1 << 20;
    let ram = total_ram_bytes().unwrap_or(8 * 1024 * MIB);
    (ram / 8).clamp(256 * MIB, 4096 * MIB)
}

/// Lets glibc's malloc keep and reuse the large blocks that inference allocates and frees on every
/// layer (activations of up to tens of MiB). By default, blocks above a (dynamic, at most 32 MiB)
/// threshold are mmap-ed and returned to the kernel when freed, so every layer paid page faults and
/// page zeroing again. Freed memory above 512 MiB at the top of the heap is still given back.
pub fn tune_allocator() {
    set_malloc_thresholds(256 << 20, 512 << 20);
}

/// For the window, which runs for hours: freed blocks are given back to the kernel once 64 MiB lie free
/// at the top of a heap (rather than the 512 MiB that [`tune_allocator`] keeps for throughput), and
/// blocks from 32 MiB up are mapped on their own. Called after [`tune_allocator`], before the window
/// starts its threads.
pub fn tune_allocator_for_long_sessions() {
    set_malloc_thresholds(32 << 20, 64 << 20);
}

/// glibc's mmap threshold (fixed, not dynamic) and trim threshold, in bytes; nothing elsewhere.
fn set_malloc_thresholds(mmap: i32, trim: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (mmap, trim);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo_lines() {
        let text = "MemTotal:       24576000 kB\nMemFree:  100 kB\n";
        assert_eq!(meminfo_field(text, "MemTotal:"), Some(24_576_000 * 1024));
        assert_eq!(meminfo_field(text, "Missing:"), None);
    }

    #[test]
    fn default_budget_is_bounded() {
        let b = default_cache_budget_bytes();
        assert!((256 << 20..=4096 << 20).contains(&b));
    }
}
