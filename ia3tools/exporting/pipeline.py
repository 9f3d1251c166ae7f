"""One export, phase by phase: load the model, decide its signature, compute the torch reference,
export, shrink (int8, fp16), write, free the torch side, and prove the written graph in
onnxruntime. Each phase is timed and logged in one line."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ia3tools.errors import ExportError, OptionError
from ia3tools.exporting.parity import Generation, Parity, compare, passes, worst
from ia3tools.tasks import Task


@dataclass
class Exported:
    """What one export made, for the report."""

    exporter: str
    inputs: list[str]
    outputs: list[str]
    parity: Parity | None
    float32_weights_bytes: int  # the float32 weights the exporter wrote, before any conversion
    timings: dict[str, float] = field(default_factory=dict)
    adapter_files: list = field(default_factory=list)  # runtime adapters: runtime.AdapterFile


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 2)


def signature_for(model, task: Task, view: Path, sentence, shown: Path, with_past: bool):
    """The graph's inputs (as the tokenizer gives them) and outputs (``sentence_embedding`` too for
    a sentence-transformers model exported for feature extraction; the cache with ``with_past``)."""
    from ia3tools.exporting.graph import Signature
    from ia3tools.exporting.model import text_input_names
    from ia3tools.exporting.past import past_signature

    if with_past:
        if task.name != "causal-lm":
            raise OptionError(f"--with-past exports text-generation models (a KV cache), not {task.optimum}")
        return past_signature(model), "the cache"
    if task.inputs == "image":
        return Signature(["pixel_values"], [task.output]), "the architecture"
    names, origin = text_input_names(model, view)
    if task.inputs == "seq2seq":
        names.append("decoder_input_ids")
    if sentence is None or task.name != "feature-extraction" or sentence.pooling is None:
        return Signature(names, [task.output]), origin
    other = [m for m in sentence.modules[1:] if m.kind not in ("Pooling", "Normalize")]
    if other:
        raise ExportError(f"sentence-transformers module {other[0].path or other[0].name} ({other[0].kind}) cannot "
                          "be exported: only Pooling and Normalize follow the Transformer", path=shown / "modules.json")
    if "attention_mask" not in names:
        raise ExportError("pooling needs the attention mask, which this model's inputs lack", path=shown)
    return Signature(names, [task.output, "sentence_embedding"], sentence.pooling, sentence.normalize), origin


def run_export(view: Path, source: Path, onnx_path: Path, work: Path, task: Task, options, log, out: Path,
               shown: Path, sentence, runtime=None) -> Exported:
    """Export into ``onnx_path`` (in staging), using ``work`` for intermediate files, and prove it.
    Errors name ``out``, the path the user gave, or ``shown``, the model directory. ``runtime`` (a
    ``runtime.RuntimePlan``) adds runtime adapter slots and writes the adapters' files."""
    import torch

    from ia3tools.exporting import past as kv
    from ia3tools.exporting.graph import example_inputs, export_graph, wrap
    from ia3tools.exporting.model import load_model

    timings: dict[str, float] = {}
    started = time.perf_counter()
    model = load_model(view, source, task, shown)
    signature, origin = signature_for(model, task, view, sentence, shown, options.with_past)
    holder, references = None, {}
    if runtime is not None:
        from ia3tools.exporting.slots import install

        holder = install(model, runtime.slots)
        signature.slots = [s.name for s in runtime.slots]
    if options.with_past:
        wrapper = kv.wrap_past(model, signature)
        export_in = kv.past_inputs(model, signature, 2, 4, 3, seed=0)  # distinct sizes >= 2
        prompt_ids, prompt_mask = kv.prompt(model.config.vocab_size)
        reference = kv.reference_generation(model, prompt_ids, prompt_mask)
        parity_in, mask = {"input_ids": torch.from_numpy(prompt_ids), "attention_mask": torch.from_numpy(prompt_mask)}, None
    else:
        wrapper = wrap(model, signature, holder)
        export_in, _ = example_inputs(model, signature, 2, 8, pad=False, seed=0)  # sizes 1 would be fixed
        parity_in, mask = example_inputs(model, signature, 3, 5, pad=True, seed=1)
        reference = _outputs(wrapper, signature, parity_in, runtime)
        if runtime is not None:
            from ia3tools.exporting.slots import folded

            references[None] = reference
            for adapter in runtime.adapters:  # the adapted model, folded as merge does: no slots involved
                with folded(model, adapter):
                    references[adapter.name] = _outputs(wrapper, signature, parity_in, runtime)
            export_in.update(_ones(runtime))
    timings["load_s"] = _since(started)
    log(f"loaded {task.optimum} in {timings['load_s']} s; inputs {', '.join(signature.inputs[:4])}"
        f"{' ...' if len(signature.inputs) > 4 else ''} (from {origin})")

    started = time.perf_counter()
    (work / "torchscript").mkdir(parents=True, exist_ok=True)  # where the fallback exporter writes
    exporter, program = export_graph(wrapper, signature, export_in, work / "torchscript" / "model.onnx",
                                     options.opset, log)
    timings["export_s"] = _since(started)
    log(f"exported with the {exporter} exporter (opset {options.opset}) in {timings['export_s']} s")
    ir_model = program.model if program is not None else _load_ir(work / "torchscript" / "model.onnx")
    adapter_files = []
    if runtime is not None:
        from ia3tools.exporting.runtime import write_adapters
        from ia3tools.exporting.slots import add_defaults

        add_defaults(ir_model, runtime.slots)
        adapter_files = write_adapters(onnx_path.parent, runtime.adapters)
        log(f"{len(runtime.slots)} runtime adapter slots; wrote {len(adapter_files)} adapter file(s)")
    float32_bytes = _shrink(ir_model, onnx_path, work, options, timings, log, model)
    del program, wrapper, ir_model, model  # emptied by _shrink already
    _release()

    parity = None
    if options.parity:
        started = time.perf_counter()
        parity = _prove(onnx_path, signature, parity_in, mask, reference, options, out, references)
        timings["parity_s"] = _since(started)
        worst_name, worst_stats = worst(parity.outputs)
        log(f"parity on {parity.inputs} in {timings['parity_s']} s: max abs error {_num(worst_stats.max_abs)} "
            f"({worst_name}){_figures(parity)}{_switched(parity)}")
        if not parity.passed:
            raise ExportError(f"parity check failed: {_failure(parity, options)}; nothing was published", path=out,
                              code="parity-failed")
    return Exported(exporter, signature.inputs, signature.outputs, parity, float32_bytes, timings, adapter_files)


def _ones(runtime) -> dict:
    import torch

    return {s.name: torch.ones(s.length) for s in runtime.slots}


def _outputs(wrapper, signature, feed: dict, runtime) -> list[np.ndarray]:
    """The torch outputs on ``feed`` (slots at ones: the model's own weights decide)."""
    import torch

    slots = _ones(runtime) if runtime is not None else {}
    with torch.no_grad():
        result = wrapper(*[feed[n] for n in signature.inputs], *[slots[n] for n in signature.slots])
    return [r.numpy() for r in (result if isinstance(result, tuple) else (result,))]


def _load_ir(path: Path):
    import onnx_ir as ir

    return ir.load(str(path))


def _shrink(ir_model, onnx_path: Path, work: Path, options, timings, log, model) -> int:
    """Quantize and/or convert to fp16 as asked, then write ``onnx_path``. The torch model's
    tensors are emptied as soon as the float32 graph no longer needs them."""
    from ia3tools.exporting import convert
    from ia3tools.exporting.graph import write_model

    float32_bytes = convert.float32_bytes(ir_model)
    if options.quantize:
        started = time.perf_counter()
        convert.gemm_to_matmul(ir_model)
        (work / "fp32").mkdir(parents=True)
        write_model(ir_model, work / "fp32" / "model.onnx")
        _empty(model)
        (work / "int8").mkdir()
        convert.quantize_int8(work / "fp32" / "model.onnx", work / "int8" / "model.onnx")
        ir_model = _load_ir(work / "int8" / "model.onnx")
        timings["quantize_s"] = _since(started)
        log(f"quantized the weights to int8 in {timings['quantize_s']} s")
    if options.dtype == "fp16":
        convert.to_fp16(ir_model)
    started = time.perf_counter()
    write_model(ir_model, onnx_path)
    timings["save_s"] = _since(started)
    log(f"saved {onnx_path.name} and its data{' in fp16' if options.dtype == 'fp16' else ''} in {timings['save_s']} s")
    _empty(model)
    return float32_bytes


def _empty(model) -> None:
    """Free the weights before onnxruntime loads the export: empty every tensor in place, so that no
    reference the exporter keeps to the model (its rewriters remember the last graph) keeps them."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = torch.empty(0, dtype=tensor.dtype)


def _release() -> None:
    from ia3tools.exporting.graph import release_exporter_state

    release_exporter_state()
    release_freed_memory()


def release_freed_memory() -> None:
    """Hand memory freed by the process back to the system (glibc keeps freed blocks below its
    mmap threshold, about half of a model's weights, in its heap otherwise)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def _precision(options) -> str:
    return "int8" if options.quantize else options.dtype


def _prove(onnx_path: Path, signature, parity_in: dict, mask, reference, options, out: Path,
           references: dict | None = None) -> Parity:
    from ia3tools.exporting import past as kv
    from ia3tools.exporting.parity import session
    from ia3tools.exporting.runtime import prove_switching

    switching = None
    try:
        sess = session(onnx_path)
        if options.with_past:
            ids, prompt_mask = parity_in["input_ids"].numpy(), parity_in["attention_mask"].numpy()
            ref_tokens, ref_logits = reference
            tokens, _ = kv.greedy(sess, signature, ids, prompt_mask, kv.NEW_TOKENS)
            _, logits = kv.greedy(sess, signature, ids, prompt_mask, kv.NEW_TOKENS, forced=ref_tokens)
        else:
            feed = {k: v.numpy() for k, v in parity_in.items()}
            got = sess.run(None, feed)
            if references:
                names = [n for n in references if n is not None]
                switching = prove_switching(sess, onnx_path.parent, names, feed, mask, signature.outputs, references,
                                            options.atol)
    except Exception as exc:  # onnxruntime's errors (Fail, InvalidGraph, ...) share no base class
        hint = "; try --opset 18" if options.opset != 18 else ""
        raise ExportError(f"onnxruntime cannot run the export: {str(exc).strip().splitlines()[0]}{hint}; "
                          "nothing was published", path=out, code="onnxruntime") from None
    precision = _precision(options)
    shapes = {k: list(v.shape) for k, v in parity_in.items()}
    if options.with_past:
        stats = compare(np.stack(ref_logits), np.stack(logits), None, logits=True)
        equal = bool((tokens == ref_tokens).all())
        generation = Generation(ids.shape[0], ids.shape[1], kv.NEW_TOKENS, equal, stats.top1)
        passed = passes(stats, precision, options.atol, True) and (equal or precision != "fp32")
        return Parity({"logits": stats}, options.atol, passed, shapes, generation)
    errors = {name: compare(ref, g, mask, logits=name == "logits")
              for name, ref, g in zip(signature.outputs, reference, got)}
    passed = all(passes(e, precision, options.atol, name == "logits") for name, e in errors.items())
    if switching is not None:
        passed = passed and all(step.passed for step in switching)
    return Parity(errors, options.atol, passed, shapes, switching=switching)


def _figures(parity: Parity) -> str:
    parts = []
    logits = parity.outputs.get("logits")
    if logits is not None and logits.top1 is not None:
        parts.append(f"top-1 agreement {logits.top1:.1%}")
    if parity.generation is not None:
        parts.append(f"greedy tokens {'equal' if parity.generation.tokens_equal else 'differ'}")
    return ", " + ", ".join(parts) if parts else ""


def _switched(parity: Parity) -> str:
    if not parity.switching:
        return ""
    largest = worst({i: worst(step.outputs)[1] for i, step in enumerate(parity.switching)})[1]
    order = " -> ".join(step.adapter or "none" for step in parity.switching)
    return f"; switching {order}: max abs error {_num(largest.max_abs)}"


def _failure(parity: Parity, options) -> str:
    precision = _precision(options)
    name, worst_stats = worst(parity.outputs)
    bad = next((step for step in parity.switching or [] if not step.passed), None)
    if bad is not None and all(passes(e, precision, options.atol, n == "logits") for n, e in parity.outputs.items()):
        out, e = worst(bad.outputs)
        return (f"with runtime adapter {bad.adapter or 'none'} active, max abs error {_num(e.max_abs)} on {out} "
                f"exceeds --atol {options.atol:g}")
    if precision == "fp32":
        if parity.generation is not None and not parity.generation.tokens_equal:
            return "greedy decoding in onnxruntime gives other tokens than transformers' generate"
        return f"max abs error {_num(worst_stats.max_abs)} on {name} exceeds --atol {options.atol:g}"
    return f"{precision} changes the outputs too much ({_figures(parity).lstrip(', ') or 'non-finite outputs'})"


def _num(x: float | None) -> str:
    return "inf" if x is None else f"{x:.3g}"

