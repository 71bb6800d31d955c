//! The model stage of a pipeline stream (`infer:` in a stream, docs/inference.md): a batch of
//! records becomes one KServe v2 request to the ONNX serving workload on this node, and each
//! record becomes its prediction, `{"model", "pred", "confidence", <kept fields>}`, before the
//! stream's filter, anomaly rules and windows see it. Only predictions are spooled and
//! forwarded; a record the model cannot take is refused to its publisher with the reason.

use outpost_api::pipeline::{lookup, InferSpec};
use serde_json::{json, Map, Value};

use super::{top_class, Output, OutputData};

/// Why a record did not become a prediction.
#[derive(Clone, Debug, PartialEq)]
pub enum StageError {
    /// The record itself can never be predicted (no feature vector, another length).
    Record(String),
    /// The model did not answer or refused the batch: worth trying again.
    Model(String),
}

pub struct Stage {
    spec: InferSpec,
    url: String,
    input: Vec<String>,
    client: reqwest::Client,
}

fn path(p: &str) -> Vec<String> {
    p.split('.').map(String::from).collect()
}

fn flatten(v: &Value, out: &mut Vec<f64>) -> bool {
    match v {
        Value::Array(a) => a.iter().all(|x| flatten(x, out)),
        Value::Number(n) => {
            out.push(n.as_f64().unwrap_or(f64::NAN));
            true
        }
        _ => false,
    }
}

impl Output {
    /// One output of a KServe v2 answer.
    pub fn from_json(v: &Value) -> Option<Output> {
        let shape = v["shape"]
            .as_array()?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()?;
        let data = v["data"].as_array()?;
        let data = if v["datatype"] == "INT64" {
            OutputData::I64(data.iter().map(Value::as_i64).collect::<Option<_>>()?)
        } else {
            OutputData::F32(
                data.iter()
                    .map(|x| x.as_f64().map(|f| f as f32))
                    .collect::<Option<_>>()?,
            )
        };
        Some(Output {
            name: v["name"].as_str().unwrap_or_default().to_string(),
            shape,
            data,
        })
    }
}

impl Stage {
    pub fn new(spec: &InferSpec) -> Stage {
        Stage {
            url: format!("http://127.0.0.1:{}/v2/models/{}/infer", spec.port, spec.model),
            input: path(&spec.input),
            spec: spec.clone(),
            client: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .expect("an HTTP client"),
        }
    }

    /// Predictions for `records` (one answer per record, in order).
    pub async fn run(&self, records: &[(Value, Option<String>)]) -> Vec<Result<Value, StageError>> {
        let mut out: Vec<Result<Value, StageError>> = Vec::with_capacity(records.len());
        let mut data: Vec<f64> = Vec::new();
        let mut width: Option<usize> = None;
        let mut batch: Vec<usize> = Vec::new();
        for (i, (v, topic)) in records.iter().enumerate() {
            let mut x = Vec::new();
            let ok = lookup(v, &self.input, topic.as_deref()).is_some_and(|f| flatten(&f, &mut x));
            if !ok || x.is_empty() {
                out.push(Err(StageError::Record(format!(
                    "the record has no feature vector (an array of numbers) at {:?}, which the stream's model stage reads",
                    self.spec.input
                ))));
                continue;
            }
            if *width.get_or_insert(x.len()) != x.len() {
                out.push(Err(StageError::Record(format!(
                    "the feature vector at {:?} has {} values; the records before it had {}",
                    self.spec.input,
                    x.len(),
                    width.unwrap_or(0)
                ))));
                continue;
            }
            data.extend(x);
            batch.push(i);
            out.push(Ok(Value::Null));
        }
        if batch.is_empty() {
            return out;
        }
        let req = json!({"inputs": [{"name": "", "datatype": "FP32", "shape": [batch.len(), width.unwrap_or(0)], "data": data}]});
        let answer = self.client.post(&self.url).json(&strip_name(req)).send().await;
        let outputs: Result<Vec<Output>, String> = match answer {
            Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                Ok(v) => v["outputs"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Output::from_json).collect())
                    .ok_or_else(|| "the model server's answer has no outputs".to_string()),
                Err(e) => Err(format!("the model server's answer is not JSON: {e}")),
            },
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                Err(format!(
                    "model {} refused the batch ({status}): {body}",
                    self.spec.model
                ))
            }
            Err(e) => Err(format!(
                "model {} does not answer on port {} ({e}); is its serving workload running on this node?",
                self.spec.model, self.spec.port
            )),
        };
        for (item, &i) in batch.iter().enumerate() {
            out[i] = match &outputs {
                Err(e) => Err(StageError::Model(e.clone())),
                Ok(o) => match top_class(o, item) {
                    None => Err(StageError::Model(format!(
                        "model {} gives no class output",
                        self.spec.model
                    ))),
                    Some((pred, confidence)) => {
                        let mut m = Map::new();
                        m.insert("model".into(), json!(self.spec.model));
                        m.insert("pred".into(), json!(pred));
                        m.insert("confidence".into(), json!(confidence));
                        let (v, topic) = &records[i];
                        for k in &self.spec.keep {
                            if let Some(x) = lookup(v, &path(k), topic.as_deref()) {
                                m.insert(k.clone(), x.into_owned());
                            }
                        }
                        Ok(Value::Object(m))
                    }
                },
            };
        }
        out
    }
}

/// The server takes an unnamed input as its only input.
fn strip_name(mut req: Value) -> Value {
    if let Some(i) = req["inputs"][0].as_object_mut() {
        i.remove("name");
    }
    req
}
