"""The recipes ``optimize`` tries: one :class:`Recipe` per target and quantization mode."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgekit.errors import UsageError

from ..options import CALIBRATION_METHODS, ConvertOptions

__all__ = ["QUICK", "Recipe", "all_recipes", "select_recipes"]


@dataclass(frozen=True)
class Recipe:
    """One way to convert the model: target, mode and the mode's settings."""

    target: str
    quantize: str
    per_channel: bool = True
    calibration_method: str = "minmax"
    nodes_to_exclude: tuple[str, ...] = ()
    label: str = ""

    @property
    def name(self) -> str:
        return f"{self.target}:{self.label}"

    @property
    def int8(self) -> bool:
        """Whether weights are int8 (dynamic or static quantization)."""
        return self.quantize in ("dynamic", "int8")

    @property
    def static_onnx(self) -> bool:
        """Whether the recipe is static QDQ int8 for onnxruntime (it can keep nodes in float)."""
        return self.target == "onnx" and self.quantize == "int8"

    def options(self, base: ConvertOptions) -> ConvertOptions:
        """The conversion options for this recipe on top of the shared ones."""
        return base.replace(target=self.target, quantize=self.quantize,
                            per_channel=self.per_channel,
                            calibration_method=self.calibration_method,
                            nodes_to_exclude=list(self.nodes_to_exclude))

    def with_float_nodes(self, nodes: list[str], label: str) -> Recipe:
        return Recipe(self.target, self.quantize, self.per_channel, self.calibration_method,
                      tuple(nodes), label)


def _onnx() -> list[Recipe]:
    recipes = [Recipe("onnx", "none", label="fp32"), Recipe("onnx", "fp16", label="fp16"),
               Recipe("onnx", "dynamic", per_channel=False, label="dynamic-per-tensor"),
               Recipe("onnx", "dynamic", per_channel=True, label="dynamic-per-channel")]
    for per_channel in (False, True):
        scheme = "per-channel" if per_channel else "per-tensor"
        for method in CALIBRATION_METHODS:
            recipes.append(Recipe("onnx", "int8", per_channel, method,
                                  label=f"int8-{scheme}-{method}"))
    return recipes


def _tflite() -> list[Recipe]:
    return [Recipe("tflite", "none", label="fp32"), Recipe("tflite", "fp16", label="fp16"),
            Recipe("tflite", "dynamic", label="dynamic"), Recipe("tflite", "int8", label="int8")]


def all_recipes(targets: tuple[str, ...]) -> list[Recipe]:
    """Every recipe for the targets, float first."""
    out: list[Recipe] = []
    if "onnx" in targets:
        out += _onnx()
    if "tflite" in targets:
        out += _tflite()
    return out


QUICK = ("onnx:fp32", "onnx:fp16", "onnx:dynamic-per-channel", "onnx:int8-per-channel-minmax",
         "tflite:fp32", "tflite:int8")
"""A small set for fast runs: float, fp16 and the usually best int8 recipe of each kind."""


def select_recipes(targets: tuple[str, ...], names: Sequence[str | Recipe] | None
                   ) -> list[Recipe]:
    """The recipes to try: all for the targets, the quick set, or the named ones.

    Names may omit the target when only one target is chosen (``int8-per-tensor-minmax``);
    a :class:`Recipe` given instead of a name is tried as it is.

    Raises:
        UsageError: an unknown name (the message lists the known ones).
    """
    available = all_recipes(targets)
    if not names or list(names) == ["all"]:
        return available
    by_name = {r.name: r for r in available}
    wanted: list[str] = []
    for name in names:
        if isinstance(name, Recipe):
            by_name[name.name] = name
            wanted.append(name.name)
        elif name == "quick":
            wanted += [n for n in QUICK if n in by_name]
        elif name in by_name:
            wanted.append(name)
        elif len(targets) == 1 and f"{targets[0]}:{name}" in by_name:
            wanted.append(f"{targets[0]}:{name}")
        else:
            raise UsageError(
                f"unknown candidate {name!r} for --target {'+'.join(targets)}",
                hint="known: all, quick, " + ", ".join(by_name),
            )
    return [by_name[n] for n in dict.fromkeys(wanted)]
