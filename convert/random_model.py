"""`mimo-mlx random-model`: a tiny model folder with random weights, to try every command without
the hub. It answers gibberish, and its config.json and model card say so.

The folder is what a Hugging Face checkpoint of MiMo-VL holds, at toy sizes: config.json (the
published layout), the weights in one safetensors file, a byte-level tokenizer with Qwen's control
tokens, MiMo's ChatML template and system prompt, and Qwen2-VL's image preprocessing. It is built
hidden beside the target and renamed into place when complete; an existing path is never replaced.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import click
import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from mimo_mlx.errors import MimoError, file_in_the_way
from mimo_mlx.model.config import ModelConfig
from mimo_mlx.model.mimo_vl import Model

from .output import new_hidden_folder, target_path

NOTE = "random weights, not trained: every answer is gibberish (made by mimo-mlx random-model)"
SEED = 0

# (content, special), after the 256 byte tokens: Qwen's control tokens, then MiMo's think tags.
ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<think>", False),
    ("</think>", False),
)
IDS = {content: 256 + i for i, (content, _) in enumerate(ADDED_TOKENS)}

# ChatML with MiMo's default system prompt; images, then videos, then the text of a message.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are MiMo, an AI assistant developed by Xiaomi.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "random_weights": NOTE,
    "torch_dtype": "float32",
    "vocab_size": 256 + len(ADDED_TOKENS),
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
    "tie_word_embeddings": False,
    "bos_token_id": IDS["<|endoftext|>"],
    "eos_token_id": IDS["<|im_end|>"],
    "image_token_id": IDS["<|image_pad|>"],
    "video_token_id": IDS["<|video_pad|>"],
    "vision_start_token_id": IDS["<|vision_start|>"],
    "vision_end_token_id": IDS["<|vision_end|>"],
    "vision_config": {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": 128,
        "hidden_act": "silu",
        "in_chans": 3,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    },
}

PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def write_random_model(path: str | os.PathLike) -> Path:
    """Write the random model folder at `path`, which must not exist yet; returns its path."""
    if not os.fspath(path).strip():
        raise MimoError(
            f"FOLDER {os.fspath(path)!r} is empty; give the folder to create (an unset shell "
            "variable expands to nothing)"
        )
    target = target_path(path)
    if target.exists() or target.is_symlink():
        raise MimoError(f"{target} exists; give a new folder (nothing is ever replaced)")
    if not target.parent.is_dir():
        above = file_in_the_way(target.parent)
        if above is not None:
            raise MimoError(f"{above} is a file, not a folder")
        raise MimoError(f"the folder {target.parent} does not exist")
    work = None
    try:
        work = new_hidden_folder(target, "partial")
        _write_files(work, target.name)
        os.rename(work, target)
    except OSError as err:
        raise MimoError(f"cannot write {target}: {err.strerror or err}") from None
    except RuntimeError as err:  # MLX could not write the weights: it says no more than that
        full = shutil.disk_usage(target.parent).free < 1 << 20  # the partial file filled it
        reason = "the disk is full" if full else f"MLX failed ({str(err).rstrip('.')})"
        raise MimoError(f"cannot write {target}: {reason}; nothing was written") from None
    finally:
        if work is not None and work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def _write_files(folder: Path, name: str) -> None:
    weights = random_weights(ModelConfig.from_hf(CONFIG))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    _tokenizer().save(str(folder / "tokenizer.json"))
    files = {
        "config.json": CONFIG,
        "tokenizer_config.json": _tokenizer_config(),
        "generation_config.json": {
            "bos_token_id": IDS["<|endoftext|>"],
            "eos_token_id": [IDS["<|im_end|>"], IDS["<|endoftext|>"]],
            "pad_token_id": IDS["<|endoftext|>"],
            "do_sample": True,
            "temperature": 0.3,
            "top_p": 0.95,
        },
        "preprocessor_config.json": PREPROCESSOR,
    }
    for file, content in files.items():
        (folder / file).write_text(json.dumps(content, indent=2) + "\n")
    count = sum(math.prod(w.shape) for w in weights.values())
    (folder / "README.md").write_text(model_card(name, count))


def random_weights(config: ModelConfig) -> dict[str, mx.array]:
    """Every parameter of the model, drawn at random (seed SEED): norm scales near 1, biases near
    0, weights with unit-variance outputs, so activations stay finite through every layer."""
    key = mx.random.key(SEED)
    weights = {}
    for name, param in tree_flatten(Model(config).parameters()):
        key, draw = mx.random.split(key)
        noise = mx.random.normal(param.shape, key=draw)
        if "norm" in name or name.endswith("ln_q.weight"):
            weights[name] = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            weights[name] = 0.1 * noise
        else:
            weights[name] = noise / math.sqrt(param.shape[-1])
    return weights


def _tokenizer() -> Tokenizer:
    """A byte-level BPE without merges: one token per byte, then the added tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens(
        [
            AddedToken(content, special=special, normalized=False)
            for content, special in ADDED_TOKENS
        ]
    )
    return tokenizer


def _tokenizer_config() -> dict:
    decoder = {
        str(IDS[content]): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for content, special in ADDED_TOKENS
    }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": decoder,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "split_special_tokens": False,
        "model_max_length": CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }


def model_card(name: str, parameters: int) -> str:
    text, vision = CONFIG, CONFIG["vision_config"]
    return f"""# {name}: random weights, for trying mimo-mlx

**The weights are random numbers, not a trained model: every answer is gibberish.**

Made by `mimo-mlx random-model`, to try mimo-mlx's commands (generate, chat, serve, annotate,
convert) without downloading MiMo-VL. It has MiMo-VL's architecture at toy sizes: a decoder
{text["hidden_size"]} wide with {text["num_hidden_layers"]} layers, a vision tower \
{vision["hidden_size"]} wide with {vision["depth"]} blocks, and the merger ({parameters:,}
parameters in float32, seed {SEED}); a byte-level tokenizer with Qwen's control tokens; MiMo's
ChatML template and system prompt; Qwen2-VL's image preprocessing. config.json says
`"random_weights"`.

For real answers, use MiMo-VL itself: `mimo-mlx generate --image photo.jpg --prompt "..."`
downloads it and converts it once.
"""


@click.command("random-model")
@click.argument("path", metavar="FOLDER")
def random_model(path: str) -> None:
    """Write a tiny model with random weights, to try the commands without the hub.

    \b
    mimo-mlx random-model ./tiny-random
    mimo-mlx generate --model ./tiny-random --image photo.jpg -p "What is this?"

    FOLDER must not exist. The model has MiMo-VL's architecture at toy sizes, a tokenizer, a
    chat template and image preprocessing, so generate, chat and serve accept it; its weights are
    random numbers, so every answer is gibberish (its model card and config.json say so).
    """
    target = write_random_model(path)
    click.echo(f"wrote {target}: a tiny model with random weights; every answer is gibberish")
