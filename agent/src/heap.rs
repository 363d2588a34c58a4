//! Giving freed heap memory back to the system. glibc keeps what the program frees in its
//! arenas for reuse, so after a burst (a backlog answered, a big store read) the agent's
//! anonymous memory stays at its peak although most of it is free. [`trim`] hands the free
//! pages back (`malloc_trim`); the store's upkeep calls it after each turn. The one other module
//! with `unsafe` is the plugin sandbox (`tools::mcp::sandbox`).

/// Return the heap's free pages to the system; whether any were returned. A no-op where the C
/// library is not glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() -> bool {
    // SAFETY: malloc_trim takes no pointer of ours; it locks glibc's arenas itself and releases
    // only pages nothing is allocated in, so it is sound from any thread at any time.
    unsafe { nix::libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    /// A burst of small allocations freed again leaves free pages in the arena; trimming gives
    /// them back, and the heap still works after it.
    #[test]
    fn a_freed_burst_is_given_back_and_the_heap_still_works() {
        let burst: Vec<Vec<u8>> = (0..20_000).map(|i| vec![(i % 251) as u8; 512]).collect();
        let kept = burst[19_999].clone();
        drop(burst);
        assert!(super::trim(), "10 MB freed in small blocks: some pages go back");
        let again: Vec<Vec<u8>> = (0..1000).map(|i| vec![(i % 7) as u8; 512]).collect();
        assert_eq!(again[999][0], (999 % 7) as u8);
        assert_eq!(kept[0], (19_999 % 251) as u8);
    }
}
