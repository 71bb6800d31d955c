//! outpost's Kustomize engine: renders a kustomization directory into Kubernetes objects,
//! the same objects in the same order as `kubectl kustomize` (kustomize v5) for the subset
//! of Kustomize that outpost supports (see `docs/gitops.md`), and refuses everything else
//! naming the file and the field.
//!
//! It owns: reading kustomization files, resources, components and bases; strategic merge
//! and JSON 6902 patches; images, namespaces, name prefixes/suffixes and the references to
//! renamed objects; labels and annotations; ConfigMap/Secret generators with kustomize's
//! hash suffix; replicas; kustomize's legacy output order.
//!
//! It must never do I/O of its own: the tree is read through the [`Fs`] trait (a directory
//! on disk, or a Git tree in memory), and nothing is fetched, executed or written. Remote
//! bases, Helm charts, plugins, `vars` and `replacements` are refused, not approximated.

mod build;
pub mod diff;
mod error;
mod fieldspec;
pub mod fs;
#[doc(hidden)]
pub mod fuzz;
mod hash;
mod images;
mod kustomization;
mod nameref;
mod order;
mod resource;
mod select;
mod smp;
mod yaml;

pub use error::Error;
pub use fs::{DiskFs, Fs, MemFs};
use serde_json::{Map, Value};

/// Renders the kustomization in `dir` (a path as `fs` understands it). The objects come in
/// kustomize's legacy order.
pub fn build(fs: &dyn Fs, dir: &str) -> Result<Vec<Value>, Error> {
    let objs = build::Builder::new(fs).build_top(dir)?;
    Ok(objs.into_iter().map(Value::Object).collect())
}

/// The objects as one YAML stream, map keys sorted the way `kubectl kustomize` prints them.
pub fn to_yaml(objs: &[Value]) -> String {
    let mut out = String::new();
    for (i, o) in objs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&yaml::document(o));
    }
    out
}

/// A copy of `v` with every map's keys in sorted order.
pub fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), sorted(&m[k.as_str()])))
                    .collect::<Map<_, _>>(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        v => v.clone(),
    }
}

/// How every YAML text is read: YAML 1.2 booleans (only `true`/`false`), as kustomize reads
/// them, so `name: Y` or `value: yes` stay strings.
pub(crate) fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::Options {
        strict_booleans: true,
        ..serde_saphyr::Options::default()
    }
}

/// Parses a YAML stream (such as `kubectl kustomize`'s output) into its documents.
pub fn parse_stream(text: &str) -> Result<Vec<Value>, String> {
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(text, yaml_options()).map_err(|e| e.to_string())?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}
