//! Copying strided tensor views out of their storage.

use super::objects::TensorRef;

/// Largest output a view may have beyond the size of its storage (views with
/// zero strides, e.g. from `expand`).
const MAX_EXPANDED_BYTES: u64 = 1 << 30;

pub(super) enum Storage<'a> {
    Owned(Vec<u8>),
    Borrowed(&'a [u8]),
}

impl Storage<'_> {
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Storage::Owned(v) => v,
            Storage::Borrowed(b) => b,
        }
    }
}

/// Copies the view `t` out of its storage as contiguous bytes.
pub(super) fn materialise(
    storage: Storage<'_>,
    elsize: usize,
    t: &TensorRef,
) -> Result<Vec<u8>, String> {
    let bytes = storage.bytes();
    let es = elsize as u64;
    let numel = t
        .size
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {:?} has too many elements", t.size))?;
    let out_len = numel
        .checked_mul(es)
        .ok_or_else(|| format!("shape {:?} has too many bytes", t.size))?;
    if numel == 0 {
        return Ok(Vec::new());
    }
    let overflow = || {
        format!(
            "view (offset {}, size {:?}, stride {:?}) overflows",
            t.offset, t.size, t.stride
        )
    };
    let mut last = t.offset;
    for (&d, &s) in t.size.iter().zip(&t.stride) {
        last = (d - 1)
            .checked_mul(s)
            .and_then(|x| last.checked_add(x))
            .ok_or_else(overflow)?;
    }
    let end = last
        .checked_add(1)
        .and_then(|x| x.checked_mul(es))
        .ok_or_else(overflow)?;
    let have = bytes.len() as u64;
    if end > have {
        return Err(format!(
            "view (offset {}, size {:?}, stride {:?}) needs {} elements of {elsize} bytes but storage \
             has {have} bytes",
            t.offset,
            t.size,
            t.stride,
            last + 1
        ));
    }
    if out_len > have && out_len > MAX_EXPANDED_BYTES {
        return Err(format!(
            "view of {out_len} bytes over a storage of {have} bytes is too large to materialise"
        ));
    }
    let start = (t.offset * es) as usize;
    let out_len = out_len as usize;
    if is_contiguous(&t.size, &t.stride) {
        if let Storage::Owned(mut v) = storage {
            if start == 0 && out_len == v.len() {
                return Ok(v);
            }
            v.truncate(start + out_len);
            v.drain(..start);
            return Ok(v);
        }
        let mut out = Vec::new();
        out.try_reserve_exact(out_len)
            .map_err(|e| format!("cannot allocate {out_len} bytes: {e}"))?;
        out.extend_from_slice(&bytes[start..start + out_len]);
        return Ok(out);
    }

    let mut out = Vec::new();
    out.try_reserve_exact(out_len)
        .map_err(|e| format!("cannot allocate {out_len} bytes: {e}"))?;
    // Not contiguous, so at least one dimension.
    let n = t.size.len();
    let (outer_size, inner) = t.size.split_at(n - 1);
    let outer_stride = &t.stride[..n - 1];
    let (inner_size, inner_stride) = (inner[0], t.stride[n - 1]);
    let mut idx = vec![0u64; n - 1];
    // Every index below is at most `last`, which was checked against the storage.
    loop {
        let base = t.offset
            + idx
                .iter()
                .zip(outer_stride)
                .map(|(&i, &s)| i * s)
                .sum::<u64>();
        if inner_stride == 1 {
            let a = (base * es) as usize;
            out.extend_from_slice(&bytes[a..a + (inner_size * es) as usize]);
        } else {
            for j in 0..inner_size {
                let a = ((base + j * inner_stride) * es) as usize;
                out.extend_from_slice(&bytes[a..a + elsize]);
            }
        }
        let mut k = n - 1;
        loop {
            if k == 0 {
                return Ok(out);
            }
            k -= 1;
            idx[k] += 1;
            if idx[k] < outer_size[k] {
                break;
            }
            idx[k] = 0;
        }
    }
}

fn is_contiguous(size: &[u64], stride: &[u64]) -> bool {
    let mut expected = 1u64;
    for (&d, &s) in size.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}
