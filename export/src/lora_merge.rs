//! The LoRA merge: `W += s · (B @ A)` in float32 (peft `get_delta_weight`), as a GEMM.

use rayon::prelude::*;

/// Rows of `W` per parallel task.
const ROWS_PER_TASK: usize = 256;

/// `w[out, in] += scaling · (b[out, r] @ a[r, in])`, all row-major float32.
///
/// `matrixmultiply`'s SGEMM computes `B @ A` (with the CPU's widest kernels, chosen at run time)
/// and adds it scaled, as peft's `weight + (weight_B @ weight_A) * scaling`. Blocks of rows run
/// on all threads; each element's sum runs over `r` in the same order whatever the split, so
/// the result does not depend on the thread count.
pub fn merge_lora(
    w: &mut [f32],
    out: usize,
    inp: usize,
    a: &[f32],
    b: &[f32],
    r: usize,
    scaling: f32,
) {
    assert_eq!(w.len(), out * inp, "merge_lora: weight size");
    assert_eq!(a.len(), r * inp, "merge_lora: lora_A size");
    assert_eq!(b.len(), out * r, "merge_lora: lora_B size");
    if out == 0 || inp == 0 || r == 0 {
        return;
    }
    w.par_chunks_mut(ROWS_PER_TASK * inp)
        .zip(b.par_chunks(ROWS_PER_TASK * r))
        .for_each(|(w_rows, b_rows)| {
            let m = w_rows.len() / inp;
            // SAFETY: the pointers and strides describe `b_rows` [m, r], `a` [r, inp] and
            // `w_rows` [m, inp], row-major, all in bounds (lengths asserted or derived above);
            // `w_rows` does not alias the inputs.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    r,
                    inp,
                    scaling,
                    b_rows.as_ptr(),
                    r as isize,
                    1,
                    a.as_ptr(),
                    inp as isize,
                    1,
                    1.0,
                    w_rows.as_mut_ptr(),
                    inp as isize,
                    1,
                );
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_matches_naive_product() {
        let (out, inp, r) = (301, 1100, 13);
        let a: Vec<f32> = (0..r * inp)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
            .collect();
        let b: Vec<f32> = (0..out * r)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0)
            .collect();
        let base: Vec<f32> = (0..out * inp).map(|i| (i % 17) as f32).collect();
        let mut w = base.clone();
        merge_lora(&mut w, out, inp, &a, &b, r, 0.5);
        for o in 0..out {
            for i in 0..inp {
                let d: f32 = (0..r).map(|k| b[o * r + k] * a[k * inp + i]).sum();
                assert_eq!(w[o * inp + i], base[o * inp + i] + d * 0.5, "({o}, {i})");
            }
        }
    }

    #[test]
    fn merge_does_not_depend_on_the_thread_count() {
        let (out, inp, r) = (1000, 300, 16);
        let noise = |n: usize, seed: u32| -> Vec<f32> {
            (0..n as u32)
                .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 997.0 - 0.5)
                .collect()
        };
        let (a, b, base) = (noise(r * inp, 1), noise(out * r, 2), noise(out * inp, 3));
        let merged = |threads: usize| {
            let mut w = base.clone();
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap_or_else(|e| panic!("{e}"))
                .install(|| merge_lora(&mut w, out, inp, &a, &b, r, 2.0));
            w
        };
        let (one, four) = (merged(1), merged(4));
        assert!(
            one.iter()
                .zip(&four)
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
        assert!(one.iter().zip(&base).any(|(x, y)| x != y));
    }
}
