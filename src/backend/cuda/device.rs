//! Finding a GPU without ever panicking on a machine that has none.
//!
//! cudarc loads `libcuda.so` lazily and panics when it is missing (or lacks a symbol), so
//! [`probe`] first asks whether the library can be opened at all and then runs every driver
//! call inside `catch_unwind`. [`select`] turns `--device auto|cpu|cuda` into a choice and logs
//! one line saying which device runs the model and why.

use crate::config::Device;
use cudarc::driver::{result, sys, CudaContext};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What the engine needs to know about the GPU it will use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor); selects the NVRTC target `sm_XY`.
    pub compute_capability: (i32, i32),
    pub total_mem: usize,
}

impl DeviceInfo {
    /// NVRTC `--gpu-architecture` value for this device, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        format!(
            "sm_{}{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }
}

/// Device 0 if the driver library is present, initialises and reports a device; never panics.
pub fn probe() -> Result<DeviceInfo, String> {
    probe_ordinal(0)
}

pub fn probe_ordinal(ordinal: usize) -> Result<DeviceInfo, String> {
    // SAFETY: only tries dlopen on the candidate library names; no symbol is called.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver library (libcuda.so) on this machine".into());
    }
    let run = || -> Result<DeviceInfo, String> {
        result::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
        let count = CudaContext::device_count().map_err(|e| format!("cuDeviceGetCount: {e:?}"))?;
        if count <= 0 {
            return Err("CUDA driver present but no device answers".into());
        }
        if ordinal >= count as usize {
            return Err(format!("CUDA device {ordinal} requested, {count} present"));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("CUDA context: {e:?}"))?;
        Ok(DeviceInfo {
            ordinal,
            name: ctx.name().map_err(|e| format!("device name: {e:?}"))?,
            compute_capability: ctx
                .compute_capability()
                .map_err(|e| format!("compute capability: {e:?}"))?,
            total_mem: ctx
                .total_mem()
                .map_err(|e| format!("total memory: {e:?}"))?,
        })
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(r) => r,
        Err(_) => Err(
            "the CUDA driver library could not be used (missing symbol or panic while loading it)"
                .into(),
        ),
    }
}

/// The device the model will run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selected {
    Cpu,
    Cuda(DeviceInfo),
}

/// `auto`: CUDA when [`probe`] succeeds, else the CPU; `cuda`: CUDA or an error naming the reason;
/// `cpu`: the CPU. Logs one line with the outcome.
pub fn select(requested: Device) -> Result<Selected, String> {
    match requested {
        Device::Cpu => {
            tracing::info!("device: cpu (requested)");
            Ok(Selected::Cpu)
        }
        Device::Cuda => match probe() {
            Ok(d) => {
                log_cuda(&d, "requested");
                Ok(Selected::Cuda(d))
            }
            Err(e) => Err(format!("--device cuda: {e}")),
        },
        Device::Auto => match probe() {
            Ok(d) => {
                log_cuda(&d, "auto");
                Ok(Selected::Cuda(d))
            }
            Err(e) => {
                tracing::info!("device: cpu (auto; no usable CUDA device: {e})");
                Ok(Selected::Cpu)
            }
        },
    }
}

fn log_cuda(d: &DeviceInfo, why: &str) {
    tracing::info!(
        "device: cuda:{} {} ({}, {} GiB) ({why})",
        d.ordinal,
        d.name,
        d.arch(),
        d.total_mem >> 30
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics_and_auto_always_resolves() {
        // On a machine without a driver this is Err; with one, Ok. Either way no panic.
        let p = probe();
        match select(Device::Auto) {
            Ok(Selected::Cpu) => assert!(p.is_err()),
            Ok(Selected::Cuda(d)) => assert_eq!(Ok(d), p),
            Err(e) => panic!("auto must not fail: {e}"),
        }
        assert_eq!(select(Device::Cpu), Ok(Selected::Cpu));
        assert_eq!(select(Device::Cuda).is_ok(), p.is_ok());
    }

    #[test]
    fn arch_string() {
        let d = DeviceInfo {
            ordinal: 0,
            name: "x".into(),
            compute_capability: (9, 0),
            total_mem: 0,
        };
        assert_eq!(d.arch(), "sm_90");
    }
}
