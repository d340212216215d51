#!/usr/bin/env python3
"""Baseline for `histolens bench model`: the same backbones with the same weights (written by
`histolens bench model --save-dir DIR`) built as ONNX graphs and run by onnxruntime on the CPU.

usage: onnxruntime_baseline.py DIR THREADS SIZE ITERS BATCH[,BATCH...] ARCH[,ARCH...]"""
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "parity"))
import onnx_parity as op  # noqa: E402


def model_bytes(arch, weights, shape):
    g = op.Graph(weights)
    feat = op.resnet(g, "input", int(arch[6:])) if arch.startswith("resnet") else op.efficientnet(g, "input", shape[2:])
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [feat])])
    graph = helper.make_graph(g.nodes, arch, [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(pooled, TensorProto.FLOAT, [shape[0], None])], g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def main():
    d, threads, size, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    batches = [int(b) for b in sys.argv[5].split(",")]
    out = []
    for arch in sys.argv[6].split(","):
        weights = op.read_safetensors(os.path.join(d, arch + ".safetensors"))
        forward = []
        for b in batches:
            shape = (b, 3, size, size)
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            sess = ort.InferenceSession(model_bytes(arch, weights, shape), so, providers=["CPUExecutionProvider"])
            x = np.random.uniform(-2, 2, shape).astype(np.float32)
            sess.run(None, {"input": x})
            t0 = time.perf_counter()
            for _ in range(iters):
                sess.run(None, {"input": x})
            forward.append([b, b * iters / (time.perf_counter() - t0)])
        out.append({"arch": arch, "threads": threads, "forward": forward})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
