//! The fused kernels: [`cpu`] for flex and ndarray (on the backends' own primitives),
//! [`cubecl`] for the CubeCL devices (wgpu, and with it CUDA, ROCm and Metal; through Burn's
//! backend extensions). They know tensors and the numerics contract, never modules or
//! parameter paths.
//!
//! [`route`] decides, once per pair and before anything is dispatched (the generated dispatch
//! panics on a backend it does not list), which of them a pair of tensors takes.

use burn::tensor::{DType, Device, Tensor};

pub(crate) mod cpu;
pub use cpu::storage_address;
#[cfg(feature = "wgpu")]
pub(crate) mod cubecl;

/// The implementation a pair of tensors is merged with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// [`cpu`]: reductions read back per tensor, coefficients on the host, fused combine.
    Cpu,
    /// [`cubecl`]: statistics, coefficients and combine on the device, nothing read back.
    #[cfg(feature = "wgpu")]
    Cube,
    /// Burn's tensor ops ([`crate::reduce`] and a generic combine), on any device.
    Generic,
}

/// Whether the device is one of the CPU backends this crate has kernels for (flex, ndarray),
/// without autodiff.
pub(crate) fn is_cpu(device: &Device) -> bool {
    #[allow(unreachable_patterns)] // with ndarray as the only backend, nothing else is left
    match device.as_dispatch() {
        #[cfg(feature = "flex")]
        burn::backend::DispatchDevice::Flex(_) => true,
        #[cfg(feature = "ndarray")]
        burn::backend::DispatchDevice::NdArray(_) => true,
        _ => false,
    }
}

/// Whether the device is a CubeCL one (wgpu) without autodiff, where the [`cubecl`] kernels run.
pub(crate) fn is_cube(device: &Device) -> bool {
    #[cfg(feature = "wgpu")]
    {
        matches!(device.as_dispatch(), burn::backend::DispatchDevice::Cube(_))
    }
    #[cfg(not(feature = "wgpu"))]
    {
        let _ = device;
        false
    }
}

/// Whether the CPU kernels take this pair as it is, without an f32 copy: f16 or bf16 pairs of
/// one dtype on flex (the kernels widen them as they read).
pub(crate) fn takes_half<const D: usize>(a: &Tensor<D>, b: &Tensor<D>) -> bool {
    #[cfg(feature = "flex")]
    {
        matches!(a.dtype(), DType::F16 | DType::BF16)
            && a.dtype() == b.dtype()
            && matches!(
                a.device().as_dispatch(),
                burn::backend::DispatchDevice::Flex(_)
            )
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (a, b);
        false
    }
}

/// The route of a pair of tensors of one shape and device, without autodiff, as they are
/// computed: f32 pairs take the kernels of their device where it has them, and so do the pairs
/// of [`takes_half`]; everything else (f64, devices of other backends) the generic path.
pub(crate) fn route<const D: usize>(a: &Tensor<D>, b: &Tensor<D>) -> Route {
    if takes_half(a, b) {
        return Route::Cpu;
    }
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return Route::Generic;
    }
    let device = a.device();
    if is_cpu(&device) {
        return Route::Cpu;
    }
    #[cfg(feature = "wgpu")]
    if is_cube(&device) {
        return Route::Cube;
    }
    Route::Generic
}
