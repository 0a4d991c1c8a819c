"""Speed of each recognizer per backend: image-steps/s of forward + input gradient.

    OMP_NUM_THREADS=1 python bench/recognizers.py [--models-dir ../shared/models] [--device cuda]
        [--names a b ...] [--batch 16] [--bf16] [--compile] [--cudnn-benchmark] [--quick]

One image-step is what the protection method pays per image, step and surrogate: the embedding
of a batch and the gradient of a cosine loss with respect to the input crops (weights frozen).
Columns: onnx2torch eager, native eager with contiguous (NCHW) weights (`recognizer.channels_last=false`),
native eager as created (channels-last weights, the default), with `--bf16` native under bf16 autocast
(the cosine of its input gradient to float32's printed too), and with `--compile` native under
torch.compile (its compile time printed apart); then the first call's seconds of native channels-last,
onnx2torch and native NCHW, timed in that order: channels-last's first call pays its own cuDNN plans,
onnx2torch's those of the NCHW shapes that native NCHW then reuses. Inputs are random crops: speed
does not depend on content.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_machine_options, apply_machine_options, machine, timed  # noqa: E402

from ppfr import recognizers  # noqa: E402
from ppfr.recognizers.onnx import load_catalog  # noqa: E402


def step_fn(rec: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, bf16: bool = False):
    def step() -> torch.Tensor:
        xg = x.clone().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            emb = rec(xg)
        return torch.autograd.grad(F.cosine_similarity(emb.float(), targets).sum(), xg)[0]

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "models"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--names", nargs="+", default=["all"], help="recognizer names (default: all ONNX models)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per variant (the fastest counts)")
    ap.add_argument("--bf16", action="store_true", help="also time native under bf16 autocast")
    ap.add_argument("--compile", action="store_true", help="also time native under torch.compile")
    add_machine_options(ap)
    ap.add_argument("--quick", action="store_true", help="one timed call per variant")
    args = ap.parse_args()
    options = apply_machine_options(args)
    device = torch.device(args.device)
    repeats = 1 if args.quick else args.repeats
    print(f"{machine(device)} | {options}")
    print(f"batch {args.batch}, forward + input gradient, image-steps/s (fastest of {repeats})")
    names = list(load_catalog(args.models_dir)) if args.names == ["all"] else args.names
    head = f"{'recognizer':<26}{'onnx2torch':>11}{'native NCHW':>13}{'native CL':>11}"
    print(
        head
        + (f"{'bf16':>8}{'grad cos':>10}" if args.bf16 else "")
        + (f"{'compiled':>10}{'compile s':>11}" if args.compile else "")
        + f"{'native/onnx':>13}{'first call s: CL':>18}{'onnx':>7}{'NCHW':>7}",
        flush=True,
    )
    x = torch.rand(args.batch, 3, 112, 112, generator=torch.Generator().manual_seed(0)).to(device)
    for name in names:
        onnx_rec = recognizers.create(name, args.models_dir, backend="onnx").to(device)
        native = recognizers.create(name, args.models_dir).to(device)
        contiguous = recognizers.create(name, args.models_dir, channels_last=False).to(device)
        # Other faces (at cos = 1 the gradients vanish); drawn, not embedded, so that no call of a
        # network precedes the timed first calls.
        targets = F.normalize(torch.randn(args.batch, native.embedding_dim, device=device), dim=1)
        fns = {
            "native": step_fn(native, x, targets),
            "onnx": step_fn(onnx_rec, x, targets),
            "nchw": step_fn(contiguous, x, targets),
        }
        if args.bf16:
            fns["bf16"] = step_fn(native, x, targets, bf16=True)
        best, first = timed(fns, device, repeats)
        compile_s = None
        if args.compile:
            compiled = torch.compile(native)
            start = time.perf_counter()
            step_fn(compiled, x, targets)()
            compile_s = time.perf_counter() - start
            best.update(timed({"compiled": step_fn(compiled, x, targets)}, device, repeats)[0])
        speed = {k: args.batch / v for k, v in best.items()}
        line = f"{name:<26}{speed['onnx']:>11.1f}{speed['nchw']:>13.1f}{speed['native']:>11.1f}"
        if args.bf16:
            cos = F.cosine_similarity(fns["native"]().flatten(1), fns["bf16"]().flatten(1)).min()
            line += f"{speed['bf16']:>8.1f}{cos.item():>10.3f}"
        if compile_s is not None:
            line += f"{speed['compiled']:>10.1f}{compile_s:>11.0f}"
        line += f"{speed['native'] / speed['onnx']:>12.2f}x"
        print(line + f"{first['native']:>18.2f}{first['onnx']:>7.2f}{first['nchw']:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
