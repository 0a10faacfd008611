"""deform: body templates, skinning, SE(3) maths, particles and the audio-driven deformer.

Arrives with the create and drive issues; may import `render` only.
"""
