"""Feature taps: a model's intermediate outputs by module path (`layer3`, `layer4.1`), plus its logits.

Taps are torchvision FX feature extractors, not forward hooks: the result is an ordinary GraphModule that
shares the model's parameters, traces cleanly under torch.compile(fullgraph=True), keeps channels-last, and
drops every layer after the last tap (so the paper's stage 1 runs the student only up to its guided layer).
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from fastfit.errors import TapError

LOGITS = "logits"


def _graph_nodes(model: nn.Module) -> list[str]:
    train_nodes, _ = get_graph_node_names(model)
    return train_nodes


def valid_tap_paths(model: nn.Module) -> list[str]:
    """Module paths a tap may name: every submodule, in registration order."""
    return [name for name, _ in model.named_modules() if name]


def check_tap_paths(model: nn.Module, paths: list[str], role: str, model_name: str) -> None:
    modules = valid_tap_paths(model)
    others = [path for path in paths if path not in set(modules)]
    nodes = set(_graph_nodes(model)) if others else set()  # an FX trace only for paths that are not modules
    for path in others:
        if path not in nodes:
            top = [name for name in modules if name.count(".") <= 1]
            raise TapError(
                f"{role} tap {path!r} is not a module of {model_name}; valid paths include: "
                f"{', '.join(top)} (any submodule path, e.g. {top[-1]!r})"
            )


def build_extractor(model: nn.Module, paths: list[str], logits: bool) -> fx.GraphModule:
    """A module returning {path: feature, …} (and {'logits': …} when asked); parameters are the model's own."""
    return_nodes = {path: path for path in paths}
    if logits:
        return_nodes[_graph_nodes(model)[-1]] = LOGITS
    if not return_nodes:
        raise TapError("an extractor needs at least one tap or the logits")
    return create_feature_extractor(model, return_nodes=return_nodes)


@torch.no_grad()
def infer_shapes(
    extractor: nn.Module, image_size: int, device: torch.device | str = "cpu"
) -> dict[str, tuple[int, ...]]:
    """Per-sample output shapes of every tap, from one dry forward in eval mode (BN running stats untouched)."""
    was_training = extractor.training
    extractor.eval()
    try:
        out = extractor(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        extractor.train(was_training)
    return {name: tuple(value.shape[1:]) for name, value in out.items()}
