//! Memory read bandwidth: sum a buffer far larger than the caches, best of several passes.

use std::time::Instant;

/// Best read bandwidth in bytes per second over `passes` passes of `threads` threads reading
/// disjoint parts of one `bytes`-byte buffer.
pub fn read_bandwidth(bytes: usize, threads: usize, passes: usize) -> f64 {
    let words = bytes / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let part = words.div_ceil(threads.max(1));
    let mut best = 0.0f64;
    for _ in 0..passes {
        let start = Instant::now();
        let total = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(part)
                .map(|chunk| s.spawn(move || sum(chunk)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best = best.max((words * 8) as f64 / secs);
    }
    best
}

/// Eight independent accumulators so the loop vectorises and is bound by loads, not adds.
fn sum(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = words.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, w) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*w);
        }
    }
    let tail = rest.iter().fold(0u64, |a, w| a.wrapping_add(*w));
    acc.iter().fold(tail, |a, w| a.wrapping_add(*w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_adds_every_word() {
        let words: Vec<u64> = (1..=21).collect();
        assert_eq!(sum(&words), 21 * 22 / 2);
    }

    #[test]
    fn bandwidth_is_positive() {
        assert!(read_bandwidth(1 << 20, 2, 2) > 0.0);
    }
}
