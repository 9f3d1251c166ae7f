"""Human-readable rendering of the library's reports (``--json`` prints ``report.to_json()``).

Each ``render_*`` returns ``(result, summary)``: the lines that are the command's result, and
the summary line that ``--quiet`` leaves out."""

from __future__ import annotations

import json

from ia3tools.errors import printable


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def count(n: int, word: str) -> str:
    """'1 shard', '2 shards'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """Left-aligned text columns, numbers right-aligned (``align``: one 'l'/'r' per column)."""
    cells = [[str(c) for c in headers]] + [["-" if c is None else printable(str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" * len(headers)
    lines = []
    for r in cells:
        parts = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _names(value) -> str:
    return value if isinstance(value, str) else ", ".join(value) or "-"


def render_inspect(r) -> tuple[str, str | None]:
    return (render_adapter(r) if r.kind == "adapter" else render_checkpoint(r)), None


def render_adapter(r) -> str:
    c = r.config
    lines = [
        f"adapter      {r.path} ({r.weights_file})",
        f"task         {c.task_type or '-'}   base: {c.base_model_name_or_path or '-'}",
        f"targets      {_names(c.target_modules)}",
        f"feedforward  {_names(c.feedforward_modules)}   fan_in_fan_out: {str(c.fan_in_fan_out).lower()}",
        f"vectors      {r.vectors} ({r.parameters:,} parameters)",
        f"heads        {', '.join(h.name + str(h.shape) for h in r.heads) or '-'}",
        "",
    ]
    rows = [
        [g.group, g.vectors, g.length if isinstance(g.length, int) else "/".join(map(str, g.length)), g.scales,
         _num(g.mean), _num(g.std), _num(g.min), _num(g.max), g.near_zero, g.nan, g.inf]
        for g in r.groups
    ]
    headers = ["group", "n", "length", "scales", "mean", "std", "min", "max", f"|x|<{r.near_zero_threshold:g}",
               "nan", "inf"]
    lines.append(table(headers, rows, "lrrlrrrrrrr"))
    return printable_lines(lines)


def printable_lines(lines: list[str]) -> str:
    return "\n".join(printable(line) for line in "\n".join(lines).split("\n"))


def render_checkpoint(r) -> str:
    lines = [
        f"checkpoint  {r.path} ({r.format}, {count(len(r.shards), 'shard')})",
        f"tensors     {r.tensors:,}   parameters: {r.parameters:,}   size: {human_bytes(r.bytes)}",
        "",
        table(["dtype", "tensors", "parameters", "bytes"],
              [[d.dtype, d.tensors, f"{d.parameters:,}", f"{d.bytes:,}"] for d in r.dtypes], "lrrr"),
    ]
    if r.sharded:
        lines += ["", table(["shard", "tensors", "bytes"], [[s.name, s.tensors, f"{s.bytes:,}"] for s in r.shards],
                            "lrr")]
    return printable_lines(lines)


def render_check(r) -> tuple[str, str | None]:
    result = "\n".join(f.line() for f in r.errors)
    heads = f", {len(r.heads)} head tensor(s)" if r.heads else ""
    summary = f"ok: {len(r.folds)} vectors fit{heads} ({r.names})" if r.ok else \
        f"does not fit: {len(r.errors)} problem(s)"
    return result, summary


def render_merge(r) -> tuple[str, str | None]:
    shards = count(len(r.shards), "shard")
    if r.dry_run:
        where = r.output or "the output"
        lines = [f"dry run: would write {where} ({shards}, {human_bytes(r.bytes)}); nothing written",
                 f"names: {r.plan.names}", ""]
        rows = [[f.module, f.weight, f.scales + (" + bias" if f.bias else ""), f.length] for f in r.plan.folds]
        lines.append(table(["module", "base tensor", "scales", "length"], rows, "lllr"))
        for h in r.plan.heads:
            lines.append(f"head {h.name} -> {h.output} ({'replaces ' + h.replaces if h.replaces else 'added'})")
        return printable_lines(lines), None
    heads = ""
    if r.heads_added or r.heads_replaced:
        heads = f", {r.heads_added} head tensor(s) added, {r.heads_replaced} replaced"
    lines = [
        f"merged {r.folded} tensors of {r.tensors}{heads} -> {r.output} ({shards}, {human_bytes(r.bytes)}) "
        f"on {r.device}",
        f"adapter sha256 {r.adapter_sha256}",
    ]
    if r.tokenizer_from == "adapter":
        lines.append("tokenizer and chat template from the adapter (--tokenizer-from base keeps the base's)")
    return "", printable_lines(lines)


def render_verify(r) -> tuple[str, str | None]:
    lines = []
    for d in r.differences:
        if d.problem == "differs":
            error = "not finite" if d.max_abs_error is None else f"{d.max_abs_error:.6g}"
            lines.append(f"differs: {d.tensor} (max abs error {error})")
        elif d.problem == "shape or dtype":
            lines.append(f"differs: {d.tensor} (expected {d.expected}, found {d.found})")
        else:
            lines.append(f"{d.problem}: {d.tensor}")
    if r.ok:
        summary = f"identical: {r.tensors} tensors ({r.folded} folded) match base ⊙ adapter bit for bit"
    else:
        summary = f"not identical: {len(r.differences)} tensor(s) differ, are missing or extra"
    return printable_lines(lines), summary


def render_blend(r) -> tuple[str, str | None]:
    weights = ", ".join(f"{s.weight:g} x {s.path}" for s in r.sources)
    partial = f", {r.partial_modules} missing from some ({r.missing})" if r.partial_modules else ""
    heads = f", heads: {', '.join(r.heads)}" if r.heads else ""
    return "", printable(f"blended {r.modules} modules{partial}{heads} -> {r.output} ({r.method}: {weights})")


def render_export(r) -> tuple[str, str | None]:
    size = human_bytes(sum(r.files.values()))
    kind = ", ".join(filter(None, ["with past" if r.with_past else "", r.dtype if r.dtype != "fp32" else "",
                                   r.quantize or ""]))
    lines = [f"exported {r.task}{f' ({kind})' if kind else ''} -> {r.output} ({r.exporter} exporter, opset {r.opset}, "
             f"{size})"]
    if r.dtype != "fp32" or r.quantize:
        lines.append(f"weights: {human_bytes(r.weights_bytes)}, {r.size_ratio:.2f}x the float32 "
                     f"{human_bytes(r.float32_weights_bytes)}")
    if r.parity:
        p = r.parity
        shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in p.inputs.items())
        exact = r.dtype == "fp32" and not r.quantize
        for name, e in p.outputs.items():
            extra = "" if e.top1 is None or exact else f", top-1 agreement {e.top1:.1%}"
            if not exact and e.top1 is None and e.cosine is not None:
                extra = f", cosine {e.cosine:.4f}"
            lines.append(f"parity: {name} max abs error {e.max_abs:.3g}, max rel error {e.max_rel:.3g}{extra}"
                         f"{f' (atol {p.atol:g})' if exact else ''} on {shapes}")
        if p.generation:
            g = p.generation
            lines.append(f"generation: {g.new_tokens} greedy tokens for {g.batch} prompts (one left-padded): "
                         f"{'equal to' if g.tokens_equal else 'differ from'} transformers' generate")
        from ia3tools.exporting.parity import worst

        for step in p.switching or []:
            largest = worst(step.outputs)[1].max_abs
            lines.append(f"switched to {step.adapter or 'no adapter'}: max abs error "
                         f"{'inf' if largest is None else f'{largest:.3g}'} against the torch model"
                         f"{' with it folded in' if step.adapter else ''}")
    else:
        lines.append("parity: not checked (--no-parity)")
    lines += _runtime_lines(r.slots, r.runtime_adapters)
    return "", printable_lines(lines)


def _runtime_lines(slots, files) -> list[str]:
    lines = [f"runtime adapter slots: {len(slots)} ({sum(s['scales'] == 'outputs' for s in slots)} scale outputs, "
             f"{sum(s['scales'] == 'inputs' for s in slots)} inputs), all ones unless an adapter is active"] if slots else []
    return lines + [f"adapter {f.name}: {f.file} ({human_bytes(f.bytes)}, {f.vectors} vectors)" for f in files]


def render_onnx_adapter(r) -> tuple[str, str | None]:
    lines = _runtime_lines([], r.adapters)
    lines.append(f"checked in onnxruntime: each adapter runs on {r.output}'s graph")
    return "", printable_lines(lines)


def render_extract(r) -> tuple[str, str | None]:
    outputs = sum(m.scales == "outputs" for m in r.modules)
    heads = f", modules_to_save: {', '.join(r.heads)}" if r.heads else ""
    decided = {}
    for m in r.modules:
        if m.decided_by != "data":
            decided[m.decided_by] = decided.get(m.decided_by, 0) + 1
    how = "; orientation of modules that fit both ways chosen by " + ", ".join(
        f"{k} ({v})" for k, v in sorted(decided.items())) if decided else ""
    return "", printable(f"extracted {len(r.modules)} vectors ({outputs} scale outputs, {len(r.modules) - outputs} "
                         f"inputs){heads} from {r.changed} changed tensors of {r.tensors} -> {r.output}{how}")


def _value(v) -> str:
    from ia3tools.commands.diff import ABSENT

    return ABSENT if v == ABSENT else json.dumps(v, sort_keys=True)


def render_diff(r) -> tuple[str, str | None]:
    lines = []
    for d in r.differences:
        if d.problem == "values":
            size = "" if d.max_abs is None else f" (max abs {d.max_abs:.6g}, max rel {d.max_rel:.3g})"
            lines.append(f"differs: {d.tensor}: {d.elements} of {d.total} elements{size}")
        elif d.problem == "dtype-or-shape":
            lines.append(f"dtype or shape: {d.tensor}: {d.a[0]} {d.a[1]} -> {d.b[0]} {d.b[1]}")
        else:
            side = d.a or d.b
            lines.append(f"only in {d.problem[-1].upper()}: {d.tensor} ({side[0]} {side[1]})")
    lines += [f"{k.where}: {k.key}: {_value(k.a)} -> {_value(k.b)}" for k in r.keys]
    if r.ok:
        summary = f"identical: {r.identical} tensors, metadata and config"
    else:
        summary = (f"not identical: {len(r.differences)} tensor(s) differ or are one-sided, {r.identical} identical; "
                   f"{len(r.keys)} metadata or config key(s) differ")
    return printable_lines(lines), summary
