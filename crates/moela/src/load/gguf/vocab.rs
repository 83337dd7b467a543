//! The tokenizer and chat template a GGUF file carries (`tokenizer.ggml.*`, `tokenizer.chat_template`), as the
//! `tokenizer.json` and `tokenizer_config.json` an HF folder would have, so that a GGUF alone is a complete
//! model and both formats share one tokenizer path (`chat.rs`).
//!
//! llama.cpp's converter stores a byte-level BPE tokenizer (`tokenizer.ggml.model = "gpt2"`) as its tokens
//! (byte-level strings, as in HF's vocabulary), merges (`"a b"`), token types (1 normal, 3 control, 4
//! user-defined) and the name of its pre-tokenizer (`tokenizer.ggml.pre`), whose split rules are not stored: each
//! name stands for the rules of one HF `tokenizer.json`. The rules of the names DeepSeek models use are
//! written here as their HF files state them.

use serde_json::{Value as Json, json};

use super::{GgufHeader, Value};
use crate::error::{Error, Result};

/// DeepSeek LLM and V2 / V2-Lite (`deepseek-llm`): newlines, runs of letters (a long list of scripts), runs
/// of ASCII and full-width punctuation (each with one leading space), trailing whitespace, runs of CJK
/// ideographs and Hangul, and numbers, before the byte-level mapping. Three range ends are escaped: they
/// are Greek letters with canonical equivalents (U+1F7D is U+03CE once NFC-normalised), and a normalised
/// copy of the class has inverted ranges no regex engine accepts.
const DEEPSEEK_LLM: &[&str] = &[
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u{1F7D}ᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-\u{1FD3}ῖ-\u{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}+",
];

/// DeepSeek-V3 and R1 (`deepseek-v3`): numbers in runs of up to three digits, CJK and kana runs, then a
/// GPT-4-like split of letters, punctuation and whitespace.
const DEEPSEEK_V3: &[&str] = &[
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
];

/// DeepSeek Coder (`deepseek-coder`).
const DEEPSEEK_CODER: &[&str] = &["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-퟿]+", "\\p{N}"];

/// The pre-tokenizer names moela knows with their split rules (`None`: GPT-2's own, the byte-level
/// pre-tokenizer's built-in regex).
pub(super) const PRE_TOKENIZERS: &[(&str, Option<&[&str]>)] = &[
    ("deepseek-llm", Some(DEEPSEEK_LLM)),
    ("deepseek-v3", Some(DEEPSEEK_V3)),
    ("deepseek-coder", Some(DEEPSEEK_CODER)),
    ("gpt-2", None),
];

/// The split rules `tokenizer.ggml.pre` names, or `None` for GPT-2's own (the byte-level pre-tokenizer's
/// built-in regex).
fn split_rules(pre: &str) -> Option<Option<&'static [&'static str]>> {
    let pre = if matches!(pre, "default" | "gpt2") {
        "gpt-2"
    } else {
        pre
    };
    PRE_TOKENIZERS
        .iter()
        .find(|(name, _)| *name == pre)
        .map(|(_, rules)| *rules)
}

/// llama.cpp's token types (the writer, native only, uses all of them).
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(super) const NORMAL: u64 = 1;
pub(super) const CONTROL: u64 = 3;
pub(super) const USER_DEFINED: u64 = 4;
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(super) const UNUSED: u64 = 5;

/// The `tokenizer.json` and `tokenizer_config.json` that `header`'s tokenizer metadata describes, or `None`
/// when the file has no tokenizer. `file` names the file in errors.
pub fn tokenizer_files(header: &GgufHeader, file: &str) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
    let bad = |message: String| Error::Tokenizer {
        file: file.to_string(),
        message,
    };
    let Some(model) = header.get("tokenizer.ggml.model") else {
        return Ok(None);
    };
    if model.as_str() != Some("gpt2") {
        return Err(bad(format!(
            "tokenizer.ggml.model is {}: moela reads byte-level BPE tokenizers (\"gpt2\"), which DeepSeek models use",
            model.summary()
        )));
    }
    let strings = |key: &str| -> Result<Vec<&str>> {
        match header.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| bad(format!("{key} holds a value that is not a string")))
                })
                .collect(),
            Some(other) => Err(bad(format!("{key} is {}, not a list of strings", other.summary()))),
            None => Err(bad(format!("{key} is missing"))),
        }
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<u64> = match header.get("tokenizer.ggml.token_type") {
        Some(Value::Array(items)) if items.len() == tokens.len() => {
            items.iter().map(|v| v.as_u64().unwrap_or(1)).collect()
        }
        Some(other) => {
            return Err(bad(format!(
                "tokenizer.ggml.token_type is {}, not one type per token ({})",
                other.summary(),
                tokens.len()
            )));
        }
        None => vec![1; tokens.len()],
    };
    let pre = header
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let rules = split_rules(pre).ok_or_else(|| {
        bad(format!(
            "tokenizer.ggml.pre is {pre:?}: moela knows the pre-tokenizers deepseek-llm (V2), deepseek-v3 (V3, R1), \
             deepseek-coder and gpt-2"
        ))
    })?;

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (&text, &ty)) in tokens.iter().zip(&types).enumerate() {
        // A token named twice keeps its first id, as HF's vocabulary can hold a text only once.
        vocab.entry(text.to_string()).or_insert(json!(id));
        if ty == CONTROL || ty == USER_DEFINED {
            added.push(json!({
                "id": id,
                "content": text,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": ty == CONTROL,
            }));
        }
    }
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let pre_tokenizer = match rules {
        Some(rules) => {
            let mut steps: Vec<Json> = rules
                .iter()
                .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
                .collect();
            steps.push(byte_level(false));
            json!({"type": "Sequence", "pretokenizers": steps})
        }
        None => byte_level(true),
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });

    let token = |key: &str| -> Result<Option<&str>> {
        match header.get(key).map(|v| v.as_u64()) {
            None => Ok(None),
            Some(Some(id)) if (id as usize) < tokens.len() => Ok(Some(tokens[id as usize])),
            Some(_) => Err(bad(format!(
                "{key} is not the id of one of its {} tokens",
                tokens.len()
            ))),
        }
    };
    let mut config = json!({
        "bos_token": token("tokenizer.ggml.bos_token_id")?,
        "eos_token": token("tokenizer.ggml.eos_token_id")?,
    });
    for (key, hf) in [
        ("tokenizer.ggml.add_bos_token", "add_bos_token"),
        ("tokenizer.ggml.add_eos_token", "add_eos_token"),
    ] {
        if let Some(on) = header.get(key).and_then(Value::as_bool) {
            config[hf] = on.into();
        }
    }
    if let Some(template) = header.get("tokenizer.chat_template").and_then(Value::as_str) {
        config["chat_template"] = template.into();
    }
    Ok(Some((
        tokenizer.to_string().into_bytes(),
        config.to_string().into_bytes(),
    )))
}

#[cfg(test)]
mod tests {
    use super::super::Parsed;
    use super::*;
    use crate::chat::Tokenizer;

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/gguf/");

    /// llama.cpp's DeepSeek LLM vocabulary file and its tokenizer tests, whose expected ids were written by
    /// HF's own tokenizer (`convert_hf_to_gguf_update.py`).
    #[test]
    fn deepseek_llm_ids_equal_the_hf_tokenizer_s() {
        let bytes = std::fs::read(format!("{DIR}ggml-vocab-deepseek-llm.gguf")).expect("vocab fixture");
        let Parsed::Header(header) = GgufHeader::parse(&bytes, bytes.len() as u64, "vocab").unwrap() else {
            panic!("a whole file")
        };
        let (json, config) = tokenizer_files(&header, "vocab").unwrap().expect("a tokenizer");
        let tokenizer = Tokenizer::from_bytes(&json, Some(&config)).unwrap();
        let inputs = std::fs::read_to_string(format!("{DIR}ggml-vocab-deepseek-llm.gguf.inp")).unwrap();
        let outputs = std::fs::read_to_string(format!("{DIR}ggml-vocab-deepseek-llm.gguf.out")).unwrap();
        let inputs: Vec<&str> = inputs.split("\n__ggml_vocab_test__\n").collect();
        let outputs: Vec<&str> = outputs.lines().collect();
        assert!(inputs.len() >= 30, "{} tests", inputs.len());
        let mut checked = 0;
        for (text, expected) in inputs.iter().zip(&outputs) {
            let expected: Vec<u32> = expected.split_whitespace().map(|t| t.parse().unwrap()).collect();
            let ids = tokenizer.encode(text, false).unwrap();
            assert_eq!(ids, expected, "{text:?}");
            checked += 1;
        }
        assert_eq!(checked, outputs.len());
        let text = "Hello, world! 3.14 你好";
        assert_eq!(
            tokenizer
                .decode(&tokenizer.encode(text, false).unwrap(), false)
                .unwrap(),
            text
        );
    }
}
