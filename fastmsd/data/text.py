"""Report tokenizers: a WordPiece vocabulary trained on the training reports, or a model's own."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece(texts: Sequence[str], vocab_size: int, out_dir: str | Path):
    """Build a lower-cased BERT WordPiece vocabulary from ``texts`` and save it as vocab.txt.

    The vocabulary is the special tokens, every character seen (alone and as a ``##``
    continuation, so any word can be spelled), then the most frequent words (ties by
    spelling). Unlike the `tokenizers` trainer, whose ties follow per-process hash order,
    the same reports always give the same ids, and so the same initialisation.
    """
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, pre = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts = Counter(word for text in texts
                     for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    alphabet = chars + [f"##{c}" for c in chars]
    room = vocab_size - len(SPECIAL_TOKENS) - len(alphabet)
    if room < 0:
        raise ValueError(f"vocab_size {vocab_size} cannot hold the {len(alphabet)} character tokens")
    words = [w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= 2 and len(w) > 1]
    vocab = [*SPECIAL_TOKENS, *alphabet, *words[:room]]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.txt").write_text("".join(f"{tok}\n" for tok in vocab), encoding="utf-8")
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path):
    """A fast tokenizer from a folder: our saved vocab.txt, or a transformers model folder."""
    from transformers import AutoTokenizer, BertTokenizerFast

    path = Path(path)
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(path)
    vocab = path / "vocab.txt"
    if not vocab.is_file():
        raise FileNotFoundError(f"no tokenizer in {path} (expected vocab.txt or tokenizer.json)")
    # transformers 5 ignores vocab_file=; vocab= takes the file.
    return BertTokenizerFast(vocab=str(vocab), do_lower_case=True)


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [n, max_len] (int32, padded) and the attention mask [n, max_len] (bool)."""
    enc = tokenizer(list(texts), max_length=max_len, truncation=True, padding="max_length",
                    return_tensors="pt")
    return enc["input_ids"].to(torch.int32), enc["attention_mask"].bool()


def trim_reports(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 multiple: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Token arrays cut to their longest report, rounded up to ``multiple``: the cut columns
    are padding, masked out, so the embeddings keep their values with less attention work."""
    longest = int(attention_mask.sum(1).max())
    keep = min(input_ids.shape[1], -(-longest // multiple) * multiple)
    return input_ids[:, :keep], attention_mask[:, :keep]
