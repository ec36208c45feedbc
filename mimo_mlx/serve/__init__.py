"""`mimo-mlx serve`'s HTTP server: the ASGI app, who may call it (Host, Origin, CORS), the generation
thread and its queue, OpenAI's request and response shapes (chat, tools and response_format, text
completions, the model's names), media fetched or read by policy, and what a request costs before
it runs. No click and no argument parsing here (that is `cli.serve`).

May import: errors, options, model, inputs, generation, conversation.
"""
