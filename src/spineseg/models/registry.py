"""One registry: every model and ablation row is a name here plus a config file under configs/."""

from __future__ import annotations

from ..errors import SpinesegError
from .baselines import DeepLabV3Plus, SegNet, SpineGANGenerator
from .generator import SegUNet

_DILATED = (1, 2, 4, 8)
_FLAT = (1, 1, 1, 1)

# the paper's seven ablation rows (Tables 5-6); "spineseg" is resunet_ctm_dconv trained adversarially
ARCHITECTURES: dict[str, dict] = {
    "unet": dict(block="plain", dilations=_FLAT, attention="none"),
    "unet_res": dict(block="residual", dilations=_FLAT, attention="none"),
    "unet_tm": dict(block="plain", dilations=_FLAT, attention="full"),
    "unet_ctm": dict(block="plain", dilations=_FLAT, attention="clustered"),
    "unet_res_ctm": dict(block="residual", dilations=_FLAT, attention="clustered"),
    "resunet_ctm_dconv": dict(block="residual", dilations=_DILATED, attention="clustered"),
    "spineseg": dict(block="residual", dilations=_DILATED, attention="clustered"),
    # baselines of Tables 2-4 (nnU-Net runs through its own tool: `spineseg nnunet`)
    "segnet": dict(arch="segnet"),
    "deeplabv3plus": dict(arch="deeplabv3plus"),
    "spinegan": dict(arch="spinegan"),
}
_CLASSES = {"segunet": SegUNet, "segnet": SegNet, "deeplabv3plus": DeepLabV3Plus, "spinegan": SpineGANGenerator}
# options of the U-Net family that the other architectures do not take
_UNET_ONLY = {"block", "dilations", "attention", "attention_stages", "heads", "clusters", "kmeans_iters", "norm"}
ABLATION_ROWS = ("unet", "unet_res", "unet_tm", "unet_ctm", "unet_res_ctm", "resunet_ctm_dconv", "spineseg")


def model_names() -> list[str]:
    return list(ARCHITECTURES)


def build_model(name: str, **overrides):
    if name not in ARCHITECTURES:
        raise SpinesegError(f"unknown model {name!r}; choose from {', '.join(model_names())}")
    kw = dict(ARCHITECTURES[name])
    arch = kw.pop("arch", "segunet")
    kw.update({k: v for k, v in overrides.items() if v is not None and not (arch != "segunet" and k in _UNET_ONLY)})
    try:
        return _CLASSES[arch](**kw)
    except (TypeError, ValueError) as exc:
        raise SpinesegError(f"bad model options for {name}: {exc}") from None
