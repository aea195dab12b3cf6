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

/// Words read per stream per step.
const LANES: usize = 8;
/// Streams read at once: more misses in flight than one sequential stream gets from the
/// prefetchers (one stream reaches about half the bandwidth of eight here).
const STREAMS: usize = 8;

/// The wrapping sum of `words`, read as [`STREAMS`] interleaved sequential streams with
/// independent accumulators, so the loop is bound by loads, not adds.
fn sum(words: &[u64]) -> u64 {
    let per = words.len() / (STREAMS * LANES) * LANES;
    let (body, rest) = words.split_at(per * STREAMS);
    let mut acc = [[0u64; LANES]; STREAMS];
    for k in (0..per).step_by(LANES) {
        for (s, a) in acc.iter_mut().enumerate() {
            let chunk = &body[s * per + k..s * per + k + LANES];
            for i in 0..LANES {
                a[i] = a[i].wrapping_add(chunk[i]);
            }
        }
    }
    rest.iter()
        .chain(acc.iter().flatten())
        .fold(0u64, |a, w| a.wrapping_add(*w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_adds_every_word() {
        for n in [0u64, 1, 21, 64, 65, 1000, 4099] {
            let words: Vec<u64> = (1..=n).collect();
            assert_eq!(sum(&words), n * (n + 1) / 2, "{n} words");
        }
    }

    #[test]
    fn bandwidth_is_positive() {
        assert!(read_bandwidth(1 << 20, 2, 2) > 0.0);
    }
}
