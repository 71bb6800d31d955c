//! A streaming check that a file is an ONNX model (`ModelProto` in protobuf wire format), done at
//! `outpost model push` and at the hub before a model is stored (docs/inference.md). It reads the
//! file once, front to back, in constant memory (never the whole model), and refuses:
//! anything that is not protobuf (a PNG, a text file, a `docker save` archive), a truncated or
//! corrupt file (a length running past the end, a wrong wire type for a known field), and a
//! protobuf that is not a model (no `ir_version`, no `graph`, no `opset_import`).
//!
//! Whether the runtime supports every operator is not decided here: that is checked when the
//! model is loaded on the node, where a failure is rolled back.

use std::io::Read;

/// What the check learned about a valid model.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct OnnxSummary {
    pub ir_version: u64,
    /// (domain, version) of each `opset_import`.
    pub opsets: Vec<(String, u64)>,
    pub producer: String,
    pub size: u64,
}

struct Reader<R> {
    r: R,
    pos: u64,
}

impl<R: Read> Reader<R> {
    /// One byte, or `None` at a clean end of file.
    fn byte(&mut self) -> Result<Option<u8>, String> {
        let mut b = [0u8; 1];
        loop {
            match self.r.read(&mut b) {
                Ok(0) => return Ok(None),
                Ok(_) => {
                    self.pos += 1;
                    return Ok(Some(b[0]));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("cannot read the file: {e}")),
            }
        }
    }

    fn varint(&mut self, first: Option<u8>) -> Result<Option<u64>, String> {
        let mut v: u64 = 0;
        let mut b = match first {
            Some(b) => b,
            None => match self.byte()? {
                Some(b) => b,
                None => return Ok(None),
            },
        };
        for i in 0..10 {
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(Some(v));
            }
            b = self.byte()?.ok_or_else(|| self.truncated())?;
        }
        Err(format!(
            "byte {}: a varint longer than 10 bytes: not protobuf",
            self.pos
        ))
    }

    fn truncated(&self) -> String {
        format!("the file ends inside a field at byte {}: it is truncated", self.pos)
    }

    fn skip(&mut self, n: u64) -> Result<(), String> {
        let copied = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())
            .map_err(|e| format!("cannot read the file: {e}"))?;
        self.pos += copied;
        if copied < n {
            return Err(self.truncated());
        }
        Ok(())
    }

    fn bytes(&mut self, n: u64, max: u64) -> Result<Vec<u8>, String> {
        if n > max {
            self.skip(n)?;
            return Ok(Vec::new());
        }
        let mut v = vec![0u8; n as usize];
        self.r.read_exact(&mut v).map_err(|_| self.truncated())?;
        self.pos += n;
        Ok(v)
    }
}

/// Check `r` is an ONNX model, reading it once in constant memory.
pub fn check_onnx(r: impl Read) -> Result<OnnxSummary, String> {
    let mut rd = Reader { r, pos: 0 };
    let mut s = OnnxSummary::default();
    let mut graph = false;
    let mut ir = false;
    let mut fields = 0u64;
    while let Some(first) = rd.byte()? {
        let at = rd.pos - 1;
        let key = rd.varint(Some(first))?.ok_or_else(|| rd.truncated())?;
        let (field, wire) = (key >> 3, key & 7);
        if field == 0 || field > 1000 {
            return Err(not_onnx(at, &format!("field number {field}")));
        }
        // ModelProto: 1 ir_version, 5 model_version (varints); 2 producer_name, 3 producer_version,
        // 4 domain, 6 doc_string, 7 graph, 8 opset_import, 14 metadata_props, 20 training_info,
        // 25 functions (length-delimited).
        let expected = match field {
            1 | 5 => Some(0),
            2 | 3 | 4 | 6 | 7 | 8 | 14 | 20 | 25 => Some(2),
            _ => None,
        };
        if let Some(e) = expected {
            if wire != e {
                return Err(not_onnx(at, &format!("field {field} has wire type {wire}")));
            }
        }
        match wire {
            0 => {
                let v = rd.varint(None)?.ok_or_else(|| rd.truncated())?;
                if field == 1 {
                    s.ir_version = v;
                    ir = true;
                }
            }
            1 => rd.skip(8)?,
            5 => rd.skip(4)?,
            2 => {
                let len = rd.varint(None)?.ok_or_else(|| rd.truncated())?;
                match field {
                    2 => s.producer = String::from_utf8_lossy(&rd.bytes(len, 256)?).into_owned(),
                    8 => s
                        .opsets
                        .push(opset(&rd.bytes(len, 4096)?).map_err(|e| not_onnx(at, &e))?),
                    7 => {
                        graph = true;
                        rd.skip(len)?;
                    }
                    _ => rd.skip(len)?,
                }
            }
            _ => return Err(not_onnx(at, &format!("wire type {wire}"))),
        }
        fields += 1;
    }
    s.size = rd.pos;
    if fields == 0 {
        return Err("the file is empty: not an ONNX model".into());
    }
    let mut missing = vec![];
    if !ir {
        missing.push("ir_version");
    }
    if !graph {
        missing.push("graph");
    }
    if s.opsets.is_empty() {
        missing.push("opset_import");
    }
    if !missing.is_empty() {
        return Err(format!(
            "the file is protobuf but not an ONNX model: it has no {}",
            missing.join(", no ")
        ));
    }
    if !(1..=100).contains(&s.ir_version) {
        return Err(format!("ir_version {} is not an ONNX IR version", s.ir_version));
    }
    Ok(s)
}

fn not_onnx(at: u64, what: &str) -> String {
    format!("byte {at}: {what} cannot appear in an ONNX model: the file is not ONNX or is corrupt")
}

/// OperatorSetIdProto: 1 domain (string), 2 version (varint).
fn opset(b: &[u8]) -> Result<(String, u64), String> {
    let mut rd = Reader { r: b, pos: 0 };
    let (mut domain, mut version) = (String::new(), 0);
    while let Some(first) = rd.byte()? {
        let key = rd.varint(Some(first))?.ok_or("opset_import is truncated")?;
        match (key >> 3, key & 7) {
            (1, 2) => {
                let len = rd.varint(None)?.ok_or("opset_import is truncated")?;
                domain = String::from_utf8_lossy(&rd.bytes(len, 1024)?).into_owned();
            }
            (2, 0) => version = rd.varint(None)?.ok_or("opset_import is truncated")?,
            (_, 0) => {
                rd.varint(None)?;
            }
            (_, 2) => {
                let len = rd.varint(None)?.ok_or("opset_import is truncated")?;
                rd.skip(len)?;
            }
            (f, w) => return Err(format!("opset_import field {f} has wire type {w}")),
        }
    }
    Ok((domain, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn field_len(f: u64, body: &[u8], out: &mut Vec<u8>) {
        varint(f << 3 | 2, out);
        varint(body.len() as u64, out);
        out.extend_from_slice(body);
    }

    /// A minimal model: ir_version 8, producer, a graph, one opset import.
    fn model() -> Vec<u8> {
        let mut m = vec![];
        varint(1 << 3, &mut m);
        varint(8, &mut m);
        field_len(2, b"skl2onnx", &mut m);
        field_len(7, &[0x0a, 0x00, 0x12, 0x01, b'g'], &mut m);
        let mut op = vec![];
        field_len(1, b"", &mut op);
        varint(2 << 3, &mut op);
        varint(17, &mut op);
        field_len(8, &op, &mut m);
        m
    }

    #[test]
    fn a_model_passes_and_is_summarized() {
        let s = check_onnx(&model()[..]).unwrap();
        assert_eq!(s.ir_version, 8);
        assert_eq!(s.producer, "skl2onnx");
        assert_eq!(s.opsets, vec![(String::new(), 17)]);
        assert_eq!(s.size, model().len() as u64);
    }

    #[test]
    fn non_models_are_refused_with_the_reason() {
        let m = model();
        let mut no_graph = vec![];
        varint(1 << 3, &mut no_graph);
        varint(8, &mut no_graph);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "empty"),
            (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec(), "not ONNX or is corrupt"),
            (b"hello world, this is text\n".to_vec(), "not ONNX or is corrupt"),
            (m[..m.len() - 3].to_vec(), "truncated"),
            (no_graph, "no graph, no opset_import"),
            ([&m[..], &[0x0a, 0x01, 0x00][..]].concat(), "field 1 has wire type 2"),
        ];
        for (bytes, want) in cases {
            let e = check_onnx(&bytes[..]).unwrap_err();
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_checked_without_panic(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = check_onnx(&b[..]);
        }
    }
}
