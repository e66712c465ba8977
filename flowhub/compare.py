"""Comparing two versions of a model: entrypoints, parameters and buffers, and outputs.

:func:`compare_models` works on two already-loaded objects; ``Hub.compare`` loads both sides (each in
its own worker, at once) and calls it. The result prints as a table and serialises to JSON.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple


@dataclasses.dataclass
class TensorDiff:
    """One parameter or buffer present on both sides."""

    name: str
    shape: List[int]
    dtype: str
    max_abs_diff: float
    max_rel_diff: float


@dataclasses.dataclass
class Comparison:
    """What differs between side A and side B."""

    a: str
    b: str
    entrypoint: str
    entrypoints_added: List[str] = dataclasses.field(default_factory=list)
    entrypoints_removed: List[str] = dataclasses.field(default_factory=list)
    tensors_added: Dict[str, Tuple[List[int], str]] = dataclasses.field(default_factory=dict)
    tensors_removed: Dict[str, Tuple[List[int], str]] = dataclasses.field(default_factory=dict)
    reshaped: Dict[str, Tuple[List[int], List[int]]] = dataclasses.field(default_factory=dict)
    retyped: Dict[str, Tuple[str, str]] = dataclasses.field(default_factory=dict)
    changed: List[TensorDiff] = dataclasses.field(default_factory=list)
    unchanged: int = 0
    input_shapes: Optional[List[List[int]]] = None
    output_max_abs_diff: Optional[float] = None
    output_note: str = ""

    @property
    def identical(self) -> bool:
        return not (self.entrypoints_added or self.entrypoints_removed or self.tensors_added or self.tensors_removed
                    or self.reshaped or self.retyped or self.changed or self.output_max_abs_diff
                    or self.output_note)

    def as_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["identical"] = self.identical
        return data

    def format_table(self) -> str:
        lines = [f"compare {self.entrypoint}: A = {self.a}   B = {self.b}"]
        if self.entrypoints_added or self.entrypoints_removed:
            lines.append(f"  entrypoints added in B: {', '.join(self.entrypoints_added) or '-'}; "
                         f"removed: {', '.join(self.entrypoints_removed) or '-'}")
        for title, table in (("only in B", self.tensors_added), ("only in A", self.tensors_removed)):
            for name, (shape, dtype) in sorted(table.items()):
                lines.append(f"  {title:<10} {name:<40} {str(tuple(shape)):<20} {dtype}")
        for name, (sa, sb) in sorted(self.reshaped.items()):
            lines.append(f"  {'reshaped':<10} {name:<40} {str(tuple(sa))} -> {tuple(sb)}")
        for name, (ta, tb) in sorted(self.retyped.items()):
            lines.append(f"  {'retyped':<10} {name:<40} {ta} -> {tb}")
        if self.changed:
            lines.append(f"  {'values':<10} {'name':<40} {'max abs diff':>14} {'max rel diff':>14}")
            for d in sorted(self.changed, key=lambda d: -d.max_abs_diff):
                lines.append(f"  {'':<10} {d.name:<40} {d.max_abs_diff:>14.6g} {d.max_rel_diff:>14.6g}")
        lines.append(f"  {self.unchanged} shared tensors identical, {len(self.changed)} with different values")
        if self.output_max_abs_diff is not None:
            lines.append(f"  outputs for inputs of shape {self.input_shapes}: max abs diff {self.output_max_abs_diff:.6g}")
        if self.output_note:
            lines.append(f"  outputs: {self.output_note}")
        lines.append("  identical" if self.identical else "  different")
        return "\n".join(lines)


def _meta(t: Any) -> Tuple[List[int], str]:
    return [int(x) for x in t.shape], str(t.dtype).replace("oneflow.", "")


def diff_state_dicts(sd_a: Dict[str, Any], sd_b: Dict[str, Any], result: Comparison) -> None:
    """Fill ``result`` with the tensor differences of two state dicts."""
    import oneflow as flow

    for name in sorted(set(sd_b) - set(sd_a)):
        result.tensors_added[name] = _meta(sd_b[name])
    for name in sorted(set(sd_a) - set(sd_b)):
        result.tensors_removed[name] = _meta(sd_a[name])
    for name in sorted(set(sd_a) & set(sd_b)):
        ta, tb = sd_a[name].detach().cpu(), sd_b[name].detach().cpu()
        (shape_a, dtype_a), (shape_b, dtype_b) = _meta(ta), _meta(tb)
        if shape_a != shape_b:
            result.reshaped[name] = (shape_a, shape_b)
            continue
        if dtype_a != dtype_b:
            result.retyped[name] = (dtype_a, dtype_b)
            continue
        if ta.numel() == 0 or bool(flow.equal(ta, tb)):
            result.unchanged += 1
            continue
        fa, fb = ta.to(flow.float64), tb.to(flow.float64)
        abs_diff = (fa - fb).abs()
        rel = abs_diff / fa.abs().clamp(min=1e-12)
        result.changed.append(TensorDiff(name, shape_a, dtype_a, float(abs_diff.max()), float(rel.max())))


def guess_inputs(model: Any) -> Optional[Tuple[Any, ...]]:
    """A random input for common first layers (Conv1d/2d/3d: 32 per spatial dim; Linear), else None."""
    import oneflow as flow
    import oneflow.nn as nn

    from flowhub.worker.host.proxy import remote_isinstance  # isinstance that also sees through proxies

    for module in model.modules():
        for cls, spatial in ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3)):
            if remote_isinstance(module, cls):
                return (flow.randn(2, module.in_channels, *([32] * spatial)),)
        if remote_isinstance(module, nn.Linear):
            return (flow.randn(2, module.in_features),)
    return None


def compare_models(model_a: Any, model_b: Any, result: Comparison, inputs: Optional[Sequence[Any]] = None) -> Comparison:
    """Compare two loaded objects: state dicts if they are modules, and outputs for ``inputs`` (or guessed ones)."""
    import oneflow as flow
    import oneflow.nn as nn

    from flowhub.worker.host.proxy import remote_isinstance  # mode="proxy": the models stay in their workers

    if not (remote_isinstance(model_a, nn.Module) and remote_isinstance(model_b, nn.Module)):
        same = repr(model_a) == repr(model_b)
        result.output_note = "" if same else f"values differ: {repr(model_a)[:200]} vs {repr(model_b)[:200]}"
        return result
    diff_state_dicts(model_a.state_dict(), model_b.state_dict(), result)
    if inputs is None:
        flow.manual_seed(0)
        inputs = guess_inputs(model_a)
    elif not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    if inputs is None:
        result.output_note = "no inputs given and none could be guessed (pass inputs=...)"
        return result
    result.input_shapes = [[int(x) for x in t.shape] for t in inputs if hasattr(t, "shape")]
    with flow.no_grad():
        try:
            out_a, out_b = model_a.eval()(*inputs), model_b.eval()(*inputs)
        except Exception as exc:  # noqa: BLE001 - a model that rejects the input is a finding, not a crash
            result.output_note = f"could not run the inputs through both models: {type(exc).__name__}: {exc}"
            return result
    if not (isinstance(out_a, flow.Tensor) and isinstance(out_b, flow.Tensor)):
        result.output_note = "outputs are not single tensors; not compared"
    elif tuple(out_a.shape) != tuple(out_b.shape):
        result.output_note = f"output shapes differ: {tuple(out_a.shape)} vs {tuple(out_b.shape)}"
    else:
        result.output_max_abs_diff = float((out_a.to(flow.float64) - out_b.to(flow.float64)).abs().max())
    return result
