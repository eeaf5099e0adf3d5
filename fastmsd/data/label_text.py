"""Texts written from an image's labels, so that a cache without reports can join pretraining.

As CXR-CLIP's label-to-text: a grammar (the YAML file ``label_prompts.yaml`` beside this module,
or a user's own, ``fastmsd train --label-prompts FILE``) says how to write a finding. An image's
text is one sentence per positive finding (label value 1.0), in a shuffled order, each a template
with one of the finding's phrases in it; an image with no positive finding gets a "normal" text.
A label listed in ``normal_labels`` ("No Finding") is never written as a finding; a label the
grammar does not list is written as its name, lower-cased. Labels that are None (unknown) count
as not positive; an image whose labels are all unknown (or that has none) has no text.

Every choice comes from ``random.Random(f"{seed}:{id}")`` (seeded through sha512, so the same
on every machine and Python process): an image keeps one text for the whole run, and a resumed
run writes the same texts.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from fastmsd.config import ConfigError

DEFAULT_GRAMMAR = Path(__file__).with_name("label_prompts.yaml")
_KEYS = ("templates", "normal", "normal_labels", "findings")


@dataclass(frozen=True)
class LabelGrammar:
    """How to write a text from labels: see the module docstring and ``label_prompts.yaml``."""

    templates: tuple[str, ...]  # each holds "{finding}" once
    normal: tuple[str, ...]
    normal_labels: frozenset[str]
    findings: Mapping[str, tuple[str, ...]]  # label name -> its phrases

    def phrases(self, label: str) -> tuple[str, ...]:
        return self.findings.get(label) or (label.replace("_", " ").lower(),)

    def text(self, labels: Mapping[str, float | None], seed: int, item_id: str) -> str | None:
        """The text of an image with these labels, or None when none of them is known."""
        if all(value is None for value in labels.values()):
            return None
        rng = random.Random(f"{seed}:{item_id}")
        positive = [name for name, value in labels.items() if value == 1.0 and name not in self.normal_labels]
        if not positive:
            return rng.choice(self.normal)
        # Reports name findings in no fixed order: a fixed one would make the first sentence's
        # finding predictable from the label columns' order.
        rng.shuffle(positive)
        sentences = [rng.choice(self.templates).format(finding=rng.choice(self.phrases(name)))
                     for name in positive]
        return " ".join(_capitalised(sentence) for sentence in sentences)


def _capitalised(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _strings(path: Path, where: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"label prompt file {path}: {where} needs a non-empty string or list of strings")
    return tuple(v.strip() for v in value)


def load_grammar(path: str | Path | None = None) -> LabelGrammar:
    """A label prompt file (``None``: the default one): ``templates`` (each with one "{finding}"),
    ``normal`` texts, ``normal_labels`` and ``findings`` (label -> a phrase or a list of them)."""
    path = DEFAULT_GRAMMAR if path is None else Path(path)
    if not path.is_file():
        raise ConfigError(f"label prompt file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"label prompt file {path} is not YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or set(data) != set(_KEYS):
        raise ConfigError(f"label prompt file {path} must hold exactly {', '.join(_KEYS)}")
    templates = _strings(path, "templates", data["templates"])
    for template in templates:
        rest = template.replace("{finding}", "", 1)
        if "{finding}" not in template or "{" in rest or "}" in rest:
            raise ConfigError(f"label prompt file {path}: template {template!r} must hold {{finding}} once "
                              "and no other braces")
    findings = data["findings"]
    if not isinstance(findings, dict):
        raise ConfigError(f"label prompt file {path}: findings must map label names to phrases")
    return LabelGrammar(templates, _strings(path, "normal", data["normal"]),
                        frozenset(_strings(path, "normal_labels", data["normal_labels"])),
                        {str(name): _strings(path, f"findings/{name}", value)
                         for name, value in findings.items()})
