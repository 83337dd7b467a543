//! Helpers the integration tests share: reading reference logits and comparing logits.

#![allow(dead_code)] // each test file uses its own part

use serde_json::Value;

/// Token ids from a JSON list.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Rows of logits from a JSON list of lists.
pub fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_f64().expect("logit") as f32)
                .collect()
        })
        .collect()
}

/// The index of the largest value (the first, on ties).
pub fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

/// Relative L2 distance of `got` from `want`, per position.
pub fn rel_l2(got: &[Vec<f32>], want: &[Vec<f32>]) -> Vec<f64> {
    assert_eq!(got.len(), want.len(), "positions");
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            assert_eq!(g.len(), w.len(), "vocabulary");
            let num: f64 = g.iter().zip(w).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let den: f64 = w.iter().map(|b| (*b as f64).powi(2)).sum();
            (num / den).sqrt()
        })
        .collect()
}
