"""Boxes and points back on the user's image: reading grounding answers and GUI actions, mapping
them from the processor's resized image to the user's pixels, and drawing them.

May import: errors, options, inputs.
"""
