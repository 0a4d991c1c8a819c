"""The trainable baselines (MinusFace, PRO-Face) and the own recognizers of PartialFace / DuetFace:
tiny real trainings on lfw-train through experiment=train_method, checkpoints reloaded to protect real faces."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import first_faces

from ppfr import recognizers
from ppfr.config import load_option, to_dict
from ppfr.errors import ConfigError, ModelError
from ppfr.fit import main
from ppfr.protect import create
from ppfr.protect.minusface import permutations
from ppfr.protect.training import ArcFace, OwnRecognizer, optimizer

SMALL_G = {"encoder": "resnet18", "depth": 4, "decoder_channels": [16, 8, 8, 8]}
SMALL_G_ARGS = ["protect.generator.encoder=resnet18", "protect.generator.decoder_channels=[16,8,8,8]"]


def seeds(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


@pytest.fixture(scope="module")
def faces(faces_mini, align_cache) -> torch.Tensor:
    """Two real aligned LFW faces of different people, 2 x 3 x 112 x 112 in [0,1]."""
    return first_faces(faces_mini, align_cache, 2)


@pytest.fixture(scope="module")
def train(tmp_path_factory, shared, faces_mini, lfw_train, align_cache):
    """Runs experiment=train_method in a fresh run_dir with tiny data; returns (results, run_dir)."""
    base = tmp_path_factory.mktemp("train_method")

    def run(name: str, *args: str, run_dir: str | None = None):
        run_dir = run_dir or str(base / name)
        results = main(
            [
                "experiment=train_method",
                f"paths.shared={shared}",
                f"paths.outputs={base / 'outputs'}",
                "logger=csv",
                "trainer.enable_progress_bar=false",
                f"train.data.root={lfw_train}",
                f"train.data.cache_dir={align_cache}",
                "train.data.subset.identities=6",  # 10 images, 2 identities with >= 2 images
                f"data.root={faces_mini / 'lfw'}",
                f"data.cache_dir={align_cache}",
                "data.subset.pairs=4",
                f"run_dir={run_dir}",
                *args,
            ]
        )
        return results, run_dir

    return run


def test_arcface_logits_and_margin():
    torch.manual_seed(0)
    head = ArcFace(8, 5, s=64.0, m=0.5)
    emb, labels = torch.randn(3, 8), torch.tensor([0, 4, 2])
    logits = head(emb, labels)
    assert logits.shape == (3, 5)
    cos = torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(head.weight).T
    other = torch.ones_like(cos, dtype=torch.bool).scatter(1, labels[:, None], False)
    torch.testing.assert_close(logits[other], 64 * cos[other])  # no margin on the other classes
    theta = cos.gather(1, labels[:, None]).acos()
    torch.testing.assert_close(logits.gather(1, labels[:, None]), 64 * (theta + 0.5).cos())
    near_pi = ArcFace(2, 2)  # past theta = pi - m the margin is linear: still below the plain logit
    near_pi.weight.data = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = near_pi(torch.tensor([[-1.0, 0.01]]), torch.tensor([0]))
    assert out[0, 0] < 64 * -0.9999 and math.isfinite(float(out[0, 0]))


def test_own_recognizer_takes_the_representation_channels():
    net = OwnRecognizer(27, classes=4).eval()
    with torch.no_grad():
        emb = net(torch.randn(2, 27, 112, 112))
    assert emb.shape == (2, 512)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    assert net.loss(torch.randn(2, 27, 112, 112), torch.tensor([0, 3])) > 0


def test_minusface_permutations_follow_the_seed():
    a, b = permutations(seeds(1, 2), n_dup=2), permutations(seeds(1, 3), n_dup=2)
    assert a.shape == (2, 384)
    assert torch.equal(a, permutations(seeds(1, 2), n_dup=2))  # the same seed repeats
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])  # another seed, another order
    assert not torch.equal(a[0, :192], a[0, 192:])  # the duplicates are independent shuffles
    for row in a.view(-1, 192):
        assert torch.equal(row.sort().values, torch.arange(192))


def test_optimizer_builds_the_schedule_and_names_an_unknown_kind():
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    schedule = {"optimizer": "adam", "lr": 0.1, "weight_decay": 0.0, "milestones": [2]}
    assert isinstance(optimizer(params, schedule)["optimizer"], torch.optim.Adam)
    with pytest.raises(
        ConfigError, match=r"train\.schedules\.\*\.optimizer: 'rmsprop' is not one of sgd, adam"
    ):
        optimizer(params, {**schedule, "optimizer": "rmsprop"})


def test_untrained_methods_refuse_to_protect():
    with pytest.raises(ConfigError, match="experiment=train_method protect=minusface"):
        create(to_dict(load_option("protect", "minusface")))


@pytest.mark.slow
def test_minusface_two_stages_resume_and_protect(train, faces, tmp_path):
    small = ["protect=minusface", *SMALL_G_ARGS, "train.schedules.minusface.batch_size=4"]
    one, run_dir = train("mf1", *small, "train.max_steps=1")
    assert one["training"]["steps"] == 1 and one["training"]["resumed_from_step"] == 0
    again, _ = train("mf1", *small, "train.max_steps=2", run_dir=run_dir)  # the same run_dir resumes
    assert again["training"]["resumed_from_step"] == 1 and again["training"]["steps"] == 2
    parts = again["training"]["final_parts"]
    assert set(parts) == {"l1", "arcface"} and math.isfinite(again["training"]["final_loss"])
    assert 0 <= again["own_recognizer"]["accuracy"] <= 1 and again["own_recognizer"]["n_pairs"] == 4
    stage1 = again["training"]["checkpoint"]

    two, _ = train(
        "mf2", *small, "train.max_steps=1", "train.stage=2", f"protect.checkpoint={stage1}", "protect.n_dup=2"
    )
    assert (
        two["stage"] == 2
        and two["training"]["steps"] == 1
        and set(two["training"]["final_parts"]) == {"arcface"}
    )
    stage2 = two["training"]["checkpoint"]
    g1, g2 = (torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p in (stage1, stage2))
    for key in (k for k in g1 if k.startswith("generator.") and g1[k].is_floating_point()):
        torch.testing.assert_close(g1[key], g2[key], rtol=0, atol=0)  # stage 2 kept G frozen

    method = create({"name": "minusface", "checkpoint": stage2, "n_dup": 2, "generator": SMALL_G})
    assert method.stochastic and method.needs_training and method.attacker_channels == 6
    s = seeds(5, 6)
    shown = method(faces, s)
    assert shown.shape == faces.shape and shown.min() >= 0 and shown.max() <= 1
    rep = method.attacker_input(faces, s)
    assert rep.shape == (2, 6, 112, 112)
    torch.testing.assert_close(rep[:, :3], shown)
    torch.testing.assert_close(method(faces, s), shown, rtol=0, atol=0)  # a seed reproduces
    assert (method(faces, seeds(7, 8)) - shown).abs().amax() > 0.1  # another seed, another X_p

    with pytest.raises(ConfigError, match="protect.generator"):  # the config must describe the weights
        create({"name": "minusface", "checkpoint": stage2})
    with pytest.raises(ModelError, match="not found"):
        create({"name": "minusface", "checkpoint": str(tmp_path / "none.ckpt"), "generator": SMALL_G})


@pytest.mark.slow
def test_proface_trains_and_protects(train, faces, models_dir):
    out, _ = train(
        "pf",
        "protect=proface",
        "protect.width=4",
        "train.schedules.proface.batch_size=2",
        "train.max_steps=1",
    )
    assert out["training"]["steps"] == 1
    assert set(out["training"]["final_parts"]) == {"perceptual", "l1", "triplet", "triplet_original"}
    assert 0 <= out["own_recognizer"]["accuracy"] <= 1
    cfg = {
        **to_dict(load_option("protect", "proface")),
        "checkpoint": out["training"]["checkpoint"],
        "width": 4,
    }
    rec = recognizers.create("mobilefacenet_tf", models_dir)
    method = create(cfg, [rec])
    assert method.needs_training and not method.stochastic
    shown = method(faces, seeds(1, 2))
    assert shown.shape == faces.shape and shown.min() >= 0 and shown.max() <= 1
    torch.testing.assert_close(method(faces, seeds(3, 4)), shown)  # deterministic: mean sigma
    stages = method.stages(faces, seeds(1, 2))
    assert set(stages) == {"original", "obfuscated", "protected"}
    with pytest.raises(ConfigError, match="protect.width"):
        create({**cfg, "width": 8}, [rec])
    with pytest.raises(ModelError, match="not of minusface"):
        create({"name": "minusface", "checkpoint": cfg["checkpoint"], "generator": SMALL_G})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["partialface", "duetface"])
def test_own_recognizer_of_a_frequency_method(train, name):
    out, run_dir = train(
        name, f"protect={name}", f"train.schedules.{name}.batch_size=4", "trainer.fast_dev_run=true"
    )
    assert out["training"]["steps"] == 1 and math.isfinite(out["training"]["final_loss"])
    state = torch.load(out["training"]["checkpoint"], map_location="cpu", weights_only=True)
    stem = state["state_dict"]["recognizer.net.1.conv1.weight"]
    assert stem.shape == (64, {"partialface": 27, "duetface": 162}[name], 3, 3)
    assert state["hyper_parameters"]["protect"]["name"] == name
    assert 0 <= out["own_recognizer"]["accuracy"] <= 1
