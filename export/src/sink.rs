//! Writing the external-data file on its own thread, with the page cache it dirties kept small.
//!
//! The graph builders produce a tensor's bytes, then hand them to a [`Write`]r; copying them into
//! the page cache and waiting for the disk should not hold up converting the next tensor. A
//! [`BackgroundFile`] collects writes into large buffers and passes each one, through a short
//! queue, to a thread that writes it. That thread starts write-back of every finished window and
//! drops the window before it from the page cache once it is on disk, so a 16 GB export does not
//! push 16 GB of other programs' pages out of memory.

use std::fs::File;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

/// Bytes per buffer handed to the writer thread.
const BUFFER: usize = 16 << 20;
/// Buffers queued for the writer thread at most (bounds the memory in flight).
const QUEUE: usize = 4;
/// Write-back window: after each window is written, it is sent to disk, and the window before
/// it is dropped from the page cache.
const WINDOW: u64 = 256 << 20;

enum Job {
    Data(Vec<u8>),
    /// Write everything queued so far, sync the file to disk, then answer.
    Flush(SyncSender<io::Result<()>>),
}

/// A file written by a background thread; see the module documentation.
pub struct BackgroundFile {
    buf: Vec<u8>,
    jobs: Option<SyncSender<Job>>,
    /// Buffers the thread has written, handed back for reuse (fresh ones would each cost the
    /// kernel 16 MiB of page zeroing).
    spare: Receiver<Vec<u8>>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl std::fmt::Debug for BackgroundFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackgroundFile")
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl BackgroundFile {
    pub fn new(file: File) -> io::Result<Self> {
        let (tx, rx) = sync_channel(QUEUE);
        let (give_back, spare) = sync_channel(QUEUE + 2);
        let thread = std::thread::Builder::new()
            .name("carrot-export-writer".into())
            .spawn(move || write_loop(file, rx, give_back))?;
        Ok(Self {
            buf: Vec::with_capacity(BUFFER),
            jobs: Some(tx),
            spare,
            thread: Some(thread),
        })
    }

    fn send(&mut self, job: Job) -> io::Result<()> {
        let sent = match &self.jobs {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The thread stopped on an error: report it.
            Err(self
                .join()
                .err()
                .unwrap_or_else(|| io::Error::other("the external-data writer thread stopped")))
        }
    }

    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = match self.spare.try_recv() {
            Ok(mut b) => {
                b.clear();
                b
            }
            Err(_) => Vec::with_capacity(BUFFER),
        };
        let full = std::mem::replace(&mut self.buf, next);
        self.send(Job::Data(full))
    }

    fn join(&mut self) -> io::Result<()> {
        self.jobs = None;
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                Err(io::Error::other("the external-data writer thread panicked"))
            }),
            None => Ok(()),
        }
    }
}

impl Write for BackgroundFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() {
            let room = BUFFER - self.buf.len();
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.buf.extend_from_slice(now);
            rest = later;
            if self.buf.len() == BUFFER {
                self.send_buffer()?;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()?;
        let (tx, rx) = sync_channel(1);
        self.send(Job::Flush(tx))?;
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::other("the external-data writer thread stopped")))
    }
}

impl Drop for BackgroundFile {
    fn drop(&mut self) {
        let _ = self.join();
    }
}

fn write_loop(
    mut file: File,
    jobs: Receiver<Job>,
    give_back: SyncSender<Vec<u8>>,
) -> io::Result<()> {
    let mut written = 0u64;
    let mut synced = 0u64;
    for job in jobs {
        match job {
            Job::Data(bytes) => {
                file.write_all(&bytes)?;
                written += bytes.len() as u64;
                let _ = give_back.try_send(bytes);
                while written - synced >= WINDOW {
                    settle(&file, synced, WINDOW);
                    synced += WINDOW;
                }
            }
            Job::Flush(answer) => {
                let _ = answer.send(file.flush().and_then(|()| file.sync_all()));
            }
        }
    }
    file.sync_all()?;
    drop_cached(&file, 0, 0);
    Ok(())
}

/// Starts write-back of `[start, start + len)` and drops the window before it from the page cache
/// once it has reached the disk (Linux; elsewhere the kernel decides).
#[cfg(target_os = "linux")]
fn settle(file: &File, start: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: plain system calls on an open descriptor; failures only leave pages cached.
    unsafe {
        libc::sync_file_range(
            fd,
            start as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
        if start >= len {
            let before = start - len;
            libc::sync_file_range(
                fd,
                before as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
        }
    }
    if start >= len {
        drop_cached(file, start - len, len);
    }
}

#[cfg(not(target_os = "linux"))]
fn settle(_file: &File, _start: u64, _len: u64) {}

/// Drops clean cached pages of `[start, start + len)` (`len` 0: to the end of the file).
#[cfg(target_os = "linux")]
fn drop_cached(file: &File, start: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: advisory system call on an open descriptor.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            start as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn drop_cached(_file: &File, _start: u64, _len: u64) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_arrive_in_order_across_buffers() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("data");
        let mut w = BackgroundFile::new(File::create(&path)?)?;
        let mut want = Vec::new();
        // Pieces of uneven sizes, some larger than a buffer.
        for (i, len) in [1usize, BUFFER - 3, 7, 2 * BUFFER + 5, 0, 4096]
            .into_iter()
            .enumerate()
        {
            let piece: Vec<u8> = (0..len).map(|j| (i * 31 + j * 7) as u8).collect();
            w.write_all(&piece)?;
            want.extend_from_slice(&piece);
        }
        w.flush()?;
        assert_eq!(std::fs::read(&path)?.len(), want.len());
        w.write_all(b"tail")?;
        want.extend_from_slice(b"tail");
        w.flush()?;
        drop(w);
        assert!(std::fs::read(&path)? == want);
        Ok(())
    }

    #[test]
    fn a_write_error_is_reported() -> io::Result<()> {
        // A read-only descriptor: the thread's first write fails, and a later call says why.
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("data");
        std::fs::write(&path, b"")?;
        let mut w = BackgroundFile::new(File::open(&path)?)?;
        let big = vec![1u8; BUFFER];
        let mut failed = None;
        for _ in 0..(QUEUE + 3) {
            if let Err(e) = w.write_all(&big) {
                failed = Some(e);
                break;
            }
        }
        let err = match failed {
            Some(e) => e,
            None => w
                .flush()
                .expect_err("writing to a read-only file must fail"),
        };
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
        Ok(())
    }
}
