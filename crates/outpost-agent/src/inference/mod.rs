//! ONNX inference on the node (docs/inference.md): a model loaded with tract (pure Rust, nothing
//! downloaded at build time), optimized and warmed up, then served over loopback HTTP by
//! [`server`] with the Open Inference Protocol (KServe v2) and the articles' `POST /infer`.
//!
//! A serving workload (`runtimeClassName: onnx`) is a process the agent supervises like any
//! other: the agent starts its own binary as `outpost serve-model`, so a model that crashes or
//! fails to load is a crash-looping unit, and the per-node health gate rolls it back.
//!
//! This module never touches the network or the hub; [`server`] owns the listener. Request
//! decoding ([`decode_v2`], [`decode_image`]) and the articles' answer ([`top_class`]) are pure
//! and unit-tested.

pub mod fetch;
// The ONNX runtime (tract) behind the `onnx` cargo feature, on by default; without it a model
// server refuses to start, saying so (docs/inference.md, "Building without the ONNX runtime").
#[cfg(feature = "onnx")]
mod model;
#[cfg(not(feature = "onnx"))]
#[path = "no_model.rs"]
mod model;
pub mod server;
pub mod stage;
pub mod stats;

pub use model::Model;

use std::path::Path;

use base64::Engine;
use serde_json::{json, Value};

/// The command line of a serving container: this binary's `serve-model`, which fetches the
/// model (cache, else the hub over the node's link), loads and warms it up, then listens.
pub fn serve_argv(data_dir: &Path, m: &outpost_api::ModelServe) -> Result<Vec<String>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the agent's own binary: {e}"))?;
    let (name, version) = m.name_version();
    let listen = match m.host_port {
        Some(p) => format!("0.0.0.0:{p}"),
        None => format!("127.0.0.1:{}", m.port),
    };
    Ok(vec![
        exe.display().to_string(),
        "serve-model".into(),
        "--model-ref".into(),
        m.reference.clone(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--name".into(),
        name.to_string(),
        "--version".into(),
        version.to_string(),
        "--listen".into(),
        listen,
    ])
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the model file {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{path} is not a valid ONNX model ({reason}); check that the file is complete and was exported as ONNX")]
    NotOnnx { path: String, reason: String },
    #[error("the model uses operator(s) {ops} that outpost's ONNX runtime (tract) does not implement; export the model with supported operators (opset 9-18)")]
    UnsupportedOperator { ops: String },
    #[error("the model's input {input} has type {datatype}; outpost serves FP32 inputs only")]
    UnsupportedInput { input: String, datatype: String },
    #[error("the model cannot be prepared to run: {reason}")]
    Prepare { reason: String },
    #[error("the model failed its warm-up run: {reason}")]
    WarmUp { reason: String },
}

/// One tensor as the v2 protocol describes it: `[-1, 64]` for a dynamic batch.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorMeta {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

impl TensorMeta {
    pub fn to_json(&self) -> Value {
        json!({"name": self.name, "datatype": self.datatype, "shape": self.shape})
    }
    /// Number of values in one batch item (the product of every dimension after the first).
    pub fn item_len(&self) -> usize {
        self.shape.iter().skip(1).map(|d| (*d).max(1) as usize).product()
    }
}

/// One output of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: OutputData,
}

#[derive(Clone, Debug, PartialEq)]
pub enum OutputData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl Output {
    pub fn datatype(&self) -> &'static str {
        match self.data {
            OutputData::F32(_) => "FP32",
            OutputData::I64(_) => "INT64",
        }
    }
    pub fn to_json(&self) -> Value {
        let data = match &self.data {
            OutputData::F32(v) => json!(v),
            OutputData::I64(v) => json!(v),
        };
        json!({"name": self.name, "datatype": self.datatype(), "shape": self.shape, "data": data})
    }
}

/// A request the model cannot take, with what it expected (HTTP 400).
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Decode a KServe v2 infer request body into (flat FP32 data, batch). The one input must be
/// named as the model's input (or be the only one), be FP32 and have the model's shape with any
/// batch; `data` may be flat or nested.
pub fn decode_v2(body: &Value, input: &TensorMeta) -> Result<(Vec<f32>, usize), BadInput> {
    let expected = || {
        format!("expected {{\"inputs\": [{{\"name\": {:?}, \"datatype\": \"FP32\", \"shape\": {:?}, \"data\": [...]}}]}} (any batch size for -1)", input.name, input.shape)
    };
    let inputs = body
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| BadInput(format!("the body has no \"inputs\" array; {}", expected())))?;
    if inputs.len() != 1 {
        return Err(BadInput(format!(
            "the model takes one input, the request has {}; {}",
            inputs.len(),
            expected()
        )));
    }
    let i = &inputs[0];
    if let Some(name) = i.get("name").and_then(Value::as_str) {
        if name != input.name {
            return Err(BadInput(format!("unknown input {name:?}; {}", expected())));
        }
    }
    let dt = i.get("datatype").and_then(Value::as_str).unwrap_or("FP32");
    if !matches!(dt, "FP32" | "FP64") {
        return Err(BadInput(format!(
            "input {:?} has datatype {dt}; {}",
            input.name,
            expected()
        )));
    }
    let shape: Vec<i64> = i
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| BadInput(format!("input {:?} has no shape; {}", input.name, expected())))?
        .iter()
        .map(|d| d.as_i64().filter(|d| *d >= 0))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            BadInput(format!(
                "input {:?}: the shape must be non-negative integers; {}",
                input.name,
                expected()
            ))
        })?;
    let fits = shape.len() == input.shape.len() && shape.iter().zip(&input.shape).skip(1).all(|(a, b)| a == b);
    if !fits || shape.first() == Some(&0) {
        return Err(BadInput(format!(
            "input {:?} has shape {shape:?}; {}",
            input.name,
            expected()
        )));
    }
    let batch = shape[0] as usize;
    let n = batch * input.item_len();
    let mut data = Vec::with_capacity(n);
    flatten(i.get("data").unwrap_or(&Value::Null), &mut data, n)
        .map_err(|e| BadInput(format!("input {:?}: {e}; {}", input.name, expected())))?;
    if data.len() != n {
        return Err(BadInput(format!(
            "input {:?} has {} values, its shape {shape:?} needs {n}",
            input.name,
            data.len()
        )));
    }
    Ok((data, batch))
}

fn flatten(v: &Value, out: &mut Vec<f32>, max: usize) -> Result<(), String> {
    match v {
        Value::Array(a) => {
            for x in a {
                flatten(x, out, max)?;
            }
            Ok(())
        }
        Value::Number(n) => {
            if out.len() >= max {
                return Err(format!("more values than the shape allows ({max})"));
            }
            out.push(n.as_f64().ok_or("a value is not a number")? as f32);
            Ok(())
        }
        Value::Null => Err("\"data\" is missing".into()),
        _ => Err("\"data\" must hold numbers".into()),
    }
}

/// The image side (height, width) the model's input takes: the last two dimensions of a
/// rank-3/4 input, or the square root of a flat rank-2 input (64 features -> 8 x 8).
pub fn image_side(input: &TensorMeta) -> Option<(usize, usize)> {
    let s = &input.shape;
    match s.len() {
        3 | 4 => Some((s[s.len() - 2] as usize, s[s.len() - 1] as usize)),
        2 => {
            let n = s[1] as usize;
            let side = (n as f64).sqrt().round() as usize;
            (side * side == n).then_some((side, side))
        }
        _ => None,
    }
}

/// Decode the articles' `image_base64` into one FP32 input item: a PNG image (made grayscale as
/// PIL's `convert('L')` does, resized to the model's side as PIL's `resize` does by default,
/// bicubic, [`resize_bicubic`], divided by 255),
/// or exactly one item of raw 8-bit pixels (divided by 255), or of little-endian float32 values.
pub fn decode_image(b64: &str, input: &TensorMeta) -> Result<Vec<f32>, BadInput> {
    let n = input.item_len();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| BadInput(format!("image_base64 is not base64: {e}")))?;
    let expected = || {
        format!(
            "expected a PNG image, {n} raw 8-bit grayscale pixels, or {n} little-endian float32 values ({} bytes) for input {:?} of shape {:?}",
            4 * n,
            input.name,
            input.shape
        )
    };
    if bytes.starts_with(b"\x89PNG") {
        let (h, w) = image_side(input).ok_or_else(|| {
            BadInput(format!(
                "the model's input {:?} of shape {:?} is not an image; send raw values",
                input.name, input.shape
            ))
        })?;
        let (gray, gw, gh) = decode_png(&bytes)
            .map_err(|e| BadInput(format!("image_base64 holds a PNG that cannot be decoded: {e}")))?;
        let px = resize_bicubic(&gray, gw, gh, w, h);
        return Ok(px.iter().map(|p| *p as f32 / 255.0).collect());
    }
    if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        return Err(BadInput(format!("image_base64 holds a JPEG; {}", expected())));
    }
    if bytes.len() == n {
        return Ok(bytes.iter().map(|b| *b as f32 / 255.0).collect());
    }
    if bytes.len() == 4 * n {
        return Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect());
    }
    Err(BadInput(format!(
        "image_base64 decoded to {} bytes; {}",
        bytes.len(),
        expected()
    )))
}

/// Fixed-point precision of PIL's 8-bit resampling (`Resample.c`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's bicubic kernel (a = -0.5).
fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Per output index: the first input index and the fixed-point weights, as PIL's
/// `precompute_coeffs` + `normalize_coeffs_8bpc` (the kernel widens when downscaling: an
/// antialiasing filter, not point sampling).
fn coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let one = (1i64 << PRECISION_BITS) as f64;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero, as `as` does
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) / filterscale))
                .collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|v| {
                    let v = if total != 0.0 { v / total } else { *v };
                    if v < 0.0 {
                        (-0.5 + v * one) as i64
                    } else {
                        (0.5 + v * one) as i64
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resize 8-bit grayscale pixels as PIL's `Image.resize((w, h))` does by default (bicubic,
/// horizontal pass then vertical, each rounded to 8 bits), pixel for pixel.
pub fn resize_bicubic(src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<u8> {
    let half = 1i64 << (PRECISION_BITS - 1);
    let horizontal = if sw == dw {
        src.to_vec()
    } else {
        let kx = coeffs(sw, dw);
        let mut out = Vec::with_capacity(dw * sh);
        for y in 0..sh {
            let row = &src[y * sw..(y + 1) * sw];
            for (xmin, k) in &kx {
                let ss: i64 = half + k.iter().enumerate().map(|(i, w)| row[xmin + i] as i64 * w).sum::<i64>();
                out.push(clip8(ss));
            }
        }
        out
    };
    if sh == dh {
        return horizontal;
    }
    let ky = coeffs(sh, dh);
    let mut out = Vec::with_capacity(dw * dh);
    for (ymin, k) in &ky {
        for x in 0..dw {
            let ss: i64 = half
                + k.iter()
                    .enumerate()
                    .map(|(i, w)| horizontal[(ymin + i) * dw + x] as i64 * w)
                    .sum::<i64>();
            out.push(clip8(ss));
        }
    }
    out
}

/// A PNG as 8-bit grayscale pixels (ITU-R 601-2 luma, as PIL's `convert('L')`), width, height.
fn decode_png(bytes: &[u8]) -> Result<(Vec<u8>, usize, usize), String> {
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec.read_info().map_err(|e| e.to_string())?;
    let (w, h) = (reader.info().width as usize, reader.info().height as usize);
    if w == 0 || h == 0 || w * h > 16 << 20 {
        return Err(format!("{w}x{h} pixels is not a size outpost decodes"));
    }
    let mut buf = vec![0; reader.output_buffer_size().ok_or("image too large")?];
    let frame = reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
    let (ct, _) = reader.output_color_type();
    let px = &buf[..frame.buffer_size()];
    let ch = ct.samples();
    let stride = frame.line_size;
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        let row = &px[y * stride..];
        for x in 0..w {
            let p = &row[x * ch..x * ch + ch];
            let l = match ch {
                1 | 2 => p[0],
                // PIL's L24: ITU-R 601-2 in 16-bit fixed point, rounded
                _ => ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8,
            };
            out.push(l);
        }
    }
    Ok((out, w, h))
}

/// The articles' answer from a model's outputs: the predicted class (an integer output such as
/// skl2onnx's `label`, else the argmax of the first float output) and its probability when the
/// model gives one. For batch item `item`.
pub fn top_class(outputs: &[Output], item: usize) -> Option<(i64, Option<f32>)> {
    let probs = outputs.iter().find_map(|o| match &o.data {
        OutputData::F32(v) if o.shape.len() == 2 => {
            let k = o.shape[1];
            v.get(item * k..item * k + k)
        }
        _ => None,
    });
    let argmax = |p: &[f32]| {
        p.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, v)| (i as i64, *v))
    };
    let label = outputs.iter().find_map(|o| match &o.data {
        OutputData::I64(v) => v.get(item).copied(),
        _ => None,
    });
    match (label, probs) {
        (Some(l), Some(p)) => Some((l, argmax(p).map(|(_, v)| v))),
        (Some(l), None) => Some((l, None)),
        (None, Some(p)) => argmax(p).map(|(i, v)| (i, Some(v))),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digits() -> TensorMeta {
        TensorMeta {
            name: "X".into(),
            datatype: "FP32".into(),
            shape: vec![-1, 64],
        }
    }

    #[test]
    fn v2_requests_decode_or_say_what_was_expected() {
        let ok = json!({"inputs": [{"name": "X", "datatype": "FP32", "shape": [2, 64], "data": vec![0.5; 128]}]});
        let (d, b) = decode_v2(&ok, &digits()).unwrap();
        assert_eq!((d.len(), b), (128, 2));
        let nested = json!({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 64], "data": [vec![0.5; 64]]}]});
        assert_eq!(decode_v2(&nested, &digits()).unwrap().1, 1);
        let cases = [
            (json!({}), "no \"inputs\""),
            (
                json!({"inputs": [{"name": "Y", "shape": [1, 64], "data": []}]}),
                "unknown input \"Y\"",
            ),
            (
                json!({"inputs": [{"name": "X", "shape": [1, 63], "data": []}]}),
                "has shape [1, 63]",
            ),
            (
                json!({"inputs": [{"name": "X", "shape": [1, 8, 8], "data": []}]}),
                "has shape [1, 8, 8]",
            ),
            (
                json!({"inputs": [{"name": "X", "datatype": "INT64", "shape": [1, 64], "data": []}]}),
                "datatype INT64",
            ),
            (
                json!({"inputs": [{"name": "X", "shape": [1, 64], "data": vec![1; 63]}]}),
                "has 63 values",
            ),
            (
                json!({"inputs": [{"name": "X", "shape": [1, 64], "data": vec![1; 65]}]}),
                "more values than",
            ),
            (
                json!({"inputs": [{"name": "X", "shape": [1, 64], "data": ["a"]}]}),
                "must hold numbers",
            ),
        ];
        for (body, want) in cases {
            let e = decode_v2(&body, &digits()).unwrap_err().0;
            assert!(e.contains(want), "{body}: {e}");
            assert!(e.contains("[-1, 64]") || e.contains("needs 64"), "{e}");
        }
    }

    #[test]
    fn images_decode_from_png_raw_pixels_or_floats() {
        let m = digits();
        assert_eq!(image_side(&m), Some((8, 8)));
        let raw: Vec<u8> = (0..64).map(|i| (i * 4) as u8).collect();
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let v = decode_image(&b64(&raw), &m).unwrap();
        assert_eq!(v[1], 4.0 / 255.0);
        let floats: Vec<u8> = (0..64).flat_map(|i| (i as f32 / 64.0).to_le_bytes()).collect();
        assert_eq!(decode_image(&b64(&floats), &m).unwrap()[32], 0.5);
        // An RGB 16x16 PNG, downsampled to 8x8.
        let mut png_bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut png_bytes, 16, 16);
            enc.set_color(png::ColorType::Rgb);
            let mut w = enc.write_header().unwrap();
            let data: Vec<u8> = (0..16 * 16)
                .flat_map(|i| if i % 16 < 8 { [255, 255, 255] } else { [0, 0, 0] })
                .collect();
            w.write_image_data(&data).unwrap();
        }
        let v = decode_image(&b64(&png_bytes), &m).unwrap();
        assert_eq!(v.len(), 64);
        assert_eq!((v[0], v[7]), (1.0, 0.0));
        for (bad, want) in [
            ("***", "not base64"),
            (&*b64(&[1, 2, 3]), "decoded to 3 bytes; expected a PNG image, 64 raw"),
            (&*b64(&[0xff, 0xd8, 0xff, 0]), "holds a JPEG"),
            (&*b64(b"\x89PNG\r\n\x1a\nbroken"), "PNG that cannot be decoded"),
        ] {
            let e = decode_image(bad, &m).unwrap_err().0;
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn the_articles_pred_is_the_label_or_the_argmax() {
        let probs = Output {
            name: "probabilities".into(),
            shape: vec![2, 3],
            data: OutputData::F32(vec![0.1, 0.7, 0.2, 0.6, 0.3, 0.1]),
        };
        let label = Output {
            name: "label".into(),
            shape: vec![2],
            data: OutputData::I64(vec![1, 0]),
        };
        assert_eq!(top_class(&[label.clone(), probs.clone()], 1), Some((0, Some(0.6))));
        assert_eq!(top_class(std::slice::from_ref(&probs), 0), Some((1, Some(0.7))));
        assert_eq!(top_class(&[label], 0), Some((1, None)));
        assert_eq!(top_class(&[], 0), None);
    }
}
