"""The backbone alone: FLOPs per image, the device's matmul ceiling, images/s, MFU, and what
moves them.

    python bench/bench_backbone.py                                      # CPU, tiny backbone
    python bench/bench_backbone.py --backbone sam3 --random-weights --device cuda \
        --batch-sizes 8,16,32 --batch-size 16                          # the GPU study

(1) FLOPs of one image through `forward_image` and through `image_features` of 1, 2 and 3
levels (what extraction runs), counted by `torch.utils.flop_counter` (matmuls, convolutions,
attention; on the CPU attention runs through SDPA's math backend so that it is counted);
(2) the device's dense matmul ceiling in the amp dtype (n x n x n, best of 5);
(3) images/s of `image_features(--levels)` under autocast as extraction runs it (inference mode,
images already on the device) by batch size, and MFU = FLOPs x images/s / ceiling (and against
`--peak-tflops`, the datasheet figure, when given);
(4) variants at `--batch-size`: a channels-last model and input, each SDPA backend forced, bf16
weights instead of autocast, `torch.compile`, and (CUDA) `torch.compile(mode="reduce-overhead")`
(CUDA graphs); each variant's 1x features against the baseline's (relative L2) and its
first-call seconds (compilation);
(5) on CUDA, host-to-device copies of a uint8 batch: pageable against pinned with `non_blocking`.
A variant that fails says why in its row instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import copy
import time

import _common as C
import torch

from pipeline.data.images import normalize
from pipeline.model.backbone import LEVELS, PRESETS, image_features

VARIANTS = ("channels-last", "sdpa flash", "sdpa efficient", "sdpa cudnn", "sdpa math",
            "bf16 weights", "compile", "compile + CUDA graphs")


def parse_args(argv=None):
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,2,4,8", help="for the batch-size table")
    parser.add_argument("--levels", default="1x", help="levels extracted (timed and MFU)")
    parser.add_argument("--repeat", type=int, default=5, help="timed batches per measurement")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma list of: {', '.join(VARIANTS)}; or none")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's datasheet dense TFLOP/s in the amp dtype")
    args = C.finish_args(parser.parse_args(argv))
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.levels = tuple(sorted(args.levels.split(",")))
    if "1x" not in args.levels or set(args.levels) - set(LEVELS):
        parser.error("--levels must include 1x and use only 1x, 2x, 4x")
    args.variants = [] if args.variants == "none" else args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    return args


def images(args, b: int) -> torch.Tensor:
    r = PRESETS[args.backbone].resolution
    g = torch.Generator().manual_seed(b)
    return torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8, generator=g).to(args.device)


def sdpa(backend: str | None):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, backend))


# ---------------------------------------------------------------- FLOPs and the ceiling
def count_flops(args, backbone, levels: tuple[str, ...] | None = None) -> float:
    """FLOPs of one image's `forward_image` (every level), or of `image_features(levels)`."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # The CPU's fused attention kernel has no FLOP formula; the math backend is plain matmuls.
    backend = "MATH" if args.device == "cpu" else None
    x = normalize(images(args, 1))
    with torch.inference_mode(), C.autocast(args.device, args.amp), sdpa(backend), counter:
        if levels is None:
            backbone.forward_image(x)
        else:
            image_features(backbone, x, levels)
    return float(counter.get_total_flops())


def matmul_ceiling(args) -> tuple[float, int]:
    """(TFLOP/s, n) of the best n x n x n matmul in the amp dtype (fp32 without amp)."""
    dtype = C.AMP[args.amp] or torch.float32
    n = 8192 if args.device == "cuda" else 2048
    a = torch.randn(n, n, device=args.device).to(dtype)
    b = torch.randn(n, n, device=args.device).to(dtype)
    seconds = C.best_time(lambda: a @ b, repeat=5, device=args.device)
    return 2 * n**3 / seconds / 1e12, n


# ---------------------------------------------------------------- throughput
def runner(args, backbone, variant: str | None):
    """fn(x) -> {level: features} of --levels for one variant, run as extraction runs it."""
    autocast, backend, model = True, None, backbone
    if variant == "channels-last":
        model = copy.deepcopy(backbone).to(memory_format=torch.channels_last)
    elif variant and variant.startswith("sdpa "):
        backend = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                   "cudnn": "CUDNN_ATTENTION", "math": "MATH"}[variant.split()[1]]
    elif variant == "bf16 weights":
        model, autocast = copy.deepcopy(backbone).to(torch.bfloat16), False

    def forward(x):
        if variant == "channels-last":
            x = x.contiguous(memory_format=torch.channels_last)
        x = normalize(x)
        if not autocast:
            x = x.to(torch.bfloat16)
        return image_features(model, x, args.levels)

    fn = forward
    if variant in ("compile", "compile + CUDA graphs"):
        if variant.endswith("graphs") and args.device != "cuda":
            raise RuntimeError("CUDA graphs need CUDA")
        mode = "reduce-overhead" if variant.endswith("graphs") else None
        fn = torch.compile(forward, mode=mode, dynamic=False)

    def run(x):
        # no_grad, not inference_mode, for compiled code (tensors it caches must be normal).
        grad = torch.no_grad() if variant and variant.startswith("compile") else (
            torch.inference_mode())
        amp = C.autocast(args.device, args.amp) if autocast else contextlib.nullcontext()
        with grad, amp, sdpa(backend):
            return fn(x)

    return run


def rate(args, run, b: int) -> tuple[float, float, torch.Tensor]:
    """(images/s, first-call seconds, vision_features of the first call) at batch b."""
    x = images(args, b)
    start = time.perf_counter()
    out = run(x)["1x"].float()
    C.sync(args.device)
    first = time.perf_counter() - start
    seconds = C.best_time(lambda: run(x), repeat=args.repeat, warmup=1, device=args.device)
    return b / seconds, first, out


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def batch_table(args, backbone, flops: float, ceiling: float) -> tuple[str, dict]:
    rows, outputs = [], {}
    run = runner(args, backbone, None)
    for b in args.batch_sizes:
        try:
            per_s, _, out = rate(args, run, b)
        except torch.OutOfMemoryError:
            rows.append([b, "out of memory", "", "", ""])
            break
        if b == args.batch_size:  # the variants' baseline
            outputs[b] = per_s, out
        tflops = flops * per_s / 1e12
        rows.append([b, per_s, tflops, tflops / ceiling,
                     tflops / args.peak_tflops if args.peak_tflops else ""])
    header = ["batch", "images/s", "model TFLOP/s", "MFU (measured matmul ceiling)",
              "MFU (datasheet peak)"]
    return C.table(f"image_features({','.join(args.levels)}) under autocast {args.amp}, "
                   "inference mode, images on the device (as extraction runs it)", header,
                   rows), outputs  # {b: (rate, 1x)}


def variants_table(args, backbone, flops: float, ceiling: float, baseline) -> str:
    b, rows = args.batch_size, []
    if b in baseline:
        base_rate, reference = baseline[b]
    else:
        base_rate, _, reference = rate(args, runner(args, backbone, None), b)
    rows.append(["autocast (baseline)", base_rate, 1.0, flops * base_rate / 1e12 / ceiling, "",
                 0.0])
    for variant in args.variants:
        try:
            per_s, first, out = rate(args, runner(args, backbone, variant), b)
        except Exception as err:  # an unsupported backend or mode: say so, go on
            reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
            rows.append([variant, f"failed: {type(err).__name__}: {reason}", "", "", "", ""])
            continue
        rows.append([variant, per_s, per_s / base_rate, flops * per_s / 1e12 / ceiling, first,
                     relative_l2(out, reference)])
    header = ["variant", "images/s", "speed-up", "MFU (measured ceiling)", "first call s",
              "1x features rel. L2 to the baseline"]
    return C.table(f"Variants at batch {b}", header, rows)


def copies_table(args) -> str:
    if args.device != "cuda":
        return "**Host-to-device copies**: skipped (CPU run; needs --device cuda).\n"
    r, rows = PRESETS[args.backbone].resolution, []
    for b in args.batch_sizes:
        pageable = torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8)
        pinned = pageable.pin_memory()
        t_page = C.best_time(lambda x=pageable: x.to("cuda"), device="cuda")
        t_pin = C.best_time(lambda x=pinned: x.to("cuda", non_blocking=True), device="cuda")
        rows.append([b, pageable.nbytes / 1e6, t_page * 1e3, t_pin * 1e3,
                     pageable.nbytes / t_pin / 1e9])
    return C.table("Host-to-device copy of a uint8 image batch",
                   ["batch", "MB", "pageable ms", "pinned, non_blocking ms", "pinned GB/s"],
                   rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    start_load = C.load_average()
    torch.manual_seed(0)
    backbone = C.load_backbone(args)
    every = count_flops(args, backbone)
    ceiling, n = matmul_ceiling(args)
    rows = [["forward_image (every level)", f"{every:.4g}", every / 1e12,
             ceiling * 1e12 / every]]
    parts = {}
    for levels in (("1x",), ("1x", "2x"), ("1x", "2x", "4x")):
        part = parts[levels] = count_flops(args, backbone, levels)
        rows.append([f"image_features({','.join(levels)}), as extraction runs", f"{part:.4g}",
                     part / 1e12, ceiling * 1e12 / part])
    flops = parts.get(args.levels) or count_flops(args, backbone, args.levels)
    summary = C.table(f"FLOPs per image, counted, and the images/s at 100 % of the device's "
                      f"matmul ceiling ({ceiling:.4g} TFLOP/s, {n}^3, {args.amp})",
                      ["call", "FLOPs per image", "TFLOP per image",
                       "images/s at 100 % of the ceiling"], rows)
    batches, baseline = batch_table(args, backbone, flops, ceiling)
    sections = [summary, batches, variants_table(args, backbone, flops, ceiling, baseline),
                copies_table(args)]
    notes = ["MFU counts the FLOPs of `image_features(--levels)` only (the fp16 cast, the finite "
             "check and the copies of extraction are outside it); `bench_extraction.py` times "
             "the whole path."]
    if args.device == "cpu":
        notes.append("CPU: SDPA's efficient and cudnn backends and CUDA graphs exist only on "
                     "CUDA; their rows fail by design.")
    C.report("bench_backbone", args, start_load, sections, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
