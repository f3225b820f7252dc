"""Anatomical reference ranges shared by the phantom (which satisfies them) and `sanity` (which checks them).

Areas are in mm^2 per axial slice, after PHANTOM.md; the loosest range of a structure over slice
positions and pathology is what a plausibility check on an unknown slice may demand.
"""

from __future__ import annotations

AREA_RANGES_MM2 = {
    "vertebral_body": {"default": (700.0, 2000.0), "disc": (250.0, 2000.0)},
    "vertebral_foramen": {"default": (150.0, 300.0), "stenosis": (35.0, 100.0), "protrusion": (90.0, 300.0)},
    "lamina": {"default": (150.0, 650.0)},
}

# the loosest range per structure: what a slice of unknown position and pathology must satisfy
AREA_LIMITS_MM2 = {s: (min(lo for lo, _ in r.values()), max(hi for _, hi in r.values()))
                   for s, r in AREA_RANGES_MM2.items()}


def area_range(structure: str, position: str, stenosis: bool, protrusion: bool) -> tuple[float, float]:
    """The area range (mm^2) of ``structure`` on a slice of known position and pathology."""
    r = AREA_RANGES_MM2[structure]
    if structure == "vertebral_body" and position == "disc":
        return r["disc"]
    if structure == "vertebral_foramen":
        if stenosis:
            return r["stenosis"]
        if protrusion:
            return r["protrusion"]
    return r["default"]
