//! AdamW over the engine's parameter tensors, with global-norm gradient clipping.
//!
//! burn's optimisers work on `Module`s; the engine's model is plain tensors (one definition for inference and
//! training), so the update is written here over [`Transformer::params_mut`], flattening each tensor.

use burn::tensor::{Gradients, Tensor};
use moela::model::params::ParamMut;
use moela::model::transformer::Transformer;

/// AdamW state and settings.
pub struct AdamW {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator guard.
    pub eps: f64,
    /// Decoupled weight decay for matrices (norm gains are not decayed).
    pub weight_decay: f64,
    step: i32,
    moments: Vec<Option<(Tensor<1>, Tensor<1>)>>,
}

fn flat<const D: usize>(t: Tensor<D>) -> Tensor<1> {
    let n = t.shape().num_elements();
    t.reshape([n])
}

fn grad_of(p: &ParamMut, grads: &Gradients) -> Option<Tensor<1>> {
    match p {
        ParamMut::Vector(t) => t.grad(grads).map(flat),
        ParamMut::Matrix(t) => t.grad(grads).map(flat),
        ParamMut::Stack(t) => t.grad(grads).map(flat),
    }
}

fn value_of(p: &ParamMut) -> Tensor<1> {
    match p {
        ParamMut::Vector(t) => flat((*t).clone().inner()),
        ParamMut::Matrix(t) => flat((*t).clone().inner()),
        ParamMut::Stack(t) => flat((*t).clone().inner()),
    }
}

fn set(p: &mut ParamMut, v: Tensor<1>) {
    match p {
        ParamMut::Vector(t) => **t = v.reshape(t.dims()).autodiff().require_grad(),
        ParamMut::Matrix(t) => **t = v.reshape(t.dims()).autodiff().require_grad(),
        ParamMut::Stack(t) => **t = v.reshape(t.dims()).autodiff().require_grad(),
    }
}

/// Marks every parameter as requiring gradients (after loading, or after a weight change from outside).
pub fn require_grads(model: &mut Transformer) {
    for (_, mut p) in model.params_mut() {
        let v = value_of(&p);
        set(&mut p, v);
    }
}

impl AdamW {
    /// Defaults: betas (0.9, 0.95), eps 1e-8, weight decay 0.01.
    pub fn new() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
            step: 0,
            moments: Vec::new(),
        }
    }

    /// One update with learning rate `lr`; gradients are scaled so their global norm is at most `clip`.
    /// Returns the global gradient norm before clipping.
    pub fn step(&mut self, model: &mut Transformer, grads: &Gradients, lr: f64, clip: f64) -> f64 {
        let mut params = model.params_mut();
        if self.moments.len() != params.len() {
            self.moments = (0..params.len()).map(|_| None).collect();
        }
        let gs: Vec<Option<Tensor<1>>> = params.iter().map(|(_, p)| grad_of(p, grads)).collect();
        let sq: f64 = gs
            .iter()
            .flatten()
            .map(|g| f64::from(g.clone().square().sum().into_scalar::<f32>()))
            .sum();
        let norm = sq.sqrt();
        let scale = if norm > clip { clip / norm } else { 1.0 };
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.step);
        let c2 = 1.0 - b2.powi(self.step);
        for (((name, p), g), m) in params.iter_mut().zip(gs).zip(self.moments.iter_mut()) {
            let Some(g) = g else { continue };
            let g = g.mul_scalar(scale);
            let (m1, m2) = match m.take() {
                Some((m1, m2)) => (
                    m1.mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1),
                    m2.mul_scalar(b2) + g.square().mul_scalar(1.0 - b2),
                ),
                None => (g.clone().mul_scalar(1.0 - b1), g.square().mul_scalar(1.0 - b2)),
            };
            let update = m1.clone().div_scalar(c1) / m2.clone().div_scalar(c2).sqrt().add_scalar(self.eps);
            let mut w = value_of(p);
            if !name.ends_with("norm") {
                w = w.clone() - w.mul_scalar(lr * self.weight_decay);
            }
            set(p, w - update.mul_scalar(lr));
            *m = Some((m1, m2));
        }
        norm
    }
}
