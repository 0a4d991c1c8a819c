"""Cost of the protection method against its bare surrogate ensemble, per recognizer backend.

    OMP_NUM_THREADS=1 python bench/protect.py [--models-dir ../shared/models] [--protect lfsa]
        [--device cuda] [--batch 16] [--steps 5] [--backends onnx native [native-nchw]] [--bf16] [--cudnn-benchmark]
        [--compile] [--profile FILE] [--quick]

For one batch, in one run, both backends (onnx2torch and native) side by side: the bare ensemble's
image-steps/s (forward + input gradient of every surrogate, as the method pays per step), the full
method's images/s at the config's T, the method's overhead over the bare ensemble, the peak
memory of one method call, the seconds of the backend's first bare call (what a process pays
once per batch shape, such as cuDNN's plans; backends run in the order given, so a later one whose
shapes and layout an earlier one used finds them warm), and the bare ensemble's GFLOP per image-step
(its convolutions and matmuls, by torch's FLOP counter) with the share of a large float32 matmul's
GFLOP/s it reaches: how far the backend is from what the machine can do. `native-nchw` is native with contiguous
weights (`recognizer.channels_last=false`). Per step = (t(steps) - t(1)) / (steps - 1), so the once-per-call work
(F, C, clean embeddings) cancels out; images/s at T = batch / (t(1) + (T - 1) * per step).
`--bf16` runs everything under bf16 autocast (as `trainer.precision=bf16-mixed` does), `--compile`
wraps each native network in torch.compile, `--profile` writes torch.profiler's table of one 2-step
native method call. The last line compares the two backends' protected outputs of the same batch
and seeds (SSIM to the input, and to each other).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_machine_options,
    apply_machine_options,
    flops,
    machine,
    matmul_rate,
    sync,
    timed,
)

from ppfr import protect, recognizers  # noqa: E402
from ppfr.config import load_option, to_dict  # noqa: E402
from ppfr.protect.lfsa import ssim  # noqa: E402

# name -> (recognizer.backend, recognizer.channels_last)
BACKENDS = {"onnx": ("onnx", True), "native": ("native", True), "native-nchw": ("native", False)}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: "5" resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB GPU"
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
        return f"{int(line.split()[1]) / 2**10:.0f} MiB RSS"
    except (OSError, StopIteration):
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "models"))
    ap.add_argument("--protect", default="lfsa", help="option of configs/protect (default: lfsa)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="optimisation steps per timed call (>= 2)")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (the fastest counts)")
    ap.add_argument("--backends", nargs="+", default=["onnx", "native"], choices=BACKENDS)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast around every timed call")
    ap.add_argument("--compile", action="store_true", help="torch.compile each native network")
    ap.add_argument("--profile", default=None, help="write the profiler table of one native method call here")
    add_machine_options(ap)
    ap.add_argument("--quick", action="store_true", help="--steps 3 --repeats 1")
    args = ap.parse_args()
    options = apply_machine_options(args)
    steps, repeats = (3, 1) if args.quick else (args.steps, args.repeats)
    if steps < 2:
        ap.error(
            "--steps must be >= 2 (the per-step cost is the difference of a 1-step and a multi-step call)"
        )

    device = torch.device(args.device)
    cfg = to_dict(load_option("protect", args.protect))
    full_steps = cfg["steps"]
    x = torch.rand(args.batch, 3, 112, 112, generator=torch.Generator().manual_seed(0)).to(device)
    seeds = torch.arange(args.batch, dtype=torch.int64)
    print(f"{machine(device)} | {options}")
    print(
        f"protect={args.protect}: ensemble {cfg['ensemble']}, T={full_steps}, batch {args.batch}, "
        f"timed with {steps} steps, fastest of {repeats}"
        + (" | bf16 autocast" if args.bf16 else "")
        + (" | native compiled" if args.compile else "")
    )

    fns: dict[str, Callable[[], object]] = {}
    methods, counted = {}, {}
    for backend in args.backends:
        kind, channels_last = BACKENDS[backend]
        made = recognizers.create_many(
            cfg["ensemble"], args.models_dir, backend=kind, channels_last=channels_last
        )
        ensemble = [r.to(device) for r in made]
        if args.compile and backend == "native":
            for r in ensemble:
                r.network = torch.compile(r.network)
        method = protect.create({**cfg, "steps": steps}, ensemble).to(device)
        one_step = protect.create({**cfg, "steps": 1}, ensemble).to(device)
        # Other faces (at cos = 1 the gradients vanish); drawn, so no network runs before its first call.
        targets = [
            F.normalize(torch.randn(args.batch, f.embedding_dim, device=device), dim=1) for f in ensemble
        ]
        fns[f"{backend} bare"] = bare_step(ensemble, targets, x)
        counted[backend] = bare_step(ensemble, targets, x, backward=True)
        fns[f"{backend} full"] = lambda m=method: m(x, seeds)
        fns[f"{backend} one"] = lambda m=one_step: m(x, seeds)
        methods[backend] = method
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    fns = {k: (lambda f=f: autocast_call(autocast, f)) for k, f in fns.items()}
    t, first = timed(fns, device, repeats)
    # counted after the timed first calls, which must find every network cold
    gflop = {backend: flops(step) / args.batch / 1e9 for backend, step in counted.items()}
    peak = matmul_rate(device)
    print(f"reference: {peak:.0f} GFLOP/s in a 2048 x 2048 float32 matmul")

    print(
        f"{'backend':<12}{'bare img-steps/s':>18}{'method img-steps/s':>20}{'overhead':>10}{f'img/s at T={full_steps}':>16}"
        f"{'peak memory':>18}{'first call s':>14}{'bare GFLOP/img-step':>21}{'of matmul':>11}"
    )
    result, outputs = {}, {}
    for backend in args.backends:
        per_step = (t[f"{backend} full"] - t[f"{backend} one"]) / (steps - 1)
        images_s = args.batch / (t[f"{backend} one"] + (full_steps - 1) * per_step)
        reset_peak(device)
        with autocast:
            outputs[backend] = methods[backend](x, seeds)
        sync(device)
        result[backend] = images_s
        print(
            f"{backend:<12}{args.batch / t[f'{backend} bare']:>18.1f}{args.batch / per_step:>20.1f}"
            f"{per_step / t[f'{backend} bare'] - 1:>9.0%}{images_s:>16.3f}{peak_memory(device):>18}"
            f"{first[f'{backend} bare']:>14.2f}{gflop[backend]:>21.3f}"
            f"{gflop[backend] * args.batch / t[f'{backend} bare'] / peak:>11.0%}",
            flush=True,
        )
    if args.profile and "native" in methods:
        from torch.profiler import ProfilerActivity, profile

        two = protect.create({**cfg, "steps": 2}, methods["native"].recognizers).to(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof, autocast:
            two(x, seeds)
            sync(device)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        Path(args.profile).write_text(prof.key_averages().table(sort_by=sort, row_limit=60))
        print(f"profile of one 2-step native call: {args.profile}")
    if not {"onnx", "native"} <= result.keys():
        return
    print(f"native / onnx2torch, full method: {result['native'] / result['onnx']:.2f}x")
    same = {b: ssim(outputs[b], x).mean().item() for b in ("onnx", "native")}
    print(
        f"same batch and seeds, {steps} steps: SSIM(X', X) onnx {same['onnx']:.4f}, native {same['native']:.4f}; "
        f"SSIM(native, onnx) {ssim(outputs['native'], outputs['onnx']).mean().item():.4f}, "
        f"max |native - onnx| {(outputs['native'] - outputs['onnx']).abs().max().item():.3f}"
    )


def autocast_call(autocast, fn: Callable[[], object]) -> object:
    with autocast:
        return fn()


def bare_step(ensemble, targets, x: torch.Tensor, backward: bool = False) -> Callable[[], None]:
    """Forward + input gradient of the summed cosine of every surrogate: the method's core per step.
    `backward` takes the gradient by .backward() (torch's FLOP counter cannot follow autograd.grad)."""

    def step() -> None:
        xg = x.clone().requires_grad_(True)
        loss = sum(F.cosine_similarity(f(xg), t).sum() for f, t in zip(ensemble, targets, strict=True))
        if backward:
            loss.backward()
        else:
            torch.autograd.grad(loss, xg)

    return step


if __name__ == "__main__":
    main()
