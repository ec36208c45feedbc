"""The network itself: MiMo-VL's vision tower, merger and decoder as MLX modules, their config,
the KV cache (one sequence's, or a batch's), M-RoPE and window bookkeeping, checkpoint names and
layouts, and what each backend needs (fused attention, the vision schedule, Apple silicon's
generation settings). Nothing here knows about prompts, tokenizers, generation loops, servers or
the command line.

May import: errors, options.
"""
