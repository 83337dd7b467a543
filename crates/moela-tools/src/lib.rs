//! Tooling over the moela engine, kept out of the library that embedders compile: models at real shapes
//! generated from a seed (`preset`), the benchmark behind `moela bench` and the browser's bench page
//! (`bench`), and the arithmetic task the default model is trained and evaluated on (`arith`).

pub mod arith;
pub mod bench;
pub mod preset;
