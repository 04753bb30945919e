"""Where the onnx backend's programs go wrong on ONNX Runtime's CUDA provider (GPU, onnxruntime-gpu).

Exports a tiny preset's prefill and decode programs in fp16 as `--backend onnx --device cuda` builds
them, then runs each optimized model three ways against the transformed graph run by PyTorch: the CPU
provider through session.run, the CUDA provider through session.run, and the CUDA provider through the
executor's I/O binding (present caches in the past caches' memory); prints the largest logits
difference of each. The decode program runs twice: with its attention as GroupQueryAttention and in
standard ops (what a CUDA build's decode program holds). For the GroupQueryAttention decode program,
every node's outputs on the CUDA provider are then compared with the CPU provider's (same model, same
inputs, session.run), in graph order: the first nodes whose outputs differ are where the CUDA
provider goes wrong.
Usage: python benchmarks/onnx_cuda_check.py [preset]  (default llama-tiny)
"""

import sys
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

from oiv2compile.backends import onnx as ob
from oiv2compile.capture import DECODE, PREFILL, CacheSpec, capture
from oiv2compile.config import Backend, BuildConfig, Device, DType
from oiv2compile.models import load_model
from oiv2compile.passes import pipeline, run_passes


def _run(mode, path, names, ids, positions, last_index, caches):  # type: ignore[no-untyped-def]
    if mode == "cuda-bind":
        program = ob.OnnxProgram(path, names, torch.device("cuda"))
        slots = torch.arange(ids.shape[0], device="cuda")
        return program(ids, positions, slots, last_index, [c.clone() for c in caches]).float().cpu()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=ob._providers(mode == "cuda-run"))
    values = (ids, positions, last_index, *caches)
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names["inputs"], values, strict=True)}
    return torch.from_numpy(session.run(["logits"], feeds)[0]).float()


def node_diffs(path, names, ids, positions, last_index, caches, limit=12):  # type: ignore[no-untyped-def]
    """Print the nodes whose outputs differ between the CPU and CUDA providers (floats relative to the
    output's largest magnitude, integers exactly), first `limit` of them in graph order, and the op
    types of all."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    known = {o.name for o in model.graph.output}
    producers = {}
    for node in model.graph.node:
        for out in node.output:
            if out and out not in known:
                model.graph.output.append(onnx.ValueInfoProto(name=out))
                producers[out] = node
    probe = path.with_name("probe_" + path.name)  # beside the original: its external weights resolve
    onnx.save(model, str(probe))
    values = (ids, positions, last_index, *caches)
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names["inputs"], values, strict=True)}
    results = {}
    for cuda in (False, True):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(probe), options, providers=ob._providers(cuda))
        outs = [o.name for o in session.get_outputs()]
        results[cuda] = dict(zip(outs, session.run(outs, feeds), strict=True))
    shown, bad_types = 0, {}
    for name, node in producers.items():
        a, b = results[False].get(name), results[True].get(name)
        if a is None or b is None or a.dtype.kind not in "fciub" or a.size == 0:
            continue
        if a.shape != b.shape or a.dtype.kind in "iub":  # integers (lengths, indices) must be equal
            rel = 0.0 if a.shape == b.shape and (a == b).all() else float("inf")
        else:
            a64, b64 = torch.from_numpy(a).double(), torch.from_numpy(b).double()
            rel = float((a64 - b64).abs().max()) / max(float(a64.abs().max()), 1e-6)
        if rel > 2e-2:
            bad_types[node.op_type] = bad_types.get(node.op_type, 0) + 1
            if shown < limit:
                inputs = ", ".join(node.input)
                where = f"{node.op_type} {node.domain} {node.name} -> {name} {list(a.shape)}"
                print(f"  differs: {where} rel {rel:.3g} ({inputs})")
                shown += 1
    print("  op types with differing outputs:", bad_types, flush=True)


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else "llama-tiny"
    cfg = BuildConfig(
        backend=Backend.ONNX, device=Device.CUDA, dtype=DType.FLOAT16, max_batch_size=4, max_seq_len=64
    ).resolve(cuda_available=True)
    hf = load_model(preset, dtype=torch.float16, device="cuda", seed=0).model
    spec = CacheSpec.for_model(hf.config, max_seq_len=64, max_batch_size=4, dtype=torch.float16)
    runs = [(PREFILL, False), (DECODE, False), (DECODE, True)]  # (program, attention in standard ops)
    for prog, standard in runs:
        captured = capture(hf, spec, prog)
        run_passes(captured.graph_module, cfg, pipeline(cfg), label=prog.name)
        gm, inputs, shapes, names = ob.functional_program(captured)
        folder = Path(tempfile.mkdtemp())
        raw, path = folder / "raw.onnx", folder / f"{prog.name}.onnx"
        ob._export(gm, inputs, shapes, names, standard).save(str(raw), external_data=True)
        ob._optimize(raw, path, cfg)
        ids, _positions, last_index, *caches = inputs
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 200, ids.shape, generator=gen).cuda()
        caches = [torch.randn(c.shape, generator=gen).to(c) for c in caches]
        for pos in ([3, 3], [3, 9], [0, 0]) if prog is DECODE else ([0, 0],):
            positions = torch.tensor(pos[: ids.shape[0]], device="cuda")
            with torch.no_grad():
                want = gm(ids, positions, last_index, *caches)[0].float().cpu()
            diffs = {}
            for mode in ("cpu-run", "cuda-run", "cuda-bind"):
                try:
                    got = _run(mode, path, names, ids, positions, last_index, caches)
                    diffs[mode] = f"{float((got - want).abs().max()):.3g}"
                except Exception as exc:  # report every mode, whatever one of them raises
                    diffs[mode] = f"error {str(exc)[:200]}"
            label = f"{prog.name} ({'standard ops' if standard else 'GroupQueryAttention'})"
            print(label, pos, "max|want|", f"{float(want.abs().max()):.3g}", diffs, flush=True)
            if prog is DECODE and pos == [3, 9] and not standard:
                node_diffs(path, names, ids, positions, last_index, caches)


if __name__ == "__main__":
    main()
