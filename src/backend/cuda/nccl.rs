//! rcx's NCCL communicator: this process's rank in a data-parallel run, over cudarc's raw
//! NCCL bindings (cudarc's safe `Comm` panics in its Drop and hides the raw handle that a
//! non-blocking init, `ncclCommGetAsyncError` and `ncclCommAbort` need). docs/scaling.md
//! section 1 has the design: the communicator is created non-blocking, and every collective
//! is waited for on the host while the communicator's asynchronous error and a timeout are
//! polled; an error or the timeout aborts the communicator (`ncclCommAbort`, never
//! `ncclCommDestroy`, which waits for pending work), so that a lost peer, a mismatched
//! collective or a peer that never arrives ends this rank with an error, not a hang.
//! The one exception is a gradient bucket's sum (`start_sum`), which runs on a side stream
//! while the compute stream goes on with the backward; `wait_started` waits for them all,
//! with the same polling.
//!
//! Without GPUs, the emulated device's fake libnccl (kernels/emu/fake_nccl.cpp) runs the
//! ranks as processes; tests/nccl_emu.rs checks every collective here against sums computed
//! on the host.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ops::Range;
use std::ptr::null_mut;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, sys as driver_sys,
};
use cudarc::nccl::{NcclType, sys};

use super::runtime::{CudaRuntime, DeviceRead, DeviceWrite};
use crate::error::{Error, Result};

/// How long a wait sleeps between two looks at the stream and the communicator.
const POLL: Duration = Duration::from_micros(200);

/// A reduction over the ranks (NCCL's `ncclRedOp_t`); `Avg` is the sum over the world size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    Sum,
    Prod,
    Max,
    Min,
    Avg,
}

impl Reduction {
    fn nccl(self) -> sys::ncclRedOp_t {
        match self {
            Reduction::Sum => sys::ncclRedOp_t::ncclSum,
            Reduction::Prod => sys::ncclRedOp_t::ncclProd,
            Reduction::Max => sys::ncclRedOp_t::ncclMax,
            Reduction::Min => sys::ncclRedOp_t::ncclMin,
            Reduction::Avg => sys::ncclRedOp_t::ncclAvg,
        }
    }
}

/// Whether NCCL can be used here; the error says why not. Never panics: with dynamic
/// loading cudarc panics on the first call when libnccl is absent, so it is probed first.
pub fn available() -> std::result::Result<(), String> {
    // SAFETY: loads and unloads the library, calling nothing in it.
    if !unsafe { sys::is_culib_present() } {
        return Err("NCCL (libnccl.so) was not found; add its directory to LD_LIBRARY_PATH".into());
    }
    let mut version: c_int = 0;
    // SAFETY: a valid pointer to an int.
    match unsafe { sys::ncclGetVersion(&mut version) } {
        sys::ncclResult_t::ncclSuccess => Ok(()),
        code => Err(format!(
            "ncclGetVersion failed: {}",
            describe(code, null_mut())
        )),
    }
}

/// A fresh NCCL unique id (`ncclGetUniqueId`): made by one rank, handed to the others.
pub fn unique_id() -> Result<[u8; 128]> {
    available().map_err(|why| Error::internal(format!("NCCL: {why}")))?;
    let mut id = sys::ncclUniqueId { internal: [0; 128] };
    // SAFETY: a valid pointer to an id.
    match unsafe { sys::ncclGetUniqueId(&mut id) } {
        sys::ncclResult_t::ncclSuccess => Ok(id.internal.map(|c| c as u8)),
        code => Err(Error::internal(format!(
            "NCCL: make a unique id: {}",
            describe(code, null_mut())
        ))),
    }
}

/// NCCL's text for `code`, with `ncclGetLastError`'s explanation.
fn describe(code: sys::ncclResult_t, comm: sys::ncclComm_t) -> String {
    let text = |p: *const c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: NCCL returns NUL-terminated strings, static or the communicator's.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    // SAFETY: plain queries; `comm` is null or a live communicator.
    let (name, last) = unsafe {
        (
            text(sys::ncclGetErrorString(code)),
            text(sys::ncclGetLastError(comm)),
        )
    };
    if last.is_empty() {
        format!("{name} ({code:?})")
    } else {
        format!("{name} ({code:?}): {last}")
    }
}

/// NCCL_CONFIG_INITIALIZER with `blocking = 0`: every field left to NCCL's default
/// (NCCL_CONFIG_UNDEF_INT, NULL) except that one. `version` is the older of the library's
/// and this struct's (NCCL 2.30's), so that an older library reads only the fields it knows.
fn non_blocking_config(library_version: c_int) -> sys::ncclConfig_t {
    const UNDEF: c_int = c_int::MIN;
    const STRUCT_VERSION: u32 = 23000; // NCCL_VERSION(2, 30, 0)
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: STRUCT_VERSION.min(library_version.max(0) as u32),
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// The short name of an element type, for messages.
fn type_label<T: NcclType>() -> &'static str {
    use sys::ncclDataType_t::*;
    match T::as_nccl_type() {
        ncclInt8 => "i8",
        ncclUint8 => "u8",
        ncclInt32 => "i32",
        ncclUint32 => "u32",
        ncclInt64 => "i64",
        ncclUint64 => "u64",
        ncclFloat16 => "f16",
        ncclFloat32 => "f32",
        ncclFloat64 => "f64",
        ncclBfloat16 => "bf16",
        _ => "elements",
    }
}

/// This process's rank of a data-parallel run: an NCCL communicator on the runtime's device
/// and stream. Every collective returns once its result is in place (or with an error after
/// which the communicator is aborted and every later call fails).
pub struct Communicator {
    comm: sys::ncclComm_t, // null once aborted
    rt: Arc<CudaRuntime>,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// The stream the gradient buckets are summed on, beside the compute stream (made by
    /// the first `start_sum`).
    side: Option<Arc<CudaStream>>,
    /// Sums started on `side` and not yet waited for.
    started: usize,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time, which the
// `&mut self` of every call guarantees.
unsafe impl Send for Communicator {}

impl Communicator {
    /// Joins the communicator named by `id` (from `unique_id` on one rank) as `rank` of
    /// `world_size`, on `rt`'s device. Every wait, this one and each collective's, fails
    /// after `timeout`: a peer that never arrives is an error naming this rank.
    pub fn new(
        rt: &Arc<CudaRuntime>,
        id: &[u8; 128],
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<Communicator> {
        let mut this = Communicator {
            comm: null_mut(),
            rt: rt.clone(),
            rank,
            world_size,
            timeout,
            side: None,
            started: 0,
        };
        let what = "create the communicator";
        available().map_err(|why| this.error(what, &why))?;
        if rank >= world_size || world_size > c_int::MAX as usize {
            return Err(this.error(what, "the rank must be below the world size"));
        }
        // NCCL takes the device of the thread's current context.
        rt.context()
            .bind_to_thread()
            .map_err(|e| this.error(what, &format!("bind the CUDA context: {e}")))?;
        let mut version: c_int = 0;
        // SAFETY: a valid pointer to an int.
        unsafe { sys::ncclGetVersion(&mut version) };
        let mut config = non_blocking_config(version);
        let id = sys::ncclUniqueId {
            internal: id.map(|b| b as c_char),
        };
        let started = Instant::now();
        // SAFETY: valid pointers; the communicator is aborted on any failure below.
        let status = unsafe {
            sys::ncclCommInitRankConfig(
                &mut this.comm,
                world_size as c_int,
                id,
                rank as c_int,
                &mut config,
            )
        };
        this.wait(what, status, started, || Ok(true))?;
        Ok(this)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Replaces `buf` on every rank by its reduction over the ranks.
    pub fn all_reduce<T: NcclType + DeviceRepr>(
        &mut self,
        buf: &mut impl DeviceWrite<T>,
        reduction: Reduction,
    ) -> Result<()> {
        let stream = self.rt.stream().clone();
        let mut view = buf.view_mut();
        let count = view.len();
        let (ptr, _written) = view.device_ptr_mut(&stream);
        let what = format!(
            "all-reduce ({reduction:?}) of {count} {}",
            type_label::<T>()
        );
        // SAFETY: in place over `count` elements of device memory borrowed for the call.
        self.run(&what, |comm, stream| unsafe {
            sys::ncclAllReduce(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                T::as_nccl_type(),
                reduction.nccl(),
                comm,
                stream,
            )
        })
    }

    /// Replaces `buf` on every rank by its sum over the ranks.
    pub fn all_reduce_sum<T: NcclType + DeviceRepr>(
        &mut self,
        buf: &mut impl DeviceWrite<T>,
    ) -> Result<()> {
        self.all_reduce(buf, Reduction::Sum)
    }

    /// Replaces a few host numbers on every rank by their sum over the ranks (through the
    /// device: NCCL reads device memory).
    pub fn all_reduce_sum_host(&mut self, values: &mut [f64]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut device = self.rt.upload(values)?;
        self.all_reduce_sum(&mut device)?;
        values.copy_from_slice(&self.rt.download(&device)?);
        Ok(())
    }

    /// `recv` [n] on rank r = the sum over the ranks of block r of `send` [world_size x n].
    pub fn reduce_scatter_sum<T: NcclType + DeviceRepr>(
        &mut self,
        send: &impl DeviceRead<T>,
        recv: &mut impl DeviceWrite<T>,
    ) -> Result<()> {
        let stream = self.rt.stream().clone();
        let send = send.view();
        let mut recv = recv.view_mut();
        let count = recv.len();
        let what = format!(
            "reduce-scatter (Sum) of {} {}",
            send.len(),
            type_label::<T>()
        );
        if Some(send.len()) != count.checked_mul(self.world_size) {
            return Err(self.error(
                &what,
                &format!(
                    "the output holds {count}, not 1/{} of the input",
                    self.world_size
                ),
            ));
        }
        let (from, _read) = send.device_ptr(&stream);
        let (to, _written) = recv.device_ptr_mut(&stream);
        // SAFETY: device memory of the checked lengths, borrowed for the call.
        self.run(&what, |comm, stream| unsafe {
            sys::ncclReduceScatter(
                from as *const c_void,
                to as *mut c_void,
                count,
                T::as_nccl_type(),
                sys::ncclRedOp_t::ncclSum,
                comm,
                stream,
            )
        })
    }

    /// In place over `buf` [world_size x n]: block r of rank r becomes the sum over the
    /// ranks of their blocks r (the other blocks are left undefined, as NCCL leaves them).
    pub fn reduce_scatter_sum_in_place<T: NcclType + DeviceRepr>(
        &mut self,
        buf: &mut impl DeviceWrite<T>,
    ) -> Result<()> {
        let stream = self.rt.stream().clone();
        let mut view = buf.view_mut();
        let what = format!(
            "in-place reduce-scatter (Sum) of {} {}",
            view.len(),
            type_label::<T>()
        );
        let count = self.block(&what, view.len())?;
        let (ptr, _written) = view.device_ptr_mut(&stream);
        let own = ptr + (self.rank * count * std::mem::size_of::<T>()) as u64;
        // SAFETY: NCCL's in-place form: the output is the rank's block of the input.
        self.run(&what, |comm, stream| unsafe {
            sys::ncclReduceScatter(
                ptr as *const c_void,
                own as *mut c_void,
                count,
                T::as_nccl_type(),
                sys::ncclRedOp_t::ncclSum,
                comm,
                stream,
            )
        })
    }

    /// `recv` [world_size x n] on every rank = the ranks' `send` [n], in rank order.
    pub fn all_gather<T: NcclType + DeviceRepr>(
        &mut self,
        send: &impl DeviceRead<T>,
        recv: &mut impl DeviceWrite<T>,
    ) -> Result<()> {
        let stream = self.rt.stream().clone();
        let send = send.view();
        let mut recv = recv.view_mut();
        let count = send.len();
        let what = format!("all-gather of {count} {}", type_label::<T>());
        if Some(recv.len()) != count.checked_mul(self.world_size) {
            return Err(self.error(
                &what,
                &format!(
                    "the output holds {}, not {} times the input",
                    recv.len(),
                    self.world_size
                ),
            ));
        }
        let (from, _read) = send.device_ptr(&stream);
        let (to, _written) = recv.device_ptr_mut(&stream);
        // SAFETY: device memory of the checked lengths, borrowed for the call.
        self.run(&what, |comm, stream| unsafe {
            sys::ncclAllGather(
                from as *const c_void,
                to as *mut c_void,
                count,
                T::as_nccl_type(),
                comm,
                stream,
            )
        })
    }

    /// In place over `buf` [world_size x n]: every rank's block r becomes rank r's block r.
    pub fn all_gather_in_place<T: NcclType + DeviceRepr>(
        &mut self,
        buf: &mut impl DeviceWrite<T>,
    ) -> Result<()> {
        let stream = self.rt.stream().clone();
        let mut view = buf.view_mut();
        let what = format!(
            "in-place all-gather of {} {}",
            view.len(),
            type_label::<T>()
        );
        let count = self.block(&what, view.len())?;
        let (ptr, _written) = view.device_ptr_mut(&stream);
        let own = ptr + (self.rank * count * std::mem::size_of::<T>()) as u64;
        // SAFETY: NCCL's in-place form: the input is the rank's block of the output.
        self.run(&what, |comm, stream| unsafe {
            sys::ncclAllGather(
                own as *const c_void,
                ptr as *mut c_void,
                count,
                T::as_nccl_type(),
                comm,
                stream,
            )
        })
    }

    /// Replaces `buf` on every rank by rank `root`'s.
    pub fn broadcast<T: NcclType + DeviceRepr>(
        &mut self,
        buf: &mut impl DeviceWrite<T>,
        root: usize,
    ) -> Result<()> {
        self.rooted(buf, None, root)
    }

    /// Replaces `buf` on rank `root` by its reduction over the ranks; the other ranks'
    /// buffers are left as they are.
    pub fn reduce<T: NcclType + DeviceRepr>(
        &mut self,
        buf: &mut impl DeviceWrite<T>,
        reduction: Reduction,
        root: usize,
    ) -> Result<()> {
        self.rooted(buf, Some(reduction), root)
    }

    /// In-place broadcast (no reduction) or reduce to `root`.
    fn rooted<T: NcclType + DeviceRepr>(
        &mut self,
        buf: &mut impl DeviceWrite<T>,
        reduction: Option<Reduction>,
        root: usize,
    ) -> Result<()> {
        let stream = self.rt.stream().clone();
        let mut view = buf.view_mut();
        let count = view.len();
        let what = match reduction {
            None => format!(
                "broadcast from rank {root} of {count} {}",
                type_label::<T>()
            ),
            Some(r) => format!(
                "reduce ({r:?}) to rank {root} of {count} {}",
                type_label::<T>()
            ),
        };
        if root >= self.world_size {
            return Err(self.error(&what, "the root is not a rank"));
        }
        let (ptr, _written) = view.device_ptr_mut(&stream);
        // SAFETY: in place over `count` elements of device memory borrowed for the call.
        self.run(&what, |comm, stream| unsafe {
            match reduction {
                None => sys::ncclBroadcast(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    count,
                    T::as_nccl_type(),
                    root as c_int,
                    comm,
                    stream,
                ),
                Some(r) => sys::ncclReduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    count,
                    T::as_nccl_type(),
                    r.nccl(),
                    root as c_int,
                    comm,
                    stream,
                ),
            }
        })
    }

    /// The block length of an in-place reduce-scatter or all-gather over `len` elements.
    fn block(&self, what: &str, len: usize) -> Result<usize> {
        if len.is_multiple_of(self.world_size) {
            Ok(len / self.world_size)
        } else {
            Err(self.error(
                what,
                &format!(
                    "{len} elements do not split into {} blocks",
                    self.world_size
                ),
            ))
        }
    }

    /// Issues one collective on the runtime's stream and waits for it (after the sums
    /// started on the side stream, which NCCL must see finish first on every rank alike).
    fn run(
        &mut self,
        what: &str,
        call: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t,
    ) -> Result<()> {
        self.wait_started()?;
        if self.comm.is_null() {
            return Err(self.error(what, "the communicator was aborted after an earlier error"));
        }
        let stream = self.rt.stream().clone();
        let started = Instant::now();
        let status = call(self.comm, stream.cu_stream() as sys::cudaStream_t);
        let done = match stream.record_event(None) {
            Ok(event) => event,
            Err(e) => return Err(self.fail(what, &format!("record a CUDA event: {e}"))),
        };
        self.wait_for_event(what, status, started, &done)
    }

    /// Starts the sum over the ranks of `buf[range]`, in place, on the side stream after
    /// all the work queued so far on the compute stream: every rank's sum (`root` None,
    /// ncclAllReduce) or rank `root`'s alone (ncclReduce; the others' are left as they
    /// are). Returns once NCCL has queued it, while the compute stream goes on; nothing may
    /// touch `buf[range]` until `wait_started`.
    pub fn start_sum(
        &mut self,
        buf: &mut CudaSlice<f32>,
        range: Range<usize>,
        root: Option<usize>,
    ) -> Result<()> {
        let count = range.len();
        let what = match root {
            None => format!("all-reduce (Sum) of gradient bucket {range:?} ({count} f32)"),
            Some(root) => {
                format!("reduce (Sum) to rank {root} of gradient bucket {range:?} ({count} f32)")
            }
        };
        if self.comm.is_null() {
            return Err(self.error(&what, "the communicator was aborted after an earlier error"));
        }
        if range.end > buf.len() || root.is_some_and(|r| r >= self.world_size) {
            return Err(self.error(&what, "outside the buffer or the ranks"));
        }
        let side = self.side_stream(&what)?;
        let compute = self.rt.stream().clone();
        let queued = compute
            .record_event(None)
            .and_then(|event| side.wait(&event));
        if let Err(e) = queued {
            return Err(self.fail(
                &what,
                &format!("order the side stream after the backward: {e}"),
            ));
        }
        let (base, _written) = buf.device_ptr_mut(&compute);
        let ptr = (base as usize + range.start * size_of::<f32>()) as *mut c_void;
        let started = Instant::now();
        let stream = side.cu_stream() as sys::cudaStream_t;
        // SAFETY: in place over `count` f32 inside `buf` (checked above), which the caller
        // leaves alone until `wait_started`.
        let status = unsafe {
            match root {
                None => sys::ncclAllReduce(
                    ptr,
                    ptr,
                    count,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    stream,
                ),
                Some(root) => sys::ncclReduce(
                    ptr,
                    ptr,
                    count,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    root as c_int,
                    self.comm,
                    stream,
                ),
            }
        };
        // A non-blocking communicator has queued the call once it is no longer in progress.
        self.wait(&what, status, started, || Ok(true))?;
        self.started += 1;
        Ok(())
    }

    /// Waits until every sum `start_sum` started has finished.
    pub fn wait_started(&mut self) -> Result<()> {
        let Some(side) = self.side.clone().filter(|_| self.started > 0) else {
            return Ok(());
        };
        let what = format!("{} gradient bucket sums", self.started);
        let started = Instant::now();
        let done = match side.record_event(None) {
            Ok(event) => event,
            Err(e) => return Err(self.fail(&what, &format!("record a CUDA event: {e}"))),
        };
        self.wait_for_event(&what, sys::ncclResult_t::ncclSuccess, started, &done)?;
        self.started = 0;
        Ok(())
    }

    /// The side stream, made at the first call. rcx orders its two streams itself (an
    /// event before each sum, a host wait after), so cudarc's per-buffer event tracking,
    /// which would order every later launch after every sum, is turned off.
    fn side_stream(&mut self, what: &str) -> Result<Arc<CudaStream>> {
        if let Some(side) = &self.side {
            return Ok(side.clone());
        }
        let ctx = self.rt.context().clone();
        // SAFETY: the gradient arena, the one buffer both streams use, lives as long as the
        // backend, and nothing on the compute stream touches a started bucket before
        // `wait_started` has seen it finish.
        unsafe { ctx.disable_event_tracking() };
        match ctx.new_stream() {
            Ok(side) => {
                self.side = Some(side.clone());
                Ok(side)
            }
            Err(e) => Err(self.fail(what, &format!("create the side stream: {e}"))),
        }
    }

    /// `wait` for a call that returned `status`, until `done` (an event after it) is done.
    fn wait_for_event(
        &mut self,
        what: &str,
        status: sys::ncclResult_t,
        started: Instant,
        done: &CudaEvent,
    ) -> Result<()> {
        self.wait(what, status, started, || {
            // SAFETY: a live event of this context.
            match unsafe { cudarc::driver::result::event::query(done.cu_event()) } {
                Ok(()) => Ok(true),
                Err(e) if e.0 == driver_sys::cudaError_enum::CUDA_ERROR_NOT_READY => Ok(false),
                Err(e) => Err(format!("the stream failed: {e}")),
            }
        })
    }

    /// After a call that returned `status`: waits until the communicator has no work in
    /// progress and `finished` says the stream is done, polling the communicator's
    /// asynchronous error and the timeout; any error aborts the communicator.
    fn wait(
        &mut self,
        what: &str,
        status: sys::ncclResult_t,
        started: Instant,
        mut finished: impl FnMut() -> std::result::Result<bool, String>,
    ) -> Result<()> {
        use sys::ncclResult_t::{ncclInProgress, ncclSuccess};
        if !matches!(status, ncclSuccess | ncclInProgress) {
            let cause = describe(status, self.comm);
            return Err(self.fail(what, &cause));
        }
        loop {
            let mut state = ncclSuccess;
            // SAFETY: a live communicator (`status` says it was made) and a valid pointer.
            let polled = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            if polled != ncclSuccess {
                state = polled;
            }
            match state {
                ncclSuccess => match finished() {
                    Ok(true) => return Ok(()),
                    Ok(false) => {}
                    Err(why) => return Err(self.fail(what, &why)),
                },
                ncclInProgress => {}
                code => {
                    let cause = describe(code, self.comm);
                    return Err(self.fail(what, &cause));
                }
            }
            if started.elapsed() >= self.timeout {
                let cause = format!(
                    "not finished within {:.1} s: a peer stopped, died or never arrived",
                    self.timeout.as_secs_f64()
                );
                return Err(self.fail(what, &cause));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Aborts the communicator and returns the error of `what`.
    fn fail(&mut self, what: &str, cause: &str) -> Error {
        self.abort();
        self.error(what, cause)
    }

    fn error(&self, what: &str, cause: &str) -> Error {
        Error::internal(format!(
            "NCCL rank {} of {}: {what}: {cause}",
            self.rank, self.world_size
        ))
    }

    /// `ncclCommAbort`, never `ncclCommDestroy`: it returns without waiting for pending work
    /// or for peers (every collective issued here was already waited for).
    fn abort(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: a live communicator, forgotten here.
            unsafe { sys::ncclCommAbort(self.comm) };
            self.comm = null_mut();
        }
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        self.abort();
    }
}
