"""Training speed of the U-Net attacker: the LightningModule under a Trainer against a plain PyTorch loop.

    OMP_NUM_THREADS=1 python bench/attack.py [--data ../shared/data/faces-mini/lfw] [--cache .cache/ppfr/aligned]
        [--images 64] [--batch 16] [--steps 20] [--warmup 3] [--workers 2] [--device cpu] [--depth 4] [--crop 0]

Both loops train the same smp Unet (same initial weights, loss L1 + 0.5 (1 - SSIM), AdamW, cosine
schedule) on the same DataLoader of real pairs: aligned faces and their blurred X' stored as PNG,
loaded and augmented exactly as in training (attacks.pairs.PairDataset). The runs alternate; each
step after `--warmup` is timed from the end of the previous one (data wait included), and images/s
is the batch over the median step, the figure least moved by other processes on a shared machine.
The data-loader wait is the share of the timed steps spent waiting for the next batch.
Goal: Lightning >= 0.95x the plain loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics.functional.image import structural_similarity_index_measure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, sync  # noqa: E402

import datamodules  # noqa: E402
from attacks import ATTACKERS  # noqa: E402
from attacks.pairs import PairDataset, build_augment  # noqa: E402
from ppfr.config import compose, to_dict  # noqa: E402
from ppfr.io import save_png  # noqa: E402
from ppfr.protect import create  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class TimedLoader:
    """A DataLoader whose `next()` times are kept (the same wrapper for both loops)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.waits = loader, []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - start)
            yield batch


class Clock(L.Callback):
    """The time at the end of every training step."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(pl_module.device)
        self.ends.append(time.perf_counter())


def lightning_run(module, loader: TimedLoader, steps: int, device: torch.device) -> list[float]:
    clock = Clock()
    trainer = L.Trainer(
        accelerator=device.type, devices=1, max_steps=steps, max_epochs=-1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[clock], inference_mode=False,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    return clock.ends


def plain_run(net, loader: TimedLoader, steps: int, device: torch.device) -> list[float]:
    net = net.to(device).train()
    optimizer = torch.optim.AdamW(
        [p for p in net.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    ends: list[float] = []
    while len(ends) < steps:
        for batch in loader:
            x, target = batch["input"].to(device), batch["target"].to(device)
            recon = torch.sigmoid(net(x))
            ssim = structural_similarity_index_measure(recon, target, data_range=1.0)
            loss = F.l1_loss(recon, target) + 0.5 * (1 - ssim)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            sync(device)
            ends.append(time.perf_counter())
            if len(ends) == steps:
                break
    return ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/faces-mini/lfw"))
    parser.add_argument("--cache", default=".cache/ppfr/aligned")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating runs of each loop; the best counts"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--crop", type=int, default=0, help="random paired crop in px; 0: whole faces")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(machine(device))

    dm = datamodules.create(
        {"name": "lfw", "root": args.data, "pairs_file": None, "cache_dir": args.cache,
         "on_no_face": "center_crop", "subset": {"identities": args.images}}
    )  # fmt: skip
    indices = list(range(min(args.images, len(dm.dataset))))
    blur = create({"name": "blur", "sigma": 3.0})
    tmp = Path(tempfile.mkdtemp(prefix="bench_attack_"))
    files = []
    for i in indices:
        x = dm.dataset[i]["image"]
        files.append(str(tmp / f"{i}.png"))
        save_png(blur(x[None], torch.zeros(1, dtype=torch.long))[0], Path(files[-1]))
    augment = build_augment({"hflip": 0.5, "crop": args.crop or None})
    data = PairDataset(dm.dataset, indices, files, augment)

    def loader() -> TimedLoader:
        return TimedLoader(
            DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
                       persistent_workers=args.workers > 0, pin_memory=device.type == "cuda")
        )  # fmt: skip

    cfg = to_dict(
        compose(
            ["experiment=attack", f"attack.encoder={args.encoder}", f"attack.encoder_depth={args.depth}"]
        ).attack
    )
    module = ATTACKERS.create("unet", cfg, in_channels=3)
    init = {k: v.clone() for k, v in module.state_dict().items()}
    steps: dict[str, list[float]] = {"lightning": [], "plain": []}  # seconds of each timed step
    waits: dict[str, list[float]] = {"lightning": [], "plain": []}
    for _ in range(args.repeats):  # alternating, so a change of load hits both loops alike
        for name in steps:
            module.load_state_dict(init)
            timed = loader()
            run = lightning_run(module, timed, args.warmup + args.steps, device) if name == "lightning" else (
                plain_run(module.net, timed, args.warmup + args.steps, device))  # fmt: skip
            steps[name] += [b - a for a, b in zip(run[args.warmup - 1 :], run[args.warmup :], strict=False)]
            waits[name] += timed.waits[args.warmup : args.warmup + args.steps]
    print(
        f"{len(indices)} real pairs (blur sigma 3), batch {args.batch}, {args.steps} timed steps after "
        f"{args.warmup} x {args.repeats} runs, {args.workers} workers, {args.encoder} depth {args.depth}, "
        f"{'crop ' + str(args.crop) if args.crop else 'whole 112-px faces'}, {args.device}"
    )
    print(f"{'loop':<10}{'images/s (median step)':>24}{'images/s (mean)':>17}{'loader wait':>13}")
    rate = {}
    for name, times in steps.items():
        rate[name] = args.batch / statistics.median(times)
        mean = args.batch * len(times) / sum(times)
        print(f"{name:<10}{rate[name]:>24.1f}{mean:>17.1f}{sum(waits[name]) / sum(times):>12.1%}")
    print(f"lightning / plain (median step): {rate['lightning'] / rate['plain']:.3f}x (goal >= 0.95)")


if __name__ == "__main__":
    main()
