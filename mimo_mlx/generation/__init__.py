"""Token loops, as in mlx-lm: `generate_step` -> `stream_generate` -> `generate` (`loop`), the
samplers and logits processors, prompt-lookup decoding, and the answer stream that applies stop
strings and keeps reasoning apart from the answer.

May import: errors, options, model, inputs, grounding.
"""
