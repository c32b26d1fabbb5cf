"""/v1/presets: the standard class lists a request can name."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from core import presets
from service.auth import owner_for
from service.deps import problems
from service.errors import PresetNotFound
from service.schemas import PresetDetail, PresetList

# Every /v1 route needs an API key when DISTILL_API_KEYS is set.
router = APIRouter(prefix="/v1", dependencies=[Depends(owner_for)])


def _preset_summary(preset: presets.Preset) -> dict[str, object]:
    classes = preset.classes
    return {
        "name": preset.name,
        "title": preset.title,
        "num_classes": len(classes),
        "image_size": preset.image_size,
        "mean": list(preset.mean),
        "std": list(preset.std),
        "first_class": classes[0].label,
        "last_class": classes[-1].label,
    }


@router.get(
    "/presets",
    operation_id="listPresets",
    tags=["presets"],
    summary="Standard class lists usable as `preset`",
    response_model=PresetList,
)
def list_presets() -> PresetList:
    return PresetList.model_validate(
        {"presets": [_preset_summary(p) for p in presets.PRESETS.values()]}
    )


@router.get(
    "/presets/{name}",
    operation_id="getPreset",
    tags=["presets"],
    summary="One preset with every class in class-index order",
    response_model=PresetDetail,
    responses=problems(404),
)
def get_preset(name: str) -> PresetDetail:
    if name not in presets.PRESETS:
        raise PresetNotFound(f"no preset {name!r}; known: {', '.join(presets.PRESETS)}")
    preset = presets.PRESETS[name]
    classes = [
        {"index": c.index, "label": c.label, "wnid": c.wnid, "synonyms": list(c.synonyms)}
        for c in preset.classes
    ]
    return PresetDetail.model_validate({**_preset_summary(preset), "classes": classes})
