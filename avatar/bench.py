"""`avatar bench render`: rasteriser speed and memory on a person-shaped scene, as JSON.

Forward frames per second (averaged over a turntable of views) and forward+backward seconds are
measured on the automatically chosen backend. The pure-torch reference renders the first view of
the same scene in the same run, forward and forward+backward, and the ratios compare it with the
fast backend's median time on that same view, so they hold however busy the machine is.
"""

from __future__ import annotations

import contextlib
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from render import rasterize

from .errors import AvatarError
from .pipelines.render import OrbitConfig, orbit_cameras
from .scenes import person_scene


@dataclass(frozen=True)
class RenderBenchConfig:
    gaussians: int = 50_000
    """Gaussians in the person-shaped scene."""
    size: int = 512
    """Forward image width (and height, unless --height)."""
    height: int = 0
    """Forward image height (0: square); e.g. --size 1920 --height 1080."""
    frames: int = 30
    """Forward frames timed (views around the person)."""
    backward_size: int = 256
    """Image size for the forward+backward timing."""
    backward_steps: int = 10
    """Forward+backward iterations timed."""
    reference: bool = True
    """Also time the pure-torch reference on one view, forward and forward+backward (seconds)."""
    previous: str = ""
    """The source folder of another gsavatar release (e.g. a `git worktree` of the last one):
    its kernel is timed the same way, in a child process, on the same scene and views."""


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(device: str) -> str:
    from render import pick_device

    where = pick_device(device)
    return _cpu_name() if where.type == "cpu" else torch.cuda.get_device_name(where)


def _median_time(fn, repeats: int, sync, warmup: int = 0) -> float:
    """Median seconds of `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


REFERENCE_REPEATS = 3


def _versus_reference(scene, cam, small_cam, bg, target, sync) -> dict:
    """Like-for-like ratios: the same view rendered by both, forward and forward+backward."""

    def forward(backend):
        with torch.no_grad():
            return rasterize(scene, cam, background=bg, backend=backend)

    def step(backend):
        params = scene.clone().requires_grad_()
        out = rasterize(params, small_cam, background=bg, backend=backend)
        ((out.rgb - target).abs().mean() + out.alpha.mean()).backward()

    # like for like: each backend warm (one untimed call), then the median of the same count
    fast_fwd, fast_step, ref_fwd, ref_step = (
        _median_time(lambda fn=fn, b=b: fn(b), REFERENCE_REPEATS, sync, warmup=1)
        for fn, b in (
            (forward, "auto"),
            (step, "auto"),
            (forward, "reference"),
            (step, "reference"),
        )
    )
    diff = (forward("reference").rgb - forward("auto").rgb).abs().max().item()
    return {
        "reference_timing": f"both backends warm, median of {REFERENCE_REPEATS}",
        "forward_s_same_view": round(fast_fwd, 6),
        "reference_forward_s": round(ref_fwd, 3),
        "speedup_vs_reference": round(ref_fwd / fast_fwd, 1),
        "reference_forward_backward_s": round(ref_step, 3),
        "speedup_vs_reference_forward_backward": round(ref_step / fast_step, 1),
        "max_abs_diff_vs_reference": float(f"{diff:.2e}"),
    }


def bench_render(cfg: RenderBenchConfig, device: str = "cpu") -> dict:
    scene = person_scene(cfg.gaussians, sh_degree=1).to(device)
    cams = orbit_cameras(scene, OrbitConfig(orbit=cfg.frames, size=cfg.size, fill=0.6), cfg.height)
    bg = torch.ones(3, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    t0 = time.perf_counter()
    with torch.no_grad():
        first = rasterize(scene, cams[0], background=bg)  # includes one-off kernel compilation
    warmup_s = time.perf_counter() - t0

    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        for i in range(len(cams)):
            rasterize(scene, cams[i], background=bg)
        sync()
        fwd_s = (time.perf_counter() - t0) / len(cams)

    small = orbit_cameras(scene, OrbitConfig(orbit=cfg.backward_steps, size=cfg.backward_size))
    params = scene.clone().requires_grad_()
    target = torch.rand(1, cfg.backward_size, cfg.backward_size, 3, device=device)
    (rasterize(params, small[0], background=bg).rgb - target).abs().mean().backward()  # warm-up
    sync()
    t0 = time.perf_counter()
    for i in range(len(small)):
        out = rasterize(params, small[i], background=bg)
        loss = (out.rgb - target).abs().mean() + out.alpha.mean()
        loss.backward()
    sync()
    fwdbwd_s = (time.perf_counter() - t0) / len(small)
    peak_mb = _peak_rss_mb()

    visible = first.radii[0][(first.radii[0] > 0).any(-1)].max(-1).values.float()
    result = {
        "benchmark": "render",
        "backend": first.backend,
        "device": _device_name(device),
        "threads": torch.get_num_threads(),
        "gaussians": cfg.gaussians,
        "size": cfg.size,
        "height": cfg.height or cfg.size,
        "forward_fps": round(1.0 / fwd_s, 2),
        "forward_ms": round(fwd_s * 1000, 2),
        "forward_backward_s": round(fwdbwd_s, 4),
        "backward_size": cfg.backward_size,
        "peak_rss_mb": round(peak_mb, 1),
        "warmup_s": round(warmup_s, 2),
        "coverage": round((first.alpha[0] > 0.5).float().mean().item(), 3),
        "footprint_px_p5_p50_p95": [
            round(v, 1)
            for v in torch.quantile(
                visible, torch.tensor([0.05, 0.5, 0.95], device=visible.device)
            ).tolist()
        ],  # fmt: skip
        "config": asdict(cfg),
        "torch": torch.__version__,
    }
    if cfg.reference:
        result.update(_versus_reference(scene, cams[0], small[0], bg, target, sync))
    if cfg.previous:
        result.update(_versus_previous(cfg, device, result))
    return result


def _versus_previous(cfg: RenderBenchConfig, device: str, ours: dict) -> dict:
    """`avatar bench render` of the release in `cfg.previous`, same settings, and the ratios."""
    import json
    import os
    import subprocess

    root = Path(cfg.previous).expanduser().resolve()
    if not (root / "avatar" / "bench.py").is_file():
        raise AvatarError(f"--previous {cfg.previous}: not a gsavatar source folder "
                          "(no avatar/bench.py in it)")  # fmt: skip
    argv = [sys.executable, "-m", "avatar", "bench", "render", "--json", "--no-reference",
            "--device", device]  # fmt: skip
    for name in ("gaussians", "size", "frames", "backward_size", "backward_steps"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(cfg, name))]
    if cfg.height:  # releases before 3c76fdd render squares only: theirs fails and says so
        argv += ["--height", str(cfg.height)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    res = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise AvatarError(f"--previous {cfg.previous}: its bench render failed: "
                          f"{res.stderr.strip()[-400:]}")  # fmt: skip
    prev = json.loads(res.stdout.strip().splitlines()[-1])
    return {
        "previous": str(root),
        "previous_forward_ms": prev["forward_ms"],
        "previous_forward_backward_s": prev["forward_backward_s"],
        "speedup_vs_previous": round(prev["forward_ms"] / ours["forward_ms"], 3),
        "speedup_vs_previous_forward_backward": round(
            prev["forward_backward_s"] / ours["forward_backward_s"], 3
        ),
    }


def bench_create(photo: str | None, cfg) -> dict:
    """Stage timings, quality and peak memory of `avatar create` (default: the demo photo), and
    the issue's view checks: MediaPipe on the input-view render (are the photo's hands found?),
    on renders from yaw +-45 (shoulders and hips visible at >= 0.5?), holes in the back view
    (share of the closed silhouette with alpha < 0.5), and `avatar eval views` (identity in
    face close-ups, no face on the back of the head)."""
    from .pipelines.create import create_avatar
    from .scenes import demo_photo

    photo = photo or demo_photo()
    avatar, times = create_avatar(photo, cfg, progress=False)
    result = {
        "benchmark": "create",
        "photo": photo,
        "device": _cpu_name(),
        "threads": torch.get_num_threads(),
        "total_s": round(times.total_s, 1),
        "parse_s": round(times.parse_s, 2),
        "fit_s": round(times.fit_s, 1),
        "sample_s": round(times.sample_s, 2),
        "reconstruct_s": round(times.reconstruct_s, 2),
        "refine_s": round(times.refine_s, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        **avatar.meta["quality"],
        "gaussians": len(avatar.gaussians),
    }
    result.update(view_checks(avatar))
    if avatar.template == "anny":  # identity up close and the back of the head (avatar.views)
        from .views import view_metrics

        result["views"] = view_metrics(avatar, photo)
    result["config"] = asdict(cfg)
    return result


def bench_create_seeds(photo: str | None, cfg, seeds: list[int]) -> dict:
    """`bench_create` once per sampling seed (`cfg.seed` replaced): each run, and each figure
    over them (`over_seeds`). What SFace reads 30° off the photo moves by up to 0.12 with the
    seed alone, and YuNet's score from behind by up to 0.25: one create says little about a
    change."""
    runs = []
    for seed in seeds:
        run = bench_create(photo, replace(cfg, seed=seed))
        run.pop("config")
        runs.append(run)
    return {"benchmark": "create", "photo": runs[0]["photo"], "seeds": list(seeds), "runs": runs,
            "over_seeds": over_runs(runs), "config": asdict(replace(cfg, seed=seeds[0]))}  # fmt: skip


def over_runs(runs: list[dict]) -> dict:
    """Each figure the `runs` (nested dicts alike) all hold, over them: a number's mean, standard
    deviation (population), min and max; a yes/no's share of runs that say yes. Keys are the
    figure's path, dotted ("views.identity.yaw_30")."""

    def leaves(d: dict, path: str = "") -> dict:
        out = {}
        for key, value in d.items():
            if isinstance(value, dict):
                out.update(leaves(value, f"{path}{key}."))
            elif isinstance(value, (bool, int, float)):
                out[path + key] = value
        return out

    flat = [leaves(run) for run in runs]
    summary = {}
    for key in flat[0]:
        values = [f.get(key) for f in flat]
        if any(v is None or isinstance(v, bool) != isinstance(values[0], bool) for v in values):
            continue  # not in every run (SFace found no face), or not of one kind
        if isinstance(values[0], bool):
            summary[key] = {"share": round(sum(values) / len(values), 3)}
        else:
            x = torch.tensor(values, dtype=torch.float64)
            summary[key] = {"mean": round(float(x.mean()), 4), "sd": round(float(x.std(correction=0)), 4),
                            "min": round(float(x.min()), 4), "max": round(float(x.max()), 4)}  # fmt: skip
    return summary


def view_checks(avatar) -> dict:
    import cv2
    import numpy as np

    from reconstruct.parsing import NoPersonError, PersonParser
    from render import to_uint8

    from .pipelines.create import posed_gaussians
    from .pipelines.render import OrbitConfig, orbit_cameras

    template = avatar.body_template()
    checks: dict = {}
    with torch.no_grad(), PersonParser() as parser:
        front = rasterize(posed_gaussians(avatar, template, "photo"), avatar.camera, background=1.0)
        photo_hands = avatar.meta["provenance"]["hands_found"]
        try:
            seen = parser(to_uint8(front.rgb[0])).hands
            checks["hands_in_input_render"] = {
                k: seen[k] is not None for k in photo_hands if photo_hands[k]
            }
        except NoPersonError:
            checks["hands_in_input_render"] = "no person found in the input-view render"
        body = posed_gaussians(avatar, template, "body")
        for yaw in (45.0, -45.0):
            cam = orbit_cameras(body, OrbitConfig(orbit=1, size=512, yaw=yaw, fill=0.75))
            img = to_uint8(rasterize(body, cam, background=1.0).rgb[0])
            try:
                vis = parser(img).body[[11, 12, 23, 24], 2]
                checks[f"yaw{yaw:+.0f}_shoulder_hip_visibility"] = [round(float(v), 3) for v in vis]
            except NoPersonError:
                checks[f"yaw{yaw:+.0f}_shoulder_hip_visibility"] = "no person found"
        cam = orbit_cameras(body, OrbitConfig(orbit=1, size=512, yaw=180.0, fill=0.75))
        alpha = rasterize(body, cam).alpha[0, ..., 0].numpy()
    solid = (alpha > 0.5).astype(np.uint8)
    closed = cv2.morphologyEx(solid, cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8))
    checks["back_view_hole_fraction"] = round(
        float((closed & (1 - solid)).sum() / max(closed.sum(), 1)), 4
    )
    return checks


# ---- avatar bench drive ----------------------------------------------------------------------
@dataclass(frozen=True)
class DriveBenchConfig:
    avatar: str = ""
    """The avatar to drive (default: one created from the demo photo first, not timed)."""
    body: str = ""
    """An SMPL-X avatar's template files (smplx:PATH); an avatar never names them itself."""
    audio: str = ""
    """Speech to drive with (default: the built-in demo clip), looped or cut to --seconds."""
    seconds: float = 10.0
    """Length of the timed clip."""
    long_seconds: float = 60.0
    """Length of the second clip for the memory comparison (0: skip it; 600 for 10 minutes)."""
    size: int = 512
    """Video size."""
    framing: str = "full"
    """full, upper or face."""
    profile: str = ""
    """Also write the timed drive's Python stacks, sampled every 5 ms, to this file (collapsed
    stacks: flamegraph.pl, speedscope or inferno draw it); sampling costs a few percent."""
    device: str = "auto"
    """Where the avatar is posed and rendered (avatar drive --device): auto, cpu or cuda."""


STAGES = ("setup", "audio", "deformer", "rig", "render", "encode")  # drive's stages, in order


def _drive_worker(avatar_path: str, audio_path: str, cfg: DriveBenchConfig, queue) -> None:
    import tempfile

    from render.profiling import Profile, StackSampler

    from .asset import Avatar
    from .pipelines.drive import DriveConfig, drive_avatar

    sampler = StackSampler() if cfg.profile else contextlib.nullcontext()
    try:
        avatar = Avatar.load(avatar_path, cfg.body)
        with tempfile.TemporaryDirectory() as tmp, sampler, Profile() as prof:
            summary = drive_avatar(avatar, audio_path, Path(tmp) / "bench.mp4",
                                   DriveConfig(size=cfg.size, framing=cfg.framing,
                                               device=cfg.device), progress=False)  # fmt: skip
        if cfg.profile:
            summary["profile_samples"] = sampler.write(cfg.profile)
    except AvatarError as exc:
        queue.put({"error": str(exc)})
        return
    own = resource.getrusage(resource.RUSAGE_SELF)  # all threads: torch's, numba's, x264's
    queue.put({"wall_s": prof.wall, "peak_rss_mb": _peak_rss_mb(), "stages": prof.report(STAGES),
               "cpu_s": own.ru_utime + own.ru_stime, **summary})  # fmt: skip


def _end_to_end(avatar_path: str, audio_path: str, cfg: DriveBenchConfig, out: Path) -> float:
    """`avatar drive` as a user runs it: process start to the MP4 on disk, seconds."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "avatar", "drive", avatar_path, audio_path, "-o", str(out),
            "--size", str(cfg.size), "--framing", cfg.framing, "--device", cfg.device]  # fmt: skip
    if cfg.body:
        argv += ["--body", cfg.body]
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise AvatarError(f"bench drive: avatar drive failed: {res.stderr.strip()[-500:]}")
    return wall


def _timed_drive(avatar_path: str, audio_path: str, cfg: DriveBenchConfig) -> dict:
    """One drive in a fresh process, so its peak memory is its own."""
    import multiprocessing as mp
    import queue as queues

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_drive_worker, args=(avatar_path, audio_path, cfg, queue))
    proc.start()
    while True:  # the worker's result, or its death
        try:
            result = queue.get(timeout=1.0)
            break
        except queues.Empty:
            if not proc.is_alive():
                raise AvatarError(
                    f"bench drive: the drive process died (exit code {proc.exitcode})"
                ) from None
    proc.join()
    if "error" in result:
        raise AvatarError(result["error"])
    return result


def _speech_of_length(source: str, seconds: float, path: Path) -> None:
    import numpy as np

    from deform.audio import SAMPLE_RATE, load_audio

    from .media import write_wav

    samples = load_audio(source).samples
    n = int(round(seconds * SAMPLE_RATE))
    write_wav(path, np.resize(samples, n), SAMPLE_RATE)


def _check_speech(path: str) -> None:
    from deform.audio import AudioError, load_audio

    if path:
        try:
            load_audio(path)
        except AudioError as exc:
            raise AvatarError(str(exc)) from None


def bench_drive(cfg: DriveBenchConfig) -> dict:
    import tempfile

    from .scenes import demo_photo, demo_speech

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        avatar_path = cfg.avatar
        if avatar_path:  # a bad avatar or speech file fails here, before anything is timed
            from .asset import Avatar
            from .pipelines.drive import DriveConfig, load_motion_model

            avatar = Avatar.load(avatar_path, cfg.body)
            avatar.body_template()
            load_motion_model(avatar, DriveConfig())
        _check_speech(cfg.audio)
        if not avatar_path:
            from .pipelines.create import create_avatar

            avatar, _ = create_avatar(demo_photo(), progress=False)
            avatar_path = str(tmp / "bench.avatar")
            avatar.save(avatar_path)
        source = cfg.audio or str(demo_speech())
        _speech_of_length(source, cfg.seconds, tmp / "short.wav")
        short = _timed_drive(avatar_path, str(tmp / "short.wav"), cfg)
        end_to_end = _end_to_end(avatar_path, str(tmp / "short.wav"), cfg, tmp / "e2e.mp4")
        result = {
            "audio_s": short["audio_s"],
            "frames": short["frames"],
            "size": cfg.size,
            "framing": cfg.framing,
            "wall_s": round(short["wall_s"], 2),
            "realtime_factor": round(short["wall_s"] / short["audio_s"], 3),
            "fps": round(short["frames"] / short["wall_s"], 2),
            "end_to_end_s": round(end_to_end, 2),
            "end_to_end_realtime_factor": round(end_to_end / short["audio_s"], 3),
            "peak_rss_mb": round(short["peak_rss_mb"], 1),
            "stage_seconds": short["stages"]["seconds"],
            "stage_shares": short["stages"]["shares"],
            "process_cpu_s": round(short["cpu_s"], 2),
        }
        if cfg.profile:
            result["profile"] = f"{cfg.profile} ({short['profile_samples']} stack samples)"
        if cfg.long_seconds > 0:
            _speech_of_length(source, cfg.long_seconds, tmp / "long.wav")
            long = _timed_drive(avatar_path, str(tmp / "long.wav"), cfg)
            result.update({
                "long_audio_s": long["audio_s"],
                "long_wall_s": round(long["wall_s"], 2),
                "long_peak_rss_mb": round(long["peak_rss_mb"], 1),
                "memory_ratio_long_vs_short": round(long["peak_rss_mb"] / short["peak_rss_mb"], 3),
            })  # fmt: skip
    result.update({"audio": cfg.audio or "built-in demo clip", "threads": torch.get_num_threads(),
                   "cpu": _cpu_name(), "python": platform.python_version(),
                   "device": _device_name(cfg.device)})  # fmt: skip
    return result


# ---- avatar bench finetune -------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneBenchConfig:
    avatar: str = ""
    """The avatar (default: one created from the demo photo first, not timed)."""
    body: str = ""
    """An SMPL-X avatar's template files (smplx:PATH); an avatar never names them itself."""
    audio: str = ""
    """Speech to train on (default: the built-in demo clip)."""
    size: int = 256
    """Training render size."""
    frames: int = 8
    """Frames per training window."""
    steps: int = 5
    """Training steps timed (after one untimed warm-up step)."""


def bench_finetune(cfg: FinetuneBenchConfig) -> dict:
    """Seconds per distillation step (procedural teacher, all losses on) and, as the reference
    in the same run, the same window rendered forward only (no gradients)."""
    import numpy as np

    from distill.finetune import FinetuneConfig
    from distill.trainer import step_generators

    from .asset import Avatar
    from .pipelines.finetune import FinetuneOptions, build_objective
    from .scenes import demo_photo, demo_speech

    _check_speech(cfg.audio)
    if cfg.avatar:
        avatar = Avatar.load(cfg.avatar, cfg.body)
    else:
        from .pipelines.create import create_avatar

        avatar, _ = create_avatar(demo_photo(), progress=False)
    opts = FinetuneOptions(size=cfg.size)
    obj = build_objective(
        avatar, [cfg.audio or demo_speech()], opts, FinetuneConfig(frames=cfg.frames)
    )
    opt = torch.optim.Adam(obj.param_groups())
    steps, renders = [], []
    for step in range(cfg.steps + 1):
        rng, gen = step_generators(0, 0, step)
        t0 = time.perf_counter()
        terms = obj(step, rng, gen)
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
        steps.append(time.perf_counter() - t0)
        window = obj.scene.sample_window(step_generators(0, 0, step)[0], cfg.frames)
        t0 = time.perf_counter()
        with torch.no_grad():
            obj.student(window, obj.motion(window, None), torch.zeros(window.num))
        renders.append(time.perf_counter() - t0)
    step_s, render_s = float(np.median(steps[1:])), float(np.median(renders[1:]))
    return {
        "size": cfg.size,
        "frames": cfg.frames,
        "gaussians": len(avatar.gaussians),
        "terms": sorted(terms),
        "seconds_per_step": round(step_s, 3),
        "forward_only_s": round(render_s, 3),
        "step_vs_forward": round(step_s / render_s, 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
    }
