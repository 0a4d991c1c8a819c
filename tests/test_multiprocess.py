"""Generation in several processes started outside Lightning (torchrun) and by Lightning's own DDP
launcher: every rank writes into one run directory, chosen by rank 0, and the set is complete; and
spawned ranks take the launcher's CPU settings.

Two CPU processes talking over gloo; no `run_dir`, so each process would pick its own timestamp.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ppfr.devices import CpuSettings
from ppfr.generate import safe_name

ROOT = Path(__file__).resolve().parents[1]
RANK_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
)

LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
    "lightning": [sys.executable],  # strategy=ddp: Lightning starts the second process itself
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_ranks_write_one_complete_set(launcher, faces_mini, models_dir, align_cache, tmp_path):
    outputs = tmp_path / "outputs"
    args = [
        "-m", "ppfr.fit", "experiment=protect", "data=lfw", f"data.root={faces_mini / 'lfw'}",
        "data.subset.pairs=2", f"data.cache_dir={align_cache}", f"paths.models={models_dir}",
        "protect.steps=2", "generate.batch_size=1", "trainer=cpu", "trainer.devices=2",
        "trainer.strategy=ddp", "logger=csv", f"paths.outputs={outputs}", "eval.enabled=false", "eval.grid=2",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [*LAUNCHERS[launcher], *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run_dirs = list((outputs / "protect").iterdir())
    assert len(run_dirs) == 1, run_dirs  # not one per rank
    run_dir = run_dirs[0]
    results = json.loads((run_dir / "results.json").read_text())
    gen = results["generation"]
    assert results["status"] == "ok" and gen["images"] == gen["generated_now"] == 4
    out = Path(gen["out_dir"])
    assert out == run_dir / "protected"
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in manifest}) == len(manifest) == 4
    assert all((out / r["path"]).is_file() for r in manifest)
    assert sorted(p.name.rsplit("-", 1)[1] for p in (out / "parts").glob("*.jsonl")) == [
        "rank0.jsonl",
        "rank1.jsonl",
    ]  # both ranks wrote their share into the same set
    assert len({p.name.rsplit("-", 1)[0] for p in (out / "parts").glob("*.jsonl")}) == 1  # one attempt
    first = sorted(manifest, key=lambda r: r["index"])[:2]
    assert all((out / "grid" / f"{safe_name(r['id'])}.{s}.png").is_file() for r in first for s in "FC")
    curve = (run_dir / "convergence.csv").read_text().splitlines()
    assert len(curve) == 1 + 2  # the curve gathered from both ranks, one row per step


def mmapped_bytes() -> int:
    """Bytes glibc's malloc holds in mmapped blocks (mallinfo2's hblkhd)."""

    fields = (
        "arena",
        "ordblks",
        "smblks",
        "hblks",
        "hblkhd",
        "usmblks",
        "fsmblks",
        "uordblks",
        "fordblks",
        "keepcost",
    )

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in fields]

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2
    return mallinfo2().hblkhd


class _ReportsCpuSettings(L.LightningModule):
    """Writes, per rank, whether subnormal floats survive a multiplication (they do not when flushed)
    and whether a 64 MiB tensor comes in its own mmapped pages (it does not when freed memory is
    kept). The multiplication's tensor is large enough to run on the rank's thread pool, not only
    its main thread (`torch.set_flush_denormal` is per thread)."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        kept = bool((torch.full((1 << 20,), 1e-39) * 1.0).count_nonzero() > 0)
        before = mmapped_bytes()
        block = torch.ones(1 << 24)  # 64 MiB, above glibc's largest mmap threshold (32 MiB)
        mmapped = mmapped_bytes() - before >= block.nbytes
        (self.out / f"rank{self.global_rank}").write_text(f"{kept} {mmapped}")


@pytest.mark.slow
@pytest.mark.parametrize("enabled", [True, False])
def test_spawned_ranks_take_the_cpu_settings(enabled, tmp_path):
    """`ddp_spawn` ranks start with the CPU's default (subnormals kept) and glibc's malloc as it is;
    the callback sets each one."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormal numbers (not x86 with SSE3)")
    try:
        mmapped_bytes()
    except (OSError, AttributeError):
        pytest.skip("the C library is not glibc >= 2.33 (no mallinfo2)")
    torch.set_flush_denormal(False)  # what a spawned rank starts with; the callback must change it
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
        callbacks=[CpuSettings(flush_denormal=enabled, keep_freed_memory=enabled)],
    )  # fmt: skip
    trainer.predict(
        _ReportsCpuSettings(tmp_path), dataloaders=DataLoader(torch.zeros(2, 1)), return_predictions=False
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]
    assert {p.read_text() for p in tmp_path.iterdir()} == {f"{not enabled} {not enabled}"}
