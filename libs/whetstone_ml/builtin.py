"""The built-in base model's generation: a tiny Qwen3 built locally, so Whetstone needs no download.

No weights or tokenizers can be fetched at runtime, yet every worker (trainer, sampler) and many
tests need a real Hugging Face model directory to load. This module generates one:

* a byte-level BPE tokenizer (~2048 tokens) trained with the ``tokenizers`` library on an
  English corpus that is generated here from fixed word lists and a fixed seed, with the ChatML
  special tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` as single tokens and a
  Qwen-style chat template;
* a ``Qwen3ForCausalLM`` with tiny sizes and random weights drawn after ``torch.manual_seed``.

The model's name, directory and sizes live in the torch-free :mod:`whetstone.models.builtin`, so
the control plane knows them without importing this module. Generation is deterministic (same
bytes every time) and takes a few seconds. Several processes may call
:func:`ensure_builtin_model` at once: each builds in its own temp dir beside the target and
publishes it with one atomic ``os.rename``; losers delete their copy and use the winner's.

Run ``python -m whetstone_ml.builtin MODELS_DIR`` to generate it by hand; ``whetstone up`` does
exactly that, in a child process, when the directory is missing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import uuid
from pathlib import Path

from whetstone.models.builtin import (
    BUILTIN_MODEL_DIRNAME,
    CONTEXT_LENGTH,
    ENDOFTEXT,
    IM_END,
    IM_START,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    builtin_model_dir,
)

_SEED = 20240601

# Qwen's template without the tool-calling branches: one ChatML block per message.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_COLOURS = "red orange yellow green blue purple pink brown black white grey gold silver".split()
_ANIMALS = (
    "cat dog horse cow sheep goat pig rabbit mouse lion tiger bear wolf fox deer eagle owl "
    "duck fish whale dolphin shark frog snake turtle bee ant elephant monkey zebra"
).split()
_PLACES = [  # (country, capital, another city)
    ("France", "Paris", "Lyon"),
    ("Germany", "Berlin", "Munich"),
    ("Italy", "Rome", "Milan"),
    ("Spain", "Madrid", "Barcelona"),
    ("England", "London", "Manchester"),
    ("Japan", "Tokyo", "Osaka"),
    ("China", "Beijing", "Shanghai"),
    ("India", "Delhi", "Mumbai"),
    ("Brazil", "Brasilia", "Rio"),
    ("Canada", "Ottawa", "Toronto"),
    ("Australia", "Canberra", "Sydney"),
    ("Egypt", "Cairo", "Alexandria"),
    ("Mexico", "Mexico City", "Monterrey"),
    ("Russia", "Moscow", "Kazan"),
    ("Kenya", "Nairobi", "Mombasa"),
    ("Norway", "Oslo", "Bergen"),
    ("Greece", "Athens", "Patras"),
    ("Peru", "Lima", "Cusco"),
    ("Ireland", "Dublin", "Cork"),
    ("Poland", "Warsaw", "Krakow"),
    ("Sweden", "Stockholm", "Gothenburg"),
    ("Portugal", "Lisbon", "Porto"),
    ("Argentina", "Buenos Aires", "Cordoba"),
    ("Nigeria", "Abuja", "Lagos"),
    ("Turkey", "Ankara", "Istanbul"),
    ("Korea", "Seoul", "Busan"),
]
_NAMES = (
    "Alice Bob Carol David Emma Frank Grace Henry Iris Jack Kate Leo Maya Noah Olive Paul"
).split()
_VERBS = "sees likes finds follows helps watches meets chases feeds calls".split()
_ADJECTIVES = "big small quick slow happy sad old young bright quiet loud gentle brave".split()
_OBJECTS = "book ball apple house tree river garden letter window door road boat".split()
_DIGIT_WORDS = "zero one two three four five six seven eight nine ten".split()
_MONTHS = (
    "January February March April May June July August September October November December"
).split()
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
# Common English words, so the BPE learns real subwords rather than only the template's.
_WORDS = (
    "the of and to in is was for that with as on by at from this have are not but had his they "
    "which one you were her all she there would their we him been has when who will more no if "
    "out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three states himself few house use "
    "during without again place around however home small found thought went say part once "
    "general high upon school every does got united left number course war until always away "
    "something fact though water less public put think almost hand enough far took head yet "
    "government system better set told nothing night end why called didn't eyes find going look "
    "asked later knew point next program city business give group toward young days let room "
    "president side social given present several order national possible rather second face per "
    "among form important often things looked early white case john become large big need four "
    "within felt along children saw best church ever least power development light thing family "
    "interest want members mind country area others done turned although open god service "
    "certain kind problem began different door thus help sense means whole matter perhaps itself "
    "york times law human line above name example action company hands local show whether five "
    "history gave today either act feet across taken past quite anything seen having death week "
    "experience body word half really field am car words already themselves information tell "
    "together college shall money period held keep sure probably free seems political real "
    "behind question making office brought whose special major heard problems ago became federal "
    "study available known result street economic boy position reason change south board "
    "individual job society areas west close turn love community true court force full seem "
    "market morning answer learn teach read write count music story river mountain forest sea "
    "island bread milk coffee tea sugar salt rain snow wind cloud summer winter spring autumn"
).split()
_PROSE = (
    "The sun rose over the hills and the morning was calm. People walked to work, children went "
    "to school, and the market opened its doors. It was a good day to learn something new.\n"
    "A model learns from examples. Each example is a sequence of tokens, and the model predicts "
    "the next token. Training makes the predictions better, one small step at a time.\n"
    "Water is wet, fire is hot, and snow is cold. The sky is blue and the grass is green.\n"
)


def _corpus() -> str:
    """An English corpus of a few hundred KB, the same every call (fixed seed, fixed lists)."""
    rng = random.Random(_SEED)
    parts: list[str] = [_PROSE * 20]
    for i, word in enumerate(_DIGIT_WORDS):
        parts.append(f"{word} is {i}. The number {i} is written {word}.\n")
    for n in range(200):
        parts.append(f"{n} {n * 7} {n * 13 + 1}, {n / 8:.2f}; {1800 + n}.\n")
    for _ in range(3000):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
        parts.append(words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice(".?!,;") + "\n")
    for _ in range(3000):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        country, capital, city = rng.choice(_PLACES)
        colour, animal = rng.choice(_COLOURS), rng.choice(_ANIMALS)
        name, other = rng.choice(_NAMES), rng.choice(_NAMES)
        adj, obj, verb = rng.choice(_ADJECTIVES), rng.choice(_OBJECTS), rng.choice(_VERBS)
        parts.append(
            rng.choice(
                [
                    f"Q: What is {a} plus {b}?\nA: {a} plus {b} is {a + b}.\n",
                    f"Q: What is the capital of {country}?\n"
                    f"A: The capital of {country} is {capital}.\n",
                    f"Q: What colour is the {animal}?\nA: The {animal} is {colour}.\n",
                    f"The {adj} {colour} {animal} lives in {city}, {country}.\n",
                    f"{name} {verb} {other} near the {obj} in {capital}.\n",
                    f"In {1900 + a} there were {a * 37 + b} {animal}s in {country}.\n",
                    f"{name} has {_DIGIT_WORDS[a % 11]} {colour} {obj}s and {b} {animal}s.\n",
                    f"User: Tell me about {city}.\nAssistant: {city} is a city in {country}.\n",
                    f"{a} {b} {a * b} {a - b} {a + b}. {a}.{b}% of {b * 10} is small.\n",
                    f"On {rng.choice(_DAYS)} {a % 28 + 1} {rng.choice(_MONTHS)} "
                    f"{name} went to {city}.\n",
                    f"Q: How many legs does a {animal} have?\n"
                    f"A: I think it has {_DIGIT_WORDS[a % 5]}.\n",
                ]
            )
        )
    return "".join(parts)


def _train_tokenizer(out_dir: Path) -> int:
    """Train the BPE, write tokenizer.json + tokenizer_config.json; return the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # The full byte alphabet keeps every string encodable, not only the corpus's characters.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _corpus()
    lines = corpus.splitlines(keepends=True)
    tokenizer.train_from_iterator(lines, trainer=trainer, length=len(lines))
    tokenizer.save(str(out_dir / "tokenizer.json"))

    # Written by hand rather than by ``save_pretrained`` so the file is byte-stable across
    # transformers versions and carries the chat template inline (the cookbook reads it there).
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": CONTEXT_LENGTH,
        "padding_side": "right",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer.get_vocab_size(with_added_tokens=True)


def _build_model(out_dir: Path, vocab_size: int, token_ids: dict[str, int]) -> None:
    """Write config.json, generation_config.json and model.safetensors with seeded weights."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        # head_dim 32, not 16: vLLM's CPU backend rejects head_dim 16.
        head_dim=32,
        max_position_embeddings=CONTEXT_LENGTH,
        tie_word_embeddings=False,
        bos_token_id=token_ids[ENDOFTEXT],
        eos_token_id=token_ids[IM_END],
        pad_token_id=token_ids[ENDOFTEXT],
        dtype="float32",
    )
    config.architectures = ["Qwen3ForCausalLM"]
    # Quiet while generating: no init warnings, no "Writing model shards" progress bar.
    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # fork_rng keeps the caller's global RNG untouched by our fixed seed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            # transformers types .to() wrongly, hence the ignore.
            model = Qwen3ForCausalLM(config).to(torch.float32).eval()  # type: ignore[arg-type]
        model.save_pretrained(out_dir, safe_serialization=True)
        GenerationConfig(
            bos_token_id=token_ids[ENDOFTEXT],
            eos_token_id=[token_ids[IM_END], token_ids[ENDOFTEXT]],
            pad_token_id=token_ids[ENDOFTEXT],
            do_sample=True,
            temperature=1.0,
        ).save_pretrained(out_dir)
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()


def generate_builtin_model(out_dir: Path) -> None:
    """Generate the model into ``out_dir`` (which must exist and be empty). Not atomic."""
    vocab_size = _train_tokenizer(out_dir)
    vocab = json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"]
    _build_model(out_dir, vocab_size, {tok: int(vocab[tok]) for tok in SPECIAL_TOKENS})


def ensure_builtin_model(cache_dir: Path) -> Path:
    """Return ``cache_dir / "tiny-qwen3-v1"``, generating it first if it is not there yet.

    The final directory only ever appears through an atomic rename of a complete build, so its
    existence means it is whole. Concurrent callers each build a private copy; the first rename
    wins and the others discard theirs (a few wasted seconds beat a lock file that can go stale).
    """
    cache_dir = Path(cache_dir)
    final = builtin_model_dir(cache_dir)
    if final.is_dir():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{BUILTIN_MODEL_DIRNAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        generate_builtin_model(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Lost the race: a non-empty ``final`` already exists (ENOTEMPTY / EEXIST).
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":
    print(ensure_builtin_model(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
