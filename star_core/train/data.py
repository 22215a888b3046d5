"""Training clips: paired HQ/LQ folders, or HQ-only folders degraded on the fly; random crops and frame windows.

Layout (the names match without their extension)::

    data/HQ/clip_a.mp4     data/LQ/clip_a.mp4        a video per clip (any PyAV-readable format), or
    data/HQ/clip_b/0001.png ...  data/LQ/clip_b/...  a folder of frames per clip (sorted by name)
    data/HQ/clip_a.txt                               optional caption of clip_a (UTF-8 text)

An LQ clip has the HQ clip's frame count and either its size or its size divided by an integer factor (e.g. ×4
smaller); it is resized back to the HQ crop (bilinear by default, as the inference pipeline upscales its input;
the official training pairs were bicubic). Without an LQ folder each HQ crop is degraded with
`star_core.train.degrade`. Every random choice of a sample comes from the seed it is asked with, so a sample is
the same whenever it is drawn again (resumed runs, other workers).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from ..text.prompts import DEFAULT_PROMPT
from ..video_io import VIDEO_EXTENSIONS, probe_video, read_frames
from .degrade import DegradationSettings, degrade

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
NULL_TEXT_RATIO = 0.5  # official: the empty prompt half of the time (dataset.py)
LQ_RESIZE_MODES = ("bilinear", "bicubic")
MAX_LQ_FACTOR = 8


@dataclass(frozen=True)
class Clip:
    """One clip on disk: a video file or a folder of frames.

    Attributes:
        path (`Path`): the file or folder.
        frames (`int`): frame count.
        height, width (`int`): frame size.
        files (`tuple[Path, ...]`): the frame files of a folder (empty for a video).
    """

    path: Path
    frames: int
    height: int
    width: int
    files: tuple[Path, ...] = ()

    @classmethod
    def open(cls, path: Path) -> "Clip":
        """Probes a video file or a frame folder."""
        if path.is_dir():
            files = tuple(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS))
            if not files:
                raise ValueError(f"clip folder {path} holds no frames ({', '.join(IMAGE_EXTENSIONS)})")
            height, width = _read_image(files[0]).shape[:2]
            return cls(path, len(files), height, width, files)
        info = probe_video(path)
        return cls(path, info.frame_count, info.height, info.width)

    def read(self, start: int, count: int, stride: int = 1) -> np.ndarray:
        """Frames ``start, start+stride, …`` (``count`` of them) as uint8 RGB ``[count,H,W,3]``."""
        wanted = range(start, start + (count - 1) * stride + 1, stride)
        if self.files:
            frames = [_read_image(self.files[i]) for i in wanted]
        else:
            frames, index, keep = [], 0, set(wanted)
            for window in read_frames(self.path, 8):
                for frame in window:
                    if index in keep:
                        frames.append(frame)
                    index += 1
                if index > wanted[-1]:
                    break
        if len(frames) != count:
            raise ValueError(f"{self.path}: could read only {len(frames)} of the frames {start}..{wanted[-1]} "
                             f"(the file is shorter than its header says, or damaged)")
        shapes = {f.shape for f in frames}
        if len(shapes) != 1:
            raise ValueError(f"{self.path}: frames of different sizes {sorted(shapes)}")
        return np.stack(frames)


def _read_image(path: Path) -> np.ndarray:
    try:
        with av.open(str(path)) as container:
            return next(container.decode(video=0)).to_ndarray(format="rgb24")
    except (av.error.FFmpegError, StopIteration) as exc:
        raise ValueError(f"cannot read the frame {path} as an image ({exc})") from exc


def _entries(folder: Path) -> dict[str, Path]:
    """Clip name → video file or frame folder, for everything in ``folder`` that is a clip."""
    if not folder.is_dir():
        raise FileNotFoundError(f"clip folder {folder} does not exist")
    out = {}
    for path in sorted(folder.iterdir()):
        if (path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS) or \
                (path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir())):
            if path.stem in out:
                raise ValueError(f"{folder} has two clips named {path.stem!r} ({out[path.stem].name}, {path.name}); "
                                 f"rename one")
            out[path.stem] = path
    return out


@dataclass(frozen=True)
class ClipPair:
    """An HQ clip, its LQ partner (None: degraded on the fly) and its caption (None: the default caption)."""

    name: str
    hq: Clip
    lq: Clip | None
    caption: str | None


def find_pairs(hq_dir: str | Path, lq_dir: str | Path | None = None) -> list[ClipPair]:
    """
    Pairs the clips of ``hq_dir`` with the same-named clips of ``lq_dir`` and checks that they fit together.

    Parameters:
        hq_dir (`str` or `Path`): HQ clips (videos or frame folders; ``NAME.txt`` beside a clip is its caption).
        lq_dir (`str` or `Path`, *optional*): LQ clips with the same names; None for HQ-only training.

    Returns:
        `list[ClipPair]`, sorted by name.

    Raises:
        ValueError: no clip found, HQ clips without an LQ partner, or a pair whose frame counts or sizes do not
            match (the LQ size must be the HQ size divided by an integer).
    """
    hq_dir = Path(hq_dir)
    hq = _entries(hq_dir)
    if not hq:
        raise ValueError(f"no training clips in {hq_dir}: put videos ({', '.join(VIDEO_EXTENSIONS[:4])}, …) or "
                         f"folders of frames ({', '.join(IMAGE_EXTENSIONS[:2])}, …) there")
    lq = None
    if lq_dir is not None:
        lq = _entries(Path(lq_dir))
        common = sorted(set(hq) & set(lq))
        if not common:
            raise ValueError(f"no HQ/LQ pairs found: no clip name is in both {hq_dir} ({sorted(hq)[:3]} …) and "
                             f"{lq_dir} ({sorted(lq)[:3]} …); an LQ clip must have its HQ clip's name (extension "
                             f"aside)")
        alone = sorted(set(hq) - set(lq))
        if alone:
            raise ValueError(f"{len(alone)} HQ clips have no LQ clip of the same name in {lq_dir}: {alone[:5]}; "
                             f"add them, or remove them from {hq_dir}")
    pairs = []
    for name, path in sorted(hq.items()):
        caption_file = hq_dir / f"{name}.txt"
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else None
        hq_clip = Clip.open(path)
        lq_clip = Clip.open(lq[name]) if lq is not None else None
        if lq_clip is not None:
            lq_factor(hq_clip, lq_clip)
        pairs.append(ClipPair(name, hq_clip, lq_clip, caption))
    return pairs


def lq_factor(hq: Clip, lq: Clip) -> int:
    """The integer factor between an HQ clip and its LQ partner; raises ValueError when they do not fit."""
    if hq.frames != lq.frames:
        raise ValueError(f"HQ/LQ length mismatch: {hq.path} has {hq.frames} frames but {lq.path} has {lq.frames}; "
                         f"the LQ clip must have one frame per HQ frame")
    factor = hq.height // lq.height if lq.height else 0
    if not (1 <= factor <= MAX_LQ_FACTOR and lq.height * factor == hq.height and lq.width * factor == hq.width):
        raise ValueError(f"HQ/LQ size mismatch: {hq.path} is {hq.width}x{hq.height} but {lq.path} is "
                         f"{lq.width}x{lq.height}; the LQ clip must have the HQ size or the HQ size divided by an "
                         f"integer (e.g. {hq.width // 4}x{hq.height // 4} for x4)")
    return factor


@dataclass(frozen=True)
class DataSettings:
    """How samples are cut from the clips.

    Parameters:
        frames (`int`, defaults to 32): frames per sample (official 32).
        crop (`tuple[int, int]`, defaults to (336, 512)): HQ crop height and width in pixels, multiples of 8 (and of
            the LQ factor); the official training used whole 720x1280 frames.
        frame_stride (`int`, defaults to 1): take every n-th frame (the official data tools sampled every 2nd).
        null_text_ratio (`float`, defaults to 0.5): probability of the empty prompt (official 0.5).
        default_caption (`str`): caption of clips without a ``.txt`` (default: the inference prompt "a good video").
        lq_resize (`str`, defaults to "bilinear"): how LQ crops are resized to the HQ crop ("bicubic": official).
        degradation (`DegradationSettings`): the on-the-fly degradation of HQ-only clips.
    """

    frames: int = 32
    crop: tuple[int, int] = (336, 512)
    frame_stride: int = 1
    null_text_ratio: float = NULL_TEXT_RATIO
    default_caption: str = DEFAULT_PROMPT
    lq_resize: str = "bilinear"
    degradation: DegradationSettings = field(default_factory=DegradationSettings)

    def __post_init__(self) -> None:
        if self.frames < 1 or self.frame_stride < 1:
            raise ValueError(f"frames and frame stride must be >= 1, got {self.frames} and {self.frame_stride}")
        if len(self.crop) != 2 or min(self.crop) < 8 or any(c % 8 for c in self.crop):
            raise ValueError(f"crop must be HEIGHTxWIDTH in multiples of 8 (the VAE's factor), got {self.crop}")
        if not 0 <= self.null_text_ratio <= 1:
            raise ValueError(f"null text ratio must be in [0, 1], got {self.null_text_ratio}")
        if self.lq_resize not in LQ_RESIZE_MODES:
            raise ValueError(f"LQ resize must be one of {LQ_RESIZE_MODES}, got {self.lq_resize!r}")


class ClipDataset(torch.utils.data.Dataset):
    """
    Samples of the clip pairs. Item ``(index, seed)`` is clip ``index`` with every random choice (frame window,
    crop position, caption drop, degradation) drawn from ``seed``.

    Each item is a dict: ``hq`` and ``lq`` ``[F,3,H,W]`` float32 in [-1, 1] at the crop size (LQ resized to it),
    ``caption`` (str, ``""`` when dropped), ``name``.

    Parameters:
        pairs (`list[ClipPair]`): from `find_pairs`.
        settings (`DataSettings`): frames, crop, captions, degradation.

    Raises:
        ValueError: a clip shorter than the frames a sample needs, or smaller than the crop.
    """

    def __init__(self, pairs: list[ClipPair], settings: DataSettings = DataSettings()) -> None:
        if not pairs:
            raise ValueError("no training clips")
        span = (settings.frames - 1) * settings.frame_stride + 1
        for pair in pairs:
            if pair.hq.frames < span:
                raise ValueError(f"clip {pair.hq.path} has {pair.hq.frames} frames, fewer than the {span} a sample "
                                 f"needs ({settings.frames} frames, stride {settings.frame_stride}); lower --frames "
                                 f"or remove the clip")
            if pair.hq.height < settings.crop[0] or pair.hq.width < settings.crop[1]:
                raise ValueError(f"clip {pair.hq.path} is {pair.hq.width}x{pair.hq.height}, smaller than the crop "
                                 f"{settings.crop[1]}x{settings.crop[0]} (WxH); lower --crop")
            factor = lq_factor(pair.hq, pair.lq) if pair.lq is not None else 1
            if any(c % factor for c in settings.crop):
                raise ValueError(f"crop {settings.crop[0]}x{settings.crop[1]} is not divisible by the LQ factor "
                                 f"{factor} of {pair.name}; use a crop divisible by {factor * 8}")
        self.pairs = pairs
        self.settings = settings

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        pair = self.pairs[index]
        s = self.settings
        g = torch.Generator().manual_seed(seed)
        span = (s.frames - 1) * s.frame_stride + 1
        start = int(torch.randint(0, pair.hq.frames - span + 1, (), generator=g))
        factor = lq_factor(pair.hq, pair.lq) if pair.lq is not None else 1
        ch, cw = s.crop
        y = int(torch.randint(0, (pair.hq.height - ch) // factor + 1, (), generator=g)) * factor
        x = int(torch.randint(0, (pair.hq.width - cw) // factor + 1, (), generator=g)) * factor
        hq = _to_float(pair.hq.read(start, s.frames, s.frame_stride)[:, y:y + ch, x:x + cw])
        if pair.lq is not None:
            lq = pair.lq.read(start, s.frames, s.frame_stride)
            lq = _to_float(lq[:, y // factor:(y + ch) // factor, x // factor:(x + cw) // factor])
        else:
            lq = degrade(hq, s.degradation, generator=g)
        if lq.shape[-2:] != hq.shape[-2:]:
            lq = F.interpolate(lq, size=(ch, cw), mode=s.lq_resize, align_corners=False).clamp(0, 1)
        caption = s.default_caption if pair.caption is None else pair.caption
        if torch.rand((), generator=g).item() < s.null_text_ratio:
            caption = ""
        return {"hq": hq * 2 - 1, "lq": lq * 2 - 1, "caption": caption, "name": pair.name}

    def captions(self) -> list[str]:
        """Every caption a sample can carry (the default one, each clip's, and the empty one), deduplicated."""
        found = {"", self.settings.default_caption} | {p.caption for p in self.pairs if p.caption is not None}
        return sorted(found)


def _to_float(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[T,H,W,3]`` → float32 ``[T,3,H,W]`` in 0..1 (contiguous NCHW)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div(255).contiguous()


def collate(items: list[dict]) -> dict:
    """Stacks samples into ``hq``/``lq`` ``[B,F,3,H,W]`` and lists of captions and names."""
    return {"hq": torch.stack([i["hq"] for i in items]), "lq": torch.stack([i["lq"] for i in items]),
            "caption": [i["caption"] for i in items], "name": [i["name"] for i in items]}


class SeededSampler(torch.utils.data.Sampler):
    """
    The ``(clip index, seed)`` keys of a run, from sample ``start`` on: clips in a fresh seeded permutation every
    epoch, shared out round-robin between ``world`` data-parallel ranks; a sample's seed depends only on the run
    seed and its global position, so a resumed run draws exactly the samples an uninterrupted one would.

    Parameters:
        clips (`int`): number of clips.
        seed (`int`): the run seed.
        start (`int`): global sample position to begin at (``step · accumulation · batch · world``).
        rank, world (`int`): this process's data-parallel rank and the number of ranks.
    """

    def __init__(self, clips: int, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
        self.clips, self.seed, self.start, self.rank, self.world = clips, seed, start, rank, world

    def key(self, position: int) -> tuple[int, int]:
        """The ``(clip index, sample seed)`` at global position ``position``."""
        epoch, offset = divmod(position, self.clips)
        order = torch.randperm(self.clips, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return int(order[offset]), (self.seed * 2_654_435_761 + position) % (2**63)

    def __iter__(self):
        position = self.start + self.rank
        while True:
            yield self.key(position)
            position += self.world
