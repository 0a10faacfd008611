"""The LHM-style reconstructor with the hand-attention branch: one photo -> canonical Gaussians
in one forward pass.

    body crop ──ViT──▶ body tokens ─┐
    head crop ──ViT──▶ head tokens ─┤   joint (multimodal) attention blocks, one set of
    hand RoIs ──ViT──▶ hand tokens ─┤   weights per modality, parts chosen by an attention
    query points on the template ───┘   mask built from the explicit part masks
                                               │
    every Gaussian reads its nearest queries ──▶ D_G (per-Gaussian MLP) ──▶ offset, scale,
                                                 rotation, opacity, colour

- Query tokens are points of the canonical template surface from the same sampler as `avatar
  create` (a seeded subset of the template Gaussians), each with a part group: body, head, left
  hand, right hand (`part_groups`).
- Attention (`attention_mask`): queries attend to each other and to the body tokens; head queries
  also to the head tokens; with the Hand++ branch, left / right hand queries also to the tokens
  of their hand's RoI: K = [K_fb ∥ K_hand], V = [V_fb ∥ V_hand]. Image tokens attend within
  their own image and to the queries of their part (body tokens to all), as in LHM's blocks.
- Queries and body tokens share one embedding of their position in the body crop (the query's is
  where the fitted template projects it), so attention can match them; queries also start from
  the body features sampled there (pixel-aligned).
- D_G is applied per Gaussian on the inverse-distance blend of its k nearest queries of the same
  part, its own position and its photo colour where the photo sees it; a learned gate decides how
  much of that colour to keep. The Gaussian count is thus free of the token count. A Gaussian the
  photo sees moves only along its viewing ray, so it stays where its colour was read.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from render import Gaussians
from render.sh import rgb_to_sh0

from .canonical import PART_CODES

GROUPS = ("body", "head", "hand_left", "hand_right")
HEAD_PARTS = ("face", "lips", "eyelids", "mouth")
PROFILE_PX = (-8.0, -4.0, 0.0, 4.0, 8.0, 16.0, 32.0)  # per 512 px of crop
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def part_groups(parts: Tensor) -> Tensor:  # [N] uint8 PART_CODES -> [N] long, index in GROUPS
    groups = torch.zeros(parts.shape, dtype=torch.long, device=parts.device)
    for name in HEAD_PARTS:
        groups[parts == PART_CODES[name]] = 1
    groups[parts == PART_CODES["hand_left"]] = 2
    groups[parts == PART_CODES["hand_right"]] = 3
    return groups


@dataclass(frozen=True)
class ReconstructorConfig:
    dim: int = 128
    """Width of the query and image tokens in the joint blocks."""
    heads: int = 4
    blocks: int = 4
    queries: int = 1024
    """Query points on the template surface."""
    body_size: int = 192
    """Side of the square (letterboxed) person crop the body encoder sees, pixels."""
    part_size: int = 64
    """Side of the head crop and of each hand RoI, pixels."""
    encoder_dim: int = 128
    encoder_layers: int = 4
    """Layers of the body encoder (head and hand encoders have half)."""
    encoder_path: str | None = None
    """A local transformers ViT / DINOv2 folder for the body and head encoders (else our own)."""
    hand_branch: bool = True
    """Hand++: hand queries also attend to hand-RoI tokens."""
    knn: int = 4
    """Queries each Gaussian reads."""
    max_offset: float = 0.06
    """Largest offset D_G may move a Gaussian off the template, metres."""

    def __post_init__(self) -> None:
        if self.dim % self.heads or min(self.dim, self.heads, self.blocks, self.queries) < 1:
            raise ValueError(f"dim ({self.dim}) must be a positive multiple of heads ({self.heads}),"
                             " and blocks and queries at least 1")  # fmt: skip
        if self.body_size < 16 or self.part_size < 8 or self.knn < 1 or self.max_offset < 0:
            raise ValueError("body_size >= 16, part_size >= 8, knn >= 1, max_offset >= 0 needed")

    @classmethod
    def from_dict(cls, values: dict) -> ReconstructorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown reconstructor settings: {', '.join(unknown)}")
        return cls(**values)


@dataclass
class ReconInputs:
    """One photo prepared for the network (see `reconstruct.feedforward.prepare_inputs`)."""

    body: Tensor  # [3, S, S] person crop on white, letterboxed
    head: Tensor | None  # [3, s, s]
    hands: dict[str, Tensor]  # "hand_left" / "hand_right" -> [3, s, s] (left mirrored)
    template: Gaussians  # [N] canonical template Gaussians
    groups: Tensor  # [N] long, index in GROUPS
    uv: Tensor  # [N, 2] where each posed Gaussian lands in the body crop, in [-1, 1]
    visible: Tensor  # [N] float: the photo sees it
    photo_rgb: Tensor  # [N, 3] the photo's colour where it lands
    profile: Tensor  # [N, P] the person mask along its outward normal in the photo (PROFILE_PX)
    rays: Tensor  # [N, 3] unit viewing ray at each Gaussian, in canonical space
    query_ids: Tensor  # [Q] long, indices into N
    knn_ids: Tensor  # [N, k] long, indices into Q
    knn_weights: Tensor  # [N, k], rows sum to 1


def fourier(x: Tensor, bands: int, scale: float) -> Tensor:  # [..., D] -> [..., D (1 + 2 bands)]
    freqs = scale * 2.0 ** torch.arange(bands, dtype=x.dtype, device=x.device) * math.pi
    ang = x[..., None] * freqs
    return torch.cat([x, ang.sin().flatten(-2), ang.cos().flatten(-2)], -1)


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.GELU(), nn.Linear(hidden, out))


class ImageEncoder(nn.Module):
    """A ViT over a square image -> patch tokens [P, out_dim] and their grid (gh, gw)."""

    def __init__(self, size: int, patch: int, width: int, layers: int, out_dim: int,
                 path: str | None = None) -> None:  # fmt: skip
        super().__init__()
        if path:
            from transformers import AutoModel

            self.vit = AutoModel.from_pretrained(path, local_files_only=True)
            patch = int(self.vit.config.patch_size)
            width = int(self.vit.config.hidden_size)
        else:
            from transformers import ViTConfig, ViTModel

            cfg = ViTConfig(image_size=size, patch_size=patch, hidden_size=width,
                            num_hidden_layers=layers, num_attention_heads=max(1, width // 32),
                            intermediate_size=2 * width)  # fmt: skip
            self.vit = ViTModel(cfg, add_pooling_layer=False)
        self.grid = (size // patch, size // patch)
        self.proj = nn.Linear(width, out_dim)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN)[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD)[:, None, None], persistent=False)

    def forward(self, images: Tensor) -> Tensor:  # [B, 3, S, S] in [0, 1] -> [B, P, out_dim]
        extra = {"interpolate_pos_encoding": True} if self.vit.config.model_type == "vit" else {}
        hidden = self.vit(pixel_values=(images - self.mean) / self.std, **extra).last_hidden_state
        return self.proj(hidden[:, -self.grid[0] * self.grid[1] :])  # drop CLS / registers


class JointBlock(nn.Module):
    """Pre-norm attention + MLP over a sequence of several modalities, each with its own
    weights (LHM's multimodal block), attention restricted by a boolean mask."""

    def __init__(self, dim: int, heads: int, modalities: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(modalities))
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(modalities))
        self.out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(modalities))
        self.norm2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(modalities))
        self.mlp = nn.ModuleList(_mlp(dim, 4 * dim, dim) for _ in range(modalities))

    def forward(self, xs: list[tuple[int, Tensor]], mask: Tensor) -> list[tuple[int, Tensor]]:
        """xs: (modality, tokens [L_i, dim]) in sequence order; mask [L, L] True = attend."""
        qkv = torch.cat([self.qkv[m](self.norm1[m](x)) for m, x in xs])
        length, dim = qkv.shape[0], qkv.shape[1] // 3
        q, k, v = qkv.view(length, 3, self.heads, dim // self.heads).permute(1, 2, 0, 3)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        att = att.permute(1, 0, 2).reshape(length, dim)
        out, start = [], 0
        for m, x in xs:
            x = x + self.out[m](att[start : start + len(x)])
            out.append((m, x + self.mlp[m](self.norm2[m](x))))
            start += len(x)
        return out


def attention_mask(is_query: Tensor, group: Tensor) -> Tensor:  # [L] bool, [L] long -> [L, L]
    """Who attends to whom (see the module docstring), from explicit part groups only."""
    qi, qj = is_query[:, None], is_query[None, :]
    gi, gj = group[:, None], group[None, :]
    same = gi == gj
    return (qi & qj) | same | (qi & ~qj & (gj == 0)) | (~qi & qj & (gi == 0))


class GaussianDecoder(nn.Module):
    """D_G: per-Gaussian MLP -> offset, log-scale change, rotation change, opacity, colour."""

    BANDS = 6

    def __init__(self, dim: int, max_offset: float) -> None:
        super().__init__()
        self.max_offset = max_offset
        inp = dim + 3 * (1 + 2 * self.BANDS) + len(GROUPS) + 3 + 1 + len(PROFILE_PX)
        self.net = nn.Sequential(nn.Linear(inp, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim),
                                 nn.GELU(), nn.Linear(dim, 15))  # fmt: skip
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: Tensor, inp: ReconInputs) -> Gaussians:  # features [N, dim]
        return self.gaussians(self.net(self.inputs(features, inp)), inp)

    def inputs(self, features: Tensor, inp: ReconInputs) -> Tensor:
        """The MLP's per-Gaussian input [N, in]: features, template place, group, photo colour,
        visibility, silhouette profile."""
        tpl = inp.template
        return torch.cat([features, fourier(tpl.means, self.BANDS, 1.0),
                          F.one_hot(inp.groups, len(GROUPS)).to(features), inp.photo_rgb,
                          inp.visible[:, None], inp.profile], -1)  # fmt: skip

    def gaussians(self, o: Tensor, inp: ReconInputs) -> Gaussians:
        """The template's Gaussians changed by the MLP's outputs o [N, 15]."""
        tpl = inp.template
        vis = inp.visible[:, None]
        gate = torch.sigmoid(o[:, 14:15] + 2.0) * vis  # starts by trusting the photo
        rgb = gate * inp.photo_rgb + (1 - gate) * torch.sigmoid(o[:, 11:14])
        # pixel-aligned: a Gaussian the photo sees keeps where it lands in the photo (its colour
        # was read there) and moves only along its viewing ray
        offset = self.max_offset * torch.tanh(o[:, 0:3])
        along = (offset * inp.rays).sum(-1, keepdim=True) * inp.rays
        offset = offset - vis * (offset - along)
        return tpl.replace(
            means=tpl.means + offset,
            log_scales=tpl.log_scales + 0.5 * torch.tanh(o[:, 3:6]),
            quats=F.normalize(tpl.quats, dim=-1) + 0.25 * torch.tanh(o[:, 6:10]),
            opacity_logits=tpl.opacity_logits + o[:, 10],
            sh=rgb_to_sh0(rgb)[:, None],
        )


class Reconstructor(nn.Module):
    def __init__(self, cfg: ReconstructorConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ReconstructorConfig()
        d, w = cfg.dim, cfg.encoder_dim
        self.body_encoder = ImageEncoder(cfg.body_size, 16, w, cfg.encoder_layers, d,
                                         cfg.encoder_path)  # fmt: skip
        self.head_encoder = ImageEncoder(cfg.part_size, 8, w, max(1, cfg.encoder_layers // 2), d,
                                         cfg.encoder_path)  # fmt: skip
        self.hand_encoder = (
            ImageEncoder(cfg.part_size, 8, w, max(1, cfg.encoder_layers // 2), d)
            if cfg.hand_branch
            else None
        )
        self.uv_embed = _mlp(2 * (1 + 2 * 8), d, d)  # shared by queries and body tokens
        self.query_embed = _mlp(3 * (1 + 2 * 8), d, d)
        self.group_embed = nn.Embedding(len(GROUPS), d)
        self.pixel_feature = nn.Linear(d, d)
        self.visible_embed = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList(JointBlock(d, cfg.heads, 4) for _ in range(cfg.blocks))
        self.norm = nn.LayerNorm(d)
        self.decoder = GaussianDecoder(d, cfg.max_offset)

    # ---- the forward pass --------------------------------------------------------------------
    def forward(self, inp: ReconInputs) -> Gaussians:
        return self.decoder(self.features(inp), inp)

    def features(self, inp: ReconInputs) -> Tensor:  # -> [N, dim] per-Gaussian query features
        """Everything before D_G: encoders, joint blocks, and each Gaussian's blend of queries."""
        d = self.cfg.dim
        body = self.body_encoder(inp.body[None])[0]  # [P, d]
        gh, gw = self.body_encoder.grid
        fmap = body.T.reshape(1, d, gh, gw)
        centres = torch.stack(torch.meshgrid((torch.arange(gh) + 0.5) / gh * 2 - 1,
                                             (torch.arange(gw) + 0.5) / gw * 2 - 1,
                                             indexing="ij")[::-1], -1).reshape(-1, 2)  # fmt: skip
        body = body + self.uv_embed(fourier(centres.to(body), 8, 1.0))

        qid = inp.query_ids
        uv = inp.uv[qid]
        pixel = F.grid_sample(fmap, uv[None, None], align_corners=False)[0, :, 0].T  # [Q, d]
        groups = inp.groups[qid]
        queries = (
            self.query_embed(fourier(inp.template.means[qid], 8, 1.0))
            + self.group_embed(groups)
            + self.uv_embed(fourier(uv, 8, 1.0))
            + self.pixel_feature(pixel)
            + inp.visible[qid, None] * self.visible_embed
        )

        seq: list[tuple[int, Tensor]] = [(0, queries), (1, body)]
        seq_groups = [groups, groups.new_zeros(len(body))]
        if inp.head is not None:
            head = self.head_encoder(inp.head[None])[0] + self.group_embed.weight[1]
            seq.append((2, head))
            seq_groups.append(groups.new_full((len(head),), 1))
        if self.hand_encoder is not None:
            for g, side in ((2, "hand_left"), (3, "hand_right")):
                if side in inp.hands:
                    hand = self.hand_encoder(inp.hands[side][None])[0] + self.group_embed.weight[g]
                    seq.append((3, hand))
                    seq_groups.append(groups.new_full((len(hand),), g))
        group = torch.cat(seq_groups)
        is_query = torch.zeros(len(group), dtype=torch.bool, device=group.device)
        is_query[: len(queries)] = True
        mask = attention_mask(is_query, group)
        for block in self.blocks:
            seq = block(seq, mask)
        q = self.norm(seq[0][1])
        return (q[inp.knn_ids] * inp.knn_weights[..., None]).sum(1)

    # ---- files -------------------------------------------------------------------------------
    def save(self, path: str | Path, info: dict | None = None) -> None:
        """PATH.safetensors (fp16 weights) + PATH.json (config and `info`), written atomically."""
        from safetensors.torch import save_file

        from render.io import atomic_path

        path = Path(path).with_suffix(".safetensors")
        state = {k: v.detach().half().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp))
        doc = {"format": "gsavatar-reconstructor", "version": 1, "config": asdict(self.cfg),
               **(info or {})}  # fmt: skip
        with atomic_path(path.with_suffix(".json")) as tmp:
            Path(tmp).write_text(json.dumps(doc, indent=1) + "\n")


DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "reconstructor.safetensors"


def checkpoint_files(path: str | Path) -> tuple[Path, Path]:
    """(weights, config) of PATH: X.safetensors with X.json beside it, or a folder holding one
    such pair."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise ValueError(f"{path}: expected one .safetensors file (+ its .json) in the folder, "
                             f"found {len(found)}")  # fmt: skip
        path = found[0]
    weights, config = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for p in (weights, config):
        if not p.is_file():
            raise ValueError(f"{path}: reconstructor checkpoint needs {p.name} (not found)")
    return weights, config


def load_reconstructor(path: str | Path | None = None) -> Reconstructor:
    """The shipped reconstructor (`path` None) or a checkpoint written by `Reconstructor.save`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, config = checkpoint_files(path or DEFAULT_CHECKPOINT)
    try:
        doc = json.loads(config.read_text())
        if doc.get("format") != "gsavatar-reconstructor":
            raise ValueError("not a gsavatar reconstructor config")
        model = Reconstructor(ReconstructorConfig.from_dict(doc["config"]))
        state = load_file(str(weights))
    except (ValueError, KeyError, TypeError, OSError, SafetensorError) as exc:
        raise ValueError(
            f"{config.parent / config.stem}: unreadable reconstructor ({exc})"
        ) from None
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ValueError(f"{weights}: weights do not match the config ({first})") from None
    return model.eval()
