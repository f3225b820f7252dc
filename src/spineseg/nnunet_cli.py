"""Run one of nnU-Net v2's own command lines in this environment: ``python -m spineseg.nnunet_cli nnUNetv2_train ...``.

nnU-Net finds a trainer class (``-tr nnUNetTrainer_5epochs``) by importing every trainer module it ships,
the Primus trainers among them, whose network module imports timm and therefore torchvision, which has
no CPU build here. The 2D comparison never uses Primus; when timm is missing this shim puts a placeholder
in place of that one module, then hands the arguments unchanged to nnU-Net's own console entry point.
"""

from __future__ import annotations

import sys
import types
from importlib.metadata import entry_points

PRIMUS = "dynamic_network_architectures.architectures.primus"
PRIMUS_NAMES = ("Primus", "PrimusV2B", "PrimusV2L", "PrimusV2M", "PrimusV2S")


def _placeholder_for_primus() -> None:
    try:
        import timm  # noqa: F401
    except ImportError:
        module = types.ModuleType(PRIMUS, "placeholder: Primus needs timm, which is not installed")
        for name in PRIMUS_NAMES:
            setattr(module, name, type(name, (), {}))
        sys.modules.setdefault(PRIMUS, module)


def nnunet_entry_point(command: str):
    found = [ep for ep in entry_points(group="console_scripts", name=command) if ep.value.startswith("nnunetv2.")]
    if not found:
        raise SystemExit(f"spineseg: error: {command}: not an nnU-Net v2 command (is nnunetv2 installed? see the README)")
    return found[0].load()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m spineseg.nnunet_cli nnUNetv2_COMMAND [ARGS...]")
    _placeholder_for_primus()
    entry = nnunet_entry_point(argv[0])
    sys.argv = argv
    return int(entry() or 0)


if __name__ == "__main__":
    sys.exit(main())
