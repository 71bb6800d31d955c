//! The model itself: an ONNX file loaded with tract, optimized with a symbolic batch, warmed
//! up, and run.

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::GenericFactoid;

use super::{LoadError, Output, OutputData, TensorMeta};

/// A loaded, optimized and warmed-up model.
pub struct Model {
    plan: Arc<TypedSimplePlan>,
    pub input: TensorMeta,
    pub outputs: Vec<TensorMeta>,
    /// How long the load, optimization and warm-up took.
    pub load_ms: u64,
}

fn v2_datatype(dt: DatumType) -> String {
    match dt {
        DatumType::F32 => "FP32".into(),
        DatumType::F64 => "FP64".into(),
        DatumType::F16 => "FP16".into(),
        // tract computes integer shapes and labels as TDim; they leave as INT64.
        DatumType::I64 | DatumType::TDim => "INT64".into(),
        DatumType::I32 => "INT32".into(),
        DatumType::I16 => "INT16".into(),
        DatumType::I8 => "INT8".into(),
        DatumType::U8 => "UINT8".into(),
        DatumType::Bool => "BOOL".into(),
        DatumType::String => "BYTES".into(),
        other => format!("{other:?}"),
    }
}

fn dims_of(shape: &tract_onnx::tract_hir::infer::ShapeFactoid) -> Vec<i64> {
    shape
        .dims()
        .map(|d| match d {
            GenericFactoid::Only(TDim::Val(v)) => *v,
            _ => -1,
        })
        .collect()
}

impl Model {
    /// Load an ONNX file, fix its batch dimension as a symbol, optimize it and run it once on
    /// zeros. Every failure says why, naming unsupported operators.
    pub fn load(path: &Path) -> Result<Model, LoadError> {
        let started = std::time::Instant::now();
        let p = path.display().to_string();
        std::fs::metadata(path).map_err(|e| LoadError::Io {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        let mut model = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(|e| LoadError::NotOnnx {
                path: p.clone(),
                reason: format!("{e:#}"),
            })?;
        let unsupported: std::collections::BTreeSet<String> = model
            .nodes()
            .iter()
            .filter(|n| n.op_is::<tract_onnx::tract_hir::ops::unimpl::UnimplementedOp>())
            .map(|n| {
                let name = n.op().name();
                name.trim_start_matches("Unimplemented(")
                    .trim_end_matches(')')
                    .to_string()
            })
            .collect();
        if !unsupported.is_empty() {
            return Err(LoadError::UnsupportedOperator {
                ops: unsupported.into_iter().collect::<Vec<_>>().join(", "),
            });
        }
        let inputs = model.input_outlets().map_err(prep)?.to_vec();
        if inputs.len() != 1 {
            return Err(LoadError::Prepare {
                reason: format!(
                    "the model has {} inputs; outpost serves models with one input",
                    inputs.len()
                ),
            });
        }
        let input_name = model.node(inputs[0].node).name.clone();
        let fact = model.input_fact(0).map_err(prep)?.clone();
        if let GenericFactoid::Only(dt) = fact.datum_type {
            if dt != DatumType::F32 {
                return Err(LoadError::UnsupportedInput {
                    input: input_name,
                    datatype: v2_datatype(dt),
                });
            }
        }
        let mut shape = dims_of(&fact.shape);
        if shape.is_empty() {
            return Err(LoadError::Prepare {
                reason: format!("input {input_name} has no known rank; export the model with its input shape"),
            });
        }
        if shape.iter().skip(1).any(|d| *d < 0) {
            return Err(LoadError::Prepare {
                reason: format!(
                    "input {input_name} has shape {shape:?}: only the first (batch) dimension may be dynamic"
                ),
            });
        }
        // The first dimension is the batch: a symbol, so one plan serves any batch size.
        let batch = model.sym("N");
        let mut dims: Vec<TDim> = vec![batch.to_dim()];
        dims.extend(shape.iter().skip(1).map(|d| TDim::Val(*d)));
        model
            .set_input_fact(0, InferenceFact::dt_shape(DatumType::F32, dims))
            .map_err(prep)?;
        shape[0] = -1;
        let typed = model.into_optimized().map_err(prep)?;
        let outputs = typed
            .output_outlets()
            .map_err(prep)?
            .iter()
            .map(|o| {
                let f = typed.outlet_fact(*o).map_err(prep)?;
                let shape = f
                    .shape
                    .iter()
                    .map(|d| match d {
                        TDim::Val(v) => *v,
                        _ => -1,
                    })
                    .collect();
                Ok(TensorMeta {
                    name: typed.outlet_label(*o).unwrap_or(&typed.node(o.node).name).to_string(),
                    datatype: v2_datatype(f.datum_type),
                    shape,
                })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        let plan = typed.into_runnable().map_err(prep)?;
        let model = Model {
            plan,
            input: TensorMeta {
                name: input_name,
                datatype: "FP32".into(),
                shape,
            },
            outputs,
            load_ms: 0,
        };
        let zeros = vec![0f32; model.input.item_len()];
        model.run(&zeros, 1).map_err(|e| LoadError::WarmUp { reason: e })?;
        Ok(Model {
            load_ms: started.elapsed().as_millis() as u64,
            ..model
        })
    }

    /// Run a batch of `batch` items laid out one after the other in `data` (checked by the caller
    /// against [`TensorMeta::item_len`]).
    pub fn run(&self, data: &[f32], batch: usize) -> Result<Vec<Output>, String> {
        let mut shape = vec![batch];
        shape.extend(self.input.shape.iter().skip(1).map(|d| *d as usize));
        let t = Tensor::from_shape(&shape, data).map_err(|e| format!("{e:#}"))?;
        let out = self.plan.run(tvec!(t.into_tvalue())).map_err(|e| format!("{e:#}"))?;
        out.into_iter()
            .enumerate()
            .map(|(i, v)| {
                let name = self
                    .outputs
                    .get(i)
                    .map_or_else(|| format!("output{i}"), |m| m.name.clone());
                let shape = v.shape().to_vec();
                let err = |e: TractError| format!("output {name}: {e:#}");
                let data = match v.datum_type() {
                    DatumType::I64 | DatumType::TDim | DatumType::I32 | DatumType::U8 | DatumType::Bool => {
                        let c = v.cast_to::<i64>().map_err(err)?;
                        OutputData::I64(
                            c.try_as_plain_ram()
                                .map_err(err)?
                                .as_slice::<i64>()
                                .map_err(err)?
                                .to_vec(),
                        )
                    }
                    _ => {
                        let c = v.cast_to::<f32>().map_err(err)?;
                        OutputData::F32(
                            c.try_as_plain_ram()
                                .map_err(err)?
                                .as_slice::<f32>()
                                .map_err(err)?
                                .to_vec(),
                        )
                    }
                };
                Ok(Output { name, shape, data })
            })
            .collect()
    }
}

fn prep(e: impl std::fmt::Display) -> LoadError {
    LoadError::Prepare {
        reason: format!("{e:#}"),
    }
}
