"""The easy-VQA tiny LLaVA: tokenizer, processor, data, augmentation, training, save/load, ``visionfx eval vqa`` on
the saved folder, ``visionfx train easy-vqa`` and the fidelity script (CPU, tiny settings, the real archive with a
question limit)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

ARCHIVE = Path("/work/shared/data/easy-vqa.tar.xz")
ROOT = Path(__file__).resolve().parents[1]
LIMIT = 48
TINY = {"vision_width": 32, "vision_layers": 2, "vision_heads": 2, "vision_mlp": 64, "text_width": 32,
        "text_layers": 3, "text_heads": 2, "text_kv_heads": 2, "text_mlp": 64, "batch_size": 8, "eval_every": 0,
        "eval_batch_size": 16, "warmup_steps": 1}

pytestmark = pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"{ARCHIVE} not available")


def _sets(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def data():
    from visionfx.recovery.easy_vqa_data import EasyVQA

    return EasyVQA(ARCHIVE, limit=LIMIT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``visionfx train easy-vqa`` for 2 steps of a tiny model; returns the output folder."""
    from visionfx.recovery.cli import main_train

    out = tmp_path_factory.mktemp("easy_vqa") / "model"
    rc = main_train(["easy-vqa", "--data", str(ARCHIVE), "--output", str(out), "--limit", str(LIMIT),
                     "--max-steps", "2", "--cpu", "--no-progress", *_sets(TINY)])
    assert rc == 0
    return out


# --- tokenizer, processor, data --------------------------------------------------------------------------------------


def test_vocabulary_round_trip_and_unknown_words(data):
    from visionfx.recovery.easy_vqa_data import SPECIALS, UNK

    tok = data.tokenizer
    raw = json.loads(_archive_member("train/questions.json"))[:LIMIT]
    words = {w for q, a, _ in raw for w in re.findall(r"\w+|[^\w\s]+", f"{q} {a}".lower())}
    suffix = {w for w in re.findall(r"\w+|[^\w\s]+", data.suffix.lower())}
    expected = sorted(words | suffix | {"user", "assistant", ":"})
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == list(SPECIALS) + expected
    question = raw[0][0]
    ids = tok(question)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == " ".join(
        re.findall(r"\w+|[^\w\s]+", question.lower()))
    unknown = tok("Is there a purple hexagon?", add_special_tokens=False)["input_ids"]
    assert unknown.count(UNK) == 2 and tok.convert_ids_to_tokens(unknown)[0] == "is"


def _archive_member(name: str) -> bytes:
    import tarfile

    with tarfile.open(ARCHIVE) as tar:
        return tar.extractfile(f"easy-vqa/{name}").read()


def test_processor_matches_the_tensors_and_chat_template(data):
    import io

    from PIL import Image

    from visionfx.evaluation.vqa import build_prompt
    from visionfx.recovery.easy_vqa_data import IMAGE, build_processor, format_prompt, normalize_images

    processor = build_processor(data.tokenizer, 64, 8)
    test = json.loads(_archive_member("test/questions.json"))
    q, _, image_id = test[3]
    text = q + data.suffix
    prompt = build_prompt(processor, text, "auto")
    assert prompt == format_prompt(text)
    image = Image.open(io.BytesIO(_archive_member(f"test/images/{image_id}.png"))).convert("RGB")
    enc = processor(images=[image], text=[prompt], return_tensors="pt")
    row = data.test.input_ids[3][data.test.attention_mask[3].bool()]
    assert torch.equal(enc["input_ids"][0], row) and int((row == IMAGE).sum()) == 64
    mine = normalize_images(data.test.images[data.test.image[3]][None])
    torch.testing.assert_close(enc["pixel_values"], mine, atol=1e-6, rtol=0)


def test_training_rows_end_with_answer_and_eos(data):
    from visionfx.recovery.easy_vqa_data import EOS, PAD

    tok, split = data.tokenizer, data.train
    assert torch.equal(split.input_ids[:, -1], torch.full_like(split.input_ids[:, -1], EOS))
    assert torch.equal(split.input_ids[:, -2], split.answer_ids)
    assert tok.convert_ids_to_tokens(split.answer_ids.tolist()) == [a.lower() for a in split.answers]
    # left padded: zeros only before the first real token, pad ids exactly there
    m = split.attention_mask
    assert torch.equal(m.cummax(1).values, m) and torch.equal(split.input_ids == PAD, m == 0)


def test_augment_is_a_background_filled_shift_and_optional_flip():
    from visionfx.recovery.easy_vqa_data import VqaAugment, normalize_images

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 8, 8), generator=g, dtype=torch.uint8)
    assert torch.equal(VqaAugment(0, False)(x, 5), normalize_images(x))
    t = 2
    y = VqaAugment(t, True, seed=3)(x, 7)
    ref = normalize_images(x).double()

    def shifted(img, dy, dx):  # naive: output pixel (i, j) reads source (i + dy - t, j + dx - t), else background
        corners = torch.stack([img[:, 0, 0], img[:, 0, 7], img[:, 7, 0], img[:, 7, 7]], 1)
        background = corners.sort(1).values[:, 1]  # lower median of four, per channel
        out = torch.empty_like(img)
        for i in range(8):
            for j in range(8):
                si, sj = i + dy - t, j + dx - t
                out[:, i, j] = img[:, si, sj] if 0 <= si < 8 and 0 <= sj < 8 else background
        return out

    for b in range(3):
        matches = [(dy, dx, f) for dy in range(2 * t + 1) for dx in range(2 * t + 1) for f in (False, True)
                   if torch.allclose(y[b].double(), shifted(ref[b], dy, dx).flip(2) if f else shifted(ref[b], dy, dx))]
        assert matches, f"sample {b} is not a shift (and flip) of its source"
    assert torch.equal(VqaAugment(t, True, seed=3)(x, 7), y)


# --- model and training ----------------------------------------------------------------------------------------------


def test_default_config_is_the_yaml_and_llava_shaped():
    from visionfx.recovery.easy_vqa_llava import TrainVQAConfig, build_llava_config

    cfg = TrainVQAConfig()
    assert TrainVQAConfig.load(ROOT / "configs" / "train-easy-vqa.yaml") == cfg
    llava = build_llava_config(cfg, 44)
    assert llava.vision_feature_layer == -2 and llava.vision_feature_select_strategy == "default"
    assert llava.image_seq_length == 64 == (llava.vision_config.image_size // llava.vision_config.patch_size) ** 2
    with pytest.raises(ValueError, match="did you mean"):
        TrainVQAConfig.from_dict({"text_widht": 64})
    with pytest.raises(ValueError, match="multiple of"):
        TrainVQAConfig(text_width=30, text_heads=4)


def test_a_few_steps_reduce_the_answer_loss(data):
    from visionfx.recovery.easy_vqa_data import normalize_images
    from visionfx.recovery.easy_vqa_llava import TrainVQAConfig, _answer_loss, build_model

    torch.manual_seed(0)
    model = build_model(TrainVQAConfig(**TINY), len(data.tokenizer)).train()
    batch = data.train.batch(torch.arange(16))
    px = normalize_images(batch["images"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = _answer_loss(model, batch, px)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    # the loss is the cross-entropy of the answer word and </s>: check it against a direct computation
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=px).logits
        direct = torch.nn.functional.cross_entropy(logits[:, -3:-1].reshape(-1, logits.shape[-1]),
                                                   batch["input_ids"][:, -2:].reshape(-1))
        torch.testing.assert_close(_answer_loss(model, batch, px), direct, atol=1e-5, rtol=1e-5)
    assert losses[-1] < 0.75 * losses[0]


def test_train_command_saves_a_loadable_model(trained, data):
    from visionfx.evaluation.vqa import load_llava
    from visionfx.recovery.easy_vqa_data import EasyVQA

    info = json.loads((trained / "easy_vqa.json").read_text())
    assert info["steps"] == 2 and info["examples"] == 16 and 0 <= info["accuracy"] <= 100
    assert (trained / "train_log.json").is_file()
    model, processor = load_llava(trained, "cpu", dtype="float32")
    assert processor.tokenizer.padding_side == "left" and len(processor.tokenizer) == len(data.tokenizer)
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    reloaded = EasyVQA(ARCHIVE, limit=LIMIT, tokenizer=processor.tokenizer)
    assert torch.equal(reloaded.test.input_ids, data.test.input_ids)


def test_save_then_from_pretrained_gives_the_same_logits(data, tmp_path):
    from visionfx.evaluation.vqa import load_llava
    from visionfx.recovery.easy_vqa_data import normalize_images
    from visionfx.recovery.easy_vqa_llava import TrainVQAConfig, train_easy_vqa

    cfg = TrainVQAConfig(**TINY, max_steps=1, cpu=True)
    out = train_easy_vqa(cfg, data, tmp_path / "m", progress=False)
    model, _ = load_llava(tmp_path / "m", "cpu", dtype="float32")
    batch = data.test.batch(torch.arange(4))
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=normalize_images(batch["images"]))
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, out["model"](**kw).logits)
    assert set(model.state_dict()) == set(out["model"].state_dict())


def test_eval_vqa_command_agrees_with_the_batched_evaluation(trained, data, tmp_path, capsys):
    from visionfx.cli import main
    from visionfx.evaluation.easy_vqa import convert_easy_vqa
    from visionfx.evaluation.vqa import load_llava, read_jsonl
    from visionfx.recovery.easy_vqa_llava import evaluate_vqa

    conv = convert_easy_vqa(ARCHIVE, tmp_path / "evqa", splits=("test",))
    n = 6
    rc = main(["eval", "vqa", "--model", str(trained), "--questions", conv["test"]["questions"], "--images",
               conv["images"], "--answers", conv["test"]["answers"], "--out", str(tmp_path / "pred.jsonl"),
               "--limit", str(n), "--batch-size", "4", "--device", "cpu", "--no-progress",
               "--json", str(tmp_path / "scores.json")])
    assert rc == 0
    preds = [r["text"] for r in read_jsonl(tmp_path / "pred.jsonl")]
    model, _ = load_llava(trained, "cpu", dtype="float32")
    mine = evaluate_vqa(model, data.test, data.tokenizer, batch_size=4, limit=n, keep_predictions=True)
    assert preds == mine["predictions"]
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["exact"]["score"] == pytest.approx(mine["accuracy"])


def test_train_command_rejects_image_folder_options(tmp_path):
    from visionfx.recovery.cli import main_train

    with pytest.raises(SystemExit):
        main_train(["easy-vqa", "--data", str(ARCHIVE), "--output", str(tmp_path), "--image-size", "32"])


# --- fidelity --------------------------------------------------------------------------------------------------------


def test_router_batches_label_only_answer_and_eos(data):
    from visionfx.recovery.easy_vqa_fidelity import RouterBatches

    rb = RouterBatches(data.train, 5, 3, seed=1)
    assert len(rb) == 3
    b = rb[2]
    assert torch.equal(b["labels"][:, :-2], torch.full_like(b["labels"][:, :-2], -100))
    assert torch.equal(b["labels"][:, -2:], b["input_ids"][:, -2:]) and bool((b["labels"][:, -2:] > 0).all())
    assert b["pixel_values"].shape == (5, 3, 64, 64)


def test_compute_saved_definition():
    from visionfx.recovery.easy_vqa_fidelity import visual_compute_saved

    # L = 4: exits after layers 0, 3 (full model) and 1 skip 3, 0 and 2 of the 4 layers for their 64 tokens each
    assert visual_compute_saved([0, 3, 1], [64, 64, 64], 4) == pytest.approx((3 + 0 + 2) / 12)
    assert visual_compute_saved([0, 3], [64, 32], 4) == pytest.approx(64 * 3 / (96 * 4))


def test_markdown_section_is_replaced_in_place(tmp_path):
    from visionfx.recovery.easy_vqa_fidelity import MD_BEGIN, MD_END, write_markdown_section

    md = tmp_path / "f.md"
    md.write_text("# Fidelity\n\nother text\n")
    write_markdown_section(md, "first")
    write_markdown_section(md, "second")
    text = md.read_text()
    assert text.startswith("# Fidelity\n\nother text\n") and "first" not in text
    assert text.count(MD_BEGIN) == 1 and text.count(MD_END) == 1 and "second" in text


def test_fidelity_script_end_to_end(trained, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("fidelity_easy_vqa", ROOT / "scripts" / "fidelity_easy_vqa.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    md = tmp_path / "fidelity.md"
    md.write_text("# Fidelity\n")
    rc = script.main(["--data", str(ARCHIVE), "--model", str(trained), "--output", str(tmp_path / "out"), "--cpu",
                      "--limit", str(LIMIT), "--eval-limit", "16", "--batch-size", "8", "--router-steps", "2",
                      "--router-batch-size", "4", "--router-hidden", "16", "--calibration", "4", "--no-progress",
                      "--md", str(md)])
    assert rc == 0
    results = json.loads((tmp_path / "out" / "fidelity_easy_vqa.json").read_text())
    rows = {(r["method"], r["setting"]): r for r in results["rows"]}
    assert [r["method"] for r in results["rows"]] == ["full"] + ["fastervlm"] * 4 + ["dyvte", "var"]
    assert [r["visual_tokens"] for r in results["rows"] if r["method"] == "fastervlm"] == [32, 16, 6, 3]
    assert all(r["count"] == 16 and 0 <= r["accuracy"] <= 100 for r in rows.values())
    dy = next(r for r in results["rows"] if r["method"] == "dyvte")
    L = results["layers"]
    assert 0 <= dy["mean_exit_layer"] <= L - 1 and 0 <= dy["compute_saved"] <= 100
    assert sum(results["dyvte"]["exit_histogram"].values()) == 16
    assert (tmp_path / "out" / "dyvte_routers" / "dyvte_routers.safetensors").is_file()
    var = results["var"]
    assert var["sink_dims"] and all(0 <= d < 32 for d in var["sink_dims"])
    text = md.read_text()
    assert text.startswith("# Fidelity\n") and "| fastervlm | 75% pruned | 16 |" in text
    assert "| method | setting |" in capsys.readouterr().out
