"""A tiny model folder laid out as Qwen2.5-VL-style checkpoints are for tools: the vision chat
template (no tools) in chat_template.json, the text template with tools in tokenizer_config.json,
Qwen2.5's <tool_call> tags as tokens, and an embedding wider than the tokenizer (as MiMo's)."""

from __future__ import annotations

import json
from pathlib import Path

from test_generate import write_model_folder
from tiny_models import save_checkpoint, tiny_hf_model
from tiny_tokenizer import (
    CHAT_TEMPLATE,
    TOOL_TOTAL_VOCAB,
    TOOLS_CHAT_TEMPLATE,
    build_tiny_tokenizer,
)

TOOL_MODEL_VOCAB = TOOL_TOTAL_VOCAB + 9


def write_tool_model_folder(folder: Path, seed: int = 5) -> Path:
    write_model_folder(folder, seed=seed)
    save_checkpoint(tiny_hf_model(seed=seed, text={"vocab_size": TOOL_MODEL_VOCAB}), folder)
    build_tiny_tokenizer(folder, tool_tokens=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TOOLS_CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return folder
