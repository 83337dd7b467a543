//! The process's and the system's memory, where the platform tells (Linux's `/proc`): what a load may use
//! before it starts, and the peak a benchmark reports.

/// A field of a `/proc` file in kB (`Name:   123 kB`), as bytes.
#[cfg(target_os = "linux")]
fn proc_kb(file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// Memory the system can give new allocations without swapping (`MemAvailable`), in bytes.
pub fn available_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    return proc_kb("/proc/meminfo", "MemAvailable:");
    #[cfg(not(target_os = "linux"))]
    None
}

/// The process's peak resident memory so far (`VmHWM`), in bytes.
pub fn peak_resident_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    return proc_kb("/proc/self/status", "VmHWM:");
    #[cfg(not(target_os = "linux"))]
    None
}

/// The process's resident memory now (`VmRSS`), in bytes.
pub fn resident_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    return proc_kb("/proc/self/status", "VmRSS:");
    #[cfg(not(target_os = "linux"))]
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn linux_reports_memory() {
        // The peak is read after the current size: other tests allocate meanwhile.
        let now = super::resident_bytes().unwrap();
        let peak = super::peak_resident_bytes().unwrap();
        let avail = super::available_bytes().unwrap();
        assert!(avail > 0 && peak >= now && now > 0, "{avail} {peak} {now}");
    }
}
