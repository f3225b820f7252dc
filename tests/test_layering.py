"""The package's layers follow the data flow: a module imports only from its own layer or those below it."""

import ast
from pathlib import Path

import spineseg

LAYERS = ["io", "preprocess", "data", "models", "train", "infer", "eval"]
PACKAGE = Path(spineseg.__file__).parent


def _imported_layers(path: Path, own: str) -> set[str]:
    """Layers that ``path`` (in layer ``own``) imports, lazily or not, by relative or absolute import."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                parts = [own] + (node.module or "").split(".")
            elif node.level == 2:
                parts = (node.module or "").split(".") if node.module else [a.name for a in node.names]
            elif node.level == 0 and (node.module or "").startswith("spineseg."):
                parts = node.module.split(".")[1:]
            else:
                continue
            found.add(parts[0])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("spineseg."))
    return found & set(LAYERS)


def test_no_layer_imports_from_a_layer_above_it():
    upward = []
    for own in LAYERS:
        for path in sorted((PACKAGE / own).rglob("*.py")):
            for other in _imported_layers(path, own):
                if LAYERS.index(other) > LAYERS.index(own):
                    upward.append(f"{path.relative_to(PACKAGE)} imports {other}")
    assert not upward, upward


def test_shared_anatomy_sits_below_training_and_inference():
    for path in sorted((PACKAGE / "anatomy").rglob("*.py")):
        above_io = _imported_layers(path, "anatomy") - {"io"}
        assert not above_io, f"{path.name} imports {above_io}"


def test_inference_never_imports_training():
    # infer sits above train in LAYERS, yet checkpoints and model construction live below both (models/)
    offending = [str(p.relative_to(PACKAGE)) for p in sorted((PACKAGE / "infer").rglob("*.py"))
                 if "train" in _imported_layers(p, "infer")]
    assert not offending, offending
