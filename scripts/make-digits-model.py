#!/usr/bin/env python3
"""Build the test model for outpost's inference tests and benchmark (docs/inference.md).

Trains a small MLP on scikit-learn's bundled digits data (8x8 images, 1,797 samples; no
download), exports it to ONNX with skl2onnx (zipmap off, so the outputs are a label tensor and
a float32 probability tensor), and writes the reference predictions of onnxruntime for the
whole test split.

    make-digits-model.py OUT_DIR

writes OUT_DIR/digits.onnx, OUT_DIR/digits-reference.json ({"inputs": [[64 floats]...],
"labels": [...], "probabilities": [[10 floats]...], "expected": [...]}) and OUT_DIR/digits-v2.onnx
(the same data, another seed: a second version for rollout tests) and
OUT_DIR/digits-v3-broken.onnx (valid ONNX with an operator nobody implements) and
OUT_DIR/digits-v4-wide.onnx (loads and answers, but takes 128 features: every request of the
64-feature clients is refused, for the model's own rollout gate). Inputs are scaled to [0, 1]
(pixel / 16), the range the articles' preprocessing (pixel / 255) produces.
"""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier


def build(seed, wide=False):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    if wide:
        x = np.hstack([x, x])
    y = digits.target
    x_train, x_test, _y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=seed)
    clf.fit(x_train, _y_train)
    onx = to_onnx(
        clf,
        x_train[:1],
        options={id(clf): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    return onx, x_test, y_test


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(out, exist_ok=True)
    onx, x_test, y_test = build(seed=1)
    model = os.path.join(out, "digits.onnx")
    with open(model + ".tmp", "wb") as f:
        f.write(onx.SerializeToString())
    os.replace(model + ".tmp", model)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    labels, probs = sess.run(names, {sess.get_inputs()[0].name: x_test})
    ref = {
        "input": sess.get_inputs()[0].name,
        "outputs": names,
        "inputs": x_test.astype(float).tolist(),
        "labels": [int(v) for v in labels],
        "probabilities": probs.astype(float).tolist(),
        "expected": [int(v) for v in y_test],
    }
    with open(os.path.join(out, "digits-reference.json.tmp"), "w") as f:
        json.dump(ref, f)
    os.replace(os.path.join(out, "digits-reference.json.tmp"), os.path.join(out, "digits-reference.json"))
    onx2, _, _ = build(seed=2)
    with open(os.path.join(out, "digits-v2.onnx.tmp"), "wb") as f:
        f.write(onx2.SerializeToString())
    os.replace(os.path.join(out, "digits-v2.onnx.tmp"), os.path.join(out, "digits-v2.onnx"))
    # v3: a valid ONNX file whose graph uses an operator no runtime knows (in place of Relu):
    # it passes the push check and must fail at load, naming the operator.
    broken = onnx.load(model)
    for node in broken.graph.node:
        if node.op_type == "Relu":
            node.op_type = "FrobnicateV9"
    with open(os.path.join(out, "digits-v3-broken.onnx.tmp"), "wb") as f:
        f.write(broken.SerializeToString())
    os.replace(os.path.join(out, "digits-v3-broken.onnx.tmp"), os.path.join(out, "digits-v3-broken.onnx"))
    # v4: a model that loads and answers, but expects 128 features instead of 64.
    onx4, _, _ = build(seed=3, wide=True)
    with open(os.path.join(out, "digits-v4-wide.onnx.tmp"), "wb") as f:
        f.write(onx4.SerializeToString())
    os.replace(os.path.join(out, "digits-v4-wide.onnx.tmp"), os.path.join(out, "digits-v4-wide.onnx"))
    acc = float(np.mean(np.array(ref["labels"]) == y_test))
    print(f"wrote {model} ({os.path.getsize(model)} bytes), {len(y_test)} reference predictions, accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
