//! `moela bench`: prefill and decode speed, bytes read per decoded token, and the device's own copy
//! bandwidth measured in the same run, so the result reads as a fraction of what the device can do.

use burn::tensor::{Device, Tensor};
use serde::Serialize;

use moela::SessionOptions;
use moela::gpu::{self, Kernels};
use moela::gpu::{Linear, WeightDtype};
use moela::{Engine, LoadReport};
use moela::{Error, Result};

/// What a benchmark run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Prompt tokens prefilled.
    pub prompt_tokens: usize,
    /// Tokens decoded one at a time.
    pub gen_tokens: usize,
    /// Prefill tokens per second.
    pub prefill_tokens_per_second: f64,
    /// Decode tokens per second (each step includes its logits read-back).
    pub decode_tokens_per_second: f64,
    /// Weight dtype on the GPU.
    pub weight_dtype: WeightDtype,
    /// Weights read per decoded token (attention, dense/shared MLPs, the K routed experts, head).
    pub active_weights_per_token: u64,
    /// Bytes read per decoded token: active weights plus the latent cache at the mean context.
    pub bytes_per_token: u64,
    /// `bytes_per_token * decode tok/s`, GB/s.
    pub achieved_bandwidth_gbs: f64,
    /// Copy bandwidth of the device (read + write of a 64 MiB buffer), GB/s.
    pub copy_bandwidth_gbs: f64,
    /// Throughput of the engine's own matrix-vector product (a 4096 x 4096 weight of the loaded dtype, one
    /// row of input), in weights per second: the fastest a decode step could read its weights here.
    pub matvec_weights_per_second: f64,
    /// How close decoding comes to the device's limits.
    pub roofline: Roofline,
    /// Kernel launches (dispatches) of one decode step, all of them: moela's and burn's.
    pub dispatches_per_token: u64,
    /// The same launches by kernel, most frequent first (with their time when the bench was asked to
    /// profile: that step runs its kernels one at a time).
    pub dispatches_by_kernel: Vec<gpu::KernelStat>,
    /// With a profile: the launches of one more prefill of the same prompt by kernel, each timed (run one
    /// at a time, so the sum exceeds the prefill's time).
    pub prefill_by_kernel: Option<Vec<gpu::KernelStat>>,
    /// The device memory after the run, against what the model needs (wgpu device only).
    pub gpu_memory: Option<GpuMemory>,
    /// How the model's load went: bytes read, seconds.
    pub load: LoadReport,
    /// The load's speed, GB/s.
    pub load_gb_per_second: f64,
    /// The process's peak resident memory at the end of the run (Linux `VmHWM`): the load's high-water mark
    /// and the run's. On a CPU adapter (lavapipe) it includes the GPU's memory, which is the host's.
    pub peak_host_memory_bytes: Option<u64>,
}

/// Device memory after prefill and decode, from the allocator's own report.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GpuMemory {
    /// Bytes the memory pools hold from the device: the high-water mark of the run (pools keep their pages).
    pub reserved_bytes: u64,
    /// Bytes of live tensors when the run ended.
    pub in_use_bytes: u64,
    /// Weights on the GPU plus the latent cache at the session's context size.
    pub weights_and_cache_bytes: u64,
    /// `reserved_bytes / weights_and_cache_bytes`.
    pub ratio: f64,
}

/// Decode speed as fractions of what the device can do, both measured in the same run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Roofline {
    /// `achieved_bandwidth / copy_bandwidth`: the memory roofline (what matters on a GPU).
    pub bandwidth: f64,
    /// `active weights per token * decode tok/s / matvec weights/s`: a whole step against its weight-reading
    /// kernel alone (what matters where arithmetic, not memory, is the limit, as on a CPU emulation).
    pub kernel: f64,
}

/// Waits until the device has finished all queued work. Natively a device sync; in a browser, where nothing
/// may block, the whole tensor is read back.
async fn settle(t: &Tensor<1>) -> Result<()> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        t.device().sync().map_err(|e| Error::Device(format!("{e:?}")))
    }
    #[cfg(target_arch = "wasm32")]
    {
        t.clone()
            .into_data_async()
            .await
            .map(|_| ())
            .map_err(|e| Error::Device(format!("{e:?}")))
    }
}

/// Measures the device's copy bandwidth in GB/s (bytes read + written per second).
///
/// Each pass reads and writes a 64 MiB buffer and depends on the previous one.
pub async fn copy_bandwidth(device: &Device) -> Result<f64> {
    let n = 16 << 20; // 16 Mi f32 = 64 MiB, within one binding
    // Host data, not `ones`: a tensor of known constant value could be folded without touching memory.
    let host: Vec<f32> = (0..n).map(|i| (i % 97) as f32).collect();
    let mut x: Tensor<1> = Tensor::from_data(burn::tensor::TensorData::new(host, [n]), device);
    // Warm-up: compiles the kernels and touches the memory.
    x = x.add_scalar(1.0);
    settle(&x).await?;
    let iters = 8;
    let t0 = web_time::Instant::now();
    for _ in 0..iters {
        x = x.add_scalar(1.0);
    }
    settle(&x).await?;
    let secs = t0.elapsed().as_secs_f64();
    Ok((2 * iters * n * 4) as f64 / secs / 1e9)
}

/// Measures the matrix-vector product of `kernels` on a 4096 x 4096 weight in weights per second.
///
/// The best of three rounds of eight chained products (each reading the whole weight), after a warm-up
/// that compiles the kernel: one round is short enough for the machine's noise to move it by a third.
pub async fn matvec_throughput(device: &Device, dtype: WeightDtype, kernels: Kernels) -> Result<f64> {
    let n = 4096;
    let host: Vec<f32> = (0..n * n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 3e-5).collect();
    let w = Linear::from_rows(&host, n, n, dtype, kernels, device);
    let x0: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.1).collect();
    let mut x: Tensor<2> = Tensor::from_data(burn::tensor::TensorData::new(x0, [1, n]), device);
    x = w.forward(x);
    settle(&x.clone().reshape([n])).await?;
    let iters = 8;
    let mut best = 0f64;
    for _ in 0..3 {
        let t0 = web_time::Instant::now();
        for _ in 0..iters {
            x = w.forward(x);
        }
        settle(&x.clone().reshape([n])).await?;
        best = best.max((iters * n * n) as f64 / t0.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Runs `prompt_tokens` of prefill then `gen_tokens` greedy decode steps on random token ids, then one
/// more step whose kernel launches are counted (and, with `profile`, timed one by one, and the prompt's
/// prefill run once more with its launches timed).
pub async fn bench(
    engine: &std::sync::Arc<Engine>,
    prompt_tokens: usize,
    gen_tokens: usize,
    seed: u64,
    profile: bool,
) -> Result<BenchReport> {
    if prompt_tokens == 0 || gen_tokens == 0 {
        return Err(Error::InvalidArgument(
            "bench needs at least 1 prompt token and 1 generated token".into(),
        ));
    }
    let cfg = engine.config();
    let vocab = cfg.vocab_size as u64;
    let prompt: Vec<u32> = (0..prompt_tokens as u64)
        .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed)) % vocab) as u32)
        .collect();
    let max_context = (prompt_tokens + gen_tokens + 2).min(cfg.max_position_embeddings);
    let mut session = engine.session(SessionOptions { max_context })?;
    // Warm-up with the same prompt length and a step, so no kernel compilation is timed (prefill and decode
    // take different kernels, and some are compiled per shape).
    let (logits, _) = session.prefill(&prompt).await?;
    session.step(argmax(&logits)).await?;
    session.reset();

    let t0 = web_time::Instant::now();
    let (mut logits, _) = session.prefill(&prompt).await?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = web_time::Instant::now();
    for _ in 0..gen_tokens {
        logits = session.step(argmax(&logits)).await?;
    }
    let decode = t1.elapsed().as_secs_f64();
    let decode_tps = gen_tokens as f64 / decode;

    // One more step, counted (outside the timing: the count takes a lock per launch, a profile serialises).
    let counter = gpu::LaunchCounter::start(profile);
    session.step(argmax(&logits)).await?;
    let dispatches_by_kernel = counter.finish();
    let dispatches_per_token = dispatches_by_kernel.iter().map(|k| k.launches).sum();
    let prefill_by_kernel = if profile {
        session.reset();
        let counter = gpu::LaunchCounter::start(true);
        session.prefill(&prompt).await?;
        Some(counter.finish())
    } else {
        None
    };

    let info = engine.info();
    let needed = info.gpu_weight_bytes + max_context as u64 * info.cache.bytes_per_token;
    let gpu_memory = gpu::device_memory(engine.device()).map(|(reserved, in_use)| GpuMemory {
        reserved_bytes: reserved,
        in_use_bytes: in_use,
        weights_and_cache_bytes: needed,
        ratio: reserved as f64 / needed as f64,
    });
    let active = info.active_parameters_per_token;
    let mean_context = (prompt_tokens + gen_tokens / 2) as u64;
    let bytes = info.active_weight_bytes_per_token + mean_context * info.cache.bytes_per_token;
    let achieved = bytes as f64 * decode_tps / 1e9;
    let copy = copy_bandwidth(engine.device()).await?;
    let matvec = matvec_throughput(engine.device(), engine.dtype(), engine.kernels()).await?;
    Ok(BenchReport {
        prompt_tokens,
        gen_tokens,
        prefill_tokens_per_second: prompt_tokens as f64 / prefill,
        decode_tokens_per_second: decode_tps,
        weight_dtype: engine.dtype(),
        active_weights_per_token: active,
        bytes_per_token: bytes,
        achieved_bandwidth_gbs: achieved,
        copy_bandwidth_gbs: copy,
        matvec_weights_per_second: matvec,
        roofline: Roofline {
            bandwidth: achieved / copy,
            kernel: active as f64 * decode_tps / matvec,
        },
        dispatches_per_token,
        dispatches_by_kernel,
        prefill_by_kernel,
        gpu_memory,
        load: engine.load_report(),
        load_gb_per_second: engine.load_report().gb_per_second(),
        peak_host_memory_bytes: moela::memory::peak_resident_bytes(),
    })
}

/// Aggregate decode speed of several streams stepped together.
#[derive(Debug, Clone, Serialize)]
pub struct StreamsRate {
    /// Sessions decoding at once.
    pub streams: usize,
    /// Tokens decoded per second by all of them together.
    pub decode_tokens_per_second: f64,
    /// `decode_tokens_per_second` over the single stream's (measured in the same call).
    pub speedup: f64,
    /// Kernel launches of one batched step (all streams).
    pub dispatches_per_step: u64,
    /// With a profile: that step's launches by kernel, each timed (run one at a time).
    pub by_kernel: Option<Vec<gpu::KernelStat>>,
}

/// Decode speed of `streams` sessions at once (each entry a separate measurement), each with its own
/// `prompt_tokens`-token prompt, stepped together `gen_tokens` times (after one untimed step) with
/// [`Session::step_many`](moela::Session::step_many): one batched forward per step, as `moela serve` runs
/// concurrent requests. The rate of one stream is measured first, for the speedups. With `profile`, the
/// kernels of one more step are timed one by one.
pub async fn streams(
    engine: &std::sync::Arc<Engine>,
    prompt_tokens: usize,
    gen_tokens: usize,
    streams: &[usize],
    seed: u64,
    profile: bool,
) -> Result<Vec<StreamsRate>> {
    if prompt_tokens == 0 || gen_tokens == 0 || streams.contains(&0) {
        return Err(Error::InvalidArgument(
            "bench needs at least 1 prompt token, 1 generated token and 1 stream".into(),
        ));
    }
    let cfg = engine.config();
    let vocab = cfg.vocab_size as u64;
    let max_context = prompt_tokens + gen_tokens + 2;
    if max_context > cfg.max_position_embeddings {
        return Err(Error::Limit(format!(
            "{prompt_tokens} prompt + {gen_tokens} generated tokens exceed max_position_embeddings {}",
            cfg.max_position_embeddings
        )));
    }
    let mut counts: Vec<usize> = vec![1];
    counts.extend(streams.iter().copied().filter(|&n| n != 1));
    let mut rates: Vec<StreamsRate> = Vec::new();
    for n in counts {
        let mut sessions = Vec::with_capacity(n);
        let mut next = Vec::with_capacity(n);
        for j in 0..n as u64 {
            let prompt: Vec<u32> = (0..prompt_tokens as u64)
                .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed + 7919 * j)) % vocab) as u32)
                .collect();
            let mut s = engine.session(SessionOptions { max_context })?;
            let (logits, _) = s.prefill(&prompt).await?;
            next.push(argmax(&logits));
            sessions.push(s);
        }
        let mut refs: Vec<&mut moela::Session> = sessions.iter_mut().collect();
        // Warm-up: the kernels of n rows are compiled on the first step.
        let logits = moela::Session::step_many(&mut refs, &next).await?;
        next = logits.iter().map(|l| argmax(l)).collect();
        let t0 = web_time::Instant::now();
        for _ in 0..gen_tokens {
            let logits = moela::Session::step_many(&mut refs, &next).await?;
            next = logits.iter().map(|l| argmax(l)).collect();
        }
        let seconds = t0.elapsed().as_secs_f64();
        let counter = gpu::LaunchCounter::start(profile);
        moela::Session::step_many(&mut refs, &next).await?;
        let by_kernel = counter.finish();
        let dispatches_per_step = by_kernel.iter().map(|k| k.launches).sum();
        let rate = (n * gen_tokens) as f64 / seconds.max(1e-9);
        let single = rates.first().map_or(rate, |r| r.decode_tokens_per_second);
        rates.push(StreamsRate {
            streams: n,
            decode_tokens_per_second: rate,
            speedup: rate / single,
            dispatches_per_step,
            by_kernel: profile.then_some(by_kernel),
        });
    }
    if !streams.contains(&1) {
        rates.remove(0);
    }
    Ok(rates)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}
