"""Run by tests/test_isa.py in a subprocess whose CPU features are restricted (library ISA switches, or an
emulated CPU): quarter-turn differences of INT8 logits on every int8 engine this process offers, as JSON.

    python tests/isa_worker.py [--engines x86,fbgemm,qnnpack] [--groups 4,12] [FILE.onnx|FILE.pte ...]

Prints one JSON object: the ATen CPU capability, whether the CPU answers AVX2, VNNI and AMX, the int8 engines
torch offers and the library's default among them, XNNPACK's widest instruction set (with a .pte), and per
engine (and per file given) the largest absolute logit difference over the quarter turns of random inputs 3x
beyond the declared input range (activations leave their planned ranges and use all 8 bits). "unclamped" is
the x86 model with its ClampCodes removed: the control that shows whether this CPU's kernels saturate at all;
"as_written" likewise for each ONNX file run by onnxruntime with its weights as written (``quant.load_onnx``
gives its session uint8 weights where the CPU lacks VNNI, int8 ones where it has it). "cpuid_held": the level
``python -m benchmarks.isa`` holds the CPU's own answers to, or null.
"""
import json
import sys

import torch
import torch.fx as fx

import mobilenet
import quant
import rotconv
from benchmarks.isa import cpuid_held, xnnpack_isa


def network(N: int) -> torch.nn.Module:
    torch.manual_seed(N)
    model = mobilenet.mobilenet_v2(group=N, width_mult=0.5)
    with torch.no_grad():
        model.classifier[-1].weight.normal_()
    return rotconv.randomize_batchnorm(model, torch.randn(8, 3, 95, 95)).export().eval()


def without_clamps(int8: quant.Int8Model) -> quant.Int8Model:
    graph_module: fx.GraphModule = int8.graph_module
    for node in list(graph_module.graph.nodes):
        if node.op == "call_module" and isinstance(graph_module.get_submodule(node.target), quant.ClampCodes):
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)
    graph_module.recompile()
    return int8


def quarter_turn_difference(model, x: torch.Tensor) -> float:
    logits = model(x)
    return max(float((model(torch.rot90(x, k, (2, 3))) - logits).abs().max()) for k in (1, 2, 3))


def main(argv: list[str]) -> dict:
    options = {"--engines": "x86,fbgemm,qnnpack", "--groups": "4,12"}
    paths = []
    while argv:
        argument = argv.pop(0)
        if argument in options:
            options[argument] = argv.pop(0)
        else:
            paths.append(argument)
    torch.manual_seed(0)
    x = 3 * torch.randn(3, 3, 95, 95)
    report = {"capability": torch.backends.cpu.get_cpu_capability(), "vnni": rotconv.hardware.has_vnni(),
              "cpuid_held": cpuid_held(), "as_written": {}, "uint8_weights": {},
              "amx": rotconv.hardware.has_amx(), "avx2": rotconv.hardware.has_avx2(),
              "offered": list(torch.backends.quantized.supported_engines), "default_backend": quant.default_backend(),
              "engines": {}, "files": {}}
    if any(path.endswith(".pte") for path in paths):  # the kernels XNNPACK will choose from
        report["xnnpack"] = xnnpack_isa()
    for N in map(int, options["--groups"].split(",")):
        model = network(N)
        for engine in options["--engines"].split(","):
            if engine in torch.backends.quantized.supported_engines:
                int8 = quant.dfq(model, group=N, mode="int8", backend=engine, weight_scheme="symmetric",
                                 input_range=(-1.0, 1.0))
                report["engines"][f"C{N}-{engine}"] = quarter_turn_difference(int8, x)
                if engine == "x86":
                    report["engines"][f"C{N}-x86-unclamped"] = quarter_turn_difference(without_clamps(int8), x)
    for path in paths:
        model = quant.load_onnx(path) if path.endswith(".onnx") else quant.load_executorch(path)
        report["files"][path] = quarter_turn_difference(model, x)
        if path.endswith(".onnx"):
            report["uint8_weights"][path] = model.uint8_weights
            report["as_written"][path] = quarter_turn_difference(onnx_as_written(path), x)
    return report


def onnx_as_written(path: str):
    """The ONNX file in onnxruntime with its weights as written, as a function of a (B, 3, H, W) tensor."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.contiguous().numpy()})[0])


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
