"""The `avatar` command: one console script, one subcommand per job.

avatar render SCENE.ply|SCENE.splat -o OUT.mp4|OUT.png|OUT_DIR [--orbit N] [--size 512]
avatar bench render [--gaussians 50000] [--size 512] [--json]
avatar demo [-o avatar-demo]
"""

from __future__ import annotations

import argparse
import functools
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


def _seeds(text: str) -> list[int]:
    """`--seeds 0,1,2`: distinct integers, at least one."""
    try:
        seeds = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: each seed once")
    return seeds


def _resolve_device(name: str) -> str:
    from render import pick_device

    try:
        return str(pick_device(name))
    except ValueError as exc:
        raise AvatarError(f"--device {exc}") from None


# ---- subcommands -------------------------------------------------------------------------------


def _view(text: str) -> float | str:
    """--view: "input" (the photo's camera), "front" (yaw 0) or "yaw=DEG"."""
    if text in ("input", "front"):
        return text if text == "input" else 0.0
    if text.startswith("yaw="):
        try:
            return float(text[4:])
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{text!r}: use input, front or yaw=DEG")


def cmd_render(args: argparse.Namespace) -> int:
    from . import api

    cfg = config_from_args(api.OrbitConfig, args)
    count = api.render(args.scene, args.output, args.view, args.pose, cfg, fps=args.fps,
                       background=args.background, body=args.body,
                       device=_resolve_device(args.device), force=args.force)  # fmt: skip
    print(f"wrote {args.output} ({count} frame{'s' if count != 1 else ''})")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    from . import api

    out = args.output
    avatar = api.create(args.photo, out, config_from_args(api.CreateConfig, args), force=args.force)
    q = avatar.meta["quality"]
    print(f"wrote {out} ({len(avatar.gaussians)} Gaussians) in "
          f"{avatar.meta['timings']['total_s']:.0f} s; input view: "
          f"masked PSNR {q['input_masked_psnr_db']} dB, SSIM {q['input_masked_ssim']}")  # fmt: skip
    print(
        f"look at it: avatar render {out} --view input -o input.png; avatar render {out} -o orbit.mp4"
    )
    return 0


def cmd_drive(args: argparse.Namespace) -> int:
    from . import api

    out = args.output
    summary = api.drive(args.avatar, args.audio, out, config_from_args(api.DriveConfig, args),
                        force=args.force, body=args.body)  # fmt: skip
    print(f"wrote {out} ({summary['frames']} frames, {summary['video_s']} s at "
          f"{summary['fps']:g} fps; audio {summary['audio_s']} s)")  # fmt: skip
    print(f"check lip sync: avatar eval sync {out}")
    return 0


def cmd_converse(args: argparse.Namespace) -> int:
    from . import api

    summary = api.converse(args.avatar, args.audio, args.output, partner=args.partner,
                           channel=args.channel, speaker=args.speaker, swap=args.swap,
                           layout=args.layout, camera=args.camera, report=args.report,
                           config=config_from_args(api.DriveConfig, args),
                           listen=config_from_args(api.ListenConfig, args), body=args.body,
                           force=args.force)  # fmt: skip
    out = args.output
    if "layout" in summary:
        print(f"wrote {out} ({summary['frames']} frames, {summary['video_s']} s; layout "
              f"{summary['layout']} ({summary['matched']}), {summary['distance_m']} m apart)")  # fmt: skip
    else:
        print(f"wrote {out} ({summary['frames']} frames, {summary['video_s']} s at "
              f"{summary['fps']:g} fps; speaking {summary['speaking_s']:.1f} s, listening "
              f"{summary['listening_s']:.1f} s)")  # fmt: skip
    if args.report:
        print(f"wrote {args.report}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from distill.finetune import FinetuneConfig

    from . import api

    out = args.output or args.avatar
    summary = api.finetune(args.avatar, args.audio, out,
                           config_from_args(api.FinetuneOptions, args),
                           config_from_args(FinetuneConfig, args), body=args.body,
                           force=args.force)  # fmt: skip
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    last = ", ".join(f"{k} {v:.4g}" for k, v in summary["loss_last"].items()
                     if k not in ("step", "seconds", "lr"))  # fmt: skip
    print(
        f"wrote {out}: {summary['steps']} steps with the {summary['teacher']} teacher in "
        f"{summary['seconds']:.0f} s ({summary['seconds_per_step']} s/step); last: {last}"
    )
    print(f"drive it: avatar drive {out} speech.wav -o talk.mp4")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"avatar serve: warning: listening on {args.host}: anyone who can reach this "
              "machine can upload files and run jobs here", file=sys.stderr)  # fmt: skip
    if args.max_upload_mb <= 0:
        raise AvatarError(f"--max-upload-mb {args.max_upload_mb}: must be positive")
    serve(args.host, args.port, args.max_upload_mb, ready=functools.partial(print, flush=True))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import api

    summary = api.export(args.avatar, args.output, audio=args.audio, body=args.body,
                         force=args.force, format=args.format or "", pose=args.pose, fps=args.fps,
                         seed=args.seed)  # fmt: skip
    counts = ", ".join(f"{k} {v}" for k, v in summary.items() if k != "format")
    print(f"wrote {args.output} ({summary['format']}: {counts})")
    return 0


def cmd_eval_sync(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_video

    reference = None
    if args.photo:  # the person: what identity means
        from .views import photo_face

        reference = photo_face(args.photo, args.size)
    elif args.avatar:  # only whether the video keeps the avatar's own face
        from .asset import Avatar
        from .pipelines.drive import neutral_face

        reference = neutral_face(Avatar.load(args.avatar, args.body), args.size)
    result = evaluate_video(args.video, args.audio, reference, args.transcript)
    _print_result(result, args.json)
    return 0


def cmd_eval_converse(args: argparse.Namespace) -> int:
    from .evaluate import converse_metrics

    result = converse_metrics(args.video, args.report)
    _print_result(result, args.json)
    return 0


def cmd_eval_speech(args: argparse.Namespace) -> int:
    from distill.phones import EspeakError

    from .articulation import measure_avatar
    from .asset import Avatar

    reference = None
    if args.photo:  # a bad photo fails before anything is driven
        from .views import photo_face

        reference = photo_face(args.photo, args.size)
    avatar = Avatar.load(args.avatar, args.body)
    avatar.body_template()
    if avatar.template != "anny":
        raise AvatarError(f"{args.avatar}: eval speech frames faces with Anny's head bones; "
                          f"this avatar is on {avatar.template}")  # fmt: skip
    try:
        result = measure_avatar(avatar, args.seed, args.size, photo_face=reference,
                                particles=args.particles, body=not args.face_only)  # fmt: skip
    except EspeakError as exc:
        raise AvatarError(f"eval speech makes its words with espeak-ng: {exc}") from None
    _print_result(result, args.json)
    return 0


def cmd_eval_views(args: argparse.Namespace) -> int:
    from .asset import Avatar
    from .views import view_metrics

    avatar = Avatar.load(args.avatar, args.body)
    avatar.body_template()  # an SMPL-X avatar without --body: say so first
    if avatar.template != "anny":
        raise AvatarError(f"{args.avatar}: eval views frames faces with Anny's head bones; "
                          f"this avatar is on {avatar.template}")  # fmt: skip
    _print_result(view_metrics(avatar, args.photo, args.size, args.save), args.json)
    return 0


def _print_result(result: dict, as_json: bool) -> None:
    """A benchmark's or an eval's figures: one JSON object, or aligned `key  value` lines; on
    stderr, a hint where MediaPipe hardly found the face (the mouth figures are then NaN or rest
    on a few frames: the video's framing, not the avatar)."""
    if as_json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    sync = result.get("sync")
    found = result.get("face_found_fraction", result.get("both_meshes_found_fraction",
                       sync.get("face_found_fraction") if sync else None))  # fmt: skip
    if isinstance(found, float):
        from .evaluate import TARGETS

        if found < TARGETS["face_found"]:
            print(f"MediaPipe's face mesh measured the mouth in {found:.0%} of the frames: the "
                  "mouth figures need the face larger and turned to the camera, e.g. a video made "
                  "with --framing face (or upper)", file=sys.stderr)  # fmt: skip


def cmd_bench_drive(args: argparse.Namespace) -> int:
    from .bench import DriveBenchConfig, bench_drive

    _print_result(bench_drive(config_from_args(DriveBenchConfig, args)), args.json)
    return 0


def cmd_bench_finetune(args: argparse.Namespace) -> int:
    from .bench import FinetuneBenchConfig, bench_finetune

    _print_result(bench_finetune(config_from_args(FinetuneBenchConfig, args)), args.json)
    return 0


def cmd_bench_render(args: argparse.Namespace) -> int:
    from .bench import RenderBenchConfig, bench_render

    result = bench_render(config_from_args(RenderBenchConfig, args), _resolve_device(args.device))
    _print_result(result, args.json)
    return 0


def cmd_bench_create(args: argparse.Namespace) -> int:
    from .bench import bench_create
    from .pipelines.create import CreateConfig

    cfg = config_from_args(CreateConfig, args)
    if args.seeds:
        from .bench import bench_create_seeds

        _print_result(bench_create_seeds(args.photo, cfg, args.seeds), args.json)
    else:
        _print_result(bench_create(args.photo, cfg), args.json)
    return 0


def cmd_bench_unseen(args: argparse.Namespace) -> int:
    from .views import synthetic_views

    result = synthetic_views(args.subjects, args.gaussians, args.crop, save=args.save)
    _print_result(result, args.json)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .pipelines.create import CreateConfig, create_avatar, posed_gaussians
    from .pipelines.render import OrbitConfig, orbit_cameras, render_frames, save_frames
    from .scenes import demo_photo

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    photo = demo_photo()
    print(f"demo: creating an avatar from {photo}")
    avatar, times = create_avatar(photo, config_from_args(CreateConfig, args))
    path = out_dir / "demo.avatar"
    avatar.save(path, force=True)
    q = avatar.meta["quality"]
    print(f"wrote {path} in {times.total_s:.0f} s (input view: masked PSNR "
          f"{q['input_masked_psnr_db']} dB, SSIM {q['input_masked_ssim']})")  # fmt: skip
    scene = posed_gaussians(avatar, avatar.body_template(), "body").to(_resolve_device(args.device))
    cfg = OrbitConfig(orbit=args.frames, size=args.size, elevation=5.0, fill=0.75)
    video = out_dir / "orbit.mp4"
    save_frames(video, render_frames(scene, orbit_cameras(scene, cfg)), fps=25)
    print(f"wrote {video} ({args.frames} frames, {args.size}x{args.size}, 25 fps)")

    from .pipelines.drive import DriveConfig, drive_avatar
    from .scenes import demo_speech

    speech = demo_speech()
    print(f"demo: driving it with {speech.name} (speech the project synthesised with espeak-ng)")
    talk = out_dir / "talk.mp4"
    summary = drive_avatar(avatar, speech, talk,
                           DriveConfig(size=args.size, framing="upper", device=args.device))  # fmt: skip
    print(f"wrote {talk} ({summary['frames']} frames, {summary['video_s']} s, with sound)")
    print(
        "next: avatar create YOUR_PHOTO.jpg -o me.avatar && avatar drive me.avatar speech.wav -o talk.mp4"
    )
    return 0


# ---- parser ------------------------------------------------------------------------------------
def _add_body(p: argparse.ArgumentParser) -> None:
    p.add_argument("--body", default="", metavar="smplx:PATH",
                   help="an SMPL-X avatar's template: your SMPLX_NEUTRAL.npz (or its folder); "
                   "an avatar never names files to load itself")  # fmt: skip


@functools.lru_cache(maxsize=1)  # parsing leaves it as it was: build it once per process
def build_parser() -> argparse.ArgumentParser:
    from distill.finetune import FinetuneConfig

    from .bench import DriveBenchConfig, FinetuneBenchConfig, RenderBenchConfig
    from .pipelines.converse import ListenConfig
    from .pipelines.create import CreateConfig
    from .pipelines.drive import DriveConfig
    from .pipelines.export import FORMATS, POSES, ExportConfig
    from .pipelines.finetune import FinetuneOptions
    from .pipelines.render import OrbitConfig

    parser = argparse.ArgumentParser(
        prog="avatar", description="Single-image, speech-driven, full-body 3D Gaussian avatars."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("render", help="render a Gaussian scene (.ply/.splat) to video or images",
                       description="Turntable views of a Gaussian scene. The output kind follows "
                       "its name: .mp4 video, .png/.jpg single image, anything else a PNG folder.")  # fmt: skip
    p.add_argument("scene", help="an avatar (folder or .zip), or a 3DGS .ply / .splat file")
    p.add_argument("-o", "--output", required=True, help="OUT.mp4, OUT.png or OUT_DIR")
    add_config_args(p, OrbitConfig)
    p.set_defaults(size=None)  # --view input: the photo's own size; turntables: OrbitConfig's
    p.add_argument("--fps", type=float, default=25.0, help="video frame rate (default: 25)")
    p.add_argument("--background", type=_background, default="white",
                   help="white, black, grey or R,G,B in [0, 1] (default: white)")  # fmt: skip
    p.add_argument("--view", type=_view, default="front",
                   help="input (an avatar's photo camera), front, or yaw=DEG (default: front)")  # fmt: skip
    p.add_argument("--pose", choices=("photo", "rest"), default="photo",
                   help="an avatar's pose: the photo's, or the canonical rest pose")  # fmt: skip
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu or cuda")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    _add_body(p)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("create", help="create an avatar from one photo",
                       description="Parse the person, fit the body template, predict Gaussians on it "
                       "with the feed-forward reconstructor, then refine them against the photo "
                       "(--refine-steps 0: the network alone). Writes an avatar folder (or .zip).")  # fmt: skip
    p.add_argument("photo", help="a photo of one person (JPEG, PNG, ...); full body or half body")
    p.add_argument("-o", "--output", required=True, help="OUT.avatar (a folder) or OUT.zip")
    add_config_args(p, CreateConfig)
    p.add_argument("--force", action="store_true", help="overwrite an existing avatar")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("bench", help="benchmarks that print JSON")
    bench = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    b = bench.add_parser("render", help="rasteriser speed and memory on a person-shaped scene")
    add_config_args(b, RenderBenchConfig)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    b.set_defaults(func=cmd_bench_render)
    b = bench.add_parser("create", help="time and quality of avatar create on one photo")
    b.add_argument("--photo", help="the photo (default: the built-in demo photo)")
    add_config_args(b, CreateConfig)
    b.add_argument("--seeds", type=_seeds, metavar="S,S,...",
                   help="create once per sampling seed (in place of --seed) and report each "
                        "figure's mean, sd, min and max over them")  # fmt: skip
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_bench_create)
    b = bench.add_parser("drive", help="speed and memory of avatar drive (10 s of speech)")
    add_config_args(b, DriveBenchConfig)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_bench_drive)

    b = bench.add_parser("unseen", help="create's unseen sides against ground truth (synthetic)",
                         description="Held-out synthetic subjects through create's appearance "
                         "stage, rendered at yaw 0, ±45, ±90 and 180 against their truth: PSNR, "
                         "SSIM and LPIPS per angle.")  # fmt: skip
    b.add_argument("--subjects", type=int, default=6, help="held-out subjects (default: 6)")
    b.add_argument("--gaussians", type=int, default=20_000, help="Gaussians each (default: 20000)")
    b.add_argument("--crop", type=int, default=384, help="photo crop size (default: 384)")
    b.add_argument("--save", metavar="DIR", help="also write truth|ours pairs as PNG files")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_bench_unseen)
    b = bench.add_parser("finetune", help="seconds per distillation step (256x256, 8 frames)")
    add_config_args(b, FinetuneBenchConfig)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_bench_finetune)

    p = sub.add_parser("drive", help="a talking video of an avatar from speech",
                       description="Drive an avatar with speech (WAV, FLAC, MP3, OGG, any rate): "
                       "lips, blinks, head and arm motion. Writes an H.264 MP4 with the audio "
                       "as AAC. The deformer streams with 92.5 ms of audio look-ahead.")  # fmt: skip
    p.add_argument("avatar", help="an avatar from avatar create (folder or .zip)")
    p.add_argument("audio", help="the speech")
    p.add_argument("-o", "--output", required=True, help="OUT.mp4")
    add_config_args(p, DriveConfig)
    p.add_argument("--force", action="store_true", help="overwrite an existing video")
    _add_body(p)
    p.set_defaults(func=cmd_drive)

    p = sub.add_parser("converse", help="an avatar in a conversation: it talks and listens",
                       description="One avatar in a conversation: its own voice drives it as in "
                       "drive; while the partner speaks it listens (closed mouth, nods after the "
                       "partner's phrases, smiles, gaze, blinks). The partner is a second file "
                       "(--partner), the other channel of a stereo file (--channel), or the other "
                       "speaker of a mixed recording (--speaker). The video has both voices. "
                       "Look-ahead: 92.5 ms.")  # fmt: skip
    p.add_argument("avatar", nargs="+", help="an avatar from avatar create (folder or .zip); "
                   "two for a two-person scene")  # fmt: skip
    p.add_argument("--audio", required=True, help="the (first) avatar's own voice, a stereo "
                   "file with --channel, or a mixed recording (two avatars: split by speaker, "
                   "the first avatar takes who speaks first)")  # fmt: skip
    p.add_argument("--layout", help="two avatars: where they stand, in words (side by side, "
                   "facing each other, at an angle, across a table; distances like '1.5 m "
                   "apart')")  # fmt: skip
    p.add_argument("--camera", default="two-shot", help="two avatars: two-shot (default), orbit, "
                   "over-shoulder-a or over-shoulder-b")  # fmt: skip
    p.add_argument("--swap", action="store_true", help="two avatars: exchange their voices")
    p.add_argument("--partner", help="the partner's voice, its own file")
    p.add_argument("--channel", choices=("left", "right"), help="the avatar's channel of a "
                   "stereo --audio file; the other channel is the partner")  # fmt: skip
    p.add_argument("--speaker", type=int, choices=(1, 2), help="the avatar's speaker in a mixed "
                   "recording (--audio): 1 speaks first; split offline by voice activity and "
                   "speaker embeddings (needs the diarize extra)")  # fmt: skip
    p.add_argument("-o", "--output", required=True, help="OUT.mp4")
    p.add_argument("--report", help="also write a JSON report: speech probabilities, the "
                   "motion of every frame, reaction delays, head speed")  # fmt: skip
    add_config_args(p, DriveConfig, skip=("transcript",))
    add_config_args(p, ListenConfig)
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    _add_body(p)
    p.set_defaults(func=cmd_converse)

    p = sub.add_parser("finetune", help="distil a teacher into an avatar's motion weights",
                       description="Per-identity fine-tuning: the avatar driven by the given "
                       "speech is rendered and compared with a teacher (frames, keypoints, "
                       "LPIPS, ARAP, and score distillation with a diffusers teacher). "
                       "A transcript a.txt beside a.wav is used for forced alignment. "
                       "Multi-GPU: torchrun --nproc_per_node=K -m avatar finetune ...")  # fmt: skip
    p.add_argument("avatar", help="an avatar from avatar create (folder or .zip)")
    p.add_argument("--audio", nargs="+", required=True, help="speech files to train on")
    p.add_argument("-o", "--output", help="the fine-tuned avatar (default: update in place)")
    add_config_args(p, FinetuneOptions)
    add_config_args(p, FinetuneConfig)
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    _add_body(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("export", help="an avatar as .splat, PLY, glTF or a PLY sequence",
                       description="splat / ply: the Gaussians for splat viewers; glb: the fitted "
                       "template mesh with its skeleton, skin weights and vertex colours "
                       "(Blender, Unity, three.js); ply-seq: with --audio, a folder of one PLY "
                       "of posed Gaussians per frame and frames.json with their times.")  # fmt: skip
    p.add_argument("avatar", help="an avatar (folder or .zip)")
    p.add_argument("-o", "--output", required=True, help="OUT.splat, OUT.ply, OUT.glb or OUT_DIR")
    p.add_argument("--format", choices=FORMATS, help="default: from the output's suffix "
                   "(no suffix: ply-seq)")  # fmt: skip
    p.add_argument("--pose", choices=POSES, default=ExportConfig.pose, help="splat / ply: rest "
                   "(canonical), body (the photo's pose, upright; default) or photo (where the "
                   "photo's camera saw it)")  # fmt: skip
    p.add_argument("--audio", help="ply-seq: the speech that drives it")
    p.add_argument("--fps", type=float, default=ExportConfig.fps, help="ply-seq frame rate "
                   "(default: 25)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="ply-seq: seed of the blinks (default: 0)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    _add_body(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="a local web app: create, 3D view, drive, download",
                       description="A web page on this machine: upload a photo (create, with "
                       "progress), look at the avatar in a 3D Gaussian viewer, upload or record "
                       "speech (drive, converse), download the avatar, .splat, PLY, GLB and "
                       "videos. Offline: the page loads nothing from the internet. Uploads and "
                       "outputs live in a temporary folder removed on exit.")  # fmt: skip
    p.add_argument("--port", type=int, default=7860, help="default: 7860 (0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--max-upload-mb", type=float, default=50.0,
                   help="largest upload accepted (default: 50)")  # fmt: skip
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="measure a talking video")
    ev = p.add_subparsers(dest="eval", required=True, metavar="WHAT")
    e = ev.add_parser("sync", help="lip sync, mouth shapes, jitter and identity",
                      description="MediaPipe inner-lip opening against 300-3000 Hz loudness "
                      "(Pearson r at lags -5..5), voiced/silent opening ratio, landmark jitter "
                      "in silence; with --transcript the mouth's shapes at its phones; SFace "
                      "identity against --photo (or the avatar's neutral face).")  # fmt: skip
    e.add_argument("video", help="a talking video (MP4 with its audio track)")
    e.add_argument("--audio", help="the speech, if the video has no audio track")
    e.add_argument("--photo", help="the avatar's input photo: identity against the person")
    e.add_argument(
        "--avatar",
        help="without --photo: identity against the avatar's own "
        "neutral render (does the video keep its face?)",
    )
    e.add_argument(
        "--transcript",
        help="what is said: rounding (/uw ow/ over /iy ih/), "
        "closure (/p b m/) and speaking-over-pause gap at its aligned phones",
    )
    e.add_argument("--size", type=int, default=512, help="reference render size (default: 512)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    _add_body(e)
    e.set_defaults(func=cmd_eval_sync)
    e = ev.add_parser("converse", help="a conversation video's mouth while talking and listening",
                      description="MediaPipe inner-lip gap while only the partner speaks over "
                      "while only the avatar speaks (≤ 0.15), from the video and its avatar "
                      "converse --report, with the report's head and reaction figures.")  # fmt: skip
    e.add_argument("video", help="a video from avatar converse")
    e.add_argument("--report", required=True, help="its --report JSON")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval_converse)
    e = ev.add_parser("speech", help="drive an avatar with known words and measure its mouth, "
                      "face and body", description="Drives the avatar with words espeak-ng says "
                      "one by one (rounded, spread and bilabial), then measures with MediaPipe: "
                      "lip rounding (≤ 0.85), bilabial closure (≤ 0.15) and speaking-over-pause "
                      "gap (≥ 2) in the face close-up, SFace identity against --photo (≥ 0.6), the "
                      "upper arms' angle from the torso (≤ 25°) and wrist motion in speech over "
                      "pauses (≥ 2) in the full framing. Needs espeak-ng.")  # fmt: skip
    e.add_argument("avatar", help="an avatar (folder or .zip)")
    e.add_argument("--photo", help="the photo it was made from (for the identity)")
    e.add_argument("--seed", type=int, default=0, help="which words, voice and speed (default: 0)")
    e.add_argument("--size", type=int, default=256, help="face close-up size (default: 256)")
    e.add_argument(
        "--no-particles",
        dest="particles",
        action="store_false",
        help="drive without particle twists and Gaussian residuals (the ablation)",
    )
    e.add_argument("--face-only", action="store_true", help="skip the full-body measures")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    _add_body(e)
    e.set_defaults(func=cmd_eval_speech)
    e = ev.add_parser("views", help="identity in face close-ups, no face on the back of the head",
                      description="SFace identity between the photo's face and the avatar's face "
                      "close-ups at yaw 0 and ±30 (target ≥ 0.6), and YuNet's best face score on "
                      "full-body and close-up renders from behind, yaw 150-210 (target < 0.5).")  # fmt: skip
    e.add_argument("avatar", help="an avatar (folder or .zip)")
    e.add_argument("--photo", help="the photo it was made from (for the identity)")
    e.add_argument("--size", type=int, default=512, help="render size (default: 512)")
    e.add_argument("--save", metavar="DIR", help="also write the renders as PNG files here")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    _add_body(e)
    e.set_defaults(func=cmd_eval_views)

    p = sub.add_parser("demo", help="the main job on built-in inputs")
    p.add_argument(
        "-o", "--output", default="avatar-demo", help="output folder (default: avatar-demo)"
    )
    p.add_argument("--frames", type=int, default=75, help="orbit frames (default: 75, 3 s)")
    add_config_args(p, CreateConfig)  # --size sets both the working crop and the video
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=cmd_demo)
    return parser


def _check_sizes(args: argparse.Namespace) -> None:
    for name in (
        "size",
        "orbit",
        "frames",
        "gaussians",
        "backward_size",
        "backward_steps",
        "fit_steps",
        "checkpoint_every",
        "steps",
    ):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise AvatarError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("size", "height"):
        if (getattr(args, name, None) or 0) > 8192:
            raise AvatarError(f"--{name} {getattr(args, name)} is too large (at most 8192)")
    if (getattr(args, "height", None) or 0) < 0:
        raise AvatarError(f"--height must be at least 0 (0: square), got {args.height}")


def _error(exc: BaseException) -> None:
    """One line on stderr, whatever the message holds."""
    print(f"avatar: error: {' '.join(str(exc).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from deform.audio import AudioError
    from render.io import SplatFileError

    args = build_parser().parse_args(argv)
    try:
        _check_sizes(args)
        return args.func(args)
    except AvatarError as exc:
        _error(exc)
        return exc.exit_code
    # a bad input file reported by a library layer, unreadable input, unwritable output, a
    # full disk: the message names the file; no traceback
    except (AudioError, SplatFileError, OSError) as exc:
        _error(exc)
        return 2
    except KeyboardInterrupt:
        print("avatar: interrupted; nothing was written", file=sys.stderr)
        return 130
