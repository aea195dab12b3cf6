//! Sequential writer for ONNX external data (the `.onnx.data` side file).
//!
//! Tensors are appended one after another; each starts at an offset that is a multiple of
//! [`ALIGNMENT`], with zero bytes in between, so ONNX Runtime can memory-map them. The writer
//! never seeks, so any [`Write`] works as the sink (a file, a buffer, a hashing writer).

use std::io::{self, Write};

/// Every tensor in the side file starts at a multiple of this many bytes.
pub const ALIGNMENT: u64 = 4096;

const ZEROS: [u8; ALIGNMENT as usize] = [0; ALIGNMENT as usize];

/// Appends tensors to an external-data sink, aligning each to [`ALIGNMENT`].
#[derive(Debug)]
pub struct ExternalDataWriter<W: Write> {
    inner: W,
    written: u64,
}

impl<W: Write> ExternalDataWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, written: 0 }
    }

    /// Writes one tensor's raw bytes and returns its `(offset, length)` in the side file.
    pub fn write_tensor(&mut self, bytes: &[u8]) -> io::Result<(u64, u64)> {
        let padding = self.written.next_multiple_of(ALIGNMENT) - self.written;
        // `padding < ALIGNMENT`, so the cast cannot truncate.
        self.inner.write_all(&ZEROS[..padding as usize])?;
        self.written += padding;
        let offset = self.written;
        self.inner.write_all(bytes)?;
        let length = bytes.len() as u64;
        self.written += length;
        Ok((offset, length))
    }

    /// Total bytes written so far, padding included (the size the side file will have).
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    /// Flushes and returns the sink.
    pub fn into_inner(mut self) -> io::Result<W> {
        self.inner.flush()?;
        Ok(self.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_start_aligned_and_keep_their_length() -> io::Result<()> {
        let mut w = ExternalDataWriter::new(Vec::new());
        assert_eq!(w.write_tensor(&[1; 10])?, (0, 10));
        assert_eq!(w.write_tensor(&[2; 4096])?, (4096, 4096));
        assert_eq!(w.write_tensor(&[3; 5000])?, (8192, 5000));
        assert_eq!(w.write_tensor(&[4; 3])?, (16384, 3));
        assert_eq!(w.bytes_written(), 16387);
        let buf = w.into_inner()?;
        assert_eq!(buf.len(), 16387);
        assert!(buf[..10].iter().all(|&b| b == 1));
        assert!(buf[10..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..8192].iter().all(|&b| b == 2));
        assert!(buf[8192..13192].iter().all(|&b| b == 3));
        assert!(buf[13192..16384].iter().all(|&b| b == 0));
        assert!(buf[16384..].iter().all(|&b| b == 4));
        Ok(())
    }

    #[test]
    fn empty_tensor_and_empty_writer() -> io::Result<()> {
        let mut w = ExternalDataWriter::new(Vec::new());
        assert_eq!(w.bytes_written(), 0);
        assert_eq!(w.write_tensor(&[])?, (0, 0));
        assert_eq!(w.write_tensor(&[7])?, (0, 1));
        assert_eq!(w.write_tensor(&[])?, (4096, 0));
        assert_eq!(w.into_inner()?.len(), 4096);
        Ok(())
    }
}
