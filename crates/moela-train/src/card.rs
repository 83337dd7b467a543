//! The model card (`README.md` of the model folder), written from the measured training summary.

use moela::ModelInfo;
use moela_tools::arith::Report;

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn row(name: &str, sft: &Report, fin: &Report) -> String {
    let (a, b) = (sft.split(name), fin.split(name));
    match (a, b) {
        (Some(a), Some(b)) => format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            a.problems,
            pct(a.accuracy),
            pct(b.accuracy),
            pct(a.format_compliance),
            pct(b.format_compliance)
        ),
        _ => String::new(),
    }
}

/// The card: task, data, recipe, sizes, the evaluation table and the balancing numbers.
pub fn model_card(
    summary: &serde_json::Value,
    info: &ModelInfo,
    sft: &Report,
    fin: &Report,
    file_bytes: u64,
) -> String {
    let s = &summary["settings"];
    let spread = &summary["expert_load_spread"];
    let secs = &summary["seconds"];
    let mut table = String::from(
        "| split | problems | accuracy after SFT | accuracy after GRPO | format after SFT | format after GRPO |\n\
         |---|---|---|---|---|---|\n",
    );
    for split in moela_tools::arith::SPLITS {
        table.push_str(&row(split.name, sft, fin));
    }
    format!(
        r#"---
license: mit
library_name: moela
pipeline_tag: text-generation
tags: [deepseek_v3, mla, moe, reasoning, arithmetic]
---

# moela-arith-tiny

A tiny DeepSeek-V3-architecture model trained to add and subtract, reasoning step by step inside
`<think>...</think>` the way DeepSeek-R1 does, then answering in one sentence. It is moela's embedded default
model: small enough to ship inside the repository ({file_mb:.1} MB of bf16 safetensors) and to run anywhere
moela runs, yet a real DeepSeek-V3 network (multi-head latent attention with a compressed KV cache, DeepSeekMoE
with sigmoid routing, group-limited selection and a shared expert), trained by moela itself.

```text
User: What is 457 + 389?
<think>
457 + 389
ones: 7 + 9 = 16, write 6 carry 1, so far 6
tens: 5 + 8 + 1 = 14, write 4 carry 1, so far 46
hundreds: 4 + 3 + 1 = 8, write 8, so far 846
457 + 389 = 846
</think>

The answer is 846.
```

## Use

```sh
moela run --prompt "What is 457 + 389?"
```

The folder is a plain Hugging Face checkpoint (`DeepseekV3ForCausalLM`): transformers loads it too.

## Task and data

Generated, never scraped: addition and subtraction of numbers with 1 to 3 digits (negative results included)
in several phrasings ("What is a + b?", "a-b", "What is the sum of a and b?", ...), and two- or three-step word
problems (stickers, apples, trains, libraries) with numbers up to 3 digits: 40% additions, 50% subtractions
(a quarter of them with close operands, whose results are shorter than the operands), 10% word problems. Every
solution is worked column by column with carries and borrows; leading zeros are dropped on a line of their own
(`without leading zeros 068 is 68`). The evaluation problems are drawn from a fixed seed and removed from the
training stream; 4-digit addition never appears in training.

## Model

| | |
|---|---|
| architecture | DeepseekV3ForCausalLM |
| layers | {layers} (first dense, then MoE) |
| hidden size | {hidden} |
| attention | MLA, {heads} heads, q_lora_rank {q_lora}, kv_lora_rank {kv_lora} (cache: {cache_values} values per token per layer) |
| experts | {experts} routed (top-{topk}, sigmoid scores, noaux_tc in 4 groups, 2 kept) + {shared} shared |
| vocabulary | {vocab} (byte-level BPE, digits split one by one) |
| parameters | {total} total, {active} active per token (embedding excluded) |

## Recipe

Reproduce with `cargo run --release -p moela-train -- --out models/moela-arith-tiny --seed {seed}` (burn's
CPU backend with autodiff, on the same model definition the engine runs).

1. **Tokenizer**: byte-level BPE trained with the tokenizers crate on 20,000 generated solutions, with
   DeepSeek-R1's special tokens and an R1-style chat template whose generation prompt opens `<think>\n`.
2. **SFT**: {sft_steps} AdamW steps of {sft_batch} sequences (peak learning rate {sft_lr}, warm-up then cosine),
   loss on the assistant's tokens only. {sft_min:.0} minutes.
3. **GRPO**: {grpo_steps} steps; each samples {group} completions (temperature 1) for each of {prompts}
   problems (half subtractions, half word problems: where the SFT model still errs), rewards 1 for the exact
   answer plus 0.2 for a well-formed think/answer layout (rule-based), normalises advantages within each
   group, and adds a KL penalty (beta {beta}) to the SFT model; learning
   rate {grpo_lr}. {grpo_min:.0} minutes.
4. **Expert balance**, DeepSeek-V3's auxiliary-loss-free way: after every step each router's
   `e_score_correction_bias` moves by {gamma:.3} towards the mean load (up for an under-loaded expert, down for an
   over-loaded one). Busiest expert's load over the mean, on 64 training-style problems (1.0 is perfectly even):
   at initialisation {sp_init:.2}; after training, the router alone {sp_router:.2}, with the learned bias
   {sp_bias:.2}.

## Evaluation

Greedy decoding on held-out problems (`moela eval --device cpu`). Accuracy is the exact final answer; format is
one closed think block followed by an answer that ends in a number, then the end-of-sentence token.

{table}
4-digit addition is outside the training distribution: it shows how far the column procedure generalises.

## Limits

It knows arithmetic on small integers and nothing else; questions outside that get confident nonsense. Its
mistakes are slips inside otherwise well-formed work, where a column goes wrong and the rest follows from it;
`training.json` lists wrong answers for each split of both evaluations (`wrong_examples`).
"#,
        file_mb = file_bytes as f64 / 1e6,
        layers = info.layers,
        hidden = info.hidden_size,
        heads = info.heads,
        q_lora = info.q_lora_rank.unwrap_or(0),
        kv_lora = info.kv_lora_rank,
        cache_values = info.cache.values_per_token,
        experts = info.routed_experts,
        topk = info.experts_per_token,
        shared = info.shared_experts,
        vocab = info.vocab_size,
        total = info.total_parameters,
        active = info.active_parameters_per_token,
        seed = s["seed"],
        sft_steps = s["sft_steps"],
        sft_batch = s["sft_batch"],
        sft_lr = s["sft_lr"],
        sft_min = secs["sft"].as_f64().unwrap_or(0.0) / 60.0,
        grpo_steps = s["grpo_steps"],
        group = s["grpo_group"],
        prompts = s["grpo_prompts"],
        beta = s["kl_beta"],
        grpo_lr = s["grpo_lr"],
        grpo_min = secs["grpo"].as_f64().unwrap_or(0.0) / 60.0,
        gamma = s["bias_gamma"].as_f64().unwrap_or(0.0),
        sp_init = spread["at_init"].as_f64().unwrap_or(0.0),
        sp_router = spread["after_training_router_alone"].as_f64().unwrap_or(0.0),
        sp_bias = spread["after_training_with_bias"].as_f64().unwrap_or(0.0),
    )
}
