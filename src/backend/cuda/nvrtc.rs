//! Start-up compilation of `kernels/*.cu` with NVRTC, straight to CUBIN for the device's
//! architecture, with an on-disk cache.
//!
//! The sources are compiled into the binary (`include_str!`), so the server needs no source tree.
//! A CUBIN is cached at `$XDG_CACHE_HOME/seedance/kernels/` (else `~/.cache/seedance/kernels/`,
//! else the system temp dir) under `<file>-<arch>-<key>.cubin`, where `key` is a SHA-256 of the
//! source, the architecture, the NVRTC options and the NVRTC version: editing a kernel, changing
//! GPU or upgrading NVRTC each miss the cache, nothing else does. Cache writes go through a
//! temporary file + rename, so concurrent servers never read a torn file.
//!
//! `cuda_fp16.h` is not built into NVRTC: the include directory is taken from
//! `$SEEDANCE_CUDA_INCLUDE`, `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`,
//! or the `nvidia-cuda-runtime-cu12` wheel in a Python site-packages (the one
//! `scripts/check_kernels.py` uses). The first hit that holds `cuda_fp16.h` wins.

use super::CudaError;
use cudarc::nvrtc::{result, sys};
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

/// One kernel source file and the entry points the launchers load from it.
pub struct KernelSource {
    pub file: &'static str,
    pub src: &'static str,
    pub functions: &'static [&'static str],
}

macro_rules! kernel {
    ($file:literal, [$($f:literal),* $(,)?]) => {
        KernelSource {
            file: $file,
            src: include_str!(concat!("../../../kernels/", $file)),
            functions: &[$($f),*],
        }
    };
}

/// Every kernel file; `check_kernels.py` compiles the same files with the same options.
pub const KERNELS: &[KernelSource] = &[
    kernel!("embedding.cu", ["embedding_f16"]),
    kernel!("rmsnorm.cu", ["rmsnorm_residual"]),
    kernel!("rope.cu", ["rope_qkv_cache"]),
    kernel!("swiglu.cu", ["swiglu"]),
    kernel!(
        "gemv.cu",
        [
            "gemv_f16_t1",
            "gemv_f16_t2",
            "gemv_f16_t3",
            "gemv_f16_t4",
            "gemv_f16_t5",
            "gemv_f16_t6",
            "gemv_f16_t7",
            "gemv_f16_t8",
            "gemv_reduce"
        ]
    ),
    kernel!("gemm.cu", ["gemm_f16_mma"]),
    kernel!(
        "paged_attention.cu",
        [
            "paged_attn_decode_g1",
            "paged_attn_decode_g2",
            "paged_attn_decode_g3",
            "paged_attn_decode_g4",
            "paged_attn_decode_g5",
            "paged_attn_decode_g6",
            "paged_attn_decode_g7",
            "paged_attn_decode_g8",
            "paged_attn_reduce"
        ]
    ),
    kernel!("prefill_attention.cu", ["prefill_attn"]),
    kernel!("sampling.cu", ["argmax_rows", "sample_rows"]),
];

/// Options shared with scripts/check_kernels.py (COMMON_OPTS); the arch and include dir are added.
pub const NVRTC_OPTIONS: &[&str] = &["--std=c++17", "-default-device"];

/// The directory CUBINs are cached in.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("seedance").join("kernels")
}

/// Cache key: SHA-256 over everything that changes the CUBIN, hex, first 16 bytes.
pub fn cache_key(src: &str, arch: &str, nvrtc_version: (i32, i32)) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(src.as_bytes());
    ctx.update(b"\0");
    ctx.update(arch.as_bytes());
    for o in NVRTC_OPTIONS {
        ctx.update(b"\0");
        ctx.update(o.as_bytes());
    }
    ctx.update(format!("\0nvrtc {}.{}", nvrtc_version.0, nvrtc_version.1).as_bytes());
    ctx.finish().as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The directory holding `cuda_fp16.h`, see the module docs for the search order.
pub fn find_include_dir() -> Option<PathBuf> {
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("SEEDANCE_CUDA_INCLUDE") {
        cands.push(d.into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(var) {
            cands.push(PathBuf::from(d).join("include"));
        }
    }
    cands.push("/usr/local/cuda/include".into());
    cands.extend(python_wheel_includes());
    cands.into_iter().find(|d| d.join("cuda_fp16.h").is_file())
}

/// `.../site-packages/nvidia/cuda_runtime/include` under the usual Python prefixes.
fn python_wheel_includes() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = vec!["/usr/lib".into(), "/usr/local/lib".into()];
    if let Some(h) = std::env::var_os("HOME") {
        let h = PathBuf::from(h);
        roots.push(h.join(".local/lib"));
        if let Ok(rd) = std::fs::read_dir(h.join(".pyenv/versions")) {
            roots.extend(rd.flatten().map(|e| e.path().join("lib")));
        }
    }
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        roots.push(PathBuf::from(v).join("lib"));
    }
    let mut out = Vec::new();
    for root in roots {
        let Ok(rd) = std::fs::read_dir(&root) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with("python3") {
                for sp in ["site-packages", "dist-packages"] {
                    out.push(e.path().join(sp).join("nvidia/cuda_runtime/include"));
                }
            }
        }
    }
    out
}

/// NVRTC's version, or an error when libnvrtc cannot be loaded (checked before any call, since
/// cudarc panics on a missing library).
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    // SAFETY: only tries dlopen on the candidate names.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::Nvrtc(
            "libnvrtc.so not found (install the CUDA toolkit or the nvidia-cuda-nvrtc-cu12 wheel and add its lib/ to LD_LIBRARY_PATH)".into(),
        ));
    }
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: two valid out-pointers.
    let rc = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Nvrtc(format!("nvrtcVersion: {rc:?}")));
    }
    Ok((major, minor))
}

/// CUBIN of `k` for `arch`, from the cache or freshly compiled (and then cached).
pub fn cubin(k: &KernelSource, arch: &str) -> Result<Vec<u8>, CudaError> {
    let version = nvrtc_version()?;
    let dir = cache_dir();
    let stem = k.file.trim_end_matches(".cu");
    let path = dir.join(format!(
        "{stem}-{arch}-{}.cubin",
        cache_key(k.src, arch, version)
    ));
    if let Ok(bytes) = std::fs::read(&path) {
        if !bytes.is_empty() {
            return Ok(bytes);
        }
    }
    let include = find_include_dir().ok_or_else(|| {
        CudaError::Nvrtc("cuda_fp16.h not found: set SEEDANCE_CUDA_INCLUDE or CUDA_HOME".into())
    })?;
    let bytes = compile(k, arch, &include)?;
    if let Err(e) = store(&dir, &path, &bytes) {
        tracing::warn!("kernel cache {}: {e}", path.display());
    }
    Ok(bytes)
}

fn store(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Compiles one file to CUBIN; a compile error carries the NVRTC log.
pub fn compile(k: &KernelSource, arch: &str, include: &Path) -> Result<Vec<u8>, CudaError> {
    let src = CString::new(k.src)
        .map_err(|_| CudaError::Nvrtc(format!("{}: NUL byte in source", k.file)))?;
    let name = CString::new(k.file)
        .map_err(|_| CudaError::Nvrtc(format!("{}: NUL byte in name", k.file)))?;
    let prog = result::create_program(&src, Some(&name))
        .map_err(|e| CudaError::Nvrtc(format!("{}: create program: {e:?}", k.file)))?;
    let mut opts: Vec<String> = NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect();
    opts.push(format!("--gpu-architecture={arch}"));
    opts.push(format!("-I{}", include.display()));
    // SAFETY: `prog` is a live program; options are plain strings.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let out = match compiled {
        Ok(()) => get_cubin(prog).map_err(|e| CudaError::Nvrtc(format!("{}: {e}", k.file))),
        Err(e) => Err(CudaError::Nvrtc(format!(
            "{} [{arch}]: {e:?}\n{}",
            k.file,
            log(prog)
        ))),
    };
    // SAFETY: destroyed once, after its last use.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

fn log(prog: sys::nvrtcProgram) -> String {
    // SAFETY: `prog` is live; the returned buffer is NUL-terminated by NVRTC.
    match unsafe { result::get_program_log(prog) } {
        Ok(buf) => unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
        Err(e) => format!("(no log: {e:?})"),
    }
}

fn get_cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>, String> {
    let mut size = 0usize;
    // SAFETY: `prog` compiled successfully; `size` is a valid out-pointer.
    let rc = unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) };
    if rc != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return Err(format!("nvrtcGetCUBINSize: {rc:?} (size {size})"));
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds exactly the `size` bytes NVRTC reported.
    let rc = unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) };
    if rc != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcGetCUBIN: {rc:?}"));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_changes_with_source_arch_and_version() {
        let k = cache_key("a", "sm_90", (12, 9));
        assert_eq!(k.len(), 32);
        assert_eq!(k, cache_key("a", "sm_90", (12, 9)));
        assert_ne!(k, cache_key("b", "sm_90", (12, 9)));
        assert_ne!(k, cache_key("a", "sm_80", (12, 9)));
        assert_ne!(k, cache_key("a", "sm_90", (12, 8)));
    }

    #[test]
    fn every_listed_function_is_defined_in_its_file() {
        for k in KERNELS {
            for f in k.functions {
                let direct = k.src.contains(&format!(" {f}("));
                // gemv_f16_t<N> / paged_attn_decode_g<N> come from an instance macro.
                let via_macro = f
                    .rsplit_once('_')
                    .map(|(stem, n)| {
                        k.src.contains(&format!("{stem}_"))
                            && k.src.contains(&format!("INSTANCE({})", &n[1..]))
                    })
                    .unwrap_or(false);
                assert!(direct || via_macro, "{}: {f} not found", k.file);
            }
        }
    }

    #[test]
    fn compiles_every_kernel_when_nvrtc_is_installed() {
        // NVRTC needs no GPU; CI installs it for the kernels stage. Skip where it is absent.
        if nvrtc_version().is_err() {
            eprintln!("skipped: libnvrtc not loadable (see scripts/check_kernels.py)");
            return;
        }
        let Some(inc) = find_include_dir() else {
            eprintln!("skipped: cuda_fp16.h not found");
            return;
        };
        for k in KERNELS {
            let bin = compile(k, "sm_80", &inc).unwrap_or_else(|e| panic!("{e}"));
            assert!(bin.len() > 1000, "{}: tiny CUBIN", k.file);
        }
        // The cache: a miss compiles and stores, a hit returns the same bytes.
        let dir = std::env::temp_dir().join(format!("seedance-kcache-{}", std::process::id()));
        // No other test in this binary reads XDG_CACHE_HOME.
        std::env::set_var("XDG_CACHE_HOME", &dir);
        let k = &KERNELS[0];
        let first = cubin(k, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        let files: Vec<_> = std::fs::read_dir(cache_dir())
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert_eq!(files.len(), 1, "one cached CUBIN: {files:?}");
        assert_eq!(cubin(k, "sm_90").ok(), Some(first));
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!(
            "compiled {} kernel files with NVRTC; cache hit ok",
            KERNELS.len()
        );
    }
}
