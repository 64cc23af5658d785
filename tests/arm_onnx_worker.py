"""Run by tests/test_isa.py on an emulated ARM CPU (``python -m benchmarks.emulated_arm run``), where there is
numpy and onnxruntime but no torch: each ONNX file given in a plain onnxruntime session (full graph
optimisation), the largest absolute logit change over the quarter turns of 3 random inputs 3x beyond the input
range, and the largest logit, as one JSON object with the machine and onnxruntime's version.

    python tests/arm_onnx_worker.py FILE.onnx [FILE.onnx ...]
"""
import json
import platform
import sys

import numpy as np
import onnxruntime


def main(paths: list[str]) -> dict:
    x = (3 * np.random.default_rng(0).standard_normal((3, 3, 95, 95))).astype(np.float32)
    report = {"machine": platform.machine(), "onnxruntime": onnxruntime.__version__, "files": {}}
    for path in paths:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        logits = session.run(None, {name: x})[0]
        turned = [session.run(None, {name: np.ascontiguousarray(np.rot90(x, k, (2, 3)))})[0] for k in (1, 2, 3)]
        report["files"][path] = {"quarter_turn": max(float(np.abs(t - logits).max()) for t in turned),
                                 "largest_logit": float(np.abs(logits).max())}
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
