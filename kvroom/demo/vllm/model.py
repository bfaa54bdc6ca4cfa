"""A tiny, seeded Llama with a local word-level tokenizer: a real model vLLM can serve, made offline.

GQA (8 attention heads, 2 KV heads), 4 layers, hidden size 256, float32 weights drawn from a
fixed seed with a standard deviation large enough that greedy decoding does not repeat one token.
The tokenizer maps ``w0 .. w{vocab-1}`` to ids one to one, so a prompt of ``n`` ids is ``n`` tokens
and every id detokenizes; prompts are sent to the server as token id lists.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["VOCAB", "write_tiny_llama", "prompt_ids"]

VOCAB = 1024
_SPECIAL = ("<unk>", "<s>", "</s>")


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(_SPECIAL), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))


def write_tiny_llama(path: str | Path, *, seed: int = 0, max_positions: int = 2048) -> Path:
    """Write the model and tokenizer into ``path`` (created; reused when already complete)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(path)
    done = out / ".complete"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.08)
    model.save_pretrained(str(out), safe_serialization=True)
    _tokenizer(out)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    done.write_text("ok\n")
    return out


def prompt_ids(n: int, seed: int) -> list[int]:
    """``n`` prompt token ids drawn from ``seed`` (never a special token)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(len(_SPECIAL), VOCAB) for _ in range(n)]
