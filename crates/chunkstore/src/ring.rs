//! I/O PATH. The store's one io_uring, owned by one thread.
//!
//! ```text
//!  tokio tasks ──Op──► mpsc ──► ring thread ──SQE──► kernel
//!       ▲                         │  ▲                  │
//!       └──── oneshot ◄───────────┘  └──── CQE ◄────────┘
//!                    (eventfd read wakes the thread when a sender finds it asleep)
//! ```
//!
//! Senders never make a syscall unless the ring thread is asleep (then one eventfd
//! write). The thread keeps up to `queue_depth` operations in flight, resubmits
//! short transfers, and drops each op's [`Hold`] (locks, in-flight counts) only when
//! the kernel is done with its buffer: a caller that stops waiting cannot release a
//! lock while its data is still being written.
//! No blocking calls other than `io_uring_enter`, no logging above debug here.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use io_uring::{opcode, types, IoUring};
use tokio::sync::oneshot;

use crate::aligned::AlignedBuf;

pub use crate::store::Hold;

pub enum WriteBuf {
    Aligned(AlignedBuf),
    /// Caller's bytes that already happen to be aligned: written without a copy.
    Bytes(Bytes),
}

impl WriteBuf {
    fn ptr(&self) -> *const u8 {
        match self {
            WriteBuf::Aligned(b) => b.as_ptr(),
            WriteBuf::Bytes(b) => b.as_ptr(),
        }
    }
}

pub enum OpKind {
    Read(AlignedBuf),
    Write(WriteBuf),
    /// fdatasync of the whole file.
    DataSync,
    /// fallocate(mode) of [offset, offset+len).
    Fallocate {
        mode: i32,
    },
}

pub enum Done {
    Read(AlignedBuf),
    Ok,
}

pub struct Op {
    pub kind: OpKind,
    pub file: Arc<OwnedFd>,
    pub offset: u64,
    pub len: u64,
    pub hold: Hold,
    pub reply: oneshot::Sender<io::Result<Done>>,
}

struct InFlight {
    op: Op,
    /// Bytes transferred so far (reads and writes resubmit the rest).
    done: u64,
}

struct Shared {
    sleeping: AtomicBool,
    eventfd: OwnedFd,
}

/// The submitting side, cloned into the store.
pub struct Ring {
    tx: Sender<Op>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const WAKE: u64 = u64::MAX;

/// The ring thread busy-polls only with at most this many I/Os in flight.
const POLL_MAX_INFLIGHT: usize = 2;

impl Ring {
    /// `poll` is how long the thread busy-polls (its channel and the completion
    /// queue) after its last activity before it sleeps in `io_uring_enter`; zero
    /// never polls. Polling trades CPU for the two thread wake-ups per I/O.
    pub fn start(queue_depth: u32, poll: Duration, name: &str) -> io::Result<Ring> {
        let qd = queue_depth.clamp(1, 4096);
        let ring = IoUring::new((qd + 1).next_power_of_two())?;
        // SAFETY: plain syscall; we take ownership of the returned descriptor.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor we own.
        let eventfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(efd) };
        let shared = Arc::new(Shared { sleeping: AtomicBool::new(false), eventfd });
        let (tx, rx) = mpsc::channel();
        let mut worker = Worker {
            ring,
            rx,
            shared: shared.clone(),
            qd: qd as usize,
            slots: Vec::new(),
            free: Vec::new(),
            inflight: 0,
            wake_buf: Box::new(0),
            closing: false,
            poll,
        };
        let thread = std::thread::Builder::new().name(name.to_string()).spawn(move || worker.run())?;
        Ok(Ring { tx, shared, thread: Some(thread) })
    }

    /// Queues `op`. On a dead ring the op comes back so the caller can fail it
    /// (returned by value: this is the rare shutdown path, not worth a box per I/O).
    #[allow(clippy::result_large_err)]
    pub fn submit(&self, op: Op) -> Result<(), Op> {
        self.tx.send(op).map_err(|e| e.0)?;
        // Pairs with the fence in Worker::run between `sleeping = true` and its
        // last look at the channel: either it sees our op or we see it asleep.
        fence(Ordering::SeqCst);
        if self.shared.sleeping.swap(false, Ordering::SeqCst) {
            wake(&self.shared.eventfd);
        }
        Ok(())
    }
}

fn wake(efd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64 to an eventfd. EAGAIN (counter full)
    // means a wake is already pending, which is all we need.
    unsafe { libc::write(efd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Closing the channel makes the thread finish what is in flight and exit.
        let (dead_tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, dead_tx));
        wake(&self.shared.eventfd);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    ring: IoUring,
    rx: Receiver<Op>,
    shared: Arc<Shared>,
    qd: usize,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    inflight: usize,
    wake_buf: Box<u64>,
    closing: bool,
    poll: Duration,
}

impl Worker {
    fn run(&mut self) {
        self.arm_wake();
        loop {
            let mut progressed = self.take_new();
            progressed |= self.reap();
            if self.closing && self.inflight == 0 {
                break;
            }
            if progressed {
                if let Err(e) = self.ring.submit() {
                    self.log_submit_error(e);
                }
                continue;
            }
            // Nothing new: poll for a while (the next request of a QD1 caller, or
            // a completion, usually comes within microseconds), then sleep until
            // a completion or a wake.
            if self.poll_briefly() {
                continue;
            }
            let can_take = !self.closing && self.inflight < self.qd;
            if can_take {
                self.shared.sleeping.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                match self.rx.try_recv() {
                    Ok(op) => {
                        self.shared.sleeping.store(false, Ordering::SeqCst);
                        self.start(op);
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => {
                        self.shared.sleeping.store(false, Ordering::SeqCst);
                        self.closing = true;
                        continue;
                    }
                    Err(TryRecvError::Empty) => {}
                }
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed");
                    self.log_submit_error(e);
                }
            }
            self.shared.sleeping.store(false, Ordering::SeqCst);
        }
        tracing::debug!("chunk store ring thread exits");
    }

    /// Spins until a request or a completion is ready (true) or the poll budget
    /// is spent (false). Yields between looks, so that on a small machine the
    /// threads producing requests still get the CPU. Only at shallow depth: with
    /// many I/Os in flight each wake-up reaps many completions anyway, and the
    /// CPU is better left to the request producers.
    fn poll_briefly(&mut self) -> bool {
        if self.poll.is_zero() || self.closing || self.inflight > POLL_MAX_INFLIGHT {
            return false;
        }
        let until = Instant::now() + self.poll;
        loop {
            if !self.ring.completion().is_empty() {
                return true;
            }
            if self.inflight < self.qd {
                match self.rx.try_recv() {
                    Ok(op) => {
                        self.start(op);
                        if let Err(e) = self.ring.submit() {
                            self.log_submit_error(e);
                        }
                        return true;
                    }
                    Err(TryRecvError::Disconnected) => {
                        self.closing = true;
                        return true;
                    }
                    Err(TryRecvError::Empty) => {}
                }
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::yield_now();
        }
    }

    fn take_new(&mut self) -> bool {
        let mut any = false;
        while !self.closing && self.inflight < self.qd {
            match self.rx.try_recv() {
                Ok(op) => {
                    self.start(op);
                    any = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.closing = true,
            }
        }
        any
    }

    fn arm_wake(&mut self) {
        let e = opcode::Read::new(
            types::Fd(self.shared.eventfd.as_raw_fd()),
            &mut *self.wake_buf as *mut u64 as *mut u8,
            8,
        )
        .build()
        .user_data(WAKE);
        self.push(&e);
    }

    fn push(&mut self, e: &io_uring::squeue::Entry) {
        loop {
            // SAFETY: every buffer referenced by an entry lives in `slots` (or is
            // wake_buf) until its completion is reaped.
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return;
            }
            // Queue full: hand what we have to the kernel and retry.
            let _ = self.ring.submit();
        }
    }

    fn start(&mut self, op: Op) {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[idx] = Some(InFlight { op, done: 0 });
        self.inflight += 1;
        self.issue(idx);
    }

    fn issue(&mut self, idx: usize) {
        let Some(f) = self.slots[idx].as_mut() else { return };
        let fd = types::Fd(f.op.file.as_raw_fd() as RawFd);
        let off = f.op.offset + f.done;
        let rest = (f.op.len - f.done) as u32;
        let e = match &mut f.op.kind {
            OpKind::Read(buf) => {
                // SAFETY: done < capacity; the buffer outlives the op.
                let p = unsafe { buf.as_mut_ptr().add(f.done as usize) };
                opcode::Read::new(fd, p, rest).offset(off).build()
            }
            OpKind::Write(buf) => {
                // SAFETY: as above.
                let p = unsafe { buf.ptr().add(f.done as usize) };
                opcode::Write::new(fd, p, rest).offset(off).build()
            }
            OpKind::DataSync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            OpKind::Fallocate { mode } => opcode::Fallocate::new(fd, f.op.len).offset(f.op.offset).mode(*mode).build(),
        };
        self.push(&e.user_data(idx as u64));
    }

    fn reap(&mut self) -> bool {
        let mut done = Vec::new();
        {
            let cq = self.ring.completion();
            for c in cq {
                done.push((c.user_data(), c.result()));
            }
        }
        let any = !done.is_empty();
        for (ud, res) in done {
            if ud == WAKE {
                self.arm_wake();
                continue;
            }
            self.complete(ud as usize, res);
        }
        any
    }

    fn complete(&mut self, idx: usize, res: i32) {
        let Some(f) = self.slots[idx].as_mut() else { return };
        if res < 0 {
            if res == -libc::EINTR || res == -libc::EAGAIN {
                self.issue(idx);
                return;
            }
            self.finish(idx, Err(io::Error::from_raw_os_error(-res)));
            return;
        }
        match f.op.kind {
            OpKind::Read(_) | OpKind::Write(_) => {
                if res == 0 {
                    let e = io::Error::new(io::ErrorKind::UnexpectedEof, "short transfer");
                    self.finish(idx, Err(e));
                    return;
                }
                f.done += res as u64;
                if f.done < f.op.len {
                    self.issue(idx);
                    return;
                }
                self.finish(idx, Ok(()));
            }
            OpKind::DataSync | OpKind::Fallocate { .. } => self.finish(idx, Ok(())),
        }
    }

    fn finish(&mut self, idx: usize, r: io::Result<()>) {
        let Some(f) = self.slots[idx].take() else { return };
        self.free.push(idx);
        self.inflight -= 1;
        let Op { kind, mut hold, reply, .. } = f.op;
        if r.is_err() {
            hold.failed(f.done);
        }
        let out = r.map(|()| match kind {
            OpKind::Read(mut buf) => {
                // SAFETY: the kernel filled exactly `len` bytes.
                unsafe { buf.set_len(f.done as usize) };
                Done::Read(buf)
            }
            _ => Done::Ok,
        });
        // Release locks before waking the caller, so its follow-up finds them free.
        drop(hold);
        let _ = reply.send(out);
    }

    fn log_submit_error(&mut self, e: io::Error) {
        // Entries already pushed stay queued and go with the next submit.
        tracing::debug!(error = %e, "io_uring submit error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    #[tokio::test]
    async fn many_ops_in_flight_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .expect("create");
        f.set_len(1 << 20).expect("set_len");
        // SAFETY: into_raw_fd gives up ownership to the OwnedFd.
        let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(f)) });
        let ring = Ring::start(8, Duration::from_micros(20), "test-ring").expect("ring");
        let mut rxs = Vec::new();
        for i in 0..64u64 {
            let (tx, rx) = oneshot::channel();
            let buf = AlignedBuf::copy_from(&[i as u8; 4096]);
            let op = Op {
                kind: OpKind::Write(WriteBuf::Aligned(buf)),
                file: fd.clone(),
                offset: i * 4096,
                len: 4096,
                hold: Hold::none(),
                reply: tx,
            };
            assert!(ring.submit(op).is_ok());
            rxs.push(rx);
        }
        for rx in rxs {
            assert!(matches!(rx.await, Ok(Ok(Done::Ok))));
        }
        let (tx, rx) = oneshot::channel();
        let op = Op {
            kind: OpKind::Read(AlignedBuf::for_read(4096)),
            file: fd.clone(),
            offset: 63 * 4096,
            len: 4096,
            hold: Hold::none(),
            reply: tx,
        };
        assert!(ring.submit(op).is_ok());
        match rx.await {
            Ok(Ok(Done::Read(b))) => assert!(b.as_ref().iter().all(|&x| x == 63)),
            Ok(Ok(Done::Ok)) => panic!("read returned no buffer"),
            Ok(Err(e)) => panic!("read failed: {e}"),
            Err(_) => panic!("ring dropped the reply"),
        }
    }
}
