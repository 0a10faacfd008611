"""The `avatar` command: one console script, one subcommand per job.

avatar render SCENE.ply|SCENE.splat -o OUT.mp4|OUT.png|OUT_DIR [--orbit N] [--size 512]
avatar bench render [--gaussians 50000] [--size 512] [--json]
avatar demo [-o avatar-demo]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import add_config_args, config_from_args
from .errors import AvatarError

BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "grey": (0.5, 0.5, 0.5)}


def _background(text: str) -> tuple[float, float, float]:
    if text in BACKGROUNDS:
        return BACKGROUNDS[text]
    try:
        rgb = tuple(float(v) for v in text.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 1 for v in rgb):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use white, black, grey or R,G,B with values in [0, 1]"
        )
    return rgb


def _device(text: str) -> str:
    if text not in ("auto", "cpu") and not text.startswith("cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, cpu or cuda[:N]")
    return text


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AvatarError(f"--device {name}: no CUDA device is available here")
    return name


# ---- subcommands -------------------------------------------------------------------------------


def cmd_render(args: argparse.Namespace) -> int:
    from render.io import SplatFileError, load_splats

    from .media import check_output
    from .pipelines.render import OrbitConfig, orbit_cameras, render_frames, save_frames

    out = Path(args.output)
    check_output(out, args.force)
    try:
        scene = load_splats(args.scene)
    except SplatFileError as exc:
        raise AvatarError(str(exc)) from None
    scene = scene.to(_resolve_device(args.device))
    cfg = config_from_args(OrbitConfig, args)
    if out.suffix.lower() in (".png", ".jpg", ".jpeg"):
        cfg = OrbitConfig(**{**cfg.__dict__, "orbit": 1})
    cams = orbit_cameras(scene, cfg)
    count = save_frames(out, render_frames(scene, cams, args.background), args.fps)
    print(f"wrote {out} ({count} frame{'s' if count != 1 else ''}, {cfg.size}x{cfg.size})")
    return 0


def cmd_bench_render(args: argparse.Namespace) -> int:
    from .bench import RenderBenchConfig, bench_render

    result = bench_render(config_from_args(RenderBenchConfig, args), _resolve_device(args.device))
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from render.io import save_ply

    from .pipelines.render import OrbitConfig, orbit_cameras, render_frames, save_frames
    from .scenes import person_scene

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    print("demo: building the built-in person scene (stylised, 30k Gaussians)")
    scene = person_scene(30_000, sh_degree=1)
    ply = out_dir / "person.ply"
    save_ply(scene, ply)
    scene = scene.to(_resolve_device(args.device))
    cfg = OrbitConfig(orbit=args.frames, size=args.size, elevation=8.0)
    video = out_dir / "orbit.mp4"
    save_frames(video, render_frames(scene, orbit_cameras(scene, cfg)), fps=25)
    print(f"wrote {ply} (open it in any 3DGS viewer)")
    print(f"wrote {video} ({args.frames} frames, {args.size}x{args.size}, 25 fps)")
    print(f"render it again from the command line: avatar render {ply} -o orbit.mp4 --orbit 90")
    return 0


# ---- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .bench import RenderBenchConfig
    from .pipelines.render import OrbitConfig

    parser = argparse.ArgumentParser(
        prog="avatar", description="Single-image, speech-driven, full-body 3D Gaussian avatars."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("render", help="render a Gaussian scene (.ply/.splat) to video or images",
                       description="Turntable views of a Gaussian scene. The output kind follows "
                       "its name: .mp4 video, .png/.jpg single image, anything else a PNG folder.")  # fmt: skip
    p.add_argument("scene", help="3DGS .ply or .splat file")
    p.add_argument("-o", "--output", required=True, help="OUT.mp4, OUT.png or OUT_DIR")
    add_config_args(p, OrbitConfig)
    p.add_argument("--fps", type=float, default=25.0, help="video frame rate (default: 25)")
    p.add_argument("--background", type=_background, default="white",
                   help="white, black, grey or R,G,B in [0, 1] (default: white)")  # fmt: skip
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu or cuda")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("bench", help="benchmarks that print JSON")
    bench = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    b = bench.add_parser("render", help="rasteriser speed and memory on a person-shaped scene")
    add_config_args(b, RenderBenchConfig)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    b.set_defaults(func=cmd_bench_render)

    p = sub.add_parser("demo", help="the main job on built-in inputs")
    p.add_argument(
        "-o", "--output", default="avatar-demo", help="output folder (default: avatar-demo)"
    )
    p.add_argument("--size", type=int, default=512, help="video size in pixels (default: 512)")
    p.add_argument("--frames", type=int, default=75, help="orbit frames (default: 75, 3 s)")
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=cmd_demo)
    return parser


def _check_sizes(args: argparse.Namespace) -> None:
    for name in ("size", "orbit", "frames", "gaussians", "backward_size", "backward_steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise AvatarError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if getattr(args, "size", 1) > 8192:
        raise AvatarError(f"--size {args.size} is too large (at most 8192)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_sizes(args)
        return args.func(args)
    except AvatarError as exc:
        print(f"avatar: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # unreadable input, unwritable output, full disk: no traceback
        print(f"avatar: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("avatar: interrupted; nothing was written", file=sys.stderr)
        return 130
