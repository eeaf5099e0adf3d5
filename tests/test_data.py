"""Tokenizer, batch order and augmentation: deterministic, resumable, laterality-preserving."""

import torch

from fastmsd.data.loader import BatchStream, augment, to_model_input
from fastmsd.data.text import SPECIAL_TOKENS, load_tokenizer, tokenize, train_wordpiece

REPORTS = ["There is a moderate right pleural effusion.", "No pleural effusion or pneumothorax.",
           "The heart is mildly enlarged.", "Bibasilar atelectasis."] * 3


def test_wordpiece_is_deterministic_and_saved(tmp_path):
    a = train_wordpiece(REPORTS, 120, tmp_path / "a")
    b = train_wordpiece(list(reversed(REPORTS)), 120, tmp_path / "b")
    assert (tmp_path / "a/vocab.txt").read_text() == (tmp_path / "b/vocab.txt").read_text()
    assert (tmp_path / "a/vocab.txt").read_text().splitlines()[:5] == list(SPECIAL_TOKENS)
    reloaded = load_tokenizer(tmp_path / "a")
    ids, mask = tokenize(reloaded, ["Right pleural effusion."], 12)
    assert ids.shape == mask.shape == (1, 12)
    assert reloaded.convert_ids_to_tokens(ids[0, : int(mask.sum())].tolist()) == [
        "[CLS]", "right", "pleural", "effusion", ".", "[SEP]"]
    # A word never seen is spelled from character pieces, never lost to [UNK].
    ids, mask = tokenize(a, ["effusions"], 12)
    pieces = a.convert_ids_to_tokens(ids[0, : int(mask.sum())].tolist())
    assert "[UNK]" not in pieces and "".join(p.removeprefix("##") for p in pieces[1:-1]) == "effusions"
    assert len(b) == len(a)


def test_batch_stream_resumes_mid_epoch():
    a = BatchStream(10, 4, seed=3)
    first = [a.next() for _ in range(5)]  # crosses two epoch boundaries (ragged tails dropped)
    assert all(len(i) == 4 for i in first)
    assert len(set(first[0].tolist() + first[1].tolist())) == 8
    b = BatchStream(10, 4, seed=3)
    for _ in range(3):
        b.next()
    c = BatchStream(10, 4, seed=3)
    c.load_state_dict(b.state_dict())
    assert torch.equal(torch.stack([c.next(), c.next()]), torch.stack(first[3:]))


def test_augment_is_seeded_and_keeps_laterality():
    images = torch.zeros(8, 1, 32, 32, dtype=torch.uint8)
    images[..., 4:28, 2:12] = 255  # bright left half of the picture
    a = augment(images, torch.Generator().manual_seed(7))
    b = augment(images, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, augment(images, torch.Generator().manual_seed(8)))
    assert (a[..., :16].mean(dim=(1, 2, 3)) > a[..., 16:].mean(dim=(1, 2, 3))).all()
    x = to_model_input(images, 3)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32


def test_augment_in_chunks_equals_one_pass():
    images = torch.randint(0, 256, (7, 1, 24, 24), dtype=torch.uint8)
    whole = augment(images, torch.Generator().manual_seed(3))
    assert torch.equal(augment(images, torch.Generator().manual_seed(3), chunk=3), whole)
