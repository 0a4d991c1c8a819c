"""experiment=transfer: do recognizers the protection never saw still match the protected faces?

For each held-out model (`transfer.heldout`; default: every model of `recognizer.names`, the
independent zoo) the faces are protected with an ensemble that leaves it and its siblings out
(default: all the other models of `recognizer.names`; `transfer.ensemble` fixes one), and that
model alone is measured on the set: match at its calibrated threshold with a 95 % Wilson
interval, mean cos, impostor FAR with protected and clean probes, SSIM, PSNR and images/s.

The held-out model also watches the ascent: its cos(f(X), f(X_t)) every `transfer.monitor_every`
steps, computed without gradients and never fed back. `transfer_curves.csv` holds it beside each
surrogate's cos per step (`images/transfer_curves.png` too, where matplotlib is installed).
Each row's `start` is the same model's view of X0, every image's start before the first step:
the difference says what the ascent, rather than stage 1, did to the match and the impostor FAR.

The trade-off curve: `transfer.grid` maps method keys to values (`{highpass.omega_c: [0.02, 0.04],
gamma: [0, 5]}`); every combination is one grid point, measured like the plain run, and
`transfer_tradeoff.csv` with `images/transfer_tradeoff.png` give held-out match (with its 95 %
interval) against SSIM per point, so a user can pick theirs.

Each held-out model gets its own protected set, `<run_dir>/protected/[<point>/]<name>`, resumable
like experiment=protect: rerun the same command with the same `run_dir=` after a crash.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from scipy.stats import binomtest
from torchmetrics.functional.image import structural_similarity_index_measure

import datamodules
from ppfr import recognizers
from ppfr.config import to_dict
from ppfr.devices import device as device_of
from ppfr.errors import ConfigError
from ppfr.evaluate import blackbox_metrics, embed_sets, log_grid
from ppfr.generate import ProtectedSet, build_method, generate
from ppfr.protect import parts
from ppfr.protect.base import ProtectionMethod
from ppfr.recognizers import Recognizer
from ppfr.run import Run, format_table
from ppfr.verification import embed_batch, find_calibration, measured_on

TRADEOFF = ["point", "held out", "match", "match low", "match high", "n", "cos", "SSIM", "PSNR"]
START = ("match", "cos_mean", "far_protected", "far_protected_without_common", "impostor_cos_mean_protected",
         "impostor_cos_std_protected", "impostor_cos_slope", "impostor_residual_common")  # fmt: skip
COLUMNS = ["held out", "match", "95% CI", "n", "cos", "thr", "FAR prot", "FAR clean", "SSIM", "PSNR",
           "images/s", "ensemble"]  # fmt: skip


def wilson(k: int, n: int) -> tuple[float, float]:
    """The 95 % Wilson score interval of k successes in n trials."""
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def _names(value: Any) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def grid_points(cfg: DictConfig) -> list[tuple[str, dict[str, Any]]]:
    """(label, protect overrides) of every point of `transfer.grid`; one unlabelled point without a grid.

    The grid's leaves are lists of values, written flat (`{highpass.omega_c: [...]}`) or nested
    (`transfer.grid.highpass.omega_c=[...]` on the command line)."""
    grid = cfg.transfer.get("grid")
    grid = _flatten(to_dict(grid)) if grid else {}
    for key, values in grid.items():
        if not _has_key(cfg.protect, key):
            raise ConfigError(f"transfer.grid.{key}: protect={cfg.protect.name} has no key {key!r}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"transfer.grid.{key}: {values!r} must be a non-empty list of values")
    if not grid:
        return [("", {})]
    return [
        (
            ",".join(f"{k}={_word(v)}" for k, v in zip(grid, combo, strict=True)),
            dict(zip(grid, combo, strict=True)),
        )
        for combo in itertools.product(*grid.values())
    ]


@torch.no_grad()
def start_view(
    method: ProtectionMethod,
    dm: Any,
    records: list[dict[str, Any]],
    box: Recognizer,
    clean: torch.Tensor,
    threshold: float,
    batch_size: int,
    device: torch.device,
    flip: bool,
) -> dict[str, float] | None:
    """The held-out model on each image's start X0 (the method's stage 1 before any step, redrawn
    from the image's stored seed): against the protected row it says which part of the match and
    of the impostor statistics the ascent makes. None for a method without a stage-1 start."""
    start = getattr(method, "start", None)
    if start is None:
        return None
    seed_of = {r["index"]: r["seed"] for r in records}
    emb, ssim = [], []
    for batch in dm.predict_dataloader(indices=[r["index"] for r in records], batch_size=batch_size):
        x = batch["image"].to(device).float()
        seeds = torch.tensor([seed_of[i] for i in batch["index"].tolist()])
        x0 = start(x, parts.generators(seeds, device))[1].clamp(0, 1)
        ssim.append(structural_similarity_index_measure(x0, x, data_range=1.0, reduction="none").cpu())
        emb.append(embed_batch(box, x0, flip).float().cpu())
    labels = torch.tensor([r["label"] for r in records])
    m = blackbox_metrics(clean, torch.cat(emb), labels, threshold)
    return {**{k: m[k] for k in START}, "ssim": torch.cat(ssim).mean().item()}


def _word(value: Any) -> str:
    """A value as a folder-name-safe word: lists joined with '+'."""
    return "+".join(map(_word, value)) if isinstance(value, list) else str(value).replace("/", "_")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _has_key(node: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not OmegaConf.is_dict(node) or part not in node:
            return False
        node = node[part]
    return True


def _at_point(cfg: DictConfig, overrides: dict[str, Any]) -> DictConfig:
    """`cfg` with the grid point's method keys set (a copy; the method checks their ranges)."""
    if not overrides:
        return cfg
    point = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in overrides.items():
        OmegaConf.update(point, f"protect.{key}", value, merge=False)
    return point


def _curve_rows(name: str, curve: dict[str, Any]) -> list[list[Any]]:
    """Long-format rows (held out, step, series, cos): each model's cos on the plain image at the
    watched steps (the held-out one marked), and each surrogate's as the loss saw it at every step.
    ``name`` is the held-out model, after its grid point's label and a slash on a grid."""
    heldout, rows = name.rpartition("/")[2], []
    for j, key in enumerate(curve["keys"]):
        kind, _, model = key.partition("/")
        if kind == "monitor":
            series = f"{model} (held out)" if model == heldout else model
        elif kind == "cos" and model:
            series = f"{model} (loss view)"
        else:
            continue
        rows += [[name, int(r[0]), series, r[j + 1]] for r in curve["rows"] if r[j + 1] is not None]
    return rows


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt: Any, fig: Any, path: Path) -> bool:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot(path: Path, curves: dict[str, dict[str, Any]], thresholds: dict[str, float]) -> bool:
    """The cos curves, one panel per held-out model; False when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.4), squeeze=False, sharey=True)
    for ax, (name, curve) in zip(axes[0], curves.items(), strict=True):
        lines: dict[str, list[tuple[int, float]]] = {}
        for _, step, series, cos in _curve_rows(name, curve):
            if not series.endswith("(loss view)"):
                lines.setdefault(series, []).append((step, cos))
        for series, points in lines.items():
            held = series.endswith("(held out)")
            ax.plot(
                *zip(*points, strict=True), "k-o" if held else "-", lw=2 if held else 1, ms=3, label=series
            )
        heldout = name.rpartition("/")[2]
        ax.axhline(thresholds[heldout], color="k", ls="--", lw=1, label=f"{heldout} threshold")
        ax.set_title(f"held out: {name}", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("cos(f(X), f(X_t))")
    return _save(plt, fig, path)


def _plot_tradeoff(path: Path, rows: list[list[Any]]) -> bool:
    """Held-out match (95 % interval) against SSIM, a line per held-out model, each point labelled."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r[1] for r in rows):
        mine = sorted((r for r in rows if r[1] == name), key=lambda r: r[7])
        ssim = [r[7] for r in mine]
        match = [r[2] for r in mine]
        err = [
            [m - r[3] for m, r in zip(match, mine, strict=True)],
            [r[4] - m for m, r in zip(match, mine, strict=True)],
        ]
        ax.errorbar(ssim, match, yerr=err, fmt="-o", ms=4, capsize=2, label=name)
        for r in mine:
            ax.annotate(r[0], (r[7], r[2]), fontsize=5, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("SSIM(X', X)")
    ax.set_ylabel("held-out match")
    ax.set_ylim(-0.02, 1.02)
    ax.margins(x=0.35)  # room for the point labels
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def run(cfg: DictConfig, run: Run) -> dict[str, Any]:
    t = cfg.transfer
    for key, value, least in (("faces", t.faces, 1), ("monitor_every", t.monitor_every, 1)):
        if value is not None and (type(value) is not int or value < least):
            raise ConfigError(f"transfer.{key}={value!r}: expected an integer >= {least}")
    points = grid_points(cfg)
    names = cfg.recognizer.names if isinstance(cfg.recognizer.names, str) else list(cfg.recognizer.names)
    zoo = {r.name: r for r in recognizers.from_config(names, cfg.recognizer)}
    pool = list(zoo)
    heldout, fixed = _names(t.heldout) or pool, _names(t.ensemble)
    missing = [n for n in dict.fromkeys([*heldout, *(fixed or [])]) if n not in zoo]
    zoo.update({r.name: r for r in recognizers.from_config(missing, cfg.recognizer)})

    dm = datamodules.create(to_dict(cfg.data))
    faces = list(range(len(dm.dataset)))[: t.faces]
    if not faces:
        raise ConfigError(f"data={cfg.data.name}: no faces to protect")
    ids = [dm.dataset.ids[i] for i in faces]
    device = device_of(cfg)

    done: dict[str, Any] = dict(run.results.get("transfer", {}).get("heldout", {}))  # a resumed run's
    rows, tradeoff, curves, thresholds, is_main = [], [], {}, {}, True
    point_cfgs = {label: _at_point(cfg, overrides) for label, overrides in points}
    for (label, overrides), name in itertools.product(points, heldout):
        key = f"{label}/{name}" if label else name  # the plain run keeps its plain keys and folders
        point_cfg = point_cfgs[label]
        box = zoo[name]
        ensemble = [zoo[n] for n in fixed] if fixed else [zoo[n] for n in pool if zoo[n].family != box.family]
        if not ensemble:
            raise ConfigError(f"transfer: no surrogate left for held-out {name!r}; set transfer.ensemble")
        method, method_cfg, models, _ = build_method(point_cfg, ensemble, monitors=[box], blackbox=[box])
        out = ProtectedSet(Path(run.dir) / "protected" / key, cfg.generate.shard_size)
        digest = out.bind(method_cfg, cfg.seed, dm.dataset.ids, models, data=to_dict(cfg.data))
        print(
            f"transfer: {label + ', ' if label else ''}held out {name}, ensemble {[r.name for r in ensemble]}"
        )
        tag = key.replace("/", "_")
        gen = generate(point_cfg, run, dm, method, out, digest, faces, curve_key=f"convergence_{tag}")
        curve = done.get(key, {}).get("curve")
        if gen.curve.rows:
            watched = [[None if v != v else v for v in row] for row in gen.curve.rows]  # nan: not watched
            curve = {"keys": gen.curve.keys, "rows": watched}
        if gen.records is None:
            is_main = False
            continue  # rank 0 evaluates; the others go on to protect the next set with it
        records = gen.records

        entry = find_calibration(
            cfg.calibration_file, measured_on(cfg, box), cfg.eval.threshold_source == "nearest"
        )
        thresholds[name] = float(entry["threshold"])
        flip = bool(entry["measured_on"]["flip"])  # embed (X', X and X0) as the threshold was measured
        image, clean, prot = embed_sets(
            dm,
            records,
            out.dir,
            [box.to(device)],
            cfg.eval.batch_size,
            device,
            flip=flip,
        )
        labels = torch.tensor([r["label"] for r in records])
        m = blackbox_metrics(clean[name], prot[name], labels, thresholds[name])
        start = start_view(
            method, dm, records, box, clean[name], thresholds[name], cfg.eval.batch_size, device, flip
        )
        n = len(records)
        low, high = wilson(round(m["match"] * n), n)
        speed = gen.images_per_s or done.get(key, {}).get("images_per_s")
        done[key] = {
            "heldout": name,
            "point": overrides,
            "ensemble": [r.name for r in ensemble],
            "n": n,
            **{k: m[k] for k in ("match", "cos_mean", "threshold")},
            **{k: v for k, v in m.items() if k.startswith(("impostor_", "far_"))},
            "match_ci95": [low, high],
            "ssim": image["ssim"],
            "psnr": image["psnr"],
            "images_per_s": speed,
            "generated_now": gen.generated_now,
            "out_dir": str(out.dir),
            "curve": curve,
            "start": start,
        }
        row = done[key]
        tradeoff.append([label, name, row["match"], low, high, n, row["cos_mean"], row["ssim"], row["psnr"]])
        rows.append(
            [key, row["match"], f"{low:.3f}-{high:.3f}", n, row["cos_mean"], row["threshold"],
             row["far_protected"], row["far_clean"], row["ssim"], row["psnr"],
             round(speed, 3) if speed else "", "+".join(row["ensemble"])]
        )  # fmt: skip
        if curve:
            curves[key] = curve
        run.add_results(transfer={"heldout": done})
        run.log_metrics({f"transfer/{key}/{k}": v for k, v in row.items() if isinstance(v, float)})
        log_grid(run, dm, out, records[: cfg.eval.grid], key=f"transfer/grid_{tag}")
    if not is_main:
        return {}

    matches = [r[2] for r in tradeoff]  # every (point, held-out model) measured in this run
    summary = {"match_mean": sum(matches) / len(matches), "match_min": min(matches), "faces": len(ids)}
    print(format_table(COLUMNS, rows))
    run.log_table("transfer/table", COLUMNS, rows)
    curve_rows = [r for name, curve in curves.items() for r in _curve_rows(name, curve)]
    run.log_table("transfer/curves", ["held out", "step", "series", "cos"], curve_rows)
    plot = Path(run.dir) / "images" / "transfer_curves.png"
    plotted = bool(curves) and _plot(plot, curves, thresholds)
    if curves and not plotted:
        print("transfer: matplotlib is not installed; the curves are in transfer_curves.csv only")
    results = {"transfer": {"heldout": done, "summary": summary, "plot": str(plot) if plotted else None}}
    if points[0][0]:  # a grid: the trade-off table and plot
        run.log_table("transfer/tradeoff", TRADEOFF, tradeoff)
        print(format_table(TRADEOFF, tradeoff))
        picture = Path(run.dir) / "images" / "transfer_tradeoff.png"
        results["transfer"]["tradeoff_plot"] = str(picture) if _plot_tradeoff(picture, tradeoff) else None
    run.add_results(**results)
    return results
