"""Token loops, as in mlx-lm: `generate_step` -> `stream_generate` -> `generate` (`loop`),
several sequences decoded together (`batch`: `BatchGenerator`, `batch_generate`), the samplers
and logits processors, prompt-lookup decoding, structured output enforced while decoding
(`constrained`), tool calls read out of answers (`tool_calls`), and the answer stream that
applies stop strings and keeps reasoning apart from the answer.

May import: errors, options, model, inputs, grounding.
"""
