"""docs/api.md runs as written: every ```python block, in order, in one namespace, in an empty
folder. A failing example fails here with the block that broke."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_the_api_page_has_an_example_of_every_job():
    text = "\n".join(blocks())
    for job in ("create", "render", "render_frames", "drive", "drive_frames", "drive_gaussians",
                "converse", "finetune", "export"):  # fmt: skip
        assert f"api.{job}(" in text, job


@pytest.mark.slow
def test_the_api_page_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("anny", reason="the examples create an avatar on the Anny template")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(blocks()):
        try:
            exec(compile(code, f"docs/api.md block {i + 1}", "exec"), namespace)
        except Exception as exc:
            pytest.fail(f"docs/api.md block {i + 1} failed: {exc!r}\n{code}")
    made = sorted(os.listdir(tmp_path))
    for name in ("me.avatar", "front.png", "orbit.mp4", "photo_view.png", "talk.mp4", "call.mp4",
                 "call.json", "pair.mp4", "me-tuned.avatar", "me.splat", "me.ply", "me.glb",
                 "talk_frames"):  # fmt: skip
        assert name in made, (name, made)
    assert (tmp_path / "talk_frames" / "frames.json").exists()
