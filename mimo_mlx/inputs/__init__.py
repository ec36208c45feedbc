"""From a request to model inputs: the tokenizer, the chat template, chat messages, image and video
preprocessing (bit for bit as transformers' processors), and the `Processor` that turns a prompt
with images or video into token ids, pixels and grids. Independent of the network: it imports no
MLX module of `model`.

May import: errors, options.
"""
