"""Body templates behind one interface (`BodyTemplate`): Anny by default, SMPL-X on request."""

from .base import MEDIAPIPE_BODY, MEDIAPIPE_HAND, BodyTemplate, Landmark, TemplateOutput

__all__ = [
    "MEDIAPIPE_BODY",
    "MEDIAPIPE_HAND",
    "BodyTemplate",
    "Landmark",
    "TemplateOutput",
    "load_template",
]


def load_template(name: str) -> BodyTemplate:
    """ "anny" (default). SMPL-X ("smplx:PATH") is designed in but not available yet."""
    if name == "anny":
        from .anny import AnnyTemplate

        return AnnyTemplate()
    if name.startswith("smplx:"):
        raise ValueError(f"{name}: the SMPL-X template is not available in this version; use anny")
    raise ValueError(f"unknown body template {name!r}; use 'anny'")
