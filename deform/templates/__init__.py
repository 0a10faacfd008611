"""Body templates behind one interface (`BodyTemplate`): Anny by default, SMPL-X on request."""

from .base import MEDIAPIPE_BODY, MEDIAPIPE_HAND, BodyTemplate, Landmark, TemplateOutput

__all__ = ["MEDIAPIPE_BODY", "MEDIAPIPE_HAND", "BodyTemplate", "Landmark", "TemplateOutput"]
