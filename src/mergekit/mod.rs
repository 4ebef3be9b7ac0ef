//! mergekit as a front end: its YAML recipes read as mergekit 0.1.5 reads them, resolved
//! against their models into what the file layer ([`crate::checkpoint`]) merges and writes.
//! Nothing here reads or writes tensor data: `recipe` resolves `slerp` recipes into a list of
//! output tensors (renamed and repeated layers included) that the file layer checks and
//! writes, and `family` resolves `nuslerp`, `multislerp` and `karcher` recipes into a
//! [`SphericalMean`](crate::SphericalMean) with every tensor's weights, which the file layer's
//! mean computes.

mod family;
mod recipe;
mod syntax;

pub use recipe::{YamlPlan, plan_yaml, recipe_models, yaml_files};
pub use syntax::YamlTensor;
