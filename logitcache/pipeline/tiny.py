"""Tiny tokenizers, models and data built on the spot: the embedded default and test fixtures.

Nothing is downloaded. The teacher tokenizer is a byte-level BPE (GPT-2/Llama-3 family) and
the students' a BPE with Metaspace '▁' markers (SentencePiece family); tests also use a
Unigram. All are trained on a generated corpus, so vocabularies and token boundaries
really differ. The
corpus mixes ASCII, accented Latin, CJK and emoji so every offset path gets exercised, and
carries "knowledge" (made-up capitals, sums) that a briefly trained teacher can learn.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

_COUNTRIES = [
    ("Freedonia", "Zorvik"), ("Ruritania", "Strelsau"), ("Genovia", "Pyrus"), ("Latveria", "Doomstadt"),
    ("Elbonia", "Mudville"), ("Sokovia", "Novi Grad"), ("Wakanda", "Birnin Zana"), ("Florin", "Guilder"),
    ("Syldavia", "Klow"), ("Borduria", "Szohôd"), ("Qumar", "Qasr"), ("Zubrowka", "Lutz"),
    ("Île Verte", "Saint-Étienne"), ("Østmark", "Fjordby"), ("Nippon-mura", "東京"), ("Kōri", "札幌"),
]
_MULTILINGUAL = [
    "Café crème à {city} coûte {n} €.",
    "{city}は{country}の首都です。",
    "I ❤️ {city} 🎉👍🏽 and 🇫🇷 flags.",
    "naïve façade — déjà vu in {city}, ñandú, Straße.",
    "数字 {n} と 漢字 の テスト 😀.",
    "Ελληνικά και русский текст: {n}.",
]


def _fact_lines(rng: random.Random) -> tuple[str, str]:
    """One (prompt, response) pair of 'knowledge' the tiny teacher can learn."""
    kind = rng.random()
    if kind < 0.5:
        country, city = rng.choice(_COUNTRIES)
        return f"Q: What is the capital of {country}?\nA:", f" The capital of {country} is {city}."
    if kind < 0.8:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return f"Q: What is {a} plus {b}?\nA:", f" {a} plus {b} is {a + b}."
    country, city = rng.choice(_COUNTRIES)
    line = rng.choice(_MULTILINGUAL).format(city=city, country=country, n=rng.randint(1, 999))
    return "Say something:\n", line


def generate_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [_fact_lines(rng) for _ in range(n)]


def generate_corpus(n: int, seed: int = 0) -> list[str]:
    return [p + r for p, r in generate_pairs(n, seed)]


def write_demo_dataset(path: str | os.PathLike, n: int = 64, seed: int = 1) -> Path:
    """A JSON-lines file with the fields every input mode needs: id, prompt, response, text, messages."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, (prompt, response) in enumerate(generate_pairs(n, seed)):
            record = {
                "id": f"ex-{i:05d}",
                "prompt": prompt,
                "response": response,
                "text": prompt + response,
                "messages": [
                    {"role": "user", "content": prompt.strip()},
                    {"role": "assistant", "content": response.strip()},
                ],
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _wrap(tok, chat_template: bool):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def train_bpe_tokenizer(corpus: list[str], vocab_size: int = 512, chat_template: bool = True):
    """Byte-level BPE ('Ġ' markers, bytes as tokens), adds <s> in front like Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]),
        ]
    )
    return _wrap(tok, chat_template)


def train_unigram_tokenizer(corpus: list[str], vocab_size: int = 400, chat_template: bool = True):
    """Unigram with Metaspace ('▁' markers), SentencePiece style; adds <s> in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return _wrap(tok, chat_template)


def train_metaspace_bpe_tokenizer(corpus: list[str], vocab_size: int = 400, chat_template: bool = True):
    """BPE with Metaspace ('▁') markers, the SentencePiece-BPE family (Llama-2, Mistral); adds <s>.

    Unlike the Unigram trainer, whose vocabulary changes from one process to the next, the
    BPE trainer is deterministic: the demo's students are the same on every machine.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return _wrap(tok, chat_template)


@dataclass
class TinyModelConfig:
    arch: str = "llama"  # "llama" | "gpt2"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 512
    seed: int = 0


def build_tiny_model(tokenizer, cfg: TinyModelConfig = TinyModelConfig()):
    """A randomly initialised causal LM sized for the tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if cfg.arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.hidden_size * 2,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=max(1, cfg.num_heads // 2),
            max_position_embeddings=cfg.max_positions,
            tie_word_embeddings=False,
            **ids,
        )
        return LlamaForCausalLM(config)
    if cfg.arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_positions=cfg.max_positions,
            **ids,
        )
        return GPT2LMHeadModel(config)
    raise ValueError(f"unknown tiny arch {cfg.arch!r}; use 'llama' or 'gpt2'")


def train_briefly(
    model,
    tokenizer,
    texts: list[str],
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """A few hundred AdamW steps so the teacher's logits carry the corpus' facts. Returns the last loss.

    Every text ends with the tokenizer's end-of-sequence token, as a real teacher's training
    data does: the teacher learns where an answer stops, so the cache's end-of-sequence targets
    mean something. ``on_step(steps_done, loss)`` is called after every step (progress display).
    """
    import torch

    from logitcache.pipeline.padding import pad_sequences, pad_token_id

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    pad, eos = pad_token_id(tokenizer), tokenizer.eos_token_id
    loss_value = float("nan")
    for step in range(steps):
        encoded = tokenizer(rng.sample(texts, min(batch_size, len(texts))))["input_ids"]
        input_ids, attention_mask = pad_sequences([ids + [eos] if eos is not None else ids for ids in encoded], pad)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss_value = float(loss.detach())
        if on_step is not None:
            on_step(step + 1, loss_value)
    model.eval()
    return loss_value


def mistral_model_file() -> Path | None:
    """The real Mistral-7B v1 SentencePiece model that ships inside the `mistral_common` package."""
    try:
        import mistral_common
    except ImportError:
        return None
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    return path if path.is_file() else None


def load_mistral_tokenizer(folder: str | os.PathLike):
    """The real 32k Mistral-7B tokenizer (byte fallback), offline, as a fast tokenizer.

    Needs `mistral_common` (for the .model file) and `sentencepiece` + `protobuf` (for the
    conversion to tokenizer.json). Adds <s> like the released checkpoints; pads with </s>.
    """
    import shutil

    from transformers import LlamaTokenizerFast

    src = mistral_model_file()
    if src is None:
        raise ImportError("mistral_common with data/tokenizer.model.v1 is needed for the Mistral tokenizer")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, folder / "tokenizer.model")
    # Without a tokenizer_config.json the default is add_bos_token=False; Mistral adds <s>.
    tok = LlamaTokenizerFast.from_pretrained(str(folder), add_bos_token=True)
    tok.pad_token = tok.eos_token
    return tok


def build_tiny_teacher(
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    vocab_size: int = 512,
    train_steps: int = 0,
    model_cfg: TinyModelConfig = TinyModelConfig(),
    corpus_size: int = 2000,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Save a tiny causal LM with its tokenizer to ``out_dir``: the given ``tokenizer``, or
    a byte-level BPE of ``vocab_size`` trained on the generated corpus. ``on_step(steps_done, loss)``
    follows the training (see :func:`train_briefly`)."""
    out_dir = Path(out_dir)
    corpus = generate_corpus(corpus_size, seed)
    if tokenizer is None:
        tokenizer = train_bpe_tokenizer(corpus, vocab_size)
    model = build_tiny_model(tokenizer, model_cfg)
    if train_steps:
        train_briefly(model, tokenizer, corpus, steps=train_steps, seed=seed, on_step=on_step)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def build_tiny_student_tokenizer(out_dir: str | os.PathLike, *, vocab_size: int = 400, seed: int = 0) -> Path:
    """The demo students' tokenizer: SentencePiece-style BPE, other boundaries than the teacher's."""
    out_dir = Path(out_dir)
    train_metaspace_bpe_tokenizer(generate_corpus(2000, seed + 7), vocab_size).save_pretrained(out_dir)
    return out_dir
