//! The process's one GPU device: created once with the adapter's own limits and features, shared by burn's
//! ops and moela's kernels.

use std::sync::OnceLock;

use burn::tensor::Device;

use crate::error::{Error, Result};

static DEVICE: OnceLock<std::result::Result<Device, String>> = OnceLock::new();

fn wgpu_options() -> burn::tensor::wgpu::WgpuOptions {
    let options = Device::wgpu_options();
    // On Linux only Vulkan is usable; asking for it alone also skips probing GL/EGL displays.
    #[cfg(target_os = "linux")]
    let options = options.graphics_api(burn::tensor::wgpu::WgpuBackend::Vulkan);
    options
}

fn no_adapter(e: impl std::fmt::Display) -> String {
    if cfg!(target_arch = "wasm32") {
        format!(
            "no WebGPU adapter ({e}). moela needs a browser with WebGPU enabled: Chrome or Edge 113+, \
             Safari 26+, or Firefox 141+ (on Linux, Chrome needs --enable-unsafe-webgpu)"
        )
    } else {
        format!(
            "no usable GPU adapter ({e}). moela needs Vulkan, Metal or DX12; on Linux without a GPU \
             install Mesa's lavapipe (Debian/Ubuntu: apt-get install mesa-vulkan-drivers)"
        )
    }
}

/// The process's one wgpu device, created on first use with the adapter's own limits and features.
///
/// Blocks while the adapter is requested: in a browser use [`default_device_async`].
#[cfg(not(target_arch = "wasm32"))]
pub fn default_device() -> Result<Device> {
    DEVICE
        .get_or_init(|| {
            let (device, setup) = wgpu_options().init_with_setup().map_err(no_adapter)?;
            let cpu = setup.adapter.get_info().device_type == burn::tensor::wgpu::wgpu::DeviceType::Cpu;
            super::texture::register(setup.device, setup.queue, cpu);
            Ok(device)
        })
        .clone()
        .map_err(Error::Device)
}

/// Whether `device` is the one [`default_device`] (or [`default_device_async`]) created.
pub fn is_default_device(device: &Device) -> bool {
    matches!(DEVICE.get(), Some(Ok(d)) if d == device)
}

/// [`default_device`] without blocking, as browsers require.
pub async fn default_device_async() -> Result<Device> {
    if let Some(d) = DEVICE.get() {
        return d.clone().map_err(Error::Device);
    }
    let created = wgpu_options().init_async().await.map_err(no_adapter);
    let _ = DEVICE.set(created);
    DEVICE
        .get()
        .cloned()
        .unwrap_or_else(|| Err("device initialisation raced".into()))
        .map_err(Error::Device)
}

/// burn's CPU backend as a device (feature `cpu`): no GPU needed, and for tiny models faster than a software
/// Vulkan driver, since every operation runs directly instead of as a shader dispatch.
#[cfg(feature = "cpu")]
pub fn cpu_device() -> Device {
    Device::flex()
}
