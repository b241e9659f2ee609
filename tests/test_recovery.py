"""visionfx.distill: attention transfer, distillation fine-tuning, checkpoints and resume, PRepBN schedule, recipes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import visionfx
from visionfx.recovery import DistillConfig, distill, load_distill_config, load_distilled, tensor_data
from visionfx.recovery.attention_transfer import attention_sites, calibrate_outputs, host_mode, transfer_parameters
from visionfx.recovery.lora import LoRALinear, add_lora, merge_lora

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = dict(progress=False, log_every=1, eval_batch_size=16, recalibrate_steps=2, mixed_precision="no", cpu=True)
SMALL = dict(FAST, stage1_batch_size=8, stage2_batch_size=8)


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny ops: one thread is much faster than two on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def tiny_data(n=32, seed=0, labels=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 5, (n,), generator=g) if labels else None
    return tensor_data(x, y, x[:16], None if y is None else y[:16], mean=(0.5,) * 3, std=(0.25,) * 3)


def _attention_io(model, x):
    """Inputs and outputs of every timm Attention module of an unpatched model (independent of host_mode)."""
    store = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, name=name: store.__setitem__(name, (a[0], out)))
             for name, m in model.named_modules() if type(m).__name__ == "Attention"]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return store


def _per_layer_mse(patched, teacher, x):
    io = _attention_io(teacher, x)
    with torch.no_grad():
        return [F.mse_loss(patched.get_submodule(name)(inp), out).item() for name, (inp, out) in sorted(io.items())]


def _images(data, n=8):
    return (data.train.images[:n].float() / 255 - 0.5) / 0.25


# ------------------------------------------------------------------------------------------------------ host mode


def test_host_mode_is_the_original_model():
    model = tiny_vit()
    original = copy.deepcopy(model)
    visionfx.patch(model, "slab", norm="prepbn", prepbn_steps=10, adapter="timm_vit")
    add_lora(model, rank=2)
    for m in model.modules():  # a non-zero adapter, which host mode must switch off
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b)
    x = _images(tiny_data())
    with torch.no_grad():
        patched = model(x)
        with host_mode(model):
            host = model(x)
        again = model(x)
    torch.testing.assert_close(host, original(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(patched, host, atol=1e-3)
    torch.testing.assert_close(again, patched)  # the patch is back afterwards


# ------------------------------------------------------------------------------------------------------- stage 1


@pytest.mark.parametrize("method", ["slab", "vig"])
def test_stage1_reduces_layer_mse_and_trains_only_added_parameters(method):
    model, data = tiny_vit(), tiny_data()
    teacher = copy.deepcopy(model)
    visionfx.patch(model, method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _images(data)
    mse0 = _per_layer_mse(model, teacher, x)
    res = distill(model, None, data, stage1_steps=12, stage2_steps=0, stage1_batch_size=16, stage1_lr=2e-2,
                  stage1_warmup=0.0, eval_at_start=False, **FAST)
    mse1 = _per_layer_mse(model, teacher, x)
    assert all(b < 0.9 * a for a, b in zip(mse0, mse1)), (mse0, mse1)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".vfx_" in k for k in changed), changed
    hist = res.log["stages"]["stage1"]["history"]
    assert len(hist) == 12 and len(hist[0]["layer_mse"]) == 2 and hist[-1]["loss"] < hist[0]["loss"]


def _host_head_rms(teacher, x):
    """Per site, the unpatched attention's output before its projection: RMS per head, averaged over heads."""
    store = {}
    hooks = [m.proj.register_forward_pre_hook(lambda mod, a, name=name: store.__setitem__(name, a[0]))
             for name, m in teacher.named_modules() if type(m).__name__ == "Attention"]
    with torch.no_grad():
        teacher(x)
    for h in hooks:
        h.remove()
    heads = teacher.blocks[0].attn.num_heads
    return {name: o.view(*o.shape[:2], heads, -1).pow(2).mean((0, 1, 3)).sqrt().mean().item()
            for name, o in store.items()}


def test_output_calibration_sets_vig_norms_to_the_host_output_rms():
    """vig's two RMSNorm weights take the host attention output's per-head RMS (METHODS.md §7.3), measured here on
    the unpatched model; a method with nothing to calibrate is left untouched."""
    model, data = tiny_vit(), tiny_data()
    teacher = copy.deepcopy(model)
    x = _images(data)
    want = _host_head_rms(teacher, x)
    visionfx.patch(model, "vig")
    assert calibrate_outputs(model, x) == sorted(want)
    for name, rms in want.items():
        mixer = model.get_submodule(name).mixer
        for w in (mixer.norm_o, mixer.norm_l):
            torch.testing.assert_close(w, torch.full_like(w, rms), rtol=1e-5, atol=1e-6)
    assert min(want.values()) < 0.9  # a real change from the init of 1
    slab = tiny_vit()
    visionfx.patch(slab, "slab")
    before = copy.deepcopy(slab.state_dict())
    calls = []
    slab.register_forward_hook(lambda *args: calls.append(1))
    assert calibrate_outputs(slab, x) == [] and not calls  # not even a forward pass
    assert all(torch.equal(v, before[k]) for k, v in slab.state_dict().items())


@pytest.mark.parametrize("calibrate", [True, False])
def test_distill_calibrates_outputs_before_stage1(calibrate):
    model, data = tiny_vit(), tiny_data()
    res = distill(model, "vig", data, stage1_steps=0, stage2_steps=0, eval_at_start=False,
                  output_calibration=calibrate, **SMALL)
    norms = [m.mixer.norm_o for _, m in attention_sites(model)]
    if calibrate:
        assert len(res.log["calibrated_sites"]) == 2 and all(not torch.all(w == 1) for w in norms)
    else:
        assert "calibrated_sites" not in res.log and all(torch.all(w == 1) for w in norms)


def test_stage1_with_lora_changes_only_added_and_host_projections():
    model, data = tiny_vit(), tiny_data()
    teacher = copy.deepcopy(model)
    visionfx.patch(model, "slab")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = distill(model, None, data, stage1_steps=4, stage2_steps=0, stage1_batch_size=16, stage1_lr=1e-2,
                  lora_rank=2, eval_at_start=False, **FAST)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # merged into qkv/proj
    assert set(model.state_dict()) == set(before)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    allowed = lambda k: ".vfx_" in k or k.endswith(("attn.qkv.weight", "attn.proj.weight"))  # noqa: E731
    assert all(allowed(k) for k in changed) and any(k.endswith("attn.qkv.weight") for k in changed), changed
    assert res.log["stages"]["stage1"]["steps"] == 4
    visionfx.unpatch(model)  # still a plain model afterwards, with the merged weights
    assert type(model.blocks[0].attn.qkv) is torch.nn.Linear
    assert not torch.equal(model.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)


def test_lora_merge_equals_adapter_output():
    model = tiny_vit()
    visionfx.patch(model, "slab")
    add_lora(model, rank=3, alpha=6.0)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b)
    x = _images(tiny_data())
    with torch.no_grad():
        with_adapters = model(x)
        assert merge_lora(model) == 4
        merged = model(x)
    torch.testing.assert_close(merged, with_adapters, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="Linear children"):
        add_lora(model, targets=("in_proj",))


def test_transfer_parameters_are_the_mixers_only():
    model = tiny_vit()
    visionfx.patch(model, "slab", norm="prepbn", prepbn_steps=5, adapter="timm_vit")
    names = [n for n, _ in transfer_parameters(model)]
    assert names and all(".vfx_mixer." in n for n in names)  # not the PRepBN norms' vfx_bn


def test_training_free_method_skips_stage1():
    model, data = tiny_vit(), tiny_data()
    res = distill(model, "agentsd", data, stage1_steps=3, stage2_steps=0, **SMALL)
    assert "skipped" in res.log["stages"]["stage1"]
    assert set(res.top1) == {"start", "stage1", "final"} and res.top1["start"] == res.top1["stage1"]


# ------------------------------------------------------------------------------------- stage 2, checkpoints, resume


def _run(tmp, callback=None, resume=False, model=None):
    return distill(model if model is not None else tiny_vit(drop_path_rate=0.1), "agent" if not resume else None,
                   tiny_data(), stage1_steps=3, stage2_steps=4, stage1_batch_size=8, stage2_batch_size=8,
                   grad_accum=2, save_every=2, output_dir=tmp, resume=resume, callback=callback, **FAST)


class Interrupt(Exception):
    pass


def _stop_at(stage, step, seen):
    def cb(s, k):
        seen.append((s, k))
        if (s, k) == (stage, step):
            raise Interrupt
    return cb


def test_stage2_logs_checkpoints_and_resume_equals_uninterrupted(tmp_path):
    full = _run(tmp_path / "full")
    log = full.log
    s2 = log["stages"]["stage2"]
    assert s2["steps"] == 4 and s2["images"] == 4 * 2 * 8 and s2["gpu_seconds"] > 0
    assert [h["step"] for h in s2["history"]] == [1, 2, 3, 4] and all("kd" in h and "ce" in h for h in s2["history"])
    assert {e["stage"] for e in log["evals"]} == {"start", "stage1", "stage2"}
    assert all(0 <= e["top1"] <= 1 for e in log["evals"])
    assert (tmp_path / "full" / "distill_log.json").is_file()
    ckpts = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert ckpts == ["stage2-step0000002", "stage2-step0000004"]  # keep_checkpoints = 2
    assert (tmp_path / "full" / "checkpoints" / "stage2-step0000004" / "visionfx" / "visionfx_config.json").is_file()

    # interrupted in stage 1, resumed, interrupted in stage 2, resumed
    part, seen = tmp_path / "part", [[], [], []]
    with pytest.raises(Interrupt):
        _run(part, _stop_at("stage1", 2, seen[0]))
    with pytest.raises(Interrupt):
        _run(part, _stop_at("stage2", 2, seen[1]), resume=True, model=_patched_fresh())
    resumed = _run(part, _stop_at(None, None, seen[2]), resume=True, model=_patched_fresh())
    assert seen == [[("stage1", 1), ("stage1", 2)], [("stage1", 3), ("stage2", 1), ("stage2", 2)],
                    [("stage2", 3), ("stage2", 4)]]  # each run continued where the last checkpoint was
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)
    assert resumed.top1["stage2"] == full.top1["stage2"]
    hist = resumed.log["stages"]["stage2"]["history"]
    assert [h["step"] for h in hist] == [1, 2, 3, 4]

    # the final folder rebuilds the model
    rebuilt = load_distilled(tiny_vit(drop_path_rate=0.1), tmp_path / "full" / "final")
    x = _images(tiny_data())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), full.model(x))


def _patched_fresh():
    """What a restarted process has: the base model again, patched as in the interrupted run."""
    return visionfx.patch(tiny_vit(drop_path_rate=0.1), "agent")


def test_prepbn_schedule_advances_during_stage2():
    model, data = tiny_vit(), tiny_data()
    seen = []

    def watch(stage, step):
        if stage == "stage2":
            norm = model.blocks[0].norm1
            seen.append((int(norm.vfx_iter), int(norm.vfx_total)))

    res = distill(model, {"method": "slab", "norm": "prepbn"}, data, stage1_steps=1, stage2_steps=5,
                  grad_accum=2, callback=watch, **SMALL)
    total = int(0.8 * 5 * 2)  # 0.8 x optimiser steps x micro-batches (the counter counts training forwards)
    assert [t for _, t in seen] == [total] * 5
    assert [i for i, _ in seen] == [max(0, total - 2 * k) for k in range(1, 6)]
    assert res.log["stages"]["prepbn"]["recalibrate_steps"] == 2 and "final" in res.top1
    bn = model.blocks[0].norm1.vfx_bn.bn
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 2  # recalibrated over 2 batches


def test_time_budget_shortens_stage2_and_its_schedules():
    """A budget too small for the planned steps: stage 2 stops right after calibrating (10 + calibrate_steps steps),
    and PRepBN's λ schedule ends there instead of at the planned length."""
    model, data = tiny_vit(), tiny_data()
    seen = []

    def watch(stage, step):
        if stage == "stage2":
            norm = model.blocks[0].norm1
            seen.append((step, int(norm.vfx_iter), int(norm.vfx_total)))

    res = distill(model, {"method": "slab", "norm": "prepbn"}, data, stage1_steps=1, stage2_steps=30,
                  time_budget=1e-6, calibrate_steps=2, callback=watch, **SMALL)
    s2 = res.log["stages"]["stage2"]
    assert s2["steps"] == s2["budget_steps"] == 12 and s2["planned_steps"] == 30
    assert s2["images"] == 12 * 8 and [step for step, _, _ in seen] == list(range(1, 13))
    assert seen[-1][1:] == (0, round(24 * 12 / 30))  # T = 0.8 x 30 forwards, scaled by 12/30; finished
    assert s2["step_seconds"] > 0 and s2["time_budget"] == 0.0  # stage 1 used the whole budget


def test_time_budget_large_enough_keeps_every_step():
    res = distill(tiny_vit(), "inline", tiny_data(), stage1_steps=1, stage2_steps=14, time_budget=1e6,
                  calibrate_steps=2, **SMALL)
    s2 = res.log["stages"]["stage2"]
    assert s2["steps"] == s2["budget_steps"] == 14 and s2["images"] == 14 * 8


def test_time_budget_fit_survives_interruption(tmp_path, monkeypatch):
    """The fitted step count is logged and checkpointed: a run interrupted after fitting resumes to the same end,
    with the shortened cosine schedule restored (the learning rate reaches 0 at the fitted last step)."""
    from visionfx.recovery import engine

    monkeypatch.setattr(engine, "steps_that_fit", lambda done, planned, *a: 14)  # timing-independent

    def run(callback=None, resume=False):
        return distill(tiny_vit(drop_path_rate=0.1) if not resume else _patched_fresh(), "agent" if not resume else
                       None, tiny_data(), stage1_steps=0, stage2_steps=20, time_budget=1.0, calibrate_steps=2,
                       save_every=13, output_dir=tmp_path, resume=resume, callback=callback, **SMALL)

    seen = [[], []]
    with pytest.raises(Interrupt):
        run(_stop_at("stage2", 13, seen[0]))
    res = run(_stop_at(None, None, seen[1]), resume=True)
    assert [k for _, k in seen[0]] == list(range(1, 14)) and seen[1] == [("stage2", 14)]
    s2 = res.log["stages"]["stage2"]
    assert s2["steps"] == s2["budget_steps"] == 14 and s2["planned_steps"] == 20
    assert s2["history"][-1]["step"] == 14 and s2["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_prepbn_rescale_schedule_keeps_forwards_already_run():
    from visionfx.methods.prepbn import LinearNorm, PRepBNConfig

    norm = LinearNorm(PRepBNConfig(total_steps=100), torch.nn.LayerNorm(8), "norm1").train()
    for _ in range(30):
        norm(torch.randn(2, 3, 8))
    assert int(norm.vfx_iter) == 70
    norm.rescale_schedule(0.5)
    assert (int(norm.vfx_total), int(norm.vfx_iter)) == (50, 20)
    norm.rescale_schedule(0.2)
    assert (int(norm.vfx_total), int(norm.vfx_iter)) == (10, 0)


def test_prepbn_explicit_steps_and_reparameterize():
    model, data = tiny_vit(), tiny_data()
    res = distill(model, {"method": "slab", "norm": "prepbn"}, data, stage1_steps=0, stage2_steps=2,
                  prepbn_steps=3, reparameterize=True, **{**SMALL, "recalibrate_steps": 1})
    assert visionfx.get_config(model).prepbn_steps == 3
    assert model.blocks[0].norm1.folded is not None and res.log["stages"]["prepbn"]["reparameterized"]
    assert res.top1["final"] is not None


def test_finetune_added_trains_only_added_parameters_and_keeps_caller_frozen_ones():
    model, data = tiny_vit(), tiny_data()
    model.head.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    distill(model, "agent", data, stage1_steps=0, stage2_steps=2, finetune="added", stage2_lr=1e-2, **SMALL)
    changed = {k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])}
    assert changed == set()  # host weights untouched
    assert any(".vfx_" in k for k, v in model.state_dict().items() if k not in before and v.abs().sum() > 0)
    assert model.head.weight.requires_grad is False and model.head.bias.requires_grad is True
    model2 = tiny_vit()
    model2.head.weight.requires_grad_(False)
    before = model2.head.weight.clone()
    distill(model2, "agent", data, stage1_steps=0, stage2_steps=2, stage2_lr=1e-2, **SMALL)
    assert torch.equal(model2.head.weight, before) and not torch.equal(model2.head.bias, tiny_vit().head.bias)


def test_unlabeled_data_distils_without_cross_entropy():
    model = tiny_vit()
    res = distill(model, "inline", tiny_data(labels=False), stage1_steps=1, stage2_steps=2,
                  **SMALL)
    hist = res.log["stages"]["stage2"]["history"]
    assert all("kd" in h and "ce" not in h for h in hist) and res.top1["final"] is None


def _block_and_attention_outputs(model, x):
    """Each block's and each block's attention output of a timm ViT, by running its blocks one by one."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    blocks, attns = [], []
    for block in model.blocks:
        attns.append(block.attn(block.norm1(h)))
        h = block(h)
        blocks.append(h)
    return {"block": blocks, "attention": attns}


def _feature_error(model, teacher, x, site="block"):
    """Mean over layers of each layer's squared error relative to the teacher's power, in float64."""
    with torch.no_grad():
        s, t = (_block_and_attention_outputs(m, x)[site] for m in (model, teacher))
    return sum(float(((a.double() - b.double()) ** 2).mean() / (b.double() ** 2).mean()) for a, b in zip(s, t)) / len(s)


@pytest.mark.parametrize("site", ["block", "attention"])
def test_feature_term_matches_per_layer_relative_error(site):
    from visionfx.recovery.finetune import DistillationLoss, feature_taps

    teacher = tiny_vit(depth=3)
    student = visionfx.patch(copy.deepcopy(teacher), "vig")
    x = torch.randn(4, 3, 32, 32)
    taps = feature_taps(student, teacher, site)
    loss_fn = DistillationLoss(student, teacher, ce_weight=0.0, feature_weight=0.5, taps=taps)
    loss, metrics = loss_fn(x, None)
    assert all(o is None for tap in taps for o in tap.outputs)  # taken: no graph outlives the step
    want = _feature_error(student, teacher, x, site)
    assert float(metrics["feature"]) == pytest.approx(want, rel=1e-5) and want > 1e-3
    assert float(loss.detach()) == pytest.approx(float(metrics["kd"] + 0.5 * metrics["feature"]), rel=1e-6)
    for tap in taps:
        tap.remove()
    assert not any(m._forward_hooks for model in (student, teacher) for m in model.modules())


def test_feature_term_is_zero_for_identical_models_and_taps_need_a_match():
    from visionfx.recovery.finetune import DistillationLoss, feature_taps

    student = visionfx.patch(tiny_vit(), "slab")
    teacher = copy.deepcopy(student)
    _, metrics = DistillationLoss(student, teacher, feature_weight=1.0,
                                  taps=feature_taps(student, teacher, "attention"))(torch.randn(2, 3, 32, 32), None)
    assert float(metrics["feature"]) == 0.0
    with pytest.raises(ValueError, match="feature_site must be"):
        feature_taps(student, teacher, "mlp")
    with pytest.raises(ValueError, match="teacher has no module"):
        feature_taps(student, tiny_vit(depth=1), "attention")
    with pytest.raises(ValueError, match="needs the taps"):
        DistillationLoss(student, teacher, feature_weight=1.0)
    with pytest.raises(ValueError, match="did you mean 'block'"):
        DistillConfig(feature_site="blocks")


@pytest.mark.parametrize("compile", [False, True])
def test_stage2_feature_distillation_pulls_features_to_the_teacher(compile):
    teacher = tiny_vit()
    x = torch.randn(8, 3, 32, 32)
    errors, logged = [], []
    for weight in (0.0, 20.0):
        torch._dynamo.reset()
        res = distill(copy.deepcopy(teacher), "vig", tiny_data(), stage1_steps=0, stage2_steps=6,
                      feature_weight=weight, compile=compile and weight > 0, stage2_lr=3e-3, **SMALL)
        errors.append(_feature_error(res.model, teacher, x))
        logged.append([h.get("feature") for h in res.log["stages"]["stage2"]["history"]])
        assert all(not m._forward_hooks for m in res.model.modules())  # the taps are gone with the stage
    assert errors[1] < 0.5 * errors[0]
    assert logged[0] == [None] * 6 and all(f > 0 for f in logged[1])


def test_distill_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="already patched"):
        distill(visionfx.patch(tiny_vit(), "slab"), "slab", tiny_data(), **SMALL)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        distill(tiny_vit(), "slab", tiny_data(), output_dir=tmp_path, resume=True, **FAST)
    with pytest.raises(ValueError, match="did you mean 'stage2_steps'"):
        distill(tiny_vit(), "slab", tiny_data(), stage2_step=3, **FAST)


# ---------------------------------------------------------------------------------------------------------- recipes


def test_distill_yaml_recipes_load():
    for path in sorted(CONFIGS.glob("distill-*.yaml")):
        cfg = load_distill_config(path)
        assert isinstance(cfg, DistillConfig)
    assert load_distill_config(CONFIGS / "distill-default.yaml") == DistillConfig()
    cifar = load_distill_config(CONFIGS / "distill-cifar10.yaml", stage2_steps=7)
    assert cifar.stage1_lr == 2e-3 and cifar.stage2_steps == 7 and cifar.lora_targets == ("qkv", "proj")


def test_train_yaml_recipe_loads():
    from visionfx.recovery.train import TrainConfig

    assert TrainConfig.load(CONFIGS / "train-cifar10.yaml") == TrainConfig()


@pytest.mark.parametrize("data,match", [
    ({"stage1_step": 3}, "did you mean 'stage1_steps'"),
    ({"lr": 1e-3}, "unknown option 'lr'"),
    ({"finetune": "al"}, "did you mean 'all'"),
    ({"stage2_warmup": 2.0}, r"\[0, 1\]"),
    ({"grad_accum": 0}, ">= 1"),
])
def test_distill_config_rejects_bad_keys_and_values(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig.from_dict(data)
    path = tmp_path / "bad.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in data.items()))
    with pytest.raises(ValueError, match=match):
        load_distill_config(path)


def test_train_config_rejects_unknown_keys():
    from visionfx.recovery.train import TrainConfig

    with pytest.raises(ValueError, match="did you mean 'epochs'"):
        TrainConfig.from_dict({"epoch": 3})


def test_train_reference_two_steps_on_cpu(tmp_path):
    from visionfx.recovery.train import TrainConfig, load_reference, train_reference

    cfg = TrainConfig(depth=1, embed_dim=32, num_heads=2, batch_size=8, max_steps=2, eval_batch_size=16, cpu=True,
                      mixed_precision="no", cutmix_alpha=1.0, mixup_alpha=0.5)
    data = tiny_data()
    data.classes = [str(i) for i in range(5)]
    out = train_reference(cfg, data, tmp_path, progress=False)
    assert out["steps"] == 2 and out["images"] == 16
    model, info = load_reference(tmp_path / "reference.pt")
    x = _images(data)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out["model"](x))
    assert info["mean"] == [0.5] * 3 and info["top1"] == out["top1"]


def test_step_budget_times_its_window_on_the_clock():
    """StepBudget against hand arithmetic on a scripted clock: the window is steps start+10 .. start+10+n."""
    from visionfx.recovery.engine import StepBudget

    class Clock:
        now = 0.0

        def elapsed(self):
            return self.now

    clock, budget = Clock(), StepBudget(100.0, calibrate_steps=4, start=3)
    fits = []
    for done in range(4, 30):
        clock.now = 2.0 + 0.5 * done  # 0.5 s per step after a 2 s start
        fits.append((done, budget.after_step(done, 1000, clock)))
    assert [f for f in fits if f[1] is not None] == [(17, 17 + int((100.0 - 10.5) / 0.5))]
    assert budget.per_step == pytest.approx(0.5)
    assert StepBudget(1e9, 4).after_step(14, 60, type("C", (), {"elapsed": lambda self: 1.0})()) is None  # t0 unset


def test_train_reference_time_budget_shortens_the_run(tmp_path):
    """The from-scratch loop under a budget it cannot meet stops right after calibrating (10 + calibrate_steps)."""
    from visionfx.recovery.train import TrainConfig, train_reference

    cfg = TrainConfig(depth=1, embed_dim=32, num_heads=2, batch_size=8, epochs=20, eval_batch_size=16, cpu=True,
                      mixed_precision="no", time_budget=1e-6, calibrate_steps=2)
    data = tiny_data()
    data.classes = [str(i) for i in range(5)]
    out = train_reference(cfg, data, tmp_path, progress=False)
    assert out["steps"] == 12 and out["images"] == 12 * 8
