"""What a chat keeps between turns: the `Conversation` (its KV cache reused turn after turn), its
file format for /save and /load, the server's pool of many clients' conversations, and the
cache of encoded images.

May import: errors, options, model, inputs, generation.
"""
