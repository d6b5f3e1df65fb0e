//! The CPU emulation of the CUDA kernels, from the test's side: compiles kernels/*.cu with
//! g++ against kernels/emu (cached in target/ by content hash), loads them, allocates
//! guarded "device" buffers and launches kernels with typed arguments.

mod build;

use std::ffi::{CStr, c_char, c_void};
use std::path::Path;
use std::sync::OnceLock;

use build::{compiler, finish, fnv, kernel_sources, read, spawn};
use libloading::Library;
use rcx::backend::cuda::launch::LaunchShape;

/// The emulator's C API (kernels/emu/emu.cpp).
type LaunchFn = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    usize,
    usize,
    extern "C" fn(*mut c_void),
    *mut c_void,
) -> i32;
type LastErrorFn = unsafe extern "C" fn() -> *const c_char;
type AllocFn = unsafe extern "C" fn(usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);

/// Loaded kernel libraries and the emulator's entry points.
pub struct Emu {
    kernels: Vec<(String, Library)>, // (file stem, library)
    launch: LaunchFn,
    last_error: LastErrorFn,
    alloc: AllocFn,
    free: FreeFn,
    _runtime: Library,
}

/// The emulator, built once per test process; Err says why it cannot be (no compiler).
pub fn emu() -> Result<&'static Emu, String> {
    static EMU: OnceLock<Result<Emu, String>> = OnceLock::new();
    EMU.get_or_init(build).as_ref().map_err(Clone::clone)
}

/// The emulator, or None after printing why the test is skipped; RCX_REQUIRE_EMU=1 (CI)
/// turns a skip into a failure.
pub fn emu_or_skip(test: &str) -> Option<&'static Emu> {
    match emu() {
        Ok(emu) => Some(emu),
        Err(why) => {
            assert!(
                std::env::var("RCX_REQUIRE_EMU").map_or(true, |v| v != "1"),
                "{test}: RCX_REQUIRE_EMU=1 but the emulator is unavailable: {why}"
            );
            eprintln!("{test}: skipped, no kernel emulator: {why}");
            None
        }
    }
}

fn build() -> Result<Emu, String> {
    let (cxx, version) = compiler()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kernels = root.join("kernels");
    let (emu_h, emu_cpp) = (kernels.join("emu/emu.h"), kernels.join("emu/emu.cpp"));
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-emu");
    std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let flags = build::FLAGS.join(" ");

    let runtime_hash = fnv(&[
        version.as_bytes(),
        flags.as_bytes(),
        &read(&emu_h)?,
        &read(&emu_cpp)?,
    ]);
    let runtime_name = format!("librcx_emu-{runtime_hash:016x}.so");
    let runtime = cache.join(&runtime_name);
    if !runtime.exists() {
        let args = [
            "-U_FORTIFY_SOURCE".to_string(), // its longjmp check rejects leaving a fiber
            format!("-Wl,-soname,{runtime_name}"),
            emu_cpp.display().to_string(),
        ];
        finish(spawn(&cxx, &args, runtime.clone())?)?;
    }

    let common = read(&kernels.join("common.cuh"))?;
    let mut sources = kernel_sources(&kernels)?;
    // The emulator's own test kernels, library "selftest".
    sources.push(kernels.join("emu/selftest.cu"));
    let mut libraries = Vec::new();
    let mut jobs = Vec::new();
    for source in &sources {
        let stem = source.file_stem().unwrap().to_string_lossy().into_owned();
        let hash = fnv(&[runtime_name.as_bytes(), &common, &read(source)?]);
        let library = cache.join(format!("{stem}-{hash:016x}.so"));
        if !library.exists() {
            let args = [
                "-fvisibility=hidden".to_string(), // kernels alone are exported (emu.h)
                "-I".to_string(),
                kernels.display().to_string(),
                "-include".to_string(),
                emu_h.display().to_string(),
                "-x".to_string(),
                "c++".to_string(),
                source.display().to_string(),
                "-x".to_string(),
                "none".to_string(),
                format!("-L{}", cache.display()),
                format!("-l:{runtime_name}"),
                "-Wl,-rpath,$ORIGIN".to_string(),
            ];
            jobs.push(spawn(&cxx, &args, library.clone())?);
        }
        libraries.push((stem, library));
    }
    for job in jobs {
        finish(job)?;
    }

    // SAFETY: our own libraries, whose initialisers only set up plain globals.
    let load =
        |path: &Path| unsafe { Library::new(path) }.map_err(|e| format!("{}: {e}", path.display()));
    let runtime_lib = load(&runtime)?;
    let kernels = libraries
        .iter()
        .map(|(stem, path)| Ok((stem.clone(), load(path)?)))
        .collect::<Result<Vec<_>, String>>()?;
    // SAFETY: the signatures of kernels/emu/emu.cpp's extern "C" API.
    unsafe {
        Ok(Emu {
            launch: *runtime_lib
                .get::<LaunchFn>(b"rcx_emu_launch")
                .map_err(|e| e.to_string())?,
            last_error: *runtime_lib
                .get::<LastErrorFn>(b"rcx_emu_last_error")
                .map_err(|e| e.to_string())?,
            alloc: *runtime_lib
                .get::<AllocFn>(b"rcx_emu_alloc")
                .map_err(|e| e.to_string())?,
            free: *runtime_lib
                .get::<FreeFn>(b"rcx_emu_free")
                .map_err(|e| e.to_string())?,
            kernels,
            _runtime: runtime_lib,
        })
    }
}

/// A launch configuration: grid and block dimensions, dynamic shared memory in bytes, and
/// the kernel's dynamic shared memory limit when the host raised it (a GPU's
/// cudaFuncAttributeMaxDynamicSharedMemorySize; None: the default 48 KiB).
#[derive(Clone, Copy, Debug)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: usize,
    pub shared_limit: Option<usize>,
}

/// A launch wrapper's shape (`rcx::backend::cuda::launch`), kernel limit at its default.
impl From<LaunchShape> for Launch {
    fn from(shape: LaunchShape) -> Launch {
        Launch {
            grid: shape.grid,
            block: (shape.block, 1, 1),
            shared_bytes: shape.shared_bytes as usize,
            shared_limit: None,
        }
    }
}

impl Launch {
    /// The launch of a wrapper that raises the kernel's limit first when the shape needs it
    /// (ops.rs `allow_shared`, through the same `LaunchShape::shared_opt_in`).
    pub fn allowing_shared(shape: LaunchShape) -> Launch {
        Launch {
            shared_limit: shape.shared_opt_in().map(|bytes| bytes as usize),
            ..Launch::from(shape)
        }
    }
}

/// A one-dimensional grid of one-dimensional blocks, for the emulator's own test kernels.
pub fn cfg(grid: u32, threads: usize, shared_bytes: usize) -> Launch {
    Launch {
        grid: (grid, 1, 1),
        block: (threads as u32, 1, 1),
        shared_bytes,
        shared_limit: None,
    }
}

/// A kernel argument: the scalar and pointer types that map one to one onto the C
/// parameter types (int = i32, size_t = usize, uint64_t = u64, float, double, T*).
pub trait Arg: Copy {}
impl Arg for i32 {}
impl Arg for u32 {}
impl Arg for usize {}
impl Arg for u64 {}
impl Arg for f32 {}
impl Arg for f64 {}
impl<T> Arg for *mut T {}
impl<T> Arg for *const T {}

/// A tuple of kernel arguments, called as the kernel's C signature.
pub trait KernelArgs: Copy {
    /// # Safety
    /// `kernel` must be a function whose C parameters are exactly these types.
    unsafe fn call(&self, kernel: *const c_void);
}

macro_rules! kernel_args {
    ($($name:ident),+) => {
        impl<$($name: Arg),+> KernelArgs for ($($name,)+) {
            #[allow(non_snake_case)]
            unsafe fn call(&self, kernel: *const c_void) {
                // SAFETY: the caller guarantees the signature.
                unsafe {
                    let f: unsafe extern "C" fn($($name),+) = std::mem::transmute(kernel);
                    let ($($name,)+) = *self;
                    f($($name),+)
                }
            }
        }
    };
}
kernel_args!(A);
kernel_args!(A, B);
kernel_args!(A, B, C);
kernel_args!(A, B, C, D);
kernel_args!(A, B, C, D, E);
kernel_args!(A, B, C, D, E, F);
kernel_args!(A, B, C, D, E, F, G);
kernel_args!(A, B, C, D, E, F, G, H);
kernel_args!(A, B, C, D, E, F, G, H, I);
kernel_args!(A, B, C, D, E, F, G, H, I, J);
kernel_args!(A, B, C, D, E, F, G, H, I, J, K);
kernel_args!(A, B, C, D, E, F, G, H, I, J, K, L);
kernel_args!(A, B, C, D, E, F, G, H, I, J, K, L, M);
kernel_args!(A, B, C, D, E, F, G, H, I, J, K, L, M, N);
kernel_args!(A, B, C, D, E, F, G, H, I, J, K, L, M, N, O);
kernel_args!(A, B, C, D, E, F, G, H, I, J, K, L, M, N, O, P);
kernel_args!(A, B, C, D, E, F, G, H, I, J, K, L, M, N, O, P, Q);

struct Call<A> {
    kernel: *const c_void,
    args: A,
}

/// What every emulated thread runs: the kernel with the launch's arguments.
extern "C" fn thread_body<A: KernelArgs>(ctx: *mut c_void) {
    // SAFETY: ctx is the &Call<A> that `launch` passed, alive for the whole launch; the
    // signature was the caller's promise to `launch`.
    unsafe {
        let call = &*(ctx as *const Call<A>);
        call.args.call(call.kernel)
    }
}

impl Emu {
    /// Runs kernel `symbol` of kernels/`file`.cu; Err is the emulator's launch error.
    /// `args` must match the kernel's C parameters one for one, as cudarc's `.arg()`s do.
    pub fn launch<A: KernelArgs>(
        &self,
        file: &str,
        symbol: &str,
        launch: Launch,
        args: A,
    ) -> Result<(), String> {
        let (_, library) = self
            .kernels
            .iter()
            .find(|(stem, _)| stem == file)
            .unwrap_or_else(|| panic!("no kernels/{file}.cu"));
        // SAFETY: looked up as an opaque address; called only through `thread_body`.
        let kernel = unsafe { library.get::<unsafe extern "C" fn()>(symbol.as_bytes()) }
            .unwrap_or_else(|e| panic!("kernels/{file}.cu has no kernel {symbol}: {e}"));
        let call = Call {
            kernel: *kernel as *const c_void,
            args,
        };
        let ((gx, gy, gz), (bx, by, bz)) = (launch.grid, launch.block);
        // SAFETY: thread_body::<A> reads `call` only during the launch.
        let status = unsafe {
            (self.launch)(
                gx,
                gy,
                gz,
                bx,
                by,
                bz,
                launch.shared_bytes,
                launch.shared_limit.unwrap_or(0),
                thread_body::<A>,
                &call as *const Call<A> as *mut c_void,
            )
        };
        if status == 0 {
            return Ok(());
        }
        // SAFETY: a NUL-terminated string owned by the emulator, read on the same thread.
        let why = unsafe { CStr::from_ptr((self.last_error)()) };
        Err(format!("{symbol}: {}", why.to_string_lossy()))
    }

    /// `launch` that must succeed.
    pub fn run<A: KernelArgs>(&self, file: &str, symbol: &str, launch: Launch, args: A) {
        if let Err(why) = self.launch(file, symbol, launch, args) {
            panic!("{why}");
        }
    }

    /// A device buffer holding `values`; its end is a guard page (see emu.cpp).
    pub fn upload<T: Copy>(&'static self, values: &[T]) -> Buf<T> {
        let bytes = std::mem::size_of_val(values);
        // SAFETY: the emulator's allocator; null only when mmap fails.
        let ptr = unsafe { (self.alloc)(bytes) } as *mut T;
        assert!(
            !ptr.is_null(),
            "the emulator could not allocate {bytes} bytes"
        );
        // SAFETY: ptr has room for values.len() elements, aligned for T (the buffer ends on
        // a page boundary and its size is a multiple of T's).
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), ptr, values.len()) };
        Buf {
            ptr,
            len: values.len(),
            emu: self,
        }
    }
}

/// A buffer kernels read and write through `ptr()`.
pub struct Buf<T> {
    ptr: *mut T,
    len: usize,
    emu: &'static Emu,
}

impl<T: Copy> Buf<T> {
    pub fn ptr(&self) -> *mut T {
        self.ptr
    }

    pub fn read(&self) -> Vec<T> {
        // SAFETY: ptr holds len initialised elements.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec()
    }
}

impl<T> Drop for Buf<T> {
    fn drop(&mut self) {
        // SAFETY: allocated by this emulator, freed once.
        unsafe { (self.emu.free)(self.ptr as *mut c_void) }
    }
}
