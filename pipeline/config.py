"""Frozen, validated configurations of the two stages, and CLI flags generated from them.

Every field has a docstring under it; `add_arguments` turns each field into a `--flag` of the
same name (underscores become dashes) with that docstring as its help.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass

from pipeline.data.augment import CopyPlan, auto_copies
from pipeline.model.presets import AMP_DTYPE_NAMES, IMAGE_CHANNELS, LEVELS, PRESETS, cache_levels


def _field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (and of its bases), read from the source."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        previous = None
        for node in ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                previous = node.target.id
            elif (previous and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                  and isinstance(node.value.value, str)):
                docs[previous] = " ".join(node.value.value.split())
                previous = None
    return docs


def _parse_tuple(kind):
    def parse(text: str):
        return tuple(kind(x) for x in text.split(",") if x.strip()) if text else ()
    return parse


def given_fields(cls, argv: list[str] | None) -> set[str]:
    """The fields of `cls` whose flags `argv` sets explicitly (defaults do not count)."""
    probe = argparse.ArgumentParser(add_help=False)
    add_arguments(probe, cls, suppress_defaults=True)
    return set(vars(probe.parse_known_args(argv)[0]))


def add_arguments(parser: argparse.ArgumentParser, cls, *, suppress_defaults=False) -> None:
    """Add one `--flag` per field of dataclass `cls` (`suppress_defaults`: flags not given are
    absent from the namespace, see `given_fields`)."""
    hints = typing.get_type_hints(cls)
    docs = {name: doc.replace("%", "%%") for name, doc in _field_docs(cls).items()}  # argparse
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = argparse.SUPPRESS if suppress_defaults else default
        text = docs.get(f.name, "") + _default_note(docs.get(f.name, ""), default)
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=docs.get(f.name, ""))
        elif typing.get_origin(hint) is tuple:
            parser.add_argument(flag, type=_parse_tuple(typing.get_args(hint)[0]),
                                default=default, help=text + "; comma-separated")
        else:
            kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            parser.add_argument(flag, type=kind, default=default, help=text)


def _default_note(doc: str, default) -> str:
    """" (default: X)" for a flag's help, X as it is typed (1x,2x; none); "" when the
    docstring already says what the default does."""
    if "default" in doc.lower():
        return ""
    if default is None or default == ():
        return " (default: none)"
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
    return f" (default: {shown})".replace("%", "%%")


def from_arguments(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init})


DECODERS = ("detail", "legacy")
"""Values of --decoder: `detail` (pipeline.model.detail) or `legacy` (pipeline.model.decoder)."""


def describe(config, width: int = 100) -> str:
    """`config:` and every field as `name=value` (tuples comma-separated, None as -), wrapped
    to `width` columns: what both stages print at start."""
    def text(value) -> str:
        if value is None or value == ():
            return "-"
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    pairs = [f"{f.name}={text(getattr(config, f.name))}" for f in dataclasses.fields(config)]
    return textwrap.fill(" ".join(pairs), width=width, initial_indent="config: ",
                         subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)


DECODER_ONLY = {
    "detail": ("detail", "detail_width", "detail_depth", "features", "deep_supervision",
               "crop_size", "detail_max_side", "tile_size", "mirror_tta"),
    "legacy": ("legacy", "image_branch", "width", "image_channels"),
}
"""Per decoder (first entry its name), the TrainConfig fields only it reads: setting one of the
other decoder's is refused, not ignored."""

LOSSES = ("dice_bce", "dice_bce_cldice")
"""Values of --loss (pipeline.model.losses)."""

DEFAULT_EPOCHS, MIN_STEPS, MAX_STEPS = 20, 600, 20_000
"""The step budget without --steps or --epochs (see `default_steps`)."""
VALIDATIONS = 15
"""Validations a run gets without --val-every."""


def steps_per_epoch(train_samples: int, batch_size: int) -> int:
    """Optimizer steps of one pass over `train_samples` (the last batch may be short)."""
    return max(1, -(-train_samples // batch_size))


def default_steps(train_samples: int, batch_size: int) -> int:
    """The budget without --steps or --epochs: DEFAULT_EPOCHS passes over the training set,
    clamped to [MIN_STEPS, MAX_STEPS].

    The floor is for small vessel sets, however few steps an epoch has: on CHASE_DB1 (14
    training images, one step an epoch at batch 16) val Dice was still rising at step 120 of a
    600-step run (0.29, 0.54, 0.62 at steps 40, 80, 120) and at step 200 of 200-step runs
    (BENCHMARKS.md). The ceiling keeps 50 000 images (3 125 steps an epoch at batch 16) to
    6.4 epochs.
    """
    wanted = DEFAULT_EPOCHS * steps_per_epoch(train_samples, batch_size)
    return min(MAX_STEPS, max(MIN_STEPS, wanted))


def _check_backbone(backbone: str, levels: tuple[str, ...], amp: str) -> None:
    if backbone not in PRESETS:
        raise ValueError(f"--backbone must be one of {sorted(PRESETS)}, not {backbone!r}")
    unknown = [lvl for lvl in levels if lvl not in LEVELS]
    if unknown or "1x" not in levels:
        raise ValueError(f"--levels must include 1x and use only {sorted(LEVELS)}, got {levels}")
    if amp != "auto" and amp not in AMP_DTYPE_NAMES:
        raise ValueError(f"--amp must be auto or one of {sorted(AMP_DTYPE_NAMES)}, not {amp!r}")


def _resolve_devices(gpus: tuple[int, ...], device: str) -> tuple[str, tuple[int, ...]]:
    """The device type and GPU list: every visible GPU by default, the CPU without CUDA.
    Imports torch (seconds), unless the CPU is asked for: configs check everything else first."""
    if device == "cpu" and not gpus:
        return device, ()
    import torch

    cuda = torch.cuda.is_available()
    if gpus and not cuda:
        raise ValueError("--gpus needs CUDA, and this machine has no CUDA device; "
                         "run on the CPU with --device cpu --workers N")
    if device == "auto":
        device = "cuda" if (gpus or cuda) else "cpu"
    if device == "cuda":
        if not cuda:
            raise ValueError("--device cuda needs CUDA, and this machine has none")
        gpus = gpus or tuple(range(torch.cuda.device_count()))
        missing = [g for g in gpus if g >= torch.cuda.device_count()]
        if missing:
            raise ValueError(f"--gpus {missing} not present ({torch.cuda.device_count()} GPUs)")
    elif device != "cpu":
        raise ValueError(f"--device must be auto, cuda or cpu, not {device!r}")
    return device, (gpus if device == "cuda" else ())


@dataclass(frozen=True)
class FeatureSource:
    """What both stages share: the data, the features' model and preprocessing, the devices."""

    data: str = "demo"
    """A manifest CSV (image, mask, view, split), or `demo` for the synthetic set."""
    backbone: str = "sam3"
    """`sam3` (the released model) or `tiny` (same classes, small and untrained: demo, tests)."""
    checkpoint: str | None = None
    """An official-layout sam3.pt; for `sam3` without it the weights come from the HF hub."""
    adapter: str | None = None
    """A peft LoRA adapter directory (a run's `adapter/`) applied to the trunk."""
    cache_dir: str = "cache"
    """Where caches live; one `<cache-id>.zarr` per signature."""
    levels: tuple[str, ...] = ("1x",)
    """Feature levels: 1x (vision_features), and the FPN levels 2x and 4x."""
    amp: str = "auto"
    """Autocast dtype of the backbone: bf16, fp16 or off; auto is bf16 on a GPU, off on the CPU."""
    augment_copies: int | None = None
    """K extracted augmented copies of each training image (at most 32); Stage B draws the
    original or one copy per sample and epoch (feature maps themselves are never transformed).
    Default: by the number of training images n, min(4, ceil(500 / n) - 1) (4 up to 100 images,
    none from 500)."""
    augment: str = "random"
    """Family of the copies: random (transforms drawn from the aug-v1 distribution: flips,
    rotation, scale, shift, brightness, contrast, gamma, noise) or flips (the five fixed flips
    and rotations, K <= 5)."""
    augment_seed: int = 0
    """Seed of the random copies; copy c of an image depends on (this seed, c, its key) only."""
    gpus: tuple[int, ...] = ()
    """GPU indices, one process each; default: every visible GPU."""
    device: str = "auto"
    """auto, cuda or cpu."""
    workers: int = 1
    """Processes on the CPU (with --device cpu), through the same multi-process path."""
    cache_block: int | None = None
    """Split cache: store the trunk's tokens after block K instead of the levels; Stage B runs
    blocks K+1.. (LoRA there trains at every step), the neck and the decoder. Default: no split."""

    def __post_init__(self):
        self._check()  # before the devices: finding CUDA imports torch, which takes seconds
        device, gpus = _resolve_devices(self.gpus, self.device)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "gpus", gpus)
        object.__setattr__(self, "levels", tuple(sorted(set(self.levels))))
        if self.amp == "auto":
            object.__setattr__(self, "amp", "bf16" if device == "cuda" else "off")
        self._check_devices()

    def _check(self) -> None:
        """Refuse contradictions that do not depend on the devices (subclasses add theirs)."""
        _check_backbone(self.backbone, self.levels, self.amp)
        depth = PRESETS[self.backbone].depth
        if self.cache_block is not None and not 0 <= self.cache_block <= depth - 2:
            raise ValueError(f"--cache-block must be in 0..{depth - 2} for {self.backbone} "
                             f"(blocks 0..{depth - 1}; at least one block after it)")
        if self.workers < 1:
            raise ValueError("--workers must be >= 1")
        CopyPlan(self.augment, self.augment_copies or 0, self.augment_seed)  # raises if invalid

    def _check_devices(self) -> None:
        """Refuse contradictions with the resolved devices."""
        if self.workers > 1 and self.device == "cuda":
            raise ValueError("--workers is for the CPU; on GPUs use --gpus (one process each)")

    @property
    def copy_plan(self) -> CopyPlan:
        """The augmented copies of each training image (`pipeline.data.augment`); needs
        `augment_copies` resolved (`with_copies_for`)."""
        if self.augment_copies is None:
            raise RuntimeError("augment_copies is not resolved: call with_copies_for(samples)")
        return CopyPlan(self.augment, self.augment_copies, self.augment_seed)

    def with_copies_for(self, samples):
        """This config with `augment_copies` resolved for `samples` (manifest rows): kept when
        given, else `auto_copies` of the number of training images (split `train` or empty)."""
        if self.augment_copies is not None:
            return self
        train = len({s.image for s in samples if s.is_train})
        return dataclasses.replace(self, augment_copies=auto_copies(train))

    @property
    def cache_levels(self) -> tuple[str, ...]:
        """The levels the cache stores (`levels`, or the trunk's tokens with --cache-block)."""
        return cache_levels(self.levels, self.cache_block)


@dataclass(frozen=True)
class ExtractConfig(FeatureSource):
    """Stage A: which features to extract, from which data, on which devices."""

    batch_size: int = 8
    """Images per forward pass, per worker."""
    loader_workers: int = 2
    """DataLoader processes decoding and resizing images, per worker."""
    writer_threads: int = 4
    """Threads writing finished samples while the next batch runs."""
    codec: str = "none"
    """Chunk compression of a new cache: none, zstd, blosc-zstd or lz4 (every chunk carries a
    crc32c either way). none reads fastest; the compressors save about 10 % of disk on
    backbone features (BENCHMARKS.md), worth it only on a slow shared filesystem."""
    wait: bool = False
    """Wait for another run writing the same cache instead of failing."""

    def _check(self) -> None:
        super()._check()
        if self.batch_size < 1 or self.loader_workers < 0:
            raise ValueError("--batch-size must be >= 1, --loader-workers >= 0")
        from pipeline.cache.store import CODECS  # zarr: a third of a second, not for --help

        if self.codec not in CODECS:
            raise ValueError(f"--codec must be one of {sorted(CODECS)}, not {self.codec!r}")

    def worker_devices(self, context) -> list[str]:
        """One device string per worker process on this machine."""
        if context.distributed:
            return [context.local_device() if self.device == "cuda" else "cpu"]
        if self.device == "cuda":
            return [f"cuda:{g}" for g in self.gpus]
        return ["cpu"] * self.workers


@dataclass(frozen=True)
class TrainConfig(FeatureSource):
    """Stage B: the head, the LoRA adapter and how they train."""

    extract_missing: bool = False
    """Run Stage A first for images the cache lacks, instead of stopping."""
    cache: str | None = None
    """A cache to train on (its id, as `python -m pipeline.cache list` prints it, or its path):
    --backbone, --levels, --amp, --cache-block and --cache-dir are read from its signature, and
    any of them given as well must agree."""
    steps: int | None = None
    """Total optimizer steps. Without --steps or --epochs: `default_steps` of the training set
    (20 epochs, at least 600 and at most 20000 steps)."""
    epochs: int | None = None
    """Alternative to --steps: this many passes over the training set (0 or unset: --steps)."""
    batch_size: int = 16
    """Samples per optimizer step, over all processes."""
    lr: float = 3e-3
    """AdamW learning rate of the decoder, the feature projection and the view embedding
    (linear warm-up, then cosine decay to zero, per step); 3e-3 beat 1e-3 and 1e-4 on two
    datasets at the same budget (BENCHMARKS.md)."""
    lora_lr: float = 1e-4
    """AdamW learning rate of the LoRA adapter (same schedule)."""
    warmup: float = 0.05
    """Share of the steps over which the learning rates rise linearly from zero."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    val_every: int | None = None
    """Validate, checkpoint (last.pt; best.pt by val Dice) every N steps; default: each epoch
    with --epochs, else about 15 validations a run (steps / 15). The last step validates."""
    lora_r: int = 16
    """LoRA rank on the trunk's attention qkv and proj."""
    lora_alpha: int = 32
    """LoRA alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    e2e_every: int = 5
    """Every K-th validation interval trains end to end through the LoRA'd backbone on raw
    images (0: never)."""
    e2e_steps: int = 0
    """End-to-end steps at the start of such an interval, the rest from the cache (0: all of
    its --val-every steps)."""
    activation_checkpointing: bool = True
    """End-to-end steps recompute each ViT block in the backward pass instead of keeping its
    activations (SAM 3's own setting): far less memory for about one more forward pass."""
    refresh_cache: bool = False
    """After end-to-end steps, extract the cache of the new adapter and train on it."""
    decoder: str = "detail"
    """detail: a U-Net on the image at its own resolution (random crops in training, whole
    images or tiles in validation and predict), fused with the backbone's maps at every level
    (pipeline/model/detail.py); legacy: the decoder at the backbone's square resolution
    (--width, --image-branch, --image-channels), which runs made before it use."""
    detail_width: int = 8
    """Detail decoder: channels at full resolution (doubling per level). 8 from CHASE_DB1
    (BENCHMARKS.md): 16 took 2-3 times as long a step on the CPU."""
    detail_depth: int = 4
    """Detail decoder: poolings of its U-Net (bottleneck at 1/2**depth of the side)."""
    features: bool = True
    """Detail decoder: fuse the backbone's features (off: the U-Net alone, an ablation)."""
    deep_supervision: int = 0
    """Detail decoder: training also scores the U-Net's next N coarser decoder levels through
    their own 1x1 heads (nnU-Net's deep supervision; loss weights 1/2, 1/4, ... of the main
    output's); 0: off. At most --detail-depth - 1. Off by default: 2 moved CHASE_DB1's val Dice
    by +0.009 and -0.002 on two seeds (BENCHMARKS.md)."""
    crop_size: int = 256
    """Detail decoder: training crops of this many pixels a side, at the image's own resolution
    (a new random place every epoch; smaller images are padded)."""
    detail_max_side: int = 1024
    """Detail decoder: images whose longer side exceeds this are shrunk to it first (training,
    validation and predict alike; predictions are scored and written at the image's own size;
    0: never)."""
    tile_size: int = 1024
    """Detail decoder: validation and predict run images with a side over this in overlapping,
    blended tiles of this size (0: always whole)."""
    mirror_tta: bool = True
    """Detail decoder: `predict` and the final scoring of the best checkpoint (report.json)
    average the four mirrorings (4x their time); the periodic validations that choose the
    best step run unmirrored either way. On CHASE_DB1 it raised val Dice from 0.777 to 0.790
    (BENCHMARKS.md, "Inference levers")."""
    image_branch: bool = True
    """Legacy decoder: a shallow full-resolution branch on the raw image (thin vessels)."""
    width: int = 64
    """Legacy decoder: width."""
    image_channels: int = IMAGE_CHANNELS
    """Legacy decoder: channels of the full-resolution image branch and the stage that fuses
    it."""
    loader_workers: int = 2
    """DataLoader processes per training process."""
    seed: int = 0
    """Seed of weights, data order and dropout."""
    run_dir: str | None = None
    """Where the run's files go; default runs/<timestamp>."""
    resume: str | None = None
    """A run directory to continue from its last.pt, with its own data, cache and settings;
    only --steps, --epochs, --val-every, --cache-dir, --loader-workers, --memory-cache-mb and
    --extract-missing may differ."""
    overwrite: bool = False
    """Replace the run already in --run-dir (its files only) instead of refusing."""
    allow_empty_val: bool = False
    """Train without validation rows (the last epoch is kept as best) instead of refusing."""
    overlays: int = 6
    """Validation samples drawn as image / truth / prediction overlays."""
    probe_size: int = 4
    """Training images used to measure the drift of cached against live features."""
    view_conditioning: bool = True
    """FiLM of the projected features by the view embedding (and angles); off: every view
    shares one decoder (an ablation, BENCHMARKS.md)."""
    loss: str = "dice_bce"
    """Training loss: dice_bce, or dice_bce_cldice (adds soft clDice, a centreline term)."""
    memory_cache_mb: int = 2048
    """Decoded, resized masks and images of a split are kept in memory when all of them fit in
    this many MB: each file is decoded once per run and cached steps need no loader workers
    (0: decode every time, in --loader-workers processes)."""
    train_cldice: int = 64
    """Training images per validation interval and process that also get clDice (its skeleton
    is the costly score, see BENCHMARKS.md); Dice and IoU score every image, validation
    every score."""
    tensorboard: bool = True
    """Write TensorBoard event files into <run-dir>/tensorboard/ (rank 0): scores, lr, data
    wait, overlays at each validation, the config and hparams."""

    def _check(self) -> None:
        super()._check()
        for name in ("steps", "epochs", "val_every"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
            object.__setattr__(self, name, value or None)  # 0 means unset
        if self.steps and self.epochs:
            raise ValueError("give --steps or --epochs, not both")
        if min(self.batch_size, self.lora_r) < 1:
            raise ValueError("--batch-size and --lora-r must be >= 1")
        if min(self.lr, self.lora_lr) <= 0 or not 0 <= self.warmup < 1:
            raise ValueError("--lr and --lora-lr must be > 0, --warmup in [0, 1)")
        if self.e2e_every < 0 or self.e2e_steps < 0 or self.train_cldice < 0:
            raise ValueError("--e2e-every, --e2e-steps and --train-cldice must be >= 0")
        if self.refresh_cache and not self.e2e_every:
            raise ValueError("--refresh-cache needs end-to-end steps (--e2e-every K > 0)")
        if self.decoder not in DECODERS:
            raise ValueError(f"--decoder must be one of {list(DECODERS)}, not {self.decoder!r}")
        other = DECODER_ONLY["legacy" if self.decoder == "detail" else "detail"]
        ignored = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(self)
                   if f.name in other and getattr(self, f.name) != f.default]
        if ignored:
            raise ValueError(f"{', '.join(ignored)}: only --decoder {other[0]} reads this, "
                             f"and --decoder is {self.decoder}; drop it, or pass --decoder "
                             f"{other[0]}")
        if min(self.detail_width, self.detail_depth) < 1:
            raise ValueError("--detail-width and --detail-depth must be >= 1")
        if not 0 <= self.deep_supervision < self.detail_depth:
            raise ValueError(f"--deep-supervision must be 0 to --detail-depth - 1 "
                             f"({self.detail_depth - 1}), got {self.deep_supervision}")
        if self.crop_size < 2**self.detail_depth:
            raise ValueError(f"--crop-size must be at least 2**--detail-depth "
                             f"({2**self.detail_depth}), got {self.crop_size}")
        if min(self.detail_max_side, self.tile_size) < 0:
            raise ValueError("--detail-max-side and --tile-size must be >= 0")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {list(LOSSES)}, not {self.loss!r}")
        if self.memory_cache_mb < 0:
            raise ValueError("--memory-cache-mb must be >= 0")

    def _check_devices(self) -> None:
        super()._check_devices()
        if self.world_size > self.batch_size:
            raise ValueError(f"--batch-size {self.batch_size} is smaller than the "
                             f"{self.world_size} processes")

    def total_steps(self, train_samples: int) -> int:
        """Optimizer steps of the run: --steps, --epochs passes, or `default_steps`."""
        per_epoch = steps_per_epoch(train_samples, self.batch_size)
        if self.steps:
            return self.steps
        if self.epochs:
            return self.epochs * per_epoch
        return default_steps(train_samples, self.batch_size)

    def validation_interval(self, total_steps: int, train_samples: int) -> int:
        """Steps between validations: --val-every; with --epochs one epoch; else about
        VALIDATIONS a run."""
        if self.val_every:
            return self.val_every
        if self.epochs:
            return steps_per_epoch(train_samples, self.batch_size)
        return max(1, total_steps // VALIDATIONS)

    @property
    def native_training(self):
        """How the detail decoder samples training images (`NativeSampling`); None: legacy."""
        from pipeline.data.native_samples import NativeSampling

        if self.decoder != "detail":
            return None
        return NativeSampling(crop=self.crop_size, max_side=self.detail_max_side)

    @property
    def native_whole(self):
        """How the detail decoder sees whole images (validation, predict); None: legacy."""
        from pipeline.data.native_samples import NativeSampling

        if self.decoder != "detail":
            return None
        return NativeSampling(crop=None, max_side=self.detail_max_side)

    @property
    def lora_after_block(self) -> int | None:
        """With --cache-block K and no end-to-end epochs, LoRA sits in blocks after K only (the
        cache never goes stale); with --e2e-every it sits in every block, and those up to K learn
        in the end-to-end epochs only."""
        return self.cache_block if self.cache_block is not None and not self.e2e_every else None

    @property
    def world_size(self) -> int:
        """Processes this machine runs (torchrun sets its own)."""
        return len(self.gpus) if self.device == "cuda" else self.workers

    def extract_config(self, adapter: str | None = None, **overrides) -> ExtractConfig:
        """The Stage A configuration that makes (or made) the cache this run trains on."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(FeatureSource)}
        shared["adapter"] = adapter if adapter is not None else self.adapter
        return ExtractConfig(**shared, **overrides)
