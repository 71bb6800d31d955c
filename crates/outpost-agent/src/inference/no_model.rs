//! The model of an outpost built without the `onnx` cargo feature: nothing can be loaded, and
//! the model server exits with the reason (a node's update gate rolls such a workload back,
//! quoting it).

use std::path::Path;

use super::{LoadError, Output, TensorMeta};

/// Never constructed in this build.
pub struct Model {
    pub input: TensorMeta,
    pub outputs: Vec<TensorMeta>,
    pub load_ms: u64,
}

impl Model {
    pub fn load(_path: &Path) -> Result<Model, LoadError> {
        Err(LoadError::Prepare {
            reason: "this outpost binary was built without the ONNX runtime (cargo feature `onnx`); \
                     run a build with default features on this node"
                .into(),
        })
    }

    pub fn run(&self, _data: &[f32], _batch: usize) -> Result<Vec<Output>, String> {
        Err("this outpost binary was built without the ONNX runtime".into())
    }
}
