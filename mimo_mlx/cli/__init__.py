"""The command line: `mimo-mlx` and its commands (generate, chat, convert, annotate, serve), the
terminal chat and the console printing. The top floor: nothing in the package imports it but
`__main__`.

May import: errors, options, model, inputs, grounding, generation, conversation, distributed,
serve, loading, convert.
"""
