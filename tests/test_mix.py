"""Mixed-data pretraining: --data PATH=WEIGHT,..., label texts for caches without reports, exact resume."""

import csv
import math
import re
import shutil
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

import fastmsd.checkpoint as ckpt
from fastmsd.config import ConfigError, parse_data
from fastmsd.data.cache import Cache
from fastmsd.data.label_text import load_grammar
from fastmsd.data.mix import MixStream, training_source
from fastmsd.data.prepare import prepare
from fastmsd.data.text import tokenize
from fastmsd.run import run_config, run_tokens, train, training_data
from tests.conftest import micro_config
from tests.helpers import assert_one_line_error, run_cli
from tests.test_checkpoint import assert_same, final_state

# CheXpert-v1.0's train.csv / valid.csv header, in the order the release ships it.
CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices")
CHEXPERT_HEADER = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS)
N_TRAIN, N_VALID = 160, 8


@pytest.fixture(scope="module")
def label_cache(synth_cache, tmp_path_factory):
    """synthcxr's images and labels shipped again in CheXpert-v1.0-small's layout (train.csv,
    valid.csv, train/patientNNNNN/study1/view1_frontal.jpg) and prepared as the chexpert dataset,
    at another size than the synthcxr cache: the same kind of images, labels and no reports."""
    synth = Cache(synth_cache)
    root = tmp_path_factory.mktemp("chexpert") / "CheXpert-v1.0-small"
    for name, split, folder, count, first_patient in (("train.csv", "train", "train", N_TRAIN, 1),
                                                      ("valid.csv", "validate", "valid", N_VALID, 64541)):
        rows = [row for row in synth.rows if row["split"] == split][:count]
        root.mkdir(exist_ok=True)
        with (root / name).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CHEXPERT_HEADER)
            for n, row in enumerate(rows):
                rel = f"{folder}/patient{first_patient + n:05d}/study1/view1_frontal.jpg"
                (root / rel).parent.mkdir(parents=True)
                shutil.copyfile(synth_cache / row["image"], root / rel)
                values = ["" if (v := row["labels"].get(c)) is None else f"{v:.1f}" for c in CHEXPERT_LABELS]
                writer.writerow([f"CheXpert-v1.0-small/{rel}", "Female", "63", "Frontal", "AP", *values])
    out = tmp_path_factory.mktemp("chexpert-cache")
    counts = prepare("chexpert", root, out, size=48, workers=1, progress=False)
    assert counts == {"found": N_TRAIN + N_VALID, "prepared": N_TRAIN + N_VALID, "rejected": 0}
    return out


def mix_config(synth_cache, label_cache, runs, name, **train_settings):
    cfg = micro_config(**{"steps": 4, "batch_size": 32, "micro_batch_size": 16, "queue_size": 64,
                          **train_settings})
    cfg.train.data = f"{synth_cache}=0.6,{label_cache}=0.4"
    cfg.train.runs_dir, cfg.train.name = str(runs), name
    return cfg


# --------------------------------------------------------------------------- --data


def test_parse_data(tmp_path):
    assert parse_data("caches/mimic") is None
    assert parse_data("caches/mimic=0.7,caches/chestxray14=0.3") == [("caches/mimic", 0.7),
                                                                   ("caches/chestxray14", 0.3)]
    [(a, wa), (b, wb)] = parse_data(" mimic = 3 , chestxray14=1 ")
    assert (a, b) == ("mimic", "chestxray14") and math.isclose(wa, 0.75) and math.isclose(wb, 0.25)
    assert parse_data("caches/only=2") == [("caches/only", 1.0)]
    odd = tmp_path / "a=1"
    odd.mkdir()
    assert parse_data(str(odd)) is None  # an existing folder is one cache, "=" or not


@pytest.mark.parametrize("text,needle", [
    ("a=0.7,b", "malformed --data"), ("a=x", "malformed --data"), ("=1", "malformed --data"),
    ("a=0.7,,b=0.3", "malformed --data"), ("a=nan", "malformed --data"), ("a=inf", "malformed --data"),
    ("a=0,b=1", "weight 0"), ("a=-1,b=1", "weight -1"), ("a=1,./a=2", "twice"),
])
def test_parse_data_rejects(text, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_data(text)


def test_train_refuses_bad_mixes(tmp_path, synth_cache):
    r = run_cli("train", "--data", f"{synth_cache}=0.7,{tmp_path / 'nope'}=0.3", cwd=tmp_path)
    assert_one_line_error(r, "data folder", "nope", "not found")
    r = run_cli("train", "--data", f"{synth_cache}=1,{synth_cache}-other=0", cwd=tmp_path)
    assert_one_line_error(r, "weight 0", "must be positive")
    r = run_cli("train", "--data", f"{synth_cache}=0.7;other", cwd=tmp_path)
    assert_one_line_error(r, "malformed --data")


# --------------------------------------------------------------------------- label texts


GRAMMAR = """\
templates: ["There is {finding}."]
normal: [No acute cardiopulmonary process.]
normal_labels: [No Finding]
findings:
  Pleural Effusion: pleural effusion
  Cardiomegaly: [cardiomegaly, an enlarged heart]
"""


def test_label_texts_follow_the_grammar(tmp_path):
    path = tmp_path / "grammar.yaml"
    path.write_text(GRAMMAR)
    g = load_grammar(path)
    assert g.text({"Pleural Effusion": 1.0, "Edema": 0.0, "No Finding": 0.0}, 0, "x") == \
        "There is pleural effusion."
    assert g.text({"Pleural Effusion": 0.0, "No Finding": 1.0}, 0, "x") == "No acute cardiopulmonary process."
    assert g.text({"Edema": 0.0, "Atelectasis": None}, 0, "x") == "No acute cardiopulmonary process."
    # A label the grammar does not list: its name, lower-cased, underscores as spaces.
    assert g.text({"Pleural_Thickening": 1.0}, 0, "x") == "There is pleural thickening."
    assert g.text({"Cardiomegaly": None, "Edema": None}, 0, "x") is None  # nothing known: no text
    assert g.text({}, 0, "x") is None
    # Several findings: a sentence each, every phrase one the grammar gives, order and choice seeded.
    labels = {"Cardiomegaly": 1.0, "Pleural Effusion": 1.0, "Hernia": 1.0}
    texts = {g.text(labels, seed, item) for seed in range(3) for item in ("a", "b", "c", "d")}
    for text in texts:
        sentences = [s.removesuffix(".") for s in text.split(". ")]
        assert sorted(sentences) in (sorted(["There is cardiomegaly", "There is pleural effusion",
                                             "There is hernia"]),
                                     sorted(["There is an enlarged heart", "There is pleural effusion",
                                             "There is hernia"]))
    assert len(texts) > 3  # shuffled and chosen per (seed, id) ...
    assert all(g.text(labels, 1, "b") == g.text(labels, 1, "b") for _ in range(3))  # ... the same each time


def test_default_grammar_is_deterministic_and_capitalised():
    g = load_grammar()
    labels = {"Atelectasis": 1.0, "Cardiomegaly": 1.0, "Support Devices": 1.0, "No Finding": 0.0}
    text = g.text(labels, 7, "patient1_study1_view1_frontal")
    assert text == load_grammar().text(labels, 7, "patient1_study1_view1_frontal")
    assert len(text.split(". ")) == 3 and all(s[0].isupper() for s in text.split(". "))
    assert g.text({"No Finding": 1.0}, 7, "n") in g.normal
    assert set(g.phrases("Pleural Effusion")) == {"pleural effusion", "a pleural effusion"}


@pytest.mark.parametrize("content,needle", [
    ("templates: [x]\n", "must hold exactly"),
    (GRAMMAR.replace("There is {finding}.", "Nothing here."), "must hold {finding}"),
    (GRAMMAR.replace("There is {finding}.", "{finding} and {other}."), "no other braces"),
    (GRAMMAR.replace("normal: [No acute cardiopulmonary process.]", "normal: []"), "normal needs"),
    (GRAMMAR.replace("pleural effusion", "[]"), "findings/Pleural Effusion needs"),
    ("templates: [\n", "is not YAML"),
])
def test_grammar_file_errors(tmp_path, content, needle):
    path = tmp_path / "grammar.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_grammar(path)
    with pytest.raises(ConfigError, match="not found"):
        load_grammar(tmp_path / "missing.yaml")


def test_images_without_known_labels_are_left_out_and_counted():
    rows = [{"id": "a", "split": "train", "labels": {"Edema": 1.0}},
            {"id": "b", "split": "train", "labels": {"Edema": None}},
            {"id": "c", "split": "train", "labels": {}},
            {"id": "d", "split": "train", "labels": {"Edema": 0.0}}]
    cache = SimpleNamespace(root="fake", rows=rows, has_reports=False, indices=lambda split: [0, 1, 2, 3])
    source = training_source(cache, 1.0, load_grammar(), seed=0)
    assert source.indices == [0, 3] and source.unlabelled == 2
    assert "2 without known labels left out" in source.describe()
    with pytest.raises(ConfigError, match="--label-text"):
        training_source(cache, 1.0, None, seed=0)
    cache.rows = rows[1:3]
    cache.indices = lambda split: [0, 1]
    with pytest.raises(ConfigError, match="no training image with a known label"):
        training_source(cache, 1.0, load_grammar(), seed=0)


def test_reports_in_another_language_train_on_label_texts_unless_label_text_is_off():
    """PadChest keeps its Spanish reports (language "es"): by default its images pretrain on label texts."""
    rows = [{"id": "a", "split": "train", "labels": {"Edema": 1.0}, "language": "es"},
            {"id": "b", "split": "train", "labels": {"Edema": 0.0}, "language": "es"}]
    cache = SimpleNamespace(root="fake", rows=rows, has_reports=True, indices=lambda split: [0, 1])
    grammar = load_grammar()
    source = training_source(cache, 1.0, grammar, seed=0)
    assert source.texts == [grammar.text(r["labels"], 0, r["id"]) for r in rows]
    assert training_source(cache, 1.0, None, seed=0).texts is None  # --no-label-text: the reports
    for row in rows:
        row["language"] = None
    assert training_source(cache, 1.0, grammar, seed=0).texts is None


# --------------------------------------------------------------------------- sampling


def test_mix_stream_follows_the_weights():
    sizes, weights, batch = [300, 60, 1000], [0.5, 0.3, 0.2], 32
    stream = MixStream(sizes, weights, batch, seed=1)
    offsets = [0, 300, 360, 1360]
    counts, per_source = Counter(), [[] for _ in sizes]
    for _ in range(400):
        idx = stream.next().tolist()
        assert len(idx) == batch and len(set(idx)) == batch  # no image twice in a batch
        for i in idx:
            s = next(s for s in range(3) if offsets[s] <= i < offsets[s + 1])
            counts[s] += 1
            per_source[s].append(i - offsets[s])
    total = sum(counts.values())
    for s, weight in enumerate(weights):  # 12,800 draws: the standard error is under 0.005
        assert abs(counts[s] / total - weight) < 0.02, (counts, weights)
    # Each cache goes through its own shuffles: no image comes again before its epoch is done,
    # less the tail (shorter than a batch) that a shuffle drops when a batch wants more than it has.
    for s, seq in enumerate(per_source[:2]):
        again = next(k for k, i in enumerate(seq) if i in seq[:k])
        assert again >= sizes[s] - batch, (s, again)


def test_mix_stream_resumes_and_peeks():
    a = MixStream([50, 7], [0.8, 0.2], 16, seed=3)  # the small cache wraps its epochs many times
    first = [a.next() for _ in range(12)]
    b = MixStream([50, 7], [0.8, 0.2], 16, seed=3)
    for _ in range(5):
        b.next()
    c = MixStream([50, 7], [0.8, 0.2], 16, seed=3)
    c.load_state_dict(b.state_dict())
    for expected in first[5:]:
        ahead = c.peek()
        assert torch.equal(ahead, c.peek()) and torch.equal(c.next(), ahead)
        assert torch.equal(ahead, expected)
    assert not torch.equal(first[0], MixStream([50, 7], [0.8, 0.2], 16, seed=4).next())
    with pytest.raises(ConfigError, match="resume with the run's own --data"):
        MixStream([50, 8], [0.8, 0.2], 16, seed=3).load_state_dict(b.state_dict())
    with pytest.raises(ConfigError, match="for one cache"):
        MixStream([50, 7], [0.8, 0.2], 16, seed=3).load_state_dict({"epoch": 0, "index": 16})


# --------------------------------------------------------------------------- training


def test_label_cache_tokens_in_a_mix(synth_cache, label_cache, tmp_path):
    cfg = mix_config(synth_cache, label_cache, tmp_path, "tokens")
    synth, labelled = training_data(cfg, generate=False)
    assert labelled.cache.has_reports is False and len(labelled.indices) == N_TRAIN
    assert (synth.weight, labelled.weight) == (0.6, 0.4) and labelled.unlabelled == 0
    grammar = load_grammar()
    rows = [labelled.cache.rows[i] for i in labelled.indices]
    assert labelled.texts == [grammar.text(r["labels"], cfg.train.seed, r["id"]) for r in rows]
    tokenizer, (ids, mask) = run_tokens(cfg, [synth, labelled], tmp_path, save=False)
    n = len(synth.indices)
    assert ids.shape == (n + N_TRAIN, cfg.model.max_len)
    # The synthcxr cache keeps its own token arrays; the label texts are tokenized with its vocabulary.
    assert torch.equal(ids[:n], synth.cache.token_arrays(synth.indices, cfg.model.max_len)[0])
    assert tokenizer.get_vocab() == synth.cache.tokenizer().get_vocab()
    expected = tokenize(tokenizer, labelled.texts, cfg.model.max_len)
    assert torch.equal(ids[n:], expected[0]) and torch.equal(mask[n:], expected[1])
    # --label-prompts: the user's grammar writes the texts.
    (tmp_path / "grammar.yaml").write_text(GRAMMAR)
    cfg.train.label_prompts = str(tmp_path / "grammar.yaml")
    texts = training_data(cfg, generate=False)[1].texts
    assert all(t == "No acute cardiopulmonary process." or t.startswith("There is ") for t in texts)
    assert any(t.startswith("There is ") for t in texts) and texts != labelled.texts


def test_mixed_pretraining_end_to_end(synth_cache, label_cache, tmp_path, capsys):
    run = train(mix_config(synth_cache, label_cache, tmp_path, "mixed"), progress=False)
    out = capsys.readouterr().out
    assert f"{label_cache} ({N_TRAIN} images, label texts) weight 0.4" in out
    cfg = run_config(ckpt.latest_checkpoint(run))
    assert cfg.train.data == f"{synth_cache}=0.6,{label_cache}=0.4" and cfg.train.label_text
    _, _, state = final_state(run)
    assert state["step"] == 4 and state["data"]["batch"] == 4
    assert [s["size"] for s in state["data"]["sources"]] == [640, N_TRAIN]


def test_label_only_cache_needs_label_text_and_a_vocabulary(label_cache, tmp_path):
    cfg = micro_config(steps=2)
    cfg.train.data, cfg.train.runs_dir, cfg.train.name = str(label_cache), str(tmp_path), "alone"
    cfg.train.label_text = False
    with pytest.raises(ConfigError, match="holds no reports: pass --label-text"):
        train(cfg, progress=False)
    cfg.train.label_text = True
    with pytest.raises(ConfigError, match="no cache of --data trains on its reports"):
        train(cfg, progress=False)
    assert not (tmp_path / "alone").exists()  # refused before a run folder was made


def test_mixed_resume_is_bit_exact(synth_cache, label_cache, tmp_path):
    """2k steps on a mix in one run == k steps, stop, --resume latest (the saved config), k steps."""
    def cfg(name):
        c = mix_config(synth_cache, label_cache, tmp_path, name, steps=6, alpha_warmup_steps=4)
        c.model.text_encoder_args = {**c.model.text_encoder_args, "hidden_dropout_prob": 0.1}
        return c

    whole = train(cfg("whole"), progress=False)
    split = train(cfg("split"), stop_after=3, progress=False)
    assert ckpt.latest_checkpoint(split).name == "step_00000003"
    train(run_config(ckpt.latest_checkpoint(split)), resume="latest", progress=False)
    model_a, rings_a, state_a = final_state(whole)
    model_b, rings_b, state_b = final_state(split)
    assert state_a["step"] == state_b["step"] == 6
    assert_same(model_a, model_b, "model")
    assert_same(rings_a, rings_b, "rings")
    assert_same(state_a, state_b, "trainer")  # the mix's position included
