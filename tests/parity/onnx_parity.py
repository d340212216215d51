#!/usr/bin/env python3
"""Numerical parity of histolens backbones with an independent engine.

Builds ResNet-18/50 or EfficientNet-Lite0 as an ONNX graph with the `onnx` package, fills it with the
weights of a histolens checkpoint (safetensors), runs it in onnxruntime on the input the Rust test used,
and compares the pooled features with histolens' output. `hagnifinder_model` builds a whole
magnification model (backbone and Hagnifinder head) for benches/onnxruntime_predict.py.

usage: onnx_parity.py ARCH CHECKPOINT.safetensors IO.safetensors [--tol 1e-3] [--save-onnx PATH]
IO.safetensors holds `input` (N,3,H,W) and `pooled` (N,C). Exit status 0 when max|a-b|/max|b| <= tol.
"""
import argparse
import json
import struct
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64}


def read_safetensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        arr = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
        out[name] = arr.astype(np.float32) if arr.dtype != np.int64 else arr
    return out


class Graph:
    def __init__(self, weights):
        self.w, self.nodes, self.inits, self.n = weights, [], [], 0

    def name(self, p):
        self.n += 1
        return f"{p}_{self.n}"

    def const(self, arr, p="c"):
        nm = self.name(p)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), nm))
        return nm

    def node(self, op, inputs, **attrs):
        out = self.name(op)
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def conv_bn(self, x, conv, bn, stride, pads, group=1, eps=1e-5):
        w = self.w[conv + ".weight"]
        y = self.node("Conv", [x, self.const(w)], strides=[stride, stride], pads=pads, group=group,
                      kernel_shape=list(w.shape[2:]))
        return self.node("BatchNormalization", [y, self.const(self.w[bn + ".weight"]), self.const(self.w[bn + ".bias"]),
                         self.const(self.w[bn + ".running_mean"]), self.const(self.w[bn + ".running_var"])], epsilon=eps)


def resnet(g, x, depth):
    x = g.node("Relu", [g.conv_bn(x, "conv1", "bn1", 2, [3, 3, 3, 3])])
    x = g.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    repeats = [2, 2, 2, 2] if depth == 18 else [3, 4, 6, 3]
    for li, n in enumerate(repeats):
        for bi in range(n):
            p = f"layer{li + 1}.{bi}"
            stride = 2 if bi == 0 and li > 0 else 1
            if depth == 18:
                y = g.node("Relu", [g.conv_bn(x, p + ".conv1", p + ".bn1", stride, [1, 1, 1, 1])])
                y = g.conv_bn(y, p + ".conv2", p + ".bn2", 1, [1, 1, 1, 1])
            else:
                y = g.node("Relu", [g.conv_bn(x, p + ".conv1", p + ".bn1", 1, [0, 0, 0, 0])])
                y = g.node("Relu", [g.conv_bn(y, p + ".conv2", p + ".bn2", stride, [1, 1, 1, 1])])
                y = g.conv_bn(y, p + ".conv3", p + ".bn3", 1, [0, 0, 0, 0])
            skip = g.conv_bn(x, p + ".downsample.0", p + ".downsample.1", stride, [0, 0, 0, 0]) \
                if p + ".downsample.0.weight" in g.w else x
            x = g.node("Relu", [g.node("Add", [y, skip])])
    return x


STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


def same_pads(size, k, s):
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2, out


def efficientnet(g, x, hw):
    h, w = hw
    lo, hi = g.const(0.0), g.const(6.0)
    relu6 = lambda t: g.node("Clip", [t, lo, hi])

    def cbn(t, conv, bn, k, s, group, h, w):
        ph0, ph1, oh = same_pads(h, k, s)
        pw0, pw1, ow = same_pads(w, k, s)
        return g.conv_bn(t, conv, bn, s, [ph0, pw0, ph1, pw1], group, eps=1e-3), oh, ow

    x, h, w = cbn(x, "_conv_stem", "_bn0", 3, 2, 1, h, w)
    x = relu6(x)
    i, cin = 0, 32
    for e, k, s0, cout, r in STAGES:
        for j in range(r):
            b, s = f"_blocks.{i}", (s0 if j == 0 else 1)
            y, mid = x, cin * e
            if e != 1:
                y, _, _ = cbn(y, b + "._expand_conv", b + "._bn0", 1, 1, 1, h, w)
                y = relu6(y)
            y, oh, ow = cbn(y, b + "._depthwise_conv", b + "._bn1", k, s, mid, h, w)
            y = relu6(y)
            y, _, _ = cbn(y, b + "._project_conv", b + "._bn2", 1, 1, 1, oh, ow)
            x = g.node("Add", [y, x]) if s == 1 and cin == cout else y
            h, w, cin, i = oh, ow, cout, i + 1
    x, _, _ = cbn(x, "_conv_head", "_bn1", 1, 1, 1, h, w)
    return relu6(x)


def read_safetensors_metadata(path):
    """The `__metadata__` map of a safetensors file (histolens keeps its JSON under "histolens")."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__", {})


def backbone(g, x, arch, hw):
    """The feature map of a backbone the builders above know (ResNet-18/50, EfficientNet-Lite0)."""
    if arch in ("resnet18", "resnet50"):
        return resnet(g, x, int(arch[6:]))
    if arch == "efficientnet-lite0":
        return efficientnet(g, x, hw)
    raise ValueError(f"no ONNX builder for {arch}")


def magnification_head(g, pooled, m, prefix="head."):
    """Hagnifinder's head at inference (src/nn/hagnifinder.rs): fc1 -> fc2 -> x m -> tanh -> fc3, (N,)."""
    def fc(t, name):
        return g.node("Gemm", [t, g.const(g.w[prefix + name + ".weight"]), g.const(g.w[prefix + name + ".bias"])],
                      transB=1)

    y = fc(fc(pooled, "fc1"), "fc2")
    y = g.node("Tanh", [g.node("Mul", [y, g.const(np.float32(m))])])
    shape = g.name("shape")
    g.inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), shape))
    return g.node("Reshape", [fc(y, "fc3"), shape])


def hagnifinder_model(weights, arch, size, m):
    """A whole Hagnifinder model (backbone, global average pool, head with the constant m) as an ONNX
    model taking normalised images (N, 3, size, size) and giving the regression output (N,). `weights`
    are a histolens magnification checkpoint's tensors (`backbone.*`, `head.*`)."""
    w = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
    w.update({k: v for k, v in weights.items() if k.startswith("head.")})
    g = Graph(w)
    feat = backbone(g, "input", arch, (size, size))
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [feat])])
    out = magnification_head(g, pooled, m)
    graph = helper.make_graph(g.nodes, "hagnifinder-" + arch,
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N"])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("arch")
    ap.add_argument("checkpoint")
    ap.add_argument("io")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--save-onnx")
    a = ap.parse_args()
    weights, io = read_safetensors(a.checkpoint), read_safetensors(a.io)
    x = io["input"]
    g = Graph(weights)
    if a.arch in ("resnet18", "resnet50"):
        feat = resnet(g, "input", int(a.arch[6:]))
    elif a.arch == "efficientnet-lite0":
        feat = efficientnet(g, "input", x.shape[2:])
    else:
        sys.exit(f"no ONNX builder for {a.arch}")
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [feat])])
    graph = helper.make_graph(g.nodes, a.arch, [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info(pooled, TensorProto.FLOAT, [x.shape[0], None])], g.inits)
    # IR version 8 (ONNX 1.10+) is read by every onnxruntime release still in use.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    if a.save_onnx:
        onnx.save(model, a.save_onnx)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (ref,) = sess.run(None, {"input": x})
    ours = io["pooled"]
    rel = float(np.abs(ref - ours).max() / max(np.abs(ref).max(), 1e-12))
    print(json.dumps({"arch": a.arch, "max_relative_difference": rel, "shape": list(ref.shape)}))
    sys.exit(0 if rel <= a.tol else 1)


if __name__ == "__main__":
    main()
