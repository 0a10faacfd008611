"""Make the demo's speech clip (shipped as avatar/data/demo_speech.flac) with espeak-ng.

    python -m distill.make_demo_speech

The project synthesises it itself, so the package carries no third-party recording. It is
16 kHz mono FLAC; its transcript is `DEMO_TRANSCRIPT` (also in the file's metadata).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import av
import numpy as np

from deform.audio import SAMPLE_RATE, load_audio
from render.io import atomic_path

from .phones import synthesize_speech

DEMO_TRANSCRIPT = ("Hello! I was made from a single photo. Now I can talk, move my head, "
                   "and wave my hands while I speak.")  # fmt: skip
OUT = Path(__file__).resolve().parent.parent / "avatar" / "data" / "demo_speech.flac"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        wav = synthesize_speech(DEMO_TRANSCRIPT, Path(tmp) / "demo.wav", voice="en-us+f3",
                                speed=150, pitch=55)  # fmt: skip
        samples = load_audio(wav).samples
    pad = np.zeros(SAMPLE_RATE // 2, np.float32)
    pcm = (np.concatenate([pad, samples, pad]) * 32767).astype(np.int16)
    with atomic_path(OUT) as tmp_path:
        with av.open(str(tmp_path), "w", format="flac") as out:
            out.metadata["comment"] = DEMO_TRANSCRIPT
            stream = out.add_stream("flac", rate=SAMPLE_RATE, layout="mono")
            frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            for packet in stream.encode(frame):
                out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
    print(f"wrote {OUT} ({len(pcm) / SAMPLE_RATE:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
