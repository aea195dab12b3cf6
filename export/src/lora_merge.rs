//! The LoRA merge kernel: `W += s · (B @ A)` in float32 (peft `get_delta_weight`).

/// Width of the column panels of `A` packed contiguously, and of the register tile.
const PANEL: usize = 16;
/// Output rows computed together, so each panel row of `A` is loaded once for all of them.
const ROW_BLOCK: usize = 4;

/// `w[out, in] += scaling · (b[out, r] @ a[r, in])`, all row-major float32.
///
/// `(B @ A)` is accumulated per element before the scaling is applied, as peft's
/// `(weight_B @ weight_A) * scaling`. Rows are split between threads; within a thread, a
/// `r × 16` panel of `A` is packed contiguously (it stays in L1) and `4 × 16` outputs are
/// accumulated in registers.
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
    if out == 0 || inp == 0 {
        return;
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    let threads = if out * inp * r < 1 << 22 { 1 } else { threads };
    let rows_per = out.div_ceil(threads);
    std::thread::scope(|scope| {
        for (w_rows, b_rows) in w.chunks_mut(rows_per * inp).zip(b.chunks(rows_per * r)) {
            scope.spawn(move || merge_rows(w_rows, inp, a, b_rows, r, scaling));
        }
    });
}

fn merge_rows(w: &mut [f32], inp: usize, a: &[f32], b: &[f32], r: usize, scaling: f32) {
    let rows = w.len() / inp;
    let full_blocks = rows / ROW_BLOCK * ROW_BLOCK;
    let mut panel = vec![[0f32; PANEL]; r];
    for c0 in (0..inp).step_by(PANEL) {
        let width = PANEL.min(inp - c0);
        for (k, dst) in panel.iter_mut().enumerate() {
            dst[..width].copy_from_slice(&a[k * inp + c0..k * inp + c0 + width]);
            dst[width..].fill(0.0);
        }
        for row0 in (0..full_blocks).step_by(ROW_BLOCK) {
            let mut acc = [[0f32; PANEL]; ROW_BLOCK];
            for (k, a_k) in panel.iter().enumerate() {
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let bk = b[(row0 + i) * r + k];
                    for j in 0..PANEL {
                        acc_i[j] += bk * a_k[j];
                    }
                }
            }
            for (i, acc_i) in acc.iter().enumerate() {
                add_scaled(
                    &mut w[(row0 + i) * inp + c0..(row0 + i) * inp + c0 + width],
                    acc_i,
                    scaling,
                );
            }
        }
        for row in full_blocks..rows {
            let mut acc = [0f32; PANEL];
            for (a_k, &bk) in panel.iter().zip(&b[row * r..(row + 1) * r]) {
                for j in 0..PANEL {
                    acc[j] += bk * a_k[j];
                }
            }
            add_scaled(
                &mut w[row * inp + c0..row * inp + c0 + width],
                &acc,
                scaling,
            );
        }
    }
}

fn add_scaled(w: &mut [f32], delta: &[f32; PANEL], scaling: f32) {
    for (x, &d) in w.iter_mut().zip(delta) {
        *x += d * scaling;
    }
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
}
