"""`mimo-mlx serve`'s HTTP server: the ASGI app, the generation thread and its queue, OpenAI's
request and response shapes (chat, tools and response_format, text completions, the model's
names), and media fetched or read by policy. No click and no argument
parsing here (that is `cli.serve`).

May import: errors, options, model, inputs, generation, conversation.
"""
