"""A CLIP tokenizer for the toy world's closed vocabulary.

The files are the ordinary CLIP BPE files (``vocab.json``, ``merges.txt``) so that ``CLIPTokenizer.from_pretrained``
and therefore ``StableDiffusionPipeline`` load them unchanged. The merges are learnt with the ``tokenizers`` BPE
trainer on the vocabulary words until every word is a single token; any other text still tokenizes (into bytes).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from stepdistill.toy.world import VOCABULARY

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16


def build_tokenizer_files(out_dir: str | Path, words: tuple[str, ...] = VOCABULARY, max_length: int = MAX_LENGTH) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()  # CLIP splits on whitespace and marks word ends with </w>
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=10_000,
        min_frequency=1,
        special_tokens=[],
        initial_alphabet=sorted(alphabet),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(words)] * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens = sorted(alphabet) + [c + "</w>" for c in sorted(alphabet)]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    vocab: dict[str, int] = {}
    for tok in tokens + [BOS, EOS]:
        vocab.setdefault(tok, len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2)
    )
    return out
