//! The CUDA runtime of rcx: one device, one stream, the embedded kernel modules, and the
//! plumbing every launch wrapper shares (function lookup, shape checks, error mapping).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut,
    DeviceRepr, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::kernels::{KERNEL_IMAGES, KERNELS_BUILT, KERNELS_NOT_BUILT_REASON, KernelImage};
use crate::error::{Error, Result};

/// An activation element type the kernels are instantiated for; the kernel of type T is
/// named `<kernel>_<SUFFIX>`. Arithmetic is fp32 (or wider) whatever T is.
pub trait Activation: DeviceRepr + ValidAsZeroBits + Copy + Unpin + Send + Sync + 'static {
    const SUFFIX: &'static str;
    /// Whether kernels/attention.cu has tensor-core kernels (version 3) for this type.
    const TENSOR_CORE_ATTENTION: bool;
}

impl Activation for f32 {
    const SUFFIX: &'static str = "f32";
    const TENSOR_CORE_ATTENTION: bool = false;
}

impl Activation for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    const TENSOR_CORE_ATTENTION: bool = true;
}

/// A device buffer a kernel reads: a whole `CudaSlice` or a view of part of one (the
/// model's tensors are views of its arenas).
pub trait DeviceRead<T> {
    fn view(&self) -> CudaView<'_, T>;
}

/// A device buffer a kernel writes: a whole `CudaSlice` or a mutable view of part of one.
pub trait DeviceWrite<T>: DeviceRead<T> {
    fn view_mut(&mut self) -> CudaViewMut<'_, T>;
}

impl<T> DeviceRead<T> for CudaSlice<T> {
    fn view(&self) -> CudaView<'_, T> {
        self.as_view()
    }
}

impl<T> DeviceWrite<T> for CudaSlice<T> {
    fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.as_view_mut()
    }
}

impl<T> DeviceRead<T> for CudaView<'_, T> {
    fn view(&self) -> CudaView<'_, T> {
        self.slice(..)
    }
}

impl<T> DeviceRead<T> for CudaViewMut<'_, T> {
    fn view(&self) -> CudaView<'_, T> {
        self.as_view()
    }
}

impl<T> DeviceWrite<T> for CudaViewMut<'_, T> {
    fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.slice_mut(..)
    }
}

/// Whether the CUDA backend can run here; the error says why not (built without kernels,
/// no driver, no device). Never panics, whatever the machine has.
pub fn available() -> std::result::Result<(), String> {
    if !KERNELS_BUILT {
        return Err(format!(
            "rcx was built without CUDA kernels ({KERNELS_NOT_BUILT_REASON}); install nvcc \
             (scripts/install-cuda.sh) and rebuild"
        ));
    }
    // With dynamic loading cudarc panics on the first driver call when libcuda is absent:
    // probe the library first.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver: libcuda.so was not found".to_string());
    }
    match CudaContext::device_count() {
        Ok(0) => Err("the CUDA driver reports no device".to_string()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("the CUDA driver failed to start: {e}")),
    }
}

/// A device with the rcx kernels loaded. Launches go to one stream, in order.
pub struct CudaRuntime {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    blas: Mutex<Option<Arc<CudaBlas>>>,
    image_kind: &'static str,
}

impl CudaRuntime {
    /// Opens device `ordinal` and loads every kernel module: the sm_90 cubin on compute
    /// capability 9.0, otherwise the newest PTX the device can JIT (compute_90, compute_80).
    pub fn new(ordinal: usize) -> Result<CudaRuntime> {
        available().map_err(|why| Error::internal(format!("CUDA backend unavailable: {why}")))?;
        let ctx = CudaContext::new(ordinal).map_err(driver(&format!("open device {ordinal}")))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver("read the compute capability"))?;
        if major < 8 {
            return Err(Error::internal(format!(
                "CUDA device {ordinal} has compute capability {major}.{minor}; rcx's kernels \
                 need 8.0 or later (bf16)"
            )));
        }
        let mut modules = HashMap::new();
        let mut image_kind = "";
        for image in KERNEL_IMAGES {
            let (module, kind) = load_image(&ctx, image, major, minor)?;
            modules.insert(image.name, module);
            image_kind = kind;
        }
        let stream = ctx.default_stream();
        Ok(CudaRuntime {
            ctx,
            stream,
            modules,
            functions: Mutex::new(HashMap::new()),
            blas: Mutex::new(None),
            image_kind,
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Which images were loaded: "sm_90 cubin", "compute_90 PTX" or "compute_80 PTX".
    pub fn image_kind(&self) -> &'static str {
        self.image_kind
    }

    /// The device's name, e.g. "NVIDIA H200".
    pub fn device_name(&self) -> Result<String> {
        self.ctx.name().map_err(driver("read the device name"))
    }

    /// Waits for every launch so far.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver("synchronize"))
    }

    /// A device copy of `host`.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(driver(&format!(
            "copy {} elements to the device",
            host.len()
        )))
    }

    /// A host copy of `device` (waits for the launches writing it).
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        device: &CudaSlice<T>,
    ) -> Result<Vec<T>> {
        self.stream.clone_dtoh(device).map_err(driver(&format!(
            "copy {} elements to the host",
            device.len()
        )))
    }

    /// `len` zeroed elements on the device.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len)
            .map_err(driver(&format!("allocate {len} elements")))
    }

    /// Kernel `name` of module (kernel file) `module`, loaded once and cached.
    pub(crate) fn function(&self, module: &str, name: &str) -> Result<CudaFunction> {
        let mut functions = self
            .functions
            .lock()
            .map_err(|_| Error::internal("CUDA function cache poisoned by a panic"))?;
        if let Some(f) = functions.get(name) {
            return Ok(f.clone());
        }
        let loaded = self.modules.get(module).ok_or_else(|| {
            Error::internal(format!("CUDA kernel file {module}.cu is not embedded"))
        })?;
        let f = loaded
            .load_function(name)
            .map_err(driver(&format!("find kernel {name} in {module}.cu")))?;
        functions.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// The cuBLAS handle on this runtime's stream, created on first use so that the
    /// kernels work even where libcublas is missing.
    pub(crate) fn blas(&self) -> Result<Arc<CudaBlas>> {
        let mut blas = self
            .blas
            .lock()
            .map_err(|_| Error::internal("cuBLAS handle poisoned by a panic"))?;
        if let Some(handle) = blas.as_ref() {
            return Ok(handle.clone());
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::internal(
                "cuBLAS (libcublas.so) was not found; add its directory to LD_LIBRARY_PATH",
            ));
        }
        let handle = Arc::new(
            CudaBlas::new(self.stream.clone())
                .map_err(|e| Error::internal(format!("CUDA: create the cuBLAS handle: {e}")))?,
        );
        *blas = Some(handle.clone());
        Ok(handle)
    }
}

fn load_image(
    ctx: &Arc<CudaContext>,
    image: &KernelImage,
    major: i32,
    minor: i32,
) -> Result<(Arc<CudaModule>, &'static str)> {
    if (major, minor) == (9, 0) {
        // A cubin that fails to load (e.g. a driver older than the compiler) falls back to PTX.
        if let Ok(module) = ctx.load_module(Ptx::from_binary(image.cubin_sm_90.to_vec())) {
            return Ok((module, "sm_90 cubin"));
        }
    }
    let (ptx, kind) = if major >= 9 {
        (image.ptx_compute_90, "compute_90 PTX")
    } else {
        (image.ptx_compute_80, "compute_80 PTX")
    };
    let module = ctx
        .load_module(Ptx::from_src(ptx))
        .map_err(driver(&format!("load {kind} of {}.cu", image.name)))?;
    Ok((module, kind))
}

/// Maps a driver error to an internal error that says what was being done.
pub(crate) fn driver<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::internal(format!("CUDA: {what}: {e}"))
}

/// Checks that buffer `name` of `op` holds `expected` elements.
pub(crate) fn check_len(op: &str, name: &str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::internal(format!(
            "{op}: {name} has {len} elements, the shapes need {expected}"
        )))
    }
}

/// A dimension as the kernels' `int`.
pub(crate) fn dim(op: &str, name: &str, value: usize) -> Result<i32> {
    i32::try_from(value)
        .map_err(|_| Error::internal(format!("{op}: {name} = {value} does not fit a CUDA int")))
}

/// Blocks of `threads` covering `total` items (total > 0), as a u32 grid size.
pub(crate) fn blocks(op: &str, total: usize, threads: usize) -> Result<u32> {
    u32::try_from(total.div_ceil(threads))
        .map_err(|_| Error::internal(format!("{op}: {total} items need too many blocks")))
}
