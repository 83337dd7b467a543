//! moela's WGSL kernels as templates, and the one key every variant of them is known by.
//!
//! Each file in `shaders/` is a minijinja template: `{% if FLAG %}` keeps the lines a variant needs (its
//! bindings, a texture or a buffer read), `{% for R in range(M) %}` writes a line once per row of x (one
//! accumulator variable per row keeps them in registers, where an indexed array would live in memory), and
//! `{% include %}` shares text between files: the packed products are one template, and each quantised
//! format writes only its unpacking (`unpack_q8.wgsl`, `unpack_q4.wgsl`, `unpack_q4k.wgsl`, `unpack_q5.wgsl`,
//! `unpack_q5k.wgsl`, `unpack_q6k.wgsl`; q4k and q5k share `frame_k.wgsl`).
//!
//! A [`Shader`] names one variant: the file and every value its template takes. It is the key of the
//! rendered text (rendered once per process), of CubeCL's compiled kernels and of the texture launches'
//! pipelines (`texture.rs`), so a variant is described in exactly one place: [`Shader::context`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use minijinja::Value;

use super::WeightDtype;

/// The templates, by file name.
const FILES: &[(&str, &str)] = &[
    ("matvec.wgsl", include_str!("../../../../shaders/matvec.wgsl")),
    ("matvec_f16.wgsl", include_str!("../../../../shaders/matvec_f16.wgsl")),
    (
        "matvec_f16_texture.wgsl",
        include_str!("../../../../shaders/matvec_f16_texture.wgsl"),
    ),
    (
        "matvec_packed.wgsl",
        include_str!("../../../../shaders/matvec_packed.wgsl"),
    ),
    ("unpack_q8.wgsl", include_str!("../../../../shaders/unpack_q8.wgsl")),
    ("unpack_q4.wgsl", include_str!("../../../../shaders/unpack_q4.wgsl")),
    ("unpack_q4k.wgsl", include_str!("../../../../shaders/unpack_q4k.wgsl")),
    ("unpack_q5.wgsl", include_str!("../../../../shaders/unpack_q5.wgsl")),
    ("unpack_q5k.wgsl", include_str!("../../../../shaders/unpack_q5k.wgsl")),
    ("unpack_q6k.wgsl", include_str!("../../../../shaders/unpack_q6k.wgsl")),
    ("frame_k.wgsl", include_str!("../../../../shaders/frame_k.wgsl")),
    ("mla_attend.wgsl", include_str!("../../../../shaders/mla_attend.wgsl")),
    ("mla_output.wgsl", include_str!("../../../../shaders/mla_output.wgsl")),
    ("mla_query.wgsl", include_str!("../../../../shaders/mla_query.wgsl")),
    ("moe_combine.wgsl", include_str!("../../../../shaders/moe_combine.wgsl")),
    ("moe_matvec.wgsl", include_str!("../../../../shaders/moe_matvec.wgsl")),
    ("moe_route.wgsl", include_str!("../../../../shaders/moe_route.wgsl")),
    ("moe_sort.wgsl", include_str!("../../../../shaders/moe_sort.wgsl")),
    ("rmsnorm.wgsl", include_str!("../../../../shaders/rmsnorm.wgsl")),
    ("swiglu.wgsl", include_str!("../../../../shaders/swiglu.wgsl")),
];

/// One variant of one kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Shader {
    /// `matvec.wgsl`: `rows` rows of x (1..=8) times f32 weights.
    Matvec { rows: usize },
    /// `rmsnorm.wgsl`: what is added before the norm, rows read as vec4 (`wide`) or f32.
    RmsNorm { form: NormForm, wide: bool },
    /// `swiglu.wgsl`, values as vec4 (`wide`) or f32.
    Swiglu { wide: bool },
    /// The packed products (`matvec_packed.wgsl` for q8 / q4, `matvec_f16*.wgsl`): `rows` rows of x per
    /// workgroup row, `cols` texel columns per invocation.
    Packed {
        format: WeightDtype,
        rows: usize,
        cols: usize,
        reads: PackedReads,
    },
    /// `moe_matvec.wgsl`: gathered products with f32 experts, `cols` groups of four outputs per invocation.
    ExpertMatvec { cols: usize },
    /// `moe_route.wgsl`: the router's product (none: logits given), and whether it has a bias.
    Route { product: RouterProduct, bias: bool },
    /// `moe_combine.wgsl`, with the shared experts' output as the base or not.
    Combine { base: bool },
    /// `moe_sort.wgsl`.
    Sort,
    /// The three MLA decode kernels.
    Mla { step: MlaStep, reads: MlaReads },
}

/// What [`Shader::RmsNorm`] adds to the residual stream before the norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum NormForm {
    /// Nothing.
    Plain,
    /// A block's output.
    Add,
    /// A MoE block's unmixed output plus the shared experts' output.
    ExpertsAndBase,
    /// A MoE block's unmixed output alone.
    Experts,
}

/// How [`Shader::Route`] gets the router logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum RouterProduct {
    /// Given.
    None,
    /// x times the router weight, read as f32.
    Scalar,
    /// x times the router weight, read as vec4.
    Vec4,
}

/// One of the MLA decode kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum MlaStep {
    /// `mla_query.wgsl`.
    Query,
    /// `mla_attend.wgsl`.
    Attend,
    /// `mla_output.wgsl`.
    Output,
}

/// Where a packed product reads its operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PackedReads {
    /// Words from a texture (else a buffer).
    pub texture: bool,
    /// x from a uniform copy (else its storage buffer).
    pub uniform_x: bool,
    /// The texture's texels are in column order.
    pub columns: bool,
    /// `silu(gate) * up` of a fused `[gate | up]` weight.
    pub glu: bool,
    /// `matvec` over several workgroup rows of rows of x (a prompt's product), else exactly one.
    pub many: bool,
}

/// Where an MLA kernel reads its operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct MlaReads {
    /// The absorbed factor from a texture (else a buffer).
    pub texture: bool,
    /// The texture's texels are in column order.
    pub columns: bool,
    /// The queries from a uniform copy (else a buffer).
    pub uniform: bool,
    /// Heads per attention workgroup.
    pub group: usize,
    /// Token slots per workgroup (`M`) of the queries and the output: a power of two up to 8.
    pub rows: usize,
}

impl Shader {
    /// The template and the values it takes.
    fn context(&self) -> (&'static str, BTreeMap<&'static str, Value>) {
        let mut c: BTreeMap<&'static str, Value> = BTreeMap::new();
        let mut flag = |name: &'static str, on: bool| {
            c.insert(name, Value::from(on));
        };
        let file = match *self {
            Shader::Matvec { rows } => {
                c.insert("M", rows.into());
                "matvec.wgsl"
            }
            Shader::RmsNorm { form, wide } => {
                // The optional bindings come last, so the delta's and the shape's move with the form.
                let (add, moe, base, delta, uniform) = match form {
                    NormForm::Plain => (false, false, false, 0, 3),
                    NormForm::Add => (true, false, true, 4, 5),
                    NormForm::ExpertsAndBase => (true, true, true, 6, 7),
                    NormForm::Experts => (true, true, false, 0, 6),
                };
                for (name, on) in [("ADD", add), ("MOE", moe), ("BASE", base), ("V4", wide), ("V1", !wide)] {
                    flag(name, on);
                }
                c.insert("D", delta.into());
                c.insert("U", uniform.into());
                c.insert("T", if wide { "vec4<f32>" } else { "f32" }.into());
                "rmsnorm.wgsl"
            }
            Shader::Swiglu { wide } => {
                c.insert("T", if wide { "vec4<f32>" } else { "f32" }.into());
                "swiglu.wgsl"
            }
            Shader::Packed {
                format,
                rows,
                cols,
                reads,
            } => {
                for (name, on) in [
                    ("BUF", !reads.texture),
                    ("TEX", reads.texture),
                    ("XS", !reads.uniform_x),
                    ("XU", reads.uniform_x),
                    ("ROWS", !reads.columns),
                    ("COLS", reads.columns),
                    ("LIN", !reads.glu),
                    ("GLU", reads.glu),
                    ("MANY", reads.many),
                    ("ONE", !reads.many),
                ] {
                    flag(name, on);
                }
                // What an invocation's column loop runs over: f16 texels in a texture hold two texel columns
                // each, else texel columns; and how many of them are the gate's (SwiGLU), the same number
                // being the up's.
                let per = if format == WeightDtype::F16 && reads.texture {
                    cols / 2
                } else {
                    cols
                };
                c.insert("M", rows.into());
                c.insert("P", per.into());
                c.insert("H", if reads.glu { per / 2 } else { per }.into());
                match format {
                    WeightDtype::F16 if reads.texture => "matvec_f16_texture.wgsl",
                    WeightDtype::F16 => "matvec_f16.wgsl",
                    _ => {
                        c.insert("unpack", format!("unpack_{}.wgsl", format.name()).into());
                        // Vec4s of x one word's rows take: a q8 word holds 4 rows of a column, a q4 word 8.
                        c.insert("X4", (format.rows_per_word() / 4).into());
                        // q4 and q5 store their codes centred on 8 and 16; the K-quants' minimums do that work.
                        let zero = match format {
                            WeightDtype::Q4 => "8.0",
                            WeightDtype::Q5 => "16.0",
                            _ => "0.0",
                        };
                        c.insert("ZERO", zero.into());
                        c.insert("MINS", format.has_mins().into());
                        // Formats whose include reads a block's scale itself (the K-quants).
                        c.insert("FRAME", format.is_k_quant().into());
                        c.insert("HIGH", format.has_high_bits().into());
                        "matvec_packed.wgsl"
                    }
                }
            }
            Shader::ExpertMatvec { cols } => {
                c.insert("P", cols.into());
                c.insert("M", super::matvec::MAX_ROWS.into());
                "moe_matvec.wgsl"
            }
            Shader::Route { product, bias } => {
                let b = if product == RouterProduct::None { 3 } else { 5 };
                flag("GATE", product != RouterProduct::None);
                flag("G1", product == RouterProduct::Scalar);
                flag("G4", product == RouterProduct::Vec4);
                flag("BIAS", bias);
                c.insert("B", b.into());
                c.insert("U", (b + usize::from(bias)).into());
                c.insert(
                    "GT",
                    if product == RouterProduct::Vec4 {
                        "vec4<f32>"
                    } else {
                        "f32"
                    }
                    .into(),
                );
                "moe_route.wgsl"
            }
            Shader::Combine { base } => {
                flag("BASE", base);
                c.insert("U", (3 + usize::from(base)).into());
                "moe_combine.wgsl"
            }
            Shader::Sort => "moe_sort.wgsl",
            Shader::Mla { step, reads } => {
                for (name, on) in [
                    ("TEX", reads.texture),
                    ("BUF", !reads.texture),
                    ("COLS", reads.columns),
                    ("ROWS", !reads.columns),
                    ("QU", reads.uniform),
                    ("QS", !reads.uniform),
                ] {
                    flag(name, on);
                }
                c.insert("G", reads.group.into());
                c.insert("M", reads.rows.into());
                match step {
                    MlaStep::Query => "mla_query.wgsl",
                    MlaStep::Attend => "mla_attend.wgsl",
                    MlaStep::Output => "mla_output.wgsl",
                }
            }
        };
        (file, c)
    }

    /// The variant's WGSL text, rendered on first use and kept for the process; `None` (logged) when the
    /// template cannot render it, so that the caller takes burn's path.
    pub(crate) fn source(&self) -> Option<Arc<str>> {
        static SOURCES: OnceLock<Mutex<HashMap<Shader, Arc<str>>>> = OnceLock::new();
        let mut sources = SOURCES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(s) = sources.get(self) {
            return Some(s.clone());
        }
        let (file, context) = self.context();
        let text = environment()
            .get_template(file)
            .and_then(|t| t.render(&context))
            .map_err(|e| log::error!("{self:?}: {e:#}"))
            .ok()?;
        let text: Arc<str> = text.into();
        sources.insert(*self, text.clone());
        Some(text)
    }
}

/// The templates, loaded once.
fn environment() -> &'static minijinja::Environment<'static> {
    static ENV: OnceLock<minijinja::Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = minijinja::Environment::new();
        // A variant that reads a value its template does not define is a bug, not an empty string.
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        for (name, text) in FILES {
            env.add_template(name, text).expect("moela's shader templates parse");
        }
        env
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant the launchers can ask for renders, and naga (the WGSL front end wgpu uses natively)
    /// accepts its text.
    #[test]
    fn every_variant_renders_to_valid_wgsl() {
        let mut variants = vec![Shader::Sort];
        for rows in 1..=8 {
            variants.push(Shader::Matvec { rows });
        }
        for wide in [false, true] {
            variants.push(Shader::Swiglu { wide });
            for form in [
                NormForm::Plain,
                NormForm::Add,
                NormForm::ExpertsAndBase,
                NormForm::Experts,
            ] {
                variants.push(Shader::RmsNorm { form, wide });
            }
        }
        for cols in [1, 4] {
            variants.push(Shader::ExpertMatvec { cols });
        }
        for product in [RouterProduct::None, RouterProduct::Scalar, RouterProduct::Vec4] {
            for bias in [false, true] {
                variants.push(Shader::Route { product, bias });
            }
        }
        for base in [false, true] {
            variants.push(Shader::Combine { base });
        }
        let bools = [false, true];
        for step in [MlaStep::Query, MlaStep::Attend, MlaStep::Output] {
            for (texture, columns, uniform, rows) in bools
                .iter()
                .flat_map(|&t| bools.iter().flat_map(move |&c| bools.map(|u| (t, c, u))))
                .flat_map(|(t, c, u)| [1, 2, 4, 8].map(|r| (t, c, u, r)))
            {
                variants.push(Shader::Mla {
                    step,
                    reads: MlaReads {
                        texture,
                        columns,
                        uniform,
                        group: 4,
                        rows,
                    },
                });
            }
        }
        for format in WeightDtype::PACKED {
            for (rows, cols) in [(1, 1), (3, 2), (8, 4)] {
                for bits in 0..32u32 {
                    let reads = PackedReads {
                        texture: bits & 1 != 0,
                        uniform_x: bits & 2 != 0,
                        columns: bits & 4 != 0,
                        glu: bits & 8 != 0,
                        many: bits & 16 != 0,
                    };
                    if reads.glu && (format == WeightDtype::F16 || cols == 1) {
                        continue;
                    }
                    variants.push(Shader::Packed {
                        format,
                        rows,
                        cols,
                        reads,
                    });
                }
            }
        }
        for v in variants {
            let text = v.source().unwrap_or_else(|| panic!("{v:?} does not render"));
            assert!(
                !text.contains("{{") && !text.contains("{%"),
                "{v:?}: template syntax left"
            );
            if let Err(e) = naga::front::wgsl::parse_str(&text) {
                panic!("{v:?} is not valid WGSL: {}", e.emit_to_string(&text));
            }
        }
    }
}
