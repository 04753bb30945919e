"""ONNX Runtime: each program is exported to ONNX and optimized by ONNX Runtime at build time.

lower:  the transformed graph → functional form (per layer, kv_write × 2 + attention →
        oiv2::cached_attention, whose written caches become outputs) → torch.onnx.export (dynamo)
        with a translation per oiv2 op → ONNX Runtime's graph optimizations (extended level) →
        `<program>.onnx` (+ `.onnx.data`, its weights) in the artifact.
load:   an InferenceSession over the optimized model with every optimization off, run through I/O
        binding: inputs, outputs and the caches are bound to the executor's torch tensors, the
        present caches to the same memory as the past ones, so the cache stays put between steps.

Translations (what the exported graph holds, and `contrib_op_counts` counts):
    oiv2::cached_attention → com.microsoft GroupQueryAttention (one per layer), caches shared with
                             its outputs (ORT skips the copy when past and present are one buffer);
                             in the decode program of a CUDA build, standard ops instead (ScatterND
                             into the caches, MatMul/Softmax over them): ONNX Runtime's CUDA
                             GroupQueryAttention gives wrong outputs at one new token (below)
    oiv2::linear_int4      → com.microsoft MatMulNBits; the int4-grouphalves-v2 bytes are repacked
                             (in the graph, constant-folded by the optimizer) into MatMulNBits' order
    oiv2::linear_int8      → DequantizeLinear (per output channel) + MatMul, standard ops
RMSNorm becomes SimplifiedLayerNormalization through ONNX Runtime's fusion at the extended level, and
with the residual Add before it SkipSimplifiedLayerNormalization through the fusion of ONNX
Runtime's offline transformer optimizer (fuse_skip_norms).

The program contract differs in one way: cache row b belongs to sequence b (GroupQueryAttention
has no slot indirection), so a program refuses slots other than 0 .. B-1, which is what the Engine
passes on a device without CUDA graphs. The caches are bound as their first B rows.

GroupQueryAttention on CUDA: with onnxruntime-gpu 1.31.1 on an H100 (2026-11-27), the decode program's
first GroupQueryAttention node differs from the CPU provider's at every position, 0 included (where
attention sees one key), with its float inputs equal on both providers (`benchmarks/onnx_cuda_check.py`,
every node compared); the prefill program's agree to 4e-4. Setting ORT_DISABLE_FLASH_ATTENTION or
ORT_DISABLE_MEMORY_EFFICIENT_ATTENTION changed nothing. So a CUDA build's decode program attends in
standard ops, which read the whole cache (benchmarks/RESULTS.md has what that costs); prefill keeps
GroupQueryAttention. `attention_op` records which, per program, in the manifest.

Optimization level: extended, the highest whose result is portable. The `all` level adds layout
transformations for the build machine's CPU (NCHWc), which ONNX Runtime itself advises against
saving to disk for another machine.
"""

from __future__ import annotations

import importlib.util
import logging
import operator
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from oiv2compile.capture import INPUT_NAMES, CapturedProgram, Phase
from oiv2compile.config import BuildConfig, Device, DType
from oiv2compile.errors import ArtifactError, BuildError, ConfigError

log = logging.getLogger(__name__)

OPSET = 18
# Contrib ops that this backend puts (or has ONNX Runtime put) into the graph.
CONTRIB_OPS = (
    "GroupQueryAttention",
    "MatMulNBits",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
)
_REQUIRED = ("onnx", "onnxscript", "onnxruntime")
_find_spec = importlib.util.find_spec  # tests stand in a lookup that finds nothing


def check_available() -> None:
    """Raise one sentence naming the extra when the packages this backend needs are missing."""
    missing = [name for name in _REQUIRED if _find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"The onnx backend needs {', '.join(missing)}; install them with `pip install 'oiv2compile[onnx]'` "
            "(or 'oiv2compile[onnx-gpu]' for CUDA)."
        )


def check(cfg: BuildConfig) -> None:
    """Refuse, before any work, what this backend cannot build."""
    check_available()
    if cfg.dtype is DType.BFLOAT16:
        raise ConfigError("The onnx backend runs float32 or float16 models; build with --dtype float32 or float16.")
    if not (cfg.attention.enable_substitution and cfg.kv_cache.enable_rewrite):
        raise ConfigError("The onnx backend needs the KV-cache rewrite and the attention substitution enabled.")


# ---- lowering -----------------------------------------------------------------------------------


def lower(program: CapturedProgram, out_dir: Path, cfg: BuildConfig) -> dict[str, Any]:
    import onnx

    name = program.program.name
    gm, inputs, shapes, names = functional_program(program)
    standard_attention = uses_standard_attention(program, cfg)
    exported = _export(gm, inputs, shapes, names, standard_attention)
    raw = out_dir / f".{name}.raw.onnx"
    exported.save(str(raw), external_data=True)
    path = out_dir / f"{name}.onnx"
    try:
        model = onnx.load(str(raw), load_external_data=False)  # the weights stay in raw's .data file
        rewrites = rsqrt_as_division(model)
        onnx.save(model, str(raw))
        _optimize(raw, path, cfg)
        skip_norms = fuse_skip_norms(path)
    finally:
        raw.unlink(missing_ok=True)
        Path(f"{raw}.data").unlink(missing_ok=True)
    counts = contrib_op_counts(onnx.load(str(path), load_external_data=False))
    max_diff = check_against_graph(path, gm, inputs, names, cfg)
    return {
        "file": path.name,
        "backend": "onnx",
        "opset": OPSET,
        "inputs": names["inputs"],
        "outputs": names["outputs"],
        "optimization_level": "extended",
        "rsqrt_as_division": rewrites,
        "skip_norm_fusions": skip_norms,
        "contrib_ops": counts,
        "attention_op": "standard ops" if standard_attention else "GroupQueryAttention",
        "check_max_abs_diff": max_diff,
    }


def uses_standard_attention(program: CapturedProgram, cfg: BuildConfig) -> bool:
    """Whether the program's attention is exported in standard ops: the decode program of a CUDA
    build, where ONNX Runtime's GroupQueryAttention kernel is wrong (module docstring)."""
    return cfg.device is Device.CUDA and program.program.phase is Phase.DECODE


# Logits of the ONNX Runtime model against the transformed graph run by PyTorch: other kernels,
# other summation orders (a few 1e-6 seen in fp32). ONNX Runtime's int8 fusion at its default
# accuracy level (activations quantized to int8) moved fp32 logits by 5e-3, which this must catch.
_CHECK_ATOL = {DType.FLOAT32: 1e-3, DType.FLOAT16: 2e-2}


def check_against_graph(
    path: Path, gm: torch.fx.GraphModule, inputs: tuple[Any, ...], names: dict[str, list[str]], cfg: BuildConfig
) -> float:
    """Run the optimized model as the executor runs it (OnnxProgram: I/O binding, each present cache
    bound to its past cache's memory) and the functional graph on the example inputs with seeded
    token ids and random cache contents; raise BuildError when their logits differ beyond the
    dtype's tolerance. Returns the largest absolute difference.

    The binding is the engine's contract: present and past caches in one buffer, which the attention
    (GroupQueryAttention or ScatterND) writes in place; a plain session.run, with separate buffers,
    would check another."""
    ids, positions, last_index, *caches = inputs
    vocab = int(next(iter(gm.graph.find_nodes(op="output"))).args[0][0].meta["val"].shape[-1])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, ids.shape, generator=generator).to(ids.device)
    # Random past keys and values, so that a model reading the wrong cache positions fails too.
    caches = [torch.randn(c.shape, generator=generator).to(device=c.device, dtype=c.dtype) for c in caches]
    with torch.no_grad():
        expected = gm(ids, positions, last_index, *caches)[0].float().cpu()
    device = ids.device if cfg.device is Device.CUDA else torch.device("cpu")
    program = OnnxProgram(path, names, device)
    slots = torch.arange(ids.shape[0], device=device)
    bound = [c.to(device).clone() for c in caches]  # written in place by the run
    got = program(ids.to(device), positions.to(device), slots, last_index.to(device), bound).float().cpu()
    diff = float((got - expected).abs().max())
    tolerance = _CHECK_ATOL[cfg.dtype] * (1.0 + float(expected.abs().max()))
    if not diff <= tolerance:  # NaN fails too
        raise BuildError(
            f"The ONNX Runtime model {path.name} differs from the transformed graph by {diff:.3g} in its logits "
            f"(tolerance {tolerance:.3g}); build with another backend and report this."
        )
    return diff


def functional_program(
    program: CapturedProgram,
) -> tuple[torch.fx.GraphModule, tuple[Any, ...], dict[str, Any], dict[str, list[str]]]:
    """The program without in-place ops: a new GraphModule (sharing the weights) taking input_ids,
    positions, last_index and the caches, returning logits and the written caches; its example
    inputs, dynamic shapes and ONNX input and output names."""
    import oiv2compile.kernels.cached_attention  # noqa: F401  (registers the op inserted below)

    src = program.graph_module
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    flat_out = graph.graph_copy(src.graph, env)  # plain codegen: forward takes the flat placeholders
    outputs = list(flat_out) if isinstance(flat_out, (list, tuple)) else [flat_out]
    if len(outputs) != 1:
        raise BuildError(f"{program.program.name} returns {len(outputs)} values; the onnx backend expects logits.")
    placeholders = {n.meta.get("oiv2", {}).get("role", n.name): n for n in graph.find_nodes(op="placeholder")}
    caches = [n for n in graph.find_nodes(op="placeholder") if n.meta.get("oiv2", {}).get("role", "").endswith("cache")]
    writes = {n.args[0]: n for n in graph.find_nodes(op="call_function", target=torch.ops.oiv2.kv_write.default)}
    attentions = list(graph.find_nodes(op="call_function", target=torch.ops.oiv2.attention.default))
    if len(attentions) * 2 != len(caches) or len(writes) != len(caches):
        raise BuildError(
            f"{program.program.name} has {len(attentions)} attention and {len(writes)} cache-write ops for "
            f"{len(caches) // 2} layers; the onnx backend needs one of each per layer and cache."
        )
    written: dict[torch.fx.Node, torch.fx.Node] = {}
    for attn in attentions:
        q, k_cache, v_cache, _slots, positions, scale = attn.args
        q_val = q.meta["val"]  # [B, Hq, S, D]
        kv_heads = k_cache.meta["val"].shape[1]
        with graph.inserting_before(attn):
            fused = graph.call_function(
                torch.ops.oiv2.cached_attention.default,
                (
                    q,
                    writes[k_cache].args[1],
                    writes[v_cache].args[1],
                    k_cache,
                    v_cache,
                    positions,
                    float(scale),
                    int(q_val.shape[1]),
                    int(kv_heads),
                ),
            )
            out = graph.call_function(operator.getitem, (fused, 0))
            written[k_cache] = graph.call_function(operator.getitem, (fused, 1))
            written[v_cache] = graph.call_function(operator.getitem, (fused, 2))
        out.meta["val"] = attn.meta.get("val")
        attn.replace_all_uses_with(out)
        graph.erase_node(attn)
    for write in writes.values():
        graph.erase_node(write)
    slots = placeholders["slots"]
    for user in list(slots.users):  # the batch size, read from slots: read it from input_ids
        if user.target is torch.ops.aten.sym_size.int and user.args[1] == 0:
            user.args = (placeholders["input_ids"], 0)
    for node in [slots, *caches]:
        others = [u for u in node.users if u.target is not torch.ops.oiv2.cached_attention.default]
        if others:
            raise BuildError(
                f"{program.program.name} reads {node.name} outside the cache ops ({others[0].format_node()}); "
                "the onnx backend cannot export it."
            )
    graph.erase_node(slots)
    graph.output((outputs[0], *[written[c] for c in caches]))
    graph.lint()
    gm = torch.fx.GraphModule(program.graph_module, graph)

    ids, positions, _slots, last_index, cache_values = program.example_inputs
    batch = ids.shape[0]
    inputs = (ids, positions, last_index, *[c[:batch].contiguous() for c in cache_values])
    id_shape, per_seq, _, _, _ = program.dynamic_shapes
    batch_dim = per_seq[0] if per_seq else None
    cache_shape = {0: batch_dim} if batch_dim is not None else None
    cache_names = [_cache_name(i) for i in range(len(caches))]
    arg_names = [n.name for n in graph.find_nodes(op="placeholder")]
    shapes = dict(zip(arg_names, (id_shape, per_seq, per_seq, *[cache_shape] * len(caches)), strict=True))
    names = {
        "inputs": [n for n in INPUT_NAMES if n != "slots"] + [f"past_{c}" for c in cache_names],
        "outputs": ["logits", *[f"present_{c}" for c in cache_names]],
    }
    return gm, inputs, shapes, names


def _cache_name(i: int) -> str:
    return f"{'key' if i % 2 == 0 else 'value'}_{i // 2}"


def _export(
    gm: torch.fx.GraphModule,
    inputs: tuple[Any, ...],
    shapes: dict[str, Any],
    names: dict[str, list[str]],
    standard_attention: bool = False,
) -> Any:
    from oiv2compile.backends import _onnx_translations

    with torch.no_grad():
        return torch.onnx.export(
            gm,
            inputs,
            dynamo=True,
            dynamic_shapes=shapes,
            input_names=names["inputs"],
            output_names=names["outputs"],
            custom_translation_table=_onnx_translations.table(standard_attention),
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )


def rsqrt_as_division(model: Any) -> int:
    """x * Reciprocal(Sqrt(v)) → x / Sqrt(v), in place; returns how many products it rewrote.

    torch.onnx writes aten.rsqrt as Reciprocal(Sqrt), but ONNX Runtime's SimplifiedLayerNormFusion
    (RMSNorm → SimplifiedLayerNormalization, and with the residual Add before it
    SkipSimplifiedLayerNormalization) matches Pow, ReduceMean, Add, Sqrt, Div, Mul only."""
    nodes = list(model.graph.node)
    producer = {out: n for n in nodes for out in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    count = 0
    for n in nodes:
        if n.op_type != "Reciprocal" or n.domain or producer.get(n.input[0]) is None:
            continue
        if producer[n.input[0]].op_type != "Sqrt" or n.output[0] in graph_outputs:
            continue
        users = consumers.get(n.output[0], [])
        if not users or any(u.op_type != "Mul" or u.domain or list(u.input).count(n.output[0]) != 1 for u in users):
            continue
        for mul in users:
            other = mul.input[1] if mul.input[0] == n.output[0] else mul.input[0]
            mul.op_type = "Div"
            del mul.input[:]
            mul.input.extend([other, n.input[0]])
            count += 1
        model.graph.node.remove(n)
    return count


def fuse_skip_norms(path: Path) -> int:
    """Residual Add + SimplifiedLayerNormalization → SkipSimplifiedLayerNormalization, in the saved
    model; returns how many it fused. ONNX Runtime's session optimizer has no such fusion; its offline
    transformer optimizer (onnxruntime.transformers, in the same wheel) has, and is run here on its own.
    The Add's sum, which the next residual reads, becomes the fused node's fourth output."""
    import onnx
    from onnxruntime.transformers.fusion_skiplayernorm import FusionSkipLayerNormalization
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(path), load_external_data=False))  # weights stay in the .data file
    before = sum(n.op_type == "SimplifiedLayerNormalization" for n in model.model.graph.node)
    # Without shape inference the fusion takes the Add's second input as the skip; both are [B, S, H] here.
    FusionSkipLayerNormalization(
        model, "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", shape_infer=False
    ).apply()
    after = sum(n.op_type == "SimplifiedLayerNormalization" for n in model.model.graph.node)
    onnx.save(model.model, str(path))
    return before - after


def _optimize(raw: Path, path: Path, cfg: BuildConfig) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{path.name}.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    # The optimizer fuses our int8 DequantizeLinear + MatMul into MatMulNBits with this accuracy
    # level; its default (4) quantizes the activations to int8 too, which moved fp32 logits by ~1%.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    ort.InferenceSession(str(raw), options, providers=_providers(cfg.device is Device.CUDA))


def contrib_op_counts(model: Any) -> dict[str, int]:
    """How many nodes of each com.microsoft op the model's main graph holds."""
    counts = Counter(n.op_type for n in model.graph.node if n.domain == "com.microsoft")
    return dict(sorted(counts.items()))


def _providers(cuda: bool) -> list[str]:
    import onnxruntime as ort

    if cuda:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError(
                "ONNX Runtime here has no CUDAExecutionProvider; install 'oiv2compile[onnx-gpu]' "
                "(onnxruntime-gpu instead of onnxruntime)."
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# ---- loading ------------------------------------------------------------------------------------


def load(artifact_dir: Path, entry: dict[str, Any], weights: dict[str, torch.Tensor]) -> Any:
    check_available()
    device = next(iter(weights.values())).device if weights else torch.device("cpu")
    return OnnxProgram(artifact_dir / entry["file"], entry, device)


class OnnxProgram:
    """program(input_ids, positions, slots, last_index, caches) -> logits, through ONNX Runtime."""

    def __init__(self, path: Path, entry: dict[str, Any], device: torch.device) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Optimized at build time; loading does no graph work.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # The engine runs torch ops (sampling) between steps on the same cores: ONNX Runtime's
        # worker threads must not keep spinning after a step returns.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Errors only: ONNX Runtime warns once per ScatterND node at load (that duplicate indices are
        # unordered; ours never repeat) and of the Memcpy nodes it placed; its errors still raise.
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=_providers(device.type == "cuda"))
        except Exception as exc:  # ORT raises its own exception types for unreadable models
            raise ArtifactError(f"{path} could not be loaded by ONNX Runtime ({exc}); rebuild the artifact.") from None
        self.device = device
        self.inputs: list[str] = entry["inputs"]
        self.outputs: list[str] = entry["outputs"]
        self._device_type = "cuda" if device.type == "cuda" else "cpu"
        self._device_id = device.index or 0

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        last_index: torch.Tensor,
        caches: list[torch.Tensor],
    ) -> torch.Tensor:
        batch = input_ids.shape[0]
        if self.device.type == "cpu" and not torch.equal(slots, torch.arange(batch, device=slots.device)):
            raise AssertionError("onnx programs serve cache rows 0 .. B-1; the engine passed other slots")
        binding = self.session.io_binding()
        logits_dtype = caches[0].dtype
        vocab = self._vocab()
        logits = torch.empty((batch, vocab), dtype=logits_dtype, device=self.device)
        tensors = [input_ids.contiguous(), positions.contiguous(), last_index.contiguous()]
        for name, tensor in zip(self.inputs, tensors, strict=False):
            self._bind(binding.bind_input, name, tensor)
        for i, cache in enumerate(caches):
            rows = cache[:batch]  # [B, Hkv, T, D]: a contiguous prefix of the cache
            self._bind(binding.bind_input, self.inputs[3 + i], rows)
            self._bind(binding.bind_output, self.outputs[1 + i], rows)
        self._bind(binding.bind_output, self.outputs[0], logits)
        self.session.run_with_iobinding(binding)
        return logits

    def _vocab(self) -> int:
        shape = self.session.get_outputs()[0].shape
        if not isinstance(shape[-1], int):
            raise ArtifactError("The onnx program's logits have no fixed vocabulary size; rebuild the artifact.")
        return shape[-1]

    def _bind(self, bind: Any, name: str, tensor: torch.Tensor) -> None:
        import numpy as np

        element = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[tensor.dtype]
        bind(name, self._device_type, self._device_id, element, list(tensor.shape), tensor.data_ptr())
