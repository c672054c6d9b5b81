"""What a backbone can do beyond classifying, in words both sides share without torch: backbones
declare their capabilities where they register (`dynlab.backbones.register_backbone`), techniques
say which one they need (`dynlab.traits`), so no backbone is recognised by its name."""

from __future__ import annotations

import ast
from enum import Enum
from pathlib import Path


class Capability(Enum):
    """One thing a backbone can do; the value says it in words, as an error message names it."""

    conv_act_options = "a network with conv/act options (ACNet, RepVGG, WeightNet, FReLU)"
    sparse_layers = "a network of LGC/SFR layers"
    spos_supernet = "an SPOS one-shot supernet"
    dmasking_supernet = "a DMaskingNAS supernet"
    pruning_net = "a MetaPruning PruningNet"


def declared_backbones() -> dict[str, frozenset[Capability]]:
    """dynlab's own backbones and the capabilities each declares, read from the
    `@register_backbone(...)` decorators in `dynlab/backbones` without importing it (no torch,
    no timm: validation refuses a wrong pairing in about a second). The same declarations fill
    the registry when the backbones are imported; a test keeps the two equal."""
    declared: dict[str, frozenset[Capability]] = {}
    for path in sorted((Path(__file__).parent / "backbones").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and _called(decorator) == "register_backbone":
                    declared[node.name] = frozenset(
                        Capability[arg.attr]
                        for arg in decorator.args
                        if isinstance(arg, ast.Attribute)
                    )
    return declared


def _called(call: ast.Call) -> str:
    """The name a call's function goes by (`f(...)` or `module.f(...)`)."""
    func = call.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
