"""Body templates behind one interface (`BodyTemplate`): Anny by default, SMPL-X on request."""

from .base import (
    MEDIAPIPE_BODY,
    MEDIAPIPE_FACE,
    MEDIAPIPE_HAND,
    BodyTemplate,
    Landmark,
    TemplateOutput,
)

__all__ = [
    "MEDIAPIPE_BODY",
    "MEDIAPIPE_FACE",
    "MEDIAPIPE_HAND",
    "BodyTemplate",
    "Landmark",
    "TemplateOutput",
    "load_template",
    "template_kind",
]


def load_template(name: str) -> BodyTemplate:
    """`anny` (the default), or `smplx:PATH` with PATH the user's SMPLX_NEUTRAL.npz or its folder."""
    if name == "anny":
        from .anny import AnnyTemplate

        return AnnyTemplate()
    if name.startswith("smplx:"):
        from .smplx_body import SMPLXTemplate

        return SMPLXTemplate(name.split(":", 1)[1])
    raise ValueError(f"unknown body template {name!r}; use anny or smplx:PATH")


def template_kind(name: str) -> str:
    """The kind of a template name ("anny", or "smplx" for `smplx:PATH`): what an avatar
    records, never the path to any file."""
    if name == "anny" or name.startswith("smplx:"):
        return name.split(":", 1)[0]
    raise ValueError(f"unknown body template {name!r}; use anny or smplx:PATH")
